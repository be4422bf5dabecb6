//! The in-process executor: runs a workflow's step table in the current task, with
//! no database. Steps are called through their typed entries and values are moved
//! between them (no JSON unless asked for); independent branches run concurrently;
//! retries, backoff, timeouts and panics follow the same [`policy`](crate::policy)
//! as the durable runtime. A conditional step whose predicate is false is skipped
//! (its consumers get `None`); a map step runs its elements concurrently, each with
//! its own retries, and collects their outputs in element order. It is how
//! workflows are unit-tested.
//!
//! ```
//! use pgflow::{workflow, StepError};
//!
//! pub struct Double;
//! #[workflow]
//! impl Double {
//!     #[step]
//!     async fn double(n: u64) -> Result<u64, StepError> { Ok(n * 2) }
//!     #[step]
//!     async fn describe(n: u64) -> Result<String, StepError> { Ok(format!("={n}")) }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! assert_eq!(pgflow::execute::<Double>(21).await.unwrap(), "=42");
//! # }
//! ```
//!
//! Backoff delays are real sleeps; in tests, `#[tokio::test(start_paused = true)]`
//! makes them (and timeouts) instantaneous without changing behaviour. One
//! difference from the durable runtime: a step's timeout counts from its first
//! `.await` that has to wait, not from the attempt's start (a step that finishes
//! without waiting reads no clock), which only matters for a step that does long
//! synchronous work before it first waits.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;

use crate::engine::{StepInputs, StepOutput, StepValue, policy};
use crate::workflow::ParamSource;
use crate::{
    AttemptFailure, CancelToken, CostMeter, Data, ErrorKind, RunError, RunId, StepContext, StepDef,
    StepError, Workflow, WorkflowDef,
};

/// Options of [`execute_with`].
///
/// ```
/// use pgflow::{CostMeter, ExecuteOptions};
/// let cost = CostMeter::new();
/// let opts = ExecuteOptions::new().json_roundtrip(true).data(String::from("api key")).cost(cost.clone());
/// ```
#[derive(Debug, Clone, Default)]
pub struct ExecuteOptions {
    json_roundtrip: bool,
    /// Made by the first `data`, shared (not copied) by every run with these options.
    data: Option<Arc<Data>>,
    /// `None`: each run makes its own meter, when a step first reads it.
    cost: Option<CostMeter>,
    /// `None`: the run cannot be cancelled.
    cancel: Option<CancelToken>,
    /// `None`: nobody holds the run's signals (a run makes them when a step first
    /// waits for one).
    pub(crate) signals: Option<crate::Signals>,
    budget_cents: Option<i64>,
    budget_tokens: Option<i64>,
    transaction: Option<crate::Transaction>,
}

impl ExecuteOptions {
    /// Defaults: typed values, no shared data.
    pub fn new() -> Self {
        Self::default()
    }

    /// Round-trips the input and every step output through JSON, as the durable
    /// runtime does, so a unit test catches a type whose `Serialize` and
    /// `Deserialize` disagree.
    pub fn json_roundtrip(mut self, on: bool) -> Self {
        self.json_roundtrip = on;
        self
    }

    /// Adds a shared value that steps read with `ctx.data::<T>()`.
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        Arc::make_mut(self.data.get_or_insert_default()).insert(value);
        self
    }

    /// The meter that the steps' `add_cost_cents` add to; read its total afterwards.
    pub fn cost(mut self, cost: CostMeter) -> Self {
        self.cost = Some(cost);
        self
    }

    /// A token that cancels the run: no step starts after it is set, and running
    /// steps see it through `ctx.is_cancelled()`.
    pub fn cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// The handle through which the run receives its signals (see [`Signals`](crate::Signals));
    /// keep a clone to send them, before or during the run. A step waiting for a
    /// signal waits on tokio's clock: with `#[tokio::test(start_paused = true)]` a
    /// 72-hour `signal_timeout` passes at once when nothing else is left to do. A step
    /// without a timeout waits until its signal is sent: forever if it never is (as in
    /// the durable runtime), so a test sends it or gives the run a `cancel` token.
    ///
    /// ```
    /// # use pgflow::{workflow, ExecuteOptions, Signals, StepError};
    /// # pub struct Gate;
    /// # #[workflow(name = "execute_signals_doc")]
    /// # impl Gate {
    /// #     #[step(signal = go)]
    /// #     async fn wait(input: u8, go: u8) -> Result<u8, StepError> { Ok(input + go) }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let signals = Signals::new();
    /// let run = tokio::spawn(pgflow::execute_with::<Gate>(1, ExecuteOptions::new().signals(signals.clone())));
    /// signals.send(Gate::go, 2).unwrap(); // kept, or delivered if the step already waits
    /// assert_eq!(run.await.unwrap().unwrap(), 3);
    /// # }
    /// ```
    pub fn signals(mut self, signals: crate::Signals) -> Self {
        self.signals = Some(signals);
        self
    }

    /// A budget in cents, as the durable runtime enforces it: before each attempt,
    /// the step's `estimate_cents` is reserved, and a step whose estimate would take
    /// the run past the budget (cost reported so far plus what running attempts
    /// reserved) is not started: the run fails with [`RunError::BudgetExceeded`].
    ///
    /// ```
    /// # use pgflow::{workflow, ExecuteOptions, RunError, StepContext, StepError};
    /// pub struct Spender;
    /// #[workflow(name = "execute_budget_doc")]
    /// impl Spender {
    ///     #[step(estimate_cents = 10)]
    ///     async fn first(n: u32, ctx: &StepContext) -> Result<u32, StepError> { ctx.add_cost_cents(10); Ok(n) }
    ///     #[step(estimate_cents = 10)]
    ///     async fn second(first: u32, ctx: &StepContext) -> Result<u32, StepError> { ctx.add_cost_cents(10); Ok(first) }
    /// }
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let err = pgflow::execute_with::<Spender>(1, ExecuteOptions::new().budget_cents(15)).await.unwrap_err();
    /// assert!(matches!(err, RunError::BudgetExceeded { ref step, spent: 10, budget: 15, .. } if step == "second"));
    /// assert!(pgflow::execute_with::<Spender>(1, ExecuteOptions::new().budget_cents(20)).await.is_ok());
    /// # }
    /// ```
    pub fn budget_cents(mut self, cents: u64) -> Self {
        self.budget_cents = Some(i64::try_from(cents).unwrap_or(i64::MAX));
        self
    }

    /// Lends `tx` to the run's transactional steps (those taking a `&mut T`
    /// parameter): each attempt runs between its `begin` and its `commit` (or
    /// `rollback`, when the attempt fails), one attempt at a time. With
    /// `pgflow_runtime::PgTransaction` over a test's transaction, a unit test sees the
    /// steps' writes and can roll them all back. See [`Transaction`](crate::Transaction).
    pub fn transaction(mut self, tx: crate::Transaction) -> Self {
        self.transaction = Some(tx);
        self
    }

    /// A budget in tokens (in + out), against `estimate_tokens`, like
    /// [`budget_cents`](Self::budget_cents).
    pub fn budget_tokens(mut self, tokens: u64) -> Self {
        self.budget_tokens = Some(i64::try_from(tokens).unwrap_or(i64::MAX));
        self
    }
}

