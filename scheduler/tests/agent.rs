//! The agent and the scheduler role, end to end on this host: executions admitted into an
//! embedded store, their code sealed in local encrypted objects, submitted on an embedded
//! bus, placed by `run_scheduler`, run by an agent driving a real R warm pool.
//!
//! Every test has its own store, bus, objects, agent id and cgroup parent
//! (`hatchery/agenttest<name>-<pid>-<n>`), so tests run in parallel; each checks that its
//! parent is empty once its agent has shut down.
//!
//! Needs root, `cargo build -p hatchery-sandbox --bins` (same profile as the tests) and the
//! R root filesystem (`HATCHERY_ROOTFS`, default /var/lib/hatchery/rootfs/r). These tests
//! never skip: a missing prerequisite is a failure that says how to fix it.
//! Run: `cargo test -p hatchery-scheduler --test agent`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hatchery_scheduler::agent::{Agent, AgentConfig, AgentHandle, LanguageConfig, LOST_ON_RESTART};
use hatchery_scheduler::bus::{AgentCommand, Bus, BusEvent, HostStatus};
use hatchery_scheduler::embedded::{EmbeddedBus, EmbeddedStore};
use hatchery_scheduler::encrypted::EncryptedObjects;
use hatchery_scheduler::model::{
    now_ms, CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, Limits, LiveBody,
    Millis, OutputData, Policy, ResultSummary,
};
use hatchery_scheduler::objects::Objects;
use hatchery_scheduler::scheduling::run_scheduler;
use hatchery_scheduler::seal::Keyring;
use hatchery_scheduler::store::{
    ActiveCounts, Admission, AdmissionRules, Lease, ListFilter, Store, StoreResult,
};

const MIB: u64 = 1 << 20;

fn require_root() {
    // SAFETY: geteuid cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the agent tests must run as root (euid {euid}): they start real sandboxes"
    );
}

/// `target/<profile>`, from the running test binary (`target/<profile>/deps/…`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a directory");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

fn binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    assert!(
        path.is_file(),
        "{} does not exist: build it with `cargo build -p hatchery-sandbox --bins` \
         (same profile as the tests)",
        path.display()
    );
    path
}

