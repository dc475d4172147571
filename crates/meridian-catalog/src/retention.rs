//! Retention: how long a project's data is kept in its region's warehouse and archive, and the
//! schedule of each region's janitor (one node of the region runs it at a time).
//!
//! A project's setting for each store is one of: the region's default (nothing set), keep for
//! good, or a number of days. Stored as `NULL` (region default), `0` (keep) or the days.

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Actor;
use crate::catalog::Catalog;
use crate::error::CatalogError;
use meridian_core::timestamp::now_unix_ms;

/// Longest retention a project may ask for (100 years): beyond, "keep" says it better.
pub const MAX_RETENTION_DAYS: u32 = 36_500;

/// One store's retention as a project set it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetentionSetting {
    /// Nothing set: the region's default applies.
    #[default]
    RegionDefault,
    /// Kept for good, whatever the region's default.
    Keep,
    /// Received days older than this many days are deleted.
    Days(u32),
}

impl RetentionSetting {
    fn from_stored(stored: Option<i64>) -> RetentionSetting {
        match stored {
            None => RetentionSetting::RegionDefault,
            Some(days) if days <= 0 => RetentionSetting::Keep,
            Some(days) => RetentionSetting::Days(days.min(i64::from(MAX_RETENTION_DAYS)) as u32),
        }
    }

    fn to_stored(self) -> Option<i64> {
        match self {
            RetentionSetting::RegionDefault => None,
            RetentionSetting::Keep => Some(0),
            RetentionSetting::Days(days) => Some(i64::from(days)),
        }
    }

    /// The days this setting keeps, given the region's default (`None`: kept for good).
    pub fn effective_days(self, region_default: Option<u32>) -> Option<u32> {
        match self {
            RetentionSetting::RegionDefault => region_default,
            RetentionSetting::Keep => None,
            RetentionSetting::Days(days) => Some(days),
        }
    }

    /// As the admin API shows it: `"region_default"`, `"keep"` or the days.
    pub fn to_json(self) -> Value {
        match self {
            RetentionSetting::RegionDefault => json!("region_default"),
            RetentionSetting::Keep => json!("keep"),
            RetentionSetting::Days(days) => json!(days),
        }
    }
}

/// A project's retention settings, one per store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProjectRetention {
    pub warehouse: RetentionSetting,
    pub archive: RetentionSetting,
}

impl ProjectRetention {
    fn to_json(self) -> Value {
        json!({"warehouse_days": self.warehouse.to_json(), "archive_days": self.archive.to_json()})
    }
}

/// A project the janitor of its region looks at, with its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionSubject {
    pub project_id: String,
    pub org_id: String,
    pub retention: ProjectRetention,
}

const RETENTION_OF_PROJECT: &str =
    "SELECT warehouse_days, archive_days FROM project_retention WHERE project_id = $1";

fn retention_from_row(row: Option<&AnyRow>) -> Result<ProjectRetention, CatalogError> {
    let Some(row) = row else {
        return Ok(ProjectRetention::default());
    };
    Ok(ProjectRetention {
        warehouse: RetentionSetting::from_stored(row.try_get("warehouse_days")?),
        archive: RetentionSetting::from_stored(row.try_get("archive_days")?),
    })
}

impl Catalog {
    /// The project's retention settings (the region's default for a store it set nothing for).
    pub async fn retention_of(&self, project_id: &str) -> Result<ProjectRetention, CatalogError> {
        let row = sqlx::query(RETENTION_OF_PROJECT)
            .bind(project_id)
            .fetch_optional(&self.pool)
            .await?;
        retention_from_row(row.as_ref())
    }

