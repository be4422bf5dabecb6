//! The usage ledger, `pgflow.step_usage`, as tools read it (the flush writes it).

use sqlx::PgExecutor;

/// One group's spend.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SpendRow {
    pub(crate) grp: String,
    pub(crate) runs: i64,
    pub(crate) attempts: i64,
    pub(crate) tokens_in: i64,
    pub(crate) tokens_out: i64,
    pub(crate) cost_cents: i64,
}

/// Spend recorded in the last `secs` seconds (index `step_usage_recorded_at`),
/// grouped by `by` (`workflow`, `model` or `key`), the most expensive first.
pub(crate) async fn spend(
    db: impl PgExecutor<'_>,
    secs: f64,
    by: &str,
) -> Result<Vec<SpendRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT COALESCE(CASE $2 WHEN 'workflow' THEN workflow WHEN 'model' THEN model
                                 ELSE key END, '') AS grp,
                count(DISTINCT run_id) AS runs,
                count(DISTINCT (run_id, step, element, attempt)) AS attempts,
                COALESCE(sum(tokens_in), 0)::bigint AS tokens_in,
                COALESCE(sum(tokens_out), 0)::bigint AS tokens_out,
                COALESCE(sum(cost_cents), 0)::bigint AS cost_cents
         FROM pgflow.step_usage
         WHERE recorded_at >= now() - $1::float8 * interval '1 second'
         GROUP BY 1
         ORDER BY 6 DESC, 4 + 5 DESC, 1",
    )
    .bind(secs)
    .bind(by)
    .fetch_all(db)
    .await
}

/// Distinct runs with usage recorded in the last `secs` seconds.
pub(crate) async fn runs_with_usage(
    db: impl PgExecutor<'_>,
    secs: f64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(DISTINCT run_id) FROM pgflow.step_usage
         WHERE recorded_at >= now() - $1::float8 * interval '1 second'",
    )
    .bind(secs)
    .fetch_one(db)
    .await
}
