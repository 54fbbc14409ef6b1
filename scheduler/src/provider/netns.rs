//! Hosts as network namespaces on this machine: the `netns` provider ([`NetnsProvider`]).
//!
//! A host is three things on this machine, named after it:
//!
//! - a network namespace `<bridge>-<name>` whose `eth0` has the host's address in the
//!   provider's /24 and is one end of a veth pair; the other end, `<bridge>-<octet>`, is
//!   on the bridge, which has `.1`: where the engines (PostgreSQL, Redis, S3) listen for
//!   the hosts;
//! - a cgroup `<cgroup_parent>/<name>` limited to its group's shape (plus an overhead for
//!   the agent and its zygotes), the agent in its `agent` child, the sandboxes under its
//!   `sandboxes` child;
//! - a real `hatchery agent` process, born inside both.
//!
//! The state directory is the truth, not this process's memory: one JSON record per host
//! (`hosts/<name>.json`), written as soon as the host is asked for and removed only once
//! everything it held is released, so that a scheduler that restarts finds the hosts it
//! made (their agents keep running: they have their own process group) and whatever a
//! crash left half-made. Records change only under a lock file, so no name or address is
//! handed out twice. One provider at a time works on a state directory.
//!
//! Within a provider one task drives each host ([`Driver`]): its launch, which hands over
//! to the wait for the agent it started; or the wait for an agent it did not start (a
//! previous run's) to exit; or the release. [`Provider::terminate`] neither waits nor
//! kills: it asks the agent to drain (SIGTERM) or cancels the launch, and the host's
//! driver releases the host once its agent is gone. Only [`NetnsProvider::stop_all`]
//! escalates.
//!
//! The agent is never started with `ip netns exec`, which remounts `/sys` and so hides
//! the cgroup tree: it enters its cgroup and its network namespace between fork and exec,
//! with raw syscalls only ([`Entry`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hatchery_sandbox::cgroup::{CgroupError, CgroupRoot, SandboxCgroup};
use hatchery_sandbox::gc::{self, Owner};
use hatchery_sandbox::limits::Limits;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::{HostPhase, ProvidedHost, Provider, ProviderError};
use crate::autoscale::GroupConfig;
use crate::model::{now_ms, Millis, Resources};

/// The child of a host's cgroup its agent runs in.
const AGENT_CGROUP: &str = "agent";
/// The child of a host's cgroup its agent makes its sandboxes' cgroups under.
const SANDBOXES_CGROUP: &str = "sandboxes";
/// Where `ip netns add` puts the namespaces it names.
const NETNS_DIR: &str = "/run/netns";
/// How often the exit of an agent that is not our child is looked for.
const EXIT_POLL: Duration = Duration::from_millis(100);
/// How long a released host's sandboxes may take to be reaped.
const SANDBOX_PATIENCE: Duration = Duration::from_secs(10);
/// How long [`NetnsProvider::stop_all`] waits for releases once every agent is killed.
const RELEASE_PATIENCE: Duration = Duration::from_secs(60);

/// The `netns` provider's settings.
#[derive(Debug, Clone)]
pub struct NetnsConfig {
    /// Each host's record (`<state_dir>/hosts/<name>.json`) and its agent's log
    /// (`<state_dir>/logs/<name>.log`, kept after the host goes).
    pub state_dir: PathBuf,
    /// The bridge hosts are attached to (at most 10 characters; veths are named
    /// `<bridge>-<n>`).
    pub bridge: String,
    /// The /24 the hosts live in: the bridge has .1, hosts .2 to .254.
    pub network: Ipv4Addr,
    /// Top-level cgroup of the hosts (e.g. `hatchery-hosts`): host `<name>` is
    /// `<cgroup_parent>/<name>`, its agent process in `<cgroup_parent>/<name>/agent`, its
    /// sandboxes under `<cgroup_parent>/<name>/sandboxes` (given to the agent as
    /// HATCHERY_CGROUP_PARENT).
    pub cgroup_parent: String,
    /// The agent's program and arguments, e.g. [current_exe, "agent", "--config", path].
    pub agent_command: Vec<OsString>,
    /// Extra environment for every agent (the agent otherwise inherits this process's
    /// environment).
    pub agent_env: Vec<(String, String)>,
    /// How long making a host takes before its agent starts (to show a host on its way).
    pub launch_delay: Duration,
    /// Memory the host's cgroup has beyond the group's shape, for the agent and its
    /// zygotes.
    pub overhead_memory: u64,
}

/// Address `.octet` of the /24 `network`.
fn address_in(network: Ipv4Addr, octet: u8) -> Ipv4Addr {
    let [a, b, c, _] = network.octets();
    Ipv4Addr::new(a, b, c, octet)
}

/// Makes a host in a group, on this machine.
pub struct NetnsProvider {
    inner: Arc<Inner>,
}

impl NetnsProvider {
    /// Ensures the bridge exists and is up with .1/24 (idempotent), and takes over the
    /// hosts recorded in the state directory: a scheduler that restarts finds the hosts
    /// it made, whose agents kept running. Hosts recorded as Stopping have their
    /// termination resumed; hosts whose launch was interrupted before their agent started
    /// are released.
    pub async fn new(cfg: NetnsConfig) -> Result<NetnsProvider, ProviderError> {
        let setup = |e: NetnsError| ProviderError::Setup(e.to_string());
        if cfg.agent_command.is_empty() {
            return Err(setup(NetnsError::NoCommand));
        }
        ensure_bridge(&cfg.bridge, address_in(cfg.network, 1))?;
        let state = StateDir::open(&cfg.state_dir).map_err(setup)?;
        let provider = NetnsProvider {
            inner: Arc::new(Inner {
                cfg,
                state,
                drivers: Mutex::default(),
            }),
        };
        provider.resume().map_err(setup)?;
        Ok(provider)
    }

