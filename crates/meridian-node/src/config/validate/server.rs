//! `[server]` and `[auth]`: the listeners, TLS, the edge's limits and the tokens' secret.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::raw::Config;
use crate::config::settings::{Network, TlsSettings};

/// What `[server]` and `[auth]` resolve to (the rest is copied as it is).
pub(super) struct HttpPart {
    pub listen: Option<SocketAddr>,
    pub tls: Option<TlsSettings>,
    pub trusted_proxies: Arc<[Network]>,
}

pub(super) fn validate_http(config: &Config, problems: &mut Vec<String>) -> HttpPart {
    let listen = match config.server.listen.parse::<SocketAddr>() {
        Ok(address) => Some(address),
        Err(error) => {
            problems.push(format!(
                "server.listen `{}` is not host:port: {error}",
                config.server.listen
            ));
            None
        }
    };
    if let Some(url) = &config.server.public_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        problems.push(format!(
            "server.public_url `{url}` must start with http:// or https://"
        ));
    }
    if let Some(secret) = &config.auth.jwt_secret
        && secret.expose().len() < 32
    {
        problems.push("auth.jwt_secret must be at least 32 bytes long".to_string());
    }
    let tls = config
        .server
        .tls
        .as_ref()
        .and_then(|tls| match tls.listen.parse::<SocketAddr>() {
            Ok(address) => {
                for (what, path) in [("cert_path", &tls.cert_path), ("key_path", &tls.key_path)] {
                    if !path.exists() {
                        problems.push(format!(
                            "server.tls.{what} {} does not exist",
                            path.display()
                        ));
                    }
                }
                Some(TlsSettings {
                    listen: address,
                    cert_path: tls.cert_path.clone(),
                    key_path: tls.key_path.clone(),
                    reload_check: Duration::from_secs(tls.reload_check_secs.max(1)),
                })
            }
            Err(error) => {
                problems.push(format!(
                    "server.tls.listen `{}` is not host:port: {error}",
                    tls.listen
                ));
                None
            }
        });
    if !config.server.plain_http && config.server.tls.is_none() {
        problems.push("server.plain_http = false needs a [server.tls] listener".to_string());
    }
    if config.server.request_body_budget_bytes < config.limits.max_request_bytes {
        problems.push(format!(
                "server.request_body_budget_bytes ({}) must hold at least one request of limits.max_request_bytes ({})",
                config.server.request_body_budget_bytes, config.limits.max_request_bytes
            ));
    }
    if config.server.max_concurrent_requests == 0 {
        problems.push("server.max_concurrent_requests must be positive".to_string());
    }
    for (key, value) in [
        (
            "server.max_connections",
            config.server.max_connections as u64,
        ),
        (
            "server.max_connections_per_address",
            u64::from(config.server.max_connections_per_address),
        ),
        (
            "server.max_requests_per_address",
            u64::from(config.server.max_requests_per_address),
        ),
        (
            "server.max_concurrent_http2_streams",
            u64::from(config.server.max_concurrent_http2_streams),
        ),
    ] {
        if value == 0 {
            problems.push(format!("{key} must be positive"));
        }
    }
    for (key, value) in [
        (
            "server.anonymous_body_budget_bytes",
            config.server.anonymous_body_budget_bytes,
        ),
        (
            "server.project_body_budget_bytes",
            config.server.project_body_budget_bytes,
        ),
    ] {
        if value < config.limits.max_request_bytes {
            problems.push(format!(
                "{key} ({value}) must hold at least one request of limits.max_request_bytes ({})",
                config.limits.max_request_bytes
            ));
        }
    }
    let mut trusted_proxies = Vec::new();
    for entry in &config.server.trusted_proxies {
        match Network::parse(entry) {
                Some(network) => trusted_proxies.push(network),
                None => problems.push(format!(
                    "server.trusted_proxies: `{entry}` is not an address or a network (10.0.0.0/8, fd00::/8)"
                )),
            }
    }
    let trusted_proxies: Arc<[Network]> = trusted_proxies.into();
    HttpPart {
        listen,
        tls,
        trusted_proxies,
    }
}
