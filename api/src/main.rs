//! `hatchery`: the platform's binary, one subcommand per role.
//!
//! * `hatchery up` — the whole platform in one process on this machine: the embedded
//!   node (store, bus, encrypted objects, scheduler, one agent with its warm pools) and
//!   the HTTP + WebSocket API.
//! * `hatchery token create` — prints a bearer token signed with the platform's key.
//! * `hatchery admin rotate-key` — adds a fresh encryption key to `<data_dir>/keys.toml`
//!   and makes it current, keeping the older ones.
//! * `hatchery api | scheduler | agent` — the roles as separate processes, sharing
//!   PostgreSQL, Redis and the objects folder (see the README's cluster section).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hatchery_api::auth::{parse_role, Auth};
use hatchery_api::config::{parse_duration, Config, Keys, LogFormat};
use hatchery_api::console::{LocalSignIn, SignInAs};
use hatchery_api::local_cluster::{ClusterSpec, LocalCluster};
use hatchery_api::sim::{default_groups, Sim, SimError, SimSpec};
use hatchery_api::{ApiServer, ServerOptions};
use hatchery_scheduler::agent::{AgentConfig, LanguageConfig};
use hatchery_scheduler::model::Role;
use hatchery_scheduler::node::{EmbeddedNode, Engines, NodeConfig};
use hatchery_scheduler::provider::ec2_asg::Ec2AsgProvider;
use hatchery_scheduler::provider::netns::NetnsProvider;
use hatchery_scheduler::provider::qemu::QemuProvider;
use hatchery_scheduler::provider::{Provider, ProviderError};
use hatchery_scheduler::scaler::{ProviderSource, Scaling};

