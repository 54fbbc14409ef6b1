//! What a sandbox tells its pool owner: binary frames on the sandbox's channel, read by the
//! owner as **hostile input**.
//!
//! The channel's sandbox end is held by the very process that runs user code, so anything
//! may arrive on it: a frame written by native code the user loaded, a header without its
//! body, a length of four gigabytes, garbage, descriptors. This module owns the format and
//! its limits; the reader ([`ChannelReader`]) never blocks and never trusts a length it
//! has not checked, and every way a frame can be wrong is a [`Violation`] that ends the
//! execution. What the frames may claim is deliberately little: the order of events, the
//! bytes of output, progress, the value and how the code ended — never a status, a
//! timing beyond a bounded start mark, or usage (the owner takes those from its own clock
//! and the cgroup).
//!
//! A frame is `u32 LE length` (of what follows) `|| u8 kind || body`:
//!
//! | kind | body | limit |
//! |---|---|---|
//! | 1 setup error | JSON `{stage, message}` | |
//! | 2 ready | empty | |
//! | 3 started | `u64 LE` CLOCK_MONOTONIC ns | |
//! | 4 stdout, 5 stderr | raw bytes | 1..=[`MAX_DATA`] |
//! | 6 progress | `f64 LE` fraction in 0..=1, then a UTF-8 message | [`MAX_PROGRESS_MESSAGE`] |
//! | 7 value | a piece of the value's JSON text | 1..=[`MAX_DATA`] |
//! | 8 finished | JSON [`Outcome`] (its `value_json` travels in value frames) | [`MAX_DATA`] |
//! | 9 artifact | `u16 LE` name length, the name, then a piece of the file's bytes | a name [`valid_artifact_name`]; pieces of one name are appended in order |
//!
//! The sender ([`SandboxWriter`]) cuts output and values into pieces within these limits
//! and trims the texts of an outcome, so that honest code never produces a violation.

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::zygote::protocol::Outcome;

/// Largest piece of output or of a value in one frame, and the largest `finished` frame.
pub const MAX_DATA: usize = 64 << 10;
/// Largest progress message (bytes of UTF-8).
pub const MAX_PROGRESS_MESSAGE: usize = 1024;
/// Largest text of a setup error, and of one field of an outcome (error message, call,
/// one warning).
pub const MAX_TEXT: usize = 8 << 10;
/// Most warnings an outcome carries.
pub const MAX_WARNINGS: usize = 50;
/// The largest frame body (kind byte included) any kind may have.
pub const MAX_FRAME: usize = 1 + MAX_DATA;

const SETUP_ERROR: u8 = 1;
const READY: u8 = 2;
const STARTED: u8 = 3;
const STDOUT: u8 = 4;
const STDERR: u8 = 5;
const PROGRESS: u8 = 6;
const VALUE: u8 = 7;
const FINISHED: u8 = 8;
const ARTIFACT: u8 = 9;

/// The longest artifact name (bytes).
pub const MAX_ARTIFACT_NAME: usize = 128;

/// A name an artifact may have: 1 to [`MAX_ARTIFACT_NAME`] letters, digits, `.`, `-` and
/// `_`, not starting with a dot (no paths, no hidden files, nothing a browser or a shell
/// reads as more than a name).
pub fn valid_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_ARTIFACT_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// Which output stream a piece of output belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum FromSandbox {
    /// A containment step failed before the sandbox became ready.
    SetupError { stage: String, message: String },
    /// Fully contained and waiting for code (the owner freezes it now).
    Ready,
    /// The first user statement is about to run (CLOCK_MONOTONIC of the host, ns).
    Started { monotonic_ns: u64 },
    /// Console output of the language runtime (R's `print`, `cat`, `message`).
    Output { stream: Stream, data: Vec<u8> },
    /// `progress(fraction, message)`.
    Progress { fraction: f64, message: String },
    /// A piece of the JSON text of the last value.
    Value(Vec<u8>),
    /// How the code ended, as the runtime saw it.
    Finished(Outcome),
    /// A piece of a file the code produced (a plot page, a file in the output folder),
    /// appended to what came before under the same name.
    Artifact { name: String, data: Vec<u8> },
}

