//! Domain types and pure logic of Meridian: regions, message validation and enrichment,
//! timestamps. No I/O lives here, so everything in this crate is unit-testable in isolation.

pub mod message;
pub mod region;
pub mod storage;
pub mod timestamp;

pub use message::{
    BatchEnvelope, EnrichedMessage, EnrichmentContext, IngestLimits, MessageKind, MessageRejection,
    RejectCode, enrich_message,
};
pub use region::RegionId;
pub use storage::CustomerStorage;
