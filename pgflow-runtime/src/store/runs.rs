//! Runs, `pgflow.runs`: starting them (with their first tasks and join counters, in
//! one statement), reading where they stand, cancelling them, and the aggregates
//! over finished runs (`pgflow.job_results`).

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use pgflow::{Definition, Plan};

use crate::catalog::{Entry, StepRow, step_rows};
use crate::store::tasks::{enqueue_ctes, enqueue_plain_cte};
use crate::store::{notify::notify_queue, step_i16, version_i32};

/// Runs to start, as the bind arrays of [`start`].
#[derive(Debug, Default)]
pub(crate) struct NewRuns {
    pub(crate) inputs: Vec<String>,
    pub(crate) priorities: Vec<i16>,
    pub(crate) run_ats: Vec<Option<DateTime<Utc>>>,
    /// Idempotency keys (`None` for a run without one): with none, the start is a
    /// plain insert (see [`START_SQL`]).
    pub(crate) keys: Vec<Option<String>>,
    /// For child runs (subflows): the parent run, step and element, one per run;
    /// empty for runs without a parent (unnest pads them with NULL).
    pub(crate) parent_runs: Vec<i64>,
    pub(crate) parent_steps: Vec<&'static str>,
    pub(crate) parent_elements: Vec<Option<i32>>,
    /// Each run's key, and budgets; empty when none has one.
    pub(crate) run_keys: Vec<Option<String>>,
    pub(crate) budget_cents: Vec<Option<i64>>,
    pub(crate) budget_tokens: Vec<Option<i64>>,
    /// Debounce keys (empty when none has one).
    pub(crate) debounce_keys: Vec<Option<String>>,
}

impl NewRuns {
    /// Adds a run with `options` (key and budget arrays grow only when some run has
    /// one, so a plain batch binds empty arrays).
    pub(crate) fn push(&mut self, input: String, options: RunOptions) {
        let n = self.inputs.len();
        self.inputs.push(input);
        self.priorities.push(options.priority);
        self.run_ats.push(options.run_at);
        self.keys.push(options.idempotency_key);
        for (column, value) in [
            (&mut self.budget_cents, options.budget_cents),
            (&mut self.budget_tokens, options.budget_tokens),
        ] {
            if value.is_some() || !column.is_empty() {
                column.resize(n, None);
                column.push(value);
            }
        }
        for (column, value) in [
            (&mut self.run_keys, options.key),
            (&mut self.debounce_keys, options.debounce_key),
        ] {
            if value.is_some() || !column.is_empty() {
                column.resize(n, None);
                column.push(value);
            }
        }
    }
}

/// What one new run carries besides its input.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOptions {
    pub(crate) priority: i16,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) budget_cents: Option<i64>,
    pub(crate) budget_tokens: Option<i64>,
    pub(crate) debounce_key: Option<String>,
}

/// What starting a run of a workflow version inserts besides the run: its root
/// tasks and its join counters. From a linked definition ([`Shape::of_entry`]) or
/// a stored one ([`Shape::of_stored`], for tools that link no workflow).
#[derive(Debug)]
pub(crate) struct Shape<'a> {
    workflow: &'a str,
    version: i32,
    queue: &'a str,
    root_steps: Vec<i16>,
    root_priorities: Vec<i16>,
    root_attempts: Vec<i32>,
    root_delays_ms: Vec<i64>,
    root_map_from: Vec<Option<i16>>,
    root_waits_for: Vec<Option<String>>,
    root_wait_ms: Vec<i64>,
    join_steps: Vec<i16>,
    join_counts: Vec<i32>,
}

