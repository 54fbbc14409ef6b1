//! Host groups that scale, on real hosts: the scheduler's autoscaler makes `netns` hosts
//! (a network namespace on a bridge, a cgroup of the group's shape, a `hatchery agent`
//! of its own reaching PostgreSQL, Redis and S3 over the bridge) as demand comes, and
//! drains and removes them when they are not needed — never one that runs something.
//!
//! Needs root, `ip`, PostgreSQL, Redis, moto, the root filesystem and the sandbox
//! binaries. The tests run one at a time (each brings up a whole cluster and its hosts).

mod harness;
use harness::*;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hatchery_api::sim::{group_toml, Sim, SimSpec};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// One simulated cluster at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A simulated cluster for `test` on bridge `hat<k>` (network 10.215.k.0/24) with
/// `groups`; `None` (skip recorded) when an engine or `ip` is missing.
fn sim(
    test: &str,
    k: u8,
    groups: String,
    launch_delay: Duration,
    active_for: Duration,
) -> Option<Sim> {
    sim_of(test, k, groups, launch_delay, active_for, "netns")
}

/// [`sim`] with hosts made by `provider`.
fn sim_of(
    test: &str,
    k: u8,
    groups: String,
    launch_delay: Duration,
    active_for: Duration,
    provider: &str,
) -> Option<Sim> {
    if !std::path::Path::new("/usr/sbin/ip").exists() && !std::path::Path::new("/sbin/ip").exists()
    {
        hatchery_tests::skip(test, "no `ip` (iproute2)", "HATCHERY_REQUIRE_ENGINES");
        return None;
    }
    let mut spec = SimSpec::new(HATCHERY, rootfs());
    spec.bridge = format!("hat{}x{k}", std::process::id() % 10_000);
    spec.network = Ipv4Addr::new(10, 215, k, 0);
    spec.cgroup_parent = format!("hatchery-test-sim-{}-{k}", std::process::id());
    spec.groups = groups;
    spec.launch_delay = launch_delay;
    spec.active_for = active_for;
    spec.capacity = 2;
    spec.pool_size = 1;
    spec.port = 0;
    spec.provider = provider.into();
    // Hosts heartbeat every second: they take in a drain quickly.
    spec.agent_env
        .push(("HATCHERY_AGENT_LEASE".into(), "3s".into()));
    match Sim::start(spec) {
        Ok(s) => Some(s),
        Err(hatchery_api::sim::SimError::Cluster(e)) if e.is_missing_engine() => {
            hatchery_tests::skip(test, &e.to_string(), "HATCHERY_REQUIRE_ENGINES");
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

async fn req(addr: SocketAddr, method: &str, path: &str, token: &str, body: Option<Value>) -> Resp {
    let body = body.map(|b| (serde_json::to_vec(&b).unwrap(), BodyMode::Length));
    try_http(addr, method, path, Some(token), body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"))
}

/// Submits R `code` with `mib` of memory and `cpus`.
async fn submit(addr: SocketAddr, token: &str, code: &str, mib: u64, cpus: f64) -> String {
    let body = json!({"language": "r", "code": code,
        "limits": {"memory_bytes": mib << 20, "cpus": cpus}});
    let r = req(addr, "POST", "/v1/executions", token, Some(body)).await;
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

async fn get_exec(addr: SocketAddr, token: &str, id: &str) -> Value {
    let r = req(addr, "GET", &format!("/v1/executions/{id}"), token, None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Polls until `pred` holds of the execution.
async fn exec_until(
    addr: SocketAddr,
    token: &str,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = get_exec(addr, token, id).await;
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{id} never became {what}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn finished(addr: SocketAddr, token: &str, id: &str) -> Value {
    exec_until(addr, token, id, "finished", terminal).await
}

/// Every host the store knows, by name: its state.
async fn host_states(addr: SocketAddr, root: &str) -> Vec<(String, String)> {
    let r = req(addr, "GET", "/v1/admin/hosts", root, None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["agent"].as_str().unwrap().to_string(),
                h["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn state_of(addr: SocketAddr, root: &str, host: &str) -> Option<String> {
    host_states(addr, root)
        .await
        .into_iter()
        .find(|(h, _)| h == host)
        .map(|(_, s)| s)
}

async fn set_state(addr: SocketAddr, root: &str, host: &str, state: &str) {
    let r = req(
        addr,
        "PUT",
        &format!("/v1/admin/hosts/{host}/state"),
        root,
        Some(json!({"state": state})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// The autoscaler's reports in the scheduler's log ("launching a host", ...).
fn said(sim: &Sim, what: &str) -> Vec<String> {
    std::fs::read_to_string(sim.scheduler_log())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("autoscaler: ") && l.contains(what))
        .map(str::to_string)
        .collect()
}

fn launches(sim: &Sim, group: &str) -> usize {
    said(sim, "launching a host")
        .iter()
        .filter(|l| l.contains(&format!("group={group}")))
        .count()
}

/// The pid of host `host`'s agent (the process in its agent cgroup running `agent`).
fn agent_pid(sim: &Sim, host: &str) -> i32 {
    let needle = format!("/{}/{host}/agent", sim.spec().cgroup_parent);
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cg = std::fs::read_to_string(p.path().join("cgroup")).unwrap_or_default();
        let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let agent = cmd.split(|b| *b == 0).any(|a| a == b"agent");
        if agent && cg.lines().any(|l| l.ends_with(&needle)) {
            return pid;
        }
    }
    panic!("no agent process for {host}");
}

/// Where the API listens, a superadmin's token and a user's (of `acme`).
fn callers(s: &Sim) -> (SocketAddr, String, String) {
    let root = s.cluster.token("hatchery", "root", "superadmin").unwrap();
    let user = s.cluster.token("acme", "ann", "user").unwrap();
    (s.api_addr(), root, user)
}

/// Lets `acme` ask for up to 64 GiB and 8 CPUs.
async fn generous_policy(addr: SocketAddr, root: &str) {
    let r = req(
        addr,
        "PUT",
        "/v1/admin/orgs/acme/policy",
        root,
        Some(json!({"memory_bytes": 64u64 << 30, "cpus": 8.0, "max_parallel": 20})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn demand_scales_groups_from_zero_and_idle_hosts_drain_and_go_while_a_long_run_finishes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test =
        "demand_scales_groups_from_zero_and_idle_hosts_drain_and_go_while_a_long_run_finishes";
    let groups = group_toml("netns", "small", "1G", 1.0, 0, 3, "3s")
        + &group_toml("netns", "big", "8G", 2.0, 0, 1, "3s");
    let Some(mut s) = sim(test, 1, groups, Duration::from_secs(1), MINUTE) else {
        return;
    };
    let (addr, root, user) = callers(&s);
    e2e(async {
        generous_policy(addr, &root).await;
        assert!(
            host_states(addr, &root).await.is_empty(),
            "no host before demand"
        );

        // Larger than every group: refused at once, nothing launched.
        let body = json!({"language": "r", "code": "1", "limits": {"memory_bytes": 16u64 << 30}});
        let r = req(addr, "POST", "/v1/executions", &user, Some(body)).await;
        assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.code(), "exceeds_largest_group");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("8 GiB"),
            "{}",
            r.json()
        );

        // A burst of four half-hosts: two small hosts take it (each holds two), launched
        // once although the demand stays while they are on their way (launch takes 1 s,
        // the autoscaler looks every second).
        let mut burst = Vec::new();
        for i in 0..4 {
            burst.push(submit(addr, &user, &format!("Sys.sleep(2); {i}"), 512, 0.5).await);
        }
        let mut ran_on = std::collections::BTreeSet::new();
        for id in &burst {
            let v = finished(addr, &user, id).await;
            assert_eq!(state(&v), "succeeded", "{v}");
            ran_on.insert(v["agent"].as_str().unwrap().to_string());
        }
        assert_eq!(launches(&s, "small"), 2, "{:?}", said(&s, ""));
        assert_eq!(ran_on.len(), 2, "{ran_on:?}");
        assert!(ran_on.iter().all(|h| h.starts_with("small-")), "{ran_on:?}");
        assert_eq!(launches(&s, "big"), 0);

        // 6 GiB fits only the big group: it is scaled from zero and runs it.
        let big = submit(addr, &user, "Sys.sleep(1); 6", 6 << 10, 1.0).await;
        let v = finished(addr, &user, &big).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let big_host = v["agent"].as_str().unwrap().to_string();
        assert!(big_host.starts_with("big-"), "{v}");
        assert_eq!(launches(&s, "big"), 1);

        // A long run on one small host; every other host is empty: each is drained and
        // removed after 3 s, while the long one keeps its host and finishes.
        let long = submit(addr, &user, "Sys.sleep(25); 'long'", 512, 0.5).await;
        let v = exec_until(addr, &user, &long, "running", |v| state(v) == "running").await;
        let long_host = v["agent"].as_str().unwrap().to_string();
        let others: Vec<String> = ran_on
            .iter()
            .chain([&big_host])
            .filter(|h| **h != long_host)
            .cloned()
            .collect();
        assert_eq!(others.len(), 2, "{others:?} {long_host}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let states = host_states(addr, &root).await;
            let of = |h: &str| states.iter().find(|(n, _)| n == h).map(|(_, s)| s.clone());
            assert_eq!(of(&long_host).as_deref(), Some("ready"), "{states:?}");
            if others.iter().all(|h| of(h).as_deref() == Some("gone")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "idle hosts never went: {states:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(state(&get_exec(addr, &user, &long).await), "running");
        // Their namespaces and cgroups went with them.
        for h in &others {
            let dirs = std::fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|m| m.path().join(&s.spec().cgroup_parent).join(h))
                .filter(|d| d.exists())
                .collect::<Vec<_>>();
            assert!(dirs.is_empty(), "{dirs:?}");
        }
        let v = finished(addr, &user, &long).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["agent"], long_host.as_str());
        // Then its host goes too.
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &long_host).await.as_deref() != Some("gone") {
            assert!(Instant::now() < deadline, "{long_host} never went");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(said(&s, "draining it").len() >= 3, "{:?}", said(&s, ""));
    });
    s.stop(Duration::from_secs(2));
    assert_eq!(s.leftovers(), Vec::<String>::new());
}

#[test]
fn no_host_goes_while_it_runs_something_returning_demand_cancels_a_drain_and_drains_survive_a_scheduler_restart(
) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "no_host_goes_while_it_runs_something_returning_demand_cancels_a_drain_and_drains_survive_a_scheduler_restart";
    let Some(mut s) = sim(
        test,
        2,
        group_toml("netns", "small", "1G", 1.0, 0, 2, "2s"),
        Duration::from_secs(3),
        MINUTE,
    ) else {
        return;
    };
    let (addr, root, user) = callers(&s);
    e2e(async {
        generous_policy(addr, &root).await;

        // A long run makes the first host.
        let b = submit(addr, &user, "Sys.sleep(20); 'b'", 512, 0.5).await;
        let v = exec_until(addr, &user, &b, "running", |v| state(v) == "running").await;
        let host = v["agent"].as_str().unwrap().to_string();
        assert_eq!(launches(&s, "small"), 1);

        // An admin drains it while it runs; new demand that fits on it cancels the drain
        // instead of launching a host (which would take 3 s and be a second host).
        set_state(addr, &root, &host, "draining").await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            state_of(addr, &root, &host).await.as_deref(),
            Some("draining")
        );
        let c = submit(addr, &user, "'c'", 256, 0.5).await;
        let v = finished(addr, &user, &c).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["agent"], host.as_str(), "{v}");
        assert_eq!(state_of(addr, &root, &host).await.as_deref(), Some("ready"));
        assert_eq!(launches(&s, "small"), 1, "{:?}", said(&s, ""));
        assert_eq!(said(&s, "cancelling the host's drain").len(), 1);

        // Drained again while the long run goes on, and the scheduler is killed and
        // started again mid-drain: the host stays until the run is over, then the new
        // scheduler finishes the drain and removes it.
        set_state(addr, &root, &host, "draining").await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let sched = s.cluster.find("scheduler-1").unwrap();
        s.cluster.procs[sched].stop(libc::SIGKILL);
        s.cluster.restart(sched).unwrap();
        loop {
            let v = get_exec(addr, &user, &b).await;
            let st = state_of(addr, &root, &host).await;
            if terminal(&v) {
                assert_eq!(state(&v), "succeeded", "{v}");
                assert_eq!(v["result"]["value_json"], "\"b\"", "{v}");
                break;
            }
            assert_eq!(
                st.as_deref(),
                Some("draining"),
                "the host left while {b} ran"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &host).await.as_deref() != Some("gone") {
            assert!(
                Instant::now() < deadline,
                "{host} was never removed after its drain"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // SIGTERM to a host's agent while it runs something: the agent drains, the run
        // finishes, and only then does the host go (released by the autoscaler).
        let d = submit(addr, &user, "Sys.sleep(6); 'd'", 512, 0.5).await;
        let v = exec_until(addr, &user, &d, "running", |v| state(v) == "running").await;
        let host2 = v["agent"].as_str().unwrap().to_string();
        assert_ne!(host2, host);
        let pid = agent_pid(&s, &host2);
        // SAFETY: kill has no memory-safety preconditions; the pid is this test's agent.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let v = finished(addr, &user, &d).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "\"d\"", "{v}");
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &host2).await.as_deref() != Some("gone") {
            assert!(Instant::now() < deadline, "{host2} was never released");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    });
    s.stop(Duration::from_secs(2));
    assert_eq!(s.leftovers(), Vec::<String>::new());
}

/// The `reserved` figures of `group` in the groups view.
async fn reserved(addr: SocketAddr, root: &str, group: &str) -> Value {
    let r = req(addr, "GET", "/v1/admin/groups", root, None).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let groups = r.json()["groups"].clone();
    groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == group)
        .unwrap_or_else(|| panic!("no group {group}: {groups}"))["reserved"]
        .clone()
}

#[test]
fn an_active_user_keeps_room_on_a_group_it_may_use_and_an_idle_one_keeps_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "an_active_user_keeps_room_on_a_group_it_may_use_and_an_idle_one_keeps_nothing";
    let active_for = Duration::from_secs(30);
    let groups = group_toml("netns", "small", "1G", 1.0, 0, 2, "1s")
        + &group_toml("netns", "big", "4G", 2.0, 0, 1, "1s");
    let Some(mut s) = sim(test, 4, groups, Duration::from_secs(1), active_for) else {
        return;
    };
    let (addr, root, user) = callers(&s);
    e2e(async {
        // acme's users run at 512 MiB and 1 CPU by default, keep one run warm, and may use
        // the big group only.
        let r = req(
            addr,
            "PUT",
            "/v1/admin/orgs/acme/policy",
            &root,
            Some(json!({"memory_bytes": 512u64 << 20, "cpus": 1.0, "warm_pool_size": 1, "groups": ["big"]})),
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        // Nobody is active: no room kept, no host.
        assert_eq!(reserved(addr, &root, "big").await["executions"], 0);
        assert!(host_states(addr, &root).await.is_empty());

        // A small run goes to big (small would hold it, but acme may not use it).
        let t0 = Instant::now();
        let id = submit(addr, &user, "Sys.sleep(1); 1", 256, 0.5).await;
        let v = finished(addr, &user, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let host = v["agent"].as_str().unwrap().to_string();
        assert!(host.starts_with("big-"), "{v}");
        assert_eq!(launches(&s, "small"), 0, "{:?}", said(&s, ""));
        assert_eq!(launches(&s, "big"), 1, "{:?}", said(&s, ""));
        let r = reserved(addr, &root, "big").await;
        assert_eq!(r["executions"], 1, "{r}");
        assert_eq!(r["active_users"], json!(["acme/ann"]), "{r}");
        // What the autoscaler publishes: in the groups view, /metrics and the monitor.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let g = req(addr, "GET", "/v1/admin/groups", &root, None)
                .await
                .json();
            let big = g["groups"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["name"] == "big")
                .cloned()
                .unwrap();
            if big["autoscaler"]["reserved"] == 1 {
                assert_eq!(big["autoscaler"]["pending"], 0, "{big}");
                assert_eq!(big["autoscaler"]["provisioning"], 0, "{big}");
                break;
            }
            assert!(Instant::now() < deadline, "{big}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let metrics =
            String::from_utf8(req(addr, "GET", "/metrics", &root, None).await.body).unwrap();
        for line in [
            "hatchery_group_reserved{group=\"big\"} 1",
            "hatchery_group_pending{group=\"small\"} 0",
        ] {
            assert!(metrics.contains(line), "{line} not in\n{metrics}");
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/v1/admin/monitor?token={root}&group=big"
        ))
        .await
        .unwrap();
        let (seen, _) = read_events(&mut ws, |m| m.iter().any(|m| m["kind"] == "groups")).await;
        let groups = seen.iter().find(|m| m["kind"] == "groups").unwrap()["groups"].clone();
        assert_eq!(groups.as_array().unwrap().len(), 1, "only big: {groups}");
        assert_eq!(groups[0]["name"], "big", "{groups}");
        assert_eq!(groups[0]["hosts"]["ready"], 1, "{groups}");
        assert_eq!(groups[0]["autoscaler"]["reserved"], 1, "{groups}");
        assert!(seen.iter().any(|m| m["agent"] == host.as_str()), "{seen:?}");
        drop(ws);

        // The host is empty, long past scale_down_after (1 s), but ann is active: the
        // room kept for it keeps the host.
        let check = (Instant::now() + Duration::from_secs(4)).max(t0 + Duration::from_secs(8));
        assert!(
            check + Duration::from_secs(3) < t0 + active_for,
            "the run took too long to leave time for the check ({:?})",
            t0.elapsed()
        );
        tokio::time::sleep_until(check.into()).await;
        assert_eq!(state_of(addr, &root, &host).await.as_deref(), Some("ready"));
        assert!(said(&s, &host).iter().all(|l| !l.contains("draining it")));

        // Once ann is idle, nothing is kept: the host drains and goes.
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &host).await.as_deref() != Some("gone") {
            assert!(
                Instant::now() < deadline,
                "{host} never went: {:?}",
                said(&s, "")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(t0.elapsed() >= active_for, "{:?}", t0.elapsed());
        assert_eq!(reserved(addr, &root, "big").await["executions"], 0);
        assert!(!said(&s, "room kept for active users").is_empty());
    });
    s.stop(Duration::from_secs(2));
    assert_eq!(s.leftovers(), Vec::<String>::new());
}

#[test]
fn hatchery_sim_runs_work_on_hosts_it_makes_and_ctrl_c_leaves_nothing_behind() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "hatchery_sim_runs_work_on_hosts_it_makes_and_ctrl_c_leaves_nothing_behind";
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        hatchery_tests::skip(test, "no `ip` (iproute2)", "HATCHERY_REQUIRE_ENGINES");
        return;
    }
    use hatchery_scheduler::engines::{moto_server_bin, postgres_bin_dir, redis_server_bin};
    if postgres_bin_dir().is_none() || redis_server_bin().is_none() || moto_server_bin().is_none() {
        hatchery_tests::skip(test, "an engine is missing", "HATCHERY_REQUIRE_ENGINES");
        return;
    }
    let bridge = format!("hat{}x3", std::process::id() % 10_000);
    let mut child = std::process::Command::new(HATCHERY)
        .args([
            "sim",
            "--port",
            "0",
            "--launch-delay",
            "0s",
            "--bridge",
            &bridge,
        ])
        .args(["--network", "10.215.3.0", "--scale-down-after", "60s"])
        .env("HATCHERY_ROOTFS", rootfs())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let cgroup_parent = format!("hatchery-sim-{}", child.id());
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
    }
    let err_lines = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let err_lines = std::sync::Arc::clone(&err_lines);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                err_lines.lock().unwrap().push(line);
            }
        });
    }
    let mut out = Vec::new();
    let (mut addr, mut token) = (None, None);
    let deadline = Instant::now() + PATIENCE;
    while addr.is_none() || token.is_none() {
        let line = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => line,
            Err(_) => {
                let gone = child.try_wait().unwrap();
                if gone.is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "sim never printed its address and token ({gone:?}): {out:?} {:?}",
                        err_lines.lock().unwrap()
                    );
                }
                continue;
            }
        };
        if let Some(a) = line.strip_prefix("hatchery: listening on http://") {
            addr = Some(a.trim().parse::<SocketAddr>().unwrap());
        }
        if let Some(t) = line.strip_prefix("A user's token:") {
            token = Some(t.trim().to_string());
        }
        out.push(line);
    }
    let (addr, token) = (addr.unwrap(), token.unwrap());
    e2e(async {
        let id = submit(addr, &token, "sum(1:10)", 256, 0.5).await;
        let v = finished(addr, &token, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "55", "{v}");
        assert!(v["agent"].as_str().unwrap().starts_with("small-"), "{v}");
    });
    // What it reported as it went: the host launched and joined.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !out.iter().any(|l| l.contains("the host joined")) && Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            out.push(l);
        }
    }
    assert!(
        out.iter().any(|l| l.contains("launching a host")),
        "{out:?}"
    );
    assert!(out.iter().any(|l| l.contains("the host joined")), "{out:?}");
    // Ctrl-C: everything stops and nothing is left.
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sim did not stop: {:?}", err_lines.lock().unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(200));
    let err = err_lines.lock().unwrap().join("\n");
    assert!(status.success(), "{status:?}\n{err}");
    assert!(err.contains("nothing is left behind"), "{err}");
    assert_eq!(
        hatchery_api::sim::leftovers(&bridge, &cgroup_parent),
        Vec::<String>::new()
    );
}

