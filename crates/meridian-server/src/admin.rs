//! The admin API (`/admin/...`), authenticated by JWT (see `auth`).

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_archive::StorageVerificationError;
use meridian_catalog::{Actor, NewProject, Project};
use meridian_core::RegionId;
use meridian_core::timestamp::format_rfc3339_ms;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::auth::{AdminAuth, Claims, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(Method::GET, "/admin/regions", list_regions)
        .add(
            Method::GET,
            "/admin/regions/{region}/residency",
            residency_report,
        )
        .add(Method::GET, "/admin/regions/orgs/{org_id}", org_regions)
        .add(
            Method::POST,
            "/admin/regions/orgs/{org_id}/assign",
            assign_region,
        )
        .add(Method::POST, "/admin/orgs", create_org)
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/projects",
            create_project,
        )
        .add(Method::GET, "/admin/orgs/{org_id}/projects", list_projects)
        .add(
            Method::GET,
            "/admin/orgs/{org_id}/audit",
            crate::audit_log::audit_log,
        )
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
        .add(
            Method::PUT,
            "/admin/projects/{project_id}/storage",
            set_storage,
        )
        .add(
            Method::DELETE,
            "/admin/projects/{project_id}/storage",
            clear_storage,
        )
}

/// Parses a JSON body into `T`, with a 400 that names the problem.
pub fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "the request needs a JSON body",
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        ApiError::bad_request("invalid_request", format!("invalid JSON body: {error}"))
    })
}

pub fn actor(claims: &Claims, request_id: &RequestId) -> Actor {
    Actor {
        subject: claims.sub.clone(),
        request_id: request_id.0.to_string(),
    }
}

/// `?limit=&cursor=` of list routes; a malformed query is a JSON 400 like every other error.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        Query::<PageQuery>::try_from_uri(&parts.uri)
            .map(|Query(page)| page)
            .map_err(|error| {
                ApiError::bad_request(
                    "invalid_request",
                    format!("invalid query: {}", error.body_text()),
                )
            })
    }
}

impl PageQuery {
    pub fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(default),
            Some(0) => Err(ApiError::bad_request(
                "invalid_request",
                "limit must be positive",
            )),
            Some(limit) => Ok(limit.min(max)),
        }
    }
}

