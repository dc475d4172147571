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

/// Why a customer's bucket failed the access check made before its settings are saved, by step.
/// Every message is a sentence an admin can act on (which permission, which condition).
#[derive(Debug, thiserror::Error)]
pub enum StorageVerificationError {
    #[error("{0}")]
    AssumeRole(String),
    #[error("{0}")]
    Bucket(String),
    #[error(
        "bucket {bucket} is in {bucket_region}, but project {project_id} is pinned to {region}: use a bucket in {region} (data never leaves its region)"
    )]
    WrongRegion {
        bucket: String,
        bucket_region: String,
        project_id: String,
        region: String,
    },
    #[error("{0}")]
    TestWrite(String),
    #[error("{0}")]
    TestDelete(String),
    #[error("verifying access to the bucket timed out after {seconds} s")]
    TimedOut { seconds: u64 },
}
