//! The bus's contract, on both buses — the embedded one and Redis Streams (a private
//! `redis-server` per test): live events and host status reach every subscriber (on
//! Redis, of every process), work goes to exactly one consumer in order, waits, survives
//! a dropped waiter, is redelivered until acknowledged; on Redis also across a restart
//! of Redis.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hatchery_scheduler::bus::{AgentCommand, Bus, BusEvent, HostStatus};
use hatchery_scheduler::embedded::EmbeddedBus;
use hatchery_scheduler::engines::{EngineError, RedisServer};
use hatchery_scheduler::model::{EventBody, ExecEvent, LiveBody, LiveEvent, OutputData, Usage};
use hatchery_scheduler::redis_bus::{RedisBus, RedisConfig};
use hatchery_scheduler::seal::Keyring;

const PATIENCE: Duration = Duration::from_secs(10);

fn keyring() -> Keyring {
    Keyring::single([5u8; 32])
}

/// Where a test's bus lives; `open(name)` is another process's handle on the same bus
/// (another API replica, scheduler or agent), `name` its consumer identity.
enum Backend {
    Embedded(EmbeddedBus),
    Redis(RedisServer),
}

impl Backend {
    fn redis(test: &str) -> Option<Backend> {
        match RedisServer::start() {
            Ok(server) => Some(Backend::Redis(server)),
            Err(EngineError::RedisMissing) => {
                hatchery_tests::skip(
                    &format!("{test} on Redis"),
                    "redis-server is not installed",
                    "HATCHERY_REQUIRE_ENGINES",
                );
                None
            }
            Err(e) => panic!("starting Redis: {e}"),
        }
    }

    async fn open(&self, name: &str) -> Arc<dyn Bus> {
        match self {
            Backend::Embedded(bus) => Arc::new(bus.clone()),
            Backend::Redis(server) => Arc::new(
                RedisBus::connect(RedisConfig::new(server.url(), name), keyring())
                    .await
                    .unwrap(),
            ),
        }
    }
}

macro_rules! bus_test {
    ($name:ident, |$b:ident| $body:block) => {
        mod $name {
            use super::*;

            #[allow(unused_mut)]
            async fn body(mut $b: Backend) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() {
                body(Backend::Embedded(EmbeddedBus::new())).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                if let Some(b) = Backend::redis(stringify!($name)) {
                    body(b).await
                }
            }
        }
    };
}

fn event(id: &str, seq: u64, text: &str) -> ExecEvent {
    ExecEvent {
        execution_id: id.into(),
        seq,
        at: 0,
        body: EventBody::Stdout(OutputData::text(text)),
    }
}

fn usage(id: &str, memory_bytes: u64) -> LiveEvent {
    LiveEvent {
        execution_id: id.into(),
        at: 0,
        body: LiveBody::Usage(Usage {
            cpu_ms: 1.5,
            memory_bytes,
            memory_peak_bytes: memory_bytes,
        }),
    }
}

