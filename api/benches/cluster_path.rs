//! Cluster path benchmark (not a test): what the API adds over the in-process warm pool,
//! on the embedded path and on the cluster path, side by side in one run, for `cat(1)`.
//!
//! ```text
//! cargo build --release -p hatchery-api -p hatchery-sandbox
//! cargo bench -p hatchery-api --bench cluster_path [-- --n N --seconds S --clients K]
//! ```
//!
//! Three variants run at the same time on this machine, configured alike (R only, no
//! preloaded packages, pool size 2 pinned: `max_pool_size = 2`, capacity 4 per agent, the
//! platform default policy):
//!
//! - (a) pool: a `hatchery_sandbox::pool::Pool` in this process, configured as the
//!   agents configure theirs (read from the same config file);
//! - (b) embedded: `hatchery up`, one process (API + scheduler + agent, embedded store
//!   and bus), on a free port of 127.0.0.1 with a temporary data directory;
//! - (c) cluster: a local cluster (`hatchery_api::local_cluster`): a private PostgreSQL,
//!   Redis and S3 (moto), 2 `hatchery api` replicas, `--schedulers` schedulers and 2
//!   `hatchery agent`s, each its own process.
//!
//! Measured, interleaved so that drift on a shared machine hits every variant alike:
//!
//! 1. sequential: N rounds; each round runs (a), (b), (c) and a floor sample once, in an
//!    order that rotates round by round. Before each step the variant must be ready (a
//!    full pool; `/readyz` 200), then the machine is left idle for `--pause-ms`, so every
//!    step starts from idle vCPUs alike. (a): claim → `Started`, first `Stdout`,
//!    `Finished`; (b), (c): POST → 202, `started`, first `stdout`, `finished` events on the
//!    WebSocket (opened after the 202 with `?after=0`). (c) alternates between the two
//!    replicas. The differences (b)−(a) and (c)−(a) are paired by round.
//! 2. the floor, measured in the same rounds after the same idle pause: a loopback TCP
//!    round trip (1 byte each way to an echo thread) and a thread wake-up (channel send →
//!    the receiving thread runs), alternately; and both back to back on a busy machine.
//! 3. sustained executions per second, in slices that rotate over (a), (b), (c): K
//!    concurrent clients, each its own user (the per-user parallelism cap of 2 never
//!    cancels one), submitting back to back and waiting for `finished`; for (c) the
//!    clients are spread over both replicas; for (a) K threads claiming back to back.
//!    Each execution opens two connections (its POST, its events' WebSocket); with
//!    `--stream` each client keeps one HTTP connection and its event stream instead.
//! 4. during those slices, the CPU each process spent (from `/proc/<pid>/stat`, its
//!    reaped children included: a zygote's sandboxes count to it), grouped by what this
//!    bench started, and the machine's busy time (`/proc/stat`), per counted execution:
//!    on a machine whose CPUs are all busy, executions/s is the inverse of that sum, so
//!    the table says which process the API path's executions/s went to.
//!
//! Only executions that succeeded with the right output count; every other outcome is
//! counted by kind and printed. The targets are printed next to the figures: the API path
//! adds ≤ 3 ms p50 over the pool on the embedded path and ≤ 5 ms on PostgreSQL + Redis;
//! executions/s through the API ≥ 0.8 × in process.
//!
//! Must run as root, with the root filesystem at /var/lib/hatchery/rootfs/r (or
//! `HATCHERY_ROOTFS`), `sandbox` and `hatchery-zygote` built next to `hatchery`
//! (target/release), and PostgreSQL, Redis and moto installed. Cgroups are created only
//! under `hatchery/`. Nothing is left behind: Drop guards stop `hatchery up` (which also
//! dies with the bench: PR_SET_PDEATHSIG), the pool and the cluster, also on panic or
//! Ctrl-C; the end of the run checks that no process this bench started, or any of their
//! descendants seen during the run, is still alive (and kills and names any that is).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    alive, api_once, api_once_on, api_throughput, caller_stream, comm, descendants, drain,
    install_signal_handlers, loadavg, median, ms, pool_once, pool_throughput, stats, stopped,
    wait_readyz, AgentView, ApiSample, PoolSample, SubmitError, Table, Throughput, WsStream, CODE,
    PATIENCE,
};
use hatchery_api::local_cluster::{agent_name, ClusterSpec, LocalCluster, RoleKind};
use hatchery_sandbox::pool::Pool;

const HATCHERY: &str = env!("CARGO_BIN_EXE_hatchery");
/// Warm sandboxes of every agent and of the in-process pool (pinned: `max_pool_size` too,
/// otherwise demand sizing grows the agents' pools).
const POOL_SIZE: usize = 2;
/// Executions each agent runs at once (the config default).
const CAPACITY: u32 = 4;
/// Agents and API replicas of the cluster.
const AGENTS: usize = 2;
const APIS: usize = 2;
/// Cgroup parents (below the hatchery one) of `hatchery up` and of the in-process pool;
/// the cluster's agents get theirs from `LocalCluster` (`hatchery/<prefix>-agent-a`, ...).
const UP_CGROUP: &str = "hatchery/bench-path-up";
const POOL_CGROUP: &str = "hatchery/bench-path-pool";
/// SIGTERM → SIGKILL of `hatchery up`.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The targets, printed next to the figures.
const TARGET_EMBEDDED_MS: f64 = 3.0;
const TARGET_CLUSTER_MS: f64 = 5.0;
const TARGET_RATIO: f64 = 0.8;

// ---------------------------------------------------------------------------------------
// Options

#[derive(Debug, Clone)]
struct Opts {
    n: usize,
    seconds: f64,
    slice: f64,
    clients: usize,
    pause: Duration,
    schedulers: usize,
    keep_logs: Option<PathBuf>,
    /// `RUST_LOG` of every platform process.
    log_filter: String,
    /// (b) and (c) follow each execution on the caller's event stream, open before the
    /// POST, instead of on its own stream opened after the 202; their throughput clients
    /// also keep one HTTP connection each for their POSTs.
    stream: bool,
    rootfs: PathBuf,
    sandbox_bin: PathBuf,
    zygote_bin: PathBuf,
}

const USAGE: &str = "\
usage: cargo bench -p hatchery-api --bench cluster_path [-- OPTIONS]