impl<'a> Shape<'a> {
    fn new(
        (workflow, version, queue): (&'a str, i32, &'a str),
        plan: &Plan,
        rows: &[StepRow],
    ) -> Self {
        let mut shape = Shape {
            workflow,
            version,
            queue,
            root_steps: Vec::new(),
            root_priorities: Vec::new(),
            root_attempts: Vec::new(),
            root_delays_ms: Vec::new(),
            root_map_from: Vec::new(),
            root_waits_for: Vec::new(),
            root_wait_ms: Vec::new(),
            join_steps: Vec::new(),
            join_counts: Vec::new(),
        };
        for &s in plan.roots() {
            if let Some(row) = rows.get(s) {
                shape.root_steps.push(step_i16(s));
                shape.root_priorities.push(row.priority);
                shape.root_attempts.push(row.max_attempts);
                shape.root_delays_ms.push(row.delay_ms);
                shape.root_map_from.push(row.map_from);
                shape.root_waits_for.push(row.waits_for.clone());
                shape.root_wait_ms.push(row.wait_ms);
            }
        }
        for (s, n) in plan.joins() {
            shape.join_steps.push(step_i16(s));
            shape.join_counts.push(i32::try_from(n).unwrap_or(i32::MAX));
        }
        shape
    }

    /// The shape of a workflow this runtime links.
    pub(crate) fn of_entry(entry: &'a Entry) -> Self {
        let def = entry.def;
        Self::new(
            (def.name(), version_i32(def.version()), def.queue()),
            entry.plan,
            entry.step_rows(),
        )
    }

    /// The shape of a stored definition.
    pub(crate) fn of_stored(def: &'a Definition, version: i32, plan: &Plan) -> Self {
        Self::new((&def.name, version, &def.queue), plan, &step_rows(def))
    }
}

/// The start statement (see [`start`]) with an `ON CONFLICT` clause on idempotency
/// keys (or none) and the enqueue CTEs of its root steps (`enqueue_ctes!`, or
/// `enqueue_plain_cte!` when none is a map step).
macro_rules! start_sql {
    ($on_conflict:expr, $enqueue:expr) => {
        concat!(
        "WITH u AS (
             SELECT * FROM unnest((SELECT $3::text[]), (SELECT $4::smallint[]), (SELECT $5::timestamptz[]), (SELECT $6::text[]),
                                  (SELECT $17::bigint[]), (SELECT $18::text[]), (SELECT $19::int[]), (SELECT $20::text[]),
                                  (SELECT $21::bigint[]), (SELECT $22::bigint[]), (SELECT $23::text[]))
                 WITH ORDINALITY AS u(input, priority, run_at, key, parent_run_id, parent_step,
                                      parent_element, run_key, budget_cents, budget_tokens,
                                      debounce_key, ord)
         ), r AS (
             INSERT INTO pgflow.runs (workflow, version, input, priority, run_at, idempotency_key,
                                      parent_run_id, parent_step, parent_element, key,
                                      budget_cents, budget_tokens, debounce_key, trace_context)
             SELECT $1, $2, u.input::jsonb, u.priority, COALESCE(u.run_at, now()), u.key,
                    u.parent_run_id, u.parent_step, u.parent_element,
                    -- a child run counts under its parent's key unless given its own
                    CASE WHEN u.parent_run_id IS NULL THEN u.run_key
                         ELSE COALESCE(u.run_key, (SELECT k.key FROM pgflow.runs k
                                                   WHERE k.id = u.parent_run_id)) END,
                    u.budget_cents, u.budget_tokens, u.debounce_key,
                    -- the starter's trace context; a child run's parent's otherwise
                    CASE WHEN $24::text IS NOT NULL OR u.parent_run_id IS NULL THEN $24
                         ELSE (SELECT t.trace_context FROM pgflow.runs t
                               WHERE t.id = u.parent_run_id) END
             FROM u
             -- a child run only for a parent still running, read under a share lock:
             -- a parent failing or cancelled meanwhile is seen, and one failed or
             -- cancelled after this commits sees the child (see `cancel`)
             WHERE u.parent_run_id IS NULL
                OR EXISTS (SELECT 1 FROM pgflow.runs p
                           WHERE p.id = u.parent_run_id AND p.status = 'running' FOR SHARE)
             ORDER BY u.ord
", $on_conflict, "
             RETURNING id, priority, run_at, input, key
         ), ready AS (
             SELECT r.id AS run_id, s.step, $1::text AS workflow, $2::int AS version,
                    $7::text AS queue, s.priority, s.max_attempts, r.run_at, s.delay_ms,
                    s.map_from, r.priority AS run_priority, s.waits_for, s.wait_ms,
                    CASE WHEN s.map_from < 0 THEN r.input END AS run_input, r.key AS run_key
             FROM r CROSS JOIN unnest((SELECT $8::smallint[]), (SELECT $9::smallint[]), (SELECT $10::int[]), (SELECT $11::smallint[]),
                                      (SELECT $14::bigint[]), (SELECT $15::text[]), (SELECT $16::bigint[]))
                 AS s(step, priority, max_attempts, map_from, delay_ms, waits_for, wait_ms)
         ), ",
        $enqueue,
        ", j AS (
             INSERT INTO pgflow.step_states (run_id, step, status, remaining)
             SELECT r.id, j.step, 'waiting', j.n
             FROM r CROSS JOIN unnest((SELECT $12::smallint[]), (SELECT $13::int[])) AS j(step, n)
         ), notified AS MATERIALIZED (
             SELECT ",
        notify_queue!("$7"),
        " WHERE EXISTS (SELECT 1 FROM r)
         )
         SELECT r.id FROM r LEFT JOIN notified ON true ORDER BY r.id"
    )
    };
}

