//! Configuration of the `hatchery` binary: embedded defaults, overridden by a TOML file
//! (`--config FILE`, else `./hatchery.toml` when present), overridden by `HATCHERY_*`
//! environment variables. Also the platform's secrets (`<data_dir>/keys.toml`): the
//! token signing key and the encryption keys by id (see [`Keys`]), generated on first
//! use and rotated by [`Keys::rotate`].
//!
//! This module only reads and validates settings; it starts nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use hatchery_scheduler::agent::{machine_allocatable, DEFAULT_CPU_OVERCOMMIT};
use hatchery_scheduler::autoscale::GroupConfig;
use hatchery_scheduler::model::{EffectivePolicy, Policy, Resources};
use hatchery_scheduler::platform::PlatformConfig;
use hatchery_scheduler::seal::{generate_key, KeyId, Keyring, KeyringError};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// The config file looked for in the working directory when `--config` is not given.
pub const DEFAULT_CONFIG_FILE: &str = "hatchery.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("keys file {path}: {message}")]
    Keys { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Everything the binary needs to start (secrets excluded: see [`Keys`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the HTTP API (`HATCHERY_LISTEN`). Port 0 picks a free port; the
    /// chosen one is printed.
    pub listen: String,
    /// Records, events, objects and keys (`HATCHERY_DATA_DIR`).
    pub data_dir: PathBuf,
    /// Read-only root filesystem of the sandboxes (`HATCHERY_ROOTFS`).
    pub rootfs: PathBuf,
    /// `human` or `json` (`HATCHERY_LOG_FORMAT`); the filter is `RUST_LOG`.
    pub log_format: LogFormat,
    /// Largest request body the API reads (`HATCHERY_BODY_LIMIT`).
    pub body_limit_bytes: usize,
    /// Lifetime of the tokens `hatchery up` prints (and its console's one-click sign-in
    /// hands out).
    pub token_ttl: String,
    /// `hatchery up` on a loopback address: the console offers a one-click sign-in as
    /// the printed demo user or superadmin, to a browser on this machine only
    /// (`HATCHERY_LOCAL_SIGN_IN`, `true` or `false`). Never on another address, never in
    /// a cluster.
    pub local_sign_in: bool,
    /// The scheduler's leadership lease in a cluster, e.g. `5s`
    /// (`HATCHERY_SCHEDULER_LEASE`): a leader that does not renew it in time stops
    /// placing, and another scheduler takes over.
    pub scheduler_lease: String,
    /// Threads of the process's async runtime (`HATCHERY_WORKER_THREADS`); 0 (the
    /// default) = one per CPU. The sandboxes and the claims run on threads of their own
    /// whatever this is.
    pub worker_threads: usize,
    pub agent: AgentSection,
    pub platform: PlatformSection,
    pub store: StoreSection,
    /// Host groups (`[[groups]]`): hosts of one shape, scaled together. With groups, a
    /// request whose limits fit no group's shape is refused (422
    /// `exceeds_largest_group`); without, one that fits no reporting host (422
    /// `exceeds_largest_host`).
    pub groups: Vec<GroupSection>,
    /// The `netns` provider: how groups with `provider = "netns"` get their hosts.
    pub netns: NetnsSection,
    /// The `qemu` provider: how groups with `provider = "qemu"` get their hosts.
    pub qemu: QemuSection,
    /// The `ec2-asg` provider: how groups with `provider = "ec2-asg"` get their hosts.
    pub ec2_asg: Ec2AsgSection,
}

/// The `ec2-asg` provider's settings: each group with `provider = "ec2-asg"` is an EC2
/// Auto Scaling group whose instances run `hatchery agent` named after their instance
/// id. Credentials come from the environment as the AWS CLI finds them
/// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, an instance role).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2AsgSection {
    /// The region (`HATCHERY_EC2_REGION`; unset: `AWS_REGION` or the profile's).
    pub region: Option<String>,
    /// Another endpoint for the Auto Scaling API, e.g. an emulator's
    /// (`HATCHERY_EC2_ENDPOINT`).
    pub endpoint: Option<String>,
    /// The Auto Scaling group of each host group, by group name (default:
    /// `<asg_prefix><group>`).
    pub asg_names: std::collections::BTreeMap<String, String>,
    pub asg_prefix: String,
}

impl Default for Ec2AsgSection {
    fn default() -> Self {
        Ec2AsgSection {
            region: None,
            endpoint: None,
            asg_names: Default::default(),
            asg_prefix: "hatchery-".into(),
        }
    }
}

/// The `qemu` provider's settings: each host it makes is a Linux VM on this machine
/// (Debian's kernel, pure cgroup v2, this machine's root read-only) running `hatchery
/// agent` with this process's configuration file and environment. qemu's user-mode
/// network opens the guest's connections from this machine, so the engines' URLs in
/// `[store]` work unchanged in the guest (`127.0.0.1` excepted: the guest's own loopback
/// is its own; this machine's loopback is `10.0.2.2` there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    /// Where the hosts' logs and control directories go (default `<data_dir>/qemu`).
    pub state_dir: Option<PathBuf>,
    /// How long making a host takes before its VM boots (0 by default; the boot itself
    /// takes seconds under KVM, tens of seconds under software emulation).
    pub launch_delay: String,
    /// Memory each VM has beyond its group's shape, for the guest's kernel, the agent and
    /// its zygotes.
    pub overhead_memory: String,
    /// `auto` (KVM when it works, else software emulation), `kvm` or `tcg`.
    pub accel: String,
    /// The guest's kernel (a bzImage; default: the newest in /boot with its modules).
    pub kernel: Option<PathBuf>,
    /// More directories shared read-only with the guests at their own paths. The
    /// directory holding `rootfs` always is: a sandbox's overlay cannot stack on the
    /// guest's own overlay root.
    pub shares: Vec<PathBuf>,
}

impl Default for QemuSection {
    fn default() -> Self {
        QemuSection {
            state_dir: None,
            launch_delay: "0s".into(),
            overhead_memory: "768M".into(),
            accel: "auto".into(),
            kernel: None,
            shares: Vec::new(),
        }
    }
}

/// The `netns` provider's settings: each host it makes is a network namespace on this
/// machine, with a veth on `bridge`, a cgroup of its group's shape, and a `hatchery agent`
/// process of its own that reaches the engines over the bridge (so their URLs in
/// `[store]` must name the bridge's address, the network's `.1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetnsSection {
    /// The bridge (at most 10 characters), created if missing.
    pub bridge: String,
    /// The hosts' /24, e.g. `10.213.0.0`: the bridge has `.1`, hosts `.2` to `.254`.
    pub network: String,
    /// The cgroup under which each host gets `<name>/` (its agent and its sandboxes).
    pub cgroup_parent: String,
    /// Where the hosts' records and their agents' logs go (default `<data_dir>/netns`).
    pub state_dir: Option<PathBuf>,
    /// How long making a host takes before its agent starts, e.g. `5s` (a machine's
    /// boot; 0 by default).
    pub launch_delay: String,
    /// Memory each host's cgroup has beyond its group's shape, for its agent and zygotes.
    pub overhead_memory: String,
}

impl Default for NetnsSection {
    fn default() -> Self {
        NetnsSection {
            bridge: "hatchery0".into(),
            network: "10.213.0.0".into(),
            cgroup_parent: "hatchery-hosts".into(),
            state_dir: None,
            launch_delay: "0s".into(),
            overhead_memory: "768M".into(),
        }
    }
}

/// The host groups of a TOML text of `[[groups]]` tables, checked.
pub fn groups_from_toml(text: &str) -> Result<Vec<GroupConfig>, ConfigError> {
    #[derive(Deserialize)]
    struct Groups {
        groups: Vec<GroupSection>,
    }
    let doc: Groups = toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
    doc.groups
        .iter()
        .map(|g| g.to_group().map_err(ConfigError::Invalid))
        .collect()
}

