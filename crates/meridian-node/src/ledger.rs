//! The delivery ledger's parts on a node (the counts themselves: meridian-catalog `ledger.rs`).
//!
//! - [`LedgerSink`], one more consumer of each served region's queue: it counts what it reads per
//!   project and received day and records the range in the region's store. A range read again
//!   after a crash replaces its earlier count, so the acknowledged count is exactly the records
//!   in the queue, as durable as they are.
//! - [`run_ledger_checks`], a supervised task: every few seconds it records where each sink's
//!   cursor stands (every record below it is in that store), and every minute it counts the days
//!   that do not reconcile into `meridian_ledger_unreconciled_days`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_archive::layout::ArchivedMessage;
use meridian_catalog::{Catalog, LEDGER_ARCHIVE_SINK, LEDGER_WAREHOUSE_SINK, LedgerRange};
use meridian_core::RegionId;
use meridian_core::timestamp::{now_unix_ms, parse_timestamp_ms, utc_day_start_ms};
use meridian_queue::{BatchLimits, DeliveryBatch, Record, Sink, SinkError};
use tracing::warn;

use crate::node::Node;
use crate::tasks::{TaskContext, TaskFailure};

/// The ledger's consumer name in each region's queue.
pub const LEDGER_SINK: &str = "ledger";
/// How long a catalog write of the ledger may take before the attempt is retried.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often sink positions are recorded.
const POSITION_INTERVAL: Duration = Duration::from_secs(2);
/// How often the unreconciled days are counted.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// A day is expected to reconcile once it ended this long ago.
const RECONCILE_GRACE_MS: i64 = 3_600_000;
/// The days the unreconciled-days metric looks back over.
const RECONCILE_LOOKBACK_DAYS: i64 = 7;
const DAY_MS: i64 = 86_400_000;

/// Counts each region's acknowledged messages from its queue into the region's store.
pub struct LedgerSink {
    region: RegionId,
    store: Catalog,
}

impl LedgerSink {
    pub fn new(region: RegionId, store: Catalog) -> LedgerSink {
        LedgerSink { region, store }
    }
}

