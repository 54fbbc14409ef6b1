//! Wire types shared by the api, the scheduler and the agents: who asks, what they may
//! use, what an execution is, and what it reports. Everything here is plain data
//! (serde), the same in the embedded single-process mode and over Redis.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    OrgAdmin,
    Superadmin,
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub org: String,
    pub user: String,
    pub role: Role,
}

impl Principal {
    /// May this caller read or cancel an execution owned by `org`/`user`? Owners, admins
    /// of the owner's org, and superadmins may.
    pub fn may_access(&self, org: &str, user: &str) -> bool {
        match self.role {
            Role::Superadmin => true,
            Role::OrgAdmin => self.org == org,
            Role::User => self.org == org && self.user == user,
        }
    }

    /// May this caller read the policies of `org` and set its users' overrides? Admins
    /// of `org` and superadmins may (an org admin's overrides stay within the org's
    /// policy: see [`crate::policy::check_within_org`]).
    pub fn may_administer(&self, org: &str) -> bool {
        match self.role {
            Role::Superadmin => true,
            Role::OrgAdmin => self.org == org,
            Role::User => false,
        }
    }

    /// May this caller set an org's policy (R3)? Only a superadmin: an org admin must
    /// not raise its own org's limits.
    pub fn may_set_org_policy(&self) -> bool {
        self.role == Role::Superadmin
    }
}

/// Resource policy. Every field is optional: a user override ▷ org policy ▷ platform
/// default, field by field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub time_limit_ms: Option<u64>,
    /// Executions of one user that may be active (queued or running) at once.
    pub max_parallel: Option<u32>,
    /// Frozen sandboxes kept warm for this org / user.
    pub warm_pool_size: Option<u32>,
    /// Artifacts (plot pages, files left in `/work/out`) one execution may return (0:
    /// none), and their total size.
    pub max_artifacts: Option<u32>,
    pub max_artifact_bytes: Option<u64>,
    /// The host groups this org's (or user's) executions may run on (R5); unset: any. A
    /// user override may only narrow its org's list.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
}

/// A policy with every field resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EffectivePolicy {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: u64,
    pub time_limit_ms: u64,
    pub max_parallel: u32,
    pub warm_pool_size: u32,
    #[serde(default = "default_max_artifacts")]
    pub max_artifacts: u32,
    #[serde(default = "default_max_artifact_bytes")]
    pub max_artifact_bytes: u64,
    /// The host groups its executions may run on; `None`: any.
    #[serde(default)]
    pub groups: Option<Vec<String>>,
}

/// The platform default's artifact count and total size.
pub const DEFAULT_MAX_ARTIFACTS: u32 = 20;
pub const DEFAULT_MAX_ARTIFACT_BYTES: u64 = 16 << 20;

fn default_max_artifacts() -> u32 {
    DEFAULT_MAX_ARTIFACTS
}

fn default_max_artifact_bytes() -> u64 {
    DEFAULT_MAX_ARTIFACT_BYTES
}

impl Default for EffectivePolicy {
    /// The platform default.
    fn default() -> Self {
        EffectivePolicy {
            memory_bytes: 512 << 20,
            cpus: 1.0,
            pids: 128,
            time_limit_ms: 60_000,
            max_parallel: 2,
            warm_pool_size: 2,
            max_artifacts: DEFAULT_MAX_ARTIFACTS,
            max_artifact_bytes: DEFAULT_MAX_ARTIFACT_BYTES,
            groups: None,
        }
    }
}

/// Limits asked for in a request (each at most the caller's effective policy).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestedLimits {
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
    pub time_limit_ms: Option<u64>,
}

/// The limits an execution runs with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpus: f64,
    pub pids: u64,
    pub time_limit_ms: u64,
    /// Artifacts it may return, and their total size (from its policy; absent in
    /// records made before artifacts existed: none).
    #[serde(default)]
    pub max_artifacts: u32,
    #[serde(default)]
    pub max_artifact_bytes: u64,
}

impl Limits {
    /// What the sandbox may send back as artifacts: `None` when its policy allows none.
    pub fn artifacts(&self) -> Option<hatchery_sandbox::pool::ArtifactLimits> {
        (self.max_artifacts > 0 && self.max_artifact_bytes > 0).then_some(
            hatchery_sandbox::pool::ArtifactLimits {
                max_count: self.max_artifacts,
                max_bytes: self.max_artifact_bytes,
            },
        )
    }
}

