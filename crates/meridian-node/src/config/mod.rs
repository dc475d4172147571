//! The one typed configuration: embedded defaults (`config/meridian.toml`), a TOML file merged
//! over them, environment overrides, then validation ([`validate`]) into [`Settings`] with clear
//! messages. [`raw`] is the file as written; [`settings`] what the rest of the node reads.

mod raw;
mod settings;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use meridian_core::Secret;

pub use raw::*;
pub use settings::*;

/// The embedded defaults, also the documentation of every key.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../../../../config/meridian.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: String, message: String },
    #[error("config is not valid TOML or has unknown/mistyped keys: {0}")]
    Parse(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
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
}
