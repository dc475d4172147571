//! The tamper-evident audit log: every admin change, chained by hashes. Entry `n` stores the hash
//! of entry `n - 1`, and its own hash covers its fields and that previous hash, so editing or
//! deleting any entry breaks the chain from there on (`meridian audit verify`).

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::ids::hex;

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
    pub fn compute_hash(&self) -> String {
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
        let canonical = serde_json::to_vec(&fields).unwrap_or_default();
        hex(&Sha256::digest(&canonical))
    }
}

/// The result of checking the whole chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditChainReport {
    pub entries_checked: u64,
    /// The first entry that does not fit the chain, and why.
    pub first_broken: Option<(i64, String)>,
}

/// Checks entries given in ascending `seq` order.
pub(crate) fn verify_chain(
    entries: &[AuditEntry],
    report: &mut AuditChainReport,
    previous: &mut Option<(i64, String)>,
) {
    for entry in entries {
        if report.first_broken.is_some() {
            return;
        }
        report.entries_checked += 1;
        let (expected_seq, expected_prev_hash) = match previous {
            Some((seq, hash)) => (*seq + 1, hash.clone()),
            None => (1, String::new()),
        };
        let problem = if entry.seq != expected_seq {
            Some(format!(
                "expected entry {expected_seq} here (an entry is missing or out of place)"
            ))
        } else if entry.prev_hash != expected_prev_hash {
            Some("its previous-hash does not match the entry before it".to_string())
        } else if entry.compute_hash() != entry.hash {
            Some("its content does not match its hash (it was altered)".to_string())
        } else {
            None
        };
        if let Some(reason) = problem {
            report.first_broken = Some((entry.seq, reason));
            return;
        }
        *previous = Some((entry.seq, entry.hash.clone()));
    }
}
