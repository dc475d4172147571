//! The admin console: in a real browser (headless Chromium driven by Playwright, installed by
//! scripts/test), its security headers, and the live event feed it is built on.

mod common;

use std::time::{Duration, Instant};

use common::services::*;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// A node whose GDPR deletions finish in about a second.
fn console_config(extra: &str) -> String {
    test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n{extra}\n"
    ))
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_console_signs_in_creates_a_project_shows_live_events_and_privacy_requests()
 {
    let Some(chromium) = shared_service("MERIDIAN_TEST_CHROMIUM_BIN") else {
        return;
    };
    let server = TestServer::start(&console_config(""), &[]).await;
    server.create_org("acme").await;
    // The sign-in link of `meridian console login`.
    let output = server
        .command()
        .args(["console", "login", "--config"])
        .arg(&server.config_path)
        .args(["--org", "acme"])
        .output()
        .expect("console login runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let link = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let token = link
        .split_once("/console/#token=")
        .map(|(_, token)| token.to_string())
        .unwrap_or_else(|| panic!("a console link: {link}"));
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let run = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/console/console_test.py"
        ))
        .env("BASE_URL", &server.base_url)
        .env("TOKEN", &token)
        .env("OTHER_TOKEN", server.issue_token("owner", Some("intruder")))
        .env("ARTIFACT_DIR", &artifacts)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("python3 runs the browser test");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser test failed:\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&run.stderr),
        server.log()
    );
    eprintln!(
        "console browser test: {stdout} (screenshots in {})",
        artifacts.display()
    );
    for page in [
        "1-overview",
        "3-live",
        "5-deletion-done",
        "9-audit",
        "10-switch-account",
    ] {
        assert!(
            artifacts.join(format!("{page}.png")).is_file(),
            "{page}.png written"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_responses_carry_a_strict_content_security_policy() {
    let server = TestServer::start(&console_config(""), &[]).await;
    for (path, status, content_type) in [
        ("/console", 200, "text/html"),
        ("/console/", 200, "text/html"),
        ("/console/app.js", 200, "text/javascript"),
        ("/console/app.css", 200, "text/css"),
        ("/console/secrets.txt", 404, "application/json"),
    ] {
        let response = server
            .client
            .get(server.url(path))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), status, "{path}");
        let headers = response.headers();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert!(
            header("content-type").starts_with(content_type),
            "{path}: {}",
            header("content-type")
        );
        let policy = header("content-security-policy");
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(
                policy.contains(directive),
                "{path}: {directive} in {policy}"
            );
        }
        assert!(
            !policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"),
            "{policy}"
        );
        assert_eq!(header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(header("x-frame-options"), "DENY", "{path}");
        assert_eq!(header("referrer-policy"), "no-referrer", "{path}");
        if status == 200 && content_type == "text/html" {
            let page = response.text().await.unwrap_or_default();
            assert!(page.contains(r#"<script src="/console/app.js" defer></script>"#));
            assert_eq!(
                page.matches("<script").count(),
                1,
                "no inline script: {page}"
            );
        }
    }
}

/// Server-sent events of a response, as `(event name, data)`.
struct EventReader {
    response: reqwest::Response,
    buffer: String,
}

impl EventReader {
    /// Reads until `wanted` says stop (or 10 s pass without it); returns every event so far.
    async fn read_until(
        &mut self,
        events: &mut Vec<(String, Value)>,
        mut wanted: impl FnMut(&[(String, Value)]) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !wanted(events) && Instant::now() < deadline {
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk()).await;
            let Ok(Ok(Some(chunk))) = chunk else {
                return;
            };
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_string();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.trim());
                    }
                }
                // Keep-alive comments carry no data.
                if let Ok(value) = serde_json::from_str(&data) {
                    events.push((name, value));
                }
            }
        }
    }
}

/// Sends 300 requests of 10 messages (ids `<tag>-<n>`), one after the other; returns the p50,
/// p99 and slowest answer times.
async fn send_bulk(server: &TestServer, key: &str, tag: &str) -> (Duration, Duration, Duration) {
    let mut times = Vec::with_capacity(300);
    for request in 0..300 {
        let batch: Vec<Value> = (0..10)
            .map(|n| json!({"type": "track", "userId": "bulk", "event": "Bulk", "messageId": format!("{tag}-{}", request * 10 + n)}))
            .collect();
        let sent = Instant::now();
        assert_eq!(server.post_batch(key, &batch).await, 200);
        times.push(sent.elapsed());
    }
    times.sort();
    (times[150], times[296], times[299])
}

