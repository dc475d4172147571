//! Operations routes: `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::routes::ApiRoutes;
use crate::state::AppState;
use meridian_node::metrics::{Figures, process_figures};
use meridian_node::region::SinkHandle;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(Method::GET, "/healthz", healthz)
        .add(Method::GET, "/readyz", readyz)
        .add(Method::GET, "/admin/node/status", node_status)
        .add(Method::GET, "/metrics", metrics)
}

/// Alive, with this node's identity and the queue incarnation of each served region (so an
/// operator can tell the nodes of a region, and the lives of their queues, apart).
async fn healthz(State(state): State<AppState>) -> Response {
    let queues: serde_json::Map<String, serde_json::Value> = state
        .node
        .queues()
        .map(|(region, queue)| {
            (
                region.to_string(),
                json!({"backend": queue.kind(), "incarnation": queue.identity()}),
            )
        })
        .collect();
    axum::Json(json!({"status": "ok", "node_id": state.node.node_id, "queues": queues}))
        .into_response()
}

/// Why a sink of a served region keeps the node from being ready: its runner is down after a
/// failure (it restarts with backoff), or the sink needs an operator (e.g. a residency mismatch).
fn sink_problem(sink: &SinkHandle) -> Option<String> {
    if let Some(failure) = sink.status.runner_failure() {
        return Some(format!(
            "the {} sink runner of region {} failed and is restarting ({} restarts so far): {failure}",
            sink.sink,
            sink.region,
            sink.status.restarts.load(Ordering::Relaxed)
        ));
    }
    sink.implementation.health()
}

/// Ready when the catalog snapshot is loaded, every served region's queue is writable and every
/// sink's runner is running and healthy. For anyone (load balancers): ready or not, and which part
/// fails — never an error text, a host or a bucket; those are in [`node_status`] (platform token)
/// and in `/metrics`.
async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = Readiness::of(&state);
    let regions: serde_json::Map<String, serde_json::Value> = readiness
        .regions
        .iter()
        .map(|region| {
            let sinks: Vec<_> = region
                .sinks
                .iter()
                .map(|sink| {
                    json!({
                        "sink": sink.handle.sink,
                        "partition": sink.handle.partition,
                        "running": sink.running,
                        "healthy": sink.problem.is_none(),
                    })
                })
                .collect();
            (
                region.region.to_string(),
                json!({"queue_writable": region.queue_writable, "sinks": sinks}),
            )
        })
        .collect();
    let body = json!({
        "ready": readiness.is_ready(),
        "failing": readiness.failing_parts(),
        "degraded": readiness.degraded_parts(),
        "regions": regions,
    });
    readiness.respond(body)
}

/// The node's state in detail, for operators (platform token): queue figures, each sink's
/// position, restarts, last error (URLs redacted) and why it is unhealthy.
async fn node_status(
    State(state): State<AppState>,
    crate::auth::AdminAuth(claims): crate::auth::AdminAuth,
) -> Result<Response, crate::error::ApiError> {
    if claims.role != crate::auth::Role::Platform {
        return Err(crate::error::ApiError::forbidden(
            "the node's status needs a platform token (role: platform)",
        ));
    }
    let readiness = Readiness::of(&state);
    let mut regions = serde_json::Map::new();
    for region in &readiness.regions {
        let Some(queue) = state.node.queue(&region.region) else {
            continue;
        };
        let stats = queue.stats();
        let sinks: Vec<_> = region
            .sinks
            .iter()
            .map(|sink| {
                let status = &sink.handle.status;
                json!({
                    "sink": sink.handle.sink,
                    "partition": sink.handle.partition,
                    "standby": status.standby.load(Ordering::Relaxed),
                    "running": sink.running,
                    "restarts": status.restarts.load(Ordering::Relaxed),
                    "position": status.position.load(Ordering::Relaxed),
                    "last_error": status.last_error().map(|error| meridian_core::redact_url(&error)),
                    "problem": sink.problem.as_deref().map(meridian_core::redact_url),
                })
            })
            .collect();
        regions.insert(
            region.region.to_string(),
            json!({
                "queue_backend": queue.kind(),
                "queue_writable": region.queue_writable,
                "queue_incarnation": stats.incarnation,
                "queue_bytes": stats.disk_bytes,
                "disk_budget_bytes": stats.disk_budget_bytes,
                "disk_free_bytes": queue.disk_free_bytes(),
                "pending_records": stats.pending_records(),
                "broken": stats.broken,
                "sinks": sinks,
            }),
        );
    }
    let body = json!({
        "ready": readiness.is_ready(),
        "failing": readiness.failing_parts(),
        "degraded": readiness.degraded_parts(),
        "node_id": state.node.node_id,
        "catalog_version": state.node.keys.version(),
        "regions": regions,
    });
    Ok((StatusCode::OK, axum::Json(body)).into_response())
}

/// What readiness is made of, read once per request.
struct Readiness<'a> {
    catalog_loaded: bool,
    regions: Vec<RegionReadiness<'a>>,
    /// The node's tasks other than delivery runners that are down, waiting to start again:
    /// `(name, keeps the node from being ready)`.
    down_tasks: Vec<(String, bool)>,
}

/// Whether a task being down keeps the node from taking traffic: the queue's maintenance (a
/// replicated queue's writable flag) and the key cache's refresher (new keys, suppressions).
fn task_is_critical(name: &str) -> bool {
    name.starts_with("queue maintenance") || name == "key cache refresher"
}

struct RegionReadiness<'a> {
    region: meridian_core::RegionId,
    queue_writable: bool,
    sinks: Vec<SinkReadiness<'a>>,
}

