//! # pgflow-runtime
//!
//! The durable engine of pgflow. Link it into your binary next to the crates that
//! define workflows; every instance of the binary pulls step tasks from one Postgres
//! queue, stores each step's output before any child starts, retries with backoff,
//! times steps out and records results and costs.
//!
//! ```no_run
//! use pgflow::{workflow, StepError};
//! use pgflow_runtime::Runtime;
//!
//! pub struct Double;
//! #[workflow]
//! impl Double {
//!     #[step]
//!     async fn double(n: u64) -> Result<u64, StepError> { Ok(n * 2) }
//! }
//!
//! # async fn demo() -> Result<(), pgflow_runtime::Error> {
//! let rt = Runtime::builder()
//!     .database_url("postgres://postgres@127.0.0.1:5432/postgres")
//!     .queue("default", 16)
//!     .start()
//!     .await?;
//! let run = rt.start::<Double>(21).await?;
//! assert_eq!(run.wait().await?, 42);
//! rt.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! How it works: workers claim tasks in batches with `FOR UPDATE SKIP LOCKED` over a
//! partial index; completions are flushed in batches (one transaction stores
//! outputs, counts down joins, enqueues ready children and finishes runs), and every
//! completion is fenced on its claim token so a lost claim cannot overwrite
//! anything. A conditional step whose predicate is false is stored as `skipped`
//! (its children read `None`); a map step becomes one task per element, fanned out
//! in SQL from the value it maps over, and its outputs (`pgflow.step_elements`) are
//! aggregated in order when the last one completes. The schema is in `migrations/`
//! (schema `pgflow`).
//!
//! The crate's layout, for readers of its source: `runtime` and `handle` are the
//! public API,
//! `builder` starts it, `schedule` is the cron schedules' model and tick arithmetic,
//! `engine/` holds the shared state and one file per loop (claimer, executor,
//! flusher, listener, rescuer, heartbeat, maintenance, promoter, pruner,
//! scheduler), `store/` holds
//! every SQL statement, `catalog` what is derived once from the linked definitions,
//! and [`admin`] the operator functions the CLI runs.
//!
//! Cron schedules: [`RuntimeBuilder::schedule`] registers a [`Schedule`]; each of its
//! ticks starts exactly one run across every instance that registers it (the tick is
//! the run's idempotency key), by its [`Missed`] policy after an outage.

pub mod admin;
mod builder;
mod catalog;
mod config;
mod connect;
#[cfg(feature = "dashboard")]
pub mod dashboard;
mod engine;
mod error;
mod handle;
mod limits;
pub mod metrics;
mod otel;
mod retention;
mod runtime;
mod schedule;
mod store;
mod transaction;

pub use builder::RuntimeBuilder;
pub use connect::mask_password;
pub use error::Error;
pub use handle::{RunHandle, RunOutcome, RunStatus};
pub use limits::{Limit, LimitUnit};
pub use retention::Retention;
pub use runtime::{InstanceInfo, Runtime, StartOptions, Stats, Summary, signal_in};
pub use schedule::{Missed, Schedule, ScheduleInfo, Tick};
pub use transaction::PgTransaction;

/// The schema migrations (`migrations/` in this crate), as a sqlx
/// [`Migrator`](sqlx::migrate::Migrator): what `#[sqlx::test(migrator =
/// "pgflow_runtime::MIGRATOR")]` applies. Run directly, it records its history in the
/// `_sqlx_migrations` table of the connection's search path (where an application's
/// own sqlx migrations are); [`migrate`] (and so [`RuntimeBuilder::start`] and `pgflow
/// migrate`) keeps it in `pgflow._sqlx_migrations` instead and adopts such a history.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the pgflow migrations not applied yet, keeping their history in
/// `pgflow._sqlx_migrations` (apart from the application's own sqlx migrations, in
/// whichever order the two run). What [`RuntimeBuilder::start`] does unless
/// `.migrate(false)`; call it from your own deploy step to migrate before any
/// runtime starts.
///
/// ```no_run
/// # async fn demo(
/// #     pool: sqlx::PgPool,
/// #     app_migrations: sqlx::migrate::Migrator,
/// # ) -> Result<(), Box<dyn std::error::Error>> {
/// app_migrations.run(&pool).await?; // the application's own, e.g. sqlx::migrate!()
/// pgflow_runtime::migrate(&pool).await?; // pgflow's, in the pgflow schema
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Migrate`]; database errors.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), Error> {
    store::migrations::run(pool).await.map(|_| ())
}

/// Connects a pool of up to `max_connections` the way the runtime does: one plain
/// connection first, bounded in time, whose error says why it failed (refused, no
/// answer, authentication, unknown database, a connection limit), and a pool no
/// larger than the role and database allow.
///
/// ```no_run
/// # async fn demo() -> Result<(), pgflow_runtime::Error> {
/// let pool = pgflow_runtime::connect("postgres://postgres@127.0.0.1:5432/postgres", 8).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Connect`] naming the URL (password masked) and the cause.
pub async fn connect(url: &str, max_connections: u32) -> Result<sqlx::PgPool, Error> {
    connect::pool(url, max_connections.max(1), 0).await
}

/// Completes when the process receives SIGTERM or SIGINT (Ctrl-C): what a worker
/// waits on before [`Runtime::shutdown`] (see [`Runtime::run_until_signal`]).
///
/// ```no_run
/// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
/// pgflow_runtime::shutdown_signal().await;
/// rt.shutdown().await?;
/// # Ok(()) }
/// ```
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The plan of the claim statement as the runtime sends it (`EXPLAIN`, not run,
/// on a claim connection), ordinary or `fair`, for the runtime's own plan tests;
/// `generic`: the plan made without the parameters' values, which a claim
/// connection uses from its sixth claim on when it costs no more.
#[doc(hidden)]
pub async fn explain_claim(
    rt: &Runtime,
    queue: &str,
    limit: usize,
    fair: bool,
    generic: bool,
) -> Result<Vec<String>, Error> {
    let mut conn = store::tasks::claim_connection(rt.pool()).await?;
    let req = store::tasks::ClaimRequest {
        instance: rt.instance_id(),
        token: 1,
        queue,
        limit,
        fair: fair.then_some(("", 64)),
        key_limit: None,
    };
    Ok(store::tasks::explain_claim(&mut conn, &rt.engine.catalog, req, generic).await?)
}
