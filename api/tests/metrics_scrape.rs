//! `/metrics` over real HTTP against an in-process API whose store counts how often it is
//! scanned: scrapes read the store's kept counts and never list executions, however many
//! there are, and the gauges stay exact as executions change state.
//!
//! Needs neither root nor sandboxes: no agent runs; executions are moved through their
//! states directly in the store, as an agent would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use hatchery_api::auth::Auth;
use hatchery_api::{ApiServer, ServerOptions};
use hatchery_scheduler::embedded::{EmbeddedBus, EmbeddedStore};
use hatchery_scheduler::encrypted::{generate_key, EncryptedObjects};
use hatchery_scheduler::model::{
    CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, Millis, Policy, Principal,
    ResultSummary, Role,
};
use hatchery_scheduler::platform::{Platform, PlatformConfig, SubmitRequest};
use hatchery_scheduler::seal::Keyring;
use hatchery_scheduler::store::{
    ActiveCounts, Admission, AdmissionRules, Lease, ListFilter, Store, StoreResult,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An [`EmbeddedStore`] that counts the calls that read executions.
struct CountingStore {
    inner: EmbeddedStore,
    lists: AtomicUsize,
    gets: AtomicUsize,
}

#[async_trait]
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
        self.inner.admit(record, rules).await
    }
    async fn get(&self, id: &str) -> StoreResult<Option<ExecutionRecord>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(id).await
    }
    async fn active_counts(&self) -> StoreResult<ActiveCounts> {
        self.inner.active_counts().await
    }
    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<ExecutionRecord>> {
        self.lists.fetch_add(1, Ordering::SeqCst);
        self.inner.list(filter).await
    }
    async fn request_cancel(
        &self,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>> {
        self.inner.request_cancel(id, reason).await
    }
    async fn mark_running(
        &self,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        self.inner.mark_running(id, agent, at).await
    }
    async fn mark_finished(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
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
        self.inner.append_event(id, body).await
    }
    async fn append_events(&self, id: &str, bodies: Vec<EventBody>) -> StoreResult<Vec<ExecEvent>> {
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

async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

fn gauge(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_never_scan_the_executions_and_the_gauges_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let keyring = Keyring::single(generate_key());
    let store = Arc::new(CountingStore {
        inner: EmbeddedStore::open(&dir.path().join("store"), keyring.clone()).unwrap(),
        lists: AtomicUsize::new(0),
        gets: AtomicUsize::new(0),
    });
    let platform = Platform {
        config: Arc::new(PlatformConfig {
            max_queued: 100_000,
            ..PlatformConfig::default()
        }),
        store: store.clone(),
        bus: Arc::new(EmbeddedBus::new()),
        objects: Arc::new(EncryptedObjects::local(&dir.path().join("objects"), keyring).unwrap()),
    };
    // 400 executions: 200 users with 2 each (the default cap).
    let mut ids = Vec::new();
    for u in 0..200 {
        let who = Principal {
            org: "acme".into(),
            user: format!("u{u}@example.com"),
            role: Role::User,
        };
        for _ in 0..2 {
            let rec = platform
                .submit(
                    &who,
                    SubmitRequest {
                        language: "r".into(),
                        code: "1".into(),
                        tab_id: None,
                        model_id: None,
                        limits: None,
                    },
                )
                .await
                .unwrap();
            ids.push(rec.id);
        }
    }
    // As an agent would: 30 run, 10 of those finish, 5 queued ones are cancelled.
    for id in &ids[..30] {
        store.mark_running(id, "h1", 1).await.unwrap();
    }
    for id in &ids[..10] {
        store
            .mark_finished(id, ExecState::Succeeded, None, None, 2)
            .await
            .unwrap();
    }
    for id in &ids[30..35] {
        store
            .request_cancel(id, CancelReason::Requested)
            .await
            .unwrap();
    }
    let (queued, running) = (400 - 30 - 5, 30 - 10);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ApiServer::new(platform, Auth::new(&[7u8; 32]), ServerOptions::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(listener, async {
        let _ = stop_rx.await;
    }));

    store.lists.store(0, Ordering::SeqCst);
    store.gets.store(0, Ordering::SeqCst);
    for _ in 0..200 {
        let text = scrape(addr).await;
        assert_eq!(gauge(&text, "hatchery_queue_length"), queued);
        assert_eq!(gauge(&text, "hatchery_executions_running"), running);
    }
    assert_eq!(
        store.lists.load(Ordering::SeqCst),
        0,
        "200 scrapes listed executions"
    );
    assert_eq!(store.gets.load(Ordering::SeqCst), 0, "scrapes read records");

    // The gauges follow state changes at once.
    store.mark_running(&ids[35], "h1", 3).await.unwrap();
    store
        .mark_finished(&ids[20], ExecState::Failed, None, None, 3)
        .await
        .unwrap();
    let text = scrape(addr).await;
    assert_eq!(gauge(&text, "hatchery_queue_length"), queued - 1);
    assert_eq!(gauge(&text, "hatchery_executions_running"), running);
    assert_eq!(store.lists.load(Ordering::SeqCst), 0);

    let _ = stop_tx.send(());
    served.await.unwrap().unwrap();
}
