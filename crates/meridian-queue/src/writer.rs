//! The writer thread: one per queue. It drains every append waiting in its channel, writes them
//! with one `write`, makes them durable with one `fdatasync` (group commit), then answers them all.
//! While it syncs, new appends pile up in the channel and form the next group.
//!
//! In `buffered` mode appends are answered once written, and the writer syncs on a clock: at most
//! `sync_interval` after the oldest unsynced write, however busy the channel is. Readers only ever
//! see the synced end, in both modes, so no sink can deliver (and commit a cursor past) a record
//! that a power cut could still take away.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::error::QueueError;
use crate::queue::{Durability, OffsetRange, SegmentMeta, Shared};
use crate::segment::{create_segment, stamp_offsets};

/// A group is closed once it holds this many bytes, so one sync never waits on unbounded work.
const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;

pub(crate) struct AppendRequest {
    pub encoded: Vec<u8>,
    pub record_count: u64,
    pub reply: oneshot::Sender<Result<OffsetRange, QueueError>>,
    /// The request's share of the queue's in-flight bytes: held until the writer takes the
    /// request out of the channel (its bytes then live in the bounded group buffer), so a request
    /// whose caller gave up (timeout, client gone) still counts while it waits, and memory stays
    /// bounded however slow the disk is.
    pub in_flight: tokio::sync::OwnedSemaphorePermit,
}

pub(crate) enum WriterCommand {
    Append(AppendRequest),
    Shutdown,
}

/// When a buffered writer must sync: `interval` after the oldest write not yet synced. Later
/// writes never push the deadline back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SyncSchedule {
    interval: Option<Duration>,
    unsynced_since: Option<Instant>,
}

impl SyncSchedule {
    pub fn new(durability: Durability) -> SyncSchedule {
        SyncSchedule {
            interval: match durability {
                Durability::Fsync => None,
                Durability::Buffered { sync_interval } => Some(sync_interval),
            },
            unsynced_since: None,
        }
    }

    pub fn note_unsynced_write(&mut self, now: Instant) {
        if self.unsynced_since.is_none() {
            self.unsynced_since = Some(now);
        }
    }

    pub fn note_synced(&mut self) {
        self.unsynced_since = None;
    }

    pub fn has_unsynced_writes(&self) -> bool {
        self.unsynced_since.is_some()
    }

    /// When the next sync is due; `None` while nothing waits for one.
    pub fn due(&self) -> Option<Instant> {
        Some(self.unsynced_since? + self.interval?)
    }

