//! Delivery from a region's queue to one sink: the loop every sink shares.
//!
//! A [`DeliveryRunner`] reads records from its consumer's cursor, gathers them into a batch (by
//! count, bytes or age, as the sink asks), persists the batch's range as in flight, hands it to the
//! sink until the sink accepts it (retrying with capped exponential backoff and jitter), then
//! commits the cursor. A batch is always one contiguous range of offsets, and after a crash the
//! in-flight range is redelivered exactly, so sinks can make writes idempotent by the range.
//!
//! A range is named by the batch's `source` (the queue's incarnation) and its offsets: offsets
//! alone repeat across the nodes of a region and across lives of one queue.
//!
//! A runner's life is one [`DeliveryRunner::attempt`]: whatever stops it (a cursor that cannot be
//! opened or persisted, a read failure, a panicking sink) is logged, counted, shown as `failed` in
//! its status and returned; the node's supervisor starts another attempt after the sink's retry
//! back-off. Only shutdown (drained) ends a runner.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::backend::{DeliveryLog, LogCursor};
use crate::consumer::Record;
use crate::error::{EncodeError, QueueError};
use crate::queue::OffsetRange;

/// How a sink wants its batches cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    /// A batch is delivered once its first record has waited this long, even if small.
    pub max_age: Duration,
}

/// What a sink keeps of a batch while the runner gathers it: the sink's own encoding, built
/// chunk by chunk as records are read, so that a batch's raw records never sit in memory whole
/// (the archive holds gzip, a tenth of the raw size, instead of up to `flush_max_bytes` raw).
pub trait BatchEncoder: Send + Sync + 'static {
    /// Folds the next records (in offset order, after those already folded) into the batch.
    /// CPU work: the runner calls it on a blocking thread.
    fn absorb(&mut self, records: &[Record]) -> Result<(), EncodeError>;
    /// Ends the batch (once, after the last `absorb`, before delivery). CPU work, as `absorb`.
    fn seal(&mut self) -> Result<(), EncodeError>;
    /// For the sink to find its own encoder type back in [`DeliveryBatch::encoded`]
    /// (`Arc::downcast`).
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// One contiguous range of the queue, handed to a sink: its records, or (for a sink with a
/// [`Sink::batch_encoder`]) the sink's encoding of them.
pub struct DeliveryBatch {
    /// The identity of the log the range belongs to (the queue's incarnation): together with the
    /// range it names the batch uniquely across every node and every life of a region's queues.
    pub source: Arc<str>,
    pub range: OffsetRange,
    /// Shared so that a sink can move the records into `spawn_blocking` for CPU-heavy encoding.
    /// Empty when the records were encoded as they were read (`encoded` holds them then).
    pub records: Arc<Vec<Record>>,
    /// The sink's sealed encoding of the range's records, when it encodes as they are read.
    pub encoded: Option<Arc<dyn BatchEncoder>>,
    /// The records' payload bytes (counted before encoding).
    pub payload_bytes: usize,
}

impl std::fmt::Debug for DeliveryBatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DeliveryBatch")
            .field("source", &self.source)
            .field("range", &self.range)
            .field("records", &self.records.len())
            .field("encoded", &self.encoded.is_some())
            .field("payload_bytes", &self.payload_bytes)
            .finish()
    }
}

impl DeliveryBatch {
    /// A batch handing the sink the records themselves.
    pub fn of_records(source: Arc<str>, range: OffsetRange, records: Vec<Record>) -> DeliveryBatch {
        let payload_bytes = records.iter().map(|record| record.payload.len()).sum();
        DeliveryBatch {
            source,
            range,
            records: Arc::new(records),
            encoded: None,
            payload_bytes,
        }
    }

    /// `<source>-<start:020>-<end:020>`: unique per batch in the region, the same on a retry.
    pub fn name(&self) -> String {
        format!(
            "{}-{:020}-{:020}",
            self.source, self.range.start, self.range.end
        )
    }
}

/// Why a delivery failed. Every failure is retried: nothing is dropped by the runner.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SinkError {
    /// Network errors, timeouts, 5xx, throttling: retried with backoff.
    #[error("{0}")]
    Transient(String),
    /// The sink refuses to write for a reason that needs an operator (a residency mismatch, a
    /// denied credential): retried at the longest backoff, loudly.
    #[error("{0}")]
    Blocked(String),
}

#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// The consumer name, unique within a region (`archive`, `clickhouse`).
    fn name(&self) -> &str;
    fn batch_limits(&self) -> BatchLimits;
    /// Writes the batch. Must be idempotent for a given range: the same range may be delivered
    /// again after a crash or a failed attempt.
    async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError>;
    /// A fresh encoder for the next batch, for a sink that encodes records as they are read
    /// (the runner then hands it the batch's records chunk by chunk and the sink gets the sealed
    /// encoding in [`DeliveryBatch::encoded`]); `None`, the default, hands the sink the records.
    /// A sink with an encoder must still accept batches of records (a redelivery after a restart
    /// is one).
    fn batch_encoder(&self) -> Option<Box<dyn BatchEncoder>> {
        None
    }
    /// Sink-specific counters for `/metrics` (exported as `meridian_sink_<name>_total`).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Sink-specific levels for `/metrics` (exported as gauges `meridian_sink_<name>`).
    fn gauges(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// A problem that needs an operator (e.g. a residency mismatch), for `/readyz`.
    fn health(&self) -> Option<String> {
        None
    }
}

