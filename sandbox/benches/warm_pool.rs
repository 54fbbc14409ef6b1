//! Warm-pool benchmark (not a test): how fast a claimed, frozen, preloaded R sandbox runs
//! code, next to the physical floor (a bare frozen process thawed and answering on a
//! pipe) and to cold `Rscript` starts (in the same sandbox, under `bwrap`, and bare).
//!
//! ```text
//! cargo bench -p hatchery-sandbox --bench warm_pool [-- --warm N --cold M --seconds S]
//! ```
//!
//! Everything is measured in one run, interleaved where possible, so drift on a shared
//! machine hits every variant alike; read the ratios, not the absolute numbers:
//!
//! 1. floor: a process in its own cgroup under the hatchery parent, blocked reading a
//!    pipe, frozen; timed: thaw + write one byte + read its one-byte answer. Interleaved
//!    with (2).
//! 2. warm: a pool (size 2) of R sandboxes with `stats,MASS,Matrix` preloaded; `sum(1:10)`
//!    and a model fit, each claim made with a full pool (`wait_ready(2)` first).
//! 3. cold: `sandbox run -- Rscript -e ...`, `bwrap ... Rscript -e ...` and bare
//!    `Rscript -e ...`, with the same packages loaded, round-robin with warm executions.
//! 4. PSS of the idle pooled sandboxes (and of the zygote).
//! 5. throughput: a pool of size 4, K threads claiming `sum(1:10)` back to back.
//!
//! Must run as root. Exits 0 unless something errors; a missed target is printed, not
//! failed. Nothing is left behind: the floor's cgroup and process and the pools are torn
//! down by Drop guards (also on panic), and every execution is waited for until its
//! sandbox is torn down.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hatchery_sandbox::cgroup::{CgroupRoot, SandboxCgroup};
use hatchery_sandbox::pool::{
    Event, ExecRequest, ExecStatus, Execution, Pool, PoolConfig, Timings,
};
use hatchery_sandbox::zygote::server::Language;
use hatchery_sandbox::{Limits, DEFAULT_ROOTFS};

/// Set in the environment of the floor's child: the bench binary then acts as the child.
const FLOOR_CHILD_ENV: &str = "HATCHERY_WARM_POOL_FLOOR_CHILD";

const PACKAGES: [&str; 3] = ["stats", "MASS", "Matrix"];
const SUM_CODE: &str = "sum(1:10)";
const FIT_CODE: &str = "fit <- MASS::rlm(stack.loss ~ ., stackloss); print(coef(fit)); \
print(summary(lm(dist ~ speed, cars))$r.squared); \
print(sum(Matrix::crossprod(Matrix::Matrix(as.matrix(stackloss)))))";
/// Cold starts load the same packages the zygote preloads (stats is attached by default).
const COLD_PRELUDE: &str = "suppressMessages({library(MASS); library(Matrix)}); ";

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

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Config {
    warm: usize,
    cold: usize,
    seconds: f64,
    threads: Vec<usize>,
    tp_pool: usize,
    rootfs: PathBuf,
    sandbox_bin: PathBuf,
    zygote_bin: PathBuf,
}

const USAGE: &str = "\
usage: cargo bench -p hatchery-sandbox --bench warm_pool [-- OPTIONS]

options:
  --warm N        warm executions of each workload (default 30); the floor gets 2 per
                  warm execution
  --cold M        measured cold runs per variant and workload (default 8, +1 warm-up)
  --seconds S     length of each throughput run (default 10)
  --threads K[,K] claiming threads of the throughput run(s) (default 4)
  --tp-pool P     pool size of the throughput run (default 4)
  --help          this text

environment:
  HATCHERY_ROOTFS   root filesystem (default /var/lib/hatchery/rootfs/r)
  HATCHERY_SANDBOX  the sandbox binary (default: the one cargo built, target/release/sandbox)
  HATCHERY_ZYGOTE   the hatchery-zygote binary (default: the one cargo built)";

