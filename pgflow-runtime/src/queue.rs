//! The queue's SQL: claiming tasks and applying completions.
//!
//! **Claim** ([`claim`]) is one statement: an `UPDATE .. WHERE id IN (SELECT ..
//! FOR UPDATE SKIP LOCKED LIMIT n)` over the partial index `tasks_available`
//! (`queue, priority DESC, run_at, id WHERE claimed_by IS NULL`), stamping each row
//! with this instance, a fresh claim token and a lease; the same statement returns
//! what the steps need: the run's status and input and the parents' outputs.
//!
//! **Flush** ([`flush`]) applies a batch of completions in one transaction: the task
//! rows are deleted (or, for a retry, put back with a later `run_at`) *only where they
//! still carry the claim token* — a completion whose claim was lost meanwhile (lease
//! expired and the task was claimed again) changes nothing and is reported as
//! rejected. Then outputs are stored, join counters counted down, ready children
//! enqueued, finished runs completed and failed runs failed, all before commit: a
//! step's output is durable before any child can start.
//!
//! **Conditional steps** complete as `skipped` (no output, a reason); their children
//! are enqueued as for a completion and read SQL NULL, which they receive as `None`.
//! **Map steps** run first as one task (`element` NULL) that splits the vector; its
//! flush inserts one task per element (carrying the element as `item`) and a
//! `running` state counting them. Each element's completion stores its output in
//! `step_elements` and counts down; the flush that reaches zero aggregates the
//! outputs in element order and completes the map step like any other. None of these
//! statements run for a batch without conditional or map steps.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pgflow::AttemptFailure;
use sqlx::{PgConnection, PgPool};

use crate::catalog::{Catalog, Flow};

/// A claimed task with what its step needs.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) task_id: i64,
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) attempt: i32,
    /// Earlier failed attempts (JSON array of `AttemptFailure`).
    pub(crate) errors: Option<String>,
    pub(crate) run_status: String,
    /// The run input, when the step reads it.
    pub(crate) input: Option<String>,
    pub(crate) parent_steps: Option<Vec<i16>>,
    /// The parents' outputs, in `parent_steps` order; `None` for a skipped parent.
    pub(crate) parent_outputs: Option<Vec<Option<String>>>,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
    /// For an element task of a map step: the element.
    pub(crate) item: Option<String>,
}

type ClaimRow = (
    i64,
    i64,
    i16,
    String,
    i32,
    i32,
    Option<String>,
    String,
    Option<String>,
    Option<Vec<i16>>,
    Option<Vec<Option<String>>>,
    Option<i32>,
    Option<String>,
);

/// The claim statement. The inner SELECT walks `tasks_available` in claim order
/// (see the `claim_uses_the_partial_index` test for its plan). An element task of a
/// map step reads its element (`item`) instead of its parent's whole output, and
/// the run input only when another parameter takes it.
pub(crate) const CLAIM_SQL: &str = "
WITH steps AS (
    SELECT * FROM unnest($5::text[], $6::int[], $7::smallint[], $8::bigint[], $9::bool[],
                         $14::bool[])
        AS s(workflow, version, step, lease_ms, needs_input, element_needs_input)
), edges AS (
    SELECT * FROM unnest($10::text[], $11::int[], $12::smallint[], $13::smallint[])
        AS e(workflow, version, step, parent)
), claimed AS (
    UPDATE pgflow.tasks t
    SET claimed_by = $1,
        claim_token = $2,
        claimed_at = now(),
        lease_until = now() + interval '1 millisecond' * COALESCE(
            (SELECT s.lease_ms FROM steps s
             WHERE s.workflow = t.workflow AND s.version = t.version AND s.step = t.step),
            60000)
    -- The ids are locked once, in claim order, by an uncorrelated ARRAY(..) (an
    -- InitPlan, run once). Inside `WHERE id IN (SELECT .. LIMIT n FOR UPDATE SKIP
    -- LOCKED)` the planner may re-run the subquery per row, and each re-run skips
    -- the rows this statement already updated and locks the next n: one claim then
    -- takes thousands of tasks (seen here under load).
    WHERE t.id = ANY (ARRAY(
        SELECT a.id FROM pgflow.tasks a
        WHERE a.queue = $3
          AND a.claimed_by IS NULL
          -- an instance declared dead claims nothing until it heartbeats again
          AND EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = $1 AND i.status = 'online')
          AND a.run_at <= now()
          AND (a.workflow, a.version) IN (SELECT DISTINCT workflow, version FROM steps)
        ORDER BY a.priority DESC, a.run_at, a.id
        LIMIT $4
        FOR UPDATE SKIP LOCKED))
    RETURNING t.id, t.run_id, t.step, t.workflow, t.version, t.attempt, t.errors, t.element,
              t.item
)
SELECT c.id, c.run_id, c.step, c.workflow, c.version, c.attempt, c.errors::text,
       r.status,
       CASE WHEN CASE WHEN c.element IS NULL THEN s.needs_input ELSE s.element_needs_input END
            THEN r.input::text END,
       p.steps, p.outputs, c.element, c.item::text
