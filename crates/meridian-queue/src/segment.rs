//! Segment files and record framing.
//!
//! A segment starts with a 16-byte header: the magic `MRDNSEG1` and the little-endian base offset.
//! Each record is `[payload length: u32 LE][crc32: u32 LE][payload]`, where the CRC covers the
//! four length bytes and the payload, so a zeroed or torn header is caught like a torn payload.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::QueueError;

pub const SEGMENT_MAGIC: &[u8; 8] = b"MRDNSEG1";
pub const SEGMENT_HEADER_BYTES: u64 = 16;
pub const RECORD_HEADER_BYTES: usize = 8;
/// No record may be larger than this; a length field above it marks corruption.
pub const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

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

/// Appends one framed record to `buffer`.
pub fn encode_record(payload: &[u8], buffer: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES);
    let length_bytes = (payload.len() as u32).to_le_bytes();
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&length_bytes);
    hasher.update(payload);
    buffer.extend_from_slice(&length_bytes);
    buffer.extend_from_slice(&hasher.finalize().to_le_bytes());
    buffer.extend_from_slice(payload);
}

/// What reading the next record found.
pub enum NextRecord {
    Record(Vec<u8>),
    /// Clean end of the file at a record boundary.
    End,
    /// A torn or corrupt record starts at the current position.
    Invalid(String),
}

/// Reads the next framed record. On `Invalid` or `End` the reader's position is unspecified.
pub fn read_record(reader: &mut impl Read) -> io::Result<NextRecord> {
    let mut header = [0u8; RECORD_HEADER_BYTES];
    let header_bytes_read = read_up_to(reader, &mut header)?;
    if header_bytes_read == 0 {
        return Ok(NextRecord::End);
    }
    if header_bytes_read < RECORD_HEADER_BYTES {
        return Ok(NextRecord::Invalid(format!(
            "torn record header ({header_bytes_read} of {RECORD_HEADER_BYTES} bytes)"
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
    if hasher.finalize() != expected_crc {
        return Ok(NextRecord::Invalid("checksum mismatch".to_string()));
    }
    Ok(NextRecord::Record(payload))
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

/// Rewrites a segment's header in place (magic + base offset) and syncs the file; the records
/// behind it are left as they are.
pub fn write_segment_header(path: &Path, base_offset: u64) -> Result<(), QueueError> {
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|error| QueueError::io("opening segment", path, error))?;
    let mut header = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    header.extend_from_slice(SEGMENT_MAGIC);
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

/// Checks a segment's header. Returns a reason when it is missing or does not match the name.
pub fn check_segment_header(file: &mut File, base_offset: u64) -> io::Result<Option<String>> {
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    file.seek(SeekFrom::Start(0))?;
    let read = read_up_to(file, &mut header)?;
    if read < header.len() {
        return Ok(Some(format!("torn segment header ({read} bytes)")));
    }
    if &header[..8] != SEGMENT_MAGIC {
        return Ok(Some("bad segment magic".to_string()));
    }
    let mut offset_bytes = [0u8; 8];
    offset_bytes.copy_from_slice(&header[8..]);
    if u64::from_le_bytes(offset_bytes) != base_offset {
        return Ok(Some("segment header names another base offset".to_string()));
    }
    Ok(None)
}

/// The result of scanning a segment from its start.
pub struct SegmentScan {
    pub valid_records: u64,
    /// Byte length of the valid prefix (header included).
    pub valid_bytes: u64,
    pub file_bytes: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub invalid_reason: Option<String>,
}

pub fn scan_segment(path: &Path, base_offset: u64) -> Result<SegmentScan, QueueError> {
    let mut file =
        File::open(path).map_err(|error| QueueError::io("opening segment", path, error))?;
    let file_bytes = file
        .metadata()
        .map_err(|error| QueueError::io("reading metadata of", path, error))?
        .len();
    if let Some(reason) = check_segment_header(&mut file, base_offset)
        .map_err(|error| QueueError::io("reading segment header", path, error))?
    {
        return Ok(SegmentScan {
            valid_records: 0,
            valid_bytes: 0,
            file_bytes,
            invalid_reason: Some(reason),
        });
    }
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut valid_records = 0;
    let mut valid_bytes = SEGMENT_HEADER_BYTES;
    loop {
        match read_record(&mut reader)
            .map_err(|error| QueueError::io("scanning segment", path, error))?
        {
            NextRecord::Record(payload) => {
                valid_records += 1;
                valid_bytes += (RECORD_HEADER_BYTES + payload.len()) as u64;
            }
            NextRecord::End => {
                return Ok(SegmentScan {
                    valid_records,
                    valid_bytes,
                    file_bytes,
                    invalid_reason: None,
                });
            }
            NextRecord::Invalid(reason) => {
                return Ok(SegmentScan {
                    valid_records,
                    valid_bytes,
                    file_bytes,
                    invalid_reason: Some(reason),
                });
            }
        }
    }
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

    #[test]
    fn records_round_trip_and_corruption_is_caught() {
        let mut buffer = Vec::new();
        encode_record(b"first", &mut buffer);
        encode_record(b"", &mut buffer);
        encode_record(b"third record", &mut buffer);
        let mut reader = &buffer[..];
        let mut payloads = Vec::new();
        while let NextRecord::Record(payload) = read_record(&mut reader).unwrap() {
            payloads.push(payload);
        }
        assert_eq!(
            payloads,
            vec![b"first".to_vec(), b"".to_vec(), b"third record".to_vec()]
        );

        for position in 0..buffer.len() {
            let mut corrupted = buffer.clone();
            corrupted[position] ^= 0x5a;
            let mut reader = &corrupted[..];
            let mut intact = Vec::new();
            while let NextRecord::Record(payload) = read_record(&mut reader).unwrap() {
                intact.push(payload);
            }
            assert!(
                intact.len() < 3,
                "a flipped byte at {position} went unnoticed"
            );
            for payload in &intact {
                assert!(
                    payloads.contains(payload),
                    "a record that was never written appeared"
                );
            }
        }
    }

    #[test]
    fn a_zeroed_header_is_invalid_not_an_empty_record() {
        let zeros = [0u8; 16];
        let mut reader = &zeros[..];
        assert!(matches!(
            read_record(&mut reader).unwrap(),
            NextRecord::Invalid(_)
        ));
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
