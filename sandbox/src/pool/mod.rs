//! The warm pool: frozen, fully contained, single-use sandboxes forked from a zygote, and
//! the claim that turns one into a running execution.
//!
//! A [`Pool`] owns one zygote (started through `sandbox run --userns --userns-root`, so it
//! is itself confined) and a maintainer thread that keeps `size` sandboxes frozen: it
//! creates the sandbox's cgroup and asks the zygote for a fork born in it (cgroup v2,
//! [`PoolConfig::clone_into_cgroup`]), or asks for the fork and moves the sandbox into
//! its cgroup (cgroup v1), lets it finish its containment and freezes it.
//! [`Pool::claim`] takes a frozen sandbox, writes the execution's limits into its
//! cgroup, thaws it, hands it the code and starts the clock — nothing else happens on
//! the claim path. A watcher thread per execution streams its output, progress and
//! usage as [`Event`]s, enforces the time limit and cancellation, reports the
//! [`ExecResult`] and then tears the sandbox down (off the claim path). A sandbox is
//! never reused.
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
use crate::upstream::{FromSandbox, ReadOutcome, Stream, Violation, MAX_DATA};
pub use crate::zygote::protocol::ArtifactLimits;
use crate::zygote::protocol::{ControlChannel, FromZygote, Outcome, SandboxChannel};
use crate::zygote::server::Language;
use state::{Lifecycle, SandboxEvent};

/// After this many failed zygote starts in a row, [`Pool::wait_ready`] gives up (the
/// maintainer keeps retrying with a back-off).
pub const ZYGOTE_START_ATTEMPTS: u32 = 3;

/// Events an execution may produce by default (see [`ExecRequest::max_events`]).
pub const DEFAULT_MAX_EVENTS: u64 = 100_000;
/// Output of one stream becomes an event at most this often (pieces that arrive
/// meanwhile are merged, up to [`crate::upstream::MAX_DATA`] per event); the first
/// output after a quiet spell goes out at once.
pub const OUTPUT_INTERVAL: Duration = Duration::from_millis(10);
/// Progress becomes an event at most this often (20 per second); the latest value wins.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);
/// Bytes read from one source (the channel, a pipe) before the watcher looks at its
/// clock and its other sources again.
const READ_BUDGET: usize = 256 << 10;

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
    /// Sandboxes run user code as uids (and gids) `uid_first..uid_first + uid_count` of
    /// the zygote's user namespace, one per sandbox in turn: per-uid kernel quotas
    /// (processes, pending signals, message queue bytes, inotify instances) are never
    /// shared by two live sandboxes.
    pub uid_first: u32,
    pub uid_count: u32,
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
    /// inotify instances and watches each sandbox may hold (the kernel counts them per
    /// uid; each sandbox has its own).
    pub inotify_instances: u64,
    pub inotify_watches: u64,
    /// Limits written into each sandbox's cgroup while it is pooled (e.g. the platform's
    /// default policy): a claim asking for exactly these writes nothing on its path.
    pub default_limits: Option<Limits>,
    /// Sandboxes a refill has on their way at once, at most (1: one after the other).
    pub forks_in_flight: usize,
    /// The pool serves one claim, once (`sandbox eval`): its zygote prepares nothing for
    /// many forks (see `ZygoteConfig::one_off`). Use it with `size` 0.
    pub one_off: bool,
    /// The zygote keeps its heap in transparent huge pages (`ZygoteConfig::huge_pages`):
    /// forks and sandbox exits cost a fraction of the CPU. `false` keeps 4 KiB pages.
    pub huge_pages: bool,
    /// Sandboxes fault in, before they are frozen, the pages a first evaluation touches
    /// (learnt by the zygote from a probe; `ZygoteConfig::prefault`, R only), so that a
    /// claimed sandbox's first statement takes few page faults: measured, claim → result
    /// of `sum(1:10)` 1.0 ms instead of 1.7. The pages it writes become such a sandbox's
    /// own (reported in [`PoolStats`]): 0.7 MiB more with no package preloaded, 1.6 MiB
    /// with stats, MASS and Matrix. Only some sandboxes do it: see
    /// [`prefault_ready`](Self::prefault_ready). `false`: none.
    pub prefault: bool,
    /// With [`prefault`](Self::prefault): how many frozen sandboxes the pool keeps with
    /// their first pages populated. A sandbox forked while fewer are ready or on their
    /// way, or for a claim that waits, populates them; the rest of the pool stays at its
    /// smallest (without the prefault's private pages). Claims take a populated sandbox
    /// first. A pool of many warm sandboxes then costs little more per sandbox than one
    /// without prefault, and a claim that finds one populated is as fast as with it.
    /// `usize::MAX`: every sandbox. See [`PREFAULT_READY`].
    pub prefault_ready: usize,
    /// CPU weight (cgroup v2's scale, 100 = a sandbox's) of the pool's background work:
    /// the zygote's cgroup, and each new sandbox's until it is frozen ready. A refill then
    /// takes the CPU that running executions leave instead of sharing it equally with
    /// them, so the fork a claim starts delays that claim's result less, and refills
    /// (bursts) go slower while executions run. `None` (the default): a sandbox's weight;
    /// see [`REFILL_CPU_WEIGHT`] for what was measured.
    pub refill_cpu_weight: Option<u32>,
    /// On cgroup v2, each sandbox is born in its own cgroup (`clone3(CLONE_INTO_CGROUP)`
    /// with a descriptor the pool passes the zygote for that one fork), instead of being
    /// moved there after its fork: no attach, and no round trip before it finishes its
    /// containment. The zygote then stays in the pool owner's cgroup namespace, and may
    /// write the `cgroup.procs` of the cgroup parent (which can hold no process) and of
    /// each new sandbox's cgroup until its fork is answered. `false`, or cgroup v1: the
    /// pool moves each sandbox into its cgroup.
    pub clone_into_cgroup: bool,
    /// After a claim that leaves sandboxes ready and no claim waiting, the refill waits
    /// until that execution has its result, or this long at most: the fork and the new
    /// sandbox's set-up then do not take the CPU the claimed execution starts on. `None`:
    /// the refill starts at the claim. A claim that empties the pool, or finds one
    /// waiting, always refills at once. See [`REFILL_DEFER`].
    pub refill_defer: Option<Duration>,
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
            uid_first: crate::spec::SANDBOX_UID_FIRST,
            uid_count: crate::spec::SANDBOX_UID_COUNT,
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
            forks_in_flight: FORKS_IN_FLIGHT,
            one_off: false,
            huge_pages: true,
            prefault: true,
            prefault_ready: PREFAULT_READY,
            refill_cpu_weight: None,
            clone_into_cgroup: true,
            refill_defer: Some(REFILL_DEFER),
            inotify_instances: 8,
            inotify_watches: 8192,
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
    /// Bytes the code may emit in all — stdout and stderr (its own and its children's),
    /// progress messages and its value — before the execution is stopped
    /// ([`ExecStatus::OutputLimit`]).
    pub output_limit: u64,
    /// Events (output chunks, progress, usage) an execution may produce before it is
    /// stopped ([`ExecStatus::OutputLimit`]).
    pub max_events: u64,
    /// With limits: the plot pages and the files the code leaves in
    /// [`crate::spec::OUTPUT_DIR`] come back as [`Event::Artifact`]s, within them.
    pub artifacts: Option<ArtifactLimits>,
}

