//! End-to-end admin API: every route's success and error cases on SQLite and on PostgreSQL, two
//! nodes sharing one PostgreSQL catalog, audit tampering caught by `meridian audit verify`, and
//! tokens that must never get data.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use reqwest::Method;
use serde_json::{Value, json};

/// A fresh PostgreSQL database on the shared server, as a catalog URL.
async fn fresh_postgres_catalog() -> Option<String> {
    common::cluster::fresh_postgres_database("admin").await
}

async fn ingest_status(server: &TestServer, key: &str) -> u16 {
    server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(key))
        .json(&json!({"userId": "u", "event": "e"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn hs256_token(secret: &[u8], header: &Value, claims: &Value) -> String {
    use sha2::Digest;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    // HMAC-SHA256 by hand (RFC 2104), to mint tokens the server must refuse.
    let mut key = [0u8; 64];
    if secret.len() > 64 {
        key[..32].copy_from_slice(&sha2::Sha256::digest(secret));
    } else {
        key[..secret.len()].copy_from_slice(secret);
    }
    let inner_key: Vec<u8> = key.iter().map(|byte| byte ^ 0x36).collect();
    let outer_key: Vec<u8> = key.iter().map(|byte| byte ^ 0x5c).collect();
    let inner = sha2::Sha256::digest([inner_key.as_slice(), signing_input.as_bytes()].concat());
    let outer = sha2::Sha256::digest([outer_key.as_slice(), inner.as_slice()].concat());
    format!("{signing_input}.{}", b64(&outer))
}

async fn exercise_every_admin_route(server: &TestServer) {
    let platform = server.issue_token("platform", None);
    let owner = server.issue_token("owner", Some("acme"));
    let admin = server.issue_token("admin", Some("acme"));
    let member = server.issue_token("member", Some("acme"));
    let stranger = server.issue_token("owner", Some("other"));
    let call = |method: Method, path: String, token: String, body: Option<Value>| async move {
        server.admin(method, &path, &token, body).await
    };

    // Orgs.
    let (status, body) = call(
        Method::POST,
        "/admin/orgs".into(),
        platform.clone(),
        Some(json!({"org_id": "acme", "name": "Acme"})),
    )
    .await;
    assert_eq!(
        (status, body["primary_region"].as_str()),
        (201, Some("eu-west-1")),
        "{body}"
    );
    let (status, body) = call(
        Method::POST,
        "/admin/orgs".into(),
        platform.clone(),
        Some(json!({"org_id": "acme", "name": "Again"})),
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("org_exists")));
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs".into(),
            platform.clone(),
            Some(json!({"org_id": "Bad Id!", "name": "x"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs".into(),
            platform.clone(),
            Some(json!({"org_id": "mars", "name": "x", "primary_region": "mars-1"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs".into(),
            owner.clone(),
            Some(json!({"org_id": "mine", "name": "x"}))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs".into(),
            "not-a-token".into(),
            Some(json!({"org_id": "x1", "name": "x"}))
        )
        .await
        .0,
        401
    );
    call(
        Method::POST,
        "/admin/orgs".into(),
        platform.clone(),
        Some(json!({"org_id": "other", "name": "Other"})),
    )
    .await;

    // Regions.
    let (status, regions) = call(Method::GET, "/admin/regions".into(), member.clone(), None).await;
    assert_eq!(status, 200);
    let regions = regions.as_array().unwrap();
    assert_eq!(regions.len(), 4);
    assert_eq!(
        regions
            .iter()
            .filter(|region| region["default"] == true)
            .count(),
        1
    );

    // Projects.
    let (status, created) = call(
        Method::POST,
        "/admin/orgs/acme/projects".into(),
        admin.clone(),
        Some(json!({"name": "Web"})),
    )
    .await;
    assert_eq!(
        (status, created["region"].as_str()),
        (201, Some("eu-west-1")),
        "the default region"
    );
    let project_id = created["project_id"].as_str().unwrap().to_string();
    let write_key = created["write_key"].as_str().unwrap().to_string();
    let (status, us) = call(
        Method::POST,
        "/admin/orgs/acme/projects".into(),
        owner.clone(),
        Some(json!({"name": "US", "region": "us-east-1"})),
    )
    .await;
    assert_eq!(status, 201);
    let us_project = us["project_id"].as_str().unwrap().to_string();
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs/acme/projects".into(),
            owner.clone(),
            Some(json!({"name": "x", "region": "moon-1"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs/acme/projects".into(),
            owner.clone(),
            Some(json!({"region": "eu-west-1"}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs/acme/projects".into(),
            member.clone(),
            Some(json!({"name": "x"}))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/orgs/acme/projects".into(),
            stranger.clone(),
            Some(json!({"name": "x"}))
        )
        .await
        .0,
        404
    );
    let (status, page) = call(
        Method::GET,
        "/admin/orgs/acme/projects?limit=1".into(),
        member.clone(),
        None,
    )
    .await;
    assert_eq!((status, page["items"].as_array().unwrap().len()), (200, 1));
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, page) = call(
        Method::GET,
        format!("/admin/orgs/acme/projects?limit=1&cursor={cursor}"),
        member.clone(),
        None,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_cursor"], Value::Null);
    assert_eq!(
        call(
            Method::GET,
            "/admin/orgs/acme/projects?limit=abc".into(),
            member.clone(),
            None
        )
        .await
        .0,
        400
    );

    let project_path = format!("/admin/projects/{project_id}");
    let response = server
        .client
        .get(server.url(&project_path))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        !text.contains(&write_key),
        "whole keys are never shown again"
    );
    let project: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(project["keys"][0]["prefix"], &write_key[..8]);
    assert_eq!(
        call(Method::GET, project_path.clone(), stranger.clone(), None)
            .await
            .0,
        404,
        "other orgs see nothing"
    );
    assert_eq!(
        call(
            Method::GET,
            "/admin/projects/prj_nope".into(),
            owner.clone(),
            None
        )
        .await
        .0,
        404
    );
    let (status, renamed) = call(
        Method::PATCH,
        project_path.clone(),
        admin.clone(),
        Some(json!({"name": "Website"})),
    )
    .await;
    assert_eq!((status, renamed["name"].as_str()), (200, Some("Website")));
    let (status, body) = call(
        Method::PATCH,
        project_path.clone(),
        owner.clone(),
        Some(json!({"region": "us-east-1"})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("region_immutable"))
    );
    assert_eq!(
        call(
            Method::PATCH,
            project_path.clone(),
            member.clone(),
            Some(json!({"name": "x"}))
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            Method::PATCH,
            project_path.clone(),
            owner.clone(),
            Some(json!({"org_id": "other"}))
        )
        .await
        .0,
        400
    );

    // Keys.
    assert_eq!(ingest_status(server, &write_key).await, 200);
    let (status, rotated) = call(
        Method::POST,
        format!("{project_path}/keys/rotate"),
        admin.clone(),
        Some(json!({"grace_seconds": 1})),
    )
    .await;
    assert_eq!(status, 200);
    let new_key = rotated["write_key"].as_str().unwrap().to_string();
    assert_eq!(
        ingest_status(server, &write_key).await,
        200,
        "the old key works during its grace period"
    );
    assert_eq!(ingest_status(server, &new_key).await, 200);
    let refused = wait_until(Duration::from_secs(5), || async {
        ingest_status(server, &write_key).await == 401
    })
    .await;
    assert!(refused, "the old key is refused after its grace period");
    assert_eq!(
        call(
            Method::POST,
            format!("{project_path}/keys/rotate"),
            member.clone(),
            None
        )
        .await
        .0,
        403
    );

    // Suppressions.
    let suppressions = format!("{project_path}/suppressions");
    assert_eq!(
        call(
            Method::PUT,
            format!("{suppressions}/user-1"),
            admin.clone(),
            None
        )
        .await
        .0,
        200
    );
    let (status, listed) = call(
        Method::POST,
        suppressions.clone(),
        admin.clone(),
        Some(json!({"user_ids": ["user-2", "user-1"]})),
    )
    .await;
    assert_eq!(
        (status, listed["newly_suppressed"].as_u64()),
        (200, Some(1))
    );
    let (_, listed) = call(Method::GET, suppressions.clone(), admin.clone(), None).await;
    let hashes = listed["items"].as_array().unwrap();
    assert_eq!(hashes.len(), 2, "{listed}");
    assert!(
        hashes
            .iter()
            .all(|hash| hash.as_str().unwrap().starts_with("u1:")),
        "the catalog lists keyed hashes, never user ids: {listed}"
    );
    let (status, lookup) = call(
        Method::GET,
        format!("{suppressions}/user-1"),
        admin.clone(),
        None,
    )
    .await;
    assert_eq!(
        (status, &lookup["suppressed"]),
        (200, &json!(true)),
        "{lookup}"
    );
    assert!(hashes.contains(&lookup["user_hash"]), "{lookup}");
    let too_many: Vec<String> = (0..5001).map(|index| format!("u{index}")).collect();
    assert_eq!(
        call(
            Method::POST,
            suppressions.clone(),
            admin.clone(),
            Some(json!({"user_ids": too_many}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        call(
            Method::DELETE,
            format!("{suppressions}/user-1"),
            admin.clone(),
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(
        call(
            Method::DELETE,
            format!("{suppressions}/user-1"),
            admin.clone(),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(Method::GET, suppressions.clone(), member.clone(), None)
            .await
            .0,
        403
    );

    // Org regions, migrations, assign.
    let (status, org_regions) = call(
        Method::GET,
        "/admin/regions/orgs/acme".into(),
        owner.clone(),
        None,
    )
    .await;
    assert_eq!(
        (status, org_regions["projects"].as_array().unwrap().len()),
        (200, 2)
    );
    assert_eq!(
        call(
            Method::GET,
            "/admin/regions/orgs/acme".into(),
            admin.clone(),
            None
        )
        .await
        .0,
        403
    );
    assert_eq!(
        call(
            Method::GET,
            "/admin/regions/orgs/acme".into(),
            stranger.clone(),
            None
        )
        .await
        .0,
        404
    );
    let (status, migration) = call(
        Method::POST,
        "/admin/orgs/acme/migrations".into(),
        owner.clone(),
        Some(json!({"source_project": project_id, "target_project": us_project})),
    )
    .await;
    assert_eq!(
        (status, migration["status"].as_str()),
        (201, Some("pending")),
        "{migration}"
    );
    let migration_path = format!(
        "/admin/migrations/{}",
        migration["migration_id"].as_str().unwrap()
    );
    let (status, body) = call(
        Method::POST,
        "/admin/regions/orgs/acme/assign".into(),
        owner.clone(),
        Some(json!({"region": "us-east-1"})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("migration_in_flight"))
    );
    let (status, started) = call(
        Method::POST,
        format!("{migration_path}/start"),
        owner.clone(),
        None,
    )
    .await;
    assert_eq!((status, started["status"].as_str()), (200, Some("copying")));
    assert_eq!(
        call(Method::GET, migration_path.clone(), stranger.clone(), None)
            .await
            .0,
        404
    );
    let (status, cancelled) = call(
        Method::POST,
        format!("{migration_path}/cancel"),
        owner.clone(),
        None,
    )
    .await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled"))
    );
    let (status, body) = call(
        Method::POST,
        format!("{migration_path}/start"),
        owner.clone(),
        None,
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("invalid_transition"))
    );
    let (status, assigned) = call(
        Method::POST,
        "/admin/regions/orgs/acme/assign".into(),
        owner.clone(),
        Some(json!({"region": "us-east-1"})),
    )
    .await;
    assert_eq!(
        (status, assigned["primary_region"].as_str()),
        (200, Some("us-east-1"))
    );
    assert_eq!(
        call(
            Method::POST,
            "/admin/regions/orgs/acme/assign".into(),
            owner.clone(),
            Some(json!({"region": "pluto-9"}))
        )
        .await
        .0,
        400
    );

    // Audit.
    let (status, audit) = call(
        Method::GET,
        "/admin/orgs/acme/audit?limit=3".into(),
        owner.clone(),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(audit["items"].as_array().unwrap().len(), 3);
    assert_eq!(audit["items"][0]["action"], "org.create");
    let cursor = audit["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = call(
        Method::GET,
        format!("/admin/orgs/acme/audit?limit=1000&cursor={cursor}"),
        owner.clone(),
        None,
    )
    .await;
    let actions: Vec<&str> = rest["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["action"].as_str().unwrap())
        .collect();
    for expected in [
        "project.rename",
        "project.rotate_key",
        "suppression.add",
        "suppression.remove",
        "migration.create",
        "migration.cancelled",
        "org.assign_region",
    ] {
        assert!(actions.contains(&expected), "{expected} in {actions:?}");
    }
    assert!(
        rest["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["request_id"].is_string() && entry["actor"] == "cli")
    );
    assert_eq!(
        call(
            Method::GET,
            "/admin/orgs/acme/audit".into(),
            admin.clone(),
            None
        )
        .await
        .0,
        403
    );

    // Tokens that must never get data.
    let secret = JWT_SECRET.as_bytes();
    let future = 4_102_444_800u64;
    let forged = hs256_token(
        b"a-different-secret-of-plenty-of-bytes!!",
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "x", "org_id": "acme", "role": "owner", "exp": future}),
    );
    let expired = hs256_token(
        secret,
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "x", "org_id": "acme", "role": "owner", "exp": 1_000}),
    );
    let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
    let unsigned = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&json!({"sub": "x", "org_id": "acme", "role": "owner", "exp": future}).to_string())
    );
    let no_exp = hs256_token(
        secret,
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "x", "org_id": "acme", "role": "owner"}),
    );
    for (label, token, expected) in [
        ("forged", forged, 401),
        ("expired", expired, 401),
        ("alg none", unsigned, 401),
        ("no exp", no_exp, 401),
        ("wrong org", stranger.clone(), 404),
    ] {
        let response = server
            .client
            .get(server.url(&project_path))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{label}");
        let text = response.text().await.unwrap();
        // The 404 may repeat the id the caller sent; it must not reveal anything stored.
        assert!(
            !text.contains("Website")
                && !text.contains(&new_key[..8])
                && !text.contains("eu-west-1"),
            "{label} got data: {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["success"], false, "{label}");
    }
    let valid_by_hand = hs256_token(
        secret,
        &json!({"alg": "HS256", "typ": "JWT"}),
        &json!({"sub": "x", "org_id": "acme", "role": "member", "exp": future}),
    );
    assert_eq!(
        server
            .client
            .get(server.url(&project_path))
            .bearer_auth(&valid_by_hand)
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "the hand-made HMAC is right"
    );
}

#[tokio::test]
async fn every_admin_route_on_sqlite() {
    let server = TestServer::start(&test_config(""), &[]).await;
    exercise_every_admin_route(&server).await;
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test]
async fn every_admin_route_on_postgresql() {
    let Some(catalog_url) = fresh_postgres_catalog().await else {
        return;
    };
    let server =
        TestServer::start(&test_config(""), &[("MERIDIAN_CATALOG_URL", &catalog_url)]).await;
    exercise_every_admin_route(&server).await;
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_postgresql_catalog() {
    let Some(catalog_url) = fresh_postgres_catalog().await else {
        return;
    };
    let node_a =
        TestServer::start(&test_config(""), &[("MERIDIAN_CATALOG_URL", &catalog_url)]).await;
    let node_b =
        TestServer::start(&test_config(""), &[("MERIDIAN_CATALOG_URL", &catalog_url)]).await;
    node_a.create_org("shared").await;
    let (project_id, key) = node_a.create_project("shared", "eu-west-1").await;
    let started = std::time::Instant::now();
    let known_on_b = wait_until(Duration::from_secs(2), || async {
        ingest_status(&node_b, &key).await == 200
    })
    .await;
    assert!(known_on_b, "a key minted on node A works on node B");
    eprintln!(
        "key visible on node B after {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "within a second"
    );

    let owner = node_a.issue_token("owner", Some("shared"));
    let (status, rotated) = node_b
        .admin(
            Method::POST,
            &format!("/admin/projects/{project_id}/keys/rotate"),
            &owner,
            Some(json!({"grace_seconds": 2})),
        )
        .await;
    assert_eq!(status, 200);
    let new_key = rotated["write_key"].as_str().unwrap().to_string();
    assert_eq!(
        ingest_status(&node_a, &key).await,
        200,
        "grace period on node A"
    );
    assert!(
        wait_until(Duration::from_secs(2), || async {
            ingest_status(&node_a, &new_key).await == 200
        })
        .await,
        "the new key reaches node A"
    );
    let both_refuse = wait_until(Duration::from_secs(6), || async {
        ingest_status(&node_a, &key).await == 401 && ingest_status(&node_b, &key).await == 401
    })
    .await;
    assert!(
        both_refuse,
        "the rotated-out key stops on every node after its grace period"
    );
    assert_eq!(ingest_status(&node_b, &new_key).await, 200);
}

#[tokio::test]
async fn meridian_audit_verify_detects_a_tampered_entry() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("audited").await;
    server.create_project("audited", "eu-west-1").await;
    server.create_project("audited", "us-east-1").await;
    assert_eq!(server.terminate(), Some(0));
    let verify = |server: &TestServer| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["audit", "verify", "--config"])
            .arg(&server.config_path)
            .env("MERIDIAN_DATA_DIR", &server.data_dir)
            .env("MERIDIAN_JWT_SECRET", JWT_SECRET)
            .env_remove("MERIDIAN_CATALOG_URL")
            .output()
            .expect("meridian audit verify runs")
    };
    let intact = verify(&server);
    assert!(
        intact.status.success(),
        "{}",
        String::from_utf8_lossy(&intact.stdout)
    );
    assert!(String::from_utf8_lossy(&intact.stdout).contains("intact"));

    let catalog_url = format!(
        "sqlite://{}?mode=rw",
        server.data_dir.join("catalog.db").display()
    );
    let catalog = meridian_catalog::Catalog::connect(
        &catalog_url,
        catalog_key_of(&server.data_dir, &catalog_url),
    )
    .await
    .unwrap();
    catalog
        .execute_raw("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 2")
        .await
        .unwrap();
    catalog.close().await;
    let tampered = verify(&server);
    assert!(
        !tampered.status.success(),
        "a tampered log fails verification"
    );
    let output = String::from_utf8_lossy(&tampered.stdout);
    assert!(output.contains("TAMPERED at entry 2"), "{output}");
}
