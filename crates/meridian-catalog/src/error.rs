#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    NotFound(String),
    /// The change conflicts with the current state; `code` is the API's snake_case error code.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("catalog data is inconsistent: {0}")]
    Corrupt(String),
    /// The data asked for lives in the regional store of a region this node does not serve (a
    /// node never connects to another region's store).
    #[error(
        "this node does not serve {region}, whose regional store holds that data: ask a node of {region}"
    )]
    RegionNotServed { region: String },
}

impl CatalogError {
    pub fn conflict(code: &'static str, message: impl Into<String>) -> CatalogError {
        CatalogError::Conflict {
            code,
            message: message.into(),
        }
    }
}