/// One host group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSection {
    pub name: String,
    /// What each host has for executions: memory (`8G`) and CPUs.
    pub memory: String,
    pub cpus: f64,
    /// The languages its hosts serve.
    pub languages: Vec<String>,
    /// Hosts kept at the least and at the most.
    pub min: u32,
    pub max: u32,
    /// How long a host must be empty before it is drained.
    pub scale_down_after: String,
    /// The least time between two launches, and between two drains, of the group.
    pub cooldown_up: String,
    pub cooldown_down: String,
    /// Warm sandboxes each of its hosts keeps per language (unset: `agent.pool_size`).
    pub pool_size: Option<u32>,
    /// Who makes its hosts: `static` (hosts started by hand, as `hatchery agent` with
    /// `agent.group`; never launched or terminated by the autoscaler) or `netns` (hosts
    /// the scheduler makes on this machine, each a network namespace with a cgroup of the
    /// group's shape: see `[netns]`), `qemu` (hosts the scheduler makes as Linux VMs on
    /// this machine: see `[qemu]`) or `ec2-asg` (instances of an EC2 Auto Scaling group:
    /// see `[ec2_asg]`).
    pub provider: String,
}

impl Default for GroupSection {
    fn default() -> Self {
        GroupSection {
            name: String::new(),
            memory: "1G".into(),
            cpus: 1.0,
            languages: vec!["r".into()],
            min: 0,
            max: 10,
            scale_down_after: "10m".into(),
            cooldown_up: "30s".into(),
            cooldown_down: "1m".into(),
            pool_size: None,
            provider: "static".into(),
        }
    }
}

impl GroupSection {
    fn to_group(&self) -> Result<GroupConfig, String> {
        let name = &self.name;
        if !hatchery_scheduler::autoscale::valid_group_name(name) {
            return Err(format!(
                "group name {name:?}: 1 to 64 letters, digits, - and _"
            ));
        }
        let memory = hatchery_sandbox::limits::parse_size(&self.memory)
            .map_err(|e| format!("group {name}: memory: {e}"))?;
        if memory < 64 << 20 {
            return Err(format!("group {name}: memory must be at least 64M"));
        }
        if !(0.01..=100_000.0).contains(&self.cpus) {
            return Err(format!(
                "group {name}: cpus must be a number of CPUs like 2 or 0.5"
            ));
        }
        if self.languages.is_empty() {
            return Err(format!("group {name}: languages: name at least one"));
        }
        if self.min > self.max || self.max == 0 {
            return Err(format!(
                "group {name}: min ({}) must be at most max ({}), and max at least 1",
                self.min, self.max
            ));
        }
        if !matches!(
            self.provider.as_str(),
            "static" | "netns" | "qemu" | "ec2-asg"
        ) {
            return Err(format!(
                "group {name}: provider {:?}: expected static, netns, qemu or ec2-asg",
                self.provider
            ));
        }
        let duration = |what: &str, v: &str| {
            parse_duration_or_zero(v).map_err(|e| format!("group {name}: {what}: {e}"))
        };
        Ok(GroupConfig {
            name: name.clone(),
            shape: Resources::new(memory, self.cpus),
            languages: self.languages.clone(),
            min: self.min,
            max: self.max,
            scale_down_after: duration("scale_down_after", &self.scale_down_after)?,
            cooldown_up: duration("cooldown_up", &self.cooldown_up)?,
            cooldown_down: duration("cooldown_down", &self.cooldown_down)?,
            pool_size: self.pool_size,
            provider: self.provider.clone(),
        })
    }
}

/// Where executions, events and policies are kept — the embedded store under `data_dir`
/// (the default), or PostgreSQL — and how the roles talk: in-process channels (the
/// default) or Redis Streams.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// `postgres://user:password@host:port/database` (`HATCHERY_POSTGRES_URL`); unset:
    /// the embedded store. The schema is created or brought up to date at start.
    pub postgres_url: Option<String>,
    /// Connections to PostgreSQL this process keeps at the most.
    pub postgres_max_connections: Option<u32>,
    /// `redis://host:port/db` (`HATCHERY_REDIS_URL`): work, live events and host status go
    /// over Redis Streams instead of in-process channels.
    pub redis_url: Option<String>,
    /// Prefix of Hatchery's Redis keys (several platforms may share one Redis).
    pub redis_prefix: Option<String>,
    /// Keep code, results and artifacts in this S3 bucket (`HATCHERY_S3_BUCKET`) instead
    /// of `data_dir/objects`; credentials from the standard `AWS_*` environment.
    pub s3_bucket: Option<String>,
    /// The bucket's region (default `us-east-1`).
    pub s3_region: Option<String>,
    /// An S3 API other than AWS's, e.g. `http://127.0.0.1:9000` (`HATCHERY_S3_ENDPOINT`).
    pub s3_endpoint: Option<String>,
}

/// The embedded agent (the per-host runtime daemon of this machine).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// Name of this host in statuses and records (`HATCHERY_AGENT_NAME`).
    pub name: String,
    /// The host group this host belongs to (`HATCHERY_GROUP`), one of `[[groups]]`.
    pub group: Option<String>,
    /// Frozen sandboxes kept warm per language at the least (`HATCHERY_POOL_SIZE`); the
    /// pools grow with demand: every user active (`platform.active_for`) whose policy
    /// lets it use this host's group adds the `warm_pool_size` of their policy (shared
    /// between the ready hosts of a scaled group), up to `max_pool_size`.
    pub pool_size: usize,
    /// The most frozen sandboxes one language's pool keeps (`HATCHERY_MAX_POOL_SIZE`).
    pub max_pool_size: usize,
    /// Executions this host runs at once (`HATCHERY_CAPACITY`); the rest queue.
    pub capacity: u32,
    /// R packages preloaded in the R zygote (e.g. `["MASS", "Matrix"]`).
    pub r_packages: Vec<String>,
    /// Each warm R sandbox faults in ahead the pages a first evaluation touches
    /// (`HATCHERY_PREFAULT`, default true): claim → result of a trivial statement is ~1.7×
    /// faster, and each populated sandbox holds 0.7 MiB more of its own (1.6 MiB with
    /// stats, MASS and Matrix preloaded); see `prefault_ready`. `false`: none does.
    pub prefault: bool,
    /// How many frozen sandboxes of each pool keep those pages populated
    /// (`HATCHERY_PREFAULT_READY`, default 1); the rest of a larger pool stays at its
    /// smallest. Claims take a populated sandbox first, and a sandbox forked for a
    /// waiting claim populates them too.
    pub prefault_ready: usize,
    /// Python modules imported in the Python zygote (default `["numpy", "pandas",
    /// "matplotlib.pyplot"]`: plotting then costs a sandbox no font-cache build).
    pub python_packages: Vec<String>,
    /// On SIGTERM or Ctrl-C the host drains: it takes no new work and its running
    /// executions finish, each within its own time limit. A deadline, e.g. `10m`, kills
    /// what still runs when it passes (recorded `lost`, saying why; `0s`: at once);
    /// `none` (the default): no deadline. A second signal always stops them at once.
    pub drain_deadline: String,
    /// The `sandbox` and `hatchery-zygote` binaries; default: next to `hatchery`.
    pub sandbox_bin: Option<PathBuf>,
    pub zygote_bin: Option<PathBuf>,
    /// Hatchery's parent cgroup on this host (`HATCHERY_CGROUP_PARENT`); default
    /// `hatchery`.
    pub cgroup_parent: Option<String>,
    /// A ceiling on the memory of all sandboxes of this host together, written into the
    /// parent cgroup, e.g. `48G` (`HATCHERY_HOST_MEMORY_MAX`); unset: none.
    pub host_memory_max: Option<String>,
    /// The memory this host has for executions: placement counts each execution's
    /// memory limit against it, e.g. `60G` (`HATCHERY_MEMORY`). `auto` (the default):
    /// `host_memory_max` when set, else the machine's memory less 1 GiB (at most a
    /// quarter of it) for the agent, its warm pools and the system.
    pub memory: String,
    /// The CPUs this host has for executions: placement counts each execution's CPU
    /// limit against them, e.g. `16` or `7.5` (`HATCHERY_CPUS`). `auto` (the default):
    /// twice the online CPUs — a CPU limit is a ceiling (`cpu.max`), not a reservation;
    /// give the CPU count to overcommit nothing.
    pub cpus: String,
    /// A ceiling on the processes of all sandboxes of this host together
    /// (`HATCHERY_HOST_PIDS_MAX`); unset: none.
    pub host_pids_max: Option<u64>,
    /// Bytes one execution may emit — stdout and stderr, progress messages, its value —
    /// before it is stopped with state `output_limit`, e.g. `16M`
    /// (`HATCHERY_OUTPUT_LIMIT`).
    pub output_limit: String,
    /// Events (output pieces, progress, usage samples) one execution may produce before
    /// it is stopped with state `output_limit` (`HATCHERY_MAX_EVENTS`).
    pub max_events: u64,
    /// This host's lease in the store, e.g. `10s` (`HATCHERY_AGENT_LEASE`): a host that
    /// does not renew it in time has its running executions declared `lost`.
    pub lease: String,
}

