//! The tamper-evident audit log: every admin change, chained by hashes. Entry `n` stores the hash
//! of entry `n - 1`, and its own hash covers its fields and that previous hash, so editing or
//! deleting any entry breaks the chain from there on (`meridian audit verify`).
//!
//! The hash is keyed (HMAC-SHA256 with the catalog key, which the database does not hold: see
//! [`crate::keyed_hash`]), so a database writer cannot rewrite the tail of the chain and its head
//! together. Entries written before keyed hashes carry plain SHA-256; they may only precede the
//! keyed ones, and the chain must end with a keyed entry (a node appends `audit.chain_anchored`
//! when it first opens a catalog whose last entry is not keyed).

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ids::hex;
use crate::keyed_hash::{CatalogKey, KEYED_AUDIT_HASH_PREFIX};

/// Who made a change, and in which request.
#[derive(Clone, Debug)]
pub struct Actor {
    pub subject: String,
    pub request_id: String,
}

impl Actor {
    pub fn system(request_id: &str) -> Actor {
        Actor {
            subject: "system".to_string(),
            request_id: request_id.to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub org_id: String,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub before: Option<Value>,
    pub after: Option<Value>,
    pub request_id: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields an entry's hash covers, in a fixed order.
#[derive(Serialize)]
struct HashedFields<'a> {
    seq: i64,
    org_id: &'a str,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    target: &'a str,
    before: &'a Option<Value>,
    after: &'a Option<Value>,
    request_id: &'a str,
    prev_hash: &'a str,
}

impl AuditEntry {
    fn canonical_bytes(&self) -> Vec<u8> {
        let fields = HashedFields {
            seq: self.seq,
            org_id: &self.org_id,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            target: &self.target,
            before: &self.before,
            after: &self.after,
            request_id: &self.request_id,
            prev_hash: &self.prev_hash,
        };
        // Serializing plain strings, integers and JSON values cannot fail.
        serde_json::to_vec(&fields).unwrap_or_default()
    }

    /// The keyed hash new entries get.
    pub fn compute_hash(&self, key: &CatalogKey) -> String {
        key.audit_hash(&self.canonical_bytes())
    }

    /// The plain SHA-256 of entries written before keyed hashes.
    pub(crate) fn compute_unkeyed_hash(&self) -> String {
        hex(&Sha256::digest(self.canonical_bytes()))
    }

    pub fn is_keyed(&self) -> bool {
        self.hash.starts_with(KEYED_AUDIT_HASH_PREFIX)
    }
}

/// The result of checking the whole chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditChainReport {
    pub entries_checked: u64,
    /// The first entry that does not fit the chain, and why.
    pub first_broken: Option<(i64, String)>,
}

/// Where a chain check stands between pages of entries.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChainPosition {
    /// The last entry checked: its seq and hash.
    pub previous: Option<(i64, String)>,
    /// Whether a keyed entry was met (no unkeyed entry may follow one).
    pub keyed_seen: bool,
}

/// Checks entries given in ascending `seq` order.
pub(crate) fn verify_chain(
    entries: &[AuditEntry],
    key: &CatalogKey,
    report: &mut AuditChainReport,
    position: &mut ChainPosition,
) {
    for entry in entries {
        if report.first_broken.is_some() {
            return;
        }
        report.entries_checked += 1;
        let (expected_seq, expected_prev_hash) = match &position.previous {
            Some((seq, hash)) => (*seq + 1, hash.clone()),
            None => (1, String::new()),
        };
        let problem = if entry.seq != expected_seq {
            Some(format!(
                "expected entry {expected_seq} here (an entry is missing or out of place)"
            ))
        } else if entry.prev_hash != expected_prev_hash {
            Some("its previous-hash does not match the entry before it".to_string())
        } else if entry.is_keyed() {
            (entry.compute_hash(key) != entry.hash).then(|| {
                "its keyed hash does not match (it was altered, or the catalog key is not the one it was written with)".to_string()
            })
        } else if position.keyed_seen {
            Some("an entry without a keyed hash follows keyed ones (it was rewritten)".to_string())
        } else {
            (entry.compute_unkeyed_hash() != entry.hash)
                .then(|| "its content does not match its hash (it was altered)".to_string())
        };
        if let Some(reason) = problem {
            report.first_broken = Some((entry.seq, reason));
            return;
        }
        position.keyed_seen |= entry.is_keyed();
        position.previous = Some((entry.seq, entry.hash.clone()));
    }
}
