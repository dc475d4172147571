//! The catalog store: connecting and migrating, the state row every change takes
//! ([`Catalog::begin_change`], [`Catalog::commit_audited`]), and maintenance. Each aggregate has its
//! own module: orgs (`org.rs`), projects and keys (`project.rs`), the audit log (`audit.rs`),
//! suppressions, deletions, replays, retention, region migrations.

use std::path::Path;
use std::time::Duration;

use meridian_core::CustomerStorage;
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::audit::{Actor, AuditEntry};
use crate::error::CatalogError;
use crate::keyed_hash::CatalogKey;
use crate::schema;

pub use crate::org::Org;
pub(crate) use crate::project::storage_from_json;
pub use crate::project::{KeyInfo, NewProject, Project, RotatedKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogBackend {
    Sqlite,
    Postgres,
}

/// One page of a list, with the cursor of the next page when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> Page<T> {
    /// A page from up to `limit + 1` items read in order (lists ask for one more than they show):
    /// with the extra one there is a next page, whose cursor is the last shown item's.
    pub(crate) fn of_items_past_limit(
        mut items: Vec<T>,
        limit: usize,
        cursor_of: impl Fn(&T) -> String,
    ) -> Page<T> {
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(cursor_of)
        } else {
            None
        };
        Page { items, next_cursor }
    }
}

/// The rows the key cache is built from.
#[derive(Default)]
pub(crate) struct SnapshotRows {
    pub version: i64,
    /// `(key hash, project id, expires at)`.
    pub keys: Vec<([u8; 32], String, Option<i64>)>,
    /// `(project id, region, storage, the project it was migrated to)`.
    pub projects: Vec<(String, String, Option<CustomerStorage>, Option<String>)>,
    /// `(project id, user id)`.
    pub suppressions: Vec<(String, String)>,
    /// `(project id, user ids, created at)` of every deletion.
    pub deletions: Vec<(String, Vec<String>, i64)>,
    /// Every revoked admin token (control rows only; always every one of them).
    pub revocations: Vec<crate::token_revocation::TokenRevocation>,
}

/// The state row every change locks first: it serializes changes (so the audit chain has no
/// forks) and tells the key caches of every node that something changed.
pub(crate) struct Change {
    pub(crate) audit_seq: i64,
    pub(crate) previous_hash: String,
    /// The catalog version this change makes.
    pub(crate) version: i64,
}

#[derive(Clone)]
pub struct Catalog {
    pub(crate) pool: AnyPool,
    backend: CatalogBackend,
    /// Keys the audit chain and user-id hashes; never stored in the database.
    pub(crate) key: CatalogKey,
}

const MAX_NAME_CHARS: usize = 200;

pub(crate) fn validate_name(name: &str, what: &str) -> Result<String, CatalogError> {
    let trimmed = name.trim();
    if trimmed.is_empty()
        || trimmed.chars().count() > MAX_NAME_CHARS
        || trimmed.chars().any(char::is_control)
    {
        return Err(CatalogError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME_CHARS} characters, without control characters"
        )));
    }
    Ok(trimmed.to_string())
}

impl Catalog {
    /// The newest `limit` (1 to 1,000) rows of a job table (deletions, replays, migrations) whose
    /// `key_column` is `key`, newest first.
    pub(crate) async fn newest_rows(
        &self,
        columns: &str,
        table: &'static str,
        key_column: &'static str,
        key: &str,
        limit: usize,
    ) -> Result<Vec<AnyRow>, CatalogError> {
        Ok(sqlx::query(&format!(
            "SELECT {columns} FROM {table} WHERE {key_column} = $1
             ORDER BY created_at_ms DESC LIMIT $2"
        ))
        .bind(key)
        .bind(limit.clamp(1, 1000) as i64)
        .fetch_all(&self.pool)
        .await?)
    }
}

