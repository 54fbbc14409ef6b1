//! The life of one pooled sandbox, as an explicit state machine.
//!
//! ```text
//! Forking ─forked─▶ Placing ─placed─▶ Preparing ─ready─▶ Frozen ─claimed─▶ Running
//!    │                 │                  │                 │                 │
//!    └─────────────────┴──────fail────────┴──────died───────┴──exited/killed──┘
//!                                          ▼                                   ▼
//!                                       Failed ─────────reaped────────▶ Reaped ◀─ Exited
//! ```
//!
//! Every transition is in [`SandboxState::next`]; anything else is an
//! [`IllegalTransition`] error. A sandbox is never reused: the only way out of `Running`
//! is towards `Reaped`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// The zygote was asked to fork it.
    Forking,
    /// Forked; being moved into its cgroup.
    Placing,
    /// In its cgroup; finishing its containment inside.
    Preparing,
    /// Contained, frozen, waiting in the pool. Uses no CPU.
    Frozen,
    /// Claimed: limits written, thawed, code handed over; the clock runs.
    Running,
    /// The execution ended (on its own, or killed by timeout, cancel, OOM or output
    /// limit).
    Exited,
    /// It never reached the pool (setup failed, or it died while frozen).
    Failed,
    /// Its processes are gone and its cgroup removed.
    Reaped,
}

/// What happens to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxEvent {
    Forked,
    Placed,
    Ready,
    Claimed,
    Ended,
    /// A step failed, or the process died before it was claimed.
    Failed,
    Reaped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal sandbox transition: {event:?} in state {from:?}")]
pub struct IllegalTransition {
    pub from: SandboxState,
    pub event: SandboxEvent,
}

impl SandboxState {
    /// The state after `event`, or an error if `event` cannot happen in this state.
    pub fn next(self, event: SandboxEvent) -> Result<SandboxState, IllegalTransition> {
        use SandboxEvent as E;
        use SandboxState as S;
        let to = match (self, event) {
            (S::Forking, E::Forked) => S::Placing,
            (S::Placing, E::Placed) => S::Preparing,
            (S::Preparing, E::Ready) => S::Frozen,
            (S::Frozen, E::Claimed) => S::Running,
            (S::Running, E::Ended) => S::Exited,
            (S::Forking | S::Placing | S::Preparing | S::Frozen, E::Failed) => S::Failed,
            (S::Exited | S::Failed, E::Reaped) => S::Reaped,
            (from, event) => return Err(IllegalTransition { from, event }),
        };
        Ok(to)
    }

    /// Whether the sandbox may still hold processes or a cgroup.
    pub fn is_live(self) -> bool {
        !matches!(self, SandboxState::Reaped)
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SandboxState::Forking => "forking",
            SandboxState::Placing => "placing",
            SandboxState::Preparing => "preparing",
            SandboxState::Frozen => "frozen",
            SandboxState::Running => "running",
            SandboxState::Exited => "exited",
            SandboxState::Failed => "failed",
            SandboxState::Reaped => "reaped",
        };
        f.write_str(s)
    }
}

/// A state with a checked `advance`.
#[derive(Debug)]
pub struct Lifecycle {
    state: SandboxState,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            state: SandboxState::Forking,
        }
    }
}

impl Lifecycle {
    pub fn state(&self) -> SandboxState {
        self.state
    }

    pub fn advance(&mut self, event: SandboxEvent) -> Result<SandboxState, IllegalTransition> {
        self.state = self.state.next(event)?;
        Ok(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::SandboxEvent as E;
    use super::SandboxState as S;
    use super::*;

    const ALL_STATES: [S; 8] = [
        S::Forking,
        S::Placing,
        S::Preparing,
        S::Frozen,
        S::Running,
        S::Exited,
        S::Failed,
        S::Reaped,
    ];
    const ALL_EVENTS: [E; 7] = [
        E::Forked,
        E::Placed,
        E::Ready,
        E::Claimed,
        E::Ended,
        E::Failed,
        E::Reaped,
    ];

    #[test]
    fn the_happy_path_runs_once_and_ends_reaped() {
        let mut l = Lifecycle::default();
        for (e, s) in [
            (E::Forked, S::Placing),
            (E::Placed, S::Preparing),
            (E::Ready, S::Frozen),
            (E::Claimed, S::Running),
            (E::Ended, S::Exited),
            (E::Reaped, S::Reaped),
        ] {
            assert_eq!(l.advance(e).unwrap(), s);
        }
        assert!(!l.state().is_live());
    }

    #[test]
    fn a_sandbox_is_never_claimed_twice_or_reused() {
        assert!(S::Running.next(E::Claimed).is_err());
        assert!(S::Exited.next(E::Claimed).is_err());
        assert!(S::Exited.next(E::Ready).is_err());
        assert!(S::Reaped.next(E::Forked).is_err());
        // Only the frozen state can be claimed.
        for s in ALL_STATES {
            assert_eq!(s.next(E::Claimed).is_ok(), s == S::Frozen, "{s:?}");
        }
    }

    #[test]
    fn failures_before_the_claim_go_to_failed_then_reaped() {
        for s in [S::Forking, S::Placing, S::Preparing, S::Frozen] {
            assert_eq!(s.next(E::Failed).unwrap(), S::Failed);
        }
        assert!(
            S::Running.next(E::Failed).is_err(),
            "a running sandbox ends"
        );
        assert_eq!(S::Failed.next(E::Reaped).unwrap(), S::Reaped);
    }

    #[test]
    fn exactly_the_documented_transitions_are_legal() {
        let legal = ALL_STATES
            .iter()
            .flat_map(|s| ALL_EVENTS.iter().map(move |e| (*s, *e)))
            .filter(|(s, e)| s.next(*e).is_ok())
            .count();
        // 5 forward steps + 4 failure edges + 2 reap edges.
        assert_eq!(legal, 11);
        let err = S::Reaped.next(E::Reaped).unwrap_err();
        assert_eq!(
            err.to_string(),
            "illegal sandbox transition: Reaped in state Reaped"
        );
    }
}
