//! What every handler shares.

use std::collections::BTreeMap;
use std::sync::Arc;

use meridian_catalog::{Catalog, KeyCache, RegionalStores};
use meridian_core::RegionId;
use meridian_queue::{DeliveryLog, DeliveryStatus, QueueBackend, Sink};

use crate::auth::JwtAuthority;
use crate::config::Settings;
use crate::metrics::Metrics;

/// A running sink of a region, for metrics and readiness.
#[derive(Clone)]
pub struct SinkHandle {
    pub region: RegionId,
    pub sink: String,
    /// The partition of the region's queue this runner delivers (`None`: the region has one log).
    pub partition: Option<String>,
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

/// Shared by every handler; one `Arc`, so cloning it per request is one atomic increment.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppStateInner>,
}

impl AppState {
    pub fn new(inner: AppStateInner) -> AppState {
        AppState {
            inner: Arc::new(inner),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.inner
    }
}

pub struct AppStateInner {
    pub settings: Arc<Settings>,
    /// The global catalog: orgs, projects, keys (nothing about end users).
    pub catalog: Catalog,
    /// The served regions' stores: suppressions, deletions, replays and their audit entries.
    pub stores: RegionalStores,
    pub keys: Arc<KeyCache>,
    /// One queue per served region; no other region's queue exists on this node.
    pub queues: Arc<BTreeMap<RegionId, Arc<dyn QueueBackend>>>,
    pub metrics: Arc<Metrics>,
    pub jwt: Arc<JwtAuthority>,
    pub sinks: Arc<Vec<SinkHandle>>,
    /// Customer-hosted archive buckets (Local Data Storage): verification and cached clients.
    pub customer_stores: Arc<meridian_archive::customer::CustomerStores>,
    /// The stores of each served region, for the GDPR executor.
    pub region_services: Arc<BTreeMap<RegionId, RegionServices>>,
    /// This node's stable identity (deletion leases).
    pub node_id: String,
    /// Wakes the deletion executor when a deletion is requested on this node.
    pub deletion_requested: Arc<tokio::sync::Notify>,
    /// Wakes this node's replay executor when a replay is requested here.
    pub replay_requested: Arc<tokio::sync::Notify>,
    /// Wakes this node's retention janitor when a project's retention changes here.
    pub retention_changed: Arc<tokio::sync::Notify>,
    /// Wakes this node's migration executor when a migration is started or cut over here.
    pub migration_requested: Arc<tokio::sync::Notify>,
    /// The live event debugger's feeds (projects somebody watches on this node).
    pub live: Arc<crate::live::LiveHub>,
    pub rate_limiter: Arc<crate::rate_limit::RateLimiter>,
    /// Requests handled at once; beyond, 503.
    pub request_slots: Arc<tokio::sync::Semaphore>,
    /// Requests in flight per client address; beyond, 429.
    pub requests_per_address: Arc<crate::edge::AddressCounters>,
    /// Bytes of request bodies in memory at once, and each sender's share; beyond, 503.
    pub body_budgets: Arc<crate::edge::BodyBudgets>,
    /// Connections open, node-wide and per client address (the listeners' gate).
    pub connections: Arc<crate::listener::ConnectionGate>,
    /// Live event streams open at once; beyond, 503.
    pub live_streams: Arc<tokio::sync::Semaphore>,
}

/// What a served region's data lives in, built from that region's settings only.
#[derive(Clone)]
pub struct RegionServices {
    pub archive_store: Arc<dyn meridian_archive::ObjectStore>,
    pub archive_prefix: Option<String>,
    pub gzip_level: u32,
    pub clickhouse: Option<Arc<meridian_clickhouse::ClickHouseSink>>,
}
