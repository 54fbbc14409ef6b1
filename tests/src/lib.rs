//! Shared helpers for Hatchery's integration tests: finding the `sandbox` binary and the
//! root filesystem, running `sandbox run` and reading its report, host canaries and
//! host-side facts (hostname, own address), and the cleanup check every run must pass.
//!
//! These helpers never skip: a missing binary, rootfs or root privilege is a panic that
//! says how to fix it, so a green run always means the tests really ran.

use std::ffi::OsString;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Default location of the R root filesystem built by `rootfs-builder`.
pub const DEFAULT_ROOTFS: &str = "/var/lib/hatchery/rootfs/r";

/// Panics unless the tests run as root (they create namespaces, cgroups and mounts).
pub fn require_root() {
    // SAFETY: geteuid cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the hatchery integration tests must run as root (euid is {euid}): \
         run them with sudo or in the root CI container"
    );
}

/// `target/<profile>`, derived from the running test binary (`target/<profile>/deps/…`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test binary has a parent directory");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// The `sandbox` binary: `$HATCHERY_SANDBOX_BIN`, or `target/<profile>/sandbox`.
pub fn sandbox_bin() -> PathBuf {
    let path = std::env::var_os("HATCHERY_SANDBOX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_profile_dir().join("sandbox"));
    assert!(
        path.is_file(),
        "the sandbox binary {} does not exist: build it with `cargo build -p hatchery-sandbox` \
         (same profile as the tests), run `cargo test --workspace`, or point \
         HATCHERY_SANDBOX_BIN at it",
        path.display()
    );
    path
}

/// The R root filesystem: `$HATCHERY_ROOTFS`, or [`DEFAULT_ROOTFS`].
pub fn rootfs() -> PathBuf {
    let path = std::env::var_os("HATCHERY_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOTFS));
    assert!(
        path.join("usr").is_dir(),
        "the sandbox root filesystem {} is missing: build it with \
         `cargo run -p rootfs-builder --release -- build rootfs-builder/manifests/r.toml` \
         (or set HATCHERY_ROOTFS to an existing one)",
        path.display()
    );
    path
}

/// The JSON report written by `sandbox run --report`.
#[derive(Debug, Clone, Deserialize)]
pub struct Report {
    /// The run's id (also the name of its cgroup), when the runtime reports it.
    #[serde(default)]
    pub id: Option<String>,
    /// "exited" | "signaled" | "oom_killed" | "timed_out" | "output_limit" | "setup_error".
    pub status: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub wall_time_ms: f64,
    pub user_cpu_ms: f64,
    pub system_cpu_ms: f64,
    pub peak_memory_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<String>,
    /// The cgroup directories the run used; all must be gone after the run.
    #[serde(default, deserialize_with = "string_or_list")]
    pub cgroup: Vec<String>,
}

fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
        Null(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
        OneOrMany::Null(()) => Vec::new(),
    })
}

/// A finished `sandbox run`.
#[derive(Debug)]
pub struct Run {
    /// Exit code of the `sandbox` process (None when a signal ended it).
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The parsed report (None when the runtime wrote none or an unreadable one).
    pub report: Option<Report>,
    /// The report's raw text, for messages.
    pub report_text: String,
    /// The command line that was run, for messages.
    pub command_line: String,
}

impl Run {
    /// The report; panics with the whole run when there is none.
    pub fn report(&self) -> &Report {
        match &self.report {
            Some(r) => r,
            None => panic!("sandbox wrote no readable report\n{}", self.describe()),
        }
    }

    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nsandbox exit code: {:?}\nstdout: {:?}\nstderr: {}\nreport: {}",
            self.command_line,
            self.exit_code,
            self.stdout,
            self.stderr.trim_end(),
            self.report_text.trim_end()
        )
    }

    /// Asserts the run ended with `status` and the `sandbox` binary's matching exit code.
    pub fn assert_status(&self, status: &str, exit_code: i32) {
        let report = self.report();
        assert_eq!(
            report.status,
            status,
            "unexpected status\n{}",
            self.describe()
        );
        assert_eq!(
            self.exit_code,
            Some(exit_code),
            "unexpected sandbox exit code\n{}",
            self.describe()
        );
    }

    /// Asserts that nothing of the run is left on the host: every cgroup directory the
    /// report names is gone, and no directory named after the run's id remains under any
    /// hierarchy's `hatchery/` parent.
    pub fn assert_cleaned_up(&self) {
        let report = self.report();
        assert!(
            !report.cgroup.is_empty() || report.id.is_some(),
            "the report names neither the run's cgroups nor its id: cannot check cleanup\n{}",
            self.describe()
        );
        let mut leftovers = Vec::new();
        for dir in &report.cgroup {
            let path = if Path::new(dir).is_absolute() {
                PathBuf::from(dir)
            } else {
                Path::new("/sys/fs/cgroup").join(dir)
            };
            if path.exists() {
                leftovers.push(path);
            }
        }
        if let Some(id) = &report.id {
            for parent in cgroup_parents() {
                let Ok(entries) = std::fs::read_dir(&parent) else {
                    continue;
                };
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().contains(id.as_str()) {
                        leftovers.push(e.path());
                    }
                }
            }
        }
        assert!(
            leftovers.is_empty(),
            "cgroups left behind after the run: {leftovers:?}\n{}",
            self.describe()
        );
    }
}

