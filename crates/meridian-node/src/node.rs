//! A node: its catalog and regional stores, the key cache over them, one [`Region`] per served
//! region, and the [`Supervisor`] that owns every task it runs.
//!
//! Building and starting are separate steps, as in Vector's topology builder: [`Node::build`]
//! opens and assembles everything and starts nothing; [`Node::start`] hands every long-lived task
//! to the supervisor; [`Node::shutdown`] stops them (the delivery runners first, which flush what
//! is durable), closes the queues and the catalogs, all by a deadline.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meridian_archive::ArchiveSink;
use meridian_archive::customer::CustomerStores;
use meridian_archive::s3::GuardedS3Store;
use meridian_catalog::{Catalog, KeyCache, RegionalStores};
use meridian_core::RegionId;
use meridian_queue::encryption::QueueEncryption;
use meridian_queue::{DeliveryRunner, QueueBackend};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::error::NodeError;
use crate::metrics::Metrics;
use crate::region::{Region, RegionServices, RegionTasks, SinkHandle};
use crate::tasks::{Phase, RestartPolicy, Supervisor, TaskContext, TaskFailure};

/// Wakes a node's job loops when something is asked of them on this node.
#[derive(Default)]
pub struct Wakers {
    pub deletion_requested: Notify,
    pub replay_requested: Notify,
    pub retention_changed: Notify,
    pub migration_requested: Notify,
}

pub struct Node {
    pub settings: Arc<Settings>,
    /// The global catalog: orgs, projects, keys (nothing about end users).
    pub catalog: Catalog,
    /// The served regions' stores: suppressions, deletions, replays and their audit entries.
    pub stores: RegionalStores,
    pub keys: Arc<KeyCache>,
    /// One per served region; no other region's queue or sink exists on this node.
    pub regions: BTreeMap<RegionId, Region>,
    /// Customer-hosted archive buckets (Local Data Storage): verification and cached clients.
    pub customer_stores: Arc<CustomerStores>,
    /// This node's stable identity (job leases, queue cursors on JetStream).
    pub node_id: String,
    pub metrics: Arc<Metrics>,
    pub wakers: Wakers,
    pub supervisor: Supervisor,
    queue_encryption: Option<Arc<QueueEncryption>>,
}

/// What a built node runs once started.
pub struct NodeTasks {
    regions: Vec<RegionTasks>,
}

