//! A region migration for real: eu-west-1 → us-east-1 (each region its own ClickHouse and
//! bucket) while a load sends to the source key the whole time — before, during (with a kill -9
//! of the node in the middle of the copy) and after the cutover. Afterwards us-east-1 holds every
//! message the source ever stored, each once, in its ClickHouse and its bucket, under the target
//! project; eu-west-1 holds nothing of the target project, and the source key is refused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::services::*;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn migration(server: &TestServer, token: &str, migration_id: &str) -> Value {
    let (status, body) = server
        .admin(
            Method::GET,
            &format!("/admin/migrations/{migration_id}"),
            token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The messages of `project`'s objects in a bucket, by messageId.
async fn messages_by_id(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    project: &str,
) -> BTreeMap<String, Vec<Value>> {
    let (messages, _) = bucket_messages(client, bucket, &format!("segment-logs/{project}/")).await;
    let mut by_id: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for message in messages {
        let id = message["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        by_id.entry(id).or_default().push(message);
    }
    by_id
}

/// One node serving eu-west-1 and us-east-1, each with its own ClickHouse database and bucket;
/// an org with a source project in eu-west-1 and a target project in us-east-1.
struct TwoRegions {
    server: TestServer,
    s3_client: aws_sdk_s3::Client,
    clickhouse_eu: String,
    clickhouse_us: String,
    database_eu: String,
    database_us: String,
    bucket_eu: String,
    bucket_us: String,
    source: String,
    source_key: String,
    target: String,
    token: String,
}

async fn two_regions(copy_messages_per_second: u64) -> Option<TwoRegions> {
    let (Some(clickhouse_eu), Some(clickhouse_us), Some(s3)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL_2"),
        shared_service("MERIDIAN_TEST_S3_ENDPOINT"),
    ) else {
        return None;
    };
    let (database_eu, database_us) = (unique("mig_eu_"), unique("mig_us_"));
    let (bucket_eu, bucket_us) = (unique("mig-eu-"), unique("mig-us-"));
    let s3_client = s3_client(&s3, "us-east-1");
    create_bucket(&s3_client, &bucket_eu, None).await;
    create_bucket(&s3_client, &bucket_us, None).await;
    let config = test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n\
         [migration]\nmax_messages_per_second = {copy_messages_per_second}\ntail_interval_ms = 200\n{}{}",
        region_block(
            "eu-west-1",
            &clickhouse_eu,
            &database_eu,
            &bucket_eu,
            &s3,
            100
        ),
        region_block(
            "us-east-1",
            &clickhouse_us,
            &database_us,
            &bucket_us,
            &s3,
            100
        ),
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (source, source_key) = server.create_project("acme", "eu-west-1").await;
    let (target, _) = server.create_project("acme", "us-east-1").await;
    let token = server.issue_token("owner", Some("acme"));
    Some(TwoRegions {
        server,
        s3_client,
        clickhouse_eu,
        clickhouse_us,
        database_eu,
        database_us,
        bucket_eu,
        bucket_us,
        source,
        source_key,
        target,
        token,
    })
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_under_load_with_a_kill_in_the_copy_moves_every_message_exactly_once() {
    // Copies go at 600 messages a second, the load at about half that: the copy catches up, and
    // it takes long enough to be killed in the middle.
    let Some(TwoRegions {
        mut server,
        s3_client,
        clickhouse_eu,
        clickhouse_us,
        database_eu,
        database_us,
        bucket_eu,
        bucket_us,
        source,
        source_key,
        target,
        token,
    }) = two_regions(600).await
    else {
        return;
    };
    let load = Load::spread_over(
        &server.client,
        std::slice::from_ref(&server.base_url),
        &[("eu-west-1", source_key.clone())],
        2,
        "mig",
        Spread::RoundRobin,
        1..=5,
        Duration::from_millis(20),
    );
    let source_prefix = format!("segment-logs/{source}/");
    let archived = wait_until(Duration::from_secs(60), || async {
        bucket_keys(&s3_client, &bucket_eu, &source_prefix)
            .await
            .len()
            >= 20
    })
    .await;
    assert!(archived, "the source has data before the migration");

    let (status, created) = server
        .admin(
            Method::POST,
            "/admin/orgs/acme/migrations",
            &token,
            Some(json!({"source_project": source, "target_project": target})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let migration_id = created["migration_id"]
        .as_str()
        .expect("migration_id")
        .to_string();
    let (status, refused) = server
        .admin(
            Method::POST,
            &format!("/admin/migrations/{migration_id}/complete"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 409, "no cutover before the copy: {refused}");
    assert_eq!(refused["code"], "invalid_transition");
    let (status, started) = server
        .admin(
            Method::POST,
            &format!("/admin/migrations/{migration_id}/start"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["status"], "copying");

    // kill -9 in the middle of the copy; the node comes back and the copy goes on.
    let midway = wait_until(Duration::from_secs(60), || async {
        let body = migration(&server, &token, &migration_id).await;
        body["status"] == "copying" && body["objects_copied"].as_i64().unwrap_or(0) >= 3
    })
    .await;
    assert!(
        midway,
        "the copy got going: {}",
        migration(&server, &token, &migration_id).await
    );
    server.kill_hard();
    server.spawn().await;
    let caught_up = wait_until(Duration::from_secs(120), || async {
        migration(&server, &token, &migration_id).await["status"] == "dual_write"
    })
    .await;
    assert!(
        caught_up,
        "the copy caught up: {} {}",
        migration(&server, &token, &migration_id).await,
        server.log()
    );
    // In dual_write the copy follows what the source still receives.
    let copied_at_catch_up = migration(&server, &token, &migration_id).await["objects_copied"]
        .as_i64()
        .unwrap_or(0);
    let following = wait_until(Duration::from_secs(60), || async {
        migration(&server, &token, &migration_id).await["objects_copied"]
            .as_i64()
            .unwrap_or(0)
            >= copied_at_catch_up + 3
    })
    .await;
    assert!(following, "the copy follows the source in dual_write");

    // The cutover, with the load still sending: the source key is refused from then on.
    let (status, done) = server
        .admin(
            Method::POST,
            &format!("/admin/migrations/{migration_id}/complete"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["status"], "done");
    let refused_after_cutover = wait_until(Duration::from_secs(30), || async {
        let response = server
            .client
            .post(server.url("/v1/track"))
            .header("Authorization", basic_auth(&source_key))
            .json(&json!({"type": "track", "userId": "late", "event": "Late"}))
            .send()
            .await;
        match response {
            Ok(response) if response.status() == 403 => {
                let body: Value = response.json().await.unwrap_or_default();
                body["code"] == "project_migrated"
                    && body["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains(&target)
            }
            _ => false,
        }
    })
    .await;
    assert!(
        refused_after_cutover,
        "the source key is refused, naming the target"
    );
    let (accepted, _) = load.finish().await;
    let accepted = accepted.get("eu-west-1").cloned().unwrap_or_default();
    assert!(
        accepted.len() > 500,
        "a real load: {} accepted",
        accepted.len()
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await,
        "the source's queue delivered everything it accepted"
    );

    // What the source stored (every accepted message, and any whose answer the kill cut off)...
    let source_messages = messages_by_id(&s3_client, &bucket_eu, &source).await;
    let source_ids: BTreeSet<String> = source_messages.keys().cloned().collect();
    let lost: Vec<&String> = accepted.difference(&source_ids).collect();
    assert!(
        lost.is_empty(),
        "accepted but not in the source archive: {lost:?}"
    );
    // ...the target holds, once each, in its bucket and its ClickHouse.
    let target_count_sql =
        format!("SELECT count() FROM {database_us}.events WHERE project_id = '{target}'");
    let moved = wait_until(Duration::from_secs(120), || async {
        messages_by_id(&s3_client, &bucket_us, &target).await.len() == source_ids.len()
            && clickhouse_count(&clickhouse_us, &target_count_sql).await == source_ids.len() as u64
    })
    .await;
    let target_messages = messages_by_id(&s3_client, &bucket_us, &target).await;
    assert!(
        moved,
        "the target caught up: {} of {} ids in its bucket; {}",
        target_messages.len(),
        source_ids.len(),
        migration(&server, &token, &migration_id).await
    );
    let final_state = migration(&server, &token, &migration_id).await;
    eprintln!(
        "migration: {} accepted, {} in the source archive, {} objects and {} messages copied ({} already in the target's warehouse)",
        accepted.len(),
        source_ids.len(),
        final_state["objects_copied"],
        final_state["messages_copied"],
        final_state["messages_present"]
    );
    let target_ids: BTreeSet<String> = target_messages.keys().cloned().collect();
    assert_eq!(target_ids, source_ids, "the same messages");
    let repeated: Vec<&String> = target_messages
        .iter()
        .filter(|(_, copies)| copies.len() != 1)
        .map(|(id, _)| id)
        .collect();
    assert!(
        repeated.is_empty(),
        "ids in the target bucket more than once: {repeated:?}"
    );
    for copies in target_messages.values() {
        assert_eq!(copies[0]["projectId"], target.as_str(), "{}", copies[0]);
        assert_eq!(copies[0]["region"], "us-east-1", "{}", copies[0]);
    }
    let rows = clickhouse_count(&clickhouse_us, &target_count_sql).await;
    let distinct = clickhouse_count(
        &clickhouse_us,
        &format!(
            "SELECT uniqExact(message_id) FROM {database_us}.events WHERE project_id = '{target}'"
        ),
    )
    .await;
    assert_eq!(
        (rows, distinct),
        (source_ids.len() as u64, source_ids.len() as u64),
        "each message once in us-east-1's ClickHouse (raw count)"
    );

    // Residency: eu-west-1 holds nothing of the target project, us-east-1 nothing of the source.
    assert!(
        bucket_keys(&s3_client, &bucket_eu, &format!("segment-logs/{target}/"))
            .await
            .is_empty()
    );
    assert_eq!(
        clickhouse_count(
            &clickhouse_eu,
            &format!("SELECT count() FROM {database_eu}.events WHERE project_id = '{target}'")
        )
        .await,
        0
    );
    assert!(
        bucket_keys(&s3_client, &bucket_us, &source_prefix)
            .await
            .is_empty()
    );
    assert_eq!(
        clickhouse_count(
            &clickhouse_us,
            &format!("SELECT count() FROM {database_us}.events WHERE project_id = '{source}'")
        )
        .await,
        0
    );

    // Every step audited; the org is free to change its region again.
    let (status, audit) = server
        .admin(Method::GET, "/admin/orgs/acme/audit", &token, None)
        .await;
    assert_eq!(status, 200, "{audit}");
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter_map(|entry| entry["action"].as_str())
                .collect()
        })
        .unwrap_or_default();
    for action in [
        "migration.create",
        "migration.copying",
        "migration.dual_write",
        "migration.done",
    ] {
        assert!(actions.contains(&action), "{action} in {actions:?}");
    }
    let (status, listed) = server
        .admin(Method::GET, "/admin/orgs/acme/migrations", &token, None)
        .await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["items"][0]["migration_id"],
        migration_id.as_str(),
        "{listed}"
    );
    assert_eq!(listed["items"][0]["status"], "done", "{listed}");
    let (status, assigned) = server
        .admin(
            Method::POST,
            "/admin/regions/orgs/acme/assign",
            &token,
            Some(json!({"region": "us-east-1"})),
        )
        .await;
    assert_eq!(status, 200, "{assigned}");
}

async fn send(server: &TestServer, key: &str, user: &str, ids: std::ops::Range<usize>) {
    let batch: Vec<Value> = ids
        .map(|n| json!({"type": "track", "userId": user, "event": "E", "messageId": format!("{user}-{n}")}))
        .collect();
    server.send_and_deliver(key, &batch).await;
}

async fn deletion_done(server: &TestServer, token: &str, deletion_id: &str) -> bool {
    wait_until(Duration::from_secs(60), || async {
        let (_, body) = server
            .admin(
                Method::GET,
                &format!("/admin/deletions/{deletion_id}"),
                token,
                None,
            )
            .await;
        body["status"] == "done"
    })
    .await
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_deleted_from_the_source_during_a_migration_is_deleted_from_the_target_too() {
    let Some(setup) = two_regions(20_000).await else {
        return;
    };
    let server = &setup.server;
    send(server, &setup.source_key, "alice", 0..20).await;
    send(server, &setup.source_key, "bob", 0..20).await;
    let (_, created) = server
        .admin(
            Method::POST,
            "/admin/orgs/acme/migrations",
            &setup.token,
            Some(json!({"source_project": setup.source, "target_project": setup.target})),
        )
        .await;
    let migration_id = created["migration_id"]
        .as_str()
        .expect("migration_id")
        .to_string();
    let (status, _) = server
        .admin(
            Method::POST,
            &format!("/admin/migrations/{migration_id}/start"),
            &setup.token,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let caught_up = wait_until(Duration::from_secs(60), || async {
        migration(server, &setup.token, &migration_id).await["status"] == "dual_write"
    })
    .await;
    assert!(
        caught_up,
        "{}",
        migration(server, &setup.token, &migration_id).await
    );
    let target_prefix = format!("segment-logs/{}/", setup.target);
    assert_eq!(
        messages_by_id(&setup.s3_client, &setup.bucket_us, &setup.target)
            .await
            .len(),
        40
    );

    // Deleting alice from the source deletes her copies in the target's region too.
    let (status, deletion) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{}/deletions", setup.source),
            &setup.token,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202, "{deletion}");
    let also = deletion["also_requested"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(also.len(), 1, "{deletion}");
    assert_eq!(also[0]["project_id"], setup.target.as_str());
    assert_eq!(also[0]["region"], "us-east-1");
    for deletion_id in [
        deletion["deletion_id"].as_str().unwrap_or_default(),
        also[0]["deletion_id"].as_str().unwrap_or_default(),
    ] {
        assert!(
            deletion_done(server, &setup.token, deletion_id).await,
            "{deletion_id} done"
        );
    }
    // More of bob's after the deletion; the copy follows, without alice.
    send(server, &setup.source_key, "bob", 20..30).await;
    let followed = wait_until(Duration::from_secs(60), || async {
        messages_by_id(&setup.s3_client, &setup.bucket_us, &setup.target)
            .await
            .len()
            == 30
    })
    .await;
    let target_messages = messages_by_id(&setup.s3_client, &setup.bucket_us, &setup.target).await;
    assert!(followed, "{:?}", target_messages.keys().collect::<Vec<_>>());
    assert!(target_messages.keys().all(|id| id.starts_with("bob-")));
    let count = |url: &str, database: &str, project: &str, user: &str| {
        let sql = format!(
            "SELECT count() FROM {database}.events WHERE project_id = '{project}' AND user_id = '{user}'"
        );
        let url = url.to_string();
        async move { clickhouse_count(&url, &sql).await }
    };
    assert_eq!(
        count(
            &setup.clickhouse_us,
            &setup.database_us,
            &setup.target,
            "alice"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &setup.clickhouse_us,
            &setup.database_us,
            &setup.target,
            "bob"
        )
        .await,
        30
    );
    assert_eq!(
        count(
            &setup.clickhouse_eu,
            &setup.database_eu,
            &setup.source,
            "alice"
        )
        .await,
        0
    );
    assert!(
        bucket_keys(&setup.s3_client, &setup.bucket_us, &target_prefix)
            .await
            .len()
            >= 2
    );
}
