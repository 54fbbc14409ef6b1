//! R15 at rest: what the embedded store and the object store leave on disk. Nothing a
//! user produced (output, progress, values, errors, warnings, tab and model ids, code) is
//! readable in the data directory, in plaintext or base64; files are 0600 and folders
//! 0700; everything reads back after a reopen; a key rotation keeps old data readable
//! while its key is kept, and a removed key or a flipped byte is a clear error.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use hatchery_scheduler::embedded::EmbeddedStore;
use hatchery_scheduler::encrypted::EncryptedObjects;
use hatchery_scheduler::model::{
    EventBody, ExecEvent, ExecState, ExecutionRecord, Limits, OutputData, Policy, ResultSummary,
    Usage,
};
use hatchery_scheduler::objects::{ObjectError, Objects};
use hatchery_scheduler::seal::{key_id_of, KeyId, Keyring};
use hatchery_scheduler::store::{Admission, AdmissionRules, ListFilter, Store, StoreError};

const MARKER: &str = "MARKER-qaly-ratio-7f3e91c2-do-not-store-in-clear";
const A: [u8; 32] = [0xaa; 32];
const B: [u8; 32] = [0xbb; 32];

fn ring_a() -> Keyring {
    Keyring::new([(1, A)], 1).unwrap()
}
fn ring_ab() -> Keyring {
    Keyring::new([(1, A), (2, B)], 2).unwrap()
}
fn ring_b() -> Keyring {
    Keyring::new([(2, B)], 2).unwrap()
}

fn record(id: &str, created_at: u64) -> ExecutionRecord {
    let limits = Limits {
        memory_bytes: 256 << 20,
        cpus: 1.0,
        pids: 64,
        time_limit_ms: 10_000,
    };
    ExecutionRecord {
        tab_id: Some(format!("tab {id} {MARKER}")),
        model_id: Some(format!("model {MARKER}")),
        code_key: format!("code/{id}"),
        ..ExecutionRecord::queued(id, "acme", "ann", "r", limits, created_at)
    }
}

fn finished() -> ResultSummary {
    ResultSummary {
        error_code: None,
        state: ExecState::Failed,
        value_json: Some(serde_json::to_string(MARKER).unwrap()),
        error: Some(format!("Error: {MARKER}")),
        warnings: vec![MARKER.to_string(), format!("again {MARKER}")],
        exit_code: Some(1),
        usage: Usage::default(),
        start_ms: Some(0.1),
        duration_ms: 3.0,
        stdout_truncated: false,
        stderr_truncated: false,
    }
}

const RULES: AdmissionRules = AdmissionRules {
    max_parallel: 100,
    max_queued: 1000,
};

async fn admit(store: &EmbeddedStore, id: &str, created_at: u64) {
    match store.admit(record(id, created_at), RULES).await.unwrap() {
        Admission::Admitted { .. } => {}
        other => panic!("{other:?}"),
    }
}

/// Output, progress and the result, every one carrying the marker.
async fn run_to_the_end(store: &EmbeddedStore, id: &str, finished_at: u64) {
    store.mark_running(id, "host-1", 2).await.unwrap();
    output(store, id).await;
    store
        .append_event(id, EventBody::Finished(finished()))
        .await
        .unwrap();
    store
        .mark_finished(
            id,
            ExecState::Failed,
            Some(format!("results/{id}")),
            Some(format!("failed: {MARKER}")),
            finished_at,
        )
        .await
        .unwrap();
}

async fn output(store: &EmbeddedStore, id: &str) {
    for body in [
        EventBody::Stdout(OutputData::text(format!("[1] \"{MARKER}\"\n"))),
        EventBody::Stderr(OutputData::text(format!("{MARKER}\n"))),
        EventBody::Progress {
            fraction: 0.5,
            message: MARKER.to_string(),
        },
    ] {
        store.append_event(id, body).await.unwrap();
    }
}

/// Every record and every event, in a stable order.
async fn snapshot(store: &EmbeddedStore) -> Vec<(ExecutionRecord, Vec<ExecEvent>)> {
    let mut out = Vec::new();
    let mut records = store.list(&ListFilter::default()).await.unwrap();
    records.sort_by(|a, b| a.id.cmp(&b.id));
    for r in records {
        let events = store.events_after(&r.id, 0).await.unwrap();
        out.push((r, events));
    }
    out
}

