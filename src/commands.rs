//! The offline commands: they open the catalog (and a region's store) themselves, without a
//! running node — `migrate`, `catalog backup`, `audit verify|anchor`, `residency report`,
//! `project create`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use meridian_server::Settings;

use crate::load_settings;

pub async fn migrate(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let catalog = meridian_node::catalog_key::connect_catalog(&settings)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("catalog {}", settings.catalog_url_for_display()))?;
    let versions = catalog.applied_migrations().await?;
    println!(
        "catalog schema is at version {}",
        versions.last().copied().unwrap_or(0)
    );
    Ok(())
}

pub async fn backup_catalog(config: Option<PathBuf>, output: PathBuf) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    if settings.catalog_url.expose().starts_with("postgres") {
        let status = std::process::Command::new("pg_dump")
            .args(["--format=custom", "--file"])
            .arg(&output)
            .arg(settings.catalog_url.expose())
            .status()
            .context("running pg_dump (install the PostgreSQL client tools)")?;
        if !status.success() {
            bail!("pg_dump failed with {status}");
        }
        println!(
            "catalog backed up with pg_dump to {} (restore with pg_restore)",
            output.display()
        );
        return Ok(());
    }
    let catalog = connect_catalog(&settings).await?;
    catalog.backup_sqlite(&output).await?;
    println!(
        "catalog backed up to {}; to restore, stop the node and put it in place as {}",
        output.display(),
        settings.data_dir.join("catalog.db").display()
    );
    backup_regional_stores(&settings, &catalog, &output).await?;
    if settings.catalog_hash_key.is_none() {
        println!(
            "keep a copy of {} apart from the backup: the catalog's suppressions and audit log need it",
            meridian_node::catalog_key::key_file(&settings.data_dir).display()
        );
    }
    Ok(())
}

