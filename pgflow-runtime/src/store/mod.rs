//! Every SQL statement of the runtime, by the table it is about. The engine's loops
//! and the public API call these functions and contain no SQL.
//!
//! - [`tasks`]: the hot queue — claim (and its `EXPLAIN`), the one enqueue
//!   statement (start, ready children, map fan-out, retry), rescue of lost claims.
//! - [`flush`]: applying a batch of completions in one transaction, phase by phase.
//! - [`runs`]: starting runs, reading their outcome, cancelling, the aggregates.
//! - [`budgets`]: reserving a step's estimate against its run's budget.
//! - [`steps`]: step states and map elements as tools read and repair them.
//! - [`instances`]: the instance registry and heartbeats.
//! - [`definitions`]: the stored step tables.
//! - [`schedules`]: cron schedules — registering, firing (locked, fenced on the row),
//!   listing, removing.
//! - [`limits`]: windows of rate limits and budgets per period.
//! - [`slots`]: concurrency slots per run key (queues with a key limit).
//! - [`signals`]: sending a signal (the SQL function `pgflow.signal`).
//! - [`subflows`]: child runs — linking a parent's task to its child, waking it.
//! - [`usage`]: the usage ledger as tools read it.
//! - `dashboard`: what the web dashboard reads beyond the admin API.
//! - [`export`]: a run with every stored output, for a replay.
//! - [`notify`]: the one NOTIFY policy.
//! - [`maintenance`]: vacuuming the hot tables.
//! - [`migrations`]: applying the schema, its history kept in the `pgflow` schema.
//!
//! Each statement's comment names the index it relies on, and each write that must
//! be fenced says on what. Rows come back as `FromRow` structs; statuses are the
//! enums of this module (the SQL text spells them as the schema's CHECK constraints
//! do).

pub(crate) mod budgets;
#[cfg(feature = "dashboard")]
pub(crate) mod dashboard;
pub(crate) mod definitions;
pub(crate) mod export;
pub(crate) mod flush;
pub(crate) mod instances;
pub(crate) mod limits;
pub(crate) mod maintenance;
pub(crate) mod migrations;
pub(crate) mod notify;
pub(crate) mod retention;
pub(crate) mod runs;
pub(crate) mod schedules;
pub(crate) mod signals;
pub(crate) mod slots;
pub(crate) mod steps;
pub(crate) mod subflows;
pub(crate) mod tasks;
pub(crate) mod usage;

/// Rows decoded by column position, each column found by its name once per result
/// rather than once per row (see [`by_position!`]): a lookup by name hashes the
/// name, and for the claim's twenty columns of every claimed task (and the flush's
/// fence) that was a fifth of a worker's CPU under load.
pub(crate) trait ByPosition: Sized {
    /// The columns, in the order [`by_position!`] lists them.
    const COLUMNS: &'static [&'static str];

    /// Whether the result's columns at `at` have types the fields can take (once per
    /// result: the types are the same in every row). Checked per column, so a column
    /// of another type is refused even where its values are NULL (`sqlx` checks only
    /// non-NULL values).
    fn check_types(row: &sqlx::postgres::PgRow, at: &[usize]) -> Result<(), sqlx::Error>;

    /// One row, its columns at `at` (in [`ByPosition::COLUMNS`] order). Values are
    /// decoded unchecked: call it only on rows of a result whose types
    /// [`ByPosition::check_types`] checked ([`decode_rows`] does).
    fn from_position(row: &sqlx::postgres::PgRow, at: &[usize]) -> Result<Self, sqlx::Error>;
}

