//! Every long-lived task of a node is supervised: a task that panics is restarted, counted in
//! `meridian_task_restarts_total{task}`, shown in `/readyz` while it is down, and joined when the
//! node stops. Each task is made to panic in turn (`Supervisor::inject_panic`, the hook for this
//! test) on a real node: one on the local queue with TLS, an S3 archive (its residency guard) and
//! a customer spool, one on the JetStream backend (its queue's monitor).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::services::shared_service;
use common::*;
use meridian_node::tasks::TaskState;
use meridian_server::{Config, RunningNode};

struct Started {
    node: Arc<meridian_node::Node>,
    base_url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn start(config: &str) -> Started {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let environment = vec![
        ("MERIDIAN_LISTEN".to_string(), format!("127.0.0.1:{port}")),
        (
            "MERIDIAN_DATA_DIR".to_string(),
            dir.path().join("data").display().to_string(),
        ),
        ("MERIDIAN_JWT_SECRET".to_string(), JWT_SECRET.to_string()),
    ];
    let settings = Config::from_sources(Some(config), &environment)
        .expect("config")
        .validate()
        .expect("valid config");
    let running = RunningNode::start(settings).await.expect("the node starts");
    let node = Arc::clone(&running.state().node);
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(async move {
        running
            .serve(async {
                let _ = stopped.await;
            })
            .await
            .expect("served");
    });
    Started {
        node,
        base_url: format!("http://127.0.0.1:{port}"),
        stop,
        serving,
        _dir: dir,
    }
}

async fn get_text(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(response) => (
            response.status().as_u16(),
            response.text().await.unwrap_or_default(),
        ),
        Err(_) => (0, String::new()),
    }
}

/// Panics each task of the node in turn: each is shown in /readyz while down, runs again, and is
/// counted once. Then the node stops and every task is joined.
async fn panic_every_task_in_turn(started: Started, expected_tasks: &[&str]) -> Vec<String> {
    // Tasks with nothing to do on this node have ended already (e.g. migrations' copies on a node
    // of one region); every running one is panicked.
    let names: Vec<String> = started
        .node
        .supervisor
        .states()
        .into_iter()
        .filter(|(_, state)| *state == TaskState::Running)
        .map(|(name, _)| name)
        .collect();
    for expected in expected_tasks {
        assert!(
            names.iter().any(|name| name.starts_with(expected)),
            "a task `{expected}…` runs: {names:?}"
        );
    }
    let readyz = format!("{}/readyz", started.base_url);
    for name in &names {
        assert!(started.node.supervisor.inject_panic(name), "{name}");
        let shown = wait_until(Duration::from_secs(10), || async {
            let (_, body) = get_text(&readyz).await;
            body.contains(name.as_str())
        })
        .await;
        assert!(shown, "/readyz shows {name} while it is down");
        let running_again = wait_until(Duration::from_secs(30), || async {
            started.node.supervisor.states().get(name) == Some(&TaskState::Running)
        })
        .await;
        assert!(running_again, "{name} runs again");
        let metrics = get_text(&format!("{}/metrics", started.base_url)).await.1;
        let series = format!("meridian_task_restarts_total{{task=\"{name}\"}}");
        assert_eq!(
            metric_value(&metrics, &series),
            Some(1.0),
            "{name} counted once"
        );
    }
    let ready = wait_until(Duration::from_secs(10), || async {
        get_text(&readyz).await.0 == 200
    })
    .await;
    assert!(ready, "ready again: {}", get_text(&readyz).await.1);
    let node = Arc::clone(&started.node);
    let _ = started.stop.send(());
    tokio::time::timeout(Duration::from_secs(60), started.serving)
        .await
        .expect("the node stops within its shutdown timeout")
        .expect("cleanly");
    let states = node.supervisor.states();
    assert!(
        states.values().all(|state| *state == TaskState::Finished),
        "every task joined: {states:?}"
    );
    names
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_of_a_local_node_is_restarted_counted_shown_and_joined() {
    let Some(s3_endpoint) = shared_service("MERIDIAN_TEST_S3_ENDPOINT") else {
        return;
    };
    let tls_dir = tempfile::tempdir().unwrap();
    make_certificate(tls_dir.path(), "localhost");
    let bucket = format!(
        "supervision-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&s3_endpoint)
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .force_path_style(true)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .build(),
    );
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let config = test_config(&format!(
        "[regions.eu-west-1.archive]\n\
         s3 = {{ bucket = \"{bucket}\", endpoint = \"{s3_endpoint}\", region = \"eu-west-1\", force_path_style = true, verify_location = false, access_key_id = \"test\", secret_access_key = \"test\" }}\n\
         [server.tls]\nlisten = \"127.0.0.1:{}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\n",
        free_port(),
        tls_dir.path().join("cert.pem").display(),
        tls_dir.path().join("key.pem").display(),
    ));
    let started = start(&config).await;
    let names = panic_every_task_in_turn(
        started,
        &[
            "delivery eu-west-1 archive",
            "delivery us-east-1 archive",
            "delivery eu-west-1 ledger",
            "ledger checks",
            "key cache refresher",
            "residency guards",
            "spool drainer eu-west-1",
            "tls certificate watcher",
            "gdpr-deletions",
            "replays",
            "retention",
            "migrations",
        ],
    )
    .await;
    eprintln!("tasks panicked, restarted and joined: {names:?}");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jetstream_monitor_is_restarted_counted_shown_and_joined() {
    let Some(urls) = shared_service("MERIDIAN_TEST_NATS_URLS") else {
        return;
    };
    let urls: Vec<String> = urls
        .split(',')
        .filter(|url| !url.is_empty())
        .map(|url| format!("\"{url}\""))
        .collect();
    let stream = format!("sup{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let config = test_config(&format!(
        "backend = \"jetstream\"\n[node]\nserve_regions = [\"eu-west-1\"]\n\
         [regions.eu-west-1.queue.jetstream]\nurls = [{}]\nstream = \"{stream}\"\nreplicas = {}\nmax_bytes = 16777216\n",
        urls.join(", "),
        urls.len().min(3)
    ));
    let started = start(&config).await;
    panic_every_task_in_turn(
        started,
        &[
            "queue maintenance eu-west-1",
            "delivery eu-west-1 archive p0",
        ],
    )
    .await;
}
