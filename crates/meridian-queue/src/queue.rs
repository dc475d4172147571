//! The queue handle: opening with recovery, appending with group commit, stats.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot, watch};
use tracing::{error, info, warn};

use crate::consumer::{Consumer, read_cursor_file};
use crate::encryption::QueueEncryption;
use crate::error::QueueError;
use crate::incarnation::read_incarnation;
use crate::quarantine::DamageLedger;
use crate::recovery::{
    PreviousIncarnation, list_cursor_files, recover_segments, settle_incarnation,
};
use crate::segment::{MAX_RECORD_BYTES, RECORD_HEADER_BYTES, encode_record, list_segments};
use crate::writer::{AppendRequest, Writer, WriterCommand};

/// The fewest in-flight bytes one append is charged (see [`RegionQueue::append`]).
const MIN_IN_FLIGHT_CHARGE: usize = 4096;

/// When an append counts as done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` before the append returns (survives power loss). The default.
    Fsync,
    /// Written to the OS before the append returns (survives a crash of the process, not of the
    /// machine); synced every `sync_interval`.
    Buffered { sync_interval: Duration },
}

#[derive(Clone)]
pub struct QueueConfig {
    pub dir: PathBuf,
    /// A segment is closed and a new one started once it reaches this size.
    pub segment_max_bytes: u64,
    /// Appends are refused with [`QueueError::Full`] while the segments on disk would exceed this.
    pub disk_budget_bytes: u64,
    pub durability: Durability,
    /// Bytes of appends waiting for the writer at once; appends beyond this wait (backpressure).
    pub max_in_flight_bytes: usize,
    /// Free space the queue leaves on its filesystem: appends are refused with
    /// [`QueueError::DiskFull`] while less would remain, so sinks, spool, dead letters and cursors
    /// on the same volume can still write (and the queue drain). At most a quarter of the
    /// filesystem is kept (see [`crate::disk_space::effective_reserve`]).
    pub min_free_disk_bytes: u64,
    /// Seal records at rest (AES-256-GCM); `None`: records are stored as given.
    pub encryption: Option<Arc<QueueEncryption>>,
}

impl QueueConfig {
    pub fn new(dir: impl Into<PathBuf>) -> QueueConfig {
        QueueConfig {
            dir: dir.into(),
            segment_max_bytes: 64 * 1024 * 1024,
            disk_budget_bytes: 10 * 1024 * 1024 * 1024,
            durability: Durability::Fsync,
            max_in_flight_bytes: 64 * 1024 * 1024,
            min_free_disk_bytes: 0,
            encryption: None,
        }
    }
}

/// A half-open range of offsets `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct OffsetRange {
    pub start: u64,
    pub end: u64,
}

impl OffsetRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Records framed and ready to append, built by the caller so that encoding and checksumming
/// happen on the request's task, not on the single writer thread.
#[derive(Default)]
pub struct RecordBatch {
    encoded: Vec<u8>,
    record_count: u64,
    encryption: Option<Arc<QueueEncryption>>,
    sealed: Vec<u8>,
    /// Kept only for backends that deduplicate client retries by a message's identity (see
    /// [`RecordBatch::push_identified`]); one per record, in order.
    identities: Option<Vec<String>>,
}

impl RecordBatch {
    pub fn with_capacity(bytes: usize) -> RecordBatch {
        RecordBatch {
            encoded: Vec::with_capacity(bytes),
            ..RecordBatch::default()
        }
    }

    /// A batch that also keeps each record's identity (for a backend that deduplicates by it).
    pub(crate) fn keeping_identities(encryption: Option<Arc<QueueEncryption>>) -> RecordBatch {
        RecordBatch {
            encryption,
            identities: Some(Vec::new()),
            ..RecordBatch::default()
        }
    }

