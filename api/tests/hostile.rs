//! Hostile code through the API: the attacks of the sandbox's channel-holding process
//! (`tests/hostile/hostile.c`, loaded by the R code) against a real `hatchery up` — the
//! time limit, a cancel and a shutdown hold against a half-written frame, a protocol
//! violation finishes `failed` with the stable code `protocol_violation`, floods of
//! output and progress stay bounded in the store and on the WebSocket, and bytes that
//! are not UTF-8 arrive exactly.
//!
//! Needs root, gcc, the root filesystem and the sandbox binaries (same profile).

mod harness;
use harness::*;

use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// R code that loads the hostile library, then runs `code`.
fn hostile(code: &str) -> String {
    format!("{}{code}", hatchery_tests::r_load_hostile())
}

async fn submit_with(h: &Hatchery, token: &str, code: &str, time_limit_ms: u64) -> String {
    submit(
        h,
        token,
        json!({"language": "r", "code": code, "limits": {"time_limit_ms": time_limit_ms}}),
    )
    .await
}

/// Every event of an execution (the WebSocket closes after `finished`), and the size of
/// the largest WebSocket message.
async fn all_events(h: &Hatchery, token: &str, id: &str) -> (Vec<Value>, usize) {
    let mut ws = ws_connect(h, &format!("/v1/executions/{id}/events?token={token}"))
        .await
        .expect("connect");
    let mut events = Vec::new();
    let mut largest = 0usize;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no end of events for {id}; got {} events", events.len()),
            Ok(Some(Ok(Message::Text(t)))) => {
                largest = largest.max(t.len());
                events.push(serde_json::from_str::<Value>(&t).unwrap());
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => return (events, largest),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => panic!("websocket error: {e}"),
        }
    }
}

/// Waits until the execution's stdout contains `text`.
async fn wait_output(h: &Hatchery, token: &str, id: &str, text: &str) {
    let mut ws = ws_connect(h, &format!("/v1/executions/{id}/events?token={token}"))
        .await
        .expect("connect");
    let (events, closed) = read_events(&mut ws, |evs| stdout_of(evs).contains(text)).await;
    assert!(!closed, "{id} ended before printing {text:?}: {events:?}");
}

/// Bytes under a directory.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = e.metadata() else { continue };
        total += if meta.is_dir() {
            du(&e.path())
        } else {
            meta.len()
        };
    }
    total
}

fn result_of(v: &Value) -> &Value {
    &v["result"]
}

#[test]
fn a_half_written_frame_holds_neither_the_time_limit_nor_a_cancel_nor_a_shutdown() {
    e2e(async {
        let mut h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "mallory", "user");
        let attack = hostile("cat('attacking\\n'); .C('hostile_partial_header_spin')");

        // The time limit: 3 s, and the result is there at most a little after.
        let started = Instant::now();
        let id = submit_with(&h, &t, &attack, 3_000).await;
        let v = wait_terminal(&h, &t, &id).await;
        let took = started.elapsed();
        assert_eq!(state(&v), "timed_out", "{v}");
        assert_eq!(result_of(&v)["error_code"], "time_limit", "{v}");
        assert!(
            took < Duration::from_secs(10),
            "timed out after {took:?} for a 3 s limit"
        );

        // A cancel while it spins on its half-written frame.
        let id = submit_with(&h, &t, &attack, 60_000).await;
        wait_output(&h, &t, &id, "attacking").await;
        let asked = Instant::now();
        let r = http(
            &h,
            "POST",
            &format!("/v1/executions/{id}/cancel"),
            Some(&t),
            None,
        )
        .await;
        assert!(r.status == 200 || r.status == 202, "cancel: {}", r.status);
        let v = wait_terminal(&h, &t, &id).await;
        eprintln!("cancel → terminal over the API: {:?}", asked.elapsed());
        assert_eq!(state(&v), "cancelled", "{v}");
        assert!(asked.elapsed() < Duration::from_secs(5));

        // A shutdown while one spins: SIGTERM is not held up (the drain deadline is 0 s).
        let id = submit_with(&h, &t, &attack, 60_000).await;
        wait_output(&h, &t, &id, "attacking").await;
        let asked = Instant::now();
        h.stop_with(libc::SIGTERM);
        let stopped = asked.elapsed();
        eprintln!("SIGTERM → exit with a spinning attacker: {stopped:?}");
        assert!(
            stopped < Duration::from_secs(15),
            "hatchery up took {stopped:?} to stop"
        );
        h.spawn();
        h.ready().await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "lost", "{v}");
    });
}

