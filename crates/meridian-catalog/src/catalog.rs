//! The catalog store.

use std::path::Path;
use std::time::Duration;

use meridian_core::timestamp::now_unix_ms;
use meridian_core::{CustomerStorage, RegionId};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};

use crate::audit::{Actor, AuditChainReport, AuditEntry, verify_chain};
use crate::error::CatalogError;
use crate::ids::{generate_write_key, hash_write_key, hex, new_id, write_key_prefix};
use crate::keyed_hash::CatalogKey;
use crate::schema;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatalogBackend {
    Sqlite,
    Postgres,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Org {
    pub org_id: String,
    pub name: String,
    pub primary_region: String,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Project {
    pub project_id: String,
    pub org_id: String,
    pub name: String,
    pub region: String,
    pub created_at_ms: i64,
    pub storage: Option<CustomerStorage>,
}

#[derive(Clone, Debug)]
pub struct NewProject {
    pub name: String,
    pub region: RegionId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    pub prefix: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotatedKey {
    pub write_key: String,
    pub previous_key_expires_at_ms: i64,
}

/// One page of a list, with the cursor of the next page when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
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
}

/// The state row every change locks first: it serializes changes (so the audit chain has no
/// forks) and tells the key caches of every node that something changed.
pub(crate) struct Change {
    audit_seq: i64,
    previous_hash: String,
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

fn validate_name(name: &str, what: &str) -> Result<String, CatalogError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > MAX_NAME_CHARS {
        return Err(CatalogError::Invalid(format!(
            "{what} must be 1 to {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(trimmed.to_string())
}

fn validate_org_id(org_id: &str) -> Result<(), CatalogError> {
    let is_valid = (2..=64).contains(&org_id.len())
        && org_id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !is_valid {
        return Err(CatalogError::Invalid(format!(
            "org_id `{org_id}` must be 2 to 64 lowercase letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

pub(crate) fn storage_from_json(
    text: Option<String>,
) -> Result<Option<CustomerStorage>, CatalogError> {
    match text {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|error| CatalogError::Corrupt(format!("stored storage settings: {error}"))),
    }
}

fn project_from_row(row: &AnyRow) -> Result<Project, CatalogError> {
    Ok(Project {
        project_id: row.try_get("project_id")?,
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        region: row.try_get("region")?,
        created_at_ms: row.try_get("created_at_ms")?,
        storage: storage_from_json(row.try_get("storage_json")?)?,
    })
}

fn org_from_row(row: &AnyRow) -> Result<Org, CatalogError> {
    Ok(Org {
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        primary_region: row.try_get("primary_region")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
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

    // ---- orgs ----

    pub async fn create_org(
        &self,
        org_id: &str,
        name: &str,
        primary_region: &RegionId,
        actor: &Actor,
    ) -> Result<Org, CatalogError> {
        validate_org_id(org_id)?;
        let name = validate_name(name, "org name")?;
        let org = Org {
            org_id: org_id.to_string(),
            name,
            primary_region: primary_region.to_string(),
            created_at_ms: now_unix_ms(),
        };
        let (mut transaction, change) = self.begin_change().await?;
        let inserted = sqlx::query(
            "INSERT INTO orgs (org_id, name, primary_region, created_at_ms) VALUES ($1, $2, $3, $4)
             ON CONFLICT (org_id) DO NOTHING",
        )
        .bind(&org.org_id)
        .bind(&org.name)
        .bind(&org.primary_region)
        .bind(org.created_at_ms)
        .execute(&mut *transaction)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(CatalogError::conflict(
                "org_exists",
                format!("org `{org_id}` already exists"),
            ));
        }
        let after = serde_json::to_value(&org).ok();
        self.commit_audited(
            transaction,
            change,
            org_id,
            actor,
            "org.create",
            org_id,
            None,
            after,
        )
        .await?;
        Ok(org)
    }

    pub async fn get_org(&self, org_id: &str) -> Result<Option<Org>, CatalogError> {
        let row = sqlx::query(
            "SELECT org_id, name, primary_region, created_at_ms FROM orgs WHERE org_id = $1",
        )
        .bind(org_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(org_from_row).transpose()
    }

    pub async fn set_primary_region(
        &self,
        org_id: &str,
        region: &RegionId,
        actor: &Actor,
    ) -> Result<Org, CatalogError> {
        let (mut transaction, change) = self.begin_change().await?;
        let row = sqlx::query(
            "SELECT org_id, name, primary_region, created_at_ms FROM orgs WHERE org_id = $1",
        )
        .bind(org_id)
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(before) = row.as_ref().map(org_from_row).transpose()? else {
            return Err(CatalogError::NotFound(format!(
                "org `{org_id}` does not exist"
            )));
        };
        if let Some(in_flight) = Self::in_flight_migration(&mut transaction, org_id).await? {
            return Err(CatalogError::conflict(
                "migration_in_flight",
                format!(
                    "org `{org_id}` has a region migration in flight ({}, {}); wait until it is done, failed or cancelled",
                    in_flight.migration_id,
                    in_flight.status.as_str()
                ),
            ));
        }
        sqlx::query("UPDATE orgs SET primary_region = $1 WHERE org_id = $2")
            .bind(region.as_str())
            .bind(org_id)
            .execute(&mut *transaction)
            .await?;
        let after = Org {
            primary_region: region.to_string(),
            ..before.clone()
        };
        self.commit_audited(
            transaction,
            change,
            org_id,
            actor,
            "org.assign_region",
            org_id,
            Some(json!({"primary_region": before.primary_region})),
            Some(json!({"primary_region": after.primary_region})),
        )
        .await?;
        Ok(after)
    }

    // ---- projects and keys ----

    /// Creates a project pinned to `region` forever, with its first write key (returned once).
    pub async fn create_project(
        &self,
        org_id: &str,
        new_project: NewProject,
        actor: &Actor,
    ) -> Result<(Project, String), CatalogError> {
        let name = validate_name(&new_project.name, "project name")?;
        let project = Project {
            project_id: new_id("prj"),
            org_id: org_id.to_string(),
            name,
            region: new_project.region.to_string(),
            created_at_ms: now_unix_ms(),
            storage: None,
        };
        let write_key = generate_write_key();
        let (mut transaction, change) = self.begin_change().await?;
        let org_exists = sqlx::query("SELECT org_id FROM orgs WHERE org_id = $1")
            .bind(org_id)
            .fetch_optional(&mut *transaction)
            .await?;
        if org_exists.is_none() {
            return Err(CatalogError::NotFound(format!(
                "org `{org_id}` does not exist"
            )));
        }
        sqlx::query(
            "INSERT INTO projects (project_id, org_id, name, region, created_at_ms, storage_json)
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&project.project_id)
        .bind(&project.org_id)
        .bind(&project.name)
        .bind(&project.region)
        .bind(project.created_at_ms)
        .execute(&mut *transaction)
        .await?;
        Self::insert_key(
            &mut transaction,
            &project.project_id,
            &write_key,
            project.created_at_ms,
        )
        .await?;
        let after = json!({
            "project_id": project.project_id,
            "name": project.name,
            "region": project.region,
            "key_prefix": write_key_prefix(&write_key),
        });
        crate::snapshot_source::touch_project(
            &mut transaction,
            change.version,
            &project.project_id,
        )
        .await?;
        self.commit_audited(
            transaction,
            change,
            org_id,
            actor,
            "project.create",
            &project.project_id,
            None,
            Some(after),
        )
        .await?;
        Ok((project, write_key))
    }

    async fn insert_key(
        transaction: &mut Transaction<'_, Any>,
        project_id: &str,
        write_key: &str,
        created_at_ms: i64,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO write_keys (key_hash, project_id, prefix, created_at_ms, expires_at_ms)
             VALUES ($1, $2, $3, $4, NULL)",
        )
        .bind(hex(&hash_write_key(write_key)))
        .bind(project_id)
        .bind(write_key_prefix(write_key))
        .bind(created_at_ms)
        .execute(&mut **transaction)
        .await?;
        Ok(())
    }

    pub async fn get_project(&self, project_id: &str) -> Result<Option<Project>, CatalogError> {
        let row = sqlx::query(
            "SELECT project_id, org_id, name, region, created_at_ms, storage_json
             FROM projects WHERE project_id = $1",
        )
        .bind(project_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(project_from_row).transpose()
    }

    /// The org's projects ordered by id, `limit` at a time, after the cursor of the previous page.
    pub async fn list_projects(
        &self,
        org_id: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<Project>, CatalogError> {
        let limit = limit.clamp(1, 1000);
        let rows = sqlx::query(
            "SELECT project_id, org_id, name, region, created_at_ms, storage_json FROM projects
             WHERE org_id = $1 AND project_id > $2 ORDER BY project_id LIMIT $3",
        )
        .bind(org_id)
        .bind(after.unwrap_or(""))
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items = rows
            .iter()
            .map(project_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|project| project.project_id.clone())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    pub async fn rename_project(
        &self,
        project_id: &str,
        name: &str,
        actor: &Actor,
    ) -> Result<Project, CatalogError> {
        let name = validate_name(name, "project name")?;
        let (mut transaction, change) = self.begin_change().await?;
        let before = Self::project_in(&mut transaction, project_id).await?;
        sqlx::query("UPDATE projects SET name = $1 WHERE project_id = $2")
            .bind(&name)
            .bind(project_id)
            .execute(&mut *transaction)
            .await?;
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            "project.rename",
            project_id,
            Some(json!({"name": before.name})),
            Some(json!({"name": name})),
        )
        .await?;
        Ok(Project { name, ..before })
    }

    pub(crate) async fn project_in(
        transaction: &mut Transaction<'_, Any>,
        project_id: &str,
    ) -> Result<Project, CatalogError> {
        let row = sqlx::query(
            "SELECT project_id, org_id, name, region, created_at_ms, storage_json
             FROM projects WHERE project_id = $1",
        )
        .bind(project_id)
        .fetch_optional(&mut **transaction)
        .await?;
        row.as_ref()
            .map(project_from_row)
            .transpose()?
            .ok_or_else(|| CatalogError::NotFound(format!("project `{project_id}` does not exist")))
    }

    /// Keys of a project that still work (or work until their grace period ends).
    pub async fn list_keys(&self, project_id: &str) -> Result<Vec<KeyInfo>, CatalogError> {
        let rows = sqlx::query(
            "SELECT prefix, created_at_ms, expires_at_ms FROM write_keys
             WHERE project_id = $1 AND (expires_at_ms IS NULL OR expires_at_ms > $2)
             ORDER BY created_at_ms",
        )
        .bind(project_id)
        .bind(now_unix_ms())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(KeyInfo {
                    prefix: row.try_get("prefix")?,
                    created_at_ms: row.try_get("created_at_ms")?,
                    expires_at_ms: row.try_get("expires_at_ms")?,
                })
            })
            .collect()
    }

    /// Mints a new key; the project's current keys stop working after `grace` (at once for 0).
    pub async fn rotate_key(
        &self,
        project_id: &str,
        grace: Duration,
        actor: &Actor,
    ) -> Result<RotatedKey, CatalogError> {
        let now_ms = now_unix_ms();
        let expires_at_ms = now_ms + grace.as_millis().min(i64::MAX as u128 / 2) as i64;
        let write_key = generate_write_key();
        let (mut transaction, change) = self.begin_change().await?;
        let project = Self::project_in(&mut transaction, project_id).await?;
        sqlx::query(
            "UPDATE write_keys SET expires_at_ms = $1
             WHERE project_id = $2 AND (expires_at_ms IS NULL OR expires_at_ms > $1)",
        )
        .bind(expires_at_ms)
        .bind(project_id)
        .execute(&mut *transaction)
        .await?;
        Self::insert_key(&mut transaction, project_id, &write_key, now_ms).await?;
        crate::snapshot_source::touch_project(&mut transaction, change.version, project_id).await?;
        self.commit_audited(
            transaction,
            change,
            &project.org_id,
            actor,
            "project.rotate_key",
            project_id,
            None,
            Some(json!({
                "key_prefix": write_key_prefix(&write_key),
                "previous_keys_expire_at_ms": expires_at_ms,
            })),
        )
        .await?;
        Ok(RotatedKey {
            write_key,
            previous_key_expires_at_ms: expires_at_ms,
        })
    }

    /// Sets (or with `None` clears) the project's customer-hosted archive.
    pub async fn set_storage(
        &self,
        project_id: &str,
        storage: Option<&CustomerStorage>,
        actor: &Actor,
    ) -> Result<Project, CatalogError> {
        let storage_json = storage
            .map(serde_json::to_string)
            .transpose()
            .map_err(|error| CatalogError::Invalid(error.to_string()))?;
        let (mut transaction, change) = self.begin_change().await?;
        let before = Self::project_in(&mut transaction, project_id).await?;
        sqlx::query("UPDATE projects SET storage_json = $1 WHERE project_id = $2")
            .bind(storage_json)
            .bind(project_id)
            .execute(&mut *transaction)
            .await?;
        let describe = |storage: Option<&CustomerStorage>| {
            storage.map(|storage| {
                json!({"bucket": storage.bucket, "prefix": storage.prefix, "role_arn": storage.role_arn,
                       "kms_key_arn": storage.kms_key_arn, "label": storage.label})
            })
        };
        let action = if storage.is_some() {
            "project.storage.set"
        } else {
            "project.storage.clear"
        };
        crate::snapshot_source::touch_project(&mut transaction, change.version, project_id).await?;
        self.commit_audited(
            transaction,
            change,
            &before.org_id,
            actor,
            action,
            project_id,
            describe(before.storage.as_ref()),
            describe(storage),
        )
        .await?;
        Ok(Project {
            storage: storage.cloned(),
            ..before
        })
    }

    // ---- audit ----

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
        let mut items = rows
            .iter()
            .map(audit_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|entry| entry.seq.to_string())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
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
