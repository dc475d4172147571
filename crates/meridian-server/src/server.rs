//! Assembles a node: catalog, key cache, one queue and its sinks per served region, the HTTP
//! router; and takes it down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use meridian_archive::ArchiveSink;
use meridian_archive::customer::CustomerStores;
use meridian_archive::s3::GuardedS3Store;
use meridian_catalog::{Catalog, KeyCache, RegionalStores};
use meridian_core::{RegionId, Secret};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::auth::{JwtAuthority, load_or_create_secret};
use crate::config::Settings;
use crate::headers::{
    label_route, method_not_allowed_fallback, not_found_fallback, stamp_responses,
};
use crate::metrics::Metrics;
use crate::state::{AppState, AppStateInner};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open the catalog at {url}: {message}")]
    Catalog { url: String, message: String },
    #[error("cannot prepare the data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("cannot open the queue of region {region}: {message}")]
    Queue { region: String, message: String },
    #[error("cannot listen on {address}: {message}")]
    Listen { address: String, message: String },
    #[error("the HTTP server failed: {0}")]
    Serve(String),
}

/// Every route of the service, registered once: the router and the OpenAPI document read it.
/// A background job loop, boxed so that loops of different types share one supervisor list.
type BoxedJob = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// Starts a background job loop on the node's state, until the stop signal.
type StartJob = fn(AppState, watch::Receiver<bool>) -> BoxedJob;

pub fn api_routes() -> crate::routes::ApiRoutes {
    crate::ingest::routes()
        .merge(crate::admin::routes())
        .merge(crate::gdpr::routes())
        .merge(crate::replay::routes())
        .merge(crate::retention::routes())
        .merge(crate::migration::routes())
        .merge(crate::live::routes())
        .merge(crate::console::routes())
        .merge(crate::volume::routes())
        .merge(crate::ops::routes())
        .merge(crate::token_revocation::routes())
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
    runners: Vec<JoinHandle<()>>,
    drain: watch::Sender<bool>,
    stop_background: watch::Sender<bool>,
}

/// The global catalog, the regional stores of the served regions, and the key cache over both.
async fn open_catalog(
    settings: &Settings,
) -> Result<(Catalog, RegionalStores, Arc<KeyCache>), ServerError> {
    let failure = |message: String| ServerError::Catalog {
        url: settings.catalog_url_for_display(),
        message,
    };
    let catalog = tokio::time::timeout(
        Duration::from_secs(30),
        crate::catalog_key::connect_catalog(settings),
    )
    .await
    .map_err(|_| failure("timed out after 30 s".into()))?
    .map_err(failure)?;
    let stores = crate::regional_stores::open_regional_stores(settings, &catalog)
        .await
        .map_err(failure)?;
    let keys = KeyCache::load_from(catalog.clone(), stores.catalogs())
        .await
        .map_err(|error| failure(error.to_string()))?;
    Ok((catalog, stores, keys))
}

/// Retries uploading a region's spooled customer objects every `interval`.
async fn run_spool_drainer(
    sink: Arc<ArchiveSink>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
        sink.drain_spool().await;
    }
}

