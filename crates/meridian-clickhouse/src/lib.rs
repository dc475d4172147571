//! The ClickHouse sink: every region's queue flushes into that region's ClickHouse (one of its
//! replicas), in RowBinary batches that are one contiguous queue range each, with the schema
//! chosen by server version and rows ClickHouse rejects isolated into a dead-letter file.

mod rekey;
mod row;
pub mod schema;
mod sink;

pub use row::{EventFields, LegacyEventRow, ModernEventRow, StoredMessageError};
pub use schema::{SchemaFlavor, SchemaOptions, ServerVersion};
pub use sink::insights::{
    self, EventTotal, InsightsError, InsightsLimits, InsightsRange, Interval, VolumePoint,
};
pub use sink::{ClickHouseConfig, ClickHouseSink, MigrationReport, ReplayOutcome, WarehouseError};
