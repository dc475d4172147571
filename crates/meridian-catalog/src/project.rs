//! Projects and their write keys: creation (pinned to a region forever), listing, renames, key
//! rotation with a grace period, and customer storage settings.

use std::time::Duration;

use meridian_core::timestamp::now_unix_ms;
use meridian_core::{CustomerStorage, RegionId};
use serde::Serialize;
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::audit::Actor;
use crate::catalog::{Catalog, Page, validate_name};
use crate::error::CatalogError;
use crate::ids::{generate_write_key, hash_write_key, hex, new_id, write_key_prefix};

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

impl Catalog {
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
        let items = rows
            .iter()
            .map(project_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::of_items_past_limit(items, limit, |project| {
            project.project_id.clone()
        }))
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
}
