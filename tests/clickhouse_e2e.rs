//! End-to-end with real ClickHouse servers: residency across two regions, exact counts through
//! outages, failover within a region, kill -9, dead letters, and column round-trips.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::services::{ClickHouseProcess, clickhouse_count, clickhouse_query, shared_service};
use common::*;
use serde_json::{Value, json};

fn unique_database() -> String {
    format!("meridian_{}", uuid::Uuid::new_v4().simple())
}

fn clickhouse_block(region: &str, urls: &[String], database: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|url| format!("\"{url}\"")).collect();
    format!(
        "[regions.{region}.clickhouse]\nurls = [{}]\ndatabase = \"{database}\"\nflush_interval_ms = 100\nbatch_max_rows = 2000\nrequest_timeout_secs = 5\n",
        urls.join(", ")
    )
}

async fn post_batch(
    server: &TestServer,
    write_key: &str,
    messages: Vec<Value>,
) -> reqwest::StatusCode {
    server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(write_key))
        .json(&json!({"batch": messages}))
        .send()
        .await
        .map(|response| response.status())
        .unwrap_or(reqwest::StatusCode::SERVICE_UNAVAILABLE)
}

fn track(id: &str) -> Value {
    json!({"type": "track", "userId": "u", "event": "Counted", "messageId": id})
}

