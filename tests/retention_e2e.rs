//! Retention for real: data of controlled received days, seeded straight into the region's
//! archive (SeaweedFS) and ClickHouse, on both sides of each cutoff. The dry run lists exactly
//! what is past the window and deletes nothing; the janitor then removes exactly those days from
//! both stores, nothing younger, audits and counts it; a replay cannot reach past retention.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::services::*;
use common::*;
use meridian_core::timestamp::{MILLIS_PER_DAY, format_rfc3339_ms, now_unix_ms, utc_day_start_ms};
use reqwest::Method;
use serde_json::{Value, json};

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn day(day_start_ms: i64) -> String {
    format_rfc3339_ms(day_start_ms)[..10].to_string()
}

/// The start of today (UTC), and the clock offset that puts a node at noon of it: the cutoffs
/// this test expects must not move between seeding and the janitor's run, whatever the time of
/// day the test runs at (the node's clock then has twelve hours before midnight).
fn today_at_noon() -> (i64, String) {
    let now = now_unix_ms();
    let today = utc_day_start_ms(now);
    let offset_ms = today + MILLIS_PER_DAY / 2 - now;
    (today, offset_ms.to_string())
}

async fn audit_entries(server: &TestServer, token: &str, action: &str) -> Vec<Value> {
    let (status, audit) = server
        .admin(Method::GET, "/admin/orgs/acme/audit", token, None)
        .await;
    assert_eq!(status, 200, "{audit}");
    audit["items"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|entry| entry["action"] == action)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_exactly_the_days_past_the_window_in_both_stores_after_a_dry_run_that_deletes_nothing()
 {
    let (Some(clickhouse), Some(s3)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_S3_ENDPOINT"),
    ) else {
        return;
    };
    let (database, bucket) = (unique("retention_"), unique("retention-"));
    let s3_client = s3_client(&s3, "us-east-1");
    create_bucket(&s3_client, &bucket, None).await;
    let config = test_config(&region_block(
        "eu-west-1",
        &clickhouse,
        &database,
        &bucket,
        &s3,
        100,
    ));
    let (today, clock_offset) = today_at_noon();
    let server = TestServer::start(
        &config,
        &[(
            meridian_core::timestamp::TEST_CLOCK_OFFSET_VARIABLE,
            clock_offset.as_str(),
        )],
    )
    .await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let token = server.issue_token("owner", Some("acme"));
    let days_ago = |days: i64| today - days * MILLIS_PER_DAY;

    // Today's data, through the API (this also creates the warehouse table).
    let live: Vec<Value> = (0..10)
        .map(|n| json!({"type": "track", "userId": "u", "event": "Live", "messageId": format!("live-{n}")}))
        .collect();
    server.send_and_deliver(&key, &live).await;
    let project_prefix = format!("segment-logs/{project_id}/");
    let live_objects = bucket_keys(&s3_client, &bucket, &project_prefix).await;
    assert!(!live_objects.is_empty(), "today's data is archived");

    // Archive objects of older received days (archive_days = 3: the cutoff is 3 days before
    // today; days 10 and 4 ago are past it, 3 and 2 ago are not).
    let mut expired_objects = BTreeSet::new();
    let mut kept_objects = live_objects.clone();
    for (days, objects) in [(10, 1), (4, 2), (3, 1), (2, 1)] {
        for object in 0..objects {
            let received = format_rfc3339_ms(days_ago(days) + 3_600_000);
            let lines: String = (0..3)
                .map(|n| {
                    format!(
                        "{}\n",
                        json!({"type": "track", "projectId": project_id, "userId": "u",
                               "messageId": format!("seed-{days}-{object}-{n}"), "receivedAt": received})
                    )
                })
                .collect();
            let object_key = format!("{project_prefix}{}/seed-{object}.gz", days_ago(days));
            s3_client
                .put_object()
                .bucket(&bucket)
                .key(&object_key)
                .body(gzip(lines.as_bytes()).into())
                .send()
                .await
                .expect("seed an archive object");
            if days > 3 {
                expired_objects.insert(object_key);
            } else {
                kept_objects.insert(object_key);
            }
        }
    }
    // Warehouse rows of older received days (warehouse_days = 2: the cutoff is the start of the
    // day 2 days ago; the last second before it goes, its first second stays).
    let seeded_rows = [
        ("w10", days_ago(10) + 43_200_000, 3),
        ("w3-late", days_ago(2) - 1000, 2),
        ("w2-early", days_ago(2), 2),
        ("w1", days_ago(1) + 43_200_000, 3),
    ];
    for (tag, received_ms, rows) in seeded_rows {
        let values: Vec<String> = (0..rows)
            .map(|n| {
                format!(
                    "('{project_id}', '{tag}-{n}', 'track', toDateTime({}, 'UTC'), toDateTime({}, 'UTC'), 'eu-west-1')",
                    received_ms / 1000,
                    received_ms / 1000
                )
            })
            .collect();
        clickhouse_query(
            &clickhouse,
            &format!(
                "INSERT INTO {database}.events (project_id, message_id, type, received_at, timestamp, region) VALUES {}",
                values.join(", ")
            ),
        )
        .await;
    }
    let rows_where = |condition: &str| {
        let sql = format!(
            "SELECT count() FROM {database}.events WHERE project_id = '{project_id}'{condition}"
        );
        let clickhouse = clickhouse.clone();
        async move { clickhouse_count(&clickhouse, &sql).await }
    };
    assert_eq!(rows_where("").await, 20);

    // With no retention set, nothing is past it.
    let (status, preview) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/retention"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["archive"]["objects"], 0, "{preview}");
    assert_eq!(preview["warehouse"]["rows"], 0, "{preview}");
    assert_eq!(preview["retention"]["warehouse_days"], Value::Null);

    // The dry run of the settings about to be made lists exactly the expired set.
    let (status, preview) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/retention?warehouse_days=2&archive_days=3"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{preview}");
    assert_eq!(preview["dry_run"], true);
    let listed: BTreeSet<String> = preview["archive"]["listed"]
        .as_array()
        .expect("listed objects")
        .iter()
        .map(|object| object["key"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(listed, expired_objects, "{preview}");
    assert_eq!(preview["archive"]["cutoff"], format_rfc3339_ms(days_ago(3)));
    assert_eq!(
        preview["warehouse"]["by_day"],
        json!([{"day": day(days_ago(10)), "rows": 3}, {"day": day(days_ago(3)), "rows": 2}]),
        "{preview}"
    );
    assert_eq!(preview["warehouse"]["rows"], 5);
    assert_eq!(
        preview["warehouse"]["cutoff"],
        format_rfc3339_ms(days_ago(2))
    );
    // ...and deleted nothing.
    let all_objects = bucket_keys(&s3_client, &bucket, &project_prefix).await;
    assert_eq!(
        all_objects,
        kept_objects.union(&expired_objects).cloned().collect()
    );
    assert_eq!(rows_where("").await, 20);
    assert!(
        audit_entries(&server, &token, "retention.expired")
            .await
            .is_empty()
    );

    // Set it: the janitor runs at once and deletes exactly that.
    let (status, project) = server
        .admin(
            Method::PATCH,
            &format!("/admin/projects/{project_id}"),
            &token,
            Some(json!({"retention": {"warehouse_days": 2, "archive_days": 3}})),
        )
        .await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(project["retention"]["warehouse_days"], 2, "{project}");
    assert_eq!(project["retention"]["archive_days"], 3, "{project}");
    let cleaned = wait_until(Duration::from_secs(60), || async {
        !audit_entries(&server, &token, "retention.expired")
            .await
            .is_empty()
    })
    .await;
    assert!(cleaned, "the janitor ran: {}", server.log());
    let entries = audit_entries(&server, &token, "retention.expired").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let deleted = &entries[0]["after"];
    assert_eq!(
        deleted["archive_objects"],
        expired_objects.len(),
        "{deleted}"
    );
    assert_eq!(deleted["warehouse_rows"], 5, "{deleted}");
    assert_eq!(
        deleted["archive_days"],
        json!([day(days_ago(10)), day(days_ago(4))])
    );
    assert_eq!(entries[0]["target"], project_id.as_str());

    let remaining = bucket_keys(&s3_client, &bucket, &project_prefix).await;
    assert_eq!(
        remaining, kept_objects,
        "only the expired days left the archive"
    );
    assert_eq!(rows_where(" AND message_id LIKE 'w10-%'").await, 0);
    assert_eq!(rows_where(" AND message_id LIKE 'w3-late-%'").await, 0);
    assert_eq!(rows_where(" AND message_id LIKE 'w2-early-%'").await, 2);
    assert_eq!(rows_where(" AND message_id LIKE 'w1-%'").await, 3);
    assert_eq!(rows_where(" AND message_id LIKE 'live-%'").await, 10);
    assert_eq!(rows_where("").await, 15);
    assert_eq!(
        server
            .metric("meridian_retention_deleted_archive_objects_total{region=\"eu-west-1\"}")
            .await,
        Some(expired_objects.len() as f64)
    );
    assert_eq!(
        server
            .metric("meridian_retention_deleted_warehouse_rows_total{region=\"eu-west-1\"}")
            .await,
        Some(5.0)
    );

    // A replay cannot reach past retention; within it, it can.
    let (status, refused) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/replays"),
            &token,
            Some(json!({"from": day(days_ago(5)), "to": day(today)})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["code"], "beyond_retention", "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&day(days_ago(2))),
        "it names the first day it can reach: {refused}"
    );
    let (status, accepted) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/replays"),
            &token,
            Some(json!({"from": day(days_ago(2)), "to": day(today)})),
        )
        .await;
    assert_eq!(status, 202, "{accepted}");

    // A second run finds nothing more to delete and audits nothing.
    let runs_before = server
        .metric("meridian_retention_runs_total{region=\"eu-west-1\",outcome=\"ok\"}")
        .await
        .unwrap_or(0.0);
    let (status, _) = server
        .admin(
            Method::PATCH,
            &format!("/admin/projects/{project_id}"),
            &token,
            Some(json!({"retention": {"archive_days": 3}})),
        )
        .await;
    assert_eq!(status, 200);
    let ran_again = wait_until(Duration::from_secs(60), || async {
        server
            .metric("meridian_retention_runs_total{region=\"eu-west-1\",outcome=\"ok\"}")
            .await
            .unwrap_or(0.0)
            > runs_before
    })
    .await;
    assert!(ran_again, "a second run: {}", server.log());
    assert_eq!(
        audit_entries(&server, &token, "retention.expired")
            .await
            .len(),
        1
    );
    assert_eq!(
        bucket_keys(&s3_client, &bucket, &project_prefix).await,
        kept_objects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_settings_are_checked_audited_and_fall_back_to_the_region_default() {
    let server = TestServer::start(
        &test_config("[regions.eu-west-1.retention]\nwarehouse_days = 30\narchive_days = 90\n"),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (project_id, _) = server.create_project("acme", "eu-west-1").await;
    let token = server.issue_token("owner", Some("acme"));
    let path = format!("/admin/projects/{project_id}");

    let (status, project) = server.admin(Method::GET, &path, &token, None).await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(
        project["retention"],
        json!({"warehouse_days": 30, "archive_days": 90,
               "project_settings": {"warehouse_days": "region_default", "archive_days": "region_default"},
               "region_default": {"warehouse_days": 30, "archive_days": 90}})
    );

    for bad in [
        json!({"retention": {"warehouse_days": 0}}),
        json!({"retention": {"warehouse_days": "forever"}}),
        json!({"retention": {"ttl_days": 3}}),
        json!({"retention": 7}),
        json!({"name": "renamed", "retention": {"archive_days": -1}}),
    ] {
        let (status, body) = server
            .admin(Method::PATCH, &path, &token, Some(bad.clone()))
            .await;
        assert_eq!(status, 400, "{bad} -> {body}");
        assert_eq!(body["code"], "invalid_request", "{body}");
    }
    let (_, project) = server.admin(Method::GET, &path, &token, None).await;
    assert_ne!(
        project["name"], "renamed",
        "a refused retention renames nothing"
    );

    // null keeps for good, whatever the region's default; a number wins over it.
    let (status, project) = server
        .admin(
            Method::PATCH,
            &path,
            &token,
            Some(json!({"retention": {"warehouse_days": null, "archive_days": 7}})),
        )
        .await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(project["retention"]["warehouse_days"], Value::Null);
    assert_eq!(project["retention"]["archive_days"], 7);
    assert_eq!(
        project["retention"]["project_settings"],
        json!({"warehouse_days": "keep", "archive_days": 7})
    );
    let (status, project) = server
        .admin(
            Method::PATCH,
            &path,
            &token,
            Some(json!({"retention": {"warehouse_days": "region_default"}})),
        )
        .await;
    assert_eq!(status, 200, "{project}");
    assert_eq!(project["retention"]["warehouse_days"], 30);
    assert_eq!(project["retention"]["archive_days"], 7);

    let changes = audit_entries(&server, &token, "project.retention").await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(
        changes.iter().any(|entry| entry["before"]
            == json!({"warehouse_days": "keep", "archive_days": 7})
            && entry["after"] == json!({"warehouse_days": "region_default", "archive_days": 7})),
        "{changes:?}"
    );

    // A member of the org may read the project, not change its retention or list what expires.
    let member = server.issue_token("member", Some("acme"));
    let (status, _) = server
        .admin(
            Method::PATCH,
            &path,
            &member,
            Some(json!({"retention": {"archive_days": 1}})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = server
        .admin(Method::GET, &format!("{path}/retention"), &member, None)
        .await;
    assert_eq!(status, 403);
    let (status, body) = server
        .admin(
            Method::GET,
            &format!("{path}/retention?archive_days=soon"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_request", "{body}");
    let (status, body) = server
        .admin(
            Method::GET,
            &format!("{path}/retention?ttl=3"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["code"], "invalid_request",
        "an unknown parameter, in this API's error shape: {body}"
    );
}