impl Node {
    /// Opens the catalog, the served regions' stores and the key cache, and assembles every
    /// served region (queue, sinks, runners). Starts nothing.
    pub async fn build(settings: Settings) -> Result<(Node, NodeTasks), NodeError> {
        let data_dir_failure = |message: String| NodeError::DataDir {
            path: settings.data_dir.display().to_string(),
            message,
        };
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|error| data_dir_failure(error.to_string()))?;
        // Only the service's user may enter the data directory (files an earlier version made
        // readable to others included).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&settings.data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|error| {
                    data_dir_failure(format!("cannot make it private (0700): {error}"))
                })?;
        }
        let (catalog, stores, keys) = open_catalog(&settings).await?;
        let node_id = load_or_create_node_id(&settings.data_dir)
            .map_err(|error| data_dir_failure(format!("node id: {error}")))?;
        info!(node_id = %node_id, home_region = %settings.home_region, served_regions = ?settings.served_regions.iter().map(RegionId::as_str).collect::<Vec<_>>(), "node starting");
        let queue_encryption = match &settings.queue_key_file {
            Some(path) => Some(Arc::new(load_queue_keys(path)?)),
            None => None,
        };
        let customer_stores = Arc::new(CustomerStores::new(settings.customer_access.clone()));
        let metrics = Arc::new(Metrics::new());
        let mut regions = BTreeMap::new();
        let mut region_tasks = Vec::new();
        for region_id in &settings.served_regions {
            let (region, tasks) = Region::assemble(
                &settings,
                region_id,
                &keys,
                &customer_stores,
                queue_encryption.as_ref(),
                &node_id,
                stores
                    .of_region(region_id.as_str())
                    .map_err(|error| NodeError::Region {
                        region: region_id.to_string(),
                        message: format!("its store: {error}"),
                    })?
                    .clone(),
            )
            .await?;
            metrics.initialize_region(region_id.as_str());
            regions.insert(region_id.clone(), region);
            region_tasks.push(tasks);
        }
        let supervisor = Supervisor::new(Arc::clone(&metrics));
        Ok((
            Node {
                settings: Arc::new(settings),
                catalog,
                stores,
                keys,
                regions,
                customer_stores,
                node_id,
                metrics,
                wakers: Wakers::default(),
                supervisor,
                queue_encryption,
            },
            NodeTasks {
                regions: region_tasks,
            },
        ))
    }

    /// Hands every task of the node to its supervisor: the delivery runners, each queue's
    /// maintenance, the residency guards, the spool drainers, the key cache's refresher, the queue
    /// key reload, and the job loops.
    pub fn start(self: &Arc<Self>, tasks: NodeTasks) {
        let settings = &self.settings;
        let mut guards: Vec<Arc<GuardedS3Store>> = Vec::new();
        for region_tasks in tasks.regions {
            for (name, runner) in region_tasks.runners {
                self.run_delivery(name, runner);
            }
            guards.extend(region_tasks.guards);
            if let Some(sink) = region_tasks.spool_drainer {
                self.run_spool_drainer(&region_tasks.region, sink);
            }
        }
        for region in self.regions.values() {
            if let Some(maintenance) = region.queue.maintenance() {
                let maintenance = Arc::new(maintenance);
                self.supervisor.spawn(
                    format!("queue maintenance {}", region.id),
                    Phase::Background,
                    RestartPolicy::default(),
                    move |context: TaskContext| {
                        let run = maintenance(context.stop_signal());
                        async move {
                            run.await;
                            Ok(())
                        }
                    },
                );
            }
        }
        if !guards.is_empty() {
            let interval = settings.location_check_interval;
            let guards = Arc::new(guards);
            self.supervisor.spawn(
                "residency guards",
                Phase::Background,
                RestartPolicy::default(),
                move |mut context| {
                    let guards = Arc::clone(&guards);
                    async move {
                        loop {
                            for guard in guards.iter() {
                                guard.check().await;
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(interval) => {}
                                _ = context.stopped() => return Ok(()),
                            }
                        }
                    }
                },
            );
        }
        let keys = Arc::clone(&self.keys);
        let refresh_interval = settings.catalog_refresh_interval;
        self.supervisor.spawn(
            "key cache refresher",
            Phase::Background,
            RestartPolicy::default(),
            move |context| {
                let keys = Arc::clone(&keys);
                async move {
                    keys.run_refresher(refresh_interval, context.stop_signal())
                        .await;
                    Ok(())
                }
            },
        );
        if let (Some(path), Some(encryption)) = (&settings.queue_key_file, &self.queue_encryption) {
            let path = path.clone();
            let encryption = Arc::clone(encryption);
            self.supervisor.spawn(
                "queue key reload",
                Phase::Background,
                RestartPolicy::default(),
                move |context| {
                    reload_queue_keys_on_hangup(path.clone(), Arc::clone(&encryption), context)
                },
            );
        }
        let node = Arc::clone(self);
        self.supervisor.spawn(
            "ledger checks",
            Phase::Background,
            RestartPolicy::default(),
            move |context| crate::ledger::run_ledger_checks(Arc::clone(&node), context),
        );
        crate::jobs::start_all(self);
    }

    /// A delivery runner, its attempts restarted after the sink's retry back-off.
    fn run_delivery(&self, name: String, runner: DeliveryRunner) {
        let retry = runner.retry_policy();
        let runner = Arc::new(runner);
        self.supervisor.spawn(
            name,
            Phase::Deliver,
            RestartPolicy {
                first_pause: retry.base,
                max_pause: retry.cap,
                healthy_after: Duration::from_secs(30),
            },
            move |context| {
                let runner = Arc::clone(&runner);
                async move {
                    runner
                        .attempt(context.stop_signal())
                        .await
                        .map_err(TaskFailure::new)
                }
            },
        );
    }

    /// Retries uploading a region's spooled customer objects every `spool_retry`.
    fn run_spool_drainer(&self, region: &RegionId, sink: Arc<ArchiveSink>) {
        let interval = self.settings.spool_retry;
        self.supervisor.spawn(
            format!("spool drainer {region}"),
            Phase::Background,
            RestartPolicy::default(),
            move |mut context| {
                let sink = Arc::clone(&sink);
                async move {
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep(interval) => {}
                            _ = context.stopped() => return Ok(()),
                        }
                        sink.drain_spool().await;
                    }
                }
            },
        );
    }

    /// Stops every task by `deadline` — the delivery runners first (they flush what is durable;
    /// what they could not stays queued for the next start) — then closes the queues and the
    /// catalogs.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        let late = self.supervisor.stop_phase(Phase::Deliver, deadline).await;
        if !late.is_empty() {
            warn!(runners = ?late, "sinks did not finish flushing before the shutdown deadline; their backlog stays queued for the next start");
        }
        // The job loops get a moment of their own even when the flush took the whole deadline.
        let background_deadline =
            deadline.max(tokio::time::Instant::now() + Duration::from_secs(5));
        let late = self
            .supervisor
            .stop_phase(Phase::Background, background_deadline)
            .await;
        if !late.is_empty() {
            warn!(tasks = ?late, "tasks still running at the shutdown deadline were cut off");
        }
        let queues: Vec<Arc<dyn QueueBackend>> = self
            .regions
            .values()
            .map(|region| Arc::clone(&region.queue))
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for queue in queues {
                queue.close();
            }
        })
        .await;
        for store in self.stores.stores() {
            if !store.is_global {
                store.catalog.close().await;
            }
        }
        self.catalog.close().await;
    }

    /// The queue of a served region.
    pub fn queue(&self, region: &RegionId) -> Option<&Arc<dyn QueueBackend>> {
        self.regions.get(region).map(|region| &region.queue)
    }

    /// Every served region's queue.
    pub fn queues(&self) -> impl Iterator<Item = (&RegionId, &Arc<dyn QueueBackend>)> {
        self.regions.iter().map(|(id, region)| (id, &region.queue))
    }

    /// The stores of a served region.
    pub fn services(&self, region: &RegionId) -> Option<&RegionServices> {
        self.regions.get(region).map(|region| &region.services)
    }

    /// Every served region's delivery runners.
    pub fn sinks(&self) -> impl Iterator<Item = &SinkHandle> {
        self.regions.values().flat_map(|region| region.sinks.iter())
    }

    /// Whether this node serves `region` (has its queue).
    pub fn serves(&self, region: &RegionId) -> bool {
        self.regions.contains_key(region)
    }

    /// The regions this node serves, as the catalog names them (job leases are claimed for these
    /// only).
    pub fn served_region_names(&self) -> Vec<String> {
        self.regions.keys().map(RegionId::to_string).collect()
    }

    /// The queue's encryption, when records are encrypted at rest.
    pub fn queue_encryption(&self) -> Option<&Arc<QueueEncryption>> {
        self.queue_encryption.as_ref()
    }
}

