//! A deterministic simulation of a large cluster (R4, R5, R7): a virtual clock, a seeded
//! workload ([`trace`]) and simulated hosts and provider drive the **real** decisions —
//! admission's cap ([`crate::admission::decide`]), the group check that refuses what fits
//! no group ([`crate::autoscale::smallest_fit`]), placement ([`crate::placement::Cluster`]
//! fed with [`HostStatus`] as agents send them, [`crate::placement::Misses`] as the
//! scheduler uses it) and the autoscaler ([`crate::autoscale::plan`] with its
//! [`History`], the scaler's view of each host ([`HostTracker`]), what it still counts as
//! waiting ([`still_waiting`]) and its last check before a termination
//! ([`drained_and_empty`])) — at a size no machine here holds: a thousand hosts in five
//! groups.
//!
//! What is simulated, and how:
//! - **Hosts** start running work the moment placement picks them (the agent's own
//!   latency is not modelled) and report their status on every change and every few
//!   seconds, as agents do; an agent takes in what the store asks of it (a drain, its
//!   cancellation) at its heartbeat.
//! - **The provider** makes a host ready after a random launch delay; some launches fail
//!   (the host never comes). Terminated hosts leave after a short delay.
//! - **Faults** are injected at seeded times: hosts lost with what runs on them (their
//!   executions end `lost`; runs sent to them come back as orphans once their status is
//!   stale), and scheduler restarts (the leader's memory — its view of the cluster, its
//!   cooldowns — is lost; host states and queued executions survive in the store).
//!
//! The same seed gives the same [`Report`]; only [`Timings`] (wall-clock cost of the real
//! placement calls) varies from run to run.

pub mod svg;
pub mod trace;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::admission::decide;
use crate::autoscale::{
    plan, smallest_fit, GroupConfig, GroupHost, History, Pending, Plan, Reserve,
};
use crate::bus::{HostStatus, SandboxUsage};
use crate::model::{ExecutionRecord, HostState, Limits, Millis, Resources};
use crate::placement::{Cluster, Misses};
use crate::provider::{HostPhase as ProvidedPhase, ProvidedHost};
use crate::scaler::{drained_and_empty, still_waiting, HostTracker};

pub use trace::{Arrival, OrgPolicy, TraceConfig};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const LANGUAGE: &str = "r";

/// Everything a run depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub seed: u64,
    pub groups: Vec<GroupConfig>,
    pub trace: TraceConfig,
    /// The per-user cap (R11).
    pub max_parallel: u32,
    /// Slots per host (memory and CPUs bind first with these shapes).
    pub host_capacity: u32,
    /// A launched host is ready after a delay drawn uniformly from this range.
    pub launch_delay_ms: (Millis, Millis),
    /// Share of launches that fail (the host never comes).
    pub launch_failure: f64,
    /// How long a terminated host takes to go.
    pub terminate_delay_ms: Millis,
    /// Ready hosts lost (with what runs on them), at seeded times while work arrives.
    pub host_losses: usize,
    /// Scheduler restarts, at seeded times while work arrives.
    pub restarts: usize,
    /// A user who submitted this recently is active: its org's warm room is kept (R5).
    pub active_for_ms: Millis,
    /// What one warm run is kept for (the default limits).
    pub warm_need: Resources,
    pub scale_every_ms: Millis,
    pub heartbeat_ms: Millis,
    pub sample_every_ms: Millis,
}

/// Five groups from 1 GiB to 256 GiB hosts, all from zero.
pub fn five_groups(max: [u32; 5], scale_down_after: Duration) -> Vec<GroupConfig> {
    let shapes = [(1u64, 2.0), (8, 4.0), (32, 8.0), (128, 32.0), (256, 64.0)];
    shapes
        .iter()
        .zip(max)
        .map(|(&(gib, cpus), max)| GroupConfig {
            name: format!("g{gib}"),
            shape: Resources::new(gib * GIB, cpus),
            languages: vec![LANGUAGE.to_string()],
            min: 0,
            max,
            scale_down_after,
            cooldown_up: Duration::from_secs(5),
            cooldown_down: Duration::from_secs(5),
            pool_size: None,
            provider: "sim".into(),
        })
        .collect()
}

