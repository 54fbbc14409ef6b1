//! The embedded store's files under its data directory, and nothing else: every write is
//! crash-safe (an execution's log only grows, one line per change; a policy file is
//! replaced by write-temp + fsync + rename + fsync of the directory), and loading
//! tolerates what a crash can leave behind (temp files, a torn last line). The layout:
//!
//! ```text
//! executions/<id>.log                one execution's log: one sealed change per line
//! admissions.log                     first lines of logs not yet durable by themselves
//! policies/orgs/<org>.json           an org's policy (plaintext)
//! policies/users/<org>/<user>.json   a user's override (plaintext)
//! ```
//!
//! **One log per execution.** Every change to an execution — its admission, a state
//! change, a batch of events — is one line appended to its log, holding the new version
//! of its record (if the change made one) and the events it added, in one `write`. So a
//! change costs one append and, when it must be durable before the caller goes on, one
//! `fdatasync`: no temporary file, no rename, no second file. The logs of executions not
//! yet finished stay open (at most [`OPEN_LOGS_MAX`]), so a change does not look up and
//! open its file again. An admission, which
//! creates a log, is made durable by appending its line to `admissions.log` as well
//! (one `fdatasync` of a file that exists, instead of syncing a new file and its
//! folder); the logs it lists are synced in batches (see [`Disk::append_change`]). A crash loses at most a tail of a log, whole changes only,
//! never one in the middle: a later line is only on disk if the earlier ones are (one
//! file, appended in order). Loading replays each log: the last record version wins,
//! events come in order with `seq` 1, 2, 3, ... (anything else is corruption).
//!
//! **Sealed at rest (R15).** A line is the standard base64 of one sealed blob
//! ([`crate::seal`], AES-256-GCM, the platform's [`Keyring`]) of the change's JSON,
//! bound to the execution id and the line's number, so a line moved to another log or
//! another position fails authentication. Nothing inside a record or an event (owner,
//! tab and model ids, states, code, output, progress, values, errors, warnings) is on
//! disk in plaintext; file names are execution ids, which the platform draws at random.
//! Policies are resource settings written by administrators, not user data, and stay
//! plaintext JSON (their file names are org and user names). Every file is 0600 and
//! every directory 0700 ([`crate::private_files`]).
//!
//! A line that does not authenticate, or names a key the keyring no longer holds, is
//! corruption ([`StoreError::Corrupt`] naming the file and line), never skipped. The one
//! tolerated defect is the tail a crash can leave: bytes after the last newline, or a
//! last line holding zero bytes (blocks the file system allocated but never wrote); it
//! is cut off. A log with no complete line is an admission that never completed (its
//! caller never heard "admitted") and is removed.
//!
//! **Older layouts** are converted when loaded, one execution at a time (its log is
//! written whole and synced, then the old files are removed; a crash in between redoes
//! or finishes it): the sealed layout (`records/<id>.sealed`, one sealed blob, and
//! `events/<id>.sealed`, one sealed event per line) and, before it, the plaintext one
//! (`records/<id>.json`, `events/<id>.jsonl`).
//!
//! Names become file names only through [`check_name`]: `[A-Za-z0-9._@+-]`, not starting
//! with a dot, at most [`MAX_NAME_LEN`] bytes, so no name can escape its folder.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::model::{ExecEvent, ExecutionRecord, Policy};
use crate::private_files::{self, FILE_MODE};
use crate::seal::{Binding, Keyring};
use crate::store::{StoreError, StoreResult};

/// Suffix of execution logs.
const LOG: &str = ".log";
/// Suffix of the sealed record and event files of the older layout.
const SEALED: &str = ".sealed";
/// Suffixes of the plaintext files of data directories written before sealing.
const LEGACY_RECORD: &str = ".json";
const LEGACY_EVENTS: &str = ".jsonl";

/// Longest org, user or execution id that may name a file.
pub const MAX_NAME_LEN: usize = 200;

/// Whether `name` may become a file name: non-empty, at most [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._@+-]`, not starting with a dot. Without `/` and a leading dot a name is
/// one path component other than `.` and `..`: it stays in its folder.
pub fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@' | b'+'))
}

/// [`name_ok`] as an error naming what was refused.
pub fn check_name(what: &str, name: &str) -> StoreResult<()> {
    if name_ok(name) {
        Ok(())
    } else {
        Err(StoreError::InvalidName(format!(
            "{what} {name:?}: only 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 . _ - @ + \
             (not starting with a dot) are allowed"
        )))
    }
}

fn io_err(action: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Io(format!("{action} {}: {e}", path.display()))
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{}: {what}", path.display()))
}

/// Everything read back from a data directory.
#[derive(Default)]
pub struct Loaded {
    pub records: HashMap<String, ExecutionRecord>,
    pub events: HashMap<String, Vec<ExecEvent>>,
    /// Lines in each execution's log (the next change is line `lines + 1`).
    pub lines: HashMap<String, u64>,
    pub org_policies: HashMap<String, Policy>,
    pub user_policies: HashMap<(String, String), Policy>,
}

/// One line of an execution's log, as written.
#[derive(Serialize)]
struct ChangeRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    record: Option<&'a ExecutionRecord>,
    #[serde(skip_serializing_if = "<[ExecEvent]>::is_empty")]
    events: &'a [ExecEvent],
}

