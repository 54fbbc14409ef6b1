//! What the benches `api_latency.rs` and `cluster_path.rs` share: signals, statistics and
//! their table, process bookkeeping, a tiny HTTP/1.1 client and the events WebSocket, one
//! execution through the API, one claim of an in-process pool configured as an agent's,
//! and the throughput loops of both.
//!
//! Both benches compile this module; what only one of them uses carries
//! `#[allow(dead_code)]` and names that bench, so anything else unused still warns.
//!
//! Nothing here starts a platform: each bench owns its processes and stops them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

pub const CODE: &str = "cat(1)";
pub const EXPECT: &str = "1";
/// Deadline of any single wait (the machine may be loaded).
pub const PATIENCE: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Signals: Ctrl-C ends the measuring loops; the Drop guards then stop what was started

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn install_signal_handlers() {
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

pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------------------
// Statistics

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Now on the host's wall clock, in milliseconds since the epoch (the server's timestamps
/// are on the same clock).
pub fn epoch_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

/// Statistics of the finite values (a NaN is a sample without this figure: it is
/// counted by [`Table::row`], not dropped silently).
pub fn stats(values: &[f64]) -> Option<Stats> {
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

pub fn median(values: &[f64]) -> f64 {
    stats(values).map_or(f64::NAN, |s| s.p50)
}

/// A row: its label, the statistics of its finite values and how many were NaN.
type Row = (String, Option<Stats>, usize);

pub struct Table {
    rows: Vec<Row>,
    /// A p99 column (and labels 2 characters narrower).
    p99: bool,
}

impl Table {
    /// Columns n, NaN, p50, p90, min, max.
    #[allow(dead_code)] // only cluster_path calls it
    pub fn new() -> Table {
        Table {
            rows: Vec::new(),
            p99: false,
        }
    }

    /// Columns n, NaN, p50, p90, p99, min, max.
    #[allow(dead_code)] // only api_latency calls it
    pub fn with_p99() -> Table {
        Table {
            rows: Vec::new(),
            p99: true,
        }
    }

    pub fn row(&mut self, label: impl Into<String>, values: &[f64]) {
        let missing = values.iter().filter(|v| !v.is_finite()).count();
        self.rows.push((label.into(), stats(values), missing));
    }

    pub fn section(&mut self, label: impl Into<String>) {
        self.rows.push((format!("## {}", label.into()), None, 0));
    }

    pub fn print(&self) {
        let w = if self.p99 { 54 } else { 56 };
        let p99 = |v: &str| {
            if self.p99 {
                format!(" {v:>9}")
            } else {
                String::new()
            }
        };
        println!(
            "{:<w$} {:>4} {:>4} {:>9} {:>9}{} {:>9} {:>9}",
            "measurement (ms)",
            "n",
            "NaN",
            "p50",
            "p90",
            p99("p99"),
            "min",
            "max"
        );
        for (label, s, missing) in &self.rows {
            match (label.strip_prefix("## "), s) {
                (Some(section), _) => println!("-- {section}"),
                (None, Some(s)) => println!(
                    "{:<w$} {:>4} {:>4} {:>9.3} {:>9.3}{} {:>9.3} {:>9.3}",
                    label,
                    s.n,
                    missing,
                    s.p50,
                    s.p90,
                    p99(&format!("{:.3}", s.p99)),
                    s.min,
                    s.max
                ),
                (None, None) => println!("{label:<w$} {:>4} {missing:>4}", 0),
            }
        }
    }
}

pub fn loadavg() -> String {
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
pub fn descendants(root: i32) -> BTreeSet<(i32, u64)> {
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
pub fn alive(pid: i32, start: u64) -> bool {
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

pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client (one connection per request) and the WebSocket

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Result<Value, String> {
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

/// One request on a connection of its own (`Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> std::io::Result<Resp> {
    let mut conn = Conn::open(addr).await?;
    conn.request(addr, method, path, token, body, true).await
}

/// A kept HTTP/1.1 connection (keep-alive), as a client library keeps one: requests one
/// after the other on the same socket.
pub struct Conn {
    stream: TcpStream,
    /// Bytes read past the last response (none, with one request at a time).
    buf: Vec<u8>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
        })
    }

    /// One request and its response; with `close`, the last on this connection.
    pub async fn request(
        &mut self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        close: bool,
    ) -> std::io::Result<Resp> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
        if close {
            req.push_str("Connection: close\r\n");
        }
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
        self.stream.write_all(&bytes).await?;
        read_response(&mut self.stream, &mut self.buf).await
    }
}

/// Reads one response from `stream`, after what `buf` holds already; leaves in `buf`
/// what follows it.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Resp> {
    let mut chunk = [0u8; 16 << 10];
    loop {
        if let Some((r, used)) = parse_response(buf) {
            buf.drain(..used);
            return Ok(r);
        }
        match stream.read(&mut chunk).await? {
            0 => {
                return parse_response(buf).map(|(r, _)| r).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated response")
                })
            }
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A complete response at the start of `buf`, if there is one, and its length.
fn parse_response(buf: &[u8]) -> Option<(Resp, usize)> {
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
    let (body, used) = if let Some(len) = get("content-length") {
        let len: usize = len.parse().ok()?;
        if rest.len() < len {
            return None;
        }
        (rest[..len].to_vec(), len)
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
                // The last chunk's empty line.
                if rest.len() < at + 2 {
                    return None;
                }
                break (out, at + 2);
            }
            if rest.len() < at + size + 2 {
                return None;
            }
            out.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
    } else if status == 101 || status == 204 || status == 304 {
        (Vec::new(), 0)
    } else {
        return None; // read to the end
    };
    Some((
        Resp {
            status,
            headers,
            body,
        },
        end + 4 + used,
    ))
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_events(addr: SocketAddr, id: &str, token: &str) -> Result<WsStream, String> {
    let url = format!("ws://{addr}/v1/executions/{id}/events?after=0&token={token}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("websocket of {id}: {e}"))?;
    Ok(ws)
}

/// The caller's event stream (`GET /v1/events`: every event of the token's user), as a
/// client that keeps one open (a console) has it before it submits.
#[allow(dead_code)] // only cluster_path calls it
pub async fn caller_stream(addr: SocketAddr, token: &str) -> Result<WsStream, String> {
    let url = format!("ws://{addr}/v1/events?token={token}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("caller's event stream: {e}"))?;
    Ok(ws)
}

/// Waits until `addr` answers `/readyz` with 200.
pub async fn wait_readyz(addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match http(addr, "GET", "/readyz", None, None).await {
            Ok(r) if r.status == 200 => return Ok(()),
            _ if Instant::now() > deadline => return Err(format!("{addr} never became ready")),
            _ if stopped() => return Err("interrupted".into()),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// One execution through the API

/// Milliseconds from just before the POST (client clock, `Instant`).
#[derive(Debug, Clone, Default)]
pub struct ApiSample {
    pub accepted: f64,
    pub started: f64,
    pub first_out: f64,
    pub finished: f64,
    /// The sandbox's claim → first user statement (from the `finished` event).
    pub start_ms: f64,
    /// CPU time charged to the sandbox's cgroup (from the `finished` event's usage).
    pub cpu_ms: f64,
    /// Where the time went, for a closer look.
    #[allow(dead_code)] // only api_latency reads it
    pub trace: ApiTrace,
    /// The `finished` event's state, and everything the `stdout` events carried.
    state: String,
    stdout: String,
}

/// Where an execution's time went, beyond [`ApiSample`]'s figures: the WebSocket's
/// opening, and the events' own timestamps (server clock, 1 ms grain) relative to the
/// client's epoch time just before the POST (same host clock).
#[derive(Debug, Clone, Default)]
#[allow(dead_code)] // only api_latency reads it
pub struct ApiTrace {
    pub id: String,
    /// The client's epoch time (ms) just before the POST.
    pub t0_epoch: f64,
    /// POST → WebSocket open (101), client clock.
    pub ws_open: f64,
    /// The `started`, first `stdout` and `finished` events' `at` − `t0_epoch`.
    pub started_ev: f64,
    pub stdout_ev: f64,
    pub finished_ev: f64,
}

impl ApiSample {
    /// Counts only when it succeeded with the right output; otherwise why not.
    pub fn verdict(&self) -> Result<(), String> {
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
pub enum SubmitError {
    /// 429/503: overload, retry after this long.
    Overload(u16, Duration),
    Other(String),
}

impl SubmitError {
    pub fn message(&self) -> String {
        match self {
            SubmitError::Overload(c, _) => format!("answered {c}"),
            SubmitError::Other(e) => e.clone(),
        }
    }
}

/// POST → 202, then the events WebSocket (`after=0`, so nothing that came before it is
/// missed) → `finished`.
pub async fn api_once(addr: SocketAddr, token: &str) -> Result<ApiSample, SubmitError> {
    api_once_on(addr, token, None).await
}

/// [`api_once`], following the execution on `stream` (the caller's event stream, open
/// before the POST) when given, else on its own stream opened after the 202.
pub async fn api_once_on(
    addr: SocketAddr,
    token: &str,
    stream: Option<&mut WsStream>,
) -> Result<ApiSample, SubmitError> {
    api_once_via(addr, token, None, stream).await
}

/// [`api_once_on`], posting on `conn` (a kept connection) when given, else on a
/// connection of its own.
pub async fn api_once_via(
    addr: SocketAddr,
    token: &str,
    conn: Option<&mut Conn>,
    stream: Option<&mut WsStream>,
) -> Result<ApiSample, SubmitError> {
    let mut s = ApiSample::default();
    let body = json!({"language": "r", "code": CODE});
    let t0_epoch = epoch_ms();
    let t0 = Instant::now();
    let posted = match conn {
        Some(c) => {
            c.request(
                addr,
                "POST",
                "/v1/executions",
                Some(token),
                Some(&body),
                false,
            )
            .await
        }
        None => http(addr, "POST", "/v1/executions", Some(token), Some(&body)).await,
    };
    let r = posted.map_err(|e| SubmitError::Other(format!("POST: {e}")))?;
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
    s.trace.id = id.clone();
    s.trace.t0_epoch = t0_epoch;
    let mut own;
    let ws = match stream {
        Some(ws) => {
            s.trace.ws_open = f64::NAN;
            ws
        }
        None => {
            own = ws_events(addr, &id, token)
                .await
                .map_err(SubmitError::Other)?;
            s.trace.ws_open = ms(t0.elapsed());
            &mut own
        }
    };
    let (mut started, mut out) = (None, None);
    let mut stdout = String::new();
    s.trace.started_ev = f64::NAN;
    s.trace.stdout_ev = f64::NAN;
    s.trace.finished_ev = f64::NAN;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let finished: Value = loop {
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
        if e["execution_id"].as_str() != Some(id.as_str()) {
            // Another execution of the caller's (on the caller's stream).
            continue;
        }
        let now = ms(t0.elapsed());
        let at = e["at"].as_f64().map_or(f64::NAN, |a| a - t0_epoch);
        match e["type"].as_str() {
            Some("started") => {
                started.get_or_insert(now);
                s.trace.started_ev = at;
            }
            Some("stdout") => {
                if out.is_none() {
                    out = Some(now);
                    s.trace.stdout_ev = at;
                }
                stdout.push_str(e["data"].as_str().unwrap_or(""));
            }
            Some("finished") => {
                s.finished = now;
                s.trace.finished_ev = at;
                break e;
            }
            _ => {}
        }
    };
    s.started = started.unwrap_or(f64::NAN);
    s.first_out = out.unwrap_or(f64::NAN);
    s.state = finished["state"].as_str().unwrap_or("?").to_string();
    s.stdout = stdout;
    s.start_ms = finished["start_ms"].as_f64().unwrap_or(f64::NAN);
    s.cpu_ms = finished["usage"]["cpu_ms"].as_f64().unwrap_or(f64::NAN);
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// One claim of the in-process pool, as an agent would make it

/// What an agent started from a config file asks of its R pool (the agent is built from
/// the same file by `hatchery up` / `hatchery agent`).
#[derive(Debug, Clone)]
pub struct AgentView {
    limits: Limits,
    /// Plots and files sent back, as the policy allows (the agent asks for them whenever
    /// it allows any).
    artifacts: Option<hatchery_sandbox::pool::ArtifactLimits>,
    prefault: bool,
    prefault_ready: usize,
    timeout: Option<Duration>,
    usage_interval: Duration,
    output_limit: u64,
    max_events: u64,
    claim_timeout: Duration,
    pub pool_size: usize,
    pub max_pool_size: usize,
    pub capacity: u32,
    pub packages: Vec<String>,
}

impl AgentView {
    /// The agent of `config`, with `env` the `HATCHERY_*` variables its process gets.
    pub fn read(config: &Path, env: &BTreeMap<String, String>) -> Result<AgentView, String> {
        let cfg = hatchery_api::config::Config::load_from(Some(config), env)
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let policy = cfg.platform_config().default_policy;
        // What the config does not set, the agent takes from its own defaults.
        let agent = hatchery_scheduler::agent::AgentConfig::new("bench");
        Ok(AgentView {
            artifacts: hatchery_scheduler::policy::limits_for(&policy, None)
                .map_err(|e| format!("the default policy's limits: {e}"))?
                .artifacts(),
            prefault: cfg.agent.prefault,
            prefault_ready: cfg.agent.prefault_ready,
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
            capacity: cfg.agent.capacity,
            packages: cfg.agent.r_packages.clone(),
        })
    }

    /// What every execution gets: limits, time limit, usage interval, output limit and
    /// event cap.
    pub fn describe_policy(&self) -> String {
        format!(
            "memory {} MiB, cpus {}, pids {}, time {}, usage every {} ms, output limit {} \
             MiB, max events {}, artifacts {}, prefault {} (populated ahead {})",
            self.limits.memory_bytes.unwrap_or(0) >> 20,
            self.limits.cpus.unwrap_or(f64::NAN),
            self.limits.pids.unwrap_or(0),
            self.timeout
                .map_or("none".to_string(), |t| format!("{} s", t.as_secs_f64())),
            self.usage_interval.as_millis(),
            self.output_limit >> 20,
            self.max_events,
            self.artifacts.map_or("none".to_string(), |a| format!(
                "{} / {} MiB",
                a.max_count,
                a.max_bytes >> 20
            )),
            self.prefault,
            self.prefault_ready,
        )
    }

    /// [`AgentView::describe_policy`], then the pool and the host.
    #[allow(dead_code)] // only cluster_path calls it
    pub fn describe(&self) -> String {
        format!(
            "{}; pool size {} (max {}), capacity {}, packages [{}]",
            self.describe_policy(),
            self.pool_size,
            self.max_pool_size,
            self.capacity,
            self.packages.join(",")
        )
    }

    /// The pool the agent would start for R, in `cgroup_parent`.
    pub fn pool_config(
        &self,
        rootfs: &Path,
        sandbox_bin: &Path,
        zygote_bin: &Path,
        cgroup_parent: &str,
    ) -> PoolConfig {
        let mut pc = PoolConfig::new(
            Language::R {
                packages: self.packages.clone(),
            },
            PathBuf::from(rootfs),
        );
        pc.size = self.pool_size;
        pc.default_limits = Some(self.limits);
        pc.sandbox_bin = sandbox_bin.to_path_buf();
        pc.zygote_bin = zygote_bin.to_path_buf();
        pc.cgroup_parent = cgroup_parent.into();
        pc.claim_timeout = self.claim_timeout;
        pc.prefault = self.prefault;
        pc.prefault_ready = self.prefault_ready;
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
        req.artifacts = self.artifacts;
        req
    }
}

/// Milliseconds from just before `claim`.
#[derive(Debug, Clone, Default)]
pub struct PoolSample {
    /// `claim()` returned.
    #[allow(dead_code)] // only api_latency reads it
    pub claim_call: f64,
    pub started: f64,
    pub first_out: f64,
    pub finished: f64,
    pub start_ms: f64,
    /// CPU time charged to the sandbox's cgroup (the result's usage).
    pub cpu_ms: f64,
    /// The pool's own figure: limits + send code + thaw.
    #[allow(dead_code)] // only api_latency reads it
    pub claim_ms: f64,
    /// Waiting for a frozen sandbox (the pool's own figure).
    pub queued_ms: f64,
    state: String,
    stdout: Vec<u8>,
}

impl PoolSample {
    pub fn verdict(&self) -> Result<(), String> {
        verdict(&self.state, &self.stdout)
    }
}

/// Waits for the rest of an execution's events until its watcher has ended (it drops its
/// sender only after the sandbox is torn down).
pub fn drain(exec: &Execution) {
    while exec.events().recv().is_ok() {}
}

/// One claim followed to its result; the execution is returned undrained. An error is a
/// claim that failed or an execution without a result; whether it counts is
/// [`PoolSample::verdict`].
pub fn pool_once(pool: &Pool, view: &AgentView) -> Result<(PoolSample, Execution), String> {
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
    s.cpu_ms = (result.usage.user_cpu_ns + result.usage.system_cpu_ns) as f64 / 1e6;
    s.claim_ms = result.timings.claim_ms;
    s.queued_ms = result.timings.queued_ms;
    Ok((s, exec))
}

// ---------------------------------------------------------------------------------------
// Throughput

#[derive(Default)]
pub struct Throughput {
    /// Time under load: per slice, from its start to its last completed execution.
    pub elapsed_s: f64,
    /// Executions that succeeded with the right output (the only ones counted).
    pub done: usize,
    pub to_finished: Vec<f64>,
    /// API: POST → `started` event; pool: queued_ms (waiting for a frozen sandbox).
    pub to_started: Vec<f64>,
    pub start_ms: Vec<f64>,
    /// CPU charged to each counted execution's sandbox cgroup.
    pub sandbox_cpu_ms: Vec<f64>,
    /// Completed executions that do not count, by state (or `wrong output`).
    pub bad: BTreeMap<String, usize>,
    pub overload: BTreeMap<u16, usize>,
    /// Submissions or claims that failed outright, and the first messages.
    pub errors: usize,
    pub error_messages: Vec<String>,
    /// Per slice: executions counted, and its time under load.
    pub slices: Vec<(usize, f64)>,
}

impl Throughput {
    pub fn rate(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.done as f64 / self.elapsed_s
        } else {
            f64::NAN
        }
    }

    /// Everything that did not count: completed in another state, overload answers,
    /// outright errors.
    #[allow(dead_code)] // only cluster_path calls it
    pub fn failures(&self) -> usize {
        self.bad.values().sum::<usize>() + self.overload.values().sum::<usize>() + self.errors
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.error_messages.len() < 3 {
            self.error_messages.push(e);
        }
    }

    /// Adds one slice.
    pub fn absorb(&mut self, s: Throughput) {
        self.elapsed_s += s.elapsed_s;
        self.done += s.done;
        self.to_finished.extend(s.to_finished);
        self.to_started.extend(s.to_started);
        self.start_ms.extend(s.start_ms);
        self.sandbox_cpu_ms.extend(s.sandbox_cpu_ms);
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

/// One slice of `seconds` through the API: one client per `(address, token)`, each
/// submitting back to back; what was submitted before the end is waited for.
///
/// `kept`: each client keeps one HTTP connection for its POSTs and follows its executions
/// on its event stream (`GET /v1/events`, opened once), as a client library and a
/// console do; both are opened again after any failure. Otherwise every execution
/// opens two connections: one for its POST, one for its events' WebSocket.
pub async fn api_throughput(
    clients: &[(SocketAddr, String)],
    seconds: f64,
    kept: bool,
) -> Throughput {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let shared: Arc<Mutex<(Throughput, Option<Instant>)>> = Arc::default();
    let mut tasks = Vec::new();
    for (addr, token) in clients {
        let (addr, token) = (*addr, token.clone());
        let shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            let mut held: Option<(Conn, WsStream)> = None;
            while Instant::now() < deadline && !stopped() {
                let r = if kept {
                    let opened = match held.take() {
                        Some(h) => Ok(h),
                        None => match Conn::open(addr).await {
                            Ok(c) => caller_stream(addr, &token).await.map(|ws| (c, ws)),
                            Err(e) => Err(format!("connect: {e}")),
                        },
                    };
                    match opened {
                        Ok((mut c, mut ws)) => {
                            let r = api_once_via(addr, &token, Some(&mut c), Some(&mut ws)).await;
                            if r.is_ok() {
                                held = Some((c, ws));
                            }
                            r
                        }
                        Err(e) => Err(SubmitError::Other(e)),
                    }
                } else {
                    api_once(addr, &token).await
                };
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
                                    tp.sandbox_cpu_ms.push(s.cpu_ms);
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
pub fn pool_throughput(pool: &Pool, view: &AgentView, threads: usize, seconds: f64) -> Throughput {
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
                                    tp.sandbox_cpu_ms.push(s.cpu_ms);
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
