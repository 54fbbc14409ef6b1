//! The scheduler role: it takes admitted executions off the bus and sends each to the
//! agent [`crate::placement`] chooses. An execution no agent can take now waits in a
//! FIFO and is retried whenever a status arrives (an execution whose language no host
//! can take does not hold up the others).
//!
//! The scheduler holds no durable state: on start it re-places every execution the store
//! still has `queued` (submissions lost with a previous process), it looks in the store
//! for queued executions it never heard of every few seconds (the store is the outbox,
//! the bus only wakes), and an execution sent to an agent that then vanished (its status
//! went stale) while the record is still `queued` is placed again. Repeats are harmless:
//! an agent runs an execution only after its `queued` → `running` transition in the
//! store succeeds. It also reaps hosts whose lease lapsed (their runs become `lost`),
//! except right after the store was unreachable.
//!
//! Leadership (one scheduler of a cluster places at a time) is [`crate::node::Engines::run_scheduler`].

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::bus::{AgentCommand, Bus, BusError, DeliveryTag, HostStatus, Received, Subscription};
use crate::model::{now_ms, ExecState, Resources};
use crate::placement::{Cluster, Misses};
use crate::store::{ListFilter, Store, StoreError};

/// How often the scheduler re-checks without being woken (stale hosts, lost runs).
const TICK: Duration = Duration::from_secs(1);
/// How often the scheduler looks in the store for queued executions it never heard of
/// (admitted while the bus was down, or a submission lost with it): the store is the
/// outbox, the bus only wakes.
const RECONCILE_EVERY: Duration = Duration::from_secs(3);
/// How often hosts whose lease lapsed are looked for (their runs become `lost`).
const REAP_EVERY: Duration = Duration::from_secs(1);
/// After the store was unreachable, how long hosts get to renew their leases before any
/// is declared lost (longer than an agent's default lease).
const REAP_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("the bus closed")]
    BusClosed,
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// An execution waiting for a host.
#[derive(Debug, Clone)]
struct Waiting {
    id: String,
    language: String,
    /// What its limits take from a host.
    need: Resources,
    /// The bus delivery it came with, acknowledged once it is placed (or dropped);
    /// `None` for executions recovered from the store.
    tag: Option<DeliveryTag>,
    /// The store said it was queued and not cancelled right before it was queued here:
    /// it is sent without reading it again. One that waited for capacity is read again
    /// first (it may have been cancelled meanwhile); either way the agent's
    /// `mark_running` is the guard that refuses a cancelled one.
    fresh: bool,
    /// The host groups it may run on (its record's; `None`: any).
    groups: Option<Vec<String>>,
}

impl Waiting {
    /// A queued record, waiting.
    fn of(r: crate::model::ExecutionRecord, tag: Option<DeliveryTag>, fresh: bool) -> Waiting {
        Waiting {
            need: r.limits.resources(),
            id: r.id,
            language: r.language,
            tag,
            fresh,
            groups: r.groups,
        }
    }
}

/// Runs the scheduler role until the bus closes. `statuses` should be subscribed before
/// the agents start (so no status is missed); the scheduler places with what it has.
pub async fn run_scheduler(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    statuses: Subscription<HostStatus>,
    store_trouble: Option<std::time::Instant>,
) -> Result<(), SchedulerError> {
    run_scheduler_scaling(store, bus, statuses, store_trouble, None).await
}