impl SimConfig {
    /// The full run: 100,000 executions, peaking around a thousand hosts.
    pub fn full(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            groups: five_groups([900, 400, 120, 60, 60], Duration::from_secs(600)),
            trace: TraceConfig {
                executions: 100_000,
                orgs: 300,
                users_per_org: 20,
                quiet_rate: 12.0,
                burst_rate: 45.0,
                quiet_ms: 240_000.0,
                burst_ms: 120_000.0,
                too_large: 0.0005,
            },
            max_parallel: 4,
            host_capacity: 64,
            launch_delay_ms: (20_000, 60_000),
            launch_failure: 0.02,
            terminate_delay_ms: 5_000,
            host_losses: 10,
            restarts: 3,
            active_for_ms: 60_000,
            warm_need: Resources::new(512 * MIB, 0.5),
            scale_every_ms: 1_000,
            heartbeat_ms: 5_000,
            sample_every_ms: 10_000,
        }
    }

    /// A small run for tests: the same shape, a few dozen hosts.
    pub fn small(seed: u64) -> SimConfig {
        let full = SimConfig::full(seed);
        SimConfig {
            groups: five_groups([40, 20, 8, 4, 3], Duration::from_secs(60)),
            trace: TraceConfig {
                executions: 3_000,
                orgs: 30,
                users_per_org: 10,
                quiet_rate: 3.0,
                burst_rate: 12.0,
                quiet_ms: 60_000.0,
                burst_ms: 30_000.0,
                too_large: 0.003,
            },
            host_losses: 3,
            restarts: 2,
            ..full
        }
    }
}

/// Percentiles of a set of durations (virtual milliseconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spread {
    pub count: usize,
    pub p50: Millis,
    pub p99: Millis,
    pub max: Millis,
}

impl Spread {
    fn of(mut v: Vec<Millis>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Spread {
            count: v.len(),
            p50: at(0.5),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// The cluster at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Millis,
    /// Per group (in config order): hosts that exist (launched and not gone), and of
    /// them the ready ones.
    pub hosts: Vec<u32>,
    pub ready: Vec<u32>,
    /// Executions admitted and waiting for a host.
    pub queued: u32,
    pub running: u32,
    /// Memory the running executions' limits take, and what the hosts that report have.
    pub used_memory: u64,
    pub provisioned_memory: u64,
    /// Room the autoscaler kept for active users at its last pass.
    pub reserved_memory: u64,
    pub active_users: u32,
}

/// What a run did. Deterministic: the same config gives the same report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub seed: u64,
    pub submitted: usize,
    pub admitted: usize,
    /// Refused at admission: larger than every group's shape.
    pub refused: usize,
    pub completed: usize,
    /// Cancelled by the user's cap (R11), queued or running.
    pub cancelled_by_cap: usize,
    /// Ended `lost` with a host that was lost.
    pub lost: usize,
    /// Admitted and never ended when the run stopped (must be none).
    pub unfinished: usize,
    /// Running executions ended by scale-down: must be none.
    pub killed_by_scale_down: usize,
    /// Requests larger than the second largest shape, and those of them that ran on a
    /// host of another group than the largest (must be none).
    pub largest_only: usize,
    pub largest_elsewhere: usize,
    pub launches: usize,
    pub launch_failures: usize,
    pub hosts_lost: usize,
    pub restarts: usize,
    pub drains: usize,
    pub drains_cancelled: usize,
    pub terminations: usize,
    pub peak_hosts: u32,
    pub peak_queue: u32,
    /// Per group: how long executions placed on it waited for a host (only those that
    /// waited at all), and how many started without waiting.
    pub waited: BTreeMap<String, Spread>,
    pub started_at_once: BTreeMap<String, usize>,
    /// Memory used by running limits over memory of the hosts that report, averaged over
    /// the samples that had hosts.
    pub packing: f64,
    /// The same, counting the room kept for active users as used.
    pub packing_with_reserve: f64,
    /// Room kept for active users, averaged over the samples that had active users; and
    /// the most kept in a sample that had none (R5: must be zero), and how many those were.
    pub reserved_while_active: f64,
    pub reserved_while_idle: u64,
    pub idle_samples: usize,
    /// When the last execution ended, and when the run ended (every group back to its
    /// `min`, nothing draining).
    pub work_done_at: Millis,
    pub ended_at: Millis,
    pub hosts_at_end: u32,
    pub samples: Vec<Sample>,
}

/// Wall-clock cost of the real placement calls: varies between runs.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Every `Cluster::place` call: the number of hosts reporting, and its nanoseconds.
    pub placements: Vec<(u32, u64)>,
    /// Every 16th call, the same choice made again through the three stages one after
    /// the other (`Cluster::place_in_stages`), timed right after: hosts, nanoseconds of
    /// `place`, nanoseconds of the stages.
    pub side_by_side: Vec<(u32, u64, u64)>,
    /// Every `autoscale::plan` call: its nanoseconds.
    pub plans: Vec<u64>,
    pub wall: Duration,
}

impl Timings {
    /// p50 of the single pass and of the three stages (µs) on the same calls, made while
    /// at least `hosts` reported, and how many.
    pub fn side_by_side_us(&self, hosts: u32) -> Option<(f64, f64, usize)> {
        let pick = |f: fn(&(u32, u64, u64)) -> u64| {
            let mut v: Vec<u64> = self
                .side_by_side
                .iter()
                .filter(|s| s.0 >= hosts)
                .map(f)
                .collect();
            v.sort_unstable();
            v.get(v.len() / 2).map(|ns| *ns as f64 / 1e3)
        };
        let n = self.side_by_side.iter().filter(|s| s.0 >= hosts).count();
        Some((pick(|s| s.1)?, pick(|s| s.2)?, n))
    }

