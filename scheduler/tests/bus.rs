//! The bus's contract, on both buses — the embedded one and Redis Streams (a private
//! `redis-server` per test): live events and host status reach every subscriber (on
//! Redis, of every process), work goes to exactly one consumer in order, waits, survives
//! a dropped waiter, is redelivered until acknowledged; on Redis also across a restart
//! of Redis.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use hatchery_scheduler::bus::{AgentCommand, Bus, BusEvent, HostStatus, Received, Subscription};
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
        need: hatchery_scheduler::model::Resources::new(3 << 30, 1.5),
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {PATIENCE:?}"))
}

/// The next item of `s` (a `Missed` or `Closed` fails the test).
async fn next<T: Clone + std::fmt::Debug>(what: &str, s: &mut Subscription<T>) -> T {
    match within(what, s.recv()).await {
        Received::Item(item) => item,
        other => panic!("{what}: {other:?}"),
    }
}

/// Retries `f` until it succeeds (a connection re-establishing after a restart).
async fn until_ok<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout(PATIENCE, f()).await {
            Ok(Ok(t)) => return t,
            Ok(Err(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Err(e)) => panic!("{what} never recovered: {e:?}"),
            Err(_) => panic!("{what}: nothing within {PATIENCE:?}"),
        }
    }
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
    // A batch (one round trip on Redis) arrives whole and in order; an empty one is
    // nothing.
    agent
        .publish_events(
            (4..=6)
                .map(|seq| event("x", seq, &format!("line {seq}\n")))
                .collect(),
        )
        .await
        .unwrap();
    agent.publish_events(Vec::new()).await.unwrap();
    // An admission's events and its submission go together, events first.
    api1.publish_and_submit(vec![event("x", 7, "line 7\n")], Some("x"))
        .await
        .unwrap();
    assert_eq!(
        within("the submission", api2.next_submitted())
            .await
            .unwrap(),
        "x"
    );
    // A live-only event (no seq) travels the same way, in order.
    agent.publish_live(usage("x", 4096)).await.unwrap();
    for s in [&mut s1, &mut s2, &mut s3] {
        for seq in 1..=7 {
            let e = next("an event", s).await;
            assert_eq!(
                e,
                BusEvent::Stored(event("x", seq, &format!("line {seq}\n")))
            );
        }
        let e = next("a live event", s).await;
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
        group: None,
        at: 1,
        capacity: 4,
        running: 1,
        allocatable: hatchery_scheduler::model::Resources::new(60 << 30, 15.5),
        draining: false,
        state: Default::default(),
        load: hatchery_scheduler::bus::HostLoad {
            cpu_busy: 0.5,
            memory_total_bytes: 16 << 30,
            memory_used_bytes: 1 << 30,
            cpu_pressure: 2.25,
            memory_pressure: 0.5,
        },
        warm: vec![("r".into(), 2)],
        sandboxes: vec![],
    };
    agent.publish_status(st.clone()).await.unwrap();
    assert_eq!(next("a status", &mut s).await, st);
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

bus_test!(a_subscriber_of_one_execution_gets_its_events_only, |b| {
    let agent = b.open("agent-1").await;
    let api = b.open("api-1").await;
    let mut all = api.subscribe_events();
    let mut one = api.subscribe_execution("x");
    agent.publish_event(event("y", 1, "other\n")).await.unwrap();
    agent.publish_event(event("x", 1, "mine\n")).await.unwrap();
    agent.publish_live(usage("y", 1)).await.unwrap();
    agent.publish_live(usage("x", 2)).await.unwrap();
    agent.publish_event(event("y", 2, "other\n")).await.unwrap();
    for _ in 0..5 {
        next("every event", &mut all).await;
    }
    assert_eq!(
        next("x's event", &mut one).await,
        BusEvent::Stored(event("x", 1, "mine\n"))
    );
    assert_eq!(
        next("x's live event", &mut one).await,
        BusEvent::Live(usage("x", 2))
    );
    assert!(one.try_recv().is_none(), "nothing of another execution");
});

