//! Applying a batch of completions in one transaction: the flush.
//!
//! The phases, in order (each one statement, skipped when it has nothing to do):
//!
//! 1. **fence** — task rows are deleted (or, for a retry or a release, put back)
//!    *only where they still carry the completion's claim token*: a completion whose
//!    claim was lost changes nothing and is reported as rejected (see
//!    [`tasks`](super::tasks) for why tokens are random and per batch);
//! 2. **elements** — outputs of map elements are stored and their map steps counted
//!    down; a map step whose last element completed is done;
//! 3. **step states** — outputs of completed steps, skipped steps with their reason,
//!    failed steps with their history (a map step's output is aggregated from its
//!    elements in SQL, `jsonb_agg` in element order: it never leaves Postgres);
//! 4. **joins** — steps with several parents are counted down; those at zero are
//!    ready;
//! 5. **enqueue** — ready children get tasks (map children fan out in SQL, from the
//!    output stored in phase 3);
//! 6. **finish** / 7. **fail** — runs whose terminal step is done succeed; runs with
//!    a failed step fail and lose their pending tasks;
//! 8. **costs** — what steps reported is added to their runs;
//! 9. **notify** — queues that got due tasks are notified, inside the transaction.
//!
//! Everything commits together: a step's output is durable before any child can
//! start, and a run's completion and each step's output apply exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::{AttemptFailure, RunError};
use sqlx::PgConnection;

mod fence;
mod write;

use write::{
    ElementRows, FailedRuns, FinishedRuns, JoinHits, Settle, StepStateRow, StepStateRows,
    UsageRows, add_costs, complete_elements, count_down_joins, fail_runs, finish_runs,
    record_usage, store_step_states,
};

use crate::catalog::{Catalog, Entry};
use crate::store::tasks::{self, NewTasks};
use crate::store::{StepState, notify, runs, step_i16, step_index, subflows};

/// How an attempt ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The step's output (or one element's, for an element task), as JSON text.
    Succeeded(String),
    /// A conditional step's predicate was false: it completes without output.
    Skipped { reason: String },
    /// A map step's task without an element found a non-empty array to map over
    /// (a task enqueued before the fan-out happened in SQL): fan it out now.
    FanOut,
    /// A retryable failure with attempts left: back to the queue after `delay`.
    Retry {
        delay: Duration,
        failure: AttemptFailure,
    },
    /// The step snoozed: back to the queue after `delay`, the attempt not counted
    /// (the task's `snoozes` is).
    Snooze { delay: Duration },
    /// A rate limit had no room: back to the queue after `delay` (the window's end),
    /// neither an attempt nor a snooze counted.
    Throttled { delay: Duration },
    /// A permanent failure or the last attempt: the run fails with `history`.
    Failed {
        history: Vec<AttemptFailure>,
        element: Option<usize>,
    },
    /// The step returned a `Subflow`: start the child run (unless the step already
    /// started it: same key) and park the task until the child finishes.
    StartChild(ChildRun),
    /// A task woken while its child still runs: park it again.
    AwaitChild { child_run_id: i64 },
    /// The step was not started: its run's budget has no room for its estimate. The
    /// run fails with this error (`RunError::BudgetExceeded`).
    OverBudget { error: Box<RunError> },
    /// The run is no longer running (cancelled or failed): drop the task.
    Discard,
    /// Give the task back without counting the attempt (shutdown, or a run whose
    /// workflow this instance does not serve any more).
    Release,
}

/// The child run a step asked for.
#[derive(Debug, Clone)]
pub(crate) struct ChildRun {
    /// The child workflow version (linked: it is in the catalog).
    pub(crate) workflow: &'static str,
    pub(crate) version: i32,
    /// Its input, as JSON text.
    pub(crate) input: String,
}

impl Outcome {
    /// Whether the task row goes back to the queue (rather than leaving it).
    fn requeues(&self) -> bool {
        matches!(
            self,
            Self::Retry { .. }
                | Self::Snooze { .. }
                | Self::Throttled { .. }
                | Self::Release
                | Self::StartChild(_)
                | Self::AwaitChild { .. }
        )
    }

    /// Whether the task waits for a child run once put back.
    pub(super) fn parks_for_child(&self) -> bool {
        matches!(self, Self::StartChild(_) | Self::AwaitChild { .. })
    }
}

