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

use pgflow::{AttemptFailure, RunError};
use sqlx::PgConnection;

use crate::catalog::{Catalog, Flow};
use crate::store::tasks::{self, NewTasks};
use crate::store::{StepState, millis, notify, step_i16, step_index};

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
    /// A permanent failure or the last attempt: the run fails with `history`.
    Failed {
        history: Vec<AttemptFailure>,
        element: Option<usize>,
    },
    /// The run is no longer running (cancelled or failed): drop the task.
    Discard,
    /// Give the task back without counting the attempt (shutdown, or a run whose
    /// workflow this instance does not serve any more).
    Release,
}

impl Outcome {
    /// Whether the task row goes back to the queue (rather than leaving it).
    fn requeues(&self) -> bool {
        matches!(self, Self::Retry { .. } | Self::Release)
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
}

impl Completion {
    /// The claim this completes: (task, token).
    fn claim(&self) -> (i64, i64) {
        (self.task_id, self.token)
    }
}

/// What a flush did.
#[derive(Debug, Default)]
pub(crate) struct Flushed {
    /// Completions whose claim was lost: nothing of them was applied.
    pub(crate) rejected: Vec<i64>,
    /// Runs that finished (succeeded or failed) in this flush.
    pub(crate) finished_runs: Vec<i64>,
    /// Queues that received tasks due now.
    pub(crate) queues: HashSet<String>,
}

impl Flushed {
    /// Adds what another flush did.
    pub(crate) fn extend(&mut self, other: Flushed) {
        self.rejected.extend(other.rejected);
        self.finished_runs.extend(other.finished_runs);
        self.queues.extend(other.queues);
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
    let applied = fence(conn, batch, &mut out).await?;

    let mut work = Work::default();
    for c in applied {
        let Some(flow) = catalog.get(c.workflow, c.version) else {
            continue;
        };
        work.sort(flow, c);
    }
    for (flow, run_id, step) in complete_elements(conn, instance, &work.elements).await? {
        work.done.push(FinishedStep {
            flow,
            run_id,
            step,
            attempts: 1,
            output: StepResult::FromElements,
            cost_cents: 0,
        });
    }
    work.route_done();
    store_step_states(conn, instance, &work.states).await?;
    count_down_joins(conn, catalog, &work.join_hits, &mut work.ready).await?;
    out.queues.extend(tasks::enqueue(conn, &work.ready).await?);
    out.finished_runs
        .extend(finish_runs(conn, instance, &work.finished).await?);
    out.finished_runs
        .extend(fail_runs(conn, instance, &work.failed).await?);
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

/// Phase 1: deletes the rows of final completions and puts back those of retries
/// and releases, each only where the row still carries the completion's token.
/// Returns the completions that passed, each (task, token) once.
async fn fence<'b>(
    conn: &mut PgConnection,
    batch: &'b [Completion],
    out: &mut Flushed,
) -> Result<Vec<&'b Completion>, sqlx::Error> {
    let (requeued, finals): (Vec<&Completion>, Vec<&Completion>) =
        batch.iter().partition(|c| c.outcome.requeues());
    // Keyed by (task, claim token): two completions of one task from two claims
    // (a stale one and a fresh one) must not both pass.
    let mut accepted: HashSet<(i64, i64)> = HashSet::with_capacity(batch.len());
    if !finals.is_empty() {
        let ids: Vec<i64> = finals.iter().map(|c| c.task_id).collect();
        let tokens: Vec<i64> = finals.iter().map(|c| c.token).collect();
        // By primary key.
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "DELETE FROM pgflow.tasks t
             USING unnest($1::bigint[], $2::bigint[]) AS c(id, token)
             WHERE t.id = c.id AND t.claim_token = c.token
             RETURNING t.id, c.token",
        )
        .bind(&ids)
        .bind(&tokens)
        .fetch_all(&mut *conn)
        .await?;
        accepted.extend(rows);
    }
    if !requeued.is_empty() {
        let mut rows = RequeueRows::default();
        for c in &requeued {
            rows.push(c);
        }
        for (id, token, queue, due) in rows.apply(conn).await? {
            accepted.insert((id, token));
            if due {
                out.queues.insert(queue);
            }
        }
    }
    out.rejected = batch
        .iter()
        .filter(|c| !accepted.contains(&c.claim()))
        .map(|c| c.task_id)
        .collect();
    // Each accepted claim applies once, even if the batch held it twice.
    let mut once: HashSet<(i64, i64)> = HashSet::with_capacity(batch.len());
    Ok(batch
        .iter()
        .filter(|c| accepted.contains(&c.claim()) && once.insert(c.claim()))
        .collect())
}

