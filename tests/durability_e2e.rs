//! End-to-end durability: kill -9 under load, corrupt queue tails and damaged records, the
//! per-region disk budget.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use rand::Rng;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_message_survives_repeated_kill_9_exactly_once() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let keys = [
        (
            "eu-west-1",
            server.create_project("acme", "eu-west-1").await.1,
        ),
        (
            "us-east-1",
            server.create_project("acme", "us-east-1").await.1,
        ),
    ];
    let mut accepted_by_region: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let rounds = 6;
    let mut schedule = kill_schedule("durability kill -9");
    for round in 0..rounds {
        if round > 0 {
            server.spawn().await;
        }
        let load = Load::start(&server, &keys, 8, &format!("r{round}"));
        let alive_for = Duration::from_millis(schedule.random_range(300..900));
        tokio::time::sleep(alive_for).await;
        server.kill_hard();
        let (accepted, _refused_while_killed) = load.finish().await;
        for (region, ids) in accepted {
            accepted_by_region.entry(region).or_default().extend(ids);
        }
    }
    server.spawn().await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await,
        "sinks drained after the last restart"
    );
    let total_accepted: usize = accepted_by_region.values().map(BTreeSet::len).sum();
    assert!(
        total_accepted > 100,
        "the load produced too few acknowledged messages ({total_accepted}) to mean anything"
    );
    for (region, accepted) in accepted_by_region.iter() {
        let archived = count_by_message_id(&server.archived_messages(region));
        let duplicates: Vec<_> = archived.iter().filter(|(_, count)| **count > 1).collect();
        assert!(
            duplicates.is_empty(),
            "{region}: messages archived more than once: {duplicates:?}"
        );
        let missing: Vec<_> = accepted
            .iter()
            .filter(|id| !archived.contains_key(*id))
            .collect();
        assert!(
            missing.is_empty(),
            "{region}: {} acknowledged messages lost, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        eprintln!(
            "{region}: {} acknowledged, {} archived (requests cut by kill -9 may be stored too)",
            accepted.len(),
            archived.len()
        );
    }
}

