//! The cluster simulation (`hatchery_scheduler::simulation`) at a small size: the real
//! admission, placement and autoscaler, with lost hosts, failed launches and scheduler
//! restarts injected, keep their promises; and a seed gives one result.

use hatchery_scheduler::simulation::{self, trace, SimConfig};
use rand::SeedableRng;

const GIB: u64 = 1 << 30;

#[test]
fn a_small_cluster_runs_everything_and_scale_down_kills_nothing() {
    let cfg = SimConfig::small(7);
    let (r, timings) = simulation::run(&cfg);
    let summary = r.summary(&cfg.groups);

    // Every execution ended, and only in the ways it may.
    assert_eq!(r.submitted, cfg.trace.executions, "{summary}");
    assert_eq!(r.admitted + r.refused, r.submitted, "{summary}");
    assert_eq!(r.unfinished, 0, "{summary}");
    assert_eq!(
        r.completed + r.cancelled_by_cap + r.lost + r.killed_by_scale_down,
        r.admitted,
        "{summary}"
    );
    // R7: scale-down never ends a running execution — with hosts lost and the scheduler
    // restarted along the way.
    assert_eq!(r.killed_by_scale_down, 0, "{summary}");
    assert!(r.hosts_lost > 0 && r.restarts == cfg.restarts, "{summary}");
    assert!(r.launch_failures > 0, "{summary}");
    // It scaled up, then all the way down to each group's min (0).
    assert!(r.peak_hosts >= 30, "{summary}");
    assert!(r.drains > 0 && r.terminations > 0, "{summary}");
    assert_eq!(r.hosts_at_end, 0, "{summary}");
    // R4: what fits no group is refused at admission; what only the largest shape
    // holds runs there and nowhere else.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    let names: Vec<String> = cfg.groups.iter().map(|g| g.name.clone()).collect();
    let _ = trace::orgs(&mut rng, &cfg.trace, &names);
    let arrivals = trace::arrivals(&mut rng, &cfg.trace);
    let too_large = arrivals
        .iter()
        .filter(|a| a.need.memory_bytes > 256 * GIB)
        .count();
    assert!(too_large > 0);
    assert_eq!(r.refused, too_large, "{summary}");
    assert!(r.largest_only > 0, "{summary}");
    assert_eq!(r.largest_elsewhere, 0, "{summary}");
    // R5: room is kept while users are active, none once nobody is.
    assert!(r.reserved_while_active > 0.0, "{summary}");
    assert!(r.idle_samples > 0, "{summary}");
    assert_eq!(r.reserved_while_idle, 0, "{summary}");
    assert!(r.packing > 0.2 && r.packing <= 1.0, "{summary}");
    assert!(!timings.placements.is_empty());
}

#[test]
fn the_same_seed_gives_the_same_run_and_another_seed_another() {
    let (a, _) = simulation::run(&SimConfig::small(11));
    let (b, _) = simulation::run(&SimConfig::small(11));
    assert_eq!(a, b);
    let (c, _) = simulation::run(&SimConfig::small(12));
    assert_ne!(a.samples, c.samples);
}