fn status(agent: &str, at: u64) -> HostStatus {
    HostStatus {
        agent: agent.into(),
        group: None,
        at,
        capacity: 4,
        running: 0,
        allocatable: Default::default(),
        draining: false,
        state: Default::default(),
        load: Default::default(),
        warm: vec![("r".into(), 1)],
        sandboxes: vec![],
    }
}

/// Skips the `Missed` notes a subscriber gets around a restart (one when the connection
/// drops, one when it is back); requires at least one, then returns the next item.
async fn missed_then<T: Clone + std::fmt::Debug>(what: &str, s: &mut Subscription<T>) -> T {
    let mut missed = 0;
    loop {
        match within(what, s.recv()).await {
            Received::Missed => missed += 1,
            Received::Item(item) => {
                assert!(missed > 0, "{what}: {item:?} came without a Missed first");
                return item;
            }
            Received::Closed => panic!("{what}: closed"),
        }
    }
}

/// Redis restarted without its data: subscribers are told they may have missed entries
/// (they catch up from the store), then get what is published once it is back;
/// publishers, submissions and agents' commands carry on (the consumer groups, gone with
/// the data, are made again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_redis_bus_carries_on_after_redis_restarts() {
    let Some(mut b) = Backend::redis("the_redis_bus_carries_on_after_redis_restarts") else {
        return;
    };
    let api = b.open("api-1").await;
    let scheduler = b.open("scheduler-1").await;
    let agent = b.open("h1").await;
    let mut events = api.subscribe_events();
    let mut of_x = api.subscribe_execution("x");
    let mut statuses = api.subscribe_status();
    scheduler
        .publish_event(event("x", 1, "before\n"))
        .await
        .unwrap();
    assert_eq!(next("before", &mut events).await.seq(), Some(1));
    assert_eq!(next("x's before", &mut of_x).await.seq(), Some(1));
    agent.publish_status(status("h1", 1)).await.unwrap();
    assert_eq!(next("a status before", &mut statuses).await.at, 1);
    api.submit("s1").await.unwrap();
    let s1 = within("s1", scheduler.take_submitted()).await.unwrap();
    assert_eq!(s1.item, "s1");
    scheduler.ack_submitted(&s1.tag).await.unwrap();
    scheduler.send_to_agent("h1", run_cmd("a")).await.unwrap();
    let a = within("a", agent.take_for_agent("h1")).await.unwrap();
    assert_eq!(a.item, run_cmd("a"));
    agent.ack_for_agent("h1", &a.tag).await.unwrap();
    // Taken, never acknowledged: it is lost with Redis's data (the store re-places it).
    scheduler
        .send_to_agent("h1", run_cmd("lost"))
        .await
        .unwrap();
    let lost = within("lost", agent.take_for_agent("h1")).await.unwrap();

    let Backend::Redis(server) = &mut b else {
        unreachable!()
    };
    server.restart().unwrap();

    // Publishing may fail while the connection re-establishes; it comes back, and the
    // subscriber hears it may have missed events before it gets the new ones.
    until_ok("publishing", || {
        scheduler.publish_event(event("x", 2, "after\n"))
    })
    .await;
    let e = missed_then("an event after the restart", &mut events).await;
    assert_eq!(e, BusEvent::Stored(event("x", 2, "after\n")));
    let e = missed_then("x's event after the restart", &mut of_x).await;
    assert_eq!(e, BusEvent::Stored(event("x", 2, "after\n")));
    until_ok("publishing a status", || {
        agent.publish_status(status("h1", 2))
    })
    .await;
    let s = missed_then("a status after the restart", &mut statuses).await;
    assert_eq!(s.at, 2);
    // A subscriber that came after the restart hears nothing of it.
    let mut fresh = api.subscribe_events();
    scheduler
        .publish_event(event("x", 3, "later\n"))
        .await
        .unwrap();
    assert_eq!(next("an event", &mut events).await.seq(), Some(3));
    assert_eq!(next("an event", &mut fresh).await.seq(), Some(3));

    // Dispatch works again: the groups are made again where Redis lost them (first by
    // a requeue, as a scheduler that starts leading does).
    let requeued = until_ok("requeueing", || scheduler.requeue_unacked_submissions()).await;
    assert_eq!(
        requeued, 0,
        "nothing is pending in a Redis that lost its data"
    );
    until_ok("submitting", || api.submit("s2")).await;
    let s2 = until_ok("taking a submission", || scheduler.take_submitted()).await;
    assert_eq!(s2.item, "s2");
    scheduler.ack_submitted(&s2.tag).await.unwrap();
    assert_eq!(scheduler.requeue_unacked_submissions().await.unwrap(), 0);
    // Acknowledging what Redis forgot is not an error.
    agent.ack_for_agent("h1", &lost.tag).await.unwrap();
    until_ok("sending a command", || {
        scheduler.send_to_agent("h1", run_cmd("b"))
    })
    .await;
    let b_cmd = until_ok("taking a command", || agent.take_for_agent("h1")).await;
    assert_eq!(b_cmd.item, run_cmd("b"));
    // Unacknowledged work is redelivered as before.
    assert_eq!(agent.requeue_unacked("h1").await.unwrap(), 1);
    let again = within("b again", agent.take_for_agent("h1")).await.unwrap();
    assert_eq!(again.item, run_cmd("b"));
    agent.ack_for_agent("h1", &again.tag).await.unwrap();
    assert_eq!(agent.requeue_unacked("h1").await.unwrap(), 0);
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
    next("the event", &mut s).await;
    // A live event's payload too (a memory figure nobody else would print).
    bus.publish_live(usage("x", 987_654_321)).await.unwrap();
    next("the live event", &mut s).await;
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

