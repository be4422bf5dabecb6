//! What the dashboard reads beyond the admin API: finished runs per minute (from a
//! bounded sample of the newest runs, so a page costs the same at 10 million runs)
//! and a run's usage by model.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// Finished runs of one workflow in one minute.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct MinuteRow {
    pub(crate) minute: DateTime<Utc>,
    pub(crate) workflow: String,
    pub(crate) succeeded: i64,
    pub(crate) failed: i64,
    /// The 95th percentile of due -> finished.
    pub(crate) p95_ms: Option<i64>,
    pub(crate) cost_cents: i64,
}

/// Runs that finished in the last `minutes` minutes, per minute and workflow, among
/// the newest `sample` runs (primary key, newest first): the figures of a busy
/// system are those of its newest runs.
pub(crate) async fn per_minute(
    db: impl PgExecutor<'_>,
    minutes: i32,
    sample: i64,
) -> Result<Vec<MinuteRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT date_trunc('minute', r.completed_at) AS minute, r.workflow,
                count(*) FILTER (WHERE r.status = 'succeeded') AS succeeded,
                count(*) FILTER (WHERE r.status = 'failed') AS failed,
                (percentile_cont(0.95) WITHIN GROUP (ORDER BY r.ms))::bigint AS p95_ms,
                COALESCE(sum(r.cost_cents), 0)::bigint AS cost_cents
         FROM (SELECT workflow, status, completed_at, cost_cents,
                      EXTRACT(EPOCH FROM (completed_at - GREATEST(created_at, run_at))) * 1000 AS ms
               FROM pgflow.runs ORDER BY id DESC LIMIT $2) r
         WHERE r.status IN ('succeeded', 'failed')
           AND r.completed_at >= date_trunc('minute', now()) - make_interval(mins => $1)
         GROUP BY 1, 2
         ORDER BY 1, 2",
    )
    .bind(minutes)
    .bind(sample)
    .fetch_all(db)
    .await
}

/// A run's usage by model (index `step_usage_run_id`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct UsageRow {
    pub(crate) model: String,
    pub(crate) calls: i64,
    pub(crate) tokens_in: i64,
    pub(crate) tokens_out: i64,
    pub(crate) cost_cents: i64,
}

/// Run `run_id`'s usage ledger summed by model.
pub(crate) async fn run_usage(
    db: impl PgExecutor<'_>,
    run_id: i64,
) -> Result<Vec<UsageRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT model, count(*) AS calls, sum(tokens_in)::bigint AS tokens_in,
                sum(tokens_out)::bigint AS tokens_out, sum(cost_cents)::bigint AS cost_cents
         FROM pgflow.step_usage WHERE run_id = $1
         GROUP BY model ORDER BY model",
    )
    .bind(run_id)
    .fetch_all(db)
    .await
}