    /// p50 and p99 (µs) of the placement calls made while at least `hosts` reported.
    pub fn placement_us(&self, hosts: u32) -> Option<(f64, f64, usize)> {
        let mut v: Vec<u64> = self
            .placements
            .iter()
            .filter(|(h, _)| *h >= hosts)
            .map(|(_, ns)| *ns)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Some((at(0.5), at(0.99), v.len()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrive(usize),
    Finish { exec: usize, host: usize },
    HostReady(usize),
    LaunchFailed(usize),
    HostGone(usize),
    LoseHost,
    Restart,
    ScalerPass,
    Heartbeat,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ExecState {
    Refused,
    Queued,
    /// Sent to a host that was lost before it started: comes back as an orphan.
    SentToLost,
    Running(usize),
    Done,
    Cancelled,
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum HostPhase {
    Provisioning,
    Up(HostState),
    Terminating,
    Gone,
}

struct Host {
    name: String,
    group: usize,
    phase: HostPhase,
    /// The state its own status reports: what the store asked of it when its agent last
    /// read it (at its heartbeat).
    reported: HostState,
    running: BTreeMap<usize, Resources>,
    launched_at: Millis,
}

struct Exec {
    arrival: usize,
    state: ExecState,
    admitted_at: Millis,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    rng: ChaCha8Rng,
    orgs: Vec<OrgPolicy>,
    arrivals: Vec<Arrival>,
    now: Millis,
    events: BinaryHeap<Reverse<(Millis, u64, Ev)>>,
    seq: u64,
    execs: Vec<Exec>,
    /// Each user's active executions, in admission order.
    active: BTreeMap<usize, Vec<usize>>,
    last_submit: BTreeMap<usize, Millis>,
    queue: VecDeque<usize>,
    hosts: Vec<Host>,
    by_name: BTreeMap<String, usize>,
    per_group_launched: Vec<u32>,
    cluster: Cluster,
    history: History,
    tracker: HostTracker,
    last_plan: Plan,
    running: u32,
    arrived: usize,
    report: Report,
    timings: Timings,
    waits: BTreeMap<String, Vec<Millis>>,
    packing: Vec<f64>,
    packing_with_reserve: Vec<f64>,
    reserved_active: Vec<u64>,
}

/// Runs a simulation to its end.
pub fn run(cfg: &SimConfig) -> (Report, Timings) {
    let wall = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let names: Vec<String> = cfg.groups.iter().map(|g| g.name.clone()).collect();
    let orgs = trace::orgs(&mut rng, &cfg.trace, &names);
    let arrivals = trace::arrivals(&mut rng, &cfg.trace);
    let mut sim = Sim {
        cfg,
        rng,
        orgs,
        now: 0,
        events: BinaryHeap::new(),
        seq: 0,
        execs: Vec::with_capacity(arrivals.len()),
        active: BTreeMap::new(),
        last_submit: BTreeMap::new(),
        queue: VecDeque::new(),
        hosts: Vec::new(),
        by_name: BTreeMap::new(),
        per_group_launched: vec![0; cfg.groups.len()],
        cluster: Cluster::default(),
        history: History::default(),
        tracker: HostTracker::default(),
        last_plan: Plan::default(),
        running: 0,
        arrived: 0,
        report: Report {
            seed: cfg.seed,
            ..Report::default()
        },
        timings: Timings::default(),
        waits: BTreeMap::new(),
        packing: Vec::new(),
        packing_with_reserve: Vec::new(),
        reserved_active: Vec::new(),
        arrivals,
    };
    sim.start();
    sim.run();
    sim.timings.wall = wall.elapsed();
    let timings = std::mem::take(&mut sim.timings);
    (sim.finish(), timings)
}

impl Sim<'_> {
    fn at(&mut self, at: Millis, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, ev)));
    }

    fn start(&mut self) {
        for i in 0..self.arrivals.len() {
            self.at(self.arrivals[i].at, Ev::Arrive(i));
        }
        let span = self.arrivals.last().map_or(1, |a| a.at.max(1));
        for _ in 0..self.cfg.host_losses {
            let t = self.rng.gen_range(span / 10..span);
            self.at(t, Ev::LoseHost);
        }
        for _ in 0..self.cfg.restarts {
            let t = self.rng.gen_range(span / 10..span);
            self.at(t, Ev::Restart);
        }
        self.at(0, Ev::ScalerPass);
        self.at(0, Ev::Heartbeat);
        self.at(0, Ev::Sample);
    }

    /// Whether everything is over: all work ended, every group at its `min`, nothing
    /// on its way in or out.
    fn over(&self) -> bool {
        self.arrived == self.arrivals.len()
            && self.running == 0
            && self.queue.is_empty()
            && self
                .hosts
                .iter()
                .all(|h| matches!(h.phase, HostPhase::Gone | HostPhase::Up(HostState::Ready)))
            && self
                .cfg
                .groups
                .iter()
                .enumerate()
                .all(|(g, cfg)| self.existing(g) <= cfg.min)
    }

    fn existing(&self, group: usize) -> u32 {
        self.hosts
            .iter()
            .filter(|h| h.group == group && h.phase != HostPhase::Gone)
            .count() as u32
    }

    fn run(&mut self) {
        // A bound in case something never settles (a bug): six hours past the last arrival.
        let last = self.arrivals.last().map_or(0, |a| a.at);
        let limit = last + 6 * 3_600_000;
        let mut dirty = false;
        while let Some(Reverse((at, _, ev))) = self.events.pop() {
            self.now = at;
            if at > limit {
                break;
            }
            dirty |= self.handle(ev);
            let next = self.events.peek().map(|Reverse((t, _, _))| *t);
            if dirty && next != Some(at) {
                self.place_waiting();
                dirty = false;
            }
            if self.report.work_done_at == 0
                && self.arrived == self.arrivals.len()
                && self.running == 0
                && self.queue.is_empty()
            {
                self.report.work_done_at = self.now;
            }
            if self.over() {
                break;
            }
        }
        self.report.ended_at = self.now;
    }

    /// Acts on one event; true when placement may now succeed where it did not.
    fn handle(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::Arrive(i) => self.arrive(i),
            Ev::Finish { exec, host } => {
                if self.execs[exec].state != ExecState::Running(host) {
                    return false;
                }
                self.execs[exec].state = ExecState::Done;
                self.report.completed += 1;
                self.stop_on_host(exec, host);
                self.forget_active(exec);
                true
            }
            Ev::HostReady(h) => {
                if self.hosts[h].phase != HostPhase::Provisioning {
                    return false;
                }
                self.hosts[h].phase = HostPhase::Up(HostState::Ready);
                self.hosts[h].reported = HostState::Ready;
                self.report_status(h);
                true
            }
            Ev::LaunchFailed(h) => {
                self.hosts[h].phase = HostPhase::Gone;
                self.report.launch_failures += 1;
                false
            }
            Ev::HostGone(h) => {
                self.hosts[h].phase = HostPhase::Gone;
                false
            }
            Ev::LoseHost => {
                self.lose_a_host();
                false
            }
            Ev::Restart => {
                self.restart();
                true
            }
            Ev::ScalerPass => {
                let orphans = self.scale();
                if !self.over() {
                    self.at(self.now + self.cfg.scale_every_ms, Ev::ScalerPass);
                }
                orphans
            }
            Ev::Heartbeat => {
                // Each agent reads what the store asks of it, and says so.
                for h in 0..self.hosts.len() {
                    if let HostPhase::Up(state) = self.hosts[h].phase {
                        self.hosts[h].reported = state;
                        self.report_status(h);
                    }
                }
                if !self.over() {
                    self.at(self.now + self.cfg.heartbeat_ms, Ev::Heartbeat);
                }
                false
            }
            Ev::Sample => {
                self.sample();
                if !self.over() {
                    self.at(self.now + self.cfg.sample_every_ms, Ev::Sample);
                }
                false
            }
        }
    }

