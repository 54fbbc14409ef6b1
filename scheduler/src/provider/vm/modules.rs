//! The kernel modules a guest loads before it can mount its root: reading `modules.dep`,
//! putting a module's dependencies before it, and decompressing `.ko.xz`/`.ko.zst`/`.ko.gz`
//! so that busybox `insmod` can load the result.
//!
//! This module reads `/lib/modules/<version>`; it never loads anything into the host.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The modules a guest needs for its root: the virtio PCI transport, 9p over virtio and
/// overlayfs. Their dependencies (virtio, virtio_ring, 9pnet, netfs, fscache, ...) are
/// resolved from `modules.dep`. Built-in ones are skipped.
pub const GUEST_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// The modules a guest with a network needs besides: the virtio NIC.
pub const NET_MODULES: &[&str] = &["virtio_net"];

/// Errors while resolving or reading modules.
#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel module {0} is neither in modules.dep nor in modules.builtin")]
    Missing(String),
    #[error("cannot decompress {path}: {reason}")]
    Decompress { path: PathBuf, reason: String },
}

/// One module to load, with its path relative to the modules directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`9pnet_virtio`: dashes become underscores).
    pub name: String,
    /// Path relative to `/lib/modules/<version>`, e.g. `kernel/net/9p/9pnet_virtio.ko`.
    pub path: PathBuf,
}

/// `modules.dep` and `modules.builtin` of one kernel.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    deps: HashMap<String, (PathBuf, Vec<String>)>,
    builtin: HashSet<String>,
}

/// The module name of a path: `kernel/drivers/char/hw_random/virtio-rng.ko.xz` → `virtio_rng`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Reads `modules.dep` and (if present) `modules.builtin` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModulesError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|source| ModulesError::Read { path, source })
        };
        let dep = read("modules.dep")?;
        let builtin = read("modules.builtin").unwrap_or_default();
        Ok(Self::parse(&dep, &builtin))
    }

    /// Parses the text of `modules.dep` (`path: dep-path dep-path ...`) and
    /// `modules.builtin` (one path per line).
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Self {
        let deps = modules_dep
            .lines()
            .filter_map(|line| {
                let (path, rest) = line.split_once(':')?;
                let path = path.trim();
                let deps = rest.split_whitespace().map(module_name).collect();
                Some((module_name(path), (PathBuf::from(path), deps)))
            })
            .collect();
        let builtin = modules_builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Self { deps, builtin }
    }

    /// Whether `name` is compiled into the kernel.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&module_name(name))
    }

    /// The modules to load for `wanted`, each after its dependencies, without duplicates
    /// and without built-in ones.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Vec<Module>, ModulesError> {
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for name in wanted {
            self.visit(&module_name(name), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut HashSet<String>,
        order: &mut Vec<Module>,
    ) -> Result<(), ModulesError> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        match self.deps.get(name) {
            Some((path, deps)) => {
                for dep in deps {
                    self.visit(dep, seen, order)?;
                }
                order.push(Module {
                    name: name.to_owned(),
                    path: path.clone(),
                });
                Ok(())
            }
            None if self.builtin.contains(name) => Ok(()),
            None => Err(ModulesError::Missing(name.to_owned())),
        }
    }
}

/// The bytes of a module file, decompressed with the host's `xz`, `zstd` or `gzip` when
/// it is compressed.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModulesError> {
    let name = path.to_string_lossy();
    let tool: Option<&[&str]> = if name.ends_with(".ko.xz") {
        Some(&["xz", "-dc"])
    } else if name.ends_with(".ko.zst") {
        Some(&["zstd", "-dcq"])
    } else if name.ends_with(".ko.gz") {
        Some(&["gzip", "-dc"])
    } else {
        None
    };
    let Some(tool) = tool else {
        return fs::read(path).map_err(|source| ModulesError::Read {
            path: path.to_path_buf(),
            source,
        });
    };
    let fail = |reason: String| ModulesError::Decompress {
        path: path.to_path_buf(),
        reason,
    };
    let out = Command::new(tool[0])
        .args(&tool[1..])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(format!("run {}: {e}", tool[0])))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{} failed with {}: {}",
            tool[0],
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/netfs/netfs.ko:
kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko
kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko kernel/fs/netfs/netfs.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/9p/9pnet.ko:
kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko:
";

    fn names(modules: &[Module]) -> Vec<&str> {
        modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn names_drop_suffixes_and_dashes() {
        assert_eq!(module_name("kernel/fs/9p/9p.ko"), "9p");
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko.xz"),
            "virtio_rng"
        );
        assert_eq!(module_name("overlay.ko.zst"), "overlay");
        assert_eq!(module_name("virtio-pci"), "virtio_pci");
    }

    #[test]
    fn resolves_dependencies_before_dependents_once() {
        let index = ModuleIndex::parse(DEP, "");
        let order = index.resolve(GUEST_MODULES).unwrap();
        let order = names(&order);
        assert_eq!(
            order,
            [
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p",
                "overlay",
            ]
        );
        let pos = |n: &str| order.iter().position(|m| *m == n).unwrap();
        assert!(pos("9pnet") < pos("9p") && pos("netfs") < pos("fscache"));
    }

    #[test]
    fn keeps_the_path_of_compressed_modules() {
        let index = ModuleIndex::parse(DEP, "");
        let order = index.resolve(&["virtio-rng"]).unwrap();
        assert_eq!(
            order.last().unwrap().path,
            PathBuf::from("kernel/drivers/char/hw_random/virtio-rng.ko.xz")
        );
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_fail() {
        let dep = "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko\n";
        let builtin = "kernel/net/9p/9pnet.ko\nkernel/drivers/virtio/virtio_pci.ko\n";
        let index = ModuleIndex::parse(dep, builtin);
        assert!(index.is_builtin("virtio-pci"));
        assert_eq!(
            names(&index.resolve(&["virtio_pci", "9p"]).unwrap()),
            ["9p"]
        );
        assert!(matches!(
            index.resolve(&["overlay"]),
            Err(ModulesError::Missing(name)) if name == "overlay"
        ));
    }

    #[test]
    fn reads_xz_compressed_modules() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("m.ko");
        fs::write(&plain, b"\x7fELF module").unwrap();
        assert_eq!(read_module(&plain).unwrap(), b"\x7fELF module");
        let Ok(status) = Command::new("xz").args(["-k"]).arg(&plain).status() else {
            eprintln!("xz is not installed; skipping the compressed case");
            return;
        };
        assert!(status.success());
        assert_eq!(
            read_module(&dir.path().join("m.ko.xz")).unwrap(),
            b"\x7fELF module"
        );
    }
}
