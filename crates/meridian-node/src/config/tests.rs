use std::path::PathBuf;
use std::time::Duration;

use meridian_core::{IngestLimits, RegionId};
use meridian_queue::Durability;

use super::*;

fn env(pairs: &[(&str, &str)]) -> Environment {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn embedded_defaults_are_valid_and_serve_the_four_regions() {
    let settings = Config::from_sources(None, &env(&[]))
        .unwrap()
        .validate()
        .unwrap();
    let ids: Vec<_> = settings.regions.keys().map(|id| id.to_string()).collect();
    assert_eq!(
        ids,
        vec!["af-south-1", "ap-southeast-1", "eu-west-1", "us-east-1"]
    );
    assert_eq!(settings.default_region.as_str(), "eu-west-1");
    assert_eq!(settings.home_region.as_str(), "eu-west-1");
    assert_eq!(settings.served_regions.len(), 4);
    assert_eq!(settings.limits, IngestLimits::default());
    assert_eq!(settings.durability, Durability::Fsync);
    assert!(matches!(
        &settings.regions[&RegionId::parse("us-east-1").unwrap()].archive.target,
        ArchiveTarget::Dir(dir) if dir == &PathBuf::from("data/archive/us-east-1")
    ));
}

#[test]
fn the_jetstream_backend_needs_a_cluster_for_every_served_region_and_sane_numbers() {
    let problems = |file: &str, pairs: &[(&str, &str)]| -> String {
        match Config::from_sources(Some(file), &env(pairs)).and_then(|config| config.validate()) {
            Ok(_) => String::new(),
            Err(error) => error.to_string(),
        }
    };
    let eu_only = &[("MERIDIAN_SERVE_REGIONS", "eu-west-1")][..];
    let without_cluster = "[queue]\nbackend = \"jetstream\"\n";
    assert!(
        problems(without_cluster, eu_only).contains("[regions.eu-west-1.queue.jetstream]"),
        "{}",
        problems(without_cluster, eu_only)
    );
    let with_cluster = "[queue]\nbackend = \"jetstream\"\n[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n";
    assert_eq!(problems(with_cluster, eu_only), "");
    // The environment chooses the backend too; then every served region needs its cluster.
    assert!(
        problems(
            "[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n",
            &[
                ("MERIDIAN_QUEUE_BACKEND", "jetstream"),
                ("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")
            ]
        )
        .contains("[regions.us-east-1.queue.jetstream]")
    );
    let bad_numbers = "[queue]\nbackend = \"jetstream\"\n[regions.eu-west-1.queue.jetstream]\nurls = []\nreplicas = 7\npartitions = 0\nstream = \"a.b\"\n";
    let text = problems(bad_numbers, eu_only);
    for expected in [
        "urls must name",
        "replicas must be 1 to 5",
        "partitions must be 1 to 64",
        "ASCII letters",
    ] {
        assert!(text.contains(expected), "{expected}: {text}");
    }
    let settings = Config::from_sources(Some(with_cluster), &env(eu_only))
        .unwrap()
        .validate()
        .unwrap();
    let region = &settings.regions[&RegionId::parse("eu-west-1").unwrap()];
    let jetstream = region.jetstream.as_ref().expect("resolved");
    assert_eq!(jetstream.stream, "meridian-eu-west-1");
    assert_eq!((jetstream.replicas, jetstream.partitions), (3, 1));
    assert_eq!(settings.queue_backend, QueueBackendKind::Jetstream);
    // With the local backend a jetstream section is ignored.
    let local = Config::from_sources(
        Some("[regions.eu-west-1.queue.jetstream]\nurls = [\"nats://10.0.0.1:4222\"]\n"),
        &env(eu_only),
    )
    .unwrap()
    .validate()
    .unwrap();
    assert!(
        local.regions[&RegionId::parse("eu-west-1").unwrap()]
            .jetstream
            .is_none()
    );
    assert!(
        Config::from_sources(None, &env(&[("MERIDIAN_QUEUE_BACKEND", "kafka")])).is_err(),
        "an unknown backend is refused"
    );
}

#[test]
fn settings_never_show_their_secrets_in_debug() {
    let file = r#"
        [auth]
        jwt_secret = "jwt-secret-that-is-long-enough-0123456789"
        [regions.eu-west-1.clickhouse]
        urls = ["http://127.0.0.1:8123"]
        password = "clickhouse-password-in-debug"
        [regions.us-east-1.archive]
        s3 = { bucket = "b", access_key_id = "AKIA", secret_access_key = "s3-secret-in-debug" }
    "#;
    let config = Config::from_sources(
        Some(file),
        &env(&[
            (
                "MERIDIAN_CATALOG_URL",
                "postgres://u:catalog-password-in-debug@db/m",
            ),
            (
                "MERIDIAN_CATALOG_HASH_KEY",
                "catalog-hash-key-in-debug-long-enough-0123",
            ),
        ]),
    )
    .unwrap();
    let settings = config.validate().unwrap();
    for shown in [format!("{config:?}"), format!("{settings:?}")] {
        for secret in [
            "jwt-secret-that-is-long-enough-0123456789",
            "clickhouse-password-in-debug",
            "s3-secret-in-debug",
            "catalog-password-in-debug",
            "catalog-hash-key-in-debug-long-enough-0123",
        ] {
            assert!(!shown.contains(secret), "{secret} shown");
        }
    }
    assert_eq!(settings.catalog_url_for_display(), "postgres://u:***@db/m");
}

#[test]
fn a_regions_buckets_must_be_in_the_aws_region_of_that_meridian_region() {
    let copied = r#"
        [regions.us-east-1.archive]
        s3 = { bucket = "b", region = "eu-west-1" }
    "#;
    let problems = Config::from_sources(Some(copied), &env(&[]))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        problems.contains("regions.us-east-1.archive.s3")
            && problems.contains("`eu-west-1`")
            && problems.contains("`us-east-1`"),
        "{problems}"
    );
    let mapped = r#"
        [regions.eu-west-1]
        aws_region = "eu-central-1"
        [regions.eu-west-1.archive]
        s3 = { bucket = "b", region = "eu-central-1" }
    "#;
    let settings = Config::from_sources(Some(mapped), &env(&[]))
        .unwrap()
        .validate()
        .unwrap();
    let eu = &settings.regions[&RegionId::parse("eu-west-1").unwrap()];
    assert_eq!(eu.aws_region, "eu-central-1");
    assert!(matches!(
        &eu.archive.target,
        ArchiveTarget::S3 { settings, .. } if settings.region == "eu-central-1"
    ));
    assert_eq!(settings.aws_region_of("eu-west-1"), "eu-central-1");
    assert_eq!(settings.aws_region_of("us-east-1"), "us-east-1");
}

