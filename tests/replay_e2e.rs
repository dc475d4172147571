//! Replays for real: a project's archive (SeaweedFS) re-inserted into its region's ClickHouse —
//! rows lost from the warehouse come back exactly once (raw counts, not only `FINAL`), a replay
//! over intact data changes nothing, a kill -9 in the middle resumes and still ends exact, and a
//! deleted user never comes back.

mod common;

use std::time::Duration;

use common::services::*;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

struct Setup {
    server: TestServer,
    clickhouse: String,
    database: String,
    project_id: String,
    key: String,
    token: String,
}

/// One node of eu-west-1 with ClickHouse and an S3 archive that flush every 100 ms (so each
/// request below becomes its own archive object), and `extra` config.
async fn setup(extra: &str) -> Option<Setup> {
    let (Some(clickhouse), Some(s3)) = (
        shared_service("MERIDIAN_TEST_CLICKHOUSE_URL"),
        shared_service("MERIDIAN_TEST_S3_ENDPOINT"),
    ) else {
        return None;
    };
    let (database, bucket) = (unique("replay_"), unique("replay-"));
    create_bucket(&s3_client(&s3, "us-east-1"), &bucket, None).await;
    let config = test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n{extra}\n{}",
        region_block("eu-west-1", &clickhouse, &database, &bucket, &s3, 100)
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let token = server.issue_token("owner", Some("acme"));
    Some(Setup {
        server,
        clickhouse,
        database,
        project_id,
        key,
        token,
    })
}

impl Setup {
    /// Sends `requests` requests of `per_request` messages (user `user`, ids `<tag>-<n>`), each
    /// delivered before the next is sent.
    async fn send(&self, tag: &str, user: &str, requests: usize, per_request: usize) {
        for request in 0..requests {
            let batch: Vec<Value> = (0..per_request)
                .map(|n| {
                    json!({"type": "track", "userId": user, "event": "Replayed",
                           "messageId": format!("{tag}-{}", request * per_request + n)})
                })
                .collect();
            let response = self
                .server
                .client
                .post(self.server.url("/v1/batch"))
                .header("Authorization", basic_auth(&self.key))
                .json(&json!({"batch": batch}))
                .send()
                .await
                .expect("POST /v1/batch");
            assert_eq!(response.status(), 200);
            assert!(
                self.server
                    .wait_for_sinks_to_drain(Duration::from_secs(30))
                    .await,
                "request {request} delivered"
            );
        }
    }

    async fn rows(&self, final_: bool, condition: &str) -> u64 {
        clickhouse_count(
            &self.clickhouse,
            &format!(
                "SELECT count() FROM {}.events{} WHERE project_id = '{}'{condition}",
                self.database,
                if final_ { " FINAL" } else { "" },
                self.project_id
            ),
        )
        .await
    }

    /// Raw and `FINAL` counts of the project's rows (optionally `AND <condition>`).
    async fn counts(&self, condition: &str) -> (u64, u64) {
        (
            self.rows(false, condition).await,
            self.rows(true, condition).await,
        )
    }

    /// Removes the project's rows matching `condition` from the warehouse (as a lost disk or a bad
    /// manual query would), waiting until they are gone.
    async fn drop_rows(&self, condition: &str) {
        clickhouse_query(
            &self.clickhouse,
            &format!(
                "ALTER TABLE {}.events DELETE WHERE project_id = '{}' AND {condition}",
                self.database, self.project_id
            ),
        )
        .await;
        let gone = wait_until(Duration::from_secs(30), || async {
            self.rows(false, &format!(" AND {condition}")).await == 0
        })
        .await;
        assert!(gone, "the rows were dropped from ClickHouse");
    }

    async fn start_replay(&self) -> String {
        let today =
            meridian_core::timestamp::format_rfc3339_ms(meridian_core::timestamp::now_unix_ms());
        let (status, body) = self
            .server
            .admin(
                Method::POST,
                &format!("/admin/projects/{}/replays", self.project_id),
                &self.token,
                Some(json!({"from": &today[..10], "to": today})),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "pending");
        body["replay_id"].as_str().expect("replay_id").to_string()
    }

