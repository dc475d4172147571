//! Segment files and record framing.
//!
//! A segment starts with a 16-byte header: an 8-byte magic and the little-endian base offset (the
//! offset of its first record). Two record formats exist, named by the magic:
//!
//! - `MRDNSEG2` (*numbered*, written by this version): each record is
//!   `[payload length: u32][crc32: u32][offset: u64][payload]`, little-endian, where the CRC covers
//!   the length, the payload and then the offset. A record names its own offset, so a reader that
//!   meets a damaged record can resynchronise on the next intact one without shifting any offset.
//! - `MRDNSEG1` (*counted*, read for queues written before): `[length][crc32][payload]`, the CRC
//!   over length and payload; a record's offset is its position in the segment.
//!
//! A torn tail (invalid bytes up to the end of the file, after a crash mid-write) and corruption (a
//! damaged record with intact records after it) are told apart by looking for the next intact
//! record: see [`find_next_record`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::QueueError;

/// The magic of segments whose records carry their offsets.
pub const SEGMENT_MAGIC: &[u8; 8] = b"MRDNSEG2";
/// The magic of segments written before records carried offsets.
pub const COUNTED_SEGMENT_MAGIC: &[u8; 8] = b"MRDNSEG1";
pub const SEGMENT_HEADER_BYTES: u64 = 16;
/// The framing bytes of one record as written now (length, CRC, offset).
pub const RECORD_HEADER_BYTES: usize = 16;
const COUNTED_RECORD_HEADER_BYTES: usize = 8;
/// No record may be larger than this; a length field above it marks corruption.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

/// How a segment's records are framed (named by its magic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentFormat {
    /// Each record carries its offset (`MRDNSEG2`).
    Numbered,
    /// A record's offset is its position (`MRDNSEG1`, read only).
    Counted,
}

impl SegmentFormat {
    pub fn record_header_bytes(self) -> usize {
        match self {
            SegmentFormat::Numbered => RECORD_HEADER_BYTES,
            SegmentFormat::Counted => COUNTED_RECORD_HEADER_BYTES,
        }
    }

    fn magic(self) -> &'static [u8; 8] {
        match self {
            SegmentFormat::Numbered => SEGMENT_MAGIC,
            SegmentFormat::Counted => COUNTED_SEGMENT_MAGIC,
        }
    }
}

pub fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

pub fn parse_segment_file_name(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Appends one numbered record to `buffer` with offset 0 and a CRC over length and payload only:
/// [`stamp_offsets`] gives it its offset once the writer assigns one. Encoding and checksumming the
/// payload happen on the caller's task; the writer only adds eight bytes to each CRC.
pub fn encode_record(payload: &[u8], buffer: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES);
    let length_bytes = (payload.len() as u32).to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&length_bytes);
    hasher.update(payload);
    buffer.extend_from_slice(&length_bytes);
    buffer.extend_from_slice(&hasher.finalize().to_le_bytes());
    buffer.extend_from_slice(&0u64.to_le_bytes());
    buffer.extend_from_slice(payload);
}

