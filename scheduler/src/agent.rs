//! The per-host agent: it drives this host's warm pools (one per language) and runs the
//! executions the scheduler places here.
//!
//! For each `Run` it takes the execution from `queued` to `running` in the store (that
//! transition is the guard against duplicate deliveries and against cancels that won the
//! race), reads the code from the object store, claims a frozen sandbox with the record's
//! limits (written into the sandbox's cgroup at claim time, so a policy change applies to
//! the next execution without rolling the pool — R8; the time limit counts from the
//! claim, which is when user code starts — R6), streams what the sandbox reports as
//! events (store first: the durable copy carries the sequence number; then the bus), and
//! at the end stores the encrypted result and marks the record finished.
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
//! Not yet: the per-org warm-pool size of policies (R5) — pools are sized per language
//! from the agent's configuration.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hatchery_sandbox::cgroup::CgroupRoot;
use hatchery_sandbox::pool::{
    Canceller, Event, ExecRequest, ExecResult, ExecStatus, Pool, PoolConfig, PoolError, PoolStats,
};
use hatchery_sandbox::zygote::server::Language;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::bus::{AgentCommand, Bus, BusError, DeliveryTag, HostStatus, SandboxUsage};
use crate::model::{
    now_ms, CancelReason, EffectivePolicy, EventBody, ExecState, ExecutionRecord, OutputData,
    ResultSummary, Usage,
};
use crate::objects::Objects;
use crate::store::{Lease, ListFilter, Store, StoreError};

/// The error a reconciled execution carries.
pub const LOST_ON_RESTART: &str = "the agent restarted while it ran";
/// The error of an execution killed because its agent shut down.
pub const LOST_ON_SHUTDOWN: &str = "the agent shut down while it ran";

/// How long output may wait for the sandbox's `started` report before it is forwarded
/// anyway.
const STARTED_WAIT: Duration = Duration::from_millis(50);

/// One language this agent serves.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageConfig {
    /// `r`, or a fork-exec language: `bash`, `sh`, `python3`.
    pub name: String,
    /// R packages preloaded in the zygote (ignored for other languages).
    pub packages: Vec<String>,
    /// Frozen sandboxes kept ready at the least (0 is allowed: then an idle platform
    /// keeps none, and the first execution waits for one fork).
    pub pool_size: usize,
}

