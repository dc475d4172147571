//! Test harness for end-to-end tests: starts the real `meridian` binary on a free loopback port
//! with its own data directory, and talks to it over HTTP.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};

pub mod cluster;
pub mod nats;
pub mod services;

pub const JWT_SECRET: &str = "end-to-end-test-secret-long-enough-for-hs256";
/// The catalog hash key of nodes on a PostgreSQL catalog (embedded catalogs make their own).
pub const CATALOG_HASH_KEY: &str = "end-to-end-catalog-hash-key-shared-by-a-cluster";

/// The catalog key a test node uses: the shared one for PostgreSQL catalogs, else the one it made
/// in its data directory.
#[allow(dead_code)]
pub fn catalog_key_of(data_dir: &Path, catalog_url: &str) -> meridian_catalog::CatalogKey {
    let bytes = if catalog_url.starts_with("postgres") {
        CATALOG_HASH_KEY.to_string()
    } else {
        std::fs::read_to_string(data_dir.join("catalog_hash_key")).expect("the node made its key")
    };
    meridian_catalog::CatalogKey::from_bytes(bytes.trim().as_bytes()).expect("a valid key")
}

/// A free loopback port below the kernel's ephemeral range (32768 and up on Linux), handed out
/// once per test process. A port from the ephemeral range can be taken as the source port of any
/// client connection while the test's server on it is stopped, and then the server cannot start
/// again on it (seen: "seaweedfs did not start" in the S3 outage scenario under load).
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        rand::rng().random_range(0..SPAN),
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct TestServer {
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub port: u16,
    pub base_url: String,
    pub child: Option<Child>,
    pub extra_env: Vec<(String, String)>,
    pub client: reqwest::Client,
    /// Keeps the temporary directory alive while the server runs.
    _dir: Option<tempfile::TempDir>,
}

/// A config file with fast archive flushes and short retry backoffs, for tests. `extra` is appended
/// right after the `[queue]` table, so its first lines may set more queue keys.
pub fn test_config(extra: &str) -> String {
    test_config_with_flush(100, extra)
}

pub fn test_config_with_flush(flush_interval_ms: u64, extra: &str) -> String {
    format!(
        r#"
[archive]
flush_interval_ms = {flush_interval_ms}
[catalog]
refresh_interval_ms = 100
[queue]
retry_max_ms = 2000
{extra}
{}
"#,
        shared_jetstream_regions()
    )
}

/// With MERIDIAN_QUEUE_BACKEND=jetstream (scripts/test runs the ingest suite a second time so),
/// every region's queue is on the shared NATS cluster of MERIDIAN_TEST_NATS_URLS, in streams of
/// this config's own.
fn shared_jetstream_regions() -> String {
    if std::env::var("MERIDIAN_QUEUE_BACKEND").as_deref() != Ok("jetstream") {
        return String::new();
    }
    let urls = services::shared_service("MERIDIAN_TEST_NATS_URLS").unwrap_or_default();
    let urls: Vec<String> = urls
        .split(',')
        .filter(|url| !url.is_empty())
        .map(|url| format!("\"{url}\""))
        .collect();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..12];
    ["eu-west-1", "us-east-1", "af-south-1", "ap-southeast-1"]
        .iter()
        .map(|region| {
            format!(
                "[regions.{region}.queue.jetstream]\nurls = [{}]\nstream = \"t{tag}-{region}\"\nreplicas = {}\nlease_ms = 2000\nmax_bytes = 16777216\n",
                urls.join(", "),
                urls.len().min(3)
            )
        })
        .collect()
}

