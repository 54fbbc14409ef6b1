//! The store's contract, on both backends — the embedded store and PostgreSQL (a private
//! server per test): race-free admission (R10, R11, queue limit), gapless event logs
//! (single and batched appends), cancel and state-transition rules, durability across
//! restarts, and retention; for the embedded store also its files: crash leftovers, torn
//! and corrupt lines, names.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hatchery_scheduler::embedded::EmbeddedStore;
use hatchery_scheduler::engines::{EngineError, PostgresServer};
use hatchery_scheduler::model::{
    CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, GroupStatus, HostState, Limits,
    OutputData, Policy, Resources, ResultSummary, Usage,
};
use hatchery_scheduler::postgres::{PgConfig, PgStore};
use hatchery_scheduler::seal::Keyring;
use hatchery_scheduler::store::{
    ActiveCounts, Admission, AdmissionRules, Lease, ListFilter, Store, StoreError,
};

fn record(id: &str, org: &str, user: &str, tab: Option<&str>, created_at: u64) -> ExecutionRecord {
    let limits = Limits {
        memory_bytes: 256 << 20,
        cpus: 1.0,
        pids: 64,
        time_limit_ms: 10_000,
        max_artifacts: 0,
        max_artifact_bytes: 0,
    };
    ExecutionRecord {
        tab_id: tab.map(String::from),
        code_key: format!("code/{id}"),
        ..ExecutionRecord::queued(id, org, user, "r", limits, created_at)
    }
}

fn rules(max_parallel: u32) -> AdmissionRules {
    AdmissionRules {
        max_parallel,
        max_queued: 10_000,
    }
}

fn summary(state: ExecState) -> ResultSummary {
    ResultSummary {
        state,
        error_code: None,
        value_json: Some("42".into()),
        error: None,
        warnings: vec![],
        exit_code: Some(0),
        usage: Usage::default(),
        start_ms: Some(0.5),
        duration_ms: 12.0,
        stdout_truncated: false,
        stderr_truncated: false,
        artifacts: vec![],
    }
}

async fn admitted(
    store: &impl AsStore,
    rec: ExecutionRecord,
    r: AdmissionRules,
) -> Vec<(String, CancelReason)> {
    let id = rec.id.clone();
    match store.s().admit(rec, r).await.unwrap() {
        Admission::Admitted {
            cancelled,
            record,
            events,
        } => {
            // What admission returns is what it stored (later admissions may have
            // cancelled it since, appending to its log).
            assert_eq!(record.id, id);
            assert!(record.admitted > 0, "{record:?}");
            assert_eq!(record.last_seq, events.len() as u64, "{events:?}");
            let stored = store.s().events_after(&id, 0).await.unwrap();
            assert_eq!(events[..], stored[..events.len()]);
            assert_eq!(record.admitted, get(store, &id).await.admitted);
            cancelled
        }
        other => panic!("not admitted: {other:?}"),
    }
}

async fn get(store: &impl AsStore, id: &str) -> ExecutionRecord {
    store.s().get(id).await.unwrap().expect(id)
}

fn user_filter(org: &str, user: &str) -> ListFilter {
    ListFilter {
        org: Some(org.into()),
        user: Some(user.into()),
        ..Default::default()
    }
}

/// Active in the sense of the parallelism cap: queued or running, not cancel-requested.
fn counts_against_cap(r: &ExecutionRecord) -> bool {
    !r.state.is_terminal() && r.cancel.is_none()
}

async fn active_count(store: &impl AsStore, org: &str, user: &str) -> usize {
    let f = ListFilter {
        active_only: true,
        ..user_filter(org, user)
    };
    store
        .s()
        .list(&f)
        .await
        .unwrap()
        .iter()
        .filter(|r| counts_against_cap(r))
        .count()
}

fn keyring() -> Keyring {
    Keyring::single([3u8; 32])
}

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir, keyring()).unwrap()
}

/// A store handle as the helpers take it: the embedded store itself or a shared one.
trait AsStore {
    fn s(&self) -> &dyn Store;
}

impl AsStore for EmbeddedStore {
    fn s(&self) -> &dyn Store {
        self
    }
}

impl AsStore for Arc<dyn Store> {
    fn s(&self) -> &dyn Store {
        &**self
    }
}

/// Where a test's store lives. `open` makes a new handle on the same data: dropping the
/// old one and opening again is a restart.
enum Backend {
    Embedded(tempfile::TempDir),
    Postgres {
        _server: PostgresServer,
        url: String,
    },
}

impl Backend {
    fn embedded() -> Backend {
        Backend::Embedded(tempfile::tempdir().unwrap())
    }

    /// A private PostgreSQL server, or `None` (the skip recorded) where PostgreSQL is not
    /// installed and the run does not require it (`HATCHERY_REQUIRE_ENGINES`).
    fn postgres(test: &str) -> Option<Backend> {
        match PostgresServer::start() {
            Ok(server) => {
                let url = server.create_database("hatchery").unwrap();
                Some(Backend::Postgres {
                    _server: server,
                    url,
                })
            }
            Err(EngineError::PostgresMissing) => {
                hatchery_tests::skip(
                    &format!("{test} on PostgreSQL"),
                    "PostgreSQL is not installed",
                    "HATCHERY_REQUIRE_ENGINES",
                );
                None
            }
            Err(e) => panic!("starting PostgreSQL: {e}"),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Embedded(dir) => Arc::new(open(dir.path())),
            Backend::Postgres { url, .. } => Arc::new(
                PgStore::connect(&PgConfig::new(url.clone()), keyring())
                    .await
                    .unwrap(),
            ),
        }
    }

    /// The embedded store's data directory.
    fn dir(&self) -> Option<&Path> {
        match self {
            Backend::Embedded(dir) => Some(dir.path()),
            Backend::Postgres { .. } => None,
        }
    }
}

/// A test of the store's contract, run on each backend (`<name>::embedded`,
/// `<name>::postgres`).
macro_rules! store_test {
    ($name:ident, |$b:ident| $body:block) => {
        mod $name {
            use super::*;

            async fn run($b: Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                run(Backend::embedded()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(b) = Backend::postgres(stringify!($name)) {
                    run(b).await
                }
            }
        }
    };
}

store_test!(
    two_hundred_concurrent_admissions_never_exceed_the_cap,
    |b| {
        const N: u64 = 200;
        let store = b.open().await;
        // Another user's executions must not be touched.
        admitted(&store, record("other1", "acme", "bob", None, 1), rules(2)).await;

        // A watcher lists all the time and never sees more than 2 active.
        let done = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn({
            let (store, done) = (store.clone(), done.clone());
            async move {
                let mut looks = 0u32;
                while !done.load(Ordering::Relaxed) {
                    let n = active_count(&store, "acme", "alice").await;
                    assert!(n <= 2, "watcher saw {n} active executions");
                    looks += 1;
                    tokio::task::yield_now().await;
                }
                looks
            }
        });

        // created_at in a scrambled order relative to the spawn order, so that an older
        // execution is often admitted after a newer one.
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let store = store.clone();
                let created_at = 1_000 + (i * 73) % N;
                let id = format!("e{created_at:04}");
                tokio::spawn(async move {
                    let rec = record(&id, "acme", "alice", None, created_at);
                    let cancelled = admitted(&store, rec, rules(2)).await;
                    let n = active_count(&store, "acme", "alice").await;
                    assert!(n <= 2, "{n} active after admitting {id}");
                    cancelled
                })
            })
            .collect();
        let mut cancelled_by_admission: HashMap<String, CancelReason> = HashMap::new();
        for t in tasks {
            for (id, reason) in t.await.unwrap() {
                assert!(
                    cancelled_by_admission.insert(id.clone(), reason).is_none(),
                    "{id} cancelled twice"
                );
            }
        }
        done.store(true, Ordering::Relaxed);
        assert!(watcher.await.unwrap() > 0);

        let all = store.list(&user_filter("acme", "alice")).await.unwrap();
        assert_eq!(all.len(), N as usize, "a record was lost");
        let active: Vec<&str> = all
            .iter()
            .filter(|r| counts_against_cap(r))
            .map(|r| r.id.as_str())
            .collect();
        // The two admitted last survive, whatever their created_at said: the store orders
        // admissions (1, 2, 3, ... with no repeats).
        let mut by_admission: Vec<&ExecutionRecord> = all.iter().collect();
        by_admission.sort_by_key(|r| r.admitted);
        let orders: HashSet<u64> = all.iter().map(|r| r.admitted).collect();
        assert_eq!(orders.len(), all.len(), "two admissions got the same order");
        assert!(
            all.iter().all(|r| r.admitted > 0),
            "an admission without an order"
        );
        let mut newest: Vec<&str> = by_admission[by_admission.len() - 2..]
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let mut survivors = active.clone();
        newest.sort();
        survivors.sort();
        assert_eq!(
            survivors, newest,
            "the survivors are not the two admitted last"
        );
        for r in &all {
            if active.contains(&r.id.as_str()) {
                assert_eq!(r.state, ExecState::Queued);
                assert_eq!(r.last_seq, 1);
                continue;
            }
            assert_eq!(r.state, ExecState::Cancelled, "{}", r.id);
            assert_eq!(r.cancel, Some(CancelReason::ParallelismCap), "{}", r.id);
            assert_eq!(
                cancelled_by_admission.get(&r.id),
                Some(&CancelReason::ParallelismCap),
                "{} not reported cancelled",
                r.id
            );
            let events = store.events_after(&r.id, 0).await.unwrap();
            assert_eq!(events.len(), 2, "{}", r.id);
            assert_eq!(events[0].body, EventBody::Queued);
            match &events[1].body {
                EventBody::Finished(s) => assert_eq!(s.state, ExecState::Cancelled),
                other => panic!("{}: {other:?}", r.id),
            }
            assert_eq!(r.last_seq, 2);
        }
        assert_eq!(cancelled_by_admission.len(), N as usize - 2);
        assert!(counts_against_cap(&get(&store, "other1").await));

        // And the same survives a restart.
        drop(store);
        let store = b.open().await;
        assert_eq!(active_count(&store, "acme", "alice").await, 2);
        assert_eq!(
            store.list(&user_filter("acme", "alice")).await.unwrap(),
            all
        );
    }
);

