//! Anchoring an audit log written before keyed hashes (see [`crate::audit`]).
//!
//! Such a log is chained by plain SHA-256, which anyone who can write to the database can
//! recompute, and its suppression and deletion entries name user ids. Anchoring checks that chain
//! is intact, replaces every user id in those entries by its keyed hash, recomputes every entry's
//! hash with the catalog key, and appends `audit.chain_anchored`. It must be asked for by someone
//! who knows the log was not tampered with before (`meridian audit anchor`), or happens when a
//! node creates the catalog key for an embedded catalog: a database writer cannot trigger it.

use serde_json::{Value, json};
use sqlx::Row;

use crate::audit::audit_from_row;
use crate::audit::{Actor, AuditChainReport, AuditEntry, ChainPosition, verify_chain};
use crate::catalog::Catalog;
use crate::error::CatalogError;
use crate::keyed_hash::CatalogKey;

/// What anchoring did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnchorOutcome {
    /// The log was empty or already keyed: nothing to do.
    AlreadyAnchored,
    /// This many entries were re-hashed with the key (and their user ids replaced by hashes).
    Anchored { entries: u64 },
}

impl Catalog {
    /// Whether the audit log ends with a keyed entry (or is empty).
    pub async fn audit_chain_is_anchored(&self) -> Result<bool, CatalogError> {
        let row = sqlx::query("SELECT audit_head_hash FROM catalog_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        let head: String = row.try_get("audit_head_hash")?;
        Ok(head.is_empty() || head.starts_with(crate::keyed_hash::KEYED_AUDIT_HASH_PREFIX))
    }

    /// Anchors a log written before keyed hashes (see the module documentation). Refuses a log
    /// whose chain is broken.
    pub async fn anchor_audit_chain(&self, actor: &Actor) -> Result<AnchorOutcome, CatalogError> {
        if self.audit_chain_is_anchored().await? {
            return Ok(AnchorOutcome::AlreadyAnchored);
        }
        let mut transaction = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT seq, org_id, at_ms, actor, action, target, before_json, after_json,
                request_id, prev_hash, hash
             FROM audit_log ORDER BY seq",
        )
        .fetch_all(&mut *transaction)
        .await?;
        let mut entries = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut report = AuditChainReport {
            entries_checked: 0,
            first_broken: None,
        };
        let mut position = ChainPosition::default();
        verify_chain(&entries, &self.key, &mut report, &mut position);
        if let Some((seq, reason)) = report.first_broken {
            return Err(CatalogError::Invalid(format!(
                "the audit log is broken at entry {seq} ({reason}): it cannot be anchored"
            )));
        }
        if position.keyed_seen {
            return Ok(AnchorOutcome::AlreadyAnchored);
        }
        let mut previous_hash = String::new();
        for entry in &mut entries {
            hash_user_ids_in_entry(&self.key, entry);
            entry.prev_hash = previous_hash.clone();
            entry.hash = entry.compute_hash(&self.key);
            previous_hash = entry.hash.clone();
            sqlx::query(
                "UPDATE audit_log SET before_json = $1, after_json = $2, prev_hash = $3, hash = $4
                 WHERE seq = $5",
            )
            .bind(entry.before.as_ref().map(Value::to_string))
            .bind(entry.after.as_ref().map(Value::to_string))
            .bind(&entry.prev_hash)
            .bind(&entry.hash)
            .bind(entry.seq)
            .execute(&mut *transaction)
            .await?;
        }
        sqlx::query("UPDATE catalog_state SET audit_head_hash = $1 WHERE id = 1")
            .bind(&previous_hash)
            .execute(&mut *transaction)
            .await?;
        let change = Catalog::lock_change(&mut transaction).await?;
        self.commit_audited(
            transaction,
            change,
            "",
            actor,
            "audit.chain_anchored",
            "audit_log",
            None,
            Some(json!({"entries_rehashed": entries.len()})),
        )
        .await?;
        Ok(AnchorOutcome::Anchored {
            entries: entries.len() as u64,
        })
    }
}

/// Replaces the user ids that suppression and deletion entries of earlier versions name by their
/// keyed hashes.
fn hash_user_ids_in_entry(key: &CatalogKey, entry: &mut AuditEntry) {
    let project_id = match entry.action.as_str() {
        "suppression.add" | "suppression.remove" => entry.target.clone(),
        "deletion.request" => entry
            .after
            .as_ref()
            .and_then(|after| after.get("project_id"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => return,
    };
    for details in [entry.before.as_mut(), entry.after.as_mut()]
        .into_iter()
        .flatten()
    {
        let Some(object) = details.as_object_mut() else {
            continue;
        };
        if let Some(Value::Array(user_ids)) = object.remove("user_ids") {
            let hashes: Vec<Value> = user_ids
                .iter()
                .filter_map(Value::as_str)
                .map(|user_id| Value::String(key.user_hash(&project_id, user_id)))
                .collect();
            object.insert("user_hashes".into(), Value::Array(hashes));
        }
        if let Some(Value::String(user_id)) = object.remove("user_id") {
            object.insert(
                "user_hash".into(),
                Value::String(key.user_hash(&project_id, &user_id)),
            );
        }
    }
}
