//! Replays: `POST /admin/projects/{id}/replays` re-reads the project's archive objects of a
//! received-day range (the regional store, and the project's own bucket when it has one) and
//! inserts into the region's ClickHouse every message the warehouse does not have. Every node runs
//! an executor that claims replays of the regions it serves (a lease in the catalog), so a replay
//! runs only in the project's region. Objects are worked through in name order and the last one
//! finished is persisted, so a replay resumes after a kill -9 where it stopped; an object begun
//! twice inserts nothing twice (the warehouse is asked which messages it has before each insert).
//! Users deleted since are never brought back (the sink's erasure filter applies), and a replay is
//! refused while a deletion of the project is pending or running.

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::Replay;
use meridian_core::RegionId;
use meridian_core::timestamp::{
    format_rfc3339_ms, now_unix_ms, parse_timestamp_ms, utc_day_start_ms,
};
use serde_json::{Value, json};
use tracing::info;

use super::access::{actor, authorized_project, parse_body};
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::POST,
            "/admin/projects/{project_id}/replays",
            start_replay,
        )
        .add(
            Method::GET,
            "/admin/projects/{project_id}/replays",
            list_replays,
        )
        .add(Method::GET, "/admin/replays/{replay_id}", get_replay)
        .add(
            Method::POST,
            "/admin/replays/{replay_id}/cancel",
            cancel_replay,
        )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    from: String,
    to: String,
}

fn days_text(days: Option<u32>) -> String {
    match days {
        Some(days) => days.to_string(),
        None => "all".to_string(),
    }
}

/// The UTC day a `from`/`to` names: a date (`2026-11-30`) or an RFC 3339 timestamp.
fn parse_day(field: &str, text: &str) -> Result<i64, ApiError> {
    let as_timestamp = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    parse_timestamp_ms(&as_timestamp)
        .map(utc_day_start_ms)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request",
                format!(
                    "`{field}` must be a date (2026-11-30) or an RFC 3339 timestamp, not `{text}`"
                ),
            )
        })
}

pub fn replay_json(replay: &Replay) -> Value {
    let progress = &replay.progress;
    json!({
        "replay_id": replay.replay_id,
        "project_id": replay.project_id,
        "region": replay.region,
        "from": format_rfc3339_ms(replay.from_day_ms),
        "to": format_rfc3339_ms(replay.to_day_ms),
        "status": replay.status.as_str(),
        "cancel_requested": replay.cancel_requested,
        "objects_total": progress.objects_total,
        "objects_done": progress.objects_done,
        "messages_read": progress.messages_read,
        "messages_inserted": progress.messages_inserted,
        "messages_present": progress.messages_present,
        "messages_erased": progress.messages_erased,
        "messages_refused": progress.messages_refused,
        "error": replay.error,
        "created_at": format_rfc3339_ms(replay.created_at_ms),
        "started_at": replay.started_at_ms.map(format_rfc3339_ms),
        "finished_at": replay.finished_at_ms.map(format_rfc3339_ms),
    })
}

async fn start_replay(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let request: ReplayRequest = parse_body(&body)?;
    let from_day_ms = parse_day("from", &request.from)?;
    let to_day_ms = parse_day("to", &request.to)?;
    if from_day_ms > to_day_ms {
        return Err(ApiError::bad_request(
            "invalid_request",
            "`from` is after `to`: the range is empty",
        ));
    }
    let retention = state.node.catalog.retention_of(&project_id).await?;
    let effective = meridian_node::jobs::retention::EffectiveRetention::of(
        retention,
        meridian_node::jobs::retention::region_default(&state.node.settings, &project.region),
    );
    if let Some(earliest) = effective.earliest_replayable_day_ms(now_unix_ms())
        && from_day_ms < earliest
    {
        return Err(ApiError::bad_request(
            "beyond_retention",
            format!(
                "project {project_id} keeps {} days in the warehouse and {} in the archive: the first day a replay can reach is {}, `from` is {}",
                days_text(effective.warehouse_days),
                days_text(effective.archive_days),
                &format_rfc3339_ms(earliest)[..10],
                &format_rfc3339_ms(from_day_ms)[..10],
            ),
        ));
    }
    let has_clickhouse = RegionId::parse(&project.region)
        .ok()
        .and_then(|region| state.node.settings.regions.get(&region))
        .is_some_and(|region| region.clickhouse.is_some());
    if !has_clickhouse {
        return Err(ApiError::conflict(
            "no_warehouse",
            format!(
                "region {} has no ClickHouse configured: there is nothing to replay into",
                project.region
            ),
        ));
    }
    let replay = state
        .node
        .stores
        .of_project(&project)?
        .create_replay(
            &project,
            from_day_ms,
            to_day_ms,
            &actor(&claims, &request_id),
        )
        .await?;
    state.node.wakers.replay_requested.notify_one();
    info!(replay_id = %replay.replay_id, project_id, region = %replay.region, from = %request.from, to = %request.to, "replay requested");
    Ok((StatusCode::ACCEPTED, axum::Json(replay_json(&replay))).into_response())
}

/// The project's latest 50 replays, newest first.
async fn list_replays(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let replays = state
        .node
        .stores
        .of_project(&project)?
        .recent_replays(&project_id, 50)
        .await?;
    let items: Vec<Value> = replays.iter().map(replay_json).collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

/// The replay, once the caller may see its org.
async fn authorized_replay(
    state: &AppState,
    claims: &crate::auth::Claims,
    replay_id: &str,
) -> Result<Replay, ApiError> {
    let replay = state
        .node
        .stores
        .find_replay(replay_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("replay `{replay_id}` does not exist")))?;
    claims.require(
        &replay.org_id,
        Role::Admin,
        &format!("replay `{replay_id}`"),
    )?;
    Ok(replay)
}

async fn get_replay(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(replay_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let replay = authorized_replay(&state, &claims, &replay_id).await?;
    Ok(axum::Json(replay_json(&replay)).into_response())
}

async fn cancel_replay(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(replay_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let replay = authorized_replay(&state, &claims, &replay_id).await?;
    let replay = state
        .node
        .stores
        .of_region(&replay.region)?
        .cancel_replay(&replay_id, &actor(&claims, &request_id))
        .await?;
    info!(
        replay_id,
        status = replay.status.as_str(),
        "replay cancel requested"
    );
    Ok(axum::Json(replay_json(&replay)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_is_a_date_or_a_timestamp_and_names_its_utc_day() {
        let day = parse_day("from", "2026-11-30").unwrap();
        assert_eq!(format_rfc3339_ms(day), "2026-11-30T00:00:00.000Z");
        assert_eq!(parse_day("to", "2026-11-30T23:59:59+00:00").unwrap(), day);
        assert_eq!(
            parse_day("to", "2026-12-01T01:00:00+02:00").unwrap(),
            day,
            "the UTC day of the instant"
        );
        assert!(parse_day("from", "yesterday").is_err());
        assert!(parse_day("from", "2026-13-01").is_err());
    }
}
