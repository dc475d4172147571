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

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::{Deletion, DeletionStage, DeletionStatus};
use meridian_core::RegionId;
use meridian_core::timestamp::format_rfc3339_ms;
use serde_json::{Value, json};
use tracing::info;

use super::access::{UserIds, actor, authorized_project, parse_body};
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

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
            .node
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
        .node
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
        .node
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
    super::access::validate_user_ids(&request.user_ids)?;
    // Projects this one's data was migrated to hold copies of the users' data: the deletion is
    // requested there too (in their regions), before the project's own.
    let mut also_requested = Vec::new();
    for migration in state
        .node
        .catalog
        .migrations_started_from(&project_id)
        .await?
    {
        // A migration's target always exists (projects are never removed): never skip a copy.
        let target = state
            .node
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
            .node
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
        .node
        .stores
        .of_project(&project)?
        .create_deletion(&project, &request.user_ids, &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    state.node.wakers.deletion_requested.notify_one();
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
        .node
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
