//! Consumers: a sink's persisted cursor plus a sequential reader over the segments.
//!
//! A sink delivers a batch in three steps: `begin(range)` persists the range it is about to
//! deliver, the sink delivers it, `commit(range.end)` persists the new position. After a crash the
//! persisted in-flight range is delivered again, exactly as it was, so writes keyed by the range
//! (archive object names, ClickHouse dedup tokens) overwrite instead of duplicating.

use std::fs::{self, File};
use std::io::{self, BufReader, ErrorKind, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::error::QueueError;
use crate::queue::{OffsetRange, Shared};
use crate::segment::{
    DamagedSpan, NextRecord, ResyncPoint, SegmentBytes, SegmentFormat, check_segment_header,
    find_next_record_in, read_record, replace_file_durably,
};

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
    base_offset: u64,
    format: SegmentFormat,
    reader: BufReader<CompletedBytes>,
    /// Byte position of the next record in the file.
    position: u64,
    /// The offset the next record has when it is intact.
    next_offset: u64,
}

/// A segment file read no further than the bytes its writer has completed
/// ([`Shared::completed_bytes`]). Past them lie a group being written, or the remains of a failed
/// write that the writer cuts off and then writes other records over: a reader that buffered such
/// bytes would read records that were never acknowledged, or see damage where the disk holds
/// intact records.
struct CompletedBytes {
    file: File,
    shared: Arc<Shared>,
    base_offset: u64,
    /// Where the next `read` starts in the file.
    position: u64,
}

impl io::Read for CompletedBytes {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let completed = self.shared.completed_bytes(self.base_offset);
        let allowed = completed.saturating_sub(self.position);
        let wanted = buffer
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        if wanted == 0 {
            return Ok(0);
        }
        let count = self.file.read(&mut buffer[..wanted])?;
        self.position += count as u64;
        Ok(count)
    }
}

impl io::Seek for CompletedBytes {
    fn seek(&mut self, target: SeekFrom) -> io::Result<u64> {
        self.position = self.file.seek(target)?;
        Ok(self.position)
    }
}

impl SegmentBytes for CompletedBytes {
    fn byte_length(&self) -> io::Result<u64> {
        Ok(self
            .file
            .byte_length()?
            .min(self.shared.completed_bytes(self.base_offset)))
    }

    fn read_bytes_at(&self, buffer: &mut [u8], position: u64) -> io::Result<usize> {
        let allowed = self.byte_length()?.saturating_sub(position);
        let wanted = buffer
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        self.file.read_bytes_at(&mut buffer[..wanted], position)
    }
}

impl SegmentReader {
    fn next_record(&mut self) -> io::Result<NextRecord> {
        let next = read_record(&mut self.reader, self.format, self.next_offset)?;
        if let NextRecord::Record { offset, payload } = &next {
            self.position += (self.format.record_header_bytes() + payload.len()) as u64;
            self.next_offset = offset + 1;
        }
        Ok(next)
    }

    /// Goes back or forward to an intact record.
    fn seek_to(&mut self, point: ResyncPoint) -> io::Result<()> {
        self.reader.seek(SeekFrom::Start(point.byte_position))?;
        self.position = point.byte_position;
        self.next_offset = point.offset;
        Ok(())
    }
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

    /// Reads the records of `range` (for redelivering an in-flight range): every one of them,
    /// except records lost to damage since the range was first read (counted and quarantined).
    pub fn read_range(&mut self, range: OffsetRange) -> Result<Vec<Record>, QueueError> {
        let mut records = Vec::with_capacity(range.len() as usize);
        let mut from = range.start;
        while from < range.end {
            let remaining = (range.end - from) as usize;
            match self.read(from, remaining, usize::MAX) {
                Ok(chunk) => {
                    let Some(last) = chunk.last() else {
                        return Err(QueueError::Corrupt {
                            path: self.shared.segments_dir.clone(),
                            position: from,
                            reason: format!("in-flight range {range:?} is no longer readable"),
                        });
                    };
                    from = last.offset + 1;
                    records.extend(chunk);
                }
                Err(QueueError::Damaged { missing, .. }) => from = missing.end.min(range.end),
                Err(other) => return Err(other),
            }
        }
        Ok(records)
    }

