//! The replicated backend: a region's queue on that region's NATS JetStream cluster.
//!
//! ```text
//! stream  <stream>-p<N>            subject <stream>.p<N>, file storage, `replicas`
//!                                  copies, discard new at the byte limit, a duplicate window
//! KV      <stream>-cursors         key <sink>.p<N>: {"next_offset", "in_flight", "owner", "beat"}
//! ```
//!
//! A region's data is spread over `partitions` streams; a message goes to one by a stable hash of
//! its identity (project and messageId), so a client's retry lands in the same stream and the
//! stream's duplicate window (`Nats-Msg-Id`, derived from the identity) stores it once.
//!
//! **Append** publishes every record of the batch (pipelined: all sent, then every ack awaited)
//! and returns only when each one is acknowledged by its stream, i.e. stored by a quorum of the
//! stream's replicas. Any failure or timeout fails the whole append (the caller answers 503; the
//! client's retry of the records already stored is deduplicated).
//!
//! **Delivery**: positions are stream sequences; every partition is one [`DeliveryLog`]. A sink's
//! cursor is a KV entry written with compare-and-set on its revision. The entry also names its
//! owner: one node at a time delivers a given partition to a given sink. The owner renews the
//! entry (a heartbeat) every third of the lease; a node that sees the same revision for a whole
//! lease takes the entry over (revisions, not clocks: no clock skew matters). Every cursor change
//! is a compare-and-set, so a node that lost the entry learns it at its next change and stops.
//! Exactly-once does not rest on the lease: a batch's range is persisted as in flight before the
//! sink sees it and is redelivered exactly by whoever owns the cursor next, and sinks write a
//! range idempotently (archive object names and ClickHouse dedup tokens come from the range), so
//! even two nodes delivering the same range write the same objects.
//!
//! Records are read by sequence through an ephemeral pull consumer (no acks): the cursor in KV,
//! not a consumer's ack state, is the position, because a range must be redelivered exactly and a
//! durable consumer redelivers unacknowledged messages one by one, interleaved with new ones.
//! Delivered data is purged: a monitor purges each stream below the slowest cursor in it, of
//! every sink that has one (run by this node or not), and only once each sink this node runs has
//! one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::join_all;
use tokio::sync::watch;
use tracing::{info, warn};

mod cursor;
mod partition;
mod read;

pub use partition::Partition;
use partition::PartitionFigures;

pub use read::project_record_counts;

use crate::backend::{BackendSample, DeliveryLog, QueueBackend};
use crate::encryption::QueueEncryption;
use crate::error::QueueError;
use crate::queue::{QueueStats, RecordBatch, pending_below};

/// How often the monitor reads each stream's state (end, bytes, quorum).
const MONITOR_INTERVAL: Duration = Duration::from_millis(500);
/// Every this many monitor rounds, cursors are read and delivered data is purged.
const PURGE_EVERY_ROUNDS: u64 = 10;
/// Messages fetched per request when reading.
const FETCH_MAX_MESSAGES: usize = 1_000;

/// A region's JetStream settings, resolved from `[regions.<id>.queue.jetstream]`.
#[derive(Clone)]
pub struct JetStreamSettings {
    pub region: String,
    /// This region's NATS servers; no other region's are ever given to this queue.
    pub urls: Vec<String>,
    /// Streams are `<stream>-p<N>`; the cursor bucket is `<stream>-cursors`.
    pub stream: String,
    pub replicas: usize,
    pub partitions: u32,
    /// Bytes each stream may hold (the region's disk budget split over its partitions).
    pub max_bytes_per_partition: i64,
    pub duplicate_window: Duration,
    /// How long a node's right to deliver a partition to a sink lasts without renewal.
    pub lease: Duration,
    /// Every request to the cluster (publish acks, stream and KV calls) is bounded by this.
    pub request_timeout: Duration,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user_and_password: Option<(String, String)>,
    pub root_certificates: Option<PathBuf>,
    pub require_tls: bool,
    /// Names this node as a cursor's owner.
    pub node_id: String,
    /// The sinks this node runs: purging waits until each has a cursor.
    pub sinks: Vec<String>,
    pub encryption: Option<Arc<QueueEncryption>>,
}

impl JetStreamSettings {
    pub fn stream_name(&self, partition: u32) -> String {
        format!("{}-p{partition}", self.stream)
    }