/// The `ON CONFLICT` clause of a start whose runs have idempotency keys: one whose key
/// is taken is not inserted. Runs without keys are a plain insert (`ON CONFLICT`
/// inserts speculatively, which costs a WAL record and a confirmation per run).
macro_rules! on_key_conflict {
    () => {
        "             ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
    };
}

/// [`start`]'s statements: runs with idempotency keys or without, of a workflow
/// with a map step among its roots or without (see `enqueue_plain_cte!`).
const START_SQL: [[&str; 2]; 2] = [
    [
        start_sql!("", enqueue_plain_cte!()),
        start_sql!("", enqueue_ctes!()),
    ],
    [
        start_sql!(on_key_conflict!(), enqueue_plain_cte!()),
        start_sql!(on_key_conflict!(), enqueue_ctes!()),
    ],
];

/// Inserts runs of the workflow version `shape` describes, with their root tasks (a
/// root map step fans out over the input) and the `waiting` rows of its joins, and
/// notifies the queue — in one statement, delivered at commit of the caller's
/// transaction if any. A run whose idempotency key is taken is not inserted (unique
/// index `runs_idempotency_key`). Returns the new ids in input order.
pub(crate) async fn start(
    conn: &mut PgConnection,
    shape: &Shape<'_>,
    runs: &NewRuns,
) -> Result<Vec<i64>, sqlx::Error> {
    let keyed = runs.keys.iter().any(Option::is_some);
    let maps = shape.root_map_from.iter().any(Option::is_some);
    let sql = START_SQL[usize::from(keyed)][usize::from(maps)];
    sqlx::query_scalar(sql)
        .bind(shape.workflow)
        .bind(shape.version)
        .bind(&runs.inputs)
        .bind(&runs.priorities)
        .bind(&runs.run_ats)
        .bind(&runs.keys)
        .bind(shape.queue)
        .bind(&shape.root_steps)
        .bind(&shape.root_priorities)
        .bind(&shape.root_attempts)
        .bind(&shape.root_map_from)
        .bind(&shape.join_steps)
        .bind(&shape.join_counts)
        .bind(&shape.root_delays_ms)
        .bind(&shape.root_waits_for)
        .bind(&shape.root_wait_ms)
        .bind(&runs.parent_runs)
        .bind(&runs.parent_steps)
        .bind(&runs.parent_elements)
        .bind(&runs.run_keys)
        .bind(&runs.budget_cents)
        .bind(&runs.budget_tokens)
        .bind(&runs.debounce_keys)
        .bind(crate::otel::current())
        .fetch_all(conn)
        .await
}

