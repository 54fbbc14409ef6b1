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
//! [`Cluster::place`] runs the three stages as one pass over every host ([`best`]); at
//! about 1,300 hosts that costs tens of microseconds (the cluster simulation measures
//! it: `cargo bench -p hatchery-scheduler --bench fleet_sim`), so there is no sampling
//! of a few hosts (best-of-K) yet.

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
    /// What the limits of its running executions take (`status.used()`, summed once).
    used: Resources,
    /// The store asks it to take no new work (see [`Cluster::withhold`]).
    withheld: bool,
}

impl HostView {
    /// The view of a host from its status, nothing sent to it yet.
    pub fn new(status: HostStatus) -> HostView {
        HostView {
            used: status.used(),
            status,
            sent: 0,
            sent_need: Resources::default(),
            withheld: false,
        }
    }

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
        let used = self.used.plus(&self.sent_need);
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

    /// Whether it belongs to one of `groups` (`None`: any host will do; a host of no
    /// group belongs to none).
    pub fn in_groups(&self, groups: Option<&[String]>) -> bool {
        match groups {
            None => true,
            Some(groups) => self
                .status
                .group
                .as_ref()
                .is_some_and(|g| groups.contains(g)),
        }
    }

    pub fn is_stale(&self, now: Millis) -> bool {
        now.saturating_sub(self.status.at) > STALE_AFTER_MS
    }
}

/// Stage 1: hosts that can take an execution of `language` needing `need` now, among
/// those of the groups its policy allows (`groups`; `None`: any host, grouped or not).
pub fn feasible<'a>(
    hosts: impl IntoIterator<Item = &'a HostView>,
    language: &str,
    need: &Resources,
    groups: Option<&[String]>,
    now: Millis,
) -> Vec<&'a HostView> {
    hosts
        .into_iter()
        .filter(|h| takes(h, language, groups, now) && h.fits(need))
        .collect()
}

/// Stage 1 but for the resources: alive, neither draining nor withheld, of an allowed
/// group, serving the language, with a free slot.
fn takes(h: &HostView, language: &str, groups: Option<&[String]>, now: Millis) -> bool {
    !h.withheld
        && !h.status.draining
        && !h.is_stale(now)
        && h.in_groups(groups)
        && h.serves(language)
        && h.free() > 0
}

/// Where a host ranks (lower first), given its room.
type RankKey<'a> = (bool, u64, u64, u32, &'a str);

fn rank_key(h: &HostView, room: Option<Resources>) -> RankKey<'_> {
    (
        room.is_none(),
        room.map_or(0, |r| r.memory_bytes),
        room.map_or(0, |r| (r.cpus * 1000.0).round() as u64),
        h.free(),
        h.status.agent.as_str(),
    )
}

/// Stage 2: best fit first — the least memory left, then the fewest CPUs left, then
/// the fewest free slots (hosts that do not report resources come after those that do);
/// ties by agent id, stable.
pub fn rank(mut hosts: Vec<&HostView>) -> Vec<&HostView> {
    // Each host's room is summed once, not at every comparison.
    hosts.sort_by_cached_key(|h| rank_key(h, h.room()));
    hosts
}

/// Stage 3: the chosen host.
pub fn select<'a>(ranked: &[&'a HostView]) -> Option<&'a HostView> {
    ranked.first().copied()
}

/// The three stages in one pass: the host `select(&rank(feasible(..)))` chooses, found
/// without sorting or allocating (each host's room summed once). What placement runs:
/// at a thousand hosts the sort and the vectors were most of a placement's cost.
pub fn best<'a>(
    hosts: impl IntoIterator<Item = &'a HostView>,
    language: &str,
    need: &Resources,
    groups: Option<&[String]>,
    now: Millis,
) -> Option<&'a HostView> {
    let mut best: Option<(RankKey<'a>, &'a HostView)> = None;
    for h in hosts {
        if !takes(h, language, groups, now) {
            continue;
        }
        let room = h.room();
        if room.is_some_and(|r| !need.fits_in(&r)) {
            continue;
        }
        let key = rank_key(h, room);
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, h));
        }
    }
    best.map(|(_, h)| h)
}

