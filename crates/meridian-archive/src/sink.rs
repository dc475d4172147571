//! The archive sink: turns a queue batch into one object per (project, received day).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_core::ErasureFilter;
use meridian_core::timestamp::{now_unix_ms, parse_timestamp_ms, utc_day_start_ms};
use meridian_queue::{BatchLimits, DeliveryBatch, Record, Sink, SinkError};
use tracing::error;

use crate::error::ArchiveError;
use crate::layout::{ArchivedMessage, encode_object, object_key};
use crate::store::ObjectStore;

/// Where a message goes when its routing fields cannot be read (never expected: we wrote it).
const UNROUTABLE_PROJECT: &str = "_unroutable";
const CONCURRENT_PUTS: usize = 8;

#[derive(Clone, Debug)]
pub struct ArchiveSinkConfig {
    /// Flush once this many bytes (uncompressed) are gathered...
    pub flush_max_bytes: usize,
    pub flush_max_records: usize,
    /// ...or once the oldest gathered message waited this long.
    pub flush_interval: Duration,
    pub gzip_level: u32,
    /// Key prefix in the regional store.
    pub prefix: Option<String>,
}

impl Default for ArchiveSinkConfig {
    fn default() -> Self {
        ArchiveSinkConfig {
            flush_max_bytes: 64 * 1024 * 1024,
            flush_max_records: 1_000_000,
            flush_interval: Duration::from_secs(5),
            gzip_level: 3,
            prefix: None,
        }
    }
}

/// A project's own archive: the customer's bucket and key prefix.
#[derive(Clone)]
pub struct CustomerTarget {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Option<String>,
}

/// Finds a project's own bucket, when it has one (Local Data Storage).
#[async_trait]
pub trait StoreResolver: Send + Sync + 'static {
    /// The project's customer-hosted archive, or `None` for the regional store. An error keeps
    /// the batch queued (the customer store is unusable now).
    async fn customer_store(
        &self,
        project_id: &str,
    ) -> Result<Option<CustomerTarget>, ArchiveError>;
}

/// Every project archives to the regional store.
pub struct NoCustomerStorage;

#[async_trait]
impl StoreResolver for NoCustomerStorage {
    async fn customer_store(
        &self,
        _project_id: &str,
    ) -> Result<Option<CustomerTarget>, ArchiveError> {
        Ok(None)
    }
}

pub struct ArchiveSink {
    region: String,
    regional_store: Arc<dyn ObjectStore>,
    resolver: Arc<dyn StoreResolver>,
    config: ArchiveSinkConfig,
    erasures: Arc<dyn ErasureFilter>,
    erased_messages: Arc<AtomicU64>,
}

/// The records of one (project, day) group, by index into the batch.
type Groups = BTreeMap<(String, i64), Vec<usize>>;

/// Groups records by (project, received day), leaving out messages a GDPR deletion erased.
/// Returns the groups and how many messages were left out.
fn group_records(records: &[Record], erasures: &dyn ErasureFilter) -> (Groups, u64) {
    let mut groups: Groups = BTreeMap::new();
    let mut erased = 0;
    for (index, record) in records.iter().enumerate() {
        let key = match serde_json::from_slice::<ArchivedMessage<'_>>(&record.payload) {
            Ok(message) => {
                let received_at_ms = parse_timestamp_ms(&message.received_at).unwrap_or(0);
                if let Some(user_id) = &message.user_id
                    && erasures.is_erased(&message.project_id, user_id, received_at_ms)
                {
                    erased += 1;
                    continue;
                }
                let day_ms = message.received_day_ms();
                (message.project_id.into_owned(), day_ms)
            }
            Err(parse_error) => {
                error!(offset = record.offset, error = %parse_error, "queued message lacks projectId/receivedAt; archiving it under {UNROUTABLE_PROJECT}");
                (
                    UNROUTABLE_PROJECT.to_string(),
                    utc_day_start_ms(now_unix_ms()),
                )
            }
        };
        groups.entry(key).or_default().push(index);
    }
    (groups, erased)
}

