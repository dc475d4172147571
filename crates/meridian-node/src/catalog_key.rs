//! The catalog's hash key (see [`meridian_catalog::keyed_hash`]): from the configuration, or for
//! the embedded catalog from `<data_dir>/catalog_hash_key`, created on first start.

use std::path::{Path, PathBuf};

use meridian_catalog::{Actor, Catalog, CatalogKey};
use tracing::{info, warn};

use crate::config::Settings;
use crate::error::NodeError;

/// The name of the file, in the data directory, that holds a generated key.
const KEY_FILE_NAME: &str = "catalog_hash_key";

/// The file that holds a generated key.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_FILE_NAME)
}

/// The key, and whether it was created just now (the catalog then cannot hold anything written
/// with it yet).
pub fn load_catalog_key(settings: &Settings) -> Result<(CatalogKey, bool), NodeError> {
    if let Some(configured) = &settings.catalog_hash_key {
        let key = CatalogKey::from_bytes(configured.expose().as_bytes()).ok_or_else(|| {
            NodeError::CatalogKey("catalog.hash_key is too short (at least 32 bytes)".to_string())
        })?;
        return Ok((key, false));
    }
    let path = key_file(&settings.data_dir);
    let (text, created) = crate::secret_file::read_or_create(&settings.data_dir, KEY_FILE_NAME)
        .map_err(|error| {
            NodeError::CatalogKey(format!("cannot read or create {}: {error}", path.display()))
        })?;
    let key = CatalogKey::from_bytes(text.as_bytes()).ok_or_else(|| {
        NodeError::CatalogKey(format!(
            "{} holds no valid key (at least 32 bytes)",
            path.display()
        ))
    })?;
    Ok((key, created))
}

/// Loads (or creates) the key, connects and migrates the catalog. When the key was created just
/// now, nothing in the catalog can have been written with it, so an audit log found there predates
/// keyed hashes (a database writer cannot cause this): it is anchored. Otherwise an unanchored log
/// is reported, for an operator to anchor (`meridian audit anchor`).
pub async fn connect_catalog(settings: &Settings) -> Result<Catalog, NodeError> {
    let failure = |error: meridian_catalog::CatalogError| NodeError::Catalog {
        url: settings.catalog_url_for_display(),
        message: meridian_core::redact_url(&error.to_string()),
    };
    let (key, key_created) = load_catalog_key(settings)?;
    let catalog = Catalog::connect(settings.catalog_url.expose(), key)
        .await
        .map_err(failure)?;
    let anchored = catalog.audit_chain_is_anchored().await.map_err(failure)?;
    if !anchored && key_created {
        let outcome = catalog
            .anchor_audit_chain(&Actor::system("catalog-key-created"))
            .await
            .map_err(failure)?;
        info!(?outcome, "audit log anchored with the new catalog key");
    } else if !anchored {
        warn!(
            "the audit log predates keyed hashes and is not anchored: `meridian audit verify` fails until an operator who trusts it runs `meridian audit anchor`"
        );
    }
    Ok(catalog)
}
