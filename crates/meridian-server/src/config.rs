//! The one typed configuration: embedded defaults (`config/meridian.toml`), a TOML file merged
//! over them, environment overrides, then validation into [`Settings`] with clear messages.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use meridian_core::{IngestLimits, RegionId, Secret, redact_url};
use meridian_queue::Durability;
use serde::Deserialize;

/// The embedded defaults, also the documentation of every key.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../../../config/meridian.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config is not valid TOML or has unknown/mistyped keys: {0}")]
    Parse(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

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
    fn home_region<'a>(&'a self, default_region: &'a str) -> &'a str {
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

/// A region's resolved JetStream settings (node-specific parts are added at start).
#[derive(Clone, Debug)]
pub struct JetStreamRegionSettings {
    pub urls: Vec<String>,
    pub stream: String,
    pub replicas: usize,
    pub partitions: u32,
    pub max_bytes: Option<u64>,
    pub duplicate_window: Duration,
    pub lease: Duration,
    pub request_timeout: Duration,
    pub credentials_file: Option<PathBuf>,
    pub token: Option<Secret>,
    pub user_and_password: Option<(String, Secret)>,
    pub tls_ca_file: Option<PathBuf>,
    pub require_tls: bool,
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

/// Validated, resolved settings: what the rest of the program reads.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Not problems, but choices an operator should know about (`--check-config` prints them,
    /// `serve` logs them).
    pub warnings: Vec<String>,
    pub home_region: RegionId,
    pub default_region: RegionId,
    pub served_regions: Vec<RegionId>,
    pub queue_backend: QueueBackendKind,
    pub regions: BTreeMap<RegionId, RegionSettings>,
    pub data_dir: PathBuf,
    /// The plain-HTTP listener (`None` when `server.plain_http = false`).
    pub listen: Option<SocketAddr>,
    pub tls: Option<TlsSettings>,
    pub public_url: Option<String>,
    pub request_timeout: Duration,
    pub connection_limits: crate::listener::ConnectionLimits,
    pub max_concurrent_requests: usize,
    /// Requests (HTTP/2 streams included) one client address may have in flight.
    pub max_requests_per_address: u32,
    /// Peers whose `X-Forwarded-For` names the client (load balancers).
    pub trusted_proxies: Arc<[crate::edge::Network]>,
    /// Bytes of request bodies in memory at once, over all requests.
    pub request_body_budget_bytes: usize,
    /// Of those, what requests without a key in their headers may hold together.
    pub anonymous_body_budget_bytes: usize,
    /// Of those, what one project's requests may hold.
    pub project_body_budget_bytes: usize,
    pub shutdown_timeout: Duration,
    pub body_read_timeout: Duration,
    pub append_timeout: Duration,
    /// `None`: use (or create) `<data_dir>/jwt_secret`.
    pub jwt_secret: Option<Secret>,
    pub jwt_leeway_secs: u64,
    /// Tokens must carry this `iss` when set.
    pub jwt_issuer: Option<String>,
    /// Tokens must carry this `aud` when set.
    pub jwt_audience: Option<String>,
    /// May carry a password: print it with [`Settings::catalog_url_for_display`].
    pub catalog_url: Secret,
    /// `None`: use (or create) `<data_dir>/catalog_hash_key`.
    pub catalog_hash_key: Option<Secret>,
    pub catalog_refresh_interval: Duration,
    pub limits: IngestLimits,
    pub durability: Durability,
    pub segment_max_bytes: u64,
    pub max_in_flight_bytes: usize,
    /// Free space every queue's filesystem keeps for sinks, spool, dead letters and cursors.
    pub min_free_disk_bytes: u64,
    pub retry: meridian_queue::RetryPolicy,
    pub customer_access: meridian_archive::customer::CustomerAccessSettings,
    pub location_check_interval: Duration,
    /// How often objects spooled for failing customer buckets are retried.
    pub spool_retry: Duration,
    /// Bytes the customer spool of each region may hold.
    pub spool_budget_bytes: u64,
    pub gdpr_settle: Duration,
    pub gdpr_poll_interval: Duration,
    /// Messages per second this node's replays insert at most.
    pub replay_max_messages_per_second: u64,
    /// Live debugger subscribers one project may have on a node at once (429 beyond).
    pub live_subscribers_per_project: usize,
    /// Events a project's live feed carries per second at most (the rest are counted as skipped).
    pub live_events_per_second: u32,
    /// Live event streams open on the node at once (503 beyond).
    pub max_live_streams: usize,
    /// Messages per second one node's migration copies write at most.
    pub migration_max_messages_per_second: u64,
    /// How often a migration's copy looks for new source objects (dual_write, and after cutover).
    pub migration_tail_interval: Duration,
    /// How long after the cutover the copy still follows the source.
    pub migration_drain_window: Duration,
    /// How often each served region's retention janitor runs (one node of a region per run).
    pub retention_janitor_interval: Duration,
    /// The queue key file, when records are encrypted at rest.
    pub queue_key_file: Option<PathBuf>,
    pub default_rate_limit: Option<crate::rate_limit::Limit>,
    pub project_rate_limits: std::collections::HashMap<String, crate::rate_limit::Limit>,
}

#[derive(Clone, Debug)]
pub struct RegionSettings {
    pub id: RegionId,
    pub display_name: String,
    pub available: bool,
    pub disk_budget_bytes: u64,
    /// The AWS region the region's buckets (archive and customer buckets) must report.
    pub aws_region: String,
    pub queue_dir: PathBuf,
    /// Set when the region's queue is on its JetStream cluster (`queue.backend = "jetstream"`).
    pub jetstream: Option<JetStreamRegionSettings>,
    pub archive: ArchiveSettings,
    pub clickhouse: Option<meridian_clickhouse::ClickHouseConfig>,
    /// What projects of the region that set no retention of their own keep.
    pub retention_default: RegionRetention,
    /// The region's store for data about its end users (may carry a password). `None`: the
    /// global catalog keeps it (a PostgreSQL catalog without `[regions.<id>.catalog]`); on the
    /// embedded SQLite catalog each region gets a file beside it.
    pub store_url: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct ArchiveSettings {
    pub target: ArchiveTarget,
    pub flush_max_bytes: usize,
    pub flush_interval: Duration,
    pub gzip_level: u32,
    pub prefix: Option<String>,
}

#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub reload_check: Duration,
}

/// Where a region's archive goes.
#[derive(Clone, Debug)]
pub enum ArchiveTarget {
    Dir(PathBuf),
    S3 {
        settings: meridian_archive::s3::S3Settings,
        verify_location: bool,
    },
}

fn validate_s3(
    region: &RegionId,
    aws_region: &str,
    config: &S3ArchiveConfig,
    problems: &mut Vec<String>,
) -> ArchiveTarget {
    let key = format!("regions.{region}.archive.s3");
    // The guard compares the bucket's location with the Meridian region this section configures,
    // never with what the line itself claims: a bucket line copied into the wrong region's section
    // is refused here, before anything is written.
    if let Some(declared) = &config.region
        && declared != aws_region
    {
        problems.push(format!(
            "{key}: the bucket is declared in `{declared}`, but this is the archive of Meridian region {region}, whose buckets must be in `{aws_region}` (regions.{region}.aws_region): a region's archive stays in that region"
        ));
    }
    if config.bucket.trim().is_empty() {
        problems.push(format!(
            "{key}.bucket must name the region's archive bucket"
        ));
    }
    let encryption = match config.sse.as_str() {
        "AES256" => meridian_archive::s3::Encryption::Aes256,
        "aws:kms" => meridian_archive::s3::Encryption::Kms {
            key_id: config.kms_key_id.clone(),
        },
        other => {
            problems.push(format!(
                "{key}.sse must be \"AES256\" or \"aws:kms\", not \"{other}\""
            ));
            meridian_archive::s3::Encryption::Aes256
        }
    };
    if config.access_key_id.is_some() != config.secret_access_key.is_some() {
        problems.push(format!(
            "{key}: set both access_key_id and secret_access_key, or neither (AWS credential chain)"
        ));
    }
    if let Some(endpoint) = &config.endpoint
        && !endpoint.starts_with("http://")
        && !endpoint.starts_with("https://")
    {
        problems.push(format!(
            "{key}.endpoint `{endpoint}` must start with http:// or https://"
        ));
    }
    if config.multipart_threshold_bytes < 5 * 1024 * 1024 {
        problems.push(format!(
            "{key}.multipart_threshold_bytes must be at least 5 MiB (S3's smallest part)"
        ));
    }
    let mut settings = meridian_archive::s3::S3Settings::new(&config.bucket, aws_region);
    settings.endpoint = config.endpoint.clone();
    settings.force_path_style = config.force_path_style;
    settings.encryption = encryption;
    settings.access_key_id = config.access_key_id.clone();
    settings.secret_access_key = config.secret_access_key.clone();
    settings.request_timeout = Duration::from_secs(config.request_timeout_secs.max(1));
    settings.multipart_threshold = config.multipart_threshold_bytes;
    ArchiveTarget::S3 {
        settings,
        verify_location: config.verify_location,
    }
}

fn validate_jetstream(
    id: &RegionId,
    jetstream: &JetStreamRegionConfig,
    problems: &mut Vec<String>,
) -> JetStreamRegionSettings {
    if jetstream.urls.is_empty() {
        problems.push(format!(
            "regions.{id}.queue.jetstream.urls must name the region's NATS servers"
        ));
    }
    for url in &jetstream.urls {
        if !meridian_queue::jetstream::is_nats_url(url) {
            problems.push(format!(
                "regions.{id}.queue.jetstream.urls: `{url}` is not a NATS url (nats://host:4222)"
            ));
        }
    }
    if !(1..=5).contains(&jetstream.replicas) {
        problems.push(format!(
            "regions.{id}.queue.jetstream.replicas must be 1 to 5 (JetStream's limit), not {}",
            jetstream.replicas
        ));
    }
    if !(1..=64).contains(&jetstream.partitions) {
        problems.push(format!(
            "regions.{id}.queue.jetstream.partitions must be 1 to 64, not {}",
            jetstream.partitions
        ));
    }
    if jetstream.lease_ms < 1_000 || jetstream.request_timeout_ms == 0 {
        problems.push(format!("regions.{id}.queue.jetstream: lease_ms must be at least 1000 and request_timeout_ms positive"));
    }
    let stream = jetstream
        .stream
        .clone()
        .unwrap_or_else(|| format!("meridian-{id}"));
    let is_valid_stream_name = !stream.is_empty()
        && stream
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !is_valid_stream_name {
        problems.push(format!(
            "regions.{id}.queue.jetstream.stream `{stream}` may use ASCII letters, digits, '-' and '_' only"
        ));
    }
    let user_and_password = match (&jetstream.user, &jetstream.password) {
        (Some(user), Some(password)) => Some((user.clone(), password.clone())),
        (None, None) => None,
        _ => {
            problems.push(format!(
                "regions.{id}.queue.jetstream: set both user and password, or neither"
            ));
            None
        }
    };
    JetStreamRegionSettings {
        urls: jetstream.urls.clone(),
        stream,
        replicas: jetstream.replicas,
        partitions: jetstream.partitions,
        max_bytes: jetstream.max_bytes,
        duplicate_window: Duration::from_secs(jetstream.duplicate_window_secs.max(1)),
        lease: Duration::from_millis(jetstream.lease_ms),
        request_timeout: Duration::from_millis(jetstream.request_timeout_ms.max(1)),
        credentials_file: jetstream.credentials_file.clone(),
        token: jetstream.token.clone(),
        user_and_password,
        tls_ca_file: jetstream.tls_ca_file.clone(),
        require_tls: jetstream.require_tls,
    }
}

fn validate_clickhouse(
    region: &RegionId,
    config: &ClickHouseRegionConfig,
    data_dir: &Path,
    problems: &mut Vec<String>,
) -> meridian_clickhouse::ClickHouseConfig {
    let key = format!("regions.{region}.clickhouse");
    if config.urls.is_empty() {
        problems.push(format!(
            "{key}.urls must list at least one URL of this region's ClickHouse"
        ));
    }
    // Credentials written into a URL are taken out of it and given to the client apart, so that
    // no URL the sink prints (errors, logs, /readyz) carries a password.
    let mut user = config.user.clone();
    let mut password = config.password.clone();
    let mut urls = Vec::with_capacity(config.urls.len());
    for url in &config.urls {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            problems.push(format!(
                "{key}.urls: `{}` must start with http:// or https://",
                redact_url(url)
            ));
        }
        let (url_user, url_password, bare_url) = meridian_core::split_url_credentials(url);
        if let Some(url_user) = url_user {
            match &user {
                Some(existing) if *existing != url_user => problems.push(format!(
                    "{key}: the user in `{}` differs from {key}.user; set it in one place",
                    redact_url(url)
                )),
                _ => user = Some(url_user),
            }
        }
        if let Some(url_password) = url_password {
            match &password {
                Some(existing) if existing.expose() != url_password => problems.push(format!(
                    "{key}: the password in `{}` differs from {key}.password; set it in one place",
                    redact_url(url)
                )),
                _ => password = Some(Secret::new(url_password)),
            }
        }
        urls.push(bare_url);
    }
    let is_identifier = !config.database.is_empty()
        && config
            .database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !is_identifier {
        problems.push(format!(
            "{key}.database `{}` must be letters, digits and underscores",
            config.database
        ));
    }
    if !(1..=1_000_000).contains(&config.batch_max_rows) {
        problems.push(format!("{key}.batch_max_rows must be 1 to 1000000"));
    }
    if config.batch_max_bytes < 1024 {
        problems.push(format!("{key}.batch_max_bytes must be at least 1024"));
    }
    meridian_clickhouse::ClickHouseConfig {
        urls,
        database: config.database.clone(),
        user,
        password,
        batch_max_rows: config.batch_max_rows,
        batch_max_bytes: config.batch_max_bytes,
        flush_interval: Duration::from_millis(config.flush_interval_ms),
        request_timeout: Duration::from_secs(config.request_timeout_secs.max(1)),
        retention_days: config.retention_days,
        dead_letter_dir: data_dir.join("dead-letter").join(region.as_str()),
        dead_letter_budget_bytes: config.dead_letter_budget_bytes,
    }
}

/// Tables merge key by key; any other value in `overlay` replaces the base's.
fn merge_toml(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(base_table), toml::Value::Table(overlay_table)) => {
            for (key, overlay_value) in overlay_table {
                match base_table.get_mut(&key) {
                    Some(base_value) => merge_toml(base_value, overlay_value),
                    None => {
                        base_table.insert(key, overlay_value);
                    }
                }
            }
        }
        (base, overlay) => *base = overlay,
    }
}

