//! The raw archive: every stored message, as gzip NDJSON objects in Segment's S3 layout,
//! `[prefix/]segment-logs/<project_id>/<received-day-unix-ms>/<first-offset>-<end-offset>.gz`.
//!
//! Object names come from the queue offsets they hold, so redelivering a batch overwrites the same
//! objects instead of duplicating messages. Stores: a local directory (the embedded default) and
//! S3 (a regional bucket, or a project's own bucket reached through STS AssumeRole).

mod batch;
pub mod customer;
mod error;
pub mod layout;
mod local;
pub mod rewrite;
pub mod s3;
mod sink;
mod spool;
mod store;

pub use error::{ArchiveError, StorageVerificationError};
pub use layout::{ArchivedMessage, decode_object, encode_object, object_key};
pub use local::LocalDirStore;
pub use sink::{ArchiveSink, ArchiveSinkConfig, CustomerTarget, NoCustomerStorage, StoreResolver};
pub use spool::{Spool, SpooledObject};
pub use store::ObjectStore;
