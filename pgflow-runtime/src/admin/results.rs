//! [`results`]: the monitoring aggregates over finished runs (`pgflow.job_results`):
//! per workflow, per finishing instance, per workflow and status.

use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::Error;
use crate::store::runs;

// results

/// The three monitoring aggregates over `pgflow.job_results`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The window: runs finished in the last this many seconds.
    pub since_secs: u64,
    /// The workflow filter, if any.
    pub workflow: Option<String>,
    /// Per workflow: count, success rate, average and p95 duration, total cost.
    pub workflows: Vec<WorkflowResult>,
    /// Per instance that finished runs: how the work was distributed.
    pub instances: Vec<InstanceResult>,
    /// Per workflow and status (`success`/`failure`): count, average duration, cost.
    pub statuses: Vec<StatusResult>,
}

/// Finished runs of one workflow.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowResult {
    /// The workflow.
    pub workflow: String,
    /// Runs finished.
    pub count: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// succeeded / count, 0 to 1.
    pub success_rate: f64,
    /// Average duration (ms).
    pub avg_ms: f64,
    /// 95th percentile duration (ms).
    pub p95_ms: f64,
    /// Total cost.
    pub total_cost_cents: i64,
}

/// Finished runs per finishing instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceResult {
    /// The instance (none for runs no instance finished).
    pub instance_id: Option<String>,
    /// Runs finished.
    pub count: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// Of which failed.
    pub failed: i64,
    /// Its share of all runs in the window, 0 to 1.
    pub share: f64,
}

/// Finished runs per workflow and status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusResult {
    /// The workflow.
    pub workflow: String,
    /// `success` or `failure`.
    pub status: String,
    /// Runs.
    pub count: i64,
    /// Average duration (ms).
    pub avg_ms: f64,
    /// Total cost.
    pub total_cost_cents: i64,
}

/// Aggregates over runs that finished within `since` of now (database clock),
/// optionally of one workflow. These scan `pgflow.runs` through the view.
///
/// # Errors
///
/// [`Error::NotMigrated`]; database errors.
pub async fn results(
    pool: &PgPool,
    since: Duration,
    workflow: Option<&str>,
) -> Result<Results, Error> {
    let mut conn = pool.acquire().await?;
    let (workflows, instances, statuses) =
        runs::results(&mut conn, since.as_secs_f64(), workflow).await?;
    let workflows = workflows
        .into_iter()
        .map(|r| WorkflowResult {
            success_rate: ratio(r.succeeded, r.count),
            workflow: r.workflow,
            count: r.count,
            succeeded: r.succeeded,
            avg_ms: r.avg_ms.unwrap_or(0.0),
            p95_ms: r.p95_ms.unwrap_or(0.0),
            total_cost_cents: r.total_cost_cents,
        })
        .collect();
    let total: i64 = instances.iter().map(|r| r.count).sum();
    let instances = instances
        .into_iter()
        .map(|r| InstanceResult {
            share: ratio(r.count, total),
            instance_id: r.instance_id,
            count: r.count,
            succeeded: r.succeeded,
            failed: r.failed,
        })
        .collect();
    let statuses = statuses
        .into_iter()
        .map(|r| StatusResult {
            workflow: r.workflow,
            status: r.status,
            count: r.count,
            avg_ms: r.avg_ms.unwrap_or(0.0),
            total_cost_cents: r.total_cost_cents,
        })
        .collect();
    Ok(Results {
        since_secs: since.as_secs(),
        workflow: workflow.map(str::to_owned),
        workflows,
        instances,
        statuses,
    })
}

fn ratio(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}
