//! The store: execution records, policies, the per-execution event log, host leases, and
//! the atomic admission decision (the rule is [`crate::admission`]'s). One trait, two
//! backends: the embedded one ([`crate::embedded::EmbeddedStore`], in-process, durable on
//! local disk) and PostgreSQL ([`crate::postgres::PgStore`]).
//!
//! Every method is one atomic step: no caller ever reads-modifies-writes a record across
//! two calls, so several API nodes may share one store without races.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::{
    CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, GroupStatus, HostRecord,
    HostState, Millis, Policy, ResultSummary,
};

/// Admission's types live in [`crate::admission`]; these paths stay for existing callers.
pub use crate::admission::{Admission, AdmissionRules};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Io(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("execution {0} does not exist")]
    NotFound(String),
    #[error("no host named {0:?} has registered")]
    UnknownHost(String),
    /// An org, user or id outside the naming rule (`[A-Za-z0-9._@+-]`, not starting with
    /// a dot, at most 200 characters).
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// The store's engine cannot be reached (a remote store's connection is down): the
    /// operation may be retried.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("illegal state change of {id}: {from:?} -> {to:?}")]
    IllegalTransition {
        id: String,
        from: ExecState,
        to: ExecState,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Filters for listing executions (all optional, ANDed).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListFilter {
    pub org: Option<String>,
    pub user: Option<String>,
    pub tab_id: Option<String>,
    pub state: Option<ExecState>,
    /// Only queued or running ones.
    pub active_only: bool,
    /// Newest first, at most this many.
    pub limit: Option<usize>,
}

/// Executions in each active state, platform-wide (the `/metrics` gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveCounts {
    pub queued: u64,
    pub running: u64,
}

impl ActiveCounts {
    /// Counts an execution in `state` in (`by` 1) or out (`by` -1); terminal states are
    /// not counted.
    pub fn add(&mut self, state: ExecState, by: i64) {
        let n = match state {
            ExecState::Queued => &mut self.queued,
            ExecState::Running => &mut self.running,
            _ => return,
        };
        *n = n.saturating_add_signed(by);
    }

    /// The counts of `records`, by scanning them (once, e.g. when a store opens).
    pub fn of<'a>(records: impl Iterator<Item = &'a ExecutionRecord>) -> ActiveCounts {
        let mut c = ActiveCounts::default();
        for r in records {
            c.add(r.state, 1);
        }
        c
    }
}

/// What a host's heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lease {
    /// Renewed; the host is asked to be in this state.
    Held(HostState),
    /// Not renewed in time: the host's runs were declared lost.
    Lapsed,
}

/// The error of an execution whose host stopped renewing its lease.
pub const HOST_LOST: &str =
    "its host stopped answering (its lease expired); the sandbox was abandoned";

