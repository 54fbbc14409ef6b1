//! The zygote: runs inside a sandbox of its own (read-only root, no network, root only of
//! its user namespace), initialises the language runtime once, and forks single-use
//! sandboxes on request.
//!
//! Each fork gets fresh pid, mount, network, ipc and uts namespaces and then, in
//! [`sandbox_main`], finishes its containment in a fixed order before it may receive code:
//! born in its cgroup (cgroup v2: the agent passes that cgroup's directory with the fork
//! request, for that one `clone3(CLONE_INTO_CGROUP)`), or wait for the agent to place it
//! there (v1) → cgroup namespace, hostname, `lo` →
//! private mounts: fresh `/proc` (masked again), tmpfs `/tmp`, `/work`, `/dev/shm` →
//! stdio → rlimits → drop to the unprivileged uid with no capabilities → every other
//! descriptor closed → `no_new_privs` → seccomp → language fork-safety (R: fresh RNG state
//! and temp dir; Python: `random` and numpy reseeded, temp dir forgotten — its
//! `PyOS_AfterFork_Child` ran right after the fork) → `Ready`. The agent freezes it there.
//!
//! The zygote itself is single-threaded (BLAS/OpenMP pinned to one thread from its start,
//! [`SINGLE_THREAD_ENV`](crate::spec::SINGLE_THREAD_ENV)), refuses to fork with a second thread alive, and never runs
//! user code. The agent follows the forked children through pidfds; the zygote reaps
//! them only when the agent's next message says it is done placing them, so a pid the
//! agent writes into a cgroup can never have been recycled. Each sandbox runs user code
//! as a uid of its own (chosen by the agent), so per-uid kernel quotas are not shared.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sched::{unshare, CloneFlags};
use nix::unistd;

use crate::container::{step, StepError};
use crate::frame::FrameError;
use crate::seccomp::BpfProgram;
use crate::spec::Rlimits;
use crate::upstream::{SandboxWriter, Stream};
use crate::zygote::protocol::{
    ErrorInfo, FromZygote, Outcome, RunRequest, SandboxEnd, ToZygote, ZygoteEnd,
};

/// What the zygote runs.
#[derive(Debug, Clone)]
pub enum Language {
    /// Embedded R with these packages preloaded.
    R { packages: Vec<String> },
    /// Embedded CPython with these packages imported (`numpy`, `pandas`, ...).
    Python { packages: Vec<String> },
    /// No zygote runtime: each sandbox execs `argv + [code]` when claimed (e.g.
    /// `["python3", "-c"]`, `["bash", "-c"]`).
    Exec { name: String, argv: Vec<String> },
}

impl Language {
    pub fn name(&self) -> &str {
        match self {
            Language::R { .. } => "r",
            Language::Python { .. } => "python",
            Language::Exec { name, .. } => name,
        }
    }
}

/// Where a pooled sandbox stages its root (an empty directory of the image).
const POOLED_STAGE: &str = "/run/mount";

/// How the zygote's sandboxes are confined (the parts that do not depend on the claim).
#[derive(Debug, Clone)]
pub struct SandboxShape {
    /// Paths bound into the zygote's sandbox (data sets, a test probe) that each sandbox
    /// binds again, read-only, at the same place.
    pub binds: Vec<crate::spec::Bind>,
    pub hostname: String,
    pub tmp_size: u64,
    pub work_size: u64,
    pub rlimits: Rlimits,
}

/// The zygote's configuration, from its command line.
#[derive(Debug, Clone)]
pub struct ZygoteConfig {
    pub language: Language,
    pub shape: SandboxShape,
    /// Control socket inherited from the agent.
    pub ctl_fd: RawFd,
    /// It forks one sandbox, once (`sandbox eval`): nothing is prepared for many forks
    /// (the evaluator is not byte-compiled ahead or warmed up, the heap not collected or
    /// settled), since that costs more than it saves once.
    pub one_off: bool,
    /// Keep the interpreter's heap in transparent huge pages ([`super::huge`]), so forks
    /// and exits handle far fewer page-table entries. Not for a one-off.
    pub huge_pages: bool,
    /// Each sandbox populates, before it is frozen, the pages a first evaluation touches
    /// ([`super::prefault`]), so the claim path does not fault them in one by one. R
    /// only; not for a one-off.
    pub prefault: bool,
}

/// This sandbox's end of its channel (the hooks of the R runtime write to it); -1 in the
/// zygote itself.
static CHANNEL_FD: AtomicI32 = AtomicI32::new(-1);

