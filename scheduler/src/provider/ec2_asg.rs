//! Hosts as EC2 instances of Auto Scaling groups: the `ec2-asg` provider
//! ([`Ec2AsgProvider`]), for production.
//!
//! Each host group is one Auto Scaling group (ASG). Hatchery, not AWS, picks which
//! instance goes: the provider makes every instance protected from scale-in (the ASG's
//! `NewInstancesProtectedFromScaleIn`, and `SetInstanceProtection` for any instance found
//! without it) and suspends `AZRebalance`, so AWS never terminates an instance to
//! balance zones or to meet a lower desired capacity.
//!
//! - **Scale-up** is `SetDesiredCapacity` to one more, never above the group's `max`
//!   nor the ASG's. Until AWS lists the new instance, the provider lists a placeholder
//!   host for each unit of desired capacity without an instance (`<group>-pending-<n>`,
//!   starting), so the autoscaler counts capacity on its way and does not launch twice;
//!   the truth is the ASG's desired capacity, so a restarted scheduler sees the same.
//! - **Instances are matched to agents by name**: a host's name is its instance id, which
//!   the instance's agent registers with (the launch template's user data sets
//!   `HATCHERY_AGENT_NAME` from the instance metadata).
//! - **Removal** comes only after the autoscaler drained the host and saw it empty:
//!   `TerminateInstanceInAutoScalingGroup`, decrementing the desired capacity unless that
//!   would take it below the group's `min` (then AWS replaces the instance).
//! - An instance AWS removes on its own (a spot reclaim, a failed health check) leaves
//!   the list: its agent stops heartbeating and what it ran is declared lost when its
//!   lease lapses, as for any host lost mid-run.
//!
//! Nothing here relies on lifecycle hooks, nor on the desired capacity AWS reports being
//! sane (an emulator may report it below zero): it is clamped. In production a
//! termination lifecycle hook that signals the agent and waits for its drain is a
//! backstop for terminations Hatchery did not ask for; the provider does not need it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use aws_sdk_autoscaling::types::{AutoScalingGroup, LifecycleState};
use aws_sdk_autoscaling::Client;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

pub use aws_sdk_autoscaling as sdk;

use super::{HostPhase, ProvidedHost, Provider, ProviderError};
use crate::autoscale::GroupConfig;
use crate::model::{now_ms, Millis};

/// The process AWS would otherwise use to terminate instances on its own.
const SUSPENDED: &[&str] = &["AZRebalance"];

/// The `ec2-asg` provider's settings.
#[derive(Debug, Clone)]
pub struct Ec2AsgConfig {
    /// The AWS region (`None`: from the environment or profile, as the AWS CLI does).
    pub region: Option<String>,
    /// Another endpoint for the Auto Scaling API (an emulator such as moto).
    pub endpoint: Option<String>,
    /// The groups this provider makes hosts for, with the name of each one's ASG.
    pub groups: Vec<(GroupConfig, String)>,
}

/// Makes hosts as instances of Auto Scaling groups.
pub struct Ec2AsgProvider {
    client: Client,
    /// By group name: the group and its ASG.
    groups: BTreeMap<String, (GroupConfig, String)>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// ASGs made ready (protection, suspended processes).
    prepared: std::collections::HashSet<String>,
    /// When each host (instance or placeholder) was first seen or launched.
    first_seen: HashMap<String, Millis>,
}

/// A snapshot of one ASG.
struct Snapshot {
    desired: u32,
    max: u32,
    /// Instance id, lifecycle state, protected from scale-in.
    instances: Vec<(String, Option<LifecycleState>, bool)>,
}

impl Snapshot {
    fn of(asg: &AutoScalingGroup) -> Snapshot {
        let clamp = |n: Option<i32>| n.unwrap_or(0).max(0) as u32;
        Snapshot {
            desired: clamp(asg.desired_capacity()),
            max: clamp(asg.max_size()),
            instances: asg
                .instances()
                .iter()
                .filter_map(|i| {
                    Some((
                        i.instance_id()?.to_string(),
                        i.lifecycle_state().cloned(),
                        i.protected_from_scale_in().unwrap_or(false),
                    ))
                })
                .collect(),
        }
    }

