//! End-to-end: the real binary, every ingest path and auth form, residency of the archive.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

struct Sent {
    message_ids: BTreeSet<String>,
}

/// Posts `body` to `path` with the given auth style; asserts a 200 stamped with `region`.
async fn post_ok(
    server: &TestServer,
    path: &str,
    write_key: &str,
    auth: &str,
    body: Value,
    region: &str,
) {
    let mut body = body;
    let mut request = server.client.post(server.url(path));
    match auth {
        "basic" => request = request.header("Authorization", basic_auth(write_key)),
        "bearer" => request = request.bearer_auth(write_key),
        "body" => {
            body["writeKey"] = json!(write_key);
        }
        other => panic!("unknown auth style {other}"),
    }
    let text = body.to_string();
    let request = if path == "/v1/screen" {
        request
            .header("Content-Encoding", "gzip")
            .body(gzip(text.as_bytes()))
    } else if path.len() == 5 || path == "/v1/group" {
        // The browser short forms and /v1/group: text/plain, as analytics.js sends.
        request.header("Content-Type", "text/plain").body(text)
    } else {
        request
            .header("Content-Type", "application/json")
            .body(text)
    };
    let response = request.send().await.expect("request sent");
    let status = response.status().as_u16();
    let region_header = response
        .headers()
        .get("x-region")
        .map(|v| v.to_str().unwrap().to_string());
    let request_id = response.headers().get("x-request-id").is_some();
    let cors = response
        .headers()
        .get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap().to_string());
    let answer = response.text().await.unwrap();
    assert_eq!(status, 200, "{path} ({auth}) answered {answer}");
    assert_eq!(answer, r#"{"success":true}"#);
    assert_eq!(region_header.as_deref(), Some(region), "{path} X-Region");
    assert!(request_id, "{path} X-Request-Id");
    assert_eq!(cors.as_deref(), Some("*"), "{path} CORS");
}