store_test!(
    the_cap_weighs_a_users_executions_across_a_restart_and_their_ends,
    |b| {
        let store = b.open().await;
        admitted(&store, record("u1", "o", "u", None, 10), rules(2)).await;
        admitted(&store, record("u2", "o", "u", None, 20), rules(2)).await;
        store.mark_running("u1", "h1", 11).await.unwrap();
        // Another user of the same org and the same user of another org count apart.
        admitted(&store, record("v1", "o", "v", None, 12), rules(2)).await;
        admitted(&store, record("w1", "p", "u", None, 13), rules(2)).await;
        drop(store);
        // After a restart the store knows which of the user's executions are still active.
        let store = b.open().await;
        let c = admitted(&store, record("u3", "o", "u", None, 30), rules(2)).await;
        assert_eq!(c, vec![("u1".to_string(), CancelReason::ParallelismCap)]);
        // An execution that ended no longer counts: u2 ends, u4 cancels nothing.
        store.mark_running("u2", "h1", 31).await.unwrap();
        store
            .finish(
                "u2",
                ExecState::Succeeded,
                None,
                32,
                summary(ExecState::Succeeded),
            )
            .await
            .unwrap();
        let c = admitted(&store, record("u4", "o", "u", None, 40), rules(2)).await;
        assert_eq!(c, vec![]);
        assert_eq!(active_count(&store, "o", "u").await, 2);
        // Nor does one that ended before a restart.
        store
            .mark_finished("u3", ExecState::Failed, None, None, 41)
            .await
            .unwrap();
        drop(store);
        let store = b.open().await;
        let c = admitted(&store, record("u5", "o", "u", None, 50), rules(2)).await;
        assert_eq!(c, vec![]);
        let c = admitted(&store, record("u6", "o", "u", None, 60), rules(2)).await;
        assert_eq!(c, vec![("u4".to_string(), CancelReason::ParallelismCap)]);
        for (org, user) in [("o", "v"), ("p", "u")] {
            assert_eq!(active_count(&store, org, user).await, 1, "{org}/{user}");
        }
    }
);

store_test!(the_cap_cancels_the_oldest_running_one_by_marking_it, |b| {
    let store = b.open().await;
    admitted(&store, record("a1", "o", "u", None, 10), rules(2)).await;
    admitted(&store, record("a2", "o", "u", None, 20), rules(2)).await;
    store.mark_running("a1", "h1", 11).await.unwrap();
    store.mark_running("a2", "h1", 21).await.unwrap();
    let c = admitted(&store, record("a3", "o", "u", None, 30), rules(2)).await;
    assert_eq!(c, vec![("a1".to_string(), CancelReason::ParallelismCap)]);
    let a1 = get(&store, "a1").await;
    // Running: marked for its agent to kill, still running, no longer counted.
    assert_eq!(a1.state, ExecState::Running);
    assert_eq!(a1.cancel, Some(CancelReason::ParallelismCap));
    assert_eq!(store.events_after("a1", 0).await.unwrap().len(), 1);
    assert_eq!(active_count(&store, "o", "u").await, 2);
    // The next one cancels a2 (a1 no longer counts), not a1 again.
    let c = admitted(&store, record("a4", "o", "u", None, 40), rules(2)).await;
    assert_eq!(c, vec![("a2".to_string(), CancelReason::ParallelismCap)]);
    // The agent finishes a1 as cancelled.
    let a1 = store
        .mark_finished("a1", ExecState::Cancelled, None, None, 50)
        .await
        .unwrap();
    assert_eq!(a1.cancel, Some(CancelReason::ParallelismCap));
});

store_test!(the_store_orders_admissions_not_the_nodes_clocks, |b| {
    // Records are stamped by API nodes before admission; under races or clock skew an
    // execution stamped older may arrive last. It is still the newest: "the oldest go"
    // follows the order the store admitted them in.
    let store = b.open().await;
    admitted(&store, record("first", "o", "u", None, 200), rules(1)).await;
    let c = admitted(
        &store,
        record("stamped-older", "o", "u", None, 100),
        rules(1),
    )
    .await;
    assert_eq!(c, vec![("first".to_string(), CancelReason::ParallelismCap)]);
    let first = get(&store, "first").await;
    assert_eq!(first.state, ExecState::Cancelled);
    let seqs: Vec<u64> = store
        .events_after("first", 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2]);
    let later = get(&store, "stamped-older").await;
    assert!(counts_against_cap(&later));
    assert!(later.admitted > first.admitted);
});

store_test!(
    the_same_tab_supersedes_only_its_own_previous_execution,
    |b| {
        let store = b.open().await;
        let r = rules(10);
        admitted(&store, record("t1", "o", "u", Some("tabA"), 1), r).await;
        admitted(&store, record("t2", "o", "u", Some("tabB"), 2), r).await;
        admitted(&store, record("t3", "o", "u", None, 3), r).await;
        // Same tab id, other user / other org: untouched.
        admitted(&store, record("x1", "o", "v", Some("tabA"), 4), r).await;
        admitted(&store, record("y1", "p", "u", Some("tabA"), 5), r).await;

        let c = admitted(&store, record("t4", "o", "u", Some("tabA"), 6), r).await;
        assert_eq!(c, vec![("t1".to_string(), CancelReason::SupersededByTab)]);
        let t1 = get(&store, "t1").await;
        assert_eq!(t1.state, ExecState::Cancelled);
        assert_eq!(t1.cancel, Some(CancelReason::SupersededByTab));
        match &store.events_after("t1", 1).await.unwrap()[..] {
            [ExecEvent {
                seq: 2,
                body: EventBody::Finished(s),
                ..
            }] => assert_eq!(s.state, ExecState::Cancelled),
            other => panic!("{other:?}"),
        }
        for id in ["t2", "t3", "x1", "y1", "t4"] {
            let r = get(&store, id).await;
            assert!(counts_against_cap(&r), "{id} was touched: {r:?}");
        }

        // A running one in the tab is marked, and the next re-run does not cancel it again.
        store.mark_running("t4", "h1", 7).await.unwrap();
        let c = admitted(&store, record("t5", "o", "u", Some("tabA"), 8), r).await;
        assert_eq!(c, vec![("t4".to_string(), CancelReason::SupersededByTab)]);
        let t4 = get(&store, "t4").await;
        assert_eq!(
            (t4.state, t4.cancel),
            (ExecState::Running, Some(CancelReason::SupersededByTab))
        );
        let c = admitted(&store, record("t6", "o", "u", Some("tabA"), 9), r).await;
        assert_eq!(c, vec![("t5".to_string(), CancelReason::SupersededByTab)]);
        // Two tabs of one user running the same model concurrently: both stay.
        assert!(counts_against_cap(&get(&store, "t2").await));
        assert!(counts_against_cap(&get(&store, "t6").await));
    }
);

