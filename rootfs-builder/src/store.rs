//! The output directory: where images live and how they are published.
//!
//! ```text
//! <out>/<key>/            a finished image (marker: etc/hatchery/complete holds <key>)
//! <out>/<name> -> <key>   the newest image of a manifest name (relative symlink)
//! <out>/.build-<key>/     an image being built; anything `.build-*` found at the
//!                         start of a build (under the lock) is left over from an
//!                         interrupted build and is deleted
//! <out>/.lock             flock(2) held by a running build
//! ```
//!
//! An image directory appears under its key only by `rename(2)` of a finished
//! build, and a name moves to a new key only by `rename(2)` of a fresh symlink,
//! so readers see either the old or the new state, never a partial one.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::manifest::CacheKey;

/// In-image directory holding what the builder records about an image.
pub const RECORD_DIR: &str = "etc/hatchery";
/// In-image marker written last; its content is the key.
pub const COMPLETE_MARKER: &str = "etc/hatchery/complete";
const BUILD_PREFIX: &str = ".build-";
const LINK_PREFIX: &str = ".link-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0} exists and is not a symlink; refusing to replace it")]
    NotALink(PathBuf),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// `/etc/hatchery/image.json`: what, from what and when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub key: String,
    pub format_version: u32,
    pub suite: String,
    pub variant: String,
    pub architecture: String,
    pub mirror: String,
    pub packages: Vec<String>,
    /// When this build ran (RFC 3339, UTC). Differs between rebuilds by nature.
    pub build_date: String,
    pub build_seconds: f64,
    /// `Date:` of the suite's Release file the build used: the mirror's state.
    pub release_date: Option<String>,
    pub release_version: Option<String>,
    /// File times in the image are clamped to this (Unix seconds).
    pub source_date_epoch: Option<i64>,
    pub builder_version: String,
    pub debootstrap_version: Option<String>,
    /// Number of installed packages (see packages.txt).
    pub installed_packages: usize,
}

/// One image found in the output directory.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub key: CacheKey,
    pub path: PathBuf,
    pub complete: bool,
    /// Names (symlinks in the output directory) that point at this image.
    pub names: Vec<String>,
    pub record: Option<ImageRecord>,
}

pub struct Store {
    dir: PathBuf,
}

