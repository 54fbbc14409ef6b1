//! The bus: how the roles talk without sharing memory. Event fan-out (agent → api: the
//! events of the log after the store took them, and live-only usage samples),
//! the work queue (api → scheduler → agent), cancellations (api → agent) and host status
//! (agent → scheduler, admin monitor). One trait, two backends: in-process channels
//! ([`crate::embedded::EmbeddedBus`]) and Redis Streams ([`crate::redis_bus::RedisBus`]).
//!
//! Delivery of work is at-least-once: a consumer acknowledges an item only after it has
//! acted on it (the store's state transitions make repeats harmless: `mark_running` of an
//! execution that is no longer queued fails).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::model::{ExecEvent, LiveEvent, Millis, Usage};

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

/// A message to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentCommand {
    /// Run this (queued) execution.
    Run { execution_id: String },
    /// Cancel this execution if it runs here.
    Cancel { execution_id: String },
}

/// What an agent reports about its host, periodically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub agent: String,
    pub at: Millis,
    /// Executions it can run at once, and runs now.
    pub capacity: u32,
    pub running: u32,
    pub draining: bool,
    /// Frozen sandboxes per language.
    pub warm: Vec<(String, u32)>,
    /// Live usage of every running sandbox (R13).
    pub sandboxes: Vec<SandboxUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxUsage {
    pub execution_id: String,
    pub org: String,
    pub user: String,
    pub usage: Usage,
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
    /// A live-only event (a usage sample): subscribers get it if they listen now; it is
    /// never stored.
    async fn publish_live(&self, event: LiveEvent) -> Result<(), BusError>;
    fn subscribe_events(&self) -> broadcast::Receiver<BusEvent>;

    /// api → scheduler: an execution was admitted.
    async fn submit(&self, execution_id: &str) -> Result<(), BusError>;
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
    fn subscribe_status(&self) -> broadcast::Receiver<HostStatus>;
}