/// Live figures of one runner, read by `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct DeliveryStatus {
    pub delivered_records: AtomicU64,
    pub delivered_batches: AtomicU64,
    pub delivered_bytes: AtomicU64,
    pub failed_attempts: AtomicU64,
    pub skipped_corrupt_records: AtomicU64,
    /// Total time spent in successful deliveries, in microseconds.
    pub delivery_micros: AtomicU64,
    /// Cursor position: every record below it is delivered.
    pub position: AtomicU64,
    /// Unix ms when the oldest record not yet delivered was first seen by the runner (0: none).
    pub oldest_pending_since_ms: AtomicI64,
    pub consecutive_failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Times the runner was restarted by its supervisor after a failure.
    pub restarts: AtomicU64,
    /// Set while the runner is down after a failure, waiting to restart: the reason.
    pub runner_failure: Mutex<Option<String>>,
    /// Set while the runner waits for the right to deliver its log (another node of the region
    /// delivers it meanwhile).
    pub standby: AtomicBool,
}

impl DeliveryStatus {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Keeps the error, with the password of any URL in it redacted (it is shown to operators).
    fn set_last_error(&self, message: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) =
            message.map(|message| meridian_core::redact_url(&message));
    }

    /// Why the runner is down, while it waits to restart; `None` while it runs.
    pub fn runner_failure(&self) -> Option<String> {
        self.runner_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_runner_failure(&self, reason: Option<String>) {
        *self
            .runner_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = reason;
    }
}

/// Backoff between delivery attempts: `base` doubling up to `cap`, with ±50% jitter; and the
/// longest one attempt may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// An attempt still running after this is cancelled and counted as failed (then retried).
    /// Nothing a sink writes can land later than this after the attempt began (plus what a
    /// store finishes of a request it had fully received): GDPR deletions wait this out.
    pub attempt_limit: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(30),
            attempt_limit: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The wait after `consecutive_failures` failures; blocked sinks wait the longest.
    pub fn backoff(&self, consecutive_failures: u32, blocked: bool) -> Duration {
        let cap_millis = self.cap.as_millis().max(1) as u64;
        let exponential = if blocked {
            cap_millis
        } else {
            (self.base.as_millis().max(1) as u64)
                .saturating_mul(1u64 << consecutive_failures.min(20))
                .min(cap_millis)
        };
        let jitter = rand::rng().random_range(0.5..1.5);
        Duration::from_millis((exponential as f64 * jitter) as u64)
    }
}

pub struct DeliveryRunner {
    region: String,
    log: Arc<dyn DeliveryLog>,
    /// The log's identity, which names every batch this runner hands out.
    source: Arc<str>,
    /// The log's partition, for logs (`-` for a region with one log).
    partition: String,
    sink: Arc<dyn Sink>,
    status: Arc<DeliveryStatus>,
    retry: RetryPolicy,
}

/// What the accumulation step decided.
enum Gathered {
    Batch(Gathering),
    /// Drained: nothing left to deliver and shutdown was asked.
    Finished,
}

/// For a sink that encodes records as they are read: the runner hands the encoder records once
/// this many payload bytes are gathered (and the rest when the batch ends), so that it holds
/// about this much raw at once, and a runner that keeps up with the log, reading a few records
/// per group commit, does not make a thread hop for each.
const ENCODED_READ_CHUNK_BYTES: usize = 1 << 20;

/// A batch being gathered: its records, or the sink's encoding of them.
struct Gathering {
    /// Every record of the batch, or (when the sink encodes) those not handed to the encoder yet.
    records: Vec<Record>,
    /// The payload bytes of `records`.
    records_bytes: usize,
    encoder: Option<Box<dyn BatchEncoder>>,
    first_offset: Option<u64>,
    last_offset: Option<u64>,
    record_count: usize,
    payload_bytes: usize,
}

