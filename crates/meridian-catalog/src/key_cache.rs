//! The ingress's view of the catalog: an immutable in-memory snapshot of write keys, project
//! regions, customer storage and suppressions, swapped atomically when the catalog changes.
//!
//! Lookups never touch the database. A refresher polls the catalog's version every few hundred
//! milliseconds and, on change, reloads only the projects changed since its snapshot (see
//! [`crate::snapshot_source`]), so a new key works and a revoked key stops within about a second on
//! every node, and an admin change costs a few rows, not every region's projects and suppressions.
//! A full reload runs at start, when many projects changed at once, and every ten minutes as a
//! safety net. When the catalog is unreachable the last snapshot keeps serving, so known keys keep
//! ingesting.

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
    /// Set once the project's region migration was completed: the project its data moved to.
    /// The source project then refuses new events.
    pub migrated_to: Option<Arc<str>>,
}

#[derive(Clone, Debug)]
struct KeyEntry {
    resolved: ResolvedKey,
    expires_at_ms: Option<i64>,
}

#[derive(Clone, Debug)]
struct ProjectEntry {
    region: RegionId,
    migrated_to: Option<Arc<str>>,
    storage: Option<Arc<CustomerStorage>>,
    /// Keyed hashes of the suppressed users (see [`crate::keyed_hash`]).
    suppressed_users: HashSet<String>,
    /// Keyed hashes of users with a GDPR deletion, and the time of their latest deletion request.
    erased_users: HashMap<String, i64>,
    /// The hashes of the project's keys in `Snapshot::keys` (to drop them when it is reloaded).
    key_hashes: Vec<[u8; 32]>,
}

#[derive(Clone, Debug, Default)]
struct Snapshot {
    version: i64,
    keys: HashMap<[u8; 32], KeyEntry>,
    projects: HashMap<Arc<str>, Arc<ProjectEntry>>,
}

pub struct KeyCache {
    catalog: Catalog,
    snapshot: ArcSwap<Snapshot>,
    full_reloads: std::sync::atomic::AtomicU64,
    incremental_refreshes: std::sync::atomic::AtomicU64,
}

/// A full reload runs this often even without changes, as a safety net.
const FORCED_RELOAD_EVERY: Duration = Duration::from_secs(600);
/// The longest a full reload may take before it is abandoned (the last snapshot keeps serving).
const FULL_RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// More changed projects than this since the snapshot: reload everything instead.
const INCREMENTAL_MAX_PROJECTS: usize = 5_000;

impl KeyCache {
    /// Loads the first snapshot; fails when the catalog cannot be read at all.
    pub async fn load(catalog: Catalog) -> Result<Arc<KeyCache>, CatalogError> {
        let cache = KeyCache {
            catalog,
            snapshot: ArcSwap::from_pointee(Snapshot {
                version: -1,
                ..Snapshot::default()
            }),
            full_reloads: std::sync::atomic::AtomicU64::new(0),
            incremental_refreshes: std::sync::atomic::AtomicU64::new(0),
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

    /// How many full reloads and incremental refreshes the cache made (for `/metrics`).
    pub fn reload_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.full_reloads.load(Ordering::Relaxed),
            self.incremental_refreshes.load(Ordering::Relaxed),
        )
    }

    /// Every project the snapshot holds: `(project id, region, customer storage)`.
    pub fn projects(&self) -> Vec<(String, RegionId, Option<Arc<CustomerStorage>>)> {
        self.snapshot
            .load()
            .projects
            .iter()
            .map(|(project_id, project)| {
                (
                    project_id.to_string(),
                    project.region.clone(),
                    project.storage.clone(),
                )
            })
            .collect()
    }

    /// How many projects the snapshot holds.
    pub fn project_count(&self) -> usize {
        self.snapshot.load().projects.len()
    }