/// Tasks going back to the queue, as bind arrays.
#[derive(Default)]
struct RequeueRows {
    ids: Vec<i64>,
    tokens: Vec<i64>,
    delays_ms: Vec<i64>,
    errors: Vec<Option<String>>,
    /// Whether the attempt counts (a retry) or not (a release).
    counted: Vec<bool>,
}

impl RequeueRows {
    fn push(&mut self, c: &Completion) {
        self.ids.push(c.task_id);
        self.tokens.push(c.token);
        match &c.outcome {
            Outcome::Retry { delay, failure } => {
                self.delays_ms.push(millis(*delay));
                self.errors.push(Some(
                    serde_json::to_string(&[failure]).unwrap_or_else(|_| "[]".to_owned()),
                ));
                self.counted.push(true);
            }
            _ => {
                self.delays_ms.push(0);
                self.errors.push(None);
                self.counted.push(false);
            }
        }
    }

    /// Puts the rows back (fenced on the token, by primary key); returns (task,
    /// token, queue, due now) for each row put back.
    async fn apply(
        &self,
        conn: &mut PgConnection,
    ) -> Result<Vec<(i64, i64, String, bool)>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE pgflow.tasks t
             SET claimed_by = NULL, claim_token = NULL, claimed_at = NULL, lease_until = NULL,
                 attempt = t.attempt + CASE WHEN c.counted THEN 1 ELSE 0 END,
                 run_at = CASE WHEN c.counted
                               THEN now() + interval '1 millisecond' * c.delay_ms
                               ELSE t.run_at END,
                 errors = CASE WHEN c.err IS NULL THEN t.errors
                               ELSE COALESCE(t.errors, '[]'::jsonb) || c.err::jsonb END
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bool[])
                  AS c(id, token, delay_ms, err, counted)
             WHERE t.id = c.id AND t.claim_token = c.token
             RETURNING t.id, c.token, t.queue, t.run_at <= now()",
        )
        .bind(&self.ids)
        .bind(&self.tokens)
        .bind(&self.delays_ms)
        .bind(&self.errors)
        .bind(&self.counted)
        .fetch_all(conn)
        .await
    }
}

/// What a step that is done in this flush produced.
enum StepResult {
    /// Its output, as JSON text.
    Output(String),
    /// Skipped, with the reason.
    Skipped(String),
    /// A map step whose elements all completed: its output is aggregated from
    /// `step_elements` in SQL.
    FromElements,
}

/// A step that is done in this flush.
struct FinishedStep<'c> {
    flow: &'c Flow,
    run_id: i64,
    step: i16,
    attempts: i32,
    output: StepResult,
    cost_cents: i64,
}

/// What the applied completions amount to, sorted by phase.
#[derive(Default)]
struct Work<'c> {
    done: Vec<FinishedStep<'c>>,
    elements: ElementRows<'c>,
    states: StepStateRows,
    join_hits: JoinHits,
    ready: NewTasks,
    finished: FinishedRuns,
    failed: FailedRuns,
    costs: HashMap<i64, i64>,
}

