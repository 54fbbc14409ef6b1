//! The autoscaler at work (R5, R7): once a second, the leading scheduler gathers what
//! [`crate::autoscale::plan`] needs — the hosts the providers made and where each is in
//! its life, what the store asks of each, what each runs (its statuses, and the runs sent
//! to it that it has not shown yet), the executions waiting because no live host can
//! take them — and acts on the plan: it launches hosts through the group's provider,
//! cancels drains, drains empty hosts, and terminates drained ones.
//!
//! Scale-down never kills: a host is terminated only when the store says it drains (or
//! already terminates), its own status says it has taken that in (it takes no new work),
//! it runs nothing, and no run sent to it is outstanding — all checked again right before
//! the provider is asked, whatever the plan says. Termination itself is what an
//! operator's SIGTERM does: the agent drains and exits.
//!
//! The autoscaler keeps nothing that matters across schedulers: host states are in the
//! store and hosts are listed by their provider, so a scheduler that starts to lead
//! (after a restart, or another's lapse) resumes the drains and terminations in progress.
//! Only each host's "empty since" restarts, which can only make a drain later.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::autoscale::{self, GroupConfig, GroupHost, History, Pending, Phase, Reserve};
use crate::model::{EffectivePolicy, GroupStatus, HostRecord, HostState, Millis, Resources};
use crate::placement::Cluster;
use crate::provider::{HostPhase, ProvidedHost, Provider, ProviderError};
use crate::store::Store;

/// How often the autoscaler runs a pass.
pub const SCALE_EVERY: Duration = Duration::from_secs(1);

/// Makes the providers, when a scheduler starts to lead: a provider may hold state of
/// the machine (the `netns` provider's state directory), which only the leader may
/// drive — a standby that made one at start would take over hosts the leader is
/// launching.
#[async_trait::async_trait]
pub trait ProviderSource: Send + Sync {
    /// The providers by kind (`netns`, ...); the same ones on every call once made.
    async fn providers(&self) -> Result<BTreeMap<String, Arc<dyn Provider>>, ProviderError>;
}

/// Providers made up front.
pub struct Made(pub BTreeMap<String, Arc<dyn Provider>>);

#[async_trait::async_trait]
impl ProviderSource for Made {
    async fn providers(&self) -> Result<BTreeMap<String, Arc<dyn Provider>>, ProviderError> {
        Ok(self.0.clone())
    }
}

/// What the autoscaler works with: the host groups, and where the provider of each kind
/// they name comes from. Groups whose provider is `static` (hosts started by hand) are
/// not scaled.
#[derive(Clone)]
pub struct Scaling {
    pub groups: Vec<GroupConfig>,
    pub providers: Arc<dyn ProviderSource>,
    /// The platform default policy (▷ org ▷ user): each active user's
    /// `warm_pool_size`, default limits and groups size the room kept for it.
    pub default_policy: EffectivePolicy,
    /// How long after its last submission a user counts as active.
    pub active_for: Duration,
}

impl std::fmt::Debug for Scaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scaling")
            .field("groups", &self.groups)
            .field("active_for", &self.active_for)
            .finish_non_exhaustive()
    }
}

/// The autoscaler of one leadership term.
pub struct Scaler {
    scaling: Scaling,
    /// The providers, once made (at the first pass).
    providers: Option<BTreeMap<String, Arc<dyn Provider>>>,
    /// When making them last failed (retried every [`RETRY_PROVIDERS_MS`]).
    providers_failed_at: Option<Millis>,
    history: History,
    /// How the plan sees each host.
    tracker: HostTracker,
    /// The group of each host the providers list (for hosts already released).
    group_of: HashMap<String, String>,
    /// The room kept for active users, and when it was read.
    reserve: Vec<Reserve>,
    reserve_at: Option<Millis>,
    /// Active users whose room fits no group (warned about once).
    unreservable: Vec<String>,
    /// What was last published about the groups, and when.
    published: Option<(Millis, Vec<GroupStatus>)>,
}

/// How long a host whose drain was cancelled may take to show it takes work again.
const REVIVE_PATIENCE_MS: Millis = 30_000;

/// How long after a failure to make the providers they are tried again.
const RETRY_PROVIDERS_MS: Millis = 10_000;

/// The group statuses are published at least this often, changed or not.
pub const PUBLISH_EVERY_MS: Millis = 5_000;

/// How often the room kept for active users is read again from the store (and at once
/// before a drain).
const RESERVE_EVERY_MS: Millis = 5_000;

/// The most recent executions read to find who is active.
const RECENT: usize = 1000;

