//! The whole architecture on this machine, hosts included (`hatchery sim`, and the
//! autoscaling tests): a private PostgreSQL, Redis and S3 (moto) listening on a bridge,
//! an API replica and a scheduler as processes of the `hatchery` binary, and no host at
//! first: the scheduler's autoscaler makes hosts as demand comes, drains them and removes
//! them when they are not needed. Hosts come from the `netns` provider (each a network
//! namespace on the bridge, a cgroup of its group's shape, and a `hatchery agent` of its
//! own) or from the `qemu` provider (each a Linux VM with a pure cgroup v2 kernel running
//! its own `hatchery agent`, reaching the engines on the bridge through qemu's user-mode
//! network), or — to run the production `ec2-asg` provider end to end — from EC2 Auto
//! Scaling groups emulated by moto, whose instances a [`Launcher`] turns into `netns`
//! hosts named after them (moto makes instances, but runs nothing).
//!
//! [`Sim::stop`] (also on drop) removes everything it made: processes, hosts (their
//! namespaces, veths and cgroups), the bridge, the engines and the data;
//! [`Sim::leftovers`] says what, if anything, remains.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hatchery_scheduler::autoscale::GroupConfig;
use hatchery_scheduler::provider::ec2_asg::{aws_error, emulator_sdk_config, sdk};
use hatchery_scheduler::provider::netns::{self, NetnsConfig, NetnsProvider};
use hatchery_scheduler::provider::{HostPhase, Provider};