options:
  --n N            sequential rounds; each runs the pool, the embedded path, the cluster
                   path and one floor sample (default 60)
  --seconds S      throughput time of each variant (default 10), in rotating slices
  --slice S        length of one throughput slice (default 2)
  --clients K      concurrent clients (users user1..userK) and pool threads of the
                   throughput runs (default 4)
  --pause-ms P     idle time before each sequential step (default 250)
  --schedulers M   schedulers of the cluster, 1 or more (default 2)
  --keep-logs DIR  keep the logs of `hatchery up` and of the cluster's processes there
  --log-filter F   RUST_LOG of every platform process (default info); e.g.
                   info,hatchery_scheduler::agent=trace times each step of a run
  --stream         sequential rounds of (b) and (c) follow each execution on the
                   caller's event stream (GET /v1/events), opened once before the
                   rounds, as a console keeps it; by default each execution's own
                   stream (GET /v1/executions/{id}/events?after=0) is opened after
                   its 202; the throughput clients of (b) and (c) then also keep
                   one HTTP connection and one event stream each, instead of two
                   new connections per execution
  --help           this text

environment:
  HATCHERY_ROOTFS  root filesystem (default /var/lib/hatchery/rootfs/r)

needs: root; `cargo build --release -p hatchery-api -p hatchery-sandbox` (the sandbox
and hatchery-zygote binaries next to hatchery); PostgreSQL, Redis and moto installed.";

/// `None`: not run by `cargo bench` (e.g. `cargo test --benches`): nothing to do.
fn parse_args() -> Result<Option<Opts>, String> {
    let bin_dir = Path::new(HATCHERY)
        .parent()
        .ok_or("no directory of the hatchery binary")?;
    let mut o = Opts {
        n: 60,
        seconds: 10.0,
        slice: 2.0,
        clients: 4,
        pause: Duration::from_millis(250),
        schedulers: 2,
        keep_logs: None,
        log_filter: "info".into(),
        stream: false,
        rootfs: std::env::var_os("HATCHERY_ROOTFS")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(hatchery_sandbox::DEFAULT_ROOTFS)),
        sandbox_bin: bin_dir.join("sandbox"),
        zygote_bin: bin_dir.join("hatchery-zygote"),
    };
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "--bench" {
            // cargo bench passes it to every bench target.
            bench = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let int = |v: String| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} expects a positive integer, got {v:?}"))
        };
        let secs = |v: String| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("{flag} expects a positive number, got {v:?}"))
        };
        match flag.as_str() {
            "--n" => o.n = int(value()?)?,
            "--clients" => o.clients = int(value()?)?,
            "--schedulers" => o.schedulers = int(value()?)?,
            "--seconds" => o.seconds = secs(value()?)?,
            "--slice" => o.slice = secs(value()?)?,
            "--pause-ms" => {
                let v = value()?;
                let p = v
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| format!("--pause-ms expects milliseconds, got {v:?}"))?;
                o.pause = Duration::from_millis(p);
            }
            "--keep-logs" => o.keep_logs = Some(PathBuf::from(value()?)),
            "--log-filter" => o.log_filter = value()?,
            "--stream" => o.stream = true,
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    if !bench {
        return Ok(None);
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
    Ok(Some(o))
}

// ---------------------------------------------------------------------------------------
// Every process this bench started, and what ran below them

/// The processes seen below this one during the run (pid, start time), so that the end
/// of the run can tell whether any outlived the guards that should have stopped it.
#[derive(Default)]
struct Processes {
    seen: BTreeSet<(i32, u64)>,
}

impl Processes {
    fn note(&mut self) {
        self.seen.extend(descendants(std::process::id() as i32));
    }

    /// Those still alive once everything was stopped (a short grace for the kernel to
    /// reap them), killed and named.
    fn leftovers(&self) -> Vec<String> {
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
        left.iter()
            .map(|&(p, _)| {
                let c = comm(p);
                // SAFETY: kill(2) of a process seen below this one, with the same pid and
                // start time (checked just above).
                unsafe { libc::kill(p, libc::SIGKILL) };
                format!("{p} ({c})")
            })
            .collect()
    }
}

/// Removes the parent cgroups of `hatchery up` and of the in-process pool at the end of
/// the run (declared first in `run`, so it drops after both), once their sandboxes are
/// reaped.
struct RemoveParents;

