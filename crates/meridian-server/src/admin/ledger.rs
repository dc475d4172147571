//! The delivery ledger (`GET /admin/projects/{id}/ledger?from&to`): per received day (UTC), the
//! project's messages acknowledged, suppressed at ingest, in the archive, in the warehouse,
//! erased by GDPR deletions since, still queued, and whether the day reconciles — every queued
//! message in every store of the region. Answered from the region's own store by a node of the
//! project's region only (elsewhere 503 `region_not_served`, like insights).

use axum::extract::State;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms, utc_day_start_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::{authorized_project, served_region};
use super::insights::parse_time;
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;

const DAY_MS: i64 = 86_400_000;
/// Days shown when `from` is not given (today and the six before).
const DEFAULT_DAYS: i64 = 7;
const MAX_DAYS: i64 = 366;

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new().add(Method::GET, "/admin/projects/{project_id}/ledger", ledger)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerQuery {
    from: Option<String>,
    to: Option<String>,
}

/// `[from_day, to_day]`, both day starts: `to` defaults to today, `from` to six days before it.
fn parse_days(uri: &Uri) -> Result<(i64, i64), ApiError> {
    let query = axum::extract::Query::<LedgerQuery>::try_from_uri(uri)
        .map(|axum::extract::Query(query)| query)
        .map_err(|error| ApiError::bad_request("invalid_request", error.body_text()))?;
    let to_day_ms = match &query.to {
        Some(text) => utc_day_start_ms(parse_time("to", text)?),
        None => utc_day_start_ms(now_unix_ms()),
    };
    let from_day_ms = match &query.from {
        Some(text) => utc_day_start_ms(parse_time("from", text)?),
        None => to_day_ms - (DEFAULT_DAYS - 1) * DAY_MS,
    };
    if from_day_ms > to_day_ms {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`from` must not be after `to`",
        ));
    }
    if (to_day_ms - from_day_ms) / DAY_MS + 1 > MAX_DAYS {
        return Err(ApiError::bad_request(
            "range_too_long",
            format!("the ledger shows at most {MAX_DAYS} days at once"),
        ));
    }
    Ok((from_day_ms, to_day_ms))
}

async fn ledger(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let (from_day_ms, to_day_ms) = parse_days(&uri)?;
    let project = authorized_project(&state, &claims, &project_id, Role::Member).await?;
    let services = served_region(&state, &project)?;
    let with_warehouse = services.clickhouse.is_some();
    let store = state.node.stores.of_region(&project.region)?;
    let recorded = store
        .ledger_days(&project_id, from_day_ms, to_day_ms)
        .await?;
    let mut recorded = recorded.into_iter().peekable();
    let mut days = Vec::new();
    let mut day_ms = from_day_ms;
    while day_ms <= to_day_ms {
        let day = match recorded.peek() {
            Some(day) if day.day_start_ms == day_ms => recorded.next().unwrap_or_default(),
            _ => meridian_catalog::LedgerDay::default(),
        };
        days.push(day_json(day_ms, &day, with_warehouse));
        day_ms += DAY_MS;
    }
    Ok(axum::Json(json!({
        "project_id": project_id,
        "region": project.region,
        "days": days,
    }))
    .into_response())
}

/// One day as the API shows it: `queued` is what some store has not taken yet; the day
/// reconciles when nothing is.
fn day_json(day_ms: i64, day: &meridian_catalog::LedgerDay, with_warehouse: bool) -> Value {
    let queued_messages = day.acknowledged.saturating_sub(day.suppressed);
    let mut stored_everywhere = day.archived;
    if with_warehouse {
        stored_everywhere = stored_everywhere.min(day.warehouse);
    }
    let queued = queued_messages.saturating_sub(stored_everywhere);
    json!({
        "day": &format_rfc3339_ms(day_ms)[..10],
        "acknowledged": day.acknowledged,
        "suppressed": day.suppressed,
        "archived": day.archived,
        "warehouse": if with_warehouse { json!(day.warehouse) } else { Value::Null },
        "erased": day.erased,
        "queued": queued,
        "reconciled": queued == 0,
    })
}