    /// Pushes a record with the identity of the message it holds (its project and messageId): a
    /// replicated backend stores a client's retry of the same message once (within its duplicate
    /// window); the local log ignores it.
    pub fn push_identified(
        &mut self,
        payload: &[u8],
        project_id: &str,
        message_id: &str,
    ) -> Result<(), QueueError> {
        self.push(payload)?;
        if let Some(identities) = &mut self.identities {
            identities.push(format!("{project_id}:{message_id}"));
        }
        Ok(())
    }

    /// The records' payloads as they will be stored (sealed when the queue encrypts), in order.
    pub(crate) fn stored_payloads(&self) -> impl Iterator<Item = &[u8]> {
        let mut position = 0usize;
        std::iter::from_fn(move || {
            let header_end = position.checked_add(RECORD_HEADER_BYTES)?;
            let header = self.encoded.get(position..header_end)?;
            let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
            let payload = self.encoded.get(header_end..header_end + length)?;
            position = header_end + length;
            Some(payload)
        })
    }

    /// The identity of each record, when this batch keeps them.
    pub(crate) fn identities(&self) -> Option<&[String]> {
        self.identities.as_deref()
    }

    pub fn push(&mut self, payload: &[u8]) -> Result<(), QueueError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(QueueError::RecordTooLarge {
                size: payload.len(),
                limit: MAX_RECORD_BYTES,
            });
        }
        match &self.encryption {
            Some(encryption) => {
                self.sealed.clear();
                encryption.seal(payload, &mut self.sealed)?;
                encode_record(&self.sealed, &mut self.encoded);
            }
            None => encode_record(payload, &mut self.encoded),
        }
        self.record_count += 1;
        Ok(())
    }

    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }
}

#[derive(Clone, Debug)]
pub(crate) struct SegmentMeta {
    pub base_offset: u64,
    pub path: PathBuf,
    pub bytes: u64,
}

/// State shared by the queue handle, its writer thread and its consumers.
pub(crate) struct Shared {
    pub config: QueueConfig,
    /// The identity of this queue's offsets (see [`crate::incarnation`]).
    pub incarnation: String,
    /// True when this queue predates incarnations and its cursor files (which name none) were
    /// written for the offsets it still holds.
    pub trusts_unlabelled_cursors: bool,
    /// Set while the on-disk cursor floor cannot be read (logged once until it can again).
    pub cursor_floor_unreadable: AtomicBool,
    pub segments_dir: PathBuf,
    pub cursors_dir: PathBuf,
    /// Ascending by base offset; the last one is the active segment the writer appends to.
    pub segments: Mutex<Vec<SegmentMeta>>,
    pub durable_end: AtomicU64,
    pub end_watch: watch::Sender<u64>,
    pub disk_bytes: AtomicU64,
    pub consumer_positions: Mutex<BTreeMap<String, u64>>,
    pub broken: Mutex<Option<String>>,
    /// Number of `fdatasync` calls the writer made (group commit makes it far below the number
    /// of appends under concurrency).
    pub sync_count: AtomicU64,
    /// Appends the writer dropped unwritten because nobody waited for their answer any more.
    pub abandoned_appends: AtomicU64,
    /// Damage met in the segments (records lost, bytes quarantined).
    pub damage: DamageLedger,
    /// Held by tests to stall the writer (a slow disk) before it takes its next group.
    #[cfg(test)]
    pub writer_stall: Mutex<()>,
    /// Set when an append was refused for the budget; cleared by the next successful append or
    /// when consumers free space. Drives `is_writable`.
    pub refusing_for_budget: AtomicBool,
    /// Set when an append was refused for the filesystem's free space (below the reserve, or
    /// ENOSPC); cleared by the next successful append.
    pub refusing_for_disk_space: AtomicBool,
    /// The free space kept on the queue's filesystem (the configured reserve, capped).
    pub free_space_reserve_bytes: u64,
}

impl Shared {
    pub fn lock_segments(&self) -> MutexGuard<'_, Vec<SegmentMeta>> {
        self.segments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn lock_positions(&self) -> MutexGuard<'_, BTreeMap<String, u64>> {
        self.consumer_positions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn broken_reason(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn mark_broken(&self, reason: String) {
        *self
            .broken
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reason);
    }

