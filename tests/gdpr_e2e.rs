//! End-to-end GDPR: suppression at the ingress, deletion across ClickHouse and the archive (S3 and
//! local), messages still queued, kill -9 mid-deletion, and residency of the deletion itself.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::services::*;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn send(server: &TestServer, key: &str, users_and_ids: &[(&str, String)]) {
    let batch: Vec<Value> = users_and_ids
        .iter()
        .map(|(user, id)| json!({"type": "track", "userId": user, "event": "Tracked", "messageId": id}))
        .collect();
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(key))
        .json(&json!({"batch": batch}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

fn messages(prefix: &str, user: &'static str, count: usize) -> Vec<(&'static str, String)> {
    (0..count)
        .map(|n| (user, format!("{prefix}-{user}-{n}")))
        .collect()
}

async fn wait_for_deletion(
    server: &TestServer,
    token: &str,
    deletion_id: &str,
    timeout: Duration,
) -> Value {
    let path = format!("/admin/deletions/{deletion_id}");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (status, body) = server.admin(Method::GET, &path, token, None).await;
        assert_eq!(status, 200, "{body}");
        if body["status"] == "done"
            || body["status"] == "failed"
            || std::time::Instant::now() > deadline
        {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn count(url: &str, sql: &str) -> u64 {
    clickhouse_count(url, sql).await
}

/// Every object of `bucket` with its ETag: equal maps before and after mean nothing was written.
async fn etags_by_key(client: &aws_sdk_s3::Client, bucket: &str) -> BTreeMap<String, String> {
    let listing = client
        .list_objects_v2()
        .bucket(bucket)
        .send()
        .await
        .expect("list the bucket");
    listing
        .contents()
        .iter()
        .map(|object| {
            (
                object.key().unwrap_or_default().to_string(),
                object.e_tag().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_user_clears_clickhouse_and_the_archive_including_queued_messages() {
    let (Some(clickhouse), Some(s3)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_S3_ENDPOINT"),
    ) else {
        return;
    };
    let (database, bucket) = (unique("gdpr_"), unique("gdpr-"));
    let s3_client = s3_client(&s3, "us-east-1");
    create_bucket(&s3_client, &bucket, None).await;
    let config = test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n{}",
        region_block("eu-west-1", &clickhouse, &database, &bucket, &s3, 1500)
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;

    // Stored in both sinks before the deletion...
    let first: Vec<_> = [messages("first", "alice", 10), messages("first", "bob", 10)].concat();
    send(&server, &key, &first).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    assert_eq!(
        count(
            &clickhouse,
            &format!(
                "SELECT count() FROM {database}.events FINAL WHERE project_id = '{project_id}'"
            )
        )
        .await,
        20
    );
    // ...and still queued when it is requested (the sinks flush every 1.5 s).
    let queued: Vec<_> = [messages("queued", "alice", 5), messages("queued", "bob", 5)].concat();
    send(&server, &key, &queued).await;

    let admin = server.issue_token("admin", Some("acme"));
    let (status, requested) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/deletions"),
            &admin,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202, "{requested}");
    assert_eq!(requested["status"], "pending");
    let deletion_id = requested["deletion_id"].as_str().unwrap().to_string();
    let done = wait_for_deletion(&server, &admin, &deletion_id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["stores"]["clickhouse"]["rows_deleted"], 10, "{done}");
    assert_eq!(done["stores"]["archive"]["messages_removed"], 10, "{done}");
    assert!(
        done["stores"]["archive"]["objects_rewritten"]
            .as_i64()
            .unwrap()
            >= 1
    );
    let created =
        meridian_core::timestamp::parse_timestamp_ms(done["created_at"].as_str().unwrap()).unwrap();
    let deadline =
        meridian_core::timestamp::parse_timestamp_ms(done["deadline"].as_str().unwrap()).unwrap();
    assert_eq!(deadline - created, 30 * 86_400_000);

    // The deletion also suppressed alice: her new messages are accepted and never stored.
    send(&server, &key, &messages("after", "alice", 3)).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let by_user = |sql_user: &str| {
        format!(
            "SELECT count() FROM {database}.events FINAL WHERE project_id = '{project_id}' AND user_id = '{sql_user}'"
        )
    };
    assert_eq!(
        count(&clickhouse, &by_user("alice")).await,
        0,
        "no row of alice in ClickHouse"
    );
    assert_eq!(
        count(&clickhouse, &by_user("bob")).await,
        15,
        "every row of bob intact"
    );
    let (archived, _) = bucket_messages(&s3_client, &bucket, "").await;
    let counts = count_by_message_id(&archived);
    assert!(
        archived.iter().all(|message| message["userId"] != "alice"),
        "no message of alice in any archive object"
    );
    let bob: Vec<_> = counts
        .iter()
        .filter(|(id, _)| id.contains("-bob-"))
        .collect();
    assert_eq!(bob.len(), 15, "every message of bob archived");
    assert!(bob.iter().all(|(_, n)| **n == 1));

    let metrics = server.metrics_text().await;
    for sink in ["archive", "clickhouse"] {
        let line = format!(
            "meridian_sink_erased_messages_total{{region=\"eu-west-1\",sink=\"{sink}\"}} 5"
        );
        let erased: Vec<&str> = metrics
            .lines()
            .filter(|line| line.contains("erased"))
            .collect();
        assert!(
            metrics.contains(&line),
            "the 5 queued messages of alice were left out by the {sink} sink: {erased:?}"
        );
    }
    let suppressed: f64 = metrics
        .lines()
        .find(|line| line.starts_with("meridian_messages_suppressed_total{region=\"eu-west-1\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(suppressed, 3.0);

    // Done: alice's id is nowhere in the catalog in plaintext (the global catalog and the
    // regional stores, databases and write-ahead logs) ...
    let mut catalog_bytes = Vec::new();
    let mut catalog_files = Vec::new();
    for entry in std::fs::read_dir(&server.data_dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("catalog") && (name.ends_with(".db") || name.ends_with(".db-wal")) {
            catalog_bytes.extend(std::fs::read(server.data_dir.join(&name)).unwrap());
            catalog_files.push(name);
        }
    }
    assert!(
        catalog_files
            .iter()
            .any(|name| name == "catalog-eu-west-1.db"),
        "eu-west-1's regional store, where the deletion was kept, is among {catalog_files:?}"
    );
    assert!(
        !catalog_bytes.windows(5).any(|window| window == b"alice"),
        "the finished deletion left alice's id in the catalog files"
    );
    // ... and the deletion is still provable by recomputing her keyed hash.
    let (status, found) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/deletions?user_id=alice"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(
        found["items"][0]["deletion_id"],
        deletion_id.as_str(),
        "{found}"
    );
    assert_eq!(found["items"][0]["status"], "done");
    assert!(found["items"][0]["finished_at"].is_string(), "{found}");
    let (_, not_deleted) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/deletions?user_id=bob"),
            &admin,
            None,
        )
        .await;
    assert_eq!(not_deleted["items"], json!([]), "{not_deleted}");
    let (_, lookup) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/suppressions/alice"),
            &admin,
            None,
        )
        .await;
    assert_eq!(lookup["suppressed"], true, "{lookup}");

    let owner = server.issue_token("owner", Some("acme"));
    let (_, audit) = server
        .admin(
            Method::GET,
            "/admin/orgs/acme/audit?limit=1000",
            &owner,
            None,
        )
        .await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["action"].as_str().unwrap())
        .collect();
    for expected in [
        "deletion.request",
        "deletion.settle_done",
        "deletion.clickhouse_done",
        "deletion.archive_done",
        "deletion.done",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} in the audit log: {actions:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_in_the_middle_of_a_deletion_then_it_completes_after_restart() {
    let config =
        test_config_with_flush(50, "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 2500\n");
    let mut server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    for round in 0..20 {
        send(
            &server,
            &key,
            &[
                messages(&format!("r{round}"), "alice", 3),
                messages(&format!("r{round}"), "bob", 3),
            ]
            .concat(),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let admin = server.issue_token("admin", Some("acme"));
    let (status, requested) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/deletions"),
            &admin,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202);
    let deletion_id = requested["deletion_id"].as_str().unwrap().to_string();
    let running = wait_until(Duration::from_secs(10), || async {
        let (_, body) = server
            .admin(
                Method::GET,
                &format!("/admin/deletions/{deletion_id}"),
                &admin,
                None,
            )
            .await;
        body["status"] == "running"
    })
    .await;
    assert!(running, "the executor claimed the deletion");
    server.kill_hard();
    server.spawn().await;
    let done = wait_for_deletion(&server, &admin, &deletion_id, Duration::from_secs(60)).await;
    assert_eq!(
        done["status"], "done",
        "completed after the restart: {done}"
    );
    let archived = server.archived_messages("eu-west-1");
    assert!(archived.iter().all(|message| message["userId"] != "alice"));
    let bob = count_by_message_id(&archived)
        .into_iter()
        .filter(|(id, _)| id.contains("-bob-"))
        .count();
    assert_eq!(bob, 60, "nothing of bob lost");
    assert_eq!(done["stores"]["archive"]["messages_removed"], 60);
}

#[tokio::test]
async fn suppression_drops_new_messages_within_a_second_and_lifting_it_restores_collection() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let admin = server.issue_token("admin", Some("acme"));
    let suppression = format!("/admin/projects/{project_id}/suppressions/carol");
    assert_eq!(
        server
            .admin(Method::PUT, &suppression, &admin, None)
            .await
            .0,
        200
    );
    // Effective at once on this node (the key cache refreshes on the change).
    send(
        &server,
        &key,
        &[
            ("carol", "while-suppressed".to_string()),
            ("dave", "dave-1".to_string()),
        ],
    )
    .await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let ids: Vec<String> = count_by_message_id(&server.archived_messages("eu-west-1"))
        .into_keys()
        .collect();
    assert_eq!(
        ids,
        vec!["dave-1"],
        "the suppressed user's message never reached the queue"
    );
    let stats = server.node_status().await;
    assert_eq!(stats["regions"]["eu-west-1"]["pending_records"], 0);
    assert_eq!(
        server
            .admin(Method::DELETE, &suppression, &admin, None)
            .await
            .0,
        204
    );
    send(&server, &key, &[("carol", "after-lifting".to_string())]).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    let ids: Vec<String> = count_by_message_id(&server.archived_messages("eu-west-1"))
        .into_keys()
        .collect();
    assert_eq!(ids, vec!["after-lifting", "dave-1"]);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_in_us_east_1_sends_nothing_to_eu_west_1() {
    let (Some(eu_clickhouse), Some(us_clickhouse), Some(s3)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL_2"),
        shared_service("MERIDIAN_TEST_S3_ENDPOINT"),
    ) else {
        return;
    };
    let database = unique("gdpr_res_");
    let (eu_bucket, us_bucket) = (unique("gdpr-eu-"), unique("gdpr-us-"));
    let s3_client = s3_client(&s3, "us-east-1");
    create_bucket(&s3_client, &eu_bucket, None).await;
    create_bucket(&s3_client, &us_bucket, None).await;
    let config = test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 200\n{}{}",
        region_block("eu-west-1", &eu_clickhouse, &database, &eu_bucket, &s3, 100),
        region_block("us-east-1", &us_clickhouse, &database, &us_bucket, &s3, 100)
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (eu_project, eu_key) = server.create_project("acme", "eu-west-1").await;
    let (us_project, us_key) = server.create_project("acme", "us-east-1").await;
    send(
        &server,
        &eu_key,
        &[messages("eu", "erin", 4), messages("eu", "frank", 4)].concat(),
    )
    .await;
    send(
        &server,
        &us_key,
        &[messages("us", "erin", 4), messages("us", "frank", 4)].concat(),
    )
    .await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );

    let eu_mutations_sql =
        format!("SELECT count() FROM system.mutations WHERE database = '{database}'");
    let eu_mutations_before = count(&eu_clickhouse, &eu_mutations_sql).await;
    let eu_etags_before = etags_by_key(&s3_client, &eu_bucket).await;

    let admin = server.issue_token("admin", Some("acme"));
    let (status, requested) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{us_project}/deletions"),
            &admin,
            Some(json!({"user_ids": ["erin"]})),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(requested["region"], "us-east-1");
    let done = wait_for_deletion(
        &server,
        &admin,
        requested["deletion_id"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["stores"]["clickhouse"]["rows_deleted"], 4);

    let by = |project: &str, user: &str| {
        format!(
            "SELECT count() FROM {database}.events FINAL WHERE project_id = '{project}' AND user_id = '{user}'"
        )
    };
    assert_eq!(
        count(&us_clickhouse, &by(&us_project, "erin")).await,
        0,
        "erased in us-east-1"
    );
    assert_eq!(count(&us_clickhouse, &by(&us_project, "frank")).await, 4);
    assert_eq!(
        count(&eu_clickhouse, &by(&eu_project, "erin")).await,
        4,
        "eu-west-1's rows untouched"
    );
    assert_eq!(
        count(&eu_clickhouse, &eu_mutations_sql).await,
        eu_mutations_before,
        "no mutation was sent to eu-west-1's ClickHouse"
    );
    let eu_etags_after = etags_by_key(&s3_client, &eu_bucket).await;
    assert_eq!(
        eu_etags_after, eu_etags_before,
        "eu-west-1's bucket untouched"
    );
    let (us_archived, _) = bucket_messages(&s3_client, &us_bucket, "").await;
    assert!(
        us_archived
            .iter()
            .all(|message| message["userId"] != "erin")
    );
    assert_eq!(us_archived.len(), 4);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_also_removes_the_users_dead_lettered_messages() {
    let Some(clickhouse) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique("gdpr_dead_");
    let config = test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n[regions.eu-west-1.clickhouse]\nurls = [\"{clickhouse}\"]\ndatabase = \"{database}\"\nflush_interval_ms = 100\n"
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    send(&server, &key, &messages("before", "carol", 1)).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await
    );
    // ClickHouse now refuses every row of one event name: those rows are dead-lettered whole.
    clickhouse_query(
        &clickhouse,
        &format!("ALTER TABLE {database}.events ADD COLUMN poison_check UInt8 DEFAULT throwIf(event = '__poison__')"),
    )
    .await;
    let poisoned: Vec<Value> = [("alice", "dead-alice-0"), ("alice", "dead-alice-1"), ("bob", "dead-bob-0")]
        .iter()
        .map(|(user, id)| json!({"type": "track", "userId": user, "event": "__poison__", "messageId": id}))
        .collect();
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&json!({"batch": poisoned}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let dead_letter_path = server
        .data_dir
        .join("dead-letter/eu-west-1/clickhouse.ndjson");
    let dead_lines = || {
        std::fs::read_to_string(&dead_letter_path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(30), || async {
            dead_lines().len() == 3
        })
        .await,
        "three dead letters: {:?}",
        dead_lines()
    );

    let owner = server.issue_token("owner", Some("acme"));
    let (status, requested) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/deletions"),
            &owner,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202, "{requested}");
    let deletion_id = requested["deletion_id"].as_str().unwrap().to_string();
    let finished = wait_for_deletion(&server, &owner, &deletion_id, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "done", "{finished}");
    let remaining = dead_lines();
    assert_eq!(remaining.len(), 1, "{remaining:?}");
    assert!(
        remaining[0].contains("dead-bob-0"),
        "bob's dead letter stays: {remaining:?}"
    );
    assert!(
        remaining.iter().all(|line| !line.contains("alice")),
        "nothing of alice is left in the dead-letter file"
    );
}
