//! Hatchery's cluster scheduler.
//!
//! This crate will own the wire types, policy resolution, admission, placement,
//! host-group autoscaling and the per-host agent (see ARCHITECTURE.md). Nothing is
//! implemented yet: it exists so that the workspace has the agreed shape and the
//! dependency direction `sandbox` ← `scheduler` ← `api` is fixed from the start.