/// Joins a debounced start to the pending run of `workflow` with debounce key `key`
/// — one whose tasks are all parked and unclaimed (no step started) — replacing its
/// input and moving its start (and its tasks' due times) to `run_at`. Returns the
/// run, or `None` when none is pending. Call it in a transaction holding
/// [`lock_debounce`].
pub(crate) async fn debounce_into(
    conn: &mut PgConnection,
    (workflow, key): (&str, &str),
    input: &str,
    run_at: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    // the candidate and its tasks, locked: a task a promoter or claimer is taking
    // is not `parked` any more once we hold it
    let pending: Option<(i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT r.id, r.run_at FROM pgflow.runs r
         WHERE r.workflow = $1 AND r.debounce_key = $2 AND r.status = 'running'
         ORDER BY r.id DESC LIMIT 1
         FOR UPDATE",
    )
    .bind(workflow)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, old_run_at)) = pending else {
        return Ok(None);
    };
    // Not started: no step state but its joins' counters, and every task a first,
    // untouched attempt, parked and unclaimed. The tasks are locked without waiting
    // (one that another transaction holds is being claimed, promoted or completed:
    // the run counts as started), so this never waits on a flush.
    let started: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pgflow.step_states s
                        WHERE s.run_id = $1 AND s.status <> 'waiting')
             OR (SELECT count(*) FROM pgflow.tasks WHERE run_id = $1)
                <> (SELECT count(*) FROM (
                        SELECT 1 FROM pgflow.tasks t
                        WHERE t.run_id = $1 AND t.parked AND t.claimed_by IS NULL
                          AND t.attempt = 1 AND t.snoozes = 0 AND t.errors IS NULL
                          AND t.child_run_id IS NULL
                        FOR UPDATE SKIP LOCKED) l)
             OR NOT EXISTS (SELECT 1 FROM pgflow.tasks WHERE run_id = $1)",
    )
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    if started {
        return Ok(None);
    }
    sqlx::query(
        "WITH r AS (
             UPDATE pgflow.runs SET input = $2::jsonb, run_at = $3 WHERE id = $1
         )
         UPDATE pgflow.tasks SET run_at = run_at + ($3 - $4), parked = true WHERE run_id = $1",
    )
    .bind(id)
    .bind(input)
    .bind(run_at)
    .bind(old_run_at)
    .execute(conn)
    .await?;
    Ok(Some(id))
}

/// Serializes debounced starts of one (workflow, key) for the caller's transaction.
pub(crate) async fn lock_debounce(
    conn: &mut PgConnection,
    workflow: &str,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtext('pgflow.debounce'), hashtext($1 || '/' || $2))",
    )
    .bind(workflow)
    .bind(key)
    .execute(conn)
    .await?;
    Ok(())
}

/// The highest stored version of `workflow` (primary key of `pgflow.workflows`).
pub(crate) async fn latest_stored_version(
    db: impl PgExecutor<'_>,
    workflow: &str,
) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(version) FROM pgflow.workflows WHERE name = $1")
        .bind(workflow)
        .fetch_one(db)
        .await
}

/// The run of `workflow` holding idempotency key `key` (index `runs_idempotency_key`).
pub(crate) async fn by_idempotency_key(
    conn: &mut PgConnection,
    workflow: &str,
    key: &str,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM pgflow.runs WHERE workflow = $1 AND idempotency_key = $2")
        .bind(workflow)
        .bind(key)
        .fetch_optional(conn)
        .await
}

/// Where a run stands, as stored.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Outcome {
    pub(crate) status: String,
    pub(crate) workflow: String,
    pub(crate) output: Option<String>,
    pub(crate) error: Option<String>,
}

/// Run `id`'s status, workflow, output and error (by primary key).
pub(crate) async fn outcome(
    db: impl PgExecutor<'_>,
    id: i64,
) -> Result<Option<Outcome>, sqlx::Error> {
    sqlx::query_as(
        "SELECT status, workflow, output::text AS output, error::text AS error
         FROM pgflow.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await
}

/// What [`cancel`] found and did.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Cancelled {
    /// The status the run had.
    pub(crate) status: String,
    /// Whether this call cancelled it.
    pub(crate) cancelled: bool,
    /// Every run this call cancelled: the run and its running descendants.
    pub(crate) ids: Vec<i64>,
}

