//! Damaged queue bytes are copied aside before anything skips them.
//!
//! When a reader or recovery finds a damaged span between intact records (see
//! [`crate::segment::scan_records`]), the span's raw bytes go to
//! `<queue>/quarantine/<segment base:020>-<byte start:020>.damaged`, described by a `.json` file
//! beside it (segment, byte range, the offsets it held, the reason), both written durably. The
//! names are fixed by the damage, so two sinks (or a restart) meeting the same damage write the
//! same files once. The records are lost to delivery, but the bytes are kept for forensics and for
//! manual recovery, and the loss is counted and logged, never silent.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::error;

use crate::error::QueueError;
use crate::segment::{DamagedSpan, SegmentBytes, create_dir_all_durably, replace_file_durably};

/// The largest number of damaged bytes copied for one span: the rest is described, not copied.
const MAX_QUARANTINED_SPAN_BYTES: u64 = 128 * 1024 * 1024;

/// The queue's record of damage met by this process.
#[derive(Default)]
pub(crate) struct DamageLedger {
    /// Spans already reported, by `(segment base offset, byte start)`.
    reported: Mutex<BTreeSet<(u64, u64)>>,
    /// Records lost in damaged spans (each span counted once per process).
    pub damaged_records: AtomicU64,
    /// Bytes copied to the quarantine directory.
    pub quarantined_bytes: AtomicU64,
}

impl DamageLedger {
    /// Copies the span's bytes aside (once), counts the records it held and logs the loss. A
    /// failure to write the quarantine files is returned: the caller must not skip the records
    /// before their bytes are kept.
    pub fn quarantine(
        &self,
        queue_dir: &Path,
        segment_path: &Path,
        segment_base_offset: u64,
        segment: &(impl SegmentBytes + ?Sized),
        span: &DamagedSpan,
    ) -> Result<(), QueueError> {
        let key = (segment_base_offset, span.byte_start);
        let already_reported = self
            .reported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&key);
        if already_reported {
            return Ok(());
        }
        let copied_bytes =
            write_quarantine_files(queue_dir, segment_path, segment_base_offset, segment, span)?;
        let newly_reported = self
            .reported
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(key);
        if !newly_reported {
            return Ok(());
        }
        let lost_records = span.end_missing_offset - span.first_missing_offset;
        self.damaged_records
            .fetch_add(lost_records, Ordering::Relaxed);
        self.quarantined_bytes
            .fetch_add(copied_bytes, Ordering::Relaxed);
        error!(
            segment = %segment_path.display(),
            byte_start = span.byte_start,
            byte_end = span.byte_end,
            first_missing_offset = span.first_missing_offset,
            end_missing_offset = span.end_missing_offset,
            lost_records,
            reason = %span.reason,
            quarantine = %quarantine_dir(queue_dir).display(),
            "queue segment is corrupt: the damaged records are lost, their bytes are quarantined, every intact record around them is kept"
        );
        Ok(())
    }
}

pub(crate) fn quarantine_dir(queue_dir: &Path) -> PathBuf {
    queue_dir.join("quarantine")
}

fn write_quarantine_files(
    queue_dir: &Path,
    segment_path: &Path,
    segment_base_offset: u64,
    segment: &(impl SegmentBytes + ?Sized),
    span: &DamagedSpan,
) -> Result<u64, QueueError> {
    let directory = quarantine_dir(queue_dir);
    let stem = format!("{segment_base_offset:020}-{:020}", span.byte_start);
    let bytes_path = directory.join(format!("{stem}.damaged"));
    let description_path = directory.join(format!("{stem}.json"));
    if description_path.exists() {
        // Written by another reader or an earlier life of the process (the description is
        // written last, so its presence means both files are complete).
        return Ok(0);
    }
    create_dir_all_durably(&directory)
        .map_err(|error| QueueError::io("creating directory", &directory, error))?;
    let span_bytes = span.byte_end.saturating_sub(span.byte_start);
    let copied_bytes = span_bytes.min(MAX_QUARANTINED_SPAN_BYTES);
    let mut damaged = vec![0u8; copied_bytes as usize];
    let read = segment
        .read_bytes_at(&mut damaged, span.byte_start)
        .map_err(|error| QueueError::io("reading damaged bytes of", segment_path, error))?;
    damaged.truncate(read);
    replace_file_durably(
        &directory,
        &bytes_path,
        &damaged,
        "quarantining damaged bytes",
    )?;
    let description = serde_json::json!({
        "segment": segment_path.display().to_string(),
        "segment_base_offset": segment_base_offset,
        "byte_start": span.byte_start,
        "byte_end": span.byte_end,
        "copied_bytes": damaged.len(),
        "first_missing_offset": span.first_missing_offset,
        "end_missing_offset": span.end_missing_offset,
        "reason": span.reason,
        "detected_at_ms": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0),
    });
    let description_text = serde_json::to_vec_pretty(&description).unwrap_or_default();
    replace_file_durably(
        &directory,
        &description_path,
        &description_text,
        "describing quarantined bytes",
    )?;
    Ok(damaged.len() as u64)
}

/// The spans quarantined so far, as `(segment base offset, byte start)` (for tests and tools).
pub fn list_quarantined(queue_dir: &Path) -> Vec<(u64, u64)> {
    let Ok(entries) = fs::read_dir(quarantine_dir(queue_dir)) else {
        return Vec::new();
    };
    let mut spans: Vec<(u64, u64)> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".json")?;
            let (base, start) = stem.split_once('-')?;
            Some((base.parse().ok()?, start.parse().ok()?))
        })
        .collect();
    spans.sort_unstable();
    spans
}