    /// The bridge's address (.1): where the hosts reach this machine.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        address_in(self.inner.cfg.network, 1)
    }

    /// Launches a host of `group` named `name` (an instance id, when something else
    /// decides which hosts exist, as the `ec2-asg` simulation's launcher does), or under
    /// a fresh name.
    pub async fn launch_as(
        &self,
        group: &GroupConfig,
        name: Option<&str>,
    ) -> Result<String, ProviderError> {
        let failed = |e: NetnsError| ProviderError::Launch {
            group: group.name.clone(),
            reason: e.to_string(),
        };
        check_name("group name", &group.name, 64).map_err(failed)?;
        if let Some(name) = name {
            check_name("host name", name, 64).map_err(failed)?;
        }
        let (record, cancelled) = self.inner.begin_launch(group, name).map_err(failed)?;
        tracing::info!(
            host = %record.name,
            group = %group.name,
            address = %record.address,
            "launching host"
        );
        let name = record.name.clone();
        tokio::spawn(
            self.inner
                .clone()
                .drive_launch(record, group.clone(), cancelled),
        );
        Ok(name)
    }

    /// Resumes what the records say was under way when the previous provider stopped.
    fn resume(&self) -> Result<(), NetnsError> {
        let mut locked = self.inner.lock()?;
        for mut record in self.inner.state.records()? {
            if !matches!(record.phase, Phase::Starting | Phase::Stopping) {
                continue;
            }
            if record.phase == Phase::Starting {
                tracing::info!(
                    host = %record.name,
                    "the launch of this host was interrupted: releasing it"
                );
            }
            record.phase = record.phase.after(Event::Terminate)?;
            locked.write(&record)?;
            let agent = record.agent.and_then(Pidfd::of);
            let next = locked.take_over(record, agent);
            self.inner.clone().spawn_next(next);
        }
        Ok(())
    }

    /// Stops every host now (for `hatchery sim` on Ctrl-C, and tests): SIGTERM, after
    /// `grace` a second SIGTERM (the agent's forced drain), after another `grace`
    /// SIGKILL; returns once every host is released, or after [`RELEASE_PATIENCE`] more
    /// if some cannot be (they are logged). The hosts' cgroup parent goes too once empty.
    pub async fn stop_all(&self, grace: Duration) {
        self.terminate_all().await;
        let escalation = [
            (libc::SIGTERM, "forcing their drain (second SIGTERM)"),
            (libc::SIGKILL, "killing their agents"),
        ];
        for (signal, what) in escalation {
            if self.wait_until_empty(grace).await {
                break;
            }
            tracing::warn!(?grace, "hosts still running: {what}");
            self.inner.signal_agents(signal);
        }
        let deadline = Instant::now() + RELEASE_PATIENCE;
        while !self.wait_until_empty(Duration::from_secs(1)).await {
            if Instant::now() >= deadline {
                let left = self.inner.state.records().unwrap_or_default();
                let names: Vec<&str> = left.iter().map(|r| r.name.as_str()).collect();
                tracing::warn!(hosts = ?names, "hosts that could not be released");
                return;
            }
            // A release that failed left its host Exited: try again.
            self.terminate_all().await;
        }
        if let Ok(root) = CgroupRoot::detect(&self.inner.cfg.cgroup_parent) {
            let _ = root.remove_if_empty();
        }
    }

    /// Terminates every recorded host (one already terminating is left as it is).
    async fn terminate_all(&self) {
        for record in self.inner.state.records().unwrap_or_default() {
            match self.terminate(&record.name).await {
                Ok(()) | Err(ProviderError::UnknownHost(_)) => {}
                Err(e) => tracing::warn!(host = %record.name, error = %e, "cannot terminate"),
            }
        }
    }

    /// Whether every record is gone within `within`.
    async fn wait_until_empty(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.inner.state.records().is_ok_and(|r| r.is_empty()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[async_trait]
impl Provider for NetnsProvider {
    fn kind(&self) -> &'static str {
        "netns"
    }

    async fn launch(&self, group: &GroupConfig) -> Result<String, ProviderError> {
        self.launch_as(group, None).await
    }

    async fn terminate(&self, host: &str) -> Result<(), ProviderError> {
        match self.inner.begin_termination(host) {
            Ok(next) => {
                self.inner.clone().spawn_next(next);
                Ok(())
            }
            Err(NetnsError::UnknownHost(host)) => Err(ProviderError::UnknownHost(host)),
            Err(e) => Err(ProviderError::Terminate {
                host: host.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    async fn list(&self) -> Result<Vec<ProvidedHost>, ProviderError> {
        let records = self
            .inner
            .state
            .records()
            .map_err(|e| ProviderError::List(e.to_string()))?;
        Ok(records.iter().map(HostRecord::provided).collect())
    }
}

/// Creates the bridge `name` with `ip`/24 and brings it up; a bridge that exists is
/// given the address and brought up (idempotent).
pub fn ensure_bridge(name: &str, ip: Ipv4Addr) -> Result<(), ProviderError> {
    let setup = |e: NetnsError| ProviderError::Setup(format!("bridge {name}: {e}"));
    check_bridge_name(name).map_err(setup)?;
    let device = Path::new("/sys/class/net").join(name);
    if !device.exists() {
        if let Err(e) = ip_blocking(&["link", "add", "name", name, "type", "bridge"]) {
            // Someone else may have made it meanwhile.
            if !device.exists() {
                return Err(setup(e));
            }
        }
    }
    if !device.join("bridge").exists() {
        return Err(setup(NetnsError::NotABridge));
    }
    let address = format!("{ip}/24");
    ip_blocking(&["addr", "replace", &address, "dev", name]).map_err(setup)?;
    ip_blocking(&["link", "set", name, "up"]).map_err(setup)
}

/// Removes the bridge `name` (nothing if there is none).
pub fn remove_bridge(name: &str) {
    if check_bridge_name(name).is_err() || !link_exists(name) {
        return;
    }
    if let Err(e) = ip_blocking(&["link", "del", name]) {
        tracing::warn!(bridge = %name, error = %e, "cannot remove the bridge");
    }
}

struct Inner {
    cfg: NetnsConfig,
    state: StateDir,
    drivers: Mutex<HashMap<String, Driver>>,
}

/// What a termination leaves to a new task.
enum Next {
    /// Nothing: the host's driver finishes the job.
    Nothing,
    /// Wait for the agent, then release the host.
    WaitThenRelease(HostRecord, Arc<Pidfd>),
    /// Release the host now: its agent is gone.
    Release(HostRecord),
}

impl Inner {
    fn lock(&self) -> Result<Locked<'_>, NetnsError> {
        let drivers = self.drivers.lock().unwrap_or_else(PoisonError::into_inner);
        let path = self.state.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        let file = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io_error("locking", &path)(errno.into()))?;
        Ok(Locked {
            state: &self.state,
            drivers,
            _file: file,
        })
    }

    /// Records a new host of `group`, Starting: the next name, the lowest free address.
    fn begin_launch(
        &self,
        group: &GroupConfig,
        name: Option<&str>,
    ) -> Result<(HostRecord, watch::Receiver<bool>), NetnsError> {
        let mut locked = self.lock()?;
        let taken: Vec<Ipv4Addr> = self.state.records()?.iter().map(|r| r.address).collect();
        let address = (2..=254)
            .map(|octet| address_in(self.cfg.network, octet))
            .find(|a| !taken.contains(a))
            .ok_or(NetnsError::NoAddress(self.cfg.network))?;
        let name = match name {
            Some(name) if locked.record(name)?.is_some() => {
                return Err(NetnsError::Taken(name.to_string()))
            }
            Some(name) => name.to_string(),
            None => locked.fresh_name(&group.name, taken.len() + 1)?,
        };
        let record = HostRecord {
            netns: format!("{}-{name}", self.cfg.bridge),
            veth: format!("{}-{}", self.cfg.bridge, address.octets()[3]),
            name,
            group: group.name.clone(),
            address,
            cgroup_parent: self.cfg.cgroup_parent.clone(),
            phase: Phase::Starting,
            launched_at: now_ms(),
            agent: None,
        };
        locked.write(&record)?;
        let (cancel, cancelled) = watch::channel(false);
        locked
            .drivers
            .insert(record.name.clone(), Driver::Launch(cancel));
        Ok((record, cancelled))
    }

    /// The agent's command: its program and arguments, this process's environment with
    /// the configured extras and the host's own, its output appended to its log, in a
    /// process group of its own (a terminal's Ctrl-C is for the scheduler, which decides
    /// what happens to its hosts).
    fn agent_command(
        &self,
        record: &HostRecord,
        group: &GroupConfig,
    ) -> Result<Command, NetnsError> {
        let (program, args) = self
            .cfg
            .agent_command
            .split_first()
            .ok_or(NetnsError::NoCommand)?;
        let path = self.state.log_path(&record.name);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        let log_too = log.try_clone().map_err(io_error("opening", &path))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(self.cfg.agent_env.iter().map(|(k, v)| (k, v)))
            .env("HATCHERY_AGENT_NAME", &record.name)
            .env("HATCHERY_GROUP", &record.group)
            .env(
                "HATCHERY_CGROUP_PARENT",
                format!("{}/{SANDBOXES_CGROUP}", record.host_cgroup()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .process_group(0);
        if let Some(n) = group.pool_size {
            command.env("HATCHERY_POOL_SIZE", n.to_string());
        }
        Ok(command)
    }

    /// Starts the host's agent in its network namespace and agent cgroup, unless the
    /// host is being terminated, and records it Running.
    fn start_agent(
        &self,
        record: &HostRecord,
        group: &GroupConfig,
        agent_cgroup: &SandboxCgroup,
    ) -> Result<Child, NetnsError> {
        let entry = Entry::open(&record.netns, agent_cgroup)?;
        let mut command = self.agent_command(record, group)?;
        let mut locked = self.lock()?;
        let mut current = locked.record(&record.name)?.ok_or(NetnsError::Cancelled)?;
        if current.phase == Phase::Stopping {
            return Err(NetnsError::Cancelled);
        }
        current.phase = current.phase.after(Event::AgentStarted)?;
        let mut child = entry.spawn(&mut command).map_err(NetnsError::Spawn)?;
        let mut recorded = || -> Result<Pidfd, NetnsError> {
            let gone = || NetnsError::Spawn(io::Error::from_raw_os_error(libc::ESRCH));
            let pid = child.id().ok_or_else(gone)? as i32;
            // Our child, not reaped yet: the pid is still the agent's.
            let pidfd = Pidfd::open(pid).map_err(NetnsError::Spawn)?;
            let start_time = gc::process_start_time(pid).ok_or_else(gone)?;
            current.agent = Some(AgentProcess { pid, start_time });
            locked.write(&current)?;
            Ok(pidfd)
        };
        match recorded() {
            Ok(pidfd) => {
                locked
                    .drivers
                    .insert(record.name.clone(), Driver::Child(Arc::new(pidfd)));
                Ok(child)
            }
            Err(e) => {
                // An agent nobody knows of must not stay.
                let _ = child.start_kill();
                Err(e)
            }
        }
    }

    /// The agent this provider started has exited: a terminating host is handed to its
    /// release (returned); any other is now Exited, for the autoscaler to terminate.
    fn agent_exited(&self, name: &str) -> Result<Option<HostRecord>, NetnsError> {
        let mut locked = self.lock()?;
        let Some(mut record) = locked.record(name)? else {
            locked.drivers.remove(name);
            return Ok(None);
        };
        if record.phase == Phase::Stopping {
            locked.drivers.insert(name.to_string(), Driver::Release);
            return Ok(Some(record));
        }
        locked.drivers.remove(name);
        record.phase = record.phase.after(Event::AgentExited)?;
        locked.write(&record)?;
        Ok(None)
    }

    /// Ends the drive of a host whose agent is gone (or never started), given how
    /// releasing what it held went: a terminating host's record goes once everything is
    /// released; a host that failed to launch, or to be released, is Exited (the next
    /// terminate releases it, or tries again).
    fn released(&self, name: &str, outcome: Result<(), NetnsError>) -> Result<(), NetnsError> {
        let mut locked = self.lock()?;
        locked.drivers.remove(name);
        let Some(mut record) = locked.record(name)? else {
            return Ok(());
        };
        let event = match (record.phase, outcome) {
            (Phase::Stopping, Ok(())) => {
                locked.remove(name)?;
                tracing::info!(host = %name, "host released");
                return Ok(());
            }
            (Phase::Stopping, Err(e)) => {
                tracing::warn!(
                    host = %name,
                    error = %e,
                    "releasing the host failed: it is kept as exited"
                );
                Event::ReleaseFailed
            }
            (_, Err(e)) => {
                tracing::warn!(
                    host = %name,
                    error = %e,
                    "releasing what a failed launch made failed"
                );
                Event::LaunchFailed
            }
            (_, Ok(())) => Event::LaunchFailed,
        };
        record.phase = record.phase.after(event)?;
        locked.write(&record)
    }

    /// Begins the termination of `name`: records it Stopping, and asks its agent to
    /// drain or cancels its launch; says what is left to a new task.
    fn begin_termination(&self, name: &str) -> Result<Next, NetnsError> {
        let mut locked = self.lock()?;
        let Some(mut record) = locked.record(name)? else {
            return Err(NetnsError::UnknownHost(name.to_string()));
        };
        let first = record.phase != Phase::Stopping;
        record.phase = record.phase.after(Event::Terminate)?;
        // SIGTERM before the record says Stopping: a crash in between leaves a draining
        // host that exits and is then released like any exited host.
        let term = |agent: &Pidfd| match first {
            true => agent.signal(libc::SIGTERM),
            false => Ok(()),
        };
        let next = match locked.drivers.get(name) {
            Some(Driver::Launch(cancel)) => {
                cancel.send_replace(true);
                Next::Nothing
            }
            Some(Driver::Child(agent) | Driver::Waiter(agent)) => {
                term(agent).map_err(NetnsError::Signal)?;
                Next::Nothing
            }
            Some(Driver::Release) => Next::Nothing,
            None => {
                let agent = record.agent.and_then(Pidfd::of);
                if let Some(agent) = &agent {
                    term(agent).map_err(NetnsError::Signal)?;
                }
                locked.take_over(record.clone(), agent)
            }
        };
        locked.write(&record)?;
        if first {
            tracing::info!(host = %name, "terminating host: its agent drains, then it is released");
        }
        Ok(next)
    }

    /// Sends `signal` to every agent this provider drives.
    fn signal_agents(&self, signal: libc::c_int) {
        let Ok(locked) = self.lock() else { return };
        for (name, driver) in locked.drivers.iter() {
            if let Some(Err(e)) = driver.agent().map(|a| a.signal(signal)) {
                tracing::warn!(host = %name, signal, error = %e, "cannot signal the agent");
            }
        }
    }

    /// Starts the task a termination left.
    fn spawn_next(self: Arc<Self>, next: Next) {
        match next {
            Next::Nothing => {}
            Next::WaitThenRelease(record, agent) => {
                tokio::spawn(async move {
                    agent.exited().await;
                    tracing::info!(host = %record.name, "agent exited");
                    self.release(record).await;
                });
            }
            Next::Release(record) => {
                tokio::spawn(self.release(record));
            }
        }
    }

    /// Releases a terminating host whose agent is gone.
    async fn release(self: Arc<Self>, record: HostRecord) {
        let outcome = release_resources(&record).await;
        if let Err(e) = self.released(&record.name, outcome) {
            tracing::warn!(host = %record.name, error = %e, "cannot record the release");
        }
    }

    /// Drives a host from its launch: makes it, starts its agent and waits for it.
    async fn drive_launch(
        self: Arc<Self>,
        record: HostRecord,
        group: GroupConfig,
        mut cancelled: watch::Receiver<bool>,
    ) {
        match self.make_host(&record, &group, &mut cancelled).await {
            Ok(child) => self.watch_child(record, child).await,
            Err(e) => {
                if !matches!(e, NetnsError::Cancelled) {
                    tracing::warn!(
                        host = %record.name,
                        error = %e,
                        "launching the host failed: releasing what was made"
                    );
                }
                let outcome = release_resources(&record).await;
                if let Err(e) = self.released(&record.name, outcome) {
                    tracing::warn!(
                        host = %record.name,
                        error = %e,
                        "cannot record the failed launch"
                    );
                }
            }
        }
    }

    /// Makes the host once its launch delay has passed, and starts its agent.
    async fn make_host(
        &self,
        record: &HostRecord,
        group: &GroupConfig,
        cancelled: &mut watch::Receiver<bool>,
    ) -> Result<Child, NetnsError> {
        tokio::select! {
            _ = tokio::time::sleep(self.cfg.launch_delay) => {}
            _ = cancelled.wait_for(|c| *c) => {}
        }
        if *cancelled.borrow() {
            return Err(NetnsError::Cancelled);
        }
        create_network(&self.cfg.bridge, record).await?;
        let agent_cgroup = create_cgroups(record, &group.shape, self.cfg.overhead_memory)?;
        self.start_agent(record, group, &agent_cgroup)
    }

    /// Waits for the agent this provider started (reaping it), then hands the host on.
    async fn watch_child(self: Arc<Self>, record: HostRecord, mut child: Child) {
        tracing::info!(
            host = %record.name,
            address = %record.address,
            pid = ?child.id(),
            "host started: its agent runs"
        );
        match child.wait().await {
            Ok(status) => tracing::info!(host = %record.name, %status, "agent exited"),
            Err(e) => tracing::warn!(host = %record.name, error = %e, "cannot wait for the agent"),
        }
        match self.agent_exited(&record.name) {
            Ok(Some(record)) => self.release(record).await,
            Ok(None) => {
                tracing::warn!(
                    host = %record.name,
                    "the agent exited without being asked to: the host is exited"
                )
            }
            Err(e) => {
                tracing::warn!(host = %record.name, error = %e, "cannot record the agent's exit")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum NetnsError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("host record {}: {source}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cgroup {0} still has sandboxes after {SANDBOX_PATIENCE:?}")]
    Busy(String),
    #[error("{what} {name:?}: {rule}")]
    BadName {
        what: &'static str,
        name: String,
        rule: &'static str,
    },
    #[error("a device of that name exists and is not a bridge")]
    NotABridge,
    #[error(
        "the state directory {} is in use by another provider ({holder}); one scheduler \
         per state directory",
        path.display()
    )]
    InUse { path: PathBuf, holder: String },
    #[error("no free address left in {0}/24")]
    NoAddress(Ipv4Addr),
    #[error("every name tried for a host of group {0} is a recorded host's")]
    NoName(String),
    #[error("no host {0} is recorded")]
    UnknownHost(String),
    #[error("a host named {0} is recorded already")]
    Taken(String),
    #[error("no agent command is configured")]
    NoCommand,
    #[error("a {phase:?} host cannot take {event:?}")]
    Transition { phase: Phase, event: Event },
    #[error("starting the agent: {0}")]
    Spawn(io::Error),
    #[error("signalling the agent: {0}")]
    Signal(io::Error),
    #[error("{0}")]
    Task(String),
    #[error("the host was terminated before its agent started")]
    Cancelled,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NetnsError {
    let path = path.to_path_buf();
    move |source| NetnsError::Io { what, path, source }
}

/// Where a host is, as its record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    Starting,
    Running,
    Stopping,
    Exited,
}

/// What happens to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Its agent was started.
    AgentStarted,
    /// Making it failed before its agent started.
    LaunchFailed,
    /// Its agent exited without being asked to.
    AgentExited,
    /// It was asked to terminate.
    Terminate,
    /// Releasing what it holds failed (it is kept, for the next terminate to retry).
    ReleaseFailed,
}

impl Phase {
    /// The phase after `event`. A terminating host never starts its agent.
    fn after(self, event: Event) -> Result<Phase, NetnsError> {
        use Event::*;
        use Phase::*;
        match (self, event) {
            (Starting, AgentStarted) => Ok(Running),
            (Starting, LaunchFailed) | (Running, AgentExited) => Ok(Exited),
            (_, Terminate) => Ok(Stopping),
            (Stopping, ReleaseFailed) => Ok(Exited),
            (phase, event) => Err(NetnsError::Transition { phase, event }),
        }
    }
}

/// An agent process: its pid, and that process's start time (after a restart the pid
/// may be someone else's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct AgentProcess {
    pid: i32,
    start_time: u64,
}

impl AgentProcess {
    /// Still that process, and not a zombie.
    fn is_alive(self) -> bool {
        Owner {
            pid: self.pid,
            start_time: self.start_time,
        }
        .is_alive()
    }
}

/// A host, as recorded in `hosts/<name>.json`: everything its release needs, whatever the
/// provider's settings have become since.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostRecord {
    name: String,
    group: String,
    address: Ipv4Addr,
    /// Its network namespace (`/run/netns/<netns>`).
    netns: String,
    /// The bridge's end of its veth pair.
    veth: String,
    /// The cgroup its own cgroup (`<cgroup_parent>/<name>`) is in.
    cgroup_parent: String,
    phase: Phase,
    launched_at: Millis,
    /// Its agent, once started.
    agent: Option<AgentProcess>,
}

impl HostRecord {
    fn host_cgroup(&self) -> String {
        format!("{}/{}", self.cgroup_parent, self.name)
    }

    /// The host as [`Provider::list`] shows it: a running host whose agent is gone has
    /// exited, whatever its record says yet.
    fn provided(&self) -> ProvidedHost {
        let phase = match self.phase {
            Phase::Starting => HostPhase::Starting,
            Phase::Running if self.agent.is_some_and(AgentProcess::is_alive) => HostPhase::Running,
            Phase::Running | Phase::Exited => HostPhase::Exited,
            Phase::Stopping => HostPhase::Stopping,
        };
        ProvidedHost {
            name: self.name.clone(),
            group: self.group.clone(),
            phase,
            launched_at: self.launched_at,
        }
    }
}

/// The state directory: `hosts/<name>.json`, `logs/<name>.log`, the counter names are
/// numbered from (`next`) and the lock file every change is made under (`lock`).
struct StateDir {
    root: PathBuf,
    /// Held for the provider's life: a second provider on the same directory (another
    /// scheduler on this machine) would resume and release hosts this one drives.
    _owner: Flock<File>,
}

impl StateDir {
    fn open(root: &Path) -> Result<StateDir, NetnsError> {
        for dir in [root.join("hosts"), root.join("logs")] {
            fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        }
        // Opened close-on-exec (as std opens files): agents never inherit it.
        let path = root.join("owner");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_error("opening", &path))?;
        let mut owner = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(owner) => owner,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = fs::read_to_string(&path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown process".into());
                return Err(NetnsError::InUse { path, holder });
            }
            Err((_, errno)) => return Err(io_error("locking", &path)(errno.into())),
        };
        let me = format!("pid {}", std::process::id());
        owner
            .set_len(0)
            .and_then(|()| owner.write_all(me.as_bytes()))
            .map_err(io_error("writing", &path))?;
        Ok(StateDir {
            root: root.to_path_buf(),
            _owner: owner,
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.root.join("hosts").join(format!("{name}.json"))
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }

    fn record(&self, name: &str) -> Result<Option<HostRecord>, NetnsError> {
        let path = self.record_path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("reading", &path)(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| NetnsError::Record { path, source })
    }

    /// Every record, oldest first. Records are replaced by renames, so this needs no lock.
    fn records(&self) -> Result<Vec<HostRecord>, NetnsError> {
        let dir = self.root.join("hosts");
        let mut records = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_error("listing", &dir))? {
            let path = entry.map_err(io_error("listing", &dir))?.path();
            let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            // Gone since the listing: released meanwhile.
            if let Some(record) = self.record(name)? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| (a.launched_at, &a.name).cmp(&(b.launched_at, &b.name)));
        Ok(records)
    }
}

/// The task that drives a host within this provider; at most one per host.
enum Driver {
    /// The launch, until the agent starts; cancelled through this.
    Launch(watch::Sender<bool>),
    /// The wait for the agent it started (its child): the host is then Exited, or
    /// released if it was terminating.
    Child(Arc<Pidfd>),
    /// The wait for an agent it did not start (a previous run's) to exit, then the release.
    Waiter(Arc<Pidfd>),
    /// The release of a host whose agent is gone.
    Release,
}

impl Driver {
    fn agent(&self) -> Option<&Pidfd> {
        match self {
            Driver::Child(agent) | Driver::Waiter(agent) => Some(agent),
            Driver::Launch(_) | Driver::Release => None,
        }
    }
}

/// The records and this provider's drivers, locked (in that order: this process's drivers,
/// then the file lock other processes see). Every change to a record, and every handover
/// of a host between tasks, happens under it; nothing under it awaits.
struct Locked<'a> {
    state: &'a StateDir,
    drivers: MutexGuard<'a, HashMap<String, Driver>>,
    _file: Flock<File>,
}