/// What the autoscaler last saw of a host group (R13), published in the store at each
/// pass so that every API replica, `/metrics` and the monitor show it without scanning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub group: String,
    /// Executions waiting because no live host can take them, counted against it (the
    /// smallest group their policy allows that holds them), and what their limits take.
    pub pending: u32,
    pub pending_need: Resources,
    /// Runs' worth of room kept in it for active users, and what that takes.
    pub reserved: u32,
    pub reserved_need: Resources,
    /// Its hosts taking work (`ready`): its agents split the group's warm demand.
    #[serde(default)]
    pub ready: u32,
    /// Its hosts launched and not reporting yet, and those being removed.
    pub provisioning: u32,
    pub terminating: u32,
    /// When the pass ran (the leading scheduler's clock).
    pub at: Millis,
}

/// What a host is asked to do, kept in the store (an admin's or the autoscaler's word;
/// the host's agent reads it at every heartbeat and keeps it across its restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Takes work.
    #[default]
    Ready,
    /// Takes no new work; what runs goes on, its warm pools stay warm.
    Cordoned,
    /// Takes no new work and empties its warm pools; what runs goes on to its end (R7).
    Draining,
    /// Drained and empty, being removed by its provider (the autoscaler's word only).
    Terminating,
    /// Removed by its provider (the autoscaler's word only).
    Gone,
}

impl HostState {
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Ready => "ready",
            HostState::Cordoned => "cordoned",
            HostState::Draining => "draining",
            HostState::Terminating => "terminating",
            HostState::Gone => "gone",
        }
    }

    /// Whether the host is on its way out: it takes no new work and keeps no warm pools.
    pub fn is_leaving(self) -> bool {
        matches!(
            self,
            HostState::Draining | HostState::Terminating | HostState::Gone
        )
    }

    /// Whether an admin may ask for it (the others are the autoscaler's).
    pub fn is_admin_settable(self) -> bool {
        matches!(
            self,
            HostState::Ready | HostState::Cordoned | HostState::Draining
        )
    }

    pub fn parse(s: &str) -> Option<HostState> {
        match s {
            "ready" => Some(HostState::Ready),
            "cordoned" => Some(HostState::Cordoned),
            "draining" => Some(HostState::Draining),
            "terminating" => Some(HostState::Terminating),
            "gone" => Some(HostState::Gone),
            _ => None,
        }
    }
}

/// A host as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    pub agent: String,
    pub state: HostState,
    /// Its lease runs (false once it lapsed and its runs were declared lost, until it
    /// registers again).
    pub alive: bool,
    /// When its lease ends unless renewed (ms since the epoch, the store's clock).
    pub lease_expires_at: Millis,
}

/// Memory and CPUs: what an execution's limits take from a host while it runs, or
/// what a host has for executions (placement counts one against the other: R4).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub memory_bytes: u64,
    pub cpus: f64,
}

impl Resources {
    pub fn new(memory_bytes: u64, cpus: f64) -> Resources {
        Resources { memory_bytes, cpus }
    }

    /// Whether `self` fits in `room`.
    pub fn fits_in(&self, room: &Resources) -> bool {
        // A millicpu of slack for sums of fractions (0.1 + 0.2 > 0.3 in binary).
        self.memory_bytes <= room.memory_bytes && self.cpus <= room.cpus + 1e-3
    }

    pub fn plus(&self, other: &Resources) -> Resources {
        Resources {
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            cpus: self.cpus + other.cpus,
        }
    }

    /// What is left of `self` after `other` (never below zero).
    pub fn minus(&self, other: &Resources) -> Resources {
        Resources {
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            cpus: (self.cpus - other.cpus).max(0.0),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.memory_bytes == 0 && self.cpus <= 0.0
    }

    /// Orders by size: memory first, then CPUs.
    pub fn cmp_size(&self, other: &Resources) -> std::cmp::Ordering {
        self.memory_bytes
            .cmp(&other.memory_bytes)
            .then(self.cpus.total_cmp(&other.cpus))
    }
}

impl std::fmt::Display for Resources {
    /// `2 GiB and 1.5 cpus`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gib = self.memory_bytes as f64 / (1u64 << 30) as f64;
        let mem = if self.memory_bytes.is_multiple_of(1 << 30) {
            format!("{} GiB", self.memory_bytes >> 30)
        } else if gib >= 1.0 {
            format!("{gib:.2} GiB")
        } else {
            format!("{} MiB", self.memory_bytes >> 20)
        };
        write!(
            f,
            "{mem} and {} cpus",
            (self.cpus * 1000.0).round() / 1000.0
        )
    }
}

