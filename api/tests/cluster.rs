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
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hatchery_scheduler::engines::{MotoServer, PostgresServer, RedisServer};
use serde_json::{json, Value};

/// One process of the cluster, stopped on drop.
struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    addr: Option<SocketAddr>,
}

impl Proc {
    fn kill(&mut self, signal: i32) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn dump(&self) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("---- {} (last 40 lines) ----", self.name);
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        self.kill(libc::SIGTERM);
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    config: PathBuf,
    cgroup_parents: Vec<String>,
    // Dropped in this order: the processes, then the engines.
    procs: Vec<Proc>,
    _redis: RedisServer,
    _postgres: PostgresServer,
    _moto: MotoServer,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for p in &mut self.procs {
            if std::thread::panicking() {
                p.dump();
            }
            p.kill(libc::SIGTERM);
        }
        for parent in &self.cgroup_parents {
            remove_cgroup_parent(parent);
        }
    }
}

impl Cluster {
    fn start(test: &str) -> Option<Cluster> {
        let postgres = engine(test, PostgresServer::start())?;
        let redis = engine(test, RedisServer::start())?;
        let moto = engine(test, MotoServer::start())?;
        moto.create_bucket("hatchery").expect("create the bucket");
        let url = postgres.create_database("hatchery").expect("createdb");
        let dir = tempfile::Builder::new()
            .prefix("hatchery-cluster-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("hatchery.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{data}\"\n\
                 rootfs = \"{rootfs}\"\n\
                 token_ttl = \"2h\"\n\
                 [agent]\n\
                 pool_size = 1\n\
                 capacity = 2\n\
                 shutdown_grace = \"0s\"\n\
                 [platform]\n\
                 languages = [\"r\"]\n\
                 [store]\n\
                 postgres_url = \"{url}\"\n\
                 redis_url = \"{redis}\"\n\
                 s3_bucket = \"hatchery\"\n\
                 s3_endpoint = \"{s3}\"\n",
                data = dir.path().join("data").display(),
                rootfs = rootfs().display(),
                redis = redis.url(),
                s3 = moto.endpoint(),
            ),
        )
        .unwrap();
        let cluster = Cluster {
            dir,
            config,
            cgroup_parents: Vec::new(),
            procs: Vec::new(),
            _redis: redis,
            _postgres: postgres,
            _moto: moto,
        };
        // The cluster's one keys file, made once and used by every process.
        cluster.token("acme", "bootstrap", "user");
        Some(cluster)
    }

    fn spawn(&mut self, role: &str, name: &str, env: &[(&str, String)]) -> usize {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut cmd = Command::new(HATCHERY);
        for (var, _) in hatchery_api::config::ENV_VARS {
            cmd.env_remove(var);
        }
        cmd.arg(role)
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("HATCHERY_AGENT_NAME", name)
            // The emulator takes any credentials.
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn a role");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("hatchery: listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let mut proc = Proc {
            name: name.to_string(),
            child: Some(child),
            log,
            addr: None,
        };
        if role == "api" {
            match rx.recv_timeout(PATIENCE) {
                Ok(addr) => proc.addr = Some(addr.parse().unwrap()),
                Err(_) => {
                    proc.dump();
                    panic!("{name} did not print its address");
                }
            }
        }
        self.procs.push(proc);
        self.procs.len() - 1
    }

    fn api(&mut self, name: &str) -> usize {
        self.spawn("api", name, &[("HATCHERY_LISTEN", "127.0.0.1:0".into())])
    }

    fn agent(&mut self, name: &str) -> usize {
        let parent = format!("hatchery/cluster-{}-{name}", std::process::id());
        self.cgroup_parents.push(parent.clone());
        self.spawn("agent", name, &[("HATCHERY_CGROUP_PARENT", parent)])
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.procs[i].addr.expect("an API replica")
    }

    fn token(&self, org: &str, user: &str, role: &str) -> String {
        let out = Command::new(HATCHERY)
            .args([
                "token", "create", "--org", org, "--user", user, "--role", role,
            ])
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("hatchery token create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
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

async fn ready(addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = try_http(addr, "GET", "/readyz", None, None).await {
            if r.status == 200 && r.json()["agents"].as_array().is_some_and(|a| a.len() >= 2) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never became ready on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The events of the log: all but the live-only `usage` samples, which carry no `seq`
/// (checked: every other event has one).
fn logged(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| {
            let live = e["type"] == "usage";
            assert_eq!(
                e.get("seq").is_none(),
                live,
                "only usage events lack a seq: {e}"
            );
            !live
        })
        .cloned()
        .collect()
}

#[test]
fn roles_as_separate_processes_run_work_across_agents_and_replicas() {
    let Some(mut c) =
        Cluster::start("roles_as_separate_processes_run_work_across_agents_and_replicas")
    else {
        return;
    };
    let api1 = c.api("api-1");
    let api2 = c.api("api-2");
    c.spawn("scheduler", "scheduler-1", &[]);
    c.agent("agent-a");
    c.agent("agent-b");
    let (a1, a2) = (c.addr(api1), c.addr(api2));
    let tokens: Vec<String> = (0..2)
        .map(|i| c.token("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        ready(a1).await;
        ready(a2).await;

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
        !c.dir.path().join("data/objects").exists(),
        "objects were written to the local folder"
    );
}

#[test]
fn a_client_resumes_on_another_replica_after_its_replica_is_killed() {
    let Some(mut c) =
        Cluster::start("a_client_resumes_on_another_replica_after_its_replica_is_killed")
    else {
        return;
    };
    let api1 = c.api("api-1");
    let api2 = c.api("api-2");
    c.spawn("scheduler", "scheduler-1", &[]);
    c.agent("agent-a");
    let (a1, a2) = (c.addr(api1), c.addr(api2));
    let t = c.token("acme", "alice", "user");
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let killer = {
        // The replica the client streams from dies with SIGKILL when told.
        let mut proc = c.procs.remove(api2);
        std::thread::spawn(move || {
            let _ = rx.recv();
            proc.kill(libc::SIGKILL);
            proc
        })
    };
    e2e(async {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(r) = try_http(a1, "GET", "/readyz", None, None).await {
                if r.status == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
    let Some(mut c) = Cluster::start(
        "an_agent_killed_loses_its_runs_within_its_lease_and_leaves_no_orphan_when_restarted",
    ) else {
        return;
    };
    let api = c.api("api-1");
    c.spawn("scheduler", "scheduler-1", &[]);
    let lease = ("HATCHERY_AGENT_LEASE", "2s".to_string());
    let parent_a = format!("hatchery/cluster-{}-agent-a", std::process::id());
    let parent_b = format!("hatchery/cluster-{}-agent-b", std::process::id());
    c.cgroup_parents.push(parent_a.clone());
    c.cgroup_parents.push(parent_b.clone());
    let agent_a = c.spawn(
        "agent",
        "agent-a",
        &[lease.clone(), ("HATCHERY_CGROUP_PARENT", parent_a.clone())],
    );
    c.spawn(
        "agent",
        "agent-b",
        &[lease.clone(), ("HATCHERY_CGROUP_PARENT", parent_b.clone())],
    );
    let addr = c.addr(api);
    let tokens: Vec<String> = (0..3)
        .map(|i| c.token("acme", &format!("user{i}"), "user"))
        .collect();
    e2e(async {
        ready(addr).await;
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
        c.procs[agent_a].kill(libc::SIGKILL);
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
    c.spawn(
        "agent",
        "agent-a",
        &[lease, ("HATCHERY_CGROUP_PARENT", parent_a.clone())],
    );
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

#[test]
fn the_leading_scheduler_killed_mid_burst_another_takes_over_and_everything_runs_once() {
    let Some(mut c) = Cluster::start(
        "the_leading_scheduler_killed_mid_burst_another_takes_over_and_everything_runs_once",
    ) else {
        return;
    };
    let api = c.api("api-1");
    let lease = ("HATCHERY_SCHEDULER_LEASE", "1s".to_string());
    let s1 = c.spawn("scheduler", "scheduler-1", std::slice::from_ref(&lease));
    // scheduler-1 leads before scheduler-2 exists.
    std::thread::sleep(Duration::from_millis(500));
    let s2 = c.spawn("scheduler", "scheduler-2", &[lease]);
    c.agent("agent-a");
    c.agent("agent-b");
    let addr = c.addr(api);
    let tokens: Vec<String> = (0..5)
        .map(|i| c.token("acme", &format!("user{i}"), "user"))
        .collect();
    let leader_log = c.procs[s1].log.clone();
    e2e(async {
        ready(addr).await;
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
                c.procs[s1].kill(libc::SIGKILL);
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
