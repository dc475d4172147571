#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive I/O error on {path}: {message}")]
    Io { path: String, message: String },
    #[error("archive store {store} failed: {message}")]
    Store { store: String, message: String },
    #[error("archive object {key} is not valid gzip NDJSON: {message}")]
    BadObject { key: String, message: String },
    #[error("{0}")]
    Refused(String),
    #[error(
        "the customer spool is full ({used_bytes} of its {budget_bytes} bytes): the batch stays in the region's queue until customer buckets take their objects again"
    )]
    SpoolFull { used_bytes: u64, budget_bytes: u64 },
}

impl ArchiveError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, error: std::io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: path.as_ref().display().to_string(),
            message: error.to_string(),
        }
    }
}
