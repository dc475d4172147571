//! The steps every background job loop of a node shares (GDPR deletions, replays, migrations,
//! retention): which regions it works for, waiting for the next round, stopping with the node.
//! A job interrupted by a stop keeps its lease until it lapses; the node (or another) resumes it.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::state::AppState;

/// The regions this node serves, as the catalog names them (leases are claimed for these only).
pub fn served_region_names(state: &AppState) -> Vec<String> {
    state
        .region_services
        .keys()
        .map(|region| region.to_string())
        .collect()
}

/// Waits `interval`, or until `wake` is notified on this node. `false` when the node stops.
pub async fn next_round(
    stop: &mut watch::Receiver<bool>,
    interval: Duration,
    wake: &Notify,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(interval) => true,
        _ = wake.notified() => true,
        _ = stop.wait_for(|stop| *stop) => false,
    }
}

/// Waits `pause` after a failed step. `false` when the node stops.
pub async fn back_off(stop: &mut watch::Receiver<bool>, pause: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => true,
        _ = stop.wait_for(|stop| *stop) => false,
    }
}

/// `work`, unless the node stops first (`None`).
pub async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        value = work => Some(value),
        _ = stop.wait_for(|stop| *stop) => None,
    }
}
