//! One sorting key for every copy of a message (see `crate::schema`). Before a batch is inserted,
//! each row gets the timestamp its message was first stored with, read from `message_ids`; after
//! the insert, the messages the warehouse did not know are recorded there. The record follows
//! the rows it names, so a `message_ids` row means its message's row was stored: a crash in
//! between leaves the message unrecorded, and its redelivery (the same bytes, so the same
//! timestamp) records it.
//!
//! The window is the warehouse's whole history: a retry a minute or a year later gets the first
//! copy's timestamp. What it cannot see: two copies of one message delivered at the same moment by
//! two different queues (two nodes of a region on the local backend, each holding one copy) both
//! find no record; if their timestamps also fall on different days, both rows stay. On the
//! replicated backend every copy of a message is in one partition, read by one runner at a time,
//! so this cannot happen there (ARCHITECTURE.md).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use clickhouse::Row;
use meridian_core::timestamp::format_rfc3339_ms;
use meridian_queue::SinkError;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{ClickHouseSink, InsertFailure, Rows, classify};
use crate::row::EventRow;
use crate::schema;

/// How many message ids one lookup names (its text stays far below `max_query_size`).
const IDS_PER_LOOKUP: usize = 1_000;

/// One row of `message_ids`.
#[derive(Clone, Debug, PartialEq, Eq, Row, Serialize)]
pub struct MessageIdRow {
    pub project_id: String,
    pub message_id: String,
    pub timestamp_ms: i64,
    pub received_at_ms: i64,
    /// `MAX - received_at_ms`: the copy received first wins a merge.
    pub first_seen: u64,
}

impl MessageIdRow {
    fn of(row: &impl EventRow) -> MessageIdRow {
        let received_at_ms = row.received_at_ms();
        MessageIdRow {
            project_id: row.project_id().to_string(),
            message_id: row.message_id().to_string(),
            timestamp_ms: row.timestamp_ms(),
            received_at_ms,
            first_seen: !(received_at_ms.max(0) as u64),
        }
    }
}

#[derive(Debug, Row, Deserialize)]
struct KnownTimestamp {
    message_id: String,
    timestamp_ms: i64,
}

/// (project id, message id) -> the timestamp (ms) the message's row was stored with.
pub(crate) type KnownTimestamps = HashMap<(String, String), i64>;

/// Gives every row the timestamp its message is stored with: the known one, else that of the
/// batch's first copy. Returns the record of each message not known before (one per message,
/// with the queue offset of the copy that made it).
pub(crate) fn give_stored_timestamps<R: EventRow>(
    rows: &mut [(u64, R)],
    known: &KnownTimestamps,
) -> Vec<(u64, MessageIdRow)> {
    let mut first_in_batch: HashMap<(String, String), i64> = HashMap::new();
    let mut records = Vec::new();
    for (offset, row) in rows.iter_mut() {
        let identity = (row.project_id().to_string(), row.message_id().to_string());
        if let Some(&stored_ms) = known.get(&identity) {
            row.set_timestamp_ms(stored_ms);
            continue;
        }
        match first_in_batch.entry(identity) {
            Entry::Occupied(first) => row.set_timestamp_ms(*first.get()),
            Entry::Vacant(first) => {
                first.insert(row.timestamp_ms());
                records.push((*offset, MessageIdRow::of(row)));
            }
        }
    }
    records
}

impl Rows {
    /// The message ids of the rows, by project.
    fn ids_by_project(&self) -> HashMap<String, Vec<String>> {
        fn collect<R: EventRow>(rows: &[(u64, R)]) -> HashMap<String, Vec<String>> {
            let mut by_project: HashMap<String, Vec<String>> = HashMap::new();
            for (_, row) in rows {
                by_project
                    .entry(row.project_id().to_string())
                    .or_default()
                    .push(row.message_id().to_string());
            }
            for ids in by_project.values_mut() {
                ids.sort_unstable();
                ids.dedup();
            }
            by_project
        }
        match self {
            Rows::Legacy(rows) => collect(rows),
            Rows::Modern(rows) => collect(rows),
        }
    }

