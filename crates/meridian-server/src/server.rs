//! The HTTP server of a node: the router over every route, the listeners (plain and TLS) and a
//! graceful stop — stop accepting, finish the requests in flight, then stop the node
//! ([`meridian_node::Node::shutdown`]: its queues flushed to their sinks within the deadline).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use meridian_core::Secret;
use meridian_node::tasks::{Phase, RestartPolicy};
use meridian_node::{Node, NodeError, Settings};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::auth::{JwtAuthority, load_or_create_secret};
use crate::headers::{
    label_route, method_not_allowed_fallback, not_found_fallback, stamp_responses,
};
use crate::state::{AppState, HttpParts};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("the admin token secret in {path}: {message}")]
    Secret { path: String, message: String },
    #[error("cannot listen on {address}: {message}")]
    Listen { address: String, message: String },
}

/// Every route of the service, registered once: the router and the OpenAPI document read it.
pub fn api_routes() -> crate::routes::ApiRoutes {
    crate::ingest::routes()
        .merge(crate::admin::routes())
        .merge(crate::live::routes())
        .merge(crate::console::routes())
        .merge(crate::ops::routes())
}

pub fn router(state: AppState) -> Router {
    let routes = api_routes();
    let openapi = Arc::new(crate::openapi::document(&routes.registered()));
    routes
        .into_router()
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let openapi = Arc::clone(&openapi);
                async move { axum::Json((*openapi).clone()) }
            }),
        )
        .route_layer(axum::middleware::from_fn(label_route))
        .fallback(not_found_fallback)
        .method_not_allowed_fallback(method_not_allowed_fallback)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::headers::limit_requests,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            stamp_responses,
        ))
        .with_state(state)
}

