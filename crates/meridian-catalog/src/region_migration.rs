//! Region migrations: a project's data moved to a project of the same org in another region.
//! The record, its state machine and the copy's progress; the copy itself is driven by the
//! server's migration executor (on a node serving both regions, under a lease kept here).
//!
//! `copying`: the source's archive objects are being copied (and inserted into the target's
//! warehouse); `dual_write`: the copy has caught up and keeps following what the source still
//! receives; `done`: the owner cut over, the source key is refused, and the executor still copies
//! what the source's queues deliver after the cutover for a drain window.

use serde::Serialize;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::audit::Actor;
use crate::catalog::Catalog;
use crate::error::CatalogError;
use crate::ids::new_id;
use meridian_core::timestamp::now_unix_ms;

/// `pending` -> `copying` -> `dual_write` -> `done`; `failed` from the two working states;
/// `cancelled` from any state not yet finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationStatus {
    Pending,
    Copying,
    DualWrite,
    Done,
    Failed,
    Cancelled,
}

impl MigrationStatus {
    pub const ALL: [MigrationStatus; 6] = [
        MigrationStatus::Pending,
        MigrationStatus::Copying,
        MigrationStatus::DualWrite,
        MigrationStatus::Done,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationStatus::Pending => "pending",
            MigrationStatus::Copying => "copying",
            MigrationStatus::DualWrite => "dual_write",
            MigrationStatus::Done => "done",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(text: &str) -> Option<MigrationStatus> {
        MigrationStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == text)
    }

    /// A migration is in flight until it is done, failed or cancelled.
    pub fn is_in_flight(self) -> bool {
        matches!(
            self,
            MigrationStatus::Pending | MigrationStatus::Copying | MigrationStatus::DualWrite
        )
    }

    pub fn can_become(self, next: MigrationStatus) -> bool {
        use MigrationStatus::*;
        matches!(
            (self, next),
            (Pending, Copying)
                | (Copying, DualWrite)
                | (DualWrite, Done)
                | (Copying, Failed)
                | (DualWrite, Failed)
                | (Pending, Cancelled)
                | (Copying, Cancelled)
                | (DualWrite, Cancelled)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionMigration {
    pub migration_id: String,
    pub org_id: String,
    pub source_project: String,
    pub target_project: String,
    pub source_region: String,
    pub target_region: String,
    pub status: MigrationStatus,
    pub error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub progress: MigrationProgress,
    /// When the copy last went over every source object.
    pub last_pass_at_ms: Option<i64>,
    /// When the owner cut over (`done`).
    pub cutover_at_ms: Option<i64>,
}

/// What the copy has done so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrationProgress {
    /// Source archive objects copied into the target's region.
    pub objects_copied: i64,
    /// Their messages.
    pub messages_copied: i64,
    /// Of those, messages the target's warehouse already had (not inserted again).
    pub messages_present: i64,
    /// Source objects not copied yet at the end of the last pass (0: caught up).
    pub lag_objects: i64,
}

const MIGRATION_COLUMNS: &str = "migration_id, org_id, source_project, target_project, source_region, \
     target_region, status, error, created_at_ms, updated_at_ms, objects_copied, messages_copied, \
     messages_present, lag_objects, last_pass_at_ms, cutover_at_ms";

fn migration_from_row(row: &AnyRow) -> Result<RegionMigration, CatalogError> {
    let status_text: String = row.try_get("status")?;
    Ok(RegionMigration {
        migration_id: row.try_get("migration_id")?,
        org_id: row.try_get("org_id")?,
        source_project: row.try_get("source_project")?,
        target_project: row.try_get("target_project")?,
        source_region: row.try_get("source_region")?,
        target_region: row.try_get("target_region")?,
        status: MigrationStatus::parse(&status_text)
            .ok_or_else(|| CatalogError::Corrupt(format!("migration status `{status_text}`")))?,
        error: row.try_get("error")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        progress: MigrationProgress {
            objects_copied: row.try_get("objects_copied")?,
            messages_copied: row.try_get("messages_copied")?,
            messages_present: row.try_get("messages_present")?,
            lag_objects: row.try_get("lag_objects")?,
        },
        last_pass_at_ms: row.try_get("last_pass_at_ms")?,
        cutover_at_ms: row.try_get("cutover_at_ms")?,
    })
}

async fn migration_in(
    transaction: &mut Transaction<'_, Any>,
    migration_id: &str,
) -> Result<RegionMigration, CatalogError> {
    let row = sqlx::query(&format!(
        "SELECT {MIGRATION_COLUMNS} FROM region_migrations WHERE migration_id = $1"
    ))
    .bind(migration_id)
    .fetch_optional(&mut **transaction)
    .await?;
    row.as_ref()
        .map(migration_from_row)
        .transpose()?
        .ok_or_else(|| CatalogError::NotFound(format!("migration `{migration_id}` does not exist")))
}

/// The statuses a copy runs in: working, or `done` while its drain window lasts.
const COPY_STATUSES: &str = "('copying', 'dual_write', 'done')";

impl Catalog {
    pub(crate) async fn in_flight_migration(
        transaction: &mut Transaction<'_, Any>,
        org_id: &str,
    ) -> Result<Option<RegionMigration>, CatalogError> {
        let row = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM region_migrations
             WHERE org_id = $1 AND status IN ('pending', 'copying', 'dual_write') LIMIT 1"
        ))
        .bind(org_id)
        .fetch_optional(&mut **transaction)
        .await?;
        row.as_ref().map(migration_from_row).transpose()
    }

