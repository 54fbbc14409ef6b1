//! The platform's front door, as the API sees it: submit, read, list, cancel, follow
//! events, read results, administer policies, monitor. It enforces who may see what
//! (another org's or user's execution is `NotFound`, never `Forbidden`: no existence
//! leak), resolves policies, validates limits and runs admission through the store (the
//! whole path is described in [`crate::admission`]). It holds no state of its own:
//! everything goes through the [`Store`], the [`Bus`] and the [`Objects`], so several
//! API nodes can serve the same platform.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::admission::{Admission, AdmissionRules};
use crate::bus::{AgentCommand, Bus, BusEvent, HostStatus, Subscription};
use crate::model::{
    now_ms, ArtifactInfo, CancelReason, EffectivePolicy, EventBody, ExecEvent, ExecState,
    ExecutionRecord, HostRecord, HostState, Policy, Principal, RequestedLimits, Resources,
    ResultSummary, Role, INLINE_CODE_MAX,
};
use crate::objects::{ObjectError, Objects};
use crate::policy::PolicyErrors;
use crate::store::{ListFilter, Store, StoreError};

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
    /// The host groups: a request whose limits fit none of their shapes is refused.
    pub groups: Vec<crate::autoscale::GroupConfig>,
    /// How long after its last submission a user counts as active (warm room kept).
    pub active_for: std::time::Duration,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            default_policy: EffectivePolicy::default(),
            languages: vec!["r".into(), "python".into(), "bash".into()],
            max_code_bytes: 1 << 20,
            max_queued: 256,
            retention_ms: 7 * 24 * 3600 * 1000,
            groups: Vec::new(),
            active_for: std::time::Duration::from_secs(600),
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
    /// 404 `not_found` — an execution the caller may see has no artifact of this name.
    #[error("no artifact named {0:?}")]
    NoArtifact(String),
    /// 404 `not_found` — no host of this name has registered.
    #[error("no host named {0:?} has registered")]
    NoHost(String),
    /// 403 `forbidden` — admin endpoints only (never for executions).
    #[error("{0}")]
    Forbidden(String),
    /// 422 `unknown_language`
    #[error("unknown language {0:?}")]
    UnknownLanguage(String),
    /// 413 `code_too_large`
    #[error("code is {size} bytes; the limit is {limit}")]
    CodeTooLarge { size: usize, limit: usize },
    /// 422 `invalid_limits` — negative, zero, absurd, or above the caller's policy; a
    /// policy's `groups` empty, malformed, or naming a group this platform does not have.
    #[error("{0}")]
    InvalidLimits(String),
    /// 422 `policy_exceeds_org` — an org admin's user override above what the org
    /// allows (its policy, else the platform default); every such field with its value
    /// and the allowance.
    #[error("{0}; only a superadmin may set a user override above its org's policy")]
    PolicyExceedsOrg(PolicyErrors),
    /// 422 `invalid_request`
    #[error("{0}")]
    Invalid(String),
    /// 422 `exceeds_largest_group` — the execution's memory and CPUs fit no host group's
    /// shape (R4: a large request scales a group that can hold it; none can).
    #[error(
        "the execution asks for {asked}; the largest host group, {group}, has {shape} per host"
    )]
    ExceedsLargestGroup {
        asked: Resources,
        group: String,
        shape: Resources,
    },
    /// 422 `exceeds_largest_host` — the execution's memory and CPUs fit on no host that
    /// serves its language (R4: a request waits for room, but never for a host that
    /// cannot exist).
    #[error("the execution asks for {asked}; the largest host for {language} has {largest}")]
    ExceedsLargestHost {
        language: String,
        asked: Resources,
        largest: Resources,
    },
    /// 503 `queue_full` (with Retry-After)
    #[error("the platform's queue is full; retry later")]
    QueueFull,
    /// 503 `store_unavailable` (with Retry-After): the store's engine cannot be reached.
    #[error("the store is unavailable; retry later")]
    StoreUnavailable,
    /// 500 `internal`
    #[error("internal error: {0}")]
    Internal(String),
}

