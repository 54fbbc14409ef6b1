//! Cold-start benchmark (not a test): how long a whole `sandbox run` takes, from spawn to
//! exit, next to the same command bare and under Debian's `bwrap`.
//!
//! ```text
//! cargo bench -p hatchery-sandbox --bench cold_start [-- --iterations N]
//! ```
//!
//! Two workloads, `/bin/true` and `Rscript -e 1`, each run by four runners (bare on the
//! host, `bwrap` on the same rootfs, `sandbox run`, `sandbox run --userns`) plus
//! `sandbox run --report`, whose report splits the total into the command's own wall time
//! and the sandbox's setup + teardown. Runs are interleaved round-robin (A B C D A B C D
//! ...) after warm-up rounds, so drift on a shared machine hits every variant alike; read
//! the ratios, not the absolute numbers. Must run as root (the sandbox needs it).
//!
//! Every child is waited for before the next one starts. Children get their own process
//! group, so a Ctrl-C reaches only this process: it lets the running child finish, prints
//! what it has measured so far and exits, leaving nothing behind.

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hatchery_sandbox::DEFAULT_ROOTFS;

const DEFAULT_TRUE_ITERATIONS: usize = 30;
const DEFAULT_R_ITERATIONS: usize = 10;
const DEFAULT_TRUE_WARMUP: usize = 3;
const DEFAULT_R_WARMUP: usize = 2;

/// The environment every runner's command sees (the sandbox sets the same defaults inside
/// and passes nothing from the host), so R does the same start-up work everywhere.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LANG: &str = "C.UTF-8";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Orphans of the runners are reparented to us, not to init, so none outlives a run.
fn become_subreaper() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

#[derive(Debug)]
struct Config {
    true_iterations: usize,
    r_iterations: usize,
    true_warmup: usize,
    r_warmup: usize,
}

const USAGE: &str = "\
usage: cargo bench -p hatchery-sandbox --bench cold_start [-- OPTIONS]

options:
  --iterations N     measured rounds for both workloads (default: 30 for /bin/true,
                     10 for Rscript -e 1)
  --r-iterations N   measured rounds for Rscript -e 1 only (applied after --iterations)
  --warmup N         warm-up rounds for both workloads (default: 3 and 2)
  --help             this text

environment:
  HATCHERY_ROOTFS    root filesystem (default: the rootfs-builder image)
  HATCHERY_SANDBOX   the sandbox binary (default: target/release/sandbox)";

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        true_iterations: DEFAULT_TRUE_ITERATIONS,
        r_iterations: DEFAULT_R_ITERATIONS,
        true_warmup: DEFAULT_TRUE_WARMUP,
        r_warmup: DEFAULT_R_WARMUP,
    };
    let mut r_override = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<usize, String> {
            let v = inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))?;
            v.parse::<usize>()
                .map_err(|_| format!("{name} expects a non-negative integer, got {v:?}"))
        };
        match flag.as_str() {
            // cargo passes --bench to every bench target; there is nothing to select.
            "--bench" => {}
            "--iterations" => {
                let n = value("--iterations")?.max(1);
                cfg.true_iterations = n;
                cfg.r_iterations = n;
            }
            "--r-iterations" => r_override = Some(value("--r-iterations")?.max(1)),
            "--warmup" => {
                let n = value("--warmup")?;
                cfg.true_warmup = n;
                cfg.r_warmup = n;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if let Some(n) = r_override {
        cfg.r_iterations = n;
    }
    Ok(cfg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    True,
    Rscript,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::True => "/bin/true",
            Workload::Rscript => "Rscript -e 1",
        }
    }

    fn argv(self) -> &'static [&'static str] {
        match self {
            Workload::True => &["/bin/true"],
            Workload::Rscript => &["Rscript", "-e", "1"],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Bare,
    Bwrap,
    Sandbox,
    SandboxUserns,
    /// `sandbox run --report FILE`: the same as `Sandbox` plus a report to split the time.
    SandboxReport,
}

const RUNNERS: [Runner; 5] = [
    Runner::Bare,
    Runner::Bwrap,
    Runner::Sandbox,
    Runner::SandboxUserns,
    Runner::SandboxReport,
];

impl Runner {
    fn label(self) -> &'static str {
        match self {
            Runner::Bare => "bare",
            Runner::Bwrap => "bwrap",
            Runner::Sandbox => "sandbox run",
            Runner::SandboxUserns => "sandbox run --userns",
            Runner::SandboxReport => "sandbox run --report",
        }
    }
}