/// Cancels run `id` if it is running, with its running descendants (child runs of
/// subflows, and theirs): their status becomes `cancelled` and their pending tasks
/// are deleted (index `tasks_run_id`); steps running somewhere finish into a
/// cancelled run, which enqueues nothing. A cancelled child run makes its parent's
/// waiting task due (its step then fails: the child was cancelled). `None` when there
/// is no such run.
///
/// Several statements in one transaction: the run's status first, then (each with a
/// snapshot taken after the one before) its descendants level by level, the tasks,
/// and the parent's waiting task. A flush that was starting a
/// child of this run or parking one of its tasks holds a share lock on the run row
/// (see `start` and `store::subflows::link`): the first statement waits for it, and
/// the second sees what it wrote.
pub(crate) async fn cancel(pool: &sqlx::PgPool, id: i64) -> Result<Option<Cancelled>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let root: Option<(String, bool)> = sqlx::query_as(
        "WITH prev AS (
             SELECT status FROM pgflow.runs WHERE id = $1
         ), c AS (
             UPDATE pgflow.runs SET status = 'cancelled', completed_at = now()
             WHERE id = $1 AND status = 'running' RETURNING id
         )
         SELECT prev.status, EXISTS (SELECT 1 FROM c) FROM prev",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((status, cancelled)) = root else {
        return Ok(None);
    };
    if !cancelled {
        tx.commit().await?;
        return Ok(Some(Cancelled {
            status,
            cancelled,
            ids: Vec::new(),
        }));
    }
    let mut ids = vec![id];
    ids.extend(cancel_descendants(&mut tx, &[id]).await?);
    // A child run: its parent's step waits for it, and fails now.
    let woken = crate::store::subflows::wake_parents(&mut tx, &[id]).await?;
    let woken: Vec<&str> = woken.iter().map(String::as_str).collect();
    crate::store::notify::queues(&mut tx, &woken).await?;
    tx.commit().await?;
    Ok(Some(Cancelled {
        status,
        cancelled,
        ids,
    }))
}

/// Cancels the running descendants of the runs `parents` (which just failed or were
/// cancelled: nothing will read their children's outputs), then deletes the unclaimed
/// tasks of `parents` and of every run it cancelled. Returns the runs it cancelled.
///
/// One statement per level of the tree and the task delete last: each statement takes
/// its own snapshot, so a child started (or a task parked) by a flush that held a
/// share lock on its parent run — the cancelling `UPDATE` waited for it — is seen by
/// the next statement (see `store::subflows`).
pub(crate) async fn cancel_descendants(
    conn: &mut PgConnection,
    parents: &[i64],
) -> Result<Vec<i64>, sqlx::Error> {
    let mut cancelled = Vec::new();
    let mut level = parents.to_vec();
    while !level.is_empty() {
        // index `runs_parent_run_id`; a run is cancelled once (it is no longer
        // `running` after), so a damaged row's cycle ends too
        level = sqlx::query_scalar(
            "UPDATE pgflow.runs SET status = 'cancelled', completed_at = now()
             WHERE parent_run_id = ANY ($1) AND status = 'running'
             RETURNING id",
        )
        .bind(&level)
        .fetch_all(&mut *conn)
        .await?;
        cancelled.extend_from_slice(&level);
    }
    let doomed: Vec<i64> = parents.iter().chain(&cancelled).copied().collect();
    sqlx::query("DELETE FROM pgflow.tasks WHERE run_id = ANY ($1) AND claimed_by IS NULL")
        .bind(&doomed)
        .execute(&mut *conn)
        .await?;
    cancelled.sort_unstable();
    Ok(cancelled)
}

/// Aggregates over the runs of one workflow finished since a time.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SummaryRow {
    pub(crate) count: i64,
    pub(crate) success_rate: Option<f64>,
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p95_ms: Option<f64>,
    pub(crate) total_cost_cents: Option<i64>,
    pub(crate) tokens_in: Option<i64>,
    pub(crate) tokens_out: Option<i64>,
}

