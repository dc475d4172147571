//! Retention: the janitor of each served region deletes what is past each project's retention
//! (the project's own setting, else the region's default) from the region's ClickHouse and archive
//! (and the project's own bucket, by the project's setting only), one node of a region per run;
//! and what a dry run shows of it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_archive::ObjectStore;
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, CatalogError, ProjectRetention};
use meridian_core::RegionId;
use meridian_core::timestamp::{MILLIS_PER_DAY, format_rfc3339_ms, now_unix_ms, utc_day_start_ms};
use serde_json::json;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::{AfterWork, JobLabel, LeasedJob};
use crate::config::{RegionRetention, Settings};
use crate::error::StepError;
use crate::node::Node;
use crate::project_archive::{StoreKind, bounded, stores_of_project};
use crate::region::RegionServices;

/// How often a node asks whether its regions' janitor runs are due (a change of retention on
/// this node wakes it at once).
const RETENTION_POLL: Duration = Duration::from_secs(10);

/// A UTC day as `YYYY-MM-DD`.
pub fn day_text(day_start_ms: i64) -> String {
    format_rfc3339_ms(day_start_ms)[..10].to_string()
}

/// The janitor runs of the served regions (a claim is a region whose run is due).
pub struct RetentionJanitor;

#[async_trait]
impl LeasedJob for RetentionJanitor {
    type Job = RegionId;
    const NAME: &'static str = "retention";
    const AFTER_WORK: AfterWork = AfterWork::ClaimAgain;

    fn applies_to(&self, node: &Node) -> bool {
        !node.regions.is_empty()
    }

    async fn claim(
        &self,
        node: &Node,
        _lease_until_ms: i64,
    ) -> Result<Vec<RegionId>, CatalogError> {
        let interval_ms = node.settings.retention_janitor_interval.as_millis() as i64;
        for region in node.regions.keys() {
            let now_ms = now_unix_ms();
            let claimed = node
                .catalog
                .claim_retention_run(region.as_str(), &node.node_id, now_ms, now_ms + interval_ms)
                .await;
            match claimed {
                Ok(true) => return Ok(vec![region.clone()]),
                Ok(false) => {}
                Err(error) => {
                    warn!(region = %region, %error, "retention: cannot claim the janitor run; retrying")
                }
            }
        }
        Ok(Vec::new())
    }

    fn label_of(region: &RegionId) -> JobLabel {
        JobLabel {
            id: format!("retention {region}"),
            region: region.to_string(),
        }
    }

    /// Deletions are idempotent: a run a stop cut short is finished by the next one.
    async fn execute(&self, node: &Arc<Node>, region: RegionId) -> Result<(), StepError> {
        janitor_pass(node, &region).await;
        Ok(())
    }

    async fn record_failure(&self, _node: &Node, _region: &JobLabel, _failure: &StepError) {}

    fn poll_interval(&self, node: &Node) -> Duration {
        RETENTION_POLL.min(node.settings.retention_janitor_interval)
    }

    fn wake<'node>(&self, node: &'node Node) -> &'node Notify {
        &node.wakers.retention_changed
    }
}

/// The days each of a project's stores keeps (`None`: for good).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EffectiveRetention {
    pub warehouse_days: Option<u32>,
    /// The region's archive store.
    pub archive_days: Option<u32>,
    /// The project's own bucket: only a retention the project set itself applies there (the
    /// region's default is the operator's policy for the operator's store).
    pub customer_archive_days: Option<u32>,
}

impl EffectiveRetention {
    pub fn of(retention: ProjectRetention, region_default: RegionRetention) -> EffectiveRetention {
        EffectiveRetention {
            warehouse_days: retention
                .warehouse
                .effective_days(region_default.warehouse_days),
            archive_days: retention
                .archive
                .effective_days(region_default.archive_days),
            customer_archive_days: retention.archive.effective_days(None),
        }
    }

    fn deletes_anything(self) -> bool {
        self.warehouse_days.is_some()
            || self.archive_days.is_some()
            || self.customer_archive_days.is_some()
    }

    /// The first received day a replay may still ask for (`None`: any).
    pub fn earliest_replayable_day_ms(self, now_ms: i64) -> Option<i64> {
        [self.warehouse_days, self.archive_days]
            .into_iter()
            .flatten()
            .map(|days| cutoff_ms(now_ms, days))
            .max()
    }
}

/// Everything received before this instant is past a retention of `days` (a UTC day start).
pub fn cutoff_ms(now_ms: i64, days: u32) -> i64 {
    utc_day_start_ms(now_ms) - i64::from(days) * MILLIS_PER_DAY
}

/// The region's default retention (nothing set: kept for good).
pub fn region_default(settings: &Settings, region: &str) -> RegionRetention {
    RegionId::parse(region)
        .ok()
        .and_then(|region| settings.regions.get(&region))
        .map(|region| region.retention_default)
        .unwrap_or_default()
}