/// A VM host (the `qemu` provider, the local Linux VM simulation): demand scales the
/// group from zero to one VM (Debian's kernel, pure cgroup v2) whose agent reaches
/// PostgreSQL, Redis and S3 on the bridge through qemu's user-mode network, registers and
/// runs an R execution in a sandbox on the guest's cgroup v2 hierarchy; once idle, the
/// host drains, its VM powers off, and nothing is left behind. Slow under software
/// emulation (a minute or two): one small VM, one short execution.
#[test]
fn a_vm_host_joins_the_cluster_and_runs_r_on_cgroup_v2() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "a_vm_host_joins_the_cluster_and_runs_r_on_cgroup_v2";
    if !std::path::Path::new("/usr/bin/qemu-system-x86_64").exists() {
        hatchery_tests::skip(test, "no qemu-system-x86", "HATCHERY_REQUIRE_ENGINES");
        return;
    }
    let groups = group_toml("qemu", "small", "1G", 1.0, 0, 1, "2s");
    let Some(mut s) = sim_of(
        test,
        5,
        groups,
        Duration::ZERO,
        Duration::from_secs(1),
        "qemu",
    ) else {
        return;
    };
    let (addr, root, user) = callers(&s);
    let vms = s.cluster.dir().join("qemu");
    e2e(async {
        // Where the sandbox runs: its cgroups (one unified line on v2; one per
        // controller on v1) and the kernel's command line (the VM's).
        let code = r#"cat(readLines("/proc/self/cgroup"), sep = "\n")
cat("\nv1 off:", grepl("cgroup_no_v1=all", readLines("/proc/cmdline")), "\n")"#;
        let id = submit(addr, &user, code, 256, 1.0).await;
        let v = finished(addr, &user, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        let host = v["agent"].as_str().unwrap().to_string();
        assert!(host.starts_with("small-vm"), "{v}");
        assert_eq!(launches(&s, "small"), 1, "{:?}", said(&s, ""));

        let (mut ws, _) = tokio_tungstenite::connect_async(format!(
            "ws://{addr}/v1/executions/{id}/events?token={user}"
        ))
        .await
        .unwrap();
        let (events, closed) = read_events(&mut ws, |_| false).await;
        assert!(closed);
        let out = stdout_of(&events);
        let cgroups: Vec<&str> = out.lines().take_while(|l| !l.is_empty()).collect();
        assert_eq!(cgroups.len(), 1, "one unified hierarchy:\n{out}");
        assert!(cgroups[0].starts_with("0::/"), "cgroup v2:\n{out}");
        assert!(out.contains("v1 off: TRUE"), "{out}");
        let log = std::fs::read_to_string(s.hosts_dir().join("logs").join(format!("{host}.log")))
            .unwrap();
        assert!(log.contains("hatchery-host: the agent starts"), "{log}");

        // Idle (the user is no longer active after 1 s, the host empty for 2 s): the host
        // drains and goes, and its VM with it.
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &host).await.as_deref() != Some("gone") {
            assert!(Instant::now() < deadline, "{host} never went");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !hatchery_api::sim::processes_naming(&vms).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the VM of a gone host still runs: {:?}",
                hatchery_api::sim::processes_naming(&vms)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(s.hosts_dir().join("logs").join(format!("{host}.log")))
            .unwrap();
        assert!(
            log.contains("hatchery-host: SIGTERM 1 to the agent"),
            "drained by a SIGTERM:\n{log}"
        );
        assert!(!log.contains("SIGTERM 2"), "one signal, no forcing:\n{log}");
    });
    s.stop(Duration::from_secs(2));
    assert_eq!(s.leftovers(), Vec::<String>::new());
}