impl PlatformError {
    /// The stable error code of the API's JSON errors.
    pub fn code(&self) -> &'static str {
        match self {
            PlatformError::NotFound | PlatformError::NoArtifact(_) | PlatformError::NoHost(_) => {
                "not_found"
            }
            PlatformError::Forbidden(_) => "forbidden",
            PlatformError::UnknownLanguage(_) => "unknown_language",
            PlatformError::CodeTooLarge { .. } => "code_too_large",
            PlatformError::InvalidLimits(_) => "invalid_limits",
            PlatformError::PolicyExceedsOrg(_) => "policy_exceeds_org",
            PlatformError::Invalid(_) => "invalid_request",
            PlatformError::ExceedsLargestHost { .. } => "exceeds_largest_host",
            PlatformError::ExceedsLargestGroup { .. } => "exceeds_largest_group",
            PlatformError::QueueFull => "queue_full",
            PlatformError::StoreUnavailable => "store_unavailable",
            PlatformError::Internal(_) => "internal",
        }
    }
}

/// Whether an execution of `language` needing `need` fits on one of `hosts` (language,
/// allocatable); true when none of them serves the language.
fn fits_a_host(
    language: &str,
    need: &Resources,
    hosts: &[(String, Resources)],
) -> Result<(), PlatformError> {
    let shapes: Vec<&Resources> = hosts
        .iter()
        .filter(|(l, r)| l == language && !r.is_zero())
        .map(|(_, r)| r)
        .collect();
    if shapes.is_empty() || shapes.iter().any(|r| need.fits_in(r)) {
        return Ok(());
    }
    let largest = shapes
        .into_iter()
        .max_by(|a, b| a.cmp_size(b))
        .copied()
        .unwrap_or_default();
    Err(PlatformError::ExceedsLargestHost {
        language: language.to_string(),
        asked: *need,
        largest,
    })
}

/// Whether an execution of `language` needing `need` fits the shape of a group its
/// policy lets it use (`allowed`; `None`: any).
fn fits_a_group(
    language: &str,
    need: &Resources,
    groups: &[crate::autoscale::GroupConfig],
    allowed: Option<&[String]>,
) -> Result<(), PlatformError> {
    if crate::autoscale::smallest_fit(groups, allowed, language, need).is_some() {
        return Ok(());
    }
    let largest = groups
        .iter()
        .filter(|g| crate::autoscale::allows(allowed, &g.name) && g.serves(language))
        .max_by(|a, b| a.shape.cmp_size(&b.shape));
    Err(match (largest, allowed) {
        (Some(g), _) => PlatformError::ExceedsLargestGroup {
            asked: *need,
            group: g.name.clone(),
            shape: g.shape,
        },
        (None, Some(allowed)) => PlatformError::Invalid(format!(
            "none of the host groups this org may use ({}) serves {language}",
            allowed.join(", ")
        )),
        (None, None) => PlatformError::Invalid(format!("no host group serves {language}")),
    })
}

/// A host group with what the platform asks of it (`GET /v1/admin/groups`).
#[derive(Debug, Clone)]
pub struct GroupDemand {
    pub group: crate::autoscale::GroupConfig,
    /// Queued executions counted against it, and what their limits take.
    pub queued: u32,
    pub queued_need: Resources,
    /// Runs' worth of room kept in it for active users, what that takes, and who.
    pub reserved: u32,
    pub reserved_need: Resources,
    pub active_users: Vec<String>,
}

/// An execution as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecutionView {
    #[serde(flatten)]
    pub record: ExecutionRecord,
    /// The decrypted result, once finished.
    pub result: Option<ResultSummary>,
}

/// A user's override as admins see it: the stored override, the policy the user's next
/// execution gets, and the override's fields the org's allowance caps (set above it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserPolicyView {
    pub org: String,
    pub user: String,
    pub policy: Policy,
    pub effective: EffectivePolicy,
    pub capped_by_org: Vec<String>,
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

/// A follower of events: the backlog after the given sequence number (from the store),
/// then what the bus carries: events of the log (with their seq) and live-only ones
/// (usage samples: no seq, never in the backlog). When `live` says
/// [`crate::bus::Received::Missed`], follow again from the last seq sent.
pub struct EventFollow {
    pub backlog: Vec<ExecEvent>,
    pub live: Subscription<BusEvent>,
}

fn internal(e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Internal(e.to_string())
}

fn invalid_limits(e: PolicyErrors) -> PlatformError {
    PlatformError::InvalidLimits(e.to_string())
}

impl From<StoreError> for PlatformError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => PlatformError::NotFound,
            StoreError::UnknownHost(h) => PlatformError::NoHost(h),
            StoreError::InvalidName(n) => PlatformError::Invalid(format!("invalid name: {n}")),
            StoreError::Unavailable(e) => {
                tracing::warn!("store unavailable: {e}");
                PlatformError::StoreUnavailable
            }
            other => internal(other),
        }
    }
}