fn last_segment(server: &TestServer, region: &str) -> std::path::PathBuf {
    let directory = server.data_dir.join("queue").join(region).join("segments");
    let mut segments: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

#[tokio::test]
async fn a_torn_or_scribbled_queue_tail_is_cut_logged_and_the_node_serves() {
    for damage in ["garbage appended", "torn last record"] {
        let mut server = TestServer::start(&test_config_with_flush(600_000, ""), &[]).await;
        server.create_org("acme").await;
        let (_, key) = server.create_project("acme", "eu-west-1").await;
        for index in 0..3 {
            let response = server
                .client
                .post(server.url("/v1/track"))
                .header("Authorization", basic_auth(&key))
                .json(&json!({"userId": "u", "event": "Before", "messageId": format!("before-{index}")}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        server.kill_hard();
        let segment = last_segment(&server, "eu-west-1");
        let length = std::fs::metadata(&segment).unwrap().len();
        match damage {
            "garbage appended" => {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&segment)
                    .unwrap();
                file.write_all(&[0x5a; 100]).unwrap();
            }
            _ => std::fs::OpenOptions::new()
                .write(true)
                .open(&segment)
                .unwrap()
                .set_len(length - 5)
                .unwrap(),
        }
        server.spawn().await;
        assert!(
            server.log().contains("torn tail"),
            "{damage}: the cut is logged:\n{}",
            server.log()
        );
        let response = server
            .client
            .post(server.url("/v1/track"))
            .header("Authorization", basic_auth(&key))
            .json(&json!({"userId": "u", "event": "After", "messageId": "after"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{damage}: serves after recovery");
        assert_eq!(server.terminate(), Some(0), "clean shutdown flushes");
        let archived = count_by_message_id(&server.archived_messages("eu-west-1"));
        let expected: Vec<&str> = if damage == "garbage appended" {
            vec!["after", "before-0", "before-1", "before-2"]
        } else {
            // The torn record is lost (the disk lost it); everything before it survives.
            vec!["after", "before-0", "before-1"]
        };
        assert_eq!(
            archived.keys().map(String::as_str).collect::<Vec<_>>(),
            expected,
            "{damage}"
        );
    }
}

#[tokio::test]
async fn a_flipped_bit_in_the_queue_loses_only_the_damaged_message_and_keeps_every_other_one() {
    let mut server = TestServer::start(&test_config_with_flush(600_000, ""), &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let mut acknowledged = BTreeSet::new();
    for batch_index in 0..20 {
        let batch: Vec<Value> = (0..50)
            .map(|index| {
                let message_id = format!("m-{batch_index:02}-{index:02}");
                acknowledged.insert(message_id.clone());
                json!({"type": "track", "userId": "u", "event": "Queued", "messageId": message_id})
            })
            .collect();
        let response = server
            .client
            .post(server.url("/v1/batch"))
            .header("Authorization", basic_auth(&key))
            .json(&json!({ "batch": batch }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    server.kill_hard();
    let segment = last_segment(&server, "eu-west-1");
    let mut bytes = std::fs::read(&segment).unwrap();
    let quarter = bytes.len() / 4;
    bytes[quarter] ^= 0x20;
    std::fs::write(&segment, bytes).unwrap();

    server.spawn().await;
    assert_eq!(
        server
            .metric("meridian_queue_damaged_records_total{region=\"eu-west-1\"}")
            .await,
        Some(1.0),
        "recovery met the damage"
    );
    assert_eq!(
        server.terminate(),
        Some(0),
        "a clean shutdown flushes the queue"
    );
    let archived = count_by_message_id(&server.archived_messages("eu-west-1"));
    let duplicates: Vec<_> = archived.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicates.is_empty(), "archived twice: {duplicates:?}");
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !archived.contains_key(*id))
        .collect();
    assert_eq!(
        lost.len(),
        1,
        "exactly the damaged message is lost, not the {} after it: {:?}",
        acknowledged.len() * 3 / 4,
        &lost[..lost.len().min(5)]
    );
    let quarantine = server.data_dir.join("queue/eu-west-1/quarantine");
    let quarantined = std::fs::read_dir(&quarantine).unwrap().count();
    assert_eq!(quarantined, 2, "the damaged bytes and their description");
    assert!(
        server.log().contains("queue segment is corrupt"),
        "logged loudly:\n{}",
        server.log()
    );
}

#[tokio::test]
async fn a_full_disk_budget_refuses_only_its_region_and_recovers_when_the_sink_drains() {
    let root = tempfile::tempdir().unwrap();
    // A file where the eu archive directory should be: its sink fails until the file is removed.
    let blocker = root.path().join("blocker");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let config = test_config(&format!(
        "segment_max_bytes = 8192\n[regions.eu-west-1]\ndisk_budget_bytes = 32768\n[regions.eu-west-1.archive]\ndir = \"{}\"\n",
        blocker.join("archive").display()
    ));
    let server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (_, eu_key) = server.create_project("acme", "eu-west-1").await;
    let (_, us_key) = server.create_project("acme", "us-east-1").await;
    let send = |key: String, id: String| {
        let client = server.client.clone();
        let url = server.url("/v1/track");
        async move {
            let response = client
                .post(url)
                .header("Authorization", basic_auth(&key))
                .json(&json!({"userId": "u", "event": "Fill", "messageId": id, "properties": {"pad": "p".repeat(500)}}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let region = response.headers()["x-region"].to_str().unwrap().to_string();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().unwrap().to_string());
            let body: Value = response.json().await.unwrap();
            (status, region, retry_after, body)
        }
    };
    let mut eu_accepted = Vec::new();
    let mut refusal = None;
    for index in 0..200 {
        let id = format!("eu-{index}");
        let (status, region, retry_after, body) = send(eu_key.clone(), id.clone()).await;
        assert_eq!(region, "eu-west-1");
        match status {
            200 => eu_accepted.push(id),
            503 => {
                refusal = Some((retry_after, body));
                break;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let (retry_after, body) = refusal.expect("the eu budget filled up");
    assert_eq!(body["code"], "queue_full");
    assert!(retry_after.is_some(), "503 carries Retry-After");
    let (status, region, _, _) = send(us_key.clone(), "us-0".into()).await;
    assert_eq!(
        (status, region.as_str()),
        (200, "us-east-1"),
        "other regions keep working"
    );
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "readyz reports the full queue");

    std::fs::remove_file(&blocker).unwrap();
    let recovered = wait_until(Duration::from_secs(60), || {
        let key = eu_key.clone();
        async move { send(key, "eu-after".into()).await.0 == 200 }
    })
    .await;
    assert!(
        recovered,
        "eu accepts again once its sink drained the backlog"
    );
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await
    );
    let archived = count_by_message_id(&archived_messages_in(&blocker.join("archive")));
    for id in &eu_accepted {
        assert_eq!(archived.get(id), Some(&1), "{id} archived once");
    }
}
