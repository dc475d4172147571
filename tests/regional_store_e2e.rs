//! Regional stores: the suppressions, deletion requests and audit entries about a region's end
//! users live in that region's own store (a PostgreSQL database per region here), never in the
//! global catalog or another region's store; a node of one region needs no access to another's;
//! and a single-catalog deployment upgraded in place keeps everything it had.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::fresh_postgres_database;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A node of `region` on the global catalog `global_url`, with `extra` config.
async fn node(region: &str, global_url: &str, extra: &str) -> TestServer {
    TestServer::start(
        &test_config(&format!("[gdpr]\nsettle_ms = 300\n{extra}")),
        &[
            ("MERIDIAN_CATALOG_URL", global_url),
            ("MERIDIAN_NODE_REGION", region),
        ],
    )
    .await
}

fn regional_store_config(region: &str, store_url: &str) -> String {
    format!("[regions.{region}.catalog]\nurl = \"{store_url}\"\n")
}

/// Everything a PostgreSQL database holds, as `pg_dump --data-only` prints it.
fn database_text(url: &str) -> String {
    let output = Command::new("pg_dump")
        .args(["--data-only", "--no-owner", url])
        .output()
        .expect("pg_dump runs");
    assert!(
        output.status.success(),
        "pg_dump {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The rows of `table` in a `pg_dump --data-only` text (the lines of its COPY block).
fn copied_rows<'a>(dump: &'a str, table: &str) -> Vec<&'a str> {
    let header = format!("COPY public.{table} ");
    let mut lines = dump.lines();
    let Some(_) = lines.by_ref().find(|line| line.starts_with(&header)) else {
        return Vec::new();
    };
    lines.take_while(|line| *line != "\\.").collect()
}

/// The keyed hash the catalog keeps for `user_id` in the project (what a store holds of a
/// suppressed user).
async fn user_hash(server: &TestServer, token: &str, project_id: &str, user_id: &str) -> String {
    let (status, body) = server
        .admin(
            Method::GET,
            &format!("/admin/projects/{project_id}/suppressions/{user_id}"),
            token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["suppressed"], true, "{body}");
    body["user_hash"].as_str().expect("a user hash").to_string()
}

