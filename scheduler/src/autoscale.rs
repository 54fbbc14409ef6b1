//! The autoscaler's decisions, pure (R4, R5, R7): from the host groups, the hosts they
//! have (ready, cordoned, draining, on their way), the executions that wait because no
//! live host can take them, and the clock, [`plan`] says which groups launch how many
//! hosts, which drains are cancelled, which hosts start draining and which drained hosts
//! are terminated. Nothing here does I/O: whoever runs it acts on the plan through the
//! store (host states) and a provider (launch, terminate), and feeds the next pass what
//! came of it ([`crate::scaler`], in the leading scheduler). The platform's admission
//! and `GET /v1/admin/groups` use [`smallest_fit`] too.
//!
//! The rules, in order:
//!
//! 1. **Demand goes to the smallest group that fits.** Each waiting execution is counted
//!    against the smallest group (memory, then CPUs, then name) among those its policy
//!    lets it use that serves its language and whose shape holds its limits; one that
//!    fits no group is reported, not counted (admission refuses those: 422
//!    `exceeds_largest_group`).
//! 2. **Room is kept for active users only** ([`Reserve`]): each user who submitted
//!    recently keeps room for its `warm_pool_size` runs at its default limits in the
//!    smallest group it may use that holds one. That room is found on the group's ready
//!    hosts first (the fullest first); what they cannot hold counts as demand, and the
//!    hosts that hold it are not drained. An idle user keeps nothing.
//! 3. **Capacity that exists is used first**, in this order: room on the group's hosts
//!    that are on their way (so a burst never launches twice for the same demand), then
//!    room on its draining hosts — whose drain is then cancelled instead of launching a
//!    host. Whatever is left is packed (first fit, largest first) onto new hosts of the
//!    group's shape: that many are launched, within `max` and the scale-up cooldown.
//! 4. **`min`** hosts are kept per group (launched if fewer, never drained below).
//! 5. **Scale-down takes only empty hosts**: a ready host with nothing running for
//!    `scale_down_after`, not needed by the demand, is drained — all such hosts of a
//!    group in one pass (a fleet that grew by hundreds for a burst shrinks as fast),
//!    then none until the scale-down cooldown has passed; never below `min`. A draining
//!    host is terminated
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
    /// Warm sandboxes each of its hosts keeps per language (`None`: the agent's own
    /// setting).
    pub pool_size: Option<u32>,
    /// Who makes its hosts: `static` (started by hand; never launched or terminated by
    /// the autoscaler) or a provider's kind (`netns`).
    pub provider: String,
}

impl GroupConfig {
    pub fn serves(&self, language: &str) -> bool {
        self.languages.iter().any(|l| l == language)
    }

    pub fn holds(&self, need: &Resources) -> bool {
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
    /// The groups its policy lets it use (`None`: any).
    pub groups: Option<Vec<String>>,
}

/// Room kept free for an active user (R5): `count` runs of `language` at its default
/// limits (`need`), in a group its policy lets it use — its `warm_pool_size`, kept only
/// while it is active (it submitted recently); an idle user keeps nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct Reserve {
    /// Who it is kept for (`org/user`), for logs and views.
    pub who: String,
    pub language: String,
    pub need: Resources,
    pub count: u32,
    pub groups: Option<Vec<String>>,
}

impl Reserve {
    /// The group it is kept in: the smallest allowed one that serves its language and
    /// holds one run.
    pub fn group<'a>(&self, groups: &'a [GroupConfig]) -> Option<&'a GroupConfig> {
        smallest_fit(groups, self.groups.as_deref(), &self.language, &self.need)
    }
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
    /// Per group: the room kept for active users (runs, and their summed needs).
    pub reserved: BTreeMap<String, (u32, Resources)>,
    /// Of that, what its ready hosts could not hold (capacity launched or revived).
    pub reserve_short: BTreeMap<String, (u32, Resources)>,
    /// Reserves that fit no group they may use (`who`).
    pub unreservable: Vec<String>,
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

