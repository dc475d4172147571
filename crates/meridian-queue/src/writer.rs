//! The writer thread: one per queue. It drains every append waiting in its channel, writes them
//! with one `write`, makes them durable with one `fdatasync` (group commit), then answers them all.
//! While it syncs, new appends pile up in the channel and form the next group.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use tokio::sync::oneshot;
use tracing::{error, warn};

use crate::error::QueueError;
use crate::queue::{Durability, OffsetRange, SegmentMeta, Shared};
use crate::segment::create_segment;

/// A group is closed once it holds this many bytes, so one sync never waits on unbounded work.
const MAX_GROUP_BYTES: usize = 32 * 1024 * 1024;

pub(crate) struct AppendRequest {
    pub encoded: Vec<u8>,
    pub record_count: u64,
    pub reply: oneshot::Sender<Result<OffsetRange, QueueError>>,
}

pub(crate) enum WriterCommand {
    Append(AppendRequest),
    Shutdown,
}

pub(crate) struct Writer {
    shared: Arc<Shared>,
    file: File,
    path: PathBuf,
    segment_bytes: u64,
    next_offset: u64,
    has_unsynced_writes: bool,
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
        Writer {
            shared,
            file,
            path,
            segment_bytes,
            next_offset,
            has_unsynced_writes: false,
            group_buffer: Vec::new(),
        }
    }

    pub fn run(mut self, receiver: Receiver<WriterCommand>) {
        loop {
            let first_command = match self.shared.config.durability {
                Durability::Fsync => match receiver.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
                Durability::Buffered { sync_interval } => {
                    match receiver.recv_timeout(sync_interval) {
                        Ok(command) => command,
                        Err(RecvTimeoutError::Timeout) => {
                            self.sync_buffered_writes();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
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
            self.group_buffer.extend_from_slice(&request.encoded);
            accepted.push((request.reply, range));
        }
        if accepted.is_empty() {
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
        self.shared.publish_end(next_offset);
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
            let failure = QueueError::io("appending to", &self.path, write_error);
            let rollback = self.file.set_len(self.segment_bytes).and_then(|()| {
                self.file
                    .seek(SeekFrom::Start(self.segment_bytes))
                    .map(|_| ())
            });
            if let Err(rollback_error) = rollback {
                let reason =
                    format!("{failure}; undoing the partial write failed: {rollback_error}");
                error!(segment = %self.path.display(), %reason, "queue is broken");
                self.shared.mark_broken(reason);
            } else {
                warn!(segment = %self.path.display(), error = %failure, "queue append failed");
            }
            return Err(failure);
        }
        match self.shared.config.durability {
            Durability::Fsync => {
                self.shared.sync_count.fetch_add(1, Ordering::Relaxed);
                if let Err(sync_error) = self.file.sync_data() {
                    let reason =
                        format!("fdatasync of {} failed: {sync_error}", self.path.display());
                    error!(segment = %self.path.display(), %reason, "queue is broken");
                    self.shared.mark_broken(reason.clone());
                    return Err(QueueError::Broken(reason));
                }
            }
            Durability::Buffered { .. } => self.has_unsynced_writes = true,
        }
        Ok(())
    }

    fn sync_buffered_writes(&mut self) {
        if !self.has_unsynced_writes {
            return;
        }
        self.shared.sync_count.fetch_add(1, Ordering::Relaxed);
        match self.file.sync_data() {
            Ok(()) => self.has_unsynced_writes = false,
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