    async fn replay(&self, replay_id: &str) -> Value {
        let (status, body) = self
            .server
            .admin(
                Method::GET,
                &format!("/admin/replays/{replay_id}"),
                &self.token,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn wait_for_replay(&self, replay_id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let body = self.replay(replay_id).await;
            let finished =
                ["done", "failed", "cancelled"].contains(&body["status"].as_str().unwrap_or(""));
            if finished || std::time::Instant::now() > deadline {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_restores_lost_rows_exactly_once_and_a_second_replay_changes_nothing() {
    let Some(setup) = setup("").await else {
        return;
    };
    setup.send("r", "alice", 6, 10).await;
    assert_eq!(setup.counts("").await, (60, 60));
    setup
        .drop_rows("toUInt32(substring(message_id, 3)) % 3 = 0")
        .await;
    assert_eq!(setup.counts("").await, (40, 40));

    let replay_id = setup.start_replay().await;
    let done = setup.wait_for_replay(&replay_id).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["messages_read"], 60, "{done}");
    assert_eq!(done["messages_inserted"], 20, "{done}");
    assert_eq!(done["messages_present"], 40, "{done}");
    assert!(done["objects_done"].as_i64().unwrap_or(0) >= 6, "{done}");
    assert_eq!(done["objects_done"], done["objects_total"], "{done}");
    assert_eq!(
        setup.counts("").await,
        (60, 60),
        "every row back, each once (raw count too)"
    );

    let again = setup.start_replay().await;
    let done = setup.wait_for_replay(&again).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(done["messages_inserted"], 0, "{done}");
    assert_eq!(done["messages_present"], 60, "{done}");
    assert_eq!(setup.counts("").await, (60, 60), "nothing changed");
    let (status, listed) = setup
        .server
        .admin(
            Method::GET,
            &format!("/admin/projects/{}/replays", setup.project_id),
            &setup.token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{listed}");
    let listed_ids: Vec<&str> = listed["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item["replay_id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        listed_ids,
        vec![again.as_str(), replay_id.as_str()],
        "newest first"
    );

    // The audit log says who started it and how it ended.
    let (status, audit) = setup
        .server
        .admin(Method::GET, "/admin/orgs/acme/audit", &setup.token, None)
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
    assert!(actions.contains(&"replay.start"), "{actions:?}");
    assert!(actions.contains(&"replay.done"), "{actions:?}");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_in_the_middle_resumes_after_its_last_object_and_ends_exact() {
    // 20 messages a second: the replay of 12 objects of 5 takes about 3 s.
    let Some(mut setup) = setup("[replay]\nmax_messages_per_second = 20").await else {
        return;
    };
    setup.send("k", "carol", 12, 5).await;
    setup.drop_rows("1 = 1").await;

    let replay_id = setup.start_replay().await;
    let midway = wait_until(Duration::from_secs(30), || async {
        let body = setup.replay(&replay_id).await;
        let done = body["objects_done"].as_i64().unwrap_or(0);
        done >= 3 && body["status"] == "running"
    })
    .await;
    assert!(
        midway,
        "the replay got going: {}",
        setup.replay(&replay_id).await
    );
    setup.server.kill_hard();
    let inserted_before_the_kill = setup.rows(false, "").await;
    assert!(
        inserted_before_the_kill > 0 && inserted_before_the_kill < 60,
        "killed in the middle ({inserted_before_the_kill} of 60 rows back)"
    );
    setup.server.spawn().await;

    let done = setup.wait_for_replay(&replay_id).await;
    assert_eq!(done["status"], "done", "{done}");
    let read = done["messages_read"].as_i64().unwrap_or(0);
    assert!(
        (60..=65).contains(&read),
        "resumed after its last finished object (only the one in flight at the kill read twice): {done}"
    );
    assert_eq!(
        setup.counts("").await,
        (60, 60),
        "every row back once, across the kill (raw count too)"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_never_brings_back_a_deleted_user() {
    let Some(setup) = setup("").await else {
        return;
    };
    setup.send("alice", "alice", 2, 5).await;
    setup.send("bob", "bob", 2, 5).await;
    let (status, deletion) = setup
        .server
        .admin(
            Method::POST,
            &format!("/admin/projects/{}/deletions", setup.project_id),
            &setup.token,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202, "{deletion}");
    // While the deletion runs a replay is refused: its rows could land behind the deletion.
    let today =
        &meridian_core::timestamp::format_rfc3339_ms(meridian_core::timestamp::now_unix_ms())[..10];
    let (status, refused) = setup
        .server
        .admin(
            Method::POST,
            &format!("/admin/projects/{}/replays", setup.project_id),
            &setup.token,
            Some(json!({"from": today, "to": today})),
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["code"], "deletion_in_progress", "{refused}");
    let deletion_id = deletion["deletion_id"].as_str().unwrap_or_default();
    let finished = wait_until(Duration::from_secs(60), || async {
        let (_, body) = setup
            .server
            .admin(
                Method::GET,
                &format!("/admin/deletions/{deletion_id}"),
                &setup.token,
                None,
            )
            .await;
        body["status"] == "done"
    })
    .await;
    assert!(finished, "the deletion finished");
    setup.drop_rows("user_id = 'bob'").await;

    let replay_id = setup.start_replay().await;
    let done = setup.wait_for_replay(&replay_id).await;
    assert_eq!(done["status"], "done", "{done}");
    assert_eq!(setup.counts(" AND user_id = 'bob'").await, (10, 10));
    assert_eq!(
        setup.counts(" AND user_id = 'alice'").await,
        (0, 0),
        "the deleted user stays deleted"
    );
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_requests_are_checked_and_a_pending_replay_can_be_cancelled() {
    let Some(setup) = setup("[replay]\nmax_messages_per_second = 1").await else {
        return;
    };
    let path = format!("/admin/projects/{}/replays", setup.project_id);
    for (body, why) in [
        (
            json!({"from": "yesterday", "to": "2026-12-01"}),
            "not a date",
        ),
        (
            json!({"from": "2026-12-02", "to": "2026-12-01"}),
            "empty range",
        ),
        (json!({"from": "2026-12-01"}), "no `to`"),
    ] {
        let (status, answer) = setup
            .server
            .admin(Method::POST, &path, &setup.token, Some(body))
            .await;
        assert_eq!(status, 400, "{why}: {answer}");
    }
    // Another org's admin does not learn the project exists.
    setup.server.create_org("other").await;
    let stranger = setup.server.issue_token("admin", Some("other"));
    let (status, _) = setup
        .server
        .admin(
            Method::POST,
            &path,
            &stranger,
            Some(json!({"from": "2026-12-01", "to": "2026-12-01"})),
        )
        .await;
    assert_eq!(status, 404);

    // One message a second over 12 objects of 5: still running when cancelled.
    setup.send("c", "dave", 12, 5).await;
    let replay_id = setup.start_replay().await;
    let (status, second) = setup
        .server
        .admin(
            Method::POST,
            &path,
            &setup.token,
            Some(json!({"from": "2026-12-01", "to": "2026-12-02"})),
        )
        .await;
    assert_eq!(status, 409, "one replay of a project at a time: {second}");
    let (status, _) = setup
        .server
        .admin(
            Method::GET,
            &format!("/admin/replays/{replay_id}"),
            &stranger,
            None,
        )
        .await;
    assert_eq!(status, 404, "another org's replay is not found");
    let (status, cancelled) = setup
        .server
        .admin(
            Method::POST,
            &format!("/admin/replays/{replay_id}/cancel"),
            &setup.token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{cancelled}");
    let ended = setup.wait_for_replay(&replay_id).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert!(
        ended["objects_done"].as_i64().unwrap_or(0) < 12,
        "stopped before the end: {ended}"
    );
    let (status, again) = setup
        .server
        .admin(
            Method::POST,
            &format!("/admin/replays/{replay_id}/cancel"),
            &setup.token,
            None,
        )
        .await;
    assert_eq!(
        status, 409,
        "a finished replay cannot be cancelled: {again}"
    );
}