/// The room kept for the users active at `now` (R5): every user with an execution
/// created within `active_for` (among the [`RECENT`] newest) keeps its effective
/// `warm_pool_size` runs of each language it used, at its default limits, in the
/// groups its policy allows. Users with `warm_pool_size` 0 keep nothing.
pub async fn active_reserve(
    store: &dyn Store,
    default_policy: &EffectivePolicy,
    active_for: Duration,
    now: Millis,
) -> Result<Vec<Reserve>, crate::store::StoreError> {
    let since = now.saturating_sub(active_for.as_millis() as u64);
    let recent = store
        .list(&crate::store::ListFilter {
            limit: Some(RECENT),
            ..Default::default()
        })
        .await?;
    let active: std::collections::BTreeSet<(String, String, String)> = recent
        .into_iter()
        .filter(|r| r.created_at >= since)
        .map(|r| (r.org, r.user, r.language))
        .collect();
    let mut policies: HashMap<(String, String), EffectivePolicy> = HashMap::new();
    let mut reserve = Vec::new();
    for (org, user, language) in active {
        let key = (org, user);
        if !policies.contains_key(&key) {
            let (o, u) = store.get_policies(&key.0, &key.1).await?;
            let effective = crate::policy::resolve(default_policy, o.as_ref(), u.as_ref());
            policies.insert(key.clone(), effective);
        }
        let p = &policies[&key];
        if p.warm_pool_size == 0 {
            continue;
        }
        reserve.push(Reserve {
            who: format!("{}/{}", key.0, key.1),
            language,
            need: Resources::new(p.memory_bytes, p.cpus),
            count: p.warm_pool_size,
            groups: p.groups.clone(),
        });
    }
    Ok(reserve)
}

impl Scaler {
    pub fn new(scaling: Scaling) -> Scaler {
        Scaler {
            scaling,
            providers: None,
            providers_failed_at: None,
            history: History::default(),
            tracker: HostTracker::default(),
            group_of: HashMap::new(),
            reserve: Vec::new(),
            reserve_at: None,
            unreservable: Vec::new(),
            published: None,
        }
    }

    /// Publishes what this pass saw of each group in the store (when it changed, and at
    /// least every [`PUBLISH_EVERY_MS`] so that readers can tell it is current).
    async fn publish(
        &mut self,
        store: &dyn Store,
        groups: &[GroupConfig],
        plan: &autoscale::Plan,
        hosts: &[GroupHost],
        now: Millis,
    ) {
        let statuses: Vec<GroupStatus> = groups
            .iter()
            .map(|g| {
                let (pending, pending_need) = plan.demand.get(&g.name).copied().unwrap_or_default();
                let (reserved, reserved_need) =
                    plan.reserved.get(&g.name).copied().unwrap_or_default();
                let count = |phase: Phase| {
                    hosts
                        .iter()
                        .filter(|h| h.group == g.name && h.phase == phase)
                        .count() as u32
                };
                GroupStatus {
                    group: g.name.clone(),
                    pending,
                    pending_need,
                    reserved,
                    reserved_need,
                    ready: count(Phase::Up(HostState::Ready)),
                    provisioning: count(Phase::Provisioning),
                    terminating: count(Phase::Terminating),
                    at: now,
                }
            })
            .collect();
        let same = |a: &[GroupStatus], b: &[GroupStatus]| {
            a.len() == b.len()
                && a.iter().zip(b).all(|(x, y)| {
                    GroupStatus { at: 0, ..x.clone() } == GroupStatus { at: 0, ..y.clone() }
                })
        };
        let fresh = self.published.as_ref().is_some_and(|(at, last)| {
            now.saturating_sub(*at) < PUBLISH_EVERY_MS && same(last, &statuses)
        });
        if fresh {
            return;
        }
        match store.put_group_statuses(&statuses).await {
            Ok(()) => self.published = Some((now, statuses)),
            Err(e) => tracing::warn!(error = %e, "autoscaler: cannot publish the groups' status"),
        }
    }