/// One line of an execution's log, as read.
#[derive(Deserialize)]
struct Change {
    #[serde(default)]
    record: Option<ExecutionRecord>,
    #[serde(default)]
    events: Vec<ExecEvent>,
}

/// Whether an append must be on disk before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Durable before the call returns: `fdatasync` of the log, or for a log the
    /// append creates, of `admissions.log` (see [`Disk::append_change`]).
    Now,
    /// In the kernel at once (it survives the process), on disk with the next durable
    /// change of its log or by the kernel's writeback, whichever comes first: only a
    /// machine crash can lose it, and then with every later line of its log.
    Later,
}

/// The data directory, and the keyring its execution logs are sealed with.
#[derive(Debug, Clone)]
pub struct Disk {
    dir: PathBuf,
    keyring: Keyring,
    creations: Arc<Mutex<Creations>>,
    /// Logs of executions that are not finished, kept open: a change is then one append
    /// (and maybe one `fdatasync`) without a path lookup and an open each time.
    open: Arc<Mutex<HashMap<String, Arc<File>>>>,
}

/// Logs kept open at most (each is a descriptor of this process).
const OPEN_LOGS_MAX: usize = 256;

/// Logs created since the last checkpoint (see [`Disk::append_change`]).
#[derive(Debug, Default)]
struct Creations {
    /// `admissions.log`, open for appending.
    file: Option<File>,
    /// Lines in it.
    entries: usize,
    /// Executions whose log's folder entry may not be on disk yet.
    pending: Vec<String>,
    /// Whether a pending log was created since the folder of logs was last synced: a
    /// later durable change of a pending log syncs the folder only then (one folder
    /// sync makes every entry created before it durable, so the others need none).
    folder_dirty: bool,
    /// Syncs of the folder of logs so far (what the tests count).
    folder_syncs: u64,
}

impl Creations {
    /// Syncs the folder of logs `dir`: every entry created before the call is then
    /// durable. The flag is cleared first, under the same lock that an admission takes
    /// to set it, so a log created meanwhile keeps it set.
    fn sync_folder(&mut self, dir: &Path) -> StoreResult<()> {
        self.folder_dirty = false;
        self.folder_syncs += 1;
        sync_dir(dir).inspect_err(|_| self.folder_dirty = true)
    }
}

/// A checkpoint runs once `admissions.log` holds this many lines.
const CHECKPOINT_EVERY: usize = 64;

impl Disk {
    /// Creates the folders if missing, and makes the whole tree private (0700 folders,
    /// 0600 files) if an older version left it wider.
    pub fn create(dir: &Path, keyring: Keyring) -> StoreResult<Disk> {
        let disk = Disk {
            dir: dir.to_path_buf(),
            keyring,
            creations: Arc::default(),
            open: Arc::default(),
        };
        for d in [
            disk.dir.clone(),
            disk.logs_dir(),
            disk.org_policies_dir(),
            disk.user_policies_root(),
        ] {
            private_files::create_dir(&d).map_err(|e| io_err("creating", &d, e))?;
        }
        private_files::restrict_tree(&disk.dir)
            .map_err(|e| io_err("restricting the modes under", &disk.dir, e))?;
        Ok(disk)
    }

    fn admissions_path(&self) -> PathBuf {
        self.dir.join("admissions.log")
    }
    fn logs_dir(&self) -> PathBuf {
        self.dir.join("executions")
    }
    fn records_dir(&self) -> PathBuf {
        self.dir.join("records")
    }
    fn events_dir(&self) -> PathBuf {
        self.dir.join("events")
    }
    fn org_policies_dir(&self) -> PathBuf {
        self.dir.join("policies").join("orgs")
    }
    fn user_policies_root(&self) -> PathBuf {
        self.dir.join("policies").join("users")
    }
    fn log_path(&self, id: &str) -> PathBuf {
        self.logs_dir().join(format!("{id}{LOG}"))
    }
    fn record_path(&self, id: &str) -> PathBuf {
        self.records_dir().join(format!("{id}{SEALED}"))
    }
    fn events_path(&self, id: &str) -> PathBuf {
        self.events_dir().join(format!("{id}{SEALED}"))
    }
    fn legacy_record_path(&self, id: &str) -> PathBuf {
        self.records_dir().join(format!("{id}{LEGACY_RECORD}"))
    }
    fn legacy_events_path(&self, id: &str) -> PathBuf {
        self.events_dir().join(format!("{id}{LEGACY_EVENTS}"))
    }

    /// Line `n` of `id`'s log holding `record` (if the change made a new version) and
    /// `events`, with its newline.
    fn seal_change(
        &self,
        id: &str,
        n: u64,
        record: Option<&ExecutionRecord>,
        events: &[ExecEvent],
    ) -> StoreResult<Vec<u8>> {
        let json = serde_json::to_vec(&ChangeRef { record, events })
            .map_err(|e| StoreError::Io(format!("encoding change {n} of {id}: {e}")))?;
        let blob = self
            .keyring
            .seal(Binding::Change { execution: id, n }, &json)
            .map_err(|e| StoreError::Io(format!("sealing change {n} of {id}: {e}")))?;
        let mut line = BASE64.encode(&blob).into_bytes();
        line.push(b'\n');
        Ok(line)
    }