store_test!(tab_and_cap_together_cancel_each_execution_once, |b| {
    let store = b.open().await;
    admitted(&store, record("a", "o", "u", Some("t"), 1), rules(2)).await;
    admitted(&store, record("b", "o", "u", Some("s"), 2), rules(2)).await;
    // Same tab as a: a goes for the tab; then b and c make exactly 2, nothing more.
    let c = admitted(&store, record("c", "o", "u", Some("t"), 3), rules(2)).await;
    assert_eq!(c, vec![("a".to_string(), CancelReason::SupersededByTab)]);
    let c = admitted(&store, record("d", "o", "u", None, 4), rules(2)).await;
    assert_eq!(c, vec![("b".to_string(), CancelReason::ParallelismCap)]);
});

store_test!(a_full_queue_stores_nothing, |b| {
    let store = b.open().await;
    let r = AdmissionRules {
        max_parallel: 10,
        max_queued: 3,
    };
    admitted(&store, record("q1", "o", "u", Some("tab"), 1), r).await;
    admitted(&store, record("q2", "o", "v", None, 2), r).await;
    admitted(&store, record("q3", "p", "w", None, 3), r).await;
    let full = store
        .admit(record("q4", "o", "u", Some("tab"), 4), r)
        .await
        .unwrap();
    assert_eq!(full, Admission::QueueFull { queued: 3 });
    assert!(store.get("q4").await.unwrap().is_none());
    assert!(matches!(
        store.events_after("q4", 0).await,
        Err(StoreError::NotFound(_))
    ));
    // Its tab predecessor was not cancelled.
    assert!(counts_against_cap(&get(&store, "q1").await));
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 3);
    if let Some(dir) = b.dir() {
        assert!(!dir.join("executions/q4.log").exists());
    }
    // Running ones do not count as queued.
    store.mark_running("q1", "h", 5).await.unwrap();
    admitted(&store, record("q4", "o", "u", None, 6), r).await;
});

store_test!(admission_refuses_duplicates_and_non_queued_records, |b| {
    let store = b.open().await;
    admitted(&store, record("d", "o", "u", None, 1), rules(2)).await;
    assert!(matches!(
        store.admit(record("d", "o", "u", None, 2), rules(2)).await,
        Err(StoreError::IllegalTransition { .. })
    ));
    let mut running = record("r", "o", "u", None, 3);
    running.state = ExecState::Running;
    assert!(matches!(
        store.admit(running, rules(2)).await,
        Err(StoreError::IllegalTransition { .. })
    ));
    assert!(store.get("r").await.unwrap().is_none());
});

store_test!(
    event_sequence_numbers_are_gapless_under_concurrent_appends,
    |b| {
        let store = b.open().await;
        admitted(&store, record("ev", "o", "u", None, 1), rules(2)).await;
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for i in 0..50 {
                        let e = store
                            .append_event(
                                "ev",
                                EventBody::Stdout(OutputData::text(format!("{t}:{i}\n"))),
                            )
                            .await
                            .unwrap();
                        seqs.push(e.seq);
                    }
                    seqs
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            let seqs = t.await.unwrap();
            // Each writer sees its own events in increasing order.
            assert!(seqs.windows(2).all(|w| w[0] < w[1]));
            all.extend(seqs);
        }
        all.sort();
        assert_eq!(all, (2..=401).collect::<Vec<u64>>());
        let events = store.events_after("ev", 0).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=401).collect::<Vec<u64>>()
        );
        assert_eq!(get(&store, "ev").await.last_seq, 401);
        let tail = store.events_after("ev", 399).await.unwrap();
        assert_eq!(
            tail.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![400, 401]
        );
        assert!(store.events_after("ev", 401).await.unwrap().is_empty());
        assert!(store.events_after("ev", u64::MAX).await.unwrap().is_empty());
        assert!(matches!(
            store.append_event("nope", EventBody::Queued).await,
            Err(StoreError::NotFound(_))
        ));

        drop(store);
        let store = b.open().await;
        assert_eq!(store.events_after("ev", 0).await.unwrap(), events);
    }
);

/// Two processes appending to one execution (the agent running it and, say, an API
/// replica): each remembers the last seq it wrote to make its next append one statement;
/// when the other wrote meanwhile that guess is wrong, and the append must still take the
/// next seqs, exactly once, and nothing may be sealed under a seq it does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_from_two_handles_never_collide_or_leave_gaps() {
    let Some(b) = Backend::postgres("appends_from_two_handles") else {
        return;
    };
    let (one, two) = (b.open().await, b.open().await);
    admitted(&one, record("two", "o", "u", None, 1), rules(2)).await;
    // `one` runs it: it knows the last seq from here on.
    one.mark_running("two", "h1", 2).await.unwrap();
    let text = |s: &str| EventBody::Stdout(OutputData::text(s.to_string()));
    let mut expected = vec![EventBody::Queued];
    for round in 0..5 {
        for (who, store) in [("one", &one), ("two", &two)] {
            let bodies: Vec<EventBody> = (0..=round % 3)
                .map(|i| text(&format!("{who}{round}.{i}")))
                .collect();
            let stored = store.append_events("two", bodies.clone()).await.unwrap();
            let first = expected.len() as u64 + 1;
            assert_eq!(
                stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
                (first..first + bodies.len() as u64).collect::<Vec<_>>(),
                "{who} in round {round}"
            );
            expected.extend(bodies);
        }
    }
    for reader in [&one, &two] {
        let events = reader.events_after("two", 0).await.unwrap();
        assert_eq!(
            events.into_iter().map(|e| e.body).collect::<Vec<_>>(),
            expected
        );
    }
    assert_eq!(get(&two, "two").await.last_seq, expected.len() as u64);
}

store_test!(
    batched_appends_are_gapless_in_order_and_never_share_a_seq,
    |b| {
        let store = b.open().await;
        admitted(&store, record("bat", "o", "u", None, 1), rules(2)).await;
        let text = |s: String| EventBody::Stdout(OutputData::text(s));
        // Mixed single and batched appends from one writer: seqs follow on, in order.
        let one = store.append_event("bat", text("a".into())).await.unwrap();
        assert_eq!(one.seq, 2);
        let batch = store
            .append_events("bat", (0..3).map(|i| text(format!("b{i}"))).collect())
            .await
            .unwrap();
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(batch[2].body, text("b2".into()));
        assert!(batch.iter().all(|e| e.execution_id == "bat"));
        // Nothing to append is nothing stored.
        assert!(store
            .append_events("bat", Vec::new())
            .await
            .unwrap()
            .is_empty());
        let after = store.append_event("bat", text("c".into())).await.unwrap();
        assert_eq!(after.seq, 6);
        assert_eq!(get(&store, "bat").await.last_seq, 6);

        // Concurrent writers, some appending one event at a time, some in batches of
        // up to 7: every seq is given exactly once, each batch's seqs are consecutive,
        // and the log holds every body at the seq its writer was told.
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut got: Vec<ExecEvent> = Vec::new();
                    for i in 0..20 {
                        if t % 2 == 0 {
                            let body = text(format!("{t}:{i}"));
                            got.push(store.append_event("bat", body).await.unwrap());
                        } else {
                            let n = 1 + (t + i) % 7;
                            let bodies = (0..n).map(|k| text(format!("{t}:{i}:{k}"))).collect();
                            let events = store.append_events("bat", bodies).await.unwrap();
                            assert_eq!(events.len(), n);
                            assert!(
                                events.windows(2).all(|w| w[1].seq == w[0].seq + 1),
                                "a batch's seqs are consecutive: {events:?}"
                            );
                            got.extend(events);
                        }
                    }
                    got
                })
            })
            .collect();
        let mut told: Vec<ExecEvent> = Vec::new();
        for t in tasks {
            let got = t.await.unwrap();
            assert!(got.windows(2).all(|w| w[0].seq < w[1].seq));
            told.extend(got);
        }
        told.sort_by_key(|e| e.seq);
        let n = told.len() as u64;
        assert_eq!(
            told.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (7..7 + n).collect::<Vec<u64>>(),
            "no seq given twice, none skipped"
        );
        let log = store.events_after("bat", 6).await.unwrap();
        assert_eq!(
            log.iter().map(|e| (e.seq, &e.body)).collect::<Vec<_>>(),
            told.iter().map(|e| (e.seq, &e.body)).collect::<Vec<_>>()
        );
        assert_eq!(get(&store, "bat").await.last_seq, 6 + n);
        assert!(matches!(
            store.append_events("nope", vec![EventBody::Queued]).await,
            Err(StoreError::NotFound(_))
        ));

        // The same after a restart.
        let all = store.events_after("bat", 0).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=6 + n).collect::<Vec<u64>>()
        );
        drop(store);
        let store = b.open().await;
        assert_eq!(store.events_after("bat", 0).await.unwrap(), all);
        let next = store
            .append_events("bat", vec![text("d".into())])
            .await
            .unwrap();
        assert_eq!(next[0].seq, 7 + n);
    }
);

