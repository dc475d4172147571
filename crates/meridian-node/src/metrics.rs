//! Prometheus metrics. Request and message counters live in a `prometheus-client` registry;
//! queue and sink figures are read from their live state at scrape time. Labels are low
//! cardinality: route templates, status codes, regions, sinks and reject codes, never project ids.

use std::fmt::Write;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatusLabels {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionLabels {
    region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionCodeLabels {
    region: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegionOutcomeLabels {
    region: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Why the edge refuses connections and requests (`meridian_edge_refusals_total{reason}`).
pub const EDGE_REFUSAL_REASONS: [&str; 8] = [
    "connections_node",
    "connections_address",
    "requests_node",
    "requests_address",
    "body_node",
    "body_project",
    "body_anonymous",
    "live_streams_node",
];

fn request_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatusLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    accepted: Family<RegionLabels, Counter>,
    rejected: Family<RegionCodeLabels, Counter>,
    suppressed: Family<RegionLabels, Counter>,
    queue_full: Family<RegionLabels, Counter>,
    client_metrics: Counter,
    body_budget_refusals: Counter,
    edge_refusals: Family<ReasonLabels, Counter>,
    retention_runs: Family<RegionOutcomeLabels, Counter>,
    task_restarts: Family<TaskLabels, Counter>,
    retention_archive_objects: Family<RegionLabels, Counter>,
    retention_warehouse_rows: Family<RegionLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meridian");
        let requests = Family::<RouteStatusLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route template and status",
            requests.clone(),
        );
        let request_duration =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                request_duration_histogram as fn() -> Histogram,
            );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route template",
            request_duration.clone(),
        );
        let accepted = Family::<RegionLabels, Counter>::default();
        registry.register(
            "messages_accepted",
            "Messages accepted (durable in the region's queue)",
            accepted.clone(),
        );
        let rejected = Family::<RegionCodeLabels, Counter>::default();
        registry.register(
            "messages_rejected",
            "Messages rejected, by reason",
            rejected.clone(),
        );
        let suppressed = Family::<RegionLabels, Counter>::default();
        registry.register(
            "messages_suppressed",
            "Messages of suppressed users, answered 200 and dropped",
            suppressed.clone(),
        );
        let queue_full = Family::<RegionLabels, Counter>::default();
        registry.register(
            "queue_full_rejections",
            "Requests answered 503 because the region's disk budget was full or its disk below the free-space reserve",
            queue_full.clone(),
        );
        let client_metrics = Counter::default();
        registry.register(
            "client_metrics_reports",
            "analytics.js client metric reports received on /v1/m",
            client_metrics.clone(),
        );
        let body_budget_refusals = Counter::default();
        registry.register(
            "body_budget_refusals",
            "Requests answered 503 because the node's request body budget was in use",
            body_budget_refusals.clone(),
        );
        let edge_refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "edge_refusals",
            "Connections and requests the edge refused, by the limit they met (node-wide, per client address, per project, keyless)",
            edge_refusals.clone(),
        );
        for reason in EDGE_REFUSAL_REASONS {
            let _ = edge_refusals.get_or_create(&ReasonLabels { reason });
        }
        let retention_runs = Family::<RegionOutcomeLabels, Counter>::default();
        registry.register(
            "retention_runs",
            "Retention janitor runs of a region, by outcome (ok, failed: some project could not be cleaned)",
            retention_runs.clone(),
        );
        let retention_archive_objects = Family::<RegionLabels, Counter>::default();
        registry.register(
            "retention_deleted_archive_objects",
            "Archive objects deleted because their received day was past the project's retention",
            retention_archive_objects.clone(),
        );
        let retention_warehouse_rows = Family::<RegionLabels, Counter>::default();
        registry.register(
            "retention_deleted_warehouse_rows",
            "ClickHouse rows deleted because they were received before the project's retention",
            retention_warehouse_rows.clone(),
        );
        let task_restarts = Family::<TaskLabels, Counter>::default();
        registry.register(
            "task_restarts",
            "The node's long-lived tasks (delivery runners, job loops, refreshers, guards) started again after they panicked or failed",
            task_restarts.clone(),
        );
        Metrics {
            task_restarts,
            body_budget_refusals,
            edge_refusals,
            retention_runs,
            retention_archive_objects,
            retention_warehouse_rows,
            registry,
            requests,
            request_duration,
            accepted,
            rejected,
            suppressed,
            queue_full,
            client_metrics,
        }
    }

    /// Creates the per-region counters at zero, so that dashboards and `rate()` see a series
    /// from the start instead of after the first event.
    pub fn initialize_region(&self, region: &str) {
        let labels = RegionLabels {
            region: region.to_string(),
        };
        let _ = self.accepted.get_or_create(&labels);
        let _ = self.suppressed.get_or_create(&labels);
        let _ = self.queue_full.get_or_create(&labels);
        let _ = self.retention_archive_objects.get_or_create(&labels);
        let _ = self.retention_warehouse_rows.get_or_create(&labels);
    }

    /// Creates a task's restart counter at zero (a series from the start).
    pub fn initialize_task(&self, task: &str) {
        let _ = self.task_restarts.get_or_create(&TaskLabels {
            task: task.to_string(),
        });
    }

    /// A task panicked or failed and is started again.
    pub fn task_restarted(&self, task: &str) {
        self.task_restarts
            .get_or_create(&TaskLabels {
                task: task.to_string(),
            })
            .inc();
    }

    /// One janitor run of a region ended (`outcome`: `ok` or `failed`), having deleted this much.
    pub fn retention_run(
        &self,
        region: &str,
        outcome: &str,
        archive_objects: u64,
        warehouse_rows: u64,
    ) {
        self.retention_runs
            .get_or_create(&RegionOutcomeLabels {
                region: region.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        let labels = RegionLabels {
            region: region.to_string(),
        };
        self.retention_archive_objects
            .get_or_create(&labels)
            .inc_by(archive_objects);
        self.retention_warehouse_rows
            .get_or_create(&labels)
            .inc_by(warehouse_rows);
    }

    pub fn observe_request(&self, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteStatusLabels {
                route: route.to_string(),
                status,
            })
            .inc();
        self.request_duration
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn messages_accepted(&self, region: &str, count: u64) {
        self.accepted
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .inc_by(count);
    }

    pub fn messages_rejected(&self, region: &str, code: &str, count: u64) {
        self.rejected
            .get_or_create(&RegionCodeLabels {
                region: region.to_string(),
                code: code.to_string(),
            })
            .inc_by(count);
    }

    pub fn body_budget_refused(&self) {
        self.body_budget_refusals.inc();
    }

    /// The edge refused a connection or request for `reason` (one of [`EDGE_REFUSAL_REASONS`]).
    pub fn edge_refused(&self, reason: &'static str) {
        debug_assert!(EDGE_REFUSAL_REASONS.contains(&reason), "{reason}");
        self.edge_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn messages_suppressed(&self, region: &str, count: u64) {
        self.suppressed
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .inc_by(count);
    }

    pub fn queue_full(&self, region: &str) {
        self.queue_full
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .inc();
    }

    pub fn client_metrics_report(&self) {
        self.client_metrics.inc();
    }

    /// The registry's metrics in Prometheus text format (without the trailing `# EOF`).
    pub fn encode_registry(&self, output: &mut String) {
        let mut encoded = String::new();
        if prometheus_client::encoding::text::encode(&mut encoded, &self.registry).is_ok() {
            output.push_str(encoded.trim_end().trim_end_matches("# EOF").trim_end());
            output.push('\n');
        }
    }
}

/// Writes scrape-time figures in Prometheus text format.
pub struct TextWriter<'a> {
    output: &'a mut String,
}

impl<'a> TextWriter<'a> {
    pub fn new(output: &'a mut String) -> TextWriter<'a> {
        TextWriter { output }
    }

    /// Declares a metric; `kind` is `gauge` or `counter`. Counter samples end in `_total`, and
    /// (as OpenMetrics wants) the family name is declared without that suffix.
    pub fn declare(&mut self, name: &str, kind: &str, help: &str) {
        debug_assert!(
            kind != "counter" || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let family = if kind == "counter" {
            name.trim_end_matches("_total")
        } else {
            name
        };
        let _ = writeln!(self.output, "# HELP meridian_{family} {help}");
        let _ = writeln!(self.output, "# TYPE meridian_{family} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let rendered: Vec<String> = labels
            .iter()
            .map(|(key, value)| {
                format!(
                    "{key}=\"{}\"",
                    value.replace('\\', "\\\\").replace('"', "\\\"")
                )
            })
            .collect();
        if rendered.is_empty() {
            let _ = writeln!(self.output, "meridian_{name} {value}");
        } else {
            let _ = writeln!(
                self.output,
                "meridian_{name}{{{}}} {value}",
                rendered.join(",")
            );
        }
    }
}

/// Resident memory and open file descriptors of this process, from /proc (Linux).
pub fn process_figures() -> (Option<u64>, Option<u64>) {
    let resident_bytes = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kilobytes| kilobytes.parse::<u64>().ok())
                .map(|kilobytes| kilobytes * 1024)
        });
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    (resident_bytes, open_fds)
}
