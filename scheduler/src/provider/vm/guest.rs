//! Running one command in a fresh VM and getting its result back: the composition of
//! [`Kernel`], [`ModuleIndex`], [`write_initramfs`], [`Vm::boot`] and [`ConsoleScanner`].
//!
//! Each run gets its own temporary directory (the extracted `vmlinux`, the initramfs and,
//! unless the caller keeps it elsewhere, the console log), removed when the run returns,
//! whether the guest succeeded, failed, timed out or was cancelled.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::initramfs::{
    write_initramfs, GuestCommand, GuestMount, InitramfsError, InitramfsSpec, DEFAULT_BUSYBOX,
    GUEST_BUSYBOX,
};
use super::kernel::{Kernel, KernelError, MODULES_ROOT};
use super::modules::{ModuleIndex, ModulesError, GUEST_MODULES, NET_MODULES};
use super::qemu::{Accel, AccelChoice, Share, Vm, VmError, VmSpec, POLL_INTERVAL};
use super::serial::{ConsoleItem, ConsoleScanner, GuestEvent, Markers};

/// The 9p tag of the host's root filesystem.
pub const ROOT_TAG: &str = "hostroot";

/// How long qemu may take to power off after the command's exit was reported.
const POWEROFF_GRACE: Duration = Duration::from_secs(10);

/// Errors that keep a guest run from producing an outcome.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Modules(#[from] ModulesError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot create a temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("cannot prepare the console log {path}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the console: {0}")]
    Console(std::io::Error),
    #[error("cancelled")]
    Cancelled,
}

/// An extra host directory for the guest, besides the host root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    pub host_path: PathBuf,
    pub guest_path: PathBuf,
    pub readonly: bool,
}

/// How to run a guest.
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// A `bzImage`; `None` picks the newest `/boot/vmlinuz-*` with modules.
    pub kernel: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The whole VM's time limit, boot included.
    pub timeout: Duration,
    pub accel: AccelChoice,
    /// Keep the console log here; `None` keeps it only for the run.
    pub serial_log: Option<PathBuf>,
    pub kernel_cmdline_extra: Vec<String>,
    pub shares: Vec<GuestShare>,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// Boot a host-decompressed `vmlinux` (seconds faster under TCG) when possible.
    pub extract_vmlinux: bool,
    /// Kernel console log level while the command runs (4: errors and worse).
    pub console_loglevel: u8,
    /// A network: the guest reaches the host's loopback services at
    /// [`USER_NET_HOST`](super::qemu::USER_NET_HOST) (qemu's user-mode network).
    pub network: bool,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            kernel: None,
            memory_mib: 1024,
            cpus: 2,
            timeout: Duration::from_secs(600),
            accel: AccelChoice::Auto,
            serial_log: None,
            kernel_cmdline_extra: Vec::new(),
            shares: Vec::new(),
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
            extract_vmlinux: true,
            console_loglevel: 4,
            network: false,
        }
    }
}

/// Which kernel file qemu booted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootImage {
    /// The payload decompressed on the host, booted through PVH.
    Vmlinux,
    /// The `bzImage` itself (it decompresses itself in the guest), and why.
    BzImage { reason: String },
}

/// How the guest's command ended.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestExit {
    /// The command exited with this status (128 + n for signal n).
    Exited(i32),
    /// `/init` could not set up the guest (a module, a mount).
    SetupFailed(String),
    /// The kernel panicked before the command reported.
    KernelPanic(String),
    /// The time limit passed; qemu was killed.
    TimedOut,
    /// qemu ended without a result and without a panic message.
    NoResult { qemu: String },
}

