//! The policy of running one step attempt, shared by both executors: call the
//! type-erased entry (which deserializes the inputs and calls the user's function),
//! drop it when it outlives the step's timeout, catch a panic with its message, and
//! compute the delay before the next attempt.
//!
//! ```
//! use std::time::Duration;
//! use pgflow::engine::policy;
//! use pgflow::{StepError, StepOptions};
//!
//! let opts = StepOptions { backoff: Duration::from_millis(100), ..StepOptions::DEFAULT };
//! let d = policy::retry_delay(&opts, 3, &StepError::retryable("flaky"));
//! // attempt 3 failed: base 100 ms x 2^2 = 400 ms, with jitter in [200 ms, 400 ms]
//! assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
//! let d = policy::retry_delay(&opts, 3, &StepError::retry_after(Duration::from_secs(7), "429"));
//! assert_eq!(d, Duration::from_secs(7));
//! ```

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::engine::{ContextSource, StepInputs, StepOutput};
use crate::{StepContext, StepDef, StepError, StepOptions};

/// The longest delay between two attempts, whatever the backoff and attempt count.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);

/// Runs one attempt of `step`: its entry under the step's timeout, with panics caught.
/// For a conditional step the entry evaluates the predicate first (a panicking
/// predicate is a failed attempt like any panic) and returns
/// [`StepOutput::Skipped`] when it is false; a map step's entry is run once per
/// element.
///
/// # Panics
///
/// Outside a tokio runtime with the time driver enabled (`#[tokio::main]` and
/// `#[tokio::test]` enable it).
///
/// # Errors
///
/// The step's own error; [`StepError::timeout`] when it outlives its timeout (the
/// future is dropped); [`StepError::panic`] with the panic message. Whether the
/// output can be stored is the executor's next question ([`storable`]).
pub async fn run_attempt(
    step: &StepDef,
    inputs: StepInputs,
    ctx: StepContext,
) -> Result<StepOutput, StepError> {
    // (by value into the first poll: the inputs, a stored input can be large, are
    // dropped as soon as the entry has taken them, not when the attempt ends)
    begin_then_finish(move |cx| {
        let mut inputs = inputs;
        begin_attempt(
            step,
            &mut inputs,
            ContextSource::Given(ctx),
            cx,
            Clock::Start,
        )
    })
    .await
}

/// [`run_attempt`] on inputs that may be kept for a next attempt (see
/// [`StepInputs::prepare`]), with its timeout counted from `clock`.
pub(crate) async fn run_attempt_from(
    step: &StepDef,
    inputs: &mut StepInputs,
    ctx: StepContext,
    clock: Clock,
) -> Result<StepOutput, StepError> {
    begin_then_finish(|cx| begin_attempt(step, inputs, ContextSource::Given(ctx), cx, clock)).await
}

/// Begins an attempt with `begin` in its first poll (with the task's context), then
/// waits for its outcome.
async fn begin_then_finish(
    begin: impl FnOnce(&mut Context<'_>) -> Attempt,
) -> Result<StepOutput, StepError> {
    let mut begin = Some(begin);
    let begun = std::future::poll_fn(|cx| match begin.take() {
        Some(begin) => Poll::Ready(begin(cx)),
        None => Poll::Pending,
    })
    .await;
    begun.finish().await
}

/// Where an attempt's timeout counts from (see [`begin_attempt`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clock {
    /// From before its first poll: the durable runtime's, whose lease on the task
    /// covers the timeout from the attempt's start.
    Start,
    /// From the end of its first poll, when it has to wait: the in-process
    /// executor's, where a step that finishes in that poll reads no clock.
    FirstWait,
}

/// Calls `step`'s entry and polls its future once with `cx`, under
/// [`run_attempt`]'s policy: the executors begin every attempt so, and only an
/// attempt still running after its first poll registers a timer (a timer entry costs
/// more than a step that awaits nothing). Its timeout counts from `clock`. Either way
/// a timeout stops a step at an `.await`, never in the middle of synchronous work.
pub(crate) fn begin_attempt(
    step: &StepDef,
    inputs: &mut StepInputs,
    ctx: ContextSource<'_>,
    cx: &mut Context<'_>,
    clock: Clock,
) -> Attempt {
    // (before the entry, which deserializes the inputs: the durable lease covers that)
    let started = (clock == Clock::Start).then(tokio::time::Instant::now);
    let entry = step.entry();
    let fut = match catch_unwind(AssertUnwindSafe(|| entry(inputs, ctx))) {
        Ok(fut) => fut,
        Err(payload) => {
            return Attempt::Done(Err(StepError::panic(panic_message(payload.as_ref()))));
        }
    };
    let mut fut = CatchUnwind(fut);
    match Pin::new(&mut fut).poll(cx) {
        Poll::Ready(outcome) => Attempt::Done(outcome_of(outcome)),
        Poll::Pending => {
            let timeout = step.options().timeout;
            let deadline = started
                .unwrap_or_else(tokio::time::Instant::now)
                .checked_add(timeout);
            Attempt::Running {
                fut,
                deadline,
                timeout,
            }
        }
    }
}

