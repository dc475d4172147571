//! What the node asks of a region's warehouse besides inserts: GDPR deletions (mutations waited
//! for and verified), retention's counts and deletions, the last hour's volume, the residency scan.

use super::*;

/// Rows for the records, leaving out messages a GDPR deletion erased; returns the rows and how
/// many were left out.
/// Splits user ids into chunks whose SQL stays well under ClickHouse's 256 KiB query limit.
pub(super) fn chunk_user_ids(user_ids: &[String]) -> Vec<&[String]> {
    const MAX_CHUNK_BYTES: usize = 64 * 1024;
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (index, user_id) in user_ids.iter().enumerate() {
        if index > start && bytes + user_id.len() + 8 > MAX_CHUNK_BYTES {
            chunks.push(&user_ids[start..index]);
            start = index;
            bytes = 0;
        }
        bytes += user_id.len() + 8;
    }
    if start < user_ids.len() {
        chunks.push(&user_ids[start..]);
    }
    chunks
}

impl ClickHouseSink {
    /// Deletes a project's rows of `user_ids` on every replica of the region: counts them, runs
    /// `ALTER TABLE ... DELETE WHERE project_id = ? AND user_id IN (?, ...)` (values bound, never
    /// spliced), waits for the mutation to finish, and verifies the count is zero. Returns the rows
    /// deleted. A replica without the table has nothing to delete.
    pub async fn delete_users(
        &self,
        project_id: &str,
        user_ids: &[String],
    ) -> Result<u64, WarehouseError> {
        let mut deleted = 0u64;
        for replica in &self.replicas {
            self.refuse_while_rekeying(replica).await?;
            for chunk in chunk_user_ids(user_ids) {
                let placeholders = vec!["?"; chunk.len()].join(", ");
                let condition = format!("project_id = ? AND user_id IN ({placeholders})");
                deleted += self
                    .delete_on_replica(replica, &condition, |query| {
                        chunk.iter().fold(query.bind(project_id), |query, user| {
                            query.bind(user.as_str())
                        })
                    })
                    .await?;
            }
            // A re-key that began meanwhile may copy rows this deletion already removed from
            // the old table: the stage is retried once the copy is done.
            self.refuse_while_rekeying(replica).await?;
        }
        Ok(deleted)
    }

    /// Deletes a project's rows received before `cutoff_ms` (a retention) on every replica, as
    /// [`ClickHouseSink::delete_users`] does. Returns the rows deleted.
    pub async fn delete_received_before(
        &self,
        project_id: &str,
        cutoff_ms: i64,
    ) -> Result<u64, WarehouseError> {
        let cutoff_secs = cutoff_ms.div_euclid(1000);
        let mut deleted = 0u64;
        for replica in &self.replicas {
            self.refuse_while_rekeying(replica).await?;
            deleted += self
                .delete_on_replica(replica, RECEIVED_BEFORE, |query| {
                    query.bind(project_id).bind(cutoff_secs)
                })
                .await?;
            self.refuse_while_rekeying(replica).await?;
        }
        Ok(deleted)
    }

    /// A project's rows received before `cutoff_ms`, per received UTC day (day start in ms),
    /// summed over the replicas: what [`ClickHouseSink::delete_received_before`] would delete.
    pub async fn count_received_before_by_day(
        &self,
        project_id: &str,
        cutoff_ms: i64,
    ) -> Result<Vec<(i64, u64)>, WarehouseError> {
        let database = schema::quote_identifier(&self.config.database);
        let sql = format!(
            "SELECT toUInt32(toDate(received_at)) AS day, count() AS rows FROM {database}.events \
             WHERE {RECEIVED_BEFORE} GROUP BY day ORDER BY day"
        );
        let mut by_day = std::collections::BTreeMap::<i64, u64>::new();
        for replica in &self.replicas {
            let counted = self
                .with_timeout(
                    replica
                        .admin
                        .query(&sql)
                        .bind(project_id)
                        .bind(cutoff_ms.div_euclid(1000))
                        .fetch_all::<(u32, u64)>(),
                )
                .await;
            let rows = match counted {
                Ok(rows) => rows,
                Err(clickhouse::error::Error::BadResponse(message))
                    if matches!(exception_code(&message), Some(60) | Some(81)) =>
                {
                    continue;
                }
                Err(error) => {
                    return Err(WarehouseError::on(
                        &replica.url,
                        format!("counting expired rows failed: {error}"),
                    ));
                }
            };
            for (day_number, rows) in rows {
                *by_day
                    .entry(i64::from(day_number) * 86_400_000)
                    .or_default() += rows;
            }
        }
        Ok(by_day.into_iter().collect())
    }

