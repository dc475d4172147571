//! Bad input never panics: random and hostile bodies get a 2xx or a 4xx with the JSON error shape,
//! and the server stays up.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

struct Case {
    /// The status this input must get, where it is certain.
    expect: Option<u16>,
    label: String,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

const PATHS: &[&str] = &[
    "/v1/track",
    "/v1/identify",
    "/v1/batch",
    "/v1/b",
    "/v1/t",
    "/v1/alias",
    "/v1/group",
    "/v1/m",
];

fn mutate(rng: &mut StdRng, seed_body: &[u8]) -> Vec<u8> {
    let mut body = seed_body.to_vec();
    for _ in 0..rng.random_range(1..8) {
        if body.is_empty() {
            body.push(rng.random());
            continue;
        }
        let position = rng.random_range(0..body.len());
        match rng.random_range(0..4) {
            0 => body[position] = rng.random(),
            1 => {
                body.remove(position);
            }
            2 => body.insert(
                position,
                *b"{}[]\",:\\0e-9\xff\xc3"
                    .get(rng.random_range(0..14))
                    .unwrap_or(&b'x'),
            ),
            _ => body.truncate(position),
        }
    }
    body
}

fn hostile_cases(write_key: &str) -> Vec<Case> {
    let auth = || vec![("Authorization", basic_auth(write_key))];
    let deep_array = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(
        r#"{{"userId":"u","event":"e","properties":{}1{}}}"#,
        r#"{"a":"#.repeat(5_000),
        "}".repeat(5_000)
    );
    let huge_string = format!(
        r#"{{"userId":"u","event":"e","properties":{{"s":"{}"}}}}"#,
        "x".repeat(3 * 1024 * 1024)
    );
    let ten_megabytes = vec![b'a'; 10 * 1024 * 1024];
    let gzip_bomb = gzip(&vec![b' '; 200 * 1024 * 1024]);
    let mut cases = vec![
        Case {
            expect: Some(400),
            label: "deep array".into(),
            path: "/v1/batch",
            headers: auth(),
            body: deep_array.into_bytes(),
        },
        Case {
            expect: Some(400),
            label: "deep object".into(),
            path: "/v1/track",
            headers: auth(),
            body: deep_object.into_bytes(),
        },
        Case {
            expect: Some(413),
            label: "huge string".into(),
            path: "/v1/track",
            headers: auth(),
            body: huge_string.into_bytes(),
        },
        Case {
            expect: Some(413),
            label: "10 MB body".into(),
            path: "/v1/batch",
            headers: auth(),
            body: ten_megabytes,
        },
        Case {
            expect: Some(413),
            label: "gzip bomb".into(),
            path: "/v1/batch",
            headers: vec![
                ("Authorization", basic_auth(write_key)),
                ("Content-Encoding", "gzip".into()),
            ],
            body: gzip_bomb,
        },
        Case {
            expect: Some(400),
            label: "not gzip".into(),
            path: "/v1/track",
            headers: vec![
                ("Authorization", basic_auth(write_key)),
                ("Content-Encoding", "gzip".into()),
            ],
            body: b"plain".to_vec(),
        },
        Case {
            expect: Some(415),
            label: "brotli".into(),
            path: "/v1/track",
            headers: vec![
                ("Authorization", basic_auth(write_key)),
                ("Content-Encoding", "br".into()),
            ],
            body: b"{}".to_vec(),
        },
        Case {
            expect: Some(400),
            label: "invalid utf-8".into(),
            path: "/v1/track",
            headers: auth(),
            body: b"{\"userId\":\"\xff\xfe\",\"event\":\"e\"}".to_vec(),
        },
        Case {
            expect: Some(401),
            label: "no auth".into(),
            path: "/v1/track",
            headers: vec![],
            body: br#"{"userId":"u","event":"e"}"#.to_vec(),
        },
        Case {
            expect: Some(400),
            label: "empty body".into(),
            path: "/v1/track",
            headers: auth(),
            body: vec![],
        },
        Case {
            expect: Some(400),
            label: "null".into(),
            path: "/v1/batch",
            headers: auth(),
            body: b"null".to_vec(),
        },
        Case {
            expect: Some(400),
            label: "batch not array".into(),
            path: "/v1/batch",
            headers: auth(),
            body: br#"{"batch":"x"}"#.to_vec(),
        },
        Case {
            // A bad envelope field never costs messages: stored without it, reported (200).
            expect: Some(200),
            label: "batch context wrong".into(),
            path: "/v1/batch",
            headers: auth(),
            body: br#"{"batch":[],"context":3}"#.to_vec(),
        },
        Case {
            expect: Some(200),
            label: "bad sentAt: the message is stored without skew correction".into(),
            path: "/v1/batch",
            headers: auth(),
            body: br#"{"batch":[{"type":"identify","userId":"u"}],"sentAt":"soon"}"#.to_vec(),
        },
        Case {
            expect: Some(400),
            label: "wrong types".into(),
            path: "/v1/track",
            headers: auth(),
            body: br#"{"userId":{},"event":[1],"timestamp":7}"#.to_vec(),
        },
        Case {
            expect: Some(400),
            label: "duplicate keys".into(),
            path: "/v1/batch",
            headers: auth(),
            body: br#"{"batch":[],"batch":[]}"#.to_vec(),
        },
        Case {
            expect: Some(400),
            label: "huge number".into(),
            path: "/v1/track",
            headers: auth(),
            body: br#"{"userId":1e999999,"event":"e"}"#.to_vec(),
        },
        Case {
            expect: Some(401),
            label: "bad bearer".into(),
            path: "/v1/track",
            headers: vec![("Authorization", "Bearer ".into())],
            body: b"{}".to_vec(),
        },
    ];
    for path in PATHS {
        cases.push(Case {
            expect: None,
            label: format!("array on {path}"),
            path,
            headers: auth(),
            body: b"[1,2,3]".to_vec(),
        });
    }
    cases
}

async fn assert_clean_answer(server: &TestServer, case: Case) {
    let mut request = server.client.post(server.url(case.path)).body(case.body);
    for (name, value) in &case.headers {
        request = request.header(*name, value);
    }
    let response = match request.send().await {
        Ok(response) => response,
        // A body refused as too large from its Content-Length may see the connection closed
        // before the client finished sending it.
        Err(error) if case.expect == Some(413) && (error.is_request() || error.is_body()) => return,
        Err(error) => panic!("{}: request failed: {error}", case.label),
    };
    let status = response.status().as_u16();
    if let Some(expected) = case.expect {
        assert_eq!(status, expected, "{}", case.label);
    }
    assert!(
        (200..300).contains(&status) || (400..500).contains(&status),
        "{}: answered {status}",
        case.label
    );
    assert!(
        response.headers().contains_key("x-region"),
        "{}: X-Region",
        case.label
    );
    let text = match response.text().await {
        Ok(text) => text,
        // The same early close can reset the connection before the client read the answer's
        // body (the refusal's head arrived: its status is checked above).
        Err(error) if case.expect == Some(413) && error.is_body() => return,
        Err(error) if case.expect == Some(413) && error.is_decode() => return,
        Err(error) => panic!("{}: reading the answer failed: {error}", case.label),
    };
    if status >= 400 {
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: error body is not JSON: {text}", case.label));
        assert_eq!(body["success"], false, "{}: {text}", case.label);
        assert!(
            body["code"].as_str().is_some_and(|code| !code.is_empty()),
            "{}: {text}",
            case.label
        );
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{}: {text}",
            case.label
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_and_hostile_bodies_get_clean_4xx_answers_and_never_crash_the_server() {
    let mut server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("fuzz").await;
    let (_, key) = server.create_project("fuzz", "eu-west-1").await;

    for case in hostile_cases(&key) {
        assert_clean_answer(&server, case).await;
    }

    let seeds: Vec<Vec<u8>> = vec![
        json!({"userId": "u", "event": "Clicked", "properties": {"a": [1, 2, {"b": null}]}, "timestamp": "2026-11-24T05:12:26.678Z"})
            .to_string()
            .into_bytes(),
        json!({"batch": [{"type": "track", "userId": "u", "event": "e"}, {"type": "alias", "userId": "u", "previousId": "p"}], "sentAt": "2026-11-24T05:12:26Z", "context": {"ip": "1.2.3.4"}})
            .to_string()
            .into_bytes(),
    ];
    let mut rng = StdRng::seed_from_u64(0x6d65_7269_6469_616e);
    for iteration in 0..600 {
        let seed = &seeds[iteration % seeds.len()];
        let body = mutate(&mut rng, seed);
        let path = PATHS[rng.random_range(0..PATHS.len())];
        let mut headers = vec![];
        match rng.random_range(0..4) {
            0 => headers.push(("Authorization", basic_auth(&key))),
            1 => headers.push(("Authorization", format!("Bearer {key}"))),
            2 => {
                // A mangled Basic credential (kept to visible ASCII, which HTTP clients can send).
                let mangled: String = mutate(&mut rng, b"d2tfcHk6")
                    .into_iter()
                    .filter(u8::is_ascii_graphic)
                    .map(char::from)
                    .collect();
                headers.push(("Authorization", format!("Basic {mangled}")));
            }
            _ => {}
        }
        if rng.random_bool(0.2) {
            headers.push(("Content-Type", "text/plain".into()));
        }
        assert_clean_answer(
            &server,
            Case {
                expect: None,
                label: format!(
                    "mutation {iteration} on {path}: {:?}",
                    String::from_utf8_lossy(&body)
                ),
                path,
                headers,
                body,
            },
        )
        .await;
    }

    assert_eq!(server.health_status().await, 200, "the server survived");
    assert_eq!(server.terminate(), Some(0), "and shuts down cleanly");
    assert!(!server.log().contains("panicked"), "no panic in the log");
}

/// Peak resident memory of a process so far, in MB.
fn peak_rss_mb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kilobytes| kilobytes / 1024)
        .expect("VmHWM")
}

async fn post_batch(
    server: &TestServer,
    key: &str,
    body: Vec<u8>,
    gzipped: bool,
) -> (u16, Vec<u8>) {
    let mut request = server
        .client
        .post(server.url("/v1/batch"))
        .header("Authorization", basic_auth(key))
        .header("Content-Type", "application/json");
    request = if gzipped {
        request.header("Content-Encoding", "gzip").body(gzip(&body))
    } else {
        request.body(body)
    };
    let response = request.send().await.expect("POST /v1/batch");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("answer").to_vec())
}

