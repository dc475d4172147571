//! `[node]` and `[catalog]`: the node's home region, which regions it serves (a cluster member
//! serves its own; the playground every region), the catalog and the regional stores.

use std::collections::BTreeMap;

use meridian_core::{RegionId, Secret};

use crate::config::raw::{Config, QueueBackendKind};
use crate::config::settings::RegionSettings;

/// What `[node]` and `[catalog]` resolve to.
pub(super) struct NodePart {
    pub home_region: Option<RegionId>,
    pub default_region: Option<RegionId>,
    pub served_regions: Vec<RegionId>,
    pub catalog_url: String,
    pub warnings: Vec<String>,
}

/// Resolves the node's regions and catalog; gives each region its default store on an embedded
/// catalog.
pub(super) fn validate_node(
    config: &Config,
    regions: &mut BTreeMap<RegionId, RegionSettings>,
    problems: &mut Vec<String>,
) -> NodePart {
    let data_dir = config.node.data_dir.clone();
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
        config.node.home_region(&config.default_region),
        "node.region",
        problems,
    );
    let default_region = known(&config.default_region, "default_region", problems);
    let catalog_url = config
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
    match &config.catalog.hash_key {
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
    let is_cluster_node = catalog_is_shared || config.node.region.is_some();
    let served_regions: Vec<RegionId> = if !config.node.serve_regions.is_empty() {
        config
            .node
            .serve_regions
            .iter()
            .filter_map(|id| known(id, "node.serve_regions entry", problems))
            .collect()
    } else if is_cluster_node {
        home_region.iter().cloned().collect()
    } else {
        regions.keys().cloned().collect()
    };
    if config.queue.backend == QueueBackendKind::Jetstream {
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
                config.node.home_region(&config.default_region)
            ));
    }
    NodePart {
        home_region,
        default_region,
        served_regions,
        catalog_url,
        warnings,
    }
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
        _ => std::path::PathBuf::from(file),
    };
    Some(match options {
        Some(options) => format!("sqlite://{}?{options}", store.display()),
        None => format!("sqlite://{}", store.display()),
    })
}
