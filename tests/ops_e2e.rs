//! End-to-end operations: TLS (HTTP/1.1 and HTTP/2 by ALPN, plaintext refused, certificate
//! reload), per-project rate limits, slowloris protection, and the concurrency limit.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

/// Connects with rustls trusting `trusted`, offering `alpn`; returns the stream and the
/// certificate the server presented.
async fn tls_connect(
    port: u16,
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    Vec<u8>,
) {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in trusted {
        roots.add(certificate.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    let presented = stream.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec();
    assert_eq!(
        stream.get_ref().1.alpn_protocol(),
        Some(alpn),
        "ALPN negotiated"
    );
    (stream, presented)
}

async fn get_healthz_http1(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u16, hyper::Version) {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("/healthz")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let version = response.version();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    (status, version)
}

async fn get_healthz_http2(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u16, hyper::Version, Option<String>) {
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::get("https://localhost/healthz")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let region = response
        .headers()
        .get("x-region")
        .map(|value| value.to_str().unwrap().to_string());
    (response.status().as_u16(), response.version(), region)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http1_and_http2_refuses_plaintext_and_reloads_its_certificate() {
    let tls_dir = tempfile::tempdir().unwrap();
    let first = make_certificate(tls_dir.path(), "first");
    let tls_port = free_port();
    let config = test_config(&format!(
        "[server.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncert_path = \"{}\"\nkey_path = \"{}\"\nreload_check_secs = 3600\n",
        tls_dir.path().join("cert.pem").display(),
        tls_dir.path().join("key.pem").display()
    ));
    let server = TestServer::start(&config, &[]).await;

    let (stream, presented) =
        tls_connect(tls_port, std::slice::from_ref(&first), b"http/1.1").await;
    assert_eq!(presented, first.as_ref());
    assert_eq!(
        get_healthz_http1(stream).await,
        (200, hyper::Version::HTTP_11)
    );
    let (stream, _) = tls_connect(tls_port, std::slice::from_ref(&first), b"h2").await;
    let (status, version, region) = get_healthz_http2(stream).await;
    assert_eq!(
        (status, version, region.as_deref()),
        (200, hyper::Version::HTTP_2, Some("eu-west-1"))
    );

    // Plain HTTP to the TLS port: no HTTP answer, the connection is closed, the server lives on.
    let mut plain = TcpStream::connect(("127.0.0.1", tls_port)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/1.1 200"),
        "plaintext got an HTTP answer"
    );
    let (stream, _) = tls_connect(tls_port, std::slice::from_ref(&first), b"http/1.1").await;
    assert_eq!(get_healthz_http1(stream).await.0, 200);

    // Replace the certificate and send SIGHUP: new connections get the new one, no restart.
    let second = make_certificate(tls_dir.path(), "second");
    assert_ne!(first, second);
    // SAFETY: signalling the server process this test started.
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGHUP);
    }
    let both = [first.clone(), second.clone()];
    let reloaded = wait_until(Duration::from_secs(10), || async {
        let (_, presented) = tls_connect(tls_port, &both, b"http/1.1").await;
        presented == second.as_ref()
    })
    .await;
    assert!(reloaded, "the new certificate is served after SIGHUP");
    // The plain listener keeps working beside the TLS one.
    assert_eq!(server.health_status().await, 200);
}

async fn track_status(server: &TestServer, key: &str) -> (u16, Option<String>, Option<String>) {
    let response = server
        .client
        .post(server.url("/v1/track"))
        .header("Authorization", basic_auth(key))
        .json(&json!({"userId": "u", "event": "e"}))
        .send()
        .await
        .unwrap();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|value| value.to_str().unwrap().to_string())
    };
    (
        response.status().as_u16(),
        header("retry-after"),
        header("x-ratelimit-reset"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_over_its_rate_gets_429_while_another_keeps_getting_200() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("acme").await;
    let (_, noisy_key) = server.create_project("acme", "eu-west-1").await;
    let (quiet_project, quiet_key) = server.create_project("acme", "eu-west-1").await;
    assert_eq!(server.terminate(), Some(0));
    let limited = test_config(&format!(
        "[rate_limits]\ndefault_messages_per_second = 5\ndefault_burst = 10\n[rate_limits.projects]\n{quiet_project} = {{ messages_per_second = 100000 }}\n"
    ));
    std::fs::write(&server.config_path, limited).unwrap();
    server.spawn().await;

    let noisy = {
        let client = server.client.clone();
        let url = server.url("/v1/track");
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for _ in 0..40 {
                let response = client
                    .post(&url)
                    .header("Authorization", basic_auth(&noisy_key))
                    .json(&json!({"userId": "u", "event": "e"}))
                    .send()
                    .await
                    .unwrap();
                let header = |name: &str| {
                    response
                        .headers()
                        .get(name)
                        .map(|value| value.to_str().unwrap().to_string())
                };
                outcomes.push((
                    response.status().as_u16(),
                    header("retry-after"),
                    header("x-ratelimit-reset"),
                ));
            }
            outcomes
        })
    };
    let mut quiet_statuses = Vec::new();
    for _ in 0..40 {
        quiet_statuses.push(track_status(&server, &quiet_key).await.0);
    }
    let noisy_outcomes = noisy.await.unwrap();
    assert!(
        quiet_statuses.iter().all(|status| *status == 200),
        "the quiet project is never limited: {quiet_statuses:?}"
    );
    let limited: Vec<_> = noisy_outcomes
        .iter()
        .filter(|(status, _, _)| *status == 429)
        .collect();
    assert!(!limited.is_empty(), "the noisy project was limited");
    assert!(
        noisy_outcomes
            .iter()
            .filter(|(status, _, _)| *status == 200)
            .count()
            >= 10,
        "its burst passed"
    );
    for (_, retry_after, reset) in limited {
        assert!(
            retry_after
                .as_deref()
                .is_some_and(|value| value.parse::<u64>().unwrap() >= 1),
            "Retry-After"
        );
        assert!(reset.is_some(), "X-RateLimit-Reset");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let server =
        TestServer::start(&test_config("[server]\nheader_read_timeout_secs = 2"), &[]).await;
    let port = server.port;
    let slow = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = Instant::now();
        let head = b"POST /v1/track HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        for byte in head {
            if stream.write_all(&[*byte]).is_err() {
                return started.elapsed();
            }
            let mut buffer = [0u8; 512];
            match stream.read(&mut buffer) {
                Ok(0) => return started.elapsed(),
                Ok(_) => return started.elapsed(),
                Err(error)
                    if error.kind() == std::io::ErrorKind::WouldBlock
                        || error.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return started.elapsed(),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        started.elapsed()
    });
    for _ in 0..5 {
        assert_eq!(
            server.health_status().await,
            200,
            "others are served meanwhile"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cut_after = slow.await.unwrap();
    assert!(
        cut_after < Duration::from_secs(8),
        "the slow client was cut off after {cut_after:?}"
    );
}

#[tokio::test]
async fn requests_beyond_the_concurrency_limit_get_503_with_retry_after() {
    let server = TestServer::start(
        &test_config("[server]\nmax_concurrent_requests = 1\nbody_read_timeout_secs = 20"),
        &[],
    )
    .await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    // Hold the only slot: a request whose body never finishes arriving. With `Expect:
    // 100-continue` the server answers "100 Continue" once the handler reads the body, which is
    // after the request took its slot, so the next request must find none free.
    let mut holder = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        basic_auth(&key)
    );
    holder.write_all(head.as_bytes()).unwrap();
    holder
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut interim = Vec::new();
    let mut buffer = [0u8; 1024];
    while !interim.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = holder
            .read(&mut buffer)
            .expect("an interim answer to the holder");
        assert!(read > 0, "the server closed the holder's connection");
        interim.extend_from_slice(&buffer[..read]);
    }
    let interim = String::from_utf8_lossy(&interim);
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "the holder's request is being served, not answered: {interim}"
    );
    holder.write_all(b"{").unwrap();

    let (status, retry_after, _) = track_status(&server, &key).await;
    assert_eq!(
        status, 503,
        "a second request is refused while the slot is held"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(server.health_status().await, 200, "health stays visible");
    drop(holder);
    let served = wait_until(Duration::from_secs(5), || async {
        track_status(&server, &key).await.0 == 200
    })
    .await;
    assert!(served, "the slot frees when the held request ends");
}

