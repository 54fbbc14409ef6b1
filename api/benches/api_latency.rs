//! API latency benchmark (not a test): what the HTTP + WebSocket API adds on top of the
//! warm pool, for `cat(1)`.
//!
//! ```text
//! cargo build --release -p hatchery-api -p hatchery-sandbox
//! cargo bench -p hatchery-api --bench api_latency [-- --n N --seconds S --clients K]
//! ```
//!
//! One run starts `hatchery up` (release, from this workspace) on a free port of
//! 127.0.0.1 with a temporary data directory, pool size 2, R only and no preloaded
//! packages, waits for `/readyz`, and then measures, interleaved where possible so that
//! drift on a shared machine hits every variant alike (read the ratios):
//!
//! 1. through the API: N sequential executions of `cat(1)`; the clock starts just before
//!    the client connects to send `POST /v1/executions`; the events WebSocket is opened
//!    right after the 202 with `?after=0` (so events that came before it are replayed);
//!    POST → 202, → `started`, → first `stdout`, → `finished` are recorded, and the
//!    sandbox's own `start_ms` (claim → first user statement) is read back with
//!    `GET /v1/executions/{id}`. Before each POST the platform must answer `/readyz` 200
//!    and the previous execution must have finished at least `--pause-ms` earlier: with a
//!    pool of 2 and one execution at a time, the claim always finds a frozen sandbox
//!    (the refill of one sandbox — one fork — takes a fraction of the pause).
//! 2. in-process, without the API: a `hatchery_sandbox::pool::Pool` configured as the
//!    platform's agent configures its own, read from the same config file: same language,
//!    packages and pool size, the platform default policy written while pooled
//!    (`default_limits`), and claims with the request the agent builds (those limits, the
//!    policy's time limit, the agent's usage interval, output limit and event cap). N
//!    claims of `cat(1)` (each with a full pool: `wait_ready` first), alternating with (1):
//!    claim → `Started`, → first `Stdout`, → `Finished`, and `start_ms`. The API's own
//!    overhead is the difference to (1), paired by round.
//! 3. sustained executions per second, in slices that alternate (API, pool, pool, API,
//!    ...) so that drift hits both alike: through the API, K concurrent clients, each its
//!    own user (so the per-user parallelism cap of 2 never cancels one), submitting
//!    `cat(1)` back to back and waiting for `finished` on the WebSocket; in process, K
//!    threads claiming back to back. On both sides only executions that succeeded with the
//!    right output count; the others are counted by state and printed. The platform's pool
//!    is pinned at the in-process pool's size (`max_pool_size = pool_size`): otherwise
//!    demand sizing (every active user adds its `warm_pool_size`) grows it to 8.
//!
//! Samples that failed, or that lack a figure (NaN), are counted and printed next to each
//! row, never dropped silently.
//!
//! To show where the API's time goes, (1) also places the platform's own timestamps on
//! the client's time line (same host clock): the `submitted`, `running` and `finished`
//! lines of its log (µs grain), the record's `created_at`/`started_at` and the events'
//! `at` (1 ms grain); and the run measures the disk floor of the embedded store on the
//! data directory's file system (an event append + fdatasync, a record's atomic replace).
//!
//! Must run as root (the platform creates cgroups and namespaces), with the root
//! filesystem at /var/lib/hatchery/rootfs/r (or `HATCHERY_ROOTFS`) and the `sandbox` and
//! `hatchery-zygote` binaries built next to `hatchery` (target/release). Nothing is left
//! behind: `hatchery up` gets SIGTERM (SIGKILL after a few seconds) and is waited for by a
//! Drop guard, also on panic or Ctrl-C; it also dies with the bench (PR_SET_PDEATHSIG);
//! the temporary directory is removed; the end of the run checks that no process of the
//! platform or of the in-process pool is left.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hatchery_sandbox::pool::{Event, ExecRequest, Execution, Pool, PoolConfig};
use hatchery_sandbox::zygote::server::Language;
use hatchery_sandbox::Limits;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const HATCHERY: &str = env!("CARGO_BIN_EXE_hatchery");
const CODE: &str = "cat(1)";
const EXPECT: &str = "1";
/// Pool size of the platform (pinned: `max_pool_size` too) and of the in-process pool.
const POOL_SIZE: usize = 2;
/// Executions the platform's host runs at once (the config default).
const CAPACITY: u32 = 4;
/// Cgroup parents (below the hatchery one), so that neither side reaps the other's.
const API_CGROUP: &str = "hatchery/bench-api";
const POOL_CGROUP: &str = "hatchery/bench-pool";
/// Deadline of any single wait (the machine may be loaded).
const PATIENCE: Duration = Duration::from_secs(180);
/// SIGTERM → SIGKILL of `hatchery up`.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
struct Opts {
    n: usize,
    seconds: f64,
    slice: f64,
    clients: usize,
    pause: Duration,
    keep_log: Option<PathBuf>,
    rootfs: PathBuf,
    sandbox_bin: PathBuf,
    zygote_bin: PathBuf,
}

const USAGE: &str = "\
usage: cargo bench -p hatchery-api --bench api_latency [-- OPTIONS]

options (each number also read from the environment variable named in brackets; a
flag wins):
  --n N           sequential executions through the API, and claims of the in-process
                  pool (default 50)  [HATCHERY_BENCH_N]
  --seconds S     throughput time of each side (default 10), in alternating slices
                  [HATCHERY_BENCH_SECONDS]
  --slice S       length of one throughput slice (default 2)  [HATCHERY_BENCH_SLICE]
  --clients K     concurrent clients (users user1..userK) and pool threads of the
                  throughput runs (default 4)  [HATCHERY_BENCH_CLIENTS]
  --pause-ms P    pause after each sequential execution finished (default 250)
                  [HATCHERY_BENCH_PAUSE_MS]
  --keep-log FILE copy the platform's log there before its directory is removed
  --help          this text

environment:
  HATCHERY_ROOTFS   root filesystem (default /var/lib/hatchery/rootfs/r)

needs: root; `cargo build --release -p hatchery-api -p hatchery-sandbox` (the sandbox
and hatchery-zygote binaries next to hatchery).";

/// The numeric flags, and the environment variable each one may also come from.
const NUMERIC_FLAGS: [(&str, &str); 5] = [
    ("--n", "HATCHERY_BENCH_N"),
    ("--seconds", "HATCHERY_BENCH_SECONDS"),
    ("--slice", "HATCHERY_BENCH_SLICE"),
    ("--clients", "HATCHERY_BENCH_CLIENTS"),
    ("--pause-ms", "HATCHERY_BENCH_PAUSE_MS"),
];

