//! The regions a node knows, their residency reports and an org's regions.

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

use super::access::{actor, configured_region, parse_body, require_org};

pub(super) fn routes() -> ApiRoutes {
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