/// Checks every guarded bucket's location at start and then every `interval`.
async fn run_residency_guards(
    guards: Vec<Arc<GuardedS3Store>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        for guard in &guards {
            guard.check().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

impl RunningNode {
    /// Opens everything and binds the listener; nothing is served until [`RunningNode::serve`].
    pub async fn start(settings: Settings) -> Result<RunningNode, ServerError> {
        std::fs::create_dir_all(&settings.data_dir).map_err(|error| ServerError::DataDir {
            path: settings.data_dir.display().to_string(),
            message: error.to_string(),
        })?;
        // Only the service's user may enter the data directory (files an earlier version made
        // readable to others included).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&settings.data_dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|error| ServerError::DataDir {
                    path: settings.data_dir.display().to_string(),
                    message: format!("cannot make it private (0700): {error}"),
                })?;
        }
        let (jwt_secret, generated) = load_or_create_secret(
            settings.jwt_secret.as_ref().map(Secret::expose),
            &settings.data_dir,
        )
        .map_err(|error| ServerError::DataDir {
            path: settings.data_dir.display().to_string(),
            message: format!("jwt secret: {error}"),
        })?;
        if generated {
            warn!(path = %settings.data_dir.join("jwt_secret").display(), "no auth.jwt_secret configured: using the secret generated in the data dir (set MERIDIAN_JWT_SECRET for clusters)");
        }
        let (catalog, stores, keys) = open_catalog(&settings).await?;
        let node_id =
            load_or_create_node_id(&settings.data_dir).map_err(|error| ServerError::DataDir {
                path: settings.data_dir.display().to_string(),
                message: format!("node id: {error}"),
            })?;

        info!(node_id = %node_id, home_region = %settings.home_region, served_regions = ?settings.served_regions.iter().map(RegionId::as_str).collect::<Vec<_>>(), "node starting");
        let queue_encryption = match &settings.queue_key_file {
            Some(path) => Some(Arc::new(load_queue_keys(path)?)),
            None => None,
        };
        let (drain, drain_receiver) = watch::channel(false);
        let customer_stores = Arc::new(CustomerStores::new(settings.customer_access.clone()));
        let regions = crate::region::assemble_served_regions(
            &settings,
            &keys,
            &customer_stores,
            queue_encryption.as_ref(),
            &node_id,
            &drain_receiver,
        )
        .await?;
        let crate::region::ServedRegions {
            queues,
            sink_handles,
            runners,
            guards,
            spool_drainers,
            region_services,
        } = regions;

        let (stop_background, stop_receiver) = watch::channel(false);
        if let (Some(path), Some(encryption)) = (&settings.queue_key_file, &queue_encryption) {
            tokio::spawn(reload_queue_keys_on_hangup(
                path.clone(),
                Arc::clone(encryption),
                stop_receiver.clone(),
            ));
        }
        for archive_sink in spool_drainers {
            tokio::spawn(run_spool_drainer(
                archive_sink,
                settings.spool_retry,
                stop_receiver.clone(),
            ));
        }
        if !guards.is_empty() {
            tokio::spawn(run_residency_guards(
                guards,
                settings.location_check_interval,
                stop_receiver.clone(),
            ));
        }
        tokio::spawn(
            Arc::clone(&keys).run_refresher(settings.catalog_refresh_interval, stop_receiver),
        );

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
                let certificate =
                    crate::tls::ReloadingCertificate::load(&tls.cert_path, &tls.key_path).map_err(
                        |error| ServerError::Listen {
                            address: tls.listen.to_string(),
                            message: error.to_string(),
                        },
                    )?;
                let config =
                    crate::tls::server_config(Arc::clone(&certificate)).map_err(|error| {
                        ServerError::Listen {
                            address: tls.listen.to_string(),
                            message: error.to_string(),
                        }
                    })?;
                tokio::spawn(certificate.watch(tls.reload_check, stop_background.subscribe()));
                Some((
                    bind(tls.listen).await?,
                    tokio_rustls::TlsAcceptor::from(config),
                ))
            }
            None => None,
        };
        let token_rules = settings.token_rules();
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let state = AppState::new(AppStateInner {
            settings: Arc::clone(&settings),
            catalog,
            stores,
            keys,
            queues: Arc::new(queues),
            metrics: Arc::clone(&metrics),
            jwt: Arc::new(JwtAuthority::new(&jwt_secret, token_rules)),
            sinks: Arc::new(sink_handles),
            customer_stores,
            region_services: Arc::new(region_services),
            node_id: node_id.clone(),
            deletion_requested: Arc::new(tokio::sync::Notify::new()),
            replay_requested: Arc::new(tokio::sync::Notify::new()),
            retention_changed: Arc::new(tokio::sync::Notify::new()),
            migration_requested: Arc::new(tokio::sync::Notify::new()),
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
                metrics,
            ),
            live_streams: Arc::new(tokio::sync::Semaphore::new(settings.max_live_streams)),
        });
        for region in state.queues.keys() {
            state.metrics.initialize_region(region.as_str());
        }
        let supervised_jobs: [(&'static str, StartJob); 4] = [
            ("gdpr-deletions", |state, stop| {
                Box::pin(crate::gdpr::run_deletion_executor(state, stop))
            }),
            ("replays", |state, stop| {
                Box::pin(crate::replay::run_replay_executor(state, stop))
            }),
            ("retention", |state, stop| {
                Box::pin(crate::retention::run_retention_janitor(state, stop))
            }),
            ("migrations", |state, stop| {
                Box::pin(crate::migration::run_migration_executor(state, stop))
            }),
        ];
        for (job, run) in supervised_jobs {
            let job_state = state.clone();
            crate::background::supervise(
                job,
                Arc::clone(&state.metrics),
                stop_background.subscribe(),
                move |stop| run(job_state.clone(), stop),
            );
        }
        Ok(RunningNode {
            state,
            listener,
            tls_listener,
            runners,
            drain,
            stop_background,
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

    /// Serves until `shutdown` completes, then drains: stops accepting, finishes requests in
    /// flight, flushes every queue to its sinks within the shutdown timeout, closes the queues.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let RunningNode {
            state,
            listener,
            tls_listener,
            runners,
            drain,
            stop_background,
        } = self;
        let settings = Arc::clone(&state.settings);
        let app = router(state.clone());
        let (stop_listening, listening) = watch::channel(false);
        let limits = settings.connection_limits.clone();
        let mut listeners = Vec::new();
        if let Some(listener) = listener {
            listeners.push(tokio::spawn(crate::listener::serve(
                listener,
                app.clone(),
                None,
                limits.clone(),
                Arc::clone(&state.connections),
                listening.clone(),
                settings.shutdown_timeout,
            )));
        }
        if let Some((listener, acceptor)) = tls_listener {
            listeners.push(tokio::spawn(crate::listener::serve(
                listener,
                app,
                Some(acceptor),
                limits,
                Arc::clone(&state.connections),
                listening,
                settings.shutdown_timeout,
            )));
        }

        shutdown.await;
        info!(
            timeout_secs = settings.shutdown_timeout.as_secs(),
            "shutting down: finishing requests in flight and flushing queues"
        );
        let deadline = tokio::time::Instant::now() + settings.shutdown_timeout;
        let _ = stop_listening.send(true);
        for listener in listeners {
            if tokio::time::timeout_at(deadline, listener).await.is_err() {
                warn!("requests still in flight at the shutdown deadline were cut off");
            }
        }
        let _ = drain.send(true);
        for runner in runners {
            if tokio::time::timeout_at(deadline, runner).await.is_err() {
                warn!(
                    "a sink did not finish flushing before the shutdown deadline; its backlog stays queued for the next start"
                );
                break;
            }
        }
        let _ = stop_background.send(true);
        let queues = Arc::clone(&state.queues);
        let _ = tokio::task::spawn_blocking(move || {
            for queue in queues.values() {
                queue.close();
            }
        })
        .await;
        for store in state.stores.stores() {
            if !store.is_global {
                store.catalog.close().await;
            }
        }
        state.catalog.close().await;
        info!("shutdown complete");
        Ok(())
    }
}

