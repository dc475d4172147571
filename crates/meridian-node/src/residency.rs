//! The residency report: which projects' data a region's stores hold, and whether any of it
//! belongs to a project pinned to another region (`meridian residency report`,
//! `GET /admin/regions/{region}/residency`).
//!
//! It scans the region's queue on this node (read only: the project of every queued record), its
//! ClickHouse (distinct project ids of `events`, on every replica), its archive store (project
//! prefixes under `segment-logs/`) and the customer buckets of the projects pinned to it (which may
//! hold only that project's objects). Every project found is listed with
//! its pinned region; data of a project pinned elsewhere, or of a project the catalog does not
//! know, is a finding.

use std::collections::{BTreeMap, BTreeSet};

use std::sync::Arc;

use meridian_catalog::KeyCache;
use meridian_core::RegionId;
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms};
use meridian_queue::encryption::QueueEncryption;
use serde_json::{Value, json};

use crate::config::Settings;
use crate::error::StepError;
use crate::region::RegionServices;

/// Data found where it does not belong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The store, e.g. `clickhouse http://...` or `archive dir:/...`.
    pub store: String,
    /// The table or object key the data was found in.
    pub location: String,
    pub project_id: String,
    /// The project's region, `None` when the catalog does not know the project.
    pub pinned_region: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ResidencyReport {
    pub region: RegionId,
    pub scanned_at_ms: i64,
    pub stores: Vec<String>,
    /// Every project found, with the stores it was found in.
    pub projects: BTreeMap<String, BTreeSet<String>>,
    pub findings: Vec<Finding>,
}

impl ResidencyReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn to_json(&self, keys: &KeyCache) -> Value {
        let projects: serde_json::Map<String, Value> = self
            .projects
            .iter()
            .map(|(project_id, stores)| {
                (
                    project_id.clone(),
                    json!({
                        "pinned_region": keys.project_region(project_id).map(|region| region.to_string()),
                        "found_in": stores,
                    }),
                )
            })
            .collect();
        json!({
            "region": self.region.as_str(),
            "scanned_at": format_rfc3339_ms(self.scanned_at_ms),
            "clean": self.is_clean(),
            "stores": self.stores,
            "projects": projects,
            "findings": self.findings.iter().map(|finding| json!({
                "store": finding.store,
                "location": finding.location,
                "project_id": finding.project_id,
                "pinned_region": finding.pinned_region,
            })).collect::<Vec<_>>(),
        })
    }

    /// Lines for a terminal.
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "residency report of {} at {}: {} stores scanned, {} projects found\n",
            self.region,
            format_rfc3339_ms(self.scanned_at_ms),
            self.stores.len(),
            self.projects.len()
        );
        for finding in &self.findings {
            text.push_str(&format!(
                "FOREIGN: project {} (pinned to {}) in {} at {}\n",
                finding.project_id,
                finding
                    .pinned_region
                    .as_deref()
                    .unwrap_or("no region: unknown project"),
                finding.store,
                finding.location
            ));
        }
        if self.is_clean() {
            text.push_str("clean: every project found is pinned to this region\n");
        }
        text
    }
}

/// The project id of an archive key `[prefix/]segment-logs/<project>/...`.
fn project_of_key(key: &str) -> Option<&str> {
    let (_, after) = key.split_once("segment-logs/")?;
    after
        .split('/')
        .next()
        .filter(|project| !project.is_empty())
}

/// Notes where the queue holds each project's records (unreadable ones under a name of their own).
fn note_queued_records(
    seen: &mut Vec<(String, String, String)>,
    store: &str,
    counts: BTreeMap<String, u64>,
) {
    for (project_id, records) in counts {
        let project_id = if project_id.is_empty() {
            "(unreadable records)".to_string()
        } else {
            project_id
        };
        seen.push((
            store.to_string(),
            format!("{records} queued records"),
            project_id,
        ));
    }
}