fn run_cmd(id: &str) -> AgentCommand {
    AgentCommand::Run {
        execution_id: id.into(),
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

bus_test!(events_reach_every_subscriber_of_every_process, |b| {
    let api1 = b.open("api-1").await;
    let api2 = b.open("api-2").await;
    let agent = b.open("agent-1").await;
    let mut s1 = api1.subscribe_events();
    let mut s2 = api2.subscribe_events();
    let mut s3 = api2.subscribe_events();
    for seq in 1..=3 {
        agent
            .publish_event(event("x", seq, &format!("line {seq}\n")))
            .await
            .unwrap();
    }
    // A live-only event (no seq) travels the same way, in order.
    agent.publish_live(usage("x", 4096)).await.unwrap();
    for s in [&mut s1, &mut s2, &mut s3] {
        for seq in 1..=3 {
            let e = within("an event", s.recv()).await.unwrap();
            assert_eq!(
                e,
                BusEvent::Stored(event("x", seq, &format!("line {seq}\n")))
            );
        }
        let e = within("a live event", s.recv()).await.unwrap();
        assert_eq!(e, BusEvent::Live(usage("x", 4096)));
        assert_eq!(e.seq(), None);
    }
});

bus_test!(status_reaches_every_process, |b| {
    let scheduler = b.open("scheduler-1").await;
    let agent = b.open("agent-1").await;
    let mut s = scheduler.subscribe_status();
    let st = HostStatus {
        agent: "h1".into(),
        at: 1,
        capacity: 4,
        running: 1,
        draining: false,
        warm: vec![("r".into(), 2)],
        sandboxes: vec![],
    };
    agent.publish_status(st.clone()).await.unwrap();
    assert_eq!(within("a status", s.recv()).await.unwrap(), st);
});

bus_test!(submissions_are_fifo_and_wait, |b| {
    let api = b.open("api-1").await;
    let scheduler = b.open("scheduler-1").await;
    let waiter = tokio::spawn({
        let scheduler = Arc::clone(&scheduler);
        async move { scheduler.next_submitted().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    api.submit("x").await.unwrap();
    assert_eq!(within("the waiter", waiter).await.unwrap(), "x");
    for id in ["a", "b", "c"] {
        api.submit(id).await.unwrap();
    }
    for id in ["a", "b", "c"] {
        assert_eq!(
            within("a submission", scheduler.next_submitted())
                .await
                .unwrap(),
            id
        );
    }
});

bus_test!(each_submission_goes_to_exactly_one_of_many_consumers, |b| {
    let api = b.open("api-1").await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut consumers = Vec::new();
    for c in 0..4 {
        let (bus, tx) = (b.open(&format!("scheduler-{c}")).await, tx.clone());
        consumers.push(tokio::spawn(async move {
            loop {
                let id = bus.next_submitted().await.unwrap();
                if tx.send(id).is_err() {
                    return;
                }
            }
        }));
    }
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let api = Arc::clone(&api);
            tokio::spawn(async move {
                for i in 0..250 {
                    api.submit(&format!("{p}-{i}")).await.unwrap();
                }
            })
        })
        .collect();
    for p in producers {
        p.await.unwrap();
    }
    let mut seen = HashSet::new();
    for _ in 0..1000 {
        let id = within("a submission (one was lost)", rx.recv())
            .await
            .unwrap();
        assert!(seen.insert(id.clone()), "{id} delivered twice");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "more deliveries than submissions"
    );
    for c in consumers {
        c.abort();
    }
});

bus_test!(a_dropped_waiter_does_not_swallow_an_item, |b| {
    let api = b.open("api-1").await;
    let scheduler = b.open("scheduler-1").await;
    let gone = tokio::time::timeout(Duration::from_millis(50), scheduler.next_submitted()).await;
    assert!(gone.is_err());
    api.submit("kept").await.unwrap();
    assert_eq!(
        within("the item", scheduler.next_submitted())
            .await
            .unwrap(),
        "kept"
    );
});

bus_test!(agents_have_their_own_queues, |b| {
    let scheduler = b.open("scheduler-1").await;
    // Sent before the agent ever asked: kept.
    scheduler.send_to_agent("h1", run_cmd("a")).await.unwrap();
    scheduler.send_to_agent("h2", run_cmd("b")).await.unwrap();
    scheduler
        .send_to_agent(
            "h1",
            AgentCommand::Cancel {
                execution_id: "a".into(),
            },
        )
        .await
        .unwrap();
    let h1 = b.open("h1").await;
    let h2 = b.open("h2").await;
    assert_eq!(
        within("h2", h2.next_for_agent("h2")).await.unwrap(),
        run_cmd("b")
    );
    assert_eq!(
        within("h1", h1.next_for_agent("h1")).await.unwrap(),
        run_cmd("a")
    );
    assert!(matches!(
        within("h1", h1.next_for_agent("h1")).await.unwrap(),
        AgentCommand::Cancel { .. }
    ));
    // An agent waiting before the command arrives gets it.
    let h3 = b.open("h3").await;
    let waiter = tokio::spawn(async move { h3.next_for_agent("h3").await.unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    scheduler.send_to_agent("h3", run_cmd("c")).await.unwrap();
    assert_eq!(within("h3", waiter).await.unwrap(), run_cmd("c"));
});

bus_test!(
    unacknowledged_work_is_redelivered_acknowledged_work_is_not,
    |b| {
        let scheduler = b.open("scheduler-1").await;
        for id in ["a", "b", "c"] {
            scheduler.send_to_agent("h", run_cmd(id)).await.unwrap();
        }
        let h = b.open("h").await;
        let a = within("a", h.take_for_agent("h")).await.unwrap();
        let bb = within("b", h.take_for_agent("h")).await.unwrap();
        assert_eq!(
            (a.item.clone(), bb.item.clone()),
            (run_cmd("a"), run_cmd("b"))
        );
        assert_ne!(a.tag, bb.tag);
        h.ack_for_agent("h", &a.tag).await.unwrap();
        // The agent restarts (a new process, the same identity): b was never acknowledged.
        drop(h);
        let h = b.open("h").await;
        assert_eq!(h.requeue_unacked("h").await.unwrap(), 1);
        assert_eq!(
            within("b again", h.take_for_agent("h")).await.unwrap().item,
            run_cmd("b")
        );
        assert_eq!(
            within("c", h.take_for_agent("h")).await.unwrap().item,
            run_cmd("c")
        );
        assert_eq!(
            h.requeue_unacked("h").await.unwrap(),
            2,
            "b and c are unacknowledged"
        );
        let d1 = within("b", h.take_for_agent("h")).await.unwrap();
        let d2 = within("c", h.take_for_agent("h")).await.unwrap();
        assert_eq!(
            (d1.item.clone(), d2.item.clone()),
            (run_cmd("b"), run_cmd("c"))
        );
        h.ack_for_agent("h", &d1.tag).await.unwrap();
        h.ack_for_agent("h", &d2.tag).await.unwrap();
        assert_eq!(h.requeue_unacked("h").await.unwrap(), 0);

        // Submissions work the same way.
        let api = b.open("api-1").await;
        api.submit("x").await.unwrap();
        let x = within("x", scheduler.take_submitted()).await.unwrap();
        drop(scheduler);
        let scheduler = b.open("scheduler-1").await;
        assert_eq!(scheduler.requeue_unacked_submissions().await.unwrap(), 1);
        let x2 = within("x again", scheduler.take_submitted()).await.unwrap();
        assert_eq!(x2.item, x.item);
        scheduler.ack_submitted(&x2.tag).await.unwrap();
        assert_eq!(scheduler.requeue_unacked_submissions().await.unwrap(), 0);
    }
);

/// Redis restarted without its data: publishers and readers carry on with what is sent
/// after it is back (what was in flight is the store's to recover).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_bus_carries_on_after_redis_restarts() {
    let Some(mut b) = Backend::redis("the_redis_bus_carries_on_after_redis_restarts") else {
        return;
    };
    let api = b.open("api-1").await;
    let scheduler = b.open("scheduler-1").await;
    let mut events = api.subscribe_events();
    scheduler
        .publish_event(event("x", 1, "before\n"))
        .await
        .unwrap();
    assert_eq!(
        within("before", events.recv()).await.unwrap().seq(),
        Some(1)
    );
    api.submit("s1").await.unwrap();
    assert_eq!(
        within("s1", scheduler.next_submitted()).await.unwrap(),
        "s1"
    );

    let Backend::Redis(server) = &mut b else {
        unreachable!()
    };
    server.restart().unwrap();
    // Publishing may fail while the connection re-establishes; it must come back.
    let deadline = std::time::Instant::now() + PATIENCE;
    while scheduler
        .publish_event(event("x", 2, "after\n"))
        .await
        .is_err()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "publishing never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = within("after", events.recv()).await.unwrap();
    assert_eq!(e.seq(), Some(2));
    while api.submit("s2").await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "submitting never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = within("s2", scheduler.next_submitted()).await;
    while got.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "taking never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        got = within("s2", scheduler.next_submitted()).await;
    }
    assert_eq!(got.unwrap(), "s2");
}

/// What a user printed is sealed on the bus too (Redis may persist it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_payloads_are_sealed_in_redis() {
    let Some(b) = Backend::redis("event_payloads_are_sealed_in_redis") else {
        return;
    };
    let bus = b.open("agent-1").await;
    let mut s = bus.subscribe_events();
    bus.publish_event(event("x", 1, "a-secret-marker\n"))
        .await
        .unwrap();
    within("the event", s.recv()).await.unwrap();
    // A live event's payload too (a memory figure nobody else would print).
    bus.publish_live(usage("x", 987_654_321)).await.unwrap();
    within("the live event", s.recv()).await.unwrap();
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let dump = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(server.port().to_string())
        .args(["XRANGE", "hatchery:events", "-", "+"])
        .output()
        .expect("redis-cli");
    assert!(dump.status.success());
    assert!(!dump.stdout.is_empty(), "no event in the stream");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        !text.contains("a-secret-marker") && !text.contains("987654321"),
        "plaintext on the bus: {text}"
    );
}