impl LanguageConfig {
    fn runtime(&self) -> Result<Language, AgentError> {
        match self.name.as_str() {
            "r" => Ok(Language::R {
                packages: self
                    .packages
                    .iter()
                    .filter(|p| !p.is_empty())
                    .cloned()
                    .collect(),
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
    /// How often a running execution's usage is sampled (and streamed).
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
    /// On shutdown: how long running executions may finish before they are killed (and
    /// recorded as `lost`).
    pub shutdown_grace: Duration,
    /// Pool sizing by demand (R5): the platform default policy the org and user
    /// `warm_pool_size` overrides apply to.
    pub default_policy: EffectivePolicy,
    /// Users who submitted within this window count as active: each adds its effective
    /// `warm_pool_size` to its language's pool.
    pub demand_window: Duration,
    /// No pool grows beyond this many frozen sandboxes.
    pub max_pool_size: usize,
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
            shutdown_grace: Duration::ZERO,
            default_policy: EffectivePolicy::default(),
            demand_window: Duration::from_secs(600),
            max_pool_size: 8,
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
        Ok(pc)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent serves no language")]
    NoLanguages,
    #[error("the agent's capacity must be at least 1")]
    NoCapacity,
    #[error("unknown language {0:?}: expected r, bash, sh or python3")]
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

        let lost = reconcile(&cfg.id, store.as_ref(), bus.as_ref()).await?;
        store
            .register_host(&cfg.id, cfg.lease.as_millis() as u64)
            .await?;
        if lost > 0 {
            tracing::warn!(agent = %cfg.id, lost, "executions of a previous run of this agent marked lost");
        }
        let parent = cfg.cgroup_parent.clone();
        let ceiling = (cfg.host_memory_max, cfg.host_pids_max);
        let reaped = tokio::task::spawn_blocking(move || {
            CgroupRoot::detect(&parent).and_then(|root| {
                let summary = hatchery_sandbox::gc::collect(&root);
                root.set_ceiling(ceiling.0, ceiling.1)?;
                Ok(summary)
            })
        })
        .await
        .map_err(|e| AgentError::Runtime(format!("gc task: {e}")))?;
        match reaped {
            Ok(summary) => {
                if !summary.removed.is_empty() || !summary.failed.is_empty() {
                    tracing::info!(
                        agent = %cfg.id,
                        removed = summary.removed.len(),
                        failed = summary.failed.len(),
                        "reaped sandboxes whose owner died"
                    );
                }
            }
            Err(e) => tracing::warn!(agent = %cfg.id, error = %e, "cannot reap orphaned sandboxes"),
        }

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
            draining: std::sync::atomic::AtomicBool::new(false),
            status_changed: Notify::new(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(command_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(sizing_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(lease_loop(Arc::clone(&inner), stop_rx.clone()));
        tasks.spawn(status_loop(Arc::clone(&inner), stop_rx));
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

    /// Marks the host draining: its status says so, so placement sends it no new work.
    /// Work already sent to it still runs.
    pub fn drain(&self) {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.status_changed.notify_one();
    }

    /// Stops taking work, lets running executions finish for the configured grace
    /// period, kills the rest (recorded as `lost`) and shuts the pools down. `Run`s that
    /// were waiting for a slot here stay `queued` in the store (the scheduler re-places
    /// queued executions when it starts).
    pub async fn shutdown(mut self) {
        let inner = Arc::clone(&self.inner);
        inner
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.stop.send(true);
        // The command loop waits for its executions only for the grace period.
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

/// One execution running here.
struct Running {
    org: String,
    user: String,
    usage: Usage,
    /// Set once the sandbox is claimed.
    canceller: Option<Canceller>,
    /// A cancel arrived (before or after the claim).
    cancel_requested: bool,
    /// Killed because the agent shuts down.
    shutdown_kill: bool,
}

struct Inner {
    cfg: AgentConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    objects: Arc<dyn Objects>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
    running: Mutex<HashMap<String, Running>>,
    slots: Arc<Semaphore>,
    draining: std::sync::atomic::AtomicBool,
    status_changed: Notify,
}

impl Inner {
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
            })
            .collect();
        sandboxes.sort_by(|a, b| a.execution_id.cmp(&b.execution_id));
        HostStatus {
            agent: self.cfg.id.clone(),
            at: now_ms(),
            capacity: self.cfg.capacity,
            running: running.len() as u32,
            draining: self.draining.load(std::sync::atomic::Ordering::SeqCst),
            warm,
            sandboxes,
        }
    }

    fn pool(&self, language: &str) -> Option<Arc<Pool>> {
        self.pools.lock().unwrap().get(language).cloned()
    }

    /// Cancels `id` if it runs here (now, or right after its claim).
    /// Kills every execution of this host (shutdown, or a lapsed lease): they end as
    /// `lost`, not as cancelled by their user. Returns how many.
    fn kill_all(&self) -> usize {
        let mut running = self.running.lock().unwrap();
        for r in running.values_mut() {
            r.shutdown_kill = true;
            r.cancel_requested = true;
            if let Some(c) = &r.canceller {
                c.cancel();
            }
        }
        running.len()
    }

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

    /// Appends an event (store first: it assigns the sequence number), then publishes it.
    async fn emit(&self, id: &str, body: EventBody) {
        match self.store.append_event(id, body).await {
            Ok(event) => {
                if let Err(e) = self.bus.publish_event(event).await {
                    tracing::warn!(execution = id, error = %e, "cannot publish an event");
                }
            }
            Err(e) => tracing::warn!(execution = id, error = %e, "cannot store an event"),
        }
    }
}

/// Marks every execution the store says runs on `agent` as lost; returns how many.
async fn reconcile(agent: &str, store: &dyn Store, bus: &dyn Bus) -> Result<usize, AgentError> {
    let filter = ListFilter {
        state: Some(ExecState::Running),
        ..ListFilter::default()
    };
    let mut lost = 0;
    for record in store.list(&filter).await? {
        if record.agent.as_deref() != Some(agent) {
            continue;
        }
        let summary = ResultSummary::bare(
            ExecState::Lost,
            "agent_restarted",
            Some(LOST_ON_RESTART.into()),
        );
        match store
            .finish(&record.id, ExecState::Lost, None, now_ms(), summary)
            .await
        {
            Ok((_, event)) => {
                lost += 1;
                let _ = bus.publish_event(event).await;
            }
            Err(e) => {
                tracing::warn!(execution = %record.id, error = %e, "cannot mark a lost execution");
            }
        }
    }
    Ok(lost)
}

/// Reads commands; `Cancel`s act at once, `Run`s wait in order for a free slot.
async fn command_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    // The bus is read by its own task (so a pending read is never dropped half-way by a
    // `select!`), except at shutdown.
    // Commands taken but never acknowledged by a previous run of this agent come first.
    match inner.bus.requeue_unacked(&inner.cfg.id).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(agent = %inner.cfg.id, count = n, "requeued unacknowledged commands")
        }
        Err(e) => tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot requeue commands"),
    }
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<(AgentCommand, DeliveryTag)>(64);
    let reader = {
        let inner = Arc::clone(&inner);
        tokio::spawn(async move {
            loop {
                match inner.bus.take_for_agent(&inner.cfg.id).await {
                    Ok(d) => {
                        if cmd_tx.send((d.item, d.tag)).await.is_err() {
                            return;
                        }
                    }
                    Err(BusError::Closed) => return,
                    Err(e) => {
                        tracing::warn!(agent = %inner.cfg.id, error = %e, "reading commands");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };
    // Runs waiting for a slot, with their delivery tags (acknowledged once started: a
    // run that never started is redelivered after a restart).
    let mut waiting: VecDeque<(String, DeliveryTag)> = VecDeque::new();
    let mut executions = JoinSet::new();
    loop {
        // Start waiting runs while there are free slots.
        while let Some((id, tag)) = waiting.front() {
            let Ok(permit) = Arc::clone(&inner.slots).try_acquire_owned() else {
                break;
            };
            let (id, tag) = (id.clone(), tag.clone());
            waiting.pop_front();
            executions.spawn(run_execution(Arc::clone(&inner), id, permit));
            let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
        }
        tokio::select! {
            _ = stop.changed() => break,
            cmd = cmd_rx.recv() => match cmd {
                Some((AgentCommand::Run { execution_id }, tag)) => {
                    if waiting.iter().any(|(w, _)| *w == execution_id) {
                        let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
                    } else {
                        waiting.push_back((execution_id, tag));
                    }
                }
                Some((AgentCommand::Cancel { execution_id }, tag)) => {
                    if !inner.cancel(&execution_id) {
                        tracing::debug!(execution = %execution_id, "cancel for an execution not running here");
                    }
                    let _ = inner.bus.ack_for_agent(&inner.cfg.id, &tag).await;
                }
                None => {
                    tracing::info!(agent = %inner.cfg.id, "the bus closed; no more work");
                    break;
                }
            },
            // A slot freed up.
            Some(_) = executions.join_next(), if !executions.is_empty() => {}
        }
    }
    reader.abort();
    if !waiting.is_empty() {
        tracing::info!(agent = %inner.cfg.id, left = waiting.len(), "runs left queued at shutdown");
    }
    // Shutdown: let running executions finish for the grace period, then kill them.
    let grace = tokio::time::sleep(inner.cfg.shutdown_grace);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            next = executions.join_next() => if next.is_none() { return },
            _ = &mut grace => break,
        }
    }
    inner.kill_all();
    while executions.join_next().await.is_some() {}
}

/// How often pool sizes are recomputed from demand and policy.
const SIZING_INTERVAL: Duration = Duration::from_secs(5);

/// Frozen sandboxes wanted per language (R5): each user who submitted within `window`
/// adds the `warm_pool_size` of their effective policy (`policy_of(org, user)`) to the
/// pool of the language they used; the result is clamped to `[floor, max]` of that
/// language. Idle orgs and users keep nothing warm beyond the floor.
pub fn desired_pool_sizes(
    recent: &[ExecutionRecord],
    now: u64,
    window: Duration,
    floors: &HashMap<String, usize>,
    max: usize,
    policy_of: impl Fn(&str, &str) -> u32,
) -> HashMap<String, usize> {
    let since = now.saturating_sub(window.as_millis() as u64);
    let mut users: std::collections::HashSet<(&str, &str, &str)> = Default::default();
    for r in recent.iter().filter(|r| r.created_at >= since) {
        users.insert((r.language.as_str(), r.org.as_str(), r.user.as_str()));
    }
    let mut want: HashMap<String, usize> = HashMap::new();
    for (lang, org, user) in users {
        *want.entry(lang.to_string()).or_default() += policy_of(org, user) as usize;
    }
    floors
        .iter()
        .map(|(lang, floor)| {
            let demand = want.get(lang).copied().unwrap_or(0);
            (lang.clone(), demand.clamp(*floor, max.max(*floor)))
        })
        .collect()
}

/// Resizes the pools from recent demand and the warm-pool sizes in the policies.
async fn sizing_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let floors: HashMap<String, usize> = inner
        .cfg
        .languages
        .iter()
        .map(|l| (l.name.clone(), l.pool_size))
        .collect();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(SIZING_INTERVAL) => {}
        }
        let recent = match inner
            .store
            .list(&ListFilter {
                limit: Some(1000),
                ..Default::default()
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "pool sizing: cannot list executions");
                continue;
            }
        };
        let mut policies: HashMap<(String, String), u32> = HashMap::new();
        for r in &recent {
            let key = (r.org.clone(), r.user.clone());
            if policies.contains_key(&key) {
                continue;
            }
            let org = inner.store.get_org_policy(&r.org).await.ok().flatten();
            let user = inner
                .store
                .get_user_policy(&r.org, &r.user)
                .await
                .ok()
                .flatten();
            let eff =
                crate::policy::resolve(&inner.cfg.default_policy, org.as_ref(), user.as_ref());
            policies.insert(key, eff.warm_pool_size);
        }
        let sizes = desired_pool_sizes(
            &recent,
            crate::model::now_ms(),
            inner.cfg.demand_window,
            &floors,
            inner.cfg.max_pool_size,
            |org, user| {
                policies
                    .get(&(org.to_string(), user.to_string()))
                    .copied()
                    .unwrap_or(0)
            },
        );
        let pools = inner.pools.lock().unwrap();
        for (lang, size) in sizes {
            if let Some(pool) = pools.get(&lang) {
                if pool.size() != size {
                    tracing::info!(language = %lang, from = pool.size(), to = size, "resizing the warm pool");
                    pool.set_size(size);
                }
            }
        }
    }
}

/// Publishes the host status periodically and on every change.
async fn status_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let status = inner.status();
        if let Err(e) = inner.bus.publish_status(status).await {
            tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot publish the host status");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(inner.cfg.status_interval) => {}
            _ = inner.status_changed.notified() => {}
        }
    }
}

