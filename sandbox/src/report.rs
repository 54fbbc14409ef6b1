//! The outcome of one sandboxed run, as written by `sandbox run --report`, and the rules
//! that turn it into the `sandbox` binary's exit code.

use serde::Serialize;

use crate::cgroup::CgroupVersion;
use crate::limits::Limits;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The command exited on its own; `exit_code` says how.
    Exited,
    /// The command was killed by a signal it did not get from the runtime.
    Signaled,
    /// The kernel's OOM killer ended the command at the memory limit.
    OomKilled,
    /// The wall-clock limit expired; the runtime killed the whole tree.
    TimedOut,
    /// stdout or stderr went past the output limit; the runtime killed the whole tree.
    OutputLimit,
    /// The sandbox could not be set up, or the command could not be started.
    SetupError,
}

/// Exit codes of `sandbox run` for outcomes other than a normal exit.
pub mod exit_codes {
    pub const OUTPUT_LIMIT: i32 = 122;
    /// `sandbox eval`: the sandbox broke its protocol with the pool and was killed.
    pub const PROTOCOL_VIOLATION: i32 = 123;
    pub const TIMED_OUT: i32 = 124;
    pub const SETUP_ERROR: i32 = 125;
    pub const NOT_EXECUTABLE: i32 = 126;
    pub const NOT_FOUND: i32 = 127;
    pub const OOM_KILLED: i32 = 137;
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The run's id (also the name of its cgroup).
    pub id: String,
    pub status: Status,
    /// The command's exit code when it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the command, when one did.
    pub signal: Option<i32>,
    /// From the release of the sandbox to the end of the command.
    pub wall_time_ms: f64,
    pub user_cpu_ms: f64,
    pub system_cpu_ms: f64,
    pub peak_memory_bytes: u64,
    /// Processes the OOM killer ended (a child may be killed while the command survives).
    pub oom_kills: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// What went wrong, for `setup_error` (and a note for other abnormal ends).
    pub error: Option<String>,
    pub cgroup_version: CgroupVersion,
    /// The cgroup directories the run used (all removed by the time the report is written).
    pub cgroup: Vec<String>,
    pub limits: Limits,
    pub timeout_ms: Option<u64>,
    pub output_limit_bytes: u64,
}

impl Report {
    /// The exit code of `sandbox run`: the command's own code when it exited; 128+signal
    /// when a signal ended it; otherwise one of [`exit_codes`].
    pub fn exit_code(&self) -> i32 {
        match self.status {
            Status::Exited => self.exit_code.unwrap_or(0),
            Status::Signaled => 128 + self.signal.unwrap_or(0),
            Status::OomKilled => exit_codes::OOM_KILLED,
            Status::TimedOut => exit_codes::TIMED_OUT,
            Status::OutputLimit => exit_codes::OUTPUT_LIMIT,
            Status::SetupError => self.exit_code.unwrap_or(exit_codes::SETUP_ERROR),
        }
    }
}
