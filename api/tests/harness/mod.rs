//! The end-to-end test harness shared by the API suites: a real platform — `hatchery up`
//! on a temporary data dir and cgroup parent of its own, or, for the `e2e_cluster` target,
//! a whole local cluster (PostgreSQL, Redis, S3, two API replicas, two schedulers, two
//! agents as separate processes) — stopped and cleaned up on drop; a tiny HTTP client
//! that spreads requests over the API replicas, WebSocket event readers and platform
//! helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hatchery_api::local_cluster::{ClusterSpec, LocalCluster};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

pub const HATCHERY: &str = env!("CARGO_BIN_EXE_hatchery");
/// Deadline of any single wait (the machine may be loaded).
pub const PATIENCE: Duration = Duration::from_secs(180);

pub static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one test body on its own runtime, one test at a time.
pub fn e2e(body: impl std::future::Future<Output = ()>) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(body)
}

pub fn rootfs() -> PathBuf {
    std::env::var_os("HATCHERY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/hatchery/rootfs/r"))
}

/// Whether this test target runs its platform as a local cluster: the `e2e_cluster`
/// target runs the end-to-end suite (`e2e.rs`) on one; every other target on `hatchery up`.
pub fn on_cluster() -> bool {
    env!("CARGO_CRATE_NAME") == "e2e_cluster"
}

/// A running platform: `hatchery up`, or a local cluster (see [`on_cluster`]).
pub struct Hatchery {
    pub child: Option<Child>,
    pub cluster: Option<LocalCluster>,
    /// This platform's own parent cgroup (removed on drop); on a cluster, the first
    /// agent's.
    pub cgroup_parent: String,
    /// Every agent's parent cgroup.
    pub cgroup_parents: Vec<String>,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// The (first) API replica.
    pub addr: SocketAddr,
    /// Every API replica: [`http`] and [`ws_connect`] take turns over them.
    pub addrs: Vec<SocketAddr>,
    next: AtomicUsize,
    pub _tmp: Option<tempfile::TempDir>,
}

/// Knobs of a test platform.
#[derive(Clone)]
pub struct Setup {
    pub capacity: u32,
    pub max_queued: usize,
    /// Keep the platform's records in this PostgreSQL database instead of the embedded
    /// store.
    pub postgres_url: Option<String>,
    /// Carry work and live events over this Redis instead of in-process channels.
    pub redis_url: Option<String>,
    /// The languages the platform serves.
    pub languages: Vec<String>,
    /// A static host group (8 GiB, 4 CPUs) of this name, which the agent joins (not on a
    /// cluster).
    pub group: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            capacity: 4,
            max_queued: 256,
            postgres_url: None,
            redis_url: None,
            languages: vec!["r".into()],
            group: None,
        }
    }
}

