//! Which kernel a VM boots, and how to make it boot fast under emulation.
//!
//! The default is the newest `/boot/vmlinuz-<version>` that has a matching
//! `/lib/modules/<version>/modules.dep` (the guest needs the modules for 9p and overlayfs).
//! A distribution kernel is a compressed `bzImage`; under TCG its self-decompression costs
//! seconds, so [`Kernel::extract_vmlinux`] decompresses the payload on the host into an
//! uncompressed ELF `vmlinux`, which qemu boots directly through its PVH entry point.
//!
//! This module only reads the host's kernel files; it never changes `/boot`.

use std::cmp::Ordering;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where distributions install kernels.
pub const BOOT_DIR: &str = "/boot";
/// Where distributions install kernel modules.
pub const MODULES_ROOT: &str = "/lib/modules";

/// Errors while finding or preparing a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no kernel found: no {boot_dir}/vmlinuz-* has modules in {modules_root} (install linux-image-amd64)")]
    NoKernel {
        boot_dir: PathBuf,
        modules_root: PathBuf,
    },
    #[error("cannot read kernel {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot tell the version of kernel {0}: not a bzImage and not named vmlinuz-<version>"
    )]
    UnknownVersion(PathBuf),
    #[error("cannot extract vmlinux from {path}: {reason}")]
    Extract { path: PathBuf, reason: String },
}

/// A kernel image and the modules that belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The bootable image (`bzImage`) as installed.
    pub image: PathBuf,
    /// `uname -r` of that kernel.
    pub version: String,
    /// `/lib/modules/<version>` when it exists (with a `modules.dep`); `None` means the
    /// guest gets no modules and everything it needs must be built in.
    pub modules_dir: Option<PathBuf>,
}

impl Kernel {
    /// The newest kernel in `/boot` that has modules in `/lib/modules`.
    pub fn discover() -> Result<Self, KernelError> {
        Self::discover_in(Path::new(BOOT_DIR), Path::new(MODULES_ROOT))
    }

    /// [`Kernel::discover`] over other directories (for tests).
    pub fn discover_in(boot_dir: &Path, modules_root: &Path) -> Result<Self, KernelError> {
        let none = || KernelError::NoKernel {
            boot_dir: boot_dir.to_path_buf(),
            modules_root: modules_root.to_path_buf(),
        };
        let entries = fs::read_dir(boot_dir).map_err(|_| none())?;
        let newest = entries
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                let version = name.strip_prefix("vmlinuz-")?.to_owned();
                let modules = modules_root.join(&version);
                modules.join("modules.dep").is_file().then_some(version)
            })
            .max_by(|a, b| compare_versions(a, b))
            .ok_or_else(none)?;
        Ok(Self {
            image: boot_dir.join(format!("vmlinuz-{newest}")),
            modules_dir: Some(modules_root.join(&newest)),
            version: newest,
        })
    }

    /// An explicitly chosen image. Its version comes from the `bzImage` header (or the
    /// file name), and its modules from `modules_root/<version>` when present.
    pub fn from_image(image: &Path, modules_root: &Path) -> Result<Self, KernelError> {
        let bytes = fs::read(image).map_err(|source| KernelError::Read {
            path: image.to_path_buf(),
            source,
        })?;
        let version = bzimage_version(&bytes)
            .or_else(|| {
                let name = image.file_name()?.to_str()?;
                Some(name.strip_prefix("vmlinuz-")?.to_owned())
            })
            .ok_or_else(|| KernelError::UnknownVersion(image.to_path_buf()))?;
        let modules = modules_root.join(&version);
        Ok(Self {
            image: image.to_path_buf(),
            modules_dir: modules.join("modules.dep").is_file().then_some(modules),
            version,
        })
    }

    /// Decompresses the image's payload into `dest` (an ELF `vmlinux`) and checks that it
    /// has the PVH entry note qemu needs to boot it directly. Uses the host's `xz`, `zstd`
    /// or `gzip`.
    pub fn extract_vmlinux(&self, dest: &Path) -> Result<(), KernelError> {
        let fail = |reason: String| KernelError::Extract {
            path: self.image.clone(),
            reason,
        };
        let bytes = fs::read(&self.image).map_err(|source| KernelError::Read {
            path: self.image.clone(),
            source,
        })?;
        let payload = bzimage_payload(&bytes).ok_or_else(|| fail("no payload".into()))?;
        let tool: &[&str] = match payload.compression {
            Compression::Xz => &["xz", "-dc", "--single-stream"],
            Compression::Zstd => &["zstd", "-dcq"],
            Compression::Gzip => &["gzip", "-dc"],
            Compression::Other => return Err(fail("unsupported compression".into())),
        };
        let out =
            fs::File::create(dest).map_err(|e| fail(format!("create {}: {e}", dest.display())))?;
        let mut child = Command::new(tool[0])
            .args(&tool[1..])
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| fail(format!("run {}: {e}", tool[0])))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let data = payload.data.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&data));
        let status = child
            .wait()
            .map_err(|e| fail(format!("wait for {}: {e}", tool[0])))?;
        let fed = feeder
            .join()
            .map_err(|_| fail("feeder thread panicked".into()))?;
        if !status.success() {
            return Err(fail(format!("{} failed with {status}", tool[0])));
        }
        fed.map_err(|e| fail(format!("feed {}: {e}", tool[0])))?;
        let vmlinux = fs::read(dest).map_err(|e| fail(format!("read back: {e}")))?;
        if vmlinux.len() as u64 != u64::from(payload.uncompressed_size) {
            return Err(fail(format!(
                "decompressed {} bytes, header says {}",
                vmlinux.len(),
                payload.uncompressed_size
            )));
        }
        if !has_pvh_note(&vmlinux) {
            return Err(fail(
                "vmlinux has no pvh entry note (CONFIG_PVH is off)".into(),
            ));
        }
        Ok(())
    }
}

