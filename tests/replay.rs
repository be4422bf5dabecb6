//! Reproducing a durable run offline: run a workflow against the real Postgres
//! (`#[sqlx::test]`, a fresh database each), export the run with `admin::export`,
//! take it through JSON as `pgflow export` would print it, and replay it in process
//! with `pgflow::replay` — the failure first, then the fixed version.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{
    ExecuteOptions, Recorded, RecordedStatus, RunError, RunId, StepContext, StepError, workflow,
};
use pgflow_runtime::{Error, Runtime, admin};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::PgPool;

/// How often each step body ran, in production or in a replay.
#[derive(Debug, Default)]
pub struct Calls {
    load: AtomicU32,
    price: AtomicU32,
    total: AtomicU32,
}

impl Calls {
    fn counts(&self) -> [u32; 3] {
        [&self.load, &self.price, &self.total].map(|c| c.load(Ordering::SeqCst))
    }
}

fn calls(ctx: &StepContext) -> Result<&Arc<Calls>, StepError> {
    ctx.data::<Arc<Calls>>()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub sku: String,
    pub qty: u32,
    pub unit_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub lines: Vec<Line>,
    pub discount_cents: u64,
}

/// load -> price (one element per line) -> total, with `wrap` (for orders of more
/// than two lines) beside `price`. Version 1 has two bugs: a line without quantity
/// fails `price`, and a discount larger than the order fails `total`.
pub struct Invoice;

#[workflow(
    name = "replay_invoice",
    queue = "replay",
    max_attempts = 2,
    backoff = "10ms"
)]
impl Invoice {
    #[step]
    async fn load(order: Order, ctx: &StepContext) -> Result<Vec<Line>, StepError> {
        calls(ctx)?.load.fetch_add(1, Ordering::SeqCst);
        Ok(order.lines)
    }

    #[step(map)]
    async fn price(line: Line, ctx: &StepContext) -> Result<u64, StepError> {
        calls(ctx)?.price.fetch_add(1, Ordering::SeqCst);
        if line.qty == 0 {
            return Err(StepError::permanent(format!(
                "line `{}` has no quantity",
                line.sku
            )));
        }
        Ok(u64::from(line.qty) * line.unit_cents)
    }

    #[step(depends_on = [load], when = Self::is_large)]
    async fn wrap(load: Vec<Line>) -> Result<String, StepError> {
        Ok(format!("wrapped {} lines", load.len()))
    }

    #[step(depends_on = [price, wrap])]
    async fn total(
        price: Vec<u64>,
        wrap: Option<String>,
        input: Order,
        ctx: &StepContext,
    ) -> Result<String, StepError> {
        calls(ctx)?.total.fetch_add(1, Ordering::SeqCst);
        let sum: u64 = price.iter().sum();
        let Some(due) = sum.checked_sub(input.discount_cents) else {
            return Err(StepError::permanent(format!(
                "discount {} exceeds the total {sum}",
                input.discount_cents
            )));
        };
        Ok(format!(
            "{due} cents, {}",
            wrap.as_deref().unwrap_or("unwrapped")
        ))
    }

    fn is_large(load: &[Line]) -> bool {
        load.len() > 2
    }
}

/// The fix, deployed as version 2: the same steps and types; a line without
/// quantity costs nothing, and the discount is capped at the order's total.
pub struct InvoiceFixed;

#[workflow(
    name = "replay_invoice",
    version = 2,
    queue = "replay",
    max_attempts = 2,
    backoff = "10ms"
)]
impl InvoiceFixed {
    #[step]
    async fn load(order: Order, ctx: &StepContext) -> Result<Vec<Line>, StepError> {
        calls(ctx)?.load.fetch_add(1, Ordering::SeqCst);
        Ok(order.lines)
    }

    #[step(map)]
    async fn price(line: Line, ctx: &StepContext) -> Result<u64, StepError> {
        calls(ctx)?.price.fetch_add(1, Ordering::SeqCst);
        Ok(u64::from(line.qty) * line.unit_cents)
    }

    #[step(depends_on = [load], when = Self::is_large)]
    async fn wrap(load: Vec<Line>) -> Result<String, StepError> {
        Ok(format!("wrapped {} lines", load.len()))
    }

    #[step(depends_on = [price, wrap])]
    async fn total(
        price: Vec<u64>,
        wrap: Option<String>,
        input: Order,
        ctx: &StepContext,
    ) -> Result<String, StepError> {
        calls(ctx)?.total.fetch_add(1, Ordering::SeqCst);
        let due = price
            .iter()
            .sum::<u64>()
            .saturating_sub(input.discount_cents);
        Ok(format!(
            "{due} cents, {}",
            wrap.as_deref().unwrap_or("unwrapped")
        ))
    }

