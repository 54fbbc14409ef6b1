//! The bus: how the roles talk without sharing memory. Event fan-out (agent → api: the
//! events of the log after the store took them, and live-only usage samples),
//! the work queue (api → scheduler → agent), cancellations (api → agent) and host status
//! (agent → scheduler, admin monitor). One trait, two backends: in-process channels
//! ([`crate::embedded::EmbeddedBus`]) and Redis Streams ([`crate::redis_bus::RedisBus`]).
//!
//! Delivery of work is at-least-once: a consumer acknowledges an item only after it has
//! acted on it (the store's state transitions make repeats harmless: `mark_running` of an
//! execution that is no longer queued fails).
//!
//! Events and host statuses reach subscribers through a [`Subscription`]: each `recv`
//! yields the next item, or [`Received::Missed`] when items may have been lost — the
//! subscriber fell behind, or (a remote bus) its connection dropped or came back —
//! after which a subscriber that must not miss anything catches up from the store; or
//! [`Received::Closed`] once the bus is gone.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use crate::model::{ExecEvent, HostState, LiveEvent, Millis, Resources, Usage};

/// What the bus carries to event subscribers: an event of an execution's log (stored
/// first, with its `seq`), or a live-only one (never stored, no `seq`). Serialised as
/// the event itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BusEvent {
    Stored(ExecEvent),
    Live(LiveEvent),
}

impl BusEvent {
    pub fn execution_id(&self) -> &str {
        match self {
            BusEvent::Stored(e) => &e.execution_id,
            BusEvent::Live(e) => &e.execution_id,
        }
    }

    /// The sequence number, for an event of the log.
    pub fn seq(&self) -> Option<u64> {
        match self {
            BusEvent::Stored(e) => Some(e.seq),
            BusEvent::Live(_) => None,
        }
    }
}

/// A submission on the bus: the execution's id and, after spaces, the language it runs
/// and what its limits take (memory in bytes, cpus), so that the scheduler can place it
/// without reading the store. They are placement hints only: the agent runs what the
/// store's record says, and runs nothing that is no longer queued.
pub fn submission(execution_id: &str, language: &str, need: Resources) -> String {
    format!(
        "{execution_id} {language} {} {}",
        need.memory_bytes, need.cpus
    )
}

/// The submission of an admitted execution: with the hints, unless its policy limits
/// the groups it may run on (then the scheduler reads the record, which says which).
pub fn submission_for(r: &crate::model::ExecutionRecord) -> String {
    if r.groups.is_some() {
        r.id.clone()
    } else {
        submission(&r.id, &r.language, r.limits.resources())
    }
}

/// A submission read back (see [`submission`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Submission<'a> {
    pub id: &'a str,
    /// The hints, when the submission has them all: without them the scheduler reads
    /// the record.
    pub hint: Option<(&'a str, Resources)>,
}

pub fn parse_submission(item: &str) -> Submission<'_> {
    let mut parts = item.split(' ');
    let id = parts.next().unwrap_or_default();
    let hint = (|| {
        let language = parts.next().filter(|l| !l.is_empty())?;
        let memory_bytes = parts.next()?.parse().ok()?;
        let cpus: f64 = parts.next()?.parse().ok()?;
        (cpus.is_finite() && cpus >= 0.0 && parts.next().is_none())
            .then_some((language, Resources::new(memory_bytes, cpus)))
    })();
    Submission { id, hint }
}

/// A message to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Run this (queued) execution.
    Run {
        execution_id: String,
        /// What its limits take from the host (the agent counts it from the moment it
        /// takes the run; its record is the truth once read). Absent: not known yet.
        #[serde(default, skip_serializing_if = "Resources::is_zero")]
        need: Resources,
    },
    /// Cancel this execution if it runs here.
    Cancel { execution_id: String },
}