#[test]
fn protocol_violations_finish_failed_with_a_stable_code() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "mallory", "user");
        for attack in [
            ".C('hostile_garbage')",
            ".C('hostile_forged_finished_with_status')",
            "r <- .C('hostile_scm_rights', r = integer(1))$r",
        ] {
            let id = submit_with(&h, &t, &hostile(attack), 60_000).await;
            let v = wait_terminal(&h, &t, &id).await;
            assert_eq!(state(&v), "failed", "{attack}: {v}");
            assert_eq!(
                result_of(&v)["error_code"],
                "protocol_violation",
                "{attack}: {v}"
            );
            assert!(
                result_of(&v)["error"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("protocol violation"),
                "{attack}: {v}"
            );
        }
        // The platform goes on serving.
        let id = run_r(&h, &t, "sum(1:10)").await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
    });
}

#[test]
fn floods_stay_bounded_in_the_store_and_on_the_wire() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "mallory", "user");
        let data = h.dir.join("data");

        // 100,000 progress() calls (about a second on the host, several in an emulated
        // VM; each would be an event without coalescing): a few dozen events per second
        // of run, a few KB stored.
        let before = du(&data);
        let started = Instant::now();
        let id = submit_with(
            &h,
            &t,
            "for (i in 1:100000) progress(i / 1e5, 'x'); 'done'",
            60_000,
        )
        .await;
        let v = wait_terminal(&h, &t, &id).await;
        let took = started.elapsed();
        assert_eq!(state(&v), "succeeded", "{v}");
        let (events, _) = all_events(&h, &t, &id).await;
        let progress = events.iter().filter(|e| e["type"] == "progress").count();
        let grown = du(&data).saturating_sub(before);
        eprintln!(
            "1e5 progress() calls: {progress} progress events of {} stored, the data dir grew \
             {grown} bytes in {took:?}",
            events.len()
        );
        let allowed = (took.as_secs_f64() * 20.0).ceil() as usize + 2;
        assert!(
            progress >= 1 && progress <= allowed,
            "{progress} progress events in {took:?}"
        );
        assert_eq!(
            events
                .iter()
                .rev()
                .find(|e| e["type"] == "progress")
                .unwrap()["fraction"],
            1.0
        );
        // A sealed event line is a few hundred bytes: the store grows with the events
        // let through (time-bound), not with the calls made.
        let bound = (64 << 10) + allowed as u64 * 512;
        assert!(
            grown < bound,
            "the data dir grew {grown} bytes (bound {bound})"
        );

        // 200,000 progress calls with 3 KB messages: counted as output, stopped at the
        // output limit, the store barely grows.
        let before = du(&data);
        let id = submit_with(
            &h,
            &t,
            "m <- strrep('m', 3000); for (i in 1:200000) progress(0.5, m); 'done'",
            60_000,
        )
        .await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "output_limit", "{v}");
        assert_eq!(result_of(&v)["error_code"], "output_limit", "{v}");
        let grown = du(&data).saturating_sub(before);
        assert!(grown < 1 << 20, "the data dir grew {grown} bytes");

        // 100 MB of output: exactly the 16 MiB limit arrives, in events of at most 64 KiB
        // (WebSocket messages a client accepts), and the run says it was cut.
        let id = submit_with(&h, &t, "cat(strrep('x', 1e8)); 'after'", 60_000).await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "output_limit", "{v}");
        assert_eq!(result_of(&v)["stdout_truncated"], true, "{v}");
        let (events, largest) = all_events(&h, &t, &id).await;
        let stdout = stdout_of(&events);
        assert_eq!(stdout.len(), 16 << 20, "bytes of stdout delivered");
        assert!(stdout.bytes().all(|b| b == b'x'));
        for e in events.iter().filter(|e| e["type"] == "stdout") {
            assert!(e["data"].as_str().unwrap().len() <= 64 << 10);
        }
        assert!(
            largest <= 80 << 10,
            "a WebSocket message of {largest} bytes"
        );
        assert!(result_of(&v)["value_json"].is_null(), "{v}");
    });
}

#[test]
fn output_that_is_not_utf8_arrives_exactly() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let id = run_r(
            &h,
            &t,
            "cat(rawToChar(as.raw(c(0x61, 0xff, 0x62, 0x0a)))); invisible(NULL)",
        )
        .await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let (events, _) = all_events(&h, &t, &id).await;
        let out: Vec<&Value> = events.iter().filter(|e| e["type"] == "stdout").collect();
        assert_eq!(out.len(), 1, "{events:?}");
        assert_eq!(out[0]["data"], "a\u{fffd}b\n");
        use base64::Engine as _;
        let exact = base64::engine::general_purpose::STANDARD
            .decode(out[0]["data_base64"].as_str().expect("data_base64"))
            .unwrap();
        assert_eq!(exact, b"a\xffb\n");
        // Text that is UTF-8 has no base64 copy.
        let id = run_r(&h, &t, "cat('größe\\n')").await;
        wait_terminal(&h, &t, &id).await;
        let (events, _) = all_events(&h, &t, &id).await;
        let out: Vec<&Value> = events.iter().filter(|e| e["type"] == "stdout").collect();
        assert_eq!(out[0]["data"], "größe\n");
        assert!(out[0].get("data_base64").is_none(), "{:?}", out[0]);
    });
}
