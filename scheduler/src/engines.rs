//! Private instances of the engines a cluster runs on, for tests and for a local
//! cluster on one machine: a PostgreSQL server, a Redis server and an AWS emulator
//! (moto, for S3), each on a loopback port, owned by whoever started it and gone when
//! dropped.
//!
//! `start()` listens on 127.0.0.1 only. `start_on(addr)` also listens on `addr` — the
//! bridge address of a local cluster whose hosts live in network namespaces
//! ([`crate::provider::netns`]) and cannot reach this machine's loopback — and its URLs
//! name `addr`, so one config serves the hosts and this machine alike. moto binds a
//! single address: `addr` only.
//!
//! Nothing here touches a system-wide instance: the server has its own data directory,
//! socket directory and port.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): install the `postgresql` package")]
    PostgresMissing,
    #[error("Redis is not installed (no redis-server): install the `redis-server` package")]
    RedisMissing,
    #[error("moto is not installed (no moto_server): run scripts/setup-deps.sh, or set HATCHERY_MOTO_SERVER")]
    MotoMissing,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {log}")]
    Failed { what: String, log: String },
}

impl EngineError {
    /// The engine is not installed on this machine (as opposed to failing to start).
    pub fn is_missing(&self) -> bool {
        matches!(
            self,
            EngineError::PostgresMissing | EngineError::RedisMissing | EngineError::MotoMissing
        )
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
    let what = what.into();
    move |source| EngineError::Io { what, source }
}

/// The newest PostgreSQL's binaries under Debian's layout (`/usr/lib/postgresql/N/bin`).
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A free loopback port for a server about to start.
///
/// Ports come from below the kernel's ephemeral range, so no outgoing connection on the
/// machine can take one between this call and the server's bind, and this process never
/// hands out the same port twice (tests start many servers at once). Another process can
/// still bind it first: the servers here check that the listener on their port is their
/// own child ([`listens_on`]) and start again on a new port when they lost the race.
pub fn free_port() -> Result<u16, EngineError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    let high = ephemeral_low().clamp(LOW + 1_000, 32_768);
    let span = high - LOW;
    // Processes started together begin at different places in the range.
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    Err(EngineError::Io {
        what: "finding a free port".into(),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Whether process `pid` holds the socket listening on `addr`:`port` (from
/// `/proc/net/tcp` and the process's descriptors): a server that answers on its port
/// may be someone else's that got there first.
pub fn listens_on(pid: u32, addr: Ipv4Addr, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    // The kernel prints the address as the u32 it holds in network order, in hex: the
    // octets reversed on a little-endian machine (127.0.0.1 is 0100007F).
    let local = format!("{:08X}:{port:04X}", u32::from_ne_bytes(addr.octets()));
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st (0A = LISTEN), ..., inode (column 9).
            (cols.len() > 9 && cols[1] == local && cols[3] == "0A")
                .then(|| format!("socket:[{}]", cols[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// How many times a server is started on a new port when its port was taken.
const START_ATTEMPTS: usize = 5;

/// `start` on `port`, then on new ports while the server fails to start (someone else
/// took its port), at most [`START_ATTEMPTS`] times in all.
fn on_a_free_port<T>(
    what: &str,
    port: u16,
    mut start: impl FnMut(u16) -> Result<T, EngineError>,
) -> Result<T, EngineError> {
    let mut port = port;
    let mut attempt = 1;
    loop {
        match start(port) {
            Err(e @ EngineError::Failed { .. }) if attempt < START_ATTEMPTS => {
                tracing::debug!(port, error = %e, "{what} did not start; trying another port");
                port = free_port()?;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A private PostgreSQL server: `initdb` in a temporary directory, listening on
/// 127.0.0.1 (and the address given to [`PostgresServer::start_on`]), trust
/// authentication for the `hatchery` role, `fsync=off` (a test server: a crash of
/// PostgreSQL loses nothing committed, a crash of the machine could). Stopped
/// (immediate shutdown) and removed on drop.
pub struct PostgresServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// The address it listens on besides 127.0.0.1, which its URLs name.
    bind: Option<Ipv4Addr>,
    /// The account the server runs as when we are root (PostgreSQL refuses root).
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl PostgresServer {
    /// Creates and starts a server on 127.0.0.1 (about a second).
    pub fn start() -> Result<PostgresServer, EngineError> {
        PostgresServer::start_from(None, free_port()?)
    }

    /// Creates and starts a server listening on 127.0.0.1 and on `addr`, trusting the
    /// `hatchery` role from `addr`'s /24 (the hosts on a bridge); its URLs name `addr`.
    pub fn start_on(addr: Ipv4Addr) -> Result<PostgresServer, EngineError> {
        PostgresServer::start_from(Some(addr), free_port()?)
    }

    /// Starts a server also listening on `bind`, trying `port` first.
    fn start_from(bind: Option<Ipv4Addr>, port: u16) -> Result<PostgresServer, EngineError> {
        let bin = postgres_bin_dir().ok_or(EngineError::PostgresMissing)?;
        let dir = tempfile::Builder::new()
            .prefix("hatchery-pg.")
            .tempdir()
            .map_err(io("creating the server's directory"))?;
        let owner = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("postgres")
                .ok()
                .flatten()
                .ok_or(EngineError::PostgresMissing)?;
            chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(io("giving the server's directory to postgres"))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        } else {
            None
        };
        let mut server = PostgresServer {
            bin,
            dir,
            port,
            bind,
            owner,
            child: None,
        };
        let data = server.data_dir();
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "hatchery", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdin(Stdio::null())
            .output()
            .map_err(io("running initdb"))?;
        if !out.status.success() {
            return Err(EngineError::Failed {
                what: "initdb".into(),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        if let Some(addr) = bind {
            server.trust_network_of(addr)?;
        }
        on_a_free_port("postgres", port, |port| {
            server.port = port;
            server.run()
        })?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Lets the `hatchery` role in without a password from `addr`'s /24, as initdb's
    /// `--auth=trust` does from loopback.
    fn trust_network_of(&self, addr: Ipv4Addr) -> Result<(), EngineError> {
        use std::io::Write;
        let network = Ipv4Addr::from(u32::from(addr) & 0xffff_ff00);
        let hba = self.data_dir().join("pg_hba.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .and_then(|mut f| writeln!(f, "host all hatchery {network}/24 trust"))
            .map_err(io(format!("adding {network}/24 to {}", hba.display())))
    }

    /// The addresses it listens on.
    fn addresses(&self) -> Vec<Ipv4Addr> {
        std::iter::once(Ipv4Addr::LOCALHOST)
            .chain(self.bind)
            .collect()
    }

    /// `listen_addresses`: every address, comma-separated.
    fn listen_addresses(&self) -> String {
        let all: Vec<String> = self.addresses().iter().map(Ipv4Addr::to_string).collect();
        all.join(",")
    }

    /// The address its URLs name.
    fn host(&self) -> Ipv4Addr {
        self.bind.unwrap_or(Ipv4Addr::LOCALHOST)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.bin.join(program));
        c.env_clear()
            .env("LC_ALL", "C")
            .env("PATH", "/usr/bin:/bin");
        if let Some((uid, gid)) = self.owner {
            // std drops the supplementary groups when root sets a uid.
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Starts the server on its port and waits until it accepts connections.
    fn run(&mut self) -> Result<(), EngineError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io("opening the server's log"))?;
        if let Some((uid, gid)) = self.owner {
            let _ = chown(self.log_path(), Some(uid), Some(gid));
        }
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("listen_addresses={}", self.listen_addresses()))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            // No fsync (a test server: only a machine crash could lose data), but every
            // commit reaches the WAL before it returns, so a crash of the server itself
            // (an immediate shutdown) loses nothing that was committed.
            .args(["-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("opening the server's log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("starting postgres"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(EngineError::Failed {
                    what: format!("postgres ({status})"),
                    log: self.log_tail(),
                });
            }
            if self.accepts() && self.owns_port() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(EngineError::Failed {
                    what: "postgres did not accept connections within 30 s".into(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the listeners on the port, on every address, are this server's
    /// postmaster (PostgreSQL starts when it can bind at least one of them).
    fn owns_port(&self) -> bool {
        self.child.as_ref().is_some_and(|c| {
            self.addresses()
                .into_iter()
                .all(|addr| listens_on(c.id(), addr, self.port))
        })
    }

    /// Whether the server answers (`pg_isready`).
    fn accepts(&self) -> bool {
        TcpStream::connect((self.host(), self.port)).is_ok()
            && self
                .command("pg_isready")
                .args(["-q", "-U", "hatchery", "-d", "postgres"])
                .arg("-h")
                .arg(self.host().to_string())
                .arg("-p")
                .arg(self.port.to_string())
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The server's port (on 127.0.0.1, and on the address it was started on).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `db` as the `hatchery` role (at the address it was started
    /// on, else 127.0.0.1).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://hatchery@{}:{}/{db}", self.host(), self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_database(&self, db: &str) -> Result<String, EngineError> {
        let out = self
            .command("createdb")
            .args(["-U", "hatchery"])
            .arg("-h")
            .arg(self.host().to_string())
            .arg("-p")
            .arg(self.port.to_string())
            .arg(db)
            .stdin(Stdio::null())
            .output()
            .map_err(io("running createdb"))?;
        if !out.status.success() {
            return Err(EngineError::Failed {
                what: format!("createdb {db}"),
                log: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(self.url(db))
    }

    /// Stops the server at once (immediate shutdown: what a crash looks like to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again, on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), EngineError> {
        self.stop();
        self.run()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private Redis server: no persistence (a test server), listening on 127.0.0.1 (and
/// the address given to [`RedisServer::start_on`]), its files in a temporary directory.
/// Stopped and removed on drop.
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
    /// The address it listens on besides 127.0.0.1, which its URL names.
    bind: Option<Ipv4Addr>,
    child: Option<Child>,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Where Debian installs `redis-server`.
pub fn redis_server_bin() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

impl RedisServer {
    /// Starts a server on 127.0.0.1.
    pub fn start() -> Result<RedisServer, EngineError> {
        RedisServer::start_from(None, free_port()?)
    }

    /// Starts a server listening on 127.0.0.1 and on `addr`; its URL names `addr`.
    pub fn start_on(addr: Ipv4Addr) -> Result<RedisServer, EngineError> {
        RedisServer::start_from(Some(addr), free_port()?)
    }

    /// Starts a server also listening on `bind`, trying `port` first.
    fn start_from(bind: Option<Ipv4Addr>, port: u16) -> Result<RedisServer, EngineError> {
        if redis_server_bin().is_none() {
            return Err(EngineError::RedisMissing);
        }
        let dir = tempfile::Builder::new()
            .prefix("hatchery-redis.")
            .tempdir()
            .map_err(io("creating the server's directory"))?;
        let mut server = RedisServer {
            dir,
            port,
            bind,
            child: None,
        };
        on_a_free_port("redis-server", port, |port| {
            server.port = port;
            server.run()
        })?;
        Ok(server)
    }

    fn run(&mut self) -> Result<(), EngineError> {
        let bin = redis_server_bin().ok_or(EngineError::RedisMissing)?;
        let log = self.dir.path().join("server.log");
        let child = Command::new(bin)
            .env_clear()
            .arg("--bind")
            .args(self.addresses().iter().map(Ipv4Addr::to_string))
            // Protected mode refuses every client off loopback whatever `--bind` says; the
            // clients on a bind address (the hosts on a private bridge) are the point.
            .arg("--protected-mode")
            .arg(if self.bind.is_some() { "no" } else { "yes" })
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(io("starting redis-server"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(EngineError::Failed {
                    what: format!("redis-server ({status})"),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            if self.pings() && self.owns_port() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(EngineError::Failed {
                    what: "redis-server did not answer within 30 s".into(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The addresses it listens on.
    fn addresses(&self) -> Vec<Ipv4Addr> {
        std::iter::once(Ipv4Addr::LOCALHOST)
            .chain(self.bind)
            .collect()
    }

    /// The address its URL names.
    fn host(&self) -> Ipv4Addr {
        self.bind.unwrap_or(Ipv4Addr::LOCALHOST)
    }

    /// Whether the listeners on the port, on every address, are this server's.
    fn owns_port(&self) -> bool {
        self.child.as_ref().is_some_and(|c| {
            self.addresses()
                .into_iter()
                .all(|addr| listens_on(c.id(), addr, self.port))
        })
    }

    /// Whether the server answers PING (a raw RESP exchange: no client needed).
    fn pings(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect((self.host(), self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://<address>:<port>/` (the address it was started on, else 127.0.0.1).
    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host(), self.port)
    }

    /// Stops the server at once (SIGKILL: what a crash looks like to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port (empty: no persistence).
    pub fn restart(&mut self) -> Result<(), EngineError> {
        self.stop();
        self.run()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where `scripts/setup-deps.sh` installs moto (`moto[server]` in a virtualenv).
pub const MOTO_VENV: &str = "/opt/hatchery/venv";

/// The `moto_server` binary: `$HATCHERY_MOTO_SERVER`, else the setup script's virtualenv.
pub fn moto_server_bin() -> Option<PathBuf> {
    std::env::var_os("HATCHERY_MOTO_SERVER")
        .map(PathBuf::from)
        .or_else(|| Some(Path::new(MOTO_VENV).join("bin/moto_server")))
        .filter(|p| p.exists())
}

/// A private AWS emulator (moto's server: S3, EC2 Auto Scaling, ...) on a loopback port,
/// or on the one address given to [`MotoServer::start_on`]. It accepts any credentials.
/// Stopped on drop.
pub struct MotoServer {
    /// The one address it listens on.
    host: Ipv4Addr,
    port: u16,
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

impl std::fmt::Debug for MotoServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotoServer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl MotoServer {
    /// Starts a server on 127.0.0.1.
    pub fn start() -> Result<MotoServer, EngineError> {
        MotoServer::start_on(Ipv4Addr::LOCALHOST)
    }

    /// Starts a server on `addr` only (moto binds a single address); its endpoint names
    /// `addr`.
    pub fn start_on(addr: Ipv4Addr) -> Result<MotoServer, EngineError> {
        let bin = moto_server_bin().ok_or(EngineError::MotoMissing)?;
        on_a_free_port("moto_server", free_port()?, |port| {
            MotoServer::run(&bin, addr, port)
        })
    }

    fn run(bin: &Path, host: Ipv4Addr, port: u16) -> Result<MotoServer, EngineError> {
        let log = tempfile::NamedTempFile::new().map_err(io("creating moto's log"))?;
        let child = Command::new(bin)
            .arg("-H")
            .arg(host.to_string())
            .arg("-p")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.reopen().map_err(io("opening moto's log"))?)
            .stderr(log.reopen().map_err(io("opening moto's log"))?)
            .spawn()
            .map_err(io("starting moto_server"))?;
        let mut server = MotoServer {
            host,
            port,
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                server.child = None;
                return Err(EngineError::Failed {
                    what: format!("moto_server ({status})"),
                    log: std::fs::read_to_string(server.log.path()).unwrap_or_default(),
                });
            }
            if server.request("GET", "/").is_ok_and(|s| s < 500)
                && server
                    .child
                    .as_ref()
                    .is_some_and(|c| listens_on(c.id(), host, port))
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(EngineError::Failed {
                    what: "moto_server did not answer within 60 s".into(),
                    log: std::fs::read_to_string(server.log.path()).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One bare HTTP/1.1 request; the response's status.
    fn request(&self, method: &str, path: &str) -> std::io::Result<u16> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect((self.host, self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.host, self.port
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))
    }

    /// `http://<address>:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Creates an S3 bucket.
    pub fn create_bucket(&self, name: &str) -> Result<(), EngineError> {
        match self.request("PUT", &format!("/{name}")) {
            Ok(s) if s < 300 => Ok(()),
            Ok(s) => Err(EngineError::Failed {
                what: format!("creating bucket {name}"),
                log: format!("HTTP {s}"),
            }),
            Err(e) => Err(EngineError::Io {
                what: format!("creating bucket {name}"),
                source: e,
            }),
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_below_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        let low = ephemeral_low();
        assert!(ports.iter().all(|&p| u32::from(p) < low), "{ports:?}");
    }

    /// Another loopback address: on this machine like a bridge's, but no device to make.
    const OTHER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

    #[test]
    fn listens_on_tells_the_owner_of_a_listener() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), Ipv4Addr::LOCALHOST, port));
        assert!(
            !listens_on(1, Ipv4Addr::LOCALHOST, port),
            "pid 1 does not hold this test's socket"
        );
        drop(l);
        assert!(!listens_on(std::process::id(), Ipv4Addr::LOCALHOST, port));
    }

    #[test]
    fn listens_on_tells_the_address_of_a_listener() {
        let l = TcpListener::bind((OTHER, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), OTHER, port));
        assert!(!listens_on(std::process::id(), Ipv4Addr::LOCALHOST, port));
    }

    /// A server whose port another server already answers on must not take that
    /// server for itself: it starts on a port of its own.
    #[test]
    fn a_redis_server_never_adopts_another_one_on_its_port() {
        let first = match RedisServer::start() {
            Err(e) if e.is_missing() => return,
            r => r.unwrap(),
        };
        let second = RedisServer::start_from(None, first.port()).unwrap();
        assert_ne!(second.port(), first.port());
        assert!(second.owns_port());
        assert!(first.pings() && second.pings());
    }

    #[test]
    fn a_postgres_server_never_adopts_another_one_on_its_port() {
        let first = match PostgresServer::start() {
            Err(e) if e.is_missing() => return,
            r => r.unwrap(),
        };
        let second = PostgresServer::start_from(None, first.port()).unwrap();
        assert_ne!(second.port(), first.port());
        // Each has a fresh cluster: the same database name can be created in both.
        first.create_database("hatchery").unwrap();
        second.create_database("hatchery").unwrap();
    }

    #[test]
    fn a_postgres_server_started_on_an_address_listens_there_and_names_it() {
        let server = match PostgresServer::start_on(OTHER) {
            Err(e) if e.is_missing() => return,
            r => r.unwrap(),
        };
        let pid = server.child.as_ref().unwrap().id();
        assert!(listens_on(pid, Ipv4Addr::LOCALHOST, server.port()));
        assert!(listens_on(pid, OTHER, server.port()));
        let url = server.create_database("hatchery").unwrap();
        assert_eq!(
            url,
            format!("postgres://hatchery@127.0.0.2:{}/hatchery", server.port())
        );
        let hba = std::fs::read_to_string(server.data_dir().join("pg_hba.conf")).unwrap();
        assert!(
            hba.contains("host all hatchery 127.0.0.0/24 trust"),
            "{hba}"
        );
    }

    #[test]
    fn a_redis_server_started_on_an_address_listens_there_and_names_it() {
        let server = match RedisServer::start_on(OTHER) {
            Err(e) if e.is_missing() => return,
            r => r.unwrap(),
        };
        let pid = server.child.as_ref().unwrap().id();
        assert!(listens_on(pid, Ipv4Addr::LOCALHOST, server.port()));
        assert!(listens_on(pid, OTHER, server.port()));
        assert!(server.pings());
        assert_eq!(
            server.url(),
            format!("redis://127.0.0.2:{}/", server.port())
        );
    }

    #[test]
    fn a_moto_server_started_on_an_address_listens_there_only_and_names_it() {
        let server = match MotoServer::start_on(OTHER) {
            Err(e) if e.is_missing() => return,
            r => r.unwrap(),
        };
        let pid = server.child.as_ref().unwrap().id();
        assert!(listens_on(pid, OTHER, server.port));
        assert!(!listens_on(pid, Ipv4Addr::LOCALHOST, server.port));
        assert_eq!(
            server.endpoint(),
            format!("http://127.0.0.2:{}", server.port)
        );
        server.create_bucket("hatchery").unwrap();
    }
}
