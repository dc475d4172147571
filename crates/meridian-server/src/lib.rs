#![recursion_limit = "512"]
//! The HTTP face of a Meridian node: the Segment-compatible ingest API, the admin API, the
//! operations routes, the console, the listeners and TLS, over [`meridian_node::Node`] (which
//! knows everything else). Only this crate knows HTTP.

pub mod admin;
pub mod auth;
pub mod console;
pub mod edge;
pub mod error;
pub mod headers;
pub mod ingest;
pub mod listener;
pub mod live;
pub mod openapi;
pub mod ops;
pub mod rate_limit;
pub mod routes;
pub mod server;
pub mod state;
pub mod tls;

pub use meridian_node::config;
pub use meridian_node::config::{Config, ConfigError, Settings};
pub use server::{RunningNode, ServerError, termination_signal};
