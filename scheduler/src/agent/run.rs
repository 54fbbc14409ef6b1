//! One execution on this host, from `queued` to a terminal state: `mark_running` in the
//! store (the guard against duplicate deliveries and cancels that won the race), the wait
//! for executions this one displaced (R11), the cancel check before anything is claimed,
//! the claim and the drive of the sandbox (its events go through the [`Forwarder`]),
//! and `finish`: the encrypted result in the object store, then the terminal record with
//! its `finished` event, always the execution's last.
//!
//! The claim (which may block) runs in place where blocking is allowed
//! ([`crate::blocking::run`]); the pool's events are awaited straight from its channel.

use std::sync::Arc;
use std::time::Duration;

use hatchery_sandbox::pool::{Canceller, Event, ExecRequest, ExecResult, ExecStatus};
use tokio::sync::OwnedSemaphorePermit;

use super::forward::{Forwarder, STARTED_WAIT};
use super::{Inner, Running};
use crate::model::{
    now_ms, ArtifactInfo, CancelReason, ExecState, ExecutionRecord, Resources, ResultSummary,
    Usage, INLINE_RESULT_MAX,
};

/// Runs `id`, which the scheduler said needs `need` (counted in the host status until its
/// record says what it takes).
pub(super) async fn run_execution(
    inner: Arc<Inner>,
    id: String,
    need: Resources,
    _slot: OwnedSemaphorePermit,
) {
    {
        let mut running = inner.running.lock().unwrap();
        if running.contains_key(&id) {
            tracing::debug!(execution = %id, "duplicate run of an execution already running here");
            return;
        }
        // Registered before `mark_running`, so a cancel sent as soon as the record says
        // it runs here finds it.
        running.insert(
            id.clone(),
            Running {
                org: String::new(),
                user: String::new(),
                usage: Usage::default(),
                limits: need,
                canceller: None,
                cancel_requested: false,
                shutdown_kill: None,
            },
        );
    }
    let began = std::time::Instant::now();
    let marked = inner.store.mark_running(&id, &inner.cfg.id, now_ms()).await;
    tracing::trace!(execution = %id, ms = began.elapsed().as_secs_f64() * 1e3, "marked running");
    let record = match marked {
        Ok(r) => r,
        Err(e) => {
            // Cancelled meanwhile, finished, or a duplicate delivery: not ours to run.
            tracing::debug!(execution = %id, error = %e, "not running it");
            inner.running.lock().unwrap().remove(&id);
            return;
        }
    };
    if let Some(r) = inner.running.lock().unwrap().get_mut(&id) {
        r.org = record.org.clone();
        r.user = record.user.clone();
        r.limits = record.limits.resources();
    }
    inner.status_changed.notify_one();
    tracing::info!(execution = %id, org = %record.org, user = %record.user, language = %record.language, "running");

    // R11: the sandbox is not thawed while an execution this one displaced still runs,
    // and not at all if this one was cancelled meanwhile.
    let waited = wait_displaced(&inner, &record).await;
    if let Some(reason) = cancelled_before_start(&inner, &id, waited).await {
        let summary = stopped_before_start(reason, killed_by_shutdown(&inner, &id).as_deref());
        finish(&inner, &id, summary.state, summary).await;
        inner.running.lock().unwrap().remove(&id);
        inner.status_changed.notify_one();
        return;
    }

    let outcome = drive(&inner, &record).await;
    let (state, summary) = match outcome {
        Ok((result, artifacts)) => {
            let shutdown_kill = killed_by_shutdown(&inner, &id);
            let reason = if result.status == ExecStatus::Cancelled && shutdown_kill.is_none() {
                match inner.store.get(&id).await {
                    Ok(Some(r)) => r.cancel,
                    _ => None,
                }
            } else {
                None
            };
            let mut summary =
                summarise(&result, &record.language, shutdown_kill.as_deref(), reason);
            summary.artifacts = artifacts;
            (summary.state, summary)
        }
        Err(error) => {
            let code = if error.starts_with("no sandbox") {
                "no_sandbox"
            } else {
                "internal"
            };
            let summary = ResultSummary::bare(ExecState::Failed, code, Some(error));
            (ExecState::Failed, summary)
        }
    };
    finish(&inner, &id, state, summary).await;
    inner.running.lock().unwrap().remove(&id);
    inner.status_changed.notify_one();
}

