//! The line between the queue's users and the backend that holds the data.
//!
//! The ingest path and the node's assembly see a region's queue as a [`QueueBackend`]: append a
//! batch (answered once it is durable in the backend's sense), figures for `/metrics` and
//! `/readyz`, and the ordered logs sinks deliver from. A [`DeliveryLog`] is one ordered log (the
//! local queue, or one partition of a replicated region); the [`DeliveryRunner`] reads it through
//! a [`LogCursor`], the sink's persisted position in it. Neither the ingest handler, nor the
//! runner, nor any [`Sink`] knows which backend holds the data.
//!
//! Two backends: [`RegionQueue`] (the local log, the embedded default) and
//! [`crate::jetstream::JetStreamQueue`] (a region's NATS JetStream cluster).
//!
//! [`DeliveryRunner`]: crate::DeliveryRunner
//! [`Sink`]: crate::Sink

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::consumer::{Consumer, CursorState, Record};
use crate::encryption::QueueEncryption;
use crate::error::QueueError;
use crate::queue::{OffsetRange, QueueStats, RecordBatch, RegionQueue};

/// A region's queue, whatever holds its data.
/// One run of a queue's maintenance task (see [`QueueBackend::maintenance`]).
pub type QueueMaintenance = Box<
    dyn Fn(watch::Receiver<bool>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// `local` or `jetstream`.
    fn kind(&self) -> &'static str;
    /// The identity of the data's positions (the local queue's incarnation; the streams of a
    /// replicated region), for `/healthz`.
    fn identity(&self) -> String;
    /// An empty batch for this queue (sealed with its encryption key when it has one).
    fn new_batch(&self) -> RecordBatch;
    /// Stores the batch; returns once every record is durable (see ARCHITECTURE.md for what that
    /// means per backend). An error means the caller must not answer 200.
    async fn append_batch(&self, batch: RecordBatch) -> Result<(), QueueError>;
    /// True while appends can succeed (disk room and budget; a quorum of the region's servers).
    fn is_writable(&self) -> bool;
    fn stats(&self) -> QueueStats;
    /// Free bytes on this node's queue filesystem, for a backend that has one.
    fn disk_free_bytes(&self) -> Option<u64>;
    /// The keys records are sealed with, when the queue encrypts at rest.
    fn encryption(&self) -> Option<Arc<QueueEncryption>>;
    /// The ordered logs sinks deliver from: one runner per log and sink.
    fn delivery_logs(&self) -> Vec<Arc<dyn DeliveryLog>>;
    /// Names of the consumers that hold a position in this queue (configured here or not).
    fn cursor_names(&self) -> Vec<String> {
        Vec::new()
    }
    /// Figures only this backend has, for `/metrics` (each sample labelled with the region by
    /// the caller).
    fn backend_samples(&self) -> Vec<BackendSample> {
        Vec::new()
    }
    /// Stops taking appends after those already sent are stored. Blocking for the local log.
    /// A task the queue needs run for as long as it is open (the JetStream monitor), started by
    /// the queue's owner (the node's supervisor, which restarts it if it fails): a function that
    /// makes one run of it, ending when `stop` becomes true. `None` for a queue that needs none.
    fn maintenance(&self) -> Option<QueueMaintenance> {
        None
    }

    fn close(&self);
}

/// One figure of a backend for `/metrics`: `meridian_<name>{region, labels...}`.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSample {
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// One ordered log a sink delivers from.
#[async_trait]
pub trait DeliveryLog: Send + Sync + 'static {
    /// Names the log's positions across every node and every life of the log: with a range it
    /// names a batch (see `DeliveryBatch::name`).
    fn source(&self) -> Arc<str>;
    /// Tells this log apart from the region's others in metrics and logs (`None`: the region has
    /// one log).
    fn partition(&self) -> Option<String>;
    /// The position one past the last durable record.
    fn durable_end(&self) -> u64;
    /// Wakes whenever the durable end moves.
    fn subscribe_durable_end(&self) -> watch::Receiver<u64>;
    /// Opens the sink's cursor. A replicated log lets one node at a time deliver a given log to a
    /// given sink: this waits until this node holds that right.
    async fn open_cursor(&self, sink: &str) -> Result<Box<dyn LogCursor>, QueueError>;
    /// Whether only this node can deliver the log (the local log: a stopping node opens its
    /// cursor and delivers what it holds before it stops) or any node of the region can (a
    /// replicated log: a runner still waiting for the right to deliver gives up at shutdown; the
    /// owner delivers what it can until the shutdown deadline, then hands over).
    fn is_node_local(&self) -> bool;
}

