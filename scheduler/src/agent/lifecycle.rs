//! The agent's life around its executions: at start, reconciling with the store
//! (executions a previous life of this agent left `running` become `lost`) and reaping
//! the cgroups of sandboxes whose owner died; then, until shutdown, renewing the host's
//! lease (fencing: a lapsed lease kills what still runs here), publishing the host
//! status, and sizing the warm pools by recent demand and policy (R5).
//!
//! Nothing here runs an execution: that is [`super::run`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hatchery_sandbox::cgroup::CgroupRoot;
use tokio::sync::watch;

use super::{AgentConfig, AgentError, Inner, LOST_ON_RESTART};
use crate::bus::Bus;
use crate::model::{now_ms, ExecState, ExecutionRecord, ResultSummary};
use crate::store::{Lease, ListFilter, Store};

/// Marks every execution the store says runs on `agent` as lost; returns how many.
pub(super) async fn reconcile(
    agent: &str,
    store: &dyn Store,
    bus: &dyn Bus,
) -> Result<usize, AgentError> {
    let filter = ListFilter {
        state: Some(ExecState::Running),
        ..ListFilter::default()
    };
    let mut lost = 0;
    for record in store.list(&filter).await? {
        if record.agent.as_deref() != Some(agent) {
            continue;
        }
        let summary = ResultSummary::bare(
            ExecState::Lost,
            "agent_restarted",
            Some(LOST_ON_RESTART.into()),
        );
        match store
            .finish(&record.id, ExecState::Lost, None, now_ms(), summary)
            .await
        {
            Ok((_, event)) => {
                lost += 1;
                let _ = bus.publish_event(event).await;
            }
            Err(e) => {
                tracing::warn!(execution = %record.id, error = %e, "cannot mark a lost execution");
            }
        }
    }
    Ok(lost)
}

/// Reaps the cgroups of sandboxes whose owner died and writes the host-wide ceilings
/// into the parent cgroup. A failure to reap is logged, not fatal.
pub(super) async fn reap_orphans(cfg: &AgentConfig) -> Result<(), AgentError> {
    let parent = cfg.cgroup_parent.clone();
    let ceiling = (cfg.host_memory_max, cfg.host_pids_max);
    let reaped = tokio::task::spawn_blocking(move || {
        CgroupRoot::detect(&parent).and_then(|root| {
            let summary = hatchery_sandbox::gc::collect(&root);
            root.set_ceiling(ceiling.0, ceiling.1)?;
            Ok(summary)
        })
    })
    .await
    .map_err(|e| AgentError::Runtime(format!("gc task: {e}")))?;
    match reaped {
        Ok(summary) => {
            if !summary.removed.is_empty() || !summary.failed.is_empty() {
                tracing::info!(
                    agent = %cfg.id,
                    removed = summary.removed.len(),
                    failed = summary.failed.len(),
                    "reaped sandboxes whose owner died"
                );
            }
        }
        Err(e) => tracing::warn!(agent = %cfg.id, error = %e, "cannot reap orphaned sandboxes"),
    }
    Ok(())
}

/// How often pool sizes are recomputed from demand and policy.
const SIZING_INTERVAL: Duration = Duration::from_secs(5);

/// Frozen sandboxes wanted per language (R5): each user who submitted within `window`
/// adds the `warm_pool_size` of their effective policy (`policy_of(org, user)`: 0 for a
/// user whose policy keeps its runs off this host's group) to the pool of the language
/// they used; that demand is split between the `share` hosts that take work in this
/// host's group (rounded up, so that together they keep at least all of it); the result
/// is clamped to `[floor, max]` of that language. Idle orgs and users keep nothing warm
/// beyond the floor.
pub fn desired_pool_sizes(
    recent: &[ExecutionRecord],
    now: u64,
    window: Duration,
    floors: &HashMap<String, usize>,
    max: usize,
    share: usize,
    policy_of: impl Fn(&str, &str) -> u32,
) -> HashMap<String, usize> {
    let since = now.saturating_sub(window.as_millis() as u64);
    let mut users: std::collections::HashSet<(&str, &str, &str)> = Default::default();
    for r in recent.iter().filter(|r| r.created_at >= since) {
        users.insert((r.language.as_str(), r.org.as_str(), r.user.as_str()));
    }
    let mut want: HashMap<String, usize> = HashMap::new();
    for (lang, org, user) in users {
        *want.entry(lang.to_string()).or_default() += policy_of(org, user) as usize;
    }
    floors
        .iter()
        .map(|(lang, floor)| {
            let demand = want.get(lang).copied().unwrap_or(0).div_ceil(share.max(1));
            (lang.clone(), demand.clamp(*floor, max.max(*floor)))
        })
        .collect()
}