store_test!(cancel_rules, |b| {
    let store = b.open().await;
    for (i, id) in ["q", "r", "f"].iter().enumerate() {
        admitted(&store, record(id, "o", "u", None, i as u64), rules(10)).await;
    }
    store.mark_running("r", "h1", 5).await.unwrap();
    store.mark_running("f", "h1", 5).await.unwrap();
    store
        .mark_finished("f", ExecState::Succeeded, Some("results/f".into()), None, 6)
        .await
        .unwrap();

    // Queued: cancelled at once, with its finished event.
    let q = store
        .request_cancel("q", CancelReason::Requested)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(q.state, ExecState::Cancelled);
    assert_eq!(q.cancel, Some(CancelReason::Requested));
    assert!(q.finished_at.is_some());
    assert_eq!(q.last_seq, 2);
    let ev = store.events_after("q", 1).await.unwrap();
    assert!(
        matches!(&ev[..], [ExecEvent { body: EventBody::Finished(s), .. }] if s.state == ExecState::Cancelled)
    );
    // Again: unchanged, no second event.
    let again = store
        .request_cancel("q", CancelReason::SupersededByTab)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again, q);
    assert_eq!(store.events_after("q", 0).await.unwrap().len(), 2);

    // Running: marked; the first reason stays.
    let r = store
        .request_cancel("r", CancelReason::Requested)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.state, r.cancel),
        (ExecState::Running, Some(CancelReason::Requested))
    );
    let r2 = store
        .request_cancel("r", CancelReason::ParallelismCap)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r2.cancel, Some(CancelReason::Requested));
    assert_eq!(store.events_after("r", 0).await.unwrap().len(), 1);

    // Finished: as it was.
    let f = get(&store, "f").await;
    assert_eq!(
        store
            .request_cancel("f", CancelReason::Requested)
            .await
            .unwrap(),
        Some(f)
    );
    assert_eq!(
        store
            .request_cancel("missing", CancelReason::Requested)
            .await
            .unwrap(),
        None
    );
});

store_test!(state_transitions_are_checked, |b| {
    let store = b.open().await;
    admitted(&store, record("a", "o", "u", None, 1), rules(10)).await;
    admitted(&store, record("b", "o", "u", None, 2), rules(10)).await;
    assert!(matches!(
        store.mark_running("zzz", "h", 1).await,
        Err(StoreError::NotFound(_))
    ));
    // Not to a non-terminal state.
    assert!(matches!(
        store
            .mark_finished("a", ExecState::Running, None, None, 1)
            .await,
        Err(StoreError::IllegalTransition { .. })
    ));
    let a = store.mark_running("a", "h1", 100).await.unwrap();
    assert_eq!(
        (a.state, a.agent.as_deref(), a.started_at),
        (ExecState::Running, Some("h1"), Some(100))
    );
    // Read back, the start is the same (the PostgreSQL store keeps it in columns).
    let read = get(&store, "a").await;
    assert_eq!(
        (read.state, read.agent.as_deref(), read.started_at),
        (ExecState::Running, Some("h1"), Some(100))
    );
    assert_eq!(read, a);
    // Twice: the second runner must not run it.
    assert!(matches!(
        store.mark_running("a", "h2", 101).await,
        Err(StoreError::IllegalTransition {
            from: ExecState::Running,
            to: ExecState::Running,
            ..
        })
    ));
    // A cancelled one must not run.
    store
        .request_cancel("b", CancelReason::Requested)
        .await
        .unwrap();
    assert!(matches!(
        store.mark_running("b", "h1", 102).await,
        Err(StoreError::IllegalTransition {
            from: ExecState::Cancelled,
            ..
        })
    ));
    let a = store
        .mark_finished(
            "a",
            ExecState::TimedOut,
            Some("results/a".into()),
            Some("time limit".into()),
            200,
        )
        .await
        .unwrap();
    assert_eq!(a.state, ExecState::TimedOut);
    assert_eq!(a.finished_at, Some(200));
    assert_eq!(a.result_key.as_deref(), Some("results/a"));
    assert_eq!(a.error.as_deref(), Some("time limit"));
    // Finished is final.
    assert!(matches!(
        store
            .mark_finished("a", ExecState::Succeeded, None, None, 201)
            .await,
        Err(StoreError::IllegalTransition { .. })
    ));
    assert!(matches!(
        store
            .mark_finished("b", ExecState::Failed, None, None, 201)
            .await,
        Err(StoreError::IllegalTransition { .. })
    ));
    // Queued straight to a terminal state is allowed (e.g. it could not be placed).
    admitted(&store, record("c", "o", "u", None, 3), rules(10)).await;
    store
        .mark_finished("c", ExecState::Failed, None, Some("no host".into()), 300)
        .await
        .unwrap();
});

store_test!(list_filters_and_orders_newest_first, |b| {
    let store = b.open().await;
    let r = rules(100);
    admitted(&store, record("a", "o", "u", Some("t1"), 1), r).await;
    admitted(&store, record("b", "o", "u", Some("t2"), 3), r).await;
    admitted(&store, record("c", "o", "u", Some("t1"), 2), r).await;
    admitted(&store, record("d", "o", "v", Some("t1"), 4), r).await;
    admitted(&store, record("e", "p", "u", None, 5), r).await;
    store.mark_running("b", "h", 6).await.unwrap();
    store
        .mark_finished("c", ExecState::Failed, None, None, 7)
        .await
        .unwrap();
    let ids = |v: Vec<ExecutionRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.list(&ListFilter::default()).await.unwrap()),
        vec!["e", "d", "b", "c", "a"]
    );
    assert_eq!(
        ids(store.list(&user_filter("o", "u")).await.unwrap()),
        vec!["b", "c", "a"]
    );
    let f = ListFilter {
        tab_id: Some("t1".into()),
        ..user_filter("o", "u")
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), vec!["c", "a"]);
    let f = ListFilter {
        active_only: true,
        ..user_filter("o", "u")
    };
    // a was superseded by c (same tab), c failed.
    assert_eq!(ids(store.list(&f).await.unwrap()), vec!["b"]);
    let f = ListFilter {
        state: Some(ExecState::Running),
        ..Default::default()
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), vec!["b"]);
    let f = ListFilter {
        limit: Some(2),
        ..Default::default()
    };
    assert_eq!(ids(store.list(&f).await.unwrap()), vec!["e", "d"]);
});

store_test!(policies_are_stored_per_org_and_user, |b| {
    let store = b.open().await;
    assert_eq!(store.get_org_policy("acme").await.unwrap(), None);
    let org = Policy {
        memory_bytes: Some(1 << 30),
        max_parallel: Some(4),
        ..Default::default()
    };
    let user = Policy {
        cpus: Some(0.5),
        ..Default::default()
    };
    store.put_org_policy("acme", org.clone()).await.unwrap();
    store
        .put_user_policy("acme", "alice", user.clone())
        .await
        .unwrap();
    assert_eq!(
        store.s().get_org_policy("acme").await.unwrap(),
        Some(org.clone())
    );
    assert_eq!(
        store.s().get_user_policy("acme", "alice").await.unwrap(),
        Some(user)
    );
    assert_eq!(store.get_user_policy("acme", "bob").await.unwrap(), None);
    assert_eq!(store.get_user_policy("other", "alice").await.unwrap(), None);
    // Replacing.
    let org2 = Policy {
        pids: Some(512),
        ..Default::default()
    };
    store.put_org_policy("acme", org2.clone()).await.unwrap();
    assert_eq!(store.get_org_policy("acme").await.unwrap(), Some(org2));
});

#[tokio::test]
async fn names_that_could_escape_the_data_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for bad in ["", ".", "..", "../x", "a/b", ".hidden", "a b", "é", "a\0b"] {
        assert!(
            store.put_org_policy(bad, Policy::default()).await.is_err(),
            "org {bad:?} accepted"
        );
        assert!(
            store
                .put_user_policy("acme", bad, Policy::default())
                .await
                .is_err(),
            "user {bad:?} accepted"
        );
        assert!(
            store
                .put_user_policy(bad, "alice", Policy::default())
                .await
                .is_err(),
            "org {bad:?} accepted"
        );
        assert_eq!(store.get_user_policy(bad, "alice").await.unwrap(), None);
        assert!(
            store
                .admit(record(bad, "o", "u", None, 1), rules(2))
                .await
                .is_err(),
            "execution id {bad:?} accepted"
        );
    }
    let long = "x".repeat(201);
    assert!(store
        .put_org_policy(&long, Policy::default())
        .await
        .is_err());
    store
        .put_org_policy("Acme-Corp_2.eu", Policy::default())
        .await
        .unwrap();
    assert!(store.list(&ListFilter::default()).await.unwrap().is_empty());
    assert!(!dir.path().join("x").exists());
}