#[derive(Parser)]
#[command(
    name = "hatchery",
    version,
    about = "Hatchery: runs untrusted code (R first) in warm, single-use sandboxes",
    after_help = "Configuration: defaults, overridden by the TOML file (--config, else ./hatchery.toml \
                  when present), overridden by HATCHERY_* environment variables \
                  (HATCHERY_LISTEN, HATCHERY_DATA_DIR, HATCHERY_ROOTFS, HATCHERY_LOG_FORMAT, \
                  HATCHERY_POOL_SIZE, HATCHERY_CAPACITY, HATCHERY_MAX_PARALLEL, ...). Logs go to \
                  stderr (RUST_LOG filters them; HATCHERY_LOG_FORMAT=json for JSON)."
)]
struct Cli {
    /// TOML configuration file (default: ./hatchery.toml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole platform on this machine (API, scheduler, one agent with warm
    /// pools; embedded store, bus and encrypted object store) and print tokens to try it.
    Up,
    /// Manage bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Administer this machine's platform data (the data_dir of the config).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Follow an execution's events over the API's WebSocket and print them as JSON lines
    /// (a minimal WebSocket client, so trying the platform needs nothing but curl and
    /// this binary). Exits when the execution has finished: 0 if it succeeded, 1
    /// otherwise.
    Watch {
        /// The execution's id (from `POST /v1/executions`).
        id: String,
        /// Bearer token (default: $HATCHERY_TOKEN).
        #[arg(long, env = "HATCHERY_TOKEN", hide_env_values = true)]
        token: String,
        /// The API's base URL.
        #[arg(long, env = "HATCHERY_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Resume after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Start a whole cluster on this machine, every role its own process: a private
    /// PostgreSQL, Redis and S3 (moto), schedulers, agents and API replicas (as root;
    /// the engines are installed by scripts/setup-deps.sh). Prints where the API listens
    /// and tokens to try it; Ctrl-C stops everything and removes what it made.
    Cluster {
        /// API replicas (listening on consecutive ports from --port).
        #[arg(long, default_value_t = 2)]
        apis: usize,
        #[arg(long, default_value_t = 2)]
        schedulers: usize,
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// Executions each agent runs at once.
        #[arg(long, default_value_t = 4)]
        capacity: u32,
        /// Warm sandboxes each agent keeps.
        #[arg(long, default_value_t = 2)]
        pool_size: u32,
        /// The first API replica's port (0: any free port).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Keep the config, keys and logs in this folder (default: a temporary one,
        /// removed on exit).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Start the whole architecture on this machine, hosts included: a private
    /// PostgreSQL, Redis and S3 (moto), an API replica and a scheduler whose autoscaler
    /// makes hosts as demand comes (each a network namespace on a bridge with a cgroup
    /// of its group's shape and its own agent; with --provider qemu a Linux VM; with
    /// --provider ec2-asg an instance of an EC2 Auto Scaling group emulated by moto) and
    /// removes them when they are not needed. Two groups: small (1 GiB, 1 CPU) and big (8 GiB, 2 CPUs), from zero
    /// hosts. As root. Prints where the API listens and tokens, then hosts joining,
    /// draining and leaving; Ctrl-C stops everything and removes what it made.
    Sim(SimArgs),
    /// Run only the HTTP + WebSocket API role (stateless: run several). Needs
    /// store.postgres_url, store.redis_url and the cluster's keys file.
    Api,
    /// Run only the scheduler role (placement and retention). Needs store.postgres_url,
    /// store.redis_url and the cluster's keys file.
    Scheduler,
    /// Run only this host's agent role (warm pools, executions; as root). Needs
    /// store.postgres_url, store.redis_url and the cluster's keys file; agent.name
    /// (HATCHERY_AGENT_NAME) must be unique and stable per host.
    Agent,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a token signed with the platform's key (<data_dir>/keys.toml, created if
    /// absent).
    Create {
        #[arg(long)]
        org: String,
        #[arg(long)]
        user: String,
        /// user, org_admin or superadmin.
        #[arg(long, default_value = "user", value_parser = parse_role)]
        role: Role,
        /// Lifetime, e.g. 30d, 12h, 15m.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        ttl: Duration,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Add a fresh encryption key to <data_dir>/keys.toml and make it current. The older
    /// keys stay, so everything sealed with them stays readable; a running platform keeps
    /// sealing with the key it started with until it is restarted. Prints key ids, never
    /// keys.
    RotateKey,
}

fn main() -> ExitCode {
    // What the platform writes under its data dir is private (R15): files 0600, folders
    // 0700, also those libraries create with default modes (the object store's). The
    // sandbox runtime sets its own umask for what it creates.
    // SAFETY: umask(2) only sets this process's file-mode creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up => up(cli.config.as_deref()),
        Command::Token {
            command:
                TokenCommand::Create {
                    org,
                    user,
                    role,
                    ttl,
                },
        } => token_create(cli.config.as_deref(), &org, &user, role, ttl),
        Command::Admin {
            command: AdminCommand::RotateKey,
        } => rotate_key(cli.config.as_deref()),
        Command::Watch {
            id,
            token,
            url,
            after,
        } => match watch(&id, &token, &url, after) {
            Ok(true) => return ExitCode::SUCCESS,
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Cluster {
            apis,
            schedulers,
            agents,
            capacity,
            pool_size,
            port,
            dir,
        } => {
            let mut spec = ClusterSpec::new(PathBuf::new(), PathBuf::new());
            spec.apis = apis;
            spec.schedulers = schedulers;
            spec.agents = agents;
            spec.agent_capacity = capacity;
            spec.pool_size = pool_size;
            spec.first_port = port;
            spec.dir = dir;
            local_cluster(cli.config.as_deref(), spec)
        }
        Command::Sim(args) => sim(cli.config.as_deref(), args),
        Command::Api => cluster_role(cli.config.as_deref(), ClusterRole::Api),
        Command::Scheduler => cluster_role(cli.config.as_deref(), ClusterRole::Scheduler),
        Command::Agent => cluster_role(cli.config.as_deref(), ClusterRole::Agent),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hatchery: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token_create(
    config: Option<&Path>,
    org: &str,
    user: &str,
    role: Role,
    ttl: Duration,
) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let keys = Keys::load_or_create(&cfg.keys_path())?;
    let token = Auth::new(&keys.signing_key)
        .mint(org, user, role, ttl)
        .map_err(anyhow::Error::msg)?;
    println!("{token}");
    Ok(())
}

fn rotate_key(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    let path = cfg.keys_path();
    let keys = Keys::rotate(&path)?;
    let ids: Vec<String> = keys
        .encryption_keys
        .keys()
        .map(|id| id.to_string())
        .collect();
    println!(
        "encryption key {current} added to {path} and made current (keys kept: {ids}).\n\
         Restart `hatchery up` to seal new data with it; data sealed with the older keys \
         stays readable while they are in the file.",
        current = keys.current_key,
        path = path.display(),
        ids = ids.join(", "),
    );
    Ok(())
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn agent_config(cfg: &Config) -> AgentConfig {
    let mut a = AgentConfig::new(cfg.agent.name.clone());
    a.capacity = cfg.agent.capacity;
    a.rootfs = cfg.rootfs.clone();
    a.languages = cfg
        .platform
        .languages
        .iter()
        .map(|name| LanguageConfig {
            name: name.clone(),
            packages: match name.as_str() {
                "r" => cfg.agent.r_packages.clone(),
                "python" => cfg.agent.python_packages.clone(),
                _ => Vec::new(),
            },
            pool_size: cfg.agent.pool_size,
        })
        .collect();
    if let Some(c) = &cfg.agent.cgroup_parent {
        a.cgroup_parent = c.clone();
    }
    if let Some(p) = &cfg.agent.sandbox_bin {
        a.sandbox_bin = p.clone();
    }
    if let Some(p) = &cfg.agent.zygote_bin {
        a.zygote_bin = p.clone();
    }
    a.drain_deadline = cfg.drain_deadline();
    a.max_pool_size = cfg.agent.max_pool_size.max(cfg.agent.pool_size);
    a.prefault = cfg.agent.prefault;
    a.prefault_ready = cfg.agent.prefault_ready;
    a.output_limit = cfg.output_limit();
    a.max_events = cfg.agent.max_events;
    a.lease = cfg.lease();
    a.host_memory_max = cfg.host_memory_max();
    a.allocatable = cfg.allocatable().unwrap_or(a.allocatable);
    a.group = cfg.agent.group.clone();
    a.host_pids_max = cfg.agent.host_pids_max;
    a.default_policy = cfg.platform_config().default_policy;
    a.demand_window = cfg.active_for();
    a
}

/// What `up` needs before it starts anything, with the fix for each.
fn preflight(cfg: &Config, agent: &AgentConfig) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`hatchery up` creates cgroups and namespaces: run it as root");
    }
    if !cfg.rootfs.is_dir() {
        bail!(
            "the sandbox root filesystem {} does not exist: build it with `scripts/up.sh` \
             (or rootfs-builder), or point HATCHERY_ROOTFS at one",
            cfg.rootfs.display()
        );
    }
    for bin in [&agent.sandbox_bin, &agent.zygote_bin] {
        if !bin.is_file() {
            bail!(
                "{} does not exist: build it with `cargo build -p hatchery-sandbox` (same \
                 profile as hatchery), or set agent.sandbox_bin / agent.zygote_bin",
                bin.display()
            );
        }
    }
    Ok(())
}

/// Raises the soft limit of open files to the hard one (see
/// [`hatchery_api::limits::raise_open_files_limit`]) and logs it; a refusal is logged and
/// the process goes on with the limit it has.
fn open_files_limit() {
    match hatchery_api::limits::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "open files limit raised")
        }
        Ok((_, limit)) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
}

fn up(config: Option<&Path>) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    init_logs(cfg.log_format);
    open_files_limit();
    let agent = agent_config(&cfg);
    preflight(&cfg, &agent)?;
    let keys = Keys::load_or_create(&cfg.keys_path())?;
    tracing::info!(
        current = keys.current_key,
        keys = keys.encryption_keys.len(),
        "encryption keys loaded"
    );
    let runtime = cfg.runtime().context("starting the async runtime")?;
    runtime.block_on(run_up(cfg, agent, keys))
}

