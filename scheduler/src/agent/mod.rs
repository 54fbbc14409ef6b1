//! The per-host agent: it drives this host's warm pools (one per language) and runs the
//! executions the scheduler places here.
//!
//! For each `Run` it takes the execution from `queued` to `running` in the store (that
//! transition is the guard against duplicate deliveries and against cancels that won the
//! race), reads the code from the object store, claims a frozen sandbox with the record's
//! limits (written into the sandbox's cgroup at claim time, so a policy change applies to
//! the next execution without rolling the pool — R8; the time limit counts from the
//! claim, which is when user code starts — R6), streams what the sandbox reports as
//! events (store first: the durable copy carries the sequence number; then the bus;
//! usage samples only on the bus), and at the end stores the encrypted result and marks
//! the record finished.
//!
//! On start it reconciles: executions the store says run here are from a previous life of
//! this agent, so they become `lost`, and the cgroups of sandboxes whose owner died are
//! reaped. It publishes a [`HostStatus`] periodically and whenever an execution starts or
//! ends (placement and the admin monitor read it — R13).
//!
//! The agent talks to the rest of the platform only through the [`Store`], the [`Bus`]
//! and the [`Objects`]. It never blocks the async runtime on the pool: claims and the
//! pool's event stream run on blocking threads and are forwarded through channels.
//!
//! Where things are:
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the configuration ([`AgentConfig`], [`LanguageConfig`]), [`Agent::start`], the [`AgentHandle`] (readiness, drain, shutdown) and the state the tasks share (`Inner`: pools, what runs here, free slots) |
//! | `lifecycle.rs` | start-up (reconcile with the store, reap orphaned sandboxes), the lease/heartbeat loop, the status loop, pool sizing by demand ([`desired_pool_sizes`]) |
//! | `commands.rs` | the command loop: reads the bus, starts `Run`s in order as slots free up, acts on `Cancel`s; while draining it starts nothing and hands back what waits |
//! | `run.rs` | one execution end to end: `mark_running`, the wait for displaced runs, the pre-start cancel check, claim and drive, `finish`, and the result summary ([`state_of`]) |
//! | `forward.rs` | the forwarder: the pool's events of one execution become stored and published events (held until `started`, UTF-8 kept whole across chunks) |
//!
//! **Drain** (R7): [`AgentHandle::shutdown`] first drains the host. Its status says
//! `draining` (placement sends it nothing new, and the scheduler places again what it sent
//! here that has not started), `Run`s that wait for a slot or arrive later are handed back
//! (acknowledged and left `queued` in the store), the pools shrink to nothing and refill
//! no more, and the running executions go on to their end — each bounded by its own time
//! limit. Only a [`Forcer`] (a second signal) or the configured
//! [`AgentConfig::drain_deadline`] kills what still runs; those executions end `lost`
//! with the reason in their result, and the logs say so.
//!
//! **Host states**: the store may ask the host to be `cordoned` (no new work; pools stay
//! warm) or `draining` (no new work; pools emptied) — an admin's or the autoscaler's word,
//! read at every heartbeat and at start, so it outlives the agent's restarts; `ready`
//! undoes both and refills the pools. Unlike a shutdown's drain, the agent stays up.

mod commands;
mod forward;
mod lifecycle;
mod load;
mod run;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hatchery_sandbox::pool::{Canceller, Pool, PoolConfig, PoolError, PoolStats};
use hatchery_sandbox::zygote::server::Language;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::bus::{Bus, HostStatus, SandboxUsage};
use crate::model::{now_ms, EffectivePolicy, HostState, Resources, Usage};
use crate::objects::Objects;
use crate::store::{Lease, Store, StoreError, StoreResult};

pub use forward::BATCH_INTERVAL as OUTPUT_BATCH_INTERVAL;
pub use lifecycle::desired_pool_sizes;
pub use run::state_of;

/// The error a reconciled execution carries.
pub const LOST_ON_RESTART: &str = "the agent restarted while it ran";
/// The error of an execution killed because its agent shut down (a lapsed lease; a
/// forced drain says why in [`DrainForced::note`]).
pub const LOST_ON_SHUTDOWN: &str = "the agent shut down while it ran";