async fn put_object(
    (store, key, body): (Arc<dyn ObjectStore>, String, Bytes),
) -> Result<(), (bool, String)> {
    store.put(&key, body).await.map_err(|error| {
        let refused = matches!(error, ArchiveError::Refused(_));
        (refused, format!("{} {key}: {error}", store.describe()))
    })
}

impl ArchiveSink {
    pub fn new(
        region: &str,
        regional_store: Arc<dyn ObjectStore>,
        resolver: Arc<dyn StoreResolver>,
        config: ArchiveSinkConfig,
        erasures: Arc<dyn ErasureFilter>,
    ) -> ArchiveSink {
        ArchiveSink {
            region: region.to_string(),
            regional_store,
            resolver,
            config,
            erasures,
            erased_messages: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn regional_store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.regional_store)
    }
}

#[async_trait]
impl Sink for ArchiveSink {
    fn name(&self) -> &str {
        "archive"
    }

    fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_records: self.config.flush_max_records,
            max_bytes: self.config.flush_max_bytes,
            max_age: self.config.flush_interval,
        }
    }

    fn health(&self) -> Option<String> {
        self.regional_store.health()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![(
            "erased_messages",
            self.erased_messages.load(Ordering::Relaxed),
        )]
    }

    async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
        let records = Arc::clone(&batch.records);
        let level = self.config.gzip_level;
        let erasures = Arc::clone(&self.erasures);
        let erased_counter = Arc::clone(&self.erased_messages);
        let encoded = tokio::task::spawn_blocking(
            move || -> Result<Vec<(String, i64, Vec<u8>)>, std::io::Error> {
                let (groups, erased) = group_records(&records, erasures.as_ref());
                erased_counter.fetch_add(erased, Ordering::Relaxed);
                let mut objects = Vec::with_capacity(groups.len());
                for ((project_id, day_ms), indexes) in groups {
                    let messages = indexes
                        .iter()
                        .map(|index| records[*index].payload.as_slice());
                    objects.push((project_id, day_ms, encode_object(messages, level)?));
                }
                Ok(objects)
            },
        )
        .await
        .map_err(|error| SinkError::Transient(format!("archive encoder panicked: {error}")))?
        .map_err(|error| SinkError::Transient(format!("gzip encoding failed: {error}")))?;

        let range = batch.range;
        let mut puts = Vec::with_capacity(encoded.len());
        for (project_id, day_ms, body) in encoded {
            let customer = self
                .resolver
                .customer_store(&project_id)
                .await
                .map_err(|error| SinkError::Blocked(format!("project {project_id}: {error}")))?;
            let (store, prefix) = match customer {
                Some(target) => (target.store, target.prefix),
                None => (Arc::clone(&self.regional_store), self.config.prefix.clone()),
            };
            let key = object_key(
                prefix.as_deref(),
                &project_id,
                day_ms,
                range.start,
                range.end,
            );
            puts.push((store, key, Bytes::from(body)));
        }
        let mut failures: Vec<(bool, String)> = Vec::new();
        let mut remaining = puts.into_iter().peekable();
        while remaining.peek().is_some() {
            let wave: Vec<_> = remaining.by_ref().take(CONCURRENT_PUTS).collect();
            let outcomes = join_all(wave.into_iter().map(put_object)).await;
            failures.extend(outcomes.into_iter().filter_map(Result::err));
        }
        if let Some((_, first)) = failures.first() {
            let message = format!(
                "region {}: {} of the batch's archive objects failed, first: {first}",
                self.region,
                failures.len()
            );
            // A refusal (residency guard) needs an operator; anything else is retried sooner.
            let refused = failures.iter().any(|(refused, _)| *refused);
            return Err(if refused {
                SinkError::Blocked(message)
            } else {
                SinkError::Transient(message)
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::decode_object;
    use crate::local::LocalDirStore;
    use meridian_queue::OffsetRange;

    fn record(offset: u64, project: &str, received_at: &str) -> Record {
        Record {
            offset,
            payload: format!(
                r#"{{"projectId":"{project}","receivedAt":"{received_at}","n":{offset}}}"#
            )
            .into_bytes(),
        }
    }

    #[tokio::test]
    async fn writes_one_object_per_project_and_day_and_rewrites_on_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalDirStore::new(dir.path()));
        let sink = ArchiveSink::new(
            "eu-west-1",
            store.clone(),
            Arc::new(NoCustomerStorage),
            ArchiveSinkConfig::default(),
            Arc::new(meridian_core::NoErasures),
        );
        let batch = DeliveryBatch {
            range: OffsetRange { start: 10, end: 14 },
            records: Arc::new(vec![
                record(10, "p1", "2026-11-24T23:59:59.999Z"),
                record(11, "p2", "2026-11-24T10:00:00.000Z"),
                record(12, "p1", "2026-11-25T00:00:00.000Z"),
                record(13, "p1", "2026-11-24T01:00:00.000Z"),
            ]),
        };
        sink.deliver(&batch).await.unwrap();
        sink.deliver(&batch).await.unwrap();
        let keys = store.list("segment-logs/").await.unwrap();
        assert_eq!(
            keys,
            vec![
                "segment-logs/p1/1795478400000/00000000000000000010-00000000000000000014.gz",
                "segment-logs/p1/1795564800000/00000000000000000010-00000000000000000014.gz",
                "segment-logs/p2/1795478400000/00000000000000000010-00000000000000000014.gz",
            ]
        );
        let body = store.get(&keys[0]).await.unwrap().unwrap();
        let lines = decode_object(&keys[0], &body).unwrap();
        assert_eq!(lines.len(), 2, "offsets 10 and 13, in order");
        assert!(String::from_utf8_lossy(&lines[0]).contains(r#""n":10"#));
        assert!(String::from_utf8_lossy(&lines[1]).contains(r#""n":13"#));
    }

    /// Erases user "gone" of project p1 for messages received up to the end of 2026-11-24.
    struct EraseGone;

    impl ErasureFilter for EraseGone {
        fn is_erased(&self, project_id: &str, user_id: &str, received_at_ms: i64) -> bool {
            project_id == "p1" && user_id == "gone" && received_at_ms <= 1_795_564_799_999
        }
    }

    #[tokio::test]
    async fn erased_users_messages_are_left_out_of_archive_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalDirStore::new(dir.path()));
        let sink = ArchiveSink::new(
            "eu-west-1",
            store.clone(),
            Arc::new(NoCustomerStorage),
            ArchiveSinkConfig::default(),
            Arc::new(EraseGone),
        );
        let message = |offset: u64, user: &str, received_at: &str| Record {
            offset,
            payload: format!(
                r#"{{"projectId":"p1","userId":"{user}","receivedAt":"{received_at}"}}"#
            )
            .into_bytes(),
        };
        let batch = DeliveryBatch {
            range: OffsetRange { start: 0, end: 3 },
            records: Arc::new(vec![
                message(0, "gone", "2026-11-24T10:00:00.000Z"),
                message(1, "kept", "2026-11-24T10:00:00.000Z"),
                message(2, "gone", "2026-11-25T10:00:00.000Z"),
            ]),
        };
        sink.deliver(&batch).await.unwrap();
        let mut lines = Vec::new();
        for key in store.list("segment-logs/").await.unwrap() {
            lines.extend(decode_object(&key, &store.get(&key).await.unwrap().unwrap()).unwrap());
        }
        let users: Vec<String> = lines
            .iter()
            .map(|line| {
                serde_json::from_slice::<serde_json::Value>(line).unwrap()["userId"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(users.len(), 2);
        assert!(users.contains(&"kept".to_string()));
        assert!(
            users.contains(&"gone".to_string()),
            "a message received after the deletion is kept"
        );
        assert_eq!(sink.counters(), vec![("erased_messages", 1)]);
    }
}
