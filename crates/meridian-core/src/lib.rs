//! Domain types and pure logic of Meridian: regions, message validation and enrichment,
//! timestamps. No I/O lives here, so everything in this crate is unit-testable in isolation.

pub mod message;
pub mod region;
pub mod secret;
pub mod storage;
pub mod timestamp;

pub use message::{
    BatchEnvelope, EnrichedMessage, EnrichmentContext, IngestLimits, MessageKind, MessageRejection,
    RejectCode, enrich_message,
};
pub use region::RegionId;
pub use secret::{Secret, redact_url, split_url_credentials};
pub use storage::{CustomerStorage, StorageSettingError, external_id_for};

/// Tells sinks which stored messages a GDPR deletion has erased: a message of `user_id` in
/// `project_id` received at or before a deletion of that user is never written to a sink.
pub trait ErasureFilter: Send + Sync + 'static {
    fn is_erased(&self, project_id: &str, user_id: &str, received_at_ms: i64) -> bool;
}

/// No deletions (tests, tools).
pub struct NoErasures;

impl ErasureFilter for NoErasures {
    fn is_erased(&self, _project_id: &str, _user_id: &str, _received_at_ms: i64) -> bool {
        false
    }
}