    /// Makes the providers if they are not yet; whether they are.
    async fn ensure_providers(&mut self, now: Millis) -> bool {
        if self.providers.is_some() {
            return true;
        }
        if self
            .providers_failed_at
            .is_some_and(|at| now.saturating_sub(at) < RETRY_PROVIDERS_MS)
        {
            return false;
        }
        match self.scaling.providers.providers().await {
            Ok(p) => {
                tracing::info!(providers = ?p.keys().collect::<Vec<_>>(), "autoscaler: providers ready");
                self.providers = Some(p);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "autoscaler: cannot make the providers; scaling waits");
                self.providers_failed_at = Some(now);
                false
            }
        }
    }

    /// The groups some provider makes the hosts of.
    fn managed(&self) -> Vec<GroupConfig> {
        let providers = self.providers.as_ref();
        self.scaling
            .groups
            .iter()
            .filter(|g| providers.is_some_and(|p| p.contains_key(&g.provider)))
            .cloned()
            .collect()
    }

    /// The room kept for active users, read again every [`RESERVE_EVERY_MS`], or now
    /// when `fresh` (on a store error the last one read is kept).
    async fn refresh_reserve(&mut self, store: &dyn Store, now: Millis, fresh: bool) {
        if !fresh
            && self
                .reserve_at
                .is_some_and(|at| now.saturating_sub(at) < RESERVE_EVERY_MS)
        {
            return;
        }
        let s = &self.scaling;
        match active_reserve(store, &s.default_policy, s.active_for, now).await {
            Ok(r) => {
                if r != self.reserve {
                    let who: Vec<&str> = r.iter().map(|r| r.who.as_str()).collect();
                    tracing::info!(active = ?who, "autoscaler: room kept for active users");
                }
                self.reserve = r;
                self.reserve_at = Some(now);
            }
            Err(e) => tracing::warn!(error = %e, "autoscaler: cannot read who is active"),
        }
    }

    /// One pass: gather, plan, act. `waiting` is what the scheduler could not place.
    /// Errors are logged: the next pass tries again.
    pub async fn pass(
        &mut self,
        store: &dyn Store,
        cluster: &mut Cluster,
        waiting: &[Pending],
        now: Millis,
    ) {
        if !self.ensure_providers(now).await {
            return;
        }
        let records = match store.hosts().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "autoscaler: cannot read the hosts");
                return;
            }
        };
        // Placement skips at once what the store asks to take no new work.
        cluster.withhold(
            records
                .iter()
                .filter(|r| r.state != HostState::Ready)
                .map(|r| r.agent.clone())
                .collect(),
        );
        let states: HashMap<&str, HostState> = records
            .iter()
            .map(|r| (r.agent.as_str(), r.state))
            .collect();
        let Some(provided) = self.list().await else {
            return;
        };
        self.mark_gone(store, &records, &provided).await;

        let mut hosts = Vec::new();
        for (kind, host) in &provided {
            self.group_of.insert(host.name.clone(), host.group.clone());
            if host.phase == HostPhase::Exited {
                // Its agent went without being asked (killed, crashed, or drained after
                // someone's SIGTERM): release what it held. What it ran, if anything, is
                // declared lost when its lease lapses.
                tracing::warn!(host = %host.name, group = %host.group, "its agent exited on its own: releasing the host");
                self.terminate(store, kind, &host.name).await;
                continue;
            }
            let state = states.get(host.name.as_str()).copied();
            let (view, joined) = self.tracker.view(host, state, cluster, now);
            if joined {
                tracing::info!(host = %host.name, group = %host.group, after_s = now.saturating_sub(host.launched_at) / 1000, "autoscaler: the host joined");
            }
            hosts.push(view);
        }
        let waiting = still_waiting(cluster, waiting, now);
        self.refresh_reserve(store, now, false).await;
        let groups = self.managed();
        let mut plan =
            autoscale::plan(&groups, &hosts, &waiting, &self.reserve, &self.history, now);
        if !plan.drain.is_empty() && self.reserve_at != Some(now) {
            // A drain is decided on who is active now, not seconds ago: a user who has
            // just submitted keeps the room for its next runs.
            self.refresh_reserve(store, now, true).await;
            plan = autoscale::plan(&groups, &hosts, &waiting, &self.reserve, &self.history, now);
        }
        self.history.record(&plan, &hosts, now);
        self.publish(store, &groups, &plan, &hosts, now).await;
        let kind_of: HashMap<&str, &str> = provided
            .iter()
            .map(|(k, h)| (h.name.as_str(), k.as_str()))
            .collect();

        for (group, n) in &plan.launch {
            let Some(g) = groups.iter().find(|g| g.name == *group) else {
                continue;
            };
            let (count, need) = plan.demand.get(group).copied().unwrap_or_default();
            let (kept, _) = plan.reserve_short.get(group).copied().unwrap_or_default();
            for _ in 0..*n {
                let launched = match self.provider(&g.provider) {
                    Ok(p) => p.launch(g).await,
                    Err(e) => Err(e),
                };
                match launched {
                    Ok(name) => {
                        tracing::info!(host = %name, group = %group, waiting = count, need = %need, room_for_active_users = kept, "autoscaler: launching a host");
                        self.group_of.insert(name, group.clone());
                    }
                    Err(e) => {
                        tracing::warn!(group = %group, error = %e, "autoscaler: cannot launch a host")
                    }
                }
            }
        }
        for name in &plan.cancel_drain {
            match store.set_host_state(name, HostState::Ready).await {
                Ok(_) => {
                    tracing::info!(host = %name, "autoscaler: demand returned; cancelling the host's drain");
                    self.tracker.revived(name, now);
                    cluster.release(name);
                }
                Err(e) => {
                    tracing::warn!(host = %name, error = %e, "autoscaler: cannot cancel a drain")
                }
            }
        }
        for name in &plan.drain {
            let empty_for = self.tracker.empty_for(name, now);
            match store.set_host_state(name, HostState::Draining).await {
                Ok(_) => {
                    tracing::info!(host = %name, empty_for_s = empty_for / 1000, "autoscaler: the host is not needed; draining it");
                    cluster.hold(name);
                }
                // Not registered yet: nothing to drain.
                Err(e) => {
                    tracing::debug!(host = %name, error = %e, "autoscaler: cannot drain a host")
                }
            }
        }
        for name in &plan.terminate {
            if !drained_and_empty(cluster, name, now) {
                tracing::debug!(host = %name, "autoscaler: waiting for the host to show it drained and runs nothing");
                continue;
            }
            let Some(kind) = kind_of.get(name.as_str()) else {
                continue;
            };
            tracing::info!(host = %name, "autoscaler: the host drained and runs nothing; terminating it");
            self.terminate(store, kind, name).await;
        }
        if !plan.unreservable.is_empty() && plan.unreservable != self.unreservable {
            tracing::warn!(users = ?plan.unreservable, "autoscaler: active users whose warm room fits no group they may use");
        }
        self.unreservable = plan.unreservable.clone();
        if !plan.unplaceable.is_empty() {
            tracing::debug!(
                count = plan.unplaceable.len(),
                "autoscaler: waiting executions no group can hold"
            );
        }
    }

    /// Every provider's hosts, with the provider kind; `None` when one cannot list (no
    /// decision is taken on half a picture).
    async fn list(&self) -> Option<Vec<(String, ProvidedHost)>> {
        let mut all = Vec::new();
        for (kind, provider) in self.providers.iter().flatten() {
            match provider.list().await {
                Ok(hosts) => all.extend(hosts.into_iter().map(|h| (kind.clone(), h))),
                Err(e) => {
                    tracing::warn!(provider = %kind, error = %e, "autoscaler: cannot list hosts");
                    return None;
                }
            }
        }
        Some(all)
    }

    /// The provider of `kind` (every group the plan names has one: see `managed`).
    fn provider(&self, kind: &str) -> Result<Arc<dyn Provider>, ProviderError> {
        self.providers
            .as_ref()
            .and_then(|p| p.get(kind))
            .cloned()
            .ok_or_else(|| ProviderError::Setup(format!("no {kind} provider")))
    }

    /// Asks the provider to terminate `name`, then records it `terminating` (the host is
    /// `gone` once the provider no longer lists it). A provider that refuses leaves
    /// everything as it was: the next pass tries again.
    async fn terminate(&mut self, store: &dyn Store, kind: &str, name: &str) {
        let terminated = match self.provider(kind) {
            Ok(p) => p.terminate(name).await,
            Err(e) => Err(e),
        };
        if let Err(e) = terminated {
            tracing::warn!(host = %name, error = %e, "autoscaler: cannot terminate a host");
            return;
        }
        self.tracker.forget(name);
        match store.set_host_state(name, HostState::Terminating).await {
            // A host that never registered has no record.
            Ok(_) | Err(crate::store::StoreError::UnknownHost(_)) => {}
            Err(e) => {
                tracing::warn!(host = %name, error = %e, "autoscaler: cannot mark a host terminating")
            }
        }
    }

    /// Hosts the store says terminate that no provider lists any more are gone.
    async fn mark_gone(
        &mut self,
        store: &dyn Store,
        records: &[HostRecord],
        provided: &[(String, ProvidedHost)],
    ) {
        let listed: HashSet<&str> = provided.iter().map(|(_, h)| h.name.as_str()).collect();
        for r in records {
            if r.state == HostState::Terminating && !listed.contains(r.agent.as_str()) {
                match store.set_host_state(&r.agent, HostState::Gone).await {
                    Ok(_) => {
                        let group = self.group_of.remove(&r.agent).unwrap_or_default();
                        tracing::info!(host = %r.agent, group = %group, "autoscaler: the host is gone");
                    }
                    Err(e) => {
                        tracing::warn!(host = %r.agent, error = %e, "autoscaler: cannot mark a host gone")
                    }
                }
            }
        }
    }
}

