//! What the key cache reads: every row it needs (a full load), or only the rows of the projects
//! changed since a version (an incremental load).
//!
//! A key cache reads two kinds of rows, from different stores: the control rows (keys, project
//! regions and storage) from the global catalog, and the rows about a region's end users
//! (suppressions, deletions) from that region's store ([`RowsOf`]). Each store counts its own
//! versions.
//!
//! Every change that touches what the cache holds for a project (its keys, region, storage,
//! suppressions, deletions) records the project in `project_changes` with the catalog version it
//! made, in the same transaction ([`touch_project`]). A cache at version `v` then reloads only the
//! projects changed after `v`, so an admin change costs every node a few rows, not a reload of
//! every region's projects and suppressions.

use meridian_core::timestamp::now_unix_ms;
use sqlx::{Any, Row, Transaction};

use crate::catalog::{Catalog, SnapshotRows, storage_from_json};
use crate::error::CatalogError;

/// Projects per `IN (...)` list.
const PROJECTS_PER_QUERY: usize = 500;

/// Records that `project_id` changed in the change making catalog version `version`.
pub(crate) async fn touch_project(
    transaction: &mut Transaction<'_, Any>,
    version: i64,
    project_id: &str,
) -> Result<(), CatalogError> {
    sqlx::query(
        "INSERT INTO project_changes (project_id, version) VALUES ($1, $2)
         ON CONFLICT (project_id) DO UPDATE SET version = excluded.version",
    )
    .bind(project_id)
    .bind(version)
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Which rows a load reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowsOf {
    /// Write keys and projects (the global catalog).
    Control,
    /// Suppressions and deletions (a regional store).
    EndUsers,
}

/// Makes a new catalog version for a change that has no audit entry (rows moved between stores),
/// and returns it.
pub(crate) async fn bump_version(
    transaction: &mut Transaction<'_, Any>,
) -> Result<i64, CatalogError> {
    sqlx::query("UPDATE catalog_state SET version = version + 1 WHERE id = 1")
        .execute(&mut **transaction)
        .await?;
    current_version(transaction).await
}

/// The rows of the projects changed since a version.
pub(crate) struct ChangedRows {
    /// The projects changed after the asked version (their rows are in `rows`).
    pub project_ids: Vec<String>,
    pub rows: SnapshotRows,
}

impl Catalog {
    /// Every row the key cache holds, at one version.
    pub(crate) async fn load_snapshot_rows(
        &self,
        rows_of: RowsOf,
    ) -> Result<SnapshotRows, CatalogError> {
        let mut transaction = self.pool.begin().await?;
        let mut rows = SnapshotRows {
            version: current_version(&mut transaction).await?,
            ..SnapshotRows::default()
        };
        load_rows(&mut transaction, &self.key, None, rows_of, &mut rows).await?;
        load_unscoped_rows(&mut transaction, rows_of, &mut rows).await?;
        transaction.commit().await?;
        Ok(rows)
    }

    /// The rows of the projects changed after `since_version`, at one version. `None` when more
    /// than `max_projects` changed (a full load is then cheaper).
    pub(crate) async fn load_changed_since(
        &self,
        since_version: i64,
        max_projects: usize,
        rows_of: RowsOf,
    ) -> Result<Option<ChangedRows>, CatalogError> {
        let mut transaction = self.pool.begin().await?;
        let version = current_version(&mut transaction).await?;
        let changed = sqlx::query(
            "SELECT project_id FROM project_changes WHERE version > $1 ORDER BY project_id LIMIT $2",
        )
        .bind(since_version)
        .bind(max_projects as i64 + 1)
        .fetch_all(&mut *transaction)
        .await?;
        if changed.len() > max_projects {
            return Ok(None);
        }
        let project_ids = changed
            .iter()
            .map(|row| row.try_get::<String, _>("project_id"))
            .collect::<Result<Vec<_>, _>>()?;
        let mut rows = SnapshotRows {
            version,
            ..SnapshotRows::default()
        };
        for chunk in project_ids.chunks(PROJECTS_PER_QUERY) {
            load_rows(&mut transaction, &self.key, Some(chunk), rows_of, &mut rows).await?;
        }
        load_unscoped_rows(&mut transaction, rows_of, &mut rows).await?;
        transaction.commit().await?;
        Ok(Some(ChangedRows { project_ids, rows }))
    }
}

async fn current_version(transaction: &mut Transaction<'_, Any>) -> Result<i64, CatalogError> {
    Ok(
        sqlx::query("SELECT version FROM catalog_state WHERE id = 1")
            .fetch_one(&mut **transaction)
            .await?
            .try_get("version")?,
    )
}

/// `column IN ($first, ...)` for `count` parameters numbered from `first`.
fn in_list(column: &str, first: usize, count: usize) -> String {
    let placeholders: Vec<String> = (first..first + count).map(|n| format!("${n}")).collect();
    format!("{column} IN ({})", placeholders.join(", "))
}

/// Binds every project id of the filter, in order.
fn bind_projects<'q>(
    mut query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    projects: Option<&'q [String]>,
) -> sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>> {
    for project_id in projects.unwrap_or_default() {
        query = query.bind(project_id.as_str());
    }
    query
}

