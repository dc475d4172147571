//! Why a node could not be built, started or asked something.

/// A node's failures, each naming what failed; URLs are redacted.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open the catalog at {url}: {message}")]
    Catalog { url: String, message: String },
    #[error("cannot prepare the data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("cannot open the queue of region {region}: {message}")]
    Queue { region: String, message: String },
    #[error("the catalog key: {0}")]
    CatalogKey(String),
    #[error("region {region}: {message}")]
    Region { region: String, message: String },
}

/// A failed step of a background job (it is retried), or of a scan: what failed, in a sentence,
/// its URLs redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StepError(String);

impl StepError {
    pub fn new(reason: impl std::fmt::Display) -> StepError {
        StepError(meridian_core::redact_url(&reason.to_string()))
    }

    /// `what: reason`.
    pub fn of(what: &str, reason: impl std::fmt::Display) -> StepError {
        StepError::new(format!("{what}: {reason}"))
    }
}

impl From<meridian_catalog::CatalogError> for StepError {
    fn from(error: meridian_catalog::CatalogError) -> StepError {
        StepError::new(error)
    }
}

impl From<meridian_clickhouse::WarehouseError> for StepError {
    fn from(error: meridian_clickhouse::WarehouseError) -> StepError {
        StepError::new(error)
    }
}

impl From<String> for StepError {
    fn from(reason: String) -> StepError {
        StepError::new(reason)
    }
}
