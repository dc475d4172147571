//! Meridian's load generator.
//!
//! Closed loop (`--mode closed`: each connection sends its next request when the previous one is
//! answered) or open loop (`--mode open --rate R`: requests are due on a fixed schedule and latency
//! counts from when a request was due, so a slow server cannot hide its queueing — no coordinated
//! omission). Single messages (`--batch 1`, POST /v1/track) or batches (POST /v1/batch), realistic
//! message sizes (300 B – 8 KB) or a fixed size, several projects across regions. Reports
//! throughput, p50/p90/p99/p99.9 latency (HDR histogram) and answers by status; with `--verify-*`
//! it then counts what the sinks hold and reports accepted vs stored, lost and duplicated.
//!
//! Example:
//!   loadgen --target http://127.0.0.1:8080 --key eu-west-1=wk_... --key us-east-1=wk_... \
//!           --mode closed --connections 64 --batch 100 --duration 10 --verify-archive data/archive

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use meridian_bench::messages::{draw_size, message};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Mutex;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    Closed,
    Open,
}

#[derive(Parser, Debug)]
#[command(about = "Load generator for Meridian's ingest API")]
struct Arguments {
    /// Base URL of the server (http only). Repeat for the nodes of a cluster: connection i
    /// talks to target i mod (number of targets).
    #[arg(long = "target", default_value = "http://127.0.0.1:8080")]
    targets: Vec<String>,
    /// REGION=WRITEKEY of a project to send to; repeat for several projects.
    #[arg(long = "key", required = true)]
    keys: Vec<String>,
    #[arg(long, value_enum, default_value = "closed")]
    mode: Mode,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Open loop: requests per second, over all connections.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Messages per request: 1 sends single messages to /v1/track, more sends /v1/batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Fixed message size in bytes; unset: realistic sizes from 300 B to 8 KB.
    #[arg(long)]
    message_size: Option<usize>,
    /// Count what the local archive under this directory (<dir>/<region>/segment-logs/...) holds.
    #[arg(long)]
    verify_archive: Option<PathBuf>,
    /// REGION=http://host:8123/DATABASE: count what that region's ClickHouse holds.
    #[arg(long = "verify-clickhouse")]
    verify_clickhouse: Vec<String>,
    /// Longest wait for the sinks to hold everything accepted.
    #[arg(long, default_value_t = 120.0)]
    verify_timeout: f64,
    /// Write the report as JSON here.
    #[arg(long)]
    report_json: Option<PathBuf>,
}

struct Project {
    region: String,
    authorization: String,
}

#[derive(Default)]
struct Totals {
    latency: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    connection_errors: u64,
    requests: u64,
    accepted_ids: HashMap<String, Vec<String>>,
}

async fn connect(
    authority: &str,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|error| error.to_string())?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| error.to_string())?;
    tokio::spawn(connection);
    Ok(sender)
}

/// A pre-serialized message with a placeholder for its id: requests are built by splicing in
/// a fresh id, so the generator spends its CPU on sending, not on serializing JSON.
struct Template {
    before_id: String,
    after_id: String,
    path: &'static str,
}

const ID_PLACEHOLDER: &str = "@@MESSAGE_ID@@";

impl Template {
    fn new(message: &Value) -> Template {
        let text = message.to_string();
        let (before, after) = text
            .split_once(ID_PLACEHOLDER)
            .expect("the template carries the placeholder");
        let path = match message["type"].as_str() {
            Some("identify") => "/v1/identify",
            Some("page") => "/v1/page",
            _ => "/v1/track",
        };
        Template {
            before_id: before.to_string(),
            after_id: after.to_string(),
            path,
        }
    }

    fn with_id(&self, id: &str) -> String {
        let mut text = String::with_capacity(self.before_id.len() + id.len() + self.after_id.len());
        text.push_str(&self.before_id);
        text.push_str(id);
        text.push_str(&self.after_id);
        text
    }

    fn len(&self) -> usize {
        self.before_id.len() + self.after_id.len()
    }
}

