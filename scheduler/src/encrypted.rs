//! [`Objects`] over any `object_store` backend (local filesystem in the embedded mode, S3
//! later), every object sealed with AES-256-GCM under the platform's [`Keyring`] (R15).
//!
//! An object at rest is a sealed blob of [`crate::seal`]: `0x02 || key id || 96-bit nonce
//! || ciphertext and 128-bit tag`, sealed under the current key with a fresh random nonce,
//! the version, the key id and the object's name bound as associated data, so a blob
//! copied or moved to another name fails authentication just like a tampered one. Objects
//! written before key ids existed (version 1) are still read, with key 1. This module
//! never sees key material (the keyring holds it) and never returns unauthenticated bytes.
//!
//! On the local filesystem every object file is made 0600 and every directory 0700
//! ([`crate::private_files`]), whatever the process umask; the `hatchery` binary also
//! runs with umask 077, so the store's own staging files are private from the start.

use std::fmt;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::objects::{ObjectError, Objects};
use crate::private_files;
pub use crate::seal::{format_key, generate_key, parse_key, KeyError};
use crate::seal::{Binding, Keyring, SealError};

/// Encrypted blobs over an object store. Cheap to share behind an `Arc`.
/// Where an S3 bucket is and how to sign for it.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// An S3 API other than AWS's (an emulator, another provider); `http://` allowed.
    pub endpoint: Option<String>,
    /// Credentials; unset: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and the rest of
    /// the standard AWS environment).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub struct EncryptedObjects {
    store: Arc<dyn ObjectStore>,
    keyring: Keyring,
    /// The directory of a local-filesystem store, whose files and folders are kept private.
    local_root: Option<PathBuf>,
}

impl fmt::Debug for EncryptedObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key ids at most, never a key.
        f.debug_struct("EncryptedObjects")
            .field("store", &self.store.to_string())
            .field("keyring", &self.keyring)
            .finish_non_exhaustive()
    }
}

impl EncryptedObjects {
    pub fn new(store: Arc<dyn ObjectStore>, keyring: Keyring) -> Self {
        EncryptedObjects {
            store,
            keyring,
            local_root: None,
        }
    }

    /// Objects as files under `dir` (created if missing, 0700): the embedded mode. Files
    /// and folders already there are made private too (0600 / 0700).
    pub fn local(dir: &FsPath, keyring: Keyring) -> Result<Self, ObjectError> {
        private_files::create_dir(dir)
            .and_then(|()| private_files::restrict_tree(dir))
            .map_err(|e| ObjectError::Io(format!("preparing {}: {e}", dir.display())))?;
        // A folder left empty by a deletion (an execution's artifacts) goes with it.
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| ObjectError::Io(format!("opening {}: {e}", dir.display())))?
            .with_automatic_cleanup(true);
        Ok(EncryptedObjects {
            local_root: Some(dir.to_path_buf()),
            ..Self::new(Arc::new(fs), keyring)
        })
    }

    /// Objects in an S3 bucket (any S3 API: AWS, or an emulator at `endpoint`).
    /// Credentials come from `config` or else the standard `AWS_*` environment.
    pub fn s3(config: &S3Config, keyring: Keyring) -> Result<Self, ObjectError> {
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region);
        if let Some(endpoint) = &config.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            b = b.with_access_key_id(id).with_secret_access_key(secret);
        }
        let store = b
            .build()
            .map_err(|e| ObjectError::Io(format!("S3 bucket {}: {e}", config.bucket)))?;
        Ok(Self::new(Arc::new(store), keyring))
    }

    /// The sealed form of `plaintext` stored under `key`.
    fn seal(&self, key: &str, plaintext: &[u8]) -> Result<Vec<u8>, ObjectError> {
        self.keyring
            .seal(Binding::Object(key), plaintext)
            .map_err(|e| ObjectError::Io(format!("sealing {key}: {e}")))
    }

    /// The plaintext of a blob found under `key`, if it authenticates.
    fn open(&self, key: &str, blob: &[u8]) -> Result<Vec<u8>, ObjectError> {
        self.keyring
            .open(Binding::Object(key), blob)
            .map_err(|e| match e {
                SealError::UnknownKey(key_id) => ObjectError::KeyUnavailable {
                    key: key.to_string(),
                    key_id,
                },
                _ => ObjectError::Tampered(key.to_string()),
            })
    }

    /// On the local filesystem: the object's file 0600, its folders 0700.
    fn make_private(&self, key: &str) -> Result<(), ObjectError> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        let io = |e: std::io::Error| ObjectError::Io(format!("{key}: restricting modes: {e}"));
        let file = root.join(key);
        private_files::restrict(&file, private_files::FILE_MODE).map_err(io)?;
        let mut dir = file.parent();
        while let Some(d) = dir.filter(|d| d.starts_with(root) && *d != root.as_path()) {
            private_files::restrict(d, private_files::DIR_MODE).map_err(io)?;
            dir = d.parent();
        }
        Ok(())
    }
}

