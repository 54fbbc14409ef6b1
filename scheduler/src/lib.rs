//! Hatchery's cluster scheduler.
//!
//! This crate will own the wire types, policy resolution, admission, placement,
//! host-group autoscaling and the per-host agent (see ARCHITECTURE.md). Nothing is
//! implemented yet: it exists so that the workspace has the agreed shape and the
//! dependency direction `sandbox` ← `scheduler` ← `api` is fixed from the start.
//!
//! [`vm`] boots Linux VMs under qemu (pure cgroup v2 guests running host binaries); the
//! `hatchery-vm` binary uses it to test the v2 cgroup backend, and the local cluster
//! simulation will use it for its hosts.

pub mod vm;
