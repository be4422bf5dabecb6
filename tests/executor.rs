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

/// The receiving end of a value sent from outside the run.
pub struct Later(std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<u32>>>);

pub struct AwaitsOutside;

#[workflow(name = "exec_awaits_outside")]
impl AwaitsOutside {
    #[step]
    async fn wait(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let rx = ctx.data::<Later>()?.0.lock().unwrap().take();
        let rx = rx.ok_or_else(|| StepError::permanent("no receiver"))?;
        let got = rx.await.map_err(|e| StepError::permanent(e.to_string()))?;
        Ok(n + got)
    }

    #[step]
    async fn after(wait: u32) -> Result<u32, StepError> {
        Ok(wait * 2)
    }
}

#[tokio::test]
async fn a_step_woken_from_outside_the_run_after_its_first_poll_completes() {
    // The executor polls a step once as soon as it is ready, before the step is a
    // future of the run; the waker the step registers later must still wake the run.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let opts = ExecuteOptions::new().data(Later(std::sync::Mutex::new(Some(rx))));
    let run = tokio::spawn(execute_with::<AwaitsOutside>(1, opts));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!run.is_finished());
    tx.send(20).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the run was not woken")
        .unwrap();
    assert_eq!(out.unwrap(), 42);
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

pub struct SharesABudget;

#[workflow(name = "exec_shares_a_budget", backoff = "1ms")]
impl SharesABudget {
    #[step(depends_on = [], estimate_cents = 10)]
    async fn flaky(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.add_cost_cents(1);
        if ctx.attempt() == 1 {
            return Err(StepError::retryable("the first try fails"));
        }
        Ok(input)
    }

    #[step(depends_on = [], estimate_cents = 10)]
    async fn steady(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.add_cost_cents(1);
        Ok(input)
    }

    #[step(depends_on = [flaky, steady])]
    async fn both(flaky: u32, steady: u32) -> Result<u32, StepError> {
        Ok(flaky + steady)
    }
}

#[tokio::test]
async fn an_attempt_that_fails_without_waiting_gives_its_reservation_back_at_once() {
    // Budget 15: `flaky`'s failed first try (estimate 10) must not still hold its
    // 10 when `steady` (estimate 10) asks, or `steady` would be refused.
    let cost = CostMeter::new();
    let opts = ExecuteOptions::new().budget_cents(15).cost(cost.clone());
    let out = execute_with::<SharesABudget>(2, opts).await;
    assert_eq!(out.unwrap(), 4);
    assert_eq!(cost.total(), 3);
}

pub struct FailsFirst;

#[workflow(name = "exec_fails_first", max_attempts = 1)]
impl FailsFirst {
    #[step(depends_on = [])]
    async fn broken(input: u32) -> Result<u32, StepError> {
        Err(StepError::permanent(format!("{input} is broken")))
    }

    #[step(depends_on = [])]
    async fn other(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        Ok(input)
    }

    #[step(depends_on = [broken, other])]
    async fn join(broken: u32, other: u32) -> Result<u32, StepError> {
        Ok(broken + other)
    }
}

pub struct FailingElement;

#[workflow(name = "exec_failing_element", max_attempts = 1)]
impl FailingElement {
    #[step(map)]
    async fn each(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        if n == 0 {
            return Err(StepError::permanent("element 0 fails"));
        }
        Ok(n)
    }
}

#[tokio::test]
async fn a_step_that_fails_for_good_without_waiting_stops_the_steps_after_it() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let err = execute_with::<FailsFirst>(7, opts).await.unwrap_err();
    assert!(
        matches!(&err, RunError::StepFailed { step, .. } if step == "broken"),
        "{err:?}"
    );
    assert_eq!(attempts.0.load(Ordering::SeqCst), 0, "`other` ran");
    // the elements of a map step after one that failed are not run either
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let err = execute_with::<FailingElement>((0..1_000).collect(), opts)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunError::StepFailed { step, element: Some(0), .. } if step == "each"),
        "{err:?}"
    );
    assert_eq!(attempts.0.load(Ordering::SeqCst), 1);
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
    // as JSON, the inputs are kept and parsed again by each attempt
    let opts = ExecuteOptions::new().json_roundtrip(true);
    let out = execute_with::<RetryNonClone>(Doc { text: "hi".into() }, opts)
        .await
        .unwrap();
    assert_eq!(out, "HI");
}

