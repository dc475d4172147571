//! Encryption at rest for queue records: AES-256-GCM under data keys from a key file, with key
//! rotation without downtime (a new active key for new records; old keys stay to read old ones;
//! the file is re-read on SIGHUP).
//!
//! A sealed record is `[0xE5][key id][epoch: 16][counter: 8][ciphertext][tag: 16]`. Each process
//! start draws a random 128-bit epoch and seals under a subkey HMAC-SHA256(data key, epoch) with
//! the counter as nonce, so nonces never repeat under one subkey however many records a key
//! protects and however often the process restarts. The header is authenticated (AAD). Plain
//! records start with `{` (JSON), so encrypted and plain segments can coexist while encryption is
//! switched on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;

use crate::error::QueueError;

pub const SEALED_MAGIC: u8 = 0xE5;

/// A process start's random identity, which salts its record subkeys.
type Epoch = [u8; 16];
const HEADER_BYTES: usize = 1 + 1 + 16 + 8;
const TAG_BYTES: usize = 16;

/// Data keys by id, and which one seals new records.
pub struct Keyring {
    // Debug is implemented by hand below so that keys never reach a log.
    keys: HashMap<u8, [u8; 32]>,
    active: u8,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .field("active", &self.active)
            .finish()
    }
}

impl Keyring {
    pub fn new(keys: HashMap<u8, [u8; 32]>, active: u8) -> Result<Keyring, QueueError> {
        if !keys.contains_key(&active) {
            return Err(QueueError::Encryption(format!(
                "the active key {active} is not among the keys"
            )));
        }
        Ok(Keyring { keys, active })
    }

    pub fn active_key_id(&self) -> u8 {
        self.active
    }