/// What attempts running now reserved of the run's budgets (cents, tokens).
#[derive(Debug, Default)]
struct Reserved {
    cents: i64,
    tokens: i64,
}

impl Shared {
    /// The run's cost meter.
    pub(crate) fn cost(&self) -> &CostMeter {
        self.cost.get_or_init(CostMeter::new)
    }

    /// Waits until the run is cancelled: forever when the options gave no token
    /// (nothing else can cancel it).
    async fn cancelled(&self) {
        match &self.cancel {
            Some(cancel) => cancel.cancelled().await,
            None => std::future::pending().await,
        }
    }

    /// The run's signals.
    fn signals(&self) -> &crate::Signals {
        self.signals.get_or_init(crate::Signals::new)
    }

    /// Whether the run was cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(CancelToken::is_cancelled)
    }

    /// Reserves `step`'s estimates for one attempt, or refuses it when they would take
    /// the run past a budget. Returns what to release once the attempt ends.
    #[inline]
    fn reserve(
        &self,
        def: &'static WorkflowDef,
        step: &'static StepDef,
    ) -> Result<(i64, i64), RunError> {
        if self.budget_cents.is_none() && self.budget_tokens.is_none() {
            return Ok((0, 0));
        }
        self.reserve_within_budgets(def, step)
    }

    /// [`Shared::reserve`] for a run with a budget.
    fn reserve_within_budgets(
        &self,
        def: &'static WorkflowDef,
        step: &'static StepDef,
    ) -> Result<(i64, i64), RunError> {
        let o = step.options();
        let est = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let (cents, tokens) = (est(o.estimate_cents), est(o.estimate_tokens));
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens_in, tokens_out) = self.cost().tokens();
        let spent_tokens = i64::try_from(tokens_in.saturating_add(tokens_out)).unwrap_or(i64::MAX);
        for (budget, unit, spent, held, estimate) in [
            (
                self.budget_cents,
                crate::BudgetUnit::Cents,
                self.cost().total(),
                reserved.cents,
                cents,
            ),
            (
                self.budget_tokens,
                crate::BudgetUnit::Tokens,
                spent_tokens,
                reserved.tokens,
                tokens,
            ),
        ] {
            if let Some(budget) = budget {
                if spent.saturating_add(held).saturating_add(estimate) > budget {
                    return Err(RunError::BudgetExceeded {
                        workflow: def.name().to_owned(),
                        step: step.name().to_owned(),
                        scope: crate::BudgetScope::Run,
                        unit,
                        spent,
                        reserved: held,
                        estimate,
                        budget,
                    });
                }
            }
        }
        reserved.cents += cents;
        reserved.tokens += tokens;
        Ok((cents, tokens))
    }

    /// Gives back what an attempt reserved.
    #[inline]
    fn release(&self, held: (i64, i64)) {
        if held != (0, 0) {
            self.release_reserved(held);
        }
    }

    /// [`Shared::release`] of a reservation.
    fn release_reserved(&self, (cents, tokens): (i64, i64)) {
        let mut reserved = self
            .reserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reserved.cents -= cents;
        reserved.tokens -= tokens;
    }
}

/// Runs workflow `W` on `input` in process, with default [`ExecuteOptions`].
///
/// # Errors
///
/// [`RunError::StepFailed`] with the failing step's attempt history when a step
/// fails permanently or exhausts its attempts; [`RunError::Cancelled`];
/// [`RunError::Serde`] when the input or output does not convert to or from JSON.
///
/// # Panics
///
/// Outside a tokio runtime with the time driver enabled (timeouts and backoff use
/// it; `#[tokio::main]` and `#[tokio::test]` enable it).
pub async fn execute<W: Workflow>(input: W::Input) -> Result<W::Output, RunError> {
    execute_with::<W>(input, ExecuteOptions::default()).await
}