/// Counts its clones and knows whether it is one (neither is part of its JSON).
#[derive(Debug, Serialize, Deserialize)]
pub struct Counted {
    pub text: String,
    #[serde(skip)]
    pub clones: Arc<AtomicU32>,
    #[serde(skip)]
    pub original: bool,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            text: self.text.clone(),
            clones: Arc::clone(&self.clones),
            original: false,
        }
    }
}

pub struct RetryClone;

#[workflow(backoff = "1ms", max_attempts = 3)]
impl RetryClone {
    #[step]
    async fn shout(doc: Counted, ctx: &StepContext) -> Result<String, StepError> {
        let seen = ctx.data::<Arc<std::sync::Mutex<Vec<(String, bool)>>>>()?;
        seen.lock().unwrap().push((doc.text.clone(), doc.original));
        if ctx.attempt() < 3 {
            return Err(StepError::retryable("not yet"));
        }
        Ok(doc.text.to_uppercase())
    }
}

pub struct OnceOnly;

#[workflow(max_attempts = 1, max_snoozes = 0)]
impl OnceOnly {
    #[step]
    async fn shout(doc: Counted) -> Result<String, StepError> {
        assert!(doc.original, "the only attempt gets the input itself");
        Ok(doc.text.to_uppercase())
    }
}

#[tokio::test]
async fn a_retried_step_with_clone_inputs_gets_a_clone_per_attempt_and_keeps_the_original() {
    let clones = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, bool)>::new()));
    let doc = Counted {
        text: "hi".into(),
        clones: Arc::clone(&clones),
        original: true,
    };
    let opts = ExecuteOptions::new().data(Arc::clone(&seen));
    assert_eq!(execute_with::<RetryClone>(doc, opts).await.unwrap(), "HI");
    // every attempt saw the whole input: the executor kept the original, and each
    // attempt (each could be followed by a snooze) took a clone of it
    let clone = ("hi".to_owned(), false);
    assert_eq!(*seen.lock().unwrap(), [clone.clone(), clone.clone(), clone]);
    assert_eq!(clones.load(Ordering::SeqCst), 3);

    // an attempt nothing can follow takes the input itself
    let clones = Arc::new(AtomicU32::new(0));
    let doc = Counted {
        text: "once".into(),
        clones: Arc::clone(&clones),
        original: true,
    };
    assert_eq!(execute::<OnceOnly>(doc).await.unwrap(), "ONCE");
    assert_eq!(clones.load(Ordering::SeqCst), 0);
}

pub struct SkipThenRetry;

#[workflow(name = "exec_skip_then_retry", backoff = "1ms", max_attempts = 3)]
impl SkipThenRetry {
    #[step]
    async fn price(n: u64) -> Result<u64, StepError> {
        Ok(n)
    }

    #[step(when = Self::big)]
    async fn discount(price: u64) -> Result<u64, StepError> {
        Ok(price / 2)
    }

    #[step(depends_on = [price, discount])]
    async fn total(
        price: u64,
        discount: Option<u64>,
        ctx: &StepContext,
    ) -> Result<String, StepError> {
        if ctx.attempt() < 3 {
            return Err(StepError::retryable("not yet"));
        }
        Ok(format!("{price} {discount:?}"))
    }

    fn big(price: &u64) -> bool {
        *price > 100
    }
}

