//! Python warm-start benchmark (not a test): a claimed, frozen Python sandbox next to R's
//! and to cold Python starts with the same imports, in one run.
//!
//! ```text
//! cargo build --release -p hatchery-sandbox --bins
//! cargo bench -p hatchery-sandbox --bench python_start [-- --rounds N --cold M]
//! ```
//!
//! Three pools (size 2): Python with numpy, pandas and statsmodels imported; R with no
//! package preloaded (the platform's default). Each round claims, in turn, `sum(range(10))`
//! and a pandas groupby + statsmodels OLS on the Python pool and `sum(1:10)` on R's, and
//! (for the first `--cold` rounds) runs the same Python workloads cold: bare
//! `python3 -c` with the same imports, chrooted into the same image, and the same inside
//! `sandbox run` with the same limits. Reported: claim → first user statement (the
//! sandbox's own clock, `start_ms`) and claim → result, medians; warm/cold ratios of the
//! whole run (target ≥ 50×) and Python's claim → first statement against R's (target
//! ≤ 2×). Machines are noisy: read the ratios. Must run as root.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use hatchery_sandbox::pool::{ExecRequest, ExecStatus, Pool, PoolConfig};
use hatchery_sandbox::zygote::server::Language;

const PY_SUM: &str = "sum(range(10))";
const PY_MODEL: &str = "import numpy as np, pandas as pd, statsmodels.api as sm\n\
    df = pd.DataFrame({'g': np.arange(200) % 4, 'x': np.arange(200.0)})\n\
    df['y'] = 2 * df['x'] + df['g']\n\
    means = df.groupby('g')['y'].mean()\n\
    fit = sm.OLS(df['y'], sm.add_constant(df['x'])).fit()\n\
    round(float(fit.params['x']), 6)";
const PY_IMPORTS: &str = "import numpy, pandas, statsmodels.api";
const R_SUM: &str = "sum(1:10)";

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Arg {
    rounds: usize,
    cold: usize,
}

