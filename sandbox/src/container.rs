//! The inside of a sandbox: what runs in the cloned child, in one fixed order.
//!
//! The child of `clone3` becomes the sandbox's init (pid 1 of its pid namespace). It
//! waits for the supervisor to place it in its cgroup (and write its uid/gid maps), then:
//!
//! 1. enters a fresh cgroup namespace rooted at its own cgroup (a trusted helper that
//!    asked to keep its caller's does not: the zygote on cgroup v2);
//! 2. sets the hostname and brings up `lo` (the only interface of its network namespace);
//! 3. builds the root filesystem ([`crate::mounts`]) and pivots into it;
//! 4. forks the worker, drops every privilege it holds itself and reaps zombies until the
//!    worker exits, then reports the worker's status and exits — which makes the kernel
//!    kill everything else left in the pid namespace.
//!
//! The worker ([`worker_main`]) becomes the command: new session, stdio, rlimits, groups,
//! gid, uid, an empty capability set, every fd above 2 close-on-exec, `no_new_privs`, and
//! seccomp last, right before `execve`.
//!
//! Both run in a child of a single-threaded process, so allocation is safe here; nothing
//! here may return into the supervisor's code: every path ends in `_exit`.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{self, ForkResult, Gid, Pid, Uid};

use crate::channel::ChildMessage;
use crate::mounts;
use crate::seccomp::BpfProgram;
use crate::spec::SandboxSpec;

/// What the child needs, prepared by the supervisor before `clone3`.
pub(crate) struct ChildContext<'a> {
    pub spec: &'a SandboxSpec,
    /// The seccomp filter, loaded last; `None` only for the zygote (see `userns_root`).
    pub filter: Option<&'a BpfProgram>,
    /// Read end of the supervisor's "go" pipe.
    pub sync_read: OwnedFd,
    /// Write end of the message channel.
    pub status_write: OwnedFd,
    pub stdout_write: OwnedFd,
    pub stderr_write: OwnedFd,
}

/// A containment step that failed, with the step's name for the report.
#[derive(Debug)]
pub(crate) struct StepError {
    pub stage: &'static str,
    pub message: String,
}

pub(crate) fn step<E: std::fmt::Display>(stage: &'static str) -> impl FnOnce(E) -> StepError {
    move |e| StepError {
        stage,
        message: e.to_string(),
    }
}

/// Entry point of the cloned child. Never returns.
pub(crate) fn init_main(ctx: ChildContext<'_>) -> ! {
    let status = ctx.status_write.as_fd();
    match init_setup(&ctx) {
        Ok(Some(worker)) => reap_until(worker, status),
        Ok(None) => exit(0),
        Err(e) => {
            ChildMessage::SetupError {
                stage: e.stage.to_string(),
                message: e.message,
            }
            .send(status);
            exit(1)
        }
    }
}

/// Runs the init's containment steps and forks the worker. `Ok(None)` means the
/// supervisor went away before releasing us.
fn init_setup(ctx: &ChildContext<'_>) -> Result<Option<Pid>, StepError> {
    // Die with the supervisor: a killed `sandbox` must not leave a running sandbox.
    prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
        .map_err(step("set parent-death signal"))?;
    // Wait for "go": the supervisor has moved us into the cgroup and written the id maps.
    // EOF means it died or gave up before that (the death signal may not have been armed
    // in time to catch it).
    let mut go = [0u8; 1];
    match unistd::read(&ctx.sync_read, &mut go) {
        Ok(1) if go[0] == b'G' => {}
        _ => return Ok(None),
    }
    let spec = ctx.spec;
    if spec.userns_base.is_some() {
        // Become root of the new user namespace (the maps are written now).
        unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0))
            .map_err(step("become root in the user namespace"))?;
        unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0))
            .map_err(step("become root in the user namespace"))?;
        // The namespace's own limits, while its root still holds CAP_SYS_RESOURCE in it.
        // These files resolve to the writer's user namespace, whichever /proc they are in.
        for (name, value) in &spec.userns_sysctls {
            std::fs::write(format!("/proc/sys/user/{name}"), value.to_string())
                .map_err(step("set a user namespace limit"))?;
        }
    }
    // After the cgroup move, so that the namespace's root is the sandbox's own cgroup.
    if !spec.keep_cgroup_namespace {
        unshare(CloneFlags::CLONE_NEWCGROUP).map_err(step("unshare the cgroup namespace"))?;
    }
    unistd::sethostname(&spec.hostname).map_err(step("set hostname"))?;
    loopback_up().map_err(step("bring up loopback"))?;
    mounts::enter_root(spec)?;

    // SAFETY: this process is single-threaded (a clone of a single-threaded supervisor),
    // so the child may allocate and run arbitrary code.
    match unsafe { unistd::fork() }.map_err(step("fork the worker"))? {
        ForkResult::Child => worker_main(ctx),
        ForkResult::Parent { child } => {
            // The passed descriptors belong to the command alone.
            for fd in &spec.pass_fds {
                let _ = unistd::close(*fd);
            }
            drop_init_privileges().map_err(step("drop init privileges"))?;
            Ok(Some(child))
        }
    }
}