/// Why the agent killed this execution, if it did because it shuts down (or its lease
/// lapsed).
fn killed_by_shutdown(inner: &Inner, id: &str) -> Option<String> {
    inner
        .running
        .lock()
        .unwrap()
        .get(id)
        .and_then(|r| r.shutdown_kill.clone())
}

/// How long a new execution waits for the ones it displaced to die before it starts
/// anyway (their agent is gone: they become `lost` when its lease expires).
const DISPLACED_WAIT: Duration = Duration::from_secs(30);

/// Waits until every execution `record` displaced (see [`ExecutionRecord::displaces`]) is
/// terminal: its agent has killed it and emptied its cgroup before marking it finished.
/// Stops waiting when this execution is cancelled or killed meanwhile (it will not start).
/// True when it had anything to wait for.
async fn wait_displaced(inner: &Inner, record: &ExecutionRecord) -> bool {
    if record.displaces.is_empty() {
        return false;
    }
    let started = std::time::Instant::now();
    let deadline = started + DISPLACED_WAIT;
    for other in &record.displaces {
        let mut pause = Duration::from_millis(1);
        loop {
            match inner.store.get(other).await {
                Ok(Some(r)) if !r.state.is_terminal() => {}
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(execution = %record.id, displaced = %other, error = %e, "cannot read a displaced execution");
                }
            }
            let stopped = inner
                .running
                .lock()
                .unwrap()
                .get(&record.id)
                .is_some_and(|r| r.cancel_requested);
            if stopped {
                return true;
            }
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    execution = %record.id,
                    displaced = %other,
                    "a displaced execution is still running after {DISPLACED_WAIT:?}: starting anyway"
                );
                return true;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
    tracing::debug!(execution = %record.id, waited_ms = started.elapsed().as_millis() as u64, "displaced executions are dead");
    true
}

/// The reason, if this execution was cancelled before its sandbox was claimed (`waited`:
/// it waited for displaced executions since `mark_running`).
async fn cancelled_before_start(inner: &Inner, id: &str, waited: bool) -> Option<CancelReason> {
    let requested = inner
        .running
        .lock()
        .unwrap()
        .get(id)
        .is_some_and(|r| r.cancel_requested);
    // `mark_running` just said it was not cancelled: the store is read again only if
    // time passed since (a wait for displaced runs) or a cancel arrived (for its reason),
    // so the claim path of a plain execution makes no extra store round trip.
    if !waited && !requested {
        return None;
    }
    match inner.store.get(id).await {
        Ok(Some(r)) if r.cancel.is_some() => r.cancel,
        _ if requested => Some(CancelReason::Requested),
        _ => None,
    }
}

/// The summary of an execution stopped before its sandbox was claimed: cancelled for
/// `reason`, or `lost` when the agent killed it because it shuts down or its lease
/// lapsed (as it would be a moment later, after the claim: see [`summarise`]).
fn stopped_before_start(reason: CancelReason, shutdown_kill: Option<&str>) -> ResultSummary {
    if let Some(note) = shutdown_kill {
        ResultSummary::bare(ExecState::Lost, "agent_shutdown", Some(note.to_string()))
    } else {
        ResultSummary::bare(
            ExecState::Cancelled,
            cancel_code(Some(reason)),
            Some(cancel_note(Some(reason))),
        )
    }
}