/// Progress reported while a guest runs.
#[derive(Debug)]
pub enum GuestProgress<'a> {
    /// The kernel, modules and initramfs are ready; qemu starts next.
    Prepared {
        kernel: &'a Kernel,
        image: &'a BootImage,
        modules: &'a [String],
    },
    /// qemu runs.
    Booted {
        accel: Accel,
        why_not_kvm: Option<&'a str>,
    },
    /// A console line outside the command.
    Console(&'a str),
    /// A line of the command's output (without newline).
    Output(&'a [u8]),
    /// A marker from the guest's init.
    Event(&'a GuestEvent),
}

/// What a guest run produced.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    pub exit: GuestExit,
    pub accel: Accel,
    pub why_not_kvm: Option<String>,
    pub kernel: Kernel,
    pub image: BootImage,
    /// Modules loaded, in order.
    pub modules: Vec<String>,
    /// `overlay` or `readonly`.
    pub root: Option<String>,
    /// From qemu's start to `/init` running, as seen by the host.
    pub boot_to_init: Option<Duration>,
    /// The guest kernel's uptime when `/init` started.
    pub guest_uptime_at_init: Option<f64>,
    /// From qemu's start to its end.
    pub vm_time: Duration,
    /// The whole run, preparation included.
    pub total: Duration,
    /// The command's output (stdout and stderr interleaved, as on the console).
    pub output: Vec<u8>,
    /// The last lines of the console.
    pub log_tail: String,
    /// Where the console log was kept, if it was.
    pub serial_log: Option<PathBuf>,
}

impl GuestOutcome {
    /// The command's exit status, if it got that far.
    pub fn exit_code(&self) -> Option<i32> {
        match self.exit {
            GuestExit::Exited(code) => Some(code),
            _ => None,
        }
    }

    /// A one-line account of a failure (`None` for exit status 0).
    pub fn failure(&self) -> Option<String> {
        match &self.exit {
            GuestExit::Exited(0) => None,
            GuestExit::Exited(code) => Some(format!(
                "the command exited with status {code} in the guest"
            )),
            GuestExit::SetupFailed(why) => Some(format!("the guest could not be set up: {why}")),
            GuestExit::KernelPanic(line) => Some(format!("the guest kernel panicked: {line}")),
            GuestExit::TimedOut => Some(format!(
                "the vm was killed after {:.1} s, its time limit",
                self.vm_time.as_secs_f64()
            )),
            GuestExit::NoResult { qemu } => Some(format!("the vm ended without a result ({qemu})")),
        }
    }
}

/// Boots a VM, runs `command` in it and reports how it went. `cancel` kills the VM
/// promptly (the run then returns [`GuestError::Cancelled`]).
pub fn run_in_guest(
    command: &GuestCommand,
    options: &GuestOptions,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(GuestProgress<'_>),
) -> Result<GuestOutcome, GuestError> {
    let t0 = Instant::now();
    let kernel = match &options.kernel {
        Some(path) => Kernel::from_image(path, Path::new(MODULES_ROOT))?,
        None => Kernel::discover()?,
    };
    let modules = match &kernel.modules_dir {
        Some(dir) => {
            let mut wanted = GUEST_MODULES.to_vec();
            if options.network {
                wanted.extend_from_slice(NET_MODULES);
            }
            ModuleIndex::load(dir)?.resolve(&wanted)?
        }
        None => Vec::new(),
    };
    let module_names: Vec<String> = modules.iter().map(|m| m.name.clone()).collect();

    let (work, _owner) = create_run_dir(&std::env::temp_dir())?;
    let vmlinux = work.path().join("vmlinux");
    let (image, boot_path) = if options.extract_vmlinux {
        match kernel.extract_vmlinux(&vmlinux) {
            Ok(()) => (BootImage::Vmlinux, vmlinux),
            Err(e) => (
                BootImage::BzImage {
                    reason: e.to_string(),
                },
                kernel.image.clone(),
            ),
        }
    } else {
        let reason = "extraction disabled".to_owned();
        (BootImage::BzImage { reason }, kernel.image.clone())
    };

    let markers = Markers::random();
    let mounts: Vec<GuestMount> = options
        .shares
        .iter()
        .enumerate()
        .map(|(i, s)| GuestMount {
            tag: format!("share{i}"),
            guest_path: s.guest_path.clone(),
            readonly: s.readonly,
        })
        .collect();
    let initramfs = work.path().join("initramfs.cpio");
    write_initramfs(
        &InitramfsSpec {
            busybox: &options.busybox,
            modules_dir: kernel.modules_dir.as_deref(),
            modules: &modules,
            root_tag: ROOT_TAG,
            mounts: &mounts,
            command,
            markers: &markers,
            console_loglevel: options.console_loglevel,
            network: options.network,
        },
        &initramfs,
    )?;

    let serial_log = match &options.serial_log {
        Some(path) => {
            let path = &std::path::absolute(path).map_err(|source| GuestError::Log {
                path: path.clone(),
                source,
            })?;
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|source| GuestError::Log {
                    path: path.clone(),
                    source,
                })?;
            }
            path.clone()
        }
        None => work.path().join("console.log"),
    };
    let mut spec = VmSpec::new(boot_path, initramfs, serial_log.clone());
    spec.memory_mib = options.memory_mib;
    spec.cpus = options.cpus;
    spec.timeout = options.timeout;
    spec.accel = options.accel;
    spec.kernel_cmdline_extra = options.kernel_cmdline_extra.clone();
    spec.user_net = options.network;
    spec.shares.push(Share {
        host_path: PathBuf::from("/"),
        tag: ROOT_TAG.to_owned(),
        readonly: true,
    });
    for (share, mount) in options.shares.iter().zip(&mounts) {
        spec.shares.push(Share {
            host_path: share.host_path.clone(),
            tag: mount.tag.clone(),
            readonly: share.readonly,
        });
    }

    progress(GuestProgress::Prepared {
        kernel: &kernel,
        image: &image,
        modules: &module_names,
    });
    if cancel.load(Ordering::SeqCst) {
        return Err(GuestError::Cancelled);
    }
    let mut vm = Vm::boot(spec)?;
    progress(GuestProgress::Booted {
        accel: vm.accel(),
        why_not_kvm: vm.why_not_kvm(),
    });

    let started = vm.started();
    let mut scanner = ConsoleScanner::new(&markers);
    let mut seen = Seen::default();
    let mut deadline = started + options.timeout;
    let mut timed_out = false;
    loop {
        let exited = vm.try_wait()?.is_some();
        let bytes = vm.read_serial().map_err(GuestError::Console)?;
        scanner.feed(&bytes, &mut |item| seen.take(item, started, progress));
        if exited {
            break;
        }
        if cancel.load(Ordering::SeqCst) {
            vm.kill()?;
            return Err(GuestError::Cancelled);
        }
        if seen.exit.is_some() || seen.error.is_some() {
            deadline = deadline.min(Instant::now() + POWEROFF_GRACE);
        }
        if Instant::now() >= deadline {
            timed_out = seen.exit.is_none() && seen.error.is_none();
            vm.kill()?;
            let bytes = vm.read_serial().map_err(GuestError::Console)?;
            scanner.feed(&bytes, &mut |item| seen.take(item, started, progress));
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    scanner.finish(&mut |item| seen.take(item, started, progress));
    let vm_time = started.elapsed();
    let qemu_status = vm.try_wait()?.map(|s| s.to_string()).unwrap_or_default();
    let qemu_stderr = vm.qemu_stderr();
    let accel = vm.accel();
    let why_not_kvm = vm.why_not_kvm().map(str::to_owned);
    drop(vm);

    let exit = if let Some(code) = seen.exit {
        GuestExit::Exited(code)
    } else if let Some(why) = seen.error.take() {
        GuestExit::SetupFailed(why)
    } else if let Some(line) = scanner.panic_line() {
        GuestExit::KernelPanic(line.to_owned())
    } else if timed_out {
        GuestExit::TimedOut
    } else {
        let last = qemu_stderr.lines().rev().find(|l| !l.trim().is_empty());
        let qemu = match last {
            Some(line) => format!("qemu {qemu_status}: {}", line.trim()),
            None => format!("qemu {qemu_status}"),
        };
        GuestExit::NoResult { qemu }
    };
    Ok(GuestOutcome {
        exit,
        accel,
        why_not_kvm,
        kernel,
        image,
        modules: module_names,
        root: seen.root,
        boot_to_init: seen.init_at,
        guest_uptime_at_init: seen.init_uptime,
        vm_time,
        total: t0.elapsed(),
        output: seen.output,
        log_tail: scanner.tail(),
        serial_log: options.serial_log.is_some().then_some(serial_log),
    })
}

/// Prefix of the per-run directories in the temporary directory.
const RUN_DIR_PREFIX: &str = "hatchery-vm-";
/// The file a live run holds an exclusive `flock` on.
const OWNER_LOCK: &str = "owner.lock";
/// A run directory without a lock file older than this is debris.
const UNLOCKED_GRACE: Duration = Duration::from_secs(300);

/// Creates this run's directory under `tmp` and locks it, after removing directories
/// left by runs that were killed outright (SIGKILL leaves no chance to clean up; qemu
/// itself dies with its owner through `PR_SET_PDEATHSIG`).
fn create_run_dir(
    tmp: &Path,
) -> Result<(tempfile::TempDir, nix::fcntl::Flock<std::fs::File>), GuestError> {
    remove_stale_run_dirs(tmp);
    let dir = tempfile::Builder::new()
        .prefix(RUN_DIR_PREFIX)
        .tempdir_in(tmp)
        .map_err(GuestError::TempDir)?;
    let file = std::fs::File::create(dir.path().join(OWNER_LOCK)).map_err(GuestError::TempDir)?;
    let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| GuestError::TempDir(errno.into()))?;
    Ok((dir, lock))
}

/// Removes run directories under `tmp` whose owner is gone (best effort).
pub fn remove_stale_run_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let is_run_dir = entry
            .file_name()
            .to_string_lossy()
            .starts_with(RUN_DIR_PREFIX)
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_run_dir {
            continue;
        }
        let dir = entry.path();
        let stale = match std::fs::File::open(dir.join(OWNER_LOCK)) {
            // The owner holds the lock for its whole life; if we get it, the owner is gone.
            Ok(file) => {
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_ok()
            }
            // Between creating the directory and its lock file: only old ones are debris.
            Err(_) => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNLOCKED_GRACE),
        };
        if stale {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// What the console has told so far.
#[derive(Default)]
struct Seen {
    exit: Option<i32>,
    error: Option<String>,
    root: Option<String>,
    init_at: Option<Duration>,
    init_uptime: Option<f64>,
    output: Vec<u8>,
}

impl Seen {
    fn take(
        &mut self,
        item: ConsoleItem<'_>,
        started: Instant,
        progress: &mut dyn FnMut(GuestProgress<'_>),
    ) {
        match item {
            ConsoleItem::Console(line) => progress(GuestProgress::Console(line)),
            ConsoleItem::Output(line) => {
                self.output.extend_from_slice(line);
                self.output.push(b'\n');
                progress(GuestProgress::Output(line));
            }
            ConsoleItem::Event(event) => {
                match &event {
                    GuestEvent::Init { uptime } => {
                        self.init_at = Some(started.elapsed());
                        self.init_uptime = *uptime;
                    }
                    GuestEvent::Ready { root, .. } => self.root = Some(root.clone()),
                    GuestEvent::Exit(code) => self.exit = Some(*code),
                    GuestEvent::SetupError(why) => self.error = Some(why.clone()),
                    GuestEvent::Begin => {}
                }
                progress(GuestProgress::Event(&event));
            }
        }
    }
}

/// The controllers a Hatchery host must have on its unified hierarchy.
pub const REQUIRED_CONTROLLERS: &[&str] = &["cpu", "memory", "pids", "io"];

/// The guest-side probe of `hatchery-vm check`, run by the guest's busybox so that it does
/// not depend on the host's tools. Its output is parsed by [`CgroupCheck::parse`].
pub const CGROUP_CHECK_SCRIPT: &str = r#"
cg=/sys/fs/cgroup
echo "controllers: $(cat $cg/cgroup.controllers)"
for c in cpu memory pids io; do
    echo "+$c" > $cg/cgroup.subtree_control || echo "enable-failed: $c"
done
echo "subtree_control: $(cat $cg/cgroup.subtree_control)"
if mkdir $cg/hatchery-check; then
    for f in cgroup.freeze cgroup.kill cgroup.events cpu.max memory.max memory.swap.max pids.max io.max; do
        [ -e $cg/hatchery-check/$f ] && echo "file: $f"
    done
    rmdir $cg/hatchery-check
fi
while read -r dev mnt fstype rest; do
    case "$fstype" in cgroup|cgroup2) echo "mount: $fstype $mnt" ;; esac
done < /proc/mounts
"#;

/// The files a v2 sandbox cgroup must offer (see ARCHITECTURE.md).
pub const REQUIRED_FILES: &[&str] = &[
    "cgroup.freeze",
    "cgroup.kill",
    "cgroup.events",
    "cpu.max",
    "memory.max",
    "memory.swap.max",
    "pids.max",
];

/// What the guest reported about its cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupCheck {
    pub controllers: Vec<String>,
    pub subtree_control: Vec<String>,
    pub enable_failed: Vec<String>,
    /// Interface files present in a fresh child cgroup.
    pub files: Vec<String>,
    /// `(fstype, mountpoint)` of every cgroup mount.
    pub mounts: Vec<(String, String)>,
}