/// Gives the records [`encode_record`] put in `encoded` the offsets `first_offset`,
/// `first_offset + 1`, ..., completing each CRC with its offset. Returns the number of records.
pub fn stamp_offsets(encoded: &mut [u8], first_offset: u64) -> u64 {
    let mut position = 0usize;
    let mut offset = first_offset;
    while position + RECORD_HEADER_BYTES <= encoded.len() {
        let payload_length =
            u32::from_le_bytes(encoded[position..position + 4].try_into().unwrap_or([0; 4]))
                as usize;
        let partial_crc = u32::from_le_bytes(
            encoded[position + 4..position + 8]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let offset_bytes = offset.to_le_bytes();
        let mut hasher = crc32fast::Hasher::new_with_initial(partial_crc);
        hasher.update(&offset_bytes);
        encoded[position + 4..position + 8].copy_from_slice(&hasher.finalize().to_le_bytes());
        encoded[position + 8..position + 16].copy_from_slice(&offset_bytes);
        position += RECORD_HEADER_BYTES + payload_length;
        offset += 1;
    }
    debug_assert_eq!(position, encoded.len(), "encoded holds whole records only");
    offset - first_offset
}

/// What reading the next record found.
pub enum NextRecord {
    Record {
        offset: u64,
        payload: Vec<u8>,
    },
    /// Clean end of the file at a record boundary.
    End,
    /// A torn or corrupt record starts at the current position.
    Invalid(String),
}

/// Reads the next record of a segment in `format`. `counted_offset` is the offset the record has
/// when the format does not store it (the position in a counted segment). On `Invalid` or `End`
/// the reader's position is unspecified.
pub fn read_record(
    reader: &mut impl Read,
    format: SegmentFormat,
    counted_offset: u64,
) -> io::Result<NextRecord> {
    let header_bytes = format.record_header_bytes();
    let mut header = [0u8; RECORD_HEADER_BYTES];
    let header_bytes_read = read_up_to(reader, &mut header[..header_bytes])?;
    if header_bytes_read == 0 {
        return Ok(NextRecord::End);
    }
    if header_bytes_read < header_bytes {
        return Ok(NextRecord::Invalid(format!(
            "torn record header ({header_bytes_read} of {header_bytes} bytes)"
        )));
    }
    let length_bytes = [header[0], header[1], header[2], header[3]];
    let payload_length = u32::from_le_bytes(length_bytes) as usize;
    let expected_crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if payload_length > MAX_RECORD_BYTES {
        return Ok(NextRecord::Invalid(format!(
            "record length {payload_length} exceeds the limit"
        )));
    }
    let mut payload = vec![0u8; payload_length];
    let payload_bytes_read = read_up_to(reader, &mut payload)?;
    if payload_bytes_read < payload_length {
        return Ok(NextRecord::Invalid(format!(
            "torn record ({payload_bytes_read} of {payload_length} payload bytes)"
        )));
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&length_bytes);
    hasher.update(&payload);
    let offset = match format {
        SegmentFormat::Numbered => {
            hasher.update(&header[8..16]);
            u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]))
        }
        SegmentFormat::Counted => counted_offset,
    };
    if hasher.finalize() != expected_crc {
        return Ok(NextRecord::Invalid("checksum mismatch".to_string()));
    }
    Ok(NextRecord::Record { offset, payload })
}

/// Bytes a segment can be read from at any position: a file, or memory (tests, fuzzing).
pub trait SegmentBytes {
    fn byte_length(&self) -> io::Result<u64>;
    /// Fills `buffer` from `position` on; returns how many bytes were there.
    fn read_bytes_at(&self, buffer: &mut [u8], position: u64) -> io::Result<usize>;
}

