//! Consumers: a sink's persisted cursor plus a sequential reader over the segments.
//!
//! A sink delivers a batch in three steps: `begin(range)` persists the range it is about to
//! deliver, the sink delivers it, `commit(range.end)` persists the new position. After a crash the
//! persisted in-flight range is delivered again, exactly as it was, so writes keyed by the range
//! (archive object names, ClickHouse dedup tokens) overwrite instead of duplicating.

use std::fs::{self, File};
use std::io::{BufReader, ErrorKind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::error::QueueError;
use crate::queue::{OffsetRange, Shared};
use crate::segment::{NextRecord, check_segment_header, read_record, replace_file_durably};

/// One record read back from the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// A consumer's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorState {
    /// Every record below this offset has been delivered.
    pub next_offset: u64,
    /// A range whose delivery began and may not have finished.
    pub in_flight: Option<OffsetRange>,
}

/// What a cursor file holds: the position, and the incarnation whose offsets it counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CursorFile {
    pub next_offset: u64,
    pub in_flight: Option<OffsetRange>,
    /// Absent in cursor files written before incarnations existed.
    #[serde(default)]
    pub incarnation: Option<String>,
}

impl CursorFile {
    pub fn state(&self) -> CursorState {
        CursorState {
            next_offset: self.next_offset,
            in_flight: self.in_flight,
        }
    }

    /// The highest offset this cursor has begun to deliver up to.
    pub fn highest_position(&self) -> u64 {
        self.next_offset
            .max(self.in_flight.map(|range| range.end).unwrap_or(0))
    }
}

struct SegmentReader {
    path: PathBuf,
    reader: BufReader<File>,
    next_offset: u64,
}

pub struct Consumer {
    shared: Arc<Shared>,
    name: String,
    cursor_path: PathBuf,
    state: CursorState,
    reader: Option<SegmentReader>,
}

pub(crate) fn read_cursor_file(path: &Path) -> Result<Option<CursorFile>, QueueError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(QueueError::io("reading cursor", path, error)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| QueueError::BadCursor {
            path: path.to_path_buf(),
            message: error.to_string(),
        })
}

