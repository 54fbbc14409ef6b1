//! The supervisor of one sandboxed run (fork-exec path).
//!
//! [`run`] prepares everything that may fail or cost time on the host side (cgroup with its
//! limits, compiled seccomp filter, pipes), clones the sandbox's init with fresh pid, mount,
//! uts, ipc and network namespaces (and optionally a user namespace), places it in its
//! cgroup (born into it on v2 with `CLONE_INTO_CGROUP`; attached while it waits on v1),
//! releases it, and then watches it: output is passed through and capped, the wall clock
//! is enforced, and on any end the whole tree is killed and the cgroup removed. Nothing is
//! left behind, whatever happened.
//!
//! The calling process must be single-threaded: the cloned child runs Rust code that
//! allocates (see [`crate::container`]). The `sandbox` binary is.

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::waitpid;
use nix::unistd::{self, Pid, Uid};

use crate::cgroup::{self, CgroupError, CgroupRoot, CgroupVersion, SandboxCgroup, Usage};
use crate::channel::ChildMessage;
use crate::container::{self, ChildContext};
use crate::limits::Limits;
use crate::mounts;
use crate::report::{exit_codes, Report, Status};
use crate::seccomp::Filter;
use crate::spec::{SandboxSpec, USERNS_RANGE};

/// The parent cgroup, in every hierarchy, that holds all of Hatchery's sandboxes.
pub const DEFAULT_CGROUP_PARENT: &str = "hatchery";

/// How the supervisor treats one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub limits: Limits,
    /// Wall-clock limit, counted from the moment the sandbox is released.
    pub timeout: Option<Duration>,
    /// Bytes of stdout, and separately of stderr, passed through before the run is killed.
    pub output_limit: u64,
    /// Parent cgroup (relative to each hierarchy's root).
    pub cgroup_parent: String,
    /// CPU weight of the run's cgroup against its siblings (cgroup v2's scale, see
    /// [`SandboxCgroup::set_cpu_weight`](crate::cgroup::SandboxCgroup::set_cpu_weight));
    /// `None` leaves the default.
    pub cpu_weight: Option<u32>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            limits: Limits::default(),
            timeout: Some(crate::limits::DEFAULT_TIMEOUT),
            output_limit: 16 << 20,
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
            cpu_weight: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("root filesystem {path}: {message}")]
    Rootfs { path: String, message: String },
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the command is empty")]
    EmptyCommand,
    #[error("seccomp: {0}")]
    Seccomp(String),
}

fn sys(op: &'static str) -> impl FnOnce(Errno) -> RunError {
    move |source| RunError::Sys { op, source }
}

/// Runs `spec` confined, passing its output to `out`/`err`, and reports how it ended.
/// Never fails: a sandbox that cannot be set up is reported with status `setup_error`.
pub fn run(
    spec: &SandboxSpec,
    filter: Option<&Filter>,
    opts: &RunOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Report {
    let id = crate::gc::unique_name("run");
    match Supervisor::start(id.clone(), spec, filter, opts) {
        Ok(sup) => sup.watch(out, err),
        Err((e, version)) => setup_error_report(id, opts, version, e.to_string()),
    }
}

fn setup_error_report(
    id: String,
    opts: &RunOptions,
    version: Option<CgroupVersion>,
    message: String,
) -> Report {
    Report {
        id,
        status: Status::SetupError,
        exit_code: None,
        signal: None,
        wall_time_ms: 0.0,
        user_cpu_ms: 0.0,
        system_cpu_ms: 0.0,
        peak_memory_bytes: 0,
        oom_kills: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
        stdout_truncated: false,
        stderr_truncated: false,
        error: Some(message),
        cgroup_version: version.unwrap_or(CgroupVersion::V1),
        cgroup: Vec::new(),
        limits: opts.limits,
        timeout_ms: opts.timeout.map(|t| t.as_millis() as u64),
        output_limit_bytes: opts.output_limit,
    }
}

/// Removes the cgroup (killing anything left in it) however the run ends.
struct CgroupGuard(Option<SandboxCgroup>);

impl CgroupGuard {
    fn get(&self) -> &SandboxCgroup {
        self.0.as_ref().expect("cgroup present until dropped")
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let _ = cg.destroy();
        }
    }
}

/// A released sandbox being watched.
struct Supervisor<'a> {
    id: String,
    opts: &'a RunOptions,
    cgroup: CgroupGuard,
    init: Pid,
    pidfd: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    status: OwnedFd,
    released: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Timeout,
    OutputLimit,
}

/// The pieces of the clone3 ABI we use (struct clone_args, up to `cgroup`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