/// What the scheduler could not place that no live host can take now either: what a
/// host can take now is placed at the scheduler's next turn (a status that arrived
/// since, a drain cancelled), and is not demand for a new host.
pub fn still_waiting(cluster: &Cluster, waiting: &[Pending], now: Millis) -> Vec<Pending> {
    waiting
        .iter()
        .filter(|p| {
            cluster
                .place(&p.language, &p.need, p.groups.as_deref(), now)
                .is_none()
        })
        .cloned()
        .collect()
}

/// How the plan sees each host a provider made ([`HostTracker::view`]): from its provider's
/// phase, the state the store asks of it, and the scheduler's view of what it runs; with
/// what the autoscaler remembers between passes (lost when another scheduler takes over:
/// only each host's "empty since" restarts, which can only make a drain later).
#[derive(Debug, Default)]
pub struct HostTracker {
    /// Since when each host was seen with nothing running nor sent.
    empty_since: HashMap<String, Millis>,
    /// Hosts seen reporting.
    joined: HashSet<String>,
    /// Hosts whose drain was cancelled, until their status shows they take work again:
    /// meanwhile they count as capacity on its way (not launched for again).
    reviving: HashMap<String, Millis>,
}

impl HostTracker {
    /// How the plan sees `host` (`state`: what the store asks of it, if it registered),
    /// and whether it was seen reporting for the first time.
    pub fn view(
        &mut self,
        host: &ProvidedHost,
        state: Option<HostState>,
        cluster: &Cluster,
        now: Millis,
    ) -> (GroupHost, bool) {
        let seen = cluster.host(&host.name).filter(|h| !h.is_stale(now));
        let joined = seen.is_some() && self.joined.insert(host.name.clone());
        // A host whose drain was just cancelled takes work again once its status says
        // so (at its next heartbeat).
        let revived_at = self.reviving.get(&host.name).copied();
        let back = seen.is_some_and(|h| !h.status.state.is_leaving());
        if back || revived_at.is_some_and(|t| now.saturating_sub(t) > REVIVE_PATIENCE_MS) {
            self.reviving.remove(&host.name);
        }
        let reviving = self.reviving.contains_key(&host.name) && state == Some(HostState::Ready);
        let phase = match (host.phase, seen) {
            (HostPhase::Stopping, _) => Phase::Terminating,
            (_, None) => Phase::Provisioning,
            (_, Some(_)) if reviving => Phase::Provisioning,
            (_, Some(_)) => match state.unwrap_or_default() {
                HostState::Terminating | HostState::Gone => Phase::Terminating,
                s => Phase::Up(s),
            },
        };
        let (used, running) = seen.map_or((Resources::default(), 0), |h| {
            (
                h.status.used().plus(&h.sent_need),
                h.status.running + h.sent,
            )
        });
        let empty_since = if running == 0 && seen.is_some() {
            Some(*self.empty_since.entry(host.name.clone()).or_insert(now))
        } else {
            self.empty_since.remove(&host.name);
            None
        };
        let view = GroupHost {
            name: host.name.clone(),
            group: host.group.clone(),
            phase,
            used,
            running,
            empty_since,
        };
        (view, joined)
    }

    /// The host's drain was cancelled at `now`.
    pub fn revived(&mut self, name: &str, now: Millis) {
        self.reviving.insert(name.to_string(), now);
    }

    /// How long the host has been seen empty.
    pub fn empty_for(&self, name: &str, now: Millis) -> Millis {
        self.empty_since
            .get(name)
            .map_or(0, |t| now.saturating_sub(*t))
    }

    /// The host is being terminated: nothing of it is kept.
    pub fn forget(&mut self, name: &str) {
        self.empty_since.remove(name);
        self.reviving.remove(name);
    }
}

/// The last word before a host is terminated: its own fresh status says it takes no new
/// work and runs nothing, and nothing sent to it is outstanding.
pub fn drained_and_empty(cluster: &Cluster, name: &str, now: Millis) -> bool {
    cluster.host(name).is_some_and(|h| {
        !h.is_stale(now)
            && h.status.state.is_leaving()
            && h.status.running == 0
            && h.status.sandboxes.is_empty()
            && h.sent == 0
    }) && cluster.in_flight_on(name).is_empty()
}