/// Appends the `rows_of` rows of `projects` (every project when `None`) to `rows`.
async fn load_rows(
    transaction: &mut Transaction<'_, Any>,
    key: &crate::keyed_hash::CatalogKey,
    projects: Option<&[String]>,
    rows_of: RowsOf,
    rows: &mut SnapshotRows,
) -> Result<(), CatalogError> {
    match rows_of {
        RowsOf::Control => load_control_rows(transaction, projects, rows).await,
        RowsOf::EndUsers => load_end_user_rows(transaction, key, projects, rows).await,
    }
}

/// The rows that belong to no project, read whole by every load: revoked admin tokens (few, and
/// every node checks every admin request against all of them).
async fn load_unscoped_rows(
    transaction: &mut Transaction<'_, Any>,
    rows_of: RowsOf,
    rows: &mut SnapshotRows,
) -> Result<(), CatalogError> {
    if rows_of == RowsOf::Control {
        rows.revocations = crate::token_revocation::load_revocations(transaction).await?;
    }
    Ok(())
}

/// ` AND column IN (...)` for the project filter (nothing without one).
fn project_filter(projects: Option<&[String]>, column: &str, first: usize) -> String {
    match projects {
        Some(projects) => format!(" AND {}", in_list(column, first, projects.len())),
        None => String::new(),
    }
}

async fn load_control_rows(
    transaction: &mut Transaction<'_, Any>,
    projects: Option<&[String]>,
    rows: &mut SnapshotRows,
) -> Result<(), CatalogError> {
    let filter = |column: &str, first: usize| project_filter(projects, column, first);

    let key_sql = format!(
        "SELECT key_hash, project_id, expires_at_ms FROM write_keys
         WHERE (expires_at_ms IS NULL OR expires_at_ms > $1){}",
        filter("project_id", 2)
    );
    let key_rows = bind_projects(sqlx::query(&key_sql).bind(now_unix_ms()), projects)
        .fetch_all(&mut **transaction)
        .await?;
    for row in &key_rows {
        let hash_text: String = row.try_get("key_hash")?;
        let hash = crate::ids::unhex(&hash_text)
            .ok_or_else(|| CatalogError::Corrupt(format!("key hash `{hash_text}`")))?;
        rows.keys.push((
            hash,
            row.try_get("project_id")?,
            row.try_get("expires_at_ms")?,
        ));
    }

    let project_sql = format!(
        "SELECT project_id, region, storage_json, migrated_to FROM projects WHERE 1 = 1{}",
        filter("project_id", 1)
    );
    let project_rows = bind_projects(sqlx::query(&project_sql), projects)
        .fetch_all(&mut **transaction)
        .await?;
    for row in &project_rows {
        rows.projects.push((
            row.try_get("project_id")?,
            row.try_get("region")?,
            storage_from_json(row.try_get("storage_json")?)?,
            row.try_get("migrated_to")?,
        ));
    }

    Ok(())
}

async fn load_end_user_rows(
    transaction: &mut Transaction<'_, Any>,
    key: &crate::keyed_hash::CatalogKey,
    projects: Option<&[String]>,
    rows: &mut SnapshotRows,
) -> Result<(), CatalogError> {
    let filter = |column: &str, first: usize| project_filter(projects, column, first);
    let suppression_sql = format!(
        "SELECT project_id, user_id FROM suppressions WHERE 1 = 1{}",
        filter("project_id", 1)
    );
    let suppression_rows = bind_projects(sqlx::query(&suppression_sql), projects)
        .fetch_all(&mut **transaction)
        .await?;
    for row in &suppression_rows {
        rows.suppressions
            .push((row.try_get("project_id")?, row.try_get("user_id")?));
    }

    let deletion_sql = format!(
        "SELECT deletion_id, project_id, user_ids_json, created_at_ms FROM deletions WHERE 1 = 1{}",
        filter("project_id", 1)
    );
    let deletion_rows = bind_projects(sqlx::query(&deletion_sql), projects)
        .fetch_all(&mut **transaction)
        .await?;
    for row in &deletion_rows {
        let deletion_id: String = row.try_get("deletion_id")?;
        let user_ids_json: String = row.try_get("user_ids_json")?;
        let user_ids = crate::deletion::stored_user_ids(key, &deletion_id, &user_ids_json)?;
        rows.deletions.push((
            row.try_get("project_id")?,
            user_ids,
            row.try_get("created_at_ms")?,
        ));
    }
    Ok(())
}