/// Runs workflow `W` on `input` in process with `options`.
///
/// ```
/// # use pgflow::{workflow, ExecuteOptions, StepContext, StepError};
/// pub struct Priced;
/// #[workflow]
/// impl Priced {
///     #[step]
///     async fn call(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
///         ctx.add_cost_cents(i64::from(*ctx.data::<u32>()?));
///         Ok(n)
///     }
/// }
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cost = pgflow::CostMeter::new();
/// let opts = ExecuteOptions::new().data(5_u32).cost(cost.clone()).json_roundtrip(true);
/// assert_eq!(pgflow::execute_with::<Priced>(1, opts).await.unwrap(), 1);
/// assert_eq!(cost.total(), 5);
/// # }
/// ```
///
/// # Errors
///
/// As for [`execute`].
pub async fn execute_with<W: Workflow>(
    input: W::Input,
    options: ExecuteOptions,
) -> Result<W::Output, RunError> {
    let def = W::definition();
    let input = StepValue::typed(input, def.input());
    let out = execute_definition(def, input, &options).await?;
    out.into_typed::<W::Output>().map_err(|e| RunError::Serde {
        workflow: def.name().to_owned(),
        message: format!("output: {}", e.message()),
    })
}

/// A step (or one element of a map step) that finished all its attempts.
struct Finished {
    step: usize,
    element: Option<usize>,
    /// (the error boxed: most steps succeed, and a finished step is moved a few
    /// times)
    result: Result<StepOutput, Box<RunError>>,
}

type Running = FuturesUnordered<BoxFuture<'static, Finished>>;

static NEXT_RUN_ID: AtomicI64 = AtomicI64::new(1);

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

/// What all steps of an in-process run share (their contexts too: see
/// [`StepContext`]'s `scope`). The cost meter and signals the options did not give
/// are made when first read (most runs read neither); without a cancel token from
/// the options, the run cannot be cancelled.
pub(crate) struct Shared {
    run_id: RunId,
    pub(crate) data: Option<Arc<Data>>,
    cost: OnceLock<CostMeter>,
    cancel: Option<CancelToken>,
    signals: OnceLock<crate::Signals>,
    json_roundtrip: bool,
    budget_cents: Option<i64>,
    budget_tokens: Option<i64>,
    reserved: std::sync::Mutex<Reserved>,
    transaction: Option<crate::Transaction>,
}

/// The value of a step (or of the input) for the steps that consume it.
enum Slot {
    /// Not produced yet, or moved into its last consumer.
    Empty,
    Value(StepValue),
    /// A conditional step that was skipped: its consumers receive `None`.
    Skipped,
}

/// A step (or the input, last) in a run: its value, how many parameters still have
/// to consume it, and how many of its parents it still waits for.
struct Node {
    value: Slot,
    uses: u32,
    waiting: usize,
}

/// What a replay gives a step in advance instead of calling it (see
/// [`crate::replay`]).
pub(crate) enum Injected {
    /// The step completes with this output (or is skipped) as soon as it is ready:
    /// its body and predicate are not called, and its inputs are dropped.
    Output(StepOutput),
    /// A map step: the outputs of some elements, by element index; only the other
    /// elements run.
    Elements(Vec<Option<StepValue>>),
}

/// What a replay changes in a run: the id the steps see and, per step, what is
/// injected.
pub(crate) struct Injection {
    pub(crate) run_id: RunId,
    /// One per step, in declaration order.
    pub(crate) steps: Vec<Option<Injected>>,
}

/// The elements of a map step still running, and the outputs of those done.
struct MapState {
    outputs: Vec<Option<StepValue>>,
    remaining: usize,
}

/// The state of one in-process run.
struct Run<'o> {
    def: &'static WorkflowDef,
    options: &'o ExecuteOptions,
    shared: Arc<Shared>,
    /// One per step, then the input.
    nodes: Vec<Node>,
    /// One per step once a map step starts (none before: most runs have none).
    maps: Vec<Option<MapState>>,
    /// Made when the first step has to wait.
    running: Option<Running>,
    /// Steps (or elements) that finished without waiting: most finish in their first
    /// poll, which the executor makes at once (see [`Run::spawn`]).
    done: Done,
    /// What a replay injects, per step (`None` outside a replay: one check per step).
    injected: Option<Vec<Option<Injected>>>,
}

/// What finished without waiting, in the order it finished (the first entry needs
/// no allocation: in a chain, one step at a time is done), and the first failure,
/// which comes before everything else: once a step failed for good, no other step
/// starts and the run fails with that failure.
#[derive(Default)]
struct Done {
    failed: Option<Finished>,
    first: Option<Finished>,
    rest: std::collections::VecDeque<Finished>,
}

