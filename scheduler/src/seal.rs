//! The platform's keyring and the one sealed-blob format used for everything a user
//! produced at rest (R15): code and results in the object store ([`crate::encrypted`]),
//! execution records and event logs in the embedded store ([`crate::embedded`]).
//!
//! A sealed blob (version 2) is
//!
//! ```text
//! 0x02 || key id (u32, little endian) || 96-bit nonce || AES-256-GCM ciphertext || 128-bit tag
//! ```
//!
//! sealed under the keyring's *current* key with a fresh random nonce. The associated
//! data binds the version, the key id and what the blob is ([`Binding`]: an object and its
//! name, a record and its execution id, an event and its execution id and sequence
//! number, a live-only event and its execution id), so a blob moved to another name, another kind, another position in a log or
//! given another key id fails authentication just like a tampered one. Opening picks the
//! key by the id in the header: blobs stay readable after a rotation for as long as their
//! key is kept in the keyring, and a blob whose key was removed fails with
//! [`SealError::UnknownKey`], never with garbage.
//!
//! Version 1 (objects written before key ids existed) is `0x01 || nonce || ciphertext ||
//! tag` with `0x01 || object name` as associated data; it is still read, with key 1 (the
//! key a single-key keys file held), and never written.
//!
//! This module owns the key material: it never logs it, prints it or writes it anywhere
//! (the `Debug` impls show key ids only), and never returns unauthenticated bytes.

use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;

/// Names a key of the keyring. Ids start at 1; rotation adds the next one.
pub type KeyId = u32;

/// The format written today.
pub const VERSION: u8 = 2;
/// The format of objects written before key ids (read only).
pub const LEGACY_VERSION: u8 = 1;
/// The key that opens [`LEGACY_VERSION`] blobs.
pub const LEGACY_KEY_ID: KeyId = 1;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes before the ciphertext in a version-2 blob.
pub const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;
/// Bytes a version-2 blob adds to its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a key must be 32 bytes, as 64 hex digits or base64; got {0} bytes")]
    Length(usize),
    #[error("a key must be 64 hex digits or base64")]
    Encoding,
}

/// Why a keyring could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("a keyring needs at least one key")]
    Empty,
    #[error("key id 0 is not allowed (ids start at 1)")]
    ZeroId,
    #[error("key id {0} appears twice")]
    DuplicateId(KeyId),
    #[error("the current key {0} is not in the keyring")]
    NoCurrent(KeyId),
}

/// Why a blob could not be sealed or opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// The header names a key the keyring does not hold (retired, or the header is damaged).
    #[error("sealed with key {0}, which is not in the keyring")]
    UnknownKey(KeyId),
    /// Too short, or an unknown or misplaced version byte.
    #[error("not a sealed blob ({0})")]
    Malformed(&'static str),
    /// The tag does not match: tampered, truncated, moved to another name or position.
    #[error("failed authentication (tampered, truncated or moved)")]
    Authentication,
    #[error("encryption failed")]
    Encrypt,
}

