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
}

impl CatalogError {
    pub fn conflict(code: &'static str, message: impl Into<String>) -> CatalogError {
        CatalogError::Conflict {
            code,
            message: message.into(),
        }
    }
}