use crate::local_cluster::{ClusterError, ClusterSpec, LocalCluster, RoleKind};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("the bridge {bridge}: {reason}")]
    Bridge { bridge: String, reason: String },
    #[error("the emulated Auto Scaling groups: {0}")]
    Asg(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The shape of a simulated cluster.
#[derive(Debug, Clone)]
pub struct SimSpec {
    /// The `hatchery` binary every process runs.
    pub bin: PathBuf,
    /// The root filesystem of the hosts' sandboxes.
    pub rootfs: PathBuf,
    /// The bridge the hosts and the engines meet on, and its /24 (the bridge is `.1`).
    pub bridge: String,
    pub network: Ipv4Addr,
    /// The cgroup under which every host gets its own.
    pub cgroup_parent: String,
    /// The host groups, as `[[groups]]` TOML tables.
    pub groups: String,
    /// How long making a host takes before its agent starts.
    pub launch_delay: Duration,
    /// Executions each host runs at once, and warm sandboxes it keeps per language.
    pub capacity: u32,
    pub pool_size: u32,
    /// The API replica's port (0: any free port).
    pub port: u16,
    /// `RUST_LOG` of the processes.
    pub log_filter: String,
    /// Environment of the scheduler, and so of the hosts' agents (e.g.
    /// `HATCHERY_AGENT_LEASE`).
    pub agent_env: Vec<(String, String)>,
    /// How long after its last submission a user keeps room for its warm runs
    /// (`platform.active_for`).
    pub active_for: Duration,
    /// Who makes the hosts: `netns`, `qemu` or `ec2-asg` (the groups must name it
    /// too).
    pub provider: String,
}

impl SimSpec {
    /// The default simulation: groups `small` (1 GiB, 1 CPU) and `big` (8 GiB, 2 CPUs),
    /// both from zero hosts, on bridge `hatchery0` (10.213.0.0/24).
    pub fn new(bin: impl Into<PathBuf>, rootfs: impl Into<PathBuf>) -> SimSpec {
        SimSpec {
            bin: bin.into(),
            rootfs: rootfs.into(),
            bridge: "hatchery0".into(),
            network: Ipv4Addr::new(10, 213, 0, 0),
            cgroup_parent: format!("hatchery-sim-{}", std::process::id()),
            groups: default_groups("netns", "30s"),
            launch_delay: Duration::from_secs(2),
            capacity: 4,
            pool_size: 1,
            port: 8080,
            log_filter: "info".into(),
            // Hosts drain on SIGTERM without a deadline (the cluster's config says 0s
            // for its own agents).
            agent_env: vec![("HATCHERY_DRAIN_DEADLINE".into(), "none".into())],
            active_for: Duration::from_secs(60),
            provider: "netns".into(),
        }
    }
}

/// The default groups of hosts made by `provider`, empty hosts drained after
/// `scale_down_after`. VMs are heavier than namespaces: fewer of them.
pub fn default_groups(provider: &str, scale_down_after: &str) -> String {
    let (small, big) = if provider == "qemu" { (2, 1) } else { (4, 2) };
    // An Auto Scaling group's name is `hatchery-<group>` (the default prefix).
    group_toml(provider, "small", "1G", 1.0, 0, small, scale_down_after)
        + &group_toml(provider, "big", "8G", 2.0, 0, big, scale_down_after)
}

/// One `[[groups]]` table of hosts made by `provider` (no cooldowns).
pub fn group_toml(
    provider: &str,
    name: &str,
    memory: &str,
    cpus: f64,
    min: u32,
    max: u32,
    scale_down_after: &str,
) -> String {
    format!(
        "[[groups]]\nname = {name:?}\nmemory = {memory:?}\ncpus = {cpus:?}\nmin = {min}\n\
         max = {max}\nscale_down_after = {scale_down_after:?}\ncooldown_up = \"0s\"\n\
         cooldown_down = \"0s\"\nprovider = {provider:?}\n"
    )
}

/// A running simulation.
pub struct Sim {
    pub cluster: LocalCluster,
    spec: SimSpec,
    netns: NetnsConfig,
    launcher: Option<Launcher>,
    stopped: bool,
}

/// The region of the emulated Auto Scaling groups.
pub const SIM_REGION: &str = "us-east-1";

impl Sim {
    /// Makes the bridge, starts the engines on it, then the scheduler and the API
    /// replica; returns once the API listens. No host runs yet.
    pub fn start(spec: SimSpec) -> Result<Sim, SimError> {
        let tmp = tempfile::Builder::new()
            .prefix("hatchery-sim-")
            .tempdir()
            .map_err(|source| SimError::Io {
                what: "creating the simulation's directory".into(),
                source,
            })?;
        let dir = tmp.keep();
        let bridge_ip = host_address(spec.network, 1);
        netns::ensure_bridge(&spec.bridge, bridge_ip).map_err(|e| SimError::Bridge {
            bridge: spec.bridge.clone(),
            reason: e.to_string(),
        })?;
        let netns = NetnsConfig {
            state_dir: dir.join("hosts"),
            bridge: spec.bridge.clone(),
            network: spec.network,
            cgroup_parent: spec.cgroup_parent.clone(),
            // Only the scheduler launches hosts; this copy stops them.
            agent_command: vec![spec.bin.clone().into_os_string(), "agent".into()],
            agent_env: Vec::new(),
            launch_delay: spec.launch_delay,
            overhead_memory: 768 << 20,
        };
        let mut cluster = ClusterSpec::new(&spec.bin, &spec.rootfs);
        cluster.apis = 0;
        cluster.schedulers = 0;
        cluster.agents = 0;
        cluster.agent_capacity = spec.capacity;
        cluster.pool_size = spec.pool_size;
        cluster.first_port = spec.port;
        cluster.log_filter = spec.log_filter.clone();
        cluster.dir = Some(dir.clone());
        cluster.bind = Some(bridge_ip);
        cluster.active_for = Some(format!("{}ms", spec.active_for.as_millis()));
        let qemu_dir = dir.join("qemu");
        cluster.extra_config = format!(
            "{groups}[netns]\nbridge = {bridge:?}\nnetwork = \"{network}\"\n\
             cgroup_parent = {cgroup:?}\nstate_dir = {state:?}\nlaunch_delay = \"{delay}ms\"\n\
             [qemu]\nstate_dir = {qemu_state:?}\nlaunch_delay = \"{delay}ms\"\n",
            groups = spec.groups,
            bridge = spec.bridge,
            network = spec.network,
            cgroup = spec.cgroup_parent,
            state = netns.state_dir.display().to_string(),
            qemu_state = qemu_dir.display().to_string(),
            delay = spec.launch_delay.as_millis(),
        );
        let mut sim = Sim {
            cluster: LocalCluster::engines(cluster).inspect_err(|_| {
                netns::remove_bridge(&spec.bridge);
                let _ = std::fs::remove_dir_all(&dir);
            })?,
            spec,
            netns,
            launcher: None,
            stopped: false,
        };
        let mut env: Vec<(&str, String)> = sim
            .spec
            .agent_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        if sim.spec.provider == "ec2-asg" {
            let endpoint = sim.cluster.moto.endpoint();
            env.push(("HATCHERY_EC2_ENDPOINT", endpoint.clone()));
            env.push(("HATCHERY_EC2_REGION", SIM_REGION.into()));
            let groups = hatchery_api_groups(&sim.spec.groups)?;
            create_asgs(&endpoint, &groups)?;
            let mut agents = sim.netns.clone();
            agents.agent_command = vec![
                sim.spec.bin.clone().into_os_string(),
                "agent".into(),
                "--config".into(),
                sim.cluster.config().as_os_str().to_owned(),
            ];
            // What a role of the cluster gets (see local_cluster's launch).
            agents.agent_env = sim.spec.agent_env.clone();
            agents.agent_env.extend([
                ("RUST_LOG".to_string(), sim.spec.log_filter.clone()),
                ("AWS_ACCESS_KEY_ID".into(), "hatchery-local".into()),
                ("AWS_SECRET_ACCESS_KEY".into(), "hatchery-local".into()),
            ]);
            sim.launcher = Some(Launcher::start(agents, groups, endpoint)?);
        }
        sim.cluster
            .spawn(RoleKind::Scheduler, "scheduler-1", &env)?;
        sim.cluster.api("api-1")?;
        Ok(sim)
    }

    pub fn spec(&self) -> &SimSpec {
        &self.spec
    }

    /// Where the API listens.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.cluster.api_addrs()[0]
    }

    /// The scheduler's log (the autoscaler says there what it does).
    pub fn scheduler_log(&self) -> PathBuf {
        let i = self.cluster.find("scheduler-1").expect("the scheduler");
        self.cluster.procs[i].log.clone()
    }

    /// Where the hosts' agents' logs are (`logs/<host>.log`), and the `netns` hosts'
    /// records.
    pub fn hosts_dir(&self) -> PathBuf {
        if self.spec.provider == "qemu" {
            self.cluster.dir().join("qemu")
        } else {
            self.netns.state_dir.clone()
        }
    }

    /// Stops the API and the scheduler, then every host (their agents drain: a second
    /// signal after `grace` forces them), and removes the hosts, the bridge, the engines
    /// and the data. (VM hosts are stopped by the scheduler as it stops: they are its
    /// children.)
    pub fn stop(&mut self, grace: Duration) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        self.cluster.stop();
        if let Some(launcher) = self.launcher.take() {
            launcher.stop();
        }
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt.block_on(async {
                match NetnsProvider::new(self.netns.clone()).await {
                    Ok(p) => p.stop_all(grace).await,
                    Err(e) => tracing::warn!(error = %e, "cannot stop the simulation's hosts"),
                }
            }),
            Err(e) => tracing::warn!(error = %e, "cannot stop the simulation's hosts"),
        }
        crate::local_cluster::remove_cgroup_parent(&self.spec.cgroup_parent);
        netns::remove_bridge(&self.spec.bridge);
    }

    /// What the simulation left on this machine: network namespaces and links named
    /// after its bridge, its cgroups, processes in them, and VMs of its hosts. Empty
    /// after [`Sim::stop`].
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = leftovers(&self.spec.bridge, &self.spec.cgroup_parent);
        left.extend(processes_naming(&self.cluster.dir().join("qemu")));
        left
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(2));
        let _ = std::fs::remove_dir_all(self.cluster.dir());
    }
}

