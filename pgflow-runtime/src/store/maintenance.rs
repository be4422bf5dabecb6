//! Keeping the hot tables small: dead-row counts and `VACUUM`.

use sqlx::PgExecutor;

/// A pgflow table the maintainer vacuums, with the dead-row count that triggers it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Vacuumed {
    pub(crate) table: &'static str,
    pub(crate) threshold: i64,
    /// The statement (identifiers cannot be bound, so one constant per table).
    sql: &'static str,
}

/// The tables vacuumed and when: the queue deletes every finished task and rewrites
/// claimed ones, so it dies fastest.
///
/// Never `TRUNCATE`: cutting the empty pages off a table's end takes an exclusive
/// lock on it, and every claim, start and flush waits behind it (a drained queue
/// has such pages after every burst; seen here as claims of 8 tasks taking 30 ms and
/// more, waiting on `VacuumTruncate`); the pages are reused by the next burst
/// anyway. Never in parallel: the index passes in worker processes take the cores
/// the claims and flushes are waiting for.
pub(crate) const VACUUMED: &[Vacuumed] = &[
    Vacuumed {
        table: "tasks",
        threshold: 20_000,
        sql: "VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0) pgflow.tasks",
    },
    Vacuumed {
        table: "step_states",
        threshold: 100_000,
        sql: "VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0) pgflow.step_states",
    },
    Vacuumed {
        table: "runs",
        threshold: 100_000,
        sql: "VACUUM (SKIP_LOCKED, TRUNCATE false, PARALLEL 0) pgflow.runs",
    },
];

/// Dead rows per pgflow table (`pg_stat_user_tables`).
pub(crate) async fn dead_rows(db: impl PgExecutor<'_>) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'pgflow'",
    )
    .fetch_all(db)
    .await
}

/// Vacuums `t`; `SKIP_LOCKED` makes a vacuum another instance is running a no-op.
pub(crate) async fn vacuum(db: impl PgExecutor<'_>, t: &Vacuumed) -> Result<(), sqlx::Error> {
    sqlx::query(t.sql).execute(db).await?;
    Ok(())
}
