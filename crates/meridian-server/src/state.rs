//! What every handler shares: the node (everything that is not HTTP) and the HTTP parts.

use std::sync::Arc;

use meridian_node::Node;

/// Shared by every handler; one `Arc`, so cloning it per request is one atomic increment.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppStateInner>,
}

impl AppState {
    pub fn new(node: Arc<Node>, http: HttpParts) -> AppState {
        AppState {
            inner: Arc::new(AppStateInner { node, http }),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.inner
    }
}

pub struct AppStateInner {
    pub node: Arc<Node>,
    pub http: HttpParts,
}

/// What only the HTTP side holds: token checks, the live feeds, and the edge's limits.
pub struct HttpParts {
    pub jwt: Arc<crate::auth::JwtAuthority>,
    /// The live event debugger's feeds (projects somebody watches on this node).
    pub live: Arc<crate::live::LiveHub>,
    pub rate_limiter: Arc<crate::rate_limit::RateLimiter>,
    /// Requests handled at once; beyond, 503.
    pub request_slots: Arc<tokio::sync::Semaphore>,
    /// Requests in flight per client address; beyond, 429.
    pub requests_per_address: Arc<crate::edge::AddressCounters>,
    /// Bytes of request bodies in memory at once, and each sender's share; beyond, 503.
    pub body_budgets: Arc<crate::edge::BodyBudgets>,
    /// Connections open, node-wide and per client address (the listeners' gate).
    pub connections: Arc<crate::listener::ConnectionGate>,
    /// Live event streams open at once; beyond, 503.
    pub live_streams: Arc<tokio::sync::Semaphore>,
}
