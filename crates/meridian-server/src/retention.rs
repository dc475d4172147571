//! Retention: a project keeps its data in the warehouse and in the archive for as many received
//! days as its settings say (`PATCH /admin/projects/{id}` `{"retention": {...}}`, else the region's
//! default, else for good). Each region's janitor — one node of the region per run, claimed in the
//! catalog — deletes the archive objects of received days past the window (the regional store,
//! and the project's own bucket when the project itself set an archive retention) and the
//! warehouse rows received before it (ClickHouse mutations on every replica of the region), and
//! audits what it deleted (`retention.expired`). `GET /admin/projects/{id}/retention` lists what
//! a run would delete now (a dry run, optionally for other settings) and deletes nothing.
//!
//! Days are whole UTC received-days, the same in both stores: with N days, a day is deleted once
//! it lies more than N days before today (`cutoff = start of today - N days`; everything
//! received before the cutoff goes, everything at or after stays).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use meridian_archive::ObjectStore;
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, ProjectRetention, RetentionSetting};
use meridian_core::RegionId;
use meridian_core::timestamp::{MILLIS_PER_DAY, format_rfc3339_ms, now_unix_ms, utc_day_start_ms};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::authorized_project;
use crate::auth::{AdminAuth, Role};
use crate::config::{RegionRetention, Settings};
use crate::error::{ApiError, ApiPath};
use crate::project_archive::{StoreKind, bounded, stores_of_project};
use crate::routes::ApiRoutes;
use crate::state::{AppState, RegionServices};

/// How often a node asks whether its regions' janitor runs are due (a change of retention on
/// this node wakes it at once).
const RETENTION_POLL: Duration = Duration::from_secs(10);
/// Objects a dry run names at most (the count is always whole).
const LISTED_OBJECTS_LIMIT: usize = 1000;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new().add(
        Method::GET,
        "/admin/projects/{project_id}/retention",
        preview_retention,
    )
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

/// A project's retention as the admin API shows it: what applies, and what the project set.
pub fn retention_json(settings: &Settings, region: &str, retention: ProjectRetention) -> Value {
    let default = region_default(settings, region);
    let effective = EffectiveRetention::of(retention, default);
    json!({
        "warehouse_days": effective.warehouse_days,
        "archive_days": effective.archive_days,
        "project_settings": {
            "warehouse_days": retention.warehouse.to_json(),
            "archive_days": retention.archive.to_json(),
        },
        "region_default": {
            "warehouse_days": default.warehouse_days,
            "archive_days": default.archive_days,
        },
    })
}

fn parse_setting(field: &str, value: &Value) -> Result<RetentionSetting, ApiError> {
    let invalid = || {
        ApiError::bad_request(
            "invalid_request",
            format!(
                "`retention.{field}` must be a number of days (1 to {}), null or \"keep\" (kept for good), or \"region_default\"",
                meridian_catalog::MAX_RETENTION_DAYS
            ),
        )
    };
    match value {
        Value::Null => Ok(RetentionSetting::Keep),
        Value::String(text) if text == "keep" => Ok(RetentionSetting::Keep),
        Value::String(text) if text == "region_default" => Ok(RetentionSetting::RegionDefault),
        Value::Number(number) => {
            let days = number.as_u64().ok_or_else(invalid)?;
            if !(1..=u64::from(meridian_catalog::MAX_RETENTION_DAYS)).contains(&days) {
                return Err(invalid());
            }
            Ok(RetentionSetting::Days(days as u32))
        }
        _ => Err(invalid()),
    }
}

/// Applies a PATCH body's `retention` object to the current settings: a field it names is
/// replaced, a field it leaves out stays as it was.
pub fn parse_retention_change(
    current: ProjectRetention,
    change: &Value,
) -> Result<ProjectRetention, ApiError> {
    let Value::Object(fields) = change else {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`retention` must be an object: {\"warehouse_days\": 30, \"archive_days\": 365}",
        ));
    };
    let mut updated = current;
    for (field, value) in fields {
        match field.as_str() {
            "warehouse_days" => updated.warehouse = parse_setting(field, value)?,
            "archive_days" => updated.archive = parse_setting(field, value)?,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_request",
                    format!(
                        "`retention.{field}` is not a retention setting; use `warehouse_days` and `archive_days`"
                    ),
                ));
            }
        }
    }
    Ok(updated)
}

/// An archive object past its project's retention.
struct ExpiredObject {
    kind: StoreKind,
    store: Arc<dyn ObjectStore>,
    key: String,
    day_start_ms: i64,
}