FROM claimed c
JOIN pgflow.runs r ON r.id = c.run_id
LEFT JOIN steps s ON s.workflow = c.workflow AND s.version = c.version AND s.step = c.step
LEFT JOIN LATERAL (
    SELECT array_agg(ss.step) AS steps, array_agg(ss.output::text) AS outputs
    FROM pgflow.step_states ss
    WHERE c.element IS NULL
      AND ss.run_id = c.run_id
      AND ss.status IN ('completed', 'skipped')
      AND ss.step IN (SELECT e.parent FROM edges e
                      WHERE e.workflow = c.workflow AND e.version = c.version AND e.step = c.step)
) p ON true";

/// Claims up to `limit` due tasks of `queue` for `instance`, stamped with `token`.
pub(crate) async fn claim(
    conn: &mut PgConnection,
    catalog: &Catalog,
    instance: &str,
    token: i64,
    queue: &str,
    limit: usize,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let c = &catalog.claim;
    let rows: Vec<ClaimRow> = sqlx::query_as(CLAIM_SQL)
        .bind(instance)
        .bind(token)
        .bind(queue)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(&c.step_workflow)
        .bind(&c.step_version)
        .bind(&c.step_index)
        .bind(&c.step_lease_ms)
        .bind(&c.step_needs_input)
        .bind(&c.edge_workflow)
        .bind(&c.edge_version)
        .bind(&c.edge_step)
        .bind(&c.edge_parent)
        .bind(&c.step_element_needs_input)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| Claimed {
            task_id: r.0,
            run_id: r.1,
            step: r.2,
            workflow: r.3,
            version: r.4,
            attempt: r.5,
            errors: r.6,
            run_status: r.7,
            input: r.8,
            parent_steps: r.9,
            parent_outputs: r.10,
            element: r.11,
            item: r.12,
        })
        .collect())
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The step's output (or one element's, for an element task), as JSON.
    Succeeded(String),
    /// A conditional step's predicate was false: it completes without output.
    Skipped { reason: String },
    /// A map step's vector, the non-empty JSON array `items`: one task per element.
    Expand { items: String },
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
    /// Shutdown: give the task back without counting the attempt.
    Release,
}

/// One finished (or abandoned) claim, waiting to be flushed.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub(crate) task_id: i64,
    pub(crate) token: i64,
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
    pub(crate) flow: (&'static str, i32),
    pub(crate) attempt: i32,
    pub(crate) outcome: Outcome,
    pub(crate) cost_cents: i64,
}

/// What the flusher receives.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A completion to apply.
    Done(Completion),
    /// Answered once everything sent before it is applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// What a flush did.
#[derive(Debug, Default)]
pub(crate) struct Flushed {
    /// Completions whose claim was lost: nothing of them was applied.
    pub(crate) rejected: Vec<i64>,
    /// Runs that finished (succeeded or failed) in this flush.
    pub(crate) finished_runs: Vec<i64>,
    /// Queues that received new tasks due now.
    pub(crate) queues: HashSet<String>,
}