    fn id(exec: usize) -> String {
        format!("e{exec}")
    }

    fn exec_of(id: &str) -> Option<usize> {
        id.strip_prefix('e')?.parse().ok()
    }

    fn limits(need: &Resources) -> Limits {
        Limits {
            memory_bytes: need.memory_bytes,
            cpus: need.cpus,
            pids: 128,
            time_limit_ms: 0,
            max_artifacts: 0,
            max_artifact_bytes: 0,
        }
    }

    /// Admission: the group check, then the user's cap, as the platform does them.
    fn arrive(&mut self, i: usize) -> bool {
        self.arrived += 1;
        self.report.submitted += 1;
        let a = self.arrivals[i].clone();
        let exec = self.execs.len();
        let org = &self.orgs[a.org];
        if smallest_fit(&self.cfg.groups, org.groups.as_deref(), LANGUAGE, &a.need).is_none() {
            self.execs.push(Exec {
                arrival: i,
                state: ExecState::Refused,
                admitted_at: self.now,
            });
            self.report.refused += 1;
            return false;
        }
        self.execs.push(Exec {
            arrival: i,
            state: ExecState::Queued,
            admitted_at: self.now,
        });
        self.report.admitted += 1;
        self.last_submit.insert(a.user, self.now);
        let mine = self.active.entry(a.user).or_default().clone();
        let records: Vec<ExecutionRecord> = mine
            .iter()
            .map(|&e| {
                let need = self.arrivals[self.execs[e].arrival].need;
                ExecutionRecord::queued(Self::id(e), "o", "u", LANGUAGE, Self::limits(&need), 0)
            })
            .collect();
        let refs: Vec<&ExecutionRecord> = records.iter().collect();
        let decision = decide(&refs, None, self.cfg.max_parallel);
        let mut changed = false;
        for (index, _) in decision.cancel {
            changed |= self.cancel(mine[index]);
        }
        if decision.cancel_new {
            self.execs[exec].state = ExecState::Cancelled;
            self.report.cancelled_by_cap += 1;
        } else {
            self.active.entry(a.user).or_default().push(exec);
            self.queue.push_back(exec);
            changed = true;
        }
        changed
    }