    /// Brings the snapshot up to the catalog's version if it moved: only the projects changed
    /// since (a full reload when there are many). Returns whether anything was reloaded.
    pub async fn refresh(&self) -> Result<bool, CatalogError> {
        let current_version = self.catalog.version().await?;
        let snapshot = self.snapshot.load_full();
        if current_version == snapshot.version {
            return Ok(false);
        }
        if snapshot.version < 0 {
            self.reload().await?;
            return Ok(true);
        }
        match self
            .catalog
            .load_changed_since(snapshot.version, INCREMENTAL_MAX_PROJECTS)
            .await?
        {
            Some(changed) => {
                let changed_projects = changed.project_ids.len();
                let next = self.apply_rows(Some(&snapshot), &changed.project_ids, changed.rows);
                debug!(
                    version = next.version,
                    changed_projects, "key cache refreshed incrementally"
                );
                self.install(next);
                self.incremental_refreshes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => self.reload().await?,
        }
        Ok(true)
    }

    /// Reloads every row.
    async fn reload(&self) -> Result<(), CatalogError> {
        let rows = self.catalog.load_snapshot_rows().await?;
        let next = self.apply_rows(None, &[], rows);
        debug!(
            version = next.version,
            keys = next.keys.len(),
            projects = next.projects.len(),
            "key cache reloaded"
        );
        self.install(next);
        self.full_reloads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Swaps in `next` unless a concurrent refresh already installed a later version (the
    /// snapshot never goes back).
    fn install(&self, next: Snapshot) {
        let next = Arc::new(next);
        self.snapshot.rcu(|current| {
            if current.version > next.version {
                Arc::clone(current)
            } else {
                Arc::clone(&next)
            }
        });
    }

    /// A snapshot made of `base` (or nothing) without the `replaced` projects, plus `rows`.
    fn apply_rows(
        &self,
        base: Option<&Snapshot>,
        replaced: &[String],
        rows: crate::catalog::SnapshotRows,
    ) -> Snapshot {
        let mut next = base.cloned().unwrap_or_default();
        next.version = rows.version;
        for project_id in replaced {
            if let Some(project) = next.projects.remove(project_id.as_str()) {
                for hash in &project.key_hashes {
                    next.keys.remove(hash);
                }
            }
        }
        let mut projects: HashMap<Arc<str>, ProjectEntry> =
            HashMap::with_capacity(rows.projects.len());
        for (project_id, region, storage, migrated_to) in rows.projects {
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
                    migrated_to: migrated_to.map(|target| Arc::from(target.as_str())),
                    storage: storage.map(Arc::new),
                    suppressed_users: HashSet::new(),
                    erased_users: HashMap::new(),
                    key_hashes: Vec::new(),
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
        for (hash, project_id, expires_at_ms) in rows.keys {
            let Some((shared_project_id, project)) = projects.get_key_value(project_id.as_str())
            else {
                continue;
            };
            let resolved = ResolvedKey {
                project_id: Arc::clone(shared_project_id),
                region: project.region.clone(),
                migrated_to: project.migrated_to.clone(),
            };
            next.keys.insert(
                hash,
                KeyEntry {
                    resolved,
                    expires_at_ms,
                },
            );
            if let Some(project) = projects.get_mut(project_id.as_str()) {
                project.key_hashes.push(hash);
            }
        }
        for (project_id, project) in projects {
            next.projects.insert(project_id, Arc::new(project));
        }
        next
    }

    /// Polls the catalog every `interval` until `shutdown` flips to true. Failures keep the last
    /// snapshot and are logged once per outage.
    pub async fn run_refresher(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_full_reload = tokio::time::Instant::now();
        let mut in_outage = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let full_reload_due = last_full_reload.elapsed() >= FORCED_RELOAD_EVERY;
            let outcome = if full_reload_due {
                last_full_reload = tokio::time::Instant::now();
                tokio::time::timeout(FULL_RELOAD_TIMEOUT, self.reload())
                    .await
                    .unwrap_or_else(|_| {
                        Err(CatalogError::Invalid(format!(
                            "the full key cache reload timed out after {} s",
                            FULL_RELOAD_TIMEOUT.as_secs()
                        )))
                    })
                    .map(|()| true)
            } else {
                tokio::time::timeout(interval.max(Duration::from_secs(2)), self.refresh())
                    .await
                    .unwrap_or_else(|_| {
                        Err(CatalogError::Invalid("catalog refresh timed out".into()))
                    })
            };
            match outcome {
                Ok(_) => {
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
