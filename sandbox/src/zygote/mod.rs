//! The zygote: a language runtime initialised once (R embedded through libR, with its
//! packages preloaded and a full GC done), inside a sandbox of its own, that forks
//! single-use sandboxes on request. [`server`] is the zygote's side; [`protocol`] the
//! messages between the agent (see [`crate::pool`]), the zygote and each sandbox.

pub mod alloc;
pub mod huge;
pub mod prefault;
pub mod protocol;
pub mod server;