/// An archive object past its project's retention.
pub struct ExpiredObject {
    pub kind: StoreKind,
    pub store: Arc<dyn ObjectStore>,
    pub key: String,
    pub day_start_ms: i64,
}

/// What is past a project's retention now.
#[derive(Default)]
pub struct Expired {
    pub warehouse_cutoff_ms: Option<i64>,
    pub archive_cutoff_ms: Option<i64>,
    pub customer_archive_cutoff_ms: Option<i64>,
    pub objects: Vec<ExpiredObject>,
    /// Rows received before the warehouse cutoff, per received day.
    pub warehouse_rows_by_day: Vec<(i64, u64)>,
}

impl Expired {
    pub fn warehouse_rows(&self) -> u64 {
        self.warehouse_rows_by_day
            .iter()
            .map(|(_, rows)| rows)
            .sum()
    }
}

pub async fn find_expired(
    node: &Node,
    region: &RegionId,
    services: &RegionServices,
    project_id: &str,
    retention: EffectiveRetention,
    now_ms: i64,
) -> Result<Expired, StepError> {
    let mut expired = Expired {
        warehouse_cutoff_ms: retention.warehouse_days.map(|days| cutoff_ms(now_ms, days)),
        archive_cutoff_ms: retention.archive_days.map(|days| cutoff_ms(now_ms, days)),
        customer_archive_cutoff_ms: retention
            .customer_archive_days
            .map(|days| cutoff_ms(now_ms, days)),
        ..Expired::default()
    };
    if expired.archive_cutoff_ms.is_some() || expired.customer_archive_cutoff_ms.is_some() {
        for project_store in stores_of_project(node, region, services, project_id).await? {
            let cutoff = match project_store.kind {
                StoreKind::Regional => expired.archive_cutoff_ms,
                StoreKind::Customer => expired.customer_archive_cutoff_ms,
            };
            let Some(cutoff) = cutoff else {
                continue;
            };
            let listed = bounded(
                &format!("listing the {} archive", project_store.kind.as_str()),
                list_project_objects(
                    project_store.store.as_ref(),
                    project_store.prefix.as_deref(),
                    project_id,
                    Some((i64::MIN, cutoff - 1)),
                ),
            )
            .await?;
            for object in listed {
                debug_assert!(object.day_start_ms < cutoff);
                expired.objects.push(ExpiredObject {
                    kind: project_store.kind,
                    store: Arc::clone(&project_store.store),
                    key: object.key,
                    day_start_ms: object.day_start_ms,
                });
            }
        }
    }
    if let (Some(cutoff), Some(clickhouse)) = (expired.warehouse_cutoff_ms, &services.clickhouse) {
        expired.warehouse_rows_by_day = clickhouse
            .count_received_before_by_day(project_id, cutoff)
            .await?;
    }
    Ok(expired)
}

/// What one project's cleaning deleted.
#[derive(Clone, Copy, Debug, Default)]
struct Deleted {
    archive_objects: u64,
    warehouse_rows: u64,
}

/// Deletes what is past the project's retention, then audits it (nothing deleted: no entry).
async fn clean_project(
    node: &Node,
    region: &RegionId,
    services: &RegionServices,
    subject: &meridian_catalog::RetentionSubject,
    retention: EffectiveRetention,
) -> Result<Deleted, StepError> {
    let now_ms = now_unix_ms();
    let project_id = subject.project_id.as_str();
    let expired = find_expired(node, region, services, project_id, retention, now_ms).await?;
    let mut deleted = Deleted::default();
    let mut archive_days: Vec<String> = Vec::new();
    for object in &expired.objects {
        bounded(
            &format!("deleting {}", object.key),
            object.store.delete(&object.key),
        )
        .await?;
        deleted.archive_objects += 1;
        let day = day_text(object.day_start_ms);
        if !archive_days.contains(&day) {
            archive_days.push(day);
        }
    }
    if let (Some(cutoff), Some(clickhouse)) = (expired.warehouse_cutoff_ms, &services.clickhouse)
        && expired.warehouse_rows() > 0
    {
        deleted.warehouse_rows = clickhouse
            .delete_received_before(project_id, cutoff)
            .await?;
    }
    if deleted.archive_objects == 0 && deleted.warehouse_rows == 0 {
        return Ok(deleted);
    }
    archive_days.sort();
    let janitor = Actor::system(&format!("retention-janitor/{}", node.node_id));
    node.stores
        .of_region(region.as_str())
        .map_err(|error| error.to_string())?
        .record_retention_deletion(
            &subject.org_id,
            project_id,
            json!({
                "region": region.as_str(),
                "archive_objects": deleted.archive_objects,
                "archive_days": archive_days,
                "archive_cutoff": expired.archive_cutoff_ms.map(format_rfc3339_ms),
                "customer_bucket_cutoff": expired.customer_archive_cutoff_ms.map(format_rfc3339_ms),
                "warehouse_rows": deleted.warehouse_rows,
                "warehouse_cutoff": expired.warehouse_cutoff_ms.map(format_rfc3339_ms),
            }),
            &janitor,
        )
        .await
        .map_err(|error| format!("auditing the deletion: {error}"))?;
    info!(
        project_id,
        region = %region,
        archive_objects = deleted.archive_objects,
        warehouse_rows = deleted.warehouse_rows,
        "retention: deleted data past the project's retention"
    );
    Ok(deleted)
}