/// Count, success rate, p50/p95 duration and cost of `workflow`'s runs finished since
/// `since` (`pgflow.job_results`).
pub(crate) async fn summary(
    db: impl PgExecutor<'_>,
    workflow: &str,
    since: DateTime<Utc>,
) -> Result<SummaryRow, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS count,
                avg(CASE WHEN status = 'success' THEN 1.0 ELSE 0.0 END)::float8 AS success_rate,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) AS p50_ms,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
                sum(cost_cents)::bigint AS total_cost_cents,
                sum(tokens_in)::bigint AS tokens_in,
                sum(tokens_out)::bigint AS tokens_out
         FROM pgflow.job_results
         WHERE workflow = $1 AND completed_at >= $2",
    )
    .bind(workflow)
    .bind(since)
    .fetch_one(db)
    .await
}

/// A run as tools list it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RunRow {
    pub(crate) id: i64,
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) status: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) run_at: DateTime<Utc>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
    pub(crate) duration_ms: Option<i64>,
    pub(crate) cost_cents: i64,
    pub(crate) instance_id: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) key: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) tokens_in: Option<i64>,
    pub(crate) tokens_out: Option<i64>,
}

/// The columns of [`RunRow`]; the duration as in `pgflow.job_results`.
macro_rules! run_columns {
    () => {
        "id, workflow, version, status, created_at, run_at, completed_at,
         (EXTRACT(EPOCH FROM (completed_at - GREATEST(created_at, run_at))) * 1000)::bigint
             AS duration_ms,
         cost_cents, instance_id, error::text AS error, key, idempotency_key, tokens_in,
         tokens_out"
    };
}

/// Which runs [`list`] returns (every field optional).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ListFilter<'a> {
    pub(crate) workflow: Option<&'a str>,
    pub(crate) version: Option<i32>,
    pub(crate) status: Option<&'a str>,
    pub(crate) key: Option<&'a str>,
    /// Only runs older than this one (keyset pagination).
    pub(crate) before: Option<i64>,
    /// Only runs started at or after this.
    pub(crate) since: Option<DateTime<Utc>>,
    /// This run id, or the runs with this idempotency key.
    pub(crate) search: Option<&'a str>,
}

/// The statement of [`list`]: `$1` workflow, `$2` status, `$3` limit, `$4` version,
/// `$5` key, `$6` before, `$7` since, `$8` id, `$9` idempotency key. A time window
/// becomes an id range: the newest run started before it, found walking the primary
/// key down through the window's runs only, bounds the scan (ids grow with start
/// times, up to the order concurrent starts commit in).
macro_rules! list_sql {
    () => {
        concat!(
            "SELECT ",
            run_columns!(),
            " FROM pgflow.runs
         WHERE ($1::text IS NULL OR workflow = $1) AND ($2::text IS NULL OR status = $2)
           AND ($4::int IS NULL OR version = $4) AND ($5::text IS NULL OR key = $5)
           AND ($6::bigint IS NULL OR id < $6)
           AND ($7::timestamptz IS NULL OR (created_at >= $7 AND id > COALESCE(
                (SELECT b.id FROM pgflow.runs b WHERE b.created_at < $7
                 ORDER BY b.id DESC LIMIT 1), 0)))
           AND ($8::bigint IS NULL OR id = $8)
           AND ($9::text IS NULL OR idempotency_key = $9)
         ORDER BY id DESC
         LIMIT $3"
        )
    };
}

/// The query of [`list`] (or its `EXPLAIN`) with its parameters bound.
fn list_query<'q, O>(
    sql: &'q str,
    f: &ListFilter<'q>,
    limit: u32,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow>,
{
    let id = f.search.and_then(|q| q.trim().parse::<i64>().ok());
    let idempotency = f.search.filter(|_| id.is_none());
    sqlx::query_as(sql)
        .persistent(false)
        .bind(f.workflow)
        .bind(f.status)
        .bind(i64::from(limit))
        .bind(f.version)
        .bind(f.key)
        .bind(f.before)
        .bind(f.since)
        .bind(id)
        .bind(idempotency)
}

/// The newest runs matching `f`, newest first, by keyset (`id < before`): each
/// filter is an index range (`runs_pkey`, `runs_workflow_id`, `runs_key_id`,
/// `runs_idempotency_key_only`; a time window an id range, see [`list_sql!`]);
/// status and version are checked along it. Planned with its parameters every time
/// (an unnamed statement): a generic plan could not use the index of the filter
/// given.
pub(crate) async fn list(
    db: impl PgExecutor<'_>,
    f: &ListFilter<'_>,
    limit: u32,
) -> Result<Vec<RunRow>, sqlx::Error> {
    list_query(list_sql!(), f, limit).fetch_all(db).await
}