/// Connections to the test's Redis other than the one asking.
fn redis_clients(b: &Backend) -> usize {
    let Backend::Redis(server) = b else {
        unreachable!()
    };
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(server.port().to_string())
        .args(["CLIENT", "LIST"])
        .output()
        .expect("redis-cli");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).lines().count() - 1
}

/// A process that reads the event and status streams only once something in it
/// subscribes (an agent, a scheduler): it holds no reader connection before; its first
/// subscribers are told they may have missed items (what was added before is not
/// replayed), then get what comes; later subscribers share the one reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bus_read_from_its_first_subscription_reads_nothing_before_it() {
    let Some(b) = Backend::redis("a_bus_read_from_its_first_subscription") else {
        return;
    };
    let Backend::Redis(server) = &b else {
        unreachable!()
    };
    let lazy = |name: &str| RedisConfig {
        read_at_connect: false,
        ..RedisConfig::new(server.url(), name)
    };
    let agent = RedisBus::connect(lazy("agent-1"), keyring()).await.unwrap();
    let scheduler = RedisBus::connect(lazy("scheduler-1"), keyring())
        .await
        .unwrap();
    agent.publish_status(status("agent-1", 1)).await.unwrap();
    agent.publish_event(event("x", 1, "early\n")).await.unwrap();
    assert_eq!(
        redis_clients(&b),
        2,
        "one shared connection per process, no reader"
    );

    let mut first = scheduler.subscribe_status();
    assert_eq!(
        within("the first note", first.recv()).await,
        Received::Missed
    );
    agent.publish_status(status("agent-1", 2)).await.unwrap();
    assert_eq!(next("a status", &mut first).await.at, 2, "nothing replayed");
    assert_eq!(redis_clients(&b), 3, "one reader: the status stream's");

    let mut second = scheduler.subscribe_status();
    agent.publish_status(status("agent-1", 3)).await.unwrap();
    assert_eq!(next("the second's status", &mut second).await.at, 3);
    assert_eq!(next("the first's status", &mut first).await.at, 3);
    assert!(first.try_recv().is_none() && second.try_recv().is_none());

    let mut events = agent.subscribe_events();
    assert_eq!(
        within("the events' note", events.recv()).await,
        Received::Missed
    );
    agent.publish_event(event("x", 2, "late\n")).await.unwrap();
    assert_eq!(
        next("an event", &mut events).await,
        BusEvent::Stored(event("x", 2, "late\n")),
        "the early event is not replayed"
    );
    assert_eq!(redis_clients(&b), 4, "and one for the event stream");
}
