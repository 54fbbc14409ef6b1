//! Reading results back from the guest's serial console.
//!
//! The guest's init prints markers of the form `@@@hatchery:<nonce>:<event>@@@` on their
//! own lines around the command it runs; everything between `begin` and `exit=<code>` is
//! the command's output. The nonce is fresh for every boot, so output that happens to
//! look like a marker (a test printing one, an earlier boot's log) cannot end a run.
//! [`ConsoleScanner`] consumes the console incrementally, line by line, so a long test
//! run streams out as it happens. This module is pure: no I/O beyond the nonce.

use std::collections::VecDeque;
use std::io::Read;

/// How many console lines [`ConsoleScanner::tail`] keeps.
pub const TAIL_LINES: usize = 60;

/// The per-boot marker prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Markers {
    nonce: String,
}

impl Markers {
    /// Markers with a fresh random nonce.
    pub fn random() -> Self {
        let mut bytes = [0u8; 8];
        let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if read.is_err() {
            // Not secret, only unlikely to collide: fall back to time and pid.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            bytes = ((nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
        }
        Self::with_nonce(&bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    /// Markers with a given nonce (letters and digits only).
    pub fn with_nonce(nonce: &str) -> Self {
        debug_assert!(nonce.chars().all(|c| c.is_ascii_alphanumeric()));
        Self {
            nonce: nonce.to_owned(),
        }
    }

    /// The nonce the guest's init must use.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// `@@@hatchery:<nonce>:`.
    pub fn prefix(&self) -> String {
        format!("@@@hatchery:{}:", self.nonce)
    }

    /// The full marker line for `event`, as the guest prints it.
    pub fn line(&self, event: &str) -> String {
        format!("{}{event}@@@", self.prefix())
    }
}

/// Something the guest's init announced.
#[derive(Debug, Clone, PartialEq)]
pub enum GuestEvent {
    /// `/init` started; the kernel's uptime then, in seconds.
    Init { uptime: Option<f64> },
    /// The composed root is mounted (`overlay` or `readonly`) and the command is next.
    Ready { root: String, uptime: Option<f64> },
    /// The command's output starts on the next line.
    Begin,
    /// The command exited with this status (128 + n for signal n).
    Exit(i32),
    /// Setting up the guest failed before the command could run.
    SetupError(String),
}

/// One step of the console, as the scanner classifies it.
#[derive(Debug, PartialEq)]
pub enum ConsoleItem<'a> {
    /// A line of kernel or init output outside the command (no newline).
    Console(&'a str),
    /// A line of the command's output (no newline; raw bytes).
    Output(&'a [u8]),
    /// A marker.
    Event(GuestEvent),
}

/// Classifies the serial console line by line as bytes arrive.
#[derive(Debug)]
pub struct ConsoleScanner {
    prefix: Vec<u8>,
    partial: Vec<u8>,
    in_command: bool,
    held_blank: bool,
    panic: Option<String>,
    tail: VecDeque<String>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl ConsoleScanner {
    pub fn new(markers: &Markers) -> Self {
        Self {
            prefix: markers.prefix().into_bytes(),
            partial: Vec::new(),
            in_command: false,
            held_blank: false,
            panic: None,
            tail: VecDeque::with_capacity(TAIL_LINES),
        }
    }

    /// Consumes `bytes` and reports every completed line to `sink`.
    pub fn feed(&mut self, bytes: &[u8], sink: &mut dyn FnMut(ConsoleItem<'_>)) {
        self.partial.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.partial[start..].iter().position(|&b| b == b'\n') {
            let line = self.partial[start..start + nl].to_vec();
            self.line(&line, sink);
            start += nl + 1;
        }
        self.partial.drain(..start);
    }

    /// Reports a trailing line without newline (call once the console is closed).
    pub fn finish(&mut self, sink: &mut dyn FnMut(ConsoleItem<'_>)) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, sink);
        }
        if self.held_blank {
            self.held_blank = false;
            sink(ConsoleItem::Output(b""));
        }
    }

    /// The first `Kernel panic - not syncing` line seen, if any.
    pub fn panic_line(&self) -> Option<&str> {
        self.panic.as_deref()
    }

    /// Whether the command's output is being read (after `begin`, before `exit`).
    pub fn in_command(&self) -> bool {
        self.in_command
    }

    /// The last [`TAIL_LINES`] lines of the console, for error reports.
    pub fn tail(&self) -> String {
        let mut out = String::new();
        for line in &self.tail {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    fn line(&mut self, raw: &[u8], sink: &mut dyn FnMut(ConsoleItem<'_>)) {
        let mut line = raw;
        while let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let text = String::from_utf8_lossy(line);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text.clone().into_owned());
        if self.panic.is_none() {
            if let Some(at) = text.find("Kernel panic - not syncing") {
                self.panic = Some(text[at..].to_owned());
            }
        }

        if let Some((at, event)) = self.event(line) {
            if self.held_blank && (at > 0 || !matches!(event, GuestEvent::Exit(_))) {
                sink(ConsoleItem::Output(b""));
            }
            self.held_blank = false;
            if at > 0 {
                // Something else wrote to the console on the marker's line.
                if self.in_command {
                    sink(ConsoleItem::Output(&line[..at]));
                } else {
                    sink(ConsoleItem::Console(&String::from_utf8_lossy(&line[..at])));
                }
            }
            match event {
                GuestEvent::Begin => self.in_command = true,
                GuestEvent::Exit(_) => self.in_command = false,
                _ => {}
            }
            sink(ConsoleItem::Event(event));
        } else if self.in_command {
            // Init prints a newline before the exit marker in case the output did not end
            // with one; hold blank lines back until we know they are not that newline.
            if self.held_blank {
                sink(ConsoleItem::Output(b""));
                self.held_blank = false;
            }
            if line.is_empty() {
                self.held_blank = true;
            } else {
                sink(ConsoleItem::Output(line));
            }
        } else {
            sink(ConsoleItem::Console(&text));
        }
    }

    /// The marker on `line`, with the byte offset where it starts.
    fn event(&self, line: &[u8]) -> Option<(usize, GuestEvent)> {
        let at = find(line, &self.prefix)?;
        let rest = &line[at + self.prefix.len()..];
        let end = find(rest, b"@@@")?;
        let body = std::str::from_utf8(&rest[..end]).ok()?;
        Some((at, parse_event(body)?))
    }
}

/// Parses the body of a marker (`init uptime=2.51`, `begin`, `exit=3`, ...).
pub fn parse_event(body: &str) -> Option<GuestEvent> {
    let field = |name: &str| {
        body.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    let uptime = || field("uptime").and_then(|u| u.parse().ok());
    if body == "begin" {
        Some(GuestEvent::Begin)
    } else if let Some(code) = body.strip_prefix("exit=") {
        code.trim().parse().ok().map(GuestEvent::Exit)
    } else if let Some(reason) = body.strip_prefix("error=") {
        Some(GuestEvent::SetupError(reason.trim().to_owned()))
    } else if body.starts_with("init") {
        Some(GuestEvent::Init { uptime: uptime() })
    } else if body.starts_with("ready") {
        Some(GuestEvent::Ready {
            root: field("root").unwrap_or_default(),
            uptime: uptime(),
        })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `log` in chunks of `chunk` bytes and returns what the sink saw.
    fn scan(log: &str, chunk: usize) -> (Vec<String>, Vec<GuestEvent>, String, ConsoleScanner) {
        let markers = Markers::with_nonce("n0nce");
        let mut scanner = ConsoleScanner::new(&markers);
        let mut console = Vec::new();
        let mut events = Vec::new();
        let mut output = Vec::new();
        let mut sink = |item: ConsoleItem<'_>| match item {
            ConsoleItem::Console(line) => console.push(line.to_owned()),
            ConsoleItem::Output(line) => {
                output.extend_from_slice(line);
                output.push(b'\n');
            }
            ConsoleItem::Event(e) => events.push(e),
        };
        for piece in log.as_bytes().chunks(chunk) {
            scanner.feed(piece, &mut sink);
        }
        scanner.finish(&mut sink);
        (console, events, String::from_utf8(output).unwrap(), scanner)
    }

    const LOG: &str = "SeaBIOS\r\n\
[    2.33] Run /init as init process\r\n\
@@@hatchery:n0nce:init uptime=2.51@@@\r\n\
@@@hatchery:n0nce:ready root=overlay uptime=3.07@@@\r\n\
@@@hatchery:n0nce:begin@@@\r\n\
running 2 tests\r\n\
\r\n\
test result: ok\r\n\
\r\n\
@@@hatchery:n0nce:exit=3@@@\r\n\
[    9.10] reboot: Power down\r\n";

    #[test]
    fn splits_console_output_and_events_across_chunk_boundaries() {
        for chunk in [1, 7, 64, 4096] {
            let (console, events, output, _) = scan(LOG, chunk);
            assert_eq!(
                console,
                [
                    "SeaBIOS",
                    "[    2.33] Run /init as init process",
                    "[    9.10] reboot: Power down"
                ]
            );
            assert_eq!(
                events,
                [
                    GuestEvent::Init { uptime: Some(2.51) },
                    GuestEvent::Ready {
                        root: "overlay".into(),
                        uptime: Some(3.07)
                    },
                    GuestEvent::Begin,
                    GuestEvent::Exit(3),
                ]
            );
            // The blank line init adds before the exit marker is dropped; others stay.
            assert_eq!(output, "running 2 tests\n\ntest result: ok\n");
        }
    }

    #[test]
    fn markers_with_another_nonce_are_output() {
        let log = "@@@hatchery:n0nce:begin@@@\n@@@hatchery:other:exit=0@@@\nok\n";
        let (_, events, output, scanner) = scan(log, 5);
        assert_eq!(events, [GuestEvent::Begin]);
        assert_eq!(output, "@@@hatchery:other:exit=0@@@\nok\n");
        assert!(scanner.in_command());
    }

    #[test]
    fn marker_after_kernel_noise_on_the_same_line_is_found() {
        let log = "@@@hatchery:n0nce:begin@@@\nno newline at end[  5.1] x: y @@@hatchery:n0nce:exit=0@@@\n";
        let (_, events, output, _) = scan(log, 3);
        assert_eq!(events, [GuestEvent::Begin, GuestEvent::Exit(0)]);
        assert_eq!(output, "no newline at end[  5.1] x: y \n");
    }

    #[test]
    fn setup_errors_and_panics_are_reported() {
        let log = "@@@hatchery:n0nce:error=mount 9p hostroot failed@@@\n\
[ 3.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
[ 3.3] ---[ end Kernel panic";
        let (_, events, _, scanner) = scan(log, 16);
        assert_eq!(
            events,
            [GuestEvent::SetupError("mount 9p hostroot failed".into())]
        );
        assert_eq!(
            scanner.panic_line(),
            Some("Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100")
        );
        assert!(scanner.tail().ends_with("[ 3.3] ---[ end Kernel panic\n"));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let (_, _, _, scanner) = scan(&log, 100);
        let tail = scanner.tail();
        assert_eq!(tail.lines().count(), TAIL_LINES);
        assert!(tail.starts_with("line 40\n") && tail.ends_with("line 99\n"));
    }

    #[test]
    fn parses_event_bodies() {
        assert_eq!(parse_event("exit=137"), Some(GuestEvent::Exit(137)));
        assert_eq!(parse_event("exit=x"), None);
        assert_eq!(parse_event("init"), Some(GuestEvent::Init { uptime: None }));
        assert_eq!(parse_event("whatever"), None);
        let m = Markers::with_nonce("abc123");
        assert_eq!(m.line("begin"), "@@@hatchery:abc123:begin@@@");
        assert_eq!(Markers::random().nonce().len(), 16);
    }
}