/// Whether `name` may name a group: 1 to 64 ASCII letters, digits, `-` and `_`.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The names of `names` that are none of `groups`, in order.
pub fn unknown_groups<'a>(groups: &[GroupConfig], names: &'a [String]) -> Vec<&'a str> {
    names
        .iter()
        .filter(|n| !groups.iter().any(|g| g.name == **n))
        .map(String::as_str)
        .collect()
}

/// Whether `allowed` (a policy's `groups`; `None`: any) lets work onto `group`.
pub fn allows(allowed: Option<&[String]>, group: &str) -> bool {
    allowed.is_none_or(|a| a.iter().any(|g| g == group))
}

/// The smallest group (memory, then CPUs, then name) among `allowed` that serves
/// `language` and holds `need`.
pub fn smallest_fit<'a>(
    groups: &'a [GroupConfig],
    allowed: Option<&[String]>,
    language: &str,
    need: &Resources,
) -> Option<&'a GroupConfig> {
    groups
        .iter()
        .filter(|g| allows(allowed, &g.name) && g.serves(language) && g.holds(need))
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
    reserve: &[Reserve],
    history: &History,
    now: Millis,
) -> Plan {
    let mut plan = Plan::default();
    // 1. Demand per group, largest first within each (first fit decreasing).
    let mut by_group: BTreeMap<&str, Vec<(&str, Resources)>> = BTreeMap::new();
    for p in pending {
        match smallest_fit(groups, p.groups.as_deref(), &p.language, &p.need) {
            Some(g) => by_group
                .entry(g.name.as_str())
                .or_default()
                .push((p.id.as_str(), p.need)),
            None => plan.unplaceable.push(p.id.clone()),
        }
    }
    let mut reserve_by_group: BTreeMap<&str, Vec<(&str, Resources)>> = BTreeMap::new();
    for r in reserve {
        match r.group(groups) {
            Some(g) => reserve_by_group
                .entry(g.name.as_str())
                .or_default()
                .extend((0..r.count).map(|_| (r.who.as_str(), r.need))),
            None => plan.unreservable.push(r.who.clone()),
        }
    }
    let largest_first =
        |a: &(&str, Resources), b: &(&str, Resources)| b.1.cmp_size(&a.1).then(a.0.cmp(b.0));
    let sum = |items: &[(&str, Resources)]| {
        items
            .iter()
            .fold(Resources::default(), |sum, (_, need)| sum.plus(need))
    };
    for g in groups {
        let mut needs = by_group.remove(g.name.as_str()).unwrap_or_default();
        needs.sort_by(largest_first);
        if !needs.is_empty() {
            plan.demand
                .insert(g.name.clone(), (needs.len() as u32, sum(&needs)));
        }
        let mine: Vec<&GroupHost> = hosts.iter().filter(|h| h.group == g.name).collect();

        // 2. The room kept for active users goes on the ready hosts first, the fullest
        // first (so that the emptiest are the ones left to drain); what they cannot
        // hold is demand like a waiting execution's. The hosts it lands on are kept.
        let mut kept_for_reserve: Vec<String> = Vec::new();
        let mut reserved = reserve_by_group.remove(g.name.as_str()).unwrap_or_default();
        reserved.sort_by(largest_first);
        if !reserved.is_empty() {
            plan.reserved
                .insert(g.name.clone(), (reserved.len() as u32, sum(&reserved)));
            let mut ready: Vec<&&GroupHost> = mine
                .iter()
                .filter(|h| h.phase == Phase::Up(HostState::Ready))
                .collect();
            ready.sort_by(|a, b| {
                b.used
                    .cmp_size(&a.used)
                    .then(a.running.cmp(&b.running).reverse())
                    .then(a.name.cmp(&b.name))
            });
            let mut bins = Bins(
                ready
                    .iter()
                    .map(|h| (Some(h.name.clone()), g.shape.minus(&h.used)))
                    .collect(),
            );
            let mut short = Vec::new();
            for item in &reserved {
                match bins.put(&item.1) {
                    Some(i) => {
                        let name = bins.0[i].0.clone().unwrap_or_default();
                        if !kept_for_reserve.contains(&name) {
                            kept_for_reserve.push(name);
                        }
                    }
                    None => short.push(*item),
                }
            }
            if !short.is_empty() {
                plan.reserve_short
                    .insert(g.name.clone(), (short.len() as u32, sum(&short)));
                needs.extend(short);
                needs.sort_by(largest_first);
            }
        }
        let counted = mine
            .iter()
            .filter(|h| h.phase != Phase::Terminating)
            .count() as u32;

        // 3. Room on hosts on their way, then on draining hosts, then new hosts.
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
        for (_, need) in &needs {
            match bins.put(need) {
                Some(i) if i < existing => {
                    if let Some(name) = &bins.0[i].0 {
                        if !revived.contains(name) {
                            revived.push(name.clone());
                        }
                    }
                }
                Some(_) => {}
                None => {
                    bins.0.push((None, g.shape.minus(need)));
                    new_hosts += 1;
                }
            }
        }
        plan.cancel_drain.extend(revived.iter().cloned());

        // 4. min, then max and the cooldown.
        let below_min = g.min.saturating_sub(counted);
        let mut launch = new_hosts.max(below_min);
        launch = launch.min(g.max.saturating_sub(counted));
        if launch > below_min && History::cooling(&history.last_up, &g.name, g.cooldown_up, now) {
            launch = below_min.min(g.max.saturating_sub(counted));
        }
        if launch > 0 {
            plan.launch.insert(g.name.clone(), launch);
        }

        // 5. Terminate drained hosts not revived; drain one long-empty host if the group
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
                .filter(|h| !kept_for_reserve.contains(&h.name))
                .filter(|h| {
                    h.empty_since
                        .is_some_and(|t| now.saturating_sub(t) >= after)
                })
                .collect();
            // The longest empty first; ties by name.
            idle.sort_by(|a, b| a.empty_since.cmp(&b.empty_since).then(a.name.cmp(&b.name)));
            let spare = (ready_after_drains - g.min) as usize;
            plan.drain
                .extend(idle.iter().take(spare).map(|h| h.name.clone()));
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
            pool_size: None,
            provider: "netns".into(),
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
            groups: None,
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
        let plan = plan(&groups(), &[], &p, &[], &History::default(), now);
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
            &[],
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
        let first = plan(&groups(), &[], &p, &[], &History::default(), now);
        assert_eq!(first.launch, BTreeMap::from([("big".into(), 1)]));
        // Next pass, the host is on its way and the same four still wait: nothing more.
        let hosts = [host("b1", "big", Phase::Provisioning, 0, 0, None)];
        let second = plan(&groups(), &hosts, &p, &[], &History::default(), now + 1000);
        assert!(second.launch.is_empty(), "{second:?}");
        // A fifth does not fit in what is on its way: one more.
        let mut more = p.clone();
        more.push(pending("x4", 2, 0.5));
        let third = plan(
            &groups(),
            &hosts,
            &more,
            &[],
            &History::default(),
            now + 2000,
        );
        assert_eq!(third.launch, BTreeMap::from([("big".into(), 1)]));
    }

    #[test]
    fn max_min_and_the_scale_up_cooldown_bound_launches() {
        let now = 100 * MIN;
        let p: Vec<Pending> = (0..20).map(|i| pending(&format!("x{i}"), 1, 1.0)).collect();
        let mut gs = groups();
        gs[1].max = 5;
        let plan1 = plan(&gs, &[], &p, &[], &History::default(), now);
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
            &[],
            &History::default(),
            now,
        );
        assert_eq!(plan2.launch, BTreeMap::from([("big".into(), 1)]));
        // Within the cooldown after a launch, demand launches nothing more (min still is).
        gs[1].cooldown_up = Duration::from_secs(60);
        let mut history = History::default();
        history.record(&plan1, &[], now);
        let cooled = plan(&gs, &[], &p, &[], &history, now + 30_000);
        assert_eq!(cooled.launch.get("small"), None);
        let warm = plan(&gs, &[], &p, &[], &history, now + 61_000);
        assert_eq!(warm.launch["small"], 5);
    }

    #[test]
    fn only_long_empty_hosts_drain_all_at_once_never_below_min() {
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
        let p = plan(&gs, &hosts, &[], &[], &History::default(), now);
        // b4 and b1 have been empty long enough (the longest first); b2 not long
        // enough; b3 runs something.
        assert_eq!(p.drain, ["b4", "b1"]);
        assert!(p.launch.is_empty() && p.terminate.is_empty());
        // min 3 of 4: only one may go, the longest empty; min 4: none.
        gs[0].min = 3;
        assert_eq!(
            plan(&gs, &hosts, &[], &[], &History::default(), now).drain,
            ["b4"]
        );
        gs[0].min = 4;
        assert!(plan(&gs, &hosts, &[], &[], &History::default(), now)
            .drain
            .is_empty());
        // Waiting demand for the group: nothing drains.
        gs[0].min = 1;
        let busy = plan(
            &gs,
            &hosts,
            &[pending("x", 6, 1.0)],
            &[],
            &History::default(),
            now,
        );
        assert!(busy.drain.is_empty(), "{busy:?}");
        // The scale-down cooldown: drains, then none until it passed.
        gs[0].cooldown_down = Duration::from_secs(300);
        let mut history = History::default();
        history.record(&p, &hosts, now);
        assert!(plan(&gs, &hosts, &[], &[], &history, now + 60_000)
            .drain
            .is_empty());
        // (b2 has now been empty long enough too.)
        assert_eq!(
            plan(&gs, &hosts, &[], &[], &history, now + 301_000).drain,
            ["b4", "b1", "b2"]
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
        let p = plan(&groups(), &hosts, &[], &[], &History::default(), now);
        // b1 still runs something (however long it takes): kept. b2 is empty: it goes.
        assert_eq!(p.terminate, ["b2"]);
        assert!(p.cancel_drain.is_empty() && p.launch.is_empty());
        // Demand returns: it fits on the draining hosts, so their drain is cancelled
        // instead of a host being launched — the emptiest first.
        let back = plan(
            &groups(),
            &hosts,
            &[pending("x", 4, 1.0)],
            &[],
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
        let both = plan(&groups(), &hosts, &more, &[], &History::default(), now);
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
        let a = plan(&groups(), &hosts, &p, &[], &History::default(), now);
        let mut reversed = p.clone();
        reversed.reverse();
        let b = plan(&groups(), &hosts, &reversed, &[], &History::default(), now);
        assert_eq!(a, b);
    }

    fn reserve(who: &str, gib: u64, cpus: f64, count: u32, groups: Option<&[&str]>) -> Reserve {
        Reserve {
            who: who.into(),
            language: "r".into(),
            need: Resources::new(gib * GIB, cpus),
            count,
            groups: groups.map(|g| g.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn demand_goes_to_the_smallest_group_its_policy_allows() {
        let now = 100 * MIN;
        let mut only_big = pending("x", 1, 0.5);
        only_big.groups = Some(vec!["big".into()]);
        let p = plan(
            &groups(),
            &[],
            &[only_big.clone()],
            &[],
            &History::default(),
            now,
        );
        assert_eq!(p.launch, BTreeMap::from([("big".to_string(), 1)]), "{p:?}");
        // Allowed groups too small for it: it fits none.
        let mut too_big = pending("y", 6, 1.0);
        too_big.groups = Some(vec!["small".into()]);
        let p = plan(&groups(), &[], &[too_big], &[], &History::default(), now);
        assert_eq!(p.unplaceable, ["y"]);
        assert!(p.launch.is_empty(), "{p:?}");
        // A big host on its way takes the restricted run; a small request without
        // restriction still gets a small host.
        let hosts = [host("b1", "big", Phase::Provisioning, 0, 0, None)];
        let p = plan(
            &groups(),
            &hosts,
            &[only_big, pending("z", 1, 0.5)],
            &[],
            &History::default(),
            now,
        );
        assert_eq!(
            p.launch,
            BTreeMap::from([("small".to_string(), 1)]),
            "{p:?}"
        );
    }

    #[test]
    fn room_is_kept_for_active_users_only() {
        let now = 100 * MIN;
        let mut gs = groups();
        gs[1].scale_down_after = Duration::from_secs(60);
        // An active user with warm_pool_size 2 at 512 MiB / 1 CPU and no host: two small
        // hosts (one run each by CPUs) are launched for it.
        let ann = [Reserve {
            need: Resources::new(512 << 20, 1.0),
            ..reserve("acme/ann", 0, 1.0, 2, None)
        }];
        let p = plan(&gs, &[], &[], &ann, &History::default(), now);
        assert_eq!(
            p.launch,
            BTreeMap::from([("small".to_string(), 2)]),
            "{p:?}"
        );
        assert_eq!(p.reserved["small"].0, 2);
        assert_eq!(p.reserve_short["small"].0, 2);
        assert!(p.demand.is_empty(), "a reserve is not waiting work: {p:?}");

        // Three empty small hosts, empty for long: the user keeps two, the third drains.
        let long_ago = Some(now - 10 * MIN);
        let hosts = [
            host("s1", "small", Phase::Up(HostState::Ready), 0, 0, long_ago),
            host("s2", "small", Phase::Up(HostState::Ready), 0, 0, long_ago),
            host("s3", "small", Phase::Up(HostState::Ready), 0, 0, long_ago),
        ];
        let p = plan(&gs, &hosts, &[], &ann, &History::default(), now);
        assert_eq!(p.drain, ["s3"], "{p:?}");
        assert!(p.launch.is_empty() && p.reserve_short.is_empty(), "{p:?}");
        // With two hosts only, neither drains while the user is active ...
        let p = plan(&gs, &hosts[..2], &[], &ann, &History::default(), now);
        assert!(p.drain.is_empty(), "{p:?}");
        // ... and both do once it is idle (no reserve).
        let p = plan(&gs, &hosts[..2], &[], &[], &History::default(), now);
        assert_eq!(p.drain, ["s1", "s2"], "{p:?}");

        // The room goes on the fullest host that holds it, so the empty one can go.
        let hosts = [
            host("b1", "big", Phase::Up(HostState::Ready), 2, 1, None),
            host("b2", "big", Phase::Up(HostState::Ready), 0, 0, long_ago),
        ];
        let mut gs = groups();
        gs[0].scale_down_after = Duration::from_secs(60);
        let bob = [reserve("acme/bob", 1, 0.5, 1, Some(&["big"]))];
        let p = plan(&gs, &hosts, &[], &bob, &History::default(), now);
        assert_eq!(p.reserved["big"].0, 1);
        assert_eq!(p.drain, ["b2"], "{p:?}");
        // Room the busy host does not have keeps the empty one.
        let bigger = [reserve("acme/bob", 7, 0.5, 1, Some(&["big"]))];
        let p = plan(&gs, &hosts, &[], &bigger, &History::default(), now);
        assert!(p.drain.is_empty(), "{p:?}");

        // Room short while a host drains: its drain is cancelled rather than a launch.
        let hosts = [host(
            "b1",
            "big",
            Phase::Up(HostState::Draining),
            0,
            0,
            long_ago,
        )];
        let p = plan(&gs, &hosts, &[], &bob, &History::default(), now);
        assert_eq!(p.cancel_drain, ["b1"], "{p:?}");
        assert!(p.launch.is_empty() && p.terminate.is_empty(), "{p:?}");

        // A reserve no allowed group holds is reported, and launches nothing.
        let huge = [reserve("acme/cy", 300, 1.0, 1, None)];
        let p = plan(&gs, &[], &[], &huge, &History::default(), now);
        assert_eq!(p.unreservable, ["acme/cy"]);
        assert!(p.launch.is_empty(), "{p:?}");
    }
}
