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
//! 3. sustained executions per second, in slices that rotate (API, pool, API kept; API
//!    kept, pool, API; ...) so that drift hits every side alike: through the API, K
//!    concurrent clients, each its own user (so the per-user parallelism cap of 2 never
//!    cancels one), submitting `cat(1)` back to back and waiting for `finished` on a
//!    WebSocket, either opening two connections per execution (its POST, then its own
//!    event stream) or, "kept", each keeping one HTTP connection for its POSTs and its
//!    event stream (`GET /v1/events`) open, as a client library and a console do; in
//!    process, K threads claiming back to back. On both sides only executions that succeeded with the
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
//! data directory's file system: an append + fdatasync (what an admission and an end
//! cost the store), and for comparison an atomic file replace (write, fsync, rename,
//! fsync dir: what the store's earlier layout paid for every record change).
//!
//! Must run as root (the platform creates cgroups and namespaces), with the root
//! filesystem at /var/lib/hatchery/rootfs/r (or `HATCHERY_ROOTFS`) and the `sandbox` and
//! `hatchery-zygote` binaries built next to `hatchery` (target/release). Nothing is left
//! behind: `hatchery up` gets SIGTERM (SIGKILL after a few seconds) and is waited for by a
//! Drop guard, also on panic or Ctrl-C; it also dies with the bench (PR_SET_PDEATHSIG);
//! the temporary directory is removed; the end of the run checks that no process of the
//! platform or of the in-process pool is left.
//!
//! The HTTP client, the samples of an execution and of a claim, the throughput loops and
//! the statistics are `common/mod.rs`'s, shared with `cluster_path.rs`; this file owns
//! the options, the `hatchery up` child, the platform's log and record timestamps, and
//! the disk floor.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use common::{
    alive, api_once, api_throughput, comm, descendants, drain, http, install_signal_handlers,
    loadavg, median, ms, pool_once, pool_throughput, stats, stopped, wait_readyz, AgentView,
    ApiSample, PoolSample, SubmitError, Table, Throughput, CODE, PATIENCE,
};
use hatchery_sandbox::pool::Pool;

const HATCHERY: &str = env!("CARGO_BIN_EXE_hatchery");
/// Pool size of the platform (pinned: `max_pool_size` too) and of the in-process pool.
const POOL_SIZE: usize = 2;
/// Executions the platform's host runs at once (the config default).
const CAPACITY: u32 = 4;
/// Cgroup parents (below the hatchery one), so that neither side reaps the other's.
const API_CGROUP: &str = "hatchery/bench-api";
const POOL_CGROUP: &str = "hatchery/bench-pool";
/// SIGTERM → SIGKILL of `hatchery up`.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
                 drain_deadline = \"0s\"\n\
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

/// The disk floor of the embedded store on the data directory's file system: an append
/// + fdatasync, and an atomic file replace (write, fsync, rename, fsync dir).
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
// One sequential execution through the API, on the platform's own time line too

/// An [`ApiSample`], and where the platform placed the same execution: the record's
/// timestamps (1 ms grain) and the lines of its log (µs grain), each minus the client's
/// epoch time just before the POST (same host clock).
struct Traced {
    api: ApiSample,
    srv_created: f64,
    srv_running: f64,
    log_submitted: f64,
    log_running: f64,
    log_finished: f64,
}

/// [`api_once`]; then, when the execution counts, its record read back: the sandbox's
/// `start_ms` as stored, `created_at` and `started_at`. The log's figures are filled in
/// at the end of the run, from the whole log.
async fn api_once_traced(addr: SocketAddr, token: &str) -> Result<Traced, SubmitError> {
    let mut s = Traced {
        api: api_once(addr, token).await?,
        srv_created: f64::NAN,
        srv_running: f64::NAN,
        log_submitted: f64::NAN,
        log_running: f64::NAN,
        log_finished: f64::NAN,
    };
    if s.api.verdict().is_ok() {
        let id = &s.api.trace.id;
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
        s.api.start_ms = rec["result"]["start_ms"].as_f64().unwrap_or(f64::NAN);
        let t0_epoch = s.api.trace.t0_epoch;
        let rel = |k: &str| rec[k].as_f64().map_or(f64::NAN, |a| a - t0_epoch);
        s.srv_created = rel("created_at");
        s.srv_running = rel("started_at");
    }
    Ok(s)
}