/// Platform rules: languages, sizes, the queue, retention and the default policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlatformSection {
    pub languages: Vec<String>,
    /// Largest `code` accepted (`HATCHERY_MAX_CODE_BYTES`).
    pub max_code_bytes: usize,
    /// Queued executions held before answering 503 (`HATCHERY_MAX_QUEUED`).
    pub max_queued: usize,
    /// How long finished executions are kept, e.g. `7d` (`HATCHERY_RETENTION`).
    pub retention: String,
    /// The platform default policy; unset fields keep the built-in defaults
    /// (`HATCHERY_MAX_PARALLEL` sets `max_parallel`).
    pub default_policy: Policy,
    /// How long after its last submission a user counts as active
    /// (`HATCHERY_ACTIVE_FOR`): while active, its `warm_pool_size` sandboxes are kept
    /// warm and, with host groups, room for as many runs is kept on hosts it may use.
    pub active_for: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("/var/lib/hatchery/data"),
            rootfs: PathBuf::from("/var/lib/hatchery/rootfs/r"),
            log_format: LogFormat::Human,
            body_limit_bytes: 2 << 20,
            token_ttl: "30d".into(),
            local_sign_in: true,
            scheduler_lease: "5s".into(),
            worker_threads: 0,
            agent: AgentSection::default(),
            platform: PlatformSection::default(),
            store: StoreSection::default(),
            groups: Vec::new(),
            netns: NetnsSection::default(),
            qemu: QemuSection::default(),
            ec2_asg: Ec2AsgSection::default(),
        }
    }
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            name: "local".into(),
            group: None,
            pool_size: 2,
            max_pool_size: 8,
            capacity: 4,
            r_packages: Vec::new(),
            prefault: true,
            prefault_ready: hatchery_sandbox::pool::PREFAULT_READY,
            python_packages: vec!["numpy".into(), "pandas".into(), "matplotlib.pyplot".into()],
            drain_deadline: "none".into(),
            sandbox_bin: None,
            zygote_bin: None,
            cgroup_parent: None,
            host_memory_max: None,
            memory: "auto".into(),
            cpus: "auto".into(),
            host_pids_max: None,
            output_limit: "16M".into(),
            max_events: 100_000,
            lease: "10s".into(),
        }
    }
}

impl Default for PlatformSection {
    fn default() -> Self {
        let p = PlatformConfig::default();
        PlatformSection {
            languages: p.languages,
            max_code_bytes: p.max_code_bytes,
            max_queued: p.max_queued,
            retention: "7d".into(),
            default_policy: Policy::default(),
            active_for: "10m".into(),
        }
    }
}

/// The environment variables read, and the config key each one sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("HATCHERY_LISTEN", "listen"),
    ("HATCHERY_DATA_DIR", "data_dir"),
    ("HATCHERY_ROOTFS", "rootfs"),
    ("HATCHERY_LOG_FORMAT", "log_format"),
    ("HATCHERY_BODY_LIMIT", "body_limit_bytes"),
    ("HATCHERY_TOKEN_TTL", "token_ttl"),
    ("HATCHERY_LOCAL_SIGN_IN", "local_sign_in"),
    ("HATCHERY_SCHEDULER_LEASE", "scheduler_lease"),
    ("HATCHERY_WORKER_THREADS", "worker_threads"),
    ("HATCHERY_AGENT_NAME", "agent.name"),
    ("HATCHERY_POOL_SIZE", "agent.pool_size"),
    ("HATCHERY_MAX_POOL_SIZE", "agent.max_pool_size"),
    ("HATCHERY_CAPACITY", "agent.capacity"),
    ("HATCHERY_PREFAULT", "agent.prefault"),
    ("HATCHERY_PREFAULT_READY", "agent.prefault_ready"),
    ("HATCHERY_DRAIN_DEADLINE", "agent.drain_deadline"),
    ("HATCHERY_SANDBOX_BIN", "agent.sandbox_bin"),
    ("HATCHERY_ZYGOTE_BIN", "agent.zygote_bin"),
    ("HATCHERY_CGROUP_PARENT", "agent.cgroup_parent"),
    ("HATCHERY_HOST_MEMORY_MAX", "agent.host_memory_max"),
    ("HATCHERY_MEMORY", "agent.memory"),
    ("HATCHERY_GROUP", "agent.group"),
    ("HATCHERY_CPUS", "agent.cpus"),
    ("HATCHERY_HOST_PIDS_MAX", "agent.host_pids_max"),
    ("HATCHERY_OUTPUT_LIMIT", "agent.output_limit"),
    ("HATCHERY_MAX_EVENTS", "agent.max_events"),
    ("HATCHERY_AGENT_LEASE", "agent.lease"),
    ("HATCHERY_MAX_CODE_BYTES", "platform.max_code_bytes"),
    ("HATCHERY_MAX_QUEUED", "platform.max_queued"),
    ("HATCHERY_RETENTION", "platform.retention"),
    ("HATCHERY_ACTIVE_FOR", "platform.active_for"),
    ("HATCHERY_POSTGRES_URL", "store.postgres_url"),
    ("HATCHERY_REDIS_URL", "store.redis_url"),
    ("HATCHERY_S3_BUCKET", "store.s3_bucket"),
    ("HATCHERY_S3_ENDPOINT", "store.s3_endpoint"),
    ("HATCHERY_EC2_ENDPOINT", "ec2_asg.endpoint"),
    ("HATCHERY_EC2_REGION", "ec2_asg.region"),
    (
        "HATCHERY_MAX_PARALLEL",
        "platform.default_policy.max_parallel",
    ),
];