impl SegmentBytes for File {
    fn byte_length(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_bytes_at(&self, buffer: &mut [u8], position: u64) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buffer.len() {
            match self.read_at(&mut buffer[filled..], position + filled as u64) {
                Ok(0) => break,
                Ok(count) => filled += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(filled)
    }
}

impl SegmentBytes for [u8] {
    fn byte_length(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }

    fn read_bytes_at(&self, buffer: &mut [u8], position: u64) -> io::Result<usize> {
        let start = (position as usize).min(self.len());
        let available = &self[start..];
        let count = available.len().min(buffer.len());
        buffer[..count].copy_from_slice(&available[..count]);
        Ok(count)
    }
}

/// An intact numbered record found past damage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncPoint {
    /// Where its frame starts in the segment file.
    pub byte_position: u64,
    pub offset: u64,
}

/// [`find_next_record`] for a segment of `format`: counted segments cannot resynchronise (their
/// records do not name their offsets), so there it is always `None`.
pub fn find_next_record_in(
    format: SegmentFormat,
    segment: &(impl SegmentBytes + ?Sized),
    damaged_at: u64,
    lowest_offset: u64,
    below_offset: u64,
) -> io::Result<Option<ResyncPoint>> {
    match format {
        SegmentFormat::Numbered => {
            find_next_record(segment, damaged_at, lowest_offset, below_offset)
        }
        SegmentFormat::Counted => Ok(None),
    }
}

/// Looks for the first intact record of a numbered segment that starts after `damaged_at` (the
/// byte where an invalid record starts) and whose offset lies in `lowest_offset..below_offset`.
/// `None` means nothing intact follows: the damage runs to the end of the file (a torn tail).
///
/// A candidate must have a plausible length and offset (an offset can grow by at most one per
/// 16 bytes) and a matching CRC over length, payload and offset. Payloads are JSON text (which has
/// no NUL bytes, while every length and offset field does) or sealed records (random): a frame
/// hidden inside a payload is not a practical risk.
pub fn find_next_record(
    segment: &(impl SegmentBytes + ?Sized),
    damaged_at: u64,
    lowest_offset: u64,
    below_offset: u64,
) -> io::Result<Option<ResyncPoint>> {
    const WINDOW_BYTES: usize = 1 << 20;
    let file_bytes = segment.byte_length()?;
    let header_bytes = RECORD_HEADER_BYTES as u64;
    let mut window_start = damaged_at + 1;
    let bytes_to_search = file_bytes.saturating_sub(window_start) as usize;
    let mut window = vec![0u8; WINDOW_BYTES.min(bytes_to_search) + RECORD_HEADER_BYTES];
    while window_start + header_bytes <= file_bytes {
        let filled = segment.read_bytes_at(&mut window, window_start)?;
        if filled < RECORD_HEADER_BYTES {
            return Ok(None);
        }
        let candidates = (filled - RECORD_HEADER_BYTES + 1).min(window.len() - RECORD_HEADER_BYTES);
        for index in 0..candidates {
            let header = &window[index..index + RECORD_HEADER_BYTES];
            let payload_length = u32::from_le_bytes(header[0..4].try_into().unwrap_or([0; 4]));
            let offset = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
            let byte_position = window_start + index as u64;
            // Every record between the damage and here took at least a header's bytes.
            let highest_plausible_offset =
                lowest_offset.saturating_add((byte_position - damaged_at) / header_bytes);
            let plausible = (payload_length as usize) <= MAX_RECORD_BYTES
                && offset >= lowest_offset
                && offset <= highest_plausible_offset
                && offset < below_offset
                && byte_position + header_bytes + u64::from(payload_length) <= file_bytes;
            if !plausible {
                continue;
            }
            let mut frame = vec![0u8; RECORD_HEADER_BYTES + payload_length as usize];
            if segment.read_bytes_at(&mut frame, byte_position)? < frame.len() {
                continue;
            }
            if let NextRecord::Record { .. } =
                read_record(&mut &frame[..], SegmentFormat::Numbered, 0)?
            {
                return Ok(Some(ResyncPoint {
                    byte_position,
                    offset,
                }));
            }
        }
        window_start += candidates as u64;
    }
    Ok(None)
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

pub fn sync_directory(directory: &Path) -> Result<(), QueueError> {
    File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| QueueError::io("syncing directory", directory, error))
}

/// Replaces `path` (in `directory`) with `contents` durably: written to a temporary file beside it,
/// synced, renamed into place, and the directory synced, so a crash leaves the old or the new
/// contents, never a torn file. `what` names the file in errors ("cursor", "incarnation").
pub fn replace_file_durably(
    directory: &Path,
    path: &Path,
    contents: &[u8],
    what: &'static str,
) -> Result<(), QueueError> {
    let temporary_path = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&temporary_path)
        .map_err(|error| QueueError::io(what, &temporary_path, error))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|error| QueueError::io(what, &temporary_path, error))?;
    fs::rename(&temporary_path, path).map_err(|error| QueueError::io(what, path, error))?;
    sync_directory(directory)
}