/// Whether column `at` (of [`ByPosition::COLUMNS`], named `name`) of `row`'s result
/// has a type a field of type `F` can take (`field` only names the field's type),
/// with the check `sqlx` makes per non-NULL value.
pub(crate) fn check_column<S, F: sqlx::Type<sqlx::Postgres>>(
    row: &sqlx::postgres::PgRow,
    at: Option<usize>,
    name: &str,
    _field: fn(&S) -> &F,
) -> Result<(), sqlx::Error> {
    use sqlx::{Column, Row, TypeInfo};
    let ty = at
        .and_then(|i| row.columns().get(i))
        .map(Column::type_info)
        .ok_or_else(|| sqlx::Error::ColumnNotFound(name.to_owned()))?;
    if ty.is_null() || F::compatible(ty) {
        return Ok(());
    }
    Err(sqlx::Error::ColumnDecode {
        index: format!("{name:?}"),
        source: sqlx::error::mismatched_types::<sqlx::Postgres, F>(ty),
    })
}

/// The value of column `at` (named `name`) of `row`, its type checked by
/// [`check_column`] for the result; an error names the column, as `FromRow`'s do.
#[inline(always)] // (once per column of every row: a call each cost +9% of the decode)
pub(crate) fn column_value<'r, T: sqlx::Decode<'r, sqlx::Postgres>>(
    row: &'r sqlx::postgres::PgRow,
    at: Option<usize>,
    name: &str,
) -> Result<T, sqlx::Error> {
    let at = at.ok_or_else(|| sqlx::Error::ColumnNotFound(name.to_owned()))?;
    sqlx::Row::try_get_unchecked(row, at).map_err(|e| named(e, name))
}

/// `e` with the column named as `FromRow` names it (not by its position).
#[cold]
fn named(e: sqlx::Error, name: &str) -> sqlx::Error {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => sqlx::Error::ColumnDecode {
            index: format!("{name:?}"),
            source,
        },
        other => other,
    }
}

/// Runs `query` and decodes its rows by position (see [`decode_rows`]).
pub(crate) async fn fetch_by_position<'q, 'c, T: ByPosition>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    db: impl sqlx::PgExecutor<'c>,
) -> Result<Vec<T>, sqlx::Error> {
    decode_rows(&query.fetch_all(db).await?)
}

/// Decodes `rows` (of one result) by position (see [`ByPosition`]). A column the
/// result does not have is an error, as with `FromRow`.
pub(crate) fn decode_rows<T: ByPosition>(
    rows: &[sqlx::postgres::PgRow],
) -> Result<Vec<T>, sqlx::Error> {
    use sqlx::{Column, Row};
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let at = T::COLUMNS
        .iter()
        .map(|name| first.try_column(*name).map(Column::ordinal))
        .collect::<Result<Vec<usize>, _>>()?;
    T::check_types(first, &at)?;
    rows.iter().map(|row| T::from_position(row, &at)).collect()
}

/// Implements [`ByPosition`] for a struct whose fields are named as the columns
/// they come from (all of them, in any order). A value that does not decode is
/// reported with its column's name, as `FromRow` reports it.
macro_rules! by_position {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl $crate::store::ByPosition for $ty {
            const COLUMNS: &'static [&'static str] = &[$(stringify!($field)),+];

            fn check_types(
                row: &sqlx::postgres::PgRow,
                at: &[usize],
            ) -> Result<(), sqlx::Error> {
                let mut at = at.iter().copied();
                $($crate::store::check_column(row, at.next(), stringify!($field), |s: &Self| &s.$field)?;)+
                Ok(())
            }

            fn from_position(
                row: &sqlx::postgres::PgRow,
                at: &[usize],
            ) -> Result<Self, sqlx::Error> {
                let mut at = at.iter().copied();
                // (a struct expression evaluates its fields in the order written)
                Ok(Self {
                    $($field: $crate::store::column_value(row, at.next(), stringify!($field))?),+
                })
            }
        }
    };
}
pub(crate) use by_position;

/// The stored status of a step (`pgflow.step_states.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StepState {
    /// A join waiting for `remaining` parents.
    Waiting,
    /// A map step whose elements run; `remaining` counts those not completed.
    Running,
    /// Its output is stored.
    Completed,
    /// A conditional step whose predicate was false.
    Skipped,
    /// It failed for good.
    Failed,
}

