//! `hatchery up` on the cluster's engines (private servers per test): on PostgreSQL,
//! executions run end to end with their records, events and results in the database,
//! sealed there, and kept across a restart of the platform; while PostgreSQL is down the
//! API answers 503 `store_unavailable` (with Retry-After) and nothing crashes; when it is
//! back the platform carries on without a restart. On PostgreSQL and Redis Streams
//! together, work, cancels and live events go over Redis, the cap holds at the sandbox
//! level, and a Redis restart mid-run loses nothing.
//!
//! Needs root, PostgreSQL (`postgresql`), Redis (`redis-server`), the root filesystem and
//! the sandbox binaries.

mod harness;
use harness::*;

use std::process::Command;
use std::time::{Duration, Instant};

use hatchery_scheduler::engines::{PostgresServer, RedisServer};
use serde_json::json;

/// A private PostgreSQL server with a `hatchery` database, or `None` (the skip recorded)
/// where PostgreSQL is not installed and the run does not require it.
fn postgres(test: &str) -> Option<(PostgresServer, String)> {
    let server = engine(test, PostgresServer::start())?;
    let url = server.create_database("hatchery").expect("createdb");
    Some((server, url))
}

/// Runs one SQL statement on the test server with psql and returns its output.
fn psql(server: &PostgresServer, sql: &str) -> String {
    let bin = hatchery_scheduler::engines::postgres_bin_dir().unwrap();
    let psql = ["/usr/bin/psql", bin.join("psql").to_str().unwrap()]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap()
        .to_string();
    let out = Command::new(psql)
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "hatchery",
            "-d",
            "hatchery",
        ])
        .arg("-p")
        .arg(server.port().to_string())
        .arg("-c")
        .arg(sql)
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn executions_run_on_postgresql_sealed_and_kept_across_a_restart() {
    let Some((server, url)) =
        postgres("executions_run_on_postgresql_sealed_and_kept_across_a_restart")
    else {
        return;
    };
    e2e(async {
        let mut h = Hatchery::started(Setup {
            postgres_url: Some(url.clone()),
            ..Setup::default()
        })
        .await;
        let alice = h.token("acme", "alice", "user");
        let id = run_r(&h, &alice, r#"cat("pg-marker-output\n"); 6 * 7"#).await;
        let v = wait_terminal(&h, &alice, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "42", "{v}");
        let mut ws = ws_connect(&h, &format!("/v1/executions/{id}/events?token={alice}"))
            .await
            .expect("connect");
        let (events, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed, "the stream did not close after finished");
        assert_eq!(stdout_of(&events), "pg-marker-output\n[1] 42\n");
        let events = logged(&events);
        assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());

        // In the database: one execution with its gapless log, nothing of what the code
        // printed or returned in plaintext, and no store under the data dir.
        assert_eq!(
            psql(
                &server,
                &format!("SELECT state, last_seq FROM executions WHERE id = '{id}'")
            ),
            format!("succeeded|{}", events.len())
        );
        assert_eq!(
            psql(
                &server,
                &format!("SELECT count(*) FROM events WHERE execution_id = '{id}'")
            ),
            events.len().to_string()
        );
        for needle in ["pg-marker-output", "alice"] {
            let hits = psql(
                &server,
                &format!(
                    "SELECT count(*) FROM events WHERE position('{needle}'::bytea IN body) > 0"
                ),
            );
            assert_eq!(hits, "0", "{needle} is in plaintext in the event log");
        }
        assert_eq!(
            psql(&server, "SELECT count(*) FROM executions WHERE position('\"code_key\"'::bytea IN record) > 0"),
            "0",
            "a record is in plaintext"
        );
        assert!(
            !h.dir.join("data/store").exists(),
            "the embedded store was used"
        );

        // A restart of the platform keeps everything, and the next execution's log goes on.
        h.stop_with(libc::SIGTERM);
        h.spawn();
        h.ready().await;
        let again = execution(&h, &alice, &id).await;
        assert_eq!(again["result"], v["result"]);
        let id2 = run_r(&h, &alice, "1 + 1").await;
        let v2 = wait_terminal(&h, &alice, &id2).await;
        assert_eq!(v2["result"]["value_json"], "2", "{v2}");
        let listed = get(&h, "/v1/executions", &alice).await.json();
        let ids: Vec<&str> = listed["executions"]
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|e| e["id"].as_str())
            .collect();
        assert_eq!(ids, vec![id2.as_str(), id.as_str()], "{listed}");
    });
}

#[test]
fn postgresql_down_is_503_store_unavailable_then_the_platform_recovers() {
    let Some((mut server, url)) =
        postgres("postgresql_down_is_503_store_unavailable_then_the_platform_recovers")
    else {
        return;
    };
    e2e(async {
        let h = Hatchery::started(Setup {
            postgres_url: Some(url.clone()),
            ..Setup::default()
        })
        .await;
        let alice = h.token("acme", "alice", "user");
        let before = run_r(&h, &alice, "1").await;
        wait_terminal(&h, &alice, &before).await;

        server.stop();
        let body = json!({"language": "r", "code": "2"});
        let r = http(
            &h,
            "POST",
            "/v1/executions",
            Some(&alice),
            Some(body.clone()),
        )
        .await;
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "store_unavailable");
        assert!(r.header("retry-after").is_some(), "no Retry-After");
        let r = get(&h, &format!("/v1/executions/{before}"), &alice).await;
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "store_unavailable");

        // Back: the same process serves again (its pool reconnects), and runs code.
        server.restart().expect("restart PostgreSQL");
        let deadline = Instant::now() + Duration::from_secs(60);
        let id = loop {
            let r = http(
                &h,
                "POST",
                "/v1/executions",
                Some(&alice),
                Some(body.clone()),
            )
            .await;
            if r.status == 202 {
                break r.json()["id"].as_str().unwrap().to_string();
            }
            assert_eq!(
                r.code(),
                "store_unavailable",
                "{}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(Instant::now() < deadline, "the API never recovered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let v = wait_terminal(&h, &alice, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "2", "{v}");
        let old = execution(&h, &alice, &before).await;
        assert_eq!(state(&old), "succeeded", "{old}");
    });
}

