//! The autoscaler's decisions, pure (R4, R5, R7): from the host groups, the hosts they
//! have (ready, cordoned, draining, on their way), the executions that wait because no
//! live host can take them, and the clock, [`plan`] says which groups launch how many
//! hosts, which drains are cancelled, which hosts start draining and which drained hosts
//! are terminated. Nothing here does I/O: whoever runs it acts on the plan through the
//! store (host states) and a provider (launch, terminate), and feeds the next pass what
//! came of it. The platform's admission and `GET /v1/admin/groups` use
//! [`smallest_fit`]; no loop runs `plan` yet, since no provider launches hosts yet.
//!
//! The rules, in order:
//!
//! 1. **Demand goes to the smallest group that fits.** Each waiting execution is counted
//!    against the smallest group (memory, then CPUs, then name) that serves its language
//!    and whose shape holds its limits; one that fits no group is reported, not counted
//!    (admission refuses those: 422 `exceeds_largest_group`).
//! 2. **Capacity that exists is used first**, in this order: room on the group's hosts
//!    that are on their way (so a burst never launches twice for the same demand), then
//!    room on its draining hosts — whose drain is then cancelled instead of launching a
//!    host. Whatever is left is packed (first fit, largest first) onto new hosts of the
//!    group's shape: that many are launched, within `max` and the scale-up cooldown.
//! 3. **`min`** hosts are kept per group (launched if fewer, never drained below).
//! 4. **Scale-down takes only empty hosts**: a ready host with nothing running for
//!    `scale_down_after`, not needed by the demand, is drained (one per group per pass,
//!    after the scale-down cooldown, never below `min`). A draining host is terminated
//!    only once nothing runs on it — however long its executions take. Warm sandboxes
//!    are not work.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{HostState, Millis, Resources};

/// A host group: hosts of one shape, scaled together.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroupConfig {
    pub name: String,
    /// What each of its hosts has for executions.
    pub shape: Resources,
    /// The languages its hosts serve.
    pub languages: Vec<String>,
    pub min: u32,
    pub max: u32,
    /// How long a host must be empty before it is drained.
    pub scale_down_after: Duration,
    /// The least time between two launches, and between two drains, of the group.
    pub cooldown_up: Duration,
    pub cooldown_down: Duration,
}

impl GroupConfig {
    fn serves(&self, language: &str) -> bool {
        self.languages.iter().any(|l| l == language)
    }

    fn holds(&self, need: &Resources) -> bool {
        need.fits_in(&self.shape)
    }
}

/// Where a host of a group is in its life, as the autoscaler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Launched, not reporting yet.
    Provisioning,
    /// Reporting; in the state the store asks of it.
    Up(HostState),
    /// Being terminated (or gone): counts for nothing.
    Terminating,
}

/// One host of a group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupHost {
    pub name: String,
    pub group: String,
    pub phase: Phase,
    /// What the limits of its running executions take, and how many run.
    pub used: Resources,
    pub running: u32,
    /// Since when nothing has run on it (`None` while something runs).
    pub empty_since: Option<Millis>,
}

/// An execution waiting because no live host can take it now.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    pub id: String,
    pub language: String,
    pub need: Resources,
}

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Hosts to launch, per group.
    pub launch: BTreeMap<String, u32>,
    /// Draining hosts the demand needs: their drain is cancelled (back to ready).
    pub cancel_drain: Vec<String>,
    /// Empty hosts to drain.
    pub drain: Vec<String>,
    /// Drained hosts (draining, nothing running) to terminate.
    pub terminate: Vec<String>,
    /// Waiting executions that fit no group.
    pub unplaceable: Vec<String>,
    /// Per group: the demand counted against it (executions, and their summed needs).
    pub demand: BTreeMap<String, (u32, Resources)>,
}

/// When each group last launched and last drained (cooldowns).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub last_up: BTreeMap<String, Millis>,
    pub last_down: BTreeMap<String, Millis>,
}

