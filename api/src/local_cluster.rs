//! A whole cluster on this machine: a private PostgreSQL, Redis and S3 (moto), then
//! `hatchery api` replicas, schedulers and agents as separate processes of the `hatchery`
//! binary, sharing one config file and one keys file. `hatchery cluster` runs one in the
//! foreground; the cluster test suites and the bench drive one from code (kill a role,
//! restart an engine, read the logs).
//!
//! Every agent gets a cgroup parent of its own under `hatchery/` (removed when the
//! cluster stops, once its sandboxes are reaped). The engines live in temporary
//! directories and go with the cluster; they listen on 127.0.0.1, or also on
//! [`ClusterSpec::bind`] (a bridge's address, for hosts in network namespaces), by which
//! the config then names them.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hatchery_scheduler::engines::{EngineError, MotoServer, PostgresServer, RedisServer};

/// How long a process may take to come up (a loaded machine; moto starts slowly).
const START_PATIENCE: Duration = Duration::from_secs(180);

/// The S3 bucket the cluster keeps its objects in.
pub const BUCKET: &str = "hatchery";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("starting {what}: {source}")]
    Engine {
        what: &'static str,
        #[source]
        source: EngineError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} exited before it was up; its log ({log}) ends with:\n{tail}")]
    RoleFailed {
        name: String,
        log: PathBuf,
        tail: String,
    },
    #[error("`hatchery token create` failed: {0}")]
    Token(String),
}

impl ClusterError {
    /// An engine the machine does not have installed (PostgreSQL, Redis or moto).
    pub fn is_missing_engine(&self) -> bool {
        matches!(self, ClusterError::Engine { source, .. } if source.is_missing())
    }
}

/// The shape of a local cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The `hatchery` binary the roles run.
    pub bin: PathBuf,
    /// The root filesystem the agents' sandboxes use.
    pub rootfs: PathBuf,
    pub apis: usize,
    pub schedulers: usize,
    pub agents: usize,
    /// Executions each agent runs at once, and warm sandboxes it keeps.
    pub agent_capacity: u32,
    pub pool_size: u32,
    /// Admitted-but-waiting executions the platform holds (`platform.max_queued`).
    pub max_queued: usize,
    /// Prefix of the agents' cgroup parents (`hatchery/<prefix>-<agent>`).
    pub cgroup_prefix: String,
    /// Where the config, keys, logs and data go (a new temporary directory if `None`,
    /// removed with the cluster).
    pub dir: Option<PathBuf>,
    /// `RUST_LOG` of the roles.
    pub log_filter: String,
    /// API replicas listen on consecutive ports from this one (0: any free port).
    pub first_port: u16,
    /// The languages the platform serves (`platform.languages`).
    pub languages: Vec<String>,
    /// TOML appended to the cluster's config (e.g. `[[groups]]` tables).
    pub extra_config: String,
    /// An address the engines listen on besides 127.0.0.1 (moto: instead of it), by which
    /// the shared config names them: a bridge's, so that hosts in network namespaces
    /// reach them (`None`: loopback only).
    pub bind: Option<Ipv4Addr>,
    /// `platform.active_for` (e.g. `30s`; `None`: the default).
    pub active_for: Option<String>,
}

impl ClusterSpec {
    /// Two API replicas, two schedulers and two agents.
    pub fn new(bin: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> ClusterSpec {
        ClusterSpec {
            bin: bin.into(),
            rootfs: rootfs.into(),
            apis: 2,
            schedulers: 2,
            agents: 2,
            agent_capacity: 2,
            pool_size: 1,
            max_queued: 256,
            cgroup_prefix: format!("cluster-{}", std::process::id()),
            dir: None,
            log_filter: "info".into(),
            first_port: 0,
            languages: vec!["r".into()],
            extra_config: String::new(),
            bind: None,
            active_for: None,
        }
    }
}

/// What a process of the cluster does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoleKind {
    Api,
    Scheduler,
    Agent,
}

impl RoleKind {
    fn arg(self) -> &'static str {
        match self {
            RoleKind::Api => "api",
            RoleKind::Scheduler => "scheduler",
            RoleKind::Agent => "agent",
        }
    }
}