/// Creates a new, empty segment with its header, durably (file and directory synced).
pub fn create_segment(
    segments_dir: &Path,
    base_offset: u64,
) -> Result<(PathBuf, File), QueueError> {
    let path = segments_dir.join(segment_file_name(base_offset));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|error| QueueError::io("creating segment", &path, error))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
    header.extend_from_slice(&base_offset.to_le_bytes());
    file.write_all(&header)
        .and_then(|()| file.sync_all())
        .map_err(|error| QueueError::io("writing segment header", &path, error))?;
    sync_directory(segments_dir)?;
    Ok((path, file))
}

/// Rewrites a segment's header in place (magic of `format` + base offset) and syncs the file; the
/// records behind it are left as they are.
pub fn write_segment_header(
    path: &Path,
    base_offset: u64,
    format: SegmentFormat,
) -> Result<(), QueueError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|error| QueueError::io("opening segment", path, error))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(format.magic());
    header.extend_from_slice(&base_offset.to_le_bytes());
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&header))
        .and_then(|()| file.sync_all())
        .map_err(|error| QueueError::io("repairing segment header", path, error))
}

/// Creates `directory` and every missing parent, syncing each parent after a child was made in
/// it, so that a power cut cannot lose a directory (and what was written into it) that the
/// program already relied on.
pub fn create_dir_all_durably(directory: &Path) -> io::Result<()> {
    if directory.is_dir() {
        return Ok(());
    }
    if let Some(parent) = directory.parent()
        && !parent.as_os_str().is_empty()
    {
        create_dir_all_durably(parent)?;
    }
    match fs::create_dir(directory) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && directory.is_dir() => {
            return Ok(());
        }
        Err(error) => return Err(error),
    }
    match directory
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        Some(parent) => File::open(parent).and_then(|handle| handle.sync_all()),
        None => Ok(()),
    }
}

/// Why a segment's header does not open the segment its file name promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderDefect {
    #[error("torn segment header ({read_bytes} bytes)")]
    Torn { read_bytes: usize },
    #[error("bad segment magic")]
    BadMagic,
    #[error("segment header names another base offset")]
    OtherBaseOffset,
}

/// Reads a segment's header: its format, or why the header is missing or does not match the name.
pub fn check_segment_header(
    file: &mut File,
    base_offset: u64,
) -> io::Result<Result<SegmentFormat, HeaderDefect>> {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    file.seek(SeekFrom::Start(0))?;
    let read = read_up_to(file, &mut header)?;
    if read < header.len() {
        return Ok(Err(HeaderDefect::Torn { read_bytes: read }));
    }
    let format = if &header[..8] == SEGMENT_MAGIC {
        SegmentFormat::Numbered
    } else if &header[..8] == COUNTED_SEGMENT_MAGIC {
        SegmentFormat::Counted
    } else {
        return Ok(Err(HeaderDefect::BadMagic));
    };
    let mut offset_bytes = [0u8; 8];
    offset_bytes.copy_from_slice(&header[8..]);
    if u64::from_le_bytes(offset_bytes) != base_offset {
        return Ok(Err(HeaderDefect::OtherBaseOffset));
    }
    Ok(Ok(format))
}

/// Damaged bytes between intact records of a segment, and the offsets they held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedSpan {
    pub byte_start: u64,
    pub byte_end: u64,
    /// The offsets of the records lost in the span: `first..end`.
    pub first_missing_offset: u64,
    pub end_missing_offset: u64,
    pub reason: String,
}

/// The result of scanning a segment from its start.
#[derive(Clone, Debug)]
pub struct SegmentScan {
    /// `None` when the header is damaged.
    pub format: Option<SegmentFormat>,
    pub valid_records: u64,
    /// The offset after the last intact record (the base offset when there is none).
    pub next_offset: u64,
    /// End of the last intact record (header included); 0 when the header is damaged.
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Damage with intact records after it (numbered segments only): kept apart, never truncated.
    pub damaged_spans: Vec<DamagedSpan>,
    /// Why the bytes after `valid_bytes` are not records (a torn tail), if there are any.
    pub invalid_reason: Option<String>,
}

