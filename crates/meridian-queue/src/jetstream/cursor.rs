//! A sink's cursor in a partition: a KV entry written only by compare-and-set, owned by one node at
//! a time (see the module documentation of [`super`]).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::read::{StreamReader, create_reader, fetch};
use super::{FETCH_MAX_MESSAGES, JetStreamSettings, Partition, bounded, unavailable};
use crate::backend::LogCursor;
use crate::consumer::{CursorState, Record};
use crate::error::QueueError;
use crate::queue::OffsetRange;

/// A sink's cursor in a partition, as kept in the cursor bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct CursorValue {
    next_offset: u64,
    in_flight: Option<OffsetRange>,
    /// The node that may deliver (empty: released).
    owner: String,
    /// Bumped by every renewal, so that a live owner always changes the revision.
    beat: u64,
}

/// The position a cursor entry holds (`None`: not a cursor entry).
pub(super) fn next_offset_in(entry: &[u8]) -> Option<u64> {
    serde_json::from_slice::<CursorValue>(entry)
        .ok()
        .map(|value| value.next_offset)
}

/// Opens the sink's cursor in the partition once this node owns it (waiting until then), and
/// keeps it renewed while the cursor lives.
pub(super) async fn open(
    partition: &Partition,
    sink: &str,
) -> Result<Box<dyn LogCursor>, QueueError> {
    let key = partition.cursor_key(sink);
    let (revision, value) = partition.acquire(sink, &key).await?;
    let state = CursorState {
        next_offset: value.next_offset,
        in_flight: value.in_flight,
    };
    let held = Arc::new(tokio::sync::Mutex::new(Held { revision, value }));
    let lost = Arc::new(AtomicBool::new(false));
    let heartbeat = tokio::spawn(renew(
        partition.cursors.clone(),
        key.clone(),
        Arc::clone(&held),
        Arc::clone(&lost),
        Arc::clone(&partition.settings),
    ));
    Ok(Box::new(JetStreamCursor {
        key,
        state,
        held,
        lost,
        heartbeat,
        cursors: partition.cursors.clone(),
        context: partition.context.clone(),
        stream_name: partition.stream_name.clone(),
        settings: Arc::clone(&partition.settings),
        reader: None,
    }))
}

/// The cursor entry as this node last wrote it.
struct Held {
    revision: u64,
    value: CursorValue,
}

impl Partition {
    /// Waits until this node owns the sink's cursor entry in this partition, then returns it.
    async fn acquire(&self, sink: &str, key: &str) -> Result<(u64, CursorValue), QueueError> {
        let settings = &self.settings;
        let timeout = settings.request_timeout;
        let me = settings.node_id.as_str();
        // The revision last seen held by another node, and since when.
        let mut watched: Option<(u64, Instant)> = None;
        loop {
            let entry = bounded(timeout, "reading a cursor", self.cursors.entry(key)).await?;
            let current = entry.filter(|entry| entry.operation == kv::Operation::Put);
            let Some(entry) = current else {
                let info = self.stream_info().await?;
                let value = CursorValue {
                    next_offset: info.state.first_sequence.max(1),
                    in_flight: None,
                    owner: me.to_string(),
                    beat: 0,
                };
                let created =
                    tokio::time::timeout(timeout, self.cursors.create(key, encode_cursor(&value)?))
                        .await
                        .map_err(|_| unavailable("creating a cursor", "timed out"))?;
                match created {
                    Ok(revision) => {
                        info!(region = %settings.region, stream = %self.stream_name, sink, next_offset = value.next_offset, "created the sink's cursor in this partition");
                        return Ok((revision, value));
                    }
                    Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(error) => return Err(unavailable("creating a cursor", error)),
                }
            };
            let mut value: CursorValue =
                serde_json::from_slice(&entry.value).map_err(|error| QueueError::BadCursor {
                    path: PathBuf::from(format!("{}/{key}", settings.cursor_bucket())),
                    message: error.to_string(),
                })?;
            let is_free = value.owner.is_empty() || value.owner == me;
            let is_abandoned = match watched {
                Some((revision, since)) if revision == entry.revision => {
                    since.elapsed() >= settings.lease
                }
                _ => {
                    watched = Some((entry.revision, Instant::now()));
                    false
                }
            };
            if !is_free && !is_abandoned {
                tokio::time::sleep(settings.lease / 4).await;
                continue;
            }
            let previous_owner = std::mem::replace(&mut value.owner, me.to_string());
            value.beat += 1;
            let updated = tokio::time::timeout(
                timeout,
                self.cursors
                    .update(key, encode_cursor(&value)?, entry.revision),
            )
            .await
            .map_err(|_| unavailable("taking over a cursor", "timed out"))?;
            match updated {
                Ok(revision) => {
                    if is_abandoned && !previous_owner.is_empty() && previous_owner != me {
                        warn!(region = %settings.region, stream = %self.stream_name, sink, previous_owner, next_offset = value.next_offset, in_flight = ?value.in_flight, "took over the delivery of this partition from a node that stopped renewing it");
                    }
                    return Ok((revision, value));
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(error) => return Err(unavailable("taking over a cursor", error)),
            }
        }
    }
}

fn encode_cursor(value: &CursorValue) -> Result<Bytes, QueueError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|error| QueueError::Unavailable(format!("encoding a cursor: {error}")))
}