#[tokio::test]
async fn e_mail_style_user_names_keep_their_policies_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let p = Policy {
        cpus: Some(0.5),
        ..Default::default()
    };
    let names = [
        "ada@example.com",
        "ada+lab@example.co.uk",
        "grace.hopper@navy.mil",
    ];
    {
        let store = open(dir.path());
        for name in names {
            store
                .put_user_policy("acme", name, p.clone())
                .await
                .unwrap();
        }
        admitted(&store, record("e1", "acme", names[0], None, 1), rules(2)).await;
    }
    let store = open(dir.path());
    for name in names {
        assert_eq!(
            store.s().get_user_policy("acme", name).await.unwrap(),
            Some(p.clone()),
            "{name}"
        );
    }
    assert_eq!(get(&store, "e1").await.user, names[0]);
    // Each is one file in the org's folder, named after the user.
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("policies/users/acme"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        vec![
            "ada+lab@example.co.uk.json",
            "ada@example.com.json",
            "grace.hopper@navy.mil.json"
        ]
    );
}

/// Queued and running, counted the slow way.
async fn scanned_counts(store: &impl AsStore) -> ActiveCounts {
    let all = store.s().list(&ListFilter::default()).await.unwrap();
    let n = |s: ExecState| all.iter().filter(|r| r.state == s).count() as u64;
    ActiveCounts {
        queued: n(ExecState::Queued),
        running: n(ExecState::Running),
    }
}

async fn counts_are(store: &impl AsStore, queued: u64, running: u64) {
    let want = ActiveCounts { queued, running };
    assert_eq!(
        store.s().active_counts().await.unwrap(),
        want,
        "kept counts"
    );
    assert_eq!(scanned_counts(store).await, want, "scanned counts");
}

store_test!(
    active_counts_follow_every_state_change_and_survive_a_restart,
    |b| {
        let store = b.open().await;
        counts_are(&store, 0, 0).await;
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            admitted(
                &store,
                record(id, "acme", "u", None, i as u64 + 1),
                rules(10),
            )
            .await;
        }
        counts_are(&store, 4, 0).await;
        store.mark_running("a", "h", 10).await.unwrap();
        store.mark_running("b", "h", 10).await.unwrap();
        counts_are(&store, 2, 2).await;
        // A queued one cancelled leaves the counts; a running one cancel-requested stays
        // running until its agent finishes it.
        store
            .request_cancel("c", CancelReason::Requested)
            .await
            .unwrap();
        store
            .request_cancel("a", CancelReason::Requested)
            .await
            .unwrap();
        counts_are(&store, 1, 2).await;
        store
            .mark_finished("a", ExecState::Cancelled, None, None, 20)
            .await
            .unwrap();
        store
            .mark_finished("b", ExecState::Succeeded, None, None, 20)
            .await
            .unwrap();
        counts_are(&store, 1, 0).await;
        // Refused transitions change nothing.
        assert!(store.mark_running("b", "h", 30).await.is_err());
        assert!(store
            .mark_finished("b", ExecState::Failed, None, None, 30)
            .await
            .is_err());
        counts_are(&store, 1, 0).await;
        // Admission's own cancellations (same tab, cap) are counted.
        admitted(&store, record("t1", "acme", "v", Some("tab"), 40), rules(1)).await;
        store.mark_running("t1", "h", 41).await.unwrap();
        admitted(&store, record("t2", "acme", "v", Some("tab"), 42), rules(1)).await;
        counts_are(&store, 2, 1).await;
        admitted(&store, record("cap", "acme", "w", None, 43), rules(0)).await;
        counts_are(&store, 2, 1).await;
        let old: Vec<String> = store
            .expired(u64::MAX, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        store.delete_expired(&old, u64::MAX).await.unwrap();
        counts_are(&store, 2, 1).await;
        drop(store);
        let store = b.open().await;
        counts_are(&store, 2, 1).await;
    }
);

/// Everything a client can read back.
async fn snapshot(
    store: &impl AsStore,
) -> (
    Vec<ExecutionRecord>,
    Vec<Vec<ExecEvent>>,
    Vec<Option<Policy>>,
) {
    let records = store.s().list(&ListFilter::default()).await.unwrap();
    let mut events = Vec::new();
    for r in &records {
        events.push(store.s().events_after(&r.id, 0).await.unwrap());
    }
    let policies = vec![
        store.s().get_org_policy("acme").await.unwrap(),
        store.s().get_org_policy("beta").await.unwrap(),
        store.s().get_user_policy("acme", "alice").await.unwrap(),
        store.s().get_user_policy("acme", "bob").await.unwrap(),
    ];
    (records, events, policies)
}

