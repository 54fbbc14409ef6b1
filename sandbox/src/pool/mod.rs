//! The warm pool: frozen, fully contained, single-use sandboxes forked from a zygote, and
//! the claim that turns one into a running execution.
//!
//! A [`Pool`] owns one zygote (started through `sandbox run --userns --userns-root`, so it
//! is itself confined) and a maintainer thread that keeps `size` sandboxes frozen: it
//! asks the zygote for a fork, creates the sandbox's cgroup, moves the sandbox into it,
//! lets it finish its containment and freezes it. [`Pool::claim`] takes a frozen sandbox,
//! writes the execution's limits into its cgroup, thaws it, hands it the code and starts
//! the clock — nothing else happens on the claim path. A watcher thread per execution
//! streams its output, progress and usage as [`Event`]s, enforces the time limit and
//! cancellation, reports the [`ExecResult`] and then tears the sandbox down (off the claim
//! path). A sandbox is never reused.
//!
//! The maintainer replaces sandboxes that die while frozen and restarts a zygote that
//! dies. The pool owner may be multi-threaded: it never forks itself (the zygote is a
//! spawned process, and only the zygote forks sandboxes).

pub mod state;

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::Serialize;

use crate::cgroup::{CgroupError, CgroupRoot, SandboxCgroup, Usage};
use crate::frame::FrameError;
use crate::limits::Limits;
use crate::spec::Rlimits;
use crate::zygote::protocol::{ControlChannel, FromSandbox, FromZygote, Outcome, SandboxChannel};
use crate::zygote::server::Language;
use state::{Lifecycle, SandboxEvent};

/// After this many failed zygote starts in a row, [`Pool::wait_ready`] gives up (the
/// maintainer keeps retrying with a back-off).
pub const ZYGOTE_START_ATTEMPTS: u32 = 3;

/// Code up to this size is handed over before the thaw (it fits the socket buffer).
const SEND_BEFORE_THAW_MAX: usize = 64 << 10;

/// Where the zygote binary appears inside its sandbox.
pub const ZYGOTE_PATH_INSIDE: &str = "/hatchery/zygote";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("sandbox channel: {0}")]
    Channel(#[from] FrameError),
    #[error("the pool is shut down")]
    ShutDown,
    #[error("no sandbox became ready within {0:?}")]
    NoSandbox(Duration),
    #[error("cannot start the zygote: {0}")]
    Zygote(String),
    #[error("{0}")]
    Io(String),
}

/// What a pool serves and how its sandboxes are confined.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub language: Language,
    pub rootfs: PathBuf,
    /// Frozen sandboxes kept ready.
    pub size: usize,
    pub uid: u32,
    pub gid: u32,
    pub hostname: String,
    pub tmp_size: u64,
    pub work_size: u64,
    pub rlimits: Rlimits,
    pub cgroup_parent: String,
    /// The `sandbox` binary (it launches and confines the zygote).
    pub sandbox_bin: PathBuf,
    /// The `hatchery-zygote` binary (bound read-only into the zygote's sandbox).
    pub zygote_bin: PathBuf,
    /// Memory limit of the zygote's own cgroup.
    pub zygote_memory: u64,
    /// First host uid of the zygote's user namespace.
    pub userns_base: u32,
    /// How long a zygote may take to start, and a fork to become ready.
    pub start_timeout: Duration,
    /// How long a claim waits for a sandbox when the pool is empty.
    pub claim_timeout: Duration,
    /// Host paths mounted read-only into the zygote's sandbox, which every sandbox it
    /// forks inherits (data sets, a test probe).
    pub binds: Vec<crate::spec::Bind>,
    /// Limits written into each sandbox's cgroup while it is pooled (e.g. the platform's
    /// default policy): a claim asking for exactly these writes nothing on its path.
    pub default_limits: Option<Limits>,
}

impl PoolConfig {
    /// A pool for `language` on `rootfs`, with binaries found next to the running one.
    pub fn new(language: Language, rootfs: PathBuf) -> PoolConfig {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_default();
        PoolConfig {
            language,
            rootfs,
            size: 2,
            uid: crate::spec::DEFAULT_UID,
            gid: crate::spec::DEFAULT_GID,
            hostname: "sandbox".into(),
            tmp_size: 64 << 20,
            work_size: 64 << 20,
            rlimits: Rlimits::default(),
            cgroup_parent: crate::run::DEFAULT_CGROUP_PARENT.into(),
            sandbox_bin: dir.join("sandbox"),
            zygote_bin: dir.join("hatchery-zygote"),
            zygote_memory: 2 << 30,
            userns_base: crate::spec::DEFAULT_USERNS_BASE,
            start_timeout: Duration::from_secs(60),
            claim_timeout: Duration::from_secs(120),
            binds: Vec::new(),
            default_limits: None,
        }
    }
}

/// One execution's request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub code: String,
    pub limits: Limits,
    /// Counted from the claim (not from when the sandbox was pooled).
    pub timeout: Option<Duration>,
    /// How often a [`Event::Usage`] is sampled from the cgroup.
    pub usage_interval: Duration,
    /// Bytes of stdout, and of stderr, streamed before the execution is stopped.
    pub output_limit: u64,
}