/// What a sealed blob is, bound into its tag: the same bytes are not valid as anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding<'a> {
    /// An object of the object store, by its key (`code/<id>`, `results/<id>`).
    Object(&'a str),
    /// The execution record of this execution id.
    Record(&'a str),
    /// Event number `seq` of this execution's log (the embedded store's layout before
    /// execution logs; read when such a data directory is converted).
    Event { execution: &'a str, seq: u64 },
    /// Change number `n` (line `n`) of this execution's log in the embedded store.
    Change { execution: &'a str, n: u64 },
    /// A live-only event of this execution (on the bus; it has no seq).
    LiveEvent(&'a str),
}

impl Binding<'_> {
    /// The associated data of a version-2 blob: version, key id, then the binding, every
    /// variable-length part length-prefixed so no two bindings encode alike.
    fn associated_data(&self, key_id: KeyId) -> Vec<u8> {
        let (kind, name, seq) = match *self {
            Binding::Object(name) => (b'o', name, None),
            Binding::Record(id) => (b'r', id, None),
            Binding::Event { execution, seq } => (b'e', execution, Some(seq)),
            Binding::Change { execution, n } => (b'c', execution, Some(n)),
            Binding::LiveEvent(execution) => (b'l', execution, None),
        };
        let mut aad = Vec::with_capacity(1 + 4 + 1 + 4 + name.len() + 8);
        aad.push(VERSION);
        aad.extend_from_slice(&key_id.to_le_bytes());
        aad.push(kind);
        aad.extend_from_slice(&(name.len() as u32).to_le_bytes());
        aad.extend_from_slice(name.as_bytes());
        if let Some(seq) = seq {
            aad.extend_from_slice(&seq.to_le_bytes());
        }
        aad
    }
}

struct Entry {
    id: KeyId,
    cipher: Aes256Gcm,
}

/// The encryption keys by id, one of them current. Cheap to clone (clones share the keys).
#[derive(Clone)]
pub struct Keyring {
    /// Sorted by id.
    entries: Arc<[Entry]>,
    current: KeyId,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ids only, never key material.
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &self.ids())
            .finish()
    }
}

impl Keyring {
    /// A keyring of these keys, sealing with `current`.
    pub fn new(
        keys: impl IntoIterator<Item = (KeyId, [u8; 32])>,
        current: KeyId,
    ) -> Result<Keyring, KeyringError> {
        let mut entries: Vec<Entry> = Vec::new();
        for (id, key) in keys {
            if id == 0 {
                return Err(KeyringError::ZeroId);
            }
            if entries.iter().any(|e| e.id == id) {
                return Err(KeyringError::DuplicateId(id));
            }
            entries.push(Entry {
                id,
                cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
            });
        }
        if entries.is_empty() {
            return Err(KeyringError::Empty);
        }
        if !entries.iter().any(|e| e.id == current) {
            return Err(KeyringError::NoCurrent(current));
        }
        entries.sort_by_key(|e| e.id);
        Ok(Keyring {
            entries: entries.into(),
            current,
        })
    }

    /// A keyring of one key, id 1 (which also opens version-1 objects).
    pub fn single(key: [u8; 32]) -> Keyring {
        Keyring::new([(LEGACY_KEY_ID, key)], LEGACY_KEY_ID).expect("one key with id 1")
    }

    /// The key new blobs are sealed with.
    pub fn current_id(&self) -> KeyId {
        self.current
    }

    /// Every key id held, ascending.
    pub fn ids(&self) -> Vec<KeyId> {
        self.entries.iter().map(|e| e.id).collect()
    }

    fn cipher(&self, id: KeyId) -> Result<&Aes256Gcm, SealError> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| &e.cipher)
            .ok_or(SealError::UnknownKey(id))
    }

    /// `plaintext` sealed under the current key for `binding`.
    pub fn seal(&self, binding: Binding<'_>, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let id = self.current;
        let cipher = self.cipher(id)?;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = binding.associated_data(id);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| SealError::Encrypt)?;
        let mut blob = Vec::with_capacity(HEADER_LEN + sealed.len());
        blob.push(VERSION);
        blob.extend_from_slice(&id.to_le_bytes());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&sealed);
        Ok(blob)
    }

    /// The plaintext of `blob`, if it authenticates as `binding` under the key its header
    /// names.
    pub fn open(&self, binding: Binding<'_>, blob: &[u8]) -> Result<Vec<u8>, SealError> {
        match blob.first() {
            Some(&VERSION) => {
                if blob.len() < OVERHEAD {
                    return Err(SealError::Malformed("too short"));
                }
                let id = key_id_of(blob).expect("a version-2 header");
                let cipher = self.cipher(id)?;
                let aad = binding.associated_data(id);
                cipher
                    .decrypt(
                        Nonce::from_slice(&blob[5..HEADER_LEN]),
                        Payload {
                            msg: &blob[HEADER_LEN..],
                            aad: &aad,
                        },
                    )
                    .map_err(|_| SealError::Authentication)
            }
            Some(&LEGACY_VERSION) => {
                let Binding::Object(name) = binding else {
                    return Err(SealError::Malformed("version 1 exists only for objects"));
                };
                if blob.len() < 1 + NONCE_LEN + TAG_LEN {
                    return Err(SealError::Malformed("too short"));
                }
                let cipher = self.cipher(LEGACY_KEY_ID)?;
                let mut aad = Vec::with_capacity(1 + name.len());
                aad.push(LEGACY_VERSION);
                aad.extend_from_slice(name.as_bytes());
                cipher
                    .decrypt(
                        Nonce::from_slice(&blob[1..1 + NONCE_LEN]),
                        Payload {
                            msg: &blob[1 + NONCE_LEN..],
                            aad: &aad,
                        },
                    )
                    .map_err(|_| SealError::Authentication)
            }
            Some(_) => Err(SealError::Malformed("unknown version")),
            None => Err(SealError::Malformed("empty")),
        }
    }
}