impl From<ObjectError> for PlatformError {
    fn from(e: ObjectError) -> Self {
        internal(e)
    }
}

/// Longest `tab_id` / `model_id` accepted.
pub const MAX_TAG_LEN: usize = 128;

fn check_tag(name: &str, value: &Option<String>) -> Result<(), PlatformError> {
    if let Some(v) = value {
        if v.is_empty() || v.len() > MAX_TAG_LEN || v.chars().any(|c| c.is_control()) {
            return Err(PlatformError::Invalid(format!(
                "{name} must be 1 to {MAX_TAG_LEN} printable characters"
            )));
        }
    }
    Ok(())
}

/// Executions retention handles per store round trip.
const EXPIRE_BATCH: usize = 500;

/// Admissions tried with policies read again after the store found them stale.
const ADMISSION_ATTEMPTS: u32 = 3;

/// Default and largest page of `list`.
pub const DEFAULT_LIST_LIMIT: usize = 50;
pub const MAX_LIST_LIMIT: usize = 500;

impl Platform {
    /// User override ▷ org policy ▷ platform default, never above what the org allows
    /// (see [`crate::policy::resolve`]).
    pub async fn effective_policy(
        &self,
        org: &str,
        user: &str,
    ) -> Result<EffectivePolicy, PlatformError> {
        let (o, u) = self.store.get_policies(org, user).await?;
        Ok(crate::policy::resolve(
            &self.config.default_policy,
            o.as_ref(),
            u.as_ref(),
        ))
    }

    /// The effective policy an admission applies, and the version of the policies it
    /// comes from when the store versions them (`fresh`: read now, and no version).
    async fn admission_policy(
        &self,
        org: &str,
        user: &str,
        fresh: bool,
    ) -> Result<(EffectivePolicy, Option<u64>), PlatformError> {
        let (o, u, version) = if fresh {
            let (o, u) = self.store.get_policies(org, user).await?;
            (o, u, None)
        } else {
            self.store.policies_for_admission(org, user).await?
        };
        let policy = crate::policy::resolve(&self.config.default_policy, o.as_ref(), u.as_ref());
        Ok((policy, version))
    }

    /// Validates, stores the code (encrypted), and runs admission: the new execution is
    /// queued, the tab's previous one and any beyond the user's parallelism cap are
    /// cancelled, and the scheduler is told.
    pub async fn submit(
        &self,
        who: &Principal,
        req: SubmitRequest,
    ) -> Result<ExecutionRecord, PlatformError> {
        self.submit_within(who, req, &[]).await
    }

