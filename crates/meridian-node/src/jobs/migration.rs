//! Region migrations' copies: a node serving both regions copies the source project's archive
//! objects into the target project's region (rewritten with its id and region, the messageIds
//! kept), inserts what the target's warehouse lacks, and follows what the source still archives
//! until the drain window after the cutover ends. Each pass starts where the last stopped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use meridian_archive::ObjectStore;
use meridian_archive::layout::{decode_object, encode_object, object_key};
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, CatalogError, MigrationProgress, MigrationStatus, RegionMigration};
use meridian_core::timestamp::{now_unix_ms, parse_timestamp_ms};
use meridian_core::{ErasureFilter, RegionId};
use serde_json::Value;
use tokio::sync::Notify;
use tracing::info;

use super::{AfterWork, JobLabel, LEASE, LeasedJob};
use crate::error::StepError;
use crate::node::Node;
use crate::project_archive::{bounded, object_token, stores_of_project};

/// The copies of the migrations between regions this node serves.
pub struct MigrationCopies;

#[async_trait]
impl LeasedJob for MigrationCopies {
    type Job = RegionMigration;
    const NAME: &'static str = "migrations";
    const AFTER_WORK: AfterWork = AfterWork::NextRound;

    fn applies_to(&self, node: &Node) -> bool {
        node.regions.len() >= 2
    }

    async fn claim(
        &self,
        node: &Node,
        lease_until_ms: i64,
    ) -> Result<Vec<RegionMigration>, CatalogError> {
        let drain_since_ms =
            now_unix_ms() - node.settings.migration_drain_window.as_millis() as i64;
        node.catalog
            .claim_migrations(
                &node.node_id,
                &node.served_region_names(),
                lease_until_ms,
                drain_since_ms,
            )
            .await
    }

    fn label_of(migration: &RegionMigration) -> JobLabel {
        JobLabel {
            id: migration.migration_id.clone(),
            region: migration.target_region.clone(),
        }
    }

    async fn execute(&self, node: &Arc<Node>, migration: RegionMigration) -> Result<(), StepError> {
        copy_pass(node, migration).await
    }

    async fn record_failure(&self, node: &Node, migration: &JobLabel, failure: &StepError) {
        let _ = node
            .catalog
            .record_migration_error(&migration.id, &failure.to_string())
            .await;
    }

    fn poll_interval(&self, node: &Node) -> Duration {
        node.settings.migration_tail_interval
    }

    fn wake<'node>(&self, node: &'node Node) -> &'node Notify {
        &node.wakers.migration_requested
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
async fn copy_pass(node: &Node, migration: RegionMigration) -> Result<(), StepError> {
    if !matches!(
        migration.status,
        MigrationStatus::Copying | MigrationStatus::DualWrite | MigrationStatus::Done
    ) {
        return Ok(());
    }
    let source_region = RegionId::parse(&migration.source_region).map_err(|e| e.to_string())?;
    let target_region = RegionId::parse(&migration.target_region).map_err(|e| e.to_string())?;
    let (Some(source_services), Some(target_services)) =
        (node.services(&source_region), node.services(&target_region))
    else {
        return Err(StepError::new(format!(
            "this node does not serve both {source_region} and {target_region}"
        )));
    };
    let source_stores = stores_of_project(
        node,
        &source_region,
        source_services,
        &migration.source_project,
    )
    .await?;
    let Some(destination) = stores_of_project(
        node,
        &target_region,
        target_services,
        &migration.target_project,
    )
    .await?
    .pop() else {
        return Err(StepError::new("the target project has no archive store"));
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
    let target_retention = super::retention::EffectiveRetention::of(
        node.catalog
            .retention_of(&migration.target_project)
            .await
            .map_err(|e| e.to_string())?,
        super::retention::region_default(&node.settings, target_region.as_str()),
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
    let rate = node.settings.migration_max_messages_per_second as f64;
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
        let erasures = Arc::clone(&node.keys);
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
        let stored = record_progress(node, &migration, &progress, false).await?;
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
    let stored = record_progress(node, &migration, &progress, true).await?;
    if stored.status == MigrationStatus::Copying {
        let executor = Actor::system(&format!("migration-executor/{}", node.node_id));
        node.catalog
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

/// Saves the copy's progress (`pass_finished`: every object of the pass is copied) and renews the
/// lease; returns the migration as stored (an admin may have cancelled it meanwhile).
async fn record_progress(
    node: &Node,
    migration: &RegionMigration,
    progress: &MigrationProgress,
    pass_finished: bool,
) -> Result<RegionMigration, StepError> {
    Ok(node
        .catalog
        .record_migration_progress(
            &migration.migration_id,
            &node.node_id,
            progress,
            pass_finished,
            now_unix_ms() + LEASE.as_millis() as i64,
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