impl ExecRequest {
    pub fn new(code: impl Into<String>) -> ExecRequest {
        ExecRequest {
            code: code.into(),
            limits: Limits::default(),
            timeout: Some(crate::limits::DEFAULT_TIMEOUT),
            usage_interval: Duration::from_millis(500),
            output_limit: 16 << 20,
            max_events: DEFAULT_MAX_EVENTS,
            artifacts: None,
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
    /// A whole artifact (sent before `Finished`, in the order the sandbox sent them).
    Artifact {
        name: String,
        #[serde(rename = "bytes", serialize_with = "length")]
        data: Vec<u8>,
    },
    Finished(Box<ExecResult>),
}

fn length<S: serde::Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(data.len() as u64)
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
    /// The sandbox broke its protocol (see [`crate::upstream::Violation`]): it was killed.
    ProtocolViolation,
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
    /// The artifacts sent before this result: name and size.
    pub artifacts: Vec<(String, u64)>,
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
    /// Of the zygote's heap extents that huge pages could map (`.._eligible_bytes`), the
    /// bytes they did map when it became ready ([`PoolConfig::huge_pages`]).
    pub zygote_huge_bytes: u64,
    pub zygote_huge_eligible_bytes: u64,
    /// Pages each sandbox populates before it is frozen ([`PoolConfig::prefault`]):
    /// written (a private copy each, in its USS) and only mapped (shared).
    pub prefault_written_pages: u64,
    pub prefault_mapped_pages: u64,
    /// Of the `ready` sandboxes, those that populated those pages
    /// ([`PoolConfig::prefault_ready`]).
    pub ready_prefaulted: usize,
    /// Sandboxes that populated them, of the `forked`.
    pub forked_prefaulted: u64,
    /// Zygote starts that failed since the last one that worked.
    pub zygote_failures: u32,
    pub last_error: Option<String>,
    /// The most sandboxes a refill has had on their way at once (forked or asked of the
    /// zygote, not yet in the pool).
    pub most_in_flight: usize,
    /// Sandboxes born in their cgroup ([`PoolConfig::clone_into_cgroup`]); the other
    /// forks were moved into theirs by the pool.
    pub born_in_cgroup: u64,
    /// Refills that waited for the execution whose claim started them
    /// ([`PoolConfig::refill_defer`]).
    pub refills_deferred: u64,
}

/// Whether a fork into a cgroup failed for a reason that the next one would meet too:
/// the kernel's permission checks (the zygote's uid may not write the target's or the
/// common ancestor's `cgroup.procs`, or the target is outside its cgroup namespace) or
/// its support (`CLONE_INTO_CGROUP` is Linux 5.7; a threaded or dying target).
fn into_cgroup_refused(errno: i32) -> bool {
    [
        libc::EACCES,
        libc::EPERM,
        libc::ENOENT,
        libc::EINVAL,
        libc::E2BIG,
        libc::ENOSYS,
        libc::EOPNOTSUPP,
        libc::EBUSY,
    ]
    .contains(&errno)
}

/// How long a reaped sandbox's init may take to die before its cgroup is killed.
const REAP_WAIT: Duration = Duration::from_millis(500);

/// How long a refill that is not needed at once waits, at most, for the execution whose
/// claim started it ([`PoolConfig::refill_defer`]).
pub const REFILL_DEFER: Duration = Duration::from_millis(20);

/// Frozen sandboxes kept with their first pages populated by default
/// ([`PoolConfig::prefault_ready`]): one, for the next claim. Sandboxes forked for claims
/// that wait populate theirs too, so a pool under load serves every claim populated.
pub const PREFAULT_READY: usize = 1;

/// Sandboxes a refill has on their way at once by default (see `Maintainer::refill`).
pub const FORKS_IN_FLIGHT: usize = 4;

/// The next sandbox a claim takes from the queue (oldest first): one with its first pages
/// populated if there is one.
fn take_next(q: &mut VecDeque<Pooled>) -> Option<Pooled> {
    let i = q.iter().position(|p| p.prefaulted).unwrap_or(0);
    q.remove(i)
}

/// A background weight for [`PoolConfig::refill_cpu_weight`]: a tenth of a running
/// sandbox's. Measured side by side on the 2-vCPU development machine (cgroup v1,
/// `warm_pool` bench): an idle pool's claim → result for `sum(1:10)` 1.22× faster in one
/// run and 0.98× in another; sustained executions/s 0.96×; a burst of 100 claims
/// 0.83–0.98× (the refill yields to the executions it is making room for). Not the
/// default for that reason.
pub const REFILL_CPU_WEIGHT: u32 = 10;

/// A forked sandbox on its way into the pool: in its cgroup, finishing its containment.
struct Placing {
    name: String,
    /// It populates the pages a first evaluation touches before it says ready.
    prefaulted: bool,
    lifecycle: Lifecycle,
    cgroup: SandboxCgroup,
    pidfd: OwnedFd,
    channel: SandboxChannel,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

impl Placing {
    /// Kills it and removes its cgroup.
    fn abandon(self) {
        crate::run::kill_pidfd(self.pidfd.as_fd());
        let _ = self.cgroup.destroy();
    }
}

/// A fork asked of the zygote and not answered yet.
struct Asked {
    slot: u64,
    due: Instant,
    /// Asked to populate the pages a first evaluation touches.
    prefault: bool,
    /// The cgroup it is to be born in (cgroup v2), with its name.
    born_in: Option<(String, SandboxCgroup)>,
}

impl Asked {
    /// Gives up on it: whatever was born in its cgroup dies with the cgroup.
    fn abandon(self) {
        if let Some((_, cgroup)) = self.born_in {
            let _ = cgroup.destroy();
        }
    }
}

/// Why the zygote's answer to a fork request did not become a placed sandbox.
enum Received {
    /// That one sandbox failed (the zygote could not fork it, or it could not be placed).
    Sandbox(PoolError),
    /// The zygote did not answer as it should.
    Zygote(PoolError),
}

/// A frozen sandbox in the pool.
struct Pooled {
    /// The limits now in its cgroup, if written while pooled.
    applied: Option<Limits>,
    /// Its first pages are populated ([`PoolConfig::prefault_ready`]).
    prefaulted: bool,
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
    ///
    /// The sandbox's process is the init of its pid namespace: its death takes every
    /// other process of the sandbox (all of them in that namespace) with it, and it has
    /// exited only once they are gone. So once it has, the cgroup is empty and is removed
    /// without the freeze–kill–thaw round of [`SandboxCgroup::kill_all`] (two freezer
    /// transitions per sandbox, on the CPUs the next executions want); that round is
    /// for an init that does not die in time. A frozen sandbox is thawed first (on cgroup
    /// v1 a frozen process cannot die).
    fn reap(mut self) {
        self.end_processes();
        let _ = self.cgroup.destroy();
    }

    /// The first half of [`reap`](Self::reap): every process of the sandbox is gone when
    /// it returns; the cgroup is still there.
    fn end_processes(&mut self) {
        crate::run::kill_pidfd(self.pidfd.as_fd());
        if self.lifecycle.state() != state::SandboxState::Exited {
            // Pooled (frozen) until now; an execution's sandbox was thawed at its claim.
            let _ = self.cgroup.thaw();
        }
        if !wait_readable(self.pidfd.as_fd(), REAP_WAIT) || !self.cgroup.is_empty() {
            let _ = self.cgroup.kill_all();
        }
        let _ = self.lifecycle.advance(SandboxEvent::Reaped);
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
    /// Executions that ended (their sandbox's process is a zombie of the zygote until the
    /// maintainer tells the zygote to reap).
    ended: Arc<AtomicU64>,
    /// Until when the refill waits for the execution claimed last (see
    /// [`PoolConfig::refill_defer`]).
    refill_deferred: Mutex<Option<Instant>>,
}

impl Shared {
    fn wake_maintainer(&self) {
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&self.wake, &one);
    }

    /// After a claim: refill at once, or, when the claim `left_ready` sandboxes and nobody
    /// waits, once its execution has its result (or `refill_defer` has passed). True
    /// when deferred: the execution's watcher then calls [`Shared::refill_now`].
    fn after_claim(&self, left_ready: bool) -> bool {
        let urgent = !left_ready || self.waiting.load(Ordering::SeqCst) > 0;
        match self.config.refill_defer {
            Some(d) if !urgent => {
                *self.refill_deferred.lock().unwrap() = Some(Instant::now() + d);
                self.wake_maintainer();
                true
            }
            _ => {
                self.refill_now();
                false
            }
        }
    }

    /// Lets the refill go (a deferring execution has its result, or a claim needs it).
    fn refill_now(&self) {
        *self.refill_deferred.lock().unwrap() = None;
        self.wake_maintainer();
    }