impl History {
    /// Records what was done of `plan` at `now`.
    pub fn record(&mut self, plan: &Plan, hosts: &[GroupHost], now: Millis) {
        for (group, n) in &plan.launch {
            if *n > 0 {
                self.last_up.insert(group.clone(), now);
            }
        }
        for name in &plan.drain {
            if let Some(h) = hosts.iter().find(|h| h.name == *name) {
                self.last_down.insert(h.group.clone(), now);
            }
        }
    }

    fn cooling(
        map: &BTreeMap<String, Millis>,
        group: &str,
        cooldown: Duration,
        now: Millis,
    ) -> bool {
        map.get(group)
            .is_some_and(|at| now.saturating_sub(*at) < cooldown.as_millis() as u64)
    }
}

/// The smallest group (memory, then CPUs, then name) that serves `language` and holds
/// `need`.
pub fn smallest_fit<'a>(
    groups: &'a [GroupConfig],
    language: &str,
    need: &Resources,
) -> Option<&'a GroupConfig> {
    groups
        .iter()
        .filter(|g| g.serves(language) && g.holds(need))
        .min_by(|a, b| a.shape.cmp_size(&b.shape).then(a.name.cmp(&b.name)))
}

/// Bins of room, filled first fit.
struct Bins(Vec<(Option<String>, Resources)>);

impl Bins {
    /// Puts `need` into the first bin it fits; which one.
    fn put(&mut self, need: &Resources) -> Option<usize> {
        let i = self.0.iter().position(|(_, room)| need.fits_in(room))?;
        self.0[i].1 = self.0[i].1.minus(need);
        Some(i)
    }
}