#[tokio::test]
async fn a_retried_step_gets_a_skipped_parents_none_in_every_attempt() {
    assert_eq!(
        execute::<SkipThenRetry>(7).await.unwrap(),
        "7 None".to_owned()
    );
    assert_eq!(
        execute::<SkipThenRetry>(300).await.unwrap(),
        "300 Some(150)".to_owned()
    );
    let opts = ExecuteOptions::new().json_roundtrip(true);
    assert_eq!(
        execute_with::<SkipThenRetry>(7, opts).await.unwrap(),
        "7 None".to_owned()
    );
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

/// What a step saw of the cancel, through its context.
#[derive(Default)]
pub struct SawCancel(std::sync::atomic::AtomicBool);

pub struct CancelsItself;

#[workflow(name = "exec_cancels_itself")]
impl CancelsItself {
    #[step]
    async fn first(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        assert!(!ctx.is_cancelled());
        ctx.data::<pgflow::CancelToken>()?.cancel();
        ctx.data::<Arc<SawCancel>>()?
            .0
            .store(ctx.is_cancelled(), Ordering::SeqCst);
        Ok(n)
    }

    #[step]
    async fn second(first: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        Ok(first)
    }
}

#[tokio::test]
async fn a_cancel_during_a_step_that_never_waits_is_seen_and_stops_the_next_step() {
    // Both steps finish in their first poll, so the executor runs them one after the
    // other without waiting: the step sees the cancel through its context, and the
    // executor sees it between the steps.
    let cancel = pgflow::CancelToken::new();
    let attempts = Arc::new(Attempts::default());
    let saw = Arc::new(SawCancel::default());
    let opts = ExecuteOptions::new()
        .cancel(cancel.clone())
        .data(cancel)
        .data(Arc::clone(&attempts))
        .data(Arc::clone(&saw));
    let res = execute_with::<CancelsItself>(1, opts).await;
    assert!(matches!(res, Err(RunError::Cancelled { .. })), "{res:?}");
    assert_eq!(attempts.0.load(Ordering::SeqCst), 0, "the second step ran");
    assert!(saw.0.load(Ordering::SeqCst), "ctx.is_cancelled() was false");
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

// ---------------------------------------------------------------------------------
// Conditional steps (`when`)

/// Counts the executions of a step body.
#[derive(Default)]
pub struct Ran(AtomicU32);

pub struct Review;

#[workflow(name = "exec_review", max_attempts = 1)]
impl Review {
    #[step]
    async fn draft(text: String) -> Result<String, StepError> {
        Ok(text.trim().to_owned())
    }

    #[step(when = Self::is_long)]
    async fn review(draft: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.data::<Arc<Ran>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok(format!("reviewed: {draft}"))
    }

    #[step(depends_on = [draft, review])]
    async fn publish(draft: String, review: Option<String>) -> Result<String, StepError> {
        Ok(review.unwrap_or_else(|| format!("as is: {draft}")))
    }

    /// The predicate takes references to the step's inputs (`&String` coerces to `&str`).
    fn is_long(draft: &str) -> bool {
        draft.len() > 10
    }
}

#[tokio::test]
async fn a_false_predicate_skips_the_step_and_its_child_gets_none() {
    for json_roundtrip in [false, true] {
        let ran = Arc::new(Ran::default());
        let opts = || {
            ExecuteOptions::new()
                .data(Arc::clone(&ran))
                .json_roundtrip(json_roundtrip)
        };
        let out = execute_with::<Review>(" short ".into(), opts())
            .await
            .unwrap();
        assert_eq!(out, "as is: short");
        assert_eq!(ran.0.load(Ordering::SeqCst), 0, "a skipped step never runs");
        let out = execute_with::<Review>("a much longer text".into(), opts())
            .await
            .unwrap();
        assert_eq!(out, "reviewed: a much longer text");
        assert_eq!(ran.0.load(Ordering::SeqCst), 1);
    }
}

pub struct SkipChain;

#[workflow(name = "exec_skip_chain", max_attempts = 1)]
impl SkipChain {
    #[step]
    async fn start(n: i64) -> Result<i64, StepError> {
        Ok(n)
    }

    #[step(when = Self::positive)]
    async fn double(n: i64) -> Result<i64, StepError> {
        Ok(n * 2)
    }

    /// Conditional on a conditional parent: its predicate sees the `Option`.
    #[step(when = Self::was_doubled)]
    async fn add_one(doubled: Option<i64>) -> Result<i64, StepError> {
        Ok(doubled.unwrap_or_default() + 1)
    }

    /// Every parent skipped: still runs, with `None`.
    #[step]
    async fn report(added: Option<i64>) -> Result<String, StepError> {
        Ok(format!("{added:?}"))
    }

    fn positive(n: &i64) -> bool {
        *n > 0
    }

    fn was_doubled(doubled: &Option<i64>) -> bool {
        doubled.is_some()
    }
}

#[tokio::test]
async fn skips_chain_and_a_child_of_only_skipped_parents_still_runs() {
    assert_eq!(execute::<SkipChain>(3).await.unwrap(), "Some(7)");
    assert_eq!(execute::<SkipChain>(-1).await.unwrap(), "None");
    let opts = ExecuteOptions::new().json_roundtrip(true);
    assert_eq!(execute_with::<SkipChain>(-1, opts).await.unwrap(), "None");
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Basket {
    pub cents: u64,
    pub vip: bool,
}

pub struct Discount;

#[workflow(name = "exec_discount", max_attempts = 1)]
impl Discount {
    #[step]
    async fn price(basket: Basket) -> Result<u64, StepError> {
        Ok(basket.cents)
    }

    #[step(when = Self::deserves_discount)]
    async fn discount(price: u64, input: Basket) -> Result<u64, StepError> {
        assert!(input.vip);
        Ok(price * 9 / 10)
    }

    #[step(depends_on = [price, discount])]
    async fn total(price: u64, discount: Option<u64>) -> Result<u64, StepError> {
        Ok(discount.unwrap_or(price))
    }

    /// Reads the workflow input through the step's `input` parameter.
    fn deserves_discount(price: &u64, input: &Basket) -> bool {
        input.vip && *price >= 1_000
    }
}

#[tokio::test]
async fn a_predicate_can_read_the_workflow_input() {
    let basket = |cents, vip| Basket { cents, vip };
    assert_eq!(
        execute::<Discount>(basket(2_000, true)).await.unwrap(),
        1_800
    );
    assert_eq!(
        execute::<Discount>(basket(2_000, false)).await.unwrap(),
        2_000
    );
    assert_eq!(execute::<Discount>(basket(500, true)).await.unwrap(), 500);
}

pub struct MaybeAlert;

#[workflow(name = "exec_maybe_alert", max_attempts = 1)]
impl MaybeAlert {
    #[step]
    async fn score(n: u32) -> Result<u32, StepError> {
        Ok(n * 10)
    }

    #[step(when = Self::is_high)]
    async fn alert(score: u32) -> Result<String, StepError> {
        Ok(format!("alert: {score}"))
    }

    fn is_high(score: &u32) -> bool {
        *score >= 50
    }
}

#[tokio::test]
async fn a_conditional_terminal_step_makes_the_output_an_option() {
    fn output_is_option<W: Workflow<Output = Option<String>>>() {}
    output_is_option::<MaybeAlert>();
    assert_eq!(
        execute::<MaybeAlert>(7).await.unwrap(),
        Some("alert: 70".to_owned())
    );
    assert_eq!(execute::<MaybeAlert>(2).await.unwrap(), None);
    let opts = || ExecuteOptions::new().json_roundtrip(true);
    assert_eq!(execute_with::<MaybeAlert>(2, opts()).await.unwrap(), None);
    assert_eq!(
        execute_with::<MaybeAlert>(9, opts()).await.unwrap(),
        Some("alert: 90".to_owned())
    );
    assert_eq!(
        MaybeAlert::definition().output().type_name,
        "Option<String>"
    );
}

// ---------------------------------------------------------------------------------
// Map steps (`map`)

pub struct Squares;

#[workflow(name = "exec_squares", max_attempts = 1)]
impl Squares {
    /// A root map step: the workflow input is a `Vec<u64>`.
    #[step(map)]
    async fn square(n: u64, ctx: &StepContext) -> Result<u64, StepError> {
        assert_eq!(ctx.element().map(|e| e as u64), Some(n));
        // Later elements finish first: the output order must not follow completion.
        for _ in 0..(1_000 - n % 1_000) % 17 {
            tokio::task::yield_now().await;
        }
        Ok(n * n)
    }

    #[step]
    async fn sum(squares: Vec<u64>) -> Result<(u64, Vec<u64>), StepError> {
        Ok((squares.iter().sum(), squares))
    }
}

#[tokio::test]
async fn a_map_runs_once_per_element_and_keeps_the_input_order() {
    for n in [0_u64, 1, 1_000] {
        for json_roundtrip in [false, true] {
            let input: Vec<u64> = (0..n).collect();
            let opts = ExecuteOptions::new().json_roundtrip(json_roundtrip);
            let (sum, squares) = execute_with::<Squares>(input.clone(), opts).await.unwrap();
            let expected: Vec<u64> = input.iter().map(|n| n * n).collect();
            assert_eq!(squares, expected, "n={n} json={json_roundtrip}");
            assert_eq!(sum, expected.iter().sum::<u64>());
        }
    }
}

pub struct Shout;

#[workflow(name = "exec_shout", max_attempts = 1)]
impl Shout {
    #[step]
    async fn words(text: String) -> Result<Vec<String>, StepError> {
        Ok(text.split_whitespace().map(str::to_owned).collect())
    }

    /// A terminal map step over its parent's `Vec`, also reading the input.
    #[step(map)]
    async fn shout(word: String, input: String) -> Result<String, StepError> {
        Ok(format!("{}/{}", word.to_uppercase(), input.len()))
    }
}

#[tokio::test]
async fn a_terminal_map_step_outputs_the_vec_of_its_elements_outputs() {
    fn output_is_vec<W: Workflow<Output = Vec<String>>>() {}
    output_is_vec::<Shout>();
    assert_eq!(
        execute::<Shout>("ab cd e".into()).await.unwrap(),
        ["AB/7", "CD/7", "E/7"]
    );
    assert!(execute::<Shout>("  ".into()).await.unwrap().is_empty());
}

pub struct MapFlaky;

#[workflow(name = "exec_map_flaky", backoff = "1ms", max_attempts = 3)]
impl MapFlaky {
    #[step(map)]
    async fn check(n: i32, ctx: &StepContext) -> Result<i32, StepError> {
        ctx.data::<Arc<Attempts>>()?
            .0
            .fetch_add(1, Ordering::SeqCst);
        if n < 0 {
            return Err(StepError::retryable(format!("{n} is negative")));
        }
        if n % 10 == 3 && ctx.attempt() == 1 {
            return Err(StepError::retryable(format!("{n}: first attempt fails")));
        }
        Ok(n + 1)
    }
}

#[tokio::test]
async fn a_failing_element_is_retried_on_its_own() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let out = execute_with::<MapFlaky>((0..20).collect(), opts)
        .await
        .unwrap();
    assert_eq!(out, (1..=20).collect::<Vec<_>>());
    // elements 3 and 13 ran twice, the other 18 once
    assert_eq!(attempts.0.load(Ordering::SeqCst), 22);
}

#[tokio::test]
async fn an_exhausted_element_fails_the_run_with_its_index() {
    let attempts = Arc::new(Attempts::default());
    let opts = ExecuteOptions::new().data(Arc::clone(&attempts));
    let err = execute_with::<MapFlaky>(vec![1, 2, -5, 4], opts)
        .await
        .unwrap_err();
    let RunError::StepFailed {
        step,
        element,
        history,
        ..
    } = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((step.as_str(), *element), ("check", Some(2)));
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|h| h.message == "-5 is negative"));
    assert!(
        err.to_string().contains("at step `check` (element 2)"),
        "{err}"
    );
}

