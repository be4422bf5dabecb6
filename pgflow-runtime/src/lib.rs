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
//! `builder` starts it, `engine/` holds the shared state and one file per loop
//! (claimer, executor, flusher, listener, rescuer, heartbeat, maintenance), `store/`
//! holds every SQL statement, `catalog` what is derived once from the linked
//! definitions, and [`admin`] the operator functions the CLI runs.

pub mod admin;
mod builder;
mod catalog;
mod config;
mod engine;
mod error;
mod handle;
mod runtime;
mod store;

pub use builder::RuntimeBuilder;
pub use error::{Error, mask_password};
pub use handle::{RunHandle, RunOutcome, RunStatus};
pub use runtime::{InstanceInfo, Runtime, StartOptions, Stats, Summary};

/// The schema migrations (`migrations/` at the workspace root), applied by
/// [`RuntimeBuilder::start`] unless disabled; usable with `#[sqlx::test(migrator =
/// "pgflow_runtime::MIGRATOR")]`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

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

/// The plan of the claim statement as the runtime sends it (`EXPLAIN`, not run),
/// for the runtime's own plan tests.
#[doc(hidden)]
pub async fn explain_claim(rt: &Runtime, queue: &str, limit: usize) -> Result<Vec<String>, Error> {
    let mut conn = rt.pool().acquire().await?;
    let req = store::tasks::ClaimRequest {
        instance: rt.instance_id(),
        token: 1,
        queue,
        limit,
    };
    Ok(store::tasks::explain_claim(&mut conn, &rt.engine.catalog, req).await?)
}