fn write_key_file(path: &Path, keys: &[(u8, u8)], active: u8) {
    use base64::Engine;
    let mut text = format!("active = {active}\n[keys]\n");
    for (id, fill) in keys {
        text.push_str(&format!(
            "{id} = \"{}\"\n",
            base64::engine::general_purpose::STANDARD.encode([*fill; 32])
        ));
    }
    std::fs::write(path, text).unwrap();
}

fn queue_bytes(data_dir: &Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut stack = vec![data_dir.join("queue")];
    while let Some(directory) = stack.pop() {
        for entry in std::fs::read_dir(&directory).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|extension| extension == "seg") {
                bytes.extend(std::fs::read(&path).unwrap());
            }
        }
    }
    bytes
}

#[tokio::test]
async fn queue_records_are_encrypted_at_rest_and_keys_rotate_without_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("queue-keys.toml");
    write_key_file(&key_file, &[(1, 0x11)], 1);
    let config = test_config_with_flush(
        600_000,
        &format!(
            "[queue.encryption]\nkey_file = \"{}\"\n",
            key_file.display()
        ),
    );
    let mut server = TestServer::start(&config, &[]).await;
    server.create_org("acme").await;
    let (_, key) = server.create_project("acme", "eu-west-1").await;
    let post = |user: &'static str| {
        let client = server.client.clone();
        let url = server.url("/v1/track");
        let key = key.clone();
        async move {
            client
                .post(url)
                .header("Authorization", basic_auth(&key))
                .json(&json!({"userId": user, "event": "Sealed"}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(post("plaintext-canary-one").await, 200);
    write_key_file(&key_file, &[(1, 0x11), (2, 0x22)], 2);
    // SAFETY: signalling the server process this test started.
    unsafe {
        libc::kill(server.pid() as i32, libc::SIGHUP);
    }
    let rotated = wait_until(Duration::from_secs(10), || async {
        server.log().contains("queue key file reloaded")
    })
    .await;
    assert!(rotated, "the key file was reloaded on SIGHUP");
    assert_eq!(post("plaintext-canary-two").await, 200);
    let at_rest = queue_bytes(&server.data_dir);
    assert!(!at_rest.is_empty());
    assert!(
        !at_rest
            .windows(16)
            .any(|window| window == b"plaintext-canary"),
        "no plaintext in queue segments"
    );
    assert_eq!(
        server.terminate(),
        Some(0),
        "a clean stop flushes the queue through both keys"
    );
    let users: Vec<String> = server
        .archived_messages("eu-west-1")
        .iter()
        .map(|message| message["userId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(
        users.contains(&"plaintext-canary-one".to_string())
            && users.contains(&"plaintext-canary-two".to_string())
    );
}

#[tokio::test]
async fn oversized_request_heads_are_refused_and_the_node_serves_on() {
    let server = TestServer::start(&test_config("[server]\nmax_header_bytes = 16384"), &[]).await;
    let port = server.port;
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        );
        let _ = stream.write_all(head.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).to_string()
    })
    .await
    .unwrap();
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a 100 KB head was served: {}",
        &answer[..answer.len().min(80)]
    );
    assert_eq!(server.health_status().await, 200);
}

