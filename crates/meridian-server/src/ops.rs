//! Operations routes: `/healthz`, `/readyz`, `/metrics`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use meridian_core::timestamp::now_unix_ms;
use serde_json::json;

use crate::routes::ApiRoutes;
use crate::state::AppState;
use meridian_node::metrics::{TextWriter, process_figures};
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
    let mut output = String::with_capacity(16 * 1024);
    state.node.metrics.encode_registry(&mut output);
    let mut writer = TextWriter::new(&mut output);

    writer.declare(
        "queue_bytes",
        "gauge",
        "Bytes of queue segments on disk, by region",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_bytes",
            &[("region", region.as_str())],
            queue.stats().disk_bytes as f64,
        );
    }
    writer.declare(
        "queue_disk_budget_bytes",
        "gauge",
        "Disk budget of the region's queue",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_disk_budget_bytes",
            &[("region", region.as_str())],
            queue.stats().disk_budget_bytes as f64,
        );
    }
    writer.declare(
        "queue_pending_records",
        "gauge",
        "Records not yet delivered by the slowest sink, by region",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_pending_records",
            &[("region", region.as_str())],
            queue.stats().pending_records() as f64,
        );
    }
    writer.declare(
        "queue_appended_records_total",
        "counter",
        "Records ever appended to the region's queue",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_appended_records_total",
            &[("region", region.as_str())],
            queue.stats().end_offset as f64,
        );
    }
    writer.declare(
        "queue_syncs_total",
        "counter",
        "fdatasync calls of the region's queue writer (group commit)",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_syncs_total",
            &[("region", region.as_str())],
            queue.stats().sync_count as f64,
        );
    }
    let (full_reloads, incremental_refreshes) = state.node.keys.reload_counts();
    writer.declare(
        "key_cache_reloads_total",
        "counter",
        "Key cache reloads from the catalog: full (start, many changes, the ten-minute safety net) or incremental (only the projects changed)",
    );
    writer.sample(
        "key_cache_reloads_total",
        &[("kind", "full")],
        full_reloads as f64,
    );
    writer.sample(
        "key_cache_reloads_total",
        &[("kind", "incremental")],
        incremental_refreshes as f64,
    );
    writer.declare(
        "body_budget_available_bytes",
        "gauge",
        "Bytes of the node's request body budget not held by requests in flight",
    );
    writer.sample(
        "body_budget_available_bytes",
        &[],
        state.http.body_budgets.node_available() as f64,
    );
    writer.declare(
        "anonymous_body_budget_available_bytes",
        "gauge",
        "Bytes of the keyless requests' share of the body budget not held now",
    );
    writer.sample(
        "anonymous_body_budget_available_bytes",
        &[],
        state.http.body_budgets.anonymous_available() as f64,
    );
    writer.declare(
        "open_connections",
        "gauge",
        "Connections open on the node, over every listener",
    );
    writer.sample(
        "open_connections",
        &[],
        state.http.connections.open_connections() as f64,
    );
    writer.declare(
        "connected_addresses",
        "gauge",
        "Client addresses (IPv6: /64 prefixes) holding a connection now",
    );
    writer.sample(
        "connected_addresses",
        &[],
        state.http.connections.connected_addresses() as f64,
    );
    writer.declare(
        "live_streams",
        "gauge",
        "Live event streams open on the node",
    );
    writer.sample(
        "live_streams",
        &[],
        (state.node.settings.max_live_streams - state.http.live_streams.available_permits()) as f64,
    );
    writer.declare(
        "queue_abandoned_appends_total",
        "counter",
        "Appends the queue dropped unwritten because their request had given up (timeout, client gone)",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_abandoned_appends_total",
            &[("region", region.as_str())],
            queue.stats().abandoned_appends as f64,
        );
    }
    writer.declare(
        "queue_damaged_records_total",
        "counter",
        "Queued records lost to damaged segment bytes (their bytes are quarantined; every intact record around them is kept)",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_damaged_records_total",
            &[("region", region.as_str())],
            queue.stats().damaged_records as f64,
        );
    }
    writer.declare(
        "queue_quarantined_bytes_total",
        "counter",
        "Damaged queue segment bytes copied to the queue's quarantine directory",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_quarantined_bytes_total",
            &[("region", region.as_str())],
            queue.stats().quarantined_bytes as f64,
        );
    }
    writer.declare(
        "queue_disk_free_bytes",
        "gauge",
        "Free bytes on the filesystem of the region's queue (appends are refused below queue.min_free_disk_bytes)",
    );
    for (region, queue) in state.node.queues() {
        if let Some(free_bytes) = queue.disk_free_bytes() {
            writer.sample(
                "queue_disk_free_bytes",
                &[("region", region.as_str())],
                free_bytes as f64,
            );
        }
    }
    writer.declare(
        "queue_writable",
        "gauge",
        "1 when the region's queue accepts appends",
    );
    for (region, queue) in state.node.queues() {
        writer.sample(
            "queue_writable",
            &[("region", region.as_str())],
            if queue.is_writable() { 1.0 } else { 0.0 },
        );
    }

    let mut backend_samples: std::collections::BTreeMap<
        &'static str,
        Vec<(&str, meridian_queue::BackendSample)>,
    > = Default::default();
    for (region, queue) in state.node.queues() {
        for sample in queue.backend_samples() {
            backend_samples
                .entry(sample.name)
                .or_default()
                .push((region.as_str(), sample));
        }
    }
    for (name, samples) in &backend_samples {
        let Some((_, first)) = samples.first() else {
            continue;
        };
        writer.declare(name, first.kind, first.help);
        for (region, sample) in samples {
            let mut labels: Vec<(&str, &str)> = vec![("region", region)];
            labels.extend(
                sample
                    .labels
                    .iter()
                    .map(|(key, value)| (*key, value.as_str())),
            );
            writer.sample(name, &labels, sample.value);
        }
    }

    let now_ms = now_unix_ms();
    type ReadFigure = fn(&meridian_queue::DeliveryStatus) -> f64;
    let sink_counters: [(&str, &str, ReadFigure); 6] = [
        (
            "sink_delivered_records_total",
            "Records delivered to the sink",
            |s| s.delivered_records.load(Ordering::Relaxed) as f64,
        ),
        (
            "sink_delivered_batches_total",
            "Batches delivered to the sink",
            |s| s.delivered_batches.load(Ordering::Relaxed) as f64,
        ),
        (
            "sink_delivered_bytes_total",
            "Payload bytes delivered to the sink",
            |s| s.delivered_bytes.load(Ordering::Relaxed) as f64,
        ),
        (
            "sink_failed_attempts_total",
            "Failed delivery attempts (each retried)",
            |s| s.failed_attempts.load(Ordering::Relaxed) as f64,
        ),
        (
            "sink_runner_restarts_total",
            "Times the sink's runner was restarted by its supervisor after a failure",
            |s| s.restarts.load(Ordering::Relaxed) as f64,
        ),
        (
            "sink_skipped_corrupt_records_total",
            "Records skipped because their queue segment was corrupt",
            |s| s.skipped_corrupt_records.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, help, read) in sink_counters {
        writer.declare(name, "counter", help);
        for sink in state.node.sinks() {
            writer.sample(name, &sink.labels(), read(&sink.status));
        }
    }
    writer.declare(
        "sink_delivery_seconds_total",
        "counter",
        "Time spent in successful deliveries",
    );
    for sink in state.node.sinks() {
        let seconds = sink.status.delivery_micros.load(Ordering::Relaxed) as f64 / 1e6;
        writer.sample("sink_delivery_seconds_total", &sink.labels(), seconds);
    }
    writer.declare(
        "sink_healthy",
        "gauge",
        "0 when the sink needs an operator (e.g. its bucket is in another region)",
    );
    for sink in state
        .node
        .sinks()
        .filter(|sink| sink.reports_sink_figures())
    {
        let healthy = if sink.implementation.health().is_none() {
            1.0
        } else {
            0.0
        };
        writer.sample("sink_healthy", &sink.sink_labels(), healthy);
    }
    let runner_gauges: [(&str, &str, ReadFigure); 3] = [
        (
            "sink_runner_up",
            "1 while the sink's runner runs; 0 while it is down after a failure, waiting to restart",
            |s| f64::from(u8::from(s.runner_failure().is_none())),
        ),
        (
            "sink_standby",
            "1 while the runner waits for the right to deliver its partition (another node of the region delivers it)",
            |s| f64::from(u8::from(s.standby.load(Ordering::Relaxed))),
        ),
        (
            "sink_consecutive_failures",
            "Failed attempts since the sink's last success",
            |s| s.consecutive_failures.load(Ordering::Relaxed) as f64,
        ),
    ];
    for (name, help, read) in runner_gauges {
        writer.declare(name, "gauge", help);
        for sink in state.node.sinks() {
            writer.sample(name, &sink.labels(), read(&sink.status));
        }
    }
    writer.declare(
        "sink_lag_seconds",
        "gauge",
        "Age of the oldest record the sink has read but not yet delivered",
    );
    for sink in state.node.sinks() {
        let since_ms = sink.status.oldest_pending_since_ms.load(Ordering::Relaxed);
        let lag = if since_ms > 0 {
            (now_ms - since_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        writer.sample("sink_lag_seconds", &sink.labels(), lag);
    }
    writer.declare(
        "sink_pending_records",
        "gauge",
        "Records appended but not yet delivered by this sink",
    );
    // A runner on standby (another node delivers its partition) has no backlog of its own.
    for sink in state
        .node
        .sinks()
        .filter(|sink| !sink.status.standby.load(Ordering::Relaxed))
    {
        let end = sink.log.durable_end();
        let position = sink.status.position.load(Ordering::Relaxed);
        writer.sample(
            "sink_pending_records",
            &sink.labels(),
            end.saturating_sub(position) as f64,
        );
    }

    let mut sink_specific: std::collections::BTreeMap<&'static str, Vec<(&SinkHandle, u64)>> =
        Default::default();
    for sink in state
        .node
        .sinks()
        .filter(|sink| sink.reports_sink_figures())
    {
        for (name, value) in sink.implementation.counters() {
            sink_specific.entry(name).or_default().push((sink, value));
        }
    }
    for (name, samples) in sink_specific {
        let metric = format!("sink_{name}_total");
        writer.declare(
            &metric,
            "counter",
            &format!("Sink counter: {}", name.replace('_', " ")),
        );
        for (sink, value) in samples {
            writer.sample(&metric, &sink.sink_labels(), value as f64);
        }
    }

    let mut sink_levels: std::collections::BTreeMap<&'static str, Vec<(&SinkHandle, u64)>> =
        Default::default();
    for sink in state
        .node
        .sinks()
        .filter(|sink| sink.reports_sink_figures())
    {
        for (name, value) in sink.implementation.gauges() {
            sink_levels.entry(name).or_default().push((sink, value));
        }
    }
    for (name, samples) in sink_levels {
        let metric = format!("sink_{name}");
        writer.declare(
            &metric,
            "gauge",
            &format!("Sink level: {}", name.replace('_', " ")),
        );
        for (sink, value) in samples {
            writer.sample(&metric, &sink.sink_labels(), value as f64);
        }
    }

    let (resident_bytes, open_fds) = process_figures();
    if let Some(resident_bytes) = resident_bytes {
        writer.declare(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the process",
        );
        writer.sample("process_resident_memory_bytes", &[], resident_bytes as f64);
    }
    if let Some(open_fds) = open_fds {
        writer.declare(
            "process_open_fds",
            "gauge",
            "Open file descriptors of the process",
        );
        writer.sample("process_open_fds", &[], open_fds as f64);
    }
    output.push_str("# EOF\n");
    let mut response = output.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