store_test!(everything_survives_a_restart, |b| {
    let store = b.open().await;
    store
        .put_org_policy(
            "acme",
            Policy {
                memory_bytes: Some(2 << 30),
                time_limit_ms: Some(120_000),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .put_user_policy(
            "acme",
            "alice",
            Policy {
                max_parallel: Some(3),
                cpus: Some(2.5),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let r = rules(3);
    // done: ran and finished
    admitted(&store, record("done", "acme", "alice", Some("t1"), 10), r).await;
    store.mark_running("done", "h1", 11).await.unwrap();
    store
        .append_event(
            "done",
            EventBody::Started {
                agent: "h1".into(),
                start_ms: Some(0.4),
            },
        )
        .await
        .unwrap();
    store
        .append_event(
            "done",
            EventBody::Stdout(OutputData::text("hello \"world\"\n")),
        )
        .await
        .unwrap();
    store
        .append_event(
            "done",
            EventBody::Progress {
                fraction: 0.5,
                message: "half way ✓".into(),
            },
        )
        .await
        .unwrap();
    store
        .mark_finished(
            "done",
            ExecState::Succeeded,
            Some("results/done".into()),
            None,
            12,
        )
        .await
        .unwrap();
    store
        .append_event("done", EventBody::Finished(summary(ExecState::Succeeded)))
        .await
        .unwrap();
    // gone: superseded by tab while queued
    admitted(&store, record("gone", "acme", "alice", Some("t2"), 20), r).await;
    admitted(&store, record("next", "acme", "alice", Some("t2"), 21), r).await;
    // run: running when the platform stops
    admitted(&store, record("run", "acme", "bob", None, 30), r).await;
    store.mark_running("run", "h1", 31).await.unwrap();
    store
        .append_event(
            "run",
            EventBody::Started {
                agent: "h1".into(),
                start_ms: None,
            },
        )
        .await
        .unwrap();
    store
        .append_event("run", EventBody::Stderr(OutputData::text("warning\n")))
        .await
        .unwrap();
    // marked: running and cancel-requested
    admitted(&store, record("marked", "beta", "carol", None, 40), r).await;
    store.mark_running("marked", "h2", 41).await.unwrap();
    store
        .request_cancel("marked", CancelReason::Requested)
        .await
        .unwrap();

    let before = snapshot(&store).await;
    assert_eq!(before.0.len(), 5);
    drop(store);

    let store = b.open().await;
    let after = snapshot(&store).await;
    assert_eq!(after, before);
    let run = get(&store, "run").await;
    assert_eq!(
        run.state,
        ExecState::Running,
        "the store must not decide lost"
    );
    assert_eq!(run.agent.as_deref(), Some("h1"));
    assert_eq!(run.last_seq, 3);
    // Sequence numbers continue.
    let e = store
        .append_event("run", EventBody::Stdout(OutputData::text("more")))
        .await
        .unwrap();
    assert_eq!(e.seq, 4);
    // The agent's reconciliation marks it lost.
    store
        .mark_finished(
            "run",
            ExecState::Lost,
            None,
            Some("agent restarted".into()),
            50,
        )
        .await
        .unwrap();
    // Admission after a restart still sees who is active.
    assert_eq!(active_count(&store, "acme", "alice").await, 1);
    let c = admitted(&store, record("again", "acme", "alice", Some("t2"), 60), r).await;
    assert_eq!(c, vec![("next".to_string(), CancelReason::SupersededByTab)]);

    // A second restart sees the changes made after the first.
    let before = snapshot(&store).await;
    drop(store);
    let store = b.open().await;
    assert_eq!(snapshot(&store).await, before);
    assert_eq!(get(&store, "run").await.state, ExecState::Lost);
});

#[tokio::test]
async fn a_torn_last_line_is_dropped_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    admitted(&store, record("t", "o", "u", None, 1), rules(2)).await;
    store
        .append_event("t", EventBody::Stdout(OutputData::text("a")))
        .await
        .unwrap();
    let events = store.events_after("t", 0).await.unwrap();
    drop(store);

    let file = dir.path().join("executions/t.log");
    let mut bytes = std::fs::read(&file).unwrap();
    // The first bytes of a third sealed line, as a crash mid-append leaves them.
    let line2 = bytes[..bytes.len() - 1]
        .rsplit(|&b| b == b'\n')
        .next()
        .unwrap()
        .to_vec();
    bytes.extend_from_slice(&line2[..line2.len() / 2]);
    std::fs::write(&file, &bytes).unwrap();

    let store = open(dir.path());
    assert_eq!(store.events_after("t", 0).await.unwrap(), events);
    assert_eq!(get(&store, "t").await.last_seq, 2);
    let e = store
        .append_event("t", EventBody::Stdout(OutputData::text("b")))
        .await
        .unwrap();
    assert_eq!(e.seq, 3);
    drop(store);

    // The file is whole again.
    let store = open(dir.path());
    let seqs: Vec<u64> = store
        .events_after("t", 0)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_corrupt_middle_line_is_an_error_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    admitted(&store, record("c", "o", "u", None, 1), rules(2)).await;
    store
        .append_event("c", EventBody::Stdout(OutputData::text("a")))
        .await
        .unwrap();
    drop(store);
    let file = dir.path().join("executions/c.log");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("garbage\n{text}")).unwrap();
    assert!(matches!(
        EmbeddedStore::open(dir.path(), keyring()),
        Err(StoreError::Corrupt(_))
    ));
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_up_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    admitted(&store, record("k", "o", "u", None, 1), rules(2)).await;
    // An agent appended `finished` and died before marking the record.
    store.mark_running("k", "h", 2).await.unwrap();
    store
        .append_event("k", EventBody::Finished(summary(ExecState::Succeeded)))
        .await
        .unwrap();
    drop(store);
    // An admission that died mid-append (no complete line); in the older layout, one
    // that died between its events and its record; a half-written record and policy.
    let k_log = std::fs::read(dir.path().join("executions/k.log")).unwrap();
    std::fs::write(dir.path().join("executions/torn.log"), &k_log[..40]).unwrap();
    for d in ["records", "events"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    std::fs::write(dir.path().join("events/orphan.sealed"), b"AgEAAAA=\n").unwrap();
    std::fs::write(
        dir.path().join("events/orphan-plain.jsonl"),
        br#"{"execution_id":"orphan-plain","seq":1,"at":1,"type":"queued"}
"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("records/half.sealed.tmp"), b"\x02\x01").unwrap();
    std::fs::write(dir.path().join("policies/orgs/x.json.tmp"), b"{").unwrap();

    let store = open(dir.path());
    assert!(store.get("orphan").await.unwrap().is_none());
    assert!(store.get("half").await.unwrap().is_none());
    assert!(!dir.path().join("events/orphan.sealed").exists());
    assert!(!dir.path().join("events/orphan-plain.jsonl").exists());
    assert!(!dir.path().join("records/half.sealed.tmp").exists());
    assert!(store.get("torn").await.unwrap().is_none());
    assert!(!dir.path().join("executions/torn.log").exists());
    // Nothing was left of the older layout: its folders are gone.
    assert!(!dir.path().join("records").exists());
    assert!(!dir.path().join("events").exists());
    assert_eq!(store.get_org_policy("x").await.unwrap(), None);
    // The finished event wins over the stale record.
    let k = get(&store, "k").await;
    assert_eq!(k.state, ExecState::Succeeded);
    assert!(k.finished_at.is_some());
    drop(store);
    assert_eq!(
        get(&open(dir.path()), "k").await.state,
        ExecState::Succeeded
    );
}

store_test!(
    expired_lists_and_deletes_only_finished_executions_older_than_the_cut,
    |b| {
        let store = b.open().await;
        let r = rules(100);
        for (i, id) in ["old1", "old2", "young", "queued", "running"]
            .iter()
            .enumerate()
        {
            admitted(&store, record(id, "o", "u", None, i as u64), r).await;
        }
        store
            .mark_finished(
                "old1",
                ExecState::Succeeded,
                Some("results/old1".into()),
                None,
                100,
            )
            .await
            .unwrap();
        store
            .mark_finished("old2", ExecState::Failed, None, None, 199)
            .await
            .unwrap();
        store
            .mark_finished("young", ExecState::Succeeded, None, None, 200)
            .await
            .unwrap();
        store.mark_running("running", "h", 1).await.unwrap();

        // Listed oldest first, nothing deleted yet.
        let listed: Vec<String> = store
            .expired(200, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, vec!["old1", "old2"]);
        assert_eq!(
            store.expired(200, 1).await.unwrap()[0]
                .result_key
                .as_deref(),
            Some("results/old1")
        );
        assert!(store.get("old1").await.unwrap().is_some());
        // Only what is expired is deleted, whatever the caller names.
        let named: Vec<String> = ["old1", "old2", "young", "queued", "running", "nope"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let gone = store.delete_expired(&named, 200).await.unwrap();
        assert_eq!(gone, vec!["old1", "old2"]);
        for id in ["old1", "old2"] {
            assert!(store.get(id).await.unwrap().is_none());
            assert!(matches!(
                store.events_after(id, 0).await,
                Err(StoreError::NotFound(_))
            ));
            if let Some(dir) = b.dir() {
                assert!(!dir.join(format!("records/{id}.sealed")).exists());
                assert!(!dir.join(format!("events/{id}.sealed")).exists());
            }
        }
        let left: HashSet<String> = store
            .list(&ListFilter::default())
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            left,
            ["young", "queued", "running"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        );
        assert!(store.expired(200, 100).await.unwrap().is_empty());
        assert!(store.delete_expired(&named, 200).await.unwrap().is_empty());
        drop(store);
        let store = b.open().await;
        assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 3);
    }
);

store_test!(a_dropped_admission_future_still_completes, |b| {
    // A client that disconnects mid-request must not leave a half-applied decision.
    let store = b.open().await;
    admitted(&store, record("p1", "o", "u", Some("tab"), 1), rules(2)).await;
    // Polled once (which starts it), then dropped, as a disconnecting client's request.
    {
        let admission = store.admit(record("p2", "o", "u", Some("tab"), 2), rules(2));
        let mut fut = std::pin::pin!(admission);
        let _first_poll = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(fut.as_mut(), cx))
        })
        .await;
    }
    // The admission completes anyway, whole: p2 queued and p1, from the same tab,
    // superseded with its finished event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let p2 = loop {
        if let Some(p2) = store.get("p2").await.unwrap() {
            break p2;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped admission of p2 never completed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(p2.state, ExecState::Queued, "{p2:?}");
    let p1 = get(&store, "p1").await;
    assert_eq!(p1.state, ExecState::Cancelled, "{p1:?}");
    assert_eq!(p1.cancel, Some(CancelReason::SupersededByTab), "{p1:?}");
    match &store.events_after("p1", 1).await.unwrap()[..] {
        [ExecEvent {
            body: EventBody::Finished(s),
            ..
        }] => assert_eq!(s.state, ExecState::Cancelled),
        other => panic!("p1 superseded without exactly one finished event: {other:?}"),
    }
    // And it survives a restart.
    drop(store);
    let store = b.open().await;
    assert_eq!(get(&store, "p2").await.state, ExecState::Queued);
    assert_eq!(get(&store, "p1").await.state, ExecState::Cancelled);
});

/// The agent's handle finishes an execution in one statement over the row as it started
/// it; what another process changed meanwhile (a cancel, an event of its own) must not be
/// written over: the finish sees it, and the counters and the event log stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finish_keeps_what_another_handle_changed_while_it_ran() {
    let Some(b) = Backend::postgres("a_finish_keeps_what_another_handle_changed") else {
        return;
    };
    let (agent, api) = (b.open().await, b.open().await);
    for id in ["plain", "cancelled", "appended"] {
        admitted(&agent, record(id, "o", id, None, 1), rules(2)).await;
        agent.mark_running(id, "h1", 2).await.unwrap();
        agent
            .append_event(id, EventBody::Stdout(OutputData::text("out\n")))
            .await
            .unwrap();
    }
    api.request_cancel("cancelled", CancelReason::Requested)
        .await
        .unwrap();
    api.append_event("appended", EventBody::Stderr(OutputData::text("api\n")))
        .await
        .unwrap();
    for (id, state) in [
        ("plain", ExecState::Succeeded),
        ("cancelled", ExecState::Cancelled),
        ("appended", ExecState::Succeeded),
    ] {
        let (rec, event) = agent
            .finish(id, state, None, 3, summary(state))
            .await
            .unwrap();
        assert_eq!(rec.state, state, "{id}");
        let cancel = (id == "cancelled").then_some(CancelReason::Requested);
        assert_eq!(rec.cancel, cancel, "{id}: the cancel is kept");
        for reader in [&agent, &api] {
            assert_eq!(get(reader, id).await, rec, "{id}");
            let events = reader.events_after(id, 0).await.unwrap();
            assert_eq!(
                events.iter().map(|e| e.seq).collect::<Vec<_>>(),
                (1..=rec.last_seq).collect::<Vec<_>>(),
                "{id}: gapless"
            );
            assert_eq!(events.last(), Some(&event), "{id}");
        }
        let bodies = agent.events_after(id, 0).await.unwrap();
        assert_eq!(
            bodies.len(),
            if id == "appended" { 4 } else { 3 },
            "{id}: queued, the output, (the other handle's,) finished"
        );
    }
    counts_are(&api, 0, 0).await;
}

store_test!(a_record_and_its_events_after_a_seq_are_read_together, |b| {
    let store = b.open().await;
    assert_eq!(store.get_with_events_after("none", 0).await.unwrap(), None);
    admitted(&store, record("g1", "o", "u", None, 1), rules(2)).await;
    let (rec, events) = store.get_with_events_after("g1", 0).await.unwrap().unwrap();
    assert_eq!(rec, get(&store, "g1").await);
    assert_eq!(events, store.events_after("g1", 0).await.unwrap());
    assert_eq!(events.len(), 1, "queued");
    store.mark_running("g1", "h1", 2).await.unwrap();
    for text in ["a\n", "b\n", "c\n"] {
        store
            .append_event("g1", EventBody::Stdout(OutputData::text(text)))
            .await
            .unwrap();
    }
    for after in [0, 1, 2, 4, 9] {
        let (rec, events) = store
            .get_with_events_after("g1", after)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec, get(&store, "g1").await, "after {after}");
        assert_eq!(rec.state, ExecState::Running);
        assert_eq!(
            events,
            store.events_after("g1", after).await.unwrap(),
            "after {after}"
        );
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (after + 1..=4).collect::<Vec<_>>()
        );
    }
});