impl<'c> Work<'c> {
    fn sort(&mut self, flow: &'c Flow, c: &Completion) {
        match &c.outcome {
            Outcome::Succeeded(output) => match c.element {
                Some(element) => {
                    self.elements.push(flow, c, element, output.clone());
                    *self.costs.entry(c.run_id).or_default() += c.cost_cents;
                }
                None => self.done.push(FinishedStep {
                    flow,
                    run_id: c.run_id,
                    step: c.step,
                    attempts: c.attempt,
                    output: StepResult::Output(output.clone()),
                    cost_cents: c.cost_cents,
                }),
            },
            Outcome::Skipped { reason } => self.done.push(FinishedStep {
                flow,
                run_id: c.run_id,
                step: c.step,
                attempts: c.attempt,
                output: StepResult::Skipped(reason.clone()),
                cost_cents: c.cost_cents,
            }),
            Outcome::FanOut => {
                if let Some(step) = step_index(c.step) {
                    self.ready.push(flow, c.run_id, step);
                }
                *self.costs.entry(c.run_id).or_default() += c.cost_cents;
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
                });
                let step_name = step_index(c.step)
                    .and_then(|s| flow.step(s))
                    .map_or("?", |s| s.name());
                let error =
                    RunError::step_failed(flow.def.name(), step_name, *element, history.clone());
                self.failed.push(
                    c.run_id,
                    serde_json::to_string(&error).unwrap_or_else(|_| "null".to_owned()),
                    c.cost_cents,
                );
            }
            Outcome::Retry { .. } | Outcome::Discard | Outcome::Release => {
                *self.costs.entry(c.run_id).or_default() += c.cost_cents;
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
                    StepResult::Skipped(_) => (Some("null".to_owned()), None),
                    StepResult::FromElements => (None, Some(d.step)),
                };
                self.finished
                    .push(d.run_id, output, from_elements, d.cost_cents);
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
            });
            for &child in d.flow.plan.children(step) {
                if d.flow.plan.is_join(child) {
                    self.join_hits.run_ids.push(d.run_id);
                    self.join_hits.steps.push(step_i16(child));
                } else {
                    self.ready.push(d.flow, d.run_id, child);
                }
            }
            *self.costs.entry(d.run_id).or_default() += d.cost_cents;
        }
    }
}

/// Element completions of map steps, as bind arrays.
#[derive(Default)]
struct ElementRows<'c> {
    flows: HashMap<(i64, i16), &'c Flow>,
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    elements: Vec<i32>,
    outputs: Vec<String>,
    attempts: Vec<i32>,
}

impl<'c> ElementRows<'c> {
    fn push(&mut self, flow: &'c Flow, c: &Completion, element: i32, output: String) {
        self.flows.insert((c.run_id, c.step), flow);
        self.run_ids.push(c.run_id);
        self.steps.push(c.step);
        self.elements.push(element);
        self.outputs.push(output);
        self.attempts.push(c.attempt);
    }
}

/// Phase 2: stores the elements' outputs and counts down their map steps; returns
/// the map steps whose last element completed (now `completed`).
async fn complete_elements<'c>(
    conn: &mut PgConnection,
    instance: &str,
    rows: &ElementRows<'c>,
) -> Result<Vec<(&'c Flow, i64, i16)>, sqlx::Error> {
    if rows.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Rows are locked in (run_id, step) order so that two instances counting down
    // the same map steps cannot deadlock. Both tables are reached by their primary
    // keys (`step_elements (run_id, step, element)`, `step_states (run_id, step)`).
    // A map step that failed (status no longer `running`) counts nothing.
    let counted: Vec<(i64, i16, i32)> = sqlx::query_as(
        "WITH ins AS (
             INSERT INTO pgflow.step_elements (run_id, step, element, output, attempts, instance_id)
             SELECT u.run_id, u.step, u.element, u.output::jsonb, u.attempts, $6
             FROM unnest($1::bigint[], $2::smallint[], $3::int[], $4::text[], $5::int[])
                  AS u(run_id, step, element, output, attempts)
             ON CONFLICT (run_id, step, element) DO NOTHING
             RETURNING run_id, step
         ), d AS (
             SELECT run_id, step, count(*)::int AS n FROM ins GROUP BY run_id, step
         ), locked AS (
             SELECT s.run_id, s.step FROM pgflow.step_states s
             JOIN d USING (run_id, step)
             WHERE s.status = 'running'
             ORDER BY s.run_id, s.step
             FOR UPDATE OF s
         )
         UPDATE pgflow.step_states s
         SET remaining = s.remaining - d.n,
             status = CASE WHEN s.remaining = d.n THEN 'completed' ELSE s.status END,
             completed_at = CASE WHEN s.remaining = d.n THEN now() END
         FROM d JOIN locked USING (run_id, step)
         WHERE s.run_id = d.run_id AND s.step = d.step
         RETURNING s.run_id, s.step, s.remaining",
    )
    .bind(&rows.run_ids)
    .bind(&rows.steps)
    .bind(&rows.elements)
    .bind(&rows.outputs)
    .bind(&rows.attempts)
    .bind(instance)
    .fetch_all(&mut *conn)
    .await?;
    Ok(counted
        .into_iter()
        .filter(|&(_, _, remaining)| remaining == 0)
        .filter_map(|(run_id, step, _)| {
            let flow = rows.flows.get(&(run_id, step))?;
            Some((*flow, run_id, step))
        })
        .collect())
}

