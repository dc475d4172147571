//! GDPR: deletion requests and their executor.
//!
//! `POST /admin/projects/{id}/deletions` records the request and suppresses the users at once (new
//! messages of theirs are dropped at the ingress). Every node runs an executor that claims
//! deletions of the regions it serves (a lease in the catalog, so one node works on each; a node
//! keeps its id across restarts and resumes its own leases at once) and carries them out inside
//! the region: `settle` (the key caches learn of the deletion, so sinks stop writing the users'
//! queued messages), `clickhouse` (ALTER TABLE ... DELETE on the region's replicas, verified by
//! a count), `archive` (every object of the project rewritten without the users, in the regional
//! store and the project's own bucket, verified by re-reading), then `done`. Progress is
//! persisted after each step; every step is safe to run twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_archive::ObjectStore;
use meridian_archive::rewrite::{list_project_objects, rewrite_without_users};
use meridian_catalog::{Actor, Deletion, DeletionProgress, DeletionStage, DeletionStatus};
use meridian_core::RegionId;
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{UserIds, actor, authorized_project, parse_body};
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

const LEASE: Duration = Duration::from_secs(60);

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::POST,
            "/admin/projects/{project_id}/deletions",
            request_deletion,
        )
        .add(
            Method::GET,
            "/admin/projects/{project_id}/deletions",
            deletions_of_user,
        )
        .add(Method::GET, "/admin/deletions/{deletion_id}", get_deletion)
}

fn store_status(done: bool, started: bool) -> &'static str {
    match (done, started) {
        (true, _) => "done",
        (false, true) => "running",
        (false, false) => "pending",
    }
}

#[derive(serde::Deserialize)]
struct UserQuery {
    user_id: Option<String>,
}

/// "Was this user deleted, and when?": the project's deletions that covered `?user_id=`, found by
/// recomputing the user's keyed hash (finished deletions keep no user id). Without `user_id`: the
/// project's latest 50 deletions.
async fn deletions_of_user(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let parsed = axum::extract::Query::<UserQuery>::try_from_uri(&uri)
        .map_err(|error| ApiError::bad_request("invalid_request", error.body_text()))?;
    let has_clickhouse = clickhouse_configured(&state, &project.region);
    let Some(user_id) = parsed.0.user_id.filter(|user_id| !user_id.is_empty()) else {
        let deletions = state
            .stores
            .of_project(&project)?
            .recent_deletions(&project_id, 50)
            .await?;
        let items: Vec<Value> = deletions
            .iter()
            .map(|deletion| deletion_json(deletion, has_clickhouse))
            .collect();
        return Ok(axum::Json(json!({"user_id": null, "items": items})).into_response());
    };
    let deletions = state
        .stores
        .of_project(&project)?
        .deletions_of_user(&project_id, &user_id)
        .await?;
    let items: Vec<Value> = deletions
        .iter()
        .map(|deletion| deletion_json(deletion, has_clickhouse))
        .collect();
    Ok(axum::Json(json!({"user_id": user_id, "items": items})).into_response())
}

pub fn deletion_json(deletion: &Deletion, has_clickhouse: Option<bool>) -> Value {
    let stage = deletion.stage;
    let running = deletion.status == DeletionStatus::Running;
    let clickhouse_status = match has_clickhouse {
        Some(false) => "not_configured",
        _ => store_status(
            stage > DeletionStage::Clickhouse,
            running && stage == DeletionStage::Clickhouse,
        ),
    };
    json!({
        "deletion_id": deletion.deletion_id,
        "project_id": deletion.project_id,
        "region": deletion.region,
        "status": deletion.status.as_str(),
        "stage": stage.as_str(),
        "user_count": deletion.user_ids.len(),
        "created_at": format_rfc3339_ms(deletion.created_at_ms),
        "started_at": deletion.started_at_ms.map(format_rfc3339_ms),
        "finished_at": deletion.finished_at_ms.map(format_rfc3339_ms),
        "deadline": format_rfc3339_ms(deletion.deadline_ms),
        "error": deletion.error,
        "stores": {
            "queue": {"status": store_status(stage > DeletionStage::Settle, running)},
            "clickhouse": {"status": clickhouse_status, "rows_deleted": deletion.clickhouse_rows_deleted},
            "archive": {
                "status": store_status(stage > DeletionStage::Archive, running && stage == DeletionStage::Archive),
                "objects_scanned": deletion.archive_objects_scanned,
                "objects_rewritten": deletion.archive_objects_rewritten,
                "messages_removed": deletion.archive_messages_removed,
            },
        },
    })
}

fn clickhouse_configured(state: &AppState, region: &str) -> Option<bool> {
    let region = RegionId::parse(region).ok()?;
    state
        .settings
        .regions
        .get(&region)
        .map(|settings| settings.clickhouse.is_some())
}