/// One autoscaler pass. See the module documentation for the rules.
pub fn plan(
    groups: &[GroupConfig],
    hosts: &[GroupHost],
    pending: &[Pending],
    history: &History,
    now: Millis,
) -> Plan {
    let mut plan = Plan::default();
    // 1. Demand per group, largest first within each (first fit decreasing).
    let mut by_group: BTreeMap<&str, Vec<&Pending>> = BTreeMap::new();
    for p in pending {
        match smallest_fit(groups, &p.language, &p.need) {
            Some(g) => by_group.entry(g.name.as_str()).or_default().push(p),
            None => plan.unplaceable.push(p.id.clone()),
        }
    }
    for g in groups {
        let mut needs = by_group.remove(g.name.as_str()).unwrap_or_default();
        needs.sort_by(|a, b| b.need.cmp_size(&a.need).then(a.id.cmp(&b.id)));
        let total = needs
            .iter()
            .fold(Resources::default(), |sum, p| sum.plus(&p.need));
        if !needs.is_empty() {
            plan.demand
                .insert(g.name.clone(), (needs.len() as u32, total));
        }
        let mine: Vec<&GroupHost> = hosts.iter().filter(|h| h.group == g.name).collect();
        let counted = mine
            .iter()
            .filter(|h| h.phase != Phase::Terminating)
            .count() as u32;

        // 2. Room on hosts on their way, then on draining hosts, then new hosts.
        let mut bins = Bins(Vec::new());
        for h in mine.iter().filter(|h| h.phase == Phase::Provisioning) {
            bins.0.push((None, g.shape.minus(&h.used)));
        }
        let mut draining: Vec<&&GroupHost> = mine
            .iter()
            .filter(|h| h.phase == Phase::Up(HostState::Draining))
            .collect();
        // The emptiest first: it has the most room.
        draining.sort_by(|a, b| {
            a.used
                .memory_bytes
                .cmp(&b.used.memory_bytes)
                .then(a.name.cmp(&b.name))
        });
        for h in &draining {
            bins.0.push((Some(h.name.clone()), g.shape.minus(&h.used)));
        }
        let existing = bins.0.len();
        let mut new_hosts = 0u32;
        let mut revived: Vec<String> = Vec::new();
        for p in &needs {
            match bins.put(&p.need) {
                Some(i) if i < existing => {
                    if let Some(name) = &bins.0[i].0 {
                        if !revived.contains(name) {
                            revived.push(name.clone());
                        }
                    }
                }
                Some(_) => {}
                None => {
                    bins.0.push((None, g.shape.minus(&p.need)));
                    new_hosts += 1;
                }
            }
        }
        plan.cancel_drain.extend(revived.iter().cloned());

        // 3. min, then max and the cooldown.
        let below_min = g.min.saturating_sub(counted);
        let mut launch = new_hosts.max(below_min);
        launch = launch.min(g.max.saturating_sub(counted));
        if launch > below_min && History::cooling(&history.last_up, &g.name, g.cooldown_up, now) {
            launch = below_min.min(g.max.saturating_sub(counted));
        }
        if launch > 0 {
            plan.launch.insert(g.name.clone(), launch);
        }

        // 4. Terminate drained hosts not revived; drain one long-empty host if the group
        //    has more than it needs.
        for h in &draining {
            if h.running == 0 && !revived.contains(&h.name) {
                plan.terminate.push(h.name.clone());
            }
        }
        let ready_after_drains = counted - draining.len() as u32 + revived.len() as u32
            - mine
                .iter()
                .filter(|h| h.phase == Phase::Up(HostState::Cordoned))
                .count() as u32;
        let demand_wants_room = new_hosts > 0 || !needs.is_empty();
        let cooling_down = History::cooling(&history.last_down, &g.name, g.cooldown_down, now);
        if !demand_wants_room && !cooling_down && launch == 0 && ready_after_drains > g.min {
            let after = g.scale_down_after.as_millis() as u64;
            let mut idle: Vec<&&GroupHost> = mine
                .iter()
                .filter(|h| h.phase == Phase::Up(HostState::Ready) && h.running == 0)
                .filter(|h| {
                    h.empty_since
                        .is_some_and(|t| now.saturating_sub(t) >= after)
                })
                .collect();
            // The longest empty first; ties by name.
            idle.sort_by(|a, b| a.empty_since.cmp(&b.empty_since).then(a.name.cmp(&b.name)));
            if let Some(h) = idle.first() {
                plan.drain.push(h.name.clone());
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIN: u64 = 60_000;

    fn group(name: &str, gib: u64, cpus: f64, min: u32, max: u32) -> GroupConfig {
        GroupConfig {
            name: name.into(),
            shape: Resources::new(gib * GIB, cpus),
            languages: vec!["r".into()],
            min,
            max,
            scale_down_after: Duration::from_secs(600),
            cooldown_up: Duration::ZERO,
            cooldown_down: Duration::ZERO,
        }
    }

    fn host(
        name: &str,
        group: &str,
        phase: Phase,
        used_gib: u64,
        running: u32,
        empty_since: Option<Millis>,
    ) -> GroupHost {
        GroupHost {
            name: name.into(),
            group: group.into(),
            phase,
            used: Resources::new(used_gib * GIB, running as f64),
            running,
            empty_since,
        }
    }

    fn pending(id: &str, gib: u64, cpus: f64) -> Pending {
        Pending {
            id: id.into(),
            language: "r".into(),
            need: Resources::new(gib * GIB, cpus),
        }
    }

    fn groups() -> Vec<GroupConfig> {
        vec![
            group("big", 8, 2.0, 0, 4),
            group("small", 1, 1.0, 0, 10),
            group("huge", 256, 32.0, 0, 2),
        ]
    }

    #[test]
    fn demand_goes_to_the_smallest_group_that_fits_and_packs_onto_few_new_hosts() {
        let now = 100 * MIN;
        let p = [
            pending("a", 1, 1.0),
            pending("b", 1, 0.5),
            pending("c", 6, 1.0),
            pending("d", 3, 1.0),
            pending("e", 200, 8.0),
            pending("f", 300, 1.0),
        ];
        let plan = plan(&groups(), &[], &p, &History::default(), now);
        // small (1 GiB, 1 cpu): a and b cannot share a host (2 GiB); big: c (6) and d (3)
        // need two 8 GiB hosts; huge: one for e. f fits nowhere.
        assert_eq!(
            plan.launch,
            BTreeMap::from([("small".into(), 2), ("big".into(), 2), ("huge".into(), 1)])
        );
        assert_eq!(plan.unplaceable, ["f"]);
        assert_eq!(plan.demand["huge"], (1, Resources::new(200 * GIB, 8.0)));
        // A 200 GiB request never goes to a smaller group, even one with room.
        let hosts = [host(
            "b1",
            "big",
            Phase::Up(HostState::Ready),
            0,
            0,
            Some(0),
        )];
        let plan2 = super::plan(
            &groups(),
            &hosts,
            &[pending("e", 200, 8.0)],
            &History::default(),
            now,
        );
        assert_eq!(plan2.launch, BTreeMap::from([("huge".into(), 1)]));
    }

    #[test]
    fn hosts_on_their_way_count_so_a_burst_never_launches_twice() {
        let now = 100 * MIN;
        let p: Vec<Pending> = (0..4).map(|i| pending(&format!("x{i}"), 2, 0.5)).collect();
        // Four 2 GiB executions: one 8 GiB host holds them all.
        let first = plan(&groups(), &[], &p, &History::default(), now);
        assert_eq!(first.launch, BTreeMap::from([("big".into(), 1)]));
        // Next pass, the host is on its way and the same four still wait: nothing more.
        let hosts = [host("b1", "big", Phase::Provisioning, 0, 0, None)];
        let second = plan(&groups(), &hosts, &p, &History::default(), now + 1000);
        assert!(second.launch.is_empty(), "{second:?}");
        // A fifth does not fit in what is on its way: one more.
        let mut more = p.clone();
        more.push(pending("x4", 2, 0.5));
        let third = plan(&groups(), &hosts, &more, &History::default(), now + 2000);
        assert_eq!(third.launch, BTreeMap::from([("big".into(), 1)]));
    }

    #[test]
    fn max_min_and_the_scale_up_cooldown_bound_launches() {
        let now = 100 * MIN;
        let p: Vec<Pending> = (0..20).map(|i| pending(&format!("x{i}"), 1, 1.0)).collect();
        let mut gs = groups();
        gs[1].max = 5;
        let plan1 = plan(&gs, &[], &p, &History::default(), now);
        assert_eq!(plan1.launch["small"], 5);
        // min is kept without demand.
        gs[0].min = 2;
        let plan2 = plan(
            &gs,
            &[host(
                "b1",
                "big",
                Phase::Up(HostState::Ready),
                0,
                0,
                Some(now),
            )],
            &[],
            &History::default(),
            now,
        );
        assert_eq!(plan2.launch, BTreeMap::from([("big".into(), 1)]));
        // Within the cooldown after a launch, demand launches nothing more (min still is).
        gs[1].cooldown_up = Duration::from_secs(60);
        let mut history = History::default();
        history.record(&plan1, &[], now);
        let cooled = plan(&gs, &[], &p, &history, now + 30_000);
        assert_eq!(cooled.launch.get("small"), None);
        let warm = plan(&gs, &[], &p, &history, now + 61_000);
        assert_eq!(warm.launch["small"], 5);
    }

    #[test]
    fn only_long_empty_hosts_drain_never_below_min_and_one_per_pass() {
        let now = 100 * MIN;
        let long_ago = Some(now - 20 * MIN);
        let mut gs = groups();
        gs[0].min = 1;
        let hosts = [
            host("b1", "big", Phase::Up(HostState::Ready), 0, 0, long_ago),
            host(
                "b2",
                "big",
                Phase::Up(HostState::Ready),
                0,
                0,
                Some(now - 5 * MIN),
            ),
            host("b3", "big", Phase::Up(HostState::Ready), 4, 1, None),
            host(
                "b4",
                "big",
                Phase::Up(HostState::Ready),
                0,
                0,
                Some(now - 30 * MIN),
            ),
        ];
        let p = plan(&gs, &hosts, &[], &History::default(), now);
        // b4 has been empty the longest; b2 not long enough; b3 runs something.
        assert_eq!(p.drain, ["b4"]);
        assert!(p.launch.is_empty() && p.terminate.is_empty());
        // min 3 of 4: still one may go; min 4: none.
        gs[0].min = 4;
        assert!(plan(&gs, &hosts, &[], &History::default(), now)
            .drain
            .is_empty());
        // Waiting demand for the group: nothing drains.
        gs[0].min = 1;
        let busy = plan(
            &gs,
            &hosts,
            &[pending("x", 6, 1.0)],
            &History::default(),
            now,
        );
        assert!(busy.drain.is_empty(), "{busy:?}");
        // The scale-down cooldown: one drain, then none until it passed.
        gs[0].cooldown_down = Duration::from_secs(300);
        let mut history = History::default();
        history.record(&p, &hosts, now);
        assert!(plan(&gs, &hosts, &[], &history, now + 60_000)
            .drain
            .is_empty());
        assert_eq!(
            plan(&gs, &hosts, &[], &history, now + 301_000).drain,
            ["b4"]
        );
    }

    #[test]
    fn a_draining_host_is_terminated_only_when_empty_and_revived_when_demand_returns() {
        let now = 100 * MIN;
        let hosts = [
            host("b1", "big", Phase::Up(HostState::Draining), 6, 1, None),
            host(
                "b2",
                "big",
                Phase::Up(HostState::Draining),
                0,
                0,
                Some(now - MIN),
            ),
            host("b3", "big", Phase::Terminating, 0, 0, None),
        ];
        let p = plan(&groups(), &hosts, &[], &History::default(), now);
        // b1 still runs something (however long it takes): kept. b2 is empty: it goes.
        assert_eq!(p.terminate, ["b2"]);
        assert!(p.cancel_drain.is_empty() && p.launch.is_empty());
        // Demand returns: it fits on the draining hosts, so their drain is cancelled
        // instead of a host being launched — the emptiest first.
        let back = plan(
            &groups(),
            &hosts,
            &[pending("x", 4, 1.0)],
            &History::default(),
            now,
        );
        assert_eq!(back.cancel_drain, ["b2"]);
        assert!(
            back.launch.is_empty() && back.terminate.is_empty(),
            "{back:?}"
        );
        // Demand that b2 alone cannot hold revives both (b1 has 2 GiB left).
        let more = [pending("x", 8, 1.0), pending("y", 2, 0.5)];
        let both = plan(&groups(), &hosts, &more, &History::default(), now);
        assert_eq!(both.cancel_drain, ["b2", "b1"]);
        assert!(
            both.launch.is_empty() && both.terminate.is_empty(),
            "{both:?}"
        );
    }

    #[test]
    fn the_same_input_gives_the_same_plan() {
        let now = 100 * MIN;
        let p: Vec<Pending> = (0..50)
            .map(|i| pending(&format!("x{i}"), 1 + (i % 7) as u64, 0.5))
            .collect();
        let hosts = [
            host("b1", "big", Phase::Provisioning, 0, 0, None),
            host("s1", "small", Phase::Up(HostState::Draining), 0, 0, Some(0)),
        ];
        let a = plan(&groups(), &hosts, &p, &History::default(), now);
        let mut reversed = p.clone();
        reversed.reverse();
        let b = plan(&groups(), &hosts, &reversed, &History::default(), now);
        assert_eq!(a, b);
    }
}
