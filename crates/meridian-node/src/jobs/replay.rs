//! Replays: the project's archive objects of a day range inserted back into the region's
//! ClickHouse where it lacks them, object by object, the progress recorded after each so that
//! another node resumes after the last one; at most `replay.max_messages_per_second` per node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use meridian_archive::ObjectStore;
use meridian_archive::layout::decode_object;
use meridian_archive::rewrite::list_project_objects;
use meridian_catalog::{Actor, CatalogError, Replay, ReplayStatus};
use meridian_core::RegionId;
use meridian_core::timestamp::now_unix_ms;
use tokio::sync::Notify;
use tracing::info;

use super::{AfterWork, JobLabel, LEASE, LeasedJob, claim_from_first_store};
use crate::error::StepError;
use crate::node::Node;
use crate::project_archive::{ProjectStore, bounded, object_token, stores_of_project};
use crate::region::RegionServices;

/// The replays of the served regions.
pub struct Replays;

#[async_trait]
impl LeasedJob for Replays {
    type Job = Replay;
    const NAME: &'static str = "replays";
    const AFTER_WORK: AfterWork = AfterWork::ClaimAgain;

    fn applies_to(&self, node: &Node) -> bool {
        !node.stores.stores().is_empty()
    }

    async fn claim(&self, node: &Node, lease_until_ms: i64) -> Result<Vec<Replay>, CatalogError> {
        claim_from_first_store(node, |catalog, regions| async move {
            catalog
                .claim_replay(&node.node_id, &regions, lease_until_ms)
                .await
        })
        .await
    }

    fn label_of(replay: &Replay) -> JobLabel {
        JobLabel {
            id: replay.replay_id.clone(),
            region: replay.region.clone(),
        }
    }

    async fn execute(&self, node: &Arc<Node>, replay: Replay) -> Result<(), StepError> {
        execute(node, replay).await
    }

    async fn record_failure(&self, node: &Node, replay: &JobLabel, failure: &StepError) {
        if let Ok(store) = node.stores.of_region(&replay.region) {
            let _ = store
                .record_replay_error(&replay.id, &failure.to_string())
                .await;
        }
    }

    fn poll_interval(&self, node: &Node) -> Duration {
        node.settings.replay_poll_interval
    }

    fn wake<'node>(&self, node: &'node Node) -> &'node Notify {
        &node.wakers.replay_requested
    }
}

/// One archive object to replay, named for the progress record as `<store>:<key>`.
struct ReplayObject {
    store: Arc<dyn ObjectStore>,
    key: String,
    label: String,
}

/// The project's archive objects of the replay's days, in every store that holds its archive,
/// in the order the progress record counts them.
async fn objects_to_replay(
    node: &Node,
    region: &RegionId,
    services: &RegionServices,
    replay: &Replay,
) -> Result<Vec<ReplayObject>, StepError> {
    let stores = stores_of_project(node, region, services, &replay.project_id).await?;
    let mut objects = Vec::new();
    for ProjectStore {
        kind,
        store,
        prefix,
    } in stores
    {
        let name = kind.as_str();
        let listed = bounded(
            &format!("listing the {name} archive"),
            list_project_objects(
                store.as_ref(),
                prefix.as_deref(),
                &replay.project_id,
                Some((replay.from_day_ms, replay.to_day_ms)),
            ),
        )
        .await?;
        for object in listed {
            objects.push(ReplayObject {
                store: Arc::clone(&store),
                label: format!("{name}:{}", object.key),
                key: object.key,
            });
        }
    }
    objects.sort_by(|left, right| left.label.cmp(&right.label));
    Ok(objects)
}

async fn execute(node: &Node, replay: Replay) -> Result<(), StepError> {
    let region = RegionId::parse(&replay.region).map_err(StepError::new)?;
    let Some(services) = node.services(&region).cloned() else {
        return Err(StepError::new(format!(
            "region {region} is not served here"
        )));
    };
    let store = node
        .stores
        .of_region(&replay.region)
        .map_err(|error| error.to_string())?
        .clone();
    let executor = Actor::system(&format!("replay-executor/{}", node.node_id));
    let finish = |status: ReplayStatus, error: Option<String>| {
        let store = store.clone();
        let replay_id = replay.replay_id.clone();
        let executor = executor.clone();
        async move {
            store
                .finish_replay(&replay_id, status, error.as_deref(), &executor)
                .await
                .map_err(|error| error.to_string())
        }
    };
    if replay.cancel_requested {
        finish(ReplayStatus::Cancelled, None).await?;
        return Ok(());
    }
    let Some(clickhouse) = services.clickhouse.clone() else {
        finish(
            ReplayStatus::Failed,
            Some(format!("region {region} has no ClickHouse configured")),
        )
        .await?;
        return Ok(());
    };
    let objects = objects_to_replay(node, &region, &services, &replay).await?;
    let mut progress = replay.progress.clone();
    progress.objects_total = objects.len() as i64;
    let rate = node.settings.replay_max_messages_per_second as f64;
    let started = Instant::now();
    let mut messages_this_run = 0u64;
    for object in objects {
        let already_done = progress
            .last_object
            .as_deref()
            .is_some_and(|last| object.label.as_str() <= last);
        if already_done {
            continue;
        }
        let body = bounded(
            &format!("reading {}", object.key),
            object.store.get(&object.key),
        )
        .await?;
        // Gone since it was listed (a retention or a deletion rewrite): nothing to replay in it.
        let messages = match body {
            Some(body) => decode_object(&object.key, &body).map_err(|error| error.to_string())?,
            None => Vec::new(),
        };
        let source = format!(
            "replay-{}-{}",
            replay.replay_id,
            object_token(&object.label)
        );
        let outcome = clickhouse
            .replay_messages(&source, &replay.project_id, messages)
            .await
            .map_err(|error| format!("inserting {}: {error}", object.key))?;
        progress.objects_done += 1;
        progress.last_object = Some(object.label.clone());
        progress.messages_read += outcome.read as i64;
        progress.messages_inserted += outcome.inserted as i64;
        progress.messages_present += outcome.present as i64;
        progress.messages_erased += outcome.erased as i64;
        progress.messages_refused += outcome.refused as i64;
        let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
        let stored = store
            .record_replay_progress(&replay.replay_id, &node.node_id, &progress, lease_until_ms)
            .await
            .map_err(|error| error.to_string())?;
        if stored.cancel_requested {
            let cancelled = finish(ReplayStatus::Cancelled, None).await?;
            info!(replay_id = %cancelled.replay_id, objects_done = progress.objects_done, "replay cancelled");
            return Ok(());
        }
        // Live ingest keeps priority: at most `replay.max_messages_per_second` on this node.
        messages_this_run += outcome.read;
        let due = Duration::from_secs_f64(messages_this_run as f64 / rate);
        if let Some(ahead) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
    let finished = finish(ReplayStatus::Done, None).await?;
    info!(
        replay_id = %finished.replay_id,
        project_id = %finished.project_id,
        region = %finished.region,
        messages_read = progress.messages_read,
        messages_inserted = progress.messages_inserted,
        messages_present = progress.messages_present,
        messages_erased = progress.messages_erased,
        "replay done"
    );
    Ok(())
}
