//! [`EmbeddedBus`]: the [`Bus`] of the single-process mode, over tokio channels. Live
//! events and host status are broadcast (a subscriber that falls more than the channel's
//! capacity behind gets [`Received::Missed`] and catches up from the store; nothing else
//! interrupts an in-process feed); submissions and each
//! agent's commands are FIFO queues that any number of consumers may wait on, each item
//! going to exactly one of them. Items taken with `take_*` stay in flight until
//! acknowledged and can be requeued (a consumer that restarted); `next_*` take and
//! acknowledge at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tokio::sync::Notify;

use crate::bus::{
    AgentCommand, Bus, BusError, BusEvent, Delivery, DeliveryTag, Feed, HostStatus, Subscription,
};
use crate::model::{ExecEvent, LiveEvent};

/// Default capacity of the event and status broadcasts.
pub const DEFAULT_CAPACITY: usize = 8192;

/// A multi-consumer FIFO queue with in-flight (taken, unacknowledged) items.
struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    ready: Notify,
    in_flight: Mutex<std::collections::BTreeMap<u64, T>>,
    next_tag: std::sync::atomic::AtomicU64,
}

impl<T: Clone> Queue<T> {
    fn new() -> Self {
        Queue {
            items: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            in_flight: Mutex::new(std::collections::BTreeMap::new()),
            next_tag: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn in_flight(&self) -> MutexGuard<'_, std::collections::BTreeMap<u64, T>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Pops the next item and keeps it in flight under a new tag.
    async fn take(&self) -> crate::bus::Delivery<T> {
        let item = self.pop().await;
        let tag = self
            .next_tag
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight().insert(tag, item.clone());
        crate::bus::Delivery {
            item,
            tag: DeliveryTag::new(tag.to_string()),
        }
    }

    fn ack(&self, tag: &DeliveryTag) {
        if let Ok(tag) = tag.as_str().parse::<u64>() {
            self.in_flight().remove(&tag);
        }
    }

    /// Puts every in-flight item back at the front, oldest first.
    fn requeue(&self) -> usize {
        let back: Vec<T> = std::mem::take(&mut *self.in_flight())
            .into_values()
            .collect();
        let n = back.len();
        {
            let mut items = self.items();
            for item in back.into_iter().rev() {
                items.push_front(item);
            }
        }
        for _ in 0..n {
            self.ready.notify_one();
        }
        n
    }

    /// The lock is only ever held for a push or a pop, never across an await; a panic
    /// cannot leave the deque half-changed, so a poisoned lock is still sound.
    fn items(&self) -> MutexGuard<'_, VecDeque<T>> {
        self.items.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, item: T) {
        self.items().push_back(item);
        self.ready.notify_one();
    }

    async fn pop(&self) -> T {
        loop {
            // Register for a wake-up before looking, so a push between the look and
            // the wait is not missed.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (item, more) = {
                let mut items = self.items();
                let item = items.pop_front();
                (item, !items.is_empty())
            };
            if let Some(item) = item {
                if more {
                    // Wake-ups are not counted: pass one on for what is left.
                    self.ready.notify_one();
                }
                return item;
            }
            notified.await;
        }
    }

    fn len(&self) -> usize {
        self.items().len()
    }
}

/// The in-process bus. Cheap to clone (clones share the channels).
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

struct Inner {
    events: Feed<BusEvent>,
    status: Feed<HostStatus>,
    submitted: Queue<String>,
    agents: Mutex<HashMap<String, Arc<Queue<AgentCommand>>>>,
}

impl Default for EmbeddedBus {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus")
            .field("submitted", &self.inner.submitted.len())
            .finish_non_exhaustive()
    }
}