    pub fn durable_end(&self) -> u64 {
        self.durable_end.load(Ordering::Acquire)
    }

    pub fn publish_end(&self, end: u64) {
        debug_assert!(end >= self.durable_end());
        self.durable_end.store(end, Ordering::Release);
        self.end_watch.send_replace(end);
    }

    /// The bytes of the segment starting at `base_offset` that its writer has completed: readers
    /// never read past them (see `consumer::CompletedBytes`). A segment no longer listed (deleted
    /// by GC) is complete as it is.
    pub fn completed_bytes(&self, base_offset: u64) -> u64 {
        self.lock_segments()
            .iter()
            .find(|segment| segment.base_offset == base_offset)
            .map_or(u64::MAX, |segment| segment.bytes)
    }

    pub fn first_offset(&self) -> u64 {
        self.lock_segments()
            .first()
            .map(|segment| segment.base_offset)
            .unwrap_or_else(|| self.durable_end())
    }

    /// True when a cursor file written with `incarnation` counts for this queue's offsets.
    pub fn owns_cursor(&self, incarnation: Option<&str>) -> bool {
        match incarnation {
            Some(incarnation) => incarnation == self.incarnation,
            None => self.trusts_unlabelled_cursors,
        }
    }

    /// The lowest position any cursor file on disk protects: consumers that are not registered
    /// in this process (a sink that failed to open, or whose config section is briefly removed)
    /// keep their data too. A cursor of another incarnation will redeliver from the oldest record,
    /// so it protects everything. `Err` when a cursor file cannot be read: nothing may be deleted.
    fn on_disk_cursor_floor(&self) -> Result<Option<u64>, String> {
        let mut floor: Option<u64> = None;
        for path in list_cursor_files(&self.cursors_dir).map_err(|error| error.to_string())? {
            let cursor = read_cursor_file(&path)
                .map_err(|error| error.to_string())?
                .ok_or_else(|| format!("cursor {} vanished while listed", path.display()))?;
            let protected = if self.owns_cursor(cursor.incarnation.as_deref()) {
                cursor.next_offset
            } else {
                0
            };
            floor = Some(floor.map_or(protected, |floor| floor.min(protected)));
        }
        Ok(floor)
    }

    /// Deletes every closed segment whose records all lie below every consumer's position, the
    /// positions of consumers registered here and of every cursor file on disk alike.
    pub fn collect_garbage(&self) {
        let Some(min_registered) = self.lock_positions().values().copied().min() else {
            return;
        };
        let has_candidate = {
            let segments = self.lock_segments();
            segments.len() > 1 && segments[1].base_offset <= min_registered
        };
        if !has_candidate {
            return;
        }
        let min_position = match self.on_disk_cursor_floor() {
            Ok(floor) => floor.map_or(min_registered, |floor| floor.min(min_registered)),
            Err(reason) => {
                if !self.cursor_floor_unreadable.swap(true, Ordering::AcqRel) {
                    warn!(queue = %self.config.dir.display(), %reason, "a queue cursor file is unreadable: no consumed segment is deleted until it can be read");
                }
                return;
            }
        };
        self.cursor_floor_unreadable.store(false, Ordering::Release);
        let mut segments = self.lock_segments();
        while segments.len() > 1 && segments[1].base_offset <= min_position {
            let removed = segments.remove(0);
            // Readers that passed the segment may still hold it open, which would keep its blocks
            // allocated after the unlink: truncating through a handle of our own frees them now
            // (a reader positioned at its old end just meets the end of the file and moves on).
            let handle = OpenOptions::new().write(true).open(&removed.path);
            match fs::remove_file(&removed.path) {
                Ok(()) => {
                    if let Ok(handle) = handle {
                        let _ = handle.set_len(0);
                    }
                    self.disk_bytes.fetch_sub(removed.bytes, Ordering::AcqRel);
                    self.refusing_for_budget.store(false, Ordering::Release);
                }
                Err(error) => {
                    warn!(path = %removed.path.display(), %error, "could not delete a consumed queue segment");
                    segments.insert(0, removed);
                    return;
                }
            }
        }
    }
}