impl FromSandbox {
    /// A short name for messages ("progress", "finished", ...).
    pub fn name(&self) -> &'static str {
        match self {
            FromSandbox::SetupError { .. } => "setup_error",
            FromSandbox::Ready => "ready",
            FromSandbox::Started { .. } => "started",
            FromSandbox::Output {
                stream: Stream::Stdout,
                ..
            } => "stdout",
            FromSandbox::Output {
                stream: Stream::Stderr,
                ..
            } => "stderr",
            FromSandbox::Progress { .. } => "progress",
            FromSandbox::Value(_) => "value",
            FromSandbox::Finished(_) => "finished",
            FromSandbox::Artifact { .. } => "artifact",
        }
    }
}

/// Why what came out of a sandbox is not a valid frame (or not valid where it came).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error("a frame declared {0} bytes, more than the {MAX_FRAME} allowed")]
    TooLarge(u64),
    #[error("an empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed {kind} frame: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("a frame carried descriptors or other ancillary data")]
    Ancillary,
    #[error("{received} frame where {expected} was expected")]
    OutOfOrder {
        expected: &'static str,
        received: &'static str,
    },
    #[error("the start mark is outside the claim window")]
    StartOutsideWindow,
}

impl Violation {
    fn malformed(kind: &'static str, reason: impl Into<String>) -> Violation {
        Violation::Malformed {
            kind,
            reason: reason.into(),
        }
    }
}

/// Reassembles frames from bytes that arrive in any pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already decoded.
    start: usize,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds bytes read from the channel.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > MAX_FRAME {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that do not make a whole frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole frame, if there is one. A declared length is checked before
    /// anything waits for its bytes.
    pub fn next_frame(&mut self) -> Result<Option<FromSandbox>, Violation> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as u64;
        if len == 0 {
            return Err(Violation::Empty);
        }
        if len > MAX_FRAME as u64 {
            return Err(Violation::TooLarge(len));
        }
        let len = len as usize;
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let frame = decode(avail[4], &avail[5..4 + len]);
        self.start += 4 + len;
        frame.map(Some)
    }
}

fn decode(kind: u8, body: &[u8]) -> Result<FromSandbox, Violation> {
    match kind {
        SETUP_ERROR => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Setup {
                stage: String,
                message: String,
            }
            let s: Setup = serde_json::from_slice(body)
                .map_err(|e| Violation::malformed("setup_error", e.to_string()))?;
            Ok(FromSandbox::SetupError {
                stage: s.stage,
                message: s.message,
            })
        }
        READY if body.is_empty() => Ok(FromSandbox::Ready),
        READY => Err(Violation::malformed("ready", "unexpected body")),
        STARTED => {
            let ns: [u8; 8] = body
                .try_into()
                .map_err(|_| Violation::malformed("started", "expected 8 bytes"))?;
            Ok(FromSandbox::Started {
                monotonic_ns: u64::from_le_bytes(ns),
            })
        }
        STDOUT | STDERR => {
            let name = if kind == STDOUT { "stdout" } else { "stderr" };
            if body.is_empty() {
                return Err(Violation::malformed(name, "no data"));
            }
            Ok(FromSandbox::Output {
                stream: if kind == STDOUT {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                },
                data: body.to_vec(),
            })
        }
        PROGRESS => {
            if body.len() < 8 {
                return Err(Violation::malformed("progress", "no fraction"));
            }
            let fraction = f64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
            if !(0.0..=1.0).contains(&fraction) {
                return Err(Violation::malformed(
                    "progress",
                    "fraction outside 0..=1 or not a number",
                ));
            }
            let message = &body[8..];
            if message.len() > MAX_PROGRESS_MESSAGE {
                return Err(Violation::malformed("progress", "message too long"));
            }
            let message = std::str::from_utf8(message)
                .map_err(|_| Violation::malformed("progress", "message is not UTF-8"))?;
            Ok(FromSandbox::Progress {
                fraction,
                message: message.to_string(),
            })
        }
        VALUE if body.is_empty() => Err(Violation::malformed("value", "no data")),
        VALUE => Ok(FromSandbox::Value(body.to_vec())),
        FINISHED => {
            let o: Outcome = serde_json::from_slice(body)
                .map_err(|e| Violation::malformed("finished", e.to_string()))?;
            check_outcome(&o)?;
            Ok(FromSandbox::Finished(o))
        }
        ARTIFACT => {
            let bad = |why: &str| Err(Violation::malformed("artifact", why));
            if body.len() < 2 {
                return bad("no name length");
            }
            let len = u16::from_le_bytes([body[0], body[1]]) as usize;
            let Some(name) = body.get(2..2 + len) else {
                return bad("the name is longer than the frame");
            };
            let name = match std::str::from_utf8(name) {
                Ok(n) if valid_artifact_name(n) => n.to_string(),
                _ => return bad("not a valid artifact name"),
            };
            Ok(FromSandbox::Artifact {
                name,
                data: body[2 + len..].to_vec(),
            })
        }
        other => Err(Violation::UnknownKind(other)),
    }
}

