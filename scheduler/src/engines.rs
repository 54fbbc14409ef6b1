//! Private instances of the engines a cluster runs on, for tests and for a local
//! cluster on one machine: a PostgreSQL server, a Redis server and an AWS emulator
//! (moto, for S3), each on a loopback port, owned by whoever started it and gone when
//! dropped.
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

/// A free loopback port (free when asked: the server binds it right after).
pub fn free_port() -> Result<u16, EngineError> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// A private PostgreSQL server: `initdb` in a temporary directory, listening on
/// 127.0.0.1 only, trust authentication for the `hatchery` role, `fsync=off` (a test
/// server: a crash of PostgreSQL loses nothing committed, a crash of the machine could). Stopped (immediate shutdown) and removed on drop.
pub struct PostgresServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
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
    /// Creates and starts a server (about a second).
    pub fn start() -> Result<PostgresServer, EngineError> {
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
            port: free_port()?,
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
        server.run()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
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
            .args(["-c", "listen_addresses=127.0.0.1"])
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
            if self.accepts() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::Failed {
                    what: "postgres did not accept connections within 30 s".into(),
                    log: self.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server answers (`pg_isready`).
    fn accepts(&self) -> bool {
        TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok()
            && self
                .command("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-U", "hatchery", "-d", "postgres"])
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

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's directory (data, socket, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The URL of database `db` as the `hatchery` role.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://hatchery@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a fresh database and returns its URL.
    pub fn create_database(&self, db: &str) -> Result<String, EngineError> {
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-U", "hatchery"])
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

/// A private Redis server: no persistence (a test server), listening on 127.0.0.1 only,
/// its files in a temporary directory. Stopped and removed on drop.
pub struct RedisServer {
    dir: tempfile::TempDir,
    port: u16,
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
    pub fn start() -> Result<RedisServer, EngineError> {
        if redis_server_bin().is_none() {
            return Err(EngineError::RedisMissing);
        }
        let dir = tempfile::Builder::new()
            .prefix("hatchery-redis.")
            .tempdir()
            .map_err(io("creating the server's directory"))?;
        let mut server = RedisServer {
            dir,
            port: free_port()?,
            child: None,
        };
        server.run()?;
        Ok(server)
    }

    fn run(&mut self) -> Result<(), EngineError> {
        let bin = redis_server_bin().ok_or(EngineError::RedisMissing)?;
        let log = self.dir.path().join("server.log");
        let child = Command::new(bin)
            .env_clear()
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
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
            if self.pings() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::Failed {
                    what: "redis-server did not answer within 30 s".into(),
                    log: std::fs::read_to_string(&log).unwrap_or_default(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers PING (a raw RESP exchange: no client needed).
    fn pings(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)) else {
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

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
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

/// A private AWS emulator (moto's server: S3, EC2 Auto Scaling, ...) on a loopback port.
/// It accepts any credentials. Stopped on drop.
pub struct MotoServer {
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
    pub fn start() -> Result<MotoServer, EngineError> {
        let bin = moto_server_bin().ok_or(EngineError::MotoMissing)?;
        let log = tempfile::NamedTempFile::new().map_err(io("creating moto's log"))?;
        let port = free_port()?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.reopen().map_err(io("opening moto's log"))?)
            .stderr(log.reopen().map_err(io("opening moto's log"))?)
            .spawn()
            .map_err(io("starting moto_server"))?;
        let mut server = MotoServer {
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
            if server.request("GET", "/").is_ok_and(|s| s < 500) {
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
        let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        std::str::from_utf8(&head[9..12])
            .ok()
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("not an HTTP response"))
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
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