impl CgroupCheck {
    /// Parses the output of [`CGROUP_CHECK_SCRIPT`].
    pub fn parse(output: &str) -> Self {
        let mut check = Self::default();
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        for line in output.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim() {
                "controllers" => check.controllers = words(value),
                "subtree_control" => check.subtree_control = words(value),
                "enable-failed" => check.enable_failed.extend(words(value)),
                "file" => check.files.extend(words(value)),
                "mount" => {
                    if let Some((fstype, mnt)) = value.trim().split_once(' ') {
                        check
                            .mounts
                            .push((fstype.to_owned(), mnt.trim().to_owned()));
                    }
                }
                _ => {}
            }
        }
        check
    }

    /// What keeps this from being a pure cgroup v2 host Hatchery can use (empty: none).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self
            .mounts
            .iter()
            .any(|(fstype, mnt)| fstype == "cgroup2" && mnt == "/sys/fs/cgroup")
        {
            problems.push("cgroup2 is not mounted at /sys/fs/cgroup".to_owned());
        }
        for (fstype, mnt) in &self.mounts {
            if fstype == "cgroup" {
                problems.push(format!("a cgroup v1 hierarchy is mounted at {mnt}"));
            }
        }
        for c in REQUIRED_CONTROLLERS {
            if !self.controllers.iter().any(|x| x == c) {
                problems.push(format!("controller {c} is not in cgroup.controllers"));
            } else if !self.subtree_control.iter().any(|x| x == c) {
                problems.push(format!(
                    "controller {c} cannot be enabled in cgroup.subtree_control"
                ));
            }
        }
        for f in REQUIRED_FILES {
            if !self.files.iter().any(|x| x == f) {
                problems.push(format!("a child cgroup has no {f}"));
            }
        }
        problems
    }
}

