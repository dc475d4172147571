//! Opening a queue directory after any stop: recovering the last segment, the cursor files on
//! disk and the queue's incarnation (see DESIGN.md, "Recovery").

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use crate::consumer::{CursorFile, read_cursor_file};
use crate::error::QueueError;
use crate::incarnation::{IncarnationRecord, mint_incarnation};
use crate::quarantine::DamageLedger;
use crate::queue::SegmentMeta;
use crate::segment::{
    SegmentFormat, SegmentScan, create_segment, list_segments, scan_segment, write_segment_header,
};

/// Lists the segments and recovers the last one: damage between intact records is quarantined
/// and kept in place (readers skip exactly the damaged records), a torn tail is cut, a damaged
/// header is rebuilt, and a last segment of the old counted format is followed by a new numbered
/// one. Creates the first segment of an empty queue. Returns the segments and the offset the next
/// appended record gets.
pub(crate) fn recover_segments(
    queue_dir: &Path,
    segments_dir: &Path,
    cursors_dir: &Path,
    damage: &DamageLedger,
) -> Result<(Vec<SegmentMeta>, u64), QueueError> {
    let listed = list_segments(segments_dir)?;
    let mut segments = Vec::with_capacity(listed.len() + 1);
    for (base_offset, path) in listed {
        let bytes = fs::metadata(&path)
            .map_err(|error| QueueError::io("reading metadata of", &path, error))?
            .len();
        segments.push(SegmentMeta {
            base_offset,
            path,
            bytes,
        });
    }
    let Some(last) = segments.last_mut() else {
        // An empty queue starts past every cursor, so that no consumer skips new records.
        let base_offset = highest_cursor_position(cursors_dir)?;
        let (path, _) = create_segment(segments_dir, base_offset)?;
        segments.push(SegmentMeta {
            base_offset,
            path,
            bytes: crate::segment::SEGMENT_HEADER_BYTES,
        });
        return Ok((segments, base_offset));
    };
    let mut scan = scan_segment(&last.path, last.base_offset)?;
    if scan.format.is_none() && scan.file_bytes > crate::segment::SEGMENT_HEADER_BYTES {
        scan = repair_segment_header(&last.path, last.base_offset, scan)?;
    }
    if !scan.damaged_spans.is_empty() {
        let file = fs::File::open(&last.path)
            .map_err(|error| QueueError::io("opening segment", &last.path, error))?;
        for span in &scan.damaged_spans {
            damage.quarantine(queue_dir, &last.path, last.base_offset, &file, span)?;
        }
    }
    let next_offset = scan.next_offset;
    if let Some(reason) = &scan.invalid_reason {
        let cut_bytes = scan.file_bytes - scan.valid_bytes;
        warn!(
            segment = %last.path.display(),
            %reason,
            kept_records = scan.valid_records,
            kept_bytes = scan.valid_bytes,
            cut_bytes,
            "queue segment has a torn tail (no intact record after it): truncating it"
        );
        if scan.valid_bytes == 0 {
            // The header itself is damaged and nothing behind it is readable: start afresh.
            let (path, _) = create_segment(segments_dir, last.base_offset)?;
            last.path = path;
            last.bytes = crate::segment::SEGMENT_HEADER_BYTES;
            scan.format = Some(SegmentFormat::Numbered);
        } else {
            let file = OpenOptions::new()
                .write(true)
                .open(&last.path)
                .map_err(|error| QueueError::io("opening segment", &last.path, error))?;
            file.set_len(scan.valid_bytes)
                .and_then(|()| file.sync_all())
                .map_err(|error| QueueError::io("truncating segment", &last.path, error))?;
            last.bytes = scan.valid_bytes;
        }
    }
    if scan.format == Some(SegmentFormat::Counted) {
        // The writer only writes numbered records: they go to a segment of their own.
        if scan.valid_records == 0 {
            let (path, _) = create_segment(segments_dir, last.base_offset)?;
            last.path = path;
            last.bytes = crate::segment::SEGMENT_HEADER_BYTES;
        } else {
            let (path, _) = create_segment(segments_dir, next_offset)?;
            segments.push(SegmentMeta {
                base_offset: next_offset,
                path,
                bytes: crate::segment::SEGMENT_HEADER_BYTES,
            });
        }
        info!(segments = %segments_dir.display(), next_offset, "the last queue segment has the counted record format: new records go to a numbered segment");
    }
    Ok((segments, next_offset))
}