/// One finished (or abandoned) claim, waiting to be flushed.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub(crate) task_id: i64,
    /// The claim token it was claimed with (its fence).
    pub(crate) token: i64,
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
    pub(crate) workflow: &'static str,
    pub(crate) version: i32,
    pub(crate) attempt: i32,
    pub(crate) outcome: Outcome,
    pub(crate) cost_cents: i64,
    /// What the attempt reported per model (`ctx.add_usage`), for the ledger.
    pub(crate) usage: Vec<pgflow::Usage>,
}

impl Completion {
    /// About how many bytes it adds to a flush (its output, reason or errors).
    pub(crate) fn size(&self) -> usize {
        64 + match &self.outcome {
            Outcome::Succeeded(output) => output.len(),
            Outcome::Skipped { reason } => reason.len(),
            Outcome::Retry { failure, .. } => failure.message.len(),
            Outcome::Failed { history, .. } => history.iter().map(|f| f.message.len() + 32).sum(),
            Outcome::OverBudget { .. } => 256,
            Outcome::StartChild(child) => child.input.len(),
            Outcome::FanOut
            | Outcome::Snooze { .. }
            | Outcome::Throttled { .. }
            | Outcome::AwaitChild { .. }
            | Outcome::Discard
            | Outcome::Release => 0,
        }
    }

    /// This completion as the permanent failure of its step, with the message of the
    /// database that refused `what` (its result; a transactional step's writes).
    pub(crate) fn refused(mut self, e: &sqlx::Error, what: &str) -> Self {
        let reason = e
            .as_database_error()
            .map_or_else(|| e.to_string(), ToString::to_string);
        let err = pgflow::StepError::permanent(format!("the database refused {what}: {reason}"));
        let attempt = u32::try_from(self.attempt).unwrap_or(1);
        self.outcome = Outcome::Failed {
            history: vec![AttemptFailure::new(attempt, &err)],
            element: self.element.and_then(|e| usize::try_from(e).ok()),
        };
        self
    }

    /// The claim this completes: (task, token).
    fn claim(&self) -> (i64, i64) {
        (self.task_id, self.token)
    }
}