/// One row of the step-state upsert.
struct StepStateRow {
    run_id: i64,
    step: i16,
    state: StepState,
    attempts: i32,
    output: Option<String>,
    /// The output is the aggregate of the map step's elements.
    from_elements: bool,
    errors: Option<String>,
    reason: Option<String>,
}

/// Step states to upsert, as bind arrays: one row per (run, step), since an upsert
/// may not touch a row twice (two failed elements of one map step fail the same
/// step).
#[derive(Default)]
struct StepStateRows {
    seen: HashSet<(i64, i16)>,
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    states: Vec<&'static str>,
    attempts: Vec<i32>,
    outputs: Vec<Option<String>>,
    from_elements: Vec<bool>,
    errors: Vec<Option<String>>,
    reasons: Vec<Option<String>>,
}

impl StepStateRows {
    fn push(&mut self, row: StepStateRow) {
        if !self.seen.insert((row.run_id, row.step)) {
            return;
        }
        self.run_ids.push(row.run_id);
        self.steps.push(row.step);
        self.states.push(row.state.as_str());
        self.attempts.push(row.attempts);
        self.outputs.push(row.output);
        self.from_elements.push(row.from_elements);
        self.errors.push(row.errors);
        self.reasons.push(row.reason);
    }
}

/// Phase 3: upserts step states (by primary key). A map step's output is its
/// elements' outputs in element order, aggregated here (primary key of
/// `step_elements`).
async fn store_step_states(
    conn: &mut PgConnection,
    instance: &str,
    rows: &StepStateRows,
) -> Result<(), sqlx::Error> {
    if rows.run_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pgflow.step_states
             (run_id, step, status, attempts, output, errors, reason, instance_id, completed_at)
         SELECT u.run_id, u.step, u.status, u.attempts,
                CASE WHEN u.from_elements
                     THEN (SELECT jsonb_agg(e.output ORDER BY e.element)
                           FROM pgflow.step_elements e
                           WHERE e.run_id = u.run_id AND e.step = u.step)
                     ELSE u.output::jsonb END,
                u.errors::jsonb, u.reason, $9, now()
         FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[], $6::text[],
                     $7::text[], $8::bool[])
              AS u(run_id, step, status, attempts, output, errors, reason, from_elements)
         ON CONFLICT (run_id, step) DO UPDATE
         SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, output = EXCLUDED.output,
             errors = EXCLUDED.errors, reason = EXCLUDED.reason,
             instance_id = EXCLUDED.instance_id, completed_at = EXCLUDED.completed_at",
    )
    .bind(&rows.run_ids)
    .bind(&rows.steps)
    .bind(&rows.states)
    .bind(&rows.attempts)
    .bind(&rows.outputs)
    .bind(&rows.errors)
    .bind(&rows.reasons)
    .bind(&rows.from_elements)
    .bind(instance)
    .execute(conn)
    .await?;
    Ok(())
}

/// Parents of joins completed in this flush.
#[derive(Default)]
struct JoinHits {
    run_ids: Vec<i64>,
    steps: Vec<i16>,
}

/// Phase 4: counts down the joins (by primary key of `step_states`, the run by its
/// own); those at zero become ready.
async fn count_down_joins(
    conn: &mut PgConnection,
    catalog: &Catalog,
    hits: &JoinHits,
    ready: &mut NewTasks,
) -> Result<(), sqlx::Error> {
    if hits.run_ids.is_empty() {
        return Ok(());
    }
    #[derive(sqlx::FromRow)]
    struct Counted {
        run_id: i64,
        step: i16,
        remaining: i32,
        workflow: String,
        version: i32,
    }
    // Two parents completing in one batch count down twice: group first.
    let rows: Vec<Counted> = sqlx::query_as(
        "WITH d AS (
             SELECT run_id, step, count(*)::int AS n
             FROM unnest($1::bigint[], $2::smallint[]) AS u(run_id, step)
             GROUP BY run_id, step
         )
         UPDATE pgflow.step_states s SET remaining = s.remaining - d.n
         FROM d, pgflow.runs r
         WHERE s.run_id = d.run_id AND s.step = d.step AND s.status = 'waiting'
           AND r.id = s.run_id
         RETURNING s.run_id, s.step, s.remaining, r.workflow, r.version",
    )
    .bind(&hits.run_ids)
    .bind(&hits.steps)
    .fetch_all(conn)
    .await?;
    for r in rows.into_iter().filter(|r| r.remaining == 0) {
        if let (Some(flow), Some(step)) = (catalog.get(&r.workflow, r.version), step_index(r.step))
        {
            ready.push(flow, r.run_id, step);
        }
    }
    Ok(())
}

