//! The OpenAPI document served at /openapi.json, and schemathesis fuzzing a live server with it:
//! no 5xx, no response that violates the documented schema.

mod common;

use common::services::shared_service;
use common::*;
use serde_json::Value;

fn run_schemathesis(binary: &str, server: &TestServer, authorization: &str, path_regex: &str) {
    // schemathesis keeps a cache in `.schemathesis/` under its working directory: not in the repo.
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let output = std::process::Command::new(binary)
        .current_dir(scratch.path())
        .args(["run", &server.url("/openapi.json")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        .args(["--header", &format!("Authorization: {authorization}")])
        .args(["--include-path-regex", path_regex])
        // The live event stream never ends by design (each case would wait out the request
        // timeout once the stateful phase finds a real project): tests/console_e2e.rs covers it.
        .args(["--exclude-path-regex", "/events/live$"])
        .args([
            "--max-examples",
            "15",
            "--seed",
            "20261124",
            "--request-timeout",
            "20",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("schemathesis runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems for {path_regex}:\n{report}"
    );
    assert!(
        report.contains("passed"),
        "schemathesis ran test cases:\n{report}"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let Some(schemathesis) = shared_service("MERIDIAN_TEST_SCHEMATHESIS_BIN") else {
        return;
    };
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("fuzz").await;
    let (_, write_key) = server.create_project("fuzz", "eu-west-1").await;

    let document: Value = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    for path in [
        "/v1/track",
        "/v1/batch",
        "/admin/orgs",
        "/admin/projects/{project_id}",
        "/readyz",
    ] {
        assert!(document["paths"].get(path).is_some(), "{path} documented");
    }

    let platform = server.issue_token("platform", None);
    run_schemathesis(
        &schemathesis,
        &server,
        &format!("Bearer {platform}"),
        "^/(admin|healthz|readyz|metrics)",
    );
    run_schemathesis(&schemathesis, &server, &basic_auth(&write_key), "^/v1/");
    assert_eq!(server.health_status().await, 200);
    assert!(!server.log().contains("panicked"), "no panic while fuzzed");
}
