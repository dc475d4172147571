//! Prometheus metrics. Request and message counters live in a `prometheus-client` registry;
//! queue and sink figures are read from their live state at scrape time. Labels are low
//! cardinality: route templates, status codes, regions, sinks and reject codes, never project ids.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

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
    ledger_unreconciled_days: Family<RegionLabels, Gauge>,
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
        let ledger_unreconciled_days = Family::<RegionLabels, Gauge>::default();
        registry.register(
            "ledger_unreconciled_days",
            "Days of the region's projects (the last 7, ended more than an hour ago) whose acknowledged messages are not all in every store",
            ledger_unreconciled_days.clone(),
        );
        Metrics {
            ledger_unreconciled_days,
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
        let _ = self.ledger_unreconciled_days.get_or_create(&labels);
    }

    /// The delivery ledger's latest check of a region.
    pub fn set_unreconciled_days(&self, region: &str, days: usize) {
        self.ledger_unreconciled_days
            .get_or_create(&RegionLabels {
                region: region.to_string(),
            })
            .set(days as i64);
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

    /// The registry's metrics and the scrape's `figures`, in OpenMetrics text.
    pub fn encode_with(&self, figures: Figures) -> String {
        let mut output = String::with_capacity(16 * 1024);
        self.encode_registry(&mut output);
        let mut scrape = Registry::with_prefix("meridian");
        scrape.register_collector(Box::new(figures));
        if prometheus_client::encoding::text::encode(&mut output, &scrape).is_err() {
            output.push_str("# EOF\n");
        }
        output
    }
}

/// Figures read at scrape time (queues, sinks, the edge): declared and sampled as the scrape
/// walks the node, then encoded by prometheus-client (a [`Collector`]) with the registry's
/// metrics. Families keep the order they were declared in.
#[derive(Debug, Default)]
pub struct Figures {
    families: Vec<FigureFamily>,
}