/// Environment overrides, as `(variable, value)` pairs; taken as a parameter for testability.
pub type Environment = Vec<(String, String)>;

pub fn process_environment() -> Environment {
    std::env::vars()
        .filter(|(name, _)| name.starts_with("MERIDIAN_"))
        .collect()
}

impl Config {
    /// Loads the embedded defaults, merges `file_text` over them, applies `environment`.
    pub fn from_sources(
        file_text: Option<&str>,
        environment: &Environment,
    ) -> Result<Config, ConfigError> {
        let mut merged: toml::Value = toml::from_str(EMBEDDED_DEFAULTS)
            .map_err(|error| ConfigError::Parse(format!("embedded defaults: {error}")))?;
        if let Some(text) = file_text {
            let overlay: toml::Value =
                toml::from_str(text).map_err(|error| ConfigError::Parse(error.to_string()))?;
            merge_toml(&mut merged, overlay);
        }
        let mut config: Config = merged
            .try_into()
            .map_err(|error: toml::de::Error| ConfigError::Parse(error.to_string()))?;
        for (name, value) in environment {
            match name.as_str() {
                "MERIDIAN_LISTEN" => config.server.listen = value.clone(),
                "MERIDIAN_DATA_DIR" => config.node.data_dir = PathBuf::from(value),
                "MERIDIAN_JWT_SECRET" => config.auth.jwt_secret = Some(Secret::new(value.clone())),
                "MERIDIAN_NODE_REGION" => {
                    config.node.region = Some(value.clone());
                }
                "MERIDIAN_SERVE_REGIONS" => {
                    config.node.serve_regions = value
                        .split(',')
                        .map(str::trim)
                        .filter(|part| !part.is_empty())
                        .map(str::to_string)
                        .collect();
                }
                "MERIDIAN_CATALOG_URL" => config.catalog.url = Some(Secret::new(value.clone())),
                "MERIDIAN_QUEUE_BACKEND" => {
                    config.queue.backend = match value.as_str() {
                        "local" => QueueBackendKind::Local,
                        "jetstream" => QueueBackendKind::Jetstream,
                        other => {
                            return Err(ConfigError::Parse(format!(
                                "MERIDIAN_QUEUE_BACKEND must be \"local\" or \"jetstream\", not \"{other}\""
                            )));
                        }
                    }
                }
                "MERIDIAN_CATALOG_HASH_KEY" => {
                    config.catalog.hash_key = Some(Secret::new(value.clone()))
                }
                _ => {}
            }
        }
        // The store of the node's own region, e.g. from a Kubernetes Secret (after the loop, so
        // that MERIDIAN_NODE_REGION decides which region it is).
        if let Some((_, url)) = environment
            .iter()
            .find(|(key, _)| key == "MERIDIAN_REGION_CATALOG_URL")
        {
            let node_region = config.node.home_region(&config.default_region).to_string();
            let Some(region) = config.regions.get_mut(&node_region) else {
                return Err(ConfigError::Parse(format!(
                    "MERIDIAN_REGION_CATALOG_URL is the store of the node's region, and region `{node_region}` is not configured"
                )));
            };
            region.catalog = Some(RegionCatalogConfig {
                url: Secret::new(url.clone()),
            });
        }
        Ok(config)
    }

