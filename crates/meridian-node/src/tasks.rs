//! The one owner of a node's long-lived tasks (Vector's topology, Quickwit's actor supervisor):
//! every task is named, started by [`Supervisor::spawn`], restarted with a doubling back-off when
//! it panics or fails, counted (`meridian_task_restarts_total{task}`), shown while it is down
//! ([`Supervisor::down_tasks`], which `/readyz` reads), and joined with a deadline when the node
//! stops ([`Supervisor::shutdown`]). Nothing else in a node calls `tokio::spawn` for a task that
//! outlives a request.
//!
//! Tasks stop in two phases: first those that deliver the queues (`Phase::Deliver`: they are told
//! to drain, and finish what is durable), then every other (`Phase::Background`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// Why a run of a task ended other than by the node stopping.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TaskFailure(pub String);

impl TaskFailure {
    pub fn new(reason: impl std::fmt::Display) -> TaskFailure {
        TaskFailure(meridian_core::redact_url(&reason.to_string()))
    }
}

/// When a task stops at shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Delivery runners: told to drain first, and waited for (they flush what is durable).
    Deliver,
    /// Everything else: stopped once the deliverers are done.
    Background,
}

/// How long a failed task waits before it runs again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub first_pause: Duration,
    pub max_pause: Duration,
    /// A run that lasted this long before failing starts the back-off over.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            first_pause: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// What a task is doing now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Running,
    /// Down after a failure, to be started again.
    Restarting {
        reason: String,
        restarts: u64,
    },
    /// Ended (the node stops, or the task had nothing left to do).
    Finished,
}

/// A task's view of the node: whether it must stop.
#[derive(Clone)]
pub struct TaskContext {
    stop: watch::Receiver<bool>,
}

impl TaskContext {
    /// A receiver that becomes `true` when the task must stop (for the deliverers: drain).
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.clone()
    }

    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves when the task must stop.
    pub async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }
}

struct Registered {
    name: String,
    phase: Phase,
    handle: JoinHandle<()>,
}