/// Renews the cursor entry while this node holds it; marks it lost when another node took it.
async fn renew(
    cursors: kv::Store,
    key: String,
    held: Arc<tokio::sync::Mutex<Held>>,
    lost: Arc<AtomicBool>,
    settings: Arc<JetStreamSettings>,
) {
    loop {
        tokio::time::sleep(settings.lease / 3).await;
        let mut held = held.lock().await;
        let mut value = held.value.clone();
        value.beat += 1;
        let Ok(encoded) = encode_cursor(&value) else {
            return;
        };
        let updated = tokio::time::timeout(
            settings.request_timeout,
            cursors.update(&key, encoded, held.revision),
        )
        .await;
        match updated {
            Ok(Ok(revision)) => {
                held.revision = revision;
                held.value = value;
            }
            Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                warn!(region = %settings.region, key, "another node took over this cursor; this node stops delivering it");
                lost.store(true, Ordering::Release);
                return;
            }
            Ok(Err(error)) => {
                warn!(region = %settings.region, key, %error, "could not renew the cursor (retried)")
            }
            Err(_) => {
                warn!(region = %settings.region, key, "renewing the cursor timed out (retried)")
            }
        }
    }
}

/// Where a reader stands in the stream, and what it makes of the next message a consumer sends.
///
/// A reader hands out every message of the stream from its start on, in sequence order, each
/// once: a consumer is only believed as far as it continues exactly where the reader stands.
/// Messages below `next_sequence` (a consumer whose server was killed resumes from an older state
/// and sends them again) are dropped, and a jump past `next_sequence` (messages sent to a fetch
/// that was cut short) retires the consumer: a new one created at `next_sequence` then shows what
/// the stream really holds there, since the first message a fresh consumer delivers is the first
/// the stream has at or after its start (a gap before it is the stream's own, e.g. messages an
/// operator removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ReadOrder {
    next_sequence: u64,
    /// No message taken yet: the first one may be past `next_sequence`.
    fresh: bool,
    /// The consumer skipped messages: it is replaced before the next fetch.
    retired: bool,
}

/// What a reader does with a message a consumer sent.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Take,
    /// Already handed out.
    Repeated,
    /// Past a gap this consumer cannot vouch for: it and everything after it in this fetch.
    Retire,
}

impl ReadOrder {
    fn starting_at(sequence: u64) -> ReadOrder {
        ReadOrder {
            next_sequence: sequence.max(1),
            fresh: true,
            retired: false,
        }
    }

