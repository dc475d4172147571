//! The real SDKs, from their registries, driven as their users drive them, against the real
//! binary: Segment's analytics-python, analytics-node and analytics-next (in Chromium), and
//! RudderStack's Python and Node SDKs and its JavaScript SDK v3 in Chromium (default mode and
//! beacon mode). Every event they send is found in the archive of its project's region exactly
//! once. The packages are pinned in tests/sdk (package.json, requirements.txt); scripts/test
//! installs them and sets MERIDIAN_TEST_SDK_DIR.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::services::shared_service;
use common::*;
use serde_json::Value;

/// tests/sdk with its node_modules installed, or `None` (skipped) outside scripts/test.
fn sdk_dir() -> Option<PathBuf> {
    shared_service("MERIDIAN_TEST_SDK_DIR").map(PathBuf::from)
}

/// Runs a driver script; returns the JSON line it printed last.
fn run_driver(mut command: Command, what: &str) -> Value {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{what} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last_line = stdout.lines().rev().find(|line| line.starts_with('{'));
    serde_json::from_str(last_line.unwrap_or(""))
        .unwrap_or_else(|error| panic!("{what} printed no JSON ({error}):\n{stdout}"))
}

/// The archived messages of `project_id` in `region`, counted by messageId.
fn archived_counts(server: &TestServer, region: &str, project_id: &str) -> BTreeMap<String, usize> {
    let messages: Vec<Value> = server
        .archived_messages(region)
        .into_iter()
        .filter(|message| message["projectId"] == project_id)
        .collect();
    count_by_message_id(&messages)
}

