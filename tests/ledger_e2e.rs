//! The delivery ledger (`GET /admin/projects/{id}/ledger`): after kill -9 of the node mid-load it
//! reconciles exactly — its acknowledged count is the messages the archive and ClickHouse hold,
//! one by one, with every client-acknowledged message among them and suppressed messages counted
//! apart; a GDPR deletion shows as erased and the day still reconciles; bad queries get 400.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::services::*;
use common::*;
use rand::Rng;
use reqwest::Method;
use serde_json::{Value, json};

const DAY_MS: i64 = 86_400_000;

fn unique(tag: &str) -> String {
    format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// A config whose eu-west-1 has a warehouse (its own database) and a local archive.
fn config_with_warehouse(clickhouse: &str, database: &str) -> String {
    test_config(&format!(
        "max_sink_attempt_secs = 5\n[gdpr]\nsettle_ms = 300\n[regions.eu-west-1.clickhouse]\nurls = [\"{clickhouse}\"]\ndatabase = \"{database}\"\nflush_interval_ms = 200\n"
    ))
}

/// The ledger's days of yesterday and today (a run that crosses midnight has both).
async fn ledger(server: &TestServer, token: &str, project_id: &str) -> Vec<Value> {
    let today =
        meridian_core::timestamp::utc_day_start_ms(meridian_core::timestamp::system_now_unix_ms());
    let date = |day_ms: i64| meridian_core::timestamp::format_rfc3339_ms(day_ms)[..10].to_string();
    let (status, body) = server
        .admin(
            Method::GET,
            &format!(
                "/admin/projects/{project_id}/ledger?from={}&to={}",
                date(today - DAY_MS),
                date(today)
            ),
            token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["days"].as_array().cloned().expect("days")
}

fn total(days: &[Value], field: &str) -> u64 {
    days.iter()
        .map(|day| day[field].as_u64().unwrap_or(0))
        .sum()
}

async fn wait_until_reconciled(
    server: &TestServer,
    token: &str,
    project_id: &str,
    acknowledged_at_least: u64,
) -> Vec<Value> {
    let reconciled = wait_until(Duration::from_secs(90), || async {
        let days = ledger(server, token, project_id).await;
        total(&days, "acknowledged") >= acknowledged_at_least
            && days.iter().all(|day| day["reconciled"] == json!(true))
    })
    .await;
    let days = ledger(server, token, project_id).await;
    if !reconciled {
        let status = server.node_status().await;
        panic!("the ledger does not reconcile: {days:?}\nnode status: {status}");
    }
    days
}

async fn send_as(server: &TestServer, key: &str, user: &str, ids: &[String]) {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "userId": user, "event": "Ledger", "messageId": id}))
        .collect();
    assert_eq!(server.post_batch(key, &batch).await, 200);
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_mid_load_the_ledger_reconciles_exactly_with_both_stores() {
    let Some(clickhouse) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique("ledger_");
    let mut server = TestServer::start(&config_with_warehouse(&clickhouse, &database), &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let admin = server.issue_token("admin", Some("acme"));
    let (status, body) = server
        .admin(
            Method::PUT,
            &format!("/admin/projects/{project_id}/suppressions/mallory"),
            &admin,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let suppressed_ids: Vec<String> = (0..7).map(|n| format!("suppressed-{n}")).collect();
    send_as(&server, &key, "mallory", &suppressed_ids).await;

    let mut schedule = kill_schedule("ledger kill -9");
    let keys = [("eu-west-1", key.clone())];
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..2 {
        let load = Load::start(&server, &keys, 6, &format!("r{round}"));
        let run_ms = schedule.random_range(400..1200);
        // The load runs for a while before the kill: wait for it to be acknowledged at all.
        assert!(
            wait_until(Duration::from_secs(30), || async {
                server
                    .metric("meridian_messages_accepted_total{region=\"eu-west-1\"}")
                    .await
                    .is_some_and(|accepted| accepted > 0.0)
            })
            .await
        );
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        server.kill_hard();
        let (accepted, _) = load.finish().await;
        acknowledged.extend(accepted.into_values().flatten());
        server.spawn().await;
    }
    let after: Vec<String> = (0..20).map(|n| format!("after-{n}")).collect();
    send_as(&server, &key, "load", &after).await;
    acknowledged.extend(after);

    let days = wait_until_reconciled(
        &server,
        &admin,
        &project_id,
        (acknowledged.len() + suppressed_ids.len()) as u64,
    )
    .await;
    // The stores, message by message: what the ledger counts is exactly what they hold.
    let archived = count_by_message_id(
        &server
            .archived_messages("eu-west-1")
            .into_iter()
            .filter(|message| message["projectId"] == json!(project_id))
            .collect::<Vec<_>>(),
    );
    assert!(archived.values().all(|count| *count == 1), "archived once");
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !archived.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "acknowledged and not archived: {lost:?}");
    assert!(
        suppressed_ids.iter().all(|id| !archived.contains_key(id)),
        "suppressed messages are not stored"
    );
    let in_warehouse = clickhouse_count(
        &clickhouse,
        &format!("SELECT count() FROM {database}.events FINAL WHERE project_id = '{project_id}'"),
    )
    .await;
    let queued = total(&days, "acknowledged") - total(&days, "suppressed");
    eprintln!(
        "ledger after 2 kills: acknowledged {} (suppressed {}), archive {}, warehouse {}, client saw {} 200s",
        total(&days, "acknowledged"),
        total(&days, "suppressed"),
        archived.len(),
        in_warehouse,
        acknowledged.len()
    );
    assert_eq!(total(&days, "suppressed"), suppressed_ids.len() as u64);
    assert_eq!(
        queued,
        archived.len() as u64,
        "acknowledged = archived: {days:?}"
    );
    assert_eq!(total(&days, "archived"), archived.len() as u64);
    assert_eq!(total(&days, "warehouse"), in_warehouse);
    assert_eq!(queued, in_warehouse, "acknowledged = in the warehouse");
    assert_eq!(total(&days, "queued"), 0);
    assert_eq!(
        server
            .metric("meridian_ledger_unreconciled_days{region=\"eu-west-1\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(server.terminate(), Some(0));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gdpr_deletion_shows_as_erased_and_the_day_still_reconciles() {
    let Some(clickhouse) = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL") else {
        return;
    };
    let database = unique("ledger_");
    let mut server = TestServer::start(&config_with_warehouse(&clickhouse, &database), &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let admin = server.issue_token("admin", Some("acme"));
    let alice: Vec<String> = (0..12).map(|n| format!("alice-{n}")).collect();
    let bob: Vec<String> = (0..8).map(|n| format!("bob-{n}")).collect();
    send_as(&server, &key, "alice", &alice).await;
    send_as(&server, &key, "bob", &bob).await;
    let before = wait_until_reconciled(&server, &admin, &project_id, 20).await;
    assert_eq!(total(&before, "acknowledged"), 20);
    assert_eq!(total(&before, "erased"), 0);

    let (status, requested) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/deletions"),
            &admin,
            Some(json!({"user_ids": ["alice"]})),
        )
        .await;
    assert_eq!(status, 202, "{requested}");
    let deletion_id = requested["deletion_id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            let (_, body) = server
                .admin(
                    Method::GET,
                    &format!("/admin/deletions/{deletion_id}"),
                    &admin,
                    None,
                )
                .await;
            body["status"] == "done"
        })
        .await,
        "the deletion finishes"
    );
    let after = ledger(&server, &admin, &project_id).await;
    assert_eq!(total(&after, "erased"), alice.len() as u64, "{after:?}");
    assert_eq!(total(&after, "acknowledged"), 20);
    assert!(after.iter().all(|day| day["reconciled"] == json!(true)));
    let archived: Vec<Value> = server
        .archived_messages("eu-west-1")
        .into_iter()
        .filter(|message| message["projectId"] == json!(project_id))
        .collect();
    assert_eq!(
        archived.len() as u64,
        total(&after, "archived") - total(&after, "erased"),
        "what the archive holds now is what was archived less what was erased"
    );
    assert_eq!(server.terminate(), Some(0));
}

