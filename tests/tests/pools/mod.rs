//! The warm-pool test harness shared by the pool suite and the hostile-channel suite:
//! a cgroup parent per test (so tests run in parallel and each checks that nothing of its
//! own pool is left), pools started on it, and finished executions with helpers to read
//! them.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hatchery_sandbox::pool::{Event, ExecRequest, ExecResult, ExecStatus, Pool, PoolConfig};
use hatchery_sandbox::zygote::server::Language;
use hatchery_tests::{host_processes_with, require_root, rootfs, target_profile_dir};

// ---------------------------------------------------------------------------------------
// A cgroup parent per test

/// `hatchery/pooltest-<pid>-<n>`: the cgroup parent of one test's pool. Exactly three
/// dash-separated parts, so `sandbox gc` of the default parent never mistakes it for a
/// sandbox of a dead owner. Removed on drop (after killing whatever a failed test left).
pub struct CgroupParent {
    pub rel: String,
}

impl CgroupParent {
    pub fn new() -> CgroupParent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        CgroupParent {
            rel: format!("hatchery/pooltest-{}-{n}", std::process::id()),
        }
    }

    /// The parent's directory in every hierarchy where it exists.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let root = Path::new("/sys/fs/cgroup");
        let mut out = vec![root.join(&self.rel)];
        if let Ok(entries) = std::fs::read_dir(root) {
            for e in entries.flatten() {
                out.push(e.path().join(&self.rel));
            }
        }
        out.retain(|p| p.is_dir());
        out
    }

    /// Names of the cgroups under the parent, in any hierarchy.
    pub fn children(&self) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        for dir in self.dirs() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    names.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        names
    }

    /// Whether cgroup `name` exists under the parent in any hierarchy.
    pub fn has_child(&self, name: &str) -> bool {
        self.dirs().iter().any(|d| d.join(name).exists())
    }

    /// Host processes inside a cgroup under the parent: (pid, cgroup path, command line).
    pub fn processes(&self) -> Vec<(u32, String, String)> {
        let needle = format!(":/{}/", self.rel);
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cgroups) = std::fs::read_to_string(e.path().join("cgroup")) else {
                continue;
            };
            let Some(line) = cgroups.lines().find(|l| l.contains(&needle)) else {
                continue;
            };
            let path = line.splitn(3, ':').nth(2).unwrap_or_default().to_string();
            let cmdline = std::fs::read(e.path().join("cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .unwrap_or_default();
            found.push((pid, path, cmdline.trim_end().to_string()));
        }
        found
    }

    /// Host processes whose command line names the parent (the zygote's launcher) as a
    /// whole argument: `pooltest-<pid>-1` must not match the launchers of
    /// `pooltest-<pid>-10`, a pool another test of this binary runs meanwhile.
    pub fn launchers(&self) -> Vec<(u32, String)> {
        host_processes_with(&self.rel)
            .into_iter()
            .filter(|(_, cmdline)| cmdline.split(' ').any(|arg| arg == self.rel))
            .collect()
    }

    /// Asserts that nothing of the pool is left: no cgroup under the parent, no process in
    /// one, no launcher.
    pub fn assert_empty(&self, context: &str) {
        let children = self.children();
        let processes = self.processes();
        let launchers = self.launchers();
        assert!(
            children.is_empty() && processes.is_empty() && launchers.is_empty(),
            "{context}: left behind under {}:\ncgroups: {children:?}\nprocesses: {processes:#?}\n\
             launchers: {launchers:#?}",
            self.rel
        );
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        // Only a failed test leaves something here; everything in these cgroups was
        // started by this test's pool.
        for name in self.children() {
            for dir in self.dirs() {
                let _ = std::fs::write(dir.join(&name).join("freezer.state"), "THAWED");
                let _ = std::fs::write(dir.join(&name).join("cgroup.freeze"), "0");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() >= deadline {
                break;
            }
            for (pid, _, _) in left {
                // SAFETY: kill has no memory-safety preconditions; the pid is in a cgroup
                // this test created.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for name in self.children() {
            for dir in self.dirs() {
                let _ = std::fs::remove_dir(dir.join(&name));
            }
        }
        for dir in self.dirs() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pools and executions

/// A pool and its own cgroup parent. Fields drop in order: the pool first.
pub struct TestPool {
    pub pool: Pool,
    pub cgroups: CgroupParent,
}

pub fn config(language: Language, size: usize, cgroups: &CgroupParent) -> PoolConfig {
    let mut cfg = PoolConfig::new(language, rootfs());
    // PoolConfig::new looks next to the running binary: target/<profile>/deps for a test.
    cfg.sandbox_bin = target_profile_dir().join("sandbox");
    cfg.zygote_bin = target_profile_dir().join("hatchery-zygote");
    for bin in [&cfg.sandbox_bin, &cfg.zygote_bin] {
        assert!(
            bin.is_file(),
            "{} is missing: run `cargo build -p hatchery-sandbox --bins` (same profile)",
            bin.display()
        );
    }
    cfg.size = size;
    cfg.cgroup_parent = cgroups.rel.clone();
    // Generous: under software emulation (the cgroup v2 VM) a starved guest CPU can
    // stall a zygote's start for tens of seconds; these suites are not about start time.
    cfg.start_timeout = Duration::from_secs(180);
    cfg.claim_timeout = Duration::from_secs(60);
    cfg
}

pub fn start_pool(language: Language, size: usize) -> TestPool {
    start_pool_with(language, size, |_| {})
}

/// A pool like [`start_pool`]'s, its configuration changed by `tweak` first.
pub fn start_pool_with(
    language: Language,
    size: usize,
    tweak: impl FnOnce(&mut PoolConfig),
) -> TestPool {
    require_root();
    let cgroups = CgroupParent::new();
    let mut cfg = config(language, size, &cgroups);
    tweak(&mut cfg);
    let pool = Pool::start(cfg).expect("start the pool");
    if let Err(e) = pool.wait_ready(size, Duration::from_secs(240)) {
        panic!(
            "the pool did not get {size} sandboxes ready: {e}\nstats: {:?}",
            pool.stats()
        );
    }
    TestPool { pool, cgroups }
}

/// An R pool preloading `stats` only.
pub fn r_pool(size: usize) -> TestPool {
    r_pool_with(size, |_| {})
}

/// An R pool like [`r_pool`]'s, its configuration changed by `tweak` first.
pub fn r_pool_with(size: usize, tweak: impl FnOnce(&mut PoolConfig)) -> TestPool {
    start_pool_with(
        Language::R {
            packages: vec!["stats".into()],
        },
        size,
        tweak,
    )
}

/// A Python pool preloading numpy and pandas.
pub fn python_pool(size: usize) -> TestPool {
    start_pool(
        Language::Python {
            packages: vec!["numpy".into(), "pandas".into()],
        },
        size,
    )
}

pub fn bash_pool(size: usize) -> TestPool {
    start_pool(
        Language::Exec {
            name: "bash".into(),
            argv: vec!["bash".into(), "-c".into()],
        },
        size,
    )
}

/// A request with a generous time limit (so a hang fails the test instead of blocking).
pub fn request(code: &str) -> ExecRequest {
    let mut req = ExecRequest::new(code);
    req.timeout = Some(Duration::from_secs(60));
    req
}

/// One finished execution.
pub struct Ran {
    pub events: Vec<Event>,
    pub result: ExecResult,
}

impl Ran {
    pub fn stdout(&self) -> String {
        self.stream(true)
    }

    pub fn stderr(&self) -> String {
        self.stream(false)
    }

    /// Every byte of stdout, exactly.
    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.stream_bytes(true)
    }

    pub fn stream(&self, stdout: bool) -> String {
        String::from_utf8_lossy(&self.stream_bytes(stdout)).into_owned()
    }

    fn stream_bytes(&self, stdout: bool) -> Vec<u8> {
        let mut bytes = Vec::new();
        for e in &self.events {
            match e {
                Event::Stdout { data } if stdout => bytes.extend_from_slice(data),
                Event::Stderr { data } if !stdout => bytes.extend_from_slice(data),
                _ => {}
            }
        }
        bytes
    }

    pub fn value(&self) -> serde_json::Value {
        let text = self
            .result
            .outcome
            .value_json
            .as_deref()
            .unwrap_or_else(|| panic!("no value_json\n{}", self.describe()));
        serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("value_json is not JSON ({e}): {text}\n{}", self.describe()))
    }

    /// Everything about the execution, for assertion messages (long output shortened).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            if matches!(e, Event::Finished(_)) {
                continue;
            }
            let mut line = serde_json::to_string(e).unwrap_or_default();
            if line.len() > 600 {
                let mut cut = 600;
                while !line.is_char_boundary(cut) {
                    cut -= 1;
                }
                line.truncate(cut);
                line.push('…');
            }
            out.push_str(&line);
            out.push('\n');
        }
        let result = serde_json::to_string_pretty(&self.result).unwrap_or_default();
        format!("events:\n{out}result: {result}")
    }

    pub fn assert_status(&self, status: ExecStatus) {
        assert_eq!(
            self.result.status,
            status,
            "unexpected status\n{}",
            self.describe()
        );
    }
}