fn configured_region(state: &AppState, text: &str) -> Result<RegionId, ApiError> {
    let region = RegionId::parse(text)
        .map_err(|error| ApiError::bad_request("unknown_region", error.to_string()))?;
    if !state.node.settings.regions.contains_key(&region) {
        return Err(ApiError::bad_request(
            "unknown_region",
            format!(
                "region `{text}` is not configured; available: {}",
                state
                    .node
                    .settings
                    .regions
                    .keys()
                    .map(RegionId::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(region)
}

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

/// Loads a project the token may see at `minimum` role (404 for other orgs' projects).
pub async fn authorized_project(
    state: &AppState,
    claims: &Claims,
    project_id: &str,
    minimum: Role,
) -> Result<Project, ApiError> {
    let not_found = || ApiError::not_found(format!("project `{project_id}` does not exist"));
    let project = state
        .node
        .catalog
        .get_project(project_id)
        .await?
        .ok_or_else(not_found)?;
    claims.require(&project.org_id, minimum, &format!("project `{project_id}`"))?;
    Ok(project)
}

/// The residency report of a region this node serves (platform token).
async fn residency_report(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(region): ApiPath<String>,
) -> Result<Response, ApiError> {
    if claims.role != Role::Platform {
        return Err(ApiError::forbidden(
            "the residency report needs a platform token (role: platform)",
        ));
    }
    let region = configured_region(&state, &region)?;
    let Some(services) = state.node.services(&region) else {
        return Err(ApiError::unavailable(
            "region_not_served",
            format!("this node does not serve {region}: ask a node of that region"),
            5,
        ));
    };
    let queue_encryption = state
        .node
        .queue(&region)
        .and_then(|queue| queue.encryption());
    let report = meridian_node::residency::scan_region(
        &state.node.settings,
        &state.node.keys,
        &state.node.customer_stores,
        &region,
        services,
        queue_encryption,
        state.node.stores.store_of_region(&region),
    )
    .await
    .map_err(|failure| ApiError::unavailable("residency_scan_failed", failure.to_string(), 5))?;
    Ok(axum::Json(report.to_json(&state.node.keys)).into_response())
}

async fn list_regions(State(state): State<AppState>, AdminAuth(_claims): AdminAuth) -> Response {
    let regions: Vec<Value> = state
        .node
        .settings
        .regions
        .values()
        .map(|region| {
            json!({
                "id": region.id,
                "display_name": region.display_name,
                "status": if region.available { "available" } else { "unavailable" },
                "default": region.id == state.node.settings.default_region,
            })
        })
        .collect();
    axum::Json(Value::Array(regions)).into_response()
}

#[derive(Deserialize)]
struct CreateOrg {
    org_id: String,
    name: String,
    primary_region: Option<String>,
}

async fn create_org(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if claims.role != Role::Platform {
        return Err(ApiError::forbidden(
            "creating orgs needs a platform token (role: platform)",
        ));
    }
    let request: CreateOrg = parse_body(&body)?;
    let region = match &request.primary_region {
        Some(text) => configured_region(&state, text)?,
        None => state.node.settings.default_region.clone(),
    };
    let org = state
        .node
        .catalog
        .create_org(
            &request.org_id,
            &request.name,
            &region,
            &actor(&claims, &request_id),
        )
        .await?;
    let body = json!({
        "org_id": org.org_id, "name": org.name, "primary_region": org.primary_region,
        "created_at": format_rfc3339_ms(org.created_at_ms),
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

pub async fn require_org(
    state: &AppState,
    claims: &Claims,
    org_id: &str,
    minimum: Role,
) -> Result<meridian_catalog::Org, ApiError> {
    claims.require(org_id, minimum, &format!("org `{org_id}`"))?;
    state
        .node
        .catalog
        .get_org(org_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("org `{org_id}` does not exist")))
}

async fn org_regions(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(org_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let org = require_org(&state, &claims, &org_id, Role::Owner).await?;
    let mut projects = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = state
            .node
            .catalog
            .list_projects(&org_id, 1000, cursor.as_deref())
            .await?;
        projects.extend(page.items.into_iter().map(|project| {
            json!({"project_id": project.project_id, "name": project.name, "region": project.region})
        }));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(axum::Json(
        json!({"org_id": org.org_id, "primary_region": org.primary_region, "projects": projects}),
    )
    .into_response())
}

#[derive(Deserialize)]
struct AssignRegion {
    region: String,
}

async fn assign_region(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(org_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_org(&state, &claims, &org_id, Role::Owner).await?;
    let request: AssignRegion = parse_body(&body)?;
    let region = configured_region(&state, &request.region)?;
    let org = state
        .node
        .catalog
        .set_primary_region(&org_id, &region, &actor(&claims, &request_id))
        .await?;
    Ok(
        axum::Json(json!({"org_id": org.org_id, "primary_region": org.primary_region}))
            .into_response(),
    )
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
        crate::retention::retention_json(&state.node.settings, &project.region, retention);
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
            Some(crate::retention::parse_retention_change(current, change)?)
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

const MAX_USER_IDS_PER_REQUEST: usize = 5_000;

pub fn validate_user_ids(user_ids: &[String]) -> Result<(), ApiError> {
    if user_ids.is_empty() || user_ids.len() > MAX_USER_IDS_PER_REQUEST {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("user_ids must hold 1 to {MAX_USER_IDS_PER_REQUEST} ids"),
        ));
    }
    if let Some(bad) = user_ids.iter().find(|id| id.is_empty() || id.len() > 1024) {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("user id `{bad}` must be 1 to 1024 bytes"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct UserIds {
    pub user_ids: Vec<String>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageRequest {
    bucket: String,
    prefix: Option<String>,
    role_arn: String,
    /// Chosen by Meridian ([`meridian_core::external_id_for`]); may be sent, must then match.
    external_id: Option<String>,
    kms_key_arn: Option<String>,
    label: Option<String>,
}

fn validate_storage(
    project_id: &str,
    request: StorageRequest,
) -> Result<meridian_core::CustomerStorage, ApiError> {
    let external_id = meridian_core::external_id_for(project_id);
    if let Some(requested) = &request.external_id
        && requested != &external_id
    {
        return Err(ApiError::bad_request(
            "external_id_mismatch",
            format!(
                "the external id is chosen by Meridian, not by the request: this project's is `{external_id}`; require it in the role's trust policy (condition sts:ExternalId) and leave external_id out, or send exactly that value"
            ),
        ));
    }
    meridian_core::CustomerStorage::validated(
        project_id,
        request.bucket,
        request.prefix,
        request.role_arn,
        request.kms_key_arn,
        request.label,
    )
    .map_err(|error| ApiError::bad_request("invalid_request", error.to_string()))
}

/// How long the access check of a customer bucket (AssumeRole, location, test write) may take.
const STORAGE_VERIFICATION_SECONDS: u64 = 60;

/// Local Data Storage: proves access with a test write, then saves; the project's archive goes
/// only to that bucket from then on.
async fn set_storage(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Owner).await?;
    let storage = validate_storage(&project_id, parse_body(&body)?)?;
    let verification = tokio::time::timeout(
        Duration::from_secs(STORAGE_VERIFICATION_SECONDS),
        state.node.customer_stores.verify(
            &project_id,
            &state.node.settings.aws_region_of(&project.region),
            &storage,
        ),
    )
    .await
    .unwrap_or(Err(StorageVerificationError::TimedOut {
        seconds: STORAGE_VERIFICATION_SECONDS,
    }));
    if let Err(failure) = verification {
        return Err(ApiError::bad_request(
            "storage_verification_failed",
            failure.to_string(),
        ));
    }
    let project = state
        .node
        .catalog
        .set_storage(&project_id, Some(&storage), &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    let keys = state.node.catalog.list_keys(&project_id).await?;
    Ok(axum::Json(project_json(&project, &keys)).into_response())
}

async fn clear_storage(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(project_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let project = authorized_project(&state, &claims, &project_id, Role::Owner).await?;
    if project.storage.is_none() {
        return Err(ApiError::not_found(format!(
            "project {project_id} has no customer storage configured"
        )));
    }
    state
        .node
        .catalog
        .set_storage(&project_id, None, &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    Ok(StatusCode::NO_CONTENT.into_response())
}