/// Applies `batch` in one transaction (see the module docs).
pub(crate) async fn flush(
    pool: &PgPool,
    catalog: &Catalog,
    instance: &str,
    batch: &[Completion],
) -> Result<Flushed, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let out = apply(&mut tx, catalog, instance, batch).await?;
    tx.commit().await?;
    Ok(out)
}

/// Applies `batch` inside the caller's transaction.
pub(crate) async fn apply(
    conn: &mut PgConnection,
    catalog: &Catalog,
    instance: &str,
    batch: &[Completion],
) -> Result<Flushed, sqlx::Error> {
    let mut out = Flushed::default();

    // 1. Fence: apply only completions whose task still carries our token.
    let (retries, finals): (Vec<&Completion>, Vec<&Completion>) = batch
        .iter()
        .partition(|c| matches!(c.outcome, Outcome::Retry { .. } | Outcome::Release));
    // Keyed by (task, claim token): two completions of one task from two claims
    // (a stale one and a fresh one) must not both pass.
    let mut accepted: HashSet<(i64, i64)> = HashSet::with_capacity(batch.len());
    if !finals.is_empty() {
        let ids: Vec<i64> = finals.iter().map(|c| c.task_id).collect();
        let tokens: Vec<i64> = finals.iter().map(|c| c.token).collect();
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
    if !retries.is_empty() {
        let ids: Vec<i64> = retries.iter().map(|c| c.task_id).collect();
        let tokens: Vec<i64> = retries.iter().map(|c| c.token).collect();
        let mut delays: Vec<i64> = Vec::with_capacity(retries.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(retries.len());
        let mut counted: Vec<bool> = Vec::with_capacity(retries.len());
        for c in &retries {
            match &c.outcome {
                Outcome::Retry { delay, failure } => {
                    delays.push(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
                    errors.push(Some(
                        serde_json::to_string(&[failure]).unwrap_or_else(|_| "[]".to_owned()),
                    ));
                    counted.push(true);
                }
                _ => {
                    delays.push(0);
                    errors.push(None);
                    counted.push(false);
                }
            }
        }
        let rows: Vec<(i64, i64, String, bool)> = sqlx::query_as(
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
        .bind(&ids)
        .bind(&tokens)
        .bind(&delays)
        .bind(&errors)
        .bind(&counted)
        .fetch_all(&mut *conn)
        .await?;
        for (id, token, queue, due) in rows {
            accepted.insert((id, token));
            if due {
                out.queues.insert(queue);
            }
        }
    }
    out.rejected = batch
        .iter()
        .filter(|c| !accepted.contains(&(c.task_id, c.token)))
        .map(|c| c.task_id)
        .collect();
    // Each accepted claim applies once, even if the batch held it twice.
    let mut once: HashSet<(i64, i64)> = HashSet::with_capacity(batch.len());
    let applied: Vec<&Completion> = batch
        .iter()
        .filter(|c| accepted.contains(&(c.task_id, c.token)) && once.insert((c.task_id, c.token)))
        .collect();

    // 2. Sort the outcomes: steps done (completed or skipped), map expansions and
    //    element completions, failures, costs.
    let mut done: Vec<Done<'_>> = Vec::new();
    let mut expands = Expands::default();
    let mut elements = Elements::default();
    let mut store = StepRows::default();
    let mut finish_runs = (Vec::<i64>::new(), Vec::<String>::new(), Vec::<i64>::new());
    let mut ready = NewTasks::default();
    let mut join_hits = (Vec::<i64>::new(), Vec::<i16>::new());
    let mut costs: HashMap<i64, i64> = HashMap::new();
    let mut failed = FailedRuns::default();
    for c in &applied {
        let Some(flow) = catalog.get(c.flow.0, c.flow.1) else {
            continue;
        };
        match &c.outcome {
            Outcome::Succeeded(output) => match c.element {
                Some(element) => {
                    elements.push(flow, c, element, output.clone());
                    *costs.entry(c.run_id).or_default() += c.cost_cents;
                }
                None => done.push(Done {
                    flow,
                    run_id: c.run_id,
                    step: c.step,
                    attempts: c.attempt,
                    output: Some(output.clone()),
                    reason: None,
                    cost_cents: c.cost_cents,
                }),
            },
            Outcome::Skipped { reason } => done.push(Done {
                flow,
                run_id: c.run_id,
                step: c.step,
                attempts: c.attempt,
                output: None,
                reason: Some(reason.clone()),
                cost_cents: c.cost_cents,
            }),
            Outcome::Expand { items } => {
                expands.push(flow, c, items.clone());
                *costs.entry(c.run_id).or_default() += c.cost_cents;
            }
            Outcome::Failed { history, element } => {
                let errors = serde_json::to_string(history).unwrap_or_else(|_| "[]".to_owned());
                store.push(
                    c.run_id,
                    c.step,
                    "failed",
                    c.attempt,
                    None,
                    Some(errors),
                    None,
                );
                let step_name = flow
                    .def
                    .steps()
                    .get(usize::try_from(c.step).unwrap_or(usize::MAX))
                    .map_or("?", |s| s.name());
                let error = pgflow::RunError::step_failed(
                    flow.def.name(),
                    step_name,
                    *element,
                    history.clone(),
                );
                failed.push(
                    c.run_id,
                    serde_json::to_string(&error).unwrap_or_else(|_| "null".to_owned()),
                    c.cost_cents,
                );
            }
            Outcome::Retry { .. } | Outcome::Discard | Outcome::Release => {
                *costs.entry(c.run_id).or_default() += c.cost_cents;
            }
        }
    }

    if !expands.run_ids.is_empty() {
        out.queues
            .extend(expands.insert(&mut *conn, instance).await?);
    }
    if !elements.run_ids.is_empty() {
        // Map steps whose last element completed are done, with their outputs.
        for (run_id, step, flow, output) in elements.insert(&mut *conn, instance).await? {
            done.push(Done {
                flow,
                run_id,
                step,
                attempts: 1,
                output: Some(output),
                reason: None,
                cost_cents: 0,
            });
        }
    }

    // 3. Steps done: store outputs (or skips), count down joins, enqueue children,
    //    finish runs.
    for d in done {
        if d.flow.is_terminal(d.step) {
            finish_runs.0.push(d.run_id);
            finish_runs
                .1
                .push(d.output.unwrap_or_else(|| "null".to_owned()));
            finish_runs.2.push(d.cost_cents);
            continue;
        }
        let status = if d.output.is_some() {
            "completed"
        } else {
            "skipped"
        };
        store.push(
            d.run_id, d.step, status, d.attempts, d.output, None, d.reason,
        );
        let step = usize::try_from(d.step).unwrap_or(usize::MAX);
        for &child in d.flow.direct_children.get(step).into_iter().flatten() {
            ready.push(d.flow, d.run_id, child);
        }
        for &child in d.flow.join_children.get(step).into_iter().flatten() {
            join_hits.0.push(d.run_id);
            join_hits.1.push(child);
        }
        *costs.entry(d.run_id).or_default() += d.cost_cents;
    }

    if !store.run_ids.is_empty() {
        sqlx::query(
            "INSERT INTO pgflow.step_states
                 (run_id, step, status, attempts, output, errors, reason, instance_id, completed_at)
             SELECT u.run_id, u.step, u.status, u.attempts, u.output::jsonb, u.errors::jsonb,
                    u.reason, $8, now()
             FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[], $6::text[],
                         $7::text[])
                  AS u(run_id, step, status, attempts, output, errors, reason)
             ON CONFLICT (run_id, step) DO UPDATE
             SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, output = EXCLUDED.output,
                 errors = EXCLUDED.errors, reason = EXCLUDED.reason,
                 instance_id = EXCLUDED.instance_id, completed_at = EXCLUDED.completed_at",
        )
        .bind(&store.run_ids)
        .bind(&store.steps)
        .bind(&store.statuses)
        .bind(&store.attempts)
        .bind(&store.outputs)
        .bind(&store.errors)
        .bind(&store.reasons)
        .bind(instance)
        .execute(&mut *conn)
        .await?;
    }

    if !join_hits.0.is_empty() {
        // Two parents completing in one batch count down twice: group first.
        let rows: Vec<(i64, i16, i32, String, i32)> = sqlx::query_as(
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
        .bind(&join_hits.0)
        .bind(&join_hits.1)
        .fetch_all(&mut *conn)
        .await?;
        for (run_id, step, remaining, workflow, version) in rows {
            if remaining == 0 {
                if let Some(flow) = catalog.get(&workflow, version) {
                    ready.push(flow, run_id, step);
                }
            }
        }
    }

    if !ready.run_ids.is_empty() {
        let queues: Vec<(String,)> = sqlx::query_as(
            "WITH n AS (
                 INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, priority, max_attempts, run_at)
                 SELECT u.run_id, u.step, u.workflow, u.version, u.queue,
                        LEAST(GREATEST(u.priority::int + r.priority, -32768), 32767)::smallint,
                        u.max_attempts, now()
                 FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[],
                             $6::smallint[], $7::int[])
                      AS u(run_id, step, workflow, version, queue, priority, max_attempts)
                 JOIN pgflow.runs r ON r.id = u.run_id AND r.status = 'running'
                 RETURNING queue
             )
             SELECT DISTINCT queue FROM n",
        )
        .bind(&ready.run_ids)
        .bind(&ready.steps)
        .bind(&ready.workflows)
        .bind(&ready.versions)
        .bind(&ready.queues)
        .bind(&ready.priorities)
        .bind(&ready.max_attempts)
        .fetch_all(&mut *conn)
        .await?;
        out.queues.extend(queues.into_iter().map(|q| q.0));
    }

    if !finish_runs.0.is_empty() {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "UPDATE pgflow.runs r
             SET status = 'succeeded', output = u.output::jsonb, completed_at = now(),
                 instance_id = $4, cost_cents = r.cost_cents + u.cost
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, output, cost)
             WHERE r.id = u.id AND r.status = 'running'
             RETURNING r.id",
        )
        .bind(&finish_runs.0)
        .bind(&finish_runs.1)
        .bind(&finish_runs.2)
        .bind(instance)
        .fetch_all(&mut *conn)
        .await?;
        out.finished_runs.extend(rows.into_iter().map(|r| r.0));
    }

    if !failed.run_ids.is_empty() {
        let rows: Vec<(i64,)> = sqlx::query_as(
            "WITH f AS (
                 UPDATE pgflow.runs r
                 SET status = 'failed', error = u.error::jsonb, completed_at = now(),
                     instance_id = $4, cost_cents = r.cost_cents + u.cost
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, error, cost)
                 WHERE r.id = u.id AND r.status = 'running'
                 RETURNING r.id
             ), gone AS (
                 -- pending siblings never start; running ones finish into a failed run
                 DELETE FROM pgflow.tasks t USING f
                 WHERE t.run_id = f.id AND t.claimed_by IS NULL
             )
             SELECT id FROM f",
        )
        .bind(&failed.run_ids)
        .bind(&failed.errors)
        .bind(&failed.costs)
        .bind(instance)
        .fetch_all(&mut *conn)
        .await?;
        out.finished_runs.extend(rows.into_iter().map(|r| r.0));
    }

    costs.retain(|_, c| *c != 0);
    if !costs.is_empty() {
        let (ids, cents): (Vec<i64>, Vec<i64>) = costs.into_iter().unzip();
        sqlx::query(
            "UPDATE pgflow.runs r SET cost_cents = r.cost_cents + u.cost
             FROM unnest($1::bigint[], $2::bigint[]) AS u(id, cost) WHERE r.id = u.id",
        )
        .bind(&ids)
        .bind(&cents)
        .execute(&mut *conn)
        .await?;
    }
    Ok(out)
}