impl Run<'_> {
    fn push_done(&mut self, finished: Finished) {
        let done = &mut self.done;
        if finished.result.is_err() {
            done.failed.get_or_insert(finished);
        } else if done.first.is_none() && done.rest.is_empty() {
            done.first = Some(finished);
        } else {
            done.rest.push_back(finished);
        }
    }

    fn pop_done(&mut self) -> Option<Finished> {
        let done = &mut self.done;
        done.failed
            .take()
            .or_else(|| done.first.take())
            .or_else(|| done.rest.pop_front())
    }

    fn serde_err(&self, e: &StepError) -> RunError {
        RunError::Serde {
            workflow: self.def.name().to_owned(),
            message: e.message().to_owned(),
        }
    }

    fn internal(&self, message: String) -> RunError {
        RunError::Internal {
            workflow: self.def.name().to_owned(),
            message,
        }
    }

    /// Takes (or copies, for all but its last consumer) the values of `step`'s
    /// parameters; `None` for a skipped step's output.
    fn inputs(&mut self, step: &'static StepDef) -> Result<Vec<Option<StepValue>>, RunError> {
        step.params().iter().map(|p| self.input(step, p)).collect()
    }

    /// The value of one of `step`'s parameters (see [`Run::inputs`]).
    fn input(
        &mut self,
        step: &'static StepDef,
        p: &crate::workflow::Param,
    ) -> Result<Option<StepValue>, RunError> {
        let slot = match p.source {
            ParamSource::Input => self.def.steps().len(),
            ParamSource::Step(i) => i,
            // given when the signal comes (see `run_with_retries`)
            ParamSource::Signal => return Ok(None),
        };
        let node = &mut self.nodes[slot];
        node.uses -= 1;
        match &node.value {
            Slot::Skipped => Ok(None),
            Slot::Value(_) if node.uses == 0 => {
                match std::mem::replace(&mut node.value, Slot::Empty) {
                    Slot::Value(v) => Ok(Some(v)),
                    _ => Ok(None),
                }
            }
            Slot::Value(v) => v.backup().map(Some).map_err(|e| self.serde_err(&e)),
            Slot::Empty => Err(self.internal(format!(
                "no value for `{}` of step `{}`",
                p.name,
                step.name()
            ))),
        }
    }

    /// Counts `step`'s parameters as consumed without taking their values (an
    /// injected step): a slot whose last consumer this was is freed.
    fn release_inputs(&mut self, step: &'static StepDef) {
        let input_slot = self.def.steps().len();
        for p in step.params() {
            let slot = match p.source {
                ParamSource::Input => input_slot,
                ParamSource::Step(i) => i,
                ParamSource::Signal => continue,
            };
            let node = &mut self.nodes[slot];
            node.uses -= 1;
            if node.uses == 0 && matches!(node.value, Slot::Value(_)) {
                node.value = Slot::Empty;
            }
        }
    }

    /// Queues `step` (or one element of it) as finished with `output`, not called.
    fn finish_now(&mut self, step: &'static StepDef, element: Option<usize>, output: StepOutput) {
        self.push_done(Finished {
            step: step.index(),
            element,
            result: Ok(output),
        });
    }

    /// Starts `step`: one future, or one per element of a map step. An injected step
    /// (a replay) finishes at once with its injected output instead.
    fn start(&mut self, step: &'static StepDef) -> Result<(), RunError> {
        let mut given = None;
        if let Some(injected) = &mut self.injected {
            match injected.get_mut(step.index()).and_then(Option::take) {
                Some(Injected::Output(output)) => {
                    self.release_inputs(step);
                    self.finish_now(step, None, output);
                    return Ok(());
                }
                Some(Injected::Elements(elements)) => given = Some(elements),
                None => {}
            }
        }
        let def = self.def;
        let Some(map) = step.map() else {
            let inputs = match step.params() {
                [one] => StepInputs::one(def.name(), step.name(), self.input(step, one)?),
                _ => StepInputs::with_skipped(def.name(), step.name(), self.inputs(step)?),
            };
            self.spawn(step, None, inputs);
            return Ok(());
        };
        let mut values = self.inputs(step)?;
        let over = values
            .get_mut(map.param())
            .and_then(Option::take)
            .ok_or_else(|| {
                self.internal(format!(
                    "no value for map step `{}` to map over",
                    step.name()
                ))
            })?;
        let items = map.split(over).map_err(|e| {
            RunError::step_failed(
                def.name(),
                step.name(),
                None,
                vec![AttemptFailure::new(1, &e)],
            )
        })?;
        if items.is_empty() {
            let result = map
                .collect(Vec::new())
                .map(StepOutput::Completed)
                .map_err(|e| Box::new(self.serde_err(&e)));
            self.push_done(Finished {
                step: step.index(),
                element: None,
                result,
            });
            return Ok(());
        }
        let n = items.len();
        if self.maps.is_empty() {
            self.maps.resize_with(def.steps().len(), || None);
        }
        self.maps[step.index()] = Some(MapState {
            outputs: (0..n).map(|_| None).collect(),
            remaining: n,
        });
        for (e, item) in items.into_iter().enumerate() {
            if let Some(output) = given.as_mut().and_then(|g| g.get_mut(e)?.take()) {
                self.finish_now(step, Some(e), StepOutput::Completed(output));
                continue;
            }
            let mut own = if e + 1 == n {
                std::mem::take(&mut values)
            } else {
                values
                    .iter()
                    .map(|v| v.as_ref().map(StepValue::backup).transpose())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| self.serde_err(&e))?
            };
            own[map.param()] = Some(item);
            let inputs = StepInputs::with_skipped(def.name(), step.name(), own);
            self.spawn(step, Some(e), inputs);
        }
        Ok(())
    }

    /// Runs `step` (or one element of it): its first attempt is begun at once, and
    /// one that finishes in its first poll (a step that awaits nothing, or nothing
    /// that is not ready) is done without a future of its own; the others, and steps
    /// with a delay, a signal or the lent transaction, run as futures of the run.
    fn spawn(&mut self, step: &'static StepDef, element: Option<usize>, inputs: StepInputs) {
        if self.done.failed.is_some() {
            return; // the run fails: nothing more starts
        }
        let def = self.def;
        let shared = &self.shared;
        let slow = !step.options().delay.is_zero()
            || step.signal().is_some()
            || (step.transactional() && shared.transaction.is_some());
        let (inputs, begun) = if slow {
            (Some(inputs), None)
        } else {
            match begin_first(def, step, element, inputs, shared) {
                First::Done(result) => {
                    self.push_done(Finished {
                        step: step.index(),
                        element,
                        result,
                    });
                    return;
                }
                First::Later(begun) => (None, Some(begun)),
            }
        };
        let shared = Arc::clone(&self.shared);
        self.running
            .get_or_insert_with(Running::new)
            .push(Box::pin(async move {
                Finished {
                    step: step.index(),
                    element,
                    result: run_with_retries(def, step, element, inputs, &shared, begun)
                        .await
                        .map_err(Box::new),
                }
            }));
    }

    /// Applies what finished. Returns the workflow's output once the terminal step
    /// is done.
    fn finished(&mut self, f: Finished) -> Result<Option<StepValue>, RunError> {
        let def = self.def;
        let index = f.step;
        let output = match f.result.map_err(|e| *e)? {
            StepOutput::Completed(v) if self.options.json_roundtrip => StepOutput::Completed(
                v.into_json()
                    .map_err(|e| step_serde_error(def, index, f.element, &e))?,
            ),
            other => other,
        };
        let output = match f.element {
            None => output,
            Some(e) => {
                let StepOutput::Completed(value) = output else {
                    return Err(
                        self.internal(format!("an element of map step {index} was skipped"))
                    );
                };
                let Some(state) = self.maps.get_mut(index).and_then(Option::as_mut) else {
                    return Err(self.internal(format!("map step {index} has no state")));
                };
                state.outputs[e] = Some(value);
                state.remaining -= 1;
                if state.remaining > 0 {
                    return Ok(None);
                }
                let outputs = self.maps[index]
                    .take()
                    .map(|s| s.outputs)
                    .unwrap_or_default()
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| self.internal(format!("map step {index} lost an output")))?;
                let map = def.steps()[index]
                    .map()
                    .ok_or_else(|| self.internal(format!("step {index} is not a map step")))?;
                StepOutput::Completed(
                    map.collect(outputs)
                        .map_err(|e| step_serde_error(def, index, None, &e))?,
                )
            }
        };
        if index == def.terminal().index() {
            return def.finish(output).map(Some).map_err(|e| self.serde_err(&e));
        }
        self.nodes[index].value = match output {
            StepOutput::Completed(v) => Slot::Value(v),
            StepOutput::Skipped => Slot::Skipped,
            StepOutput::Subflow(s) => {
                return Err(self.internal(crate::value::unstarted_subflow(&s).message().to_owned()));
            }
        };
        for &child in def.plan().children(index) {
            let node = &mut self.nodes[child];
            node.waiting -= 1;
            if node.waiting == 0 {
                self.start(&def.steps()[child])?;
            }
        }
        Ok(None)
    }
}

