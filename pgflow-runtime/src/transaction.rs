//! [`PgTransaction`]: a PostgreSQL transaction lent to transactional steps — steps
//! that take a `&mut sqlx::PgConnection` parameter.
//!
//! The durable runtime lends one per attempt, begun on its pool: the step's writes
//! and the attempt's completion (its output, the steps it makes ready, its run's end)
//! commit together, or not at all — an attempt that fails, times out, panics, or
//! whose claim was lost (its completion rejected by the claim fence) leaves none of
//! its writes. In process, lend one yourself (e.g. over a `#[sqlx::test]`'s pool):
//! each attempt runs inside a savepoint, released when it succeeds and rolled back
//! when it fails.
//!
//! ```no_run
//! use pgflow::{workflow, ExecuteOptions, StepError, Transaction};
//! use pgflow_runtime::PgTransaction;
//!
//! pub struct Order;
//! #[workflow(name = "transaction_module_doc")]
//! impl Order {
//!     #[step]
//!     async fn charge(cents: i64, tx: &mut sqlx::PgConnection) -> Result<i64, StepError> {
//!         sqlx::query("INSERT INTO payments (cents) VALUES ($1)")
//!             .bind(cents)
//!             .execute(&mut *tx)
//!             .await?;
//!         Ok(cents)
//!     }
//! }
//!
//! # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let lent = Transaction::new(PgTransaction::new(pool.begin().await?));
//! let opts = ExecuteOptions::new().transaction(lent.clone());
//! pgflow::execute_with::<Order>(250, opts).await?;
//! let tx = lent.into_inner::<PgTransaction>().expect("given back").into_inner();
//! tx.rollback().await?; // or commit
//! # Ok(()) }
//! ```

use std::any::Any;

use futures_util::future::BoxFuture;
use pgflow::{StepError, Transactional};
use sqlx::{PgConnection, Postgres};

/// A PostgreSQL transaction lent to transactional steps (see the module docs).
#[derive(Debug)]
pub struct PgTransaction(sqlx::Transaction<'static, Postgres>);

impl PgTransaction {
    /// Lends `tx`.
    pub fn new(tx: sqlx::Transaction<'static, Postgres>) -> Self {
        Self(tx)
    }

    /// The transaction back, to commit or roll back.
    pub fn into_inner(self) -> sqlx::Transaction<'static, Postgres> {
        self.0
    }

    async fn run(&mut self, sql: &'static str) -> Result<(), StepError> {
        sqlx::query(sql)
            .execute(&mut *self.0)
            .await
            .map(|_| ())
            .map_err(|e| StepError::retryable(format!("`{sql}` failed: {e}")))
    }
}

impl Transactional for PgTransaction {
    fn connection(&mut self) -> &mut (dyn Any + Send) {
        let conn: &mut PgConnection = &mut self.0;
        conn
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StepError>> {
        Box::pin(self.run("SAVEPOINT pgflow_step"))
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), StepError>> {
        Box::pin(self.run("RELEASE SAVEPOINT pgflow_step"))
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StepError>> {
        Box::pin(self.run("ROLLBACK TO SAVEPOINT pgflow_step"))
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}
