use async_trait::async_trait;
use bytes::Bytes;

use crate::error::ArchiveError;

/// Somewhere archive objects live: a local directory, a regional S3 bucket, a customer's bucket.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A short description for logs and errors (`dir:/data/archive/eu-west-1`, `s3://bucket`).
    fn describe(&self) -> String;
    /// Writes the object whole, replacing any object with the same key.
    async fn put(&self, key: &str, gzip_body: Bytes) -> Result<(), ArchiveError>;
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError>;
    /// Every key starting with `prefix`, ascending.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, ArchiveError>;
    async fn delete(&self, key: &str) -> Result<(), ArchiveError>;
    /// A problem an operator must fix (e.g. a residency mismatch), for `/readyz`.
    fn health(&self) -> Option<String> {
        None
    }
}
