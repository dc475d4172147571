//! Orgs: create, look up, and the primary region (where org-level data lives).

use meridian_core::RegionId;
use serde::Serialize;
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Actor;
use crate::catalog::{Catalog, validate_name};
use crate::error::CatalogError;
use meridian_core::timestamp::now_unix_ms;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Org {
    pub org_id: String,
    pub name: String,
    pub primary_region: String,
    pub created_at_ms: i64,
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

fn org_from_row(row: &AnyRow) -> Result<Org, CatalogError> {
    Ok(Org {
        org_id: row.try_get("org_id")?,
        name: row.try_get("name")?,
        primary_region: row.try_get("primary_region")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

impl Catalog {
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
}
