//! Runs and their steps: [`list_runs`] and [`run_detail`].

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, Utc};
use pgflow::{AttemptFailure, Definition, Plan, RunError, RunId};
use serde::{Serialize, Serializer};
use sqlx::{PgConnection, PgPool};

use crate::store::runs::RunRow;
use crate::store::{StepState, definitions, runs, step_index, steps, stored_attempts, tasks};
use crate::{Error, RunStatus};

/// Which runs [`list_runs`] returns: newest first. Pages go on with `before`
/// (the last id of the page before): each page is one index range however many
/// runs the table holds.
///
/// ```
/// use pgflow_runtime::admin::RunFilter;
/// use pgflow_runtime::RunStatus;
/// let failed_of_acme = RunFilter {
///     workflow: Some("llm_request".into()),
///     status: Some(RunStatus::Failed),
///     key: Some("acme".into()),
///     ..RunFilter::default()
/// };
/// assert_eq!(failed_of_acme.limit, 20);
/// ```
#[derive(Debug, Clone)]
pub struct RunFilter {
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs of this workflow version.
    pub version: Option<i32>,
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Only runs with this run key (a tenant, say).
    pub key: Option<String>,
    /// Only runs older than this run id (the next page).
    pub before: Option<i64>,
    /// Only runs started at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// A run id, or an idempotency key: the runs it names.
    pub search: Option<String>,
    /// At most this many (default 20).
    pub limit: u32,
}

impl RunFilter {
    fn store(&self) -> runs::ListFilter<'_> {
        runs::ListFilter {
            workflow: self.workflow.as_deref(),
            version: self.version,
            status: self.status.map(RunStatus::as_str),
            key: self.key.as_deref(),
            before: self.before,
            since: self.since,
            search: self.search.as_deref().filter(|s| !s.trim().is_empty()),
        }
    }
}

/// The plan of [`list_runs`] with `filter` (`EXPLAIN`, not run), for the plan
/// tests.
#[doc(hidden)]
pub async fn explain_list_runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<String>, Error> {
    Ok(runs::explain_list(pool, &filter.store(), filter.limit).await?)
}

impl Default for RunFilter {
    fn default() -> Self {
        Self {
            workflow: None,
            version: None,
            status: None,
            key: None,
            before: None,
            since: None,
            search: None,
            limit: 20,
        }
    }
}

/// One run, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Its id.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// The workflow version it runs.
    pub version: i32,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it was due (later than `created_at` for a delayed start).
    pub run_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// From due to finished, for a finished run (as in `pgflow.job_results`).
    pub duration_ms: Option<i64>,
    /// Cost recorded by its steps.
    pub cost_cents: i64,
    /// The instance that finished it.
    pub instance_id: Option<String>,
    /// Its run key (a tenant, say).
    pub key: Option<String>,
    /// Its idempotency key.
    pub idempotency_key: Option<String>,
    /// Tokens its steps reported (in, out).
    pub tokens: (i64, i64),
    /// Why it failed, in one line, with the failing step's every attempt.
    pub error: Option<String>,
    /// The step that failed it.
    pub failed_step: Option<String>,
    /// The last failed attempt of that step: `attempt 3 retryable: HTTP 503`.
    pub last_error: Option<String>,
}

impl RunSummary {
    fn from_row(r: RunRow) -> Self {
        let error = r
            .error
            .as_deref()
            .map(|json| serde_json::from_str::<RunError>(json).map_err(|_| json.to_owned()));
        let (failed_step, last_error) = match &error {
            Some(Ok(e)) => (
                e.failed_step().map(str::to_owned),
                e.history().last().map(ToString::to_string),
            ),
            _ => (None, None),
        };
        Self {
            id: r.id,
            workflow: r.workflow,
            version: r.version,
            status: r.status,
            created_at: r.created_at,
            run_at: r.run_at,
            completed_at: r.completed_at,
            duration_ms: r.duration_ms,
            cost_cents: r.cost_cents,
            instance_id: r.instance_id,
            key: r.key,
            idempotency_key: r.idempotency_key,
            tokens: (r.tokens_in.unwrap_or(0), r.tokens_out.unwrap_or(0)),
            // A stored error that is not a `RunError` is shown as stored.
            error: error.map(|e| e.map_or_else(|raw| raw, |e| e.to_string())),
            failed_step,
            last_error,
        }
    }
}

/// The newest runs matching `filter`.
///
/// # Errors
///
/// [`Error::NotMigrated`]; database errors.
pub async fn list_runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunSummary>, Error> {
    let rows = runs::list(pool, &filter.store(), filter.limit).await?;
    Ok(rows.into_iter().map(RunSummary::from_row).collect())
}