fn channel_writer() -> Option<SandboxWriter> {
    let fd = CHANNEL_FD.load(Ordering::Relaxed);
    // SAFETY: the fd is this sandbox's channel, open for the life of the process.
    (fd >= 0).then(|| unsafe { SandboxWriter::from_raw(fd) })
}

/// R's console output and Python's `sys.stdout`/`sys.stderr`: on the channel once a sandbox has one (in order with progress and
/// the result, in frames of at most 64 KiB), on fd 1/2 before (the zygote's own start-up
/// messages).
fn send_output(stream: crate::r::OutputStream, data: &[u8]) {
    let (fd, stream) = match stream {
        crate::r::OutputStream::Stdout => (1, Stream::Stdout),
        crate::r::OutputStream::Stderr => (2, Stream::Stderr),
    };
    match channel_writer() {
        Some(w) => {
            let _ = w.output(stream, data);
        }
        None => crate::r::write_fd(fd, data),
    }
}

fn send_progress(fraction: f64, message: &str) {
    if let Some(w) = channel_writer() {
        let _ = w.progress(fraction, message);
    }
}

/// Runs the evaluation path (printing, JSON encoding of common values, warnings,
/// errors) once in the zygote, so that method caches and lazily-loaded code are filled in
/// memory every sandbox shares, instead of being copied on write in each of them.
///
/// Only the last value of an evaluation is encoded as JSON, and jsonlite dispatches on
/// the value's type (S4 methods, cached on first use): each common type is therefore the
/// last value of an evaluation of its own. A child whose value's type was not warmed up
/// pays ~2 ms and the copy-on-write faults of that first dispatch.
fn warm_up(engine: &crate::r::REngine) {
    fn discard(_: crate::r::OutputStream, _: &[u8]) {}
    crate::r::set_output_hook(Some(discard));
    for code in [
        "55L",
        "2.5",
        "c(a = 1.5, b = 2)",
        "1:3",
        "\"x\"",
        "TRUE",
        "NA",
        "NULL",
        "list(a = 1, b = \"x\", c = list(TRUE, NULL))",
        "head(cars)",
        "summary(c(1, 2, 3))",
        "matrix(1:4, 2)",
        "factor(c(\"a\", \"b\"))",
        "Sys.Date()",
        "x <- lm(dist ~ speed, cars); coef(x)",
        "message(\"m\"); warning(\"w\"); 1",
        "stop(\"e\")",
    ] {
        let _ = engine.eval(code);
    }
    crate::r::set_output_hook(None);
}

/// What the zygote prepared once for all its sandboxes.
struct Warm {
    /// The seccomp filter, compiled: each sandbox loads it with one system call.
    filter: BpfProgram,
    runtime: Runtime,
    /// The pages each sandbox faults in before it reports ready.
    prefault: crate::zygote::prefault::Prefault,
}

enum Runtime {
    R(crate::r::REngine),
    Python(crate::py::PyEngine),
    Exec(Vec<String>),
}