async fn send_everything(server: &TestServer, write_key: &str, region: &str, tag: &str) -> Sent {
    let mut message_ids = BTreeSet::new();
    let mut next_id = |kind: &str| {
        let id = format!("{tag}-{kind}-{}", message_ids.len());
        message_ids.insert(id.clone());
        id
    };
    let singles: Vec<(&str, &str, Value)> = vec![
        (
            "/v1/track",
            "basic",
            json!({"userId": "u1", "event": "Signed Up", "properties": {"plan": "pro"}}),
        ),
        (
            "/v1/identify",
            "body",
            json!({"userId": "u1", "traits": {"email": "a@example.com"}}),
        ),
        (
            "/v1/page",
            "bearer",
            json!({"anonymousId": "a1", "name": "Home"}),
        ),
        (
            "/v1/screen",
            "basic",
            json!({"userId": "u1", "name": "Dashboard"}),
        ),
        (
            "/v1/group",
            "basic",
            json!({"userId": "u1", "groupId": "g1"}),
        ),
        (
            "/v1/alias",
            "body",
            json!({"userId": "u1", "previousId": "a1"}),
        ),
        (
            "/v1/t",
            "basic",
            json!({"anonymousId": "a2", "event": "Clicked"}),
        ),
        ("/v1/i", "basic", json!({"anonymousId": "a2", "traits": {}})),
        ("/v1/p", "basic", json!({"anonymousId": "a2"})),
        (
            "/v1/s",
            "basic",
            json!({"anonymousId": "a2", "name": "Home"}),
        ),
        (
            "/v1/g",
            "basic",
            json!({"anonymousId": "a2", "groupId": "g2"}),
        ),
        (
            "/v1/a",
            "basic",
            json!({"userId": "u2", "previousId": "a2"}),
        ),
    ];
    for (path, auth, mut body) in singles {
        body["messageId"] = json!(next_id(&path[4..]));
        post_ok(server, path, write_key, auth, body, region).await;
    }
    for (path, auth) in [
        ("/v1/batch", "basic"),
        ("/v1/import", "body"),
        ("/v1/b", "body"),
    ] {
        let batch = json!({
            "batch": [
                {"type": "track", "userId": "u3", "event": "Batched", "messageId": next_id("batch")},
                {"type": "identify", "userId": "u3", "messageId": next_id("batch")},
                {"type": "page", "anonymousId": "a3", "messageId": next_id("batch")},
            ],
            "context": {"library": {"name": "e2e"}},
            "sentAt": "2026-11-24T05:12:27.000Z",
        });
        post_ok(server, path, write_key, auth, batch, region).await;
    }
    Sent { message_ids }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_and_auth_form_lands_in_its_own_regions_archive_only() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let (eu_project, eu_key) = server.create_project("acme", "eu-west-1").await;
    let (us_project, us_key) = server.create_project("acme", "us-east-1").await;

    let eu_sent = send_everything(&server, &eu_key, "eu-west-1", "eu").await;
    let us_sent = send_everything(&server, &us_key, "us-east-1", "us").await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await,
        "sinks drained"
    );

    for (region, project, sent, other_region) in [
        ("eu-west-1", &eu_project, &eu_sent, "us-east-1"),
        ("us-east-1", &us_project, &us_sent, "eu-west-1"),
    ] {
        let archived = server.archived_messages(region);
        let counts = count_by_message_id(&archived);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            sent.message_ids,
            "{region} holds exactly its project's messages"
        );
        assert!(
            counts.values().all(|count| *count == 1),
            "each message once in {region}"
        );
        for message in &archived {
            assert_eq!(message["projectId"], project.as_str());
            assert_eq!(message["region"], region);
            assert!(
                message.get("writeKey").is_none(),
                "write keys are never stored"
            );
            for field in ["receivedAt", "timestamp", "messageId", "type"] {
                assert!(message[field].is_string(), "{field} present in {message}");
            }
        }
        let batched = archived
            .iter()
            .find(|message| message["event"] == "Batched")
            .expect("a batch message");
        assert_eq!(
            batched["context"]["library"]["name"], "e2e",
            "batch context merged"
        );
        assert_eq!(batched["sentAt"], "2026-11-24T05:12:27.000Z");
        let other = server.archived_messages(other_region);
        assert!(
            other
                .iter()
                .all(|message| message["projectId"] != project.as_str()),
            "no {project} message in {other_region}"
        );
    }
    for region in ["af-south-1", "ap-southeast-1"] {
        assert!(
            server.archived_messages(region).is_empty(),
            "nothing in {region}"
        );
    }
    // Object layout: segment-logs/<project>/<day ms>/<start>-<end>.gz
    let eu_root = server
        .data_dir
        .join("archive/eu-west-1/segment-logs")
        .join(&eu_project);
    let day_dirs: Vec<_> = std::fs::read_dir(&eu_root).unwrap().flatten().collect();
    assert!(!day_dirs.is_empty());
    for day in day_dirs {
        let day_ms: i64 = day
            .file_name()
            .to_str()
            .unwrap()
            .parse()
            .expect("day is unix ms");
        assert_eq!(day_ms % 86_400_000, 0);
    }
}

