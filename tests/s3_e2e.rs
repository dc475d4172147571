//! End-to-end with real S3 servers: SeaweedFS as the regional store, moto as a customer's AWS
//! account (STS AssumeRole + S3).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::services::*;
use common::*;
use serde_json::{Value, json};

fn unique_bucket(tag: &str) -> String {
    format!(
        "meridian-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn s3_archive_block(region: &str, bucket: &str, endpoint: &str, verify_location: bool) -> String {
    format!(
        "[regions.{region}.archive]\nflush_interval_ms = 100\ns3 = {{ bucket = \"{bucket}\", endpoint = \"{endpoint}\", force_path_style = true, verify_location = {verify_location}, access_key_id = \"test\", secret_access_key = \"test\" }}\n"
    )
}

async fn post(server: &TestServer, key: &str, ids: &[String]) -> u16 {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "userId": "u", "event": "Archived", "messageId": id}))
        .collect();
    server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(key))
        .json(&json!({"batch": batch}))
        .send()
        .await
        .map(|response| response.status().as_u16())
        .unwrap_or(0)
}

fn ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}-{n}")).collect()
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_archives_to_its_own_bucket_exactly_once_in_the_segment_layout() {
    let Some(endpoint) = shared_service("MERIDIAN_TEST_S3_ENDPOINT") else {
        return;
    };
    let client = s3_client(&endpoint, "us-east-1");
    let (eu_bucket, us_bucket) = (unique_bucket("eu"), unique_bucket("us"));
    create_bucket(&client, &eu_bucket, None).await;
    create_bucket(&client, &us_bucket, None).await;
    let config = test_config(&format!(
        "{}{}",
        s3_archive_block("eu-west-1", &eu_bucket, &endpoint, false),
        s3_archive_block("us-east-1", &us_bucket, &endpoint, false)
    ));
    let server = TestServer::start(&config, &[]).await;
    assert!(
        server.log().contains("verify_location = false"),
        "the node warns that SeaweedFS cannot prove residency"
    );
    server.create_org("acme").await;
    let (eu_project, eu_key) = server.create_project("acme", "eu-west-1").await;
    let (us_project, us_key) = server.create_project("acme", "us-east-1").await;
    let (eu_ids, us_ids) = (ids("eu", 150), ids("us", 90));
    for chunk in eu_ids.chunks(25) {
        assert_eq!(post(&server, &eu_key, chunk).await, 200);
    }
    for chunk in us_ids.chunks(30) {
        assert_eq!(post(&server, &us_key, chunk).await, 200);
    }
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );

    for (bucket, project, sent, other) in [
        (&eu_bucket, &eu_project, &eu_ids, &us_project),
        (&us_bucket, &us_project, &us_ids, &eu_project),
    ] {
        let (messages, keys) = bucket_messages(&client, bucket, "").await;
        let counts = count_by_message_id(&messages);
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            sent.iter().cloned().collect::<BTreeSet<_>>(),
            "{bucket}"
        );
        assert!(
            counts.values().all(|count| *count == 1),
            "{bucket}: each message once"
        );
        assert!(
            messages
                .iter()
                .all(|message| message["projectId"] == project.as_str()
                    && message["projectId"] != other.as_str())
        );
        for key in &keys {
            let parts: Vec<&str> = key.split('/').collect();
            assert_eq!(parts[0], "segment-logs", "{key}");
            assert_eq!(parts[1], project.as_str(), "{key}");
            assert_eq!(
                parts[2].parse::<i64>().expect("day in unix ms") % 86_400_000,
                0,
                "{key}"
            );
            assert!(parts[3].ends_with(".gz"), "{key}");
            let head = client
                .head_object()
                .bucket(bucket.as_str())
                .key(key)
                .send()
                .await
                .unwrap();
            assert_eq!(head.content_encoding(), Some("gzip"), "{key}");
            assert_eq!(head.content_type(), Some("application/x-ndjson"), "{key}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_under_load_delays_but_loses_and_duplicates_nothing() {
    let Some(mut seaweed) = SeaweedProcess::start().await else {
        return;
    };
    let client = s3_client(&seaweed.endpoint(), "us-east-1");
    let bucket = unique_bucket("outage");
    create_bucket(&client, &bucket, None).await;
    let config = test_config(&s3_archive_block(
        "eu-west-1",
        &bucket,
        &seaweed.endpoint(),
        false,
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;

    let load = Load::start(&server, &[("eu-west-1", key)], 4, "outage");
    tokio::time::sleep(Duration::from_secs(1)).await;
    seaweed.stop();
    tokio::time::sleep(Duration::from_secs(8)).await;
    seaweed.restart().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (accepted_by_region, refused) = load.finish().await;
    let accepted: BTreeSet<String> = accepted_by_region.into_values().flatten().collect();
    assert_eq!(refused, 0, "ingestion answered 200 throughout the outage");
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(90))
            .await,
        "the backlog drained after recovery"
    );
    let (messages, _) = bucket_messages(&client, &bucket, "").await;
    let counts = count_by_message_id(&messages);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        accepted,
        "every accepted message arrived"
    );
    assert!(counts.values().all(|count| *count == 1), "and exactly once");
    let metrics = server.metrics_text().await;
    let failures = metric_value(
        &metrics,
        "meridian_sink_failed_attempts_total{region=\"eu-west-1\",sink=\"archive\"}",
    )
    .unwrap();
    assert!(failures >= 1.0, "the outage is visible in metrics");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_loses_and_duplicates_nothing() {
    let Some(endpoint) = shared_service("MERIDIAN_TEST_S3_ENDPOINT") else {
        return;
    };
    let client = s3_client(&endpoint, "us-east-1");
    let bucket = unique_bucket("kill");
    create_bucket(&client, &bucket, None).await;
    let config = test_config(&s3_archive_block("eu-west-1", &bucket, &endpoint, false));
    let mut server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let mut accepted = BTreeSet::new();
    let mut next = 0;
    for round in 0..5u64 {
        if round > 0 {
            server.spawn().await;
        }
        let deadline = std::time::Instant::now() + Duration::from_millis(300 + round * 200);
        while std::time::Instant::now() < deadline {
            let batch = ids(&format!("k{next}"), 10);
            next += 1;
            if post(&server, &key, &batch).await == 200 {
                accepted.extend(batch);
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
    let (messages, _) = bucket_messages(&client, &bucket, "").await;
    let counts = count_by_message_id(&messages);
    let duplicates: Vec<_> = counts
        .iter()
        .filter(|(_, count)| **count > 1)
        .take(5)
        .collect();
    assert!(duplicates.is_empty(), "duplicated: {duplicates:?}");
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    assert!(accepted.len() > 100);
}

#[tokio::test]
async fn a_bucket_in_another_region_is_refused_and_its_data_stays_queued() {
    let Some(moto) = MotoProcess::start().await else {
        return;
    };
    let client = s3_client(&moto.url(), "eu-west-1");
    let bucket = unique_bucket("misplaced");
    // The us-east-1 archive bucket actually lives in eu-west-1.
    create_bucket(&client, &bucket, Some("eu-west-1")).await;
    let config = test_config(&s3_archive_block("us-east-1", &bucket, &moto.url(), true));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "us-east-1").await;
    assert_eq!(
        post(&server, &key, &ids("kept", 5)).await,
        200,
        "ingestion continues"
    );

    let refused = wait_until(Duration::from_secs(30), || async {
        let response = server
            .client
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        let detail = server.node_status().await;
        status == 503
            && body["failing"]
                .to_string()
                .contains("delivery us-east-1 archive")
            && detail["regions"]["us-east-1"]["sinks"][0]["problem"]
                .as_str()
                .is_some_and(|problem| problem.contains("eu-west-1"))
    })
    .await;
    assert!(refused, "/readyz reports the residency mismatch");
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains("meridian_sink_healthy{region=\"us-east-1\",sink=\"archive\"} 0"),
        "metric shows it:\n{}",
        metrics
            .lines()
            .filter(|line| line.contains("healthy"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(server.log().contains("another region"), "and the log");
    let objects = client
        .list_objects_v2()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();
    assert_eq!(
        objects.key_count().unwrap_or(0),
        0,
        "nothing was written to the misplaced bucket"
    );
    let pending: f64 = metrics
        .lines()
        .find(|line| {
            line.starts_with("meridian_sink_pending_records{region=\"us-east-1\",sink=\"archive\"}")
        })
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert_eq!(pending, 5.0, "the messages stay queued");
}

#[tokio::test]
async fn a_bucket_line_copied_into_another_regions_section_is_refused_before_anything_is_written() {
    let Some(moto) = MotoProcess::start().await else {
        return;
    };
    for (section, bucket_region) in [("us-east-1", "eu-west-1"), ("eu-west-1", "us-east-1")] {
        let client = s3_client(&moto.url(), bucket_region);
        let bucket = unique_bucket("copied");
        // S3 takes no location constraint for us-east-1.
        let constraint = Some(bucket_region).filter(|region| *region != "us-east-1");
        create_bucket(&client, &bucket, constraint).await;
        // The line names the bucket's true region, so a guard that trusted the line would pass.
        let block = format!(
            "[regions.{section}.archive]\ns3 = {{ bucket = \"{bucket}\", region = \"{bucket_region}\", endpoint = \"{}\", force_path_style = true, access_key_id = \"test\", secret_access_key = \"test\" }}\n",
            moto.url()
        );
        let root = tempfile::tempdir().unwrap();
        let config_path = root.path().join("meridian.toml");
        std::fs::write(&config_path, test_config(&block)).unwrap();
        for arguments in [
            &["serve", "--check-config", "--config"][..],
            &["serve", "--config"][..],
        ] {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
                .args(arguments)
                .arg(&config_path)
                .env("MERIDIAN_DATA_DIR", root.path().join("data"))
                .env("MERIDIAN_LISTEN", format!("127.0.0.1:{}", free_port()))
                .env("MERIDIAN_JWT_SECRET", JWT_SECRET)
                .env_remove("MERIDIAN_CATALOG_URL")
                .output()
                .expect("meridian runs");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                !output.status.success(),
                "{arguments:?} accepted it:\n{text}"
            );
            assert!(
                text.contains(&format!("regions.{section}.archive.s3"))
                    && text.contains(&format!("`{bucket_region}`"))
                    && text.contains(&format!("`{section}`")),
                "the refusal names both regions: {text}"
            );
        }
        assert!(
            bucket_messages(&client, &bucket, "").await.0.is_empty(),
            "nothing was written to the bucket"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_customer_storage_archives_there_and_nowhere_else() {
    let Some(moto) = MotoProcess::start().await else {
        return;
    };
    let customer_bucket = unique_bucket("customer");
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/helpers/moto_customer_account.py");
    // The role first trusts an id no project has: the project's own is known once it exists.
    let setup = std::process::Command::new("python3")
        .arg(&helper)
        .args([
            moto.url().as_str(),
            customer_bucket.as_str(),
            "eu-west-1",
            "not-yet-known",
        ])
        .output()
        .expect("python3 runs");
    assert!(
        setup.status.success(),
        "moto setup failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let account: Value = serde_json::from_slice(&setup.stdout).expect("setup prints JSON");
    let role_arn = account["role_arn"].as_str().unwrap().to_string();
    let config = test_config(&format!(
        "[customer_storage]\nendpoint = \"{}\"\nforce_path_style = true\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        moto.url(),
        account["access_key_id"].as_str().unwrap(),
        account["secret_access_key"].as_str().unwrap()
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (local_project, local_key) = server.create_project("acme", "eu-west-1").await;
    let (customer_project, customer_key) = server.create_project("acme", "eu-west-1").await;
    let owner = server.issue_token("owner", Some("acme"));
    let (_, project) = server
        .admin(
            reqwest::Method::GET,
            &format!("/admin/projects/{customer_project}"),
            &owner,
            None,
        )
        .await;
    let external_id = project["storage_external_id"].as_str().unwrap().to_string();
    assert_eq!(external_id, format!("meridian-{customer_project}"));
    let storage_path = format!("/admin/projects/{customer_project}/storage");
    let storage = |bucket: &str| json!({"bucket": bucket, "prefix": "meridian", "role_arn": role_arn, "label": "customer archive"});

    let mut chosen_by_the_customer = storage(&customer_bucket);
    chosen_by_the_customer["external_id"] = json!("not-yet-known");
    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &storage_path,
            &owner,
            Some(chosen_by_the_customer),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "external_id_mismatch", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(&external_id),
        "names the id to put in the trust policy: {body}"
    );
    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &storage_path,
            &owner,
            Some(storage(&customer_bucket)),
        )
        .await;
    assert_eq!(
        status, 400,
        "the trust policy does not name this project yet: {body}"
    );
    assert_eq!(body["code"], "storage_verification_failed");
    assert!(
        body["message"].as_str().unwrap().contains(&external_id),
        "an actionable sentence: {body}"
    );
    let trust = std::process::Command::new("python3")
        .arg(&helper)
        .args([
            "trust",
            moto.url().as_str(),
            account["customer_access_key_id"].as_str().unwrap(),
            account["customer_secret_access_key"].as_str().unwrap(),
            external_id.as_str(),
        ])
        .output()
        .expect("python3 runs");
    assert!(
        trust.status.success(),
        "trust policy update failed: {}",
        String::from_utf8_lossy(&trust.stderr)
    );

    // The confused deputy: another customer who knows the role ARN cannot make Meridian use it.
    server.create_org("mallory").await;
    let (mallory_project, _) = server.create_project("mallory", "eu-west-1").await;
    let mallory = server.issue_token("owner", Some("mallory"));
    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/projects/{mallory_project}/storage"),
            &mallory,
            Some(storage(&customer_bucket)),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "storage_verification_failed", "{body}");
    let mut with_the_victims_id = storage(&customer_bucket);
    with_the_victims_id["external_id"] = json!(external_id);
    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/projects/{mallory_project}/storage"),
            &mallory,
            Some(with_the_victims_id),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "external_id_mismatch", "{body}");

    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &storage_path,
            &owner,
            Some(storage("no-such-bucket-here")),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("does not exist"),
        "{body}"
    );
    let (_, project) = server
        .admin(
            reqwest::Method::GET,
            &format!("/admin/projects/{customer_project}"),
            &owner,
            None,
        )
        .await;
    assert_eq!(
        project["storage"],
        Value::Null,
        "failed verifications change nothing"
    );
    let admin = server.issue_token("admin", Some("acme"));
    let (status, _) = server
        .admin(
            reqwest::Method::PUT,
            &storage_path,
            &admin,
            Some(storage(&customer_bucket)),
        )
        .await;
    assert_eq!(status, 403, "storage is owner-only");

    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &storage_path,
            &owner,
            Some(storage(&customer_bucket)),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["storage"]["bucket"], customer_bucket.as_str());

    let (customer_ids, local_ids) = (ids("customer", 40), ids("local", 30));
    assert_eq!(post(&server, &customer_key, &customer_ids).await, 200);
    assert_eq!(post(&server, &local_key, &local_ids).await, 200);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );

    let customer_client = {
        let credentials = aws_sdk_s3::config::Credentials::new(
            account["customer_access_key_id"].as_str().unwrap(),
            account["customer_secret_access_key"].as_str().unwrap(),
            None,
            None,
            "tests",
        );
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::new()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("eu-west-1"))
                .endpoint_url(moto.url())
                .force_path_style(true)
                .credentials_provider(credentials)
                .build(),
        )
    };
    let (messages, keys) = bucket_messages(&customer_client, &customer_bucket, "").await;
    let counts = count_by_message_id(&messages);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        customer_ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(counts.values().all(|count| *count == 1));
    assert!(
        keys.iter()
            .all(|key| key.starts_with(&format!("meridian/segment-logs/{customer_project}/"))),
        "{keys:?}"
    );
    assert!(
        !keys
            .iter()
            .any(|key| key.contains(".meridian-access-check")),
        "the test object was deleted"
    );
    let regional = server.archived_messages("eu-west-1");
    assert!(
        regional
            .iter()
            .all(|message| message["projectId"] != customer_project.as_str()),
        "nothing of it in the regional archive"
    );
    assert_eq!(regional.len(), local_ids.len());
    assert!(
        regional
            .iter()
            .all(|message| message["projectId"] == local_project.as_str())
    );

    let (status, _) = server
        .admin(reqwest::Method::DELETE, &storage_path, &owner, None)
        .await;
    assert_eq!(status, 204);
    assert_eq!(
        post(&server, &customer_key, &ids("back-home", 3)).await,
        200
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    let regional = server.archived_messages("eu-west-1");
    assert_eq!(
        regional
            .iter()
            .filter(|message| message["projectId"] == customer_project.as_str())
            .count(),
        3,
        "back to the regional archive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_customer_bucket_never_holds_back_the_rest_of_the_region() {
    let Some(moto) = MotoProcess::start().await else {
        return;
    };
    let customer = s3_client(&moto.url(), "eu-west-1");
    let bucket = unique_bucket("fragile");
    create_bucket(&customer, &bucket, Some("eu-west-1")).await;
    let config = test_config(&format!(
        "[customer_storage]\nendpoint = \"{}\"\nforce_path_style = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nspool_retry_secs = 1\n",
        moto.url()
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (customer_project, customer_key) = server.create_project("acme", "eu-west-1").await;
    let (regional_project, regional_key) = server.create_project("acme", "eu-west-1").await;
    let owner = server.issue_token("owner", Some("acme"));
    let storage = json!({"bucket": bucket, "role_arn": "arn:aws:iam::123456789012:role/customer"});
    let (status, body) = server
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/projects/{customer_project}/storage"),
            &owner,
            Some(storage),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The customer deletes their bucket.
    customer
        .delete_bucket()
        .bucket(&bucket)
        .send()
        .await
        .unwrap();

    let (customer_ids, regional_ids) = (ids("theirs", 20), ids("ours", 20));
    assert_eq!(post(&server, &customer_key, &customer_ids).await, 200);
    assert_eq!(post(&server, &regional_key, &regional_ids).await, 200);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await,
        "the region's archive is not held back"
    );
    let regional = server.archived_messages("eu-west-1");
    assert_eq!(regional.len(), 20);
    assert!(
        regional
            .iter()
            .all(|message| message["projectId"] == regional_project.as_str())
    );
    let spool_dir = server
        .data_dir
        .join("spool/eu-west-1")
        .join(&customer_project);
    assert!(
        std::fs::read_dir(&spool_dir)
            .map(|entries| entries.count())
            .unwrap_or(0)
            >= 1,
        "the customer's objects wait in the spool"
    );

    // The bucket comes back: the spool drains into it, each message once.
    create_bucket(&customer, &bucket, Some("eu-west-1")).await;
    let drained = wait_until(Duration::from_secs(60), || async {
        std::fs::read_dir(&spool_dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
            == 0
    })
    .await;
    assert!(drained, "the spool drained once the bucket was back");
    let (messages, _) = bucket_messages(&customer, &bucket, "").await;
    let counts = count_by_message_id(&messages);
    assert_eq!(
        counts.keys().cloned().collect::<BTreeSet<_>>(),
        customer_ids.iter().cloned().collect::<BTreeSet<_>>()
    );
    assert!(counts.values().all(|count| *count == 1));
    let metrics = server.metrics_text().await;
    assert!(metrics.contains(
        "meridian_sink_customer_objects_unspooled_total{region=\"eu-west-1\",sink=\"archive\"}"
    ));
}