/// [`run_scheduler`], with the autoscaler ([`crate::scaler`]) running a pass every
/// [`crate::scaler::SCALE_EVERY`] when `scaling` is given: what waits for a host is its
/// demand.
pub async fn run_scheduler_scaling(
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    mut statuses: Subscription<HostStatus>,
    store_trouble: Option<std::time::Instant>,
    scaling: Option<crate::scaler::Scaling>,
) -> Result<(), SchedulerError> {
    let mut scaler = scaling.map(crate::scaler::Scaler::new);
    let mut scale = tokio::time::interval(crate::scaler::SCALE_EVERY);
    scale.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Submissions are read by their own task, so a pending read is never dropped
    // half-way by the `select!` below.
    // Submissions a previous scheduler took but never acknowledged come back first.
    match bus.requeue_unacked_submissions().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "requeued unacknowledged submissions"),
        Err(e) => tracing::warn!(error = %e, "cannot requeue unacknowledged submissions"),
    }
    let (sub_tx, mut submissions) = mpsc::channel::<Result<(String, DeliveryTag), BusError>>(64);
    let reader = {
        let bus = Arc::clone(&bus);
        tokio::spawn(async move {
            // A failing read is tried again after a pause, here: the loop below only
            // reports it, so a burst of failures never holds up placement.
            let mut pauses = crate::bus::retry_pauses();
            loop {
                let next = bus.take_submitted().await.map(|d| (d.item, d.tag));
                let closed = matches!(next, Err(BusError::Closed));
                let failed = next.is_err();
                if sub_tx.send(next).await.is_err() || closed {
                    return;
                }
                if failed {
                    tokio::time::sleep(pauses.next().unwrap_or(TICK)).await;
                } else {
                    pauses = crate::bus::retry_pauses();
                }
            }
        })
    };
    let _reader = AbortOnDrop(reader);

    let mut cluster = Cluster::default();
    let mut queue: VecDeque<Waiting> = VecDeque::new();
    // Whatever the store still has queued was submitted to a previous scheduler.
    let mut recovered = store
        .list(&ListFilter {
            state: Some(ExecState::Queued),
            ..ListFilter::default()
        })
        .await?;
    recovered.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
    if !recovered.is_empty() {
        tracing::info!(count = recovered.len(), "re-placing executions left queued");
    }
    for r in recovered {
        if r.cancel.is_none() {
            queue.push_back(Waiting::of(r, None, false));
        }
    }
    let mut statuses_open = true;
    let mut reap = tokio::time::interval(REAP_EVERY);
    // When the store was last unreachable (also before this scheduler started to lead:
    // a leader elected right after an outage must not take every host for dead): no host
    // is reaped for a grace period after.
    let mut store_trouble = store_trouble;
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reconcile.tick().await;
    loop {
        place_waiting(store.as_ref(), bus.as_ref(), &mut cluster, &mut queue).await?;
        tokio::select! {
            next = submissions.recv() => match next {
                Some(Ok((item, tag))) => {
                    let submission = crate::bus::parse_submission(&item);
                    let id = submission.id.to_string();
                    // Already waiting or sent (the reconciliation found it first).
                    if queue.iter().any(|w| w.id == id) || cluster.is_in_flight(&id) {
                        let _ = bus.ack_submitted(&tag).await;
                        continue;
                    }
                    // Placed on the submission's word: the agent's `mark_running` runs
                    // it only if it is still queued.
                    if let Some((language, need)) = submission.hint {
                        queue.push_back(Waiting { id, language: language.to_string(), need, tag: Some(tag), fresh: true, groups: None });
                        continue;
                    }
                    let began = std::time::Instant::now();
                    let read = store.get(&id).await;
                    tracing::trace!(execution = %id, ms = began.elapsed().as_secs_f64() * 1e3, "read a submission");
                    match read {
                        Ok(Some(r)) if r.state == ExecState::Queued && r.cancel.is_none() => {
                            queue.push_back(Waiting::of(r, Some(tag), true));
                        }
                        Ok(_) => {
                            let _ = bus.ack_submitted(&tag).await;
                            tracing::debug!(execution = %id, "submitted but no longer queued");
                        }
                        Err(e) => {
                            tracing::warn!(execution = %id, error = %e, "cannot read a submitted execution");
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "reading submissions"),
                None => return Err(SchedulerError::BusClosed),
            },
            status = statuses.recv(), if statuses_open => match status {
                Received::Item(s) => {
                    let agent = s.agent.clone();
                    let draining = s.draining;
                    cluster.observe(s);
                    // Runs that ended since they were sent free their slot (those that
                    // run are in the status; one the store says runs but the status
                    // does not list started after the status was made: it still takes
                    // its slot). A draining host starts none of the runs it was sent and
                    // hands them back: those still queued are placed again at once (if
                    // it did start one meanwhile, `mark_running` lets only one host run
                    // it).
                    for id in cluster.in_flight_on(&agent) {
                        match store.get(&id).await {
                            Ok(Some(r)) if draining && r.state == ExecState::Queued => {
                                cluster.landed(&id);
                                if r.cancel.is_none() && !queue.iter().any(|w| w.id == id) {
                                    tracing::info!(execution = %id, agent = %agent, "its host drains: placing it again");
                                    queue.push_back(Waiting::of(r, None, false));
                                }
                            }
                            Ok(Some(r)) if matches!(r.state, ExecState::Queued | ExecState::Running) => {}
                            Ok(_) => cluster.landed(&id),
                            Err(e) => tracing::debug!(execution = %id, error = %e, "cannot read a sent execution"),
                        }
                    }
                }
                // Statuses come again periodically; runs that landed meanwhile are found
                // when their host's next status arrives.
                Received::Missed => tracing::debug!("host statuses may have been missed"),
                Received::Closed => statuses_open = false,
            },
            _ = reap.tick() => {
                // Right after the store was unreachable, every lease looks lapsed: give
                // the agents time to renew before declaring anyone lost.
                if store_trouble.is_some_and(|t| t.elapsed() < REAP_GRACE) {
                    if let Err(e) = store.active_counts().await {
                        tracing::debug!(error = %e, "the store is still unreachable");
                        store_trouble = Some(std::time::Instant::now());
                    }
                    continue;
                }
                match store.reap_lapsed_hosts().await {
                    Ok(events) => {
                        for e in events {
                            tracing::warn!(execution = %e.execution_id, "its host's lease lapsed: lost");
                            cluster.landed(&e.execution_id);
                            let _ = bus.publish_event(e).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reap lapsed hosts");
                        store_trouble = Some(std::time::Instant::now());
                    }
                }
            }
            _ = reconcile.tick() => {
                let queued = store
                    .list(&ListFilter {
                        state: Some(ExecState::Queued),
                        ..ListFilter::default()
                    })
                    .await;
                match queued {
                    Ok(mut queued) => {
                        queued.sort_by_key(|r| (r.admitted, r.created_at));
                        for r in queued {
                            if r.cancel.is_none()
                                && !cluster.is_in_flight(&r.id)
                                && !queue.iter().any(|w| w.id == r.id)
                            {
                                tracing::info!(execution = %r.id, "queued in the store but never submitted to this scheduler: placing it");
                                queue.push_back(Waiting::of(r, None, false));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read queued executions"),
                }
            }
            _ = scale.tick(), if scaler.is_some() => {
                if let Some(scaler) = scaler.as_mut() {
                    let waiting: Vec<crate::autoscale::Pending> = queue
                        .iter()
                        .map(|w| crate::autoscale::Pending {
                            id: w.id.clone(),
                            language: w.language.clone(),
                            need: w.need,
                            groups: w.groups.clone(),
                        })
                        .collect();
                    scaler.pass(store.as_ref(), &mut cluster, &waiting, now_ms()).await;
                }
            }
            _ = tokio::time::sleep(TICK) => {
                for id in cluster.take_orphans(now_ms()) {
                    if let Ok(Some(r)) = store.get(&id).await {
                        if r.state == ExecState::Queued && r.cancel.is_none()
                            && !queue.iter().any(|w| w.id == id)
                        {
                            tracing::warn!(execution = %id, "its host vanished before running it; placing it again");
                            queue.push_back(Waiting::of(r, None, false));
                        }
                    }
                }
            }
        }
    }
}

/// Sends every waiting execution some host can take now, in order (an execution whose
/// language no host can take does not hold up the others).
async fn place_waiting(
    store: &dyn Store,
    bus: &dyn Bus,
    cluster: &mut Cluster,
    queue: &mut VecDeque<Waiting>,
) -> Result<(), SchedulerError> {
    // What found no host in this pass: a later execution that needs no less finds none
    // either (see [`Misses`]).
    let mut misses = Misses::default();
    let mut kept = VecDeque::with_capacity(queue.len());
    while let Some(mut w) = queue.pop_front() {
        if misses.covers(&w.language, w.groups.as_deref(), &w.need) {
            w.fresh = false;
            kept.push_back(w);
            continue;
        }
        let now = now_ms();
        let Some(agent) = cluster.place(&w.language, &w.need, w.groups.as_deref(), now) else {
            misses.missed(&w.language, w.groups.as_deref(), &w.need);
            w.fresh = false;
            kept.push_back(w);
            continue;
        };
        // It may have been cancelled while it waited.
        let check = if w.fresh {
            None
        } else {
            Some(store.get(&w.id).await)
        };
        match check {
            None => {}
            Some(Ok(Some(r))) if r.state == ExecState::Queued && r.cancel.is_none() => {}
            Some(Ok(_)) => {
                if let Some(tag) = w.tag {
                    let _ = bus.ack_submitted(&tag).await;
                }
                continue;
            }
            Some(Err(e)) => {
                tracing::warn!(execution = %w.id, error = %e, "cannot read a waiting execution");
                kept.push_back(w);
                continue;
            }
        }
        let cmd = AgentCommand::Run {
            execution_id: w.id.clone(),
            need: w.need,
        };
        let began = std::time::Instant::now();
        match bus.send_to_agent(&agent, cmd).await {
            Ok(()) => {
                tracing::debug!(execution = %w.id, agent = %agent, ms = began.elapsed().as_secs_f64() * 1e3, "placed");
                cluster.sent(&w.id, &agent, w.need, now);
                // Acted on: the agent's queue holds it now.
                if let Some(tag) = w.tag {
                    let _ = bus.ack_submitted(&tag).await;
                }
            }
            Err(BusError::Closed) => {
                queue.push_front(w);
                return Err(SchedulerError::BusClosed);
            }
            Err(e) => {
                tracing::warn!(execution = %w.id, agent = %agent, error = %e, "cannot send a run");
                misses.unreachable(&w.language);
                w.fresh = false;
                kept.push_back(w);
            }
        }
    }
    *queue = kept;
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Millis;

    fn status(agent: &str, capacity: u32, running: u32, at: Millis) -> HostStatus {
        HostStatus {
            agent: agent.into(),
            group: None,
            at,
            capacity,
            running,
            allocatable: Resources::default(),
            draining: false,
            state: Default::default(),
            load: Default::default(),
            warm: vec![("r".into(), 1)],
            sandboxes: Vec::new(),
        }
    }

    use crate::embedded::{EmbeddedBus, EmbeddedStore};
    use crate::model::{CancelReason, ExecutionRecord, Limits};
    use crate::store::{AdmissionRules, Store};

    fn record(n: u32) -> ExecutionRecord {
        let limits = Limits {
            memory_bytes: 1 << 28,
            cpus: 1.0,
            pids: 64,
            time_limit_ms: 1_000,
            max_artifacts: 0,
            max_artifact_bytes: 0,
        };
        ExecutionRecord {
            code_key: format!("code/e{n}"),
            ..ExecutionRecord::queued(format!("e{n}"), "o", format!("u{n}"), "r", limits, now_ms())
        }
    }

    /// Admits `r` and submits it with its placement hints.
    async fn admit_and_submit(store: &EmbeddedStore, bus: &EmbeddedBus, r: ExecutionRecord) {
        let item = crate::bus::submission_for(&r);
        store.admit(r, RULES).await.unwrap();
        bus.submit(&item).await.unwrap();
    }

    /// Admission that refuses nothing these tests submit.
    const RULES: AdmissionRules = AdmissionRules {
        max_parallel: 10,
        max_queued: 10,
    };

    async fn next_run(bus: &EmbeddedBus, agent: &str) -> Option<String> {
        match tokio::time::timeout(Duration::from_millis(300), bus.next_for_agent(agent)).await {
            Ok(Ok(AgentCommand::Run { execution_id, .. })) => Some(execution_id),
            Ok(other) => panic!("{other:?}"),
            Err(_) => None,
        }
    }

    /// A scheduler on an embedded store and bus, and host `a` (1 slot, idle) in view.
    async fn scheduler_with_host_a() -> (
        tempfile::TempDir,
        Arc<EmbeddedStore>,
        Arc<EmbeddedBus>,
        tokio::task::JoinHandle<Result<(), SchedulerError>>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            EmbeddedStore::open(dir.path(), crate::seal::Keyring::single([1u8; 32])).unwrap(),
        );
        let bus = Arc::new(EmbeddedBus::new());
        let task = tokio::spawn(run_scheduler(
            store.clone(),
            bus.clone(),
            bus.subscribe_status(),
            None,
        ));
        bus.publish_status(status("a", 1, 0, now_ms()))
            .await
            .unwrap();
        (dir, store, bus, task)
    }

    #[tokio::test]
    async fn places_best_fit_and_waits_for_capacity() {
        let (_dir, store, bus, task) = scheduler_with_host_a().await;
        bus.publish_status(status("b", 2, 0, now_ms()))
            .await
            .unwrap();
        for n in 1..=5 {
            store.admit(record(n), RULES).await.unwrap();
        }
        // e4 is cancelled while it waits: it is never sent.
        for n in 1..=5 {
            bus.submit(&format!("e{n}")).await.unwrap();
        }
        // Best fit packs: the host with the least room first (a: 1 slot), then b.
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e1"));
        assert_eq!(next_run(&bus, "b").await.as_deref(), Some("e2"));
        assert_eq!(next_run(&bus, "b").await.as_deref(), Some("e3"));
        // Full: e4 and e5 wait.
        assert_eq!(next_run(&bus, "a").await, None);
        assert_eq!(next_run(&bus, "b").await, None);
        store
            .request_cancel("e4", CancelReason::Requested)
            .await
            .unwrap();
        // b ran e2 to the end; its status says so: one slot frees (e3 still counts).
        store.mark_running("e2", "b", now_ms()).await.unwrap();
        store
            .mark_finished("e2", ExecState::Succeeded, None, None, now_ms())
            .await
            .unwrap();
        bus.publish_status(status("b", 2, 0, now_ms()))
            .await
            .unwrap();
        assert_eq!(next_run(&bus, "b").await.as_deref(), Some("e5"));
        assert_eq!(next_run(&bus, "b").await, None);
        assert_eq!(next_run(&bus, "a").await, None);
        task.abort();
    }

    #[tokio::test]
    async fn a_large_request_waits_for_room_without_holding_up_small_ones() {
        // One host, c: 4 GiB and 2 cpus for executions, 4 slots. (Whatever the scheduler
        // reads first, a status or a submission, nothing can go elsewhere.)
        let dir = tempfile::tempdir().unwrap();
        let _dir = &dir;
        let store = Arc::new(
            EmbeddedStore::open(dir.path(), crate::seal::Keyring::single([1u8; 32])).unwrap(),
        );
        let bus = Arc::new(EmbeddedBus::new());
        let task = tokio::spawn(run_scheduler(
            store.clone(),
            bus.clone(),
            bus.subscribe_status(),
            None,
        ));
        let mut c = status("c", 4, 0, now_ms());
        c.allocatable = Resources::new(4 << 30, 2.0);
        bus.publish_status(c.clone()).await.unwrap();
        let sized = |n: u32, gib: u64| {
            let mut r = record(n);
            r.limits.memory_bytes = gib << 30;
            r
        };
        admit_and_submit(&store, &bus, sized(0, 1)).await;
        assert_eq!(next_run(&bus, "c").await.as_deref(), Some("e0"));
        // e0 runs on c: 3 GiB left there.
        store.mark_running("e0", "c", now_ms()).await.unwrap();
        // e1 wants 4 GiB: it fits on c only once e0 is over. e2 (1 GiB), behind it, is
        // not held up: it goes now.
        admit_and_submit(&store, &bus, sized(1, 4)).await;
        admit_and_submit(&store, &bus, sized(2, 1)).await;
        assert_eq!(next_run(&bus, "c").await.as_deref(), Some("e2"));
        assert_eq!(next_run(&bus, "a").await, None);
        assert_eq!(next_run(&bus, "c").await, None);
        // e0 and e2 end; c says so: e1 goes there.
        for id in ["e0", "e2"] {
            if id == "e2" {
                store.mark_running(id, "c", now_ms()).await.unwrap();
            }
            store
                .mark_finished(id, ExecState::Succeeded, None, None, now_ms())
                .await
                .unwrap();
        }
        c.at = now_ms();
        bus.publish_status(c).await.unwrap();
        assert_eq!(next_run(&bus, "c").await.as_deref(), Some("e1"));
        task.abort();
    }

    #[tokio::test]
    async fn a_status_made_before_a_run_started_does_not_free_its_slot() {
        let (_dir, store, bus, task) = scheduler_with_host_a().await;
        for n in 1..=2 {
            admit_and_submit(&store, &bus, record(n)).await;
        }
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e1"));
        // e1 runs (the store says so), but a's status was made before it started: it
        // lists nothing. e1 still takes a's only slot: e2 waits.
        store.mark_running("e1", "a", now_ms()).await.unwrap();
        bus.publish_status(status("a", 1, 0, now_ms()))
            .await
            .unwrap();
        assert_eq!(next_run(&bus, "a").await, None);
        // It ended: the slot is free.
        store
            .mark_finished("e1", ExecState::Succeeded, None, None, now_ms())
            .await
            .unwrap();
        bus.publish_status(status("a", 1, 0, now_ms()))
            .await
            .unwrap();
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e2"));
        task.abort();
    }

    #[tokio::test]
    async fn runs_sent_to_a_host_that_starts_draining_are_placed_again_elsewhere() {
        let (_dir, store, bus, task) = scheduler_with_host_a().await;
        for n in 1..=2 {
            admit_and_submit(&store, &bus, record(n)).await;
        }
        // a takes e1 and starts it; e2 waits (a has one slot, b is not up yet).
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e1"));
        store.mark_running("e1", "a", now_ms()).await.unwrap();
        assert_eq!(next_run(&bus, "a").await, None);
        // b comes up with two slots: e2 goes there.
        bus.publish_status(status("b", 2, 0, now_ms()))
            .await
            .unwrap();
        assert_eq!(next_run(&bus, "b").await.as_deref(), Some("e2"));
        // e3 is sent to b too (one slot left), then b starts draining before it ran it:
        // e3 is placed again, on a once a's e1 is over; e2, which b runs, is not.
        store.mark_running("e2", "b", now_ms()).await.unwrap();
        admit_and_submit(&store, &bus, record(3)).await;
        assert_eq!(next_run(&bus, "b").await.as_deref(), Some("e3"));
        let mut drains = status("b", 2, 1, now_ms());
        drains.draining = true;
        bus.publish_status(drains).await.unwrap();
        assert_eq!(next_run(&bus, "a").await, None, "a is still full");
        store
            .mark_finished("e1", ExecState::Succeeded, None, None, now_ms())
            .await
            .unwrap();
        bus.publish_status(status("a", 1, 0, now_ms()))
            .await
            .unwrap();
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e3"));
        assert_eq!(next_run(&bus, "a").await, None);
        assert_eq!(next_run(&bus, "b").await, None);
        task.abort();
    }

    #[tokio::test]
    async fn re_places_what_the_store_still_has_queued_on_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            EmbeddedStore::open(dir.path(), crate::seal::Keyring::single([1u8; 32])).unwrap(),
        );
        store.admit(record(1), RULES).await.unwrap();
        // Submitted to a bus that is gone: a new scheduler finds it in the store.
        let bus = Arc::new(EmbeddedBus::new());
        let statuses = bus.subscribe_status();
        bus.publish_status(status("a", 1, 0, now_ms()))
            .await
            .unwrap();
        let task = tokio::spawn(run_scheduler(store.clone(), bus.clone(), statuses, None));
        assert_eq!(next_run(&bus, "a").await.as_deref(), Some("e1"));
        task.abort();
    }
}