/// The marker as bytes, and every base64 form of it: the encoding of the marker starting
/// at each of the 3 byte alignments of a base64 group, without the characters that
/// also depend on neighbouring bytes, in both alphabets.
fn forbidden_forms() -> Vec<Vec<u8>> {
    let mut forms = vec![MARKER.as_bytes().to_vec()];
    for pad in 0..3 {
        let mut bytes = vec![0u8; pad];
        bytes.extend_from_slice(MARKER.as_bytes());
        for engine in [STANDARD, URL_SAFE] {
            let text = engine.encode(&bytes);
            // The first characters mix in the padding, the last ones whatever follows.
            let core = &text[4..text.len() - 4];
            forms.push(core.as_bytes().to_vec());
        }
    }
    forms
}

fn files_under(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut files, mut dirs) = (Vec::new(), vec![dir.to_path_buf()]);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path.clone());
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    (files, dirs)
}

/// No file under `dir` holds the marker, raw or in base64.
fn assert_no_marker(dir: &Path) {
    let forms = forbidden_forms();
    let (files, _) = files_under(dir);
    assert!(!files.is_empty());
    for file in files {
        let raw = std::fs::read(&file).unwrap();
        for form in &forms {
            assert!(
                !raw.windows(form.len()).any(|w| w == form.as_slice()),
                "{} holds {:?} in the clear",
                file.display(),
                String::from_utf8_lossy(form)
            );
        }
    }
}

/// Files 0600, folders (`dir` included) 0700.
fn assert_private(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let (files, dirs) = files_under(dir);
    for d in dirs {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    for f in files {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
}

/// The key id of every sealed line of an events file.
fn event_key_ids(file: &Path) -> Vec<KeyId> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| key_id_of(&STANDARD.decode(l).unwrap()).unwrap())
        .collect()
}

fn record_key_id(file: &Path) -> KeyId {
    key_id_of(&std::fs::read(file).unwrap()).unwrap()
}

#[tokio::test]
async fn nothing_a_user_produced_is_on_disk_in_the_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store = EmbeddedStore::open(&data.join("store"), ring_a()).unwrap();
    let objects = EncryptedObjects::local(&data.join("objects"), ring_a()).unwrap();

    admit(&store, "e1", 1).await;
    run_to_the_end(&store, "e1", 3).await;
    admit(&store, "e2", 4).await;
    store.mark_running("e2", "host-1", 5).await.unwrap();
    output(&store, "e2").await;
    store
        .put_org_policy(
            "acme",
            Policy {
                max_parallel: Some(3),
                ..Policy::default()
            },
        )
        .await
        .unwrap();
    let code = format!("x <- \"{MARKER}\"; cat(x); x").into_bytes();
    let result = serde_json::to_vec(&finished()).unwrap();
    objects.put("code/e1", code.clone()).await.unwrap();
    objects.put("results/e1", result.clone()).await.unwrap();

    let before = snapshot(&store).await;
    assert_eq!(before.len(), 2);
    assert_eq!(before[0].1.len(), 5);
    // The marker is really in what was stored.
    assert!(format!("{before:?}").contains(MARKER));
    drop(store);

    assert_no_marker(&data);
    assert_private(&data);
    // Record files are one sealed blob; event files one base64 sealed blob per line.
    assert_eq!(record_key_id(&data.join("store/records/e1.sealed")), 1);
    assert_eq!(
        event_key_ids(&data.join("store/events/e1.sealed")),
        vec![1; 5]
    );

    let store = EmbeddedStore::open(&data.join("store"), ring_a()).unwrap();
    assert_eq!(snapshot(&store).await, before);
    assert_eq!(
        store
            .get_org_policy("acme")
            .await
            .unwrap()
            .unwrap()
            .max_parallel,
        Some(3)
    );
    assert_eq!(objects.get("code/e1").await.unwrap(), code);
    assert_eq!(objects.get("results/e1").await.unwrap(), result);
    // Appends after the reopen continue the log.
    let e = store
        .append_event("e2", EventBody::Stdout(OutputData::text(MARKER)))
        .await
        .unwrap();
    assert_eq!(e.seq, 5);
    drop(store);
    assert_no_marker(&data);
    assert_private(&data);
}

