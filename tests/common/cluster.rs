//! A region as operators run it: N real `meridian` processes of one region, each with its own data
//! directory, on one PostgreSQL catalog, one S3 bucket (SeaweedFS) and one ClickHouse database —
//! and exact per-messageId counts of what each store holds.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::services::{
    bucket_messages, bucket_objects, clickhouse_query, create_bucket, s3_client, shared_service,
};
use super::*;

/// A fresh PostgreSQL database on the shared server, as a catalog URL.
pub async fn fresh_postgres_database(tag: &str) -> Option<String> {
    let base = shared_service("MERIDIAN_TEST_POSTGRES_URL")?;
    let database = format!("{tag}_{}", uuid::Uuid::new_v4().simple());
    let admin = meridian_catalog::Catalog::connect(&base, catalog_key_of(Path::new("."), &base))
        .await
        .expect("postgres reachable");
    admin
        .execute_raw(&format!("CREATE DATABASE {database}"))
        .await
        .expect("create database");
    admin.close().await;
    let (server, _) = base.rsplit_once('/').expect("a database path in the URL");
    Some(format!("{server}/{database}"))
}

pub struct Cluster {
    pub region: String,
    pub nodes: Vec<TestServer>,
    pub catalog_url: String,
    pub s3_endpoint: String,
    pub bucket: String,
    pub clickhouse_url: String,
    pub database: String,
    pub s3: aws_sdk_s3::Client,
    /// Spreads load over the nodes; none of its connections outlive a killed node for long.
    pub client: reqwest::Client,
}

impl Cluster {
    /// Starts `node_count` nodes of `region` sharing a fresh catalog database, a fresh bucket and
    /// a fresh ClickHouse database. `extra` is appended to every node's config (after `[queue]`).
    /// `None` when the shared services are not there (which fails under scripts/test).
    pub async fn start(node_count: usize, region: &str, extra: &str) -> Option<Cluster> {
        let catalog_url = fresh_postgres_database("cluster").await?;
        let s3_endpoint = shared_service("MERIDIAN_TEST_S3_ENDPOINT")?;
        let clickhouse_url = shared_service("MERIDIAN_TEST_CLICKHOUSE_URL")?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let bucket = format!("cluster-{}", &id[..16]);
        let database = format!("cluster_{id}");
        let s3 = s3_client(&s3_endpoint, "us-east-1");
        create_bucket(&s3, &bucket, None).await;
        let mut cluster = Cluster {
            region: region.to_string(),
            nodes: Vec::new(),
            catalog_url,
            s3_endpoint,
            bucket,
            clickhouse_url,
            database,
            s3,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .pool_idle_timeout(Duration::from_secs(1))
                .build()
                .expect("http client"),
        };
        let config = cluster.node_config(extra);
        for _ in 0..node_count {
            let node = TestServer::start(
                &config,
                &[
                    ("MERIDIAN_CATALOG_URL", cluster.catalog_url.as_str()),
                    ("MERIDIAN_NODE_REGION", region),
                ],
            )
            .await;
            cluster.nodes.push(node);
        }
        Some(cluster)
    }

    /// Every node's config: the region's bucket and ClickHouse, quick flushes.
    fn node_config(&self, extra: &str) -> String {
        let region = &self.region;
        test_config(&format!(
            "{extra}\n\
             [regions.{region}.archive]\n\
             flush_interval_ms = 100\n\
             s3 = {{ bucket = \"{bucket}\", endpoint = \"{endpoint}\", force_path_style = true, verify_location = false, access_key_id = \"test\", secret_access_key = \"test\" }}\n\
             [regions.{region}.clickhouse]\n\
             urls = [\"{clickhouse}\"]\n\
             database = \"{database}\"\n\
             flush_interval_ms = 100\n\
             batch_max_rows = 2000\n\
             request_timeout_secs = 5\n",
            bucket = self.bucket,
            endpoint = self.s3_endpoint,
            clickhouse = self.clickhouse_url,
            database = self.database,
        ))
    }

