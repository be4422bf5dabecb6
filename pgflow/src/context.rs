//! What a running step can see: [`StepContext`] (run id, workflow, step, attempt,
//! shared data, cost and usage, cancellation), the typed shared-state map [`Data`] and the
//! [`CancelToken`] a run's steps share.
//!
//! A step takes the context by adding a `&StepContext` parameter anywhere in its
//! signature:
//!
//! ```
//! use pgflow::{StepContext, StepError};
//!
//! struct Prices { cents_per_call: i64 }
//!
//! async fn call(prompt: String, ctx: &StepContext) -> Result<String, StepError> {
//!     let prices = ctx.data::<Prices>()?;
//!     ctx.add_cost_cents(prices.cents_per_call);
//!     ctx.check_cancelled()?;
//!     Ok(format!("{} (attempt {})", prompt, ctx.attempt()))
//! }
//! ```

use std::any::{Any, TypeId, type_name};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::StepError;

/// The identifier of a run. The durable runtime uses the `pgflow.runs` primary key;
/// the in-process executor numbers its runs from a process-wide counter.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct RunId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Typed shared state handed to every step (`ctx.data::<T>()`): an HTTP client, a
/// price table, a connection pool. One value per type.
///
/// # Examples
///
/// ```
/// let mut data = pgflow::Data::new();
/// data.insert(42_u32);
/// data.insert(String::from("shared"));
/// assert_eq!(data.get::<u32>(), Some(&42));
/// assert_eq!(data.get::<i8>(), None);
/// ```
#[derive(Clone, Default)]
pub struct Data {
    values: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
}

impl Data {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `value`, replacing any earlier value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) -> &mut Self {
        self.values.insert(TypeId::of::<T>(), Arc::new(value));
        self
    }

    /// The value of type `T`, if one was stored.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.values
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref::<T>())
    }

    /// The number of stored values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Data")
            .field("len", &self.values.len())
            .finish()
    }
}

/// A flag shared by the steps of a run, set when the run is cancelled. Steps look at
/// it through [`StepContext::is_cancelled`]; a long step should check it between
/// units of work, or race its work against [`CancelToken::cancelled`].
///
/// ```
/// let token = pgflow::CancelToken::new();
/// let seen_by_step = token.clone();
/// token.cancel();
/// assert!(seen_by_step.is_cancelled());
/// ```
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelState>);

#[derive(Debug, Default)]
struct CancelState {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the run cancelled and wakes everything waiting in [`cancelled`](Self::cancelled).
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether the run was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::Acquire)
    }

    /// Completes once the run is cancelled.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let token = pgflow::CancelToken::new();
    /// let waiter = tokio::spawn({ let t = token.clone(); async move { t.cancelled().await } });
    /// token.cancel();
    /// waiter.await.unwrap();
    /// # }
    /// ```
    pub async fn cancelled(&self) {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.is_cancelled() {
            return;
        }
        notified.await;
    }
}

/// Accumulates what a run's steps report they consumed: cost in cents and, per model,
/// tokens in and out ([`StepContext::add_usage`]). Shared by all steps of a run in
/// process; the durable runtime gives each attempt its own and writes what it
/// recorded to the usage ledger (`pgflow.step_usage`) in the same transaction as the
/// attempt's completion, a failed or retried attempt's usage included (it was paid
/// for).
///
/// ```
/// let cost = pgflow::CostMeter::new();
/// cost.add(3);
/// cost.clone().add_usage("gpt-4o", 1200, 300, 4);
/// cost.add_usage("gpt-4o", 800, 100, 2);
/// assert_eq!(cost.total(), 9);
/// assert_eq!(cost.tokens(), (2000, 400));
/// let by_model = cost.usage();
/// assert_eq!(by_model.len(), 2);
/// assert_eq!((by_model[0].model.as_str(), by_model[0].cost_cents), ("", 3));
/// assert_eq!((by_model[1].model.as_str(), by_model[1].tokens_in, by_model[1].cost_cents), ("gpt-4o", 2000, 6));
/// ```
#[derive(Debug, Clone, Default)]
pub struct CostMeter(Arc<MeterState>);

#[derive(Debug, Default)]
struct MeterState {
    cents: AtomicI64,
    /// Per model, in the order first seen; cost without a model under `""`.
    usage: std::sync::Mutex<Vec<Usage>>,
}

/// What steps consumed under one model: tokens in and out and cost in cents. A cost
/// reported without a model ([`StepContext::add_cost_cents`]) is under model `""`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// The model (or provider, or any name the step reports under).
    pub model: String,
    /// Tokens sent.
    pub tokens_in: u64,
    /// Tokens received.
    pub tokens_out: u64,
    /// Cost in cents (may be negative for a refund).
    pub cost_cents: i64,
}

impl CostMeter {
    /// A meter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `cents` (may be negative, for a refund) without a model.
    pub fn add(&self, cents: i64) {
        self.add_usage("", 0, 0, cents);
    }

