//! Starting, watching and always stopping one qemu process.
//!
//! [`Vm::boot`] starts `qemu-system-x86_64` from a [`VmSpec`]: KVM when it works, else
//! software emulation (TCG), and [`RunningVm::accel`] says which one runs. A host where
//! `/dev/kvm` exists but cannot run the guest (qemu aborts, or the guest never prints) is
//! detected within [`VmSpec::kvm_probe_timeout`] and the VM is started again under TCG.
//!
//! Teardown is the contract of this module: qemu runs in its own process group, and
//! dropping a [`RunningVm`] (including during a panic) sends SIGKILL to that group and
//! reaps qemu, so no qemu outlives its owner. With [`VmSpec::die_with_booting_thread`]
//! qemu also gets SIGKILL when the thread that booted it dies, which covers the owner being
//! killed outright. Nothing here installs signal handlers; binaries do that and cancel
//! through [`RunningVm::wait_cancellable`] or by dropping the VM.

use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How often waiting loops look at qemu and the console.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What every guest kernel gets on its command line: the serial console, an immediate
/// reboot on panic (which `-no-reboot` turns into qemu exiting), and a pure cgroup v2
/// hierarchy (`cgroup_no_v1=all`; the systemd flag is harmless without systemd).
pub const BASE_CMDLINE: &[&str] = &[
    "console=ttyS0",
    "panic=-1",
    "cgroup_no_v1=all",
    "systemd.unified_cgroup_hierarchy=1",
];

/// Errors while starting or waiting for qemu.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid vm spec: {0}")]
    InvalidSpec(String),
    #[error("cannot start {qemu} (is qemu-system-x86 installed?)")]
    Spawn { qemu: PathBuf, source: io::Error },
    #[error("cannot prepare the serial log {path}")]
    SerialLog { path: PathBuf, source: io::Error },
    #[error("cannot capture qemu's stderr: {0}")]
    Stderr(io::Error),
    #[error("cannot wait for qemu: {0}")]
    Wait(io::Error),
}

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through `/dev/kvm` (`-cpu host`).
    Kvm,
    /// qemu's software emulation (`-cpu max`).
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM if it boots the guest, else TCG.
    #[default]
    Auto,
    /// KVM only (no probe, no fallback).
    Kvm,
    /// TCG only.
    Tcg,
}

impl FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("unknown accelerator {other:?} (auto, kvm or tcg)")),
        }
    }
}

/// A host directory exported to the guest over virtio-9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub host_path: PathBuf,
    /// The 9p mount tag the guest mounts it by (letters, digits, `_`, `-`).
    pub tag: String,
    pub readonly: bool,
}

/// Everything qemu needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// A `bzImage` or an uncompressed ELF `vmlinux` with a PVH note.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Appended to [`BASE_CMDLINE`].
    pub kernel_cmdline_extra: Vec<String>,
    pub shares: Vec<Share>,
    /// The longest the VM may live, counted from the start of the qemu that runs it.
    pub timeout: Duration,
    /// Where qemu writes the serial console (truncated at boot).
    pub serial_log_path: PathBuf,
    pub accel: AccelChoice,
    /// How long a KVM attempt may go without kernel output before TCG takes over.
    /// The probe looks for the kernel banner, so `quiet` on the command line delays it.
    pub kvm_probe_timeout: Duration,
    /// The qemu binary.
    pub qemu: PathBuf,
    /// Let qemu receive SIGKILL when the thread that called [`Vm::boot`] exits
    /// (`PR_SET_PDEATHSIG`). Boot from a thread that lives as long as the VM should.
    pub die_with_booting_thread: bool,
    /// A virtio NIC on qemu's user-mode network (see [`USER_NET_HOST`]).
    pub user_net: bool,
}

/// On qemu's user-mode network the guest is `10.0.2.15/24` and this address is the
/// host: a connection to it reaches the host's loopback (a service listening on
/// `127.0.0.1:port` on the host is `10.0.2.2:port` in the guest). Nothing outside
/// reaches the guest.
pub const USER_NET_HOST: &str = "10.0.2.2";

impl VmSpec {
    /// A spec with the defaults: 1024 MiB, 2 CPUs, 600 s, KVM-or-TCG.
    pub fn new(kernel: PathBuf, initramfs: PathBuf, serial_log_path: PathBuf) -> Self {
        Self {
            kernel,
            initramfs,
            memory_mib: 1024,
            cpus: 2,
            kernel_cmdline_extra: Vec::new(),
            shares: Vec::new(),
            timeout: Duration::from_secs(600),
            serial_log_path,
            accel: AccelChoice::Auto,
            kvm_probe_timeout: Duration::from_secs(5),
            qemu: PathBuf::from("qemu-system-x86_64"),
            die_with_booting_thread: true,
            user_net: false,
        }
    }