    /// Appends change `n` to `id`'s log (creating the log when `n` is 1): the new
    /// `record` version, if any, and `events`, in one write.
    ///
    /// A log created durably (`n` 1, [`Sync::Now`]: an admission) would cost two syncs of
    /// metadata (the new file, and its folder's entry: about a millisecond together,
    /// more on a busy disk) while the client waits for its 202. Instead the line also
    /// goes to `admissions.log`, a file that already exists, with one `fdatasync`; the
    /// log itself is made durable at the next checkpoint (every [`CHECKPOINT_EVERY`]
    /// admissions, before any removal, and at open) or when a later change of it
    /// syncs. Loading recreates from `admissions.log` any log a crash lost.
    pub fn append_change(
        &self,
        id: &str,
        n: u64,
        record: Option<&ExecutionRecord>,
        events: &[ExecEvent],
        sync: Sync,
    ) -> StoreResult<()> {
        check_name("execution id", id)?;
        let path = self.log_path(id);
        let line = self.seal_change(id, n, record, events)?;
        let kept = if n == 1 {
            None
        } else {
            self.open.lock().unwrap().get(id).cloned()
        };
        let file = match kept {
            Some(f) => f,
            None => Arc::new(
                OpenOptions::new()
                    .create(n == 1)
                    .append(true)
                    .mode(FILE_MODE)
                    .open(&path)
                    .map_err(|e| io_err("opening", &path, e))?,
            ),
        };
        let mut f: &File = &file;
        let before = f
            .metadata()
            .map_err(|e| io_err("reading the size of", &path, e))?
            .len();
        let created = n == 1 && sync == Sync::Now;
        let written = f
            .write_all(&line)
            .map_err(|e| io_err("appending to", &path, e))
            .and_then(|()| match sync {
                Sync::Now if created => self.note_admission(id, &line),
                Sync::Now => f.sync_data().map_err(|e| io_err("syncing", &path, e)),
                Sync::Later => Ok(()),
            });
        if let Err(e) = written {
            self.open.lock().unwrap().remove(id);
            // The change failed and the caller hears so: take back whatever of it
            // reached the file, so the next change is line `n` again (best effort; a
            // torn tail is cut when the log is loaded anyway).
            if n == 1 {
                let _ = fs::remove_file(&path);
            } else {
                let _ = f.set_len(before);
            }
            return Err(e);
        }
        if sync == Sync::Now && !created {
            // Durable data in a log whose folder entry may not be: make the entry
            // durable, unless the folder was synced since a log was last created.
            let mut c = self.creations.lock().unwrap();
            if let Some(i) = c.pending.iter().position(|p| p == id) {
                if c.folder_dirty {
                    c.sync_folder(&self.logs_dir())?;
                }
                c.pending.swap_remove(i);
            }
        }
        // A finished execution's log gets no more changes: it is closed.
        let finished = record.is_some_and(|r| r.state.is_terminal());
        let mut open = self.open.lock().unwrap();
        if finished {
            open.remove(id);
        } else if !open.contains_key(id) {
            if open.len() >= OPEN_LOGS_MAX {
                open.clear();
            }
            open.insert(id.to_string(), file);
        }
        Ok(())
    }

