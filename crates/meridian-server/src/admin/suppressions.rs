//! Suppressions: a user's future events are dropped at ingest, in the project's region.

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;

use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

use super::access::{PageQuery, UserIds, actor, authorized_project, parse_body, validate_user_ids};

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::GET,
            "/admin/projects/{project_id}/suppressions",
            list_suppressions,
        )
        .add(
            Method::POST,
            "/admin/projects/{project_id}/suppressions",
            suppress_many,
        )
        .add(
            Method::PUT,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            suppress_one,
        )
        .add(
            Method::GET,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            suppression_of_user,
        )
        .add(
            Method::DELETE,
            "/admin/projects/{project_id}/suppressions/{user_id}",
            unsuppress_one,
        )
}

async fn list_suppressions(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
    page: PageQuery,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let limit = page.limit(1000, 5000)?;
    let listed = state
        .node
        .stores
        .of_project(&project)?
        .list_suppressions(&project_id, limit, page.cursor.as_deref())
        .await?;
    Ok(
        axum::Json(json!({"items": listed.items, "next_cursor": listed.next_cursor}))
            .into_response(),
    )
}

async fn suppress_many(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let request: UserIds = parse_body(&body)?;
    validate_user_ids(&request.user_ids)?;
    let added = state
        .node
        .stores
        .of_project(&project)?
        .suppress_users(&project, &request.user_ids, &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    Ok(
        axum::Json(json!({"suppressed": request.user_ids.len(), "newly_suppressed": added}))
            .into_response(),
    )
}

async fn suppress_one(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath((project_id, user_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let user_ids = vec![user_id.clone()];
    validate_user_ids(&user_ids)?;
    state
        .node
        .stores
        .of_project(&project)?
        .suppress_users(&project, &user_ids, &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    Ok(
        axum::Json(json!({"project_id": project_id, "user_id": user_id, "suppressed": true}))
            .into_response(),
    )
}

/// Whether a user is suppressed: the catalog keeps keyed hashes only, so this recomputes the
/// user's hash and looks it up.
async fn suppression_of_user(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath((project_id, user_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let suppressed = state
        .node
        .stores
        .of_project(&project)?
        .is_user_suppressed(&project_id, &user_id)
        .await?;
    Ok(axum::Json(json!({"project_id": project_id, "user_id": user_id,
        "user_hash": state.node.catalog.key().user_hash(&project_id, &user_id), "suppressed": suppressed}))
    .into_response())
}

async fn unsuppress_one(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath((project_id, user_id)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let removed = state
        .node
        .stores
        .of_project(&project)?
        .unsuppress_user(&project, &user_id, &actor(&claims, &request_id))
        .await?;
    if !removed {
        return Err(ApiError::not_found(format!(
            "user `{user_id}` is not suppressed in project {project_id}"
        )));
    }
    state.node.keys.refresh().await.ok();
    Ok(StatusCode::NO_CONTENT.into_response())
}
