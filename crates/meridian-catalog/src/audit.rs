//! The tamper-evident audit log: every admin change, chained by hashes. Entry `n` stores the hash
//! of entry `n - 1`, and its own hash covers its fields and that previous hash, so editing or
//! deleting any entry breaks the chain from there on (`meridian audit verify`).
//!
//! The hash is keyed (HMAC-SHA256 with the catalog key, which the database does not hold: see
//! [`crate::keyed_hash`]), so a database writer cannot rewrite the tail of the chain and its head
//! together. Entries written before keyed hashes carry plain SHA-256; they may only precede the
//! keyed ones, and the chain must end with a keyed entry (a node appends `audit.chain_anchored`
//! when it first opens a catalog whose last entry is not keyed).

use meridian_core::timestamp::now_unix_ms;
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::catalog::{Catalog, Change, Page};
use crate::error::CatalogError;

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

pub(crate) fn audit_from_row(row: &AnyRow) -> Result<AuditEntry, CatalogError> {
    let parse = |text: Option<String>| -> Result<Option<Value>, CatalogError> {
        text.map(|text| {
            serde_json::from_str(&text)
                .map_err(|error| CatalogError::Corrupt(format!("audit entry JSON: {error}")))
        })
        .transpose()
    };
    Ok(AuditEntry {
        seq: row.try_get("seq")?,
        org_id: row.try_get("org_id")?,
        at_ms: row.try_get("at_ms")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target: row.try_get("target")?,
        before: parse(row.try_get("before_json")?)?,
        after: parse(row.try_get("after_json")?)?,
        request_id: row.try_get("request_id")?,
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    })
}

impl Catalog {
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn record_audit(
        &self,
        transaction: &mut Transaction<'_, Any>,
        change: Change,
        org_id: &str,
        actor: &Actor,
        action: &str,
        target: &str,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<AuditEntry, CatalogError> {
        let mut entry = AuditEntry {
            seq: change.audit_seq,
            org_id: org_id.to_string(),
            at_ms: now_unix_ms(),
            actor: actor.subject.clone(),
            action: action.to_string(),
            target: target.to_string(),
            before,
            after,
            request_id: actor.request_id.clone(),
            prev_hash: change.previous_hash,
            hash: String::new(),
        };
        entry.hash = entry.compute_hash(&self.key);
        sqlx::query(
            "INSERT INTO audit_log (seq, org_id, at_ms, actor, action, target, before_json,
                after_json, request_id, prev_hash, hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(entry.seq)
        .bind(&entry.org_id)
        .bind(entry.at_ms)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(entry.before.as_ref().map(Value::to_string))
        .bind(entry.after.as_ref().map(Value::to_string))
        .bind(&entry.request_id)
        .bind(&entry.prev_hash)
        .bind(&entry.hash)
        .execute(&mut **transaction)
        .await?;
        sqlx::query("UPDATE catalog_state SET audit_head_hash = $1 WHERE id = 1")
            .bind(&entry.hash)
            .execute(&mut **transaction)
            .await?;
        Ok(entry)
    }

    pub async fn list_audit(
        &self,
        org_id: &str,
        after_seq: i64,
        limit: usize,
    ) -> Result<Page<AuditEntry>, CatalogError> {
        let limit = limit.clamp(1, 1000);
        let rows = sqlx::query(
            "SELECT seq, org_id, at_ms, actor, action, target, before_json, after_json, request_id,
                prev_hash, hash
             FROM audit_log WHERE org_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(org_id)
        .bind(after_seq)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::of_items_past_limit(items, limit, |entry| {
            entry.seq.to_string()
        }))
    }

    /// Checks the whole audit chain, and that its head matches the last entry.
    pub async fn verify_audit_chain(&self) -> Result<AuditChainReport, CatalogError> {
        let mut report = AuditChainReport {
            entries_checked: 0,
            first_broken: None,
        };
        let mut position = crate::audit::ChainPosition::default();
        loop {
            let after_seq = position.previous.as_ref().map(|(seq, _)| *seq).unwrap_or(0);
            let rows = sqlx::query(
                "SELECT seq, org_id, at_ms, actor, action, target, before_json, after_json,
                    request_id, prev_hash, hash
                 FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT 1000",
            )
            .bind(after_seq)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                break;
            }
            let entries = rows
                .iter()
                .map(audit_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            verify_chain(&entries, &self.key, &mut report, &mut position);
            if report.first_broken.is_some() {
                return Ok(report);
            }
        }
        let head = sqlx::query("SELECT audit_seq, audit_head_hash FROM catalog_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let head_seq: i64 = head.try_get("audit_seq")?;
        let head_hash: String = head.try_get("audit_head_hash")?;
        let (last_seq, last_hash) = position.previous.unwrap_or((0, String::new()));
        if head_seq != last_seq || head_hash != last_hash {
            report.first_broken = Some((
                last_seq + 1,
                format!(
                    "the chain ends at entry {last_seq} but the catalog recorded {head_seq} entries (entries were deleted)"
                ),
            ));
        } else if last_seq > 0 && !position.keyed_seen {
            report.first_broken = Some((
                last_seq,
                "the chain has no keyed entry: it was written before keyed hashes and no node has anchored it yet (start a node once), or it was rewritten".to_string(),
            ));
        }
        Ok(report)
    }
}