    /// Named after the stream (so that several deployments, or tests, can share a cluster).
    pub fn subject(&self, partition: u32) -> String {
        format!("{}.p{partition}", self.stream)
    }

    pub fn cursor_bucket(&self) -> String {
        format!("{}-cursors", self.stream)
    }
}

/// Whether `url` is a NATS server address the client accepts (`nats://host:4222`, `tls://...`).
pub fn is_nats_url(url: &str) -> bool {
    url.parse::<async_nats::ServerAddr>().is_ok()
}

/// The partition a message of this identity goes to: stable across nodes, versions and restarts.
pub fn partition_of(identity: &str, partitions: u32) -> u32 {
    crc32fast::hash(identity.as_bytes()) % partitions.max(1)
}

/// The `Nats-Msg-Id` of a message: a fixed-length digest of its identity (any messageId a client
/// sends becomes a valid header value).
fn message_id(identity: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, identity.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> QueueError {
    QueueError::Unavailable(format!("{what}: {error}"))
}

/// Bounds one request to the cluster.
async fn bounded<T, E: std::fmt::Display>(
    timeout: Duration,
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(unavailable(what, error)),
        Err(_) => Err(QueueError::Unavailable(format!(
            "{what}: no answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// Figures of the publish path, for `/metrics`.
#[derive(Debug, Default)]
pub struct PublishFigures {
    pub acked: AtomicU64,
    pub duplicates: AtomicU64,
    pub failed_appends: AtomicU64,
    pub appends: AtomicU64,
    /// Sum of append latencies (publish of every record until its last ack), in microseconds.
    pub append_micros: AtomicU64,
}

/// A region's queue on its JetStream cluster. Cheap to clone.
#[derive(Clone)]
pub struct JetStreamQueue {
    shared: Arc<Shared>,
}

struct Shared {
    settings: Arc<JetStreamSettings>,
    context: jetstream::Context,
    partitions: Vec<Arc<Partition>>,
    max_payload: usize,
    /// False while a stream cannot be read (no quorum, cluster unreachable).
    writable: AtomicBool,
    problem: Mutex<Option<String>>,
    closed: AtomicBool,
    publish: PublishFigures,
}

impl Shared {
    fn set_problem(&self, problem: Option<String>) {
        *self
            .problem
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = problem;
    }

    fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl JetStreamQueue {
    /// Connects to the region's cluster, creates or updates its streams and cursor bucket, and
    /// starts the monitor. Fails (clearly) when the cluster cannot take them, e.g. fewer servers
    /// than replicas.
    pub async fn open(settings: JetStreamSettings) -> Result<JetStreamQueue, QueueError> {
        let settings = Arc::new(settings);
        let timeout = settings.request_timeout;
        let client = connect(&settings).await?;
        let max_payload = client.server_info().max_payload;
        let context = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .ack_timeout(timeout)
            .build(client);
        let cursors = bounded(
            timeout,
            "creating the cursor bucket",
            context.create_or_update_key_value(kv::Config {
                bucket: settings.cursor_bucket(),
                description: format!("Meridian sink cursors of region {}", settings.region),
                history: 1,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            }),
        )
        .await?;
        let mut partitions = Vec::with_capacity(settings.partitions as usize);
        for index in 0..settings.partitions.max(1) {
            let stream_name = settings.stream_name(index);
            let subject = settings.subject(index);
            let info = bounded(
                timeout,
                "creating the stream",
                context.create_or_update_stream(stream::Config {
                    name: stream_name.clone(),
                    description: Some(format!(
                        "Meridian queue of region {}, partition {index}",
                        settings.region
                    )),
                    subjects: vec![subject.clone()],
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    max_bytes: settings.max_bytes_per_partition,
                    discard: stream::DiscardPolicy::New,
                    duplicate_window: settings.duplicate_window,
                    allow_direct: true,
                    ..Default::default()
                }),
            )
            .await?;
            // Positions are only unique within one life of a stream: a stream deleted and made
            // again restarts its sequences, so its creation time is part of its name.
            let created_ms = info.created.unix_timestamp_nanos() / 1_000_000;
            let source: Arc<str> = Arc::from(format!("js-{stream_name}-{created_ms}"));
            info!(region = %settings.region, stream = %stream_name, replicas = settings.replicas, messages = info.state.messages, last_sequence = info.state.last_sequence, source = %source, "JetStream stream ready");
            let (end, _) = watch::channel(info.state.last_sequence + 1);
            partitions.push(Arc::new(Partition {
                index,
                stream_name,
                subject,
                source,
                end,
                figures: Mutex::new(PartitionFigures {
                    first_sequence: info.state.first_sequence,
                    last_sequence: info.state.last_sequence,
                    messages: info.state.messages,
                    bytes: info.state.bytes,
                    positions: BTreeMap::new(),
                }),
                context: context.clone(),
                cursors: cursors.clone(),
                settings: Arc::clone(&settings),
            }));
        }
        let shared = Arc::new(Shared {
            settings,
            context,
            partitions,
            max_payload,
            writable: AtomicBool::new(true),
            problem: Mutex::new(None),
            closed: AtomicBool::new(false),
            publish: PublishFigures::default(),
        });
        Ok(JetStreamQueue { shared })
    }

    pub fn settings(&self) -> &JetStreamSettings {
        &self.shared.settings
    }

    /// The largest record the region's servers take (their `max_payload`).
    pub fn max_record_bytes(&self) -> usize {
        self.shared.max_payload
    }

    /// Each partition's stream name, end and the position of every sink in it.
    pub fn partition_positions(&self) -> Vec<(String, u64, BTreeMap<String, u64>)> {
        self.shared
            .partitions
            .iter()
            .map(|partition| {
                let figures = partition.figures();
                (
                    partition.stream_name.clone(),
                    figures.last_sequence + 1,
                    figures.positions,
                )
            })
            .collect()
    }

    async fn publish_all(&self, batch: &RecordBatch) -> Result<(), QueueError> {
        let shared = &self.shared;
        let identities = batch.identities().unwrap_or_default();
        // Checked before anything is sent: a refused request stores nothing.
        if let Some(size) = batch
            .stored_payloads()
            .map(<[u8]>::len)
            .find(|size| *size > shared.max_payload)
        {
            return Err(QueueError::RecordTooLarge {
                size,
                limit: shared.max_payload,
            });
        }
        let mut acks = Vec::with_capacity(batch.record_count() as usize);
        for (index, payload) in batch.stored_payloads().enumerate() {
            // Without an identity (not from the ingest path) the payload itself identifies it.
            let identity = match identities.get(index) {
                Some(identity) => identity.clone(),
                None => String::from_utf8_lossy(payload).into_owned(),
            };
            let partition = &shared.partitions
                [partition_of(&identity, shared.partitions.len() as u32) as usize];
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::copy_from_slice(payload))
                .message_id(message_id(&identity));
            let ack = shared
                .context
                .send_publish(partition.subject.clone(), publish)
                .await
                .map_err(|error| unavailable("publishing to the region's stream", error))?;
            acks.push((Arc::clone(partition), ack));
        }
        let outcomes = join_all(acks.into_iter().map(|(partition, ack)| async move {
            let ack = ack.await?;
            partition.note_end(ack.sequence + 1);
            Ok::<bool, jetstream::context::PublishError>(ack.duplicate)
        }))
        .await;
        let mut first_failure = None;
        for outcome in outcomes {
            match outcome {
                Ok(duplicate) => {
                    shared.publish.acked.fetch_add(1, Ordering::Relaxed);
                    if duplicate {
                        shared.publish.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(error) => {
                    first_failure.get_or_insert(error);
                }
            }
        }
        let Some(error) = first_failure else {
            return Ok(());
        };
        // A stream at its byte limit refuses new messages (discard new): the region is full
        // until its sinks catch up and delivered messages are purged.
        let text = error.to_string();
        if text.contains("maximum bytes") || text.contains("resource limits exceeded") {
            let used_bytes = shared
                .partitions
                .iter()
                .map(|partition| partition.figures().bytes)
                .sum();
            let budget_bytes = shared.settings.max_bytes_per_partition.max(0) as u64
                * shared.partitions.len() as u64;
            return Err(QueueError::Full {
                used_bytes,
                budget_bytes,
            });
        }
        Err(unavailable(
            "a record was not acknowledged by the region's stream",
            error,
        ))
    }
}

async fn connect(settings: &JetStreamSettings) -> Result<async_nats::Client, QueueError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!(
            "meridian {} ({})",
            settings.node_id, settings.region
        ))
        .connection_timeout(settings.request_timeout)
        .request_timeout(Some(settings.request_timeout))
        .require_tls(settings.require_tls);
    if let Some(path) = &settings.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|error| unavailable("reading the NATS credentials file", error))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(token.clone());
    }
    if let Some((user, password)) = &settings.user_and_password {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &settings.root_certificates {
        options = options.add_root_certificates(path.clone());
    }
    let addresses = settings
        .urls
        .iter()
        .map(|url| url.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| unavailable("a NATS url of the region", error))?;
    bounded(
        settings.request_timeout,
        &format!(
            "connecting to the region's NATS cluster ({})",
            settings.urls.join(", ")
        ),
        async_nats::connect_with_options(addresses, options),
    )
    .await
}

/// Reads each stream's state (end, bytes; no answer: not writable) and purges delivered data,
/// until the queue is closed or `stop`. Run by the queue's owner ([`QueueBackend::maintenance`]).
async fn monitor(shared: std::sync::Weak<Shared>, mut stop: watch::Receiver<bool>) {
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(MONITOR_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        round += 1;
        let mut problem = None;
        for partition in &shared.partitions {
            if let Err(error) = partition.refresh().await {
                problem.get_or_insert(format!("stream {}: {error}", partition.stream_name));
                continue;
            }
            if round.is_multiple_of(PURGE_EVERY_ROUNDS)
                && let Err(error) = partition.purge_delivered().await
            {
                warn!(region = %shared.settings.region, stream = %partition.stream_name, %error, "could not purge delivered messages (retried)");
            }
        }
        let was_writable = shared.writable.swap(problem.is_none(), Ordering::AcqRel);
        match (&problem, was_writable) {
            (Some(problem), true) => {
                warn!(region = %shared.settings.region, %problem, "the region's JetStream cluster does not answer: ingest answers 503 until it does")
            }
            (None, false) => {
                info!(region = %shared.settings.region, "the region's JetStream cluster answers again")
            }
            _ => {}
        }
        shared.set_problem(problem);
    }
}

#[async_trait]
impl QueueBackend for JetStreamQueue {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    fn identity(&self) -> String {
        self.shared
            .partitions
            .iter()
            .map(|partition| partition.source.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn new_batch(&self) -> RecordBatch {
        RecordBatch::keeping_identities(self.shared.settings.encryption.clone())
    }

    async fn append_batch(&self, batch: RecordBatch) -> Result<(), QueueError> {
        if batch.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        if shared.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        if !shared.writable.load(Ordering::Acquire) {
            return Err(QueueError::Unavailable(shared.problem().unwrap_or_else(
                || "the region's JetStream cluster does not answer".to_string(),
            )));
        }
        let started = Instant::now();
        let timeout = shared.settings.request_timeout;
        let outcome = match tokio::time::timeout(timeout, self.publish_all(&batch)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(QueueError::Unavailable(format!(
                "the region's stream did not acknowledge every record within {} ms",
                timeout.as_millis()
            ))),
        };
        shared.publish.appends.fetch_add(1, Ordering::Relaxed);
        shared
            .publish
            .append_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        if outcome.is_err() {
            shared
                .publish
                .failed_appends
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    fn is_writable(&self) -> bool {
        !self.shared.closed.load(Ordering::Acquire) && self.shared.writable.load(Ordering::Acquire)
    }

    fn stats(&self) -> QueueStats {
        let shared = &self.shared;
        let mut stats = QueueStats {
            incarnation: self.identity(),
            first_offset: 0,
            end_offset: 0,
            disk_bytes: 0,
            disk_budget_bytes: 0,
            segment_count: shared.partitions.len(),
            consumer_positions: BTreeMap::new(),
            broken: shared.problem(),
            sync_count: 0,
            abandoned_appends: 0,
            damaged_records: 0,
            quarantined_bytes: 0,
            pending_records: 0,
        };
        for partition in &shared.partitions {
            let figures = partition.figures();
            let end = figures.last_sequence + 1;
            // Counts records ever appended to the region, over every partition.
            stats.end_offset += figures.last_sequence;
            stats.disk_bytes += figures.bytes;
            stats.disk_budget_bytes += shared.settings.max_bytes_per_partition.max(0) as u64;
            stats.pending_records += if figures.positions.is_empty() {
                figures.messages
            } else {
                pending_below(end, figures.positions.values().copied())
            };
            for (sink, position) in figures.positions {
                stats
                    .consumer_positions
                    .insert(format!("{sink}.p{}", partition.index), position);
            }
        }
        stats
    }

    fn disk_free_bytes(&self) -> Option<u64> {
        None
    }

    fn backend_samples(&self) -> Vec<BackendSample> {
        let publish = &self.shared.publish;
        let counter = |name, help, value: &AtomicU64| BackendSample {
            name,
            kind: "counter",
            help,
            labels: Vec::new(),
            value: value.load(Ordering::Relaxed) as f64,
        };
        let mut samples = vec![
            counter(
                "queue_jetstream_appends_total",
                "Appends (one per request) published to the region's streams",
                &publish.appends,
            ),
            counter(
                "queue_jetstream_failed_appends_total",
                "Appends not acknowledged in full (answered 503; nothing of them was reported stored)",
                &publish.failed_appends,
            ),
            counter(
                "queue_jetstream_acked_records_total",
                "Records acknowledged by a quorum of their stream's replicas",
                &publish.acked,
            ),
            counter(
                "queue_jetstream_duplicate_records_total",
                "Acknowledged records the stream had already stored (a client retry inside the duplicate window)",
                &publish.duplicates,
            ),
            BackendSample {
                name: "queue_jetstream_append_seconds_total",
                kind: "counter",
                help: "Time appends took, publish until the last ack (divide by appends for the mean)",
                labels: Vec::new(),
                value: publish.append_micros.load(Ordering::Relaxed) as f64 / 1e6,
            },
        ];
        for partition in &self.shared.partitions {
            let figures = partition.figures();
            let label = format!("p{}", partition.index);
            samples.push(BackendSample {
                name: "queue_jetstream_stream_bytes",
                kind: "gauge",
                help: "Bytes the partition's stream holds (per replica)",
                labels: vec![("partition", label.clone())],
                value: figures.bytes as f64,
            });
            for (sink, position) in &figures.positions {
                samples.push(BackendSample {
                    name: "queue_jetstream_consumer_pending_records",
                    kind: "gauge",
                    help: "Records of the partition's stream the sink has not delivered (its cursor, as read by the monitor)",
                    labels: vec![("partition", label.clone()), ("sink", sink.clone())],
                    value: (figures.last_sequence + 1).saturating_sub(*position) as f64,
                });
            }
        }
        samples
    }

    fn encryption(&self) -> Option<Arc<QueueEncryption>> {
        self.shared.settings.encryption.clone()
    }

    fn delivery_logs(&self) -> Vec<Arc<dyn DeliveryLog>> {
        self.shared
            .partitions
            .iter()
            .map(|partition| Arc::clone(partition) as Arc<dyn DeliveryLog>)
            .collect()
    }

    fn maintenance(&self) -> Option<crate::backend::QueueMaintenance> {
        let shared = Arc::downgrade(&self.shared);
        Some(Box::new(move |stop| {
            Box::pin(monitor(shared.clone(), stop))
        }))
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_goes_to_the_same_partition_on_every_node_and_version() {
        // Pinned: changing the hash would send a client's retry to another stream (outside the
        // first one's duplicate window).
        assert_eq!(
            partition_of("prj_a:m-1", 3),
            crc32fast::hash(b"prj_a:m-1") % 3
        );
        let spread: BTreeMap<u32, usize> = (0..3_000).fold(BTreeMap::new(), |mut counts, n| {
            *counts
                .entry(partition_of(&format!("prj_a:m-{n}"), 3))
                .or_default() += 1;
            counts
        });
        assert_eq!(spread.len(), 3, "every partition gets messages");
        assert!(spread.values().all(|count| *count > 800), "{spread:?}");
        assert_eq!(partition_of("anything", 1), 0);
        assert_eq!(partition_of("anything", 0), 0, "no partitions count as one");
    }

    #[test]
    fn message_ids_are_fixed_length_header_values_unique_per_identity() {
        let plain = message_id("prj_a:m-1");
        assert_eq!(plain.len(), 32);
        assert!(plain.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(plain, message_id("prj_a:m-1"), "stable");
        assert_ne!(plain, message_id("prj_b:m-1"), "the project is part of it");
        let hostile = message_id("prj_a:line\r\nbreak \u{1F600}");
        assert_eq!(hostile.len(), 32);
        assert!(hostile.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