/// What a flush did.
#[derive(Debug, Default)]
pub(crate) struct Flushed {
    /// Completions whose claim was lost: nothing of them was applied. With the
    /// step they are of: (task id, workflow, version, step).
    pub(crate) rejected: Vec<(i64, &'static str, i32, i16)>,
    /// Runs that finished (succeeded or failed) in this flush.
    pub(crate) finished_runs: Vec<i64>,
    /// Of those, the ones that succeeded and failed, with their workflow.
    pub(crate) succeeded: Vec<(i64, &'static str)>,
    pub(crate) failed: Vec<(i64, &'static str)>,
    /// Queues that received tasks due now.
    pub(crate) queues: HashSet<String>,
    /// Child runs cancelled because their parent failed.
    pub(crate) cancelled_runs: Vec<i64>,
}

impl Flushed {
    /// Adds what another flush did.
    pub(crate) fn extend(&mut self, other: Flushed) {
        self.rejected.extend(other.rejected);
        self.finished_runs.extend(other.finished_runs);
        self.succeeded.extend(other.succeeded);
        self.failed.extend(other.failed);
        self.queues.extend(other.queues);
        self.cancelled_runs.extend(other.cancelled_runs);
    }
}

/// Applies `batch` inside the caller's transaction (see the module docs).
/// `should_notify` says which queues with new due tasks to NOTIFY (the caller's
/// debounce); the others are only reported in [`Flushed::queues`].
pub(crate) async fn apply(
    conn: &mut PgConnection,
    catalog: &Catalog,
    instance: &str,
    batch: &[Completion],
    should_notify: &mut (dyn FnMut(&str) -> bool + Send),
) -> Result<Flushed, sqlx::Error> {
    let mut out = Flushed::default();
    // Children of tasks parking again: locked before the fence locks the tasks
    // (see `store::subflows`).
    let mut awaited: Vec<i64> = batch
        .iter()
        .filter_map(|c| match c.outcome {
            Outcome::AwaitChild { child_run_id } => Some(child_run_id),
            _ => None,
        })
        .collect();
    if !awaited.is_empty() {
        awaited.sort_unstable();
        subflows::lock_children(conn, &awaited).await?;
    }
    let applied = fence::fence(conn, batch, &mut out).await?;
    let mut work = Work::default();
    let ledger = account_usage(batch, &applied, catalog, &mut work.costs);

    for a in applied {
        let c = a.completion;
        if a.released != fence::Released::default() {
            let s = work.costs.entry(c.run_id).or_default();
            s.release_cents += a.released.cents;
            s.release_tokens += a.released.tokens;
        }
        let Some(flow) = catalog.get(c.workflow, c.version) else {
            continue;
        };
        work.sort(flow, c, a.started_at);
    }
    record_usage(conn, instance, &ledger).await?;
    for (flow, run_id, step) in complete_elements(conn, instance, &work.elements).await? {
        work.done.push(FinishedStep {
            flow,
            run_id,
            step,
            attempts: 1,
            output: StepResult::FromElements,
            cost_cents: 0,
            started_at: None,
        });
    }
    work.route_done();
    start_children(conn, catalog, &work.children).await?;
    out.queues.extend(subflows::link(conn, &work.links).await?);
    store_step_states(conn, instance, &work.states).await?;
    count_down_joins(conn, catalog, &work.join_hits, &mut work.ready).await?;
    out.queues.extend(tasks::enqueue(conn, &work.ready).await?);
    let name = |id: &i64| (*id, work.workflows.get(id).copied().unwrap_or(""));
    let succeeded = finish_runs(conn, instance, &work.finished).await?;
    let failed = fail_runs(conn, instance, &work.failed).await?;
    // Children that finished wake their parents' tasks; failed runs cancel their
    // own children (nobody will read their outputs).
    let children: Vec<i64> = succeeded
        .iter()
        .chain(&failed)
        .filter(|r| r.has_parent)
        .map(|r| r.id)
        .collect();
    out.queues
        .extend(subflows::wake_parents(conn, &children).await?);
    // (also deletes their tasks again, in a later statement: a task a concurrent flush
    // parked while `fail_runs` waited for its lock on the run is seen now)
    let failed_parents: Vec<i64> = failed
        .iter()
        .filter(|r| work.with_subflows.contains(&r.id))
        .map(|r| r.id)
        .collect();
    if !failed_parents.is_empty() {
        out.cancelled_runs
            .extend(runs::cancel_descendants(conn, &failed_parents).await?);
    }
    out.succeeded.extend(succeeded.iter().map(|r| name(&r.id)));
    out.finished_runs.extend(succeeded.iter().map(|r| r.id));
    out.failed.extend(failed.iter().map(|r| name(&r.id)));
    out.finished_runs.extend(failed.iter().map(|r| r.id));
    add_costs(conn, work.costs).await?;
    let to_notify: Vec<&str> = out
        .queues
        .iter()
        .map(String::as_str)
        .filter(|q| should_notify(q))
        .collect();
    notify::queues(conn, &to_notify).await?;
    Ok(out)
}

/// What every attempt of `batch` reported, its claim lost or not (it was paid for):
/// the ledger rows, the runs' tokens, and the cost of the attempts whose completion
/// the fence rejected (an applied one's cost is counted by its phase). Nothing to do,
/// and nothing allocated, when no attempt reported usage (the common case).
fn account_usage<'b>(
    batch: &'b [Completion],
    applied: &[fence::Applied<'b>],
    catalog: &Catalog,
    costs: &mut foldhash::HashMap<i64, Settle>,
) -> UsageRows {
    let mut ledger = UsageRows::default();
    if batch.iter().all(|c| c.usage.is_empty()) {
        return ledger;
    }
    let passed: HashSet<(i64, i64)> = applied.iter().map(|a| a.completion.claim()).collect();
    for c in batch.iter().filter(|c| !c.usage.is_empty()) {
        let s = costs.entry(c.run_id).or_default();
        for u in &c.usage {
            s.tokens_in += i64::try_from(u.tokens_in).unwrap_or(i64::MAX);
            s.tokens_out += i64::try_from(u.tokens_out).unwrap_or(i64::MAX);
        }
        if !passed.contains(&c.claim()) {
            s.cents += c.cost_cents;
        }
        let step = catalog
            .get(c.workflow, c.version)
            .map_or("?", |f| f.step_name(c.step));
        ledger.push(c, step);
    }
    ledger
}

/// Child runs to start, grouped by workflow version (one start statement each).
#[derive(Default)]
struct Children {
    by_workflow: HashMap<(&'static str, i32), runs::NewRuns>,
}

impl Children {
    fn push(&mut self, c: &Completion, step_name: &'static str, child: &ChildRun, key: String) {
        let new = self
            .by_workflow
            .entry((child.workflow, child.version))
            .or_default();
        new.push(
            child.input.clone(),
            runs::RunOptions {
                idempotency_key: Some(key),
                ..runs::RunOptions::default()
            },
        );
        new.parent_runs.push(c.run_id);
        new.parent_steps.push(step_name);
        new.parent_elements.push(c.element);
    }
}

/// Starts the child runs (a key already taken starts nothing: the step started its
/// child before), each workflow version in one statement, in a stable order.
async fn start_children(
    conn: &mut PgConnection,
    catalog: &Catalog,
    children: &Children,
) -> Result<(), sqlx::Error> {
    let mut groups: Vec<_> = children.by_workflow.iter().collect();
    groups.sort_unstable_by_key(|(k, _)| **k);
    for (&(workflow, version), new) in groups {
        // The executor checked that the child is linked; a version missing here
        // leaves its parent task due (unlinked), to run again.
        if let Some(flow) = catalog.get(workflow, version) {
            runs::start(conn, &runs::Shape::of_entry(flow), new).await?;
        }
    }
    Ok(())
}

/// What a step that is done in this flush produced.
enum StepResult<'c> {
    /// Its output, as JSON text.
    Output(&'c str),
    /// Skipped, with the reason.
    Skipped(&'c str),
    /// A map step whose elements all completed: its output is aggregated from
    /// `step_elements` in SQL.
    FromElements,
}

/// A step that is done in this flush.
struct FinishedStep<'c> {
    flow: &'c Entry,
    run_id: i64,
    step: i16,
    attempts: i32,
    output: StepResult<'c>,
    cost_cents: i64,
    /// When its (last) attempt started; for a map step, its elements' earliest.
    started_at: Option<DateTime<Utc>>,
}

/// What the applied completions amount to, sorted by phase.
#[derive(Default)]
struct Work<'c> {
    done: Vec<FinishedStep<'c>>,
    elements: ElementRows<'c>,
    states: StepStateRows<'c>,
    join_hits: JoinHits,
    ready: NewTasks<'static>,
    finished: FinishedRuns<'c>,
    failed: FailedRuns,
    costs: foldhash::HashMap<i64, Settle>,
    /// The workflow of each run touched, for the log.
    workflows: foldhash::HashMap<i64, &'static str>,
    /// Child runs to start, and parent tasks to link to their children.
    children: Children,
    links: subflows::Links<'static>,
    /// Runs touched whose workflow has subflow steps (a failure cancels children).
    with_subflows: foldhash::HashSet<i64>,
}

impl<'c> Work<'c> {
    fn sort(&mut self, flow: &'c Entry, c: &'c Completion, started_at: Option<DateTime<Utc>>) {
        self.workflows.insert(c.run_id, flow.def.name());
        if flow.has_subflows {
            self.with_subflows.insert(c.run_id);
        }
        match &c.outcome {
            Outcome::StartChild(child) => {
                let key = subflows::child_key(c.run_id, c.step, c.element);
                self.children
                    .push(c, flow.step_name(c.step), child, key.clone());
                self.links.task_ids.push(c.task_id);
                self.links.child_ids.push(None);
                self.links.workflows.push(child.workflow);
                self.links.keys.push(key);
                self.costs.entry(c.run_id).or_default().cents += c.cost_cents;
            }
            &Outcome::AwaitChild { child_run_id } => {
                self.links.task_ids.push(c.task_id);
                self.links.child_ids.push(Some(child_run_id));
                self.links.workflows.push("");
                self.links.keys.push(String::new());
            }
            Outcome::Succeeded(output) => match c.element {
                Some(element) => {
                    self.elements.push(flow, c, element, output, started_at);
                    self.costs.entry(c.run_id).or_default().cents += c.cost_cents;
                }
                None => self.done.push(FinishedStep {
                    flow,
                    run_id: c.run_id,
                    step: c.step,
                    attempts: c.attempt,
                    output: StepResult::Output(output),
                    cost_cents: c.cost_cents,
                    started_at,
                }),
            },
            Outcome::Skipped { reason } => self.done.push(FinishedStep {
                flow,
                run_id: c.run_id,
                step: c.step,
                attempts: c.attempt,
                output: StepResult::Skipped(reason),
                cost_cents: c.cost_cents,
                started_at,
            }),
            Outcome::FanOut => {
                if let Some(step) = step_index(c.step) {
                    self.ready.push(flow, c.run_id, step);
                }
                self.costs.entry(c.run_id).or_default().cents += c.cost_cents;
            }
            Outcome::OverBudget { error, .. } => {
                let refused = pgflow::StepError::permanent(error.to_string());
                let history = [AttemptFailure::new(
                    u32::try_from(c.attempt).unwrap_or(1),
                    &refused,
                )];
                self.states.push(StepStateRow {
                    run_id: c.run_id,
                    step: c.step,
                    state: StepState::Failed,
                    attempts: c.attempt,
                    output: None,
                    from_elements: false,
                    errors: Some(
                        serde_json::to_string(&history).unwrap_or_else(|_| "[]".to_owned()),
                    ),
                    reason: None,
                    started_at,
                });
                self.failed.push(
                    c.run_id,
                    serde_json::to_string(error).unwrap_or_else(|_| "null".to_owned()),
                    c.cost_cents,
                );
            }
            Outcome::Failed { history, element } => {
                let errors = serde_json::to_string(history).unwrap_or_else(|_| "[]".to_owned());
                self.states.push(StepStateRow {
                    run_id: c.run_id,
                    step: c.step,
                    state: StepState::Failed,
                    attempts: c.attempt,
                    output: None,
                    from_elements: false,
                    errors: Some(errors),
                    reason: None,
                    started_at,
                });
                let step_name = flow.step_name(c.step);
                let error =
                    RunError::step_failed(flow.def.name(), step_name, *element, history.clone());
                self.failed.push(
                    c.run_id,
                    serde_json::to_string(&error).unwrap_or_else(|_| "null".to_owned()),
                    c.cost_cents,
                );
            }
            Outcome::Retry { .. }
            | Outcome::Snooze { .. }
            | Outcome::Throttled { .. }
            | Outcome::Discard
            | Outcome::Release => {
                self.costs.entry(c.run_id).or_default().cents += c.cost_cents;
            }
        }
    }

    /// Routes the steps done: a terminal one finishes its run; the others store
    /// their state and make their children ready (or count down their joins).
    fn route_done(&mut self) {
        for d in std::mem::take(&mut self.done) {
            let Some(step) = step_index(d.step) else {
                continue;
            };
            if d.flow.is_terminal(step) {
                let (output, from_elements) = match d.output {
                    StepResult::Output(o) => (Some(o), None),
                    StepResult::Skipped(_) => (Some("null"), None),
                    StepResult::FromElements => (None, Some(d.step)),
                };
                self.finished
                    .push(d.run_id, output, from_elements, d.cost_cents, d.started_at);
                continue;
            }
            let (state, output, from_elements, reason) = match d.output {
                StepResult::Output(o) => (StepState::Completed, Some(o), false, None),
                StepResult::Skipped(r) => (StepState::Skipped, None, false, Some(r)),
                StepResult::FromElements => (StepState::Completed, None, true, None),
            };
            self.states.push(StepStateRow {
                run_id: d.run_id,
                step: d.step,
                state,
                attempts: d.attempts,
                output,
                from_elements,
                errors: None,
                reason,
                started_at: d.started_at,
            });
            for &child in d.flow.plan.children(step) {
                if d.flow.plan.is_join(child) {
                    self.join_hits.run_ids.push(d.run_id);
                    self.join_hits.steps.push(step_i16(child));
                } else {
                    self.ready.push(d.flow, d.run_id, child);
                }
            }
            self.costs.entry(d.run_id).or_default().cents += d.cost_cents;
        }
    }
}