pub(crate) const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn pipe() -> Result<(OwnedFd, OwnedFd), RunError> {
    unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe2"))
}

impl<'a> Supervisor<'a> {
    fn start(
        id: String,
        spec: &SandboxSpec,
        filter: Option<&Filter>,
        opts: &'a RunOptions,
    ) -> Result<Supervisor<'a>, (RunError, Option<CgroupVersion>)> {
        let root = CgroupRoot::detect(&opts.cgroup_parent).map_err(|e| (e.into(), None))?;
        let version = root.version();
        Self::start_in(id, spec, filter, opts, &root).map_err(|e| (e, Some(version)))
    }

    fn start_in(
        id: String,
        spec: &SandboxSpec,
        filter: Option<&Filter>,
        opts: &'a RunOptions,
        root: &CgroupRoot,
    ) -> Result<Supervisor<'a>, RunError> {
        if spec.command.is_empty() {
            return Err(RunError::EmptyCommand);
        }
        // Reap what a killed supervisor left behind (see crate::gc).
        let _ = crate::gc::collect(root);

        let rootfs = fs::canonicalize(&spec.rootfs).map_err(|e| RunError::Rootfs {
            path: spec.rootfs.display().to_string(),
            message: e.to_string(),
        })?;
        mounts::check_rootfs(&rootfs).map_err(|message| RunError::Rootfs {
            path: rootfs.display().to_string(),
            message,
        })?;
        let mut spec = spec.clone();
        spec.rootfs = rootfs;
        for bind in &mut spec.binds {
            bind.source = fs::canonicalize(&bind.source).map_err(|e| RunError::Io {
                op: "bind source",
                path: bind.source.display().to_string(),
                source: e,
            })?;
        }
        fs::create_dir_all(mounts::STAGING_DIR).map_err(|e| RunError::Io {
            op: "create",
            path: mounts::STAGING_DIR.into(),
            source: e,
        })?;

        // The filter's BPF is generated here, before the clone: inside, loading it is a
        // single system call.
        let bpf = filter
            .map(|f| f.export_bpf())
            .transpose()
            .map_err(|e| RunError::Seccomp(e.to_string()))?;
        let cgroup = CgroupGuard(Some(root.create(&id)?));
        cgroup.get().apply(&opts.limits)?;
        if let Some(weight) = opts.cpu_weight {
            cgroup.get().set_cpu_weight(weight)?;
        }

        let (sync_read, sync_write) = pipe()?;
        let (status_read, status_write) = pipe()?;
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;

        let mut flags = (libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWNET
            | libc::CLONE_PIDFD) as u64;
        if spec.userns_base.is_some() {
            flags |= libc::CLONE_NEWUSER as u64;
        }
        let mut pidfd: RawFd = -1;
        // A new user namespace is created with the effective uid of its base, not root's:
        // its owner is then that unprivileged uid, and per-user kernel counters of
        // everything inside (inotify instances, for one) are charged to it at the top of
        // the hierarchy, never to the host's root. Without root's effective uid the child
        // cannot be born in its cgroup; it is attached while it waits instead (it is our
        // child and unreaped, so its pid cannot be recycled meanwhile).
        let cgroup_fd = match (root.version(), spec.userns_base) {
            (CgroupVersion::V2, None) => {
                flags |= CLONE_INTO_CGROUP;
                Some(cgroup::v2::dir_fd(cgroup.get())?)
            }
            _ => None,
        };
        let _euid = match spec.userns_base {
            Some(base) => Some(EffectiveUid::become_(base)?),
            None => None,
        };
        let mut args = CloneArgs {
            flags,
            pidfd: &mut pidfd as *mut RawFd as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cgroup_fd
                .as_ref()
                .map(|f| f.as_raw_fd() as u64)
                .unwrap_or(0),
            ..Default::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack behaves like fork: the child
        // gets a copy of this (single-threaded) address space and continues here with a
        // return value of 0. `args` outlives the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        let child = Errno::result(ret).map_err(sys("clone3"))?;
        if child == 0 {
            // The child keeps the creds of the clone (its namespace's owner is set); inside
            // it becomes root of its namespace once the maps are written.
            drop((sync_write, status_read, stdout_read, stderr_read, cgroup_fd));
            let ctx = ChildContext {
                spec: &spec,
                filter: bpf.as_ref(),
                sync_read,
                status_write,
                stdout_write,
                stderr_write,
            };
            container::init_main(ctx);
        }
        drop(_euid);
        drop((
            sync_read,
            status_write,
            stdout_write,
            stderr_write,
            cgroup_fd,
        ));
        // The passed descriptors belong to the sandbox now: holding them here would keep
        // their peers from ever seeing the sandbox's end close.
        for fd in &spec.pass_fds {
            let _ = unistd::close(*fd);
        }
        let init = Pid::from_raw(child as i32);
        // SAFETY: CLONE_PIDFD stored a fresh pidfd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };

        let mut sup = Supervisor {
            id,
            opts,
            cgroup,
            init,
            pidfd,
            stdout: stdout_read,
            stderr: stderr_read,
            status: status_read,
            released: Instant::now(),
        };
        if let Err(e) = sup.prepare_child(&spec, root.version()) {
            sup.kill_tree();
            let _ = waitpid(init, None);
            return Err(e);
        }
        // Release: from here on the sandbox sets itself up and runs the command.
        unistd::write(&sync_write, b"G").map_err(sys("release the sandbox"))?;
        sup.released = Instant::now();
        Ok(sup)
    }

    /// Host-side steps while the child waits: cgroup (v1), OOM immunity of the init,
    /// id maps.
    fn prepare_child(&self, spec: &SandboxSpec, version: CgroupVersion) -> Result<(), RunError> {
        let pid = self.init.as_raw();
        if version == CgroupVersion::V1 || spec.userns_base.is_some() {
            self.cgroup.get().add_process(pid)?;
        }
        // The command's score, written by us while the init has not forked it yet: the
        // command inherits it, and — written with CAP_SYS_RESOURCE — also as the floor
        // below which neither it nor anything it starts can lower its score again
        // (otherwise a score of −1000 inherited from whoever started us would be that
        // floor). The init itself is protected once the command runs (see `watch`).
        write_oom_score_adj(pid, crate::container::OOM_SCORE_ADJ)?;
        if let Some(base) = spec.userns_base {
            let map = format!("0 {base} {USERNS_RANGE}\n");
            write_proc(pid, "uid_map", &map)?;
            write_proc(pid, "gid_map", &map)?;
        }
        Ok(())
    }

    fn kill_tree(&self) {
        kill_pidfd(self.pidfd.as_fd());
        let _ = self.cgroup.get().kill_all();
    }

    /// Passes output through, enforces the limits, and reports.
    fn watch(mut self, out: &mut dyn Write, err: &mut dyn Write) -> Report {
        let deadline = self.opts.timeout.map(|t| self.released + t);
        let mut streams = [
            Stream::new(self.opts.output_limit),
            Stream::new(self.opts.output_limit),
        ];
        let mut messages: Vec<ChildMessage> = Vec::new();
        let mut status_buf: Vec<u8> = Vec::new();
        let mut status_open = true;
        let mut killed: Option<KillReason> = None;
        let mut init_exited = false;
        let mut ended_at: Option<Instant> = None;
        let mut drain_deadline: Option<Instant> = None;

        loop {
            let open = streams[0].open || streams[1].open || status_open;
            if init_exited && !open {
                break;
            }
            if let Some(d) = drain_deadline {
                if Instant::now() >= d {
                    break;
                }
            }
            let timeout_ms = match (deadline, killed, drain_deadline) {
                (_, _, Some(d)) => ms_until(d),
                (Some(d), None, None) => ms_until(d),
                _ => -1,
            };
            let mut fds = Vec::with_capacity(4);
            let mut which = Vec::with_capacity(4);
            if streams[0].open {
                fds.push(PollFd::new(self.stdout.as_fd(), PollFlags::POLLIN));
                which.push(0);
            }
            if streams[1].open {
                fds.push(PollFd::new(self.stderr.as_fd(), PollFlags::POLLIN));
                which.push(1);
            }
            if status_open {
                fds.push(PollFd::new(self.status.as_fd(), PollFlags::POLLIN));
                which.push(2);
            }
            if !init_exited {
                fds.push(PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN));
                which.push(3);
            }
            match poll(
                &mut fds,
                PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => {
                    if drain_deadline.is_some() {
                        break;
                    }
                    if killed.is_none() {
                        killed = Some(KillReason::Timeout);
                        ended_at = Some(Instant::now());
                        self.kill_tree();
                    }
                    continue;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
            let ready: Vec<usize> = fds
                .iter()
                .zip(&which)
                .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
                .map(|(_, w)| *w)
                .collect();
            drop(fds);
            for w in ready {
                match w {
                    0 | 1 => {
                        let (fd, sink): (&OwnedFd, &mut dyn Write) = if w == 0 {
                            (&self.stdout, &mut *out)
                        } else {
                            (&self.stderr, &mut *err)
                        };
                        if streams[w].pump(fd.as_fd(), sink) && killed.is_none() {
                            killed = Some(KillReason::OutputLimit);
                            ended_at = Some(Instant::now());
                            self.kill_tree();
                        }
                    }
                    2 => {
                        let mut buf = [0u8; 4096];
                        match unistd::read(&self.status, &mut buf) {
                            Ok(0) | Err(_) => status_open = false,
                            Ok(n) => {
                                status_buf.extend_from_slice(&buf[..n]);
                                while let Some(pos) = status_buf.iter().position(|b| *b == b'\n') {
                                    let line: Vec<u8> = status_buf.drain(..=pos).collect();
                                    if let Ok(m) = serde_json::from_slice(&line) {
                                        if matches!(
                                            m,
                                            ChildMessage::WorkerExited { .. }
                                                | ChildMessage::WorkerSignaled { .. }
                                        ) && ended_at.is_none()
                                        {
                                            ended_at = Some(Instant::now());
                                        }
                                        if matches!(m, ChildMessage::Confined) {
                                            // The command is forked and confined: the
                                            // OOM killer should pick it, never the init
                                            // that reports on it.
                                            let _ = write_oom_score_adj(self.init.as_raw(), -1000);
                                        }
                                        messages.push(m);
                                    }
                                }
                            }
                        }
                    }
                    _ => {
                        init_exited = true;
                        ended_at.get_or_insert_with(Instant::now);
                        // Everything in the pid namespace is dead once init is; the pipes
                        // drain quickly. Bound it anyway.
                        drain_deadline = Some(Instant::now() + Duration::from_secs(2));
                    }
                }
            }
        }
        let _ = out.flush();
        let _ = err.flush();

        let _ = waitpid(self.init, None);
        let cg = self.cgroup.get();
        if !cg.is_empty() {
            let _ = cg.kill_all();
        }
        let usage = cg.usage();
        let version = cg.version();
        let cgroup_dirs: Vec<String> = cg.dirs().map(|d| d.display().to_string()).collect();
        let cleanup = self.cgroup.0.take().map(|c| c.destroy());
        let wall = ended_at.unwrap_or_else(Instant::now) - self.released;

        let mut report = Report {
            id: std::mem::take(&mut self.id),
            status: Status::SetupError,
            exit_code: None,
            signal: None,
            wall_time_ms: wall.as_secs_f64() * 1000.0,
            user_cpu_ms: usage.user_cpu_ns as f64 / 1e6,
            system_cpu_ms: usage.system_cpu_ns as f64 / 1e6,
            peak_memory_bytes: usage.memory_peak_bytes,
            oom_kills: usage.oom_kills,
            stdout_bytes: streams[0].total,
            stderr_bytes: streams[1].total,
            stdout_truncated: streams[0].truncated,
            stderr_truncated: streams[1].truncated,
            error: None,
            cgroup_version: version,
            cgroup: cgroup_dirs,
            limits: self.opts.limits,
            timeout_ms: self.opts.timeout.map(|t| t.as_millis() as u64),
            output_limit_bytes: self.opts.output_limit,
        };
        classify(&mut report, &messages, killed, &usage);
        if let Some(Err(e)) = cleanup {
            let note = format!("cleanup failed: {e}");
            report.error = Some(match report.error.take() {
                Some(prev) => format!("{prev}; {note}"),
                None => note,
            });
        }
        report
    }
}

