//! Hosts as Linux VMs on this machine: the `qemu` provider ([`QemuProvider`]), the local
//! Linux VM simulation.
//!
//! A host is one VM of the VM harness ([`super::vm`]): Debian's kernel with a pure
//! cgroup v2 hierarchy, this machine's root shared read-only (so the guest runs this
//! machine's `hatchery` binary, its configuration file and its root filesystems at their
//! paths), and qemu's user-mode network. qemu opens the guest's connections from this
//! machine's own network stack, so the agent reaches an engine at any address this
//! machine listens on, unchanged (its loopback is also
//! [`USER_NET_HOST`](super::vm::qemu::USER_NET_HOST)); nothing reaches into the guest.
//! The VM has the group's memory plus an overhead for the guest's kernel, the agent and
//! its zygotes, and the group's CPUs rounded up.
//!
//! In the guest a small supervisor ([`SUPERVISOR`]) starts `hatchery agent` and watches
//! a control directory shared read-write with this machine: each `term-<n>` file written
//! there is one SIGTERM to the agent, so [`Provider::terminate`] drains the host exactly
//! as an operator's SIGTERM does (the first signal drains, a second forces), and the VM
//! powers off once the agent has exited. Only [`QemuProvider::stop_all`] kills a VM.
//!
//! The hosts live as long as the process that made them: each VM is a child of the
//! thread that drives it, and qemu is killed if that thread (or the whole process) dies
//! (`PR_SET_PDEATHSIG`). A scheduler that restarts finds none of its VMs: their hosts are
//! lost, as hosts whose machine died are. That is what a local simulation needs; the
//! production provider (an auto-scaling group) keeps its state in the cloud.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::vm::serial::GuestEvent;
use super::vm::{run_in_guest, AccelChoice, GuestCommand, GuestOptions, GuestProgress, GuestShare};
use super::{HostPhase, ProvidedHost, Provider, ProviderError};
use crate::autoscale::GroupConfig;
use crate::model::{now_ms, Millis};

/// Where the control directory is in the guest.
const GUEST_CONTROL: &str = "/run/hatchery-control";
/// How often the provider looks at its hosts while it waits for them to go.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// A host's VM has no time limit of its own; this bounds the arithmetic only.
const FOREVER: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The guest's supervisor: `sh -c SUPERVISOR hatchery-host <control dir> <agent argv>`.
/// It runs the agent in the background and sends it one SIGTERM per `term-<n>` file
/// that appears in the control directory (`term-1`, then `term-2`, ...), then exits
/// with the agent's status. Shell builtins only in the loop, but for `sleep`.
pub const SUPERVISOR: &str = r#"ctl=$1
shift
"$@" &
agent=$!
sent=0
while kill -0 "$agent" 2>/dev/null; do
    while [ -e "$ctl/term-$((sent + 1))" ]; do
        sent=$((sent + 1))
        echo "hatchery-host: SIGTERM $sent to the agent" >&2
        kill -TERM "$agent"
    done
    sleep 0.5
done
wait "$agent"
"#;

/// The `qemu` provider's settings.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Each host's log (`<state_dir>/logs/<name>.log`: its agent's output and the
    /// guest's console, kept after the host goes) and its control directory
    /// (`<state_dir>/control/<name>`, removed with the host).
    pub state_dir: PathBuf,
    /// The agent's program and arguments, e.g. [current_exe, "agent", "--config", path]:
    /// paths on this machine, which the guest sees read-only at the same place.
    pub agent_command: Vec<OsString>,
    /// The agent's environment. The guest starts from an empty one: this is all the
    /// agent gets, with the host's own variables (name, group) added.
    pub agent_env: Vec<(String, String)>,
    /// How long making a host takes before its VM boots (to show a host on its way).
    pub launch_delay: Duration,
    /// Memory the VM has beyond the group's shape, for the guest kernel, the agent and
    /// its zygotes.
    pub overhead_memory: u64,
    /// KVM, TCG, or KVM when it works (the default).
    pub accel: AccelChoice,
    /// The guest's kernel (a `bzImage`); `None` picks the newest with modules in `/boot`.
    pub kernel: Option<PathBuf>,
    /// Directories of this machine shared read-only at their own paths, beside the root
    /// (whose guest view is an overlay): the sandboxes' root filesystems must be there,
    /// since a sandbox's own overlay cannot stack on the guest's.
    pub shares: Vec<PathBuf>,
}