fn rootfs() -> PathBuf {
    let path = std::env::var_os("HATCHERY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(hatchery_sandbox::DEFAULT_ROOTFS));
    assert!(
        path.join("usr/lib/R").is_dir(),
        "no R root filesystem at {}: build it with \
         `cargo run --release -p rootfs-builder -- build rootfs-builder/manifests/r.toml` \
         or point HATCHERY_ROOTFS at one",
        path.display()
    );
    path
}

/// A cgroup parent of one test, removed on drop.
struct CgroupParent {
    rel: String,
}

impl CgroupParent {
    /// `hatchery/agenttest<name>-<pid>-<n>`: three dash-separated parts, so no gc ever
    /// takes it for a sandbox of a dead owner.
    fn new(name: &str) -> CgroupParent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        CgroupParent {
            rel: format!("hatchery/agenttest{name}-{}-{n}", std::process::id()),
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut out = vec![root.join(&self.rel)];
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            out.push(e.path().join(&self.rel));
        }
        out.retain(|p| p.is_dir());
        out
    }

    /// Sandbox cgroups left under the parent, in any hierarchy.
    fn children(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dir in self.dirs() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    names.push(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        // A just-emptied cgroup may refuse removal for a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let dirs = self.dirs();
            if dirs.is_empty() || Instant::now() > deadline {
                return;
            }
            for dir in dirs {
                let _ = std::fs::remove_dir(dir);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A store that counts, per execution, the calls that change it: each is one
/// transaction (one `change` of the embedded store, one PostgreSQL transaction).
struct CountingStore {
    inner: EmbeddedStore,
    writes: std::sync::Mutex<std::collections::HashMap<String, Vec<&'static str>>>,
    /// Set: the store records a cancel of every execution the moment after
    /// `mark_running` answered (a cancel decided in between whose bus message is lost).
    cancel_after_mark: std::sync::atomic::AtomicBool,
    /// Set to a cgroup parent and a memory limit: when an execution is made terminal,
    /// the store counts the sandboxes under it that still run with that limit (see
    /// [`hatchery_tests::live_sandboxes`]).
    watch: std::sync::Mutex<Option<(String, u64)>>,
    live_at_end: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

impl CountingStore {
    fn count(&self, id: &str, what: &'static str) {
        self.writes
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .push(what);
    }

    fn note_live(&self, id: &str) {
        let Some((parent, memory)) = self.watch.lock().unwrap().clone() else {
            return;
        };
        let live = hatchery_tests::live_sandboxes(&parent, memory);
        self.live_at_end
            .lock()
            .unwrap()
            .insert(id.to_string(), live);
    }

    /// The store transactions that changed `id`, by kind.
    fn writes_of(&self, id: &str) -> Vec<&'static str> {
        self.writes
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Store for CountingStore {
    async fn get_org_policy(&self, org: &str) -> StoreResult<Option<Policy>> {
        self.inner.get_org_policy(org).await
    }
    async fn put_org_policy(&self, org: &str, policy: Policy) -> StoreResult<()> {
        self.inner.put_org_policy(org, policy).await
    }
    async fn get_user_policy(&self, org: &str, user: &str) -> StoreResult<Option<Policy>> {
        self.inner.get_user_policy(org, user).await
    }
    async fn put_user_policy(&self, org: &str, user: &str, policy: Policy) -> StoreResult<()> {
        self.inner.put_user_policy(org, user, policy).await
    }
    async fn admit(
        &self,
        record: ExecutionRecord,
        rules: AdmissionRules,
    ) -> StoreResult<Admission> {
        self.count(&record.id, "admit");
        self.inner.admit(record, rules).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<ExecutionRecord>> {
        self.inner.get(id).await
    }
    async fn active_counts(&self) -> StoreResult<ActiveCounts> {
        self.inner.active_counts().await
    }
    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<ExecutionRecord>> {
        self.inner.list(filter).await
    }
    async fn request_cancel(
        &self,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>> {
        self.count(id, "request_cancel");
        self.inner.request_cancel(id, reason).await
    }
    async fn mark_running(
        &self,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        self.count(id, "mark_running");
        let record = self.inner.mark_running(id, agent, at).await?;
        if self.cancel_after_mark.load(Ordering::SeqCst) {
            self.inner
                .request_cancel(id, CancelReason::Requested)
                .await?;
        }
        Ok(record)
    }
    async fn mark_finished(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        self.count(id, "mark_finished");
        self.note_live(id);
        self.inner
            .mark_finished(id, state, result_key, error, at)
            .await
    }
    async fn finish(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        at: Millis,
        summary: ResultSummary,
    ) -> StoreResult<(ExecutionRecord, ExecEvent)> {
        self.count(id, "finish");
        self.note_live(id);
        self.inner.finish(id, state, result_key, at, summary).await
    }
    async fn register_host(&self, agent: &str, lease_ms: u64) -> StoreResult<()> {
        self.inner.register_host(agent, lease_ms).await
    }
    async fn heartbeat(&self, agent: &str, lease_ms: u64) -> StoreResult<Lease> {
        self.inner.heartbeat(agent, lease_ms).await
    }
    async fn set_host_state(
        &self,
        agent: &str,
        state: hatchery_scheduler::model::HostState,
    ) -> StoreResult<hatchery_scheduler::model::HostRecord> {
        self.inner.set_host_state(agent, state).await
    }
    async fn hosts(&self) -> StoreResult<Vec<hatchery_scheduler::model::HostRecord>> {
        self.inner.hosts().await
    }
    async fn put_group_statuses(
        &self,
        groups: &[hatchery_scheduler::model::GroupStatus],
    ) -> StoreResult<()> {
        self.inner.put_group_statuses(groups).await
    }
    async fn group_statuses(&self) -> StoreResult<Vec<hatchery_scheduler::model::GroupStatus>> {
        self.inner.group_statuses().await
    }
    async fn reap_lapsed_hosts(&self) -> StoreResult<Vec<ExecEvent>> {
        self.inner.reap_lapsed_hosts().await
    }
    async fn lead(&self, role: &str, holder: &str, lease_ms: u64) -> StoreResult<Option<u64>> {
        self.inner.lead(role, holder, lease_ms).await
    }
    async fn append_event(&self, id: &str, body: EventBody) -> StoreResult<ExecEvent> {
        self.count(id, "append_event");
        self.inner.append_event(id, body).await
    }
    async fn append_events(&self, id: &str, bodies: Vec<EventBody>) -> StoreResult<Vec<ExecEvent>> {
        self.count(id, "append_events");
        self.inner.append_events(id, bodies).await
    }
    async fn events_after(&self, id: &str, after: u64) -> StoreResult<Vec<ExecEvent>> {
        self.inner.events_after(id, after).await
    }
    async fn expired(&self, before: Millis, limit: usize) -> StoreResult<Vec<ExecutionRecord>> {
        self.inner.expired(before, limit).await
    }
    async fn delete_expired(&self, ids: &[String], before: Millis) -> StoreResult<Vec<String>> {
        self.inner.delete_expired(ids, before).await
    }
}

/// One platform slice: store, bus, objects, the scheduler role and one agent.
struct Env {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    /// The same store, for its counts.
    counting: Arc<CountingStore>,
    bus: Arc<dyn Bus>,
    objects: Arc<dyn Objects>,
    agent: Option<AgentHandle>,
    scheduler: tokio::task::JoinHandle<()>,
    cgroup: CgroupParent,
    agent_id: String,
}

/// The keys the test backends seal with.
fn keyring() -> Keyring {
    Keyring::single([7u8; 32])
}

fn agent_config(id: &str, cgroup: &CgroupParent, capacity: u32) -> AgentConfig {
    let mut cfg = AgentConfig::new(id);
    cfg.capacity = capacity;
    cfg.languages = vec![LanguageConfig {
        name: "r".into(),
        packages: Vec::new(),
        pool_size: 1,
    }];
    cfg.rootfs = rootfs();
    cfg.sandbox_bin = binary("sandbox");
    cfg.zygote_bin = binary("hatchery-zygote");
    cfg.cgroup_parent = cgroup.rel.clone();
    cfg.usage_interval = Duration::from_millis(100);
    cfg.status_interval = Duration::from_millis(200);
    // These hosts stop at once when shut down: what runs is killed (the drain that waits
    // is in the cluster tests).
    cfg.drain_deadline = Some(Duration::ZERO);
    cfg
}

/// The error of an execution its agent killed when it shut down (deadline 0).
fn killed_at_shutdown() -> String {
    hatchery_scheduler::agent::DrainForced::Deadline(Duration::ZERO).note()
}

impl Env {
    /// The backends only (no agent yet).
    fn backends(name: &str) -> Env {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let counting = Arc::new(CountingStore {
            inner: EmbeddedStore::open(&dir.path().join("store"), keyring()).expect("open store"),
            writes: Default::default(),
            cancel_after_mark: Default::default(),
            watch: Default::default(),
            live_at_end: Default::default(),
        });
        let store: Arc<dyn Store> = counting.clone();
        let bus: Arc<dyn Bus> = Arc::new(EmbeddedBus::new());
        let objects: Arc<dyn Objects> = Arc::new(
            EncryptedObjects::local(&dir.path().join("objects"), keyring()).expect("objects"),
        );
        let statuses = bus.subscribe_status();
        let scheduler = {
            let (store, bus) = (Arc::clone(&store), Arc::clone(&bus));
            tokio::spawn(async move {
                let _ = run_scheduler(store, bus, statuses, None).await;
            })
        };
        Env {
            _dir: dir,
            store,
            counting,
            bus,
            objects,
            agent: None,
            scheduler,
            cgroup: CgroupParent::new(name),
            agent_id: format!("agent-{name}-{}", std::process::id()),
        }
    }

    async fn start_agent(&mut self, capacity: u32) {
        let cfg = agent_config(&self.agent_id, &self.cgroup, capacity);
        let agent = Agent::start(
            cfg,
            Arc::clone(&self.store),
            Arc::clone(&self.bus),
            Arc::clone(&self.objects),
        )
        .await
        .expect("start the agent");
        agent
            .wait_ready(Duration::from_secs(120))
            .await
            .expect("the R pool becomes ready");
        self.agent = Some(agent);
    }

    async fn new(name: &str, capacity: u32) -> Env {
        let mut env = Env::backends(name);
        env.start_agent(capacity).await;
        env
    }

    fn agent(&self) -> &AgentHandle {
        self.agent.as_ref().expect("agent started")
    }

    /// Admits an R execution (code sealed first), then submits it.
    async fn submit(&self, code: &str, limits: Limits) -> String {
        let record = self.record(limits);
        let id = record.id.clone();
        self.objects
            .put(&record.code_key, code.as_bytes().to_vec())
            .await
            .expect("put code");
        let rules = AdmissionRules {
            max_parallel: 100,
            max_queued: 100,
        };
        let admitted = self.store.admit(record, rules).await.expect("admit");
        assert!(
            matches!(admitted, Admission::Admitted { .. }),
            "{admitted:?}"
        );
        self.bus.submit(&id).await.expect("submit");
        id
    }

    fn record(&self, limits: Limits) -> ExecutionRecord {
        let id = uuid::Uuid::new_v4().to_string();
        ExecutionRecord {
            code_key: format!("code/{id}"),
            ..ExecutionRecord::queued(id, "acme", "ada", "r", limits, now_ms())
        }
    }

    async fn get(&self, id: &str) -> ExecutionRecord {
        self.store
            .get(id)
            .await
            .expect("get")
            .expect("the record exists")
    }

    /// Waits for `id` to reach a terminal state.
    async fn finished(&self, id: &str, within: Duration) -> ExecutionRecord {
        let deadline = Instant::now() + within;
        loop {
            let r = self.get(id).await;
            // The record turns terminal just before the `finished` event is appended.
            let logged = self
                .events(id)
                .await
                .last()
                .is_some_and(|e| matches!(e.body, EventBody::Finished(_)));
            if r.state.is_terminal() && logged {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{id} still {:?} after {within:?}",
                r.state
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_state(&self, id: &str, state: ExecState, within: Duration) -> ExecutionRecord {
        let deadline = Instant::now() + within;
        loop {
            let r = self.get(id).await;
            if r.state == state {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {:?}, not {state:?}, after {within:?}",
                r.state
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn events(&self, id: &str) -> Vec<ExecEvent> {
        self.store.events_after(id, 0).await.expect("events")
    }

    /// The result: the object if it was large, else what the `finished` event carries.
    async fn result(&self, record: &ExecutionRecord) -> ResultSummary {
        match record.result_key.as_deref() {
            Some(key) => {
                assert_eq!(key, format!("results/{}", record.id));
                let bytes = self.objects.get(key).await.expect("result object");
                serde_json::from_slice(&bytes).expect("result JSON")
            }
            None => match self.events(&record.id).await.pop().map(|e| e.body) {
                Some(EventBody::Finished(summary)) => summary,
                other => panic!("the last event of {} is {other:?}", record.id),
            },
        }
    }

    /// Shuts everything down and checks nothing is left in the cgroup parent.
    async fn close(mut self) {
        if let Some(agent) = self.agent.take() {
            agent.shutdown().await;
        }
        self.scheduler.abort();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.cgroup.children().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            self.cgroup.children(),
            Vec::<String>::new(),
            "cgroups left behind"
        );
    }
}

fn limits(memory_bytes: u64, time_limit_ms: u64) -> Limits {
    Limits {
        memory_bytes,
        cpus: 1.0,
        pids: 128,
        time_limit_ms,
        max_artifacts: 0,
        max_artifact_bytes: 0,
    }
}

fn kinds(events: &[ExecEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match &e.body {
            EventBody::Queued => "queued",
            EventBody::Started { .. } => "started",
            EventBody::Stdout { .. } => "stdout",
            EventBody::Stderr { .. } => "stderr",
            EventBody::Progress { .. } => "progress",
            EventBody::Usage(_) => "usage",
            EventBody::Artifact(_) => "artifact",
            EventBody::Finished(_) => "finished",
        })
        .collect()
}

/// The event log of an execution is gapless, starts queued → started, ends finished, and
/// holds no usage samples (they are live-only).
fn check_log(id: &str, events: &[ExecEvent]) {
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(seqs, want, "sequence numbers of {id}");
    assert!(events.iter().all(|e| e.execution_id == id));
    let k = kinds(events);
    assert_eq!(&k[..2], ["queued", "started"], "{k:?}");
    assert_eq!(k.last(), Some(&"finished"), "{k:?}");
    assert_eq!(k.iter().filter(|k| **k == "finished").count(), 1, "{k:?}");
    assert_eq!(k.iter().filter(|k| **k == "started").count(), 1, "{k:?}");
    assert!(!k.contains(&"usage"), "usage samples in the log: {k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_execution_runs_streams_in_order_and_stores_its_encrypted_result() {
    let env = Env::new("happy", 2).await;
    let mut live = env.bus.subscribe_events();
    let id = env
        .submit(
            r#"cat("hi\n"); progress(0.5, "x"); 41 + 1"#,
            limits(512 * MIB, 30_000),
        )
        .await;
    let record = env.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::Succeeded, "{record:?}");
    assert_eq!(record.agent.as_deref(), Some(env.agent_id.as_str()));
    assert!(record.started_at.is_some() && record.finished_at.is_some());

    let events = env.events(&id).await;
    check_log(&id, &events);
    // R's output travels on the sandbox's channel with progress and the result, so
    // their order is the order the code produced them in. A printed value may come in
    // more than one chunk: a run of output events is compared as one.
    let mut runs: Vec<(&str, String)> = Vec::new();
    for (kind, e) in kinds(&events).into_iter().zip(&events) {
        let text = match &e.body {
            EventBody::Stdout(OutputData { data, .. }) => data.as_str(),
            _ => "",
        };
        match runs.last_mut() {
            Some(("stdout", t)) if kind == "stdout" => t.push_str(text),
            _ => runs.push((kind, text.to_string())),
        }
    }
    let runs: Vec<(&str, &str)> = runs.iter().map(|(k, t)| (*k, t.as_str())).collect();
    assert_eq!(
        runs,
        [
            ("queued", ""),
            ("started", ""),
            ("stdout", "hi\n"),
            ("progress", ""),
            ("stdout", "[1] 42\n"),
            ("finished", ""),
        ],
        "{events:#?}"
    );
    let progress: Vec<&EventBody> = events
        .iter()
        .map(|e| &e.body)
        .filter(|b| matches!(b, EventBody::Progress { .. }))
        .collect();
    assert_eq!(
        progress,
        [&EventBody::Progress {
            fraction: 0.5,
            message: "x".into()
        }]
    );
    match &events[1].body {
        EventBody::Started { agent, start_ms } => {
            assert_eq!(agent, &env.agent_id);
            assert!(start_ms.is_some_and(|ms| ms >= 0.0), "{start_ms:?}");
        }
        other => panic!("{other:?}"),
    }
    let EventBody::Finished(summary) = &events.last().unwrap().body else {
        unreachable!()
    };

    // A small result is only in the `finished` event: no object-store round trip.
    assert_eq!(record.result_key, None);
    assert!(!env._dir.path().join("objects/results").join(&id).exists());
    let result = env.result(&record).await;
    // (Compared after the same JSON round trip: floats may not survive it bit for bit.)
    let round_trip = |s: &ResultSummary| -> ResultSummary {
        serde_json::from_slice(&serde_json::to_vec(s).unwrap()).unwrap()
    };
    assert_eq!(round_trip(&result), round_trip(summary));
    assert_eq!(result.state, ExecState::Succeeded);
    assert_eq!(result.value_json.as_deref(), Some("42"));
    assert_eq!(result.error, None);
    assert!(result.duration_ms > 0.0);

    // The bus carried the same events, in the same order (and perhaps usage samples,
    // which are not in the log).
    let mut published = Vec::new();
    while published.len() < events.len() - 1 {
        let e = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("a live event")
            .item()
            .expect("an item: no lag");
        match e {
            BusEvent::Stored(e) if e.execution_id == id => published.push(e),
            _ => {}
        }
    }
    // `queued` is appended by admission, not published by the agent.
    assert_eq!(published[..], events[1..], "live events");

    // A large result is an object too, sealed, holding what the `finished` event says.
    let id = env
        .submit(
            r#"paste(rep("secret-value", 10000), collapse = "")"#,
            limits(512 * MIB, 30_000),
        )
        .await;
    let record = env.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::Succeeded, "{record:?}");
    let result = env.result(&record).await;
    assert!(result
        .value_json
        .as_ref()
        .is_some_and(|v| v.len() > 100_000));
    let EventBody::Finished(logged) = env.events(&id).await.pop().unwrap().body else {
        panic!("not finished last")
    };
    let logged: ResultSummary =
        serde_json::from_slice(&serde_json::to_vec(&logged).unwrap()).unwrap();
    assert_eq!(result, logged);
    // On disk it is sealed: the plaintext is nowhere in the objects directory.
    let raw = std::fs::read(env._dir.path().join("objects/results").join(&id))
        .expect("the sealed result file");
    let raw = String::from_utf8_lossy(&raw);
    assert!(!raw.contains("value_json") && !raw.contains("secret-value"));
    env.close().await;
}

/// How the output of one execution was stored.
struct OutputWrites {
    /// Batches of output stored (one transaction each).
    batches: usize,
    output_events: usize,
    /// From the first stored output event to the last (ms, by the store's clock).
    span_ms: u64,
}

/// Stores the output of `code` and says how many store transactions its output took.
async fn transactions_of_output(env: &Env, code: &str, lines: usize) -> OutputWrites {
    let id = env.submit(code, limits(512 * MIB, 60_000)).await;
    let record = env.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::Succeeded, "{record:?}");
    let events = env.events(&id).await;
    check_log(&id, &events);
    // Every line arrived, in order, on its stream.
    let text = |want: fn(&EventBody) -> Option<&OutputData>| -> String {
        events
            .iter()
            .filter_map(|e| want(&e.body))
            .map(|d| d.data.as_str())
            .collect()
    };
    let stdout = text(|b| match b {
        EventBody::Stdout(d) => Some(d),
        _ => None,
    });
    let stderr = text(|b| match b {
        EventBody::Stderr(d) => Some(d),
        _ => None,
    });
    let out_lines: Vec<&str> = stdout.lines().chain(stderr.lines()).collect();
    assert_eq!(out_lines.len(), lines, "{stdout:?} {stderr:?}");
    let writes = env.counting.writes_of(&id);
    let output_events = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Stdout(_) | EventBody::Stderr(_)))
        .count();
    let output_at: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e.body, EventBody::Stdout(_) | EventBody::Stderr(_)))
        .map(|e| e.at)
        .collect();
    let span_ms = output_at.last().unwrap() - output_at.first().unwrap();
    let batches = writes.iter().filter(|w| **w == "append_events").count();
    eprintln!(
        "{lines} lines: {output_events} output events over {span_ms} ms, {batches} batches, \
         {} store transactions: {writes:?}",
        writes.len()
    );
    OutputWrites {
        batches,
        output_events,
        span_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn output_is_stored_in_few_transactions() {
    let env = Env::new("batching", 1).await;
    let interval = hatchery_scheduler::agent::OUTPUT_BATCH_INTERVAL.as_millis() as u64;
    let cases = [
        // Alternating streams: the pool cannot merge them into one piece.
        (
            r#"for (i in 1:500) { cat("out", i, "\n"); message("err ", i) }"#,
            1000,
        ),
        (r#"for (i in 1:1000) cat("line", i, "\n")"#, 1000),
        // Output that trickles, slower than the store takes it: storing each piece as
        // soon as the store is free would cost a transaction per line.
        (
            r#"for (i in 1:100) { cat("out", i, "\n"); message("err ", i); Sys.sleep(0.002) }"#,
            200,
        ),
    ];
    for (code, lines) in cases {
        let w = transactions_of_output(&env, code, lines).await;
        // Batches are paced: at most one per interval while output keeps coming (plus
        // the first, and the flushes `started` and `finished` force), however fast or
        // slow the machine makes the code; one transaction per piece of output would be
        // about as many as there are events.
        let most = (w.span_ms / interval + 3) as usize;
        assert!(
            w.batches <= most,
            "{code}: {} batches for {} output events over {} ms: more than {most}, not paced",
            w.batches,
            w.output_events,
            w.span_ms
        );
    }
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_are_applied_at_claim_and_change_per_execution() {
    let env = Env::new("limits", 1).await;
    let alloc = "x <- numeric(25e6); x[1] <- 1; length(x)"; // 200 MB
    let small = env.submit(alloc, limits(64 * MIB, 60_000)).await;
    let record = env.finished(&small, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::OomKilled, "{record:?}");
    let result = env.result(&record).await;
    assert_eq!(result.state, ExecState::OomKilled);
    assert!(result.error.is_some());
    check_log(&small, &env.events(&small).await);

    // A larger limit on the next execution: same pool, no restart (R8).
    let large = env.submit(alloc, limits(512 * MIB, 60_000)).await;
    let record = env.finished(&large, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::Succeeded, "{record:?}");
    let result = env.result(&record).await;
    assert_eq!(result.value_json.as_deref(), Some("25000000"));
    assert!(
        result.usage.memory_peak_bytes > 150 * MIB,
        "{:?}",
        result.usage
    );
    let stats = env.agent().pool_stats("r").expect("an r pool");
    assert_eq!(stats.zygote_starts, 1, "{stats:?}");
    assert!(stats.claimed >= 2, "{stats:?}");
    env.close().await;
}

/// R11 across hosts rests on this: an execution turns terminal in the store (and stops
/// counting against its user's cap, so the user's next one may start at once) only once
/// every process of its sandbox is gone. The result comes back while they still die: a
/// process that touched 1.6 GB takes the kernel a while to tear down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_execution_is_terminal_only_once_its_sandbox_is_gone() {
    let env = Env::new("gone", 1).await;
    // Within what the agent has even in the cgroup v2 VM (3 GiB of guest memory).
    let memory = 1536 * MIB;
    *env.counting.watch.lock().unwrap() = Some((env.cgroup.rel.clone(), memory));
    let big = "x <- numeric(1e8); length(x)";
    let id = env.submit(big, limits(memory, 60_000)).await;
    let record = env.finished(&id, Duration::from_secs(60)).await;
    assert_eq!(record.state, ExecState::Succeeded, "{record:?}");
    assert_eq!(
        env.result(&record).await.value_json.as_deref(),
        Some("100000000")
    );
    let live = env.counting.live_at_end.lock().unwrap().get(&id).copied();
    assert_eq!(
        live,
        Some(0),
        "sandboxes still running when the execution was made terminal"
    );
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_time_limit_counts_from_code_start() {
    let env = Env::new("timeout", 1).await;
    let id = env.submit("repeat {}", limits(256 * MIB, 1_000)).await;
    let record = env.finished(&id, Duration::from_secs(30)).await;
    assert_eq!(record.state, ExecState::TimedOut, "{record:?}");
    let result = env.result(&record).await;
    // Killed at the limit: 1.5 s of slack for a loaded machine, far less than any later
    // fallback kill would take.
    assert!(
        (1_000.0..=2_500.0).contains(&result.duration_ms),
        "a 1 s time limit ended the execution after {} ms",
        result.duration_ms
    );
    assert_eq!(record.error, result.error);
    check_log(&id, &env.events(&id).await);
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_the_bus_stops_a_running_execution_and_status_shows_it_live() {
    let env = Env::new("cancel", 2).await;
    let mut statuses = env.bus.subscribe_status();
    let mut live = env.bus.subscribe_events();
    let id = env
        .submit(
            "x <- numeric(5e6); cat('go\\n'); Sys.sleep(60)",
            limits(256 * MIB, 120_000),
        )
        .await;
    env.wait_state(&id, ExecState::Running, Duration::from_secs(30))
        .await;
    // Its output says the allocation is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env
        .events(&id)
        .await
        .iter()
        .any(|e| e.body == EventBody::Stdout(OutputData::text("go\n")))
    {
        assert!(
            Instant::now() < deadline,
            "no output from {id}: {:?}",
            env.events(&id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The host status lists it with its live usage (R13).
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen: HostStatus = loop {
        let s = tokio::time::timeout(Duration::from_secs(5), statuses.recv())
            .await
            .expect("a status")
            .item()
            .expect("an item: no lag");
        if s.agent == env.agent_id
            && s.sandboxes
                .iter()
                .any(|u| u.execution_id == id && u.usage.memory_bytes > 30 * MIB)
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "never saw {id} with usage: {s:?}"
        );
    };
    assert_eq!(seen.running, 1);
    assert_eq!(seen.capacity, 2);
    assert!(!seen.draining);
    let u = seen
        .sandboxes
        .iter()
        .find(|u| u.execution_id == id)
        .unwrap();
    assert_eq!((u.org.as_str(), u.user.as_str()), ("acme", "ada"));

    // Its usage samples are on the bus, live only: no seq.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("an event")
            .item()
            .expect("an item: no lag");
        if let BusEvent::Live(e) = &e {
            let LiveBody::Usage(u) = &e.body;
            if e.execution_id == id && u.memory_bytes > 30 * MIB {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no live usage sample of {id}");
    }

    // What the api does on a cancel: mark it in the store, tell the record's agent.
    let marked = env
        .store
        .request_cancel(&id, CancelReason::Requested)
        .await
        .expect("cancel")
        .expect("exists");
    let agent = marked.agent.expect("it runs on an agent");
    env.bus
        .send_to_agent(
            &agent,
            AgentCommand::Cancel {
                execution_id: id.clone(),
            },
        )
        .await
        .expect("send");
    let record = env.finished(&id, Duration::from_secs(10)).await;
    assert_eq!(record.state, ExecState::Cancelled, "{record:?}");
    let events = env.events(&id).await;
    check_log(&id, &events);
    let result = env.result(&record).await;
    assert_eq!(result.state, ExecState::Cancelled);
    // The result still carries the usage summary.
    assert!(
        result.usage.memory_peak_bytes > 30 * MIB,
        "{:?}",
        result.usage
    );
    env.close().await;
}

/// A cancel the store took between `mark_running` and the claim, whose bus message never
/// came: the agent reads the record beside the run (not before it) and stops the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_stored_right_after_mark_running_stops_the_run_without_a_bus_message() {
    let env = Env::new("cancelaftermark", 2).await;
    env.counting.cancel_after_mark.store(true, Ordering::SeqCst);
    let began = Instant::now();
    let id = env
        .submit(
            "Sys.sleep(30); cat('should not run to the end\\n')",
            limits(256 * MIB, 120_000),
        )
        .await;
    let record = env.finished(&id, Duration::from_secs(20)).await;
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "the run was not stopped: {:?}",
        began.elapsed()
    );
    assert_eq!(record.state, ExecState::Cancelled, "{record:?}");
    assert_eq!(record.cancel, Some(CancelReason::Requested));
    let events = env.events(&id).await;
    check_log(&id, &events);
    assert!(
        !events
            .iter()
            .any(|e| matches!(&e.body, EventBody::Stdout(d) if d.data.contains("should not"))),
        "{events:?}"
    );
    let EventBody::Finished(summary) = &events.last().unwrap().body else {
        unreachable!()
    };
    assert_eq!(summary.state, ExecState::Cancelled);
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_beyond_capacity_wait_for_a_slot() {
    let env = Env::new("capacity", 1).await;
    let a = env
        .submit("Sys.sleep(0.5); 1", limits(256 * MIB, 30_000))
        .await;
    let b = env
        .submit("Sys.sleep(0.5); 2", limits(256 * MIB, 30_000))
        .await;
    let ra = env.finished(&a, Duration::from_secs(60)).await;
    let rb = env.finished(&b, Duration::from_secs(60)).await;
    assert_eq!(
        (ra.state, rb.state),
        (ExecState::Succeeded, ExecState::Succeeded)
    );
    // One slot: the second started only after the first had finished.
    assert!(
        rb.started_at.unwrap() >= ra.finished_at.unwrap(),
        "{ra:?}\n{rb:?}"
    );
    env.close().await;
}

/// An execution the agent kills because it shuts down before its sandbox was claimed (here:
/// while it waits for the run it displaced to die) stops waiting and ends `lost` like one
/// killed after the claim, not `cancelled` as if its user had asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_killed_by_shutdown_before_its_claim_is_lost_not_cancelled() {
    let mut env = Env::new("shutdownwait", 2).await;
    let rules = AdmissionRules {
        max_parallel: 100,
        max_queued: 100,
    };
    // A runs on a host that no longer answers; B, from the same tab, displaces it and
    // waits for it to die before its sandbox is thawed (R11).
    let mut a = env.record(limits(256 * MIB, 60_000));
    a.tab_id = Some("tab".into());
    let a_id = a.id.clone();
    env.store.admit(a, rules).await.expect("admit a");
    env.store
        .mark_running(&a_id, "a-host-gone-quiet", now_ms())
        .await
        .expect("a runs elsewhere");
    let mut b = env.record(limits(256 * MIB, 60_000));
    b.tab_id = Some("tab".into());
    let b_id = b.id.clone();
    env.objects
        .put(&b.code_key, b"1 + 1".to_vec())
        .await
        .expect("put code");
    env.store.admit(b, rules).await.expect("admit b");
    assert_eq!(env.get(&b_id).await.displaces, vec![a_id.clone()]);
    env.bus.submit(&b_id).await.expect("submit");
    env.wait_state(&b_id, ExecState::Running, Duration::from_secs(30))
        .await;

    // The agent shuts down while B waits: B stops waiting (it will not start), so the
    // shutdown does not wait for A, which never ends here.
    let agent = env.agent.take().expect("agent");
    // (B would otherwise wait 30 s for A before giving up.)
    tokio::time::timeout(Duration::from_secs(20), agent.shutdown())
        .await
        .expect("the shutdown waited for the displaced run");
    assert_eq!(env.get(&a_id).await.state, ExecState::Running);

    let record = env.finished(&b_id, Duration::from_secs(30)).await;
    assert_eq!(record.state, ExecState::Lost, "{record:?}");
    assert_eq!(record.error, Some(killed_at_shutdown()));
    let events = env.events(&b_id).await;
    let EventBody::Finished(summary) = &events.last().unwrap().body else {
        unreachable!()
    };
    assert_eq!(summary.error_code.as_deref(), Some("agent_shutdown"));
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_start_executions_of_a_previous_life_become_lost() {
    let mut env = Env::backends("reconcile");
    // A record the agent's previous life was running when it died.
    let record = env.record(limits(256 * MIB, 30_000));
    let id = record.id.clone();
    let rules = AdmissionRules {
        max_parallel: 10,
        max_queued: 10,
    };
    env.store.admit(record, rules).await.expect("admit");
    env.store
        .mark_running(&id, &env.agent_id, now_ms())
        .await
        .expect("mark running");
    // And one of another agent, which is not ours to touch.
    let other = env.record(limits(256 * MIB, 30_000));
    let other_id = other.id.clone();
    env.store.admit(other, rules).await.expect("admit");
    env.store
        .mark_running(&other_id, "some-other-agent", now_ms())
        .await
        .expect("mark running");

    env.start_agent(1).await;
    let r = env.get(&id).await;
    assert_eq!(r.state, ExecState::Lost, "{r:?}");
    assert_eq!(r.error.as_deref(), Some(LOST_ON_RESTART));
    let events = env.events(&id).await;
    assert_eq!(kinds(&events), ["queued", "finished"]);
    assert_eq!(events[1].seq, 2);
    match &events[1].body {
        EventBody::Finished(s) => {
            assert_eq!(s.state, ExecState::Lost);
            assert_eq!(s.error.as_deref(), Some(LOST_ON_RESTART));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(env.get(&other_id).await.state, ExecState::Running);
    env.close().await;
}

// ---------------------------------------------------------------------------------------
// The embedded node: the roles wired together behind the platform front door

mod node {
    use super::*;
    use hatchery_scheduler::model::{Principal, Role};
    use hatchery_scheduler::node::{EmbeddedNode, NodeConfig};
    use hatchery_scheduler::platform::{ExecutionView, Platform, PlatformConfig, SubmitRequest};

    fn ada() -> Principal {
        Principal {
            org: "acme".into(),
            user: "ada".into(),
            role: Role::User,
        }
    }

    fn request(code: &str, tab: Option<&str>) -> SubmitRequest {
        SubmitRequest {
            language: "r".into(),
            code: code.into(),
            tab_id: tab.map(str::to_string),
            model_id: None,
            limits: None,
        }
    }

    async fn start(data_dir: &Path, cgroup: &CgroupParent) -> EmbeddedNode {
        let cfg = NodeConfig {
            data_dir: data_dir.to_path_buf(),
            agent: agent_config(&format!("node-{}", std::process::id()), cgroup, 2),
            platform: PlatformConfig {
                languages: vec!["r".into()],
                ..PlatformConfig::default()
            },
            keyring: Keyring::single([9u8; 32]),
            postgres: None,
            redis: None,
            s3: None,
        };
        let node = EmbeddedNode::start(cfg).await.expect("start the node");
        node.wait_ready(Duration::from_secs(120))
            .await
            .expect("the node's pool becomes ready");
        node
    }

    async fn wait(p: &Platform, id: &str, done: impl Fn(&ExecutionView) -> bool) -> ExecutionView {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = p.get(&ada(), id).await.expect("get");
            if done(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{id}: {:?}", v.record);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_node_runs_supersedes_and_keeps_results_across_a_restart() {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let cgroup = CgroupParent::new("node");
        let node = start(dir.path(), &cgroup).await;
        let p = node.platform();

        let first = p
            .submit(&ada(), request("1 + 1", None))
            .await
            .expect("submit");
        let v = wait(&p, &first.id, |v| v.result.is_some()).await;
        assert_eq!(v.record.state, ExecState::Succeeded);
        assert_eq!(v.result.unwrap().value_json.as_deref(), Some("2"));

        // A re-run from the same tab cancels the tab's running execution (R10).
        let slow = p
            .submit(&ada(), request("Sys.sleep(60)", Some("tab-1")))
            .await
            .expect("submit");
        wait(&p, &slow.id, |v| v.record.state == ExecState::Running).await;
        let rerun = p
            .submit(&ada(), request("3 * 3", Some("tab-1")))
            .await
            .expect("submit");
        let v = wait(&p, &slow.id, |v| v.result.is_some()).await;
        assert_eq!(v.record.state, ExecState::Cancelled, "{:?}", v.record);
        assert!(v.record.error.unwrap().contains("same tab"));
        let v = wait(&p, &rerun.id, |v| v.result.is_some()).await;
        assert_eq!(v.result.unwrap().value_json.as_deref(), Some("9"));

        // One left running when the node stops.
        let left = p
            .submit(&ada(), request("Sys.sleep(60)", None))
            .await
            .expect("submit");
        wait(&p, &left.id, |v| v.record.state == ExecState::Running).await;
        node.shutdown().await;

        let node = start(dir.path(), &cgroup).await;
        let p = node.platform();
        let v = p.get(&ada(), &first.id).await.expect("get after restart");
        assert_eq!(v.result.unwrap().value_json.as_deref(), Some("2"));
        let v = p.get(&ada(), &left.id).await.expect("get after restart");
        assert_eq!(v.record.state, ExecState::Lost);
        assert_eq!(v.record.error, Some(killed_at_shutdown()));
        // And it still runs new work.
        let again = p
            .submit(&ada(), request("40 + 2", None))
            .await
            .expect("submit");
        let v = wait(&p, &again.id, |v| v.result.is_some()).await;
        assert_eq!(v.result.unwrap().value_json.as_deref(), Some("42"));
        node.shutdown().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cgroup.children().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            cgroup.children(),
            Vec::<String>::new(),
            "cgroups left behind"
        );
    }
}