/// An object key as an object-store path; refuses empty keys and keys the store would
/// rewrite (`..`, empty segments, ...), so a key always names exactly one object.
fn object_path(key: &str) -> Result<ObjectPath, ObjectError> {
    let path = ObjectPath::parse(key)
        .map_err(|e| ObjectError::Io(format!("bad object key {key:?}: {e}")))?;
    if key.is_empty() || path.as_ref() != key {
        return Err(ObjectError::Io(format!("bad object key {key:?}")));
    }
    Ok(path)
}

fn store_error(key: &str, e: object_store::Error) -> ObjectError {
    match e {
        object_store::Error::NotFound { .. } => ObjectError::NotFound(key.to_string()),
        other => ObjectError::Io(format!("{key}: {other}")),
    }
}

#[async_trait]
impl Objects for EncryptedObjects {
    async fn put(&self, key: &str, plaintext: Vec<u8>) -> Result<(), ObjectError> {
        let path = object_path(key)?;
        let blob = self.seal(key, &plaintext)?;
        self.store
            .put(&path, PutPayload::from(blob))
            .await
            .map_err(|e| store_error(key, e))?;
        self.make_private(key)
    }

    async fn get(&self, key: &str) -> Result<Vec<u8>, ObjectError> {
        let path = object_path(key)?;
        let blob = self
            .store
            .get(&path)
            .await
            .map_err(|e| store_error(key, e))?
            .bytes()
            .await
            .map_err(|e| store_error(key, e))?;
        self.open(key, &blob)
    }