/// Waits until the project's archive holds `expected` messages (the sinks flush every 100 ms).
async fn wait_for_archive(server: &TestServer, region: &str, project_id: &str, expected: usize) {
    let arrived = wait_until(Duration::from_secs(30), || async {
        archived_counts(server, region, project_id)
            .values()
            .sum::<usize>()
            >= expected
    })
    .await;
    assert!(
        arrived,
        "{expected} messages of {project_id} in {region}'s archive; found {:?}",
        archived_counts(server, region, project_id)
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sdks_of_segment_and_rudderstack_store_every_event_exactly_once() {
    let Some(sdk_dir) = sdk_dir() else {
        return;
    };
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("sdks").await;
    const COUNT: usize = 50;
    // Each SDK writes to a project of another region: the region's archive, and no other, holds
    // its events.
    let drivers = [
        ("python", "segment", "eu-west-1"),
        ("python", "rudder", "us-east-1"),
        ("node", "segment", "af-south-1"),
        ("node", "rudder", "ap-southeast-1"),
    ];
    let mut report = Vec::new();
    for (language, sdk, region) in drivers {
        let (project_id, key) = server.create_project("sdks", region).await;
        let run = format!(
            "{sdk}-{language}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut command = match language {
            "python" => {
                let mut command = Command::new("python3");
                command.arg(sdk_dir.join("python_sdks.py"));
                command
            }
            _ => {
                let mut command = Command::new("node");
                command.arg(sdk_dir.join("node_sdks.mjs"));
                command
            }
        };
        command
            .current_dir(&sdk_dir)
            .args([sdk, &server.base_url, &key, &run, &COUNT.to_string()]);
        let sent = run_driver(command, &format!("{sdk} {language} SDK"));
        let sent_ids: Vec<String> = sent["message_ids"]
            .as_array()
            .expect("message ids")
            .iter()
            .map(|id| id.as_str().unwrap().to_string())
            .collect();
        assert_eq!(sent_ids.len(), COUNT + 1, "{COUNT} tracks and an identify");
        wait_for_archive(&server, region, &project_id, sent_ids.len()).await;
        let counts = archived_counts(&server, region, &project_id);
        for id in &sent_ids {
            assert_eq!(
                counts.get(id),
                Some(&1),
                "{sdk} {language}: {id} stored once"
            );
        }
        assert_eq!(counts.len(), sent_ids.len(), "nothing else in the project");
        for other_region in ["eu-west-1", "us-east-1", "af-south-1", "ap-southeast-1"] {
            if other_region != region {
                assert!(archived_counts(&server, other_region, &project_id).is_empty());
            }
        }
        report.push(format!(
            "{sdk}-{language}: {} sent, {} stored once each",
            sent_ids.len(),
            counts.len()
        ));
    }
    eprintln!("server SDKs: {}", report.join("; "));
}

/// Runs the browser driver for `mode` (segment, rudder, rudder-beacon); returns what it printed.
fn browser_driver(
    sdk_dir: &std::path::Path,
    server: &TestServer,
    mode: &str,
    key: &str,
    run: &str,
    count: usize,
) -> Value {
    let chromium = shared_service("MERIDIAN_TEST_CHROMIUM_BIN").expect("chromium");
    let mut command = Command::new("python3");
    command
        .arg(sdk_dir.join("browser_sdks.py"))
        .current_dir(sdk_dir)
        .env("CHROMIUM", chromium)
        .env("SDK_DIR", sdk_dir)
        .args([mode, &server.base_url, key, run, &count.to_string()]);
    run_driver(command, &format!("the {mode} browser SDK"))
}

/// Checks that the project's archive holds each of the run's `count` track events (by
/// `properties.seq`) once, and its identify, each with its own messageId.
fn assert_browser_events_stored_once(
    server: &TestServer,
    region: &str,
    project_id: &str,
    run: &str,
    count: usize,
) {
    let messages: Vec<Value> = server
        .archived_messages(region)
        .into_iter()
        .filter(|message| message["projectId"] == project_id)
        .collect();
    let mut by_seq: BTreeMap<u64, usize> = BTreeMap::new();
    for message in messages
        .iter()
        .filter(|message| message["properties"]["run"] == run)
    {
        *by_seq
            .entry(message["properties"]["seq"].as_u64().expect("seq"))
            .or_default() += 1;
    }
    let expected: BTreeMap<u64, usize> = (0..count as u64).map(|seq| (seq, 1)).collect();
    assert_eq!(by_seq, expected, "each track event once");
    let identifies = messages
        .iter()
        .filter(|message| message["type"] == "identify")
        .count();
    assert_eq!(identifies, 1, "the identify once");
    let ids = count_by_message_id(&messages);
    assert!(
        ids.values().all(|count| *count == 1),
        "every messageId once: {ids:?}"
    );
    assert_eq!(ids.len(), count + 1);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_sdks_from_another_origin_store_every_event_exactly_once() {
    let Some(sdk_dir) = sdk_dir() else {
        return;
    };
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("browsers").await;
    const COUNT: usize = 14;
    let mut report = Vec::new();
    for (mode, region) in [
        ("segment", "eu-west-1"),
        ("rudder", "us-east-1"),
        ("rudder-beacon", "ap-southeast-1"),
    ] {
        let (project_id, key) = server.create_project("browsers", region).await;
        let run = format!("{mode}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let seen = browser_driver(&sdk_dir, &server, mode, &key, &run, COUNT);
        wait_for_archive(&server, region, &project_id, COUNT + 1).await;
        assert_browser_events_stored_once(&server, region, &project_id, &run, COUNT);
        let requests = seen["requests"].as_array().cloned().unwrap_or_default();
        let posts: Vec<&Value> = requests
            .iter()
            .filter(|request| request["method"] == "POST")
            .collect();
        match mode {
            "rudder" => {
                // One POST per event, with the SDK's own headers through the preflight.
                assert!(
                    posts
                        .iter()
                        .all(|post| post["headers"].to_string().contains("anonymousid"))
                );
                assert!(posts.iter().any(|post| post["path"] == "/v1/track"));
            }
            "rudder-beacon" => {
                assert!(
                    posts.iter().all(|post| post["path"] == "/beacon/v1/batch"),
                    "{posts:?}"
                );
            }
            _ => {}
        }
        report.push(format!(
            "{mode}: {} tracks and an identify stored once each, {} requests",
            COUNT,
            posts.len()
        ));
    }
    eprintln!("browser SDKs: {}", report.join("; "));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rudderstack_browser_retries_carry_their_headers_through_the_preflight() {
    let Some(sdk_dir) = sdk_dir() else {
        return;
    };
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("retries").await;
    let (project_id, key) = server.create_project("retries", "eu-west-1").await;
    assert_eq!(server.terminate(), Some(0));
    // Two messages a second: most of the page's requests are answered 429 + Retry-After, and the
    // SDK retries them with its Rsa-Retry-* headers, which the preflight must allow.
    std::fs::write(
        &server.config_path,
        test_config(&format!(
            "[rate_limits.projects]\n{project_id} = {{ messages_per_second = 2, burst = 2 }}\n"
        )),
    )
    .unwrap();
    server.spawn().await;
    const COUNT: usize = 6;
    let run = format!("retry-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let seen = browser_driver(&sdk_dir, &server, "rudder", &key, &run, COUNT);
    wait_for_archive(&server, "eu-west-1", &project_id, COUNT + 1).await;
    assert_browser_events_stored_once(&server, "eu-west-1", &project_id, &run, COUNT);
    let requests = seen["requests"].as_array().cloned().unwrap_or_default();
    let limited = requests
        .iter()
        .filter(|request| request["status"] == 429)
        .count();
    let retried = requests
        .iter()
        .filter(|request| request["headers"].to_string().contains("rsa-retry-attempt"))
        .count();
    eprintln!(
        "rudder retries: {limited} answers 429, {retried} retried requests, all {COUNT} events stored once"
    );
    assert!(limited >= 1, "the rate limit answered 429: {requests:?}");
    assert!(
        retried >= 1,
        "retries carried Rsa-Retry-Attempt: {requests:?}"
    );
}
