//! A project's own bucket (Local Data Storage): verified by a test write, then saved.

use std::time::Duration;

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_archive::StorageVerificationError;
use serde::Deserialize;

use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

use super::access::{actor, authorized_project, parse_body};
use super::projects::project_json;

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new()
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