impl TestPool {
    /// Claims, runs to the end, and checks that the execution's cgroup is gone.
    pub fn run(&self, req: ExecRequest) -> Ran {
        let exec = self.pool.claim(req).expect("claim a sandbox");
        self.finish_execution(exec.wait())
    }

    pub fn run_code(&self, code: &str) -> Ran {
        self.run(request(code))
    }

    pub fn finish_execution(&self, (events, result): (Vec<Event>, ExecResult)) -> Ran {
        let ran = Ran { events, result };
        let name = sandbox_cgroup_name(&ran.result);
        assert!(
            !self.cgroups.has_child(name),
            "the cgroup {name} of a finished execution still exists\n{}",
            ran.describe()
        );
        ran
    }

    /// Shuts the pool down and asserts that nothing of it is left on the host.
    pub fn finish(mut self) {
        self.pool.shutdown();
        self.cgroups.assert_empty("after the pool was shut down");
    }
}

/// The cgroup of an execution: its id is `<sandbox cgroup name>-<n>`.
pub fn sandbox_cgroup_name(result: &ExecResult) -> &str {
    result
        .id
        .rsplit_once('-')
        .map(|(name, _)| name)
        .unwrap_or(&result.id)
}

pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pool's processes with their state and kernel wait channel, for messages.
pub fn describe_processes(cgroups: &CgroupParent) -> String {
    let mut out = String::new();
    for (pid, cgroup, cmdline) in cgroups.processes() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        let mut cmd = cmdline;
        cmd.truncate(60);
        out.push_str(&format!(
            "\n  {pid} state={state} wchan={wchan} {cgroup} {cmd}"
        ));
    }
    if out.is_empty() {
        out.push_str("none");
    }
    out
}
