//! End-to-end tests over real HTTP and WebSocket against a started platform: `hatchery
//! up` for this target, a local cluster (two API replicas, two schedulers, two agents on
//! PostgreSQL, Redis and S3) for `e2e_cluster`, which runs this same file.
//!
//! Each test starts the `hatchery` binary (or the cluster's processes) with its own
//! temporary data directory on free ports of 127.0.0.1 (pool size 1, R only, the default
//! root filesystem), mints its tokens with `hatchery token create` against the same
//! config, and talks to it with a small HTTP/1.1 client (taking turns over the API
//! replicas) and tokio-tungstenite. Platforms run one at a time (they share the machine's
//! cgroups and its 2 cores); waits poll states with generous deadlines instead of
//! sleeping fixed times. What only `hatchery up` has (its CLI, its data directory) is
//! tested in `up.rs`.
//!
//! Needs root, the root filesystem (`/var/lib/hatchery/rootfs/r`, or `HATCHERY_ROOTFS`)
//! and the sandbox binaries built in the same profile (`cargo build -p hatchery-sandbox`).

mod harness;
use harness::*;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------- the tests

#[test]
fn two_tabs_of_one_user_run_the_same_model_concurrently() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let code = "Sys.sleep(3); cat('model done'); 6 * 7";
        let a = submit(
            &h,
            &t,
            json!({"language": "r", "code": code, "tab_id": "tab-1", "model_id": "m"}),
        )
        .await;
        let b = submit(
            &h,
            &t,
            json!({"language": "r", "code": code, "tab_id": "tab-2", "model_id": "m"}),
        )
        .await;
        let va = wait_terminal(&h, &t, &a).await;
        let vb = wait_terminal(&h, &t, &b).await;
        for v in [&va, &vb] {
            assert_eq!(state(v), "succeeded", "{v}");
            assert_eq!(v["result"]["value_json"], "42", "{v}");
            assert_eq!(v["model_id"], "m");
            assert!(v["cancel"].is_null());
        }
        // They ran at the same time.
        let (sa, fa) = (
            va["started_at"].as_u64().unwrap(),
            va["finished_at"].as_u64().unwrap(),
        );
        let (sb, fb) = (
            vb["started_at"].as_u64().unwrap(),
            vb["finished_at"].as_u64().unwrap(),
        );
        assert!(
            sa < fb && sb < fa,
            "not concurrent: a {sa}..{fa}, b {sb}..{fb}"
        );
        // The tab filter of the list.
        let l = get(&h, "/v1/executions?tab_id=tab-2", &t).await.json();
        let ids: Vec<&str> = l["executions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec![b.as_str()]);
    });
}

/// Python runs through the API with the same guarantees and events as R: output and
/// progress in order on the log, the value as JSON, an exception as data, and a re-run
/// from the same tab cancelling the previous one.
#[test]
fn python_runs_with_the_same_events_and_guarantees_as_r() {
    e2e(async {
        let h = Hatchery::started(Setup {
            languages: vec!["r".into(), "python".into()],
            ..Setup::default()
        })
        .await;
        let t = h.token("acme", "pia", "user");
        let code = "import hatchery, pandas as pd\n\
                    print('fitting')\n\
                    hatchery.progress(0.5, 'half')\n\
                    df = pd.DataFrame({'g': ['a', 'a', 'b'], 'v': [1, 2, 3]})\n\
                    df.groupby('g', as_index=False)['v'].sum()";
        let id = submit(&h, &t, json!({"language": "python", "code": code})).await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let value: Value =
            serde_json::from_str(v["result"]["value_json"].as_str().unwrap()).unwrap();
        assert_eq!(
            value,
            json!([{"g": "a", "v": 3}, {"g": "b", "v": 3}]),
            "{v}"
        );
        let events = logged(&all_events(&h, &t, &id).await);
        assert_eq!(stdout_of(&events), "fitting\n");
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        let progress = kinds
            .iter()
            .position(|k| *k == "progress")
            .expect("a progress event");
        let output = kinds
            .iter()
            .position(|k| *k == "stdout")
            .expect("an output event");
        assert!(output < progress, "{kinds:?}");
        assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());

        let id = submit(
            &h,
            &t,
            json!({"language": "python", "code": "{}['missing']"}),
        )
        .await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "failed", "{v}");
        // As Python shows it: the traceback of the user's code, then the exception.
        let error = v["result"]["error"].as_str().unwrap();
        assert!(
            error.starts_with("Traceback (most recent call last):\n  File \"<code>\", line 1")
                && error.ends_with("\nKeyError: 'missing'"),
            "{v}"
        );

        // A re-run from the same tab cancels the previous one, as for R.
        let first = submit(
            &h,
            &t,
            json!({"language": "python", "code": "import time; time.sleep(60)", "tab_id": "py"}),
        )
        .await;
        wait_running(&h, &t, &first).await;
        let second = submit(
            &h,
            &t,
            json!({"language": "python", "code": "6 * 7", "tab_id": "py"}),
        )
        .await;
        let v = wait_terminal(&h, &t, &second).await;
        assert_eq!(v["result"]["value_json"], "42", "{v}");
        assert_eq!(state(&wait_terminal(&h, &t, &first).await), "cancelled");
    });
}

