//! The per-region durable queue: an append-only log of CRC-framed records in segment files, with
//! group commit (many concurrent appends share one `fdatasync`), a disk budget, and one persisted
//! cursor per sink.
//!
//! ```text
//! <dir>/incarnation                      {"incarnation": "q<32 hex>", "created_at_ms", "reason"}
//! <dir>/segments/<base-offset:020>.seg   header (magic + base offset), then records that each
//!                                        carry their offset (see [`segment`])
//! <dir>/quarantine/<base>-<byte>.damaged damaged bytes a reader skipped, with a `.json` description
//! <dir>/cursors/<sink>.cursor            {"next_offset": N, "in_flight": {start, end} | null,
//!                                         "incarnation": "q..."}
//! ```
//!
//! Offsets count records: the first record ever appended has offset 0 and each record's offset is
//! one more than its predecessor's. A segment is named after the offset of its first record. Only
//! records below the durable end (synced, in every durability mode) are ever handed to readers.
//! Damage on disk never shifts offsets: a damaged record is skipped by resynchronising on the next
//! intact record, which names its own offset, so the records lost are exactly the damaged ones
//! (counted, logged, and their bytes quarantined: see [`quarantine`]).
//! Offsets are only unique within one incarnation of the queue: data is named by
//! `(incarnation, offset)` (see [`incarnation`]).

pub mod backend;
mod consumer;
mod delivery;
pub mod disk_space;
pub mod encryption;
mod error;
pub mod incarnation;
pub mod inspect;
pub mod jetstream;
pub mod quarantine;
mod queue;
mod recovery;
/// Segment files and record framing (public for the fuzz targets and tools).
pub mod segment;
mod writer;

pub use backend::{BackendSample, DeliveryLog, LogCursor, QueueBackend, QueueMaintenance};
pub use consumer::{Consumer, CursorState, Record};
pub use delivery::{
    BatchEncoder, BatchLimits, DeliveryBatch, DeliveryRunner, DeliveryStatus, RetryPolicy, Sink,
    SinkError,
};
pub use error::{EncodeError, QueueError};
pub use queue::{Durability, OffsetRange, QueueConfig, QueueStats, RecordBatch, RegionQueue};
pub use segment::{MAX_RECORD_BYTES, RECORD_HEADER_BYTES, create_dir_all_durably};

#[cfg(test)]
mod tests;
