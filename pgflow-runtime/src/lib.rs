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
//! How it works: [`queue`](crate) claims tasks in batches with `FOR UPDATE SKIP
//! LOCKED` over a partial index, completions are flushed in batches (one transaction
//! stores outputs, counts down joins, enqueues ready children and finishes runs), and
//! every completion is fenced on its claim token so a lost claim cannot overwrite
//! anything. A conditional step whose predicate is false is stored as `skipped`
//! (its children read `None`); a map step becomes one task per element, whose
//! outputs (`pgflow.step_elements`) are aggregated in order when the last one
//! completes. The schema is in `migrations/` (schema `pgflow`).

pub mod admin;
mod catalog;
mod config;
mod definitions;
mod error;
mod instances;
mod queue;
mod runtime;
mod worker;

pub use error::{Error, mask_password};
pub use instances::InstanceInfo;
pub use pgflow;
pub use runtime::{RunHandle, RunOutcome, Runtime, RuntimeBuilder, StartOptions, Stats, Summary};

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

/// The claim statement, for tests and `EXPLAIN`.
#[doc(hidden)]
pub const CLAIM_SQL: &str = queue::CLAIM_SQL;