impl Gathering {
    fn new(encoder: Option<Box<dyn BatchEncoder>>) -> Gathering {
        Gathering {
            records: Vec::new(),
            records_bytes: 0,
            encoder,
            first_offset: None,
            last_offset: None,
            record_count: 0,
            payload_bytes: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// The most payload bytes the next read should hand out, with `limit` the batch's limit.
    fn next_read_bytes(&self, limit: usize) -> usize {
        let remaining = limit.saturating_sub(self.payload_bytes);
        let most = if self.encoder.is_some() {
            remaining.min(ENCODED_READ_CHUNK_BYTES.saturating_sub(self.records_bytes))
        } else {
            remaining
        };
        most.max(1)
    }

    /// Adds records read from the log: in offset order, past those gathered.
    async fn add(&mut self, chunk: Vec<Record>) -> Result<(), AttemptFailure> {
        let (Some(first), Some(last)) = (chunk.first(), chunk.last()) else {
            return Ok(());
        };
        debug_assert!(
            self.last_offset
                .is_none_or(|gathered| first.offset > gathered)
                && chunk.windows(2).all(|pair| pair[0].offset < pair[1].offset),
            "a batch is one range, its records in order"
        );
        self.first_offset.get_or_insert(first.offset);
        self.last_offset = Some(last.offset);
        self.record_count += chunk.len();
        let chunk_bytes = chunk
            .iter()
            .map(|record| record.payload.len())
            .sum::<usize>();
        self.payload_bytes += chunk_bytes;
        self.records_bytes += chunk_bytes;
        self.records.extend(chunk);
        if self.encoder.is_some() && self.records_bytes >= ENCODED_READ_CHUNK_BYTES {
            self.encode_gathered(false).await?;
        }
        Ok(())
    }

    /// Hands the records gathered so far to the encoder (and seals it, when `seal`), on a
    /// blocking thread.
    async fn encode_gathered(&mut self, seal: bool) -> Result<(), AttemptFailure> {
        let Some(mut encoder) = self.encoder.take() else {
            return Ok(());
        };
        let records = std::mem::take(&mut self.records);
        self.records_bytes = 0;
        let (encoder, outcome) = tokio::task::spawn_blocking(move || {
            let mut outcome = encoder.absorb(&records);
            if seal && outcome.is_ok() {
                outcome = encoder.seal();
            }
            (encoder, outcome)
        })
        .await
        .map_err(|error| AttemptFailure::Encode(format!("the sink's encoder panicked: {error}")))?;
        outcome.map_err(|error| AttemptFailure::Encode(error.to_string()))?;
        self.encoder = Some(encoder);
        Ok(())
    }

    /// The gathered batch, its encoding sealed; `None` when nothing was gathered.
    async fn into_batch(
        mut self,
        source: &Arc<str>,
    ) -> Result<Option<DeliveryBatch>, AttemptFailure> {
        let (Some(first_offset), Some(last_offset)) = (self.first_offset, self.last_offset) else {
            return Ok(None);
        };
        let range = OffsetRange {
            start: first_offset,
            end: last_offset + 1,
        };
        debug_assert!(
            self.record_count as u64 <= range.len(),
            "a batch is one range"
        );
        let encoded = if self.encoder.is_some() {
            self.encode_gathered(true).await?;
            self.encoder.take().map(Arc::from)
        } else {
            None
        };
        Ok(Some(DeliveryBatch {
            source: Arc::clone(source),
            range,
            records: Arc::new(self.records),
            encoded,
            payload_bytes: self.payload_bytes,
        }))
    }
}

/// Why one attempt of the runner ended before shutdown.
#[derive(Debug, thiserror::Error)]
enum AttemptFailure {
    #[error("cannot open the sink's queue cursor: {0}")]
    OpenCursor(QueueError),
    #[error("cannot redeliver the in-flight batch: {0}")]
    RedeliverInFlight(QueueError),
    #[error("reading the queue failed: {0}")]
    Read(QueueError),
    #[error("persisting the sink's cursor failed: {0}")]
    PersistCursor(QueueError),
    #[error("encoding a batch for the sink failed (its records stay queued): {0}")]
    Encode(String),
}

/// Why an attempt of a runner stopped (recorded in its status, URLs redacted).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DeliveryFailure(pub String);

impl DeliveryRunner {
    pub fn new(
        region: &str,
        log: impl Into<Arc<dyn DeliveryLog>>,
        sink: Arc<dyn Sink>,
    ) -> DeliveryRunner {
        let log = log.into();
        DeliveryRunner {
            region: region.to_string(),
            source: log.source(),
            partition: log.partition().unwrap_or_else(|| "-".to_string()),
            log,
            sink,
            status: Arc::new(DeliveryStatus::default()),
            retry: RetryPolicy::default(),
        }
    }

    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> DeliveryRunner {
        self.retry = retry;
        self
    }

    pub fn status(&self) -> Arc<DeliveryStatus> {
        Arc::clone(&self.status)
    }

    /// The restart policy its owner should apply between attempts: the sink's retry back-off.
    pub fn retry_policy(&self) -> RetryPolicy {
        self.retry
    }

    /// One life of the runner, until `drain` becomes true and everything durable at that point is
    /// delivered (`Ok`), or until something stops it: a cursor that cannot be opened or
    /// persisted, a read failure, a panicking sink. A failure is recorded in the runner's status
    /// (restarts, last error, shown as failed until an attempt delivers again) and returned, for
    /// the runner's owner — the node's supervisor — to start another attempt after a pause. Its
    /// data stays queued meanwhile; nothing is skipped.
    pub async fn attempt(
        self: Arc<Self>,
        drain: watch::Receiver<bool>,
    ) -> Result<(), DeliveryFailure> {
        let failure = match tokio::spawn(Arc::clone(&self).run_attempt(drain)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(failure)) => failure.to_string(),
            Err(join_error) if join_error.is_panic() => {
                format!("the delivery task panicked: {join_error}")
            }
            Err(join_error) => format!("the delivery task was cancelled: {join_error}"),
        };
        let status = &self.status;
        status.restarts.fetch_add(1, Ordering::Relaxed);
        let failure = meridian_core::redact_url(&failure);
        status.set_last_error(Some(failure.clone()));
        status.set_runner_failure(Some(failure.clone()));
        error!(region = %self.region, sink = self.sink.name(), error = %failure, restarts = status.restarts.load(Ordering::Relaxed), "sink runner failed; it is started again after a pause (its data stays queued)");
        Err(DeliveryFailure(failure))
    }

    /// One life of the runner: open the cursor, redeliver what was in flight, then deliver batch
    /// after batch until drained.
    async fn run_attempt(
        self: Arc<Self>,
        mut drain: watch::Receiver<bool>,
    ) -> Result<(), AttemptFailure> {
        self.status.standby.store(true, Ordering::Relaxed);
        let opened = if self.log.is_node_local() {
            // Whatever the log holds is delivered before the node stops: open it even then.
            self.log.open_cursor(self.sink.name()).await
        } else {
            // Waiting for the right to deliver ends with shutdown (other nodes deliver).
            tokio::select! {
                opened = self.log.open_cursor(self.sink.name()) => opened,
                _ = drain.wait_for(|stop| *stop) => return Ok(()),
            }
        };
        self.status.standby.store(false, Ordering::Relaxed);
        let mut consumer = opened.map_err(AttemptFailure::OpenCursor)?;
        self.deliver_in_flight(&mut consumer, &mut drain)
            .await
            .map_err(AttemptFailure::RedeliverInFlight)?;
        if self.status.runner_failure().is_some() {
            info!(region = %self.region, sink = self.sink.name(), "sink runner restarted and delivering again");
            self.status.set_runner_failure(None);
        }
        let mut end_changes = self.log.subscribe_durable_end();
        loop {
            let gathered = self
                .gather(&mut consumer, &mut end_changes, &mut drain)
                .await?;
            let gathering = match gathered {
                Gathered::Batch(gathering) => gathering,
                Gathered::Finished => {
                    consumer.release().await;
                    return Ok(());
                }
            };
            let Some(batch) = gathering.into_batch(&self.source).await? else {
                continue;
            };
            self.deliver_and_commit(&mut consumer, batch, &mut drain)
                .await
                .map_err(AttemptFailure::PersistCursor)?;
        }
    }

    async fn deliver_in_flight(
        &self,
        consumer: &mut Box<dyn LogCursor>,
        drain: &mut watch::Receiver<bool>,
    ) -> Result<(), QueueError> {
        let state = consumer.state();
        self.status
            .position
            .store(state.next_offset, Ordering::Relaxed);
        let Some(range) = state.in_flight else {
            return Ok(());
        };
        info!(region = %self.region, partition = %self.partition, sink = self.sink.name(), start = range.start, end = range.end, "redelivering the batch that was in flight at the last stop");
        // Handed over as records (the range is read whole, once per start).
        let records = consumer.read_range(range).await?;
        let batch = DeliveryBatch::of_records(Arc::clone(&self.source), range, records);
        self.deliver_and_commit(consumer, batch, drain).await
    }

    /// Reads until the batch is full, old enough, or the queue is drained on shutdown.
    async fn gather(
        &self,
        consumer: &mut Box<dyn LogCursor>,
        end_changes: &mut watch::Receiver<u64>,
        drain: &mut watch::Receiver<bool>,
    ) -> Result<Gathered, AttemptFailure> {
        let limits = self.sink.batch_limits();
        let mut gathering = Gathering::new(self.sink.batch_encoder());
        let mut first_seen: Option<Instant> = None;
        loop {
            let position = consumer.state().next_offset;
            // Past the last record gathered (a replicated log's positions may have gaps, e.g.
            // messages an operator removed; the local log's have none).
            let from = gathering
                .last_offset
                .map_or(position, |last_offset| last_offset + 1);
            let available = self.log.durable_end().saturating_sub(from);
            let is_full = gathering.record_count >= limits.max_records
                || gathering.payload_bytes >= limits.max_bytes;
            if available > 0 && !is_full {
                let max_records = limits.max_records - gathering.record_count;
                let max_bytes = gathering.next_read_bytes(limits.max_bytes);
                match consumer.read(from, max_records, max_bytes).await {
                    Ok(chunk) if chunk.is_empty() => {
                        // The log announced records it cannot hand out yet (a replicated
                        // log's reader catching up): deliver what is gathered, or look again.
                        if !gathering.is_empty() {
                            return Ok(Gathered::Batch(gathering));
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                            _ = drain.changed() => {}
                        }
                        continue;
                    }
                    Ok(chunk) => {
                        debug_assert!(
                            chunk.first().is_none_or(|record| record.offset >= from),
                            "a log hands out records from the position asked for on"
                        );
                        if first_seen.is_none() && !chunk.is_empty() {
                            first_seen = Some(Instant::now());
                            self.status
                                .oldest_pending_since_ms
                                .store(meridian_core::timestamp::now_unix_ms(), Ordering::Relaxed);
                        }
                        gathering.add(chunk).await?;
                        continue;
                    }
                    Err(QueueError::Damaged {
                        path,
                        missing,
                        reason,
                    }) => {
                        if !gathering.is_empty() {
                            return Ok(Gathered::Batch(gathering));
                        }
                        self.skip_damaged_records(consumer, &path, missing, &reason)
                            .await
                            .map_err(AttemptFailure::Read)?;
                        continue;
                    }
                    Err(QueueError::Corrupt {
                        path,
                        position,
                        reason,
                    }) if gathering.is_empty() => {
                        // Damage with nothing intact after it yet, in the active segment.
                        warn!(region = %self.region, sink = self.sink.name(), segment = %path.display(), offset = position, %reason, "unreadable record in the active queue segment; retrying");
                        self.status
                            .set_last_error(Some(format!("queue segment: {reason}")));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = drain.wait_for(|stop| *stop) => return Ok(Gathered::Finished),
                        }
                        continue;
                    }
                    Err(QueueError::Corrupt { .. }) => return Ok(Gathered::Batch(gathering)),
                    Err(QueueError::Encryption(reason)) if gathering.is_empty() => {
                        // A key is missing from the key file: wait for it (SIGHUP reloads the file).
                        error!(region = %self.region, sink = self.sink.name(), offset = from, %reason, "cannot open a queued record; delivery waits for the key");
                        self.status
                            .set_last_error(Some(format!("queue encryption: {reason}")));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                            _ = drain.wait_for(|stop| *stop) => return Ok(Gathered::Finished),
                        }
                        continue;
                    }
                    Err(QueueError::Encryption(_)) => return Ok(Gathered::Batch(gathering)),
                    Err(other) => return Err(AttemptFailure::Read(other)),
                }
            }
            if is_full {
                return Ok(Gathered::Batch(gathering));
            }
            let draining = *drain.borrow();
            if draining {
                return Ok(if gathering.is_empty() {
                    Gathered::Finished
                } else {
                    Gathered::Batch(gathering)
                });
            }
            match first_seen {
                Some(started) => {
                    let deadline = started + limits.max_age;
                    if Instant::now() >= deadline {
                        return Ok(Gathered::Batch(gathering));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline.into()) => return Ok(Gathered::Batch(gathering)),
                        _ = end_changes.changed() => {}
                        _ = drain.changed() => {}
                    }
                }
                None => {
                    self.status
                        .oldest_pending_since_ms
                        .store(0, Ordering::Relaxed);
                    tokio::select! {
                        changed = end_changes.changed() => {
                            if changed.is_err() {
                                // The queue is gone: nothing more will arrive.
                                return Ok(Gathered::Finished);
                            }
                        }
                        _ = drain.changed() => {}
                    }
                }
            }
        }
    }

    /// Moves the cursor past records lost to damage (the queue has quarantined their bytes).
    async fn skip_damaged_records(
        &self,
        consumer: &mut Box<dyn LogCursor>,
        path: &std::path::Path,
        missing: OffsetRange,
        reason: &str,
    ) -> Result<(), QueueError> {
        error!(region = %self.region, sink = self.sink.name(), segment = %path.display(), first_missing_offset = missing.start, end_missing_offset = missing.end, reason, skipped = missing.len(), "damaged queue records: skipping exactly the lost ones");
        self.status
            .skipped_corrupt_records
            .fetch_add(missing.len(), Ordering::Relaxed);
        consumer.begin(missing).await?;
        consumer.commit(missing.end).await?;
        self.status.position.store(missing.end, Ordering::Relaxed);
        Ok(())
    }

    async fn deliver_and_commit(
        &self,
        consumer: &mut Box<dyn LogCursor>,
        batch: DeliveryBatch,
        drain: &mut watch::Receiver<bool>,
    ) -> Result<(), QueueError> {
        let range = batch.range;
        let is_persisted_in_flight = consumer.state().in_flight == Some(range);
        if !is_persisted_in_flight {
            consumer.begin(range).await?;
        }
        let mut consecutive_failures = 0u32;
        loop {
            let started = Instant::now();
            let attempt_limit = self.retry.attempt_limit;
            let attempt = tokio::time::timeout(attempt_limit, self.sink.deliver(&batch))
                .await
                .unwrap_or_else(|_| {
                    Err(SinkError::Transient(format!(
                        "the attempt was cancelled after {} ms (queue.max_sink_attempt_secs)",
                        attempt_limit.as_millis()
                    )))
                });
            match attempt {
                Ok(()) => {
                    let status = &self.status;
                    status
                        .delivery_micros
                        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    status
                        .delivered_records
                        .fetch_add(range.len(), Ordering::Relaxed);
                    status.delivered_batches.fetch_add(1, Ordering::Relaxed);
                    status
                        .delivered_bytes
                        .fetch_add(batch.payload_bytes as u64, Ordering::Relaxed);
                    status.consecutive_failures.store(0, Ordering::Relaxed);
                    if consecutive_failures > 0 {
                        info!(region = %self.region, sink = self.sink.name(), start = range.start, end = range.end, attempts = consecutive_failures + 1, "delivery succeeded after retries");
                    }
                    status.set_last_error(None);
                    break;
                }
                Err(failure) => {
                    consecutive_failures += 1;
                    self.status.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    self.status
                        .consecutive_failures
                        .store(u64::from(consecutive_failures), Ordering::Relaxed);
                    let failure_text = meridian_core::redact_url(&failure.to_string());
                    self.status.set_last_error(Some(failure_text.clone()));
                    let blocked = matches!(failure, SinkError::Blocked(_));
                    let wait = self.retry.backoff(consecutive_failures, blocked);
                    warn!(region = %self.region, sink = self.sink.name(), start = range.start, end = range.end, attempt = consecutive_failures, retry_in_ms = wait.as_millis() as u64, error = %failure_text, "delivery failed; the batch stays queued and will be retried");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        // On shutdown retry promptly; the caller bounds how long it waits.
                        _ = drain.wait_for(|stop| *stop), if !*drain.borrow() => {}
                    }
                }
            }
        }
        consumer.commit(range.end).await?;
        self.status.position.store(range.end, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueConfig, RecordBatch, RegionQueue};
    use std::sync::atomic::AtomicUsize;

    /// A sink that fails its first `failures` attempts and remembers what it stored.
    struct FlakySink {
        failures: AtomicUsize,
        stored: Mutex<Vec<(OffsetRange, Vec<Vec<u8>>)>>,
    }

    #[async_trait]
    impl Sink for FlakySink {
        fn name(&self) -> &str {
            "flaky"
        }
        fn batch_limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: 7,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(20),
            }
        }
        async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(SinkError::Transient("injected failure".into()));
            }
            let payloads = batch
                .records
                .iter()
                .map(|record| record.payload.clone())
                .collect();
            self.stored.lock().unwrap().push((batch.range, payloads));
            Ok(())
        }
    }

    fn fast_retries() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            attempt_limit: Duration::from_secs(60),
        }
    }

    /// Starts attempts of the runner until one ends drained, pausing the runner's retry back-off
    /// after each failure: what the node's supervisor does, for these tests.
    async fn run(runner: DeliveryRunner, drain: watch::Receiver<bool>) {
        let runner = Arc::new(runner);
        let retry = runner.retry_policy();
        let mut restarts = 0;
        while Arc::clone(&runner).attempt(drain.clone()).await.is_err() {
            restarts += 1;
            tokio::time::sleep(retry.backoff(restarts, false)).await;
        }
    }

    async fn wait_for(mut condition: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the condition did not hold within 10 s");
    }

    #[tokio::test]
    async fn a_runner_whose_cursor_cannot_be_opened_restarts_once_the_obstacle_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let obstacle = dir.path().join("cursors/flaky.cursor");
        std::fs::create_dir(&obstacle).unwrap();
        let sink = Arc::new(FlakySink {
            failures: AtomicUsize::new(0),
            stored: Mutex::new(Vec::new()),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone())
            .with_retry_policy(fast_retries());
        let status = runner.status();
        let (drain_sender, drain) = watch::channel(false);
        let task = tokio::spawn(run(runner, drain));
        wait_for(|| status.restarts.load(Ordering::Relaxed) >= 2).await;
        let failure = status.runner_failure().expect("shown as failed while down");
        assert!(failure.contains("cursor"), "{failure}");
        let mut batch = RecordBatch::default();
        batch.push(b"kept while the runner was down").unwrap();
        queue.append(batch).await.unwrap();

        std::fs::remove_dir(&obstacle).unwrap();
        wait_for(|| status.delivered_records.load(Ordering::Relaxed) == 1).await;
        assert_eq!(status.runner_failure(), None, "running again");
        drain_sender.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(sink.stored.lock().unwrap().len(), 1);
        queue.close();
    }

    /// Panics on its first `panics` deliveries.
    struct PanickingSink {
        panics: AtomicUsize,
        delivered: AtomicUsize,
    }

    #[async_trait]
    impl Sink for PanickingSink {
        fn name(&self) -> &str {
            "panicky"
        }
        fn batch_limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: 100,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(5),
            }
        }
        async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
            if self.panics.load(Ordering::SeqCst) > 0 {
                self.panics.fetch_sub(1, Ordering::SeqCst);
                panic!("injected sink panic");
            }
            self.delivered
                .fetch_add(batch.records.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_panicking_sink_is_restarted_and_its_batch_redelivered() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let sink = Arc::new(PanickingSink {
            panics: AtomicUsize::new(2),
            delivered: AtomicUsize::new(0),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone())
            .with_retry_policy(fast_retries());
        let status = runner.status();
        let (drain_sender, drain) = watch::channel(false);
        let task = tokio::spawn(run(runner, drain));
        let mut batch = RecordBatch::default();
        for index in 0..5 {
            batch.push(format!("r{index}").as_bytes()).unwrap();
        }
        queue.append(batch).await.unwrap();
        // The position moves after the sink returned (the cursor is committed then): wait for it,
        // not for the sink's own count, which the commit follows.
        wait_for(|| status.position.load(Ordering::Relaxed) == 5).await;
        assert_eq!(sink.delivered.load(Ordering::SeqCst), 5);
        assert_eq!(status.restarts.load(Ordering::Relaxed), 2);
        drain_sender.send(true).unwrap();
        task.await.unwrap();
        queue.close();
    }

    /// Remembers what it was fed, chunk by chunk.
    #[derive(Default)]
    struct RecordingEncoder {
        offsets: Vec<u64>,
        chunks: usize,
        largest_chunk_bytes: usize,
        sealed: bool,
    }

    impl BatchEncoder for RecordingEncoder {
        fn absorb(&mut self, records: &[Record]) -> Result<(), EncodeError> {
            assert!(!self.sealed, "absorbed after sealing");
            self.chunks += 1;
            let bytes = records.iter().map(|record| record.payload.len()).sum();
            self.largest_chunk_bytes = self.largest_chunk_bytes.max(bytes);
            self.offsets
                .extend(records.iter().map(|record| record.offset));
            Ok(())
        }
        fn seal(&mut self) -> Result<(), EncodeError> {
            assert!(!self.sealed, "sealed twice");
            self.sealed = true;
            Ok(())
        }
        fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
            self
        }
    }

    /// Encodes as the runner reads; fails its first `failures` attempts.
    struct EncodingSink {
        failures: AtomicUsize,
        delivered: Mutex<Vec<(OffsetRange, Arc<RecordingEncoder>, usize)>>,
    }

    #[async_trait]
    impl Sink for EncodingSink {
        fn name(&self) -> &str {
            "encoding"
        }
        fn batch_limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: 1_000_000,
                max_bytes: 64 << 20,
                max_age: Duration::from_millis(50),
            }
        }
        fn batch_encoder(&self) -> Option<Box<dyn BatchEncoder>> {
            Some(Box::new(RecordingEncoder::default()))
        }
        async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
            assert!(batch.records.is_empty(), "the records were encoded instead");
            let encoder = Arc::clone(batch.encoded.as_ref().expect("encoded"))
                .into_any()
                .downcast::<RecordingEncoder>()
                .expect("this sink's encoder");
            assert!(encoder.sealed, "sealed before delivery");
            if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                return Err(SinkError::Transient("injected failure".into()));
            }
            self.delivered
                .lock()
                .unwrap()
                .push((batch.range, encoder, batch.payload_bytes));
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_sink_that_encodes_as_it_reads_gets_each_batch_in_chunks_of_a_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let sink = Arc::new(EncodingSink {
            failures: AtomicUsize::new(1),
            delivered: Mutex::new(Vec::new()),
        });
        let mut batch = RecordBatch::default();
        let payload = vec![b'x'; 1_000];
        for _ in 0..3_000 {
            batch.push(&payload).unwrap();
        }
        queue.append(batch).await.unwrap();
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone())
            .with_retry_policy(fast_retries());
        let (drain_sender, drain) = watch::channel(false);
        drain_sender.send(true).unwrap();
        run(runner, drain).await;

        let delivered = sink.delivered.lock().unwrap();
        assert_eq!(
            delivered.len(),
            1,
            "one batch, delivered on its second attempt"
        );
        let (range, encoder, payload_bytes) = &delivered[0];
        assert_eq!(
            *range,
            OffsetRange {
                start: 0,
                end: 3_000
            }
        );
        assert_eq!(encoder.offsets, (0..3_000).collect::<Vec<u64>>());
        assert_eq!(*payload_bytes, 3_000_000);
        assert!(
            // A read stops once it reached its byte limit: past it by at most one record.
            encoder.chunks >= 3 && encoder.largest_chunk_bytes < ENCODED_READ_CHUNK_BYTES + 1_000,
            "3 MB read a mebibyte at a time: {} chunks, the largest {} bytes",
            encoder.chunks,
            encoder.largest_chunk_bytes
        );
        queue.close();
    }

    #[tokio::test]
    async fn records_trickling_in_reach_the_encoder_in_one_hand_over_per_mebibyte() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let sink = Arc::new(EncodingSink {
            failures: AtomicUsize::new(0),
            delivered: Mutex::new(Vec::new()),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone())
            .with_retry_policy(fast_retries());
        let (drain_sender, drain) = watch::channel(false);
        let task = tokio::spawn(run(runner, drain));
        for index in 0..40 {
            let mut batch = RecordBatch::default();
            batch.push(format!("record {index}").as_bytes()).unwrap();
            queue.append(batch).await.unwrap();
        }
        drain_sender.send(true).unwrap();
        task.await.unwrap();
        let delivered = sink.delivered.lock().unwrap();
        let offsets: Vec<u64> = delivered
            .iter()
            .flat_map(|(_, encoder, _)| encoder.offsets.clone())
            .collect();
        assert_eq!(offsets, (0..40).collect::<Vec<u64>>());
        assert!(
            delivered.iter().all(|(_, encoder, _)| encoder.chunks == 1),
            "a batch under a mebibyte is handed to its encoder once, however many reads it took: {:?}",
            delivered
                .iter()
                .map(|(_, encoder, _)| encoder.chunks)
                .collect::<Vec<_>>()
        );
        queue.close();
    }

    #[tokio::test]
    async fn delivers_every_record_once_in_contiguous_batches_despite_failures() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let sink = Arc::new(FlakySink {
            failures: AtomicUsize::new(3),
            stored: Mutex::new(Vec::new()),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone());
        let status = runner.status();
        let (drain_sender, drain) = watch::channel(false);
        let task = tokio::spawn(run(runner, drain));
        for index in 0..30 {
            let mut batch = RecordBatch::default();
            batch.push(format!("record {index}").as_bytes()).unwrap();
            queue.append(batch).await.unwrap();
        }
        drain_sender.send(true).unwrap();
        task.await.unwrap();
        let stored = sink.stored.lock().unwrap();
        let mut expected_start = 0;
        let mut all = Vec::new();
        for (range, payloads) in stored.iter() {
            assert_eq!(
                range.start, expected_start,
                "batches are contiguous and in order"
            );
            assert_eq!(range.len() as usize, payloads.len());
            assert!(payloads.len() <= 7);
            expected_start = range.end;
            all.extend(
                payloads
                    .iter()
                    .map(|payload| String::from_utf8(payload.clone()).unwrap()),
            );
        }
        let expected: Vec<String> = (0..30).map(|index| format!("record {index}")).collect();
        assert_eq!(all, expected);
        assert_eq!(status.failed_attempts.load(Ordering::Relaxed), 3);
        assert_eq!(status.position.load(Ordering::Relaxed), 30);
        queue.close();
    }

    #[tokio::test]
    async fn a_damaged_record_is_skipped_alone_and_everything_around_it_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = QueueConfig::new(dir.path());
        config.segment_max_bytes = 1024;
        let queue = RegionQueue::open(config).unwrap();
        for index in 0..100 {
            let mut batch = RecordBatch::default();
            batch.push(format!("record {index:03}").as_bytes()).unwrap();
            queue.append(batch).await.unwrap();
        }
        let segments = crate::segment::list_segments(&dir.path().join("segments")).unwrap();
        let (_, closed_segment) = &segments[1];
        let mut bytes = std::fs::read(closed_segment).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x04;
        std::fs::write(closed_segment, bytes).unwrap();

        let sink = Arc::new(FlakySink {
            failures: AtomicUsize::new(0),
            stored: Mutex::new(Vec::new()),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone())
            .with_retry_policy(fast_retries());
        let status = runner.status();
        let (drain_sender, drain) = watch::channel(true);
        drop(drain_sender);
        run(runner, drain).await;
        let stored = sink.stored.lock().unwrap();
        let delivered: Vec<String> = stored
            .iter()
            .flat_map(|(_, payloads)| payloads.iter())
            .map(|payload| String::from_utf8(payload.clone()).unwrap())
            .collect();
        assert_eq!(delivered.len(), 99, "all but the damaged record");
        assert_eq!(status.skipped_corrupt_records.load(Ordering::Relaxed), 1);
        assert_eq!(status.position.load(Ordering::Relaxed), 100);
        for (range, payloads) in stored.iter() {
            assert_eq!(
                range.len() as usize,
                payloads.len(),
                "batches stay contiguous"
            );
        }
        assert_eq!(queue.stats().damaged_records, 1);
        queue.close();
    }

    #[tokio::test]
    async fn redelivers_the_in_flight_range_exactly_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let mut batch = RecordBatch::default();
        for index in 0..10 {
            batch.push(format!("r{index}").as_bytes()).unwrap();
        }
        queue.append(batch).await.unwrap();
        {
            // A previous run began delivering [2, 5) and crashed before committing.
            let mut consumer = queue.consumer("flaky").unwrap();
            consumer.begin(OffsetRange { start: 0, end: 2 }).unwrap();
            consumer.commit(2).unwrap();
            consumer.begin(OffsetRange { start: 2, end: 5 }).unwrap();
        }
        let sink = Arc::new(FlakySink {
            failures: AtomicUsize::new(0),
            stored: Mutex::new(Vec::new()),
        });
        let runner = DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone());
        let (drain_sender, drain) = watch::channel(true);
        drop(drain_sender);
        run(runner, drain).await;
        let stored = sink.stored.lock().unwrap();
        assert_eq!(
            stored[0].0,
            OffsetRange { start: 2, end: 5 },
            "the same range again, not a longer one"
        );
        assert_eq!(stored.last().unwrap().0.end, 10);
        queue.close();
    }

    /// Hangs on its first `hangs` deliveries (a store that never answers), then stores.
    struct HangingSink {
        hangs: AtomicUsize,
        delivered: AtomicUsize,
    }

    #[async_trait]
    impl Sink for HangingSink {
        fn name(&self) -> &str {
            "hanging"
        }
        fn batch_limits(&self) -> BatchLimits {
            BatchLimits {
                max_records: 100,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(5),
            }
        }
        async fn deliver(&self, batch: &DeliveryBatch) -> Result<(), SinkError> {
            if self.hangs.load(Ordering::SeqCst) > 0 {
                self.hangs.fetch_sub(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            self.delivered
                .fetch_add(batch.records.len(), Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test]
    async fn an_attempt_past_its_limit_is_cancelled_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let queue = RegionQueue::open(QueueConfig::new(dir.path())).unwrap();
        let sink = Arc::new(HangingSink {
            hangs: AtomicUsize::new(2),
            delivered: AtomicUsize::new(0),
        });
        let mut policy = fast_retries();
        policy.attempt_limit = Duration::from_millis(100);
        let runner =
            DeliveryRunner::new("eu-west-1", queue.clone(), sink.clone()).with_retry_policy(policy);
        let status = runner.status();
        let (drain_sender, drain) = watch::channel(false);
        let task = tokio::spawn(run(runner, drain));
        let mut batch = RecordBatch::default();
        batch.push(b"delivered in the end").unwrap();
        queue.append(batch).await.unwrap();
        wait_for(|| status.position.load(Ordering::Relaxed) == 1).await;
        assert_eq!(status.failed_attempts.load(Ordering::Relaxed), 2);
        assert_eq!(sink.delivered.load(Ordering::SeqCst), 1);
        assert!(status.last_error().is_none());
        drain_sender.send(true).unwrap();
        task.await.unwrap();
        queue.close();
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy::default();
        assert!(policy.backoff(1, false) < Duration::from_millis(400));
        assert!(policy.backoff(30, false) <= Duration::from_millis(45_000));
        assert!(policy.backoff(30, false) >= Duration::from_millis(15_000));
        assert!(policy.backoff(1, true) >= Duration::from_millis(15_000));
        let short = RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(200),
            attempt_limit: Duration::from_secs(1),
        };
        assert!(short.backoff(30, false) <= Duration::from_millis(300));
    }
}