/// Compares kernel versions the way people read them: digit runs numerically, the rest
/// as text (`6.1.0-10-amd64` is newer than `6.1.0-9-amd64`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn is_bzimage(bytes: &[u8]) -> bool {
    bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// The `uname -r` string of an x86 `bzImage`, read from its setup header
/// (`kernel_version` at 0x20e points at "6.1.0-56-amd64 (debian-kernel@...) #1 ...").
pub fn bzimage_version(bytes: &[u8]) -> Option<String> {
    if !is_bzimage(bytes) {
        return None;
    }
    let offset = usize::from(read_u16(bytes, 0x20e)?);
    if offset == 0 {
        return None;
    }
    let text = bytes.get(offset + 0x200..)?;
    let end = text.iter().position(|&b| b == 0 || b == b' ')?;
    let version = std::str::from_utf8(&text[..end]).ok()?;
    (!version.is_empty()).then(|| version.to_owned())
}

/// How a `bzImage` payload is compressed, told by its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
    Gzip,
    Other,
}

/// The compressed kernel inside a `bzImage`.
#[derive(Debug, PartialEq, Eq)]
pub struct Payload<'a> {
    pub compression: Compression,
    /// The compressed stream, without the size the kernel build appends.
    pub data: &'a [u8],
    /// The size of the decompressed `vmlinux`, from the appended little-endian word.
    pub uncompressed_size: u32,
}

/// Finds the payload of a `bzImage` (boot protocol 2.08+: `payload_offset` at 0x248 and
/// `payload_length` at 0x24c, relative to the protected-mode code after the setup sectors).
pub fn bzimage_payload(bytes: &[u8]) -> Option<Payload<'_>> {
    if !is_bzimage(bytes) || read_u16(bytes, 0x206)? < 0x0208 {
        return None;
    }
    let setup_sects = match bytes.get(0x1f1)? {
        0 => 4,
        n => usize::from(*n),
    };
    let start = (setup_sects + 1) * 512 + read_u32(bytes, 0x248)? as usize;
    let len = read_u32(bytes, 0x24c)? as usize;
    let whole = bytes.get(start..start.checked_add(len)?)?;
    let (data, size) = whole.split_at(whole.len().checked_sub(4)?);
    let compression = if data.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if data.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else {
        Compression::Other
    };
    Some(Payload {
        compression,
        data,
        uncompressed_size: u32::from_le_bytes(size.try_into().ok()?),
    })
}