/// A step that is done in this flush: completed with an output, or skipped.
struct Done<'c> {
    flow: &'c Flow,
    run_id: i64,
    step: i16,
    attempts: i32,
    /// The output; `None` for a skipped step.
    output: Option<String>,
    /// Why a skipped step was skipped.
    reason: Option<String>,
    cost_cents: i64,
}

#[derive(Default)]
struct StepRows {
    /// One row per (run, step): an upsert may not touch a row twice (two failed
    /// elements of one map step fail the same step).
    seen: HashSet<(i64, i16)>,
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    outputs: Vec<Option<String>>,
    errors: Vec<Option<String>>,
    reasons: Vec<Option<String>>,
}

impl StepRows {
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        run_id: i64,
        step: i16,
        status: &'static str,
        attempts: i32,
        output: Option<String>,
        errors: Option<String>,
        reason: Option<String>,
    ) {
        if !self.seen.insert((run_id, step)) {
            return;
        }
        self.run_ids.push(run_id);
        self.steps.push(step);
        self.statuses.push(status);
        self.attempts.push(attempts);
        self.outputs.push(output);
        self.errors.push(errors);
        self.reasons.push(reason);
    }
}

/// Map steps that split their vector in this flush.
#[derive(Default)]
struct Expands {
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    workflows: Vec<&'static str>,
    versions: Vec<i32>,
    queues: Vec<&'static str>,
    priorities: Vec<i16>,
    max_attempts: Vec<i32>,
    items: Vec<String>,
    attempts: Vec<i32>,
}