    /// [`Self::submit`], refused with [`PlatformError::ExceedsLargestHost`] when the
    /// execution's limits fit on none of `hosts` (the hosts that report what they have,
    /// by language; none: not checked).
    pub async fn submit_within(
        &self,
        who: &Principal,
        req: SubmitRequest,
        hosts: &[(String, Resources)],
    ) -> Result<ExecutionRecord, PlatformError> {
        if !self.config.languages.contains(&req.language) {
            return Err(PlatformError::UnknownLanguage(req.language));
        }
        if req.code.len() > self.config.max_code_bytes {
            return Err(PlatformError::CodeTooLarge {
                size: req.code.len(),
                limit: self.config.max_code_bytes,
            });
        }
        check_tag("tab_id", &req.tab_id)?;
        check_tag("model_id", &req.model_id)?;
        let began = std::time::Instant::now();
        let (mut policy, mut version) = self.admission_policy(&who.org, &who.user, false).await?;
        tracing::trace!(ms = began.elapsed().as_secs_f64() * 1e3, "policy");
        let asked = req.limits;
        let limits = crate::policy::limits_for(&policy, asked.as_ref()).map_err(invalid_limits)?;
        if self.config.groups.is_empty() {
            fits_a_host(&req.language, &limits.resources(), hosts)?;
        } else {
            fits_a_group(
                &req.language,
                &limits.resources(),
                &self.config.groups,
                policy.groups.as_deref(),
            )?;
        }

        let id = uuid::Uuid::new_v4().simple().to_string();
        // Small code travels in the record; larger code is an object.
        let (code_key, code) = if req.code.len() <= INLINE_CODE_MAX {
            (String::new(), Some(req.code))
        } else {
            let key = format!("code/{id}");
            self.objects.put(&key, req.code.into_bytes()).await?;
            (key, None)
        };
        let mut record = ExecutionRecord {
            tab_id: req.tab_id,
            model_id: req.model_id,
            code_key: code_key.clone(),
            code,
            groups: self.groups_of(&policy),
            ..ExecutionRecord::queued(
                id.clone(),
                who.org.clone(),
                who.user.clone(),
                req.language,
                limits,
                now_ms(),
            )
        };
        // The policies may have changed since they were read (another node's write):
        // then the store refuses, and they are read again; the last attempt reads them
        // in full and is not checked (as a policy written just after it).
        let mut attempt = 1;
        let admission = loop {
            let rules = AdmissionRules {
                max_parallel: policy.max_parallel,
                max_queued: self.config.max_queued,
            };
            let began = std::time::Instant::now();
            let admission = self.store.admit_at(record.clone(), rules, version).await;
            tracing::trace!(execution = %id, ms = began.elapsed().as_secs_f64() * 1e3, "admission");
            match admission {
                Ok(Admission::StalePolicy) if attempt < ADMISSION_ATTEMPTS => {
                    attempt += 1;
                    let fresh = attempt == ADMISSION_ATTEMPTS;
                    let limits = match self.admission_policy(&who.org, &who.user, fresh).await {
                        Ok((p, v)) => {
                            (policy, version) = (p, v);
                            crate::policy::limits_for(&policy, asked.as_ref())
                                .map_err(invalid_limits)
                        }
                        Err(e) => Err(e),
                    };
                    match limits {
                        Ok(l) => {
                            record.limits = l;
                            record.groups = self.groups_of(&policy);
                        }
                        Err(e) => {
                            if !code_key.is_empty() {
                                let _ = self.objects.delete(&code_key).await;
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(other) => break Ok(other),
                Err(e) => break Err(e.into()),
            }
        };
        let admission = match admission {
            Ok(a) => a,
            Err(e) => {
                if !code_key.is_empty() {
                    let _ = self.objects.delete(&code_key).await;
                }
                return Err(e);
            }
        };
        match admission {
            Admission::QueueFull { .. } => {
                if !code_key.is_empty() {
                    let _ = self.objects.delete(&code_key).await;
                }
                Err(PlatformError::QueueFull)
            }
            // Only when a store versions policies and ignores `None` (none does).
            Admission::StalePolicy => {
                if !code_key.is_empty() {
                    let _ = self.objects.delete(&code_key).await;
                }
                Err(PlatformError::Internal(
                    "the policies kept changing during the admission".into(),
                ))
            }
            Admission::Admitted {
                cancelled,
                record,
                events,
            } => {
                // Under a race the new execution itself may be the oldest over the cap:
                // then it is already cancelled (with its events) and is not submitted.
                let self_cancelled = cancelled.iter().any(|(c, _)| *c == id);
                for (other, _reason) in cancelled.iter().filter(|(c, _)| *c != id) {
                    self.propagate_cancel(other).await;
                }
                // The answer is the record as admitted (queued, or cancelled at once), as
                // it was before the scheduler could see it.
                let admitted = record.public();
                // Its events first, then the submission (one round trip on a remote bus).
                // Admitted is admitted: the store is the outbox. If the bus cannot take
                // the submission now, the scheduler finds the execution in the store on
                // its next reconciliation.
                let item = crate::bus::submission_for(&admitted);
                let submit = (!self_cancelled).then_some(item.as_str());
                let began = std::time::Instant::now();
                if let Err(e) = self.bus.publish_and_submit(events, submit).await {
                    tracing::warn!(execution = %id, error = %e, "cannot publish or submit on the bus; the scheduler's reconciliation will place it");
                }
                tracing::trace!(execution = %id, ms = began.elapsed().as_secs_f64() * 1e3, "submitted on the bus");
                Ok(admitted)
            }
        }
    }

    /// After the store decided a cancel: a queued execution is already `cancelled` (its
    /// `finished` event is in the store: publish it); a running one must be killed by
    /// its agent.
    async fn propagate_cancel(&self, id: &str) {
        let Ok(Some(rec)) = self.store.get(id).await else {
            return;
        };
        match rec.state {
            ExecState::Running => {
                if let Some(agent) = &rec.agent {
                    let _ = self
                        .bus
                        .send_to_agent(
                            agent,
                            AgentCommand::Cancel {
                                execution_id: id.to_string(),
                            },
                        )
                        .await;
                }
            }
            ExecState::Cancelled => {
                let from = rec.last_seq.saturating_sub(1);
                self.publish_new_events(id, from).await;
            }
            _ => {}
        }
    }

    async fn publish_new_events(&self, id: &str, after: u64) {
        if let Ok(events) = self.store.events_after(id, after).await {
            for e in events {
                let _ = self.bus.publish_event(e).await;
            }
        }
    }

    /// The record, if `who` may see it (otherwise `NotFound`: no existence leak).
    async fn visible(&self, who: &Principal, id: &str) -> Result<ExecutionRecord, PlatformError> {
        match self.store.get(id).await? {
            Some(r) if who.may_access(&r.org, &r.user) => Ok(r),
            _ => Err(PlatformError::NotFound),
        }
    }

    pub async fn get(&self, who: &Principal, id: &str) -> Result<ExecutionView, PlatformError> {
        let record = self.visible(who, id).await?;
        let result = match &record.result_key {
            Some(key) => match self.objects.get(key).await {
                Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(internal)?),
                Err(ObjectError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
            // A small result is in the `finished` event, the log's last.
            None if record.state.is_terminal() => self.finished_summary(&record).await?,
            None => None,
        };
        Ok(ExecutionView {
            record: record.public(),
            result,
        })
    }

    /// The artifacts of an execution the caller may see, in the order they came: from
    /// its record once finished, else from the `artifact` events stored so far (they
    /// come just before the end).
    pub async fn artifacts(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<Vec<ArtifactInfo>, PlatformError> {
        let record = self.visible(who, id).await?;
        if record.state.is_terminal() {
            return Ok(record.artifacts);
        }
        let events = self.store.events_after(id, 0).await?;
        Ok(events
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Artifact(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// One artifact of an execution the caller may see: what it is and its bytes.
    pub async fn artifact(
        &self,
        who: &Principal,
        id: &str,
        name: &str,
    ) -> Result<(ArtifactInfo, Vec<u8>), PlatformError> {
        let info = self
            .artifacts(who, id)
            .await?
            .into_iter()
            .find(|a| a.name == name)
            .ok_or_else(|| PlatformError::NoArtifact(name.to_string()))?;
        match self.objects.get(&ArtifactInfo::key(id, name)).await {
            Ok(bytes) => Ok((info, bytes)),
            // Listed but gone: retention is deleting the execution.
            Err(ObjectError::NotFound(_)) => Err(PlatformError::NoArtifact(name.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The result a terminal execution's `finished` event carries.
    async fn finished_summary(
        &self,
        record: &ExecutionRecord,
    ) -> Result<Option<ResultSummary>, PlatformError> {
        let last = self
            .store
            .events_after(&record.id, record.last_seq.saturating_sub(1))
            .await?;
        Ok(last.into_iter().rev().find_map(|e| match e.body {
            EventBody::Finished(summary) => Some(summary),
            _ => None,
        }))
    }

    /// The caller's own executions, newest first.
    pub async fn list(
        &self,
        who: &Principal,
        q: &ListQuery,
    ) -> Result<Vec<ExecutionRecord>, PlatformError> {
        let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT);
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(PlatformError::Invalid(format!(
                "limit must be between 1 and {MAX_LIST_LIMIT}"
            )));
        }
        let filter = ListFilter {
            org: Some(who.org.clone()),
            user: Some(who.user.clone()),
            tab_id: q.tab_id.clone(),
            state: q.state,
            active_only: false,
            limit: Some(limit),
        };
        let records = self.store.list(&filter).await?;
        Ok(records.into_iter().map(ExecutionRecord::public).collect())
    }

    /// Cancels an execution the caller may see (a finished one is returned unchanged).
    pub async fn cancel(
        &self,
        who: &Principal,
        id: &str,
    ) -> Result<ExecutionRecord, PlatformError> {
        self.visible(who, id).await?;
        self.store
            .request_cancel(id, CancelReason::Requested)
            .await?
            .ok_or(PlatformError::NotFound)?;
        self.propagate_cancel(id).await;
        let record = self.store.get(id).await?.ok_or(PlatformError::NotFound)?;
        Ok(record.public())
    }

    /// Events of one execution after `after_seq`: subscribes first, then reads the
    /// backlog, so an event of the log is in the backlog, in the live stream, or both (the
    /// caller drops `seq`s it has already sent) — never in neither. Live-only events are
    /// only in the live stream, while the caller listens.
    pub async fn follow(
        &self,
        who: &Principal,
        id: &str,
        after_seq: u64,
    ) -> Result<EventFollow, PlatformError> {
        let live = self.bus.subscribe_execution(id);
        // The record (for who may see it) and the backlog in one read.
        match self.store.get_with_events_after(id, after_seq).await? {
            Some((r, backlog)) if who.may_access(&r.org, &r.user) => {
                Ok(EventFollow { backlog, live })
            }
            _ => Err(PlatformError::NotFound),
        }
    }

    /// Events of all of the caller's executions: for each `(id, seq)` in `after`, the
    /// backlog after it; for the caller's active executions not named there, their whole
    /// backlog; then everything live (the caller filters live events by owner with
    /// [`Platform::owns_execution`]).
    pub async fn follow_all(
        &self,
        who: &Principal,
        after: &[(String, u64)],
    ) -> Result<EventFollow, PlatformError> {
        let live = self.bus.subscribe_events();
        let mut backlog = Vec::new();
        for (id, seq) in after {
            if self.visible(who, id).await.is_ok() {
                backlog.extend(self.store.events_after(id, *seq).await?);
            }
        }
        let active = self
            .store
            .list(&ListFilter {
                org: Some(who.org.clone()),
                user: Some(who.user.clone()),
                active_only: true,
                ..Default::default()
            })
            .await?;
        for rec in active {
            if !after.iter().any(|(id, _)| *id == rec.id) {
                backlog.extend(self.store.events_after(&rec.id, 0).await?);
            }
        }
        Ok(EventFollow { backlog, live })
    }

    /// Whether `execution_id` (of a live event) is one of `who`'s own executions.
    pub async fn owns_execution(&self, who: &Principal, execution_id: &str) -> bool {
        matches!(
            self.store.get(execution_id).await,
            Ok(Some(r)) if r.org == who.org && r.user == who.user
        )
    }

    fn require_admin(&self, who: &Principal, org: &str) -> Result<(), PlatformError> {
        if who.may_administer(org) {
            Ok(())
        } else {
            Err(PlatformError::Forbidden(format!(
                "administering org {org:?} needs the org_admin role in it, or superadmin"
            )))
        }
    }

    fn require_superadmin(&self, who: &Principal, what: &str) -> Result<(), PlatformError> {
        if who.role == Role::Superadmin {
            Ok(())
        } else {
            Err(PlatformError::Forbidden(format!(
                "{what} needs the superadmin role"
            )))
        }
    }

    /// Every host that registered, with the state the store asks of it (superadmins).
    pub async fn hosts(&self, who: &Principal) -> Result<Vec<HostRecord>, PlatformError> {
        self.require_superadmin(who, "listing hosts")?;
        Ok(self.store.hosts().await?)
    }

    /// The host groups with the demand counted against each (queued executions whose
    /// smallest allowed fit it is: what the autoscaler counts; at most the oldest 1,000
    /// queued are read) and the room kept in each for active users (R5): superadmins.
    pub async fn groups(&self, who: &Principal) -> Result<Vec<GroupDemand>, PlatformError> {
        self.require_superadmin(who, "listing host groups")?;
        let groups = &self.config.groups;
        let mut out: Vec<GroupDemand> = groups
            .iter()
            .map(|g| GroupDemand {
                group: g.clone(),
                queued: 0,
                queued_need: Resources::default(),
                reserved: 0,
                reserved_need: Resources::default(),
                active_users: Vec::new(),
            })
            .collect();
        if groups.is_empty() {
            return Ok(out);
        }
        let queued = self
            .store
            .list(&ListFilter {
                state: Some(ExecState::Queued),
                limit: Some(1000),
                ..Default::default()
            })
            .await?;
        let index = |name: &str| groups.iter().position(|x| x.name == name);
        for r in &queued {
            let need = r.limits.resources();
            let allowed = r.groups.as_deref();
            if let Some(i) = crate::autoscale::smallest_fit(groups, allowed, &r.language, &need)
                .and_then(|g| index(&g.name))
            {
                out[i].queued += 1;
                out[i].queued_need = out[i].queued_need.plus(&need);
            }
        }
        let reserve = crate::scaler::active_reserve(
            self.store.as_ref(),
            &self.config.default_policy,
            self.config.active_for,
            now_ms(),
        )
        .await?;
        for r in &reserve {
            if let Some(i) = r.group(groups).and_then(|g| index(&g.name)) {
                let d = &mut out[i];
                d.reserved += r.count;
                for _ in 0..r.count {
                    d.reserved_need = d.reserved_need.plus(&r.need);
                }
                d.active_users.push(r.who.clone());
            }
        }
        for d in &mut out {
            d.active_users.sort();
            d.active_users.dedup();
        }
        Ok(out)
    }

    /// Asks a host to be `ready`, `cordoned` (no new work) or `draining` (no new work,
    /// warm pools emptied; what runs goes on to its end): superadmins. Its agent acts on
    /// it at its next heartbeat (within a third of its lease) and keeps it across
    /// restarts.
    pub async fn set_host_state(
        &self,
        who: &Principal,
        agent: &str,
        state: HostState,
    ) -> Result<HostRecord, PlatformError> {
        self.require_superadmin(who, "changing a host's state")?;
        let host = self.store.set_host_state(agent, state).await?;
        tracing::info!(agent, state = state.as_str(), by = %who.user, "host state set");
        Ok(host)
    }

    /// The org's policy: superadmins, and the org's admins (read only).
    pub async fn get_org_policy(
        &self,
        who: &Principal,
        org: &str,
    ) -> Result<Policy, PlatformError> {
        self.require_admin(who, org)?;
        Ok(self.store.get_org_policy(org).await?.unwrap_or_default())
    }

    /// Sets an org's policy: superadmins only (R3). Lowering it below existing user
    /// overrides is accepted: resolution caps every override at the org's allowance
    /// ([`crate::policy::resolve`]), so it applies to every user's next execution.
    pub async fn put_org_policy(
        &self,
        who: &Principal,
        org: &str,
        policy: Policy,
    ) -> Result<Policy, PlatformError> {
        if !who.may_set_org_policy() {
            return Err(PlatformError::Forbidden(format!(
                "setting the policy of org {org:?} needs the superadmin role; an org admin \
                 may read it and set user overrides within it"
            )));
        }
        crate::policy::validate_policy(&policy).map_err(invalid_limits)?;
        self.check_groups_exist(&policy)?;
        self.store.put_org_policy(org, policy.clone()).await?;
        Ok(policy)
    }

    /// The groups an execution under `policy` may run on, as its record keeps them
    /// (`None` without host groups, or when any will do).
    fn groups_of(&self, policy: &EffectivePolicy) -> Option<Vec<String>> {
        if self.config.groups.is_empty() {
            None
        } else {
            policy.groups.clone()
        }
    }

    /// A policy's `groups` must name groups this platform has: a typo would otherwise
    /// leave an org's executions with nowhere to run.
    fn check_groups_exist(&self, policy: &Policy) -> Result<(), PlatformError> {
        let Some(groups) = &policy.groups else {
            return Ok(());
        };
        let known = &self.config.groups;
        if known.is_empty() {
            return Err(PlatformError::InvalidLimits(
                "groups: this platform has no host groups; leave the field out".into(),
            ));
        }
        let unknown = crate::autoscale::unknown_groups(known, groups);
        if unknown.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = known.iter().map(|g| g.name.as_str()).collect();
        Err(PlatformError::InvalidLimits(format!(
            "groups: {} {} not a host group of this platform (its groups: {})",
            unknown.join(", "),
            if unknown.len() == 1 { "is" } else { "are" },
            names.join(", ")
        )))
    }

    async fn user_policy_view(
        &self,
        org: &str,
        user: &str,
        policy: Policy,
    ) -> Result<UserPolicyView, PlatformError> {
        let org_policy = self.store.get_org_policy(org).await?;
        let d = &self.config.default_policy;
        let effective = crate::policy::resolve(d, org_policy.as_ref(), Some(&policy));
        let capped_by_org = crate::policy::capped_fields(d, org_policy.as_ref(), &policy)
            .into_iter()
            .map(str::to_string)
            .collect();
        Ok(UserPolicyView {
            org: org.to_string(),
            user: user.to_string(),
            policy,
            effective,
            capped_by_org,
        })
    }

    /// A user's override and effective policy: superadmins, and the org's admins.
    pub async fn get_user_policy(
        &self,
        who: &Principal,
        org: &str,
        user: &str,
    ) -> Result<UserPolicyView, PlatformError> {
        self.require_admin(who, org)?;
        let policy = self
            .store
            .get_user_policy(org, user)
            .await?
            .unwrap_or_default();
        self.user_policy_view(org, user, policy).await
    }

    /// Sets a user's override: a superadmin in any org, to any sane value; an org admin
    /// in its own org, each field at most what the org allows (its policy, else the
    /// platform default), or 422 `policy_exceeds_org`. Whatever is stored, the effective
    /// policy never exceeds the org's allowance (see [`Platform::put_org_policy`]).
    pub async fn put_user_policy(
        &self,
        who: &Principal,
        org: &str,
        user: &str,
        policy: Policy,
    ) -> Result<UserPolicyView, PlatformError> {
        self.require_admin(who, org)?;
        crate::policy::validate_policy(&policy).map_err(invalid_limits)?;
        self.check_groups_exist(&policy)?;
        if who.role != Role::Superadmin {
            let org_policy = self.store.get_org_policy(org).await?;
            let allowance =
                crate::policy::org_allowance(&self.config.default_policy, org_policy.as_ref());
            crate::policy::check_within_org(&policy, &allowance)
                .map_err(PlatformError::PolicyExceedsOrg)?;
        }
        self.store
            .put_user_policy(org, user, policy.clone())
            .await?;
        self.user_policy_view(org, user, policy).await
    }

    /// Active executions: all of them for a superadmin, the org's for an org admin.
    pub async fn running(&self, who: &Principal) -> Result<Vec<ExecutionRecord>, PlatformError> {
        let org = match who.role {
            Role::Superadmin => None,
            Role::OrgAdmin => Some(who.org.clone()),
            Role::User => {
                return Err(PlatformError::Forbidden(
                    "listing every execution needs an admin role".into(),
                ))
            }
        };
        let records = self
            .store
            .list(&ListFilter {
                org,
                active_only: true,
                limit: Some(MAX_LIST_LIMIT),
                ..Default::default()
            })
            .await?;
        Ok(records.into_iter().map(ExecutionRecord::public).collect())
    }

    /// Live host status (usage of every running sandbox) for admins (R13). An org admin
    /// should only be shown its org's sandboxes: filter with [`Platform::visible_status`].
    pub async fn monitor(
        &self,
        who: &Principal,
    ) -> Result<Subscription<HostStatus>, PlatformError> {
        match who.role {
            Role::Superadmin | Role::OrgAdmin => Ok(self.bus.subscribe_status()),
            Role::User => Err(PlatformError::Forbidden(
                "the monitor needs an admin role".into(),
            )),
        }
    }

    /// `status` as `who` may see it (an org admin sees only its org's sandboxes).
    pub fn visible_status(&self, who: &Principal, mut status: HostStatus) -> HostStatus {
        if who.role != Role::Superadmin {
            status.sandboxes.retain(|s| s.org == who.org);
        }
        status
    }

    /// Deletes finished executions older than the retention period with their objects:
    /// for each, its objects (code, result) first, then its record and events, so a
    /// crash in between leaves a record whose objects are gone (deleted again, which is
    /// harmless, on the next pass) and never an object no record names. An execution
    /// whose objects cannot be deleted keeps its record for the next pass. Returns how
    /// many were deleted.
    pub async fn expire_old(&self) -> Result<usize, PlatformError> {
        let cut = now_ms().saturating_sub(self.config.retention_ms);
        let mut deleted = 0;
        loop {
            let batch = self.store.expired(cut, EXPIRE_BATCH).await?;
            let mut cleared = Vec::with_capacity(batch.len());
            for r in &batch {
                match self.delete_objects(r).await {
                    Ok(()) => cleared.push(r.id.clone()),
                    Err(e) => tracing::warn!(
                        execution = %r.id,
                        error = %e,
                        "retention cannot delete the objects of an execution; its record stays for the next pass"
                    ),
                }
            }
            deleted += self.store.delete_expired(&cleared, cut).await?.len();
            // A short batch was the last; one with failures would come back the same.
            if batch.len() < EXPIRE_BATCH || cleared.len() < batch.len() {
                return Ok(deleted);
            }
        }
    }

    /// Deletes the objects an execution names (one already gone counts as deleted): its
    /// code, result and artifacts. An execution lost with its host may have stored
    /// artifacts its record does not list: its whole artifact folder goes.
    async fn delete_objects(&self, r: &ExecutionRecord) -> Result<(), ObjectError> {
        let code = Some(&r.code_key).filter(|k| !k.is_empty()).cloned();
        let artifacts = r
            .artifacts
            .iter()
            .map(|a| ArtifactInfo::key(&r.id, &a.name));
        for key in code
            .into_iter()
            .chain(r.result_key.clone())
            .chain(artifacts)
        {
            match self.objects.delete(&key).await {
                Ok(()) | Err(ObjectError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if r.state == ExecState::Lost && r.started_at.is_some() {
            self.objects
                .delete_folder(&format!("artifacts/{}", r.id))
                .await?;
        }
        Ok(())
    }
}