    /// How long the refill still waits, if it does.
    fn refill_wait(&self) -> Option<Duration> {
        let mut until = self.refill_deferred.lock().unwrap();
        match *until {
            Some(t) if t > Instant::now() => Some(t - Instant::now()),
            _ => {
                *until = None;
                None
            }
        }
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
            ended: Arc::new(AtomicU64::new(0)),
            refill_deferred: Mutex::new(None),
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
        let q = self.shared.queue.lock().unwrap();
        s.ready = q.len();
        s.ready_prefaulted = q.iter().filter(|p| p.prefaulted).count();
        s
    }

    /// The frozen sandboxes' cgroup directories (as [`Pool::frozen_cgroups`]), each with
    /// whether its first pages are populated ([`PoolConfig::prefault_ready`]).
    pub fn frozen_sandboxes(&self) -> Vec<(PathBuf, bool)> {
        self.shared
            .queue
            .lock()
            .unwrap()
            .iter()
            .map(|p| (p.cgroup.dir("cpuacct").to_path_buf(), p.prefaulted))
            .collect()
    }

    /// Cgroup directories of the frozen sandboxes (for monitoring and tests).
    pub fn frozen_cgroups(&self) -> Vec<PathBuf> {
        self.frozen_sandboxes()
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    }

    /// Takes a frozen sandbox (waiting for one if the pool is empty), writes `req`'s
    /// limits into its cgroup, thaws it and hands it the code. The time limit starts now.
    pub fn claim(&self, req: ExecRequest) -> Result<Execution, PoolError> {
        let asked = Instant::now();
        let (mut sandbox, deferred) = loop {
            let (next, left_ready) = self.take_frozen(asked)?;
            let deferred = self.shared.after_claim(left_ready);
            if next.is_dead() {
                // Died while frozen (the maintainer had not noticed yet): take another.
                self.shared.stats.lock().unwrap().died_frozen += 1;
                next.reap();
                continue;
            }
            break (next, deferred);
        };
        let claimed_at = Instant::now();
        let claimed_mono = monotonic_ns();
        let queued_ms = ms(claimed_at - asked);
        let pooled_ms = ms(claimed_at - sandbox.frozen_at);
        sandbox
            .lifecycle
            .advance(SandboxEvent::Claimed)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        // The code is sent while the sandbox is still frozen (inline when small, else in
        // a sealed memfd: either way the frame fits the empty socket buffer), so the
        // sandbox finds it the moment it thaws.
        let unchanged = sandbox.applied == Some(req.limits);
        let handed_over = (if unchanged {
            Ok(())
        } else {
            sandbox.cgroup.apply(&req.limits).map_err(PoolError::from)
        })
        .and_then(|_| {
            sandbox
                .channel
                .run(&req.code, req.artifacts)
                .map_err(PoolError::from)
        })
        .and_then(|_| sandbox.cgroup.thaw().map_err(PoolError::from));
        if let Err(e) = handed_over {
            let _ = sandbox.lifecycle.advance(SandboxEvent::Ended);
            sandbox.reap();
            return Err(e);
        }
        let claim_ms = ms(claimed_at.elapsed());
        {
            let mut st = self.shared.stats.lock().unwrap();
            st.claimed += 1;
            st.refills_deferred += u64::from(deferred);
        }

        let n = self.shared.next_exec.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", sandbox.id);
        // SAFETY: eventfd(2) with valid flags; the fd is owned below.
        let cancel =
            Errno::result(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
                .map_err(|e| PoolError::Io(format!("eventfd: {e}")))?;
        // SAFETY: a fresh descriptor nobody else owns.
        let cancel = Arc::new(unsafe { OwnedFd::from_raw_fd(cancel) });
        let (tx, rx) = flume::unbounded();
        let (gone_tx, gone_rx) = flume::bounded(1);
        let watcher = Watcher {
            ended_counter: Arc::clone(&self.shared.ended),
            refill_on_result: deferred.then(|| Arc::clone(&self.shared)),
            id: id.clone(),
            sandbox,
            req,
            tx,
            gone: gone_tx,
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
            flow: Flow::default(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("exec-{n}"))
            .spawn(move || watcher.run())
            .map_err(|e| PoolError::Io(format!("spawn watcher: {e}")))?;
        Ok(Execution {
            id,
            events: rx,
            cancel: Canceller(cancel),
            gone: SandboxGone(gone_rx),
            thread: Some(thread),
        })
    }

    /// The oldest frozen sandbox with its first pages populated, else the oldest, and
    /// whether others are still ready after it.
    fn take_frozen(&self, asked: Instant) -> Result<(Pooled, bool), PoolError> {
        let limit = self.shared.config.claim_timeout;
        let mut q = self.shared.queue.lock().unwrap();
        if let Some(s) = take_next(&mut q) {
            return Ok((s, !q.is_empty()));
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
            if let Some(s) = take_next(&mut q) {
                return Ok((s, !q.is_empty()));
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

/// Tells when every process of an execution's sandbox is gone.
///
/// [`Event::Finished`] is sent as soon as the result is in, while the sandbox's processes
/// may still be dying (its init was killed a moment before): the result's path does not
/// wait for the kernel to tear them down. Whoever must not overlap with them — a store
/// that lets a user's next execution start once this one is over — waits for this too.
#[derive(Clone)]
pub struct SandboxGone(flume::Receiver<()>);

impl SandboxGone {
    /// True once every process of the sandbox is gone.
    pub fn is_gone(&self) -> bool {
        self.0.is_disconnected()
    }

    /// Waits until every process of the sandbox is gone, at most `timeout`; true if they
    /// are.
    pub fn wait(&self, timeout: Duration) -> bool {
        matches!(
            self.0.recv_timeout(timeout),
            Err(flume::RecvTimeoutError::Disconnected)
        )
    }

    /// Waits, from an async task, until every process of the sandbox is gone.
    pub async fn wait_async(&self) {
        // Nothing is ever sent: the watcher drops the sender once the processes are gone.
        let _ = self.0.recv_async().await;
    }
}

/// A running execution: its events, in order, end with [`Event::Finished`].
pub struct Execution {
    pub id: String,
    events: flume::Receiver<Event>,
    cancel: Canceller,
    gone: SandboxGone,
    thread: Option<JoinHandle<()>>,
}

impl Execution {
    /// The events, in order. A `flume` channel: a thread can block on it, and an async
    /// task can await it (`recv_async`) without a thread in between.
    pub fn events(&self) -> &flume::Receiver<Event> {
        &self.events
    }

    pub fn canceller(&self) -> Canceller {
        self.cancel.clone()
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Tells when every process of the sandbox is gone (see [`SandboxGone`]).
    pub fn gone(&self) -> SandboxGone {
        self.gone.clone()
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
#[derive(Debug, Clone, PartialEq)]
enum Stop {
    Timeout,
    Cancel,
    OutputLimit,
    EventLimit,
    Violation(Violation),
}

struct Watcher {
    ended_counter: Arc<AtomicU64>,
    /// The pool whose refill waits for this execution's result.
    refill_on_result: Option<Arc<Shared>>,
    id: String,
    sandbox: Pooled,
    req: ExecRequest,
    tx: flume::Sender<Event>,
    /// Dropped once every process of the sandbox is gone (see [`SandboxGone`]).
    gone: flume::Sender<()>,
    cancel: Arc<OwnedFd>,
    claimed_at: Instant,
    claimed_mono: u64,
    timings: Timings,
    flow: Flow,
}

/// What a watcher keeps track of while the execution runs.
#[derive(Default)]
struct Flow {
    /// Bytes the code emitted so far (everything counts: see [`ExecRequest::output_limit`]).
    emitted: u64,
    /// Events sent so far (see [`ExecRequest::max_events`]).
    events: u64,
    /// Output waiting to become an event, per stream (0 stdout, 1 stderr).
    pending: [Vec<u8>; 2],
    /// When the last output event went out.
    last_output: Option<Instant>,
    /// The latest progress not sent yet, and when the last progress event went out.
    progress: Option<(f64, String)>,
    last_progress: Option<Instant>,
    truncated: [bool; 2],
    /// The pipes of child processes (0 stdout, 1 stderr) are closed.
    pipes_closed: [bool; 2],
    stop: Option<Stop>,
    ended_at: Option<Instant>,
    /// Artifacts received so far (name, bytes), in the order of their first pieces.
    artifacts: Vec<(String, Vec<u8>)>,
    artifact_bytes: u64,
    /// Artifacts already sent as events: name and size, for the result.
    sent_artifacts: Vec<(String, u64)>,
}

/// Where the sandbox is in its protocol after the claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Only `started` may come.
    AwaitingStart,
    /// Output, progress, value pieces or `finished`.
    Running,
    /// Value pieces or `finished`.
    Value,
}

impl Watcher {
    /// Watches the execution to its end. Nothing the sandbox sends (or does not send) can
    /// make this wait: every read is non-blocking, and the deadline, a cancel and the
    /// usage samples are checked on every turn.
    fn run(mut self) {
        // Opened while the sandbox starts: the final reading then costs no open.
        let usage_files = self.sandbox.cgroup.usage_files();
        let deadline = self.req.timeout.map(|t| self.claimed_at + t);
        let mut next_sample = Instant::now() + self.req.usage_interval;
        let mut phase = Phase::AwaitingStart;
        let mut chan_open = true;
        let mut exited = false;
        let mut drain_until: Option<Instant> = None;
        let mut value: Vec<u8> = Vec::new();
        let mut outcome: Option<Outcome> = None;

        loop {
            if outcome.is_some() {
                break;
            }
            if exited && !chan_open && self.flow.pipes_closed[0] && self.flow.pipes_closed[1] {
                break;
            }
            let now = Instant::now();
            if drain_until.is_some_and(|d| now >= d) {
                break;
            }
            let mut wake = next_sample;
            if let (Some(d), None) = (deadline, &self.flow.stop) {
                wake = wake.min(d);
            }
            if let Some(d) = drain_until {
                wake = wake.min(d);
            }
            if let Some(t) = self.output_due() {
                wake = wake.min(t);
            }
            if let Some(t) = self.progress_due() {
                wake = wake.min(t);
            }
            let timeout = wake.saturating_duration_since(now);
            // Round up to whole milliseconds so a wake-up is never early (no spinning).
            let timeout_ms = timeout.as_micros().div_ceil(1000).min(60_000) as u16;
            let sb = &self.sandbox;
            let mut fds: Vec<PollFd> = Vec::with_capacity(5);
            let mut which: Vec<u8> = Vec::with_capacity(5);
            for (w, fd) in [(0u8, sb.stdout.as_fd()), (1, sb.stderr.as_fd())] {
                if !self.flow.pipes_closed[w as usize] {
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                    which.push(w);
                }
            }
            if chan_open {
                fds.push(PollFd::new(sb.channel.fd(), PollFlags::POLLIN));
                which.push(2);
            }
            if !exited {
                fds.push(PollFd::new(sb.pidfd.as_fd(), PollFlags::POLLIN));
                which.push(3);
            }
            if self.flow.stop.is_none() {
                fds.push(PollFd::new(self.cancel.as_fd(), PollFlags::POLLIN));
                which.push(4);
            }
            let ready: Vec<u8> = match poll(&mut fds, PollTimeout::from(timeout_ms)) {
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
            if ready.contains(&4) && self.flow.stop.is_none() {
                self.end(Stop::Cancel);
            }
            if let (Some(d), None) = (deadline, &self.flow.stop) {
                if now >= d {
                    self.end(Stop::Timeout);
                }
            }
            if now >= next_sample {
                let usage = usage_files.read();
                self.emit(Event::Usage(usage));
                next_sample = now + self.req.usage_interval;
            }
            // The channel first: runtime output travels on it in order with progress and
            // the result; what child processes wrote to the pipes before a progress report
            // or the result is drained just before that is handled.
            if chan_open && ready.contains(&2) {
                let mut read = 0usize;
                while chan_open && read < READ_BUDGET && outcome.is_none() {
                    match self.sandbox.channel.read() {
                        Ok(ReadOutcome::Data(n)) => read += n,
                        Ok(ReadOutcome::WouldBlock) => break,
                        Ok(ReadOutcome::Closed) => chan_open = false,
                        Err(v) => {
                            chan_open = false;
                            self.violation(v);
                        }
                    }
                    // Frames are handled as they complete, so a result is acted on at once.
                    while chan_open && outcome.is_none() {
                        let frame = match self.sandbox.channel.next_frame() {
                            Ok(Some(f)) => f,
                            Ok(None) => break,
                            Err(v) => {
                                chan_open = false;
                                self.violation(v);
                                break;
                            }
                        };
                        match self.handle(frame, &mut phase, &mut value) {
                            Ok(Some(o)) => outcome = Some(o),
                            Ok(None) => {}
                            Err(v) => {
                                chan_open = false;
                                self.violation(v);
                            }
                        }
                    }
                    if self.flow.stop.is_some() {
                        // Killed: what the channel still holds is not wanted any more.
                        chan_open = false;
                    }
                }
            }
            for w in [0u8, 1] {
                if ready.contains(&w) && !self.flow.pipes_closed[w as usize] {
                    self.pump(w);
                }
            }
            if ready.contains(&3) && !exited {
                exited = true;
                self.flow.ended_at.get_or_insert_with(Instant::now);
                // Everything in the pid namespace died with its init: the pipes and the
                // channel drain quickly. Bound it anyway.
                drain_until = Some(Instant::now() + Duration::from_secs(2));
            }
            if outcome.is_none() {
                let now = Instant::now();
                if self.output_due().is_some_and(|t| now >= t) {
                    self.flush_output();
                }
                if self.progress_due().is_some_and(|t| now >= t) {
                    self.flush_progress();
                }
            }
        }
        // A result is in, or the sandbox is gone: nothing of it runs on (the cgroup is
        // killed and removed in the teardown, after the report).
        crate::run::kill_pidfd(self.sandbox.pidfd.as_fd());
        self.drain_pipes();
        self.flush_output();
        self.flush_progress();
        let usage = usage_files.read();
        self.timings.total_ms =
            ms(self.flow.ended_at.unwrap_or_else(Instant::now) - self.claimed_at);
        let (status, error) = match (&self.flow.stop, &outcome) {
            (Some(Stop::Timeout), _) => {
                (ExecStatus::TimedOut, Some("time limit reached".to_string()))
            }
            (Some(Stop::Cancel), _) => (ExecStatus::Cancelled, Some("cancelled".to_string())),
            (Some(Stop::OutputLimit), _) => (
                ExecStatus::OutputLimit,
                Some(format!(
                    "the code emitted more than {} bytes (output, progress messages and value)",
                    self.req.output_limit
                )),
            ),
            (Some(Stop::EventLimit), _) => (
                ExecStatus::OutputLimit,
                Some(format!(
                    "the execution produced more than {} events",
                    self.req.max_events
                )),
            ),
            (Some(Stop::Violation(v)), _) => (
                ExecStatus::ProtocolViolation,
                Some(format!("protocol violation: {v}")),
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
                Some("the sandbox died before reporting a result".into()),
            ),
        };
        let result = ExecResult {
            id: self.id.clone(),
            status,
            outcome: outcome.unwrap_or_default(),
            error,
            timings: self.timings,
            usage,
            stdout_truncated: self.flow.truncated[0],
            stderr_truncated: self.flow.truncated[1],
            artifacts: std::mem::take(&mut self.flow.sent_artifacts),
        };
        if self.flow.stop.is_some() {
            // Stopped mid-run (cancel, time or output limit): the result says the code is
            // dead only once every process of the sandbox is gone, so whoever acts on it
            // (a displaced user's next execution) never overlaps with it.
            let _ = self.sandbox.cgroup.kill_all();
        }
        let _ = self.tx.send(Event::Finished(Box::new(result)));
        if let Some(pool) = self.refill_on_result.take() {
            pool.refill_now();
        }
        let _ = self.sandbox.lifecycle.advance(SandboxEvent::Ended);
        // Teardown after the result: off the claim path and off the result's path.
        let mut sandbox = self.sandbox;
        sandbox.end_processes();
        drop(self.gone);
        let _ = sandbox.cgroup.destroy();
        self.ended_counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Acts on one frame; `Ok(Some(outcome))` when it was the result.
    fn handle(
        &mut self,
        frame: FromSandbox,
        phase: &mut Phase,
        value: &mut Vec<u8>,
    ) -> Result<Option<Outcome>, Violation> {
        let out_of_order = |expected: &'static str, frame: &FromSandbox| {
            Err(Violation::OutOfOrder {
                expected,
                received: frame.name(),
            })
        };
        match (*phase, frame) {
            (Phase::AwaitingStart, FromSandbox::Started { monotonic_ns }) => {
                // The sandbox's own clock reading is accepted only inside the window the
                // agent saw: after the claim, before this frame arrived.
                if monotonic_ns < self.claimed_mono || monotonic_ns > monotonic_ns_now() {
                    return Err(Violation::StartOutsideWindow);
                }
                let after = (monotonic_ns - self.claimed_mono) as f64 / 1e6;
                self.timings.start_ms = Some(after);
                *phase = Phase::Running;
                self.emit(Event::Started {
                    after_claim_ms: after,
                });
                Ok(None)
            }
            (Phase::AwaitingStart, other) => out_of_order("started", &other),
            (Phase::Running, FromSandbox::Output { stream, data }) => {
                let w = match stream {
                    Stream::Stdout => 0,
                    Stream::Stderr => 1,
                };
                self.accept_output(w, &data);
                Ok(None)
            }
            (Phase::Running, FromSandbox::Progress { fraction, message }) => {
                self.drain_pipes();
                if self.charge(message.len()) {
                    self.flow.progress = Some((fraction, message));
                    if self.progress_due().is_some_and(|t| Instant::now() >= t) {
                        self.flush_progress();
                    }
                }
                Ok(None)
            }
            (Phase::Running, FromSandbox::Artifact { name, data }) => {
                self.accept_artifact(name, data)?;
                Ok(None)
            }
            (Phase::Running | Phase::Value, FromSandbox::Value(piece)) => {
                *phase = Phase::Value;
                if self.charge(piece.len()) {
                    value.extend_from_slice(&piece);
                }
                Ok(None)
            }
            (Phase::Running | Phase::Value, FromSandbox::Finished(mut outcome)) => {
                if !value.is_empty() {
                    let text = String::from_utf8(std::mem::take(value)).map_err(|_| {
                        Violation::Malformed {
                            kind: "value",
                            reason: "not UTF-8".into(),
                        }
                    })?;
                    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_err() {
                        return Err(Violation::Malformed {
                            kind: "value",
                            reason: "not JSON".into(),
                        });
                    }
                    outcome.value_json = Some(text);
                }
                let texts: usize = outcome.warnings.iter().map(|w| w.len()).sum::<usize>()
                    + outcome.error.as_ref().map_or(0, |e| e.message.len());
                self.charge(texts);
                for (name, data) in std::mem::take(&mut self.flow.artifacts) {
                    self.flow
                        .sent_artifacts
                        .push((name.clone(), data.len() as u64));
                    self.emit(Event::Artifact { name, data });
                }
                // The result is in: the sandbox is killed now, whatever it does next (its
                // init's death takes its whole pid namespace; the cgroup is emptied and
                // removed after the result is out).
                self.flow.ended_at.get_or_insert_with(Instant::now);
                crate::run::kill_pidfd(self.sandbox.pidfd.as_fd());
                Ok(Some(outcome))
            }
            (Phase::Running, other) => out_of_order("output, progress, value or finished", &other),
            (Phase::Value, other) => out_of_order("value or finished", &other),
        }
    }

    /// A piece of an artifact: appended under its name, within the limits the run asked
    /// for. The sandbox's sender keeps within them, so anything beyond is a violation,
    /// as is an artifact nobody asked for.
    fn accept_artifact(&mut self, name: String, data: Vec<u8>) -> Result<(), Violation> {
        let bad = |reason: &str| Violation::Malformed {
            kind: "artifact",
            reason: reason.into(),
        };
        let Some(limits) = self.req.artifacts else {
            return Err(bad("no artifacts were asked for"));
        };
        self.flow.artifact_bytes = self.flow.artifact_bytes.saturating_add(data.len() as u64);
        if self.flow.artifact_bytes > limits.max_bytes {
            return Err(bad("more artifact bytes than the limit"));
        }
        let count = self.flow.artifacts.len();
        match self.flow.artifacts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, bytes)) => bytes.extend_from_slice(&data),
            None if count >= limits.max_count as usize => {
                return Err(bad("more artifacts than the limit"));
            }
            None => self.flow.artifacts.push((name, data)),
        }
        Ok(())
    }

    /// Ends the execution for `why` (the first reason wins) and kills the sandbox.
    fn end(&mut self, why: Stop) {
        if self.flow.stop.is_none() {
            self.flow.stop = Some(why);
            self.flow.ended_at.get_or_insert_with(Instant::now);
        }
        self.kill();
    }

    fn violation(&mut self, v: Violation) {
        self.end(Stop::Violation(v));
    }

    fn kill(&self) {
        crate::run::kill_pidfd(self.sandbox.pidfd.as_fd());
        let _ = self.sandbox.cgroup.kill_all();
    }

    /// Counts `n` emitted bytes; false (and the execution ends) when they pass the limit.
    fn charge(&mut self, n: usize) -> bool {
        self.flow.emitted = self.flow.emitted.saturating_add(n as u64);
        if self.flow.emitted > self.req.output_limit {
            self.end(Stop::OutputLimit);
            return false;
        }
        true
    }

    /// Sends an event, counting it against the event cap.
    fn emit(&mut self, event: Event) {
        if !matches!(event, Event::Finished(_)) {
            self.flow.events += 1;
            if self.flow.events > self.req.max_events {
                self.end(Stop::EventLimit);
                return;
            }
        }
        let _ = self.tx.send(event);
    }

    /// Output of stream `w`: counted, cut at the limit, merged with what waits.
    fn accept_output(&mut self, w: usize, data: &[u8]) {
        if self.flow.stop.is_some() && self.flow.stop != Some(Stop::OutputLimit) {
            return;
        }
        let room = self.req.output_limit.saturating_sub(self.flow.emitted) as usize;
        let take = data.len().min(room);
        if !self.flow.pending[1 - w].is_empty() {
            // Keep the order of the two streams.
            self.flush_stream(1 - w);
        }
        self.flow.pending[w].extend_from_slice(&data[..take]);
        while self.flow.pending[w].len() >= MAX_DATA {
            let cut = utf8_cut(&self.flow.pending[w], MAX_DATA);
            let rest = self.flow.pending[w].split_off(cut);
            let chunk = std::mem::replace(&mut self.flow.pending[w], rest);
            self.send_output(w, chunk);
        }
        if take < data.len() {
            self.flow.truncated[w] = true;
        }
        self.charge(data.len());
    }

    /// When waiting output is due to become an event.
    fn output_due(&self) -> Option<Instant> {
        if self.flow.pending[0].is_empty() && self.flow.pending[1].is_empty() {
            return None;
        }
        // The first output is due at once (the claim lies in the past).
        Some(match self.flow.last_output {
            Some(t) => t + OUTPUT_INTERVAL,
            None => self.claimed_at,
        })
    }

    fn progress_due(&self) -> Option<Instant> {
        self.flow.progress.as_ref()?;
        Some(match self.flow.last_progress {
            Some(t) => t + PROGRESS_INTERVAL,
            None => self.claimed_at,
        })
    }

    fn flush_output(&mut self) {
        self.flush_stream(0);
        self.flush_stream(1);
    }

    fn flush_stream(&mut self, w: usize) {
        while !self.flow.pending[w].is_empty() {
            let cut = utf8_cut(&self.flow.pending[w], MAX_DATA);
            let rest = self.flow.pending[w].split_off(cut);
            let chunk = std::mem::replace(&mut self.flow.pending[w], rest);
            self.send_output(w, chunk);
        }
    }

    fn send_output(&mut self, w: usize, data: Vec<u8>) {
        self.flow.last_output = Some(Instant::now());
        self.emit(if w == 0 {
            Event::Stdout { data }
        } else {
            Event::Stderr { data }
        });
    }

    fn flush_progress(&mut self) {
        if let Some((fraction, message)) = self.flow.progress.take() {
            // Output that came before it goes first.
            self.flush_output();
            self.flow.last_progress = Some(Instant::now());
            self.emit(Event::Progress { fraction, message });
        }
    }

    /// Reads both pipes until they are empty (bounded).
    fn drain_pipes(&mut self) {
        for w in [0u8, 1] {
            if !self.flow.pipes_closed[w as usize] {
                self.pump(w);
            }
        }
    }

    /// Reads what a pipe holds now, up to [`READ_BUDGET`] bytes.
    fn pump(&mut self, which: u8) {
        let mut buf = [0u8; 16 << 10];
        let mut read = 0usize;
        while read < READ_BUDGET {
            let fd = if which == 0 {
                self.sandbox.stdout.as_fd()
            } else {
                self.sandbox.stderr.as_fd()
            };
            match nix::unistd::read(fd, &mut buf) {
                Ok(0) => {
                    self.flow.pipes_closed[which as usize] = true;
                    return;
                }
                Ok(n) => {
                    read += n;
                    self.accept_output(which as usize, &buf[..n]);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.flow.pipes_closed[which as usize] = true;
                    return;
                }
            }
        }
    }
}

/// Where to cut `data` at most `max` bytes in: before an incomplete UTF-8 sequence when
/// the bytes there are UTF-8 (so text stays whole across events), else at `max`.
fn utf8_cut(data: &[u8], max: usize) -> usize {
    if data.len() <= max {
        return data.len();
    }
    for back in 0..4 {
        let cut = max - back;
        if cut == 0 {
            break;
        }
        // A cut before a byte that does not continue a sequence splits no character.
        if data[cut] & 0xC0 != 0x80 {
            return cut;
        }
    }
    max
}

fn monotonic_ns_now() -> u64 {
    monotonic_ns()
}

/// The maintainer: owns the zygote, keeps the pool full.
struct Maintainer {
    shared: Arc<Shared>,
    zygote: Option<Zygote>,
    slot: u64,
    /// The `ended` count when the zygote was last told to reap.
    reaped_at: u64,
    backoff: Duration,
    /// A fork into a cgroup failed for a reason that will not go away (the kernel's
    /// permission or support): this pool moves its sandboxes into their cgroups from now.
    into_cgroup_refused: bool,
}

struct Zygote {
    launcher: Child,
    ctl: ControlChannel,
    root: CgroupRoot,
    /// Its sandboxes are born in their cgroups ([`PoolConfig::clone_into_cgroup`]).
    into_cgroup: bool,
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
            reaped_at: 0,
            backoff: Duration::from_millis(200),
            into_cgroup_refused: false,
        }
    }

    /// Whether the next zygote's sandboxes are born in their cgroups: asked for, cgroup
    /// v2, not refused before, and the zygote's host uid may write the parent's
    /// `cgroup.procs` (the common ancestor of its cgroup and theirs).
    fn may_fork_into_cgroups(&self) -> bool {
        let cfg = &self.shared.config;
        let root = &self.shared.root;
        if !cfg.clone_into_cgroup
            || self.into_cgroup_refused
            || root.version() != crate::cgroup::CgroupVersion::V2
        {
            return false;
        }
        match root.let_procs_be_written_by(Some((cfg.userns_base, cfg.userns_base))) {
            Ok(()) => true,
            Err(e) => {
                self.shared.note_error(format!(
                    "sandboxes are moved into their cgroups after their fork: {e}"
                ));
                false
            }
        }
    }

    /// A new sandbox's cgroup, with the pool's default limits and refill weight.
    fn new_cgroup(&self) -> Result<(String, SandboxCgroup), PoolError> {
        let cfg = &self.shared.config;
        let name = crate::gc::unique_name("sb");
        let cgroup = self.shared.root.create(&name)?;
        let prepared = cfg
            .default_limits
            .as_ref()
            .map_or(Ok(()), |limits| cgroup.apply(limits))
            // Its containment is background work too, until it is frozen ready (pool_it).
            .and_then(|()| {
                cfg.refill_cpu_weight
                    .map_or(Ok(()), |weight| cgroup.set_cpu_weight(weight))
            });
        match prepared {
            Ok(()) => Ok((name, cgroup)),
            Err(e) => {
                let _ = cgroup.destroy();
                Err(e.into())
            }
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
            self.trim();
            // A refill waiting for the execution claimed last (its watcher, or the
            // deadline, ends the wait).
            if let Some(wait) = self.shared.refill_wait() {
                self.sleep(wait.max(Duration::from_millis(1)));
                let mut counter = [0u8; 8];
                let _ = nix::unistd::read(&self.shared.wake, &mut counter);
                continue;
            }
            if let Err(e) = self.refill() {
                self.sandbox_failed(&e);
                if self.zygote_dead() {
                    self.zygote = None;
                }
            }
            if self.zygote.is_none() {
                continue;
            }
            // Ended executions left zombies in the zygote: it may reap them now (this
            // thread is the only one that places sandboxes, and it is done).
            let ended = self.shared.ended.load(Ordering::SeqCst);
            if ended != self.reaped_at {
                self.reaped_at = ended;
                if let Some(z) = &self.zygote {
                    let _ = z.ctl.reap();
                }
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

    /// Reaps frozen sandboxes beyond the pool's size and the claims waiting (a sandbox
    /// forked for a claim is not reaped before the claim takes it): the newest first
    /// (the oldest have waited longest and are claimed next), those without populated
    /// pages before those with.
    fn trim(&self) {
        let extra: Vec<Pooled> = {
            let mut q = self.shared.queue.lock().unwrap();
            let want = self
                .shared
                .target
                .load(Ordering::SeqCst)
                .max(self.shared.waiting.load(Ordering::SeqCst));
            let mut n = q.len().saturating_sub(want);
            let mut extra = Vec::with_capacity(n);
            for populated in [false, true] {
                let mut i = q.len();
                while n > 0 && i > 0 {
                    i -= 1;
                    if q[i].prefaulted == populated {
                        extra.extend(q.remove(i));
                        n -= 1;
                    }
                }
            }
            extra
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
        let into_cgroup = self.may_fork_into_cgroups();
        let mut cmd = Command::new(&cfg.sandbox_bin);
        cmd.arg("run")
            .arg("--rootfs")
            .arg(&cfg.rootfs)
            .args(["--userns", "--userns-root", "--pass-fd", "3"])
            // Per uid of the zygote's namespace, i.e. per sandbox: a few inotify
            // instances and watches; and no nested user namespaces at all.
            .arg(format!(
                "--userns-sysctl=max_inotify_instances={}",
                cfg.inotify_instances
            ))
            .arg(format!(
                "--userns-sysctl=max_inotify_watches={}",
                cfg.inotify_watches
            ))
            .arg("--userns-sysctl=max_user_namespaces=0")
            .arg("--userns-base")
            .arg(cfg.userns_base.to_string())
            .arg("--ro-bind")
            .arg(format!("{}:{ZYGOTE_PATH_INSIDE}", cfg.zygote_bin.display()));
        // Set before the zygote's libraries load: a BLAS that reads its thread count in
        // a library constructor (OpenBLAS) would otherwise start its pool before main.
        for (k, v) in crate::spec::SINGLE_THREAD_ENV {
            cmd.arg(format!("--env={k}={v}"));
        }
        cmd.args(["--hostname", "zygote", "--output-limit", "1G"])
            // The zygote lives as long as the pool; it is single-threaded and bounded by
            // its memory limit.
            .args(["--timeout", "none", "--cpus", "unlimited", "--pids", "64"])
            .arg("--memory")
            .arg(cfg.zygote_memory.to_string())
            .arg("--cgroup-parent")
            .arg(&cfg.cgroup_parent);
        if let Some(weight) = cfg.refill_cpu_weight {
            cmd.arg("--cpu-weight").arg(weight.to_string());
        }
        if into_cgroup {
            // The sandboxes' cgroups are its siblings: a namespace rooted at its own
            // cgroup would hide them (each sandbox enters a namespace of its own).
            cmd.arg("--keep-cgroup-namespace");
        }
        for b in &cfg.binds {
            cmd.arg("--ro-bind")
                .arg(format!("{}:{}", b.source.display(), b.target.display()));
        }
        cmd.arg("--")
            .arg(ZYGOTE_PATH_INSIDE)
            .args(["--ctl-fd", "3"])
            .arg("--hostname")
            .arg(&cfg.hostname)
            .arg("--tmp-size")
            .arg(cfg.tmp_size.to_string())
            .arg("--work-size")
            .arg(cfg.work_size.to_string())
            .arg("--file-size-limit")
            .arg(cfg.rlimits.file_size.to_string())
            .arg("--open-files")
            .arg(cfg.rlimits.open_files.to_string())
            .arg("--processes")
            .arg(cfg.rlimits.processes.to_string())
            .arg("--locked-memory")
            .arg(cfg.rlimits.locked_memory.to_string())
            .arg("--message-queues")
            .arg(cfg.rlimits.message_queues.to_string())
            .arg("--pending-signals")
            .arg(cfg.rlimits.pending_signals.to_string());
        for b in &cfg.binds {
            cmd.arg("--rebind").arg(&b.target);
        }
        if cfg.one_off {
            cmd.arg("--one-off");
        }
        if !cfg.huge_pages {
            cmd.arg("--no-huge-pages");
        }
        if !cfg.prefault {
            cmd.arg("--no-prefault");
        }
        match &cfg.language {
            Language::R { packages } | Language::Python { packages } => {
                cmd.args(["--language", cfg.language.name()]);
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
            into_cgroup,
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
                huge_bytes,
                huge_eligible_bytes,
                prefault_written_pages,
                prefault_mapped_pages,
                ..
            }) => {
                let mut st = self.shared.stats.lock().unwrap();
                st.zygote_starts += 1;
                st.zygote_init_ms = init_ms;
                st.zygote_preload_ms = preload_ms;
                st.zygote_huge_bytes = huge_bytes;
                st.zygote_huge_eligible_bytes = huge_eligible_bytes;
                st.prefault_written_pages = prefault_written_pages;
                st.prefault_mapped_pages = prefault_mapped_pages;
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

    /// How many more sandboxes the pool wants now (its size, or the claims waiting).
    fn missing(&self) -> usize {
        // Under the queue's lock: a claim takes its sandbox and stops waiting under it,
        // so a sandbox just taken is not counted as missing for the claim that took it.
        let q = self.shared.queue.lock().unwrap();
        let want = self
            .shared
            .target
            .load(Ordering::SeqCst)
            .max(self.shared.waiting.load(Ordering::SeqCst));
        want.saturating_sub(q.len())
    }

    /// Refills the pool, with up to `forks_in_flight` sandboxes on their way at once:
    /// the zygote forks the next one while the last ones wait for their cgroup attach
    /// (on cgroup v1 the first attach after a quiet spell waits for an RCU grace period)
    /// and finish their containment in their own processes. Each sandbox goes to the
    /// pool as soon as it is ready and frozen; the number asked follows demand as it
    /// changes meanwhile. A sandbox that fails is cleaned up and counted, and no new one
    /// is asked after it; `Err` means the zygote itself did not answer as it should.
    fn refill(&mut self) -> Result<(), PoolError> {
        let timeout = self.shared.config.start_timeout;
        // Asked of the zygote, in order (it answers in order), with their deadlines.
        let mut asked: VecDeque<Asked> = VecDeque::new();
        let mut placing: Vec<(Placing, Instant)> = Vec::new();
        let mut failed = false;
        let result = loop {
            while !failed
                && !self.shared.stop.load(Ordering::SeqCst)
                && asked.len() + placing.len()
                    < self
                        .shared
                        .config
                        .forks_in_flight
                        .max(1)
                        .min(self.missing())
            {
                let prefault = self.wants_prefault(&asked, &placing);
                match self.ask_fork(Instant::now() + timeout, prefault) {
                    Ok(a) => {
                        asked.push_back(a);
                        let mut st = self.shared.stats.lock().unwrap();
                        st.most_in_flight = st.most_in_flight.max(asked.len() + placing.len());
                    }
                    Err(e) => {
                        failed = true;
                        self.sandbox_failed(&e);
                    }
                }
            }
            if asked.is_empty() && placing.is_empty() {
                break Ok(());
            }
            // Every sandbox that is ready goes to the pool now; one past its deadline, or
            // that said anything but ready, is abandoned. A zygote past its own deadline
            // stops it all.
            let now = Instant::now();
            let mut i = 0;
            while i < placing.len() {
                let outcome = match placing[i].0.channel.try_ready() {
                    Ok(false) if now < placing[i].1 => {
                        i += 1;
                        continue;
                    }
                    Ok(false) => Err(PoolError::Channel(FrameError::Unexpected {
                        expected: "ready",
                        received: format!("nothing within {timeout:?}"),
                    })),
                    Ok(true) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                let (p, _) = placing.swap_remove(i);
                let pooled = match outcome {
                    Ok(()) => self.pool_it(p),
                    Err(e) => {
                        p.abandon();
                        Err(e)
                    }
                };
                if let Err(e) = pooled {
                    failed = true;
                    self.sandbox_failed(&e);
                }
            }
            if asked.front().is_some_and(|a| now >= a.due) {
                break Err(PoolError::Zygote("no answer to a fork request".into()));
            }
            if asked.is_empty() && placing.is_empty() {
                continue;
            }
            // Wait for the zygote's next answer or a sandbox's ready.
            let due = asked
                .iter()
                .map(|a| a.due)
                .chain(placing.iter().map(|(_, d)| *d))
                .min()
                .unwrap_or(now);
            let zygote_ready = {
                let Some(z) = self.zygote.as_ref() else {
                    break Err(PoolError::Zygote("not running".into()));
                };
                let mut fds: Vec<PollFd> = Vec::with_capacity(1 + placing.len());
                if !asked.is_empty() {
                    fds.push(PollFd::new(z.ctl.fd(), PollFlags::POLLIN));
                }
                fds.extend(
                    placing
                        .iter()
                        .map(|(p, _)| PollFd::new(p.channel.fd(), PollFlags::POLLIN)),
                );
                let ms = due
                    .saturating_duration_since(now)
                    .as_millis()
                    .clamp(1, 60_000);
                let _ = poll(
                    &mut fds,
                    PollTimeout::try_from(ms as i32).unwrap_or(PollTimeout::MAX),
                );
                !asked.is_empty() && fds[0].revents().is_some_and(|r| !r.is_empty())
            };
            if zygote_ready {
                let a = asked.pop_front().expect("a fork was asked");
                let due = a.due;
                match self.receive_fork(a) {
                    Ok(p) => placing.push((p, due)),
                    Err(Received::Sandbox(e)) => {
                        failed = true;
                        self.sandbox_failed(&e);
                    }
                    Err(Received::Zygote(e)) => break Err(e),
                }
            }
        };
        if result.is_err() {
            for (p, _) in placing {
                p.abandon();
            }
        }
        // Forks still unanswered (the zygote failed): their cgroups go.
        for a in asked {
            a.abandon();
        }
        result
    }

    /// Whether the next fork is to populate its first pages: while fewer sandboxes than
    /// [`PoolConfig::prefault_ready`] and the claims waiting are populated, ready or on
    /// their way (`asked`, `placing`).
    fn wants_prefault(&self, asked: &VecDeque<Asked>, placing: &[(Placing, Instant)]) -> bool {
        let cfg = &self.shared.config;
        if !cfg.prefault {
            return false;
        }
        let q = self.shared.queue.lock().unwrap();
        let wanted = cfg
            .prefault_ready
            .saturating_add(self.shared.waiting.load(Ordering::SeqCst));
        let ready = q.iter().filter(|p| p.prefaulted).count();
        drop(q);
        let on_their_way = asked.iter().filter(|a| a.prefault).count()
            + placing.iter().filter(|(p, _)| p.prefaulted).count();
        ready + on_their_way < wanted
    }

    /// Counts and reports a sandbox that could not be added to the pool.
    fn sandbox_failed(&self, e: &PoolError) {
        self.shared.stats.lock().unwrap().failed_forks += 1;
        self.shared
            .note_error(format!("fork of a sandbox failed: {e}"));
    }

    /// Asks the zygote for one more sandbox, born in a cgroup made ready for it when the
    /// zygote's sandboxes are; with `prefault`, one that populates its first pages.
    fn ask_fork(&mut self, due: Instant, prefault: bool) -> Result<Asked, PoolError> {
        let cfg = &self.shared.config;
        let z = self
            .zygote
            .as_ref()
            .ok_or_else(|| PoolError::Zygote("not running".into()))?;
        self.slot += 1;
        // Each sandbox its own uid, in turn: no two live sandboxes share one.
        let uid = cfg.uid_first + (self.slot % cfg.uid_count.max(1) as u64) as u32;
        let mut asked = Asked {
            slot: self.slot,
            due,
            prefault,
            born_in: None,
        };
        if !z.into_cgroup {
            z.ctl.request_fork(self.slot, uid, None, prefault)?;
            return Ok(asked);
        }
        let (name, cgroup) = self.new_cgroup()?;
        // The zygote may write its cgroup.procs (the kernel's condition for a fork into
        // it) until its answer comes (place).
        let sent = cgroup
            .let_procs_be_written_by(Some((cfg.userns_base, cfg.userns_base)))
            .and_then(|()| crate::cgroup::v2::dir_fd(&cgroup))
            .map_err(PoolError::from)
            .and_then(|dir| {
                Ok(z.ctl
                    .request_fork(self.slot, uid, Some(dir.as_fd()), prefault)?)
            });
        asked.born_in = Some((name, cgroup));
        match sent {
            Ok(()) => Ok(asked),
            Err(e) => {
                asked.abandon();
                Err(e)
            }
        }
    }

    /// Reads the zygote's answer for `asked` (an answer for an earlier slot, left over
    /// from a refill that gave up on it, is dropped: its sandbox dies with its
    /// descriptors), then places the sandbox in a cgroup of its own, unless it was born
    /// in one, and lets it finish its containment.
    fn receive_fork(&mut self, asked: Asked) -> Result<Placing, Received> {
        let timeout = self.shared.config.start_timeout;
        let slot = asked.slot;
        let z = match self.zygote.as_ref() {
            Some(z) => z,
            None => {
                asked.abandon();
                return Err(Received::Zygote(PoolError::Zygote("not running".into())));
            }
        };
        // A fork into its cgroup that the kernel will refuse every time.
        let mut refused_for_good = false;
        let answer = loop {
            let (msg, fds) = match z.ctl.recv() {
                Ok(m) => m,
                Err(e) => break Err(Received::Zygote(e.into())),
            };
            match msg {
                FromZygote::Forked { slot: s } if s == slot => break Ok(fds),
                FromZygote::ForkFailed {
                    slot: s,
                    error,
                    errno,
                } if s == slot => {
                    refused_for_good =
                        asked.born_in.is_some() && errno.is_some_and(into_cgroup_refused);
                    break Err(Received::Sandbox(PoolError::Zygote(if refused_for_good {
                        format!(
                            "the kernel refused a fork into its cgroup ({error}): sandboxes \
                             are moved into their cgroups after their fork from now on"
                        )
                    } else {
                        error
                    })));
                }
                FromZygote::Forked { slot: s } | FromZygote::ForkFailed { slot: s, .. }
                    if s < slot =>
                {
                    if let Some(pidfd) = fds.first() {
                        crate::run::kill_pidfd(pidfd.as_fd());
                    }
                    if !wait_readable(z.ctl.fd(), timeout) {
                        break Err(Received::Zygote(PoolError::Zygote(
                            "no answer to a fork request".into(),
                        )));
                    }
                }
                other => {
                    break Err(Received::Zygote(PoolError::Channel(
                        FrameError::Unexpected {
                            expected: "forked",
                            received: format!("{other:?}"),
                        },
                    )))
                }
            }
        };
        if refused_for_good {
            self.into_cgroup_refused = true;
            if let Some(z) = self.zygote.as_mut() {
                z.into_cgroup = false;
            }
        }
        let fds = answer.and_then(|fds| {
            <[OwnedFd; 4]>::try_from(fds).map_err(|_| {
                Received::Zygote(PoolError::Zygote(
                    "a fork arrived without its descriptors".into(),
                ))
            })
        });
        let fds = match fds {
            Ok(fds) => fds,
            Err(e) => {
                asked.abandon();
                return Err(e);
            }
        };
        self.place(fds, asked).map_err(Received::Sandbox)
    }

    /// Puts the sandbox forked for `asked` (its descriptors: pidfd, channel, stdout,
    /// stderr) in a cgroup of its own (with the pool's default limits) and tells it so:
    /// it then finishes its containment and reports ready. One born in its cgroup is
    /// there already and has gone on without waiting: the zygote's right to write that
    /// cgroup's `cgroup.procs` ends here.
    fn place(
        &self,
        [pidfd, chan, stdout, stderr]: [OwnedFd; 4],
        asked: Asked,
    ) -> Result<Placing, PoolError> {
        let Asked {
            born_in, prefault, ..
        } = asked;
        let mut lifecycle = Lifecycle::default();
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
        let born = born_in.is_some();
        let (name, cgroup) = match born_in {
            Some((name, cgroup)) => {
                if let Err(e) = cgroup.let_procs_be_written_by(None) {
                    return fail(&pidfd, Some(cgroup), e.into());
                }
                self.shared.stats.lock().unwrap().born_in_cgroup += 1;
                (name, cgroup)
            }
            None => {
                let Some(host_pid) = pid_of_pidfd(pidfd.as_fd()) else {
                    return fail(
                        &pidfd,
                        None,
                        PoolError::Io("cannot read the sandbox's pid".into()),
                    );
                };
                let (name, cgroup) = match self.new_cgroup() {
                    Ok(c) => c,
                    Err(e) => return fail(&pidfd, None, e),
                };
                if let Err(e) = cgroup.add_process(host_pid) {
                    return fail(&pidfd, Some(cgroup), e.into());
                }
                (name, cgroup)
            }
        };
        lifecycle
            .advance(SandboxEvent::Placed)
            .map_err(|e| PoolError::Io(e.to_string()))?;
        let channel = SandboxChannel::new(chan);
        for pipe in [&stdout, &stderr] {
            // The watcher reads the pipes until they are empty: never block on them.
            let _ = nix::fcntl::fcntl(
                pipe,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
            );
        }
        if !born {
            if let Err(e) = channel.placed() {
                return fail(&pidfd, Some(cgroup), e.into());
            }
        }
        Ok(Placing {
            name,
            prefaulted: prefault,
            lifecycle,
            cgroup,
            pidfd,
            channel,
            stdout,
            stderr,
        })
    }

    /// Freezes a sandbox that reported ready and adds it to the pool.
    fn pool_it(&self, mut p: Placing) -> Result<(), PoolError> {
        if let Err(e) = p.cgroup.freeze() {
            p.abandon();
            return Err(e.into());
        }
        // Claimed, it runs at a sandbox's weight: set now, off the claim's path.
        if self.shared.config.refill_cpu_weight.is_some() {
            if let Err(e) = p.cgroup.set_cpu_weight(crate::cgroup::DEFAULT_CPU_WEIGHT) {
                p.abandon();
                return Err(e.into());
            }
        }
        if let Err(e) = p.lifecycle.advance(SandboxEvent::Ready) {
            p.abandon();
            return Err(PoolError::Io(e.to_string()));
        }
        let pooled = Pooled {
            applied: self.shared.config.default_limits,
            prefaulted: p.prefaulted,
            id: p.name,
            lifecycle: p.lifecycle,
            cgroup: p.cgroup,
            pidfd: p.pidfd,
            channel: p.channel,
            stdout: p.stdout,
            stderr: p.stderr,
            frozen_at: Instant::now(),
        };
        {
            let mut st = self.shared.stats.lock().unwrap();
            st.forked += 1;
            st.forked_prefaulted += u64::from(pooled.prefaulted);
        }
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
