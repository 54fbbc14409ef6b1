//! The workload of a simulation: orgs with their policies, and executions arriving in
//! bursts, drawn from a seeded generator (the same seed gives the same trace).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::model::{Millis, Resources};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// What an org's policy says that the simulation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct OrgPolicy {
    pub name: String,
    /// Warm runs kept for each of its users while the user is active (R5).
    pub warm_pool_size: u32,
    /// The groups it may use (`None`: any).
    pub groups: Option<Vec<String>>,
}

/// One execution of the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub at: Millis,
    pub org: usize,
    /// Index of the user within all users (`org * users_per_org + n`).
    pub user: usize,
    pub need: Resources,
    /// How long it runs once started.
    pub runs_for: Millis,
}

/// The shape of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    pub executions: usize,
    pub orgs: usize,
    pub users_per_org: usize,
    /// Arrivals per second between bursts, and during a burst.
    pub quiet_rate: f64,
    pub burst_rate: f64,
    /// Mean length of a quiet spell and of a burst (exponentially distributed).
    pub quiet_ms: f64,
    pub burst_ms: f64,
    /// Share of the requests too large for any group (refused at admission).
    pub too_large: f64,
}

/// A kind of request: its share of arrivals, its limits and its median run time.
struct Kind {
    share: f64,
    memory: (u64, u64),
    cpus: f64,
    median_ms: f64,
}

/// Mostly small and short, with a tail of large and long ones up to a whole 256 GiB host.
const KINDS: &[Kind] = &[
    Kind {
        share: 0.70,
        memory: (256 * MIB, 256 * MIB),
        cpus: 0.5,
        median_ms: 15_000.0,
    },
    Kind {
        share: 0.15,
        memory: (512 * MIB, 512 * MIB),
        cpus: 1.0,
        median_ms: 30_000.0,
    },
    Kind {
        share: 0.08,
        memory: (2 * GIB, 2 * GIB),
        cpus: 1.0,
        median_ms: 45_000.0,
    },
    Kind {
        share: 0.04,
        memory: (6 * GIB, 6 * GIB),
        cpus: 2.0,
        median_ms: 90_000.0,
    },
    Kind {
        share: 0.02,
        memory: (24 * GIB, 24 * GIB),
        cpus: 4.0,
        median_ms: 150_000.0,
    },
    Kind {
        share: 0.007,
        memory: (64 * GIB, 96 * GIB),
        cpus: 16.0,
        median_ms: 240_000.0,
    },
    Kind {
        share: 0.003,
        memory: (160 * GIB, 256 * GIB),
        cpus: 32.0,
        median_ms: 300_000.0,
    },
];

/// The org policies: about a third keep no warm room, the rest 1–4 runs per active user;
/// one org in five may not use the smallest group.
pub fn orgs(rng: &mut ChaCha8Rng, cfg: &TraceConfig, groups: &[String]) -> Vec<OrgPolicy> {
    (0..cfg.orgs)
        .map(|i| {
            let warm_pool_size = [0, 0, 1, 1, 2, 4][rng.gen_range(0..6)];
            let groups = if rng.gen_bool(0.2) && groups.len() > 1 {
                Some(groups[1..].to_vec())
            } else {
                None
            };
            OrgPolicy {
                name: format!("org{i:03}"),
                warm_pool_size,
                groups,
            }
        })
        .collect()
}

/// The arrivals, in order: quiet spells and bursts alternate; within each, arrivals are
/// a Poisson process; orgs are picked with a skew (a few busy ones, many quiet ones).
pub fn arrivals(rng: &mut ChaCha8Rng, cfg: &TraceConfig) -> Vec<Arrival> {
    let mut out = Vec::with_capacity(cfg.executions);
    let mut t = 0.0f64;
    let mut burst = false;
    let mut phase_ends = exponential(rng, cfg.quiet_ms);
    while out.len() < cfg.executions {
        let rate = if burst {
            cfg.burst_rate
        } else {
            cfg.quiet_rate
        } / 1000.0;
        let next = t + exponential(rng, 1.0 / rate);
        if next > phase_ends {
            t = phase_ends;
            burst = !burst;
            phase_ends = t + exponential(rng, if burst { cfg.burst_ms } else { cfg.quiet_ms });
            continue;
        }
        t = next;
        // Skewed: the square of a uniform draw favours the low indices.
        let org = ((rng.gen::<f64>().powi(2)) * cfg.orgs as f64) as usize;
        let org = org.min(cfg.orgs - 1);
        let user = org * cfg.users_per_org + rng.gen_range(0..cfg.users_per_org);
        let (need, runs_for) = if rng.gen_bool(cfg.too_large) {
            (Resources::new(300 * GIB, 8.0), 60_000)
        } else {
            let kind = pick(rng);
            let memory = if kind.memory.0 == kind.memory.1 {
                kind.memory.0
            } else {
                rng.gen_range(kind.memory.0 / GIB..=kind.memory.1 / GIB) * GIB
            };
            // Log-normal run times around the kind's median.
            let runs_for = kind.median_ms * (normal(rng) * 0.8).exp();
            (
                Resources::new(memory, kind.cpus),
                runs_for.clamp(200.0, 3_600_000.0) as Millis,
            )
        };
        out.push(Arrival {
            at: t as Millis,
            org,
            user,
            need,
            runs_for,
        });
    }
    out
}

fn pick(rng: &mut ChaCha8Rng) -> &'static Kind {
    let mut x = rng.gen::<f64>();
    for k in KINDS {
        if x < k.share {
            return k;
        }
        x -= k.share;
    }
    &KINDS[0]
}

/// An exponentially distributed draw with mean `mean`.
pub fn exponential(rng: &mut ChaCha8Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.gen::<f64>()).ln()
}

/// A standard normal draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let (u, v): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}