    /// Reads the record at `offset`. `Damaged` when it was lost to damage: the error names every
    /// lost offset, and the reader is left at the next intact record.
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
            let record_start = reader.position;
            let next = reader
                .next_record()
                .map_err(|error| QueueError::io("reading segment", &reader.path, error))?;
            match next {
                NextRecord::Record {
                    offset: found,
                    payload,
                } if found == offset => return self.open_payload(offset, payload),
                NextRecord::Record { offset: found, .. } if found > offset => {
                    // Records are absent without damaged bytes: the next one is intact.
                    let path = reader.path.clone();
                    reader
                        .seek_to(ResyncPoint {
                            byte_position: record_start,
                            offset: found,
                        })
                        .map_err(|error| QueueError::io("reading segment", &path, error))?;
                    return Err(QueueError::Damaged {
                        path,
                        missing: OffsetRange {
                            start: offset,
                            end: found,
                        },
                        reason: "records missing between intact records".into(),
                    });
                }
                NextRecord::Record { offset: found, .. } => {
                    let reason = format!("record numbered {found} where {offset} was expected");
                    return Err(self.skip_damage(offset, record_start, reason));
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
                    return Err(self.skip_damage(offset, record_start, reason));
                }
            }
        }
    }

    fn open_payload(&mut self, offset: u64, payload: Vec<u8>) -> Result<Vec<u8>, QueueError> {
        if payload.first() != Some(&crate::encryption::SEALED_MAGIC) {
            return Ok(payload);
        }
        let Some(encryption) = &self.shared.config.encryption else {
            self.reader = None;
            return Err(QueueError::Encryption(
                "the queue holds encrypted records but no key file is configured".into(),
            ));
        };
        encryption.open(&payload).inspect_err(|_| {
            // Reposition on the next read: this record is retried, never skipped.
            debug_assert!(offset < self.shared.durable_end());
            self.reader = None;
        })
    }

    /// The record at `offset` starts with damaged bytes at `damaged_at`. Finds the next intact
    /// record (in this segment, or the next segment's first), quarantines the bytes in between,
    /// positions the reader there and returns the `Damaged` error naming the lost offsets. When
    /// nothing intact follows in the active segment, returns `Corrupt` (the caller retries).
    fn skip_damage(&mut self, offset: u64, damaged_at: u64, reason: String) -> QueueError {
        let Some(mut reader) = self.reader.take() else {
            return QueueError::Closed;
        };
        match self.find_resync_point(&mut reader, offset, damaged_at, reason) {
            Ok((resync, error)) => {
                if resync {
                    self.reader = Some(reader);
                }
                error
            }
            Err(error) => error,
        }
    }

    /// Returns whether the reader was positioned past the damage, and the error to report.
    fn find_resync_point(
        &self,
        reader: &mut SegmentReader,
        offset: u64,
        damaged_at: u64,
        reason: String,
    ) -> Result<(bool, QueueError), QueueError> {
        let path = reader.path.clone();
        let file = reader.reader.get_ref();
        let io_error = |error| QueueError::io("resynchronising in segment", &path, error);
        let in_segment = find_next_record_in(
            reader.format,
            file,
            damaged_at,
            offset,
            self.shared.durable_end(),
        )
        .map_err(io_error)?;
        let (byte_end, end_missing_offset) = match in_segment {
            Some(point) => (point.byte_position, point.offset),
            None => {
                let Some(next_base) = self.offset_after_corruption(offset) else {
                    return Ok((
                        false,
                        QueueError::Corrupt {
                            path,
                            position: offset,
                            reason,
                        },
                    ));
                };
                (file.byte_length().map_err(io_error)?, next_base)
            }
        };
        let span = DamagedSpan {
            byte_start: damaged_at,
            byte_end,
            first_missing_offset: offset,
            end_missing_offset,
            reason: reason.clone(),
        };
        self.shared.damage.quarantine(
            &self.shared.config.dir,
            &path,
            reader.base_offset,
            file,
            &span,
        )?;
        if let Some(point) = in_segment {
            reader.seek_to(point).map_err(io_error)?;
        }
        let damaged = QueueError::Damaged {
            path,
            missing: OffsetRange {
                start: offset,
                end: end_missing_offset,
            },
            reason,
        };
        Ok((in_segment.is_some(), damaged))
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
        Ok(Some(open_segment(&self.shared, path, offset)?))
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
        let mut reader = open_segment(&self.shared, path.clone(), base_offset)?;
        let io_error = |error| QueueError::io("reading segment", &path, error);
        while reader.next_offset < offset {
            let record_start = reader.position;
            match reader.next_record().map_err(io_error)? {
                NextRecord::Record { offset: found, .. } if found >= offset => {
                    // Past the wanted offset already (it was lost): read_one reports the gap.
                    let point = ResyncPoint {
                        byte_position: record_start,
                        offset: found,
                    };
                    reader.seek_to(point).map_err(io_error)?;
                }
                NextRecord::Record { .. } => {}
                NextRecord::End => break,
                NextRecord::Invalid(reason) => {
                    // Damage before the wanted offset (met and reported by an earlier read):
                    // step over it to the next intact record.
                    let resync = find_next_record_in(
                        reader.format,
                        reader.reader.get_ref(),
                        record_start,
                        reader.next_offset,
                        self.shared.durable_end(),
                    )
                    .map_err(io_error)?;
                    let Some(point) = resync else {
                        return Err(QueueError::Corrupt {
                            path: path.clone(),
                            position: reader.next_offset,
                            reason: format!("cannot reach offset {offset}: {reason}"),
                        });
                    };
                    reader.seek_to(point).map_err(io_error)?;
                }
            }
        }
        Ok(reader)
    }

    /// The first offset of the segment after the one holding `offset`, or `None` when `offset`
    /// lies in the active segment.
    fn offset_after_corruption(&self, offset: u64) -> Option<u64> {
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

fn open_segment(
    shared: &Arc<Shared>,
    path: PathBuf,
    base_offset: u64,
) -> Result<SegmentReader, QueueError> {
    let mut file =
        File::open(&path).map_err(|error| QueueError::io("opening segment", &path, error))?;
    let format = match check_segment_header(&mut file, base_offset)
        .map_err(|error| QueueError::io("reading segment header", &path, error))?
    {
        Ok(format) => format,
        Err(reason) => {
            // Records name their own offsets: read them as numbered ones; if they are not, the
            // reader meets damage and skips exactly what it cannot read.
            warn!(segment = %path.display(), %reason, "queue segment header is damaged: reading its records as numbered ones");
            SegmentFormat::Numbered
        }
    };
    Ok(SegmentReader {
        path,
        base_offset,
        format,
        reader: BufReader::with_capacity(
            1 << 20,
            CompletedBytes {
                file,
                shared: Arc::clone(shared),
                base_offset,
                position: crate::segment::SEGMENT_HEADER_BYTES,
            },
        ),
        position: crate::segment::SEGMENT_HEADER_BYTES,
        next_offset: base_offset,
    })
}