impl QemuConfig {
    /// Settings with the defaults: no launch delay, 768 MiB of overhead, KVM when it
    /// works, the newest kernel.
    pub fn new(
        state_dir: impl Into<PathBuf>,
        agent_command: Vec<OsString>,
        agent_env: Vec<(String, String)>,
    ) -> QemuConfig {
        QemuConfig {
            state_dir: state_dir.into(),
            agent_command,
            agent_env,
            launch_delay: Duration::ZERO,
            overhead_memory: 768 << 20,
            accel: AccelChoice::Auto,
            kernel: None,
            shares: Vec::new(),
        }
    }
}

/// The environment a host's agent gets by default: this process's own, as an agent
/// started on this machine would inherit it (variables whose names a shell cannot export
/// are left out).
pub fn inherited_env() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(name, _)| {
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric())
        })
        .collect()
}

/// One host: what the provider knows of it.
struct Host {
    group: String,
    phase: HostPhase,
    launched_at: Millis,
    /// Kills the VM (or keeps it from booting).
    kill: Arc<AtomicBool>,
    /// SIGTERMs asked of its agent so far.
    terms: u32,
    control: PathBuf,
    /// Its driving thread has returned: the VM is gone.
    done: bool,
}

struct Inner {
    cfg: QemuConfig,
    hosts: Mutex<BTreeMap<String, Host>>,
    launches: AtomicU64,
}

/// Makes hosts as VMs on this machine.
pub struct QemuProvider {
    inner: Arc<Inner>,
}

impl QemuProvider {
    /// Checks the settings and makes the state directory.
    pub fn new(cfg: QemuConfig) -> Result<QemuProvider, ProviderError> {
        if cfg.agent_command.is_empty() {
            return Err(ProviderError::Setup(
                "no agent command is configured".into(),
            ));
        }
        for dir in ["logs", "control"] {
            let path = cfg.state_dir.join(dir);
            fs::create_dir_all(&path)
                .map_err(|e| ProviderError::Setup(format!("creating {}: {e}", path.display())))?;
        }
        Ok(QemuProvider {
            inner: Arc::new(Inner {
                cfg,
                hosts: Mutex::default(),
                launches: AtomicU64::new(0),
            }),
        })
    }

    /// Where the named host's log is (its agent's output and the guest's console).
    pub fn log_path(&self, host: &str) -> PathBuf {
        self.inner.log_path(host)
    }

    /// Stops every host: asks each agent to drain, after `grace` forces the drains
    /// (a second SIGTERM), after another `grace` kills the VMs; returns once every VM is
    /// gone.
    pub async fn stop_all(&self, grace: Duration) {
        let names: Vec<String> = self.inner.lock().keys().cloned().collect();
        for name in &names {
            if let Err(e) = self.terminate(name).await {
                tracing::warn!(host = %name, error = %e, "cannot terminate");
            }
        }
        if !self.wait_until_empty(grace).await {
            tracing::warn!(
                ?grace,
                "hosts still running: forcing their drain (second SIGTERM)"
            );
            let names: Vec<String> = self.inner.lock().keys().cloned().collect();
            for name in &names {
                let _ = self.inner.signal(name);
            }
        }
        if !self.wait_until_empty(grace).await {
            tracing::warn!(?grace, "hosts still running: killing their VMs");
            for host in self.inner.lock().values() {
                host.kill.store(true, Ordering::SeqCst);
            }
        }
        while !self.wait_until_empty(Duration::from_secs(5)).await {
            // A host whose VM is gone but was not asked to stop: release it.
            let exited: Vec<String> = self
                .inner
                .lock()
                .iter()
                .filter(|(_, h)| h.done)
                .map(|(n, _)| n.clone())
                .collect();
            for name in exited {
                let _ = self.terminate(&name).await;
            }
        }
    }

    /// Whether every host is gone within `within`.
    async fn wait_until_empty(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.inner.lock().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Host>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self, host: &str) -> PathBuf {
        self.cfg.state_dir.join("logs").join(format!("{host}.log"))
    }

    /// A name no host of this provider had: the group's, a time and a counter.
    fn fresh_name(&self, group: &str) -> String {
        let n = self.launches.fetch_add(1, Ordering::Relaxed);
        format!("{group}-vm{:x}{n}", now_ms() % 0x100_0000)
    }

