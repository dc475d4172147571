//! Validated, resolved settings: what the rest of the node (and the HTTP crate) reads.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use meridian_core::{IngestLimits, RegionId, Secret, redact_url};
use meridian_queue::Durability;

use crate::config::raw::{QueueBackendKind, RegionRetention};

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
    pub connection_limits: ConnectionLimits,
    pub max_concurrent_requests: usize,
    /// Requests (HTTP/2 streams included) one client address may have in flight.
    pub max_requests_per_address: u32,
    /// Peers whose `X-Forwarded-For` names the client (load balancers).
    pub trusted_proxies: Arc<[Network]>,
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
    /// How often this node looks for replays to carry out.
    pub replay_poll_interval: Duration,
    /// What one insights question may cost the warehouse.
    pub insights_limits: meridian_clickhouse::InsightsLimits,
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
    pub default_rate_limit: Option<RateLimit>,
    pub project_rate_limits: std::collections::HashMap<String, RateLimit>,
}

#[derive(Clone, Debug)]
pub struct RegionSettings {
    pub id: RegionId,
    pub display_name: String,
    pub available: bool,
    pub disk_budget_bytes: u64,
    /// The AWS region the region's buckets (archive and customer buckets) must report.
    pub aws_region: String,
    /// Where the region's own nodes answer, when configured.
    pub public_url: Option<String>,
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

impl Settings {
    /// What admin tokens must say beyond a valid signature.
    pub fn token_rules(&self) -> TokenRules {
        TokenRules {
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

/// Connection hygiene and the edge's connection caps, for the listeners.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// A request's headers must arrive within this (also closes idle keep-alive connections).
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers) in bytes.
    pub max_header_bytes: usize,
    pub tls_handshake_timeout: Duration,
    /// A connection is asked to close (gracefully) after this long.
    pub max_connection_age: Duration,
    pub max_concurrent_http2_streams: u32,
    /// The listen backlog (capped by the kernel at `net.core.somaxconn`).
    pub listen_backlog: u32,
    /// Connections open at once on the node (every listener); beyond, 503 + Retry-After.
    pub max_connections: usize,
    /// Connections one client address may hold open; beyond, 429 + Retry-After.
    pub max_connections_per_address: u32,
    /// Peers whose `X-Forwarded-For` names the client (load balancers); exempt from the
    /// per-address connection cap.
    pub trusted_proxies: Arc<[Network]>,
}

/// Messages per second and the burst a project may send.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: f64,
}

/// What admin tokens must say beyond a valid signature, from `[auth]`.
#[derive(Clone, Debug, Default)]
pub struct TokenRules {
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// When set, tokens must carry this `iss` (and are issued with it).
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (and are issued with it).
    pub audience: Option<String>,
}

/// A network of trusted proxies: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix_length: u8,
}

impl Network {
    /// `10.0.0.0/8`, `fd00::/8`, or a single address.
    pub fn parse(text: &str) -> Option<Network> {
        let (address_text, prefix_text) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: IpAddr = address_text.trim().parse().ok()?;
        let max_length = if address.is_ipv4() { 32 } else { 128 };
        let prefix_length = match prefix_text {
            Some(prefix) => prefix.trim().parse::<u8>().ok()?,
            None => max_length,
        };
        (prefix_length <= max_length).then_some(Network {
            address,
            prefix_length,
        })
    }

    pub fn contains(&self, candidate: IpAddr) -> bool {
        match (self.address, canonical_address(candidate)) {
            (IpAddr::V4(network), IpAddr::V4(candidate)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(candidate) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(candidate)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_length))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(candidate) & mask
            }
            _ => false,
        }
    }
}

/// IPv4 addresses mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) are
/// IPv4 addresses.
pub fn canonical_address(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}
