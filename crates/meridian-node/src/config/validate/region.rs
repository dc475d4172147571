//! `[regions.<id>]`: each region's name and status, disk budget, archive, warehouse, queue cluster,
//! retention default and store, resolved from that region's table only.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use meridian_core::{RegionId, Secret, redact_url};

use crate::config::raw::{
    ClickHouseRegionConfig, Config, JetStreamRegionConfig, QueueBackendKind, S3ArchiveConfig,
};
use crate::config::settings::{
    ArchiveSettings, ArchiveTarget, JetStreamRegionSettings, RegionSettings,
};

/// Every configured region, resolved; its problems added to `problems`.
pub(super) fn validate_regions(
    config: &Config,
    problems: &mut Vec<String>,
) -> BTreeMap<RegionId, RegionSettings> {
    let mut regions = BTreeMap::new();
    let data_dir = config.node.data_dir.clone();
    for (id_text, region) in &config.regions {
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
                problems.push(format!(
                    "regions.{id}.status must be \"available\" or \"unavailable\", not \"{other}\""
                ));
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
            .unwrap_or(config.queue.disk_budget_bytes);
        if disk_budget_bytes < 2 * config.queue.segment_max_bytes.max(1) {
            problems.push(format!(
                    "the disk budget of region {id} ({disk_budget_bytes} bytes) must be at least twice queue.segment_max_bytes ({})",
                    config.queue.segment_max_bytes
                ));
        }
        let aws_region = region.aws_region.clone().unwrap_or_else(|| id.to_string());
        if let Some(url) = &region.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problems.push(format!(
                "regions.{id}.public_url `{url}` must start with http:// or https://"
            ));
        }
        let archive = region.archive.clone().unwrap_or_default();
        let archive_target = match (&archive.dir, &archive.s3) {
            (Some(_), Some(s3)) => {
                problems.push(format!(
                    "regions.{id}.archive: set exactly one of `dir` or `s3`, not both"
                ));
                validate_s3(&id, &aws_region, s3, problems)
            }
            (Some(dir), None) if dir.is_absolute() => ArchiveTarget::Dir(dir.clone()),
            (Some(dir), None) => ArchiveTarget::Dir(data_dir.join(dir)),
            (None, Some(s3)) => validate_s3(&id, &aws_region, s3, problems),
            (None, None) => ArchiveTarget::Dir(data_dir.join("archive").join(id.as_str())),
        };
        let default_flush_interval_ms = match archive_target {
            ArchiveTarget::Dir(_) => config.archive.flush_interval_ms,
            ArchiveTarget::S3 { .. } => config.archive.s3_flush_interval_ms,
        };
        let gzip_level = archive.gzip_level.unwrap_or(config.archive.gzip_level);
        if gzip_level > 9 {
            problems.push(format!("regions.{id}.archive.gzip_level must be 0 to 9"));
        }
        let clickhouse = region
            .clickhouse
            .as_ref()
            .map(|clickhouse| validate_clickhouse(&id, clickhouse, &data_dir, problems));
        let jetstream = match (
            config.queue.backend,
            region
                .queue
                .as_ref()
                .and_then(|queue| queue.jetstream.as_ref()),
        ) {
            (QueueBackendKind::Jetstream, Some(jetstream)) => {
                Some(validate_jetstream(&id, jetstream, problems))
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
                public_url: region.public_url.clone(),
                queue_dir: data_dir.join("queue").join(id.as_str()),
                archive: ArchiveSettings {
                    target: archive_target,
                    flush_max_bytes: archive
                        .flush_max_bytes
                        .unwrap_or(config.archive.flush_max_bytes)
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
        problems.push("at least one region must be configured under [regions.<id>]".to_string());
    }
    regions
}

pub(super) fn is_catalog_url(url: &str) -> bool {
    url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")
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
