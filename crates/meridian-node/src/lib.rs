//! What a Meridian node is and runs, without HTTP: its configuration ([`config`]), its assembly
//! (catalog, regional stores, key cache, and one [`region::Region`] per served region with its
//! queue and sinks), the background jobs on one leased-job loop ([`jobs`]), and the
//! [`tasks::Supervisor`] that owns every long-lived task. `meridian-server` puts HTTP on top.

pub mod config;

pub use config::{Config, ConfigError, Settings};