/// The plan of [`list`] with these filters (`EXPLAIN`, not run).
pub(crate) async fn explain_list(
    db: impl PgExecutor<'_>,
    f: &ListFilter<'_>,
    limit: u32,
) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = list_query(concat!("EXPLAIN ", list_sql!()), f, limit)
        .fetch_all(db)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect())
}

/// A run with its input, output and the database's clock.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RunDetailRow {
    #[sqlx(flatten)]
    pub(crate) run: RunRow,
    pub(crate) input: String,
    pub(crate) output: Option<String>,
    /// When the terminal step's last attempt started.
    pub(crate) terminal_started_at: Option<DateTime<Utc>>,
    /// The run it was forked from, and the first step it ran again.
    pub(crate) forked_from: Option<i64>,
    pub(crate) forked_at: Option<String>,
    /// For a child run (a subflow): its parent run, step and element.
    pub(crate) parent_run_id: Option<i64>,
    pub(crate) parent_step: Option<String>,
    pub(crate) parent_element: Option<i32>,
    pub(crate) now: DateTime<Utc>,
}

/// Run `id` in full (by primary key); with `for_update`, its row is locked.
pub(crate) async fn detail(
    conn: &mut PgConnection,
    id: i64,
    for_update: bool,
) -> Result<Option<RunDetailRow>, sqlx::Error> {
    // One text per case (prepared statements are cached by text).
    macro_rules! detail_sql {
        ($lock:literal) => {
            concat!(
                "SELECT ",
                run_columns!(),
                ", input::text AS input, output::text AS output, terminal_started_at, forked_from,
                 forked_at, parent_run_id, parent_step, parent_element, now() AS now
                 FROM pgflow.runs WHERE id = $1",
                $lock
            )
        };
    }
    let sql = if for_update {
        detail_sql!(" FOR UPDATE")
    } else {
        detail_sql!("")
    };
    sqlx::query_as(sql).bind(id).fetch_optional(conn).await
}

/// A fork to insert: see [`insert_fork`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewFork<'a> {
    /// The run forked from.
    pub(crate) source: i64,
    /// The workflow version of the fork.
    pub(crate) workflow: &'a str,
    pub(crate) version: i32,
    /// Its input (JSON text); `None` takes the source run's.
    pub(crate) input: Option<&'a str>,
    /// The name of the first step it runs again.
    pub(crate) from: &'a str,
}

/// Inserts a running run forked from `f.source` (its priority is the source's),
/// with no task yet. `None` when the source run does not exist.
pub(crate) async fn insert_fork(
    conn: &mut PgConnection,
    f: &NewFork<'_>,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO pgflow.runs (workflow, version, input, priority, forked_from, forked_at)
         SELECT $2, $3, COALESCE($4::jsonb, r.input), r.priority, r.id, $5
         FROM pgflow.runs r WHERE r.id = $1
         RETURNING id",
    )
    .bind(f.source)
    .bind(f.workflow)
    .bind(f.version)
    .bind(f.input)
    .bind(f.from)
    .fetch_optional(conn)
    .await
}

/// The runs forked from run `id`, oldest first (index `runs_forked_from`).
pub(crate) async fn forks_of(conn: &mut PgConnection, id: i64) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM pgflow.runs WHERE forked_from = $1 ORDER BY id")
        .bind(id)
        .fetch_all(conn)
        .await
}

/// Puts a failed run back to `running` (no error, no completion time, no finishing
/// instance); its cost so far is kept.
pub(crate) async fn reopen(conn: &mut PgConnection, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.runs SET status = 'running', error = NULL, completed_at = NULL,
                instance_id = NULL,
                -- its tasks were deleted: what their claims reserved is void
                reserved_cents = NULL, reserved_tokens = NULL
         WHERE id = $1",
    )
    .bind(id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The failed or cancelled children of run `id` (index `runs_parent_run_id`), by id.
pub(crate) async fn unfinished_children(
    conn: &mut PgConnection,
    id: i64,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM pgflow.runs
         WHERE parent_run_id = $1 AND status IN ('failed', 'cancelled')
         ORDER BY id",
    )
    .bind(id)
    .fetch_all(conn)
    .await
}