/// The global catalog, the regional stores of the served regions, and the key cache over both.
async fn open_catalog(
    settings: &Settings,
) -> Result<(Catalog, RegionalStores, Arc<KeyCache>), NodeError> {
    let failure = |message: String| NodeError::Catalog {
        url: settings.catalog_url_for_display(),
        message,
    };
    let catalog = tokio::time::timeout(
        Duration::from_secs(30),
        crate::catalog_key::connect_catalog(settings),
    )
    .await
    .map_err(|_| failure("timed out after 30 s".into()))??;
    let stores = crate::regional_stores::open_regional_stores(settings, &catalog).await?;
    let keys = KeyCache::load_from(catalog.clone(), stores.catalogs())
        .await
        .map_err(|error| failure(error.to_string()))?;
    Ok((catalog, stores, keys))
}

/// The queue's encryption keys as configured (`None`: records are not encrypted).
pub fn load_queue_encryption(settings: &Settings) -> Result<Option<QueueEncryption>, NodeError> {
    settings
        .queue_key_file
        .as_deref()
        .map(load_queue_keys)
        .transpose()
}

fn load_queue_keys(path: &std::path::Path) -> Result<QueueEncryption, NodeError> {
    let failure = |message: String| NodeError::DataDir {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| failure(format!("queue key file: {error}")))?;
    let keyring = meridian_queue::encryption::parse_key_file(&text)
        .map_err(|error| failure(error.to_string()))?;
    info!(key_file = %path.display(), active_key = keyring.active_key_id(), "queue records are encrypted at rest");
    Ok(QueueEncryption::new(keyring))
}

/// Re-reads the queue key file on SIGHUP (key rotation without downtime).
async fn reload_queue_keys_on_hangup(
    path: std::path::PathBuf,
    encryption: Arc<QueueEncryption>,
    mut context: TaskContext,
) -> Result<(), TaskFailure> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup()).map_err(TaskFailure::new)?;
    loop {
        tokio::select! {
            _ = hangups.recv() => {
                match std::fs::read_to_string(&path).map_err(|error| error.to_string()).and_then(|text| {
                    meridian_queue::encryption::parse_key_file(&text).map_err(|error| error.to_string())
                }) {
                    Ok(keyring) => {
                        info!(active_key = keyring.active_key_id(), "queue key file reloaded");
                        encryption.replace_keyring(keyring);
                    }
                    Err(error) => error!(%error, "queue key file reload failed; keeping the current keys"),
                }
            }
            _ = context.stopped() => return Ok(()),
        }
    }
}

/// This node's identity, kept in `<data_dir>/node_id` so that a restarted node resumes the work
/// it had leased (GDPR deletions) without waiting for its leases to lapse.
fn load_or_create_node_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &node_id)?;
    Ok(node_id)
}
