//! Admission: whether a new execution may be queued, and which of its user's executions
//! it cancels. The path of one submission:
//!
//! 1. [`crate::platform::Platform::submit`] validates the request, resolves the caller's
//!    policy, seals the code into the object store and builds the rules.
//! 2. [`crate::store::Store::admit`] decides atomically — the embedded store under its
//!    lock, PostgreSQL in one transaction under a per-user advisory lock — with the same
//!    rule, [`decide`]: the tab's active executions are superseded (R10), then the oldest
//!    beyond the user's parallelism cap are cancelled (R11); unless the platform's queue
//!    is full, the new record is stored `queued`.
//! 3. The platform sends the cancels on (a running execution's agent kills it; the new
//!    one waits for it before it starts, see [`ExecutionRecord::displaces`]) and submits
//!    the new execution to the scheduler.
//!
//! Nothing here does I/O: the stores hold the records and apply the decision.

use serde::{Deserialize, Serialize};

use crate::model::{CancelReason, ExecEvent, ExecState, ExecutionRecord};

/// Limits of one admission decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionRules {
    /// Active (queued or running, not cancel-requested) executions one user may have,
    /// the new one included (R11).
    pub max_parallel: u32,
    /// Queued executions the whole platform holds before answering 503.
    pub max_queued: usize,
}

/// What admission decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Admission {
    /// The record was stored as `queued`; these executions must now be cancelled (their
    /// `cancel` field is already set in the store).
    Admitted {
        cancelled: Vec<(String, CancelReason)>,
        /// The new execution as stored (`queued`, or `cancelled` at once when it is
        /// itself beyond the cap), and the events its admission appended to its log.
        record: Box<ExecutionRecord>,
        events: Vec<ExecEvent>,
    },
    /// The platform's queue is full: nothing was stored.
    QueueFull { queued: usize },
    /// The policies changed since the version the admission was given (see
    /// [`crate::store::Store::admit_at`]): nothing was stored; read them again.
    StalePolicy,
}

/// Queued or running, and not cancel-requested: what counts against the parallelism cap.
pub fn is_active(r: &ExecutionRecord) -> bool {
    matches!(r.state, ExecState::Queued | ExecState::Running) && r.cancel.is_none()
}

/// Which executions one admission cancels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Indexes into the user's active executions, with why: first those of the new
    /// execution's tab (oldest first), then the oldest beyond the cap.
    pub cancel: Vec<(usize, CancelReason)>,
    /// The new execution itself goes over the cap (only under a cap of 0): it is stored
    /// cancelled at once.
    pub cancel_new: bool,
}

/// The decision for a new execution of `tab` (if any), given the same user's `active`
/// executions ([`is_active`]), oldest first by admission order. The new one is the
/// newest, so it goes over the cap only when `max_parallel` is 0.
pub fn decide(active: &[&ExecutionRecord], tab: Option<&str>, max_parallel: u32) -> Decision {
    let mut cancel: Vec<(usize, CancelReason)> = Vec::new();
    // R10: the tab's active executions go.
    if let Some(tab) = tab {
        for (i, r) in active.iter().enumerate() {
            if r.tab_id.as_deref() == Some(tab) {
                cancel.push((i, CancelReason::SupersededByTab));
            }
        }
    }
    // R11: what remains plus the new one must fit in the cap; the oldest go.
    let remaining: Vec<usize> = (0..active.len())
        .filter(|i| !cancel.iter().any(|(d, _)| d == i))
        .collect();
    let excess = (remaining.len() + 1).saturating_sub(max_parallel as usize);
    for &i in remaining.iter().take(excess) {
        cancel.push((i, CancelReason::ParallelismCap));
    }
    Decision {
        cancel,
        cancel_new: excess > remaining.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Limits;

    fn rec(id: &str, tab: Option<&str>) -> ExecutionRecord {
        let limits = Limits {
            memory_bytes: 1 << 28,
            cpus: 1.0,
            pids: 64,
            time_limit_ms: 1_000,
            max_artifacts: 0,
            max_artifact_bytes: 0,
        };
        ExecutionRecord {
            tab_id: tab.map(str::to_string),
            ..ExecutionRecord::queued(id, "o", "u", "r", limits, 0)
        }
    }

    #[test]
    fn the_tab_goes_first_then_the_oldest_beyond_the_cap() {
        let (a, b, c) = (rec("a", Some("t")), rec("b", None), rec("c", Some("t")));
        let active = [&a, &b, &c];
        let d = decide(&active, Some("t"), 2);
        assert_eq!(
            d.cancel,
            vec![
                (0, CancelReason::SupersededByTab),
                (2, CancelReason::SupersededByTab)
            ]
        );
        assert!(!d.cancel_new);
        // Without a tab: three active plus the new one under a cap of 2.
        let d = decide(&active, None, 2);
        assert_eq!(
            d.cancel,
            vec![
                (0, CancelReason::ParallelismCap),
                (1, CancelReason::ParallelismCap)
            ]
        );
        assert!(!d.cancel_new);
        // Room for everyone: nothing goes.
        assert_eq!(decide(&active, None, 4), Decision::default());
    }

    #[test]
    fn only_a_cap_of_zero_cancels_the_new_one() {
        let a = rec("a", None);
        let d = decide(&[&a], None, 0);
        assert_eq!(d.cancel, vec![(0, CancelReason::ParallelismCap)]);
        assert!(d.cancel_new);
        assert!(decide(&[], None, 0).cancel_new);
        assert!(!decide(&[], None, 1).cancel_new);
    }
}
