//! Projects and their write keys.

use std::time::Duration;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::{NewProject, Project};
use meridian_core::timestamp::format_rfc3339_ms;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

use super::access::{PageQuery, actor, authorized_project, configured_region, parse_body};

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/projects",
            create_project,
        )
        .add(Method::GET, "/admin/orgs/{org_id}/projects", list_projects)
        .add(Method::GET, "/admin/projects/{project_id}", get_project)
        .add(
            Method::PATCH,
            "/admin/projects/{project_id}",
            update_project,
        )
        .add(
            Method::POST,
            "/admin/projects/{project_id}/keys/rotate",
            rotate_key,
        )
}

/// A project as the admin API shows it: its keys' prefixes (never a key) and its storage.
pub fn project_json(project: &Project, keys: &[meridian_catalog::KeyInfo]) -> Value {
    json!({
        "project_id": project.project_id,
        "org_id": project.org_id,
        "name": project.name,
        "region": project.region,
        "created_at": format_rfc3339_ms(project.created_at_ms),
        "keys": keys.iter().map(|key| json!({
            "prefix": key.prefix,
            "created_at": format_rfc3339_ms(key.created_at_ms),
            "expires_at": key.expires_at_ms.map(format_rfc3339_ms),
        })).collect::<Vec<_>>(),
        "storage": project.storage.as_ref().map(|storage| json!({
            "bucket": storage.bucket, "prefix": storage.prefix, "role_arn": storage.role_arn,
            "external_id": meridian_core::external_id_for(&project.project_id),
            "kms_key_arn": storage.kms_key_arn, "label": storage.label,
        })),
        // What the customer's role trust policy must require (sts:ExternalId) for this project.
        "storage_external_id": meridian_core::external_id_for(&project.project_id),
    })
}

#[derive(Deserialize)]
struct CreateProject {
    name: String,
    region: Option<String>,
}

async fn create_project(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(org_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    claims.require(&org_id, Role::Admin, &format!("org `{org_id}`"))?;
    let request: CreateProject = parse_body(&body)?;
    let region = match &request.region {
        Some(text) => configured_region(&state, text)?,
        None => state.node.settings.default_region.clone(),
    };
    if state
        .node
        .settings
        .regions
        .get(&region)
        .is_some_and(|settings| !settings.available)
    {
        return Err(ApiError::bad_request(
            "region_unavailable",
            format!("region {region} does not accept new projects"),
        ));
    }
    let (project, write_key) = state
        .node
        .catalog
        .create_project(
            &org_id,
            NewProject {
                name: request.name,
                region,
            },
            &actor(&claims, &request_id),
        )
        .await?;
    state.node.keys.refresh().await.ok();
    let body = json!({
        "project_id": project.project_id,
        "name": project.name,
        "region": project.region,
        "write_key": write_key,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn list_projects(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(org_id): ApiPath<String>,
    page: PageQuery,
) -> Result<Response, ApiError> {
    claims.require(&org_id, Role::Member, &format!("org `{org_id}`"))?;
    let limit = page.limit(100, 1000)?;
    let listed = state
        .node
        .catalog
        .list_projects(&org_id, limit, page.cursor.as_deref())
        .await?;
    let items: Vec<Value> = listed
        .items
        .iter()
        .map(|project| project_json(project, &[]))
        .collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": listed.next_cursor})).into_response())
}

async fn get_project(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(project_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Member).await?;
    Ok(axum::Json(project_with_retention_json(&state, &project).await?).into_response())
}

/// [`project_json`] with the project's retention (what applies and what the project set).
async fn project_with_retention_json(
    state: &AppState,
    project: &Project,
) -> Result<Value, ApiError> {
    let keys = state.node.catalog.list_keys(&project.project_id).await?;
    let retention = state.node.catalog.retention_of(&project.project_id).await?;
    let mut body = project_json(project, &keys);
    body["retention"] =
        super::retention::retention_json(&state.node.settings, &project.region, retention);
    Ok(body)
}

async fn update_project(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let request: serde_json::Map<String, Value> = parse_body(&body)?;
    if let Some(region) = request.get("region")
        && region.as_str() != Some(project.region.as_str())
    {
        return Err(ApiError::conflict(
            "region_immutable",
            format!(
                "project {project_id} is pinned to {} for good; create a new project in the other region instead",
                project.region
            ),
        ));
    }
    for key in request.keys() {
        if !["name", "region", "retention"].contains(&key.as_str()) {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`{key}` cannot be changed; only `name` and `retention` can"),
            ));
        }
    }
    // Checked before anything is written, so a bad retention renames nothing.
    let retention_change = match request.get("retention") {
        None => None,
        Some(change) => {
            let current = state.node.catalog.retention_of(&project_id).await?;
            Some(super::retention::parse_retention_change(current, change)?)
        }
    };
    let project = match request.get("name") {
        None => project,
        Some(Value::String(name)) => {
            state
                .node
                .catalog
                .rename_project(&project_id, name, &actor(&claims, &request_id))
                .await?
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`name` must be a string",
            ));
        }
    };
    if let Some(retention) = retention_change {
        state
            .node
            .catalog
            .set_retention(&project_id, retention, &actor(&claims, &request_id))
            .await?;
        state.node.wakers.retention_changed.notify_one();
    }
    Ok(axum::Json(project_with_retention_json(&state, &project).await?).into_response())
}

#[derive(Deserialize, Default)]
struct RotateKey {
    grace_seconds: Option<u64>,
}

async fn rotate_key(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorized_project(&state, &claims, &project_id, Role::Admin).await?;
    let request: RotateKey = if body.is_empty() {
        RotateKey::default()
    } else {
        parse_body(&body)?
    };
    let grace_seconds = request.grace_seconds.unwrap_or(0);
    if grace_seconds > 30 * 86_400 {
        return Err(ApiError::bad_request(
            "invalid_request",
            "grace_seconds may be at most 30 days",
        ));
    }
    let rotated = state
        .node
        .catalog
        .rotate_key(
            &project_id,
            Duration::from_secs(grace_seconds),
            &actor(&claims, &request_id),
        )
        .await?;
    state.node.keys.refresh().await.ok();
    Ok(axum::Json(json!({
        "write_key": rotated.write_key,
        "previous_key_expires_at": format_rfc3339_ms(rotated.previous_key_expires_at_ms),
    }))
    .into_response())
}
