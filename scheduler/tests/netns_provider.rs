//! The `netns` provider for real: network namespaces on a bridge, cgroups, agent
//! processes. Instead of `hatchery agent`, hosts run a small bash stand-in that writes
//! down where it runs (its cgroups, its environment, its address), reaches a listener the
//! test opens on the bridge, and drains on SIGTERM — or, in the groups named so, exits by
//! itself (`crashy`) or ignores SIGTERM (`stubborn`). One test starts PostgreSQL, Redis and
//! moto on the bridge (`engines::*::start_on`) and reaches each from inside a host.
//!
//! Every test has its own bridge (`hnt<pid % 1000><k>`), /24 (`10.214.<k>.0`), cgroup
//! parent (`hatchery-test-netns-<pid>-<k>`) and state directory, and a guard that stops
//! its hosts and removes all of them, by name, even when the test fails.
//!
//! Needs root and iproute2 (and the engines for the engines' test); skips, saying why,
//! without them.
//! Run: `cargo test -p hatchery-scheduler --test netns_provider`.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hatchery_sandbox::cgroup::{CgroupRoot, CgroupVersion, V1_CONTROLLERS};
use hatchery_scheduler::autoscale::GroupConfig;
use hatchery_scheduler::engines::{
    postgres_bin_dir, EngineError, MotoServer, PostgresServer, RedisServer,
};
use hatchery_scheduler::model::Resources;
use hatchery_scheduler::provider::netns::{
    ensure_bridge, remove_bridge, NetnsConfig, NetnsProvider,
};
use hatchery_scheduler::provider::{HostPhase, Provider, ProviderError};
use tokio::runtime::Runtime;

const MIB: u64 = 1 << 20;
/// The shape of every test group, and the overhead its hosts' cgroups get on top.
const MEMORY: u64 = 256 * MIB;
const OVERHEAD: u64 = 64 * MIB;
const CPUS: f64 = 0.5;
/// How long anything may take (a loaded machine).
const WAIT: Duration = Duration::from_secs(30);

/// The stand-in agent. `$FAKE_AGENT_OUT/<name>/` gets: `pid`, `cgroup` (its
/// /proc/self/cgroup), `env` (name, group, cgroup parent, pool size), `addr` (`ip -4 -o
/// addr show eth0`), `ready` once it has reached `$FAKE_AGENT_CONNECT` (if set), `terms`
/// (a line per SIGTERM) and `drained` when a SIGTERM ends it; each file appears whole
/// (written aside, then renamed). It leaves a `sleep` behind in its cgroup, as a pool's
/// watchdog would.
const FAKE_AGENT: &str = r#"
out="$FAKE_AGENT_OUT/$HATCHERY_AGENT_NAME"
mkdir -p "$out"
put() { cat > "$out/.$1" && mv "$out/.$1" "$out/$1"; }
terms=""
on_term() {
    terms="${terms}term"$'\n'
    printf '%s' "$terms" | put terms
    if [ "$HATCHERY_GROUP" != stubborn ]; then
        echo drained | put drained
        exit 0
    fi
}
trap on_term TERM
echo "stand-in agent $HATCHERY_AGENT_NAME up"
echo $$ | put pid
cat /proc/self/cgroup | put cgroup
printf '%s\n' "$HATCHERY_AGENT_NAME" "$HATCHERY_GROUP" "$HATCHERY_CGROUP_PARENT" \
    "${HATCHERY_POOL_SIZE-unset}" | put env
"$FAKE_AGENT_IP" -4 -o addr show dev eth0 2>&1 | put addr
if [ -n "$FAKE_AGENT_CONNECT" ]; then
    exec 3<>"/dev/tcp/${FAKE_AGENT_CONNECT%:*}/${FAKE_AGENT_CONNECT##*:}" || exit 4
    echo "hello from $HATCHERY_AGENT_NAME" >&3
    exec 3>&-
fi
sleep 1000 &
if [ "$HATCHERY_GROUP" = crashy ]; then
    exit 3