/// A private Redis server, or `None` (the skip recorded) where Redis is not installed and
/// the run does not require it.
fn redis(test: &str) -> Option<RedisServer> {
    engine(test, RedisServer::start())
}

async fn events_of(h: &Hatchery, token: &str, id: &str) -> Vec<serde_json::Value> {
    let mut ws = ws_connect(h, &format!("/v1/executions/{id}/events?token={token}"))
        .await
        .expect("connect");
    let (events, closed) = read_events(&mut ws, |_| false).await;
    assert!(closed, "the stream of {id} did not close after finished");
    events
}

fn at_of(events: &[serde_json::Value], kind: &str) -> u64 {
    events
        .iter()
        .find(|e| e["type"] == kind)
        .and_then(|e| e["at"].as_u64())
        .unwrap_or_else(|| panic!("no {kind} event: {events:?}"))
}

#[test]
fn on_postgresql_and_redis_work_cancels_and_events_go_over_redis_and_survive_its_restart() {
    let test =
        "on_postgresql_and_redis_work_cancels_and_events_go_over_redis_and_survive_its_restart";
    let Some((_pg, url)) = postgres(test) else {
        return;
    };
    let Some(mut redis) = redis(test) else {
        return;
    };
    e2e(async {
        let h = Hatchery::started(Setup {
            postgres_url: Some(url.clone()),
            redis_url: Some(redis.url()),
            ..Setup::default()
        })
        .await;
        let alice = h.token("acme", "alice", "user");

        // Live output over the Redis fan-out, in order, with the value.
        let id = run_r(&h, &alice, r#"for (i in 1:3) cat("line", i, "\n"); 6 * 7"#).await;
        let events = logged(&events_of(&h, &alice, &id).await);
        assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
        assert!(
            stdout_of(&events).starts_with("line 1 \nline 2 \nline 3 \n"),
            "{events:?}"
        );
        let v = wait_terminal(&h, &alice, &id).await;
        assert_eq!(v["result"]["value_json"], "42", "{v}");

        // A cancel travels over Redis, and under the cap of 2 a third execution starts
        // only once the one it displaced is dead.
        let slow = json!({"language": "r", "code": "Sys.sleep(30)"});
        let a = submit(&h, &alice, slow.clone()).await;
        let b = submit(&h, &alice, slow.clone()).await;
        wait_running(&h, &alice, &a).await;
        wait_running(&h, &alice, &b).await;
        let c = submit(&h, &alice, slow.clone()).await;
        let old = wait_terminal(&h, &alice, &a).await;
        assert_eq!(old["cancel"], "parallelism_cap", "{old}");
        wait_running(&h, &alice, &c).await;
        let a_events = events_of(&h, &alice, &a).await;
        let mut ws = ws_connect(&h, &format!("/v1/executions/{c}/events?token={alice}"))
            .await
            .expect("connect");
        let (c_events, _) =
            read_events(&mut ws, |ev| ev.iter().any(|e| e["type"] == "started")).await;
        assert!(
            at_of(&c_events, "started") >= at_of(&a_events, "finished"),
            "{c} started before {a} it displaced finished"
        );
        for id in [&b, &c] {
            let r = http(
                &h,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                Some(&alice),
                None,
            )
            .await;
            assert!(r.status < 300, "cancel {id}: {}", r.status);
            wait_terminal(&h, &alice, id).await;
        }

        // Redis restarts (empty) while code runs: the execution finishes with all its
        // output, and new work is taken again.
        let during = run_r(
            &h,
            &alice,
            r#"cat("before\n"); Sys.sleep(3); cat("after\n"); invisible(1)"#,
        )
        .await;
        wait_running(&h, &alice, &during).await;
        // A client streaming it live across the restart: the API hears from the bus that
        // events may have been missed and catches up from the store.
        let mut live = ws_connect(&h, &format!("/v1/executions/{during}/events?token={alice}"))
            .await
            .expect("connect");
        let (seen, _) = read_events(&mut live, |ev| stdout_of(ev).contains("before")).await;
        redis.restart().expect("restart Redis");
        let (rest, closed) = read_events(&mut live, |_| false).await;
        assert!(closed, "the stream did not close after finished");
        let streamed = logged(&seen.into_iter().chain(rest).collect::<Vec<_>>());
        assert_eq!(
            seqs(&streamed),
            (1..=streamed.len() as u64).collect::<Vec<_>>(),
            "{streamed:?}"
        );
        assert_eq!(stdout_of(&streamed), "before\nafter\n");
        let v = wait_terminal(&h, &alice, &during).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let events = events_of(&h, &alice, &during).await;
        assert_eq!(stdout_of(&events), "before\nafter\n");
        let deadline = Instant::now() + Duration::from_secs(60);
        let next = loop {
            let r = http(
                &h,
                "POST",
                "/v1/executions",
                Some(&alice),
                Some(json!({"language": "r", "code": "2 + 2"})),
            )
            .await;
            if r.status == 202 {
                break r.json()["id"].as_str().unwrap().to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no admission after Redis came back: {}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let v = wait_terminal(&h, &alice, &next).await;
        assert_eq!(v["result"]["value_json"], "4", "{v}");
    });
}
