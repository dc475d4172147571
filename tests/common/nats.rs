//! A NATS JetStream cluster of our own: real `nats-server` processes on loopback ports, one store
//! directory each, that a test may kill -9 and restart.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::free_port;
use super::services::shared_service;

struct NatsServer {
    client_port: u16,
    monitor_port: u16,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    pub name: String,
    dir: tempfile::TempDir,
    binary: String,
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers forming the JetStream cluster `name` and waits until JetStream
    /// answers on every one. `None` when the nats-server binary is not given (scripts/test gives
    /// it as MERIDIAN_TEST_NATS_SERVER_BIN; missing under MERIDIAN_REQUIRE_SERVICES=1 is a failure).
    pub async fn start(name: &str, size: usize) -> Option<NatsCluster> {
        NatsCluster::start_with_max_payload(name, size, "8MB").await
    }

    /// As [`NatsCluster::start`], with the servers' `max_payload` (the largest message they take).
    pub async fn start_with_max_payload(
        name: &str,
        size: usize,
        max_payload: &str,
    ) -> Option<NatsCluster> {
        let binary = shared_service("MERIDIAN_TEST_NATS_SERVER_BIN")?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let routes = route_ports
            .iter()
            .map(|port| format!("nats-route://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for (index, route_port) in route_ports.iter().enumerate() {
            let client_port = free_port();
            let monitor_port = free_port();
            let store = dir.path().join(format!("store{index}"));
            let cluster_block = if size > 1 {
                format!(
                    "cluster {{ name: {name}; listen: 127.0.0.1:{route_port}; routes: [{routes}] }}"
                )
            } else {
                String::new()
            };
            let config = format!(
                "server_name: {name}-n{index}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{monitor_port}\nmax_payload: {max_payload}\njetstream {{ store_dir: \"{}\" }}\n{cluster_block}\n",
                store.display()
            );
            let config_path = dir.path().join(format!("n{index}.conf"));
            std::fs::write(&config_path, config).expect("nats config written");
            servers.push(NatsServer {
                client_port,
                monitor_port,
                config_path,
                log_path: dir.path().join(format!("n{index}.log")),
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            name: name.to_string(),
            dir,
            binary,
            servers,
        };
        for index in 0..size {
            cluster.spawn(index);
        }
        for index in 0..size {
            cluster.wait_until_serving(index).await;
        }
        Some(cluster)
    }

    fn spawn(&mut self, index: usize) {
        let server = &mut self.servers[index];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&server.log_path)
            .expect("nats log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&server.config_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        server.child = Some(child);
    }

    /// Waits until the server's JetStream is up and it has found its cluster (its `/healthz`).
    async fn wait_until_serving(&self, index: usize) {
        let url = format!(
            "http://127.0.0.1:{}/healthz",
            self.servers[index].monitor_port
        );
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nats server {index} of {} not healthy within 60 s; its log:\n{}",
                self.name,
                self.log(index)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|server| format!("nats://127.0.0.1:{}", server.client_port))
            .collect()
    }

    /// The servers' urls as a TOML array.
    pub fn urls_toml(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|url| format!("\"{url}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(&self.servers[index].log_path).unwrap_or_default()
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.servers[index].child.is_some()
    }

    /// SIGKILL, and reap.
    pub fn kill_hard(&mut self, index: usize) {
        if let Some(mut child) = self.servers[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed server again on its store and waits until it serves.
    pub async fn restart(&mut self, index: usize) {
        if self.servers[index].child.is_none() {
            self.spawn(index);
        }
        self.wait_until_serving(index).await;
    }

    pub fn size(&self) -> usize {
        self.servers.len()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for index in 0..self.servers.len() {
            self.kill_hard(index);
        }
    }
}

/// The config lines that put every region of `regions` on its cluster (after `[queue]`):
/// `backend = "jetstream"` and one `[regions.<id>.queue.jetstream]` table each, with streams
/// named after `tag` so that tests sharing a cluster never share a stream.
pub fn jetstream_config(regions: &[(&str, &NatsCluster)], tag: &str, extra: &str) -> String {
    let mut config = String::from("backend = \"jetstream\"\n");
    for (region, cluster) in regions {
        config.push_str(&format!(
            "[regions.{region}.queue.jetstream]\nurls = {}\nstream = \"{tag}-{region}\"\nreplicas = {}\nlease_ms = 2000\n{}request_timeout_ms = 3000\n{extra}\n",
            cluster.urls_toml(),
            cluster.size().min(3),
            if extra.contains("max_bytes") { "" } else { "max_bytes = 67108864\n" },
        ));
    }
    config
}