/// One janitor run over every project of the region. A project that fails is logged and left
/// for the next run; the others are still cleaned.
async fn janitor_pass(node: &Node, region: &RegionId) {
    let Some(services) = node.services(region) else {
        return;
    };
    let subjects = match node.catalog.retention_subjects(region.as_str()).await {
        Ok(subjects) => subjects,
        Err(error) => {
            warn!(region = %region, %error, "retention: cannot list the region's projects; the next run retries");
            node.metrics.retention_run(region.as_str(), "failed", 0, 0);
            return;
        }
    };
    let default = region_default(&node.settings, region.as_str());
    let mut total = Deleted::default();
    let mut failed_projects = 0u64;
    for subject in &subjects {
        let retention = EffectiveRetention::of(subject.retention, default);
        if !retention.deletes_anything() {
            continue;
        }
        match clean_project(node, region, services, subject, retention).await {
            Ok(deleted) => {
                total.archive_objects += deleted.archive_objects;
                total.warehouse_rows += deleted.warehouse_rows;
            }
            Err(error) => {
                failed_projects += 1;
                warn!(region = %region, project_id = %subject.project_id, %error, "retention: cleaning the project failed; the next run retries");
            }
        }
    }
    let outcome = if failed_projects == 0 { "ok" } else { "failed" };
    node.metrics.retention_run(
        region.as_str(),
        outcome,
        total.archive_objects,
        total.warehouse_rows,
    );
    info!(
        region = %region,
        projects = subjects.len(),
        failed_projects,
        archive_objects = total.archive_objects,
        warehouse_rows = total.warehouse_rows,
        "retention: janitor run done"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_catalog::RetentionSetting;

    const DAY: i64 = MILLIS_PER_DAY;

    #[test]
    fn the_cutoff_is_a_day_start_n_days_before_today() {
        // 2026-12-02T13:00:00Z
        let now = 1_796_216_400_000;
        let today = utc_day_start_ms(now);
        assert_eq!(format_rfc3339_ms(today), "2026-12-02T00:00:00.000Z");
        assert_eq!(cutoff_ms(now, 1), today - DAY);
        assert_eq!(
            format_rfc3339_ms(cutoff_ms(now, 3)),
            "2026-11-29T00:00:00.000Z"
        );
        // Just before midnight the cutoff has not moved yet.
        assert_eq!(cutoff_ms(today + DAY - 1, 3), cutoff_ms(now, 3));
        assert_eq!(cutoff_ms(today + DAY, 3), cutoff_ms(now, 3) + DAY);
    }

    #[test]
    fn the_project_setting_wins_and_the_region_default_stays_off_customer_buckets() {
        let default = RegionRetention {
            warehouse_days: Some(30),
            archive_days: Some(90),
        };
        let nothing_set = EffectiveRetention::of(ProjectRetention::default(), default);
        assert_eq!(nothing_set.warehouse_days, Some(30));
        assert_eq!(nothing_set.archive_days, Some(90));
        assert_eq!(nothing_set.customer_archive_days, None);
        let own = EffectiveRetention::of(
            ProjectRetention {
                warehouse: RetentionSetting::Keep,
                archive: RetentionSetting::Days(7),
            },
            default,
        );
        assert_eq!(own.warehouse_days, None);
        assert_eq!(own.archive_days, Some(7));
        assert_eq!(own.customer_archive_days, Some(7));
        assert!(!EffectiveRetention::default().deletes_anything());
    }

    #[test]
    fn a_replay_may_reach_back_only_as_far_as_both_stores_keep() {
        let now = 1_796_216_400_000;
        let retention = EffectiveRetention {
            warehouse_days: Some(10),
            archive_days: Some(3),
            customer_archive_days: Some(3),
        };
        assert_eq!(
            retention.earliest_replayable_day_ms(now),
            Some(cutoff_ms(now, 3))
        );
        assert_eq!(
            EffectiveRetention::default().earliest_replayable_day_ms(now),
            None
        );
    }
}