/// Polls the count until it equals `expected` or the timeout passes; returns the last count seen.
async fn wait_for_count(url: &str, sql: &str, expected: u64, timeout: Duration) -> u64 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let response = reqwest::Client::new()
            .post(format!("{url}/"))
            .body(sql.to_string())
            .send()
            .await;
        let count = match response {
            Ok(response) => response
                .text()
                .await
                .ok()
                .and_then(|text| text.trim().parse().ok()),
            Err(_) => None,
        };
        if count == Some(expected) || std::time::Instant::now() >= deadline {
            return count.unwrap_or(0);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_sql(database: &str, project_id: &str) -> String {
    format!("SELECT count() FROM {database}.events FINAL WHERE project_id = '{project_id}'")
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_regions_clickhouse_holds_exactly_its_projects_messages() {
    let (Some(eu_url), Some(us_url)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL_2"),
    ) else {
        return;
    };
    let database = unique_database();
    let config = test_config(&format!(
        "{}{}",
        clickhouse_block("eu-west-1", std::slice::from_ref(&eu_url), &database),
        clickhouse_block("us-east-1", std::slice::from_ref(&us_url), &database)
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let projects = [
        (
            "eu-west-1",
            server.create_project("acme", "eu-west-1").await,
        ),
        (
            "eu-west-1",
            server.create_project("acme", "eu-west-1").await,
        ),
        (
            "us-east-1",
            server.create_project("acme", "us-east-1").await,
        ),
    ];
    let mut sent: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for round in 0..20 {
        for (index, (_, (project_id, key))) in projects.iter().enumerate() {
            let messages: Vec<Value> = (0..(5 + index * 3))
                .map(|n| track(&format!("p{index}-r{round}-m{n}")))
                .collect();
            let ids = messages
                .iter()
                .map(|message| message["messageId"].as_str().unwrap().to_string());
            sent.entry(project_id.clone()).or_default().extend(ids);
            assert_eq!(post_batch(&server, key, messages.clone()).await, 200);
            if round % 5 == 0 {
                // A client retry of the same messages: stored once (ReplacingMergeTree + FINAL).
                assert_eq!(post_batch(&server, key, messages).await, 200);
            }
        }
    }
    for (region, (project_id, _)) in &projects {
        let (home, other) = if *region == "eu-west-1" {
            (&eu_url, &us_url)
        } else {
            (&us_url, &eu_url)
        };
        let expected = sent[project_id].len() as u64;
        let stored = wait_for_count(
            home,
            &count_sql(&database, project_id),
            expected,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(
            stored, expected,
            "{project_id} in its own region's ClickHouse"
        );
        let elsewhere = clickhouse_count(
            other,
            &format!("SELECT count() FROM {database}.events WHERE project_id = '{project_id}'"),
        )
        .await;
        assert_eq!(
            elsewhere, 0,
            "{project_id} has no rows in the other region's ClickHouse"
        );
    }
    let migrations = clickhouse_query(
        &eu_url,
        &format!("SELECT DISTINCT version FROM {database}.schema_migrations ORDER BY version"),
    )
    .await;
    assert_eq!(migrations.trim(), "1\n2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_clickhouse_outage_under_load_delays_but_loses_nothing() {
    let Some(mut clickhouse) = ClickHouseProcess::start().await else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        &[clickhouse.url()],
        &database,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;

    let load = Load::start(&server, &[("eu-west-1", key)], 4, "outage");
    tokio::time::sleep(Duration::from_secs(2)).await;
    clickhouse.stop();
    tokio::time::sleep(Duration::from_secs(30)).await;
    clickhouse.restart().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (accepted_by_region, refused) = load.finish().await;
    let accepted: BTreeSet<String> = accepted_by_region.into_values().flatten().collect();
    assert_eq!(refused, 0, "ingestion answered 200 throughout the outage");
    assert!(accepted.len() > 500, "load was applied: {}", accepted.len());
    let expected = accepted.len() as u64;
    let stored = wait_for_count(
        &clickhouse.url(),
        &count_sql(&database, &project_id),
        expected,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        stored, expected,
        "every accepted message reached ClickHouse exactly once"
    );
    let stored_ids = clickhouse_query(
        &clickhouse.url(),
        &format!(
            "SELECT message_id FROM {database}.events FINAL WHERE project_id = '{project_id}'"
        ),
    )
    .await;
    let stored_ids: BTreeSet<String> = stored_ids.lines().map(str::to_string).collect();
    assert_eq!(stored_ids, accepted);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn a_region_with_its_first_replica_down_inserts_into_the_second() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let dead_replica = format!("http://127.0.0.1:{}", free_port());
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        &[dead_replica, eu_url.clone()],
        &database,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let messages: Vec<Value> = (0..25).map(|n| track(&format!("failover-{n}"))).collect();
    assert_eq!(post_batch(&server, &key, messages).await, 200);
    let stored = wait_for_count(
        &eu_url,
        &count_sql(&database, &project_id),
        25,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(stored, 25);
    let metrics = server.metrics_text().await;
    let failovers = metric_value(
        &metrics,
        "meridian_sink_clickhouse_failovers_total{region=\"eu-west-1\"",
    )
    .expect("failover metric");
    assert!(failovers >= 1.0, "the failover was counted");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_inserts_keeps_clickhouse_counts_exact() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        std::slice::from_ref(&eu_url),
        &database,
    ));
    let mut server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let mut accepted = BTreeSet::new();
    let mut next = 0u64;
    for round in 0..5 {
        if round > 0 {
            server.spawn().await;
        }
        let deadline = std::time::Instant::now() + Duration::from_millis(400 + round * 150);
        while std::time::Instant::now() < deadline {
            let messages: Vec<Value> = (0..20).map(|n| track(&format!("k{}-{n}", next))).collect();
            next += 1;
            let ids: Vec<String> = messages
                .iter()
                .map(|m| m["messageId"].as_str().unwrap().to_string())
                .collect();
            if post_batch(&server, &key, messages).await == 200 {
                accepted.extend(ids);
            }
        }
        server.kill_hard();
    }
    server.spawn().await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    let duplicates = clickhouse_query(
        &eu_url,
        &format!("SELECT message_id FROM {database}.events FINAL WHERE project_id = '{project_id}' GROUP BY message_id HAVING count() > 1"),
    )
    .await;
    assert!(
        duplicates.trim().is_empty(),
        "duplicates after FINAL: {duplicates}"
    );
    let stored: BTreeSet<String> = clickhouse_query(
        &eu_url,
        &format!(
            "SELECT message_id FROM {database}.events FINAL WHERE project_id = '{project_id}'"
        ),
    )
    .await
    .lines()
    .map(str::to_string)
    .collect();
    let missing: Vec<_> = accepted.difference(&stored).take(5).collect();
    assert!(
        missing.is_empty(),
        "acknowledged messages missing from ClickHouse: {missing:?}"
    );
    assert!(accepted.len() > 100);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn a_row_clickhouse_rejects_is_dead_lettered_and_the_rest_of_its_batch_stored() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        std::slice::from_ref(&eu_url),
        &database,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    assert_eq!(post_batch(&server, &key, vec![track("before")]).await, 200);
    assert_eq!(
        wait_for_count(
            &eu_url,
            &count_sql(&database, &project_id),
            1,
            Duration::from_secs(60)
        )
        .await,
        1
    );
    // A column whose default ClickHouse refuses to compute for one event name.
    clickhouse_query(&eu_url, &format!("ALTER TABLE {database}.events ADD COLUMN poison_check UInt8 DEFAULT throwIf(event = '__poison__')")).await;

    let mut batch: Vec<Value> = (0..9).map(|n| track(&format!("fine-{n}"))).collect();
    batch.insert(
        4,
        json!({"type": "track", "userId": "u", "event": "__poison__", "messageId": "poison"}),
    );
    assert_eq!(post_batch(&server, &key, batch).await, 200);
    assert_eq!(
        wait_for_count(
            &eu_url,
            &count_sql(&database, &project_id),
            10,
            Duration::from_secs(60)
        )
        .await,
        10,
        "the nine good rows are stored"
    );
    let dead_letter_path = server
        .data_dir
        .join("dead-letter/eu-west-1/clickhouse.ndjson");
    let appeared = wait_until(Duration::from_secs(30), || async {
        dead_letter_path.exists()
    })
    .await;
    assert!(appeared, "dead-letter file written");
    let dead_letters: Vec<Value> = std::fs::read_to_string(&dead_letter_path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(dead_letters.len(), 1, "{dead_letters:?}");
    assert!(
        dead_letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("throwIf"),
        "reason kept: {}",
        dead_letters[0]
    );
    let message: Value =
        serde_json::from_str(dead_letters[0]["message"].as_str().unwrap()).unwrap();
    assert_eq!(message["messageId"], "poison");
    let poison_rows = clickhouse_count(
        &eu_url,
        &format!("SELECT count() FROM {database}.events WHERE message_id = 'poison'"),
    )
    .await;
    assert_eq!(poison_rows, 0);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await,
        "the queue is not blocked"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn a_full_dead_letter_file_keeps_the_batch_queued_until_there_is_room() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let block = clickhouse_block("eu-west-1", std::slice::from_ref(&eu_url), &database);
    let tight = test_config(&format!("{block}dead_letter_budget_bytes = 100\n"));
    let mut server = TestServer::start(&tight, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    assert_eq!(post_batch(&server, &key, vec![track("before")]).await, 200);
    assert_eq!(
        wait_for_count(
            &eu_url,
            &count_sql(&database, &project_id),
            1,
            Duration::from_secs(60)
        )
        .await,
        1
    );
    clickhouse_query(&eu_url, &format!("ALTER TABLE {database}.events ADD COLUMN poison_check UInt8 DEFAULT throwIf(event = '__poison__')")).await;
    let mut batch: Vec<Value> = (0..4).map(|n| track(&format!("fine-{n}"))).collect();
    batch.push(
        json!({"type": "track", "userId": "u", "event": "__poison__", "messageId": "poison"}),
    );
    assert_eq!(post_batch(&server, &key, batch).await, 200);
    let refused = wait_until(Duration::from_secs(60), || async {
        server
            .node_status()
            .await
            .to_string()
            .contains("dead-letter file is full")
    })
    .await;
    assert!(refused, "the sink reports the full dead-letter file");
    let dead_letter_path = server
        .data_dir
        .join("dead-letter/eu-west-1/clickhouse.ndjson");
    assert!(
        !dead_letter_path.exists(),
        "nothing written past the budget"
    );
    assert!(
        server
            .metric("meridian_sink_pending_records{region=\"eu-west-1\",sink=\"clickhouse\"}")
            .await
            .is_some_and(|pending| pending > 0.0),
        "the batch stays queued"
    );
    assert_eq!(
        server
            .metric(
                "meridian_sink_dead_letter_budget_bytes{region=\"eu-west-1\",sink=\"clickhouse\"}"
            )
            .await,
        Some(100.0)
    );

    // With room again, the batch goes through: the rejected row is dead-lettered, nothing lost.
    server.kill_hard();
    std::fs::write(&server.config_path, test_config(&block)).unwrap();
    server.spawn().await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    assert_eq!(
        clickhouse_count(&eu_url, &count_sql(&database, &project_id)).await,
        5
    );
    let dead_letters = std::fs::read_to_string(&dead_letter_path).unwrap();
    assert_eq!(dead_letters.lines().count(), 1);
    assert!(dead_letters.contains("poison"));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn stored_columns_round_trip() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        std::slice::from_ref(&eu_url),
        &database,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let properties = json!({"名前": "テスト 🚀", "nested": {"list": [1, null, {"deep": true}], "none": null}, "price": 9.99});
    let sent = json!({"batch": [
        {"type": "track", "userId": "ユーザー-1", "anonymousId": null, "event": "Ordered 🛒", "messageId": "rt-1",
         "properties": properties, "timestamp": "2026-11-24T06:12:24.500+01:00", "sentAt": "2026-11-24T06:12:26.000+01:00",
         "context": {"library": {"name": "analytics-python", "version": "2.4.0"}, "locale": "fr-FR"}},
        {"type": "identify", "userId": "u2", "messageId": "rt-2", "traits": {"email": "é@example.com"}},
        {"type": "page", "anonymousId": "a3", "name": "Home", "messageId": "rt-3"},
        {"type": "group", "userId": "u4", "groupId": "g4", "messageId": "rt-4"},
        {"type": "alias", "userId": "u5", "previousId": "p5", "messageId": "rt-5"},
    ]});
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&sent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        wait_for_count(
            &eu_url,
            &count_sql(&database, &project_id),
            5,
            Duration::from_secs(60)
        )
        .await,
        5
    );
    let rows_text = clickhouse_query(
        &eu_url,
        &format!("SELECT * FROM {database}.events FINAL WHERE project_id = '{project_id}' ORDER BY message_id FORMAT JSONEachRow"),
    )
    .await;
    let rows: BTreeMap<String, Value> = rows_text
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|row| (row["message_id"].as_str().unwrap().to_string(), row))
        .collect();
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

    let first = &rows["rt-1"];
    assert_eq!(first["type"], "track");
    assert_eq!(first["user_id"], "ユーザー-1");
    assert_eq!(first["anonymous_id"], "");
    assert_eq!(first["event"], "Ordered 🛒");
    assert_eq!(first["region"], "eu-west-1");
    assert_eq!(
        serde_json::from_str::<Value>(first["properties"].as_str().unwrap()).unwrap(),
        properties
    );
    assert_eq!(first["library_name"], "analytics-python");
    assert_eq!(first["library_version"], "2.4.0");
    let raw: Value = serde_json::from_str(first["raw"].as_str().unwrap()).unwrap();
    assert_eq!(
        raw, archived["rt-1"],
        "the whole stored message, as archived"
    );
    // Skew correction: timestamp = receivedAt - (sentAt - originalTimestamp) = receivedAt - 1.5 s.
    let received_at_ms =
        meridian_core::timestamp::parse_timestamp_ms(raw["receivedAt"].as_str().unwrap()).unwrap();
    assert_eq!(
        first["timestamp_ms"]
            .as_i64()
            .or_else(|| first["timestamp_ms"].as_str()?.parse().ok()),
        Some(received_at_ms - 1_500)
    );
    // 18.16 keeps seconds (DateTime); a current server milliseconds (DateTime64(3)).
    let time_text = |unix_ms: i64| {
        let text = meridian_core::timestamp::format_rfc3339_ms(unix_ms).replace('T', " ");
        let seconds_only = first["sent_at"]
            .as_str()
            .is_some_and(|sent| sent.len() == 19);
        text[..if seconds_only { 19 } else { 23 }].to_string()
    };
    assert_eq!(first["timestamp"], time_text(received_at_ms - 1_500));
    assert_eq!(first["original_timestamp"], time_text(1_795_497_144_500));
    assert_eq!(first["sent_at"], time_text(1_795_497_146_000));

    assert_eq!(
        serde_json::from_str::<Value>(rows["rt-2"]["traits"].as_str().unwrap()).unwrap()["email"],
        "é@example.com"
    );
    assert_eq!(rows["rt-2"]["original_timestamp"], Value::Null);
    assert_eq!(rows["rt-3"]["name"], "Home");
    assert_eq!(rows["rt-3"]["anonymous_id"], "a3");
    assert_eq!(rows["rt-4"]["group_id"], "g4");
    assert_eq!(rows["rt-5"]["previous_id"], "p5");
    for (id, row) in &rows {
        let raw: Value = serde_json::from_str(row["raw"].as_str().unwrap()).unwrap();
        assert_eq!(
            raw, archived[id],
            "{id}: ClickHouse and the archive hold the same message"
        );
    }
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_timestamp_crosses_midnight_or_a_month_counts_once() {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        std::slice::from_ref(&eu_url),
        &database,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    // Each copy is its own request, as an SDK's retry is; their timestamps differ as skew
    // correction of two deliveries can make them, on either side of a boundary.
    let copies = [
        ("across-midnight", "2026-03-10T23:59:59.900Z"),
        ("across-midnight", "2026-03-11T00:00:00.100Z"),
        ("across-a-month", "2026-01-31T23:59:59.950Z"),
        ("across-a-month", "2026-02-01T00:00:00.050Z"),
        ("across-a-year", "2025-12-31T23:59:59.999Z"),
        ("across-a-year", "2026-01-01T00:00:00.001Z"),
        ("sent-once", "2026-03-10T12:00:00.000Z"),
    ];
    for (message_id, timestamp) in copies {
        let message = json!({"type": "track", "userId": "u", "event": "Retried",
                             "messageId": message_id, "timestamp": timestamp});
        assert_eq!(post_batch(&server, &key, vec![message]).await, 200);
    }
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    // A current server may have merged the copies already: the sink's own count says what it
    // inserted.
    assert_eq!(
        server
            .metric("meridian_sink_clickhouse_rows_inserted_total")
            .await,
        Some(7.0),
        "every copy was inserted (they are separate batches)"
    );
    for message_id in [
        "across-midnight",
        "across-a-month",
        "across-a-year",
        "sent-once",
    ] {
        assert_eq!(
            clickhouse_count(
                &eu_url,
                &format!("SELECT count() FROM {database}.events FINAL WHERE project_id = '{project_id}' AND message_id = '{message_id}'"),
            )
            .await,
            1,
            "{message_id} counts once"
        );
    }
    assert_eq!(
        clickhouse_count(&eu_url, &count_sql(&database, &project_id)).await,
        4
    );

    // An SDK flushing an old offline queue: the same message, without a timestamp of its own,
    // reaches the node again three days later — its stored time would be three days apart.
    let first_copy =
        json!({"type": "track", "userId": "u", "event": "Offline", "messageId": "days-later"});
    assert_eq!(
        post_batch(&server, &key, vec![first_copy.clone()]).await,
        200
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    let stored_time_sql = format!(
        "SELECT DISTINCT timestamp_ms FROM {database}.events WHERE project_id = '{project_id}' AND message_id = 'days-later'"
    );
    let first_time = clickhouse_query(&eu_url, &stored_time_sql).await;
    let mut server = server;
    server.terminate();
    let three_days_ms = (3 * 86_400_000i64).to_string();
    server.extra_env.push((
        meridian_core::timestamp::TEST_CLOCK_OFFSET_VARIABLE.to_string(),
        three_days_ms,
    ));
    server.spawn().await;
    assert_eq!(post_batch(&server, &key, vec![first_copy]).await, 200);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    assert_eq!(
        server
            .metric("meridian_sink_clickhouse_rows_inserted_total")
            .await,
        Some(1.0),
        "the copy was inserted (by the restarted node)"
    );
    assert_eq!(
        clickhouse_query(&eu_url, &stored_time_sql).await,
        first_time,
        "the copy three days later is stored with the first copy's time"
    );
    assert_eq!(
        clickhouse_count(&eu_url, &count_sql(&database, &project_id)).await,
        5,
        "and counts once"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_of_the_identity_keyed_layout_moves_time_first_under_load_and_kill_9_keeping_every_row()
 {
    let Some(eu_url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let config = test_config(&clickhouse_block(
        "eu-west-1",
        std::slice::from_ref(&eu_url),
        &database,
    ));
    // The sink prepares (and moves) its tables before its first insert, not before.
    let mut server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;

    let version = clickhouse_query(&eu_url, "SELECT version()").await;
    let flavor = meridian_clickhouse::ServerVersion::parse(&version)
        .map(meridian_clickhouse::ServerVersion::flavor)
        .unwrap_or(meridian_clickhouse::SchemaFlavor::Legacy);
    let current = meridian_clickhouse::schema::create_events_table(
        &database,
        flavor,
        &meridian_clickhouse::SchemaOptions {
            retention_days: None,
            dedup_window: 100,
        },
    );
    // The layout before: the message's identity only, in one partition.
    let identity_keyed = current.replace(
        "PARTITION BY toYYYYMM(timestamp)\nORDER BY (project_id, toDate(timestamp), message_id)",
        "ORDER BY (project_id, message_id)",
    );
    assert_ne!(identity_keyed, current);
    clickhouse_query(&eu_url, &format!("CREATE DATABASE {database}")).await;
    clickhouse_query(&eu_url, &identity_keyed).await;
    // Old rows: 'a' twice (a retry across midnight, collapsed by the old key; the later copy is
    // the one kept), and enough others that the move takes a while (the node is killed while it
    // runs).
    clickhouse_query(
        &eu_url,
        &format!(
            "INSERT INTO {database}.events (project_id, message_id, type, timestamp, timestamp_ms, received_at, region) VALUES \
             ('{project_id}', 'a', 'track', '2026-01-31 23:59:59', 1769903999000, '2026-01-31 23:59:59', 'eu-west-1')"
        ),
    )
    .await;
    clickhouse_query(
        &eu_url,
        &format!(
            "INSERT INTO {database}.events (project_id, message_id, type, timestamp, timestamp_ms, received_at, region) VALUES \
             ('{project_id}', 'a', 'track', '2026-02-01 00:00:01', 1769904001000, '2026-02-01 00:00:01', 'eu-west-1')"
        ),
    )
    .await;
    const OLD_ROWS: u64 = 400_000;
    clickhouse_query(
        &eu_url,
        &format!(
            "INSERT INTO {database}.events (project_id, message_id, type, timestamp, timestamp_ms, received_at, region) \
             SELECT '{project_id}', concat('old-', toString(number)), 'track', toDateTime(1767225600 + number * 60), \
             (1767225600 + number * 60) * 1000, toDateTime(1767225600 + number * 60), 'eu-west-1' FROM system.numbers LIMIT {OLD_ROWS}"
        ),
    )
    .await;
    assert_eq!(
        clickhouse_count(&eu_url, &count_sql(&database, &project_id)).await,
        OLD_ROWS + 1
    );

    // Messages keep arriving; the node is killed at moments of the seeded schedule and started
    // again, while the sink moves the table.
    let mut schedule = kill_schedule("moves time first under kill -9");
    let mut accepted = BTreeSet::new();
    let mut next = 0u64;
    for _ in 0..4 {
        let run_for = Duration::from_millis(rand::Rng::random_range(&mut schedule, 200..1500));
        let deadline = std::time::Instant::now() + run_for;
        while std::time::Instant::now() < deadline {
            let messages: Vec<Value> = (0..20).map(|n| track(&format!("m{next}-{n}"))).collect();
            next += 1;
            let ids: Vec<String> = messages
                .iter()
                .map(|m| m["messageId"].as_str().unwrap().to_string())
                .collect();
            if post_batch(&server, &key, messages).await == 200 {
                accepted.extend(ids);
            }
        }
        server.kill_hard();
        server.spawn().await;
    }
    // A retry of the old message 'a', on yet another day, joins the row the move kept.
    let retry = json!({"type": "track", "userId": "u", "event": "Counted", "messageId": "a",
                       "timestamp": "2026-02-03T12:00:00.000Z"});
    assert_eq!(post_batch(&server, &key, vec![retry]).await, 200);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(180))
            .await,
        "the sink finished the move and delivered everything"
    );
    let tables = clickhouse_query(
        &eu_url,
        &format!("SELECT name, sorting_key, partition_key FROM system.tables WHERE database = '{database}' AND name LIKE 'events%' FORMAT TSV"),
    )
    .await;
    assert_eq!(
        tables.trim(),
        "events\tproject_id, toDate(timestamp), message_id\ttoYYYYMM(timestamp)",
        "only the time-first table is left"
    );
    assert!(accepted.len() > 100, "load ran: {}", accepted.len());
    let stored_new: BTreeSet<String> = clickhouse_query(
        &eu_url,
        &format!("SELECT message_id FROM {database}.events FINAL WHERE project_id = '{project_id}' AND message_id LIKE 'm%'"),
    )
    .await
    .lines()
    .map(str::to_string)
    .collect();
    assert_eq!(
        stored_new, accepted,
        "every acknowledged message, and nothing else"
    );
    assert_eq!(
        clickhouse_count(&eu_url, &count_sql(&database, &project_id)).await,
        OLD_ROWS + 1 + accepted.len() as u64,
        "every old message and every new one, each once"
    );
    assert_eq!(
        clickhouse_query(
            &eu_url,
            &format!("SELECT DISTINCT timestamp_ms FROM {database}.events WHERE project_id = '{project_id}' AND message_id = 'a' FORMAT TSV"),
        )
        .await
        .trim(),
        "1769904001000",
        "the retry took the kept row's time"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_residency_report_finds_data_of_a_project_pinned_elsewhere() {
    let (Some(eu_url), Some(us_url)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL_2"),
    ) else {
        return;
    };
    let database = unique_database();
    let config = test_config(&format!(
        "{}{}",
        clickhouse_block("eu-west-1", std::slice::from_ref(&eu_url), &database),
        clickhouse_block("us-east-1", std::slice::from_ref(&us_url), &database)
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (eu_project, eu_key) = server.create_project("acme", "eu-west-1").await;
    let (us_project, us_key) = server.create_project("acme", "us-east-1").await;
    assert_eq!(post_batch(&server, &eu_key, vec![track("eu-1")]).await, 200);
    assert_eq!(post_batch(&server, &us_key, vec![track("us-1")]).await, 200);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    assert_eq!(
        wait_for_count(
            &eu_url,
            &count_sql(&database, &eu_project),
            1,
            Duration::from_secs(60)
        )
        .await,
        1
    );
    let report = |region: Option<&str>| {
        let mut command = server.command();
        command
            .args(["residency", "report", "--json", "--config"])
            .arg(&server.config_path);
        if let Some(region) = region {
            command.args(["--region", region]);
        }
        let output = command.output().expect("meridian residency report runs");
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        (
            output.status.success(),
            text,
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (clean, text, errors) = report(None);
    assert!(clean, "a clean two-region run passes:\n{text}\n{errors}");
    let reports: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(reports.as_array().unwrap().len(), 4, "every served region");
    let eu = reports
        .as_array()
        .unwrap()
        .iter()
        .find(|report| report["region"] == "eu-west-1")
        .unwrap();
    assert_eq!(
        eu["projects"][&eu_project]["pinned_region"], "eu-west-1",
        "{eu}"
    );
    assert!(eu["projects"].get(&us_project).is_none(), "{eu}");
    let found_in: Vec<&str> = eu["projects"][&eu_project]["found_in"]
        .as_array()
        .unwrap()
        .iter()
        .map(|store| store.as_str().unwrap())
        .collect();
    for store in ["queue ", "clickhouse ", "archive "] {
        assert!(
            found_in.iter().any(|found| found.starts_with(store)),
            "{store}in {found_in:?}"
        );
    }

    // Plant one us-east-1 row in eu-west-1's ClickHouse and one object in its archive.
    clickhouse_query(
        &eu_url,
        &format!("INSERT INTO {database}.events (project_id, message_id, type, timestamp, received_at, region) VALUES ('{us_project}', 'planted', 'track', now(), now(), 'us-east-1')"),
    )
    .await;
    let planted_key = format!("segment-logs/{us_project}/1795478400000/planted.gz");
    let planted_path = server.data_dir.join("archive/eu-west-1").join(&planted_key);
    std::fs::create_dir_all(planted_path.parent().unwrap()).unwrap();
    std::fs::write(&planted_path, gzip(b"{}\n")).unwrap();

    let (clean, text, errors) = report(Some("eu-west-1"));
    assert!(!clean, "foreign data fails the report:\n{text}\n{errors}");
    let reports: Value = serde_json::from_str(&text).unwrap();
    let findings = reports[0]["findings"].as_array().unwrap().clone();
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(
        findings
            .iter()
            .all(|finding| finding["project_id"] == us_project.as_str()
                && finding["pinned_region"] == "us-east-1")
    );
    assert!(
        findings
            .iter()
            .any(|finding| finding["location"] == "table events"
                && finding["store"].as_str().unwrap().contains(&eu_url))
    );
    assert!(findings.iter().any(|finding| {
        finding["location"]
            .as_str()
            .unwrap()
            .ends_with(&planted_key)
    }));

    let platform = server.issue_token("platform", None);
    let (status, body) = server
        .admin(
            reqwest::Method::GET,
            "/admin/regions/eu-west-1/residency",
            &platform,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["clean"], false);
    assert_eq!(body["findings"].as_array().unwrap().len(), 2, "{body}");
    let owner = server.issue_token("owner", Some("acme"));
    let (status, _) = server
        .admin(
            reqwest::Method::GET,
            "/admin/regions/eu-west-1/residency",
            &owner,
            None,
        )
        .await;
    assert_eq!(status, 403, "platform only");
}
