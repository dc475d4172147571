//! The catalog: orgs, projects, write keys and the audit log in the global catalog; suppressions,
//! deletions and replays in each region's own store ([`RegionalStores`]); in SQLite (the embedded
//! default) or PostgreSQL (clusters), through one code path (sqlx's `Any` driver and SQL that both
//! accept). The ingress never queries it on the request path: it reads the [`KeyCache`], an
//! in-memory snapshot kept fresh in the background.

mod audit;
mod audit_anchor;
mod catalog;
mod deletion;
mod error;
mod ids;
mod key_cache;
pub mod keyed_hash;
pub(crate) mod lease;
mod ledger;
mod org;
mod project;
mod region_migration;
mod regional;
mod replay;
mod retention;
mod schema;
mod snapshot_source;
mod suppression;
mod token_revocation;

pub use audit::{Actor, AuditChainReport, AuditEntry};
pub use audit_anchor::AnchorOutcome;
pub use catalog::{Catalog, CatalogBackend, KeyInfo, NewProject, Org, Page, Project, RotatedKey};
pub use deletion::{Deletion, DeletionProgress, DeletionStage, DeletionStatus};
pub use error::CatalogError;
pub use ids::{generate_write_key, hash_write_key, write_key_prefix};
pub use key_cache::{KeyCache, ResolvedKey};
pub use keyed_hash::CatalogKey;
pub use ledger::{
    LEDGER_ARCHIVE_SINK, LEDGER_WAREHOUSE_SINK, LedgerDay, LedgerRange, UnreconciledDay,
};
pub use region_migration::{MigrationProgress, MigrationStatus, RegionMigration};
pub use regional::{MovedRows, RegionalStore, RegionalStores, move_end_user_rows};
pub use replay::{Replay, ReplayProgress, ReplayStatus};
pub use retention::{MAX_RETENTION_DAYS, ProjectRetention, RetentionSetting, RetentionSubject};
pub use token_revocation::{NewTokenRevocation, TokenIdentity, TokenRevocation, TokenRevocations};

#[cfg(test)]
mod tests;
