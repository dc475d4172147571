//! The delivery ledger: per project and received day (UTC), how many messages were acknowledged,
//! suppressed at ingest, taken by each store and erased by GDPR deletions. Kept in the region's
//! own store, beside the region's other data.
//!
//! Acknowledged messages are counted from the queue itself: the ledger is a consumer of the
//! region's queue like the sinks, and records what it read as `ledger_ranges` rows, one per
//! (queue source, offset range, project, day). A range read again (a redelivery after kill -9)
//! replaces the rows of every range it overlaps, so the counts are exact and as durable as the
//! records. Each sink's cursor (`ledger_positions`, only ever moved forward) tells which ranges it
//! has stored: everything below a cursor is delivered. Suppressed messages never enter the queue:
//! ingest adds them to `ledger_counts` before it answers. Erasures are recorded per deletion and
//! archive batch, so a deletion that runs again sets its counts instead of adding to them.

use std::collections::BTreeMap;

use sqlx::Row;

use crate::catalog::Catalog;
use crate::error::CatalogError;

/// The sinks whose cursors the ledger compares with what it read.
pub const LEDGER_ARCHIVE_SINK: &str = "archive";
pub const LEDGER_WAREHOUSE_SINK: &str = "clickhouse";

/// What the ledger read in one range of a queue source: messages per (project, day start).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerRange {
    pub source: String,
    pub start_offset: u64,
    pub end_offset: u64,
    /// `(project id, received day start in ms) -> messages`.
    pub messages: BTreeMap<(String, i64), u64>,
}

/// One received day of a project, as the ledger knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerDay {
    pub day_start_ms: i64,
    /// Answered 200: read from the queue by the ledger, plus suppressed at ingest.
    pub acknowledged: u64,
    pub suppressed: u64,
    /// Of the queued messages, those below the archive's cursor.
    pub archived: u64,
    /// Of the queued messages, those below the warehouse sink's cursor.
    pub warehouse: u64,
    /// Removed from the archive by GDPR deletions since.
    pub erased: u64,
}

/// A (project, day) whose messages are not all in every store yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreconciledDay {
    pub project_id: String,
    pub day_start_ms: i64,
    /// Queued messages some store has not taken.
    pub missing: u64,
}