struct SinkReadiness<'a> {
    handle: &'a SinkHandle,
    running: bool,
    problem: Option<String>,
}

impl<'a> Readiness<'a> {
    fn of(state: &'a AppState) -> Readiness<'a> {
        let regions = state
            .node
            .queues()
            .map(|(region, queue)| RegionReadiness {
                region: region.clone(),
                queue_writable: queue.is_writable(),
                sinks: state
                    .node
                    .sinks()
                    .filter(|sink| &sink.region == region)
                    .map(|handle| SinkReadiness {
                        handle,
                        running: handle.status.runner_failure().is_none()
                            && !state.node.supervisor.is_down(&handle.task),
                        problem: sink_problem(handle),
                    })
                    .collect(),
            })
            .collect();
        let runner_tasks: std::collections::BTreeSet<&str> =
            state.node.sinks().map(|sink| sink.task.as_str()).collect();
        let down_tasks = state
            .node
            .supervisor
            .down_tasks()
            .into_iter()
            .filter(|(name, _)| !runner_tasks.contains(name.as_str()))
            .map(|(name, _)| {
                let critical = task_is_critical(&name);
                (name, critical)
            })
            .collect();
        Readiness {
            catalog_loaded: state.node.keys.version() >= 0,
            regions,
            down_tasks,
        }
    }

    fn is_ready(&self) -> bool {
        self.catalog_loaded
            && self.down_tasks.iter().all(|(_, critical)| !critical)
            && self.regions.iter().all(|region| {
                region.queue_writable && region.sinks.iter().all(|sink| sink.problem.is_none())
            })
    }

    /// The failing parts, named by region and sink only.
    fn failing_parts(&self) -> Vec<String> {
        let mut failing = Vec::new();
        if !self.catalog_loaded {
            failing.push("catalog: not loaded".to_string());
        }
        for (name, _) in self.down_tasks.iter().filter(|(_, critical)| *critical) {
            failing.push(format!("{name}: not running (restarting)"));
        }
        for region in &self.regions {
            if !region.queue_writable {
                failing.push(format!("{} queue: not writable", region.region));
            }
            for sink in &region.sinks {
                let state = if !sink.running {
                    "not running (restarting)"
                } else if sink.problem.is_some() {
                    "unhealthy"
                } else {
                    continue;
                };
                failing.push(format!("{}: {state}", sink.handle.task));
            }
        }
        failing
    }

    /// Parts that fail without keeping the node from taking traffic: sinks whose deliveries keep
    /// failing (their data stays queued), named by region and sink only.
    fn degraded_parts(&self) -> Vec<String> {
        let mut degraded: Vec<String> = self
            .down_tasks
            .iter()
            .filter(|(_, critical)| !critical)
            .map(|(name, _)| format!("{name}: not running (restarting)"))
            .collect();
        for region in &self.regions {
            for sink in &region.sinks {
                let failures = sink
                    .handle
                    .status
                    .consecutive_failures
                    .load(Ordering::Relaxed);
                if sink.running && failures > 0 {
                    degraded.push(format!(
                        "{}: delivery failing ({failures} attempts in a row; the data stays queued)",
                        sink.handle.task
                    ));
                }
            }
        }
        degraded
    }

    fn respond(&self, body: serde_json::Value) -> Response {
        let ready = self.is_ready();
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let mut response = (status, axum::Json(body)).into_response();
        if !ready {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Reading /proc (a directory listing of every open descriptor) is blocking work.
    let (resident_bytes, open_fds) = tokio::task::spawn_blocking(process_figures)
        .await
        .unwrap_or((None, None));
    let mut figures = meridian_node::metrics::node_figures(&state.node);
    http_figures(&state, &mut figures);
    if let Some(resident_bytes) = resident_bytes {
        figures.declare(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the process",
        );
        figures.sample("process_resident_memory_bytes", &[], resident_bytes as f64);
    }
    if let Some(open_fds) = open_fds {
        figures.declare(
            "process_open_fds",
            "gauge",
            "Open file descriptors of the process",
        );
        figures.sample("process_open_fds", &[], open_fds as f64);
    }
    let mut response = state.node.metrics.encode_with(figures).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}

/// The edge's figures: body budgets, connections, live streams.
fn http_figures(state: &AppState, figures: &mut Figures) {
    figures.declare(
        "body_budget_available_bytes",
        "gauge",
        "Bytes of the node's request body budget not held by requests in flight",
    );
    figures.sample(
        "body_budget_available_bytes",
        &[],
        state.http.body_budgets.node_available() as f64,
    );
    figures.declare(
        "anonymous_body_budget_available_bytes",
        "gauge",
        "Bytes of the keyless requests' share of the body budget not held now",
    );
    figures.sample(
        "anonymous_body_budget_available_bytes",
        &[],
        state.http.body_budgets.anonymous_available() as f64,
    );
    figures.declare(
        "open_connections",
        "gauge",
        "Connections open on the node, over every listener",
    );
    figures.sample(
        "open_connections",
        &[],
        state.http.connections.open_connections() as f64,
    );
    figures.declare(
        "connected_addresses",
        "gauge",
        "Client addresses (IPv6: /64 prefixes) holding a connection now",
    );
    figures.sample(
        "connected_addresses",
        &[],
        state.http.connections.connected_addresses() as f64,
    );
    figures.declare(
        "live_streams",
        "gauge",
        "Live event streams open on the node",
    );
    figures.sample(
        "live_streams",
        &[],
        (state.node.settings.max_live_streams - state.http.live_streams.available_permits()) as f64,
    );
}