    /// Deleting an object that does not exist succeeds (as on S3), so retention and
    /// retries need no special case.
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_error(key, e)),
        }
    }

    async fn delete_folder(&self, prefix: &str) -> Result<usize, ObjectError> {
        let path = object_path(prefix)?;
        let listed = match self.store.list_with_delimiter(Some(&path)).await {
            Ok(l) => l.objects,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(store_error(prefix, e)),
        };
        for meta in &listed {
            match self.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(meta.location.as_ref(), e)),
            }
        }
        Ok(listed.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seal::{key_id_of, LEGACY_VERSION, NONCE_LEN, OVERHEAD, TAG_LEN, VERSION};
    use std::os::unix::fs::PermissionsExt;

    const A: [u8; 32] = [7u8; 32];
    const B: [u8; 32] = [8u8; 32];

    fn objects(dir: &FsPath) -> EncryptedObjects {
        EncryptedObjects::local(dir, Keyring::single(A)).unwrap()
    }

    const SECRET: &[u8] = b"model <- lm(cost ~ qaly, data = patients) # very secret";

    #[tokio::test]
    async fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        o.put("code/abc", SECRET.to_vec()).await.unwrap();
        assert_eq!(o.get("code/abc").await.unwrap(), SECRET);
        // Empty objects too, and overwrites.
        o.put("results/abc", Vec::new()).await.unwrap();
        assert_eq!(o.get("results/abc").await.unwrap(), b"");
        o.put("code/abc", b"second".to_vec()).await.unwrap();
        assert_eq!(o.get("code/abc").await.unwrap(), b"second");
        // A large one.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        o.put("results/big", big.clone()).await.unwrap();
        assert_eq!(o.get("results/big").await.unwrap(), big);
    }

    #[tokio::test]
    async fn missing_and_deleted_objects_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        assert!(matches!(
            o.get("code/nope").await,
            Err(ObjectError::NotFound(k)) if k == "code/nope"
        ));
        o.put("code/x", SECRET.to_vec()).await.unwrap();
        o.delete("code/x").await.unwrap();
        assert!(matches!(
            o.get("code/x").await,
            Err(ObjectError::NotFound(_))
        ));
        // Deleting again is fine.
        o.delete("code/x").await.unwrap();
    }

    #[tokio::test]
    async fn the_bytes_on_disk_do_not_contain_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        o.put("code/abc", SECRET.to_vec()).await.unwrap();
        let raw = std::fs::read(dir.path().join("code/abc")).unwrap();
        assert_eq!(raw.len(), SECRET.len() + OVERHEAD);
        assert_eq!(raw[0], VERSION);
        assert_eq!(key_id_of(&raw), Some(1));
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        assert!(!raw.windows(SECRET.len()).any(|w| w == SECRET));
        // Two writes of the same plaintext differ (fresh nonce).
        o.put("code/abc", SECRET.to_vec()).await.unwrap();
        let again = std::fs::read(dir.path().join("code/abc")).unwrap();
        assert_ne!(raw, again);
    }

    #[tokio::test]
    async fn objects_are_private_files_in_private_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("objects");
        let o = objects(&root);
        o.put("results/deep/abc", SECRET.to_vec()).await.unwrap();
        let mode = |p: &FsPath| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("results")), 0o700);
        assert_eq!(mode(&root.join("results/deep")), 0o700);
        assert_eq!(mode(&root.join("results/deep/abc")), 0o600);
        // A tree left with wide modes is tightened when it is opened.
        std::fs::set_permissions(root.join("results"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::set_permissions(
            root.join("results/deep/abc"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        drop(o);
        let _o = objects(&root);
        assert_eq!(mode(&root.join("results")), 0o700);
        assert_eq!(mode(&root.join("results/deep/abc")), 0o600);
    }

    #[tokio::test]
    async fn a_flipped_byte_anywhere_is_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        o.put("code/abc", SECRET.to_vec()).await.unwrap();
        let file = dir.path().join("code/abc");
        let good = std::fs::read(&file).unwrap();
        for i in [
            0,
            5,
            5 + NONCE_LEN - 1,
            5 + NONCE_LEN,
            good.len() / 2,
            good.len() - 1,
        ] {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            std::fs::write(&file, &bad).unwrap();
            assert!(
                matches!(o.get("code/abc").await, Err(ObjectError::Tampered(_))),
                "flip at {i} not detected"
            );
        }
        // Truncated blobs, down to nothing.
        for len in [good.len() - 1, OVERHEAD - 1, 1, 0] {
            std::fs::write(&file, &good[..len]).unwrap();
            assert!(matches!(
                o.get("code/abc").await,
                Err(ObjectError::Tampered(_))
            ));
        }
        std::fs::write(&file, &good).unwrap();
        assert_eq!(o.get("code/abc").await.unwrap(), SECRET);
    }

    #[tokio::test]
    async fn a_wrong_key_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        objects(dir.path())
            .put("code/abc", SECRET.to_vec())
            .await
            .unwrap();
        let other = EncryptedObjects::local(dir.path(), Keyring::single(B)).unwrap();
        assert!(matches!(
            other.get("code/abc").await,
            Err(ObjectError::Tampered(k)) if k == "code/abc"
        ));
    }

    #[tokio::test]
    async fn rotation_keeps_old_objects_readable_while_their_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        objects(dir.path())
            .put("results/old", SECRET.to_vec())
            .await
            .unwrap();
        let ab = Keyring::new([(1, A), (2, B)], 2).unwrap();
        let o = EncryptedObjects::local(dir.path(), ab).unwrap();
        assert_eq!(o.get("results/old").await.unwrap(), SECRET);
        o.put("results/new", b"fresh".to_vec()).await.unwrap();
        let raw = std::fs::read(dir.path().join("results/new")).unwrap();
        assert_eq!(key_id_of(&raw), Some(2));
        // Key 1 retired: the old object names the key it needs, the new one still reads.
        let b_only = Keyring::new([(2, B)], 2).unwrap();
        let o = EncryptedObjects::local(dir.path(), b_only).unwrap();
        let err = o.get("results/old").await.unwrap_err();
        assert!(
            matches!(&err, ObjectError::KeyUnavailable { key, key_id: 1 } if key == "results/old"),
            "{err:?}"
        );
        assert!(err.to_string().contains("key 1"), "{err}");
        assert_eq!(o.get("results/new").await.unwrap(), b"fresh");
    }

    #[tokio::test]
    async fn version_1_objects_are_still_read_with_key_1() {
        use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
        use aes_gcm::{Aes256Gcm, Key};
        let dir = tempfile::tempdir().unwrap();
        // Written the way the store wrote objects before key ids.
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&A));
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = [&[LEGACY_VERSION][..], b"code/legacy"].concat();
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: SECRET,
                    aad: &aad,
                },
            )
            .unwrap();
        std::fs::create_dir_all(dir.path().join("code")).unwrap();
        let v1 = [&[LEGACY_VERSION][..], &nonce[..], &ct[..]].concat();
        assert_eq!(v1.len(), 1 + NONCE_LEN + SECRET.len() + TAG_LEN);
        std::fs::write(dir.path().join("code/legacy"), &v1).unwrap();
        let o = EncryptedObjects::local(dir.path(), Keyring::new([(1, A), (2, B)], 2).unwrap())
            .unwrap();
        assert_eq!(o.get("code/legacy").await.unwrap(), SECRET);
    }

    #[tokio::test]
    async fn a_blob_moved_to_another_key_fails_authentication() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        o.put("results/alice", SECRET.to_vec()).await.unwrap();
        std::fs::create_dir_all(dir.path().join("code")).unwrap();
        std::fs::copy(
            dir.path().join("results/alice"),
            dir.path().join("results/mallory"),
        )
        .unwrap();
        std::fs::copy(
            dir.path().join("results/alice"),
            dir.path().join("code/alice"),
        )
        .unwrap();
        assert!(matches!(
            o.get("results/mallory").await,
            Err(ObjectError::Tampered(_))
        ));
        assert!(matches!(
            o.get("code/alice").await,
            Err(ObjectError::Tampered(_))
        ));
        assert_eq!(o.get("results/alice").await.unwrap(), SECRET);
    }

    #[tokio::test]
    async fn bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(dir.path());
        for key in ["", "/abs", "a//b", "a/../b", "trailing/"] {
            assert!(
                matches!(o.put(key, b"x".to_vec()).await, Err(ObjectError::Io(_))),
                "{key:?} accepted"
            );
        }
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let o = EncryptedObjects::local(dir.path(), Keyring::single([0xab; 32])).unwrap();
        let s = format!("{o:?}");
        assert!(!s.contains("ab, ab") && !s.contains("171"), "{s}");
    }
}