/// A sink's persisted position in a log.
#[async_trait]
pub trait LogCursor: Send {
    fn state(&self) -> CursorState;
    /// Reads records from `from` on, never past the durable end: at most `max_records`, stopping
    /// once `max_bytes` of payload are read (at least one record when any is available).
    async fn read(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError>;
    /// Reads the records of `range` (to redeliver an in-flight range exactly).
    async fn read_range(&mut self, range: OffsetRange) -> Result<Vec<Record>, QueueError>;
    /// Persists `range` as in flight before it is handed to the sink.
    async fn begin(&mut self, range: OffsetRange) -> Result<(), QueueError>;
    /// Persists that every record below `next_offset` is delivered.
    async fn commit(&mut self, next_offset: u64) -> Result<(), QueueError>;
    /// Gives up this node's right to deliver, on a clean stop (another node may take over now).
    async fn release(&mut self) {}
}

#[async_trait]
impl QueueBackend for RegionQueue {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn identity(&self) -> String {
        self.incarnation().to_string()
    }

    fn new_batch(&self) -> RecordBatch {
        RegionQueue::new_batch(self)
    }

    async fn append_batch(&self, batch: RecordBatch) -> Result<(), QueueError> {
        self.append(batch).await.map(|_range| ())
    }

    fn is_writable(&self) -> bool {
        RegionQueue::is_writable(self)
    }

    fn stats(&self) -> QueueStats {
        RegionQueue::stats(self)
    }

    fn disk_free_bytes(&self) -> Option<u64> {
        RegionQueue::disk_free_bytes(self)
    }

    fn encryption(&self) -> Option<Arc<QueueEncryption>> {
        RegionQueue::encryption(self)
    }

    fn delivery_logs(&self) -> Vec<Arc<dyn DeliveryLog>> {
        vec![Arc::new(self.clone())]
    }

    fn cursor_names(&self) -> Vec<String> {
        RegionQueue::cursor_names(self).unwrap_or_default()
    }

    fn close(&self) {
        RegionQueue::close(self)
    }
}

impl From<RegionQueue> for Arc<dyn DeliveryLog> {
    fn from(queue: RegionQueue) -> Arc<dyn DeliveryLog> {
        Arc::new(queue)
    }
}

#[async_trait]
impl DeliveryLog for RegionQueue {
    fn source(&self) -> Arc<str> {
        Arc::from(self.incarnation())
    }

    fn partition(&self) -> Option<String> {
        None
    }

    fn durable_end(&self) -> u64 {
        RegionQueue::durable_end(self)
    }

    fn subscribe_durable_end(&self) -> watch::Receiver<u64> {
        RegionQueue::subscribe_durable_end(self)
    }

    async fn open_cursor(&self, sink: &str) -> Result<Box<dyn LogCursor>, QueueError> {
        let queue = self.clone();
        let sink = sink.to_string();
        let consumer = tokio::task::spawn_blocking(move || queue.consumer(&sink))
            .await
            .map_err(|join_error| {
                QueueError::Broken(format!("opening the cursor panicked: {join_error}"))
            })??;
        Ok(Box::new(LocalCursor {
            state: consumer.state(),
            consumer: Some(consumer),
        }))
    }

    fn is_node_local(&self) -> bool {
        true
    }
}

/// A cursor file of the local log; its blocking file I/O runs on the blocking pool.
struct LocalCursor {
    /// Taken while a blocking call holds it.
    consumer: Option<Consumer>,
    state: CursorState,
}

impl LocalCursor {
    async fn with_consumer<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Consumer) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let mut taken = self.consumer.take().ok_or(QueueError::Closed)?;
        let (returned, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = work(&mut taken);
            (taken, outcome)
        })
        .await
        .map_err(|join_error| QueueError::Broken(format!("queue reader panicked: {join_error}")))?;
        self.state = returned.state();
        self.consumer = Some(returned);
        outcome
    }
}

#[async_trait]
impl LogCursor for LocalCursor {
    fn state(&self) -> CursorState {
        self.state
    }

    async fn read(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        self.with_consumer(move |consumer| consumer.read(from, max_records, max_bytes))
            .await
    }

    async fn read_range(&mut self, range: OffsetRange) -> Result<Vec<Record>, QueueError> {
        self.with_consumer(move |consumer| consumer.read_range(range))
            .await
    }

    async fn begin(&mut self, range: OffsetRange) -> Result<(), QueueError> {
        self.with_consumer(move |consumer| consumer.begin(range))
            .await
    }

    async fn commit(&mut self, next_offset: u64) -> Result<(), QueueError> {
        self.with_consumer(move |consumer| consumer.commit(next_offset))
            .await
    }
}