/// Only the header is damaged (its content is known from the file name): rebuild it in place
/// with the format whose records are readable behind it, and rescan.
pub(crate) fn repair_segment_header(
    path: &Path,
    base_offset: u64,
    damaged_scan: SegmentScan,
) -> Result<SegmentScan, QueueError> {
    let reason = damaged_scan.invalid_reason.unwrap_or_default();
    write_segment_header(path, base_offset, SegmentFormat::Numbered)?;
    let mut scan = scan_segment(path, base_offset)?;
    if scan.valid_records == 0 {
        write_segment_header(path, base_offset, SegmentFormat::Counted)?;
        let counted_scan = scan_segment(path, base_offset)?;
        if counted_scan.valid_records > 0 {
            scan = counted_scan;
        } else {
            write_segment_header(path, base_offset, SegmentFormat::Numbered)?;
        }
    }
    warn!(
        segment = %path.display(),
        %reason,
        kept_records = scan.valid_records,
        "queue segment header was damaged: rebuilt it and kept the records behind it"
    );
    Ok(scan)
}

/// Every `*.cursor` file of the queue (temporary files and anything else are skipped).
pub(crate) fn list_cursor_files(cursors_dir: &Path) -> Result<Vec<PathBuf>, QueueError> {
    let entries = fs::read_dir(cursors_dir)
        .map_err(|error| QueueError::io("listing cursors in", cursors_dir, error))?;
    Ok(entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().and_then(|extension| extension.to_str()) == Some("cursor"))
        .collect())
}

/// The readable cursor files, by path. Unreadable ones are left to `Consumer::open` to report.
pub(crate) fn readable_cursor_files(
    cursors_dir: &Path,
) -> Result<Vec<(PathBuf, CursorFile)>, QueueError> {
    let mut cursors = Vec::new();
    for path in list_cursor_files(cursors_dir)? {
        match read_cursor_file(&path) {
            Ok(Some(cursor)) => cursors.push((path, cursor)),
            Ok(None) => {}
            Err(error) => {
                warn!(cursor = %path.display(), %error, "cannot read a queue cursor file");
            }
        }
    }
    Ok(cursors)
}

pub(crate) fn highest_cursor_position(cursors_dir: &Path) -> Result<u64, QueueError> {
    let mut highest = 0;
    for (_, cursor) in readable_cursor_files(cursors_dir)? {
        highest = highest.max(cursor.highest_position());
    }
    Ok(highest)
}

pub(crate) enum PreviousIncarnation {
    Found(Option<IncarnationRecord>),
    Damaged,
}

/// Keeps the queue's incarnation, or mints a new one when its offsets could restart: a fresh or
/// replaced directory, a damaged incarnation file, or a recovered end below a position one of its
/// own cursors had passed (the disk lost records a sink had already delivered, so new records would
/// reuse their offsets). Returns the incarnation and whether cursor files that name no incarnation
/// (written before incarnations existed) belong to it.
pub(crate) fn settle_incarnation(
    queue_dir: &Path,
    cursors_dir: &Path,
    previous: PreviousIncarnation,
    held_data_before: bool,
    recovered_end: u64,
) -> Result<(String, bool), QueueError> {
    let record = match previous {
        PreviousIncarnation::Damaged => {
            return Ok((
                mint_incarnation(queue_dir, "the incarnation file was damaged")?.incarnation,
                false,
            ));
        }
        PreviousIncarnation::Found(None) if held_data_before => {
            let record = mint_incarnation(queue_dir, "queue created before incarnations")?;
            info!(queue = %queue_dir.display(), incarnation = %record.incarnation, "the queue predates incarnations: minted one and adopted its cursors");
            return Ok((record.incarnation, true));
        }
        PreviousIncarnation::Found(None) => {
            return Ok((
                mint_incarnation(queue_dir, "fresh queue directory")?.incarnation,
                false,
            ));
        }
        PreviousIncarnation::Found(Some(record)) => record,
    };
    let passed_by_own_cursors = readable_cursor_files(cursors_dir)?
        .into_iter()
        .filter(|(_, cursor)| cursor.incarnation.as_deref() == Some(record.incarnation.as_str()))
        .map(|(_, cursor)| cursor.highest_position())
        .max()
        .unwrap_or(0);
    if passed_by_own_cursors <= recovered_end {
        return Ok((record.incarnation, false));
    }
    let reason = format!(
        "end moved backwards: recovered end {recovered_end} is below position {passed_by_own_cursors} that a sink had passed"
    );
    let minted = mint_incarnation(queue_dir, &reason)?;
    error!(queue = %queue_dir.display(), previous = %record.incarnation, incarnation = %minted.incarnation, %reason, "queue offsets could restart: minted a new incarnation (sinks redeliver from the oldest record; duplicates collapse, nothing is skipped or overwritten)");
    Ok((minted.incarnation, false))
}