    /// Appends `id`'s first line to `admissions.log` and syncs it; checkpoints when it is
    /// long enough.
    fn note_admission(&self, id: &str, line: &[u8]) -> StoreResult<()> {
        let path = self.admissions_path();
        let mut c = self.creations.lock().unwrap();
        if c.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(FILE_MODE)
                .open(&path)
                .map_err(|e| io_err("opening", &path, e))?;
            c.file = Some(f);
        }
        let entry = [id.as_bytes(), b" ", line].concat();
        let f = c.file.as_mut().expect("opened above");
        let before = f
            .metadata()
            .map_err(|e| io_err("reading the size of", &path, e))?
            .len();
        if let Err(e) = f.write_all(&entry).and_then(|()| f.sync_data()) {
            // Not admitted: nothing may bring it back at the next open.
            let _ = f.set_len(before);
            return Err(io_err("appending to", &path, e));
        }
        c.entries += 1;
        c.pending.push(id.to_string());
        c.folder_dirty = true;
        if c.entries >= CHECKPOINT_EVERY {
            self.checkpoint(&mut c)?;
        }
        Ok(())
    }

    /// Makes every log created since the last checkpoint durable (its data and its
    /// folder entry), then empties `admissions.log`.
    fn checkpoint(&self, c: &mut Creations) -> StoreResult<()> {
        for id in &c.pending {
            let path = self.log_path(id);
            // Most of them are still open (unfinished executions).
            let kept = self.open.lock().unwrap().get(id).cloned();
            if let Some(f) = kept {
                f.sync_data().map_err(|e| io_err("syncing", &path, e))?;
                continue;
            }
            match File::open(&path) {
                Ok(f) => f.sync_data().map_err(|e| io_err("syncing", &path, e))?,
                // Removed meanwhile (its admission failed).
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("opening", &path, e)),
            }
        }
        c.sync_folder(&self.logs_dir())?;
        c.pending.clear();
        let path = self.admissions_path();
        if let Some(f) = c.file.as_ref() {
            f.set_len(0)
                .and_then(|()| f.sync_data())
                .map_err(|e| io_err("emptying", &path, e))?;
        }
        c.entries = 0;
        Ok(())
    }

    /// Recreates the logs a crash lost from `admissions.log` (a log that is missing, or
    /// holds no complete line, gets its first line back), then checkpoints.
    fn replay_admissions(&self) -> StoreResult<()> {
        let path = self.admissions_path();
        if !path.exists() {
            return Ok(());
        }
        let mut recreated = 0usize;
        read_lines(&path, |_, entry| {
            let (id, line) = match entry.iter().position(|&b| b == b' ') {
                Some(at) => (&entry[..at], &entry[at + 1..]),
                None => return Err("not an admission (no execution id)".into()),
            };
            let id = std::str::from_utf8(id)
                .ok()
                .filter(|id| name_ok(id))
                .ok_or("not an admission (no valid execution id)")?;
            let log = self.log_path(id);
            let whole = match fs::read(&log) {
                Ok(bytes) => bytes.contains(&b'\n'),
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(format!("reading {}: {e}", log.display())),
            };
            if !whole {
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .mode(FILE_MODE)
                    .open(&log)
                    .and_then(|mut f| {
                        f.write_all(&[line, b"\n"].concat())?;
                        f.sync_data()
                    })
                    .map_err(|e| format!("recreating {}: {e}", log.display()))?;
                recreated += 1;
            }
            Ok(())
        })?;
        if recreated > 0 {
            tracing::info!(
                executions = recreated,
                "recreated the logs of admissions a crash had not made durable"
            );
        }
        let mut c = self.creations.lock().unwrap();
        c.file = Some(
            OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|e| io_err("opening", &path, e))?,
        );
        self.checkpoint(&mut c)
    }

    /// Removes an execution's log (after a checkpoint, so `admissions.log` can never
    /// bring it back).
    pub fn remove_execution(&self, id: &str) -> StoreResult<()> {
        check_name("execution id", id)?;
        {
            let mut c = self.creations.lock().unwrap();
            if c.entries > 0 {
                self.checkpoint(&mut c)?;
            }
        }
        self.open.lock().unwrap().remove(id);
        remove_if_exists(&self.log_path(id))
    }

    /// Makes earlier removals durable.
    pub fn sync_removals(&self) -> StoreResult<()> {
        sync_dir(&self.logs_dir())
    }

    pub fn write_org_policy(&self, org: &str, p: &Policy) -> StoreResult<()> {
        check_name("org", org)?;
        let bytes = encode_policy(p)?;
        write_atomic(&self.org_policies_dir().join(format!("{org}.json")), &bytes)
    }

    pub fn write_user_policy(&self, org: &str, user: &str, p: &Policy) -> StoreResult<()> {
        check_name("org", org)?;
        check_name("user", user)?;
        let bytes = encode_policy(p)?;
        let dir = self.user_policies_root().join(org);
        if !dir.exists() {
            private_files::create_dir(&dir).map_err(|e| io_err("creating", &dir, e))?;
            sync_dir(&self.user_policies_root())?;
        }
        write_atomic(&dir.join(format!("{user}.json")), &bytes)
    }

    /// Reads everything back. Converts older layouts first, then replays every log;
    /// cleans up after crashes: leftover temp files are removed, a torn last line is cut
    /// off, a log without a complete line is removed. Each record's `last_seq` is its
    /// log's event count.
    pub fn load(&self) -> StoreResult<Loaded> {
        self.convert_older_layouts()?;
        self.replay_admissions()?;
        let mut out = Loaded::default();
        let mut removed = false;
        for (id, path) in named_files(&self.logs_dir(), LOG)? {
            match read_log(&self.keyring, &id, &path)? {
                Some((mut rec, events, lines)) => {
                    rec.last_seq = events.len() as u64;
                    out.records.insert(id.clone(), rec);
                    out.events.insert(id.clone(), events);
                    out.lines.insert(id, lines);
                }
                None => {
                    remove_if_exists(&path)?;
                    removed = true;
                }
            }
        }
        if removed {
            self.sync_removals()?;
        }
        for (org, path) in named_files(&self.org_policies_dir(), ".json")? {
            out.org_policies.insert(org, read_json(&path)?);
        }
        let root = self.user_policies_root();
        for entry in fs::read_dir(&root).map_err(|e| io_err("reading", &root, e))? {
            let entry = entry.map_err(|e| io_err("reading", &root, e))?;
            let org = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || !name_ok(&org) {
                continue;
            }
            for (user, path) in named_files(&entry.path(), ".json")? {
                out.user_policies
                    .insert((org.clone(), user), read_json(&path)?);
            }
        }
        Ok(out)
    }

    /// Converts the executions of older layouts into logs: plaintext files are sealed
    /// first (into the sealed layout), then each sealed record with its events becomes
    /// a log of one line, written whole and synced before the old files are removed
    /// (record first: events without a record are leftovers of a crash). When nothing is
    /// left, the old folders go.
    fn convert_older_layouts(&self) -> StoreResult<()> {
        if !self.records_dir().exists() && !self.events_dir().exists() {
            return Ok(());
        }
        for d in [self.records_dir(), self.events_dir()] {
            private_files::create_dir(&d).map_err(|e| io_err("creating", &d, e))?;
        }
        self.seal_plaintext_files()?;
        let mut converted = 0usize;
        for (id, path) in named_files(&self.records_dir(), SEALED)? {
            let log = self.log_path(&id);
            if !log.exists() {
                let rec = self.read_record(&id, &path)?;
                let events_path = self.events_path(&id);
                let events = if events_path.exists() {
                    read_events(&self.keyring, &id, &events_path)?
                } else {
                    Vec::new()
                };
                write_atomic(&log, &self.seal_change(&id, 1, Some(&rec), &events)?)?;
                converted += 1;
            }
            remove_if_exists(&path)?;
            remove_if_exists(&self.events_path(&id))?;
        }
        // Events without a record: an admission that crashed before its record, or an
        // expiry that crashed between its two removals.
        for (_, path) in named_files(&self.events_dir(), SEALED)? {
            remove_if_exists(&path)?;
        }
        for d in [self.records_dir(), self.events_dir()] {
            sync_dir(&d)?;
            if fs::read_dir(&d)
                .map_err(|e| io_err("reading", &d, e))?
                .next()
                .is_none()
            {
                fs::remove_dir(&d).map_err(|e| io_err("removing", &d, e))?;
            }
        }
        sync_dir(&self.dir)?;
        if converted > 0 {
            tracing::info!(
                executions = converted,
                dir = %self.dir.display(),
                "converted the records and events of an older data directory into execution logs"
            );
        }
        Ok(())
    }

    /// A sealed record file of the older layout, which must authenticate as the record
    /// of `id` and hold it.
    fn read_record(&self, id: &str, path: &Path) -> StoreResult<ExecutionRecord> {
        let blob = fs::read(path).map_err(|e| io_err("reading", path, e))?;
        let json = self
            .keyring
            .open(Binding::Record(id), &blob)
            .map_err(|e| corrupt(path, e))?;
        let rec: ExecutionRecord = serde_json::from_slice(&json).map_err(|e| corrupt(path, e))?;
        if rec.id != id {
            return Err(corrupt(path, format!("holds execution {:?}", rec.id)));
        }
        Ok(rec)
    }

    /// Events of the older sealed layout (one sealed event per line), as they went into
    /// `id`'s events file.
    #[cfg(test)]
    fn seal_events(&self, id: &str, events: &[ExecEvent]) -> StoreResult<Vec<u8>> {
        let mut buf = Vec::new();
        for e in events {
            let json = serde_json::to_vec(e)
                .map_err(|err| StoreError::Io(format!("encoding an event of {id}: {err}")))?;
            let blob = self
                .keyring
                .seal(
                    Binding::Event {
                        execution: id,
                        seq: e.seq,
                    },
                    &json,
                )
                .map_err(|err| StoreError::Io(format!("sealing event {} of {id}: {err}", e.seq)))?;
            buf.extend_from_slice(BASE64.encode(&blob).as_bytes());
            buf.push(b'\n');
        }
        Ok(buf)
    }

    /// Converts the plaintext records and events of a data directory written before
    /// sealing, one execution at a time: its log is written whole (atomically, synced)
    /// before its plaintext files are removed, events first. A crash before the log
    /// exists redoes the execution; after, only the removal is left to do. Plaintext
    /// events without a plaintext record are crash leftovers.
    fn seal_plaintext_files(&self) -> StoreResult<()> {
        let mut removed = false;
        for (id, path) in named_files(&self.records_dir(), LEGACY_RECORD)? {
            let legacy_events = self.legacy_events_path(&id);
            if !self.record_path(&id).exists() && !self.log_path(&id).exists() {
                let rec: ExecutionRecord = read_json(&path)?;
                if rec.id != id {
                    return Err(corrupt(&path, format!("holds execution {:?}", rec.id)));
                }
                let events = if legacy_events.exists() {
                    read_plaintext_events(&legacy_events)?
                } else {
                    Vec::new()
                };
                write_atomic(
                    &self.log_path(&id),
                    &self.seal_change(&id, 1, Some(&rec), &events)?,
                )?;
            }
            remove_if_exists(&legacy_events)?;
            remove_if_exists(&path)?;
            removed = true;
        }
        for (id, path) in named_files(&self.events_dir(), LEGACY_EVENTS)? {
            if !self.legacy_record_path(&id).exists() {
                remove_if_exists(&path)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.records_dir())?;
            sync_dir(&self.events_dir())?;
        }
        Ok(())
    }
}

