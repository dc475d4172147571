//! The ingress's view of the catalog: immutable in-memory snapshots of write keys, project
//! regions, customer storage (from the global catalog) and of suppressions and deletions (from
//! the regional store of each region the node serves), swapped atomically when a store changes.
//!
//! Lookups never touch the database. A refresher polls each store's version every few hundred
//! milliseconds and, on change, reloads only the projects changed since its snapshot (see
//! [`crate::snapshot_source`]), so a new key works and a revoked key stops within about a second on
//! every node, and an admin change costs a few rows, not every region's projects and suppressions.
//! A full reload runs at start, when many projects changed at once, and every ten minutes as a
//! safety net. When the catalog is unreachable the last snapshot keeps serving, so known keys keep
//! ingesting.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use meridian_core::timestamp::now_unix_ms;
use meridian_core::{CustomerStorage, RegionId};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::catalog::{Catalog, SnapshotRows};
use crate::error::CatalogError;
use crate::ids::hash_write_key;
use crate::keyed_hash::CatalogKey;
use crate::snapshot_source::RowsOf;

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
    /// The hashes of the project's keys in `ControlSnapshot::keys` (to drop them when it is
    /// reloaded).
    key_hashes: Vec<[u8; 32]>,
}

/// What the global catalog says: keys, projects and revoked admin tokens.
#[derive(Clone, Debug, Default)]
struct ControlSnapshot {
    version: i64,
    keys: HashMap<[u8; 32], KeyEntry>,
    projects: HashMap<Arc<str>, Arc<ProjectEntry>>,
    revocations: Arc<crate::token_revocation::TokenRevocations>,
}

#[derive(Clone, Debug, Default)]
struct EndUserEntry {
    /// Keyed hashes of the suppressed users (see [`crate::keyed_hash`]).
    suppressed_users: HashSet<String>,
    /// Keyed hashes of users with a GDPR deletion, and the time of their latest deletion request.
    erased_users: HashMap<String, i64>,
}

/// What one regional store says about its projects' end users.
#[derive(Clone, Debug, Default)]
struct EndUserSnapshot {
    version: i64,
    projects: HashMap<Arc<str>, Arc<EndUserEntry>>,
}

/// A snapshot built from one kind of rows of one store.
trait StoreSnapshot: Clone + Default + Send + Sync + 'static {
    const ROWS_OF: RowsOf;
    fn version(&self) -> i64;
    /// `base` (or nothing) without the `replaced` projects, plus `rows`, at `rows.version`.
    fn apply(
        base: Option<&Self>,
        replaced: &[String],
        rows: SnapshotRows,
        key: &CatalogKey,
    ) -> Self;
}

impl StoreSnapshot for ControlSnapshot {
    const ROWS_OF: RowsOf = RowsOf::Control;

    fn version(&self) -> i64 {
        self.version
    }

    fn apply(
        base: Option<&Self>,
        replaced: &[String],
        rows: SnapshotRows,
        _key: &CatalogKey,
    ) -> Self {
        let mut next = base.cloned().unwrap_or_default();
        next.version = rows.version;
        // Every load carries every revocation.
        next.revocations = Arc::new(crate::token_revocation::TokenRevocations::from_rows(
            &rows.revocations,
        ));
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
                    key_hashes: Vec::new(),
                },
            );
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
}

impl StoreSnapshot for EndUserSnapshot {
    const ROWS_OF: RowsOf = RowsOf::EndUsers;

    fn version(&self) -> i64 {
        self.version
    }

