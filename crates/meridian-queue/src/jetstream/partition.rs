//! One partition of a region: a stream, its figures, the purge of what every sink delivered, and
//! the [`DeliveryLog`] over it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use tokio::sync::watch;
use tracing::info;

use futures_util::StreamExt;

use super::{JetStreamSettings, bounded, cursor, unavailable};
use crate::backend::{DeliveryLog, LogCursor};
use crate::error::QueueError;

#[derive(Clone, Debug, Default)]
pub(super) struct PartitionFigures {
    pub(super) first_sequence: u64,
    pub(super) last_sequence: u64,
    pub(super) messages: u64,
    pub(super) bytes: u64,
    /// Cursor position by sink, as last read by the monitor.
    pub(super) positions: BTreeMap<String, u64>,
}

/// One partition: a stream of the region and the [`DeliveryLog`] over it.
pub struct Partition {
    pub(super) index: u32,
    pub(super) stream_name: String,
    pub(super) subject: String,
    pub(super) source: Arc<str>,
    pub(super) end: watch::Sender<u64>,
    pub(super) figures: Mutex<PartitionFigures>,
    pub(super) context: jetstream::Context,
    pub(super) cursors: kv::Store,
    pub(super) settings: Arc<JetStreamSettings>,
}

impl Partition {
    pub(super) fn note_end(&self, end: u64) {
        self.end.send_if_modified(|current| {
            if end > *current {
                *current = end;
                true
            } else {
                false
            }
        });
    }

    pub(super) fn cursor_key(&self, sink: &str) -> String {
        format!("{sink}.p{}", self.index)
    }

    pub(super) fn figures(&self) -> PartitionFigures {
        self.figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(super) async fn stream_info(&self) -> Result<stream::Info, QueueError> {
        stream_info(
            &self.context,
            &self.stream_name,
            self.settings.request_timeout,
        )
        .await
    }

    /// Reads the stream's state into the figures and the durable end.
    pub(super) async fn refresh(&self) -> Result<(), QueueError> {
        let info = self.stream_info().await?;
        self.note_end(info.state.last_sequence + 1);
        let mut figures = self
            .figures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        figures.first_sequence = info.state.first_sequence;
        figures.last_sequence = info.state.last_sequence;
        figures.messages = info.state.messages;
        figures.bytes = info.state.bytes;
        Ok(())
    }

    /// Reads every cursor of the sinks this node runs and purges what all of them delivered.
    pub(super) async fn purge_delivered(&self) -> Result<(), QueueError> {
        let timeout = self.settings.request_timeout;
        // Every sink that has a cursor in this partition counts, whether this node runs it or not
        // (a node whose config lacks a sink must not purge what that sink has not delivered).
        let suffix = format!(".p{}", self.index);
        let listed = async {
            let keys = self
                .cursors
                .keys()
                .await
                .map_err(|error| unavailable("listing the cursors", error))?;
            keys.collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<Vec<String>, _>>()
                .map_err(|error| unavailable("listing the cursors", error))
        };
        let keys = tokio::time::timeout(timeout, listed)
            .await
            .map_err(|_| unavailable("listing the cursors", "timed out"))??;
        let mut positions = BTreeMap::new();
        for key in keys {
            let Some(sink) = key.strip_suffix(&suffix) else {
                continue;
            };
            let entry = bounded(timeout, "reading a cursor", self.cursors.entry(&key)).await?;
            let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
                continue;
            };
            if let Some(next_offset) = cursor::next_offset_in(&entry.value) {
                positions.insert(sink.to_string(), next_offset);
            }
        }
        let every_sink_has_a_cursor = self
            .settings
            .sinks
            .iter()
            .all(|sink| positions.contains_key(sink));
        let slowest = positions.values().copied().min();
        let first_sequence = {
            let mut figures = self
                .figures
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            figures.positions = positions;
            figures.first_sequence
        };
        let Some(slowest) = slowest.filter(|_| every_sink_has_a_cursor) else {
            return Ok(());
        };
        if slowest <= first_sequence.max(1) {
            return Ok(());
        }
        let stream = bounded(
            timeout,
            "opening the stream",
            self.context.get_stream_no_info(&self.stream_name),
        )
        .await?;
        // Removes every message below `slowest` (all sinks delivered them).
        let purged = bounded(
            timeout,
            "purging delivered messages",
            stream.purge().sequence(slowest).into_future(),
        )
        .await?;
        if purged.purged > 0 {
            info!(region = %self.settings.region, stream = %self.stream_name, below = slowest, purged = purged.purged, "purged delivered messages from the stream");
        }
        Ok(())
    }
}

/// A stream's current state, as its leader reports it.
pub(super) async fn stream_info(
    context: &jetstream::Context,
    stream_name: &str,
    timeout: std::time::Duration,
) -> Result<stream::Info, QueueError> {
    let stream = bounded(
        timeout,
        "reading the stream's state",
        context.get_stream(stream_name),
    )
    .await?;
    Ok(stream.cached_info().clone())
}

#[async_trait]
impl DeliveryLog for Partition {
    fn source(&self) -> Arc<str> {
        Arc::clone(&self.source)
    }

    fn partition(&self) -> Option<String> {
        Some(format!("p{}", self.index))
    }

    fn durable_end(&self) -> u64 {
        *self.end.borrow()
    }

    fn subscribe_durable_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    async fn open_cursor(&self, sink: &str) -> Result<Box<dyn LogCursor>, QueueError> {
        cursor::open(self, sink).await
    }

    fn is_node_local(&self) -> bool {
        false
    }
}