    /// Instances that count toward the desired capacity (not leaving).
    fn staying(&self) -> u32 {
        self.instances
            .iter()
            .filter(|(_, state, _)| !leaving(state.as_ref()))
            .count() as u32
    }
}

/// Whether an instance in this state is on its way out of the group (or out of its
/// capacity: standby, detached).
fn leaving(state: Option<&LifecycleState>) -> bool {
    state.is_some_and(|s| {
        let s = s.as_str();
        s.starts_with("Terminat")
            || s.starts_with("Detach")
            || s.contains("Standby")
            || s.starts_with("Warmed")
    })
}

/// The phase of an instance in this lifecycle state.
fn phase_of(state: Option<&LifecycleState>) -> HostPhase {
    match state {
        Some(s) if leaving(Some(s)) => HostPhase::Stopping,
        Some(LifecycleState::InService) => HostPhase::Running,
        _ => HostPhase::Starting,
    }
}

/// The name of the `n`th placeholder of `group` (capacity asked for, no instance yet).
fn placeholder(group: &str, n: u32) -> String {
    format!("{group}-pending-{n}")
}

/// An SDK error with its chain of sources.
pub fn aws_error(e: impl std::error::Error) -> String {
    // The SDK's Display is terse ("service error"); the source chain says what.
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Ec2AsgProvider {
    /// A client for the Auto Scaling API, from the settings and the environment
    /// (credentials as the AWS CLI finds them: `AWS_ACCESS_KEY_ID`/..., a profile, an
    /// instance role).
    pub async fn new(cfg: Ec2AsgConfig) -> Result<Ec2AsgProvider, ProviderError> {
        let client = Client::new(&sdk_config(cfg.region.as_deref(), cfg.endpoint.as_deref()).await);
        let groups = cfg
            .groups
            .into_iter()
            .map(|(g, asg)| (g.name.clone(), (g, asg)))
            .collect();
        Ok(Ec2AsgProvider {
            client,
            groups,
            state: Mutex::default(),
        })
    }

    /// The SDK client (for tools and tests that set up groups).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ASGs of every group, by ASG name.
    async fn describe(&self) -> Result<HashMap<String, AutoScalingGroup>, String> {
        let names: Vec<String> = self.groups.values().map(|(_, asg)| asg.clone()).collect();
        let mut found = HashMap::new();
        for chunk in names.chunks(50) {
            let mut token = None;
            loop {
                let out = self
                    .client
                    .describe_auto_scaling_groups()
                    .set_auto_scaling_group_names(Some(chunk.to_vec()))
                    .set_next_token(token)
                    .send()
                    .await
                    .map_err(aws_error)?;
                for g in out.auto_scaling_groups() {
                    if let Some(name) = g.auto_scaling_group_name() {
                        found.insert(name.to_string(), g.clone());
                    }
                }
                token = out.next_token().map(str::to_string);
                if token.is_none() {
                    break;
                }
            }
        }
        Ok(found)
    }

    async fn describe_one(&self, asg: &str) -> Result<Snapshot, String> {
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(asg)
            .send()
            .await
            .map_err(aws_error)?;
        out.auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(asg))
            .map(Snapshot::of)
            .ok_or_else(|| format!("no Auto Scaling group {asg}"))
    }

    /// Makes the ASG's instances Hatchery's to pick: new instances protected from
    /// scale-in, AZRebalance suspended (once per ASG and provider), and any instance
    /// found unprotected protected.
    async fn prepare(&self, asg: &str, snapshot: &Snapshot) -> Result<(), String> {
        let first = !self.state().prepared.contains(asg);
        if first {
            self.client
                .update_auto_scaling_group()
                .auto_scaling_group_name(asg)
                .new_instances_protected_from_scale_in(true)
                .send()
                .await
                .map_err(aws_error)?;
            self.client
                .suspend_processes()
                .auto_scaling_group_name(asg)
                .set_scaling_processes(Some(SUSPENDED.iter().map(|s| s.to_string()).collect()))
                .send()
                .await
                .map_err(aws_error)?;
            self.state().prepared.insert(asg.to_string());
            tracing::info!(
                asg,
                "ec2-asg: instances protected from scale-in, AZRebalance suspended"
            );
        }
        let unprotected: Vec<String> = snapshot
            .instances
            .iter()
            .filter(|(_, state, protected)| !protected && !leaving(state.as_ref()))
            .map(|(id, _, _)| id.clone())
            .collect();
        for ids in unprotected.chunks(50) {
            self.client
                .set_instance_protection()
                .auto_scaling_group_name(asg)
                .set_instance_ids(Some(ids.to_vec()))
                .protected_from_scale_in(true)
                .send()
                .await
                .map_err(aws_error)?;
            tracing::info!(asg, instances = ?ids, "ec2-asg: protected instances from scale-in");
        }
        Ok(())
    }

    /// The group and ASG of host `name`: an instance of one of the ASGs, or a
    /// placeholder.
    async fn locate(&self, name: &str) -> Result<(GroupConfig, String, Snapshot), ProviderError> {
        let list = |e: String| ProviderError::List(e);
        for (group, asg) in self.groups.values() {
            if name.starts_with(&format!("{}-pending-", group.name)) {
                let snapshot = self.describe_one(asg).await.map_err(list)?;
                return Ok((group.clone(), asg.clone(), snapshot));
            }
        }
        let found = self.describe().await.map_err(list)?;
        for (group, asg) in self.groups.values() {
            if let Some(g) = found.get(asg) {
                let snapshot = Snapshot::of(g);
                if snapshot.instances.iter().any(|(id, _, _)| id == name) {
                    return Ok((group.clone(), asg.clone(), snapshot));
                }
            }
        }
        Err(ProviderError::UnknownHost(name.to_string()))
    }
}