    /// Reads `path` (when given) and builds the config as [`Config::from_sources`] does.
    pub fn load(path: Option<&Path>, environment: &Environment) -> Result<Config, ConfigError> {
        let file_text = match path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
                        path: path.display().to_string(),
                        message: error.to_string(),
                    })?,
                )
            }
            None => None,
        };
        Config::from_sources(file_text.as_deref(), environment)
    }

    /// Checks everything and resolves paths and defaults. Lists every problem at once.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let mut regions = BTreeMap::new();
        let data_dir = self.node.data_dir.clone();
        for (id_text, region) in &self.regions {
            let id = match RegionId::parse(id_text) {
                Ok(id) => id,
                Err(error) => {
                    problems.push(format!("[regions.{id_text}]: {error}"));
                    continue;
                }
            };
            let available = match region.status.as_str() {
                "available" => true,
                "unavailable" => false,
                other => {
                    problems.push(format!("regions.{id}.status must be \"available\" or \"unavailable\", not \"{other}\""));
                    true
                }
            };
            let display_name = match &region.display_name {
                Some(name) if !name.trim().is_empty() => name.clone(),
                _ => {
                    problems.push(format!("regions.{id}.display_name is required"));
                    id.to_string()
                }
            };
            let disk_budget_bytes = region
                .disk_budget_bytes
                .unwrap_or(self.queue.disk_budget_bytes);
            if disk_budget_bytes < 2 * self.queue.segment_max_bytes.max(1) {
                problems.push(format!(
                    "the disk budget of region {id} ({disk_budget_bytes} bytes) must be at least twice queue.segment_max_bytes ({})",
                    self.queue.segment_max_bytes
                ));
            }
            let aws_region = region.aws_region.clone().unwrap_or_else(|| id.to_string());
            let archive = region.archive.clone().unwrap_or_default();
            let archive_target = match (&archive.dir, &archive.s3) {
                (Some(_), Some(s3)) => {
                    problems.push(format!(
                        "regions.{id}.archive: set exactly one of `dir` or `s3`, not both"
                    ));
                    validate_s3(&id, &aws_region, s3, &mut problems)
                }
                (Some(dir), None) if dir.is_absolute() => ArchiveTarget::Dir(dir.clone()),
                (Some(dir), None) => ArchiveTarget::Dir(data_dir.join(dir)),
                (None, Some(s3)) => validate_s3(&id, &aws_region, s3, &mut problems),
                (None, None) => ArchiveTarget::Dir(data_dir.join("archive").join(id.as_str())),
            };
            let default_flush_interval_ms = match archive_target {
                ArchiveTarget::Dir(_) => self.archive.flush_interval_ms,
                ArchiveTarget::S3 { .. } => self.archive.s3_flush_interval_ms,
            };
            let gzip_level = archive.gzip_level.unwrap_or(self.archive.gzip_level);
            if gzip_level > 9 {
                problems.push(format!("regions.{id}.archive.gzip_level must be 0 to 9"));
            }
            let clickhouse = region
                .clickhouse
                .as_ref()
                .map(|clickhouse| validate_clickhouse(&id, clickhouse, &data_dir, &mut problems));
            let jetstream = match (
                self.queue.backend,
                region
                    .queue
                    .as_ref()
                    .and_then(|queue| queue.jetstream.as_ref()),
            ) {
                (QueueBackendKind::Jetstream, Some(jetstream)) => {
                    Some(validate_jetstream(&id, jetstream, &mut problems))
                }
                _ => None,
            };
            let retention_default = region.retention.unwrap_or_default();
            for (store, days) in [
                ("warehouse_days", retention_default.warehouse_days),
                ("archive_days", retention_default.archive_days),
            ] {
                if let Some(days) = days
                    && !(1..=meridian_catalog::MAX_RETENTION_DAYS).contains(&days)
                {
                    problems.push(format!(
                        "regions.{id}.retention.{store} must be 1 to {} days (leave it unset to keep data)",
                        meridian_catalog::MAX_RETENTION_DAYS
                    ));
                }
            }
            let store_url = region.catalog.as_ref().map(|catalog| catalog.url.clone());
            if let Some(url) = &store_url
                && !is_catalog_url(url.expose())
            {
                problems.push(format!(
                    "regions.{id}.catalog.url `{}` must start with sqlite:// or postgres://",
                    redact_url(url.expose())
                ));
            }
            regions.insert(
                id.clone(),
                RegionSettings {
                    store_url,
                    retention_default,
                    clickhouse,
                    jetstream,
                    id: id.clone(),
                    display_name,
                    available,
                    disk_budget_bytes,
                    aws_region,
                    queue_dir: data_dir.join("queue").join(id.as_str()),
                    archive: ArchiveSettings {
                        target: archive_target,
                        flush_max_bytes: archive
                            .flush_max_bytes
                            .unwrap_or(self.archive.flush_max_bytes)
                            .max(1),
                        flush_interval: Duration::from_millis(
                            archive
                                .flush_interval_ms
                                .unwrap_or(default_flush_interval_ms),
                        ),
                        gzip_level,
                        prefix: archive.prefix.clone(),
                    },
                },
            );
        }
        if regions.is_empty() {
            problems
                .push("at least one region must be configured under [regions.<id>]".to_string());
        }
        let known = |id_text: &str, what: &str, problems: &mut Vec<String>| -> Option<RegionId> {
            match RegionId::parse(id_text) {
                Ok(id) if regions.contains_key(&id) => Some(id),
                Ok(_) => {
                    problems.push(format!(
                        "{what} `{id_text}` is not a configured region (configured: {})",
                        regions
                            .keys()
                            .map(RegionId::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    None
                }
                Err(error) => {
                    problems.push(format!("{what}: {error}"));
                    None
                }
            }
        };
        let home_region = known(
            self.node.home_region(&self.default_region),
            "node.region",
            &mut problems,
        );
        let default_region = known(&self.default_region, "default_region", &mut problems);
        let catalog_url = self
            .catalog
            .url
            .as_ref()
            .map(|url| url.expose().to_string())
            .unwrap_or_else(|| {
                format!(
                    "sqlite://{}?mode=rwc",
                    data_dir.join("catalog.db").display()
                )
            });
        let catalog_is_shared =
            catalog_url.starts_with("postgres://") || catalog_url.starts_with("postgresql://");
        match &self.catalog.hash_key {
            Some(key) if key.expose().len() < meridian_catalog::keyed_hash::MIN_KEY_BYTES => {
                problems.push(format!(
                    "catalog.hash_key must be at least {} bytes long",
                    meridian_catalog::keyed_hash::MIN_KEY_BYTES
                ));
            }
            None if catalog_is_shared => problems.push(
                "catalog.hash_key (or MERIDIAN_CATALOG_HASH_KEY) must be set with a PostgreSQL catalog: every node of the cluster must use the same key, which keys the audit chain and the user-id hashes and is never stored in the catalog (e.g. openssl rand -hex 32)".to_string(),
            ),
            _ => {}
        }
        // A node of a cluster (shared catalog, or a region it belongs to) serves its own region
        // unless told otherwise; the playground (embedded catalog, no node.region) serves every
        // region.
        let is_cluster_node = catalog_is_shared || self.node.region.is_some();
        let served_regions: Vec<RegionId> = if !self.node.serve_regions.is_empty() {
            self.node
                .serve_regions
                .iter()
                .filter_map(|id| known(id, "node.serve_regions entry", &mut problems))
                .collect()
        } else if is_cluster_node {
            home_region.iter().cloned().collect()
        } else {
            regions.keys().cloned().collect()
        };
        if self.queue.backend == QueueBackendKind::Jetstream {
            for region in &served_regions {
                let has_cluster = regions
                    .get(region)
                    .is_some_and(|settings: &RegionSettings| settings.jetstream.is_some());
                if !has_cluster {
                    problems.push(format!("queue.backend = \"jetstream\" needs [regions.{region}.queue.jetstream] with the urls of that region's NATS cluster (this node serves {region})"));
                }
            }
        }
        for region in regions.values_mut() {
            if region.store_url.is_none() && !catalog_is_shared {
                region.store_url = sqlite_store_beside(&catalog_url, &region.id).map(Secret::new);
            }
        }
        let mut warnings = Vec::new();
        for region in &served_regions {
            let has_store = regions
                .get(region)
                .is_some_and(|settings: &RegionSettings| settings.store_url.is_some());
            if !has_store {
                warnings.push(format!(
                    "region {region} has no regional store ([regions.{region}.catalog] url = \"postgres://...\" in {region}): the suppressions, deletion requests and replays of its projects, and their audit entries, are kept in the global catalog"
                ));
            }
        }
        if catalog_is_shared && served_regions.len() > 1 {
            warnings.push(format!(
                "this node serves {} regions ({}) on a shared catalog: in a cluster each node serves only its own region (set node.serve_regions = [\"{}\"]), so that a node's failure or misconfiguration stays inside one region",
                served_regions.len(),
                served_regions
                    .iter()
                    .map(RegionId::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.node.home_region(&self.default_region)
            ));
        }
        let listen = match self.server.listen.parse::<SocketAddr>() {
            Ok(address) => Some(address),
            Err(error) => {
                problems.push(format!(
                    "server.listen `{}` is not host:port: {error}",
                    self.server.listen
                ));
                None
            }
        };
        if let Some(url) = &self.server.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(format!(
                "server.public_url `{url}` must start with http:// or https://"
            ));
        }
        if let Some(secret) = &self.auth.jwt_secret
            && secret.expose().len() < 32
        {
            problems.push("auth.jwt_secret must be at least 32 bytes long".to_string());
        }
        let limits = self.limits;
        if limits.max_message_bytes == 0
            || limits.max_request_bytes < limits.max_message_bytes
            || limits.max_batch_messages == 0
        {
            problems.push("limits: max_message_bytes and max_batch_messages must be positive, max_request_bytes at least max_message_bytes".to_string());
        }
        if limits.max_batch_messages > meridian_core::message::MAX_BATCH_MESSAGES_LIMIT {
            problems.push(format!(
                "limits.max_batch_messages is at most {} (larger batches are not SDK batches; they are refused)",
                meridian_core::message::MAX_BATCH_MESSAGES_LIMIT
            ));
        }
        if self.queue.segment_max_bytes < 4096 {
            problems.push("queue.segment_max_bytes must be at least 4096".to_string());
        }
        if self.queue.durability == DurabilityMode::Buffered
            && self.queue.buffered_sync_interval_ms == 0
        {
            problems.push("queue.buffered_sync_interval_ms must be positive".to_string());
        }
        if self.catalog.refresh_interval_ms == 0 || self.catalog.refresh_interval_ms > 1000 {
            problems.push("catalog.refresh_interval_ms must be 1 to 1000 (keys must take effect within a second)".to_string());
        }
        if !is_catalog_url(&catalog_url) {
            problems.push(format!(
                "catalog.url `{}` must start with sqlite:// or postgres://",
                redact_url(&catalog_url)
            ));
        }
        let tls = self
            .server
            .tls
            .as_ref()
            .and_then(|tls| match tls.listen.parse::<SocketAddr>() {
                Ok(address) => {
                    for (what, path) in [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)]
                    {
                        if !path.exists() {
                            problems.push(format!(
                                "server.tls.{what} {} does not exist",
                                path.display()
                            ));
                        }
                    }
                    Some(TlsSettings {
                        listen: address,
                        cert_path: tls.cert_path.clone(),
                        key_path: tls.key_path.clone(),
                        reload_check: Duration::from_secs(tls.reload_check_secs.max(1)),
                    })
                }
                Err(error) => {
                    problems.push(format!(
                        "server.tls.listen `{}` is not host:port: {error}",
                        tls.listen
                    ));
                    None
                }
            });
        if !self.server.plain_http && self.server.tls.is_none() {
            problems.push("server.plain_http = false needs a [server.tls] listener".to_string());
        }
        if self.server.request_body_budget_bytes < self.limits.max_request_bytes {
            problems.push(format!(
                "server.request_body_budget_bytes ({}) must hold at least one request of limits.max_request_bytes ({})",
                self.server.request_body_budget_bytes, self.limits.max_request_bytes
            ));
        }
        if self.server.max_concurrent_requests == 0 {
            problems.push("server.max_concurrent_requests must be positive".to_string());
        }
        for (key, value) in [
            ("server.max_connections", self.server.max_connections as u64),
            (
                "server.max_connections_per_address",
                u64::from(self.server.max_connections_per_address),
            ),
            (
                "server.max_requests_per_address",
                u64::from(self.server.max_requests_per_address),
            ),
            (
                "server.max_concurrent_http2_streams",
                u64::from(self.server.max_concurrent_http2_streams),
            ),
        ] {
            if value == 0 {
                problems.push(format!("{key} must be positive"));
            }
        }
        for (key, value) in [
            (
                "server.anonymous_body_budget_bytes",
                self.server.anonymous_body_budget_bytes,
            ),
            (
                "server.project_body_budget_bytes",
                self.server.project_body_budget_bytes,
            ),
        ] {
            if value < self.limits.max_request_bytes {
                problems.push(format!(
                    "{key} ({value}) must hold at least one request of limits.max_request_bytes ({})",
                    self.limits.max_request_bytes
                ));
            }
        }
        let mut trusted_proxies = Vec::new();
        for entry in &self.server.trusted_proxies {
            match crate::edge::Network::parse(entry) {
                Some(network) => trusted_proxies.push(network),
                None => problems.push(format!(
                    "server.trusted_proxies: `{entry}` is not an address or a network (10.0.0.0/8, fd00::/8)"
                )),
            }
        }
        let trusted_proxies: Arc<[crate::edge::Network]> = trusted_proxies.into();
        let (Some(home_region), Some(default_region), Some(listen), true) =
            (home_region, default_region, listen, problems.is_empty())
        else {
            return Err(ConfigError::Invalid(problems));
        };
        Ok(Settings {
            warnings,
            home_region,
            default_region,
            served_regions,
            queue_backend: self.queue.backend,
            regions,
            data_dir,
            listen: self.server.plain_http.then_some(listen),
            tls,
            request_timeout: Duration::from_secs(self.server.request_timeout_secs.max(1)),
            connection_limits: crate::listener::ConnectionLimits {
                header_read_timeout: Duration::from_secs(
                    self.server.header_read_timeout_secs.max(1),
                ),
                max_header_bytes: self.server.max_header_bytes,
                tls_handshake_timeout: Duration::from_secs(10),
                max_connection_age: Duration::from_secs(self.server.max_connection_age_secs.max(1)),
                max_concurrent_http2_streams: self.server.max_concurrent_http2_streams,
                listen_backlog: self.server.listen_backlog.max(1),
                max_connections: self.server.max_connections,
                max_connections_per_address: self.server.max_connections_per_address,
                trusted_proxies: Arc::clone(&trusted_proxies),
            },
            max_requests_per_address: self.server.max_requests_per_address,
            trusted_proxies,
            // A share is at most the whole budget.
            anonymous_body_budget_bytes: self
                .server
                .anonymous_body_budget_bytes
                .min(self.server.request_body_budget_bytes),
            project_body_budget_bytes: self
                .server
                .project_body_budget_bytes
                .min(self.server.request_body_budget_bytes),
            max_concurrent_requests: self.server.max_concurrent_requests,
            request_body_budget_bytes: self.server.request_body_budget_bytes,
            public_url: self
                .server
                .public_url
                .clone()
                .map(|url| url.trim_end_matches('/').to_string()),
            shutdown_timeout: Duration::from_secs(self.server.shutdown_timeout_secs),
            body_read_timeout: Duration::from_secs(self.server.body_read_timeout_secs.max(1)),
            append_timeout: Duration::from_secs(self.server.append_timeout_secs.max(1)),
            jwt_secret: self.auth.jwt_secret.clone(),
            jwt_leeway_secs: self.auth.jwt_leeway_secs,
            jwt_issuer: self.auth.issuer.clone().filter(|issuer| !issuer.is_empty()),
            jwt_audience: self
                .auth
                .audience
                .clone()
                .filter(|audience| !audience.is_empty()),
            catalog_url: Secret::new(catalog_url),
            catalog_hash_key: self.catalog.hash_key.clone(),
            catalog_refresh_interval: Duration::from_millis(self.catalog.refresh_interval_ms),
            limits,
            durability: match self.queue.durability {
                DurabilityMode::Fsync => Durability::Fsync,
                DurabilityMode::Buffered => Durability::Buffered {
                    sync_interval: Duration::from_millis(self.queue.buffered_sync_interval_ms),
                },
            },
            segment_max_bytes: self.queue.segment_max_bytes,
            max_in_flight_bytes: self.queue.max_in_flight_bytes,
            min_free_disk_bytes: self.queue.min_free_disk_bytes,
            customer_access: meridian_archive::customer::CustomerAccessSettings {
                endpoint: self.customer_storage.endpoint.clone(),
                force_path_style: self.customer_storage.force_path_style,
                access_key_id: self.customer_storage.access_key_id.clone(),
                secret_access_key: self.customer_storage.secret_access_key.clone(),
                request_timeout: Duration::from_secs(
                    self.customer_storage.request_timeout_secs.max(1),
                ),
            },
            queue_key_file: self
                .queue
                .encryption
                .as_ref()
                .map(|encryption| encryption.key_file.clone()),
            default_rate_limit: (self.rate_limits.default_messages_per_second > 0.0).then_some(
                crate::rate_limit::Limit {
                    per_second: self.rate_limits.default_messages_per_second,
                    burst: if self.rate_limits.default_burst > 0.0 {
                        self.rate_limits.default_burst
                    } else {
                        self.rate_limits.default_messages_per_second * 2.0
                    },
                },
            ),
            project_rate_limits: self
                .rate_limits
                .projects
                .iter()
                .filter(|(_, limit)| limit.messages_per_second > 0.0)
                .map(|(project, limit)| {
                    let burst = limit
                        .burst
                        .filter(|burst| *burst > 0.0)
                        .unwrap_or(limit.messages_per_second * 2.0);
                    (
                        project.clone(),
                        crate::rate_limit::Limit {
                            per_second: limit.messages_per_second,
                            burst,
                        },
                    )
                })
                .collect(),
            spool_retry: Duration::from_secs(self.customer_storage.spool_retry_secs.max(1)),
            spool_budget_bytes: self.customer_storage.spool_budget_bytes,
            gdpr_settle: Duration::from_millis(self.gdpr.settle_ms),
            gdpr_poll_interval: Duration::from_millis(self.gdpr.poll_interval_ms.max(10)),
            replay_max_messages_per_second: self.replay.max_messages_per_second.max(1),
            live_subscribers_per_project: self.console.live_subscribers_per_project.max(1),
            live_events_per_second: self.console.live_events_per_second.max(1),
            max_live_streams: self.console.max_live_streams.max(1),
            migration_max_messages_per_second: self.migration.max_messages_per_second.max(1),
            migration_tail_interval: Duration::from_millis(self.migration.tail_interval_ms.max(10)),
            migration_drain_window: Duration::from_secs(self.migration.drain_window_secs),
            retention_janitor_interval: Duration::from_secs(
                self.retention.janitor_interval_secs.max(1),
            ),
            location_check_interval: Duration::from_secs(
                self.customer_storage.location_check_interval_secs.max(1),
            ),
            retry: meridian_queue::RetryPolicy {
                base: Duration::from_millis(self.queue.retry_base_ms.max(1)),
                cap: Duration::from_millis(
                    self.queue.retry_max_ms.max(self.queue.retry_base_ms).max(1),
                ),
                attempt_limit: Duration::from_secs(self.queue.max_sink_attempt_secs.max(1)),
            },
        })
    }
}