store_test!(
    finishing_stores_the_state_and_its_finished_event_together,
    |b| {
        let store = b.open().await;
        admitted(&store, record("f1", "o", "u", None, 1), rules(2)).await;
        store.mark_running("f1", "h1", 2).await.unwrap();
        store
            .append_event("f1", EventBody::Stdout(OutputData::text("hi\n")))
            .await
            .unwrap();
        let (rec, event) = store
            .finish(
                "f1",
                ExecState::Succeeded,
                Some("results/f1".into()),
                3,
                summary(ExecState::Succeeded),
            )
            .await
            .unwrap();
        assert_eq!(rec.state, ExecState::Succeeded);
        assert_eq!((rec.last_seq, event.seq), (3, 3));
        assert_eq!(
            event.body,
            EventBody::Finished(summary(ExecState::Succeeded))
        );
        assert_eq!(get(&store, "f1").await, rec);
        let events = store.events_after("f1", 0).await.unwrap();
        assert_eq!(events.last(), Some(&event));
        // Finishing again changes nothing and adds no event.
        assert!(matches!(
            store
                .finish("f1", ExecState::Failed, None, 4, summary(ExecState::Failed))
                .await,
            Err(StoreError::IllegalTransition { .. })
        ));
        assert_eq!(store.events_after("f1", 0).await.unwrap(), events);
        assert_eq!(
            store.active_counts().await.unwrap(),
            ActiveCounts::default()
        );
        // And a restart keeps both.
        drop(store);
        let store = b.open().await;
        assert_eq!(get(&store, "f1").await, rec);
        assert_eq!(store.events_after("f1", 0).await.unwrap(), events);
    }
);

store_test!(
    a_host_keeps_the_state_it_is_asked_for_across_its_restarts,
    |b| {
        let store = b.open().await;
        assert!(matches!(
            store.set_host_state("h1", HostState::Draining).await,
            Err(StoreError::UnknownHost(h)) if h == "h1"
        ));
        store.register_host("h1", 60_000).await.unwrap();
        store.register_host("h2", 60_000).await.unwrap();
        let hosts = store.hosts().await.unwrap();
        let states: Vec<(&str, HostState, bool)> = hosts
            .iter()
            .map(|h| (h.agent.as_str(), h.state, h.alive))
            .collect();
        assert_eq!(
            states,
            [
                ("h1", HostState::Ready, true),
                ("h2", HostState::Ready, true)
            ]
        );
        assert!(hosts[0].lease_expires_at > hatchery_scheduler::model::now_ms());
        for state in [HostState::Cordoned, HostState::Draining] {
            let h = store.set_host_state("h1", state).await.unwrap();
            assert_eq!((h.agent.as_str(), h.state, h.alive), ("h1", state, true));
            assert_eq!(
                store.heartbeat("h1", 60_000).await.unwrap(),
                Lease::Held(state)
            );
        }
        // The agent restarts (registers again): the drain stays.
        store.register_host("h1", 60_000).await.unwrap();
        assert_eq!(
            store.heartbeat("h1", 60_000).await.unwrap(),
            Lease::Held(HostState::Draining)
        );
        assert_eq!(
            store.heartbeat("h2", 60_000).await.unwrap(),
            Lease::Held(HostState::Ready)
        );
        store.set_host_state("h1", HostState::Ready).await.unwrap();
        assert_eq!(
            store.heartbeat("h1", 60_000).await.unwrap(),
            Lease::Held(HostState::Ready)
        );
    }
);

store_test!(
    a_host_that_stops_renewing_its_lease_loses_its_runs_and_is_fenced,
    |b| {
        let store = b.open().await;
        store.register_host("h1", 300).await.unwrap();
        store.register_host("h2", 60_000).await.unwrap();
        for (id, host) in [("l1", "h1"), ("l2", "h1"), ("l3", "h2")] {
            admitted(&store, record(id, "o", host, None, 1), rules(2)).await;
            store.mark_running(id, host, 2).await.unwrap();
        }
        admitted(&store, record("q1", "o", "h1", None, 3), rules(2)).await;
        assert_eq!(
            store.heartbeat("h1", 300).await.unwrap(),
            Lease::Held(HostState::Ready)
        );
        assert!(store.reap_lapsed_hosts().await.unwrap().is_empty());

        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let events = store.reap_lapsed_hosts().await.unwrap();
        let lost: Vec<&str> = events.iter().map(|e| e.execution_id.as_str()).collect();
        assert_eq!(lost, vec!["l1", "l2"]);
        for e in &events {
            match &e.body {
                EventBody::Finished(s) => {
                    assert_eq!(s.state, ExecState::Lost);
                    assert_eq!(s.error_code.as_deref(), Some("host_lost"));
                }
                other => panic!("{other:?}"),
            }
            let r = get(&store, &e.execution_id).await;
            assert_eq!((r.state, r.last_seq), (ExecState::Lost, e.seq));
        }
        // Another host's run and a queued one are untouched; reaping again finds nothing.
        assert_eq!(get(&store, "l3").await.state, ExecState::Running);
        assert_eq!(get(&store, "q1").await.state, ExecState::Queued);
        assert!(store.reap_lapsed_hosts().await.unwrap().is_empty());
        assert_eq!(store.active_counts().await.unwrap().running, 1);

        // The late host is fenced: its heartbeat says so until it registers again.
        assert_eq!(store.heartbeat("h1", 300).await.unwrap(), Lease::Lapsed);
        assert_eq!(store.heartbeat("h1", 300).await.unwrap(), Lease::Lapsed);
        store.register_host("h1", 60_000).await.unwrap();
        assert_eq!(
            store.heartbeat("h1", 60_000).await.unwrap(),
            Lease::Held(HostState::Ready)
        );
        assert_eq!(
            store.heartbeat("never-registered", 1000).await.unwrap(),
            Lease::Lapsed
        );

        // A host that is late but was not declared lost yet (the store was unreachable
        // for everyone, say) keeps its lease and its runs.
        store.register_host("h3", 300).await.unwrap();
        admitted(&store, record("l4", "o", "h3", None, 4), rules(2)).await;
        store.mark_running("l4", "h3", 5).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        assert_eq!(
            store.heartbeat("h3", 300).await.unwrap(),
            Lease::Held(HostState::Ready)
        );
        assert!(store.reap_lapsed_hosts().await.unwrap().is_empty());
        assert_eq!(get(&store, "l4").await.state, ExecState::Running);
    }
);