#[test]
fn conditional_and_map_steps_are_in_the_definition() {
    let review = Review::definition();
    assert_eq!(
        review.step("review").unwrap().kind(),
        pgflow::StepKind::Conditional
    );
    assert_eq!(
        review.step("review").unwrap().predicate(),
        Some("Self::is_long")
    );
    let d = review.describe();
    assert_eq!(d["steps"][1]["kind"], "conditional");
    assert_eq!(d["steps"][1]["when"], "Self::is_long");
    assert!(d["steps"][0].get("when").is_none());

    let squares = Squares::definition();
    assert_eq!(squares.input().type_name, "Vec<u64>");
    let step = squares.step("square").unwrap();
    assert_eq!(step.kind(), pgflow::StepKind::Map);
    assert_eq!(step.output().type_name, "Vec<u64>");
    let d = squares.describe();
    assert_eq!(d["steps"][0]["kind"], "map");
    assert_eq!(d["steps"][0]["map"]["param"], "n");
    assert_eq!(d["steps"][0]["map"]["item"], "u64");
    assert_eq!(d["steps"][0]["map"]["element_output"], "u64");
    assert_eq!(d["steps"][1]["params"][0]["type"], "Vec<u64>");
    assert_eq!(d["steps"][1]["kind"], "single");
}
