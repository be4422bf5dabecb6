//! Step states (`pgflow.step_states`) and map elements (`pgflow.step_elements`) as
//! tools read and repair them. The flush writes them ([`flush`](super::flush)).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// A stored step state.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct StateRow {
    pub(crate) step: i16,
    pub(crate) status: String,
    pub(crate) attempts: i32,
    pub(crate) errors: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) remaining: i32,
    pub(crate) instance_id: Option<String>,
    pub(crate) started_at: Option<DateTime<Utc>>,
    pub(crate) completed_at: Option<DateTime<Utc>>,
}

/// The step states of run `run_id` (primary key prefix).
pub(crate) async fn of_run(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<StateRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT step, status, attempts, errors::text AS errors, reason, remaining, instance_id,
                started_at, completed_at
         FROM pgflow.step_states WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// The completed elements of each map step of a run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ElementsRow {
    pub(crate) step: i16,
    pub(crate) completed: i64,
    /// The longest element, from its start to its completion.
    pub(crate) slowest_ms: Option<i64>,
}

/// Per map step of run `run_id`: completed elements and the slowest (primary key
/// prefix of `step_elements`).
pub(crate) async fn elements_of_run(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<ElementsRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT step, count(*) AS completed,
                max((EXTRACT(EPOCH FROM (completed_at - started_at)) * 1000)::bigint)
                    AS slowest_ms
         FROM pgflow.step_elements WHERE run_id = $1 GROUP BY step",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// Deletes the states of steps `steps` of run `run_id` (and the elements of those
/// that are map steps): a retry or a fork runs them again from scratch.
pub(crate) async fn clear(
    conn: &mut PgConnection,
    run_id: i64,
    steps: &[i16],
) -> Result<(), sqlx::Error> {
    if steps.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "WITH cleared AS (
             DELETE FROM pgflow.step_states
             WHERE run_id = $1 AND step = ANY ($2::smallint[])
         )
         DELETE FROM pgflow.step_elements WHERE run_id = $1 AND step = ANY ($2::smallint[])",
    )
    .bind(run_id)
    .bind(steps)
    .execute(conn)
    .await?;
    Ok(())
}

/// A map step to resume: which one, and how its element tasks are enqueued.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResumeMap<'a> {
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) workflow: &'a str,
    pub(crate) version: i32,
    pub(crate) queue: &'a str,
    pub(crate) priority: i16,
    pub(crate) max_attempts: i32,
    /// What it maps over: -1 for the run input, else the parent's index.
    pub(crate) map_from: i16,
}

/// Resumes map step `m.step` of a running run: enqueues one task per element of the
/// array it maps over that has no stored output in `step_elements`, in element
/// order, and sets the step `running` with that many elements remaining (its error
/// history is kept). The completed elements stay and are not run again. Returns the
/// number of elements enqueued; 0 (nothing enqueued, the step left as it was) when
/// every element has an output or the run is not running.
pub(crate) async fn resume_map(
    conn: &mut PgConnection,
    m: &ResumeMap<'_>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "WITH src AS (
             SELECT CASE WHEN $8 < 0 THEN r.input
                         ELSE (SELECT ss.output FROM pgflow.step_states ss
                               WHERE ss.run_id = $1 AND ss.step = $8)
                    END AS items,
                    r.priority AS run_priority
             FROM pgflow.runs r WHERE r.id = $1 AND r.status = 'running'
         ), missing AS (
             SELECT (e.ord - 1)::int AS element, e.item
             FROM src CROSS JOIN LATERAL jsonb_array_elements(
                 CASE WHEN jsonb_typeof(src.items) = 'array' THEN src.items ELSE '[]' END
             ) WITH ORDINALITY AS e(item, ord)
             WHERE NOT EXISTS (SELECT 1 FROM pgflow.step_elements x
                               WHERE x.run_id = $1 AND x.step = $2
                                 AND x.element = (e.ord - 1)::int)
         ), n AS (
             SELECT count(*) AS n FROM missing
         ), ins AS (
             INSERT INTO pgflow.tasks (run_id, step, element, item, workflow, version, queue,
                                       priority, max_attempts)
             SELECT $1, $2, m.element, m.item, $3, $4, $5,
                    LEAST(GREATEST($6::int + src.run_priority, -32768), 32767)::smallint, $7
             FROM missing m CROSS JOIN src
             ORDER BY m.element
         ), st AS (
             UPDATE pgflow.step_states s
             SET status = 'running', remaining = n.n, reason = NULL, completed_at = NULL,
                 output = NULL
             FROM n
             WHERE s.run_id = $1 AND s.step = $2 AND n.n > 0
         )
         SELECT n FROM n",
    )
    .bind(m.run_id)
    .bind(m.step)
    .bind(m.workflow)
    .bind(m.version)
    .bind(m.queue)
    .bind(m.priority)
    .bind(m.max_attempts)
    .bind(m.map_from)
    .fetch_one(conn)
    .await
}

/// Copies the `completed` and `skipped` states of steps `from_steps` of run `source`
/// to the steps `to_steps` (same positions) of run `target`, with the elements of
/// the map steps among them. Returns the target steps copied.
pub(crate) async fn copy_done(
    conn: &mut PgConnection,
    source: i64,
    target: i64,
    from_steps: &[i16],
    to_steps: &[i16],
) -> Result<Vec<i16>, sqlx::Error> {
    if from_steps.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(
        "WITH pairs AS (
             SELECT * FROM unnest($3::smallint[], $4::smallint[]) AS u(src, dst)
         ), states AS (
             INSERT INTO pgflow.step_states (run_id, step, status, remaining, attempts, output,
                                             errors, instance_id, completed_at, reason,
                                             started_at)
             SELECT $2, p.dst, s.status, 0, s.attempts, s.output, s.errors, s.instance_id,
                    s.completed_at, s.reason, s.started_at
             FROM pairs p
             JOIN pgflow.step_states s ON s.run_id = $1 AND s.step = p.src
             WHERE s.status IN ('completed', 'skipped')
             RETURNING step
         ), elements AS (
             INSERT INTO pgflow.step_elements (run_id, step, element, output, attempts,
                                               instance_id, completed_at, started_at)
             SELECT $2, p.dst, e.element, e.output, e.attempts, e.instance_id, e.completed_at,
                    e.started_at
             FROM pairs p
             JOIN pgflow.step_states s
               ON s.run_id = $1 AND s.step = p.src AND s.status = 'completed'
             JOIN pgflow.step_elements e ON e.run_id = $1 AND e.step = p.src
         )
         SELECT step FROM states ORDER BY step",
    )
    .bind(source)
    .bind(target)
    .bind(from_steps)
    .bind(to_steps)
    .fetch_all(conn)
    .await
}

/// Sets the join counters of run `run_id`: `waiting` rows with `remaining` parents
/// still to complete (created, or reset).
pub(crate) async fn set_joins(
    conn: &mut PgConnection,
    run_id: i64,
    steps: &[i16],
    remaining: &[i32],
) -> Result<(), sqlx::Error> {
    if steps.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pgflow.step_states (run_id, step, status, remaining)
         SELECT $1, j.step, 'waiting', j.remaining
         FROM unnest($2::smallint[], $3::int[]) AS j(step, remaining)
         ON CONFLICT (run_id, step) DO UPDATE SET remaining = EXCLUDED.remaining",
    )
    .bind(run_id)
    .bind(steps)
    .bind(remaining)
    .execute(conn)
    .await?;
    Ok(())
}
