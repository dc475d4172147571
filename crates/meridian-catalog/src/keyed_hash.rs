//! The catalog's keyed hashes (HMAC-SHA256), with a key the database does not hold.
//!
//! - **User ids.** Suppressions, finished deletions and audit entries keep
//!   [`CatalogKey::user_hash`] of `(project, user id)`, never the id itself, so once a deletion is
//!   done the id exists nowhere in the catalog in plaintext. "Was user X of project P deleted, and
//!   when?" is answered by recomputing the hash.
//! - **The audit chain.** Each entry's hash is [`CatalogKey::audit_hash`] of its fields and its
//!   predecessor's hash: someone who can write to the database but does not have the key cannot
//!   rewrite the tail of the chain and its head together (`meridian audit verify` recomputes).
//!
//! The key comes from the configuration (`catalog.hash_key`, required with a PostgreSQL catalog so
//! every node of a cluster uses the same one) or, for the embedded SQLite catalog, from
//! `<data_dir>/catalog_hash_key`, created on first start. Losing it loses suppression lookups and
//! audit verification: back it up with the catalog, apart from it.

use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use base64::Engine;

use crate::ids::hex;

/// The prefix of keyed audit hashes; entries written before carry bare SHA-256 hex.
pub const KEYED_AUDIT_HASH_PREFIX: &str = "k1:";
/// The prefix of user hashes.
pub const USER_HASH_PREFIX: &str = "u1:";
/// The fewest key bytes accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// The prefix of values sealed with [`CatalogKey::seal`].
pub const SEALED_PREFIX: &str = "s1:";

/// An HMAC-SHA256 key for the catalog's hashes, and an AES-256-GCM key derived from it that seals
/// what must be kept in the catalog for a while but never in plaintext (the user ids of a deletion
/// still under way).
#[derive(Clone)]
pub struct CatalogKey {
    key: hmac::Key,
    sealing: Arc<LessSafeKey>,
}

impl std::fmt::Debug for CatalogKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("CatalogKey([redacted])")
    }
}

impl CatalogKey {
    /// `None` when the key is shorter than [`MIN_KEY_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Option<CatalogKey> {
        if bytes.len() < MIN_KEY_BYTES {
            return None;
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let derived = hmac::sign(&key, b"meridian sealing key v1");
        let sealing = UnboundKey::new(&AES_256_GCM, derived.as_ref()).ok()?;
        Some(CatalogKey {
            key,
            sealing: Arc::new(LessSafeKey::new(sealing)),
        })
    }

    /// `plaintext` sealed (AES-256-GCM, a random nonce): `s1:<base64 of nonce and ciphertext>`.
    /// `context` is authenticated with it (a value sealed for one row cannot be moved to another).
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> String {
        let mut nonce_bytes = [0u8; NONCE_LEN];
        rand::fill(&mut nonce_bytes);
        let mut sealed = plaintext.to_vec();
        // Sealing only fails for inputs of more than 64 GiB.
        if self
            .sealing
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(context.as_bytes()),
                &mut sealed,
            )
            .is_err()
        {
            sealed.clear();
        }
        let mut framed = nonce_bytes.to_vec();
        framed.extend_from_slice(&sealed);
        format!(
            "{SEALED_PREFIX}{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(framed)
        )
    }

    /// What [`CatalogKey::seal`] sealed with the same `context`; `None` when it was sealed with
    /// another key or context, or altered.
    pub fn open(&self, context: &str, sealed: &str) -> Option<Vec<u8>> {
        let encoded = sealed.strip_prefix(SEALED_PREFIX)?;
        let framed = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(encoded)
            .ok()?;
        if framed.len() < NONCE_LEN {
            return None;
        }
        let (nonce_bytes, ciphertext) = framed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce_bytes).ok()?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .sealing
            .open_in_place(nonce, Aad::from(context.as_bytes()), &mut buffer)
            .ok()?;
        Some(plaintext.to_vec())
    }

    /// The keyed hash of a user id within a project: `u1:<64 hex>`.
    pub fn user_hash(&self, project_id: &str, user_id: &str) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(b"meridian user id\0");
        context.update(project_id.as_bytes());
        context.update(b"\0");
        context.update(user_id.as_bytes());
        format!("{USER_HASH_PREFIX}{}", hex(context.sign().as_ref()))
    }

    /// The keyed hash of an audit entry's canonical bytes: `k1:<64 hex>`.
    pub fn audit_hash(&self, canonical: &[u8]) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(b"meridian audit entry\0");
        context.update(canonical);
        format!("{KEYED_AUDIT_HASH_PREFIX}{}", hex(context.sign().as_ref()))
    }
}

/// True for strings shaped like [`CatalogKey::user_hash`] output.
pub fn is_user_hash(text: &str) -> bool {
    text.strip_prefix(USER_HASH_PREFIX)
        .is_some_and(|digits| digits.len() == 64 && digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// True for strings [`CatalogKey::seal`] made.
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(SEALED_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let key = CatalogKey::from_bytes(&[7u8; 32]).unwrap();
        let sealed = key.seal("del_1", br#"["alice@example.com"]"#);
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("alice"), "{sealed}");
        assert_ne!(
            sealed,
            key.seal("del_1", br#"["alice@example.com"]"#),
            "a fresh nonce"
        );
        assert_eq!(
            key.open("del_1", &sealed).as_deref(),
            Some(&br#"["alice@example.com"]"#[..])
        );
        assert_eq!(key.open("del_2", &sealed), None, "another row's value");
        let other = CatalogKey::from_bytes(&[8u8; 32]).unwrap();
        assert_eq!(other.open("del_1", &sealed), None, "another key");
        let mut tampered = sealed.clone();
        tampered.push('A');
        assert_eq!(key.open("del_1", &tampered), None);
    }

    #[test]
    fn hashes_depend_on_the_key_the_project_and_the_user() {
        let key = CatalogKey::from_bytes(&[7u8; 32]).unwrap();
        let other_key = CatalogKey::from_bytes(&[8u8; 32]).unwrap();
        let alice = key.user_hash("prj_a", "alice");
        assert!(is_user_hash(&alice), "{alice}");
        assert_eq!(alice, key.user_hash("prj_a", "alice"), "recomputable");
        assert_ne!(alice, key.user_hash("prj_b", "alice"));
        assert_ne!(alice, key.user_hash("prj_a", "alicf"));
        assert_ne!(alice, other_key.user_hash("prj_a", "alice"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(key.user_hash("ab", "c"), key.user_hash("a", "bc"));
        assert!(
            key.audit_hash(b"entry")
                .starts_with(KEYED_AUDIT_HASH_PREFIX)
        );
        assert_ne!(key.audit_hash(b"entry"), other_key.audit_hash(b"entry"));
        assert!(CatalogKey::from_bytes(&[1u8; 31]).is_none(), "too short");
        assert_eq!(format!("{key:?}"), "CatalogKey([redacted])");
    }
}
