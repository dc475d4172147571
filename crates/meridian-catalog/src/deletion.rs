//! GDPR deletion requests: the record an executor in the project's region works through.

use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Actor;
use crate::catalog::{Catalog, CatalogBackend, Project};
use crate::error::CatalogError;
use crate::ids::new_id;
use crate::keyed_hash::CatalogKey;
use meridian_core::timestamp::now_unix_ms;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStatus {
    Pending,
    Running,
    Done,
    Failed,
}

impl DeletionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStatus::Pending => "pending",
            DeletionStatus::Running => "running",
            DeletionStatus::Done => "done",
            DeletionStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<DeletionStatus> {
        [
            DeletionStatus::Pending,
            DeletionStatus::Running,
            DeletionStatus::Done,
            DeletionStatus::Failed,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }
}

/// Where the executor is: `settle` (let messages already accepted reach the sinks, filtered),
/// `clickhouse`, `archive`, then `finished`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionStage {
    Settle,
    Clickhouse,
    Archive,
    Finished,
}

impl DeletionStage {
    pub fn as_str(self) -> &'static str {
        match self {
            DeletionStage::Settle => "settle",
            DeletionStage::Clickhouse => "clickhouse",
            DeletionStage::Archive => "archive",
            DeletionStage::Finished => "finished",
        }
    }

    pub fn parse(text: &str) -> Option<DeletionStage> {
        [
            DeletionStage::Settle,
            DeletionStage::Clickhouse,
            DeletionStage::Archive,
            DeletionStage::Finished,
        ]
        .into_iter()
        .find(|stage| stage.as_str() == text)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Deletion {
    pub deletion_id: String,
    pub org_id: String,
    pub project_id: String,
    pub region: String,
    pub user_ids: Vec<String>,
    pub status: DeletionStatus,
    pub stage: DeletionStage,
    pub clickhouse_rows_deleted: i64,
    pub archive_objects_scanned: i64,
    pub archive_objects_rewritten: i64,
    pub archive_messages_removed: i64,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// GDPR's one month: creation + 30 days.
    pub deadline_ms: i64,
}

/// Progress an executor records after each step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeletionProgress {
    pub clickhouse_rows_deleted: i64,
    pub archive_objects_scanned: i64,
    pub archive_objects_rewritten: i64,
    pub archive_messages_removed: i64,
}

const DELETION_COLUMNS: &str = "deletion_id, org_id, project_id, region, user_ids_json, status, stage, \
     clickhouse_rows_deleted, archive_objects_scanned, archive_objects_rewritten, archive_messages_removed, error, \
     created_at_ms, updated_at_ms, started_at_ms, finished_at_ms, deadline_ms";

/// The user ids of a deletion as the catalog keeps them while they may still be needed: sealed
/// with the catalog key (bound to the deletion's id), never in plaintext, the write-ahead log
/// included. Once the deletion is done only their keyed hashes are kept.
pub(crate) fn seal_user_ids(
    key: &CatalogKey,
    deletion_id: &str,
    user_ids: &[String],
) -> Result<String, CatalogError> {
    let json = serde_json::to_string(user_ids)
        .map_err(|error| CatalogError::Invalid(error.to_string()))?;
    Ok(key.seal(deletion_id, json.as_bytes()))
}

/// The user ids (or, once done, their hashes) of a stored deletion: sealed, or plain JSON (hashes,
/// and rows of versions that did not seal).
pub(crate) fn stored_user_ids(
    key: &CatalogKey,
    deletion_id: &str,
    stored: &str,
) -> Result<Vec<String>, CatalogError> {
    let corrupt = |reason: String| {
        CatalogError::Corrupt(format!("deletion {deletion_id} user ids: {reason}"))
    };
    if crate::keyed_hash::is_sealed(stored) {
        let json = key
            .open(deletion_id, stored)
            .ok_or_else(|| corrupt("sealed with another catalog key, or altered".to_string()))?;
        return serde_json::from_slice(&json).map_err(|error| corrupt(error.to_string()));
    }
    serde_json::from_str(stored).map_err(|error| corrupt(error.to_string()))
}