pub struct Supervisor {
    deliver_stop: watch::Sender<bool>,
    background_stop: watch::Sender<bool>,
    states: Arc<Mutex<BTreeMap<String, TaskState>>>,
    tasks: Mutex<Vec<Registered>>,
    /// Per task: notified, its current run panics (see [`Supervisor::inject_panic`]).
    faults: Mutex<HashMap<String, Arc<Notify>>>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>) -> Supervisor {
        Supervisor {
            deliver_stop: watch::channel(false).0,
            background_stop: watch::channel(false).0,
            states: Arc::new(Mutex::new(BTreeMap::new())),
            tasks: Mutex::new(Vec::new()),
            faults: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Makes the current run of task `name` panic, as a bug in it would: for the supervision
    /// tests, which check that every task is restarted, counted and shown while down. `false`
    /// when there is no such task.
    pub fn inject_panic(&self, name: &str) -> bool {
        let faults = self
            .faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match faults.get(name) {
            Some(fault) => {
                fault.notify_one();
                true
            }
            None => false,
        }
    }

    fn set_state(states: &Mutex<BTreeMap<String, TaskState>>, name: &str, state: TaskState) {
        states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.to_string(), state);
    }

    /// Starts the task `run` makes, and again after every panic or failure (after the policy's
    /// pause), until it returns `Ok` or the node stops.
    pub fn spawn<Start, Run>(
        &self,
        name: impl Into<String>,
        phase: Phase,
        policy: RestartPolicy,
        start: Start,
    ) where
        Start: Fn(TaskContext) -> Run + Send + Sync + 'static,
        Run: Future<Output = Result<(), TaskFailure>> + Send + 'static,
    {
        let name = name.into();
        let stop = match phase {
            Phase::Deliver => self.deliver_stop.subscribe(),
            Phase::Background => self.background_stop.subscribe(),
        };
        let states = Arc::clone(&self.states);
        let metrics = Arc::clone(&self.metrics);
        let fault = Arc::new(Notify::new());
        self.faults
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(name.clone(), Arc::clone(&fault));
        metrics.initialize_task(&name);
        Self::set_state(&states, &name, TaskState::Running);
        let task_name = name.clone();
        let handle = tokio::spawn(async move {
            let name = task_name;
            let mut stop = stop;
            let mut pause = policy.first_pause;
            let mut restarts = 0u64;
            loop {
                let started = tokio::time::Instant::now();
                let this_run = start(TaskContext { stop: stop.clone() });
                let fault = Arc::clone(&fault);
                let fault_name = name.clone();
                let run = tokio::spawn(async move {
                    tokio::select! {
                        outcome = this_run => outcome,
                        _ = fault.notified() => panic!("a panic injected into {fault_name}"),
                    }
                });
                let reason = match run.await {
                    Ok(Ok(())) => break,
                    Ok(Err(failure)) => failure.0,
                    Err(join_error) if join_error.is_panic() => {
                        format!("panicked: {}", panic_message(join_error))
                    }
                    Err(_) => break,
                };
                if *stop.borrow() {
                    break;
                }
                if started.elapsed() >= policy.healthy_after {
                    pause = policy.first_pause;
                }
                restarts += 1;
                metrics.task_restarted(&name);
                error!(task = %name, %reason, restarts, restart_in_ms = pause.as_millis() as u64, "a node task failed; it is started again after a pause");
                Self::set_state(&states, &name, TaskState::Restarting { reason, restarts });
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.wait_for(|stop| *stop) => break,
                }
                pause = (pause * 2).min(policy.max_pause);
                Self::set_state(&states, &name, TaskState::Running);
                info!(task = %name, "node task started again");
            }
            Self::set_state(&states, &name, TaskState::Finished);
        });
        self.tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Registered {
                name,
                phase,
                handle,
            });
    }

    /// Every task's state, by name.
    pub fn states(&self) -> BTreeMap<String, TaskState> {
        self.states
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Whether the task `name` is down after a failure (waiting to start again).
    pub fn is_down(&self, name: &str) -> bool {
        matches!(
            self.states
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .get(name),
            Some(TaskState::Restarting { .. })
        )
    }

    /// The tasks down after a failure: `(name, reason)`.
    pub fn down_tasks(&self) -> Vec<(String, String)> {
        self.states()
            .into_iter()
            .filter_map(|(name, state)| match state {
                TaskState::Restarting { reason, .. } => Some((name, reason)),
                _ => None,
            })
            .collect()
    }

    /// Stops the tasks of `phase` and waits for them until `deadline`; returns the names of those
    /// still running then (they are aborted).
    pub async fn stop_phase(&self, phase: Phase, deadline: tokio::time::Instant) -> Vec<String> {
        let _ = match phase {
            Phase::Deliver => self.deliver_stop.send(true),
            Phase::Background => self.background_stop.send(true),
        };
        let tasks: Vec<Registered> = {
            let mut tasks = self
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let (stopping, staying) = tasks.drain(..).partition(|task| task.phase == phase);
            *tasks = staying;
            stopping
        };
        let mut late = Vec::new();
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task.handle)
                .await
                .is_err()
            {
                warn!(task = %task.name, "a node task did not stop by the deadline; it is cut off");
                task.handle.abort();
                late.push(task.name);
            }
        }
        late
    }

    /// Stops every task: the deliverers first, then the rest, all by `deadline`.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) -> Vec<String> {
        let mut late = self.stop_phase(Phase::Deliver, deadline).await;
        late.extend(self.stop_phase(Phase::Background, deadline).await);
        late
    }
}

fn panic_message(join_error: tokio::task::JoinError) -> String {
    let payload = join_error.into_panic();
    if let Some(text) = payload.downcast_ref::<&str>() {
        return (*text).to_string();
    }
    if let Some(text) = payload.downcast_ref::<String>() {
        return text.clone();
    }
    "a panic without a message".to_string()
}
