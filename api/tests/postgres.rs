//! `hatchery up` on PostgreSQL (a private server per test): executions run end to end
//! with their records, events and results in the database, sealed there, and kept across
//! a restart of the platform; while PostgreSQL is down the API answers 503
//! `store_unavailable` (with Retry-After) and nothing crashes; when it is back the
//! platform carries on without a restart.
//!
//! Needs root, PostgreSQL (`postgresql`), the root filesystem and the sandbox binaries.

mod harness;
use harness::*;

use std::process::Command;
use std::time::{Duration, Instant};

use hatchery_scheduler::engines::{EngineError, PostgresServer};
use serde_json::json;

/// A private PostgreSQL server with a `hatchery` database, or `None` (the skip recorded)
/// where PostgreSQL is not installed and the run does not require it.
fn postgres(test: &str) -> Option<(PostgresServer, String)> {
    match PostgresServer::start() {
        Ok(server) => {
            let url = server.create_database("hatchery").expect("createdb");
            Some((server, url))
        }
        Err(EngineError::PostgresMissing)
            if std::env::var_os("HATCHERY_REQUIRE_ENGINES").is_none() =>
        {
            hatchery_tests::skip(
                test,
                "PostgreSQL is not installed",
                "HATCHERY_REQUIRE_ENGINES",
            );
            None
        }
        Err(e) => panic!("starting PostgreSQL: {e}"),
    }
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
