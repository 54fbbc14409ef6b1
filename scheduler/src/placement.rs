//! Placement, pure: which agent takes an execution, chosen from the agents' latest
//! [`HostStatus`] in three small stages (Nomad's shape): [`feasible`] (alive, not
//! draining, serves the language, has a free slot) → [`rank`] (most free slots first) →
//! [`select`] (the best), over the scheduler's view of the cluster ([`Cluster`]).
//!
//! A run sent to an agent counts against its free slots until the agent's status shows
//! it running or the store shows it left `queued` ([`Cluster::landed`]), so a burst of
//! submissions between two statuses does not overfill a host; runs sent to a host whose
//! status went stale are handed back as orphans ([`Cluster::take_orphans`]).
//!
//! Nothing here does I/O or keeps time: the scheduler role's loop, which reads the bus
//! and the store and acts on these decisions, is [`crate::scheduling`]; admission (who
//! may run at all) is [`crate::admission`].
//!
//! Not yet: memory/CPU-aware feasibility and host groups (R4), autoscaling (R5), best-of-K
//! sampling for large clusters.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::bus::HostStatus;
use crate::model::Millis;

/// The scheduler role's loop moved to [`crate::scheduling`]; these paths stay for
/// existing callers.
pub use crate::scheduling::{run_scheduler, SchedulerError};

/// A host whose last status is older than this is considered gone.
pub const STALE_AFTER_MS: Millis = 10_000;

/// What the scheduler knows about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub status: HostStatus,
    /// Runs sent to it that its status does not show yet.
    pub sent: u32,
}

impl HostView {
    /// Slots it can still take.
    pub fn free(&self) -> u32 {
        self.status
            .capacity
            .saturating_sub(self.status.running.saturating_add(self.sent))
    }

    pub fn serves(&self, language: &str) -> bool {
        self.status.warm.iter().any(|(l, _)| l == language)
    }

    pub fn is_stale(&self, now: Millis) -> bool {
        now.saturating_sub(self.status.at) > STALE_AFTER_MS
    }
}

/// Stage 1: hosts that can take an execution of `language` now.
pub fn feasible<'a>(
    hosts: impl IntoIterator<Item = &'a HostView>,
    language: &str,
    now: Millis,
) -> Vec<&'a HostView> {
    hosts
        .into_iter()
        .filter(|h| !h.status.draining && !h.is_stale(now))
        .filter(|h| h.serves(language) && h.free() > 0)
        .collect()
}

/// Stage 2: best first — most free slots (spreads load; ties by agent id, stable).
pub fn rank(mut hosts: Vec<&HostView>) -> Vec<&HostView> {
    hosts.sort_by(|a, b| {
        b.free()
            .cmp(&a.free())
            .then_with(|| a.status.agent.cmp(&b.status.agent))
    });
    hosts
}

/// Stage 3: the chosen host.
pub fn select<'a>(ranked: &[&'a HostView]) -> Option<&'a HostView> {
    ranked.first().copied()
}

/// The scheduler's view of the cluster.
#[derive(Debug, Default)]
pub struct Cluster {
    hosts: BTreeMap<String, HostView>,
    /// Executions sent and still queued as far as the scheduler knows (on the bus, or
    /// waiting at the agent for a slot): id → (agent, when).
    in_flight: HashMap<String, (String, Millis)>,
}