/// `{"batch": [element, element, ...]}` of `count` elements.
fn batch_of(element: &str, count: usize) -> Vec<u8> {
    let mut body = String::with_capacity(12 + count * (element.len() + 1));
    body.push_str(r#"{"batch":["#);
    for index in 0..count {
        if index > 0 {
            body.push(',');
        }
        body.push_str(element);
    }
    body.push_str("]}");
    body.into_bytes()
}

#[tokio::test]
async fn a_batch_of_a_million_empty_elements_gets_a_small_answer_and_costs_no_memory() {
    let server = TestServer::start(&test_config(""), &[]).await;
    server.create_org("explosion").await;
    let (_, key) = server.create_project("explosion", "eu-west-1").await;
    let rss_before = peak_rss_mb(server.pid());

    // A few KB of gzip that inflates to just under the 4 MiB request limit: ~1.4 M `{}` elements.
    let explosion = batch_of("{}", 1_390_000);
    assert!(explosion.len() < 4 * 1024 * 1024);
    let started = std::time::Instant::now();
    let (status, answer) = post_batch(&server, &key, explosion, true).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&answer));
    let answer: Value = serde_json::from_slice(&answer).expect("JSON answer");
    assert_eq!(answer["code"], "batch_too_large");
    assert!(answer.to_string().len() < 1024, "a small answer: {answer}");
    let growth = peak_rss_mb(server.pid()).saturating_sub(rss_before);
    eprintln!("1.39 M elements: answered in {elapsed:?}, peak RSS grew {growth} MB");
    // The landed build grew by 1.6 GB and answered 173 MB. Now the body (4 MiB), its inflation and
    // at most 65,536 kept element pointers: measured 26 MB.
    assert!(growth < 64, "peak RSS grew {growth} MB");

    // Within four times the limit: the elements past 2,500 are one entry, the list is capped.
    let (status, answer) = post_batch(&server, &key, batch_of("{}", 2_600), false).await;
    assert_eq!(status, 400);
    let answer: Value = serde_json::from_slice(&answer).expect("JSON answer");
    let rejected = answer["rejected"].as_array().expect("rejected list");
    assert_eq!(
        rejected.len(),
        101,
        "100 listed, then the range past the limit"
    );
    assert_eq!(rejected[0]["code"], "missing_type");
    assert_eq!(rejected[100]["code"], "batch_too_large");
    assert_eq!(rejected[100]["index"], 2500);
    assert_eq!(rejected[100]["last_index"], 2599);
    assert!(
        answer["message"].as_str().unwrap().contains("2400 more"),
        "{}",
        answer["message"]
    );

    // Valid messages before the limit are stored; the tail is reported once.
    let valid = r#"{"type":"track","userId":"u","event":"Fine"}"#;
    let (status, answer) = post_batch(&server, &key, batch_of(valid, 2_510), false).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&answer).expect("JSON answer");
    assert_eq!(answer["accepted"], 2500);
    assert_eq!(
        answer["rejected"],
        json!([{"index": 2500, "last_index": 2509, "code": "batch_too_large",
                "message": answer["rejected"][0]["message"]}])
    );
    assert!(answer.get("rejected_omitted").is_none());
    assert_eq!(server.health_status().await, 200);
}