impl Config {
    /// Defaults ▷ file ▷ environment. `file` is `--config`; without it
    /// `./hatchery.toml` is read when it exists.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        Self::load_from(file, &env)
    }

    /// [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let path = match file {
            Some(p) => Some(p.to_path_buf()),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                p.exists().then_some(p)
            }
        };
        let mut table = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse {
                        path: p.clone(),
                        message: e.to_string(),
                    })?
            }
            None => toml::Table::new(),
        };
        for (var, key) in ENV_VARS {
            if let Some(value) = env.get(*var) {
                let v = env_value(key, value).map_err(|message| ConfigError::Env {
                    var,
                    value: value.clone(),
                    message,
                })?;
                set_path(&mut table, key, v);
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: path
                        .clone()
                        .unwrap_or_else(|| PathBuf::from("<environment>")),
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.netns(Vec::new())?;
        self.qemu(Vec::new(), Vec::new())?;
        self.ec2_asg()?;
        self.listen_addr()?;
        let groups = self.groups()?;
        if let Some(g) = &self.agent.group {
            if !groups.iter().any(|x| x.name == *g) {
                return Err(ConfigError::Invalid(format!(
                    "agent.group {g:?} is not one of the [[groups]]"
                )));
            }
        }
        parse_duration(&self.token_ttl)
            .map_err(|e| ConfigError::Invalid(format!("token_ttl: {e}")))?;
        if parse_duration(&self.scheduler_lease)
            .map_err(|e| ConfigError::Invalid(format!("scheduler_lease: {e}")))?
            < std::time::Duration::from_millis(300)
        {
            return Err(ConfigError::Invalid(
                "scheduler_lease must be at least 300ms".into(),
            ));
        }
        if self.worker_threads > 1024 {
            return Err(ConfigError::Invalid(format!(
                "worker_threads must be at most 1024 (0 = one per CPU), got {}",
                self.worker_threads
            )));
        }
        let lease = parse_duration(&self.agent.lease)
            .map_err(|e| ConfigError::Invalid(format!("agent.lease: {e}")))?;
        if lease < std::time::Duration::from_millis(300) {
            return Err(ConfigError::Invalid(
                "agent.lease must be at least 300ms".into(),
            ));
        }
        parse_deadline(&self.agent.drain_deadline)
            .map_err(|e| ConfigError::Invalid(format!("agent.drain_deadline: {e}")))?;
        parse_duration(&self.platform.retention)
            .map_err(|e| ConfigError::Invalid(format!("platform.retention: {e}")))?;
        parse_duration(&self.platform.active_for)
            .map_err(|e| ConfigError::Invalid(format!("platform.active_for: {e}")))?;
        if self.body_limit_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "body_limit_bytes must be at least 1024".into(),
            ));
        }
        if self.agent.pool_size == 0 || self.agent.capacity == 0 {
            return Err(ConfigError::Invalid(
                "agent.pool_size and agent.capacity must be at least 1".into(),
            ));
        }
        if self.platform.languages.is_empty() {
            return Err(ConfigError::Invalid(
                "platform.languages must name at least one language".into(),
            ));
        }
        if let Some(url) = &self.store.postgres_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid(
                    "store.postgres_url must start with postgres:// or postgresql://".into(),
                ));
            }
        }
        if let Some(url) = &self.store.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::Invalid(
                    "store.redis_url must start with redis:// or rediss://".into(),
                ));
            }
        }
        if self.store.postgres_max_connections == Some(0) {
            return Err(ConfigError::Invalid(
                "store.postgres_max_connections must be at least 1".into(),
            ));
        }
        if self.agent.name.is_empty() {
            return Err(ConfigError::Invalid("agent.name must not be empty".into()));
        }
        let output_limit = hatchery_sandbox::limits::parse_size(&self.agent.output_limit)
            .map_err(|e| ConfigError::Invalid(format!("agent.output_limit: {e}")))?;
        if output_limit < 1024 {
            return Err(ConfigError::Invalid(
                "agent.output_limit must be at least 1K".into(),
            ));
        }
        if self.agent.max_events < 16 {
            return Err(ConfigError::Invalid(
                "agent.max_events must be at least 16".into(),
            ));
        }
        if let Some(m) = &self.agent.host_memory_max {
            let bytes = hatchery_sandbox::limits::parse_size(m)
                .map_err(|e| ConfigError::Invalid(format!("agent.host_memory_max: {e}")))?;
            if bytes < 64 << 20 {
                return Err(ConfigError::Invalid(
                    "agent.host_memory_max must be at least 64M".into(),
                ));
            }
        }
        self.allocatable()?;
        if self.agent.host_pids_max == Some(0) {
            return Err(ConfigError::Invalid(
                "agent.host_pids_max must be at least 1".into(),
            ));
        }
        self.validate_platform_rules()
    }

    /// The platform default policy passes the same rule as every stored policy and
    /// request ([`hatchery_scheduler::policy::validate_default`]), and the queue and code
    /// size admit something: a platform that admits nothing (or everything) never starts.
    fn validate_platform_rules(&self) -> Result<(), ConfigError> {
        use hatchery_scheduler::policy::PolicyError;
        let default = self.platform_config().default_policy;
        if let Err(errors) = hatchery_scheduler::policy::validate_default(&default) {
            let each: Vec<String> = errors
                .0
                .iter()
                .map(|e| match e {
                    PolicyError::OutOfRange { field, value } => format!(
                        "{} is {value}; it must be {}",
                        setting(&format!("platform.default_policy.{field}")),
                        field.range_text()
                    ),
                    other => format!("platform.default_policy: {other}"),
                })
                .collect();
            return Err(ConfigError::Invalid(each.join("; ")));
        }
        if let Some(groups) = &default.groups {
            hatchery_scheduler::policy::check_groups(groups)
                .map_err(|e| ConfigError::Invalid(format!("platform.default_policy.{e}")))?;
            let known = self.groups().unwrap_or_default();
            if let Some(unknown) =
                hatchery_scheduler::autoscale::unknown_groups(&known, groups).first()
            {
                return Err(ConfigError::Invalid(format!(
                    "platform.default_policy.groups: {unknown:?} is not one of [[groups]]"
                )));
            }
        }
        for (key, value) in [
            ("platform.max_queued", self.platform.max_queued),
            ("platform.max_code_bytes", self.platform.max_code_bytes),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{} is 0; it must be at least 1 (0 would admit nothing)",
                    setting(key)
                )));
            }
        }
        Ok(())
    }

    /// Bytes one execution may emit (validated at load).
    pub fn output_limit(&self) -> u64 {
        hatchery_sandbox::limits::parse_size(&self.agent.output_limit).unwrap_or(16 << 20)
    }

    /// The `netns` provider's settings, checked; its hosts run `agent_command`.
    pub fn netns(
        &self,
        agent_command: Vec<std::ffi::OsString>,
    ) -> Result<hatchery_scheduler::provider::netns::NetnsConfig, ConfigError> {
        let n = &self.netns;
        let bad = |what: &str, msg: String| ConfigError::Invalid(format!("netns.{what}: {msg}"));
        if n.bridge.is_empty()
            || n.bridge.len() > 10
            || !n.bridge.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(bad(
                "bridge",
                format!("{:?}: 1 to 10 letters and digits", n.bridge),
            ));
        }
        let network: std::net::Ipv4Addr = n
            .network
            .parse()
            .ok()
            .filter(|a: &std::net::Ipv4Addr| a.octets()[3] == 0)
            .ok_or_else(|| {
                bad(
                    "network",
                    format!("{:?}: a /24 such as 10.213.0.0", n.network),
                )
            })?;
        if n.cgroup_parent.is_empty()
            || n.cgroup_parent.split('/').any(|p| {
                p.is_empty()
                    || p == "."
                    || p == ".."
                    || !p
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
        {
            return Err(bad(
                "cgroup_parent",
                format!("{:?}: names of letters, digits, - and _", n.cgroup_parent),
            ));
        }
        let launch_delay =
            parse_duration_or_zero(&n.launch_delay).map_err(|e| bad("launch_delay", e))?;
        let overhead_memory = hatchery_sandbox::limits::parse_size(&n.overhead_memory)
            .map_err(|e| bad("overhead_memory", e.to_string()))?;
        Ok(hatchery_scheduler::provider::netns::NetnsConfig {
            state_dir: n
                .state_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("netns")),
            bridge: n.bridge.clone(),
            network,
            cgroup_parent: n.cgroup_parent.clone(),
            agent_command,
            agent_env: Vec::new(),
            launch_delay,
            overhead_memory,
        })
    }

    /// The `qemu` provider's settings, checked; its hosts run `agent_command` with
    /// `agent_env`.
    pub fn qemu(
        &self,
        agent_command: Vec<std::ffi::OsString>,
        agent_env: Vec<(String, String)>,
    ) -> Result<hatchery_scheduler::provider::qemu::QemuConfig, ConfigError> {
        let q = &self.qemu;
        let bad = |what: &str, msg: String| ConfigError::Invalid(format!("qemu.{what}: {msg}"));
        let mut cfg = hatchery_scheduler::provider::qemu::QemuConfig::new(
            q.state_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("qemu")),
            agent_command,
            agent_env,
        );
        cfg.launch_delay =
            parse_duration_or_zero(&q.launch_delay).map_err(|e| bad("launch_delay", e))?;
        cfg.overhead_memory = hatchery_sandbox::limits::parse_size(&q.overhead_memory)
            .map_err(|e| bad("overhead_memory", e.to_string()))?;
        cfg.accel = q.accel.parse().map_err(|e: String| bad("accel", e))?;
        cfg.kernel = q.kernel.clone();
        // The rootfs is a link into its store (rootfs-builder): share the store.
        for dir in &q.shares {
            if !dir.is_absolute() {
                return Err(bad(
                    "shares",
                    format!("{}: not an absolute path", dir.display()),
                ));
            }
        }
        let rootfs = std::fs::canonicalize(&self.rootfs)
            .or_else(|_| std::path::absolute(&self.rootfs))
            .unwrap_or_else(|_| self.rootfs.clone());
        let store = rootfs.parent().unwrap_or(&rootfs).to_path_buf();
        cfg.shares = std::iter::once(store)
            .chain(q.shares.iter().cloned())
            .collect();
        Ok(cfg)
    }

    /// The `ec2-asg` provider's settings for the groups that use it.
    pub fn ec2_asg(
        &self,
    ) -> Result<hatchery_scheduler::provider::ec2_asg::Ec2AsgConfig, ConfigError> {
        let e = &self.ec2_asg;
        let groups = self.groups()?;
        for name in e.asg_names.keys() {
            if !groups.iter().any(|g| &g.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "ec2_asg.asg_names: no group {name:?}"
                )));
            }
        }
        Ok(hatchery_scheduler::provider::ec2_asg::Ec2AsgConfig {
            region: e.region.clone(),
            endpoint: e.endpoint.clone(),
            groups: groups
                .into_iter()
                .filter(|g| g.provider == "ec2-asg")
                .map(|g| {
                    let asg = e
                        .asg_names
                        .get(&g.name)
                        .cloned()
                        .unwrap_or_else(|| format!("{}{}", e.asg_prefix, g.name));
                    (g, asg)
                })
                .collect(),
        })
    }

    /// The host groups (`[[groups]]`), checked: valid shapes and limits, unique names.
    pub fn groups(&self) -> Result<Vec<GroupConfig>, ConfigError> {
        let mut out: Vec<GroupConfig> = Vec::new();
        for g in &self.groups {
            let g = g.to_group().map_err(ConfigError::Invalid)?;
            if out.iter().any(|x| x.name == g.name) {
                return Err(ConfigError::Invalid(format!(
                    "group {:?} is defined twice",
                    g.name
                )));
            }
            out.push(g);
        }
        Ok(out)
    }

    /// The memory and CPUs this host has for executions (`agent.memory`, `agent.cpus`;
    /// `auto` on a host of a group: the group's shape).
    pub fn allocatable(&self) -> Result<Resources, ConfigError> {
        let mut auto = machine_allocatable(self.host_memory_max(), DEFAULT_CPU_OVERCOMMIT);
        if let Some(name) = &self.agent.group {
            if let Some(g) = self.groups()?.into_iter().find(|g| g.name == *name) {
                auto = g.shape;
            }
        }
        let memory = match self.agent.memory.trim() {
            "auto" => auto.memory_bytes,
            m => {
                let bytes = hatchery_sandbox::limits::parse_size(m)
                    .map_err(|e| ConfigError::Invalid(format!("agent.memory: {e}")))?;
                if bytes < 64 << 20 {
                    return Err(ConfigError::Invalid(
                        "agent.memory must be at least 64M".into(),
                    ));
                }
                bytes
            }
        };
        let cpus = match self.agent.cpus.trim() {
            "auto" => auto.cpus,
            c => match c.parse::<f64>() {
                Ok(n) if (0.01..=100_000.0).contains(&n) => n,
                _ => {
                    return Err(ConfigError::Invalid(format!(
                        "agent.cpus: {c:?} is not auto or a number of CPUs like 16 or 7.5"
                    )))
                }
            },
        };
        Ok(Resources::new(memory, cpus))
    }

    /// The host-wide memory ceiling, if one is set (validated at load).
    pub fn host_memory_max(&self) -> Option<u64> {
        self.agent
            .host_memory_max
            .as_deref()
            .and_then(|m| hatchery_sandbox::limits::parse_size(m).ok())
    }

    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.listen
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("listen {:?}: {e}", self.listen)))
    }

    /// `agent.drain_deadline`; `None`: no deadline.
    pub fn drain_deadline(&self) -> Option<Duration> {
        parse_deadline(&self.agent.drain_deadline).unwrap_or_default()
    }

    pub fn token_ttl(&self) -> Duration {
        parse_duration(&self.token_ttl).unwrap_or(Duration::from_secs(30 * 86400))
    }

    /// The platform rules, the default policy resolved over the built-in one.
    pub fn platform_config(&self) -> PlatformConfig {
        let d = EffectivePolicy::default();
        let p = &self.platform.default_policy;
        PlatformConfig {
            default_policy: EffectivePolicy {
                memory_bytes: p.memory_bytes.unwrap_or(d.memory_bytes),
                cpus: p.cpus.unwrap_or(d.cpus),
                pids: p.pids.unwrap_or(d.pids),
                time_limit_ms: p.time_limit_ms.unwrap_or(d.time_limit_ms),
                max_parallel: p.max_parallel.unwrap_or(d.max_parallel),
                warm_pool_size: p.warm_pool_size.unwrap_or(d.warm_pool_size),
                max_artifacts: p.max_artifacts.unwrap_or(d.max_artifacts),
                max_artifact_bytes: p.max_artifact_bytes.unwrap_or(d.max_artifact_bytes),
                groups: p.groups.clone(),
            },
            languages: self.platform.languages.clone(),
            max_code_bytes: self.platform.max_code_bytes,
            max_queued: self.platform.max_queued,
            retention_ms: parse_duration(&self.platform.retention)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(7 * 86_400_000),
            groups: self.groups().unwrap_or_default(),
            active_for: self.active_for(),
        }
    }

    /// `platform.active_for` (10 minutes when it does not parse: validation refuses it).
    pub fn active_for(&self) -> std::time::Duration {
        parse_duration(&self.platform.active_for).unwrap_or(std::time::Duration::from_secs(600))
    }

    /// The PostgreSQL store's settings, when one is configured.
    pub fn postgres(&self) -> Option<hatchery_scheduler::postgres::PgConfig> {
        let url = self.store.postgres_url.as_ref()?;
        let mut pg = hatchery_scheduler::postgres::PgConfig::new(url.clone());
        if let Some(n) = self.store.postgres_max_connections {
            pg.max_connections = n;
        }
        Some(pg)
    }

    /// Where objects are kept: the S3 bucket when one is configured, else
    /// `data_dir/objects`.
    pub fn objects(&self) -> hatchery_scheduler::node::ObjectsConfig {
        use hatchery_scheduler::node::ObjectsConfig;
        match &self.store.s3_bucket {
            Some(bucket) => ObjectsConfig::S3(hatchery_scheduler::encrypted::S3Config {
                bucket: bucket.clone(),
                region: self
                    .store
                    .s3_region
                    .clone()
                    .unwrap_or_else(|| "us-east-1".into()),
                endpoint: self.store.s3_endpoint.clone(),
                access_key_id: None,
                secret_access_key: None,
            }),
            None => ObjectsConfig::Folder(self.data_dir.join("objects")),
        }
    }

    /// The Redis bus's settings, when one is configured.
    pub fn redis(&self) -> Option<hatchery_scheduler::redis_bus::RedisConfig> {
        let url = self.store.redis_url.as_ref()?;
        let mut r = hatchery_scheduler::redis_bus::RedisConfig::new(
            url.clone(),
            format!("scheduler-{}", self.agent.name),
        );
        if let Some(p) = &self.store.redis_prefix {
            r.prefix = p.clone();
        }
        Some(r)
    }

    /// The scheduler's leadership lease (validated at load).
    /// The process's async runtime, with [`Config::worker_threads`] threads.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if self.worker_threads > 0 {
            b.worker_threads(self.worker_threads);
        }
        b.enable_all().build()
    }

    pub fn scheduler_lease(&self) -> std::time::Duration {
        parse_duration(&self.scheduler_lease).unwrap_or(std::time::Duration::from_secs(5))
    }

    /// The agent's lease (validated at load).
    pub fn lease(&self) -> std::time::Duration {
        parse_duration(&self.agent.lease).unwrap_or(std::time::Duration::from_secs(10))
    }

    pub fn keys_path(&self) -> PathBuf {
        self.data_dir.join("keys.toml")
    }
}