/// What an agent reports about its host, periodically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub agent: String,
    /// Its host group, if it belongs to one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub at: Millis,
    /// Executions it can run at once, and runs now.
    pub capacity: u32,
    pub running: u32,
    /// Memory and CPUs it has for executions; what runs takes its limits from them (the
    /// `limits` of each of [`Self::sandboxes`]). Zero from an agent that does not say:
    /// placed by slots only.
    #[serde(default)]
    pub allocatable: Resources,
    pub draining: bool,
    /// What it is asked to be (`draining` is true unless `ready`); draining as well when
    /// it stops.
    #[serde(default)]
    pub state: HostState,
    /// What the host's machine is doing (R13).
    #[serde(default)]
    pub load: HostLoad,
    /// Frozen sandboxes per language.
    pub warm: Vec<(String, u32)>,
    /// Live usage of every running sandbox (R13).
    pub sandboxes: Vec<SandboxUsage>,
}

impl HostStatus {
    /// What the limits of its running executions take of what it has.
    pub fn used(&self) -> Resources {
        self.sandboxes
            .iter()
            .fold(Resources::default(), |sum, s| sum.plus(&s.limits))
    }
}

/// One host group's reporting hosts, summed from their statuses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupTotals {
    /// Hosts, by state.
    pub ready: u32,
    pub cordoned: u32,
    pub draining: u32,
    /// What they have for executions, and what the limits of what runs take of it.
    pub capacity: Resources,
    pub used: Resources,
    pub running: u32,
}

impl GroupTotals {
    pub fn hosts(&self) -> u32 {
        self.ready + self.cordoned + self.draining
    }
}

/// The statuses of hosts that report a group, summed per group.
pub fn group_totals(statuses: &[HostStatus]) -> std::collections::BTreeMap<String, GroupTotals> {
    let mut out: std::collections::BTreeMap<String, GroupTotals> = Default::default();
    for s in statuses {
        let Some(g) = &s.group else {
            continue;
        };
        let t = out.entry(g.clone()).or_default();
        match s.state {
            HostState::Ready => t.ready += 1,
            HostState::Cordoned => t.cordoned += 1,
            // On its way out.
            HostState::Draining | HostState::Terminating | HostState::Gone => t.draining += 1,
        }
        t.capacity = t.capacity.plus(&s.allocatable);
        t.used = t.used.plus(&s.used());
        t.running += s.running;
    }
    out
}

/// What a host's machine is doing: CPUs busy since the previous status (a share of all
/// of them, 0 to 1), memory in use (not available) of its total, and the kernel's
/// pressure stall figures (`some avg10` of `/proc/pressure/{cpu,memory}`: the percentage
/// of the last 10 s in which some task waited for CPU or memory; 0 where the kernel does
/// not report them).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HostLoad {
    pub cpu_busy: f64,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub cpu_pressure: f64,
    pub memory_pressure: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxUsage {
    pub execution_id: String,
    pub org: String,
    pub user: String,
    pub usage: Usage,
    /// What its limits take from the host.
    #[serde(default)]
    pub limits: Resources,
}

/// A work item taken from a queue. It stays the consumer's until acknowledged; a
/// consumer that dies before acknowledging gets it redelivered ([`Bus::requeue_unacked`]),
/// so work is delivered at least once (acting on it must be idempotent: the store's state
/// transitions make a repeat harmless).
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery<T> {
    pub item: T,
    /// Names this delivery for [`Bus::ack_submitted`] / [`Bus::ack_for_agent`].
    pub tag: DeliveryTag,
}

/// What names one delivery to its bus: opaque to consumers (a counter in the embedded
/// bus, a stream entry id in Redis).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryTag(String);