    /// Cancels an active execution (the user's cap): true if that freed room on a host.
    fn cancel(&mut self, exec: usize) -> bool {
        let state = self.execs[exec].state;
        self.execs[exec].state = ExecState::Cancelled;
        self.report.cancelled_by_cap += 1;
        self.forget_active(exec);
        match state {
            ExecState::Running(h) => {
                self.stop_on_host(exec, h);
                true
            }
            _ => false,
        }
    }

    fn forget_active(&mut self, exec: usize) {
        let user = self.arrivals[self.execs[exec].arrival].user;
        if let Some(v) = self.active.get_mut(&user) {
            v.retain(|&e| e != exec);
        }
    }

    fn stop_on_host(&mut self, exec: usize, h: usize) {
        if self.hosts[h].running.remove(&exec).is_some() {
            self.running -= 1;
        }
        if matches!(self.hosts[h].phase, HostPhase::Up(_)) {
            self.report_status(h);
        }
    }

    /// What the host's agent would send now.
    fn status(&self, h: usize) -> HostStatus {
        let host = &self.hosts[h];
        let group = &self.cfg.groups[host.group];
        let state = host.reported;
        HostStatus {
            agent: host.name.clone(),
            group: Some(group.name.clone()),
            at: self.now,
            capacity: self.cfg.host_capacity,
            running: host.running.len() as u32,
            allocatable: group.shape,
            draining: state != HostState::Ready,
            state,
            load: Default::default(),
            warm: vec![(LANGUAGE.to_string(), 1)],
            sandboxes: host
                .running
                .iter()
                .map(|(&e, need)| SandboxUsage {
                    execution_id: Self::id(e),
                    org: String::new(),
                    user: String::new(),
                    usage: Default::default(),
                    limits: *need,
                })
                .collect(),
        }
    }

    fn report_status(&mut self, h: usize) {
        let status = self.status(h);
        self.cluster.observe(status);
    }

    /// The scheduler's placement pass over what waits, in order (as
    /// `scheduling::place_waiting` does it, with the same [`Misses`] rule).
    fn place_waiting(&mut self) {
        let mut misses = Misses::default();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        let reporting = self
            .hosts
            .iter()
            .filter(|h| matches!(h.phase, HostPhase::Up(_)))
            .count() as u32;
        while let Some(exec) = self.queue.pop_front() {
            if self.execs[exec].state != ExecState::Queued {
                continue;
            }
            let a = &self.arrivals[self.execs[exec].arrival];
            let (need, runs_for) = (a.need, a.runs_for);
            let groups = self.orgs[a.org].groups.clone();
            if misses.covers(LANGUAGE, groups.as_deref(), &need) {
                kept.push_back(exec);
                continue;
            }
            let began = Instant::now();
            let chosen = self
                .cluster
                .place(LANGUAGE, &need, groups.as_deref(), self.now);
            let fused = began.elapsed().as_nanos() as u64;
            self.timings.placements.push((reporting, fused));
            if self.timings.placements.len().is_multiple_of(16) {
                let began = Instant::now();
                let staged =
                    self.cluster
                        .place_in_stages(LANGUAGE, &need, groups.as_deref(), self.now);
                let stages = began.elapsed().as_nanos() as u64;
                assert_eq!(staged, chosen, "the stages and the single pass disagree");
                self.timings.side_by_side.push((reporting, fused, stages));
            }
            let Some(agent) = chosen else {
                misses.missed(LANGUAGE, groups.as_deref(), &need);
                kept.push_back(exec);
                continue;
            };
            let h = self.by_name[&agent];
            self.cluster.sent(&Self::id(exec), &agent, need, self.now);
            if self.hosts[h].phase == HostPhase::Gone {
                // Lost a moment ago; its status is not stale yet.
                self.execs[exec].state = ExecState::SentToLost;
                continue;
            }
            self.execs[exec].state = ExecState::Running(h);
            self.running += 1;
            let group = self.cfg.groups[self.hosts[h].group].name.clone();
            let waited = self.now - self.execs[exec].admitted_at;
            if waited > 0 {
                self.waits.entry(group.clone()).or_default().push(waited);
            } else {
                *self
                    .report
                    .started_at_once
                    .entry(group.clone())
                    .or_default() += 1;
            }
            let second_largest = self.second_largest_memory();
            if need.memory_bytes > second_largest {
                self.report.largest_only += 1;
                if self.hosts[h].group != self.largest_group() {
                    self.report.largest_elsewhere += 1;
                }
            }
            self.hosts[h].running.insert(exec, need);
            self.at(self.now + runs_for, Ev::Finish { exec, host: h });
            self.report_status(h);
        }
        self.queue = kept;
        self.report.peak_queue = self.report.peak_queue.max(self.queue.len() as u32);
    }

