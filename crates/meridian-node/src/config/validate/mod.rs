//! Validation of the merged configuration into [`Settings`], section by section; every problem
//! is listed at once.

mod node;
mod region;
mod server;

use std::sync::Arc;
use std::time::Duration;

use meridian_core::{Secret, redact_url};
use meridian_queue::Durability;

use crate::config::ConfigError;
use crate::config::raw::{Config, DurabilityMode};
use crate::config::settings::{ConnectionLimits, RateLimit, Settings};

impl Config {
    /// Checks everything and resolves paths and defaults. Lists every problem at once.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let data_dir = self.node.data_dir.clone();
        let mut regions = region::validate_regions(self, &mut problems);
        let node::NodePart {
            home_region,
            default_region,
            served_regions,
            catalog_url,
            warnings,
        } = node::validate_node(self, &mut regions, &mut problems);
        let server::HttpPart {
            listen,
            tls,
            trusted_proxies,
        } = server::validate_http(self, &mut problems);
        let limits = self.validate_limits_queue_and_catalog(&catalog_url, &mut problems);
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
            connection_limits: ConnectionLimits {
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
                RateLimit {
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
                        RateLimit {
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
            replay_poll_interval: Duration::from_millis(self.replay.poll_interval_ms.max(10)),
            insights_limits: meridian_clickhouse::InsightsLimits {
                max_rows_to_read: self.insights.max_rows_to_read.max(1),
                max_execution_seconds: self.insights.max_execution_secs.max(1),
            },
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

    /// `[limits]`, `[queue]` and the catalog's URL and refresh.
    fn validate_limits_queue_and_catalog(
        &self,
        catalog_url: &str,
        problems: &mut Vec<String>,
    ) -> meridian_core::IngestLimits {
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
        if !region::is_catalog_url(catalog_url) {
            problems.push(format!(
                "catalog.url `{}` must start with sqlite:// or postgres://",
                redact_url(catalog_url)
            ));
        }
        limits
    }
}