/// Scans a segment held in `segment` from its start: every intact record, the damaged spans
/// between them (skipped by resynchronising on the next intact record, so no offset shifts), and
/// the torn tail. Calls `on_record` with each intact record in order.
pub fn scan_records(
    segment: &(impl SegmentBytes + ?Sized),
    base_offset: u64,
    format: SegmentFormat,
    mut on_record: impl FnMut(u64, &[u8]),
) -> io::Result<SegmentScan> {
    let file_bytes = segment.byte_length()?;
    let mut scan = SegmentScan {
        format: Some(format),
        valid_records: 0,
        next_offset: base_offset,
        valid_bytes: SEGMENT_HEADER_BYTES,
        file_bytes,
        damaged_spans: Vec::new(),
        invalid_reason: None,
    };
    let mut position = SEGMENT_HEADER_BYTES;
    loop {
        let buffer_bytes = (file_bytes.saturating_sub(position) as usize).clamp(64, 1 << 20);
        let mut reader =
            BufReader::with_capacity(buffer_bytes, PositionedReader { segment, position });
        let stopped_at = loop {
            let record_start = reader.get_ref().position - reader.buffer().len() as u64;
            match read_record(&mut reader, format, scan.next_offset)? {
                NextRecord::Record { offset, payload } if offset >= scan.next_offset => {
                    if offset > scan.next_offset {
                        // Records that are simply absent (no damaged bytes): count them lost.
                        scan.damaged_spans.push(DamagedSpan {
                            byte_start: record_start,
                            byte_end: record_start,
                            first_missing_offset: scan.next_offset,
                            end_missing_offset: offset,
                            reason: "records missing between intact records".into(),
                        });
                    }
                    on_record(offset, &payload);
                    scan.valid_records += 1;
                    scan.next_offset = offset + 1;
                    scan.valid_bytes =
                        record_start + (format.record_header_bytes() + payload.len()) as u64;
                }
                NextRecord::Record { offset, .. } => {
                    break (
                        record_start,
                        format!("record numbered {offset} after {}", scan.next_offset),
                    );
                }
                NextRecord::End => return Ok(scan),
                NextRecord::Invalid(reason) => break (record_start, reason),
            }
        };
        let (damaged_at, reason) = stopped_at;
        let resync = find_next_record_in(format, segment, damaged_at, scan.next_offset, u64::MAX)?;
        let Some(resync) = resync else {
            scan.invalid_reason = Some(reason);
            return Ok(scan);
        };
        scan.damaged_spans.push(DamagedSpan {
            byte_start: damaged_at,
            byte_end: resync.byte_position,
            first_missing_offset: scan.next_offset,
            end_missing_offset: resync.offset,
            reason,
        });
        scan.next_offset = resync.offset;
        position = resync.byte_position;
    }
}

/// Sequential reads over [`SegmentBytes`] from a position.
struct PositionedReader<'a, S: SegmentBytes + ?Sized> {
    segment: &'a S,
    position: u64,
}

impl<S: SegmentBytes + ?Sized> Read for PositionedReader<'_, S> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.segment.read_bytes_at(buffer, self.position)?;
        self.position += count as u64;
        Ok(count)
    }
}

/// Scans the segment file at `path` (see [`scan_records`]).
pub fn scan_segment(path: &Path, base_offset: u64) -> Result<SegmentScan, QueueError> {
    let mut file =
        File::open(path).map_err(|error| QueueError::io("opening segment", path, error))?;
    let file_bytes = file
        .metadata()
        .map_err(|error| QueueError::io("reading metadata of", path, error))?
        .len();
    let format = match check_segment_header(&mut file, base_offset)
        .map_err(|error| QueueError::io("reading segment header", path, error))?
    {
        Ok(format) => format,
        Err(reason) => {
            return Ok(SegmentScan {
                format: None,
                valid_records: 0,
                next_offset: base_offset,
                valid_bytes: 0,
                file_bytes,
                damaged_spans: Vec::new(),
                invalid_reason: Some(reason.to_string()),
            });
        }
    };
    scan_records(&file, base_offset, format, |_, _| {})
        .map_err(|error| QueueError::io("scanning segment", path, error))
}