/// A config key for messages, with the environment variable that sets it, if any.
fn setting(key: &str) -> String {
    match ENV_VARS.iter().find(|(_, k)| *k == key) {
        Some((var, _)) => format!("{key} ({var})"),
        None => key.to_string(),
    }
}

/// Types an environment value the way the config key expects it.
fn env_value(key: &str, value: &str) -> Result<toml::Value, String> {
    const NUMERIC: &[&str] = &[
        "worker_threads",
        "body_limit_bytes",
        "agent.pool_size",
        "agent.max_pool_size",
        "agent.capacity",
        "agent.prefault_ready",
        "platform.max_code_bytes",
        "platform.max_queued",
        "platform.default_policy.max_parallel",
        "agent.host_pids_max",
        "agent.max_events",
    ];
    if key == "local_sign_in" || key == "agent.prefault" {
        match value.trim() {
            "true" | "1" | "yes" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" => Ok(toml::Value::Boolean(false)),
            _ => Err("expected true or false".into()),
        }
    } else if NUMERIC.contains(&key) {
        match value.trim().parse::<i64>() {
            Ok(n) if n < 0 => Err("must not be negative".into()),
            Ok(n) => Ok(toml::Value::Integer(n)),
            Err(e) => Err(format!("expected a whole number: {e}")),
        }
    } else {
        Ok(toml::Value::String(value.to_string()))
    }
}

