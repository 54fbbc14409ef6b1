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
use hatchery_scheduler::seal::{key_id_of, Binding, KeyId, Keyring};
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
        max_artifacts: 0,
        max_artifact_bytes: 0,
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
        artifacts: vec![hatchery_scheduler::model::ArtifactInfo {
            name: format!("{MARKER}.png"),
            bytes: 1,
            content_type: "image/png".into(),
        }],
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

/// The key id of every sealed line of an execution's log.
fn line_key_ids(file: &Path) -> Vec<KeyId> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| key_id_of(&STANDARD.decode(l).unwrap()).unwrap())
        .collect()
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
    // A log is one base64 sealed blob per change: e1's admission, its start, three
    // pieces of output, its `finished` event and its end.
    assert_eq!(
        line_key_ids(&data.join("store/executions/e1.log")),
        vec![1; 7]
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
    assert_eq!(line_key_ids(&dir.join("executions/old.log")), vec![1; 7]);
    assert_eq!(line_key_ids(&dir.join("executions/new.log")), vec![2; 4]);
    assert_eq!(
        line_key_ids(&dir.join("executions/mixed.log")),
        [vec![1; 5], vec![2; 3]].concat()
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
    assert!(msg.contains("executions/mixed.log: line 1"), "{msg}");
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

    // Once retention removed the old execution and the running one ended (with key B),
    // only the first lines of its log still need A, and the error says which.
    let store = EmbeddedStore::open(&dir, ring_ab()).unwrap();
    store
        .mark_finished("mixed", ExecState::Succeeded, None, None, 300)
        .await
        .unwrap();
    assert_eq!(
        line_key_ids(&dir.join("executions/mixed.log")),
        [vec![1; 5], vec![2; 4]].concat()
    );
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
    assert!(!dir.join("executions/old.log").exists());
    let msg = EmbeddedStore::open(&dir, ring_b()).unwrap_err().to_string();
    assert!(msg.contains("executions/mixed.log: line 1"), "{msg}");
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
    let log = dir.join("executions/x.log");
    let good = std::fs::read(&log).unwrap();
    let lines: Vec<&[u8]> = good[..good.len() - 1].split(|&b| b == b'\n').collect();
    // Admission, start, three pieces of output, `finished`, the end.
    assert_eq!(lines.len(), 7);
    // The offset of line n (1-based) in the file.
    let line_at = |n: usize| lines[..n - 1].iter().map(|l| l.len() + 1).sum::<usize>();

    // One character changed: in the first line (the admission's record), a middle one,
    // and the last one (a complete last line is never taken for a torn write).
    for n in [1, 4, 7] {
        let mut bad = good.clone();
        let at = line_at(n) + lines[n - 1].len() / 2;
        bad[at] = if bad[at] == b'A' { b'B' } else { b'A' };
        std::fs::write(&log, &bad).unwrap();
        assert_corrupt(&dir, "executions/x.log", Some(n as u64));
        assert_eq!(std::fs::read(&log).unwrap(), bad, "nothing is cut");
    }
    // Two lines swapped.
    let mut swapped: Vec<u8> = Vec::new();
    for i in [0, 2, 1, 3, 4, 5, 6] {
        swapped.extend_from_slice(lines[i]);
        swapped.push(b'\n');
    }
    std::fs::write(&log, &swapped).unwrap();
    assert_corrupt(&dir, "executions/x.log", Some(2));
    std::fs::write(&log, &good).unwrap();
    // A line of x appended to y's log; x's whole log under y's name.
    let y_log = dir.join("executions/y.log");
    let good_y = std::fs::read(&y_log).unwrap();
    std::fs::write(&y_log, [&good_y[..], lines[1], b"\n"].concat()).unwrap();
    assert_corrupt(&dir, "executions/y.log", Some(2));
    std::fs::write(&y_log, &good).unwrap();
    assert_corrupt(&dir, "executions/y.log", Some(1));
    std::fs::write(&y_log, &good_y).unwrap();

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

#[tokio::test]
async fn a_data_dir_of_the_sealed_layout_of_an_older_version_becomes_execution_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    for d in ["records", "events", "policies/orgs", "policies/users"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // As the older layout stored them: a record file of one sealed blob, an events file
    // of one sealed event per line (a torn tail on one of them).
    let ring = ring_a();
    let event = |id: &str, seq: u64, body: EventBody| ExecEvent {
        execution_id: id.into(),
        seq,
        at: seq,
        body,
    };
    let mut done = record("done", 1);
    done.state = ExecState::Failed;
    done.finished_at = Some(3);
    done.error = Some(MARKER.into());
    done.code_key = String::new();
    let done_events = vec![
        event("done", 1, EventBody::Queued),
        event("done", 2, EventBody::Stdout(OutputData::text(MARKER))),
        event("done", 3, EventBody::Finished(finished())),
    ];
    done.last_seq = 3;
    let mut run = record("run", 2);
    run.state = ExecState::Running;
    run.agent = Some("host-1".into());
    run.code = Some(format!("cat('{MARKER}')"));
    let run_events = vec![event("run", 1, EventBody::Queued)];
    run.last_seq = 1;
    for (rec, events, tail) in [(&done, &done_events, ""), (&run, &run_events, "AgEA")] {
        let id = rec.id.as_str();
        let blob = ring
            .seal(Binding::Record(id), &serde_json::to_vec(rec).unwrap())
            .unwrap();
        std::fs::write(dir.join(format!("records/{id}.sealed")), blob).unwrap();
        let mut lines = String::new();
        for e in events.iter() {
            let json = serde_json::to_vec(e).unwrap();
            let binding = Binding::Event {
                execution: id,
                seq: e.seq,
            };
            lines.push_str(&STANDARD.encode(ring.seal(binding, &json).unwrap()));
            lines.push('\n');
        }
        lines.push_str(tail);
        std::fs::write(dir.join(format!("events/{id}.sealed")), lines).unwrap();
    }
    // Events whose record never got written (a crash in the older layout).
    std::fs::write(dir.join("events/orphan.sealed"), b"AgEAAAA=\n").unwrap();

    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    assert_eq!(store.get("done").await.unwrap().unwrap(), done);
    assert_eq!(store.events_after("done", 0).await.unwrap(), done_events);
    assert_eq!(store.get("run").await.unwrap().unwrap(), run);
    assert_eq!(store.events_after("run", 0).await.unwrap(), run_events);
    assert!(store.get("orphan").await.unwrap().is_none());
    // The converted log goes on where the old one stopped.
    let e = store
        .append_event("run", EventBody::Stdout(OutputData::text(MARKER)))
        .await
        .unwrap();
    assert_eq!(e.seq, 2);
    let before = snapshot(&store).await;
    drop(store);
    for gone in ["records", "events"] {
        assert!(!dir.join(gone).exists(), "{gone}");
    }
    assert_eq!(line_key_ids(&dir.join("executions/done.log")), vec![1]);
    assert_eq!(line_key_ids(&dir.join("executions/run.log")), vec![1; 2]);
    assert_no_marker(&dir);
    assert_private(&dir);
    let store = EmbeddedStore::open(&dir, ring_a()).unwrap();
    assert_eq!(snapshot(&store).await, before);
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