/// Sandboxes under the cgroup parent `parent` (relative to the cgroup roots) that run
/// code claimed with a memory limit of `memory` bytes: thawed, with processes in them.
/// Pooled sandboxes wait frozen, and one warming up for the pool has the pool's limits.
pub fn live_sandboxes(parent: &str, memory: u64) -> usize {
    use hatchery_sandbox::cgroup::{CgroupRoot, CgroupVersion};
    let Ok(root) = CgroupRoot::detect(parent) else {
        return 0;
    };
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    root.children()
        .iter()
        .filter_map(|name| root.open(name).ok())
        .filter(|cg| {
            let (limit, thawed) = match cg.version() {
                CgroupVersion::V1 => (
                    read(cg.dir("memory").join("memory.limit_in_bytes")),
                    read(cg.dir("freezer").join("freezer.state")).trim() == "THAWED",
                ),
                CgroupVersion::V2 => (
                    read(cg.dir("memory").join("memory.max")),
                    read(cg.dir("memory").join("cgroup.freeze")).trim() == "0",
                ),
            };
            limit.trim() == memory.to_string() && thawed && !cg.is_empty()
        })
        .count()
}

/// Every `hatchery/` parent cgroup directory on this host (v2 root, v2 under
/// `unified/`, and one per v1 hierarchy).
pub fn cgroup_parents() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut out = vec![root.join("hatchery")];
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            out.push(e.path().join("hatchery"));
        }
    }
    out.retain(|p| p.is_dir());
    out
}