/// Placement counts CPU limits against this many times the host's CPUs by default: a
/// CPU limit is a ceiling (`cpu.max`), not a reservation, and most executions use a
/// fraction of theirs. Memory limits are never overcommitted.
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 2.0;

/// Memory held back from executions on a host whose memory is not given: the agent,
/// its zygotes and warm sandboxes, the system.
pub const MACHINE_MEMORY_RESERVE: u64 = 1 << 30;

/// What this machine has for executions: `memory_max` (the ceiling written into the
/// parent cgroup for all sandboxes together) when set, else the machine's memory less
/// [`MACHINE_MEMORY_RESERVE`] (at most a quarter of it); its online CPUs times
/// `cpu_overcommit`.
pub fn machine_allocatable(memory_max: Option<u64>, cpu_overcommit: f64) -> Resources {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| load::memory(&m))
        .map_or(0, |(total, _)| total);
    let memory = memory_max.unwrap_or_else(|| total - MACHINE_MEMORY_RESERVE.min(total / 4));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    Resources::new(memory, cpus * cpu_overcommit)
}

/// Why a drain stopped waiting for running executions and killed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainForced {
    /// Asked for again (a second SIGTERM or Ctrl-C).
    Signal,
    /// [`AgentConfig::drain_deadline`] passed.
    Deadline(Duration),
}

impl DrainForced {
    /// The error the killed executions carry.
    pub fn note(self) -> String {
        match self {
            DrainForced::Signal => {
                "the host shut down before it finished: its drain was forced by a second signal"
                    .into()
            }
            DrainForced::Deadline(d) => format!(
                "the host shut down before it finished: its drain deadline ({}) passed",
                humane(d)
            ),
        }
    }
}

/// `5s`, `1500ms`, `2m`: how a duration reads in a message.
fn humane(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// One language this agent serves.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageConfig {
    /// `r`, `python`, or a fork-exec language: `bash`, `sh`, `python3`.
    pub name: String,
    /// Packages preloaded in the zygote: R packages for `r`, modules for `python`
    /// (ignored for fork-exec languages).
    pub packages: Vec<String>,
    /// Frozen sandboxes kept ready at the least (0 is allowed: then an idle platform
    /// keeps none, and the first execution waits for one fork).
    pub pool_size: usize,
}

impl LanguageConfig {
    fn runtime(&self) -> Result<Language, AgentError> {
        let packages = || -> Vec<String> {
            self.packages
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect()
        };
        match self.name.as_str() {
            "r" => Ok(Language::R {
                packages: packages(),
            }),
            "python" => Ok(Language::Python {
                packages: packages(),
            }),
            "bash" | "sh" | "python3" => Ok(Language::Exec {
                name: self.name.clone(),
                argv: vec![self.name.clone(), "-c".into()],
            }),
            other => Err(AgentError::UnknownLanguage(other.to_string())),
        }
    }
}

