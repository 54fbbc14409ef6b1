//! Warm-pool benchmark (not a test): how fast a claimed, frozen R sandbox runs code, next
//! to floors measured the same way in the same run, and to cold `Rscript` starts.
//!
//! ```text
//! cargo build --release -p hatchery-sandbox --bins
//! cargo bench -p hatchery-sandbox --bench warm_pool [-- --warm N --cold M --seconds S ...]
//! ```
//!
//! Everything is measured in one run, interleaved, so drift on a shared machine hits every
//! variant alike; read the ratios, not the absolute numbers. Each ratio compares like with
//! like:
//!
//! 0. vCPU wake-up: a thread blocked in read(2) on a pipe is woken after the machine was
//!    left idle for a gap: the writer's CLOCK_MONOTONIC just before write(2) → the
//!    reader's just after its read(2) returned; reader unpinned, on the other CPU, on the
//!    writer's CPU. Interleaved with (1) and (2).
//! 1. floor: a process in its own cgroup under the hatchery parent, blocked reading a
//!    pipe, frozen. As a claim does with the code, one byte is written while it is frozen,
//!    then it is thawed; it answers with its own CLOCK_MONOTONIC timestamp. One-way:
//!    before the write → the process's own timestamp; round trip: before the write → its
//!    answer read here.
//! 2. warm: one pool (size 2) per workload, each preloading what its workload uses:
//!    `sum(1:10)` on a zygote with no package preloaded (the platform's default
//!    `r_packages = []`), a model fit on one with `stats,MASS,Matrix`. Claims ask for the
//!    platform default policy, which the pools write while pooled (as the agent's pools
//!    do), each with a full pool. One-way: claim → first user statement on the sandbox's
//!    CLOCK_MONOTONIC (`start_ms`), next to the floor's one-way; round trip: claim →
//!    `Started` received by the claiming thread, next to the floor's round trip. One refill
//!    fork is timed with the pool otherwise idle (`set_size(n + 1)` → n + 1 frozen), twice:
//!    right after the claim's own refill, and after a pause without forks (`--settle-ms`),
//!    when on cgroup v1 its cgroup attach waits for an RCU grace period (phase 5). In the
//!    same rounds one more pool for `sum(1:10)` is claimed as well, whose sandboxes do not
//!    fault in ahead the pages a first evaluation touches (`PoolConfig::prefault` off, as
//!    before: 2b), one that refills at the claim instead of after the claimed execution's
//!    result (`PoolConfig::refill_defer` off, as before: 2c), and on cgroup v2 one whose
//!    sandboxes are moved into their cgroups after their fork instead of born there
//!    (`PoolConfig::clone_into_cgroup` off: 2d); their idle sandboxes' memory is reported
//!    next to the default's. Before
//!    each claim (and its floor samples) the bench pauses as long, so that the pool's
//!    background work (the last refill, reaping) is over, as when a request reaches an
//!    idle warm pool.
//! 3. cold: `sandbox run` (with the same limits), `bwrap` and bare `Rscript -e CODE`, each
//!    loading what the workload's zygote preloaded, round-robin with warm executions of
//!    the same workloads: the warm/cold ratios come from this phase alone.
//! 4. memory of the idle pooled sandboxes (USS, PSS) and of each zygote (RSS, USS, PSS).
//!    A pool keeps `PoolConfig::prefault_ready` sandboxes (one by default) with their
//!    first pages populated; the others are reported apart: what one more costs.
//! 5. cgroup v1 attach: the first write of a fresh process's pid into a fresh cgroup's
//!    `cgroup.procs` after an idle gap (the kernel waits for an RCU grace period) next to
//!    the writes that follow it, in a cgroup parent of the bench's own, removed after. On
//!    a cgroup v2 host it is not measured, and the output says so.
//! 6. throughput: a pool of the default size, no package preloaded (the platform's
//!    default), K threads claiming `sum(1:10)` back to back; with the pool as it makes
//!    sandboxes now (several on their way at once, `PoolConfig::forks_in_flight`; the
//!    zygote's heap in huge pages, `PoolConfig::huge_pages`), the same with its refill at
//!    a low CPU weight (`PoolConfig::refill_cpu_weight`, not the default), the same in
//!    4 KiB pages, and as before (one fork at a time, 4 KiB pages): all four
//!    pools are up at once and take turns in slices of a few seconds, so that the
//!    machine's load changes fall on all of them alike.
//! 7. burst: N claims (default 100) at the same moment on a full pool of P (default 8):
//!    the distribution of claim asked → first user statement, whose tail is the refill
//!    rate; in the same four configurations, taking turns, R rounds each (default 3).
//!
//! Must run as root. Exits 0 unless something errors; a missed target is printed, not
//! failed. Nothing is left behind: the floor's cgroup and process, the attach cgroups and
//! processes, and the pools are torn down by Drop guards (also on panic), and every
//! execution is waited for until its sandbox is torn down.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hatchery_sandbox::cgroup::{CgroupRoot, CgroupVersion, SandboxCgroup, V1_CONTROLLERS};
use hatchery_sandbox::pool::{
    Event, ExecRequest, ExecStatus, Execution, Pool, PoolConfig, Timings, FORKS_IN_FLIGHT,
};
use hatchery_sandbox::zygote::server::Language;
use hatchery_sandbox::{Limits, DEFAULT_ROOTFS};

/// Set in the environment of a child of the bench: the bench binary then acts as the
/// floor's process (answer each byte read with a timestamp; exit on end of file).
const FLOOR_CHILD_ENV: &str = "HATCHERY_WARM_POOL_FLOOR_CHILD";

/// A workload, and what its pool preloads (a cold run loads the same).
struct Workload {
    name: &'static str,
    code: &'static str,
    expect: &'static str,
    /// Attached by the zygote with `library()` before it forks.
    packages: &'static [&'static str],
    /// What a cold `Rscript` runs first so that it has the same packages attached (stats
    /// is attached by R itself, in the zygote and in `Rscript` alike).
    cold_prelude: &'static str,
}

const SUM: Workload = Workload {
    name: "sum(1:10)",
    code: "sum(1:10)",
    expect: "55",
    packages: &[],
    cold_prelude: "",
};

const FIT: Workload = Workload {
    name: "model fit",
    code: "fit <- MASS::rlm(stack.loss ~ ., stackloss); print(coef(fit)); \
print(summary(lm(dist ~ speed, cars))$r.squared); \
print(sum(Matrix::crossprod(Matrix::Matrix(as.matrix(stackloss)))))",
    expect: "Air.Flow",
    packages: &["stats", "MASS", "Matrix"],
    cold_prelude: "suppressMessages({library(MASS); library(Matrix)}); ",
};

const WORKLOADS: [&Workload; 2] = [&SUM, &FIT];

/// The platform default policy (`EffectivePolicy::default()` in the scheduler), which the
/// agent writes into its pooled sandboxes and asks for at claim.
const DEFAULT_MEMORY: u64 = 512 << 20;
const DEFAULT_CPUS: f64 = 1.0;
const DEFAULT_PIDS: u64 = 128;
const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(60);

/// Frozen sandboxes per pool in phases 1 to 4.
const POOL_SIZE: usize = 2;

/// The environment cold runs see (the sandbox sets the same defaults inside).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const LANG: &str = "C.UTF-8";

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
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

fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the sandbox stamps its first statement with
/// (and `Instant`'s clock on Linux).
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Config {
    warm: usize,
    cold: usize,
    seconds: f64,
    slice: f64,
    threads: Vec<usize>,
    tp_pool: usize,
    burst: usize,
    burst_pool: usize,
    burst_rounds: usize,
    wake: usize,
    wake_gap: Duration,
    rcu: usize,
    rcu_gap: Duration,
    settle: Duration,
    rootfs: PathBuf,
    sandbox_bin: PathBuf,
    zygote_bin: PathBuf,
}

const USAGE: &str = "\
usage: cargo bench -p hatchery-sandbox --bench warm_pool [-- OPTIONS]