impl Limits {
    /// What these limits take from a host while the execution runs.
    pub fn resources(&self) -> Resources {
        Resources::new(self.memory_bytes, self.cpus)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecState {
    Queued,
    Running,
    Succeeded,
    Failed,
    OomKilled,
    TimedOut,
    Cancelled,
    /// The code emitted more than the output limit allows (or more events than an
    /// execution may have); it was stopped.
    OutputLimit,
    /// Its agent died while running it; its sandbox was reaped.
    Lost,
}

impl ExecState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, ExecState::Queued | ExecState::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecState::Queued => "queued",
            ExecState::Running => "running",
            ExecState::Succeeded => "succeeded",
            ExecState::Failed => "failed",
            ExecState::OomKilled => "oom_killed",
            ExecState::TimedOut => "timed_out",
            ExecState::Cancelled => "cancelled",
            ExecState::OutputLimit => "output_limit",
            ExecState::Lost => "lost",
        }
    }
}

/// Why an execution was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The owner (or an admin) asked.
    Requested,
    /// A newer execution from the same tab replaced it (R10).
    SupersededByTab,
    /// The user went over their parallelism cap; the oldest goes (R11).
    ParallelismCap,
}

impl CancelReason {
    /// The stable error code of a result cancelled for this reason.
    pub fn code(self) -> &'static str {
        match self {
            CancelReason::Requested => "cancelled",
            CancelReason::SupersededByTab => "superseded_by_tab",
            CancelReason::ParallelismCap => "parallelism_cap",
        }
    }
}

/// Code up to this size is stored in the execution's record; larger code is an object.
pub const INLINE_CODE_MAX: usize = 64 << 10;
/// A result whose JSON is at most this size is stored only in the execution's `finished`
/// event (sealed with the log); a larger one is an object too, named by `result_key`.
pub const INLINE_RESULT_MAX: usize = 64 << 10;

/// One execution, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    pub id: String,
    pub org: String,
    pub user: String,
    pub language: String,
    pub tab_id: Option<String>,
    pub model_id: Option<String>,
    pub state: ExecState,
    pub limits: Limits,
    /// Object-store key of the (encrypted) code; empty when the code is in [`Self::code`].
    pub code_key: String,
    /// The code itself when it is small (at most [`INLINE_CODE_MAX`] bytes): kept in the
    /// record, which is sealed at rest like an object, so neither admission nor the
    /// start of the run waits for an object-store round trip (tens of milliseconds on
    /// S3). Dropped once the execution is terminal (nothing reads it after); never shown
    /// by the API ([`ExecutionRecord::public`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Object-store key of the (encrypted) result, once finished, if it is larger than
    /// [`INLINE_RESULT_MAX`]; a smaller one is only in the `finished` event.
    pub result_key: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// The agent (host) running it.
    pub agent: Option<String>,
    /// Set when a cancel was decided; the agent acts on it.
    pub cancel: Option<CancelReason>,
    /// A short reason for failures the runtime decided (timeout, lost, ...).
    pub error: Option<String>,
    /// Sequence number of the last event.
    pub last_seq: u64,
    /// The order the store admitted it in (1, 2, 3, ... per store; 0 before admission):
    /// "the oldest" of the parallelism cap (R11) is the smallest, whatever the clocks of
    /// the nodes that stamped `created_at` said.
    #[serde(default)]
    pub admitted: u64,
    /// Running executions of the same user this one's admission cancelled (tab or cap):
    /// its sandbox is not thawed until they are dead, so the user never has more than
    /// the cap running, not even for the milliseconds a kill takes (R11).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub displaces: Vec<String>,
    /// Its artifacts, once finished (from its result; see [`ArtifactInfo::key`] for where
    /// each is stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
    /// The host groups it may run on (its policy's, at admission); absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<String>>,
}

