//! What every admin route shares: reading a JSON body, the audit actor, paging, the checks that
//! a token may see an org or a project, and the rule that a project's data is answered for only
//! in its region.

use axum::extract::Query;
use bytes::Bytes;
use meridian_catalog::{Actor, Project};
use meridian_core::RegionId;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::auth::{Claims, Role};
use crate::error::ApiError;
use crate::headers::RequestId;
use crate::state::AppState;

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

/// A region this node's configuration knows (a 400 naming the known ones otherwise).
pub fn configured_region(state: &AppState, text: &str) -> Result<RegionId, ApiError> {
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

/// The services of the project's region, when this node serves it; else 503
/// `region_not_served` naming the region (and where its nodes answer, when configured): the
/// project's data is read only in its region.
pub fn served_region<'state>(
    state: &'state AppState,
    project: &Project,
) -> Result<&'state meridian_node::region::RegionServices, ApiError> {
    let services = RegionId::parse(&project.region)
        .ok()
        .and_then(|region| state.node.services(&region));
    if let Some(services) = services {
        return Ok(services);
    }
    let public_url = RegionId::parse(&project.region)
        .ok()
        .and_then(|region| state.node.settings.regions.get(&region))
        .and_then(|region| region.public_url.clone());
    let message = match &public_url {
        Some(url) => format!(
            "this node does not serve {}, where project {}'s data is: ask a node of that region ({url})",
            project.region, project.project_id
        ),
        None => format!(
            "this node does not serve {}, where project {}'s data is: ask a node of that region",
            project.region, project.project_id
        ),
    };
    Err(
        ApiError::unavailable("region_not_served", message, 5).with_extra(
            "region",
            serde_json::json!({"id": project.region, "url": public_url}),
        ),
    )
}