fn encode_policy(p: &Policy) -> StoreResult<Vec<u8>> {
    serde_json::to_vec_pretty(p).map_err(|e| StoreError::Io(format!("encoding a policy: {e}")))
}

/// Replaces `path` with `bytes` (mode 0600) so that a crash leaves either the old or the
/// new content.
fn write_atomic(path: &Path, bytes: &[u8]) -> StoreResult<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| io_err("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err("renaming", &tmp, e))?;
    match path.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", dir, e))
}

fn remove_if_exists(path: &Path) -> StoreResult<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path, e)),
    }
}

/// The files `<name><suffix>` of `dir` with a valid name, sorted by name; leftover
/// `*.tmp` files of interrupted atomic writes are removed.
fn named_files(dir: &Path, suffix: &str) -> StoreResult<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err("reading", dir, e))? {
        let entry = entry.map_err(|e| io_err("reading", dir, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if file.ends_with(".tmp") {
            remove_if_exists(&path)?;
            continue;
        }
        match file.strip_suffix(suffix) {
            Some(name) if name_ok(name) && path.is_file() => out.push((name.to_string(), path)),
            _ => {}
        }
    }
    out.sort();
    Ok(out)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> StoreResult<T> {
    let bytes = fs::read(path).map_err(|e| io_err("reading", path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| corrupt(path, e))
}

/// The complete lines of an events file (without their newlines), and how many bytes
/// they span. Bytes after the last newline are a write torn by a crash.
fn complete_lines(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    match bytes.iter().rposition(|&b| b == b'\n') {
        Some(last) => (bytes[..last].split(|&b| b == b'\n').collect(), last + 1),
        None => (Vec::new(), 0),
    }
}

/// Reads the complete lines of `path` in order, handing each (numbered from 1) to
/// `line`. A torn tail (bytes after the last newline, or a last line holding zero bytes)
/// is cut off the file so later appends start on a fresh line. An error from `line` is
/// corruption, reported with the file and the line number, and nothing is cut.
fn read_lines(
    path: &Path,
    mut line: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> StoreResult<()> {
    let bytes = fs::read(path).map_err(|e| io_err("reading", path, e))?;
    let (lines, mut good_len) = complete_lines(&bytes);
    for (i, l) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        if i + 1 == lines.len() && l.contains(&0) {
            // Blocks allocated to a write the crash interrupted, never written.
            good_len -= l.len() + 1;
            break;
        }
        line(n, l).map_err(|what| corrupt(path, format!("line {n}: {what}")))?;
    }
    if good_len < bytes.len() {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io_err("opening", path, e))?;
        f.set_len(good_len as u64)
            .and_then(|()| f.sync_all())
            .map_err(|e| io_err("truncating", path, e))?;
    }
    Ok(())
}

/// Execution `id`'s log replayed: its last record version, its events, and its number
/// of lines; `None` when it has no complete line (an admission that never completed).
/// Line n must decode, authenticate as change n of `id` and parse; its events must
/// continue the log's seqs and its record be `id`'s; the first line must hold a record.
fn read_log(
    keyring: &Keyring,
    id: &str,
    path: &Path,
) -> StoreResult<Option<(ExecutionRecord, Vec<ExecEvent>, u64)>> {
    let mut record: Option<ExecutionRecord> = None;
    let mut events: Vec<ExecEvent> = Vec::new();
    let mut lines = 0;
    read_lines(path, |n, line| {
        let blob = BASE64
            .decode(line)
            .map_err(|e| format!("not a sealed change (base64: {e})"))?;
        let json = keyring
            .open(Binding::Change { execution: id, n }, &blob)
            .map_err(|e| format!("change {n} of {id}: {e}"))?;
        let change: Change = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
        match change.record {
            Some(rec) if rec.id != id => {
                return Err(format!("holds a record of execution {:?}", rec.id))
            }
            Some(rec) => record = Some(rec),
            None if n == 1 => return Err("the first change holds no record".into()),
            None => {}
        }
        for e in change.events {
            let due = events.len() as u64 + 1;
            if e.seq != due || e.execution_id != id {
                return Err(format!(
                    "holds event {} of {:?} where event {due} of {id:?} was due",
                    e.seq, e.execution_id
                ));
            }
            events.push(e);
        }
        lines = n;
        Ok(())
    })?;
    Ok(record.map(|rec| (rec, events, lines)))
}

/// A sealed events file of the older layout: complete lines, line n the sealed event n
/// of `id` (see [`read_lines`] for the torn tail and corruption).
fn read_events(keyring: &Keyring, id: &str, path: &Path) -> StoreResult<Vec<ExecEvent>> {
    let mut events: Vec<ExecEvent> = Vec::new();
    read_lines(path, |seq, line| {
        let blob = BASE64
            .decode(line)
            .map_err(|e| format!("not a sealed event (base64: {e})"))?;
        let json = keyring
            .open(Binding::Event { execution: id, seq }, &blob)
            .map_err(|e| format!("event {seq} of {id}: {e}"))?;
        let event: ExecEvent = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
        if event.seq != seq || event.execution_id != id {
            return Err(format!(
                "holds event {} of {:?}",
                event.seq, event.execution_id
            ));
        }
        events.push(event);
        Ok(())
    })?;
    Ok(events)
}

/// A plaintext events file of an older version (one JSON line per event), read to be
/// sealed: complete lines in order with seq 1, 2, 3, ...; an incomplete or unreadable
/// last line is a torn write and dropped; an unreadable line before it or a gap is
/// corruption. The file itself is left as it is (it is replaced).
fn read_plaintext_events(path: &Path) -> StoreResult<Vec<ExecEvent>> {
    let bytes = fs::read(path).map_err(|e| io_err("reading", path, e))?;
    let (lines, _) = complete_lines(&bytes);
    let mut events: Vec<ExecEvent> = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_slice::<ExecEvent>(line) {
            Ok(e) => {
                let want = events.len() as u64 + 1;
                if e.seq != want {
                    return Err(corrupt(
                        path,
                        format!("event seq {} where {want} was due", e.seq),
                    ));
                }
                events.push(e);
            }
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => return Err(corrupt(path, format!("line {}: {e}", i + 1))),
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventBody;

    #[test]
    fn names() {
        for ok in [
            "a",
            "Acme-Corp_2.eu",
            "0123456789abcdef",
            "x..y",
            "ada@example.com",
            "ada+lab@example.co.uk",
            "@",
            "+",
            &"n".repeat(200),
        ] {
            assert!(name_ok(ok), "{ok:?}");
            assert!(check_name("user", ok).is_ok());
        }
        for bad in [
            "",
            ".",
            "..",
            ".x",
            ".@",
            "a/b",
            "../x",
            "x/..",
            "a/../b",
            "/etc/passwd",
            "ada@example.com/..",
            "a\\b",
            "a b",
            "é",
            "ada@exämple.com",
            "a\0b",
            "a\n",
            "a%2Fb@x",
            "a:b",
            "a*b",
            &"n".repeat(201),
            &format!("{}@example.com", "n".repeat(189)),
        ] {
            assert!(!name_ok(bad), "{bad:?}");
            assert!(check_name("org", bad).is_err());
        }
    }

    fn keyring() -> Keyring {
        Keyring::single([5u8; 32])
    }

    fn event(seq: u64) -> ExecEvent {
        ExecEvent {
            execution_id: "x".into(),
            seq,
            at: 1,
            body: EventBody::Stdout(crate::model::OutputData::text("o\n")),
        }
    }

    /// Sealed event line `seq` of execution `x`.
    fn line(seq: u64) -> String {
        let disk = Disk {
            dir: PathBuf::new(),
            keyring: keyring(),
            creations: Arc::default(),
            open: Arc::default(),
        };
        String::from_utf8(disk.seal_events("x", &[event(seq)]).unwrap()).unwrap()
    }

    /// What `read` makes of a file `name` holding `content`, and the file afterwards.
    fn read_back<T>(name: &str, content: &[u8], read: impl FnOnce(&Path) -> T) -> (T, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        let res = read(&path);
        (res, fs::read(&path).unwrap())
    }

    fn events_of(content: &[u8]) -> (StoreResult<Vec<ExecEvent>>, Vec<u8>) {
        read_back("x.sealed", content, |p| read_events(&keyring(), "x", p))
    }

    #[test]
    fn event_files_read_whole_lines_in_order() {
        let whole = format!("{}{}{}", line(1), line(2), line(3));
        let (res, after) = events_of(whole.as_bytes());
        assert_eq!(res.unwrap(), vec![event(1), event(2), event(3)]);
        assert_eq!(after, whole.as_bytes());
        let (res, _) = events_of(b"");
        assert!(res.unwrap().is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let good = format!("{}{}", line(1), line(2));
        let l3 = line(3);
        let zeros = [0u8; 40];
        let zero_line = [&zeros[..], b"\n"].concat();
        let half_zeros = [&l3.as_bytes()[..10], &zeros[..], b"\n"].concat();
        for tail in [
            &l3.as_bytes()[..10],
            &l3.as_bytes()[..l3.len() - 1],
            b"{",
            &zeros[..],
            &zero_line[..],
            &half_zeros[..],
        ] {
            let (res, after) = events_of(&[good.as_bytes(), tail].concat());
            assert_eq!(res.unwrap().len(), 2, "{tail:?}");
            assert_eq!(after, good.as_bytes(), "{tail:?}");
        }
        // Nothing but a torn line.
        let (res, after) = events_of(&line(1).as_bytes()[..5]);
        assert!(res.unwrap().is_empty());
        assert!(after.is_empty());
    }

    #[test]
    fn gaps_reorders_and_bad_lines_anywhere_are_corruption_and_nothing_is_cut() {
        let (l1, l2, l3) = (line(1), line(2), line(3));
        let mut flipped = l2.clone().into_bytes();
        flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap();
        for (content, line_no) in [
            (format!("{l1}{l3}"), 2),          // a gap
            (format!("{l2}{l3}"), 1),          // the start missing
            (format!("{l2}{l1}"), 1),          // reordered
            (format!("{l1}junk\n{l2}"), 2),    // junk in the middle
            (format!("{l1}{flipped}"), 2),     // a flipped character, last line too
            (format!("{l1}{l2}garbage\n"), 3), // a complete last line is not torn
            (format!("{l1}{l2}\n"), 3),        // nor an empty one
        ] {
            let (res, after) = events_of(content.as_bytes());
            match res {
                Err(StoreError::Corrupt(msg)) => {
                    assert!(msg.contains("x.sealed"), "{msg}");
                    assert!(msg.contains(&format!("line {line_no}:")), "{msg}");
                }
                other => panic!("{content:?}: {other:?}"),
            }
            // Corruption is reported, never "repaired" by cutting good data.
            assert_eq!(after, content.as_bytes());
        }
        // A line of another execution does not authenticate here either.
        let disk = Disk {
            dir: PathBuf::new(),
            keyring: keyring(),
            creations: Arc::default(),
            open: Arc::default(),
        };
        let mut other = event(2);
        other.execution_id = "y".into();
        let foreign = String::from_utf8(disk.seal_events("y", &[other]).unwrap()).unwrap();
        let (res, _) = events_of(format!("{l1}{foreign}").as_bytes());
        assert!(matches!(res, Err(StoreError::Corrupt(m)) if m.contains("line 2:")));
    }

    fn record(state: crate::model::ExecState) -> ExecutionRecord {
        let mut r = ExecutionRecord::queued(
            "x",
            "o",
            "u",
            "r",
            crate::model::Limits {
                memory_bytes: 1 << 20,
                cpus: 1.0,
                pids: 10,
                time_limit_ms: 1000,
                max_artifacts: 0,
                max_artifact_bytes: 0,
            },
            1,
        );
        r.state = state;
        r
    }

    /// Line `n` of x's log.
    fn change(n: u64, rec: Option<&ExecutionRecord>, seqs: &[u64]) -> String {
        let disk = Disk {
            dir: PathBuf::new(),
            keyring: keyring(),
            creations: Arc::default(),
            open: Arc::default(),
        };
        let events: Vec<ExecEvent> = seqs.iter().map(|&s| event(s)).collect();
        String::from_utf8(disk.seal_change("x", n, rec, &events).unwrap()).unwrap()
    }

    type Replayed = Option<(ExecutionRecord, Vec<ExecEvent>, u64)>;

    fn log_of(content: &[u8]) -> (StoreResult<Replayed>, Vec<u8>) {
        read_back("x.log", content, |p| read_log(&keyring(), "x", p))
    }

    #[test]
    fn a_log_replays_to_its_last_record_and_all_its_events() {
        use crate::model::ExecState::{Queued, Running, Succeeded};
        let (q, r, s) = (record(Queued), record(Running), record(Succeeded));
        let whole = [
            change(1, Some(&q), &[1]),
            change(2, Some(&r), &[]),
            change(3, None, &[2, 3]),
            change(4, None, &[4]),
            change(5, Some(&s), &[5]),
        ]
        .concat();
        let (res, after) = log_of(whole.as_bytes());
        let (rec, events, lines) = res.unwrap().unwrap();
        assert_eq!(rec, s);
        assert_eq!(events, (1..=5).map(event).collect::<Vec<_>>());
        assert_eq!(lines, 5);
        assert_eq!(after, whole.as_bytes());
        // A torn tail is cut off: the change it held never happened.
        let torn = [&whole.as_bytes()[..whole.len() - 7], b""].concat();
        let (res, after) = log_of(&torn);
        let (rec, events, lines) = res.unwrap().unwrap();
        assert_eq!((rec, events.len(), lines), (r, 4, 4));
        assert_eq!(after.len(), whole.len() - change(5, Some(&s), &[5]).len());
        // Nothing complete at all: an admission that never completed.
        let (res, after) = log_of(&change(1, Some(&q), &[1]).as_bytes()[..30]);
        assert!(res.unwrap().is_none());
        assert!(after.is_empty());
    }

    #[test]
    fn a_moved_line_a_seq_gap_or_a_foreign_record_in_a_log_is_corruption() {
        use crate::model::ExecState::{Queued, Running};
        let (q, r) = (record(Queued), record(Running));
        let mut foreign = record(Running);
        foreign.id = "y".into();
        let l1 = change(1, Some(&q), &[1]);
        for (content, line_no) in [
            // Lines swapped: line 2 sealed as change 3.
            (
                format!("{l1}{}{}", change(3, None, &[2]), change(2, Some(&r), &[])),
                2,
            ),
            // A seq gap inside a log.
            (format!("{l1}{}", change(2, None, &[3])), 2),
            // The first line without a record.
            (change(1, None, &[1]), 1),
            // A record of another execution, sealed for this log.
            (format!("{l1}{}", change(2, Some(&foreign), &[])), 2),
            // A complete last line that does not decode is not a torn write.
            (format!("{l1}garbage\n"), 2),
        ] {
            let (res, after) = log_of(content.as_bytes());
            match res {
                Err(StoreError::Corrupt(msg)) => {
                    assert!(msg.contains("x.log"), "{msg}");
                    assert!(msg.contains(&format!("line {line_no}:")), "{msg}");
                }
                Err(other) => panic!("{content:?}: {other:?}"),
                Ok(_) => panic!("{content:?}: not detected"),
            }
            assert_eq!(after, content.as_bytes(), "nothing is cut");
        }
    }

    #[test]
    fn plaintext_events_of_older_versions_read_as_before() {
        let plain = |seq: u64| format!("{}\n", serde_json::to_string(&event(seq)).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        for tail in ["", "{\"exec", "garbage\n"] {
            fs::write(&path, format!("{}{}{tail}", plain(1), plain(2))).unwrap();
            assert_eq!(
                read_plaintext_events(&path).unwrap(),
                vec![event(1), event(2)],
                "{tail:?}"
            );
        }
        fs::write(&path, format!("{}{}", plain(1), plain(3))).unwrap();
        assert!(matches!(
            read_plaintext_events(&path),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn the_folder_of_logs_is_synced_once_for_the_logs_created_before_it() {
        use crate::model::ExecState;
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::create(dir.path(), keyring()).unwrap();
        let syncs = |disk: &Disk| disk.creations.lock().unwrap().folder_syncs;
        let admit = |id: &str| {
            let mut rec = record(ExecState::Queued);
            rec.id = id.into();
            disk.append_change(id, 1, Some(&rec), &[], Sync::Now)
                .unwrap();
        };
        let finish = |id: &str| {
            let mut rec = record(ExecState::Succeeded);
            rec.id = id.into();
            disk.append_change(id, 2, Some(&rec), &[], Sync::Now)
                .unwrap();
        };
        for id in ["a", "b", "c"] {
            admit(id);
        }
        assert_eq!(
            syncs(&disk),
            0,
            "an admission is durable through admissions.log"
        );
        // The first finish syncs the folder; it holds the entries of all three logs.
        finish("a");
        finish("b");
        assert_eq!(syncs(&disk), 1);
        // A log created since then needs the folder synced again, once.
        admit("d");
        finish("c");
        finish("d");
        assert_eq!(syncs(&disk), 2);
        // A checkpoint empties admissions.log only once every pending log's data and
        // entry are durable: no log is left pending, and all four read back.
        disk.remove_execution("zz").unwrap();
        assert!(disk.creations.lock().unwrap().pending.is_empty());
        let loaded = disk.load().unwrap();
        for id in ["a", "b", "c", "d"] {
            assert_eq!(loaded.records[id].state, ExecState::Succeeded, "{id}");
        }
    }

    #[test]
    fn atomic_writes_replace_and_leave_no_temp_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