impl ExecutionRecord {
    /// A new execution, `queued`: no tab or model, no code yet, nothing decided about it
    /// (callers fill in the rest with struct update syntax).
    pub fn queued(
        id: impl Into<String>,
        org: impl Into<String>,
        user: impl Into<String>,
        language: impl Into<String>,
        limits: Limits,
        created_at: Millis,
    ) -> ExecutionRecord {
        ExecutionRecord {
            id: id.into(),
            org: org.into(),
            user: user.into(),
            language: language.into(),
            tab_id: None,
            model_id: None,
            state: ExecState::Queued,
            limits,
            code_key: String::new(),
            code: None,
            result_key: None,
            created_at,
            started_at: None,
            finished_at: None,
            agent: None,
            cancel: None,
            error: None,
            last_seq: 0,
            admitted: 0,
            displaces: Vec::new(),
            artifacts: Vec::new(),
            groups: None,
        }
    }

    /// The record as the API shows it: without the code.
    pub fn public(mut self) -> ExecutionRecord {
        self.code = None;
        self
    }
}

/// What an execution reports; stored in order with a per-execution sequence number.
/// Usage samples are not stored: they are [`LiveEvent`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecEvent {
    pub execution_id: String,
    /// 1, 2, 3, ... per execution, without gaps.
    pub seq: u64,
    pub at: Millis,
    #[serde(flatten)]
    pub body: EventBody,
}

