//! The in-process executor: chains, diamonds, concurrency, retries, timeouts, panics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{
    CostMeter, ErrorKind, ExecuteOptions, RunError, StepContext, StepError, Workflow, execute,
    execute_with, workflow,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub prompt: String,
    pub complexity: u8,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Routed {
    pub model: String,
    pub prompt: String,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub text: String,
    pub cost_cents: i64,
}

pub struct Chain;

#[workflow(name = "exec_chain", max_attempts = 1)]
impl Chain {
    #[step]
    async fn route(req: Request) -> Result<Routed, StepError> {
        let model = if req.complexity > 5 { "large" } else { "small" };
        Ok(Routed {
            model: model.into(),
            prompt: req.prompt,
        })
    }

    #[step]
    async fn call(routed: Routed, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_cost_cents(if routed.model == "large" { 10 } else { 1 });
        Ok(format!("{}:{}", routed.model, routed.prompt))
    }

    #[step]
    async fn record(text: String, input: Request, ctx: &StepContext) -> Result<Answer, StepError> {
        assert_eq!(ctx.step(), "record");
        Ok(Answer {
            text: format!("{text} (complexity {})", input.complexity),
            cost_cents: ctx.cost().total(),
        })
    }
}

#[tokio::test]
async fn chain_passes_each_output_to_the_next_step() {
    let req = Request {
        prompt: "hi".into(),
        complexity: 9,
    };
    let answer = execute::<Chain>(req.clone()).await.unwrap();
    assert_eq!(
        answer,
        Answer {
            text: "large:hi (complexity 9)".into(),
            cost_cents: 10
        }
    );
    // the same through JSON, as the durable runtime sees it
    let cost = CostMeter::new();
    let opts = ExecuteOptions::new()
        .json_roundtrip(true)
        .cost(cost.clone());
    let answer = execute_with::<Chain>(req, opts).await.unwrap();
    assert_eq!(answer.text, "large:hi (complexity 9)");
    assert_eq!(cost.total(), 10);
}

pub struct Diamond;

#[workflow]
impl Diamond {
    #[step]
    async fn split(input: u64) -> Result<Vec<u64>, StepError> {
        Ok((1..=input).collect())
    }

    #[step(depends_on = [split])]
    async fn sum(split: Vec<u64>) -> Result<u64, StepError> {
        Ok(split.iter().sum())
    }

    #[step(depends_on = [split])]
    async fn product(split: Vec<u64>) -> Result<u64, StepError> {
        Ok(split.iter().product())
    }

    #[step(depends_on = [product, sum])]
    async fn join(sum: u64, product: u64, input: u64) -> Result<String, StepError> {
        Ok(format!("n={input} sum={sum} product={product}"))
    }
}

#[tokio::test]
async fn diamond_fans_out_and_in() {
    assert_eq!(Diamond::NAME, "diamond");
    let def = Diamond::definition();
    assert_eq!(def.step("join").unwrap().parents(), [2, 1]);
    assert_eq!(
        execute::<Diamond>(5).await.unwrap(),
        "n=5 sum=15 product=120"
    );
    let opts = ExecuteOptions::new().json_roundtrip(true);
    assert_eq!(
        execute_with::<Diamond>(4, opts).await.unwrap(),
        "n=4 sum=10 product=24"
    );
}

/// Both branches wait on a two-party barrier: a sequential executor would hang on
/// the first branch forever, and the test would fail by its timeout.
pub struct Concurrent;

#[workflow]
impl Concurrent {
    #[step(depends_on = [], timeout = "10s", max_attempts = 1)]
    async fn left(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<tokio::sync::Barrier>>()?.wait().await;
        Ok(input + 1)
    }

    #[step(depends_on = [], timeout = "10s", max_attempts = 1)]
    async fn right(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<tokio::sync::Barrier>>()?.wait().await;
        Ok(input + 2)
    }

    #[step(depends_on = [left, right])]
    async fn both(left: u32, right: u32) -> Result<u32, StepError> {
        Ok(left * right)
    }
}

#[tokio::test]
async fn independent_branches_run_concurrently() {
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let opts = ExecuteOptions::new().data(barrier);
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        execute_with::<Concurrent>(10, opts),
    )
    .await
    .expect("the two branches did not run concurrently");
    assert_eq!(out.unwrap(), 11 * 12);
}

/// Counts attempts per test through shared data.
#[derive(Default)]
pub struct Attempts(AtomicU32);

pub struct Flaky;