fn check_outcome(o: &Outcome) -> Result<(), Violation> {
    let bad = |why: &str| Err(Violation::malformed("finished", why));
    if o.value_json.is_some() {
        return bad("the value travels in value frames");
    }
    if o.warnings.len() > MAX_WARNINGS {
        return bad("too many warnings");
    }
    let texts = o
        .warnings
        .iter()
        .chain(o.error.iter().map(|e| &e.message))
        .chain(o.error.iter().filter_map(|e| e.call.as_ref()))
        .chain(o.value_class.iter().flatten());
    for t in texts {
        if t.len() > MAX_TEXT {
            return bad("a text is too long");
        }
    }
    if o.value_class.as_ref().is_some_and(|c| c.len() > 64) {
        return bad("too many classes");
    }
    if let Some(e) = &o.error {
        if !matches!(e.kind.as_str(), "parse" | "runtime") {
            return bad("unknown error kind");
        }
    }
    Ok(())
}

/// What one read of the channel found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOutcome {
    /// Some bytes were added to the decoder.
    Data(usize),
    /// Nothing to read now.
    WouldBlock,
    /// The sandbox's end is closed.
    Closed,
}

/// The pool owner's reading end of a sandbox's channel: non-blocking, ancillary data
/// refused, bytes handed to a [`Decoder`].
pub struct ChannelReader {
    decoder: Decoder,
    buf: Box<[u8]>,
}

impl Default for ChannelReader {
    fn default() -> Self {
        ChannelReader::new()
    }
}

impl ChannelReader {
    pub fn new() -> ChannelReader {
        ChannelReader {
            decoder: Decoder::new(),
            buf: vec![0u8; MAX_FRAME + 4].into_boxed_slice(),
        }
    }

    pub fn decoder(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// One non-blocking `recvmsg`. Descriptors sent along are closed at once and, like
    /// any other ancillary data or truncated control data, are a violation.
    pub fn read(&mut self, sock: BorrowedFd<'_>) -> Result<ReadOutcome, Violation> {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut self.buf)];
        let msg = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => return Ok(ReadOutcome::WouldBlock),
            Err(_) => return Ok(ReadOutcome::Closed),
        };
        let mut ancillary = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                ancillary = true;
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor for us; owning
                        // it closes it.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        let n = msg.bytes;
        if ancillary {
            return Err(Violation::Ancillary);
        }
        if n == 0 {
            return Ok(ReadOutcome::Closed);
        }
        self.decoder.feed(&self.buf[..n]);
        Ok(ReadOutcome::Data(n))
    }
}