#[test]
fn a_rerun_from_one_tab_cancels_only_that_tabs_run() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let a = submit(
            &h,
            &t,
            json!({"language": "r", "code": LONG, "tab_id": "tab-1"}),
        )
        .await;
        let b = submit(
            &h,
            &t,
            json!({"language": "r", "code": LONG, "tab_id": "tab-2"}),
        )
        .await;
        wait_running(&h, &t, &a).await;
        wait_running(&h, &t, &b).await;
        let c = submit(
            &h,
            &t,
            json!({"language": "r", "code": "Sys.sleep(1); 'rerun'", "tab_id": "tab-1"}),
        )
        .await;
        let va = wait_terminal(&h, &t, &a).await;
        assert_eq!(state(&va), "cancelled", "{va}");
        assert_eq!(va["cancel"], "superseded_by_tab");
        let vc = wait_terminal(&h, &t, &c).await;
        assert_eq!(state(&vc), "succeeded", "{vc}");
        let vb = execution(&h, &t, &b).await;
        assert_eq!(
            state(&vb),
            "running",
            "the other tab's run must go on: {vb}"
        );
        assert!(vb["cancel"].is_null(), "{vb}");
        let r = http(
            &h,
            "POST",
            &format!("/v1/executions/{b}/cancel"),
            Some(&t),
            None,
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["cancel"], "requested");
        let vb = wait_terminal(&h, &t, &b).await;
        assert_eq!(state(&vb), "cancelled", "{vb}");
    });
}

#[test]
fn the_third_parallel_execution_cancels_the_oldest() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "bob", "user");
        let a = run_r(&h, &t, LONG).await;
        let b = run_r(&h, &t, LONG).await;
        wait_running(&h, &t, &a).await;
        let c = run_r(&h, &t, LONG).await;
        let va = wait_terminal(&h, &t, &a).await;
        assert_eq!(state(&va), "cancelled", "{va}");
        assert_eq!(va["cancel"], "parallelism_cap");
        for id in [&b, &c] {
            let v = wait_until(&h, &t, id, "running", |v| state(v) == "running").await;
            assert!(v["cancel"].is_null(), "{v}");
        }
        // Another user is not affected by bob's cap.
        let t2 = h.token("acme", "carol", "user");
        let d = run_r(&h, &t2, "1 + 1").await;
        assert_eq!(state(&wait_terminal(&h, &t2, &d).await), "succeeded");
        for id in [&b, &c] {
            http(
                &h,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                Some(&t),
                None,
            )
            .await;
            wait_terminal(&h, &t, id).await;
        }
    });
}

#[test]
fn a_client_that_disconnects_mid_run_later_gets_every_event_and_the_result() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let code = "for (i in 1:8) { cat('line', i, '\\n'); progress(i / 8, paste('step', i)); Sys.sleep(0.4) }; 'done'";
        let id = run_r(&h, &t, code).await;

        // First session: leave as soon as some output arrived.
        let mut ws = ws_connect(&h, &format!("/v1/executions/{id}/events?token={t}"))
            .await
            .unwrap();
        let (first, closed) =
            read_events(&mut ws, |ev| ev.iter().any(|e| e["type"] == "stdout")).await;
        assert!(!closed);
        drop(ws);
        let first = logged(&first);
        let first_seqs = seqs(&first);
        assert_eq!(
            first_seqs,
            (1..=first_seqs.len() as u64).collect::<Vec<_>>()
        );
        assert_eq!(first[0]["type"], "queued");
        let last = *first_seqs.last().unwrap();

        // The execution goes on without a client.
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "\"done\"");

        // Reconnect after the last seen: everything after it, in order, then close.
        let mut ws = ws_connect(
            &h,
            &format!("/v1/executions/{id}/events?after={last}&token={t}"),
        )
        .await
        .unwrap();
        let (rest, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed, "the stream closes after `finished`");
        // Usage samples are live-only: none is replayed.
        assert_eq!(logged(&rest), rest);
        let rest_seqs = seqs(&rest);
        assert_eq!(
            rest_seqs,
            (last + 1..=last + rest.len() as u64).collect::<Vec<_>>()
        );
        let fin = rest.last().unwrap();
        assert_eq!(fin["type"], "finished");
        assert_eq!(fin["state"], "succeeded");
        assert_eq!(
            fin["seq"].as_u64().unwrap(),
            v["last_seq"].as_u64().unwrap()
        );
        let mut all = first.clone();
        all.extend(rest.iter().cloned());
        let text = stdout_of(&all);
        let expected: String = (1..=8).map(|i| format!("line {i} \n")).collect();
        assert!(text.starts_with(&expected), "{text:?}");
        assert!(all
            .iter()
            .any(|e| e["type"] == "progress" && e["message"] == "step 8"));

        // A fresh client gets the same history from the start, and the stream closes.
        let mut ws = ws_connect(&h, &format!("/v1/executions/{id}/events?token={t}"))
            .await
            .unwrap();
        let (again, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed);
        assert_eq!(again, all);
        // Reconnecting after the `finished` event: nothing more, closed at once.
        let mut ws = ws_connect(
            &h,
            &format!("/v1/executions/{id}/events?after={}&token={t}", fin["seq"]),
        )
        .await
        .unwrap();
        let (none, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed && none.is_empty(), "{none:?}");
    });
}

#[test]
fn a_policy_change_takes_effect_on_the_next_execution() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let root = h.token("hatchery", "root", "superadmin");
        let t = h.token("acme", "ann", "user");
        let hog = "x <- numeric(25e6); length(x)"; // 200 MB, zero-filled (touched)

        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            Some(&root),
            Some(json!({"memory_bytes": 64 << 20})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["policy"]["memory_bytes"], 64 << 20);
        let id = run_r(&h, &t, hog).await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(v["limits"]["memory_bytes"], 64 << 20);
        assert_eq!(state(&v), "oom_killed", "{v}");

        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            Some(&root),
            Some(json!({"memory_bytes": 1u64 << 30})),
        )
        .await;
        assert_eq!(r.status, 200);
        let g = get(&h, "/v1/admin/orgs/acme/users/ann/policy", &root)
            .await
            .json();
        assert_eq!(g["effective"]["memory_bytes"], 1u64 << 30);
        let id = run_r(&h, &t, hog).await;
        let v = wait_terminal(&h, &t, &id).await;
        assert_eq!(v["limits"]["memory_bytes"], 1u64 << 30);
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "25000000");

        // A user override wins over the org policy; asking above it is refused.
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/users/ann/policy",
            Some(&root),
            Some(json!({"memory_bytes": 128 << 20})),
        )
        .await;
        assert_eq!(r.status, 200);
        let r = http(
            &h,
            "POST",
            "/v1/executions",
            Some(&t),
            Some(json!({"language": "r", "code": "1", "limits": {"memory_bytes": 256 << 20}})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_limits"));
        // Only admins administer.
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            Some(&t),
            Some(json!({"memory_bytes": 1 << 30})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
        let org_admin = h.token("acme", "boss", "org_admin");
        assert_eq!(
            get(&h, "/v1/admin/orgs/acme/policy", &org_admin)
                .await
                .status,
            200
        );
        let r = get(&h, "/v1/admin/orgs/other/policy", &org_admin).await;
        assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
    });
}

