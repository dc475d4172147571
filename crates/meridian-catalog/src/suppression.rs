//! Suppressions: users of a project whose new events are dropped at the door. The catalog keeps
//! their keyed hashes (see [`crate::keyed_hash`]), never the ids.

use serde_json::json;
use sqlx::Row;

use crate::audit::Actor;
use crate::catalog::{Catalog, Page, Project};
use crate::error::CatalogError;
use crate::keyed_hash::CatalogKey;
use meridian_core::timestamp::now_unix_ms;

impl Catalog {
    /// Suppresses the users (idempotent). Returns how many were newly suppressed.
    pub async fn suppress_users(
        &self,
        project: &Project,
        user_ids: &[String],
        actor: &Actor,
    ) -> Result<u64, CatalogError> {
        let project_id = project.project_id.as_str();
        let now_ms = now_unix_ms();
        let (mut transaction, change) = self.begin_change().await?;
        let mut newly_suppressed = 0;
        let user_hashes = self.user_hashes(project_id, user_ids);
        for user_hash in &user_hashes {
            let inserted = sqlx::query(
                "INSERT INTO suppressions (project_id, user_id, created_at_ms) VALUES ($1, $2, $3)
                 ON CONFLICT (project_id, user_id) DO NOTHING",
            )
            .bind(project_id)
            .bind(user_hash)
            .bind(now_ms)
            .execute(&mut *transaction)
            .await?;
            newly_suppressed += inserted.rows_affected();
        }
        crate::snapshot_source::touch_project(&mut transaction, change.version, project_id).await?;
        self.commit_audited(
            transaction,
            change,
            &project.org_id,
            actor,
            "suppression.add",
            project_id,
            None,
            Some(json!({"user_hashes": user_hashes})),
        )
        .await?;
        Ok(newly_suppressed)
    }

    /// Lifts a suppression. Returns false when the user was not suppressed.
    pub async fn unsuppress_user(
        &self,
        project: &Project,
        user_id: &str,
        actor: &Actor,
    ) -> Result<bool, CatalogError> {
        let project_id = project.project_id.as_str();
        let (mut transaction, change) = self.begin_change().await?;
        let user_hash = self.key.user_hash(project_id, user_id);
        let deleted =
            sqlx::query("DELETE FROM suppressions WHERE project_id = $1 AND user_id = $2")
                .bind(project_id)
                .bind(&user_hash)
                .execute(&mut *transaction)
                .await?;
        if deleted.rows_affected() == 0 {
            return Ok(false);
        }
        crate::snapshot_source::touch_project(&mut transaction, change.version, project_id).await?;
        self.commit_audited(
            transaction,
            change,
            &project.org_id,
            actor,
            "suppression.remove",
            project_id,
            Some(json!({"user_hash": user_hash})),
            None,
        )
        .await?;
        Ok(true)
    }

    /// The keyed hashes of `user_ids` in the project (see [`crate::keyed_hash`]).
    pub fn user_hashes(&self, project_id: &str, user_ids: &[String]) -> Vec<String> {
        user_ids
            .iter()
            .map(|user_id| self.key.user_hash(project_id, user_id))
            .collect()
    }

    /// The key of the catalog's hashes (the key cache computes user hashes with it).
    pub fn key(&self) -> &CatalogKey {
        &self.key
    }

    /// Whether the user is suppressed in the project.
    pub async fn is_user_suppressed(
        &self,
        project_id: &str,
        user_id: &str,
    ) -> Result<bool, CatalogError> {
        let row = sqlx::query(
            "SELECT 1 AS found FROM suppressions WHERE project_id = $1 AND user_id = $2",
        )
        .bind(project_id)
        .bind(self.key.user_hash(project_id, user_id))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Suppressed users as keyed hashes (the ids themselves are not kept).
    pub async fn list_suppressions(
        &self,
        project_id: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<String>, CatalogError> {
        let limit = limit.clamp(1, 5000);
        let rows = sqlx::query(
            "SELECT user_id FROM suppressions WHERE project_id = $1 AND user_id > $2
             ORDER BY user_id LIMIT $3",
        )
        .bind(project_id)
        .bind(after.unwrap_or(""))
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(|row| row.try_get::<String, _>("user_id"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::of_items_past_limit(items, limit, String::clone))
    }
}