async fn run_up(cfg: Config, agent: AgentConfig, keys: Keys) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen_addr()?)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let node = EmbeddedNode::start(NodeConfig {
        data_dir: cfg.data_dir.clone(),
        agent,
        platform: cfg.platform_config(),
        keyring: keys
            .keyring()
            .with_context(|| format!("keys file {}", cfg.keys_path().display()))?,
        postgres: cfg.postgres(),
        redis: cfg.redis(),
        s3: match cfg.objects() {
            hatchery_scheduler::node::ObjectsConfig::S3(s3) => Some(s3),
            hatchery_scheduler::node::ObjectsConfig::Folder(_) => None,
        },
    })
    .await
    .context("starting the platform")?;
    let auth = Auth::new(&keys.signing_key);
    // The console's one-click sign-in, for a browser on this machine only.
    let local_sign_in = (cfg.local_sign_in && addr.ip().is_loopback()).then(|| LocalSignIn {
        auth: auth.clone(),
        ttl: cfg.token_ttl(),
    });
    print_banner(&cfg, addr, &auth, local_sign_in.is_some())?;

    let server = ApiServer::new(
        node.platform(),
        auth,
        ServerOptions {
            body_limit: cfg.body_limit_bytes,
            local_sign_in,
            ..ServerOptions::default()
        },
    );
    // The API serves on while the host drains (clients follow their executions to the
    // end), and stops after it.
    let mut signals = StopSignals::new()?;
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = server.run(listener, async {
        let _ = api_stopped.await;
    });
    tokio::pin!(serve);
    // Resolves only if the warm pools cannot start.
    let failed = async {
        match node.wait_ready(Duration::from_secs(300)).await {
            Ok(()) => {
                tracing::info!("ready: every warm pool has a frozen sandbox");
                std::future::pending().await
            }
            Err(e) => e,
        }
    };
    let early = tokio::select! {
        r = &mut serve => {
            tracing::error!("the API stopped; shutting down");
            Some(r)
        }
        e = failed => {
            tracing::error!(error = %e, "the warm pools could not start; shutting down");
            node.shutdown().await;
            bail!("the warm pools could not start: {e}");
        }
        first = signals.next() => {
            tracing::info!("{first}: draining, then stopping the platform");
            None
        }
    };
    let forcer = node.agent().forcer();
    drain_then(forcer, node.shutdown(), &mut signals).await;
    let served = match early {
        Some(r) => r,
        None => {
            let _ = stop_api.send(());
            serve.await
        }
    };
    tracing::info!("stopped");
    served.context("serving the API")
}

