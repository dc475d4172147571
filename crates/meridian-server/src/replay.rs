//! Replays: `POST /admin/projects/{id}/replays` re-reads the project's archive objects of a
//! received-day range (the regional store, and the project's own bucket when it has one) and
//! inserts into the region's ClickHouse every message the warehouse does not have. Every node runs
//! an executor that claims replays of the regions it serves (a lease in the catalog), so a replay
//! runs only in the project's region. Objects are worked through in name order and the last one
//! finished is persisted, so a replay resumes after a kill -9 where it stopped; an object begun
//! twice inserts nothing twice (the warehouse is asked which messages it has before each insert).
//! Users deleted since are never brought back (the sink's erasure filter applies), and a replay is
//! refused while a deletion of the project is pending or running.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_archive::ObjectStore;
use meridian_archive::layout::decode_object;
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, Replay, ReplayStatus};
use meridian_core::RegionId;
use meridian_core::timestamp::{
    format_rfc3339_ms, now_unix_ms, parse_timestamp_ms, utc_day_start_ms,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{actor, authorized_project, parse_body};
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::project_archive::{ProjectStore, bounded, object_token, stores_of_project};
use crate::routes::ApiRoutes;
use crate::state::AppState;

const LEASE: Duration = Duration::from_secs(60);

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
    let retention = state.catalog.retention_of(&project_id).await?;
    let effective = crate::retention::EffectiveRetention::of(
        retention,
        crate::retention::region_default(&state.settings, &project.region),
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
        .and_then(|region| state.settings.regions.get(&region))
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
        .stores
        .of_project(&project)?
        .create_replay(
            &project,
            from_day_ms,
            to_day_ms,
            &actor(&claims, &request_id),
        )
        .await?;
    state.replay_requested.notify_one();
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

/// Claims and carries out replays of the served regions until `stop`.
pub async fn run_replay_executor(state: AppState, mut stop: watch::Receiver<bool>) {
    if state.stores.stores().is_empty() {
        return;
    }
    loop {
        let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
        let mut claimed = Ok(None);
        for store in state.stores.stores() {
            claimed = store
                .catalog
                .claim_replay(&state.node_id, &store.region_names(), lease_until_ms)
                .await;
            if !matches!(claimed, Ok(None)) {
                break;
            }
        }
        match claimed {
            Ok(Some(replay)) => {
                let replay_id = replay.replay_id.clone();
                let region = replay.region.clone();
                // Stopped: the lease lapses and this node (or another) resumes after the last
                // object.
                let Some(outcome) =
                    crate::background::unless_stopped(&mut stop, execute(&state, replay)).await
                else {
                    return;
                };
                if let Err(failure) = outcome {
                    warn!(%replay_id, error = %failure, "replay step failed; it will be retried");
                    if let Ok(store) = state.stores.of_region(&region) {
                        let _ = store.record_replay_error(&replay_id, &failure).await;
                    }
                    if !crate::background::back_off(&mut stop, Duration::from_secs(5)).await {
                        return;
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot look for replays; retrying"),
        }
        let poll = state.settings.gdpr_poll_interval;
        if !crate::background::next_round(&mut stop, poll, &state.replay_requested).await {
            return;
        }
    }
}

/// One archive object to replay, named for the progress record as `<store>:<key>`.
struct ReplayObject {
    store: Arc<dyn ObjectStore>,
    key: String,
    label: String,
}

/// The project's archive objects of the replay's days, in every store that holds its archive,
/// in the order the progress record counts them.
async fn objects_to_replay(
    state: &AppState,
    region: &RegionId,
    services: &crate::state::RegionServices,
    replay: &Replay,
) -> Result<Vec<ReplayObject>, String> {
    let stores = stores_of_project(state, region, services, &replay.project_id).await?;
    let mut objects = Vec::new();
    for ProjectStore {
        kind,
        store,
        prefix,
    } in stores
    {
        let name = kind.as_str();
        let listed = bounded(
            &format!("listing the {name} archive"),
            list_project_objects(
                store.as_ref(),
                prefix.as_deref(),
                &replay.project_id,
                Some((replay.from_day_ms, replay.to_day_ms)),
            ),
        )
        .await?;
        for object in listed {
            objects.push(ReplayObject {
                store: Arc::clone(&store),
                label: format!("{name}:{}", object.key),
                key: object.key,
            });
        }
    }
    objects.sort_by(|left, right| left.label.cmp(&right.label));
    Ok(objects)
}

async fn execute(state: &AppState, replay: Replay) -> Result<(), String> {
    let region = RegionId::parse(&replay.region).map_err(|error| error.to_string())?;
    let Some(services) = state.region_services.get(&region).cloned() else {
        return Err(format!("region {region} is not served here"));
    };
    let store = state
        .stores
        .of_region(&replay.region)
        .map_err(|error| error.to_string())?
        .clone();
    let executor = Actor::system(&format!("replay-executor/{}", state.node_id));
    let finish = |status: ReplayStatus, error: Option<String>| {
        let store = store.clone();
        let replay_id = replay.replay_id.clone();
        let executor = executor.clone();
        async move {
            store
                .finish_replay(&replay_id, status, error.as_deref(), &executor)
                .await
                .map_err(|error| error.to_string())
        }
    };
    if replay.cancel_requested {
        finish(ReplayStatus::Cancelled, None).await?;
        return Ok(());
    }
    let Some(clickhouse) = services.clickhouse.clone() else {
        finish(
            ReplayStatus::Failed,
            Some(format!("region {region} has no ClickHouse configured")),
        )
        .await?;
        return Ok(());
    };
    let objects = objects_to_replay(state, &region, &services, &replay).await?;
    let mut progress = replay.progress.clone();
    progress.objects_total = objects.len() as i64;
    let rate = state.settings.replay_max_messages_per_second as f64;
    let started = Instant::now();
    let mut messages_this_run = 0u64;
    for object in objects {
        let already_done = progress
            .last_object
            .as_deref()
            .is_some_and(|last| object.label.as_str() <= last);
        if already_done {
            continue;
        }
        let body = bounded(
            &format!("reading {}", object.key),
            object.store.get(&object.key),
        )
        .await?;
        // Gone since it was listed (a retention or a deletion rewrite): nothing to replay in it.
        let messages = match body {
            Some(body) => decode_object(&object.key, &body).map_err(|error| error.to_string())?,
            None => Vec::new(),
        };
        let source = format!(
            "replay-{}-{}",
            replay.replay_id,
            object_token(&object.label)
        );
        let outcome = clickhouse
            .replay_messages(&source, &replay.project_id, messages)
            .await
            .map_err(|error| format!("inserting {}: {error}", object.key))?;
        progress.objects_done += 1;
        progress.last_object = Some(object.label.clone());
        progress.messages_read += outcome.read as i64;
        progress.messages_inserted += outcome.inserted as i64;
        progress.messages_present += outcome.present as i64;
        progress.messages_erased += outcome.erased as i64;
        progress.messages_refused += outcome.refused as i64;
        let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
        let stored = store
            .record_replay_progress(&replay.replay_id, &state.node_id, &progress, lease_until_ms)
            .await
            .map_err(|error| error.to_string())?;
        if stored.cancel_requested {
            let cancelled = finish(ReplayStatus::Cancelled, None).await?;
            info!(replay_id = %cancelled.replay_id, objects_done = progress.objects_done, "replay cancelled");
            return Ok(());
        }
        // Live ingest keeps priority: at most `replay.max_messages_per_second` on this node.
        messages_this_run += outcome.read;
        let due = Duration::from_secs_f64(messages_this_run as f64 / rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
    let finished = finish(ReplayStatus::Done, None).await?;
    info!(
        replay_id = %finished.replay_id,
        project_id = %finished.project_id,
        region = %finished.region,
        messages_read = progress.messages_read,
        messages_inserted = progress.messages_inserted,
        messages_present = progress.messages_present,
        messages_erased = progress.messages_erased,
        "replay done"
    );
    Ok(())
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
