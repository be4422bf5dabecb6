//! [`signal`]: sends a signal to a run by name, with a JSON payload.

use pgflow::{RunId, SignalOutcome};
use sqlx::PgExecutor;

use crate::Error;
use crate::store::signals;

/// Sends signal `name` with `payload` to run `run`, checked against the run's stored
/// definition (by name: the payload's type is checked when the step takes it, and
/// one that does not fit fails the step permanently, with the serde path).
/// `db` is a pool, a connection or the application's own transaction (the signal
/// counts at its commit).
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// use pgflow_runtime::admin;
/// let outcome = admin::signal(&pool, pgflow::RunId(42), "approval", serde_json::json!({"by": "ada"})).await?;
/// println!("{outcome}"); // delivered, kept, duplicate or too_late
///
/// // inside the application's own transaction
/// let mut tx = pool.begin().await?;
/// admin::signal(&mut *tx, pgflow::RunId(43), "approval", serde_json::json!({"by": "bob"})).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::RunNotRunning`] for a finished or cancelled run;
/// [`Error::UnknownSignal`] when no step of the run waits for `name`; database
/// errors.
pub async fn signal(
    db: impl PgExecutor<'_>,
    run: RunId,
    name: &str,
    payload: serde_json::Value,
) -> Result<SignalOutcome, Error> {
    send_json(db, run, name, &payload.to_string()).await
}

/// Sends a signal whose payload is JSON text (see [`signal`]).
pub(crate) async fn send_json(
    db: impl PgExecutor<'_>,
    run: RunId,
    name: &str,
    payload: &str,
) -> Result<SignalOutcome, Error> {
    let answer = signals::send(db, run.0, name, payload)
        .await
        .map_err(|e| signal_error(run, name, e))?;
    SignalOutcome::from_name(&answer).ok_or_else(|| {
        Error::Database(sqlx::Error::Protocol(format!(
            "pgflow.signal answered `{answer}`"
        )))
    })
}

/// The typed error of what `pgflow.signal` raised.
fn signal_error(run: RunId, name: &str, e: sqlx::Error) -> Error {
    let Some(db) = e.as_database_error() else {
        return Error::from(e);
    };
    let detail = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|p| p.detail())
        .unwrap_or_default()
        .to_owned();
    match db.code().as_deref() {
        Some(signals::NO_RUN) => Error::RunNotFound(run),
        Some(signals::NOT_RUNNING) => Error::RunNotRunning {
            id: run,
            status: detail,
        },
        Some(signals::UNKNOWN_SIGNAL) => Error::UnknownSignal {
            id: run,
            name: name.to_owned(),
            known: detail,
        },
        _ => Error::from(e),
    }
}