async fn request_deletion(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let request: UserIds = parse_body(&body)?;
    crate::admin::validate_user_ids(&request.user_ids)?;
    // Projects this one's data was migrated to hold copies of the users' data: the deletion is
    // requested there too (in their regions), before the project's own.
    let mut also_requested = Vec::new();
    for migration in state.catalog.migrations_started_from(&project_id).await? {
        // A migration's target always exists (projects are never removed): never skip a copy.
        let target = state
            .catalog
            .get_project(&migration.target_project)
            .await?
            .ok_or_else(|| {
                meridian_catalog::CatalogError::Corrupt(format!(
                    "migration {} names target project {}, which does not exist",
                    migration.migration_id, migration.target_project
                ))
            })?;
        let copy_deletion = state
            .stores
            .of_project(&target)?
            .create_deletion(&target, &request.user_ids, &actor(&claims, &request_id))
            .await?;
        info!(deletion_id = %copy_deletion.deletion_id, project_id = %migration.target_project, migration_id = %migration.migration_id, "GDPR deletion requested in a migration's target too");
        also_requested.push(json!({
            "project_id": migration.target_project,
            "region": copy_deletion.region,
            "deletion_id": copy_deletion.deletion_id,
            "migration_id": migration.migration_id,
        }));
    }
    let deletion = state
        .stores
        .of_project(&project)?
        .create_deletion(&project, &request.user_ids, &actor(&claims, &request_id))
        .await?;
    state.keys.refresh().await.ok();
    state.deletion_requested.notify_one();
    info!(deletion_id = %deletion.deletion_id, project_id, region = %deletion.region, users = deletion.user_ids.len(), "GDPR deletion requested");
    let mut body = deletion_json(&deletion, clickhouse_configured(&state, &deletion.region));
    body["also_requested"] = Value::Array(also_requested);
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

async fn get_deletion(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(deletion_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("deletion `{deletion_id}` does not exist"));
    let deletion = state
        .stores
        .find_deletion(&deletion_id)
        .await?
        .ok_or_else(not_found)?;
    claims.require(
        &deletion.org_id,
        Role::Admin,
        &format!("deletion `{deletion_id}`"),
    )?;
    Ok(axum::Json(deletion_json(
        &deletion,
        clickhouse_configured(&state, &deletion.region),
    ))
    .into_response())
}

/// Claims and carries out deletions of the served regions until `stop`.
pub async fn run_deletion_executor(state: AppState, mut stop: watch::Receiver<bool>) {
    if state.stores.stores().is_empty() {
        return;
    }
    loop {
        let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
        let mut claimed = Ok(None);
        for store in state.stores.stores() {
            claimed = store
                .catalog
                .claim_deletion(&state.node_id, &store.region_names(), lease_until_ms)
                .await;
            if !matches!(claimed, Ok(None)) {
                break;
            }
        }
        match claimed {
            Ok(Some(deletion)) => {
                let deletion_id = deletion.deletion_id.clone();
                let region = deletion.region.clone();
                if let Err(failure) = execute(&state, deletion).await {
                    warn!(%deletion_id, error = %failure, "GDPR deletion step failed; it will be retried");
                    if let Ok(store) = state.stores.of_region(&region) {
                        let _ = store.record_deletion_error(&deletion_id, &failure).await;
                    }
                    if !crate::background::back_off(&mut stop, Duration::from_secs(5)).await {
                        return;
                    }
                }
                continue;
            }
            Ok(None) => {}
            Err(error) => warn!(%error, "cannot look for GDPR deletions; retrying"),
        }
        let poll = state.settings.gdpr_poll_interval;
        if !crate::background::next_round(&mut stop, poll, &state.deletion_requested).await {
            return;
        }
    }
}

async fn execute(state: &AppState, mut deletion: Deletion) -> Result<(), String> {
    let region = RegionId::parse(&deletion.region).map_err(|error| error.to_string())?;
    let Some(services) = state.region_services.get(&region).cloned() else {
        return Err(format!("region {region} is not served here"));
    };
    let store = state
        .stores
        .of_region(&deletion.region)
        .map_err(|error| error.to_string())?
        .clone();
    let executor = Actor::system(&format!("gdpr-executor/{}", state.node_id));
    let users: HashSet<String> = deletion.user_ids.iter().cloned().collect();
    let mut progress = DeletionProgress {
        clickhouse_rows_deleted: deletion.clickhouse_rows_deleted,
        archive_objects_scanned: deletion.archive_objects_scanned,
        archive_objects_rewritten: deletion.archive_objects_rewritten,
        archive_messages_removed: deletion.archive_messages_removed,
    };
    let record = |stage: DeletionStage, progress: DeletionProgress| {
        let state = state.clone();
        let store = store.clone();
        let deletion_id = deletion.deletion_id.clone();
        let executor = executor.clone();
        async move {
            let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
            store
                .record_deletion_progress(
                    &deletion_id,
                    &state.node_id,
                    stage,
                    progress,
                    lease_until_ms,
                    &executor,
                )
                .await
                .map_err(|error| error.to_string())
        }
    };

    if deletion.stage == DeletionStage::Settle {
        let settle_until_ms = settle_deadline_ms(deletion.created_at_ms, &state.settings);
        let wait_ms = (settle_until_ms - now_unix_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        record(DeletionStage::Clickhouse, progress).await?;
        deletion.stage = DeletionStage::Clickhouse;
    }

    if deletion.stage == DeletionStage::Clickhouse {
        if let Some(clickhouse) = &services.clickhouse {
            let deleted = clickhouse
                .delete_users(&deletion.project_id, &deletion.user_ids)
                .await?;
            progress.clickhouse_rows_deleted += deleted as i64;
            // The dead-letter file keeps whole messages: they go too.
            let erased = clickhouse
                .erase_dead_letters(&deletion.project_id, &deletion.user_ids)
                .await?;
            if erased > 0 {
                info!(deletion_id = %deletion.deletion_id, dead_letters_removed = erased, "GDPR deletion removed dead-lettered messages");
            }
        }
        record(DeletionStage::Archive, progress).await?;
        deletion.stage = DeletionStage::Archive;
    }

    if deletion.stage == DeletionStage::Archive {
        let mut stores: Vec<(Arc<dyn ObjectStore>, Option<String>)> = vec![(
            Arc::clone(&services.archive_store),
            services.archive_prefix.clone(),
        )];
        if let Some(storage) = state.keys.customer_storage(&deletion.project_id) {
            let (store, prefix) = state
                .customer_stores
                .store_for(
                    &state.settings.aws_region_of(region.as_str()),
                    &deletion.project_id,
                    &storage,
                )
                .await
                .map_err(|error| format!("customer bucket {}: {error}", storage.bucket))?;
            stores.push((store, Some(prefix)));
        }
        for (store, prefix) in stores {
            let objects = list_project_objects(
                store.as_ref(),
                prefix.as_deref(),
                &deletion.project_id,
                None,
            )
            .await
            .map_err(|error| error.to_string())?;
            for object in objects {
                let outcome =
                    rewrite_without_users(store.as_ref(), &object.key, &users, services.gzip_level)
                        .await
                        .map_err(|error| error.to_string())?;
                progress.archive_objects_scanned += 1;
                if outcome.rewritten {
                    progress.archive_objects_rewritten += 1;
                    progress.archive_messages_removed += outcome.messages_removed as i64;
                }
                record(DeletionStage::Archive, progress).await?;
            }
        }
        record(DeletionStage::Finished, progress).await?;
    }

    let finished = store
        .finish_deletion(&deletion.deletion_id, DeletionStatus::Done, None, &executor)
        .await
        .map_err(|error| error.to_string())?;
    info!(
        deletion_id = %finished.deletion_id,
        project_id = %finished.project_id,
        region = %finished.region,
        clickhouse_rows_deleted = finished.clickhouse_rows_deleted,
        archive_objects_rewritten = finished.archive_objects_rewritten,
        archive_messages_removed = finished.archive_messages_removed,
        "GDPR deletion done"
    );
    Ok(())
}

/// When a deletion requested at `created_at_ms` may rewrite the stores. Every node's key cache
/// learns of it within the catalog refresh interval, after which its sinks leave the users' queued
/// messages out; an attempt that began before that is cancelled by its runner (on every node) at
/// the attempt limit; and `gdpr.settle_ms` covers what a store still finishes of a request it had
/// fully received when the attempt was cancelled. So nothing with the users' data can land after.
fn settle_deadline_ms(created_at_ms: i64, settings: &crate::config::Settings) -> i64 {
    let wait =
        settings.catalog_refresh_interval + settings.retry.attempt_limit + settings.gdpr_settle;
    created_at_ms.saturating_add(wait.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deletion_waits_out_every_sink_attempt_that_may_still_carry_the_users() {
        let mut settings = crate::config::Config::from_sources(None, &Vec::new())
            .unwrap()
            .validate()
            .unwrap();
        settings.catalog_refresh_interval = Duration::from_millis(250);
        settings.retry.attempt_limit = Duration::from_secs(600);
        settings.gdpr_settle = Duration::from_secs(30);
        assert_eq!(
            settle_deadline_ms(1_000_000, &settings),
            1_000_000 + 250 + 600_000 + 30_000
        );
    }
}