    pub fn is_due(&self, now: Instant) -> bool {
        self.due().is_some_and(|due| now >= due)
    }
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: File,
    path: PathBuf,
    segment_bytes: u64,
    /// The offset the next written record gets (the written end; readers see the synced end).
    next_offset: u64,
    sync_schedule: SyncSchedule,
    group_buffer: Vec<u8>,
}

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        file: File,
        path: PathBuf,
        segment_bytes: u64,
        next_offset: u64,
    ) -> Writer {
        let sync_schedule = SyncSchedule::new(shared.config.durability);
        Writer {
            shared,
            file,
            path,
            segment_bytes,
            next_offset,
            sync_schedule,
            group_buffer: Vec::new(),
        }
    }

    pub fn run(mut self, receiver: Receiver<WriterCommand>) {
        loop {
            let first_command = match self.sync_schedule.due() {
                None => match receiver.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
                Some(due) => {
                    let now = Instant::now();
                    if now >= due {
                        self.sync_buffered_writes();
                        continue;
                    }
                    match receiver.recv_timeout(due - now) {
                        Ok(command) => command,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync_buffered_writes();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            // Tests stall the writer here (a slow disk), with the group's first request in hand.
            #[cfg(test)]
            drop(
                self.shared
                    .writer_stall
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            let mut group = Vec::new();
            let mut shutdown_requested = false;
            match first_command {
                WriterCommand::Append(request) => group.push(request),
                WriterCommand::Shutdown => shutdown_requested = true,
            }
            let mut group_bytes: usize = group.iter().map(|request| request.encoded.len()).sum();
            while !shutdown_requested && group_bytes < MAX_GROUP_BYTES {
                match receiver.try_recv() {
                    Ok(WriterCommand::Append(request)) => {
                        group_bytes += request.encoded.len();
                        group.push(request);
                    }
                    Ok(WriterCommand::Shutdown) => shutdown_requested = true,
                    Err(_) => break,
                }
            }
            self.commit_group(group);
            if self.sync_schedule.is_due(Instant::now()) {
                self.sync_buffered_writes();
            }
            if shutdown_requested {
                break;
            }
        }
        self.sync_buffered_writes();
    }

    fn commit_group(&mut self, group: Vec<AppendRequest>) {
        let budget_bytes = self.shared.config.disk_budget_bytes;
        let mut used_bytes = self.shared.disk_bytes.load(Ordering::Acquire);
        let mut next_offset = self.next_offset;
        let mut accepted = Vec::with_capacity(group.len());
        self.group_buffer.clear();
        let broken_reason = self.shared.broken_reason();
        for request in group {
            // Out of the channel: its bytes are copied into the group buffer or dropped below.
            drop(request.in_flight);
            if request.reply.is_closed() {
                // Nobody waits for this answer (the append timed out or the client went away):
                // no 200 can be sent for it, so it is not written, and a client's retry does not
                // leave a second copy behind.
                self.shared
                    .abandoned_appends
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Some(reason) = &broken_reason {
                let _ = request.reply.send(Err(QueueError::Broken(reason.clone())));
                continue;
            }
            let request_bytes = request.encoded.len() as u64;
            if used_bytes + request_bytes > budget_bytes {
                self.shared
                    .refusing_for_budget
                    .store(true, Ordering::Release);
                let _ = request.reply.send(Err(QueueError::Full {
                    used_bytes,
                    budget_bytes,
                }));
                continue;
            }
            used_bytes += request_bytes;
            let range = OffsetRange {
                start: next_offset,
                end: next_offset + request.record_count,
            };
            next_offset = range.end;
            let request_start = self.group_buffer.len();
            self.group_buffer.extend_from_slice(&request.encoded);
            let stamped = stamp_offsets(&mut self.group_buffer[request_start..], range.start);
            debug_assert_eq!(stamped, request.record_count);
            accepted.push((request.reply, range));
        }
        if accepted.is_empty() {
            return;
        }
        if let Err(refusal) = self.check_free_space() {
            for (reply, _) in accepted {
                let _ = reply.send(Err(refusal.clone()));
            }
            return;
        }
        if let Err(failure) = self.write_group() {
            for (reply, _) in accepted {
                let _ = reply.send(Err(failure.clone()));
            }
            return;
        }
        let written = self.group_buffer.len() as u64;
        self.segment_bytes += written;
        self.next_offset = next_offset;
        self.shared.disk_bytes.fetch_add(written, Ordering::AcqRel);
        if let Some(active) = self.shared.lock_segments().last_mut() {
            active.bytes = self.segment_bytes;
        }
        self.shared
            .refusing_for_budget
            .store(false, Ordering::Release);
        if self
            .shared
            .refusing_for_disk_space
            .swap(false, Ordering::AcqRel)
        {
            info!(segment = %self.path.display(), "the queue's disk has room again: appends are accepted");
        }
        if self.shared.config.durability == Durability::Fsync {
            // Synced by write_group: readers may see it. Buffered writes are published by the sync.
            self.shared.publish_end(next_offset);
        }
        for (reply, range) in accepted {
            let _ = reply.send(Ok(range));
        }
        if self.segment_bytes >= self.shared.config.segment_max_bytes {
            self.roll_segment();
        }
    }

    /// Writes the group buffer and, in fsync mode, syncs it. A failed write is undone (the file is
    /// truncated back) so that later appends never follow garbage; a failed sync breaks the queue,
    /// since the kernel may have dropped the dirty pages (what was written can no longer be trusted
    /// to be on disk, nor known not to be).
    fn write_group(&mut self) -> Result<(), QueueError> {
        if let Err(write_error) = self.file.write_all(&self.group_buffer) {
            let out_of_space = crate::disk_space::is_out_of_space(&write_error);
            let failure = QueueError::io("appending to", &self.path, write_error);
            if let Err(rollback_error) = self.undo_partial_write(false) {
                let reason =
                    format!("{failure}; undoing the partial write failed: {rollback_error}");
                error!(segment = %self.path.display(), %reason, "queue is broken");
                self.shared.mark_broken(reason);
                return Err(failure);
            }
            if out_of_space {
                return Err(self.note_out_of_space());
            }
            warn!(segment = %self.path.display(), error = %failure, "queue append failed");
            return Err(failure);
        }
        match self.shared.config.durability {
            Durability::Fsync => {
                self.shared.sync_count.fetch_add(1, Ordering::Relaxed);
                if let Err(sync_error) = self.file.sync_data() {
                    // Nothing of this group was acknowledged, and everything before it was synced:
                    // cutting the group off and syncing again leaves a file whose every byte is
                    // known to be on disk. Only if that fails too is the queue broken.
                    let out_of_space = crate::disk_space::is_out_of_space(&sync_error);
                    let reason =
                        format!("fdatasync of {} failed: {sync_error}", self.path.display());
                    if let Err(rollback_error) = self.undo_partial_write(true) {
                        let reason = format!(
                            "{reason}; cutting the unsynced group off failed: {rollback_error}"
                        );
                        error!(segment = %self.path.display(), %reason, "queue is broken");
                        self.shared.mark_broken(reason.clone());
                        return Err(QueueError::Broken(reason));
                    }
                    if out_of_space {
                        return Err(self.note_out_of_space());
                    }
                    warn!(segment = %self.path.display(), %reason, "queue sync failed; the group was cut off and refused");
                    return Err(QueueError::Io {
                        action: "syncing",
                        path: self.path.clone(),
                        message: sync_error.to_string(),
                    });
                }
            }
            Durability::Buffered { .. } => self.sync_schedule.note_unsynced_write(Instant::now()),
        }
        Ok(())
    }

    /// Cuts the segment back to what was written before this group (and syncs it, when asked),
    /// so that later appends never follow garbage.
    fn undo_partial_write(&mut self, sync: bool) -> std::io::Result<()> {
        self.file.set_len(self.segment_bytes)?;
        self.file.seek(SeekFrom::Start(self.segment_bytes))?;
        if sync {
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// Refuses the group when the filesystem would keep less than the reserve after writing it.
    fn check_free_space(&mut self) -> Result<(), QueueError> {
        let reserve_bytes = self.shared.free_space_reserve_bytes;
        let free_bytes = match crate::disk_space::free_bytes(&self.shared.segments_dir) {
            Ok(free_bytes) => free_bytes,
            Err(statvfs_error) => {
                // Cannot tell: the write itself finds out (ENOSPC is handled there too).
                tracing::debug!(error = %statvfs_error, "statvfs of the queue directory failed");
                return Ok(());
            }
        };
        let needed_bytes = reserve_bytes.saturating_add(self.group_buffer.len() as u64);
        if free_bytes >= needed_bytes {
            return Ok(());
        }
        let free_bytes = match self.release_consumed_active_segment() {
            Some(free_after_release) if free_after_release >= needed_bytes => return Ok(()),
            Some(free_after_release) => free_after_release,
            None => free_bytes,
        };
        Err(self.refuse_for_disk_space(
            free_bytes,
            "the queue's disk is below its free-space reserve: appends are refused (503) until space returns; sinks keep draining into the reserve",
        ))
    }

    /// When every consumer has delivered all of the active segment, a small disk may be full of
    /// nothing but delivered records that garbage collection cannot delete (it never deletes the
    /// active segment): starts a new segment so the old one can go. Returns the free bytes after
    /// that, or `None` when there was nothing to release.
    fn release_consumed_active_segment(&mut self) -> Option<u64> {
        let header_bytes = crate::segment::SEGMENT_HEADER_BYTES;
        if self.segment_bytes <= header_bytes {
            return None;
        }
        let everything_delivered = self
            .shared
            .lock_positions()
            .values()
            .min()
            .is_some_and(|slowest| *slowest >= self.next_offset);
        if !everything_delivered {
            return None;
        }
        self.roll_segment();
        self.shared.collect_garbage();
        let free_bytes = crate::disk_space::free_bytes(&self.shared.segments_dir).ok()?;
        info!(segment = %self.path.display(), free_bytes, "the disk was below its reserve with every queued record delivered: started a new segment so the delivered one could be deleted");
        Some(free_bytes)
    }

    fn note_out_of_space(&self) -> QueueError {
        let free_bytes = crate::disk_space::free_bytes(&self.shared.segments_dir).unwrap_or(0);
        self.refuse_for_disk_space(
            free_bytes,
            "the queue's disk is full (ENOSPC): the group was cut off and refused; appends are refused (503) until space returns",
        )
    }

    /// Marks the queue as refusing for disk space (logging `why` once when it starts) and
    /// returns the refusal for the group's requests.
    fn refuse_for_disk_space(&self, free_bytes: u64, why: &'static str) -> QueueError {
        let reserve_bytes = self.shared.free_space_reserve_bytes;
        if !self
            .shared
            .refusing_for_disk_space
            .swap(true, Ordering::AcqRel)
        {
            warn!(segment = %self.path.display(), free_bytes, reserve_bytes, "{why}");
        }
        QueueError::DiskFull {
            free_bytes,
            reserve_bytes,
        }
    }

    /// Syncs what buffered mode wrote and publishes it to readers.
    fn sync_buffered_writes(&mut self) {
        if !self.sync_schedule.has_unsynced_writes() {
            return;
        }
        self.shared.sync_count.fetch_add(1, Ordering::Relaxed);
        match self.file.sync_data() {
            Ok(()) => {
                self.sync_schedule.note_synced();
                self.shared.publish_end(self.next_offset);
            }
            Err(sync_error) => {
                let reason = format!("fdatasync of {} failed: {sync_error}", self.path.display());
                error!(segment = %self.path.display(), %reason, "queue is broken");
                self.shared.mark_broken(reason);
            }
        }
    }

    /// Closes the active segment and starts the next one. On failure the writer keeps appending
    /// to the current segment and tries again after the next group.
    fn roll_segment(&mut self) {
        self.sync_buffered_writes();
        match create_segment(&self.shared.segments_dir, self.next_offset) {
            Ok((path, file)) => {
                let header_bytes = crate::segment::SEGMENT_HEADER_BYTES;
                self.shared.lock_segments().push(SegmentMeta {
                    base_offset: self.next_offset,
                    path: path.clone(),
                    bytes: header_bytes,
                });
                self.shared
                    .disk_bytes
                    .fetch_add(header_bytes, Ordering::AcqRel);
                self.file = file;
                self.path = path;
                self.segment_bytes = header_bytes;
            }
            Err(roll_error) => {
                warn!(error = %roll_error, "could not start a new queue segment; continuing in the current one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffered_sync_is_due_an_interval_after_the_oldest_unsynced_write_however_busy() {
        let interval = Duration::from_millis(100);
        let mut schedule = SyncSchedule::new(Durability::Buffered {
            sync_interval: interval,
        });
        let start = Instant::now();
        assert_eq!(schedule.due(), None, "nothing written, nothing due");
        schedule.note_unsynced_write(start);
        // A write every millisecond: the deadline stays where the first write put it.
        for millis in 1..=99 {
            let now = start + Duration::from_millis(millis);
            schedule.note_unsynced_write(now);
            assert!(!schedule.is_due(now));
        }
        assert_eq!(schedule.due(), Some(start + interval));
        assert!(schedule.is_due(start + interval));
        schedule.note_synced();
        assert_eq!(schedule.due(), None);
        assert!(!schedule.has_unsynced_writes());
    }

    #[test]
    fn fsync_mode_never_schedules_syncs() {
        let mut schedule = SyncSchedule::new(Durability::Fsync);
        schedule.note_unsynced_write(Instant::now());
        assert_eq!(schedule.due(), None);
    }
}
