//! A really full disk: the node's data directory on a small tmpfs of its own (root mounts one).
//! Every ingest request gets a complete 503 + Retry-After while the disk is full, the queue keeps
//! a free-space reserve so its sinks can still drain, `/readyz` and `/metrics` tell the truth, and
//! the node recovers by itself once space returns; every acknowledged message is archived once.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallFilesystem {
    mount_point: PathBuf,
}

impl SmallFilesystem {
    fn mount(mount_point: &Path, size_mib: u64) -> SmallFilesystem {
        std::fs::create_dir_all(mount_point).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(mount_point)
            .output()
            .expect("mount runs");
        assert!(
            output.status.success(),
            "this test mounts a tmpfs and needs root: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallFilesystem {
            mount_point: mount_point.to_path_buf(),
        }
    }

    /// Fills the filesystem with a ballast file until `leave_bytes` or fewer are free (0: until a
    /// write fails with ENOSPC).
    fn fill(&self, leave_bytes: u64) -> PathBuf {
        let ballast = self.mount_point.join("ballast");
        let mut file = std::fs::File::create(&ballast).unwrap();
        let chunk = vec![0x42u8; 64 * 1024];
        loop {
            let free = free_bytes(&self.mount_point);
            if leave_bytes > 0 && free <= leave_bytes + chunk.len() as u64 {
                let last = (free.saturating_sub(leave_bytes)) as usize;
                file.write_all(&chunk[..last.min(chunk.len())]).unwrap();
                break;
            }
            if let Err(error) = file.write_all(&chunk) {
                assert_eq!(error.raw_os_error(), Some(libc::ENOSPC), "{error}");
                // Fill the last partial block too.
                while file.write_all(&chunk[..512]).is_ok() {}
                break;
            }
        }
        ballast
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mount_point)
            .status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let output = Command::new("stat")
        .args(["-f", "-c", "%a %S"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let mut fields = text
        .split_whitespace()
        .map(|field| field.parse::<u64>().unwrap());
    fields.next().unwrap() * fields.next().unwrap()
}

/// Sends one 50-message batch; returns the status, the Retry-After header and the message ids,
/// or the transport error (an empty reply) as `Err`.
async fn send_batch(
    server: &TestServer,
    key: &str,
    tag: &str,
) -> Result<(u16, Option<String>, Vec<String>), String> {
    send_padded_batch(server, key, tag, 400).await
}

async fn send_padded_batch(
    server: &TestServer,
    key: &str,
    tag: &str,
    padding_bytes: usize,
) -> Result<(u16, Option<String>, Vec<String>), String> {
    let ids: Vec<String> = (0..50).map(|index| format!("{tag}-{index:02}")).collect();
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| {
            json!({"type": "track", "userId": "u", "event": "Filled", "messageId": id,
                   "properties": {"padding": "x".repeat(padding_bytes)}})
        })
        .collect();
    let response = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(key))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .map_err(|error| format!("{error:?}"))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap_or_default().to_string());
    response
        .bytes()
        .await
        .map_err(|error| format!("body: {error:?}"))?;
    Ok((status, retry_after, ids))
}

/// Keeps the local archive of `region` from writing: a plain file where its directory goes (every
/// write fails with ENOTDIR and the sink retries). Removing the returned file lets it write again.
fn hold_the_archive(data_dir: &Path, region: &str) -> PathBuf {
    let archive_root = data_dir.join("archive");
    std::fs::create_dir_all(&archive_root).unwrap();
    let region_directory = archive_root.join(region);
    if region_directory.is_dir() {
        std::fs::remove_dir(&region_directory).expect("nothing archived yet");
    }
    std::fs::write(&region_directory, b"held by the test").unwrap();
    region_directory
}

