//! Revoking admin tokens before they expire: `POST /admin/token-revocations` (one token by its
//! `jti`, or every token issued before a time — of a user, of an org, or, for the platform, of
//! everyone) and `GET /admin/token-revocations`. Every node refuses a revoked token within the
//! catalog refresh interval, open live streams included.

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::{NewTokenRevocation, TokenRevocation};
use meridian_core::timestamp::{format_rfc3339_ms, parse_timestamp_ms};
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::{actor, parse_body};
use crate::auth::{AdminAuth, Role};
use crate::error::ApiError;
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(Method::POST, "/admin/token-revocations", revoke_tokens)
        .add(Method::GET, "/admin/token-revocations", list_revocations)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeTokens {
    /// The org whose tokens are revoked; required unless the caller is the platform.
    org_id: Option<String>,
    /// The user (`sub`) whose tokens are revoked.
    sub: Option<String>,
    /// The one token revoked.
    jti: Option<String>,
    /// `"now"` or an RFC 3339 time: tokens issued before it are revoked.
    issued_before: Option<String>,
}

/// Longest `sub` or `jti` accepted (ids, not documents).
const MAX_IDENTIFIER_CHARS: usize = 256;

fn bounded_identifier(field: &str, value: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if value.is_empty()
        || value.chars().count() > MAX_IDENTIFIER_CHARS
        || value.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!(
                "`{field}` must be 1 to {MAX_IDENTIFIER_CHARS} characters without control characters"
            ),
        ));
    }
    Ok(Some(value))
}

fn revocation_json(revocation: &TokenRevocation) -> Value {
    json!({
        "revocation_id": revocation.revocation_id,
        "org_id": revocation.org_id,
        "sub": revocation.subject,
        "jti": revocation.jti,
        "issued_before": revocation.issued_before_ms.map(format_rfc3339_ms),
        "created_at": format_rfc3339_ms(revocation.created_at_ms),
        "created_by": revocation.created_by,
    })
}

/// An owner revokes tokens of their own org (its users', one of them, or one token); the
/// platform revokes anything, platform-wide cutoffs included.
async fn revoke_tokens(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: RevokeTokens = parse_body(&body)?;
    let org_id = bounded_identifier("org_id", request.org_id)?;
    let subject = bounded_identifier("sub", request.sub)?;
    let jti = bounded_identifier("jti", request.jti)?;
    let issued_before_ms = match request.issued_before.as_deref() {
        None => None,
        Some("now") => Some(meridian_core::timestamp::system_now_unix_ms()),
        Some(text) => Some(parse_timestamp_ms(text).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request",
                "`issued_before` must be \"now\" or an RFC 3339 time",
            )
        })?),
    };
    if jti.is_none() && issued_before_ms.is_none() {
        return Err(ApiError::bad_request(
            "invalid_request",
            "name a token (`jti`) or a time (`issued_before`, e.g. \"now\") before which tokens are revoked",
        ));
    }
    match &org_id {
        Some(org_id) => claims.require(org_id, Role::Owner, &format!("org `{org_id}`"))?,
        None if claims.role == Role::Platform => {}
        None => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`org_id` is required: an owner revokes the tokens of their own org",
            ));
        }
    }
    let revocation = state
        .node
        .catalog
        .revoke_tokens(
            NewTokenRevocation {
                org_id,
                subject,
                jti,
                issued_before_ms,
            },
            &actor(&claims, &request_id),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(revocation_json(&revocation)),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevocationQuery {
    org_id: Option<String>,
}

async fn list_revocations(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    query: Result<Query<RevocationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query
        .map_err(|rejection| ApiError::bad_request("invalid_request", rejection.body_text()))?;
    let revocations = match query.org_id.as_deref() {
        Some(org_id) => {
            claims.require(org_id, Role::Owner, &format!("org `{org_id}`"))?;
            state.node.catalog.token_revocations(Some(org_id)).await?
        }
        None if claims.role == Role::Platform => state.node.catalog.token_revocations(None).await?,
        None => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`org_id` is required: an owner lists the revocations of their own org",
            ));
        }
    };
    let items: Vec<Value> = revocations.iter().map(revocation_json).collect();
    Ok(axum::Json(json!({ "revocations": items })).into_response())
}
