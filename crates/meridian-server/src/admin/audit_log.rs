//! `GET /admin/orgs/{org_id}/audit`: the org's audit entries from every store this node has —
//! the global catalog (org, project and key changes) and the regional store of each served
//! region (suppressions, deletions, replays, retention runs) — merged by time. Each store keeps
//! its own hash chain; an item names its `store`. The cursor holds a position per store
//! (`global:12,eu-west-1:4`); a node lists only the regional stores of the regions it serves.

use axum::extract::State;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use meridian_catalog::{AuditEntry, Catalog};
use meridian_core::timestamp::format_rfc3339_ms;
use serde_json::{Value, json};

use super::access::PageQuery;
use crate::auth::{AdminAuth, Role};
use crate::error::{ApiError, ApiPath};
use crate::routes::ApiRoutes;
use crate::state::AppState;

pub(super) fn routes() -> ApiRoutes {
    ApiRoutes::new().add(Method::GET, "/admin/orgs/{org_id}/audit", audit_log)
}

/// The name of the global catalog's chain in items and cursors.
const GLOBAL_STORE: &str = "global";

/// The stores whose entries an org listing merges: the global catalog first, then each served
/// region's own store (regions kept in the global catalog add nothing).
fn audit_stores(state: &AppState) -> Vec<(String, Catalog)> {
    let mut stores = vec![(GLOBAL_STORE.to_string(), state.node.catalog.clone())];
    for store in state.node.stores.stores() {
        if !store.is_global {
            stores.push((store.region_names().join("+"), store.catalog.clone()));
        }
    }
    stores
}

fn invalid_cursor() -> ApiError {
    ApiError::bad_request(
        "invalid_request",
        "cursor must come from a previous page's next_cursor",
    )
}

/// The position after which each store's entries are listed (0 for a store the cursor does not
/// name). A bare number is a position in the global chain (cursors of earlier versions).
fn parse_cursor(cursor: Option<&str>, stores: &[(String, Catalog)]) -> Result<Vec<i64>, ApiError> {
    let mut positions = vec![0; stores.len()];
    let Some(cursor) = cursor else {
        return Ok(positions);
    };
    if let Ok(global_seq) = cursor.parse::<i64>() {
        positions[0] = global_seq;
        return Ok(positions);
    }
    for part in cursor.split(',') {
        let (name, seq) = part.rsplit_once(':').ok_or_else(invalid_cursor)?;
        let seq = seq.parse::<i64>().map_err(|_| invalid_cursor())?;
        // A store this node does not have (another region's) is skipped.
        if let Some(index) = stores.iter().position(|(store, _)| store == name) {
            positions[index] = seq;
        }
    }
    Ok(positions)
}

pub async fn audit_log(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(org_id): ApiPath<String>,
    page: PageQuery,
) -> Result<Response, ApiError> {
    claims.require(&org_id, Role::Owner, &format!("org `{org_id}`"))?;
    let limit = page.limit(100, 1000)?;
    let stores = audit_stores(&state);
    let mut positions = parse_cursor(page.cursor.as_deref(), &stores)?;

    // Each store's next `limit` entries hold every entry of the merged page.
    let mut candidates: Vec<(usize, AuditEntry)> = Vec::new();
    let mut a_store_has_more = false;
    for (index, (_, catalog)) in stores.iter().enumerate() {
        let listed = catalog.list_audit(&org_id, positions[index], limit).await?;
        a_store_has_more |= listed.next_cursor.is_some();
        candidates.extend(listed.items.into_iter().map(|entry| (index, entry)));
    }
    candidates.sort_by_key(|(index, entry)| (entry.at_ms, *index, entry.seq));
    let more_than_a_page = candidates.len() > limit;
    candidates.truncate(limit);
    for (index, entry) in &candidates {
        debug_assert!(entry.seq > positions[*index]);
        positions[*index] = entry.seq;
    }
    let next_cursor = (a_store_has_more || more_than_a_page).then(|| {
        stores
            .iter()
            .zip(&positions)
            .map(|((name, _), seq)| format!("{name}:{seq}"))
            .collect::<Vec<_>>()
            .join(",")
    });
    let items: Vec<Value> = candidates
        .iter()
        .map(|(index, entry)| {
            json!({
                "seq": entry.seq, "store": stores[*index].0, "at": format_rfc3339_ms(entry.at_ms),
                "actor": entry.actor, "action": entry.action, "target": entry.target,
                "before": entry.before, "after": entry.after, "request_id": entry.request_id,
                "hash": entry.hash, "prev_hash": entry.prev_hash,
            })
        })
        .collect();
    Ok(axum::Json(json!({"items": items, "next_cursor": next_cursor})).into_response())
}