    /// Records a migration of `source_project`'s data to `target_project` (another region),
    /// `pending` until started. One migration per org may be in flight.
    pub async fn create_migration(
        &self,
        org_id: &str,
        source_project: &str,
        target_project: &str,
        actor: &Actor,
    ) -> Result<RegionMigration, CatalogError> {
        if source_project == target_project {
            return Err(CatalogError::Invalid(
                "source_project and target_project must differ".into(),
            ));
        }
        let (mut transaction, change) = self.begin_change().await?;
        let source = Self::project_in(&mut transaction, source_project).await?;
        let target = Self::project_in(&mut transaction, target_project).await?;
        for project in [&source, &target] {
            if project.org_id != org_id {
                return Err(CatalogError::NotFound(format!(
                    "project `{}` does not exist",
                    project.project_id
                )));
            }
        }
        if source.region == target.region {
            return Err(CatalogError::Invalid(format!(
                "both projects are in {}; a region migration moves data to a project in another region",
                source.region
            )));
        }
        if let Some(in_flight) = Self::in_flight_migration(&mut transaction, org_id).await? {
            return Err(CatalogError::conflict(
                "migration_in_flight",
                format!(
                    "org `{org_id}` already has a migration in flight ({})",
                    in_flight.migration_id
                ),
            ));
        }
        let now_ms = now_unix_ms();
        let migration = RegionMigration {
            migration_id: new_id("mig"),
            org_id: org_id.to_string(),
            source_project: source.project_id,
            target_project: target.project_id,
            source_region: source.region,
            target_region: target.region,
            status: MigrationStatus::Pending,
            error: None,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            progress: MigrationProgress::default(),
            last_pass_at_ms: None,
            cutover_at_ms: None,
        };
        sqlx::query(
            "INSERT INTO region_migrations (migration_id, org_id, source_project, target_project,
                source_region, target_region, status, error, created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9)",
        )
        .bind(&migration.migration_id)
        .bind(&migration.org_id)
        .bind(&migration.source_project)
        .bind(&migration.target_project)
        .bind(&migration.source_region)
        .bind(&migration.target_region)
        .bind(migration.status.as_str())
        .bind(migration.created_at_ms)
        .bind(migration.updated_at_ms)
        .execute(&mut *transaction)
        .await?;
        self.commit_audited(
            transaction,
            change,
            org_id,
            actor,
            "migration.create",
            &migration.migration_id,
            None,
            serde_json::to_value(&migration).ok(),
        )
        .await?;
        Ok(migration)
    }

    pub async fn get_migration(
        &self,
        migration_id: &str,
    ) -> Result<Option<RegionMigration>, CatalogError> {
        let row = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM region_migrations WHERE migration_id = $1"
        ))
        .bind(migration_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(migration_from_row).transpose()
    }

    /// Moves a migration to `next` if the state machine allows it (else 409 `invalid_transition`).
    pub async fn transition_migration(
        &self,
        migration_id: &str,
        next: MigrationStatus,
        error: Option<&str>,
        actor: &Actor,
    ) -> Result<RegionMigration, CatalogError> {
        let (mut transaction, change) = self.begin_change().await?;
        let before = migration_in(&mut transaction, migration_id).await?;
        // `done` is the cutover, which also makes the source refuse events: complete_migration.
        if !before.status.can_become(next) || next == MigrationStatus::Done {
            return Err(CatalogError::conflict(
                "invalid_transition",
                format!(
                    "migration {migration_id} is {}; it cannot become {}{}",
                    before.status.as_str(),
                    next.as_str(),
                    if next == MigrationStatus::Done {
                        " this way: the cutover is POST /admin/migrations/{id}/complete"
                    } else {
                        ""
                    }
                ),
            ));
        }
        let now_ms = now_unix_ms();
        sqlx::query("UPDATE region_migrations SET status = $1, error = $2, updated_at_ms = $3 WHERE migration_id = $4")
            .bind(next.as_str())
            .bind(error)
            .bind(now_ms)
            .bind(migration_id)
            .execute(&mut *transaction)
            .await?;
        let after = RegionMigration {
            status: next,
            error: error.map(str::to_string),
            updated_at_ms: now_ms,
            ..before.clone()
        };
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            &format!("migration.{}", next.as_str()),
            migration_id,
            Some(json!({"status": before.status.as_str()})),
            Some(json!({"status": next.as_str(), "error": error})),
        )
        .await?;
        Ok(after)
    }

    /// The org's latest `limit` migrations, newest first.
    pub async fn recent_migrations(
        &self,
        org_id: &str,
        limit: usize,
    ) -> Result<Vec<RegionMigration>, CatalogError> {
        let rows = self
            .newest_rows(
                MIGRATION_COLUMNS,
                "region_migrations",
                "org_id",
                org_id,
                limit,
            )
            .await?;
        rows.iter().map(migration_from_row).collect()
    }

    /// The migrations that began copying `project_id`'s data somewhere (whatever became of them
    /// since): a GDPR deletion of the project must reach their targets too.
    pub async fn migrations_started_from(
        &self,
        project_id: &str,
    ) -> Result<Vec<RegionMigration>, CatalogError> {
        let rows = sqlx::query(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM region_migrations
             WHERE source_project = $1 AND status <> 'pending'
               AND (status IN {COPY_STATUSES} OR last_pass_at_ms IS NOT NULL OR objects_copied > 0)
             ORDER BY created_at_ms"
        ))
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(migration_from_row).collect()
    }

    /// Claims, for `node_id` until `lease_until_ms`, every migration whose copy runs now (working,
    /// or done with a cutover after `drain_since_ms`) between two regions of `regions`, whose
    /// lease is free, lapsed or already this node's. Oldest first, at most 20.
    pub async fn claim_migrations(
        &self,
        node_id: &str,
        regions: &[String],
        lease_until_ms: i64,
        drain_since_ms: i64,
    ) -> Result<Vec<RegionMigration>, CatalogError> {
        if regions.is_empty() {
            return Ok(Vec::new());
        }
        let now_ms = now_unix_ms();
        let placeholders = |first: usize| -> String {
            (0..regions.len())
                .map(|index| format!("${}", first + index))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let query_text = format!(
            "SELECT migration_id FROM region_migrations
             WHERE status IN {COPY_STATUSES}
               AND (status <> 'done' OR cutover_at_ms > $1)
               AND (lease_owner IS NULL OR lease_until_ms < $2 OR lease_owner = $3)
               AND source_region IN ({}) AND target_region IN ({})
             ORDER BY created_at_ms LIMIT 20",
            placeholders(4),
            placeholders(4 + regions.len())
        );
        let mut query = sqlx::query(&query_text)
            .bind(drain_since_ms)
            .bind(now_ms)
            .bind(node_id);
        for region in regions.iter().chain(regions) {
            query = query.bind(region);
        }
        let mut claimed = Vec::new();
        for row in query.fetch_all(&self.pool).await? {
            let migration_id: String = row.try_get("migration_id")?;
            let updated = sqlx::query(&format!(
                "UPDATE region_migrations SET lease_owner = $1, lease_until_ms = $2
                 WHERE migration_id = $3 AND status IN {COPY_STATUSES}
                   AND (lease_owner IS NULL OR lease_until_ms < $4 OR lease_owner = $1)"
            ))
            .bind(node_id)
            .bind(lease_until_ms)
            .bind(&migration_id)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
            if updated.rows_affected() == 1
                && let Some(migration) = self.get_migration(&migration_id).await?
            {
                claimed.push(migration);
            }
        }
        Ok(claimed)
    }

    /// Records the copy's progress and renews the lease. Returns the migration as stored (a
    /// cancelled one tells the executor to stop). 409 `lease_lost` when another node holds it.
    pub async fn record_migration_progress(
        &self,
        migration_id: &str,
        node_id: &str,
        progress: &MigrationProgress,
        pass_finished: bool,
        lease_until_ms: i64,
    ) -> Result<RegionMigration, CatalogError> {
        let now_ms = now_unix_ms();
        let updated = sqlx::query(
            "UPDATE region_migrations SET objects_copied = $1, messages_copied = $2,
                messages_present = $3, lag_objects = $4, lease_until_ms = $5, updated_at_ms = $6,
                last_pass_at_ms = CASE WHEN $7 = 1 THEN $6 ELSE last_pass_at_ms END, error = NULL
             WHERE migration_id = $8 AND lease_owner = $9",
        )
        .bind(progress.objects_copied)
        .bind(progress.messages_copied)
        .bind(progress.messages_present)
        .bind(progress.lag_objects)
        .bind(lease_until_ms)
        .bind(now_ms)
        .bind(i64::from(pass_finished))
        .bind(migration_id)
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(CatalogError::conflict(
                "lease_lost",
                format!("migration {migration_id} is no longer copied by this node"),
            ));
        }
        self.get_migration(migration_id).await?.ok_or_else(|| {
            CatalogError::NotFound(format!("migration `{migration_id}` does not exist"))
        })
    }

    /// Records a failed copy attempt (retried later) without giving up the lease.
    pub async fn record_migration_error(
        &self,
        migration_id: &str,
        message: &str,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "UPDATE region_migrations SET error = $1, updated_at_ms = $2 WHERE migration_id = $3",
        )
        .bind(message)
        .bind(now_unix_ms())
        .bind(migration_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The owner's cutover: a `dual_write` migration becomes `done`, and from now on the source
    /// project refuses new events (its key cache entry names the target). Audited.
    pub async fn complete_migration(
        &self,
        migration_id: &str,
        actor: &Actor,
    ) -> Result<RegionMigration, CatalogError> {
        let (mut transaction, change) = self.begin_change().await?;
        let before = migration_in(&mut transaction, migration_id).await?;
        if before.status != MigrationStatus::DualWrite {
            let why = match before.status {
                MigrationStatus::Pending => "it has not been started".to_string(),
                MigrationStatus::Copying => {
                    "its copy has not caught up yet (it becomes dual_write when it has)".to_string()
                }
                status => format!("it is {}", status.as_str()),
            };
            return Err(CatalogError::conflict(
                "invalid_transition",
                format!("migration {migration_id} cannot be completed: {why}"),
            ));
        }
        let now_ms = now_unix_ms();
        sqlx::query(
            "UPDATE region_migrations SET status = 'done', cutover_at_ms = $1, updated_at_ms = $1
             WHERE migration_id = $2",
        )
        .bind(now_ms)
        .bind(migration_id)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("UPDATE projects SET migrated_to = $1 WHERE project_id = $2")
            .bind(&before.target_project)
            .bind(&before.source_project)
            .execute(&mut *transaction)
            .await?;
        crate::snapshot_source::touch_project(
            &mut transaction,
            change.version,
            &before.source_project,
        )
        .await?;
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            "migration.done",
            migration_id,
            Some(json!({"status": before.status.as_str()})),
            Some(json!({"status": "done", "cutover_at_ms": now_ms,
                        "source_project_refuses_events": before.source_project,
                        "target_project": before.target_project})),
        )
        .await?;
        self.get_migration(migration_id).await?.ok_or_else(|| {
            CatalogError::NotFound(format!("migration `{migration_id}` does not exist"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_only_forward_moves() {
        use MigrationStatus::*;
        assert!(Pending.can_become(Copying));
        assert!(Copying.can_become(DualWrite));
        assert!(DualWrite.can_become(Done));
        assert!(!Pending.can_become(Done), "no skipping the copy");
        assert!(
            !Done.can_become(Cancelled),
            "finished migrations stay finished"
        );
        assert!(!Failed.can_become(Copying));
        assert!(!Cancelled.can_become(Pending));
        for status in MigrationStatus::ALL {
            assert_eq!(MigrationStatus::parse(status.as_str()), Some(status));
            assert!(!status.can_become(status), "{status:?} -> itself");
            assert_eq!(
                status.is_in_flight(),
                matches!(status, Pending | Copying | DualWrite)
            );
        }
    }
}
