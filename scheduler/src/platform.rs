//! The platform's front door, as the API sees it: submit, read, list, cancel, follow
//! events, read results, administer policies, monitor. It enforces who may see what
//! (another org's or user's execution is `NotFound`, never `Forbidden`: no existence
//! leak), resolves policies, validates limits and runs admission through the store. It
//! holds no state of its own: everything goes through the [`Store`], the [`Bus`] and the
//! [`Objects`], so several API nodes can serve the same platform.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::bus::{Bus, HostStatus};
use crate::model::{
    EffectivePolicy, ExecEvent, ExecState, ExecutionRecord, Policy, Principal, RequestedLimits,
    ResultSummary,
};
use crate::objects::Objects;
use crate::store::{ListFilter, Store};

/// Languages the platform runs, and the largest code it accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// The platform default policy (▷ org ▷ user overrides).
    pub default_policy: EffectivePolicy,
    pub languages: Vec<String>,
    pub max_code_bytes: usize,
    /// Queued executions the platform holds before answering 503.
    pub max_queued: usize,
    /// Finished executions are deleted (records, events, objects) after this long.
    pub retention_ms: u64,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            default_policy: EffectivePolicy::default(),
            languages: vec!["r".into(), "bash".into()],
            max_code_bytes: 1 << 20,
            max_queued: 256,
            retention_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// `POST /v1/executions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    pub language: String,
    pub code: String,
    pub tab_id: Option<String>,
    pub model_id: Option<String>,
    pub limits: Option<RequestedLimits>,
}

/// Errors with a stable machine-readable code; the API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlatformError {
    /// 404 `not_found` — also for executions the caller may not see.
    #[error("no such execution")]
    NotFound,
    /// 403 `forbidden` — admin endpoints only (never for executions).
    #[error("{0}")]
    Forbidden(String),
    /// 422 `unknown_language`
    #[error("unknown language {0:?}")]
    UnknownLanguage(String),
    /// 413 `code_too_large`
    #[error("code is {size} bytes; the limit is {limit}")]
    CodeTooLarge { size: usize, limit: usize },
    /// 422 `invalid_limits` — negative, zero, absurd, or above the caller's policy.
    #[error("{0}")]
    InvalidLimits(String),
    /// 422 `invalid_request`
    #[error("{0}")]
    Invalid(String),
    /// 503 `queue_full` (with Retry-After)
    #[error("the platform's queue is full; retry later")]
    QueueFull,
    /// 500 `internal`
    #[error("internal error: {0}")]
    Internal(String),
}

impl PlatformError {
    /// The stable error code of the API's JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            PlatformError::NotFound => "not_found",
            PlatformError::Forbidden(_) => "forbidden",
            PlatformError::UnknownLanguage(_) => "unknown_language",
            PlatformError::CodeTooLarge { .. } => "code_too_large",
            PlatformError::InvalidLimits(_) => "invalid_limits",
            PlatformError::Invalid(_) => "invalid_request",
            PlatformError::QueueFull => "queue_full",
            PlatformError::Internal(_) => "internal",
        }
    }
}

/// An execution as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionView {
    #[serde(flatten)]
    pub record: ExecutionRecord,
    /// The decrypted result, once finished.
    pub result: Option<ResultSummary>,
}

/// `GET /v1/executions` filters (the caller's own executions only).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    pub tab_id: Option<String>,
    pub state: Option<ExecState>,
    pub limit: Option<usize>,
}

/// The platform front door. Cheap to clone.
#[derive(Clone)]
pub struct Platform {
    pub config: Arc<PlatformConfig>,
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub objects: Arc<dyn Objects>,
}

/// A follower of events: the backlog after the given sequence number, then live events.
pub struct EventFollow {
    pub backlog: Vec<ExecEvent>,
    pub live: broadcast::Receiver<ExecEvent>,
}

/// Method signatures (implemented in `platform_impl.rs`):
///
/// * `submit(&self, who: &Principal, req: SubmitRequest) -> Result<ExecutionRecord, PlatformError>`
/// * `get(&self, who, id) -> Result<ExecutionView, PlatformError>`
/// * `list(&self, who, q: &ListQuery) -> Result<Vec<ExecutionRecord>, PlatformError>`
/// * `cancel(&self, who, id) -> Result<ExecutionRecord, PlatformError>`
/// * `follow(&self, who, id, after_seq) -> Result<EventFollow, PlatformError>` — subscribe
///   first, then read the backlog, so nothing falls between the two.
/// * `follow_all(&self, who, after: &[(String, u64)]) -> Result<EventFollow, PlatformError>`
/// * `effective_policy(&self, org, user) -> Result<EffectivePolicy, PlatformError>`
/// * `get_org_policy / put_org_policy / get_user_policy / put_user_policy` (admin checks)
/// * `running(&self, who) -> Result<Vec<ExecutionRecord>, PlatformError>` (admin)
/// * `monitor(&self, who) -> Result<broadcast::Receiver<HostStatus>, PlatformError>` (admin)
/// * `expire_old(&self) -> Result<usize, PlatformError>` (retention)
pub type _Signatures = (
    Principal,
    Policy,
    ListFilter,
    HostStatus,
    EventFollow,
    ListQuery,
    ExecutionView,
);