fn args() -> Result<Arg, String> {
    let mut a = Arg {
        rounds: 30,
        cold: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match k.as_str() {
            "--rounds" => a.rounds = num("--rounds")?.max(1),
            "--cold" => a.cold = num("--cold")?,
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn rootfs() -> PathBuf {
    std::env::var_os("HATCHERY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/hatchery/rootfs/r"))
}

fn pool(language: Language) -> Result<Pool, String> {
    let mut pc = PoolConfig::new(language, rootfs());
    pc.size = 2;
    pc.sandbox_bin = PathBuf::from(env!("CARGO_BIN_EXE_sandbox"));
    pc.zygote_bin = PathBuf::from(env!("CARGO_BIN_EXE_hatchery-zygote"));
    let pool = Pool::start(pc).map_err(|e| format!("start a pool: {e}"))?;
    pool.wait_ready(2, Duration::from_secs(120))
        .map_err(|e| format!("pool not ready: {e}"))?;
    Ok(pool)
}

/// Claims `code` once: (claim → first statement, claim → result) in ms.
fn warm(pool: &Pool, code: &str) -> Result<(f64, f64), String> {
    let mut req = ExecRequest::new(code);
    req.timeout = Some(Duration::from_secs(60));
    let t = Instant::now();
    let exec = pool.claim(req).map_err(|e| format!("claim: {e}"))?;
    let rx = exec.events();
    let mut result = None;
    let mut result_ms = 0.0;
    for e in rx.iter() {
        if let hatchery_sandbox::pool::Event::Finished(r) = e {
            result_ms = t.elapsed().as_secs_f64() * 1e3;
            result = Some(r);
        }
    }
    let r = result.ok_or("no result")?;
    if r.status != ExecStatus::Succeeded {
        return Err(format!(
            "{code:?} did not succeed: {:?} {:?}",
            r.status, r.outcome
        ));
    }
    Ok((r.timings.start_ms.unwrap_or(f64::NAN), result_ms))
}

/// Runs a command to its end; its wall time in ms.
fn cold(cmd: &mut Command) -> Result<f64, String> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("spawn: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cold run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

fn bare(code: &str) -> Command {
    let mut c = Command::new("chroot");
    c.arg(rootfs())
        .args([
            "/usr/bin/env",
            "-i",
            "PATH=/usr/bin:/bin",
            "PYTHONDONTWRITEBYTECODE=1",
        ])
        .args([
            "OPENBLAS_NUM_THREADS=1",
            "MPLBACKEND=Agg",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(format!("{PY_IMPORTS}\n{code}"));
    c
}

fn sandboxed(code: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sandbox"));
    c.arg("run")
        .arg("--rootfs")
        .arg(rootfs())
        .args(["--memory", "512M", "--cpus", "1", "--timeout", "60s"])
        .args([
            "--env",
            "PYTHONDONTWRITEBYTECODE=1",
            "--env",
            "OPENBLAS_NUM_THREADS=1",
        ])
        .args(["--", "/usr/bin/python3", "-c"])
        .arg(format!("{PY_IMPORTS}\n{code}"));
    c
}

fn run(a: &Arg) -> Result<(), String> {
    println!(
        "python_start: rounds {}, cold {}; loadavg {}",
        a.rounds,
        a.cold,
        loadavg()
    );
    let py = pool(Language::Python {
        packages: vec!["numpy".into(), "pandas".into(), "statsmodels.api".into()],
    })?;
    let r = pool(Language::R { packages: vec![] })?;
    let names = [
        "python sum(range(10))",
        "python groupby + OLS",
        "R sum(1:10)",
    ];
    let mut start: [Vec<f64>; 3] = Default::default();
    let mut result: [Vec<f64>; 3] = Default::default();
    let mut cold_bare: [Vec<f64>; 2] = Default::default();
    let mut cold_sandbox: [Vec<f64>; 2] = Default::default();
    for round in 0..a.rounds {
        for (i, (p, code)) in [(&py, PY_SUM), (&py, PY_MODEL), (&r, R_SUM)]
            .iter()
            .enumerate()
        {
            // Let the last claim's refill finish, as when a request reaches an idle pool.
            std::thread::sleep(Duration::from_millis(60));
            let (s, t) = warm(p, code)?;
            start[i].push(s);
            result[i].push(t);
        }
        if round < a.cold {
            for (i, code) in [PY_SUM, PY_MODEL].iter().enumerate() {
                cold_bare[i].push(cold(&mut bare(code))?);
                cold_sandbox[i].push(cold(&mut sandboxed(code))?);
            }
        }
    }
    println!("\nwarm (median of {} claims each)", a.rounds);
    println!(
        "  {:<24} {:>22} {:>18}",
        "workload", "claim → 1st statement", "claim → result"
    );
    let mut starts = [0.0; 3];
    let mut results = [0.0; 3];
    for i in 0..3 {
        starts[i] = median(&mut start[i]);
        results[i] = median(&mut result[i]);
        println!(
            "  {:<24} {:>19.2} ms {:>15.2} ms",
            names[i], starts[i], results[i]
        );
    }
    if a.cold > 0 {
        println!("\ncold, same imports (median of {})", a.cold);
        for i in 0..2 {
            let b = median(&mut cold_bare[i]);
            let s = median(&mut cold_sandbox[i]);
            println!(
                "  {:<24} bare python3 -c {:>8.1} ms ({:>5.0}× warm)   sandbox run {:>8.1} ms ({:>5.0}× warm)",
                names[i],
                b,
                b / results[i],
                s,
                s / results[i]
            );
        }
        println!(
            "  target: warm ≥ 50× faster than cold (claim → result against the whole cold run)"
        );
    }
    println!(
        "\nPython / R claim → first statement: {:.2}× (target ≤ 2×)",
        starts[0] / starts[2]
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("python_start: run as root (pools create cgroups and namespaces)");
        return ExitCode::FAILURE;
    }
    match args().and_then(|a| run(&a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("python_start: {e}");
            ExitCode::FAILURE
        }
    }
}
