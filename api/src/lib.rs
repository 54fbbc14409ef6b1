//! Hatchery's HTTP + WebSocket API.
//!
//! This crate will own the hyper API, auth, the OpenAPI document, the web console,
//! the object store and the `hatchery` binary with its roles. Nothing is implemented
//! yet: it exists so that the workspace has the agreed shape.