/// Marks the record finished with its `finished` event, which carries the result; a
/// result larger than [`INLINE_RESULT_MAX`] is also stored as an object first (so a small
/// one costs no object-store round trip while the slot is held).
async fn finish(inner: &Inner, id: &str, state: ExecState, mut summary: ResultSummary) {
    let key = format!("results/{id}");
    let (result_key, stored) = match serde_json::to_vec(&summary) {
        Ok(json) if json.len() <= INLINE_RESULT_MAX => (None, true),
        Ok(json) => match inner.objects.put(&key, json).await {
            Ok(()) => (Some(key), true),
            Err(e) => {
                tracing::warn!(execution = id, error = %e, "cannot store the result");
                (None, false)
            }
        },
        Err(e) => {
            tracing::warn!(execution = id, error = %e, "cannot serialise the result");
            (None, false)
        }
    };
    if !stored {
        let note = "the result could not be stored";
        summary.error = Some(match summary.error.take() {
            Some(e) => format!("{e}; {note}"),
            None => note.to_string(),
        });
    }
    let at = now_ms();
    let finished = inner
        .store_write("its end", id, || {
            inner
                .store
                .finish(id, state, result_key.clone(), at, summary.clone())
        })
        .await;
    match finished {
        Ok((_, event)) => {
            tracing::info!(execution = id, state = state.as_str(), "finished");
            if let Err(e) = inner.bus.publish_event(event).await {
                tracing::warn!(execution = id, error = %e, "cannot publish an event");
            }
        }
        // Already terminal (e.g. reconciled by another life of this agent): its
        // `finished` event exists.
        Err(e) => tracing::warn!(execution = id, error = %e, "cannot mark it finished"),
    }
}