/// Whether an ELF64 image carries the Xen `PHYS32_ENTRY` note (type 18) that qemu's PVH
/// boot looks for.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (
        read_u64(elf, 0x20),
        read_u16(elf, 0x36),
        read_u16(elf, 0x38),
    ) else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff as usize + i * usize::from(phentsize);
        if read_u32(elf, ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(offset), Some(size)) = (read_u64(elf, ph + 8), read_u64(elf, ph + 32)) else {
            return false;
        };
        let Some(notes) = elf.get(offset as usize..(offset + size) as usize) else {
            return false;
        };
        let align4 = |n: usize| (n + 3) & !3;
        let mut at = 0;
        while let (Some(namesz), Some(descsz), Some(kind)) = (
            read_u32(notes, at),
            read_u32(notes, at + 4),
            read_u32(notes, at + 8),
        ) {
            let name = notes.get(at + 12..at + 12 + namesz as usize);
            if name == Some(b"Xen\0") && kind == XEN_ELFNOTE_PHYS32_ENTRY {
                return true;
            }
            at += 12 + align4(namesz as usize) + align4(descsz as usize);
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(
            compare_versions("6.1.0-10-amd64", "6.1.0-9-amd64"),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions("6.1.0-56-amd64", "6.12.0-1-amd64"),
            Ordering::Less
        );
        assert_eq!(
            compare_versions("5.10.0-30-amd64", "5.10.0-30-amd64"),
            Ordering::Equal
        );
        assert_eq!(
            compare_versions("6.1.0-9-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Less
        );
    }

    fn fake_bzimage(version: &str, payload: &[u8], size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 0x1000];
        img[0x1f1] = 1; // one setup sector: protected-mode code starts at 1024
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let text = format!("{version} (builder@example) #1 SMP\0");
        img[0x300..0x300 + text.len()].copy_from_slice(text.as_bytes());
        img[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32 + 4).to_le_bytes());
        let start = 1024 + 16;
        img[start..start + payload.len()].copy_from_slice(payload);
        img[start + payload.len()..start + payload.len() + 4].copy_from_slice(&size.to_le_bytes());
        img
    }

    #[test]
    fn reads_version_and_payload_from_setup_header() {
        let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2, 3];
        let img = fake_bzimage("6.1.0-56-amd64", &xz, 65_906_612);
        assert_eq!(bzimage_version(&img).as_deref(), Some("6.1.0-56-amd64"));
        let payload = bzimage_payload(&img).unwrap();
        assert_eq!(payload.compression, Compression::Xz);
        assert_eq!(payload.data, &xz);
        assert_eq!(payload.uncompressed_size, 65_906_612);
    }

    #[test]
    fn not_a_bzimage_has_no_version() {
        assert_eq!(bzimage_version(b"\x7fELF"), None);
        assert_eq!(bzimage_payload(&[0u8; 4096]), None);
    }

    #[test]
    fn discovers_newest_kernel_with_modules() {
        let dir = tempfile::tempdir().unwrap();
        let boot = dir.path().join("boot");
        let modules = dir.path().join("modules");
        fs::create_dir_all(&boot).unwrap();
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64", "6.2.0-1-amd64"] {
            fs::write(boot.join(format!("vmlinuz-{v}")), b"").unwrap();
        }
        // The newest image has no modules, so it cannot mount 9p: skip it.
        for v in ["6.1.0-9-amd64", "6.1.0-10-amd64"] {
            fs::create_dir_all(modules.join(v)).unwrap();
            fs::write(modules.join(v).join("modules.dep"), b"").unwrap();
        }
        let k = Kernel::discover_in(&boot, &modules).unwrap();
        assert_eq!(k.version, "6.1.0-10-amd64");
        assert_eq!(k.image, boot.join("vmlinuz-6.1.0-10-amd64"));
        assert_eq!(k.modules_dir, Some(modules.join("6.1.0-10-amd64")));

        let empty = dir.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert!(matches!(
            Kernel::discover_in(&empty, &modules),
            Err(KernelError::NoKernel { .. })
        ));
    }

    #[test]
    fn finds_pvh_note_in_elf() {
        // A minimal ELF64 with one PT_NOTE program header holding a Xen note of type 18.
        let mut elf = vec![0u8; 0x200];
        elf[..5].copy_from_slice(b"\x7fELF\x02");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf[0x40..0x44].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf[0x48..0x50].copy_from_slice(&0x100u64.to_le_bytes()); // p_offset
        elf[0x60..0x68].copy_from_slice(&20u64.to_le_bytes()); // p_filesz
        let note = [4u32, 4, 18];
        for (i, word) in note.iter().enumerate() {
            elf[0x100 + i * 4..0x104 + i * 4].copy_from_slice(&word.to_le_bytes());
        }
        elf[0x10c..0x110].copy_from_slice(b"Xen\0");
        assert!(has_pvh_note(&elf));
        elf[0x108] = 17;
        assert!(!has_pvh_note(&elf));
    }
}