    /// Asks the named host's agent for one more SIGTERM (the guest's supervisor sends
    /// it). Returns how many it has been asked for.
    fn signal(&self, name: &str) -> Result<u32, ProviderError> {
        let mut hosts = self.lock();
        let host = hosts
            .get_mut(name)
            .ok_or_else(|| ProviderError::UnknownHost(name.to_string()))?;
        let next = host.terms + 1;
        let path = host.control.join(format!("term-{next}"));
        fs::write(&path, b"").map_err(|e| ProviderError::Terminate {
            host: name.to_string(),
            reason: format!("writing {}: {e}", path.display()),
        })?;
        host.terms = next;
        Ok(next)
    }

    /// The VM of `name`, from its launch delay to its end. Runs on its own thread: qemu
    /// dies with it.
    fn drive(self: Arc<Self>, name: String, group: GroupConfig, kill: Arc<AtomicBool>) {
        let deadline = Instant::now() + self.cfg.launch_delay;
        while Instant::now() < deadline && !kill.load(Ordering::SeqCst) {
            std::thread::sleep(WAIT_POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        let outcome = if kill.load(Ordering::SeqCst) {
            Err("terminated before its VM booted".to_string())
        } else {
            self.run_vm(&name, &group, &kill)
        };
        let mut hosts = self.lock();
        let Some(host) = hosts.get_mut(&name) else {
            return;
        };
        host.done = true;
        match (&outcome, host.phase) {
            (_, HostPhase::Stopping) => {
                tracing::info!(host = %name, outcome = ?outcome, "host gone");
                let control = host.control.clone();
                hosts.remove(&name);
                let _ = fs::remove_dir_all(control);
            }
            (Ok(()), _) => {
                tracing::warn!(host = %name, "the agent exited without being asked to: the host is exited");
                host.phase = HostPhase::Exited;
            }
            (Err(e), _) => {
                tracing::warn!(host = %name, error = %e, "the host's VM ended: the host is exited");
                host.phase = HostPhase::Exited;
            }
        }
    }

    /// Boots the host's VM and runs its agent until the agent exits and the VM powers
    /// off. `Ok` when the agent exited 0.
    fn run_vm(&self, name: &str, group: &GroupConfig, kill: &AtomicBool) -> Result<(), String> {
        let control = self.cfg.state_dir.join("control").join(name);
        let path = self.log_path(name);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let mut argv = vec![
            "/bin/sh".to_string(),
            "-c".into(),
            SUPERVISOR.into(),
            "hatchery-host".into(),
            GUEST_CONTROL.into(),
        ];
        for arg in &self.cfg.agent_command {
            argv.push(
                arg.to_str()
                    .ok_or_else(|| format!("the agent command {arg:?} is not utf-8"))?
                    .to_string(),
            );
        }
        let mut env = self.cfg.agent_env.clone();
        env.retain(|(k, _)| !matches!(k.as_str(), "HATCHERY_AGENT_NAME" | "HATCHERY_GROUP"));
        env.push(("HATCHERY_AGENT_NAME".into(), name.into()));
        env.push(("HATCHERY_GROUP".into(), group.name.clone()));
        if let Some(n) = group.pool_size {
            env.retain(|(k, _)| k != "HATCHERY_POOL_SIZE");
            env.push(("HATCHERY_POOL_SIZE".into(), n.to_string()));
        }
        // This process's working directory, which relative paths of the config are
        // read against, when the guest sees it (its /run, /dev, /proc and /sys are its
        // own).
        let cwd = std::env::current_dir()
            .ok()
            .filter(|d| {
                !["/run", "/dev", "/proc", "/sys"]
                    .iter()
                    .any(|own| d.starts_with(own))
            })
            .unwrap_or_else(|| PathBuf::from("/"));
        let command = GuestCommand { argv, cwd, env };
        let options = GuestOptions {
            kernel: self.cfg.kernel.clone(),
            memory_mib: vm_memory_mib(group, self.cfg.overhead_memory),
            cpus: vm_cpus(group),
            timeout: FOREVER,
            accel: self.cfg.accel,
            shares: std::iter::once(GuestShare {
                host_path: control,
                guest_path: GUEST_CONTROL.into(),
                readonly: false,
            })
            .chain(self.cfg.shares.iter().map(|dir| GuestShare {
                host_path: dir.clone(),
                guest_path: dir.clone(),
                readonly: true,
            }))
            .collect(),
            network: true,
            ..GuestOptions::default()
        };
        let mut progress = |p: GuestProgress<'_>| {
            let _ = match p {
                GuestProgress::Booted { accel, why_not_kvm } => writeln!(
                    log,
                    "hatchery-host: VM booted ({accel}{})",
                    why_not_kvm.map(|w| format!(": {w}")).unwrap_or_default()
                ),
                GuestProgress::Event(GuestEvent::Begin) => {
                    let mut hosts = self.lock();
                    if let Some(host) = hosts.get_mut(name) {
                        if host.phase == HostPhase::Starting {
                            host.phase = HostPhase::Running;
                        }
                    }
                    drop(hosts);
                    tracing::info!(host = %name, "host started: its agent runs");
                    writeln!(log, "hatchery-host: the agent starts")
                }
                GuestProgress::Output(line) => {
                    log.write_all(line).and_then(|()| log.write_all(b"\n"))
                }
                GuestProgress::Console(line) => writeln!(log, "console: {line}"),
                _ => Ok(()),
            };
        };
        let outcome = run_in_guest(&command, &options, kill, &mut progress)
            .map_err(|e| format!("the VM did not run: {e}"))?;
        let _ = writeln!(log, "hatchery-host: VM ended: {:?}", outcome.exit);
        match outcome.failure() {
            None => Ok(()),
            Some(why) => Err(why),
        }
    }
}

/// The VM's memory: the group's shape and the overhead, in MiB (at least 256).
fn vm_memory_mib(group: &GroupConfig, overhead: u64) -> u32 {
    let bytes = group.shape.memory_bytes.saturating_add(overhead);
    u32::try_from(bytes.div_ceil(1 << 20))
        .unwrap_or(u32::MAX)
        .max(256)
}

/// The VM's CPUs: the group's, rounded up (at least 1).
fn vm_cpus(group: &GroupConfig) -> u32 {
    (group.shape.cpus.ceil() as u32).max(1)
}

#[async_trait]
impl Provider for QemuProvider {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, group: &GroupConfig) -> Result<String, ProviderError> {
        let name = self.inner.fresh_name(&group.name);
        let control = self.inner.cfg.state_dir.join("control").join(&name);
        fs::create_dir_all(&control).map_err(|e| ProviderError::Launch {
            group: group.name.clone(),
            reason: format!("creating {}: {e}", control.display()),
        })?;
        let kill = Arc::new(AtomicBool::new(false));
        self.inner.lock().insert(
            name.clone(),
            Host {
                group: group.name.clone(),
                phase: HostPhase::Starting,
                launched_at: now_ms(),
                kill: kill.clone(),
                terms: 0,
                control,
                done: false,
            },
        );
        tracing::info!(host = %name, group = %group.name, "launching host (a VM)");
        let inner = self.inner.clone();
        let (thread_name, group) = (name.clone(), group.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("vm {name}"))
            .spawn(move || inner.drive(thread_name, group, kill));
        if let Err(e) = spawned {
            let host = self.inner.lock().remove(&name);
            if let Some(host) = host {
                let _ = fs::remove_dir_all(host.control);
            }
            return Err(ProviderError::Launch {
                group: name,
                reason: format!("starting the VM's thread: {e}"),
            });
        }
        Ok(name)
    }

