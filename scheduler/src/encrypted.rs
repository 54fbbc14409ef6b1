//! [`Objects`] over any `object_store` backend (local filesystem in the embedded mode, S3
//! later), every object sealed with AES-256-GCM under the platform key (R15).
//!
//! An object at rest is `version byte || 96-bit nonce || ciphertext and 128-bit tag`. The
//! nonce is fresh and random for every write. The version byte and the object's key are
//! the associated data, so a blob copied or moved to another key fails authentication
//! just like a tampered one. This module owns the key; it never logs it, prints it or
//! writes it anywhere, and never returns unauthenticated bytes.

use std::fmt;
use std::path::Path as FsPath;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use async_trait::async_trait;
use base64::Engine as _;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::objects::{ObjectError, Objects};

/// The format of the blobs this module writes.
const VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key must be 32 bytes, as 64 hex digits or base64; got {0} bytes")]
    Length(usize),
    #[error("a key must be 64 hex digits or base64")]
    Encoding,
}

/// A fresh random 256-bit key from the operating system's generator.
pub fn generate_key() -> [u8; 32] {
    let key = Aes256Gcm::generate_key(OsRng);
    let mut out = [0u8; 32];
    out.copy_from_slice(&key);
    out
}

/// The key as 64 lower-case hex digits (what [`parse_key`] reads back).
pub fn format_key(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a key written as 64 hex digits, or as base64 (standard or URL-safe, padded or
/// not) of 32 bytes. Surrounding white space is ignored.
pub fn parse_key(text: &str) -> Result<[u8; 32], KeyError> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| KeyError::Encoding))
            .collect::<Result<Vec<u8>, KeyError>>()?
    } else {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|engine| engine.decode(t).ok())
            .ok_or(KeyError::Encoding)?
    };
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Encrypted blobs over an object store. Cheap to share behind an `Arc`.
pub struct EncryptedObjects {
    store: Arc<dyn ObjectStore>,
    cipher: Aes256Gcm,
}

impl fmt::Debug for EncryptedObjects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("EncryptedObjects")
            .field("store", &self.store.to_string())
            .finish_non_exhaustive()
    }
}

impl EncryptedObjects {
    pub fn new(store: Arc<dyn ObjectStore>, key: [u8; 32]) -> Self {
        EncryptedObjects {
            store,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        }
    }

    /// Objects as files under `dir` (created if missing): the embedded mode.
    pub fn local(dir: &FsPath, key: [u8; 32]) -> Result<Self, ObjectError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| ObjectError::Io(format!("creating {}: {e}", dir.display())))?;
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| ObjectError::Io(format!("opening {}: {e}", dir.display())))?;
        Ok(Self::new(Arc::new(fs), key))
    }

    /// The sealed form of `plaintext` stored under `key`.
    fn seal(&self, key: &str, plaintext: &[u8]) -> Result<Vec<u8>, ObjectError> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = associated_data(key);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| ObjectError::Io(format!("encrypting {key} failed")))?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + sealed.len());
        blob.push(VERSION);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// The plaintext of a blob found under `key`, if it authenticates.
    fn open(&self, key: &str, blob: &[u8]) -> Result<Vec<u8>, ObjectError> {
        let tampered = || ObjectError::Tampered(key.to_string());
        if blob.len() < 1 + NONCE_LEN + TAG_LEN || blob[0] != VERSION {
            return Err(tampered());
        }
        let nonce = Nonce::from_slice(&blob[1..1 + NONCE_LEN]);
        let aad = associated_data(key);
        self.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &blob[1 + NONCE_LEN..],
                    aad: &aad,
                },
            )
            .map_err(|_| tampered())
    }
}

/// What the tag binds besides the bytes: the format version and where the object lives.
fn associated_data(key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + key.len());
    aad.push(VERSION);
    aad.extend_from_slice(key.as_bytes());
    aad
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
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(dir: &FsPath) -> EncryptedObjects {
        EncryptedObjects::local(dir, [7u8; 32]).unwrap()
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
        assert_eq!(raw.len(), 1 + NONCE_LEN + SECRET.len() + TAG_LEN);
        assert_eq!(raw[0], VERSION);
        assert!(!raw.windows(6).any(|w| w == b"secret"));
        assert!(!raw.windows(SECRET.len()).any(|w| w == SECRET));
        // Two writes of the same plaintext differ (fresh nonce).
        o.put("code/abc", SECRET.to_vec()).await.unwrap();
        let again = std::fs::read(dir.path().join("code/abc")).unwrap();
        assert_ne!(raw, again);
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
            1,
            NONCE_LEN,
            1 + NONCE_LEN,
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
        for len in [good.len() - 1, 1 + NONCE_LEN + TAG_LEN - 1, 1, 0] {
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
        let other = EncryptedObjects::local(dir.path(), [8u8; 32]).unwrap();
        assert!(matches!(
            other.get("code/abc").await,
            Err(ObjectError::Tampered(k)) if k == "code/abc"
        ));
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
    fn keys_round_trip_through_text() {
        let k = generate_key();
        assert_ne!(k, generate_key());
        let hex = format_key(&k);
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_key(&hex).unwrap(), k);
        assert_eq!(
            parse_key(&format!("  {}\n", hex.to_uppercase())).unwrap(),
            k
        );
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        assert_eq!(parse_key(&STANDARD.encode(k)).unwrap(), k);
        assert_eq!(parse_key(&URL_SAFE_NO_PAD.encode(k)).unwrap(), k);
    }

    #[test]
    fn bad_key_text_is_refused() {
        assert!(matches!(parse_key(""), Err(KeyError::Length(0))));
        assert!(matches!(
            parse_key("abcd"),
            Err(KeyError::Length(_)) | Err(KeyError::Encoding)
        ));
        assert!(parse_key(&"g".repeat(64)).is_err());
        assert!(parse_key(&"ab".repeat(31)).is_err());
        assert!(parse_key(&"ab".repeat(33)).is_err());
        assert!(parse_key("not a key at all!").is_err());
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let o = EncryptedObjects::local(dir.path(), [0xab; 32]).unwrap();
        let s = format!("{o:?}");
        assert!(!s.contains("ab, ab") && !s.contains("171"), "{s}");
    }
}