    pub fn base_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| node.base_url.clone())
            .collect()
    }

    /// An org and a project of the cluster's region, through the first node.
    pub async fn create_project(&self, org_id: &str) -> (String, String) {
        let first = &self.nodes[0];
        first.create_org(org_id).await;
        first.create_project(org_id, &self.region).await
    }

    /// Waits until every node knows the key (the catalog is shared; caches poll it).
    pub async fn wait_for_key_everywhere(&self, write_key: &str) {
        for node in &self.nodes {
            let url = node.url("/v1/track");
            let known = wait_until(Duration::from_secs(10), || {
                let request = node
                    .client
                    .post(&url)
                    .header("Authorization", basic_auth(write_key))
                    .json(&json!({"userId": "warmup", "event": "Warmup", "messageId": format!("warmup-{}", node.port)}));
                async move {
                    request
                        .send()
                        .await
                        .is_ok_and(|response| response.status() == 200)
                }
            })
            .await;
            assert!(known, "node {} never learned the key", node.base_url);
        }
    }

    /// A load spread over every node of the cluster (requests of 1 to 5 messages).
    pub fn load(
        &self,
        write_key: &str,
        clients: usize,
        tag: &str,
        spread: Spread,
        pause: Duration,
    ) -> Load {
        self.load_of(write_key, clients, tag, spread, 1..=5, pause)
    }

    /// A load spread over every node, with `messages_per_request` messages per request.
    pub fn load_of(
        &self,
        write_key: &str,
        clients: usize,
        tag: &str,
        spread: Spread,
        messages_per_request: std::ops::RangeInclusive<usize>,
        pause: Duration,
    ) -> Load {
        Load::spread_over(
            &self.client,
            &self.base_urls(),
            &[(self.region.as_str(), write_key.to_string())],
            clients,
            tag,
            spread,
            messages_per_request,
            pause,
        )
    }

    /// Sends one single-message request with id `message_id` to node `node` and waits until
    /// every sink of that node delivered it: each such message becomes its own archive object,
    /// named by the node's next offset.
    pub async fn send_one_and_deliver(&self, node: usize, write_key: &str, message_id: &str) {
        let server = &self.nodes[node];
        let response = server
            .client
            .post(server.url("/v1/track"))
            .header("Authorization", basic_auth(write_key))
            .json(&json!({"userId": "one", "event": "One", "messageId": message_id}))
            .send()
            .await
            .expect("POST /v1/track");
        assert_eq!(response.status(), 200);
        assert!(
            server
                .wait_for_sinks_to_drain(Duration::from_secs(30))
                .await,
            "node {node} delivered {message_id}"
        );
    }

    /// SIGTERM to every node (each flushes its queue to the sinks), asserting a clean exit.
    pub fn terminate_all(&mut self) {
        for node in &mut self.nodes {
            assert_eq!(
                node.terminate(),
                Some(0),
                "a node exits 0 on SIGTERM; its log:\n{}",
                node.log()
            );
        }
    }

    /// How often each messageId of the project is in the bucket, and the object keys.
    pub async fn bucket_counts(&self, project_id: &str) -> (BTreeMap<String, usize>, Vec<String>) {
        let (messages, keys) = bucket_messages(
            &self.s3,
            &self.bucket,
            &format!("segment-logs/{project_id}/"),
        )
        .await;
        (count_by_message_id(&messages), keys)
    }

    /// For a few messageIds stored more than once: the objects holding them, with each copy's
    /// position in its object (so a failure says whether two batches overlapped or one batch was
    /// written under two names).
    async fn print_objects_of_duplicates(
        &self,
        project_id: &str,
        counts: &BTreeMap<String, usize>,
    ) {
        let duplicated: BTreeSet<&String> = counts
            .iter()
            .filter(|(_, count)| **count > 1)
            .map(|(id, _)| id)
            .take(5)
            .collect();
        let objects = bucket_objects(
            &self.s3,
            &self.bucket,
            &format!("segment-logs/{project_id}/"),
        )
        .await;
        for (key, messages) in &objects {
            for (line, message) in messages.iter().enumerate() {
                let id = message["messageId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if duplicated.contains(&id) {
                    eprintln!(
                        "duplicate {id}: {key} line {line} of {} (receivedAt {})",
                        messages.len(),
                        message["receivedAt"]
                    );
                }
            }
        }
    }

    /// How often each messageId of the project is in ClickHouse, counted with `FINAL`.
    pub async fn clickhouse_counts(&self, project_id: &str) -> BTreeMap<String, usize> {
        let text = clickhouse_query(
            &self.clickhouse_url,
            &format!(
                "SELECT message_id, count() FROM {}.events FINAL WHERE project_id = '{project_id}' GROUP BY message_id FORMAT TabSeparated",
                self.database
            ),
        )
        .await;
        text.lines()
            .filter_map(|line| {
                let (id, count) = line.split_once('\t')?;
                Some((id.to_string(), count.trim().parse().ok()?))
            })
            .collect()
    }

    /// Asserts that every accepted id of the load (ids `<tag>-n`) is stored exactly once in the
    /// bucket and in ClickHouse, and that no id of the load is stored twice. (An id whose request
    /// got no 200, e.g. from a node killed after its sync, may be stored — once.) Waits up to a
    /// minute for every accepted id to arrive first.
    pub async fn assert_exactly_once(
        &self,
        project_id: &str,
        accepted: &BTreeSet<String>,
        tag: &str,
    ) {
        let of_load = |counts: &BTreeMap<String, usize>| -> BTreeMap<String, usize> {
            counts
                .iter()
                .filter(|(id, _)| id.starts_with(&format!("{tag}-")))
                .map(|(id, count)| (id.clone(), *count))
                .collect()
        };
        let expected: BTreeMap<String, usize> = accepted.iter().map(|id| (id.clone(), 1)).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (bucket, settled) = loop {
            let bucket = of_load(&self.bucket_counts(project_id).await.0);
            let complete = expected.keys().all(|id| bucket.contains_key(id));
            if complete || std::time::Instant::now() >= deadline {
                break (bucket, complete);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let (warehouse, warehouse_settled) = loop {
            let warehouse = of_load(&self.clickhouse_counts(project_id).await);
            let complete = expected.keys().all(|id| warehouse.contains_key(id));
            if complete || std::time::Instant::now() >= deadline {
                break (warehouse, complete);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        if bucket.values().any(|count| *count > 1) {
            self.print_objects_of_duplicates(project_id, &bucket).await;
        }
        report_difference("bucket", &expected, &bucket, settled);
        report_difference("clickhouse", &expected, &warehouse, warehouse_settled);
    }
}

/// Panics naming what is lost, duplicated or unexpected in `store`.
fn report_difference(
    store: &str,
    expected: &BTreeMap<String, usize>,
    found: &BTreeMap<String, usize>,
    settled: bool,
) {
    let lost: Vec<&String> = expected
        .keys()
        .filter(|id| !found.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> =
        found.iter().filter(|(_, count)| **count > 1).collect();
    let unacknowledged = found
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .count();
    eprintln!(
        "{store}: {} accepted, {} stored ({unacknowledged} of them from requests that got no 200), {} lost, {} duplicated",
        expected.len(),
        found.len(),
        lost.len(),
        duplicated.len()
    );
    assert!(
        lost.is_empty() && duplicated.is_empty(),
        "{store}: {} accepted, {} stored; lost {} (e.g. {:?}), duplicated {} (e.g. {:?}); settled: {settled}",
        expected.len(),
        found.len(),
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>(),
        duplicated.len(),
        duplicated.iter().take(5).collect::<Vec<_>>(),
    );
}
