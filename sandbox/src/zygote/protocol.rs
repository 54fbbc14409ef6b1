//! Messages between the pool owner (the agent), the zygote and each pooled sandbox.
//!
//! Two channels, both [`crate::frame`] streams:
//!
//! * **control** (agent ↔ zygote, fd 3 of the zygote): the agent asks for forks; the
//!   zygote answers with the new sandbox's descriptors attached.
//! * **sandbox** (agent ↔ one forked sandbox): placement, readiness, the code, and
//!   everything the sandbox reports while it runs.
//!
//! Wrappers with intent-named methods turn protocol drift into a typed
//! [`FrameError::Unexpected`] instead of a silent misread.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::frame::{self, FrameError};

/// Agent → zygote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToZygote {
    /// Fork one sandbox, tagged `slot` so the answer can be matched.
    Fork { slot: u64 },
    /// Exit (sandboxes already forked die with the zygote).
    Shutdown,
}

/// Zygote → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromZygote {
    /// The interpreter is initialised and its packages loaded: forks may start.
    Ready {
        language: String,
        packages: Vec<String>,
        init_ms: f64,
        preload_ms: f64,
    },
    /// A sandbox was forked. Descriptors attached, in order: pidfd of the sandbox, the
    /// agent's end of its channel, the read ends of its stdout and stderr.
    Forked { slot: u64 },
    /// The fork failed; the zygote lives on.
    ForkFailed { slot: u64, error: String },
    /// The zygote cannot go on (it exits after sending this).
    Fatal { error: String },
}

/// Agent → sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToSandbox {
    /// The sandbox is in its cgroup: it may finish its containment.
    Placed,
    /// Run this code (the limits are already in the cgroup and it has been thawed).
    Run { code: String },
}

/// Sandbox → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromSandbox {
    /// A containment step failed; the sandbox exits.
    SetupError { stage: String, message: String },
    /// Fully contained, waiting for code (the agent freezes it now).
    Ready,
    /// The first user statement is about to run (CLOCK_MONOTONIC, ns).
    Started { monotonic_ns: u64 },
    /// The user's code called `progress(fraction, message)`.
    Progress { fraction: f64, message: String },
    /// Console output of the language runtime itself (R's `print`, `cat`, `message`).
    /// It travels on the channel, not the pipes, so that it stays in order with progress
    /// and the result; the pipes carry what child processes write. `stream` 1 is stdout,
    /// 2 stderr.
    Output { stream: u8, data: String },
    /// The evaluation ended (the sandbox exits right after).
    Finished(Outcome),
}

/// How the user's code ended, as the language runtime saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// No error (and for fork-exec languages: exit code 0).
    pub ok: bool,
    /// The last value, as JSON (R only).
    pub value_json: Option<String>,
    pub value_class: Option<Vec<String>>,
    pub error: Option<ErrorInfo>,
    pub warnings: Vec<String>,
    /// Exit code of the interpreter (fork-exec languages).
    pub exit_code: Option<i32>,
    /// Signal that ended the interpreter (fork-exec languages).
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub message: String,
    pub call: Option<String>,
    /// `parse` or `runtime`.
    pub kind: String,
}

/// The agent's view of the control channel.
pub struct ControlChannel {
    sock: OwnedFd,
}

impl ControlChannel {
    pub fn new(sock: OwnedFd) -> ControlChannel {
        ControlChannel { sock }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn request_fork(&self, slot: u64) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), &ToZygote::Fork { slot }, &[])
    }

    pub fn shutdown(&self) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), &ToZygote::Shutdown, &[])
    }

    pub fn recv(&self) -> Result<(FromZygote, Vec<OwnedFd>), FrameError> {
        frame::recv(self.sock.as_fd())
    }

    /// Waits for the zygote's `Ready`.
    pub fn wait_for_ready(&self) -> Result<FromZygote, FrameError> {
        match self.recv()?.0 {
            m @ FromZygote::Ready { .. } => Ok(m),
            FromZygote::Fatal { error } => Err(FrameError::Unexpected {
                expected: "ready",
                received: format!("fatal: {error}"),
            }),
            other => Err(FrameError::Unexpected {
                expected: "ready",
                received: format!("{other:?}"),
            }),
        }
    }
}

