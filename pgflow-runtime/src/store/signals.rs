//! Signals (`pgflow.signals`, migration 0009): sending one is the SQL function
//! `pgflow.signal(run_id, name, payload)`, so that an application can send it in its
//! own transaction too; the claim statement reads the accepted payload of a waiting
//! task (see [`tasks`](super::tasks)).

use sqlx::PgExecutor;

/// SQLSTATE of `pgflow.signal` for a run that does not exist.
pub(crate) const NO_RUN: &str = "PGF01";
/// SQLSTATE of `pgflow.signal` for a run that is finished or cancelled (the detail
/// is its status).
pub(crate) const NOT_RUNNING: &str = "PGF02";
/// SQLSTATE of `pgflow.signal` for a name no step of the run waits for.
pub(crate) const UNKNOWN_SIGNAL: &str = "PGF03";

/// Sends signal `name` with `payload` (JSON text) to run `run_id`, through
/// `pgflow.signal` (which locks the run's signal with an advisory lock, then updates
/// the waiting task, if any, by index `tasks_run_id`). Returns the function's answer:
/// `delivered`, `kept`, `duplicate` or `too_late`.
pub(crate) async fn send(
    db: impl PgExecutor<'_>,
    run_id: i64,
    name: &str,
    payload: &str,
) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("SELECT pgflow.signal($1, $2, $3::jsonb)")
        .bind(run_id)
        .bind(name)
        .bind(payload)
        .fetch_one(db)
        .await
}