/// Claims a sandbox, runs the code and forwards its events; returns the pool's result
/// and the artifacts stored, or why the execution could not run.
async fn drive(
    inner: &Arc<Inner>,
    record: &ExecutionRecord,
) -> Result<(ExecResult, Vec<ArtifactInfo>), String> {
    let id = record.id.as_str();
    let code = match &record.code {
        Some(code) => code.clone(),
        None => {
            let code = inner
                .objects
                .get(&record.code_key)
                .await
                .map_err(|e| format!("cannot read the code: {e}"))?;
            String::from_utf8(code).map_err(|_| "the code is not UTF-8".to_string())?
        }
    };
    let pool = inner
        .pool(&record.language)
        .ok_or_else(|| format!("this host does not run {:?}", record.language))?;
    let limits = &record.limits;
    let req = ExecRequest {
        code,
        limits: hatchery_sandbox::Limits {
            memory_bytes: Some(limits.memory_bytes),
            cpus: Some(limits.cpus),
            pids: Some(limits.pids),
        },
        timeout: (limits.time_limit_ms > 0).then(|| Duration::from_millis(limits.time_limit_ms)),
        usage_interval: inner.cfg.usage_interval,
        output_limit: inner.cfg.output_limit,
        max_events: inner.cfg.max_events,
        // Plot pages and files left in /work/out, within the execution's policy.
        artifacts: limits.artifacts(),
    };

    // The claim may block (cgroup writes; a wait when the pool is empty), in place.
    let began = std::time::Instant::now();
    let execution = crate::blocking::run(move || pool.claim(req))
        .await
        .map_err(|e| format!("the claim failed: {e}"))?
        .map_err(|e| format!("no sandbox: {e}"))?;
    tracing::trace!(execution = %id, ms = began.elapsed().as_secs_f64() * 1e3, "claimed");
    // Cancelled if this future is dropped before the execution reported its end: a
    // sandbox never runs on unobserved.
    let mut unobserved = CancelOnDrop(Some(execution.canceller()));
    let events = execution.events().clone();
    let gone = execution.gone();
    let cancel_now = {
        let mut running = inner.running.lock().unwrap();
        match running.get_mut(id) {
            Some(r) => {
                r.canceller = Some(execution.canceller());
                r.cancel_requested
            }
            None => false,
        }
    };
    if cancel_now {
        execution.cancel();
    } else {
        // A cancel decided between `mark_running` and the claim is in the record. Read
        // it beside the run, not before it: on a remote store that read is a round trip
        // the sandbox's first events would otherwise wait for, and acting on it a moment
        // later is the same as a cancel that arrives a moment later.
        let (inner, id, canceller) = (Arc::clone(inner), id.to_string(), execution.canceller());
        tokio::spawn(async move {
            if matches!(inner.store.get(&id).await, Ok(Some(r)) if r.cancel.is_some()) {
                canceller.cancel();
            }
        });
    }

    let mut forwarder = Forwarder::new(Arc::clone(inner), id.to_string());
    let outcome = loop {
        // Output held for `started` waits at most STARTED_WAIT; a batch until it is due
        // (at once after a quiet spell), taking along whatever comes meanwhile.
        let next = if !forwarder.started && !forwarder.held.is_empty() {
            match tokio::time::timeout(STARTED_WAIT, events.recv_async()).await {
                Ok(next) => next,
                Err(_) => {
                    forwarder.start(None).await;
                    continue;
                }
            }
        } else if let Some(due) = forwarder.flush_due() {
            if due <= tokio::time::Instant::now() {
                // Due now: take along what is already waiting, else store at once (a
                // timer would round the wait up to the timer's millisecond tick).
                match events.try_recv() {
                    Ok(event) => Ok(event),
                    Err(flume::TryRecvError::Empty) => {
                        forwarder.flush().await;
                        continue;
                    }
                    Err(flume::TryRecvError::Disconnected) => Err(flume::RecvError::Disconnected),
                }
            } else {
                match tokio::time::timeout_at(due, events.recv_async()).await {
                    Ok(next) => next,
                    Err(_) => {
                        forwarder.flush().await;
                        continue;
                    }
                }
            }
        } else {
            events.recv_async().await
        };
        match next {
            Ok(Event::Finished(result)) => {
                unobserved.0 = None;
                forwarder.start(result.timings.start_ms).await;
                forwarder.flush_text().await;
                break Ok(*result);
            }
            Ok(Event::Started { after_claim_ms }) => {
                tracing::trace!(execution = %id, after_claim_ms, "sandbox started");
                forwarder.start(Some(after_claim_ms)).await;
            }
            Ok(event) => forwarder.forward(event).await,
            Err(_) => break Err("the sandbox runtime stopped reporting".into()),
        }
    };
    // Whatever waits is stored and published before the caller finishes the execution:
    // `finished` stays the last event.
    forwarder.flush().await;
    // R11: the caller makes the execution terminal, and a terminal execution no longer
    // counts against its user's cap (its successor starts at once, on any host): so not
    // before every process of its sandbox is gone. The result arrives while they die;
    // the writes above usually outlast that.
    if outcome.is_err() {
        // The runtime stopped reporting: make sure nothing of it runs on.
        execution.cancel();
    }
    let waited = std::time::Instant::now();
    if tokio::time::timeout(SANDBOX_GONE_WAIT, gone.wait_async())
        .await
        .is_err()
    {
        tracing::warn!(execution = %id, "the sandbox's processes are not gone after {SANDBOX_GONE_WAIT:?}: finishing anyway");
    }
    tracing::trace!(execution = %id, ms = waited.elapsed().as_secs_f64() * 1e3, "sandbox gone");
    outcome.map(|result| (result, forwarder.artifacts))
}

/// How long an execution's end waits for its sandbox's processes to be gone (the runtime
/// kills what is left well before: this bounds a runtime that stopped working).
const SANDBOX_GONE_WAIT: Duration = Duration::from_secs(10);

/// Cancels an execution when dropped while it holds one.
struct CancelOnDrop(Option<Canceller>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.cancel();
        }
    }
}

pub(super) fn usage_of(u: &hatchery_sandbox::cgroup::Usage) -> Usage {
    Usage {
        cpu_ms: (u.user_cpu_ns + u.system_cpu_ns) as f64 / 1e6,
        memory_bytes: u.memory_current_bytes,
        memory_peak_bytes: u.memory_peak_bytes,
    }
}