impl ExecRequest {
    pub fn new(code: impl Into<String>) -> ExecRequest {
        ExecRequest {
            code: code.into(),
            limits: Limits::default(),
            timeout: None,
            usage_interval: Duration::from_millis(500),
            output_limit: 16 << 20,
        }
    }
}

/// What an execution reports while it runs, in order; `Finished` is always last.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The first user statement started, `after_claim_ms` after the claim.
    Started {
        after_claim_ms: f64,
    },
    Stdout {
        #[serde(serialize_with = "lossy")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(serialize_with = "lossy")]
        data: Vec<u8>,
    },
    Progress {
        fraction: f64,
        message: String,
    },
    Usage(Usage),
    Finished(Box<ExecResult>),
}

fn lossy<S: serde::Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(data))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    Succeeded,
    Failed,
    OomKilled,
    TimedOut,
    Cancelled,
    OutputLimit,
}

/// Where the time of an execution went.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Waiting for a frozen sandbox (0 when the pool had one).
    pub queued_ms: f64,
    /// How long the claimed sandbox had been frozen in the pool.
    pub pooled_ms: f64,
    /// Writing limits, thawing and handing over the code.
    pub claim_ms: f64,
    /// Claim → first user statement.
    pub start_ms: Option<f64>,
    /// Claim → end of the execution.
    pub total_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExecResult {
    pub id: String,
    pub status: ExecStatus,
    pub outcome: Outcome,
    /// Why the runtime ended it, or what went wrong outside the user's code.
    pub error: Option<String>,
    pub timings: Timings,
    pub usage: Usage,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// Counters of a pool.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStats {
    pub ready: usize,
    pub forked: u64,
    pub claimed: u64,
    pub failed_forks: u64,
    pub died_frozen: u64,
    pub zygote_starts: u64,
    pub zygote_init_ms: f64,
    pub zygote_preload_ms: f64,
    /// Zygote starts that failed since the last one that worked.
    pub zygote_failures: u32,
    pub last_error: Option<String>,
}

/// A frozen sandbox in the pool.
struct Pooled {
    /// The limits now in its cgroup, if written while pooled.
    applied: Option<Limits>,
    id: String,
    lifecycle: Lifecycle,
    cgroup: SandboxCgroup,
    pidfd: OwnedFd,
    channel: SandboxChannel,
    stdout: OwnedFd,
    stderr: OwnedFd,
    frozen_at: Instant,
}

impl Pooled {
    fn is_dead(&self) -> bool {
        readable(self.pidfd.as_fd())
    }

    /// Kills whatever is left and removes the cgroup.
    fn reap(mut self) {
        crate::run::kill_pidfd(self.pidfd.as_fd());
        let _ = self.cgroup.kill_all();
        let _ = self.lifecycle.advance(SandboxEvent::Reaped);
        let _ = self.cgroup.destroy();
    }
}

struct Shared {
    config: PoolConfig,
    root: CgroupRoot,
    queue: Mutex<VecDeque<Pooled>>,
    ready: Condvar,
    /// Wakes the maintainer (a claim took a sandbox, or shutdown).
    wake: OwnedFd,
    stop: AtomicBool,
    stats: Mutex<PoolStats>,
    next_exec: AtomicU64,
    /// Frozen sandboxes wanted now ([`Pool::set_size`]); starts at `config.size`.
    target: std::sync::atomic::AtomicUsize,
    /// Claims waiting for a sandbox: the pool forks for them even beyond `target` (a
    /// pool sized 0 still serves, one fork late).
    waiting: std::sync::atomic::AtomicUsize,
}

impl Shared {
    fn wake_maintainer(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.wake, &one);
    }

    fn note_error(&self, e: String) {
        eprintln!("hatchery pool: {e}");
        self.stats.lock().unwrap().last_error = Some(e);
    }
}

/// A warm pool of frozen sandboxes for one language and root filesystem.
pub struct Pool {
    shared: Arc<Shared>,
    maintainer: Option<JoinHandle<()>>,
    /// `sandbox reap-after <our pid>`: outlives us if we are killed, and then reaps our
    /// sandboxes (thawing frozen ones, which nothing else would).
    watchdog: Option<Child>,
}

impl Pool {
    /// Starts the zygote and the maintainer; returns at once (sandboxes become ready in
    /// the background; [`Pool::wait_ready`] waits for them).
    pub fn start(config: PoolConfig) -> Result<Pool, PoolError> {
        for bin in [&config.sandbox_bin, &config.zygote_bin] {
            if !bin.is_file() {
                return Err(PoolError::Zygote(format!(
                    "{} does not exist",
                    bin.display()
                )));
            }
        }
        let root = CgroupRoot::detect(&config.cgroup_parent)?;
        let _ = crate::gc::collect(&root);
        // SAFETY: eventfd(2) with valid flags; the fd is owned below.
        let wake =
            Errno::result(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
                .map_err(|e| PoolError::Io(format!("eventfd: {e}")))?;
        // SAFETY: a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let config_size = config.size;
        let shared = Arc::new(Shared {
            config,
            root,
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            wake,
            stop: AtomicBool::new(false),
            stats: Mutex::new(PoolStats::default()),
            next_exec: AtomicU64::new(1),
            target: std::sync::atomic::AtomicUsize::new(config_size),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        });
        let watchdog = Command::new(&shared.config.sandbox_bin)
            .arg("reap-after")
            .arg(std::process::id().to_string())
            .arg("--cgroup-parent")
            .arg(&shared.config.cgroup_parent)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| PoolError::Io(format!("cannot start the watchdog: {e}")))?;
        let s = Arc::clone(&shared);
        let maintainer = std::thread::Builder::new()
            .name("pool-maintainer".into())
            .spawn(move || Maintainer::new(s).run())
            .map_err(|e| PoolError::Io(format!("spawn maintainer: {e}")))?;
        Ok(Pool {
            shared,
            maintainer: Some(maintainer),
            watchdog: Some(watchdog),
        })
    }

