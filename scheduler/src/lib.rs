//! Hatchery's scheduler side of the platform: the wire types ([`model`]), the store and
//! bus interfaces with their embedded backends, policy resolution and admission, the
//! platform front door the API calls ([`platform`]), the keyring and sealed-blob format of
//! everything stored at rest ([`seal`]), encrypted objects, admission ([`admission`]),
//! placement (pure decisions: [`placement`]; the scheduler role's loop: [`scheduling`]),
//! and the per-host agent that drives the `sandbox` runtime's warm pools ([`agent`]).
//!
//! [`vm`] boots Linux VMs under qemu (pure cgroup v2 guests running host binaries); the
//! `hatchery-vm` binary uses it to test the v2 cgroup backend, and the local cluster
//! simulation will use it for its hosts.

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
pub mod vm;