impl Drop for RemoveParents {
    fn drop(&mut self) {
        for parent in [UP_CGROUP, POOL_CGROUP] {
            hatchery_api::local_cluster::remove_cgroup_parent(parent);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Where the CPU of each variant goes

/// Who spends CPU on this machine during a throughput slice, as the rows of the table
/// "CPU per execution". Processes are told apart by what this bench started: each direct
/// child by its command, with everything below it (its own children's time, reaped or
/// alive, counts to it).
const CPU_GROUPS: [&str; 12] = [
    "this bench (pool (a) + clients)",
    "  pool (a) zygote + sandboxes",
    "hatchery up",
    "  up's zygote + sandboxes",
    "API replicas",
    "schedulers",
    "agents",
    "  agents' zygotes + sandboxes",
    "PostgreSQL",
    "Redis",
    "moto (S3)",
    "rest of the machine",
];
const G_BENCH: usize = 0;
const G_REST: usize = 11;

/// CPU time spent so far, in clock ticks: per group, and the whole machine's busy time.
#[derive(Clone, Copy, Default)]
struct CpuSnapshot {
    groups: [u64; CPU_GROUPS.len()],
    machine_busy: u64,
}

/// (ppid, utime + stime + cutime + cstime) of a process.
fn cpu_ticks(pid: i32) -> Option<(i32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3: ppid is field 4, utime..cstime fields 14..17.
    let ticks = f
        .get(11..15)?
        .iter()
        .map(|v| v.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((f.get(1)?.parse().ok()?, ticks))
}

/// The groups of a direct child of this bench: (its own, what runs below it).
fn classify(pid: i32) -> (usize, usize) {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = cmd
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // A server may rewrite its command line into one string (redis-server does).
    let program = args
        .first()
        .and_then(|a| a.split_whitespace().next())
        .unwrap_or("");
    let role = args.get(1).map(String::as_str).unwrap_or("");
    let name = |p: &str| {
        Path::new(p)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    };
    match (name(program).as_deref(), role) {
        (Some("hatchery"), "up") => (2, 3),
        (Some("hatchery"), "api") => (4, 4),
        (Some("hatchery"), "scheduler") => (5, 5),
        (Some("hatchery"), "agent") => (6, 7),
        (Some("postgres"), _) => (8, 8),
        (Some("redis-server"), _) => (9, 9),
        (Some(p), _) if p.starts_with("moto") || args.iter().any(|a| a.contains("moto")) => {
            (10, 10)
        }
        // The pool's zygote runs inside a `sandbox run` container.
        (Some("sandbox"), "run") => (1, 1),
        _ => (G_BENCH, G_BENCH),
    }
}

fn cpu_snapshot() -> CpuSnapshot {
    let me = std::process::id() as i32;
    let mut procs: BTreeMap<i32, (i32, u64)> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            if let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            {
                if let Some(t) = cpu_ticks(pid) {
                    procs.insert(pid, t);
                }
            }
        }
    }
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for (&pid, &(ppid, _)) in &procs {
        children.entry(ppid).or_default().push(pid);
    }
    let mut snap = CpuSnapshot::default();
    snap.groups[G_BENCH] += procs.get(&me).map_or(0, |&(_, t)| t);
    for &child in children.get(&me).map(Vec::as_slice).unwrap_or(&[]) {
        let (own, below) = classify(child);
        snap.groups[own] += procs[&child].1;
        let mut todo = children.get(&child).cloned().unwrap_or_default();
        while let Some(p) = todo.pop() {
            snap.groups[below] += procs[&p].1;
            todo.extend(children.get(&p).map(Vec::as_slice).unwrap_or(&[]));
        }
    }
    // /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    snap.machine_busy = [0, 1, 2, 5, 6].iter().filter_map(|&i| cpu.get(i)).sum();
    snap
}

/// CPU spent per variant (ticks, by group) over its throughput slices.
#[derive(Default)]
struct CpuUse {
    groups: [u64; CPU_GROUPS.len()],
    machine_busy: u64,
}

impl CpuUse {
    fn add(&mut self, before: &CpuSnapshot, after: &CpuSnapshot) {
        for (g, (b, a)) in self
            .groups
            .iter_mut()
            .zip(before.groups.iter().zip(&after.groups))
        {
            *g += a.saturating_sub(*b);
        }
        self.machine_busy += after.machine_busy.saturating_sub(before.machine_busy);
    }

    /// Milliseconds of CPU per counted execution, by group; the last row is the machine's
    /// busy time that no group accounts for (kernel threads, other work on the machine).
    fn per_execution(&self, done: usize) -> [f64; CPU_GROUPS.len()] {
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ms = |ticks: u64| ticks as f64 * 1e3 / hz / done.max(1) as f64;
        let mut out = [0.0; CPU_GROUPS.len()];
        let known: u64 = self.groups[..G_REST].iter().sum();
        for (g, o) in out.iter_mut().enumerate().take(G_REST) {
            *o = ms(self.groups[g]);
        }
        out[G_REST] = ms(self.machine_busy.saturating_sub(known));
        out
    }
}

// ---------------------------------------------------------------------------------------
// (b): a `hatchery up` child

struct Embedded {
    child: Option<Child>,
    pid: i32,
    addr: SocketAddr,
    config: PathBuf,
    dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl Embedded {
    fn start(o: &Opts) -> Result<Embedded, String> {
        let tmp = tempfile::Builder::new()
            .prefix("hatchery-bench-up-")
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
                 cgroup_parent = \"{UP_CGROUP}\"\n\
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
            .env("RUST_LOG", &o.log_filter)
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
        let mut e = Embedded {
            pid: child.id() as i32,
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            config,
            dir,
            tmp: Some(tmp),
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("hatchery: listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let addr = rx.recv_timeout(PATIENCE).map_err(|_| {
            e.dump_log();
            "hatchery up did not print its address".to_string()
        })?;
        e.addr = addr
            .parse()
            .map_err(|err| format!("listening address {addr:?}: {err}"))?;
        Ok(e)
    }

    fn token(&self, user: &str) -> Result<String, String> {
        let out = Command::new(HATCHERY)
            .args([
                "token", "create", "--org", "bench", "--user", user, "--role", "user",
            ])
            .arg("--config")
            .arg(&self.config)
            .env_remove("HATCHERY_DATA_DIR")
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hatchery.log")).unwrap_or_default()
    }

    fn dump_log(&self) {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("---- hatchery up log (last 40 lines) ----");
        for l in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("{l}");
        }
    }

    /// SIGTERM, SIGKILL after [`STOP_GRACE`], waits; removes the temporary directory.
    /// How it exited and how long that took.
    fn stop(&mut self) -> Option<(String, f64)> {
        let mut child = self.child.take()?;
        let t = Instant::now();
        // SAFETY: kill(2) on our own child, not yet waited for (its pid is still ours).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let mut exit = None;
        while t.elapsed() < STOP_GRACE {
            if let Ok(Some(s)) = child.try_wait() {
                exit = Some(s.to_string());
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let exit = exit.unwrap_or_else(|| {
            let _ = child.kill();
            match child.wait() {
                Ok(s) => format!("{s} (SIGKILL after {} s)", STOP_GRACE.as_secs()),
                Err(e) => format!("wait: {e}"),
            }
        });
        let stop_ms = ms(t.elapsed());
        if let Some(tmp) = self.tmp.take() {
            if let Err(e) = tmp.close() {
                eprintln!("cluster_path: removing the temporary directory: {e}");
            }
        }
        Some((exit, stop_ms))
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// (c): the local cluster

/// `LocalCluster::start` with every agent's pool pinned (`HATCHERY_MAX_POOL_SIZE` in the
/// agents' environment: the spec has no knob for it).
fn start_cluster(o: &Opts, keep: Option<&Path>) -> Result<LocalCluster, String> {
    let mut spec = ClusterSpec::new(HATCHERY, &o.rootfs);
    spec.apis = APIS;
    spec.schedulers = o.schedulers;
    spec.agents = AGENTS;
    spec.agent_capacity = CAPACITY;
    spec.pool_size = POOL_SIZE as u32;
    spec.cgroup_prefix = format!("bench-path-{}", std::process::id());
    spec.dir = keep.map(|d| d.join("cluster"));
    spec.log_filter = o.log_filter.clone();
    let mut c = LocalCluster::engines(spec).map_err(|e| format!("cluster engines: {e}"))?;
    let err = |e| format!("cluster: {e}");
    for i in 0..o.schedulers {
        c.spawn(RoleKind::Scheduler, &format!("scheduler-{}", i + 1), &[])
            .map_err(err)?;
    }
    for i in 0..AGENTS {
        c.agent(
            &agent_name(i),
            &[("HATCHERY_MAX_POOL_SIZE", POOL_SIZE.to_string())],
        )
        .map_err(err)?;
    }
    for i in 0..APIS {
        c.api(&format!("api-{}", i + 1)).map_err(err)?;
    }
    Ok(c)
}

/// Every replica answers `/readyz` 200 and lists every agent, not draining, with at
/// least `warm` frozen R sandboxes (agents report about once a second).
async fn cluster_ready(addrs: &[SocketAddr], warm: u64) -> Result<(), String> {
    let agents: Vec<String> = (0..AGENTS).map(agent_name).collect();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut missing = Vec::new();
        for &addr in addrs {
            match common::http(addr, "GET", "/readyz", None, None).await {
                Ok(r) if r.status == 200 => {
                    let v = r.json()?;
                    let listed = v["agents"].as_array().cloned().unwrap_or_default();
                    for name in &agents {
                        let ok = listed.iter().any(|a| {
                            let r_warm: u64 = a["warm"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter(|w| w[0] == "r")
                                .filter_map(|w| w[1].as_u64())
                                .sum();
                            a["agent"] == name.as_str() && a["draining"] == false && r_warm >= warm
                        });
                        if !ok {
                            missing.push(format!("{addr}: {name} not listed warm"));
                        }
                    }
                }
                Ok(r) => missing.push(format!("{addr}: /readyz {}", r.status)),
                Err(e) => missing.push(format!("{addr}: {e}")),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        if stopped() {
            return Err("interrupted".into());
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster never became ready: {missing:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The lines at WARN or above of each of the cluster's logs.
fn cluster_warnings(c: &LocalCluster) -> Vec<(String, Vec<String>)> {
    c.procs
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            (p.name.clone(), warn_lines(&text))
        })
        .collect()
}

fn warn_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .map(str::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The floor: a loopback TCP round trip and a thread wake-up, across two vCPUs

/// Pins the calling thread to `cpu`; false if that failed (the figure is then taken
/// wherever the kernel runs the thread).
fn pin_to(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (cpu is
    // below CPU_SETSIZE); sched_setaffinity with pid 0 changes the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The first two CPUs this process may run on.
fn two_cpus() -> Option<(usize, usize)> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set for sched_getaffinity to fill;
    // CPU_ISSET reads inside it (i is below CPU_SETSIZE).
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| libc::CPU_ISSET(i, &set))
            .collect()
    };
    Some((*allowed.first()?, *allowed.get(1)?))
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    /// One byte to an echo thread and back.
    TcpRoundTrip,
    /// A channel send until the receiving thread runs.
    ThreadWake,
}

/// Three threads: a prober on one vCPU, and an echo thread and a receiver on another, so
/// that every probe wakes a thread on the other vCPU (after an idle pause: an idle vCPU,
/// which is what the platform's processes meet at each hop).
struct Floor {
    probe_tx: Option<mpsc::Sender<Probe>>,
    result_rx: mpsc::Receiver<f64>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The prober's vCPU and the other one (`None`: a single vCPU, nothing pinned).
    cpus: Option<(usize, usize)>,
}

impl Floor {
    fn start() -> Result<Floor, String> {
        let io = |e: std::io::Error| format!("floor: {e}");
        let cpus = two_cpus();
        let pin = move |far: bool| {
            if let Some((near, other)) = cpus {
                pin_to(if far { other } else { near });
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let echo = std::thread::spawn(move || {
            pin(true);
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_nodelay(true);
            let mut b = [0u8; 1];
            while matches!(s.read(&mut b), Ok(1)) {
                if s.write_all(&b).is_err() {
                    break;
                }
            }
        });
        let (wake_tx, wake_rx) = mpsc::channel::<Instant>();
        let (woke_tx, woke_rx) = mpsc::channel::<f64>();
        let receiver = std::thread::spawn(move || {
            pin(true);
            while let Ok(sent) = wake_rx.recv() {
                if woke_tx.send(ms(sent.elapsed())).is_err() {
                    break;
                }
            }
        });
        let mut tcp = TcpStream::connect(addr).map_err(io)?;
        tcp.set_nodelay(true).map_err(io)?;
        let (probe_tx, probe_rx) = mpsc::channel::<Probe>();
        let (result_tx, result_rx) = mpsc::channel::<f64>();
        let prober = std::thread::spawn(move || {
            pin(false);
            while let Ok(probe) = probe_rx.recv() {
                let value = match probe {
                    Probe::TcpRoundTrip => {
                        let t = Instant::now();
                        let mut b = [7u8; 1];
                        match tcp.write_all(&b).and_then(|()| tcp.read_exact(&mut b)) {
                            Ok(()) => ms(t.elapsed()),
                            Err(_) => f64::NAN,
                        }
                    }
                    Probe::ThreadWake => match wake_tx.send(Instant::now()) {
                        Ok(()) => woke_rx.recv().unwrap_or(f64::NAN),
                        Err(_) => f64::NAN,
                    },
                };
                if result_tx.send(value).is_err() {
                    break;
                }
            }
            // Dropping the socket and the sender ends the other two threads.
        });
        Ok(Floor {
            probe_tx: Some(probe_tx),
            result_rx,
            threads: vec![prober, echo, receiver],
            cpus,
        })
    }

    /// One probe (ms); NaN if it failed.
    fn sample(&self, probe: Probe) -> f64 {
        match &self.probe_tx {
            Some(tx) if tx.send(probe).is_ok() => self.result_rx.recv().unwrap_or(f64::NAN),
            _ => f64::NAN,
        }
    }

    fn describe(&self) -> String {
        match self.cpus {
            Some((a, b)) => format!("prober on vCPU {a}, woken thread on vCPU {b}"),
            None => "one vCPU: nothing pinned".into(),
        }
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        self.probe_tx = None;
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The variants, side by side

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Pool,
    Embedded,
    Cluster,
    Floor,
}

/// What the measuring loops reach.
struct Sides<'a> {
    pool: &'a Pool,
    view: &'a AgentView,
    up: SocketAddr,
    up_seq: String,
    up_clients: Vec<(SocketAddr, String)>,
    replicas: Vec<SocketAddr>,
    cluster_seq: String,
    cluster_clients: Vec<(SocketAddr, String)>,
}

/// Outcomes that did not count, by kind, and the first messages.
#[derive(Default)]
struct Failures {
    by_kind: BTreeMap<String, usize>,
    messages: Vec<String>,
}

impl Failures {
    fn add(&mut self, kind: String, message: Option<String>) {
        *self.by_kind.entry(kind).or_default() += 1;
        if let Some(m) = message {
            if self.messages.len() < 5 {
                self.messages.push(m);
            }
        }
    }

    fn total(&self) -> usize {
        self.by_kind.values().sum()
    }
}

/// The sequential rounds: per round, a sample of each variant (`None`: it did not count)
/// and of the floor.
#[derive(Default)]
struct Sequential {
    pool: Vec<Option<PoolSample>>,
    up: Vec<Option<ApiSample>>,
    /// With the index of the replica it went through.
    cluster: Vec<Option<(usize, ApiSample)>>,
    floor_tcp: Vec<f64>,
    floor_wake: Vec<f64>,
    failed: [Failures; 3],
}

/// One sequential sample through the API; with `stream` (the caller's event stream,
/// reopened here if it is gone) followed on it.
fn api_sample(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    token: &str,
    stream: Option<&mut Option<WsStream>>,
    failed: &mut Failures,
) -> Option<ApiSample> {
    let outcome = rt.block_on(async {
        match stream {
            None => api_once(addr, token).await,
            Some(slot) => {
                if slot.is_none() {
                    *slot = Some(
                        caller_stream(addr, token)
                            .await
                            .map_err(SubmitError::Other)?,
                    );
                }
                let r = api_once_on(addr, token, slot.as_mut()).await;
                if r.is_err() {
                    // A failed follow may leave the stream mid-way: a fresh one next time.
                    *slot = None;
                }
                r
            }
        }
    });
    match outcome {
        Ok(s) => match s.verdict() {
            Ok(()) => Some(s),
            Err(why) => {
                failed.add(why, None);
                None
            }
        },
        Err(e) => {
            let kind = match &e {
                SubmitError::Overload(code, _) => code.to_string(),
                SubmitError::Other(_) => "error".into(),
            };
            failed.add(kind, Some(format!("{addr}: {}", e.message())));
            None
        }
    }
}

fn sequential(
    o: &Opts,
    rt: &tokio::runtime::Runtime,
    sides: &Sides,
    floor: &Floor,
    procs: &mut Processes,
) -> Result<Sequential, String> {
    let mut seq = Sequential::default();
    let steps = [Step::Pool, Step::Embedded, Step::Cluster, Step::Floor];
    // With --stream: the caller's event streams of (b) and of each replica of (c).
    let mut up_stream: Option<WsStream> = None;
    let mut cl_streams: Vec<Option<WsStream>> = (0..APIS).map(|_| None).collect();
    let give_up = (o.n / 2).max(10);
    eprint!("sequential: {} rounds ", o.n);
    for i in 0..o.n {
        if stopped() {
            break;
        }
        for k in 0..steps.len() {
            let step = steps[(i + k) % steps.len()];
            // Ready first, then idle: every step starts from the same quiet machine.
            match step {
                Step::Pool => sides
                    .pool
                    .wait_ready(sides.view.pool_size, PATIENCE)
                    .map_err(|e| format!("pool: {e}"))?,
                Step::Embedded => rt.block_on(wait_readyz(sides.up))?,
                Step::Cluster => rt.block_on(wait_readyz(sides.replicas[i % APIS]))?,
                Step::Floor => {}
            }
            std::thread::sleep(o.pause);
            match step {
                Step::Pool => {
                    let sample = match pool_once(sides.pool, sides.view) {
                        Ok((s, exec)) => {
                            drain(&exec);
                            match s.verdict() {
                                Ok(()) => Some(s),
                                Err(why) => {
                                    seq.failed[0].add(why, None);
                                    None
                                }
                            }
                        }
                        Err(e) => {
                            seq.failed[0].add("error".into(), Some(e));
                            None
                        }
                    };
                    seq.pool.push(sample);
                }
                Step::Embedded => {
                    let stream = o.stream.then_some(&mut up_stream);
                    let s = api_sample(rt, sides.up, &sides.up_seq, stream, &mut seq.failed[1]);
                    seq.up.push(s);
                }
                Step::Cluster => {
                    let r = i % APIS;
                    let stream = o.stream.then_some(&mut cl_streams[r]);
                    let s = api_sample(
                        rt,
                        sides.replicas[r],
                        &sides.cluster_seq,
                        stream,
                        &mut seq.failed[2],
                    );
                    seq.cluster.push(s.map(|s| (r, s)));
                }
                Step::Floor => {
                    if i % 2 == 0 {
                        seq.floor_tcp.push(floor.sample(Probe::TcpRoundTrip));
                    } else {
                        seq.floor_wake.push(floor.sample(Probe::ThreadWake));
                    }
                }
            }
        }
        if i == 0 {
            procs.note();
        }
        let failed: usize = seq.failed.iter().map(Failures::total).sum();
        if failed > give_up {
            let msgs: Vec<&String> = seq.failed.iter().flat_map(|f| &f.messages).collect();
            return Err(format!(
                "sequential: {failed} failures, more than {give_up}: {msgs:?}"
            ));
        }
        eprint!(".");
    }
    eprintln!();
    Ok(seq)
}

/// What the throughput slices measured: per variant, its executions and its CPU; per
/// round, the ratios (b)/(a) and (c)/(a).
struct Sustained {
    tp: [Throughput; 3],
    ratios: Vec<[f64; 2]>,
    cpu: [CpuUse; 3],
}

/// Sustained throughput of the three variants (pool, embedded, cluster), in slices whose
/// order rotates round by round; and per round, the ratios (b)/(a) and (c)/(a).
fn throughput(
    o: &Opts,
    rt: &tokio::runtime::Runtime,
    sides: &Sides,
    procs: &mut Processes,
) -> Result<Sustained, String> {
    let rounds = (o.seconds / o.slice).ceil().max(1.0) as usize;
    let slice_s = o.seconds / rounds as f64;
    let mut tp: [Throughput; 3] = Default::default();
    let mut cpu: [CpuUse; 3] = Default::default();
    let mut ratios = Vec::new();
    eprint!("throughput: {rounds} rounds of 3 slices of {slice_s:.2} s ");
    for r in 0..rounds {
        if stopped() {
            break;
        }
        let mut rates = [f64::NAN; 3];
        for k in 0..3 {
            let side = (r + k) % 3;
            // Every slice starts alike: its variant ready with full pools, then a pause.
            let slice = match side {
                0 => {
                    sides
                        .pool
                        .wait_ready(sides.view.pool_size, PATIENCE)
                        .map_err(|e| format!("pool: {e}"))?;
                    std::thread::sleep(Duration::from_millis(500));
                    let before = cpu_snapshot();
                    let slice = pool_throughput(sides.pool, sides.view, o.clients, slice_s);
                    cpu[side].add(&before, &cpu_snapshot());
                    slice
                }
                1 => {
                    rt.block_on(wait_readyz(sides.up))?;
                    std::thread::sleep(Duration::from_millis(500));
                    let before = cpu_snapshot();
                    let slice = rt.block_on(api_throughput(&sides.up_clients, slice_s, o.stream));
                    cpu[side].add(&before, &cpu_snapshot());
                    slice
                }
                _ => {
                    rt.block_on(cluster_ready(&sides.replicas, POOL_SIZE as u64))?;
                    std::thread::sleep(Duration::from_millis(500));
                    let before = cpu_snapshot();
                    let slice =
                        rt.block_on(api_throughput(&sides.cluster_clients, slice_s, o.stream));
                    cpu[side].add(&before, &cpu_snapshot());
                    slice
                }
            };
            procs.note();
            rates[side] = slice.rate();
            tp[side].absorb(slice);
        }
        ratios.push([rates[1] / rates[0], rates[2] / rates[0]]);
        eprint!(".");
    }
    eprintln!();
    Ok(Sustained { tp, ratios, cpu })
}

// ---------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let o = match parse_args() {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("cluster_path: a benchmark; run it with `cargo bench` (see --help)");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cluster_path: {e}");
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
            eprintln!("cluster_path: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut procs = Processes::default();
    let code = match run(&o, &rt, &mut procs) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster_path: {e}");
            ExitCode::FAILURE
        }
    };
    // Everything is stopped by now (the guards in `run` dropped): whatever of ours is
    // still alive is a leftover.
    let left = procs.leftovers();
    let below: Vec<String> = descendants(std::process::id() as i32)
        .into_iter()
        .map(|(p, _)| format!("{p} ({})", comm(p)))
        .collect();
    println!(
        "leftover processes: {} seen during the run, still alive: {}; below this process \
         now: {}",
        procs.seen.len(),
        if left.is_empty() {
            "none".to_string()
        } else {
            format!("{} (killed)", left.join(", "))
        },
        if below.is_empty() {
            "none".to_string()
        } else {
            below.join(", ")
        }
    );
    code
}

fn run(o: &Opts, rt: &tokio::runtime::Runtime, procs: &mut Processes) -> Result<(), String> {
    let _parents = RemoveParents;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_start = loadavg();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    println!("Hatchery cluster path benchmark");
    println!(
        "  command  cargo bench -p hatchery-api --bench cluster_path -- {}",
        args.join(" ")
    );
    println!("  hatchery {HATCHERY}");
    println!("  rootfs   {}", o.rootfs.display());
    println!(
        "  nproc {nproc}; code {CODE:?}; sequential: {} rounds, {} ms idle before each step; \
         throughput: {} s per variant in slices of ~{} s, {} clients / threads",
        o.n,
        o.pause.as_millis(),
        o.seconds,
        o.slice,
        o.clients
    );
    println!("  loadavg at start: {load_start}");
    if let Some(d) = &o.keep_logs {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }

    // ---- setup: (b), (c), then (a) configured as their agents
    let t = Instant::now();
    let mut up = Embedded::start(o)?;
    let up_view = AgentView::read(&up.config, &BTreeMap::new())?;
    let t_cluster = Instant::now();
    let cluster = start_cluster(o, o.keep_logs.as_deref())?;
    let replicas = cluster.api_addrs();
    // What an agent of the cluster reads: the shared file and its environment.
    let agent_env = BTreeMap::from([("HATCHERY_MAX_POOL_SIZE".to_string(), POOL_SIZE.to_string())]);
    let cluster_view = AgentView::read(cluster.config(), &agent_env)?;
    rt.block_on(wait_readyz(up.addr))
        .inspect_err(|_| up.dump_log())?;
    let up_ready_s = t.elapsed().as_secs_f64();
    rt.block_on(cluster_ready(&replicas, POOL_SIZE as u64))?;
    let cluster_ready_s = t_cluster.elapsed().as_secs_f64();
    let pool =
        Pool::start(up_view.pool_config(&o.rootfs, &o.sandbox_bin, &o.zygote_bin, POOL_CGROUP))
            .map_err(|e| format!("pool: {e}"))?;
    pool.wait_ready(up_view.pool_size, PATIENCE)
        .map_err(|e| format!("pool: {e}"))?;
    procs.note();
    println!(
        "  (a) in-process pool and (b)'s agent (from its config): {}",
        up_view.describe()
    );
    println!(
        "  (c)'s agents (from the cluster's config): {}{}",
        cluster_view.describe(),
        if cluster_view.describe() == up_view.describe() {
            " — the same"
        } else {
            " — DIFFERENT from (a)/(b)"
        }
    );
    println!(
        "  (b) hatchery up at http://{} ready in {up_ready_s:.1} s; (c) {} replicas at {}, \
         {} schedulers, {} agents (cgroups {}), PostgreSQL :{}, Redis {}, S3 {}: ready \
         (every agent warm on every replica) in {cluster_ready_s:.1} s",
        up.addr,
        replicas.len(),
        replicas
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        o.schedulers,
        AGENTS,
        cluster.cgroup_parents().join(" "),
        cluster.postgres.port(),
        cluster.redis.url(),
        cluster.moto.endpoint(),
    );
    println!(
        "  warm sandboxes / capacity: (a) {POOL_SIZE} / {} threads; (b) {POOL_SIZE} / \
         {CAPACITY}; (c) {} / {} (two agents on the same machine)",
        o.clients,
        POOL_SIZE * AGENTS,
        CAPACITY as usize * AGENTS
    );

    let cluster_token = |user: &str| {
        cluster
            .token("bench", user, "user")
            .map_err(|e| format!("cluster token: {e}"))
    };
    let sides = Sides {
        pool: &pool,
        view: &up_view,
        up: up.addr,
        up_seq: up.token("seq")?,
        up_clients: (1..=o.clients)
            .map(|i| Ok((up.addr, up.token(&format!("user{i}"))?)))
            .collect::<Result<_, String>>()?,
        replicas: replicas.clone(),
        cluster_seq: cluster_token("seq")?,
        cluster_clients: (1..=o.clients)
            .map(|i| Ok((replicas[i % APIS], cluster_token(&format!("user{i}"))?)))
            .collect::<Result<_, String>>()?,
    };

    // ---- the floor on a busy machine (back to back), before anything else runs
    let floor = Floor::start()?;
    let busy_tcp: Vec<f64> = (0..2000)
        .map(|_| floor.sample(Probe::TcpRoundTrip))
        .collect();
    let busy_wake: Vec<f64> = (0..2000).map(|_| floor.sample(Probe::ThreadWake)).collect();

    // ---- warm-up (not measured): one of each
    let (s, exec) = pool_once(&pool, &up_view).map_err(|e| format!("warm-up (a): {e}"))?;
    drain(&exec);
    s.verdict().map_err(|e| format!("warm-up (a): {e}"))?;
    for (addr, token, what) in [
        (up.addr, &sides.up_seq, "(b)"),
        (replicas[0], &sides.cluster_seq, "(c) api-1"),
        (replicas[1], &sides.cluster_seq, "(c) api-2"),
    ] {
        rt.block_on(api_once(addr, token))
            .map_err(|e| format!("warm-up {what}: {}", e.message()))?
            .verdict()
            .map_err(|e| format!("warm-up {what}: {e}"))?;
    }
    rt.block_on(cluster_ready(&replicas, POOL_SIZE as u64))?;

    // ---- 1 + 2: sequential rounds; 3: throughput
    let seq = sequential(o, rt, &sides, &floor, procs)?;
    let Sustained { tp, ratios, cpu } = throughput(o, rt, &sides, procs)?;
    let floor_cpus = floor.describe();
    drop(floor);

    // ---- stop everything, reading what is needed first
    let pool_stats = pool.stats();
    drop(sides);
    drop(pool);
    let up_warnings = warn_lines(&up.log());
    let cluster_warn = cluster_warnings(&cluster);
    if let Some(d) = &o.keep_logs {
        let dest = d.join("hatchery-up.log");
        if let Err(e) = std::fs::write(&dest, up.log()) {
            eprintln!("cluster_path: keeping {}: {e}", dest.display());
        }
    }
    procs.note();
    let up_stop = up.stop();
    drop(up);
    let t = Instant::now();
    drop(cluster);
    let cluster_stop_s = t.elapsed().as_secs_f64();
    let load_end = loadavg();

    report(o, &seq, &tp, &ratios, (&floor_cpus, &busy_tcp, &busy_wake));
    report_cpu(&tp, &cpu);
    println!();
    println!(
        "in-process pool: forked {}, claimed {}",
        pool_stats.forked, pool_stats.claimed
    );
    println!(
        "log lines at WARN or above: hatchery up {}; {}",
        up_warnings.len(),
        cluster_warn
            .iter()
            .map(|(name, w)| format!("{name} {}", w.len()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let all_warn = up_warnings.iter().map(|w| ("up", w)).chain(
        cluster_warn
            .iter()
            .flat_map(|(n, ws)| ws.iter().map(move |w| (n.as_str(), w))),
    );
    for (who, w) in all_warn.take(8) {
        println!("    {who}: {w}");
    }
    if let Some((exit, stop_ms)) = up_stop {
        println!(
            "cleanup: hatchery up exited ({exit}) {stop_ms:.0} ms after SIGTERM; the cluster \
             stopped in {cluster_stop_s:.1} s"
        );
    }
    if let Some(d) = &o.keep_logs {
        println!("logs kept in {}", d.display());
    }
    println!("loadavg at start: {load_start}; at end: {load_end}");
    Ok(())
}

fn verdict_line(label: &str, value: f64, target: &str, met: bool) -> String {
    format!(
        "  {label:<58} {value:>8.2}   target {target:<8} {}",
        if !value.is_finite() {
            "unknown (no figure)"
        } else if met {
            "met"
        } else {
            "NOT met"
        }
    )
}

/// CPU per counted execution of each variant, by who spent it, over its throughput
/// slices: where the executions per second of each path go on this machine.
fn report_cpu(tp: &[Throughput; 3], cpu: &[CpuUse; 3]) {
    let per: Vec<[f64; CPU_GROUPS.len()]> =
        (0..3).map(|k| cpu[k].per_execution(tp[k].done)).collect();
    println!();
    println!(
        "CPU per counted execution during each variant's throughput slices (ms; from \
         /proc/<pid>/stat of what this bench started, children included; the machine's busy \
         time from /proc/stat):"
    );
    println!(
        "  {:<36} {:>9} {:>13} {:>12}",
        "", "(a) pool", "(b) embedded", "(c) cluster"
    );
    for (g, name) in CPU_GROUPS.iter().enumerate() {
        println!(
            "  {name:<36} {:>9.2} {:>13.2} {:>12.2}",
            per[0][g], per[1][g], per[2][g]
        );
    }
    let total = |k: usize| per[k].iter().sum::<f64>();
    println!(
        "  {:<36} {:>9.2} {:>13.2} {:>12.2}",
        "machine busy (sum)",
        total(0),
        total(1),
        total(2)
    );
    let cg = |k: usize| median(&tp[k].sandbox_cpu_ms);
    println!(
        "  {:<36} {:>9.2} {:>13.2} {:>12.2}",
        "of which a sandbox's cgroup (p50)",
        cg(0),
        cg(1),
        cg(2)
    );
    println!(
        "  (rows in other variants' columns are what that part spends while idle: \
         heartbeats, pool refills; a sandbox's cgroup counts from its attach after the \
         fork to its end)"
    );
}

fn report(
    o: &Opts,
    seq: &Sequential,
    tp: &[Throughput; 3],
    ratios: &[[f64; 2]],
    (floor_cpus, busy_tcp, busy_wake): (&str, &[f64], &[f64]),
) {
    let pool_ok: Vec<&PoolSample> = seq.pool.iter().flatten().collect();
    let up_ok: Vec<&ApiSample> = seq.up.iter().flatten().collect();
    let cl_ok: Vec<&ApiSample> = seq.cluster.iter().flatten().map(|(_, s)| s).collect();
    let pcol = |f: fn(&PoolSample) -> f64| pool_ok.iter().map(|s| f(s)).collect::<Vec<f64>>();
    let acol =
        |v: &[&ApiSample], f: fn(&ApiSample) -> f64| v.iter().map(|s| f(s)).collect::<Vec<f64>>();
    // Rounds where each side of a pair counted.
    let paired = |other: &dyn Fn(usize) -> Option<f64>, pool: fn(&PoolSample) -> f64| {
        seq.pool
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some(other(i)? - pool(p.as_ref()?)))
            .collect::<Vec<f64>>()
    };
    let up_at = |f: fn(&ApiSample) -> f64| move |i: usize| seq.up.get(i)?.as_ref().map(f);
    let cl_at =
        |f: fn(&ApiSample) -> f64| move |i: usize| seq.cluster.get(i)?.as_ref().map(|(_, s)| f(s));
    let first_out_b = paired(&up_at(|s| s.first_out), |p| p.first_out);
    let first_out_c = paired(&cl_at(|s| s.first_out), |p| p.first_out);
    let finished_b = paired(&up_at(|s| s.finished), |p| p.finished);
    let finished_c = paired(&cl_at(|s| s.finished), |p| p.finished);
    let c_minus_b: Vec<f64> = seq
        .up
        .iter()
        .zip(&seq.cluster)
        .filter_map(|(b, c)| Some(c.as_ref()?.1.first_out - b.as_ref()?.first_out))
        .collect();

    println!();
    let mut t = Table::new();
    t.section(format!(
        "(a) in-process pool: {} of {} claims of `{CODE}` counted",
        pool_ok.len(),
        seq.pool.len()
    ));
    t.row("claim → Started", &pcol(|s| s.started));
    t.row("claim → first Stdout", &pcol(|s| s.first_out));
    t.row("claim → Finished", &pcol(|s| s.finished));
    t.row(
        "sandbox start_ms (claim → first statement)",
        &pcol(|s| s.start_ms),
    );
    t.row(
        "queued_ms (waiting for a frozen sandbox)",
        &pcol(|s| s.queued_ms),
    );
    for (label, v, n) in [
        ("(b) embedded, hatchery up", &up_ok, seq.up.len()),
        (
            "(c) cluster, PostgreSQL + Redis + S3",
            &cl_ok,
            seq.cluster.len(),
        ),
    ] {
        t.section(format!(
            "{label}: {} of {n} sequential POSTs of `{CODE}` counted",
            v.len()
        ));
        t.row("POST → 202", &acol(v, |s| s.accepted));
        t.row(
            "POST → WebSocket open (after the 202)",
            &acol(v, |s| s.trace.ws_open),
        );
        t.row("POST → `started` event", &acol(v, |s| s.started));
        t.row("POST → first `stdout` event", &acol(v, |s| s.first_out));
        t.row("POST → `finished` event", &acol(v, |s| s.finished));
        t.row("sandbox start_ms", &acol(v, |s| s.start_ms));
    }
    for r in 0..APIS {
        let via: Vec<f64> = seq
            .cluster
            .iter()
            .flatten()
            .filter(|(x, _)| *x == r)
            .map(|(_, s)| s.first_out)
            .collect();
        t.row(format!("  POST → first `stdout`, via api-{}", r + 1), &via);
    }
    t.section("API overhead over the pool, paired by round (rounds where both counted)");
    t.row(
        "(b)−(a) first output: POST→stdout − claim→Stdout",
        &first_out_b,
    );
    t.row("(c)−(a) first output", &first_out_c);
    t.row("(c)−(b) first output", &c_minus_b);
    t.row(
        "(b)−(a) finished: POST→finished − claim→Finished",
        &finished_b,
    );
    t.row("(c)−(a) finished", &finished_c);
    t.section(format!(
        "floor ({floor_cpus}): after the same {} ms idle, alternate rounds | back to back",
        o.pause.as_millis()
    ));
    t.row(
        "idle: loopback TCP round trip (1 byte each way)",
        &seq.floor_tcp,
    );
    t.row(
        "idle: thread wake-up (send → the other thread runs)",
        &seq.floor_wake,
    );
    t.row("busy: loopback TCP round trip", busy_tcp);
    t.row("busy: thread wake-up", busy_wake);
    t.section(format!(
        "throughput, {} s per variant in rotating slices, {} clients (one user each) / \
         threads: per execution, counted only",
        o.seconds, o.clients
    ));
    t.row("(a) claim → Finished", &tp[0].to_finished);
    t.row("(b) POST → `finished`", &tp[1].to_finished);
    t.row("(c) POST → `finished`", &tp[2].to_finished);
    t.print();

    println!();
    println!("failures (not counted, never dropped silently):");
    let names = ["(a) pool", "(b) embedded", "(c) cluster"];
    for (k, name) in names.iter().enumerate() {
        let f = &seq.failed[k];
        println!(
            "  sequential {name:<13}: {} of {} {:?}",
            f.total(),
            match k {
                0 => seq.pool.len(),
                1 => seq.up.len(),
                _ => seq.cluster.len(),
            },
            f.by_kind
        );
        for m in &f.messages {
            println!("      {m}");
        }
    }
    for (k, name) in names.iter().enumerate() {
        let x = &tp[k];
        println!(
            "  throughput {name:<13}: {} (completed in another state {:?}; 429/503 {:?}; \
             errors {})",
            x.failures(),
            x.bad,
            x.overload,
            x.errors
        );
        for m in &x.error_messages {
            println!("      {m}");
        }
    }
    let floor_nan = seq.floor_tcp.iter().chain(&seq.floor_wake);
    println!(
        "  floor samples that failed: {}",
        floor_nan.filter(|v| !v.is_finite()).count()
    );

    println!();
    println!("throughput (counted executions / time under load):");
    for (k, name) in names.iter().enumerate() {
        let x = &tp[k];
        println!(
            "  {name:<13} {:>7.1} execs/s ({} in {:.2} s; per slice: {})",
            x.rate(),
            x.done,
            x.elapsed_s,
            x.slices
                .iter()
                .map(|(n, s)| format!("{:.1}", *n as f64 / s))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let per_round = |k: usize| stats(&ratios.iter().map(|r| r[k]).collect::<Vec<f64>>());
    for (k, name) in ["(b)/(a)", "(c)/(a)"].iter().enumerate() {
        let s = per_round(k);
        println!(
            "  {name}: {:.2} over all slices; per round median {:.2} (min {:.2}, max {:.2}, {} \
             rounds)",
            tp[k + 1].rate() / tp[0].rate(),
            s.map_or(f64::NAN, |s| s.p50),
            s.map_or(f64::NAN, |s| s.min),
            s.map_or(f64::NAN, |s| s.max),
            ratios.len()
        );
    }

    let p50 = |v: &[f64]| median(v);
    let (a, b, c) = (
        p50(&pcol(|s| s.first_out)),
        p50(&acol(&up_ok, |s| s.first_out)),
        p50(&acol(&cl_ok, |s| s.first_out)),
    );
    let (db, dc) = (p50(&first_out_b), p50(&first_out_c));
    let (rb, rc) = (tp[1].rate() / tp[0].rate(), tp[2].rate() / tp[0].rate());
    let (idle_tcp, idle_wake) = (p50(&seq.floor_tcp), p50(&seq.floor_wake));
    println!();
    println!("headline (p50, ms):");
    println!(
        "  first output: (a) pool {a:.2}, (b) embedded {b:.2}, (c) cluster {c:.2}; floor: idle \
         TCP round trip {idle_tcp:.3}, idle thread wake-up {idle_wake:.3} (busy {:.3} / {:.3})",
        p50(busy_tcp),
        p50(busy_wake)
    );
    println!(
        "  {:<58} {:>8}   {:<15} verdict",
        "figure (p50 of the paired differences; ratios)", "value", ""
    );
    println!(
        "{}",
        verdict_line(
            "API overhead, embedded: (b)−(a) first output, ms",
            db,
            &format!("≤ {TARGET_EMBEDDED_MS}"),
            db <= TARGET_EMBEDDED_MS
        )
    );
    println!(
        "{}",
        verdict_line(
            "API overhead, PostgreSQL + Redis: (c)−(a) first output, ms",
            dc,
            &format!("≤ {TARGET_CLUSTER_MS}"),
            dc <= TARGET_CLUSTER_MS
        )
    );
    println!(
        "{}",
        verdict_line(
            "execs/s through the API, embedded: (b)/(a)",
            rb,
            &format!("≥ {TARGET_RATIO}"),
            rb >= TARGET_RATIO
        )
    );
    println!(
        "{}",
        verdict_line(
            "execs/s through the API, cluster: (c)/(a)",
            rc,
            &format!("≥ {TARGET_RATIO}"),
            rc >= TARGET_RATIO
        )
    );
    println!(
        "  in idle thread wake-ups ({idle_wake:.2} ms each): (b)−(a) = {:.1}, (c)−(a) = {:.1}",
        db / idle_wake,
        dc / idle_wake
    );
    println!(
        "notes: ms = milliseconds on this process's clock; each sequential step starts after \
         its variant was ready and the machine then idle for {} ms; NaN = counted samples \
         without that figure (statistics are over the others); (c) has twice the warm \
         sandboxes and capacity of (a) and (b), on the same vCPUs.",
        o.pause.as_millis()
    );
    println!(
        "event streams of the sequential rounds of (b) and (c): {}; the throughput \
         clients open each execution's own stream after its 202.",
        if o.stream {
            "the caller's stream (GET /v1/events), open before the POST (--stream)"
        } else {
            "each execution's own stream, opened after its 202 (without --stream: add it \
             for a client that keeps one stream open, as a console does)"
        }
    );
}