#[tokio::test]
async fn foreign_regions_unknown_keys_and_unknown_routes_are_refused_with_the_node_region() {
    let server =
        TestServer::start(&test_config(""), &[("MERIDIAN_SERVE_REGIONS", "eu-west-1")]).await;
    server.create_org("acme").await;
    let (_, us_key) = server.create_project("acme", "us-east-1").await;
    let (_, eu_key) = server.create_project("acme", "eu-west-1").await;

    let response = server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(&us_key))
        .header("X-Request-Id", "trace-me-123")
        .body(r#"{"userId":"u","event":"e"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert_eq!(response.headers()["x-region"], "eu-west-1");
    assert_eq!(
        response.headers()["x-request-id"],
        "trace-me-123",
        "client request ids are echoed"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["code"], "wrong_region");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("us-east-1") && message.contains("eu-west-1"),
        "{message}"
    );

    for (authorization, expected_code) in [
        (Some(basic_auth("wk_not_a_real_key")), "invalid_api_key"),
        (None, "invalid_api_key"),
        (Some("Basic %%%".to_string()), "invalid_api_key"),
    ] {
        let mut request = server
            .client
            .post(server.url("/v1/track"))
            .body(r#"{"userId":"u","event":"e"}"#);
        if let Some(authorization) = &authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["x-region"], "eu-west-1");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], expected_code);
    }

    for (method, path, status) in [
        (reqwest::Method::GET, "/v1/nothing", 404),
        (reqwest::Method::GET, "/v1/track", 405),
        (reqwest::Method::DELETE, "/healthz", 405),
    ] {
        let response = server
            .client
            .request(method, server.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        assert_eq!(response.headers()["x-region"], "eu-west-1");
        assert!(response.headers().contains_key("x-request-id"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["success"], false);
        assert!(body["code"].is_string() && body["message"].is_string());
    }

    let settings = server
        .client
        .get(server.url(&format!("/v1/projects/{eu_key}/settings")))
        .send()
        .await
        .unwrap();
    assert_eq!(settings.status(), 200);
    assert_eq!(settings.headers()["access-control-allow-origin"], "*");
    assert_eq!(settings.headers()["x-region"], "eu-west-1");
    let settings: Value = settings.json().await.unwrap();
    assert_eq!(
        settings["integrations"]["Segment.io"]["apiKey"],
        eu_key.as_str()
    );
    assert_eq!(
        settings["integrations"]["Segment.io"]["apiHost"],
        format!("127.0.0.1:{}/v1", server.port)
    );

    let metrics = server
        .client
        .post(server.url("/v1/m"))
        .body(r#"{"series":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
}

#[tokio::test]
async fn a_batch_with_bad_messages_stores_the_rest_and_lists_each_rejection() {
    let server = TestServer::start(&test_config("[limits]\nmax_batch_messages = 5"), &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let oversized = "x".repeat(40 * 1024);
    let batch = json!({"batch": [
        {"type": "track", "userId": "u", "event": "Kept", "messageId": "keep-0"},
        {"type": "track", "event": "No user"},
        {"type": "track", "userId": "u", "event": "Huge", "properties": {"blob": oversized}},
        {"type": "identify", "userId": "u", "messageId": "keep-3"},
        {"type": "nonsense", "userId": "u"},
        {"type": "identify", "userId": "u", "messageId": "past-the-limit"},
    ]});
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["accepted"], 2);
    let rejected: Vec<(u64, String)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            (
                entry["index"].as_u64().unwrap(),
                entry["code"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        vec![
            (1, "missing_user_id".to_string()),
            (2, "message_too_large".to_string()),
            (4, "invalid_type".to_string()),
            (5, "batch_too_large".to_string()),
        ]
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let archived = count_by_message_id(&server.archived_messages("eu-west-1"));
    assert_eq!(
        archived.keys().cloned().collect::<Vec<_>>(),
        vec!["keep-0", "keep-3"]
    );

    // A single message that breaks a rule is a 400 naming the rule; nothing valid at all is a 400.
    let response = server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(&key))
        .body(r#"{"userId":"u"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "missing_event"
    );
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&json!({"batch": [{"type": "track"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["rejected"][0]["index"], 0);
}

fn fixture_lines(name: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sdk-requests")
        .join(name);
    std::fs::read_to_string(path)
        .expect("fixture readable")
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).expect("fixture line is JSON"))
        .collect()
}

#[tokio::test]
async fn requests_recorded_from_real_sdks_are_accepted_and_stored() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("sdks").await;
    let mut expected_ids = BTreeSet::new();
    for (file, placeholder) in [
        ("py.jsonl", "wk_py"),
        ("node.jsonl", "wk_node"),
        ("browser.jsonl", "wk_browser"),
    ] {
        let (_, key) = server.create_project("sdks", "eu-west-1").await;
        for recorded in fixture_lines(file) {
            let method =
                reqwest::Method::from_bytes(recorded["method"].as_str().unwrap().as_bytes())
                    .unwrap();
            let path = recorded["path"]
                .as_str()
                .unwrap()
                .replace(placeholder, &key);
            let mut request = server.client.request(method.clone(), server.url(&path));
            for header in recorded["headers"].as_array().unwrap() {
                let (name, value) = (header[0].as_str().unwrap(), header[1].as_str().unwrap());
                match name.to_ascii_lowercase().as_str() {
                    "host" | "content-length" | "connection" | "accept-encoding" => {}
                    "authorization" => request = request.header("Authorization", basic_auth(&key)),
                    _ => request = request.header(name, value),
                }
            }
            let body = recorded["body"]
                .as_str()
                .unwrap_or("")
                .replace(placeholder, &key);
            if let Some(parsed) = recorded.get("json").filter(|json| json.is_object()) {
                let messages = parsed
                    .get("batch")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_else(|| vec![parsed.clone()]);
                for message in messages {
                    if let Some(id) = message["messageId"].as_str() {
                        expected_ids.insert(id.to_string());
                    }
                }
            }
            let response = request.body(body).send().await.unwrap();
            let status = response.status().as_u16();
            let allow_origin = response
                .headers()
                .get("access-control-allow-origin")
                .cloned();
            let answer = response.text().await.unwrap();
            assert!(
                status == 200 || (method == reqwest::Method::OPTIONS && status == 204),
                "{file} {path}: {status} {answer}"
            );
            assert!(allow_origin.is_some(), "{file} {path}: CORS");
        }
    }
    assert!(!expected_ids.is_empty());
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let archived = count_by_message_id(&server.archived_messages("eu-west-1"));
    let archived_ids: BTreeSet<String> = archived.keys().cloned().collect();
    assert_eq!(archived_ids, expected_ids, "every SDK message stored");
    assert!(archived.values().all(|count| *count == 1));
}

#[tokio::test]
async fn browser_settings_that_reflect_the_request_are_never_cached_by_shared_caches() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("settings").await;
    let (_, key) = server.create_project("settings", "eu-west-1").await;
    let forged = server
        .client
        .get(server.url(&format!("/v1/projects/{key}/settings")))
        .header("X-Forwarded-Proto", "javascript")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    let cache_control = forged.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cache_control.starts_with("private"),
        "an answer built from Host/X-Forwarded-Proto is private: {cache_control}"
    );
    let vary = forged.headers()["vary"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        vary.contains("host") && vary.contains("x-forwarded-proto"),
        "{vary}"
    );
    let body: Value = forged.json().await.unwrap();
    assert_eq!(
        body["integrations"]["Segment.io"]["protocol"], "http",
        "an unknown scheme is not reflected"
    );

    let configured = TestServer::start(
        &test_config("[server]\npublic_url = \"https://events.example.com\"\n"),
        &[],
    )
    .await;
    configured.create_org("settings").await;
    let (_, key) = configured.create_project("settings", "eu-west-1").await;
    let shared = configured
        .client
        .get(configured.url(&format!("/v1/projects/{key}/settings")))
        .header("Host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(shared.headers()["cache-control"], "public, max-age=60");
    let body: Value = shared.json().await.unwrap();
    assert_eq!(
        body["integrations"]["Segment.io"]["apiHost"], "events.example.com/v1",
        "the configured host, whatever the request said"
    );
}

#[tokio::test]
async fn bad_envelope_fields_never_cost_the_messages_of_a_batch() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("envelope").await;
    let (_, key) = server.create_project("envelope", "eu-west-1").await;
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&json!({
            "batch": [
                {"type": "track", "userId": "u", "event": "Kept", "messageId": "env-0",
                 "timestamp": "2020-01-01T00:00:00.000Z"},
                {"type": "identify", "userId": "u", "messageId": "env-1"},
            ],
            "sentAt": "soon",
            "context": 3,
            "integrations": ["not", "an", "object"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "SDKs drop a batch answered 400");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["accepted"], 2);
    let fields: BTreeSet<&str> = body["envelope_problems"]
        .as_array()
        .expect("the problems are reported")
        .iter()
        .map(|problem| problem["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["context", "integrations", "sentAt"])
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let archived = server.archived_messages("eu-west-1");
    let kept = archived
        .iter()
        .find(|message| message["messageId"] == "env-0")
        .expect("stored");
    assert_eq!(
        kept["timestamp"], "2020-01-01T00:00:00.000Z",
        "without a usable sentAt the client timestamp is kept as it is"
    );
    assert!(
        archived
            .iter()
            .any(|message| message["messageId"] == "env-1")
    );
}

#[tokio::test]
async fn a_preflight_allows_the_headers_a_browser_sdk_asks_for() {
    let server = TestServer::start(&test_config(""), &[]).await;
    let preflight = |requested: &'static str| {
        let server = &server;
        async move {
            let response = server
                .client
                .request(reqwest::Method::OPTIONS, server.url("/v1/track"))
                .header("Origin", "https://shop.example.com")
                .header("Access-Control-Request-Method", "POST")
                .header("Access-Control-Request-Headers", requested)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 204);
            let header = |name: &str| {
                response
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|value| value.to_str().unwrap().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            (
                header("access-control-allow-headers").to_ascii_lowercase(),
                header("vary"),
                header("access-control-expose-headers"),
            )
        }
    };
    // What RudderStack's JavaScript SDK v3 asks for on a retry.
    let (allowed, vary, exposed) = preflight(
        "anonymousid,authorization,content-type,rsa-retry-attempt,rsa-retry-reason,rsa-since-first-attempt,rsa-since-last-attempt,sentat",
    )
    .await;
    for name in [
        "anonymousid",
        "authorization",
        "rsa-retry-attempt",
        "rsa-since-last-attempt",
        "sentat",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    assert!(vary.contains("Access-Control-Request-Headers"), "{vary}");
    assert!(exposed.contains("Retry-After") && exposed.contains("X-Region"));
    // A list with an invalid name is not reflected: the SDKs' known headers are allowed instead.
    let (allowed, _, _) = preflight("content-type, bad header(x)").await;
    assert!(!allowed.contains("bad header"), "{allowed}");
    assert!(allowed.contains("rsa-recovered") && allowed.contains("x-retry-count"));
}

#[tokio::test]
async fn beacons_carry_the_key_in_the_query_and_are_stored_like_batches() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("beacons").await;
    let (_, key) = server.create_project("beacons", "us-east-1").await;
    // What navigator.sendBeacon sends: text/plain, no Authorization header.
    let beacon = |key: &str, body: Value| {
        let url = server.url(&format!("/beacon/v1/batch?writeKey={key}"));
        let client = server.client.clone();
        async move {
            let response = client
                .post(url)
                .header("Content-Type", "text/plain;charset=UTF-8")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let region = response
                .headers()
                .get("x-region")
                .map(|value| value.to_str().unwrap().to_string());
            (response.status().as_u16(), region)
        }
    };
    let batch = json!({"batch": [
        {"type": "track", "anonymousId": "a1", "event": "Beaconed", "messageId": "beacon-1"},
        {"type": "page", "anonymousId": "a1", "name": "Home", "messageId": "beacon-2"},
    ], "sentAt": "2026-12-07T10:00:00.000Z"});
    assert_eq!(
        beacon(&key, batch.clone()).await,
        (200, Some("us-east-1".to_string()))
    );
    assert_eq!(beacon("wk_not_a_key", batch.clone()).await.0, 401);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let archived = count_by_message_id(&server.archived_messages("us-east-1"));
    assert_eq!(archived.get("beacon-1"), Some(&1));
    assert_eq!(archived.get("beacon-2"), Some(&1));
    assert!(
        !server.log().contains(&key),
        "a key in a URL never reaches the log"
    );
}

#[tokio::test]
async fn the_anonymous_id_and_sent_at_headers_fill_what_the_body_lacks() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("headers").await;
    let (_, key) = server.create_project("headers", "eu-west-1").await;
    let send = |body: Value, anonymous_id: &'static str| {
        let request = server
            .client
            .post(server.url("/v1/track"))
            .header("Authorization", basic_auth(&key))
            .header("AnonymousId", anonymous_id)
            .header("SentAt", "2026-12-07T10:00:10.000Z")
            .header("X-Some-Unknown-Header", "ignored")
            .json(&body);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // No anonymousId or userId in the body: the header supplies the anonymousId.
    assert_eq!(
        send(
            json!({"event": "Header Only", "messageId": "hdr-1", "timestamp": "2026-12-07T10:00:00.000Z"}),
            "anon-from-header"
        )
        .await,
        200
    );
    // The body's own anonymousId wins.
    assert_eq!(
        send(
            json!({"event": "Body Wins", "anonymousId": "anon-from-body", "messageId": "hdr-2"}),
            "anon-from-header"
        )
        .await,
        200
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let archived: BTreeMap<String, Value> = server
        .archived_messages("eu-west-1")
        .into_iter()
        .map(|message| (message["messageId"].as_str().unwrap().to_string(), message))
        .collect();
    let header_only = &archived["hdr-1"];
    assert_eq!(header_only["anonymousId"], "anon-from-header");
    // The SentAt header corrects the clock skew: timestamp = receivedAt - (sentAt - timestamp).
    assert_eq!(header_only["sentAt"], "2026-12-07T10:00:10.000Z");
    let received =
        meridian_core::timestamp::parse_timestamp_ms(header_only["receivedAt"].as_str().unwrap())
            .unwrap();
    let corrected =
        meridian_core::timestamp::parse_timestamp_ms(header_only["timestamp"].as_str().unwrap())
            .unwrap();
    assert_eq!(received - corrected, 10_000, "{header_only}");
    assert_eq!(archived["hdr-2"]["anonymousId"], "anon-from-body");
}