impl Locked<'_> {
    fn record(&self, name: &str) -> Result<Option<HostRecord>, NetnsError> {
        self.state.record(name)
    }

    /// Writes `record` whole (a rename: readers see the old record or the new one).
    fn write(&self, record: &HostRecord) -> Result<(), NetnsError> {
        let path = self.state.record_path(&record.name);
        let bytes = serde_json::to_vec_pretty(record).map_err(|source| NetnsError::Record {
            path: path.clone(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, bytes).map_err(io_error("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("writing", &path))
    }

    fn remove(&self, name: &str) -> Result<(), NetnsError> {
        let path = self.state.record_path(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("removing", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Makes a new task of this provider the driver of a terminating host that has none:
    /// it waits for `agent` to exit, if it runs, then releases the host.
    fn take_over(&mut self, record: HostRecord, agent: Option<Pidfd>) -> Next {
        match agent {
            Some(agent) => {
                let agent = Arc::new(agent);
                self.drivers
                    .insert(record.name.clone(), Driver::Waiter(agent.clone()));
                Next::WaitThenRelease(record, agent)
            }
            None => {
                self.drivers.insert(record.name.clone(), Driver::Release);
                Next::Release(record)
            }
        }
    }

    /// A name for a new host of `group` that no recorded host has: the counter's next
    /// number, or a later one if a counter reset by hand gives a recorded host's (`tries`
    /// numbers at most: one more than there are recorded hosts is enough).
    fn fresh_name(&self, group: &str, tries: usize) -> Result<String, NetnsError> {
        for _ in 0..tries {
            let name = format!("{group}-{}", self.next_number()?);
            if self.record(&name)?.is_none() {
                return Ok(name);
            }
        }
        Err(NetnsError::NoName(group.to_string()))
    }

    /// The next number of the counter: never the same twice, across restarts.
    fn next_number(&self) -> Result<u64, NetnsError> {
        let path = self.state.root.join("next");
        let next = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse().unwrap_or(1),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(io_error("reading", &path)(e)),
        };
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, format!("{}\n", next + 1)).map_err(io_error("writing", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("writing", &path))?;
        Ok(next)
    }
}

/// A process held by a pidfd: a signal reaches that process or none, even once its pid
/// is reused.
#[derive(Debug)]
struct Pidfd(OwnedFd);

impl Pidfd {
    fn open(pid: i32) -> io::Result<Pidfd> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1;
        // no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor the kernel just returned, owned by nothing else.
        Ok(Pidfd(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }

    /// The recorded agent, if that very process still runs.
    fn of(agent: AgentProcess) -> Option<Pidfd> {
        let pidfd = Pidfd::open(agent.pid).ok()?;
        // Checked once the descriptor is open: it holds the process that was checked.
        agent.is_alive().then_some(pidfd)
    }

    /// Sends `signal`; nothing if the process is gone.
    fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, with no siginfo (null is
        // allowed) and no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        match r {
            0 => Ok(()),
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
                e => Err(e),
            },
        }
    }

    /// Whether the process has exited (a zombie has).
    fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own, without waiting.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    async fn exited(&self) {
        while !self.has_exited() {
            tokio::time::sleep(EXIT_POLL).await;
        }
    }
}

/// What the agent enters between fork and exec, opened before the fork: the agent
/// cgroup's `cgroup.procs` in every hierarchy, and the host's network namespace.
struct Entry {
    procs: Vec<File>,
    netns: File,
}

impl Entry {
    fn open(netns: &str, agent_cgroup: &SandboxCgroup) -> Result<Entry, NetnsError> {
        let procs = agent_cgroup
            .dirs()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error("opening", &path))
            })
            .collect::<Result<Vec<File>, NetnsError>>()?;
        let path = Path::new(NETNS_DIR).join(netns);
        let netns = File::open(&path).map_err(io_error("opening", &path))?;
        Ok(Entry { procs, netns })
    }

    /// Spawns `command` so that its process is in the agent cgroup and the network
    /// namespace before it executes anything: the agent never runs, nor forks, outside.
    fn spawn(&self, command: &mut Command) -> io::Result<Child> {
        // Allocated before the fork; the child only reads them.
        let procs: Vec<RawFd> = self.procs.iter().map(AsRawFd::as_raw_fd).collect();
        let netns = self.netns.as_raw_fd();
        let enter = move || -> io::Result<()> {
            for &fd in &procs {
                // Writing 0 moves the writing process, on v1 and v2.
                // SAFETY: write(2) of one byte from a static buffer to a descriptor that
                // is open until `spawn` returns; async-signal-safe.
                if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: setns(2) on an open network namespace descriptor, in the
            // single-threaded child; async-signal-safe.
            if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: `enter` runs in the forked child of a multi-threaded process, where only
        // async-signal-safe calls are sound: it makes only write(2) and setns(2) calls,
        // reads memory allocated before the fork, allocates nothing (an io::Error from
        // errno holds just the code) and takes no lock. The descriptors it uses belong to
        // `self`, which outlives this spawn, the only one of `command`.
        unsafe { command.pre_exec(enter) };
        command.spawn()
    }
}

/// The `ip` program (iproute2): in /usr/sbin on Debian, which a PATH may lack.
fn ip_program() -> &'static Path {
    static IP: OnceLock<PathBuf> = OnceLock::new();
    IP.get_or_init(|| {
        ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("ip"))
    })
}

fn ip_outcome(args: &[&str], output: io::Result<std::process::Output>) -> Result<(), NetnsError> {
    let failed = |stderr: String| NetnsError::Ip {
        args: args.join(" "),
        stderr,
    };
    match output {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )),
        Err(e) => Err(failed(format!(
            "cannot run {}: {e}",
            ip_program().display()
        ))),
    }
}