store_test!(
    one_leader_at_a_time_and_a_new_term_for_each_new_leader,
    |b| {
        let store = b.open().await;
        assert_eq!(store.lead("scheduler", "s1", 400).await.unwrap(), Some(1));
        assert_eq!(store.lead("scheduler", "s2", 400).await.unwrap(), None);
        assert_eq!(store.lead("scheduler", "s1", 400).await.unwrap(), Some(1));
        // Another role is led separately.
        assert_eq!(store.lead("other", "s2", 400).await.unwrap(), Some(1));
        // s1 stops renewing: s2 takes over with a new term, and s1 is told it lost.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        assert_eq!(store.lead("scheduler", "s2", 400).await.unwrap(), Some(2));
        assert_eq!(store.lead("scheduler", "s1", 400).await.unwrap(), None);
        // Many candidates at once: exactly one wins.
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.lead("scheduler", &format!("c{i}"), 60_000).await })
            })
            .collect();
        let mut winners = Vec::new();
        for t in tasks {
            if let Some(term) = t.await.unwrap().unwrap() {
                winners.push(term);
            }
        }
        assert_eq!(
            winners,
            vec![3],
            "exactly one new leader with the next term"
        );
    }
);

store_test!(policies_read_together_are_those_read_apart, |b| {
    let store = b.open().await;
    assert_eq!(
        store.get_policies("acme", "ann").await.unwrap(),
        (None, None)
    );
    let org = Policy {
        max_parallel: Some(3),
        ..Policy::default()
    };
    store.put_org_policy("acme", org.clone()).await.unwrap();
    assert_eq!(
        store.get_policies("acme", "ann").await.unwrap(),
        (Some(org.clone()), None)
    );
    let user = Policy {
        memory_bytes: Some(1 << 30),
        ..Policy::default()
    };
    store
        .put_user_policy("acme", "ann", user.clone())
        .await
        .unwrap();
    assert_eq!(
        store.get_policies("acme", "ann").await.unwrap(),
        (Some(org.clone()), Some(user.clone()))
    );
    // Another user of the org has the org's policy only; another org has none.
    assert_eq!(
        store.get_policies("acme", "bob").await.unwrap(),
        (Some(org), None)
    );
    assert_eq!(
        store.get_policies("other", "ann").await.unwrap(),
        (None, None)
    );
});

/// The admissions journal: an admission is durable through `admissions.log` before its
/// own log is; a crash that lost the log (its folder entry, or its first line) gets it
/// back at the next open, and nothing removed comes back.
#[tokio::test]
async fn an_admission_whose_log_a_crash_lost_comes_back_from_the_admissions_journal() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("admissions.log");
    let store = open(dir.path());
    // An execution that ended and expired: removed, and never brought back.
    admitted(&store, record("gone", "o", "u", None, 1), rules(10)).await;
    store.mark_running("gone", "h", 2).await.unwrap();
    store
        .finish(
            "gone",
            ExecState::Succeeded,
            None,
            3,
            summary(ExecState::Succeeded),
        )
        .await
        .unwrap();
    assert!(std::fs::metadata(&journal).unwrap().len() > 0);
    assert_eq!(
        store
            .delete_expired(&["gone".to_string()], u64::MAX)
            .await
            .unwrap(),
        vec!["gone".to_string()]
    );
    // The removal checkpointed first: the journal is empty; new admissions fill it.
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    for id in ["lost", "torn", "kept", "late"] {
        admitted(&store, record(id, "o", "u", None, 4), rules(10)).await;
    }
    let before: Vec<ExecEvent> = store.events_after("lost", 0).await.unwrap();
    drop(store);

    // What a machine crash can do to logs whose folder entry or data were not synced.
    for (id, keep) in [("lost", None), ("torn", Some(10)), ("late", None)] {
        let log = dir.path().join(format!("executions/{id}.log"));
        match keep {
            None => std::fs::remove_file(&log).unwrap(),
            Some(n) => {
                let bytes = std::fs::read(&log).unwrap();
                std::fs::write(&log, &bytes[..n]).unwrap();
            }
        }
    }
    let store = open(dir.path());
    for id in ["lost", "torn", "kept", "late"] {
        let r = get(&store, id).await;
        assert_eq!(r.state, ExecState::Queued, "{id}");
        assert_eq!(r.last_seq, 1, "{id}");
    }
    assert_eq!(store.events_after("lost", 0).await.unwrap(), before);
    assert!(store.get("gone").await.unwrap().is_none());
    // Opening checkpointed: the journal is empty, every log is whole.
    assert_eq!(std::fs::metadata(&journal).unwrap().len(), 0);
    let e = store
        .append_event("torn", EventBody::Stdout(OutputData::text("x")))
        .await
        .unwrap();
    assert_eq!(e.seq, 2);
}

/// The journal is emptied every so many admissions, not only at removals and opens.
#[tokio::test]
async fn the_admissions_journal_stays_short() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("admissions.log");
    let store = open(dir.path());
    admitted(&store, record("first", "o", "u", None, 1), rules(1000)).await;
    let one = std::fs::metadata(&journal).unwrap().len();
    let mut longest = 0;
    for i in 0..200 {
        admitted(
            &store,
            record(&format!("x{i}"), "o", "u", None, 2),
            rules(1000),
        )
        .await;
        longest = longest.max(std::fs::metadata(&journal).unwrap().len());
    }
    assert!(
        longest < one * 70,
        "{longest} bytes for {one} per admission"
    );
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.list(&ListFilter::default()).await.unwrap().len(), 201);
}

store_test!(
    an_admission_with_policies_changed_since_stores_nothing,
    |b| {
        // Two nodes on one store: the first reads the policies, the second changes one.
        let one = b.open().await;
        let two = b.open().await;
        let (_, _, version) = one.policies_for_admission("o", "u").await.unwrap();
        let Some(version) = version else {
            // The embedded store reads its policies under the admission's lock: no version.
            let a = one
                .admit_at(record("plain", "o", "u", None, 1), rules(2), None)
                .await
                .unwrap();
            assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
            return;
        };
        admitted(&one, record("t1", "o", "u", Some("tab"), 1), rules(2)).await;
        let user = Policy {
            max_parallel: Some(1),
            ..Policy::default()
        };
        two.put_user_policy("o", "u", user.clone()).await.unwrap();
        // Stale, on the one-statement path and on the full one (the tab's execution would
        // be superseded): refused, nothing stored, nothing cancelled.
        for (id, tab) in [("s1", None), ("s2", Some("tab"))] {
            let a = one
                .admit_at(record(id, "o", "u", tab, 2), rules(2), Some(version))
                .await
                .unwrap();
            assert!(matches!(a, Admission::StalePolicy), "{id}: {a:?}");
            assert!(one.get(id).await.unwrap().is_none(), "{id}");
        }
        assert_eq!(get(&one, "t1").await.state, ExecState::Queued);
        // Read again (not from what the node kept): the new policy and a new version.
        let (_, u, again) = one.policies_for_admission("o", "u").await.unwrap();
        assert_eq!(u, Some(user));
        let again = again.unwrap();
        assert!(again > version, "{again} after {version}");
        let a = one
            .admit_at(record("s3", "o", "u", None, 3), rules(1), Some(again))
            .await
            .unwrap();
        assert!(matches!(a, Admission::Admitted { .. }), "{a:?}");
        // A node's own write is seen at once.
        one.put_org_policy("o", Policy::default()).await.unwrap();
        let (o, _, latest) = one.policies_for_admission("o", "u").await.unwrap();
        assert_eq!(o, Some(Policy::default()));
        assert!(latest.unwrap() > again);
    }
);

store_test!(
    group_statuses_are_replaced_whole_and_read_back_by_name,
    |b| {
        let store = b.open().await;
        assert!(store.group_statuses().await.unwrap().is_empty());
        let status = |group: &str, pending: u32, at: u64| GroupStatus {
            group: group.into(),
            pending,
            pending_need: Resources::new(u64::from(pending) << 30, f64::from(pending) / 2.0),
            reserved: 2,
            reserved_need: Resources::new(1 << 30, 2.0),
            ready: 2,
            provisioning: 1,
            terminating: 0,
            at,
        };
        let (small, big) = (status("small", 3, 10), status("big", 0, 10));
        store
            .put_group_statuses(&[small.clone(), big.clone()])
            .await
            .unwrap();
        assert_eq!(
            store.group_statuses().await.unwrap(),
            vec![big.clone(), small.clone()]
        );
        // The next pass: small changed, big is no longer scaled.
        let small2 = status("small", 1, 20);
        store
            .put_group_statuses(std::slice::from_ref(&small2))
            .await
            .unwrap();
        assert_eq!(store.group_statuses().await.unwrap(), vec![small2]);
        store.put_group_statuses(&[]).await.unwrap();
        assert!(store.group_statuses().await.unwrap().is_empty());
    }
);
