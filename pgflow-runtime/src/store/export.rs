//! What an export reads ([`admin::export`](crate::admin::export)): a run with its
//! input, output and error, the outputs of its step states, and the outputs of the
//! completed elements of its map steps that had not completed, and the signals it
//! accepted. Read in one snapshot
//! ([`read_snapshot`](super::read_snapshot)) by the caller.

use sqlx::PgConnection;

/// A run as exported.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RunRow {
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) status: String,
    pub(crate) input: String,
    pub(crate) output: Option<String>,
    pub(crate) error: Option<String>,
}

/// Run `id` (primary key).
pub(crate) async fn run(conn: &mut PgConnection, id: i64) -> Result<Option<RunRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT workflow, version, status, input::text AS input, output::text AS output,
                error::text AS error
         FROM pgflow.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// A step state with its output.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StepRow {
    pub(crate) step: i16,
    pub(crate) status: String,
    pub(crate) output: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) errors: Option<String>,
}

/// The step states of run `run_id`, by step (primary key prefix of `step_states`).
/// A join's `waiting` row whose parents are all done (`remaining = 0`) is left out:
/// the step was queued or running then — or, for the terminal step of a succeeded
/// run, done, its output being the run's — and the row tells nothing more.
pub(crate) async fn steps(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<StepRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT step, status, output::text AS output, reason, errors::text AS errors
         FROM pgflow.step_states
         WHERE run_id = $1 AND NOT (status = 'waiting' AND remaining = 0)
         ORDER BY step",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// The output of one completed element of a map step.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ElementRow {
    pub(crate) step: i16,
    pub(crate) element: i32,
    pub(crate) output: String,
}

/// The completed elements of the map steps of run `run_id` that have no completed
/// state (a completed map step's output already holds them all), by step and
/// element (primary key prefix of `step_elements`; the state by primary key).
pub(crate) async fn open_elements(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<ElementRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT e.step, e.element, e.output::text AS output
         FROM pgflow.step_elements e
         WHERE e.run_id = $1
           AND NOT EXISTS (SELECT 1 FROM pgflow.step_states s
                           WHERE s.run_id = e.run_id AND s.step = e.step
                             AND s.status = 'completed')
         ORDER BY e.step, e.element",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// An accepted signal of a run.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SignalRow {
    pub(crate) name: String,
    pub(crate) payload: String,
}

/// The signals run `run_id` accepted (the first of each name), oldest first
/// (index `signals_run_id`).
pub(crate) async fn accepted_signals(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<SignalRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT name, payload::text AS payload FROM pgflow.signals
         WHERE run_id = $1 AND status = 'accepted'
         ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}