    async fn terminate(&self, name: &str) -> Result<(), ProviderError> {
        let phase = {
            let mut hosts = self.inner.lock();
            let host = hosts
                .get_mut(name)
                .ok_or_else(|| ProviderError::UnknownHost(name.to_string()))?;
            if host.done {
                // Its VM is gone already: release it now.
                let control = host.control.clone();
                hosts.remove(name);
                let _ = fs::remove_dir_all(control);
                return Ok(());
            }
            std::mem::replace(&mut host.phase, HostPhase::Stopping)
        };
        match phase {
            HostPhase::Starting => {
                // Nothing runs on it yet: its VM stops booting, or never boots.
                if let Some(host) = self.inner.lock().get(name) {
                    host.kill.store(true, Ordering::SeqCst);
                }
                Ok(())
            }
            HostPhase::Running | HostPhase::Exited => self.inner.signal(name).map(|_| ()),
            HostPhase::Stopping => Ok(()),
        }
    }

    async fn list(&self) -> Result<Vec<ProvidedHost>, ProviderError> {
        Ok(self
            .inner
            .lock()
            .iter()
            .map(|(name, h)| ProvidedHost {
                name: name.clone(),
                group: h.group.clone(),
                phase: h.phase,
                launched_at: h.launched_at,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Resources;

    fn group(memory: u64, cpus: f64) -> GroupConfig {
        GroupConfig {
            name: "g".into(),
            shape: Resources::new(memory, cpus),
            languages: vec!["r".into()],
            min: 0,
            max: 1,
            scale_down_after: Duration::from_secs(1),
            cooldown_up: Duration::ZERO,
            cooldown_down: Duration::ZERO,
            pool_size: None,
            provider: "qemu".into(),
        }
    }

    #[test]
    fn a_vm_has_the_groups_shape_and_the_overhead() {
        assert_eq!(vm_memory_mib(&group(1 << 30, 1.0), 768 << 20), 1792);
        assert_eq!(vm_memory_mib(&group(1, 0.5), 0), 256);
        assert_eq!(vm_cpus(&group(1 << 30, 0.5)), 1);
        assert_eq!(vm_cpus(&group(1 << 30, 2.5)), 3);
    }

    /// The supervisor sends one SIGTERM per control file, in order, and exits with the
    /// agent's status: a stand-in agent that counts its SIGTERMs and exits at the second.
    #[test]
    fn the_supervisor_turns_control_files_into_sigterms() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl");
        fs::create_dir(&ctl).unwrap();
        let agent = "n=0; trap 'n=$((n+1)); echo term $n; [ $n -ge 2 ] && exit 7' TERM; \
                     while :; do sleep 0.1; done";
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", SUPERVISOR, "hatchery-host"])
            .arg(&ctl)
            .args(["/bin/sh", "-c", agent])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(child.try_wait().unwrap().is_none(), "nothing asked yet");
        fs::write(ctl.join("term-1"), b"").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(child.try_wait().unwrap().is_none(), "one SIGTERM only");
        fs::write(ctl.join("term-2"), b"").unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "term 1\nterm 2\n");
    }

    fn provider(dir: &std::path::Path, delay: Duration, kernel: &str) -> QemuProvider {
        let mut cfg = QemuConfig::new(dir, vec!["/bin/true".into()], Vec::new());
        cfg.launch_delay = delay;
        cfg.kernel = Some(kernel.into());
        QemuProvider::new(cfg).unwrap()
    }

    async fn phases(p: &QemuProvider) -> Vec<(String, HostPhase)> {
        p.list()
            .await
            .unwrap()
            .into_iter()
            .map(|h| (h.name, h.phase))
            .collect()
    }

    async fn wait_for(p: &QemuProvider, what: &str, pred: impl Fn(&[(String, HostPhase)]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = phases(p).await;
            if pred(&now) {
                return;
            }
            assert!(Instant::now() < deadline, "never {what}: {now:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A host terminated during its launch delay never boots, and goes with its
    /// control directory; names are never reused.
    #[tokio::test]
    async fn a_host_terminated_before_it_boots_goes_without_booting() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path(), Duration::from_secs(30), "/nonexistent/vmlinuz");
        let g = group(1 << 30, 1.0);
        let a = p.launch(&g).await.unwrap();
        let b = p.launch(&g).await.unwrap();
        assert_ne!(a, b);
        assert!(dir.path().join("control").join(&a).is_dir());
        assert_eq!(
            phases(&p).await,
            vec![
                (a.clone(), HostPhase::Starting),
                (b.clone(), HostPhase::Starting)
            ]
        );
        p.terminate(&a).await.unwrap();
        assert_eq!(phases(&p).await[0], (a.clone(), HostPhase::Stopping));
        wait_for(&p, "gone", |h| h.len() == 1).await;
        assert!(!dir.path().join("control").join(&a).exists());
        let log = fs::read_to_string(p.log_path(&a)).unwrap_or_default();
        assert!(!log.contains("VM booted"), "{log}");
        assert!(matches!(
            p.terminate(&a).await,
            Err(ProviderError::UnknownHost(_))
        ));
        p.stop_all(Duration::from_millis(100)).await;
        assert!(phases(&p).await.is_empty());
    }

    /// A VM that cannot boot leaves its host exited (its agent never ran), for the
    /// autoscaler to terminate, which releases it at once.
    #[tokio::test]
    async fn a_host_whose_vm_cannot_boot_is_exited_then_released() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider(dir.path(), Duration::ZERO, "/nonexistent/vmlinuz");
        let a = p.launch(&group(1 << 30, 1.0)).await.unwrap();
        wait_for(&p, "exited", |h| h == [(a.clone(), HostPhase::Exited)]).await;
        p.terminate(&a).await.unwrap();
        assert!(phases(&p).await.is_empty());
        assert!(!dir.path().join("control").join(&a).exists());
    }

    #[test]
    fn inherited_env_leaves_out_names_a_shell_cannot_export() {
        for (name, _) in inherited_env() {
            assert!(
                name.chars().all(|c| c == '_' || c.is_ascii_alphanumeric()),
                "{name}"
            );
        }
    }
}