/// Renews this host's lease every third of it. When the store says it lapsed (this host
/// was unreachable or stalled for longer than the lease), its running executions are
/// `lost` already: they are killed here, and the host registers again.
async fn lease_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let lease_ms = inner.cfg.lease.as_millis() as u64;
    let every = (inner.cfg.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match inner.store.heartbeat(&inner.cfg.id, lease_ms).await {
            Ok(Lease::Held) => {}
            Ok(Lease::Lapsed) => {
                let killed = inner.kill_all();
                tracing::error!(
                    agent = %inner.cfg.id,
                    killed,
                    "this host's lease lapsed: its executions were declared lost and are killed; registering again"
                );
                if let Err(e) = inner.store.register_host(&inner.cfg.id, lease_ms).await {
                    tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot register again");
                }
            }
            Err(e) => tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot renew the lease"),
        }
    }
}

/// What the blocking side of an execution reports.
enum Bridge {
    Claimed(Canceller),
    ClaimFailed(PoolError),
    Event(Event),
}

/// Runs one execution from `queued` to a terminal state. Holds a slot while it runs.
async fn run_execution(inner: Arc<Inner>, id: String, _slot: OwnedSemaphorePermit) {
    {
        let mut running = inner.running.lock().unwrap();
        if running.contains_key(&id) {
            tracing::debug!(execution = %id, "duplicate run of an execution already running here");
            return;
        }
        // Registered before `mark_running`, so a cancel sent as soon as the record says
        // it runs here finds it.
        running.insert(
            id.clone(),
            Running {
                org: String::new(),
                user: String::new(),
                usage: Usage::default(),
                canceller: None,
                cancel_requested: false,
                shutdown_kill: false,
            },
        );
    }
    let record = match inner.store.mark_running(&id, &inner.cfg.id, now_ms()).await {
        Ok(r) => r,
        Err(e) => {
            // Cancelled meanwhile, finished, or a duplicate delivery: not ours to run.
            tracing::debug!(execution = %id, error = %e, "not running it");
            inner.running.lock().unwrap().remove(&id);
            return;
        }
    };
    if let Some(r) = inner.running.lock().unwrap().get_mut(&id) {
        r.org = record.org.clone();
        r.user = record.user.clone();
    }
    inner.status_changed.notify_one();
    tracing::info!(execution = %id, org = %record.org, user = %record.user, language = %record.language, "running");

    // R11: the sandbox is not thawed while an execution this one displaced still runs,
    // and not at all if this one was cancelled meanwhile.
    let waited = wait_displaced(&inner, &record).await;
    if let Some(reason) = cancelled_before_start(&inner, &id, waited).await {
        let summary = ResultSummary::bare(
            ExecState::Cancelled,
            cancel_code(Some(reason)),
            Some(cancel_note(Some(reason))),
        );
        finish(&inner, &id, ExecState::Cancelled, summary).await;
        inner.running.lock().unwrap().remove(&id);
        inner.status_changed.notify_one();
        return;
    }

    let outcome = drive(&inner, &record).await;
    let (state, summary) = match outcome {
        Ok(result) => {
            let shutdown_kill = inner
                .running
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|r| r.shutdown_kill);
            let reason = if result.status == ExecStatus::Cancelled && !shutdown_kill {
                match inner.store.get(&id).await {
                    Ok(Some(r)) => r.cancel,
                    _ => None,
                }
            } else {
                None
            };
            let summary = summarise(&result, shutdown_kill, reason);
            (summary.state, summary)
        }
        Err(error) => {
            let code = if error.starts_with("no sandbox") {
                "no_sandbox"
            } else {
                "internal"
            };
            let summary = ResultSummary::bare(ExecState::Failed, code, Some(error));
            (ExecState::Failed, summary)
        }
    };
    finish(&inner, &id, state, summary).await;
    inner.running.lock().unwrap().remove(&id);
    inner.status_changed.notify_one();
}