fi
echo ready | put ready
while :; do
    sleep 1000 &
    wait $!
done
"#;

fn ip_program() -> Option<&'static str> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Some(format!(
            "not root (euid {euid}): hosts need namespaces and cgroups"
        ));
    }
    if ip_program().is_none() {
        return Some("iproute2's `ip` is not installed".into());
    }
    if !Path::new("/bin/bash").exists() {
        return Some("the stand-in agent needs /bin/bash".into());
    }
    None
}

fn group(name: &str, pool_size: Option<u32>) -> GroupConfig {
    GroupConfig {
        name: name.into(),
        shape: Resources::new(MEMORY, CPUS),
        languages: vec!["bash".into()],
        min: 0,
        max: 4,
        scale_down_after: Duration::from_secs(600),
        cooldown_up: Duration::ZERO,
        cooldown_down: Duration::ZERO,
        pool_size,
        provider: "netns".into(),
    }
}

/// One test's provider, its runtime, and everything it named; dropping it stops the
/// hosts and removes whatever is left of them.
struct Fixture {
    rt: Option<Runtime>,
    provider: Option<NetnsProvider>,
    cfg: NetnsConfig,
    /// Where the stand-in agents write, a directory per host.
    out: PathBuf,
    /// What reached the listener on the bridge: who, and the line it sent.
    heard: Option<mpsc::Receiver<(SocketAddr, String)>>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// The `k`th test's fixture (`None`, said why, when the tests cannot run here).
    fn new(k: u8, launch_delay: Duration, listen: bool) -> Option<Fixture> {
        if let Some(reason) = skip_reason() {
            eprintln!("skipping: {reason}");
            return None;
        }
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("hatchery-netns-test-")
            .tempdir()
            .unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let script = dir.path().join("fake-agent.sh");
        std::fs::write(&script, FAKE_AGENT).unwrap();
        let network = Ipv4Addr::new(10, 214, k, 0);
        let mut cfg = NetnsConfig {
            state_dir: dir.path().join("state"),
            bridge: format!("hnt{:03}{k}", pid % 1000),
            network,
            cgroup_parent: format!("hatchery-test-netns-{pid}-{k}"),
            agent_command: vec!["/bin/bash".into(), script.into()],
            agent_env: vec![
                ("FAKE_AGENT_OUT".into(), out.display().to_string()),
                ("FAKE_AGENT_IP".into(), ip_program().unwrap().into()),
            ],
            launch_delay,
            overhead_memory: OVERHEAD,
        };
        let mut fixture = Fixture {
            rt: None,
            provider: None,
            cfg: cfg.clone(),
            out,
            heard: None,
            _dir: dir,
        };
        // The guard exists from here on: what follows may fail.
        let bridge_ip = Ipv4Addr::new(10, 214, k, 1);
        ensure_bridge(&cfg.bridge, bridge_ip).unwrap();
        if listen {
            let (addr, heard) = listen_on(bridge_ip);
            cfg.agent_env
                .push(("FAKE_AGENT_CONNECT".into(), addr.to_string()));
            fixture.heard = Some(heard);
        }
        fixture.cfg = cfg;
        fixture.start_provider();
        Some(fixture)
    }

    /// A new runtime and a new provider over the state directory.
    fn start_provider(&mut self) {
        let rt = Runtime::new().unwrap();
        let provider = rt.block_on(NetnsProvider::new(self.cfg.clone())).unwrap();
        assert_eq!(provider.bridge_ip(), self.bridge_ip());
        self.rt = Some(rt);
        self.provider = Some(provider);
    }

    /// What a scheduler's restart does to the provider: its tasks and memory go (the
    /// agents it started stay), and a new one starts over the same state directory.
    fn restart(&mut self) {
        self.provider = None;
        self.rt = None;
        self.start_provider();
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.rt.as_ref().unwrap().block_on(future)
    }

    fn p(&self) -> &NetnsProvider {
        self.provider.as_ref().unwrap()
    }

    fn bridge_ip(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.cfg.network.octets();
        Ipv4Addr::new(a, b, c, 1)
    }