impl Catalog {
    /// Records what the ledger read in `range` (replacing whatever was recorded for ranges of the
    /// same source starting inside it: a range read again counts once).
    pub async fn record_ledger_range(
        &self,
        region: &str,
        range: &LedgerRange,
    ) -> Result<(), CatalogError> {
        debug_assert!(range.start_offset <= range.end_offset);
        let mut transaction = self.pool.begin().await?;
        sqlx::query(
            "DELETE FROM ledger_ranges WHERE source = $1 AND start_offset >= $2 AND start_offset < $3",
        )
        .bind(&range.source)
        .bind(range.start_offset as i64)
        .bind(range.end_offset.max(range.start_offset + 1) as i64)
        .execute(&mut *transaction)
        .await?;
        for ((project_id, day_start_ms), messages) in &range.messages {
            sqlx::query(
                "INSERT INTO ledger_ranges
                    (source, start_offset, end_offset, project_id, day_ms, region, messages)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&range.source)
            .bind(range.start_offset as i64)
            .bind(range.end_offset as i64)
            .bind(project_id)
            .bind(*day_start_ms)
            .bind(region)
            .bind(*messages as i64)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Moves a sink's cursor for a source forward (never back: a node that no longer holds a
    /// replicated cursor may report an older position).
    pub async fn record_ledger_position(
        &self,
        source: &str,
        sink: &str,
        position: u64,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO ledger_positions (source, sink, position, updated_at_ms)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (source, sink) DO UPDATE SET
                position = CASE WHEN excluded.position > ledger_positions.position
                    THEN excluded.position ELSE ledger_positions.position END,
                updated_at_ms = excluded.updated_at_ms",
        )
        .bind(source)
        .bind(sink)
        .bind(position as i64)
        .bind(meridian_core::timestamp::now_unix_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Adds messages suppressed at ingest (recorded before the request is answered).
    pub async fn record_suppressed(
        &self,
        project_id: &str,
        day_start_ms: i64,
        messages: u64,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO ledger_counts (project_id, day_ms, kind, entry, messages)
             VALUES ($1, $2, 'suppressed', '', $3)
             ON CONFLICT (project_id, day_ms, kind, entry) DO UPDATE SET
                messages = ledger_counts.messages + excluded.messages",
        )
        .bind(project_id)
        .bind(day_start_ms)
        .bind(messages as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records the messages a deletion removed from one archive batch (set, not added: the same
    /// deletion and batch recorded again counts once).
    pub async fn record_erased(
        &self,
        project_id: &str,
        day_start_ms: i64,
        deletion_and_batch: &str,
        messages: u64,
    ) -> Result<(), CatalogError> {
        sqlx::query(
            "INSERT INTO ledger_counts (project_id, day_ms, kind, entry, messages)
             VALUES ($1, $2, 'erased', $3, $4)
             ON CONFLICT (project_id, day_ms, kind, entry) DO UPDATE SET
                messages = excluded.messages",
        )
        .bind(project_id)
        .bind(day_start_ms)
        .bind(deletion_and_batch)
        .bind(messages as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The project's days in `[from_day_ms, to_day_ms]` that the ledger has anything for.
    pub async fn ledger_days(
        &self,
        project_id: &str,
        from_day_ms: i64,
        to_day_ms: i64,
    ) -> Result<Vec<LedgerDay>, CatalogError> {
        let mut days: BTreeMap<i64, LedgerDay> = BTreeMap::new();
        for stored in self
            .stored_by_project_and_day(RangeScope::Project(project_id), from_day_ms, to_day_ms)
            .await?
        {
            let day = days.entry(stored.day_start_ms).or_default();
            day.acknowledged += stored.queued;
            day.archived = stored.archived;
            day.warehouse = stored.warehouse;
        }
        let counts = sqlx::query(
            "SELECT day_ms, kind, CAST(SUM(messages) AS BIGINT) AS messages FROM ledger_counts
             WHERE project_id = $1 AND day_ms >= $2 AND day_ms <= $3
             GROUP BY day_ms, kind",
        )
        .bind(project_id)
        .bind(from_day_ms)
        .bind(to_day_ms)
        .fetch_all(&self.pool)
        .await?;
        for row in counts {
            let day_start_ms: i64 = row.try_get("day_ms")?;
            let kind: String = row.try_get("kind")?;
            let messages = sum_column(&row, "messages")?;
            let day = days.entry(day_start_ms).or_default();
            match kind.as_str() {
                "suppressed" => {
                    day.suppressed = messages;
                    day.acknowledged += messages;
                }
                "erased" => day.erased = messages,
                _ => {}
            }
        }
        Ok(days
            .into_iter()
            .map(|(day_start_ms, day)| LedgerDay {
                day_start_ms,
                ..day
            })
            .collect())
    }

    /// Days of the region's projects in `[from_day_ms, to_day_ms]` whose queued messages are not
    /// all below the archive's cursor (and the warehouse sink's, when `with_warehouse`).
    pub async fn unreconciled_ledger_days(
        &self,
        region: &str,
        from_day_ms: i64,
        to_day_ms: i64,
        with_warehouse: bool,
    ) -> Result<Vec<UnreconciledDay>, CatalogError> {
        let mut unreconciled = Vec::new();
        for stored in self
            .stored_by_project_and_day(RangeScope::Region(region), from_day_ms, to_day_ms)
            .await?
        {
            let mut in_every_store = stored.archived;
            if with_warehouse {
                in_every_store = in_every_store.min(stored.warehouse);
            }
            if in_every_store < stored.queued {
                unreconciled.push(UnreconciledDay {
                    project_id: stored.project_id,
                    day_start_ms: stored.day_start_ms,
                    missing: stored.queued - in_every_store,
                });
            }
        }
        Ok(unreconciled)
    }
}

/// Which ledger ranges a sum covers.
enum RangeScope<'a> {
    Project(&'a str),
    Region(&'a str),
}

/// The queued messages of one project and day, and how many of them each store has taken.
struct StoredDay {
    project_id: String,
    day_start_ms: i64,
    queued: u64,
    archived: u64,
    warehouse: u64,
}

impl Catalog {
    /// Per project and day in `[from_day_ms, to_day_ms]`: the messages the ledger read from the
    /// queue, and those below the archive's and the warehouse sink's cursors.
    async fn stored_by_project_and_day(
        &self,
        scope: RangeScope<'_>,
        from_day_ms: i64,
        to_day_ms: i64,
    ) -> Result<Vec<StoredDay>, CatalogError> {
        let (column, value) = match scope {
            RangeScope::Project(project_id) => ("r.project_id", project_id),
            RangeScope::Region(region) => ("r.region", region),
        };
        let rows = sqlx::query(&format!(
            "SELECT r.project_id AS project_id, r.day_ms AS day_ms,
                CAST(SUM(r.messages) AS BIGINT) AS queued,
                CAST(SUM(CASE WHEN a.position IS NOT NULL AND r.end_offset <= a.position
                    THEN r.messages ELSE 0 END) AS BIGINT) AS archived,
                CAST(SUM(CASE WHEN w.position IS NOT NULL AND r.end_offset <= w.position
                    THEN r.messages ELSE 0 END) AS BIGINT) AS warehouse
             FROM ledger_ranges r
             LEFT JOIN ledger_positions a ON a.source = r.source AND a.sink = $4
             LEFT JOIN ledger_positions w ON w.source = r.source AND w.sink = $5
             WHERE {column} = $1 AND r.day_ms >= $2 AND r.day_ms <= $3
             GROUP BY r.project_id, r.day_ms
             ORDER BY r.day_ms"
        ))
        .bind(value)
        .bind(from_day_ms)
        .bind(to_day_ms)
        .bind(LEDGER_ARCHIVE_SINK)
        .bind(LEDGER_WAREHOUSE_SINK)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredDay {
                    project_id: row.try_get("project_id")?,
                    day_start_ms: row.try_get("day_ms")?,
                    queued: sum_column(row, "queued")?,
                    archived: sum_column(row, "archived")?,
                    warehouse: sum_column(row, "warehouse")?,
                })
            })
            .collect()
    }
}

/// A `CAST(SUM(..) AS BIGINT)` column as a count.
fn sum_column(row: &sqlx::any::AnyRow, column: &str) -> Result<u64, CatalogError> {
    let value: Option<i64> = row.try_get(column)?;
    Ok(value.unwrap_or(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::catalogs_under_test;

    const DAY: i64 = 86_400_000;

    fn range(source: &str, start: u64, end: u64, counts: &[(&str, i64, u64)]) -> LedgerRange {
        LedgerRange {
            source: source.to_string(),
            start_offset: start,
            end_offset: end,
            messages: counts
                .iter()
                .map(|(project, day, messages)| ((project.to_string(), *day), *messages))
                .collect(),
        }
    }

    #[tokio::test]
    async fn ranges_read_again_replace_their_counts_and_cursors_tell_what_each_store_took() {
        let dir = tempfile::tempdir().unwrap();
        for catalog in catalogs_under_test(&dir).await {
            let region = "eu-west-1";
            for recorded in [
                range("q1", 0, 10, &[("p1", 0, 6), ("p1", DAY, 4)]),
                range("q1", 10, 20, &[("p1", DAY, 10)]),
                range("q2", 0, 5, &[("p1", DAY, 5)]),
                // After a crash the ledger reads from 10 again, further this time: it replaces.
                range("q1", 10, 25, &[("p1", DAY, 15)]),
            ] {
                catalog
                    .record_ledger_range(region, &recorded)
                    .await
                    .unwrap();
            }
            catalog
                .record_ledger_position("q1", "archive", 10)
                .await
                .unwrap();
            // A node that no longer holds the cursor reports an older position: ignored.
            catalog
                .record_ledger_position("q1", "archive", 5)
                .await
                .unwrap();
            catalog
                .record_ledger_position("q1", "clickhouse", 25)
                .await
                .unwrap();
            catalog.record_suppressed("p1", DAY, 2).await.unwrap();
            catalog.record_suppressed("p1", DAY, 1).await.unwrap();
            // The same deletion and batch recorded twice count once.
            catalog
                .record_erased("p1", DAY, "del-1/batch-a", 3)
                .await
                .unwrap();
            catalog
                .record_erased("p1", DAY, "del-1/batch-a", 3)
                .await
                .unwrap();

            let days = catalog.ledger_days("p1", 0, DAY).await.unwrap();
            assert_eq!(
                days,
                vec![
                    LedgerDay {
                        day_start_ms: 0,
                        acknowledged: 6,
                        suppressed: 0,
                        archived: 6,
                        warehouse: 6,
                        erased: 0,
                    },
                    LedgerDay {
                        day_start_ms: DAY,
                        acknowledged: 4 + 15 + 5 + 3,
                        suppressed: 3,
                        archived: 4,
                        warehouse: 4 + 15,
                        erased: 3,
                    },
                ]
            );
            assert_eq!(
                catalog
                    .unreconciled_ledger_days(region, 0, DAY, true)
                    .await
                    .unwrap(),
                vec![UnreconciledDay {
                    project_id: "p1".to_string(),
                    day_start_ms: DAY,
                    missing: 24 - 4,
                }]
            );
            assert!(
                catalog
                    .unreconciled_ledger_days("us-east-1", 0, DAY, true)
                    .await
                    .unwrap()
                    .is_empty(),
                "another region's days are its own"
            );
            for sink in ["archive", "clickhouse"] {
                catalog
                    .record_ledger_position("q1", sink, 25)
                    .await
                    .unwrap();
                catalog.record_ledger_position("q2", sink, 5).await.unwrap();
            }
            assert!(
                catalog
                    .unreconciled_ledger_days(region, 0, DAY, true)
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }
}