impl Cluster {
    /// Takes in a status (an older one than known is ignored). Runs it shows running no
    /// longer count as sent.
    pub fn observe(&mut self, status: HostStatus) {
        if let Some(h) = self.hosts.get(&status.agent) {
            if h.status.at > status.at {
                return;
            }
        }
        let agent = status.agent.clone();
        let running: HashSet<&str> = status
            .sandboxes
            .iter()
            .map(|s| s.execution_id.as_str())
            .collect();
        self.in_flight
            .retain(|id, (a, _)| *a != agent || !running.contains(id.as_str()));
        self.hosts
            .insert(agent.clone(), HostView { status, sent: 0 });
        self.recount(&agent);
    }
    /// Runs sent to `agent` that still count against it.
    /// Whether `id` was sent to an agent and has not landed yet.
    pub fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight.contains_key(id)
    }

    pub fn in_flight_on(&self, agent: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, (a, _))| a == agent)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// `id` left the queued state (it runs, ran, or was cancelled): it no longer counts
    /// as sent.
    pub fn landed(&mut self, id: &str) {
        if let Some((agent, _)) = self.in_flight.remove(id) {
            self.recount(&agent);
        }
    }

    fn recount(&mut self, agent: &str) {
        let sent = self.in_flight.values().filter(|(a, _)| a == agent).count() as u32;
        if let Some(h) = self.hosts.get_mut(agent) {
            h.sent = sent;
        }
    }

    /// The agent for an execution of `language`, if one can take it now.
    pub fn place(&self, language: &str, now: Millis) -> Option<String> {
        let ranked = rank(feasible(self.hosts.values(), language, now));
        select(&ranked).map(|h| h.status.agent.clone())
    }

    /// Records that `id` was sent to `agent`.
    pub fn sent(&mut self, id: &str, agent: &str, now: Millis) {
        self.in_flight
            .insert(id.to_string(), (agent.to_string(), now));
        if let Some(h) = self.hosts.get_mut(agent) {
            h.sent += 1;
        }
    }

    /// Executions sent to hosts that have gone stale or vanished: they may never run.
    /// They are forgotten here (the caller places them again).
    pub fn take_orphans(&mut self, now: Millis) -> Vec<String> {
        let hosts = &self.hosts;
        let orphans: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, (agent, at))| {
                now.saturating_sub(*at) > STALE_AFTER_MS
                    && !matches!(hosts.get(agent), Some(h) if !h.is_stale(now))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &orphans {
            self.landed(id);
        }
        orphans
    }

    pub fn hosts(&self) -> impl Iterator<Item = &HostView> {
        self.hosts.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::SandboxUsage;
    use crate::model::Usage;

    fn status(agent: &str, capacity: u32, running: u32, at: Millis) -> HostStatus {
        HostStatus {
            agent: agent.into(),
            at,
            capacity,
            running,
            draining: false,
            warm: vec![("r".into(), 1)],
            sandboxes: Vec::new(),
        }
    }

    fn view(s: HostStatus) -> HostView {
        HostView { status: s, sent: 0 }
    }

    #[test]
    fn feasible_filters_full_draining_stale_and_foreign_hosts() {
        let now = 100_000;
        let ok = view(status("ok", 2, 1, now));
        let full = view(status("full", 2, 2, now));
        let mut draining = view(status("draining", 4, 0, now));
        draining.status.draining = true;
        let stale = view(status("stale", 4, 0, now - STALE_AFTER_MS - 1));
        let mut bash_only = view(status("bash", 4, 0, now));
        bash_only.status.warm = vec![("bash".into(), 0)];
        let mut busy = view(status("sent", 2, 1, now));
        busy.sent = 1;
        let hosts = [ok, full, draining, stale, bash_only, busy];
        let names: Vec<&str> = feasible(&hosts, "r", now)
            .iter()
            .map(|h| h.status.agent.as_str())
            .collect();
        assert_eq!(names, ["ok"]);
        let names: Vec<&str> = feasible(&hosts, "bash", now)
            .iter()
            .map(|h| h.status.agent.as_str())
            .collect();
        assert_eq!(names, ["bash"]);
    }

    #[test]
    fn rank_puts_most_free_first_and_breaks_ties_by_name() {
        let hosts = [
            view(status("b", 4, 2, 0)),
            view(status("a", 4, 2, 0)),
            view(status("c", 8, 1, 0)),
        ];
        let ranked = rank(hosts.iter().collect());
        let names: Vec<&str> = ranked.iter().map(|h| h.status.agent.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        assert_eq!(select(&ranked).unwrap().status.agent, "c");
        assert!(select(&[]).is_none());
    }

    #[test]
    fn cluster_counts_sent_runs_until_they_show_or_land() {
        let mut c = Cluster::default();
        c.observe(status("a", 2, 0, 1_000));
        assert_eq!(c.place("r", 1_000).as_deref(), Some("a"));
        c.sent("x1", "a", 1_001);
        c.sent("x2", "a", 1_002);
        // Two sent, none reported yet: full, even after a newer status without them
        // (they may be waiting at the agent for a slot).
        assert_eq!(c.place("r", 1_003), None);
        c.observe(status("a", 2, 0, 1_005));
        assert_eq!(c.place("r", 1_005), None);
        assert_eq!(c.in_flight_on("a"), ["x1", "x2"]);
        // x2 shows as running: it counts through `running` now, not as sent.
        let mut s = status("a", 2, 1, 1_010);
        s.sandboxes.push(SandboxUsage {
            execution_id: "x2".into(),
            org: "o".into(),
            user: "u".into(),
            usage: Usage::default(),
        });
        c.observe(s);
        assert_eq!(c.hosts().next().unwrap().sent, 1);
        assert_eq!(c.place("r", 1_010), None);
        // x1 ran and finished between two statuses: the store says so.
        c.landed("x1");
        assert_eq!(c.hosts().next().unwrap().sent, 0);
        assert_eq!(c.place("r", 1_010).as_deref(), Some("a"));
        // Older statuses are ignored.
        c.observe(status("a", 2, 2, 900));
        assert_eq!(c.place("r", 1_010).as_deref(), Some("a"));
    }

    #[test]
    fn runs_sent_to_a_vanished_host_are_orphans() {
        let mut c = Cluster::default();
        c.observe(status("a", 2, 0, 1_000));
        c.observe(status("b", 2, 0, 1_000));
        c.sent("x", "a", 1_000);
        c.sent("y", "b", 1_000);
        assert!(c.take_orphans(1_000 + STALE_AFTER_MS).is_empty());
        // b keeps reporting (and still has y waiting), a went silent.
        let later = 1_000 + STALE_AFTER_MS + 5;
        c.observe(status("b", 2, 0, later));
        assert_eq!(c.take_orphans(later), vec!["x".to_string()]);
        assert!(c.take_orphans(later).is_empty());
        assert_eq!(c.in_flight_on("b"), ["y"]);
        // a is stale; b has one slot left besides y.
        assert_eq!(c.place("r", later).as_deref(), Some("b"));
        c.sent("z", "b", later);
        assert_eq!(c.place("r", later), None);
    }
}