/// What one agent runs and how.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This host's agent id: the scheduler addresses it by this name, and records it
    /// runs carry it (keep it stable across restarts so reconciliation finds them).
    pub id: String,
    /// Executions run at once; further `Run`s wait here, in order.
    pub capacity: u32,
    /// The host group this host belongs to, if any (in its status).
    pub group: Option<String>,
    /// Memory and CPUs this host has for executions: placement counts each execution's
    /// limits against them (R4). Default: [`Resources`] of the machine
    /// ([`machine_allocatable`]).
    pub allocatable: Resources,
    pub languages: Vec<LanguageConfig>,
    /// The sandboxes' read-only root filesystem.
    pub rootfs: PathBuf,
    /// The `sandbox` and `hatchery-zygote` binaries (in `target/<profile>/`).
    pub sandbox_bin: PathBuf,
    pub zygote_bin: PathBuf,
    /// Hatchery's parent cgroup.
    pub cgroup_parent: String,
    /// Ceilings written into the parent cgroup at start: memory and processes of all
    /// sandboxes of this host together (`None`: no ceiling).
    pub host_memory_max: Option<u64>,
    pub host_pids_max: Option<u64>,
    /// How often a running execution's usage is sampled (and published, live only: the
    /// samples are not stored).
    pub usage_interval: Duration,
    /// Bytes an execution may emit (stdout and stderr, progress messages, its value)
    /// before it is stopped with state `output_limit`.
    pub output_limit: u64,
    /// Events (output pieces, progress, usage) an execution may produce before it is
    /// stopped with state `output_limit`: bounds what one execution can store.
    pub max_events: u64,
    /// How often the host status is published (it is also published on every start and
    /// end of an execution).
    pub status_interval: Duration,
    /// This host's lease in the store: renewed every third of it; a host that fails to
    /// renew in time has its running executions declared `lost`, and kills them when it
    /// finds out (fencing).
    pub lease: Duration,
    /// How long a claim waits for a frozen sandbox when the pool is empty.
    pub claim_timeout: Duration,
    /// On shutdown the host drains: running executions finish, each within its own time
    /// limit. With a deadline, what still runs when it passes is killed (and recorded as
    /// `lost`, saying so); `None`: no deadline beyond the executions' own.
    pub drain_deadline: Option<Duration>,
    /// Pool sizing by demand (R5): the platform default policy the org and user
    /// `warm_pool_size` overrides apply to.
    pub default_policy: EffectivePolicy,
    /// Users who submitted within this window count as active: each adds its effective
    /// `warm_pool_size` to its language's pool.
    pub demand_window: Duration,
    /// No pool grows beyond this many frozen sandboxes.
    pub max_pool_size: usize,
    /// Warm sandboxes fault in ahead the pages a first evaluation touches
    /// (`PoolConfig::prefault`).
    pub prefault: bool,
    /// How many frozen sandboxes of each pool keep those pages populated
    /// (`PoolConfig::prefault_ready`).
    pub prefault_ready: usize,
}

impl AgentConfig {
    /// Defaults: capacity 2, an R pool of 2, binaries next to the running executable,
    /// the default root filesystem.
    pub fn new(id: impl Into<String>) -> AgentConfig {
        let dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
            .unwrap_or_default();
        AgentConfig {
            id: id.into(),
            capacity: 2,
            group: None,
            allocatable: machine_allocatable(None, DEFAULT_CPU_OVERCOMMIT),
            languages: vec![LanguageConfig {
                name: "r".into(),
                packages: Vec::new(),
                pool_size: 2,
            }],
            rootfs: PathBuf::from(hatchery_sandbox::DEFAULT_ROOTFS),
            sandbox_bin: dir.join("sandbox"),
            zygote_bin: dir.join("hatchery-zygote"),
            cgroup_parent: hatchery_sandbox::run::DEFAULT_CGROUP_PARENT.into(),
            host_memory_max: None,
            host_pids_max: None,
            usage_interval: Duration::from_millis(500),
            output_limit: 16 << 20,
            max_events: hatchery_sandbox::pool::DEFAULT_MAX_EVENTS,
            status_interval: Duration::from_secs(1),
            lease: Duration::from_secs(10),
            claim_timeout: Duration::from_secs(120),
            drain_deadline: None,
            default_policy: EffectivePolicy::default(),
            demand_window: Duration::from_secs(600),
            max_pool_size: 8,
            prefault: true,
            prefault_ready: hatchery_sandbox::pool::PREFAULT_READY,
        }
    }