    fn largest_group(&self) -> usize {
        (0..self.cfg.groups.len())
            .max_by(|&a, &b| self.cfg.groups[a].shape.cmp_size(&self.cfg.groups[b].shape))
            .unwrap_or(0)
    }

    fn second_largest_memory(&self) -> u64 {
        let mut m: Vec<u64> = self
            .cfg
            .groups
            .iter()
            .map(|g| g.shape.memory_bytes)
            .collect();
        m.sort_unstable();
        m.len().checked_sub(2).map_or(0, |i| m[i])
    }

    /// Room kept for the users who submitted within `active_for` (R5).
    fn reserve(&self) -> Vec<Reserve> {
        self.last_submit
            .iter()
            .filter(|(_, &at)| self.now.saturating_sub(at) < self.cfg.active_for_ms)
            .filter_map(|(&user, _)| {
                let org = &self.orgs[user / self.cfg.trace.users_per_org];
                (org.warm_pool_size > 0).then(|| Reserve {
                    who: format!("{}/{user}", org.name),
                    language: LANGUAGE.to_string(),
                    need: self.cfg.warm_need,
                    count: org.warm_pool_size,
                    groups: org.groups.clone(),
                })
            })
            .collect()
    }

    /// One autoscaler pass, acted on as the scaler does. True if orphans came back.
    fn scale(&mut self) -> bool {
        // Runs sent to hosts whose status went stale come back (the scheduler's loop).
        let mut orphans: Vec<usize> = self
            .cluster
            .take_orphans(self.now)
            .iter()
            .filter_map(|id| Self::exec_of(id))
            .collect();
        orphans.sort_unstable();
        let mut requeued = false;
        for exec in orphans {
            if self.execs[exec].state == ExecState::SentToLost {
                self.execs[exec].state = ExecState::Queued;
                self.queue.push_front(exec);
                requeued = true;
            }
        }

        // The hosts as the scaler sees them: what their provider says, what the store
        // asks of them, and what the scheduler's view shows them running.
        let mut group_hosts: Vec<GroupHost> = Vec::new();
        for h in 0..self.hosts.len() {
            let host = &self.hosts[h];
            let (phase, state) = match host.phase {
                HostPhase::Gone => continue,
                HostPhase::Provisioning => (ProvidedPhase::Starting, None),
                HostPhase::Up(s) => (ProvidedPhase::Running, Some(s)),
                HostPhase::Terminating => (ProvidedPhase::Stopping, Some(HostState::Terminating)),
            };
            let provided = ProvidedHost {
                name: host.name.clone(),
                group: self.cfg.groups[host.group].name.clone(),
                phase,
                launched_at: host.launched_at,
            };
            let (view, _) = self.tracker.view(&provided, state, &self.cluster, self.now);
            group_hosts.push(view);
        }
        let pending: Vec<Pending> = self
            .queue
            .iter()
            .filter(|&&e| self.execs[e].state == ExecState::Queued)
            .map(|&e| {
                let a = &self.arrivals[self.execs[e].arrival];
                Pending {
                    id: Self::id(e),
                    language: LANGUAGE.to_string(),
                    need: a.need,
                    groups: self.orgs[a.org].groups.clone(),
                }
            })
            .collect();
        let pending = still_waiting(&self.cluster, &pending, self.now);
        let reserve = self.reserve();
        let began = Instant::now();
        let plan = plan(
            &self.cfg.groups,
            &group_hosts,
            &pending,
            &reserve,
            &self.history,
            self.now,
        );
        self.timings.plans.push(began.elapsed().as_nanos() as u64);

        for (group, n) in &plan.launch {
            let g = self
                .cfg
                .groups
                .iter()
                .position(|c| c.name == *group)
                .expect("a planned group exists");
            for _ in 0..*n {
                self.launch(g);
            }
        }
        for name in &plan.cancel_drain {
            let h = self.by_name[name];
            if self.hosts[h].phase == HostPhase::Up(HostState::Draining) {
                self.hosts[h].phase = HostPhase::Up(HostState::Ready);
                self.cluster.release(name);
                self.tracker.revived(name, self.now);
                self.report.drains_cancelled += 1;
                self.report_status(h);
                requeued = true;
            }
        }
        for name in &plan.drain {
            let h = self.by_name[name];
            self.hosts[h].phase = HostPhase::Up(HostState::Draining);
            self.cluster.hold(name);
            self.report.drains += 1;
            self.report_status(h);
        }
        for name in &plan.terminate {
            // The scaler's last word: the host's own fresh status says it drains and
            // runs nothing, and nothing sent to it is outstanding.
            if !drained_and_empty(&self.cluster, name, self.now) {
                continue;
            }
            let h = self.by_name[name];
            // The plan terminates drained hosts only: anything still running here would
            // be killed by scale-down, and is counted as such.
            let killed: Vec<usize> = self.hosts[h].running.keys().copied().collect();
            for exec in killed {
                self.report.killed_by_scale_down += 1;
                self.execs[exec].state = ExecState::Lost;
                self.stop_on_host(exec, h);
                self.forget_active(exec);
            }
            self.hosts[h].phase = HostPhase::Terminating;
            self.tracker.forget(name);
            self.report.terminations += 1;
            self.at(self.now + self.cfg.terminate_delay_ms, Ev::HostGone(h));
        }
        self.history.record(&plan, &group_hosts, self.now);
        self.last_plan = plan;
        requeued
    }