/// Scans the region's stores (see the module documentation).
pub async fn scan_region(
    settings: &Settings,
    keys: &KeyCache,
    customer_stores: &meridian_archive::customer::CustomerStores,
    region: &RegionId,
    services: &RegionServices,
    queue_encryption: Option<Arc<QueueEncryption>>,
    regional_store: Option<&meridian_catalog::RegionalStore>,
) -> Result<ResidencyReport, StepError> {
    let mut report = ResidencyReport {
        region: region.clone(),
        scanned_at_ms: now_unix_ms(),
        stores: Vec::new(),
        projects: BTreeMap::new(),
        findings: Vec::new(),
    };
    // Where each project was first seen in each store: (store, location, project).
    let mut seen: Vec<(String, String, String)> = Vec::new();

    if let Some(jetstream) = crate::region::jetstream_settings_for(
        settings,
        region,
        queue_encryption.as_ref(),
        "residency-report",
        &[],
    ) {
        let store = format!(
            "queue jetstream {}-p* on {}",
            jetstream.stream,
            jetstream.urls.join(", ")
        );
        report.stores.push(store.clone());
        let counts = meridian_queue::jetstream::project_record_counts(&jetstream)
            .await
            .map_err(|error| format!("{store}: {error}"))?;
        note_queued_records(&mut seen, &store, counts);
    } else if let Some(region_settings) = settings.regions.get(region) {
        let queue_dir = region_settings.queue_dir.clone();
        let store = format!("queue {}", queue_dir.display());
        report.stores.push(store.clone());
        let counts = tokio::task::spawn_blocking(move || {
            meridian_queue::inspect::project_record_counts(&queue_dir, queue_encryption.as_deref())
        })
        .await
        .map_err(|error| format!("{store}: the scan panicked: {error}"))?
        .map_err(|error| format!("{store}: {error}"))?;
        note_queued_records(&mut seen, &store, counts);
    }

    if let Some(clickhouse) = &services.clickhouse {
        for (url, project_ids) in clickhouse.distinct_project_ids().await? {
            let store = format!("clickhouse {url}");
            report.stores.push(store.clone());
            for project_id in project_ids {
                seen.push((store.clone(), "table events".to_string(), project_id));
            }
        }
    }

    // The region's own store (a region kept in the global catalog has none to scan).
    if let Some(regional) = regional_store.filter(|regional| !regional.is_global) {
        let store = format!("regional store {}", regional.display_url);
        report.stores.push(store.clone());
        for (table, project_id) in regional
            .catalog
            .end_user_project_ids()
            .await
            .map_err(|error| format!("{store}: {error}"))?
        {
            seen.push((store.clone(), format!("table {table}"), project_id));
        }
    }

    let archive_store = format!("archive {}", services.archive_store.describe());
    report.stores.push(archive_store.clone());
    let archive_prefix = match services.archive_prefix.as_deref() {
        Some(prefix) if !prefix.is_empty() => format!("{}/segment-logs/", prefix.trim_matches('/')),
        _ => "segment-logs/".to_string(),
    };
    let mut first_key_of: BTreeMap<String, String> = BTreeMap::new();
    for key in services
        .archive_store
        .list(&archive_prefix)
        .await
        .map_err(|error| format!("{archive_store}: {error}"))?
    {
        if let Some(project_id) = project_of_key(&key) {
            first_key_of.entry(project_id.to_string()).or_insert(key);
        }
    }
    for (project_id, key) in first_key_of {
        seen.push((archive_store.clone(), format!("object {key}"), project_id));
    }

    let aws_region = settings.aws_region_of(region.as_str());
    for (owner, owner_region, storage) in keys.projects() {
        let Some(storage) = storage else {
            continue;
        };
        if &owner_region != region {
            continue;
        }
        let store_name = format!("customer bucket {} of {owner}", storage.bucket);
        report.stores.push(store_name.clone());
        let (store, prefix) = customer_stores
            .store_for(&aws_region, &owner, &storage)
            .await
            .map_err(|error| format!("{store_name}: {error}"))?;
        let listed_prefix = if prefix.is_empty() {
            "segment-logs/".to_string()
        } else {
            format!("{}/segment-logs/", prefix.trim_matches('/'))
        };
        for key in store
            .list(&listed_prefix)
            .await
            .map_err(|error| format!("{store_name}: {error}"))?
        {
            let Some(project_id) = project_of_key(&key) else {
                continue;
            };
            if project_id != owner {
                // Another project's data in this customer's bucket is a finding whatever its
                // region: the bucket is the owner's alone.
                report.findings.push(Finding {
                    store: store_name.clone(),
                    location: format!("object {key}"),
                    project_id: project_id.to_string(),
                    pinned_region: keys.project_region(project_id).map(|r| r.to_string()),
                });
                report
                    .projects
                    .entry(project_id.to_string())
                    .or_default()
                    .insert(store_name.clone());
                continue;
            }
            seen.push((
                store_name.clone(),
                format!("object {key}"),
                project_id.to_string(),
            ));
        }
    }

    for (store, location, project_id) in seen {
        let pinned = keys.project_region(&project_id);
        if pinned.as_ref() != Some(region) {
            report.findings.push(Finding {
                store: store.clone(),
                location,
                project_id: project_id.clone(),
                pinned_region: pinned.map(|region| region.to_string()),
            });
        }
        report.projects.entry(project_id).or_default().insert(store);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_keys_name_their_project() {
        assert_eq!(
            project_of_key("segment-logs/prj_a/1795478400000/q1-0-1.gz"),
            Some("prj_a")
        );
        assert_eq!(
            project_of_key("pre/fix/segment-logs/prj_b/1/x.gz"),
            Some("prj_b")
        );
        assert_eq!(project_of_key("segment-logs//x"), None);
        assert_eq!(project_of_key("other/key"), None);
    }
}
