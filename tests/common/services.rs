//! Private instances of the real services, for tests that stop and start them (outages), and
//! clients for the shared instances scripts/test started.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;

/// The URL of a shared service from scripts/test, or `None` to skip — which fails instead when
/// MERIDIAN_REQUIRE_SERVICES=1 (CI), so a missing service can never turn a test green.
pub fn shared_service(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("MERIDIAN_REQUIRE_SERVICES").is_ok_and(|value| value == "1") => {
            panic!(
                "MERIDIAN_REQUIRE_SERVICES=1 but {variable} is not set: run the suite through scripts/test"
            )
        }
        _ => {
            eprintln!("skipping: {variable} is not set (run through scripts/test)");
            None
        }
    }
}

/// Runs a query over ClickHouse's HTTP interface and returns the body; panics on an error status.
pub async fn clickhouse_query(url: &str, sql: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{url}/"))
        .body(sql.to_string())
        .send()
        .await
        .unwrap_or_else(|error| panic!("clickhouse at {url} unreachable: {error}"));
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert!(
        status.is_success(),
        "clickhouse query failed ({status}): {sql}\n{text}"
    );
    text
}

pub async fn clickhouse_count(url: &str, sql: &str) -> u64 {
    clickhouse_query(url, sql)
        .await
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a count: {sql}"))
}

/// A ClickHouse server of our own, on free loopback ports, that a test may stop and start.
pub struct ClickHouseProcess {
    pub dir: tempfile::TempDir,
    pub http_port: u16,
    tcp_port: u16,
    child: Option<Child>,
}

