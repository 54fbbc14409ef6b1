//! [`EmbeddedStore`]: the [`Store`] of the single-process mode. All state lives in memory
//! behind one mutex, so every method is one atomic step; every change is appended to its
//! execution's log in the data directory ([`super::disk`]) before it becomes visible, so
//! what a caller saw survives a restart of the process. What must also survive a crash
//! of the machine is synced before the call returns: an admission, a cancel, the end;
//! the rest (taking an execution to run, `started`, output, progress) is on disk with
//! the next synced change of its log, and a machine crash can only lose it as the tail
//! of its log.
//! Records and events are sealed there with the platform's keyring (R15); only the
//! in-memory state holds them in plaintext.
//!
//! A change that syncs runs where blocking is allowed, one that only appends runs in
//! place (see `EmbeddedStore::change`); once begun, a change runs to completion even if
//! the caller's future is dropped: a client that disconnects mid-request never leaves a
//! half-applied admission. Readers wait for the mutex asynchronously and never touch
//! the disk.
//!
//! The store decides states; it never runs anything, and never marks a running
//! execution `lost` on its own (the agent's reconciliation does that).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::disk::{check_name, name_ok, Disk, Sync};
use crate::admission::{decide, is_active, Admission, AdmissionRules};
use crate::model::{
    now_ms, CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, GroupStatus,
    HostRecord, HostState, Millis, Policy, ResultSummary,
};
use crate::seal::Keyring;
use crate::store::{
    cancelled, finished, finished_with_event, is_expired, lost_summary, running, Lease, ListFilter,
    Store, StoreError, StoreResult,
};

#[derive(Default)]
struct State {
    records: HashMap<String, ExecutionRecord>,
    /// Per execution, `events[i].seq == i + 1`.
    events: HashMap<String, Vec<ExecEvent>>,
    /// Lines in each execution's log.
    lines: HashMap<String, u64>,
    org_policies: HashMap<String, Policy>,
    user_policies: HashMap<(String, String), Policy>,
    /// Queued and running records, kept by [`State::commit`] (and counted once at
    /// open), so gauges and the queue limit never scan the records.
    counts: crate::store::ActiveCounts,
    /// The queued and running executions of each (org, user), kept by
    /// [`State::commit`] (and found once at open): an admission weighs the user's
    /// executions without a scan of every record the store keeps.
    unended: HashMap<(String, String), HashSet<String>>,
    /// The last admission order given ([`ExecutionRecord::admitted`]).
    admitted: u64,
    /// Host leases: agent → (expires at, alive). In memory only: after a restart every
    /// agent registers again (and reconciles what it ran).
    /// agent → (lease expiry, alive, state).
    hosts: HashMap<String, (Millis, bool, HostState)>,
    /// Leaderships: role → (holder, term, expires at). In memory only.
    leaders: HashMap<String, (String, u64, Millis)>,
    /// What the autoscaler published about the host groups, by name. In memory only.
    groups: Vec<GroupStatus>,
}

struct Inner {
    disk: Disk,
    state: Mutex<State>,
}

/// The embedded, durable store. Cheap to clone (clones share the state).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("disk", &self.inner.disk)
            .finish_non_exhaustive()
    }
}

/// Whether events must be on disk before their append returns: `queued` (the caller is
/// told its execution was admitted) and `finished` (its end and result) must. `started`,
/// output and progress reach the kernel at once (a crash of the process loses none of
/// them) and the disk with the next durable change of their log (see [`Sync::Later`]):
/// a crash of the machine can lose them only as the tail of their log, so the seqs stay
/// gapless, and the run they belong to died with the machine. Syncing them would put a
/// disk flush (a fraction of a millisecond, with a tail of several on a busy disk)
/// between the sandbox and the client for every start and every batch of output.
fn sync_for<'a>(bodies: impl IntoIterator<Item = &'a EventBody>) -> Sync {
    let must = bodies
        .into_iter()
        .any(|b| matches!(b, EventBody::Queued | EventBody::Finished(_)));
    if must {
        Sync::Now
    } else {
        Sync::Later
    }
}

