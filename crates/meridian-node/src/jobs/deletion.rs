//! GDPR deletions: each claimed in its project's region, waited out until every delivery that may
//! still carry the users' data has ended, then carried out store by store (the region's ClickHouse
//! and its dead letters, the region's archive and the project's own bucket), its progress recorded
//! after every object so that another node resumes where it stopped.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_archive::ObjectStore;
use meridian_archive::rewrite::{list_project_objects, rewrite_without_users};
use meridian_catalog::{
    Actor, CatalogError, Deletion, DeletionProgress, DeletionStage, DeletionStatus,
};
use meridian_core::RegionId;
use meridian_core::timestamp::now_unix_ms;
use tokio::sync::Notify;
use tracing::info;

use super::{AfterWork, JobLabel, LEASE, LeasedJob, claim_from_first_store};
use crate::error::StepError;
use crate::node::Node;

/// The GDPR deletions of the served regions.
pub struct Deletions;

#[async_trait]
impl LeasedJob for Deletions {
    type Job = Deletion;
    const NAME: &'static str = "gdpr-deletions";
    const AFTER_WORK: AfterWork = AfterWork::ClaimAgain;

    fn applies_to(&self, node: &Node) -> bool {
        !node.stores.stores().is_empty()
    }

    async fn claim(&self, node: &Node, lease_until_ms: i64) -> Result<Vec<Deletion>, CatalogError> {
        claim_from_first_store(node, |catalog, regions| async move {
            catalog
                .claim_deletion(&node.node_id, &regions, lease_until_ms)
                .await
        })
        .await
    }

    fn label_of(deletion: &Deletion) -> JobLabel {
        JobLabel {
            id: deletion.deletion_id.clone(),
            region: deletion.region.clone(),
        }
    }

    async fn execute(&self, node: &Arc<Node>, deletion: Deletion) -> Result<(), StepError> {
        execute(node, deletion).await
    }

    async fn record_failure(&self, node: &Node, deletion: &JobLabel, failure: &StepError) {
        if let Ok(store) = node.stores.of_region(&deletion.region) {
            let _ = store
                .record_deletion_error(&deletion.id, &failure.to_string())
                .await;
        }
    }

    fn poll_interval(&self, node: &Node) -> Duration {
        node.settings.gdpr_poll_interval
    }

    fn wake<'node>(&self, node: &'node Node) -> &'node Notify {
        &node.wakers.deletion_requested
    }
}