/// Runs a definition on an input value (typed or JSON) and returns the workflow's
/// output value. This is the type-erased core of [`execute_with`].
///
/// # Errors
///
/// As for [`execute`].
pub async fn execute_definition(
    def: &'static WorkflowDef,
    input: StepValue,
    options: &ExecuteOptions,
) -> Result<StepValue, RunError> {
    run_definition(def, input, options, None).await
}

/// [`execute_definition`] with what a replay injects.
pub(crate) async fn run_definition(
    def: &'static WorkflowDef,
    input: StepValue,
    options: &ExecuteOptions,
    injection: Option<Injection>,
) -> Result<StepValue, RunError> {
    let steps = def.steps();
    let plan = def.plan();
    let input = if options.json_roundtrip {
        input.into_json().map_err(|e| RunError::Serde {
            workflow: def.name().to_owned(),
            message: e.message().to_owned(),
        })?
    } else {
        input
    };
    let consumers = def.consumers.get_or_init(|| count_consumers(def));
    let mut nodes: Vec<Node> = steps
        .iter()
        .zip(consumers.iter())
        .map(|(s, &uses)| Node {
            value: Slot::Empty,
            uses,
            waiting: s.parents().len(),
        })
        .collect();
    nodes.push(Node {
        value: Slot::Value(input),
        uses: consumers.get(steps.len()).copied().unwrap_or(0),
        waiting: 0,
    });
    let mut run = Run {
        def,
        options,
        shared: Arc::new(Shared {
            run_id: injection.as_ref().map_or_else(
                || RunId(NEXT_RUN_ID.fetch_add(1, Ordering::Relaxed)),
                |i| i.run_id,
            ),
            data: options.data.clone(),
            cost: options
                .cost
                .clone()
                .map_or_else(OnceLock::new, OnceLock::from),
            cancel: options.cancel.clone(),
            signals: options
                .signals
                .clone()
                .map_or_else(OnceLock::new, OnceLock::from),
            json_roundtrip: options.json_roundtrip,
            budget_cents: options.budget_cents,
            budget_tokens: options.budget_tokens,
            reserved: std::sync::Mutex::default(),
            transaction: options.transaction.clone(),
        }),
        nodes,
        maps: Vec::new(),
        running: None,
        done: Done::default(),
        injected: injection.map(|i| i.steps),
    };
    for &root in plan.roots() {
        run.start(&steps[root])?;
    }
    // The wait for the cancel is made once, the first time the run waits for a step
    // (not one registered and dropped again per finished step).
    let mut cancelled = None;
    loop {
        let finished = match (run.pop_done(), run.running.as_mut()) {
            (Some(_), _) if run.shared.is_cancelled() => {
                return Err(RunError::Cancelled {
                    workflow: def.name().to_owned(),
                });
            }
            (Some(finished), _) => finished,
            (None, Some(running)) if !running.is_empty() => {
                let next = match &options.cancel {
                    None => running.next().await,
                    Some(cancel) => {
                        let cancelled =
                            cancelled.get_or_insert_with(|| Box::pin(cancel.cancelled()));
                        tokio::select! {
                            biased;
                            () = cancelled.as_mut() => {
                                return Err(RunError::Cancelled { workflow: def.name().to_owned() });
                            }
                            next = running.next() => next,
                        }
                    }
                };
                let Some(finished) = next else { break };
                finished
            }
            (None, _) => break,
        };
        if let Some(output) = run.finished(finished)? {
            return Ok(output);
        }
    }
    Err(RunError::Internal {
        workflow: def.name().to_owned(),
        message: "the terminal step never became ready".to_owned(),
    })
}