/// The command `hatchery-vm check` runs in the guest.
pub fn cgroup_check_command() -> GuestCommand {
    GuestCommand {
        argv: vec![
            GUEST_BUSYBOX.to_owned(),
            "sh".to_owned(),
            "-c".to_owned(),
            CGROUP_CHECK_SCRIPT.to_owned(),
        ],
        cwd: PathBuf::from("/"),
        env: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "controllers: cpuset cpu io memory hugetlb pids rdma misc
subtree_control: cpu io memory pids
file: cgroup.freeze
file: cgroup.kill
file: cgroup.events
file: cpu.max
file: memory.max
file: memory.swap.max
file: pids.max
file: io.max
mount: cgroup2 /sys/fs/cgroup
";

    #[test]
    fn a_pure_v2_guest_passes() {
        let check = CgroupCheck::parse(GOOD);
        assert_eq!(check.subtree_control, ["cpu", "io", "memory", "pids"]);
        assert_eq!(
            check.mounts,
            [("cgroup2".to_owned(), "/sys/fs/cgroup".to_owned())]
        );
        assert_eq!(check.problems(), Vec::<String>::new());
    }

    #[test]
    fn a_hybrid_host_fails_with_reasons() {
        let hybrid = "controllers: \nsubtree_control: \nenable-failed: cpu\n\
mount: cgroup /sys/fs/cgroup/memory\nmount: cgroup2 /sys/fs/cgroup/unified\n";
        let problems = CgroupCheck::parse(hybrid).problems();
        assert!(problems.contains(&"cgroup2 is not mounted at /sys/fs/cgroup".to_owned()));
        assert!(problems
            .contains(&"a cgroup v1 hierarchy is mounted at /sys/fs/cgroup/memory".to_owned()));
        assert!(problems.contains(&"controller io is not in cgroup.controllers".to_owned()));
        assert!(problems.contains(&"a child cgroup has no cgroup.kill".to_owned()));
    }

    #[test]
    fn a_controller_that_cannot_be_enabled_is_reported() {
        let text = GOOD.replace(
            "subtree_control: cpu io memory pids",
            "subtree_control: cpu memory pids",
        );
        assert_eq!(
            CgroupCheck::parse(&text).problems(),
            ["controller io cannot be enabled in cgroup.subtree_control"]
        );
    }

    #[test]
    fn the_check_script_parses() {
        let status = std::process::Command::new("/bin/sh")
            .args(["-n", "-c", CGROUP_CHECK_SCRIPT])
            .status()
            .unwrap();
        assert!(status.success());
        assert_eq!(cgroup_check_command().argv[0], GUEST_BUSYBOX);
    }

    #[test]
    fn stale_run_dirs_are_removed_and_live_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (live, _lock) = create_run_dir(tmp.path()).unwrap();
        let dead = tmp.path().join("hatchery-vm-dead");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join(OWNER_LOCK), b"").unwrap();
        std::fs::write(dead.join("vmlinux"), b"big").unwrap();
        let young = tmp.path().join("hatchery-vm-young");
        std::fs::create_dir(&young).unwrap();
        let other = tmp.path().join("someone-else");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join(OWNER_LOCK), b"").unwrap();

        remove_stale_run_dirs(tmp.path());
        assert!(live.path().exists(), "a locked run directory stays");
        assert!(!dead.exists(), "an unlocked one goes");
        assert!(young.exists(), "a fresh one without a lock file stays");
        assert!(other.exists(), "other directories are not ours");
    }

    #[test]
    fn failures_read_well() {
        let outcome = |exit| GuestOutcome {
            exit,
            accel: Accel::Tcg,
            why_not_kvm: None,
            kernel: Kernel {
                image: "/boot/vmlinuz-x".into(),
                version: "x".into(),
                modules_dir: None,
            },
            image: BootImage::Vmlinux,
            modules: Vec::new(),
            root: None,
            boot_to_init: None,
            guest_uptime_at_init: None,
            vm_time: Duration::from_secs(20),
            total: Duration::from_secs(21),
            output: Vec::new(),
            log_tail: String::new(),
            serial_log: None,
        };
        assert_eq!(outcome(GuestExit::Exited(0)).failure(), None);
        assert_eq!(outcome(GuestExit::Exited(0)).exit_code(), Some(0));
        assert_eq!(
            outcome(GuestExit::Exited(3)).failure().unwrap(),
            "the command exited with status 3 in the guest"
        );
        assert_eq!(
            outcome(GuestExit::TimedOut).failure().unwrap(),
            "the vm was killed after 20.0 s, its time limit"
        );
    }
}