    /// The guest kernel's command line.
    pub fn kernel_cmdline(&self) -> String {
        BASE_CMDLINE
            .iter()
            .map(|s| s.to_string())
            .chain(self.kernel_cmdline_extra.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// qemu's arguments for `accel`.
    pub fn qemu_args(&self, accel: Accel) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        let (accel_name, cpu) = match accel {
            Accel::Kvm => ("kvm", "host"),
            Accel::Tcg => ("tcg", "max"),
        };
        push(&[
            "-name",
            "hatchery-vm",
            "-machine",
            "pc",
            "-accel",
            accel_name,
            "-cpu",
            cpu,
        ]);
        push(&["-m", &format!("{}M", self.memory_mib)]);
        push(&["-smp", &self.cpus.to_string()]);
        // No default devices (no NIC, no VGA, no monitor); the console is the only output.
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        if self.user_net {
            push(&[
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-pci,netdev=net0",
            ]);
        }
        push(&["-monitor", "none"]);
        push(&[
            "-chardev",
            &format!("file,id=serial0,path={}", escape_opt(&self.serial_log_path)),
            "-serial",
            "chardev:serial0",
        ]);
        push(&["-kernel", &self.kernel.to_string_lossy()]);
        push(&["-initrd", &self.initramfs.to_string_lossy()]);
        push(&["-append", &self.kernel_cmdline()]);
        for share in &self.shares {
            // multidevs=remap keeps inode numbers unique when the export spans several
            // host filesystems (as `/` does).
            let mut virtfs = format!(
                "local,path={},mount_tag={},security_model=none,multidevs=remap",
                escape_opt(&share.host_path),
                share.tag
            );
            if share.readonly {
                virtfs.push_str(",readonly=on");
            }
            push(&["-virtfs", &virtfs]);
        }
        args
    }

    fn validate(&self) -> Result<(), VmError> {
        let bad = |m: String| Err(VmError::InvalidSpec(m));
        if self.cpus == 0 || self.cpus > 64 {
            return bad(format!("cpus must be 1..=64, not {}", self.cpus));
        }
        if self.memory_mib < 128 {
            return bad(format!(
                "memory must be at least 128 MiB, not {}",
                self.memory_mib
            ));
        }
        for path in [&self.kernel, &self.initramfs] {
            if !path.is_file() {
                return bad(format!("{} is not a file", path.display()));
            }
        }
        let mut tags = std::collections::HashSet::new();
        for share in &self.shares {
            let tag_ok = !share.tag.is_empty()
                && share.tag.len() <= 31
                && share
                    .tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !tag_ok {
                return bad(format!(
                    "share tag {:?} must be 1..=31 letters, digits, _ or -",
                    share.tag
                ));
            }
            if !tags.insert(&share.tag) {
                return bad(format!("share tag {:?} is used twice", share.tag));
            }
            if !share.host_path.is_dir() {
                return bad(format!(
                    "share {} is not a directory",
                    share.host_path.display()
                ));
            }
        }
        Ok(())
    }
}

/// qemu option values escape a comma by doubling it.
fn escape_opt(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

/// Why KVM cannot even be tried, if it cannot.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm: {e}")),
    }
}

/// Starts VMs.
pub struct Vm;

impl Vm {
    /// Boots `spec`, falling back from KVM to TCG under [`AccelChoice::Auto`].
    pub fn boot(spec: VmSpec) -> Result<RunningVm, VmError> {
        spec.validate()?;
        let why_not_kvm = match spec.accel {
            AccelChoice::Tcg => Some("tcg was requested".to_owned()),
            AccelChoice::Kvm => return RunningVm::spawn(spec, Accel::Kvm, None),
            AccelChoice::Auto => match kvm_unavailable() {
                Some(reason) => Some(reason),
                None => {
                    let mut vm = RunningVm::spawn(spec.clone(), Accel::Kvm, None)?;
                    match vm.probe_kvm() {
                        Ok(()) => return Ok(vm),
                        Err(reason) => {
                            vm.kill()?;
                            Some(reason)
                        }
                    }
                }
            },
        };
        RunningVm::spawn(spec, Accel::Tcg, why_not_kvm)
    }
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// qemu exited by itself (the guest powered off or, with `panic=-1`, panicked).
    Exited {
        status: ExitStatus,
        elapsed: Duration,
    },
    /// The time limit passed; qemu was killed.
    TimedOut { elapsed: Duration },
    /// The caller cancelled; qemu was killed.
    Cancelled { elapsed: Duration },
}

/// A qemu process that is running (or has been reaped). Dropping it kills qemu.
pub struct RunningVm {
    child: Child,
    status: Option<ExitStatus>,
    spec: VmSpec,
    accel: Accel,
    why_not_kvm: Option<String>,
    started: Instant,
    serial: File,
    pending: Vec<u8>,
    stderr: File,
}

