//! Identifiers and write keys.

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

const WRITE_KEY_PREFIX_CHARS: usize = 8;

fn random_alphanumeric(length: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

/// A new id such as `prj_4f9k2m...`: the kind, then 20 random lowercase letters and digits.
pub(crate) fn new_id(kind: &str) -> String {
    format!("{kind}_{}", random_alphanumeric(20).to_ascii_lowercase())
}

/// A new write key: `wk_` and 32 random letters and digits (about 190 bits).
pub fn generate_write_key() -> String {
    format!("wk_{}", random_alphanumeric(32))
}

/// The SHA-256 of a write key. Keys are random and long, so a plain hash is safe to store and
/// to use as the lookup key; the key itself is never stored.
pub fn hash_write_key(write_key: &str) -> [u8; 32] {
    Sha256::digest(write_key.as_bytes()).into()
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, chunk) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).ok()?;
        bytes[index] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(bytes)
}

/// The part of a key that may be shown again: its first eight characters.
pub fn write_key_prefix(write_key: &str) -> String {
    write_key.chars().take(WRITE_KEY_PREFIX_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hash_round_trips_through_hex() {
        let key = generate_write_key();
        assert!(key.starts_with("wk_") && key.len() == 35);
        assert_ne!(key, generate_write_key());
        let hash = hash_write_key(&key);
        assert_eq!(unhex(&hex(&hash)), Some(hash));
        assert_eq!(write_key_prefix(&key).len(), 8);
        assert!(new_id("prj").starts_with("prj_"));
    }
}