/// Runs the zygote until the agent closes the control channel or asks it to stop.
pub fn serve(config: ZygoteConfig) -> ! {
    // SAFETY: the agent passed this descriptor number explicitly (`--pass-fd`).
    let ctl = ZygoteEnd {
        sock: unsafe { OwnedFd::from_raw_fd(config.ctl_fd) },
    };
    let fatal = |ctl: &ZygoteEnd, error: String| -> ! {
        let _ = ctl.send(&FromZygote::Fatal { error }, &[]);
        std::process::exit(1)
    };
    // Children stay zombies until the agent's next message says it is done placing them
    // (see [`reap_children`]); the agent watches them through pidfds.
    // SAFETY: restoring the default disposition of a signal.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };

    // Compiled and exported once: each sandbox loads the ready BPF with one system call.
    let filter = match crate::seccomp::Profile::default_profile()
        .and_then(|p| p.compile())
        .and_then(|f| f.export_bpf())
    {
        Ok(f) => f,
        Err(e) => fatal(&ctl, format!("seccomp: {e}")),
    };
    let started = Instant::now();
    let (runtime, packages, init_ms, preload_ms) = match &config.language {
        Language::R { packages } => {
            let opts = crate::r::REngineOptions {
                packages: Vec::new(),
                for_forks: !config.one_off,
                ..Default::default()
            };
            let engine = match crate::r::REngine::init(&opts) {
                Ok(e) => e,
                Err(e) => fatal(&ctl, format!("R start-up: {e}")),
            };
            let init_ms = started.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            if let Err(e) = engine.preload(packages) {
                fatal(&ctl, format!("preload: {e}"));
            }
            if !config.one_off {
                warm_up(&engine);
                engine.full_gc();
            }
            let preload_ms = t.elapsed().as_secs_f64() * 1000.0;
            crate::r::set_progress_hook(Some(send_progress));
            crate::r::set_output_hook(Some(send_output));
            (Runtime::R(engine), packages.clone(), init_ms, preload_ms)
        }
        Language::Python { packages } => {
            let engine = match crate::py::PyEngine::init() {
                Ok(e) => e,
                Err(e) => fatal(&ctl, format!("Python start-up: {e}")),
            };
            let init_ms = started.elapsed().as_secs_f64() * 1000.0;
            let t = Instant::now();
            if let Err(e) = engine.preload(packages) {
                fatal(&ctl, format!("preload: {e}"));
            }
            if !config.one_off {
                if let Err(e) = engine.settle() {
                    fatal(&ctl, format!("Python warm-up: {e}"));
                }
            }
            let preload_ms = t.elapsed().as_secs_f64() * 1000.0;
            crate::py::set_output_hook(Some(send_output));
            crate::py::set_progress_hook(Some(send_progress));
            (
                Runtime::Python(engine),
                packages.clone(),
                init_ms,
                preload_ms,
            )
        }
        Language::Exec { argv, .. } => (Runtime::Exec(argv.clone()), Vec::new(), 0.0, 0.0),
    };
    // The pages a claimed sandbox's first evaluation touches, learnt from a probe child
    // (before the collapse: the probe's buffers come and go in the heap).
    let prefault = match &runtime {
        Runtime::R(_) if config.prefault && !config.one_off => {
            crate::zygote::prefault::learn(|| probe(&runtime)).unwrap_or_default()
        }
        _ => crate::zygote::prefault::Prefault::default(),
    };
    // Last, once nothing more is loaded: the heap as every sandbox will share it.
    let huge = (config.huge_pages && !config.one_off && !matches!(runtime, Runtime::Exec(_)))
        .then(|| crate::zygote::huge::HugeHeap::scan().ok())
        .flatten()
        .map(|heap| heap.collapse())
        .unwrap_or_default();
    let ready = FromZygote::Ready {
        language: config.language.name().to_string(),
        packages,
        init_ms,
        preload_ms,
        huge_bytes: huge.huge as u64,
        huge_eligible_bytes: huge.eligible as u64,
        prefault_written_pages: prefault.written_pages() as u64,
        prefault_mapped_pages: prefault.mapped_pages() as u64,
    };
    if ctl.send(&ready, &[]).is_err() {
        std::process::exit(0);
    }
    // From here on the loop's own allocations stay out of the heap sandboxes share, where
    // they would split its huge pages again.
    if config.huge_pages && !config.one_off {
        crate::zygote::alloc::enter_loop();
    }
    let warm = Warm {
        filter,
        runtime,
        prefault,
    };
    loop {
        let msg = ctl.recv();
        // Any message means the agent is done with every sandbox forked before it: the
        // dead ones may go now, and their pids be reused.
        reap_children();
        match msg {
            Ok((ToZygote::Reap, _)) => {}
            Ok((
                ToZygote::Fork {
                    slot,
                    uid,
                    into_cgroup,
                    prefault,
                },
                mut fds,
            )) => {
                // The cgroup to be born in: exactly one descriptor when asked, none else.
                let cgroup = match (into_cgroup, fds.len()) {
                    (false, _) => Ok(None),
                    (true, 1) => Ok(fds.pop()),
                    (true, n) => Err(ForkError::CgroupFd(n)),
                };
                drop(fds);
                let reply =
                    cgroup.and_then(|cg| fork_sandbox(&config, &ctl, &warm, uid, cg, prefault));
                let sent = match reply {
                    Ok(fds) => {
                        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                        ctl.send(&FromZygote::Forked { slot }, &raw)
                    }
                    Err(e) => ctl.send(
                        &FromZygote::ForkFailed {
                            slot,
                            error: e.to_string(),
                            errno: match e {
                                ForkError::Os(errno) => Some(errno as i32),
                                _ => None,
                            },
                        },
                        &[],
                    ),
                };
                if sent.is_err() {
                    std::process::exit(0);
                }
            }
            Ok((ToZygote::Shutdown, _)) | Err(FrameError::Closed) => std::process::exit(0),
            Err(e) => fatal(&ctl, format!("control channel: {e}")),
        }
    }
}

