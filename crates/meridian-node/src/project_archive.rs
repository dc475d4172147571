//! A project's archive as the admin jobs (replays, retention) reach it: the region's store and,
//! when the project has one, its own bucket; every call bounded in time.

use std::sync::Arc;
use std::time::Duration;

use meridian_archive::ObjectStore;
use meridian_core::RegionId;

use crate::error::StepError;
use crate::node::Node;
use crate::region::RegionServices;

/// How long one archive read, listing or deletion may take.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(120);

/// Which of a project's archive stores an object is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// The region's own archive store.
    Regional,
    /// The project's own bucket (Local Data Storage).
    Customer,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Regional => "regional",
            StoreKind::Customer => "customer",
        }
    }
}

/// One store holding part of a project's archive, with the prefix its objects are under.
pub struct ProjectStore {
    pub kind: StoreKind,
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Option<String>,
}

/// `work`, cut at [`STORE_TIMEOUT`], its error described as `what: ...`.
pub async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, StepError> {
    match tokio::time::timeout(STORE_TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(StepError::of(what, error)),
        Err(_) => Err(StepError::of(
            what,
            format!("timed out after {} s", STORE_TIMEOUT.as_secs()),
        )),
    }
}

/// The stores of the project's archive: the region's, then the project's own bucket if it has
/// one (reached through its role, as the archive sink reaches it).
pub async fn stores_of_project(
    node: &Node,
    region: &RegionId,
    services: &RegionServices,
    project_id: &str,
) -> Result<Vec<ProjectStore>, StepError> {
    let mut stores = vec![ProjectStore {
        kind: StoreKind::Regional,
        store: Arc::clone(&services.archive_store),
        prefix: services.archive_prefix.clone(),
    }];
    if let Some(storage) = node.keys.customer_storage(project_id) {
        let (store, prefix) = node
            .customer_stores
            .store_for(
                &node.settings.aws_region_of(region.as_str()),
                project_id,
                &storage,
            )
            .await
            .map_err(|error| {
                StepError::of(&format!("customer bucket {}", storage.bucket), error)
            })?;
        stores.push(ProjectStore {
            kind: StoreKind::Customer,
            store,
            prefix: Some(prefix),
        });
    }
    Ok(stores)
}

/// A short stable name of an archive object (named `<store>:<key>`), for insert dedup tokens and
/// the names of its copies (keys may be long).
pub fn object_token(label: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(label.as_bytes());
    digest[..12]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_tokens_are_short_and_stable() {
        let token = object_token("regional:segment-logs/prj_1/1796169600000/q1-0-5.gz");
        assert_eq!(token.len(), 24);
        assert_eq!(
            token,
            object_token("regional:segment-logs/prj_1/1796169600000/q1-0-5.gz")
        );
        assert_ne!(
            token,
            object_token("customer:segment-logs/prj_1/1796169600000/q1-0-5.gz")
        );
    }
}