/// The production provider end to end: the group is an EC2 Auto Scaling group (moto's),
/// the scheduler scales it with `SetDesiredCapacity`, the simulation's launcher turns the
/// instance moto makes into a `netns` host named after its instance id, whose agent
/// registers under that name and runs the execution — through a restart of the scheduler,
/// which launches nothing more; once idle, the host drains and the scheduler terminates
/// the instance with `TerminateInstanceInAutoScalingGroup`, the launcher stops the host,
/// and the group's desired capacity is back to zero.
#[test]
fn an_ec2_auto_scaling_group_emulated_by_moto_scales_up_runs_work_and_scales_down() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let test = "an_ec2_auto_scaling_group_emulated_by_moto_scales_up_runs_work_and_scales_down";
    let groups = group_toml("ec2-asg", "small", "1G", 1.0, 0, 1, "2s");
    let Some(mut s) = sim_of(
        test,
        6,
        groups,
        Duration::ZERO,
        Duration::from_secs(1),
        "ec2-asg",
    ) else {
        return;
    };
    let (addr, root, user) = callers(&s);
    let endpoint = s.cluster.moto.endpoint();
    e2e(async {
        use hatchery_scheduler::provider::ec2_asg::{emulator_sdk_config, sdk};
        let asg =
            sdk::Client::new(&emulator_sdk_config(hatchery_api::sim::SIM_REGION, &endpoint).await);
        let describe = || async {
            let out = asg
                .describe_auto_scaling_groups()
                .auto_scaling_group_names("hatchery-small")
                .send()
                .await
                .unwrap();
            let g = out.auto_scaling_groups()[0].clone();
            let instances: Vec<(String, bool)> = g
                .instances()
                .iter()
                .map(|i| {
                    (
                        i.instance_id().unwrap().to_string(),
                        i.protected_from_scale_in().unwrap_or(false),
                    )
                })
                .collect();
            (g.desired_capacity().unwrap(), instances)
        };
        assert_eq!(describe().await, (0, Vec::new()));

        let id = submit(addr, &user, "Sys.sleep(4); 6 * 7", 256, 0.5).await;
        exec_until(addr, &user, &id, "running", |v| state(v) == "running").await;
        // The scheduler killed and started again while it runs: the group's state is in
        // AWS, so the new scheduler sees the same host and launches nothing more.
        let sched = s.cluster.find("scheduler-1").unwrap();
        s.cluster.procs[sched].stop(libc::SIGKILL);
        s.cluster.restart(sched).unwrap();
        let v = finished(addr, &user, &id).await;
        assert_eq!(state(&v), "succeeded", "{v}");
        assert_eq!(v["result"]["value_json"], "42", "{v}");
        let host = v["agent"].as_str().unwrap().to_string();
        let (desired, instances) = describe().await;
        assert_eq!(desired, 1);
        assert_eq!(instances, vec![(host.clone(), true)], "the instance ran it");
        assert_eq!(launches(&s, "small"), 1, "{:?}", said(&s, ""));

        // Idle: drained, then its instance terminated with its capacity, then its host.
        let deadline = Instant::now() + PATIENCE;
        while state_of(addr, &root, &host).await.as_deref() != Some("gone") {
            assert!(Instant::now() < deadline, "{host} never went");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(describe().await, (0, Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::read_dir(s.hosts_dir().join("hosts"))
            .map(|d| d.count())
            .unwrap_or(0)
            > 0
        {
            assert!(
                Instant::now() < deadline,
                "the host of a terminated instance stays"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(said(&s, "draining it").len() == 1, "{:?}", said(&s, ""));
    });
    s.stop(Duration::from_secs(2));
    assert_eq!(s.leftovers(), Vec::<String>::new());
}
