//! Jobs carried out in a region by one node at a time (GDPR deletions, replays): a row with a
//! `status`, the `region` it runs in, and a lease (`lease_owner`, `lease_until_ms`) another node may
//! take over once it lapses. One claim for every such table.

use sqlx::{AnyPool, Row};

use crate::error::CatalogError;
use meridian_core::timestamp::now_unix_ms;

/// A table of leased jobs and its id column.
#[derive(Clone, Copy)]
pub(crate) struct LeasedJobs {
    pub table: &'static str,
    pub id_column: &'static str,
}

pub(crate) const DELETIONS: LeasedJobs = LeasedJobs {
    table: "deletions",
    id_column: "deletion_id",
};

pub(crate) const REPLAYS: LeasedJobs = LeasedJobs {
    table: "replays",
    id_column: "replay_id",
};

/// Claims the oldest unfinished job of a region in `regions` for `node_id` until
/// `lease_until_ms` (free, lapsed, or already this node's) and marks it running. Returns its id.
pub(crate) async fn claim(
    pool: &AnyPool,
    jobs: LeasedJobs,
    node_id: &str,
    regions: &[String],
    lease_until_ms: i64,
) -> Result<Option<String>, CatalogError> {
    if regions.is_empty() {
        return Ok(None);
    }
    let LeasedJobs { table, id_column } = jobs;
    let now_ms = now_unix_ms();
    // Only this node's regions, in SQL: pending jobs of other regions must never fill the page and
    // starve the ones this node can run.
    let region_placeholders: Vec<String> = (0..regions.len())
        .map(|index| format!("${}", index + 3))
        .collect();
    let query_text = format!(
        "SELECT {id_column} AS id FROM {table} WHERE status IN ('pending', 'running')
         AND (lease_owner IS NULL OR lease_until_ms < $1 OR lease_owner = $2)
         AND region IN ({})
         ORDER BY created_at_ms LIMIT 50",
        region_placeholders.join(", ")
    );
    let mut query = sqlx::query(&query_text).bind(now_ms).bind(node_id);
    for region in regions {
        query = query.bind(region);
    }
    let claim_text = format!(
        "UPDATE {table} SET lease_owner = $1, lease_until_ms = $2, status = 'running',
            started_at_ms = COALESCE(started_at_ms, $3), updated_at_ms = $3
         WHERE {id_column} = $4 AND status IN ('pending', 'running')
           AND (lease_owner IS NULL OR lease_until_ms < $3 OR lease_owner = $1)"
    );
    for row in &query.fetch_all(pool).await? {
        let id: String = row.try_get("id")?;
        let claimed = sqlx::query(&claim_text)
            .bind(node_id)
            .bind(lease_until_ms)
            .bind(now_ms)
            .bind(&id)
            .execute(pool)
            .await?;
        if claimed.rows_affected() == 1 {
            return Ok(Some(id));
        }
    }
    Ok(None)
}