/// The key id a blob's header names (version 1: [`LEGACY_KEY_ID`]), without opening it.
/// Unauthenticated: for reports and tests, never for decisions about trust.
pub fn key_id_of(blob: &[u8]) -> Option<KeyId> {
    match blob.first() {
        Some(&VERSION) if blob.len() >= 5 => Some(u32::from_le_bytes(
            blob[1..5].try_into().expect("four bytes"),
        )),
        Some(&LEGACY_VERSION) => Some(LEGACY_KEY_ID),
        _ => None,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [0xa1; 32];
    const B: [u8; 32] = [0xb2; 32];
    const SECRET: &[u8] = b"cost-effectiveness of drug X: 12345 per QALY";

    fn ring_a() -> Keyring {
        Keyring::new([(1, A)], 1).unwrap()
    }
    fn ring_ab() -> Keyring {
        Keyring::new([(1, A), (2, B)], 2).unwrap()
    }

    #[test]
    fn seals_with_the_current_key_and_opens_by_id() {
        let old = ring_a().seal(Binding::Record("x"), SECRET).unwrap();
        assert_eq!(old[0], VERSION);
        assert_eq!(key_id_of(&old), Some(1));
        assert_eq!(old.len(), SECRET.len() + OVERHEAD);
        let ab = ring_ab();
        let new = ab.seal(Binding::Record("x"), SECRET).unwrap();
        assert_eq!(key_id_of(&new), Some(2));
        assert_eq!(ab.open(Binding::Record("x"), &old).unwrap(), SECRET);
        assert_eq!(ab.open(Binding::Record("x"), &new).unwrap(), SECRET);
        // Without key 1, the old blob names the missing key.
        let b_only = Keyring::new([(2, B)], 2).unwrap();
        assert_eq!(
            b_only.open(Binding::Record("x"), &old),
            Err(SealError::UnknownKey(1))
        );
        assert_eq!(b_only.open(Binding::Record("x"), &new).unwrap(), SECRET);
        // A new key under an old id cannot pass for the old one.
        let impostor = Keyring::new([(1, B)], 1).unwrap();
        assert_eq!(
            impostor.open(Binding::Record("x"), &old),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn a_blob_is_valid_only_for_its_binding() {
        let k = ring_ab();
        let blob = k
            .seal(
                Binding::Event {
                    execution: "x",
                    seq: 3,
                },
                SECRET,
            )
            .unwrap();
        for other in [
            Binding::Event {
                execution: "x",
                seq: 4,
            },
            Binding::Event {
                execution: "y",
                seq: 3,
            },
            // A change line with the same execution and number is not the event.
            Binding::Change {
                execution: "x",
                n: 3,
            },
            Binding::Record("x"),
            Binding::Object("x"),
            Binding::LiveEvent("x"),
        ] {
            assert_eq!(k.open(other, &blob), Err(SealError::Authentication));
        }
        let obj = k.seal(Binding::Object("results/x"), SECRET).unwrap();
        assert_eq!(
            k.open(Binding::Object("code/x"), &obj),
            Err(SealError::Authentication)
        );
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_is_refused() {
        let k = ring_ab();
        let b = Binding::Record("x");
        let good = k.seal(b, SECRET).unwrap();
        for i in 0..good.len() {
            for bit in [0x01, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                let r = k.open(b, &bad);
                assert!(r.is_err(), "flip {bit:#x} at {i} accepted");
            }
        }
        for len in 0..good.len() {
            assert!(k.open(b, &good[..len]).is_err(), "truncation to {len}");
        }
        // The key id is authenticated too: pointing it at the other key fails.
        let mut other_id = good.clone();
        other_id[1..5].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(k.open(b, &other_id), Err(SealError::Authentication));
    }

    #[test]
    fn version_1_objects_open_with_key_1_only() {
        // A version-1 blob as the object store wrote them: 1 || nonce || ct+tag, the
        // version and the object name as associated data.
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&A));
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut aad = vec![LEGACY_VERSION];
        aad.extend_from_slice(b"code/x");
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: SECRET,
                    aad: &aad,
                },
            )
            .unwrap();
        let mut v1 = vec![LEGACY_VERSION];
        v1.extend_from_slice(&nonce);
        v1.extend_from_slice(&ct);
        assert_eq!(key_id_of(&v1), Some(1));
        let k = ring_ab();
        assert_eq!(k.open(Binding::Object("code/x"), &v1).unwrap(), SECRET);
        assert_eq!(
            k.open(Binding::Object("code/y"), &v1),
            Err(SealError::Authentication)
        );
        assert!(matches!(
            k.open(Binding::Record("code/x"), &v1),
            Err(SealError::Malformed(_))
        ));
        let b_only = Keyring::new([(2, B)], 2).unwrap();
        assert_eq!(
            b_only.open(Binding::Object("code/x"), &v1),
            Err(SealError::UnknownKey(1))
        );
    }

    #[test]
    fn keyrings_are_checked() {
        assert_eq!(Keyring::new([], 1).unwrap_err(), KeyringError::Empty);
        assert_eq!(Keyring::new([(0, A)], 0).unwrap_err(), KeyringError::ZeroId);
        assert_eq!(
            Keyring::new([(1, A), (1, B)], 1).unwrap_err(),
            KeyringError::DuplicateId(1)
        );
        assert_eq!(
            Keyring::new([(1, A)], 2).unwrap_err(),
            KeyringError::NoCurrent(2)
        );
        let k = Keyring::new([(3, B), (1, A)], 3).unwrap();
        assert_eq!(k.ids(), vec![1, 3]);
        assert_eq!(k.current_id(), 3);
    }

    #[test]
    fn debug_shows_ids_not_keys() {
        let s = format!("{:?}", ring_ab());
        assert_eq!(s, "Keyring { current: 2, ids: [1, 2] }");
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
}
