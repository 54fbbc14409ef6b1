//! Placement, pure: which agent takes an execution, chosen from the agents' latest
//! [`HostStatus`] in three small stages (Nomad's shape): [`feasible`] (alive, not
//! draining, serves the language, has a free slot, and the execution's memory and CPUs
//! fit in what the host has left: its allocatable resources less the limits of what runs
//! there and of what was sent to it) → [`rank`] (best fit: the host left with the least
//! memory, then the fewest CPUs, so that work packs onto few hosts and the others can
//! empty out) → [`select`] (the best), over the scheduler's view of the cluster
//! ([`Cluster`]).
//!
//! A run sent to an agent counts against its free slots and resources until the agent's
//! status shows it running or the store shows it left `queued` ([`Cluster::landed`]), so
//! a burst of submissions between two statuses does not overfill a host; runs sent to a
//! host whose status went stale are handed back as orphans ([`Cluster::take_orphans`]).
//!
//! Nothing here does I/O or keeps time: the scheduler role's loop, which reads the bus
//! and the store and acts on these decisions, is [`crate::scheduling`]; admission (who
//! may run at all) is [`crate::admission`].
//!
//! Not yet: host groups and their autoscaling (R4, R5), best-of-K sampling for large
//! clusters.

use std::collections::{BTreeMap, HashMap};

use crate::bus::HostStatus;
use crate::model::{Millis, Resources};

/// The scheduler role's loop moved to [`crate::scheduling`]; these paths stay for
/// existing callers.
pub use crate::scheduling::{run_scheduler, SchedulerError};

/// A host whose last status is older than this is considered gone.
pub const STALE_AFTER_MS: Millis = 10_000;

/// What the scheduler knows about one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    pub status: HostStatus,
    /// Runs sent to it that its status does not show yet, and what they take.
    pub sent: u32,
    pub sent_need: Resources,
}

impl HostView {
    /// Slots it can still take.
    pub fn free(&self) -> u32 {
        self.status
            .capacity
            .saturating_sub(self.status.running.saturating_add(self.sent))
    }

    /// What it has left for one more execution: its allocatable resources less the
    /// limits of what runs and of what was sent to it. `None` for a host that does not
    /// report its resources (placed by slots only).
    pub fn room(&self) -> Option<Resources> {
        if self.status.allocatable.is_zero() {
            return None;
        }
        let used = self.status.used().plus(&self.sent_need);
        Some(self.status.allocatable.minus(&used))
    }

    /// Whether `need` fits in what it has left.
    pub fn fits(&self, need: &Resources) -> bool {
        match self.room() {
            Some(room) => need.fits_in(&room),
            None => true,
        }
    }

    pub fn serves(&self, language: &str) -> bool {
        self.status.warm.iter().any(|(l, _)| l == language)
    }

    pub fn is_stale(&self, now: Millis) -> bool {
        now.saturating_sub(self.status.at) > STALE_AFTER_MS
    }
}

/// Stage 1: hosts that can take an execution of `language` needing `need` now.
pub fn feasible<'a>(
    hosts: impl IntoIterator<Item = &'a HostView>,
    language: &str,
    need: &Resources,
    now: Millis,
) -> Vec<&'a HostView> {
    hosts
        .into_iter()
        .filter(|h| !h.status.draining && !h.is_stale(now))
        .filter(|h| h.serves(language) && h.free() > 0 && h.fits(need))
        .collect()
}

/// Stage 2: best fit first — the least memory left, then the fewest CPUs left, then
/// the fewest free slots (hosts that do not report resources come after those that do);
/// ties by agent id, stable.
pub fn rank(mut hosts: Vec<&HostView>) -> Vec<&HostView> {
    // Each host's room is summed once, not at every comparison.
    hosts.sort_by_cached_key(|h| {
        let room = h.room();
        (
            room.is_none(),
            room.map_or(0, |r| r.memory_bytes),
            room.map_or(0, |r| (r.cpus * 1000.0).round() as u64),
            h.free(),
            h.status.agent.as_str(),
        )
    });
    hosts
}

/// Stage 3: the chosen host.
pub fn select<'a>(ranked: &[&'a HostView]) -> Option<&'a HostView> {
    ranked.first().copied()
}

/// A run sent to an agent that its status does not show yet.
#[derive(Debug, Clone)]
struct Sent {
    agent: String,
    at: Millis,
    need: Resources,
}

/// The scheduler's view of the cluster.
#[derive(Debug, Default)]
pub struct Cluster {
    hosts: BTreeMap<String, HostView>,
    /// Executions sent and still queued as far as the scheduler knows (on the bus, or
    /// waiting at the agent for a slot).
    in_flight: HashMap<String, Sent>,
}