#[derive(Debug)]
struct FigureFamily {
    /// The name without the `meridian_` prefix (and, for counters, without `_total`).
    name: String,
    kind: MetricType,
    help: String,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

impl Figures {
    /// Declares a metric; `kind` is `gauge` or `counter`. Counters are named with their `_total`
    /// suffix, as their samples are.
    pub fn declare(&mut self, name: &str, kind: &str, help: &str) {
        debug_assert!(
            kind != "counter" || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let (name, kind) = match kind {
            "counter" => (name.trim_end_matches("_total"), MetricType::Counter),
            _ => (name, MetricType::Gauge),
        };
        if self.families.iter().any(|family| family.name == name) {
            return;
        }
        self.families.push(FigureFamily {
            name: name.to_string(),
            kind,
            help: help.to_string(),
            samples: Vec::new(),
        });
    }

    /// A sample of the family declared as `name`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let family_name = name.strip_suffix("_total").unwrap_or(name);
        let family = self
            .families
            .iter_mut()
            .find(|family| family.name == family_name || family.name == name);
        debug_assert!(family.is_some(), "{name} sampled before it was declared");
        if let Some(family) = family {
            family.samples.push((
                labels
                    .iter()
                    .map(|(key, value)| (key.to_string(), value.to_string()))
                    .collect(),
                value,
            ));
        }
    }
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let mut metric =
                encoder.encode_descriptor(&family.name, &family.help, None, family.kind)?;
            if let [(labels, value)] = family.samples.as_slice()
                && labels.is_empty()
            {
                encode_value(family.kind, *value, metric)?;
                continue;
            }
            for (labels, value) in &family.samples {
                let labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(key, value)| (key.as_str(), value.as_str()))
                    .collect();
                encode_value(family.kind, *value, metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    kind: MetricType,
    value: f64,
    encoder: prometheus_client::encoding::MetricEncoder<'_>,
) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(encoder),
        _ => ConstGauge::new(value).encode(encoder),
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

/// The node's figures read at scrape time: each served region's queue, each delivery runner and
/// sink, the key cache.
pub fn node_figures(node: &crate::node::Node) -> Figures {
    use std::sync::atomic::Ordering;

    use crate::region::SinkHandle;

    let mut figures = Figures::default();

    figures.declare(
        "queue_bytes",
        "gauge",
        "Bytes of queue segments on disk, by region",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_bytes",
            &[("region", region.as_str())],
            queue.stats().disk_bytes as f64,
        );
    }
    figures.declare(
        "queue_disk_budget_bytes",
        "gauge",
        "Disk budget of the region's queue",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_disk_budget_bytes",
            &[("region", region.as_str())],
            queue.stats().disk_budget_bytes as f64,
        );
    }
    figures.declare(
        "queue_pending_records",
        "gauge",
        "Records not yet delivered by the slowest sink, by region",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_pending_records",
            &[("region", region.as_str())],
            queue.stats().pending_records() as f64,
        );
    }
    figures.declare(
        "queue_appended_records_total",
        "counter",
        "Records ever appended to the region's queue",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_appended_records_total",
            &[("region", region.as_str())],
            queue.stats().end_offset as f64,
        );
    }
    figures.declare(
        "queue_syncs_total",
        "counter",
        "fdatasync calls of the region's queue writer (group commit)",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_syncs_total",
            &[("region", region.as_str())],
            queue.stats().sync_count as f64,
        );
    }
    let (full_reloads, incremental_refreshes) = node.keys.reload_counts();
    figures.declare(
        "key_cache_reloads_total",
        "counter",
        "Key cache reloads from the catalog: full (start, many changes, the ten-minute safety net) or incremental (only the projects changed)",
    );
    figures.sample(
        "key_cache_reloads_total",
        &[("kind", "full")],
        full_reloads as f64,
    );
    figures.sample(
        "key_cache_reloads_total",
        &[("kind", "incremental")],
        incremental_refreshes as f64,
    );
    figures.declare(
        "queue_abandoned_appends_total",
        "counter",
        "Appends the queue dropped unwritten because their request had given up (timeout, client gone)",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_abandoned_appends_total",
            &[("region", region.as_str())],
            queue.stats().abandoned_appends as f64,
        );
    }
    figures.declare(
        "queue_damaged_records_total",
        "counter",
        "Queued records lost to damaged segment bytes (their bytes are quarantined; every intact record around them is kept)",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_damaged_records_total",
            &[("region", region.as_str())],
            queue.stats().damaged_records as f64,
        );
    }
    figures.declare(
        "queue_quarantined_bytes_total",
        "counter",
        "Damaged queue segment bytes copied to the queue's quarantine directory",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_quarantined_bytes_total",
            &[("region", region.as_str())],
            queue.stats().quarantined_bytes as f64,
        );
    }
    figures.declare(
        "queue_disk_free_bytes",
        "gauge",
        "Free bytes on the filesystem of the region's queue (appends are refused below queue.min_free_disk_bytes)",
    );
    for (region, queue) in node.queues() {
        if let Some(free_bytes) = queue.disk_free_bytes() {
            figures.sample(
                "queue_disk_free_bytes",
                &[("region", region.as_str())],
                free_bytes as f64,
            );
        }
    }
    figures.declare(
        "queue_writable",
        "gauge",
        "1 when the region's queue accepts appends",
    );
    for (region, queue) in node.queues() {
        figures.sample(
            "queue_writable",
            &[("region", region.as_str())],
            if queue.is_writable() { 1.0 } else { 0.0 },
        );
    }

    let mut backend_samples: std::collections::BTreeMap<
        &'static str,
        Vec<(&str, meridian_queue::BackendSample)>,
    > = Default::default();
    for (region, queue) in node.queues() {
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
        figures.declare(name, first.kind, first.help);
        for (region, sample) in samples {
            let mut labels: Vec<(&str, &str)> = vec![("region", region)];
            labels.extend(
                sample
                    .labels
                    .iter()
                    .map(|(key, value)| (*key, value.as_str())),
            );
            figures.sample(name, &labels, sample.value);
        }
    }

    let now_ms = meridian_core::timestamp::now_unix_ms();
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
        figures.declare(name, "counter", help);
        for sink in node.sinks() {
            figures.sample(name, &sink.labels(), read(&sink.status));
        }
    }
    figures.declare(
        "sink_delivery_seconds_total",
        "counter",
        "Time spent in successful deliveries",
    );
    for sink in node.sinks() {
        let seconds = sink.status.delivery_micros.load(Ordering::Relaxed) as f64 / 1e6;
        figures.sample("sink_delivery_seconds_total", &sink.labels(), seconds);
    }
    figures.declare(
        "sink_healthy",
        "gauge",
        "0 when the sink needs an operator (e.g. its bucket is in another region)",
    );
    for sink in node.sinks().filter(|sink| sink.reports_sink_figures()) {
        let healthy = if sink.implementation.health().is_none() {
            1.0
        } else {
            0.0
        };
        figures.sample("sink_healthy", &sink.sink_labels(), healthy);
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
        figures.declare(name, "gauge", help);
        for sink in node.sinks() {
            figures.sample(name, &sink.labels(), read(&sink.status));
        }
    }
    figures.declare(
        "sink_lag_seconds",
        "gauge",
        "Age of the oldest record the sink has read but not yet delivered",
    );
    for sink in node.sinks() {
        let since_ms = sink.status.oldest_pending_since_ms.load(Ordering::Relaxed);
        let lag = if since_ms > 0 {
            (now_ms - since_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        figures.sample("sink_lag_seconds", &sink.labels(), lag);
    }
    figures.declare(
        "sink_pending_records",
        "gauge",
        "Records appended but not yet delivered by this sink",
    );
    // A runner on standby (another node delivers its partition) has no backlog of its own.
    for sink in node
        .sinks()
        .filter(|sink| !sink.status.standby.load(Ordering::Relaxed))
    {
        let end = sink.log.durable_end();
        let position = sink.status.position.load(Ordering::Relaxed);
        figures.sample(
            "sink_pending_records",
            &sink.labels(),
            end.saturating_sub(position) as f64,
        );
    }

    let mut sink_specific: std::collections::BTreeMap<&'static str, Vec<(&SinkHandle, u64)>> =
        Default::default();
    for sink in node.sinks().filter(|sink| sink.reports_sink_figures()) {
        for (name, value) in sink.implementation.counters() {
            sink_specific.entry(name).or_default().push((sink, value));
        }
    }
    for (name, samples) in sink_specific {
        let metric = format!("sink_{name}_total");
        figures.declare(
            &metric,
            "counter",
            &format!("Sink counter: {}", name.replace('_', " ")),
        );
        for (sink, value) in samples {
            figures.sample(&metric, &sink.sink_labels(), value as f64);
        }
    }

    let mut sink_levels: std::collections::BTreeMap<&'static str, Vec<(&SinkHandle, u64)>> =
        Default::default();
    for sink in node.sinks().filter(|sink| sink.reports_sink_figures()) {
        for (name, value) in sink.implementation.gauges() {
            sink_levels.entry(name).or_default().push((sink, value));
        }
    }
    for (name, samples) in sink_levels {
        let metric = format!("sink_{name}");
        figures.declare(
            &metric,
            "gauge",
            &format!("Sink level: {}", name.replace('_', " ")),
        );
        for (sink, value) in samples {
            figures.sample(&metric, &sink.sink_labels(), value as f64);
        }
    }
    figures
}
