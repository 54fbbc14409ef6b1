//! The sandbox's filesystem view, built inside its own mount namespace.
//!
//! Order (each step's "why" next to it in [`enter_root`]):
//! 1. make every mount private, so nothing propagates back to the host;
//! 2. an overlay of the read-only image with a small tmpfs upper layer, so mount points
//!    can be created without ever writing to the image;
//! 3. fresh `/proc` (masked and read-only paths), read-only `/sys`, a minimal `/dev`,
//!    size-capped tmpfs `/tmp` and work directory, read-only binds;
//! 4. `pivot_root` and detach the old root;
//! 5. remount `/` and `/dev` read-only.
//!
//! All of it lives and dies with the mount namespace: nothing is mounted on the host.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::unistd;

use crate::container::{step, StepError};
use crate::spec::{Bind, SandboxSpec};

/// An empty directory on the host that each sandbox mounts its private staging tmpfs on
/// (inside its own mount namespace only). Created by the supervisor.
pub const STAGING_DIR: &str = "/run/hatchery/stage";

/// Device nodes bound from the host into the sandbox's `/dev`.
pub const DEVICES: [&str; 5] = ["null", "zero", "full", "random", "urandom"];

/// `/proc` files hidden behind `/dev/null` (kernel memory, keys, timing side channels:
/// interrupt counts and timer statistics reveal other tenants' activity), as runc and
/// Kubernetes mask them.
pub const MASKED_FILES: [&str; 8] = [
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/latency_stats",
    "/proc/kmsg",
    "/proc/interrupts",
];

/// Directories hidden behind an empty read-only tmpfs (firmware tables, and powercap's
/// energy counters: a power side channel, CVE-2020-8694).
pub const MASKED_DIRS: [&str; 5] = [
    "/proc/acpi",
    "/proc/scsi",
    "/sys/firmware",
    "/proc/asound",
    "/sys/devices/virtual/powercap",
];

/// `/proc` entries that stay visible but read-only (`sysrq-trigger` read-only rather than
/// masked, so a write fails loudly instead of vanishing into `/dev/null`).
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// What a root filesystem is built from.
pub(crate) struct RootPlan<'a> {
    /// The read-only lower layer: the image on the host (`sandbox run`), or `/` — the
    /// zygote's own root — for a pooled sandbox, which so gets an overlay (a superblock)
    /// of its own: file locks and inotify watches on image files are never shared with
    /// another sandbox.
    pub lower: &'a Path,
    /// An existing empty directory to mount the private staging tmpfs on.
    pub stage: &'a Path,
    pub binds: &'a [Bind],
    /// Inside a user namespace overlayfs cannot use trusted.* xattrs on the upper layer.
    pub userxattr: bool,
    pub tmp_size: u64,
    pub work_size: u64,
    /// Owner of the work directory.
    pub uid: u32,
    pub gid: u32,
}