    fn is_large(load: &[Line]) -> bool {
        load.len() > 2
    }
}

fn line(sku: &str, qty: u32, unit_cents: u64) -> Line {
    Line {
        sku: sku.into(),
        qty,
        unit_cents,
    }
}

/// A runtime on the test database; `concurrency` 1 runs the elements of a map step
/// one after the other, in element order.
async fn runtime(pool: &PgPool, calls: &Arc<Calls>, concurrency: usize) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .instance_id("replay-test")
        .poll_interval(Duration::from_millis(50))
        .queue("replay", concurrency)
        .data(Arc::clone(calls))
        .start()
        .await
        .expect("the runtime starts")
}

/// Runs `order` durably with `Invoice` v1 to its end; returns the run and its outcome.
async fn run_durably(
    pool: &PgPool,
    order: Order,
    concurrency: usize,
) -> (RunId, Result<String, Error>) {
    let calls = Arc::new(Calls::default());
    let rt = runtime(pool, &calls, concurrency).await;
    let run = rt.start::<Invoice>(order).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("the run did not finish within 60 s");
    rt.shutdown().await.unwrap();
    (run.id(), outcome)
}

/// What `pgflow export` would print, read back as a test reads a file.
async fn export_as_json(pool: &PgPool, id: RunId) -> Recorded {
    let recorded = admin::export(pool, id).await.unwrap();
    let text = serde_json::to_string_pretty(&recorded).unwrap();
    let back: Recorded = serde_json::from_str(&text).unwrap();
    assert_eq!(back, recorded, "the export survives JSON");
    back
}

/// Replay options counting the calls.
fn counted() -> (ExecuteOptions, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    (ExecuteOptions::new().data(Arc::clone(&calls)), calls)
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_failed_run_is_exported_replayed_offline_and_the_fix_succeeds(pool: PgPool) {
    let order = Order {
        lines: vec![line("a", 2, 150), line("b", 1, 100)],
        discount_cents: 500,
    };
    let (id, outcome) = run_durably(&pool, order.clone(), 4).await;
    let Err(Error::Run(failure)) = outcome else {
        panic!("the run should fail: {outcome:?}");
    };
    assert_eq!(failure.failed_step(), Some("total"));

    let recorded = export_as_json(&pool, id).await;
    assert_eq!(
        (recorded.format, recorded.run_id, recorded.workflow.as_str()),
        (1, id.0, "replay_invoice")
    );
    assert_eq!((recorded.version, recorded.status.as_str()), (1, "failed"));
    assert_eq!(recorded.input, serde_json::to_value(&order).unwrap());
    assert_eq!(recorded.output, None);
    assert_eq!(recorded.run_error(), Some(failure.clone()));
    let steps: Vec<(&str, RecordedStatus)> = recorded
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        steps,
        [
            ("load", RecordedStatus::Completed),
            ("price", RecordedStatus::Completed),
            ("wrap", RecordedStatus::Skipped),
            ("total", RecordedStatus::Failed),
        ]
    );
    let price = recorded.step("price").unwrap();
    assert_eq!(price.output, Some(json!([300, 100])));
    assert_eq!(
        price.elements, None,
        "a completed map step's output holds them"
    );
    let wrap = recorded.step("wrap").unwrap();
    assert_eq!(
        wrap.reason.as_deref(),
        Some("`when = Self::is_large` was false")
    );
    let total = recorded.step("total").unwrap();
    assert_eq!(total.output, None);
    assert_eq!(
        total.errors,
        Some(
            json!([{"attempt": 1, "kind": "permanent", "message": "discount 500 exceeds the total 400"}])
        )
    );

    // Offline: the completed steps injected, only `total` runs, and fails as it did.
    let (opts, calls) = counted();
    let err = pgflow::replay::<Invoice>(recorded.clone())
        .inject_completed()
        .options(opts)
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.run_error(), Some(&failure));
    assert_eq!(calls.counts(), [0, 0, 1]);

    // The fix replays the same recording and succeeds, still calling only `total`.
    let (opts, calls) = counted();
    let out = pgflow::replay::<InvoiceFixed>(recorded)
        .inject_completed()
        .options(opts.json_roundtrip(true))
        .run()
        .await
        .unwrap();
    assert_eq!(out, "0 cents, unwrapped");
    assert_eq!(calls.counts(), [0, 0, 1]);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_map_step_failed_mid_way_replays_only_its_failed_element(pool: PgPool) {
    let order = Order {
        lines: vec![line("a", 1, 100), line("b", 2, 50), line("c", 0, 10)],
        discount_cents: 0,
    };
    let (id, outcome) = run_durably(&pool, order, 1).await;
    let Err(Error::Run(failure)) = outcome else {
        panic!("the run should fail: {outcome:?}");
    };
    let RunError::StepFailed { step, element, .. } = &failure else {
        panic!("{failure}");
    };
    assert_eq!((step.as_str(), *element), ("price", Some(2)));

    let recorded = export_as_json(&pool, id).await;
    let price = recorded.step("price").unwrap();
    assert_eq!(price.status, RecordedStatus::Failed);
    let elements: Vec<(u32, &serde_json::Value)> = price
        .elements
        .iter()
        .flatten()
        .map(|e| (e.element, &e.output))
        .collect();
    assert_eq!(elements, [(0, &json!(100)), (1, &json!(100))]);
    assert_eq!(
        recorded.step("wrap").unwrap().output,
        Some(json!("wrapped 3 lines"))
    );

    // The two recorded elements are injected: only element 2 runs, and fails again.
    let (opts, calls) = counted();
    let err = pgflow::replay::<Invoice>(recorded.clone())
        .inject_completed()
        .options(opts)
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.run_error(), Some(&failure));
    assert_eq!(calls.counts(), [0, 1, 0]);

    let (opts, calls) = counted();
    let out = pgflow::replay::<InvoiceFixed>(recorded)
        .inject_completed()
        .options(opts)
        .run()
        .await
        .unwrap();
    assert_eq!(out, "200 cents, wrapped 3 lines");
    assert_eq!(calls.counts(), [0, 1, 1]);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_succeeded_run_replays_to_the_same_output(pool: PgPool) {
    let order = Order {
        lines: vec![line("a", 3, 10)],
        discount_cents: 5,
    };
    let (id, outcome) = run_durably(&pool, order, 4).await;
    assert_eq!(outcome.unwrap(), "25 cents, unwrapped");

    let recorded = export_as_json(&pool, id).await;
    assert_eq!(recorded.status, "succeeded");
    assert_eq!(recorded.output, Some(json!("25 cents, unwrapped")));
    assert_eq!(recorded.error, None);
    // the terminal step's output is the run's: it has no entry
    assert!(recorded.step("total").is_none());

    let (opts, calls) = counted();
    let out = pgflow::replay::<Invoice>(recorded.clone())
        .inject_completed()
        .options(opts)
        .run()
        .await
        .unwrap();
    assert_eq!(Some(json!(out)), recorded.output);
    assert_eq!(calls.counts(), [0, 0, 1]);

    let err = pgflow::replay::<Invoice>(recorded)
        .inject("total")
        .run()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("it is the terminal step"), "{err}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn exporting_an_unknown_run_is_run_not_found(pool: PgPool) {
    let err = admin::export(&pool, RunId(424_242)).await.unwrap_err();
    assert!(matches!(err, Error::RunNotFound(RunId(424_242))), "{err}");
    assert_eq!(err.to_string(), "no run with id 424242");
}