/// Decides the status from what the inside said, why we killed it, and the cgroup's
/// counters.
fn classify(
    report: &mut Report,
    messages: &[ChildMessage],
    killed: Option<KillReason>,
    usage: &Usage,
) {
    let mut confined = false;
    for m in messages {
        match m {
            ChildMessage::SetupError { stage, message } => {
                report.status = Status::SetupError;
                report.exit_code = Some(exit_codes::SETUP_ERROR);
                report.error = Some(format!("sandbox setup failed at {stage}: {message}"));
                return;
            }
            ChildMessage::ExecFailed { command, errno } => {
                report.status = Status::SetupError;
                let e = Errno::from_raw(*errno);
                report.exit_code = Some(if e == Errno::ENOENT {
                    exit_codes::NOT_FOUND
                } else {
                    exit_codes::NOT_EXECUTABLE
                });
                report.error = Some(format!("cannot execute {command:?}: {}", e.desc()));
                return;
            }
            ChildMessage::Confined => confined = true,
            _ => {}
        }
    }
    let worker_end = messages.iter().rev().find_map(|m| match m {
        ChildMessage::WorkerExited { code } => Some((Some(*code), None)),
        ChildMessage::WorkerSignaled { signal } => Some((None, Some(*signal))),
        _ => None,
    });
    match killed {
        Some(KillReason::Timeout) => {
            report.status = Status::TimedOut;
            report.signal = Some(libc::SIGKILL);
            return;
        }
        Some(KillReason::OutputLimit) => {
            report.status = Status::OutputLimit;
            report.signal = Some(libc::SIGKILL);
            return;
        }
        None => {}
    }
    match worker_end {
        Some((_, Some(sig))) if sig == libc::SIGKILL && usage.oom_kills > 0 => {
            report.status = Status::OomKilled;
            report.signal = Some(sig);
        }
        // A process of the tree was OOM-killed and the command failed: that is why.
        Some((Some(code), _)) if code != 0 && usage.oom_kills > 0 => {
            report.status = Status::OomKilled;
            report.exit_code = Some(code);
        }
        Some((Some(code), _)) => {
            report.status = Status::Exited;
            report.exit_code = Some(code);
        }
        Some((_, Some(sig))) => {
            report.status = Status::Signaled;
            report.signal = Some(sig);
        }
        _ if usage.oom_kills > 0 => {
            report.status = Status::OomKilled;
            report.signal = Some(libc::SIGKILL);
        }
        _ => {
            report.status = Status::SetupError;
            report.exit_code = Some(exit_codes::SETUP_ERROR);
            report.error = Some(if confined {
                "the sandbox's init died before reporting the command's end".into()
            } else {
                "the sandbox died during setup".into()
            });
        }
    }
}