fn set_path(table: &mut toml::Table, dotted: &str, value: toml::Value) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_string(), value);
}

/// `500ms`, `45s`, `15m`, `12h`, `30d`, or a number of seconds; longer than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(d)
}

/// A deadline: `none` (or empty) for none, else a duration (zero allowed).
pub fn parse_deadline(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "" | "none" => Ok(None),
        d => parse_duration_or_zero(d)
            .map(Some)
            .map_err(|e| format!("{e}, or none")),
    }
}

/// [`parse_duration`], zero allowed.
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30d, 12h, 15m, 45s or 500ms"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        other => return Err(format!("unknown unit {other:?} in {s:?} (ms, s, m, h, d)")),
    };
    let ms = ms.ok_or_else(|| format!("{s:?} is too long"))?;
    Ok(Duration::from_millis(ms))
}

/// The platform's secrets, in `<data_dir>/keys.toml` (mode 0600): the HS256 key signing
/// API tokens, and the AES-256-GCM encryption keys, by id, that seal everything a user
/// produced at rest (code, results, execution records, event logs), one of them current:
///
/// ```toml
/// signing_key = "<base64>"
/// current_key = 2
///
/// [[encryption_keys]]
/// id = 1
/// key = "<base64 of 32 bytes>"
///
/// [[encryption_keys]]
/// id = 2
/// key = "<base64 of 32 bytes>"
/// ```
///
/// New data is sealed with the current key; data is opened with the key its header
/// names, so every key that sealed data still kept must stay in the file. The single-key
/// format of earlier versions (`object_key = "<base64>"`) reads as key 1, current.
/// [`Keys::rotate`] (`hatchery admin rotate-key`) adds a fresh key and makes it current.
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub signing_key: Vec<u8>,
    /// The encryption keys by id.
    pub encryption_keys: BTreeMap<KeyId, [u8; 32]>,
    /// The key new data is sealed with.
    pub current_key: KeyId,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only, never key material.
        f.debug_struct("Keys")
            .field("current_key", &self.current_key)
            .field("key_ids", &self.encryption_keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    signing_key: String,
    /// The single-key format of earlier versions: encryption key 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    current_key: Option<KeyId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    encryption_keys: Vec<KeyEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: KeyId,
    key: String,
}

const KEYS_FILE_HEADER: &str = "\
# Hatchery's secrets, generated on first start. Keep this file private (0600) and back it
# up with the data: signing_key signs API tokens; encryption_keys seal code, results,
# execution records and event logs at rest. New data is sealed with current_key; data is
# opened with the key it names, so keep every key whose data you keep.
# `hatchery admin rotate-key` adds a fresh key and makes it current.
";

impl Keys {
    fn generate() -> Keys {
        let mut signing_key = vec![0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut signing_key);
        Keys {
            signing_key,
            encryption_keys: BTreeMap::from([(1, generate_key())]),
            current_key: 1,
        }
    }

    /// The encryption keys as the keyring the store and the object store seal with.
    pub fn keyring(&self) -> Result<Keyring, KeyringError> {
        Keyring::new(
            self.encryption_keys.iter().map(|(id, key)| (*id, *key)),
            self.current_key,
        )
    }

    /// The file's text (always in the format with key ids).
    fn to_text(&self) -> Result<String, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let file = KeysFile {
            signing_key: b64.encode(&self.signing_key),
            object_key: None,
            current_key: Some(self.current_key),
            encryption_keys: self
                .encryption_keys
                .iter()
                .map(|(id, key)| KeyEntry {
                    id: *id,
                    key: b64.encode(key),
                })
                .collect(),
        };
        let body = toml::to_string(&file).map_err(|e| e.to_string())?;
        Ok(format!("{KEYS_FILE_HEADER}{body}"))
    }

    /// Reads `path`, or creates it with fresh random keys when it does not exist. Two
    /// processes racing to create it agree: the file appears atomically (hard link of
    /// a complete temporary file) and the loser reads the winner's keys.
    pub fn load_or_create(path: &Path) -> Result<Keys, ConfigError> {
        let err = |message: String| ConfigError::Keys {
            path: path.to_path_buf(),
            message,
        };
        if path.exists() {
            return Self::read(path);
        }
        let dir = path
            .parent()
            .ok_or_else(|| err("has no parent directory".into()))?;
        // Private when we create it: the store under it holds who ran what.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
        let keys = Self::generate();
        let tmp = write_private_temp(dir, &keys.to_text().map_err(err)?).map_err(|e| {
            err(format!(
                "writing a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(keys),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::read(path),
            Err(e) => Err(err(format!("creating: {e}"))),
        }
    }

    /// Reads the keys file (either format). A file readable by others is made 0600.
    pub fn read(path: &Path) -> Result<Keys, ConfigError> {
        let err = |message: String| ConfigError::Keys {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let keys = Self::parse(&text).map_err(err)?;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
        }
        Ok(keys)
    }

    fn parse(text: &str) -> Result<Keys, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let signing_key = b64
            .decode(file.signing_key.trim())
            .map_err(|e| format!("signing_key is not base64: {e}"))?;
        if signing_key.len() < 32 {
            return Err("signing_key must be at least 32 bytes".into());
        }
        let key = |what: &str, text: &str| -> Result<[u8; 32], String> {
            b64.decode(text.trim())
                .map_err(|e| format!("{what} is not base64: {e}"))?
                .try_into()
                .map_err(|_| format!("{what} must be exactly 32 bytes"))
        };
        let (encryption_keys, current_key) = match file.object_key {
            Some(object_key) => {
                if file.current_key.is_some() || !file.encryption_keys.is_empty() {
                    return Err("has both object_key (the single-key format) and \
                                current_key/encryption_keys: keep one"
                        .into());
                }
                (BTreeMap::from([(1, key("object_key", &object_key)?)]), 1)
            }
            None => {
                let mut keys = BTreeMap::new();
                for e in &file.encryption_keys {
                    let k = key(&format!("encryption key {}", e.id), &e.key)?;
                    if keys.insert(e.id, k).is_some() {
                        return Err(format!("encryption key id {} appears twice", e.id));
                    }
                }
                let current = match (file.current_key, keys.len()) {
                    (Some(c), _) => c,
                    (None, 1) => *keys.keys().next().expect("one key"),
                    (None, 0) => return Err("holds no encryption key ([[encryption_keys]])".into()),
                    (None, _) => return Err("current_key is missing".into()),
                };
                (keys, current)
            }
        };
        let keys = Keys {
            signing_key,
            encryption_keys,
            current_key,
        };
        keys.keyring().map_err(|e| e.to_string())?;
        Ok(keys)
    }

    /// Adds a fresh random encryption key (the next id) to the keys file at `path` and
    /// makes it current; the other keys stay. The file is replaced atomically, under a
    /// lock on its directory so concurrent rotations do not lose a key. Running
    /// processes keep the keys they started with until they restart. Returns the new
    /// keys; a missing file is an error (nothing to rotate).
    pub fn rotate(path: &Path) -> Result<Keys, ConfigError> {
        let err = |message: String| ConfigError::Keys {
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            return Err(err(
                "does not exist: nothing to rotate (is data_dir right? `hatchery up` \
                 creates it on first start)"
                    .into(),
            ));
        }
        let dir = path
            .parent()
            .ok_or_else(|| err("has no parent directory".into()))?;
        let _lock =
            DirLock::exclusive(dir).map_err(|e| err(format!("locking {}: {e}", dir.display())))?;
        let mut keys = Self::read(path)?;
        let next = keys
            .encryption_keys
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .checked_add(1)
            .ok_or_else(|| err("no key id is left".into()))?;
        keys.encryption_keys.insert(next, generate_key());
        keys.current_key = next;
        let tmp = write_private_temp(dir, &keys.to_text().map_err(err)?).map_err(|e| {
            err(format!(
                "writing a temporary file in {}: {e}",
                dir.display()
            ))
        })?;
        let replaced = std::fs::rename(&tmp, path)
            .and_then(|()| std::fs::File::open(dir).and_then(|d| d.sync_all()));
        if let Err(e) = replaced {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(format!("replacing: {e}")));
        }
        Ok(keys)
    }
}

