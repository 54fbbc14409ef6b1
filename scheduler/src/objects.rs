//! Code and results at rest: an object store (the `object_store` crate: local filesystem
//! in the embedded mode, S3 later) with every object sealed by AES-256-GCM under the
//! platform's keyring (R15, see [`crate::seal`]). Keys never leave the process; object
//! names carry no user data beyond ids.

use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object {0} does not exist")]
    NotFound(String),
    #[error("object {0} failed authentication (wrong key or tampered)")]
    Tampered(String),
    /// Sealed under a key the keyring no longer holds (see `hatchery admin rotate-key`).
    #[error("object {key} is sealed with key {key_id}, which is not in the keyring")]
    KeyUnavailable { key: String, key_id: u32 },
    #[error("object store: {0}")]
    Io(String),
}

/// Encrypted blobs by key (e.g. `code/<execution id>`, `results/<execution id>`).
#[async_trait]
pub trait Objects: Send + Sync + 'static {
    async fn put(&self, key: &str, plaintext: Vec<u8>) -> Result<(), ObjectError>;
    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError>;
    async fn delete(&self, key: &str) -> Result<(), ObjectError>;
    /// Deletes every object directly under the folder `prefix` (`artifacts/<id>`);
    /// returns how many there were.
    async fn delete_folder(&self, prefix: &str) -> Result<usize, ObjectError>;
}