/// Reaps every child that has exited, without waiting.
fn reap_children() {
    loop {
        match nix::sys::wait::waitpid(
            None::<unistd::Pid>,
            Some(nix::sys::wait::WaitPidFlag::WNOHANG | nix::sys::wait::WaitPidFlag::__WALL),
        ) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return,
        }
    }
}

/// Why the zygote could not fork a sandbox.
#[derive(Debug, thiserror::Error)]
enum ForkError {
    #[error(transparent)]
    Os(#[from] Errno),
    #[error("the zygote runs {0} threads: it forks only with one")]
    Threads(usize),
    #[error("a fork into a cgroup came with {0} descriptors instead of one")]
    CgroupFd(usize),
}

/// Forks one sandbox that runs user code as `uid`, born in `cgroup` when the agent
/// passed one (cgroup v2), else to be placed by the agent before it goes on; with
/// `prefault`, it populates the learnt pages before it reports ready. Returns the
/// descriptors for the agent: pidfd, channel, stdout and stderr read ends.
fn fork_sandbox(
    config: &ZygoteConfig,
    ctl: &ZygoteEnd,
    warm: &Warm,
    uid: u32,
    cgroup: Option<OwnedFd>,
    prefault: bool,
) -> Result<[OwnedFd; 4], ForkError> {
    let runtime = &warm.runtime;
    // A fork keeps only the forking thread: any other thread's locks (malloc's, a BLAS
    // pool's) would be inherited held, with nobody to release them.
    let threads = crate::r::thread_count();
    if threads > 1 {
        return Err(ForkError::Threads(threads));
    }
    let (agent_sock, child_sock) = crate::frame::socketpair()?;
    let (out_r, out_w) = unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = unistd::pipe2(OFlag::O_CLOEXEC)?;
    let mut flags = (libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_PIDFD) as u64;
    if cgroup.is_some() {
        flags |= crate::run::CLONE_INTO_CGROUP;
    }
    let mut pidfd: RawFd = -1;
    if let Runtime::Python(engine) = runtime {
        engine.before_fork();
    }
    let mut args = crate::run::CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.as_ref().map(|f| f.as_raw_fd() as u64).unwrap_or(0),
        ..Default::default()
    };
    // SAFETY: fork-like clone3 (no CLONE_VM, no stack) of this single-threaded process.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut crate::run::CloneArgs,
            std::mem::size_of::<crate::run::CloneArgs>(),
        )
    };
    if let Runtime::Python(engine) = runtime {
        if ret == 0 {
            engine.after_fork_child();
        } else {
            engine.after_fork_parent();
        }
    }
    // The cgroup's descriptor is needed for the clone only: neither the sandbox nor the
    // zygote keeps it (it reaches the cgroup's parent through `..`).
    let born_in_cgroup = cgroup.is_some();
    drop(cgroup);
    let pid = Errno::result(ret)?;
    if pid == 0 {
        drop((agent_sock, out_r, err_r));
        let _ = unistd::close(ctl.sock.as_raw_fd());
        let end = SandboxEnd { sock: child_sock };
        let how = Birth {
            uid,
            born_in_cgroup,
            prefault,
        };
        sandbox_main(config, end, out_w, err_w, warm, how);
    }
    // SAFETY: CLONE_PIDFD stored a fresh descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok([pidfd, agent_sock, out_r, err_r])
}

/// What the agent asked of one fork.
struct Birth {
    /// The uid it runs user code as.
    uid: u32,
    /// Born in its cgroup: placed already.
    born_in_cgroup: bool,
    /// Populate the learnt pages before it is frozen.
    prefault: bool,
}