/// Keeps `rec` in its user's set of [`State::unended`] while it is queued or running. A
/// record never changes its org or user.
fn index_unended(unended: &mut HashMap<(String, String), HashSet<String>>, rec: &ExecutionRecord) {
    let key = (rec.org.clone(), rec.user.clone());
    if rec.state.is_terminal() {
        if let Some(set) = unended.get_mut(&key) {
            set.remove(&rec.id);
            if set.is_empty() {
                unended.remove(&key);
            }
        }
    } else {
        unended.entry(key).or_default().insert(rec.id.clone());
    }
}

/// The order of the parallelism cap: admission order; records admitted before the
/// store kept one (0) are older than all others, among themselves by creation.
fn admission_order(r: &ExecutionRecord) -> (u64, Millis, &str) {
    (r.admitted, r.created_at, r.id.as_str())
}

impl State {
    /// Appends one change to `rec`'s log — the new record version with its new events —
    /// then makes both visible.
    fn commit(
        &mut self,
        disk: &Disk,
        rec: ExecutionRecord,
        new_events: Vec<ExecEvent>,
        sync: Sync,
    ) -> StoreResult<()> {
        self.append_line(disk, &rec.id, Some(&rec), &new_events, sync)?;
        self.events
            .entry(rec.id.clone())
            .or_default()
            .extend(new_events);
        self.counts.add(rec.state, 1);
        index_unended(&mut self.unended, &rec);
        if let Some(old) = self.records.insert(rec.id.clone(), rec) {
            self.counts.add(old.state, -1);
        }
        Ok(())
    }

    /// Appends the next line of `id`'s log (see [`Disk::append_change`]) and counts it.
    fn append_line(
        &mut self,
        disk: &Disk,
        id: &str,
        record: Option<&ExecutionRecord>,
        events: &[ExecEvent],
        sync: Sync,
    ) -> StoreResult<()> {
        let n = self.lines.get(id).copied().unwrap_or(0) + 1;
        disk.append_change(id, n, record, events, sync)?;
        self.lines.insert(id.to_string(), n);
        Ok(())
    }

    fn record(&self, id: &str) -> StoreResult<&ExecutionRecord> {
        self.records
            .get(id)
            .ok_or_else(|| StoreError::NotFound(id.to_string()))
    }

    fn admit(
        &mut self,
        disk: &Disk,
        mut new: ExecutionRecord,
        rules: AdmissionRules,
    ) -> StoreResult<Admission> {
        check_name("execution id", &new.id)?;
        if let Some(old) = self.records.get(&new.id) {
            return Err(StoreError::IllegalTransition {
                id: new.id,
                from: old.state,
                to: ExecState::Queued,
            });
        }
        if new.state != ExecState::Queued {
            return Err(StoreError::IllegalTransition {
                id: new.id,
                from: new.state,
                to: ExecState::Queued,
            });
        }
        let queued = self.counts.queued as usize;
        if queued >= rules.max_queued {
            return Ok(Admission::QueueFull { queued });
        }

        let now = now_ms();
        new.cancel = None;
        new.last_seq = 1;
        new.displaces.clear();
        self.admitted += 1;
        new.admitted = self.admitted;
        let queued_event = ExecEvent {
            execution_id: new.id.clone(),
            seq: 1,
            at: now,
            body: EventBody::Queued,
        };

        // R10, then R11 (see [`decide`]), over the user's active executions in the order
        // the store admitted them (the new one is the newest).
        let mut active: Vec<&ExecutionRecord> = self
            .unended
            .get(&(new.org.clone(), new.user.clone()))
            .into_iter()
            .flatten()
            .filter_map(|id| self.records.get(id))
            .filter(|r| is_active(r))
            .collect();
        active.sort_by_key(|r| admission_order(r));
        let decision = decide(&active, new.tab_id.as_deref(), rules.max_parallel);
        let mut decisions: Vec<(String, CancelReason)> = decision
            .cancel
            .iter()
            .map(|(i, reason)| (active[*i].id.clone(), *reason))
            .collect();
        if decision.cancel_new {
            decisions.push((new.id.clone(), CancelReason::ParallelismCap));
        }

        // Cancellations first, the new record last: a crash in between cancels what
        // this admission would have cancelled but admits nothing, and the caller never
        // heard "admitted".
        let mut new_cancel = None;
        for (id, reason) in &decisions {
            if *id == new.id {
                new_cancel = Some(*reason);
                continue;
            }
            let Some(old) = self.records.get(id) else {
                continue;
            };
            if let Some((rec, event)) = cancelled(old, *reason, now) {
                if rec.state == ExecState::Running {
                    new.displaces.push(rec.id.clone());
                }
                self.commit(disk, rec, event.into_iter().collect(), Sync::Now)?;
            }
        }
        let mut events = vec![queued_event];
        if let Some(reason) = new_cancel {
            if let Some((rec, event)) = cancelled(&new, reason, now) {
                new = rec;
                events.extend(event);
            }
        }
        self.commit(disk, new.clone(), events.clone(), Sync::Now)?;
        Ok(Admission::Admitted {
            cancelled: decisions,
            record: Box::new(new),
            events,
        })
    }

