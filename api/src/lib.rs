//! Hatchery's HTTP + WebSocket API and the pieces of the `hatchery` binary.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | settings (defaults ▷ TOML file ▷ `HATCHERY_*` environment) and the platform's keys |
//! | [`auth`] | HS256 bearer tokens: minting and verifying |
//! | [`routes`] | the route table, as data (router, metrics labels and the OpenAPI test read it) |
//! | [`server`] | the hyper server: connections, routing, auth, panics, logs, graceful shutdown |
//! | [`handlers`] | the HTTP handlers over the platform front door |
//! | [`console`] | the web console (playground and monitor), its assets embedded in the binary, and the local one-click sign-in |
//! | [`ws`] | the WebSocket streams: events of one execution, of a caller, the admin monitor |
//! | [`error`] | JSON errors with stable codes |
//! | [`metrics`] | the Prometheus registry |
//! | [`local_cluster`] | a whole cluster on this machine, every role its own process (`hatchery cluster`, the cluster tests, the bench) |
//! | [`sim`] | the whole architecture on this machine with hosts made by the autoscaler as network namespaces (`hatchery sim`, the autoscaling tests) |
//!
//! The API holds no platform state: everything goes through
//! [`hatchery_scheduler::platform::Platform`], so several API nodes can serve one
//! platform once the store and bus are shared (Redis).

pub mod auth;
pub mod config;
pub mod console;
pub mod error;
pub mod handlers;
pub mod limits;
pub mod local_cluster;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod sim;
pub mod ws;

pub use server::{ApiServer, ServerOptions};
