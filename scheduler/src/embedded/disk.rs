//! The embedded store's files under its data directory, and nothing else: every write is
//! crash-safe (a record or policy file is replaced by write-temp + fsync + rename + fsync
//! of the directory; events are appended one JSON line each), and loading tolerates what
//! a crash can leave behind (temp files, a torn last event line, events without a
//! record). The layout:
//!
//! ```text
//! records/<id>.json                  one execution record
//! events/<id>.jsonl                  its events, one per line, seq 1, 2, 3, ...
//! policies/orgs/<org>.json           an org's policy
//! policies/users/<org>/<user>.json   a user's override
//! ```
//!
//! Names become file names only through [`check_name`]: `[A-Za-z0-9._-]`, not starting
//! with a dot, at most [`MAX_NAME_LEN`] bytes, so no name can escape its folder.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::model::{ExecEvent, ExecutionRecord, Policy};
use crate::store::{StoreError, StoreResult};

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
    pub org_policies: HashMap<String, Policy>,
    pub user_policies: HashMap<(String, String), Policy>,
}

/// The data directory.
#[derive(Debug, Clone)]
pub struct Disk {
    dir: PathBuf,
}

impl Disk {
    /// Creates the folders if missing.
    pub fn create(dir: &Path) -> StoreResult<Disk> {
        let disk = Disk {
            dir: dir.to_path_buf(),
        };
        for d in [
            disk.records_dir(),
            disk.events_dir(),
            disk.org_policies_dir(),
            disk.user_policies_root(),
        ] {
            fs::create_dir_all(&d).map_err(|e| io_err("creating", &d, e))?;
        }
        Ok(disk)
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
    fn record_path(&self, id: &str) -> PathBuf {
        self.records_dir().join(format!("{id}.json"))
    }
    fn events_path(&self, id: &str) -> PathBuf {
        self.events_dir().join(format!("{id}.jsonl"))
    }

    pub fn write_record(&self, rec: &ExecutionRecord) -> StoreResult<()> {
        check_name("execution id", &rec.id)?;
        let bytes = serde_json::to_vec_pretty(rec)
            .map_err(|e| StoreError::Io(format!("encoding record {}: {e}", rec.id)))?;
        write_atomic(&self.record_path(&rec.id), &bytes)
    }

    /// Appends events (one line each, in one write); `sync` makes them durable before
    /// returning (and the file's existence, if this created it).
    pub fn append_events(&self, id: &str, events: &[ExecEvent], sync: bool) -> StoreResult<()> {
        check_name("execution id", id)?;
        let path = self.events_path(id);
        let mut buf = Vec::new();
        for e in events {
            serde_json::to_writer(&mut buf, e)
                .map_err(|err| StoreError::Io(format!("encoding an event of {id}: {err}")))?;
            buf.push(b'\n');
        }
        let created = !path.exists();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| io_err("opening", &path, e))?;
        f.write_all(&buf)
            .map_err(|e| io_err("appending to", &path, e))?;
        if sync {
            f.sync_data().map_err(|e| io_err("syncing", &path, e))?;
            if created {
                sync_dir(&self.events_dir())?;
            }
        }
        Ok(())
    }

    /// Removes an execution's files: the record first, so a crash in between leaves
    /// only orphan events, which [`Disk::load`] removes.
    pub fn remove_execution(&self, id: &str) -> StoreResult<()> {
        check_name("execution id", id)?;
        remove_if_exists(&self.record_path(id))?;
        remove_if_exists(&self.events_path(id))
    }

    /// Makes earlier removals durable.
    pub fn sync_removals(&self) -> StoreResult<()> {
        sync_dir(&self.records_dir())?;
        sync_dir(&self.events_dir())
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
            fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
            sync_dir(&self.user_policies_root())?;
        }
        write_atomic(&dir.join(format!("{user}.json")), &bytes)
    }

    /// Reads everything back. Cleans up after crashes: leftover temp files are removed,
    /// a torn last event line is cut off, events without a record are removed. Each
    /// record's `last_seq` is recomputed from its events.
    pub fn load(&self) -> StoreResult<Loaded> {
        let mut out = Loaded::default();
        for (name, path) in json_files(&self.records_dir(), ".json")? {
            let rec: ExecutionRecord = read_json(&path)?;
            if rec.id != name {
                return Err(corrupt(&path, format!("holds execution {:?}", rec.id)));
            }
            out.records.insert(name, rec);
        }
        for (id, path) in json_files(&self.events_dir(), ".jsonl")? {
            if !out.records.contains_key(&id) {
                // Written by an admission that crashed before storing its record, or
                // left by an expiry that crashed between its two removals.
                remove_if_exists(&path)?;
                continue;
            }
            out.events.insert(id, read_events(&path)?);
        }
        for (id, rec) in out.records.iter_mut() {
            rec.last_seq = out.events.get(id).map_or(0, |ev| ev.len() as u64);
        }
        for (org, path) in json_files(&self.org_policies_dir(), ".json")? {
            out.org_policies.insert(org, read_json(&path)?);
        }
        let root = self.user_policies_root();
        for entry in fs::read_dir(&root).map_err(|e| io_err("reading", &root, e))? {
            let entry = entry.map_err(|e| io_err("reading", &root, e))?;
            let org = entry.file_name().to_string_lossy().into_owned();
            if !entry.path().is_dir() || !name_ok(&org) {
                continue;
            }
            for (user, path) in json_files(&entry.path(), ".json")? {
                out.user_policies
                    .insert((org.clone(), user), read_json(&path)?);
            }
        }
        Ok(out)
    }
}

