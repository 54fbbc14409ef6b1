//! The typed one-way channel from a sandbox's init and worker back to the supervisor.
//!
//! Messages are JSON lines written with a single `write(2)` each (always shorter than
//! `PIPE_BUF`, so the init's and the worker's messages never interleave). Errors inside the
//! sandbox travel back as data, never as a panic or a log line.

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::{Deserialize, Serialize};

/// What the inside of a sandbox tells its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChildMessage {
    /// A containment step failed; the command never started.
    SetupError { stage: String, message: String },
    /// Every containment step is done; the worker is about to `execve`.
    Confined,
    /// `execve` of the command failed.
    ExecFailed { command: String, errno: i32 },
    /// The command exited normally.
    WorkerExited { code: i32 },
    /// The command was killed by a signal.
    WorkerSignaled { signal: i32 },
}

impl ChildMessage {
    /// Sends the message with one `write(2)`. Used inside the sandbox, where there is no
    /// one to report a failure to: a lost message shows up as a sandbox that died silently.
    pub fn send(&self, fd: BorrowedFd<'_>) {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        let len = line.len().min(libc::PIPE_BUF);
        // SAFETY: writes `len` initialised bytes from `line` to a file descriptor we hold.
        unsafe { libc::write(fd.as_raw_fd(), line.as_ptr().cast(), len) };
    }
}

/// Reads every message until the writers close their end.
pub fn read_all(reader: impl Read) -> Vec<ChildMessage> {
    BufReader::new(reader)
        .lines()
        .map_while(|l| l.ok())
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let msgs = vec![
            ChildMessage::SetupError {
                stage: "mount".into(),
                message: "EPERM".into(),
            },
            ChildMessage::Confined,
            ChildMessage::WorkerExited { code: 3 },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            buf.extend(serde_json::to_vec(m).unwrap());
            buf.push(b'\n');
        }
        assert_eq!(read_all(&buf[..]), msgs);
    }
}