    /// Rows received since `since_ms` per project of `project_ids`, summed over the replicas (a
    /// message stored twice before a merge counts twice: this is a volume, not an exact count).
    pub async fn count_recent_by_project(
        &self,
        project_ids: &[String],
        since_ms: i64,
    ) -> Result<std::collections::HashMap<String, u64>, WarehouseError> {
        let database = schema::quote_identifier(&self.config.database);
        let mut counts = std::collections::HashMap::new();
        for chunk in project_ids.chunks(500) {
            let placeholders = vec!["?"; chunk.len()].join(", ");
            let sql = format!(
                "SELECT project_id, count() FROM {database}.events \
                 WHERE received_at >= toDateTime(?, 'UTC') AND project_id IN ({placeholders}) \
                 GROUP BY project_id"
            );
            for replica in &self.replicas {
                let query = chunk.iter().fold(
                    replica.admin.query(&sql).bind(since_ms.div_euclid(1000)),
                    |query, project_id| query.bind(project_id.as_str()),
                );
                let counted = match self.with_timeout(query.fetch_all::<(String, u64)>()).await {
                    Ok(rows) => rows,
                    Err(clickhouse::error::Error::BadResponse(message))
                        if matches!(exception_code(&message), Some(60) | Some(81)) =>
                    {
                        continue;
                    }
                    Err(error) => {
                        return Err(WarehouseError::on(
                            &replica.url,
                            format!("counting recent rows failed: {error}"),
                        ));
                    }
                };
                for (project_id, rows) in counted {
                    *counts.entry(project_id).or_default() += rows;
                }
            }
        }
        Ok(counts)
    }

    /// On one replica: counts the rows matching `condition` (with its values bound by `bind`),
    /// deletes them with a mutation, waits for it, and verifies none is left. A replica without
    /// the table has nothing to delete.
    async fn delete_on_replica(
        &self,
        replica: &Replica,
        condition: &str,
        bind: impl Fn(clickhouse::query::Query) -> clickhouse::query::Query,
    ) -> Result<u64, WarehouseError> {
        let database = schema::quote_identifier(&self.config.database);
        let count_sql = format!("SELECT count() FROM {database}.events WHERE {condition}");
        let before = match self
            .with_timeout(bind(replica.admin.query(&count_sql)).fetch_one::<u64>())
            .await
        {
            Ok(count) => count,
            Err(clickhouse::error::Error::BadResponse(message))
                if matches!(exception_code(&message), Some(60) | Some(81)) =>
            {
                return Ok(0);
            }
            Err(error) => {
                return Err(WarehouseError::on(
                    &replica.url,
                    format!("counting rows failed: {error}"),
                ));
            }
        };
        if before == 0 {
            return Ok(0);
        }
        let delete_sql = format!("ALTER TABLE {database}.events DELETE WHERE {condition}");
        self.with_timeout(bind(replica.admin.query(&delete_sql)).execute())
            .await
            .map_err(|error| {
                WarehouseError::on(
                    &replica.url,
                    format!("ALTER TABLE ... DELETE failed: {error}"),
                )
            })?;
        self.wait_for_mutations(replica).await?;
        let after = self
            .with_timeout(bind(replica.admin.query(&count_sql)).fetch_one::<u64>())
            .await
            .map_err(|error| {
                WarehouseError::on(
                    &replica.url,
                    format!("verifying the deletion failed: {error}"),
                )
            })?;
        if after != 0 {
            return Err(WarehouseError::on(
                &replica.url,
                format!("{after} rows remain after the deletion mutation"),
            ));
        }
        Ok(before)
    }

    /// Every project id stored in the events table of each replica (for residency reports):
    /// `(replica url, project ids)`. A replica without the table holds none.
    pub async fn distinct_project_ids(&self) -> Result<Vec<(String, Vec<String>)>, WarehouseError> {
        let database = schema::quote_identifier(&self.config.database);
        let sql = format!("SELECT DISTINCT project_id FROM {database}.events ORDER BY project_id");
        let mut found = Vec::with_capacity(self.replicas.len());
        for replica in &self.replicas {
            let ids = match self
                .with_timeout(replica.admin.query(&sql).fetch_all::<String>())
                .await
            {
                Ok(ids) => ids,
                Err(clickhouse::error::Error::BadResponse(message))
                    if matches!(exception_code(&message), Some(60) | Some(81)) =>
                {
                    Vec::new()
                }
                Err(error) => {
                    return Err(WarehouseError::on(
                        &replica.url,
                        format!("listing project ids failed: {error}"),
                    ));
                }
            };
            found.push((replica.url.clone(), ids));
        }
        Ok(found)
    }

    /// `Err` while the replica's events table is being re-keyed (its old rows are being copied).
    async fn refuse_while_rekeying(&self, replica: &Replica) -> Result<(), WarehouseError> {
        let in_progress = crate::rekey::rekey_in_progress(
            &replica.admin,
            &self.config.database,
            self.config.request_timeout,
        )
        .await
        .map_err(|error| {
            WarehouseError::on(
                &replica.url,
                format!("checking for a re-key failed: {error}"),
            )
        })?;
        if in_progress {
            return Err(WarehouseError::on(
                &replica.url,
                "the events table is being re-keyed; the deletion waits until every old row is copied",
            ));
        }
        Ok(())
    }

    async fn wait_for_mutations(&self, replica: &Replica) -> Result<(), WarehouseError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        loop {
            let pending: u64 = self
                .with_timeout(
                    replica
                        .admin
                        .query("SELECT count() FROM system.mutations WHERE database = ? AND table = 'events' AND is_done = 0")
                        .bind(self.config.database.as_str())
                        .fetch_one::<u64>(),
                )
                .await
                .map_err(|error| WarehouseError::on(&replica.url, format!("reading system.mutations failed: {error}")))?;
            if pending == 0 {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(WarehouseError::on(
                    &replica.url,
                    "the deletion mutation did not finish within 10 minutes",
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The rows of a project (first value) received before a time in seconds (second value).
const RECEIVED_BEFORE: &str = "project_id = ? AND received_at < toDateTime(?, 'UTC')";
