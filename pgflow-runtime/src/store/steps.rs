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

/// Deletes the states of run `run_id` that a retry runs again — failed steps, and
/// map steps caught mid-way (`running`) — with the elements those map steps stored.
/// Returns the steps cleared.
pub(crate) async fn clear_for_retry(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<i16>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH cleared AS (
             DELETE FROM pgflow.step_states
             WHERE run_id = $1 AND status IN ('failed', 'running')
             RETURNING step
         ), elements AS (
             DELETE FROM pgflow.step_elements e USING cleared c
             WHERE e.run_id = $1 AND e.step = c.step
         )
         SELECT step FROM cleared ORDER BY step",
    )
    .bind(run_id)
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