fn parse_args() -> Result<Config, String> {
    let mut cfg = Config {
        warm: 30,
        cold: 8,
        seconds: 10.0,
        threads: vec![4],
        tp_pool: 4,
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
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let int = |name: &str, v: String| -> Result<usize, String> {
            v.parse::<usize>()
                .map_err(|_| format!("{name} expects a positive integer, got {v:?}"))
                .map(|n| n.max(1))
        };
        match flag.as_str() {
            // cargo passes --bench to every bench target; there is nothing to select.
            "--bench" => {}
            "--warm" => cfg.warm = int("--warm", value("--warm")?)?,
            "--cold" => cfg.cold = int("--cold", value("--cold")?)?,
            "--tp-pool" => cfg.tp_pool = int("--tp-pool", value("--tp-pool")?)?,
            "--seconds" => {
                let v = value("--seconds")?;
                cfg.seconds = v
                    .parse::<f64>()
                    .ok()
                    .filter(|s| *s > 0.0)
                    .ok_or_else(|| format!("--seconds expects a positive number, got {v:?}"))?;
            }
            "--threads" => {
                let v = value("--threads")?;
                cfg.threads = v
                    .split(',')
                    .map(|t| int("--threads", t.trim().to_string()))
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
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
    let (tail, tail_label) = if n >= 100 {
        (percentile(&v, 0.99), "p99")
    } else {
        (percentile(&v, 0.90), "p90")
    };
    Some(Stats {
        n,
        median,
        tail,
        tail_label,
        min: v[0],
        max: v[n - 1],
    })
}

fn median(values: &[f64]) -> Option<f64> {
    stats(values).map(|s| s.median)
}

struct Table {
    rows: Vec<(String, Option<Stats>)>,
}

impl Table {
    fn new() -> Table {
        Table { rows: Vec::new() }
    }

    fn row(&mut self, label: impl Into<String>, values: &[f64]) -> Option<Stats> {
        let s = stats(values);
        self.rows.push((label.into(), s));
        s
    }

    fn section(&mut self, label: &str) {
        self.rows.push((format!("## {label}"), None));
    }

    fn print(&self) {
        println!(
            "{:<58} {:>4} {:>10} {:>14} {:>10} {:>10}",
            "measurement (ms)", "n", "median", "tail", "min", "max"
        );
        for (label, s) in &self.rows {
            match (label.strip_prefix("## "), s) {
                (Some(section), _) => println!("-- {section}"),
                (None, Some(s)) => println!(
                    "{:<58} {:>4} {:>10.3} {:>9.3} ({}) {:>10.3} {:>10.3}",
                    label, s.n, s.median, s.tail, s.tail_label, s.min, s.max
                ),
                (None, None) => println!("{label:<58} {:>4}", 0),
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
// 1. The floor: a bare frozen process thawed and answering on a pipe.

/// The floor's child: answer every byte read on stdin with one byte on stdout.
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
                if libc::write(1, (&b as *const u8).cast(), 1) != 1 {
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

/// A frozen process in its own cgroup under the hatchery parent. Dropping it kills the
/// process and removes the cgroup (also on panic).
struct Floor {
    cgroup: Option<SandboxCgroup>,
    child: Option<Child>,
    to_child: Option<ChildStdin>,
    from_child: Option<ChildStdout>,
    pid: i32,
}

impl Floor {
    fn start(root: &CgroupRoot) -> Result<Floor, String> {
        let name = hatchery_sandbox::gc::unique_name("bench");
        let cgroup = root
            .create(&name)
            .map_err(|e| format!("floor cgroup: {e}"))?;
        let mut floor = Floor {
            cgroup: Some(cgroup),
            child: None,
            to_child: None,
            from_child: None,
            pid: 0,
        };
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let mut child = Command::new(exe)
            .env(FLOOR_CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn the floor child: {e}"))?;
        floor.pid = child.id() as i32;
        floor.to_child = child.stdin.take();
        floor.from_child = child.stdout.take();
        floor.child = Some(child);
        floor
            .cgroup()
            .add_process(floor.pid)
            .map_err(|e| format!("floor: {e}"))?;
        // One round trip so the child is up and blocked in read(2) before the first freeze.
        floor.ping()?;
        floor.wait_sleeping();
        floor.cgroup().freeze().map_err(|e| format!("floor: {e}"))?;
        Ok(floor)
    }

    fn cgroup(&self) -> &SandboxCgroup {
        self.cgroup
            .as_ref()
            .expect("the floor cgroup lives until drop")
    }

    fn ping(&mut self) -> Result<(), String> {
        let w = self.to_child.as_mut().unwrap();
        w.write_all(b"x").map_err(|e| format!("floor write: {e}"))?;
        let mut b = [0u8; 1];
        self.from_child
            .as_mut()
            .unwrap()
            .read_exact(&mut b)
            .map_err(|e| format!("floor read: {e}"))
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

    /// One floor sample from the frozen state, and back to it. Returns (thaw, thaw + write
    /// + read answer, unfrozen pipe round trip, limits write) in ms.
    fn sample(&mut self, limits: &Limits) -> Result<[f64; 4], String> {
        let t0 = Instant::now();
        self.cgroup()
            .thaw()
            .map_err(|e| format!("floor thaw: {e}"))?;
        let t1 = Instant::now();
        self.ping()?;
        let t2 = Instant::now();
        // Context, not part of the floor: a round trip with the process already running,
        // and what writing an execution's limits costs on this host's cgroups.
        self.wait_sleeping();
        let t3 = Instant::now();
        self.ping()?;
        let t4 = Instant::now();
        let t5 = Instant::now();
        self.cgroup()
            .apply(limits)
            .map_err(|e| format!("floor limits: {e}"))?;
        let t6 = Instant::now();
        self.wait_sleeping();
        self.cgroup()
            .freeze()
            .map_err(|e| format!("floor freeze: {e}"))?;
        Ok([ms(t1 - t0), ms(t2 - t0), ms(t4 - t3), ms(t6 - t5)])
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        // Close the pipe (the child exits on EOF), kill it anyway, thaw so the signal is
        // delivered, reap it, then remove the cgroup.
        self.to_child.take();
        self.from_child.take();
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        if let Some(cg) = self.cgroup.as_ref() {
            let _ = cg.thaw();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if let Some(cg) = self.cgroup.take() {
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
    /// Just before `claim()` → the pool is full again (its refill starts at the claim).
    refill_ms: f64,
    /// CPU time of the sandbox's cgroup (user, system), exit included.
    cpu_user_ms: f64,
    cpu_sys_ms: f64,
    claimed_at: Option<Instant>,
    timings: Timings,
}

fn exec_request(code: &str) -> ExecRequest {
    let mut req = ExecRequest::new(code);
    req.limits = Limits {
        memory_bytes: Some(512 << 20),
        cpus: Some(1.0),
        pids: Some(128),
    };
    req.timeout = Some(Duration::from_secs(60));
    req
}

/// Waits for the rest of an execution's events until its watcher has ended (it drops its
/// sender only after the sandbox is torn down).
fn drain(exec: &Execution) {
    while exec.events().recv().is_ok() {}
}

/// One claim, followed to its result; `expect` must appear in the output.
fn warm_once(
    pool: &Pool,
    code: &str,
    expect: &str,
    wait_teardown: bool,
) -> Result<(WarmSample, Option<Execution>), String> {
    let req = exec_request(code);
    let t0 = Instant::now();
    let exec = pool.claim(req).map_err(|e| format!("claim: {e}"))?;
    let mut s = WarmSample {
        claim_call_ms: ms(t0.elapsed()),
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
    let out = String::from_utf8_lossy(&out);
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
    s.claimed_at = Some(t0);
    s.cpu_user_ms = result.usage.user_cpu_ns as f64 / 1e6;
    s.cpu_sys_ms = result.usage.system_cpu_ns as f64 / 1e6;
    if wait_teardown {
        let t = Instant::now();
        drain(&exec);
        s.teardown_ms = ms(t.elapsed());
        Ok((s, None))
    } else {
        Ok((s, Some(exec)))
    }
}

#[derive(Default)]
struct WarmSeries {
    samples: Vec<WarmSample>,
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
            Cold::Sandbox => "cold `sandbox run -- Rscript`",
            Cold::Bwrap => "cold `bwrap ... Rscript`",
            Cold::Bare => "cold bare host `Rscript`",
        }
    }
}

fn cold_once(
    cfg: &Config,
    scratch: &Path,
    which: Cold,
    code: &str,
    expect: &str,
) -> Result<f64, String> {
    let full = format!("{COLD_PRELUDE}{code}");
    let mut cmd = match which {
        Cold::Sandbox => {
            let mut c = Command::new(&cfg.sandbox_bin);
            c.arg("run").arg("--rootfs").arg(&cfg.rootfs);
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
    match which {
        Cold::Sandbox | Cold::Bwrap => {
            cmd.args(["--", "Rscript", "-e", &full]);
        }
        Cold::Bare => {
            cmd.args(["--", "Rscript", "-e", &full]);
        }
    }
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
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains(expect) {
        return Err(format!(
            "{} {code:?} failed ({}): stdout {stdout:?} stderr {:?}",
            which.label(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(took)
}

// ---------------------------------------------------------------------------------------
// 4. Memory of the idle pool.

#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss_kb: u64,
    pss_kb: u64,
    private_kb: u64,
    pte_kb: u64,
}

impl std::ops::AddAssign for Mem {
    fn add_assign(&mut self, o: Mem) {
        self.rss_kb += o.rss_kb;
        self.pss_kb += o.pss_kb;
        self.private_kb += o.private_kb;
        self.pte_kb += o.pte_kb;
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
    })
}

fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn argv0_of(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or_default()).into_owned()
        })
        .unwrap_or_default()
}

/// Every process that descends from this one.
fn descendants() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let mut p = pid;
        for _ in 0..64 {
            match ppid_of(p) {
                Some(pp) if pp == me => {
                    out.push(pid);
                    break;
                }
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
    }
    out
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
    sandboxes: Vec<(usize, Mem, Option<u64>)>,
    zygote: Option<(i32, Mem)>,
    others: Vec<(i32, String, Mem)>,
}

fn pool_memory(pool: &Pool) -> PoolMemory {
    let mut sandboxes = Vec::new();
    let mut in_sandboxes = Vec::new();
    for dir in pool.frozen_cgroups() {
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
        }
        in_sandboxes.extend(&pids);
        sandboxes.push((pids.len(), m, cgroup_memory(&dir)));
    }
    let mut zygote = None;
    let mut others = Vec::new();
    for pid in descendants() {
        if in_sandboxes.contains(&pid) {
            continue;
        }
        let name = argv0_of(pid);
        let Some(m) = mem_of(pid) else { continue };
        let parent_is_zygote = ppid_of(pid).map(argv0_of).as_deref() == Some("/hatchery/zygote");
        if name == "/hatchery/zygote" && !parent_is_zygote && zygote.is_none() {
            zygote = Some((pid, m));
        } else {
            others.push((pid, name, m));
        }
    }
    PoolMemory {
        sandboxes,
        zygote,
        others,
    }
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------
// 5. Throughput.

struct Throughput {
    threads: usize,
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
type TpSample = (f64, Option<f64>, f64, Instant);

fn throughput(cfg: &Config, threads: usize) -> Result<Throughput, String> {
    let mut pc = pool_config(cfg, cfg.tp_pool);
    pc.claim_timeout = Duration::from_secs(60);
    let pool = Pool::start(pc).map_err(|e| format!("throughput pool: {e}"))?;
    pool.wait_ready(cfg.tp_pool, Duration::from_secs(180))
        .map_err(|e| format!("throughput pool: {e}"))?;
    let forked_before = pool.stats().forked;
    let results: Mutex<Vec<TpSample>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(cfg.seconds);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut pending = Vec::new();
                while Instant::now() < deadline && !stopped() {
                    match warm_once(&pool, SUM_CODE, "55", false) {
                        Ok((s, exec)) => {
                            results.lock().unwrap().push((
                                s.result_ms,
                                s.timings.start_ms,
                                s.timings.queued_ms,
                                Instant::now(),
                            ));
                            pending.extend(exec);
                        }
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            if failures.lock().unwrap().len() > 20 {
                                break;
                            }
                        }
                    }
                }
                // Every sandbox torn down before the pool goes.
                for exec in pending {
                    drain(&exec);
                }
            });
        }
    });
    let results = results.into_inner().unwrap();
    // Until the last result (the teardown of the last sandboxes is not counted).
    let elapsed_s = results
        .iter()
        .map(|r| (r.3 - start).as_secs_f64())
        .fold(0.0, f64::max);
    let forked = pool.stats().forked - forked_before;
    drop(pool);
    Ok(Throughput {
        threads,
        pool_size: cfg.tp_pool,
        elapsed_s,
        done: results.len(),
        result_ms: results.iter().map(|r| r.0).collect(),
        start_ms: results.iter().filter_map(|r| r.1).collect(),
        queued_ms: results.iter().map(|r| r.2).collect(),
        waited: results.iter().filter(|r| r.2 > 1.0).count(),
        failures: failures.into_inner().unwrap(),
        forked,
    })
}

// ---------------------------------------------------------------------------------------

fn pool_config(cfg: &Config, size: usize) -> PoolConfig {
    let mut pc = PoolConfig::new(
        Language::R {
            packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
        },
        cfg.rootfs.clone(),
    );
    pc.size = size;
    pc.sandbox_bin = cfg.sandbox_bin.clone();
    pc.zygote_bin = cfg.zygote_bin.clone();
    // As the agent does with the platform's default policy: the pool writes these limits
    // while a sandbox is pooled, so a claim at the default limits writes none.
    pc.default_limits = Some(exec_request("").limits);
    pc
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
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let root = CgroupRoot::detect(hatchery_sandbox::run::DEFAULT_CGROUP_PARENT)
        .map_err(|e| format!("cgroups: {e}"))?;
    let load_start = loadavg();
    println!("Hatchery warm-pool benchmark");
    println!("  sandbox  {}", cfg.sandbox_bin.display());
    println!("  zygote   {}", cfg.zygote_bin.display());
    println!("  rootfs   {}", cfg.rootfs.display());
    println!(
        "  kernel {}, cgroup {}, nproc {nproc}; packages preloaded: {}",
        kernel.trim(),
        root.version(),
        PACKAGES.join(",")
    );
    println!(
        "  warm {} per workload (floor 2 per warm execution), cold {} per variant (+1 warm-up), \
         throughput {} s with threads {:?} on a pool of {}",
        cfg.warm, cfg.cold, cfg.seconds, cfg.threads, cfg.tp_pool
    );
    println!(
        "  limits per claim: memory 512 MiB, cpus 1.0, pids 128 (the pool's default limits, \
         written while pooled: the claim writes none; the floor's `write limits` row shows \
         what a claim with other limits adds)"
    );
    println!("  loadavg at start: {load_start}");
    let scratch = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;

    // ---- setup: the floor process and the size-2 pool
    let mut floor = Floor::start(&root)?;
    let t = Instant::now();
    let pool = Pool::start(pool_config(cfg, 2)).map_err(|e| format!("pool: {e}"))?;
    pool.wait_ready(2, Duration::from_secs(180))
        .map_err(|e| format!("pool: {e}"))?;
    let pool_ready_s = t.elapsed().as_secs_f64();
    let st = pool.stats();
    println!(
        "  pool of 2 ready in {pool_ready_s:.2} s (zygote R init {:.0} ms, preload {:.0} ms)",
        st.zygote_init_ms, st.zygote_preload_ms
    );
    let limits = exec_request("").limits;

    // ---- warm-up (not measured): one of each, one floor sample
    floor.sample(&limits)?;
    for (code, expect) in [(SUM_CODE, "55"), (FIT_CODE, "Air.Flow")] {
        pool.wait_ready(2, Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        warm_once(&pool, code, expect, true)?;
    }

    // ---- phase A: floor interleaved with warm executions (full pool at every claim)
    eprint!("warm + floor: {} rounds ", cfg.warm);
    let mut floor_s: Vec<[f64; 4]> = Vec::new();
    let mut sum = WarmSeries::default();
    let mut fit = WarmSeries::default();
    for i in 0..cfg.warm {
        if stopped() {
            break;
        }
        let order: [(&str, &str, bool); 2] = if i % 2 == 0 {
            [(SUM_CODE, "55", true), (FIT_CODE, "Air.Flow", false)]
        } else {
            [(FIT_CODE, "Air.Flow", false), (SUM_CODE, "55", true)]
        };
        for (code, expect, is_sum) in order {
            floor_s.push(floor.sample(&limits)?);
            pool.wait_ready(2, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            floor_s.push(floor.sample(&limits)?);
            let (mut s, _) = warm_once(&pool, code, expect, true)?;
            pool.wait_ready(2, Duration::from_secs(60))
                .map_err(|e| e.to_string())?;
            s.refill_ms = s.claimed_at.map_or(f64::NAN, |t| ms(t.elapsed()));
            if is_sum { &mut sum } else { &mut fit }.samples.push(s);
        }
        eprint!(".");
    }
    eprintln!();

    // ---- phase B: cold starts round-robin with warm executions
    let variants: Vec<(Option<Cold>, &str, &str)> = vec![
        (Some(Cold::Sandbox), SUM_CODE, "55"),
        (Some(Cold::Bwrap), SUM_CODE, "55"),
        (Some(Cold::Bare), SUM_CODE, "55"),
        (None, SUM_CODE, "55"),
        (Some(Cold::Sandbox), FIT_CODE, "Air.Flow"),
        (Some(Cold::Bwrap), FIT_CODE, "Air.Flow"),
        (Some(Cold::Bare), FIT_CODE, "Air.Flow"),
        (None, FIT_CODE, "Air.Flow"),
    ];
    let mut cold_s: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    eprint!(
        "cold: 1 warm-up + {} rounds of {} ",
        cfg.cold,
        variants.len()
    );
    for round in 0..=cfg.cold {
        for k in 0..variants.len() {
            if stopped() {
                break;
            }
            let i = (round + k) % variants.len();
            let (which, code, expect) = variants[i];
            let v = match which {
                Some(c) => cold_once(cfg, scratch.path(), c, code, expect)?,
                None => {
                    pool.wait_ready(2, Duration::from_secs(60))
                        .map_err(|e| e.to_string())?;
                    warm_once(&pool, code, expect, true)?.0.result_ms
                }
            };
            if round > 0 {
                cold_s[i].push(v);
            }
        }
        eprint!(".");
    }
    eprintln!();

    // ---- memory of the idle pool
    pool.wait_ready(2, Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let mem = pool_memory(&pool);
    drop(pool);
    drop(floor);

    // ---- throughput
    let mut tps = Vec::new();
    for &k in &cfg.threads {
        if stopped() {
            break;
        }
        eprintln!(
            "throughput: {k} threads, pool of {}, {} s",
            cfg.tp_pool, cfg.seconds
        );
        tps.push(throughput(cfg, k)?);
    }
    let load_end = loadavg();

    // ---- report
    println!();
    let mut t = Table::new();
    t.section("1. floor: bare frozen process, own cgroup (interleaved with 2.)");
    let floor_total = t.row(
        "floor: thaw + write 1 byte + read answer",
        &floor_s.iter().map(|s| s[1]).collect::<Vec<_>>(),
    );
    t.row(
        "  of which thaw (freezer write + read-back)",
        &floor_s.iter().map(|s| s[0]).collect::<Vec<_>>(),
    );
    t.row(
        "  context: pipe round trip, process not frozen",
        &floor_s.iter().map(|s| s[2]).collect::<Vec<_>>(),
    );
    t.row(
        "  context: write limits (mem+cpu+pids) to a cgroup",
        &floor_s.iter().map(|s| s[3]).collect::<Vec<_>>(),
    );
    for (label, series) in [
        ("sum(1:10)", &sum),
        ("model fit (MASS::rlm + lm + Matrix)", &fit),
    ] {
        t.section(&format!(
            "2. warm pool (size 2, refilled before each claim): {label}"
        ));
        t.row(
            "claim → first user statement (sandbox clock, start_ms)",
            &series.col(|s| s.timings.start_ms.unwrap_or(f64::NAN)),
        );
        t.row(
            "  claim_ms: limits + thaw + send code",
            &series.col(|s| s.timings.claim_ms),
        );
        t.row(
            "  start_ms - claim_ms: sandbox wakes, reads code",
            &series.col(|s| s.timings.start_ms.unwrap_or(f64::NAN) - s.timings.claim_ms),
        );
        t.row("claim() call returned", &series.col(|s| s.claim_call_ms));
        t.row(
            "claim → Started event seen by caller",
            &series.col(|s| s.started_seen_ms),
        );
        t.row(
            "claim → first output (Stdout event)",
            &series.col(|s| s.first_out_ms),
        );
        t.row(
            "claim → result (Finished event)",
            &series.col(|s| s.result_ms),
        );
        t.row(
            "  total_ms (watcher: claim → end)",
            &series.col(|s| s.timings.total_ms),
        );
        t.row(
            "teardown after the result (off the path)",
            &series.col(|s| s.teardown_ms),
        );
        t.row(
            "pooled_ms (time the sandbox sat frozen)",
            &series.col(|s| s.timings.pooled_ms),
        );
        t.row(
            "sandbox CPU user+sys: contain+prewarm+run+exit (4ms ticks)",
            &series.col(|s| s.cpu_user_ms + s.cpu_sys_ms),
        );
        t.row(
            "refill: claim → pool full again (one fork)",
            &series.col(|s| s.refill_ms),
        );
    }
    t.section("3. cold starts, same packages loaded (round-robin with warm)");
    let mut cold_median = std::collections::HashMap::new();
    for (i, (which, code, _)) in variants.iter().enumerate() {
        let w = if *code == SUM_CODE {
            "sum(1:10)"
        } else {
            "model fit"
        };
        let label = match which {
            Some(c) => format!("{} {w}", c.label()),
            None => format!("warm claim → result {w} (interleaved)"),
        };
        let s = t.row(label, &cold_s[i]);
        cold_median.insert((*which, *code), s.map(|s| s.median));
    }
    let mut tp_rows = Vec::new();
    for tp in &tps {
        t.section(&format!(
            "5. throughput: {} threads, pool of {}, no refill wait",
            tp.threads, tp.pool_size
        ));
        t.row("claim → result under load", &tp.result_ms);
        t.row("claim → first user statement under load", &tp.start_ms);
        t.row("queued_ms (waiting for a frozen sandbox)", &tp.queued_ms);
        tp_rows.push(tp);
    }
    t.print();

    println!();
    println!(
        "-- 4. memory of one idle pooled sandbox (pool of 2, after {} + {} executions)",
        2 * cfg.warm,
        cfg.cold * 2
    );
    for (i, (n, m, charged)) in mem.sandboxes.iter().enumerate() {
        println!(
            "sandbox {i}: {n} process(es): PSS {:.2} MiB, USS (private) {:.2} MiB, RSS {:.1} MiB, \
             page tables {:.2} MiB, charged to its cgroup {}",
            mib(m.pss_kb),
            mib(m.private_kb),
            mib(m.rss_kb),
            mib(m.pte_kb),
            charged.map_or("?".into(), |b| format!("{:.2} MiB", b as f64 / 1048576.0))
        );
    }
    if let Some((pid, m)) = mem.zygote {
        println!(
            "zygote (pid {pid}): PSS {:.1} MiB, RSS {:.1} MiB, USS {:.1} MiB, page tables {:.2} MiB",
            mib(m.pss_kb),
            mib(m.rss_kb),
            mib(m.private_kb),
            mib(m.pte_kb)
        );
    }
    for (pid, name, m) in &mem.others {
        println!(
            "other pool process {pid} {name}: PSS {:.1} MiB, RSS {:.1} MiB",
            mib(m.pss_kb),
            mib(m.rss_kb)
        );
    }

    for tp in &tp_rows {
        println!();
        println!(
            "-- 5. throughput, {} threads, pool of {}: {} executions in {:.2} s = {:.1} execs/s; \
             {} waited for a sandbox (queued_ms > 1); {} forks; {} failures",
            tp.threads,
            tp.pool_size,
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

    println!();
    println!("-- targets (informational)");
    let start_med = median(&sum.col(|s| s.timings.start_ms.unwrap_or(f64::NAN)));
    if let (Some(f), Some(s)) = (floor_total, start_med) {
        let r = s / f.median;
        println!(
            "claim → first user statement {s:.3} ms vs floor {:.3} ms: {r:.2}× (target ≤ 2×)  {}",
            f.median,
            verdict(r <= 2.0)
        );
    }
    let warm_sum = median(&sum.col(|s| s.result_ms));
    let warm_first = median(&sum.col(|s| s.first_out_ms));
    if let (Some(Some(c)), Some(w)) = (cold_median.get(&(Some(Cold::Sandbox), SUM_CODE)), warm_sum)
    {
        let r = c / w;
        println!(
            "warm sum(1:10) claim → result {w:.2} ms vs cold sandbox Rscript {c:.1} ms: {r:.0}× \
             (target ≥ 50×)  {}",
            verdict(r >= 50.0)
        );
        if let Some(f) = warm_first {
            println!("  (claim → first output {f:.2} ms: {:.0}×)", c / f);
        }
        if let Some(Some(wi)) = cold_median.get(&(None, SUM_CODE)) {
            println!(
                "  (with the warm runs interleaved with the cold ones, {wi:.2} ms: {:.0}×)",
                c / wi
            );
        }
        for other in [Cold::Bwrap, Cold::Bare] {
            if let Some(Some(o)) = cold_median.get(&(Some(other), SUM_CODE)) {
                println!(
                    "  ({}: {o:.1} ms, {:.0}× the warm result)",
                    other.label(),
                    o / w
                );
            }
        }
    }
    if let (Some(Some(c)), Some(w)) = (
        cold_median.get(&(Some(Cold::Sandbox), FIT_CODE)),
        median(&fit.col(|s| s.result_ms)),
    ) {
        println!(
            "model fit: warm claim → result {w:.2} ms vs cold sandbox Rscript {c:.1} ms: {:.0}×",
            c / w
        );
    }
    if !mem.sandboxes.is_empty() {
        let n = mem.sandboxes.len() as u64;
        let pss = mem.sandboxes.iter().map(|s| s.1.pss_kb).sum::<u64>() / n;
        let uss = mem.sandboxes.iter().map(|s| s.1.private_kb).sum::<u64>() / n;
        println!(
            "PSS per idle pooled sandbox {:.2} MiB (target < 5 MiB)  {}",
            mib(pss),
            verdict(mib(pss) < 5.0)
        );
        println!(
            "  (USS, the memory one more sandbox adds: {:.2} MiB; PSS also carries its 1/{} \
             share of the zygote's heap shared copy-on-write by the zygote and the {} sandboxes)",
            mib(uss),
            n + 1,
            n
        );
    }
    println!();
    println!("loadavg at start: {load_start}; at end: {load_end}");
    println!(
        "notes: ms = milliseconds, wall clock in this process unless marked; start_ms is \
         CLOCK_MONOTONIC in the sandbox minus the claim's; tail = p99 with n ≥ 100, else p90."
    );
    Ok(())
}
