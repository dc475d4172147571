//! `GET /admin/orgs/{org}/volume`: events per project of the org received in the last hour, from
//! the warehouses of the regions this node serves (each region's own ClickHouse, so the figure
//! covers every node of the region). Regions not served here, or without a warehouse, are named.

use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use meridian_core::RegionId;
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms};
use serde_json::{Map, Value, json};

use super::access::require_org;
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;

const WINDOW: Duration = Duration::from_secs(3600);

pub fn routes() -> ApiRoutes {
    ApiRoutes::new().add(Method::GET, "/admin/orgs/{org_id}/volume", org_volume)
}

async fn org_volume(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(org_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    require_org(&state, &claims, &org_id, Role::Member).await?;
    let projects = state
        .node
        .catalog
        .list_projects(&org_id, 1000, None)
        .await?
        .items;
    let since_ms = now_unix_ms() - WINDOW.as_millis() as i64;
    let mut by_region: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for project in &projects {
        by_region
            .entry(project.region.clone())
            .or_default()
            .push(project.project_id.clone());
    }
    let mut counts = Map::new();
    let mut unavailable = Vec::new();
    for (region, project_ids) in by_region {
        let clickhouse = RegionId::parse(&region)
            .ok()
            .and_then(|region| state.node.services(&region))
            .and_then(|services| services.clickhouse.clone());
        let Some(clickhouse) = clickhouse else {
            unavailable.push(
                json!({"region": region, "reason": "not served by this node, or no warehouse"}),
            );
            continue;
        };
        match clickhouse
            .count_recent_by_project(&project_ids, since_ms)
            .await
        {
            Ok(found) => {
                for project_id in project_ids {
                    let rows = found.get(&project_id).copied().unwrap_or(0);
                    counts.insert(project_id, json!(rows));
                }
            }
            Err(error) => unavailable.push(
                json!({"region": region, "reason": meridian_core::redact_url(&error.to_string())}),
            ),
        }
    }
    Ok(axum::Json(json!({
        "org_id": org_id,
        "since": format_rfc3339_ms(since_ms),
        "window_secs": WINDOW.as_secs(),
        "projects": Value::Object(counts),
        "unavailable": unavailable,
    }))
    .into_response())
}