/// An exclusive lock on the output directory, released on drop.
pub struct StoreLock {
    _file: File,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image_path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(key.as_str())
    }

    pub fn build_path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{BUILD_PREFIX}{key}"))
    }

    pub fn link_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when `<out>/<key>` is a finished image.
    pub fn is_complete(&self, key: &CacheKey) -> bool {
        fs::read_to_string(self.image_path(key).join(COMPLETE_MARKER))
            .is_ok_and(|k| k.trim() == key.as_str())
    }

    pub fn create(&self) -> Result<(), StoreError> {
        fs::create_dir_all(&self.dir).map_err(io_err("create", &self.dir))
    }

    /// Takes the build lock, waiting for another build to finish if needed.
    /// `on_wait` is called once if the lock is busy.
    pub fn lock(&self, on_wait: impl FnOnce()) -> Result<StoreLock, StoreError> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        let fd = file.as_raw_fd();
        // SAFETY: fd is open for the lifetime of `file`.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            on_wait();
            loop {
                // SAFETY: as above.
                if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(io_err("lock", &path)(e));
                }
            }
        }
        Ok(StoreLock { _file: file })
    }

    /// Deletes what interrupted builds left behind. Call with the lock held.
    pub fn remove_stale(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("read", &self.dir))? {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(BUILD_PREFIX) || name.starts_with(LINK_PREFIX) {
                let path = entry.path();
                fsutil::remove_tree(&path).map_err(io_err("remove stale", &path))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }

    /// Moves a finished build to `<out>/<key>`. An existing (forced or
    /// incomplete) image there is swapped out atomically and then deleted.
    pub fn install(&self, build: &Path, key: &CacheKey) -> Result<PathBuf, StoreError> {
        let target = self.image_path(key);
        if fs::symlink_metadata(&target).is_ok() {
            fsutil::exchange(build, &target).map_err(io_err("swap in", &target))?;
            // `build` now holds the previous image.
            fsutil::remove_tree(build).map_err(io_err("remove previous image", build))?;
        } else {
            fs::rename(build, &target).map_err(io_err("rename into place", &target))?;
        }
        fsutil::sync_fs(&self.dir).map_err(io_err("sync", &self.dir))?;
        Ok(target)
    }

    /// Points `<out>/<name>` at `<key>` (relative link, replaced atomically).
    /// Does nothing if it already points there.
    pub fn point_name(&self, name: &str, key: &CacheKey) -> Result<PathBuf, StoreError> {
        let link = self.link_path(name);
        match fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {
                if fs::read_link(&link).is_ok_and(|t| t == Path::new(key.as_str())) {
                    return Ok(link);
                }
            }
            Ok(_) => return Err(StoreError::NotALink(link)),
            Err(_) => {}
        }
        let tmp = self
            .dir
            .join(format!("{LINK_PREFIX}{name}.{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        symlink(key.as_str(), &tmp).map_err(io_err("create symlink", &tmp))?;
        fs::rename(&tmp, &link).map_err(io_err("replace symlink", &link))?;
        Ok(link)
    }

    /// Images in the output directory (complete ones, and incomplete ones
    /// under a key name), with the names pointing at them.
    pub fn list(&self) -> Result<Vec<ImageInfo>, StoreError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &self.dir)(e)),
        };
        let mut images = Vec::new();
        let mut links = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err("read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.file_type().is_symlink() && !name.starts_with('.') {
                if let Ok(target) = fs::read_link(&path) {
                    links.push((name, target.to_string_lossy().into_owned()));
                }
            } else if let (true, Some(key)) = (meta.is_dir(), CacheKey::from_hex(&name)) {
                let record = fs::read(path.join(RECORD_DIR).join("image.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                images.push(ImageInfo {
                    complete: self.is_complete(&key),
                    key,
                    path,
                    names: Vec::new(),
                    record,
                });
            }
        }
        for image in &mut images {
            image.names = links
                .iter()
                .filter(|(_, t)| t == image.key.as_str())
                .map(|(n, _)| n.clone())
                .collect();
            image.names.sort();
        }
        images.sort_by(|a, b| {
            let date = |i: &ImageInfo| i.record.as_ref().map(|r| r.build_date.clone());
            date(b).cmp(&date(a)).then(a.key.cmp(&b.key))
        });
        Ok(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> CacheKey {
        CacheKey::from_hex(&c.to_string().repeat(64)).unwrap()
    }

    fn fake_image(dir: &Path, key: &CacheKey) {
        fs::create_dir_all(dir.join(RECORD_DIR)).unwrap();
        fs::write(dir.join(COMPLETE_MARKER), key.as_str()).unwrap();
    }

    #[test]
    fn install_link_list_and_replace() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("out"));
        store.create().unwrap();
        let _lock = store.lock(|| panic!("nobody else holds the lock")).unwrap();

        let k = key('a');
        assert!(!store.is_complete(&k));
        let build = store.build_path(&k);
        fake_image(&build, &k);
        let path = store.install(&build, &k).unwrap();
        assert!(store.is_complete(&k));
        assert!(!build.exists());

        store.point_name("r", &k).unwrap();
        assert_eq!(
            fs::read_link(store.link_path("r")).unwrap(),
            Path::new(k.as_str())
        );
        assert!(store.link_path("r").join(COMPLETE_MARKER).exists());

        // A forced rebuild swaps the image under the same key.
        fake_image(&build, &k);
        fs::write(build.join("new"), "").unwrap();
        store.install(&build, &k).unwrap();
        assert!(path.join("new").exists());
        assert!(!build.exists());

        // The name moves to another key.
        let k2 = key('b');
        fake_image(&store.image_path(&k2), &k2);
        store.point_name("r", &k2).unwrap();
        let list = store.list().unwrap();
        assert_eq!(list.len(), 2);
        let b = list.iter().find(|i| i.key == k2).unwrap();
        assert_eq!(b.names, vec!["r".to_owned()]);
        assert!(b.complete);
        assert!(list.iter().find(|i| i.key == k).unwrap().names.is_empty());
    }

    #[test]
    fn stale_builds_are_removed_and_images_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        let k = key('c');
        fake_image(&store.image_path(&k), &k);
        fs::create_dir_all(store.build_path(&key('d')).join("var/cache")).unwrap();
        symlink("x", tmp.path().join(".link-r.123")).unwrap();
        let removed = store.remove_stale().unwrap();
        assert_eq!(removed.len(), 2);
        assert!(store.is_complete(&k));
        assert!(!store.build_path(&key('d')).exists());
    }

    #[test]
    fn refuses_to_replace_a_real_directory_with_a_name_link() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path());
        fs::create_dir(tmp.path().join("r")).unwrap();
        assert!(matches!(
            store.point_name("r", &key('e')),
            Err(StoreError::NotALink(_))
        ));
    }
}