options (each also read from the environment variable named in brackets; a flag wins):
  --warm N          warm rounds (default 30): each claims both workloads, with 2 floor
                    samples and one timed refill fork per claim  [HATCHERY_BENCH_WARM]
  --cold M          measured cold rounds (default 8, +1 warm-up)  [HATCHERY_BENCH_COLD]
  --seconds S       how long each pool configuration is measured in the throughput
                    phase (default 10)  [HATCHERY_BENCH_SECONDS]
  --slice S         the configurations take turns in slices of S seconds (default 2)
                    [HATCHERY_BENCH_SLICE]
  --threads K[,K]   claiming threads of the throughput run(s) (default 4)
                    [HATCHERY_BENCH_THREADS]
  --tp-pool P       pool size of the throughput run (default: PoolConfig's, 2)
                    [HATCHERY_BENCH_TP_POOL]
  --burst N         simultaneous claims of the burst (default 100)  [HATCHERY_BENCH_BURST]
  --burst-pool P    pool size of the burst (default 8)  [HATCHERY_BENCH_BURST_POOL]
  --burst-rounds R  bursts per pool configuration, taking turns (default 3)
                    [HATCHERY_BENCH_BURST_ROUNDS]
  --wake N          vCPU wake-up samples per variant per warm round (default 2)
                    [HATCHERY_BENCH_WAKE]
  --wake-gap-ms G   idle time before each wake-up sample (default 20)
                    [HATCHERY_BENCH_WAKE_GAP_MS]
  --rcu N           cgroup v1 attach samples (default 10)  [HATCHERY_BENCH_RCU]
  --rcu-gap-ms G    idle time before each attach sample (default 200)
                    [HATCHERY_BENCH_RCU_GAP_MS]
  --settle-ms G     pause before each claim's floor samples and before the second refill
                    fork, so that the pool's own work (the last refill, reaping) is over,
                    as for a request reaching an idle warm pool (default 100)
                    [HATCHERY_BENCH_SETTLE_MS]
  --help            this text

environment:
  HATCHERY_ROOTFS   root filesystem (default /var/lib/hatchery/rootfs/r)
  HATCHERY_SANDBOX  the sandbox binary (default: the one cargo built, target/release/sandbox)
  HATCHERY_ZYGOTE   the hatchery-zygote binary (default: the one cargo built)";

/// The flags, and the environment variable each one may also come from.
const FLAGS: [(&str, &str); 14] = [
    ("--warm", "HATCHERY_BENCH_WARM"),
    ("--cold", "HATCHERY_BENCH_COLD"),
    ("--seconds", "HATCHERY_BENCH_SECONDS"),
    ("--slice", "HATCHERY_BENCH_SLICE"),
    ("--burst-rounds", "HATCHERY_BENCH_BURST_ROUNDS"),
    ("--threads", "HATCHERY_BENCH_THREADS"),
    ("--tp-pool", "HATCHERY_BENCH_TP_POOL"),
    ("--burst", "HATCHERY_BENCH_BURST"),
    ("--burst-pool", "HATCHERY_BENCH_BURST_POOL"),
    ("--wake", "HATCHERY_BENCH_WAKE"),
    ("--wake-gap-ms", "HATCHERY_BENCH_WAKE_GAP_MS"),
    ("--rcu", "HATCHERY_BENCH_RCU"),
    ("--rcu-gap-ms", "HATCHERY_BENCH_RCU_GAP_MS"),
    ("--settle-ms", "HATCHERY_BENCH_SETTLE_MS"),
];

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        warm: 30,
        cold: 8,
        seconds: 10.0,
        slice: 2.0,
        threads: vec![4],
        burst: 100,
        burst_pool: 8,
        burst_rounds: 3,
        tp_pool: PoolConfig::new(Language::R { packages: vec![] }, PathBuf::new()).size,
        wake: 2,
        wake_gap: Duration::from_millis(20),
        rcu: 10,
        rcu_gap: Duration::from_millis(200),
        settle: Duration::from_millis(100),
        rootfs: std::env::var_os("HATCHERY_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS)),
        sandbox_bin: find_bin("HATCHERY_SANDBOX", env!("CARGO_BIN_EXE_sandbox"), "sandbox")?,
        zygote_bin: find_bin(
            "HATCHERY_ZYGOTE",
            env!("CARGO_BIN_EXE_hatchery-zygote"),
            "hatchery-zygote",
        )?,
    };
    // (flag, value) pairs: the environment first, then the command line (which wins).
    let mut settings: Vec<(String, String)> = FLAGS
        .iter()
        .filter_map(|(flag, var)| Some((flag.to_string(), std::env::var(var).ok()?)))
        .collect();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            // cargo passes --bench to every bench target; there is nothing to select.
            "--bench" => {}
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            f if FLAGS.iter().any(|(name, _)| *name == f) => {
                let v = inline
                    .or_else(|| args.next())
                    .ok_or_else(|| format!("{f} needs a value"))?;
                settings.push((flag, v));
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    let int = |name: &str, v: &str| -> Result<usize, String> {
        v.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} expects a positive integer, got {v:?}"))
    };
    let positive = |name: &str, v: &str| -> Result<f64, String> {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0)
            .ok_or_else(|| format!("{name} expects a positive number, got {v:?}"))
    };
    for (flag, v) in settings {
        match flag.as_str() {
            "--warm" => cfg.warm = int(&flag, &v)?,
            "--cold" => cfg.cold = int(&flag, &v)?,
            "--tp-pool" => cfg.tp_pool = int(&flag, &v)?,
            "--burst" => cfg.burst = int(&flag, &v)?,
            "--burst-pool" => cfg.burst_pool = int(&flag, &v)?,
            "--burst-rounds" => cfg.burst_rounds = int(&flag, &v)?,
            "--wake" => cfg.wake = int(&flag, &v)?,
            "--rcu" => cfg.rcu = int(&flag, &v)?,
            "--wake-gap-ms" => cfg.wake_gap = Duration::from_millis(int(&flag, &v)? as u64),
            "--rcu-gap-ms" => cfg.rcu_gap = Duration::from_millis(int(&flag, &v)? as u64),
            "--settle-ms" => {
                cfg.settle = Duration::from_millis(
                    v.trim()
                        .parse::<u64>()
                        .map_err(|_| format!("--settle-ms expects milliseconds, got {v:?}"))?,
                )
            }
            "--slice" => cfg.slice = positive(&flag, &v)?,
            "--seconds" => cfg.seconds = positive(&flag, &v)?,
            "--threads" => {
                cfg.threads = v
                    .split(',')
                    .map(|t| int("--threads", t))
                    .collect::<Result<_, _>>()?;
            }
            _ => unreachable!("only known flags are collected"),
        }
    }
    Ok(cfg)
}

