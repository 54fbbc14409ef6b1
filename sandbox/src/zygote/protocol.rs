//! Messages between the pool owner (the agent), the zygote and each pooled sandbox.
//!
//! Two channels, both Unix stream sockets:
//!
//! * **control** (agent ↔ zygote, fd 3 of the zygote): [`crate::frame`] JSON frames; the
//!   agent asks for forks; the zygote answers with the new sandbox's descriptors
//!   attached. The zygote never runs user code.
//! * **sandbox** (agent ↔ one forked sandbox): placement and the code go down as
//!   [`crate::frame`] JSON frames; everything the sandbox reports comes up as
//!   [`crate::upstream`] binary frames, which the agent reads as hostile input — the
//!   sandbox's end is held by the process that runs user code.
//!
//! Wrappers with intent-named methods turn protocol drift into a typed
//! [`FrameError::Unexpected`] instead of a silent misread.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::frame::{self, FrameError};
use crate::upstream::{ChannelReader, FromSandbox, ReadOutcome, SandboxWriter, Violation};

/// Agent → zygote. Every message also tells the zygote that the agent is done with the
/// sandboxes forked so far (placed in their cgroups or given up): only then may the
/// zygote reap the ones that died, so that no pid the agent is about to write into a
/// cgroup can have been recycled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToZygote {
    /// Fork one sandbox, tagged `slot` so the answer can be matched, that runs user code
    /// as `uid` (its own identity: per-uid kernel quotas are not shared between
    /// sandboxes). With `into_cgroup` the message carries the directory descriptor of
    /// the sandbox's cgroup, made ready by the agent: the sandbox is born in it
    /// (`clone3(CLONE_INTO_CGROUP)`, cgroup v2) and does not wait to be placed. With
    /// `prefault` it faults in the pages a first evaluation touches before it reports
    /// ready ([`super::prefault`]); without, it stays at its smallest.
    Fork {
        slot: u64,
        uid: u32,
        #[serde(default)]
        into_cgroup: bool,
        #[serde(default = "yes")]
        prefault: bool,
    },
    /// Reap the sandboxes that died (sent when the agent has nothing else to say).
    Reap,
    /// Exit (sandboxes already forked die with the zygote).
    Shutdown,
}

fn yes() -> bool {
    true
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
        /// Of the heap's 2 MiB extents (`huge_eligible_bytes`), the bytes mapped by
        /// transparent huge pages when the zygote became ready.
        #[serde(default)]
        huge_bytes: u64,
        #[serde(default)]
        huge_eligible_bytes: u64,
        /// Pages each sandbox populates before it is frozen ([`super::prefault`]):
        /// written (private copies, in its USS) and only mapped.
        #[serde(default)]
        prefault_written_pages: u64,
        #[serde(default)]
        prefault_mapped_pages: u64,
    },
    /// A sandbox was forked. Descriptors attached, in order: pidfd of the sandbox, the
    /// agent's end of its channel, the read ends of its stdout and stderr.
    Forked { slot: u64 },
    /// The fork failed; the zygote lives on. `errno` is the system call's error, when
    /// that is what failed.
    ForkFailed {
        slot: u64,
        error: String,
        #[serde(default)]
        errno: Option<i32>,
    },
    /// The zygote cannot go on (it exits after sending this).
    Fatal { error: String },
}

/// Agent → sandbox (JSON frames of [`crate::frame`]; the other direction is
/// [`crate::upstream`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToSandbox {
    /// The sandbox is in its cgroup: it may finish its containment.
    Placed,
    /// Run this code (the limits are already in the cgroup). `code` is absent when the
    /// code is larger than [`INLINE_CODE_MAX`]: then it comes as a sealed memfd attached
    /// to the frame. With `artifacts`, the plots and the files the code leaves in
    /// [`crate::spec::OUTPUT_DIR`] are sent back, within those limits.
    Run {
        code: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        artifacts: Option<ArtifactLimits>,
    },
}

