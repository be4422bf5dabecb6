//! Run budgets: reserving a step's estimate when its attempt starts.
//!
//! A run started with a budget (`runs.budget_cents` / `budget_tokens`) has every
//! attempt of its steps reserve the step's estimate first ([`reserve`]): one
//! conditional `UPDATE` of the run row, so concurrent attempts (on any number of
//! instances) serialize on it and at most as many start as the budget has room for,
//! counting what completed attempts reported (`cost_cents`, `tokens_in + tokens_out`)
//! and what running ones reserved (`reserved_*`). The reservation is written on the
//! task row too, fenced on the claim token: the flush that applies the attempt's
//! completion (or the rescue that gives its lost claim back) releases exactly that
//! amount, once, while adding what the attempt reported.

use sqlx::PgConnection;

/// What a refused reservation found.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Refusal {
    /// `cents` or `tokens`: the budget that has no room.
    pub(crate) unit: String,
    pub(crate) spent: i64,
    pub(crate) reserved: i64,
    pub(crate) budget: i64,
}

/// Reserves `cents` and `tokens` of run `run_id`'s budgets for the attempt of task
/// `task_id` claimed with `token` (by primary keys). `Ok(None)` when reserved (or the
/// claim is gone: the attempt's completion will be rejected anyway); `Ok(Some(..))`
/// when a budget has no room for it.
pub(crate) async fn reserve(
    conn: &mut PgConnection,
    run_id: i64,
    (task_id, token): (i64, i64),
    cents: i64,
    tokens: i64,
) -> Result<Option<Refusal>, sqlx::Error> {
    let reserved: bool = sqlx::query_scalar(
        "WITH t AS (
             SELECT id FROM pgflow.tasks WHERE id = $2 AND claim_token = $3 FOR UPDATE
         ), r AS (
             UPDATE pgflow.runs
             SET reserved_cents = COALESCE(reserved_cents, 0) + $4,
                 reserved_tokens = COALESCE(reserved_tokens, 0) + $5
             WHERE id = $1 AND EXISTS (SELECT 1 FROM t)
               AND (budget_cents IS NULL
                    OR cost_cents + COALESCE(reserved_cents, 0) + $4 <= budget_cents)
               AND (budget_tokens IS NULL
                    OR COALESCE(tokens_in, 0) + COALESCE(tokens_out, 0)
                       + COALESCE(reserved_tokens, 0) + $5 <= budget_tokens)
             RETURNING id
         ), held AS (
             UPDATE pgflow.tasks SET reserved_cents = $4, reserved_tokens = $5
             WHERE id IN (SELECT id FROM t) AND EXISTS (SELECT 1 FROM r)
         )
         SELECT EXISTS (SELECT 1 FROM r) OR NOT EXISTS (SELECT 1 FROM t)",
    )
    .bind(run_id)
    .bind(task_id)
    .bind(token)
    .bind(cents)
    .bind(tokens)
    .fetch_one(&mut *conn)
    .await?;
    if reserved {
        return Ok(None);
    }
    // Which budget has no room, as the run stands now (a statement of its own: the
    // one above may have waited for the run row and decided on its newest version).
    let refusal: Option<Refusal> = sqlx::query_as(
        "SELECT b.unit, b.spent, b.reserved, b.budget
         FROM pgflow.runs x
         CROSS JOIN LATERAL (
             SELECT 1 AS k, 'cents' AS unit, x.cost_cents AS spent,
                    COALESCE(x.reserved_cents, 0) AS reserved, x.budget_cents AS budget
             WHERE x.budget_cents IS NOT NULL
               AND x.cost_cents + COALESCE(x.reserved_cents, 0) + $2 > x.budget_cents
             UNION ALL
             SELECT 2, 'tokens', COALESCE(x.tokens_in, 0) + COALESCE(x.tokens_out, 0),
                    COALESCE(x.reserved_tokens, 0), x.budget_tokens
             WHERE x.budget_tokens IS NOT NULL
             UNION ALL
             SELECT 3, 'cents', x.cost_cents, COALESCE(x.reserved_cents, 0),
                    COALESCE(x.budget_cents, 0)
         ) b
         WHERE x.id = $1
         ORDER BY b.k
         LIMIT 1",
    )
    .bind(run_id)
    .bind(cents)
    .fetch_optional(conn)
    .await?;
    Ok(Some(refusal.unwrap_or(Refusal {
        unit: "cents".to_owned(),
        spent: 0,
        reserved: 0,
        budget: 0,
    })))
}