/// What is past a project's retention now.
#[derive(Default)]
struct Expired {
    warehouse_cutoff_ms: Option<i64>,
    archive_cutoff_ms: Option<i64>,
    customer_archive_cutoff_ms: Option<i64>,
    objects: Vec<ExpiredObject>,
    /// Rows received before the warehouse cutoff, per received day.
    warehouse_rows_by_day: Vec<(i64, u64)>,
}

impl Expired {
    fn warehouse_rows(&self) -> u64 {
        self.warehouse_rows_by_day
            .iter()
            .map(|(_, rows)| rows)
            .sum()
    }
}

fn day_text(day_start_ms: i64) -> String {
    format_rfc3339_ms(day_start_ms)[..10].to_string()
}

async fn find_expired(
    state: &AppState,
    region: &RegionId,
    services: &RegionServices,
    project_id: &str,
    retention: EffectiveRetention,
    now_ms: i64,
) -> Result<Expired, String> {
    let mut expired = Expired {
        warehouse_cutoff_ms: retention.warehouse_days.map(|days| cutoff_ms(now_ms, days)),
        archive_cutoff_ms: retention.archive_days.map(|days| cutoff_ms(now_ms, days)),
        customer_archive_cutoff_ms: retention
            .customer_archive_days
            .map(|days| cutoff_ms(now_ms, days)),
        ..Expired::default()
    };
    if expired.archive_cutoff_ms.is_some() || expired.customer_archive_cutoff_ms.is_some() {
        for project_store in stores_of_project(state, region, services, project_id).await? {
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviewQuery {
    warehouse_days: Option<String>,
    archive_days: Option<String>,
}

fn parse_query_setting(field: &str, text: &str) -> Result<RetentionSetting, ApiError> {
    let value = match text.parse::<u64>() {
        Ok(days) => json!(days),
        Err(_) => json!(text),
    };
    parse_setting(field, &value)
}

/// The dry run: what the janitor would delete of the project now, under its settings or under
/// the settings given in the query (`?warehouse_days=30&archive_days=keep`). Deletes nothing.
async fn preview_retention(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    // Parsed here, not by axum's extractor, so that a bad query gets this API's error body.
    let axum::extract::Query(query) = axum::extract::Query::<PreviewQuery>::try_from_uri(&uri)
        .map_err(|error| ApiError::bad_request("invalid_request", error.body_text()))?;
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let mut retention = state.catalog.retention_of(&project_id).await?;
    if let Some(text) = &query.warehouse_days {
        retention.warehouse = parse_query_setting("warehouse_days", text)?;
    }
    if let Some(text) = &query.archive_days {
        retention.archive = parse_query_setting("archive_days", text)?;
    }
    let region = RegionId::parse(&project.region)
        .map_err(|error| ApiError::unavailable("region_not_served", error.to_string(), 5))?;
    let Some(services) = state.region_services.get(&region) else {
        return Err(ApiError::unavailable(
            "region_not_served",
            format!(
                "this node does not serve {region}, where project {project_id}'s data is: ask a node of that region"
            ),
            5,
        ));
    };
    let effective =
        EffectiveRetention::of(retention, region_default(&state.settings, &project.region));
    let now_ms = now_unix_ms();
    let expired = find_expired(&state, &region, services, &project_id, effective, now_ms)
        .await
        .map_err(|error| {
            ApiError::unavailable(
                "store_unavailable",
                format!("the region's stores could not be listed: {error}"),
                5,
            )
        })?;
    let listed: Vec<Value> = expired
        .objects
        .iter()
        .take(LISTED_OBJECTS_LIMIT)
        .map(|object| {
            json!({"store": object.kind.as_str(), "key": object.key, "day": day_text(object.day_start_ms)})
        })
        .collect();
    let body = json!({
        "project_id": project_id,
        "region": project.region,
        "dry_run": true,
        "as_of": format_rfc3339_ms(now_ms),
        "retention": retention_json(&state.settings, &project.region, retention),
        "warehouse": {
            "days": effective.warehouse_days,
            "cutoff": expired.warehouse_cutoff_ms.map(format_rfc3339_ms),
            "has_warehouse": services.clickhouse.is_some(),
            "rows": expired.warehouse_rows(),
            "by_day": expired.warehouse_rows_by_day.iter()
                .map(|(day, rows)| json!({"day": day_text(*day), "rows": rows}))
                .collect::<Vec<_>>(),
        },
        "archive": {
            "days": effective.archive_days,
            "cutoff": expired.archive_cutoff_ms.map(format_rfc3339_ms),
            "customer_bucket_days": effective.customer_archive_days,
            "customer_bucket_cutoff": expired.customer_archive_cutoff_ms.map(format_rfc3339_ms),
            "objects": expired.objects.len(),
            "listed": listed,
            "listed_omitted": expired.objects.len().saturating_sub(LISTED_OBJECTS_LIMIT),
        },
    });
    Ok(axum::Json(body).into_response())
}

/// What one project's cleaning deleted.
#[derive(Clone, Copy, Debug, Default)]
struct Deleted {
    archive_objects: u64,
    warehouse_rows: u64,
}

/// Deletes what is past the project's retention, then audits it (nothing deleted: no entry).
async fn clean_project(
    state: &AppState,
    region: &RegionId,
    services: &RegionServices,
    subject: &meridian_catalog::RetentionSubject,
    retention: EffectiveRetention,
) -> Result<Deleted, String> {
    let now_ms = now_unix_ms();
    let project_id = subject.project_id.as_str();
    let expired = find_expired(state, region, services, project_id, retention, now_ms).await?;
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
    let janitor = Actor::system(&format!("retention-janitor/{}", state.node_id));
    state
        .stores
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
async fn janitor_pass(state: &AppState, region: &RegionId) {
    let Some(services) = state.region_services.get(region) else {
        return;
    };
    let subjects = match state.catalog.retention_subjects(region.as_str()).await {
        Ok(subjects) => subjects,
        Err(error) => {
            warn!(region = %region, %error, "retention: cannot list the region's projects; the next run retries");
            state.metrics.retention_run(region.as_str(), "failed", 0, 0);
            return;
        }
    };
    let default = region_default(&state.settings, region.as_str());
    let mut total = Deleted::default();
    let mut failed_projects = 0u64;
    for subject in &subjects {
        let retention = EffectiveRetention::of(subject.retention, default);
        if !retention.deletes_anything() {
            continue;
        }
        match clean_project(state, region, services, subject, retention).await {
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
    state.metrics.retention_run(
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

/// Runs each served region's janitor when its turn is due and this node claims it, until `stop`.
pub async fn run_retention_janitor(state: AppState, mut stop: watch::Receiver<bool>) {
    let regions: Vec<RegionId> = state.region_services.keys().cloned().collect();
    if regions.is_empty() {
        return;
    }
    let interval = state.settings.retention_janitor_interval;
    let interval_ms = interval.as_millis() as i64;
    loop {
        for region in &regions {
            let now_ms = now_unix_ms();
            let claimed = state
                .catalog
                .claim_retention_run(
                    region.as_str(),
                    &state.node_id,
                    now_ms,
                    now_ms + interval_ms,
                )
                .await;
            match claimed {
                Ok(true) => {
                    // Stopped: deletions are idempotent, the next run finishes what this began.
                    let finished =
                        crate::background::unless_stopped(&mut stop, janitor_pass(&state, region))
                            .await;
                    if finished.is_none() {
                        return;
                    }
                }
                Ok(false) => {}
                Err(error) => {
                    warn!(region = %region, %error, "retention: cannot claim the janitor run; retrying")
                }
            }
        }
        let poll = RETENTION_POLL.min(interval);
        if !crate::background::next_round(&mut stop, poll, &state.retention_changed).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_change_replaces_only_the_fields_it_names() {
        let current = ProjectRetention {
            warehouse: RetentionSetting::Days(30),
            archive: RetentionSetting::RegionDefault,
        };
        let changed = parse_retention_change(current, &json!({"archive_days": 365})).unwrap();
        assert_eq!(changed.warehouse, RetentionSetting::Days(30));
        assert_eq!(changed.archive, RetentionSetting::Days(365));
        let kept = parse_retention_change(
            current,
            &json!({"warehouse_days": null, "archive_days": "keep"}),
        )
        .unwrap();
        assert_eq!(kept.warehouse, RetentionSetting::Keep);
        assert_eq!(kept.archive, RetentionSetting::Keep);
        let reset =
            parse_retention_change(current, &json!({"warehouse_days": "region_default"})).unwrap();
        assert_eq!(reset.warehouse, RetentionSetting::RegionDefault);
        for bad in [
            json!({"warehouse_days": 0}),
            json!({"warehouse_days": -3}),
            json!({"warehouse_days": 2.5}),
            json!({"warehouse_days": 36_501}),
            json!({"archive_days": "forever"}),
            json!({"ttl": 3}),
            json!(30),
        ] {
            assert!(
                parse_retention_change(current, &bad).is_err(),
                "{bad} must be refused"
            );
        }
    }
}