#[test]
fn only_a_superadmin_sets_org_policy_and_org_admins_stay_within_it() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let root = h.token("hatchery", "root", "superadmin");
        let boss = h.token("acme", "boss", "org_admin");
        let other_boss = h.token("globex", "boss", "org_admin");
        let ann = h.token("acme", "ann", "user");
        let put = |path: &'static str, token: &str, body: Value| {
            let token = token.to_string();
            let h = &h;
            async move { http(h, "PUT", path, Some(&token), Some(body)).await }
        };
        const ORG: &str = "/v1/admin/orgs/acme/policy";
        const ANN: &str = "/v1/admin/orgs/acme/users/ann/policy";

        // An org admin may not set its own org's policy, let alone to 16 TiB and 1000
        // parallel runs; nothing is stored.
        for body in [
            json!({"memory_bytes": 16u64 << 40, "max_parallel": 1000}),
            json!({"pids": 64}),
        ] {
            let r = put(ORG, &boss, body).await;
            assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
            assert!(r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("superadmin"));
        }
        let v = get(&h, ORG, &root).await.json();
        assert!(
            v["policy"]["memory_bytes"].is_null() && v["policy"]["max_parallel"].is_null(),
            "{v}"
        );

        // The superadmin sets it; the org admin reads it.
        let r = put(ORG, &root, json!({"memory_bytes": 256 << 20})).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let r = get(&h, ORG, &boss).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["policy"]["memory_bytes"], 256 << 20);

        // An override above the org's policy: 422 naming the field, value and allowance.
        let r = put(ANN, &boss, json!({"memory_bytes": 1u64 << 30})).await;
        assert_eq!((r.status, r.code().as_str()), (422, "policy_exceeds_org"));
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(
            msg.contains("memory_bytes")
                && msg.contains(&(1u64 << 30).to_string())
                && msg.contains(&(256u64 << 20).to_string()),
            "{msg}"
        );
        // Above the platform default the org keeps (max_parallel 2) is refused too.
        let r = put(ANN, &boss, json!({"max_parallel": 3})).await;
        assert_eq!((r.status, r.code().as_str()), (422, "policy_exceeds_org"));
        let v = get(&h, ANN, &boss).await.json();
        assert!(
            v["policy"]["memory_bytes"].is_null() && v["policy"]["max_parallel"].is_null(),
            "nothing stored: {v}"
        );
        // Within it: stored and effective.
        let r = put(ANN, &boss, json!({"memory_bytes": 128 << 20})).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["effective"]["memory_bytes"], 128 << 20);
        // Not in another org, and never as a plain user.
        for token in [&other_boss, &ann] {
            let r = put(ANN, token, json!({"memory_bytes": 64 << 20})).await;
            assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
        }

        // A superadmin may set any override; the org still caps what it takes effect as.
        let r = put(ANN, &root, json!({"memory_bytes": 1u64 << 30})).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["policy"]["memory_bytes"], 1u64 << 30);
        assert_eq!(v["effective"]["memory_bytes"], 256 << 20);
        assert_eq!(v["capped_by_org"], json!(["memory_bytes"]));
        // Raising the org lets the override apply, lowering it below caps it at once.
        let r = put(ORG, &root, json!({"memory_bytes": 2u64 << 30})).await;
        assert_eq!(r.status, 200);
        let v = get(&h, ANN, &boss).await.json();
        assert_eq!(v["effective"]["memory_bytes"], 1u64 << 30);
        assert_eq!(v["capped_by_org"], json!([]));
        let r = put(ORG, &root, json!({"memory_bytes": 64 << 20})).await;
        assert_eq!(r.status, 200, "lowering below an override is accepted");
        let v = get(&h, ANN, &root).await.json();
        assert_eq!(v["policy"]["memory_bytes"], 1u64 << 30, "kept as stored");
        assert_eq!(v["effective"]["memory_bytes"], 64 << 20);
        let id = run_r(&h, &ann, "1 + 1").await;
        let done = wait_terminal(&h, &ann, &id).await;
        assert_eq!(done["limits"]["memory_bytes"], 64 << 20, "{done}");
        let r = http(
            &h,
            "POST",
            "/v1/executions",
            Some(&ann),
            Some(json!({"language": "r", "code": "1", "limits": {"memory_bytes": 128 << 20}})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_limits"));
    });
}