async fn readyz(server: &TestServer) -> (u16, Value) {
    let response = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// Sends batches until one is acknowledged (each with its own ids); returns their ids.
async fn send_until_acknowledged(
    server: &TestServer,
    key: &str,
    padding_bytes: usize,
    timeout: Duration,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    for attempt in 0.. {
        assert!(
            std::time::Instant::now() < deadline,
            "ingest did not answer 200 again within {timeout:?} of space returning"
        );
        match send_padded_batch(server, key, &format!("probe-{attempt}"), padding_bytes).await {
            Ok((200, _, ids)) => return ids,
            Ok((503, Some(_), _)) => {}
            other => panic!("while recovering: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

async fn assert_not_ready(server: &TestServer) {
    let (status, body) = readyz(server).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        body["regions"]["eu-west-1"]["queue_writable"],
        json!(false),
        "{body}"
    );
    assert_eq!(
        server
            .metric("meridian_queue_writable{region=\"eu-west-1\"}")
            .await,
        Some(0.0)
    );
}

fn assert_archived_exactly_once(server: &TestServer, acknowledged: &BTreeSet<String>) {
    let archived = count_by_message_id(&server.archived_messages("eu-west-1"));
    let duplicates: Vec<_> = archived.iter().filter(|(_, count)| **count > 1).collect();
    assert!(duplicates.is_empty(), "archived twice: {duplicates:?}");
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !archived.contains_key(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

#[tokio::test]
async fn below_the_free_space_reserve_ingest_gets_503_while_the_sinks_drain_into_the_reserve() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let filesystem = SmallFilesystem::mount(&data_dir, 32);
    let reserve_bytes: u64 = 4 * 1024 * 1024;
    // Archive objects wait 10 s, so what is acknowledged first is still queued when space runs low.
    let config = test_config_with_flush(10_000, &format!("min_free_disk_bytes = {reserve_bytes}"));
    let mut server = TestServer::start_with_data_dir(root.path(), &data_dir, &config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..10 {
        let (status, _, ids) = send_batch(&server, &key, &format!("before-{round}"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        acknowledged.extend(ids);
    }

    let ballast = filesystem.fill(reserve_bytes / 2);
    assert!(
        server
            .metric("meridian_sink_pending_records{region=\"eu-west-1\",sink=\"archive\"}")
            .await
            .is_some_and(|pending| pending > 0.0),
        "the archive has not written the first messages yet"
    );
    for round in 0..10 {
        match send_batch(&server, &key, &format!("low-{round}")).await {
            Ok((503, Some(_), _)) => {}
            other => {
                panic!("below the reserve appends are refused with 503 + Retry-After: {other:?}")
            }
        }
    }
    assert_not_ready(&server).await;
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await,
        "the reserve lets the archive write what was acknowledged"
    );

    std::fs::remove_file(&ballast).unwrap();
    acknowledged.extend(send_until_acknowledged(&server, &key, 400, Duration::from_secs(30)).await);
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 200, "ready again: {body}");
    assert_eq!(server.terminate(), Some(0));
    assert_archived_exactly_once(&server, &acknowledged);
    drop(filesystem);
}

#[tokio::test]
async fn a_write_that_hits_enospc_answers_503_and_the_queue_recovers_when_space_returns() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let filesystem = SmallFilesystem::mount(&data_dir, 32);
    // No reserve: the queue's own write meets ENOSPC.
    let config = test_config("min_free_disk_bytes = 0");
    let mut server = TestServer::start_with_data_dir(root.path(), &data_dir, &config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..5 {
        let (status, _, ids) = send_batch(&server, &key, &format!("before-{round}"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        acknowledged.extend(ids);
    }

    let ballast = filesystem.fill(0);
    for round in 0..20 {
        match send_batch(&server, &key, &format!("full-{round}")).await {
            Ok((503, Some(_), _)) => {}
            other => {
                panic!("on a full disk every request gets a whole 503 + Retry-After: {other:?}")
            }
        }
    }
    assert_not_ready(&server).await;

    std::fs::remove_file(&ballast).unwrap();
    acknowledged.extend(send_until_acknowledged(&server, &key, 400, Duration::from_secs(30)).await);
    for round in 0..5 {
        let (status, _, ids) = send_batch(&server, &key, &format!("after-{round}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "no restart needed");
        acknowledged.extend(ids);
    }
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 200, "ready again: {body}");
    assert_eq!(server.terminate(), Some(0));
    assert_archived_exactly_once(&server, &acknowledged);
    drop(filesystem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_filled_its_own_disk_drains_and_takes_appends_again_without_help() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let filesystem = SmallFilesystem::mount(&data_dir, 32);
    // The embedded defaults: a 128 MiB reserve (capped at a quarter of this 32 MiB disk) and
    // 64 MiB segments, so the queue never rolls a segment on its own here.
    let mut server =
        TestServer::start_with_data_dir(root.path(), &data_dir, &test_config(""), &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    // The archive is held while the load runs (a file where its directory goes): a segment the
    // archive had fully delivered would be rolled and deleted, and an archive as fast as the load
    // would keep the disk from ever filling.
    let archive_hold = hold_the_archive(&data_dir, "eu-west-1");
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut refused = 0;
    for round in 0..400 {
        match send_padded_batch(&server, &key, &format!("load-{round}"), 4096).await {
            Ok((200, _, ids)) => acknowledged.extend(ids),
            Ok((503, Some(_), _)) => {
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("while the disk fills: {other:?}"),
        }
    }
    assert!(refused >= 5, "the load filled the disk down to the reserve");
    std::fs::remove_file(&archive_hold).unwrap();
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(60))
            .await,
        "the archive writes everything into the reserve"
    );
    // Nothing is freed from outside: the node makes room itself (the delivered segment goes), for
    // batches as large as those it refused.
    acknowledged
        .extend(send_until_acknowledged(&server, &key, 4096, Duration::from_secs(30)).await);
    let (status, body) = readyz(&server).await;
    assert_eq!(status, 200, "ready again: {body}");
    assert_eq!(server.terminate(), Some(0));
    assert_archived_exactly_once(&server, &acknowledged);
    drop(filesystem);
}