/// Backs up each served region's own SQLite store beside `output` (`<output>-<region>.db`); a
/// PostgreSQL regional store lives in its region and is backed up there.
async fn backup_regional_stores(
    settings: &Settings,
    catalog: &meridian_catalog::Catalog,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    let stores = meridian_node::regional_stores::connect_regional_stores(
        settings,
        catalog,
        &settings.served_regions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    for store in stores.stores() {
        if store.is_global {
            continue;
        }
        let regions = store.region_names().join("+");
        if store.catalog.backend() != meridian_catalog::CatalogBackend::Sqlite {
            println!(
                "the regional store of {regions} is a PostgreSQL database ({}): back it up in its region with pg_dump",
                store.display_url
            );
            continue;
        }
        let stem = output.file_stem().unwrap_or_default().to_string_lossy();
        let store_output = output.with_file_name(format!("{stem}-{regions}.db"));
        store.catalog.backup_sqlite(&store_output).await?;
        let live_path = store
            .display_url
            .trim_start_matches("sqlite://")
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        println!(
            "regional store of {regions} backed up to {}; to restore, put it in place as {live_path}",
            store_output.display()
        );
    }
    Ok(())
}

pub async fn anchor_audit(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    match catalog
        .anchor_audit_chain(&meridian_catalog::Actor::system("meridian-audit-anchor"))
        .await?
    {
        meridian_catalog::AnchorOutcome::AlreadyAnchored => {
            println!("audit log already anchored (or empty): nothing to do")
        }
        meridian_catalog::AnchorOutcome::Anchored { entries } => println!(
            "audit log anchored: {entries} entries re-hashed with the catalog key, user ids replaced by their keyed hashes"
        ),
    }
    Ok(())
}

pub async fn create_project(
    config: Option<PathBuf>,
    org: String,
    name: String,
    region: Option<String>,
    key_only: bool,
) -> anyhow::Result<()> {
    let settings = load_settings(config.as_deref())?;
    let region = match region {
        Some(text) => meridian_core::RegionId::parse(&text)?,
        None => settings.default_region.clone(),
    };
    let Some(region_settings) = settings.regions.get(&region) else {
        bail!(
            "region `{region}` is not configured; configured: {}",
            settings
                .regions
                .keys()
                .map(meridian_core::RegionId::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if !region_settings.available {
        bail!("region `{region}` is unavailable for new projects");
    }
    let catalog = connect_catalog(&settings).await?;
    let actor = meridian_catalog::Actor {
        subject: "cli".to_string(),
        request_id: format!("cli-{}", std::process::id()),
    };
    let created = catalog
        .create_project(
            &org,
            meridian_catalog::NewProject {
                name,
                region: region.clone(),
            },
            &actor,
        )
        .await;
    catalog.close().await;
    let (project, write_key) = created?;
    if key_only {
        println!("{write_key}");
    } else {
        println!(
            "{}",
            serde_json::json!({
                "project_id": project.project_id, "org_id": project.org_id, "name": project.name,
                "region": project.region, "write_key": write_key,
            })
        );
    }
    Ok(())
}

/// Opens the catalog for a command: the key must exist already (tools never create one).
async fn connect_catalog(settings: &Settings) -> anyhow::Result<meridian_catalog::Catalog> {
    let key_file = meridian_node::catalog_key::key_file(&settings.data_dir);
    if settings.catalog_hash_key.is_none() && !key_file.exists() {
        bail!(
            "no catalog key: set catalog.hash_key (MERIDIAN_CATALOG_HASH_KEY) or run this where {} exists",
            key_file.display()
        );
    }
    let (key, _) =
        meridian_node::catalog_key::load_catalog_key(settings).map_err(anyhow::Error::msg)?;
    meridian_catalog::Catalog::connect(settings.catalog_url.expose(), key)
        .await
        .with_context(|| format!("catalog {}", settings.catalog_url_for_display()))
}

pub async fn residency_report(
    config: Option<PathBuf>,
    region: Option<String>,
    json: bool,
) -> anyhow::Result<bool> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    let customer_stores = std::sync::Arc::new(meridian_archive::customer::CustomerStores::new(
        settings.customer_access.clone(),
    ));
    let regions = match region {
        Some(text) => vec![
            meridian_core::RegionId::parse(&text)
                .map_err(|error| anyhow::anyhow!("--region {text}: {error:?}"))?,
        ],
        None => settings.served_regions.clone(),
    };
    let regional_stores =
        meridian_node::regional_stores::connect_regional_stores(&settings, &catalog, &regions)
            .await
            .map_err(anyhow::Error::msg)?;
    let keys =
        meridian_catalog::KeyCache::load_from(catalog.clone(), regional_stores.catalogs()).await?;
    let queue_encryption = meridian_node::node::load_queue_encryption(&settings)
        .map_err(anyhow::Error::msg)?
        .map(std::sync::Arc::new);
    let mut clean = true;
    let mut reports = Vec::new();
    for region in &regions {
        let services = meridian_node::region::region_services_for_tools(
            &settings,
            region,
            &keys,
            &customer_stores,
        )
        .await?;
        let report = meridian_node::residency::scan_region(
            &settings,
            &keys,
            &customer_stores,
            region,
            &services,
            queue_encryption.clone(),
            regional_stores.store_of_region(region),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        clean &= report.is_clean();
        if json {
            reports.push(report.to_json(&keys));
        } else {
            print!("{}", report.to_text());
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(clean)
}

/// Verifies the global catalog's audit chain and the chain of each served region's own store.
pub async fn verify_audit(config: Option<PathBuf>) -> anyhow::Result<bool> {
    let settings = load_settings(config.as_deref())?;
    let catalog = connect_catalog(&settings).await?;
    let regional_stores = meridian_node::regional_stores::connect_regional_stores(
        &settings,
        &catalog,
        &settings.served_regions,
    )
    .await
    .map_err(anyhow::Error::msg)?;
    let mut chains = vec![("audit log".to_string(), catalog.clone())];
    for store in regional_stores.stores() {
        if !store.is_global {
            let name = format!("audit log of {}", store.region_names().join(", "));
            chains.push((name, store.catalog.clone()));
        }
    }
    let mut intact = true;
    for (name, chain) in chains {
        let report = chain.verify_audit_chain().await?;
        match report.first_broken {
            None => println!("{name} intact: {} entries verified", report.entries_checked),
            Some((seq, reason)) => {
                println!(
                    "{name} TAMPERED at entry {seq}: {reason} ({} entries checked)",
                    report.entries_checked
                );
                intact = false;
            }
        }
    }
    Ok(intact)
}