    fn request_cancel(
        &mut self,
        disk: &Disk,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>> {
        let Some(rec) = self.records.get(id) else {
            return Ok(None);
        };
        match cancelled(rec, reason, now_ms()) {
            Some((rec, event)) => {
                self.commit(disk, rec.clone(), event.into_iter().collect(), Sync::Now)?;
                Ok(Some(rec))
            }
            None => Ok(Some(rec.clone())),
        }
    }

    fn mark_running(
        &mut self,
        disk: &Disk,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        let rec = running(self.record(id)?, agent, at)?;
        // Not synced, like `started` and the output after it (see [`sync_for`]): a
        // machine crash before the next synced line of this log (its end, a cancel)
        // leaves the execution queued, and it runs again after the restart.
        self.commit(disk, rec.clone(), Vec::new(), Sync::Later)?;
        Ok(rec)
    }

    fn mark_finished(
        &mut self,
        disk: &Disk,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        let rec = finished(self.record(id)?, state, result_key, error, at)?;
        self.commit(disk, rec.clone(), Vec::new(), Sync::Now)?;
        Ok(rec)
    }

    fn finish(
        &mut self,
        disk: &Disk,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        at: Millis,
        summary: ResultSummary,
    ) -> StoreResult<(ExecutionRecord, ExecEvent)> {
        let (rec, event) = finished_with_event(self.record(id)?, state, result_key, at, summary)?;
        self.commit(disk, rec.clone(), vec![event.clone()], Sync::Now)?;
        Ok((rec, event))
    }

    /// Marks every running execution of `agent` lost; returns their `finished` events.
    fn lose_host(&mut self, disk: &Disk, agent: &str) -> StoreResult<Vec<ExecEvent>> {
        if let Some(h) = self.hosts.get_mut(agent) {
            h.1 = false;
        }
        let mut ids: Vec<String> = self
            .records
            .values()
            .filter(|r| r.state == ExecState::Running && r.agent.as_deref() == Some(agent))
            .map(|r| r.id.clone())
            .collect();
        ids.sort();
        let mut events = Vec::with_capacity(ids.len());
        for id in ids {
            let (_, event) =
                self.finish(disk, &id, ExecState::Lost, None, now_ms(), lost_summary())?;
            events.push(event);
        }
        Ok(events)
    }

    /// Appends `bodies` with the next seqs of `id`, in one write to its log.
    fn append_events(
        &mut self,
        disk: &Disk,
        id: &str,
        bodies: Vec<EventBody>,
    ) -> StoreResult<Vec<ExecEvent>> {
        let last = self.record(id)?.last_seq;
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        let events = ExecEvent::numbered(id, last + 1, now_ms(), bodies);
        let sync = sync_for(events.iter().map(|e| &e.body));
        self.append_line(disk, id, None, &events, sync)?;
        if let Some(rec) = self.records.get_mut(id) {
            rec.last_seq = last + events.len() as u64;
        }
        self.events
            .entry(id.to_string())
            .or_default()
            .extend(events.iter().cloned());
        Ok(events)
    }

    /// Deletes the records and event logs of `ids` still expired at `before`.
    fn delete_expired(
        &mut self,
        disk: &Disk,
        ids: &[String],
        before: Millis,
    ) -> StoreResult<Vec<String>> {
        let mut out = Vec::with_capacity(ids.len());
        let mut failed = None;
        for id in ids {
            if !self.records.get(id).is_some_and(|r| is_expired(r, before)) {
                continue;
            }
            if let Err(e) = disk.remove_execution(id) {
                failed = Some(e);
                break;
            }
            self.events.remove(id);
            self.lines.remove(id);
            self.records.remove(id);
            out.push(id.clone());
        }
        if !out.is_empty() || failed.is_some() {
            disk.sync_removals()?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in `dir` and loads everything, converting a
    /// data directory of an older layout. Repairs what a crash can leave: a torn last
    /// line of a log is dropped, a log without a complete line is removed, and (in data
    /// converted from the older layout, which wrote records and events apart) an
    /// execution whose events end in `finished` while its record is still active takes
    /// the state of that event. Running executions stay `running`: the agent's
    /// reconciliation decides about them.
    ///
    /// Changes are sealed with `keyring`'s current key and opened with the key their
    /// header names: opening fails ([`StoreError::Corrupt`], naming the file and line)
    /// if a line does not authenticate or needs a key `keyring` does not hold.
    pub fn open(dir: &Path, keyring: Keyring) -> StoreResult<Self> {
        let disk = Disk::create(dir, keyring)?;
        let loaded = disk.load()?;
        let mut state = State {
            records: loaded.records,
            events: loaded.events,
            lines: loaded.lines,
            org_policies: loaded.org_policies,
            user_policies: loaded.user_policies,
            counts: Default::default(),
            unended: HashMap::new(),
            admitted: 0,
            hosts: HashMap::new(),
            leaders: HashMap::new(),
            groups: Vec::new(),
        };
        state.admitted = state
            .records
            .values()
            .map(|r| r.admitted)
            .max()
            .unwrap_or(0);
        let mut repaired = Vec::new();
        for rec in state.records.values_mut() {
            if rec.state.is_terminal() {
                continue;
            }
            let finished = state.events.get(&rec.id).and_then(|ev| {
                ev.iter().rev().find_map(|e| match &e.body {
                    EventBody::Finished(summary) if summary.state.is_terminal() => {
                        Some((summary.state, e.at))
                    }
                    _ => None,
                })
            });
            if let Some((s, at)) = finished {
                rec.state = s;
                rec.finished_at = Some(at);
                rec.code = None;
                repaired.push(rec.clone());
            }
        }
        for rec in &repaired {
            state.append_line(&disk, &rec.id, Some(rec), &[], Sync::Now)?;
        }
        state.counts = crate::store::ActiveCounts::of(state.records.values());
        for rec in state.records.values() {
            index_unended(&mut state.unended, rec);
        }
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                disk,
                state: Mutex::new(state),
            }),
        })
    }

    /// Runs one change under the state's lock; once begun it completes even if the
    /// awaiting future is dropped. `sync` says what the change may do to the disk:
    ///
    /// - [`Sync::Now`], it syncs (an `fdatasync` is a fraction of a millisecond to a
    ///   few): it runs where blocking is allowed ([`crate::blocking::run`]: in place on a
    ///   multi-threaded runtime);
    /// - [`Sync::Later`], it at most appends into the page cache (tens of microseconds,
    ///   like writing a log line): it runs in place once the lock is taken.
    async fn change<T, F>(&self, sync: Sync, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut State, &Disk) -> StoreResult<T> + Send + 'static,
    {
        if sync == Sync::Later {
            let mut state = self.inner.state.lock().await;
            return f(&mut state, &self.inner.disk);
        }
        let inner = Arc::clone(&self.inner);
        crate::blocking::run(move || {
            let mut state = inner.state.blocking_lock();
            f(&mut state, &inner.disk)
        })
        .await
        .map_err(|e| StoreError::Io(format!("store task failed: {e}")))?
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get_org_policy(&self, org: &str) -> StoreResult<Option<Policy>> {
        let state = self.inner.state.lock().await;
        Ok(state.org_policies.get(org).cloned())
    }

    async fn put_org_policy(&self, org: &str, policy: Policy) -> StoreResult<()> {
        check_name("org", org)?;
        let org = org.to_string();
        self.change(Sync::Now, move |state, disk| {
            disk.write_org_policy(&org, &policy)?;
            state.org_policies.insert(org, policy);
            Ok(())
        })
        .await
    }

    async fn get_user_policy(&self, org: &str, user: &str) -> StoreResult<Option<Policy>> {
        if !name_ok(org) || !name_ok(user) {
            return Ok(None);
        }
        let state = self.inner.state.lock().await;
        Ok(state
            .user_policies
            .get(&(org.to_string(), user.to_string()))
            .cloned())
    }

    async fn put_user_policy(&self, org: &str, user: &str, policy: Policy) -> StoreResult<()> {
        check_name("org", org)?;
        check_name("user", user)?;
        let key = (org.to_string(), user.to_string());
        self.change(Sync::Now, move |state, disk| {
            disk.write_user_policy(&key.0, &key.1, &policy)?;
            state.user_policies.insert(key, policy);
            Ok(())
        })
        .await
    }

    async fn admit(
        &self,
        record: ExecutionRecord,
        rules: AdmissionRules,
    ) -> StoreResult<Admission> {
        check_name("execution id", &record.id)?;
        self.change(Sync::Now, move |state, disk| {
            state.admit(disk, record, rules)
        })
        .await
    }

    async fn get(&self, id: &str) -> StoreResult<Option<ExecutionRecord>> {
        let state = self.inner.state.lock().await;
        Ok(state.records.get(id).cloned())
    }

    async fn active_counts(&self) -> StoreResult<crate::store::ActiveCounts> {
        Ok(self.inner.state.lock().await.counts)
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<ExecutionRecord>> {
        let state = self.inner.state.lock().await;
        let mut out: Vec<ExecutionRecord> = state
            .records
            .values()
            .filter(|r| filter.org.as_ref().is_none_or(|o| *o == r.org))
            .filter(|r| filter.user.as_ref().is_none_or(|u| *u == r.user))
            .filter(|r| {
                filter
                    .tab_id
                    .as_ref()
                    .is_none_or(|t| r.tab_id.as_ref() == Some(t))
            })
            .filter(|r| filter.state.is_none_or(|s| s == r.state))
            .filter(|r| !filter.active_only || !r.state.is_terminal())
            .cloned()
            .collect();
        drop(state);
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        if let Some(limit) = filter.limit {
            out.truncate(limit);
        }
        Ok(out)
    }

    async fn request_cancel(
        &self,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>> {
        let id = id.to_string();
        self.change(Sync::Now, move |state, disk| {
            state.request_cancel(disk, &id, reason)
        })
        .await
    }

    async fn mark_running(
        &self,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        let (id, agent) = (id.to_string(), agent.to_string());
        self.change(Sync::Later, move |state, disk| {
            state.mark_running(disk, &id, &agent, at)
        })
        .await
    }

    async fn mark_finished(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        let id = id.to_string();
        self.change(Sync::Now, move |st, disk| {
            st.mark_finished(disk, &id, state, result_key, error, at)
        })
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
        let id = id.to_string();
        self.change(Sync::Now, move |st, disk| {
            st.finish(disk, &id, state, result_key, at, summary)
        })
        .await
    }

    async fn register_host(&self, agent: &str, lease_ms: u64) -> StoreResult<()> {
        let agent = agent.to_string();
        self.change(Sync::Later, move |st, _disk| {
            let state = st.hosts.get(&agent).map_or(HostState::Ready, |h| h.2);
            st.hosts.insert(agent, (now_ms() + lease_ms, true, state));
            Ok(())
        })
        .await
    }

    async fn heartbeat(&self, agent: &str, lease_ms: u64) -> StoreResult<Lease> {
        let agent = agent.to_string();
        self.change(Sync::Later, move |st, _disk| {
            let now = now_ms();
            // Late but not declared lost by anyone yet: the host keeps its runs.
            match st.hosts.get(&agent).copied() {
                Some((_, true, state)) => {
                    st.hosts.insert(agent, (now + lease_ms, true, state));
                    Ok(Lease::Held(state))
                }
                _ => Ok(Lease::Lapsed),
            }
        })
        .await
    }

    async fn set_host_state(&self, agent: &str, state: HostState) -> StoreResult<HostRecord> {
        let agent = agent.to_string();
        self.change(Sync::Later, move |st, _disk| {
            let h = st
                .hosts
                .get_mut(&agent)
                .ok_or_else(|| StoreError::UnknownHost(agent.clone()))?;
            h.2 = state;
            Ok(HostRecord {
                agent,
                state,
                alive: h.1,
                lease_expires_at: h.0,
            })
        })
        .await
    }

    async fn hosts(&self) -> StoreResult<Vec<HostRecord>> {
        self.change(Sync::Later, move |st, _disk| {
            let mut hosts: Vec<HostRecord> = st
                .hosts
                .iter()
                .map(|(agent, (expires, alive, state))| HostRecord {
                    agent: agent.clone(),
                    state: *state,
                    alive: *alive,
                    lease_expires_at: *expires,
                })
                .collect();
            hosts.sort_by(|a, b| a.agent.cmp(&b.agent));
            Ok(hosts)
        })
        .await
    }

    async fn reap_lapsed_hosts(&self) -> StoreResult<Vec<ExecEvent>> {
        self.change(Sync::Now, move |st, disk| {
            let now = now_ms();
            let mut lapsed: Vec<String> = st
                .hosts
                .iter()
                .filter(|(_, (expires, alive, _))| *alive && now > *expires)
                .map(|(a, _)| a.clone())
                .collect();
            lapsed.sort();
            let mut events = Vec::new();
            for agent in lapsed {
                events.extend(st.lose_host(disk, &agent)?);
            }
            Ok(events)
        })
        .await
    }

    async fn put_group_statuses(&self, groups: &[GroupStatus]) -> StoreResult<()> {
        let mut groups = groups.to_vec();
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        self.change(Sync::Later, move |st, _disk| {
            st.groups = groups;
            Ok(())
        })
        .await
    }

    async fn group_statuses(&self) -> StoreResult<Vec<GroupStatus>> {
        self.change(Sync::Later, move |st, _disk| Ok(st.groups.clone()))
            .await
    }

    async fn lead(&self, role: &str, holder: &str, lease_ms: u64) -> StoreResult<Option<u64>> {
        let (role, holder) = (role.to_string(), holder.to_string());
        self.change(Sync::Later, move |st, _disk| {
            let now = now_ms();
            let term = match st.leaders.get(&role) {
                Some((h, term, expires)) if *h == holder && now <= *expires => *term,
                Some((_, _, expires)) if now <= *expires => return Ok(None),
                Some((_, term, _)) => term + 1,
                None => 1,
            };
            st.leaders.insert(role, (holder, term, now + lease_ms));
            Ok(Some(term))
        })
        .await
    }

    async fn append_event(&self, id: &str, body: EventBody) -> StoreResult<ExecEvent> {
        let mut events = self.append_events(id, vec![body]).await?;
        events
            .pop()
            .ok_or_else(|| StoreError::Io(format!("appending an event to {id}: none stored")))
    }

    async fn append_events(&self, id: &str, bodies: Vec<EventBody>) -> StoreResult<Vec<ExecEvent>> {
        let id = id.to_string();
        let sync = sync_for(&bodies);
        self.change(sync, move |state, disk| {
            state.append_events(disk, &id, bodies)
        })
        .await
    }

    async fn events_after(&self, id: &str, after: u64) -> StoreResult<Vec<ExecEvent>> {
        let state = self.inner.state.lock().await;
        if !state.records.contains_key(id) {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let events = state.events.get(id).map(Vec::as_slice).unwrap_or(&[]);
        let from = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(events.len());
        Ok(events[from..].to_vec())
    }

    async fn expired(&self, before: Millis, limit: usize) -> StoreResult<Vec<ExecutionRecord>> {
        let state = self.inner.state.lock().await;
        let mut out: Vec<ExecutionRecord> = state
            .records
            .values()
            .filter(|r| is_expired(r, before))
            .cloned()
            .collect();
        drop(state);
        out.sort_by(|a, b| {
            (a.finished_at.unwrap_or(a.created_at), &a.id)
                .cmp(&(b.finished_at.unwrap_or(b.created_at), &b.id))
        });
        out.truncate(limit);
        Ok(out)
    }

    async fn delete_expired(&self, ids: &[String], before: Millis) -> StoreResult<Vec<String>> {
        let ids = ids.to_vec();
        self.change(Sync::Now, move |state, disk| {
            state.delete_expired(disk, &ids, before)
        })
        .await
    }
}