    /// Waits until `n` sandboxes are frozen and ready (or `timeout` passes, or the
    /// zygote failed to start [`ZYGOTE_START_ATTEMPTS`] times in a row).
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> Result<(), PoolError> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.queue.lock().unwrap();
        while q.len() < n {
            let now = Instant::now();
            let failures = self.shared.stats.lock().unwrap().zygote_failures;
            if failures >= ZYGOTE_START_ATTEMPTS {
                let last = self.shared.stats.lock().unwrap().last_error.clone();
                return Err(PoolError::Zygote(last.unwrap_or_default()));
            }
            if now >= deadline {
                let last = self.shared.stats.lock().unwrap().last_error.clone();
                return Err(match last {
                    Some(e) => PoolError::Zygote(e),
                    None => PoolError::NoSandbox(timeout),
                });
            }
            q = self.shared.ready.wait_timeout(q, deadline - now).unwrap().0;
        }
        Ok(())
    }

    /// Changes how many frozen sandboxes the pool keeps (R5: sized by demand and policy,
    /// no idle capacity kept just in case). Growing forks in the background; shrinking
    /// reaps the surplus. Running executions are not affected.
    pub fn set_size(&self, n: usize) {
        if self.shared.target.swap(n, Ordering::SeqCst) != n {
            self.shared.wake_maintainer();
        }
    }

    /// The number of frozen sandboxes the pool aims for.
    pub fn size(&self) -> usize {
        self.shared.target.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> PoolStats {
        let mut s = self.shared.stats.lock().unwrap().clone();
        s.ready = self.shared.queue.lock().unwrap().len();
        s
    }

    /// Cgroup directories of the frozen sandboxes (for monitoring and tests).
    pub fn frozen_cgroups(&self) -> Vec<PathBuf> {
        self.shared
            .queue
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.cgroup.dir("cpuacct").to_path_buf())
            .collect()
    }

    /// Takes a frozen sandbox (waiting for one if the pool is empty), writes `req`'s
    /// limits into its cgroup, thaws it and hands it the code. The time limit starts now.
    pub fn claim(&self, req: ExecRequest) -> Result<Execution, PoolError> {
        let asked = Instant::now();
        let mut sandbox = loop {
            let next = self.take_frozen(asked)?;
            self.shared.wake_maintainer();
            if next.is_dead() {
                // Died while frozen (the maintainer had not noticed yet): take another.
                self.shared.stats.lock().unwrap().died_frozen += 1;
                next.reap();
                continue;
            }
            break next;
        };
        let claimed_at = Instant::now();
        let claimed_mono = monotonic_ns();
        let queued_ms = ms(claimed_at - asked);
        let pooled_ms = ms(claimed_at - sandbox.frozen_at);
        sandbox
            .lifecycle
            .advance(SandboxEvent::Claimed)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        // Small code is sent while the sandbox is still frozen (the socket buffers it, and
        // the sandbox finds it the moment it thaws); large code after the thaw, so the
        // send cannot block on a frozen reader.
        let early = req.code.len() <= SEND_BEFORE_THAW_MAX;
        let unchanged = sandbox.applied == Some(req.limits);
        let handed_over = (if unchanged {
            Ok(())
        } else {
            sandbox.cgroup.apply(&req.limits).map_err(PoolError::from)
        })
        .and_then(|_| {
            if early {
                sandbox.channel.run(&req.code)?;
            }
            Ok(())
        })
        .and_then(|_| sandbox.cgroup.thaw().map_err(PoolError::from))
        .and_then(|_| {
            if !early {
                sandbox.channel.run(&req.code)?;
            }
            Ok(())
        });
        if let Err(e) = handed_over {
            let _ = sandbox.lifecycle.advance(SandboxEvent::Ended);
            sandbox.reap();
            return Err(e);
        }
        let claim_ms = ms(claimed_at.elapsed());
        self.shared.stats.lock().unwrap().claimed += 1;

        let n = self.shared.next_exec.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", sandbox.id);
        // SAFETY: eventfd(2) with valid flags; the fd is owned below.
        let cancel =
            Errno::result(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
                .map_err(|e| PoolError::Io(format!("eventfd: {e}")))?;
        // SAFETY: a fresh descriptor nobody else owns.
        let cancel = Arc::new(unsafe { OwnedFd::from_raw_fd(cancel) });
        let (tx, rx) = mpsc::channel();
        let watcher = Watcher {
            id: id.clone(),
            sandbox,
            req,
            tx,
            cancel: Arc::clone(&cancel),
            claimed_at,
            claimed_mono,
            timings: Timings {
                queued_ms,
                pooled_ms,
                claim_ms,
                start_ms: None,
                total_ms: 0.0,
            },
        };
        let thread = std::thread::Builder::new()
            .name(format!("exec-{n}"))
            .spawn(move || watcher.run())
            .map_err(|e| PoolError::Io(format!("spawn watcher: {e}")))?;
        Ok(Execution {
            id,
            events: rx,
            cancel: Canceller(cancel),
            thread: Some(thread),
        })
    }

    fn take_frozen(&self, asked: Instant) -> Result<Pooled, PoolError> {
        let limit = self.shared.config.claim_timeout;
        let mut q = self.shared.queue.lock().unwrap();
        if let Some(s) = q.pop_front() {
            return Ok(s);
        }
        // Count this claim as waiting (the maintainer forks for it) until it leaves.
        struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.shared.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.shared.waiting);
        self.shared.wake_maintainer();
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Err(PoolError::ShutDown);
            }
            if let Some(s) = q.pop_front() {
                return Ok(s);
            }
            let waited = asked.elapsed();
            if waited >= limit {
                return Err(PoolError::NoSandbox(waited));
            }
            q = self.shared.ready.wait_timeout(q, limit - waited).unwrap().0;
        }
    }

    /// Stops the maintainer, reaps every frozen sandbox, then stops the zygote. Running
    /// executions are killed with the zygote (they are in its pid namespace).
    pub fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_maintainer();
        self.shared.ready.notify_all();
        if let Some(t) = self.maintainer.take() {
            let _ = t.join();
        }
        let drained: Vec<Pooled> = self.shared.queue.lock().unwrap().drain(..).collect();
        for s in drained {
            s.reap();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Cancels an execution from any thread.
#[derive(Clone)]
pub struct Canceller(Arc<OwnedFd>);

impl Canceller {
    pub fn cancel(&self) {
        let _ = nix::unistd::write(&*self.0, &1u64.to_ne_bytes());
    }
}

/// A running execution: its events, in order, end with [`Event::Finished`].
pub struct Execution {
    pub id: String,
    events: mpsc::Receiver<Event>,
    cancel: Canceller,
    thread: Option<JoinHandle<()>>,
}

impl Execution {
    pub fn events(&self) -> &mpsc::Receiver<Event> {
        &self.events
    }

    pub fn canceller(&self) -> Canceller {
        self.cancel.clone()
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Collects every event until the end; returns them (the last is `Finished`) and the
    /// result.
    pub fn wait(mut self) -> (Vec<Event>, ExecResult) {
        let mut all = Vec::new();
        let mut result = None;
        for e in self.events.iter() {
            if let Event::Finished(r) = &e {
                result = Some((**r).clone());
            }
            all.push(e);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let result = result.expect("the watcher always sends Finished");
        (all, result)
    }
}

impl Drop for Execution {
    fn drop(&mut self) {
        // The watcher runs to the end on its own (it owns the sandbox); nothing to join.
        self.thread.take();
    }
}

/// Why the runtime ended an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Timeout,
    Cancel,
    OutputLimit,
}

struct Watcher {
    id: String,
    sandbox: Pooled,
    req: ExecRequest,
    tx: mpsc::Sender<Event>,
    cancel: Arc<OwnedFd>,
    claimed_at: Instant,
    claimed_mono: u64,
    timings: Timings,
}

struct OutStream {
    total: u64,
    truncated: bool,
    open: bool,
}

impl Watcher {
    fn run(mut self) {
        let deadline = self.req.timeout.map(|t| self.claimed_at + t);
        let mut next_sample = Instant::now() + self.req.usage_interval;
        let mut streams = [
            OutStream {
                total: 0,
                truncated: false,
                open: true,
            },
            OutStream {
                total: 0,
                truncated: false,
                open: true,
            },
        ];
        let mut chan_open = true;
        let mut exited = false;
        let mut stop: Option<Stop> = None;
        let mut outcome: Option<Outcome> = None;
        let mut ended_at: Option<Instant> = None;
        let mut drain_until: Option<Instant> = None;
        let mut setup_error: Option<String> = None;
        let mut finished = false;

        loop {
            if finished {
                break;
            }
            if exited && !streams[0].open && !streams[1].open && !chan_open {
                break;
            }
            if drain_until.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            let now = Instant::now();
            let mut wake = next_sample;
            if let (Some(d), None) = (deadline, stop) {
                wake = wake.min(d);
            }
            if let Some(d) = drain_until {
                wake = wake.min(d);
            }
            let timeout_ms = wake.saturating_duration_since(now).as_millis().min(60_000) as i32;
            let sb = &self.sandbox;
            let mut fds: Vec<PollFd> = Vec::with_capacity(5);
            let mut which: Vec<u8> = Vec::with_capacity(5);
            if streams[0].open {
                fds.push(PollFd::new(sb.stdout.as_fd(), PollFlags::POLLIN));
                which.push(0);
            }
            if streams[1].open {
                fds.push(PollFd::new(sb.stderr.as_fd(), PollFlags::POLLIN));
                which.push(1);
            }
            if chan_open {
                fds.push(PollFd::new(sb.channel.fd(), PollFlags::POLLIN));
                which.push(2);
            }
            if !exited {
                fds.push(PollFd::new(sb.pidfd.as_fd(), PollFlags::POLLIN));
                which.push(3);
            }
            if stop.is_none() {
                fds.push(PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN));
                which.push(4);
            }
            let ready: Vec<u8> = match poll(
                &mut fds,
                PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(_) => fds
                    .iter()
                    .zip(&which)
                    .filter(|(f, _)| f.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(_, w)| *w)
                    .collect(),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            drop(fds);
            let now = Instant::now();
            if now >= next_sample {
                let _ = self.tx.send(Event::Usage(self.sandbox.cgroup.usage()));
                next_sample = now + self.req.usage_interval;
            }
            if let (Some(d), None) = (deadline, stop) {
                if now >= d {
                    stop = Some(Stop::Timeout);
                    ended_at.get_or_insert(now);
                    self.kill();
                }
            }
            // The channel first, every message that is there, in order. Runtime output
            // travels on it too, so it stays in order with progress and the result;
            // what child processes wrote to the pipes before a progress report or the
            // result is drained just before that message.
            let chan_ready = |c: &SandboxChannel| c.has_pending() || readable(c.fd());
            if chan_open && (ready.contains(&2) || chan_ready(&self.sandbox.channel)) {
                while chan_open && chan_ready(&self.sandbox.channel) {
                    let msg = self.sandbox.channel.recv();
                    let mut crossed = false;
                    match msg {
                        Ok(FromSandbox::Started { monotonic_ns }) => {
                            let after = monotonic_ns.saturating_sub(self.claimed_mono) as f64 / 1e6;
                            self.timings.start_ms = Some(after);
                            let _ = self.tx.send(Event::Started {
                                after_claim_ms: after,
                            });
                        }
                        Ok(FromSandbox::Output { stream, data }) => {
                            // Consecutive pieces of one stream become one event (R prints a
                            // vector in many small writes).
                            let w = if stream == 2 { 1 } else { 0 };
                            let mut data = data.into_bytes();
                            while let Some(more) = self.sandbox.channel.peek_output(w) {
                                data.extend_from_slice(more.as_bytes());
                            }
                            crossed = self.forward(w, data, &mut streams[w as usize]);
                        }
                        Ok(FromSandbox::Progress { fraction, message }) => {
                            crossed = self.drain_pipes(&mut streams);
                            let _ = self.tx.send(Event::Progress { fraction, message });
                        }
                        Ok(FromSandbox::Finished(o)) => {
                            crossed = self.drain_pipes(&mut streams);
                            ended_at.get_or_insert_with(Instant::now);
                            outcome = Some(o);
                            // The result does not wait for the process to exit (unmapping a
                            // large copy-on-write heap takes milliseconds): report now,
                            // kill and reap after.
                            finished = true;
                        }
                        Ok(FromSandbox::SetupError { stage, message }) => {
                            setup_error = Some(format!("{stage}: {message}"));
                        }
                        Ok(FromSandbox::Ready) => {}
                        Err(_) => chan_open = false,
                    }
                    if crossed && stop.is_none() {
                        stop = Some(Stop::OutputLimit);
                        ended_at.get_or_insert(now);
                        self.kill();
                    }
                }
            }
            for w in [0u8, 1] {
                if ready.contains(&w)
                    && streams[w as usize].open
                    && self.pump(w, &mut streams[w as usize])
                    && stop.is_none()
                {
                    stop = Some(Stop::OutputLimit);
                    ended_at.get_or_insert(now);
                    self.kill();
                }
            }
            if ready.contains(&3) {
                exited = true;
                ended_at.get_or_insert_with(Instant::now);
                drain_until = Some(Instant::now() + Duration::from_secs(2));
            }
            if ready.contains(&4) && stop.is_none() {
                stop = Some(Stop::Cancel);
                ended_at.get_or_insert(now);
                self.kill();
            }
        }
        let usage = self.sandbox.cgroup.usage();
        self.timings.total_ms = ms(ended_at.unwrap_or_else(Instant::now) - self.claimed_at);
        let (status, error) = match (stop, &outcome) {
            (Some(Stop::Timeout), _) => {
                (ExecStatus::TimedOut, Some("time limit reached".to_string()))
            }
            (Some(Stop::Cancel), _) => (ExecStatus::Cancelled, Some("cancelled".to_string())),
            (Some(Stop::OutputLimit), _) => (
                ExecStatus::OutputLimit,
                Some(format!("output passed {} bytes", self.req.output_limit)),
            ),
            (None, Some(o)) if o.ok => (ExecStatus::Succeeded, None),
            (None, Some(_)) if usage.oom_kills > 0 => (
                ExecStatus::OomKilled,
                Some("a process was killed at the memory limit".into()),
            ),
            (None, Some(_)) => (ExecStatus::Failed, None),
            (None, None) if usage.oom_kills > 0 => (
                ExecStatus::OomKilled,
                Some("killed at the memory limit".into()),
            ),
            (None, None) => (
                ExecStatus::Failed,
                Some(
                    setup_error
                        .unwrap_or_else(|| "the sandbox died before reporting a result".into()),
                ),
            ),
        };
        let result = ExecResult {
            id: self.id.clone(),
            status,
            outcome: outcome.unwrap_or_default(),
            error,
            timings: self.timings,
            usage,
            stdout_truncated: streams[0].truncated,
            stderr_truncated: streams[1].truncated,
        };
        let _ = self.tx.send(Event::Finished(Box::new(result)));
        let _ = self.sandbox.lifecycle.advance(SandboxEvent::Ended);
        // Teardown after the result: off the claim path and off the result's path.
        self.sandbox.reap();
    }

    fn kill(&self) {
        crate::run::kill_pidfd(self.sandbox.pidfd.as_fd());
        let _ = self.sandbox.cgroup.kill_all();
    }

    /// Pumps both pipes until they are empty; true when the output limit was crossed.
    fn drain_pipes(&self, streams: &mut [OutStream; 2]) -> bool {
        let a = streams[0].open && self.pump(0, &mut streams[0]);
        let b = streams[1].open && self.pump(1, &mut streams[1]);
        a || b
    }

    /// Sends `data` as an output event, up to the output limit; true when this crossed it.
    fn forward(&self, which: u8, mut data: Vec<u8>, stream: &mut OutStream) -> bool {
        let n = data.len();
        let room = self.req.output_limit.saturating_sub(stream.total) as usize;
        stream.total += n as u64;
        if room > 0 && n > 0 {
            data.truncate(n.min(room));
            let e = if which == 0 {
                Event::Stdout { data }
            } else {
                Event::Stderr { data }
            };
            let _ = self.tx.send(e);
        }
        if n > room && !stream.truncated {
            stream.truncated = true;
            return true;
        }
        false
    }

    /// Forwards what is readable now; returns true when this crossed the output limit.
    fn pump(&self, which: u8, stream: &mut OutStream) -> bool {
        let fd = if which == 0 {
            self.sandbox.stdout.as_fd()
        } else {
            self.sandbox.stderr.as_fd()
        };
        let mut crossed = false;
        loop {
            if !readable(fd) {
                return crossed;
            }
            let mut buf = vec![0u8; 65536];
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    stream.open = false;
                    return crossed;
                }
                Ok(n) => {
                    buf.truncate(n);
                    crossed |= self.forward(which, buf, stream);
                }
                Err(Errno::EINTR) => {}
                Err(_) => {
                    stream.open = false;
                    return crossed;
                }
            }
        }
    }
}