impl DeliveryTag {
    pub fn new(tag: impl Into<String>) -> DeliveryTag {
        DeliveryTag(tag.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Received<T> {
    /// The next item.
    Item(T),
    /// Items may have been missed since the last one: this subscriber fell behind, or
    /// the bus's connection was lost or re-established (a restarted Redis may have lost
    /// what it held). A subscriber that must not miss anything catches up from the store.
    Missed,
    /// The bus is gone: nothing more will come.
    Closed,
}

impl<T> Received<T> {
    /// The item, if this is one.
    pub fn item(self) -> Option<T> {
        match self {
            Received::Item(t) => Some(t),
            Received::Missed | Received::Closed => None,
        }
    }
}

/// What a feed carries: items, and the note that some may have been missed.
#[derive(Debug, Clone)]
enum Signal<T> {
    Item(T),
    Missed,
}

/// What a [`Feed`] can hand to the subscribers of one key only: an event's execution, a
/// status's host.
pub trait Routed {
    fn route(&self) -> &str;
}

impl Routed for BusEvent {
    fn route(&self) -> &str {
        self.execution_id()
    }
}

impl Routed for HostStatus {
    fn route(&self) -> &str {
        &self.agent
    }
}

/// The sending side of a fan-out: a bus hands every item (and every interruption) to
/// all current subscribers through it, and each item also to the subscribers of its key
/// ([`Feed::subscribe_to`]: a stream of one execution wakes for that execution's events
/// only, not for every event of the cluster). Cheap to clone (clones feed the same
/// subscribers); subscribers see [`Received::Closed`] once every clone is dropped.
#[derive(Debug)]
pub struct Feed<T> {
    tx: broadcast::Sender<Signal<T>>,
    keyed: std::sync::Arc<std::sync::Mutex<Keyed<T>>>,
}

/// The subscribers of single keys: a channel per key that has (or recently had) one.
#[derive(Debug)]
struct Keyed<T> {
    channels: std::collections::HashMap<String, broadcast::Sender<Signal<T>>>,
    /// Channels nobody listens to are dropped when their key's next item comes, and all
    /// at once when the map reaches this size.
    sweep_at: usize,
}

/// Items a subscriber of one key may fall behind by before it gets
/// [`Received::Missed`] and catches up from the store. Each watched key's channel
/// allocates this many slots up front (an event takes about 250 bytes: 16 KiB per
/// watched execution); output is stored and published in batches at most every 5 ms,
/// so this is a third of a second of a chatty run.
const KEYED_CAPACITY: usize = 64;
const KEYED_SWEEP_MIN: usize = 64;

impl<T> Clone for Feed<T> {
    fn clone(&self) -> Self {
        Feed {
            tx: self.tx.clone(),
            keyed: std::sync::Arc::clone(&self.keyed),
        }
    }
}

impl<T: Clone + Send + Routed + 'static> Feed<T> {
    /// A feed holding up to `capacity` items for a slow subscriber (at least 1); one
    /// further behind gets [`Received::Missed`].
    pub fn new(capacity: usize) -> Feed<T> {
        Feed {
            tx: broadcast::channel(capacity.max(1)).0,
            keyed: std::sync::Arc::new(std::sync::Mutex::new(Keyed {
                channels: std::collections::HashMap::new(),
                sweep_at: KEYED_SWEEP_MIN,
            })),
        }
    }

    /// Hands `item` to every subscriber, and to its key's (none is not an error).
    pub fn send(&self, item: T) {
        {
            let mut keyed = self.keyed.lock().unwrap();
            if let Some(tx) = keyed.channels.get(item.route()) {
                if tx.send(Signal::Item(item.clone())).is_err() {
                    // Nobody listens to this key any more.
                    keyed.channels.remove(item.route());
                }
            }
        }
        let _ = self.tx.send(Signal::Item(item));
    }

    /// Tells every subscriber, of every key too, that items may have been missed.
    pub fn missed(&self) {
        self.keyed
            .lock()
            .unwrap()
            .channels
            .retain(|_, tx| tx.send(Signal::Missed).is_ok());
        let _ = self.tx.send(Signal::Missed);
    }

    /// A subscriber of everything sent from now on.
    pub fn subscribe(&self) -> Subscription<T> {
        Subscription {
            rx: self.tx.subscribe(),
        }
    }

    /// A subscriber of the items of key `key` sent from now on (and of every
    /// [`Feed::missed`]).
    pub fn subscribe_to(&self, key: &str) -> Subscription<T> {
        let mut keyed = self.keyed.lock().unwrap();
        if keyed.channels.len() >= keyed.sweep_at {
            keyed.channels.retain(|_, tx| tx.receiver_count() > 0);
            keyed.sweep_at = (keyed.channels.len() * 2).max(KEYED_SWEEP_MIN);
        }
        let rx = match keyed.channels.get(key) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = broadcast::channel(KEYED_CAPACITY);
                keyed.channels.insert(key.to_string(), tx);
                rx
            }
        };
        Subscription { rx }
    }

    /// Keys with a channel now (for tests: channels nobody listens to go).
    pub fn keyed_channels(&self) -> usize {
        self.keyed.lock().unwrap().channels.len()
    }
}

