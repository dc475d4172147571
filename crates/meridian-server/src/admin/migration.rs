//! Region migrations: the admin API and the executor that moves the data.
//!
//! A project's region never changes; to move, an owner creates a project in the target region and
//! a migration from the source project to it (`POST /admin/orgs/{org}/migrations`), then starts
//! it. The executor — on a node that serves both regions, under a lease in the catalog — copies
//! every archive object of the source project (its region's store and its own bucket) into the
//! target project's archive (its own bucket if it has one, else its region's store), rewritten
//! with the target's `projectId` and `region` and the original `messageId`s, and inserts the same
//! messages into the target region's ClickHouse where they are missing. This is the only code
//! path where a project's data crosses regions, and it runs only because an owner asked for it.
//!
//! Exactly once by construction: each source object becomes one target object whose name is
//! derived from the source object's (a retry overwrites it, never adds a second), written after
//! its warehouse insert (which inserts only the messages the warehouse lacks); an object whose
//! target exists is done. So a pass can stop anywhere (kill -9) and the next one goes on.
//!
//! `copying` until a pass has copied every object it found, then `dual_write`: the source key
//! keeps working and the executor keeps following what the source archives, every
//! `migration.tail_interval_ms`. `POST /admin/migrations/{id}/complete` is the cutover (`done`):
//! the source project then refuses new events (403 `project_migrated`, naming the target) and the
//! executor still copies what the source's queues deliver afterwards, for
//! `migration.drain_window_secs`.

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_catalog::{MigrationStatus, RegionMigration};
use meridian_core::timestamp::format_rfc3339_ms;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::info;

use super::access::{actor, parse_body, require_org};
use crate::auth::{AdminAuth, Claims, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::routes::ApiRoutes;
use crate::state::AppState;

pub fn routes() -> ApiRoutes {
    ApiRoutes::new()
        .add(
            Method::POST,
            "/admin/orgs/{org_id}/migrations",
            create_migration,
        )
        .add(
            Method::GET,
            "/admin/orgs/{org_id}/migrations",
            list_migrations,
        )
        .add(
            Method::GET,
            "/admin/migrations/{migration_id}",
            get_migration,
        )
        .add(
            Method::POST,
            "/admin/migrations/{migration_id}/start",
            start_migration,
        )
        .add(
            Method::POST,
            "/admin/migrations/{migration_id}/complete",
            complete_migration,
        )
        .add(
            Method::POST,
            "/admin/migrations/{migration_id}/cancel",
            cancel_migration,
        )
}

#[derive(Deserialize)]
struct CreateMigration {
    source_project: String,
    target_project: String,
}

fn migration_json(migration: &RegionMigration) -> Value {
    let progress = &migration.progress;
    json!({
        "migration_id": migration.migration_id,
        "org_id": migration.org_id,
        "source_project": migration.source_project,
        "target_project": migration.target_project,
        "source_region": migration.source_region,
        "target_region": migration.target_region,
        "status": migration.status.as_str(),
        "error": migration.error,
        "objects_copied": progress.objects_copied,
        "messages_copied": progress.messages_copied,
        "messages_present": progress.messages_present,
        "lag_objects": progress.lag_objects,
        "last_pass_at": migration.last_pass_at_ms.map(format_rfc3339_ms),
        "cutover_at": migration.cutover_at_ms.map(format_rfc3339_ms),
        "created_at": format_rfc3339_ms(migration.created_at_ms),
        "updated_at": format_rfc3339_ms(migration.updated_at_ms),
    })
}

async fn create_migration(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(org_id): ApiPath<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    require_org(&state, &claims, &org_id, Role::Owner).await?;
    let request: CreateMigration = parse_body(&body)?;
    let migration = state
        .node
        .catalog
        .create_migration(
            &org_id,
            &request.source_project,
            &request.target_project,
            &actor(&claims, &request_id),
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(migration_json(&migration))).into_response())
}

/// The org's latest 50 migrations, newest first.
async fn list_migrations(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(org_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    require_org(&state, &claims, &org_id, Role::Owner).await?;
    let migrations = state.node.catalog.recent_migrations(&org_id, 50).await?;
    let items: Vec<Value> = migrations.iter().map(migration_json).collect();
    Ok(axum::Json(json!({"items": items})).into_response())
}

async fn authorized_migration(
    state: &AppState,
    claims: &Claims,
    migration_id: &str,
) -> Result<RegionMigration, ApiError> {
    let not_found = || ApiError::not_found(format!("migration `{migration_id}` does not exist"));
    let migration = state
        .node
        .catalog
        .get_migration(migration_id)
        .await?
        .ok_or_else(not_found)?;
    claims.require(
        &migration.org_id,
        Role::Owner,
        &format!("migration `{migration_id}`"),
    )?;
    Ok(migration)
}

async fn get_migration(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    ApiPath(migration_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let migration = authorized_migration(&state, &claims, &migration_id).await?;
    Ok(axum::Json(migration_json(&migration)).into_response())
}

async fn move_migration(
    state: AppState,
    claims: Claims,
    request_id: RequestId,
    migration_id: String,
    next: MigrationStatus,
) -> Result<Response, ApiError> {
    authorized_migration(&state, &claims, &migration_id).await?;
    let migration = state
        .node
        .catalog
        .transition_migration(&migration_id, next, None, &actor(&claims, &request_id))
        .await?;
    state.node.wakers.migration_requested.notify_one();
    info!(migration_id, status = next.as_str(), "migration moved");
    Ok(axum::Json(migration_json(&migration)).into_response())
}

async fn start_migration(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(migration_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    move_migration(
        state,
        claims,
        request_id,
        migration_id,
        MigrationStatus::Copying,
    )
    .await
}

async fn cancel_migration(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(migration_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    move_migration(
        state,
        claims,
        request_id,
        migration_id,
        MigrationStatus::Cancelled,
    )
    .await
}

/// The cutover: the source project refuses new events from now on (once the key caches learn of
/// it, within `catalog.refresh_interval_ms`); what its queues still deliver is copied afterwards.
async fn complete_migration(
    State(state): State<AppState>,
    AdminAuth(claims): AdminAuth,
    axum::Extension(request_id): axum::Extension<RequestId>,
    ApiPath(migration_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    authorized_migration(&state, &claims, &migration_id).await?;
    let migration = state
        .node
        .catalog
        .complete_migration(&migration_id, &actor(&claims, &request_id))
        .await?;
    state.node.keys.refresh().await.ok();
    state.node.wakers.migration_requested.notify_one();
    info!(migration_id, source_project = %migration.source_project, target_project = %migration.target_project, "migration cut over");
    Ok(axum::Json(migration_json(&migration)).into_response())
}
