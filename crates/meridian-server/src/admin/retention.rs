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

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use meridian_catalog::{ProjectRetention, RetentionSetting};
use meridian_core::RegionId;
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms};
use serde_json::{Value, json};

use super::access::{authorized_project, served_region};
use crate::auth::{AdminAuth, Role};
use crate::config::Settings;
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;
use meridian_node::jobs::retention::{EffectiveRetention, day_text, find_expired, region_default};

/// How often a node asks whether its regions' janitor runs are due (a change of retention on
/// this node wakes it at once).
/// Objects a dry run names at most (the count is always whole).
const LISTED_OBJECTS_LIMIT: usize = 1000;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new().add(
        Method::GET,
        "/admin/projects/{project_id}/retention",
        preview_retention,
    )
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
    let mut retention = state.node.catalog.retention_of(&project_id).await?;
    if let Some(text) = &query.warehouse_days {
        retention.warehouse = parse_query_setting("warehouse_days", text)?;
    }
    if let Some(text) = &query.archive_days {
        retention.archive = parse_query_setting("archive_days", text)?;
    }
    let services = served_region(&state, &project)?;
    let region = RegionId::parse(&project.region).map_err(|error| {
        ApiError::internal(format!("a stored project has a bad region: {error}"))
    })?;
    let effective = EffectiveRetention::of(
        retention,
        region_default(&state.node.settings, &project.region),
    );
    let now_ms = now_unix_ms();
    let expired = find_expired(
        &state.node,
        &region,
        services,
        &project_id,
        effective,
        now_ms,
    )
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
        "retention": retention_json(&state.node.settings, &project.region, retention),
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

#[cfg(test)]
mod tests {
    use super::*;

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
