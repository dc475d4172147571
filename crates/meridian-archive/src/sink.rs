//! The archive sink: turns a queue batch into one object per (project, received day).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use std::sync::atomic::{AtomicU64, Ordering};

use meridian_core::ErasureFilter;
use meridian_queue::{BatchEncoder, BatchLimits, DeliveryBatch, Sink, SinkError};
use tracing::{info, warn};

use crate::batch::{ArchiveBatch, without_erased};
use crate::error::ArchiveError;
use crate::layout::object_key;
use crate::spool::{Spool, SpooledObject};
use crate::store::ObjectStore;

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
    /// Where objects for customer buckets wait while those buckets fail (`None`: they block).
    spool: Option<Arc<Spool>>,
    spooled: AtomicU64,
    unspooled: AtomicU64,
    /// Projects whose customer-store lookup failed, and until when they are not asked again.
    failed_lookups: Mutex<HashMap<String, Instant>>,
}

/// The longest one customer-store lookup may take (role assumption, bucket-region check).
pub const CUSTOMER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a failed lookup is remembered (its project's objects are spooled without asking).
pub const FAILED_LOOKUP_MEMORY: Duration = Duration::from_secs(30);

/// One object to write, and where it goes if it is a customer's and the write fails.
struct Put {
    store: Arc<dyn ObjectStore>,
    key: String,
    body: Bytes,
    spool_as: Option<(String, String)>,
}

struct PutFailure {
    refused: bool,
    message: String,
    body: Bytes,
    spool_as: Option<(String, String)>,
}

async fn put_object(put: Put) -> Result<(), PutFailure> {
    let Put {
        store,
        key,
        body,
        spool_as,
    } = put;
    match store.put(&key, body.clone()).await {
        Ok(()) => Ok(()),
        Err(error) => Err(PutFailure {
            refused: matches!(error, ArchiveError::Refused(_)),
            message: format!("{} {key}: {error}", store.describe()),
            body,
            spool_as,
        }),
    }
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
            spool: None,
            spooled: AtomicU64::new(0),
            unspooled: AtomicU64::new(0),
            failed_lookups: Mutex::new(HashMap::new()),
        }
    }

    /// Looks up the customer store of every project of the batch at once, each bounded by
    /// [`CUSTOMER_LOOKUP_TIMEOUT`]; a project whose lookup failed is not asked again for
    /// [`FAILED_LOOKUP_MEMORY`] (its objects go straight to the spool), so one customer's silent
    /// endpoint cannot add its timeout to every batch of the region.
    async fn customer_targets(
        &self,
        encoded: &[(String, i64, Bytes)],
    ) -> HashMap<String, Result<Option<CustomerTarget>, String>> {
        let projects: BTreeSet<&str> = encoded
            .iter()
            .map(|(project_id, _, _)| project_id.as_str())
            .collect();
        let lookups = projects.into_iter().map(|project_id| async move {
            let now = Instant::now();
            let failed_until = self
                .failed_lookups
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(project_id)
                .copied();
            if let Some(until) = failed_until
                && now < until
            {
                return (
                    project_id.to_string(),
                    Err("its customer bucket failed moments ago".to_string()),
                );
            }
            let outcome = tokio::time::timeout(
                CUSTOMER_LOOKUP_TIMEOUT,
                self.resolver.customer_store(project_id),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ArchiveError::Refused(format!(
                    "looking up the customer bucket timed out after {} s",
                    CUSTOMER_LOOKUP_TIMEOUT.as_secs()
                )))
            })
            .map_err(|error| error.to_string());
            let mut failed = self
                .failed_lookups
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match &outcome {
                Err(_) => {
                    failed.insert(
                        project_id.to_string(),
                        Instant::now() + FAILED_LOOKUP_MEMORY,
                    );
                }
                Ok(_) => {
                    failed.remove(project_id);
                }
            }
            (project_id.to_string(), outcome)
        });
        join_all(lookups).await.into_iter().collect()
    }

    /// Lets objects for failing customer buckets wait in `spool` instead of blocking the region.
    pub fn with_spool(mut self, spool: Spool) -> ArchiveSink {
        self.spool = Some(Arc::new(spool));
        self
    }

    /// Removes a delivered (or wholly erased) object from the spool, on a blocking thread. A
    /// failed removal leaves the object to be uploaded again under the same key (harmless: the
    /// key names the batch) and is logged.
    async fn remove_from_spool(&self, spool: &Arc<Spool>, object: SpooledObject) {
        let removing = Arc::clone(spool);
        let key = object.key.clone();
        let removed = tokio::task::spawn_blocking(move || removing.remove(&object)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(region = %self.region, %key, %error, "a delivered spooled object could not be removed; it will be uploaded again")
            }
            Err(error) => {
                warn!(region = %self.region, %key, %error, "removing a spooled object panicked")
            }
        }
    }

    /// Uploads spooled objects whose bucket works again (or, when the project no longer has
    /// customer storage, to the regional store), leaving out messages erased since. Returns how
    /// many objects left the spool. Failures stay spooled for the next round.
    pub async fn drain_spool(&self) -> usize {
        let Some(spool) = self.spool.clone() else {
            return 0;
        };
        let listing_spool = Arc::clone(&spool);
        let objects = match tokio::task::spawn_blocking(move || listing_spool.list()).await {
            Ok(Ok(objects)) => objects,
            Ok(Err(error)) => {
                warn!(region = %self.region, %error, "cannot list the customer spool");
                return 0;
            }
            Err(_) => return 0,
        };
        let mut drained = 0;
        let mut failing_projects = std::collections::HashSet::new();
        for object in objects {
            if failing_projects.contains(&object.project_id) {
                continue;
            }
            let (store, prefix) = match self.resolver.customer_store(&object.project_id).await {
                Ok(Some(target)) => (target.store, target.prefix),
                Ok(None) => (Arc::clone(&self.regional_store), self.config.prefix.clone()),
                Err(_) => {
                    failing_projects.insert(object.project_id.clone());
                    continue;
                }
            };
            let reading_spool = Arc::clone(&spool);
            let reading = object.clone();
            let Ok(Ok(body)) =
                tokio::task::spawn_blocking(move || reading_spool.read(&reading)).await
            else {
                continue;
            };
            let erasures = Arc::clone(&self.erasures);
            let key = object.key.clone();
            let gzip_level = self.config.gzip_level;
            // Spooled objects are whole archive objects: filtering them is work for a blocking
            // thread.
            let filtered = tokio::task::spawn_blocking(move || {
                without_erased(erasures.as_ref(), &key, &body, gzip_level)
            })
            .await
            .unwrap_or_else(|error| {
                Err(ArchiveError::Refused(format!(
                    "filtering a spooled object panicked: {error}"
                )))
            });
            let body = match filtered.map(|filtered| filtered.body) {
                Ok(Some(body)) => body,
                Ok(None) => {
                    // Every message in it was erased meanwhile: nothing to upload.
                    self.remove_from_spool(&spool, object).await;
                    drained += 1;
                    continue;
                }
                Err(error) => {
                    warn!(region = %self.region, key = %object.key, %error, "spooled object unreadable; it stays in the spool");
                    continue;
                }
            };
            let key = match prefix
                .as_deref()
                .map(|prefix| prefix.trim_matches('/'))
                .filter(|prefix| !prefix.is_empty())
            {
                Some(prefix) => format!("{prefix}/{}", object.key),
                None => object.key.clone(),
            };
            match store.put(&key, Bytes::from(body)).await {
                Ok(()) => {
                    self.remove_from_spool(&spool, object).await;
                    self.unspooled.fetch_add(1, Ordering::Relaxed);
                    drained += 1;
                }
                Err(_) => {
                    failing_projects.insert(object.project_id.clone());
                }
            }
        }
        if drained > 0 {
            info!(region = %self.region, objects = drained, "customer spool drained");
        }
        drained
    }

    /// An empty archive batch, folding records as this sink would archive them.
    fn new_batch(&self) -> ArchiveBatch {
        ArchiveBatch::new(
            Arc::clone(&self.erasures),
            Arc::clone(&self.erased_messages),
            self.config.gzip_level,
        )
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
        vec![
            (
                "erased_messages",
                self.erased_messages.load(Ordering::Relaxed),
            ),
            (
                "customer_objects_spooled",
                self.spooled.load(Ordering::Relaxed),
            ),
            (
                "customer_objects_unspooled",
                self.unspooled.load(Ordering::Relaxed),
            ),
        ]
    }

    fn gauges(&self) -> Vec<(&'static str, u64)> {
        match &self.spool {
            Some(spool) => vec![
                ("customer_spool_bytes", spool.used_bytes()),
                ("customer_spool_budget_bytes", spool.budget_bytes()),
            ],
            None => Vec::new(),
        }
    }

    fn batch_encoder(&self) -> Option<Box<dyn BatchEncoder>> {
        Some(Box::new(self.new_batch()))
    }

    async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
        let encoded = match &batch.encoded {
            Some(encoded) => Some(
                Arc::clone(encoded)
                    .into_any()
                    .downcast::<ArchiveBatch>()
                    .map_err(|_| {
                        SinkError::Transient(
                            "the batch was encoded by another sink's encoder".to_string(),
                        )
                    })?,
            ),
            None => None,
        };
        let records = Arc::clone(&batch.records);
        let records_batch = self.new_batch();
        // Encoding (a batch of records) and asking the erasure filter about every user of the
        // batch is CPU work.
        let encoded =
            tokio::task::spawn_blocking(move || -> Result<Vec<(String, i64, Bytes)>, String> {
                let sealed = match encoded {
                    Some(sealed) => sealed,
                    None => {
                        let mut records_batch = records_batch;
                        records_batch
                            .absorb(&records)
                            .map_err(|error| error.to_string())?;
                        records_batch.seal().map_err(|error| error.to_string())?;
                        Arc::new(records_batch)
                    }
                };
                sealed.objects_now().map_err(|error| error.to_string())
            })
            .await
            .map_err(|error| SinkError::Transient(format!("archive encoder panicked: {error}")))?
            .map_err(SinkError::Transient)?;

        let batch_name = batch.name();
        let targets = self.customer_targets(&encoded).await;
        let mut puts = Vec::with_capacity(encoded.len());
        let mut to_spool: Vec<(String, String, Bytes)> = Vec::new();
        for (project_id, day_ms, body) in encoded {
            // Unprefixed: the prefix of the store it finally lands in is applied then.
            let bare_key = object_key(None, &project_id, day_ms, &batch_name);
            let target = targets
                .get(&project_id)
                .cloned()
                .unwrap_or_else(|| Err(format!("no lookup for project {project_id}")));
            match target {
                Ok(Some(target)) => {
                    let key =
                        object_key(target.prefix.as_deref(), &project_id, day_ms, &batch_name);
                    puts.push(Put {
                        store: target.store,
                        key,
                        body,
                        spool_as: Some((project_id, bare_key)),
                    });
                }
                Ok(None) => {
                    let key = object_key(
                        self.config.prefix.as_deref(),
                        &project_id,
                        day_ms,
                        &batch_name,
                    );
                    puts.push(Put {
                        store: Arc::clone(&self.regional_store),
                        key,
                        body,
                        spool_as: None,
                    });
                }
                Err(error) if self.spool.is_some() => {
                    warn!(region = %self.region, project_id, %error, "customer bucket unusable; spooling the project's archive object");
                    to_spool.push((project_id, bare_key, body));
                }
                Err(error) => {
                    return Err(SinkError::Blocked(format!("project {project_id}: {error}")));
                }
            }
        }
        let mut failures: Vec<(bool, String)> = Vec::new();
        let mut remaining = puts.into_iter().peekable();
        while remaining.peek().is_some() {
            let wave: Vec<_> = remaining.by_ref().take(CONCURRENT_PUTS).collect();
            let outcomes = join_all(wave.into_iter().map(put_object)).await;
            for outcome in outcomes {
                match outcome {
                    Ok(()) => {}
                    // A customer's bucket failing never holds the region back: spool its object.
                    Err(PutFailure {
                        spool_as: Some((project_id, bare_key)),
                        body,
                        message,
                        ..
                    }) if self.spool.is_some() => {
                        warn!(region = %self.region, project_id, error = %message, "customer bucket write failed; spooling the object");
                        to_spool.push((project_id, bare_key, body));
                    }
                    Err(failure) => failures.push((failure.refused, failure.message)),
                }
            }
        }
        if let Some(spool) = &self.spool
            && !to_spool.is_empty()
        {
            let spool = Arc::clone(spool);
            let count = to_spool.len() as u64;
            tokio::task::spawn_blocking(move || {
                to_spool
                    .iter()
                    .try_for_each(|(project_id, key, body)| spool.put(project_id, key, body))
            })
            .await
            .map_err(|error| SinkError::Transient(format!("spool writer panicked: {error}")))?
            .map_err(|error| {
                SinkError::Transient(format!("cannot spool customer objects: {error}"))
            })?;
            self.spooled.fetch_add(count, Ordering::Relaxed);
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
    use crate::layout::{decode_object, encode_object};
    use crate::local::LocalDirStore;
    use meridian_queue::{OffsetRange, Record};

    fn record(offset: u64, project: &str, received_at: &str) -> Record {
        Record {
            offset,
            payload: format!(
                r#"{{"projectId":"{project}","receivedAt":"{received_at}","n":{offset}}}"#
            )
            .into_bytes(),
        }
    }

    const SOURCE: &str = "q0123456789abcdef0123456789abcdef";

    /// A sink archiving every project into `store`, leaving out what `erasures` erased.
    fn regional_sink(store: Arc<LocalDirStore>, erasures: Arc<dyn ErasureFilter>) -> ArchiveSink {
        ArchiveSink::new(
            "eu-west-1",
            store,
            Arc::new(NoCustomerStorage),
            ArchiveSinkConfig::default(),
            erasures,
        )
    }

    #[tokio::test]
    async fn writes_one_object_per_project_and_day_and_rewrites_on_redelivery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalDirStore::new(dir.path()));
        let sink = regional_sink(store.clone(), Arc::new(meridian_core::NoErasures));
        let batch = DeliveryBatch::of_records(
            Arc::from(SOURCE),
            OffsetRange { start: 10, end: 14 },
            vec![
                record(10, "p1", "2026-11-24T23:59:59.999Z"),
                record(11, "p2", "2026-11-24T10:00:00.000Z"),
                record(12, "p1", "2026-11-25T00:00:00.000Z"),
                record(13, "p1", "2026-11-24T01:00:00.000Z"),
            ],
        );
        sink.deliver(&batch).await.unwrap();
        sink.deliver(&batch).await.unwrap();
        let keys = store.list("segment-logs/").await.unwrap();
        assert_eq!(
            keys,
            vec![
                format!(
                    "segment-logs/p1/1795478400000/{SOURCE}-00000000000000000010-00000000000000000014.gz"
                ),
                format!(
                    "segment-logs/p1/1795564800000/{SOURCE}-00000000000000000010-00000000000000000014.gz"
                ),
                format!(
                    "segment-logs/p2/1795478400000/{SOURCE}-00000000000000000010-00000000000000000014.gz"
                ),
            ]
        );
        let other_node = DeliveryBatch::of_records(
            Arc::from("q11111111111111111111111111111111"),
            batch.range,
            batch.records.to_vec(),
        );
        sink.deliver(&other_node).await.unwrap();
        assert_eq!(
            store.list("segment-logs/").await.unwrap().len(),
            6,
            "the same offsets from another queue never overwrite an object"
        );
        let body = store.get(&keys[0]).await.unwrap().unwrap();
        let lines = decode_object(&keys[0], &body).unwrap();
        assert_eq!(lines.len(), 2, "offsets 10 and 13, in order");
        assert!(String::from_utf8_lossy(&lines[0]).contains(r#""n":10"#));
        assert!(String::from_utf8_lossy(&lines[1]).contains(r#""n":13"#));
    }

    #[tokio::test]
    async fn a_batch_encoded_as_it_was_read_writes_the_objects_its_records_would() {
        let records = vec![
            record(10, "p1", "2026-11-24T23:59:59.999Z"),
            record(11, "p2", "2026-11-24T10:00:00.000Z"),
            record(12, "p1", "2026-11-25T00:00:00.000Z"),
            record(13, "p1", "2026-11-24T01:00:00.000Z"),
        ];
        let range = OffsetRange { start: 10, end: 14 };
        let mut stores = Vec::new();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for (index, dir) in dirs.iter().enumerate() {
            let store = Arc::new(LocalDirStore::new(dir.path()));
            let sink = regional_sink(store.clone(), Arc::new(meridian_core::NoErasures));
            let batch = if index == 0 {
                DeliveryBatch::of_records(Arc::from(SOURCE), range, records.clone())
            } else {
                let mut encoder = sink
                    .batch_encoder()
                    .expect("the archive encodes as it reads");
                encoder.absorb(&records[..1]).unwrap();
                encoder.absorb(&records[1..]).unwrap();
                encoder.seal().unwrap();
                DeliveryBatch {
                    source: Arc::from(SOURCE),
                    range,
                    records: Arc::new(Vec::new()),
                    encoded: Some(Arc::from(encoder)),
                    payload_bytes: 0,
                }
            };
            sink.deliver(&batch).await.unwrap();
            stores.push(store);
        }
        let keys = stores[0].list("segment-logs/").await.unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(stores[1].list("segment-logs/").await.unwrap(), keys);
        for key in &keys {
            assert_eq!(
                stores[0].get(key).await.unwrap(),
                stores[1].get(key).await.unwrap(),
                "{key}"
            );
        }
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
        let sink = regional_sink(store.clone(), Arc::new(EraseGone));
        let message = |offset: u64, user: &str, received_at: &str| Record {
            offset,
            payload: format!(
                r#"{{"projectId":"p1","userId":"{user}","receivedAt":"{received_at}"}}"#
            )
            .into_bytes(),
        };
        let batch = DeliveryBatch::of_records(
            Arc::from(SOURCE),
            OffsetRange { start: 0, end: 3 },
            vec![
                message(0, "gone", "2026-11-24T10:00:00.000Z"),
                message(1, "kept", "2026-11-24T10:00:00.000Z"),
                message(2, "gone", "2026-11-25T10:00:00.000Z"),
            ],
        );
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
        assert_eq!(sink.counters()[0], ("erased_messages", 1));
    }

    /// Customer buckets for projects `silent-*` (lookups never answer) and `broken` (lookups
    /// fail); every other project archives regionally. Counts the lookups per project.
    struct TroubledCustomers {
        lookups: Mutex<HashMap<String, usize>>,
    }

    #[async_trait]
    impl StoreResolver for TroubledCustomers {
        async fn customer_store(
            &self,
            project_id: &str,
        ) -> Result<Option<CustomerTarget>, ArchiveError> {
            *self
                .lookups
                .lock()
                .unwrap()
                .entry(project_id.to_string())
                .or_default() += 1;
            if project_id.starts_with("silent") {
                std::future::pending::<()>().await;
            }
            if project_id == "broken" {
                return Err(ArchiveError::Refused("the role was revoked".into()));
            }
            Ok(None)
        }
    }

    fn troubled_sink(
        dir: &std::path::Path,
        spool_budget_bytes: u64,
    ) -> (ArchiveSink, Arc<TroubledCustomers>, Arc<LocalDirStore>) {
        let store = Arc::new(LocalDirStore::new(dir.join("regional")));
        let resolver = Arc::new(TroubledCustomers {
            lookups: Mutex::new(HashMap::new()),
        });
        let sink = ArchiveSink::new(
            "eu-west-1",
            store.clone(),
            resolver.clone(),
            ArchiveSinkConfig::default(),
            Arc::new(meridian_core::NoErasures),
        )
        .with_spool(Spool::new(dir.join("spool"), spool_budget_bytes));
        (sink, resolver, store)
    }

    fn batch_of(start: u64, projects: &[&str]) -> DeliveryBatch {
        let records: Vec<Record> = projects
            .iter()
            .enumerate()
            .map(|(index, project)| {
                record(start + index as u64, project, "2026-11-24T10:00:00.000Z")
            })
            .collect();
        DeliveryBatch::of_records(
            Arc::from(SOURCE),
            OffsetRange {
                start,
                end: start + projects.len() as u64,
            },
            records,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn silent_customer_endpoints_are_looked_up_at_once_with_a_timeout_and_then_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, resolver, store) = troubled_sink(dir.path(), 1 << 20);
        let started = Instant::now();
        sink.deliver(&batch_of(0, &["silent-a", "silent-b", "broken", "local"]))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= CUSTOMER_LOOKUP_TIMEOUT && took < 2 * CUSTOMER_LOOKUP_TIMEOUT,
            "the two silent lookups ran side by side, each cut at the timeout: {took:?}"
        );
        assert_eq!(
            store.list("segment-logs/").await.unwrap().len(),
            1,
            "local archived"
        );
        assert_eq!(sink.counters()[1], ("customer_objects_spooled", 3));

        // The next batch does not wait for them again: their objects go straight to the spool.
        let started = Instant::now();
        sink.deliver(&batch_of(4, &["silent-a", "broken", "local"]))
            .await
            .unwrap();
        assert!(
            started.elapsed() < CUSTOMER_LOOKUP_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
        let lookups = resolver.lookups.lock().unwrap().clone();
        assert_eq!(lookups["silent-a"], 1);
        assert_eq!(lookups["broken"], 1);
        assert_eq!(lookups["local"], 2);

        // Once the failure is forgotten they are asked again.
        tokio::time::advance(FAILED_LOOKUP_MEMORY).await;
        sink.deliver(&batch_of(7, &["broken"])).await.unwrap();
        assert_eq!(resolver.lookups.lock().unwrap()["broken"], 2);
    }

    #[tokio::test]
    async fn a_full_spool_keeps_the_batch_queued_instead_of_filling_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (sink, _, store) = troubled_sink(dir.path(), 64);
        let failure = sink
            .deliver(&batch_of(0, &["broken", "local"]))
            .await
            .expect_err("the broken project's object does not fit in the spool");
        assert!(failure.to_string().contains("spool is full"), "{failure}");
        let spooled_bytes = sink.gauges()[0];
        assert_eq!(spooled_bytes, ("customer_spool_bytes", 0));
        assert_eq!(
            store.list("segment-logs/").await.unwrap().len(),
            1,
            "the regional object was written (a retry rewrites it in place)"
        );
    }

    /// Waits (at most 5 s) in `is_erased` until the test's async task has run once filtering
    /// began. Were the filtering done on the runtime's only thread, that task could not run.
    struct NeedsTheRuntime {
        filtering_began: Arc<std::sync::atomic::AtomicBool>,
        runtime_ran: Arc<std::sync::atomic::AtomicBool>,
        saw_the_runtime: std::sync::atomic::AtomicBool,
    }

    impl ErasureFilter for NeedsTheRuntime {
        fn is_erased(&self, _project_id: &str, _user_id: &str, _received_at_ms: i64) -> bool {
            self.filtering_began.store(true, Ordering::SeqCst);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if self.runtime_ran.load(Ordering::SeqCst) {
                    self.saw_the_runtime.store(true, Ordering::SeqCst);
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn spooled_objects_are_filtered_off_the_runtime_thread() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("spool"), 1 << 20);
        let message = br#"{"projectId":"p1","userId":"u","receivedAt":"2026-11-24T10:00:00.000Z"}"#;
        let body = encode_object(std::iter::once(&message[..]), 1).unwrap();
        spool
            .put("p1", "segment-logs/p1/1795478400000/q-1-2.gz", &body)
            .unwrap();
        let filtering_began = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let runtime_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filter = Arc::new(NeedsTheRuntime {
            filtering_began: Arc::clone(&filtering_began),
            runtime_ran: Arc::clone(&runtime_ran),
            saw_the_runtime: std::sync::atomic::AtomicBool::new(false),
        });
        let store = Arc::new(LocalDirStore::new(dir.path().join("regional")));
        let sink = regional_sink(store.clone(), filter.clone()).with_spool(spool);
        let watcher = tokio::spawn(async move {
            while !filtering_began.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
            runtime_ran.store(true, Ordering::SeqCst);
        });
        assert_eq!(sink.drain_spool().await, 1);
        watcher.await.unwrap();
        assert!(
            filter.saw_the_runtime.load(Ordering::SeqCst),
            "the runtime thread was blocked while the spooled object was filtered"
        );
        assert_eq!(store.list("segment-logs/").await.unwrap().len(), 1);
    }
}