/// An attempt after its first poll (see [`begin_attempt`]).
pub(crate) enum Attempt {
    /// It finished in that poll.
    Done(Result<StepOutput, StepError>),
    /// It awaits something; `deadline` is `None` for a timeout past the clock's range.
    Running {
        fut: CatchUnwind<crate::__private::StepFuture>,
        deadline: Option<tokio::time::Instant>,
        timeout: Duration,
    },
}

impl Attempt {
    /// The attempt's outcome: at once if it is done, else when its future finishes or
    /// its deadline passes (the future is then dropped).
    pub(crate) async fn finish(self) -> Result<StepOutput, StepError> {
        match self {
            Self::Done(outcome) => outcome,
            Self::Running {
                fut,
                deadline: Some(deadline),
                timeout,
            } => {
                // (boxed: a timer is large, and most attempts never hold one)
                match Box::pin(tokio::time::timeout_at(deadline, fut)).await {
                    Err(_) => Err(StepError::timeout(timeout)),
                    Ok(outcome) => outcome_of(outcome),
                }
            }
            Self::Running {
                fut,
                deadline: None,
                ..
            } => outcome_of(fut.await),
        }
    }
}

/// The step's result, or its panic as a failed attempt.
fn outcome_of(
    outcome: Result<Result<StepOutput, StepError>, String>,
) -> Result<StepOutput, StepError> {
    match outcome {
        Err(panic) => Err(StepError::panic(panic)),
        Ok(result) => result,
    }
}

/// Checks that a step's output can be stored as JSON: no NaN or infinite float (a
/// permanent error naming where), and a panic in its `Serialize` is a failed
/// attempt. The in-process executor asks this of every typed output. The durable one
/// asks only when the output's JSON holds a `null` — a non-finite float cannot hide
/// anywhere else, since `serde_json` writes it as `null` — so that a plain output is
/// walked once (to serialize it), not twice.
///
/// # Errors
///
/// As said: a permanent error or a panic error.
pub fn storable(output: &StepOutput) -> Result<(), StepError> {
    match output {
        StepOutput::Completed(value) => value.check_storable(),
        StepOutput::Skipped => Ok(()),
        StepOutput::Subflow(start) => start.input().check_storable(),
    }
}

/// The delay before the attempt after failed attempt `attempt` (1-based): the
/// error's own [`StepError::retry_delay`] if it has one (capped at [`MAX_BACKOFF`]),
/// else exponential backoff
/// `backoff × 2^(attempt-1)` capped at [`MAX_BACKOFF`], with "equal jitter" (a
/// uniformly random delay in the upper half) so that retries of many tasks that
/// failed together spread out.
pub fn retry_delay(options: &StepOptions, attempt: u32, error: &StepError) -> Duration {
    if let Some(d) = error.retry_delay() {
        return d.min(MAX_BACKOFF);
    }
    let factor = 1_u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let full = options.backoff.saturating_mul(factor).min(MAX_BACKOFF);
    let half = full / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// Whether a step that has snoozed `snoozes` times may snooze once more.
///
/// ```
/// use pgflow::engine::policy;
/// use pgflow::StepOptions;
///
/// let opts = StepOptions { max_snoozes: 2, ..StepOptions::DEFAULT };
/// assert!(policy::snooze(&opts, 1).is_ok());
/// let e = policy::snooze(&opts, 2).unwrap_err();
/// assert!(e.is_permanent());
/// assert_eq!(e.message(), "the step snoozed 2 times, its `max_snoozes`; it fails");
/// ```
///
/// # Errors
///
/// A permanent error once `max_snoozes` is reached, so a bug cannot snooze forever.
pub fn snooze(options: &StepOptions, snoozes: u32) -> Result<(), StepError> {
    if snoozes < options.max_snoozes {
        Ok(())
    } else {
        Err(StepError::permanent(format!(
            "the step snoozed {snoozes} times, its `max_snoozes`; it fails"
        )))
    }
}

/// The message of a panic payload (`&str` or `String`; anything else is described).
///
/// ```
/// let payload = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
/// assert_eq!(pgflow::engine::policy::panic_message(payload.as_ref()), "boom 7");
/// ```
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Polls a future, turning a panic into `Err(message)`.
pub(crate) struct CatchUnwind<F>(F);

impl<F: Future + Unpin> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}