    pub fn key_ids(&self) -> Vec<u8> {
        let mut ids: Vec<u8> = self.keys.keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

fn subkey(data_key: &[u8; 32], epoch: &[u8; 16]) -> Result<LessSafeKey, QueueError> {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, data_key), epoch);
    let unbound = UnboundKey::new(&AES_256_GCM, tag.as_ref())
        .map_err(|_| QueueError::Encryption("cannot derive a record key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

fn nonce_of(counter: u64) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
}

/// The queue's view of encryption: seals new records, opens any record a known key sealed.
pub struct QueueEncryption {
    keyring: ArcSwap<Keyring>,
    epoch: [u8; 16],
    counter: AtomicU64,
    sealing_keys: Mutex<HashMap<u8, Arc<LessSafeKey>>>,
    opening_keys: Mutex<HashMap<(u8, Epoch), Arc<LessSafeKey>>>,
}

impl QueueEncryption {
    pub fn new(keyring: Keyring) -> QueueEncryption {
        QueueEncryption {
            keyring: ArcSwap::from_pointee(keyring),
            epoch: rand::random(),
            counter: AtomicU64::new(0),
            sealing_keys: Mutex::new(HashMap::new()),
            opening_keys: Mutex::new(HashMap::new()),
        }
    }

    /// Swaps in a new keyring (rotation): new records use its active key at once.
    pub fn replace_keyring(&self, keyring: Keyring) {
        self.keyring.store(Arc::new(keyring));
    }

    pub fn active_key_id(&self) -> u8 {
        self.keyring.load().active
    }

    fn sealing_key(&self, key_id: u8, data_key: &[u8; 32]) -> Result<Arc<LessSafeKey>, QueueError> {
        let mut keys = self
            .sealing_keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(key) = keys.get(&key_id) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(subkey(data_key, &self.epoch)?);
        keys.insert(key_id, Arc::clone(&key));
        Ok(key)
    }

    /// Appends the sealed form of `plaintext` to `out`.
    pub fn seal(&self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), QueueError> {
        let keyring = self.keyring.load();
        let key_id = keyring.active;
        let data_key = keyring
            .keys
            .get(&key_id)
            .ok_or_else(|| QueueError::Encryption("no active key".into()))?;
        let key = self.sealing_key(key_id, data_key)?;
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let start = out.len();
        out.push(SEALED_MAGIC);
        out.push(key_id);
        out.extend_from_slice(&self.epoch);
        out.extend_from_slice(&counter.to_be_bytes());
        let header: [u8; HEADER_BYTES] = out[start..start + HEADER_BYTES]
            .try_into()
            .map_err(|_| QueueError::Encryption("header".into()))?;
        let mut body = plaintext.to_vec();
        key.seal_in_place_append_tag(nonce_of(counter), Aad::from(header), &mut body)
            .map_err(|_| QueueError::Encryption("sealing a record failed".into()))?;
        out.extend_from_slice(&body);
        Ok(())
    }

    /// The plaintext of a sealed record.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, QueueError> {
        if sealed.len() < HEADER_BYTES + TAG_BYTES || sealed[0] != SEALED_MAGIC {
            return Err(QueueError::Encryption("not a sealed record".into()));
        }
        let key_id = sealed[1];
        let mut epoch = [0u8; 16];
        epoch.copy_from_slice(&sealed[2..18]);
        let mut counter_bytes = [0u8; 8];
        counter_bytes.copy_from_slice(&sealed[18..26]);
        let counter = u64::from_be_bytes(counter_bytes);
        let key = {
            let mut keys = self
                .opening_keys
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match keys.get(&(key_id, epoch)) {
                Some(key) => Arc::clone(key),
                None => {
                    let keyring = self.keyring.load();
                    let data_key = keyring.keys.get(&key_id).ok_or_else(|| {
                        QueueError::Encryption(format!("record sealed with key {key_id}, which is not in the key file (keep old keys until their records are delivered)"))
                    })?;
                    let key = Arc::new(subkey(data_key, &epoch)?);
                    keys.insert((key_id, epoch), Arc::clone(&key));
                    key
                }
            }
        };
        let mut body = sealed[HEADER_BYTES..].to_vec();
        let plaintext_len = key
            .open_in_place(
                nonce_of(counter),
                Aad::from(&sealed[..HEADER_BYTES]),
                &mut body,
            )
            .map_err(|_| {
                QueueError::Encryption(format!(
                    "record sealed with key {key_id} does not authenticate"
                ))
            })?
            .len();
        body.truncate(plaintext_len);
        Ok(body)
    }
}

/// Reads a key file: `active = 2` and `[keys]` of id = base64 of 32 bytes.
pub fn parse_key_file(text: &str) -> Result<Keyring, QueueError> {
    use base64::Engine;
    let mut active: Option<u8> = None;
    let mut keys = HashMap::new();
    let mut in_keys = false;
    for (number, raw_line) in text.lines().enumerate() {
        let line = raw_line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line == "[keys]" {
            in_keys = true;
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(QueueError::Encryption(format!(
                "key file line {}: expected name = value",
                number + 1
            )));
        };
        let (name, value) = (
            name.trim().trim_matches('"'),
            value.trim().trim_matches('"'),
        );
        if !in_keys && name == "active" {
            active = Some(value.parse().map_err(|_| {
                QueueError::Encryption(format!(
                    "key file line {}: active must be a key id (0-255)",
                    number + 1
                ))
            })?);
            continue;
        }
        if !in_keys {
            return Err(QueueError::Encryption(format!(
                "key file line {}: unknown setting `{name}`",
                number + 1
            )));
        }
        let id: u8 = name.parse().map_err(|_| {
            QueueError::Encryption(format!("key file line {}: key ids are 0-255", number + 1))
        })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| {
                QueueError::Encryption(format!(
                    "key file line {}: key {id} is not base64",
                    number + 1
                ))
            })?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| {
            QueueError::Encryption(format!(
                "key file line {}: key {id} must be 32 bytes (AES-256)",
                number + 1
            ))
        })?;
        keys.insert(id, key);
    }
    let active =
        active.ok_or_else(|| QueueError::Encryption("key file: set `active = <key id>`".into()))?;
    Keyring::new(keys, active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring(ids: &[u8], active: u8) -> Keyring {
        Keyring::new(ids.iter().map(|id| (*id, [*id; 32])).collect(), active).unwrap()
    }

    #[test]
    fn sealed_records_open_again_and_tampering_is_caught() {
        let encryption = QueueEncryption::new(keyring(&[1], 1));
        let mut sealed = Vec::new();
        encryption.seal(br#"{"userId":"u"}"#, &mut sealed).unwrap();
        assert_eq!(sealed[0], SEALED_MAGIC);
        assert!(
            !sealed.windows(6).any(|window| window == b"userId"),
            "no plaintext at rest"
        );
        assert_eq!(encryption.open(&sealed).unwrap(), br#"{"userId":"u"}"#);
        for position in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[position] ^= 1;
            assert!(
                encryption.open(&tampered).is_err(),
                "a flipped bit at {position} went unnoticed"
            );
        }
        let mut second = Vec::new();
        encryption.seal(br#"{"userId":"u"}"#, &mut second).unwrap();
        assert_ne!(sealed, second, "a fresh nonce per record");
    }

    #[test]
    fn rotation_seals_with_the_new_key_and_still_opens_the_old_records() {
        let encryption = QueueEncryption::new(keyring(&[1], 1));
        let mut old = Vec::new();
        encryption.seal(b"{old}", &mut old).unwrap();
        encryption.replace_keyring(keyring(&[1, 2], 2));
        let mut new = Vec::new();
        encryption.seal(b"{new}", &mut new).unwrap();
        assert_eq!(new[1], 2);
        assert_eq!(encryption.open(&old).unwrap(), b"{old}");
        assert_eq!(encryption.open(&new).unwrap(), b"{new}");
        let another_process = QueueEncryption::new(keyring(&[2], 2));
        assert_eq!(
            another_process.open(&new).unwrap(),
            b"{new}",
            "a restarted process reads earlier epochs"
        );
        assert!(
            another_process.open(&old).is_err(),
            "a dropped key cannot be read"
        );
    }

    #[test]
    fn key_files_parse_and_explain_their_mistakes() {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let file = format!("active = 3 # the key new records use\n[keys]\n3 = \"{key}\"\n");
        let parsed = parse_key_file(&file).unwrap();
        assert_eq!((parsed.active_key_id(), parsed.key_ids()), (3, vec![3]));
        assert!(
            parse_key_file("[keys]\n")
                .unwrap_err()
                .to_string()
                .contains("active")
        );
        assert!(parse_key_file(&format!("active = 4\n[keys]\n3 = \"{key}\"\n")).is_err());
        assert!(
            parse_key_file("active = 1\n[keys]\n1 = \"c2hvcnQ=\"\n")
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
    }
}