    /// Each row's project, message id and the UTC day (`YYYY-MM-DD`) of its timestamp.
    pub(super) fn identities_and_days(&self) -> Vec<(String, String, String)> {
        fn collect<R: EventRow>(rows: &[(u64, R)]) -> Vec<(String, String, String)> {
            rows.iter()
                .map(|(_, row)| {
                    let time = format_rfc3339_ms(row.timestamp_ms());
                    (
                        row.project_id().to_string(),
                        row.message_id().to_string(),
                        time.get(..10).unwrap_or("1970-01-01").to_string(),
                    )
                })
                .collect()
        }
        match self {
            Rows::Legacy(rows) => collect(rows),
            Rows::Modern(rows) => collect(rows),
        }
    }

    /// [`give_stored_timestamps`] for rows of either flavor.
    pub(super) fn give_stored_timestamps(
        &mut self,
        known: &KnownTimestamps,
    ) -> Vec<(u64, MessageIdRow)> {
        match self {
            Rows::Legacy(rows) => give_stored_timestamps(rows, known),
            Rows::Modern(rows) => give_stored_timestamps(rows, known),
        }
    }
}

impl ClickHouseSink {
    /// The stored timestamps of the messages of `rows` the warehouse already holds, read from
    /// the current replica (failing over within the region like inserts).
    pub(super) async fn known_timestamps(&self, rows: &Rows) -> Result<KnownTimestamps, SinkError> {
        let mut known = KnownTimestamps::new();
        for (project_id, ids) in rows.ids_by_project() {
            for chunk in ids.chunks(IDS_PER_LOOKUP) {
                for found in self.look_up_with_failover(&project_id, chunk).await? {
                    known.insert((project_id.clone(), found.message_id), found.timestamp_ms);
                }
            }
        }
        Ok(known)
    }

    async fn look_up_with_failover(
        &self,
        project_id: &str,
        message_ids: &[String],
    ) -> Result<Vec<KnownTimestamp>, SinkError> {
        let sql = format!(
            "SELECT message_id, argMax(timestamp_ms, first_seen) AS timestamp_ms FROM {}.{} \
             WHERE project_id = ? AND message_id IN ({}) GROUP BY message_id",
            schema::quote_identifier(&self.config.database),
            schema::quote_identifier(schema::MESSAGE_IDS_TABLE),
            vec!["?"; message_ids.len()].join(", ")
        );
        self.on_current_replica("looking up stored message ids", |replica| {
            let query = message_ids
                .iter()
                .fold(replica.admin.query(&sql).bind(project_id), |query, id| {
                    query.bind(id.as_str())
                });
            self.with_timeout(query.fetch_all::<KnownTimestamp>())
        })
        .await
    }

    /// Records the messages a batch stored for the first time (after their rows are stored).
    pub(super) async fn record_message_ids(
        &self,
        records: &[MessageIdRow],
    ) -> Result<(), SinkError> {
        if records.is_empty() {
            return Ok(());
        }
        self.on_current_replica("recording stored message ids", |replica| {
            self.insert_message_ids(replica, records)
        })
        .await
    }