async fn execute(node: &Arc<Node>, mut deletion: Deletion) -> Result<(), StepError> {
    let region = RegionId::parse(&deletion.region).map_err(|error| error.to_string())?;
    let Some(services) = node.services(&region).cloned() else {
        return Err(StepError::new(format!(
            "region {region} is not served here"
        )));
    };
    let store = node
        .stores
        .of_region(&deletion.region)
        .map_err(|error| error.to_string())?
        .clone();
    let executor = Actor::system(&format!("gdpr-executor/{}", node.node_id));
    let users: HashSet<String> = deletion.user_ids.iter().cloned().collect();
    let mut progress = DeletionProgress {
        clickhouse_rows_deleted: deletion.clickhouse_rows_deleted,
        archive_objects_scanned: deletion.archive_objects_scanned,
        archive_objects_rewritten: deletion.archive_objects_rewritten,
        archive_messages_removed: deletion.archive_messages_removed,
    };
    let record = |stage: DeletionStage, progress: DeletionProgress| {
        let node = Arc::clone(node);
        let store = store.clone();
        let deletion_id = deletion.deletion_id.clone();
        let executor = executor.clone();
        async move {
            let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
            store
                .record_deletion_progress(
                    &deletion_id,
                    &node.node_id,
                    stage,
                    progress,
                    lease_until_ms,
                    &executor,
                )
                .await
                .map_err(|error| error.to_string())
        }
    };

    if deletion.stage == DeletionStage::Settle {
        let settle_until_ms = settle_deadline_ms(deletion.created_at_ms, &node.settings);
        let wait_ms = (settle_until_ms - now_unix_ms()).max(0) as u64;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        record(DeletionStage::Clickhouse, progress).await?;
        deletion.stage = DeletionStage::Clickhouse;
    }

    if deletion.stage == DeletionStage::Clickhouse {
        if let Some(clickhouse) = &services.clickhouse {
            let deleted = clickhouse
                .delete_users(&deletion.project_id, &deletion.user_ids)
                .await?;
            progress.clickhouse_rows_deleted += deleted as i64;
            // The dead-letter file keeps whole messages: they go too.
            let erased = clickhouse
                .erase_dead_letters(&deletion.project_id, &deletion.user_ids)
                .await?;
            if erased > 0 {
                info!(deletion_id = %deletion.deletion_id, dead_letters_removed = erased, "GDPR deletion removed dead-lettered messages");
            }
        }
        record(DeletionStage::Archive, progress).await?;
        deletion.stage = DeletionStage::Archive;
    }

    if deletion.stage == DeletionStage::Archive {
        let mut stores: Vec<(Arc<dyn ObjectStore>, Option<String>)> = vec![(
            Arc::clone(&services.archive_store),
            services.archive_prefix.clone(),
        )];
        if let Some(storage) = node.keys.customer_storage(&deletion.project_id) {
            let (store, prefix) = node
                .customer_stores
                .store_for(
                    &node.settings.aws_region_of(region.as_str()),
                    &deletion.project_id,
                    &storage,
                )
                .await
                .map_err(|error| format!("customer bucket {}: {error}", storage.bucket))?;
            stores.push((store, Some(prefix)));
        }
        for (object_store, prefix) in stores {
            let objects = list_project_objects(
                object_store.as_ref(),
                prefix.as_deref(),
                &deletion.project_id,
                None,
            )
            .await
            .map_err(|error| error.to_string())?;
            for object in objects {
                let outcome = rewrite_without_users(
                    object_store.as_ref(),
                    &object.key,
                    &users,
                    services.gzip_level,
                )
                .await
                .map_err(|error| error.to_string())?;
                progress.archive_objects_scanned += 1;
                if outcome.rewritten {
                    progress.archive_objects_rewritten += 1;
                    progress.archive_messages_removed += outcome.messages_removed as i64;
                    record_erased_in_ledger(
                        &store,
                        &deletion.deletion_id,
                        &deletion.project_id,
                        &object.key,
                        outcome.messages_removed as u64,
                    )
                    .await?;
                }
                record(DeletionStage::Archive, progress).await?;
            }
        }
        record(DeletionStage::Finished, progress).await?;
    }

    let finished = store
        .finish_deletion(&deletion.deletion_id, DeletionStatus::Done, None, &executor)
        .await
        .map_err(|error| error.to_string())?;
    info!(
        deletion_id = %finished.deletion_id,
        project_id = %finished.project_id,
        region = %finished.region,
        clickhouse_rows_deleted = finished.clickhouse_rows_deleted,
        archive_objects_rewritten = finished.archive_objects_rewritten,
        archive_messages_removed = finished.archive_messages_removed,
        "GDPR deletion done"
    );
    Ok(())
}

/// Records in the delivery ledger what a deletion removed from one archive batch, by the batch's
/// received day (named in its key: `.../segment-logs/<project>/<day start ms>/<batch>.gz`). Keyed
/// by deletion and batch name, so a copy of the batch in a customer's bucket, or the same step run
/// again, counts once.
async fn record_erased_in_ledger(
    store: &meridian_catalog::Catalog,
    deletion_id: &str,
    project_id: &str,
    object_key: &str,
    messages_removed: u64,
) -> Result<(), StepError> {
    if messages_removed == 0 {
        return Ok(());
    }
    let mut parts = object_key.rsplit('/');
    let batch = parts.next().unwrap_or_default();
    let Some(day_start_ms) = parts.next().and_then(|day| day.parse::<i64>().ok()) else {
        return Err(StepError::new(format!(
            "archive object {object_key} does not name its received day"
        )));
    };
    store
        .record_erased(
            project_id,
            day_start_ms,
            &format!("{deletion_id}/{batch}"),
            messages_removed,
        )
        .await
        .map_err(|error| StepError::of("recording the erasure in the delivery ledger", error))
}

/// When a deletion requested at `created_at_ms` may rewrite the stores. Every node's key cache
/// learns of it within the catalog refresh interval, after which its sinks leave the users' queued
/// messages out; an attempt that began before that is cancelled by its runner (on every node) at
/// the attempt limit; and `gdpr.settle_ms` covers what a store still finishes of a request it had
/// fully received when the attempt was cancelled. So nothing with the users' data can land after.
fn settle_deadline_ms(created_at_ms: i64, settings: &crate::config::Settings) -> i64 {
    let wait =
        settings.catalog_refresh_interval + settings.retry.attempt_limit + settings.gdpr_settle;
    created_at_ms.saturating_add(wait.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deletion_waits_out_every_sink_attempt_that_may_still_carry_the_users() {
        let mut settings = crate::config::Config::from_sources(None, &Vec::new())
            .unwrap()
            .validate()
            .unwrap();
        settings.catalog_refresh_interval = Duration::from_millis(250);
        settings.retry.attempt_limit = Duration::from_secs(600);
        settings.gdpr_settle = Duration::from_secs(30);
        assert_eq!(
            settle_deadline_ms(1_000_000, &settings),
            1_000_000 + 250 + 600_000 + 30_000
        );
    }
}