/// Runs per workflow and status.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct CountsRow {
    pub(crate) workflow: String,
    pub(crate) running: i64,
    pub(crate) succeeded: i64,
    pub(crate) failed: i64,
    pub(crate) cancelled: i64,
}

/// Runs per workflow and status (scans `pgflow.runs`).
pub(crate) async fn counts(db: impl PgExecutor<'_>) -> Result<Vec<CountsRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT workflow,
                count(*) FILTER (WHERE status = 'running') AS running,
                count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                count(*) FILTER (WHERE status = 'failed') AS failed,
                count(*) FILTER (WHERE status = 'cancelled') AS cancelled
         FROM pgflow.runs
         GROUP BY workflow
         ORDER BY workflow",
    )
    .fetch_all(db)
    .await
}

/// Per workflow, over the runs finished in a window.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct WorkflowResultRow {
    pub(crate) workflow: String,
    pub(crate) count: i64,
    pub(crate) succeeded: i64,
    pub(crate) avg_ms: Option<f64>,
    pub(crate) p95_ms: Option<f64>,
    pub(crate) total_cost_cents: i64,
}

/// Per instance, over the runs finished in a window.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct InstanceResultRow {
    pub(crate) instance_id: Option<String>,
    pub(crate) count: i64,
    pub(crate) succeeded: i64,
    pub(crate) failed: i64,
}

/// Per workflow and status, over the runs finished in a window.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StatusResultRow {
    pub(crate) workflow: String,
    pub(crate) status: String,
    pub(crate) count: i64,
    pub(crate) avg_ms: Option<f64>,
    pub(crate) total_cost_cents: i64,
}

/// The window of the results aggregates: finished in the last `$1` seconds,
/// optionally of workflow `$2`.
macro_rules! results_window {
    () => {
        "completed_at >= now() - $1::float8 * interval '1 second' AND ($2::text IS NULL OR workflow = $2)"
    };
}

/// The three monitoring aggregates over `pgflow.job_results` for runs finished in
/// the last `secs` seconds.
pub(crate) async fn results(
    conn: &mut PgConnection,
    secs: f64,
    workflow: Option<&str>,
) -> Result<
    (
        Vec<WorkflowResultRow>,
        Vec<InstanceResultRow>,
        Vec<StatusResultRow>,
    ),
    sqlx::Error,
> {
    let workflows = sqlx::query_as(concat!(
        "SELECT workflow, count(*) AS count,
                count(*) FILTER (WHERE status = 'success') AS succeeded,
                avg(duration_ms)::float8 AS avg_ms,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) AS p95_ms,
                COALESCE(sum(cost_cents), 0)::bigint AS total_cost_cents
         FROM pgflow.job_results WHERE ",
        results_window!(),
        " GROUP BY workflow ORDER BY workflow"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(&mut *conn)
    .await?;
    let instances = sqlx::query_as(concat!(
        "SELECT instance_id, count(*) AS count,
                count(*) FILTER (WHERE status = 'success') AS succeeded,
                count(*) FILTER (WHERE status = 'failure') AS failed
         FROM pgflow.job_results WHERE ",
        results_window!(),
        " GROUP BY instance_id ORDER BY count(*) DESC, instance_id"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(&mut *conn)
    .await?;
    let statuses = sqlx::query_as(concat!(
        "SELECT workflow, status, count(*) AS count, avg(duration_ms)::float8 AS avg_ms,
                COALESCE(sum(cost_cents), 0)::bigint AS total_cost_cents
         FROM pgflow.job_results WHERE ",
        results_window!(),
        " GROUP BY workflow, status ORDER BY workflow, status DESC"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(&mut *conn)
    .await?;
    Ok((workflows, instances, statuses))
}