/// Runs `ip args`; its stderr is in the error.
async fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let output = Command::new(ip_program())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await;
    ip_outcome(args, output)
}

/// [`ip`], for callers that are not async.
fn ip_blocking(args: &[&str]) -> Result<(), NetnsError> {
    let output = std::process::Command::new(ip_program())
        .args(args)
        .stdin(Stdio::null())
        .output();
    ip_outcome(args, output)
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), NetnsError> {
    let plain = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if name.is_empty() || name.len() > max || !plain {
        return Err(NetnsError::BadName {
            what,
            name: name.to_string(),
            rule: "letters, digits, - and _ only",
        });
    }
    Ok(())
}

/// Bridge names leave room for `-<octet>` within an interface name's 15 characters.
fn check_bridge_name(name: &str) -> Result<(), NetnsError> {
    check_name("bridge", name, 10)
}

/// Makes the host's network namespace and veth pair: the bridge's end up on the bridge,
/// the other end `eth0` inside with the host's address, and `lo` up.
async fn create_network(bridge: &str, record: &HostRecord) -> Result<(), NetnsError> {
    let (netns, veth) = (record.netns.as_str(), record.veth.as_str());
    let address = format!("{}/24", record.address);
    ip(&["netns", "add", netns]).await?;
    if link_exists(veth) {
        // Left by a host whose release failed: the name is this bridge's, the address free.
        ip(&["link", "del", veth]).await?;
    }
    // The peer is made inside the namespace under its final name: no temporary name in
    // this namespace to collide with.
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ])
    .await?;
    ip(&["link", "set", veth, "master", bridge, "up"]).await?;
    ip(&["-n", netns, "addr", "add", &address, "dev", "eth0"]).await?;
    ip(&["-n", netns, "link", "set", "eth0", "up"]).await?;
    ip(&["-n", netns, "link", "set", "lo", "up"]).await
}