/// The `/readyz` status and body now.
async fn readiness(server: &TestServer) -> (u16, Value) {
    let response = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("GET /readyz");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_runner_that_cannot_open_its_cursor_is_restarted_and_readyz_is_503_meanwhile() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("supervised").await;
    let (_, key) = server.create_project("supervised", "eu-west-1").await;
    assert_eq!(server.terminate(), Some(0));
    // A directory where the archive sink's cursor file should be: opening it fails.
    let cursor = server
        .data_dir
        .join("queue/eu-west-1/cursors/archive.cursor");
    let _ = std::fs::remove_file(&cursor);
    std::fs::create_dir_all(cursor.join("obstacle")).expect("obstacle created");
    server.spawn().await;

    let failing_seen = wait_until(Duration::from_secs(10), || async {
        let (status, ready_body) = readiness(&server).await;
        let names_the_runner = ready_body["failing"]
            .to_string()
            .contains("delivery eu-west-1 archive");
        let body = server.node_status().await;
        let sinks = &body["regions"]["eu-west-1"]["sinks"];
        let archive_down = sinks.as_array().is_some_and(|sinks| {
            sinks.iter().any(|sink| {
                sink["sink"] == "archive"
                    && sink["running"] == false
                    && sink["problem"].as_str().is_some_and(|problem| {
                        problem.contains("archive") && problem.contains("eu-west-1")
                    })
            })
        });
        status == 503 && names_the_runner && archive_down
    })
    .await;
    assert!(
        failing_seen,
        "/readyz names the failed runner: {:?}",
        readiness(&server).await
    );
    let metrics = server.metrics_text().await;
    assert!(
        metrics.contains(r#"meridian_sink_runner_up{region="eu-west-1",sink="archive"} 0"#),
        "the runner is down in the metrics"
    );
    // Ingest goes on: the data waits in the queue.
    let (status, _, _) = track_status(&server, &key).await;
    assert_eq!(status, 200);

    std::fs::remove_dir_all(&cursor).expect("obstacle removed");
    let recovered = wait_until(Duration::from_secs(60), || async {
        readiness(&server).await.0 == 200
    })
    .await;
    assert!(recovered, "ready again: {:?}", readiness(&server).await);
    assert!(
        server
            .wait_for_sinks_to_drain(Duration::from_secs(30))
            .await,
        "the restarted runner delivered what waited"
    );
    assert_eq!(server.archived_messages("eu-west-1").len(), 1);
    let metrics = server.metrics_text().await;
    let restarts = metric_value(
        &metrics,
        r#"meridian_sink_runner_restarts_total{region="eu-west-1",sink="archive"}"#,
    )
    .expect("the restart counter");
    assert!(restarts >= 1.0, "restarts counted: {restarts}");
}

#[ignore = "needs the test services: scripts/test runs it (--include-ignored)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_secrets_never_appear_in_logs_errors_or_check_config() {
    let Some(catalog_url) = common::cluster::fresh_postgres_database("secrets").await else {
        return;
    };
    let catalog_password = "pg-password-41d0e9";
    let catalog_url =
        catalog_url.replacen("postgres@", &format!("postgres:{catalog_password}@"), 1);
    assert!(catalog_url.contains(catalog_password), "{catalog_url}");
    let clickhouse_password = "clickhouse-password-7f3a11";
    let s3_secret = "s3-secret-key-9c2e55";
    let customer_secret = "customer-secret-key-0b7d22";
    let config = test_config(&format!(
        "[customer_storage]\naccess_key_id = \"AKIACUSTOMER\"\nsecret_access_key = \"{customer_secret}\"\n\
         [regions.eu-west-1.clickhouse]\nurls = [\"http://127.0.0.1:1\"]\nuser = \"meridian\"\npassword = \"{clickhouse_password}\"\n\
         [regions.us-east-1.archive]\nflush_interval_ms = 100\ns3 = {{ bucket = \"secrets\", endpoint = \"http://127.0.0.1:1\", force_path_style = true, verify_location = false, access_key_id = \"AKIATEST\", secret_access_key = \"{s3_secret}\" }}\n"
    ));
    let secrets = [
        JWT_SECRET,
        catalog_password,
        clickhouse_password,
        s3_secret,
        customer_secret,
    ];
    let assert_no_secret = |what: &str, text: &str| {
        for secret in secrets {
            assert!(!text.contains(secret), "{what} shows a secret:\n{text}");
        }
    };
    let env = [
        ("MERIDIAN_CATALOG_URL", catalog_url.as_str()),
        ("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1"),
    ];
    let mut server = TestServer::start(&config, &env).await;

    let check = server
        .command()
        .args(["serve", "--check-config", "--config"])
        .arg(&server.config_path)
        .output()
        .expect("check-config runs");
    assert!(check.status.success());
    let check_output = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(check_output.contains("postgres:***@"), "{check_output}");
    assert_no_secret("--check-config", &check_output);

    // Make every sink with a secret fail and log: ClickHouse and S3 are unreachable.
    server.create_org("secrets").await;
    let (_, eu_key) = server.create_project("secrets", "eu-west-1").await;
    let (_, us_key) = server.create_project("secrets", "us-east-1").await;
    for key in [&eu_key, &us_key] {
        let (status, _, _) = track_status(&server, key).await;
        assert_eq!(status, 200);
    }
    let failures_logged = wait_until(Duration::from_secs(30), || async {
        let metrics = server.metrics_text().await;
        [
            r#"meridian_sink_failed_attempts_total{region="eu-west-1",sink="clickhouse"}"#,
            r#"meridian_sink_failed_attempts_total{region="us-east-1",sink="archive"}"#,
        ]
        .iter()
        .all(|series| metric_value(&metrics, series).is_some_and(|failed| failed >= 1.0))
    })
    .await;
    assert!(
        failures_logged,
        "both sinks failed and logged why: {}",
        server
            .metrics_text()
            .await
            .lines()
            .filter(|line| line.contains("failed_attempts"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // The node's status shows each sink's last error; /readyz only names the failing parts.
    let (_, readiness) = readiness(&server).await;
    assert!(!readiness.to_string().contains("last_error"));
    assert_no_secret("/readyz", &readiness.to_string());
    let status = server.node_status().await;
    assert!(status.to_string().contains("last_error"));
    assert_no_secret("/admin/node/status", &status.to_string());
    server.kill_hard();
    assert_no_secret("the node's log", &server.log());

    // A catalog that cannot be reached: the error names the URL without its password.
    let unreachable = format!("postgres://postgres:{catalog_password}@127.0.0.1:1/nothing");
    let failed = server
        .command()
        .env("MERIDIAN_CATALOG_URL", &unreachable)
        .env("MERIDIAN_CATALOG_HASH_KEY", CATALOG_HASH_KEY)
        .args(["serve", "--config"])
        .arg(&server.config_path)
        .output()
        .expect("serve runs");
    assert!(!failed.status.success());
    let failed_output = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(failed_output.contains("127.0.0.1:1"), "{failed_output}");
    assert_no_secret("a failed start", &failed_output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_beyond_the_nodes_body_budget_get_503_until_memory_is_free() {
    use tokio::io::AsyncWriteExt;
    // Room for two full 4 MiB requests at once.
    let config = test_config("[server]\nrequest_body_budget_bytes = 8388608\n");
    let server = TestServer::start(&config, &[]).await;
    server.create_org("budget").await;
    let (_, key) = server.create_project("budget", "eu-west-1").await;
    // Two clients announce 4 MiB bodies and send them slowly: their bytes are reserved.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
            .await
            .expect("connect");
        let head = format!(
            "POST /v1/batch HTTP/1.1\r\nHost: localhost\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 4194304\r\n\r\n{{\"batch\":[",
            basic_auth(&key)
        );
        stream.write_all(head.as_bytes()).await.expect("head sent");
        holders.push(stream);
    }
    let probe = || async {
        let response = server
            .client
            .post(server.url("/v1/track"))
            .header("Authorization", basic_auth(&key))
            .json(&json!({"userId": "u", "event": "Probe"}))
            .send()
            .await
            .expect("probe answered");
        let retry_after = response.headers().get("retry-after").cloned();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (status, retry_after, body)
    };
    let available = || async {
        metric_value(
            &server.metrics_text().await,
            "meridian_body_budget_available_bytes",
        )
    };
    let both_held = wait_until(Duration::from_secs(10), || async {
        available().await == Some(0.0)
    })
    .await;
    assert!(
        both_held,
        "both slow bodies hold their share: {:?}",
        available().await
    );
    // A third body, however small, does not fit.
    let (status, retry_after, body) = probe().await;
    assert_eq!(status, 503);
    assert!(retry_after.is_some(), "503 carries Retry-After");
    assert_eq!(body["code"], "overloaded");
    assert!(
        metric_value(
            &server.metrics_text().await,
            "meridian_body_budget_refusals_total"
        )
        .is_some_and(|refusals| refusals >= 1.0)
    );
    assert_eq!(
        server.health_status().await,
        200,
        "operations routes stay up"
    );

    drop(holders); // the slow clients go away: their bytes are free again
    let freed = wait_until(Duration::from_secs(10), || async {
        available().await == Some(8_388_608.0)
    })
    .await;
    assert!(freed, "every byte is back: {:?}", available().await);
    assert_eq!(
        probe().await.0,
        200,
        "ingest resumes once the budget is free"
    );
}