    fn apply(
        base: Option<&Self>,
        replaced: &[String],
        rows: SnapshotRows,
        key: &CatalogKey,
    ) -> Self {
        let mut next = base.cloned().unwrap_or_default();
        next.version = rows.version;
        for project_id in replaced {
            next.projects.remove(project_id.as_str());
        }
        let mut projects: HashMap<Arc<str>, EndUserEntry> = HashMap::new();
        for (project_id, user_hash) in rows.suppressions {
            projects
                .entry(Arc::from(project_id.as_str()))
                .or_default()
                .suppressed_users
                .insert(user_hash);
        }
        for (project_id, user_ids, created_at_ms) in rows.deletions {
            let project = projects.entry(Arc::from(project_id.as_str())).or_default();
            for user_id in user_ids {
                // Deletions still under way hold the ids; finished ones their hashes.
                let user_hash = if crate::keyed_hash::is_user_hash(&user_id) {
                    user_id
                } else {
                    key.user_hash(&project_id, &user_id)
                };
                let latest = project
                    .erased_users
                    .entry(user_hash)
                    .or_insert(created_at_ms);
                *latest = (*latest).max(created_at_ms);
            }
        }
        for (project_id, project) in projects {
            next.projects.insert(project_id, Arc::new(project));
        }
        next
    }
}

/// One store, the snapshot built from it, and how often it was reloaded.
struct Source<S> {
    catalog: Catalog,
    snapshot: ArcSwap<S>,
    full_reloads: AtomicU64,
    incremental_refreshes: AtomicU64,
}

impl<S: StoreSnapshot> Source<S> {
    fn new(catalog: Catalog) -> Source<S> {
        // Empty, at a version below any a store has: the first refresh reloads.
        let unloaded = SnapshotRows {
            version: -1,
            ..SnapshotRows::default()
        };
        let unloaded = S::apply(None, &[], unloaded, &catalog.key);
        Source {
            catalog,
            snapshot: ArcSwap::from_pointee(unloaded),
            full_reloads: AtomicU64::new(0),
            incremental_refreshes: AtomicU64::new(0),
        }
    }

    /// Brings the snapshot up to the store's version if it moved: only the projects changed
    /// since (a full reload when there are many). Returns whether anything was reloaded.
    async fn refresh(&self) -> Result<bool, CatalogError> {
        let current_version = self.catalog.version().await?;
        let snapshot = self.snapshot.load_full();
        if current_version == snapshot.version() {
            return Ok(false);
        }
        if snapshot.version() < 0 {
            self.reload().await?;
            return Ok(true);
        }
        match self
            .catalog
            .load_changed_since(snapshot.version(), INCREMENTAL_MAX_PROJECTS, S::ROWS_OF)
            .await?
        {
            Some(changed) => {
                let changed_projects = changed.project_ids.len();
                let next = S::apply(
                    Some(&snapshot),
                    &changed.project_ids,
                    changed.rows,
                    &self.catalog.key,
                );
                debug!(
                    version = next.version(),
                    rows_of = ?S::ROWS_OF,
                    changed_projects,
                    "key cache refreshed incrementally"
                );
                self.install(next);
                self.incremental_refreshes.fetch_add(1, Ordering::Relaxed);
            }
            None => self.reload().await?,
        }
        Ok(true)
    }