fn hatchery_api_groups(toml: &str) -> Result<Vec<GroupConfig>, SimError> {
    crate::config::groups_from_toml(toml).map_err(|e| SimError::Asg(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, SimError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| SimError::Io {
            what: "starting a runtime".into(),
            source,
        })
}

/// Makes the emulator's Auto Scaling group of each group (`hatchery-<group>`, its min
/// and max, as many instances as its min) from one launch configuration.
fn create_asgs(endpoint: &str, groups: &[GroupConfig]) -> Result<(), SimError> {
    let fail = |e: &dyn std::error::Error| SimError::Asg(aws_error(e));
    runtime()?.block_on(async {
        let client = sdk::Client::new(&emulator_sdk_config(SIM_REGION, endpoint).await);
        client
            .create_launch_configuration()
            .launch_configuration_name("hatchery-sim")
            // moto's stock image id: its instances run nothing.
            .image_id("ami-12c6146b")
            .instance_type("t3.micro")
            .send()
            .await
            .map_err(|e| fail(&e))?;
        for g in groups {
            client
                .create_auto_scaling_group()
                .auto_scaling_group_name(format!("hatchery-{}", g.name))
                .launch_configuration_name("hatchery-sim")
                .min_size(g.min as i32)
                .max_size(g.max as i32)
                .desired_capacity(g.min as i32)
                .availability_zones(format!("{SIM_REGION}a"))
                .send()
                .await
                .map_err(|e| fail(&e))?;
        }
        Ok(())
    })
}

/// Turns the emulator's instances into hosts: every in-service instance of a group's
/// Auto Scaling group gets a `netns` host named after its instance id (whose agent
/// registers under that name, as a real instance's would); a host whose instance is
/// terminating or gone is terminated (its agent drains and exits, as an instance's does
/// when EC2 shuts it down). Runs on a thread of its own, looking twice a second.
pub struct Launcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Launcher {
    fn start(
        netns: NetnsConfig,
        groups: Vec<GroupConfig>,
        endpoint: String,
    ) -> Result<Launcher, SimError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let rt = runtime()?;
        let provider = rt
            .block_on(NetnsProvider::new(netns))
            .map_err(|e| SimError::Asg(e.to_string()))?;
        let thread = std::thread::Builder::new()
            .name("ec2 launcher".into())
            .spawn(move || rt.block_on(launch_instances(provider, groups, endpoint, flag)))
            .map_err(|source| SimError::Io {
                what: "starting the launcher".into(),
                source,
            })?;
        Ok(Launcher { stop, thread })
    }

    /// Stops looking (the hosts stay: [`Sim::stop`] stops them).
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

async fn launch_instances(
    netns: NetnsProvider,
    groups: Vec<GroupConfig>,
    endpoint: String,
    stop: Arc<AtomicBool>,
) {
    let client = sdk::Client::new(&emulator_sdk_config(SIM_REGION, &endpoint).await);
    let by_asg: BTreeMap<String, GroupConfig> = groups
        .into_iter()
        .map(|g| (format!("hatchery-{}", g.name), g))
        .collect();
    while !stop.load(Ordering::SeqCst) {
        let described = client
            .describe_auto_scaling_groups()
            .set_auto_scaling_group_names(Some(by_asg.keys().cloned().collect()))
            .send()
            .await;
        let (Ok(described), Ok(hosts)) = (described, netns.list().await) else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut in_service = BTreeSet::new();
        for asg in described.auto_scaling_groups() {
            let Some(group) = asg.auto_scaling_group_name().and_then(|n| by_asg.get(n)) else {
                continue;
            };
            for i in asg.instances() {
                let (Some(id), Some(state)) = (i.instance_id(), i.lifecycle_state()) else {
                    continue;
                };
                if state.as_str() != "InService" {
                    continue;
                }
                in_service.insert(id.to_string());
                if !hosts.iter().any(|h| h.name == id) {
                    match netns.launch_as(group, Some(id)).await {
                        Ok(_) => {
                            tracing::info!(instance = id, group = %group.name, "launcher: the instance is up; its host starts")
                        }
                        Err(e) => {
                            tracing::warn!(instance = id, error = %e, "launcher: cannot start the instance's host")
                        }
                    }
                }
            }
        }
        for h in &hosts {
            let leaving = matches!(h.phase, HostPhase::Stopping);
            if !leaving && !in_service.contains(&h.name) {
                tracing::info!(instance = %h.name, "launcher: the instance is terminating; its host stops");
                if let Err(e) = netns.terminate(&h.name).await {
                    tracing::warn!(instance = %h.name, error = %e, "launcher: cannot stop the host");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Processes whose command line names something under `dir` (a VM host's qemu shares
/// its control directory from there).
pub fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut left = Vec::new();
    for (pid, proc_dir) in processes() {
        if let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) {
            if cmdline.windows(needle.len()).any(|w| w == needle) {
                left.push(format!("process {pid} (naming {})", dir.display()));
            }
        }
    }
    left
}

/// Every process: its pid and its `/proc` directory.
fn processes() -> impl Iterator<Item = (String, PathBuf)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flat_map(|procs| procs.flatten())
        .filter_map(|p| {
            let pid = p.file_name().into_string().ok()?;
            pid.bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| (pid, p.path()))
        })
}

/// Address `.n` of a /24.
pub fn host_address(network: Ipv4Addr, n: u8) -> Ipv4Addr {
    let [a, b, c, _] = network.octets();
    Ipv4Addr::new(a, b, c, n)
}

/// Network namespaces and links named after `bridge`, cgroups under `cgroup_parent` in
/// any hierarchy, and processes in them.
pub fn leftovers(bridge: &str, cgroup_parent: &str) -> Vec<String> {
    let mut left = Vec::new();
    let run = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in run(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(&format!("{bridge}-")) {
            left.push(format!("network namespace {name}"));
        }
    }
    for line in run(&["-o", "link", "show"]).lines() {
        // "12: name@peer: <...>"
        let name = line
            .split(": ")
            .nth(1)
            .unwrap_or_default()
            .split('@')
            .next()
            .unwrap_or_default();
        if name == bridge || name.starts_with(&format!("{bridge}-")) {
            left.push(format!("link {name}"));
        }
    }
    if let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") {
        for m in mounts.flatten() {
            let dir = m.path().join(cgroup_parent);
            if dir.is_dir() {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
    }
    let root_dir = Path::new("/sys/fs/cgroup").join(cgroup_parent);
    if root_dir.is_dir()
        && !left
            .iter()
            .any(|l| l.ends_with(&root_dir.display().to_string()))
    {
        left.push(format!("cgroup {}", root_dir.display()));
    }
    let needle = format!("/{cgroup_parent}/");
    for (pid, proc_dir) in processes() {
        if let Ok(cg) = std::fs::read_to_string(proc_dir.join("cgroup")) {
            if cg.lines().any(|l| l.contains(&needle)) {
                left.push(format!("process {pid}"));
            }
        }
    }
    left
}