impl Hatchery {
    pub fn start(setup: Setup) -> Hatchery {
        if on_cluster() {
            assert!(setup.group.is_none(), "host groups: not on a test cluster");
            return Hatchery::start_cluster(setup);
        }
        let bin_dir = std::path::Path::new(HATCHERY).parent().unwrap();
        for bin in ["sandbox", "hatchery-zygote"] {
            assert!(
                bin_dir.join(bin).is_file(),
                "{} is missing: build it first with `cargo build -p hatchery-sandbox` (same profile)",
                bin_dir.join(bin).display()
            );
        }
        assert!(
            rootfs().is_dir(),
            "no root filesystem at {}",
            rootfs().display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("hatchery-e2e-")
            .tempdir()
            .expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let config = dir.join("hatchery.toml");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let cgroup_parent = format!(
            "hatchery/e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 data_dir = \"{data}\"\n\
                 rootfs = \"{rootfs}\"\n\
                 token_ttl = \"2h\"\n\
                 [agent]\n\
                 name = \"e2e\"\n\
                 pool_size = 1\n\
                 capacity = {capacity}\n\
                 drain_deadline = \"0s\"\n\
                 cgroup_parent = \"{cgroup_parent}\"\n\
                 {agent_group}\
                 [platform]\n\
                 languages = {languages:?}\n\
                 max_queued = {max_queued}\n\
                 {store}{groups}",
                data = dir.join("data").display(),
                rootfs = rootfs().display(),
                capacity = setup.capacity,
                max_queued = setup.max_queued,
                languages = setup.languages,
                agent_group = setup
                    .group
                    .as_ref()
                    .map(|g| format!("group = {g:?}\n"))
                    .unwrap_or_default(),
                groups = setup
                    .group
                    .as_ref()
                    .map(|g| format!("[[groups]]\nname = {g:?}\nmemory = \"8G\"\ncpus = 4\n"))
                    .unwrap_or_default(),
                store = {
                    let mut t = String::from("[store]\n");
                    if let Some(url) = &setup.postgres_url {
                        t.push_str(&format!("postgres_url = \"{url}\"\n"));
                    }
                    if let Some(url) = &setup.redis_url {
                        t.push_str(&format!("redis_url = \"{url}\"\n"));
                        // Each test platform its own keys in a shared Redis.
                        t.push_str(&format!("redis_prefix = \"{cgroup_parent}\"\n"));
                    }
                    t
                },
            ),
        )
        .unwrap();
        let mut h = Hatchery {
            child: None,
            cluster: None,
            cgroup_parents: vec![cgroup_parent.clone()],
            cgroup_parent,
            dir,
            config,
            addr: "127.0.0.1:1".parse().unwrap(),
            addrs: Vec::new(),
            next: AtomicUsize::new(0),
            _tmp: Some(tmp),
        };
        h.spawn();
        h
    }

    /// A local cluster of two API replicas, two schedulers and two agents sharing
    /// `setup.capacity` (one agent when it is 1).
    fn start_cluster(setup: Setup) -> Hatchery {
        assert!(
            setup.postgres_url.is_none() && setup.redis_url.is_none(),
            "a cluster brings its own engines"
        );
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut spec = ClusterSpec::new(HATCHERY, rootfs());
        spec.agents = if setup.capacity < 2 { 1 } else { 2 };
        spec.agent_capacity = setup.capacity / spec.agents as u32;
        spec.max_queued = setup.max_queued;
        spec.languages = setup.languages.clone();
        spec.cgroup_prefix = format!(
            "e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let cluster = match LocalCluster::start(spec) {
            Ok(c) => c,
            Err(e) => panic!("starting a local cluster: {e}"),
        };
        let parents = cluster.cgroup_parents();
        Hatchery {
            child: None,
            cgroup_parent: parents[0].clone(),
            cgroup_parents: parents,
            dir: cluster.dir().to_path_buf(),
            config: cluster.config().to_path_buf(),
            addr: cluster.api_addrs()[0],
            addrs: cluster.api_addrs(),
            next: AtomicUsize::new(0),
            cluster: Some(cluster),
            _tmp: None,
        }
    }

    /// The API replica for the next request (they take turns).
    pub fn next_addr(&self) -> SocketAddr {
        self.addrs[self.next.fetch_add(1, Ordering::Relaxed) % self.addrs.len()]
    }

