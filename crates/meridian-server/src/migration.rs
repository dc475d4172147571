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

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use meridian_archive::ObjectStore;
use meridian_archive::layout::{decode_object, encode_object, object_key};
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, MigrationStatus, RegionMigration};
use meridian_core::timestamp::{format_rfc3339_ms, now_unix_ms, parse_timestamp_ms};
use meridian_core::{ErasureFilter, RegionId};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admin::{actor, parse_body, require_org};
use crate::auth::{AdminAuth, Claims, Role};
use crate::error::{ApiError, ApiPath};
use crate::headers::RequestId;
use crate::project_archive::{bounded, object_token, stores_of_project};
use crate::routes::ApiRoutes;
use crate::state::AppState;

const LEASE: Duration = Duration::from_secs(60);

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
    let migrations = state.catalog.recent_migrations(&org_id, 50).await?;
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
        .catalog
        .transition_migration(&migration_id, next, None, &actor(&claims, &request_id))
        .await?;
    state.migration_requested.notify_one();
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
        .catalog
        .complete_migration(&migration_id, &actor(&claims, &request_id))
        .await?;
    state.keys.refresh().await.ok();
    state.migration_requested.notify_one();
    info!(migration_id, source_project = %migration.source_project, target_project = %migration.target_project, "migration cut over");
    Ok(axum::Json(migration_json(&migration)).into_response())
}

/// Claims and copies the migrations between regions this node serves, until `stop`.
pub async fn run_migration_executor(state: AppState, mut stop: watch::Receiver<bool>) {
    let regions = crate::background::served_region_names(&state);
    if regions.len() < 2 {
        return;
    }
    loop {
        let now_ms = now_unix_ms();
        let drain_since_ms = now_ms - state.settings.migration_drain_window.as_millis() as i64;
        let claimed = state
            .catalog
            .claim_migrations(
                &state.node_id,
                &regions,
                now_ms + LEASE.as_millis() as i64,
                drain_since_ms,
            )
            .await;
        match claimed {
            Ok(migrations) => {
                for migration in migrations {
                    let migration_id = migration.migration_id.clone();
                    // Stopped: the next pass goes on where this one stopped.
                    let Some(outcome) =
                        crate::background::unless_stopped(&mut stop, copy_pass(&state, migration))
                            .await
                    else {
                        return;
                    };
                    if let Err(failure) = outcome {
                        warn!(%migration_id, error = %failure, "migration copy failed; it will be retried");
                        let _ = state
                            .catalog
                            .record_migration_error(&migration_id, &failure)
                            .await;
                    }
                }
            }
            Err(error) => warn!(%error, "cannot look for migrations; retrying"),
        }
        let tail = state.settings.migration_tail_interval;
        if !crate::background::next_round(&mut stop, tail, &state.migration_requested).await {
            return;
        }
    }
}

/// A source object to copy and where its copy goes.
struct SourceObject {
    store: Arc<dyn ObjectStore>,
    key: String,
    label: String,
    target_key: String,
}

/// A stored message of the source project as the target project's: `projectId` and `region`
/// replaced, everything else (the `messageId` first) kept. `None` for a message of a user deleted
/// (GDPR) from the source or the target project: it is not copied.
fn rewrite_for_target(
    line: &[u8],
    source_project: &str,
    target_project: &str,
    target_region: &str,
    erasures: &dyn ErasureFilter,
) -> Result<Option<Vec<u8>>, String> {
    let mut message: serde_json::Map<String, Value> = serde_json::from_slice(line)
        .map_err(|error| format!("an archived message is not a JSON object: {error}"))?;
    let user_id = match message.get("userId") {
        Some(Value::String(user)) => Some(user.clone()),
        Some(Value::Number(number)) => Some(number.to_string()),
        _ => None,
    };
    if let Some(user_id) = user_id {
        let received_at_ms = message
            .get("receivedAt")
            .and_then(Value::as_str)
            .and_then(parse_timestamp_ms)
            .unwrap_or(0);
        let erased = [source_project, target_project]
            .iter()
            .any(|project| erasures.is_erased(project, &user_id, received_at_ms));
        if erased {
            return Ok(None);
        }
    }
    message.insert("projectId".into(), Value::String(target_project.into()));
    message.insert("region".into(), Value::String(target_region.into()));
    serde_json::to_vec(&message)
        .map(Some)
        .map_err(|error| error.to_string())
}