/// `$var`, the binary cargo built for this bench, or the one next to the bench executable
/// (target/release/deps/../NAME).
fn find_bin(var: &str, built: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    let built = PathBuf::from(built);
    if built.is_file() {
        return Ok(built);
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join(name)));
    match beside {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(format!(
            "no {name} binary at {}: build it with `cargo build --release -p hatchery-sandbox \
             --bins` or set {var}",
            built.display()
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Statistics

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    /// Finite samples (the statistics are over these).
    n: usize,
    median: f64,
    /// p99 with 100 samples or more, p90 below.
    tail: f64,
    tail_label: &'static str,
    min: f64,
    max: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

/// Statistics of the finite values, and how many were not (NaN: a sample that did not
/// produce this figure). The missing ones are printed, never dropped silently.
fn stats(values: &[f64]) -> (Option<Stats>, usize) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let missing = values.len() - v.len();
    if v.is_empty() {
        return (None, missing);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let (tail, tail_label) = if n >= 100 {
        (percentile(&v, 0.99), "p99")
    } else {
        (percentile(&v, 0.90), "p90")
    };
    (
        Some(Stats {
            n,
            median,
            tail,
            tail_label,
            min: v[0],
            max: v[n - 1],
        }),
        missing,
    )
}

fn summary(values: &[f64]) -> Option<Stats> {
    stats(values).0
}

struct Row {
    label: String,
    stats: Option<Stats>,
    missing: usize,
}

struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn new() -> Table {
        Table { rows: Vec::new() }
    }

    fn row(&mut self, label: impl Into<String>, values: &[f64]) -> Option<Stats> {
        let (s, missing) = stats(values);
        self.rows.push(Row {
            label: label.into(),
            stats: s,
            missing,
        });
        s
    }

    fn section(&mut self, label: impl Into<String>) {
        self.rows.push(Row {
            label: format!("## {}", label.into()),
            stats: None,
            missing: 0,
        });
    }

    fn print(&self) {
        println!(
            "{:<62} {:>4} {:>4} {:>9} {:>14} {:>9} {:>9}",
            "measurement (ms)", "n", "NaN", "median", "tail", "min", "max"
        );
        for r in &self.rows {
            match (r.label.strip_prefix("## "), r.stats) {
                (Some(section), _) => println!("-- {section}"),
                (None, Some(s)) => println!(
                    "{:<62} {:>4} {:>4} {:>9.3} {:>9.3} ({}) {:>9.3} {:>9.3}",
                    r.label, s.n, r.missing, s.median, s.tail, s.tail_label, s.min, s.max
                ),
                (None, None) => println!("{:<62} {:>4} {:>4}", r.label, 0, r.missing),
            }
        }
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

// ---------------------------------------------------------------------------------------
// 0. vCPU wake-up: an idle thread blocked on a pipe.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Unpinned,
    OtherCpu,
    SameCpu,
}

impl Wake {
    const ALL: [Wake; 3] = [Wake::Unpinned, Wake::OtherCpu, Wake::SameCpu];

    fn label(self) -> &'static str {
        match self {
            Wake::Unpinned => "reader and writer unpinned",
            Wake::OtherCpu => "reader pinned to the other CPU than the writer",
            Wake::SameCpu => "reader pinned to the writer's CPU",
        }
    }
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we own; CPU_ISSET reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins the calling thread to `cpu`.
fn pin_thread(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: sched_setaffinity(0) affects only the calling thread; the set is ours.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `n` wake-ups of a thread blocked in read(2) on a pipe, each after `gap` of sleep by
/// the writer: the writer's CLOCK_MONOTONIC just before write(2) → the reader's just
/// after its read(2) returned, in ms. `None`: the variant needs two CPUs.
fn wake_samples(which: Wake, n: usize, gap: Duration, cpus: &[usize]) -> Option<Vec<f64>> {
    let (writer_cpu, reader_cpu) = match which {
        Wake::Unpinned => (None, None),
        Wake::OtherCpu if cpus.len() >= 2 => (Some(cpus[0]), Some(cpus[1])),
        Wake::OtherCpu => return None,
        Wake::SameCpu => (cpus.first().copied(), cpus.first().copied()),
    };
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array we own; the descriptors are owned just below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return None;
    }
    // SAFETY: fresh descriptors nobody else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut reader = std::fs::File::from(r);
    let mut writer = std::fs::File::from(w);
    std::thread::scope(|s| {
        let read = s.spawn(move || {
            pin_thread(reader_cpu);
            let mut out = Vec::new();
            let mut b = [0u8; 8];
            while reader.read_exact(&mut b).is_ok() {
                let now = mono_ns();
                out.push(now.saturating_sub(u64::from_ne_bytes(b)) as f64 / 1e6);
            }
            out
        });
        s.spawn(move || {
            pin_thread(writer_cpu);
            // One more than asked: the first only makes sure the reader was blocked.
            for _ in 0..=n {
                std::thread::sleep(gap);
                let t = mono_ns();
                if writer.write_all(&t.to_ne_bytes()).is_err() {
                    break;
                }
            }
        });
        let mut out = read.join().unwrap_or_default();
        if !out.is_empty() {
            out.remove(0);
        }
        Some(out)
    })
}

// ---------------------------------------------------------------------------------------
// 1. The floor: a bare frozen process, thawed, answering with its own clock.

/// The floor's child: answer every byte read on stdin with its CLOCK_MONOTONIC timestamp
/// taken as soon as the read returned (8 bytes, native order) on stdout.
fn floor_child() -> ! {
    // SAFETY: prctl with integer arguments; read/write on our own stdio descriptors.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        let mut b = 0u8;
        loop {
            let n = libc::read(0, (&mut b as *mut u8).cast(), 1);
            if n == 1 {
                let now = mono_ns().to_ne_bytes();
                if libc::write(1, now.as_ptr().cast(), now.len()) != now.len() as isize {
                    libc::_exit(1);
                }
            } else if n == 0 {
                libc::_exit(0);
            } else if *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
    }
}

/// A child running [`floor_child`], with pipes to it.
struct Answerer {
    child: Option<Child>,
    to_child: Option<ChildStdin>,
    from_child: Option<ChildStdout>,
    pid: i32,
}

impl Answerer {
    fn spawn() -> Result<Answerer, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .env(FLOOR_CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn the floor child: {e}"))?;
        Ok(Answerer {
            pid: child.id() as i32,
            to_child: child.stdin.take(),
            from_child: child.stdout.take(),
            child: Some(child),
        })
    }

    fn send(&mut self) -> Result<(), String> {
        self.to_child
            .as_mut()
            .ok_or("the floor child is gone")?
            .write_all(b"x")
            .map_err(|e| format!("floor write: {e}"))
    }

    /// The child's CLOCK_MONOTONIC when it read the byte.
    fn answer(&mut self) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.from_child
            .as_mut()
            .ok_or("the floor child is gone")?
            .read_exact(&mut b)
            .map_err(|e| format!("floor read: {e}"))?;
        Ok(u64::from_ne_bytes(b))
    }

    /// Waits (briefly) until the child sleeps in read(2) again, as a pooled sandbox
    /// sleeps waiting for its code when it is frozen.
    fn wait_sleeping(&self) {
        for _ in 0..200 {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            if state == Some("S") {
                return;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Closes the pipe (the child exits on EOF), kills it anyway and reaps it. A frozen
    /// child must be thawed first (`before_wait`).
    fn stop(&mut self, before_wait: impl FnOnce()) {
        self.to_child.take();
        self.from_child.take();
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        before_wait();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// One floor sample, from the frozen state and back to it (ms).
#[derive(Debug, Clone, Copy)]
struct FloorSample {
    /// Before the write → the thawed process's own timestamp (like `start_ms`).
    one_way: f64,
    /// Before the write → its answer read here (like claim → `Started` received).
    round_trip: f64,
    /// The thaw alone (freezer write + read-back).
    thaw: f64,
    /// Context: a round trip with the process not frozen.
    unfrozen: f64,
    /// Context: writing limits (memory, cpu, pids) into its cgroup.
    limits: f64,
}

/// A frozen process in its own cgroup under the hatchery parent. Dropping it kills the
/// process and removes the cgroup (also on panic).
struct Floor {
    cgroup: Option<SandboxCgroup>,
    child: Answerer,
}

impl Floor {
    fn start(root: &CgroupRoot) -> Result<Floor, String> {
        let name = hatchery_sandbox::gc::unique_name("bench");
        let cgroup = root
            .create(&name)
            .map_err(|e| format!("floor cgroup: {e}"))?;
        let child = match Answerer::spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = cgroup.destroy();
                return Err(e);
            }
        };
        let mut floor = Floor {
            cgroup: Some(cgroup),
            child,
        };
        floor
            .cgroup()
            .add_process(floor.child.pid)
            .map_err(|e| format!("floor: {e}"))?;
        // One round trip so the child is up and blocked in read(2) before the first freeze.
        floor.child.send()?;
        floor.child.answer()?;
        floor.child.wait_sleeping();
        floor.cgroup().freeze().map_err(|e| format!("floor: {e}"))?;
        Ok(floor)
    }

    fn cgroup(&self) -> &SandboxCgroup {
        self.cgroup
            .as_ref()
            .expect("the floor cgroup lives until drop")
    }

    fn sample(&mut self, limits: &Limits) -> Result<FloorSample, String> {
        // As a claim: the clock starts, the input goes in while frozen, then the thaw.
        let t0 = mono_ns();
        let i0 = Instant::now();
        self.child.send()?;
        let i1 = Instant::now();
        self.cgroup()
            .thaw()
            .map_err(|e| format!("floor thaw: {e}"))?;
        let i2 = Instant::now();
        let stamp = self.child.answer()?;
        let i3 = Instant::now();
        // Context, not part of the floor.
        self.child.wait_sleeping();
        let i4 = Instant::now();
        self.child.send()?;
        self.child.answer()?;
        let i5 = Instant::now();
        self.cgroup()
            .apply(limits)
            .map_err(|e| format!("floor limits: {e}"))?;
        let i6 = Instant::now();
        self.child.wait_sleeping();
        self.cgroup()
            .freeze()
            .map_err(|e| format!("floor freeze: {e}"))?;
        Ok(FloorSample {
            one_way: stamp.saturating_sub(t0) as f64 / 1e6,
            round_trip: ms(i3 - i0),
            thaw: ms(i2 - i1),
            unfrozen: ms(i5 - i4),
            limits: ms(i6 - i5),
        })
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let cg = self.cgroup.take();
        self.child.stop(|| {
            if let Some(cg) = cg.as_ref() {
                let _ = cg.thaw();
            }
        });
        if let Some(cg) = cg {
            if let Err(e) = cg.destroy() {
                eprintln!("warm_pool: cannot remove the floor cgroup: {e}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 2. Warm executions through the pool.

#[derive(Debug, Clone, Copy, Default)]
struct WarmSample {
    /// Just before `claim()` → `claim()` returned.
    claim_call_ms: f64,
    /// Just before `claim()` → the `Started` event received.
    started_seen_ms: f64,
    /// Just before `claim()` → the first `Stdout` event received.
    first_out_ms: f64,
    /// Just before `claim()` → `Finished` received.
    result_ms: f64,
    /// Finished received → the watcher has torn the sandbox down.
    teardown_ms: f64,
    /// CPU time of the sandbox's cgroup (user, system), exit included.
    cpu_user_ms: f64,
    cpu_sys_ms: f64,
    timings: Timings,
}

/// The limits of the platform default policy.
fn default_limits() -> Limits {
    Limits {
        memory_bytes: Some(DEFAULT_MEMORY),
        cpus: Some(DEFAULT_CPUS),
        pids: Some(DEFAULT_PIDS),
    }
}

/// The request the agent builds for an execution at the platform default policy (its
/// other fields are the agent's defaults, which `ExecRequest::new` shares).
fn exec_request(code: &str) -> ExecRequest {
    let mut req = ExecRequest::new(code);
    req.limits = default_limits();
    req.timeout = Some(DEFAULT_TIME_LIMIT);
    req
}

/// Waits for the rest of an execution's events until its watcher has ended (it drops its
/// sender only after the sandbox is torn down).
fn drain(exec: &Execution) {
    while exec.events().recv().is_ok() {}
}

/// One claim, followed to its result; `expect` must appear in the output. Returns the
/// sample, the output, and the execution if not waited for until its teardown.
fn warm_run(
    pool: &Pool,
    code: &str,
    expect: &str,
    wait_teardown: bool,
) -> Result<(WarmSample, String, Option<Execution>), String> {
    let req = exec_request(code);
    let t0 = Instant::now();
    let exec = pool.claim(req).map_err(|e| format!("claim: {e}"))?;
    let mut s = WarmSample {
        claim_call_ms: ms(t0.elapsed()),
        started_seen_ms: f64::NAN,
        first_out_ms: f64::NAN,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let result = loop {
        match exec.events().recv() {
            Ok(Event::Started { .. }) => s.started_seen_ms = ms(t0.elapsed()),
            Ok(Event::Stdout { data }) => {
                if out.is_empty() {
                    s.first_out_ms = ms(t0.elapsed());
                }
                out.extend_from_slice(&data);
            }
            Ok(Event::Stderr { data }) => err.extend_from_slice(&data),
            Ok(Event::Finished(r)) => {
                s.result_ms = ms(t0.elapsed());
                break r;
            }
            Ok(_) => {}
            Err(_) => return Err("the execution ended without a result".into()),
        }
    };
    let out = String::from_utf8_lossy(&out).into_owned();
    if result.status != ExecStatus::Succeeded || !out.contains(expect) {
        return Err(format!(
            "warm {code:?}: {:?} {:?}, stdout {out:?}, stderr {:?}, outcome {:?}",
            result.status,
            result.error,
            String::from_utf8_lossy(&err),
            result.outcome
        ));
    }
    s.timings = result.timings;
    s.cpu_user_ms = result.usage.user_cpu_ns as f64 / 1e6;
    s.cpu_sys_ms = result.usage.system_cpu_ns as f64 / 1e6;
    if wait_teardown {
        let t = Instant::now();
        drain(&exec);
        s.teardown_ms = ms(t.elapsed());
        Ok((s, out, None))
    } else {
        Ok((s, out, Some(exec)))
    }
}

fn warm_once(pool: &Pool, w: &Workload) -> Result<WarmSample, String> {
    pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    Ok(warm_run(pool, w.code, w.expect, true)?.0)
}

/// One refill fork with the pool otherwise idle: from a full pool, `set_size(n + 1)` →
/// n + 1 frozen (the maintainer's fork path: fork, cgroup, containment, freeze), then
/// back to n.
fn refill_fork(pool: &Pool) -> Result<f64, String> {
    pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    pool.set_size(POOL_SIZE + 1);
    let grown = pool.wait_ready(POOL_SIZE + 1, Duration::from_secs(60));
    let took = ms(t.elapsed());
    pool.set_size(POOL_SIZE);
    grown.map_err(|e| format!("refill: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.stats().ready > POOL_SIZE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(took)
}

#[derive(Default)]
struct WarmSeries {
    samples: Vec<WarmSample>,
    /// One refill fork right after the claim's own refill (its cgroup attach follows
    /// another one closely).
    refill_busy_ms: Vec<f64>,
    /// One refill fork after `--settle-ms` without any (on cgroup v1 its attach then
    /// waits for an RCU grace period: see phase 5).
    refill_idle_ms: Vec<f64>,
}

impl WarmSeries {
    fn col(&self, f: impl Fn(&WarmSample) -> f64) -> Vec<f64> {
        self.samples.iter().map(f).collect()
    }
}

// ---------------------------------------------------------------------------------------
// 3. Cold starts.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Cold {
    Sandbox,
    Bwrap,
    Bare,
}

impl Cold {
    fn label(self) -> &'static str {
        match self {
            Cold::Sandbox => "cold `sandbox run` (same limits) Rscript",
            Cold::Bwrap => "cold `bwrap` Rscript (no limits)",
            Cold::Bare => "cold bare host Rscript (no limits)",
        }
    }
}

/// One cold `Rscript -e PRELUDE+CODE`: wall time (ms) and stdout.
fn cold_run(
    cfg: &Config,
    scratch: &Path,
    which: Cold,
    script: &str,
) -> Result<(f64, String), String> {
    let limits = [
        "--memory".to_string(),
        format!("{}M", DEFAULT_MEMORY >> 20),
        "--cpus".to_string(),
        format!("{DEFAULT_CPUS}"),
        "--pids".to_string(),
        format!("{DEFAULT_PIDS}"),
        "--timeout".to_string(),
        format!("{}s", DEFAULT_TIME_LIMIT.as_secs()),
    ];
    let mut cmd = match which {
        Cold::Sandbox => {
            let mut c = Command::new(&cfg.sandbox_bin);
            c.arg("run").arg("--rootfs").arg(&cfg.rootfs).args(limits);
            c
        }
        Cold::Bwrap => {
            let mut c = Command::new("bwrap");
            c.arg("--ro-bind")
                .arg(&cfg.rootfs)
                .arg("/")
                .args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"])
                .args(["--unshare-all", "--die-with-parent", "--new-session"])
                .args(["--cap-drop", "ALL"]);
            c
        }
        Cold::Bare => Command::new("env"),
    };
    cmd.args(["--", "Rscript", "-e", script]);
    cmd.env_clear().env("PATH", PATH).env("LANG", LANG);
    match which {
        Cold::Bare => {
            cmd.env("HOME", scratch).env("TMPDIR", scratch);
        }
        _ => {
            cmd.env("HOME", "/tmp").env("TMPDIR", "/tmp");
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let t0 = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("{}: {e}", which.label()))?;
    let took = ms(t0.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "{} {script:?} failed ({}): stdout {stdout:?} stderr {:?}",
            which.label(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((took, stdout))
}

fn cold_once(cfg: &Config, scratch: &Path, which: Cold, w: &Workload) -> Result<f64, String> {
    let (took, stdout) = cold_run(
        cfg,
        scratch,
        which,
        &format!("{}{}", w.cold_prelude, w.code),
    )?;
    if !stdout.contains(w.expect) {
        return Err(format!(
            "{} {}: no {:?} in {stdout:?}",
            which.label(),
            w.name,
            w.expect
        ));
    }
    Ok(took)
}

/// What is attached in the search path: in the workload's warm sandbox, and in a cold
/// `sandbox run -- Rscript` after the workload's prelude.
fn attached(cfg: &Config, scratch: &Path, pool: &Pool, w: &Workload) -> (String, String) {
    const SEARCH: &str = "cat(search(), '\\n')";
    let warm = pool
        .wait_ready(POOL_SIZE, Duration::from_secs(60))
        .map_err(|e| e.to_string())
        .and_then(|_| warm_run(pool, SEARCH, "", true))
        .map_or_else(|e| format!("? ({e})"), |(_, out, _)| out.trim().to_string());
    let cold = cold_run(
        cfg,
        scratch,
        Cold::Sandbox,
        &format!("{}{SEARCH}", w.cold_prelude),
    )
    .map_or_else(|e| format!("? ({e})"), |(_, out)| out.trim().to_string());
    (warm, cold)
}

// ---------------------------------------------------------------------------------------
// 4. Memory of the idle pool.

#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss_kb: u64,
    pss_kb: u64,
    private_kb: u64,
    pte_kb: u64,
    huge_kb: u64,
}

impl std::ops::AddAssign for Mem {
    fn add_assign(&mut self, o: Mem) {
        self.rss_kb += o.rss_kb;
        self.pss_kb += o.pss_kb;
        self.private_kb += o.private_kb;
        self.pte_kb += o.pte_kb;
        self.huge_kb += o.huge_kb;
    }
}

fn kb_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mem_of(pid: i32) -> Option<Mem> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Some(Mem {
        rss_kb: kb_field(&rollup, "Rss:"),
        pss_kb: kb_field(&rollup, "Pss:"),
        private_kb: kb_field(&rollup, "Private_Clean:") + kb_field(&rollup, "Private_Dirty:"),
        pte_kb: kb_field(&status, "VmPTE:"),
        huge_kb: kb_field(&rollup, "AnonHugePages:"),
    })
}

fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The cgroup's charged memory (v2 memory.current, or v1 memory.usage_in_bytes in the
/// memory hierarchy next to the cpuacct directory we are given).
fn cgroup_memory(dir: &Path) -> Option<u64> {
    if let Some(v) = read_u64(&dir.join("memory.current")) {
        return Some(v);
    }
    let s = dir.to_string_lossy().replacen("/cpuacct/", "/memory/", 1);
    read_u64(&Path::new(&s).join("memory.usage_in_bytes"))
}

struct PoolMemory {
    /// Per frozen sandbox: processes, their memory, what its cgroup is charged, whether
    /// it populated the pages a first statement touches (`PoolConfig::prefault_ready`).
    sandboxes: Vec<(usize, Mem, Option<u64>, bool)>,
    /// The zygote: the parent of the sandboxes' processes.
    zygote: Option<(i32, Mem)>,
}

impl PoolMemory {
    /// The mean USS and PSS of its sandboxes that populated their first pages
    /// (`populated`) or not, in KiB (`None` without any).
    fn mean_uss_pss_kb(&self, populated: bool) -> Option<(u64, u64)> {
        let of: Vec<&Mem> = self
            .sandboxes
            .iter()
            .filter(|s| s.3 == populated)
            .map(|s| &s.1)
            .collect();
        let n = of.len() as u64;
        (n > 0).then(|| {
            let sum = |f: fn(&Mem) -> u64| of.iter().map(|m| f(m)).sum::<u64>();
            (sum(|m| m.private_kb) / n, sum(|m| m.pss_kb) / n)
        })
    }
}

fn pool_memory(pool: &Pool) -> PoolMemory {
    let mut sandboxes = Vec::new();
    let mut zygote = None;
    for (dir, populated) in pool.frozen_sandboxes() {
        let pids: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        let mut m = Mem::default();
        for &p in &pids {
            if let Some(x) = mem_of(p) {
                m += x;
            }
            if zygote.is_none() {
                if let Some(pp) = ppid_of(p).filter(|pp| !pids.contains(pp)) {
                    zygote = mem_of(pp).map(|m| (pp, m));
                }
            }
        }
        sandboxes.push((pids.len(), m, cgroup_memory(&dir), populated));
    }
    PoolMemory { sandboxes, zygote }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------
// 5. The first cgroup v1 attach after an idle spell.

/// A cgroup parent of the bench's own with the attach samples' cgroups and processes;
/// dropping it kills the processes and removes the cgroups and the parent.
struct AttachParent {
    root: CgroupRoot,
    cgroups: Vec<SandboxCgroup>,
    children: Vec<Answerer>,
}

impl AttachParent {
    fn new() -> Result<AttachParent, String> {
        let parent = format!(
            "{}/bench-attach-{}",
            hatchery_sandbox::run::DEFAULT_CGROUP_PARENT,
            std::process::id()
        );
        let root = CgroupRoot::detect(&parent).map_err(|e| format!("cgroups: {e}"))?;
        Ok(AttachParent {
            root,
            cgroups: Vec::new(),
            children: Vec::new(),
        })
    }

    /// Kills the sample's processes and removes its cgroups.
    fn clear(&mut self) {
        for mut c in self.children.drain(..) {
            c.stop(|| {});
        }
        for cg in self.cgroups.drain(..) {
            if let Err(e) = cg.destroy() {
                eprintln!("warm_pool: cannot remove an attach cgroup: {e}");
            }
        }
    }
}

impl Drop for AttachParent {
    fn drop(&mut self) {
        self.clear();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !matches!(self.root.remove_if_empty(), Ok(true)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Writes of two fresh processes' pids into two fresh cgroups, one controller after the
/// other (`V1_CONTROLLERS` order), after `gap` with no attach by this bench (ms).
struct AttachSample {
    /// The first process: the first write, then the other controllers.
    first: Vec<f64>,
    /// The second process, right after: all controllers.
    second: Vec<f64>,
}

fn attach_once(parent: &mut AttachParent, gap: Duration) -> Result<AttachSample, String> {
    for _ in 0..2 {
        let cg = parent
            .root
            .create(&hatchery_sandbox::gc::unique_name("attach"))
            .map_err(|e| format!("attach cgroup: {e}"))?;
        parent.cgroups.push(cg);
        parent.children.push(Answerer::spawn()?);
    }
    std::thread::sleep(gap);
    let mut times = [Vec::new(), Vec::new()];
    for (k, per_process) in times.iter_mut().enumerate() {
        let pid = parent.children[k].pid.to_string();
        for c in V1_CONTROLLERS {
            let file = parent.cgroups[k].dir(c).join("cgroup.procs");
            let t = Instant::now();
            std::fs::write(&file, &pid).map_err(|e| format!("{}: {e}", file.display()))?;
            per_process.push(ms(t.elapsed()));
        }
    }
    parent.clear();
    let [first, second] = times;
    Ok(AttachSample { first, second })
}

// ---------------------------------------------------------------------------------------
// 6. Throughput.

struct Throughput {
    threads: usize,
    refill: Refill,
    pool_size: usize,
    elapsed_s: f64,
    done: usize,
    result_ms: Vec<f64>,
    start_ms: Vec<f64>,
    queued_ms: Vec<f64>,
    waited: usize,
    failures: Vec<String>,
    forked: u64,
}

/// (claim → result, claim → first statement, queued, when the result arrived)
type TpSample = (f64, f64, f64, Instant);

/// A `sum(1:10)` pool claimed in the same rounds as the default one (phase 2), made
/// differently.
struct AltPool {
    section: &'static str,
    what: &'static str,
    /// `PoolConfig::prefault`.
    prefault: bool,
    /// `PoolConfig::clone_into_cgroup`; `false` is measured on cgroup v2 only (on v1 the
    /// pool always moves its sandboxes).
    into_cgroup: bool,
    /// `PoolConfig::refill_defer` at its default; `false`: `None`.
    defer: bool,
}

const ALT_POOLS: [AltPool; 3] = [
    AltPool {
        section: "2b",
        what: "without faulting in ahead the pages a first evaluation touches (prefault \
               off, as before)",
        prefault: false,
        into_cgroup: true,
        defer: true,
    },
    AltPool {
        section: "2c",
        what: "refilling at the claim instead of after the claimed execution's result \
               (refill_defer off, as before)",
        prefault: true,
        into_cgroup: true,
        defer: false,
    },
    AltPool {
        section: "2d",
        what: "with each sandbox moved into its cgroup after its fork (cgroup v2; not born \
               in it)",
        prefault: true,
        into_cgroup: false,
        defer: true,
    },
];

/// How a pool makes its sandboxes: the throughput and burst phases run each of
/// [`REFILLS`] side by side.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Refill {
    /// `PoolConfig::forks_in_flight`.
    in_flight: usize,
    /// `PoolConfig::huge_pages`.
    huge_pages: bool,
    /// `PoolConfig::refill_cpu_weight` = `REFILL_CPU_WEIGHT` (the refill in the
    /// background); `false`: the default, a sandbox's weight.
    background: bool,
    /// `PoolConfig::clone_into_cgroup`: on cgroup v2 each sandbox is born in its cgroup
    /// (the default); `false`, it is moved there after its fork, as before.
    into_cgroup: bool,
}

/// The configurations the throughput and burst phases compare: [`REFILLS`], and on
/// cgroup v2 also the default with each sandbox moved into its cgroup after its fork
/// (on v1 that is what every configuration does).
fn refills(version: CgroupVersion) -> Vec<Refill> {
    let mut all = REFILLS.to_vec();
    if version == CgroupVersion::V2 {
        all.insert(
            1,
            Refill {
                into_cgroup: false,
                ..REFILLS[0]
            },
        );
    }
    all
}

/// The pool as it makes sandboxes now (the default configuration); the same with its
/// refill in the background (`refill_cpu_weight`, not the default); the same in 4 KiB
/// pages; and as it did before (one fork at a time, 4 KiB pages, on cgroup v2 each
/// sandbox moved into its cgroup after its fork).
const REFILLS: [Refill; 4] = [
    Refill {
        in_flight: FORKS_IN_FLIGHT,
        huge_pages: true,
        background: false,
        into_cgroup: true,
    },
    Refill {
        in_flight: FORKS_IN_FLIGHT,
        huge_pages: true,
        background: true,
        into_cgroup: true,
    },
    Refill {
        in_flight: FORKS_IN_FLIGHT,
        huge_pages: false,
        background: false,
        into_cgroup: true,
    },
    Refill {
        in_flight: 1,
        huge_pages: false,
        background: false,
        into_cgroup: false,
    },
];

impl std::fmt::Display for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let forks = match self.in_flight {
            1 => "one fork at a time".to_string(),
            n => format!("{n} forks in flight"),
        };
        let pages = if self.huge_pages {
            "huge pages"
        } else {
            "4 KiB pages"
        };
        let weight = if self.background {
            ", refill in the background"
        } else {
            ""
        };
        let moved = if self.into_cgroup {
            ""
        } else {
            ", moved into its cgroup"
        };
        let before = if *self == REFILLS[REFILLS.len() - 1] {
            " (before)"
        } else {
            ""
        };
        write!(f, "{forks}, {pages}{weight}{moved}{before}")
    }
}

/// A full pool of `size` for `sum(1:10)` made as `refill` says, claims waiting up to
/// `claim_timeout` (`what` names it in errors).
fn loaded_pool(
    cfg: &Config,
    what: &str,
    size: usize,
    refill: Refill,
    claim_timeout: Duration,
) -> Result<Pool, String> {
    let mut pc = pool_config(cfg, &SUM, size);
    pc.claim_timeout = claim_timeout;
    pc.forks_in_flight = refill.in_flight;
    pc.huge_pages = refill.huge_pages;
    pc.clone_into_cgroup = refill.into_cgroup;
    if refill.background {
        pc.refill_cpu_weight = Some(hatchery_sandbox::pool::REFILL_CPU_WEIGHT);
    }
    let pool = Pool::start(pc).map_err(|e| format!("{what} pool: {e}"))?;
    pool.wait_ready(size, Duration::from_secs(180))
        .map_err(|e| format!("{what} pool: {e}"))?;
    Ok(pool)
}

/// Every configuration of [`REFILLS`] with `threads` claiming threads, each for
/// `cfg.seconds` in all, in turns of `cfg.slice` seconds (the order rotating every
/// round), so that a change in the machine's load falls on all of them alike.
fn throughput(cfg: &Config, refills: &[Refill], threads: usize) -> Result<Vec<Throughput>, String> {
    let pools = refills
        .iter()
        .map(|&refill| {
            loaded_pool(
                cfg,
                "throughput",
                cfg.tp_pool,
                refill,
                Duration::from_secs(60),
            )
        })
        .collect::<Result<Vec<Pool>, String>>()?;
    let mut out: Vec<Throughput> = refills
        .iter()
        .map(|&refill| Throughput {
            threads,
            refill,
            pool_size: cfg.tp_pool,
            elapsed_s: 0.0,
            done: 0,
            result_ms: Vec::new(),
            start_ms: Vec::new(),
            queued_ms: Vec::new(),
            waited: 0,
            failures: Vec::new(),
            forked: 0,
        })
        .collect();
    let rounds = (cfg.seconds / cfg.slice).ceil().max(1.0) as usize;
    let slice = cfg.seconds / rounds as f64;
    for round in 0..rounds {
        for k in 0..refills.len() {
            if stopped() {
                break;
            }
            let i = (round + k) % refills.len();
            throughput_slice(&pools[i], threads, slice, &mut out[i]);
        }
    }
    drop(pools);
    Ok(out)
}

/// `threads` threads claiming `sum(1:10)` back to back on `pool` for `seconds`; adds what
/// they did to `into`.
fn throughput_slice(pool: &Pool, threads: usize, seconds: f64, into: &mut Throughput) {
    let forked_before = pool.stats().forked;
    let results: Mutex<Vec<TpSample>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut pending = Vec::new();
                while Instant::now() < deadline && !stopped() {
                    match warm_run(pool, SUM.code, SUM.expect, false) {
                        Ok((s, _, exec)) => {
                            results.lock().unwrap().push((
                                s.result_ms,
                                s.timings.start_ms.unwrap_or(f64::NAN),
                                s.timings.queued_ms,
                                Instant::now(),
                            ));
                            pending.extend(exec);
                        }
                        Err(e) => {
                            let mut f = failures.lock().unwrap();
                            f.push(e);
                            if f.len() > 20 {
                                break;
                            }
                        }
                    }
                }
                // Every sandbox torn down before the next slice.
                for exec in pending {
                    drain(&exec);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    // Until the last result (the teardown of the last sandboxes is not counted).
    into.elapsed_s += results
        .iter()
        .map(|r| (r.3 - start).as_secs_f64())
        .fold(0.0, f64::max);
    into.forked += pool.stats().forked - forked_before;
    into.done += results.len();
    into.result_ms.extend(results.iter().map(|r| r.0));
    into.start_ms.extend(results.iter().map(|r| r.1));
    into.queued_ms.extend(results.iter().map(|r| r.2));
    into.waited += results.iter().filter(|r| r.2 > 1.0).count();
    into.failures.extend(failures.into_inner().unwrap());
}

// ---------------------------------------------------------------------------------------
// 7. Burst.

struct Burst {
    refill: Refill,
    pool_size: usize,
    /// Each claim: asked → its first user statement (`queued_ms` + `start_ms`).
    first_statement_ms: Vec<f64>,
    /// Asked → the result.
    result_ms: Vec<f64>,
    /// Per round: asked → the last of the claims' first statements.
    all_started_ms: Vec<f64>,
    failures: Vec<String>,
}

impl Burst {
    /// The median over rounds of asked → the last first statement.
    fn last_ms(&self) -> f64 {
        let mut v = self.all_started_ms.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            f64::NAN
        } else {
            percentile(&v, 0.5)
        }
    }

    /// Sandboxes per second of the median round.
    fn rate(&self) -> f64 {
        let per_round =
            self.first_statement_ms.len() as f64 / self.all_started_ms.len().max(1) as f64;
        per_round / (self.last_ms() / 1e3).max(1e-9)
    }
}

/// `cfg.burst` claims of `sum(1:10)` at the same moment on a full pool of
/// `cfg.burst_pool`: all but the pool's first sandboxes wait for refills.
fn burst(cfg: &Config, refill: Refill) -> Result<Burst, String> {
    let pool = loaded_pool(
        cfg,
        "burst",
        cfg.burst_pool,
        refill,
        Duration::from_secs(120),
    )?;
    // As a request reaching an idle pool: its background work is over.
    std::thread::sleep(cfg.settle.max(Duration::from_millis(100)));
    let barrier = std::sync::Barrier::new(cfg.burst);
    let samples: Mutex<Vec<(f64, f64)>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let pending: Mutex<Vec<Execution>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..cfg.burst {
            scope.spawn(|| {
                barrier.wait();
                match warm_run(&pool, SUM.code, SUM.expect, false) {
                    Ok((s, _, exec)) => {
                        let first = s.timings.queued_ms + s.timings.start_ms.unwrap_or(f64::NAN);
                        samples.lock().unwrap().push((first, s.result_ms));
                        pending.lock().unwrap().extend(exec);
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            });
        }
    });
    for exec in pending.into_inner().unwrap() {
        drain(&exec);
    }
    drop(pool);
    let samples = samples.into_inner().unwrap();
    Ok(Burst {
        refill,
        pool_size: cfg.burst_pool,
        all_started_ms: vec![samples.iter().map(|s| s.0).fold(0.0, f64::max)],
        first_statement_ms: samples.iter().map(|s| s.0).collect(),
        result_ms: samples.iter().map(|s| s.1).collect(),
        failures: failures.into_inner().unwrap(),
    })
}

// ---------------------------------------------------------------------------------------

fn pool_config(cfg: &Config, w: &Workload, size: usize) -> PoolConfig {
    let mut pc = PoolConfig::new(
        Language::R {
            packages: w.packages.iter().map(|p| p.to_string()).collect(),
        },
        cfg.rootfs.clone(),
    );
    pc.size = size;
    pc.sandbox_bin = cfg.sandbox_bin.clone();
    pc.zygote_bin = cfg.zygote_bin.clone();
    // As the agent does with the platform's default policy: the pool writes these limits
    // while a sandbox is pooled, so a claim at the default limits writes none.
    pc.default_limits = Some(default_limits());
    pc
}

fn packages_of(w: &Workload) -> String {
    if w.packages.is_empty() {
        "none".into()
    } else {
        w.packages.join(",")
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> ExitCode {
    if std::env::var_os(FLOOR_CHILD_ENV).is_some() {
        floor_child();
    }
    let cfg = match parse_args() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warm_pool: {e}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    match run(&cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warm_pool: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cfg: &Config) -> Result<(), String> {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpus = allowed_cpus();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let root = CgroupRoot::detect(hatchery_sandbox::run::DEFAULT_CGROUP_PARENT)
        .map_err(|e| format!("cgroups: {e}"))?;
    let load_start = loadavg();
    println!("Hatchery warm-pool benchmark");
    println!("  sandbox  {}", cfg.sandbox_bin.display());
    println!("  zygote   {}", cfg.zygote_bin.display());
    println!("  rootfs   {}", cfg.rootfs.display());
    println!(
        "  kernel {}, cgroup {}, nproc {nproc}, cpus {cpus:?}",
        kernel.trim(),
        root.version(),
    );
    println!(
        "  pools of {POOL_SIZE}, one per workload, each preloading what its workload uses: \
         {} → {}; {} → {}",
        SUM.name,
        packages_of(&SUM),
        FIT.name,
        packages_of(&FIT)
    );
    println!(
        "  warm {} rounds (per claim: {} ms settle, 2 floor samples, the claim, 1 refill fork, \
         {} ms settle, 1 refill fork; per round: {} wake-up samples per variant after {} ms idle); cold {} \
         rounds (+1 warm-up); attach {} samples after {} ms idle; throughput {} s per \
         configuration in slices of about {} s with threads {:?} on pools of {}; bursts {} rounds",
        cfg.warm,
        cfg.settle.as_millis(),
        cfg.settle.as_millis(),
        cfg.wake,
        cfg.wake_gap.as_millis(),
        cfg.cold,
        cfg.rcu,
        cfg.rcu_gap.as_millis(),
        cfg.seconds,
        cfg.slice,
        cfg.threads,
        cfg.tp_pool,
        cfg.burst_rounds
    );
    println!(
        "  limits per claim: the platform default policy, memory {} MiB, cpus {DEFAULT_CPUS}, \
         pids {DEFAULT_PIDS}, time {} s; written while pooled (pool default_limits), so the \
         claim writes none (the floor's `write limits` row shows what other limits add); cold \
         `sandbox run` gets the same limits",
        DEFAULT_MEMORY >> 20,
        DEFAULT_TIME_LIMIT.as_secs()
    );
    println!("  loadavg at start: {load_start}");
    let scratch = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;

    // ---- setup: the floor process and one pool per workload
    let mut floor = Floor::start(&root)?;
    let t = Instant::now();
    let pools = [
        Pool::start(pool_config(cfg, &SUM, POOL_SIZE)).map_err(|e| format!("pool: {e}"))?,
        Pool::start(pool_config(cfg, &FIT, POOL_SIZE)).map_err(|e| format!("pool: {e}"))?,
    ];
    // The same pool for sum(1:10) whose sandboxes do not fault in ahead the pages a
    // first evaluation touches (PoolConfig::prefault off, as before), and on cgroup v2
    // one whose sandboxes are moved into their cgroups after their fork: claimed in the
    // same rounds, side by side.
    let alts: Vec<&AltPool> = ALT_POOLS
        .iter()
        .filter(|a| a.into_cgroup || root.version() == CgroupVersion::V2)
        .collect();
    let alt_pools = alts
        .iter()
        .map(|alt| {
            let mut pc = pool_config(cfg, &SUM, POOL_SIZE);
            pc.prefault = alt.prefault;
            pc.clone_into_cgroup = alt.into_cgroup;
            if !alt.defer {
                pc.refill_defer = None;
            }
            Pool::start(pc).map_err(|e| format!("pool: {e}"))
        })
        .collect::<Result<Vec<Pool>, String>>()?;
    for pool in &alt_pools {
        pool.wait_ready(POOL_SIZE, Duration::from_secs(180))
            .map_err(|e| format!("pool: {e}"))?;
    }
    for (w, pool) in WORKLOADS.iter().zip(&pools) {
        pool.wait_ready(POOL_SIZE, Duration::from_secs(180))
            .map_err(|e| format!("pool: {e}"))?;
        let st = pool.stats();
        println!(
            "  pool for {} (preloaded: {}) ready after {:.2} s (zygote R init {:.0} ms, \
             preload {:.0} ms)",
            w.name,
            packages_of(w),
            t.elapsed().as_secs_f64(),
            st.zygote_init_ms,
            st.zygote_preload_ms
        );
    }
    let limits = default_limits();

    // What each side has attached: the warm sandbox of a workload and its cold Rscript.
    for (w, pool) in WORKLOADS.iter().zip(&pools) {
        let (warm, cold) = attached(cfg, scratch.path(), pool, w);
        println!("  attached, {} warm:  {warm}", w.name);
        println!(
            "  attached, {} cold:  {cold}   (`sandbox run -- Rscript -e`, prelude: {})",
            w.name,
            if w.cold_prelude.is_empty() {
                "none"
            } else {
                w.cold_prelude.trim()
            }
        );
    }

    // ---- warm-up (not measured): one of each, one floor sample, one wake-up of each
    floor.sample(&limits)?;
    for (w, pool) in WORKLOADS.iter().zip(&pools) {
        warm_once(pool, w)?;
    }
    for which in Wake::ALL {
        wake_samples(which, 1, cfg.wake_gap, &cpus);
    }

    // ---- phase A: floor, warm claims, refill forks and wake-ups, interleaved
    eprint!("warm + floor + wake-up: {} rounds ", cfg.warm);
    let mut floor_s: Vec<FloorSample> = Vec::new();
    let mut series = [WarmSeries::default(), WarmSeries::default()];
    let mut alt_series: Vec<WarmSeries> = alts.iter().map(|_| WarmSeries::default()).collect();
    let mut wake_s: Vec<Vec<f64>> = vec![Vec::new(); Wake::ALL.len()];
    let mut wake_skipped = Vec::new();
    for i in 0..cfg.warm {
        if stopped() {
            break;
        }
        for k in 0..WORKLOADS.len() {
            let k = (k + i) % WORKLOADS.len();
            let (w, pool) = (WORKLOADS[k], &pools[k]);
            pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            std::thread::sleep(cfg.settle);
            floor_s.push(floor.sample(&limits)?);
            floor_s.push(floor.sample(&limits)?);
            series[k].samples.push(warm_once(pool, w)?);
            series[k].refill_busy_ms.push(refill_fork(pool)?);
            std::thread::sleep(cfg.settle);
            series[k].refill_idle_ms.push(refill_fork(pool)?);
        }
        for (pool, series) in alt_pools.iter().zip(&mut alt_series) {
            pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            std::thread::sleep(cfg.settle);
            series.samples.push(warm_once(pool, &SUM)?);
            series.refill_busy_ms.push(refill_fork(pool)?);
            std::thread::sleep(cfg.settle);
            series.refill_idle_ms.push(refill_fork(pool)?);
        }
        for j in 0..Wake::ALL.len() {
            let j = (j + i) % Wake::ALL.len();
            match wake_samples(Wake::ALL[j], cfg.wake, cfg.wake_gap, &cpus) {
                Some(v) => wake_s[j].extend(v),
                None if !wake_skipped.contains(&j) => wake_skipped.push(j),
                None => {}
            }
        }
        eprint!(".");
    }
    eprintln!();

    // ---- phase B: cold starts round-robin with warm executions of the same workloads
    let variants: Vec<(Option<Cold>, usize)> = [0, 1]
        .into_iter()
        .flat_map(|k| {
            [
                (Some(Cold::Sandbox), k),
                (Some(Cold::Bwrap), k),
                (Some(Cold::Bare), k),
                (None, k),
            ]
        })
        .collect();
    let mut cold_s: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    eprint!(
        "cold: 1 warm-up + {} rounds of {} ",
        cfg.cold,
        variants.len()
    );
    for round in 0..=cfg.cold {
        for v in 0..variants.len() {
            if stopped() {
                break;
            }
            let i = (round + v) % variants.len();
            let (which, k) = variants[i];
            let value = match which {
                Some(c) => cold_once(cfg, scratch.path(), c, WORKLOADS[k])?,
                None => warm_once(&pools[k], WORKLOADS[k])?.result_ms,
            };
            if round > 0 {
                cold_s[i].push(value);
            }
        }
        eprint!(".");
    }
    eprintln!();

    // ---- memory of the idle pools
    let mut mems = Vec::new();
    for pool in &pools {
        pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    for pool in &pools {
        mems.push(pool_memory(pool));
    }
    let mut alt_mems = Vec::new();
    for pool in &alt_pools {
        pool.wait_ready(POOL_SIZE, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        alt_mems.push(pool_memory(pool));
    }
    let prefault = [pools[0].stats(), pools[1].stats()];
    drop(alt_pools);
    drop(pools);
    drop(floor);

    // ---- the first cgroup v1 attach after an idle spell (nothing else of ours runs)
    let mut attach: Vec<AttachSample> = Vec::new();
    if root.version() == CgroupVersion::V1 {
        eprint!("cgroup v1 attach: {} samples ", cfg.rcu);
        let mut parent = AttachParent::new()?;
        for _ in 0..cfg.rcu {
            if stopped() {
                break;
            }
            attach.push(attach_once(&mut parent, cfg.rcu_gap)?);
            eprint!(".");
        }
        drop(parent);
        eprintln!();
    }

    // ---- throughput
    let refills = refills(root.version());
    let mut tps = Vec::new();
    for &k in &cfg.threads {
        if stopped() {
            break;
        }
        // The pool as it refills now, next to the configurations it had before.
        eprintln!(
            "throughput: {k} threads, pools of {}, {} configurations taking turns, {} s each in \
             slices of about {} s",
            cfg.tp_pool,
            refills.len(),
            cfg.seconds,
            cfg.slice
        );
        tps.extend(throughput(cfg, &refills, k)?);
    }
    let mut bursts: Vec<Option<Burst>> = refills.iter().map(|_| None).collect();
    eprint!(
        "burst: {} claims at once on a pool of {}, {} rounds of {} configurations ",
        cfg.burst,
        cfg.burst_pool,
        cfg.burst_rounds,
        refills.len()
    );
    for round in 0..cfg.burst_rounds {
        for k in 0..refills.len() {
            if stopped() {
                break;
            }
            let i = (round + k) % refills.len();
            let b = burst(cfg, refills[i])?;
            eprint!(".");
            match &mut bursts[i] {
                Some(all) => {
                    all.first_statement_ms.extend(b.first_statement_ms);
                    all.result_ms.extend(b.result_ms);
                    all.all_started_ms.extend(b.all_started_ms);
                    all.failures.extend(b.failures);
                }
                none => *none = Some(b),
            }
        }
    }
    eprintln!();
    let bursts: Vec<Burst> = bursts.into_iter().flatten().collect();
    let load_end = loadavg();

    // ---- report
    println!();
    let mut t = Table::new();
    t.section(format!(
        "0. vCPU wake-up: a thread blocked in read(2) on a pipe, after {} ms idle: \
         write(2) → read(2) returned, one-way",
        cfg.wake_gap.as_millis()
    ));
    let mut wake_stats = Vec::new();
    for (j, which) in Wake::ALL.iter().enumerate() {
        if wake_skipped.contains(&j) && wake_s[j].is_empty() {
            println!("(wake-up, {}: not measured, needs two CPUs)", which.label());
        }
        wake_stats.push(t.row(which.label(), &wake_s[j]));
    }
    t.section("1. floor: a bare frozen process in its own cgroup (interleaved with 2.)");
    let floor_one_way = t.row(
        "one-way: write+thaw → the process's own clock",
        &floor_s.iter().map(|s| s.one_way).collect::<Vec<_>>(),
    );
    let floor_round_trip = t.row(
        "round trip: write+thaw → its answer read here",
        &floor_s.iter().map(|s| s.round_trip).collect::<Vec<_>>(),
    );
    t.row(
        "  of which thaw (freezer write + read-back)",
        &floor_s.iter().map(|s| s.thaw).collect::<Vec<_>>(),
    );
    t.row(
        "  context: pipe round trip, process not frozen",
        &floor_s.iter().map(|s| s.unfrozen).collect::<Vec<_>>(),
    );
    t.row(
        "  context: write limits (mem+cpu+pids) to a cgroup",
        &floor_s.iter().map(|s| s.limits).collect::<Vec<_>>(),
    );
    let mut start_stats = Vec::new();
    let mut seen_stats = Vec::new();
    let mut refill_stats = Vec::new();
    for (w, s) in WORKLOADS.iter().zip(&series) {
        t.section(format!(
            "2. warm pool of {POOL_SIZE} (preloaded: {}), full at each claim: {}",
            packages_of(w),
            w.name
        ));
        start_stats.push(t.row(
            "one-way: claim → first user statement (sandbox clock)",
            &s.col(|s| s.timings.start_ms.unwrap_or(f64::NAN)),
        ));
        seen_stats.push(t.row(
            "round trip: claim → Started received by the claimer",
            &s.col(|s| s.started_seen_ms),
        ));
        t.row(
            "  claim_ms: limits + send code + thaw",
            &s.col(|s| s.timings.claim_ms),
        );
        t.row(
            "  start_ms - claim_ms: sandbox wakes, reads code",
            &s.col(|s| s.timings.start_ms.unwrap_or(f64::NAN) - s.timings.claim_ms),
        );
        t.row("claim() call returned", &s.col(|s| s.claim_call_ms));
        t.row(
            "claim → first output (Stdout event)",
            &s.col(|s| s.first_out_ms),
        );
        t.row("claim → result (Finished event)", &s.col(|s| s.result_ms));
        t.row(
            "  total_ms (watcher: claim → end)",
            &s.col(|s| s.timings.total_ms),
        );
        t.row(
            "teardown after the result (off the path)",
            &s.col(|s| s.teardown_ms),
        );
        t.row(
            "pooled_ms (time the sandbox sat frozen)",
            &s.col(|s| s.timings.pooled_ms),
        );
        t.row(
            "sandbox CPU user+sys (4 ms ticks)",
            &s.col(|s| s.cpu_user_ms + s.cpu_sys_ms),
        );
        refill_stats.push((
            t.row(
                "one refill fork right after the claim's (n → n+1 frozen)",
                &s.refill_busy_ms,
            ),
            t.row(
                format!(
                    "one refill fork after {} ms without any (n → n+1)",
                    cfg.settle.as_millis()
                ),
                &s.refill_idle_ms,
            ),
        ));
    }
    let mut alt_medians = Vec::new();
    for (alt, series) in alts.iter().zip(&alt_series) {
        t.section(format!(
            "{}. the same for sum(1:10) {}, claimed in the same rounds",
            alt.section, alt.what
        ));
        let first_out = t.row(
            "claim → first output (Stdout event)",
            &series.col(|s| s.first_out_ms),
        );
        let result = t.row(
            "claim → result (Finished event)",
            &series.col(|s| s.result_ms),
        );
        t.row(
            "one-way: claim → first user statement (sandbox clock)",
            &series.col(|s| s.timings.start_ms.unwrap_or(f64::NAN)),
        );
        t.row(
            "one refill fork right after the claim's (n → n+1 frozen)",
            &series.refill_busy_ms,
        );
        t.row(
            format!(
                "one refill fork after {} ms without any (n → n+1)",
                cfg.settle.as_millis()
            ),
            &series.refill_idle_ms,
        );
        alt_medians.push((first_out, result));
    }
    let mut cold_median = std::collections::HashMap::new();
    for (k, w) in WORKLOADS.iter().enumerate() {
        t.section(format!(
            "3. cold vs warm, round-robin: {} (cold loads {}; warm zygote preloaded {})",
            w.name,
            if w.cold_prelude.is_empty() {
                "only R's defaults".to_string()
            } else {
                format!("{} too", w.packages.join(","))
            },
            packages_of(w)
        ));
        for (i, (which, vk)) in variants.iter().enumerate() {
            if *vk != k {
                continue;
            }
            let label = match which {
                Some(c) => c.label().to_string(),
                None => "warm claim → result (interleaved with these)".to_string(),
            };
            let s = t.row(label, &cold_s[i]);
            cold_median.insert((*which, k), s.map(|s| s.median));
        }
    }
    if root.version() == CgroupVersion::V1 {
        t.section(format!(
            "5. cgroup v1 attach: pid → cgroup.procs of a fresh cgroup, after {} ms without \
             attaches (own parent)",
            cfg.rcu_gap.as_millis()
        ));
        t.row(
            format!("first write ({}) of a fresh process", V1_CONTROLLERS[0]),
            &attach.iter().map(|a| a.first[0]).collect::<Vec<_>>(),
        );
        t.row(
            format!(
                "subsequent writes, same process ({})",
                V1_CONTROLLERS[1..].join(",")
            ),
            &attach
                .iter()
                .flat_map(|a| a.first[1..].to_vec())
                .collect::<Vec<_>>(),
        );
        t.row(
            "a second fresh process, first write, right after",
            &attach.iter().map(|a| a.second[0]).collect::<Vec<_>>(),
        );
        t.row(
            "all 5 controllers, first process",
            &attach
                .iter()
                .map(|a| a.first.iter().sum::<f64>())
                .collect::<Vec<_>>(),
        );
        t.row(
            "all 5 controllers, second process",
            &attach
                .iter()
                .map(|a| a.second.iter().sum::<f64>())
                .collect::<Vec<_>>(),
        );
    }
    for tp in &tps {
        t.section(format!(
            "6. throughput: {} threads, pool of {} (no package preloaded), {}, no refill wait",
            tp.threads, tp.pool_size, tp.refill
        ));
        t.row("claim → result under load", &tp.result_ms);
        t.row("claim → first user statement under load", &tp.start_ms);
        t.row("queued_ms (waiting for a frozen sandbox)", &tp.queued_ms);
    }
    for b in &bursts {
        t.section(format!(
            "7. burst: {} claims of sum(1:10) at once on a full pool of {}, {}",
            b.first_statement_ms.len() + b.failures.len(),
            b.pool_size,
            b.refill
        ));
        t.row("claim asked → first user statement", &b.first_statement_ms);
        t.row("claim asked → result", &b.result_ms);
    }
    t.print();

    println!();
    for (w, mem) in WORKLOADS.iter().zip(&mems) {
        println!(
            "-- 4. memory of the idle pool for {} (preloaded: {}), after its executions",
            w.name,
            packages_of(w)
        );
        for (i, (n, m, charged, populated)) in mem.sandboxes.iter().enumerate() {
            println!(
                "sandbox {i}{}: {n} process(es): USS (private) {:.2} MiB, PSS {:.2} MiB, RSS \
                 {:.1} MiB, page tables {:.2} MiB, charged to its cgroup {}",
                if *populated {
                    " (first pages populated)"
                } else {
                    ""
                },
                mib(m.private_kb),
                mib(m.pss_kb),
                mib(m.rss_kb),
                mib(m.pte_kb),
                charged.map_or("?".into(), |b| format!("{:.2} MiB", b as f64 / 1048576.0))
            );
        }
        match mem.zygote {
            Some((pid, m)) => println!(
                "zygote (pid {pid}): RSS {:.1} MiB, USS {:.1} MiB, PSS {:.1} MiB, page tables \
                 {:.2} MiB, in huge pages {:.1} MiB",
                mib(m.rss_kb),
                mib(m.private_kb),
                mib(m.pss_kb),
                mib(m.pte_kb),
                mib(m.huge_kb)
            ),
            None => println!("zygote: not found"),
        }
    }
    if root.version() != CgroupVersion::V1 {
        println!();
        println!(
            "-- 5. cgroup v1 attach: not measured, this host has cgroup {} (the grace-period \
             wait is a cgroup v1 attach figure)",
            root.version()
        );
    }
    for tp in &tps {
        println!();
        println!(
            "-- 6. throughput, {} threads, pool of {}, {}: {} executions in {:.2} s = {:.1} \
             execs/s; {} waited for a sandbox (queued_ms > 1); {} forks; {} failures",
            tp.threads,
            tp.pool_size,
            tp.refill,
            tp.done,
            tp.elapsed_s,
            tp.done as f64 / tp.elapsed_s.max(1e-9),
            tp.waited,
            tp.forked,
            tp.failures.len()
        );
        for f in tp.failures.iter().take(3) {
            println!("   failure: {f}");
        }
    }
    for b in &bursts {
        println!();
        let lasts: Vec<String> = b.all_started_ms.iter().map(|l| format!("{l:.1}")).collect();
        println!(
            "-- 7. burst on a pool of {}, {}: {} claims in {} round(s), the last one's first \
             statement {} ms after they were asked (median {:.1} sandboxes/s); {} failures",
            b.pool_size,
            b.refill,
            b.first_statement_ms.len(),
            b.all_started_ms.len(),
            lasts.join(" / "),
            b.rate(),
            b.failures.len()
        );
        for f in b.failures.iter().take(3) {
            println!("   failure: {f}");
        }
    }

    println!();
    println!("-- side by side (medians unless marked; targets informational)");
    if wake_stats.iter().any(Option::is_some) {
        let parts: Vec<String> = Wake::ALL
            .iter()
            .zip(&wake_stats)
            .filter_map(|(w, s)| {
                s.map(|s| format!("{}: {:.3} ms (p90 {:.3})", w.label(), s.median, s.tail))
            })
            .collect();
        println!("idle thread wake-up on a pipe: {}", parts.join("; "));
    }
    for (k, w) in WORKLOADS.iter().enumerate() {
        if let (Some(f), Some(s)) = (floor_one_way, start_stats[k]) {
            let r = s.median / f.median;
            println!(
                "{}: ONE-WAY claim → first user statement {:.3} ms ({} {:.3}) vs floor one-way \
                 (write+thaw → the thawed process's own clock) {:.3} ms: {r:.2}× (target ≤ 2×)  \
                 {}",
                w.name,
                s.median,
                s.tail_label,
                s.tail,
                f.median,
                verdict(r <= 2.0)
            );
        }
        if let (Some(f), Some(s)) = (floor_round_trip, seen_stats[k]) {
            println!(
                "{}: ROUND TRIP claim → Started received {:.3} ms ({} {:.3}) vs floor round \
                 trip (write+thaw → answer read) {:.3} ms: {:.2}× (the claim's answer has one \
                 more hop: the watcher thread, then a channel)",
                w.name,
                s.median,
                s.tail_label,
                s.tail,
                f.median,
                s.median / f.median
            );
        }
    }
    {
        let now_out = stats(&series[0].col(|s| s.first_out_ms)).0;
        let now_result = stats(&series[0].col(|s| s.result_ms)).0;
        if let (Some(no), Some(nr)) = (now_out, now_result) {
            println!(
                "sum(1:10), idle pool: claim → first output / result {:.2} / {:.2} ms (target: \
                 result ≤ 1.5 ms  {})",
                no.median,
                nr.median,
                verdict(nr.median <= 1.5),
            );
        }
        for (alt, (out, result)) in alts.iter().zip(&alt_medians) {
            if let (Some(no), Some(nr), Some(ao), Some(ar)) = (now_out, now_result, out, result) {
                println!(
                    "  {}: {:.2} / {:.2} ms, same rounds: {:.2}× / {:.2}× faster by default",
                    alt.what,
                    ao.median,
                    ar.median,
                    ao.median / no.median,
                    ar.median / nr.median
                );
            }
        }
    }
    for (k, w) in WORKLOADS.iter().enumerate() {
        let warm = cold_median.get(&(None, k)).copied().flatten();
        let cold = cold_median
            .get(&(Some(Cold::Sandbox), k))
            .copied()
            .flatten();
        if let (Some(wm), Some(c)) = (warm, cold) {
            let r = c / wm;
            let target = if k == 0 {
                format!(" (target ≥ 50×)  {}", verdict(r >= 50.0))
            } else {
                String::new()
            };
            println!(
                "{}: warm claim → result {wm:.2} ms vs cold `sandbox run` Rscript {c:.1} ms, \
                 interleaved in one phase, cold loading {}: {r:.0}×{target}",
                w.name,
                if w.cold_prelude.is_empty() {
                    "only R's defaults, as the warm zygote (no package preloaded)".to_string()
                } else {
                    format!("{}, as the warm zygote preloaded", w.packages.join(","))
                }
            );
            for other in [Cold::Bwrap, Cold::Bare] {
                if let Some(Some(o)) = cold_median.get(&(Some(other), k)) {
                    println!("  ({}: {o:.1} ms, {:.0}×)", other.label(), o / wm);
                }
            }
        }
    }
    for (k, w) in WORKLOADS.iter().enumerate() {
        if let (Some(busy), Some(idle)) = refill_stats[k] {
            println!(
                "one refill fork, pool for {} (preloaded: {}), the pool otherwise idle: {:.1} \
                 ms ({} {:.1}) right after the claim's own refill; {:.1} ms ({} {:.1}) after \
                 {} ms without a fork{}",
                w.name,
                packages_of(w),
                busy.median,
                busy.tail_label,
                busy.tail,
                idle.median,
                idle.tail_label,
                idle.tail,
                cfg.settle.as_millis(),
                if root.version() == CgroupVersion::V1 {
                    " (a cgroup v1 attach then waits for an RCU grace period)"
                } else {
                    ""
                }
            );
        }
    }
    for group in tps.chunks(refills.len()) {
        let rate = |tp: &Throughput| tp.done as f64 / tp.elapsed_s.max(1e-9);
        let [now, others @ ..] = group else { continue };
        let others: Vec<String> = others
            .iter()
            .map(|o| {
                format!(
                    "{:.1} with {} ({:.2}×)",
                    rate(o),
                    o.refill,
                    rate(now) / rate(o).max(1e-9)
                )
            })
            .collect();
        println!(
            "sustained: {:.1} execs/s of sum(1:10) with {} vs {}; {} threads, pool of {} (no \
             package preloaded)",
            rate(now),
            now.refill,
            others.join(" vs "),
            now.threads,
            now.pool_size
        );
    }
    if let [now, others @ ..] = &bursts[..] {
        let p = |b: &Burst, q: f64| {
            let mut v = b.first_statement_ms.clone();
            v.sort_by(f64::total_cmp);
            if v.is_empty() {
                f64::NAN
            } else {
                percentile(&v, q)
            }
        };
        let figures = |b: &Burst| {
            format!(
                "{:.1} / {:.1} / {:.1} ms ({:.0} sandboxes/s) with {}",
                p(b, 0.5),
                p(b, 0.9),
                b.last_ms(),
                b.rate(),
                b.refill
            )
        };
        let others: Vec<String> = others
            .iter()
            .map(|o| format!("{} ({:.2}×)", figures(o), now.rate() / o.rate().max(1e-9)))
            .collect();
        println!(
            "burst of {} on a pool of {} ({} rounds each, configurations taking turns): asked → \
             first statement p50 / p90 / median last {} vs {}",
            cfg.burst,
            now.pool_size,
            now.all_started_ms.len(),
            figures(now),
            others.join(" vs ")
        );
    }
    for (w, mem) in WORKLOADS.iter().zip(&mems) {
        let n = mem.sandboxes.len() as u64;
        let zygote = mem.zygote.map_or("zygote not found".to_string(), |(_, z)| {
            format!(
                "zygote RSS {:.1} MiB, USS {:.1} MiB",
                mib(z.rss_kb),
                mib(z.private_kb)
            )
        });
        // The pool keeps `prefault_ready` sandboxes populated; a larger pool adds
        // sandboxes that are not: what one more sandbox costs is the latter's USS.
        for (populated, which) in [
            (
                false,
                "beyond the first (not populated: what one more sandbox costs)",
            ),
            (true, "next to be claimed (its first pages populated)"),
        ] {
            let Some((uss, pss)) = mem.mean_uss_pss_kb(populated) else {
                continue;
            };
            println!(
                "idle pooled sandbox {which}, pool for {} (preloaded: {}): USS {:.2} MiB{}, \
                 PSS {:.2} MiB (with its 1/{} share of the heap shared copy-on-write with \
                 the zygote and the other sandboxes); {zygote}",
                w.name,
                packages_of(w),
                mib(uss),
                if populated {
                    String::new()
                } else {
                    format!(" (target ≤ 1 MiB  {})", verdict(uss <= 1024))
                },
                mib(pss),
                n + 1
            );
        }
    }
    for (w, st) in WORKLOADS.iter().zip(&prefault) {
        println!(
            "prefault, pool for {}: each sandbox populates {} pages it will write ({:.2} MiB, \
             its own) and {} it will only map (shared) before it is frozen",
            w.name,
            st.prefault_written_pages,
            st.prefault_written_pages as f64 * 4096.0 / (1 << 20) as f64,
            st.prefault_mapped_pages
        );
    }
    for (alt, mem) in alts.iter().zip(&alt_mems) {
        if let Some((uss, pss)) = mem.mean_uss_pss_kb(false) {
            println!(
                "idle pooled sandbox for sum(1:10) {}: USS {:.2} MiB (target ≤ 1 MiB  {}), \
                 PSS {:.2} MiB",
                alt.what,
                mib(uss),
                verdict(uss <= 1024),
                mib(pss)
            );
        }
    }
    if !attach.is_empty() {
        let first = summary(&attach.iter().map(|a| a.first[0]).collect::<Vec<_>>());
        let next = summary(
            &attach
                .iter()
                .flat_map(|a| a.first[1..].iter().copied().chain(a.second.iter().copied()))
                .collect::<Vec<_>>(),
        );
        if let (Some(f), Some(n)) = (first, next) {
            println!(
                "cgroup v1 attach: first write after {} ms without attaches {:.2} ms (min \
                 {:.2}, max {:.2}) vs the writes right after it {:.3} ms",
                cfg.rcu_gap.as_millis(),
                f.median,
                f.min,
                f.max,
                n.median
            );
        }
    }
    println!();
    println!("loadavg at start: {load_start}; at end: {load_end}");
    println!(
        "notes: ms = milliseconds; wall clock in this process unless marked; start_ms and the \
         floor's one-way figure are CLOCK_MONOTONIC of the woken process minus this \
         process's before the write/claim; tail = p99 with n ≥ 100, else p90; NaN = samples \
         without that figure."
    );
    Ok(())
}