/// For each value (the steps' outputs, then the input at `steps.len()`), how many
/// parameters consume it: the last consumer takes the value, the others a copy.
fn count_consumers(def: &WorkflowDef) -> Box<[u32]> {
    let steps = def.steps();
    let mut uses = vec![0_u32; steps.len() + 1];
    for param in steps.iter().flat_map(|s| s.params()) {
        match param.source {
            ParamSource::Input => uses[steps.len()] += 1,
            ParamSource::Step(i) => uses[i] += 1,
            ParamSource::Signal => {}
        }
    }
    uses.into_boxed_slice()
}

/// A step output that does not serialize, as that step's failure.
fn step_serde_error(
    def: &'static WorkflowDef,
    index: usize,
    element: Option<usize>,
    e: &StepError,
) -> RunError {
    let step = def.steps().get(index).map_or("?", |s| s.name());
    RunError::step_failed(
        def.name(),
        step,
        element,
        vec![crate::AttemptFailure::new(1, e)],
    )
}

/// Which end of an attempt [`bracket`] marks.
#[derive(Debug, Clone, Copy)]
enum Bracket {
    Begin,
    Commit,
    Rollback,
}

/// Begins, commits or rolls back one attempt's use of the lent transaction. A
/// failure there (the database refused) fails the run: its writes are in doubt.
async fn bracket(tx: &crate::Transaction, end: Bracket) -> Result<(), RunError> {
    let internal = |message: String| RunError::Internal {
        workflow: "(transaction)".to_owned(),
        message,
    };
    let mut lent = tx
        .take()
        .ok_or_else(|| internal("the lent transaction was not given back".to_owned()))?;
    let done = match end {
        Bracket::Begin => lent.begin().await,
        Bracket::Commit => lent.commit().await,
        Bracket::Rollback => lent.rollback().await,
    };
    tx.put(lent);
    done.map_err(|e| {
        internal(format!(
            "{end:?} of a step's transaction failed: {}",
            e.message()
        ))
    })
}

/// Runs the child run a step asked for, in this task, with the parent's data, cost
/// meter, cancel token and signals; the step completes with the child's output, or
/// fails permanently with the child's error (no retry: a retried step would not start
/// a second child in the durable runtime either).
async fn run_subflow(
    (def, step, element): (&'static WorkflowDef, &'static StepDef, Option<usize>),
    attempt: u32,
    mut history: Vec<AttemptFailure>,
    start: crate::SubflowStart,
    shared: &Shared,
) -> Result<StepOutput, RunError> {
    let (child, input) = start.into_parts();
    let options = ExecuteOptions {
        json_roundtrip: shared.json_roundtrip,
        data: shared.data.clone(),
        // shared with the parent: its later steps see the child's cost
        cost: Some(shared.cost().clone()),
        cancel: shared.cancel.clone(),
        signals: shared.signals.get().cloned(),
        // a child run has no budget of its own (durably, it is a run of its own);
        // its cost is in the shared meter, so the parent's later steps see it
        budget_cents: None,
        budget_tokens: None,
        transaction: shared.transaction.clone(),
    };
    // Boxed: a child may itself run subflows (the future is recursive).
    let run: BoxFuture<'_, Result<StepValue, RunError>> =
        Box::pin(run_definition(child, input, &options, None));
    match run.await {
        Ok(output) => Ok(StepOutput::Completed(output)),
        Err(RunError::Cancelled { .. }) if shared.is_cancelled() => Err(RunError::Cancelled {
            workflow: def.name().to_owned(),
        }),
        Err(e) => {
            // after the attempts that failed before this one, as stored durably
            history.push(AttemptFailure::new(
                attempt,
                &crate::subflow::child_failed(child.name(), None, &e),
            ));
            Err(RunError::step_failed(
                def.name(),
                step.name(),
                element,
                history,
            ))
        }
    }
}

/// Sleeps for `delay`; `false` when the run was cancelled first.
async fn sleep_unless_cancelled(delay: std::time::Duration, shared: &Shared) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shared.cancelled() => false,
    }
}