impl Catalog {
    /// Connects to `sqlite://PATH` (created if missing) or `postgres://...`, and migrates. `key`
    /// keys the audit chain and the user-id hashes (see [`crate::keyed_hash`]).
    pub async fn connect(url: &str, key: CatalogKey) -> Result<Catalog, CatalogError> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            CatalogBackend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            CatalogBackend::Postgres
        } else {
            return Err(CatalogError::Invalid(format!(
                "catalog url must start with sqlite:// or postgres://, got `{url}`"
            )));
        };
        if backend == CatalogBackend::Sqlite {
            let path_part = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = Path::new(path_part.split('?').next().unwrap_or(path_part));
            if let Some(parent) = path.parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|error| {
                    CatalogError::Invalid(format!(
                        "cannot create the catalog directory {}: {error}",
                        parent.display()
                    ))
                })?;
            }
        }
        let max_connections = match backend {
            CatalogBackend::Sqlite => 4,
            CatalogBackend::Postgres => 8,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == CatalogBackend::Sqlite {
                        for pragma in [
                            "PRAGMA journal_mode = WAL",
                            "PRAGMA synchronous = FULL",
                            // Freed content is overwritten, so a user id a finished deletion
                            // replaced by its hash does not linger in free pages.
                            "PRAGMA secure_delete = ON",
                            "PRAGMA busy_timeout = 5000",
                        ] {
                            sqlx::query(pragma).execute(&mut *connection).await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        schema::migrate(&pool, backend == CatalogBackend::Postgres, &key).await?;
        Ok(Catalog { pool, backend, key })
    }

    pub fn backend(&self) -> CatalogBackend {
        self.backend
    }

    pub async fn applied_migrations(&self) -> Result<Vec<i64>, CatalogError> {
        schema::applied_versions(&self.pool).await
    }

    /// A cheap query that proves the catalog answers.
    pub async fn ping(&self) -> Result<(), CatalogError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Grows by one with every change; key caches reload when it moves.
    pub async fn version(&self) -> Result<i64, CatalogError> {
        let row = sqlx::query("SELECT version FROM catalog_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("version")?)
    }

    /// Opens a change: a transaction holding the state row (see [`Change`]). Its writes go through
    /// the transaction, and [`Catalog::commit_audited`] records its audit entry and commits, so a
    /// change and its audit entry land together or not at all.
    pub(crate) async fn begin_change(
        &self,
    ) -> Result<(Transaction<'static, Any>, Change), CatalogError> {
        let mut transaction = self.pool.begin().await?;
        let change = Self::lock_change(&mut transaction).await?;
        Ok((transaction, change))
    }

    /// Records the change's audit entry in its transaction and commits both.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn commit_audited(
        &self,
        mut transaction: Transaction<'static, Any>,
        change: Change,
        org_id: &str,
        actor: &Actor,
        action: &str,
        target: &str,
        before: Option<Value>,
        after: Option<Value>,
    ) -> Result<AuditEntry, CatalogError> {
        let entry = self
            .record_audit(
                &mut transaction,
                change,
                org_id,
                actor,
                action,
                target,
                before,
                after,
            )
            .await?;
        transaction.commit().await?;
        Ok(entry)
    }

    /// Takes the state row in a transaction already open (for a change that is audited only
    /// sometimes, or after other writes).
    pub(crate) async fn lock_change(
        transaction: &mut Transaction<'_, Any>,
    ) -> Result<Change, CatalogError> {
        sqlx::query(
            "UPDATE catalog_state SET version = version + 1, audit_seq = audit_seq + 1 WHERE id = 1",
        )
        .execute(&mut **transaction)
        .await?;
        let row = sqlx::query(
            "SELECT audit_seq, audit_head_hash, version FROM catalog_state WHERE id = 1",
        )
        .fetch_one(&mut **transaction)
        .await?;
        Ok(Change {
            audit_seq: row.try_get("audit_seq")?,
            previous_hash: row.try_get("audit_head_hash")?,
            version: row.try_get("version")?,
        })
    }

    /// Writes a consistent copy of a SQLite catalog to `path` while it is in use (`VACUUM INTO`).
    /// PostgreSQL catalogs are backed up with `pg_dump` instead.
    pub async fn backup_sqlite(&self, path: &Path) -> Result<(), CatalogError> {
        if self.backend != CatalogBackend::Sqlite {
            return Err(CatalogError::Invalid(
                "this catalog is PostgreSQL: back it up with pg_dump".into(),
            ));
        }
        if path.exists() {
            return Err(CatalogError::Invalid(format!(
                "{} exists; choose a new file",
                path.display()
            )));
        }
        let text = path.to_str().ok_or_else(|| {
            CatalogError::Invalid(format!("{} is not a UTF-8 path", path.display()))
        })?;
        sqlx::query("VACUUM INTO $1")
            .bind(text)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Runs raw SQL against the catalog. For tests (tampering with the audit log) and operators.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, CatalogError> {
        Ok(sqlx::query(sql).execute(&self.pool).await?.rows_affected())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