    /// Runs one step on `message_ids` on the current replica, failing over to the next while
    /// replicas are unreachable; any other failure ends the attempt (the batch is delivered
    /// again), a missing table after the schema is prepared again.
    async fn on_current_replica<'s, T, Step, Work>(
        &'s self,
        what: &str,
        mut step: Step,
    ) -> Result<T, SinkError>
    where
        Step: FnMut(&'s super::Replica) -> Work,
        Work: std::future::Future<Output = Result<T, clickhouse::error::Error>>,
    {
        let mut unreachable = Vec::new();
        for _ in 0..self.replicas.len() {
            let index = self
                .current_replica
                .load(std::sync::atomic::Ordering::Relaxed)
                % self.replicas.len();
            let replica = &self.replicas[index];
            match step(replica).await.map_err(classify) {
                Ok(value) => return Ok(value),
                Err(InsertFailure::Unreachable(reason)) => {
                    self.fail_over_from(index, &reason);
                    unreachable.push(format!("{}: {reason}", replica.url));
                }
                Err(InsertFailure::Schema(reason)) => {
                    *self.flavor.lock().await = None;
                    return Err(SinkError::Transient(format!(
                        "{}: message_ids is missing ({reason}); preparing the schema again",
                        replica.url
                    )));
                }
                Err(InsertFailure::Data(reason)) | Err(InsertFailure::Transient(reason)) => {
                    warn!(region = %self.region, url = %replica.url, %reason, "{what} failed; the batch is delivered again");
                    return Err(SinkError::Transient(format!(
                        "{}: {what} failed: {reason}",
                        replica.url
                    )));
                }
            }
        }
        Err(SinkError::Transient(format!(
            "every ClickHouse replica of region {} is unreachable: {}",
            self.region,
            unreachable.join("; ")
        )))
    }

    async fn insert_message_ids(
        &self,
        replica: &super::Replica,
        records: &[MessageIdRow],
    ) -> Result<(), clickhouse::error::Error> {
        let timeout = Some(self.config.request_timeout);
        let mut insert = replica
            .writer
            .insert::<MessageIdRow>(schema::MESSAGE_IDS_TABLE)
            .await?
            .with_timeouts(timeout, timeout);
        for record in records {
            insert.write(record).await?;
        }
        insert.end().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::{EventFields, LegacyEventRow};

    fn row(message_id: &str, timestamp_ms: i64, received_at_ms: i64) -> LegacyEventRow {
        let stored = serde_json::json!({
            "type": "track", "projectId": "p1", "messageId": message_id,
            "timestamp": meridian_core::timestamp::format_rfc3339_ms(timestamp_ms),
            "receivedAt": meridian_core::timestamp::format_rfc3339_ms(received_at_ms),
        });
        LegacyEventRow::from_fields(
            EventFields::from_stored(stored.to_string().as_bytes(), 0).unwrap(),
        )
    }

    const DAY_MS: i64 = 86_400_000;

    #[test]
    fn every_copy_gets_the_timestamp_of_the_stored_one() {
        let mut rows = vec![
            (1, row("known", 10 * DAY_MS + 5, 10 * DAY_MS + 9)),
            (2, row("new", 3 * DAY_MS - 1, 3 * DAY_MS)),
            (3, row("new", 3 * DAY_MS + 1, 3 * DAY_MS + 2)),
            (4, row("other", 7 * DAY_MS, 7 * DAY_MS)),
        ];
        let known: KnownTimestamps = [(("p1".to_string(), "known".to_string()), 2 * DAY_MS)].into();
        let records = give_stored_timestamps(&mut rows, &known);
        let stored: Vec<(&str, i64, u32)> = rows
            .iter()
            .map(|(_, row)| (row.message_id.as_str(), row.timestamp_ms, row.timestamp))
            .collect();
        assert_eq!(
            stored,
            vec![
                ("known", 2 * DAY_MS, (2 * DAY_MS / 1000) as u32),
                ("new", 3 * DAY_MS - 1, ((3 * DAY_MS - 1) / 1000) as u32),
                ("new", 3 * DAY_MS - 1, ((3 * DAY_MS - 1) / 1000) as u32),
                ("other", 7 * DAY_MS, (7 * DAY_MS / 1000) as u32),
            ],
            "the retry on the next day takes the first copy's day"
        );
        let recorded: Vec<(u64, &str, i64)> = records
            .iter()
            .map(|(offset, record)| (*offset, record.message_id.as_str(), record.timestamp_ms))
            .collect();
        assert_eq!(
            recorded,
            vec![(2, "new", 3 * DAY_MS - 1), (4, "other", 7 * DAY_MS)],
            "known messages are not recorded again; a message is recorded once"
        );
        assert!(
            records[0].1.first_seen > records[1].1.first_seen,
            "the copy received first wins a merge"
        );
    }
}
