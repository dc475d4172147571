//! The README is a test: its quick start, as written, on the documented config file.
//!
//! The commands are read from README.md, not copied here: the quick start's
//! `cargo run --release -- serve`, then every block marked `<!-- readme-test: ... -->`, run with
//! bash from a fresh working directory that holds the repository's `config/` (so the node reads
//! config/meridian.toml, as it does from a checkout). `cargo run --release --` runs the release
//! binary scripts/test built (a `cargo` on PATH that does only that; the debug binary when the
//! release one is not given). The one change made to the text: `localhost:8080` becomes the free
//! port the node listens on. Then a project is made in each region through the admin API the
//! console uses, and every event the README and this test sent is found in its own region's
//! archive, and in no other.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "af-south-1", "ap-southeast-1"];

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The README's quick start command that starts the node, and the marked blocks, in order.
fn readme_commands() -> (String, Vec<(String, String)>) {
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README.md");
    let quick_start = readme
        .split("## Quick start")
        .nth(1)
        .expect("a Quick start section");
    let serve = quick_start
        .lines()
        .find(|line| {
            line.trim_start()
                .starts_with("cargo run --release -- serve")
        })
        .expect("the quick start runs `cargo run --release -- serve`");
    let serve = serve.split('#').next().unwrap_or("").trim().to_string();
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(marker) = line.trim().strip_prefix("<!-- readme-test:") else {
            continue;
        };
        let name = marker.trim_end_matches("-->").trim().to_string();
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "{name}: a sh block follows"
        );
        let block: Vec<&str> = lines
            .by_ref()
            .take_while(|line| line.trim() != "```")
            .collect();
        blocks.push((name, block.join("\n")));
    }
    assert!(
        blocks.len() >= 2,
        "the README marks its first-event and every-region blocks"
    );
    (serve, blocks)
}

/// A directory holding a `cargo` that runs `cargo run --release -- ARGS` as `binary ARGS`.
fn cargo_shim(root: &Path, binary: &Path) -> PathBuf {
    let directory = root.join("bin");
    std::fs::create_dir_all(&directory).unwrap();
    let script = format!(
        "#!/bin/sh\n# cargo run --release -- ARGS, as the README writes it: the built binary.\n\
         if [ \"$1 $2 $3\" = \"run --release --\" ]; then shift 3; exec '{}' \"$@\"; fi\n\
         echo \"this test's cargo only runs the binary: cargo $*\" >&2; exit 2\n",
        binary.display()
    );
    let path = directory.join("cargo");
    std::fs::write(&path, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    directory
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The node started from the README; killed if the test ends before it stops it.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every archived message of `region` under `data`.
fn archived(data: &Path, region: &str) -> Vec<Value> {
    archived_messages_in(&data.join("archive").join(region))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_serves_every_region_as_written() {
    let (serve, blocks) = readme_commands();
    let binary = std::env::var_os("MERIDIAN_TEST_RELEASE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meridian")));
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("checkout");
    copy_dir(&repository().join("config"), &work.join("config"));
    let shim = cargo_shim(root.path(), &binary);
    let path = format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    // The node, started with the README's command (its words after `cargo`).
    let serve_words: Vec<&str> = serve.split_whitespace().collect();
    assert_eq!(serve_words.first(), Some(&"cargo"));
    let serve_log = root.path().join("serve.log");
    let mut node = Node(
        Command::new(shim.join("cargo"))
            .args(&serve_words[1..])
            .current_dir(&work)
            .env("PATH", &path)
            .env("MERIDIAN_LISTEN", &address)
            .env_remove("MERIDIAN_NODE_REGION")
            .env_remove("MERIDIAN_SERVE_REGIONS")
            .env_remove("MERIDIAN_CATALOG_URL")
            .env_remove("MERIDIAN_DATA_DIR")
            .env_remove("MERIDIAN_JWT_SECRET")
            .env_remove("MERIDIAN_QUEUE_BACKEND")
            .stdout(std::fs::File::create(&serve_log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the node starts"),
    );
    let client = reqwest::Client::new();
    let base = format!("http://{address}");
    let up = wait_until(Duration::from_secs(60), || async {
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|response| response.status() == 200)
    })
    .await;
    assert!(up, "the node answers /healthz");
    let printed = std::fs::read_to_string(&serve_log).unwrap_or_default();
    let served = printed
        .lines()
        .find_map(|line| line.strip_prefix("Regions served: "))
        .unwrap_or("");
    for region in REGIONS {
        assert!(
            served.contains(region),
            "the playground serves every region, and says so: {printed}"
        );
    }
    assert!(printed.contains("Send a first event"), "{printed}");

    for (name, block) in &blocks {
        let script = block.replace("localhost:8080", &address);
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new("bash")
                .args(["-euo", "pipefail", "-c", &script])
                .current_dir(&work)
                .env("PATH", &path)
                .output(),
        )
        .await
        .unwrap_or_else(|_| panic!("the README's block `{name}` did not finish in 2 minutes"))
        .expect("bash runs");
        assert!(
            output.status.success(),
            "the README's block `{name}` failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        eprintln!("README block `{name}`: ok");
    }

    // A project in each region through the admin API the console uses, and an event to each.
    let token_output = Command::new(shim.join("cargo"))
        .args([
            "run",
            "--release",
            "--",
            "token",
            "issue",
            "--role",
            "owner",
            "--org",
            "acme",
        ])
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(token_output.status.success());
    let token = String::from_utf8(token_output.stdout)
        .unwrap()
        .trim()
        .to_string();
    for region in REGIONS {
        let created: Value = client
            .post(format!("{base}/admin/orgs/acme/projects"))
            .bearer_auth(&token)
            .json(&json!({"name": format!("Console project in {region}"), "region": region}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(created["region"], region, "{created}");
        let key = created["write_key"].as_str().expect("a write key");
        let status = client
            .post(format!("{base}/v1/track"))
            .header("Authorization", basic_auth(key))
            .json(&json!({"userId": "u3", "event": format!("Console project in {region}")}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{region}");
    }

    // Every event in its own region's archive, and in no other.
    let data = work.join("data");
    let found = wait_until(Duration::from_secs(30), || async {
        REGIONS.iter().all(|region| {
            let events: Vec<String> = archived(&data, region)
                .iter()
                .filter_map(|message| message["event"].as_str().map(str::to_string))
                .collect();
            events.contains(&format!("Hello from {region}"))
                && events.contains(&format!("Console project in {region}"))
        })
    })
    .await;
    assert!(
        found,
        "every region's archive holds its events: {:?}",
        REGIONS
            .iter()
            .map(|region| (
                *region,
                archived(&data, region)
                    .iter()
                    .map(|message| message["event"].to_string())
                    .collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>()
    );
    for region in REGIONS {
        let messages = archived(&data, region);
        assert!(
            messages.iter().all(|message| message["region"] == region),
            "{region}'s archive holds only its own region's events"
        );
        let events: Vec<&str> = messages
            .iter()
            .filter_map(|message| message["event"].as_str())
            .collect();
        assert_eq!(
            events
                .iter()
                .filter(|event| event.starts_with("Hello from"))
                .count(),
            1,
            "{region}: {events:?}"
        );
    }
    assert!(
        archived(&data, "eu-west-1")
            .iter()
            .any(|message| message["event"] == "Signed Up"),
        "the first event"
    );
    // SAFETY: signalling our own child process.
    unsafe {
        libc::kill(node.0.id() as i32, libc::SIGTERM);
    }
    let status = node.0.wait().unwrap();
    assert!(status.success(), "a clean shutdown: {status}");
}