    fn launch(&mut self, g: usize) {
        let n = self.per_group_launched[g];
        self.per_group_launched[g] += 1;
        let name = format!("{}-{n:04}", self.cfg.groups[g].name);
        let h = self.hosts.len();
        self.hosts.push(Host {
            name: name.clone(),
            group: g,
            phase: HostPhase::Provisioning,
            reported: HostState::Ready,
            running: BTreeMap::new(),
            launched_at: self.now,
        });
        self.by_name.insert(name, h);
        self.report.launches += 1;
        let (lo, hi) = self.cfg.launch_delay_ms;
        let delay = self.rng.gen_range(lo..=hi);
        if self.rng.gen_bool(self.cfg.launch_failure) {
            self.at(self.now + delay, Ev::LaunchFailed(h));
        } else {
            self.at(self.now + delay, Ev::HostReady(h));
        }
        let existing = self
            .hosts
            .iter()
            .filter(|h| h.phase != HostPhase::Gone)
            .count();
        self.report.peak_hosts = self.report.peak_hosts.max(existing as u32);
    }

    /// A ready host vanishes with what runs on it (its status simply stops).
    fn lose_a_host(&mut self) {
        let up: Vec<usize> = (0..self.hosts.len())
            .filter(|&h| matches!(self.hosts[h].phase, HostPhase::Up(_)))
            .collect();
        if up.is_empty() {
            return;
        }
        let h = up[self.rng.gen_range(0..up.len())];
        let running: Vec<usize> = self.hosts[h].running.keys().copied().collect();
        for exec in running {
            self.execs[exec].state = ExecState::Lost;
            self.report.lost += 1;
            self.hosts[h].running.remove(&exec);
            self.running -= 1;
            self.forget_active(exec);
        }
        self.hosts[h].phase = HostPhase::Gone;
        self.report.hosts_lost += 1;
    }

    /// The leading scheduler dies and another takes over: its view of the cluster and its
    /// cooldowns are gone; host states, and what is queued, are read from the store, and
    /// the agents' next statuses rebuild the view.
    fn restart(&mut self) {
        self.report.restarts += 1;
        self.cluster = Cluster::default();
        self.history = History::default();
        self.tracker = HostTracker::default();
        let withheld = self
            .hosts
            .iter()
            .filter(|h| matches!(h.phase, HostPhase::Up(s) if s != HostState::Ready))
            .map(|h| h.name.clone())
            .collect();
        self.cluster.withhold(withheld);
        for h in 0..self.hosts.len() {
            if matches!(self.hosts[h].phase, HostPhase::Up(_)) {
                self.report_status(h);
            }
        }
        // What was sent to a lost host is still queued in the store: placed again.
        let mut queued: Vec<usize> = self.queue.drain(..).collect();
        for (e, x) in self.execs.iter_mut().enumerate() {
            if x.state == ExecState::SentToLost {
                x.state = ExecState::Queued;
                queued.push(e);
            }
        }
        queued.sort_unstable();
        queued.dedup();
        self.queue = queued.into();
    }