#[test]
fn an_e_mail_style_user_gets_a_token_runs_and_has_a_policy() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let root = h.token("hatchery", "root", "superadmin");
        let boss = h.token("acme", "boss", "org_admin");
        let ada = h.token("acme", "ada@example.com", "user");

        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/users/ada%40example.com/policy",
            Some(&boss),
            Some(json!({"memory_bytes": 128 << 20, "time_limit_ms": 30_000})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["user"], "ada@example.com");
        // Read back, with the `@` encoded or not.
        for path in [
            "/v1/admin/orgs/acme/users/ada%40example.com/policy",
            "/v1/admin/orgs/acme/users/ada@example.com/policy",
        ] {
            let v = get(&h, path, &root).await.json();
            assert_eq!(v["user"], "ada@example.com", "{v}");
            assert_eq!(v["policy"]["memory_bytes"], 128 << 20, "{v}");
            assert_eq!(v["effective"]["time_limit_ms"], 30_000, "{v}");
        }
        // Her executions run under it, and are hers.
        let id = run_r(&h, &ada, "6 * 7").await;
        let v = wait_terminal(&h, &ada, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "42");
        assert_eq!(v["user"], "ada@example.com");
        assert_eq!(v["limits"]["memory_bytes"], 128 << 20);
        assert_eq!(v["limits"]["time_limit_ms"], 30_000);
        let l = get(&h, "/v1/executions", &ada).await.json();
        assert_eq!(l["executions"][0]["id"], id.as_str(), "{l}");

        // `+` and `.` too, through the CLI and the routes.
        let plus = h.token("acme", "ada.l+lab@example.co.uk", "user");
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/users/ada.l%2Blab%40example.co.uk/policy",
            Some(&root),
            Some(json!({"cpus": 0.5})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["user"], "ada.l+lab@example.co.uk");
        let id = run_r(&h, &plus, "1").await;
        let v = wait_terminal(&h, &plus, &id).await;
        assert_eq!(v["limits"]["cpus"], 0.5, "{v}");
        // Names that could leave the store's folder are still refused.
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/users/..%2Fada%40example.com/policy",
            Some(&root),
            Some(json!({"cpus": 0.5})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"));
    });
}

#[test]
fn users_cannot_see_or_cancel_other_users_or_orgs_executions() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let ann = h.token("acme", "ann", "user");
        let bob = h.token("acme", "bob", "user");
        let eve = h.token("evil", "eve", "user");
        let evil_admin = h.token("evil", "boss", "org_admin");
        let acme_admin = h.token("acme", "boss", "org_admin");
        let id = run_r(&h, &ann, "Sys.sleep(2); 'mine'").await;
        for other in [&bob, &eve, &evil_admin] {
            let r = get(&h, &format!("/v1/executions/{id}"), other).await;
            assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
            let r = http(
                &h,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                Some(other),
                None,
            )
            .await;
            assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
            assert_eq!(
                ws_connect(&h, &format!("/v1/executions/{id}/events?token={other}"))
                    .await
                    .err(),
                Some(404)
            );
            let l = get(&h, "/v1/executions", other).await.json();
            assert!(l["executions"].as_array().unwrap().is_empty(), "{l}");
        }
        // Unknown ids answer exactly the same.
        let r = get(&h, "/v1/executions/0123456789abcdef", &ann).await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));
        // The owner's org admin may see it.
        assert_eq!(
            get(&h, &format!("/v1/executions/{id}"), &acme_admin)
                .await
                .status,
            200
        );
        // Admin routes are not for users.
        let r = get(&h, "/v1/admin/executions", &ann).await;
        assert_eq!((r.status, r.code().as_str()), (403, "forbidden"));
        assert_eq!(
            ws_connect(&h, &format!("/v1/admin/monitor?token={ann}"))
                .await
                .err(),
            Some(403)
        );
        let v = wait_terminal(&h, &ann, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
    });
}

