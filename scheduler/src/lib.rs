//! Hatchery's scheduler side of the platform: the wire types ([`model`]), the store and
//! bus interfaces with their embedded backends, policy resolution and admission, the
//! platform front door the API calls ([`platform`]), the keyring and sealed-blob format of
//! everything stored at rest ([`seal`]), encrypted objects, admission ([`admission`]),
//! placement (pure decisions: [`placement`]; the scheduler role's loop: [`scheduling`]),
//! and the per-host agent that drives the `sandbox` runtime's warm pools ([`agent`]).
//!
//! [`provider`] makes and removes the hosts of groups: network namespaces on this machine
//! ([`provider::netns`]) or Linux VMs ([`provider::qemu`]), which [`provider::vm`] boots
//! under qemu (pure cgroup v2 guests running this machine's binaries; the `hatchery-vm`
//! binary uses it too, to test the v2 cgroup backend).

pub mod admission;
pub mod agent;
pub mod autoscale;
mod blocking;
pub mod bus;
pub mod embedded;
pub mod encrypted;
pub mod engines;
pub mod model;
pub mod node;
pub mod objects;
pub mod placement;
pub mod platform;
pub mod policy;
pub mod postgres;
pub mod private_files;
pub mod provider;
pub mod redis_bus;
pub mod scaler;
pub mod scheduling;
pub mod seal;
pub mod simulation;
pub mod store;