#[tokio::test]
async fn after_a_rotation_old_data_reads_new_data_uses_the_new_key_and_a_removed_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let objects_dir = tmp.path().join("objects");

    // Key A: a finished execution, a running one, their objects.
    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    admit(&store, "old", 1).await;
    run_to_the_end(&store, "old", 100).await;
    admit(&store, "mixed", 2).await;
    store.mark_running("mixed", "host-1", 3).await.unwrap();
    output(&store, "mixed").await;
    let before = snapshot(&store).await;
    drop(store);
    let objects = EncryptedObjects::local(&objects_dir, ring_a()).unwrap();
    objects
        .put("results/old", b"old result".to_vec())
        .await
        .unwrap();

    // Rotated to B, A kept: everything reads; new data is sealed with B.
    let store = EmbeddedStore::open(&dir, ring_ab()).unwrap();
    assert_eq!(snapshot(&store).await, before);
    admit(&store, "new", 4).await;
    output(&store, "new").await;
    output(&store, "mixed").await;
    assert_eq!(record_key_id(&dir.join("records/old.sealed")), 1);
    assert_eq!(record_key_id(&dir.join("records/new.sealed")), 2);
    assert_eq!(event_key_ids(&dir.join("events/new.sealed")), vec![2; 4]);
    assert_eq!(
        event_key_ids(&dir.join("events/mixed.sealed")),
        [vec![1; 4], vec![2; 3]].concat()
    );
    let after = snapshot(&store).await;
    drop(store);
    let store = EmbeddedStore::open(&dir, ring_ab()).unwrap();
    assert_eq!(snapshot(&store).await, after);
    let objects = EncryptedObjects::local(&objects_dir, ring_ab()).unwrap();
    assert_eq!(objects.get("results/old").await.unwrap(), b"old result");
    objects
        .put("results/new", b"new result".to_vec())
        .await
        .unwrap();
    assert_eq!(
        key_id_of(&std::fs::read(objects_dir.join("results/new")).unwrap()),
        Some(2)
    );
    drop(store);

    // A removed: the store refuses to open, naming the file and the missing key.
    let err = EmbeddedStore::open(&dir, ring_b()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert!(msg.contains("records/mixed.sealed"), "{msg}");
    assert!(
        msg.contains("sealed with key 1, which is not in the keyring"),
        "{msg}"
    );
    let objects = EncryptedObjects::local(&objects_dir, ring_b()).unwrap();
    assert!(matches!(
        objects.get("results/old").await,
        Err(ObjectError::KeyUnavailable { key_id: 1, .. })
    ));
    assert_eq!(objects.get("results/new").await.unwrap(), b"new result");

    // Once retention removed the old execution and the running one's record was
    // rewritten, only its first event lines still need A, and the error says which.
    let store = EmbeddedStore::open(&dir, ring_ab()).unwrap();
    store
        .mark_finished("mixed", ExecState::Succeeded, None, None, 300)
        .await
        .unwrap();
    assert_eq!(record_key_id(&dir.join("records/mixed.sealed")), 2);
    let expired: Vec<String> = store
        .expired(200, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(expired, vec!["old"]);
    assert_eq!(store.delete_expired(&expired, 200).await.unwrap(), expired);
    drop(store);
    let msg = EmbeddedStore::open(&dir, ring_b()).unwrap_err().to_string();
    assert!(msg.contains("events/mixed.sealed: line 1"), "{msg}");
    assert!(msg.contains("key 1"), "{msg}");
    // Nothing was cut or rewritten by the failed opens.
    let store = EmbeddedStore::open(&dir, ring_ab()).unwrap();
    assert_eq!(store.events_after("mixed", 0).await.unwrap().len(), 7);
}

/// Opens `dir` expecting corruption reported for `file` (and, for events, `line`).
fn assert_corrupt(dir: &Path, file: &str, line: Option<u64>) {
    match EmbeddedStore::open(dir, ring_a()) {
        Err(StoreError::Corrupt(msg)) => {
            assert!(msg.contains(file), "{msg}");
            if let Some(n) = line {
                assert!(msg.contains(&format!("line {n}:")), "{msg}");
            }
        }
        Err(other) => panic!("{file}: expected corruption, got {other:?}"),
        Ok(_) => panic!("{file}: tampering not detected"),
    }
}

#[tokio::test]
async fn a_flipped_byte_or_a_moved_blob_is_corruption_never_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    admit(&store, "x", 1).await;
    run_to_the_end(&store, "x", 3).await;
    admit(&store, "y", 4).await;
    drop(store);
    let events = dir.join("events/x.sealed");
    let record = dir.join("records/x.sealed");
    let good_events = std::fs::read(&events).unwrap();
    let good_record = std::fs::read(&record).unwrap();
    let lines: Vec<&[u8]> = good_events[..good_events.len() - 1]
        .split(|&b| b == b'\n')
        .collect();
    assert_eq!(lines.len(), 5);
    // The offset of line n (1-based) in the file.
    let line_at = |n: usize| lines[..n - 1].iter().map(|l| l.len() + 1).sum::<usize>();

    // One character of an event line changed: the middle one, and the last one (a
    // complete last line is never taken for a torn write).
    for n in [3, 5] {
        let mut bad = good_events.clone();
        let at = line_at(n) + lines[n - 1].len() / 2;
        bad[at] = if bad[at] == b'A' { b'B' } else { b'A' };
        std::fs::write(&events, &bad).unwrap();
        assert_corrupt(&dir, "events/x.sealed", Some(n as u64));
        assert_eq!(std::fs::read(&events).unwrap(), bad, "nothing is cut");
    }
    // Two lines swapped.
    let mut swapped: Vec<u8> = Vec::new();
    for i in [0, 2, 1, 3, 4] {
        swapped.extend_from_slice(lines[i]);
        swapped.push(b'\n');
    }
    std::fs::write(&events, &swapped).unwrap();
    assert_corrupt(&dir, "events/x.sealed", Some(2));
    // A line of x appended to y's log.
    std::fs::write(&events, &good_events).unwrap();
    let y_events = dir.join("events/y.sealed");
    let good_y = std::fs::read(&y_events).unwrap();
    std::fs::write(&y_events, [&good_y[..], lines[1], b"\n"].concat()).unwrap();
    assert_corrupt(&dir, "events/y.sealed", Some(2));
    std::fs::write(&y_events, &good_y).unwrap();

    // A flipped bit anywhere in a record file.
    for at in [0, 3, 10, good_record.len() / 2, good_record.len() - 1] {
        let mut bad = good_record.clone();
        bad[at] ^= 0x04;
        std::fs::write(&record, &bad).unwrap();
        assert_corrupt(&dir, "records/x.sealed", None);
    }
    // A record file truncated, or moved to another execution's name.
    std::fs::write(&record, &good_record[..good_record.len() - 1]).unwrap();
    assert_corrupt(&dir, "records/x.sealed", None);
    std::fs::write(&record, &good_record).unwrap();
    let y_record = dir.join("records/y.sealed");
    let good_y_record = std::fs::read(&y_record).unwrap();
    std::fs::write(&y_record, &good_record).unwrap();
    assert_corrupt(&dir, "records/y.sealed", None);
    std::fs::write(&y_record, &good_y_record).unwrap();

    // Restored: all is well again.
    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    assert_eq!(store.events_after("x", 0).await.unwrap().len(), 5);
}