/// The SDK's configuration: region and endpoint if given, else the environment's; HTTPS
/// through rustls on ring.
pub async fn sdk_config(region: Option<&str>, endpoint: Option<&str>) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest()).http_client(http);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_string()));
    }
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// The SDK's configuration for an emulator at `endpoint` (moto takes any credentials).
pub async fn emulator_sdk_config(region: &str, endpoint: &str) -> aws_config::SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(sdk::config::Credentials::new(
            "hatchery-local",
            "hatchery-local",
            None,
            None,
            "emulator",
        ))
        .load()
        .await
}

#[async_trait]
impl Provider for Ec2AsgProvider {
    fn kind(&self) -> &'static str {
        "ec2-asg"
    }

    async fn launch(&self, group: &GroupConfig) -> Result<String, ProviderError> {
        let failed = |reason: String| ProviderError::Launch {
            group: group.name.clone(),
            reason,
        };
        let (_, asg) = self
            .groups
            .get(&group.name)
            .ok_or_else(|| failed("no Auto Scaling group is configured for it".into()))?;
        let snapshot = self.describe_one(asg).await.map_err(failed)?;
        self.prepare(asg, &snapshot).await.map_err(failed)?;
        // Desired capacity below what stays would be an emulator's quirk: count from
        // what is there.
        let current = snapshot.desired.max(snapshot.staying());
        let ceiling = group.max.min(snapshot.max);
        if current >= ceiling {
            return Err(failed(format!(
                "the group has {current} hosts, its most (max {}, the ASG's {})",
                group.max, snapshot.max
            )));
        }
        self.client
            .set_desired_capacity()
            .auto_scaling_group_name(asg)
            .desired_capacity((current + 1) as i32)
            .honor_cooldown(false)
            .send()
            .await
            .map_err(|e| failed(aws_error(e)))?;
        tracing::info!(
            asg,
            desired = current + 1,
            "ec2-asg: desired capacity raised"
        );
        // The new instance's id when AWS lists it already, else its placeholder's name.
        let before: std::collections::HashSet<&str> = snapshot
            .instances
            .iter()
            .map(|(id, _, _)| id.as_str())
            .collect();
        let name = match self.describe_one(asg).await {
            Ok(after) => after
                .instances
                .iter()
                .map(|(id, _, _)| id.clone())
                .find(|id| !before.contains(id.as_str())),
            Err(_) => None,
        }
        .unwrap_or_else(|| placeholder(&group.name, current + 1 - snapshot.staying()));
        self.state().first_seen.insert(name.clone(), now_ms());
        Ok(name)
    }

    async fn terminate(&self, name: &str) -> Result<(), ProviderError> {
        let (group, asg, snapshot) = self.locate(name).await?;
        let failed = |reason: String| ProviderError::Terminate {
            host: name.to_string(),
            reason,
        };
        let staying = snapshot.staying();
        if name.starts_with(&format!("{}-pending-", group.name)) {
            // Capacity asked for and not there yet: ask for less, never below min nor
            // below the instances there are (those are protected: nothing is killed).
            if snapshot.desired > staying.max(group.min) {
                self.client
                    .set_desired_capacity()
                    .auto_scaling_group_name(&asg)
                    .desired_capacity((snapshot.desired - 1) as i32)
                    .honor_cooldown(false)
                    .send()
                    .await
                    .map_err(|e| failed(aws_error(e)))?;
            }
            self.state().first_seen.remove(name);
            return Ok(());
        }
        // The capacity goes with the instance unless that takes the group below min.
        let decrement = snapshot.desired.max(staying) > group.min;
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(name)
            .should_decrement_desired_capacity(decrement)
            .send()
            .await
            .map_err(|e| failed(aws_error(e)))?;
        tracing::info!(
            asg,
            instance = name,
            decrement,
            "ec2-asg: instance terminated"
        );
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ProvidedHost>, ProviderError> {
        let found = self.describe().await.map_err(ProviderError::List)?;
        let now = now_ms();
        let mut hosts = Vec::new();
        for (group, asg) in self.groups.values() {
            let Some(g) = found.get(asg) else {
                return Err(ProviderError::List(format!("no Auto Scaling group {asg}")));
            };
            let snapshot = Snapshot::of(g);
            if let Err(e) = self.prepare(asg, &snapshot).await {
                tracing::warn!(asg, error = %e, "ec2-asg: cannot protect the group's instances");
            }
            let mut state = self.state();
            for (id, lifecycle, _) in &snapshot.instances {
                let launched_at = *state.first_seen.entry(id.clone()).or_insert(now);
                hosts.push(ProvidedHost {
                    name: id.clone(),
                    group: group.name.clone(),
                    phase: phase_of(lifecycle.as_ref()),
                    launched_at,
                });
            }
            let pending = snapshot.desired.saturating_sub(snapshot.staying());
            for n in 1..=pending {
                let name = placeholder(&group.name, n);
                let launched_at = *state.first_seen.entry(name.clone()).or_insert(now);
                hosts.push(ProvidedHost {
                    name,
                    group: group.name.clone(),
                    phase: HostPhase::Starting,
                    launched_at,
                });
            }
        }
        // Forget what is no longer there.
        let listed: std::collections::HashSet<&str> =
            hosts.iter().map(|h| h.name.as_str()).collect();
        self.state()
            .first_seen
            .retain(|name, _| listed.contains(name.as_str()));
        Ok(hosts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_states_map_to_phases() {
        use LifecycleState as L;
        assert_eq!(phase_of(Some(&L::Pending)), HostPhase::Starting);
        assert_eq!(phase_of(Some(&L::PendingWait)), HostPhase::Starting);
        assert_eq!(phase_of(Some(&L::InService)), HostPhase::Running);
        assert_eq!(phase_of(Some(&L::Terminating)), HostPhase::Stopping);
        assert_eq!(phase_of(Some(&L::TerminatingWait)), HostPhase::Stopping);
        assert_eq!(phase_of(Some(&L::Standby)), HostPhase::Stopping);
        assert_eq!(phase_of(Some(&L::Detaching)), HostPhase::Stopping);
        assert_eq!(phase_of(None), HostPhase::Starting);
    }

    #[test]
    fn a_desired_capacity_below_zero_counts_as_zero() {
        let g = AutoScalingGroup::builder()
            .auto_scaling_group_name("a")
            .desired_capacity(-2)
            .max_size(3)
            .build();
        let s = Snapshot::of(&g);
        assert_eq!((s.desired, s.max, s.staying()), (0, 3, 0));
    }
}