fn templates(message_size: Option<usize>) -> Vec<Template> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..512)
        .map(|_| {
            let size = message_size.unwrap_or_else(|| draw_size(&mut rng));
            Template::new(&message(&mut rng, ID_PLACEHOLDER, size))
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn run_connection(
    worker: usize,
    arguments: Arc<Arguments>,
    projects: Arc<Vec<Project>>,
    authority: String,
    run_id: Arc<str>,
    counter: Arc<AtomicU64>,
    started: Instant,
    totals: Arc<Mutex<Totals>>,
) {
    let mut rng = {
        use rand::SeedableRng;
        rand::rngs::StdRng::from_rng(&mut rand::rng())
    };
    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    let mut connection_errors = 0u64;
    let mut requests = 0u64;
    let deadline = started + Duration::from_secs_f64(arguments.duration);
    let interval = match arguments.mode {
        Mode::Open => Some(Duration::from_secs_f64(
            arguments.connections as f64 / arguments.rate.max(0.001),
        )),
        Mode::Closed => None,
    };
    let templates = templates(arguments.message_size);
    let mut sender = None;
    let mut sequence = 0u64;
    loop {
        let due = match interval {
            // Staggered starts so connections do not fire in lockstep.
            Some(interval) => {
                started
                    + interval
                        .mul_f64(sequence as f64 + worker as f64 / arguments.connections as f64)
            }
            None => Instant::now(),
        };
        if due >= deadline {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        sequence += 1;
        let project = &projects[(worker + sequence as usize) % projects.len()];
        let ids: Vec<String> = (0..arguments.batch.max(1))
            .map(|_| format!("{run_id}-{}", counter.fetch_add(1, Ordering::Relaxed)))
            .collect();
        let chosen: Vec<&Template> = ids
            .iter()
            .map(|_| &templates[rng.random_range(0..templates.len())])
            .collect();
        let (path, body) = if arguments.batch <= 1 {
            (chosen[0].path, chosen[0].with_id(&ids[0]))
        } else {
            let mut body = String::with_capacity(
                chosen
                    .iter()
                    .map(|template| template.len() + 40)
                    .sum::<usize>()
                    + 64,
            );
            body.push_str(r#"{"sentAt":"2026-11-24T05:12:27.000Z","batch":["#);
            for (index, (template, id)) in chosen.iter().zip(&ids).enumerate() {
                if index > 0 {
                    body.push(',');
                }
                body.push_str(&template.with_id(id));
            }
            body.push_str("]}");
            ("/v1/batch", body)
        };
        if sender.is_none() {
            match connect(&authority).await {
                Ok(connected) => sender = Some(connected),
                Err(_) => {
                    connection_errors += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(active) = sender.as_mut() else {
            continue;
        };
        let request = hyper::Request::post(path)
            .header("host", &authority)
            .header("content-type", "application/json")
            .header("authorization", &project.authorization)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let outcome = async {
            let response = active.send_request(request).await?;
            let status = response.status().as_u16();
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        }
        .await;
        requests += 1;
        match outcome {
            Ok(status) => {
                let latency = Instant::now().duration_since(due).as_micros().max(1) as u64;
                let _ = histogram.record(latency.min(60_000_000));
                *statuses.entry(status).or_default() += 1;
                if status == 200 {
                    accepted
                        .entry(project.region.clone())
                        .or_default()
                        .extend(ids);
                }
            }
            Err(_) => {
                connection_errors += 1;
                sender = None;
            }
        }
    }
    let mut totals = totals.lock().await;
    match totals.latency.as_mut() {
        Some(all) => {
            let _ = all.add(&histogram);
        }
        None => totals.latency = Some(histogram),
    }
    for (status, count) in statuses {
        *totals.statuses.entry(status).or_default() += count;
    }
    for (region, ids) in accepted {
        totals.accepted_ids.entry(region).or_default().extend(ids);
    }
    totals.connection_errors += connection_errors;
    totals.requests += requests;
}

/// Message ids in every gzip NDJSON object under `root`, with how often each appears.
fn archived_ids(root: &std::path::Path, run_id: &str) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(directory) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|extension| extension != "gz") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            let mut text = String::new();
            if flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .is_err()
            {
                continue;
            }
            for line in text.lines() {
                if let Ok(value) = serde_json::from_str::<Value>(line)
                    && let Some(id) = value["messageId"].as_str()
                    && id.starts_with(run_id)
                {
                    *counts.entry(id.to_string()).or_default() += 1;
                }
            }
        }
    }
    counts
}

async fn clickhouse_ids(
    url: &str,
    database: &str,
    run_id: &str,
) -> Result<HashMap<String, u64>, String> {
    let authority = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let mut sender = connect(&authority).await?;
    let query = format!(
        "SELECT message_id, count() FROM {database}.events FINAL WHERE message_id LIKE '{run_id}-%' GROUP BY message_id FORMAT TSV"
    );
    let request = hyper::Request::post("/")
        .header("host", &authority)
        .body(Full::new(Bytes::from(query)))
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| error.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "clickhouse answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|line| {
            let (id, count) = line.split_once('\t')?;
            Some((id.to_string(), count.parse().ok()?))
        })
        .collect())
}

/// Accepted vs stored for one sink of one region.
fn compare(accepted: &[String], stored: &HashMap<String, u64>) -> Value {
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    let lost = accepted_set
        .iter()
        .filter(|id| !stored.contains_key(**id))
        .count();
    let duplicates = stored.values().filter(|count| **count > 1).count();
    let stored_accepted = accepted_set
        .iter()
        .filter(|id| stored.contains_key(**id))
        .count();
    json!({"accepted": accepted_set.len(), "stored": stored_accepted, "stored_total": stored.len(), "lost": lost, "duplicates": duplicates})
}

