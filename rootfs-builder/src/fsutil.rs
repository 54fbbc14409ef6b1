//! File-system helpers that must never reach outside the tree they are given.
//!
//! Everything here works on a directory the builder owns (a build directory or
//! an image). Walks never follow symbolic links and never cross into another
//! mount; a tree is only deleted after every mount below it has been detached,
//! so a `/dev` or `/proc` left mounted by an interrupted debootstrap can never
//! make us delete host files.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Mount points at or below `dir` in this process's mount namespace, deepest
/// first. `dir` should be absolute and canonical.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Detaches (lazily) every mount at or below `dir`, deepest first.
pub fn unmount_all_under(dir: &Path) -> io::Result<()> {
    for m in mounts_under(dir)? {
        let c = CString::new(m.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in mount path"))?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::ENOENT) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("unmount {}: {e}", m.display()),
                ));
            }
        }
    }
    Ok(())
}

/// Deletes a directory tree the builder owns, after detaching any mounts in it.
/// Refuses (rather than deletes) if a mount survives. Missing is fine.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.is_dir() {
        return fs::remove_file(dir);
    }
    let canonical = dir.canonicalize()?;
    unmount_all_under(&canonical)?;
    let left = mounts_under(&canonical)?;
    if !left.is_empty() {
        return Err(io::Error::other(format!(
            "refusing to delete {}: still mounted below it: {}",
            dir.display(),
            left.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    fs::remove_dir_all(dir)
}

/// Shell-style match of one path component: `*` any run, `?` one character;
/// neither matches a leading `.` (like the shell).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Expands an absolute pattern (globs allowed in any component) to existing
/// paths inside `root`. Intermediate components that are symlinks are not
/// followed, so a match always lies physically inside `root`.
pub fn expand_in_root(root: &Path, pattern: &str) -> io::Result<Vec<PathBuf>> {
    let comps: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let mut current = vec![root.to_path_buf()];
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let mut next = Vec::new();
        for dir in &current {
            // Only descend through real directories.
            match fs::symlink_metadata(dir) {
                Ok(m) if m.is_dir() => {}
                _ => continue,
            }
            if comp.contains(['*', '?']) {
                let mut names: Vec<_> = fs::read_dir(dir)?
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .collect();
                names.sort();
                for name in names {
                    if glob_match(comp, &name.to_string_lossy()) {
                        next.push(dir.join(name));
                    }
                }
            } else {
                let p = dir.join(comp);
                if fs::symlink_metadata(&p).is_ok() {
                    next.push(p);
                }
            }
        }
        if !last {
            next.retain(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()));
        }
        current = next;
    }
    Ok(current)
}

/// Removes whatever `pattern` matches inside `root`; returns the bytes freed.
/// A symlink is removed itself, never its target.
pub fn remove_in_root(root: &Path, pattern: &str) -> io::Result<u64> {
    let mut freed = 0;
    for path in expand_in_root(root, pattern)? {
        debug_assert!(path.starts_with(root));
        freed += disk_usage(&path)?;
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            remove_tree(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(freed)
}

/// Visits every entry below `root` (not `root` itself), parents before
/// children, without following symlinks or crossing mounts.
fn walk(root: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata) -> io::Result<()>) -> io::Result<()> {
    let dev = fs::symlink_metadata(root)?.dev();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            f(&path, &meta)?;
            if meta.is_dir() && meta.dev() == dev {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Allocated size of a file or tree in bytes (hard links counted once).
pub fn disk_usage(path: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        let mut seen = HashSet::new();
        walk(path, &mut |_, m| {
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                return Ok(());
            }
            total += m.blocks() * 512;
            Ok(())
        })?;
    }
    Ok(total)
}

/// Sets atime and mtime of every entry below `root` (and `root`) that is newer
/// than `epoch` to `epoch` (the SOURCE_DATE_EPOCH convention). Returns how
/// many entries were changed.
pub fn clamp_mtimes(root: &Path, epoch: i64) -> io::Result<u64> {
    let mut changed = 0;
    let mut clamp = |path: &Path, meta: &fs::Metadata| -> io::Result<()> {
        if meta.mtime() <= epoch {
            return Ok(());
        }
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let t = libc::timespec {
            tv_sec: epoch as libc::time_t,
            tv_nsec: 0,
        };
        let times = [t, t];
        // SAFETY: valid path and a two-element timespec array as utimensat requires.
        let rc = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display())));
        }
        changed += 1;
        Ok(())
    };
    walk(root, &mut clamp)?;
    clamp(root, &fs::symlink_metadata(root)?)?;
    Ok(changed)
}