/// Lists `(base_offset, path)` of every segment, ascending.
pub fn list_segments(segments_dir: &Path) -> Result<Vec<(u64, PathBuf)>, QueueError> {
    let entries = fs::read_dir(segments_dir)
        .map_err(|error| QueueError::io("listing segments in", segments_dir, error))?;
    let mut segments = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|error| QueueError::io("listing segments in", segments_dir, error))?;
        let file_name = entry.file_name();
        if let Some(base_offset) = file_name.to_str().and_then(parse_segment_file_name) {
            segments.push((base_offset, entry.path()));
        }
    }
    segments.sort_by_key(|(base_offset, _)| *base_offset);
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment in memory: header, then `payloads` numbered from `base_offset`.
    fn numbered_segment(base_offset: u64, payloads: &[&[u8]]) -> Vec<u8> {
        let mut segment = Vec::new();
        segment.extend_from_slice(SEGMENT_MAGIC);
        segment.extend_from_slice(&base_offset.to_le_bytes());
        let mut records = Vec::new();
        for payload in payloads {
            encode_record(payload, &mut records);
        }
        assert_eq!(
            stamp_offsets(&mut records, base_offset),
            payloads.len() as u64
        );
        segment.extend_from_slice(&records);
        segment
    }

    fn intact_records(segment: &[u8], base_offset: u64) -> (Vec<(u64, Vec<u8>)>, SegmentScan) {
        let mut records = Vec::new();
        let scan = scan_records(
            segment,
            base_offset,
            SegmentFormat::Numbered,
            |offset, payload| records.push((offset, payload.to_vec())),
        )
        .unwrap();
        (records, scan)
    }

    #[test]
    fn stamped_records_carry_their_offsets_under_one_crc() {
        let segment = numbered_segment(7, &[b"first", b"", b"third record"]);
        let (records, scan) = intact_records(&segment, 7);
        assert_eq!(
            records,
            vec![
                (7, b"first".to_vec()),
                (8, b"".to_vec()),
                (9, b"third record".to_vec())
            ]
        );
        assert_eq!(scan.next_offset, 10);
        assert_eq!(scan.valid_bytes, segment.len() as u64);
        assert!(scan.damaged_spans.is_empty() && scan.invalid_reason.is_none());
        // The CRC resumed with the offset is the CRC of length, payload and offset together.
        let mut whole = crc32fast::Hasher::new();
        whole.update(&5u32.to_le_bytes());
        whole.update(b"first");
        whole.update(&7u64.to_le_bytes());
        assert_eq!(segment[20..24], whole.finalize().to_le_bytes());
    }

    #[test]
    fn one_damaged_byte_loses_exactly_the_record_it_is_in() {
        let payloads: [&[u8]; 4] = [b"first", b"second one", b"", b"fourth record"];
        let segment = numbered_segment(100, &payloads);
        let mut frame_starts = vec![SEGMENT_HEADER_BYTES as usize];
        for payload in &payloads {
            let start = *frame_starts.last().unwrap();
            frame_starts.push(start + RECORD_HEADER_BYTES + payload.len());
        }
        for position in SEGMENT_HEADER_BYTES as usize..segment.len() {
            let damaged_record = frame_starts
                .iter()
                .rposition(|start| *start <= position)
                .unwrap();
            for flip in [0x01u8, 0x5a, 0xff] {
                let mut corrupted = segment.clone();
                corrupted[position] ^= flip;
                let (records, scan) = intact_records(&corrupted, 100);
                let expected: Vec<(u64, Vec<u8>)> = payloads
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| *index != damaged_record)
                    .map(|(index, payload)| (100 + index as u64, payload.to_vec()))
                    .collect();
                if damaged_record == payloads.len() - 1 {
                    // Nothing intact after it: a torn tail, cut by recovery.
                    assert_eq!(records, expected, "flip {flip:#x} at {position}");
                    assert!(scan.invalid_reason.is_some());
                    assert_eq!(scan.next_offset, 103);
                    continue;
                }
                assert_eq!(records, expected, "flip {flip:#x} at {position}");
                assert_eq!(scan.invalid_reason, None, "flip {flip:#x} at {position}");
                assert_eq!(scan.next_offset, 104, "no offset shifts");
                assert_eq!(scan.damaged_spans.len(), 1);
                let span = &scan.damaged_spans[0];
                assert_eq!(
                    (span.first_missing_offset, span.end_missing_offset),
                    (100 + damaged_record as u64, 101 + damaged_record as u64)
                );
                assert_eq!(
                    (span.byte_start, span.byte_end),
                    (
                        frame_starts[damaged_record] as u64,
                        frame_starts[damaged_record + 1] as u64
                    )
                );
            }
        }
    }

    #[test]
    fn resynchronisation_never_goes_back_to_lower_offsets() {
        let segment = numbered_segment(0, &[b"a", b"b", b"c"]);
        let second_frame = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES as u64 + 1;
        assert_eq!(
            find_next_record(&segment[..], SEGMENT_HEADER_BYTES, 0, u64::MAX).unwrap(),
            Some(ResyncPoint {
                byte_position: second_frame,
                offset: 1
            })
        );
        assert_eq!(
            find_next_record(&segment[..], SEGMENT_HEADER_BYTES, 2, u64::MAX).unwrap(),
            Some(ResyncPoint {
                byte_position: second_frame + RECORD_HEADER_BYTES as u64 + 1,
                offset: 2
            })
        );
        assert_eq!(
            find_next_record(&segment[..], SEGMENT_HEADER_BYTES, 0, 2).unwrap(),
            Some(ResyncPoint {
                byte_position: second_frame,
                offset: 1
            }),
        );
        assert_eq!(
            find_next_record(&segment[..], SEGMENT_HEADER_BYTES, 0, 1).unwrap(),
            None,
            "records at or past the durable end are not handed out"
        );
    }

    #[test]
    fn counted_segments_of_earlier_versions_are_still_read() {
        let mut segment = Vec::new();
        segment.extend_from_slice(COUNTED_SEGMENT_MAGIC);
        segment.extend_from_slice(&5u64.to_le_bytes());
        for payload in [&b"old"[..], b"records"] {
            let length_bytes = (payload.len() as u32).to_le_bytes();
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&length_bytes);
            hasher.update(payload);
            segment.extend_from_slice(&length_bytes);
            segment.extend_from_slice(&hasher.finalize().to_le_bytes());
            segment.extend_from_slice(payload);
        }
        let mut records = Vec::new();
        let scan = scan_records(
            &segment[..],
            5,
            SegmentFormat::Counted,
            |offset, payload| records.push((offset, payload.to_vec())),
        )
        .unwrap();
        assert_eq!(
            records,
            vec![(5, b"old".to_vec()), (6, b"records".to_vec())]
        );
        assert_eq!(scan.next_offset, 7);
    }

    #[test]
    fn a_zeroed_header_is_invalid_not_an_empty_record() {
        let zeros = [0u8; 16];
        for format in [SegmentFormat::Numbered, SegmentFormat::Counted] {
            let mut reader = &zeros[..];
            assert!(matches!(
                read_record(&mut reader, format, 0).unwrap(),
                NextRecord::Invalid(_)
            ));
        }
    }

    #[test]
    fn directories_are_created_with_every_missing_parent() {
        let root = tempfile::tempdir().unwrap();
        let nested = root
            .path()
            .join("archive/eu-west-1/segment-logs/p1/1795478400000");
        create_dir_all_durably(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_all_durably(&nested).unwrap();
        let file = root.path().join("a-file");
        fs::write(&file, b"x").unwrap();
        assert!(create_dir_all_durably(&file.join("below")).is_err());
    }

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.seg"), None);
    }
}