    /// Adds what one call to `model` consumed.
    pub fn add_usage(&self, model: &str, tokens_in: u64, tokens_out: u64, cost_cents: i64) {
        self.0.cents.fetch_add(cost_cents, Ordering::Relaxed);
        let mut usage = self
            .0
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match usage.iter_mut().find(|u| u.model == model) {
            Some(u) => {
                u.tokens_in = u.tokens_in.saturating_add(tokens_in);
                u.tokens_out = u.tokens_out.saturating_add(tokens_out);
                u.cost_cents = u.cost_cents.saturating_add(cost_cents);
            }
            None => usage.push(Usage {
                model: model.to_owned(),
                tokens_in,
                tokens_out,
                cost_cents,
            }),
        }
    }

    /// The total cost so far, in cents.
    pub fn total(&self) -> i64 {
        self.0.cents.load(Ordering::Relaxed)
    }

    /// Tokens in and out so far, all models.
    pub fn tokens(&self) -> (u64, u64) {
        self.usage().iter().fold((0, 0), |(i, o), u| {
            (
                i.saturating_add(u.tokens_in),
                o.saturating_add(u.tokens_out),
            )
        })
    }

    /// What was consumed, per model (in the order first reported).
    pub fn usage(&self) -> Vec<Usage> {
        self.0
            .usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// What a step sees of the run it belongs to. Take it as a `&StepContext` parameter.
///
/// # Examples
///
/// ```
/// use pgflow::{Data, StepContext};
///
/// let mut data = Data::new();
/// data.insert(7_u8);
/// let ctx = StepContext::builder("wf", "step").attempt(2).data(data.into()).build();
/// assert_eq!(ctx.attempt(), 2);
/// assert_eq!(*ctx.data::<u8>().unwrap(), 7);
/// assert!(ctx.data::<u16>().unwrap_err().is_permanent());
/// ctx.add_cost_cents(5);
/// assert_eq!(ctx.cost().total(), 5);
/// ```
#[derive(Debug)]
pub struct StepContext {
    run_id: RunId,
    workflow: &'static str,
    step: &'static str,
    attempt: u32,
    element: Option<usize>,
    // What the builder does not get is made only when it is first needed (three
    // allocations per attempt were a tenth of a trivial step's cost): the durable
    // runtime sets all three, the in-process executor gives `scope` instead.
    data: Option<Arc<Data>>,
    cost: Option<CostMeter>,
    /// The meter made for a context built without one (a `OnceLock` only there: its
    /// `From` takes a lock-free but not free path on every attempt).
    own_cost: std::sync::OnceLock<CostMeter>,
    cancel: Option<CancelToken>,
    /// What an in-process run shares with all its attempts, the three above among
    /// them (which are then `None`): one count to raise and drop per attempt instead
    /// of three.
    scope: Option<Arc<crate::execute::Shared>>,
    transaction: Option<crate::Transaction>,
}

impl Clone for StepContext {
    /// A clone shares the original's cost meter (made now if it was not yet).
    fn clone(&self) -> Self {
        Self {
            run_id: self.run_id,
            workflow: self.workflow,
            step: self.step,
            attempt: self.attempt,
            element: self.element,
            data: self.data.clone(),
            cost: Some(self.cost().clone()),
            own_cost: std::sync::OnceLock::new(),
            cancel: self.cancel.clone(),
            scope: self.scope.clone(),
            transaction: self.transaction.clone(),
        }
    }
}

impl StepContext {
    /// Starts building a context; executors use this, and so can unit tests that call
    /// a step function directly.
    pub fn builder(workflow: &'static str, step: &'static str) -> StepContextBuilder {
        StepContextBuilder(Self {
            run_id: RunId(0),
            workflow,
            step,
            attempt: 1,
            element: None,
            data: None,
            cost: None,
            own_cost: std::sync::OnceLock::new(),
            cancel: None,
            scope: None,
            transaction: None,
        })
    }

    /// The transaction lent to this attempt, for a transactional step.
    pub fn transaction(&self) -> Option<&crate::Transaction> {
        self.transaction.as_ref()
    }

    /// The run this step belongs to.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// The workflow's durable name.
    pub fn workflow(&self) -> &'static str {
        self.workflow
    }

    /// The step's name (its function name).
    pub fn step(&self) -> &'static str {
        self.step
    }

    /// The attempt number, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// For an element of a map step, its index in the parent's vector.
    pub fn element(&self) -> Option<usize> {
        self.element
    }