impl TestServer {
    /// Starts a server with `config` (merged over the embedded defaults) and extra environment.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let data_dir = dir.path().join("data");
        let mut server = TestServer::prepare(dir.path(), &data_dir, config, env);
        server._dir = Some(dir);
        server.spawn().await;
        server
    }

    /// Starts a server whose data directory is `data_dir` (e.g. on a small filesystem of its own);
    /// its config and log live in `root`. Both stay the caller's to remove.
    #[allow(dead_code)]
    pub async fn start_with_data_dir(
        root: &Path,
        data_dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> TestServer {
        let mut server = TestServer::prepare(root, data_dir, config, env);
        server.spawn().await;
        server
    }

    fn prepare(root: &Path, data_dir: &Path, config: &str, env: &[(&str, &str)]) -> TestServer {
        let config_path = root.join("meridian.toml");
        std::fs::write(&config_path, config).expect("config written");
        let port = free_port();
        TestServer {
            data_dir: data_dir.to_path_buf(),
            config_path,
            port,
            base_url: format!("http://127.0.0.1:{port}"),
            child: None,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                // Below every server idle timeout the tests configure, so that a pooled
                // connection the server closed is never reused.
                .pool_idle_timeout(Duration::from_secs(1))
                .build()
                .expect("http client"),
            _dir: None,
        }
    }

    pub fn command(&self) -> Command {
        // `MERIDIAN_TEST_SERVER_BIN` runs a copy (a long test run against a binary that a build
        // meanwhile does not replace); by default the binary cargo built for these tests.
        let binary = std::env::var_os("MERIDIAN_TEST_SERVER_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_meridian").into());
        let mut command = Command::new(binary);
        command
            .env("MERIDIAN_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("MERIDIAN_DATA_DIR", &self.data_dir)
            .env("MERIDIAN_JWT_SECRET", JWT_SECRET)
            .env("MERIDIAN_LOG", "info,sqlx=warn")
            .env_remove("MERIDIAN_SERVE_REGIONS")
            .env_remove("MERIDIAN_NODE_REGION")
            .env_remove("MERIDIAN_CATALOG_URL");
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        let on_postgres = self
            .extra_env
            .iter()
            .any(|(key, value)| key == "MERIDIAN_CATALOG_URL" && value.starts_with("postgres"));
        if on_postgres {
            command.env("MERIDIAN_CATALOG_HASH_KEY", CATALOG_HASH_KEY);
        } else {
            command.env_remove("MERIDIAN_CATALOG_HASH_KEY");
        }
        command
    }

    /// Starts (or restarts) the process and waits until /healthz answers.
    pub async fn spawn(&mut self) {
        std::fs::create_dir_all(self.data_dir.parent().expect("data dir parent"))
            .expect("root dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("stderr.log"))
            .expect("log file");
        let child = self
            .command()
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("meridian starts");
        self.child = Some(child);
        let url = format!("{}/healthz", self.base_url);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                panic!(
                    "meridian exited with {status} at start; its log:\n{}",
                    self.log()
                );
            }
            if self
                .client
                .get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "meridian did not become healthy within 60 s; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("stderr.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reap.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child process by its pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let status = child.wait().ok()?;
        status.code()
    }

    pub fn issue_token(&self, role: &str, org: Option<&str>) -> String {
        let mut command = self.command();
        command
            .args(["token", "issue", "--config"])
            .arg(&self.config_path)
            .args(["--role", role]);
        if let Some(org) = org {
            command.args(["--org", org]);
        }
        let output = command.output().expect("token issue runs");
        assert!(
            output.status.success(),
            "token issue failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .expect("utf-8 token")
            .trim()
            .to_string()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// The status `/healthz` answers now (the node is up and serving).
    pub async fn health_status(&self) -> u16 {
        self.client
            .get(self.url("/healthz"))
            .send()
            .await
            .expect("GET /healthz")
            .status()
            .as_u16()
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn create_org(&self, org_id: &str) {
        let token = self.issue_token("platform", None);
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                "/admin/orgs",
                &token,
                Some(json!({"org_id": org_id, "name": org_id})),
            )
            .await;
        assert_eq!(status, 201, "create org: {body}");
    }

    /// Creates a project and returns `(project_id, write_key)`.
    pub async fn create_project(&self, org_id: &str, region: &str) -> (String, String) {
        let token = self.issue_token("owner", Some(org_id));
        let (status, body) = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/orgs/{org_id}/projects"),
                &token,
                Some(json!({"name": format!("project in {region}"), "region": region})),
            )
            .await;
        assert_eq!(status, 201, "create project: {body}");
        assert_eq!(body["region"], region);
        (
            body["project_id"].as_str().expect("project id").to_string(),
            body["write_key"].as_str().expect("write key").to_string(),
        )
    }

    /// Every message in the local archive of `region`, as JSON.
    pub fn archived_messages(&self, region: &str) -> Vec<Value> {
        archived_messages_in(&self.data_dir.join("archive").join(region))
    }

    /// The node's detailed status (`GET /admin/node/status`, a platform token): queue figures,
    /// each sink's position, last error and problem.
    pub async fn node_status(&self) -> Value {
        let token = self.issue_token("platform", None);
        let (status, body) = self
            .admin(reqwest::Method::GET, "/admin/node/status", &token, None)
            .await;
        assert_eq!(status, 200, "node status: {body}");
        body
    }

    /// The `/metrics` text now.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// The value of the series `name{labels}` (as written in `/metrics`) now; `None` if absent.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics_text().await, series)
    }

    /// POSTs `messages` as one `/v1/batch` with `write_key`; returns the answer's status.
    pub async fn post_batch(&self, write_key: &str, messages: &[Value]) -> u16 {
        self.client
            .post(self.url("/v1/batch"))
            .header("Authorization", basic_auth(write_key))
            .json(&serde_json::json!({"batch": messages}))
            .send()
            .await
            .expect("POST /v1/batch")
            .status()
            .as_u16()
    }

    /// [`TestServer::post_batch`], answered 200, then waits until every sink delivered it.
    pub async fn send_and_deliver(&self, write_key: &str, messages: &[Value]) {
        assert_eq!(self.post_batch(write_key, messages).await, 200);
        assert!(
            self.wait_for_sinks_to_drain(Duration::from_secs(30)).await,
            "the batch was delivered"
        );
    }

    /// Queue cursors and ends are in /metrics; waits until every sink of every region caught up.
    pub async fn wait_for_sinks_to_drain(&self, timeout: Duration) -> bool {
        let client = self.client.clone();
        let url = self.url("/metrics");
        wait_until(timeout, || {
            let client = client.clone();
            let url = url.clone();
            async move {
                let Ok(response) = client.get(&url).send().await else {
                    return false;
                };
                let Ok(text) = response.text().await else {
                    return false;
                };
                let pending: Vec<f64> = text
                    .lines()
                    .filter(|line| line.starts_with("meridian_sink_pending_records{"))
                    .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
                    .collect();
                !pending.is_empty() && pending.iter().all(|value| *value == 0.0)
            }
        })
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The value of the series `name{labels}` in a `/metrics` text; `None` if absent.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

pub fn archived_messages_in(root: &Path) -> Vec<Value> {
    let mut messages = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(directory) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|extension| extension == "gz") {
                let bytes = std::fs::read(&path).expect("archive object readable");
                let mut text = String::new();
                flate2::read::MultiGzDecoder::new(&bytes[..])
                    .read_to_string(&mut text)
                    .expect("archive object is gzip");
                for line in text.lines().filter(|line| !line.is_empty()) {
                    messages.push(serde_json::from_str(line).expect("archive line is JSON"));
                }
            }
        }
    }
    messages
}