impl Expands {
    fn push(&mut self, flow: &Flow, c: &Completion, items: String) {
        let Some(def) = flow
            .def
            .steps()
            .get(usize::try_from(c.step).unwrap_or(usize::MAX))
        else {
            return;
        };
        self.run_ids.push(c.run_id);
        self.steps.push(c.step);
        self.workflows.push(flow.def.name());
        self.versions
            .push(crate::definitions::version_i32(flow.def.version()));
        self.queues.push(flow.def.queue());
        self.priorities.push(def.options().priority);
        self.max_attempts
            .push(i32::try_from(def.options().max_attempts).unwrap_or(i32::MAX));
        self.items.push(items);
        self.attempts.push(c.attempt);
    }

    /// Inserts one task per element (the element as its `item`) and the map step's
    /// `running` state counting them; returns the queues that got tasks. Reads the
    /// run by its primary key; the new tasks enter `tasks_available` in element order.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        instance: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        let queues: Vec<(String,)> = sqlx::query_as(
            "WITH u AS (
                 SELECT run_id, step, workflow, version, queue, priority, max_attempts,
                        items::jsonb AS items, attempts
                 FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[],
                             $6::smallint[], $7::int[], $8::text[], $9::int[])
                      AS u(run_id, step, workflow, version, queue, priority, max_attempts, items,
                           attempts)
             ), s AS (
                 INSERT INTO pgflow.step_states (run_id, step, status, remaining, attempts, instance_id)
                 SELECT u.run_id, u.step, 'running', jsonb_array_length(u.items), u.attempts, $10
                 FROM u
                 ON CONFLICT (run_id, step) DO NOTHING
             ), n AS (
                 INSERT INTO pgflow.tasks (run_id, step, element, item, workflow, version, queue,
                                           priority, max_attempts, run_at)
                 SELECT u.run_id, u.step, (e.ord - 1)::int, e.item, u.workflow, u.version, u.queue,
                        LEAST(GREATEST(u.priority::int + r.priority, -32768), 32767)::smallint,
                        u.max_attempts, now()
                 FROM u
                 JOIN pgflow.runs r ON r.id = u.run_id AND r.status = 'running'
                 CROSS JOIN LATERAL jsonb_array_elements(u.items) WITH ORDINALITY AS e(item, ord)
                 ORDER BY u.run_id, u.step, e.ord
                 RETURNING queue
             )
             SELECT DISTINCT queue FROM n",
        )
        .bind(&self.run_ids)
        .bind(&self.steps)
        .bind(&self.workflows)
        .bind(&self.versions)
        .bind(&self.queues)
        .bind(&self.priorities)
        .bind(&self.max_attempts)
        .bind(&self.items)
        .bind(&self.attempts)
        .bind(instance)
        .fetch_all(conn)
        .await?;
        Ok(queues.into_iter().map(|q| q.0).collect())
    }
}