struct Env {
    sandbox: PathBuf,
    rootfs: PathBuf,
    bwrap: PathBuf,
    /// Scratch space: HOME and TMPDIR of bare runs, stderr captures, reports.
    scratch: tempfile::TempDir,
}

impl Env {
    fn command(&self, runner: Runner, workload: Workload) -> Command {
        let argv = workload.argv();
        let mut cmd = match runner {
            Runner::Bare => {
                let mut c = Command::new(argv[0]);
                c.args(&argv[1..]);
                let home = self.scratch.path().join("home");
                c.env("HOME", &home).env("TMPDIR", self.scratch.path());
                c
            }
            Runner::Bwrap => {
                let mut c = Command::new(&self.bwrap);
                c.arg("--ro-bind")
                    .arg(&self.rootfs)
                    .arg("/")
                    .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
                    .args(["--unshare-all", "--die-with-parent", "--new-session"])
                    .args(["--cap-drop", "ALL", "--"])
                    .args(argv);
                c.env("HOME", "/tmp").env("TMPDIR", "/tmp");
                c
            }
            Runner::Sandbox | Runner::SandboxUserns | Runner::SandboxReport => {
                let mut c = Command::new(&self.sandbox);
                c.arg("run").arg("--rootfs").arg(&self.rootfs);
                if runner == Runner::SandboxUserns {
                    c.arg("--userns");
                }
                if runner == Runner::SandboxReport {
                    c.arg("--report").arg(self.report_path());
                }
                c.arg("--").args(argv);
                c
            }
        };
        // The sandbox ignores the host environment; give the others the same one it sets.
        cmd.env_clear().env("PATH", PATH).env("LANG", LANG);
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        // Out of the terminal's process group: Ctrl-C stops the benchmark between runs
        // instead of killing a supervisor half-way through its setup or teardown.
        cmd.process_group(0);
        cmd
    }

    fn report_path(&self) -> PathBuf {
        self.scratch.path().join("report.json")
    }

    fn stderr_path(&self) -> PathBuf {
        self.scratch.path().join("stderr")
    }
}

/// One measured run: total wall time, and for `--report` runs the command's own wall time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    total: Duration,
    /// Until every descendant (also those the runner orphaned) has been reaped.
    tree: Duration,
    inner_ms: Option<f64>,
}

/// Spawns the command, waits for it, and returns the wall time from spawn to reaped exit.
/// Any failure aborts the benchmark (there is no child left: it has been waited for).
fn run_once(env: &Env, runner: Runner, workload: Workload) -> Result<Sample, String> {
    let mut cmd = env.command(runner, workload);
    let stderr_path = env.stderr_path();
    let stderr = File::create(&stderr_path)
        .map_err(|e| format!("cannot create {}: {e}", stderr_path.display()))?;
    cmd.stderr(stderr);
    if runner == Runner::SandboxReport {
        let _ = std::fs::remove_file(env.report_path());
    }

    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn {cmd:?}: {e}"))?;
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for {cmd:?}: {e}"))?;
    let total = start.elapsed();
    // We are a child subreaper: whatever the runner left running or unreaped (bwrap exits
    // as soon as its pid-1 reports the exit code, without reaping it) is ours to wait for.
    reap_orphans()?;
    let tree = start.elapsed();

    if !status.success() {
        let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        return Err(format!(
            "{} {} failed ({status}): {cmd:?}\n--- stderr ---\n{}",
            runner.label(),
            workload.label(),
            err.trim_end()
        ));
    }
    let inner_ms = if runner == Runner::SandboxReport {
        Some(read_report_wall_ms(&env.report_path())?)
    } else {
        None
    };
    Ok(Sample {
        total,
        tree,
        inner_ms,
    })
}