/// Removes the host's veth pair and network namespace, whichever exist.
async fn remove_network(record: &HostRecord) -> Result<(), NetnsError> {
    // The veth first: deleting one end deletes both at once, whereas the devices of a
    // namespace go only when the kernel gets round to destroying it.
    let veth = match link_exists(&record.veth) {
        true => ip(&["link", "del", &record.veth]).await,
        false => Ok(()),
    };
    let netns = match Path::new(NETNS_DIR).join(&record.netns).exists() {
        true => ip(&["netns", "del", &record.netns]).await,
        false => Ok(()),
    };
    veth.and(netns)
}

/// Makes the host's cgroup, limited to `shape` plus `overhead_memory` (every controller
/// on v1, the unified tree on v2), and the agent's cgroup in it; returns the latter.
fn create_cgroups(
    record: &HostRecord,
    shape: &Resources,
    overhead_memory: u64,
) -> Result<SandboxCgroup, NetnsError> {
    let host = CgroupRoot::detect(&record.cgroup_parent)?.create(&record.name)?;
    host.apply(&Limits {
        memory_bytes: Some(shape.memory_bytes.saturating_add(overhead_memory)),
        cpus: Some(shape.cpus),
        pids: None,
    })?;
    Ok(CgroupRoot::detect(&record.host_cgroup())?.create(AGENT_CGROUP)?)
}