    fn admit(&mut self, sequence: u64) -> Admission {
        if self.retired {
            return Admission::Retire;
        }
        if sequence < self.next_sequence {
            return Admission::Repeated;
        }
        if sequence > self.next_sequence && !self.fresh {
            self.retired = true;
            return Admission::Retire;
        }
        self.fresh = false;
        self.next_sequence = sequence + 1;
        Admission::Take
    }
}

/// An ephemeral consumer, where it stands, and what it fetched that was not yet used.
struct Reader {
    consumer: StreamReader,
    order: ReadOrder,
    buffered: VecDeque<Record>,
}

impl Reader {
    fn position(&self) -> u64 {
        self.buffered
            .front()
            .map(|record| record.offset)
            .unwrap_or(self.order.next_sequence)
    }

    /// Whether the next read from `from` can continue with this reader.
    fn continues_at(&self, from: u64) -> bool {
        self.position() == from && !(self.order.retired && self.buffered.is_empty())
    }

    /// Takes what a fetch returned, as far as it continues the reader exactly; returns how many
    /// messages it dropped as already handed out.
    fn take_fetched(
        &mut self,
        fetched: Vec<(u64, Bytes)>,
        encryption: Option<&crate::encryption::QueueEncryption>,
    ) -> Result<usize, QueueError> {
        let mut repeated = 0;
        for (sequence, payload) in fetched {
            match self.order.admit(sequence) {
                Admission::Repeated => repeated += 1,
                Admission::Retire => break,
                Admission::Take => {
                    let payload = match encryption {
                        Some(encryption) => encryption.open(&payload)?,
                        None => payload.to_vec(),
                    };
                    self.buffered.push_back(Record {
                        offset: sequence,
                        payload,
                    });
                }
            }
        }
        Ok(repeated)
    }
}

struct JetStreamCursor {
    key: String,
    state: CursorState,
    held: Arc<tokio::sync::Mutex<Held>>,
    lost: Arc<AtomicBool>,
    heartbeat: JoinHandle<()>,
    cursors: kv::Store,
    context: jetstream::Context,
    stream_name: String,
    settings: Arc<JetStreamSettings>,
    reader: Option<Reader>,
}

impl Drop for JetStreamCursor {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl JetStreamCursor {
    /// Writes the cursor's next value (compare-and-set on the revision this node holds).
    async fn write(&mut self, state: CursorState) -> Result<(), QueueError> {
        if self.lost.load(Ordering::Acquire) {
            return Err(QueueError::LeaseLost(self.key.clone()));
        }
        let mut held = self.held.lock().await;
        let mut value = held.value.clone();
        value.next_offset = state.next_offset;
        value.in_flight = state.in_flight;
        value.beat += 1;
        let updated = tokio::time::timeout(
            self.settings.request_timeout,
            self.cursors
                .update(&self.key, encode_cursor(&value)?, held.revision),
        )
        .await
        .map_err(|_| unavailable("writing the cursor", "timed out"))?;
        match updated {
            Ok(revision) => {
                held.revision = revision;
                held.value = value;
                self.state = state;
                Ok(())
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.lost.store(true, Ordering::Release);
                Err(QueueError::LeaseLost(self.key.clone()))
            }
            Err(error) => Err(unavailable("writing the cursor", error)),
        }
    }

    async fn position_reader(&mut self, from: u64) -> Result<(), QueueError> {
        if self
            .reader
            .as_ref()
            .is_some_and(|reader| reader.continues_at(from))
        {
            return Ok(());
        }
        self.drop_reader();
        let timeout = self.settings.request_timeout;
        let consumer = create_reader(&self.context, &self.stream_name, from, timeout).await?;
        self.reader = Some(Reader {
            consumer,
            order: ReadOrder::starting_at(from),
            buffered: VecDeque::new(),
        });
        Ok(())
    }