impl RunningVm {
    fn spawn(spec: VmSpec, accel: Accel, why_not_kvm: Option<String>) -> Result<Self, VmError> {
        let log_err = |source| VmError::SerialLog {
            path: spec.serial_log_path.clone(),
            source,
        };
        // Create (and truncate) the log before qemu does, so that it can be followed from
        // the first byte.
        File::create(&spec.serial_log_path).map_err(log_err)?;
        let serial = File::open(&spec.serial_log_path).map_err(log_err)?;
        let stderr = tempfile::tempfile().map_err(VmError::Stderr)?;

        let mut cmd = Command::new(&spec.qemu);
        cmd.args(spec.qemu_args(accel))
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().map_err(VmError::Stderr)?)
            .stderr(stderr.try_clone().map_err(VmError::Stderr)?)
            .process_group(0);
        if spec.die_with_booting_thread {
            let parent = std::process::id() as libc::pid_t;
            // SAFETY: the closure runs between fork and exec and calls only prctl, getppid
            // and _exit, which are async-signal-safe; it allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent may have died before prctl: then nobody would kill us.
                    if libc::getppid() != parent {
                        libc::_exit(1);
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            qemu: spec.qemu.clone(),
            source,
        })?;
        Ok(Self {
            child,
            status: None,
            spec,
            accel,
            why_not_kvm,
            started: Instant::now(),
            serial,
            pending: Vec::new(),
            stderr,
        })
    }

    /// Waits for the first sign of a booting kernel under KVM.
    fn probe_kvm(&mut self) -> Result<(), String> {
        let deadline = self.started + self.spec.kvm_probe_timeout;
        loop {
            let mut chunk = Vec::new();
            let _ = self.serial.read_to_end(&mut chunk);
            self.pending.extend_from_slice(&chunk);
            if contains(&self.pending, b"Linux version") || contains(&self.pending, b"@@@hatchery:")
            {
                return Ok(());
            }
            match self.try_wait() {
                Ok(Some(status)) => {
                    let stderr = self.qemu_stderr();
                    let last = stderr
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("");
                    return Err(format!(
                        "kvm: qemu exited at once ({status}): {}",
                        last.trim()
                    ));
                }
                Ok(None) => {}
                Err(e) => return Err(format!("kvm: {e}")),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "kvm: no kernel output within {:.1} s",
                    self.spec.kvm_probe_timeout.as_secs_f64()
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The accelerator this VM runs under.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Why this VM runs under TCG rather than KVM (`None` under KVM).
    pub fn why_not_kvm(&self) -> Option<&str> {
        self.why_not_kvm.as_deref()
    }

    /// qemu's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the qemu that runs this VM was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// The console bytes written since the last call.
    pub fn read_serial(&mut self) -> io::Result<Vec<u8>> {
        let mut out = std::mem::take(&mut self.pending);
        self.serial.read_to_end(&mut out)?;
        Ok(out)
    }

    /// What qemu printed on stdout and stderr so far.
    pub fn qemu_stderr(&self) -> String {
        let mut file = match self.stderr.try_clone() {
            Ok(f) => f,
            Err(_) => return String::new(),
        };
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// qemu's exit status if it has exited (and reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(VmError::Wait)?;
        }
        Ok(self.status)
    }

    /// Waits for qemu to exit, at most `timeout` and at most until [`VmSpec::timeout`]
    /// after the start; past that qemu is killed.
    pub fn wait(&mut self, timeout: Duration) -> Result<VmExit, VmError> {
        self.wait_cancellable(timeout, &AtomicBool::new(false))
    }

    /// [`RunningVm::wait`] that also kills qemu as soon as `cancel` becomes true.
    pub fn wait_cancellable(
        &mut self,
        timeout: Duration,
        cancel: &AtomicBool,
    ) -> Result<VmExit, VmError> {
        let deadline = (Instant::now() + timeout).min(self.started + self.spec.timeout);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(VmExit::Exited {
                    status,
                    elapsed: self.started.elapsed(),
                });
            }
            if cancel.load(Ordering::SeqCst) {
                self.kill()?;
                return Ok(VmExit::Cancelled {
                    elapsed: self.started.elapsed(),
                });
            }
            if Instant::now() >= deadline {
                self.kill()?;
                return Ok(VmExit::TimedOut {
                    elapsed: self.started.elapsed(),
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends SIGKILL to qemu's process group and reaps qemu. Idempotent.
    pub fn kill(&mut self) -> Result<(), VmError> {
        if self.status.is_some() {
            return Ok(());
        }
        // qemu leads its own group (process_group(0)) and is not reaped yet, so the group
        // id cannot have been reused by anyone else.
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        self.status = Some(self.child.wait().map_err(VmError::Wait)?);
        Ok(())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let mut spec = VmSpec::new("/k,1".into(), "/i".into(), "/log,s".into());
        spec.shares.push(Share {
            host_path: "/".into(),
            tag: "hostroot".into(),
            readonly: true,
        });
        spec.shares.push(Share {
            host_path: "/srv/out".into(),
            tag: "share0".into(),
            readonly: false,
        });
        spec.kernel_cmdline_extra.push("loglevel=5".into());
        spec
    }

    fn args(spec: &VmSpec, accel: Accel) -> Vec<String> {
        spec.qemu_args(accel)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn cmdline_is_pure_cgroup_v2_with_serial_console_and_panic_exit() {
        assert_eq!(
            spec().kernel_cmdline(),
            "console=ttyS0 panic=-1 cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1 loglevel=5"
        );
    }

    #[test]
    fn qemu_args_per_accelerator() {
        let s = spec();
        let tcg = args(&s, Accel::Tcg);
        assert_eq!(after(&tcg, "-accel"), ["tcg"]);
        assert_eq!(after(&tcg, "-cpu"), ["max"]);
        let kvm = args(&s, Accel::Kvm);
        assert_eq!(after(&kvm, "-accel"), ["kvm"]);
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
        for flag in ["-nographic", "-no-reboot", "-nodefaults"] {
            assert!(tcg.iter().any(|a| a == flag), "{flag}");
        }
        assert_eq!(after(&tcg, "-m"), ["1024M"]);
        assert_eq!(after(&tcg, "-smp"), ["2"]);
        assert_eq!(
            after(&tcg, "-kernel"),
            ["/k,1"],
            "-kernel takes a plain path"
        );
        assert_eq!(after(&tcg, "-chardev"), ["file,id=serial0,path=/log,,s"]);
        assert_eq!(
            after(&tcg, "-virtfs"),
            [
                "local,path=/,mount_tag=hostroot,security_model=none,multidevs=remap,readonly=on",
                "local,path=/srv/out,mount_tag=share0,security_model=none,multidevs=remap",
            ]
        );
    }

    #[test]
    fn validation_rejects_bad_specs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let mut s = VmSpec::new(file.clone(), file.clone(), dir.path().join("log"));
        assert!(s.validate().is_ok());
        s.cpus = 0;
        assert!(s.validate().is_err());
        s.cpus = 1;
        s.shares.push(Share {
            host_path: dir.path().into(),
            tag: "bad,tag".into(),
            readonly: true,
        });
        assert!(s.validate().is_err());
        s.shares[0].tag = "ok".into();
        assert!(s.validate().is_ok());
        s.shares.push(s.shares[0].clone());
        assert!(s.validate().is_err(), "duplicate tag");
        s.shares.pop();
        s.kernel = dir.path().join("missing");
        assert!(s.validate().is_err());
    }

    #[test]
    fn accel_choice_parses() {
        assert_eq!("auto".parse::<AccelChoice>(), Ok(AccelChoice::Auto));
        assert_eq!("tcg".parse::<AccelChoice>(), Ok(AccelChoice::Tcg));
        assert!("xen".parse::<AccelChoice>().is_err());
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }

    /// A stand-in "qemu" that ignores its arguments and sleeps: dropping the VM must kill
    /// and reap it, and the timeout must fire.
    #[test]
    fn timeout_and_drop_kill_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let fake = dir.path().join("fake-qemu");
        // The child sleep is in qemu's process group and must die with it.
        std::fs::write(
            &fake,
            "#!/bin/sh\nsleep 100 &\necho $! > \"$0.child\"\nwait\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut s = VmSpec::new(file.clone(), file, dir.path().join("log"));
        s.qemu = fake.clone();
        s.accel = AccelChoice::Tcg;
        s.timeout = Duration::from_millis(300);
        let mut vm = Vm::boot(s).unwrap();
        assert_eq!(vm.accel(), Accel::Tcg);
        assert_eq!(vm.why_not_kvm(), Some("tcg was requested"));
        let pid = vm.pid() as i32;
        let exit = vm.wait(Duration::from_secs(30)).unwrap();
        assert!(matches!(exit, VmExit::TimedOut { elapsed } if elapsed < Duration::from_secs(5)));
        drop(vm);
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        assert_ne!(unsafe { libc::kill(pid, 0) }, 0, "qemu stand-in is gone");
        let child_file = dir.path().join("fake-qemu.child");
        if let Ok(text) = std::fs::read_to_string(&child_file) {
            let child: i32 = text.trim().parse().unwrap();
            // The grandchild was reparented and reaped by init (or is a zombie briefly).
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let stat =
                    std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                if stat.is_empty() || stat.contains(") Z ") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the group's other member survived"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