#[test]
fn a_postgresql_catalog_needs_an_explicit_hash_key() {
    let problems = Config::from_sources(
        None,
        &env(&[(
            "MERIDIAN_CATALOG_URL",
            "postgres://meridian@127.0.0.1/meridian",
        )]),
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(problems.contains("catalog.hash_key"), "{problems}");
    let short = Config::from_sources(None, &env(&[("MERIDIAN_CATALOG_HASH_KEY", "short")]))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(short.contains("at least 32 bytes"), "{short}");
}

#[test]
fn a_cluster_node_serves_only_its_own_region_unless_told_otherwise() {
    let served = |file: Option<&str>, pairs: &[(&str, &str)]| {
        let mut pairs = pairs.to_vec();
        pairs.push((
            "MERIDIAN_CATALOG_HASH_KEY",
            "a-cluster-wide-catalog-hash-key-0123456789",
        ));
        let settings = Config::from_sources(file, &env(&pairs))
            .unwrap()
            .validate()
            .unwrap();
        let served: Vec<String> = settings
            .served_regions
            .iter()
            .map(|region| region.to_string())
            .collect();
        (served, settings.warnings)
    };
    let postgres = (
        "MERIDIAN_CATALOG_URL",
        "postgres://meridian@127.0.0.1/meridian",
    );
    assert_eq!(served(None, &[postgres]).0, vec!["eu-west-1"]);
    assert_eq!(
        served(None, &[postgres, ("MERIDIAN_NODE_REGION", "us-east-1")]).0,
        vec!["us-east-1"]
    );
    assert_eq!(
        served(None, &[("MERIDIAN_NODE_REGION", "af-south-1")]).0,
        vec!["af-south-1"],
        "a home region set on purpose makes the node a member of that region"
    );
    assert_eq!(
        served(Some("[node]\nregion = \"eu-west-1\"\n"), &[]).0,
        vec!["eu-west-1"]
    );
    let (playground, playground_warnings) = served(None, &[]);
    assert_eq!(
        playground.len(),
        4,
        "the embedded playground serves all four"
    );
    assert_eq!(
        served(Some(EMBEDDED_DEFAULTS), &[]).0.len(),
        4,
        "config/meridian.toml as a file gives the same playground as the embedded defaults"
    );
    assert!(playground_warnings.is_empty());

    let (several, warnings) = served(
        None,
        &[postgres, ("MERIDIAN_SERVE_REGIONS", "eu-west-1,us-east-1")],
    );
    assert_eq!(
        several,
        vec!["eu-west-1", "us-east-1"],
        "serve_regions wins"
    );
    let shared_catalog_warnings: Vec<&String> = warnings
        .iter()
        .filter(|warning| warning.contains("shared catalog"))
        .collect();
    assert_eq!(shared_catalog_warnings.len(), 1, "{warnings:?}");
    assert!(
        shared_catalog_warnings[0].contains("eu-west-1, us-east-1"),
        "{warnings:?}"
    );
    for region in ["eu-west-1", "us-east-1"] {
        assert!(
            warnings
                .iter()
                .any(|warning| warning.contains(&format!("region {region} has no regional store"))),
            "{warnings:?}"
        );
    }
    assert_eq!(warnings.len(), 3, "{warnings:?}");
}

#[test]
fn each_region_has_a_store_of_its_own_or_the_warning_says_the_global_one_is_used() {
    let settings = |file: &str, pairs: &[(&str, &str)]| {
        Config::from_sources(Some(file), &env(pairs))
            .unwrap()
            .validate()
    };
    // Embedded: a SQLite file per region beside the catalog, no warning.
    let embedded = settings("", &[("MERIDIAN_DATA_DIR", "/var/lib/m")]).unwrap();
    let eu = RegionId::parse("eu-west-1").unwrap();
    assert_eq!(
        embedded.regions[&eu].store_url.as_ref().map(Secret::expose),
        Some("sqlite:///var/lib/m/catalog-eu-west-1.db?mode=rwc")
    );
    assert!(embedded.warnings.is_empty(), "{:?}", embedded.warnings);

    let postgres = ("MERIDIAN_CATALOG_URL", "postgres://u:p@db/global");
    let hash_key = (
        "MERIDIAN_CATALOG_HASH_KEY",
        "a-cluster-wide-catalog-hash-key-0123456789",
    );
    let with_store = settings(
        "[regions.eu-west-1.catalog]\nurl = \"postgres://u:p@db-eu/meridian_eu\"\n",
        &[postgres, hash_key, ("MERIDIAN_NODE_REGION", "eu-west-1")],
    )
    .unwrap();
    assert_eq!(
        with_store.regions[&eu]
            .store_url
            .as_ref()
            .map(Secret::expose),
        Some("postgres://u:p@db-eu/meridian_eu")
    );
    assert!(with_store.warnings.is_empty(), "{:?}", with_store.warnings);

    let without = settings(
        "",
        &[postgres, hash_key, ("MERIDIAN_NODE_REGION", "eu-west-1")],
    )
    .unwrap();
    assert!(without.regions[&eu].store_url.is_none());
    assert_eq!(without.warnings.len(), 1, "{:?}", without.warnings);
    assert!(without.warnings[0].contains("kept in the global catalog"));

    let from_environment = settings(
        "",
        &[
            postgres,
            hash_key,
            ("MERIDIAN_NODE_REGION", "us-east-1"),
            (
                "MERIDIAN_REGION_CATALOG_URL",
                "postgres://u:p@db-us/meridian_us",
            ),
        ],
    )
    .unwrap();
    let us = RegionId::parse("us-east-1").unwrap();
    assert_eq!(
        from_environment.regions[&us]
            .store_url
            .as_ref()
            .map(Secret::expose),
        Some("postgres://u:p@db-us/meridian_us"),
        "MERIDIAN_REGION_CATALOG_URL names the store of the node's own region"
    );
    assert!(from_environment.regions[&eu].store_url.is_none());

    let bad = settings(
        "[regions.eu-west-1.catalog]\nurl = \"mysql://db/eu\"\n",
        &[postgres, hash_key],
    );
    let problems = format!("{bad:?}");
    assert!(
        problems.contains("regions.eu-west-1.catalog.url"),
        "{problems}"
    );
}

#[test]
fn file_merges_over_defaults_and_environment_wins() {
    let file = r#"
        [node]
        region = "us-east-1"
        [regions.us-east-1]
        disk_budget_bytes = 999999999
        [regions.us-east-1.archive]
        dir = "/srv/archive"
        [regions.sa-east-1]
        display_name = "South America / Sao Paulo"
    "#;
    let environment = env(&[
        ("MERIDIAN_SERVE_REGIONS", "us-east-1, sa-east-1"),
        ("MERIDIAN_LISTEN", "0.0.0.0:9000"),
        ("MERIDIAN_DATA_DIR", "/var/lib/meridian"),
    ]);
    let settings = Config::from_sources(Some(file), &environment)
        .unwrap()
        .validate()
        .unwrap();
    assert_eq!(settings.home_region.as_str(), "us-east-1");
    assert_eq!(settings.regions.len(), 5);
    let us = &settings.regions[&RegionId::parse("us-east-1").unwrap()];
    assert_eq!(us.display_name, "US East / N. Virginia");
    assert_eq!(us.disk_budget_bytes, 999_999_999);
    assert!(
        matches!(&us.archive.target, ArchiveTarget::Dir(dir) if dir == &PathBuf::from("/srv/archive"))
    );
    assert_eq!(
        us.queue_dir,
        PathBuf::from("/var/lib/meridian/queue/us-east-1")
    );
    assert_eq!(
        settings
            .served_regions
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>(),
        vec!["us-east-1", "sa-east-1"]
    );
    assert_eq!(settings.listen.map(|listen| listen.port()), Some(9000));
    assert!(
        settings
            .catalog_url
            .expose()
            .contains("/var/lib/meridian/catalog.db")
    );
}

#[test]
fn s3_archives_are_configured_per_region_and_checked() {
    let file = r#"
        [regions.eu-west-1.archive]
        s3 = { bucket = "meridian-eu", endpoint = "http://127.0.0.1:8333", force_path_style = true, verify_location = false }
    "#;
    let settings = Config::from_sources(Some(file), &env(&[]))
        .unwrap()
        .validate()
        .unwrap();
    let eu = &settings.regions[&RegionId::parse("eu-west-1").unwrap()].archive;
    match &eu.target {
        ArchiveTarget::S3 {
            settings,
            verify_location,
        } => {
            assert_eq!(settings.bucket, "meridian-eu");
            assert_eq!(settings.region, "eu-west-1");
            assert!(settings.force_path_style);
            assert!(!verify_location);
            assert_eq!(
                settings.encryption,
                meridian_archive::s3::Encryption::Aes256
            );
        }
        other => panic!("expected S3, got {other:?}"),
    }
    assert_eq!(
        eu.flush_interval,
        Duration::from_secs(300),
        "S3 archives flush every 5 minutes by default"
    );

    let both = "[regions.eu-west-1.archive]\ndir = \"x\"\ns3 = { bucket = \"b\", sse = \"rot13\" }";
    let message = Config::from_sources(Some(both), &env(&[]))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("exactly one of `dir` or `s3`") && message.contains("rot13"),
        "{message}"
    );
}