impl StepState {
    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Skipped => "skipped",
            Self::Failed => "failed",
        }
    }

    /// The state stored under `name`.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        [
            Self::Waiting,
            Self::Running,
            Self::Completed,
            Self::Skipped,
            Self::Failed,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }
}

/// A workflow version as stored (`integer`).
pub(crate) fn version_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// A step index as stored (`smallint`; `#[workflow]` cannot make 32,768 steps).
pub(crate) fn step_i16(i: usize) -> i16 {
    i16::try_from(i).unwrap_or(i16::MAX)
}

/// A stored step index back as an index (`None` for a negative one).
pub(crate) fn step_index(step: i16) -> Option<usize> {
    usize::try_from(step).ok()
}

/// A duration as whole milliseconds, for `interval '1 millisecond' * $n`.
pub(crate) fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether the database refused a statement for what it contains (a value it cannot
/// store, a constraint, a limit) rather than for its state (restart, failover,
/// timeouts, lack of resources), which a retry outlives.
pub(crate) fn is_content_error(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|c| {
            ["21", "22", "23", "54"]
                .iter()
                .any(|class| c.starts_with(class))
        })
}

/// Whether an error is the database being unavailable for a while rather than
/// something wrong with the statement: I/O, a pool timeout, connection exceptions
/// (class 08), the server shutting down or starting (57P01-57P03), too many
/// connections (53300), a deadlock or serialization failure.
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
        sqlx::Error::Protocol(_) => true,
        // A connection the server ended or refused (severity FATAL): the database
        // is going down, restarting or not accepting connections for now.
        _ if e
            .as_database_error()
            .and_then(|db| db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
            .is_some_and(|p| {
                matches!(
                    p.severity(),
                    sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                )
            }) =>
        {
            true
        }
        _ => {
            is_conflict(e)
                || e.as_database_error()
                    .and_then(|db| db.code())
                    .is_some_and(|c| {
                        c.starts_with("08")
                            || ["57P01", "57P02", "57P03", "53300"].contains(&c.as_ref())
                    })
        }
    }
}

/// Whether a statement lost a deadlock or a serialization conflict: nothing is
/// wrong with it, so running it again applies.
pub(crate) fn is_conflict(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|db| db.code())
        .is_some_and(|c| c == "40P01" || c == "40001")
}

/// A stored attempt history (`tasks.errors`, `step_states.errors`: a JSON array of
/// `AttemptFailure`); empty when absent or unreadable.
pub(crate) fn stored_attempts(json: Option<&str>) -> Vec<pgflow::AttemptFailure> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

/// Makes the caller's transaction one read-only snapshot (for a tool reading a run,
/// its steps and its tasks consistently).
pub(crate) async fn read_snapshot(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(conn)
        .await?;
    Ok(())
}

/// How many more connections this session's role and database allow, counting this
/// session's own as free (`None`: no limit). `pg_roles.rolconnlimit` and
/// `pg_database.datconnlimit` against the sessions `pg_stat_activity` shows.
pub(crate) async fn connection_budget(
    conn: &mut sqlx::PgConnection,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT LEAST(
             CASE WHEN r.rolconnlimit >= 0 THEN r.rolconnlimit - (
                 SELECT count(*) FROM pg_stat_activity WHERE usename = current_user) + 1 END,
             CASE WHEN d.datconnlimit >= 0 THEN d.datconnlimit - (
                 SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) + 1 END)
         FROM pg_roles r, pg_database d
         WHERE r.rolname = current_user AND d.datname = current_database()",
    )
    .fetch_optional(conn)
    .await
    .map(Option::flatten)
}

