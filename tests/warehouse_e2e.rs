//! The warehouse analysts use: a time-range question reads its range (not the project's history),
//! insights equal a direct count, and only a node of the project's region answers them. Run by
//! scripts/test on ClickHouse 18.16 and again on a current engine (chdb 26.x behind
//! tests/warehouse/chdb_http.py): `MERIDIAN_TEST_CLICKHOUSE_URL` names the engine.

mod common;

use std::time::Duration;

use common::cluster::fresh_postgres_database;
use common::services::{clickhouse_count, clickhouse_query, shared_service};
use common::*;
use meridian_clickhouse::{InsightsRange, Interval};
use reqwest::Method;
use serde_json::{Value, json};

const DAY_MS: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z
const FIRST_DAY_MS: i64 = 1_767_225_600_000;
const DAYS: i64 = 64;
const ROWS_PER_DAY: i64 = 3_000;
/// Rows of a granule (the table's `index_granularity`).
const GRANULE: u64 = 8_192;

fn unique_database() -> String {
    format!("meridian_{}", uuid::Uuid::new_v4().simple())
}

fn clickhouse_block(region: &str, url: &str, database: &str) -> String {
    format!(
        "[regions.{region}.clickhouse]\nurls = [\"{url}\"]\ndatabase = \"{database}\"\nflush_interval_ms = 100\nrequest_timeout_secs = 10\n"
    )
}

/// Rows of `DAYS` days of one project, inserted by SQL into the table the product created: the
/// same columns the sink writes, a thousand times faster than through ingest. Every tenth
/// message is stored twice (a copy, as a retry leaves until merges), which a count must not see.
async fn insert_history(url: &str, database: &str, project_id: &str) {
    let rows = DAYS * ROWS_PER_DAY;
    let spacing_seconds = 86_400 / ROWS_PER_DAY;
    for copy in ["", " WHERE number % 10 = 0"] {
        clickhouse_query(
            url,
            &format!(
                "INSERT INTO {database}.events (project_id, message_id, type, event, user_id, timestamp, timestamp_ms, received_at, region) \
                 SELECT '{project_id}', concat('h-', toString(number)), 'track', concat('Event ', toString(number % 7)), \
                 concat('user-', toString(number % 500)), toDateTime(intDiv({first_ms}, 1000) + number * {spacing_seconds}, 'UTC'), \
                 {first_ms} + number * {spacing_seconds} * 1000, toDateTime(intDiv({first_ms}, 1000) + number * {spacing_seconds}, 'UTC'), 'eu-west-1' \
                 FROM numbers({rows}){copy}",
                first_ms = FIRST_DAY_MS,
            ),
        )
        .await;
    }
    clickhouse_query(url, &format!("OPTIMIZE TABLE {database}.events FINAL")).await;
}

/// What ClickHouse read to answer `sql` (its `FORMAT JSON` statistics).
async fn rows_read(url: &str, sql: &str) -> u64 {
    let text = clickhouse_query(url, &format!("{sql} FORMAT JSON")).await;
    let answer: Value = serde_json::from_str(&text).expect("a JSON answer");
    answer["statistics"]["rows_read"]
        .as_u64()
        .expect("rows_read in the statistics")
}

/// Active parts of the months `[from_ms, to_ms)` touches.
async fn parts_touched(url: &str, database: &str, from_ms: i64, to_ms: i64) -> u64 {
    clickhouse_count(
        url,
        &format!(
            "SELECT count() FROM system.parts WHERE database = '{database}' AND table = 'events' AND active \
             AND partition_id >= toString(toYYYYMM(toDateTime(intDiv({from_ms}, 1000), 'UTC'))) \
             AND partition_id <= toString(toYYYYMM(toDateTime(intDiv({to_ms} - 1, 1000), 'UTC')))"
        ),
    )
    .await
}

