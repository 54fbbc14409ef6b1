//! The end-to-end suite of `e2e.rs`, every test of it, against a local cluster instead of
//! `hatchery up`: a private PostgreSQL, Redis and S3 (moto), two `hatchery api` replicas
//! (requests take turns over them), two schedulers and two agents, each its own process
//! (see `hatchery_api::local_cluster`). The harness picks the cluster for this target
//! (`harness::on_cluster`).
//!
//! Needs root, PostgreSQL, Redis, moto (scripts/setup-deps.sh installs them), the root
//! filesystem and the sandbox binaries.

#[path = "e2e.rs"]
mod e2e;