#[workflow(backoff = "50ms")]
impl Flaky {
    #[step(max_attempts = 3)]
    async fn flaky(fail_times: u32, ctx: &StepContext) -> Result<String, StepError> {
        let n = ctx
            .data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst)
            + 1;
        assert_eq!(n, ctx.attempt());
        if n <= fail_times {
            // a std error through `?`: retryable
            let parsed: Result<u32, _> = format!("boom{n}").parse::<u32>();
            parsed?;
        }
        Ok(format!("ok after {n}"))
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_errors_are_retried_until_success() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let out = execute_with::<Flaky>(2, opts).await.unwrap();
    assert_eq!(out, "ok after 3");
    assert_eq!(attempts.0.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn exhausted_retries_fail_with_every_error_in_the_history() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let start = tokio::time::Instant::now();
    let err = execute_with::<Flaky>(5, opts).await.unwrap_err();
    assert_eq!(attempts.0.load(Ordering::SeqCst), 3);
    assert_eq!(err.failed_step(), Some("flaky"));
    let history = err.history();
    assert_eq!(history.len(), 3);
    for (i, h) in history.iter().enumerate() {
        assert_eq!(h.attempt, i as u32 + 1);
        assert_eq!(h.kind, ErrorKind::Retryable);
        assert!(h.message.contains("invalid digit"), "{}", h.message);
    }
    // backoff 50 ms: after attempt 1 in [25, 50] ms, after attempt 2 in [50, 100] ms
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(75) && waited <= Duration::from_millis(150),
        "{waited:?}"
    );
    assert!(err.to_string().contains("after 3 attempt(s)"), "{err}");
}

pub struct Permanent;

#[workflow(max_attempts = 5)]
impl Permanent {
    #[step]
    async fn validate(n: i32, ctx: &StepContext) -> Result<i32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        if n < 0 {
            return Err(StepError::permanent(format!("negative input {n}")));
        }
        Ok(n)
    }

    #[step]
    async fn after(n: i32) -> Result<i32, StepError> {
        Ok(n + 1)
    }
}

#[tokio::test]
async fn permanent_errors_fail_at_once() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let err = execute_with::<Permanent>(-3, opts).await.unwrap_err();
    assert_eq!(attempts.0.load(Ordering::SeqCst), 1);
    match &err {
        RunError::StepFailed { step, history, .. } => {
            assert_eq!(step, "validate");
            assert_eq!(history.len(), 1);
            assert_eq!(history[0].kind, ErrorKind::Permanent);
            assert_eq!(history[0].message, "negative input -3");
        }
        other => panic!("unexpected {other:?}"),
    }
}

pub struct Slow;

#[workflow]
impl Slow {
    #[step(timeout = "100ms", max_attempts = 2, backoff = "10ms")]
    async fn sleepy(ms: u64) -> Result<u64, StepError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_that_outlives_its_timeout_is_a_retryable_failure() {
    assert_eq!(execute::<Slow>(50).await.unwrap(), 50);
    let err = execute::<Slow>(10_000).await.unwrap_err();
    let history = err.history();
    assert_eq!(history.len(), 2, "timeouts are retried: {err}");
    assert!(history.iter().all(|h| h.kind == ErrorKind::Timeout));
    assert_eq!(history[0].message, "step timed out after 100ms");
}

pub struct Panicky;

#[workflow(max_attempts = 2, backoff = "1ms")]
impl Panicky {
    #[step]
    async fn explode(n: u32) -> Result<u32, StepError> {
        if n > 0 {
            panic!("exploded with {n}");
        }
        Ok(n)
    }
}

#[tokio::test]
async fn panics_are_caught_and_reported_with_their_message() {
    let err = execute::<Panicky>(7).await.unwrap_err();
    let history = err.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].kind, ErrorKind::Panic);
    assert_eq!(history[0].message, "step panicked: exploded with 7");
}

/// A type whose JSON form loses information: the round-trip option catches it.
#[derive(Debug, PartialEq)]
pub struct Lossy(u32);

impl Serialize for Lossy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for Lossy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32::deserialize(d).map(Lossy) // expects a number, but a string was written
    }
}

pub struct UsesLossy;

#[workflow(max_attempts = 1)]
impl UsesLossy {
    #[step]
    async fn make(n: u32) -> Result<Lossy, StepError> {
        Ok(Lossy(n))
    }

    #[step]
    async fn read(l: Lossy) -> Result<u32, StepError> {
        Ok(l.0)
    }
}