/// Figures for metrics and readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStats {
    pub incarnation: String,
    pub first_offset: u64,
    pub end_offset: u64,
    pub disk_bytes: u64,
    pub disk_budget_bytes: u64,
    pub segment_count: usize,
    pub consumer_positions: BTreeMap<String, u64>,
    pub broken: Option<String>,
    pub sync_count: u64,
    /// Appends dropped unwritten because their caller stopped waiting (see the writer).
    pub abandoned_appends: u64,
    /// Records lost to damaged segment bytes met by this process (see [`crate::quarantine`]).
    pub damaged_records: u64,
    /// Damaged bytes copied to the quarantine directory by this process.
    pub quarantined_bytes: u64,
    /// Records not yet passed by the slowest consumer (summed over a replicated backend's
    /// partitions, each with its own positions).
    pub pending_records: u64,
}

impl QueueStats {
    /// Records not yet passed by the slowest consumer.
    pub fn pending_records(&self) -> u64 {
        self.pending_records
    }
}

/// Records at or past the slowest of `positions` (all of them up to `end` when there is none).
pub(crate) fn pending_below(end: u64, positions: impl Iterator<Item = u64>) -> u64 {
    end.saturating_sub(positions.min().unwrap_or(end))
}

/// One region's durable queue. Cheap to clone.
#[derive(Clone)]
pub struct RegionQueue {
    shared: Arc<Shared>,
    sender: mpsc::Sender<WriterCommand>,
    in_flight_bytes: Arc<Semaphore>,
    writer_thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl RegionQueue {
    /// Opens (or creates) the queue in `config.dir`, recovering from a torn or corrupt tail, and
    /// starts its writer thread. Blocking: call it before serving or from `spawn_blocking`.
    pub fn open(config: QueueConfig) -> Result<RegionQueue, QueueError> {
        let segments_dir = config.dir.join("segments");
        let cursors_dir = config.dir.join("cursors");
        for directory in [&config.dir, &segments_dir, &cursors_dir] {
            crate::segment::create_dir_all_durably(directory)
                .map_err(|error| QueueError::io("creating directory", directory, error))?;
        }
        let previous_incarnation = match read_incarnation(&config.dir) {
            Ok(record) => PreviousIncarnation::Found(record),
            Err(QueueError::BadIncarnation { path, message }) => {
                error!(path = %path.display(), %message, "the queue's incarnation file is damaged: minting a new incarnation (every sink redelivers from the oldest record; duplicates collapse, nothing is skipped)");
                PreviousIncarnation::Damaged
            }
            Err(other) => return Err(other),
        };
        let held_data_before = !list_segments(&segments_dir)?.is_empty()
            || !list_cursor_files(&cursors_dir)?.is_empty();
        let damage = DamageLedger::default();
        let (segments, next_offset) =
            recover_segments(&config.dir, &segments_dir, &cursors_dir, &damage)?;
        let (incarnation, trusts_unlabelled_cursors) = settle_incarnation(
            &config.dir,
            &cursors_dir,
            previous_incarnation,
            held_data_before,
            next_offset,
        )?;
        let active = segments
            .last()
            .ok_or_else(|| QueueError::Broken("no active segment after recovery".into()))?;
        let active_path = active.path.clone();
        let active_bytes = active.bytes;
        let mut active_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&active_path)
            .map_err(|error| QueueError::io("opening segment", &active_path, error))?;
        active_file
            .seek(SeekFrom::Start(active_bytes))
            .map_err(|error| QueueError::io("seeking in segment", &active_path, error))?;
        let disk_bytes: u64 = segments.iter().map(|segment| segment.bytes).sum();
        let free_space_reserve_bytes = crate::disk_space::total_bytes(&segments_dir)
            .map(|total_bytes| {
                crate::disk_space::effective_reserve(config.min_free_disk_bytes, total_bytes)
            })
            .unwrap_or(config.min_free_disk_bytes);
        let (end_watch, _) = watch::channel(next_offset);
        let shared = Arc::new(Shared {
            incarnation: incarnation.clone(),
            trusts_unlabelled_cursors,
            cursor_floor_unreadable: AtomicBool::new(false),
            segments_dir,
            cursors_dir,
            segments: Mutex::new(segments),
            durable_end: AtomicU64::new(next_offset),
            end_watch,
            disk_bytes: AtomicU64::new(disk_bytes),
            consumer_positions: Mutex::new(BTreeMap::new()),
            broken: Mutex::new(None),
            sync_count: AtomicU64::new(0),
            abandoned_appends: AtomicU64::new(0),
            damage,
            #[cfg(test)]
            writer_stall: Mutex::new(()),
            refusing_for_budget: AtomicBool::new(false),
            refusing_for_disk_space: AtomicBool::new(false),
            free_space_reserve_bytes,
            config: config.clone(),
        });
        let (sender, receiver) = mpsc::channel();
        let writer = Writer::new(
            Arc::clone(&shared),
            active_file,
            active_path,
            active_bytes,
            next_offset,
        );
        let thread_name = format!(
            "queue-writer-{}",
            config
                .dir
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("region")
        );
        let writer_thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || writer.run(receiver))
            .map_err(|error| QueueError::io("starting writer thread for", &config.dir, error))?;
        info!(dir = %config.dir.display(), %incarnation, next_offset, disk_bytes, free_space_reserve_bytes, "queue opened");
        Ok(RegionQueue {
            shared,
            sender,
            in_flight_bytes: Arc::new(Semaphore::new(config.max_in_flight_bytes.max(1))),
            writer_thread: Arc::new(Mutex::new(Some(writer_thread))),
        })
    }

    /// Appends the batch and returns once it is durable (per the queue's durability setting).
    pub async fn append(&self, batch: RecordBatch) -> Result<OffsetRange, QueueError> {
        if batch.is_empty() {
            let end = self.shared.durable_end();
            return Ok(OffsetRange { start: end, end });
        }
        if let Some(reason) = self.shared.broken_reason() {
            return Err(QueueError::Broken(reason));
        }
        let used_bytes = self.shared.disk_bytes.load(Ordering::Acquire);
        let budget_bytes = self.shared.config.disk_budget_bytes;
        if used_bytes + batch.encoded.len() as u64 > budget_bytes {
            self.shared
                .refusing_for_budget
                .store(true, Ordering::Release);
            return Err(QueueError::Full {
                used_bytes,
                budget_bytes,
            });
        }
        // Each request counts at least MIN_IN_FLIGHT_CHARGE bytes, so the number of requests
        // waiting for the writer is bounded too (the channel holds at most budget / charge).
        let permits = batch
            .encoded
            .len()
            .max(MIN_IN_FLIGHT_CHARGE)
            .min(self.shared.config.max_in_flight_bytes.max(1))
            .min(u32::MAX as usize) as u32;
        let in_flight = Arc::clone(&self.in_flight_bytes)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| QueueError::Closed)?;
        let (reply, answer) = oneshot::channel();
        let request = AppendRequest {
            encoded: batch.encoded,
            record_count: batch.record_count,
            reply,
            in_flight,
        };
        self.sender
            .send(WriterCommand::Append(request))
            .map_err(|_| QueueError::Closed)?;
        answer.await.map_err(|_| QueueError::Closed)?
    }

    #[cfg(test)]
    pub(crate) fn in_flight_bytes_available(&self) -> usize {
        self.in_flight_bytes.available_permits()
    }

    #[cfg(test)]
    pub(crate) fn stall_writer(&self) -> MutexGuard<'_, ()> {
        self.shared
            .writer_stall
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An empty batch for this queue (sealed with its encryption key when it has one).
    pub fn new_batch(&self) -> RecordBatch {
        RecordBatch {
            encryption: self.shared.config.encryption.clone(),
            ..RecordBatch::default()
        }
    }

    /// The identity of this queue's offsets: a record is named by `(incarnation, offset)`.
    pub fn incarnation(&self) -> &str {
        &self.shared.incarnation
    }

    /// The names of the consumers that have a cursor file in this queue (running here or not).
    pub fn cursor_names(&self) -> Result<Vec<String>, QueueError> {
        Ok(list_cursor_files(&self.shared.cursors_dir)?
            .iter()
            .filter_map(|path| Some(path.file_stem()?.to_str()?.to_string()))
            .collect())
    }

    /// The offset one past the last durable record.
    pub fn durable_end(&self) -> u64 {
        self.shared.durable_end()
    }

    /// Wakes whenever the durable end moves.
    pub fn subscribe_durable_end(&self) -> watch::Receiver<u64> {
        self.shared.end_watch.subscribe()
    }

    /// Opens the named consumer at its persisted cursor and registers it, so that no segment it
    /// has not passed is deleted. Blocking (reads the cursor file).
    pub fn consumer(&self, name: &str) -> Result<Consumer, QueueError> {
        Consumer::open(Arc::clone(&self.shared), name)
    }

    pub fn stats(&self) -> QueueStats {
        let consumer_positions = self.shared.lock_positions().clone();
        let segments = self.shared.lock_segments();
        QueueStats {
            incarnation: self.shared.incarnation.clone(),
            first_offset: segments
                .first()
                .map(|segment| segment.base_offset)
                .unwrap_or_else(|| self.shared.durable_end()),
            end_offset: self.shared.durable_end(),
            disk_bytes: self.shared.disk_bytes.load(Ordering::Acquire),
            disk_budget_bytes: self.shared.config.disk_budget_bytes,
            segment_count: segments.len(),
            pending_records: pending_below(
                self.shared.durable_end(),
                consumer_positions.values().copied(),
            ),
            consumer_positions,
            broken: self.shared.broken_reason(),
            sync_count: self.shared.sync_count.load(Ordering::Relaxed),
            abandoned_appends: self.shared.abandoned_appends.load(Ordering::Relaxed),
            damaged_records: self.shared.damage.damaged_records.load(Ordering::Relaxed),
            quarantined_bytes: self.shared.damage.quarantined_bytes.load(Ordering::Relaxed),
        }
    }

    /// True while appends can succeed: not broken, not refusing appends for its budget, and its
    /// filesystem has room above the free-space reserve (looked at now).
    pub fn is_writable(&self) -> bool {
        self.shared.broken_reason().is_none()
            && !self.shared.refusing_for_budget.load(Ordering::Acquire)
            && self.shared.disk_bytes.load(Ordering::Acquire) < self.shared.config.disk_budget_bytes
            && self.has_disk_room()
    }

    /// Free bytes on the queue's filesystem now (`None` if they cannot be read).
    pub fn disk_free_bytes(&self) -> Option<u64> {
        crate::disk_space::free_bytes(&self.shared.segments_dir).ok()
    }

    fn has_disk_room(&self) -> bool {
        /// Room an append needs above the reserve to be worth trying.
        const MIN_APPEND_ROOM_BYTES: u64 = 64 * 1024;
        self.disk_free_bytes().is_none_or(|free_bytes| {
            free_bytes >= self.shared.free_space_reserve_bytes + MIN_APPEND_ROOM_BYTES
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.config.dir
    }

    /// The keys records are sealed with, when the queue encrypts at rest.
    pub fn encryption(&self) -> Option<Arc<QueueEncryption>> {
        self.shared.config.encryption.clone()
    }

    /// Stops the writer after it has committed every append sent before this call. Blocking.
    pub fn close(&self) {
        let _ = self.sender.send(WriterCommand::Shutdown);
        let handle = self
            .writer_thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            warn!(dir = %self.shared.config.dir.display(), "queue writer thread panicked");
        }
    }
}