/// What [`begin_first`] made of a step's first attempt.
enum First {
    /// The step is done (or failed for good) without waiting.
    Done(Result<StepOutput, Box<RunError>>),
    /// It has to wait: for what it awaits, or to retry.
    Later(Begun),
}

/// A first attempt begun by [`begin_first`], for [`run_with_retries`] to go on with.
struct Begun {
    attempt: policy::Attempt,
    /// The inputs for the next attempt, if one may follow: the kept inputs, or a
    /// copy of them (see [`StepInputs::prepare`]).
    spare: Option<StepInputs>,
    /// What the attempt reserved of the run's budgets.
    held: (i64, i64),
}

/// The context of one attempt.
fn attempt_context(
    def: &'static WorkflowDef,
    step: &'static StepDef,
    element: Option<usize>,
    attempt: u32,
    shared: &Arc<Shared>,
) -> crate::context::StepContextBuilder {
    let ctx = StepContext::builder(def.name(), step.name())
        .run_id(shared.run_id)
        .attempt(attempt)
        .element(element);
    // Only a step that takes the context reads what the run shares (a reference
    // counted once per attempt: a tenth of a trivial step's cost).
    if step.takes_context() || step.transactional() {
        ctx.scope(Arc::clone(shared))
    } else {
        ctx
    }
}

/// Whether another attempt (or a snooze) may follow attempt `attempt` after
/// `snoozes` snoozes: then the inputs are kept, or copied, before the attempt takes
/// them (see [`StepInputs::prepare`]).
fn may_follow(step: &'static StepDef, attempt: u32, snoozes: u32) -> bool {
    let options = step.options();
    attempt < options.max_attempts.max(1) || snoozes < options.max_snoozes
}

/// The inputs for the attempt after one on `inputs`: the same, when they were kept,
/// else the `copy` [`StepInputs::prepare`] made (if any).
fn next_inputs(inputs: StepInputs, copy: Option<StepInputs>) -> Option<StepInputs> {
    if inputs.is_kept() { Some(inputs) } else { copy }
}

/// Begins the first attempt of a step without a delay, a signal or the lent
/// transaction, and polls it once (with a waker that does nothing: a step still
/// running is polled again, with the run's waker, as a future of the run). An
/// attempt that ended in that poll gives its budget reservation back at once, and
/// one that failed with no attempt to follow is the step's outcome at once.
fn begin_first(
    def: &'static WorkflowDef,
    step: &'static StepDef,
    element: Option<usize>,
    mut inputs: StepInputs,
    shared: &Arc<Shared>,
) -> First {
    if shared.is_cancelled() {
        return First::Done(Err(Box::new(RunError::Cancelled {
            workflow: def.name().to_owned(),
        })));
    }
    let held = match shared.reserve(def, step) {
        Ok(held) => held,
        Err(e) => return First::Done(Err(Box::new(e))),
    };
    let copy = inputs.prepare(may_follow(step, 1, 0));
    // made only if the step takes a context
    let make = || attempt_context(def, step, element, 1, shared).build();
    let ctx = crate::engine::ContextSource::Make(&make);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let outcome =
        match policy::begin_attempt(step, &mut inputs, ctx, &mut cx, policy::Clock::FirstWait) {
            running @ policy::Attempt::Running { .. } => {
                return First::Later(Begun {
                    attempt: running,
                    spare: next_inputs(inputs, copy),
                    held,
                });
            }
            policy::Attempt::Done(outcome) => outcome,
        };
    shared.release(held);
    let outcome = outcome.and_then(|out| policy::storable(&out).map(|()| out));
    let outcome = match outcome {
        Ok(out @ (StepOutput::Completed(_) | StepOutput::Skipped)) => return First::Done(Ok(out)),
        other => other,
    };
    // a subflow to start, or a retry or snooze to wait for (decided again by
    // `run_with_retries`, which waits)
    let spare = next_inputs(inputs, copy);
    let spare = match &outcome {
        Err(error) => match next_try(
            (def, step, element),
            (1, 0),
            error,
            spare,
            &mut Vec::new(),
            shared,
        ) {
            Err(failed) => return First::Done(Err(Box::new(failed))),
            Ok((_, spare)) => Some(spare),
        },
        Ok(_) => spare,
    };
    First::Later(Begun {
        attempt: policy::Attempt::Done(outcome),
        spare,
        held: (0, 0),
    })
}

/// What follows failed attempt `attempt` after `snoozes` snoozes: the delay before
/// the step runs again on `spare` (its kept inputs, or their copy), or the run's
/// error when it does not (the failure is then in `history`). A snooze is not a
/// failure: it is not recorded.
fn next_try(
    (def, step, element): (&'static WorkflowDef, &'static StepDef, Option<usize>),
    (attempt, snoozes): (u32, u32),
    error: &StepError,
    spare: Option<StepInputs>,
    history: &mut Vec<AttemptFailure>,
    shared: &Shared,
) -> Result<(std::time::Duration, StepInputs), RunError> {
    if error.kind() == ErrorKind::Cancelled || shared.is_cancelled() {
        return Err(RunError::Cancelled {
            workflow: def.name().to_owned(),
        });
    }
    let options = step.options();
    let fail = |history: &mut Vec<AttemptFailure>| {
        RunError::step_failed(def.name(), step.name(), element, std::mem::take(history))
    };
    let delay = match error.snoozed_for() {
        Some(delay) => match policy::snooze(options, snoozes) {
            Ok(()) => delay,
            Err(too_many) => {
                history.push(AttemptFailure::new(attempt, &too_many));
                return Err(fail(history));
            }
        },
        None => {
            history.push(AttemptFailure::new(attempt, error));
            if !error.is_retryable() || attempt >= options.max_attempts.max(1) {
                return Err(fail(history));
            }
            policy::retry_delay(options, attempt, error)
        }
    };
    // without a copy of the inputs (one that could not be made), this was the last
    spare
        .map(|spare| (delay, spare))
        .ok_or_else(|| fail(history))
}