/// The sandbox's sending end. Writes block (the sandbox waits for its owner); a closed
/// channel is reported so the caller can stop.
pub struct SandboxWriter {
    fd: RawFd,
}

impl SandboxWriter {
    /// # Safety
    /// `fd` must be the sandbox's end of its channel and stay open while this is used.
    pub unsafe fn from_raw(fd: RawFd) -> SandboxWriter {
        SandboxWriter { fd }
    }

    fn frame(&self, kind: u8, parts: &[&[u8]]) -> Result<(), Errno> {
        let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        debug_assert!(len <= MAX_FRAME);
        let header = (len as u32).to_le_bytes();
        let kind = [kind];
        let mut iov: Vec<std::io::IoSlice<'_>> = Vec::with_capacity(2 + parts.len());
        iov.push(std::io::IoSlice::new(&header));
        iov.push(std::io::IoSlice::new(&kind));
        for p in parts {
            iov.push(std::io::IoSlice::new(p));
        }
        // One sendmsg per frame: a frame of at most MAX_FRAME bytes is queued as one piece,
        // so frames of processes sharing the channel (forked R children) never interleave.
        let total = 4 + len;
        let mut sent = 0usize;
        while sent < total {
            let mut skip = sent;
            let rest: Vec<std::io::IoSlice<'_>> = iov
                .iter()
                .filter_map(|s| {
                    if skip >= s.len() {
                        skip -= s.len();
                        None
                    } else {
                        let out = std::io::IoSlice::new(&s[skip..]);
                        skip = 0;
                        Some(out)
                    }
                })
                .collect();
            match nix::sys::socket::sendmsg::<()>(
                self.fd,
                &rest,
                &[],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => sent += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn setup_error(&self, stage: &str, message: &str) -> Result<(), Errno> {
        let body = serde_json::json!({
            "stage": truncate_str(stage, 256),
            "message": truncate_str(message, MAX_TEXT),
        })
        .to_string();
        self.frame(SETUP_ERROR, &[body.as_bytes()])
    }

    pub fn ready(&self) -> Result<(), Errno> {
        self.frame(READY, &[])
    }

    pub fn started(&self, monotonic_ns: u64) -> Result<(), Errno> {
        self.frame(STARTED, &[&monotonic_ns.to_le_bytes()])
    }

    /// Output in pieces of at most [`MAX_DATA`] bytes.
    pub fn output(&self, stream: Stream, data: &[u8]) -> Result<(), Errno> {
        let kind = match stream {
            Stream::Stdout => STDOUT,
            Stream::Stderr => STDERR,
        };
        for piece in data.chunks(MAX_DATA) {
            self.frame(kind, &[piece])?;
        }
        Ok(())
    }

    /// A whole artifact: its bytes in pieces that fit a frame under its name (one empty
    /// piece for an empty file). `name` must be [`valid_artifact_name`].
    pub fn artifact(&self, name: &str, data: &[u8]) -> Result<(), Errno> {
        if !valid_artifact_name(name) {
            return Err(Errno::EINVAL);
        }
        let header = (name.len() as u16).to_le_bytes();
        let room = MAX_DATA - 2 - name.len();
        if data.is_empty() {
            return self.frame(ARTIFACT, &[&header, name.as_bytes()]);
        }
        for piece in data.chunks(room) {
            self.frame(ARTIFACT, &[&header, name.as_bytes(), piece])?;
        }
        Ok(())
    }

    /// Progress; the message is cut to [`MAX_PROGRESS_MESSAGE`] bytes (on a character
    /// boundary).
    pub fn progress(&self, fraction: f64, message: &str) -> Result<(), Errno> {
        let message = truncate_str(message, MAX_PROGRESS_MESSAGE);
        self.frame(PROGRESS, &[&fraction.to_le_bytes(), message.as_bytes()])
    }

    /// The outcome: its value in value frames, then the finished frame with every text
    /// trimmed to the limits.
    pub fn finished(&self, mut outcome: Outcome) -> Result<(), Errno> {
        if let Some(value) = outcome.value_json.take() {
            for piece in value.as_bytes().chunks(MAX_DATA) {
                self.frame(VALUE, &[piece])?;
            }
        }
        trim_outcome(&mut outcome);
        // Escaping can make the JSON longer than its texts: shed warnings, then halve
        // the error message, until it fits.
        let body = loop {
            let body = serde_json::to_vec(&outcome).unwrap_or_else(|_| b"{}".to_vec());
            if body.len() < MAX_DATA {
                break body;
            }
            if outcome.warnings.pop().is_some() {
                continue;
            }
            match &mut outcome.error {
                Some(e) if !e.message.is_empty() => {
                    let half = truncate_str(&e.message, e.message.len() / 2).to_string();
                    e.message = half;
                    e.call = None;
                }
                _ => {
                    outcome.value_class = None;
                    outcome.error = None;
                }
            }
        };
        self.frame(FINISHED, &[&body])
    }
}

/// Trims an outcome's texts so that its JSON fits one frame.
fn trim_outcome(o: &mut Outcome) {
    o.warnings.truncate(MAX_WARNINGS);
    // 50 warnings of 1 KiB, an error of 8 + 1 KiB and the classes stay under 64 KiB.
    for w in &mut o.warnings {
        *w = truncate_str(w, 1024).to_string();
    }
    if let Some(e) = &mut o.error {
        e.message = truncate_str(&e.message, MAX_TEXT - 16).to_string();
        if let Some(c) = &mut e.call {
            *c = truncate_str(c, 1024).to_string();
        }
    }
    if let Some(classes) = &mut o.value_class {
        classes.truncate(16);
        for c in classes.iter_mut() {
            *c = truncate_str(c, 128).to_string();
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

/// A connected pair of stream sockets (close-on-exec) for one sandbox's channel.
pub fn socketpair() -> Result<(OwnedFd, OwnedFd), Errno> {
    crate::frame::socketpair()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zygote::protocol::ErrorInfo;
    use std::os::fd::AsFd;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 1) as u32).to_le_bytes().to_vec();
        out.push(kind);
        out.extend_from_slice(body);
        out
    }

    fn all(bytes: &[u8]) -> Result<Vec<FromSandbox>, Violation> {
        let mut d = Decoder::new();
        d.feed(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn frames_survive_any_split() {
        let (a, b) = socketpair().unwrap();
        // SAFETY: `a` stays open for the test.
        let w = unsafe { SandboxWriter::from_raw(a.as_raw_fd()) };
        w.started(42).unwrap();
        w.output(Stream::Stdout, b"hello").unwrap();
        w.progress(0.5, "half").unwrap();
        w.finished(Outcome {
            ok: true,
            value_json: Some("[1,2]".into()),
            ..Default::default()
        })
        .unwrap();
        drop(a);
        let mut bytes = Vec::new();
        let mut r = ChannelReader::new();
        loop {
            match r.read(b.as_fd()).unwrap() {
                ReadOutcome::Data(_) => {}
                ReadOutcome::Closed => break,
                ReadOutcome::WouldBlock => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        while let Some(f) = r.decoder().next_frame().unwrap() {
            bytes.push(f);
        }
        assert_eq!(
            bytes,
            vec![
                FromSandbox::Started { monotonic_ns: 42 },
                FromSandbox::Output {
                    stream: Stream::Stdout,
                    data: b"hello".to_vec()
                },
                FromSandbox::Progress {
                    fraction: 0.5,
                    message: "half".into()
                },
                FromSandbox::Value(b"[1,2]".to_vec()),
                FromSandbox::Finished(Outcome {
                    ok: true,
                    ..Default::default()
                }),
            ]
        );
        // Byte by byte, the same frames.
        let mut raw = frame(STARTED, &7u64.to_le_bytes());
        raw.extend(frame(STDERR, b"x"));
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in &raw {
            d.feed(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_any_wait() {
        let mut d = Decoder::new();
        d.feed(&u32::MAX.to_le_bytes());
        assert_eq!(d.next_frame(), Err(Violation::TooLarge(u32::MAX as u64)));
        let mut d = Decoder::new();
        d.feed(&((MAX_FRAME + 1) as u32).to_le_bytes());
        assert!(matches!(d.next_frame(), Err(Violation::TooLarge(_))));
    }

    #[test]
    fn a_partial_header_is_just_pending() {
        let mut d = Decoder::new();
        d.feed(&[10, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 2);
    }

    #[test]
    fn malformed_frames_are_violations() {
        assert_eq!(all(&0u32.to_le_bytes()), Err(Violation::Empty));
        assert_eq!(all(&frame(99, b"")), Err(Violation::UnknownKind(99)));
        assert!(all(&frame(READY, b"x")).is_err());
        assert!(all(&frame(STARTED, b"123")).is_err());
        assert!(all(&frame(STDOUT, b"")).is_err());
        let mut nan = f64::NAN.to_le_bytes().to_vec();
        nan.extend_from_slice(b"m");
        assert!(all(&frame(PROGRESS, &nan)).is_err());
        let mut two = 2.0f64.to_le_bytes().to_vec();
        two.extend_from_slice(b"m");
        assert!(all(&frame(PROGRESS, &two)).is_err());
        let mut long = 0.5f64.to_le_bytes().to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_PROGRESS_MESSAGE + 1));
        assert!(all(&frame(PROGRESS, &long)).is_err());
        let mut bad_utf8 = 0.5f64.to_le_bytes().to_vec();
        bad_utf8.push(0xff);
        assert!(all(&frame(PROGRESS, &bad_utf8)).is_err());
        assert!(all(&frame(FINISHED, b"not json")).is_err());
        assert!(all(&frame(FINISHED, br#"{"ok":true,"value_json":"1"}"#)).is_err());
        assert!(all(&frame(FINISHED, br#"{"ok":true,"extra":1}"#)).is_err());
        let many = serde_json::to_vec(&Outcome {
            warnings: vec!["w".into(); MAX_WARNINGS + 1],
            ..Default::default()
        })
        .unwrap();
        assert!(all(&frame(FINISHED, &many)).is_err());
    }

    #[test]
    fn descriptors_are_a_violation_and_are_closed() {
        let (a, b) = socketpair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let body = frame(READY, b"");
        let iov = [std::io::IoSlice::new(&body)];
        let fds = [r.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(a.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
            .unwrap();
        let mut reader = ChannelReader::new();
        let before = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert_eq!(reader.read(b.as_fd()), Err(Violation::Ancillary));
        let after = std::fs::read_dir("/proc/self/fd").unwrap().count();
        assert!(after <= before, "the passed descriptor was kept");
    }

    #[test]
    fn honest_outcomes_are_trimmed_to_fit() {
        let (a, b) = socketpair().unwrap();
        // SAFETY: `a` stays open for the test.
        let w = unsafe { SandboxWriter::from_raw(a.as_raw_fd()) };
        let huge = "é".repeat(100_000);
        let big_value = "1".repeat(3 * MAX_DATA + 5);
        std::thread::scope(|s| {
            s.spawn(|| {
                w.progress(1.0, &huge).unwrap();
                w.finished(Outcome {
                    ok: false,
                    value_json: Some(big_value.clone()),
                    error: Some(ErrorInfo {
                        message: huge.clone(),
                        call: Some(huge.clone()),
                        kind: "runtime".into(),
                    }),
                    warnings: vec![huge.clone(); 200],
                    ..Default::default()
                })
                .unwrap();
                drop(a);
            });
            let mut r = ChannelReader::new();
            let mut frames = Vec::new();
            loop {
                match r.read(b.as_fd()).unwrap() {
                    ReadOutcome::Data(_) => {
                        while let Some(f) = r.decoder().next_frame().unwrap() {
                            frames.push(f);
                        }
                    }
                    ReadOutcome::Closed => break,
                    ReadOutcome::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                }
            }
            let value: Vec<u8> = frames
                .iter()
                .filter_map(|f| match f {
                    FromSandbox::Value(v) => Some(v.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(value, big_value.as_bytes());
            assert!(
                matches!(frames.last(), Some(FromSandbox::Finished(o)) if o.warnings.len() == MAX_WARNINGS)
            );
        });
    }

    fn artifact_frame(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut body = (name.len() as u16).to_le_bytes().to_vec();
        body.extend_from_slice(name);
        body.extend_from_slice(data);
        frame(ARTIFACT, &body)
    }

    #[test]
    fn artifact_names_are_plain_file_names() {
        for ok in [
            "plot-001.png",
            "a",
            "results_2.csv",
            "x.tar.gz",
            &"n".repeat(128),
        ] {
            assert!(valid_artifact_name(ok), "{ok}");
        }
        let long = "n".repeat(129);
        for bad in [
            "", ".", "..", ".hidden", "a/b", "../etc", "a b", "é.png", "a\\b", "a\0", "a:b", &long,
        ] {
            assert!(!valid_artifact_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn artifact_frames_decode_and_bad_ones_are_violations() {
        assert_eq!(
            all(&artifact_frame(b"plot-001.png", b"\x89PNG")),
            Ok(vec![FromSandbox::Artifact {
                name: "plot-001.png".into(),
                data: b"\x89PNG".to_vec()
            }])
        );
        // An empty piece (an empty file) is fine.
        assert!(all(&artifact_frame(b"empty.txt", b"")).is_ok());
        for bad in [
            frame(ARTIFACT, b""),
            frame(ARTIFACT, &[1]),
            // A name longer than the frame.
            frame(ARTIFACT, &[200, 0, b'a']),
            artifact_frame(b"../../etc/passwd", b"x"),
            artifact_frame(b"", b"x"),
            artifact_frame(&[0xff, 0xfe], b"x"),
        ] {
            assert!(
                matches!(
                    all(&bad),
                    Err(Violation::Malformed {
                        kind: "artifact",
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_writer_sends_an_artifact_in_pieces_that_reassemble() {
        let (a, b) = socketpair().unwrap();
        let data: Vec<u8> = (0..3 * MAX_DATA + 17).map(|i| (i * 7) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            // SAFETY: `a` is owned by this thread until it returns.
            let w = unsafe { SandboxWriter::from_raw(a.as_raw_fd()) };
            w.artifact("big.bin", &sent).unwrap();
            w.artifact("empty.txt", b"").unwrap();
            assert_eq!(w.artifact("../x", b"y"), Err(Errno::EINVAL));
            drop(a);
        });
        let mut r = ChannelReader::new();
        let mut got: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            match r.read(b.as_fd()).unwrap() {
                ReadOutcome::Data(_) => {
                    while let Some(f) = r.decoder().next_frame().unwrap() {
                        let FromSandbox::Artifact { name, data } = f else {
                            panic!("not an artifact: {f:?}");
                        };
                        match got.last_mut() {
                            Some((n, d)) if *n == name => d.extend(data),
                            _ => got.push((name, data)),
                        }
                    }
                }
                ReadOutcome::Closed => break,
                ReadOutcome::WouldBlock => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        writer.join().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "big.bin");
        assert!(got[0].1 == data, "the pieces reassemble to the file");
        assert_eq!(got[1], ("empty.txt".to_string(), Vec::new()));
    }
}