/// Runs whose terminal step is done.
#[derive(Default)]
struct FinishedRuns {
    run_ids: Vec<i64>,
    /// The output; `None` when it is aggregated from a terminal map step's elements.
    outputs: Vec<Option<String>>,
    /// The terminal map step whose elements make the output.
    from_elements: Vec<Option<i16>>,
    costs: Vec<i64>,
}

impl FinishedRuns {
    fn push(&mut self, run_id: i64, output: Option<String>, from: Option<i16>, cost: i64) {
        self.run_ids.push(run_id);
        self.outputs.push(output);
        self.from_elements.push(from);
        self.costs.push(cost);
    }
}

/// Phase 6: runs still `running` succeed with their output (by primary key).
async fn finish_runs(
    conn: &mut PgConnection,
    instance: &str,
    runs: &FinishedRuns,
) -> Result<Vec<i64>, sqlx::Error> {
    if runs.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "UPDATE pgflow.runs r
         SET status = 'succeeded', completed_at = now(), instance_id = $5,
             cost_cents = r.cost_cents + u.cost,
             output = CASE WHEN u.from_elements IS NULL THEN u.output::jsonb
                           ELSE (SELECT jsonb_agg(e.output ORDER BY e.element)
                                 FROM pgflow.step_elements e
                                 WHERE e.run_id = u.id AND e.step = u.from_elements) END
         FROM unnest($1::bigint[], $2::text[], $3::smallint[], $4::bigint[])
              AS u(id, output, from_elements, cost)
         WHERE r.id = u.id AND r.status = 'running'
         RETURNING r.id",
    )
    .bind(&runs.run_ids)
    .bind(&runs.outputs)
    .bind(&runs.from_elements)
    .bind(&runs.costs)
    .bind(instance)
    .fetch_all(conn)
    .await
}

/// Runs that fail in this flush.
#[derive(Default)]
struct FailedRuns {
    run_ids: Vec<i64>,
    errors: Vec<String>,
    costs: Vec<i64>,
}

impl FailedRuns {
    fn push(&mut self, run_id: i64, error: String, cost: i64) {
        self.run_ids.push(run_id);
        self.errors.push(error);
        self.costs.push(cost);
    }
}

/// Phase 7: runs still `running` fail with their error; their pending tasks are
/// deleted (index `tasks_run_id`) so pending siblings never start, while running
/// ones finish into a failed run.
async fn fail_runs(
    conn: &mut PgConnection,
    instance: &str,
    runs: &FailedRuns,
) -> Result<Vec<i64>, sqlx::Error> {
    if runs.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "WITH f AS (
             UPDATE pgflow.runs r
             SET status = 'failed', error = u.error::jsonb, completed_at = now(),
                 instance_id = $4, cost_cents = r.cost_cents + u.cost
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, error, cost)
             WHERE r.id = u.id AND r.status = 'running'
             RETURNING r.id
         ), gone AS (
             DELETE FROM pgflow.tasks t USING f
             WHERE t.run_id = f.id AND t.claimed_by IS NULL
         )
         SELECT id FROM f",
    )
    .bind(&runs.run_ids)
    .bind(&runs.errors)
    .bind(&runs.costs)
    .bind(instance)
    .fetch_all(conn)
    .await
}

/// Phase 8: adds the costs of steps that did not finish their run (by primary key).
async fn add_costs(
    conn: &mut PgConnection,
    mut costs: HashMap<i64, i64>,
) -> Result<(), sqlx::Error> {
    costs.retain(|_, c| *c != 0);
    if costs.is_empty() {
        return Ok(());
    }
    let (ids, cents): (Vec<i64>, Vec<i64>) = costs.into_iter().unzip();
    sqlx::query(
        "UPDATE pgflow.runs r SET cost_cents = r.cost_cents + u.cost
         FROM unnest($1::bigint[], $2::bigint[]) AS u(id, cost) WHERE r.id = u.id",
    )
    .bind(&ids)
    .bind(&cents)
    .execute(conn)
    .await?;
    Ok(())
}