/// What an execution may send back as artifacts (plot pages and output files): how many,
/// and how many bytes in all. The pool refuses anything beyond them as a violation, so
/// the sandbox's sender keeps within them (and says what it left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactLimits {
    pub max_count: u32,
    pub max_bytes: u64,
}

/// What a claimed sandbox is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    pub code: String,
    pub artifacts: Option<ArtifactLimits>,
}

/// Code up to this size (and up to twice that escaped) travels inside the `run` frame;
/// larger code in a sealed memfd, so that the frame always fits the socket's buffer and
/// can be sent while the sandbox is still frozen.
pub const INLINE_CODE_MAX: usize = 32 << 10;
/// The largest code a sandbox accepts.
pub const MAX_CODE: usize = 64 << 20;

/// How the user's code ended, as the language runtime saw it (what the sandbox may
/// claim; see [`crate::upstream`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// No error (and for fork-exec languages: exit code 0).
    pub ok: bool,
    /// The last value, as JSON (the zygote languages: R, Python).
    #[serde(default)]
    pub value_json: Option<String>,
    #[serde(default)]
    pub value_class: Option<Vec<String>>,
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Exit code of the interpreter (fork-exec languages).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Signal that ended the interpreter (fork-exec languages).
    #[serde(default)]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorInfo {
    pub message: String,
    #[serde(default)]
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

    /// Asks for a fork; with `cgroup` (a directory descriptor of a cgroup v2 cgroup),
    /// the sandbox is born in that cgroup; with `prefault` it populates the pages a first
    /// evaluation touches before it is frozen.
    pub fn request_fork(
        &self,
        slot: u64,
        uid: u32,
        cgroup: Option<BorrowedFd<'_>>,
        prefault: bool,
    ) -> Result<(), FrameError> {
        let msg = ToZygote::Fork {
            slot,
            uid,
            into_cgroup: cgroup.is_some(),
            prefault,
        };
        match cgroup {
            Some(fd) => frame::send(self.sock.as_fd(), &msg, &[fd.as_raw_fd()]),
            None => frame::send(self.sock.as_fd(), &msg, &[]),
        }
    }

    /// Lets the zygote reap the sandboxes that died.
    pub fn reap(&self) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), &ToZygote::Reap, &[])
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

    /// The next message, with the descriptors it carries.
    pub fn recv(&self) -> Result<(ToZygote, Vec<OwnedFd>), FrameError> {
        frame::recv(self.sock.as_fd())
    }
}

/// The agent's view of one sandbox's channel: JSON frames down, hostile binary frames
/// up (read without ever blocking, see [`crate::upstream::ChannelReader`]).
pub struct SandboxChannel {
    sock: OwnedFd,
    reader: ChannelReader,
}

