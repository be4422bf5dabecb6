//! The in-process executor: runs a workflow's step table in the current task, with
//! no database. Steps are called through their typed entries and values are moved
//! between them (no JSON unless asked for); independent branches run concurrently;
//! retries, backoff, timeouts and panics follow the same [`policy`](crate::policy)
//! as the durable runtime. It is how workflows are unit-tested.
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
//! makes them (and timeouts) instantaneous without changing behaviour.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;

use crate::workflow::ParamSource;
use crate::{
    AttemptFailure, CancelToken, CostMeter, Data, ErrorKind, RunError, RunId, StepContext, StepDef,
    StepError, StepInputs, StepValue, Workflow, WorkflowDef, policy,
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
    data: Data,
    cost: CostMeter,
    cancel: CancelToken,
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
        self.data.insert(value);
        self
    }

    /// The meter that the steps' `add_cost_cents` add to; read its total afterwards.
    pub fn cost(mut self, cost: CostMeter) -> Self {
        self.cost = cost;
        self
    }

    /// A token that cancels the run: no step starts after it is set, and running
    /// steps see it through `ctx.is_cancelled()`.
    pub fn cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
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

type Running = FuturesUnordered<BoxFuture<'static, (usize, Result<StepValue, RunError>)>>;

static NEXT_RUN_ID: AtomicI64 = AtomicI64::new(1);

struct Shared {
    run_id: RunId,
    data: Arc<Data>,
    cost: CostMeter,
    cancel: CancelToken,
}

/// Runs a definition on an input value (typed or JSON) and returns the terminal
/// step's output value. This is the type-erased core of [`execute_with`].
///
/// # Errors
///
/// As for [`execute`].
pub async fn execute_definition(
    def: &'static WorkflowDef,
    input: StepValue,
    options: &ExecuteOptions,
) -> Result<StepValue, RunError> {
    let steps = def.steps();
    let plan = def.plan();
    let input_slot = steps.len();
    let serde_err = |e: StepError| RunError::Serde {
        workflow: def.name().to_owned(),
        message: e.message().to_owned(),
    };
    let shared = Arc::new(Shared {
        run_id: RunId(NEXT_RUN_ID.fetch_add(1, Ordering::Relaxed)),
        data: Arc::new(options.data.clone()),
        cost: options.cost.clone(),
        cancel: options.cancel.clone(),
    });

    let mut slots: Vec<Option<StepValue>> = Vec::with_capacity(steps.len() + 1);
    slots.resize_with(steps.len(), || None);
    slots.push(Some(if options.json_roundtrip {
        input.into_json().map_err(serde_err)?
    } else {
        input
    }));
    let mut uses = plan.uses.clone();
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.parents().len()).collect();
    let mut running = Running::new();

    let mut start = |step: &'static StepDef,
                     slots: &mut Vec<Option<StepValue>>,
                     running: &mut Running|
     -> Result<(), RunError> {
        let mut values = Vec::with_capacity(step.params().len());
        for p in step.params() {
            let slot = match p.source {
                ParamSource::Input => input_slot,
                ParamSource::Step(i) => i,
            };
            uses[slot] -= 1;
            let value = if uses[slot] == 0 {
                slots[slot].take()
            } else {
                slots[slot]
                    .as_ref()
                    .map(StepValue::backup)
                    .transpose()
                    .map_err(serde_err)?
            };
            values.push(value.ok_or_else(|| RunError::Serde {
                workflow: def.name().to_owned(),
                message: format!(
                    "internal: no value for `{}` of step `{}`",
                    p.name,
                    step.name()
                ),
            })?);
        }
        let inputs = StepInputs::new(def.name(), step.name(), values);
        let shared = Arc::clone(&shared);
        running.push(Box::pin(async move {
            (
                step.index(),
                run_with_retries(def, step, inputs, &shared).await,
            )
        }));
        Ok(())
    };

    for &root in &plan.roots {
        start(&steps[root], &mut slots, &mut running)?;
    }
    let terminal = def.terminal().index();
    let cancelled = || RunError::Cancelled {
        workflow: def.name().to_owned(),
    };
    loop {
        let next = tokio::select! {
            next = running.next() => next,
            () = options.cancel.cancelled() => return Err(cancelled()),
        };
        let Some((index, result)) = next else { break };
        let value = result?;
        let value = if options.json_roundtrip {
            value
                .into_json()
                .map_err(|e| step_serde_error(def, index, &e))?
        } else {
            value
        };
        if index == terminal {
            return Ok(value);
        }
        slots[index] = Some(value);
        for &child in &plan.children[index] {
            waiting[child] -= 1;
            if waiting[child] == 0 {
                start(&steps[child], &mut slots, &mut running)?;
            }
        }
    }
    Err(RunError::Serde {
        workflow: def.name().to_owned(),
        message: "internal: the terminal step never became ready".to_owned(),
    })
}

/// A step output that does not serialize, as that step's failure.
fn step_serde_error(def: &'static WorkflowDef, index: usize, e: &StepError) -> RunError {
    let step = def.steps().get(index).map_or("?", |s| s.name());
    RunError::step_failed(
        def.name(),
        step,
        None,
        vec![crate::AttemptFailure::new(1, e)],
    )
}

/// Runs every attempt of one step until it succeeds, fails permanently or exhausts
/// its attempts. Each attempt gets the inputs themselves; while attempts remain, a
/// backup is taken first (a clone, or JSON for types that are not `Clone`) for the
/// next attempt.
async fn run_with_retries(
    def: &'static WorkflowDef,
    step: &'static StepDef,
    mut inputs: StepInputs,
    shared: &Shared,
) -> Result<StepValue, RunError> {
    let options = step.options();
    let max = options.max_attempts.max(1);
    let mut history = Vec::new();
    let fail = |history| RunError::step_failed(def.name(), step.name(), None, history);
    let cancelled = || RunError::Cancelled {
        workflow: def.name().to_owned(),
    };
    let mut attempt = 1;
    loop {
        if shared.cancel.is_cancelled() {
            return Err(cancelled());
        }
        // Keep a copy for the next attempt; without one, this attempt is the last.
        let spare = if attempt < max {
            inputs.backup().ok()
        } else {
            None
        };
        let last = spare.is_none();
        let ctx = StepContext::builder(def.name(), step.name())
            .run_id(shared.run_id)
            .attempt(attempt)
            .data(Arc::clone(&shared.data))
            .cost(shared.cost.clone())
            .cancel(shared.cancel.clone())
            .build();
        match policy::run_attempt(step, inputs, ctx).await {
            Ok(value) => return Ok(value),
            Err(error) => {
                if error.kind() == ErrorKind::Cancelled || shared.cancel.is_cancelled() {
                    return Err(cancelled());
                }
                history.push(AttemptFailure::new(attempt, &error));
                let Some(spare) = spare.filter(|_| error.is_retryable() && !last) else {
                    return Err(fail(history));
                };
                tokio::select! {
                    () = tokio::time::sleep(policy::retry_delay(options, attempt, &error)) => {}
                    () = shared.cancel.cancelled() => return Err(cancelled()),
                }
                inputs = spare;
                attempt += 1;
            }
        }
    }
}