/// Element completions of map steps in this flush.
#[derive(Default)]
struct Elements<'c> {
    flows: HashMap<(i64, i16), &'c Flow>,
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    elements: Vec<i32>,
    outputs: Vec<String>,
    attempts: Vec<i32>,
}

impl<'c> Elements<'c> {
    fn push(&mut self, flow: &'c Flow, c: &Completion, element: i32, output: String) {
        self.flows.insert((c.run_id, c.step), flow);
        self.run_ids.push(c.run_id);
        self.steps.push(c.step);
        self.elements.push(element);
        self.outputs.push(output);
        self.attempts.push(c.attempt);
    }

    /// Stores the elements' outputs and counts down their map steps; returns the map
    /// steps whose last element completed (now `completed`: a terminal one keeps no
    /// output here, its run does), with their outputs in element order.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        instance: &str,
    ) -> Result<Vec<(i64, i16, &'c Flow, String)>, sqlx::Error> {
        // Rows are locked in (run_id, step) order so that two instances counting down
        // the same map steps cannot deadlock. Both tables are reached by their
        // primary keys (`step_elements (run_id, step, element)`, `step_states
        // (run_id, step)`).
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
        .bind(&self.run_ids)
        .bind(&self.steps)
        .bind(&self.elements)
        .bind(&self.outputs)
        .bind(&self.attempts)
        .bind(instance)
        .fetch_all(&mut *conn)
        .await?;
        let (run_ids, steps): (Vec<i64>, Vec<i16>) = counted
            .into_iter()
            .filter(|c| c.2 == 0)
            .map(|(run_id, step, _)| (run_id, step))
            .unzip();
        if run_ids.is_empty() {
            return Ok(Vec::new());
        }
        // Once per map step: walks its elements along the primary key, in order.
        let rows: Vec<(i64, i16, String)> = sqlx::query_as(
            "SELECT e.run_id, e.step, jsonb_agg(e.output ORDER BY e.element)::text
             FROM pgflow.step_elements e
             JOIN unnest($1::bigint[], $2::smallint[]) AS d(run_id, step) USING (run_id, step)
             GROUP BY e.run_id, e.step",
        )
        .bind(&run_ids)
        .bind(&steps)
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(run_id, step, output)| {
                let flow = self.flows.get(&(run_id, step))?;
                Some((run_id, step, *flow, output))
            })
            .collect())
    }
}