#[tokio::test]
async fn json_roundtrip_catches_serde_mistakes() {
    assert_eq!(execute::<UsesLossy>(3).await.unwrap(), 3);
    let opts = ExecuteOptions::new().json_roundtrip(true);
    let err = execute_with::<UsesLossy>(3, opts).await.unwrap_err();
    let history = err.history();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].kind, ErrorKind::Permanent);
    assert!(
        history[0].message.contains("step `read` parameter `l`")
            && history[0].message.contains("expected u32"),
        "{}",
        history[0].message
    );
}

#[tokio::test]
async fn steps_stay_callable_directly() {
    let ctx = StepContext::builder("exec_chain", "call").build();
    let routed = Routed {
        model: "small".into(),
        prompt: "p".into(),
    };
    assert_eq!(Chain::call(routed, &ctx).await.unwrap(), "small:p");
    assert_eq!(ctx.cost().total(), 1);
}

pub struct LossyOutput;

#[workflow]
impl LossyOutput {
    #[step]
    async fn make(n: u32) -> Result<Lossy, StepError> {
        Ok(Lossy(n))
    }
}

#[tokio::test]
async fn json_roundtrip_covers_the_workflow_output_too() {
    assert_eq!(execute::<LossyOutput>(3).await.unwrap(), Lossy(3));
    let opts = ExecuteOptions::new().json_roundtrip(true);
    let err = execute_with::<LossyOutput>(3, opts).await.unwrap_err();
    assert!(err.to_string().contains("expected u32"), "{err}");
}

/// Not `Clone`: a retry gets its input back from JSON.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    pub text: String,
}

pub struct RetryNonClone;

#[workflow(backoff = "1ms", max_attempts = 3)]
impl RetryNonClone {
    #[step]
    async fn shout(doc: Doc, ctx: &StepContext) -> Result<Doc, StepError> {
        if ctx.attempt() < 3 {
            return Err(StepError::retryable("not yet"));
        }
        Ok(Doc {
            text: doc.text.to_uppercase(),
        })
    }

    #[step]
    async fn after(doc: Doc) -> Result<String, StepError> {
        Ok(doc.text)
    }
}

#[tokio::test]
async fn a_retried_step_gets_its_inputs_again_even_without_clone() {
    let out = execute::<RetryNonClone>(Doc { text: "hi".into() })
        .await
        .unwrap();
    assert_eq!(out, "HI");
}

pub struct Stubborn;

#[workflow(backoff = "10m", max_attempts = 5)]
impl Stubborn {
    #[step]
    async fn fails(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        Err(StepError::retryable(format!("no {n}")))
    }
}

#[tokio::test]
async fn cancelling_during_a_backoff_returns_at_once() {
    let cancel = pgflow::CancelToken::new();
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new()
        .cancel(cancel.clone())
        .data(Arc::clone(&attempts));
    let run = tokio::spawn(execute_with::<Stubborn>(1, opts));
    while attempts.0.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    cancel.cancel();
    // the backoff is 5 to 10 minutes: only the cancellation can end this quickly
    let res = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("cancel did not interrupt the backoff")
        .unwrap();
    assert!(matches!(res, Err(RunError::Cancelled { .. })), "{res:?}");
}

pub struct ChecksCancel;

#[workflow]
impl ChecksCancel {
    #[step]
    async fn work(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.check_cancelled()?;
        Ok(n)
    }
}

#[tokio::test]
async fn a_step_that_sees_the_cancellation_ends_the_run_as_cancelled() {
    let cancel = pgflow::CancelToken::new();
    cancel.cancel();
    let res = execute_with::<ChecksCancel>(1, ExecuteOptions::new().cancel(cancel)).await;
    assert!(matches!(res, Err(RunError::Cancelled { .. })), "{res:?}");
}

/// Shapes the clippy run must see (trybuild cases are not linted): a root step with
/// no data parameter, unit outputs, a step with only the context.
pub struct Shapes;

#[workflow]
impl Shapes {
    #[step(depends_on = [])]
    async fn tick(ctx: &StepContext) -> Result<(), StepError> {
        ctx.add_cost_cents(1);
        Ok(())
    }

    #[step(depends_on = [])]
    async fn take(input: u8) -> Result<u8, StepError> {
        Ok(input)
    }

    #[step(depends_on = [tick, take])]
    async fn done(tick: (), take: u8) -> Result<u8, StepError> {
        let () = tick;
        Ok(take)
    }
}

#[tokio::test]
async fn roots_without_parameters_and_unit_outputs_run() {
    assert_eq!(execute::<Shapes>(4).await.unwrap(), 4);
}
