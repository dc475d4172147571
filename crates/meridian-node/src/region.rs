//! One served region: its queue, its sinks (built from that region's settings only) with one
//! delivery runner per delivery log and sink, and its stores. [`Region::assemble`] builds
//! everything and starts nothing: the runners, the residency guards and the spool drainers are
//! handed to the node, which runs them under its supervisor.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meridian_archive::customer::CustomerStores;
use meridian_archive::s3::{GuardedS3Store, S3Store};
use meridian_archive::{
    ArchiveError, ArchiveSink, ArchiveSinkConfig, CustomerTarget, LocalDirStore, ObjectStore,
    Spool, StoreResolver,
};
use meridian_catalog::{Catalog, KeyCache};
use meridian_clickhouse::ClickHouseSink;
use meridian_core::{ErasureFilter, RegionId};
use meridian_queue::encryption::QueueEncryption;
use meridian_queue::jetstream::{JetStreamQueue, JetStreamSettings};
use meridian_queue::{
    DeliveryLog, DeliveryRunner, DeliveryStatus, QueueBackend, QueueConfig, RegionQueue, Sink,
};
use tracing::{info, warn};

use crate::config::{ArchiveTarget, Settings};
use crate::error::NodeError;
use crate::ledger::LedgerSink;

/// A running sink of a region, for metrics and readiness.
#[derive(Clone)]
pub struct SinkHandle {
    pub region: RegionId,
    pub sink: String,
    /// The partition of the region's queue this runner delivers (`None`: the region has one log).
    pub partition: Option<String>,
    /// The runner's name among the node's tasks.
    pub task: String,
    /// The log the runner delivers from (its durable end tells the runner's backlog).
    pub log: Arc<dyn DeliveryLog>,
    pub status: Arc<DeliveryStatus>,
    pub implementation: Arc<dyn Sink>,
}

impl SinkHandle {
    /// Metric labels of this runner: region, sink, and the partition when the region has several.
    pub fn labels(&self) -> Vec<(&'static str, &str)> {
        let mut labels = vec![
            ("region", self.region.as_str()),
            ("sink", self.sink.as_str()),
        ];
        if let Some(partition) = &self.partition {
            labels.push(("partition", partition.as_str()));
        }
        labels
    }