    fn netns(&self, host: &str) -> String {
        format!("{}-{host}", self.cfg.bridge)
    }

    fn veth(&self, octet: u8) -> String {
        format!("{}-{octet}", self.cfg.bridge)
    }

    /// A file a stand-in agent wrote, once it has.
    fn agent_file(&self, host: &str, file: &str) -> String {
        let path = self.out.join(host).join(file);
        wait_until(&format!("{}", path.display()), || {
            std::fs::read_to_string(&path).ok()
        })
    }

    fn agent_pid(&self, host: &str) -> i32 {
        self.agent_file(host, "pid").trim().parse().unwrap()
    }

    fn record(&self, host: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("hosts")
            .join(format!("{host}.json"))
    }

    fn log(&self, host: &str) -> PathBuf {
        self.cfg.state_dir.join("logs").join(format!("{host}.log"))
    }

    /// The host's cgroup directories, one per hierarchy it exists in.
    fn host_cgroup_dirs(&self, host: &str) -> Vec<PathBuf> {
        let rel = format!("{}/{host}", self.cfg.cgroup_parent);
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(&rel))
            .filter(|d| d.exists())
            .collect()
    }

    /// Asserts that the host's agent saw `address`/24 on its `eth0`.
    fn assert_address(&self, host: &str, address: &str) {
        let addr = self.agent_file(host, "addr");
        assert!(
            addr.contains(&format!("inet {address}/24")),
            "{host}'s eth0: {addr}"
        );
    }

    /// Asserts that nothing of `host` is left but its log.
    fn assert_released(&self, host: &str, octet: u8, pid: i32) {
        assert!(
            !netns_names().contains(&self.netns(host)),
            "{host}: its network namespace is still in `ip netns list`"
        );
        assert!(
            !link_exists(&self.veth(octet)),
            "{host}: its veth {} is still there",
            self.veth(octet)
        );
        assert_eq!(
            self.host_cgroup_dirs(host),
            Vec::<PathBuf>::new(),
            "{host}: its cgroup is still there"
        );
        assert!(
            !self.record(host).exists(),
            "{host}: its record is still there"
        );
        assert!(!is_alive(pid), "{host}: its agent {pid} still runs");
        assert!(self.log(host).exists(), "{host}: its log went with it");
    }

    /// Waits until `host` is listed in `phase` (`None`: no longer listed).
    fn wait_for_phase(&self, host: &str, phase: Option<HostPhase>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.phase(host);
            if now == phase {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{host} is listed {now:?} after {WAIT:?}, not {phase:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn phase(&self, host: &str) -> Option<HostPhase> {
        self.block_on(self.p().list())
            .unwrap()
            .into_iter()
            .find(|h| h.name == host)
            .map(|h| h.phase)
    }

    fn launch(&self, group: &GroupConfig) -> String {
        self.block_on(self.p().launch(group)).unwrap()
    }

    fn terminate(&self, host: &str) {
        self.block_on(self.p().terminate(host)).unwrap()
    }

    /// The next connection the listener on the bridge heard.
    fn heard(&self) -> (SocketAddr, String) {
        self.heard
            .as_ref()
            .expect("the fixture listens")
            .recv_timeout(WAIT)
            .expect("no host reached the listener on the bridge")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = std::fs::read_dir(self.cfg.state_dir.join("logs")) {
                for log in logs.flatten() {
                    let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                    eprintln!("---- {} ----\n{text}", log.path().display());
                }
            }
        }
        if self.provider.is_none() {
            self.rt = Runtime::new().ok();
            if let Some(rt) = &self.rt {
                self.provider = rt.block_on(NetnsProvider::new(self.cfg.clone())).ok();
            }
        }
        if let (Some(rt), Some(provider)) = (&self.rt, &self.provider) {
            rt.block_on(provider.stop_all(Duration::from_millis(500)));
        }
        remove_leftovers(&self.cfg);
        remove_bridge(&self.cfg.bridge);
    }
}

/// Listens on `ip`; every line a connection sends first comes out of the receiver.
fn listen_on(ip: Ipv4Addr) -> (SocketAddr, mpsc::Receiver<(SocketAddr, String)>) {
    let listener = TcpListener::bind((ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let peer = stream.peer_addr().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(stream).read_line(&mut line);
            if tx.send((peer, line.trim().to_string())).is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {WAIT:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every cgroup hierarchy's mount point.
fn cgroup_mounts() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && (f[2] == "cgroup" || f[2] == "cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .collect()
}

fn netns_names() -> Vec<String> {
    let out = std::process::Command::new(ip_program().unwrap())
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The process runs (a zombie does not).
fn is_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s[s.rfind(')')? + 2..].chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Field 5 of /proc/<pid>/stat.
fn process_group(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[2].parse().unwrap()
}

/// The machine's cgroup setup, as the provider sees it.
fn cgroup_version() -> CgroupVersion {
    CgroupRoot::detect("hatchery").unwrap().version()
}

fn inode(path: impl AsRef<Path>) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

/// The cgroup v1 controllers (or `""`, the unified hierarchy on v2) whose line in a
/// `/proc/<pid>/cgroup` text is not `path`.
fn cgroup_lines_elsewhere(text: &str, path: &str) -> Vec<String> {
    let wanted: Vec<&str> = match cgroup_version() {
        CgroupVersion::V1 => V1_CONTROLLERS.to_vec(),
        CgroupVersion::V2 => vec![""],
    };
    wanted
        .into_iter()
        .filter(|c| {
            !text.lines().any(|l| {
                let mut f = l.splitn(3, ':');
                let (_, controllers, p) = (f.next(), f.next().unwrap_or(""), f.next());
                let names: Vec<&str> = controllers.split(',').collect();
                (names.contains(c) || controllers == *c) && p == Some(path)
            })
        })
        .map(str::to_string)
        .collect()
}

/// A cgroup file of the host's cgroup (in the controller's hierarchy on v1).
fn host_cgroup_file(cfg: &NetnsConfig, host: &str, controller: &str, file: &str) -> String {
    let cg = CgroupRoot::detect(&cfg.cgroup_parent)
        .unwrap()
        .open(host)
        .unwrap();
    std::fs::read_to_string(cg.dir(controller).join(file))
        .unwrap()
        .trim()
        .to_string()
}

/// Removes, by name, whatever of a test's hosts is left: namespaces and veths named
/// after its bridge, and its cgroup tree (killing what runs there: the test's own
/// stand-in agents).
fn remove_leftovers(cfg: &NetnsConfig) {
    let Some(ip) = ip_program() else { return };
    let prefix = format!("{}-", cfg.bridge);
    for ns in netns_names().into_iter().filter(|n| n.starts_with(&prefix)) {
        let _ = std::process::Command::new(ip)
            .args(["netns", "del", &ns])
            .status();
    }
    if let Ok(links) = std::fs::read_dir("/sys/class/net") {
        for link in links.flatten() {
            let name = link.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) {
                let _ = std::process::Command::new(ip)
                    .args(["link", "del", &name])
                    .status();
            }
        }
    }
    for mount in cgroup_mounts() {
        remove_cgroup_tree(&mount.join(&cfg.cgroup_parent));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) on a process in this test's own cgroup tree: one of its
            // stand-in agents or their children.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_host_runs_its_agent_in_its_namespace_and_cgroup_and_is_released_when_terminated() {
    let Some(f) = Fixture::new(1, Duration::from_millis(1500), true) else {
        return;
    };
    let small = group("small", Some(2));
    let host = f.launch(&small);
    assert_eq!(host, "small-1");

    // On its way during the launch delay: listed at once, nothing made yet.
    assert_eq!(f.phase(&host), Some(HostPhase::Starting));
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(f.phase(&host), Some(HostPhase::Starting));
    assert!(
        !f.out.join(&host).exists(),
        "the agent started during the delay"
    );
    assert!(!netns_names().contains(&f.netns(&host)));
    f.wait_for_phase(&host, Some(HostPhase::Running));
    let pid = f.agent_pid(&host);
    f.agent_file(&host, "ready");

    // Its agent is in the host's agent cgroup, in every hierarchy.
    let agent_cgroup = format!("/{}/{host}/agent", f.cfg.cgroup_parent);
    let cgroups = f.agent_file(&host, "cgroup");
    assert_eq!(
        cgroup_lines_elsewhere(&cgroups, &agent_cgroup),
        Vec::<String>::new(),
        "the agent is not in {agent_cgroup} everywhere:\n{cgroups}"
    );
    // The host's cgroup has the shape plus the overhead.
    let (memory, quota) = match cgroup_version() {
        CgroupVersion::V1 => ("memory.limit_in_bytes", "cpu.cfs_quota_us"),
        CgroupVersion::V2 => ("memory.max", "cpu.max"),
    };
    let memory = host_cgroup_file(&f.cfg, &host, "memory", memory);
    assert_eq!(memory, (MEMORY + OVERHEAD).to_string());
    let quota = host_cgroup_file(&f.cfg, &host, "cpu", quota);
    assert_eq!(
        quota.split_whitespace().next(),
        Some("50000"),
        "CPU quota {quota:?} is not half a CPU"
    );
    // Its environment names it, its group, its pool size and its sandboxes' cgroup.
    let env = f.agent_file(&host, "env");
    let env: Vec<&str> = env.lines().collect();
    let sandboxes = format!("{}/{host}/sandboxes", f.cfg.cgroup_parent);
    assert_eq!(env, [host.as_str(), "small", sandboxes.as_str(), "2"]);

    // It lives in the host's network namespace, with the first address on the bridge,
    // and reached the listener on the bridge from that address.
    assert_eq!(
        inode(format!("/proc/{pid}/ns/net")),
        inode(format!("/run/netns/{}", f.netns(&host)))
    );
    assert_ne!(
        inode(format!("/proc/{pid}/ns/net")),
        inode("/proc/self/ns/net")
    );
    f.assert_address(&host, "10.214.1.2");
    assert!(link_exists(&f.veth(2)));
    let (peer, line) = f.heard();
    assert_eq!(peer.ip(), Ipv4Addr::new(10, 214, 1, 2));
    assert_eq!(line, format!("hello from {host}"));
    assert!(f.record(&host).exists());
    // In a process group of its own (a terminal's Ctrl-C is not for it), its output in
    // its log.
    assert_eq!(process_group(pid), pid);
    let log = std::fs::read_to_string(f.log(&host)).unwrap();
    assert!(log.contains("stand-in agent small-1 up"), "log: {log}");

    // Terminating it: SIGTERM (it drains), then nothing left but its log.
    let unknown = f.block_on(f.p().terminate("small-99"));
    assert!(
        matches!(unknown, Err(ProviderError::UnknownHost(_))),
        "{unknown:?}"
    );
    f.terminate(&host);
    let phase = f.phase(&host);
    assert!(
        phase == Some(HostPhase::Stopping) || phase.is_none(),
        "{phase:?} right after terminate"
    );
    f.wait_for_phase(&host, None);
    assert_eq!(f.agent_file(&host, "drained").trim(), "drained");
    assert_eq!(f.agent_file(&host, "terms").lines().count(), 1);
    f.assert_released(&host, 2, pid);
}

#[test]
fn an_agent_that_exits_by_itself_is_listed_exited_and_terminate_releases_its_host() {
    let Some(f) = Fixture::new(2, Duration::ZERO, false) else {
        return;
    };
    let host = f.launch(&group("crashy", None));
    let pid = f.agent_pid(&host);
    f.wait_for_phase(&host, Some(HostPhase::Exited));
    assert_eq!(f.agent_file(&host, "env").lines().nth(3), Some("unset"));
    // Exited holds on to what it has until it is terminated.
    assert!(netns_names().contains(&f.netns(&host)));
    assert!(!f.host_cgroup_dirs(&host).is_empty());

    f.terminate(&host);
    f.wait_for_phase(&host, None);
    assert!(
        !f.out.join(&host).join("terms").exists(),
        "it got a SIGTERM"
    );
    // Its cgroups went although it left a process behind in them.
    f.assert_released(&host, 2, pid);
}

#[test]
fn a_restarted_provider_finds_the_running_host_and_terminates_it() {
    let Some(mut f) = Fixture::new(3, Duration::ZERO, false) else {
        return;
    };
    let small = group("small", None);
    let host = f.launch(&small);
    f.wait_for_phase(&host, Some(HostPhase::Running));
    f.agent_file(&host, "ready");
    let pid = f.agent_pid(&host);

    f.restart();
    assert!(
        is_alive(pid),
        "the agent did not survive the scheduler's restart"
    );
    assert_eq!(f.phase(&host), Some(HostPhase::Running));
    // Names are never reused, addresses are taken by recorded hosts.
    let second = f.launch(&small);
    assert_eq!(second, "small-2");
    f.wait_for_phase(&second, Some(HostPhase::Running));
    f.assert_address(&second, "10.214.3.3");

    f.terminate(&host);
    f.wait_for_phase(&host, None);
    assert_eq!(f.agent_file(&host, "drained").trim(), "drained");
    f.assert_released(&host, 2, pid);
    assert_eq!(f.phase(&second), Some(HostPhase::Running));

    // Another restart: the name of the host that went is not given again, its address is.
    f.restart();
    assert_eq!(f.phase(&second), Some(HostPhase::Running));
    let third = f.launch(&small);
    assert_eq!(third, "small-3");
    f.wait_for_phase(&third, Some(HostPhase::Running));
    f.assert_address(&third, "10.214.3.2");
}

#[test]
fn a_launch_interrupted_by_a_restart_is_released() {
    let Some(mut f) = Fixture::new(4, Duration::from_secs(600), false) else {
        return;
    };
    let host = f.launch(&group("small", None));
    assert_eq!(f.phase(&host), Some(HostPhase::Starting));
    // A second provider on the same state directory (a standby scheduler on this
    // machine) is refused: it would release the host being launched.
    let second = f.block_on(NetnsProvider::new(f.cfg.clone()));
    let e = second
        .err()
        .expect("a second provider on one state directory");
    assert!(
        e.to_string().contains(&format!(
            "in use by another provider (pid {})",
            std::process::id()
        )),
        "{e}"
    );
    assert_eq!(f.phase(&host), Some(HostPhase::Starting));
    f.restart();
    f.wait_for_phase(&host, None);
    assert!(!f.record(&host).exists());
    assert!(!f.out.join(&host).exists(), "its agent started");
}

#[test]
fn terminating_a_host_during_its_launch_cancels_it() {
    let Some(f) = Fixture::new(5, Duration::from_secs(600), false) else {
        return;
    };
    let host = f.launch(&group("small", None));
    let asked = Instant::now();
    f.terminate(&host);
    f.wait_for_phase(&host, None);
    assert!(
        asked.elapsed() < Duration::from_secs(60),
        "the launch delay was not cut short"
    );
    assert!(!f.out.join(&host).exists(), "its agent started");
    assert!(!netns_names().contains(&f.netns(&host)));
    assert!(f.host_cgroup_dirs(&host).is_empty());
}

#[test]
fn stop_all_drains_then_forces_then_kills_and_leaves_nothing_behind() {
    let Some(f) = Fixture::new(6, Duration::ZERO, false) else {
        return;
    };
    let polite = f.launch(&group("small", None));
    let stubborn = f.launch(&group("stubborn", None));
    assert_ne!(polite, stubborn);
    for host in [&polite, &stubborn] {
        f.wait_for_phase(host, Some(HostPhase::Running));
        f.agent_file(host, "ready");
    }
    f.assert_address(&polite, "10.214.6.2");
    f.assert_address(&stubborn, "10.214.6.3");
    let pids = [f.agent_pid(&polite), f.agent_pid(&stubborn)];

    // Long enough for the polite agent to drain on a slow machine (the VM's software
    // emulation); the stubborn one takes two of them.
    let grace = Duration::from_secs(3);
    f.block_on(f.p().stop_all(grace));
    assert_eq!(f.block_on(f.p().list()).unwrap(), vec![]);
    assert_eq!(f.agent_file(&polite, "drained").trim(), "drained");
    // The stubborn one got the drain and the forced drain, then SIGKILL.
    assert_eq!(f.agent_file(&stubborn, "terms").lines().count(), 2);
    assert!(!f.out.join(&stubborn).join("drained").exists());
    f.assert_released(&polite, 2, pids[0]);
    f.assert_released(&stubborn, 3, pids[1]);
    // The hosts' cgroup parent goes with the last host.
    let parents: Vec<PathBuf> = cgroup_mounts()
        .into_iter()
        .map(|m| m.join(&f.cfg.cgroup_parent))
        .filter(|d| d.exists())
        .collect();
    assert_eq!(parents, Vec::<PathBuf>::new());
}

/// An engine started on the bridge, or `None` (said why) when it is not installed.
fn engine<T>(what: &str, started: Result<T, EngineError>) -> Option<T> {
    match started {
        Err(e) if e.is_missing() => {
            eprintln!("skipping: {what} is not installed: {e}");
            None
        }
        started => Some(started.unwrap()),
    }
}

/// Runs `command` inside the network namespace `netns` (a client, not an agent: `ip
/// netns exec` may remount /sys for it); its stdout.
fn in_netns(netns: &str, command: &[&str]) -> String {
    let out = std::process::Command::new(ip_program().unwrap())
        .args(["netns", "exec", netns])
        .args(command)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{command:?} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The first line `request` gets from `host:port`, over bash's /dev/tcp.
fn exchange(netns: &str, host_port: &str, request: &str) -> String {
    let (host, port) = host_port.rsplit_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf '{request}' >&3 && read -t 10 line <&3 \
         && echo \"$line\""
    );
    in_netns(netns, &["/bin/bash", "-c", &script])
}

#[test]
fn hosts_reach_the_engines_started_on_the_bridge() {
    let Some(f) = Fixture::new(7, Duration::ZERO, false) else {
        return;
    };
    let bridge = f.bridge_ip();
    let Some(postgres) = engine("PostgreSQL", PostgresServer::start_on(bridge)) else {
        return;
    };
    let Some(redis) = engine("Redis", RedisServer::start_on(bridge)) else {
        return;
    };
    let Some(moto) = engine("moto", MotoServer::start_on(bridge)) else {
        return;
    };
    let host = f.launch(&group("small", None));
    f.wait_for_phase(&host, Some(HostPhase::Running));
    let netns = f.netns(&host);

    // PostgreSQL lets the hatchery role in from the host's own address.
    let url = postgres.create_database("hatchery").unwrap();
    assert!(url.starts_with("postgres://hatchery@10.214.7.1:"), "{url}");
    let psql = postgres_bin_dir().unwrap().join("psql");
    let client = in_netns(
        &netns,
        &[
            psql.to_str().unwrap(),
            "-X",
            "-At",
            &url,
            "-c",
            "select inet_client_addr()",
        ],
    );
    assert_eq!(client, "10.214.7.2");

    let redis_at = redis.url();
    let redis_at = redis_at
        .strip_prefix("redis://")
        .and_then(|r| r.strip_suffix('/'))
        .unwrap();
    assert_eq!(exchange(&netns, redis_at, "PING\\r\\n"), "+PONG");

    let s3_at = moto.endpoint();
    let s3_at = s3_at.strip_prefix("http://").unwrap();
    let status = exchange(
        &netns,
        s3_at,
        "GET / HTTP/1.1\\r\\nHost: s3\\r\\nConnection: close\\r\\n\\r\\n",
    );
    assert!(status.starts_with("HTTP/1.1 200"), "{status:?}");
}