    /// Replaces the project's retention settings, audited (`project.retention`), and makes its
    /// region's janitor due at once so the change takes effect without waiting for the next run.
    pub async fn set_retention(
        &self,
        project_id: &str,
        retention: ProjectRetention,
        actor: &Actor,
    ) -> Result<ProjectRetention, CatalogError> {
        for setting in [retention.warehouse, retention.archive] {
            if let RetentionSetting::Days(days) = setting
                && !(1..=MAX_RETENTION_DAYS).contains(&days)
            {
                return Err(CatalogError::Invalid(format!(
                    "a retention is 1 to {MAX_RETENTION_DAYS} days (or \"keep\"), not {days}"
                )));
            }
        }
        let (mut transaction, change) = self.begin_change().await?;
        let project = Self::project_in(&mut transaction, project_id).await?;
        let stored = sqlx::query(RETENTION_OF_PROJECT)
            .bind(project_id)
            .fetch_optional(&mut *transaction)
            .await?;
        let before = retention_from_row(stored.as_ref())?;
        sqlx::query("DELETE FROM project_retention WHERE project_id = $1")
            .bind(project_id)
            .execute(&mut *transaction)
            .await?;
        if retention != ProjectRetention::default() {
            sqlx::query(
                "INSERT INTO project_retention (project_id, warehouse_days, archive_days, updated_at_ms)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(project_id)
            .bind(retention.warehouse.to_stored())
            .bind(retention.archive.to_stored())
            .bind(now_unix_ms())
            .execute(&mut *transaction)
            .await?;
        }
        sqlx::query("UPDATE retention_runs SET next_run_at_ms = 0 WHERE region = $1")
            .bind(&project.region)
            .execute(&mut *transaction)
            .await?;
        self.commit_audited(
            transaction,
            change,
            &project.org_id,
            actor,
            "project.retention",
            project_id,
            Some(before.to_json()),
            Some(retention.to_json()),
        )
        .await?;
        Ok(retention)
    }

    /// Every project of `region`, with its retention settings, ordered by id.
    pub async fn retention_subjects(
        &self,
        region: &str,
    ) -> Result<Vec<RetentionSubject>, CatalogError> {
        let rows = sqlx::query(
            "SELECT projects.project_id AS project_id, projects.org_id AS org_id,
                project_retention.warehouse_days AS warehouse_days,
                project_retention.archive_days AS archive_days
             FROM projects LEFT JOIN project_retention
               ON project_retention.project_id = projects.project_id
             WHERE projects.region = $1 ORDER BY projects.project_id",
        )
        .bind(region)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RetentionSubject {
                    project_id: row.try_get("project_id")?,
                    org_id: row.try_get("org_id")?,
                    retention: retention_from_row(Some(row))?,
                })
            })
            .collect()
    }

    /// Claims the region's next janitor run for `node_id` when it is due (`now_ms` past its time),
    /// and schedules the one after at `next_run_at_ms`. One node of a region wins a due run.
    pub async fn claim_retention_run(
        &self,
        region: &str,
        node_id: &str,
        now_ms: i64,
        next_run_at_ms: i64,
    ) -> Result<bool, CatalogError> {
        debug_assert!(next_run_at_ms > now_ms);
        let claim = || {
            sqlx::query(
                "UPDATE retention_runs SET next_run_at_ms = $1, last_owner = $2
                 WHERE region = $3 AND next_run_at_ms <= $4",
            )
            .bind(next_run_at_ms)
            .bind(node_id)
            .bind(region)
            .bind(now_ms)
            .execute(&self.pool)
        };
        if claim().await?.rows_affected() == 1 {
            return Ok(true);
        }
        // The region's first run: its schedule row, due at once (another node may add it first).
        let added = sqlx::query(
            "INSERT INTO retention_runs (region, next_run_at_ms, last_owner) VALUES ($1, 0, NULL)
             ON CONFLICT (region) DO NOTHING",
        )
        .bind(region)
        .execute(&self.pool)
        .await?;
        if added.rows_affected() == 0 {
            return Ok(false);
        }
        Ok(claim().await?.rows_affected() == 1)
    }

    /// Audits what a janitor run deleted of a project (`retention.expired`).
    pub async fn record_retention_deletion(
        &self,
        org_id: &str,
        project_id: &str,
        deleted: Value,
        actor: &Actor,
    ) -> Result<(), CatalogError> {
        let (transaction, change) = self.begin_change().await?;
        self.commit_audited(
            transaction,
            change,
            org_id,
            actor,
            "retention.expired",
            project_id,
            None,
            Some(deleted),
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_settings_round_trip() {
        for setting in [
            RetentionSetting::RegionDefault,
            RetentionSetting::Keep,
            RetentionSetting::Days(1),
            RetentionSetting::Days(400),
        ] {
            assert_eq!(RetentionSetting::from_stored(setting.to_stored()), setting);
        }
    }

    #[test]
    fn the_region_default_applies_only_where_the_project_set_nothing() {
        assert_eq!(
            RetentionSetting::RegionDefault.effective_days(Some(30)),
            Some(30)
        );
        assert_eq!(RetentionSetting::RegionDefault.effective_days(None), None);
        assert_eq!(RetentionSetting::Keep.effective_days(Some(30)), None);
        assert_eq!(RetentionSetting::Days(7).effective_days(Some(30)), Some(7));
    }
}