    /// Drops the reader and deletes its consumer (best effort: an ephemeral consumer also goes
    /// away by itself when left inactive).
    fn drop_reader(&mut self) {
        let Some(old) = self.reader.take() else {
            return;
        };
        let name = old.consumer.cached_info().name.clone();
        let context = self.context.clone();
        let stream_name = self.stream_name.clone();
        let timeout = self.settings.request_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(
                timeout,
                context.delete_consumer_from_stream(name, stream_name),
            )
            .await;
        });
    }

    /// Reads records in `[from, end)`, at most `max_records`, stopping past `max_bytes`.
    async fn read_below(
        &mut self,
        from: u64,
        end: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        self.position_reader(from).await?;
        if let Err(error) = self.fetch_into_reader(end, max_records).await {
            // A fetch cut short may have taken messages with it: the next read starts over.
            self.drop_reader();
            return Err(error);
        }
        let Some(reader) = self.reader.as_mut() else {
            return Err(QueueError::Closed);
        };
        let mut records = Vec::new();
        let mut payload_bytes = 0usize;
        while let Some(record) = reader.buffered.front() {
            let is_full =
                records.len() >= max_records || (!records.is_empty() && payload_bytes >= max_bytes);
            if record.offset >= end || is_full {
                break;
            }
            let Some(record) = reader.buffered.pop_front() else {
                break;
            };
            payload_bytes += record.payload.len();
            records.push(record);
        }
        debug_assert!(
            records.first().is_none_or(|record| record.offset >= from)
                && records
                    .windows(2)
                    .all(|pair| pair[0].offset < pair[1].offset),
            "a read hands out records from `from` on, in order, each once"
        );
        Ok(records)
    }

    /// Fetches the reader's next messages below `end` when it has none buffered.
    async fn fetch_into_reader(&mut self, end: u64, max_records: usize) -> Result<(), QueueError> {
        let timeout = self.settings.request_timeout;
        let Some(reader) = self.reader.as_mut() else {
            return Err(QueueError::Closed);
        };
        if !reader.buffered.is_empty() || reader.order.next_sequence >= end {
            return Ok(());
        }
        let wanted = ((end - reader.order.next_sequence) as usize)
            .min(max_records)
            .min(FETCH_MAX_MESSAGES);
        let fetched = fetch(&reader.consumer, wanted, timeout).await?;
        let expected = reader.order.next_sequence;
        let repeated = reader.take_fetched(fetched, self.settings.encryption.as_deref())?;
        if repeated > 0 {
            warn!(region = %self.settings.region, stream = %self.stream_name, repeated, next_sequence = reader.order.next_sequence, "the stream's reader delivered messages it had already delivered (its server resumed an older state); they were dropped");
        }
        if reader.order.retired {
            warn!(region = %self.settings.region, stream = %self.stream_name, expected, "the stream's reader skipped messages; reading again from that sequence with a new reader");
        }
        Ok(())
    }
}

#[async_trait]
impl LogCursor for JetStreamCursor {
    fn state(&self) -> CursorState {
        self.state
    }

    async fn read(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        self.read_below(from, u64::MAX, max_records, max_bytes)
            .await
    }

    async fn read_range(&mut self, range: OffsetRange) -> Result<Vec<Record>, QueueError> {
        let mut records: Vec<Record> = Vec::with_capacity(range.len() as usize);
        let mut from = range.start;
        while from < range.end {
            let chunk = self
                .read_below(from, range.end, (range.end - from) as usize, usize::MAX)
                .await?;
            let Some(last) = chunk.last() else {
                let asked_a_fresh_reader = self
                    .reader
                    .as_ref()
                    .is_some_and(|reader| reader.order.fresh);
                if !asked_a_fresh_reader {
                    // Only a new consumer's answer says what the stream holds from here.
                    self.drop_reader();
                    continue;
                }
                let info = super::partition::stream_info(
                    &self.context,
                    &self.stream_name,
                    self.settings.request_timeout,
                )
                .await?;
                if info.state.last_sequence >= from {
                    // The range's messages are in the stream but this consumer's server does
                    // not show them yet (a replica catching up): an incomplete range must never
                    // be delivered under the range's name, so this attempt fails and is retried.
                    self.drop_reader();
                    return Err(unavailable(
                        "reading the in-flight range",
                        format!("sequences {from}..{} are not readable yet", range.end),
                    ));
                }
                // Nothing at or after `from` in the stream (gone before the range ended): what
                // was read is the whole range.
                break;
            };
            from = last.offset + 1;
            records.extend(chunk);
        }
        Ok(records)
    }

