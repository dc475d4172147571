//! The background jobs of a node — GDPR deletions, replays, region migrations' copies and the
//! retention janitor — on one loop ([`run_leased_loop`]): claim work under a lease for the
//! regions this node serves, carry it out (a stop interrupts it: the lease lapses and this node,
//! or another, resumes from the recorded progress), back off after a failed step, wait for the
//! next round or to be woken, stop with the node. Each job says only what is its own
//! ([`LeasedJob`]): how it claims, how it carries out, where it records a failure.

pub mod deletion;
pub mod migration;
pub mod replay;
pub mod retention;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use meridian_catalog::CatalogError;
use meridian_core::timestamp::now_unix_ms;
use tokio::sync::Notify;
use tracing::warn;

use crate::error::StepError;
use crate::node::Node;
use crate::tasks::{Phase, RestartPolicy, TaskContext, TaskFailure};

/// How long a claimed job is this node's before another may take it over (renewed as it
/// progresses).
pub const LEASE: Duration = Duration::from_secs(60);
/// The pause after a failed step.
const STEP_FAILURE_PAUSE: Duration = Duration::from_secs(5);

/// What the loop does once it carried out what it claimed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterWork {
    /// Claim again at once (one job at a time: deletions, replays, the janitor's regions).
    ClaimAgain,
    /// Wait for the next round (passes over every claimed job: migrations' copies).
    NextRound,
}

/// Which job a step belongs to.
#[derive(Clone, Debug)]
pub struct JobLabel {
    pub id: String,
    /// The region the job runs in (a region name, as the catalog stores it).
    pub region: String,
}

/// One kind of job carried out by one node at a time under a lease.
#[async_trait]
pub trait LeasedJob: Send + Sync + 'static {
    type Job: Send + 'static;
    /// The job loop's name among the node's tasks.
    const NAME: &'static str;
    const AFTER_WORK: AfterWork;

    /// Whether this node has anything to do for this kind of job at all (else no loop runs).
    fn applies_to(&self, node: &Node) -> bool;
    /// Claims work of the node's regions until `lease_until_ms`.
    async fn claim(&self, node: &Node, lease_until_ms: i64)
    -> Result<Vec<Self::Job>, CatalogError>;
    /// The job's id and region, for logs and for recording its failures.
    fn label_of(job: &Self::Job) -> JobLabel;
    /// Carries the job out (or as far as a stop lets it: it resumes from its recorded progress).
    async fn execute(&self, node: &Arc<Node>, job: Self::Job) -> Result<(), StepError>;
    /// Records a failed step where the job's status shows it.
    async fn record_failure(&self, node: &Node, job: &JobLabel, failure: &StepError);
    /// How long to wait between rounds when there was nothing to do.
    fn poll_interval(&self, node: &Node) -> Duration;
    /// What wakes the loop early on this node.
    fn wake<'node>(&self, node: &'node Node) -> &'node Notify;
}

/// The one job loop (see the module documentation), until the node stops.
pub async fn run_leased_loop<J: LeasedJob>(
    job: Arc<J>,
    node: Arc<Node>,
    mut context: TaskContext,
) -> Result<(), TaskFailure> {
    loop {
        let lease_until_ms = now_unix_ms() + LEASE.as_millis() as i64;
        let claimed = tokio::select! {
            claimed = job.claim(&node, lease_until_ms) => claimed,
            _ = context.stopped() => return Ok(()),
        };
        let mut worked = false;
        match claimed {
            Ok(jobs) => {
                for claimed in jobs {
                    worked = true;
                    let label = J::label_of(&claimed);
                    let outcome = tokio::select! {
                        outcome = job.execute(&node, claimed) => outcome,
                        _ = context.stopped() => return Ok(()),
                    };
                    if let Err(failure) = outcome {
                        warn!(job = J::NAME, job_id = %label.id, region = %label.region, error = %failure, "a job step failed; it will be retried");
                        job.record_failure(&node, &label, &failure).await;
                        tokio::select! {
                            _ = tokio::time::sleep(STEP_FAILURE_PAUSE) => {}
                            _ = context.stopped() => return Ok(()),
                        }
                    }
                }
            }
            Err(error) => warn!(job = J::NAME, %error, "cannot look for jobs; retrying"),
        }
        if worked && J::AFTER_WORK == AfterWork::ClaimAgain {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(job.poll_interval(&node)) => {}
            _ = job.wake(&node).notified() => {}
            _ = context.stopped() => return Ok(()),
        }
    }
}

/// Claims one job from the first regional store that has one for this node (the stores of the
/// served regions asked in turn): `claim` gets a store's catalog and its region names.
pub(crate) async fn claim_from_first_store<Job, Claim, Claiming>(
    node: &Node,
    claim: Claim,
) -> Result<Vec<Job>, CatalogError>
where
    Claim: Fn(meridian_catalog::Catalog, Vec<String>) -> Claiming,
    Claiming: std::future::Future<Output = Result<Option<Job>, CatalogError>>,
{
    for store in node.stores.stores() {
        if let Some(job) = claim(store.catalog.clone(), store.region_names()).await? {
            return Ok(vec![job]);
        }
    }
    Ok(Vec::new())
}

/// Hands every job loop to the node's supervisor.
pub fn start_all(node: &Arc<Node>) {
    spawn_job(node, deletion::Deletions);
    spawn_job(node, replay::Replays);
    spawn_job(node, retention::RetentionJanitor);
    spawn_job(node, migration::MigrationCopies);
}

/// Hands a job loop to the supervisor, unless this node has nothing to do for it.
fn spawn_job<J: LeasedJob>(node: &Arc<Node>, job: J) {
    if !job.applies_to(node) {
        return;
    }
    let job = Arc::new(job);
    let loop_node = Arc::clone(node);
    node.supervisor.spawn(
        J::NAME,
        Phase::Background,
        RestartPolicy::default(),
        move |context| run_leased_loop(Arc::clone(&job), Arc::clone(&loop_node), context),
    );
}