    /// Reloads every row.
    async fn reload(&self) -> Result<(), CatalogError> {
        let rows = self.catalog.load_snapshot_rows(S::ROWS_OF).await?;
        let next = S::apply(None, &[], rows, &self.catalog.key);
        debug!(version = next.version(), rows_of = ?S::ROWS_OF, "key cache reloaded");
        self.install(next);
        self.full_reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Swaps in `next` unless a concurrent refresh already installed a later version (the
    /// snapshot never goes back).
    fn install(&self, next: S) {
        let next = Arc::new(next);
        self.snapshot.rcu(|current| {
            if current.version() > next.version() {
                Arc::clone(current)
            } else {
                Arc::clone(&next)
            }
        });
    }
}

pub struct KeyCache {
    control: Source<ControlSnapshot>,
    /// One per distinct regional store of the served regions.
    end_users: Vec<Source<EndUserSnapshot>>,
    key: CatalogKey,
    /// Asks the refresher for a refresh now (a key the snapshot did not know).
    refresh_wanted: tokio::sync::Notify,
    /// Refreshes the refresher has started, and (watched) completed, one after another.
    refreshes_started: AtomicU64,
    refreshes_completed: watch::Sender<u64>,
}

/// Keys the snapshot does not know make the refresher run at most this often.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// The longest a key's first request waits for that refresh.
const MISS_REFRESH_TIMEOUT: Duration = Duration::from_secs(2);

/// A full reload runs this often even without changes, as a safety net.
const FORCED_RELOAD_EVERY: Duration = Duration::from_secs(600);
/// The longest a full reload may take before it is abandoned (the last snapshot keeps serving).
const FULL_RELOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// More changed projects than this since the snapshot: reload everything instead.
const INCREMENTAL_MAX_PROJECTS: usize = 5_000;

impl KeyCache {
    /// Loads the first snapshot from one catalog that holds everything (a single store, as unit
    /// tests and tools use); fails when it cannot be read at all.
    pub async fn load(catalog: Catalog) -> Result<Arc<KeyCache>, CatalogError> {
        Self::load_from(catalog.clone(), vec![catalog]).await
    }

    /// Loads the first snapshots: keys and projects from `control`, suppressions and deletions
    /// from each of `regional_stores` (the stores of the served regions, each once).
    pub async fn load_from(
        control: Catalog,
        regional_stores: Vec<Catalog>,
    ) -> Result<Arc<KeyCache>, CatalogError> {
        let cache = KeyCache {
            key: control.key.clone(),
            control: Source::new(control),
            end_users: regional_stores.into_iter().map(Source::new).collect(),
            refresh_wanted: tokio::sync::Notify::new(),
            refreshes_started: AtomicU64::new(0),
            refreshes_completed: watch::channel(0).0,
        };
        cache.reload().await?;
        Ok(Arc::new(cache))
    }

    /// Resolves a write key, refusing keys past their grace period.
    pub fn resolve(&self, write_key: &str) -> Option<ResolvedKey> {
        let hash = hash_write_key(write_key);
        let snapshot = self.control.snapshot.load();
        let entry = snapshot.keys.get(&hash)?;
        if let Some(expires_at_ms) = entry.expires_at_ms
            && now_unix_ms() >= expires_at_ms
        {
            return None;
        }
        Some(entry.resolved.clone())
    }

    /// [`KeyCache::resolve`], and for a key the snapshot does not know, once more after the next
    /// refresh that starts after the request arrived — so a key made a moment ago (by another
    /// node, or the CLI) works from its first request. Misses share the refresher's runs: however
    /// many unknown keys arrive, it refreshes at most every [`MISS_REFRESH_INTERVAL`]. Without a
    /// running refresher a miss waits [`MISS_REFRESH_TIMEOUT`] and is answered from the snapshot.
    pub async fn resolve_or_refresh(&self, write_key: &str) -> Option<ResolvedKey> {
        if let Some(resolved) = self.resolve(write_key) {
            return Some(resolved);
        }
        let mut completed = self.refreshes_completed.subscribe();
        let started_before = self.refreshes_started.load(Ordering::SeqCst);
        self.refresh_wanted.notify_one();
        let _ = tokio::time::timeout(
            MISS_REFRESH_TIMEOUT,
            completed.wait_for(|done| *done > started_before),
        )
        .await;
        self.resolve(write_key)
    }

    /// The project's end-user entries in the regional stores. A project is in one region, so
    /// normally in one store; during a move of rows into a new regional store (at start) they
    /// may be in two for a moment, and every entry counts.
    fn end_users_of<'a>(
        &'a self,
        project_id: &'a str,
    ) -> impl Iterator<Item = Arc<EndUserEntry>> + 'a {
        self.end_users.iter().filter_map(move |source| {
            let snapshot = source.snapshot.load();
            // Most regional stores hold nothing: no hashing of the project id for those.
            if snapshot.projects.is_empty() {
                return None;
            }
            snapshot.projects.get(project_id).cloned()
        })
    }

    pub fn is_suppressed(&self, project_id: &str, user_id: &str) -> bool {
        let mut entries = self
            .end_users_of(project_id)
            .filter(|project| !project.suppressed_users.is_empty())
            .peekable();
        if entries.peek().is_none() {
            return false;
        }
        let user_hash = self.key.user_hash(project_id, user_id);
        entries.any(|project| project.suppressed_users.contains(&user_hash))
    }

    /// Whether the project has any suppressed user (lets the hot path skip per-message lookups).
    pub fn has_suppressions(&self, project_id: &str) -> bool {
        self.end_users_of(project_id)
            .any(|project| !project.suppressed_users.is_empty())
    }