/// The forked sandbox: finish containment, wait for code, run it once, exit.
fn sandbox_main(
    config: &ZygoteConfig,
    end: SandboxEnd,
    out_w: OwnedFd,
    err_w: OwnedFd,
    warm: &Warm,
    how: Birth,
) -> ! {
    let runtime = &warm.runtime;
    let _ = crate::container::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
    // Born in its cgroup, it is placed already; else it waits until the agent has moved it.
    if !how.born_in_cgroup && end.wait_for_placement().is_err() {
        crate::container::exit(0);
    }
    CHANNEL_FD.store(end.sock.as_raw_fd(), Ordering::Relaxed);
    let up = end.writer();
    if let Err(e) = contain(config, &end, out_w, err_w, &warm.filter, how.uid) {
        let _ = up.setup_error(e.stage, &e.message);
        crate::container::exit(125);
    }
    if let Err(e) = crate::artifacts::prepare() {
        let _ = up.setup_error("create the output folders", &e.to_string());
        crate::container::exit(125);
    }
    if let Runtime::R(engine) = runtime {
        if let Err(e) = engine.prepare_child(Path::new("/tmp/R")) {
            let _ = up.setup_error("prepare the R runtime", &e.to_string());
            crate::container::exit(125);
        }
    }
    if let Runtime::Python(engine) = runtime {
        if let Err(e) = engine.prepare_child() {
            let _ = up.setup_error("prepare the Python runtime", &e.to_string());
            crate::container::exit(125);
        }
    }
    // The pages the first evaluation will touch, faulted in now rather than after the
    // claim (in this sandbox's cgroup, charged to it), when the agent asks for them.
    if how.prefault {
        warm.prefault.apply();
    }
    // The set-up above allocated from the zygote's arena (contiguous pages of its own,
    // rather than free chunks all over the heap it shares with the zygote: ~0.1 MiB less
    // private memory per sandbox); user code allocates from the system allocator.
    crate::zygote::alloc::leave_loop();
    if how.prefault {
        let _ = crate::zygote::protocol::rehearse_code_frame();
    }
    if up.ready().is_err() {
        crate::container::exit(0);
    }
    // Frozen here until claimed.
    let run = match end.wait_for_code() {
        Ok(r) => r,
        Err(_) => crate::container::exit(0),
    };
    run_once(runtime, &up, run);
    match runtime {
        Runtime::R(_) => crate::r::exit_child(0),
        Runtime::Python(_) | Runtime::Exec(_) => crate::container::exit(0),
    }
}

/// A claimed sandbox's run: `started`, the evaluation (its output on the way), the
/// artifacts asked for, the result.
fn run_once(runtime: &Runtime, up: &SandboxWriter, run: RunRequest) {
    // Sent before any user code runs: the first `started` on the channel is this one.
    let _ = up.started(monotonic_ns());
    let outcome = evaluate(runtime, &run.code);
    if let Some(limits) = run.artifacts {
        // The last plot page is written when its device closes.
        match runtime {
            Runtime::R(engine) => engine.close_graphics(),
            Runtime::Python(engine) => engine.save_figures(Path::new(crate::spec::PLOT_DIR)),
            Runtime::Exec(_) => {}
        }
        crate::artifacts::send(up, limits);
    }
    let _ = up.finished(outcome);
}

/// Runs `code` once and describes how it ended.
fn evaluate(runtime: &Runtime, code: &str) -> Outcome {
    match runtime {
        Runtime::R(engine) => {
            let o = engine.eval(code);
            Outcome {
                ok: o.ok,
                value_json: o.value_json,
                value_class: o.value_class,
                error: o.error.map(|e| ErrorInfo {
                    message: e.message,
                    call: e.call,
                    kind: match e.kind {
                        crate::r::ErrorKind::Parse => "parse".into(),
                        crate::r::ErrorKind::Runtime => "runtime".into(),
                    },
                }),
                warnings: o.warnings,
                exit_code: None,
                signal: None,
            }
        }
        Runtime::Python(engine) => engine.eval(code),
        Runtime::Exec(argv) => exec_code(argv, code),
    }
}

/// What the page probe ([`crate::zygote::prefault::learn`]) runs in its child: a small
/// evaluation through the path a claimed sandbox takes (the code read from its channel as
/// the pool sends it, `started`, the evaluation with its printed output, the value's
/// encoding, the artifacts (none here), `finished`, all as frames on the channel): the
/// same [`run_once`].
const PROBE_CODE: &str = "x <- sum(1:10)\nprint(x)\nx";

fn probe(runtime: &Runtime) {
    let Ok((agent, child)) = crate::frame::socketpair() else {
        return;
    };
    let channel = crate::zygote::protocol::SandboxChannel::new(agent);
    let artifacts = crate::zygote::protocol::ArtifactLimits {
        max_count: 1,
        max_bytes: 1,
    };
    if channel.run(PROBE_CODE, Some(artifacts)).is_err() {
        return;
    }
    let end = SandboxEnd { sock: child };
    CHANNEL_FD.store(end.sock.as_raw_fd(), Ordering::Relaxed);
    let up = end.writer();
    if let Ok(run) = end.wait_for_code() {
        run_once(runtime, &up, run);
    }
    // The agent's end stays open until the run is over.
    drop(channel);
}

