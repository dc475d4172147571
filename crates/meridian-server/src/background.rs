//! The steps every background job loop of a node shares (GDPR deletions, replays, migrations,
//! retention): which regions it works for, waiting for the next round, stopping with the node.
//! A job interrupted by a stop keeps its lease until it lapses; the node (or another) resumes it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::error;

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

/// The longest pause before a job loop that panicked is started again.
const MAX_RESTART_PAUSE: Duration = Duration::from_secs(60);

/// Runs the job loop `start` makes until it ends (the node stops, or there is nothing for it to
/// do). A loop that panics is logged, counted (`meridian_background_restarts_total{job}`) and
/// started again after a pause (1 s, doubling to 60 s): a bug in one job never silently stops it.
pub fn supervise<Start, Loop>(
    job: &'static str,
    metrics: Arc<crate::metrics::Metrics>,
    mut stop: watch::Receiver<bool>,
    start: Start,
) -> JoinHandle<()>
where
    Start: Fn(watch::Receiver<bool>) -> Loop + Send + 'static,
    Loop: Future<Output = ()> + Send + 'static,
{
    metrics.initialize_background_job(job);
    tokio::spawn(async move {
        let mut pause = Duration::from_secs(1);
        loop {
            match tokio::spawn(start(stop.clone())).await {
                Ok(()) => return,
                Err(failure) if failure.is_panic() => {
                    error!(job, "background job panicked; it is started again");
                    metrics.background_restarted(job);
                }
                Err(_) => return,
            }
            if !back_off(&mut stop, pause).await {
                return;
            }
            pause = (pause * 2).min(MAX_RESTART_PAUSE);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_job_that_panics_is_started_again_and_counted() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let (_stop_sender, stop) = watch::channel(false);
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let supervisor = supervise("test-job", Arc::clone(&metrics), stop, move |_stop| {
            let counted = Arc::clone(&counted);
            async move {
                if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("a bug in the job");
                }
            }
        });
        supervisor
            .await
            .expect("the supervisor itself ends cleanly");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "two panics, then a run that ended"
        );
        let mut text = String::new();
        metrics.encode_registry(&mut text);
        assert!(
            text.contains("meridian_background_restarts_total{job=\"test-job\"} 2"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_node_stops_the_restarts() {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let (stop_sender, stop) = watch::channel(false);
        let supervisor = supervise("always-panics", metrics, stop, |_stop| async {
            panic!("always");
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _ = stop_sender.send(true);
        tokio::time::timeout(Duration::from_secs(120), supervisor)
            .await
            .expect("the supervisor ends once the node stops")
            .expect("cleanly");
    }
}
