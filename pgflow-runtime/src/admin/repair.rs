//! Repairs: [`retry`] a failed run from where it failed, [`cancel`] a running one.

use pgflow::RunId;
use serde::Serialize;
use sqlx::PgPool;

use crate::admin::runs::load_definition;
use crate::catalog::step_rows;
use crate::store::tasks::{self, NewTasks};
use crate::store::{StepState, notify, runs, step_i16, step_index, steps};
use crate::{Error, RunStatus};

/// What [`retry`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RetryReport {
    /// The run, running again.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// Steps whose stored outputs (or skips) are reused (not run again).
    pub reused: Vec<String>,
    /// Failed steps (and map steps caught mid-way) whose state was cleared.
    pub cleared: Vec<String>,
    /// Steps enqueued now (their parents are all done).
    pub enqueued: Vec<String>,
}

/// Re-runs a failed run from its failed steps, reusing every completed step's
/// stored output and every skipped step's decision.
///
/// In one transaction, holding the run's row lock: checks that the run is
/// `failed`; deletes every task row the run still has (an attempt still executing
/// somewhere then has its completion rejected by the claim fence, so nothing it
/// does applies; the step is enqueued afresh instead); deletes the failed step
/// states (and a failed map step's elements: the map step runs again in full);
/// re-creates the join counters of the steps not done (parents still to complete);
/// sets the run back to `running` with no error and no completion time (its cost so
/// far is kept); enqueues every step that is not done and whose parents all are,
/// with a fresh attempt budget (a map step fans out again over its stored input).
/// Workers are notified at commit.
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::NotFailed`] for a run that is running,
/// succeeded or cancelled; [`Error::MissingDefinition`]; [`Error::Definition`] for a
/// stored step table or step state retry cannot use; database errors.
pub async fn retry(pool: &PgPool, id: RunId) -> Result<RetryReport, Error> {
    let mut tx = pool.begin().await?;
    let run = runs::detail(&mut tx, id.0, true)
        .await?
        .ok_or(Error::RunNotFound(id))?
        .run;
    if run.status != RunStatus::Failed.as_str() {
        return Err(Error::NotFailed {
            id,
            status: run.status,
        });
    }
    let (def, plan) = load_definition(&mut tx, &run.workflow, run.version).await?;
    let refuse = |message: String| Error::Definition {
        workflow: run.workflow.clone(),
        version: run.version,
        message,
    };
    let n = def.steps.len();

    tasks::delete_of_run(&mut tx, id.0).await?;
    let cleared = steps::clear_for_retry(&mut tx, id.0).await?;
    let mut done = vec![false; n];
    for s in steps::of_run(&mut tx, id.0).await? {
        let i = step_index(s.step)
            .filter(|&i| i < n)
            .ok_or_else(|| refuse(format!("run {id} has a state for unknown step {}", s.step)))?;
        match StepState::from_name(&s.status) {
            Some(StepState::Completed | StepState::Skipped) => done[i] = true,
            Some(StepState::Waiting) => {}
            _ => {
                return Err(refuse(format!(
                    "step `{}` of run {id} is in state `{}`, which retry does not know",
                    def.steps[i].name, s.status
                )));
            }
        }
    }

    let mut join_steps = Vec::new();
    let mut join_remaining = Vec::new();
    let mut ready = Vec::new();
    for &i in plan.order() {
        if done[i] {
            continue;
        }
        let left = plan.parents(i).iter().filter(|&&p| !done[p]).count();
        if plan.is_join(i) {
            join_steps.push(step_i16(i));
            join_remaining.push(i32::try_from(left).unwrap_or(i32::MAX));
        }
        if left == 0 {
            ready.push(i);
        }
    }
    if ready.is_empty() {
        return Err(refuse(format!(
            "run {id} has no step left to run; it cannot be retried"
        )));
    }
    steps::set_joins(&mut tx, id.0, &join_steps, &join_remaining).await?;
    runs::reopen(&mut tx, id.0).await?;
    let rows = step_rows(&def);
    let mut new = NewTasks::default();
    for &i in &ready {
        new.push_row(id.0, i, (&def.name, run.version, &def.queue), &rows[i]);
    }
    // Workers of the queues that got due tasks are notified at commit.
    let due = tasks::enqueue(&mut tx, &new).await?;
    notify::queues(&mut tx, &due.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    tx.commit().await?;

    let name = |i: usize| def.steps[i].name.clone();
    Ok(RetryReport {
        id: id.0,
        reused: plan
            .order()
            .iter()
            .filter(|&&i| done[i])
            .map(|&i| name(i))
            .collect(),
        cleared: cleared
            .iter()
            .filter_map(|&s| step_index(s).filter(|&i| i < n))
            .map(name)
            .collect(),
        enqueued: ready.into_iter().map(name).collect(),
        workflow: run.workflow,
    })
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// The run.
    pub id: i64,
    /// False when the run was already cancelled.
    pub cancelled: bool,
}

/// Cancels a running run: it is marked `cancelled` and its queued tasks are
/// deleted, so no further step starts. Steps executing right now finish (a runtime
/// in another process is not interrupted) and their results are discarded.
/// Cancelling a cancelled run changes nothing.
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::NotRunning`] for a run that succeeded or
/// failed; database errors.
pub async fn cancel(pool: &PgPool, id: RunId) -> Result<CancelReport, Error> {
    let row = runs::cancel(pool, id.0)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    match row.status.parse::<RunStatus>() {
        Ok(RunStatus::Running | RunStatus::Cancelled) => Ok(CancelReport {
            id: id.0,
            cancelled: row.cancelled,
        }),
        _ => Err(Error::NotRunning {
            id,
            status: row.status,
        }),
    }
}