    fn sample(&mut self) {
        let n = self.cfg.groups.len();
        let (mut hosts, mut ready) = (vec![0u32; n], vec![0u32; n]);
        let mut provisioned = 0u64;
        for h in &self.hosts {
            if h.phase != HostPhase::Gone {
                hosts[h.group] += 1;
            }
            if let HostPhase::Up(s) = h.phase {
                provisioned += self.cfg.groups[h.group].shape.memory_bytes;
                if s == HostState::Ready {
                    ready[h.group] += 1;
                }
            }
        }
        let used: u64 = self
            .hosts
            .iter()
            .flat_map(|h| h.running.values())
            .map(|n| n.memory_bytes)
            .sum();
        let reserved: u64 = self
            .last_plan
            .reserved
            .values()
            .map(|(_, r)| r.memory_bytes)
            .sum();
        let active_users = self
            .last_submit
            .values()
            .filter(|&&at| self.now.saturating_sub(at) < self.cfg.active_for_ms)
            .count() as u32;
        if provisioned > 0 {
            self.packing.push(used as f64 / provisioned as f64);
            self.packing_with_reserve
                .push(((used + reserved) as f64 / provisioned as f64).min(1.0));
        }
        if active_users > 0 {
            self.reserved_active.push(reserved);
        } else {
            self.report.idle_samples += 1;
            self.report.reserved_while_idle = self.report.reserved_while_idle.max(reserved);
        }
        self.report.peak_hosts = self.report.peak_hosts.max(hosts.iter().sum());
        self.report.samples.push(Sample {
            at: self.now,
            hosts,
            ready,
            queued: self.queue.len() as u32,
            running: self.running,
            used_memory: used,
            provisioned_memory: provisioned,
            reserved_memory: reserved,
            active_users,
        });
    }

    fn finish(mut self) -> Report {
        self.sample();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        self.report.packing = mean(&self.packing);
        self.report.packing_with_reserve = mean(&self.packing_with_reserve);
        let reserved: Vec<f64> = self.reserved_active.iter().map(|&r| r as f64).collect();
        self.report.reserved_while_active = mean(&reserved);
        self.report.waited = std::mem::take(&mut self.waits)
            .into_iter()
            .map(|(g, v)| (g, Spread::of(v)))
            .collect();
        self.report.hosts_at_end = (0..self.cfg.groups.len()).map(|g| self.existing(g)).sum();
        self.report.unfinished = self
            .execs
            .iter()
            .filter(|x| {
                matches!(
                    x.state,
                    ExecState::Queued | ExecState::SentToLost | ExecState::Running(_)
                )
            })
            .count();
        self.report
    }
}

impl Report {
    /// The figures, as lines of text.
    pub fn summary(&self, groups: &[GroupConfig]) -> String {
        let mut s = String::new();
        let gib = |b: f64| b / GIB as f64;
        s += &format!(
            "seed {}: {} submitted, {} admitted, {} refused (larger than every group)\n",
            self.seed, self.submitted, self.admitted, self.refused
        );
        s += &format!(
            "ended: {} completed, {} cancelled by the user's cap, {} lost with {} lost hosts, {} killed by scale-down\n",
            self.completed, self.cancelled_by_cap, self.lost, self.hosts_lost, self.killed_by_scale_down
        );
        s += &format!(
            "hosts: peak {}, {} launched ({} failed), {} drains ({} cancelled by returning demand), {} terminated, {} left at the end; {} scheduler restarts\n",
            self.peak_hosts, self.launches, self.launch_failures, self.drains, self.drains_cancelled, self.terminations, self.hosts_at_end, self.restarts
        );
        s += &format!(
            "requests above the second largest shape: {}, placed outside the largest group: {}\n",
            self.largest_only, self.largest_elsewhere
        );
        s += &format!(
            "packing (memory of running limits / memory of reporting hosts, mean over samples): {:.1}%, {:.1}% counting the room kept for active users; peak queue {}\n",
            self.packing * 100.0,
            self.packing_with_reserve * 100.0,
            self.peak_queue
        );
        s += &format!(
            "warm room kept for active users: {:.1} GiB on average while any was active; at most {:.1} GiB in the {} samples with none active\n",
            gib(self.reserved_while_active),
            gib(self.reserved_while_idle as f64),
            self.idle_samples
        );
        for g in groups {
            let at_once = self.started_at_once.get(&g.name).copied().unwrap_or(0);
            match self.waited.get(&g.name) {
                Some(w) if w.count > 0 => {
                    s += &format!(
                        "  {}: {} started at once; {} waited for a host: p50 {:.1} s, p99 {:.1} s, max {:.1} s\n",
                        g.name,
                        at_once,
                        w.count,
                        w.p50 as f64 / 1e3,
                        w.p99 as f64 / 1e3,
                        w.max as f64 / 1e3
                    )
                }
                _ => s += &format!("  {}: {} started at once; none waited\n", g.name, at_once),
            }
        }
        s += &format!(
            "work done at {:.0} s; every group back to its min at {:.0} s (virtual time)\n",
            self.work_done_at as f64 / 1e3,
            self.ended_at as f64 / 1e3
        );
        s
    }
}