impl Settings {
    /// What admin tokens must say beyond a valid signature.
    pub fn token_rules(&self) -> crate::auth::TokenRules {
        crate::auth::TokenRules {
            leeway_secs: self.jwt_leeway_secs,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
        }
    }

    /// The AWS region the buckets of Meridian region `region` must be in (the id itself for a
    /// region without its own mapping, or one this node does not know).
    pub fn aws_region_of(&self, region: &str) -> String {
        RegionId::parse(region)
            .ok()
            .and_then(|id| self.regions.get(&id))
            .map(|settings| settings.aws_region.clone())
            .unwrap_or_else(|| region.to_string())
    }

    /// The catalog URL with its password replaced by `***`.
    pub fn catalog_url_for_display(&self) -> String {
        redact_url(self.catalog_url.expose())
    }

    pub fn serves(&self, region: &RegionId) -> bool {
        self.served_regions.contains(region)
    }
}

fn is_catalog_url(url: &str) -> bool {
    url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The default regional store on an embedded SQLite catalog: `catalog-<region>.db` beside the
/// catalog file (so nodes that share a catalog file share the regional files too), with the
/// catalog URL's options.
fn sqlite_store_beside(catalog_url: &str, region: &RegionId) -> Option<String> {
    let rest = catalog_url
        .strip_prefix("sqlite://")
        .or_else(|| catalog_url.strip_prefix("sqlite:"))?;
    let (path, options) = match rest.split_once('?') {
        Some((path, options)) => (path, Some(options)),
        None => (rest, None),
    };
    let path = std::path::Path::new(path);
    let stem = path.file_stem()?.to_string_lossy();
    let file = format!("{stem}-{}.db", region.as_str());
    let store = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(file),
        _ => PathBuf::from(file),
    };
    Some(match options {
        Some(options) => format!("sqlite://{}?{options}", store.display()),
        None => format!("sqlite://{}", store.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Environment {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_are_valid_and_serve_the_four_regions() {
        let settings = Config::from_sources(None, &env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        let ids: Vec<_> = settings.regions.keys().map(|id| id.to_string()).collect();
        assert_eq!(
            ids,
            vec!["af-south-1", "ap-southeast-1", "eu-west-1", "us-east-1"]
        );
        assert_eq!(settings.default_region.as_str(), "eu-west-1");
        assert_eq!(settings.home_region.as_str(), "eu-west-1");
        assert_eq!(settings.served_regions.len(), 4);
        assert_eq!(settings.limits, IngestLimits::default());
        assert_eq!(settings.durability, Durability::Fsync);
        assert!(matches!(
            &settings.regions[&RegionId::parse("us-east-1").unwrap()].archive.target,
            ArchiveTarget::Dir(dir) if dir == &PathBuf::from("data/archive/us-east-1")
        ));
    }

    #[test]
    fn the_jetstream_backend_needs_a_cluster_for_every_served_region_and_sane_numbers() {
        let problems = |file: &str, pairs: &[(&str, &str)]| -> String {
            match Config::from_sources(Some(file), &env(pairs)).and_then(|config| config.validate())
            {
                Ok(_) => String::new(),
                Err(error) => error.to_string(),
            }
        };
        let eu_only = &[("MERIDIAN_SERVE_REGIONS", "eu-west-1")][..];
        let without_cluster = "[queue]\nbackend = \"jetstream\"\n";
        assert!(
            problems(without_cluster, eu_only).contains("[regions.eu-west-1.queue.jetstream]"),
            "{}",
            problems(without_cluster, eu_only)
        );
        let with_cluster = "[queue]\nbackend = \"jetstream\"\n[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n";
        assert_eq!(problems(with_cluster, eu_only), "");
        // The environment chooses the backend too; then every served region needs its cluster.
        assert!(
            problems(
                "[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n",
                &[
                    ("MERIDIAN_QUEUE_BACKEND", "jetstream"),
                    ("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")
                ]
            )
            .contains("[regions.us-east-1.queue.jetstream]")
        );
        let bad_numbers = "[queue]\nbackend = \"jetstream\"\n[regions.eu-west-1.queue.jetstream]\nurls = []\nreplicas = 7\npartitions = 0\nstream = \"a.b\"\n";
        let text = problems(bad_numbers, eu_only);
        for expected in [
            "urls must name",
            "replicas must be 1 to 5",
            "partitions must be 1 to 64",
            "ASCII letters",
        ] {
            assert!(text.contains(expected), "{expected}: {text}");
        }
        let settings = Config::from_sources(Some(with_cluster), &env(eu_only))
            .unwrap()
            .validate()
            .unwrap();
        let region = &settings.regions[&RegionId::parse("eu-west-1").unwrap()];
        let jetstream = region.jetstream.as_ref().expect("resolved");
        assert_eq!(jetstream.stream, "meridian-eu-west-1");
        assert_eq!((jetstream.replicas, jetstream.partitions), (3, 1));
        assert_eq!(settings.queue_backend, QueueBackendKind::Jetstream);
        // With the local backend a jetstream section is ignored.
        let local = Config::from_sources(
            Some("[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n"),
            &env(eu_only),
        )
        .unwrap()
        .validate()
        .unwrap();
        assert!(
            local.regions[&RegionId::parse("eu-west-1").unwrap()]
                .jetstream
                .is_none()
        );
        assert!(
            Config::from_sources(None, &env(&[("MERIDIAN_QUEUE_BACKEND", "kafka")])).is_err(),
            "an unknown backend is refused"
        );
    }

    #[test]
    fn settings_never_show_their_secrets_in_debug() {
        let file = r#"
            [auth]
            jwt_secret = "jwt-secret-that-is-long-enough-0123456789"
            [regions.eu-west-1.clickhouse]
            urls = ["http://127.0.0.1:8123"]
            password = "clickhouse-password-in-debug"
            [regions.us-east-1.archive]
            s3 = { bucket = "b", access_key_id = "AKIA", secret_access_key = "s3-secret-in-debug" }
        "#;
        let config = Config::from_sources(
            Some(file),
            &env(&[
                (
                    "MERIDIAN_CATALOG_URL",
                    "postgres://u:catalog-password-in-debug@db/m",
                ),
                (
                    "MERIDIAN_CATALOG_HASH_KEY",
                    "catalog-hash-key-in-debug-long-enough-0123",
                ),
            ]),
        )
        .unwrap();
        let settings = config.validate().unwrap();
        for shown in [format!("{config:?}"), format!("{settings:?}")] {
            for secret in [
                "jwt-secret-that-is-long-enough-0123456789",
                "clickhouse-password-in-debug",
                "s3-secret-in-debug",
                "catalog-password-in-debug",
                "catalog-hash-key-in-debug-long-enough-0123",
            ] {
                assert!(!shown.contains(secret), "{secret} shown");
            }
        }
        assert_eq!(settings.catalog_url_for_display(), "postgres://u:***@db/m");
    }

    #[test]
    fn a_regions_buckets_must_be_in_the_aws_region_of_that_meridian_region() {
        let copied = r#"
            [regions.us-east-1.archive]
            s3 = { bucket = "b", region = "eu-west-1" }
        "#;
        let problems = Config::from_sources(Some(copied), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            problems.contains("regions.us-east-1.archive.s3")
                && problems.contains("`eu-west-1`")
                && problems.contains("`us-east-1`"),
            "{problems}"
        );
        let mapped = r#"
            [regions.eu-west-1]
            aws_region = "eu-central-1"
            [regions.eu-west-1.archive]
            s3 = { bucket = "b", region = "eu-central-1" }
        "#;
        let settings = Config::from_sources(Some(mapped), &env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        let eu = &settings.regions[&RegionId::parse("eu-west-1").unwrap()];
        assert_eq!(eu.aws_region, "eu-central-1");
        assert!(matches!(
            &eu.archive.target,
            ArchiveTarget::S3 { settings, .. } if settings.region == "eu-central-1"
        ));
        assert_eq!(settings.aws_region_of("eu-west-1"), "eu-central-1");
        assert_eq!(settings.aws_region_of("us-east-1"), "us-east-1");
    }

    #[test]
    fn a_postgresql_catalog_needs_an_explicit_hash_key() {
        let problems = Config::from_sources(
            None,
            &env(&[(
                "MERIDIAN_CATALOG_URL",
                "postgres://meridian@127.0.0.1/meridian",
            )]),
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(problems.contains("catalog.hash_key"), "{problems}");
        let short = Config::from_sources(None, &env(&[("MERIDIAN_CATALOG_HASH_KEY", "short")]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(short.contains("at least 32 bytes"), "{short}");
    }

    #[test]
    fn a_cluster_node_serves_only_its_own_region_unless_told_otherwise() {
        let served = |file: Option<&str>, pairs: &[(&str, &str)]| {
            let mut pairs = pairs.to_vec();
            pairs.push((
                "MERIDIAN_CATALOG_HASH_KEY",
                "a-cluster-wide-catalog-hash-key-0123456789",
            ));
            let settings = Config::from_sources(file, &env(&pairs))
                .unwrap()
                .validate()
                .unwrap();
            let served: Vec<String> = settings
                .served_regions
                .iter()
                .map(|region| region.to_string())
                .collect();
            (served, settings.warnings)
        };
        let postgres = (
            "MERIDIAN_CATALOG_URL",
            "postgres://meridian@127.0.0.1/meridian",
        );
        assert_eq!(served(None, &[postgres]).0, vec!["eu-west-1"]);
        assert_eq!(
            served(None, &[postgres, ("MERIDIAN_NODE_REGION", "us-east-1")]).0,
            vec!["us-east-1"]
        );
        assert_eq!(
            served(None, &[("MERIDIAN_NODE_REGION", "af-south-1")]).0,
            vec!["af-south-1"],
            "a home region set on purpose makes the node a member of that region"
        );
        assert_eq!(
            served(Some("[node]\nregion = \"eu-west-1\"\n"), &[]).0,
            vec!["eu-west-1"]
        );
        let (playground, playground_warnings) = served(None, &[]);
        assert_eq!(
            playground.len(),
            4,
            "the embedded playground serves all four"
        );
        assert_eq!(
            served(Some(EMBEDDED_DEFAULTS), &[]).0.len(),
            4,
            "config/meridian.toml as a file gives the same playground as the embedded defaults"
        );
        assert!(playground_warnings.is_empty());

        let (several, warnings) = served(
            None,
            &[postgres, ("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")],
        );
        assert_eq!(
            several,
            vec!["eu-west-1", "us-east-1"],
            "serve_regions wins"
        );
        let shared_catalog_warnings: Vec<&String> = warnings
            .iter()
            .filter(|warning| warning.contains("shared catalog"))
            .collect();
        assert_eq!(shared_catalog_warnings.len(), 1, "{warnings:?}");
        assert!(
            shared_catalog_warnings[0].contains("eu-west-1, us-east-1"),
            "{warnings:?}"
        );
        for region in ["eu-west-1", "us-east-1"] {
            assert!(
                warnings
                    .iter()
                    .any(|warning| warning
                        .contains(&format!("region {region} has no regional store"))),
                "{warnings:?}"
            );
        }
        assert_eq!(warnings.len(), 3, "{warnings:?}");
    }

    #[test]
    fn each_region_has_a_store_of_its_own_or_the_warning_says_the_global_one_is_used() {
        let settings = |file: &str, pairs: &[(&str, &str)]| {
            Config::from_sources(Some(file), &env(pairs))
                .unwrap()
                .validate()
        };
        // Embedded: a SQLite file per region beside the catalog, no warning.
        let embedded = settings("", &[("MERIDIAN_DATA_DIR", "/var/lib/m")]).unwrap();
        let eu = RegionId::parse("eu-west-1").unwrap();
        assert_eq!(
            embedded.regions[&eu].store_url.as_ref().map(Secret::expose),
            Some("sqlite:///var/lib/m/catalog-eu-west-1.db?mode=rwc")
        );
        assert!(embedded.warnings.is_empty(), "{:?}", embedded.warnings);

        let postgres = ("MERIDIAN_CATALOG_URL", "postgres://u:p@db/global");
        let hash_key = (
            "MERIDIAN_CATALOG_HASH_KEY",
            "a-cluster-wide-catalog-hash-key-0123456789",
        );
        let with_store = settings(
            "[regions.eu-west-1.catalog]\nurl = \"postgres://u:p@db-eu/meridian_eu\"\n",
            &[postgres, hash_key, ("MERIDIAN_NODE_REGION", "eu-west-1")],
        )
        .unwrap();
        assert_eq!(
            with_store.regions[&eu]
                .store_url
                .as_ref()
                .map(Secret::expose),
            Some("postgres://u:p@db-eu/meridian_eu")
        );
        assert!(with_store.warnings.is_empty(), "{:?}", with_store.warnings);

        let without = settings(
            "",
            &[postgres, hash_key, ("MERIDIAN_NODE_REGION", "eu-west-1")],
        )
        .unwrap();
        assert!(without.regions[&eu].store_url.is_none());
        assert_eq!(without.warnings.len(), 1, "{:?}", without.warnings);
        assert!(without.warnings[0].contains("kept in the global catalog"));

        let from_environment = settings(
            "",
            &[
                postgres,
                hash_key,
                ("MERIDIAN_NODE_REGION", "us-east-1"),
                (
                    "MERIDIAN_REGION_CATALOG_URL",
                    "postgres://u:p@db-us/meridian_us",
                ),
            ],
        )
        .unwrap();
        let us = RegionId::parse("us-east-1").unwrap();
        assert_eq!(
            from_environment.regions[&us]
                .store_url
                .as_ref()
                .map(Secret::expose),
            Some("postgres://u:p@db-us/meridian_us"),
            "MERIDIAN_REGION_CATALOG_URL names the store of the node's own region"
        );
        assert!(from_environment.regions[&eu].store_url.is_none());

        let bad = settings(
            "[regions.eu-west-1.catalog]\nurl = \"mysql://db/eu\"\n",
            &[postgres, hash_key],
        );
        let problems = format!("{bad:?}");
        assert!(
            problems.contains("regions.eu-west-1.catalog.url"),
            "{problems}"
        );
    }

    #[test]
    fn file_merges_over_defaults_and_environment_wins() {
        let file = r#"
            [node]
            region = "us-east-1"
            [regions.us-east-1]
            disk_budget_bytes = 999999999
            [regions.us-east-1.archive]
            dir = "/srv/archive"
            [regions.sa-east-1]
            display_name = "South America / Sao Paulo"
        "#;
        let environment = env(&[
            ("MERIDIAN_SERVE_REGIONS", "us-east-1, sa-east-1"),
            ("MERIDIAN_LISTEN", "0.0.0.0:9000"),
            ("MERIDIAN_DATA_DIR", "/var/lib/meridian"),
        ]);
        let settings = Config::from_sources(Some(file), &environment)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(settings.home_region.as_str(), "us-east-1");
        assert_eq!(settings.regions.len(), 5);
        let us = &settings.regions[&RegionId::parse("us-east-1").unwrap()];
        assert_eq!(us.display_name, "US East / N. Virginia");
        assert_eq!(us.disk_budget_bytes, 999_999_999);
        assert!(
            matches!(&us.archive.target, ArchiveTarget::Dir(dir) if dir == &PathBuf::from("/srv/archive"))
        );
        assert_eq!(
            us.queue_dir,
            PathBuf::from("/var/lib/meridian/queue/us-east-1")
        );
        assert_eq!(
            settings
                .served_regions
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>(),
            vec!["us-east-1", "sa-east-1"]
        );
        assert_eq!(settings.listen.map(|listen| listen.port()), Some(9000));
        assert!(
            settings
                .catalog_url
                .expose()
                .contains("/var/lib/meridian/catalog.db")
        );
    }

    #[test]
    fn s3_archives_are_configured_per_region_and_checked() {
        let file = r#"
            [regions.eu-west-1.archive]
            s3 = { bucket = "meridian-eu", endpoint = "http://127.0.0.1:8333", force_path_style = true, verify_location = false }
        "#;
        let settings = Config::from_sources(Some(file), &env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        let eu = &settings.regions[&RegionId::parse("eu-west-1").unwrap()].archive;
        match &eu.target {
            ArchiveTarget::S3 {
                settings,
                verify_location,
            } => {
                assert_eq!(settings.bucket, "meridian-eu");
                assert_eq!(settings.region, "eu-west-1");
                assert!(settings.force_path_style);
                assert!(!verify_location);
                assert_eq!(
                    settings.encryption,
                    meridian_archive::s3::Encryption::Aes256
                );
            }
            other => panic!("expected S3, got {other:?}"),
        }
        assert_eq!(
            eu.flush_interval,
            Duration::from_secs(300),
            "S3 archives flush every 5 minutes by default"
        );

        let both =
            "[regions.eu-west-1.archive]\ndir = \"x\"\ns3 = { bucket = \"b\", sse = \"rot13\" }";
        let message = Config::from_sources(Some(both), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("exactly one of `dir` or `s3`") && message.contains("rot13"),
            "{message}"
        );
    }

    #[test]
    fn clickhouse_is_configured_per_region() {
        let file = r#"
            [regions.us-east-1.clickhouse]
            urls = ["http://127.0.0.1:8123", "http://127.0.0.1:8124"]
            retention_days = 400
        "#;
        let settings = Config::from_sources(Some(file), &env(&[]))
            .unwrap()
            .validate()
            .unwrap();
        let us = settings.regions[&RegionId::parse("us-east-1").unwrap()]
            .clickhouse
            .clone()
            .unwrap();
        assert_eq!(us.urls.len(), 2);
        assert_eq!(us.database, "meridian");
        assert_eq!(us.batch_max_rows, 50_000);
        assert_eq!(us.retention_days, Some(400));
        assert_eq!(
            us.dead_letter_dir,
            PathBuf::from("data/dead-letter/us-east-1")
        );
        assert!(
            settings.regions[&RegionId::parse("eu-west-1").unwrap()]
                .clickhouse
                .is_none()
        );

        let bad = "[regions.eu-west-1.clickhouse]\nurls = [\"tcp://x\"]\ndatabase = \"a-b\"";
        let message = Config::from_sources(Some(bad), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("tcp://x") && message.contains("database"),
            "{message}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let file = r#"
            default_region = "mars-1"
            [node]
            region = "nowhere-1"
            serve_regions = ["EU"]
            [server]
            listen = "not an address"
            [auth]
            jwt_secret = "short"
            [regions.us-east-1]
            status = "maybe"
        "#;
        let message = Config::from_sources(Some(file), &env(&[]))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        for expected in [
            "default_region `mars-1`",
            "node.region `nowhere-1`",
            "node.serve_regions",
            "server.listen",
            "jwt_secret",
            "regions.us-east-1.status",
        ] {
            assert!(
                message.contains(expected),
                "{expected} missing from: {message}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let unknown =
            Config::from_sources(Some("[server]\nlisten_port = 3"), &env(&[])).unwrap_err();
        assert!(unknown.to_string().contains("listen_port"), "{unknown}");
        let mistyped =
            Config::from_sources(Some("[limits]\nmax_message_bytes = \"big\""), &env(&[]))
                .unwrap_err();
        assert!(
            mistyped.to_string().contains("max_message_bytes"),
            "{mistyped}"
        );
    }
}