/// A plot and a file in /work/out come back as artifacts: `artifact` events before
/// `finished`, listed in the result, the record and `GET .../artifacts`, downloadable
/// with the content type of their names and safe headers; an SVG is a download, never
/// rendered; other users get 404 (the owner's org admin may read them); a policy of
/// `max_artifacts = 0` returns none.
#[test]
fn plots_and_files_come_back_as_artifacts_for_their_owner_only() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let ann = h.token("acme", "ann", "user");
        let bob = h.token("acme", "bob", "user");
        let boss = h.token("acme", "boss", "org_admin");
        let code = "plot(1:10); writeLines('a,b', '/work/out/t.csv'); \
                    writeLines('<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>', \
                    '/work/out/x.svg'); cat('ok')";
        let id = run_r(&h, &ann, code).await;
        let v = wait_terminal(&h, &ann, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let events = all_events(&h, &ann, &id).await;
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        let first_artifact = kinds
            .iter()
            .position(|k| *k == "artifact")
            .expect("artifact events");
        assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
        assert!(first_artifact < kinds.len() - 1);
        let announced: Vec<(&str, &str)> = events
            .iter()
            .filter(|e| e["type"] == "artifact")
            .map(|e| {
                (
                    e["name"].as_str().unwrap(),
                    e["content_type"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            announced,
            [
                ("plot-001.png", "image/png"),
                ("t.csv", "text/csv; charset=utf-8"),
                ("x.svg", "image/svg+xml")
            ]
        );
        let listed = get(&h, &format!("/v1/executions/{id}/artifacts"), &ann).await;
        assert_eq!(listed.status, 200);
        let listed = listed.json();
        assert_eq!(
            listed["artifacts"], v["result"]["artifacts"],
            "{listed} / {v}"
        );
        assert_eq!(listed["artifacts"], v["artifacts"], "{listed} / {v}");
        assert_eq!(listed["artifacts"].as_array().unwrap().len(), 3);

        let png = get(
            &h,
            &format!("/v1/executions/{id}/artifacts/plot-001.png"),
            &ann,
        )
        .await;
        assert_eq!(png.status, 200);
        assert!(png.body.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert_eq!(
            png.body.len() as u64,
            listed["artifacts"][0]["bytes"].as_u64().unwrap()
        );
        assert_eq!(png.header("content-type"), Some("image/png"));
        assert_eq!(png.header("x-content-type-options"), Some("nosniff"));
        assert!(png
            .header("content-disposition")
            .unwrap()
            .starts_with("inline"));
        let csv = get(&h, &format!("/v1/executions/{id}/artifacts/t.csv"), &ann).await;
        assert_eq!((csv.status, csv.body.as_slice()), (200, &b"a,b\n"[..]));
        let svg = get(&h, &format!("/v1/executions/{id}/artifacts/x.svg"), &ann).await;
        assert_eq!(svg.status, 200);
        assert!(
            svg.header("content-disposition")
                .unwrap()
                .starts_with("attachment"),
            "an SVG can carry scripts: a download only"
        );
        assert!(svg
            .header("content-security-policy")
            .unwrap()
            .contains("sandbox"));

        // Nobody else; unknown names and path tricks are 404 too.
        for (who, name) in [
            (&bob, "plot-001.png"),
            (&ann, "nope.png"),
            (&ann, "..%2Fresults"),
        ] {
            let r = get(&h, &format!("/v1/executions/{id}/artifacts/{name}"), who).await;
            assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "{name}");
        }
        let r = get(&h, &format!("/v1/executions/{id}/artifacts"), &bob).await;
        assert_eq!(r.status, 404);
        let r = get(
            &h,
            &format!("/v1/executions/{id}/artifacts/plot-001.png"),
            &boss,
        )
        .await;
        assert_eq!(r.status, 200, "the owner's org admin may read it");

        // A policy without artifacts: the same code returns none.
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/users/ann/policy",
            Some(&boss),
            Some(json!({"max_artifacts": 0})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let id = run_r(&h, &ann, code).await;
        let v = wait_terminal(&h, &ann, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert!(v["result"].get("artifacts").is_none(), "{v}");
        let listed = get(&h, &format!("/v1/executions/{id}/artifacts"), &ann)
            .await
            .json();
        assert_eq!(listed["artifacts"], json!([]));
    });
}

#[test]
fn a_restart_keeps_finished_results_and_marks_running_ones_lost() {
    e2e(async {
        let mut h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let done = run_r(&h, &t, "cat('kept'); list(a = 1, b = 'two')").await;
        let before = wait_terminal(&h, &t, &done).await;
        assert_eq!(state(&before), "succeeded", "{before}");
        let running = run_r(&h, &t, LONG).await;
        wait_running(&h, &t, &running).await;

        // A crash: no chance to clean up.
        h.stop_with(libc::SIGKILL);
        h.spawn();
        h.ready().await;

        let after = execution(&h, &t, &done).await;
        assert_eq!(after["result"], before["result"]);
        assert_eq!(state(&after), "succeeded");
        let lost = wait_terminal(&h, &t, &running).await;
        assert_eq!(state(&lost), "lost", "{lost}");
        // Its event stream ends with the `lost` result.
        let mut ws = ws_connect(&h, &format!("/v1/executions/{running}/events?token={t}"))
            .await
            .unwrap();
        let (events, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed);
        assert_eq!(events.last().unwrap()["state"], "lost");
        // The restarted platform runs new work.
        let id = run_r(&h, &t, "2 + 2").await;
        assert_eq!(state(&wait_terminal(&h, &t, &id).await), "succeeded");
    });
}

#[test]
fn bad_requests_get_the_right_status_and_code() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let post = |body: Vec<u8>| raw_post(&h, "/v1/executions", &t, body, BodyMode::Length);

        let r = post(b"{\"language\": \"r\", \"code\": ".to_vec()).await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_json"));
        let r = post(b"not json".to_vec()).await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_json"));
        let r = post(Vec::new()).await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_json"));

        let big_code = "x".repeat(1_500_000);
        let r =
            post(serde_json::to_vec(&json!({"language": "r", "code": big_code})).unwrap()).await;
        assert_eq!((r.status, r.code().as_str()), (413, "code_too_large"));
        let huge =
            serde_json::to_vec(&json!({"language": "r", "code": "x".repeat(3 << 20)})).unwrap();
        let r = post(huge.clone()).await;
        assert_eq!((r.status, r.code().as_str()), (413, "payload_too_large"));
        let r = raw_post(&h, "/v1/executions", &t, huge, BodyMode::Chunked).await;
        assert_eq!((r.status, r.code().as_str()), (413, "payload_too_large"));

        let cases = [
            (
                json!({"language": "cobol", "code": "1"}),
                422,
                "unknown_language",
            ),
            (json!({"language": "r"}), 422, "invalid_request"),
            (
                json!({"language": "r", "code": "1", "colour": "red"}),
                422,
                "invalid_request",
            ),
            (json!({"language": "r", "code": 5}), 422, "invalid_request"),
            (
                json!({"language": "r", "code": "1", "limits": {"memory_bytes": -1}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"cpus": -0.5}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"time_limit_ms": 0}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"memory_bytes": 1u64 << 50}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"memory_bytes": 1e300}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"cpus": 4096}}),
                422,
                "invalid_limits",
            ),
            (
                json!({"language": "r", "code": "1", "limits": {"pids": 1.5}}),
                422,
                "invalid_limits",
            ),
        ];
        for (body, status, code) in cases {
            let r = http(&h, "POST", "/v1/executions", Some(&t), Some(body.clone())).await;
            assert_eq!((r.status, r.code().as_str()), (status, code), "{body}");
        }
        let root = h.token("hatchery", "root", "superadmin");
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            Some(&root),
            Some(json!({"max_parallel": -3})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_limits"));
        let r = http(
            &h,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            Some(&root),
            Some(json!({"memory_bytes": 1})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_limits"));

        // Credentials.
        let r = http(&h, "GET", "/v1/executions", None, None).await;
        assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
        assert!(r.header("www-authenticate").unwrap().starts_with("Bearer"));
        let r = get(&h, "/v1/executions", "not.a.token").await;
        assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));
        let forged = {
            let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
            parts[2] = "AAAA".into();
            parts.join(".")
        };
        assert_eq!(get(&h, "/v1/executions", &forged).await.status, 401);
        assert_eq!(ws_connect(&h, "/v1/events").await.err(), Some(401));

        // Routes and methods.
        let r = get(&h, "/v1/nope", &t).await;
        assert_eq!((r.status, r.code().as_str()), (404, "unknown_route"));
        let r = http(&h, "DELETE", "/v1/executions", Some(&t), None).await;
        assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"));
        assert!(r.header("allow").unwrap().contains("POST"));
        let r = get(&h, "/v1/executions?colour=red", &t).await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"));
        let r = get(&h, "/v1/executions?state=dancing", &t).await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"));
        let r = get(&h, "/v1/executions/abc/events", &t).await;
        assert_eq!((r.status, r.code().as_str()), (426, "websocket_required"));
    });
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    e2e(async {
        let h = Hatchery::started(Setup {
            capacity: 1,
            max_queued: 2,
            ..Setup::default()
        })
        .await;
        let (u1, u2, u3) = (
            h.token("acme", "u1", "user"),
            h.token("acme", "u2", "user"),
            h.token("acme", "u3", "user"),
        );
        let a = run_r(&h, &u1, LONG).await;
        wait_running(&h, &u1, &a).await;
        let b = run_r(&h, &u1, LONG).await; // queued: the host runs one at a time
        let c = run_r(&h, &u2, LONG).await; // queued
                                            // The refusal and the scrape on one replica: request counters are per process.
        let body = serde_json::to_vec(&json!({"language": "r", "code": "1"})).unwrap();
        let r = try_http(
            h.addr,
            "POST",
            "/v1/executions",
            Some(&u3),
            Some((body, BodyMode::Length)),
        )
        .await
        .unwrap();
        assert_eq!((r.status, r.code().as_str()), (503, "queue_full"));
        assert!(r.header("retry-after").unwrap().parse::<u32>().unwrap() >= 1);
        let m = try_http(h.addr, "GET", "/metrics", None, None)
            .await
            .unwrap();
        let text = String::from_utf8(m.body).unwrap();
        assert!(text.contains("hatchery_queue_length 2"), "{text}");
        assert!(text.contains("hatchery_executions_running 1"), "{text}");
        assert!(
            text.contains("route=\"/v1/executions\",method=\"POST\",status=\"503\"} 1"),
            "{text}"
        );
        for (tok, id) in [(&u1, &a), (&u1, &b), (&u2, &c)] {
            http(
                &h,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                Some(tok),
                None,
            )
            .await;
            wait_terminal(&h, tok, id).await;
        }
    });
}