#[test]
fn clickhouse_is_configured_per_region() {
    let file = r#"
        [regions.us-east-1.clickhouse]
        urls = ["http://127.0.0.1:8123", "http://127.0.0.1:8124"]
        retention_days = 400
    "#;
    let settings = Config::from_sources(Some(file), &env(&[]))
        .unwrap()
        .validate()
        .unwrap();
    let us = settings.regions[&RegionId::parse("us-east-1").unwrap()]
        .clickhouse
        .clone()
        .unwrap();
    assert_eq!(us.urls.len(), 2);
    assert_eq!(us.database, "meridian");
    assert_eq!(us.batch_max_rows, 50_000);
    assert_eq!(us.retention_days, Some(400));
    assert_eq!(
        us.dead_letter_dir,
        PathBuf::from("data/dead-letter/us-east-1")
    );
    assert!(
        settings.regions[&RegionId::parse("eu-west-1").unwrap()]
            .clickhouse
            .is_none()
    );

    let bad = "[regions.eu-west-1.clickhouse]\nurls = [\"tcp://x\"]\ndatabase = \"a-b\"";
    let message = Config::from_sources(Some(bad), &env(&[]))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("tcp://x") && message.contains("database"),
        "{message}"
    );
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let file = r#"
        default_region = "mars-1"
        [node]
        region = "nowhere-1"
        serve_regions = ["EU"]
        [server]
        listen = "not an address"
        [auth]
        jwt_secret = "short"
        [regions.us-east-1]
        status = "maybe"
    "#;
    let message = Config::from_sources(Some(file), &env(&[]))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    for expected in [
        "default_region `mars-1`",
        "node.region `nowhere-1`",
        "node.serve_regions",
        "server.listen",
        "jwt_secret",
        "regions.us-east-1.status",
    ] {
        assert!(
            message.contains(expected),
            "{expected} missing from: {message}"
        );
    }
}

#[test]
fn unknown_keys_and_wrong_types_are_refused() {
    let unknown = Config::from_sources(Some("[server]\nlisten_port = 3"), &env(&[])).unwrap_err();
    assert!(unknown.to_string().contains("listen_port"), "{unknown}");
    let mistyped =
        Config::from_sources(Some("[limits]\nmax_message_bytes = \"big\""), &env(&[])).unwrap_err();
    assert!(
        mistyped.to_string().contains("max_message_bytes"),
        "{mistyped}"
    );
}
