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

use aws_lc_rs::hmac;

use crate::ids::hex;

/// The prefix of keyed audit hashes; entries written before carry bare SHA-256 hex.
pub const KEYED_AUDIT_HASH_PREFIX: &str = "k1:";
/// The prefix of user hashes.
pub const USER_HASH_PREFIX: &str = "u1:";
/// The fewest key bytes accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// An HMAC-SHA256 key for the catalog's hashes.
#[derive(Clone)]
pub struct CatalogKey {
    key: hmac::Key,
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
        Some(CatalogKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

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