/// Runs every attempt of one step until it succeeds, fails permanently or exhausts
/// its attempts, after the step's `delay`. While attempts (or snoozes) remain, the
/// inputs are kept for the next one (the entry clones what it takes) or, when one is
/// not `Clone`, copied first (see [`StepInputs::prepare`]). A snooze sleeps and runs
/// the same attempt again, up to the step's `max_snoozes`. With `begun`, the first attempt
/// was begun by [`begin_first`] (and `inputs` is `None`): this goes on from it.
async fn run_with_retries(
    def: &'static WorkflowDef,
    step: &'static StepDef,
    element: Option<usize>,
    mut inputs: Option<StepInputs>,
    shared: &Arc<Shared>,
    mut begun: Option<Begun>,
) -> Result<StepOutput, RunError> {
    let options = step.options();
    let mut history = Vec::new();
    let cancelled = || RunError::Cancelled {
        workflow: def.name().to_owned(),
    };
    if begun.is_none() {
        // The waits most steps never make are boxed where they happen: every step's
        // future is sized for the largest wait it could hold, and a small one is
        // allocated and freed on the allocator's fast path.
        if !options.delay.is_zero()
            && !Box::pin(sleep_unless_cancelled(options.delay, shared)).await
        {
            return Err(cancelled());
        }
        if let Some(signal) = step.signal() {
            // Waits holding nothing but this future; `None` (JSON `null`) on timeout.
            let payload = Box::pin(async {
                tokio::select! {
                    p = shared.signals().wait(signal.name, signal.timeout) => Some(p),
                    () = shared.cancelled() => None,
                }
            })
            .await;
            let Some(payload) = payload else {
                return Err(cancelled());
            };
            let json = payload.unwrap_or_else(|| {
                serde_json::value::RawValue::from_string("null".to_owned())
                    .unwrap_or_else(|_| unreachable!("`null` is JSON"))
            });
            if let Some(inputs) = &mut inputs {
                inputs.put(signal.param, StepValue::Json(json));
            }
        }
    }
    let mut attempt = 1;
    let mut snoozes = 0;
    loop {
        let (attempt_result, spare) = match begun.take() {
            Some(begun) => {
                let result = begun
                    .attempt
                    .finish()
                    .await
                    .and_then(|out| policy::storable(&out).map(|()| out));
                shared.release(begun.held);
                (result, begun.spare)
            }
            None => {
                if shared.is_cancelled() {
                    return Err(cancelled());
                }
                let Some(mut current) = inputs.take() else {
                    return Err(RunError::Internal {
                        workflow: def.name().to_owned(),
                        message: format!("no inputs for attempt {attempt} of `{}`", step.name()),
                    });
                };
                // Keep the inputs (or a copy) for the next attempt or snooze; without
                // either, this is the last.
                let copy = current.prepare(may_follow(step, attempt, snoozes));
                let mut ctx = attempt_context(def, step, element, attempt, shared);
                // A transactional step's attempt holds the lent transaction (one at a
                // time), between `begin` and `commit` or `rollback`.
                let held = shared.reserve(def, step)?;
                let lent = shared.transaction.as_ref().filter(|_| step.transactional());
                let turn = match lent {
                    Some(tx) => Some(Box::pin(tx.turn()).await),
                    None => None,
                };
                if let Some(tx) = lent {
                    ctx = ctx.transaction(tx.clone());
                    if let Err(e) = Box::pin(bracket(tx, Bracket::Begin)).await {
                        shared.release(held);
                        return Err(e);
                    }
                }
                let attempt_result = policy::run_attempt_from(
                    step,
                    &mut current,
                    ctx.build(),
                    policy::Clock::FirstWait,
                )
                .await
                .and_then(|out| policy::storable(&out).map(|()| out));
                shared.release(held);
                if let Some(tx) = lent {
                    let end = if attempt_result.is_ok() {
                        Bracket::Commit
                    } else {
                        Bracket::Rollback
                    };
                    Box::pin(bracket(tx, end)).await?;
                }
                drop(turn);
                (attempt_result, next_inputs(current, copy))
            }
        };
        let error = match attempt_result {
            Ok(StepOutput::Subflow(start)) => {
                return Box::pin(run_subflow(
                    (def, step, element),
                    attempt,
                    history,
                    start,
                    shared,
                ))
                .await;
            }
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let snoozed = error.snoozed_for().is_some();
        let (delay, spare) = next_try(
            (def, step, element),
            (attempt, snoozes),
            &error,
            spare,
            &mut history,
            shared,
        )?;
        if !Box::pin(sleep_unless_cancelled(delay, shared)).await {
            return Err(cancelled());
        }
        inputs = Some(spare);
        if snoozed {
            snoozes += 1;
        } else {
            attempt += 1;
        }
    }
}
