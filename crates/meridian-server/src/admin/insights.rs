//! Insights, in the project's region only: events per day or hour
//! (`GET /admin/projects/{id}/insights/volume?from&to&interval=day|hour`) and the most frequent
//! events (`GET /admin/projects/{id}/insights/events?from&to&limit`), by event time (UTC), from
//! the region's warehouse. A node of another region answers 503 `region_not_served` with the
//! project's region (and its public URL when configured): a question never crosses regions.
//! Ranges are bounded (a volume series has at most 366 days or 744 hours), and so is what the
//! warehouse may read for one question (`[insights]`): past it the answer is 422 `too_much_data`.

use axum::extract::State;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use meridian_clickhouse::{InsightsError, InsightsRange, Interval};
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms, parse_timestamp_ms};
use serde::Deserialize;
use serde_json::json;

use super::access::{authorized_project, served_region};
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;

const MAX_DAY_BUCKETS: i64 = 366;
const MAX_HOUR_BUCKETS: i64 = 744;
const DEFAULT_TOP_EVENTS: u32 = 10;
const MAX_TOP_EVENTS: u32 = 100;
const DAY_MS: i64 = 86_400_000;

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::GET,
            "/admin/projects/{project_id}/insights/volume",
            volume,
        )
        .add(
            Method::GET,
            "/admin/projects/{project_id}/insights/events",
            top_events,
        )
}

#[derive(Debug, Default, Deserialize)]
struct InsightsQuery {
    from: Option<String>,
    to: Option<String>,
    interval: Option<String>,
    limit: Option<String>,
}

fn parse_query(uri: &Uri) -> Result<InsightsQuery, ApiError> {
    axum::extract::Query::<InsightsQuery>::try_from_uri(uri)
        .map(|axum::extract::Query(query)| query)
        .map_err(|error| ApiError::bad_request("invalid_request", error.body_text()))
}

/// A time of the query: an RFC 3339 timestamp, or a date (`2026-12-01`: its UTC midnight).
pub(super) fn parse_time(field: &str, text: &str) -> Result<i64, ApiError> {
    let timestamp = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    parse_timestamp_ms(&timestamp).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            format!("`{field}` must be an RFC 3339 time or a date (YYYY-MM-DD), not `{text}`"),
        )
    })
}

/// `[from, to)`: `to` defaults to now, `from` to `default_span_ms` before `to`; at most
/// `max_span_ms` long.
fn parse_range(
    query: &InsightsQuery,
    default_span_ms: i64,
    max_span_ms: i64,
) -> Result<(i64, i64), ApiError> {
    let to_ms = match &query.to {
        Some(text) => parse_time("to", text)?,
        None => now_unix_ms(),
    };
    let from_ms = match &query.from {
        Some(text) => parse_time("from", text)?,
        None => to_ms - default_span_ms,
    };
    if from_ms >= to_ms {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`from` must be before `to`",
        ));
    }
    if to_ms - from_ms > max_span_ms {
        return Err(ApiError::bad_request(
            "range_too_long",
            format!(
                "the range may span at most {} days for this question",
                max_span_ms / DAY_MS
            ),
        ));
    }
    Ok((from_ms, to_ms))
}

fn insights_error(error: InsightsError) -> ApiError {
    match error {
        InsightsError::TooMuchData { .. } | InsightsError::TooSlow { .. } => ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            "too_much_data",
            error.to_string(),
        ),
        InsightsError::NoWarehouse => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "no_warehouse",
            "the project's region has no ClickHouse warehouse configured",
        ),
        InsightsError::Unavailable(_) => {
            tracing::warn!(%error, "an insights question failed");
            ApiError::unavailable(
                "warehouse_unavailable",
                "the region's warehouse did not answer; try again shortly",
                5,
            )
        }
    }
}

async fn volume(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = parse_query(&uri)?;
    let project = authorized_project(&state, &claims, &project_id, Role::Member).await?;
    let interval = match query.interval.as_deref() {
        None => Interval::Day,
        Some(text) => Interval::parse(text).ok_or_else(|| {
            ApiError::bad_request("invalid_request", "`interval` must be `day` or `hour`")
        })?,
    };
    let (default_span_ms, max_span_ms) = match interval {
        Interval::Day => (30 * DAY_MS, MAX_DAY_BUCKETS * DAY_MS),
        Interval::Hour => (DAY_MS, MAX_HOUR_BUCKETS * Interval::Hour.millis()),
    };
    let (from_ms, to_ms) = parse_range(&query, default_span_ms, max_span_ms)?;
    let services = served_region(&state, &project)?;
    let Some(warehouse) = &services.clickhouse else {
        return Err(insights_error(InsightsError::NoWarehouse));
    };
    let range = InsightsRange {
        project_id: project_id.clone(),
        from_ms,
        to_ms,
    };
    let points = warehouse
        .volume(&range, interval, state.node.settings.insights_limits)
        .await
        .map_err(insights_error)?;
    // Every bucket of the range, the empty ones as zeros: a chart draws what it gets.
    let step = interval.millis();
    let mut series = Vec::new();
    let mut bucket_ms = from_ms - from_ms.rem_euclid(step);
    let mut found = points.iter().peekable();
    while bucket_ms < to_ms {
        let (events, users) = match found.peek() {
            Some(point) if i64::from(point.start_seconds) * 1000 == bucket_ms => {
                let point = found.next().map(|point| (point.events, point.users));
                point.unwrap_or((0, 0))
            }
            _ => (0, 0),
        };
        series.push(json!({
            "start": format_rfc3339_ms(bucket_ms),
            "events": events,
            "users": users,
        }));
        bucket_ms += step;
    }
    Ok(axum::Json(json!({
        "project_id": project_id,
        "region": project.region,
        "from": format_rfc3339_ms(from_ms),
        "to": format_rfc3339_ms(to_ms),
        "interval": match interval { Interval::Day => "day", Interval::Hour => "hour" },
        "series": series,
    }))
    .into_response())
}

async fn top_events(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query = parse_query(&uri)?;
    let project = authorized_project(&state, &claims, &project_id, Role::Member).await?;
    let limit = match query.limit.as_deref() {
        None => DEFAULT_TOP_EVENTS,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_TOP_EVENTS).contains(limit))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_request",
                    format!("`limit` must be 1 to {MAX_TOP_EVENTS}"),
                )
            })?,
    };
    let (from_ms, to_ms) = parse_range(&query, 7 * DAY_MS, MAX_DAY_BUCKETS * DAY_MS)?;
    let services = served_region(&state, &project)?;
    let Some(warehouse) = &services.clickhouse else {
        return Err(insights_error(InsightsError::NoWarehouse));
    };
    let range = InsightsRange {
        project_id: project_id.clone(),
        from_ms,
        to_ms,
    };
    let events = warehouse
        .top_events(&range, limit, state.node.settings.insights_limits)
        .await
        .map_err(insights_error)?;
    let events: Vec<_> = events
        .into_iter()
        .map(|total| json!({"event": total.event, "events": total.events, "users": total.users}))
        .collect();
    Ok(axum::Json(json!({
        "project_id": project_id,
        "region": project.region,
        "from": format_rfc3339_ms(from_ms),
        "to": format_rfc3339_ms(to_ms),
        "events": events,
    }))
    .into_response())
}
