//! A writer for the `newc` cpio format, the archive format of a Linux initramfs.
//!
//! The kernel unpacks an uncompressed `newc` archive as readily as a compressed one, and
//! under software emulation an uncompressed archive boots faster (no in-guest gzip), so
//! this writer emits plain `newc`. Entries carry uid/gid 0 and mtime 0 so that the same
//! inputs give the same bytes. This module never touches the host filesystem itself.

use std::io::{self, Write};

/// `newc` magic: ASCII cpio with hexadecimal fields, no checksum.
const MAGIC: &str = "070701";
/// Name of the entry that ends every archive.
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Writes a `newc` archive entry by entry. Paths are written without a leading `/`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

/// One header's fields, in the order `newc` lays them out.
struct Header {
    mode: u32,
    nlink: u32,
    size: u32,
    rdev_major: u32,
    rdev_minor: u32,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: 1,
            offset: 0,
        }
    }

    /// Adds a directory with permission bits `perm` (e.g. `0o755`).
    pub fn add_dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let header = Header {
            mode: S_IFDIR | (perm & 0o7777),
            nlink: 2,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, &header, &[])
    }

    /// Adds a regular file holding `data`.
    pub fn add_file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path} is larger than newc allows (4 GiB)"),
            )
        })?;
        let header = Header {
            mode: S_IFREG | (perm & 0o7777),
            nlink: 1,
            size,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, &header, data)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let header = Header {
            mode: S_IFLNK | 0o777,
            nlink: 1,
            size: target.len() as u32,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry(path, &header, target.as_bytes())
    }

    /// Adds a character device node (e.g. `/dev/console`, 5:1).
    pub fn add_char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        let header = Header {
            mode: S_IFCHR | (perm & 0o7777),
            nlink: 1,
            size: 0,
            rdev_major: major,
            rdev_minor: minor,
        };
        self.entry(path, &header, &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let header = Header {
            mode: 0,
            nlink: 1,
            size: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.raw_entry(TRAILER, 0, &header, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, header: &Header, data: &[u8]) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path == TRAILER || path.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio entry name {path:?}"),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.raw_entry(path, ino, header, data)
    }

    fn raw_entry(&mut self, name: &str, ino: u32, h: &Header, data: &[u8]) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino,
            h.mode,
            0, // uid
            0, // gid
            h.nlink,
            0, // mtime
            h.size,
            0, // devmajor
            0, // devminor
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0, // check
        ];
        let mut head = String::with_capacity(110);
        head.push_str(MAGIC);
        for field in fields {
            head.push_str(&format!("{field:08x}"));
        }
        self.write(head.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    /// Pads to the next multiple of four bytes, as `newc` requires after names and data.
    fn pad(&mut self) -> io::Result<()> {
        let rem = (self.offset % 4) as usize;
        if rem != 0 {
            self.write(&[0u8; 3][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(entry: &[u8], index: usize) -> u32 {
        let start = 6 + index * 8;
        let text = std::str::from_utf8(&entry[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    #[test]
    fn file_entry_has_newc_header_name_and_padded_data() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_file("/init", 0o755, b"hello").unwrap();
        let bytes = w.finish().unwrap();

        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(field(&bytes, 0), 1, "ino");
        assert_eq!(field(&bytes, 1), 0o100_755, "mode");
        assert_eq!(field(&bytes, 6), 5, "filesize");
        assert_eq!(field(&bytes, 11), 5, "namesize counts the nul");
        // 110 header + "init\0" = 115, padded to 116; data 5 bytes padded to 8.
        assert_eq!(&bytes[110..115], b"init\0");
        assert_eq!(bytes[115], 0);
        assert_eq!(&bytes[116..121], b"hello");
        assert_eq!(&bytes[121..124], &[0, 0, 0]);
        assert_eq!(&bytes[124..130], b"070701", "trailer starts aligned");
        assert_eq!(bytes.len() % 4, 0);
        let trailer = &bytes[124..];
        assert_eq!(&trailer[110..121], b"TRAILER!!!\0");
    }

    #[test]
    fn symlink_device_and_dir_modes() {
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("bin", 0o755).unwrap();
        // 110 + "bin\0" (4) = 114, padded to 116; a directory has no data.
        let dir_len = 116;
        w.add_symlink("bin/sh", "busybox").unwrap();
        w.add_char_device("dev/console", 0o600, 5, 1).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(field(&bytes, 1), 0o040_755);
        let second = &bytes[dir_len..];
        assert_eq!(field(second, 1), 0o120_777);
        assert_eq!(field(second, 6), 7, "a symlink's data is its target");
        // 110 + "bin/sh\0" (7) = 117 -> 120, + "busybox" (7) -> 127 -> 128.
        let third = &second[128..];
        assert_eq!(field(third, 1), 0o020_600);
        assert_eq!(field(third, 9), 5, "rdevmajor");
        assert_eq!(field(third, 10), 1, "rdevminor");
    }

    #[test]
    fn rejects_empty_and_reserved_names() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.add_dir("/", 0o755).is_err());
        assert!(w.add_file("TRAILER!!!", 0o644, b"").is_err());
    }

    /// GNU cpio (when installed) reads the archive back with the same names and contents.
    #[test]
    fn gnu_cpio_lists_and_extracts_the_archive() {
        let Ok(status) = std::process::Command::new("cpio")
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
        else {
            eprintln!("cpio is not installed; skipping the cross-check");
            return;
        };
        assert!(status.success());
        let mut w = CpioWriter::new(Vec::new());
        w.add_dir("etc", 0o755).unwrap();
        w.add_file("etc/motd", 0o644, b"pure v2\n").unwrap();
        w.add_symlink("motd", "etc/motd").unwrap();
        let bytes = w.finish().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
            .current_dir(dir.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read(dir.path().join("etc/motd")).unwrap(),
            b"pure v2\n"
        );
        assert_eq!(
            std::fs::read_link(dir.path().join("motd")).unwrap(),
            std::path::Path::new("etc/motd")
        );
    }
}