/// Resizes the pools from recent demand and the warm-pool sizes in the policies.
pub(super) async fn sizing_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let floors: HashMap<String, usize> = inner
        .cfg
        .languages
        .iter()
        .map(|l| (l.name.clone(), l.pool_size))
        .collect();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(SIZING_INTERVAL) => {}
        }
        // A draining host refills no pool.
        if inner
            .pools_emptied
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            continue;
        }
        let recent = match inner
            .store
            .list(&ListFilter {
                limit: Some(1000),
                ..Default::default()
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "pool sizing: cannot list executions");
                continue;
            }
        };
        let mut policies: HashMap<(String, String), u32> = HashMap::new();
        for r in &recent {
            let key = (r.org.clone(), r.user.clone());
            if policies.contains_key(&key) {
                continue;
            }
            let org = inner.store.get_org_policy(&r.org).await.ok().flatten();
            let user = inner
                .store
                .get_user_policy(&r.org, &r.user)
                .await
                .ok()
                .flatten();
            let eff =
                crate::policy::resolve(&inner.cfg.default_policy, org.as_ref(), user.as_ref());
            // A user whose runs may not land on this host's group keeps nothing warm here.
            let here = match (&eff.groups, &inner.cfg.group) {
                (None, _) => true,
                (Some(allowed), Some(group)) => allowed.contains(group),
                (Some(_), None) => false,
            };
            policies.insert(key, if here { eff.warm_pool_size } else { 0 });
        }
        // In a group the autoscaler scales, its ready hosts share the group's demand;
        // elsewhere (no group, a static group) this host keeps all of it.
        let share = match &inner.cfg.group {
            Some(group) => inner
                .store
                .group_statuses()
                .await
                .ok()
                .and_then(|g| g.into_iter().find(|s| s.group == *group))
                .map_or(1, |s| s.ready.max(1) as usize),
            None => 1,
        };
        let sizes = desired_pool_sizes(
            &recent,
            crate::model::now_ms(),
            inner.cfg.demand_window,
            &floors,
            inner.cfg.max_pool_size,
            share,
            |org, user| {
                policies
                    .get(&(org.to_string(), user.to_string()))
                    .copied()
                    .unwrap_or(0)
            },
        );
        let pools = inner.pools.lock().unwrap();
        // A drain empties the pools under this lock: once it has, they stay empty.
        if inner
            .pools_emptied
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            continue;
        }
        for (lang, size) in sizes {
            if let Some(pool) = pools.get(&lang) {
                if pool.size() != size {
                    tracing::info!(language = %lang, from = pool.size(), to = size, "resizing the warm pool");
                    pool.set_size(size);
                }
            }
        }
    }
}

/// The least time between two host statuses published because something changed: under
/// load, the starts and ends of many executions go out together in one status rather
/// than one status each (every status wakes every scheduler and API replica).
pub const STATUS_MIN_GAP: Duration = Duration::from_millis(20);

/// Publishes the host status periodically and on change, at most once per
/// [`STATUS_MIN_GAP`] when changes come quicker than that.
pub(super) async fn status_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let status = inner.status();
        let published = tokio::time::Instant::now();
        if let Err(e) = inner.bus.publish_status(status).await {
            tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot publish the host status");
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(inner.cfg.status_interval) => {}
            _ = inner.status_changed.notified() => {
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep_until(published + STATUS_MIN_GAP) => {}
                }
            }
        }
    }
}

/// Renews this host's lease every third of it. When the store says it lapsed (this host
/// was unreachable or stalled for longer than the lease), its running executions are
/// `lost` already: they are killed here, and the host registers again.
pub(super) async fn lease_loop(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let lease_ms = inner.cfg.lease.as_millis() as u64;
    let every = (inner.cfg.lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match inner.store.heartbeat(&inner.cfg.id, lease_ms).await {
            Ok(Lease::Held(state)) => inner.set_state(state),
            Ok(Lease::Lapsed) => {
                let killed = inner.kill_all(super::LOST_ON_SHUTDOWN);
                tracing::error!(
                    agent = %inner.cfg.id,
                    killed,
                    "this host's lease lapsed: its executions were declared lost and are killed; registering again"
                );
                if let Err(e) = inner.store.register_host(&inner.cfg.id, lease_ms).await {
                    tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot register again");
                }
            }
            Err(e) => tracing::warn!(agent = %inner.cfg.id, error = %e, "cannot renew the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(lang: &str, org: &str, user: &str, created_at: u64) -> ExecutionRecord {
        let limits = crate::model::Limits {
            memory_bytes: 1 << 30,
            cpus: 1.0,
            pids: 64,
            time_limit_ms: 1000,
            max_artifacts: 0,
            max_artifact_bytes: 0,
        };
        let id = format!("{org}-{user}-{created_at}");
        ExecutionRecord {
            state: ExecState::Succeeded,
            ..ExecutionRecord::queued(id, org, user, lang, limits, created_at)
        }
    }

    #[test]
    fn pools_follow_recent_demand_and_policy_within_floor_and_max() {
        let floors: HashMap<String, usize> = [("r".to_string(), 1), ("bash".to_string(), 0)].into();
        let window = Duration::from_secs(600);
        let now = 10_000_000;
        // acme's users have warm_pool_size 3 (org policy), bob an override of 1; globex
        // the default 2.
        let policy = |org: &str, user: &str| match (org, user) {
            ("acme", "bob") => 1,
            ("acme", _) => 3,
            _ => 2,
        };
        let recent = vec![
            rec("r", "acme", "alice", now - 1_000),
            rec("r", "acme", "alice", now - 2_000), // the same user counts once
            rec("r", "acme", "bob", now - 3_000),
            rec("bash", "globex", "eve", now - 4_000),
            rec("r", "initech", "old", now - 700_000), // outside the window
        ];
        let sizes = desired_pool_sizes(&recent, now, window, &floors, 8, 1, policy);
        assert_eq!(sizes["r"], 3 + 1);
        assert_eq!(sizes["bash"], 2);
        // Three hosts taking work in the group share it, rounded up.
        let shared = desired_pool_sizes(&recent, now, window, &floors, 8, 3, policy);
        assert_eq!((shared["r"], shared["bash"]), (2, 1));
        // Nobody active: back to the floors; no idle capacity kept just in case.
        let idle = desired_pool_sizes(&[], now, window, &floors, 8, 1, policy);
        assert_eq!((idle["r"], idle["bash"]), (1, 0));
        // Demand above the maximum is capped.
        let many: Vec<_> = (0..10)
            .map(|i| rec("r", "acme", &format!("u{i}"), now))
            .collect();
        assert_eq!(
            desired_pool_sizes(&many, now, window, &floors, 8, 1, policy)["r"],
            8
        );
    }
}