/// A node that is listening and delivering; [`RunningNode::serve`] runs it until shutdown.
pub struct RunningNode {
    state: AppState,
    listener: Option<TcpListener>,
    tls_listener: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl RunningNode {
    /// Builds the node, binds the listeners and starts the node's tasks; nothing is served until
    /// [`RunningNode::serve`].
    pub async fn start(settings: Settings) -> Result<RunningNode, ServerError> {
        let secret_failure = |message: String| ServerError::Secret {
            path: settings.data_dir.join("jwt_secret").display().to_string(),
            message,
        };
        std::fs::create_dir_all(&settings.data_dir)
            .map_err(|error| secret_failure(error.to_string()))?;
        let (jwt_secret, generated) = load_or_create_secret(
            settings.jwt_secret.as_ref().map(Secret::expose),
            &settings.data_dir,
        )
        .map_err(|error| secret_failure(error.to_string()))?;
        if generated {
            warn!(path = %settings.data_dir.join("jwt_secret").display(), "no auth.jwt_secret configured: using the secret generated in the data dir (set MERIDIAN_JWT_SECRET for clusters)");
        }
        let (node, node_tasks) = Node::build(settings).await?;
        let node = Arc::new(node);
        let settings = Arc::clone(&node.settings);

        let backlog = settings.connection_limits.listen_backlog;
        let bind = |address: SocketAddr| async move {
            crate::listener::bind(address, backlog).map_err(|error| ServerError::Listen {
                address: address.to_string(),
                message: error.to_string(),
            })
        };
        let listener = match settings.listen {
            Some(address) => Some(bind(address).await?),
            None => None,
        };
        let tls_listener = match &settings.tls {
            Some(tls) => {
                let listen_failure = |message: String| ServerError::Listen {
                    address: tls.listen.to_string(),
                    message,
                };
                let certificate =
                    crate::tls::ReloadingCertificate::load(&tls.cert_path, &tls.key_path)
                        .map_err(|error| listen_failure(error.to_string()))?;
                let config = crate::tls::server_config(Arc::clone(&certificate))
                    .map_err(|error| listen_failure(error.to_string()))?;
                let reload_check = tls.reload_check;
                node.supervisor.spawn(
                    "tls certificate watcher",
                    Phase::Background,
                    RestartPolicy::default(),
                    move |context| {
                        let certificate = Arc::clone(&certificate);
                        async move {
                            certificate.watch(reload_check, context.stop_signal()).await;
                            Ok(())
                        }
                    },
                );
                Some((
                    bind(tls.listen).await?,
                    tokio_rustls::TlsAcceptor::from(config),
                ))
            }
            None => None,
        };
        let http = HttpParts {
            jwt: Arc::new(JwtAuthority::new(&jwt_secret, settings.token_rules())),
            live: Arc::new(crate::live::LiveHub::new(
                settings.live_subscribers_per_project,
                settings.live_events_per_second,
            )),
            rate_limiter: Arc::new(crate::rate_limit::RateLimiter::new(
                settings.default_rate_limit,
                settings.project_rate_limits.clone(),
            )),
            request_slots: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_requests,
            )),
            requests_per_address: crate::edge::AddressCounters::new(
                settings.max_requests_per_address,
            ),
            body_budgets: Arc::new(crate::edge::BodyBudgets::new(
                settings.request_body_budget_bytes,
                settings.anonymous_body_budget_bytes,
                settings.project_body_budget_bytes,
            )),
            connections: crate::listener::ConnectionGate::new(
                &settings.connection_limits,
                settings.home_region.as_str(),
                Arc::clone(&node.metrics),
            ),
            live_streams: Arc::new(tokio::sync::Semaphore::new(settings.max_live_streams)),
        };
        node.start(node_tasks);
        Ok(RunningNode {
            state: AppState::new(node, http),
            listener,
            tls_listener,
        })
    }

    /// The plain-HTTP listener's address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// The TLS listener's address.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_listener
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, then stops: stops accepting, finishes requests in flight,
    /// and stops the node (its queues flushed to their sinks) within the shutdown timeout.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let RunningNode {
            state,
            listener,
            tls_listener,
        } = self;
        let node = Arc::clone(&state.node);
        let settings = Arc::clone(&node.settings);
        let app = router(state.clone());
        let (stop_listening, listening) = watch::channel(false);
        let limits = settings.connection_limits.clone();
        // The accept loops run here, joined below: they end when the listeners stop.
        let mut accept_loops = Vec::new();
        if let Some(listener) = listener {
            accept_loops.push(crate::listener::serve(
                listener,
                app.clone(),
                None,
                limits.clone(),
                Arc::clone(&state.http.connections),
                listening.clone(),
                settings.shutdown_timeout,
            ));
        }
        if let Some((listener, acceptor)) = tls_listener {
            accept_loops.push(crate::listener::serve(
                listener,
                app,
                Some(acceptor),
                limits,
                Arc::clone(&state.http.connections),
                listening,
                settings.shutdown_timeout,
            ));
        }
        let accepting = futures_util::future::join_all(accept_loops);
        tokio::pin!(accepting);
        let listeners_ended = tokio::select! {
            _ = shutdown => false,
            _ = &mut accepting => true,
        };
        if listeners_ended {
            error!("the listeners stopped on their own; shutting down");
        }
        info!(
            timeout_secs = settings.shutdown_timeout.as_secs(),
            "shutting down: finishing requests in flight and flushing queues"
        );
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        let _ = stop_listening.send(true);
        if !listeners_ended
            && tokio::time::timeout_at(deadline, &mut accepting)
                .await
                .is_err()
        {
            warn!("requests still in flight at the shutdown deadline were cut off");
        }
        node.shutdown(deadline).await;
        info!("shutdown complete");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled: call it before serving, so that a SIGTERM arriving as soon as the node
/// answers is a graceful shutdown, never the default action (an exit without draining).
pub fn termination_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let terminate = async {
            match terminate {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(error) => {
                    error!(%error, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        let interrupt = async {
            match interrupt {
                Ok(mut stream) => {
                    stream.recv().await;
                }
                Err(error) => {
                    error!(%error, "cannot listen for SIGINT");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = terminate => info!("SIGTERM received"),
            _ = interrupt => info!("SIGINT received"),
        }
    }
}