fn parse_args() -> Result<Opts, String> {
    let bin_dir = Path::new(HATCHERY)
        .parent()
        .ok_or("no directory of the hatchery binary")?;
    let mut o = Opts {
        n: 50,
        seconds: 10.0,
        slice: 2.0,
        clients: 4,
        pause: Duration::from_millis(250),
        keep_log: None,
        rootfs: std::env::var_os("HATCHERY_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(hatchery_sandbox::DEFAULT_ROOTFS)),
        sandbox_bin: bin_dir.join("sandbox"),
        zygote_bin: bin_dir.join("hatchery-zygote"),
    };
    // (flag, value) pairs: the environment first, then the command line (which wins).
    let mut settings: Vec<(String, String)> = NUMERIC_FLAGS
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
            f if f == "--keep-log" || NUMERIC_FLAGS.iter().any(|(name, _)| *name == f) => {
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
    let secs = |name: &str, v: &str| -> Result<f64, String> {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|s| *s > 0.0 && s.is_finite())
            .ok_or_else(|| format!("{name} expects a positive number, got {v:?}"))
    };
    for (flag, v) in settings {
        match flag.as_str() {
            "--n" => o.n = int(&flag, &v)?,
            "--clients" => o.clients = int(&flag, &v)?,
            "--seconds" => o.seconds = secs(&flag, &v)?,
            "--slice" => o.slice = secs(&flag, &v)?,
            "--pause-ms" => {
                let p = v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("--pause-ms expects milliseconds, got {v:?}"))?;
                o.pause = Duration::from_millis(p);
            }
            "--keep-log" => o.keep_log = Some(PathBuf::from(v)),
            _ => unreachable!("only known flags are collected"),
        }
    }
    for bin in [&o.sandbox_bin, &o.zygote_bin] {
        if !bin.is_file() {
            return Err(format!(
                "{} is missing: build it with `cargo build --release -p hatchery-sandbox`",
                bin.display()
            ));
        }
    }
    if !o.rootfs.is_dir() {
        return Err(format!("no root filesystem at {}", o.rootfs.display()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("must run as root (cgroups, namespaces)".into());
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------
// Statistics

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    min: f64,
    max: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

/// Statistics of the finite values (a NaN is a sample without this figure: it is
/// counted by [`Table::row`], not dropped silently).
fn stats(values: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let p50 = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        n,
        p50,
        p90: percentile(&v, 0.90),
        p99: percentile(&v, 0.99),
        min: v[0],
        max: v[n - 1],
    })
}

fn median(values: &[f64]) -> f64 {
    stats(values).map_or(f64::NAN, |s| s.p50)
}

/// A row: its label, the statistics of its finite values and how many were NaN.
type Row = (String, Option<Stats>, usize);

struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn new() -> Table {
        Table { rows: Vec::new() }
    }

    fn row(&mut self, label: impl Into<String>, values: &[f64]) {
        let missing = values.iter().filter(|v| !v.is_finite()).count();
        self.rows.push((label.into(), stats(values), missing));
    }

    fn section(&mut self, label: impl Into<String>) {
        self.rows.push((format!("## {}", label.into()), None, 0));
    }

    fn print(&self) {
        println!(
            "{:<54} {:>4} {:>4} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "measurement (ms)", "n", "NaN", "p50", "p90", "p99", "min", "max"
        );
        for (label, s, missing) in &self.rows {
            match (label.strip_prefix("## "), s) {
                (Some(section), _) => println!("-- {section}"),
                (None, Some(s)) => println!(
                    "{:<54} {:>4} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    label, s.n, missing, s.p50, s.p90, s.p99, s.min, s.max
                ),
                (None, None) => println!("{label:<54} {:>4} {missing:>4}", 0),
            }
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------
// Processes

/// `(ppid, starttime)` of a live process, from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command is in parentheses and may contain anything: parse after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): ppid is field 4, starttime field 22.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

/// Every live process below `root` (not `root` itself), with its start time.
fn descendants(root: i32) -> BTreeSet<(i32, u64)> {
    let mut children: BTreeMap<i32, Vec<(i32, u64)>> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((ppid, start)) = proc_stat(pid) {
                children.entry(ppid).or_default().push((pid, start));
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &(c, start) in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            if out.insert((c, start)) {
                todo.push(c);
            }
        }
    }
    out
}

/// The same process still exists (same pid and start time), and is not a zombie.
fn alive(pid: i32, start: u64) -> bool {
    let Some((_, s)) = proc_stat(pid) else {
        return false;
    };
    if s != start {
        return false;
    }
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let rest = t[t.rfind(')')? + 2..].to_string();
            rest.chars().next()
        });
    state != Some('Z')
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------
// The platform: a `hatchery up` child

struct Platform {
    child: Option<Child>,
    pid: i32,
    addr: SocketAddr,
    config: PathBuf,
    dir: PathBuf,
    /// Every process seen below `hatchery up` while it ran.
    seen: BTreeSet<(i32, u64)>,
    tmp: Option<tempfile::TempDir>,
}

/// What stopping the platform found.
struct StopReport {
    exit: String,
    stop_ms: f64,
    seen: usize,
    /// Processes of the platform still alive after it exited (killed then).
    leftover: Vec<String>,
    tmp_removed: Result<(), String>,
}

impl Platform {
    fn start(o: &Opts) -> Result<Platform, String> {
        let tmp = tempfile::Builder::new()
            .prefix("hatchery-bench-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let dir = tmp.path().to_path_buf();
        let config = dir.join("hatchery.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 data_dir = \"{data}\"\n\
                 rootfs = \"{rootfs}\"\n\
                 token_ttl = \"2h\"\n\
                 [agent]\n\
                 name = \"bench\"\n\
                 pool_size = {POOL_SIZE}\n\
                 max_pool_size = {POOL_SIZE}\n\
                 capacity = {CAPACITY}\n\
                 r_packages = []\n\
                 shutdown_grace = \"0s\"\n\
                 cgroup_parent = \"{API_CGROUP}\"\n\
                 [platform]\n\
                 languages = [\"r\"]\n",
                data = dir.join("data").display(),
                rootfs = o.rootfs.display(),
            ),
        )
        .map_err(|e| format!("config: {e}"))?;
        let log = std::fs::File::create(dir.join("hatchery.log"))
            .map_err(|e| format!("log file: {e}"))?;
        let mut cmd = Command::new(HATCHERY);
        for (var, _) in hatchery_api::config::ENV_VARS {
            cmd.env_remove(var);
        }
        cmd.arg("up")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            // Its own process group: a Ctrl-C reaches the bench, which stops it in order.
            .process_group(0);
        // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| format!("spawn hatchery up: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let pid = child.id() as i32;
        let mut p = Platform {
            child: Some(child),
            pid,
            addr: "127.0.0.1:1".parse().unwrap(),
            config,
            dir,
            seen: BTreeSet::new(),
            tmp: Some(tmp),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let banner = p.dir.join("banner.txt");
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(banner).ok();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = out.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if let Some(url) = line.strip_prefix("hatchery: listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => {
                p.addr = addr
                    .parse()
                    .map_err(|e| format!("listening address {addr:?}: {e}"))?
            }
            Err(_) => {
                p.dump_log();
                return Err("hatchery up did not print its address".into());
            }
        }
        Ok(p)
    }

    /// Remembers the platform's current processes (zygote, sandboxes) for the final check.
    fn note_processes(&mut self) {
        let now = descendants(self.pid);
        self.seen.extend(now);
    }

    async fn ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = http(self.addr, "GET", "/readyz", None, None).await {
                if r.status == 200 {
                    self.note_processes();
                    return Ok(());
                }
            }
            if Instant::now() > deadline || stopped() {
                self.dump_log();
                return Err("hatchery never became ready".into());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.dump_log();
                    return Err(format!("hatchery up exited: {st}"));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn token(&self, org: &str, user: &str) -> Result<String, String> {
        let out = Command::new(HATCHERY)
            .args([
                "token", "create", "--org", org, "--user", user, "--role", "user",
            ])
            .arg("--config")
            .arg(&self.config)
            .output()
            .map_err(|e| format!("hatchery token create: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// SIGTERM, SIGKILL after [`STOP_GRACE`], waits; then kills whatever of its processes
    /// outlived it and removes the temporary directory.
    fn stop(&mut self) -> Option<StopReport> {
        let mut child = self.child.take()?;
        self.note_processes();
        let t = Instant::now();
        // SAFETY: kill(2) on our own child, not yet waited for (its pid is still ours).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let mut status = None;
        while t.elapsed() < STOP_GRACE {
            if let Ok(Some(s)) = child.try_wait() {
                status = Some(s.to_string());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let exit = match status {
            Some(s) => s,
            None => {
                let _ = child.kill();
                match child.wait() {
                    Ok(s) => format!("{s} (SIGKILL after {} s)", STOP_GRACE.as_secs()),
                    Err(e) => format!("wait: {e}"),
                }
            }
        };
        let stop_ms = ms(t.elapsed());
        // Its sandboxes are torn down asynchronously by the kernel at most: give stragglers
        // a moment, then kill any that are left (ours: seen below our child).
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut left: Vec<(i32, u64)>;
        loop {
            left = self
                .seen
                .iter()
                .copied()
                .filter(|&(p, s)| alive(p, s))
                .collect();
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let leftover = left
            .iter()
            .map(|&(p, _)| {
                let c = comm(p);
                // SAFETY: kill(2) of a process that descended from our child (pid and
                // start time checked just above).
                unsafe { libc::kill(p, libc::SIGKILL) };
                format!("{p} ({c})")
            })
            .collect();
        let tmp_removed = match self.tmp.take() {
            Some(t) => t.close().map_err(|e| e.to_string()),
            None => Ok(()),
        };
        Some(StopReport {
            exit,
            stop_ms,
            seen: self.seen.len(),
            leftover,
            tmp_removed,
        })
    }

    fn dump_log(&self) {
        let log = std::fs::read_to_string(self.dir.join("hatchery.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("---- hatchery.log (last 40 lines) ----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }

    /// Lines of the platform's log at WARN or above (shown at the end).
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("hatchery.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        if let Some(r) = self.stop() {
            if !r.leftover.is_empty() {
                eprintln!(
                    "api_latency: killed leftover platform processes: {}",
                    r.leftover.join(", ")
                );
            }
        }
    }
}

/// Epoch milliseconds of an RFC 3339 UTC timestamp as `tracing` writes it
/// (`2025-01-31T12:34:56.123456Z`).
fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let h: f64 = t.next()?.parse().ok()?;
    let min: f64 = t.next()?.parse().ok()?;
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days as f64 * 24.0 + h) * 60.0 + min) * 60_000.0 + sec * 1000.0)
}

/// From the platform's log: per execution id, when `submitted`, `running` and `finished`
/// were logged (epoch ms).
fn log_times(log: &str) -> BTreeMap<String, [f64; 3]> {
    let mut out: BTreeMap<String, [f64; 3]> = BTreeMap::new();
    for line in log.lines() {
        let Some((ts, rest)) = line.split_once(' ') else {
            continue;
        };
        let slot = if rest.contains(" submitted ") {
            0
        } else if rest.contains(" running ") {
            1
        } else if rest.contains(" finished ") {
            2
        } else {
            continue;
        };
        let Some(id) = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("execution="))
            .map(|id| id.trim_matches('"'))
        else {
            continue;
        };
        let Some(at) = parse_utc(ts) else { continue };
        out.entry(id.to_string()).or_insert([f64::NAN; 3])[slot] = at;
    }
    out
}

/// The disk floor of the embedded store on the data directory's file system: an event
/// append + fdatasync, and a record's atomic replace (write, fsync, rename, fsync dir).
fn disk_floor(dir: &Path, n: usize) -> (Vec<f64>, Vec<f64>) {
    use std::fs::{File, OpenOptions};
    let probe = dir.join("fsync-probe");
    let _ = std::fs::create_dir_all(&probe);
    let (mut append, mut replace) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let ok = OpenOptions::new()
            .create(true)
            .append(true)
            .open(probe.join("events.jsonl"))
            .and_then(|mut f| {
                f.write_all(&[b'x'; 300])?;
                f.sync_data()
            });
        if ok.is_ok() {
            append.push(ms(t.elapsed()));
        }
        let t = Instant::now();
        let ok = File::create(probe.join("record.json.tmp"))
            .and_then(|mut f| {
                f.write_all(&[b'y'; 600])?;
                f.sync_all()
            })
            .and_then(|()| {
                std::fs::rename(probe.join("record.json.tmp"), probe.join("record.json"))
            })
            .and_then(|()| File::open(&probe)?.sync_all());
        if ok.is_ok() {
            replace.push(ms(t.elapsed()));
        }
    }
    let _ = std::fs::remove_dir_all(&probe);
    (append, replace)
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one connection per request) and the WebSocket

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            format!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let payload = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
    match &payload {
        Some(b) => req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        )),
        None if method != "GET" => req.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = payload {
        bytes.extend_from_slice(&b);
    }
    stream.write_all(&bytes).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        if let Some(r) = parse_response(&buf) {
            return Ok(r);
        }
        match stream.read(&mut chunk).await? {
            0 => {
                return parse_response(&buf).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated response")
                })
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A complete response in `buf`, if there is one.
fn parse_response(buf: &[u8]) -> Option<Resp> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..].windows(2).position(|w| w == b"\r\n")? + at;
            let size =
                usize::from_str_radix(std::str::from_utf8(&rest[at..line_end]).ok()?.trim(), 16)
                    .ok()?;
            at = line_end + 2;
            if size == 0 {
                break out;
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    } else if status == 101 || status == 204 || status == 304 {
        Vec::new()
    } else {
        return None; // read to the end
    };
    Some(Resp {
        status,
        headers,
        body,
    })
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_events(addr: SocketAddr, id: &str, token: &str) -> Result<WsStream, String> {
    let url = format!("ws://{addr}/v1/executions/{id}/events?after=0&token={token}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("websocket of {id}: {e}"))?;
    Ok(ws)
}

// ---------------------------------------------------------------------------------------
// One execution through the API

/// Milliseconds from just before the POST (client clock, `Instant`), and the server's
/// timestamps relative to the same moment (epoch ms: 1 ms resolution).
#[derive(Debug, Clone, Default)]
struct ApiSample {
    id: String,
    t0_epoch: f64,
    accepted: f64,
    ws_open: f64,
    started: f64,
    first_out: f64,
    finished: f64,
    /// The sandbox's claim → first user statement.
    start_ms: f64,
    /// Server timestamps − the client's epoch time just before the POST.
    srv_created: f64,
    srv_running: f64,
    srv_started_ev: f64,
    srv_stdout_ev: f64,
    srv_finished_ev: f64,
    /// The platform's log lines of this execution (µs grain), same reference.
    log_submitted: f64,
    log_running: f64,
    log_finished: f64,
    /// The `finished` event's state, and everything the `stdout` events carried.
    state: String,
    stdout: String,
}

impl ApiSample {
    /// Counts only when it succeeded with the right output; otherwise why not.
    fn verdict(&self) -> Result<(), String> {
        verdict(&self.state, self.stdout.as_bytes())
    }
}

/// An execution counts when it succeeded and printed exactly [`EXPECT`]; otherwise its
/// state, or `wrong output`.
fn verdict(state: &str, stdout: &[u8]) -> Result<(), String> {
    if state != "succeeded" {
        Err(state.to_string())
    } else if stdout != EXPECT.as_bytes() {
        Err("wrong output".to_string())
    } else {
        Ok(())
    }
}

/// Why a submission did not give an execution.
enum SubmitError {
    /// 429/503: overload, retry after this long.
    Overload(u16, Duration),
    Other(String),
}

impl SubmitError {
    fn message(&self) -> String {
        match self {
            SubmitError::Overload(c, _) => format!("answered {c}"),
            SubmitError::Other(e) => e.clone(),
        }
    }
}

/// POST → 202, events WebSocket (`after=0`) → `finished`. `full` also reads the record
/// back (`start_ms`, server timestamps) when the execution counts.
async fn api_once(addr: SocketAddr, token: &str, full: bool) -> Result<ApiSample, SubmitError> {
    let mut s = ApiSample::default();
    let body = json!({"language": "r", "code": CODE});
    let t0_epoch = epoch_ms();
    let t0 = Instant::now();
    let r = http(addr, "POST", "/v1/executions", Some(token), Some(&body))
        .await
        .map_err(|e| SubmitError::Other(format!("POST: {e}")))?;
    s.accepted = ms(t0.elapsed());
    if r.status == 429 || r.status == 503 {
        let after = r
            .header("retry-after")
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_millis(100), Duration::from_secs);
        return Err(SubmitError::Overload(r.status, after));
    }
    let v = r.json().map_err(SubmitError::Other)?;
    if r.status != 202 {
        return Err(SubmitError::Other(format!(
            "POST answered {}: {v}",
            r.status
        )));
    }
    let id = v["id"]
        .as_str()
        .ok_or_else(|| SubmitError::Other(format!("no id in {v}")))?
        .to_string();
    s.id = id.clone();
    s.t0_epoch = t0_epoch;
    let mut ws = ws_events(addr, &id, token)
        .await
        .map_err(SubmitError::Other)?;
    s.ws_open = ms(t0.elapsed());
    let (mut started, mut out, mut fin) = (None, None, None);
    let mut stdout = String::new();
    let mut finished: Option<Value> = None;
    s.srv_started_ev = f64::NAN;
    s.srv_stdout_ev = f64::NAN;
    s.srv_finished_ev = f64::NAN;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while finished.is_none() {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| SubmitError::Other(format!("{id}: no `finished` in time")))?;
        let e: Value = match msg {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t)
                .map_err(|e| SubmitError::Other(format!("event {t:?}: {e}")))?,
            Some(Ok(Message::Close(_))) | None => {
                return Err(SubmitError::Other(format!(
                    "{id}: the stream closed before `finished`"
                )))
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(SubmitError::Other(format!("{id}: websocket: {e}"))),
        };
        let now = ms(t0.elapsed());
        let at = e["at"].as_f64().map_or(f64::NAN, |a| a - t0_epoch);
        match e["type"].as_str() {
            Some("started") => {
                started.get_or_insert(now);
                s.srv_started_ev = at;
            }
            Some("stdout") => {
                if out.is_none() {
                    out = Some(now);
                    s.srv_stdout_ev = at;
                }
                stdout.push_str(e["data"].as_str().unwrap_or(""));
            }
            Some("finished") => {
                fin = Some(now);
                s.srv_finished_ev = at;
                finished = Some(e);
            }
            _ => {}
        }
    }
    drop(ws);
    let fe = finished.unwrap_or_default();
    s.started = started.unwrap_or(f64::NAN);
    s.first_out = out.unwrap_or(f64::NAN);
    s.finished = fin.unwrap_or(f64::NAN);
    s.state = fe["state"].as_str().unwrap_or("?").to_string();
    s.stdout = stdout;
    s.start_ms = fe["start_ms"].as_f64().unwrap_or(f64::NAN);
    s.srv_created = f64::NAN;
    s.srv_running = f64::NAN;
    if full && s.verdict().is_ok() {
        let r = http(
            addr,
            "GET",
            &format!("/v1/executions/{id}"),
            Some(token),
            None,
        )
        .await
        .map_err(|e| SubmitError::Other(format!("GET {id}: {e}")))?;
        let rec = r.json().map_err(SubmitError::Other)?;
        if r.status != 200 {
            return Err(SubmitError::Other(format!("GET {id}: {}: {rec}", r.status)));
        }
        s.start_ms = rec["result"]["start_ms"].as_f64().unwrap_or(f64::NAN);
        let rel = |k: &str| rec[k].as_f64().map_or(f64::NAN, |a| a - t0_epoch);
        s.srv_created = rel("created_at");
        s.srv_running = rel("started_at");
    }
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// One claim of the in-process pool, as the platform's agent would make it

/// What the agent of `hatchery up` asks of its R pool, read from the config file the
/// platform was started with (the agent is built from it by `hatchery up`).
#[derive(Debug, Clone)]
struct AgentView {
    limits: Limits,
    timeout: Option<Duration>,
    usage_interval: Duration,
    output_limit: u64,
    max_events: u64,
    claim_timeout: Duration,
    pool_size: usize,
    max_pool_size: usize,
    packages: Vec<String>,
}

impl AgentView {
    fn read(config: &Path) -> Result<AgentView, String> {
        // `hatchery up` runs with every HATCHERY_* variable removed: no environment here.
        let cfg = hatchery_api::config::Config::load_from(Some(config), &BTreeMap::new())
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let policy = cfg.platform_config().default_policy;
        // What the config does not set, the agent takes from its own defaults.
        let agent = hatchery_scheduler::agent::AgentConfig::new("bench");
        Ok(AgentView {
            limits: Limits {
                memory_bytes: Some(policy.memory_bytes),
                cpus: Some(policy.cpus),
                pids: Some(policy.pids),
            },
            timeout: (policy.time_limit_ms > 0)
                .then(|| Duration::from_millis(policy.time_limit_ms)),
            usage_interval: agent.usage_interval,
            output_limit: cfg.output_limit(),
            max_events: cfg.agent.max_events,
            claim_timeout: agent.claim_timeout,
            pool_size: cfg.agent.pool_size,
            max_pool_size: cfg.agent.max_pool_size,
            packages: cfg.agent.r_packages.clone(),
        })
    }

    fn describe(&self) -> String {
        format!(
            "memory {} MiB, cpus {}, pids {}, time {}, usage every {} ms, output limit {} \
             MiB, max events {}; written while pooled (default_limits); pool size {} (max \
             {}), packages [{}]",
            self.limits.memory_bytes.unwrap_or(0) >> 20,
            self.limits.cpus.unwrap_or(f64::NAN),
            self.limits.pids.unwrap_or(0),
            self.timeout
                .map_or("none".to_string(), |t| format!("{} s", t.as_secs_f64())),
            self.usage_interval.as_millis(),
            self.output_limit >> 20,
            self.max_events,
            self.pool_size,
            self.max_pool_size,
            self.packages.join(",")
        )
    }

    /// The pool the agent would start for R.
    fn pool_config(&self, o: &Opts) -> PoolConfig {
        let mut pc = PoolConfig::new(
            Language::R {
                packages: self.packages.clone(),
            },
            o.rootfs.clone(),
        );
        pc.size = self.pool_size;
        pc.default_limits = Some(self.limits);
        pc.sandbox_bin = o.sandbox_bin.clone();
        pc.zygote_bin = o.zygote_bin.clone();
        pc.cgroup_parent = POOL_CGROUP.into();
        pc.claim_timeout = self.claim_timeout;
        pc
    }

    /// The request the agent builds for an execution at the platform default policy.
    fn exec_request(&self) -> ExecRequest {
        let mut req = ExecRequest::new(CODE);
        req.limits = self.limits;
        req.timeout = self.timeout;
        req.usage_interval = self.usage_interval;
        req.output_limit = self.output_limit;
        req.max_events = self.max_events;
        req
    }
}

#[derive(Debug, Clone, Default)]
struct PoolSample {
    claim_call: f64,
    started: f64,
    first_out: f64,
    finished: f64,
    start_ms: f64,
    claim_ms: f64,
    queued_ms: f64,
    state: String,
    stdout: Vec<u8>,
}

impl PoolSample {
    fn verdict(&self) -> Result<(), String> {
        verdict(&self.state, &self.stdout)
    }
}

/// Waits for the rest of an execution's events until its watcher has ended (it drops its
/// sender only after the sandbox is torn down).
fn drain(exec: &Execution) {
    while exec.events().recv().is_ok() {}
}

/// One claim followed to its result; the execution is returned undrained. An error is a
/// claim that failed or an execution without a result; whether it counts is
/// [`PoolSample::verdict`].
fn pool_once(pool: &Pool, view: &AgentView) -> Result<(PoolSample, Execution), String> {
    let req = view.exec_request();
    let t0 = Instant::now();
    let exec = pool.claim(req).map_err(|e| format!("claim: {e}"))?;
    let mut s = PoolSample {
        claim_call: ms(t0.elapsed()),
        started: f64::NAN,
        first_out: f64::NAN,
        ..Default::default()
    };
    let result = loop {
        match exec.events().recv() {
            Ok(Event::Started { .. }) => s.started = ms(t0.elapsed()),
            Ok(Event::Stdout { data }) => {
                if s.stdout.is_empty() {
                    s.first_out = ms(t0.elapsed());
                }
                s.stdout.extend_from_slice(&data);
            }
            Ok(Event::Finished(r)) => {
                s.finished = ms(t0.elapsed());
                break r;
            }
            Ok(_) => {}
            Err(_) => return Err("the execution ended without a result".into()),
        }
    };
    s.state = serde_json::to_value(result.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{:?}", result.status));
    s.start_ms = result.timings.start_ms.unwrap_or(f64::NAN);
    s.claim_ms = result.timings.claim_ms;
    s.queued_ms = result.timings.queued_ms;
    Ok((s, exec))
}

// ---------------------------------------------------------------------------------------
// Throughput

#[derive(Default)]
struct Throughput {
    /// Time under load: per slice, from its start to its last completed execution.
    elapsed_s: f64,
    /// Executions that succeeded with the right output (the only ones counted).
    done: usize,
    to_finished: Vec<f64>,
    /// API: POST → `started` event; pool: queued_ms (waiting for a frozen sandbox).
    to_started: Vec<f64>,
    start_ms: Vec<f64>,
    /// Completed executions that do not count, by state (or `wrong output`).
    bad: BTreeMap<String, usize>,
    overload: BTreeMap<u16, usize>,
    /// Submissions or claims that failed outright, and the first messages.
    errors: usize,
    error_messages: Vec<String>,
    /// Per slice: executions counted, and its time under load.
    slices: Vec<(usize, f64)>,
}

impl Throughput {
    fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.done as f64 / self.elapsed_s
        } else {
            f64::NAN
        }
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_messages.len() < 3 {
            self.error_messages.push(e);
        }
    }

    /// Adds one slice.
    fn absorb(&mut self, s: Throughput) {
        self.elapsed_s += s.elapsed_s;
        self.done += s.done;
        self.to_finished.extend(s.to_finished);
        self.to_started.extend(s.to_started);
        self.start_ms.extend(s.start_ms);
        for (k, n) in s.bad {
            *self.bad.entry(k).or_default() += n;
        }
        for (k, n) in s.overload {
            *self.overload.entry(k).or_default() += n;
        }
        self.errors += s.errors;
        for m in s.error_messages {
            if self.error_messages.len() < 3 {
                self.error_messages.push(m);
            }
        }
        self.slices.push((s.done, s.elapsed_s));
    }
}

/// One slice of `seconds` through the API: every client submits back to back; what was
/// submitted before the end is waited for.
async fn api_throughput(addr: SocketAddr, tokens: &[String], seconds: f64) -> Throughput {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let shared: Arc<Mutex<(Throughput, Option<Instant>)>> = Arc::default();
    let mut tasks = Vec::new();
    for token in tokens {
        let token = token.clone();
        let shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline && !stopped() {
                let r = api_once(addr, &token, false).await;
                let backoff = {
                    let mut g = shared.lock().unwrap();
                    let (tp, last) = &mut *g;
                    match r {
                        Ok(s) => {
                            *last = Some(Instant::now());
                            match s.verdict() {
                                Ok(()) => {
                                    tp.done += 1;
                                    tp.to_finished.push(s.finished);
                                    tp.to_started.push(s.started);
                                    tp.start_ms.push(s.start_ms);
                                }
                                Err(why) => *tp.bad.entry(why).or_default() += 1,
                            }
                            None
                        }
                        Err(SubmitError::Overload(code, after)) => {
                            *tp.overload.entry(code).or_default() += 1;
                            Some(after.min(Duration::from_millis(500)))
                        }
                        Err(SubmitError::Other(e)) => {
                            tp.error(e);
                            if tp.errors > 20 {
                                break;
                            }
                            None
                        }
                    }
                };
                if let Some(b) = backoff {
                    tokio::time::sleep(b).await;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let (mut tp, last) = std::mem::take(&mut *shared.lock().unwrap());
    tp.elapsed_s = last.map_or(0.0, |l| (l - start).as_secs_f64());
    tp
}

/// One slice of `seconds` on the in-process pool: `threads` threads claim back to back;
/// what was claimed before the end is waited for (and torn down).
fn pool_throughput(pool: &Pool, view: &AgentView, threads: usize, seconds: f64) -> Throughput {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let shared: Mutex<(Throughput, Option<Instant>)> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut pending = Vec::new();
                while Instant::now() < deadline && !stopped() {
                    let r = pool_once(pool, view);
                    let mut g = shared.lock().unwrap();
                    let (tp, last) = &mut *g;
                    match r {
                        Ok((s, exec)) => {
                            *last = Some(Instant::now());
                            match s.verdict() {
                                Ok(()) => {
                                    tp.done += 1;
                                    tp.to_finished.push(s.finished);
                                    tp.to_started.push(s.queued_ms);
                                    tp.start_ms.push(s.start_ms);
                                }
                                Err(why) => *tp.bad.entry(why).or_default() += 1,
                            }
                            pending.push(exec);
                        }
                        Err(e) => {
                            tp.error(e);
                            if tp.errors > 20 {
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
    let (mut tp, last) = shared.into_inner().unwrap();
    tp.elapsed_s = last.map_or(0.0, |l| (l - start).as_secs_f64());
    tp
}

// ---------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("api_latency: {e}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("api_latency: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(&o, &rt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("api_latency: {e}");
            ExitCode::FAILURE
        }
    };
    // Whatever of ours is still below this process (the in-process pool's zygote and
    // sandboxes are gone with the pool; `hatchery up` with its guard).
    let mine: Vec<String> = descendants(std::process::id() as i32)
        .into_iter()
        .map(|(p, _)| format!("{p} ({})", comm(p)))
        .collect();
    if mine.is_empty() {
        println!("leftover processes of this bench: none");
    } else {
        println!("leftover processes of this bench: {}", mine.join(", "));
    }
    code
}

/// Removes the bench's two parent cgroups at the end of the run (declared first in
/// `run`, so it drops after the platform and the pool), once their sandboxes are reaped.
struct RemoveParents;

impl Drop for RemoveParents {
    fn drop(&mut self) {
        for parent in [API_CGROUP, POOL_CGROUP] {
            let Ok(root) = hatchery_sandbox::cgroup::CgroupRoot::detect(parent) else {
                continue;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(root.remove_if_empty(), Ok(true)) && Instant::now() < deadline {
                let _ = hatchery_sandbox::gc::collect(&root);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn run(o: &Opts, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    let _parents = RemoveParents;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_start = loadavg();
    let command: Vec<String> = std::env::args().collect();
    println!("Hatchery API latency benchmark");
    println!(
        "  command  cargo bench -p hatchery-api --bench api_latency -- {}",
        command
            .iter()
            .skip(1)
            .filter(|a| *a != "--bench")
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("  hatchery {HATCHERY}");
    println!("  sandbox  {}", o.sandbox_bin.display());
    println!("  zygote   {}", o.zygote_bin.display());
    println!("  rootfs   {}", o.rootfs.display());
    let slices = (o.seconds / o.slice).ceil().max(1.0) as usize;
    let slice_s = o.seconds / slices as f64;
    println!(
        "  nproc {nproc}; R; capacity {CAPACITY}; code {CODE:?}; sequential n = {}, pause {} ms \
         after each; throughput {} s per side in {slices} alternating slices of {slice_s:.2} \
         s, {} clients / threads",
        o.n,
        o.pause.as_millis(),
        o.seconds,
        o.clients
    );
    println!("  loadavg at start: {load_start}");

    // ---- setup: the platform and the in-process pool, configured alike
    let t = Instant::now();
    let mut platform = Platform::start(o)?;
    let view = AgentView::read(&platform.config)?;
    println!(
        "  platform's agent and in-process pool alike (read from the platform's config): {}",
        view.describe()
    );
    rt.block_on(platform.ready())?;
    let platform_ready_s = t.elapsed().as_secs_f64();
    let addr = platform.addr;
    let seq_token = platform.token("bench", "seq")?;
    let tokens: Vec<String> = (1..=o.clients)
        .map(|i| platform.token("bench", &format!("user{i}")))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let pool = Pool::start(view.pool_config(o)).map_err(|e| format!("pool: {e}"))?;
    pool.wait_ready(view.pool_size, PATIENCE)
        .map_err(|e| format!("pool: {e}"))?;
    let pool_ready_s = t.elapsed().as_secs_f64();
    println!(
        "  platform at http://{addr} ready in {platform_ready_s:.2} s; in-process pool of \
         {} ready in {pool_ready_s:.2} s",
        view.pool_size
    );

    let disk = disk_floor(&platform.dir, 30);

    // ---- warm-up (not measured): one of each
    let s = rt
        .block_on(api_once(addr, &seq_token, true))
        .map_err(|e| format!("warm-up through the API: {}", e.message()))?;
    s.verdict()
        .map_err(|e| format!("warm-up through the API: {e}"))?;
    let (s, exec) = pool_once(&pool, &view)?;
    drain(&exec);
    s.verdict()
        .map_err(|e| format!("warm-up in process: {e}"))?;

    // ---- 1 + 2: sequential, alternating API and pool; failures counted, not dropped
    eprint!("sequential: {} rounds ", o.n);
    let mut api: Vec<Option<ApiSample>> = Vec::new();
    let mut local: Vec<Option<PoolSample>> = Vec::new();
    let mut api_failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut pool_failed: BTreeMap<String, usize> = BTreeMap::new();
    let mut failure_messages: Vec<String> = Vec::new();
    let give_up = (o.n / 2).max(10);
    for i in 0..o.n {
        if stopped() {
            break;
        }
        let api_first = i % 2 == 0;
        for step in 0..2 {
            if (step == 0) == api_first {
                std::thread::sleep(o.pause);
                rt.block_on(async {
                    let deadline = Instant::now() + PATIENCE;
                    loop {
                        match http(addr, "GET", "/readyz", None, None).await {
                            Ok(r) if r.status == 200 => return Ok(()),
                            _ if Instant::now() > deadline => return Err("not ready".to_string()),
                            _ => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })?;
                let sample = match rt.block_on(api_once(addr, &seq_token, true)) {
                    Ok(s) => match s.verdict() {
                        Ok(()) => Some(s),
                        Err(why) => {
                            *api_failed.entry(why).or_default() += 1;
                            None
                        }
                    },
                    Err(e) => {
                        *api_failed.entry("error".into()).or_default() += 1;
                        if failure_messages.len() < 5 {
                            failure_messages.push(format!("API: {}", e.message()));
                        }
                        None
                    }
                };
                api.push(sample);
                if i == 0 {
                    platform.note_processes();
                }
            } else {
                std::thread::sleep(o.pause);
                pool.wait_ready(view.pool_size, PATIENCE)
                    .map_err(|e| format!("pool: {e}"))?;
                let sample = match pool_once(&pool, &view) {
                    Ok((s, exec)) => {
                        drain(&exec);
                        match s.verdict() {
                            Ok(()) => Some(s),
                            Err(why) => {
                                *pool_failed.entry(why).or_default() += 1;
                                None
                            }
                        }
                    }
                    Err(e) => {
                        *pool_failed.entry("error".into()).or_default() += 1;
                        if failure_messages.len() < 5 {
                            failure_messages.push(format!("pool: {e}"));
                        }
                        None
                    }
                };
                local.push(sample);
            }
        }
        let failed = api_failed.values().sum::<usize>() + pool_failed.values().sum::<usize>();
        if failed > give_up {
            return Err(format!(
                "sequential: {failed} failures (API {api_failed:?}, pool {pool_failed:?}): \
                 {failure_messages:?}"
            ));
        }
        eprint!(".");
    }
    eprintln!();

    // ---- 3: throughput, API and pool in alternating slices
    eprint!("throughput: {slices} rounds of API + pool slices ");
    let mut api_tp = Throughput::default();
    let mut pool_tp = Throughput::default();
    let mut round_ratios = Vec::new();
    for r in 0..slices {
        if stopped() {
            break;
        }
        let mut rates = [f64::NAN; 2];
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            // Both sides start a slice the same way: the previous slice's sandboxes gone,
            // their own pool refilled.
            std::thread::sleep(Duration::from_millis(500));
            let tp = if side == 0 {
                rt.block_on(async {
                    let deadline = Instant::now() + PATIENCE;
                    loop {
                        match http(addr, "GET", "/readyz", None, None).await {
                            Ok(r) if r.status == 200 => return Ok(()),
                            _ if Instant::now() > deadline => return Err("not ready".to_string()),
                            _ => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })?;
                rt.block_on(api_throughput(addr, &tokens, slice_s))
            } else {
                pool.wait_ready(view.pool_size, PATIENCE)
                    .map_err(|e| format!("pool: {e}"))?;
                pool_throughput(&pool, &view, o.clients, slice_s)
            };
            rates[side] = tp.rate();
            if side == 0 {
                api_tp.absorb(tp);
                platform.note_processes();
            } else {
                pool_tp.absorb(tp);
            }
        }
        round_ratios.push(rates[0] / rates[1]);
        eprint!(".");
    }
    eprintln!();
    let pool_stats = pool.stats();
    drop(pool);
    let warnings = platform.warnings();
    let log = std::fs::read_to_string(platform.dir.join("hatchery.log")).unwrap_or_default();
    if let Some(dest) = &o.keep_log {
        match std::fs::write(dest, &log) {
            Ok(()) => println!("  platform log kept at {}", dest.display()),
            Err(e) => eprintln!(
                "api_latency: cannot keep the log at {}: {e}",
                dest.display()
            ),
        }
    }
    let times = log_times(&log);
    for s in api.iter_mut().flatten() {
        let t = times.get(&s.id).copied().unwrap_or([f64::NAN; 3]);
        s.log_submitted = t[0] - s.t0_epoch;
        s.log_running = t[1] - s.t0_epoch;
        s.log_finished = t[2] - s.t0_epoch;
    }
    let report = platform.stop();
    drop(platform);
    let load_end = loadavg();

    // ---- the table
    let api_ok: Vec<&ApiSample> = api.iter().flatten().collect();
    let local_ok: Vec<&PoolSample> = local.iter().flatten().collect();
    println!();
    let mut t = Table::new();
    t.section(format!(
        "1. through the API: {} of {} sequential `{CODE}` counted (readyz 200 + {} ms pause \
         before each)",
        api_ok.len(),
        api.len(),
        o.pause.as_millis()
    ));
    let col = |f: &dyn Fn(&ApiSample) -> f64| api_ok.iter().map(|s| f(s)).collect::<Vec<f64>>();
    t.row("POST → 202", &col(&|s| s.accepted));
    t.row("POST → WebSocket open (101)", &col(&|s| s.ws_open));
    t.row("POST → `started` event", &col(&|s| s.started));
    t.row("POST → first `stdout` event", &col(&|s| s.first_out));
    t.row("POST → `finished` event", &col(&|s| s.finished));
    t.row(
        "sandbox start_ms (claim → first statement, GET)",
        &col(&|s| s.start_ms),
    );
    t.section("   server side, from POST (same host clock): platform log, µs grain");
    t.row(
        "  `submitted` logged (admitted, answering)",
        &col(&|s| s.log_submitted),
    );
    t.row(
        "  `running` logged (agent: record marked running)",
        &col(&|s| s.log_running),
    );
    t.row(
        "  `finished` logged (result stored, record final)",
        &col(&|s| s.log_finished),
    );
    t.section("   server side, from POST: record and event timestamps, 1 ms grain");
    t.row(
        "  record created_at (before admission)",
        &col(&|s| s.srv_created),
    );
    t.row(
        "  record started_at (agent took it)",
        &col(&|s| s.srv_running),
    );
    t.row("  `started` event at", &col(&|s| s.srv_started_ev));
    t.row("  first `stdout` event at", &col(&|s| s.srv_stdout_ev));
    t.row("  `finished` event at", &col(&|s| s.srv_finished_ev));
    t.section(format!(
        "2. in-process pool, as the agent's: {} of {} claims of `{CODE}` counted (full pool \
         at each), alternating with 1",
        local_ok.len(),
        local.len()
    ));
    let lcol = |f: &dyn Fn(&PoolSample) -> f64| local_ok.iter().map(|s| f(s)).collect::<Vec<f64>>();
    t.row("claim() returned", &lcol(&|s| s.claim_call));
    t.row("claim → Started event", &lcol(&|s| s.started));
    t.row("claim → first Stdout event", &lcol(&|s| s.first_out));
    t.row("claim → Finished event", &lcol(&|s| s.finished));
    t.row(
        "sandbox start_ms (claim → first statement)",
        &lcol(&|s| s.start_ms),
    );
    t.row(
        "  claim_ms (limits + send code + thaw)",
        &lcol(&|s| s.claim_ms),
    );
    // Rounds where both sides counted.
    let pairs: Vec<(&ApiSample, &PoolSample)> = api
        .iter()
        .zip(&local)
        .filter_map(|(a, p)| Some((a.as_ref()?, p.as_ref()?)))
        .collect();
    let paired = |a: &dyn Fn(&ApiSample) -> f64, b: &dyn Fn(&PoolSample) -> f64| {
        pairs.iter().map(|(x, y)| a(x) - b(y)).collect::<Vec<f64>>()
    };
    t.section(format!(
        "disk floor on the data directory's file system ({} each)",
        disk.0.len()
    ));
    t.row("event append + fdatasync", &disk.0);
    t.row(
        "record replace: write + fsync + rename + fsync dir",
        &disk.1,
    );
    t.section(format!(
        "API overhead: API − pool, paired by round ({} rounds where both counted)",
        pairs.len()
    ));
    t.row(
        "first output: POST→stdout − claim→Stdout",
        &paired(&|s| s.first_out, &|s| s.first_out),
    );
    t.row(
        "started: POST→started − claim→Started",
        &paired(&|s| s.started, &|s| s.started),
    );
    t.row(
        "finished: POST→finished − claim→Finished",
        &paired(&|s| s.finished, &|s| s.finished),
    );
    t.row(
        "sandbox start_ms: API − pool",
        &paired(&|s| s.start_ms, &|s| s.start_ms),
    );
    t.section(format!(
        "3. throughput, {} s each in alternating slices: API with {} clients (one user each) | \
         in-process pool, {} threads; counted executions only",
        o.seconds, o.clients, o.clients
    ));
    t.row("API: POST → `finished`", &api_tp.to_finished);
    t.row("API: POST → `started` event", &api_tp.to_started);
    t.row("API: sandbox start_ms", &api_tp.start_ms);
    t.row("pool: claim → Finished", &pool_tp.to_finished);
    t.row(
        "pool: queued_ms (waiting for a frozen sandbox)",
        &pool_tp.to_started,
    );
    t.row("pool: sandbox start_ms", &pool_tp.start_ms);
    t.print();

    println!();
    println!(
        "sequential: API {} of {} counted, not counted {:?}; in process {} of {} counted, not \
         counted {:?}",
        api_ok.len(),
        api.len(),
        api_failed,
        local_ok.len(),
        local.len(),
        pool_failed
    );
    for m in &failure_messages {
        println!("    failure: {m}");
    }
    let api_out = median(&col(&|s| s.first_out));
    let pool_out = median(&lcol(&|s| s.first_out));
    let api_start = median(&col(&|s| s.start_ms));
    println!(
        "POST → first stdout p50 {api_out:.2} ms vs in-process claim → first Stdout p50 \
         {pool_out:.2} ms (same limits, same pool): the API adds {:.2} ms ({:.1}×); paired by \
         round, it adds {:.2} ms; sandbox start_ms p50 {api_start:.3} ms (API) vs {:.3} ms \
         (pool)",
        api_out - pool_out,
        api_out / pool_out,
        median(&paired(&|s| s.first_out, &|s| s.first_out)),
        median(&lcol(&|s| s.start_ms)),
    );
    let waited = local_ok.iter().filter(|s| s.queued_ms > 1.0).count();
    println!(
        "in-process claims that waited for a sandbox (queued_ms > 1): {waited} of {}",
        local_ok.len()
    );
    for (label, tp) in [("API", &api_tp), ("pool", &pool_tp)] {
        let per_slice: Vec<f64> = tp
            .slices
            .iter()
            .map(|(n, s)| if *s > 0.0 { *n as f64 / s } else { f64::NAN })
            .collect();
        println!(
            "throughput {label:<4}: {} counted in {:.2} s under load = {:.1} execs/s (per \
             slice: {}); not counted: {:?}; 429/503: {:?}; errors: {}",
            tp.done,
            tp.elapsed_s,
            tp.rate(),
            per_slice
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(" "),
            tp.bad,
            tp.overload,
            tp.errors
        );
        for e in &tp.error_messages {
            println!("    error: {e}");
        }
    }
    let ratio_stats = stats(&round_ratios);
    println!(
        "throughput API / pool: {:.2} over all slices; per round (one API and one pool slice, \
         side by side) median {:.2} (min {:.2}, max {:.2}, {} rounds)",
        api_tp.rate() / pool_tp.rate(),
        ratio_stats.map_or(f64::NAN, |s| s.p50),
        ratio_stats.map_or(f64::NAN, |s| s.min),
        ratio_stats.map_or(f64::NAN, |s| s.max),
        round_ratios.len()
    );
    println!(
        "in-process pool: forked {}, claimed {}",
        pool_stats.forked, pool_stats.claimed
    );
    if !warnings.is_empty() {
        println!("platform log WARN/ERROR lines: {}", warnings.len());
        for w in warnings.iter().take(5) {
            println!("    {w}");
        }
    }
    println!("loadavg at start: {load_start}; at end: {load_end}");
    if let Some(r) = report {
        println!(
            "cleanup: hatchery up exited ({}) {:.0} ms after SIGTERM; {} platform processes \
             seen, left: {}; temp dir removed: {}",
            r.exit,
            r.stop_ms,
            r.seen,
            if r.leftover.is_empty() {
                "none".to_string()
            } else {
                format!("{} (killed)", r.leftover.join(", "))
            },
            match r.tmp_removed {
                Ok(()) => "yes".to_string(),
                Err(e) => format!("no: {e}"),
            }
        );
    }
    println!(
        "notes: ms = milliseconds, wall clock of this process unless marked; p99 of fewer \
         than 100 samples is the maximum; start_ms is measured by the sandbox; NaN = counted \
         executions without that figure (statistics are over the others)."
    );
    Ok(())
}