impl ClickHouseProcess {
    pub async fn start() -> Option<ClickHouseProcess> {
        let binary = shared_service("MERIDIAN_TEST_CLICKHOUSE_SERVER_BIN")?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut process = ClickHouseProcess {
            dir,
            http_port: free_port(),
            tcp_port: free_port(),
            child: None,
        };
        process.write_config();
        process.spawn(&binary).await;
        Some(process)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn write_config(&self) {
        let root = self.dir.path();
        for sub in ["data", "tmp", "user_files", "log"] {
            std::fs::create_dir_all(root.join(sub)).expect("clickhouse dirs");
        }
        std::fs::write(
            root.join("users.xml"),
            "<yandex><profiles><default></default></profiles><users><default><password></password>\
             <networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users>\
             <quotas><default></default></quotas></yandex>",
        )
        .expect("users.xml");
        let root_text = root.display();
        std::fs::write(
            root.join("config.xml"),
            format!(
                "<yandex><logger><level>warning</level><log>{root_text}/log/server.log</log><errorlog>{root_text}/log/error.log</errorlog></logger>\
                 <listen_host>127.0.0.1</listen_host><http_port>{}</http_port><tcp_port>{}</tcp_port>\
                 <path>{root_text}/data/</path><tmp_path>{root_text}/tmp/</tmp_path><user_files_path>{root_text}/user_files/</user_files_path>\
                 <users_config>{root_text}/users.xml</users_config><default_profile>default</default_profile>\
                 <default_database>default</default_database><timezone>UTC</timezone><mark_cache_size>268435456</mark_cache_size></yandex>",
                self.http_port, self.tcp_port
            ),
        )
        .expect("config.xml");
    }

    async fn spawn(&mut self, binary: &str) {
        let child = Command::new(binary)
            .arg(format!(
                "--config-file={}",
                self.dir.path().join("config.xml").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server starts");
        self.child = Some(child);
        let ping = format!("{}/ping", self.url());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&ping)
            .await
            .is_ok_and(|response| response.status().is_success())
        {
            assert!(Instant::now() < deadline, "clickhouse did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server (SIGTERM, then waits for the process to exit).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        let binary =
            shared_service("MERIDIAN_TEST_CLICKHOUSE_SERVER_BIN").expect("clickhouse binary");
        self.spawn(&binary).await;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for ClickHouseProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A moto server of our own (STS + a "customer" S3), so a test may turn on IAM enforcement
/// without affecting other tests.
pub struct MotoProcess {
    pub port: u16,
    child: Option<Child>,
}

impl MotoProcess {
    pub async fn start() -> Option<MotoProcess> {
        let binary = shared_service("MERIDIAN_TEST_MOTO_BIN")?;
        let port = free_port();
        let child = Command::new(binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let process = MotoProcess {
            port,
            child: Some(child),
        };
        let ready = format!("{}/moto-api/", process.url());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&ready)
            .await
            .is_ok_and(|response| response.status().is_success())
        {
            assert!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(process)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for MotoProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A SeaweedFS (`weed mini`) of our own, which a test may stop and start again on the same ports.
pub struct SeaweedProcess {
    pub dir: tempfile::TempDir,
    ports: Vec<u16>,
    child: Option<Child>,
}

impl SeaweedProcess {
    pub async fn start() -> Option<SeaweedProcess> {
        shared_service("MERIDIAN_TEST_WEED_BIN")?;
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::create_dir_all(dir.path().join("data")).expect("weed data dir");
        let mut process = SeaweedProcess {
            dir,
            ports: (0..10).map(|_| free_port()).collect(),
            child: None,
        };
        process.spawn().await;
        Some(process)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports[0])
    }

    async fn spawn(&mut self) {
        let binary = shared_service("MERIDIAN_TEST_WEED_BIN").expect("weed binary");
        let root = self.dir.path();
        let port = |index: usize| self.ports[index].to_string();
        let child = Command::new(binary)
            .current_dir(root)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .arg("mini")
            .arg(format!("-dir={}", root.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .arg(format!("-s3.port={}", port(0)))
            .arg(format!("-s3.port.grpc={}", port(1)))
            .arg(format!("-master.port={}", port(2)))
            .arg(format!("-master.port.grpc={}", port(3)))
            .arg(format!("-volume.port={}", port(4)))
            .arg(format!("-volume.port.grpc={}", port(5)))
            .arg(format!("-filer.port={}", port(6)))
            .arg(format!("-filer.port.grpc={}", port(7)))
            .arg(format!("-admin.port={}", port(8)))
            .arg(format!("-admin.port.grpc={}", port(9)))
            .args([
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!(
                "-filer.localSocket={}",
                root.join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                root.join("s3.sock").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weed starts");
        self.child = Some(child);
        let health = format!("{}/healthz", self.endpoint());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !reqwest::get(&health)
            .await
            .is_ok_and(|response| response.status().is_success())
        {
            assert!(Instant::now() < deadline, "seaweedfs did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM and wait for exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.spawn().await;
    }
}

impl Drop for SeaweedProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An S3 client for a test endpoint (path-style, static credentials).
pub fn s3_client(endpoint: &str, region: &str) -> aws_sdk_s3::Client {
    let credentials = aws_sdk_s3::config::Credentials::new("test", "test", None, None, "tests");
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(credentials)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

pub async fn create_bucket(client: &aws_sdk_s3::Client, bucket: &str, location: Option<&str>) {
    let mut request = client.create_bucket().bucket(bucket);
    if let Some(location) = location {
        request = request.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(location))
                .build(),
        );
    }
    request
        .send()
        .await
        .unwrap_or_else(|error| panic!("create bucket {bucket}: {error:?}"));
}

/// Every message in every object under `prefix` of a bucket, and the objects' keys.
pub async fn bucket_messages(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> (Vec<serde_json::Value>, Vec<String>) {
    let objects = bucket_objects(client, bucket, prefix).await;
    let keys = objects.iter().map(|(key, _)| key.clone()).collect();
    let messages = objects
        .into_iter()
        .flat_map(|(_, messages)| messages)
        .collect();
    (messages, keys)
}

/// Every object under `prefix` of a bucket: its key and its messages.
pub async fn bucket_objects(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> Vec<(String, Vec<serde_json::Value>)> {
    use std::io::Read;
    let mut objects = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut request = client
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token.clone());
        if !prefix.is_empty() {
            request = request.prefix(prefix);
        }
        let page = request
            .send()
            .await
            .unwrap_or_else(|error| panic!("list {bucket}: {error:?}"));
        for object in page.contents() {
            let key = object.key().unwrap_or_default().to_string();
            let fetched = client
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .expect("get object");
            let body = fetched
                .body
                .collect()
                .await
                .expect("object body")
                .into_bytes();
            let mut text = String::new();
            flate2::read::MultiGzDecoder::new(&body[..])
                .read_to_string(&mut text)
                .unwrap_or_else(|error| panic!("{key} is not gzip: {error}"));
            let messages = text
                .lines()
                .filter(|line| !line.is_empty())
                .map(|line| serde_json::from_str(line).expect("archived line is JSON"))
                .collect();
            objects.push((key, messages));
        }
        match page.next_continuation_token() {
            Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
            _ => break,
        }
    }
    objects
}

/// A region's warehouse (ClickHouse database `database`) and S3 archive (bucket `bucket`), both
/// flushing every `flush_ms`.
pub fn region_block(
    region: &str,
    clickhouse_url: &str,
    database: &str,
    bucket: &str,
    s3_endpoint: &str,
    flush_ms: u64,
) -> String {
    format!(
        "[regions.{region}.clickhouse]\nurls = [\"{clickhouse_url}\"]\ndatabase = \"{database}\"\nflush_interval_ms = {flush_ms}\n\
         [regions.{region}.archive]\nflush_interval_ms = {flush_ms}\n\
         s3 = {{ bucket = \"{bucket}\", endpoint = \"{s3_endpoint}\", force_path_style = true, verify_location = false, access_key_id = \"test\", secret_access_key = \"test\" }}\n"
    )
}

/// The keys of every object under `prefix` of a bucket.
pub async fn bucket_keys(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
) -> std::collections::BTreeSet<String> {
    bucket_objects(client, bucket, prefix)
        .await
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}
