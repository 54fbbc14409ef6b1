//! Length-prefixed JSON frames over a Unix stream socket, with file descriptors passed
//! alongside (SCM_RIGHTS): the transport of the agent ↔ zygote ↔ sandbox protocol
//! ([`crate::zygote::protocol`]).
//!
//! A frame is a 4-byte little-endian length and that many bytes of JSON, written with one
//! `sendmsg`. Descriptors ride on the frame's first byte; because ancillary data is a
//! barrier for stream reads, reading the 4-byte header with `recvmsg` returns exactly the
//! descriptors of that frame. Received descriptors are close-on-exec.

use std::io::IoSlice;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest frame accepted (user code travels in frames).
pub const MAX_FRAME: usize = 64 << 20;
/// Most descriptors one frame may carry.
pub const MAX_FDS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the channel")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("channel i/o: {0}")]
    Io(#[from] Errno),
    #[error("unexpected message: expected {expected}, received {received}")]
    Unexpected {
        expected: &'static str,
        received: String,
    },
}

/// Sends `msg` with `fds` attached.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[RawFd]) -> Result<(), FrameError> {
    send_json(sock, &serde_json::to_vec(msg)?, fds)
}

/// Sends a message already serialized to JSON (`body`) with `fds` attached.
pub fn send_json(sock: BorrowedFd<'_>, body: &[u8], fds: &[RawFd]) -> Result<(), FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let header = (body.len() as u32).to_le_bytes();
    let mut sent = 0usize;
    let total = header.len() + body.len();
    let mut first = true;
    while sent < total {
        let (h, b) = if sent < header.len() {
            (&header[sent..], body)
        } else {
            (&header[..0], &body[sent - header.len()..])
        };
        let iov = [IoSlice::new(h), IoSlice::new(b)];
        let cmsgs = [ControlMessage::ScmRights(fds)];
        let cm: &[ControlMessage] = if first && !fds.is_empty() {
            &cmsgs
        } else {
            &[]
        };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cm, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(n) => {
                sent += n;
                first = false;
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(FrameError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Receives one frame and the descriptors that came with it.
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd<'_>) -> Result<(T, Vec<OwnedFd>), FrameError> {
    let mut header = [0u8; 4];
    let mut fds = Vec::new();
    let mut got = 0usize;
    while got < header.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut header[got..])];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) => return Err(FrameError::Closed),
            Err(e) => return Err(e.into()),
        };
        for c in msg.cmsgs().map_err(FrameError::Io)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed this descriptor for us.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if msg.bytes == 0 {
            return Err(FrameError::Closed);
        }
        got += msg.bytes;
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    let mut got = 0usize;
    while got < len {
        match nix::unistd::read(sock, &mut body[got..]) {
            Ok(0) => return Err(FrameError::Closed),
            Ok(n) => got += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((serde_json::from_slice(&body)?, fds))
}

/// A connected pair of stream sockets (close-on-exec).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd), Errno> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Msg {
        n: u32,
        s: String,
    }

    #[test]
    fn frames_carry_descriptors_to_the_right_message() {
        let (a, b) = socketpair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        send(
            a.as_fd(),
            &Msg {
                n: 1,
                s: "no fds".into(),
            },
            &[],
        )
        .unwrap();
        send(
            a.as_fd(),
            &Msg {
                n: 2,
                s: "x".repeat(100_000),
            },
            &[r.as_raw_fd()],
        )
        .unwrap();
        send(
            a.as_fd(),
            &Msg {
                n: 3,
                s: "after".into(),
            },
            &[],
        )
        .unwrap();
        let (m1, f1): (Msg, _) = recv(b.as_fd()).unwrap();
        assert_eq!((m1.n, f1.len()), (1, 0));
        let (m2, f2): (Msg, _) = recv(b.as_fd()).unwrap();
        assert_eq!((m2.n, m2.s.len(), f2.len()), (2, 100_000, 1));
        let (m3, f3): (Msg, _) = recv(b.as_fd()).unwrap();
        assert_eq!((m3.n, f3.len()), (3, 0));
        // The passed read end is a working copy of the pipe.
        nix::unistd::write(&w, b"hi").unwrap();
        let mut buf = [0u8; 2];
        nix::unistd::read(&f2[0], &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(a);
        assert!(matches!(recv::<Msg>(b.as_fd()), Err(FrameError::Closed)));
    }
}