/// A new file in `dir` (mode 0600) holding `text`, synced; its path.
fn write_private_temp(dir: &Path, text: &str) -> std::io::Result<PathBuf> {
    let tmp = dir.join(format!(".keys.toml.{}", uuid::Uuid::new_v4().simple()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let written = f.write_all(text.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

/// An exclusive `flock` on a directory, released when dropped (or when the process dies).
struct DirLock(std::fs::File);

impl DirLock {
    fn exclusive(dir: &Path) -> std::io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dir)?;
        loop {
            // SAFETY: flock(2) on a descriptor we own and keep open while the lock is held.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(DirLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: flock(2) on the descriptor this guard owns; closing it would release
        // the lock as well.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration_or_zero("0s").unwrap(), Duration::ZERO);
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\n[agent]\npool_size = 1\n\
             [platform.default_policy]\nmemory_bytes = 100000000\n",
        )
        .unwrap();
        let mut env = BTreeMap::new();
        env.insert("HATCHERY_LISTEN".to_string(), "127.0.0.1:9001".to_string());
        env.insert("HATCHERY_MAX_PARALLEL".to_string(), "3".to_string());
        let c = Config::load_from(Some(&file), &env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001");
        assert_eq!(c.agent.pool_size, 1);
        assert_eq!(c.agent.capacity, AgentSection::default().capacity);
        let p = c.platform_config();
        assert_eq!(p.default_policy.memory_bytes, 100_000_000);
        assert_eq!(p.default_policy.max_parallel, 3);
        assert_eq!(p.default_policy.cpus, EffectivePolicy::default().cpus);

        std::fs::write(&file, "listn = \"x\"\n").unwrap();
        assert!(Config::load_from(Some(&file), &BTreeMap::new()).is_err());
        env.insert("HATCHERY_POOL_SIZE".to_string(), "two".to_string());
        assert!(matches!(
            Config::load_from(None, &env),
            Err(ConfigError::Env { .. })
        ));
    }

    fn invalid(file_text: &str, env: &[(&str, &str)]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(&file, file_text).unwrap();
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match Config::load_from(Some(&file), &env) {
            Ok(c) => panic!("accepted {file_text:?} {env:?}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_default_policy_that_admits_nothing_or_everything_is_refused_naming_the_setting() {
        let e = invalid("", &[("HATCHERY_MAX_PARALLEL", "0")]);
        assert_eq!(
            e,
            "invalid configuration: platform.default_policy.max_parallel \
             (HATCHERY_MAX_PARALLEL) is 0; it must be between 1 and 1000"
        );
        let e = invalid("", &[("HATCHERY_MAX_PARALLEL", "1001")]);
        assert!(
            e.contains("HATCHERY_MAX_PARALLEL") && e.contains("1001"),
            "{e}"
        );
        let e = invalid("", &[("HATCHERY_MAX_PARALLEL", "-1")]);
        assert!(
            e.contains("HATCHERY_MAX_PARALLEL") && e.contains("negative"),
            "{e}"
        );
        for (text, key) in [
            ("memory_bytes = 0", "memory_bytes"),
            ("memory_bytes = 1024", "memory_bytes"),
            ("memory_bytes = 17592186044417", "memory_bytes"),
            ("cpus = 0.0", "cpus"),
            ("cpus = -1.0", "cpus"),
            ("cpus = nan", "cpus"),
            ("cpus = inf", "cpus"),
            ("cpus = 1025.0", "cpus"),
            ("pids = 0", "pids"),
            ("pids = 2000000", "pids"),
            ("time_limit_ms = 0", "time_limit_ms"),
            ("time_limit_ms = 604800001", "time_limit_ms"),
            ("max_parallel = 0", "max_parallel"),
            ("warm_pool_size = 1001", "warm_pool_size"),
        ] {
            let e = invalid(&format!("[platform.default_policy]\n{text}\n"), &[]);
            assert!(
                e.contains(&format!("platform.default_policy.{key}")),
                "{text}: {e}"
            );
        }
        // Negative numbers never reach the policy check: the file does not parse.
        let e = invalid("[platform.default_policy]\nmemory_bytes = -5\n", &[]);
        assert!(e.contains("memory_bytes"), "{e}");
        let e = invalid("[platform]\nmax_queued = 0\n", &[]);
        assert!(
            e.contains("platform.max_queued (HATCHERY_MAX_QUEUED) is 0"),
            "{e}"
        );
        let e = invalid("", &[("HATCHERY_MAX_CODE_BYTES", "0")]);
        assert!(e.contains("platform.max_code_bytes"), "{e}");
        // Every bad field is named at once.
        let e = invalid(
            "[platform.default_policy]\ncpus = nan\npids = 1\n",
            &[("HATCHERY_MAX_PARALLEL", "0")],
        );
        assert!(
            e.contains("cpus is NaN") && e.contains("pids is 1") && e.contains("max_parallel"),
            "{e}"
        );
        // The edges are fine.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("h.toml");
        std::fs::write(
            &file,
            "[platform.default_policy]\nmax_parallel = 1000\ncpus = 1024.0\nwarm_pool_size = 0\n",
        )
        .unwrap();
        Config::load_from(Some(&file), &BTreeMap::new()).unwrap();
    }

    #[test]
    fn worker_threads_are_bounded_and_zero_means_one_per_cpu() {
        let e = invalid("", &[("HATCHERY_WORKER_THREADS", "5000")]);
        assert!(e.contains("worker_threads") && e.contains("5000"), "{e}");
        let env: BTreeMap<String, String> = [("HATCHERY_WORKER_THREADS".into(), "1".into())]
            .into_iter()
            .collect();
        let cfg = Config::load_from(None, &env).unwrap();
        assert_eq!(cfg.worker_threads, 1);
        cfg.runtime().unwrap();
        Config::default().runtime().unwrap();
        assert_eq!(Config::default().worker_threads, 0);
    }

    #[test]
    fn prefault_is_on_by_default_and_the_environment_turns_it_off() {
        assert!(Config::default().agent.prefault);
        let env: BTreeMap<String, String> = [("HATCHERY_PREFAULT".into(), "false".into())]
            .into_iter()
            .collect();
        assert!(!Config::load_from(None, &env).unwrap().agent.prefault);
        let e = invalid("", &[("HATCHERY_PREFAULT", "sometimes")]);
        assert!(
            e.contains("HATCHERY_PREFAULT") && e.contains("true or false"),
            "{e}"
        );
        assert_eq!(Config::default().agent.prefault_ready, 1);
        let env: BTreeMap<String, String> = [("HATCHERY_PREFAULT_READY".into(), "6".into())]
            .into_iter()
            .collect();
        assert_eq!(
            Config::load_from(None, &env).unwrap().agent.prefault_ready,
            6
        );
        let e = invalid("", &[("HATCHERY_PREFAULT_READY", "-2")]);
        assert!(e.contains("HATCHERY_PREFAULT_READY"), "{e}");
    }

    #[test]
    fn a_drain_has_no_deadline_by_default_and_takes_one_from_the_environment() {
        assert_eq!(Config::default().drain_deadline(), None);
        let load = |v: &str| {
            let env: BTreeMap<String, String> = [("HATCHERY_DRAIN_DEADLINE".into(), v.into())]
                .into_iter()
                .collect();
            Config::load_from(None, &env).map(|c| c.drain_deadline())
        };
        assert_eq!(load("10m").unwrap(), Some(Duration::from_secs(600)));
        assert_eq!(load("0s").unwrap(), Some(Duration::ZERO));
        assert_eq!(load("none").unwrap(), None);
        let e = invalid("", &[("HATCHERY_DRAIN_DEADLINE", "soon")]);
        assert!(e.contains("drain_deadline") && e.contains("none"), "{e}");
    }

    #[test]
    fn host_groups_are_read_and_checked_and_a_host_of_a_group_has_its_shape() {
        let text = r#"
[agent]
group = "big"
[[groups]]
name = "small"
memory = "1G"
cpus = 1
[[groups]]
name = "big"
memory = "8G"
cpus = 2.5
min = 1
max = 3
scale_down_after = "30s"
"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.toml");
        std::fs::write(&path, text).unwrap();
        let cfg = Config::load_from(Some(&path), &BTreeMap::new()).unwrap();
        let groups = cfg.groups().unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[1].shape, Resources::new(8 << 30, 2.5));
        assert_eq!((groups[1].min, groups[1].max), (1, 3));
        assert_eq!(groups[1].scale_down_after, Duration::from_secs(30));
        assert_eq!(groups[0].languages, ["r"]);
        assert_eq!(cfg.platform_config().groups, groups);
        // A host of the group has the group's shape unless told otherwise.
        assert_eq!(cfg.allocatable().unwrap(), Resources::new(8 << 30, 2.5));
        let env: BTreeMap<String, String> =
            [("HATCHERY_CPUS".into(), "2".into())].into_iter().collect();
        let told = Config::load_from(Some(&path), &env).unwrap();
        assert_eq!(told.allocatable().unwrap(), Resources::new(8 << 30, 2.0));
        for (bad, why) in [
            ("[agent]\ngroup = \"nope\"\n", "not one of the [[groups]]"),
            (
                "[[groups]]\nname = \"a\"\n[[groups]]\nname = \"a\"\n",
                "defined twice",
            ),
            ("[[groups]]\nname = \"a b\"\n", "letters, digits"),
            (
                "[[groups]]\nname = \"a\"\nmin = 3\nmax = 2\n",
                "at most max",
            ),
            (
                "[[groups]]\nname = \"a\"\nmemory = \"1M\"\n",
                "at least 64M",
            ),
            ("[[groups]]\nname = \"a\"\ncpus = 0\n", "cpus"),
            (
                "[[groups]]\nname = \"a\"\nprovider = \"ec2\"\n",
                "expected static",
            ),
            (
                "[[groups]]\nname = \"a\"\ncooldown_up = \"soon\"\n",
                "cooldown_up",
            ),
        ] {
            let e = invalid(bad, &[]);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("hatchery.example.toml");
        let c = Config::load_from(Some(&path), &BTreeMap::new()).unwrap();
        let d = Config::default();
        assert_eq!(
            c.platform_config().default_policy,
            EffectivePolicy::default()
        );
        assert_eq!(
            Config {
                platform: PlatformSection {
                    default_policy: Policy::default(),
                    ..c.platform.clone()
                },
                ..c
            },
            d
        );
    }

    #[test]
    fn keys_are_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keys.toml");
        let a = Keys::load_or_create(&path).unwrap();
        let b = Keys::load_or_create(&path).unwrap();
        assert_eq!(a, b);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.current_key, 1);
        assert_eq!(a.encryption_keys.len(), 1);
        assert_eq!(a.keyring().unwrap().ids(), vec![1]);
    }

    const SIGNING: &str = "c2lnbmluZy1rZXktb2YtYXQtbGVhc3QtMzItYnl0ZXMtbG9uZw==";
    const KEY_A: [u8; 32] = [0x11; 32];

    fn b64(k: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    #[test]
    fn the_single_key_format_reads_as_key_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(
            &path,
            format!(
                "signing_key = \"{SIGNING}\"\nobject_key = \"{}\"\n",
                b64(&KEY_A)
            ),
        )
        .unwrap();
        let k = Keys::read(&path).unwrap();
        assert_eq!(k.current_key, 1);
        assert_eq!(k.encryption_keys, BTreeMap::from([(1, KEY_A)]));
        // A keys file readable by others is made private.
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn rotation_adds_a_current_key_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        assert!(matches!(Keys::rotate(&path), Err(ConfigError::Keys { .. })));
        std::fs::write(
            &path,
            format!(
                "signing_key = \"{SIGNING}\"\nobject_key = \"{}\"\n",
                b64(&KEY_A)
            ),
        )
        .unwrap();
        let before = Keys::read(&path).unwrap();
        let r = Keys::rotate(&path).unwrap();
        assert_eq!(r.current_key, 2);
        assert_eq!(r.encryption_keys[&1], KEY_A);
        assert_ne!(r.encryption_keys[&2], KEY_A);
        assert_eq!(r.signing_key, before.signing_key);
        assert_eq!(Keys::read(&path).unwrap(), r);
        let r3 = Keys::rotate(&path).unwrap();
        assert_eq!(r3.current_key, 3);
        assert_eq!(r3.keyring().unwrap().ids(), vec![1, 2, 3]);
        assert_eq!(r3.encryption_keys[&2], r.encryption_keys[&2]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("current_key = 3"), "{text}");
        assert!(!text.contains("object_key"), "{text}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Key material never shows in Debug.
        let dbg = format!("{r3:?}");
        assert_eq!(dbg, "Keys { current_key: 3, key_ids: [1, 2, 3], .. }");
    }

    #[test]
    fn concurrent_rotations_lose_no_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        Keys::load_or_create(&path).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || Keys::rotate(&path).unwrap().current_key)
            })
            .collect();
        let mut ids: Vec<KeyId> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, vec![2, 3, 4, 5]);
        let k = Keys::read(&path).unwrap();
        assert_eq!(k.current_key, 5);
        assert_eq!(k.encryption_keys.len(), 5);
    }

    #[test]
    fn bad_keys_files_are_refused_with_the_reason() {
        let a = b64(&KEY_A);
        let cases = [
            (
                format!("signing_key = \"{SIGNING}\"\n"),
                "no encryption key",
            ),
            (
                format!("signing_key = \"{SIGNING}\"\nobject_key = \"{a}\"\ncurrent_key = 1\n"),
                "keep one",
            ),
            (
                format!(
                    "signing_key = \"{SIGNING}\"\ncurrent_key = 2\n\
                     [[encryption_keys]]\nid = 1\nkey = \"{a}\"\n"
                ),
                "current key 2 is not in the keyring",
            ),
            (
                format!(
                    "signing_key = \"{SIGNING}\"\n\
                     [[encryption_keys]]\nid = 1\nkey = \"{a}\"\n\
                     [[encryption_keys]]\nid = 2\nkey = \"{a}\"\n"
                ),
                "current_key is missing",
            ),
            (
                format!(
                    "signing_key = \"{SIGNING}\"\ncurrent_key = 1\n\
                     [[encryption_keys]]\nid = 1\nkey = \"{a}\"\n\
                     [[encryption_keys]]\nid = 1\nkey = \"{a}\"\n"
                ),
                "appears twice",
            ),
            (
                format!(
                    "signing_key = \"{SIGNING}\"\ncurrent_key = 1\n\
                     [[encryption_keys]]\nid = 1\nkey = \"c2hvcnQ=\"\n"
                ),
                "exactly 32 bytes",
            ),
        ];
        for (text, want) in cases {
            let e = Keys::parse(&text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains(&a), "the error shows a key: {e}");
        }
        // The new format with one key needs no current_key.
        let k = Keys::parse(&format!(
            "signing_key = \"{SIGNING}\"\n[[encryption_keys]]\nid = 7\nkey = \"{a}\"\n"
        ))
        .unwrap();
        assert_eq!(k.current_key, 7);
    }
}
