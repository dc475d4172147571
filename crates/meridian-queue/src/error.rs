use std::path::PathBuf;

/// Errors of the queue. Cloneable so that one failed group commit can answer every request in it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "the region's queue is full: {used_bytes} of its {budget_bytes}-byte disk budget are in use until its sinks catch up"
    )]
    Full { used_bytes: u64, budget_bytes: u64 },
    #[error(
        "the disk of the region's queue is full: {free_bytes} bytes free, {reserve_bytes} kept in reserve for its sinks"
    )]
    DiskFull { free_bytes: u64, reserve_bytes: u64 },
    #[error("a record of {size} bytes exceeds the queue's record limit of {limit} bytes")]
    RecordTooLarge { size: usize, limit: usize },
    #[error("the queue is closed")]
    Closed,
    #[error("the queue stopped accepting writes after a failed disk write: {0}")]
    Broken(String),
    #[error("queue I/O error while {action} {path}: {message}")]
    Io {
        action: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("corrupt record in queue segment {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    /// The records of `missing` were lost to damage in the segment (their bytes are
    /// quarantined); reading resumes at `missing.end`.
    #[error(
        "queue segment {path} is damaged: records {first}..{end} are lost ({reason})",
        first = missing.start,
        end = missing.end
    )]
    Damaged {
        path: PathBuf,
        missing: crate::queue::OffsetRange,
        reason: String,
    },
    #[error("queue encryption: {0}")]
    Encryption(String),
    /// A replicated backend cannot store or read right now (no quorum, cluster unreachable, a
    /// request unanswered in time): nothing was acknowledged; retry later.
    #[error("the region's replicated queue is unavailable: {0}")]
    Unavailable(String),
    /// Another node took over a cursor this node held (it stopped renewing it in time).
    #[error("another node took over the cursor {0}")]
    LeaseLost(String),
    #[error("queue cursor file {path} is unreadable: {message}")]
    BadCursor { path: PathBuf, message: String },
    #[error("queue incarnation file {path} is unreadable: {message}")]
    BadIncarnation { path: PathBuf, message: String },
}

impl QueueError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        error: std::io::Error,
    ) -> Self {
        QueueError::Io {
            action,
            path: path.into(),
            message: error.to_string(),
        }
    }
}

/// Why a sink's [`crate::BatchEncoder`] could not fold records into its batch. The batch is not
/// delivered; the runner retries the range later (the records stay in the queue).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("compressing the batch failed: {0}")]
    Compression(#[from] std::io::Error),
    #[error("the batch's encoding is inconsistent: {0}")]
    Inconsistent(String),
}