/// How long a new execution waits for the ones it displaced to die before it starts
/// anyway (their agent is gone: they become `lost` when its lease expires).
const DISPLACED_WAIT: Duration = Duration::from_secs(30);

/// Waits until every execution `record` displaced (see [`ExecutionRecord::displaces`]) is
/// terminal: its agent has killed it and emptied its cgroup before marking it finished.
/// True when it had anything to wait for.
async fn wait_displaced(inner: &Inner, record: &ExecutionRecord) -> bool {
    if record.displaces.is_empty() {
        return false;
    }
    let started = std::time::Instant::now();
    let deadline = started + DISPLACED_WAIT;
    for other in &record.displaces {
        let mut pause = Duration::from_millis(1);
        loop {
            match inner.store.get(other).await {
                Ok(Some(r)) if !r.state.is_terminal() => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(execution = %record.id, displaced = %other, error = %e, "cannot read a displaced execution");
                }
            }
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    execution = %record.id,
                    displaced = %other,
                    "a displaced execution is still running after {DISPLACED_WAIT:?}: starting anyway"
                );
                return true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
    tracing::debug!(execution = %record.id, waited_ms = started.elapsed().as_millis() as u64, "displaced executions are dead");
    true
}

/// The reason, if this execution was cancelled before its sandbox was claimed (`waited`:
/// it waited for displaced executions since `mark_running`).
async fn cancelled_before_start(inner: &Inner, id: &str, waited: bool) -> Option<CancelReason> {
    let requested = inner
        .running
        .lock()
        .unwrap()
        .get(id)
        .is_some_and(|r| r.cancel_requested);
    // `mark_running` just said it was not cancelled: the store is read again only if
    // time passed since (a wait for displaced runs) or a cancel arrived (for its reason),
    // so the claim path of a plain execution makes no extra store round trip.
    if !waited && !requested {
        return None;
    }
    match inner.store.get(id).await {
        Ok(Some(r)) if r.cancel.is_some() => r.cancel,
        _ if requested => Some(CancelReason::Requested),
        _ => None,
    }
}