/// One pass: copies every source object whose copy does not exist yet, then records the pass.
async fn copy_pass(state: &AppState, migration: RegionMigration) -> Result<(), String> {
    if !matches!(
        migration.status,
        MigrationStatus::Copying | MigrationStatus::DualWrite | MigrationStatus::Done
    ) {
        return Ok(());
    }
    let source_region = RegionId::parse(&migration.source_region).map_err(|e| e.to_string())?;
    let target_region = RegionId::parse(&migration.target_region).map_err(|e| e.to_string())?;
    let (Some(source_services), Some(target_services)) = (
        state.region_services.get(&source_region),
        state.region_services.get(&target_region),
    ) else {
        return Err(format!(
            "this node does not serve both {source_region} and {target_region}"
        ));
    };
    let source_stores = stores_of_project(
        state,
        &source_region,
        source_services,
        &migration.source_project,
    )
    .await?;
    let Some(destination) = stores_of_project(
        state,
        &target_region,
        target_services,
        &migration.target_project,
    )
    .await?
    .pop() else {
        return Err("the target project has no archive store".to_string());
    };
    let copied: HashSet<String> = bounded(
        "listing the target's archive",
        list_project_objects(
            destination.store.as_ref(),
            destination.prefix.as_deref(),
            &migration.target_project,
            None,
        ),
    )
    .await?
    .into_iter()
    .map(|object| object.key)
    .collect();
    // Days the target's retention no longer keeps are not copied (they would only be deleted
    // again by its janitor).
    let target_retention = crate::retention::EffectiveRetention::of(
        state
            .catalog
            .retention_of(&migration.target_project)
            .await
            .map_err(|e| e.to_string())?,
        crate::retention::region_default(&state.settings, target_region.as_str()),
    );
    let earliest_day_ms = target_retention
        .earliest_replayable_day_ms(now_unix_ms())
        .unwrap_or(i64::MIN);
    let mut pending = Vec::new();
    for source in source_stores {
        let listed = bounded(
            &format!("listing the source's {} archive", source.kind.as_str()),
            list_project_objects(
                source.store.as_ref(),
                source.prefix.as_deref(),
                &migration.source_project,
                Some((earliest_day_ms, i64::MAX)),
            ),
        )
        .await?;
        for object in listed {
            let label = format!("{}:{}", source.kind.as_str(), object.key);
            let target_key = object_key(
                destination.prefix.as_deref(),
                &migration.target_project,
                object.day_start_ms,
                &format!("m-{}", object_token(&label)),
            );
            if copied.contains(&target_key) {
                continue;
            }
            pending.push(SourceObject {
                store: Arc::clone(&source.store),
                key: object.key,
                label,
                target_key,
            });
        }
    }
    pending.sort_by(|left, right| left.label.cmp(&right.label));
    let mut progress = migration.progress.clone();
    progress.lag_objects = pending.len() as i64;
    let rate = state.settings.migration_max_messages_per_second as f64;
    let gzip_level = target_services.gzip_level;
    let started = Instant::now();
    let mut messages_this_pass = 0u64;
    for object in pending {
        let body = bounded(
            &format!("reading {}", object.key),
            object.store.get(&object.key),
        )
        .await?;
        // Gone since it was listed (a retention or a deletion rewrite): nothing to copy.
        let Some(body) = body else {
            progress.lag_objects -= 1;
            continue;
        };
        let (source_project, target_project, target_region_name, key) = (
            migration.source_project.clone(),
            migration.target_project.clone(),
            migration.target_region.clone(),
            object.key.clone(),
        );
        let erasures = Arc::clone(&state.keys);
        let (messages, encoded) = tokio::task::spawn_blocking(move || {
            let lines = decode_object(&key, &body).map_err(|error| error.to_string())?;
            let mut messages = Vec::with_capacity(lines.len());
            for line in &lines {
                if let Some(message) = rewrite_for_target(
                    line,
                    &source_project,
                    &target_project,
                    &target_region_name,
                    erasures.as_ref(),
                )? {
                    messages.push(message);
                }
            }
            let encoded = encode_object(messages.iter().map(Vec::as_slice), gzip_level)
                .map_err(|error| error.to_string())?;
            Ok::<_, String>((messages, encoded))
        })
        .await
        .map_err(|error| format!("rewriting {}: {error}", object.key))??;
        let message_count = messages.len() as u64;
        // The warehouse first: a target object exists only once its messages are inserted.
        if let Some(clickhouse) = &target_services.clickhouse {
            let outcome = clickhouse
                .replay_messages(
                    &format!(
                        "migration-{}-{}",
                        migration.migration_id,
                        object_token(&object.label)
                    ),
                    &migration.target_project,
                    messages,
                )
                .await
                .map_err(|error| {
                    format!("inserting {} into {target_region}: {error}", object.key)
                })?;
            progress.messages_present += outcome.present as i64;
        }
        bounded(
            &format!("writing {}", object.target_key),
            destination
                .store
                .put(&object.target_key, Bytes::from(encoded)),
        )
        .await?;
        progress.objects_copied += 1;
        progress.messages_copied += message_count as i64;
        progress.lag_objects -= 1;
        let stored = state
            .catalog
            .record_migration_progress(
                &migration.migration_id,
                &state.node_id,
                &progress,
                false,
                now_unix_ms() + LEASE.as_millis() as i64,
            )
            .await
            .map_err(|error| error.to_string())?;
        if stored.status == MigrationStatus::Cancelled {
            info!(migration_id = %migration.migration_id, objects_copied = progress.objects_copied, "migration cancelled; the copy stops");
            return Ok(());
        }
        // Live ingest keeps priority: at most `migration.max_messages_per_second` per pass.
        messages_this_pass += message_count;
        let due = Duration::from_secs_f64(messages_this_pass as f64 / rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
    debug_assert_eq!(progress.lag_objects, 0);
    let stored = state
        .catalog
        .record_migration_progress(
            &migration.migration_id,
            &state.node_id,
            &progress,
            true,
            now_unix_ms() + LEASE.as_millis() as i64,
        )
        .await
        .map_err(|error| error.to_string())?;
    if stored.status == MigrationStatus::Copying {
        let executor = Actor::system(&format!("migration-executor/{}", state.node_id));
        state
            .catalog
            .transition_migration(
                &migration.migration_id,
                MigrationStatus::DualWrite,
                None,
                &executor,
            )
            .await
            .map_err(|error| error.to_string())?;
        info!(
            migration_id = %migration.migration_id,
            objects_copied = progress.objects_copied,
            messages_copied = progress.messages_copied,
            "migration caught up: dual_write (the copy follows the source until the cutover)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_message_is_the_targets_with_its_own_message_id() {
        let line = br#"{"type":"track","messageId":"m-1","projectId":"prj_eu","region":"eu-west-1","userId":"u","receivedAt":"2026-12-01T10:00:00.000Z","properties":{"a":1}}"#;
        let nobody_erased = meridian_core::NoErasures;
        let rewritten = rewrite_for_target(line, "prj_eu", "prj_us", "us-east-1", &nobody_erased)
            .unwrap()
            .expect("copied");
        let message: Value = serde_json::from_slice(&rewritten).unwrap();
        assert_eq!(message["projectId"], "prj_us");
        assert_eq!(message["region"], "us-east-1");
        assert_eq!(message["messageId"], "m-1");
        assert_eq!(message["properties"], json!({"a": 1}));
        assert!(
            rewrite_for_target(b"[1, 2]", "prj_eu", "prj_us", "us-east-1", &nobody_erased).is_err()
        );
        struct ErasedInTarget;
        impl ErasureFilter for ErasedInTarget {
            fn is_erased(&self, project_id: &str, user_id: &str, _received_at_ms: i64) -> bool {
                project_id == "prj_us" && user_id == "u"
            }
        }
        assert_eq!(
            rewrite_for_target(line, "prj_eu", "prj_us", "us-east-1", &ErasedInTarget).unwrap(),
            None,
            "a deleted user is not copied"
        );
    }
}
