//! The replicated queue backend, for real: 3-server NATS JetStream clusters as plain processes,
//! real `meridian` nodes on a PostgreSQL catalog, SeaweedFS and ClickHouse. Servers and nodes are
//! killed with SIGKILL (a node's data directory deleted too); every acknowledged messageId must be
//! in the bucket and in ClickHouse exactly once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::cluster::Cluster;
use common::nats::{NatsCluster, jetstream_config};
use common::*;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::{Value, json};

const REGION: &str = "eu-west-1";

/// Two nodes of one region on a 3-server cluster with `partitions` streams, a load spread over
/// both nodes, and at random moments: kill -9 of a NATS server (restarted on its store), and
/// kill -9 of a Meridian node whose data directory is then deleted (restarted empty). Returns the
/// cluster (still running) and the project after checking every store.
async fn kill_nats_servers_and_nodes(partitions: u32, tag: &str) -> Option<(Cluster, String)> {
    let mut nats = NatsCluster::start("eu", 3).await?;
    let extra = jetstream_config(
        &[(REGION, &nats)],
        tag,
        &format!("partitions = {partitions}"),
    );
    let mut cluster = Cluster::start(2, REGION, &extra).await?;
    let (project_id, key) = cluster.create_project("replicated").await;
    cluster.wait_for_key_everywhere(&key).await;
    let load = cluster.load(&key, 4, tag, Spread::Random, Duration::from_millis(5));
    let mut disturbances = Vec::new();
    let mut schedule = kill_schedule("jetstream kills");
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(schedule.random_range(300..1200))).await;
        if round % 2 == 0 {
            let victim = schedule.random_range(0..nats.size());
            nats.kill_hard(victim);
            disturbances.push(format!("nats n{victim}"));
            tokio::time::sleep(Duration::from_millis(schedule.random_range(300..1500))).await;
            nats.restart(victim).await;
        } else {
            let victim = schedule.random_range(0..cluster.nodes.len());
            let node = &mut cluster.nodes[victim];
            node.kill_hard();
            std::fs::remove_dir_all(&node.data_dir).expect("the node's data directory deleted");
            disturbances.push(format!("meridian node {victim} and its disk"));
            tokio::time::sleep(Duration::from_millis(schedule.random_range(100..600))).await;
            node.spawn().await;
        }
    }
    let (mut accepted, refused) = load.finish().await;
    let accepted = accepted.remove(REGION).unwrap_or_default();
    eprintln!(
        "partitions {partitions}: {disturbances:?}; {} accepted, {refused} refused",
        accepted.len()
    );
    assert!(accepted.len() > 200, "the load was applied");
    // Delivered by whichever node owns each partition now (a killed node's leases are taken
    // over by a live one); the nodes stay up until every store is complete.
    cluster
        .assert_exactly_once(&project_id, &accepted, tag)
        .await;
    Some((cluster, project_id))
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_nats_servers_and_of_nodes_with_their_disks_loses_and_duplicates_nothing() {
    let Some((mut cluster, _)) = kill_nats_servers_and_nodes(1, "js1").await else {
        return;
    };
    cluster.terminate_all();
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_three_partitions_the_same_kills_end_exact_and_every_partition_is_delivered() {
    let Some((mut cluster, project_id)) = kill_nats_servers_and_nodes(3, "js3").await else {
        return;
    };
    // Every accepted id was found once in both stores, and ids are spread over the partitions by
    // a hash: each partition was delivered. Its archive objects say by their names (a batch is
    // named after its partition's stream), whichever node delivered them (counters would not: a
    // node killed after delivering a partition starts again from zero).
    let (_, keys) = cluster.bucket_counts(&project_id).await;
    for partition in ["p0", "p1", "p2"] {
        let stream = format!("js3-{REGION}-{partition}-");
        assert!(
            keys.iter().any(|key| key.contains(&stream)),
            "partition {partition} has archive objects (named after stream {stream}...)"
        );
    }
    cluster.terminate_all();
}

/// Once the node's sinks caught up: how often each messageId is in the region's archive.
async fn archived_once_drained(server: &TestServer, region: &str) -> BTreeMap<String, usize> {
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await,
        "the sinks catch up"
    );
    count_by_message_id(&server.archived_messages(region))
}