/// Waits for a human's decision, then acts on it; version 1 cannot take a refusal.
pub struct Decision;

#[workflow(name = "replay_decision", max_attempts = 1)]
impl Decision {
    #[step]
    async fn draft(topic: String) -> Result<String, StepError> {
        Ok(format!("draft on {topic}"))
    }

    #[step(signal = verdict)]
    async fn review(draft: String, verdict: String) -> Result<String, StepError> {
        Ok(format!("{draft}: {verdict}"))
    }

    #[step]
    async fn act(review: String) -> Result<String, StepError> {
        if review.ends_with("no") {
            return Err(StepError::permanent("cannot act on a refusal"));
        }
        Ok(review)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_replay_receives_the_signals_the_run_accepted(pool: PgPool) {
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 2)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    let run = rt.start::<Decision>("tea".to_owned()).await.unwrap();
    rt.signal(run.id(), Decision::verdict, "no".to_owned())
        .await
        .unwrap();
    // A second verdict is a duplicate: not accepted, not recorded.
    rt.signal(run.id(), Decision::verdict, "yes".to_owned())
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(30), run.wait())
        .await
        .expect("the run finished")
        .unwrap_err();
    assert!(e.to_string().contains("cannot act on a refusal"), "{e}");
    rt.shutdown().await.unwrap();

    let recorded = export_as_json(&pool, run.id()).await;
    assert_eq!(recorded.signals.len(), 1);
    assert_eq!(
        (
            recorded.signals[0].name.as_str(),
            &recorded.signals[0].payload
        ),
        ("verdict", &json!("no"))
    );
    // Nothing injected: `review` waits for its signal (no timeout) and gets the
    // recorded one, so the failure reproduces offline.
    let replayed = tokio::time::timeout(
        Duration::from_secs(10),
        pgflow::replay::<Decision>(recorded).run(),
    )
    .await
    .expect("the replay did not wait for a signal");
    let e = replayed.unwrap_err();
    assert!(e.to_string().contains("cannot act on a refusal"), "{e}");
}