/// The init keeps only the pipe to the supervisor, gives up every capability and becomes
/// non-dumpable, so the (unprivileged) worker cannot ptrace or signal it into doing
/// anything. As pid 1 of the namespace it already ignores signals it has no handler for.
fn drop_init_privileges() -> Result<(), String> {
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(|e| e.to_string())?;
    }
    prctl(libc::PR_SET_DUMPABLE, 0).map_err(|e| e.to_string())?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(|e| e.to_string())?;
    Ok(())
}

/// pid 1's job: reap every orphan, report the worker's end, then exit (taking the rest of
/// the pid namespace with it).
fn reap_until(worker: Pid, status: BorrowedFd<'_>) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => {
                ChildMessage::WorkerExited { code }.send(status);
                exit(0)
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == worker => {
                ChildMessage::WorkerSignaled { signal: sig as i32 }.send(status);
                exit(0)
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => exit(1),
        }
    }
}

/// The command's side of the fork. Never returns.
fn worker_main(ctx: &ChildContext<'_>) -> ! {
    let status = ctx.status_write.as_fd();
    let err = match confine_worker(ctx) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    ChildMessage::SetupError {
        stage: err.stage.to_string(),
        message: err.message,
    }
    .send(status);
    exit(125)
}

enum Never {}

fn confine_worker(ctx: &ChildContext<'_>) -> Result<Never, StepError> {
    let spec = ctx.spec;
    session_stdio_rlimits(
        ctx.stdout_write.as_raw_fd(),
        ctx.stderr_write.as_raw_fd(),
        &spec.rlimits,
    )?;

    if spec.userns_root {
        // Root of the user namespace (host uid userns_base): capabilities stay, but only
        // over this sandbox's own namespaces.
        if spec.userns_base.is_none() {
            return Err(step("check userns_root")("requires a user namespace"));
        }
    } else {
        drop_privileges(spec.uid, spec.gid)?;
    }

    // CVE-2024-21626: no descriptor of the supervisor or the init may reach the command.
    // Close-on-exec rather than close, so the channel can still report an exec failure.
    close_range_cloexec(3).map_err(step("mark descriptors close-on-exec"))?;
    for fd in &spec.pass_fds {
        // SAFETY: fcntl on a descriptor number the caller asked us to keep open.
        Errno::result(unsafe { libc::fcntl(*fd, libc::F_SETFD, 0) })
            .map_err(step("keep a passed descriptor"))?;
    }

    prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(step("set no_new_privs"))?;

    let argv: Vec<CString> = spec
        .command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(step("build argv"))?;
    let envp: Vec<CString> = spec
        .env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(step("build environment"))?;
    let candidates = resolve_command(&spec.command[0], &spec.env);

    ChildMessage::Confined.send(ctx.status_write.as_fd());
    // Seccomp last: from here on only the allow-listed syscalls work, execve among them.
    if let Some(bpf) = ctx.filter {
        // Compiled to BPF by the supervisor: loading is one seccomp(2) call.
        bpf.load().map_err(step("load seccomp filter"))?;
    }

    let mut errno = Errno::ENOENT;
    for path in &candidates {
        let e = unistd::execve(path, &argv, &envp).unwrap_err();
        // Keep the most telling error: EACCES beats ENOENT, as in execvp(3).
        if errno == Errno::ENOENT || e != Errno::ENOENT {
            errno = e;
        }
    }
    ChildMessage::ExecFailed {
        command: spec.command[0].clone(),
        errno: errno as i32,
    }
    .send(ctx.status_write.as_fd());
    exit(if errno == Errno::ENOENT { 127 } else { 126 })
}

