//! Creating an org (platform token).

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_core::timestamp::format_rfc3339_ms;
use serde::Deserialize;
use serde_json::json;

use crate::auth::{AdminAuth, Role};
use crate::error::ApiError;
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

use super::access::{actor, configured_region, parse_body};

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new().add(Method::POST, "/admin/orgs", create_org)
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
