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
}

impl ArchiveError {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, error: std::io::Error) -> ArchiveError {
        ArchiveError::Io {
            path: path.as_ref().display().to_string(),
            message: error.to_string(),
        }
    }
}