/// Memory limit of the storm's executions: a pooled sandbox has the default policy's
/// (512 MiB), so a sandbox with this one was claimed by the storm.
const STORM_MEMORY: u64 = 300 << 20;

/// Sandboxes under any of `parents` (every agent's) that run (or are being killed with)
/// storm code: claimed with [`STORM_MEMORY`], thawed, with processes left.
fn live_storm_sandboxes(parents: &[String]) -> usize {
    parents
        .iter()
        .map(|p| hatchery_tests::live_sandboxes(p, STORM_MEMORY))
        .sum()
}

/// R11 at the sandbox level: with two executions running under a cap of 2, a third
/// displaces the oldest, and its sandbox is thawed only once the displaced one is dead —
/// its `started` event comes after the displaced one's `finished`, and the cgroups never
/// show three running.
#[test]
fn a_displaced_execution_is_dead_before_its_successor_runs() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "steady", "user");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sandboxes = {
            let (parents, stop) = (h.cgroup_parents.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut max_live = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    max_live = max_live.max(live_storm_sandboxes(&parents));
                    std::thread::sleep(Duration::from_millis(1));
                }
                max_live
            })
        };
        let body = || {
            json!({
                "language": "r",
                "code": "Sys.sleep(30)",
                "limits": {"memory_bytes": STORM_MEMORY},
            })
        };
        let mut running = vec![submit(&h, &t, body()).await, submit(&h, &t, body()).await];
        for id in &running {
            wait_running(&h, &t, id).await;
        }
        for round in 0..4 {
            // Both sandboxes thawed before the next one comes.
            let deadline = Instant::now() + PATIENCE;
            while live_storm_sandboxes(&h.cgroup_parents) < 2 {
                assert!(Instant::now() < deadline, "round {round}: two never ran");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let next = submit(&h, &t, body()).await;
            let displaced = running.remove(0);
            wait_running(&h, &t, &next).await;
            let old = wait_terminal(&h, &t, &displaced).await;
            assert_eq!(old["cancel"], "parallelism_cap", "{old}");
            let old_events = all_events(&h, &t, &displaced).await;
            let finished_at = old_events
                .iter()
                .find(|e| e["type"] == "finished")
                .and_then(|e| e["at"].as_u64())
                .expect("a finished event");
            // The successor's started event (after its claim, i.e. its thaw).
            let mut ws = ws_connect(&h, &format!("/v1/executions/{next}/events?token={t}"))
                .await
                .unwrap();
            let (events, _) =
                read_events(&mut ws, |ev| ev.iter().any(|e| e["type"] == "started")).await;
            let started_at = events
                .iter()
                .find(|e| e["type"] == "started")
                .and_then(|e| e["at"].as_u64())
                .expect("a started event");
            assert!(
                started_at >= finished_at,
                "round {round}: {next} started at {started_at}, before {displaced} it displaced \
                 finished at {finished_at}"
            );
            running.push(next);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let max_live = sandboxes.join().unwrap();
        assert!(
            max_live <= 2,
            "{max_live} of the user's sandboxes ran at once under a cap of 2"
        );
        for id in &running {
            let r = http(
                &h,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                Some(&t),
                None,
            )
            .await;
            assert!(r.status < 300, "cancel {id}: {}", r.status);
        }
    });
}

