//! What a Meridian node is and runs, without HTTP: its configuration ([`config`]), its assembly
//! ([`node::Node`]: catalog, regional stores, key cache, and one [`region::Region`] per served
//! region with its queue and sinks), the background jobs on one leased-job loop ([`jobs`]), and
//! the [`tasks::Supervisor`] that owns every long-lived task. `meridian-server` puts HTTP on top.

pub mod catalog_key;
pub mod config;
pub mod error;
pub mod jobs;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod project_archive;
pub mod region;
pub mod regional_stores;
pub mod residency;
pub mod secret_file;
pub mod tasks;

pub use config::{Config, ConfigError, Settings};
pub use error::{NodeError, StepError};
pub use node::Node;