/// Removes the host's cgroups, its agent being gone: the sandboxes' first ([`gc::collect`]
/// takes pooled sandboxes before their zygotes, whose pid namespaces cannot end before
/// them), then the agent's with whatever the agent left in it, then the host's.
fn remove_cgroups(record: &HostRecord) -> Result<(), NetnsError> {
    let host = record.host_cgroup();
    let sandboxes = CgroupRoot::detect(&format!("{host}/{SANDBOXES_CGROUP}"))?;
    let _ = gc::collect(&sandboxes);
    CgroupRoot::detect(&host)?.open(AGENT_CGROUP)?.destroy()?;
    remove_when_empty(&sandboxes)?;
    CgroupRoot::detect(&record.cgroup_parent)?
        .open(&record.name)?
        .destroy()?;
    Ok(())
}

/// Removes a sandboxes' parent once [`gc::collect`] has taken everything under it.
fn remove_when_empty(root: &CgroupRoot) -> Result<(), NetnsError> {
    let deadline = Instant::now() + SANDBOX_PATIENCE;
    loop {
        if root.remove_if_empty()? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NetnsError::Busy(root.parent().to_string()));
        }
        let _ = gc::collect(root);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes everything a host holds but its record and its log. The network goes even
/// when the cgroups fail to; the first failure is returned.
async fn release_resources(record: &HostRecord) -> Result<(), NetnsError> {
    let cgroups = {
        let record = record.clone();
        tokio::task::spawn_blocking(move || remove_cgroups(&record))
            .await
            .unwrap_or_else(|e| Err(NetnsError::Task(format!("removing cgroups: {e}"))))
    };
    let network = remove_network(record).await;
    cgroups.and(network)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminating_host_never_starts_its_agent() {
        assert!(Phase::Stopping.after(Event::AgentStarted).is_err());
        assert_eq!(
            Phase::Starting.after(Event::AgentStarted).unwrap(),
            Phase::Running
        );
        for phase in [
            Phase::Starting,
            Phase::Running,
            Phase::Stopping,
            Phase::Exited,
        ] {
            assert_eq!(phase.after(Event::Terminate).unwrap(), Phase::Stopping);
        }
    }

    #[test]
    fn a_host_ends_exited_only_by_its_own_failure() {
        assert_eq!(
            Phase::Running.after(Event::AgentExited).unwrap(),
            Phase::Exited
        );
        assert_eq!(
            Phase::Starting.after(Event::LaunchFailed).unwrap(),
            Phase::Exited
        );
        assert_eq!(
            Phase::Stopping.after(Event::ReleaseFailed).unwrap(),
            Phase::Exited
        );
        assert!(Phase::Exited.after(Event::AgentStarted).is_err());
        assert!(Phase::Running.after(Event::ReleaseFailed).is_err());
    }

    #[test]
    fn a_running_record_whose_agent_is_gone_is_listed_exited() {
        let me = std::process::id() as i32;
        let mut record = HostRecord {
            name: "small-1".into(),
            group: "small".into(),
            address: Ipv4Addr::new(10, 213, 0, 2),
            netns: "br-small-1".into(),
            veth: "br-2".into(),
            cgroup_parent: "hosts".into(),
            phase: Phase::Running,
            launched_at: 1,
            agent: Some(AgentProcess {
                pid: me,
                start_time: gc::process_start_time(me).unwrap(),
            }),
        };
        assert_eq!(record.provided().phase, HostPhase::Running);
        // The same pid, another process: a restart's stranger.
        record.agent = record.agent.map(|a| AgentProcess {
            start_time: a.start_time + 1,
            ..a
        });
        assert_eq!(record.provided().phase, HostPhase::Exited);
        record.agent = None;
        assert_eq!(record.provided().phase, HostPhase::Exited);
    }

    #[test]
    fn names_leave_room_for_interface_names() {
        assert!(check_bridge_name("hatchery0").is_ok());
        assert!(check_bridge_name("hatchery-br").is_err(), "11 characters");
        assert!(check_bridge_name("br/0").is_err());
        assert!(check_bridge_name("").is_err());
    }
}