#[tokio::main]
async fn main() {
    let arguments = Arc::new(Arguments::parse());
    let authorities: Vec<String> = arguments
        .targets
        .iter()
        .map(|target| {
            target
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string()
        })
        .collect();
    let projects: Vec<Project> = arguments
        .keys
        .iter()
        .map(|pair| {
            let (region, key) = pair.split_once('=').expect("--key REGION=WRITEKEY");
            let credentials = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
            Project {
                region: region.to_string(),
                authorization: format!("Basic {credentials}"),
            }
        })
        .collect();
    let projects = Arc::new(projects);
    let run_id: Arc<str> = Arc::from(format!("lg{:x}", rand::random::<u32>()).as_str());
    let counter = Arc::new(AtomicU64::new(0));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..arguments.connections.max(1) {
        workers.push(tokio::spawn(run_connection(
            worker,
            Arc::clone(&arguments),
            Arc::clone(&projects),
            authorities[worker % authorities.len()].clone(),
            Arc::clone(&run_id),
            Arc::clone(&counter),
            started,
            Arc::clone(&totals),
        )));
    }
    for worker in workers {
        let _ = worker.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let totals = totals.lock().await;
    let histogram = totals
        .latency
        .clone()
        .unwrap_or_else(|| Histogram::new(3).expect("histogram"));
    let percentile = |quantile: f64| histogram.value_at_quantile(quantile) as f64 / 1000.0;
    let ok = totals.statuses.get(&200).copied().unwrap_or(0);
    let messages_accepted: usize = totals.accepted_ids.values().map(Vec::len).sum();
    let mut report = json!({
        "mode": format!("{:?}", arguments.mode).to_lowercase(),
        "connections": arguments.connections,
        "batch": arguments.batch,
        "seconds": elapsed,
        "requests": totals.requests,
        "requests_per_second": ok as f64 / elapsed,
        "messages_per_second": messages_accepted as f64 / elapsed,
        "latency_ms": {"p50": percentile(0.50), "p90": percentile(0.90), "p99": percentile(0.99), "p99_9": percentile(0.999), "max": histogram.max() as f64 / 1000.0},
        "statuses": totals.statuses,
        "connection_errors": totals.connection_errors,
        "messages_accepted": messages_accepted,
    });
    eprintln!(
        "{} req/s, {} msg/s over {:.1} s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; statuses {:?}; connection errors {}",
        (ok as f64 / elapsed).round(),
        (messages_accepted as f64 / elapsed).round(),
        elapsed,
        percentile(0.5),
        percentile(0.9),
        percentile(0.99),
        percentile(0.999),
        totals.statuses,
        totals.connection_errors
    );

    let mut verification = serde_json::Map::new();
    let verify_deadline = Instant::now() + Duration::from_secs_f64(arguments.verify_timeout);
    if let Some(root) = &arguments.verify_archive {
        for (region, accepted) in &totals.accepted_ids {
            let region_root = root.join(region);
            let mut result = compare(accepted, &archived_ids(&region_root, &run_id));
            while result["lost"].as_u64().unwrap_or(0) > 0 && Instant::now() < verify_deadline {
                tokio::time::sleep(Duration::from_millis(500)).await;
                result = compare(accepted, &archived_ids(&region_root, &run_id));
            }
            eprintln!("archive {region}: {result}");
            verification.insert(format!("archive/{region}"), result);
        }
    }
    for spec in &arguments.verify_clickhouse {
        let Some((region, rest)) = spec.split_once('=') else {
            continue;
        };
        let Some((url, database)) = rest.rsplit_once('/') else {
            continue;
        };
        let accepted = totals.accepted_ids.get(region).cloned().unwrap_or_default();
        let mut result = json!({"error": "not checked"});
        loop {
            match clickhouse_ids(url, database, &run_id).await {
                Ok(stored) => result = compare(&accepted, &stored),
                Err(error) => result = json!({"error": error}),
            }
            if result["lost"].as_u64() == Some(0) || Instant::now() >= verify_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("clickhouse {region}: {result}");
        verification.insert(format!("clickhouse/{region}"), result);
    }
    let consistent = verification.values().all(|result| {
        result["lost"].as_u64() == Some(0) && result["duplicates"].as_u64() == Some(0)
    });
    report["verification"] = Value::Object(verification);
    report["consistent"] = json!(consistent);
    if let Some(path) = &arguments.report_json {
        let _ = std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        );
    }
    println!("{report}");
    if !consistent {
        eprintln!("accepted and stored differ");
        std::process::exit(1);
    }
}