    /// The shared value of type `T` given to the executor or runtime.
    ///
    /// # Errors
    ///
    /// A permanent [`StepError`] naming the type when no such value was given (a
    /// setup mistake that no retry fixes).
    pub fn data<T: Send + Sync + 'static>(&self) -> Result<&T, StepError> {
        let data = self
            .data
            .as_deref()
            .or_else(|| self.scope.as_deref().and_then(|s| s.data.as_deref()));
        data.and_then(Data::get::<T>).ok_or_else(|| {
            StepError::permanent(format!(
                "no shared data of type `{}`: pass it with `.data(..)` when building the runtime or the execute options",
                type_name::<T>()
            ))
        })
    }

    /// Adds `cents` to the run's cost (summed into `cost_cents` of its result).
    pub fn add_cost_cents(&self, cents: i64) {
        self.cost().add(cents);
    }

    /// Records what one call consumed: `model`'s tokens in and out and the cost in
    /// cents. The durable runtime writes it to the usage ledger (`pgflow.step_usage`,
    /// read by `pgflow costs` and `Runtime::summary`) with the step's completion, adds
    /// it to the run's cost and tokens, and counts it against the run's budget.
    ///
    /// ```
    /// # use pgflow::StepContext;
    /// let ctx = StepContext::builder("wf", "call").build();
    /// // e.g. from the provider's `usage` field
    /// ctx.add_usage("gpt-4o-mini", 1_200, 350, 2);
    /// assert_eq!(ctx.cost().tokens(), (1_200, 350));
    /// assert_eq!(ctx.cost().total(), 2);
    /// ```
    pub fn add_usage(&self, model: &str, tokens_in: u64, tokens_out: u64, cost_cents: i64) {
        self.cost()
            .add_usage(model, tokens_in, tokens_out, cost_cents);
    }

    /// The run's cost meter.
    pub fn cost(&self) -> &CostMeter {
        match (&self.cost, &self.scope) {
            (Some(cost), _) => cost,
            (None, Some(scope)) => scope.cost(),
            (None, None) => self.own_cost.get_or_init(CostMeter::new),
        }
    }

    /// Whether the run was cancelled.
    pub fn is_cancelled(&self) -> bool {
        match (&self.cancel, &self.scope) {
            (Some(cancel), _) => cancel.is_cancelled(),
            (None, Some(scope)) => scope.is_cancelled(),
            (None, None) => false,
        }
    }

    /// Returns a [`StepError::cancelled`] error if the run was cancelled, so a long
    /// step can stop early with `ctx.check_cancelled()?`.
    ///
    /// # Errors
    ///
    /// When the run was cancelled.
    pub fn check_cancelled(&self) -> Result<(), StepError> {
        if self.is_cancelled() {
            Err(StepError::cancelled())
        } else {
            Ok(())
        }
    }
}

/// Builds a [`StepContext`]; see [`StepContext::builder`].
#[derive(Debug)]
pub struct StepContextBuilder(StepContext);

impl StepContextBuilder {
    /// Sets the run id.
    pub fn run_id(mut self, run_id: RunId) -> Self {
        self.0.run_id = run_id;
        self
    }

    /// Sets the attempt number (1-based).
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.0.attempt = attempt;
        self
    }

    /// Sets the map element index.
    pub fn element(mut self, element: Option<usize>) -> Self {
        self.0.element = element;
        self
    }

    /// Sets the shared data.
    pub fn data(mut self, data: Arc<Data>) -> Self {
        self.0.data = Some(data);
        self
    }

    /// Shares a cost meter (all steps of a run share one).
    pub fn cost(mut self, cost: CostMeter) -> Self {
        self.0.cost = Some(cost);
        self
    }

    /// Shares a cancel token (all steps of a run share one).
    pub fn cancel(mut self, cancel: CancelToken) -> Self {
        self.0.cancel = Some(cancel);
        self
    }

    /// Gives the attempt the data, cost meter and cancel token of its in-process run.
    pub(crate) fn scope(mut self, scope: Arc<crate::execute::Shared>) -> Self {
        self.0.scope = Some(scope);
        self
    }

    /// Lends a transaction to the attempt (a transactional step borrows it).
    pub fn transaction(mut self, tx: crate::Transaction) -> Self {
        self.0.transaction = Some(tx);
        self
    }

    /// The context.
    pub fn build(self) -> StepContext {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_built_without_parts_makes_them_when_needed_and_clones_share_them() {
        let ctx = StepContext::builder("wf", "step").build();
        assert!(!ctx.is_cancelled());
        assert!(ctx.data::<u8>().unwrap_err().is_permanent());
        // a clone made before any cost was reported still shares the meter
        let clone = ctx.clone();
        clone.add_cost_cents(3);
        ctx.add_usage("m", 1, 2, 4);
        assert_eq!(ctx.cost().total(), 7);
        assert_eq!(clone.cost().total(), 7);
        assert_eq!(clone.cost().tokens(), (1, 2));
        // given parts are used as they are
        let cancel = CancelToken::new();
        let meter = CostMeter::new();
        let given = StepContext::builder("wf", "step")
            .cancel(cancel.clone())
            .cost(meter.clone())
            .build();
        given.add_cost_cents(5);
        cancel.cancel();
        assert!(given.is_cancelled());
        assert_eq!(meter.total(), 5);
    }
}