async fn subscribe(server: &TestServer, project_id: &str, token: &str) -> reqwest::Response {
    server
        .client
        .get(server.url(&format!("/admin/projects/{project_id}/events/live")))
        .bearer_auth(token)
        .send()
        .await
        .expect("GET events/live")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_feed_is_for_the_org_only_limited_and_a_subscriber_that_never_reads_never_holds_ingest()
 {
    let server = TestServer::start(
        &console_config(
            "[console]\nlive_subscribers_per_project = 2\nlive_events_per_second = 1000000",
        ),
        &[],
    )
    .await;
    server.create_org("acme").await;
    server.create_org("rival").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let member = server.issue_token("member", Some("acme"));
    let stranger = server.issue_token("owner", Some("rival"));

    let refused = subscribe(&server, &project_id, &stranger).await;
    assert_eq!(
        refused.status(),
        404,
        "another org's project does not exist for it"
    );

    // A member watches: accepted, suppressed and rejected messages, with the reason.
    let watching = subscribe(&server, &project_id, &member).await;
    assert_eq!(watching.status(), 200);
    assert!(
        watching
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("text/event-stream"))
    );
    let owner = server.issue_token("owner", Some("acme"));
    let (status, _) = server
        .admin(
            Method::PUT,
            &format!("/admin/projects/{project_id}/suppressions/mallory"),
            &owner,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let suppressed_known = wait_until(Duration::from_secs(10), || async {
        let batch = [
            json!({"type": "track", "userId": "alice", "event": "Seen", "messageId": "seen-1"}),
            json!({"type": "track", "userId": "mallory", "event": "Hidden"}),
            json!({"type": "track", "event": "No user"}),
        ];
        server.post_batch(&key, &batch).await == 200
    })
    .await;
    assert!(suppressed_known);
    let mut watching = EventReader {
        response: watching,
        buffer: String::new(),
    };
    let mut events = Vec::new();
    watching
        .read_until(&mut events, |events| {
            events.iter().any(|(name, _)| name == "rejected")
                && events.iter().any(|(name, _)| name == "accepted")
        })
        .await;
    let accepted = events
        .iter()
        .find(|(name, _)| name == "accepted")
        .map(|(_, event)| event.clone())
        .unwrap_or_default();
    assert_eq!(accepted["message"]["messageId"], "seen-1", "{events:?}");
    assert_eq!(accepted["message"]["projectId"], project_id.as_str());
    assert!(accepted["message"]["receivedAt"].is_string());
    let rejected = events
        .iter()
        .find(|(name, _)| name == "rejected")
        .map(|(_, event)| event.clone())
        .unwrap_or_default();
    assert_eq!(rejected["index"], 2, "{events:?}");
    assert!(
        rejected["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("userId"),
        "{rejected}"
    );

    // Two subscribers per project here; a third is refused.
    let second = subscribe(&server, &project_id, &owner).await;
    assert_eq!(second.status(), 200);
    let third = subscribe(&server, &project_id, &owner).await;
    assert_eq!(third.status(), 429);
    let body: Value = third.json().await.unwrap_or_default();
    assert_eq!(body["code"], "too_many_subscribers");
    drop(second);

    // A subscriber that never reads while 3,000 messages arrive: every request is answered, and
    // afterwards it learns how many it missed — what it received plus what it missed is exactly
    // what was accepted meanwhile (its buffer is bounded; nothing waited for it).
    drop(watching);
    // For the record (not asserted: speed is for benchmarks): the same requests unwatched.
    let unwatched = send_bulk(&server, &key, "plain").await;
    let idle = subscribe(&server, &project_id, &member).await;
    assert_eq!(idle.status(), 200);
    let watched = send_bulk(&server, &key, "bulk").await;
    eprintln!(
        "300 requests of 10 messages, p50 / p99 / slowest: unwatched {unwatched:?}; with a subscriber that does not read {watched:?}"
    );
    let mut idle = EventReader {
        response: idle,
        buffer: String::new(),
    };
    let (mut received, mut missed) = (0u64, 0u64);
    let mut events = Vec::new();
    idle.read_until(&mut events, |events| {
        received = events.iter().filter(|(name, _)| name == "accepted").count() as u64;
        missed = events
            .iter()
            .filter(|(name, _)| name == "skipped")
            .map(|(_, event)| event["count"].as_u64().unwrap_or(0))
            .sum();
        received + missed >= 3000
    })
    .await;
    assert!(
        events.iter().all(|(name, event)| name == "skipped"
            || event["message"]["messageId"]
                .as_str()
                .is_some_and(|id| id.starts_with("bulk-"))),
        "only what arrived after it subscribed"
    );
    assert_eq!(
        received + missed,
        3000,
        "received {received}, missed {missed}"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orgs_volume_counts_each_projects_last_hour_from_its_regions_warehouse() {
    let Some(clickhouse) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = format!(
        "volume_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let server = TestServer::start(
        &console_config(&format!(
            "[regions.eu-west-1.clickhouse]\nurls = [\"{clickhouse}\"]\ndatabase = \"{database}\"\nflush_interval_ms = 100\n"
        )),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (busy, busy_key) = server.create_project("acme", "eu-west-1").await;
    let (quiet, _) = server.create_project("acme", "eu-west-1").await;
    let (elsewhere, _) = server.create_project("acme", "us-east-1").await;
    let batch: Vec<Value> = (0..7)
        .map(|n| json!({"type": "track", "userId": "u", "event": "E", "messageId": format!("v-{n}")}))
        .collect();
    server.send_and_deliver(&busy_key, &batch).await;
    let member = server.issue_token("member", Some("acme"));
    let (status, volume) = server
        .admin(Method::GET, "/admin/orgs/acme/volume", &member, None)
        .await;
    assert_eq!(status, 200, "{volume}");
    assert_eq!(volume["projects"][&busy], 7, "{volume}");
    assert_eq!(volume["projects"][&quiet], 0, "{volume}");
    assert!(volume["projects"].get(&elsewhere).is_none(), "{volume}");
    assert_eq!(volume["unavailable"][0]["region"], "us-east-1", "{volume}");
    let stranger = server.issue_token("owner", Some("rival"));
    let (status, _) = server
        .admin(Method::GET, "/admin/orgs/acme/volume", &stranger, None)
        .await;
    assert_eq!(status, 404);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_browser_the_insights_and_ledger_pages_show_a_projects_events() {
    let (Some(chromium), Some(clickhouse)) = (
        shared_service("MERIDIAN_TEST_CHROMIUM_BIN"),
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
    ) else {
        return;
    };
    let database = format!(
        "insights_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let server = TestServer::start(
        &console_config(&format!(
            "[regions.eu-west-1.clickhouse]\nurls = [\"{clickhouse}\"]\ndatabase = \"{database}\"\nflush_interval_ms = 100\n"
        )),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    // Events at noon of three recent days (event time, as the client stamped it).
    let day_start = |days_ago: i64| {
        let now_ms = meridian_core::timestamp::now_unix_ms();
        now_ms - now_ms.rem_euclid(86_400_000) - days_ago * 86_400_000
    };
    let sent = [
        (3, "Signed Up", "u1"),
        (3, "Signed Up", "u2"),
        (3, "Signed Up", "u3"),
        (2, "Ordered", "u2"),
        (1, "Signed Up", "u4"),
        (1, "Ordered", "u1"),
    ];
    let batch: Vec<Value> = sent
        .iter()
        .enumerate()
        .map(|(index, (days_ago, event, user))| {
            json!({"type": "track", "userId": user, "event": event, "messageId": format!("i-{index}"),
                   "timestamp": meridian_core::timestamp::format_rfc3339_ms(day_start(*days_ago) + 43_200_000)})
        })
        .collect();
    server.send_and_deliver(&key, &batch).await;
    let day = |days_ago: i64| {
        meridian_core::timestamp::format_rfc3339_ms(day_start(days_ago))[..10].to_string()
    };
    let expected = json!({
        "days": {day(3): 3, day(2): 1, day(1): 2},
        "top": [["Signed Up", 4, 4], ["Ordered", 2, 2]],
        "ledger": {"day": day(0), "acknowledged": sent.len()},
    });
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let run = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/console/insights_test.py"
        ))
        .env("BASE_URL", &server.base_url)
        .env("TOKEN", server.issue_token("owner", Some("acme")))
        .env("PROJECT_ID", &project_id)
        .env("EXPECTED", expected.to_string())
        .env("ARTIFACT_DIR", &artifacts)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("python3 runs the browser test");
    assert!(
        run.status.success(),
        "the insights browser test failed:\n{}\n{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr),
        server.log()
    );
}