impl EmbeddedBus {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A bus whose broadcasts hold `capacity` items for slow subscribers (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        EmbeddedBus {
            inner: Arc::new(Inner {
                events: Feed::new(capacity),
                status: Feed::new(capacity),
                submitted: Queue::new(),
                agents: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The command queue of `agent`, created on first use by either side.
    fn agent_queue(&self, agent: &str) -> Arc<Queue<AgentCommand>> {
        let mut agents = self
            .inner
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            agents
                .entry(agent.to_string())
                .or_insert_with(|| Arc::new(Queue::new())),
        )
    }

    /// Submissions not yet taken by a scheduler.
    pub fn pending_submissions(&self) -> usize {
        self.inner.submitted.len()
    }

    /// Commands waiting for `agent`.
    pub fn pending_for_agent(&self, agent: &str) -> usize {
        self.inner
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agent)
            .map_or(0, |q| q.len())
    }

    /// Drops the queue of an agent that is gone, with whatever was waiting in it
    /// (returned, so the caller can re-place the runs).
    pub fn forget_agent(&self, agent: &str) -> Vec<AgentCommand> {
        let queue = self
            .inner
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(agent);
        queue.map_or_else(Vec::new, |q| q.items().drain(..).collect())
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish_event(&self, event: ExecEvent) -> Result<(), BusError> {
        // No subscriber is not an error: the store holds the durable copy.
        self.inner.events.send(BusEvent::Stored(event));
        Ok(())
    }

    async fn publish_live(&self, event: LiveEvent) -> Result<(), BusError> {
        self.inner.events.send(BusEvent::Live(event));
        Ok(())
    }

    fn subscribe_events(&self) -> Subscription<BusEvent> {
        self.inner.events.subscribe()
    }

    fn subscribe_execution(&self, id: &str) -> Subscription<BusEvent> {
        self.inner.events.subscribe_to(id)
    }

    async fn submit(&self, execution_id: &str) -> Result<(), BusError> {
        self.inner.submitted.push(execution_id.to_string());
        Ok(())
    }

    async fn next_submitted(&self) -> Result<String, BusError> {
        Ok(self.inner.submitted.pop().await)
    }

    async fn take_submitted(&self) -> Result<Delivery<String>, BusError> {
        Ok(self.inner.submitted.take().await)
    }

    async fn ack_submitted(&self, tag: &DeliveryTag) -> Result<(), BusError> {
        self.inner.submitted.ack(tag);
        Ok(())
    }

    async fn requeue_unacked_submissions(&self) -> Result<usize, BusError> {
        Ok(self.inner.submitted.requeue())
    }

    async fn send_to_agent(&self, agent: &str, command: AgentCommand) -> Result<(), BusError> {
        self.agent_queue(agent).push(command);
        Ok(())
    }

    async fn next_for_agent(&self, agent: &str) -> Result<AgentCommand, BusError> {
        let queue = self.agent_queue(agent);
        Ok(queue.pop().await)
    }

    async fn take_for_agent(&self, agent: &str) -> Result<Delivery<AgentCommand>, BusError> {
        let queue = self.agent_queue(agent);
        Ok(queue.take().await)
    }

    async fn ack_for_agent(&self, agent: &str, tag: &DeliveryTag) -> Result<(), BusError> {
        self.agent_queue(agent).ack(tag);
        Ok(())
    }

    async fn requeue_unacked(&self, agent: &str) -> Result<usize, BusError> {
        Ok(self.agent_queue(agent).requeue())
    }

    async fn publish_status(&self, status: HostStatus) -> Result<(), BusError> {
        self.inner.status.send(status);
        Ok(())
    }

    fn subscribe_status(&self) -> Subscription<HostStatus> {
        self.inner.status.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::bus::Received;
    use crate::model::EventBody;

    fn item<T>(r: Received<T>) -> T {
        match r {
            Received::Item(t) => t,
            Received::Missed => panic!("missed"),
            Received::Closed => panic!("closed"),
        }
    }

    fn event(id: &str, seq: u64) -> ExecEvent {
        ExecEvent {
            execution_id: id.into(),
            seq,
            at: 0,
            body: EventBody::Queued,
        }
    }

    #[tokio::test]
    async fn events_fan_out_to_every_subscriber() {
        let bus = EmbeddedBus::new();
        // Publishing with nobody listening is fine.
        bus.publish_event(event("a", 1)).await.unwrap();
        let mut s1 = bus.subscribe_events();
        let mut s2 = bus.subscribe_events();
        bus.publish_event(event("a", 2)).await.unwrap();
        assert_eq!(item(s1.recv().await).seq(), Some(2));
        assert_eq!(item(s2.recv().await).seq(), Some(2));
    }

    #[tokio::test]
    async fn a_slow_subscriber_lags_and_the_rest_is_fine() {
        let bus = EmbeddedBus::with_capacity(4);
        let mut slow = bus.subscribe_events();
        for seq in 1..=10 {
            bus.publish_event(event("a", seq)).await.unwrap();
        }
        assert_eq!(slow.recv().await, Received::Missed);
        assert_eq!(item(slow.recv().await).seq(), Some(7));
    }

    #[tokio::test]
    async fn status_is_broadcast() {
        let bus = EmbeddedBus::new();
        let mut s = bus.subscribe_status();
        let st = HostStatus {
            agent: "h1".into(),
            group: None,
            at: 1,
            capacity: 4,
            running: 1,
            allocatable: Default::default(),
            draining: false,
            state: Default::default(),
            load: Default::default(),
            warm: vec![("r".into(), 2)],
            sandboxes: vec![],
        };
        bus.publish_status(st.clone()).await.unwrap();
        assert_eq!(s.recv().await, Received::Item(st));
        // The bus gone, its subscribers hear so.
        drop(bus);
        assert_eq!(s.recv().await, Received::Closed);
    }

    #[tokio::test]
    async fn submissions_are_fifo_and_wait() {
        let bus = EmbeddedBus::new();
        let waiter = tokio::spawn({
            let bus = bus.clone();
            async move { bus.next_submitted().await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bus.submit("x").await.unwrap();
        assert_eq!(waiter.await.unwrap(), "x");
        for id in ["a", "b", "c"] {
            bus.submit(id).await.unwrap();
        }
        assert_eq!(bus.pending_submissions(), 3);
        for id in ["a", "b", "c"] {
            assert_eq!(bus.next_submitted().await.unwrap(), id);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn each_submission_goes_to_exactly_one_of_many_consumers() {
        let bus = EmbeddedBus::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut consumers = Vec::new();
        for _ in 0..8 {
            let (bus, tx) = (bus.clone(), tx.clone());
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
                let bus = bus.clone();
                tokio::spawn(async move {
                    for i in 0..500 {
                        bus.submit(&format!("{p}-{i}")).await.unwrap();
                        if i % 50 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        for p in producers {
            p.await.unwrap();
        }
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let id = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("a submission was lost")
                .unwrap();
            assert!(seen.insert(id), "delivered twice");
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err(),
            "more deliveries than submissions"
        );
        for c in consumers {
            c.abort();
        }
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_swallow_an_item() {
        let bus = EmbeddedBus::new();
        let gone = tokio::time::timeout(Duration::from_millis(10), bus.next_submitted()).await;
        assert!(gone.is_err());
        bus.submit("kept").await.unwrap();
        assert_eq!(bus.next_submitted().await.unwrap(), "kept");
    }

    #[tokio::test]
    async fn agents_have_their_own_queues() {
        let bus = EmbeddedBus::new();
        let run = |id: &str| AgentCommand::Run {
            need: Default::default(),
            execution_id: id.into(),
        };
        // Sent before the agent ever asked: kept.
        bus.send_to_agent("h1", run("a")).await.unwrap();
        bus.send_to_agent("h2", run("b")).await.unwrap();
        bus.send_to_agent(
            "h1",
            AgentCommand::Cancel {
                execution_id: "a".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(bus.pending_for_agent("h1"), 2);
        assert_eq!(bus.next_for_agent("h2").await.unwrap(), run("b"));
        assert_eq!(bus.next_for_agent("h1").await.unwrap(), run("a"));
        assert!(matches!(
            bus.next_for_agent("h1").await.unwrap(),
            AgentCommand::Cancel { .. }
        ));
        // An agent waiting before the command arrives gets it.
        let waiter = tokio::spawn({
            let bus = bus.clone();
            async move { bus.next_for_agent("h3").await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bus.send_to_agent("h3", run("c")).await.unwrap();
        assert_eq!(waiter.await.unwrap(), run("c"));
        // Forgetting an agent hands back what it never took.
        bus.send_to_agent("h4", run("d")).await.unwrap();
        assert_eq!(bus.forget_agent("h4"), vec![run("d")]);
        assert_eq!(bus.pending_for_agent("h4"), 0);
    }

    #[tokio::test]
    async fn unacknowledged_work_is_redelivered_acknowledged_work_is_not() {
        let bus = EmbeddedBus::new();
        let run = |id: &str| AgentCommand::Run {
            need: Default::default(),
            execution_id: id.into(),
        };
        for id in ["a", "b", "c"] {
            bus.send_to_agent("h", run(id)).await.unwrap();
        }
        let a = bus.take_for_agent("h").await.unwrap();
        let b = bus.take_for_agent("h").await.unwrap();
        assert_eq!((a.item.clone(), b.item.clone()), (run("a"), run("b")));
        assert_ne!(a.tag, b.tag);
        bus.ack_for_agent("h", &a.tag).await.unwrap();
        // The agent "restarts": b was taken but never acknowledged.
        assert_eq!(bus.requeue_unacked("h").await.unwrap(), 1);
        assert_eq!(bus.take_for_agent("h").await.unwrap().item, run("b"));
        assert_eq!(bus.take_for_agent("h").await.unwrap().item, run("c"));
        // Nothing is delivered twice once acknowledged: a requeue of acked work is empty.
        let all = bus.requeue_unacked("h").await.unwrap();
        assert_eq!(all, 2, "b (again) and c were still unacknowledged");
        let d1 = bus.take_for_agent("h").await.unwrap();
        let d2 = bus.take_for_agent("h").await.unwrap();
        bus.ack_for_agent("h", &d1.tag).await.unwrap();
        bus.ack_for_agent("h", &d2.tag).await.unwrap();
        assert_eq!(bus.requeue_unacked("h").await.unwrap(), 0);

        // Submissions work the same way.
        bus.submit("x").await.unwrap();
        let x = bus.take_submitted().await.unwrap();
        assert_eq!(bus.requeue_unacked_submissions().await.unwrap(), 1);
        let x2 = bus.take_submitted().await.unwrap();
        assert_eq!(x2.item, x.item);
        bus.ack_submitted(&x2.tag).await.unwrap();
        assert_eq!(bus.requeue_unacked_submissions().await.unwrap(), 0);
    }
}
