#![recursion_limit = "512"]
//! The HTTP face of Meridian: the Segment-compatible ingest API, the admin API, operations
//! routes, configuration, and the assembly of a running node. Only this crate knows HTTP.

pub mod admin;
pub mod audit_log;
pub mod auth;
pub mod background;
pub mod catalog_key;
pub mod console;
pub mod edge;
pub mod error;
pub mod gdpr;
pub mod headers;
pub mod ingest;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod migration;
pub mod openapi;
pub mod ops;
pub mod project_archive;
pub mod rate_limit;
pub mod region;
pub mod regional_stores;
pub mod replay;
pub mod residency;
pub mod retention;
pub mod routes;
pub mod secret_file;
pub mod server;
pub mod state;
pub mod tls;
pub mod token_revocation;
pub mod volume;

pub use meridian_node::config;
pub use meridian_node::config::{Config, ConfigError, Settings};
pub use server::{RunningNode, ServerError, termination_signal};
