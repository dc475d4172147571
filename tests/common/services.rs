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