/// The common start of a contained process: a new session (no controlling terminal, so
/// TIOCSTI and friends have nothing to inject into), stdin `/dev/null`, stdout/stderr onto
/// the given pipes, the work directory, a raised OOM score, and rlimits.
pub(crate) fn session_stdio_rlimits(
    stdout: RawFd,
    stderr: RawFd,
    rlimits: &crate::spec::Rlimits,
) -> Result<(), StepError> {
    unistd::setsid().map_err(step("setsid"))?;
    let devnull = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(step("open /dev/null"))?;
    dup_onto(devnull.as_raw_fd(), 0).map_err(step("set up stdin"))?;
    drop(devnull);
    dup_onto(stdout, 1).map_err(step("set up stdout"))?;
    dup_onto(stderr, 2).map_err(step("set up stderr"))?;
    unistd::chdir(crate::spec::WORK_DIR).map_err(step("chdir to the work directory"))?;
    ensure_oom_score_adj(OOM_SCORE_ADJ)?;

    let limits = [
        (Resource::RLIMIT_CORE, 0, "set RLIMIT_CORE"),
        (Resource::RLIMIT_RTPRIO, 0, "set RLIMIT_RTPRIO"),
        (Resource::RLIMIT_NICE, 0, "set RLIMIT_NICE"),
        (
            Resource::RLIMIT_FSIZE,
            rlimits.file_size,
            "set RLIMIT_FSIZE",
        ),
        (
            Resource::RLIMIT_NOFILE,
            rlimits.open_files,
            "set RLIMIT_NOFILE",
        ),
        (
            Resource::RLIMIT_NPROC,
            rlimits.processes,
            "set RLIMIT_NPROC",
        ),
        (
            Resource::RLIMIT_MEMLOCK,
            rlimits.locked_memory,
            "set RLIMIT_MEMLOCK",
        ),
        (
            Resource::RLIMIT_MSGQUEUE,
            rlimits.message_queues,
            "set RLIMIT_MSGQUEUE",
        ),
        (
            Resource::RLIMIT_SIGPENDING,
            rlimits.pending_signals,
            "set RLIMIT_SIGPENDING",
        ),
    ];
    for (resource, value, stage) in limits {
        // Never above what is already the hard limit (raising it would need privilege
        // on the host, and lower is still closed).
        let hard = nix::sys::resource::getrlimit(resource)
            .map(|(_, hard)| hard)
            .unwrap_or(value);
        let value = value.min(hard);
        setrlimit(resource, value, value).map_err(step(stage))?;
    }
    Ok(())
}

/// The OOM score adjustment of every process that runs user code.
pub const OOM_SCORE_ADJ: i32 = 500;

/// Under memory pressure the command's tree goes first, before the init and, on a global
/// OOM, before the host's own processes. A score inherited from whoever started Hatchery
/// (a service manager may run it at −1000, "never kill") must never reach user code:
/// raise it (which needs no privilege) and read it back; a negative score left in place
/// is a refusal to run.
pub(crate) fn ensure_oom_score_adj(want: i32) -> Result<(), StepError> {
    let path = "/proc/self/oom_score_adj";
    // Our /proc files belong to whoever owns this process's memory map: for a process
    // that changed its uids and was forked, not exec'd, inside a user namespace, that is
    // the host's root, and even root of the namespace could not write them. While
    // dumpable they are our own; the previous state is restored right after.
    // SAFETY: prctl with integer arguments only.
    let was = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
    let _ = prctl(libc::PR_SET_DUMPABLE, 1);
    let _ = std::fs::write(path, want.to_string());
    if was >= 0 {
        let _ = prctl(libc::PR_SET_DUMPABLE, was as libc::c_ulong);
    }
    let now: i32 = std::fs::read_to_string(path)
        .map_err(step("read oom_score_adj"))?
        .trim()
        .parse()
        .map_err(step("read oom_score_adj"))?;
    if now < 0 {
        return Err(step("raise oom_score_adj")(format!(
            "it is {now} and could not be raised: user code must never be protected from \
             the OOM killer"
        )));
    }
    Ok(())
}