/// The platform's agent and the in-process pool, as this bench prints them.
fn describe(view: &AgentView) -> String {
    format!(
        "{}; written while pooled (default_limits); pool size {} (max {}), packages [{}]",
        view.describe_policy(),
        view.pool_size,
        view.max_pool_size,
        view.packages.join(",")
    )
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
            hatchery_api::local_cluster::remove_cgroup_parent(parent);
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
    // `hatchery up` runs with every HATCHERY_* variable removed: no environment here.
    let view = AgentView::read(&platform.config, &BTreeMap::new())?;
    println!(
        "  platform's agent and in-process pool alike (read from the platform's config): {}",
        describe(&view)
    );
    rt.block_on(platform.ready())?;
    let platform_ready_s = t.elapsed().as_secs_f64();
    let addr = platform.addr;
    let seq_token = platform.token("bench", "seq")?;
    let clients: Vec<(SocketAddr, String)> = (1..=o.clients)
        .map(|i| Ok((addr, platform.token("bench", &format!("user{i}"))?)))
        .collect::<Result<_, String>>()?;
    let t = Instant::now();
    let pool_config = view.pool_config(&o.rootfs, &o.sandbox_bin, &o.zygote_bin, POOL_CGROUP);
    let pool = Pool::start(pool_config).map_err(|e| format!("pool: {e}"))?;
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
        .block_on(api_once_traced(addr, &seq_token))
        .map_err(|e| format!("warm-up through the API: {}", e.message()))?;
    s.api
        .verdict()
        .map_err(|e| format!("warm-up through the API: {e}"))?;
    let (s, exec) = pool_once(&pool, &view)?;
    drain(&exec);
    s.verdict()
        .map_err(|e| format!("warm-up in process: {e}"))?;

    // ---- 1 + 2: sequential, alternating API and pool; failures counted, not dropped
    eprint!("sequential: {} rounds ", o.n);
    let mut api: Vec<Option<Traced>> = Vec::new();
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
                rt.block_on(wait_readyz(addr))?;
                let sample = match rt.block_on(api_once_traced(addr, &seq_token)) {
                    Ok(s) => match s.api.verdict() {
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

    // ---- 3: throughput, API (two ways) and pool in rotating slices
    eprint!("throughput: {slices} rounds of API + pool + API (kept connections) slices ");
    let mut api_tp = Throughput::default();
    let mut pool_tp = Throughput::default();
    let mut kept_tp = Throughput::default();
    let mut round_ratios = Vec::new();
    let mut kept_ratios = Vec::new();
    for r in 0..slices {
        if stopped() {
            break;
        }
        let mut rates = [f64::NAN; 3];
        let order = if r % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        for side in order {
            // Every side starts a slice the same way: the previous slice's sandboxes gone,
            // their own pool refilled.
            std::thread::sleep(Duration::from_millis(500));
            let tp = if side == 1 {
                pool.wait_ready(view.pool_size, PATIENCE)
                    .map_err(|e| format!("pool: {e}"))?;
                pool_throughput(&pool, &view, o.clients, slice_s)
            } else {
                rt.block_on(wait_readyz(addr))?;
                rt.block_on(api_throughput(&clients, slice_s, side == 2))
            };
            rates[side] = tp.rate();
            match side {
                0 => api_tp.absorb(tp),
                1 => pool_tp.absorb(tp),
                _ => kept_tp.absorb(tp),
            }
            if side != 1 {
                platform.note_processes();
            }
        }
        round_ratios.push(rates[0] / rates[1]);
        kept_ratios.push(rates[2] / rates[1]);
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
        let t = times.get(&s.api.trace.id).copied().unwrap_or([f64::NAN; 3]);
        let t0_epoch = s.api.trace.t0_epoch;
        s.log_submitted = t[0] - t0_epoch;
        s.log_running = t[1] - t0_epoch;
        s.log_finished = t[2] - t0_epoch;
    }
    let report = platform.stop();
    drop(platform);
    let load_end = loadavg();

    // ---- the table
    let api_ok: Vec<&Traced> = api.iter().flatten().collect();
    let local_ok: Vec<&PoolSample> = local.iter().flatten().collect();
    println!();
    let mut t = Table::with_p99();
    t.section(format!(
        "1. through the API: {} of {} sequential `{CODE}` counted (readyz 200 + {} ms pause \
         before each)",
        api_ok.len(),
        api.len(),
        o.pause.as_millis()
    ));
    let col = |f: &dyn Fn(&Traced) -> f64| api_ok.iter().map(|s| f(s)).collect::<Vec<f64>>();
    t.row("POST → 202", &col(&|s| s.api.accepted));
    t.row(
        "POST → WebSocket open (101)",
        &col(&|s| s.api.trace.ws_open),
    );
    t.row("POST → `started` event", &col(&|s| s.api.started));
    t.row("POST → first `stdout` event", &col(&|s| s.api.first_out));
    t.row("POST → `finished` event", &col(&|s| s.api.finished));
    t.row(
        "sandbox start_ms (claim → first statement, GET)",
        &col(&|s| s.api.start_ms),
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
    t.row("  `started` event at", &col(&|s| s.api.trace.started_ev));
    t.row(
        "  first `stdout` event at",
        &col(&|s| s.api.trace.stdout_ev),
    );
    t.row("  `finished` event at", &col(&|s| s.api.trace.finished_ev));
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
        .filter_map(|(a, p)| Some((&a.as_ref()?.api, p.as_ref()?)))
        .collect();
    let paired = |a: &dyn Fn(&ApiSample) -> f64, b: &dyn Fn(&PoolSample) -> f64| {
        pairs.iter().map(|(x, y)| a(x) - b(y)).collect::<Vec<f64>>()
    };
    t.section(format!(
        "disk floor on the data directory's file system ({} each)",
        disk.0.len()
    ));
    t.row("append + fdatasync", &disk.0);
    t.row("file replace: write + fsync + rename + fsync dir", &disk.1);
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
        "3. throughput, {} s each in rotating slices: API with {} clients (one user each), \
         two connections per execution | in-process pool, {} threads | API, each client \
         keeping one connection and its event stream; counted executions only",
        o.seconds, o.clients, o.clients
    ));
    t.row("API: POST → `finished`", &api_tp.to_finished);
    t.row("API: POST → `started` event", &api_tp.to_started);
    t.row("API: sandbox start_ms", &api_tp.start_ms);
    t.row("API kept: POST → `finished`", &kept_tp.to_finished);
    t.row("API kept: POST → `started` event", &kept_tp.to_started);
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
    let api_out = median(&col(&|s| s.api.first_out));
    let pool_out = median(&lcol(&|s| s.first_out));
    let api_start = median(&col(&|s| s.api.start_ms));
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
    for (label, tp) in [
        ("API", &api_tp),
        ("pool", &pool_tp),
        ("API, kept connections", &kept_tp),
    ] {
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
    for (label, tp, ratios) in [
        (
            "API (two connections per execution)",
            &api_tp,
            &round_ratios,
        ),
        (
            "API (kept connection and event stream)",
            &kept_tp,
            &kept_ratios,
        ),
    ] {
        let ratio_stats = stats(ratios);
        println!(
            "throughput {label} / pool: {:.2} over all slices (target ≥ 0.8); per round (one \
             API and one pool slice, side by side) median {:.2} (min {:.2}, max {:.2}, {} \
             rounds)",
            tp.rate() / pool_tp.rate(),
            ratio_stats.map_or(f64::NAN, |s| s.p50),
            ratio_stats.map_or(f64::NAN, |s| s.min),
            ratio_stats.map_or(f64::NAN, |s| s.max),
            ratios.len()
        );
    }
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
