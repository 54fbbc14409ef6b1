//! File modes of the data directory (R15): every file the platform keeps there is 0600
//! and every directory 0700, so only the platform's own user can list or read what users
//! produced, even sealed. New files and directories get these modes when they are
//! created; [`restrict_tree`] brings an existing tree (an older data directory, or files
//! a library wrote with the process umask) to them.
//!
//! This module changes modes only; it never reads, moves or removes data.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of every data file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory under the data directory, and of the data directory itself.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with mode 0700, and makes `dir` 0700 if it
/// already existed with another mode.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    restrict(dir, DIR_MODE)
}

/// Sets `path`'s permission bits to `mode` unless they already are (symlinks are not
/// followed: a link's own mode means nothing).
pub fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() || meta.permissions().mode() & 0o7777 == mode {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Makes `root` and every directory under it 0700 and every file 0600 (symlinks are
/// neither followed nor changed).
pub fn restrict_tree(root: &Path) -> io::Result<()> {
    restrict(root, DIR_MODE)?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                restrict(&path, DIR_MODE)?;
                stack.push(path);
            } else if kind.is_file() {
                restrict(&path, FILE_MODE)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn trees_and_new_dirs_become_private() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"x").unwrap();
        fs::write(root.join("g"), b"y").unwrap();
        for p in ["", "a", "a/b"] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in ["a/b/f", "g"] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o644)).unwrap();
        }
        restrict_tree(&root).unwrap();
        for p in ["", "a", "a/b"] {
            assert_eq!(mode(&root.join(p)), DIR_MODE, "{p}");
        }
        for p in ["a/b/f", "g"] {
            assert_eq!(mode(&root.join(p)), FILE_MODE, "{p}");
        }
        create_dir(&root.join("new/deeper")).unwrap();
        assert_eq!(mode(&root.join("new")), DIR_MODE);
        assert_eq!(mode(&root.join("new/deeper")), DIR_MODE);
        fs::set_permissions(root.join("new"), fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&root.join("new")).unwrap();
        assert_eq!(mode(&root.join("new")), DIR_MODE);
    }
}
