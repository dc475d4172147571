//! Replays: re-inserting a project's archived messages of a received-day range into its region's
//! warehouse. The record an executor in the project's region works through, object by object.

use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Actor;
use crate::catalog::{Catalog, Project};
use crate::error::CatalogError;
use crate::ids::new_id;
use meridian_core::timestamp::now_unix_ms;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayStatus {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl ReplayStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayStatus::Pending => "pending",
            ReplayStatus::Running => "running",
            ReplayStatus::Done => "done",
            ReplayStatus::Failed => "failed",
            ReplayStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<ReplayStatus> {
        [
            ReplayStatus::Pending,
            ReplayStatus::Running,
            ReplayStatus::Done,
            ReplayStatus::Failed,
            ReplayStatus::Cancelled,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            ReplayStatus::Done | ReplayStatus::Failed | ReplayStatus::Cancelled
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replay {
    pub replay_id: String,
    pub org_id: String,
    pub project_id: String,
    pub region: String,
    /// First and last received-day (UTC day starts, in ms) replayed, both included.
    pub from_day_ms: i64,
    pub to_day_ms: i64,
    pub status: ReplayStatus,
    pub cancel_requested: bool,
    pub progress: ReplayProgress,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
}

/// Where a replay is: objects are worked through in the order of their names, and the name of
/// the last one finished is kept, so a replay resumes after it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayProgress {
    pub objects_total: i64,
    pub objects_done: i64,
    pub last_object: Option<String>,
    pub messages_read: i64,
    /// Inserted because the warehouse did not have them.
    pub messages_inserted: i64,
    /// Already in the warehouse: left alone.
    pub messages_present: i64,
    /// Of users deleted since: never brought back.
    pub messages_erased: i64,
    /// Refused by the warehouse for their data (they stay in the archive).
    pub messages_refused: i64,
}

const REPLAY_COLUMNS: &str = "replay_id, org_id, project_id, region, from_day_ms, to_day_ms, status, cancel_requested,
    objects_total, objects_done, last_object, messages_read, messages_inserted, messages_present, messages_erased,
    messages_refused, error, created_at_ms, updated_at_ms, started_at_ms, finished_at_ms";

fn replay_from_row(row: &AnyRow) -> Result<Replay, CatalogError> {
    let status: String = row.try_get("status")?;
    Ok(Replay {
        replay_id: row.try_get("replay_id")?,
        org_id: row.try_get("org_id")?,
        project_id: row.try_get("project_id")?,
        region: row.try_get("region")?,
        from_day_ms: row.try_get("from_day_ms")?,
        to_day_ms: row.try_get("to_day_ms")?,
        status: ReplayStatus::parse(&status)
            .ok_or_else(|| CatalogError::Invalid(format!("unknown replay status `{status}`")))?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        progress: ReplayProgress {
            objects_total: row.try_get("objects_total")?,
            objects_done: row.try_get("objects_done")?,
            last_object: row.try_get("last_object")?,
            messages_read: row.try_get("messages_read")?,
            messages_inserted: row.try_get("messages_inserted")?,
            messages_present: row.try_get("messages_present")?,
            messages_erased: row.try_get("messages_erased")?,
            messages_refused: row.try_get("messages_refused")?,
        },
        error: row.try_get("error")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
    })
}

/// How many jobs of `table` (deletions, replays) of the project are pending or running.
async fn unfinished_of_project(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    table: &'static str,
    project_id: &str,
) -> Result<i64, CatalogError> {
    let count = sqlx::query(&format!(
        "SELECT COUNT(*) AS n FROM {table} WHERE project_id = $1 AND status IN ('pending', 'running')"
    ))
    .bind(project_id)
    .fetch_one(&mut **transaction)
    .await?
    .try_get("n")?;
    Ok(count)
}

impl Catalog {
    /// Records a replay of the project's received-days `[from_day_ms, to_day_ms]`, audited.
    /// Refused while a GDPR deletion of the project is pending or running (the deletion would race
    /// the rows coming back), or while another replay of the project is unfinished.
    pub async fn create_replay(
        &self,
        project: &Project,
        from_day_ms: i64,
        to_day_ms: i64,
        actor: &Actor,
    ) -> Result<Replay, CatalogError> {
        let project_id = project.project_id.as_str();
        if from_day_ms > to_day_ms {
            return Err(CatalogError::Invalid(
                "`from` is after `to`: the range is empty".to_string(),
            ));
        }
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let deletions_in_flight =
            unfinished_of_project(&mut transaction, "deletions", project_id).await?;
        if deletions_in_flight > 0 {
            return Err(CatalogError::conflict(
                "deletion_in_progress",
                format!(
                    "project {project_id} has a GDPR deletion pending or running; replay once it is done"
                ),
            ));
        }
        let replays_in_flight =
            unfinished_of_project(&mut transaction, "replays", project_id).await?;
        if replays_in_flight > 0 {
            return Err(CatalogError::conflict(
                "replay_in_progress",
                format!(
                    "project {project_id} already has a replay pending or running; wait for it or cancel it"
                ),
            ));
        }
        let replay = Replay {
            replay_id: new_id("rpl"),
            org_id: project.org_id.clone(),
            project_id: project_id.to_string(),
            region: project.region.clone(),
            from_day_ms,
            to_day_ms,
            status: ReplayStatus::Pending,
            cancel_requested: false,
            progress: ReplayProgress::default(),
            error: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            started_at_ms: None,
            finished_at_ms: None,
        };
        sqlx::query(
            "INSERT INTO replays (replay_id, org_id, project_id, region, from_day_ms, to_day_ms, status,
                cancel_requested, objects_total, objects_done, last_object, messages_read, messages_inserted,
                messages_present, messages_erased, messages_refused, error, created_at_ms, updated_at_ms,
                started_at_ms, finished_at_ms, lease_owner, lease_until_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, 0, NULL, 0, 0, 0, 0, 0, NULL, $8, $9, NULL, NULL, NULL, NULL)",
        )
        .bind(&replay.replay_id)
        .bind(&replay.org_id)
        .bind(&replay.project_id)
        .bind(&replay.region)
        .bind(from_day_ms)
        .bind(to_day_ms)
        .bind(replay.status.as_str())
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut *transaction)
        .await?;
        self.commit_audited(
            transaction,
            change,
            &replay.org_id,
            actor,
            "replay.start",
            &replay.replay_id,
            None,
            Some(json!({"project_id": project_id, "region": replay.region,
                        "from_day_ms": from_day_ms, "to_day_ms": to_day_ms})),
        )
        .await?;
        Ok(replay)
    }

    /// The project's latest `limit` replays, newest first.
    pub async fn recent_replays(
        &self,
        project_id: &str,
        limit: usize,
    ) -> Result<Vec<Replay>, CatalogError> {
        let rows = self
            .newest_rows(REPLAY_COLUMNS, "replays", "project_id", project_id, limit)
            .await?;
        rows.iter().map(replay_from_row).collect()
    }

    pub async fn get_replay(&self, replay_id: &str) -> Result<Option<Replay>, CatalogError> {
        let row = sqlx::query(&format!(
            "SELECT {REPLAY_COLUMNS} FROM replays WHERE replay_id = $1"
        ))
        .bind(replay_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(replay_from_row).transpose()
    }

    /// Claims one unfinished replay of a region in `regions` for `node_id` until `lease_until_ms`
    /// (another node may take it over once the lease lapses). Returns it, running.
    pub async fn claim_replay(
        &self,
        node_id: &str,
        regions: &[String],
        lease_until_ms: i64,
    ) -> Result<Option<Replay>, CatalogError> {
        let claimed = crate::lease::claim(
            &self.pool,
            crate::lease::REPLAYS,
            node_id,
            regions,
            lease_until_ms,
        )
        .await?;
        let Some(replay_id) = claimed else {
            return Ok(None);
        };
        let replay = self.get_replay(&replay_id).await?;
        debug_assert!(
            replay
                .as_ref()
                .is_some_and(|replay| regions.contains(&replay.region))
        );
        Ok(replay)
    }

    /// Records progress after an object and renews the lease. Returns the replay as stored (its
    /// `cancel_requested` tells the executor to stop).
    pub async fn record_replay_progress(
        &self,
        replay_id: &str,
        node_id: &str,
        progress: &ReplayProgress,
        lease_until_ms: i64,
    ) -> Result<Replay, CatalogError> {
        let updated = sqlx::query(
            "UPDATE replays SET objects_total = $1, objects_done = $2, last_object = $3, messages_read = $4,
                messages_inserted = $5, messages_present = $6, messages_erased = $7, messages_refused = $8,
                lease_until_ms = $9, updated_at_ms = $10, error = NULL
             WHERE replay_id = $11 AND lease_owner = $12 AND status = 'running'",
        )
        .bind(progress.objects_total)
        .bind(progress.objects_done)
        .bind(progress.last_object.as_deref())
        .bind(progress.messages_read)
        .bind(progress.messages_inserted)
        .bind(progress.messages_present)
        .bind(progress.messages_erased)
        .bind(progress.messages_refused)
        .bind(lease_until_ms)
        .bind(now_unix_ms())
        .bind(replay_id)
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(CatalogError::conflict(
                "lease_lost",
                format!("replay {replay_id} is no longer running on this node"),
            ));
        }
        self.get_replay(replay_id)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("replay `{replay_id}` does not exist")))
    }

    /// Records a failed attempt (the executor retries later) without giving up the lease.
    pub async fn record_replay_error(
        &self,
        replay_id: &str,
        message: &str,
    ) -> Result<(), CatalogError> {
        sqlx::query("UPDATE replays SET error = $1, updated_at_ms = $2 WHERE replay_id = $3")
            .bind(message)
            .bind(now_unix_ms())
            .bind(replay_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends the replay (done, failed or cancelled), releases the lease, and audits the outcome.
    pub async fn finish_replay(
        &self,
        replay_id: &str,
        status: ReplayStatus,
        error: Option<&str>,
        actor: &Actor,
    ) -> Result<Replay, CatalogError> {
        debug_assert!(status.is_finished());
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let row = sqlx::query(&format!(
            "SELECT {REPLAY_COLUMNS} FROM replays WHERE replay_id = $1"
        ))
        .bind(replay_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(before) = row.as_ref().map(replay_from_row).transpose()? else {
            return Err(CatalogError::NotFound(format!(
                "replay `{replay_id}` does not exist"
            )));
        };
        sqlx::query(
            "UPDATE replays SET status = $1, error = $2, finished_at_ms = $3, updated_at_ms = $3,
                lease_owner = NULL, lease_until_ms = NULL
             WHERE replay_id = $4",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms)
        .bind(replay_id)
        .execute(&mut *transaction)
        .await?;
        let progress = &before.progress;
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            &format!("replay.{}", status.as_str()),
            replay_id,
            Some(json!({"status": before.status.as_str()})),
            Some(json!({"status": status.as_str(), "error": error,
                        "objects_done": progress.objects_done,
                        "messages_inserted": progress.messages_inserted,
                        "messages_present": progress.messages_present,
                        "messages_erased": progress.messages_erased})),
        )
        .await?;
        self.get_replay(replay_id)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("replay `{replay_id}` does not exist")))
    }

    /// Cancels a replay: a pending one at once, a running one at its next object (its executor
    /// sees the request and ends it as cancelled). Audited. A finished replay cannot be cancelled.
    pub async fn cancel_replay(
        &self,
        replay_id: &str,
        actor: &Actor,
    ) -> Result<Replay, CatalogError> {
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let row = sqlx::query(&format!(
            "SELECT {REPLAY_COLUMNS} FROM replays WHERE replay_id = $1"
        ))
        .bind(replay_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(before) = row.as_ref().map(replay_from_row).transpose()? else {
            return Err(CatalogError::NotFound(format!(
                "replay `{replay_id}` does not exist"
            )));
        };
        if before.status.is_finished() {
            return Err(CatalogError::conflict(
                "replay_finished",
                format!("replay {replay_id} is already {}", before.status.as_str()),
            ));
        }
        if before.status == ReplayStatus::Pending {
            sqlx::query(
                "UPDATE replays SET status = 'cancelled', cancel_requested = 1, finished_at_ms = $1,
                    updated_at_ms = $1, lease_owner = NULL, lease_until_ms = NULL
                 WHERE replay_id = $2",
            )
            .bind(now_ms)
            .bind(replay_id)
            .execute(&mut *transaction)
            .await?;
        } else {
            sqlx::query(
                "UPDATE replays SET cancel_requested = 1, updated_at_ms = $1 WHERE replay_id = $2",
            )
            .bind(now_ms)
            .bind(replay_id)
            .execute(&mut *transaction)
            .await?;
        }
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            "replay.cancel",
            replay_id,
            Some(json!({"status": before.status.as_str()})),
            Some(json!({"cancel_requested": true})),
        )
        .await?;
        self.get_replay(replay_id)
            .await?
            .ok_or_else(|| CatalogError::NotFound(format!("replay `{replay_id}` does not exist")))
    }
}