/// Counts of archived messages by `messageId`.
pub fn count_by_message_id(messages: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for message in messages {
        let id = message["messageId"].as_str().unwrap_or("").to_string();
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

pub fn basic_auth(write_key: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{write_key}:"))
    )
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("gzip");
    encoder.finish().expect("gzip")
}

/// How a load spreads its requests over the nodes of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// Each client takes the nodes in turn (clients start at different nodes).
    RoundRobin,
    /// Each request goes to a node picked at random.
    Random,
}

/// Clients sending batches of 1 to 5 uniquely identified track messages (ids `<tag>-<n>`) until
/// stopped; each remembers the ids answered 200, and every other answer or failed request counts
/// as refused.
pub struct Load {
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
    tasks: Vec<(String, tokio::task::JoinHandle<Vec<String>>)>,
}

impl Load {
    /// A load on one server, as fast as its clients go.
    pub fn start(server: &TestServer, keys: &[(&str, String)], clients: usize, tag: &str) -> Load {
        Load::spread_over(
            &server.client,
            std::slice::from_ref(&server.base_url),
            keys,
            clients,
            tag,
            Spread::RoundRobin,
            1..=5,
            Duration::from_millis(2),
        )
    }

    /// A load spread over the nodes at `base_urls`: requests of `messages_per_request` messages,
    /// each client pausing `pause` between requests (a long pause gives few messages per archive
    /// flush; a short one, many).
    #[allow(clippy::too_many_arguments)]
    pub fn spread_over(
        client: &reqwest::Client,
        base_urls: &[String],
        keys: &[(&str, String)],
        clients: usize,
        tag: &str,
        spread: Spread,
        messages_per_request: std::ops::RangeInclusive<usize>,
        pause: Duration,
    ) -> Load {
        assert!(!base_urls.is_empty(), "a load needs a node to send to");
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let counter = Arc::new(AtomicU64::new(0));
        let urls: Arc<Vec<String>> = Arc::new(
            base_urls
                .iter()
                .map(|base_url| format!("{base_url}/v1/batch"))
                .collect(),
        );
        let mut tasks = Vec::new();
        for client_index in 0..clients {
            let (region, key) = keys[client_index % keys.len()].clone();
            let (client, urls) = (client.clone(), Arc::clone(&urls));
            let (stop, refused, counter) = (
                Arc::clone(&stop),
                Arc::clone(&refused),
                Arc::clone(&counter),
            );
            let tag = tag.to_string();
            let messages_per_request = messages_per_request.clone();
            tasks.push((
                region.to_string(),
                tokio::spawn(async move {
                    let mut accepted = Vec::new();
                    let mut next_node = client_index;
                    while !stop.load(Ordering::Relaxed) {
                        let node = match spread {
                            Spread::RoundRobin => {
                                next_node += 1;
                                (next_node - 1) % urls.len()
                            }
                            Spread::Random => rand::rng().random_range(0..urls.len()),
                        };
                        let size = rand::rng().random_range(messages_per_request.clone());
                        let ids: Vec<String> = (0..size).map(|_| format!("{tag}-{}", counter.fetch_add(1, Ordering::Relaxed))).collect();
                        let batch: Vec<Value> = ids.iter().map(|id| json!({"type": "track", "userId": "load", "event": "Load", "messageId": id})).collect();
                        match client.post(&urls[node]).header("Authorization", basic_auth(&key)).json(&json!({"batch": batch})).send().await {
                            Ok(response) if response.status() == 200 => accepted.extend(ids),
                            Ok(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    accepted
                }),
            ));
        }
        Load {
            stop,
            refused,
            tasks,
        }
    }

    /// Stops the clients; returns the accepted ids by region and the number of refusals.
    pub async fn finish(self) -> (BTreeMap<String, BTreeSet<String>>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut accepted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (region, task) in self.tasks {
            accepted
                .entry(region)
                .or_default()
                .extend(task.await.expect("a load client task panicked"));
        }
        (accepted, self.refused.load(Ordering::Relaxed))
    }
}

/// A self-signed certificate for localhost / 127.0.0.1 made with openssl: `cert.pem` and
/// `key.pem` in `dir` (replaced atomically), returned as DER.
pub fn make_certificate(
    dir: &Path,
    common_name: &str,
) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem.new"))
        .arg("-out")
        .arg(dir.join("cert.pem.new"))
        .args([
            "-subj",
            &format!("/CN={common_name}"),
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .args([
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
    rustls_pki_types::CertificateDer::from_pem_file(dir.join("cert.pem")).unwrap()
}

/// The random source of a kill schedule (which node, when): seeded from `MERIDIAN_TEST_SEED`
/// when set, else at random, and the seed printed (a failing test shows it) so that a schedule
/// that found a bug can be replayed.
pub fn kill_schedule(test: &str) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed = std::env::var("MERIDIAN_TEST_SEED")
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: kill schedule seed {seed} (replay it with MERIDIAN_TEST_SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}