/// Stores the result, marks the record finished and appends the `finished` event.
async fn finish(inner: &Inner, id: &str, state: ExecState, mut summary: ResultSummary) {
    let key = format!("results/{id}");
    let result_key = match serde_json::to_vec(&summary) {
        Ok(json) => match inner.objects.put(&key, json).await {
            Ok(()) => Some(key),
            Err(e) => {
                tracing::warn!(execution = id, error = %e, "cannot store the result");
                None
            }
        },
        Err(e) => {
            tracing::warn!(execution = id, error = %e, "cannot serialise the result");
            None
        }
    };
    if result_key.is_none() {
        let note = "the result could not be stored";
        summary.error = Some(match summary.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
    match inner
        .store
        .finish(id, state, result_key, now_ms(), summary)
        .await
    {
        Ok((_, event)) => {
            tracing::info!(execution = id, state = state.as_str(), "finished");
            if let Err(e) = inner.bus.publish_event(event).await {
                tracing::warn!(execution = id, error = %e, "cannot publish an event");
            }
        }
        // Already terminal (e.g. reconciled by another life of this agent): its
        // `finished` event exists.
        Err(e) => tracing::warn!(execution = id, error = %e, "cannot mark it finished"),
    }
}

/// Claims a sandbox, runs the code and forwards its events; returns the pool's result,
/// or why the execution could not run.
async fn drive(inner: &Arc<Inner>, record: &ExecutionRecord) -> Result<ExecResult, String> {
    let id = record.id.as_str();
    let code = inner
        .objects
        .get(&record.code_key)
        .await
        .map_err(|e| format!("cannot read the code: {e}"))?;
    let code = String::from_utf8(code).map_err(|_| "the code is not UTF-8".to_string())?;
    let pool = inner
        .pool(&record.language)
        .ok_or_else(|| format!("this host does not run {:?}", record.language))?;
    let limits = &record.limits;
    let req = ExecRequest {
        code,
        limits: hatchery_sandbox::Limits {
            memory_bytes: Some(limits.memory_bytes),
            cpus: Some(limits.cpus),
            pids: Some(limits.pids),
        },
        timeout: (limits.time_limit_ms > 0).then(|| Duration::from_millis(limits.time_limit_ms)),
        usage_interval: inner.cfg.usage_interval,
        output_limit: inner.cfg.output_limit,
        max_events: inner.cfg.max_events,
    };

    let (tx, mut rx) = mpsc::unbounded_channel::<Bridge>();
    // A plain thread, not the runtime's blocking pool: it lives as long as the execution,
    // and must not hold up the runtime's shutdown.
    std::thread::Builder::new()
        .name("agent-exec".into())
        .spawn(move || bridge(pool, req, tx))
        .map_err(|e| format!("cannot start the execution's thread: {e}"))?;

    match rx.recv().await {
        Some(Bridge::Claimed(canceller)) => {
            let cancel_now = {
                let mut running = inner.running.lock().unwrap();
                match running.get_mut(id) {
                    Some(r) => {
                        r.canceller = Some(canceller.clone());
                        r.cancel_requested
                    }
                    None => false,
                }
            };
            // A cancel decided between `mark_running` and the claim is in the record.
            let in_store = matches!(inner.store.get(id).await, Ok(Some(r)) if r.cancel.is_some());
            if cancel_now || in_store {
                canceller.cancel();
            }
        }
        Some(Bridge::ClaimFailed(e)) => return Err(format!("no sandbox: {e}")),
        Some(Bridge::Event(_)) | None => {
            return Err("the sandbox runtime stopped reporting".into());
        }
    }

    let mut forwarder = Forwarder::new(Arc::clone(inner), id.to_string());
    loop {
        let next = if !forwarder.started && !forwarder.held.is_empty() {
            match tokio::time::timeout(STARTED_WAIT, rx.recv()).await {
                Ok(next) => next,
                Err(_) => {
                    forwarder.start(None).await;
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        match next {
            Some(Bridge::Event(Event::Finished(result))) => {
                forwarder.start(result.timings.start_ms).await;
                forwarder.flush_text().await;
                return Ok(*result);
            }
            Some(Bridge::Event(Event::Started { after_claim_ms })) => {
                forwarder.start(Some(after_claim_ms)).await;
            }
            Some(Bridge::Event(event)) => forwarder.forward(event).await,
            Some(Bridge::Claimed(_)) | Some(Bridge::ClaimFailed(_)) => {}
            None => return Err("the sandbox runtime stopped reporting".into()),
        }
    }
}

/// The blocking side: claims (which may wait for a sandbox) and forwards the pool's
/// events, merging output chunks that are already waiting.
fn bridge(pool: Arc<Pool>, req: ExecRequest, tx: mpsc::UnboundedSender<Bridge>) {
    let execution = match pool.claim(req) {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(Bridge::ClaimFailed(e));
            return;
        }
    };
    drop(pool);
    if tx.send(Bridge::Claimed(execution.canceller())).is_err() {
        execution.cancel();
    }
    // The pool already merges output into pieces of up to 64 KiB at a bounded rate, and
    // coalesces progress: forward as it comes.
    for event in execution.events().iter() {
        let last = matches!(event, Event::Finished(_));
        if tx.send(Bridge::Event(event)).is_err() {
            // Nobody listens any more: do not let the sandbox run on unobserved.
            execution.cancel();
        }
        if last {
            return;
        }
    }
}

/// Turns the pool's events of one execution into stored and published events.
struct Forwarder {
    inner: Arc<Inner>,
    id: String,
    /// The `started` event went out.
    started: bool,
    /// Events that arrived before the sandbox reported its start.
    held: Vec<Event>,
    /// Incomplete UTF-8 sequences at the end of the last chunk, per stream.
    carry: [Vec<u8>; 2],
}

impl Forwarder {
    fn new(inner: Arc<Inner>, id: String) -> Forwarder {
        Forwarder {
            inner,
            id,
            started: false,
            held: Vec::new(),
            carry: [Vec::new(), Vec::new()],
        }
    }

    /// Emits `started` (once), then whatever was held back for it.
    async fn start(&mut self, start_ms: Option<f64>) {
        if self.started {
            return;
        }
        self.started = true;
        let agent = self.inner.cfg.id.clone();
        self.inner
            .emit(&self.id, EventBody::Started { agent, start_ms })
            .await;
        for event in std::mem::take(&mut self.held) {
            self.send(event).await;
        }
    }

    async fn forward(&mut self, event: Event) {
        if self.started {
            self.send(event).await;
        } else {
            self.held.push(event);
        }
    }

    async fn send(&mut self, event: Event) {
        let body = match event {
            Event::Stdout { data } => match decode_chunk(&mut self.carry[0], &data) {
                Some(bytes) => EventBody::Stdout(OutputData::from_bytes(bytes)),
                None => return,
            },
            Event::Stderr { data } => match decode_chunk(&mut self.carry[1], &data) {
                Some(bytes) => EventBody::Stderr(OutputData::from_bytes(bytes)),
                None => return,
            },
            Event::Progress { fraction, message } => EventBody::Progress { fraction, message },
            Event::Usage(u) => {
                let usage = usage_of(&u);
                if let Some(r) = self.inner.running.lock().unwrap().get_mut(&self.id) {
                    r.usage = usage.clone();
                }
                EventBody::Usage(usage)
            }
            Event::Started { .. } | Event::Finished(_) => return,
        };
        self.inner.emit(&self.id, body).await;
    }

    /// Emits what is left of incomplete UTF-8 sequences (exactly, see [`OutputData`]).
    async fn flush_text(&mut self) {
        for (i, carry) in self.carry.iter_mut().enumerate() {
            if carry.is_empty() {
                continue;
            }
            let data = OutputData::from_bytes(std::mem::take(carry));
            let body = if i == 0 {
                EventBody::Stdout(data)
            } else {
                EventBody::Stderr(data)
            };
            self.inner.emit(&self.id, body).await;
        }
    }
}

/// The bytes of `data` after the carried ones, up to an incomplete UTF-8 sequence at the
/// end, which is kept for the next chunk (so a character split between two reads stays
/// whole). `None` when nothing is complete yet.
fn decode_chunk(carry: &mut Vec<u8>, data: &[u8]) -> Option<Vec<u8>> {
    carry.extend_from_slice(data);
    let keep = incomplete_tail(carry);
    let tail = carry.split_off(carry.len() - keep);
    let bytes = std::mem::replace(carry, tail);
    (!bytes.is_empty()).then_some(bytes)
}

/// How many bytes at the end of `b` start a UTF-8 sequence that is not complete yet.
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=b.len().min(3) {
        let start = b.len() - back;
        let byte = b[start];
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return 0,
        };
        let prefix_ok =
            matches!(std::str::from_utf8(&b[start..]), Err(e) if e.error_len().is_none());
        return if need > back && prefix_ok { back } else { 0 };
    }
    0
}

fn usage_of(u: &hatchery_sandbox::cgroup::Usage) -> Usage {
    Usage {
        cpu_ms: (u.user_cpu_ns + u.system_cpu_ns) as f64 / 1e6,
        memory_bytes: u.memory_current_bytes,
        memory_peak_bytes: u.memory_peak_bytes,
    }
}

/// The state an execution ends in, from how the pool saw it end.
pub fn state_of(status: ExecStatus) -> ExecState {
    match status {
        ExecStatus::Succeeded => ExecState::Succeeded,
        ExecStatus::Failed | ExecStatus::ProtocolViolation => ExecState::Failed,
        ExecStatus::OutputLimit => ExecState::OutputLimit,
        ExecStatus::OomKilled => ExecState::OomKilled,
        ExecStatus::TimedOut => ExecState::TimedOut,
        ExecStatus::Cancelled => ExecState::Cancelled,
    }
}

fn cancel_code(reason: Option<CancelReason>) -> &'static str {
    reason.map_or("cancelled", CancelReason::code)
}

fn cancel_note(reason: Option<CancelReason>) -> String {
    match reason {
        Some(CancelReason::Requested) | None => "cancelled".into(),
        Some(CancelReason::SupersededByTab) => {
            "cancelled: a newer execution from the same tab replaced it".into()
        }
        Some(CancelReason::ParallelismCap) => {
            "cancelled: the user started more executions than their parallelism cap".into()
        }
    }
}

/// The result summary of a finished execution.
fn summarise(
    result: &ExecResult,
    shutdown_kill: bool,
    reason: Option<CancelReason>,
) -> ResultSummary {
    let outcome = &result.outcome;
    let (state, code, error) = if shutdown_kill && result.status == ExecStatus::Cancelled {
        (
            ExecState::Lost,
            Some("agent_shutdown"),
            Some(LOST_ON_SHUTDOWN.to_string()),
        )
    } else {
        let user_error = outcome.error.as_ref().map(|e| match &e.call {
            Some(call) if !call.is_empty() => format!("Error in {call}: {}", e.message),
            _ => e.message.clone(),
        });
        let (code, error) = match result.status {
            ExecStatus::Succeeded => (None, None),
            ExecStatus::Failed => match user_error {
                Some(e) => (None, Some(e)),
                // No error of the code's own: the sandbox died without a result.
                None => (Some("sandbox_died"), result.error.clone()),
            },
            ExecStatus::OutputLimit => {
                let events = result
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("events"));
                (
                    Some(if events {
                        "event_limit"
                    } else {
                        "output_limit"
                    }),
                    result.error.clone(),
                )
            }
            ExecStatus::ProtocolViolation => (Some("protocol_violation"), result.error.clone()),
            ExecStatus::Cancelled => (Some(cancel_code(reason)), Some(cancel_note(reason))),
            ExecStatus::OomKilled => (Some("memory_limit"), result.error.clone()),
            ExecStatus::TimedOut => (Some("time_limit"), result.error.clone()),
        };
        (state_of(result.status), code, error)
    };
    ResultSummary {
        state,
        error_code: code.map(str::to_string),
        value_json: outcome.value_json.clone(),
        error,
        warnings: outcome.warnings.clone(),
        exit_code: outcome.exit_code,
        usage: usage_of(&result.usage),
        start_ms: result.timings.start_ms,
        duration_ms: result.timings.total_ms,
        stdout_truncated: result.stdout_truncated,
        stderr_truncated: result.stderr_truncated,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lang: &str, org: &str, user: &str, created_at: u64) -> ExecutionRecord {
        ExecutionRecord {
            id: format!("{org}-{user}-{created_at}"),
            org: org.into(),
            user: user.into(),
            language: lang.into(),
            tab_id: None,
            model_id: None,
            state: ExecState::Succeeded,
            limits: crate::model::Limits {
                memory_bytes: 1 << 30,
                cpus: 1.0,
                pids: 64,
                time_limit_ms: 1000,
            },
            code_key: String::new(),
            result_key: None,
            created_at,
            started_at: None,
            finished_at: None,
            agent: None,
            cancel: None,
            error: None,
            last_seq: 0,
            admitted: 0,
            displaces: Vec::new(),
        }
    }

    #[test]
    fn pools_follow_recent_demand_and_policy_within_floor_and_max() {
        let floors: HashMap<String, usize> = [("r".to_string(), 1), ("bash".to_string(), 0)].into();
        let window = Duration::from_secs(600);
        let now = 10_000_000;
        // acme's users have warm_pool_size 3 (org policy), bob an override of 1; globex
        // the default 2.
        let policy = |org: &str, user: &str| match (org, user) {
            ("acme", "bob") => 1,
            ("acme", _) => 3,
            _ => 2,
        };
        let recent = vec![
            rec("r", "acme", "alice", now - 1_000),
            rec("r", "acme", "alice", now - 2_000), // the same user counts once
            rec("r", "acme", "bob", now - 3_000),
            rec("bash", "globex", "eve", now - 4_000),
            rec("r", "initech", "old", now - 700_000), // outside the window
        ];
        let sizes = desired_pool_sizes(&recent, now, window, &floors, 8, policy);
        assert_eq!(sizes["r"], 3 + 1);
        assert_eq!(sizes["bash"], 2);
        // Nobody active: back to the floors; no idle capacity kept just in case.
        let idle = desired_pool_sizes(&[], now, window, &floors, 8, policy);
        assert_eq!((idle["r"], idle["bash"]), (1, 0));
        // Demand above the maximum is capped.
        let many: Vec<_> = (0..10)
            .map(|i| rec("r", "acme", &format!("u{i}"), now))
            .collect();
        assert_eq!(
            desired_pool_sizes(&many, now, window, &floors, 8, policy)["r"],
            8
        );
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let text = "größe €";
        let bytes = text.as_bytes();
        let mut carry = Vec::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(1) {
            if let Some(s) = decode_chunk(&mut carry, chunk) {
                // Every piece handed on is whole text.
                assert!(std::str::from_utf8(&s).is_ok(), "{s:?}");
                out.extend_from_slice(&s);
            }
        }
        assert!(carry.is_empty());
        assert_eq!(out, bytes);
    }

    #[test]
    fn invalid_utf8_is_carried_exactly_not_held() {
        let mut carry = Vec::new();
        let piece = decode_chunk(&mut carry, b"a\xffb").unwrap();
        assert!(carry.is_empty());
        let data = OutputData::from_bytes(piece);
        assert_eq!(data.data, "a\u{fffd}b");
        assert_eq!(data.bytes(), b"a\xffb");
        // A lone continuation byte at the end is invalid, not incomplete.
        assert_eq!(
            decode_chunk(&mut carry, b"x\x80").as_deref(),
            Some(&b"x\x80"[..])
        );
        // An incomplete 3-byte sequence waits.
        assert_eq!(
            decode_chunk(&mut carry, b"y\xe2\x82").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(carry, b"\xe2\x82");
        assert_eq!(
            decode_chunk(&mut carry, b"\xac").as_deref(),
            Some("€".as_bytes())
        );
        // Valid text has no base64 copy.
        assert_eq!(OutputData::from_bytes(b"ok".to_vec()).data_base64, None);
    }

    #[test]
    fn states_follow_the_pool() {
        assert_eq!(state_of(ExecStatus::Succeeded), ExecState::Succeeded);
        assert_eq!(state_of(ExecStatus::Failed), ExecState::Failed);
        assert_eq!(state_of(ExecStatus::OomKilled), ExecState::OomKilled);
        assert_eq!(state_of(ExecStatus::TimedOut), ExecState::TimedOut);
        assert_eq!(state_of(ExecStatus::Cancelled), ExecState::Cancelled);
        assert_eq!(state_of(ExecStatus::OutputLimit), ExecState::OutputLimit);
        assert_eq!(state_of(ExecStatus::ProtocolViolation), ExecState::Failed);
    }

    fn result(status: ExecStatus) -> ExecResult {
        ExecResult {
            id: "sb-1".into(),
            status,
            outcome: Default::default(),
            error: Some("runtime note".into()),
            timings: Default::default(),
            usage: Default::default(),
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }

    #[test]
    fn summaries_say_why() {
        let s = summarise(&result(ExecStatus::OutputLimit), false, None);
        assert_eq!(
            (s.state, s.error_code.as_deref(), s.error.as_deref()),
            (
                ExecState::OutputLimit,
                Some("output_limit"),
                Some("runtime note")
            )
        );
        let s = summarise(&result(ExecStatus::ProtocolViolation), false, None);
        assert_eq!(
            (s.state, s.error_code.as_deref()),
            (ExecState::Failed, Some("protocol_violation"))
        );
        let s = summarise(&result(ExecStatus::TimedOut), false, None);
        assert_eq!(s.error_code.as_deref(), Some("time_limit"));
        let s = summarise(
            &result(ExecStatus::Cancelled),
            false,
            Some(CancelReason::SupersededByTab),
        );
        assert_eq!(s.state, ExecState::Cancelled);
        assert!(s.error.unwrap().contains("same tab"));
        let s = summarise(&result(ExecStatus::Cancelled), true, None);
        assert_eq!(
            (s.state, s.error.as_deref()),
            (ExecState::Lost, Some(LOST_ON_SHUTDOWN))
        );
        let mut failed = result(ExecStatus::Failed);
        failed.outcome.error = Some(hatchery_sandbox::zygote::protocol::ErrorInfo {
            message: "boom".into(),
            call: Some("f()".into()),
            kind: "runtime".into(),
        });
        let s = summarise(&failed, false, None);
        assert_eq!(s.error.as_deref(), Some("Error in f(): boom"));
        let s = summarise(&result(ExecStatus::Succeeded), false, None);
        assert_eq!(s.error, None);
    }

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