/// Where a step of a run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepStatus {
    /// Its output is stored (or, for the last step, the run succeeded).
    Completed,
    /// It failed for good.
    Failed,
    /// The run is running and the step waits for its parents.
    Waiting,
    /// A task is in the queue (due now, or later for a retry's backoff).
    Queued,
    /// It waits for a signal its run has not received (`#[step(signal = ..)]`),
    /// parked until the signal or its timeout.
    AwaitingSignal,
    /// It started a child run (a subflow) and waits for it to finish (see
    /// [`RunDetail::subflows`]).
    AwaitingSubflow,
    /// An instance is executing it.
    Running,
    /// A conditional step whose predicate was false (see [`StepDetail::reason`]).
    Skipped,
    /// The run finished without it running.
    NotStarted,
    /// A state this version of the tool does not know, as stored.
    Other(String),
}

impl StepStatus {
    /// The name shown and serialized: `completed`, `not_started`, ..
    pub fn as_str(&self) -> &str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Waiting => "waiting",
            Self::Queued => "queued",
            Self::AwaitingSignal => "awaiting_signal",
            Self::AwaitingSubflow => "awaiting_subflow",
            Self::Running => "running",
            Self::Skipped => "skipped",
            Self::NotStarted => "not_started",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

impl Serialize for StepStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepDetail {
    /// Its index in the workflow's step table.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// The steps it depends on.
    pub parents: Vec<String>,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts made (including the one running); `None` when not recorded (the last
    /// step of a succeeded run stores no step row).
    pub attempts: Option<i32>,
    /// From the start of its last attempt (its claim) to when it finished, or until
    /// now while it runs: the time it took, without the time it waited. For steps
    /// recorded before start times were kept: from when it became ready.
    pub duration_ms: Option<i64>,
    /// From when the step became ready (its last parent completed, or the run became
    /// due) to the start of its last attempt: queue wait and retry backoff; until
    /// now while it is queued.
    pub wait_ms: Option<i64>,
    /// When its last attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// Why a skipped step was skipped (`` `when = Self::pred` was false ``).
    pub reason: Option<String>,
    /// For a map step: its elements.
    pub elements: Option<ElementsDetail>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// The instance that finished it, or the one running it.
    pub instance_id: Option<String>,
    /// The last failed attempt, in one line.
    pub error: Option<String>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptFailure>,
}

/// The elements of a map step.
#[derive(Debug, Clone, Serialize)]
pub struct ElementsDetail {
    /// Elements in all, once the step fanned out.
    pub total: Option<i64>,
    /// Elements completed.
    pub completed: i64,
    /// Elements executing now.
    pub running: i64,
    /// Elements in the queue (due, or waiting for a retry's backoff).
    pub queued: i64,
    /// The element that failed the step, if one did.
    pub failed: Option<usize>,
    /// The longest completed element, from its start to its end.
    pub slowest_ms: Option<i64>,
}

/// One run with its steps.
#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    /// The run.
    #[serde(flatten)]
    pub run: RunSummary,
    /// Its input.
    pub input: serde_json::Value,
    /// Its output, once succeeded.
    pub output: Option<serde_json::Value>,
    /// The stored error, once failed.
    pub error_detail: Option<serde_json::Value>,
    /// The run it was forked from ([`fork`](crate::admin::fork)), if any.
    pub forked_from: Option<i64>,
    /// The step a fork ran again from (the steps upstream were copied).
    pub forked_at: Option<String>,
    /// The runs forked from this one, oldest first.
    pub forks: Vec<i64>,
    /// For a child run (a subflow): the run, step and element that started it.
    pub parent: Option<ParentLink>,
    /// Its child runs and theirs (subflows), parents before children, at most
    /// 1,000.
    pub subflows: Vec<SubflowRun>,
    /// Its steps in graph order (parents before children, then declaration order).
    pub steps: Vec<StepDetail>,
}

/// The step of another run that started a child run.
#[derive(Debug, Clone, Serialize)]
pub struct ParentLink {
    /// The parent run.
    pub run_id: i64,
    /// The step that started the child.
    pub step: String,
    /// For a map step, the element.
    pub element: Option<i32>,
}

/// A descendant of a run: one of its child runs (subflows), or theirs.
#[derive(Debug, Clone, Serialize)]
pub struct SubflowRun {
    /// The child run.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// Its workflow version.
    pub version: i32,
    /// Its status (`running`, `succeeded`, `failed`, `cancelled`).
    pub status: String,
    /// 1 for a child of the run shown, 2 for a grandchild, ..
    pub depth: i32,
    /// The run, step and element that started it.
    pub parent: ParentLink,
}

/// The stored definition of `workflow` at `version` and its plan.
pub(crate) async fn load_definition(
    conn: &mut PgConnection,
    workflow: &str,
    version: i32,
) -> Result<(Definition, Plan), Error> {
    let text = definitions::load(&mut *conn, workflow, version)
        .await?
        .ok_or_else(|| Error::MissingDefinition {
            workflow: workflow.to_owned(),
            version,
        })?;
    let invalid = |message: String| Error::Definition {
        workflow: workflow.to_owned(),
        version,
        message,
    };
    let def = definitions::parse(&text)
        .map_err(|e| invalid(format!("the stored definition is not readable: {e}")))?;
    let plan = def.plan().map_err(|e| invalid(e.to_string()))?;
    Ok((def, plan))
}

/// Sets a step's wait (ready -> started) and duration (started -> done, or now),
/// falling back to ready -> done for a step stored without a start time.
fn timing(
    detail: &mut StepDetail,
    ready_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    done_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) {
    match started_at {
        Some(started) => {
            detail.wait_ms = ready_at.map(|r| millis_between(r, started));
            detail.duration_ms = Some(millis_between(started, done_at.unwrap_or(now)));
        }
        None if done_at.is_some() => {
            detail.duration_ms = ready_at.zip(done_at).map(|(a, b)| millis_between(a, b));
        }
        None => detail.wait_ms = ready_at.map(|r| millis_between(r, now)),
    }
}

/// The element of map step `step` that failed the run, if one did.
fn failed_element(error: Option<&RunError>, step: &str) -> Option<usize> {
    match error {
        Some(RunError::StepFailed {
            step: failed,
            element,
            ..
        }) if failed == step => *element,
        _ => None,
    }
}

fn elements_detail(
    state: Option<&steps::StateRow>,
    done: Option<&steps::ElementsRow>,
    tasks: &[tasks::RunTask],
    failed: Option<usize>,
) -> ElementsDetail {
    let completed = done.map_or(0, |e| e.completed);
    let element_tasks = tasks.iter().filter(|t| t.element.is_some());
    let running = element_tasks
        .clone()
        .filter(|t| t.claimed_by.is_some())
        .count() as i64;
    let queued = element_tasks.filter(|t| t.claimed_by.is_none()).count() as i64;
    let total = match state.map(|s| StepState::from_name(&s.status)) {
        Some(Some(StepState::Running)) => state.map(|s| completed + i64::from(s.remaining)),
        Some(Some(StepState::Completed)) => Some(completed),
        _ if completed > 0 => Some(completed + running + queued),
        _ => None,
    };
    ElementsDetail {
        total,
        completed,
        running,
        queued,
        failed,
        slowest_ms: done.and_then(|e| e.slowest_ms),
    }
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds().max(0)
}

fn json_or_string(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// Run `id` with each of its steps, in graph order.
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::MissingDefinition`] / [`Error::Definition`] when
/// the stored step table is missing or unreadable; database errors.
pub async fn run_detail(pool: &PgPool, id: RunId) -> Result<RunDetail, Error> {
    // One snapshot for the run, its steps and its tasks.
    let mut tx = pool.begin().await?;
    crate::store::read_snapshot(&mut tx).await?;
    let row = runs::detail(&mut tx, id.0, false)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    let error_json = row.run.error.clone();
    let (forked_from, forked_at) = (row.forked_from, row.forked_at.clone());
    let parent = row.parent_run_id.map(|run_id| ParentLink {
        run_id,
        step: row.parent_step.clone().unwrap_or_default(),
        element: row.parent_element,
    });
    let run_error: Option<RunError> = error_json
        .as_deref()
        .and_then(|e| serde_json::from_str(e).ok());
    let now = row.now;
    let run = RunSummary::from_row(row.run);
    let (def, plan) = load_definition(&mut tx, &run.workflow, run.version).await?;
    let states: HashMap<usize, steps::StateRow> = steps::of_run(&mut tx, id.0)
        .await?
        .into_iter()
        .filter_map(|s| step_index(s.step).map(|i| (i, s)))
        .collect();
    let elements: HashMap<usize, steps::ElementsRow> = steps::elements_of_run(&mut tx, id.0)
        .await?
        .into_iter()
        .filter_map(|e| step_index(e.step).map(|i| (i, e)))
        .collect();
    let mut tasks_of: HashMap<usize, Vec<tasks::RunTask>> = HashMap::new();
    for t in tasks::of_run(&mut tx, id.0).await? {
        if let Some(i) = step_index(t.step) {
            tasks_of.entry(i).or_default().push(t);
        }
    }
    let forks = runs::forks_of(&mut tx, id.0).await?;
    let subflows = crate::store::subflows::descendants(&mut tx, id.0, 1000)
        .await?
        .into_iter()
        .map(|c| SubflowRun {
            id: c.id,
            workflow: c.workflow,
            version: c.version,
            status: c.status,
            depth: c.depth,
            parent: ParentLink {
                run_id: c.parent_run_id,
                step: c.parent_step.unwrap_or_default(),
                element: c.parent_element,
            },
        })
        .collect();
    tx.commit().await?;

    let run_start = run.run_at.max(run.created_at);
    let succeeded = run.status == RunStatus::Succeeded.as_str();
    let running = run.status == RunStatus::Running.as_str();
    let mut steps = Vec::with_capacity(plan.len());
    for &i in plan.order() {
        let step = &def.steps[i];
        // When the step became ready: its last parent's completion (or skip), or the
        // run start.
        let ready_at = plan.parents(i).iter().try_fold(run_start, |at, p| {
            states
                .get(p)
                .filter(|s| {
                    matches!(
                        StepState::from_name(&s.status),
                        Some(StepState::Completed | StepState::Skipped)
                    )
                })
                .and_then(|s| s.completed_at)
                .map(|c| at.max(c))
        });
        let mut detail = StepDetail {
            index: i,
            name: step.name.clone(),
            parents: plan
                .parents(i)
                .iter()
                .map(|&p| def.steps[p].name.clone())
                .collect(),
            status: StepStatus::NotStarted,
            attempts: None,
            duration_ms: None,
            wait_ms: None,
            started_at: None,
            reason: None,
            elements: None,
            completed_at: None,
            instance_id: None,
            error: None,
            errors: Vec::new(),
        };
        let state = states
            .get(&i)
            .filter(|s| StepState::from_name(&s.status) != Some(StepState::Waiting));
        let tasks = tasks_of.get(&i);
        if let Some(s) = state {
            detail.status = match StepState::from_name(&s.status) {
                Some(StepState::Completed) => StepStatus::Completed,
                Some(StepState::Failed) => StepStatus::Failed,
                Some(StepState::Skipped) => StepStatus::Skipped,
                // a map step whose elements run
                Some(StepState::Running) => StepStatus::Running,
                _ => StepStatus::Other(s.status.clone()),
            };
            detail.attempts = Some(s.attempts);
            detail.errors = stored_attempts(s.errors.as_deref());
            detail.instance_id = s.instance_id.clone();
            detail.completed_at = s.completed_at;
            detail.reason = s.reason.clone();
            detail.started_at = s.started_at;
            timing(&mut detail, ready_at, s.started_at, s.completed_at, now);
        } else if succeeded && !plan.has_children(i) {
            // The last step's output is the run's output; it keeps no step row.
            detail.status = StepStatus::Completed;
            detail.completed_at = run.completed_at;
            detail.instance_id = run.instance_id.clone();
            detail.started_at = row.terminal_started_at;
            timing(
                &mut detail,
                ready_at,
                row.terminal_started_at,
                run.completed_at,
                now,
            );
        } else if let Some(ts) = tasks.filter(|t| !t.is_empty()) {
            let claimed = ts.iter().find(|t| t.claimed_by.is_some());
            detail.status = if claimed.is_some() {
                StepStatus::Running
            } else if ts.iter().any(|t| t.awaits_signal) {
                StepStatus::AwaitingSignal
            } else if ts.iter().any(|t| t.child_run_id.is_some()) {
                StepStatus::AwaitingSubflow
            } else {
                StepStatus::Queued
            };
            if let Some(t) = claimed.or_else(|| ts.last()) {
                // A queued task's attempt is the one it will make next.
                detail.attempts = Some(if claimed.is_some() {
                    t.attempt
                } else {
                    t.attempt.saturating_sub(1)
                });
                detail.errors = stored_attempts(t.errors.as_deref());
                detail.instance_id = t.claimed_by.clone();
                detail.started_at = claimed.and_then(|t| t.claimed_at);
                let enqueued = ts.iter().map(|t| t.created_at).min();
                let started = detail.started_at;
                timing(&mut detail, enqueued, started, None, now);
            }
        } else if running {
            detail.status = StepStatus::Waiting;
        }
        if step.kind == pgflow::StepKind::Map {
            detail.elements = Some(elements_detail(
                state,
                elements.get(&i),
                tasks.map_or(&[][..], Vec::as_slice),
                failed_element(run_error.as_ref(), &step.name),
            ));
        }
        detail.error = detail.errors.last().map(ToString::to_string);
        steps.push(detail);
    }
    Ok(RunDetail {
        input: json_or_string(row.input),
        output: row.output.map(json_or_string),
        error_detail: error_json.map(json_or_string),
        forked_from,
        forked_at,
        forks,
        parent,
        subflows,
        run,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_status_names() {
        assert_eq!(StepStatus::NotStarted.to_string(), "not started");
        assert_eq!(
            serde_json::to_string(&StepStatus::NotStarted).unwrap(),
            "\"not_started\""
        );
        assert_eq!(StepStatus::Other("skipped".into()).to_string(), "skipped");
    }
}
