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
    pub(crate) parent_outputs: Option<Vec<String>>,
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
    Option<Vec<String>>,
);

/// The claim statement. The inner SELECT walks `tasks_available` in claim order
/// (see the `claim_uses_the_partial_index` test for its plan).
pub(crate) const CLAIM_SQL: &str = "
WITH steps AS (
    SELECT * FROM unnest($5::text[], $6::int[], $7::smallint[], $8::bigint[], $9::bool[])
        AS s(workflow, version, step, lease_ms, needs_input)
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
    WHERE t.id IN (
        SELECT a.id FROM pgflow.tasks a
        WHERE a.queue = $3
          AND a.claimed_by IS NULL
          AND a.run_at <= now()
          AND (a.workflow, a.version) IN (SELECT DISTINCT workflow, version FROM steps)
        ORDER BY a.priority DESC, a.run_at, a.id
        LIMIT $4
        FOR UPDATE SKIP LOCKED)
    RETURNING t.id, t.run_id, t.step, t.workflow, t.version, t.attempt, t.errors
)
SELECT c.id, c.run_id, c.step, c.workflow, c.version, c.attempt, c.errors::text,
       r.status,
       CASE WHEN s.needs_input THEN r.input::text END,
       p.steps, p.outputs
FROM claimed c
JOIN pgflow.runs r ON r.id = c.run_id
LEFT JOIN steps s ON s.workflow = c.workflow AND s.version = c.version AND s.step = c.step
LEFT JOIN LATERAL (
    SELECT array_agg(ss.step) AS steps, array_agg(ss.output::text) AS outputs
    FROM pgflow.step_states ss
    WHERE ss.run_id = c.run_id
      AND ss.status = 'completed'
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
        })
        .collect())
}

/// How an attempt ended.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The step's output, as JSON.
    Succeeded(String),
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
    let mut accepted: HashSet<i64> = HashSet::with_capacity(batch.len());
    if !finals.is_empty() {
        let ids: Vec<i64> = finals.iter().map(|c| c.task_id).collect();
        let tokens: Vec<i64> = finals.iter().map(|c| c.token).collect();
        let rows: Vec<(i64,)> = sqlx::query_as(
            "DELETE FROM pgflow.tasks t
             USING unnest($1::bigint[], $2::bigint[]) AS c(id, token)
             WHERE t.id = c.id AND t.claim_token = c.token
             RETURNING t.id",
        )
        .bind(&ids)
        .bind(&tokens)
        .fetch_all(&mut *conn)
        .await?;
        accepted.extend(rows.into_iter().map(|r| r.0));
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
        let rows: Vec<(i64, String, bool)> = sqlx::query_as(
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
             RETURNING t.id, t.queue, t.run_at <= now()",
        )
        .bind(&ids)
        .bind(&tokens)
        .bind(&delays)
        .bind(&errors)
        .bind(&counted)
        .fetch_all(&mut *conn)
        .await?;
        for (id, queue, due) in rows {
            accepted.insert(id);
            if due {
                out.queues.insert(queue);
            }
        }
    }
    out.rejected = batch
        .iter()
        .filter(|c| !accepted.contains(&c.task_id))
        .map(|c| c.task_id)
        .collect();
    let applied: Vec<&Completion> = batch
        .iter()
        .filter(|c| accepted.contains(&c.task_id))
        .collect();

    // 2. Successes: store outputs, count down joins, enqueue children, finish runs.
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
            Outcome::Succeeded(output) if flow.is_terminal(c.step) => {
                finish_runs.0.push(c.run_id);
                finish_runs.1.push(output.clone());
                finish_runs.2.push(c.cost_cents);
            }
            Outcome::Succeeded(output) => {
                store.push(c, "completed", Some(output.clone()), None);
                let step = usize::try_from(c.step).unwrap_or(usize::MAX);
                for &child in flow.direct_children.get(step).into_iter().flatten() {
                    ready.push(flow, c.run_id, child);
                }
                for &child in flow.join_children.get(step).into_iter().flatten() {
                    join_hits.0.push(c.run_id);
                    join_hits.1.push(child);
                }
                *costs.entry(c.run_id).or_default() += c.cost_cents;
            }
            Outcome::Failed { history, element } => {
                let errors = serde_json::to_string(history).unwrap_or_else(|_| "[]".to_owned());
                store.push(c, "failed", None, Some(errors));
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

    if !store.run_ids.is_empty() {
        sqlx::query(
            "INSERT INTO pgflow.step_states
                 (run_id, step, status, attempts, output, errors, instance_id, completed_at)
             SELECT u.run_id, u.step, u.status, u.attempts, u.output::jsonb, u.errors::jsonb, $7, now()
             FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[], $6::text[])
                  AS u(run_id, step, status, attempts, output, errors)
             ON CONFLICT (run_id, step) DO UPDATE
             SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, output = EXCLUDED.output,
                 errors = EXCLUDED.errors, instance_id = EXCLUDED.instance_id,
                 completed_at = EXCLUDED.completed_at
             -- the fence already makes this unreachable; a stored output is never replaced
             WHERE pgflow.step_states.status <> 'completed'",
        )
        .bind(&store.run_ids)
        .bind(&store.steps)
        .bind(&store.statuses)
        .bind(&store.attempts)
        .bind(&store.outputs)
        .bind(&store.errors)
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

#[derive(Default)]
struct StepRows {
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    statuses: Vec<&'static str>,
    attempts: Vec<i32>,
    outputs: Vec<Option<String>>,
    errors: Vec<Option<String>>,
}

impl StepRows {
    fn push(
        &mut self,
        c: &Completion,
        status: &'static str,
        output: Option<String>,
        errors: Option<String>,
    ) {
        self.run_ids.push(c.run_id);
        self.steps.push(c.step);
        self.statuses.push(status);
        self.attempts.push(c.attempt);
        self.outputs.push(output);
        self.errors.push(errors);
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
