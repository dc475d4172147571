//! Replays: archived messages re-inserted into the region's warehouse, each only if the warehouse
//! does not already have it, so a replay over intact data changes no count (raw or `FINAL`) and a
//! replay resumed after a crash inserts nothing twice. A replayed message gets the timestamp its
//! message is stored with (see `identity`), and is looked for in `events` on that day: a lookup
//! by the primary key, however long the project's history.

use std::collections::HashSet;
use std::sync::Arc;

use meridian_queue::{Record, SinkError};

use super::{ClickHouseSink, Rows, build_rows, exception_code};
use crate::schema;

/// What one replayed object did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub read: u64,
    pub inserted: u64,
    pub present: u64,
    pub erased: u64,
    /// Messages ClickHouse refused for their data, or that are not readable events (they stay in
    /// the archive; a replay dead-letters nothing).
    pub refused: u64,
}

/// How many message ids one existence query names.
const IDS_PER_QUERY: usize = 500;

impl ClickHouseSink {
    /// Inserts the messages of one archive object of `project_id` that the warehouse does not
    /// have, leaving out users deleted since. `source` names the object (it makes the insert dedup
    /// tokens, so an insert retried by a resumed replay is dropped by a current server).
    pub async fn replay_messages(
        &self,
        source: &str,
        project_id: &str,
        messages: Vec<Vec<u8>>,
    ) -> Result<ReplayOutcome, SinkError> {
        if self.replicas.is_empty() {
            return Err(SinkError::Blocked(format!(
                "region {} has no ClickHouse urls",
                self.region
            )));
        }
        let flavor = self.ensure_schema().await?;
        let read = messages.len() as u64;
        let records: Arc<Vec<Record>> = Arc::new(
            messages
                .into_iter()
                .enumerate()
                .map(|(index, payload)| Record {
                    offset: index as u64,
                    payload,
                })
                .collect(),
        );
        let erasures = Arc::clone(&self.erasures);
        let (mut rows, erased, dead) = tokio::task::spawn_blocking(move || {
            let mut dead = Vec::new();
            let (rows, erased) = build_rows(&records, flavor, erasures.as_ref(), &mut dead);
            (rows, erased, dead)
        })
        .await
        .map_err(|error| SinkError::Transient(format!("row builder panicked: {error}")))?;
        let known = self.known_timestamps(&rows).await?;
        let records = rows.give_stored_timestamps(&known);
        let candidates = rows.identities_and_days();
        let candidate_count = candidates.len() as u64;
        let present_ids = self.stored_message_ids(project_id, &candidates).await?;
        let is_missing = |project: &str, message_id: &str| {
            project == project_id && !present_ids.contains(message_id)
        };
        let missing = match rows {
            Rows::Legacy(rows) => Rows::Legacy(
                rows.into_iter()
                    .filter(|(_, row)| is_missing(&row.project_id, &row.message_id))
                    .collect(),
            ),
            Rows::Modern(rows) => Rows::Modern(
                rows.into_iter()
                    .filter(|(_, row)| is_missing(&row.project_id, &row.message_id))
                    .collect(),
            ),
        };
        let inserted = match &missing {
            Rows::Legacy(rows) => rows.len() as u64,
            Rows::Modern(rows) => rows.len() as u64,
        };
        let present = candidate_count - inserted;
        let mut refused_rows = Vec::new();
        if inserted > 0 {
            self.store(source, &missing, flavor, &mut refused_rows)
                .await?;
        }
        refused_rows.sort_by_key(|(offset, _)| *offset);
        let stored_records: Vec<_> = records
            .into_iter()
            .filter(|(offset, record)| {
                record.project_id == project_id
                    && refused_rows
                        .binary_search_by_key(offset, |(refused, _)| *refused)
                        .is_err()
            })
            .map(|(_, record)| record)
            .collect();
        self.record_message_ids(&stored_records).await?;
        let refused = (dead.len() + refused_rows.len()) as u64;
        debug_assert_eq!(read, inserted + present + erased + dead.len() as u64);
        Ok(ReplayOutcome {
            read,
            inserted: inserted - refused_rows.len() as u64,
            present,
            erased,
            refused,
        })
    }

    /// Which of the messages (id and stored day) of the project any replica of the region
    /// stores: looked for on their day, by the events table's primary key.
    async fn stored_message_ids(
        &self,
        project_id: &str,
        candidates: &[(String, String, String)],
    ) -> Result<HashSet<String>, SinkError> {
        let database = schema::quote_identifier(&self.config.database);
        let of_project: Vec<&(String, String, String)> = candidates
            .iter()
            .filter(|(project, _, _)| project == project_id)
            .collect();
        let mut present = HashSet::new();
        for replica in &self.replicas {
            for chunk in of_project.chunks(IDS_PER_QUERY) {
                let days: std::collections::BTreeSet<&str> =
                    chunk.iter().map(|(_, _, day)| day.as_str()).collect();
                let sql = format!(
                    "SELECT DISTINCT message_id FROM {database}.events WHERE project_id = ? \
                     AND toDate(timestamp) IN ({}) AND message_id IN ({})",
                    vec!["toDate(?)"; days.len()].join(", "),
                    vec!["?"; chunk.len()].join(", ")
                );
                let query = replica.admin.query(&sql).bind(project_id);
                let query = days.iter().fold(query, |query, day| query.bind(*day));
                let query = chunk
                    .iter()
                    .fold(query, |query, (_, id, _)| query.bind(id.as_str()));
                match self.with_timeout(query.fetch_all::<String>()).await {
                    Ok(found) => present.extend(found),
                    // No table on this replica yet: it holds none of them.
                    Err(clickhouse::error::Error::BadResponse(message))
                        if matches!(exception_code(&message), Some(60) | Some(81)) => {}
                    Err(error) => {
                        return Err(SinkError::Transient(format!(
                            "{}: looking up stored messages failed: {error}",
                            replica.url
                        )));
                    }
                }
            }
        }
        Ok(present)
    }
}
