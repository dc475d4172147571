//! The ingress's view of the catalog: an immutable in-memory snapshot of write keys, project
//! regions, customer storage and suppressions, swapped atomically when the catalog changes.
//!
//! Lookups never touch the database. A refresher polls the catalog's version every few hundred
//! milliseconds and reloads on change, so a new key works and a revoked key stops within about a
//! second on every node; when the catalog is unreachable the last snapshot keeps serving, so known
//! keys keep ingesting.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use meridian_core::timestamp::now_unix_ms;
use meridian_core::{CustomerStorage, RegionId};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::catalog::Catalog;
use crate::error::CatalogError;
use crate::ids::hash_write_key;

/// What a write key resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedKey {
    pub project_id: Arc<str>,
    pub region: RegionId,
}

#[derive(Clone, Debug)]
struct KeyEntry {
    resolved: ResolvedKey,
    expires_at_ms: Option<i64>,
}

#[derive(Clone, Debug)]
struct ProjectEntry {
    region: RegionId,
    storage: Option<Arc<CustomerStorage>>,
    /// Keyed hashes of the suppressed users (see [`crate::keyed_hash`]).
    suppressed_users: HashSet<String>,
    /// Keyed hashes of users with a GDPR deletion, and the time of their latest deletion request.
    erased_users: HashMap<String, i64>,
}

#[derive(Debug, Default)]
struct Snapshot {
    version: i64,
    keys: HashMap<[u8; 32], KeyEntry>,
    projects: HashMap<Arc<str>, ProjectEntry>,
}

pub struct KeyCache {
    catalog: Catalog,
    snapshot: ArcSwap<Snapshot>,
}

/// Reloads even without a version change this often, as a safety net.
const FORCED_RELOAD_EVERY: u32 = 100;

impl KeyCache {
    /// Loads the first snapshot; fails when the catalog cannot be read at all.
    pub async fn load(catalog: Catalog) -> Result<Arc<KeyCache>, CatalogError> {
        let cache = KeyCache {
            catalog,
            snapshot: ArcSwap::from_pointee(Snapshot {
                version: -1,
                ..Snapshot::default()
            }),
        };
        cache.reload().await?;
        Ok(Arc::new(cache))
    }

    /// Resolves a write key, refusing keys past their grace period.
    pub fn resolve(&self, write_key: &str) -> Option<ResolvedKey> {
        let hash = hash_write_key(write_key);
        let snapshot = self.snapshot.load();
        let entry = snapshot.keys.get(&hash)?;
        if let Some(expires_at_ms) = entry.expires_at_ms
            && now_unix_ms() >= expires_at_ms
        {
            return None;
        }
        Some(entry.resolved.clone())
    }

    pub fn is_suppressed(&self, project_id: &str, user_id: &str) -> bool {
        self.snapshot
            .load()
            .projects
            .get(project_id)
            .filter(|project| !project.suppressed_users.is_empty())
            .is_some_and(|project| {
                let user_hash = self.catalog.key().user_hash(project_id, user_id);
                project.suppressed_users.contains(&user_hash)
            })
    }

    /// Whether the project has any suppressed user (lets the hot path skip per-message lookups).
    pub fn has_suppressions(&self, project_id: &str) -> bool {
        self.snapshot
            .load()
            .projects
            .get(project_id)
            .is_some_and(|project| !project.suppressed_users.is_empty())
    }

    pub fn project_region(&self, project_id: &str) -> Option<RegionId> {
        self.snapshot
            .load()
            .projects
            .get(project_id)
            .map(|project| project.region.clone())
    }

    pub fn customer_storage(&self, project_id: &str) -> Option<Arc<CustomerStorage>> {
        self.snapshot
            .load()
            .projects
            .get(project_id)
            .and_then(|project| project.storage.clone())
    }

    pub fn version(&self) -> i64 {
        self.snapshot.load().version
    }

    /// Reloads if the catalog changed since the snapshot. Returns whether it reloaded.
    pub async fn refresh(&self) -> Result<bool, CatalogError> {
        let current_version = self.catalog.version().await?;
        if current_version == self.snapshot.load().version {
            return Ok(false);
        }
        self.reload().await?;
        Ok(true)
    }