impl<'a> RootPlan<'a> {
    /// The plan of `sandbox run`: the image of `spec`, staged in [`STAGING_DIR`].
    pub fn of_spec(spec: &'a SandboxSpec) -> RootPlan<'a> {
        RootPlan {
            lower: &spec.rootfs,
            stage: Path::new(STAGING_DIR),
            binds: &spec.binds,
            userxattr: spec.userns_base.is_some(),
            tmp_size: spec.tmp_size,
            work_size: spec.work_size,
            uid: spec.uid,
            gid: spec.gid,
        }
    }
}

/// tmpfs options for a size-capped tmpfs: the size and a matching inode cap (one inode per
/// 4 KiB of size, at least 1024), so neither bytes nor inodes are unbounded.
pub(crate) fn tmpfs_options(size: u64, rest: &str) -> String {
    let size = size.max(4096);
    let inodes = (size / 4096).max(1024);
    format!("size={size},nr_inodes={inodes},{rest}")
}

/// Builds the root filesystem for `spec` and pivots into it.
pub(crate) fn enter_root(spec: &SandboxSpec) -> Result<(), StepError> {
    enter(&RootPlan::of_spec(spec))
}

/// Builds a root filesystem as `plan` says and pivots into it (see the module docs).
pub(crate) fn enter(plan: &RootPlan<'_>) -> Result<(), StepError> {
    // 1. Private propagation: our mounts never reach the host, the host's never reach us.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make mounts private"))?;

    // 2. Staging tmpfs (holds the overlay's upper layer), then the overlay root.
    let stage = plan.stage;
    mount(
        Some("tmpfs"),
        stage,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmpfs_options(4 << 20, "mode=0755").as_str()),
    )
    .map_err(step("mount staging tmpfs"))?;
    for d in ["upper", "work", "root", "lower"] {
        mkdir(&stage.join(d), 0o755).map_err(step("create staging directories"))?;
    }
    let root = stage.join("root");
    // Mount points are created in the upper layer *before* the overlay exists: the image's
    // directories belong to the host's root, which a user namespace cannot write to, and
    // the image itself must never be written. Paths are resolved through the image's
    // symlinks (Debian's /bin -> usr/bin) and mounted on the resolved path, so no mount
    // can follow a symlink out of the new root.
    let upper = stage.join("upper");
    let mut bind_targets = Vec::with_capacity(plan.binds.len());
    for d in ["/proc", "/sys", "/dev", "/tmp", "/work"] {
        ensure_mount_point(plan.lower, &upper, Path::new(d), true)
            .map_err(step("create mount points"))?;
    }
    for bind in plan.binds {
        let is_dir = fs::metadata(&bind.source)
            .map_err(step("inspect a bind source"))?
            .is_dir();
        let resolved = ensure_mount_point(plan.lower, &upper, &bind.target, is_dir)
            .map_err(step("create a bind mount point"))?;
        bind_targets.push(resolved);
    }
    // The layers are named relative to the staging directory (the image through a bind
    // at `lower`), so the overlay's options in /proc/self/mountinfo name no host path.
    mount(
        Some(plan.lower),
        &stage.join("lower"),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step("bind the image"))?;
    unistd::chdir(stage).map_err(step("enter the staging directory"))?;
    let mut opts = "lowerdir=lower,upperdir=upper,workdir=work".to_string();
    if plan.userxattr {
        opts.push_str(",userxattr");
    }
    mount(
        Some("overlay"),
        "root",
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(step("mount the root overlay"))?;

    // 3. Pseudo filesystems and scratch space.
    mount(
        Some("proc"),
        &root.join("proc"),
        Some("proc"),
        NOSUID_NODEV_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mount /proc"))?;
    mount(
        Some("sysfs"),
        &root.join("sys"),
        Some("sysfs"),
        NOSUID_NODEV_NOEXEC | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(step("mount /sys"))?;
    setup_dev(&root, plan.tmp_size)?;
    mount(
        Some("tmpfs"),
        &root.join("tmp"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(tmpfs_options(plan.tmp_size, "mode=1777").as_str()),
    )
    .map_err(step("mount /tmp"))?;
    mount(
        Some("tmpfs"),
        &root.join("work"),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(
            tmpfs_options(
                plan.work_size,
                &format!("mode=0755,uid={},gid={}", plan.uid, plan.gid),
            )
            .as_str(),
        ),
    )
    .map_err(step("mount the work directory"))?;
    for (bind, target) in plan.binds.iter().zip(&bind_targets) {
        bind_readonly(&bind.source, &root.join(target)).map_err(step("bind-mount a host path"))?;
    }
    mask_paths(&root)?;

    // 4. pivot_root(".", ".") stacks the old root under the new one; detaching it leaves
    // nothing of the host reachable (runc's trick: no directory for the old root needed).
    unistd::chdir(&root).map_err(step("enter the new root"))?;
    unistd::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root"))?;
    unistd::chdir("/").map_err(step("chdir to /"))?;

    // 5. Read-only root; the overlay's upper layer is never writable by the command.
    remount_readonly(Path::new("/"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
        .map_err(step("remount / read-only"))?;
    remount_readonly(Path::new("/dev"), MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)
        .map_err(step("remount /dev read-only"))?;
    Ok(())
}

/// A minimal `/dev`: the five harmless character devices, bound from the host (mknod is
/// impossible in a user namespace, binding works in both modes), the usual symlinks, and a
/// size-capped `/dev/shm`.
fn setup_dev(root: &Path, shm_size: u64) -> Result<(), StepError> {
    let dev = root.join("dev");
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,nr_inodes=64,mode=0755"),
    )
    .map_err(step("mount /dev"))?;
    for name in DEVICES {
        let target = dev.join(name);
        fs::File::create(&target).map_err(step("create device mount point"))?;
        mount(
            Some(Path::new("/dev").join(name).as_path()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step("bind a device"))?;
    }
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(to, dev.join(link)).map_err(step("create /dev symlinks"))?;
    }
    mkdir(&dev.join("shm"), 0o1777).map_err(step("create /dev/shm"))?;
    mount(
        Some("tmpfs"),
        &dev.join("shm"),
        Some("tmpfs"),
        NOSUID_NODEV_NOEXEC,
        Some(tmpfs_options(shm_size, "mode=1777").as_str()),
    )
    .map_err(step("mount /dev/shm"))?;
    Ok(())
}

pub(crate) fn mask_paths(root: &Path) -> Result<(), StepError> {
    let null = root.join("dev/null");
    for file in MASKED_FILES {
        let target = inside(root, Path::new(file));
        if target.exists() {
            mount(
                Some(null.as_path()),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(step("mask a /proc file"))?;
        }
    }
    for dir in MASKED_DIRS {
        let target = inside(root, Path::new(dir));
        if target.is_dir() {
            mount(
                Some("tmpfs"),
                &target,
                Some("tmpfs"),
                NOSUID_NODEV_NOEXEC | MsFlags::MS_RDONLY,
                Some("size=0,nr_inodes=1,mode=0555"),
            )
            .map_err(step("mask a directory"))?;
        }
    }
    for path in READONLY_PATHS {
        let target = inside(root, Path::new(path));
        if target.exists() {
            bind_readonly(&target, &target).map_err(step("make a /proc path read-only"))?;
        }
    }
    Ok(())
}

/// Binds `source` at `target` (an existing mount point), then remounts the bind
/// read-only, nosuid, nodev.
fn bind_readonly(source: &Path, target: &Path) -> std::io::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    remount_readonly(target, MsFlags::MS_NOSUID | MsFlags::MS_NODEV)?;
    Ok(())
}

fn remount_readonly(target: &Path, extra: MsFlags) -> nix::Result<()> {
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | extra,
        None::<&str>,
    )
}

/// `path` (absolute, as the sandbox sees it) under `root`, with `..` components refused by
/// construction: only normal components are kept.
fn inside(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for c in path.components() {
        if let std::path::Component::Normal(part) = c {
            out.push(part);
        }
    }
    out
}

/// Resolves `path` (absolute, as the sandbox will see it) inside the image `rootfs` as the
/// kernel would after `pivot_root`: symlinks are followed relative to the image's root,
/// `..` never climbs above it. Returns the resolved path relative to the root, free of
/// symlinks for every component that exists in the image.
pub fn resolve_in_root(rootfs: &Path, path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut resolved = PathBuf::new();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        match fs::symlink_metadata(rootfs.join(&candidate)) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(std::io::Error::from_raw_os_error(libc::ELOOP));
                }
                let link = fs::read_link(rootfs.join(&candidate))?;
                if link.is_absolute() {
                    resolved = PathBuf::new();
                }
                for c in link.components().rev() {
                    match c {
                        Component::Normal(p) => pending.push(p.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = candidate,
        }
    }
    Ok(resolved)
}

/// Makes sure `target` exists in the merged view of `rootfs` + `upper`, creating what is
/// missing (parents as directories, the last component as a directory or an empty file)
/// in `upper`. Returns the resolved path relative to the root.
fn ensure_mount_point(
    rootfs: &Path,
    upper: &Path,
    target: &Path,
    dir: bool,
) -> std::io::Result<PathBuf> {
    let resolved = resolve_in_root(rootfs, target)?;
    if resolved.as_os_str().is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("cannot mount over the root ({})", target.display()),
        ));
    }
    if crate::container::exists(&rootfs.join(&resolved)) {
        return Ok(resolved);
    }
    let in_upper = upper.join(&resolved);
    if let Some(parent) = in_upper.parent() {
        mkdir_all(parent)?;
    }
    if dir {
        mkdir_all(&in_upper)?;
    } else if !crate::container::exists(&in_upper) {
        fs::File::create(&in_upper)?;
    }
    Ok(resolved)
}

fn mkdir(path: &Path, mode: u32) -> std::io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    // The umask may have cleared bits (sticky /dev/shm).
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn mkdir_all(path: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
}

/// Checks that a root filesystem path can be used as an overlay lower layer.
pub fn check_rootfs(rootfs: &Path) -> Result<(), String> {
    let s = rootfs.to_string_lossy();
    if s.contains([',', ':', '\n']) {
        return Err(format!(
            "root filesystem path {s:?} contains ',' or ':', which overlayfs cannot take"
        ));
    }
    if !rootfs.join("bin").exists() && !rootfs.join("usr/bin").exists() {
        return Err(format!(
            "{s} does not look like a root filesystem (no bin/ or usr/bin/)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_follows_image_symlinks_and_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        std::os::unix::fs::symlink("/usr", r.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../etc", r.join("usr/up")).unwrap();
        let res = |p: &str| resolve_in_root(r, Path::new(p)).unwrap();
        assert_eq!(res("/bin/probe"), PathBuf::from("usr/bin/probe"));
        assert_eq!(res("/abs/bin/x"), PathBuf::from("usr/bin/x"));
        assert_eq!(res("/usr/up/passwd"), PathBuf::from("etc/passwd"));
        assert_eq!(res("/../../tmp"), PathBuf::from("tmp"));
        std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
        assert!(resolve_in_root(r, Path::new("/loop/x")).is_err());
    }

    #[test]
    fn mount_points_are_created_in_the_upper_layer_only() {
        let lower = tempfile::tempdir().unwrap();
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(lower.path().join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", lower.path().join("bin")).unwrap();
        let p =
            ensure_mount_point(lower.path(), upper.path(), Path::new("/bin/probe"), false).unwrap();
        assert_eq!(p, PathBuf::from("usr/bin/probe"));
        assert!(upper.path().join("usr/bin/probe").is_file());
        assert!(!lower.path().join("usr/bin/probe").exists());
        let p = ensure_mount_point(lower.path(), upper.path(), Path::new("/usr"), true).unwrap();
        assert_eq!(p, PathBuf::from("usr"));
        assert!(ensure_mount_point(lower.path(), upper.path(), Path::new("/"), true).is_err());
    }

    #[test]
    fn inside_drops_parent_components() {
        let r = Path::new("/stage/root");
        assert_eq!(
            inside(r, Path::new("/usr/../../etc")),
            PathBuf::from("/stage/root/usr/etc")
        );
        assert_eq!(
            inside(r, Path::new("/a/b")),
            PathBuf::from("/stage/root/a/b")
        );
    }
}
