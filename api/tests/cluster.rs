//! The roles as separate processes on the cluster's engines: a private PostgreSQL, Redis
//! and S3 (moto), two `hatchery api` replicas, schedulers and two `hatchery agent`s (each
//! with a cgroup parent of its own), sharing one keys file.
//! Work submitted on one replica runs on both agents and streams from the other replica;
//! an API replica killed mid-stream loses nothing for a client that resumes on the other
//! with `after=seq`.
//!
//! Needs root, PostgreSQL, Redis, moto, the root filesystem and the sandbox binaries.

mod harness;
use harness::*;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hatchery_api::local_cluster::{ClusterSpec, LocalCluster, RoleKind};
use serde_json::{json, Value};

/// A local cluster whose processes are started by each test; `None` (skip recorded) when
/// an engine is not installed.
fn cluster(test: &str) -> Option<LocalCluster> {
    cluster_with(test, "")
}

/// [`cluster`] with `extra` appended to its config.
fn cluster_with(test: &str, extra: &str) -> Option<LocalCluster> {
    let mut spec = ClusterSpec::new(HATCHERY, rootfs());
    spec.extra_config = extra.to_string();
    spec.cgroup_prefix = format!("cluster-{}", std::process::id());
    // Keep the config and the processes' logs for a look after the run.
    if let Some(dir) = std::env::var_os("HATCHERY_CLUSTER_LOGS") {
        spec.dir = Some(std::path::PathBuf::from(dir).join(test));
    }
    match LocalCluster::engines(spec) {
        Ok(c) => Some(c),
        Err(e) if e.is_missing_engine() => {
            hatchery_tests::skip(test, &e.to_string(), "HATCHERY_REQUIRE_ENGINES");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// The cluster's calls, failing the test on an error.
trait ClusterExt {
    fn api_proc(&mut self, name: &str) -> usize;
    fn addr_of(&self, i: usize) -> SocketAddr;
    fn role(&mut self, kind: RoleKind, name: &str, env: &[(&str, String)]) -> usize;
    fn agent_named(&mut self, name: &str, env: &[(&str, String)]) -> usize;
    fn tok(&self, org: &str, user: &str, role: &str) -> String;
}

impl ClusterExt for LocalCluster {
    fn api_proc(&mut self, name: &str) -> usize {
        self.api(name).unwrap_or_else(|e| panic!("{e}"))
    }

    fn addr_of(&self, i: usize) -> SocketAddr {
        self.procs[i].addr.expect("an API replica")
    }

    fn role(&mut self, kind: RoleKind, name: &str, env: &[(&str, String)]) -> usize {
        self.spawn(kind, name, env)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn agent_named(&mut self, name: &str, env: &[(&str, String)]) -> usize {
        self.agent(name, env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn tok(&self, org: &str, user: &str, role: &str) -> String {
        self.token(org, user, role)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

async fn req(addr: SocketAddr, method: &str, path: &str, token: &str, body: Option<Value>) -> Resp {
    let body = body.map(|b| (serde_json::to_vec(&b).unwrap(), BodyMode::Length));
    try_http(addr, method, path, Some(token), body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

async fn submit_on(addr: SocketAddr, token: &str, code: &str) -> String {
    let r = req(
        addr,
        "POST",
        "/v1/executions",
        token,
        Some(json!({"language": "r", "code": code})),
    )
    .await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

async fn finished_on(addr: SocketAddr, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = req(addr, "GET", &format!("/v1/executions/{id}"), token, None).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        if terminal(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never finished: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ws_on(addr: SocketAddr, path: &str) -> WsStream {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .unwrap_or_else(|e| panic!("websocket {path} on {addr}: {e}"));
    ws
}

#[test]
fn roles_as_separate_processes_run_work_across_agents_and_replicas() {
    let Some(mut c) = cluster("roles_as_separate_processes_run_work_across_agents_and_replicas")
    else {
        return;
    };
    let api1 = c.api_proc("api-1");
    let api2 = c.api_proc("api-2");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    c.agent_named("agent-a", &[]);
    c.agent_named("agent-b", &[]);
    let (a1, a2) = (c.addr_of(api1), c.addr_of(api2));
    let tokens: Vec<String> = (0..2)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        wait_ready(a1, 2).await;
        wait_ready(a2, 2).await;

        // Four at once (two users, two each): two agents of capacity 2 share them.
        let mut ids = Vec::new();
        for t in &tokens {
            for i in 0..2 {
                ids.push((
                    t.clone(),
                    submit_on(a1, t, &format!("Sys.sleep(1); {i} + 1")).await,
                ));
            }
        }
        let mut agents = BTreeSet::new();
        for (t, id) in &ids {
            // Read through the other replica.
            let v = finished_on(a2, t, id).await;
            assert_eq!(state(&v), "succeeded", "{v}");
            agents.insert(v["agent"].as_str().unwrap_or("?").to_string());
        }
        assert_eq!(
            agents,
            BTreeSet::from(["agent-a".to_string(), "agent-b".to_string()]),
            "the work did not spread over both agents"
        );

        // Submitted on one replica, streamed live from the other.
        let t = &tokens[0];
        let id = submit_on(
            a1,
            t,
            r#"for (i in 1:3) { cat("tick", i, "\n"); Sys.sleep(0.2) }"#,
        )
        .await;
        let mut ws = ws_on(a2, &format!("/v1/executions/{id}/events?token={t}")).await;
        let (events, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed);
        assert_eq!(stdout_of(&events), "tick 1 \ntick 2 \ntick 3 \n");
        let events = logged(&events);
        assert_eq!(seqs(&events), (1..=events.len() as u64).collect::<Vec<_>>());
    });
    // Code and results went to the bucket, not to a shared folder.
    assert!(
        !c.dir().join("data/objects").exists(),
        "objects were written to the local folder"
    );
}

#[test]
fn a_client_resumes_on_another_replica_after_its_replica_is_killed() {
    let Some(mut c) = cluster("a_client_resumes_on_another_replica_after_its_replica_is_killed")
    else {
        return;
    };
    let api1 = c.api_proc("api-1");
    let api2 = c.api_proc("api-2");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    c.agent_named("agent-a", &[]);
    let (a1, a2) = (c.addr_of(api1), c.addr_of(api2));
    let t = c.tok("acme", "alice", "user");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let killer = {
        // The replica the client streams from dies with SIGKILL when told.
        let mut proc = c.procs.remove(api2);
        std::thread::spawn(move || {
            let _ = rx.recv();
            proc.stop(libc::SIGKILL);
            proc
        })
    };
    e2e(async {
        wait_ready(a1, 0).await;
        let id = submit_on(
            a1,
            &t,
            r#"for (i in 1:20) { cat("line", i, "\n"); Sys.sleep(0.1) }"#,
        )
        .await;
        let mut ws = ws_on(a2, &format!("/v1/executions/{id}/events?token={t}")).await;
        let (first, _) = read_events(&mut ws, |ev| {
            ev.iter().filter(|e| e["type"] == "stdout").count() >= 3
        })
        .await;
        tx.send(()).unwrap();
        // The replica is gone: the stream ends (an error or a close, never more events).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            use futures_util::StreamExt;
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(None) | Ok(Some(Err(_))) => break,
                Ok(Some(Ok(m))) if m.is_close() => break,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("the killed replica's stream never ended"),
            }
        }
        let first = logged(&first);
        let after = first.last().and_then(|e| e["seq"].as_u64()).unwrap();
        let mut ws = ws_on(
            a1,
            &format!("/v1/executions/{id}/events?token={t}&after={after}"),
        )
        .await;
        let (rest, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed);
        let all: Vec<Value> = first.into_iter().chain(logged(&rest)).collect();
        assert_eq!(
            seqs(&all),
            (1..=all.len() as u64).collect::<Vec<_>>(),
            "{all:?}"
        );
        let expected: String = (1..=20).map(|i| format!("line {i} \n")).collect();
        assert_eq!(stdout_of(&all), expected);
        let v = finished_on(a1, &t, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
    });
    drop(killer.join().unwrap());
}

/// Sandbox cgroups under `parent` whose owner (the agent process that made them) is dead,
/// and whether each still holds processes.
fn orphans(parent: &str) -> Vec<(String, bool)> {
    use hatchery_sandbox::cgroup::CgroupRoot;
    use hatchery_sandbox::gc::owner_of;
    let Ok(root) = CgroupRoot::detect(parent) else {
        return Vec::new();
    };
    root.children()
        .into_iter()
        .filter(|name| owner_of(name).is_some_and(|o| !o.is_alive()))
        .map(|name| {
            let busy = root.open(&name).is_ok_and(|cg| !cg.is_empty());
            (name, busy)
        })
        .collect()
}

#[test]
fn an_agent_killed_loses_its_runs_within_its_lease_and_leaves_no_orphan_when_restarted() {
    let Some(mut c) = cluster(
        "an_agent_killed_loses_its_runs_within_its_lease_and_leaves_no_orphan_when_restarted",
    ) else {
        return;
    };
    let api = c.api_proc("api-1");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    let lease = ("HATCHERY_AGENT_LEASE", "2s".to_string());
    let parent_a = c.cgroup_parent("agent-a");
    let agent_a = c.agent_named("agent-a", std::slice::from_ref(&lease));
    c.agent_named("agent-b", std::slice::from_ref(&lease));
    let addr = c.addr_of(api);
    let tokens: Vec<String> = (0..3)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        wait_ready(addr, 2).await;
        // Four long runs: two on each agent (capacity 2 each).
        let mut runs = Vec::new();
        for t in &tokens[..2] {
            for _ in 0..2 {
                runs.push((t.clone(), submit_on(addr, t, "Sys.sleep(60)").await));
            }
        }
        let deadline = Instant::now() + PATIENCE;
        let mut on_a = Vec::new();
        loop {
            on_a.clear();
            let mut running = 0;
            for (t, id) in &runs {
                let v = req(addr, "GET", &format!("/v1/executions/{id}"), t, None)
                    .await
                    .json();
                if state(&v) == "running" {
                    running += 1;
                    if v["agent"] == "agent-a" {
                        on_a.push((t.clone(), id.clone()));
                    }
                }
            }
            if running == 4 {
                break;
            }
            assert!(Instant::now() < deadline, "the four runs never ran at once");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(on_a.len(), 2, "agent-a does not run two of the four");

        // agent-a dies without a word; the sandboxes it ran are orphans now.
        let killed_at = Instant::now();
        c.procs[agent_a].stop(libc::SIGKILL);
        eprintln!("left by the killed agent: {:?}", orphans(&parent_a));
        for (t, id) in &on_a {
            let v = finished_on(addr, t, id).await;
            assert_eq!(state(&v), "lost", "{v}");
            assert!(
                v["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("lease expired")),
                "{v}"
            );
        }
        let took = killed_at.elapsed();
        // The lease (2 s) plus the scheduler's reaping pass (1 s), with room for a
        // loaded machine; far less than the runs' own 60 s.
        assert!(took < Duration::from_secs(15), "lost only after {took:?}");
        // The other agent's runs go on.
        for (t, id) in runs.iter().filter(|r| !on_a.contains(r)) {
            let v = req(addr, "GET", &format!("/v1/executions/{id}"), t, None)
                .await
                .json();
            assert_eq!(state(&v), "running", "{v}");
            assert_eq!(v["agent"], "agent-b", "{v}");
            let r = req(
                addr,
                "POST",
                &format!("/v1/executions/{id}/cancel"),
                t,
                None,
            )
            .await;
            assert!(r.status < 300);
            finished_on(addr, t, id).await;
        }
        // New work goes to the agent that is alive.
        let id = submit_on(addr, &tokens[2], "Sys.sleep(0.2); 5").await;
        let v = finished_on(addr, &tokens[2], &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["agent"], "agent-b", "{v}");
    });

    // agent-a comes back: what its dead life left running is gone once it is up.
    c.restart(agent_a).unwrap_or_else(|e| panic!("{e}"));
    e2e(async {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = try_http(addr, "GET", "/readyz", None, None).await {
                let agents = r.json()["agents"].clone();
                if r.status == 200
                    && agents
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x.to_string().contains("agent-a")))
                {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "agent-a never came back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let left = orphans(&parent_a);
    assert!(
        left.is_empty(),
        "sandboxes of the killed agent are left: {left:?}"
    );
}

/// Waits until `id` runs; its record then.
async fn running_on(addr: SocketAddr, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = req(addr, "GET", &format!("/v1/executions/{id}"), token, None)
            .await
            .json();
        if state(&v) == "running" {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never ran: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The host status of `agent` as `/readyz` shows it.
async fn host_of(addr: SocketAddr, agent: &str) -> Option<Value> {
    let r = try_http(addr, "GET", "/readyz", None, None).await.ok()?;
    r.json()["agents"]
        .as_array()?
        .iter()
        .find(|a| a["agent"] == agent)
        .cloned()
}

#[test]
fn an_agent_given_sigterm_drains_without_killing_and_a_second_signal_forces_it() {
    let Some(mut c) =
        cluster("an_agent_given_sigterm_drains_without_killing_and_a_second_signal_forces_it")
    else {
        return;
    };
    let api = c.api_proc("api-1");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    // No deadline: the drain waits for the executions' own time limits.
    let no_deadline = ("HATCHERY_DRAIN_DEADLINE", "none".to_string());
    let agent_a = c.agent_named("agent-a", std::slice::from_ref(&no_deadline));
    let agent_b = c.agent_named("agent-b", std::slice::from_ref(&no_deadline));
    let addr = c.addr_of(api);
    let tokens: Vec<String> = (0..3)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        wait_ready(addr, 2).await;
        // A run of a few seconds, on agent-a (both idle: the tie goes to the first name).
        let long = submit_on(
            addr,
            &tokens[0],
            r#"Sys.sleep(4); cat("finished in peace\n")"#,
        )
        .await;
        let v = running_on(addr, &tokens[0], &long).await;
        assert_eq!(v["agent"], "agent-a", "{v}");

        // SIGTERM: agent-a drains. It says so, keeps running its execution, and new
        // work goes to agent-b.
        let signalled = Instant::now();
        assert!(c.procs[agent_a].signal(libc::SIGTERM));
        let deadline = Instant::now() + PATIENCE;
        while !host_of(addr, "agent-a")
            .await
            .is_some_and(|h| h["draining"] == true)
        {
            assert!(Instant::now() < deadline, "agent-a never reported draining");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let h = host_of(addr, "agent-a").await.unwrap();
        assert_eq!(h["running"], 1, "{h}");
        let short = submit_on(addr, &tokens[1], "cat(6 * 7)").await;
        let v = finished_on(addr, &tokens[1], &short).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["agent"], "agent-b", "{v}");
        assert!(
            c.procs[agent_a].is_running(),
            "agent-a exited while its execution ran"
        );

        // The running execution ends on its own, untouched; then the agent exits.
        let v = finished_on(addr, &tokens[0], &long).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["agent"], "agent-a", "{v}");
        let events = log_of(addr, &tokens[0], &long).await;
        assert_eq!(stdout_of(&events), "finished in peace\n");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(s) = c.procs[agent_a].exited() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "agent-a never exited after its drain"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "agent-a: {status}");
        eprintln!(
            "agent-a: SIGTERM → exit {:?} (its execution slept 4 s)",
            signalled.elapsed()
        );
        assert!(
            signalled.elapsed() > Duration::from_secs(2),
            "agent-a exited before its execution could have ended"
        );

        // agent-b drains too, with a run of a minute: a second SIGTERM forces the drain.
        // The run ends `lost`, saying why, and the agent exits.
        let minute = submit_on(addr, &tokens[2], "Sys.sleep(60)").await;
        running_on(addr, &tokens[2], &minute).await;
        assert!(c.procs[agent_b].signal(libc::SIGTERM));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = req(
            addr,
            "GET",
            &format!("/v1/executions/{minute}"),
            &tokens[2],
            None,
        )
        .await
        .json();
        assert_eq!(
            state(&v),
            "running",
            "a drain killed a running execution: {v}"
        );
        assert!(c.procs[agent_b].is_running());
        let forced = Instant::now();
        assert!(c.procs[agent_b].signal(libc::SIGTERM));
        let v = finished_on(addr, &tokens[2], &minute).await;
        assert_eq!(state(&v), "lost", "{v}");
        assert_eq!(v["result"]["error_code"], "agent_shutdown", "{v}");
        assert!(
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("drain was forced by a second signal")),
            "{v}"
        );
        let deadline = Instant::now() + PATIENCE;
        while c.procs[agent_b].exited().is_none() {
            assert!(
                Instant::now() < deadline,
                "agent-b never exited when forced"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("agent-b: second SIGTERM → exit {:?}", forced.elapsed());
        assert!(
            forced.elapsed() < Duration::from_secs(20),
            "the forced drain took {:?}",
            forced.elapsed()
        );
    });
    let log = std::fs::read_to_string(&c.procs[agent_b].log).unwrap_or_default();
    assert!(
        log.contains("drain forced"),
        "agent-b's log does not say the drain was forced"
    );
}

#[test]
fn placement_counts_memory_and_a_request_no_host_can_hold_is_refused() {
    let Some(mut c) = cluster("placement_counts_memory_and_a_request_no_host_can_hold_is_refused")
    else {
        return;
    };
    let api = c.api_proc("api-1");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    // Two hosts of 2 GiB and 2 cpus for executions, two slots each.
    let shape = [
        ("HATCHERY_MEMORY", "2G".to_string()),
        ("HATCHERY_CPUS", "2".to_string()),
    ];
    c.agent_named("agent-a", &shape);
    c.agent_named("agent-b", &shape);
    let addr = c.addr_of(api);
    let root = c.tok("hatchery", "root", "superadmin");
    let tokens: Vec<String> = (0..3)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        wait_ready(addr, 2).await;
        // The hosts say what they have.
        let h = host_of(addr, "agent-a").await.unwrap();
        assert_eq!(h["allocatable"]["memory_bytes"], 2u64 << 30, "{h}");
        assert_eq!(h["allocatable"]["cpus"], 2.0, "{h}");
        let r = req(
            addr,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            &root,
            Some(json!({"memory_bytes": 64u64 << 30, "cpus": 8.0})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

        // Two runs of 1.5 GiB: by slots both would fit on one host (best fit packs);
        // by memory they cannot, so each gets a host of its own.
        let big = |code: &str| json!({"language": "r", "code": code, "limits": {"memory_bytes": 1536u64 << 20, "cpus": 1.0}});
        let mut ids = Vec::new();
        for t in &tokens[..2] {
            let r = req(
                addr,
                "POST",
                "/v1/executions",
                t,
                Some(big("Sys.sleep(1.5); 1")),
            )
            .await;
            assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
            ids.push((t.clone(), r.json()["id"].as_str().unwrap().to_string()));
        }
        let mut agents = BTreeSet::new();
        for (t, id) in &ids {
            let v = finished_on(addr, t, id).await;
            assert_eq!(state(&v), "succeeded", "{v}");
            agents.insert(v["agent"].as_str().unwrap_or("?").to_string());
        }
        assert_eq!(
            agents.len(),
            2,
            "two 1.5 GiB runs shared a 2 GiB host: {agents:?}"
        );

        // 3 GiB fits on no host: refused at once, naming the largest.
        let r = req(
            addr,
            "POST",
            "/v1/executions",
            &tokens[2],
            Some(json!({"language": "r", "code": "1", "limits": {"memory_bytes": 3u64 << 30}})),
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (422, "exceeds_largest_host"),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains("3 GiB") && message.contains("2 GiB and 2 cpus"),
            "{message}"
        );
        // So do more CPUs than a host has.
        let r = req(
            addr,
            "POST",
            "/v1/executions",
            &tokens[2],
            Some(json!({"language": "r", "code": "1", "limits": {"memory_bytes": 1u64 << 30, "cpus": 3.0}})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "exceeds_largest_host"));
    });
}

/// Waits until `/readyz` shows `agent` as `pred` says.
async fn host_until(
    addr: SocketAddr,
    agent: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(h) = host_of(addr, agent).await {
            if pred(&h) {
                return h;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{agent} never {what}: {:?}",
            host_of(addr, agent).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn an_admin_cordons_drains_and_resumes_a_host_and_a_drain_outlives_its_agents_restart() {
    let Some(mut c) = cluster(
        "an_admin_cordons_drains_and_resumes_a_host_and_a_drain_outlives_its_agents_restart",
    ) else {
        return;
    };
    let api = c.api_proc("api-1");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    let lease = ("HATCHERY_AGENT_LEASE", "2s".to_string());
    let agent_a = c.agent_named("agent-a", std::slice::from_ref(&lease));
    c.agent_named("agent-b", std::slice::from_ref(&lease));
    let addr = c.addr_of(api);
    let root = c.tok("hatchery", "root", "superadmin");
    let admin = c.tok("acme", "boss", "org_admin");
    let tokens: Vec<String> = (0..4)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    let set = |state: &'static str| {
        let root = root.clone();
        async move {
            req(
                addr,
                "PUT",
                "/v1/admin/hosts/agent-a/state",
                &root,
                Some(json!({ "state": state })),
            )
            .await
        }
    };
    e2e(async {
        wait_ready(addr, 2).await;
        let r = req(addr, "GET", "/v1/admin/hosts", &root, None).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let hosts = r.json()["hosts"].as_array().unwrap().clone();
        let names: Vec<&str> = hosts.iter().map(|h| h["agent"].as_str().unwrap()).collect();
        assert_eq!(names, ["agent-a", "agent-b"]);
        assert!(
            hosts.iter().all(|h| h["state"] == "ready"
                && h["alive"] == true
                && h["status"]["agent"] == h["agent"]),
            "{hosts:?}"
        );
        // Only a superadmin lists or changes hosts; bad bodies and unknown hosts are refused.
        assert_eq!(
            req(addr, "GET", "/v1/admin/hosts", &admin, None)
                .await
                .status,
            403
        );
        let r = req(
            addr,
            "PUT",
            "/v1/admin/hosts/agent-a/state",
            &admin,
            Some(json!({"state": "draining"})),
        )
        .await;
        assert_eq!(r.status, 403);
        let r = req(
            addr,
            "PUT",
            "/v1/admin/hosts/agent-a/state",
            &root,
            Some(json!({"state": "asleep"})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "invalid_request"));
        let r = req(
            addr,
            "PUT",
            "/v1/admin/hosts/nowhere/state",
            &root,
            Some(json!({"state": "draining"})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));

        // Cordoned: no new work, its warm pool stays warm.
        let r = set("cordoned").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["state"], "cordoned");
        let h = host_until(addr, "agent-a", "reported cordoned", |h| {
            h["state"] == "cordoned"
        })
        .await;
        assert_eq!(h["draining"], true, "{h}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let h = host_of(addr, "agent-a").await.unwrap();
        assert!(
            h["warm"][0][1].as_u64().unwrap() > 0,
            "a cordoned host emptied its pool: {h}"
        );
        for t in &tokens[..2] {
            let id = submit_on(addr, t, "1 + 1").await;
            let v = finished_on(addr, t, &id).await;
            assert_eq!(
                (state(&v), v["agent"].as_str()),
                ("succeeded", Some("agent-b")),
                "{v}"
            );
        }

        // Ready again, then a run of a few seconds on agent-a (best fit: the tie goes to
        // the first name), then drained: the run goes on; the pool empties.
        assert_eq!(set("ready").await.status, 200);
        host_until(addr, "agent-a", "came back", |h| {
            h["state"] == "ready" && h["draining"] == false
        })
        .await;
        let long = submit_on(addr, &tokens[2], r#"Sys.sleep(3); cat("kept running\n")"#).await;
        let v = running_on(addr, &tokens[2], &long).await;
        assert_eq!(v["agent"], "agent-a", "{v}");
        assert_eq!(set("draining").await.status, 200);
        let h = host_until(addr, "agent-a", "emptied its pool while draining", |h| {
            h["state"] == "draining" && h["warm"][0][1] == 0
        })
        .await;
        assert_eq!(h["running"], 1, "{h}");
        let v = finished_on(addr, &tokens[2], &long).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(
            stdout_of(&log_of(addr, &tokens[2], &long).await),
            "kept running\n"
        );
        assert!(
            c.procs[agent_a].is_running(),
            "a drained host's agent stays up for its provider to stop"
        );
    });

    // Its agent restarts mid-drain: the drain stays (the store's word, not the agent's).
    c.procs[agent_a].stop(libc::SIGKILL);
    c.restart(agent_a).unwrap_or_else(|e| panic!("{e}"));
    e2e(async {
        let h = host_until(addr, "agent-a", "came back draining", |h| {
            h["state"] == "draining" && h["running"] == 0
        })
        .await;
        assert_eq!(
            h["warm"][0][1], 0,
            "a draining host refilled its pool after a restart: {h}"
        );
        let id = submit_on(addr, &tokens[3], "2 + 2").await;
        assert_eq!(finished_on(addr, &tokens[3], &id).await["agent"], "agent-b");
        // Resumed: it takes work and its pool warms again.
        assert_eq!(set("ready").await.status, 200);
        host_until(addr, "agent-a", "warmed up again", |h| {
            h["state"] == "ready" && h["draining"] == false && h["warm"][0][1].as_u64() > Some(0)
        })
        .await;
    });
}

#[test]
fn host_groups_refuse_what_no_group_holds_and_show_hosts_capacity_and_demand() {
    let groups = "[[groups]]\nname = \"small\"\nmemory = \"2G\"\ncpus = 2\n\
                  [[groups]]\nname = \"big\"\nmemory = \"8G\"\ncpus = 4\n";
    let Some(mut c) = cluster_with(
        "host_groups_refuse_what_no_group_holds_and_show_hosts_capacity_and_demand",
        groups,
    ) else {
        return;
    };
    let api = c.api_proc("api-1");
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    let small = [("HATCHERY_GROUP", "small".to_string())];
    c.agent_named("agent-a", &small);
    c.agent_named("agent-b", &small);
    let addr = c.addr_of(api);
    let root = c.tok("hatchery", "root", "superadmin");
    let t = c.tok("acme", "ann", "user");
    e2e(async {
        wait_ready(addr, 2).await;
        let h = host_of(addr, "agent-a").await.unwrap();
        assert_eq!(h["group"], "small", "{h}");
        assert_eq!(
            h["allocatable"]["memory_bytes"],
            2u64 << 30,
            "a host has its group's shape: {h}"
        );
        let r = req(
            addr,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            &root,
            Some(json!({"memory_bytes": 64u64 << 30, "cpus": 16.0, "max_parallel": 10})),
        )
        .await;
        assert_eq!(r.status, 200);
        let sized = |gib: u64, code: &str| json!({"language": "r", "code": code, "limits": {"memory_bytes": gib << 30, "cpus": 1.0}});
        // 16 GiB fits no group: refused, naming the largest.
        let r = req(addr, "POST", "/v1/executions", &t, Some(sized(16, "1"))).await;
        let m = r.refused(422, "exceeds_largest_group");
        assert!(m.contains("big") && m.contains("8 GiB and 4 cpus"), "{m}");
        // 4 GiB fits the big group, which has no host yet: admitted, it waits (the
        // autoscaler's demand for big).
        let r = req(addr, "POST", "/v1/executions", &t, Some(sized(4, "1"))).await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let waiting = r.json()["id"].as_str().unwrap().to_string();
        // 1 GiB runs on a small host.
        let r = req(addr, "POST", "/v1/executions", &t, Some(sized(1, "6 * 7"))).await;
        let quick = r.json()["id"].as_str().unwrap().to_string();
        let v = finished_on(addr, &t, &quick).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let v = req(addr, "GET", &format!("/v1/executions/{waiting}"), &t, None)
            .await
            .json();
        assert_eq!(state(&v), "queued", "{v}");

        let r = req(addr, "GET", "/v1/admin/groups", &root, None).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let g = r.json()["groups"].clone();
        assert_eq!(g[0]["name"], "small", "{g}");
        assert_eq!(g[0]["hosts"]["ready"], 2, "{g}");
        assert_eq!(g[0]["capacity"]["memory_bytes"], 4u64 << 30, "{g}");
        assert_eq!(g[0]["queued"]["executions"], 0, "{g}");
        assert_eq!(g[1]["name"], "big", "{g}");
        assert_eq!(g[1]["hosts"]["ready"], 0, "{g}");
        assert_eq!(g[1]["queued"]["executions"], 1, "{g}");
        assert_eq!(g[1]["queued"]["need"]["memory_bytes"], 4u64 << 30, "{g}");
        assert_eq!(
            req(addr, "GET", "/v1/admin/groups", &t, None).await.status,
            403
        );
        let r = req(
            addr,
            "POST",
            &format!("/v1/executions/{waiting}/cancel"),
            &t,
            None,
        )
        .await;
        assert!(r.status < 300);
        finished_on(addr, &t, &waiting).await;

        // A policy's groups must exist.
        let put = |org: &'static str, body: Value| {
            let root = root.clone();
            async move {
                req(
                    addr,
                    "PUT",
                    &format!("/v1/admin/orgs/{org}/policy"),
                    &root,
                    Some(body),
                )
                .await
            }
        };
        let r = put("globex", json!({"groups": ["big", "gpu"]})).await;
        let m = r.refused(422, "invalid_limits");
        assert!(m.contains("gpu") && m.contains("small, big"), "{m}");
        let m = put("globex", json!({"groups": []}))
            .await
            .refused(422, "invalid_limits");
        assert!(m.contains("name at least one group"), "{m}");
        // globex may use the big group only: a 1 GiB run does not land on the idle
        // small hosts; it waits for big, and is counted there.
        let r = put(
            "globex",
            json!({"groups": ["big"], "memory_bytes": 1u64 << 30}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let gil = c.tok("globex", "gil", "user");
        let r = req(addr, "POST", "/v1/executions", &gil, Some(sized(1, "1"))).await;
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        let kept_off = r.json()["id"].as_str().unwrap().to_string();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let v = req(
            addr,
            "GET",
            &format!("/v1/executions/{kept_off}"),
            &gil,
            None,
        )
        .await
        .json();
        assert_eq!(state(&v), "queued", "{v}");
        assert_eq!(v["groups"], json!(["big"]), "{v}");
        // Room is kept for active users: gil (default limits 1 GiB and 1 CPU, 2 warm) in
        // big, the only group it may use; ann's default limits (64 GiB) fit no group, so
        // nothing is kept for ann.
        let g = req(addr, "GET", "/v1/admin/groups", &root, None)
            .await
            .json()["groups"]
            .clone();
        assert_eq!(g[1]["queued"]["executions"], 1, "{g}");
        assert_eq!(g[1]["reserved"]["executions"], 2, "{g}");
        assert_eq!(g[1]["reserved"]["need"]["memory_bytes"], 2u64 << 30, "{g}");
        assert_eq!(
            g[1]["reserved"]["active_users"],
            json!(["globex/gil"]),
            "{g}"
        );
        assert_eq!(g[0]["reserved"]["executions"], 0, "{g}");
        assert_eq!(g[0]["provider"], "static", "{g}");
        let r = req(
            addr,
            "POST",
            &format!("/v1/executions/{kept_off}/cancel"),
            &gil,
            None,
        )
        .await;
        assert!(r.status < 300);
        finished_on(addr, &gil, &kept_off).await;
        // initech may use small only: 4 GiB is refused, naming small as its largest.
        assert_eq!(
            put(
                "initech",
                json!({"groups": ["small"], "memory_bytes": 8u64 << 30})
            )
            .await
            .status,
            200
        );
        let ida = c.tok("initech", "ida", "user");
        let r = req(addr, "POST", "/v1/executions", &ida, Some(sized(4, "1"))).await;
        let m = r.refused(422, "exceeds_largest_group");
        assert!(m.contains("small") && m.contains("2 GiB"), "{m}");
        // ... and 1 GiB runs there.
        let r = req(
            addr,
            "POST",
            "/v1/executions",
            &ida,
            Some(sized(1, "2 + 2")),
        )
        .await;
        let id = r.json()["id"].as_str().unwrap().to_string();
        let v = finished_on(addr, &ida, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        // An org admin may narrow the org's groups for a user, never widen them.
        let boss = c.tok("initech", "boss", "org_admin");
        let r = req(
            addr,
            "PUT",
            "/v1/admin/orgs/initech/users/ida/policy",
            &boss,
            Some(json!({"groups": ["big"]})),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (422, "policy_exceeds_org"));
    });
}

#[test]
fn the_leading_scheduler_killed_mid_burst_another_takes_over_and_everything_runs_once() {
    let Some(mut c) = cluster(
        "the_leading_scheduler_killed_mid_burst_another_takes_over_and_everything_runs_once",
    ) else {
        return;
    };
    let api = c.api_proc("api-1");
    let lease = ("HATCHERY_SCHEDULER_LEASE", "1s".to_string());
    let s1 = c.role(
        RoleKind::Scheduler,
        "scheduler-1",
        std::slice::from_ref(&lease),
    );
    // scheduler-1 leads before scheduler-2 exists.
    std::thread::sleep(Duration::from_millis(500));
    let s2 = c.role(RoleKind::Scheduler, "scheduler-2", &[lease]);
    c.agent_named("agent-a", &[]);
    c.agent_named("agent-b", &[]);
    let addr = c.addr_of(api);
    let tokens: Vec<String> = (0..5)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    let leader_log = c.procs[s1].log.clone();
    e2e(async {
        wait_ready(addr, 2).await;
        let mut ids = Vec::new();
        for round in 0..4 {
            for t in &tokens {
                ids.push((
                    t.clone(),
                    submit_on(addr, t, &format!("Sys.sleep(0.3); {round}")).await,
                ));
            }
            if round == 1 {
                // Mid-burst: the leader dies without a word.
                c.procs[s1].stop(libc::SIGKILL);
            }
        }
        let mut started = 0;
        for (t, id) in &ids {
            let v = finished_on(addr, t, id).await;
            // Under a cap of 2 per user, older runs of a user may be cancelled by newer
            // ones; none is lost, none fails.
            assert!(matches!(state(&v), "succeeded" | "cancelled"), "{id}: {v}");
            let mut ws = ws_on(addr, &format!("/v1/executions/{id}/events?token={t}")).await;
            let (events, closed) = read_events(&mut ws, |_| false).await;
            assert!(closed);
            let starts = events.iter().filter(|e| e["type"] == "started").count();
            assert!(starts <= 1, "{id} started {starts} times: {events:?}");
            assert_eq!(
                events.iter().filter(|e| e["type"] == "finished").count(),
                1,
                "{id}: {events:?}"
            );
            if state(&v) == "succeeded" {
                assert_eq!(starts, 1, "{id} succeeded without starting: {events:?}");
                started += 1;
            }
        }
        assert!(started >= 10, "only {started} of {} ran", ids.len());
    });
    let took_over = std::fs::read_to_string(&c.procs[s2].log).unwrap_or_default();
    assert!(
        took_over.contains("leading the scheduling"),
        "scheduler-2 never took the leadership"
    );
    let first = std::fs::read_to_string(leader_log).unwrap_or_default();
    assert!(
        first.contains("leading the scheduling"),
        "scheduler-1 never led"
    );
}

/// Two API replicas, two schedulers and two agents, all started; waits until both
/// replicas see both agents.
async fn full_cluster(c: &mut LocalCluster) -> (SocketAddr, SocketAddr) {
    c.role(RoleKind::Scheduler, "scheduler-1", &[]);
    c.role(RoleKind::Scheduler, "scheduler-2", &[]);
    c.agent_named("agent-a", &[]);
    c.agent_named("agent-b", &[]);
    let (i1, i2) = (c.api_proc("api-1"), c.api_proc("api-2"));
    let (a1, a2) = (c.addr_of(i1), c.addr_of(i2));
    wait_ready(a1, 2).await;
    wait_ready(a2, 2).await;
    (a1, a2)
}

/// The code of a run that prints `n` numbered lines, one every 100 ms.
fn ticker(n: u32) -> String {
    format!(r#"for (i in 1:{n}) {{ cat("line", i, "\n"); Sys.sleep(0.1) }}"#)
}

fn ticks(n: u32) -> String {
    (1..=n).map(|i| format!("line {i} \n")).collect()
}

/// Every event of a finished execution, read from the start on `addr`, checked: gapless
/// seqs, one `started`, one `finished` last.
async fn log_of(addr: SocketAddr, token: &str, id: &str) -> Vec<Value> {
    let mut ws = ws_on(addr, &format!("/v1/executions/{id}/events?token={token}")).await;
    let (events, closed) = read_events(&mut ws, |_| false).await;
    assert!(closed, "{id}: the stream did not end");
    let s = seqs(&events);
    assert_eq!(
        s,
        (1..=s.len() as u64).collect::<Vec<_>>(),
        "{id}: {events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| e["type"] == "started").count(),
        1,
        "{id}: {events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| e["type"] == "finished").count(),
        1,
        "{id}: {events:?}"
    );
    assert_eq!(events.last().unwrap()["type"], "finished", "{id}");
    events
}

/// How soon after Redis comes back work admitted meanwhile has finished: ten times what
/// it takes on an idle machine.
const RECOVERED_WITHIN: Duration = Duration::from_secs(40);

#[test]
fn redis_restarted_mid_run_loses_no_execution_and_live_streams_catch_up() {
    let Some(mut c) =
        cluster("redis_restarted_mid_run_loses_no_execution_and_live_streams_catch_up")
    else {
        return;
    };
    let tokens: Vec<String> = (0..4)
        .map(|i| c.tok("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        let (a1, a2) = full_cluster(&mut c).await;
        // Four runs of 3 s over both agents; a client follows one live on replica 2.
        let mut runs = Vec::new();
        for t in &tokens {
            runs.push((t.clone(), submit_on(a1, t, &ticker(30)).await));
        }
        let (t0, id0) = runs[0].clone();
        let mut live = ws_on(a2, &format!("/v1/executions/{id0}/events?token={t0}")).await;
        let (mut seen, _) = read_events(&mut live, |ev| {
            ev.iter().filter(|e| e["type"] == "stdout").count() >= 3
        })
        .await;

        // Redis dies and comes back empty (no persistence): streams, consumer groups and
        // pending deliveries are gone.
        let restarted = Instant::now();
        c.redis.restart().expect("restart Redis");

        let tickers: BTreeSet<String> = runs.iter().map(|(_, id)| id.clone()).collect();
        // Work admitted right after the restart runs too.
        for t in &tokens {
            runs.push((t.clone(), submit_on(a2, t, "Sys.sleep(0.5); 42").await));
        }
        // The live client, on the same connection, gets everything up to the end.
        let (rest, closed) = read_events(&mut live, |_| false).await;
        assert!(closed, "the live stream did not end");
        seen.extend(rest);
        let s = seqs(&seen);
        assert_eq!(s, (1..=s.len() as u64).collect::<Vec<_>>(), "{seen:?}");
        assert_eq!(stdout_of(&seen), ticks(30), "{seen:?}");
        assert_eq!(seen.last().unwrap()["state"], "succeeded", "{seen:?}");
        eprintln!(
            "the live stream ended {:?} after the restart",
            restarted.elapsed()
        );
        // Every execution ran exactly once and succeeded.
        for (t, id) in &runs {
            let v = finished_on(a1, t, id).await;
            assert_eq!(state(&v), "succeeded", "{id}: {v}");
            let after = restarted.elapsed();
            eprintln!("{id} finished {after:?} after the restart");
            // Reconnecting takes a second or two; far longer means something waits on a
            // stale error or a long backoff (it once took a minute).
            assert!(
                after < RECOVERED_WITHIN,
                "{id} finished only {after:?} after Redis restarted"
            );
            let events = log_of(a2, t, id).await;
            let expected = if tickers.contains(id) {
                ticks(30)
            } else {
                "[1] 42\n".to_string()
            };
            assert_eq!(stdout_of(&events), expected, "{id}");
        }
    });
}

#[test]
fn postgres_restarted_the_api_answers_503_meanwhile_and_everything_recovers() {
    let Some(mut c) =
        cluster("postgres_restarted_the_api_answers_503_meanwhile_and_everything_recovers")
    else {
        return;
    };
    let t = c.tok("acme", "alice", "user");
    e2e(async {
        let (a1, a2) = full_cluster(&mut c).await;
        let before = submit_on(a1, &t, "cat('before'); 1").await;
        let before_v = finished_on(a2, &t, &before).await;
        assert_eq!(state(&before_v), "succeeded");
        // A run that spans the outage.
        let spanning = submit_on(a1, &t, &ticker(60)).await;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = req(a1, "GET", &format!("/v1/executions/{spanning}"), &t, None)
                .await
                .json();
            if state(&v) == "running" {
                break;
            }
            assert!(Instant::now() < deadline, "never ran: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        c.postgres.stop();
        // Both replicas say so, with a code a client can act on.
        for addr in [a1, a2] {
            let body = serde_json::to_vec(&json!({"language": "r", "code": "1"})).unwrap();
            let r = try_http(
                addr,
                "POST",
                "/v1/executions",
                Some(&t),
                Some((body, BodyMode::Length)),
            )
            .await
            .unwrap();
            assert_eq!((r.status, r.code().as_str()), (503, "store_unavailable"));
            let r = req(addr, "GET", &format!("/v1/executions/{before}"), &t, None).await;
            assert_eq!((r.status, r.code().as_str()), (503, "store_unavailable"));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        c.postgres.restart().expect("restart PostgreSQL");

        // The API recovers on its own: new work is admitted and runs.
        let deadline = Instant::now() + PATIENCE;
        let after = loop {
            let body =
                serde_json::to_vec(&json!({"language": "r", "code": "cat('after'); 2"})).unwrap();
            let r = try_http(
                a2,
                "POST",
                "/v1/executions",
                Some(&t),
                Some((body, BodyMode::Length)),
            )
            .await
            .unwrap();
            if r.status == 202 {
                break r.json()["id"].as_str().unwrap().to_string();
            }
            assert_eq!(r.code(), "store_unavailable");
            assert!(Instant::now() < deadline, "the API never recovered");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(state(&finished_on(a1, &t, &after).await), "succeeded");
        // The run that spanned the outage finished once, with all its output: nothing its
        // agent produced while the store was away was dropped, and its host was not
        // declared lost.
        let v = finished_on(a1, &t, &spanning).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let events = log_of(a2, &t, &spanning).await;
        assert_eq!(stdout_of(&events), ticks(60));
        // What finished before the outage is as it was.
        let v = finished_on(a2, &t, &before).await;
        assert!(!v["result"].is_null(), "{v}");
        assert_eq!(v["result"], before_v["result"], "{v}");
    });
}

/// Every process descending from `root` (walking /proc's parent links).
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // The fields after the command name (which may hold spaces and parentheses).
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

#[test]
fn hatchery_cluster_runs_a_whole_cluster_and_leaves_nothing_behind() {
    let test = "hatchery_cluster_runs_a_whole_cluster_and_leaves_nothing_behind";
    if hatchery_scheduler::engines::postgres_bin_dir().is_none()
        || hatchery_scheduler::engines::redis_server_bin().is_none()
        || hatchery_scheduler::engines::moto_server_bin().is_none()
    {
        hatchery_tests::skip(
            test,
            "an engine is not installed",
            "HATCHERY_REQUIRE_ENGINES",
        );
        return;
    }
    e2e(cluster_command());
}

async fn cluster_command() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(HATCHERY);
    for (var, _) in hatchery_api::config::ENV_VARS {
        cmd.env_remove(var);
    }
    let mut child = cmd
        .current_dir(dir.path())
        .args([
            "cluster",
            "--port",
            "0",
            "--agents",
            "1",
            "--schedulers",
            "1",
        ])
        .args(["--pool-size", "1", "--capacity", "2", "--dir"])
        .arg(dir.path().join("cluster"))
        .env("HATCHERY_ROOTFS", rootfs())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(
            std::fs::File::create(dir.path().join("stderr")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let (mut addrs, mut token) = (Vec::new(), None);
    while token.is_none() {
        let Ok(line) = rx.recv_timeout(PATIENCE) else {
            let _ = child.kill();
            panic!(
                "hatchery cluster printed no token: {}",
                std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
            );
        };
        if let Some(a) = line.strip_prefix("hatchery: listening on http://") {
            addrs.push(a.trim().parse::<SocketAddr>().unwrap());
        }
        if let Some(t) = line.strip_prefix("A user's token:") {
            token = Some(t.trim().to_string());
        }
    }
    let token = token.unwrap();
    assert_eq!(addrs.len(), 2, "two API replicas by default");
    {
        for addr in &addrs {
            wait_ready(*addr, 0).await;
        }
        let id = submit_on(addrs[0], &token, "sum(1:10)").await;
        let v = finished_on(addrs[1], &token, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
    }
    let family = descendants(pid);
    // PostgreSQL, Redis, moto and the four roles at least.
    assert!(family.len() >= 7, "{family:?}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "hatchery cluster did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let left: Vec<u32> = family
        .into_iter()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(
        hatchery_sandbox::cgroup::CgroupRoot::detect(&format!("hatchery/cluster-{pid}-agent-a"))
            .map(|r| r.children().is_empty())
            .unwrap_or(true),
        "the agent's sandboxes were left"
    );
}