/// What found no host in one placement pass, per language and allowed groups: a later
/// execution of the same pass that needs at least as much in both memory and CPUs finds
/// none either, and is not tried. One that needs less (or may use other groups) still
/// is, so a large request waiting for room does not hold up small ones.
#[derive(Debug, Default)]
pub struct Misses(Vec<Miss>);

#[derive(Debug)]
struct Miss {
    language: String,
    /// `None`: whatever the groups.
    groups: Option<Option<Vec<String>>>,
    need: Resources,
}

impl Misses {
    /// Whether an execution like this one is known to find no host in this pass.
    pub fn covers(&self, language: &str, groups: Option<&[String]>, need: &Resources) -> bool {
        self.0.iter().any(|m| {
            m.language == language
                && m.groups.as_ref().is_none_or(|g| g.as_deref() == groups)
                && m.need.fits_in(need)
        })
    }

    /// An execution of `language` needing `need`, on `groups`, found no host.
    pub fn missed(&mut self, language: &str, groups: Option<&[String]>, need: &Resources) {
        self.0.push(Miss {
            language: language.to_string(),
            groups: Some(groups.map(<[String]>::to_vec)),
            need: *need,
        });
    }

    /// A host was chosen but could not be reached: nothing more of `language` is tried.
    pub fn unreachable(&mut self, language: &str) {
        self.0.push(Miss {
            language: language.to_string(),
            groups: None,
            need: Resources::default(),
        });
    }
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
    /// Hosts the store asks to take no new work (cordoned, draining, terminating, gone):
    /// none is placed on them, whatever their last status says (they learn it at their
    /// next heartbeat).
    withheld: std::collections::HashSet<String>,
}

impl Cluster {
    /// The hosts placement must skip from now on (replaces the previous set).
    pub fn withhold(&mut self, hosts: std::collections::HashSet<String>) {
        for h in self.hosts.values_mut() {
            h.withheld = hosts.contains(&h.status.agent);
        }
        self.withheld = hosts;
    }

    /// Placement skips `agent` from now on (it was asked to drain).
    pub fn hold(&mut self, agent: &str) {
        self.withheld.insert(agent.to_string());
        if let Some(h) = self.hosts.get_mut(agent) {
            h.withheld = true;
        }
    }

    /// Placement may use `agent` again (its drain was cancelled).
    pub fn release(&mut self, agent: &str) {
        self.withheld.remove(agent);
        if let Some(h) = self.hosts.get_mut(agent) {
            h.withheld = false;
        }
    }

    /// What is known of one host.
    pub fn host(&self, agent: &str) -> Option<&HostView> {
        self.hosts.get(agent)
    }

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
        let mut view = HostView::new(status);
        view.withheld = self.withheld.contains(&agent);
        self.hosts.insert(agent.clone(), view);
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

    /// The agent for an execution of `language` needing `need`, on a host of one of
    /// `groups` (`None`: any), if one can take it now.
    pub fn place(
        &self,
        language: &str,
        need: &Resources,
        groups: Option<&[String]>,
        now: Millis,
    ) -> Option<String> {
        best(self.hosts.values(), language, need, groups, now).map(|h| h.status.agent.clone())
    }

