//! The embedded backends of the single-process mode (`hatchery up`): [`EmbeddedStore`]
//! (in memory, durable on local disk) and [`EmbeddedBus`] (tokio channels). They
//! implement the same [`crate::store::Store`] and [`crate::bus::Bus`] traits as the
//! Redis backends, with the same semantics, so the roles above them cannot tell.

mod bus;
mod disk;
mod store;

pub use bus::EmbeddedBus;
pub use disk::{check_name, name_ok, MAX_NAME_LEN};
pub use store::EmbeddedStore;