    async fn reload(&self) -> Result<(), CatalogError> {
        let rows = self.catalog.load_snapshot_rows().await?;
        let mut projects: HashMap<Arc<str>, ProjectEntry> =
            HashMap::with_capacity(rows.projects.len());
        for (project_id, region, storage) in rows.projects {
            let Ok(region) = RegionId::parse(&region) else {
                warn!(
                    project_id,
                    region, "project has an invalid region in the catalog; ignoring it"
                );
                continue;
            };
            projects.insert(
                Arc::from(project_id.as_str()),
                ProjectEntry {
                    region,
                    storage: storage.map(Arc::new),
                    suppressed_users: HashSet::new(),
                    erased_users: HashMap::new(),
                },
            );
        }
        for (project_id, user_id) in rows.suppressions {
            if let Some(project) = projects.get_mut(project_id.as_str()) {
                project.suppressed_users.insert(user_id);
            }
        }
        for (project_id, user_ids, created_at_ms) in rows.deletions {
            if let Some(project) = projects.get_mut(project_id.as_str()) {
                for user_id in user_ids {
                    // Deletions still under way hold the ids; finished ones their hashes.
                    let user_hash = if crate::keyed_hash::is_user_hash(&user_id) {
                        user_id
                    } else {
                        self.catalog.key().user_hash(&project_id, &user_id)
                    };
                    let latest = project
                        .erased_users
                        .entry(user_hash)
                        .or_insert(created_at_ms);
                    *latest = (*latest).max(created_at_ms);
                }
            }
        }
        let mut keys = HashMap::with_capacity(rows.keys.len());
        for (hash, project_id, expires_at_ms) in rows.keys {
            let Some((shared_project_id, project)) = projects.get_key_value(project_id.as_str())
            else {
                continue;
            };
            keys.insert(
                hash,
                KeyEntry {
                    resolved: ResolvedKey {
                        project_id: Arc::clone(shared_project_id),
                        region: project.region.clone(),
                    },
                    expires_at_ms,
                },
            );
        }
        debug!(
            version = rows.version,
            keys = keys.len(),
            projects = projects.len(),
            "key cache reloaded"
        );
        self.snapshot.store(Arc::new(Snapshot {
            version: rows.version,
            keys,
            projects,
        }));
        Ok(())
    }

    /// Polls the catalog every `interval` until `shutdown` flips to true. Failures keep the last
    /// snapshot and are logged once per outage.
    pub async fn run_refresher(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticks_since_reload = 0u32;
        let mut in_outage = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            ticks_since_reload += 1;
            let outcome = if ticks_since_reload >= FORCED_RELOAD_EVERY {
                self.reload().await.map(|()| true)
            } else {
                tokio::time::timeout(interval.max(Duration::from_secs(2)), self.refresh())
                    .await
                    .unwrap_or_else(|_| {
                        Err(CatalogError::Invalid("catalog refresh timed out".into()))
                    })
            };
            match outcome {
                Ok(reloaded) => {
                    if reloaded {
                        ticks_since_reload = 0;
                    }
                    if in_outage {
                        warn!("catalog reachable again; key cache is fresh");
                        in_outage = false;
                    }
                }
                Err(error) => {
                    if !in_outage {
                        warn!(%error, "catalog unreachable; serving known keys from the last snapshot");
                        in_outage = true;
                    }
                }
            }
        }
    }
}

impl meridian_core::ErasureFilter for KeyCache {
    fn is_erased(&self, project_id: &str, user_id: &str, received_at_ms: i64) -> bool {
        self.snapshot
            .load()
            .projects
            .get(project_id)
            .filter(|project| !project.erased_users.is_empty())
            .and_then(|project| {
                let user_hash = self.catalog.key().user_hash(project_id, user_id);
                project.erased_users.get(&user_hash).copied()
            })
            .is_some_and(|deleted_at_ms| received_at_ms <= deleted_at_ms)
    }
}