/// R11 under a storm: simultaneous POSTs of one user (30 on `hatchery up`; 200 on a
/// cluster, spread over both API replicas, placed on both agents) never run more than the
/// cap of 2 at once — counted from the agents' sandboxes, not from records — and the two
/// newest survive.
#[test]
fn a_storm_of_simultaneous_submissions_never_runs_more_than_two() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let storm: usize = if on_cluster() { 200 } else { 30 };
        let t = h.token("acme", "rush", "user");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // What really runs, sampled from the sandboxes' cgroups every millisecond: a
        // displaced execution must be dead before its successor is thawed.
        let sandboxes = {
            let (parents, stop) = (h.cgroup_parents.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut max_live, mut samples) = (0, 0u64);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    max_live = max_live.max(live_storm_sandboxes(&parents));
                    samples += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                (max_live, samples)
            })
        };
        // Sample the user's executions while the storm runs: one list is one snapshot.
        let sampler = {
            let (addr, t, stop) = (h.addr, t.clone(), stop.clone());
            tokio::spawn(async move {
                let mut max_active = 0;
                let mut samples = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Ok(r) =
                        try_http(addr, "GET", "/v1/executions?limit=500", Some(&t), None).await
                    {
                        let v = r.json();
                        let active = v["executions"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter(|e| {
                                matches!(state(e), "queued" | "running") && e["cancel"].is_null()
                            })
                            .count();
                        max_active = max_active.max(active);
                        samples += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (max_active, samples)
            })
        };
        let posts = (0..storm).map(|i| {
            let (addr, t) = (h.next_addr(), t.clone());
            async move {
                let body = serde_json::to_vec(&json!({
                    "language": "r",
                    "code": format!("Sys.sleep(1); {i}"),
                    "limits": {"memory_bytes": STORM_MEMORY},
                }))
                .unwrap();
                try_http(
                    addr,
                    "POST",
                    "/v1/executions",
                    Some(&t),
                    Some((body, BodyMode::Length)),
                )
                .await
                .unwrap()
            }
        });
        let answers = futures_util::future::join_all(posts).await;
        // Every admission has happened by now.
        let storm_over_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut ids = Vec::new();
        for r in &answers {
            assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
            ids.push(r.json()["id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), storm);
        let mut finals = Vec::new();
        for id in &ids {
            finals.push(wait_terminal(&h, &t, id).await);
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (max_active, samples) = sampler.await.unwrap();
        assert!(samples > 0);
        assert!(max_active <= 2, "{max_active} active at once");
        let (max_live, sandbox_samples) = sandboxes.join().unwrap();
        assert!(
            sandbox_samples > 100,
            "{sandbox_samples} samples of the sandboxes"
        );
        assert!(max_live > 0, "the sampler never saw a storm sandbox run");
        assert!(
            max_live <= 2,
            "{max_live} of the user's sandboxes ran at once under a cap of 2"
        );
        // The cap cancels the oldest in the order the store admitted them: the two admitted
        // last are never cancelled. Any other survivor must have finished before the storm
        // was over (each run takes a second), otherwise exactly those two survive.
        let mut by_age: Vec<&Value> = finals.iter().collect();
        by_age.sort_by_key(|v| v["admitted"].as_u64().expect("an admission order"));
        let orders: BTreeSet<u64> = by_age
            .iter()
            .filter_map(|v| v["admitted"].as_u64())
            .collect();
        assert_eq!(orders.len(), storm, "two admissions got the same order");
        for newest in &by_age[by_age.len() - 2..] {
            assert!(
                newest["cancel"].is_null() && state(newest) == "succeeded",
                "one of the two newest executions did not survive: {newest}"
            );
        }
        let survivors: Vec<&Value> = finals.iter().filter(|v| v["cancel"].is_null()).collect();
        let finished_during_storm = survivors.iter().any(|v| {
            v["finished_at"]
                .as_u64()
                .is_some_and(|f| f <= storm_over_ms)
        });
        assert!(
            survivors.len() == 2 || finished_during_storm,
            "{} survived a storm of {storm} under a cap of 2, and none finished before the \
             storm was over: {survivors:?}",
            survivors.len()
        );
        for v in &finals {
            if v["cancel"].is_null() {
                assert_eq!(state(v), "succeeded", "{v}");
            } else {
                assert_eq!(v["cancel"], "parallelism_cap", "{v}");
            }
        }
        // Overlap check on what really ran: never more than two at once.
        let mut edges: Vec<(u64, i32)> = Vec::new();
        for v in &finals {
            if let (Some(s), Some(f)) = (v["started_at"].as_u64(), v["finished_at"].as_u64()) {
                if v["cancel"].is_null() {
                    edges.push((s, 1));
                    edges.push((f, -1));
                }
            }
        }
        edges.sort();
        let mut now = 0;
        for (_, d) in edges {
            now += d;
            assert!(now <= 2, "more than two uncancelled executions ran at once");
        }
    });
}

#[test]
fn all_events_monitor_and_admin_views() {
    e2e(async {
        let h = Hatchery::started(Setup::default()).await;
        let t = h.token("acme", "ann", "user");
        let root = h.token("hatchery", "root", "superadmin");
        let mut all = ws_connect(&h, &format!("/v1/events?token={t}"))
            .await
            .unwrap();
        let mut monitor = ws_connect(&h, &format!("/v1/admin/monitor?token={root}"))
            .await
            .unwrap();
        // Filtered by the server: another org's view shows none of acme's sandboxes (nor
        // hosts that run only those); a host that does not exist sends nothing.
        let mut globex = ws_connect(&h, &format!("/v1/admin/monitor?token={root}&org=globex"))
            .await
            .unwrap();
        let mut nowhere = ws_connect(&h, &format!("/v1/admin/monitor?token={root}&agent=nowhere"))
            .await
            .unwrap();
        let busy = run_r(
            &h,
            &t,
            "s <- 0; t0 <- Sys.time(); while (Sys.time() - t0 < 4) s <- s + 1; cat('busy done')",
        )
        .await;
        let quick = run_r(&h, &t, "cat('quick')").await;
        // Both executions' events reach the caller's stream, each execution in seq order.
        let (events, closed) = read_events(&mut all, |ev| {
            ev.iter().filter(|e| e["type"] == "finished").count() == 2
        })
        .await;
        assert!(
            !closed,
            "the events stream closed before both executions finished: {events:?}"
        );
        // The busy one ran for 4 s: its usage samples came live, without a seq.
        assert!(
            events.iter().any(|e| e["execution_id"] == busy.as_str()
                && e["type"] == "usage"
                && e.get("seq").is_none()
                && e["memory_bytes"].as_u64().is_some()),
            "no live usage of {busy}: {events:?}"
        );
        for id in [&busy, &quick] {
            let mine: Vec<Value> = events
                .iter()
                .filter(|e| e["execution_id"] == id.as_str())
                .cloned()
                .collect();
            let s = seqs(&logged(&mine));
            assert_eq!(
                s,
                (1..=s.len() as u64).collect::<Vec<_>>(),
                "{id}: {mine:?}"
            );
        }
        // The monitor showed the busy sandbox's usage while it ran.
        let (statuses, closed) = read_events(&mut monitor, |st| {
            st.iter().any(|s| {
                s["sandboxes"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|x| x["execution_id"] == busy.as_str()))
            })
        })
        .await;
        assert!(
            !closed,
            "the monitor closed before it showed the busy sandbox: {statuses:?}"
        );
        // Each status says what the host has for executions, what the busy one's limits
        // take of it, and what the machine does.
        let shown = statuses
            .iter()
            .find(|s| {
                s["sandboxes"]
                    .as_array()
                    .is_some_and(|b| b.iter().any(|x| x["execution_id"] == busy.as_str()))
            })
            .unwrap();
        assert!(
            shown["allocatable"]["memory_bytes"].as_u64().unwrap() > 0,
            "{shown}"
        );
        assert!(
            shown["allocatable"]["cpus"].as_f64().unwrap() > 0.0,
            "{shown}"
        );
        let mine = shown["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["execution_id"] == busy.as_str())
            .unwrap();
        assert!(
            mine["limits"]["memory_bytes"].as_u64().unwrap() > 0,
            "{mine}"
        );
        let load = &shown["load"];
        assert!(load["memory_total_bytes"].as_u64().unwrap() > 0, "{shown}");
        assert!(
            load["memory_used_bytes"].as_u64().unwrap()
                <= load["memory_total_bytes"].as_u64().unwrap(),
            "{shown}"
        );
        assert!(
            (0.0..=1.0).contains(&load["cpu_busy"].as_f64().unwrap()),
            "{shown}"
        );
        let _ = monitor.close(None).await;
        // Open through the whole busy run (statuses come every second): nothing for them.
        for (name, ws) in [("org=globex", &mut globex), ("agent=nowhere", &mut nowhere)] {
            let mut got = Vec::new();
            while let Ok(Some(Ok(msg))) =
                tokio::time::timeout(Duration::from_millis(300), ws.next()).await
            {
                if let Message::Text(t) = msg {
                    got.push(t.to_string());
                }
            }
            assert!(got.is_empty(), "{name}: {got:?}");
            let _ = ws.close(None).await;
        }
        // The admin list and metrics.
        let long = run_r(&h, &t, LONG).await;
        wait_running(&h, &t, &long).await;
        let l = get(&h, "/v1/admin/executions", &root).await.json();
        assert!(
            l["executions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == long.as_str()),
            "{l}"
        );
        let (events, closed) =
            read_events(&mut all, |ev| ev.iter().any(|e| e["type"] == "started")).await;
        assert!(
            !closed,
            "the events stream closed before the long execution started: {events:?}"
        );
        assert!(
            events.iter().all(|e| e["execution_id"] == long.as_str()),
            "events of other executions after the long one was submitted: {events:?}"
        );
        http(
            &h,
            "POST",
            &format!("/v1/executions/{long}/cancel"),
            Some(&t),
            None,
        )
        .await;
        let (events, closed) =
            read_events(&mut all, |ev| ev.iter().any(|e| e["type"] == "finished")).await;
        assert!(
            !closed,
            "the events stream closed before the cancelled execution finished: {events:?}"
        );
        assert_eq!(events.last().unwrap()["state"], "cancelled", "{events:?}");
        let _ = all.send(Message::Close(None)).await;
        // Counters are per API node: summed over the replicas, as a scrape of all would.
        let scrapes = scrape_all(&h).await;
        assert_eq!(
            sample_sum(&scrapes, "hatchery_executions_submitted_total"),
            3.0,
            "{scrapes:?}"
        );
        // Every node sees every execution finish (the bus's fan-out).
        for m in &scrapes {
            assert_eq!(
                sample_sum(
                    std::slice::from_ref(m),
                    "hatchery_executions_finished_total{state=\"succeeded\"}"
                ),
                2.0,
                "{m}"
            );
        }
        let agent = if on_cluster() { "agent-a" } else { "e2e" };
        for m in &scrapes {
            assert!(
                m.contains(&format!(
                    "hatchery_warm_sandboxes{{agent=\"{agent}\",language=\"r\"}}"
                )),
                "{m}"
            );
            // Per host: the machine's figures and what the host has for executions.
            for family in [
                "hatchery_host_cpu_busy_ratio",
                "hatchery_host_memory_used_bytes",
                "hatchery_host_cpu_pressure",
                "hatchery_host_allocatable_memory_bytes",
                "hatchery_host_limits_memory_bytes",
            ] {
                assert!(
                    m.contains(&format!("{family}{{agent=\"{agent}\"}} ")),
                    "{family}: {m}"
                );
            }
            assert!(
                sample_sum(
                    std::slice::from_ref(m),
                    &format!("hatchery_host_memory_total_bytes{{agent=\"{agent}\"}}")
                ) > 0.0,
                "{m}"
            );
        }
        assert_eq!(http(&h, "GET", "/healthz", None, None).await.status, 200);
    });
}

/// `/metrics` of every API replica.
async fn scrape_all(h: &Hatchery) -> Vec<String> {
    let mut out = Vec::new();
    for addr in &h.addrs {
        let r = try_http(*addr, "GET", "/metrics", None, None)
            .await
            .unwrap();
        out.push(String::from_utf8(r.body).unwrap());
    }
    out
}

/// The sum over `scrapes` of the sample named exactly `sample` (name and labels).
fn sample_sum(scrapes: &[String], sample: &str) -> f64 {
    scrapes
        .iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .sum()
}
