//! The sandbox's side of artifacts: once the code has run, the plot pages
//! ([`PLOT_DIR`]) and the files the code left in the output folder ([`OUTPUT_DIR`]) go
//! to the pool owner, within the limits the run asked for. What cannot go — a name an
//! artifact may not have, something that is not a regular file, or more than the limits
//! allow — is left out with a line on stderr that says so; the owner refuses anything
//! beyond the limits, so honest code never causes a violation.
//!
//! This runs inside the sandbox, as the user's uid, after the user's code: nothing here
//! is trusted by the owner (see [`crate::upstream`]), it only keeps honest executions
//! within the protocol.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::spec::{OUTPUT_DIR, PLOT_DIR};
use crate::upstream::{valid_artifact_name, SandboxWriter, Stream};
use crate::zygote::protocol::ArtifactLimits;

/// Creates the (empty) output folder of a new sandbox, owned by its user. The plot
/// folder is made by the first plot (so a sandbox that draws nothing has an empty
/// `/tmp`).
pub fn prepare() -> std::io::Result<()> {
    match std::fs::create_dir(OUTPUT_DIR) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// Sends the plot pages, then the output folder's files, each folder in name order.
pub fn send(up: &SandboxWriter, limits: ArtifactLimits) {
    let mut left = Left {
        count: limits.max_count,
        bytes: limits.max_bytes,
        sent: Vec::new(),
    };
    for (dir, label) in [(PLOT_DIR, "plot"), (OUTPUT_DIR, "out")] {
        let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(dir) {
            Ok(entries) => entries.flatten().map(|e| e.file_name()).collect(),
            Err(_) => continue,
        };
        names.sort();
        for name in names {
            let shown = name.to_string_lossy();
            if let Err(why) = left.send_one(up, Path::new(dir), &name) {
                let note = format!("hatchery: {label}/{shown} was not returned: {why}\n");
                let _ = up.output(Stream::Stderr, note.as_bytes());
            }
        }
    }
}

/// What the limits still allow, and the names already sent.
struct Left {
    count: u32,
    bytes: u64,
    sent: Vec<String>,
}

impl Left {
    fn send_one(
        &mut self,
        up: &SandboxWriter,
        dir: &Path,
        name: &std::ffi::OsStr,
    ) -> Result<(), String> {
        let name = name
            .to_str()
            .filter(|n| valid_artifact_name(n))
            .ok_or("a name may only have letters, digits, '.', '-' and '_' (128 at most)")?;
        if self.sent.iter().any(|s| s == name) {
            return Err("an artifact of that name was already returned".into());
        }
        // Not followed if it is a link; a FIFO does not block the open.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(dir.join(name))
            .map_err(|_| "not a regular file".to_string())?;
        let meta = file.metadata().map_err(|e| e.to_string())?;
        if !meta.is_file() {
            return Err("not a regular file".into());
        }
        if self.count == 0 {
            return Err("the limit on the number of artifacts was reached".into());
        }
        let data = read_at_most(&mut file, self.bytes)
            .ok_or("the limit on the artifacts' total size was reached")?;
        up.artifact(name, &data)
            .map_err(|e| format!("the channel failed: {e}"))?;
        self.count -= 1;
        self.bytes -= data.len() as u64;
        self.sent.push(name.to_string());
        Ok(())
    }
}

/// The whole file if it has at most `max` bytes (it may still be growing: what is read
/// is what counts).
fn read_at_most(file: &mut File, max: u64) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut data)
        .ok()?;
    (data.len() as u64 <= max).then_some(data)
}