/// Flushes the file system holding `path` to disk.
pub fn sync_fs(path: &Path) -> io::Result<()> {
    let f = fs::File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: f is an open descriptor for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Atomically swaps two directory entries (`renameat2(RENAME_EXCHANGE)`).
pub fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let ca = CString::new(a.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let cb = CString::new(b.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Joins an absolute in-image path (`/etc/x`) onto `root`.
pub fn in_root(root: &Path, image_path: &str) -> PathBuf {
    let rel: PathBuf = Path::new(image_path)
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    root.join(rel)
}

pub fn is_root_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn glob_matching() {
        assert!(glob_match("*", "lists"));
        assert!(!glob_match("*", ".hidden"));
        assert!(glob_match(".*", ".hidden"));
        assert!(glob_match("*.deb", "libc6_2.36_amd64.deb"));
        assert!(!glob_match("*.deb", "libc6.deb.partial"));
        assert!(glob_match("*-old", "status-old"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("exact", "exact"));
    }

    #[test]
    fn removal_stays_inside_root_and_does_not_follow_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();

        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("var/lib/apt/lists/partial")).unwrap();
        fs::write(root.join("var/lib/apt/lists/x_Packages"), "data").unwrap();
        fs::write(root.join("var/lib/apt/lists/.keep"), "").unwrap();
        fs::create_dir_all(root.join("var/cache")).unwrap();
        // var/cache/apt -> ../../outside: a pattern through it must not reach outside.
        symlink(&outside, root.join("var/cache/apt")).unwrap();

        remove_in_root(&root, "/var/lib/apt/lists/*").unwrap();
        remove_in_root(&root, "/var/cache/apt/*").unwrap();
        remove_in_root(&root, "/does/not/exist/*").unwrap();

        assert!(!root.join("var/lib/apt/lists/x_Packages").exists());
        assert!(!root.join("var/lib/apt/lists/partial").exists());
        assert!(root.join("var/lib/apt/lists/.keep").exists());
        assert!(outside.join("precious").exists());

        // Removing the symlink itself removes the link, not the target.
        remove_in_root(&root, "/var/cache/apt").unwrap();
        assert!(fs::symlink_metadata(root.join("var/cache/apt")).is_err());
        assert!(outside.join("precious").exists());
    }

    #[test]
    fn clamps_only_newer_entries() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("d/f"), "x").unwrap();
        symlink("/nonexistent", tmp.path().join("d/link")).unwrap();
        let changed = clamp_mtimes(tmp.path(), 1_000_000).unwrap();
        assert_eq!(changed, 4);
        for p in ["", "d", "d/f", "d/link"] {
            let m = fs::symlink_metadata(tmp.path().join(p)).unwrap();
            assert_eq!(m.mtime(), 1_000_000, "{p}");
        }
        assert_eq!(clamp_mtimes(tmp.path(), 2_000_000).unwrap(), 0);
    }

    #[test]
    fn disk_usage_counts_hard_links_once() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), vec![1u8; 64 * 1024]).unwrap();
        let one = disk_usage(tmp.path()).unwrap();
        fs::hard_link(tmp.path().join("a"), tmp.path().join("b")).unwrap();
        assert_eq!(disk_usage(tmp.path()).unwrap(), one);
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }

    #[test]
    fn remove_tree_handles_missing_and_files() {
        let tmp = tempfile::tempdir().unwrap();
        remove_tree(&tmp.path().join("missing")).unwrap();
        fs::create_dir_all(tmp.path().join("t/a/b")).unwrap();
        fs::write(tmp.path().join("t/a/b/f"), "x").unwrap();
        remove_tree(&tmp.path().join("t")).unwrap();
        assert!(!tmp.path().join("t").exists());
    }

    #[test]
    fn in_root_joins_absolute_paths() {
        assert_eq!(
            in_root(Path::new("/r"), "/etc/x"),
            PathBuf::from("/r/etc/x")
        );
    }
}