/// One process of the cluster (stopped with SIGTERM on drop).
#[derive(Debug)]
pub struct RoleProcess {
    pub name: String,
    pub kind: RoleKind,
    /// Extra environment it was started with (kept for a restart).
    env: Vec<(String, String)>,
    child: Option<Child>,
    pub log: PathBuf,
    /// Where an API replica listens.
    pub addr: Option<SocketAddr>,
}

impl RoleProcess {
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` without waiting (`false` when the process is gone).
    pub fn signal(&mut self, signal: i32) -> bool {
        if !self.is_running() {
            return false;
        }
        let Some(child) = self.child.as_ref() else {
            return false;
        };
        // SAFETY: kill(2) on a child this cluster started and has not reaped yet (the
        // pid cannot have been reused).
        unsafe { libc::kill(child.id() as i32, signal) == 0 }
    }

    /// How it exited, once it has (reaped then: [`Self::is_running`] is false after).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Sends `signal` and waits (bounded, then SIGKILL) for the process to exit.
    pub fn stop(&mut self, signal: i32) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on a child this cluster started and has not reaped yet (the
        // pid cannot have been reused).
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(process = %self.name, "did not stop within 30 s: killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

/// `s` as a TOML string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn toml_list(items: &[String]) -> String {
    toml::Value::Array(items.iter().cloned().map(toml::Value::String).collect()).to_string()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A running local cluster. Dropping it stops the processes, then the engines, then
/// removes the agents' cgroup parents.
pub struct LocalCluster {
    spec: ClusterSpec,
    dir: PathBuf,
    config: PathBuf,
    // Dropped in this order: the processes, then the engines, then the directory.
    pub procs: Vec<RoleProcess>,
    pub redis: RedisServer,
    pub postgres: PostgresServer,
    pub moto: MotoServer,
    _tmp: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Starts the engines and writes the shared config and keys; no role runs yet (see
    /// [`LocalCluster::start`] for the whole thing).
    pub fn engines(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        let engine = |what| move |source| ClusterError::Engine { what, source };
        let postgres = match spec.bind {
            Some(addr) => PostgresServer::start_on(addr),
            None => PostgresServer::start(),
        }
        .map_err(engine("PostgreSQL"))?;
        let redis = match spec.bind {
            Some(addr) => RedisServer::start_on(addr),
            None => RedisServer::start(),
        }
        .map_err(engine("Redis"))?;
        let moto = match spec.bind {
            Some(addr) => MotoServer::start_on(addr),
            None => MotoServer::start(),
        }
        .map_err(engine("moto (S3)"))?;
        moto.create_bucket(BUCKET).map_err(engine("moto (S3)"))?;
        let url = postgres
            .create_database("hatchery")
            .map_err(engine("PostgreSQL"))?;
        let (tmp, dir) = match &spec.dir {
            Some(d) => {
                std::fs::create_dir_all(d).map_err(|source| ClusterError::Io {
                    what: format!("creating {}", d.display()),
                    source,
                })?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("hatchery-cluster-")
                    .tempdir()
                    .map_err(|source| ClusterError::Io {
                        what: "creating the cluster's directory".into(),
                        source,
                    })?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        let config = dir.join("hatchery.toml");
        let text = format!(
            "data_dir = {data}\n\
             rootfs = {rootfs}\n\
             token_ttl = \"2h\"\n\
             [agent]\n\
             pool_size = {pool}\n\
             capacity = {capacity}\n\
             drain_deadline = \"0s\"\n\
             [platform]\n\
             languages = {languages}\n\
             max_queued = {max_queued}\n\
             {active_for}\
             [store]\n\
             postgres_url = {url}\n\
             redis_url = {redis}\n\
             s3_bucket = {bucket}\n\
             s3_endpoint = {s3}\n\
             {extra}",
            data = toml_str(&dir.join("data").display().to_string()),
            rootfs = toml_str(&spec.rootfs.display().to_string()),
            url = toml_str(&url),
            bucket = toml_str(BUCKET),
            pool = spec.pool_size,
            capacity = spec.agent_capacity,
            max_queued = spec.max_queued,
            languages = toml_list(&spec.languages),
            redis = toml_str(&redis.url()),
            s3 = toml_str(&moto.endpoint()),
            extra = spec.extra_config,
            active_for = spec
                .active_for
                .as_ref()
                .map(|d| format!("active_for = {}\n", toml_str(d)))
                .unwrap_or_default(),
        );
        std::fs::write(&config, text).map_err(|source| ClusterError::Io {
            what: format!("writing {}", config.display()),
            source,
        })?;
        let cluster = LocalCluster {
            spec,
            dir,
            config,
            procs: Vec::new(),
            redis,
            postgres,
            moto,
            _tmp: tmp,
        };
        // The cluster's one keys file, made once here; the roles only read it.
        cluster.token("hatchery", "bootstrap", "user")?;
        Ok(cluster)
    }

    /// Engines, then the schedulers, agents and API replicas the spec asks for (named
    /// `scheduler-1`, `agent-a`, `api-1`, ...). Returns once every API replica listens
    /// (agents may still be warming their pools: see `/readyz`).
    pub fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        let mut c = LocalCluster::engines(spec)?;
        for i in 0..c.spec.schedulers {
            c.spawn(RoleKind::Scheduler, &format!("scheduler-{}", i + 1), &[])?;
        }
        for i in 0..c.spec.agents {
            c.agent(&agent_name(i), &[])?;
        }
        for i in 0..c.spec.apis {
            c.api(&format!("api-{}", i + 1))?;
        }
        Ok(c)
    }

    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The cgroup parent of the agent named `name`.
    pub fn cgroup_parent(&self, name: &str) -> String {
        format!("hatchery/{}-{name}", self.spec.cgroup_prefix)
    }

    /// The cgroup parents of every agent started so far.
    pub fn cgroup_parents(&self) -> Vec<String> {
        let mut parents: Vec<String> = self
            .procs
            .iter()
            .filter(|p| p.kind == RoleKind::Agent)
            .map(|p| self.cgroup_parent(&p.name))
            .collect();
        parents.dedup();
        parents
    }

    /// An API replica on the next port (or any free one).
    pub fn api(&mut self, name: &str) -> Result<usize, ClusterError> {
        let apis = self
            .procs
            .iter()
            .filter(|p| p.kind == RoleKind::Api)
            .count();
        let port = match self.spec.first_port {
            0 => 0,
            p => p + apis as u16,
        };
        self.spawn(
            RoleKind::Api,
            name,
            &[("HATCHERY_LISTEN", format!("127.0.0.1:{port}"))],
        )
    }

    /// An agent with a cgroup parent of its own.
    pub fn agent(&mut self, name: &str, env: &[(&str, String)]) -> Result<usize, ClusterError> {
        let mut env: Vec<(&str, String)> = env.to_vec();
        env.push(("HATCHERY_CGROUP_PARENT", self.cgroup_parent(name)));
        self.spawn(RoleKind::Agent, name, &env)
    }

    /// Starts one process of the cluster; an API replica is waited for until it listens.
    pub fn spawn(
        &mut self,
        kind: RoleKind,
        name: &str,
        env: &[(&str, String)],
    ) -> Result<usize, ClusterError> {
        let mut proc = RoleProcess {
            name: name.to_string(),
            kind,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            child: None,
            log: self.dir.join(format!("{name}.log")),
            addr: None,
        };
        launch(&self.spec, &self.config, &mut proc)?;
        self.procs.push(proc);
        Ok(self.procs.len() - 1)
    }

    /// Starts a stopped process again, with the same name, environment and port.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        let proc = &mut self.procs[i];
        proc.stop(libc::SIGTERM);
        if let Some(addr) = proc.addr {
            proc.env.retain(|(k, _)| k != "HATCHERY_LISTEN");
            proc.env.push(("HATCHERY_LISTEN".into(), addr.to_string()));
        }
        launch(&self.spec, &self.config, proc)
    }

    /// The process named `name`.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.procs.iter().position(|p| p.name == name)
    }

    /// Where the API replicas listen.
    pub fn api_addrs(&self) -> Vec<SocketAddr> {
        self.procs.iter().filter_map(|p| p.addr).collect()
    }

    /// A bearer token signed with the cluster's key (`hatchery token create`).
    pub fn token(&self, org: &str, user: &str, role: &str) -> Result<String, ClusterError> {
        let out = Command::new(&self.spec.bin)
            .args([
                "token", "create", "--org", org, "--user", user, "--role", role,
            ])
            .arg("--config")
            .arg(&self.config)
            .env_remove("HATCHERY_DATA_DIR")
            .output()
            .map_err(|source| ClusterError::Io {
                what: "running hatchery token create".into(),
                source,
            })?;
        if !out.status.success() {
            return Err(ClusterError::Token(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Stops every process (SIGTERM, bounded) and removes the agents' cgroup parents.
    pub fn stop(&mut self) {
        let parents = self.cgroup_parents();
        // API replicas first (no new work), then agents, then schedulers.
        for kind in [RoleKind::Api, RoleKind::Agent, RoleKind::Scheduler] {
            for p in self.procs.iter_mut().filter(|p| p.kind == kind) {
                p.stop(libc::SIGTERM);
            }
        }
        for parent in parents {
            remove_cgroup_parent(&parent);
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A test failed with this cluster up: what each process said last.
            for p in &self.procs {
                eprintln!("---- {} (last 40 lines) ----\n{}", p.name, p.log_tail(40));
            }
        }
        self.stop();
    }
}

/// Starts `proc` as a process of the cluster whose spec and config are given; an API
/// replica is waited for until it listens.
fn launch(spec: &ClusterSpec, config: &Path, proc: &mut RoleProcess) -> Result<(), ClusterError> {
    let io = |what: &str| {
        let what = format!("{what} for {}", proc.name);
        move |source| ClusterError::Io { what, source }
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&proc.log)
        .map_err(io("opening the log"))?;
    let mut cmd = Command::new(&spec.bin);
    // Only the cluster's config speaks: no HATCHERY_* of the caller leaks in.
    for (var, _) in crate::config::ENV_VARS {
        cmd.env_remove(var);
    }
    cmd.arg(proc.kind.arg())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", &spec.log_filter)
        .env("HATCHERY_AGENT_NAME", &proc.name)
        // The emulator takes any credentials.
        .env("AWS_ACCESS_KEY_ID", "hatchery-local")
        .env("AWS_SECRET_ACCESS_KEY", "hatchery-local")
        .envs(proc.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    let mut child = cmd.spawn().map_err(io("starting the process"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(url) = line.strip_prefix("hatchery: listening on http://") {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    proc.child = Some(child);
    if proc.kind == RoleKind::Api {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    proc.addr = addr.parse().ok();
                    break;
                }
                Err(_) if proc.is_running() && Instant::now() < deadline => continue,
                Err(_) => {
                    proc.stop(libc::SIGKILL);
                    return Err(ClusterError::RoleFailed {
                        name: proc.name.clone(),
                        log: proc.log.clone(),
                        tail: proc.log_tail(20),
                    });
                }
            }
        }
    }
    Ok(())
}

/// `agent-a`, `agent-b`, ... `agent-z`, `agent-27`, ...
pub fn agent_name(i: usize) -> String {
    match u8::try_from(i).ok().filter(|i| *i < 26) {
        Some(i) => format!("agent-{}", (b'a' + i) as char),
        None => format!("agent-{}", i + 1),
    }
}

/// Removes an agent's cgroup parent once what its sandboxes left is reaped (bounded
/// wait; a parent that stays busy is left for `sandbox gc`).
pub fn remove_cgroup_parent(parent: &str) {
    let Ok(root) = hatchery_sandbox::cgroup::CgroupRoot::detect(parent) else {
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(root.remove_if_empty(), Ok(true)) && Instant::now() < deadline {
        let _ = hatchery_sandbox::gc::collect(&root);
        std::thread::sleep(Duration::from_millis(50));
    }
}