/// The state an execution ends in, from how the pool saw it end.
pub fn state_of(status: ExecStatus) -> ExecState {
    match status {
        ExecStatus::Succeeded => ExecState::Succeeded,
        ExecStatus::Failed | ExecStatus::ProtocolViolation => ExecState::Failed,
        ExecStatus::OutputLimit => ExecState::OutputLimit,
        ExecStatus::OomKilled => ExecState::OomKilled,
        ExecStatus::TimedOut => ExecState::TimedOut,
        ExecStatus::Cancelled => ExecState::Cancelled,
    }
}

fn cancel_code(reason: Option<CancelReason>) -> &'static str {
    reason.map_or("cancelled", CancelReason::code)
}

fn cancel_note(reason: Option<CancelReason>) -> String {
    match reason {
        Some(CancelReason::Requested) | None => "cancelled".into(),
        Some(CancelReason::SupersededByTab) => {
            "cancelled: a newer execution from the same tab replaced it".into()
        }
        Some(CancelReason::ParallelismCap) => {
            "cancelled: the user started more executions than their parallelism cap".into()
        }
    }
}

/// The result summary of a finished execution.
fn summarise(
    result: &ExecResult,
    language: &str,
    shutdown_kill: Option<&str>,
    reason: Option<CancelReason>,
) -> ResultSummary {
    let outcome = &result.outcome;
    let (state, code, error) = match shutdown_kill {
        Some(note) if result.status == ExecStatus::Cancelled => (
            ExecState::Lost,
            Some("agent_shutdown"),
            Some(note.to_string()),
        ),
        _ => {
            // As the language's own tools show it: R's `Error in f(): boom`; Python's
            // traceback (of the user's code) followed by `KeyError: 'missing'`.
            let user_error = outcome.error.as_ref().map(|e| match &e.call {
                Some(call) if !call.is_empty() && language == "python" => {
                    format!("{call}\n{}", e.message)
                }
                Some(call) if !call.is_empty() => format!("Error in {call}: {}", e.message),
                _ => e.message.clone(),
            });
            let (code, error) = match result.status {
                ExecStatus::Succeeded => (None, None),
                ExecStatus::Failed => match user_error {
                    Some(e) => (None, Some(e)),
                    // No error of the code's own: the sandbox died without a result.
                    None => (Some("sandbox_died"), result.error.clone()),
                },
                ExecStatus::OutputLimit => {
                    let events = result
                        .error
                        .as_deref()
                        .is_some_and(|e| e.contains("events"));
                    (
                        Some(if events {
                            "event_limit"
                        } else {
                            "output_limit"
                        }),
                        result.error.clone(),
                    )
                }
                ExecStatus::ProtocolViolation => (Some("protocol_violation"), result.error.clone()),
                ExecStatus::Cancelled => (Some(cancel_code(reason)), Some(cancel_note(reason))),
                ExecStatus::OomKilled => (Some("memory_limit"), result.error.clone()),
                ExecStatus::TimedOut => (Some("time_limit"), result.error.clone()),
            };
            (state_of(result.status), code, error)
        }
    };
    ResultSummary {
        state,
        error_code: code.map(str::to_string),
        value_json: outcome.value_json.clone(),
        error,
        warnings: outcome.warnings.clone(),
        exit_code: outcome.exit_code,
        usage: usage_of(&result.usage),
        start_ms: result.timings.start_ms,
        duration_ms: result.timings.total_ms,
        stdout_truncated: result.stdout_truncated,
        stderr_truncated: result.stderr_truncated,
        // The artifacts the agent stored (see `drive`).
        artifacts: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::LOST_ON_SHUTDOWN;

    #[test]
    fn states_follow_the_pool() {
        assert_eq!(state_of(ExecStatus::Succeeded), ExecState::Succeeded);
        assert_eq!(state_of(ExecStatus::Failed), ExecState::Failed);
        assert_eq!(state_of(ExecStatus::OomKilled), ExecState::OomKilled);
        assert_eq!(state_of(ExecStatus::TimedOut), ExecState::TimedOut);
        assert_eq!(state_of(ExecStatus::Cancelled), ExecState::Cancelled);
        assert_eq!(state_of(ExecStatus::OutputLimit), ExecState::OutputLimit);
        assert_eq!(state_of(ExecStatus::ProtocolViolation), ExecState::Failed);
    }

    fn result(status: ExecStatus) -> ExecResult {
        ExecResult {
            id: "sb-1".into(),
            status,
            outcome: Default::default(),
            error: Some("runtime note".into()),
            timings: Default::default(),
            usage: Default::default(),
            stdout_truncated: false,
            stderr_truncated: false,
            artifacts: Vec::new(),
        }
    }

    #[test]
    fn stopped_before_the_claim_is_cancelled_or_lost_with_the_agent() {
        let s = stopped_before_start(CancelReason::SupersededByTab, None);
        assert_eq!(
            (s.state, s.error_code.as_deref()),
            (ExecState::Cancelled, Some("superseded_by_tab"))
        );
        // Killed because the agent shuts down (it asks for a cancel too): lost, as after
        // the claim, not cancelled by its user.
        let s = stopped_before_start(CancelReason::Requested, Some(LOST_ON_SHUTDOWN));
        assert_eq!(
            (s.state, s.error_code.as_deref(), s.error.as_deref()),
            (
                ExecState::Lost,
                Some("agent_shutdown"),
                Some(LOST_ON_SHUTDOWN)
            )
        );
        let after_claim = summarise(
            &result(ExecStatus::Cancelled),
            "r",
            Some(LOST_ON_SHUTDOWN),
            None,
        );
        assert_eq!(
            (after_claim.state, after_claim.error_code),
            (s.state, s.error_code)
        );
    }

    #[test]
    fn summaries_say_why() {
        let s = summarise(&result(ExecStatus::OutputLimit), "r", None, None);
        assert_eq!(
            (s.state, s.error_code.as_deref(), s.error.as_deref()),
            (
                ExecState::OutputLimit,
                Some("output_limit"),
                Some("runtime note")
            )
        );
        let s = summarise(&result(ExecStatus::ProtocolViolation), "r", None, None);
        assert_eq!(
            (s.state, s.error_code.as_deref()),
            (ExecState::Failed, Some("protocol_violation"))
        );
        let s = summarise(&result(ExecStatus::TimedOut), "r", None, None);
        assert_eq!(s.error_code.as_deref(), Some("time_limit"));
        let s = summarise(
            &result(ExecStatus::Cancelled),
            "r",
            None,
            Some(CancelReason::SupersededByTab),
        );
        assert_eq!(s.state, ExecState::Cancelled);
        assert!(s.error.unwrap().contains("same tab"));
        // A forced drain says why in the result.
        let forced = crate::agent::DrainForced::Deadline(Duration::from_secs(90)).note();
        let s = summarise(&result(ExecStatus::Cancelled), "r", Some(&forced), None);
        assert_eq!(
            (s.state, s.error_code.as_deref(), s.error.as_deref()),
            (
                ExecState::Lost,
                Some("agent_shutdown"),
                Some("the host shut down before it finished: its drain deadline (90s) passed")
            )
        );
        let mut failed = result(ExecStatus::Failed);
        failed.outcome.error = Some(hatchery_sandbox::zygote::protocol::ErrorInfo {
            message: "boom".into(),
            call: Some("f()".into()),
            kind: "runtime".into(),
        });
        let s = summarise(&failed, "r", None, None);
        assert_eq!(s.error.as_deref(), Some("Error in f(): boom"));
        failed.outcome.error = Some(hatchery_sandbox::zygote::protocol::ErrorInfo {
            message: "ZeroDivisionError: division by zero".into(),
            call: Some("Traceback (most recent call last):\n  File \"<code>\", line 1".into()),
            kind: "runtime".into(),
        });
        let s = summarise(&failed, "python", None, None);
        assert_eq!(
            s.error.as_deref(),
            Some("Traceback (most recent call last):\n  File \"<code>\", line 1\nZeroDivisionError: division by zero")
        );
        let s = summarise(&result(ExecStatus::Succeeded), "r", None, None);
        assert_eq!(s.error, None);
    }
}