/// Fork-exec languages: this process (pid 1 of the sandbox) forks the interpreter, waits
/// for it, and reports its exit.
fn exec_code(argv: &[String], code: &str) -> Outcome {
    let mut args: Vec<CString> = argv
        .iter()
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let Ok(code_c) = CString::new(code) else {
        return Outcome {
            ok: false,
            error: Some(ErrorInfo {
                message: "code contains a NUL byte".into(),
                call: None,
                kind: "parse".into(),
            }),
            ..Default::default()
        };
    };
    args.push(code_c);
    let env: Vec<CString> = crate::spec::default_env()
        .iter()
        .filter_map(|(k, v)| CString::new(format!("{k}={v}")).ok())
        .collect();
    let path = resolve(&argv[0]);
    // SAFETY: single-threaded process; the child only calls execve and _exit.
    match unsafe { unistd::fork() } {
        Ok(unistd::ForkResult::Child) => {
            let _ = unistd::execve(&path, &args, &env);
            crate::container::exit(127)
        }
        Ok(unistd::ForkResult::Parent { child }) => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    return Outcome {
                        ok: code == 0,
                        exit_code: Some(code),
                        ..Default::default()
                    }
                }
                Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                    return Outcome {
                        ok: false,
                        signal: Some(sig as i32),
                        ..Default::default()
                    }
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    return Outcome {
                        ok: false,
                        error: Some(ErrorInfo {
                            message: format!("waitpid: {e}"),
                            call: None,
                            kind: "runtime".into(),
                        }),
                        ..Default::default()
                    }
                }
            }
        },
        Err(e) => Outcome {
            ok: false,
            error: Some(ErrorInfo {
                message: format!("fork: {e}"),
                call: None,
                kind: "runtime".into(),
            }),
            ..Default::default()
        },
    }
}

fn resolve(cmd: &str) -> CString {
    if !cmd.contains('/') {
        for dir in crate::spec::DEFAULT_PATH.split(':') {
            let p = PathBuf::from(dir).join(cmd);
            if p.exists() {
                return CString::new(p.as_os_str().as_encoded_bytes()).unwrap_or_default();
            }
        }
    }
    CString::new(cmd).unwrap_or_default()
}

use crate::pool::monotonic_ns;

/// The containment steps of a forked sandbox, in order (see the module docs).
fn contain(
    config: &ZygoteConfig,
    end: &SandboxEnd,
    out_w: OwnedFd,
    err_w: OwnedFd,
    filter: &BpfProgram,
    uid: u32,
) -> Result<(), StepError> {
    let shape = &config.shape;
    unshare(CloneFlags::CLONE_NEWCGROUP).map_err(step("unshare the cgroup namespace"))?;
    unistd::sethostname(&shape.hostname).map_err(step("set hostname"))?;
    crate::container::loopback_up().map_err(step("bring up loopback"))?;

    // Mounts: a root of its own — an overlay over the zygote's root, so no superblock
    // (file locks, inotify) is shared with another sandbox — with fresh /proc, /sys and
    // /dev, private /tmp, /work and /dev/shm, and the zygote's binds; then pivot_root, so
    // nothing of the zygote's mount tree stays reachable.
    crate::mounts::enter(&crate::mounts::RootPlan {
        lower: Path::new("/"),
        stage: Path::new(POOLED_STAGE),
        binds: &shape.binds,
        userxattr: true,
        tmp_size: shape.tmp_size,
        work_size: shape.work_size,
        uid,
        gid: uid,
    })?;

    // Stdio: output goes to the agent's pipes; no terminal, no input. Then the
    // unprivileged uid with no capabilities.
    crate::container::session_stdio_rlimits(out_w.as_raw_fd(), err_w.as_raw_fd(), &shape.rlimits)?;
    drop((out_w, err_w));
    crate::container::drop_privileges(uid, uid)?;

    // Only stdio and the channel stay open; the channel is close-on-exec.
    let chan = end.sock.as_fd().as_raw_fd();
    crate::container::close_range(3, chan - 1).map_err(step("close descriptors"))?;
    crate::container::close_range(chan + 1, libc::c_uint::MAX as i32)
        .map_err(step("close descriptors"))?;

    crate::container::prctl(libc::PR_SET_NO_NEW_PRIVS, 1).map_err(step("set no_new_privs"))?;
    filter.load().map_err(step("load seccomp filter"))?;
    Ok(())
}