    async fn begin(&mut self, range: OffsetRange) -> Result<(), QueueError> {
        let next_offset = self.state.next_offset;
        self.write(CursorState {
            next_offset,
            in_flight: Some(range),
        })
        .await
    }

    async fn commit(&mut self, next_offset: u64) -> Result<(), QueueError> {
        self.write(CursorState {
            next_offset,
            in_flight: None,
        })
        .await
    }

    async fn release(&mut self) {
        self.heartbeat.abort();
        if self.lost.load(Ordering::Acquire) {
            return;
        }
        let held = self.held.lock().await;
        let mut value = held.value.clone();
        value.owner.clear();
        value.beat += 1;
        let Ok(encoded) = encode_cursor(&value) else {
            return;
        };
        let _ = tokio::time::timeout(
            self.settings.request_timeout,
            self.cursors.update(&self.key, encoded, held.revision),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_value_round_trips_through_its_json() {
        let value = CursorValue {
            next_offset: 42,
            in_flight: Some(OffsetRange { start: 42, end: 50 }),
            owner: "node-a".to_string(),
            beat: 7,
        };
        let encoded = encode_cursor(&value).unwrap();
        let decoded: CursorValue = serde_json::from_slice(&encoded).unwrap();
        assert_eq!(decoded, value);
    }

    fn admissions(order: &mut ReadOrder, sequences: &[u64]) -> Vec<Admission> {
        sequences
            .iter()
            .map(|sequence| order.admit(*sequence))
            .collect()
    }

    #[test]
    fn a_consumer_that_sends_messages_again_has_them_dropped() {
        let mut order = ReadOrder::starting_at(711);
        assert!(
            admissions(&mut order, &[711, 712, 713])
                .iter()
                .all(|admission| *admission == Admission::Take)
        );
        // Its server restarted and resumed the consumer from its first state.
        assert_eq!(
            admissions(&mut order, &[711, 712, 713, 714]),
            [
                Admission::Repeated,
                Admission::Repeated,
                Admission::Repeated,
                Admission::Take
            ]
        );
        assert_eq!(order.next_sequence, 715);
        assert!(!order.retired);
    }

    #[test]
    fn a_jump_retires_the_consumer_and_a_fresh_one_is_believed_about_gaps() {
        let mut order = ReadOrder::starting_at(10);
        assert_eq!(
            admissions(&mut order, &[10, 11]),
            [Admission::Take, Admission::Take]
        );
        assert_eq!(
            admissions(&mut order, &[14, 15]),
            [Admission::Retire, Admission::Retire]
        );
        assert_eq!(
            order.next_sequence, 12,
            "nothing past the jump is taken from it"
        );
        // A new consumer at 12 whose first message is 14: 12 and 13 are not in the stream.
        let mut fresh = ReadOrder::starting_at(order.next_sequence);
        assert_eq!(
            admissions(&mut fresh, &[14, 15]),
            [Admission::Take, Admission::Take]
        );
        assert_eq!(fresh.next_sequence, 16);
    }

    #[test]
    fn a_fresh_reader_starts_at_sequence_one_at_the_earliest() {
        let mut order = ReadOrder::starting_at(0);
        assert_eq!(order.next_sequence, 1);
        assert_eq!(order.admit(1), Admission::Take);
    }
}