#[tokio::test]
async fn ledger_queries_are_checked() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let (project_id, key) = server.create_project("acme", "eu-west-1").await;
    let admin = server.issue_token("admin", Some("acme"));
    let path = |query: &str| format!("/admin/projects/{project_id}/ledger{query}");
    for (query, code) in [
        ("?from=2026-12-08&to=2026-12-01", "invalid_request"),
        ("?from=2020-01-01&to=2026-12-01", "range_too_long"),
        ("?from=yesterday", "invalid_request"),
        ("?day=2026-12-01", "invalid_request"),
    ] {
        let (status, body) = server.admin(Method::GET, &path(query), &admin, None).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["code"], code, "{query}: {body}");
    }
    // Without a warehouse in the region the warehouse column is null; a day with nothing is
    // listed with zeros and reconciles.
    let ids: Vec<String> = (0..5).map(|n| format!("m-{n}")).collect();
    send_as(&server, &key, "u", &ids).await;
    let days = wait_until_reconciled(&server, &admin, &project_id, 5).await;
    assert_eq!(days.len(), 2, "yesterday and today");
    assert!(days.iter().all(|day| day["warehouse"].is_null()));
    assert_eq!(total(&days, "acknowledged"), 5);
    assert_eq!(total(&days, "archived"), 5);
    let (status, body) = server.admin(Method::GET, &path(""), &admin, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["days"].as_array().map(Vec::len),
        Some(7),
        "the last 7 days by default"
    );
    let outsider = server.issue_token("admin", Some("other-org"));
    let (status, _) = server.admin(Method::GET, &path(""), &outsider, None).await;
    assert!(
        status == 403 || status == 404,
        "another org's admin: {status}"
    );
    assert_eq!(server.terminate(), Some(0));
}