    pub fn project_region(&self, project_id: &str) -> Option<RegionId> {
        self.control
            .snapshot
            .load()
            .projects
            .get(project_id)
            .map(|project| project.region.clone())
    }

    pub fn customer_storage(&self, project_id: &str) -> Option<Arc<CustomerStorage>> {
        self.control
            .snapshot
            .load()
            .projects
            .get(project_id)
            .and_then(|project| project.storage.clone())
    }

    /// Whether an admin token is revoked (checked on every admin request, and by open streams).
    pub fn is_token_revoked(&self, token: crate::token_revocation::TokenIdentity<'_>) -> bool {
        self.control.snapshot.load().revocations.revokes(token)
    }

    /// Refreshes the refresher has run (periodic, and for unknown keys).
    pub fn refresh_runs(&self) -> u64 {
        self.refreshes_started.load(Ordering::Relaxed)
    }

    /// The global catalog's version the snapshot is at.
    pub fn version(&self) -> i64 {
        self.control.snapshot.load().version
    }

    /// How many full reloads and incremental refreshes the cache made, over every store (for
    /// `/metrics`).
    pub fn reload_counts(&self) -> (u64, u64) {
        let mut counts = (
            self.control.full_reloads.load(Ordering::Relaxed),
            self.control.incremental_refreshes.load(Ordering::Relaxed),
        );
        for source in &self.end_users {
            counts.0 += source.full_reloads.load(Ordering::Relaxed);
            counts.1 += source.incremental_refreshes.load(Ordering::Relaxed);
        }
        counts
    }

    /// Every project the snapshot holds: `(project id, region, customer storage)`.
    pub fn projects(&self) -> Vec<(String, RegionId, Option<Arc<CustomerStorage>>)> {
        self.control
            .snapshot
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
        self.control.snapshot.load().projects.len()
    }

    /// Brings every snapshot up to its store's version. Returns whether anything was reloaded.
    /// Every store is tried even when one fails; the first failure is returned.
    pub async fn refresh(&self) -> Result<bool, CatalogError> {
        let mut reloaded = false;
        let mut first_failure = None;
        let mut note = |outcome: Result<bool, CatalogError>| match outcome {
            Ok(changed) => reloaded |= changed,
            Err(error) => {
                first_failure.get_or_insert(error);
            }
        };
        note(self.control.refresh().await);
        for source in &self.end_users {
            note(source.refresh().await);
        }
        match first_failure {
            Some(error) => Err(error),
            None => Ok(reloaded),
        }
    }

    /// Reloads every row of every store.
    async fn reload(&self) -> Result<(), CatalogError> {
        self.control.reload().await?;
        for source in &self.end_users {
            source.reload().await?;
        }
        Ok(())
    }

    /// Polls the stores every `interval` until `shutdown` flips to true. Failures keep the last
    /// snapshots and are logged once per outage.
    pub async fn run_refresher(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_full_reload = tokio::time::Instant::now();
        let mut last_started = tokio::time::Instant::now();
        let mut in_outage = false;
        loop {
            let wanted = tokio::select! {
                _ = tokio::time::sleep(interval) => false,
                _ = self.refresh_wanted.notified() => true,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if wanted {
                // An unknown key: refresh now, but no more often than the misses' interval.
                tokio::select! {
                    _ = tokio::time::sleep_until(last_started + MISS_REFRESH_INTERVAL) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            last_started = tokio::time::Instant::now();
            self.refreshes_started.fetch_add(1, Ordering::SeqCst);
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
            self.refreshes_completed.send_modify(|done| *done += 1);
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
        let mut entries = self
            .end_users_of(project_id)
            .filter(|project| !project.erased_users.is_empty())
            .peekable();
        if entries.peek().is_none() {
            return false;
        }
        let user_hash = self.key.user_hash(project_id, user_id);
        entries
            .filter_map(|project| project.erased_users.get(&user_hash).copied())
            .any(|deleted_at_ms| received_at_ms <= deleted_at_ms)
    }
}
