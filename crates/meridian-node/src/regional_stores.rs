//! Opens the regional stores of the regions this node serves (see
//! [`meridian_catalog::RegionalStores`]) and moves into them what an older, single-catalog
//! deployment kept in the global catalog. A node opens no other region's store.

use std::time::Duration;

use meridian_catalog::{Catalog, RegionalStore, RegionalStores, move_end_user_rows};
use meridian_core::{RegionId, redact_url};
use tracing::{info, warn};

use crate::config::Settings;
use crate::error::NodeError;

/// How long connecting to (and migrating) one store may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The stores of the served regions, each opened once, with what the global catalog still kept
/// of them moved in (a node's start).
pub async fn open_regional_stores(
    settings: &Settings,
    global: &Catalog,
) -> Result<RegionalStores, NodeError> {
    let stores = connect_regional_stores(settings, global, &settings.served_regions).await?;
    move_into_regional_stores(global, &stores).await?;
    Ok(stores)
}

/// The stores of `regions`, each opened once (regions configured with the same URL share it; a
/// region without a store of its own uses `global`); nothing is moved (tools).
pub async fn connect_regional_stores(
    settings: &Settings,
    global: &Catalog,
    regions: &[RegionId],
) -> Result<RegionalStores, NodeError> {
    let mut stores: Vec<(Option<String>, RegionalStore)> = Vec::new();
    for region in regions {
        let url = settings
            .regions
            .get(region)
            .and_then(|region_settings| region_settings.store_url.as_ref())
            .map(|url| url.expose().to_string())
            .filter(|url| url != settings.catalog_url.expose());
        if let Some((_, store)) = stores.iter_mut().find(|(known, _)| *known == url) {
            store.regions.push(region.clone());
            continue;
        }
        let store = match &url {
            None => {
                warn!(region = %region, "no regional store configured: the region's suppressions, deletions and replays are kept in the global catalog");
                RegionalStore {
                    catalog: global.clone(),
                    regions: vec![region.clone()],
                    is_global: true,
                    display_url: settings.catalog_url_for_display(),
                }
            }
            Some(url) => RegionalStore {
                catalog: connect(url, region, global).await?,
                regions: vec![region.clone()],
                is_global: false,
                display_url: redact_url(url),
            },
        };
        stores.push((url, store));
    }
    Ok(RegionalStores::new(
        stores.into_iter().map(|(_, store)| store).collect(),
    ))
}

/// Moves into each regional store what the global catalog kept of its regions (see
/// [`move_end_user_rows`]).
async fn move_into_regional_stores(
    global: &Catalog,
    stores: &RegionalStores,
) -> Result<(), NodeError> {
    for store in stores.stores() {
        let failure = |message: String| NodeError::Catalog {
            url: store.display_url.clone(),
            message,
        };
        let moved =
            tokio::time::timeout(Duration::from_secs(600), move_end_user_rows(global, store))
                .await
                .map_err(|_| {
                    failure("moving end-user rows into the regional store timed out".into())
                })?
                .map_err(|error| {
                    failure(format!(
                        "cannot move end-user rows into the regional store: {error}"
                    ))
                })?;
        let total: u64 = moved.iter().map(|(_, count)| count).sum();
        if total > 0 {
            info!(store = %store.display_url, regions = ?store.region_names(), ?moved, "end-user rows of the global catalog moved into their regional store");
        }
    }
    Ok(())
}

async fn connect(url: &str, region: &RegionId, global: &Catalog) -> Result<Catalog, NodeError> {
    let failure = |message: String| NodeError::Catalog {
        url: redact_url(url),
        message: format!("the regional store of {region}: {}", redact_url(&message)),
    };
    tokio::time::timeout(CONNECT_TIMEOUT, Catalog::connect(url, global.key().clone()))
        .await
        .map_err(|_| failure(format!("timed out after {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|error| failure(error.to_string()))
}