/// Waits for every remaining descendant reparented to us, until there is none.
fn reap_orphans() -> Result<(), String> {
    loop {
        let mut status = 0;
        // SAFETY: plain waitpid on our own children.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ECHILD) => return Ok(()),
                Some(libc::EINTR) => continue,
                _ => return Err(format!("waitpid: {e}")),
            }
        }
    }
}

fn read_report_wall_ms(path: &Path) -> Result<f64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the report {}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("bad report {}: {e}", path.display()))?;
    v.get("wall_time_ms")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| format!("report {} has no wall_time_ms", path.display()))
}

/// The measurements of one workload, one vector of samples per runner (in `RUNNERS` order).
struct Results {
    workload: Workload,
    samples: Vec<Vec<Sample>>,
    planned: usize,
}

/// Warm-up rounds, then `iterations` measured rounds, each round running every runner once.
/// Stops early (keeping what it has) when a signal asked it to.
fn measure(
    env: &Env,
    workload: Workload,
    warmup: usize,
    iterations: usize,
) -> Result<Results, String> {
    eprint!("{}: warm-up ({warmup} rounds)", workload.label());
    for _ in 0..warmup {
        for runner in RUNNERS {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            run_once(env, runner, workload)?;
        }
    }
    eprint!(", measuring {iterations} rounds ");
    let mut samples = vec![Vec::with_capacity(iterations); RUNNERS.len()];
    'rounds: for round in 0..iterations {
        // Rotate the starting runner so none always follows the same neighbour.
        for k in 0..RUNNERS.len() {
            if STOP.load(Ordering::SeqCst) {
                break 'rounds;
            }
            let i = (round + k) % RUNNERS.len();
            samples[i].push(run_once(env, RUNNERS[i], workload)?);
        }
        eprint!(".");
        let _ = std::io::stderr().flush();
    }
    eprintln!();
    Ok(Results {
        workload,
        samples,
        planned: iterations,
    })
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: f64,
    p90: f64,
    min: f64,
}