impl Cluster {
    /// Takes in a status (an older one than known is ignored). Runs it shows running no
    /// longer count as sent: the status counts them (with their limits).
    pub fn observe(&mut self, status: HostStatus) {
        if let Some(h) = self.hosts.get(&status.agent) {
            if h.status.at > status.at {
                return;
            }
        }
        let agent = status.agent.clone();
        let running: std::collections::HashSet<&str> = status
            .sandboxes
            .iter()
            .map(|s| s.execution_id.as_str())
            .collect();
        self.in_flight
            .retain(|id, s| s.agent != agent || !running.contains(id.as_str()));
        self.hosts.insert(
            agent.clone(),
            HostView {
                status,
                sent: 0,
                sent_need: Resources::default(),
            },
        );
        self.recount(&agent);
    }

    /// Whether `id` was sent to an agent and has not landed yet.
    pub fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight.contains_key(id)
    }

    /// Runs sent to `agent` that still count against it.
    pub fn in_flight_on(&self, agent: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, s)| s.agent == agent)
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// `id` left the queued state (it runs, ran, or was cancelled): it no longer counts
    /// as sent.
    pub fn landed(&mut self, id: &str) {
        if let Some(s) = self.in_flight.remove(id) {
            self.recount(&s.agent);
        }
    }

    fn recount(&mut self, agent: &str) {
        let (sent, need) = self
            .in_flight
            .values()
            .filter(|s| s.agent == agent)
            .fold((0u32, Resources::default()), |(n, sum), s| {
                (n + 1, sum.plus(&s.need))
            });
        if let Some(h) = self.hosts.get_mut(agent) {
            h.sent = sent;
            h.sent_need = need;
        }
    }

    /// The agent for an execution of `language` needing `need`, if one can take it now.
    pub fn place(&self, language: &str, need: &Resources, now: Millis) -> Option<String> {
        let ranked = rank(feasible(self.hosts.values(), language, need, now));
        select(&ranked).map(|h| h.status.agent.clone())
    }

    /// Records that `id`, needing `need`, was sent to `agent`.
    pub fn sent(&mut self, id: &str, agent: &str, need: Resources, now: Millis) {
        self.in_flight.insert(
            id.to_string(),
            Sent {
                agent: agent.to_string(),
                at: now,
                need,
            },
        );
        self.recount(agent);
    }

    /// Executions sent to hosts that have gone stale or vanished: they may never run.
    /// They are forgotten here (the caller places them again).
    pub fn take_orphans(&mut self, now: Millis) -> Vec<String> {
        let hosts = &self.hosts;
        let orphans: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, s)| {
                now.saturating_sub(s.at) > STALE_AFTER_MS
                    && !matches!(hosts.get(&s.agent), Some(h) if !h.is_stale(now))
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

    const GIB: u64 = 1 << 30;

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

    /// A host of `memory` GiB and `cpus` CPUs (8 slots) running executions of these
    /// (GiB, cpus).
    fn host(agent: &str, memory: u64, cpus: f64, runs: &[(u64, f64)], at: Millis) -> HostStatus {
        let mut s = status(agent, 8, runs.len() as u32, at);
        s.allocatable = Resources::new(memory * GIB, cpus);
        s.sandboxes = runs
            .iter()
            .enumerate()
            .map(|(i, (m, c))| SandboxUsage {
                execution_id: format!("{agent}-run{i}"),
                org: "o".into(),
                user: "u".into(),
                usage: Usage::default(),
                limits: Resources::new(m * GIB, *c),
            })
            .collect();
        s
    }

    fn view(s: HostStatus) -> HostView {
        HostView {
            status: s,
            sent: 0,
            sent_need: Resources::default(),
        }
    }

    fn need(memory_gib: u64, cpus: f64) -> Resources {
        Resources::new(memory_gib * GIB, cpus)
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
        let one = need(1, 1.0);
        let names: Vec<&str> = feasible(&hosts, "r", &one, now)
            .iter()
            .map(|h| h.status.agent.as_str())
            .collect();
        assert_eq!(names, ["ok"]);
        let names: Vec<&str> = feasible(&hosts, "bash", &one, now)
            .iter()
            .map(|h| h.status.agent.as_str())
            .collect();
        assert_eq!(names, ["bash"]);
    }

    #[test]
    fn feasible_counts_memory_and_cpus_left_after_what_runs_and_what_was_sent() {
        let now = 100_000;
        // 16 GiB / 4 cpus running 8 GiB / 1 cpu and 4 GiB / 2 cpus: 4 GiB and 1 cpu left.
        let a = view(host("a", 16, 4.0, &[(8, 1.0), (4, 2.0)], now));
        assert_eq!(a.room(), Some(need(4, 1.0)));
        let hosts = [a];
        let fits = |n: Resources| !feasible(&hosts, "r", &n, now).is_empty();
        assert!(fits(need(4, 1.0)));
        assert!(!fits(need(5, 0.5)), "memory is counted");
        assert!(!fits(need(1, 1.5)), "cpus are counted");
        // Fractions add up without rounding trouble.
        let tenths = view(host("t", 4, 0.3, &[(1, 0.1), (1, 0.1)], now));
        assert!(tenths.fits(&need(1, 0.1)));
        // What was sent and is not in the status yet counts too.
        let mut c = Cluster::default();
        c.observe(host("a", 16, 4.0, &[], now));
        c.sent("x", "a", need(10, 1.0), now);
        assert_eq!(c.place("r", &need(6, 1.0), now), Some("a".into()));
        assert_eq!(c.place("r", &need(7, 1.0), now), None);
        c.landed("x");
        assert_eq!(c.place("r", &need(16, 4.0), now), Some("a".into()));
        // A host that reports no resources is placed by slots only.
        let legacy = view(status("legacy", 2, 0, now));
        assert!(legacy.fits(&need(1024, 512.0)));
    }

    #[test]
    fn rank_packs_best_fit_first_and_breaks_ties_by_name() {
        let now = 0;
        let hosts = [
            view(host("roomy", 64, 16.0, &[], now)),
            view(host("b", 16, 4.0, &[(8, 1.0)], now)),
            view(host("a", 16, 4.0, &[(8, 1.0)], now)),
            view(host("tight", 16, 4.0, &[(8, 1.0), (4, 1.0)], now)),
            view(status("legacy", 8, 0, now)),
        ];
        let ranked = rank(hosts.iter().collect());
        let names: Vec<&str> = ranked.iter().map(|h| h.status.agent.as_str()).collect();
        assert_eq!(names, ["tight", "a", "b", "roomy", "legacy"]);
        assert_eq!(select(&ranked).unwrap().status.agent, "tight");
        assert!(select(&[]).is_none());
        // A 200 GiB request goes to the one host that holds it, however busy the others.
        let mut c = Cluster::default();
        c.observe(host("small", 8, 2.0, &[], now));
        c.observe(host("big", 256, 32.0, &[(16, 2.0)], now));
        assert_eq!(c.place("r", &need(200, 8.0), now), Some("big".into()));
        assert_eq!(c.place("r", &need(1, 1.0), now), Some("small".into()));
        assert_eq!(c.place("r", &need(300, 1.0), now), None);
    }

    #[test]
    fn cluster_counts_sent_runs_until_they_show_or_land() {
        let one = need(1, 1.0);
        let mut c = Cluster::default();
        c.observe(status("a", 2, 0, 1_000));
        assert_eq!(c.place("r", &one, 1_000).as_deref(), Some("a"));
        c.sent("x1", "a", one, 1_001);
        c.sent("x2", "a", one, 1_002);
        // Two sent, none reported yet: full, even after a newer status without them
        // (they may be waiting at the agent for a slot).
        assert_eq!(c.place("r", &one, 1_003), None);
        c.observe(status("a", 2, 0, 1_005));
        assert_eq!(c.place("r", &one, 1_005), None);
        assert_eq!(c.in_flight_on("a"), ["x1", "x2"]);
        // x2 shows as running: it counts through `running` now, not as sent.
        let mut s = status("a", 2, 1, 1_010);
        s.sandboxes.push(SandboxUsage {
            execution_id: "x2".into(),
            org: "o".into(),
            user: "u".into(),
            usage: Usage::default(),
            limits: one,
        });
        c.observe(s);
        assert_eq!(c.hosts().next().unwrap().sent, 1);
        assert_eq!(c.place("r", &one, 1_010), None);
        // x1 ran and finished between two statuses: the store says so.
        c.landed("x1");
        assert_eq!(c.hosts().next().unwrap().sent, 0);
        assert_eq!(c.place("r", &one, 1_010).as_deref(), Some("a"));
        // Older statuses are ignored.
        c.observe(status("a", 2, 2, 900));
        assert_eq!(c.place("r", &one, 1_010).as_deref(), Some("a"));
    }

    #[test]
    fn runs_sent_to_a_vanished_host_are_orphans() {
        let one = need(1, 1.0);
        let mut c = Cluster::default();
        c.observe(status("a", 2, 0, 1_000));
        c.observe(status("b", 2, 0, 1_000));
        c.sent("x", "a", one, 1_000);
        c.sent("y", "b", one, 1_000);
        assert!(c.take_orphans(1_000 + STALE_AFTER_MS).is_empty());
        // b keeps reporting (and still has y waiting), a went silent.
        let later = 1_000 + STALE_AFTER_MS + 5;
        c.observe(status("b", 2, 0, later));
        assert_eq!(c.take_orphans(later), vec!["x".to_string()]);
        assert!(c.take_orphans(later).is_empty());
        assert_eq!(c.in_flight_on("b"), ["y"]);
        // a is stale; b has one slot left besides y.
        assert_eq!(c.place("r", &one, later).as_deref(), Some("b"));
        c.sent("z", "b", one, later);
        assert_eq!(c.place("r", &one, later), None);
    }
}
