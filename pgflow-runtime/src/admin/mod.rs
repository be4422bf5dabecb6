//! Operator functions over a pool: what the `pgflow` CLI runs.
//!
//! Everything here works from the database alone — the step tables come from
//! `pgflow.workflows` (stored by every runtime at start as a
//! [`Definition`](pgflow::Definition), and read back as one), so a binary that links
//! none of the workflows can inspect, retry and cancel their runs.
//!
//! - [`status`]: instances, queue depths, runs per workflow;
//! - [`list_runs`], [`run_detail`]: runs and their steps;
//! - [`results`]: the monitoring aggregates;
//! - [`retry`], [`cancel`]: repairs.
//!
//! ```no_run
//! use pgflow_runtime::admin;
//!
//! # async fn demo() -> Result<(), pgflow_runtime::Error> {
//! let pool = admin::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
//! let status = admin::status(&pool).await?;
//! for q in &status.queues {
//!     println!("{}: {} available, {} running", q.queue, q.available, q.running);
//! }
//! let failed = admin::list_runs(&pool, &admin::RunFilter {
//!     status: Some(pgflow_runtime::RunStatus::Failed),
//!     ..Default::default()
//! }).await?;
//! for run in failed {
//!     admin::retry(&pool, pgflow::RunId(run.id)).await?;
//! }
//! # Ok(()) }
//! ```

mod repair;
mod results;
mod runs;
mod status;

pub use repair::{CancelReport, RetryReport, cancel, retry};
pub use results::{InstanceResult, Results, StatusResult, WorkflowResult, results};
pub use runs::{RunDetail, RunFilter, RunSummary, StepDetail, StepStatus, list_runs, run_detail};
pub use status::{Instance, QueueDepth, Status, WorkflowRuns, status};

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{Error, MIGRATOR, mask_password};

/// How long [`connect`] waits for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a small pool (2 connections) to `url`.
///
/// # Errors
///
/// [`Error::Connect`] naming the URL with its password masked and what to check,
/// when the URL is malformed or the server cannot be reached.
pub async fn connect(url: &str) -> Result<PgPool, Error> {
    let connect_error = |source| Error::Connect {
        url: mask_password(url),
        source,
    };
    let opts: PgConnectOptions = url.parse().map_err(connect_error)?;
    // One plain connection first: a pool retries a refused connection until its
    // acquire timeout and then reports only the timeout, not the cause.
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
        .await
        .map_err(|_| {
            connect_error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )))
        })?
        .map_err(connect_error)?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(opts)
        .await
        .map_err(connect_error)
}

/// One migration file.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    /// Its number (`0001`).
    pub version: i64,
    /// Its name (`init`).
    pub description: String,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// The migrations applied now.
    pub applied: Vec<Migration>,
    /// How many were applied before.
    pub already_applied: usize,
}

/// Applies the pgflow migrations that are not applied yet.
///
/// # Errors
///
/// [`Error::Migrate`]; database errors.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport, Error> {
    use sqlx::migrate::Migrate;
    let before: HashSet<i64> = {
        let mut conn = pool.acquire().await?;
        conn.ensure_migrations_table().await?;
        conn.list_applied_migrations()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect()
    };
    MIGRATOR.run(pool).await?;
    let applied = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !before.contains(&m.version))
        .map(|m| Migration {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect();
    Ok(MigrateReport {
        applied,
        already_applied: before.len(),
    })
}