/// The `finished` summary of an execution lost with its host.
pub fn lost_summary() -> ResultSummary {
    ResultSummary::bare(ExecState::Lost, "host_lost", Some(HOST_LOST.into()))
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get_org_policy(&self, org: &str) -> StoreResult<Option<Policy>>;
    async fn put_org_policy(&self, org: &str, policy: Policy) -> StoreResult<()>;
    async fn get_user_policy(&self, org: &str, user: &str) -> StoreResult<Option<Policy>>;
    /// The org's policy and the user's override together (what every admission reads;
    /// a remote store answers in one round trip).
    async fn get_policies(
        &self,
        org: &str,
        user: &str,
    ) -> StoreResult<(Option<Policy>, Option<Policy>)> {
        Ok((
            self.get_org_policy(org).await?,
            self.get_user_policy(org, user).await?,
        ))
    }
    async fn put_user_policy(&self, org: &str, user: &str, policy: Policy) -> StoreResult<()>;

    /// Atomically: unless the queue is full, store `record` (state `queued`) and its
    /// `queued` event (seq 1); cancel the same tab's active executions
    /// (`SupersededByTab`, R10); then, if the user has more than `max_parallel` active
    /// executions, cancel the oldest ones (`ParallelismCap`, R11) until exactly
    /// `max_parallel` remain. Cancelling follows [`Store::request_cancel`]'s rules;
    /// cancel-requested executions no longer count as active.
    async fn admit(&self, record: ExecutionRecord, rules: AdmissionRules)
        -> StoreResult<Admission>;

    /// The policies an admission applies (as [`Store::get_policies`]), and the version
    /// of all policies they belong to when the store versions them: a remote store may
    /// answer from what it read earlier, and [`Store::admit_at`] then checks that
    /// nothing changed since.
    async fn policies_for_admission(
        &self,
        org: &str,
        user: &str,
    ) -> StoreResult<(Option<Policy>, Option<Policy>, Option<u64>)> {
        let (o, u) = self.get_policies(org, user).await?;
        Ok((o, u, None))
    }

    /// [`Store::admit`] with limits from policies of `policy_version` (from
    /// [`Store::policies_for_admission`]): [`Admission::StalePolicy`], with nothing
    /// stored, when the policies changed since. `None`: no check.
    async fn admit_at(
        &self,
        record: ExecutionRecord,
        rules: AdmissionRules,
        policy_version: Option<u64>,
    ) -> StoreResult<Admission> {
        let _ = policy_version;
        self.admit(record, rules).await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<ExecutionRecord>>;

    /// How many executions are queued and running now. Cheap whatever the number of
    /// executions stored (counters kept on every state change, or an indexed count):
    /// it is read on every `/metrics` scrape, so it must never scan the executions.
    async fn active_counts(&self) -> StoreResult<ActiveCounts>;

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<ExecutionRecord>>;

    /// Cancels an execution: a queued one becomes `cancelled` at once (terminal, with its
    /// `finished` event appended); a running one is marked cancel-requested (its agent
    /// kills it and marks it finished); a finished one is left as it is. Returns the
    /// record after the change, or `None` if it does not exist.
    async fn request_cancel(
        &self,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>>;

    /// `queued` → `running` on `agent` (fails if the execution is no longer queued, e.g.
    /// cancelled meanwhile: the caller must not run it).
    async fn mark_running(&self, id: &str, agent: &str, at: Millis)
        -> StoreResult<ExecutionRecord>;

    /// Active → a terminal state, with the result's object key and an error note.
    async fn mark_finished(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord>;

    /// Active → the terminal `state` together with its `finished` event (`summary`), in
    /// one atomic step: nobody ever sees the terminal record without the event, nor the
    /// event without the state. Returns both.
    async fn finish(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        at: Millis,
        summary: ResultSummary,
    ) -> StoreResult<(ExecutionRecord, ExecEvent)>;

    /// Registers `agent` afresh with a lease of `lease_ms` (at its start, or after its
    /// lease lapsed), on the store's clock.
    async fn register_host(&self, agent: &str, lease_ms: u64) -> StoreResult<()>;

    /// Renews `agent`'s lease. [`Lease::Lapsed`] when the host was declared lost
    /// ([`Store::reap_lapsed_hosts`]) or is unknown: its running executions are `lost`,
    /// and the agent must kill what it still runs and register again (fencing). A host
    /// that is late but was not declared lost yet keeps its lease and its runs.
    async fn heartbeat(&self, agent: &str, lease_ms: u64) -> StoreResult<Lease>;

    /// Asks `agent` to be in `state` (its agent acts on it at its next heartbeat; the
    /// state outlives the agent's restarts). [`StoreError::UnknownHost`] for a host that
    /// never registered.
    async fn set_host_state(&self, agent: &str, state: HostState) -> StoreResult<HostRecord>;

    /// Every host that registered, by name.
    async fn hosts(&self) -> StoreResult<Vec<HostRecord>>;

    /// Replaces what the autoscaler publishes about the host groups (groups not in
    /// `groups` are dropped). Kept in memory by the embedded store.
    async fn put_group_statuses(&self, groups: &[GroupStatus]) -> StoreResult<()>;

    /// What the autoscaler last published about the host groups, by name.
    async fn group_statuses(&self) -> StoreResult<Vec<GroupStatus>>;

    /// Every host whose lease lapsed: its running executions become `lost` (each with
    /// its `finished` event, returned for the bus) and the host is no longer alive.
    async fn reap_lapsed_hosts(&self) -> StoreResult<Vec<ExecEvent>>;

    /// Takes or renews the leadership of `role` for `holder` for `lease_ms` (the store's
    /// clock): `Some(term)` while `holder` leads — `term` grows with every change of
    /// holder, a fencing token — and `None` while another holder's lease runs.
    async fn lead(&self, role: &str, holder: &str, lease_ms: u64) -> StoreResult<Option<u64>>;

    /// Appends an event with the next sequence number of its execution.
    async fn append_event(&self, id: &str, body: EventBody) -> StoreResult<ExecEvent>;

    /// Appends `bodies`, in order, with the next sequence numbers of their execution, in
    /// one atomic step (all or none; nothing else appended to the execution lands between
    /// them). Returns the stored events. Nothing to append is not an error.
    async fn append_events(&self, id: &str, bodies: Vec<EventBody>) -> StoreResult<Vec<ExecEvent>>;

    /// Events of `id` with `seq > after`, in order.
    async fn events_after(&self, id: &str, after: u64) -> StoreResult<Vec<ExecEvent>>;

    /// The record of `id` and its events with `seq > after`, in order, as of one moment
    /// (`None`: no such execution). A remote store reads both in one round trip.
    async fn get_with_events_after(
        &self,
        id: &str,
        after: u64,
    ) -> StoreResult<Option<(ExecutionRecord, Vec<ExecEvent>)>> {
        let Some(record) = self.get(id).await? else {
            return Ok(None);
        };
        let events = self.events_after(id, after).await?;
        Ok(Some((record, events)))
    }

    /// Finished executions that finished before `before`, oldest first, at most `limit`:
    /// what retention removes. Nothing is deleted: the caller deletes their objects
    /// first, then the records ([`Store::delete_expired`]), so a crash in between never
    /// leaves an object that no record names.
    async fn expired(&self, before: Millis, limit: usize) -> StoreResult<Vec<ExecutionRecord>>;

    /// Deletes the records and events of `ids` that are finished before `before` (others
    /// are left alone); returns the ids deleted.
    async fn delete_expired(&self, ids: &[String], before: Millis) -> StoreResult<Vec<String>>;
}

/// Whether retention removes `rec` at the cut `before` (see [`Store::expired`]).
pub(crate) fn is_expired(rec: &ExecutionRecord, before: Millis) -> bool {
    rec.state.is_terminal() && rec.finished_at.unwrap_or(rec.created_at) < before
}

pub(crate) fn cancel_message(reason: CancelReason) -> &'static str {
    match reason {
        CancelReason::Requested => "cancelled on request",
        CancelReason::SupersededByTab => {
            "cancelled: a newer execution from the same tab replaced it"
        }
        CancelReason::ParallelismCap => "cancelled: the user's parallelism cap was reached",
    }
}

/// The change a cancel makes to `rec` (see [`Store::request_cancel`]): a queued one
/// becomes `cancelled` with a `finished` event; a running one gets its `cancel` field
/// (the first reason stays); a finished one, or one already cancel-requested, is left
/// alone (`None`).
pub(crate) fn cancelled(
    rec: &ExecutionRecord,
    reason: CancelReason,
    now: Millis,
) -> Option<(ExecutionRecord, Option<ExecEvent>)> {
    match rec.state {
        ExecState::Queued => {
            let mut r = rec.clone();
            r.state = ExecState::Cancelled;
            r.cancel = Some(reason);
            r.finished_at = Some(now);
            r.code = None;
            r.last_seq += 1;
            let event = ExecEvent {
                execution_id: r.id.clone(),
                seq: r.last_seq,
                at: now,
                body: EventBody::Finished(ResultSummary::bare(
                    ExecState::Cancelled,
                    reason.code(),
                    Some(cancel_message(reason).to_string()),
                )),
            };
            Some((r, Some(event)))
        }
        ExecState::Running if rec.cancel.is_none() => {
            let mut r = rec.clone();
            r.cancel = Some(reason);
            Some((r, None))
        }
        _ => None,
    }
}

/// `rec` going `queued` → `running` on `agent` (see [`Store::mark_running`]).
pub(crate) fn running(
    rec: &ExecutionRecord,
    agent: &str,
    at: Millis,
) -> StoreResult<ExecutionRecord> {
    if rec.state != ExecState::Queued || rec.cancel.is_some() {
        return Err(StoreError::IllegalTransition {
            id: rec.id.clone(),
            from: rec.state,
            to: ExecState::Running,
        });
    }
    let mut rec = rec.clone();
    rec.state = ExecState::Running;
    rec.agent = Some(agent.to_string());
    rec.started_at = Some(at);
    Ok(rec)
}

/// `rec` going from an active state to the terminal `state` (see
/// [`Store::mark_finished`]).
pub(crate) fn finished(
    rec: &ExecutionRecord,
    state: ExecState,
    result_key: Option<String>,
    error: Option<String>,
    at: Millis,
) -> StoreResult<ExecutionRecord> {
    if rec.state.is_terminal() || !state.is_terminal() {
        return Err(StoreError::IllegalTransition {
            id: rec.id.clone(),
            from: rec.state,
            to: state,
        });
    }
    let mut rec = rec.clone();
    rec.state = state;
    rec.result_key = result_key;
    rec.error = error;
    rec.finished_at = Some(at);
    rec.code = None;
    Ok(rec)
}

/// A record as it is stored: its JSON sealed with `keyring`, bound to its execution id.
pub(crate) fn seal_record(
    keyring: &crate::seal::Keyring,
    rec: &ExecutionRecord,
) -> StoreResult<Vec<u8>> {
    let json = serde_json::to_vec(rec)
        .map_err(|e| StoreError::Io(format!("encoding record {}: {e}", rec.id)))?;
    keyring
        .seal(crate::seal::Binding::Record(&rec.id), &json)
        .map_err(|e| StoreError::Io(format!("sealing record {}: {e}", rec.id)))
}

/// `rec` finished with its `finished` event (see [`Store::finish`]).
pub(crate) fn finished_with_event(
    rec: &ExecutionRecord,
    state: ExecState,
    result_key: Option<String>,
    at: Millis,
    summary: ResultSummary,
) -> StoreResult<(ExecutionRecord, ExecEvent)> {
    let mut rec = finished(rec, state, result_key, summary.error.clone(), at)?;
    rec.artifacts = summary.artifacts.clone();
    rec.last_seq += 1;
    let event = ExecEvent {
        execution_id: rec.id.clone(),
        seq: rec.last_seq,
        at: crate::model::now_ms(),
        body: EventBody::Finished(summary),
    };
    Ok((rec, event))
}
