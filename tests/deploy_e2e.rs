//! The deployment artifacts: the Dockerfile (lint, essentials, and its binary starting with its
//! default config), deploy/ manifests, dashboards and alerts referring to real metrics, and a
//! catalog backup restored into a fresh node.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::services::shared_service;
use common::*;
use serde_json::Value;

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[test]
fn the_dockerfile_passes_hadolint_and_has_the_essentials() {
    let dockerfile = std::fs::read_to_string(repository().join("Dockerfile")).unwrap();
    if let Some(hadolint) = shared_service("MERIDIAN_TEST_HADOLINT_BIN") {
        let output = std::process::Command::new(hadolint)
            .arg(repository().join("Dockerfile"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "hadolint: {}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let instructions: Vec<&str> = dockerfile
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect();
    let froms: Vec<&&str> = instructions
        .iter()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert!(
        froms.len() >= 2 && froms[0].contains(" AS build"),
        "multi-stage"
    );
    assert!(
        froms.last().unwrap().contains("-slim") || froms.last().unwrap().contains("distroless"),
        "small runtime image"
    );
    assert!(
        dockerfile.contains("cargo build --release --locked"),
        "locked release build"
    );
    let user = instructions
        .iter()
        .find(|line| line.starts_with("USER "))
        .expect("USER");
    assert!(
        !user.contains("root") && !user.ends_with(" 0"),
        "non-root user"
    );
    for essential in [
        "HEALTHCHECK ",
        "VOLUME ",
        "LABEL ",
        "EXPOSE ",
        "ENTRYPOINT ",
        "CMD ",
    ] {
        assert!(
            instructions.iter().any(|line| line.starts_with(essential)),
            "{essential}missing"
        );
    }
}

/// The image's CMD, ENV and config file, read from the Dockerfile.
fn image_defaults() -> (Vec<String>, Vec<(String, String)>, PathBuf) {
    let dockerfile = std::fs::read_to_string(repository().join("Dockerfile")).unwrap();
    let joined = dockerfile.replace("\\\n", " ");
    let cmd_line = joined
        .lines()
        .find(|line| line.starts_with("CMD "))
        .expect("CMD");
    let args: Vec<String> =
        serde_json::from_str(cmd_line.trim_start_matches("CMD ").trim()).expect("CMD in JSON form");
    let env_line = joined
        .lines()
        .find(|line| line.starts_with("ENV "))
        .expect("ENV");
    let environment: Vec<(String, String)> = env_line
        .trim_start_matches("ENV ")
        .split_whitespace()
        .filter_map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let config_in_image = args
        .windows(2)
        .find(|pair| pair[0] == "--config")
        .map(|pair| pair[1].clone())
        .expect("--config");
    let copy = joined
        .lines()
        .find(|line| line.starts_with("COPY ") && line.trim_end().ends_with(&config_in_image))
        .expect("the config is copied into the image");
    let source = copy.split_whitespace().nth(1).unwrap();
    (args, environment, repository().join(source))
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn the_release_binary_starts_with_the_images_default_config() {
    let Some(binary) = shared_service("MERIDIAN_TEST_RELEASE_BIN") else {
        return;
    };
    let (args, environment, config_file) = image_defaults();
    assert_eq!(
        environment
            .iter()
            .find(|(key, _)| key == "MERIDIAN_LISTEN")
            .map(|(_, value)| value.as_str()),
        Some("0.0.0.0:8080")
    );
    let data = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = std::process::Command::new(binary);
    for arg in &args {
        command.arg(if arg.ends_with("meridian.toml") {
            config_file.to_str().unwrap()
        } else {
            arg
        });
    }
    for (key, value) in &environment {
        command.env(key, value);
    }
    // The image listens on all interfaces; the test keeps to loopback on a free port.
    command
        .env("MERIDIAN_LISTEN", format!("127.0.0.1:{port}"))
        .env("MERIDIAN_DATA_DIR", data.path());
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let ready = wait_until(Duration::from_secs(60), || {
        let client = client.clone();
        async move {
            client
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200)
        }
    })
    .await;
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(ready, "the image's command became ready");
    assert_eq!(status.code(), Some(0), "and shut down cleanly");
}

#[test]
fn deploy_manifests_are_consistent_and_their_configs_valid() {
    let output = std::process::Command::new("python3")
        .arg(repository().join("tests/helpers/validate_deploy.py"))
        .arg(repository().join("deploy"))
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    for (config, region) in [
        ("deploy/config/eu-west-1.toml", "eu-west-1"),
        ("deploy/config/us-east-1.toml", "us-east-1"),
        ("deploy/config/eu-west-1-jetstream.toml", "eu-west-1"),
        ("deploy/config/us-east-1-jetstream.toml", "us-east-1"),
    ] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["serve", "--check-config", "--config"])
            .arg(repository().join(config))
            .env("MERIDIAN_NODE_REGION", region)
            .env("MERIDIAN_SERVE_REGIONS", region)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut index = 0;
    while let Some(position) = text[index..].find("meridian_") {
        let start = index + position;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_string());
        index = end;
    }
    names
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn dashboards_and_alerts_only_use_metrics_the_service_exports() {
    // With a ClickHouse sink, so that its own series (dead letters) exist too.
    let Some(clickhouse) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = format!("deploy_{}", uuid::Uuid::new_v4().simple());
    let server = TestServer::start(
        &test_config(&format!(
            "[regions.eu-west-1.clickhouse]\nurls = [\"{clickhouse}\"]\ndatabase = \"{database}\"\n"
        )),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    // One rejected message, so that the rejection counter has a series (its labels include the reason).
    let rejected = server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(&key))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 400);
    let exported = server.metrics_text().await;
    let mut available = BTreeSet::new();
    for line in exported.lines().filter(|line| line.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (Some(family), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        available.insert(family.to_string());
        match kind {
            "counter" => {
                available.insert(format!("{family}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    available.insert(format!("{family}{suffix}"));
                }
            }
            _ => {}
        }
    }
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repository().join("deploy/grafana/meridian-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let alerts =
        std::fs::read_to_string(repository().join("deploy/prometheus/alerts.yml")).unwrap();
    let mut used = metric_names_in(&dashboard.to_string());
    used.extend(metric_names_in(&alerts));
    assert!(
        used.len() > 10,
        "the dashboard and alerts use metrics: {used:?}"
    );
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !available.contains(*name))
        .collect();
    assert!(missing.is_empty(), "not exported by /metrics: {missing:?}");
}

#[tokio::test]
async fn a_catalog_backup_restores_into_a_fresh_node() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "us-east-1").await;
    let backup = tempfile::tempdir().unwrap();
    let backup_file = backup.path().join("catalog-backup.db");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["catalog", "backup", "--config"])
        .arg(&server.config_path)
        .arg("--output")
        .arg(&backup_file)
        .env("MERIDIAN_DATA_DIR", &server.data_dir)
        .env("MERIDIAN_JWT_SECRET", JWT_SECRET)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "backup while serving: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(backup_file.exists());
    // Each region's own store (suppressions, deletions, replays) is backed up beside it.
    for region in ["eu-west-1", "us-east-1", "af-south-1", "ap-southeast-1"] {
        let regional = backup.path().join(format!("catalog-backup-{region}.db"));
        assert!(regional.exists(), "{} is missing", regional.display());
    }
    server.kill_hard();

    // A brand-new node whose catalog is the backup.
    let fresh_root = tempfile::tempdir().unwrap();
    let fresh_data = fresh_root.path().join("data");
    std::fs::create_dir_all(&fresh_data).unwrap();
    std::fs::copy(&backup_file, fresh_data.join("catalog.db")).unwrap();
    server.data_dir = fresh_data.clone();
    server.spawn().await;
    let response = server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(&key))
        .json(&serde_json::json!({"userId": "u", "event": "after restore"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the restored catalog knows the key");
    assert_eq!(response.headers()["x-region"], "us-east-1");
    let owner = server.issue_token("owner", Some("acme"));
    let (status, project) = server
        .admin(
            reqwest::Method::GET,
            &format!("/admin/projects/{project_id}"),
            &owner,
            None,
        )
        .await;
    assert_eq!(
        (status, project["region"].as_str()),
        (200, Some("us-east-1"))
    );
    assert!(Path::new(&fresh_data).join("catalog.db").exists());
}