impl Consumer {
    pub(crate) fn open(shared: Arc<Shared>, name: &str) -> Result<Consumer, QueueError> {
        let is_safe_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !is_safe_name {
            return Err(QueueError::BadCursor {
                path: PathBuf::from(name),
                message: "consumer names use ASCII letters, digits, '-' and '_'".into(),
            });
        }
        let cursor_path = shared.cursors_dir.join(format!("{name}.cursor"));
        let first_offset = shared.first_offset();
        let durable_end = shared.durable_end();
        let oldest = CursorState {
            next_offset: first_offset,
            in_flight: None,
        };
        let (mut state, mut must_persist) = match read_cursor_file(&cursor_path)? {
            None => (oldest, true),
            Some(cursor) if shared.owns_cursor(cursor.incarnation.as_deref()) => {
                (cursor.state(), cursor.incarnation.is_none())
            }
            Some(cursor) => {
                warn!(
                    consumer = name,
                    cursor_incarnation = cursor.incarnation.as_deref().unwrap_or("none"),
                    queue_incarnation = %shared.incarnation,
                    cursor = cursor.next_offset,
                    first_offset,
                    "consumer cursor was written for another incarnation of this queue: its offsets name other records; redelivering from the oldest record (duplicates collapse, nothing is skipped)"
                );
                (oldest, true)
            }
        };
        if state.next_offset < first_offset {
            warn!(
                consumer = name,
                cursor = state.next_offset,
                first_offset,
                "consumer cursor points before the oldest queue segment (it was not registered when those were deleted); resuming at the oldest record"
            );
            state = oldest;
            must_persist = true;
        }
        if state.next_offset > durable_end
            || state
                .in_flight
                .is_some_and(|range| range.end > durable_end || range.start != state.next_offset)
        {
            warn!(
                consumer = name,
                cursor = state.next_offset,
                in_flight = ?state.in_flight,
                durable_end,
                "consumer cursor is beyond the queue's end; resuming at the end"
            );
            state = CursorState {
                next_offset: state.next_offset.min(durable_end),
                in_flight: None,
            };
            must_persist = true;
        }
        let mut consumer = Consumer {
            shared,
            name: name.to_string(),
            cursor_path,
            state,
            reader: None,
        };
        if must_persist {
            // On disk at once, so that the queue's on-disk cursor floor protects this consumer's
            // records even while it is not registered in a process.
            consumer.persist(state)?;
        }
        consumer
            .shared
            .lock_positions()
            .insert(consumer.name.clone(), state.next_offset);
        Ok(consumer)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> CursorState {
        self.state
    }

    pub fn durable_end(&self) -> u64 {
        self.shared.durable_end()
    }

    pub fn subscribe_durable_end(&self) -> watch::Receiver<u64> {
        self.shared.end_watch.subscribe()
    }

    /// Reads records from `from` on, never past the durable end: at most `max_records`, and
    /// stopping once `max_bytes` of payload are read (at least one record is returned when any is
    /// available). Blocking file I/O: call from `spawn_blocking` in async code.
    pub fn read(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, QueueError> {
        let end = self.shared.durable_end();
        let mut records = Vec::new();
        let mut payload_bytes = 0usize;
        let mut offset = from;
        while offset < end
            && records.len() < max_records
            && (records.is_empty() || payload_bytes < max_bytes)
        {
            match self.read_one(offset) {
                Ok(payload) => {
                    payload_bytes += payload.len();
                    records.push(Record { offset, payload });
                    offset += 1;
                }
                Err(failure) if records.is_empty() => return Err(failure),
                // Hand out what was read; the next read starting here reports the failure.
                Err(_) => break,
            }
        }
        Ok(records)
    }

    /// Reads exactly the records of `range` (for redelivering an in-flight range).
    pub fn read_range(&mut self, range: OffsetRange) -> Result<Vec<Record>, QueueError> {
        let mut records = Vec::with_capacity(range.len() as usize);
        while records.len() < range.len() as usize {
            let from = range.start + records.len() as u64;
            let remaining = (range.end - from) as usize;
            let chunk = self.read(from, remaining, usize::MAX)?;
            if chunk.is_empty() {
                return Err(QueueError::Corrupt {
                    path: self.shared.segments_dir.clone(),
                    position: from,
                    reason: format!("in-flight range {range:?} is no longer readable"),
                });
            }
            records.extend(chunk);
        }
        Ok(records)
    }

    fn read_one(&mut self, offset: u64) -> Result<Vec<u8>, QueueError> {
        let positioned = self
            .reader
            .as_ref()
            .is_some_and(|reader| reader.next_offset == offset);
        if !positioned {
            self.reader = Some(self.open_reader_at(offset)?);
        }
        loop {
            let reader = self.reader.as_mut().ok_or(QueueError::Closed)?;
            let next = read_record(&mut reader.reader)
                .map_err(|error| QueueError::io("reading segment", &reader.path, error))?;
            match next {
                NextRecord::Record(payload) => {
                    reader.next_offset += 1;
                    if payload.first() != Some(&crate::encryption::SEALED_MAGIC) {
                        return Ok(payload);
                    }
                    let Some(encryption) = &self.shared.config.encryption else {
                        reader.next_offset -= 1;
                        self.reader = None;
                        return Err(QueueError::Encryption(
                            "the queue holds encrypted records but no key file is configured"
                                .into(),
                        ));
                    };
                    return encryption.open(&payload).inspect_err(|_| {
                        // Reposition on the next read: this record is retried, never skipped.
                        self.reader = None;
                    });
                }
                NextRecord::End => {
                    // The segment ended at a record boundary: the record lives in the next one.
                    let path = reader.path.clone();
                    let next_segment = self.open_segment_starting_at(offset)?;
                    if next_segment.is_none() {
                        return Err(QueueError::Corrupt {
                            path,
                            position: offset,
                            reason: "segment ended before the durable end and no segment follows"
                                .into(),
                        });
                    }
                    self.reader = next_segment;
                }
                NextRecord::Invalid(reason) => {
                    let path = reader.path.clone();
                    self.reader = None;
                    return Err(QueueError::Corrupt {
                        path,
                        position: offset,
                        reason,
                    });
                }
            }
        }
    }

    fn open_segment_starting_at(&self, offset: u64) -> Result<Option<SegmentReader>, QueueError> {
        let path = {
            let segments = self.shared.lock_segments();
            segments
                .iter()
                .find(|segment| segment.base_offset == offset)
                .map(|segment| segment.path.clone())
        };
        let Some(path) = path else {
            return Ok(None);
        };
        Ok(Some(open_segment(path, offset)?))
    }

    fn open_reader_at(&self, offset: u64) -> Result<SegmentReader, QueueError> {
        let (path, base_offset) = {
            let segments = self.shared.lock_segments();
            let containing = segments
                .iter()
                .rev()
                .find(|segment| segment.base_offset <= offset)
                .ok_or_else(|| QueueError::Corrupt {
                    path: self.shared.segments_dir.clone(),
                    position: offset,
                    reason: "offset lies before the oldest segment".into(),
                })?;
            (containing.path.clone(), containing.base_offset)
        };
        let mut reader = open_segment(path, base_offset)?;
        while reader.next_offset < offset {
            match read_record(&mut reader.reader)
                .map_err(|error| QueueError::io("reading segment", &reader.path, error))?
            {
                NextRecord::Record(_) => reader.next_offset += 1,
                NextRecord::End | NextRecord::Invalid(_) => {
                    return Err(QueueError::Corrupt {
                        path: reader.path.clone(),
                        position: reader.next_offset,
                        reason: format!("cannot reach offset {offset}"),
                    });
                }
            }
        }
        Ok(reader)
    }

    /// After a `Corrupt` error at `offset`: the first offset of the next segment, past the
    /// damage, or `None` when the damage is in the active segment.
    pub fn offset_after_corruption(&self, offset: u64) -> Option<u64> {
        let segments = self.shared.lock_segments();
        segments
            .iter()
            .map(|segment| segment.base_offset)
            .find(|base_offset| *base_offset > offset)
    }

    /// Persists that `range` is about to be delivered.
    pub fn begin(&mut self, range: OffsetRange) -> Result<(), QueueError> {
        debug_assert_eq!(
            range.start, self.state.next_offset,
            "ranges are delivered in order"
        );
        let state = CursorState {
            next_offset: self.state.next_offset,
            in_flight: Some(range),
        };
        self.persist(state)
    }

    /// Persists that every record below `next_offset` is delivered, and lets the queue delete the
    /// segments every consumer has passed.
    pub fn commit(&mut self, next_offset: u64) -> Result<(), QueueError> {
        debug_assert!(
            next_offset >= self.state.next_offset,
            "cursors never move back"
        );
        self.persist(CursorState {
            next_offset,
            in_flight: None,
        })?;
        self.shared
            .lock_positions()
            .insert(self.name.clone(), next_offset);
        self.shared.collect_garbage();
        Ok(())
    }

    fn persist(&mut self, state: CursorState) -> Result<(), QueueError> {
        let file_contents = CursorFile {
            next_offset: state.next_offset,
            in_flight: state.in_flight,
            incarnation: Some(self.shared.incarnation.clone()),
        };
        let text = serde_json::to_vec(&file_contents).map_err(|error| QueueError::BadCursor {
            path: self.cursor_path.clone(),
            message: error.to_string(),
        })?;
        replace_file_durably(
            &self.shared.cursors_dir,
            &self.cursor_path,
            &text,
            "writing cursor",
        )?;
        self.state = state;
        Ok(())
    }
}

fn open_segment(path: PathBuf, base_offset: u64) -> Result<SegmentReader, QueueError> {
    let mut file =
        File::open(&path).map_err(|error| QueueError::io("opening segment", &path, error))?;
    if let Some(reason) = check_segment_header(&mut file, base_offset)
        .map_err(|error| QueueError::io("reading segment header", &path, error))?
    {
        return Err(QueueError::Corrupt {
            path,
            position: 0,
            reason,
        });
    }
    Ok(SegmentReader {
        path,
        reader: BufReader::with_capacity(1 << 20, file),
        next_offset: base_offset,
    })
}