/// Median, nearest-rank p90 and minimum of `values` (milliseconds).
fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let p90 = v[((0.9 * n as f64).ceil() as usize).clamp(1, n) - 1];
    Some(Stats {
        n,
        median,
        p90,
        min: v[0],
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn totals(samples: &[Sample]) -> Vec<f64> {
    samples.iter().map(|s| ms(s.total)).collect()
}

fn print_table(results: &[Results], floor: Option<f64>) {
    println!();
    println!(
        "{:<13} {:<21} {:>3} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9} {:>8} {:>9} {:>10}",
        "workload",
        "runner",
        "n",
        "median",
        "p90",
        "min",
        "-bare",
        "med/bare",
        "med/bwrap",
        "min/bare",
        "min/bwrap",
        "reaped"
    );
    println!("{}", "-".repeat(132));
    for r in results {
        let stat = |runner: Runner| {
            let i = RUNNERS.iter().position(|&x| x == runner).unwrap();
            stats(&totals(&r.samples[i]))
        };
        let bare = stat(Runner::Bare);
        let bwrap = stat(Runner::Bwrap);
        for (i, runner) in RUNNERS.iter().enumerate() {
            let Some(s) = stats(&totals(&r.samples[i])) else {
                continue;
            };
            let tree: Vec<f64> = r.samples[i].iter().map(|x| ms(x.tree)).collect();
            let reaped = stats(&tree).map_or(f64::NAN, |t| t.median);
            let ratio = |base: Option<Stats>, pick: fn(&Stats) -> f64| {
                base.map_or("-".to_string(), |b| format!("{:.2}", pick(&s) / pick(&b)))
            };
            let median = |x: &Stats| x.median;
            let min = |x: &Stats| x.min;
            println!(
                "{:<13} {:<21} {:>3} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>+8.2}ms {:>8} {:>9} {:>8} {:>9} {:>8.2}ms",
                r.workload.label(),
                runner.label(),
                s.n,
                s.median,
                s.p90,
                s.min,
                bare.map_or(f64::NAN, |b| s.median - b.median),
                ratio(bare, median),
                ratio(bwrap, median),
                ratio(bare, min),
                ratio(bwrap, min),
                reaped,
            );
        }
        if r.samples.iter().any(|s| s.len() < r.planned) {
            println!(
                "  (interrupted: fewer rounds than the {} planned)",
                r.planned
            );
        }
        println!();
    }
    if let Some(f) = floor {
        println!(
            "floor: spawn + wait of the host's /bin/true = {f:.2} ms (median).\n\
             -bare: median minus the bare median of the same workload. med/x: ratio of medians; \
             min/x: ratio of\n  minimums (the least disturbed runs: on a shared machine the \
             steadier of the two). reaped: median\n  time until every descendant is reaped too \
             (we are a child subreaper; bwrap exits without\n  reaping its pid 1)."
        );
    }
}

fn print_breakdown(results: &[Results]) {
    let i = RUNNERS
        .iter()
        .position(|&x| x == Runner::SandboxReport)
        .unwrap();
    println!();
    println!("where `sandbox run --report` spends its time (medians over the same runs):");
    println!(
        "{:<13} {:>10} {:>17} {:>17} {:>14}",
        "workload", "total", "released -> end", "outside that", "bare command"
    );
    for r in results {
        let s = &r.samples[i];
        let total = stats(&totals(s));
        let inner: Vec<f64> = s.iter().filter_map(|x| x.inner_ms).collect();
        let outside: Vec<f64> = s
            .iter()
            .filter_map(|x| x.inner_ms.map(|inner| ms(x.total) - inner))
            .collect();
        let bare = stats(&totals(&r.samples[0]));
        let (Some(total), Some(inner), Some(outside)) = (total, stats(&inner), stats(&outside))
        else {
            continue;
        };
        println!(
            "{:<13} {:>8.2}ms {:>15.2}ms {:>15.2}ms {:>12.2}ms",
            r.workload.label(),
            total.median,
            inner.median,
            outside.median,
            bare.map_or(f64::NAN, |b| b.median),
        );
    }
    println!(
        "  released -> end = the report's wall_time_ms: from the release of the sandbox's init \
         (after\n  cgroup attach) to the command's end; it includes the inside half of the \
         setup (mounts,\n  pivot_root, worker fork, capabilities, seccomp load, execve).\n  \
         outside that = per-run total minus it: supervisor exec, profile compile, cgroup \
         create +\n  attach, clone before; reap, usage read-out, cgroup removal, report write \
         after."
    );
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .as_deref()
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The release `sandbox` binary: $HATCHERY_SANDBOX, the one cargo built for this bench, or
/// the one next to the bench executable (target/release/deps/../sandbox).
fn find_sandbox() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("HATCHERY_SANDBOX") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("HATCHERY_SANDBOX={} is not a file", p.display()))
        };
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_sandbox"));
    if built.is_file() {
        return Ok(built);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("sandbox")));
    match beside {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(format!(
            "no sandbox binary at {}: build it with `cargo build --release -p hatchery-sandbox \
             --bin sandbox` or set HATCHERY_SANDBOX",
            built.display()
        )),
    }
}