/// A `sandbox run` invocation under construction.
#[derive(Debug, Clone)]
pub struct Sandbox {
    options: Vec<OsString>,
    host_env: Vec<(String, String)>,
    watchdog: Duration,
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Sandbox {
    /// `sandbox run --rootfs <rootfs>`; panics unless root, the binary and the rootfs exist.
    pub fn new() -> Self {
        require_root();
        let _ = sandbox_bin();
        let mut options: Vec<OsString> = vec!["--rootfs".into()];
        options.push(rootfs().into_os_string());
        Sandbox {
            options,
            host_env: Vec::new(),
            watchdog: Duration::from_secs(120),
        }
    }

    /// Adds raw options before the `--`.
    pub fn option(mut self, opt: impl Into<OsString>) -> Self {
        self.options.push(opt.into());
        self
    }

    fn pair(self, name: &str, value: impl Into<OsString>) -> Self {
        self.option(name).option(value)
    }

    /// `--userns` when `on`.
    pub fn userns(self, on: bool) -> Self {
        if on {
            self.option("--userns")
        } else {
            self
        }
    }

    pub fn memory(self, size: &str) -> Self {
        self.pair("--memory", size)
    }

    pub fn cpus(self, cpus: &str) -> Self {
        self.pair("--cpus", cpus)
    }

    pub fn pids(self, n: u32) -> Self {
        self.pair("--pids", n.to_string())
    }

    pub fn timeout(self, t: &str) -> Self {
        self.pair("--timeout", t)
    }

    pub fn output_limit(self, size: &str) -> Self {
        self.pair("--output-limit", size)
    }

    pub fn tmp_size(self, size: &str) -> Self {
        self.pair("--tmp-size", size)
    }

    pub fn work_size(self, size: &str) -> Self {
        self.pair("--work-size", size)
    }

    pub fn hostname(self, name: &str) -> Self {
        self.pair("--hostname", name)
    }

    /// `--env KEY=VALUE`: a variable the command sees.
    pub fn env(self, key: &str, value: &str) -> Self {
        self.pair("--env", format!("{key}={value}"))
    }

    /// A variable set on the `sandbox` process itself (the command must NOT see it).
    pub fn host_env(mut self, key: &str, value: &str) -> Self {
        self.host_env.push((key.into(), value.into()));
        self
    }

    /// `--ro-bind HOST:INSIDE`.
    pub fn ro_bind(self, host: &Path, inside: &str) -> Self {
        let mut spec = host.as_os_str().to_os_string();
        spec.push(":");
        spec.push(inside);
        self.pair("--ro-bind", spec)
    }

    /// How long the host waits for `sandbox` before killing it and failing the test.
    pub fn watchdog(mut self, d: Duration) -> Self {
        self.watchdog = d;
        self
    }

    /// Runs `sandbox run [options] --report <tmp> -- command...` to completion.
    pub fn run<I, S>(&self, command: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let dir = tempfile::tempdir().expect("tempdir for the report");
        let report_path = dir.path().join("report.json");
        let mut cmd = Command::new(sandbox_bin());
        cmd.arg("run")
            .args(&self.options)
            .arg("--report")
            .arg(&report_path)
            .arg("--")
            .args(command.into_iter().map(Into::into))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.host_env {
            cmd.env(k, v);
        }
        let command_line = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command_line}: {e}"));
        let stdout = reader(child.stdout.take().expect("piped stdout"));
        let stderr = reader(child.stderr.take().expect("piped stderr"));
        let status = wait_with_deadline(&mut child, self.watchdog).unwrap_or_else(|| {
            panic!(
                "sandbox did not finish within {:?}; killed it: {command_line}",
                self.watchdog
            )
        });
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        let report_text = std::fs::read_to_string(&report_path).unwrap_or_default();
        let report = serde_json::from_str(&report_text).ok();
        Run {
            exit_code: status.code(),
            stdout,
            stderr,
            report,
            report_text,
            command_line,
        }
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child`, killing it (it is ours) when `limit` passes.
fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A host process (`sleep`) that an attack must not be able to kill; killed on drop.
pub struct Canary {
    child: Child,
}

impl Canary {
    pub fn start() -> Canary {
        let child = Command::new("sleep")
            .arg("600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the canary `sleep`");
        Canary { child }
    }

    /// The canary's host pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the canary still runs (not exited, not a zombie).
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn assert_alive(&mut self, context: &str) {
        assert!(
            self.is_alive(),
            "the host canary (pid {}) died: {context}",
            self.pid()
        );
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's hostname (uname nodename).
pub fn host_hostname() -> String {
    nix::unistd::gethostname()
        .expect("gethostname")
        .to_string_lossy()
        .into_owned()
}

/// The IPv4 address of the host's default-route interface (read from /proc/net/route and
/// the interface addresses; no packet is sent). Falls back to any non-loopback address.
pub fn host_ipv4() -> Option<Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let default_iface = routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    });
    let mut fallback = None;
    for ifa in nix::ifaddrs::getifaddrs().ok()? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else {
            continue;
        };
        let ip = addr.ip();
        if ip.is_loopback() {
            continue;
        }
        if default_iface.as_deref() == Some(ifa.interface_name.as_str()) {
            return Some(ip);
        }
        fallback.get_or_insert(ip);
    }
    fallback
}

/// A file that exists only on the host (in a host temp directory the sandbox never sees).
pub struct HostMarker {
    dir: tempfile::TempDir,
}

impl HostMarker {
    pub fn create() -> HostMarker {
        let dir = tempfile::Builder::new()
            .prefix("hatchery-host-marker")
            .tempdir()
            .expect("marker tempdir");
        std::fs::write(dir.path().join("marker"), b"host").expect("write marker");
        HostMarker { dir }
    }

    /// Absolute host path of the marker file.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("marker")
    }
}

/// Host processes whose command line contains `token` (pid, command line).
pub fn host_processes_with(token: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(token) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// A token unique to this process and call, for finding processes on the host.
pub fn unique_token(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// The hostile native library (`tests/hostile/hostile.c`), compiled once per test process
/// with the host's `gcc`: attacks by the process that holds a pooled sandbox's channel,
/// which user R code writes to `/tmp` and `dyn.load`s.
pub fn hostile_library() -> &'static [u8] {
    static LIB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LIB.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("hostile/hostile.c");
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("hostile.so");
        let status = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O2", "-s", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("gcc (setup-deps installs it) compiles the hostile library");
        assert!(status.success(), "gcc failed on {}", src.display());
        std::fs::read(&out).expect("read the compiled library")
    })
}

/// R code that writes the hostile library to `/tmp/hostile.so` and loads it (its
/// functions are then called with `.C("name", ...)`).
pub fn r_load_hostile() -> String {
    format!(
        "writeBin(jsonlite::base64_dec(\"{}\"), \"/tmp/hostile.so\")\n\
         invisible(dyn.load(\"/tmp/hostile.so\"))\n",
        base64(hostile_library())
    )
}

/// Standard base64 (with padding).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Records that `test` did not run here, and why: on stderr and, when
/// `HATCHERY_SKIP_LOG` names a file, as a line in it (the test scripts count these lines
/// and print them at the end of the run, so a skip is never silent). Panics instead when
/// `required` is set in the environment (e.g. `HATCHERY_REQUIRE_CGROUP_V2` in the VM,
/// where the test must run).
pub fn skip(test: &str, reason: &str, required: &str) {
    assert!(
        std::env::var_os(required).is_none(),
        "{test}: {required} is set, but {reason}"
    );
    eprintln!("skipped {test}: {reason}");
    if let Some(path) = std::env::var_os("HATCHERY_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write(2) of the whole line: O_APPEND keeps lines of tests running at
            // once from interleaving (writeln! would write the pieces separately).
            let _ = f.write_all(format!("{test}: {reason}\n").as_bytes());
        }
    }
}