fn deletion_from_row(key: &CatalogKey, row: &AnyRow) -> Result<Deletion, CatalogError> {
    let deletion_id: String = row.try_get("deletion_id")?;
    let user_ids_json: String = row.try_get("user_ids_json")?;
    let status_text: String = row.try_get("status")?;
    let stage_text: String = row.try_get("stage")?;
    Ok(Deletion {
        user_ids: stored_user_ids(key, &deletion_id, &user_ids_json)?,
        deletion_id,
        org_id: row.try_get("org_id")?,
        project_id: row.try_get("project_id")?,
        region: row.try_get("region")?,
        status: DeletionStatus::parse(&status_text)
            .ok_or_else(|| CatalogError::Corrupt(format!("deletion status `{status_text}`")))?,
        stage: DeletionStage::parse(&stage_text)
            .ok_or_else(|| CatalogError::Corrupt(format!("deletion stage `{stage_text}`")))?,
        clickhouse_rows_deleted: row.try_get("clickhouse_rows_deleted")?,
        archive_objects_scanned: row.try_get("archive_objects_scanned")?,
        archive_objects_rewritten: row.try_get("archive_objects_rewritten")?,
        archive_messages_removed: row.try_get("archive_messages_removed")?,
        error: row.try_get("error")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        deadline_ms: row.try_get("deadline_ms")?,
    })
}