/// One subscriber of a bus's events or host statuses.
#[derive(Debug)]
pub struct Subscription<T> {
    rx: broadcast::Receiver<Signal<T>>,
}

impl<T: Clone> Subscription<T> {
    /// The next item, or why there is none. Cancel-safe: a `recv` dropped in a
    /// `select!` loses nothing.
    pub async fn recv(&mut self) -> Received<T> {
        match self.rx.recv().await {
            Ok(Signal::Item(item)) => Received::Item(item),
            Ok(Signal::Missed) | Err(RecvError::Lagged(_)) => Received::Missed,
            Err(RecvError::Closed) => Received::Closed,
        }
    }

    /// What is waiting, without waiting: `None` when nothing is.
    pub fn try_recv(&mut self) -> Option<Received<T>> {
        match self.rx.try_recv() {
            Ok(Signal::Item(item)) => Some(Received::Item(item)),
            Ok(Signal::Missed) | Err(TryRecvError::Lagged(_)) => Some(Received::Missed),
            Err(TryRecvError::Closed) => Some(Received::Closed),
            Err(TryRecvError::Empty) => None,
        }
    }
}

/// Pauses between attempts to read from a bus that failed: short at first (a dropped
/// connection usually comes back at once), growing to a second while the failure lasts.
/// Start a new one after a success.
pub fn retry_pauses() -> impl Iterator<Item = std::time::Duration> {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(50))
        .with_max_delay(std::time::Duration::from_secs(1))
        .without_max_times()
        .with_jitter()
        .build()
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("bus closed")]
    Closed,
    #[error("bus i/o: {0}")]
    Io(String),
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// An event of an execution's log, for subscribers (after the store took it: the
    /// store holds the durable copy).
    async fn publish_event(&self, event: ExecEvent) -> Result<(), BusError>;
    /// [`Bus::publish_event`] for several events, in order (a remote bus sends them in
    /// one round trip).
    async fn publish_events(&self, events: Vec<ExecEvent>) -> Result<(), BusError> {
        for event in events {
            self.publish_event(event).await?;
        }
        Ok(())
    }
    /// A live-only event (a usage sample): subscribers get it if they listen now; it is
    /// never stored.
    async fn publish_live(&self, event: LiveEvent) -> Result<(), BusError>;
    /// Events published from now on (see [`Subscription`]).
    fn subscribe_events(&self) -> Subscription<BusEvent>;
    /// Events of execution `id` published from now on: [`Bus::subscribe_events`] for one
    /// execution, woken by its events only.
    fn subscribe_execution(&self, id: &str) -> Subscription<BusEvent>;

    /// api → scheduler: an execution was admitted. `item` is its id, or the id and the
    /// language it runs as [`submission`] writes them (the scheduler then places it
    /// without reading the store).
    async fn submit(&self, item: &str) -> Result<(), BusError>;
    /// [`Bus::publish_events`] of an admission's events, then [`Bus::submit`] of the
    /// execution (`None`: nothing to submit), in that order (a remote bus sends both in
    /// one round trip). An error may leave the submission unsent: the store is the
    /// outbox.
    async fn publish_and_submit(
        &self,
        events: Vec<ExecEvent>,
        execution_id: Option<&str>,
    ) -> Result<(), BusError> {
        let published = self.publish_events(events).await;
        if let Some(id) = execution_id {
            self.submit(id).await?;
        }
        published
    }
    /// scheduler: the next admitted execution (waits). Taken and acknowledged at once;
    /// prefer [`Bus::take_submitted`] + [`Bus::ack_submitted`].
    async fn next_submitted(&self) -> Result<String, BusError>;
    /// scheduler: the next admitted execution, unacknowledged until `ack_submitted`.
    async fn take_submitted(&self) -> Result<Delivery<String>, BusError>;
    async fn ack_submitted(&self, tag: &DeliveryTag) -> Result<(), BusError>;

    /// scheduler/api → one agent.
    async fn send_to_agent(&self, agent: &str, command: AgentCommand) -> Result<(), BusError>;
    /// agent: its next command (waits). Taken and acknowledged at once; prefer
    /// [`Bus::take_for_agent`] + [`Bus::ack_for_agent`].
    async fn next_for_agent(&self, agent: &str) -> Result<AgentCommand, BusError>;
    /// agent: its next command, unacknowledged until `ack_for_agent`.
    async fn take_for_agent(&self, agent: &str) -> Result<Delivery<AgentCommand>, BusError>;
    async fn ack_for_agent(&self, agent: &str, tag: &DeliveryTag) -> Result<(), BusError>;
    /// Puts every command taken by `agent` but never acknowledged back at the front of
    /// its queue (an agent that restarted); returns how many.
    async fn requeue_unacked(&self, agent: &str) -> Result<usize, BusError>;
    /// The same for submissions taken by a scheduler that restarted.
    async fn requeue_unacked_submissions(&self) -> Result<usize, BusError>;

    /// agent → everyone: host status (also the admin monitor's source).
    async fn publish_status(&self, status: HostStatus) -> Result<(), BusError>;
    /// Host statuses published from now on (see [`Subscription`]).
    fn subscribe_status(&self) -> Subscription<HostStatus>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventBody, OutputData};

    fn stored(id: &str, seq: u64) -> BusEvent {
        BusEvent::Stored(ExecEvent {
            execution_id: id.into(),
            seq,
            at: 0,
            body: EventBody::Stdout(OutputData::text("x")),
        })
    }

    #[tokio::test]
    async fn a_subscriber_of_one_key_gets_that_keys_items_and_every_missed_note() {
        let feed: Feed<BusEvent> = Feed::new(16);
        let mut all = feed.subscribe();
        let mut a = feed.subscribe_to("a");
        let mut a2 = feed.subscribe_to("a");
        let mut b = feed.subscribe_to("b");
        feed.send(stored("a", 1));
        feed.send(stored("c", 1));
        feed.send(stored("b", 1));
        feed.missed();
        for (n, s) in [(3, &mut all), (1, &mut a), (1, &mut a2), (1, &mut b)] {
            for _ in 0..n {
                assert!(matches!(s.try_recv(), Some(Received::Item(_))));
            }
            assert_eq!(s.try_recv(), Some(Received::Missed));
            assert_eq!(s.try_recv(), None);
        }
        // A key nobody listens to any more loses its channel with its next item.
        drop((a, a2));
        assert_eq!(feed.keyed_channels(), 2);
        feed.send(stored("a", 2));
        assert_eq!(feed.keyed_channels(), 1);
        // A slow subscriber of one key is told it fell behind.
        for seq in 2..=(KEYED_CAPACITY as u64 + 10) {
            feed.send(stored("b", seq));
        }
        assert_eq!(b.recv().await, Received::Missed);
    }

    #[test]
    fn a_watched_keys_channel_stays_small() {
        let slot = std::mem::size_of::<Signal<BusEvent>>() + 2 * std::mem::size_of::<u64>();
        assert!(
            KEYED_CAPACITY * slot <= 24 << 10,
            "{KEYED_CAPACITY} slots of about {slot} bytes per watched execution"
        );
    }

    #[test]
    fn channels_of_keys_nobody_listens_to_are_swept() {
        let feed: Feed<BusEvent> = Feed::new(16);
        let kept = feed.subscribe_to("kept");
        for i in 0..10 * KEYED_SWEEP_MIN {
            drop(feed.subscribe_to(&format!("gone-{i}")));
        }
        assert!(
            feed.keyed_channels() <= KEYED_SWEEP_MIN,
            "{} channels left",
            feed.keyed_channels()
        );
        drop(kept);
    }

    #[test]
    fn a_submission_carries_the_id_and_a_language_hint() {
        let need = Resources::new(3 << 30, 1.5);
        let item = submission("abc123", "r", need);
        assert_eq!(
            parse_submission(&item),
            Submission {
                id: "abc123",
                hint: Some(("r", need))
            }
        );
        // Anything less than the whole hint: the record is read instead.
        for partial in [
            "abc123",
            "abc123 ",
            "abc123 r",
            "abc123 r 5",
            "abc123 r x 1",
            "abc123 r 5 NaN",
            "abc123 r 5 -1",
            "abc123 r 5 1 more",
        ] {
            assert_eq!(
                parse_submission(partial),
                Submission {
                    id: "abc123",
                    hint: None
                },
                "{partial:?}"
            );
        }
    }
}