    /// Starts (or restarts) the platform on the same config and data: on a cluster,
    /// every process that is stopped.
    pub fn spawn(&mut self) {
        if let Some(cluster) = &mut self.cluster {
            for i in 0..cluster.procs.len() {
                if !cluster.procs[i].is_running() {
                    cluster
                        .restart(i)
                        .unwrap_or_else(|e| panic!("restarting a role: {e}"));
                }
            }
            return;
        }
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hatchery.log"))
            .unwrap();
        let mut cmd = Command::new(HATCHERY);
        for (var, _) in hatchery_api::config::ENV_VARS {
            cmd.env_remove(var);
        }
        cmd.arg("up")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn hatchery up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let banner = self.dir.join("banner.txt");
        std::thread::spawn(move || {
            let mut out = std::fs::File::create(banner).unwrap();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(out, "{line}");
                if let Some(url) = line.strip_prefix("hatchery: listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        self.child = Some(child);
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => {
                self.addr = addr.parse().expect("listening address");
                self.addrs = vec![self.addr];
            }
            Err(_) => {
                self.dump_log();
                panic!("hatchery up did not print its address");
            }
        }
    }

    /// Waits for `/readyz` (the warm pool has a sandbox) on every API replica; on a
    /// cluster, until every agent is up.
    pub async fn ready(&self) {
        let agents = if self.cluster.is_some() {
            self.cgroup_parents.len()
        } else {
            0
        };
        for addr in &self.addrs {
            wait_ready(*addr, agents).await;
        }
    }

    pub async fn started(setup: Setup) -> Hatchery {
        let h = Hatchery::start(setup);
        h.ready().await;
        h
    }

    pub fn token(&self, org: &str, user: &str, role: &str) -> String {
        if let Some(c) = &self.cluster {
            return c
                .token(org, user, role)
                .unwrap_or_else(|e| panic!("token: {e}"));
        }
        let out = Command::new(HATCHERY)
            .args([
                "token", "create", "--org", org, "--user", user, "--role", role,
            ])
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("hatchery token create");
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Sends `signal` and waits for the process to exit; on a cluster, to every process.
    pub fn stop_with(&mut self, signal: i32) {
        if let Some(c) = &mut self.cluster {
            for p in &mut c.procs {
                p.stop(signal);
            }
            return;
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn dump_log(&self) {
        if self.cluster.is_some() {
            // The cluster prints its processes' logs when dropped in a panic.
            return;
        }
        let log = std::fs::read_to_string(self.dir.join("hatchery.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!("---- hatchery.log (last 80 lines) ----");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

impl Drop for Hatchery {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_log();
        }
        self.stop_with(libc::SIGTERM);
        // A cluster removes its agents' parents itself when dropped.
        if self.cluster.is_none() {
            remove_cgroup_parent(&self.cgroup_parent);
        }
    }
}

/// An engine a test needs (PostgreSQL, Redis, moto): started, or `None` with the skip
/// recorded where it is not installed — a failure under `HATCHERY_REQUIRE_ENGINES` (the
/// test script's setting: it installs them).
pub fn engine<T>(
    test: &str,
    started: Result<T, hatchery_scheduler::engines::EngineError>,
) -> Option<T> {
    match started {
        Ok(engine) => Some(engine),
        Err(e) if e.is_missing() => {
            hatchery_tests::skip(test, &e.to_string(), "HATCHERY_REQUIRE_ENGINES");
            None
        }
        Err(e) => panic!("{test}: starting an engine: {e}"),
    }
}

pub use hatchery_api::local_cluster::remove_cgroup_parent;

/// Waits until the API at `addr` answers `/readyz` 200 listing at least `agents` agents.
pub async fn wait_ready(addr: SocketAddr, agents: usize) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = try_http(addr, "GET", "/readyz", None, None).await {
            if r.status == 200
                && r.json()["agents"]
                    .as_array()
                    .is_some_and(|a| a.len() >= agents)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{addr} never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------- a tiny HTTP client

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", String::from_utf8_lossy(&self.body)))
            .to_string()
    }

    /// Asserts a refusal with `status` and `code`; its message.
    pub fn refused(&self, status: u16, code: &str) -> String {
        assert_eq!(
            (self.status, self.code().as_str()),
            (status, code),
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

pub enum BodyMode {
    Length,
    Chunked,
}

pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(Vec<u8>, BodyMode)>,
) -> std::io::Result<Resp> {
    let stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let mut payload = Vec::new();
    match &body {
        Some((b, BodyMode::Length)) => {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
            payload.extend_from_slice(b);
        }
        Some((b, BodyMode::Chunked)) => {
            head.push_str("Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n");
            for chunk in b.chunks(64 << 10) {
                payload.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                payload.extend_from_slice(chunk);
                payload.extend_from_slice(b"\r\n");
            }
            payload.extend_from_slice(b"0\r\n\r\n");
        }
        None if method != "GET" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    wr.write_all(head.as_bytes()).await?;
    // The server may answer (413) before it has read the whole body: write in the
    // background, read the answer here.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&payload).await;
        let _ = wr.flush().await;
        wr
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let resp = loop {
        if let Some(r) = parse_response(&buf) {
            break r;
        }
        match rd.read(&mut chunk).await {
            Ok(0) => {
                return parse_response(&buf).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated response")
                })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return parse_response(&buf).ok_or(e),
        }
    };
    writer.abort();
    Ok(resp)
}

/// A complete response in `buf`, if there is one.
pub fn parse_response(buf: &[u8]) -> Option<Resp> {
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

pub async fn http(
    h: &Hatchery,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let body = body.map(|b| (serde_json::to_vec(&b).unwrap(), BodyMode::Length));
    try_http(h.next_addr(), method, path, token, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

pub async fn get(h: &Hatchery, path: &str, token: &str) -> Resp {
    http(h, "GET", path, Some(token), None).await
}

pub async fn raw_post(
    h: &Hatchery,
    path: &str,
    token: &str,
    body: Vec<u8>,
    mode: BodyMode,
) -> Resp {
    try_http(h.next_addr(), "POST", path, Some(token), Some((body, mode)))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

// ---------------------------------------------------------------- platform helpers

pub async fn submit(h: &Hatchery, token: &str, body: Value) -> String {
    let r = http(h, "POST", "/v1/executions", Some(token), Some(body)).await;
    assert_eq!(
        r.status,
        202,
        "submit: {}",
        String::from_utf8_lossy(&r.body)
    );
    let v = r.json();
    assert_eq!(v["state"], "queued");
    v["id"].as_str().unwrap().to_string()
}

pub async fn run_r(h: &Hatchery, token: &str, code: &str) -> String {
    submit(h, token, json!({"language": "r", "code": code})).await
}

pub async fn execution(h: &Hatchery, token: &str, id: &str) -> Value {
    let r = get(h, &format!("/v1/executions/{id}"), token).await;
    assert_eq!(
        r.status,
        200,
        "GET {id}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// Polls an execution until `pred` holds of it.
pub async fn wait_until(
    h: &Hatchery,
    token: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = execution(h, token, id).await;
        if pred(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("execution {id} never became {what}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("?")
}

pub fn terminal(v: &Value) -> bool {
    !matches!(state(v), "queued" | "running")
}

pub async fn wait_terminal(h: &Hatchery, token: &str, id: &str) -> Value {
    wait_until(h, token, id, "finished", terminal).await
}

pub async fn wait_running(h: &Hatchery, token: &str, id: &str) -> Value {
    wait_until(h, token, id, "running", |v| state(v) == "running").await
}

pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

pub async fn ws_connect(h: &Hatchery, path_and_query: &str) -> Result<WsStream, u16> {
    let url = format!("ws://{}{}", h.next_addr(), path_and_query);
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket {path_and_query}: {e}"),
    }
}

/// Reads JSON events until `stop` says so, the server closes (`true`), or the deadline.
pub async fn read_events(
    ws: &mut WsStream,
    mut stop: impl FnMut(&[Value]) -> bool,
) -> (Vec<Value>, bool) {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if stop(&events) {
            return (events, false);
        }
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no event within the deadline; got {events:?}"),
            Ok(m) => m,
        };
        match msg {
            Some(Ok(Message::Text(t))) => events.push(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(_))) | None => return (events, true),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("websocket error after {events:?}: {e}"),
        }
    }
}

/// The sequence numbers of the durable events (live-only ones, such as usage samples,
/// may carry none).
pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

pub fn stdout_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "stdout")
        .map(|e| e["data"].as_str().unwrap())
        .collect()
}

pub const LONG: &str = "Sys.sleep(60); 'never'";

/// The events of a finished execution, from the start.
pub async fn all_events(h: &Hatchery, token: &str, id: &str) -> Vec<Value> {
    let mut ws = ws_connect(h, &format!("/v1/executions/{id}/events?token={token}"))
        .await
        .unwrap();
    let (events, closed) = read_events(&mut ws, |_| false).await;
    assert!(closed);
    events
}

/// The events of the log: all but the live-only `usage` samples, which carry no `seq`
/// (checked: every other event has one).
pub fn logged(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| {
            let live = e["type"] == "usage";
            assert_eq!(
                e.get("seq").is_none(),
                live,
                "only usage events lack a seq: {e}"
            );
            !live
        })
        .cloned()
        .collect()
}
