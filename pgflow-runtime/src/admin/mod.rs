//! Operator functions over a pool: what the `pgflow` CLI runs.
//!
//! Everything here works from the database alone — the step tables come from
//! `pgflow.workflows` (stored by every runtime at start as a
//! [`Definition`](pgflow::Definition), and read back as one), so a binary that links
//! none of the workflows can inspect, retry and cancel their runs.
//!
//! - [`status`]: instances, queue depths, runs per workflow, schedules;
//! - [`schedules()`], [`remove_schedule`]: the cron schedules;
//! - [`list_runs`], [`run_detail`]: runs and their steps;
//! - [`results`]: the monitoring aggregates;
//! - [`costs`]: spend from the usage ledger, by workflow, model or key;
//! - [`start`]: a run by name, from the stored definition;
//! - [`signal`]: a signal to a run, by name;
//! - [`export`]: a run with every stored output, to replay it in process
//!   ([`pgflow::replay()`]);
//! - [`retry`] (resume a failed or cancelled run), [`fork`] (a new run from a chosen
//!   step), [`cancel`]: repairs.
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

mod costs;
mod export;
mod prune;
pub(crate) mod repair;
mod results;
pub(crate) mod runs;
mod schedules;
mod signals;
mod start;
pub(crate) mod status;

pub use costs::{CostRow, Costs, CostsBy, costs};
pub use export::export;
pub use prune::{PruneOptions, PruneReport, prune};
pub use repair::{
    CancelReport, ForkOptions, ForkReport, ResumedMap, RetryReport, cancel, fork, retry,
};
pub use results::{InstanceResult, Results, StatusResult, WorkflowResult, results};
pub use runs::{
    ElementsDetail, ParentLink, RunDetail, RunFilter, RunSummary, StepDetail, StepStatus,
    SubflowRun, explain_list_runs, list_runs, run_detail,
};
pub use schedules::{remove_schedule, schedules};
pub(crate) use signals::send_json;
pub use signals::signal;
pub use start::{StartReport, start};
pub use status::{Instance, QueueDepth, Status, UnservedRuns, VersionStatus, WorkflowRuns, status};

use serde::Serialize;
use sqlx::PgPool;

use crate::{Error, MIGRATOR};

/// Connects a small pool (2 connections) to `url`, after one plain connection that
/// says why it failed if it does.
///
/// # Errors
///
/// [`Error::Connect`] naming the URL with its password masked and the cause
/// (refused, no answer within 10 s, authentication, unknown database, a role over
/// its connection limit), when the URL is malformed or the server cannot be reached.
pub async fn connect(url: &str) -> Result<PgPool, Error> {
    crate::connect::pool(url, 2, 0).await
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
    let before = crate::store::migrations::run(pool).await?;
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