impl Catalog {
    /// Records a deletion of `user_ids` in the project (carried out in `region`) and suppresses
    /// them, in one transaction. The deadline is 30 days from now.
    pub async fn create_deletion(
        &self,
        project: &Project,
        user_ids: &[String],
        actor: &Actor,
    ) -> Result<Deletion, CatalogError> {
        let project_id = project.project_id.as_str();
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let mut unique_users: Vec<String> = user_ids.to_vec();
        unique_users.sort();
        unique_users.dedup();
        let deletion = Deletion {
            deletion_id: new_id("del"),
            org_id: project.org_id.clone(),
            project_id: project_id.to_string(),
            region: project.region.clone(),
            user_ids: unique_users,
            status: DeletionStatus::Pending,
            stage: DeletionStage::Settle,
            clickhouse_rows_deleted: 0,
            archive_objects_scanned: 0,
            archive_objects_rewritten: 0,
            archive_messages_removed: 0,
            error: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
            deadline_ms: now_ms + 30 * 86_400_000,
        };
        let user_ids_json = seal_user_ids(&self.key, &deletion.deletion_id, &deletion.user_ids)?;
        sqlx::query(
            "INSERT INTO deletions (deletion_id, org_id, project_id, region, user_ids_json, status, stage,
                clickhouse_rows_deleted, archive_objects_scanned, archive_objects_rewritten, archive_messages_removed,
                error, created_at_ms, updated_at_ms, started_at_ms, finished_at_ms, deadline_ms, lease_owner, lease_until_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, 0, 0, NULL, $8, $9, NULL, NULL, $10, NULL, NULL)",
        )
        .bind(&deletion.deletion_id)
        .bind(&deletion.org_id)
        .bind(&deletion.project_id)
        .bind(&deletion.region)
        .bind(&user_ids_json)
        .bind(deletion.status.as_str())
        .bind(deletion.stage.as_str())
        .bind(deletion.created_at_ms)
        .bind(deletion.updated_at_ms)
        .bind(deletion.deadline_ms)
        .execute(&mut *transaction)
        .await?;
        let user_hashes = self.user_hashes(project_id, &deletion.user_ids);
        for user_hash in &user_hashes {
            sqlx::query(
                "INSERT INTO suppressions (project_id, user_id, created_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (project_id, user_id) DO NOTHING",
            )
            .bind(project_id)
            .bind(user_hash)
            .bind(now_ms)
            .execute(&mut *transaction)
            .await?;
        }
        crate::snapshot_source::touch_project(&mut transaction, change.version, project_id).await?;
        self.commit_audited(
            transaction,
            change,
            &deletion.org_id,
            actor,
            "deletion.request",
            &deletion.deletion_id,
            None,
            Some(json!({"project_id": project_id, "region": deletion.region, "user_hashes": user_hashes,
                        "deadline_ms": deletion.deadline_ms, "suppressed": true})),
        )
        .await?;
        Ok(deletion)
    }

    pub async fn get_deletion(&self, deletion_id: &str) -> Result<Option<Deletion>, CatalogError> {
        let row = sqlx::query(&format!(
            "SELECT {DELETION_COLUMNS} FROM deletions WHERE deletion_id = $1"
        ))
        .bind(deletion_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref()
            .map(|row| deletion_from_row(&self.key, row))
            .transpose()
    }

    /// Claims one unfinished deletion of a region in `regions` for `node_id` until
    /// `lease_until_ms` (a lease another node may take over once it lapses). Returns it, running.
    pub async fn claim_deletion(
        &self,
        node_id: &str,
        regions: &[String],
        lease_until_ms: i64,
    ) -> Result<Option<Deletion>, CatalogError> {
        let claimed = crate::lease::claim(
            &self.pool,
            crate::lease::DELETIONS,
            node_id,
            regions,
            lease_until_ms,
        )
        .await?;
        let Some(deletion_id) = claimed else {
            return Ok(None);
        };
        let deletion = self.get_deletion(&deletion_id).await?;
        debug_assert!(
            deletion
                .as_ref()
                .is_some_and(|deletion| regions.contains(&deletion.region))
        );
        Ok(deletion)
    }

    /// Records progress (and renews the lease); audits each finished stage.
    pub async fn record_deletion_progress(
        &self,
        deletion_id: &str,
        node_id: &str,
        stage: DeletionStage,
        progress: DeletionProgress,
        lease_until_ms: i64,
        actor: &Actor,
    ) -> Result<(), CatalogError> {
        let mut transaction = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "SELECT {DELETION_COLUMNS} FROM deletions WHERE deletion_id = $1"
        ))
        .bind(deletion_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(before) = row
            .as_ref()
            .map(|row| deletion_from_row(&self.key, row))
            .transpose()?
        else {
            return Err(CatalogError::NotFound(format!(
                "deletion `{deletion_id}` does not exist"
            )));
        };
        let stage_changed = before.stage != stage;
        let change = if stage_changed {
            Some(Self::lock_change(&mut transaction).await?)
        } else {
            None
        };
        let updated = sqlx::query(
            "UPDATE deletions SET stage = $1, clickhouse_rows_deleted = $2, archive_objects_scanned = $3,
                archive_objects_rewritten = $4, archive_messages_removed = $5, lease_until_ms = $6, updated_at_ms = $7,
                error = NULL
             WHERE deletion_id = $8 AND lease_owner = $9",
        )
        .bind(stage.as_str())
        .bind(progress.clickhouse_rows_deleted)
        .bind(progress.archive_objects_scanned)
        .bind(progress.archive_objects_rewritten)
        .bind(progress.archive_messages_removed)
        .bind(lease_until_ms)
        .bind(now_unix_ms())
        .bind(deletion_id)
        .bind(node_id)
        .execute(&mut *transaction)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(CatalogError::conflict(
                "lease_lost",
                format!("deletion {deletion_id} is no longer leased to this node"),
            ));
        }
        if let Some(change) = change {
            self.record_audit(
                &mut transaction,
                change,
                &before.org_id,
                actor,
                &format!("deletion.{}_done", before.stage.as_str()),
                deletion_id,
                Some(json!({"stage": before.stage.as_str()})),
                Some(json!({"stage": stage.as_str(), "clickhouse_rows_deleted": progress.clickhouse_rows_deleted,
                            "archive_objects_rewritten": progress.archive_objects_rewritten,
                            "archive_messages_removed": progress.archive_messages_removed})),
            )
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Records a failed attempt (the executor retries later) without giving up the lease.
    pub async fn record_deletion_error(
        &self,
        deletion_id: &str,
        message: &str,
    ) -> Result<(), CatalogError> {
        sqlx::query("UPDATE deletions SET error = $1, updated_at_ms = $2 WHERE deletion_id = $3")
            .bind(message)
            .bind(now_unix_ms())
            .bind(deletion_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks the deletion done (or failed), releases the lease, and audits the outcome.
    pub async fn finish_deletion(
        &self,
        deletion_id: &str,
        status: DeletionStatus,
        error: Option<&str>,
        actor: &Actor,
    ) -> Result<Deletion, CatalogError> {
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let row = sqlx::query(&format!(
            "SELECT {DELETION_COLUMNS} FROM deletions WHERE deletion_id = $1"
        ))
        .bind(deletion_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(before) = row
            .as_ref()
            .map(|row| deletion_from_row(&self.key, row))
            .transpose()?
        else {
            return Err(CatalogError::NotFound(format!(
                "deletion `{deletion_id}` does not exist"
            )));
        };
        // Once done, the users' ids are needed nowhere: only their keyed hashes stay, which still
        // answer "was this user deleted, and when?".
        let kept_user_ids = if status == DeletionStatus::Done {
            self.user_hashes(&before.project_id, &before.user_ids)
        } else {
            before.user_ids.clone()
        };
        let kept_user_ids_json = if status == DeletionStatus::Done {
            serde_json::to_string(&kept_user_ids)
                .map_err(|error| CatalogError::Invalid(error.to_string()))?
        } else {
            seal_user_ids(&self.key, deletion_id, &kept_user_ids)?
        };
        sqlx::query(
            "UPDATE deletions SET status = $1, stage = 'finished', error = $2, finished_at_ms = $3, updated_at_ms = $3,
                lease_owner = NULL, lease_until_ms = NULL, user_ids_json = $4 WHERE deletion_id = $5",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms)
        .bind(&kept_user_ids_json)
        .bind(deletion_id)
        .execute(&mut *transaction)
        .await?;
        crate::snapshot_source::touch_project(&mut transaction, change.version, &before.project_id)
            .await?;
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            &format!("deletion.{}", status.as_str()),
            deletion_id,
            Some(json!({"status": before.status.as_str()})),
            Some(json!({"status": status.as_str(), "error": error,
                        "clickhouse_rows_deleted": before.clickhouse_rows_deleted,
                        "archive_objects_rewritten": before.archive_objects_rewritten,
                        "archive_messages_removed": before.archive_messages_removed})),
        )
        .await?;
        if status == DeletionStatus::Done && self.backend() == CatalogBackend::Sqlite {
            // The write-ahead log still holds the page images with the ids: fold it into the
            // database (where secure_delete zeroed them) and empty it.
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await
            {
                tracing::warn!(%error, "could not checkpoint the catalog after a deletion; the write-ahead log keeps the users' ids until the next checkpoint");
            }
        }
        Ok(Deletion {
            status,
            stage: DeletionStage::Finished,
            user_ids: kept_user_ids,
            error: error.map(str::to_string),
            finished_at_ms: Some(now_ms),
            updated_at_ms: now_ms,
            ..before
        })
    }

    /// The project's latest `limit` deletions, newest first.
    pub async fn recent_deletions(
        &self,
        project_id: &str,
        limit: usize,
    ) -> Result<Vec<Deletion>, CatalogError> {
        let rows = self
            .newest_rows(
                DELETION_COLUMNS,
                "deletions",
                "project_id",
                project_id,
                limit,
            )
            .await?;
        rows.iter()
            .map(|row| deletion_from_row(&self.key, row))
            .collect()
    }

    /// The project's deletions that covered `user_id` (found by recomputing its keyed hash for
    /// finished ones), newest first: "was this user deleted, and when?".
    pub async fn deletions_of_user(
        &self,
        project_id: &str,
        user_id: &str,
    ) -> Result<Vec<Deletion>, CatalogError> {
        let user_hash = self.key.user_hash(project_id, user_id);
        let rows = sqlx::query(&format!(
            "SELECT {DELETION_COLUMNS} FROM deletions WHERE project_id = $1 ORDER BY created_at_ms DESC"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        let mut found = Vec::new();
        for row in &rows {
            let deletion = deletion_from_row(&self.key, row)?;
            if deletion
                .user_ids
                .iter()
                .any(|stored| stored == &user_hash || stored == user_id)
            {
                found.push(deletion);
            }
        }
        Ok(found)
    }
}
