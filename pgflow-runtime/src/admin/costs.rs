//! [`costs`]: spend from the usage ledger (`pgflow.step_usage`), grouped by workflow,
//! model or key, over a recent window — what `pgflow costs` prints.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgPool;

use crate::Error;
use crate::store::usage;

/// How [`costs`] groups the ledger.
///
/// ```
/// use pgflow_runtime::admin::CostsBy;
/// assert_eq!("model".parse::<CostsBy>().unwrap(), CostsBy::Model);
/// assert!("tenant".parse::<CostsBy>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CostsBy {
    /// Per workflow.
    Workflow,
    /// Per model (`""` for cost reported without one).
    Model,
    /// Per run key (tenant, customer; `""` for runs without a key).
    Key,
}

impl CostsBy {
    /// `workflow`, `model` or `key`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Workflow => "workflow",
            Self::Model => "model",
            Self::Key => "key",
        }
    }
}

impl fmt::Display for CostsBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CostsBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "workflow" => Ok(Self::Workflow),
            "model" => Ok(Self::Model),
            "key" => Ok(Self::Key),
            other => Err(format!(
                "`{other}` is not a grouping: use workflow, model or key"
            )),
        }
    }
}

/// Spend over a window, grouped.
#[derive(Debug, Clone, Serialize)]
pub struct Costs {
    /// The window: usage recorded in the last this many seconds.
    pub since_secs: u64,
    /// The grouping.
    pub by: CostsBy,
    /// One row per group, the most expensive first.
    pub rows: Vec<CostRow>,
    /// The sum over all groups.
    pub total: CostRow,
}

/// Spend of one group.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CostRow {
    /// The workflow, model or key (`""`: none; `"total"` for the sum).
    pub group: String,
    /// Runs that spent.
    pub runs: i64,
    /// Step attempts that reported usage (failed and retried ones included).
    pub attempts: i64,
    /// Tokens sent.
    pub tokens_in: i64,
    /// Tokens received.
    pub tokens_out: i64,
    /// Cost in cents.
    pub cost_cents: i64,
}

/// Spend recorded in the last `since`, grouped `by` workflow, model or key.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// use pgflow_runtime::admin::{costs, CostsBy};
/// let day = costs(&pool, std::time::Duration::from_secs(86_400), CostsBy::Model).await?;
/// for row in &day.rows {
///     println!("{}: {} tokens in, {} cents", row.group, row.tokens_in, row.cost_cents);
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// Database errors.
pub async fn costs(pool: &PgPool, since: Duration, by: CostsBy) -> Result<Costs, Error> {
    let rows = usage::spend(pool, since.as_secs_f64(), by.as_str()).await?;
    let rows: Vec<CostRow> = rows
        .into_iter()
        .map(|r| CostRow {
            group: r.grp,
            runs: r.runs,
            attempts: r.attempts,
            tokens_in: r.tokens_in,
            tokens_out: r.tokens_out,
            cost_cents: r.cost_cents,
        })
        .collect();
    let total = rows.iter().fold(
        CostRow {
            group: "total".to_owned(),
            ..CostRow::default()
        },
        |mut t, r| {
            t.attempts += r.attempts;
            t.tokens_in += r.tokens_in;
            t.tokens_out += r.tokens_out;
            t.cost_cents += r.cost_cents;
            t
        },
    );
    let runs = usage::runs_with_usage(pool, since.as_secs_f64()).await?;
    Ok(Costs {
        since_secs: since.as_secs(),
        by,
        rows,
        total: CostRow { runs, ..total },
    })
}
