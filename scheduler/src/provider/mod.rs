//! Providers make and remove the hosts of a group (R5, R7). The autoscaler
//! ([`crate::autoscale`]) decides; a provider acts: it launches a host of a group's shape
//! (which then runs `hatchery agent` and registers like any host), terminates a named
//! host, and lists the hosts it made with where each is in its life. One trait, so that
//! the same autoscaler drives local hosts ([`netns`]), VMs ([`qemu`], launched by
//! [`vm`]) and EC2 Auto Scaling groups (`ec2_asg`, with the `ec2-asg` feature).
//!
//! A provider never decides that a host may go: [`Provider::terminate`] is called only
//! for a host the autoscaler drained and saw empty, and what it does to the host's agent
//! is what an operator's SIGTERM does: the agent drains (it finishes whatever still runs,
//! kills nothing) and then exits.

#[cfg(feature = "ec2-asg")]
pub mod ec2_asg;
pub mod netns;
pub mod qemu;
pub mod vm;

use async_trait::async_trait;

use crate::autoscale::GroupConfig;
use crate::model::Millis;

/// Where a host a provider made is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostPhase {
    /// Being made (including a configured provisioning delay): its agent is not running
    /// yet.
    Starting,
    /// Its agent process runs (it may not have registered yet).
    Running,
    /// Asked to terminate: its agent drains and exits, then its resources are released.
    Stopping,
    /// Its agent exited without being asked to (crashed, killed, or drained after a
    /// signal from someone else): what it held must be released with
    /// [`Provider::terminate`].
    Exited,
}

/// A host a provider made.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProvidedHost {
    /// Its name: the agent id it registers with (unique, never reused by the provider).
    pub name: String,
    pub group: String,
    pub phase: HostPhase,
    /// When it was launched.
    pub launched_at: Millis,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("launching a host of group {group}: {reason}")]
    Launch { group: String, reason: String },
    #[error("terminating host {host}: {reason}")]
    Terminate { host: String, reason: String },
    #[error("no host {0} was made by this provider")]
    UnknownHost(String),
    #[error("listing hosts: {0}")]
    List(String),
    /// The provider itself cannot work (its network, its state directory).
    #[error("setting up the provider: {0}")]
    Setup(String),
}

/// Makes and removes the hosts of groups.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Its kind, as configured (`netns`, ...).
    fn kind(&self) -> &'static str;

    /// Starts making one host of `group` and returns its name at once; the host is in
    /// [`Provider::list`] from then on, [`HostPhase::Starting`] until its agent runs.
    async fn launch(&self, group: &GroupConfig) -> Result<String, ProviderError>;

    /// Terminates the named host: its agent is asked to stop as SIGTERM asks (it drains
    /// and exits), and what the host holds is released once it has. Returns once that
    /// has begun; the host is [`HostPhase::Stopping`] in the list until it is gone.
    async fn terminate(&self, host: &str) -> Result<(), ProviderError>;

    /// The hosts this provider made that are not gone yet.
    async fn list(&self) -> Result<Vec<ProvidedHost>, ProviderError>;
}