/// The maintainer: owns the zygote, keeps the pool full.
struct Maintainer {
    shared: Arc<Shared>,
    zygote: Option<Zygote>,
    slot: u64,
    backoff: Duration,
}

struct Zygote {
    launcher: Child,
    ctl: ControlChannel,
    root: CgroupRoot,
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Ask first: the zygote exits, its launcher (a `sandbox run`) sees it and removes
        // its own cgroup. Killing the launcher kills the zygote's whole pid namespace,
        // frozen and running sandboxes included, and leaves the launcher's cgroup to gc.
        let _ = self.ctl.shutdown();
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !matches!(self.launcher.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let _ = crate::gc::collect(&self.root);
    }
}

impl Maintainer {
    fn new(shared: Arc<Shared>) -> Maintainer {
        Maintainer {
            shared,
            zygote: None,
            slot: 0,
            backoff: Duration::from_millis(200),
        }
    }

    fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            if self.zygote.is_none() {
                match self.start_zygote() {
                    Ok(z) => {
                        self.zygote = Some(z);
                        self.backoff = Duration::from_millis(200);
                        self.shared.stats.lock().unwrap().zygote_failures = 0;
                    }
                    Err(e) => {
                        self.shared.stats.lock().unwrap().zygote_failures += 1;
                        self.shared.note_error(e.to_string());
                        self.shared.ready.notify_all();
                        self.sleep(self.backoff);
                        self.backoff = (self.backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
            self.prune_dead();
            let want = self.shared.target.load(Ordering::SeqCst);
            self.trim_to(want);
            let want = want.max(self.shared.waiting.load(Ordering::SeqCst));
            while self.shared.queue.lock().unwrap().len() < want
                && !self.shared.stop.load(Ordering::SeqCst)
            {
                match self.fork_one() {
                    Ok(()) => {}
                    Err(e) => {
                        self.shared.stats.lock().unwrap().failed_forks += 1;
                        self.shared
                            .note_error(format!("fork of a sandbox failed: {e}"));
                        if self.zygote_dead() {
                            self.zygote = None;
                        }
                        break;
                    }
                }
            }
            if self.zygote.is_none() {
                continue;
            }
            // Sleep until a claim, a zygote death or the next liveness check.
            let z = self.zygote.as_ref().unwrap();
            let mut fds = [
                PollFd::new(z.ctl.fd(), PollFlags::POLLIN),
                PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN),
            ];
            let _ = poll(&mut fds, PollTimeout::from(250u16));
            let ctl_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            let mut counter = [0u8; 8];
            let _ = nix::unistd::read(&self.shared.wake, &mut counter);
            if ctl_ready {
                // The zygote only speaks when asked: this is its death (EOF) or a fatal error.
                // Its frozen sandboxes go first: on cgroup v1 a frozen process cannot die
                // until thawed, and the zygote's pid namespace cannot end before they do.
                self.reap_frozen();
                let z = self.zygote.take().unwrap();
                match z.ctl.recv() {
                    Ok((FromZygote::Fatal { error }, _)) => {
                        self.shared.note_error(format!("zygote: {error}"))
                    }
                    _ => self
                        .shared
                        .note_error("the zygote exited; restarting it".into()),
                }
                drop(z);
            }
        }
        self.reap_frozen();
        self.zygote = None;
    }

    /// Reaps frozen sandboxes beyond `want` (the newest first: the oldest have waited
    /// longest and are claimed next).
    fn trim_to(&self, want: usize) {
        let extra: Vec<Pooled> = {
            let mut q = self.shared.queue.lock().unwrap();
            let n = q.len().saturating_sub(want);
            (0..n).filter_map(|_| q.pop_back()).collect()
        };
        for mut p in extra {
            let _ = p.lifecycle.advance(SandboxEvent::Failed);
            p.reap();
        }
    }

    /// Thaws, kills and removes every frozen sandbox in the pool.
    fn reap_frozen(&self) {
        let frozen: Vec<Pooled> = self.shared.queue.lock().unwrap().drain(..).collect();
        for mut p in frozen {
            let _ = p.lifecycle.advance(SandboxEvent::Failed);
            p.reap();
        }
    }

    fn sleep(&self, d: Duration) {
        let mut fds = [PollFd::new(self.shared.wake.as_fd(), PollFlags::POLLIN)];
        let ms = d.as_millis().min(u16::MAX as u128) as u16;
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }

    fn zygote_dead(&mut self) -> bool {
        match self.zygote.as_mut() {
            Some(z) => !matches!(z.launcher.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn start_zygote(&self) -> Result<Zygote, PoolError> {
        let cfg = &self.shared.config;
        let (agent_end, zygote_end) =
            crate::frame::socketpair().map_err(|e| PoolError::Io(format!("socketpair: {e}")))?;
        let mut cmd = Command::new(&cfg.sandbox_bin);
        cmd.arg("run")
            .arg("--rootfs")
            .arg(&cfg.rootfs)
            .args(["--userns", "--userns-root", "--pass-fd", "3"])
            .arg("--userns-base")
            .arg(cfg.userns_base.to_string())
            .arg("--ro-bind")
            .arg(format!("{}:{ZYGOTE_PATH_INSIDE}", cfg.zygote_bin.display()))
            .args(["--hostname", "zygote", "--output-limit", "1G"])
            .arg("--memory")
            .arg(cfg.zygote_memory.to_string())
            .arg("--cgroup-parent")
            .arg(&cfg.cgroup_parent);
        for b in &cfg.binds {
            cmd.arg("--ro-bind")
                .arg(format!("{}:{}", b.source.display(), b.target.display()));
        }
        cmd.arg("--")
            .arg(ZYGOTE_PATH_INSIDE)
            .args(["--ctl-fd", "3"])
            .arg("--uid")
            .arg(cfg.uid.to_string())
            .arg("--gid")
            .arg(cfg.gid.to_string())
            .arg("--hostname")
            .arg(&cfg.hostname)
            .arg("--tmp-size")
            .arg(cfg.tmp_size.to_string())
            .arg("--work-size")
            .arg(cfg.work_size.to_string())
            .arg("--file-size-limit")
            .arg(cfg.rlimits.file_size.to_string())
            .arg("--open-files")
            .arg(cfg.rlimits.open_files.to_string());
        match &cfg.language {
            Language::R { packages } => {
                cmd.args(["--language", "r"]);
                if !packages.is_empty() {
                    cmd.arg("--packages").arg(packages.join(","));
                }
            }
            Language::Exec { name, argv } => {
                cmd.args(["--language", name]);
                for a in argv {
                    cmd.arg(format!("--exec-arg={a}"));
                }
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(
                std::io::stderr()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| PoolError::Io(format!("dup stderr: {e}")))?,
            ))
            .stderr(Stdio::inherit());
        let child_fd = zygote_end.as_raw_fd();
        // SAFETY: runs between fork and exec: dup2 and prctl only (async-signal-safe).
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(child_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The zygote's launcher dies with the pool owner.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                    0 as libc::c_ulong,
                );
                Ok(())
            });
        }
        let launcher = cmd
            .spawn()
            .map_err(|e| PoolError::Zygote(format!("{}: {e}", cfg.sandbox_bin.display())))?;
        drop(zygote_end);
        let mut zygote = Zygote {
            launcher,
            ctl: ControlChannel::new(agent_end),
            root: self.shared.root.clone(),
        };
        if !wait_readable(zygote.ctl.fd(), cfg.start_timeout) {
            return Err(PoolError::Zygote(format!(
                "no answer within {:?}",
                cfg.start_timeout
            )));
        }
        match zygote.ctl.wait_for_ready() {
            Ok(FromZygote::Ready {
                init_ms,
                preload_ms,
                ..
            }) => {
                let mut st = self.shared.stats.lock().unwrap();
                st.zygote_starts += 1;
                st.zygote_init_ms = init_ms;
                st.zygote_preload_ms = preload_ms;
                Ok(zygote)
            }
            Ok(_) => unreachable!("wait_for_ready returns only Ready"),
            Err(e) => {
                let status = zygote.launcher.try_wait().ok().flatten();
                Err(PoolError::Zygote(match status {
                    Some(s) => format!("{e} (zygote launcher exited: {s})"),
                    None => e.to_string(),
                }))
            }
        }
    }

    /// Forks one sandbox, places it in its cgroup, lets it finish containment, freezes
    /// it and adds it to the pool.
    fn fork_one(&mut self) -> Result<(), PoolError> {
        let cfg = &self.shared.config;
        let timeout = cfg.start_timeout;
        let z = self
            .zygote
            .as_ref()
            .ok_or_else(|| PoolError::Zygote("not running".into()))?;
        self.slot += 1;
        let slot = self.slot;
        let mut lifecycle = Lifecycle::default();
        z.ctl.request_fork(slot)?;
        if !wait_readable(z.ctl.fd(), timeout) {
            return Err(PoolError::Zygote("no answer to a fork request".into()));
        }
        let (msg, fds) = z.ctl.recv()?;
        let [pidfd, chan, stdout, stderr]: [OwnedFd; 4] = match msg {
            FromZygote::Forked { slot: s } if s == slot => fds
                .try_into()
                .map_err(|_| PoolError::Zygote("a fork arrived without its descriptors".into()))?,
            FromZygote::ForkFailed { error, .. } => return Err(PoolError::Zygote(error)),
            other => {
                return Err(PoolError::Channel(FrameError::Unexpected {
                    expected: "forked",
                    received: format!("{other:?}"),
                }))
            }
        };
        lifecycle
            .advance(SandboxEvent::Forked)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        let fail = |pidfd: &OwnedFd, cg: Option<SandboxCgroup>, e: PoolError| {
            crate::run::kill_pidfd(pidfd.as_fd());
            if let Some(cg) = cg {
                let _ = cg.destroy();
            }
            Err(e)
        };
        let host_pid = match pid_of_pidfd(pidfd.as_fd()) {
            Some(p) => p,
            None => {
                return fail(
                    &pidfd,
                    None,
                    PoolError::Io("cannot read the sandbox's pid".into()),
                )
            }
        };
        let name = crate::gc::unique_name("sb");
        let cgroup = match self.shared.root.create(&name) {
            Ok(c) => c,
            Err(e) => return fail(&pidfd, None, e.into()),
        };
        if let Some(limits) = &cfg.default_limits {
            if let Err(e) = cgroup.apply(limits) {
                return fail(&pidfd, Some(cgroup), e.into());
            }
        }
        if let Err(e) = cgroup.add_process(host_pid) {
            return fail(&pidfd, Some(cgroup), e.into());
        }
        lifecycle
            .advance(SandboxEvent::Placed)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        let channel = SandboxChannel::new(chan);
        if let Err(e) = channel.placed() {
            return fail(&pidfd, Some(cgroup), e.into());
        }
        if !wait_readable(channel.fd(), timeout) {
            return fail(
                &pidfd,
                Some(cgroup),
                PoolError::Zygote("a sandbox did not become ready".into()),
            );
        }
        if let Err(e) = channel.wait_for_ready() {
            return fail(&pidfd, Some(cgroup), e.into());
        }
        if let Err(e) = cgroup.freeze() {
            return fail(&pidfd, Some(cgroup), e.into());
        }
        lifecycle
            .advance(SandboxEvent::Ready)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        let pooled = Pooled {
            applied: cfg.default_limits,
            id: name,
            lifecycle,
            cgroup,
            pidfd,
            channel,
            stdout,
            stderr,
            frozen_at: Instant::now(),
        };
        self.shared.stats.lock().unwrap().forked += 1;
        self.shared.queue.lock().unwrap().push_back(pooled);
        self.shared.ready.notify_all();
        Ok(())
    }

    /// Removes (and reaps) frozen sandboxes whose process died.
    fn prune_dead(&self) {
        let dead: Vec<Pooled> = {
            let mut q = self.shared.queue.lock().unwrap();
            let (dead, alive): (Vec<Pooled>, Vec<Pooled>) = q.drain(..).partition(|p| p.is_dead());
            q.extend(alive);
            dead
        };
        if !dead.is_empty() {
            self.shared.stats.lock().unwrap().died_frozen += dead.len() as u64;
        }
        for mut d in dead {
            let _ = d.lifecycle.advance(SandboxEvent::Failed);
            d.reap();
        }
    }
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = left.as_millis().min(60_000) as i32;
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) if n > 0 => return true,
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// The pid (in our pid namespace) of the process a pidfd refers to.
fn pid_of_pidfd(fd: BorrowedFd<'_>) -> Option<i32> {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|p| p.trim().parse().ok())
        .filter(|p: &i32| *p > 0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the host (no time
/// namespaces are used), so a sandbox's timestamps compare with the agent's.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