#[tokio::test]
async fn a_plaintext_data_dir_of_an_older_version_is_sealed_in_place() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    for d in ["records", "events", "policies/orgs", "policies/users"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // As the store wrote them before sealing: pretty JSON records, JSON event lines,
    // a torn last line, 0644 files.
    let mut rec = record("old", 1);
    rec.state = ExecState::Failed;
    rec.started_at = Some(2);
    rec.finished_at = Some(3);
    rec.error = Some(MARKER.into());
    rec.last_seq = 3;
    let events: Vec<ExecEvent> = [
        EventBody::Queued,
        EventBody::Stdout(OutputData::text(MARKER)),
        EventBody::Finished(finished()),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, body)| ExecEvent {
        execution_id: "old".into(),
        seq: i as u64 + 1,
        at: 2,
        body,
    })
    .collect();
    let mut lines = String::new();
    for e in &events {
        lines.push_str(&serde_json::to_string(e).unwrap());
        lines.push('\n');
    }
    lines.push_str("{\"execution_id\":\"old\",\"seq\":4,");
    std::fs::write(
        dir.join("records/old.json"),
        serde_json::to_vec_pretty(&rec).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("events/old.jsonl"), lines).unwrap();
    std::fs::write(
        dir.join("events/orphan.jsonl"),
        "{\"execution_id\":\"orphan\",\"seq\":1,\"at\":1,\"type\":\"queued\"}\n",
    )
    .unwrap();
    std::fs::write(dir.join("policies/orgs/acme.json"), b"{\"pids\": 99}").unwrap();
    for f in [
        "records/old.json",
        "events/old.jsonl",
        "policies/orgs/acme.json",
    ] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    assert_eq!(store.get("old").await.unwrap().unwrap(), rec);
    assert_eq!(store.events_after("old", 0).await.unwrap(), events);
    assert_eq!(
        store.get_org_policy("acme").await.unwrap().unwrap().pids,
        Some(99)
    );
    drop(store);
    for gone in [
        "records/old.json",
        "events/old.jsonl",
        "events/orphan.jsonl",
    ] {
        assert!(!dir.join(gone).exists(), "{gone}");
    }
    assert_no_marker(&dir);
    assert_private(&dir);
    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    assert_eq!(store.events_after("old", 0).await.unwrap(), events);
}

#[test]
fn the_store_debug_shows_no_key() {
    let tmp = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(tmp.path(), Keyring::single([0xab; 32])).unwrap();
    let s = format!("{store:?}");
    assert!(
        !s.contains("171") && !s.to_lowercase().contains("ab, ab"),
        "{s}"
    );
}
