//! The key cache against a large catalog: `projects` projects (one write key each) and as many
//! suppressions, in a SQLite catalog in a temporary directory (or the PostgreSQL database given
//! with --catalog-url). Reports the full load's time and the process's resident memory, then the
//! time of an incremental refresh after one admin change (a suppression), then a full reload.
//!
//! Usage: keycache-bench [--projects 100000] [--catalog-url postgres://...]

use std::time::Instant;

use clap::Parser;
use meridian_catalog::{Actor, Catalog, CatalogKey, KeyCache};

#[derive(Parser)]
struct Arguments {
    #[arg(long, default_value_t = 100_000)]
    projects: usize,
    /// A PostgreSQL database to fill (it must be empty); default: a temporary SQLite catalog.
    #[arg(long)]
    catalog_url: Option<String>,
}

fn resident_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arguments = Arguments::parse();
    let directory = tempfile::tempdir()?;
    let url = arguments.catalog_url.clone().unwrap_or_else(|| {
        format!(
            "sqlite://{}/catalog.db?mode=rwc",
            directory.path().display()
        )
    });
    let key = CatalogKey::from_bytes(b"keycache-bench-key-keycache-bench-key")
        .ok_or("bench key too short")?;
    let catalog = Catalog::connect(&url, key.clone()).await?;
    let actor = Actor::system("keycache-bench");
    catalog
        .create_org(
            "bench",
            "Bench",
            &meridian_core::RegionId::parse("eu-west-1").map_err(|error| format!("{error:?}"))?,
            &actor,
        )
        .await?;
    let filling = Instant::now();
    const ROWS_PER_STATEMENT: usize = 1_000;
    for start in (0..arguments.projects).step_by(ROWS_PER_STATEMENT) {
        let end = (start + ROWS_PER_STATEMENT).min(arguments.projects);
        let projects: Vec<String> = (start..end)
            .map(|n| format!("('prj_bench{n:07}', 'bench', 'p{n}', 'eu-west-1', 0, NULL)"))
            .collect();
        catalog
            .execute_raw(&format!(
                "INSERT INTO projects (project_id, org_id, name, region, created_at_ms, storage_json) VALUES {}",
                projects.join(", ")
            ))
            .await?;
        let keys: Vec<String> = (start..end)
            .map(|n| {
                let hash: String = meridian_catalog::hash_write_key(&format!("wk_bench{n:07}"))
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect();
                format!("('{hash}', 'prj_bench{n:07}', 'wk_bench', 0, NULL)")
            })
            .collect();
        catalog
            .execute_raw(&format!(
                "INSERT INTO write_keys (key_hash, project_id, prefix, created_at_ms, expires_at_ms) VALUES {}",
                keys.join(", ")
            ))
            .await?;
        let suppressions: Vec<String> = (start..end)
            .map(|n| {
                let project = format!("prj_bench{n:07}");
                format!("('{project}', '{}', 0)", key.user_hash(&project, "someone"))
            })
            .collect();
        catalog
            .execute_raw(&format!(
                "INSERT INTO suppressions (project_id, user_id, created_at_ms) VALUES {}",
                suppressions.join(", ")
            ))
            .await?;
    }
    catalog
        .execute_raw("UPDATE catalog_state SET version = version + 1 WHERE id = 1")
        .await?;
    println!(
        "catalog filled: {} projects, {} keys, {} suppressions in {:.1} s",
        arguments.projects,
        arguments.projects,
        arguments.projects,
        filling.elapsed().as_secs_f64()
    );

    let before_mib = resident_mib();
    let loading = Instant::now();
    let cache = KeyCache::load(catalog.clone()).await?;
    let full_load_ms = loading.elapsed().as_secs_f64() * 1000.0;
    let after_mib = resident_mib();
    assert_eq!(cache.project_count(), arguments.projects);
    assert!(cache.resolve("wk_bench0000042").is_some());
    println!(
        "full load: {full_load_ms:.0} ms; resident memory {before_mib:.0} MiB before, {after_mib:.0} MiB after"
    );

    let project = catalog
        .get_project("prj_bench0000042")
        .await?
        .ok_or("the bench project prj_bench0000042 is missing")?;
    catalog
        .suppress_users(&project, &["another".to_string()], &actor)
        .await?;
    let refreshing = Instant::now();
    let refreshed = cache.refresh().await?;
    let incremental_ms = refreshing.elapsed().as_secs_f64() * 1000.0;
    assert!(refreshed && cache.is_suppressed("prj_bench0000042", "another"));
    let (full_reloads, incremental_refreshes) = cache.reload_counts();
    println!(
        "incremental refresh after one suppression: {incremental_ms:.1} ms (full reloads {full_reloads}, incremental refreshes {incremental_refreshes}); resident memory {:.0} MiB",
        resident_mib()
    );

    let reloading = Instant::now();
    let reloaded = KeyCache::load(catalog.clone()).await?;
    println!(
        "a second full load (what every admin change cost every node before): {:.0} ms; resident memory {:.0} MiB",
        reloading.elapsed().as_secs_f64() * 1000.0,
        resident_mib()
    );
    drop(reloaded);
    Ok(())
}