impl ExecEvent {
    /// `bodies` as events of `execution_id` numbered from `first`, all stamped `at`.
    pub fn numbered(
        execution_id: &str,
        first: u64,
        at: Millis,
        bodies: impl IntoIterator<Item = EventBody>,
    ) -> Vec<ExecEvent> {
        bodies
            .into_iter()
            .zip(first..)
            .map(|(body, seq)| ExecEvent {
                execution_id: execution_id.to_string(),
                seq,
                at,
                body,
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventBody {
    Queued,
    Started {
        agent: String,
        /// Claim → first user statement, in ms.
        start_ms: Option<f64>,
    },
    Stdout(OutputData),
    Stderr(OutputData),
    Progress {
        fraction: f64,
        message: String,
    },
    /// A usage sample, in logs written before samples became live-only ([`LiveEvent`]):
    /// kept so those logs still read; nothing appends it any more.
    Usage(Usage),
    /// An artifact (a plot page, a file left in `/work/out`) is stored and can be
    /// downloaded (`GET /v1/executions/{id}/artifacts/{name}`).
    Artifact(ArtifactInfo),
    Finished(ResultSummary),
}

/// One artifact of an execution: its name (letters, digits, `.`, `-`, `_`), size, and
/// the content type it is served with (decided from the name's extension, never by the
/// sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    pub name: String,
    pub bytes: u64,
    pub content_type: String,
}

impl ArtifactInfo {
    /// The object-store key of artifact `name` of execution `id`.
    pub fn key(id: &str, name: &str) -> String {
        format!("artifacts/{id}/{name}")
    }
}

/// The content type an artifact named `name` is served with: images and plain data
/// types by extension, anything else `application/octet-stream`. SVG (which can carry
/// scripts) and HTML are served as downloads, never rendered from our origin.
pub fn artifact_content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("svg") => "image/svg+xml",
        Some("pdf") => "application/pdf",
        Some("csv") => "text/csv; charset=utf-8",
        Some("tsv") => "text/tab-separated-values; charset=utf-8",
        Some("txt" | "log" | "md") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("html" | "htm") => "text/html; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Whether an artifact of this content type may be shown inline by a browser (raster
/// images, PDF, plain text and data); everything else is served as an attachment.
pub fn artifact_inline(content_type: &str) -> bool {
    matches!(
        content_type,
        "image/png" | "image/jpeg" | "image/gif" | "image/webp" | "application/pdf"
    ) || content_type.starts_with("text/plain")
        || content_type.starts_with("text/csv")
        || content_type == "application/json"
}

/// A live-only event: published on the bus while the execution runs, never stored, so it
/// has no sequence number, does not count in the log's seqs and is not replayed to a
/// client that reconnects. On the wire it is an event without `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveEvent {
    pub execution_id: String,
    pub at: Millis,
    #[serde(flatten)]
    pub body: LiveBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveBody {
    /// The sandbox's usage now (sampled every `usage_interval`); the result carries the
    /// summary.
    Usage(Usage),
}

/// A piece of output (at most 64 KiB). `data` is the text; bytes that are not valid
/// UTF-8 are replaced in it by U+FFFD and then carried exactly in `data_base64` (standard
/// base64 of the original bytes), which is present only then.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutputData {
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_base64: Option<String>,
}

impl OutputData {
    /// A piece of text.
    pub fn text(data: impl Into<String>) -> OutputData {
        OutputData {
            data: data.into(),
            data_base64: None,
        }
    }

    /// Text as is; other bytes lossily, with the exact bytes alongside.
    pub fn from_bytes(bytes: Vec<u8>) -> OutputData {
        match String::from_utf8(bytes) {
            Ok(data) => OutputData {
                data,
                data_base64: None,
            },
            Err(e) => {
                use base64::Engine as _;
                let bytes = e.into_bytes();
                OutputData {
                    data: String::from_utf8_lossy(&bytes).into_owned(),
                    data_base64: Some(base64::engine::general_purpose::STANDARD.encode(&bytes)),
                }
            }
        }
    }

    /// The exact bytes.
    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        match &self.data_base64 {
            Some(b) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_else(|_| self.data.as_bytes().to_vec()),
            None => self.data.as_bytes().to_vec(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub cpu_ms: f64,
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
}

/// The result of a finished execution (also stored, encrypted, in the object store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultSummary {
    pub state: ExecState,
    /// Why the platform ended it, as a stable code (absent when the code ran to its own
    /// end, successfully or with its own error): `time_limit`, `memory_limit`,
    /// `output_limit`, `event_limit`, `protocol_violation`, `cancelled`,
    /// `superseded_by_tab`, `parallelism_cap`, `agent_restarted`, `agent_shutdown`,
    /// `no_sandbox`, `sandbox_died`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    pub value_json: Option<String>,
    pub error: Option<String>,
    pub warnings: Vec<String>,
    pub exit_code: Option<i32>,
    pub usage: Usage,
    /// Claim → first user statement (ms).
    pub start_ms: Option<f64>,
    /// Claim → end (ms).
    pub duration_ms: f64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The artifacts stored for it, in the order they came.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<ArtifactInfo>,
}

impl ResultSummary {
    /// The summary of an execution that ended without results of its own (cancelled
    /// before it ran, lost with its host, failed to start): a state, a stable code and
    /// why.
    pub fn bare(state: ExecState, code: &str, error: Option<String>) -> ResultSummary {
        ResultSummary {
            state,
            error_code: Some(code.to_string()),
            value_json: None,
            error,
            warnings: Vec::new(),
            exit_code: None,
            usage: Usage::default(),
            start_ms: None,
            duration_ms: 0.0,
            stdout_truncated: false,
            stderr_truncated: false,
            artifacts: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let u = Principal {
            org: "a".into(),
            user: "u".into(),
            role: Role::User,
        };
        assert!(u.may_access("a", "u"));
        assert!(!u.may_access("a", "v"));
        assert!(!u.may_access("b", "u"));
        assert!(!u.may_administer("a"));
        let admin = Principal {
            role: Role::OrgAdmin,
            ..u.clone()
        };
        assert!(admin.may_access("a", "v"));
        assert!(!admin.may_access("b", "v"));
        assert!(admin.may_administer("a") && !admin.may_administer("b"));
        assert!(!u.may_set_org_policy() && !admin.may_set_org_policy());
        let root = Principal {
            role: Role::Superadmin,
            ..u
        };
        assert!(root.may_access("b", "x") && root.may_administer("z"));
        assert!(root.may_set_org_policy());
    }

    #[test]
    fn events_serialise_flat_with_a_type() {
        let e = ExecEvent {
            execution_id: "x".into(),
            seq: 3,
            at: 1,
            body: EventBody::Progress {
                fraction: 0.5,
                message: "half".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "progress");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["fraction"], 0.5);
        let back: ExecEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn live_events_serialise_flat_without_a_seq() {
        let e = LiveEvent {
            execution_id: "x".into(),
            at: 1,
            body: LiveBody::Usage(Usage {
                cpu_ms: 2.5,
                memory_bytes: 10,
                memory_peak_bytes: 20,
            }),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "usage");
        assert_eq!(v["memory_peak_bytes"], 20);
        assert!(v.get("seq").is_none(), "{v}");
        let back: LiveEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
