//! The configuration file as written (merged over the embedded defaults): one struct per table,
//! unknown keys refused.

use std::collections::BTreeMap;
use std::path::PathBuf;

use meridian_core::{IngestLimits, Secret};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub default_region: String,
    pub node: NodeConfig,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub catalog: CatalogConfig,
    pub limits: IngestLimits,
    pub queue: QueueSettings,
    pub archive: ArchiveDefaults,
    pub customer_storage: CustomerStorageConfig,
    pub gdpr: GdprConfig,
    pub replay: ReplayConfig,
    pub retention: RetentionConfig,
    pub migration: MigrationConfig,
    pub console: ConsoleConfig,
    pub insights: InsightsConfig,
    pub rate_limits: RateLimitConfig,
    pub regions: BTreeMap<String, RegionConfig>,
}

/// `[rate_limits]`: messages per second per project (0: unlimited).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub default_messages_per_second: f64,
    pub default_burst: f64,
    #[serde(default)]
    pub projects: BTreeMap<String, ProjectRateLimit>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectRateLimit {
    pub messages_per_second: f64,
    pub burst: Option<f64>,
}

/// `[gdpr]`: the deletion executor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdprConfig {
    pub settle_ms: u64,
    pub poll_interval_ms: u64,
}

/// `[retention]`: the janitor that deletes data past projects' retention.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub janitor_interval_secs: u64,
}

/// `[console]`: the admin console and its live event debugger.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub live_subscribers_per_project: usize,
    pub live_events_per_second: u32,
    pub max_live_streams: usize,
}

/// `[insights]`: what one question of `/admin/projects/{id}/insights/*` may cost the warehouse.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InsightsConfig {
    pub max_rows_to_read: u64,
    pub max_execution_secs: u64,
}

/// `[migration]`: the executor of region migrations.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    pub max_messages_per_second: u64,
    pub tail_interval_ms: u64,
    pub drain_window_secs: u64,
}

/// `[regions.<id>.retention]`: the region's default retention, for projects that set none.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegionRetention {
    /// Received days older than this are deleted from the region's ClickHouse. Unset: kept.
    pub warehouse_days: Option<u32>,
    /// Received days older than this are deleted from the region's archive. Unset: kept.
    pub archive_days: Option<u32>,
}

/// `[replay]`: the replay executor.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub max_messages_per_second: u64,
    pub poll_interval_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The region this node belongs to. Set, the node is a member of that region's cluster;
    /// unset (the playground), its home region is `default_region` and it serves every region.
    pub region: Option<String>,
    pub serve_regions: Vec<String>,
    pub data_dir: PathBuf,
}