    /// The same choice as [`place`](Self::place) through the three stages one after the
    /// other (vectors and a sort): what placement did before [`best`]; the cluster
    /// simulation times both side by side.
    pub fn place_in_stages(
        &self,
        language: &str,
        need: &Resources,
        groups: Option<&[String]>,
        now: Millis,
    ) -> Option<String> {
        let open = self.hosts.values().filter(|h| !h.withheld);
        select(&rank(feasible(open, language, need, groups, now))).map(|h| h.status.agent.clone())
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
        HostView::new(s)
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
        let names: Vec<&str> = feasible(&hosts, "r", &one, None, now)
            .iter()
            .map(|h| h.status.agent.as_str())
            .collect();
        assert_eq!(names, ["ok"]);
        let names: Vec<&str> = feasible(&hosts, "bash", &one, None, now)
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
        let fits = |n: Resources| !feasible(&hosts, "r", &n, None, now).is_empty();
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
        assert_eq!(c.place("r", &need(6, 1.0), None, now), Some("a".into()));
        assert_eq!(c.place("r", &need(7, 1.0), None, now), None);
        c.landed("x");
        assert_eq!(c.place("r", &need(16, 4.0), None, now), Some("a".into()));
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
        assert_eq!(c.place("r", &need(200, 8.0), None, now), Some("big".into()));
        assert_eq!(c.place("r", &need(1, 1.0), None, now), Some("small".into()));
        assert_eq!(c.place("r", &need(300, 1.0), None, now), None);
    }

    #[test]
    fn best_chooses_what_the_three_stages_choose() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let now = 100_000;
        for round in 0..200 {
            let mut cluster = Cluster::default();
            let n = rng.gen_range(1..40);
            for i in 0..n {
                let memory = [1u64, 2, 4, 8][rng.gen_range(0..4)];
                let runs: Vec<(u64, f64)> = (0..rng.gen_range(0..3))
                    .map(|_| {
                        (
                            rng.gen_range(0..=memory / 2),
                            rng.gen_range(0..3) as f64 * 0.5,
                        )
                    })
                    .collect();
                let mut s = host(&format!("h{i:02}"), memory, 4.0, &runs, now - 1_000);
                s.draining = rng.gen_bool(0.1);
                if rng.gen_bool(0.1) {
                    s.at = now - 2 * STALE_AFTER_MS;
                }
                if rng.gen_bool(0.1) {
                    s.allocatable = Resources::default();
                }
                cluster.observe(s);
                if rng.gen_bool(0.1) {
                    cluster.hold(&format!("h{i:02}"));
                }
            }
            let want = need(rng.gen_range(0..4), rng.gen_range(0..4) as f64 * 0.5);
            let open: Vec<&HostView> = cluster.hosts().filter(|h| !h.withheld).collect();
            let staged = select(&rank(feasible(open, "r", &want, None, now)))
                .map(|h| h.status.agent.clone());
            assert_eq!(cluster.place_in_stages("r", &want, None, now), staged);
            assert_eq!(
                cluster.place("r", &want, None, now),
                staged,
                "round {round}"
            );
        }
    }

    #[test]
    fn cluster_counts_sent_runs_until_they_show_or_land() {
        let one = need(1, 1.0);
        let mut c = Cluster::default();
        c.observe(status("a", 2, 0, 1_000));
        assert_eq!(c.place("r", &one, None, 1_000).as_deref(), Some("a"));
        c.sent("x1", "a", one, 1_001);
        c.sent("x2", "a", one, 1_002);
        // Two sent, none reported yet: full, even after a newer status without them
        // (they may be waiting at the agent for a slot).
        assert_eq!(c.place("r", &one, None, 1_003), None);
        c.observe(status("a", 2, 0, 1_005));
        assert_eq!(c.place("r", &one, None, 1_005), None);
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
        assert_eq!(c.place("r", &one, None, 1_010), None);
        // x1 ran and finished between two statuses: the store says so.
        c.landed("x1");
        assert_eq!(c.hosts().next().unwrap().sent, 0);
        assert_eq!(c.place("r", &one, None, 1_010).as_deref(), Some("a"));
        // Older statuses are ignored.
        c.observe(status("a", 2, 2, 900));
        assert_eq!(c.place("r", &one, None, 1_010).as_deref(), Some("a"));
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
        assert_eq!(c.place("r", &one, None, later).as_deref(), Some("b"));
        c.sent("z", "b", one, later);
        assert_eq!(c.place("r", &one, None, later), None);
    }
}
