//! The cluster at a thousand hosts, simulated (see `hatchery_scheduler::simulation`): the
//! real admission, placement and autoscaler against simulated hosts and provider, with a
//! virtual clock and a seed. Prints the figures and writes a plot of hosts per group and
//! queue length over time.
//!
//! `cargo bench -p hatchery-scheduler --bench fleet_sim -- [--seed N] [--small] [--out FILE]`
//! (the plot goes to `target/fleet-sim.svg` unless `--out` says otherwise)

use std::path::PathBuf;

use anyhow::Context;
use hatchery_scheduler::simulation::{self, svg, SimConfig};

fn main() -> anyhow::Result<()> {
    let mut seed = 1u64;
    let mut small = false;
    // `cargo bench` runs a bench in its package's folder: the default goes to the
    // workspace's `target/`.
    let mut out = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/fleet-sim.svg"
    ));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seed" => {
                seed = args
                    .next()
                    .context("--seed needs a number")?
                    .parse()
                    .context("--seed needs a number")?
            }
            "--small" => small = true,
            "--out" => out = args.next().context("--out needs a file")?.into(),
            // What cargo bench passes to every bench.
            "--bench" => {}
            other => anyhow::bail!("unknown argument {other:?} (--seed N, --small, --out FILE)"),
        }
    }
    let cfg = if small {
        SimConfig::small(seed)
    } else {
        SimConfig::full(seed)
    };
    println!(
        "simulating {} executions from {} orgs over {} groups (seed {seed})",
        cfg.trace.executions,
        cfg.trace.orgs,
        cfg.groups.len()
    );
    let (report, timings) = simulation::run(&cfg);
    print!("{}", report.summary(&cfg.groups));
    let at = (report.peak_hosts * 9 / 10).max(1);
    if let Some((p50, p99, n)) = timings.placement_us(at) {
        println!(
            "placement (the real Cluster::place) with ≥ {at} hosts reporting: p50 {p50:.1} µs, p99 {p99:.1} µs over {n} calls"
        );
    }
    if let Some((fused, stages, n)) = timings.side_by_side_us(at) {
        println!(
            "  side by side on {n} of those calls: one pass p50 {fused:.1} µs, the three stages one after the other p50 {stages:.1} µs ({:.1}x)",
            stages / fused
        );
    }
    if let Some((p50, p99, n)) = timings.placement_us(0) {
        println!("placement over the whole run: p50 {p50:.1} µs, p99 {p99:.1} µs over {n} calls");
    }
    let mut plans = timings.plans.clone();
    plans.sort_unstable();
    if !plans.is_empty() {
        let at = |q: f64| plans[((plans.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        println!(
            "autoscaler passes: {} — p50 {:.0} µs, p99 {:.0} µs",
            plans.len(),
            at(0.5),
            at(0.99)
        );
    }
    println!("wall time {:.1} s", timings.wall.as_secs_f64());
    let names: Vec<String> = cfg.groups.iter().map(|g| g.name.clone()).collect();
    let title = format!(
        "{} executions, seed {seed}: peak {} hosts",
        cfg.trace.executions, report.peak_hosts
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&out, svg::plot(&report.samples, &names, &title))
        .with_context(|| format!("writing {}", out.display()))?;
    println!("plot: {}", out.display());
    Ok(())
}