impl SandboxChannel {
    /// Takes the agent's end; it is switched to non-blocking (nothing the sandbox does can
    /// make a read or a write of the agent wait).
    pub fn new(sock: OwnedFd) -> SandboxChannel {
        let _ = nix::fcntl::fcntl(
            &sock,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        SandboxChannel {
            sock,
            reader: ChannelReader::new(),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn placed(&self) -> Result<(), FrameError> {
        frame::send(self.sock.as_fd(), &ToSandbox::Placed, &[])
    }

    /// Hands over the code: inline when small, else in a sealed memfd. Either way the
    /// frame is small enough for the empty socket buffer, so this never waits for the
    /// (frozen) sandbox.
    pub fn run(&self, code: &str, artifacts: Option<ArtifactLimits>) -> Result<(), FrameError> {
        // On the claim path: serialized once, without copying the code first. JSON
        // escaping can multiply the size of control characters by six: the decision is
        // on the escaped size.
        #[derive(Serialize)]
        #[serde(tag = "kind", rename = "run")]
        struct Run<'a> {
            code: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            artifacts: Option<ArtifactLimits>,
        }
        if code.len() <= INLINE_CODE_MAX {
            let body = serde_json::to_vec(&Run { code, artifacts })?;
            if body.len() <= 2 * INLINE_CODE_MAX {
                return frame::send_json(self.sock.as_fd(), &body, &[]);
            }
        }
        let memfd = sealed_memfd(code.as_bytes()).map_err(FrameError::Io)?;
        frame::send(
            self.sock.as_fd(),
            &ToSandbox::Run {
                code: None,
                artifacts,
            },
            &[memfd.as_raw_fd()],
        )
    }

    /// One non-blocking read into the decoder (see [`ChannelReader::read`]).
    pub fn read(&mut self) -> Result<ReadOutcome, Violation> {
        self.reader.read(self.sock.as_fd())
    }

    /// The next whole frame read so far.
    pub fn next_frame(&mut self) -> Result<Option<FromSandbox>, Violation> {
        self.reader.decoder().next_frame()
    }

    /// Whether the sandbox's `ready` has arrived, without waiting: what the channel holds
    /// now is read. Its setup error, any other frame or a closed channel is an error.
    pub fn try_ready(&mut self) -> Result<bool, FrameError> {
        let unexpected = |received: String| FrameError::Unexpected {
            expected: "ready",
            received,
        };
        loop {
            match self.next_frame() {
                Ok(Some(FromSandbox::Ready)) => return Ok(true),
                Ok(Some(other)) => return Err(unexpected(format!("{other:?}"))),
                Ok(None) => {}
                Err(v) => return Err(unexpected(v.to_string())),
            }
            match self.read() {
                Ok(ReadOutcome::Data(_)) => {}
                Ok(ReadOutcome::WouldBlock) => return Ok(false),
                Ok(ReadOutcome::Closed) => return Err(FrameError::Closed),
                Err(v) => return Err(unexpected(v.to_string())),
            }
        }
    }

    /// Waits (up to `timeout`) for the sandbox's `ready`; its setup error, anything else
    /// or nothing is an error.
    pub fn wait_for_ready(&mut self, timeout: Duration) -> Result<(), FrameError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_frame() {
                Ok(Some(FromSandbox::Ready)) => return Ok(()),
                Ok(Some(other)) => {
                    return Err(FrameError::Unexpected {
                        expected: "ready",
                        received: format!("{other:?}"),
                    })
                }
                Ok(None) => {}
                Err(v) => {
                    return Err(FrameError::Unexpected {
                        expected: "ready",
                        received: v.to_string(),
                    })
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FrameError::Unexpected {
                    expected: "ready",
                    received: format!("nothing within {timeout:?}"),
                });
            }
            let mut fds = [nix::poll::PollFd::new(
                self.sock.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = left.as_millis().clamp(1, 60_000) as u16;
            let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
            match self.read() {
                Ok(ReadOutcome::Closed) => return Err(FrameError::Closed),
                Ok(_) => {}
                Err(v) => {
                    return Err(FrameError::Unexpected {
                        expected: "ready",
                        received: v.to_string(),
                    })
                }
            }
        }
    }
}

/// A memfd holding `data`, sealed against any change.
fn sealed_memfd(data: &[u8]) -> Result<OwnedFd, Errno> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"hatchery-code",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut off = 0;
    while off < data.len() {
        match nix::unistd::write(&fd, &data[off..]) {
            Ok(n) => off += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    Errno::result(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// The sandbox's view of its channel.
pub struct SandboxEnd {
    pub sock: OwnedFd,
}

impl SandboxEnd {
    /// The sending half.
    pub fn writer(&self) -> SandboxWriter {
        // SAFETY: the socket lives as long as this SandboxEnd, which outlives every use
        // of the writer in the sandbox's (never returning) main function.
        unsafe { SandboxWriter::from_raw(self.sock.as_raw_fd()) }
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

    /// The code, inline or read from the attached memfd.
    pub fn wait_for_code(&self) -> Result<RunRequest, FrameError> {
        let (msg, fds) = frame::recv(self.sock.as_fd())?;
        match msg {
            ToSandbox::Run {
                code: Some(code),
                artifacts,
            } => Ok(RunRequest { code, artifacts }),
            ToSandbox::Run {
                code: None,
                artifacts,
            } => {
                let fd = fds.first().ok_or(FrameError::Unexpected {
                    expected: "code",
                    received: "a run frame without code".into(),
                })?;
                Ok(RunRequest {
                    code: read_code(fd.as_fd())?,
                    artifacts,
                })
            }
            other => Err(FrameError::Unexpected {
                expected: "run",
                received: format!("{other:?}"),
            }),
        }
    }
}

/// Makes and parses a code frame as [`SandboxEnd::wait_for_code`] will, on bytes made
/// here, and drops the result: a sandbox does it before it is frozen, so the allocator's
/// chunks its first allocations after the claim reuse are its own pages already, not
/// pages shared with the zygote that the claim's path would copy on write (splitting a
/// huge page of the zygote's heap, on the slowest path). Reads and sends nothing. True
/// when the frame parsed as a run with code, as a real one does.
pub fn rehearse_code_frame() -> bool {
    let frame = ToSandbox::Run {
        code: Some("sum(1:10)".into()),
        artifacts: Some(ArtifactLimits {
            max_count: 1,
            max_bytes: 1,
        }),
    };
    let Ok(bytes) = serde_json::to_vec(&frame) else {
        return false;
    };
    let mut body = vec![0u8; bytes.len()];
    body.copy_from_slice(&bytes);
    let parsed = serde_json::from_slice::<ToSandbox>(&body);
    matches!(
        std::hint::black_box(parsed),
        Ok(ToSandbox::Run { code: Some(_), .. })
    )
}

fn read_code(fd: BorrowedFd<'_>) -> Result<String, FrameError> {
    let size = nix::sys::stat::fstat(fd).map_err(FrameError::Io)?.st_size as usize;
    if size > MAX_CODE {
        return Err(FrameError::TooLarge(size));
    }
    let mut code = vec![0u8; size];
    let mut off = 0;
    while off < size {
        match nix::sys::uio::pread(fd, &mut code[off..], off as i64) {
            Ok(0) => break,
            Ok(n) => off += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    code.truncate(off);
    String::from_utf8(code).map_err(|_| FrameError::Unexpected {
        expected: "UTF-8 code",
        received: "bytes that are not UTF-8".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Stream;

    #[test]
    fn the_rehearsed_code_frame_takes_the_path_of_a_real_one() {
        assert!(rehearse_code_frame());
    }

    #[test]
    fn drift_is_a_typed_error() {
        let (a, b) = frame::socketpair().unwrap();
        let agent = SandboxChannel::new(a);
        let sandbox = SandboxEnd { sock: b };
        agent.run("1+1", None).unwrap();
        match sandbox.wait_for_placement() {
            Err(FrameError::Unexpected { expected, received }) => {
                assert_eq!(expected, "placed");
                assert!(received.contains("1+1"));
            }
            other => panic!("{other:?}"),
        }
        agent.placed().unwrap();
        sandbox.wait_for_placement().unwrap();
    }

    #[test]
    fn large_code_travels_in_a_sealed_memfd() {
        let (a, b) = frame::socketpair().unwrap();
        let mut agent = SandboxChannel::new(a);
        let sandbox = SandboxEnd { sock: b };
        let code = format!("x <- \"{}\"", "é".repeat(INLINE_CODE_MAX));
        let limits = Some(ArtifactLimits {
            max_count: 3,
            max_bytes: 1 << 20,
        });
        agent.run(&code, limits).unwrap();
        assert_eq!(
            sandbox.wait_for_code().unwrap(),
            RunRequest {
                code,
                artifacts: limits
            }
        );
        agent.run("small", None).unwrap();
        assert_eq!(sandbox.wait_for_code().unwrap().code, "small");
        agent.run("small", limits).unwrap();
        assert_eq!(sandbox.wait_for_code().unwrap().artifacts, limits);
        sandbox.writer().output(Stream::Stdout, b"out").unwrap();
        sandbox.writer().ready().unwrap();
        agent.wait_for_ready(Duration::from_secs(5)).unwrap_err();
    }
}