async fn server_with_history(url: &str, database: &str) -> (TestServer, String) {
    let server = TestServer::start(
        &test_config(&clickhouse_block("eu-west-1", url, database)),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    // The sink creates its tables before its first insert.
    let first = json!({"type": "track", "userId": "u", "event": "First", "messageId": "first",
                       "timestamp": "2025-06-01T00:00:00.000Z"});
    server.send_and_deliver(&key, &[first]).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    insert_history(url, database, &project_id).await;
    (server, project_id)
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_range_question_reads_its_range_not_the_projects_history() {
    let Some(url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let (_server, project_id) = server_with_history(&url, &database).await;
    let history_rows = clickhouse_count(
        &url,
        &format!("SELECT count() FROM {database}.events WHERE project_id = '{project_id}'"),
    )
    .await;
    assert!(history_rows >= (DAYS * ROWS_PER_DAY) as u64);

    // A week (longer than a granule): at most twice its rows, plus a granule per part touched.
    let week = InsightsRange {
        project_id: project_id.clone(),
        from_ms: FIRST_DAY_MS + 40 * DAY_MS,
        to_ms: FIRST_DAY_MS + 47 * DAY_MS,
    };
    let week_rows = clickhouse_count(
        &url,
        &format!(
            "SELECT count() FROM {database}.events WHERE project_id = '{project_id}' \
             AND timestamp_ms >= {} AND timestamp_ms < {}",
            week.from_ms, week.to_ms
        ),
    )
    .await;
    let parts = parts_touched(&url, &database, week.from_ms, week.to_ms).await;
    for sql in [
        meridian_clickhouse::insights::volume_sql(&database, &week, Interval::Day),
        meridian_clickhouse::insights::top_events_sql(&database, &week, 10),
    ] {
        let read = rows_read(&url, &sql).await;
        eprintln!(
            "a week: {read} rows read for {week_rows} rows in range ({history_rows} in the project, {parts} parts)"
        );
        assert!(
            read <= 2 * week_rows + GRANULE * parts,
            "a week read {read} rows for {week_rows} in range ({parts} parts touched)"
        );
    }

    // A day (shorter than a granule): the granules holding it, at most two per part touched.
    let day = InsightsRange {
        project_id: project_id.clone(),
        from_ms: FIRST_DAY_MS + 50 * DAY_MS,
        to_ms: FIRST_DAY_MS + 51 * DAY_MS,
    };
    let parts = parts_touched(&url, &database, day.from_ms, day.to_ms).await;
    let read = rows_read(
        &url,
        &meridian_clickhouse::insights::volume_sql(&database, &day, Interval::Hour),
    )
    .await;
    eprintln!("a day: {read} rows read ({history_rows} in the project)");
    assert!(
        read <= 2 * GRANULE * parts,
        "a day read {read} rows ({parts} parts touched)"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insights_equal_a_direct_count_and_refuse_a_question_that_would_read_too_much() {
    let Some(url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique_database();
    let (server, project_id) = server_with_history(&url, &database).await;
    let token = server.issue_token("member", Some("acme"));
    let from_ms = FIRST_DAY_MS + 10 * DAY_MS;
    let to_ms = FIRST_DAY_MS + 24 * DAY_MS;
    let (from, to) = (
        meridian_core::timestamp::format_rfc3339_ms(from_ms),
        meridian_core::timestamp::format_rfc3339_ms(to_ms),
    );

    let (status, volume) = server
        .admin(
            Method::GET,
            &format!(
                "/admin/projects/{project_id}/insights/volume?from={from}&to={to}&interval=day"
            ),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{volume}");
    let series = volume["series"].as_array().expect("a series");
    assert_eq!(series.len(), 14, "one point per day of the range");
    for (index, point) in series.iter().enumerate() {
        let day_ms = from_ms + index as i64 * DAY_MS;
        let direct = |what: &str| {
            format!(
                "SELECT {what} FROM {database}.events FINAL WHERE project_id = '{project_id}' \
                 AND timestamp_ms >= {day_ms} AND timestamp_ms < {}",
                day_ms + DAY_MS
            )
        };
        assert_eq!(
            point["start"],
            meridian_core::timestamp::format_rfc3339_ms(day_ms)
        );
        assert_eq!(
            point["events"].as_u64(),
            Some(clickhouse_count(&url, &direct("count()")).await),
            "events of {}",
            point["start"]
        );
        assert_eq!(
            point["users"].as_u64(),
            Some(clickhouse_count(&url, &direct("uniqExact(user_id)")).await),
            "users of {}",
            point["start"]
        );
    }

    let (status, top) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/insights/events?from={from}&to={to}&limit=3"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{top}");
    let direct_top = clickhouse_query(
        &url,
        &format!(
            "SELECT event, count() AS events, uniqExact(user_id) FROM {database}.events FINAL \
             WHERE project_id = '{project_id}' AND type = 'track' AND timestamp_ms >= {from_ms} AND timestamp_ms < {to_ms} \
             GROUP BY event ORDER BY events DESC, event LIMIT 3 FORMAT TSV"
        ),
    )
    .await;
    let answered: Vec<String> = top["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|total| {
            format!(
                "{}\t{}\t{}",
                total["event"].as_str().unwrap(),
                total["events"],
                total["users"]
            )
        })
        .collect();
    assert_eq!(answered.join("\n"), direct_top.trim());

    // Questions are checked, and bounded.
    for (query, code) in [
        (format!("from={to}&to={from}"), "invalid_request"),
        (
            "from=2024-01-01&to=2026-01-01".to_string(),
            "range_too_long",
        ),
        ("interval=minute".to_string(), "invalid_request"),
        ("from=yesterday".to_string(), "invalid_request"),
    ] {
        let (status, body) = server
            .admin(
                Method::GET,
                &format!("/admin/projects/{project_id}/insights/volume?{query}"),
                &token,
                None,
            )
            .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], code, "{query}: {body}");
    }
    // A node that lets one question read 10,000 rows refuses this one before reading.
    let mut small = server;
    small.terminate();
    let config = std::fs::read_to_string(&small.config_path).expect("config");
    std::fs::write(
        &small.config_path,
        format!("{config}\n[insights]\nmax_rows_to_read = 10000\n"),
    )
    .expect("config written");
    small.spawn().await;
    let (status, body) = small
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/insights/volume?from={from}&to={to}"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "too_much_data", "{body}");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_of_the_projects_region_answers_insights() {
    let Some(url) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let Some(global_url) = fresh_postgres_database("insights").await else {
        return;
    };
    let database = unique_database();
    let region_urls = "[regions.eu-west-1]\npublic_url = \"https://eu.meridian.example\"\n";
    let eu_node = TestServer::start(
        &test_config(&format!(
            "{}{region_urls}",
            clickhouse_block("eu-west-1", &url, &database)
        )),
        &[
            ("MERIDIAN_CATALOG_URL", global_url.as_str()),
            ("MERIDIAN_NODE_REGION", "eu-west-1"),
        ],
    )
    .await;
    let us_node = TestServer::start(
        &test_config(region_urls),
        &[
            ("MERIDIAN_CATALOG_URL", global_url.as_str()),
            ("MERIDIAN_NODE_REGION", "us-east-1"),
        ],
    )
    .await;
    eu_node.create_org("acme").await;
    let (project_id, key) = eu_node.create_project("acme", "eu-west-1").await;
    eu_node
        .send_and_deliver(
            &key,
            &[json!({"type": "track", "userId": "u", "event": "Here", "messageId": "here"})],
        )
        .await;
    let token = eu_node.issue_token("member", Some("acme"));
    for path in ["volume", "events"] {
        let (status, body) = eu_node
            .admin(
                Method::GET,
                &format!("/admin/projects/{project_id}/insights/{path}"),
                &token,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = us_node
            .admin(
                Method::GET,
                &format!("/admin/projects/{project_id}/insights/{path}"),
                &token,
                None,
            )
            .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "region_not_served", "{body}");
        assert_eq!(body["region"]["id"], "eu-west-1", "{body}");
        assert_eq!(
            body["region"]["url"], "https://eu.meridian.example",
            "{body}"
        );
    }
}