fn encode_policy(p: &Policy) -> StoreResult<Vec<u8>> {
    serde_json::to_vec_pretty(p).map_err(|e| StoreError::Io(format!("encoding a policy: {e}")))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content.
fn write_atomic(path: &Path, bytes: &[u8]) -> StoreResult<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let write = || -> io::Result<()> {
        let mut f = File::create(&tmp)?;
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
fn json_files(dir: &Path, suffix: &str) -> StoreResult<Vec<(String, PathBuf)>> {
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

/// An events file: complete lines in order with seq 1, 2, 3, ... A last line that is
/// incomplete or unreadable (a write torn by a crash) is cut off the file so later
/// appends start on a fresh line; an unreadable line before the last is corruption.
fn read_events(path: &Path) -> StoreResult<Vec<ExecEvent>> {
    let bytes = fs::read(path).map_err(|e| io_err("reading", path, e))?;
    let mut events: Vec<ExecEvent> = Vec::new();
    let mut good_len = 0usize;
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let (line, complete) = match rest.iter().position(|&b| b == b'\n') {
            Some(n) => (&rest[..n], true),
            None => (rest, false),
        };
        let consumed = line.len() + usize::from(complete);
        let is_last = consumed == rest.len();
        if !complete {
            // Torn: the last write did not finish.
            break;
        }
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
                good_len += consumed;
            }
            // A complete but unreadable last line: torn as well.
            Err(_) if is_last => break,
            Err(e) => return Err(corrupt(path, format!("line {}: {e}", events.len() + 1))),
        }
        rest = &rest[consumed..];
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

    fn line(seq: u64) -> String {
        let e = ExecEvent {
            execution_id: "x".into(),
            seq,
            at: 1,
            body: EventBody::Stdout { data: "o\n".into() },
        };
        format!("{}\n", serde_json::to_string(&e).unwrap())
    }

    fn events_of(content: &str) -> (StoreResult<Vec<ExecEvent>>, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        fs::write(&path, content).unwrap();
        let res = read_events(&path);
        (res, fs::read_to_string(&path).unwrap())
    }

    #[test]
    fn event_files_read_whole_lines_in_order() {
        let whole = format!("{}{}{}", line(1), line(2), line(3));
        let (res, after) = events_of(&whole);
        assert_eq!(res.unwrap().len(), 3);
        assert_eq!(after, whole);
        let (res, _) = events_of("");
        assert!(res.unwrap().is_empty());
    }

    #[test]
    fn a_torn_tail_is_cut_off() {
        let good = format!("{}{}", line(1), line(2));
        for tail in [&line(3)[..10], "{", "garbage\n", "\n"] {
            let (res, after) = events_of(&format!("{good}{tail}"));
            assert_eq!(res.unwrap().len(), 2, "{tail:?}");
            assert_eq!(after, good, "{tail:?}");
        }
        // Nothing but a torn line.
        let (res, after) = events_of(&line(1)[..5]);
        assert!(res.unwrap().is_empty());
        assert_eq!(after, "");
    }

    #[test]
    fn gaps_and_bad_middle_lines_are_corruption() {
        let (res, _) = events_of(&format!("{}{}", line(1), line(3)));
        assert!(matches!(res, Err(StoreError::Corrupt(_))));
        let (res, _) = events_of(&format!("{}{}", line(2), line(3)));
        assert!(matches!(res, Err(StoreError::Corrupt(_))));
        let (res, after) = events_of(&format!("{}junk\n{}", line(1), line(2)));
        assert!(matches!(res, Err(StoreError::Corrupt(_))));
        // Corruption is reported, never "repaired" by cutting good data.
        assert_eq!(after, format!("{}junk\n{}", line(1), line(2)));
    }

    #[test]
    fn atomic_writes_replace_and_leave_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