/// How many messages the stream holds now, read from the cluster itself.
async fn stream_messages(nats: &NatsCluster, stream: &str) -> u64 {
    let client = async_nats::connect(nats.urls()[0].as_str())
        .await
        .expect("connects");
    let mut stream = async_nats::jetstream::new(client)
        .get_stream(stream)
        .await
        .expect("the stream");
    stream.info().await.expect("stream info").state.messages
}

/// A node of eu-west-1 only, on `nats`.
async fn single_node(nats: &NatsCluster, tag: &str) -> TestServer {
    TestServer::start(
        &test_config(&jetstream_config(&[(REGION, nats)], tag, "")),
        &[("MERIDIAN_SERVE_REGIONS", REGION)],
    )
    .await
}

async fn post_track(server: &TestServer, key: &str, message_id: &str) -> reqwest::Response {
    server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(key))
        .json(&json!({"userId": "u", "event": "E", "messageId": message_id}))
        .send()
        .await
        .expect("POST /v1/track answered")
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_ingest_answers_503_and_recovers_by_itself() {
    let Some(mut nats) = NatsCluster::start("eu", 3).await else {
        return;
    };
    let server = single_node(&nats, "quorum").await;
    server.create_org("quorum").await;
    let (_, key) = server.create_project("quorum", REGION).await;
    assert_eq!(post_track(&server, &key, "before").await.status(), 200);

    nats.kill_hard(1);
    nats.kill_hard(2);
    // From now on no request may be answered 200: no message can reach a quorum.
    for attempt in 0..8 {
        let response = post_track(&server, &key, &format!("during-{attempt}")).await;
        assert_eq!(
            response.status(),
            503,
            "without a quorum nothing is acknowledged"
        );
        assert!(
            response.headers().contains_key("retry-after"),
            "a 503 says when to retry"
        );
    }
    let not_ready = wait_until(Duration::from_secs(20), || async {
        server
            .client
            .get(server.url("/readyz"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 503)
    })
    .await;
    assert!(not_ready, "/readyz says the region cannot take writes");

    nats.restart(1).await;
    nats.restart(2).await;
    let recovered = wait_until(Duration::from_secs(60), || async {
        post_track(&server, &key, "after").await.status() == 200
    })
    .await;
    assert!(recovered, "ingest recovers by itself once a quorum is back");
    let archived = archived_once_drained(&server, REGION).await;
    assert_eq!(archived.get("before"), Some(&1));
    assert_eq!(archived.get("after"), Some(&1));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_retry_of_a_stored_message_is_stored_once() {
    let Some(nats) = NatsCluster::start("eu", 3).await else {
        return;
    };
    let server = single_node(&nats, "retry").await;
    server.create_org("retry").await;
    let (_, key) = server.create_project("retry", REGION).await;
    for _ in 0..3 {
        assert_eq!(post_track(&server, &key, "same-id").await.status(), 200);
    }
    let archived = archived_once_drained(&server, REGION).await;
    assert_eq!(
        archived.get("same-id"),
        Some(&1),
        "the stream's duplicate window stored the retries once"
    );
    let duplicates = server
        .metric(&format!(
            "meridian_queue_jetstream_duplicate_records_total{{region=\"{REGION}\"}}"
        ))
        .await;
    assert_eq!(duplicates, Some(2.0));
}

/// Every message published to a NATS cluster, as seen by a subscriber of all Meridian subjects.
async fn subscribe_everything(cluster: &NatsCluster) -> async_nats::Subscriber {
    let client = async_nats::connect(cluster.urls()[0].as_str())
        .await
        .expect("a test client connects");
    // Every subject of two tokens, the form of every stream subject (`<stream>.p<N>`) whatever
    // region's stream it is: a message of another region published to this cluster would show.
    let subscriber = client.subscribe("*.*").await.expect("subscribed");
    client.flush().await.expect("subscription registered");
    subscriber
}

/// JetStream's own traffic, and copies of stored messages the stream delivers to a reader (they
/// carry the original subject; their reply names the stream's sequence, `$JS.ACK...`): only
/// messages published by a node are counted.
fn is_not_a_publish(message: &async_nats::Message) -> bool {
    let is_delivery = message
        .reply
        .as_ref()
        .is_some_and(|reply| reply.starts_with("$JS.ACK"));
    message.subject.starts_with('$') || message.subject.starts_with("_INBOX") || is_delivery
}

async fn projects_seen(
    mut subscriber: async_nats::Subscriber,
    expected: usize,
) -> BTreeMap<String, usize> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0;
    while total < expected {
        let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(10), subscriber.next()).await
        else {
            break;
        };
        if is_not_a_publish(&message) {
            continue;
        }
        let payload: Value =
            serde_json::from_slice(&message.payload).expect("a queued message is JSON");
        let project = payload["projectId"].as_str().unwrap_or("").to_string();
        *seen.entry(project).or_default() += 1;
        total += 1;
    }
    // Anything more that arrives shortly after would be a stray publish: look briefly.
    while let Ok(Some(message)) =
        tokio::time::timeout(Duration::from_millis(500), subscriber.next()).await
    {
        if is_not_a_publish(&message) {
            continue;
        }
        let payload: Value = serde_json::from_slice(&message.payload).unwrap_or(Value::Null);
        let project = payload["projectId"].as_str().unwrap_or("").to_string();
        *seen.entry(project).or_default() += 1;
    }
    seen
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_regions_cluster_holds_only_that_regions_projects() {
    let (Some(eu), Some(us)) = (
        NatsCluster::start("eu", 1).await,
        NatsCluster::start("us", 1).await,
    ) else {
        return;
    };
    let server = TestServer::start(
        &test_config(&jetstream_config(
            &[("eu-west-1", &eu), ("us-east-1", &us)],
            "residency",
            "",
        )),
        &[("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")],
    )
    .await;
    server.create_org("residency").await;
    let (eu_project, eu_key) = server.create_project("residency", "eu-west-1").await;
    let (us_project, us_key) = server.create_project("residency", "us-east-1").await;
    let eu_seen = subscribe_everything(&eu).await;
    let us_seen = subscribe_everything(&us).await;
    for index in 0..20 {
        assert_eq!(
            post_track(&server, &eu_key, &format!("eu-{index}"))
                .await
                .status(),
            200
        );
        assert_eq!(
            post_track(&server, &us_key, &format!("us-{index}"))
                .await
                .status(),
            200
        );
    }
    let eu_seen = projects_seen(eu_seen, 20).await;
    let us_seen = projects_seen(us_seen, 20).await;
    assert_eq!(
        eu_seen,
        BTreeMap::from([(eu_project.clone(), 20)]),
        "the eu-west-1 cluster saw its project's messages and nothing else"
    );
    assert_eq!(
        us_seen,
        BTreeMap::from([(us_project.clone(), 20)]),
        "the us-east-1 cluster saw its project's messages and nothing else"
    );
    // And the streams and buckets on each cluster are that region's only.
    for (cluster, own, other) in [
        (&eu, "eu-west-1", "us-east-1"),
        (&us, "us-east-1", "eu-west-1"),
    ] {
        let client = async_nats::connect(cluster.urls()[0].as_str())
            .await
            .expect("connects");
        let names: BTreeSet<String> = async_nats::jetstream::new(client)
            .stream_names()
            .filter_map(|name| async move { name.ok() })
            .collect()
            .await;
        assert!(
            names
                .iter()
                .all(|name| name.contains(own) && !name.contains(other)),
            "{own}'s cluster holds only {own}'s streams: {names:?}"
        );
        assert!(names.contains(&format!("residency-{own}-p0")), "{names:?}");
    }
    let eu_archived = archived_once_drained(&server, "eu-west-1").await;
    let us_archived = count_by_message_id(&server.archived_messages("us-east-1"));
    assert_eq!(eu_archived.len(), 20);
    assert_eq!(us_archived.len(), 20);
    assert!(eu_archived.keys().all(|id| id.starts_with("eu-")));
    assert!(us_archived.keys().all(|id| id.starts_with("us-")));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_residency_report_reads_the_regions_streams_and_flags_a_foreign_project_in_them() {
    let (Some(eu), Some(us)) = (
        NatsCluster::start("eu", 1).await,
        NatsCluster::start("us", 1).await,
    ) else {
        return;
    };
    // The archive flushes only after ten minutes: its cursor stays put, so the stream keeps every
    // message (nothing is purged) while the report runs.
    let config = test_config_with_flush(
        600_000,
        &jetstream_config(&[("eu-west-1", &eu), ("us-east-1", &us)], "report", ""),
    );
    let server = TestServer::start(
        &config,
        &[("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")],
    )
    .await;
    server.create_org("report").await;
    let (eu_project, eu_key) = server.create_project("report", "eu-west-1").await;
    let (us_project, _) = server.create_project("report", "us-east-1").await;
    for index in 0..5 {
        assert_eq!(
            post_track(&server, &eu_key, &format!("queued-{index}"))
                .await
                .status(),
            200
        );
    }
    let platform = server.issue_token("platform", None);
    let residency = || async {
        server
            .admin(
                reqwest::Method::GET,
                "/admin/regions/eu-west-1/residency",
                &platform,
                None,
            )
            .await
    };
    let (status, clean_report) = residency().await;
    assert_eq!(status, 200, "{clean_report}");
    assert_eq!(clean_report["clean"], true, "{clean_report}");
    let text = clean_report.to_string();
    assert!(
        text.contains("queue jetstream report-eu-west-1-p*"),
        "{text}"
    );
    assert_eq!(
        clean_report["projects"][&eu_project]["found_in"][0],
        format!("queue jetstream report-eu-west-1-p* on {}", eu.urls()[0]),
        "the report found the queued messages in the region's stream: {text}"
    );

    // A us-east-1 project's record planted in eu-west-1's stream (as a misrouting bug would).
    let client = async_nats::connect(eu.urls()[0].as_str())
        .await
        .expect("connects");
    async_nats::jetstream::new(client)
        .publish(
            "report-eu-west-1.p0",
            serde_json::to_vec(&json!({"projectId": us_project, "messageId": "planted"}))
                .unwrap()
                .into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");
    let (status, report) = residency().await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["clean"], false, "{report}");
    assert!(
        report["findings"].to_string().contains(&us_project),
        "{report}"
    );
}

/// The value of a series in a node's metrics, once it is `expected`.
async fn wait_for_metric(server: &TestServer, series: &str, expected: f64) -> bool {
    wait_until(Duration::from_secs(30), || async {
        server.metric(series).await == Some(expected)
    })
    .await
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_sink_never_purges_what_that_sink_has_not_delivered() {
    let Some(nats) = NatsCluster::start("eu", 1).await else {
        return;
    };
    let streams = jetstream_config(&[(REGION, &nats)], "purge", "");
    // Node A runs a ClickHouse sink that cannot deliver (nothing listens there): its cursor
    // stays at the stream's start. Node B has no ClickHouse sink in its config at all.
    let with_clickhouse = TestServer::start(
        &test_config(&format!(
            "{streams}\n[regions.{REGION}.clickhouse]\nurls = [\"http://127.0.0.1:9\"]\nrequest_timeout_secs = 1\n"
        )),
        &[("MERIDIAN_SERVE_REGIONS", REGION)],
    )
    .await;
    let clickhouse_cursor = format!(
        "meridian_queue_jetstream_consumer_pending_records{{region=\"{REGION}\",partition=\"p0\",sink=\"clickhouse\"}}"
    );
    assert!(
        wait_for_metric(&with_clickhouse, &clickhouse_cursor, 0.0).await,
        "node A made the ClickHouse cursor"
    );
    let without_clickhouse = TestServer::start(
        &test_config(&streams),
        &[("MERIDIAN_SERVE_REGIONS", REGION)],
    )
    .await;
    without_clickhouse.create_org("purge").await;
    let (_, key) = without_clickhouse.create_project("purge", REGION).await;
    for index in 0..10 {
        assert_eq!(
            post_track(&without_clickhouse, &key, &format!("kept-{index}"))
                .await
                .status(),
            200
        );
    }
    // Node B's purge rounds see both cursors: the archive delivered everything, ClickHouse
    // nothing (the metrics come from the cursors B read for its purge decision).
    let archive_cursor = format!(
        "meridian_queue_jetstream_consumer_pending_records{{region=\"{REGION}\",partition=\"p0\",sink=\"archive\"}}"
    );
    assert!(wait_for_metric(&without_clickhouse, &archive_cursor, 0.0).await);
    assert!(
        wait_for_metric(&without_clickhouse, &clickhouse_cursor, 10.0).await,
        "node B counts the ClickHouse cursor it does not run"
    );
    let held = stream_messages(&nats, "purge-eu-west-1-p0").await;
    assert_eq!(held, 10, "nothing ClickHouse has not delivered was purged");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_servers_take_gets_413_and_nothing_of_its_request_is_stored() {
    let Some(nats) = NatsCluster::start_with_max_payload("eu", 1, "4KB").await else {
        return;
    };
    let server = single_node(&nats, "payload").await;
    server.create_org("payload").await;
    let (_, key) = server.create_project("payload", REGION).await;
    let large = "x".repeat(6 * 1024);
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(&key))
        .json(&json!({"batch": [
            {"type": "track", "userId": "u", "event": "Small", "messageId": "small-1"},
            {"type": "track", "userId": "u", "event": "Large", "messageId": "large-1", "properties": {"blob": large}},
        ]}))
        .send()
        .await
        .expect("answered");
    assert_eq!(
        response.status(),
        413,
        "a clear refusal, not a 503 to retry forever"
    );
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["code"], "message_too_large", "{body}");
    // The small message of the refused request was not stored either; the next one is.
    assert_eq!(post_track(&server, &key, "after").await.status(), 200);
    let archived = archived_once_drained(&server, REGION).await;
    assert_eq!(archived.get("small-1"), None, "{archived:?}");
    assert_eq!(archived.get("after"), Some(&1));
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_answers_503_queue_full_and_keeps_what_it_acknowledged() {
    let Some(nats) = NatsCluster::start("eu", 1).await else {
        return;
    };
    // 32 KiB of stream, and a ClickHouse sink that cannot deliver: nothing is purged.
    let server = TestServer::start(
        &test_config(&format!(
            "{}\n[regions.{REGION}.clickhouse]\nurls = [\"http://127.0.0.1:9\"]\nrequest_timeout_secs = 1\n",
            jetstream_config(&[(REGION, &nats)], "full", "max_bytes = 32768")
        )),
        &[("MERIDIAN_SERVE_REGIONS", REGION)],
    )
    .await;
    server.create_org("full").await;
    let (_, key) = server.create_project("full", REGION).await;
    let mut accepted = 0;
    let mut refusal = None;
    for index in 0..500 {
        let response = post_track(&server, &key, &format!("fill-{index}")).await;
        if response.status() == 200 {
            accepted += 1;
            continue;
        }
        let retry_after = response.headers().get("retry-after").cloned();
        refusal = Some((
            response.status(),
            retry_after,
            response.json::<Value>().await.ok(),
        ));
        break;
    }
    let (status, retry_after, body) = refusal.expect("the stream filled up within 500 messages");
    assert!(accepted > 10, "some messages fit first: {accepted}");
    assert_eq!(status, 503);
    assert!(retry_after.is_some(), "a 503 says when to retry");
    assert_eq!(body.expect("a JSON error")["code"], "queue_full");
    // Everything acknowledged is in the stream.
    assert_eq!(stream_messages(&nats, "full-eu-west-1-p0").await, accepted);
}