/// Becomes `uid`/`gid` with no supplementary groups and every capability set empty
/// (verified). The bounding set can only shrink while we still hold CAP_SETPCAP, i.e.
/// before the uid change; the uid change then empties the permitted and effective sets.
pub(crate) fn drop_privileges(uid: u32, gid: u32) -> Result<(), StepError> {
    for cap in caps::all() {
        caps::drop(None, caps::CapSet::Bounding, cap).map_err(step("drop bounding set"))?;
    }
    unistd::setgroups(&[]).map_err(step("clear supplementary groups"))?;
    let gid = Gid::from_raw(gid);
    let uid = Uid::from_raw(uid);
    unistd::setresgid(gid, gid, gid).map_err(step("set gid"))?;
    unistd::setresuid(uid, uid, uid).map_err(step("set uid"))?;
    for set in [
        caps::CapSet::Effective,
        caps::CapSet::Permitted,
        caps::CapSet::Inheritable,
        caps::CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(step("clear capabilities"))?;
    }
    if !caps::read(None, caps::CapSet::Permitted)
        .map_err(step("read capabilities"))?
        .is_empty()
    {
        return Err(step("verify capabilities")("permitted set is not empty"));
    }
    Ok(())
}

/// The paths `execve` should try: the command itself when it has a slash, else each
/// directory of the sandbox's own `PATH` (not the supervisor's).
fn resolve_command(cmd: &str, env: &[(String, String)]) -> Vec<CString> {
    if cmd.contains('/') {
        return CString::new(cmd).into_iter().collect();
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(crate::spec::DEFAULT_PATH);
    path.split(':')
        .filter(|d| !d.is_empty())
        .filter_map(|d| CString::new(format!("{}/{}", d.trim_end_matches('/'), cmd)).ok())
        .collect()
}

/// prctl(2) with one argument; the unused ones are passed as zero of the width the
/// kernel reads (some options refuse non-zero garbage there).
pub(crate) fn prctl(option: libc::c_int, arg: libc::c_ulong) -> Result<(), Errno> {
    let zero: libc::c_ulong = 0;
    // SAFETY: prctl with integer arguments only.
    Errno::result(unsafe { libc::prctl(option, arg, zero, zero, zero) }).map(drop)
}

/// dup2(2): `newfd` becomes a copy of `oldfd` (without close-on-exec).
pub(crate) fn dup_onto(oldfd: RawFd, newfd: RawFd) -> Result<(), Errno> {
    // SAFETY: dup2 on descriptors this process owns; newfd is one of 0, 1, 2.
    Errno::result(unsafe { libc::dup2(oldfd, newfd) }).map(drop)
}

/// close_range(2): closes every descriptor in `first..=last` (nothing when first > last).
pub(crate) fn close_range(first: RawFd, last: RawFd) -> Result<(), Errno> {
    if first > last {
        return Ok(());
    }
    // SAFETY: closes only descriptors of this process, none of which is borrowed elsewhere
    // (callers pass the ranges around the descriptors they keep).
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0 as libc::c_uint,
        )
    };
    Errno::result(r).map(drop)
}

fn close_range_cloexec(first: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC only sets flags on our own fds.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    Errno::result(r).map(drop)
}

/// `ip link set lo up`, with one ioctl pair.
pub(crate) fn loopback_up() -> Result<(), Errno> {
    // SAFETY: plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let fd = Errno::result(fd)?;
    // SAFETY: fd is a fresh socket owned by nobody else.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads into the ifreq we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the flags member of the union was just filled by the kernel.
    unsafe {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: _exit never returns and runs no atexit handlers or destructors, which belong
    // to the supervisor's copy of this address space.
    unsafe { libc::_exit(code) }
}

/// Does `path` exist (without following a final symlink)?
pub(crate) fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_resolution_uses_sandbox_path() {
        let env = vec![("PATH".to_string(), "/a:/b/".to_string())];
        let c = resolve_command("R", &env);
        assert_eq!(
            c,
            vec![CString::new("/a/R").unwrap(), CString::new("/b/R").unwrap()]
        );
        assert_eq!(
            resolve_command("./x", &env),
            vec![CString::new("./x").unwrap()]
        );
    }
}
