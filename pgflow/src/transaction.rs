//! Transactional steps: a step that takes a `&mut` parameter (e.g. `tx: &mut
//! sqlx::PgConnection`) borrows a database transaction for its attempt, so its own
//! writes commit together with its completion — exactly-once effects, not only
//! exactly-once outputs. An attempt that fails, times out, panics or loses its claim
//! leaves none of its writes.
//!
//! This crate has no database code: what a step borrows is anything implementing
//! [`Transactional`] (the `pgflow-runtime` crate implements it for PostgreSQL, as
//! `pgflow_runtime::PgTransaction`). The durable runtime begins a transaction per
//! attempt on its own pool and applies the attempt's completion in it before it
//! commits. The in-process executor borrows the one you give it
//! ([`ExecuteOptions::transaction`](crate::ExecuteOptions::transaction)): each attempt
//! runs between [`Transactional::begin`] and [`Transactional::commit`] (for
//! PostgreSQL: a savepoint, released or rolled back), one attempt at a time.
//!
//! ```
//! use pgflow::{workflow, StepError, Transaction, Transactional};
//! use futures_util::future::BoxFuture;
//!
//! // A stand-in for a database connection: a log of what the steps wrote, and the
//! // position of the open "savepoint".
//! #[derive(Default)]
//! pub struct Ledger { rows: Vec<String>, mark: usize }
//!
//! impl Transactional for Ledger {
//!     fn connection(&mut self) -> &mut (dyn std::any::Any + Send) { self }
//!     fn begin(&mut self) -> BoxFuture<'_, Result<(), StepError>> {
//!         self.mark = self.rows.len();
//!         Box::pin(async { Ok(()) })
//!     }
//!     fn commit(&mut self) -> BoxFuture<'_, Result<(), StepError>> { Box::pin(async { Ok(()) }) }
//!     fn rollback(&mut self) -> BoxFuture<'_, Result<(), StepError>> {
//!         self.rows.truncate(self.mark);
//!         Box::pin(async { Ok(()) })
//!     }
//!     fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> { self }
//! }
//!
//! pub struct Charge;
//! #[workflow(name = "transaction_doc")]
//! impl Charge {
//!     #[step(max_attempts = 2, backoff = "1ms")]
//!     async fn charge(cents: u32, ledger: &mut Ledger, ctx: &pgflow::StepContext) -> Result<u32, StepError> {
//!         ledger.rows.push(format!("charged {cents} (attempt {})", ctx.attempt()));
//!         if ctx.attempt() == 1 {
//!             return Err(StepError::retryable("the card network timed out"));
//!         }
//!         Ok(cents)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let tx = Transaction::new(Ledger::default());
//! let opts = pgflow::ExecuteOptions::new().transaction(tx.clone());
//! assert_eq!(pgflow::execute_with::<Charge>(250, opts).await.unwrap(), 250);
//! // the failed attempt's write was rolled back
//! let ledger: Ledger = tx.into_inner().unwrap();
//! assert_eq!(ledger.rows, ["charged 250 (attempt 2)"]);
//! # }
//! ```

use std::any::Any;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;

use crate::StepError;

/// What a transactional step borrows: a connection inside a transaction.
///
/// [`connection`](Self::connection) is what the step's `&mut T` parameter points to
/// (downcast to `T`); `begin`, `commit` and `rollback` bracket one attempt in the
/// in-process executor (the durable runtime manages its own transactions).
pub trait Transactional: Send + 'static {
    /// The value a step's `&mut T` parameter borrows (e.g. a `PgConnection`).
    fn connection(&mut self) -> &mut (dyn Any + Send);
    /// Before an attempt (in process).
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StepError>>;
    /// After an attempt that succeeded (in process): its writes stay.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), StepError>>;
    /// After an attempt that failed (in process): its writes go.
    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StepError>>;
    /// Itself, to be taken back by its concrete type.
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

/// A [`Transactional`] lent to transactional steps, one attempt at a time. Clones
/// share it.
#[derive(Clone, Default)]
pub struct Transaction {
    slot: Arc<Mutex<Option<Box<dyn Transactional>>>>,
    /// Serializes the attempts that borrow it (in process).
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl Transaction {
    /// Lends `tx`.
    pub fn new(tx: impl Transactional) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Some(Box::new(tx)))),
            turn: Arc::default(),
        }
    }

    /// Takes the lent value back, by its type; `None` while a step holds it or when
    /// it is of another type.
    pub fn into_inner<T: Transactional>(self) -> Option<T> {
        let boxed = self.take()?;
        boxed.into_any().downcast::<T>().ok().map(|b| *b)
    }

    /// Takes the lent value out (a step's attempt, or its executor).
    pub fn take(&self) -> Option<Box<dyn Transactional>> {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Puts the lent value back.
    pub fn put(&self, tx: Box<dyn Transactional>) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
    }

    /// Waits for the turn to use it (in process: one attempt at a time).
    pub(crate) async fn turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.turn.lock().await
    }
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lent = self.slot.lock().map(|s| s.is_none()).unwrap_or(true);
        f.debug_struct("Transaction")
            .field("borrowed", &lent)
            .finish()
    }
}

/// What a transactional step's entry holds while its attempt runs: the lent value,
/// put back when the attempt ends however it ends (returned, failed, dropped on a
/// timeout or a panic).
#[doc(hidden)]
pub struct Borrowed {
    tx: Option<Box<dyn Transactional>>,
    from: Transaction,
}

impl Borrowed {
    /// Borrows the transaction the context carries.
    ///
    /// # Errors
    ///
    /// A permanent error when the executor lent none (or another attempt holds it).
    pub fn take(ctx: &crate::StepContext) -> Result<Self, StepError> {
        let from = ctx.transaction().cloned().ok_or_else(|| {
            StepError::permanent(format!(
                "step `{}` takes a transaction (a `&mut` parameter) but none was lent: in process, pass one with `ExecuteOptions::transaction`",
                ctx.step()
            ))
        })?;
        let tx = from.take().ok_or_else(|| {
            StepError::permanent("the transaction lent to this step is in use by another step")
        })?;
        Ok(Self { tx: Some(tx), from })
    }

    /// The connection, as the step's parameter type `T`.
    ///
    /// # Errors
    ///
    /// A permanent error when the executor lends another type.
    pub fn get<T: Any>(&mut self) -> Result<&mut T, StepError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| StepError::permanent("internal: the transaction was given back"))?;
        tx.connection().downcast_mut::<T>().ok_or_else(|| {
            StepError::permanent(format!(
                "this step takes `&mut {}`, but the executor lends something else (the durable runtime lends `&mut sqlx::PgConnection`)",
                std::any::type_name::<T>()
            ))
        })
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            self.from.put(tx);
        }
    }
}
