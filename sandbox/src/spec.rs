//! What a sandbox runs and how it is confined: the part of a run that does not depend on
//! the host (the supervisor's options live in [`crate::run::RunOptions`]).

use std::path::PathBuf;

use serde::Serialize;

/// Inside-the-sandbox uid and gid of the command by default (`nobody`/`nogroup`).
pub const DEFAULT_UID: u32 = 65534;
pub const DEFAULT_GID: u32 = 65534;
/// First host uid/gid of the range a user namespace maps `0..65536` to.
pub const DEFAULT_USERNS_BASE: u32 = 1_000_000;
pub const USERNS_RANGE: u32 = 65536;
/// The uids (and gids) pooled sandboxes run user code as, inside the zygote's user
/// namespace: one per sandbox in turn (host uids `userns_base + uid`).
pub const SANDBOX_UID_FIRST: u32 = 10_000;
pub const SANDBOX_UID_COUNT: u32 = 50_000;

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
pub const WORK_DIR: &str = "/work";
/// Where code leaves files to be returned as artifacts (made empty in every sandbox,
/// writable by its code).
pub const OUTPUT_DIR: &str = "/work/out";
/// Where graphics go: one PNG file per page, returned as artifacts (`plot-001.png`, ...);
/// made by the first plot.
pub const PLOT_DIR: &str = "/tmp/.hatchery-plots";

/// A host path mounted read-only (and nosuid, nodev) inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bind {
    pub source: PathBuf,
    pub target: PathBuf,
}

impl std::str::FromStr for Bind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (src, dst) = s
            .split_once(':')
            .ok_or_else(|| format!("expected HOST_PATH:SANDBOX_PATH, got {s:?}"))?;
        if src.is_empty() || !dst.starts_with('/') {
            return Err(format!(
                "expected HOST_PATH:/ABSOLUTE/SANDBOX_PATH, got {s:?}"
            ));
        }
        Ok(Bind {
            source: PathBuf::from(src),
            target: PathBuf::from(dst),
        })
    }
}

/// Resource limits enforced with rlimits inside the sandbox. Every one is set
/// explicitly (nothing is inherited from whoever started Hatchery); besides these, core
/// dumps, real-time priority and raising the scheduling priority are always refused
/// (RLIMIT_CORE, RLIMIT_RTPRIO and RLIMIT_NICE are 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimits {
    /// Largest file a process may write (RLIMIT_FSIZE).
    pub file_size: u64,
    /// Open file descriptors per process (RLIMIT_NOFILE).
    pub open_files: u64,
    /// Processes and threads of the sandbox's uid (RLIMIT_NPROC). The cgroup's pids limit
    /// is the real bound; this one holds even where a uid is shared.
    pub processes: u64,
    /// Bytes of memory that may be locked (RLIMIT_MEMLOCK).
    pub locked_memory: u64,
    /// Bytes of POSIX message queues of the sandbox's uid (RLIMIT_MSGQUEUE).
    pub message_queues: u64,
    /// Queued signals of the sandbox's uid (RLIMIT_SIGPENDING).
    pub pending_signals: u64,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            file_size: 256 << 20,
            open_files: 1024,
            processes: 4096,
            locked_memory: 64 << 10,
            message_queues: 64 << 10,
            pending_signals: 1024,
        }
    }
}

/// Everything about the inside of one sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxSpec {
    /// Root filesystem image (read-only lower layer).
    pub rootfs: PathBuf,
    /// argv of the command; `command[0]` is looked up in the sandbox's `PATH` when it has
    /// no slash.
    pub command: Vec<String>,
    /// The complete environment of the command.
    pub env: Vec<(String, String)>,
    pub binds: Vec<Bind>,
    pub hostname: String,
    /// uid/gid of the command, as seen inside the sandbox.
    pub uid: u32,
    pub gid: u32,
    /// With a user namespace: the host uid/gid that inside-uid 0 maps to.
    pub userns_base: Option<u32>,
    pub tmp_size: u64,
    pub work_size: u64,
    pub rlimits: Rlimits,
    /// With a user namespace: run the command as root *of that namespace*, keeping its
    /// capabilities there (none on the host). Used by the zygote, which must create
    /// namespaces for the sandboxes it forks; never for user code.
    pub userns_root: bool,
    /// Descriptors inherited from the caller that the command keeps, at the same numbers
    /// (everything else above 2 is closed on exec).
    pub pass_fds: Vec<i32>,
    /// With a user namespace: per-namespace limits written into `/proc/sys/user/` of the
    /// new namespace (e.g. `max_inotify_instances`, which then caps each uid of the
    /// namespace on its own), as `(name, value)` without the `user.` prefix.
    pub userns_sysctls: Vec<(String, u64)>,
    /// Stay in the caller's cgroup namespace instead of one rooted at the sandbox's own
    /// cgroup. For the zygote on cgroup v2 only, so that the sandboxes it forks can be
    /// born in their cgroups (siblings of its own, which a namespace rooted at its own
    /// would hide); never for user code, and each forked sandbox enters a namespace of
    /// its own.
    pub keep_cgroup_namespace: bool,
}

impl SandboxSpec {
    pub fn new(rootfs: PathBuf, command: Vec<String>) -> SandboxSpec {
        SandboxSpec {
            rootfs,
            command,
            env: default_env(),
            binds: Vec::new(),
            hostname: "sandbox".to_string(),
            uid: DEFAULT_UID,
            gid: DEFAULT_GID,
            userns_base: None,
            tmp_size: 64 << 20,
            work_size: 64 << 20,
            rlimits: Rlimits::default(),
            userns_root: false,
            pass_fds: Vec::new(),
            userns_sysctls: Vec::new(),
            keep_cgroup_namespace: false,
        }
    }

    /// Sets (or replaces) one environment variable.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }
}

/// The environment every command starts from: nothing of the host's.
/// Thread counts pinned to one for every zygote, in its environment from its start and
/// again by an embedded interpreter's init: a zygote forks with no thread but its own (a
/// child would inherit the other threads' locks without the threads), and numeric
/// libraries (OpenBLAS reads its count in a library constructor, before `main`) must not
/// start pools.
pub const SINGLE_THREAD_ENV: [(&str, &str); 5] = [
    ("OMP_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("GOTO_NUM_THREADS", "1"),
    ("NUMEXPR_NUM_THREADS", "1"),
];

pub fn default_env() -> Vec<(String, String)> {
    [
        ("PATH", DEFAULT_PATH),
        ("HOME", WORK_DIR),
        ("TMPDIR", "/tmp"),
        ("LANG", "C.UTF-8"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_parse() {
        let b: Bind = "/usr/bin/x:/opt/x".parse().unwrap();
        assert_eq!(b.source, PathBuf::from("/usr/bin/x"));
        assert_eq!(b.target, PathBuf::from("/opt/x"));
        assert!("/a".parse::<Bind>().is_err());
        assert!("/a:relative".parse::<Bind>().is_err());
    }

    #[test]
    fn env_replaces() {
        let mut s = SandboxSpec::new("/r".into(), vec!["true".into()]);
        s.set_env("PATH", "/bin");
        assert_eq!(s.env.iter().filter(|(k, _)| k == "PATH").count(), 1);
        assert!(s.env.contains(&("PATH".into(), "/bin".into())));
    }
}