/// Whether the database answers a trivial statement now.
pub(crate) async fn ping(pool: &sqlx::PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// Begins a transaction whose statements are planned once per connection (a
/// generic plan) instead of at every execution. PostgreSQL keeps re-planning a
/// prepared statement whose parameter values change its estimates (the lengths of
/// the `unnest` arrays of a start or a flush): planning the start statement took
/// 0.65 ms of the 0.8 ms it costs on the server, at every start (seen here with
/// `pg_stat_statements`). The engine's writes walk primary keys and the indexes
/// their comments name whatever the parameters, so one plan fits every execution.
/// No JIT compilation either: a generic plan's estimates (and a batch's real
/// sizes) put these statements over `jit_above_cost`, and compiling took 91 ms of
/// the 160 ms of a 5,000-run start (auto_explain), for statements that run in
/// milliseconds without it. `SET LOCAL` ends with the transaction: the connection
/// goes back to the pool as it came.
///
/// A connection that broke while idle in the pool (the server restarted; the pool
/// does not ping before it hands one out) fails at `BEGIN`, before anything was
/// done: the transaction begins on another one (the broken one is dropped), as
/// many times as the pool has connections.
pub(crate) async fn begin_generic(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tries = pool.options().get_max_connections();
    loop {
        match pool.begin_with(BEGIN_GENERIC).await {
            Err(e) if tries > 0 && is_transient(&e) && !matches!(e, sqlx::Error::PoolTimedOut) => {
                tries -= 1;
            }
            result => return result,
        }
    }
}

/// The statement of [`begin_generic`].
pub(crate) const BEGIN_GENERIC: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan;
    SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL jit = off";

#[cfg(test)]
mod tests {
    use sqlx::PgPool;

    use super::decode_rows;

    struct Pair {
        id: i64,
        name: Option<String>,
    }

    // (listed in another order than declared: the list is what counts)
    by_position!(Pair { name, id });

    async fn rows(pool: &PgPool, sql: &'static str) -> Vec<sqlx::postgres::PgRow> {
        sqlx::query(sql).fetch_all(pool).await.unwrap()
    }

    #[sqlx::test(migrations = false)]
    async fn rows_decode_by_position_from_columns_found_by_name(pool: PgPool) {
        let two = rows(
            &pool,
            "SELECT 7 AS other, 'a' AS name, 1::bigint AS id UNION ALL SELECT 8, NULL, 2",
        )
        .await;
        let pairs: Vec<Pair> = decode_rows(&two).unwrap();
        let got: Vec<(i64, Option<&str>)> =
            pairs.iter().map(|p| (p.id, p.name.as_deref())).collect();
        assert_eq!(got, [(1, Some("a")), (2, None)]);
        let none = rows(&pool, "SELECT 'a' AS name, 1::bigint AS id WHERE false").await;
        assert!(decode_rows::<Pair>(&none).unwrap().is_empty());
    }

    #[sqlx::test(migrations = false)]
    async fn a_column_that_is_missing_or_does_not_decode_is_named(pool: PgPool) {
        let missing = rows(&pool, "SELECT 1::bigint AS id").await;
        match decode_rows::<Pair>(&missing) {
            Err(sqlx::Error::ColumnNotFound(c)) => assert_eq!(c, "name"),
            other => panic!("{:?}", other.err()),
        }
        for sql in [
            "SELECT 'a' AS name, NULL::bigint AS id",
            "SELECT 'a' AS name, 'x' AS id",
        ] {
            match decode_rows::<Pair>(&rows(&pool, sql).await) {
                Err(sqlx::Error::ColumnDecode { index, .. }) => {
                    assert_eq!(index, "\"id\"", "{sql}")
                }
                other => panic!("{sql}: {:?}", other.err()),
            }
        }
        // the column's type is checked, not the first row's value (NULL here)
        let typed = rows(
            &pool,
            "SELECT NULL::int AS name, 1::bigint AS id UNION ALL SELECT 5, 2",
        )
        .await;
        match decode_rows::<Pair>(&typed) {
            Err(sqlx::Error::ColumnDecode { index, .. }) => assert_eq!(index, "\"name\""),
            other => panic!("{:?}", other.err()),
        }
    }
}