/// The zygote's view of the control channel.
pub struct ZygoteEnd {
    pub sock: OwnedFd,
}

impl ZygoteEnd {
    pub fn send(&self, msg: &FromZygote, fds: &[RawFd]) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), msg, fds)
    }

    pub fn recv(&self) -> Result<ToZygote, FrameError> {
        Ok(frame::recv(self.sock.as_fd())?.0)
    }
}

/// The agent's view of one sandbox's channel.
pub struct SandboxChannel {
    sock: OwnedFd,
    /// A message read ahead by [`SandboxChannel::peek_output`] and not consumed.
    pending: std::cell::RefCell<Option<FromSandbox>>,
}

impl SandboxChannel {
    pub fn new(sock: OwnedFd) -> SandboxChannel {
        SandboxChannel {
            sock,
            pending: std::cell::RefCell::new(None),
        }
    }

    /// Whether a message was read ahead and waits for [`SandboxChannel::recv`].
    pub fn has_pending(&self) -> bool {
        self.pending.borrow().is_some()
    }

    /// If the next message is already readable and is output of `stream` (0 stdout, 1
    /// stderr), returns its data; any other message is kept for the next `recv`.
    pub fn peek_output(&self, stream: u8) -> Option<String> {
        if self.has_pending() {
            return None;
        }
        let mut fds = [nix::poll::PollFd::new(
            self.sock.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if !matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0) {
            return None;
        }
        match frame::recv::<FromSandbox>(self.sock.as_fd()) {
            Ok((FromSandbox::Output { stream: s, data }, _)) if (s == 2) == (stream == 1) => {
                Some(data)
            }
            Ok((other, _)) => {
                *self.pending.borrow_mut() = Some(other);
                None
            }
            Err(_) => None,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn placed(&self) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), &ToSandbox::Placed, &[])
    }

    pub fn run(&self, code: &str) -> Result<(), FrameError> {
        frame::send(
            self.sock.as_fd(),
            &ToSandbox::Run {
                code: code.to_string(),
            },
            &[],
        )
    }

    pub fn recv(&self) -> Result<FromSandbox, FrameError> {
        if let Some(m) = self.pending.borrow_mut().take() {
            return Ok(m);
        }
        Ok(frame::recv(self.sock.as_fd())?.0)
    }

    /// Waits for `Ready`; a setup error comes back as `Unexpected` with its text.
    pub fn wait_for_ready(&self) -> Result<(), FrameError> {
        match self.recv()? {
            FromSandbox::Ready => Ok(()),
            other => Err(FrameError::Unexpected {
                expected: "ready",
                received: format!("{other:?}"),
            }),
        }
    }
}

/// The sandbox's view of its channel.
pub struct SandboxEnd {
    pub sock: OwnedFd,
}

impl SandboxEnd {
    pub fn send(&self, msg: &FromSandbox) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), msg, &[])
    }

    pub fn wait_for_placement(&self) -> Result<(), FrameError> {
        match frame::recv(self.sock.as_fd())?.0 {
            ToSandbox::Placed => Ok(()),
            other => Err(FrameError::Unexpected {
                expected: "placed",
                received: format!("{other:?}"),
            }),
        }
    }

    pub fn wait_for_code(&self) -> Result<String, FrameError> {
        match frame::recv(self.sock.as_fd())?.0 {
            ToSandbox::Run { code } => Ok(code),
            other => Err(FrameError::Unexpected {
                expected: "run",
                received: format!("{other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_a_typed_error() {
        let (a, b) = frame::socketpair().unwrap();
        let agent = SandboxChannel::new(a);
        let sandbox = SandboxEnd { sock: b };
        agent.run("1+1").unwrap();
        match sandbox.wait_for_placement() {
            Err(FrameError::Unexpected { expected, received }) => {
                assert_eq!(expected, "placed");
                assert!(received.contains("1+1"));
            }
            other => panic!("{other:?}"),
        }
        agent.placed().unwrap();
        sandbox.wait_for_placement().unwrap();
        sandbox
            .send(&FromSandbox::Progress {
                fraction: 0.5,
                message: "half".into(),
            })
            .unwrap();
        assert!(matches!(
            agent.recv().unwrap(),
            FromSandbox::Progress { fraction, .. } if fraction == 0.5
        ));
    }
}