async fn get_json(server: &TestServer, token: &str, path: &str) -> Value {
    let (status, body) = server.admin(Method::GET, path, token, None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

async fn suppress(server: &TestServer, token: &str, project_id: &str, user_id: &str) {
    let (status, body) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/suppressions"),
            token,
            Some(json!({"user_ids": [user_id]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn request_deletion(
    server: &TestServer,
    token: &str,
    project_id: &str,
    user_id: &str,
) -> String {
    let (status, body) = server
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/deletions"),
            token,
            Some(json!({"user_ids": [user_id]})),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    body["deletion_id"]
        .as_str()
        .expect("a deletion id")
        .to_string()
}

async fn suppressed_count(server: &TestServer, region: &str) -> f64 {
    server
        .metric(&format!(
            "meridian_messages_suppressed_total{{region=\"{region}\"}}"
        ))
        .await
        .unwrap_or(0.0)
}

/// Sends events of `user_id` to `server` until one is dropped as suppressed; the time that took.
async fn time_until_suppressed(
    server: &TestServer,
    write_key: &str,
    region: &str,
    user_id: &str,
    since: Instant,
) -> Option<Duration> {
    let before = suppressed_count(server, region).await;
    let suppressed = wait_until(Duration::from_secs(5), || async {
        let event = json!({"type": "track", "userId": user_id, "event": "Probe",
                           "messageId": unique("probe")});
        assert_eq!(server.post_batch(write_key, &[event]).await, 200);
        suppressed_count(server, region).await > before
    })
    .await;
    suppressed.then(|| since.elapsed())
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn end_user_data_of_each_region_lives_only_in_its_regional_store() {
    let Some(global_url) = fresh_postgres_database("global").await else {
        return;
    };
    let eu_store = fresh_postgres_database("store_eu").await.expect("postgres");
    let us_store = fresh_postgres_database("store_us").await.expect("postgres");
    // Each node's config names its own region's store only: the us-east-1 node has no way to
    // reach eu-west-1's.
    let eu_config = regional_store_config("eu-west-1", &eu_store);
    let eu_node = node("eu-west-1", &global_url, &eu_config).await;
    let eu_second_node = node("eu-west-1", &global_url, &eu_config).await;
    let us_node = node(
        "us-east-1",
        &global_url,
        &regional_store_config("us-east-1", &us_store),
    )
    .await;

    let org = unique("org").replace('-', "_");
    eu_node.create_org(&org).await;
    let (eu_project, eu_key) = eu_node.create_project(&org, "eu-west-1").await;
    let (us_project, us_key) = eu_node.create_project(&org, "us-east-1").await;
    let token = eu_node.issue_token("owner", Some(&org));

    let eu_suppressed = unique("eu-suppressed-user");
    let eu_erased = unique("eu-erased-user");
    let us_suppressed = unique("us-suppressed-user");
    let us_erased = unique("us-erased-user");

    // Suppressed through one eu-west-1 node, respected by the other within a second: it reads
    // the regional store on its own. (First the other node learns the new key, within its
    // refresh interval.)
    let key_works = wait_until(Duration::from_secs(5), || async {
        let event = json!({"type": "track", "userId": "someone", "event": "Warm",
                           "messageId": unique("warm")});
        eu_second_node.post_batch(&eu_key, &[event]).await == 200
    })
    .await;
    assert!(key_works, "the second eu-west-1 node knows the new key");
    suppress(&eu_node, &token, &eu_project, &eu_suppressed).await;
    let suppressed_at = Instant::now();
    let took = time_until_suppressed(
        &eu_second_node,
        &eu_key,
        "eu-west-1",
        &eu_suppressed,
        suppressed_at,
    )
    .await
    .expect("the second eu-west-1 node drops the suppressed user's events");
    assert!(
        took <= Duration::from_secs(1),
        "the suppression took {took:?} to reach the other node"
    );
    let eu_deletion = request_deletion(&eu_node, &token, &eu_project, &eu_erased).await;

    // The us-east-1 node works on its own store: suppressions, deletions, ingestion.
    suppress(&us_node, &token, &us_project, &us_suppressed).await;
    let us_deletion = request_deletion(&us_node, &token, &us_project, &us_erased).await;
    time_until_suppressed(
        &us_node,
        &us_key,
        "us-east-1",
        &us_suppressed,
        Instant::now(),
    )
    .await
    .expect("the us-east-1 node drops its suppressed user's events");
    let event = json!({"type": "track", "userId": "someone", "event": "Kept",
                       "messageId": unique("kept")});
    us_node.send_and_deliver(&us_key, &[event]).await;

    // A node answers for its own region only: eu-west-1's data is not reachable through the
    // us-east-1 node.
    let (status, body) = us_node
        .admin(
            Method::GET,
            &format!("/admin/projects/{eu_project}/suppressions"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "region_not_served", "{body}");
    let (status, _) = us_node
        .admin(
            Method::GET,
            &format!("/admin/deletions/{eu_deletion}"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 404, "the us-east-1 node has no eu-west-1 deletion");

    let eu_hashes = [
        user_hash(&eu_node, &token, &eu_project, &eu_suppressed).await,
        user_hash(&eu_node, &token, &eu_project, &eu_erased).await,
    ];
    let us_hashes = [
        user_hash(&us_node, &token, &us_project, &us_suppressed).await,
        user_hash(&us_node, &token, &us_project, &us_erased).await,
    ];
    let eu_traces: Vec<&str> = [eu_suppressed.as_str(), eu_erased.as_str(), &eu_deletion]
        .into_iter()
        .chain(eu_hashes.iter().map(String::as_str))
        .collect();
    let us_traces: Vec<&str> = [us_suppressed.as_str(), us_erased.as_str(), &us_deletion]
        .into_iter()
        .chain(us_hashes.iter().map(String::as_str))
        .collect();

    let global_text = database_text(&global_url);
    let eu_text = database_text(&eu_store);
    let us_text = database_text(&us_store);
    for trace in &eu_traces {
        assert!(!global_text.contains(trace), "global catalog holds {trace}");
        assert!(!us_text.contains(trace), "us-east-1's store holds {trace}");
    }
    for trace in &us_traces {
        assert!(!global_text.contains(trace), "global catalog holds {trace}");
        assert!(!eu_text.contains(trace), "eu-west-1's store holds {trace}");
    }
    // Each store does hold its own region's: the suppressions, the deletion and their audit
    // entries (by hash).
    for hash in &eu_hashes {
        assert!(
            eu_text.contains(hash.as_str()),
            "eu-west-1's store lacks {hash}"
        );
    }
    assert!(eu_text.contains(&eu_deletion));
    for hash in &us_hashes {
        assert!(
            us_text.contains(hash.as_str()),
            "us-east-1's store lacks {hash}"
        );
    }
    let eu_audit = copied_rows(&eu_text, "audit_log");
    assert!(
        eu_audit.iter().any(|row| row.contains("suppression.add"))
            && eu_audit.iter().any(|row| row.contains("deletion.request")),
        "eu-west-1's audit entries: {eu_audit:?}"
    );
    assert!(copied_rows(&global_text, "suppressions").is_empty());
    assert!(copied_rows(&global_text, "deletions").is_empty());

    // The org's audit log merges the stores a node has: the eu-west-1 node lists the global
    // chain and eu-west-1's, never us-east-1's.
    let (status, audit) = eu_node
        .admin(
            Method::GET,
            &format!("/admin/orgs/{org}/audit?limit=1000"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{audit}");
    let entries = audit["items"].as_array().expect("items");
    let in_store = |store: &str, action: &str| {
        entries
            .iter()
            .any(|entry| entry["store"] == store && entry["action"] == action)
    };
    assert!(in_store("global", "project.create"), "{audit}");
    assert!(in_store("eu-west-1", "suppression.add"), "{audit}");
    assert!(in_store("eu-west-1", "deletion.request"), "{audit}");
    assert!(
        !entries.iter().any(|entry| entry["store"] == "us-east-1"),
        "{audit}"
    );
}

/// A deployment from before regional stores: one PostgreSQL catalog held everything. Restarted
/// with a store for its region, the node moves that region's rows in and loses nothing.
#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn a_single_catalog_deployment_upgraded_in_place_keeps_everything() {
    let Some(global_url) = fresh_postgres_database("single").await else {
        return;
    };
    let eu_store = fresh_postgres_database("upgraded_eu")
        .await
        .expect("postgres");

    // Before: no regional store, so the global catalog keeps the region's end-user data (the
    // layout of earlier versions), and --check-config says so.
    let mut before = node("eu-west-1", &global_url, "").await;
    let check = before
        .command()
        .args(["serve", "--check-config", "--config"])
        .arg(&before.config_path)
        .output()
        .expect("check-config runs");
    let check_text = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check.status.success(), "{check_text}");
    assert!(
        check_text.contains("region eu-west-1 has no regional store")
            && check_text.contains("kept in the global catalog"),
        "{check_text}"
    );

    let org = unique("upgrade").replace('-', "_");
    before.create_org(&org).await;
    let (project, write_key) = before.create_project(&org, "eu-west-1").await;
    let token = before.issue_token("owner", Some(&org));
    let quiet = unique("quiet-user");
    let erased = unique("erased-user");
    suppress(&before, &token, &project, &quiet).await;
    let deletion = request_deletion(&before, &token, &project, &erased).await;
    let suppressions_before = get_json(
        &before,
        &token,
        &format!("/admin/projects/{project}/suppressions"),
    )
    .await;
    let audit_before = get_json(
        &before,
        &token,
        &format!("/admin/orgs/{org}/audit?limit=1000"),
    )
    .await;
    let global_before = database_text(&global_url);
    assert_eq!(copied_rows(&global_before, "suppressions").len(), 2);
    assert_eq!(copied_rows(&global_before, "deletions").len(), 1);
    assert_eq!(before.terminate(), Some(0));

    // After: the same node, now with eu-west-1's own store.
    let data_dir: PathBuf = before.data_dir.clone();
    let after_config = test_config(&format!(
        "[gdpr]\nsettle_ms = 300\n{}",
        regional_store_config("eu-west-1", &eu_store)
    ));
    std::fs::write(&before.config_path, after_config).expect("config rewritten");
    before.spawn().await;
    let after = before;
    assert_eq!(after.data_dir, data_dir);

    let global_after = database_text(&global_url);
    let store_after = database_text(&eu_store);
    assert!(copied_rows(&global_after, "suppressions").is_empty());
    assert!(copied_rows(&global_after, "deletions").is_empty());
    assert_eq!(copied_rows(&store_after, "suppressions").len(), 2);
    assert_eq!(copied_rows(&store_after, "deletions").len(), 1);

    let suppressions_after = get_json(
        &after,
        &token,
        &format!("/admin/projects/{project}/suppressions"),
    )
    .await;
    assert_eq!(suppressions_after, suppressions_before);
    let (status, found) = after
        .admin(
            Method::GET,
            &format!("/admin/deletions/{deletion}"),
            &token,
            None,
        )
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["project_id"], project.as_str());
    // Every audit entry of before is still listed (from the global chain, where it was
    // recorded), and the chains verify.
    let audit_after = get_json(
        &after,
        &token,
        &format!("/admin/orgs/{org}/audit?limit=1000"),
    )
    .await;
    let hashes = |audit: &Value| -> Vec<String> {
        audit["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|entry| entry["hash"].as_str().expect("hash").to_string())
            .collect()
    };
    let hashes_after = hashes(&audit_after);
    for hash in hashes(&audit_before) {
        assert!(hashes_after.contains(&hash), "audit entry {hash} is gone");
    }
    let verify = after
        .command()
        .args(["audit", "verify", "--config"])
        .arg(&after.config_path)
        .output()
        .expect("audit verify runs");
    let verify_text = String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{verify_text}");
    assert!(
        verify_text.contains("audit log intact")
            && verify_text.contains("audit log of eu-west-1 intact"),
        "{verify_text}"
    );

    // The moved suppression still holds at the door, and new ones land in the regional store.
    time_until_suppressed(&after, &write_key, "eu-west-1", &quiet, Instant::now())
        .await
        .expect("the moved suppression still drops the user's events");
    let later = unique("later-user");
    suppress(&after, &token, &project, &later).await;
    let later_hash = user_hash(&after, &token, &project, &later).await;
    assert!(database_text(&eu_store).contains(&later_hash));
    assert!(!database_text(&global_url).contains(&later_hash));
}