fn setup() -> Result<Env, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("run as root: `sandbox run` creates namespaces and cgroups".into());
    }
    let sandbox = find_sandbox()?;
    let rootfs = std::env::var_os("HATCHERY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS));
    if !rootfs.join("bin/true").exists() || !rootfs.join("usr/bin/Rscript").exists() {
        return Err(format!(
            "no usable root filesystem at {} (it needs /bin/true and /usr/bin/Rscript): build \
             it with `cargo run --release -p rootfs-builder -- build \
             rootfs-builder/manifests/r.toml` or set HATCHERY_ROOTFS",
            rootfs.display()
        ));
    }
    let rootfs = rootfs
        .canonicalize()
        .map_err(|e| format!("cannot resolve {}: {e}", rootfs.display()))?;
    let bwrap = find_in_path("bwrap")
        .ok_or("bwrap not found: install it with `apt-get install -y bubblewrap`")?;
    if find_in_path("Rscript").is_none() {
        return Err("Rscript not found on the host: install r-base-core".into());
    }
    let scratch = tempfile::Builder::new()
        .prefix("hatchery-cold-start-")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    std::fs::create_dir(scratch.path().join("home"))
        .map_err(|e| format!("cannot create a scratch home: {e}"))?;
    Ok(Env {
        sandbox,
        rootfs,
        bwrap,
        scratch,
    })
}

fn first_line_of(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

fn cgroup_version(sandbox: &Path) -> String {
    let out = Command::new(sandbox)
        .arg("info")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    out.ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v.get("cgroup_version")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cold_start: {e}");
            return ExitCode::from(2);
        }
    };
    let env = match setup() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cold_start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = become_subreaper() {
        eprintln!("cold_start: {e}");
        return ExitCode::FAILURE;
    }
    install_signal_handlers();

    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("Hatchery cold-start benchmark");
    println!("  sandbox  {}", env.sandbox.display());
    println!("  rootfs   {}", env.rootfs.display());
    println!(
        "  bwrap    {} ({})",
        env.bwrap.display(),
        first_line_of(Command::new(&env.bwrap).arg("--version"))
    );
    println!(
        "  kernel {}, cgroup {}, nproc {nproc}",
        kernel.trim(),
        cgroup_version(&env.sandbox)
    );
    println!(
        "  rounds: /bin/true {} (+{} warm-up), Rscript -e 1 {} (+{} warm-up); \
         runners interleaved round-robin",
        cfg.true_iterations, cfg.true_warmup, cfg.r_iterations, cfg.r_warmup
    );
    println!("  loadavg at start: {}", loadavg());

    let mut results = Vec::new();
    let mut failure = None;
    for (workload, warmup, iterations) in [
        (Workload::True, cfg.true_warmup, cfg.true_iterations),
        (Workload::Rscript, cfg.r_warmup, cfg.r_iterations),
    ] {
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        match measure(&env, workload, warmup, iterations) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!();
                failure = Some(e);
                break;
            }
        }
    }
    let load_end = loadavg();

    let floor = results
        .iter()
        .find(|r| r.workload == Workload::True)
        .and_then(|r| stats(&totals(&r.samples[0])))
        .map(|s| s.median);
    print_table(&results, floor);
    print_breakdown(&results);
    println!();
    println!(
        "notes: wall time = spawn -> reaped exit of the whole runner process, stdout to \
         /dev/null.\n  \
         bwrap: --unshare-all --cap-drop ALL on the same rootfs; as root it also makes a user \
         namespace\n  (uid 0 -> 0) but sets up no cgroup and no seccomp filter, and runs the \
         command as root:\n  it does less work than `sandbox run` (cgroup v1/v2 + seccomp + \
         overlay + uid 65534).\n  \
         bare: the host's /bin/true and /usr/bin/Rscript, same PATH/LANG, a scratch HOME."
    );
    println!("  loadavg at start: see above; at end: {load_end} (nproc {nproc})");

    if let Some(e) = failure {
        eprintln!("cold_start: aborted: {e}");
        return ExitCode::FAILURE;
    }
    if STOP.load(Ordering::SeqCst) {
        eprintln!("cold_start: interrupted; the numbers above are partial");
        return ExitCode::from(130);
    }
    ExitCode::SUCCESS
}