impl NodeConfig {
    /// The node's home region: `node.region`, else the default region.
    pub(crate) fn home_region<'a>(&'a self, default_region: &'a str) -> &'a str {
        self.region.as_deref().unwrap_or(default_region)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub plain_http: bool,
    pub public_url: Option<String>,
    pub shutdown_timeout_secs: u64,
    pub body_read_timeout_secs: u64,
    pub append_timeout_secs: u64,
    pub request_timeout_secs: u64,
    pub header_read_timeout_secs: u64,
    pub max_header_bytes: usize,
    pub max_concurrent_requests: usize,
    pub request_body_budget_bytes: usize,
    pub max_connection_age_secs: u64,
    pub listen_backlog: u32,
    pub max_connections: usize,
    pub max_connections_per_address: u32,
    pub max_requests_per_address: u32,
    pub max_concurrent_http2_streams: u32,
    pub anonymous_body_budget_bytes: usize,
    pub project_body_budget_bytes: usize,
    pub trusted_proxies: Vec<String>,
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`: the TLS listener.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub listen: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    #[serde(default = "default_tls_reload_check_secs")]
    pub reload_check_secs: u64,
}

fn default_tls_reload_check_secs() -> u64 {
    10
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt_secret: Option<Secret>,
    pub jwt_leeway_secs: u64,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    pub url: Option<Secret>,
    pub refresh_interval_ms: u64,
    /// Keys the audit chain and the user-id hashes (at least 32 bytes); never stored in the
    /// catalog. Unset with the embedded catalog: `<data_dir>/catalog_hash_key`, created once.
    #[serde(default)]
    pub hash_key: Option<Secret>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityMode {
    Fsync,
    Buffered,
}

/// `[queue] backend`: where a region's queue keeps acknowledged data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueBackendKind {
    /// An append-only log on this node's disk (a 200 means fsynced here).
    #[default]
    Local,
    /// The region's NATS JetStream cluster (a 200 means stored by a quorum of its replicas).
    Jetstream,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    #[serde(default)]
    pub backend: QueueBackendKind,
    pub durability: DurabilityMode,
    pub buffered_sync_interval_ms: u64,
    pub segment_max_bytes: u64,
    pub disk_budget_bytes: u64,
    /// Appends are refused (503) while the queue's filesystem has less free space than this.
    pub min_free_disk_bytes: u64,
    pub max_in_flight_bytes: usize,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// A sink's delivery attempt is cancelled (and retried) after this many seconds.
    pub max_sink_attempt_secs: u64,
    pub encryption: Option<QueueEncryptionConfig>,
}

/// `[queue.encryption]`: seal queue records at rest with AES-256-GCM.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueEncryptionConfig {
    /// `active = <id>` and a `[keys]` table of id = base64 32-byte keys. Re-read on SIGHUP.
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveDefaults {
    pub flush_max_bytes: usize,
    pub flush_interval_ms: u64,
    pub s3_flush_interval_ms: u64,
    pub gzip_level: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub display_name: Option<String>,
    #[serde(default = "default_status")]
    pub status: String,
    pub disk_budget_bytes: Option<u64>,
    /// The AWS region this Meridian region's buckets must be in; unset: the region's id.
    pub aws_region: Option<String>,
    /// Where the region's own nodes answer (named to a caller a node of another region refuses).
    pub public_url: Option<String>,
    pub archive: Option<ArchiveConfig>,
    pub clickhouse: Option<ClickHouseRegionConfig>,
    pub queue: Option<RegionQueueConfig>,
    pub retention: Option<RegionRetention>,
    /// The region's own store for data about its end users.
    pub catalog: Option<RegionCatalogConfig>,
}

/// `[regions.<id>.catalog]`: the region's store (suppressions, deletions, replays and their audit
/// entries), a PostgreSQL database in the region (or a SQLite file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionCatalogConfig {
    pub url: Secret,
}

/// `[regions.<id>.queue]`: the region's queue backend settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionQueueConfig {
    pub jetstream: Option<JetStreamRegionConfig>,
}

/// `[regions.<id>.queue.jetstream]`: the region's NATS JetStream cluster (used when
/// `queue.backend = "jetstream"`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamRegionConfig {
    /// This region's NATS servers (nats://host:4222); nothing else of the region goes elsewhere.
    pub urls: Vec<String>,
    /// Streams are named `<stream>-p<N>`; default `meridian-<region>`.
    pub stream: Option<String>,
    #[serde(default = "default_jetstream_replicas")]
    pub replicas: usize,
    #[serde(default = "default_jetstream_partitions")]
    pub partitions: u32,
    /// Bytes the region's streams may hold together (default: the region's disk budget). JetStream
    /// reserves it on `replicas` servers; at the limit ingest answers 503 while sinks catch up.
    pub max_bytes: Option<u64>,
    #[serde(default = "default_jetstream_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
    #[serde(default = "default_jetstream_lease_ms")]
    pub lease_ms: u64,
    #[serde(default = "default_jetstream_request_timeout_ms")]
    pub request_timeout_ms: u64,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A CA bundle to trust for the servers' TLS certificates.
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub require_tls: bool,
}

fn default_jetstream_replicas() -> usize {
    3
}

fn default_jetstream_partitions() -> u32 {
    1
}

fn default_jetstream_duplicate_window_secs() -> u64 {
    120
}

fn default_jetstream_lease_ms() -> u64 {
    10_000
}

fn default_jetstream_request_timeout_ms() -> u64 {
    5_000
}

/// `[regions.<id>.clickhouse]`: this region's warehouse. Absent: the region has no warehouse sink.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseRegionConfig {
    /// This region's replicas (http://host:8123); inserts fail over among these only.
    pub urls: Vec<String>,
    #[serde(default = "default_clickhouse_database")]
    pub database: String,
    pub user: Option<String>,
    pub password: Option<Secret>,
    #[serde(default = "default_clickhouse_batch_rows")]
    pub batch_max_rows: usize,
    #[serde(default = "default_clickhouse_batch_bytes")]
    pub batch_max_bytes: usize,
    #[serde(default = "default_clickhouse_flush_interval_ms")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_clickhouse_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Rows older than this many days are dropped by ClickHouse (TTL; current servers only).
    pub retention_days: Option<u32>,
    /// Bytes the region's dead-letter file may hold; beyond, batches with rejected rows stay queued.
    #[serde(default = "default_dead_letter_budget_bytes")]
    pub dead_letter_budget_bytes: u64,
}

fn default_dead_letter_budget_bytes() -> u64 {
    1024 * 1024 * 1024
}

fn default_clickhouse_database() -> String {
    "meridian".to_string()
}

fn default_clickhouse_batch_rows() -> usize {
    50_000
}

fn default_clickhouse_batch_bytes() -> usize {
    32 * 1024 * 1024
}

fn default_clickhouse_flush_interval_ms() -> u64 {
    1_000
}

fn default_clickhouse_timeout_secs() -> u64 {
    30
}

fn default_status() -> String {
    "available".to_string()
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    pub dir: Option<PathBuf>,
    pub s3: Option<S3ArchiveConfig>,
    pub flush_max_bytes: Option<usize>,
    pub flush_interval_ms: Option<u64>,
    pub gzip_level: Option<u32>,
    pub prefix: Option<String>,
}

/// `[regions.<id>.archive.s3]` (or the inline `s3 = { ... }`): this region's archive bucket.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3ArchiveConfig {
    pub bucket: String,
    /// An S3-compatible endpoint (e.g. http://127.0.0.1:8333); unset: AWS.
    pub endpoint: Option<String>,
    /// The AWS region of the bucket; unset: the region's id.
    pub region: Option<String>,
    #[serde(default)]
    pub force_path_style: bool,
    /// "AES256" (default) or "aws:kms" (with kms_key_id, or the bucket's default key).
    #[serde(default = "default_sse")]
    pub sse: String,
    pub kms_key_id: Option<String>,
    /// Check at start and periodically that the bucket lives in this region, and refuse to write
    /// otherwise. Set false only for stores that cannot report a location (SeaweedFS, MinIO).
    #[serde(default = "default_true")]
    pub verify_location: bool,
    /// Static credentials; unset: the standard AWS credential chain.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold_bytes: usize,
    #[serde(default = "default_s3_timeout_secs")]
    pub request_timeout_secs: u64,
}

fn default_sse() -> String {
    "AES256".to_string()
}

fn default_true() -> bool {
    true
}

fn default_multipart_threshold() -> usize {
    16 * 1024 * 1024
}

fn default_s3_timeout_secs() -> u64 {
    60
}

/// `[customer_storage]`: how Meridian reaches customers' own buckets (Local Data Storage).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerStorageConfig {
    pub endpoint: Option<String>,
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub request_timeout_secs: u64,
    pub location_check_interval_secs: u64,
    pub spool_retry_secs: u64,
    /// Bytes the customer spool of each region may hold.
    pub spool_budget_bytes: u64,
}