    /// Metric labels of the sink itself (shared by its runners of every partition).
    pub fn sink_labels(&self) -> [(&'static str, &str); 2] {
        [
            ("region", self.region.as_str()),
            ("sink", self.sink.as_str()),
        ]
    }

    /// True for one runner per sink: where the sink's own figures are reported.
    pub fn reports_sink_figures(&self) -> bool {
        self.partition
            .as_deref()
            .is_none_or(|partition| partition == "p0")
    }
}

/// What a served region's data lives in, built from that region's settings only.
#[derive(Clone)]
pub struct RegionServices {
    pub archive_store: Arc<dyn ObjectStore>,
    pub archive_prefix: Option<String>,
    pub gzip_level: u32,
    pub clickhouse: Option<Arc<ClickHouseSink>>,
}

/// A served region, assembled.
pub struct Region {
    pub id: RegionId,
    /// The region's queue on this node; no other region's queue exists here.
    pub queue: Arc<dyn QueueBackend>,
    pub sinks: Vec<SinkHandle>,
    pub services: RegionServices,
}

/// What a region runs, built and not started.
pub struct RegionTasks {
    pub region: RegionId,
    /// `(task name, runner)`: one per delivery log and sink.
    pub runners: Vec<(String, DeliveryRunner)>,
    /// S3 stores whose bucket location is checked periodically (residency guard).
    pub guards: Vec<Arc<GuardedS3Store>>,
    /// The archive sink whose spooled customer objects are retried periodically.
    pub spool_drainer: Option<Arc<ArchiveSink>>,
}

impl Region {
    /// Opens the region's queue and builds its sinks and their runners, from the region's
    /// settings only.
    pub async fn assemble(
        settings: &Settings,
        region: &RegionId,
        keys: &Arc<KeyCache>,
        customer_stores: &Arc<CustomerStores>,
        queue_encryption: Option<&Arc<QueueEncryption>>,
        node_id: &str,
        ledger_store: Catalog,
    ) -> Result<(Region, RegionTasks), NodeError> {
        let region_settings = settings_of(settings, region)?;
        // A replicated queue keeps nothing of its own on the node; so must the archive: with
        // it, objects for a failing customer bucket wait in the queue instead of a local spool.
        let node_local_spool = region_settings.jetstream.is_none();
        let mut built =
            build_sinks(settings, region, keys, customer_stores, node_local_spool).await?;
        // The delivery ledger reads the queue like a sink: what it counts is what was queued.
        built
            .sinks
            .push(Arc::new(LedgerSink::new(region.clone(), ledger_store)) as Arc<dyn Sink>);
        let sink_names: Vec<String> = built
            .sinks
            .iter()
            .map(|sink| sink.name().to_string())
            .collect();
        let queue = open_queue(settings, region, queue_encryption, node_id, &sink_names).await?;
        warn_about_cursors_without_a_sink(region, queue.as_ref(), &built.sinks);
        info!(region = %region, backend = queue.kind(), identity = %queue.identity(), sinks = ?sink_names, "region assembled");
        let mut sinks = Vec::new();
        let mut runners = Vec::new();
        for log in queue.delivery_logs() {
            for sink in &built.sinks {
                let runner =
                    DeliveryRunner::new(region.as_str(), Arc::clone(&log), Arc::clone(sink))
                        .with_retry_policy(settings.retry);
                let partition = log.partition();
                let task = match &partition {
                    Some(partition) => format!("delivery {region} {} {partition}", sink.name()),
                    None => format!("delivery {region} {}", sink.name()),
                };
                sinks.push(SinkHandle {
                    region: region.clone(),
                    sink: sink.name().to_string(),
                    partition,
                    task: task.clone(),
                    log: Arc::clone(&log),
                    status: runner.status(),
                    implementation: Arc::clone(sink),
                });
                runners.push((task, runner));
            }
        }
        Ok((
            Region {
                id: region.clone(),
                queue,
                sinks,
                services: built.services,
            },
            RegionTasks {
                region: region.clone(),
                runners,
                guards: built.guards,
                spool_drainer: built.spool_drainer,
            },
        ))
    }
}

/// Opens a served region's queue on the configured backend.
async fn open_queue(
    settings: &Settings,
    region: &RegionId,
    queue_encryption: Option<&Arc<QueueEncryption>>,
    node_id: &str,
    sink_names: &[String],
) -> Result<Arc<dyn QueueBackend>, NodeError> {
    let failure = |message: String| NodeError::Queue {
        region: region.to_string(),
        message,
    };
    let region_settings = settings_of(settings, region)?;
    if let Some(jetstream_settings) =
        jetstream_settings_for(settings, region, queue_encryption, node_id, sink_names)
    {
        return open_jetstream_queue(
            region,
            jetstream_settings,
            settings.limits.max_request_bytes,
        )
        .await
        .map_err(|error| failure(error.to_string()));
    }
    let config = QueueConfig {
        dir: region_settings.queue_dir.clone(),
        segment_max_bytes: settings.segment_max_bytes,
        disk_budget_bytes: region_settings.disk_budget_bytes,
        durability: settings.durability,
        max_in_flight_bytes: settings.max_in_flight_bytes,
        min_free_disk_bytes: settings.min_free_disk_bytes,
        encryption: queue_encryption.cloned(),
    };
    let queue = tokio::task::spawn_blocking(move || RegionQueue::open(config))
        .await
        .map_err(|error| failure(error.to_string()))?
        .map_err(|error| failure(error.to_string()))?;
    Ok(Arc::new(queue))
}

/// The JetStream settings of a served region whose queue is on its NATS cluster.
pub fn jetstream_settings_for(
    settings: &Settings,
    region: &RegionId,
    queue_encryption: Option<&Arc<QueueEncryption>>,
    node_id: &str,
    sink_names: &[String],
) -> Option<JetStreamSettings> {
    let region_settings = settings.regions.get(region)?;
    let jetstream = region_settings.jetstream.as_ref()?;
    let partitions = jetstream.partitions.max(1);
    Some(JetStreamSettings {
        region: region.to_string(),
        urls: jetstream.urls.clone(),
        stream: jetstream.stream.clone(),
        replicas: jetstream.replicas,
        partitions,
        max_bytes_per_partition: (jetstream
            .max_bytes
            .unwrap_or(region_settings.disk_budget_bytes)
            / u64::from(partitions))
        .min(i64::MAX as u64) as i64,
        duplicate_window: jetstream.duplicate_window,
        lease: jetstream.lease,
        request_timeout: jetstream.request_timeout,
        credentials_file: jetstream.credentials_file.clone(),
        token: jetstream
            .token
            .as_ref()
            .map(|token| token.expose().to_string()),
        user_and_password: jetstream
            .user_and_password
            .as_ref()
            .map(|(user, password)| (user.clone(), password.expose().to_string())),
        root_certificates: jetstream.tls_ca_file.clone(),
        require_tls: jetstream.require_tls,
        node_id: node_id.to_string(),
        sinks: sink_names.to_vec(),
        encryption: queue_encryption.cloned(),
    })
}

/// How long a starting node keeps trying to reach its region's JetStream cluster (a cluster
/// electing leaders after a server's loss answers again within seconds).
const JETSTREAM_STARTUP_PATIENCE: Duration = Duration::from_secs(90);

/// Opens the region's JetStream queue, retrying while the cluster does not answer.
async fn open_jetstream_queue(
    region: &RegionId,
    settings: JetStreamSettings,
    max_request_bytes: usize,
) -> Result<Arc<dyn QueueBackend>, meridian_queue::QueueError> {
    let deadline = tokio::time::Instant::now() + JETSTREAM_STARTUP_PATIENCE;
    let mut wait = Duration::from_millis(250);
    loop {
        match JetStreamQueue::open(settings.clone()).await {
            Ok(queue) => {
                if queue.max_record_bytes() < max_request_bytes {
                    warn!(region = %region, max_payload = queue.max_record_bytes(), max_request_bytes, "the region's NATS servers take messages only up to max_payload, below limits.max_request_bytes: a larger message gets 413 (raise max_payload in the servers' config)");
                }
                return Ok(Arc::new(queue));
            }
            Err(meridian_queue::QueueError::Unavailable(reason))
                if tokio::time::Instant::now() + wait < deadline =>
            {
                warn!(region = %region, %reason, retry_in_ms = wait.as_millis() as u64, "the region's JetStream cluster does not answer yet; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

/// A cursor file on disk keeps every record it has not passed (so a sink whose config section is
/// briefly missing loses nothing); one whose sink is gone for good holds the queue's disk until an
/// operator deletes it. Say so at start.
fn warn_about_cursors_without_a_sink(
    region: &RegionId,
    queue: &dyn QueueBackend,
    sinks: &[Arc<dyn Sink>],
) {
    let configured: BTreeSet<&str> = sinks.iter().map(|sink| sink.name()).collect();
    let names = queue.cursor_names();
    for name in names
        .iter()
        .filter(|name| !configured.contains(name.as_str()))
    {
        warn!(region = %region, sink = %name, queue = %queue.identity(), "a queue cursor has no configured sink: the records it has not passed are kept (delete its cursor file under cursors/ if the sink was removed for good)");
    }
}

/// Finds a project's customer bucket through the key cache's snapshot of the catalog.
struct CatalogStoreResolver {
    /// The AWS region the region's customer buckets must be in.
    aws_region: String,
    keys: Arc<KeyCache>,
    stores: Arc<CustomerStores>,
}

#[async_trait::async_trait]
impl StoreResolver for CatalogStoreResolver {
    async fn customer_store(
        &self,
        project_id: &str,
    ) -> Result<Option<CustomerTarget>, ArchiveError> {
        let Some(storage) = self.keys.customer_storage(project_id) else {
            return Ok(None);
        };
        // The store is built for this sink's region only; a bucket elsewhere is refused.
        let (store, prefix) = self
            .stores
            .store_for(&self.aws_region, project_id, &storage)
            .await?;
        Ok(Some(CustomerTarget {
            store,
            prefix: Some(prefix).filter(|prefix| !prefix.is_empty()),
        }))
    }
}

/// A region's stores as a tool needs them (archive store, ClickHouse), built exactly as a node
/// builds them, without starting anything.
pub async fn region_services_for_tools(
    settings: &Settings,
    region: &RegionId,
    keys: &Arc<KeyCache>,
    customer_stores: &Arc<CustomerStores>,
) -> Result<RegionServices, NodeError> {
    build_sinks(settings, region, keys, customer_stores, true)
        .await
        .map(|built| built.services)
}

/// A region's section of the settings (an error naming the region when it has none).
fn settings_of<'settings>(
    settings: &'settings Settings,
    region: &RegionId,
) -> Result<&'settings crate::config::RegionSettings, NodeError> {
    settings
        .regions
        .get(region)
        .ok_or_else(|| NodeError::Region {
            region: region.to_string(),
            message: "the region is not configured".to_string(),
        })
}

/// A region's sinks, the stores behind them, and the tasks they need.
struct BuiltSinks {
    sinks: Vec<Arc<dyn Sink>>,
    services: RegionServices,
    guards: Vec<Arc<GuardedS3Store>>,
    spool_drainer: Option<Arc<ArchiveSink>>,
}

/// Builds a region's sinks from that region's settings only.
async fn build_sinks(
    settings: &Settings,
    region: &RegionId,
    keys: &Arc<KeyCache>,
    customer_stores: &Arc<CustomerStores>,
    node_local_spool: bool,
) -> Result<BuiltSinks, NodeError> {
    let region_settings = settings_of(settings, region)?;
    let archive = &region_settings.archive;
    let mut guards = Vec::new();
    let store: Arc<dyn ObjectStore> = match &archive.target {
        ArchiveTarget::Dir(dir) => Arc::new(LocalDirStore::new(dir.clone())),
        ArchiveTarget::S3 {
            settings: s3,
            verify_location,
        } => {
            let guarded = Arc::new(GuardedS3Store::new(
                S3Store::connect(s3.clone()).await,
                &s3.region,
                *verify_location,
            ));
            guards.push(Arc::clone(&guarded));
            guarded
        }
    };
    let resolver = CatalogStoreResolver {
        aws_region: region_settings.aws_region.clone(),
        keys: Arc::clone(keys),
        stores: Arc::clone(customer_stores),
    };
    let archive_sink = ArchiveSink::new(
        region.as_str(),
        Arc::clone(&store),
        Arc::new(resolver),
        ArchiveSinkConfig {
            flush_max_bytes: archive.flush_max_bytes,
            flush_max_records: 1_000_000,
            flush_interval: archive.flush_interval,
            gzip_level: archive.gzip_level,
            prefix: archive.prefix.clone(),
        },
        Arc::clone(keys) as Arc<dyn ErasureFilter>,
    );
    let (archive_sink, spool_drainer) = if node_local_spool {
        let archive_sink = Arc::new(archive_sink.with_spool(Spool::new(
            settings.data_dir.join("spool").join(region.as_str()),
            settings.spool_budget_bytes,
        )));
        (Arc::clone(&archive_sink), Some(archive_sink))
    } else {
        (Arc::new(archive_sink), None)
    };
    let mut sinks: Vec<Arc<dyn Sink>> = vec![archive_sink];
    let clickhouse = region_settings.clickhouse.as_ref().map(|clickhouse| {
        // Built from this region's settings only: its replicas, its database.
        Arc::new(ClickHouseSink::new(
            region.as_str(),
            clickhouse.clone(),
            Arc::clone(keys) as Arc<dyn ErasureFilter>,
        ))
    });
    if let Some(clickhouse) = &clickhouse {
        sinks.push(Arc::clone(clickhouse) as Arc<dyn Sink>);
    }
    Ok(BuiltSinks {
        sinks,
        services: RegionServices {
            archive_store: store,
            archive_prefix: archive.prefix.clone(),
            gzip_level: archive.gzip_level,
            clickhouse,
        },
        guards,
        spool_drainer,
    })
}