/// One captured output stream.
struct Stream {
    limit: u64,
    total: u64,
    truncated: bool,
    open: bool,
}

impl Stream {
    fn new(limit: u64) -> Stream {
        Stream {
            limit,
            total: 0,
            truncated: false,
            open: true,
        }
    }

    /// Reads what is available and forwards it up to the limit. Returns true when this
    /// read crossed the limit.
    fn pump(&mut self, fd: std::os::fd::BorrowedFd<'_>, sink: &mut dyn Write) -> bool {
        let mut buf = [0u8; 65536];
        match unistd::read(fd, &mut buf) {
            Ok(0) => {
                self.open = false;
                false
            }
            Ok(n) => {
                let room = self.limit.saturating_sub(self.total) as usize;
                let pass = n.min(room);
                if pass > 0 {
                    let _ = sink.write_all(&buf[..pass]);
                    let _ = sink.flush();
                }
                self.total += n as u64;
                if n > room && !self.truncated {
                    self.truncated = true;
                    return true;
                }
                false
            }
            Err(Errno::EINTR) | Err(Errno::EAGAIN) => false,
            Err(_) => {
                self.open = false;
                false
            }
        }
    }
}

/// SIGKILL through a pidfd: unlike kill(2) it cannot hit a recycled pid.
pub(crate) fn kill_pidfd(fd: std::os::fd::BorrowedFd<'_>) {
    // SAFETY: pidfd_send_signal on a pidfd the caller holds; no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// The effective uid switched to an unprivileged one while this lives (the real and saved
/// uids stay root, so the switch back restores every capability).
struct EffectiveUid;

impl EffectiveUid {
    fn become_(uid: u32) -> Result<EffectiveUid, RunError> {
        let keep = Uid::from_raw(u32::MAX); // -1: unchanged
        unistd::setresuid(keep, Uid::from_raw(uid), keep).map_err(sys("set the effective uid"))?;
        Ok(EffectiveUid)
    }
}

impl Drop for EffectiveUid {
    fn drop(&mut self) {
        let keep = Uid::from_raw(u32::MAX);
        // Root is the saved uid: switching back cannot fail for want of privilege.
        let _ = unistd::setresuid(keep, Uid::from_raw(0), keep);
    }
}

fn ms_until(t: Instant) -> i32 {
    let d = t.saturating_duration_since(Instant::now());
    // Round up so we never wake a hair early and spin.
    (d.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
}

/// Sets a process's OOM score. Lowering needs CAP_SYS_RESOURCE, which some hosts
/// (containers) withhold: then the score is left as it is.
fn write_oom_score_adj(pid: i32, value: i32) -> Result<(), RunError> {
    match write_proc(pid, "oom_score_adj", &value.to_string()) {
        Err(RunError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            Ok(())
        }
        other => other,
    }
}

fn write_proc(pid: i32, file: &str, value: &str) -> Result<(), RunError> {
    let path = format!("/proc/{pid}/{file}");
    fs::write(Path::new(&path), value).map_err(|e| RunError::Io {
        op: "write",
        path,
        source: e,
    })
}