/// The queue's encryption keys as configured (`None`: records are not encrypted).
pub fn load_queue_encryption(
    settings: &Settings,
) -> Result<Option<meridian_queue::encryption::QueueEncryption>, String> {
    settings
        .queue_key_file
        .as_deref()
        .map(load_queue_keys)
        .transpose()
        .map_err(|error| error.to_string())
}

fn load_queue_keys(
    path: &std::path::Path,
) -> Result<meridian_queue::encryption::QueueEncryption, ServerError> {
    let failure = |message: String| ServerError::DataDir {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|error| failure(format!("queue key file: {error}")))?;
    let keyring = meridian_queue::encryption::parse_key_file(&text)
        .map_err(|error| failure(error.to_string()))?;
    info!(key_file = %path.display(), active_key = keyring.active_key_id(), "queue records are encrypted at rest");
    Ok(meridian_queue::encryption::QueueEncryption::new(keyring))
}

/// Re-reads the queue key file on SIGHUP (key rotation without downtime).
async fn reload_queue_keys_on_hangup(
    path: std::path::PathBuf,
    encryption: Arc<meridian_queue::encryption::QueueEncryption>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    loop {
        tokio::select! {
            _ = hangups.recv() => {
                match std::fs::read_to_string(&path).map_err(|error| error.to_string()).and_then(|text| {
                    meridian_queue::encryption::parse_key_file(&text).map_err(|error| error.to_string())
                }) {
                    Ok(keyring) => {
                        info!(active_key = keyring.active_key_id(), "queue key file reloaded");
                        encryption.replace_keyring(keyring);
                    }
                    Err(error) => error!(%error, "queue key file reload failed; keeping the current keys"),
                }
            }
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// This node's identity, kept in `<data_dir>/node_id` so that a restarted node resumes the work
/// it had leased (GDPR deletions) without waiting for its leases to lapse.
fn load_or_create_node_id(data_dir: &std::path::Path) -> std::io::Result<String> {
    let path = data_dir.join("node_id");
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_string()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let node_id = format!("node-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &node_id)?;
    Ok(node_id)
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