/// Tasks to insert, as bind arrays.
#[derive(Default)]
pub(crate) struct NewTasks {
    pub(crate) run_ids: Vec<i64>,
    pub(crate) steps: Vec<i16>,
    pub(crate) workflows: Vec<&'static str>,
    pub(crate) versions: Vec<i32>,
    pub(crate) queues: Vec<&'static str>,
    pub(crate) priorities: Vec<i16>,
    pub(crate) max_attempts: Vec<i32>,
}

impl NewTasks {
    pub(crate) fn push(&mut self, flow: &Flow, run_id: i64, step: i16) {
        let Some(def) = flow
            .def
            .steps()
            .get(usize::try_from(step).unwrap_or(usize::MAX))
        else {
            return;
        };
        self.run_ids.push(run_id);
        self.steps.push(step);
        self.workflows.push(flow.def.name());
        self.versions
            .push(crate::definitions::version_i32(flow.def.version()));
        self.queues.push(flow.def.queue());
        self.priorities.push(def.options().priority);
        self.max_attempts
            .push(i32::try_from(def.options().max_attempts).unwrap_or(i32::MAX));
    }
}

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

/// Cancels run `id` if it is running: its status becomes `cancelled` and its
/// pending tasks are deleted (steps running somewhere finish into a cancelled run,
/// which enqueues nothing). Returns the status it had and whether this call
/// cancelled it, or `None` when there is no such run.
pub(crate) async fn cancel(pool: &PgPool, id: i64) -> Result<Option<(String, bool)>, sqlx::Error> {
    sqlx::query_as(
        "WITH prev AS (
             SELECT status FROM pgflow.runs WHERE id = $1
         ), c AS (
             UPDATE pgflow.runs SET status = 'cancelled', completed_at = now()
             WHERE id = $1 AND status = 'running' RETURNING id
         ), d AS (
             DELETE FROM pgflow.tasks t USING c WHERE t.run_id = c.id AND t.claimed_by IS NULL
         )
         SELECT prev.status, EXISTS (SELECT 1 FROM c) FROM prev",
    )
    .bind(id)
    .fetch_optional(pool)
    .await
}