    fn pool_config(&self, lang: &LanguageConfig) -> Result<PoolConfig, AgentError> {
        let mut pc = PoolConfig::new(lang.runtime()?, self.rootfs.clone());
        pc.size = lang.pool_size;
        // Most executions run at the platform default: written while pooled, a claim
        // at those limits writes nothing.
        pc.default_limits = Some(hatchery_sandbox::Limits {
            memory_bytes: Some(self.default_policy.memory_bytes),
            cpus: Some(self.default_policy.cpus),
            pids: Some(self.default_policy.pids),
        });
        pc.sandbox_bin = self.sandbox_bin.clone();
        pc.zygote_bin = self.zygote_bin.clone();
        pc.cgroup_parent = self.cgroup_parent.clone();
        pc.claim_timeout = self.claim_timeout;
        pc.prefault = self.prefault;
        pc.prefault_ready = self.prefault_ready;
        Ok(pc)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent serves no language")]
    NoLanguages,
    #[error("the agent's capacity must be at least 1")]
    NoCapacity,
    #[error("unknown language {0:?}: expected r, python, bash, sh or python3")]
    UnknownLanguage(String),
    #[error("language {0:?} is configured twice")]
    DuplicateLanguage(String),
    #[error("the {language} pool: {source}")]
    Pool {
        language: String,
        #[source]
        source: Box<PoolError>,
    },
    #[error("reconciling with the store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
}

/// The agent role. See the module documentation.
pub struct Agent;

impl Agent {
    /// Reconciles with the store, reaps orphaned sandboxes, starts one pool per language
    /// (sandboxes become ready in the background: [`AgentHandle::wait_ready`]) and starts
    /// taking commands from the bus.
    pub async fn start(
        cfg: AgentConfig,
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        objects: Arc<dyn Objects>,
    ) -> Result<AgentHandle, AgentError> {
        if cfg.languages.is_empty() {
            return Err(AgentError::NoLanguages);
        }
        if cfg.capacity == 0 {
            return Err(AgentError::NoCapacity);
        }
        let mut pool_configs = Vec::new();
        for lang in &cfg.languages {
            if pool_configs.iter().any(|(n, _)| n == &lang.name) {
                return Err(AgentError::DuplicateLanguage(lang.name.clone()));
            }
            pool_configs.push((lang.name.clone(), cfg.pool_config(lang)?));
        }

        let lost = lifecycle::reconcile(&cfg.id, store.as_ref(), bus.as_ref()).await?;
        store
            .register_host(&cfg.id, cfg.lease.as_millis() as u64)
            .await?;
        if lost > 0 {
            tracing::warn!(agent = %cfg.id, lost, "executions of a previous run of this agent marked lost");
        }
        lifecycle::reap_orphans(&cfg).await?;
        // What the store asks of this host (a drain outlives the agent's restarts).
        let initial_state = match store
            .heartbeat(&cfg.id, cfg.lease.as_millis() as u64)
            .await?
        {
            Lease::Held(state) => state,
            Lease::Lapsed => HostState::Ready,
        };

        let pools = tokio::task::spawn_blocking(move || {
            let mut pools = HashMap::new();
            for (name, pc) in pool_configs {
                let pool = Pool::start(pc).map_err(|source| AgentError::Pool {
                    language: name.clone(),
                    source: Box::new(source),
                })?;
                pools.insert(name, Arc::new(pool));
            }
            Ok::<_, AgentError>(pools)
        })
        .await
        .map_err(|e| AgentError::Runtime(format!("pool start task: {e}")))??;
        tracing::info!(agent = %cfg.id, capacity = cfg.capacity, languages = ?pools.keys().collect::<Vec<_>>(), "agent started");

        let (stop_tx, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            slots: Arc::new(Semaphore::new(cfg.capacity as usize)),
            cfg,
            store,
            bus,
            objects,
            pools: Mutex::new(pools),
            running: Mutex::new(HashMap::new()),
            exiting: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(initial_state),
            pools_emptied: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            status_changed: Notify::new(),
            commands_wake: Notify::new(),
            drained: watch::channel(false).0,
            load: Mutex::default(),
        });
        if initial_state != HostState::Ready {
            tracing::info!(agent = %inner.cfg.id, state = initial_state.as_str(), "the store asks this host to stay out of service");
        }
        inner.apply_state();
        let mut tasks = JoinSet::new();
        tasks.spawn(commands::command_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(lifecycle::sizing_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(lifecycle::lease_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(lifecycle::status_loop(Arc::clone(&inner), stop_rx));
        Ok(AgentHandle {
            inner,
            stop: stop_tx,
            tasks,
        })
    }
}

/// A running agent.
pub struct AgentHandle {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl AgentHandle {
    pub fn id(&self) -> &str {
        &self.inner.cfg.id
    }

    /// Waits until every pool has at least one frozen sandbox (or fails: the zygote
    /// cannot start, or `timeout` passed).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), AgentError> {
        let pools: Vec<(String, Arc<Pool>)> = self
            .inner
            .pools
            .lock()
            .unwrap()
            .iter()
            .map(|(n, p)| (n.clone(), Arc::clone(p)))
            .collect();
        tokio::task::spawn_blocking(move || {
            for (name, pool) in pools {
                pool.wait_ready(1, timeout)
                    .map_err(|source| AgentError::Pool {
                        language: name,
                        source: Box::new(source),
                    })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| AgentError::Runtime(format!("wait task: {e}")))?
    }

    /// Counters of the pool of `language` (metrics, tests).
    pub fn pool_stats(&self, language: &str) -> Option<PoolStats> {
        self.inner.pool(language).map(|p| p.stats())
    }

    /// The status this agent would publish now.
    pub fn status(&self) -> HostStatus {
        self.inner.status()
    }

    /// Drains the host: its status says `draining` (placement sends it nothing new and
    /// the scheduler places again what it sent here that has not started), `Run`s are
    /// handed back instead of started, and the pools shrink to nothing and refill no
    /// more. Running executions go on; cancels still reach them. Idempotent.
    pub fn drain(&self) {
        self.inner.drain();
    }

    /// Kills what still runs during a drain or a shutdown (a second signal): see
    /// [`Forcer`].
    pub fn forcer(&self) -> Forcer {
        Forcer(Arc::clone(&self.inner))
    }

    /// Drains the host (see [`Self::drain`]) and waits until nothing runs here — every
    /// execution ends on its own, within its own time limit — or until the configured
    /// [`AgentConfig::drain_deadline`] passes or a [`Forcer`] is used, which kill what
    /// still runs (`lost`, saying why). Then stops the agent's tasks and shuts the pools
    /// down. `Run`s handed back stay `queued` in the store for another host (or for this
    /// one's next start).
    pub async fn shutdown(mut self) {
        let inner = Arc::clone(&self.inner);
        let running = inner.running.lock().unwrap().len();
        inner.drain();
        let mut drained = inner.drained.subscribe();
        if running > 0 {
            match inner.cfg.drain_deadline {
                Some(d) => {
                    tracing::info!(agent = %inner.cfg.id, running, deadline = %humane(d), "draining: running executions may finish until the deadline; a second signal stops them now")
                }
                None => {
                    tracing::info!(agent = %inner.cfg.id, running, "draining: running executions finish first, each within its own time limit; a second signal stops them now")
                }
            }
        }
        let deadline = async {
            match inner.cfg.drain_deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let in_time = tokio::select! {
            _ = drained.wait_for(|d| *d) => true,
            _ = deadline => false,
        };
        if !in_time {
            let d = inner.cfg.drain_deadline.unwrap_or_default();
            inner.force(DrainForced::Deadline(d));
            let _ = drained.wait_for(|d| *d).await;
        }
        inner
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        let pools: Vec<Arc<Pool>> = inner
            .pools
            .lock()
            .unwrap()
            .drain()
            .map(|(_, p)| p)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for pool in pools {
                let s = pool.stats();
                tracing::info!(
                    forked = s.forked,
                    claimed = s.claimed,
                    failed_forks = s.failed_forks,
                    died_frozen = s.died_frozen,
                    zygote_starts = s.zygote_starts,
                    "pool at shutdown"
                );
                match Arc::try_unwrap(pool) {
                    Ok(mut pool) => pool.shutdown(),
                    // A claim still holds it: the pool shuts down when that claim returns.
                    Err(shared) => drop(shared),
                }
            }
        })
        .await;
        let status = inner.status();
        let _ = inner.bus.publish_status(status).await;
        tracing::info!(agent = %inner.cfg.id, "agent stopped");
    }
}

/// Stops a drain's wait: what still runs on the host is killed and ends `lost`, its
/// result saying the drain was forced. For a second SIGTERM or Ctrl-C.
#[derive(Clone)]
pub struct Forcer(Arc<Inner>);

impl Forcer {
    pub fn force(&self) {
        self.0.force(DrainForced::Signal);
    }
}

/// One execution running here.
struct Running {
    org: String,
    user: String,
    usage: Usage,
    /// What its limits take from the host.
    limits: Resources,
    /// Set once the sandbox is claimed.
    canceller: Option<Canceller>,
    /// A cancel arrived (before or after the claim).
    cancel_requested: bool,
    /// Killed because the agent shuts down: the error its result carries.
    shutdown_kill: Option<String>,
}

struct Inner {
    cfg: AgentConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    objects: Arc<dyn Objects>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    running: Mutex<HashMap<String, Running>>,
    slots: Arc<Semaphore>,
    /// Draining to stop (SIGTERM): final.
    exiting: std::sync::atomic::AtomicBool,
    /// What the store asks of this host.
    state: Mutex<HostState>,
    /// The warm pools were emptied for a drain (pool sizing leaves them alone).
    pools_emptied: std::sync::atomic::AtomicBool,
    /// Set by shutdown: writes the store refused for being unavailable are no longer
    /// retried.
    stopping: std::sync::atomic::AtomicBool,
    status_changed: Notify,
    /// Wakes the command loop when the host starts or stops taking work.
    commands_wake: Notify,
    /// True once the host drains and nothing runs here any more.
    drained: watch::Sender<bool>,
    /// Samples the machine for the status.
    load: Mutex<load::LoadSampler>,
}

/// The longest pause between two attempts of a store write that found the store
/// unavailable.
const STORE_RETRY_MAX_PAUSE: Duration = Duration::from_secs(2);

impl Inner {
    /// Runs a store write again and again while the store is unavailable (a restart, a
    /// failover), so that what an execution produced — its output, its end — is kept (in
    /// memory: bounded by the execution's output limit and event cap) until the store
    /// takes it, instead of being dropped. Any other outcome is returned at once; so is
    /// the unavailability once the agent is shutting down.
    async fn store_write<T, F, Fut>(&self, what: &str, id: &str, mut write: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        let mut pause = Duration::from_millis(20);
        let mut since: Option<std::time::Instant> = None;
        loop {
            let began = std::time::Instant::now();
            let result = write().await;
            tracing::trace!(
                execution = id,
                ms = began.elapsed().as_secs_f64() * 1e3,
                "stored {what}"
            );
            match result {
                Err(StoreError::Unavailable(e))
                    if !self.stopping.load(std::sync::atomic::Ordering::SeqCst) =>
                {
                    if since.is_none() {
                        tracing::warn!(execution = id, error = %e, "the store is unavailable: keeping {what} and trying again");
                        since = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(STORE_RETRY_MAX_PAUSE);
                }
                other => {
                    if let (Some(t), Ok(_)) = (since, &other) {
                        tracing::info!(
                            execution = id,
                            waited_ms = t.elapsed().as_millis() as u64,
                            "the store took {what} again"
                        );
                    }
                    return other;
                }
            }
        }
    }

    fn status(&self) -> HostStatus {
        let mut warm: Vec<(String, u32)> = self
            .pools
            .lock()
            .unwrap()
            .iter()
            .map(|(n, p)| (n.clone(), p.stats().ready as u32))
            .collect();
        warm.sort();
        let running = self.running.lock().unwrap();
        let mut sandboxes: Vec<SandboxUsage> = running
            .iter()
            .map(|(id, r)| SandboxUsage {
                execution_id: id.clone(),
                org: r.org.clone(),
                user: r.user.clone(),
                usage: r.usage.clone(),
                limits: r.limits,
            })
            .collect();
        sandboxes.sort_by(|a, b| a.execution_id.cmp(&b.execution_id));
        HostStatus {
            agent: self.cfg.id.clone(),
            group: self.cfg.group.clone(),
            at: now_ms(),
            capacity: self.cfg.capacity,
            running: running.len() as u32,
            allocatable: self.cfg.allocatable,
            draining: !self.takes_work(),
            state: self.host_state(),
            load: self.load.lock().unwrap().sample(),
            warm,
            sandboxes,
        }
    }

    fn pool(&self, language: &str) -> Option<Arc<Pool>> {
        self.pools.lock().unwrap().get(language).cloned()
    }
    /// Starts the drain of a shutdown: see [`AgentHandle::drain`]. Final: the store's
    /// word does not undo it.
    fn drain(&self) {
        if !self.exiting.swap(true, std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(agent = %self.cfg.id, "draining to stop: no new work; the warm pools are emptied");
        }
        self.apply_state();
    }

    /// Takes the store's word on this host's state (read at each heartbeat).
    fn set_state(&self, state: HostState) {
        let was = std::mem::replace(&mut *self.state.lock().unwrap(), state);
        if was != state {
            tracing::info!(agent = %self.cfg.id, from = was.as_str(), to = state.as_str(), "the store asks this host to change state");
            self.apply_state();
        }
    }

    /// The state this host is in: draining when it stops, else the store's word.
    fn host_state(&self) -> HostState {
        if self.exiting.load(std::sync::atomic::Ordering::SeqCst) {
            HostState::Draining
        } else {
            *self.state.lock().unwrap()
        }
    }

    /// Takes new work: only when ready (a shutdown's drain, a cordon or a drain asked by
    /// the store stop it).
    fn takes_work(&self) -> bool {
        self.host_state() == HostState::Ready
    }

    /// Acts on [`Self::host_state`]: wakes the command loop (which starts runs only
    /// while the host takes work); empties the warm pools while draining (and refills
    /// them when it no longer is).
    fn apply_state(&self) {
        let empty = self.host_state().is_leaving();
        let pools = self.pools.lock().unwrap();
        let was_empty = self
            .pools_emptied
            .swap(empty, std::sync::atomic::Ordering::SeqCst);
        if empty && !was_empty {
            for pool in pools.values() {
                pool.set_size(0);
            }
        } else if !empty && was_empty {
            // Back to the configured sizes; pool sizing by demand takes it from there.
            for lang in &self.cfg.languages {
                if let Some(pool) = pools.get(&lang.name) {
                    pool.set_size(lang.pool_size);
                }
            }
        }
        drop(pools);
        self.commands_wake.notify_one();
        self.status_changed.notify_one();
    }

    /// Ends a drain's wait: kills what still runs (`lost`, with `why` in the result).
    /// Store writes are no longer retried while the store is unavailable.
    fn force(&self, why: DrainForced) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let killed = self.kill_all(&why.note());
        if killed > 0 {
            tracing::warn!(agent = %self.cfg.id, killed, reason = %why.note(), "drain forced: killing the executions still running; they end lost");
        }
        self.drain();
    }

    /// Kills every execution of this host (shutdown, or a lapsed lease): they end as
    /// `lost` with `note`, not as cancelled by their user. Returns how many.
    fn kill_all(&self, note: &str) -> usize {
        let mut running = self.running.lock().unwrap();
        for r in running.values_mut() {
            r.shutdown_kill = Some(note.to_string());
            r.cancel_requested = true;
            if let Some(c) = &r.canceller {
                c.cancel();
            }
        }
        running.len()
    }

    /// Cancels `id` if it runs here (now, or right after its claim).
    fn cancel(&self, id: &str) -> bool {
        let mut running = self.running.lock().unwrap();
        match running.get_mut(id) {
            Some(r) => {
                r.cancel_requested = true;
                if let Some(c) = &r.canceller {
                    c.cancel();
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages_map_to_runtimes() {
        let lang = |n: &str| LanguageConfig {
            name: n.into(),
            packages: vec!["MASS".into(), String::new()],
            pool_size: 1,
        };
        assert!(matches!(
            lang("r").runtime().unwrap(),
            Language::R { packages } if packages == vec!["MASS".to_string()]
        ));
        assert!(matches!(
            lang("bash").runtime().unwrap(),
            Language::Exec { .. }
        ));
        assert!(matches!(
            lang("cobol").runtime(),
            Err(AgentError::UnknownLanguage(_))
        ));
    }
}