/// SIGTERM and SIGINT, as many as come.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("installing a SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing a SIGINT handler")?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Runs `shutdown` (a drain, then the stop); a signal meanwhile forces the drain: what
/// still runs is killed and ends `lost`, saying so.
async fn drain_then(
    forcer: hatchery_scheduler::agent::Forcer,
    shutdown: impl std::future::Future<Output = ()>,
    signals: &mut StopSignals,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            again = signals.next() => {
                tracing::warn!("{again} again: forcing the drain; running executions are killed and end lost");
                forcer.force();
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ClusterRole {
    Api,
    Scheduler,
    Agent,
}

/// `hatchery api | scheduler | agent`: one role of a cluster, on the shared engines.
/// `hatchery cluster`: a whole cluster in the foreground until SIGINT/SIGTERM.
fn local_cluster(config: Option<&Path>, mut spec: ClusterSpec) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    init_logs(cfg.log_format);
    spec.bin = std::env::current_exe().context("finding the hatchery binary")?;
    spec.rootfs = cfg.rootfs.clone();
    // Two local clusters on one machine never share a cgroup parent.
    spec.cgroup_prefix = format!("cluster-{}", std::process::id());
    let agent = agent_config(&cfg);
    preflight(&cfg, &agent)?;
    if spec.apis == 0 || spec.schedulers == 0 || spec.agents == 0 {
        bail!("a cluster needs at least one API replica, one scheduler and one agent");
    }
    // SIGINT and SIGTERM are caught before anything starts, so that no signal can kill
    // this process half-way and leave the engines behind (they only raise a flag; the
    // processes started later get the default dispositions back at exec).
    catch_stop_signals()?;
    eprintln!("hatchery: starting PostgreSQL, Redis, moto (S3) and the roles ...");
    let mut cluster = LocalCluster::start(spec).map_err(|e| {
        if e.is_missing_engine() {
            anyhow::anyhow!("{e}\n(scripts/setup-deps.sh installs the engines)")
        } else {
            anyhow::Error::new(e)
        }
    })?;
    let user = cluster.token("demo", "alice", "user")?;
    let admin = cluster.token("hatchery", "root", "superadmin")?;
    let addrs = cluster.api_addrs();
    for addr in &addrs {
        println!("hatchery: listening on http://{addr}");
    }
    println!(
        "\nA cluster of {apis} API replica(s), {schedulers} scheduler(s) and {agents} agent(s) \
         on a private PostgreSQL ({pg}), Redis ({redis}) and S3 ({s3}).\n\
         Config, keys and each process's log: {dir}\n\n\
         A user's token:        {user}\n\
         A superadmin's token:  {admin}\n\n\
         Try it (any replica serves any execution):\n  \
         curl -s -H \"Authorization: Bearer {user}\" -H 'Content-Type: application/json' \\\n    \
         -d '{{\"language\":\"r\",\"code\":\"sum(1:10)\"}}' http://{first}/v1/executions\n\n\
         Ctrl-C stops the cluster.",
        apis = addrs.len(),
        schedulers = cluster.spec().schedulers,
        agents = cluster.spec().agents,
        pg = cluster.postgres.url("hatchery"),
        redis = cluster.redis.url(),
        s3 = cluster.moto.endpoint(),
        dir = cluster.dir().display(),
        first = addrs[0],
    );
    // Wait for a signal, reporting any process that dies on its own meanwhile.
    let mut reported = std::collections::BTreeSet::new();
    loop {
        if stop_signal_pending() {
            break;
        }
        report_stopped(&mut cluster, &mut reported);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("hatchery: stopping the cluster ...");
    cluster.stop();
    drop(cluster);
    eprintln!("hatchery: stopped");
    Ok(())
}

/// `hatchery sim`'s options.
#[derive(clap::Args)]
struct SimArgs {
    /// The API's port (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// How long a host must be empty before it is drained and removed.
    #[arg(long, default_value = "30s")]
    scale_down_after: String,
    /// How long making a host takes before its agent starts.
    #[arg(long, default_value = "2s")]
    launch_delay: String,
    /// How long after its last submission a user keeps room (and warm sandboxes)
    /// for its next runs; then its hosts may drain.
    #[arg(long, default_value = "1m")]
    active_for: String,
    /// The bridge hosts are attached to, and its /24 (the bridge is .1).
    #[arg(long, default_value = "hatchery0")]
    bridge: String,
    #[arg(long, default_value = "10.213.0.0")]
    network: std::net::Ipv4Addr,
    /// Who makes the hosts: `netns` (a network namespace and a cgroup each), `qemu`
    /// (a Linux VM each, pure cgroup v2: KVM when it works, else software emulation,
    /// where a host takes tens of seconds to join) or `ec2-asg` (the production
    /// provider, driving EC2 Auto Scaling groups emulated by moto, whose instances
    /// become network-namespace hosts).
    #[arg(long, default_value = "netns", value_parser = ["netns", "qemu", "ec2-asg"])]
    provider: String,
}

fn sim(config: Option<&Path>, args: SimArgs) -> anyhow::Result<()> {
    let SimArgs {
        port,
        scale_down_after,
        launch_delay,
        active_for,
        bridge,
        network,
        provider,
    } = args;
    let (scale_down_after, launch_delay, active_for) =
        (&*scale_down_after, &*launch_delay, &*active_for);
    let cfg = Config::load(config)?;
    init_logs(cfg.log_format);
    let agent = agent_config(&cfg);
    preflight(&cfg, &agent)?;
    parse_duration(scale_down_after).map_err(|e| anyhow::anyhow!("--scale-down-after: {e}"))?;
    let mut spec = SimSpec::new(
        std::env::current_exe().context("finding the hatchery binary")?,
        cfg.rootfs.clone(),
    );
    spec.port = port;
    spec.groups = default_groups(&provider, scale_down_after);
    spec.provider = provider;
    spec.launch_delay = hatchery_api::config::parse_duration_or_zero(launch_delay)
        .map_err(|e| anyhow::anyhow!("--launch-delay: {e}"))?;
    spec.active_for =
        parse_duration(active_for).map_err(|e| anyhow::anyhow!("--active-for: {e}"))?;
    spec.bridge = bridge;
    spec.network = network;
    // Caught before anything starts: no signal can leave the engines or hosts behind.
    catch_stop_signals()?;
    eprintln!("hatchery: starting PostgreSQL, Redis, moto (S3), the scheduler and the API ...");
    let mut sim = Sim::start(spec).map_err(|e| match e {
        SimError::Cluster(e) if e.is_missing_engine() => {
            anyhow::anyhow!("{e}\n(scripts/setup-deps.sh installs the engines)")
        }
        e => anyhow::Error::new(e),
    })?;
    let user = sim.cluster.token("demo", "alice", "user")?;
    let admin = sim.cluster.token("hatchery", "root", "superadmin")?;
    let addr = sim.api_addr();
    println!("hatchery: listening on http://{addr}");
    println!(
        "\nThe whole architecture on this machine: PostgreSQL, Redis and S3 (moto) on bridge \
         {bridge} ({net}/24), an API replica and a scheduler. Hosts ({hosts}) are made as demand \
         comes: groups small (1 GiB, 1 CPU) and big (8 GiB, 2 CPUs), none at first; empty hosts are \
         drained and removed after {after}, except those keeping room for the warm runs of a \
         user who submitted in the last {active_for}.\n\
         Config, keys and each process's log: {dir}\n\n\
         A user's token:        {user}\n\
         A superadmin's token:  {admin}\n\n\
         Try it (the first execution waits for a host to be made):\n  \
         curl -s -H \"Authorization: Bearer {user}\" -H 'Content-Type: application/json' \\\n    \
         -d '{{\"language\":\"r\",\"code\":\"sum(1:10)\"}}' http://{addr}/v1/executions\n\
         Hosts: curl -s -H \"Authorization: Bearer {admin}\" http://{addr}/v1/admin/hosts\n\n\
         Ctrl-C stops everything and removes what it made.\n",
        bridge = sim.spec().bridge,
        net = sim.spec().network,
        hosts = match sim.spec().provider.as_str() {
            "qemu" => "Linux VMs with a pure cgroup v2 kernel, under qemu",
            "ec2-asg" => {
                "instances of EC2 Auto Scaling groups hatchery-small and hatchery-big, \
                 emulated by moto, each run as a network namespace with a cgroup of its \
                 group's shape"
            }
            _ => "network namespaces, each with a cgroup of its group's shape",
        },
        after = scale_down_after,
        active_for = active_for,
        dir = sim.cluster.dir().display(),
    );
    // Tell what the autoscaler does as it does it, until a signal.
    let log = sim.scheduler_log();
    let mut read = 0usize;
    let mut reported = std::collections::BTreeSet::new();
    while !stop_signal_pending() {
        if let Ok(text) = std::fs::read_to_string(&log) {
            if text.len() >= read {
                for line in text[read..].lines() {
                    if let Some((_, said)) = line.split_once("autoscaler: ") {
                        println!("{} {said}", chrono_now());
                    }
                }
                read = text.len();
            }
        }
        report_stopped(&mut sim.cluster, &mut reported);
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("hatchery: stopping: the API, the scheduler, then every host ...");
    sim.stop(Duration::from_secs(5));
    let left = sim.leftovers();
    drop(sim);
    if left.is_empty() {
        eprintln!("hatchery: stopped; nothing is left behind");
        Ok(())
    } else {
        bail!("stopped, but these are left behind: {}", left.join(", "))
    }
}

/// The wall clock's time of day (UTC), for what `hatchery sim` reports.
fn chrono_now() -> String {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Says once of each process of `cluster` that stopped on its own, with its log's end.
fn report_stopped(cluster: &mut LocalCluster, reported: &mut std::collections::BTreeSet<String>) {
    for p in cluster.procs.iter_mut() {
        if !p.is_running() && reported.insert(p.name.clone()) {
            eprintln!(
                "hatchery: {} stopped; its log ({}) ends with:\n{}",
                p.name,
                p.log.display(),
                p.log_tail(10)
            );
        }
    }
}

/// Set by SIGINT or SIGTERM once [`catch_stop_signals`] ran.
static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn catch_stop_signals() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(request_stop),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("catching {signal}"))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`catch_stop_signals`].
fn stop_signal_pending() -> bool {
    STOP_REQUESTED.load(std::sync::atomic::Ordering::SeqCst)
}

fn cluster_role(config: Option<&Path>, role: ClusterRole) -> anyhow::Result<()> {
    let cfg = Config::load(config)?;
    init_logs(cfg.log_format);
    open_files_limit();
    let (Some(postgres), Some(redis)) = (cfg.postgres(), cfg.redis()) else {
        bail!(
            "a role on its own needs the cluster's engines: set store.postgres_url \
             (HATCHERY_POSTGRES_URL) and store.redis_url (HATCHERY_REDIS_URL), or run every \
             role in one process with `hatchery up`"
        );
    };
    let keys_path = cfg.keys_path();
    let keys = Keys::read(&keys_path).with_context(|| {
        format!(
            "the cluster's keys file {} (every process of a cluster uses the same one: \
             create it once, e.g. with `hatchery token create`, and give it to each)",
            keys_path.display()
        )
    })?;
    let agent = agent_config(&cfg);
    if role == ClusterRole::Agent {
        preflight(&cfg, &agent)?;
    }
    let runtime = cfg.runtime().context("starting the async runtime")?;
    runtime.block_on(async move {
        let keyring = keys
            .keyring()
            .with_context(|| format!("keys file {}", keys_path.display()))?;
        // Only an API replica streams events and shows host statuses from its start; a
        // scheduler reads statuses once it leads, an agent reads neither.
        let redis = hatchery_scheduler::redis_bus::RedisConfig {
            read_at_connect: role == ClusterRole::Api,
            ..redis
        };
        let engines = Engines::connect(&postgres, redis, &cfg.objects(), keyring)
            .await
            .context("connecting to the cluster's engines")?;
        match role {
            ClusterRole::Api => {
                let listener = tokio::net::TcpListener::bind(cfg.listen_addr()?)
                    .await
                    .with_context(|| format!("listening on {}", cfg.listen))?;
                let addr = listener.local_addr()?;
                let platform = engines.platform(cfg.platform_config())?;
                println!("hatchery: listening on http://{addr}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
                let server = ApiServer::new(
                    platform,
                    Auth::new(&keys.signing_key),
                    ServerOptions {
                        body_limit: cfg.body_limit_bytes,
                        ..ServerOptions::default()
                    },
                );
                server
                    .run(listener, shutdown_signal())
                    .await
                    .context("serving the API")
            }
            ClusterRole::Scheduler => {
                let (scaling, providers) = scaling(&cfg, config)?.unzip();
                tracing::info!(autoscaling = scaling.is_some(), "scheduler started");
                let ran = engines
                    .run_scheduler(
                        cfg.platform_config(),
                        &cfg.agent.name,
                        cfg.scheduler_lease(),
                        scaling,
                        shutdown_signal(),
                    )
                    .await
                    .context("running the scheduler");
                if let Some(providers) = providers {
                    providers.stop_vms(VM_HOSTS_GRACE).await;
                }
                ran
            }
            ClusterRole::Agent => {
                let mut signals = StopSignals::new()?;
                let handle = engines
                    .start_agent(agent)
                    .await
                    .context("starting the agent")?;
                tracing::info!(agent = %cfg.agent.name, "agent started");
                let first = signals.next().await;
                tracing::info!("{first}: draining this host, then stopping");
                drain_then(handle.forcer(), handle.shutdown(), &mut signals).await;
                Ok(())
            }
        }
    })
}

/// How long the VM hosts of a scheduler that stops get to drain (then as long again
/// after a second SIGTERM): within the 30 s a local cluster gives a process to stop.
const VM_HOSTS_GRACE: Duration = Duration::from_secs(12);

/// The providers the groups name, made once (at the first leadership): the `netns`
/// provider holds its state directory for the rest of the process's life, the `qemu`
/// provider its VMs.
struct ProvidersSource {
    netns: Option<hatchery_scheduler::provider::netns::NetnsConfig>,
    qemu: Option<hatchery_scheduler::provider::qemu::QemuConfig>,
    ec2_asg: Option<hatchery_scheduler::provider::ec2_asg::Ec2AsgConfig>,
    made: tokio::sync::OnceCell<Made>,
}

struct Made {
    providers: BTreeMap<String, Arc<dyn Provider>>,
    qemu: Option<Arc<QemuProvider>>,
}

impl ProvidersSource {
    /// Stops the VMs the `qemu` provider made, if it made any: they would die with this
    /// process; this way their agents drain first (a second SIGTERM after `grace`, then
    /// qemu is killed after another).
    async fn stop_vms(&self, grace: Duration) {
        if let Some(qemu) = self.made.get().and_then(|m| m.qemu.as_ref()) {
            tracing::info!("stopping the VM hosts this scheduler made");
            qemu.stop_all(grace).await;
        }
    }
}

#[async_trait::async_trait]
impl ProviderSource for ProvidersSource {
    async fn providers(&self) -> Result<BTreeMap<String, Arc<dyn Provider>>, ProviderError> {
        let made = self
            .made
            .get_or_try_init(|| async {
                let mut providers: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
                if let Some(cfg) = &self.netns {
                    let p = NetnsProvider::new(cfg.clone()).await?;
                    providers.insert("netns".into(), Arc::new(p));
                }
                let mut qemu = None;
                if let Some(cfg) = &self.qemu {
                    let p = Arc::new(QemuProvider::new(cfg.clone())?);
                    providers.insert("qemu".into(), p.clone());
                    qemu = Some(p);
                }
                if let Some(cfg) = &self.ec2_asg {
                    let p = Ec2AsgProvider::new(cfg.clone()).await?;
                    providers.insert("ec2-asg".into(), Arc::new(p));
                }
                Ok::<_, ProviderError>(Made { providers, qemu })
            })
            .await?;
        Ok(made.providers.clone())
    }
}

/// The autoscaler's groups and providers, when a group's hosts are made by a provider
/// (`netns` or `qemu`: their hosts run this binary's `agent` with the same config and
/// environment; `ec2-asg`: instances of Auto Scaling groups). The providers are made when this scheduler starts to lead, not before.
fn scaling(
    cfg: &Config,
    config: Option<&Path>,
) -> anyhow::Result<Option<(Scaling, Arc<ProvidersSource>)>> {
    let groups = cfg.groups()?;
    let uses = |kind: &str| groups.iter().any(|g| g.provider == kind);
    if !uses("netns") && !uses("qemu") && !uses("ec2-asg") {
        return Ok(None);
    }
    let exe = std::env::current_exe().context("finding the hatchery binary")?;
    let mut command = vec![exe.into_os_string(), "agent".into()];
    if let Some(path) = config {
        let path =
            std::path::absolute(path).with_context(|| format!("config file {}", path.display()))?;
        command.extend(["--config".into(), path.into_os_string()]);
    }
    let providers = Arc::new(ProvidersSource {
        netns: uses("netns")
            .then(|| cfg.netns(command.clone()))
            .transpose()?,
        qemu: uses("qemu")
            .then(|| {
                cfg.qemu(
                    command.clone(),
                    hatchery_scheduler::provider::qemu::inherited_env(),
                )
            })
            .transpose()?,
        ec2_asg: uses("ec2-asg").then(|| cfg.ec2_asg()).transpose()?,
        made: tokio::sync::OnceCell::new(),
    });
    let platform = cfg.platform_config();
    let scaling = Scaling {
        groups,
        providers: providers.clone(),
        default_policy: platform.default_policy,
        active_for: platform.active_for,
    };
    Ok(Some((scaling, providers)))
}

fn print_banner(
    cfg: &Config,
    addr: std::net::SocketAddr,
    auth: &Auth,
    local_sign_in: bool,
) -> anyhow::Result<()> {
    let ttl = cfg.token_ttl();
    // The same two identities as the console's one-click sign-in.
    let mint = |who: SignInAs| {
        let (org, user, role) = who.identity();
        auth.mint(org, user, role, ttl).map_err(anyhow::Error::msg)
    };
    let admin = mint(SignInAs::Superadmin)?;
    let user = mint(SignInAs::User)?;
    let url = format!("http://{addr}");
    let ws = format!("ws://{addr}");
    let console = if local_sign_in {
        "open it in a browser on this machine and sign in with one click, or paste a token below"
    } else {
        "open it in a browser and paste a token below"
    };
    println!(
        "hatchery: listening on {url}\n\
         \n\
         Hatchery is up (data in {data}; the warm pools fill in the background:\n\
         GET {url}/readyz answers 200 once they are ready).\n\
         \n\
         Web console: {url}/\n\
         \x20 ({console})\n\
         \n\
         superadmin token (org hatchery, user admin, valid {ttl_s}):\n  {admin}\n\
         user token (org demo, user demo, valid {ttl_s}):\n  {user}\n\
         \n\
         Try it:\n\
         \x20 TOKEN={user}\n\
         \x20 curl -s -H \"Authorization: Bearer $TOKEN\" -d '{{\"language\":\"r\",\"code\":\"cat(sum(1:10))\"}}' {url}/v1/executions\n\
         \x20 # → {{\"id\":\"<id>\",\"state\":\"queued\"}}; then follow its events (any WebSocket client):\n\
         \x20 hatchery watch <id> --token \"$TOKEN\" --url {url}\n\
         \x20 # (or any WebSocket client: {ws}/v1/executions/<id>/events?token=$TOKEN)\n\
         \x20 curl -s -H \"Authorization: Bearer $TOKEN\" {url}/v1/executions/<id>\n\
         \n\
         API reference: {url}/v1/openapi.json   metrics: {url}/metrics\n\
         More tokens: hatchery token create --org ORG --user USER --role user|org_admin|superadmin\n",
        data = cfg.data_dir.display(),
        ttl_s = cfg.token_ttl,
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// `hatchery watch`: prints every event of one execution; true when it succeeded.
fn watch(id: &str, token: &str, url: &str, after: u64) -> anyhow::Result<bool> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let base = url.trim_end_matches('/');
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        bail!("--url must start with http:// or https://, got {url:?}");
    };
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let target = format!(
        "{ws_base}/v1/executions/{}/events?after={after}&token={}",
        enc(id),
        enc(token)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (mut ws, _) = tokio_tungstenite::connect_async(target.as_str())
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => {
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    anyhow::anyhow!("the API answered {}: {body}", resp.status())
                }
                other => anyhow::anyhow!("cannot connect to {ws_base}: {other}"),
            })?;
        let mut succeeded = false;
        while let Some(msg) = ws.next().await {
            match msg.context("websocket")? {
                Message::Text(text) => {
                    println!("{text}");
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                        if v["type"] == "finished" {
                            succeeded = v["state"] == "succeeded";
                        }
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok(succeeded)
    })
}