/// Messages per (project, received day) in `records`. A record that is not a message (it cannot
/// be: ingest wrote every one) is counted under an empty project id rather than dropped.
pub fn count_by_project_and_day(records: &[Record]) -> BTreeMap<(String, i64), u64> {
    let mut counts: BTreeMap<(String, i64), u64> = BTreeMap::new();
    for record in records {
        let key = match serde_json::from_slice::<ArchivedMessage>(&record.payload) {
            Ok(fields) => (
                fields.project_id.into_owned(),
                utc_day_start_ms(parse_timestamp_ms(&fields.received_at).unwrap_or(0)),
            ),
            Err(_) => (String::new(), 0),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

#[async_trait]
impl Sink for LedgerSink {
    fn name(&self) -> &str {
        LEDGER_SINK
    }

    fn batch_limits(&self) -> BatchLimits {
        // The ledger holds a batch's records while it counts them: small batches keep that
        // memory small (a mebibyte), at a store write per batch.
        BatchLimits {
            max_records: 10_000,
            max_bytes: 1024 * 1024,
            max_age: Duration::from_millis(200),
        }
    }

    async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
        let records = Arc::clone(&batch.records);
        // Every record of the batch is parsed: CPU work off the runtime.
        let messages = tokio::task::spawn_blocking(move || count_by_project_and_day(&records))
            .await
            .map_err(|error| SinkError::Transient(format!("counting the batch: {error}")))?;
        debug_assert_eq!(
            messages.values().sum::<u64>(),
            batch.records.len() as u64,
            "every record counted once"
        );
        let range = LedgerRange {
            source: batch.source.to_string(),
            start_offset: batch.range.start,
            end_offset: batch.range.end,
            messages,
        };
        match tokio::time::timeout(
            STORE_TIMEOUT,
            self.store.record_ledger_range(self.region.as_str(), &range),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(SinkError::Transient(format!(
                "recording the ledger: {error}"
            ))),
            Err(_) => Err(SinkError::Transient(format!(
                "recording the ledger took over {} s",
                STORE_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// Records each served region's sink positions every [`POSITION_INTERVAL`], and counts the days
/// that do not reconcile every [`RECONCILE_INTERVAL`], until stopped.
pub async fn run_ledger_checks(
    node: Arc<Node>,
    mut context: TaskContext,
) -> Result<(), TaskFailure> {
    let mut last_reconcile: Option<tokio::time::Instant> = None;
    let mut recorded = RecordedPositions::new();
    loop {
        record_positions(&node, &mut recorded).await;
        if last_reconcile.is_none_or(|at| at.elapsed() >= RECONCILE_INTERVAL) {
            count_unreconciled_days(&node).await;
            last_reconcile = Some(tokio::time::Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(POSITION_INTERVAL) => {}
            _ = context.stopped() => return Ok(()),
        }
    }
}

/// The positions last recorded, per (queue source, sink): an unchanged one is not written again.
type RecordedPositions = std::collections::HashMap<(Arc<str>, String), u64>;

/// Where each store's cursor stands, per queue source, in the region's store (written when it
/// moved since the last round). A failure is logged and tried again at the next round.
async fn record_positions(node: &Node, recorded: &mut RecordedPositions) {
    for region in node.regions.values() {
        let Ok(store) = node.stores.of_region(region.id.as_str()) else {
            continue;
        };
        for handle in &region.sinks {
            if handle.sink != LEDGER_ARCHIVE_SINK && handle.sink != LEDGER_WAREHOUSE_SINK {
                continue;
            }
            let source = handle.log.source();
            let position = handle
                .status
                .position
                .load(std::sync::atomic::Ordering::Relaxed);
            let key = (Arc::clone(&source), handle.sink.clone());
            if recorded.get(&key) == Some(&position) {
                continue;
            }
            let written = tokio::time::timeout(
                STORE_TIMEOUT,
                store.record_ledger_position(&source, &handle.sink, position),
            )
            .await;
            if matches!(written, Ok(Ok(()))) {
                recorded.insert(key, position);
            } else {
                warn!(region = %region.id, sink = %handle.sink, source = %source, "could not record the sink's position in the delivery ledger; trying again");
            }
        }
    }
}

async fn count_unreconciled_days(node: &Node) {
    let now_ms = now_unix_ms();
    // Days that ended more than the grace ago, within the lookback.
    let to_day_ms = utc_day_start_ms(now_ms - RECONCILE_GRACE_MS) - DAY_MS;
    let from_day_ms = utc_day_start_ms(now_ms) - RECONCILE_LOOKBACK_DAYS * DAY_MS;
    for region in node.regions.values() {
        let Ok(store) = node.stores.of_region(region.id.as_str()) else {
            continue;
        };
        let with_warehouse = region.services.clickhouse.is_some();
        let counted = tokio::time::timeout(
            STORE_TIMEOUT,
            store.unreconciled_ledger_days(
                region.id.as_str(),
                from_day_ms,
                to_day_ms,
                with_warehouse,
            ),
        )
        .await;
        match counted {
            Ok(Ok(days)) => {
                for day in &days {
                    warn!(region = %region.id, project_id = %day.project_id, day_start_ms = day.day_start_ms, missing = day.missing, "a day of the delivery ledger does not reconcile");
                }
                node.metrics
                    .set_unreconciled_days(region.id.as_str(), days.len());
            }
            _ => {
                warn!(region = %region.id, "could not count the delivery ledger's unreconciled days; trying again")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, payload: &str) -> Record {
        Record {
            offset,
            payload: payload.as_bytes().to_vec(),
        }
    }

    #[test]
    fn records_are_counted_by_project_and_received_day() {
        let records = vec![
            record(
                0,
                r#"{"projectId":"p1","receivedAt":"2026-12-07T23:59:59.999Z","type":"track"}"#,
            ),
            record(
                1,
                r#"{"type":"track","projectId":"p1","receivedAt":"2026-12-08T00:00:00.000Z"}"#,
            ),
            record(
                2,
                r#"{"projectId":"p2","receivedAt":"2026-12-07T10:00:00.000Z"}"#,
            ),
            record(
                3,
                r#"{"projectId":"p1","receivedAt":"2026-12-07T01:00:00.000Z"}"#,
            ),
            record(4, "not json"),
        ];
        let counts = count_by_project_and_day(&records);
        let day_7 = parse_timestamp_ms("2026-12-07T00:00:00.000Z").unwrap();
        let day_8 = day_7 + DAY_MS;
        assert_eq!(counts.get(&("p1".to_string(), day_7)), Some(&2));
        assert_eq!(counts.get(&("p1".to_string(), day_8)), Some(&1));
        assert_eq!(counts.get(&("p2".to_string(), day_7)), Some(&1));
        assert_eq!(counts.get(&(String::new(), 0)), Some(&1));
        assert_eq!(counts.values().sum::<u64>(), 5);
    }
}
