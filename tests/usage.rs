//! The usage ledger, run keys and budgets, against the real Postgres: every attempt's
//! usage recorded (a failed one too), tokens and cost on the run and in
//! `job_results`, spend by workflow/model/key, keys from the workflow's key fn and
//! from the start, inherited by child runs; a run budget enforced against 64
//! concurrent steps (none starts past it), released reservations, tokens budgets,
//! and the same semantics in process.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{
    BudgetScope, BudgetUnit, ExecuteOptions, RunError, StepContext, StepError, Subflow, workflow,
};
use pgflow_runtime::{Error, Runtime, StartOptions, admin};
use pgflow_suite::support::{settle, wait_no_claims};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ask {
    pub tenant: String,
    pub prompt: String,
}

/// Counts the attempts of `Fanned::call` that ran.
#[derive(Default)]
pub struct Calls(AtomicU32);

pub struct Chat;

#[workflow(name = "usage_chat", key = Self::tenant)]
impl Chat {
    // attempt 1 pays for a call and fails; attempt 2 succeeds
    #[step(max_attempts = 2, backoff = "10ms")]
    async fn call(ask: Ask, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_usage("model-a", 100, 20, 3);
        if ctx.attempt() == 1 {
            return Err(StepError::retryable("provider said 503"));
        }
        ctx.add_usage("model-b", 10, 5, 1);
        ctx.add_cost_cents(2);
        Ok(format!("{} answered", ask.prompt))
    }

    #[step]
    async fn delegate(call: String) -> Result<Subflow<Echo>, StepError> {
        Ok(Subflow::new(call))
    }

    fn tenant(ask: &Ask) -> &str {
        &ask.tenant
    }
}

pub struct Echo;

#[workflow(name = "usage_echo")]
impl Echo {
    #[step]
    async fn echo(text: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_usage("model-c", 1, 1, 1);
        Ok(text)
    }
}

/// 64 elements, each estimated at and spending 10 cents (and 100 tokens).
pub struct Fanned;

#[workflow(name = "usage_fanned")]
impl Fanned {
    #[step]
    async fn split(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(map, estimate_cents = 10, estimate_tokens = 100, timeout = "30s")]
    async fn call(i: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Calls>>()?.0.fetch_add(1, Ordering::SeqCst);
        // long enough for many to be in flight together
        tokio::time::sleep(Duration::from_millis(30)).await;
        ctx.add_usage("model-a", 60, 40, 10);
        Ok(i)
    }

    #[step]
    async fn total(call: Vec<u32>) -> Result<usize, StepError> {
        Ok(call.len())
    }
}

/// (step, attempt, model, tokens in, tokens out, cents, key) of a ledger row.
type LedgerRow = (String, i32, String, i64, i64, i64, Option<String>);

async fn runtime(pool: &PgPool, calls: Arc<Calls>) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 16)
        .data(calls)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap()
}

/// (cost, tokens in, tokens out, reserved cents, reserved tokens, key) of run `id`.
async fn run_row(pool: &PgPool, id: i64) -> (i64, i64, i64, i64, i64, Option<String>) {
    sqlx::query_as(
        "SELECT cost_cents, COALESCE(tokens_in, 0), COALESCE(tokens_out, 0),
                COALESCE(reserved_cents, 0), COALESCE(reserved_tokens, 0), key
         FROM pgflow.runs WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn every_attempt_lands_in_the_ledger_with_its_run_key(pool: PgPool) {
    let rt = runtime(&pool, Arc::default()).await;
    let ask = Ask {
        tenant: "acme".to_owned(),
        prompt: "hi".to_owned(),
    };
    let run = rt.start::<Chat>(ask.clone()).await.unwrap();
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "hi answered"
    );
    let ledger: Vec<LedgerRow> = sqlx::query_as(
        "SELECT step, attempt, model, tokens_in, tokens_out, cost_cents, key
         FROM pgflow.step_usage WHERE run_id = $1 ORDER BY id",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap();
    let acme = Some("acme".to_owned());
    assert_eq!(
        ledger,
        [
            // the failed attempt was paid for
            ("call".into(), 1, "model-a".into(), 100, 20, 3, acme.clone()),
            ("call".into(), 2, "model-a".into(), 100, 20, 3, acme.clone()),
            ("call".into(), 2, "model-b".into(), 10, 5, 1, acme.clone()),
            ("call".into(), 2, String::new(), 0, 0, 2, acme.clone()),
        ]
    );
    assert_eq!(
        run_row(&pool, run.id().0).await,
        (9, 210, 45, 0, 0, acme.clone())
    );
    // the child run counts under its parent's key
    let child: (i64, Option<String>) =
        sqlx::query_as("SELECT id, key FROM pgflow.runs WHERE parent_run_id = $1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(child.1, acme);
    assert_eq!(run_row(&pool, child.0).await, (1, 1, 1, 0, 0, acme.clone()));

    // a start's own key wins
    let own = rt
        .start_with::<Chat>(
            &mut pool.acquire().await.unwrap(),
            ask,
            StartOptions::default().key("globex"),
        )
        .await
        .unwrap();
    settle::<String>(&rt, own.id()).await.unwrap();
    assert_eq!(
        run_row(&pool, own.id().0).await.5.as_deref(),
        Some("globex")
    );

    let summary = rt
        .summary(
            "usage_chat",
            chrono::Utc::now() - chrono::Duration::hours(1),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            summary.count,
            summary.tokens_in,
            summary.tokens_out,
            summary.total_cost_cents
        ),
        (2, 420, 90, 18)
    );
    let day = Duration::from_secs(86_400);
    let by_model = admin::costs(&pool, day, admin::CostsBy::Model)
        .await
        .unwrap();
    let models: Vec<(String, i64, i64, i64)> = by_model
        .rows
        .iter()
        .map(|r| (r.group.clone(), r.attempts, r.tokens_in, r.cost_cents))
        .collect();
    assert_eq!(
        models,
        [
            ("model-a".to_owned(), 4, 400, 12),
            (String::new(), 2, 0, 4),
            ("model-b".to_owned(), 2, 20, 2),
            ("model-c".to_owned(), 2, 2, 2),
        ]
    );
    assert_eq!((by_model.total.runs, by_model.total.cost_cents), (4, 20));
    let by_key = admin::costs(&pool, day, admin::CostsBy::Key).await.unwrap();
    let keys: Vec<(String, i64, i64)> = by_key
        .rows
        .iter()
        .map(|r| (r.group.clone(), r.runs, r.cost_cents))
        .collect();
    assert_eq!(
        keys,
        [("acme".to_owned(), 2, 10), ("globex".to_owned(), 2, 10)]
    );
    let by_workflow = admin::costs(&pool, day, admin::CostsBy::Workflow)
        .await
        .unwrap();
    assert_eq!(by_workflow.rows[0].group, "usage_chat");
    assert_eq!(by_workflow.rows[0].cost_cents, 18);
    let results: (i64, i64) = sqlx::query_as(
        "SELECT sum(tokens_in)::bigint, sum(tokens_out)::bigint FROM pgflow.job_results
         WHERE workflow = 'usage_chat'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(results, (420, 90));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn sixty_four_concurrent_steps_cannot_overshoot_a_budget(pool: PgPool) {
    let calls = Arc::new(Calls::default());
    let rt = runtime(&pool, Arc::clone(&calls)).await;
    let run = rt
        .start_with::<Fanned>(
            &mut pool.acquire().await.unwrap(),
            64,
            StartOptions::default().budget_cents(200),
        )
        .await
        .unwrap();
    let err = settle::<usize>(&rt, run.id()).await.unwrap_err();
    let Error::Run(RunError::BudgetExceeded {
        step,
        scope,
        unit,
        budget,
        estimate,
        ..
    }) = &err
    else {
        panic!("expected BudgetExceeded, got {err:?}");
    };
    assert_eq!(
        (step.as_str(), scope, *unit, *budget, *estimate),
        ("call", &BudgetScope::Run, BudgetUnit::Cents, 200, 10)
    );
    wait_no_claims(&pool, run.id().0).await;
    let ran = calls.0.load(Ordering::SeqCst);
    let (cost, tokens_in, tokens_out, reserved_cents, reserved_tokens, _) =
        run_row(&pool, run.id().0).await;
    // exactly the steps that fit started, never one more, and every one reported
    assert_eq!(ran, 20, "{ran} steps started against a budget for 20");
    assert_eq!((cost, tokens_in, tokens_out), (200, 1200, 800));
    assert_eq!(
        (reserved_cents, reserved_tokens),
        (0, 0),
        "reservations released"
    );
    let ledger: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.step_usage WHERE run_id = $1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(ledger, 20);
    let shown = admin::run_detail(&pool, run.id()).await.unwrap();
    assert!(
        shown
            .run
            .error
            .as_deref()
            .unwrap_or("")
            .contains("budget of 200 cents"),
        "{:?}",
        shown.run.error
    );

    // a budget with room for all of them
    let calls = Arc::new(Calls::default());
    rt.shutdown().await.unwrap();
    let rt = runtime(&pool, Arc::clone(&calls)).await;
    let run = rt
        .start_with::<Fanned>(
            &mut pool.acquire().await.unwrap(),
            64,
            StartOptions::default()
                .budget_cents(640)
                .budget_tokens(6400),
        )
        .await
        .unwrap();
    assert_eq!(settle::<usize>(&rt, run.id()).await.unwrap(), 64);
    assert_eq!(calls.0.load(Ordering::SeqCst), 64);
    let row = run_row(&pool, run.id().0).await;
    assert_eq!((row.0, row.1 + row.2, row.3, row.4), (640, 6400, 0, 0));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_tokens_budget_refuses_the_step_that_would_pass_it(pool: PgPool) {
    let calls = Arc::new(Calls::default());
    let rt = runtime(&pool, Arc::clone(&calls)).await;
    let run = rt
        .start_with::<Fanned>(
            &mut pool.acquire().await.unwrap(),
            8,
            StartOptions::default().budget_tokens(350),
        )
        .await
        .unwrap();
    let err = settle::<usize>(&rt, run.id()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Run(RunError::BudgetExceeded {
                unit: BudgetUnit::Tokens,
                budget: 350,
                ..
            })
        ),
        "{err:?}"
    );
    wait_no_claims(&pool, run.id().0).await;
    assert_eq!(calls.0.load(Ordering::SeqCst), 3);
    rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn in_process_budgets_hold_the_same_way() {
    let calls = Arc::new(Calls::default());
    let opts = ExecuteOptions::new()
        .data(Arc::clone(&calls))
        .budget_cents(200);
    let err = pgflow::execute_with::<Fanned>(64, opts).await.unwrap_err();
    assert!(
        matches!(&err, RunError::BudgetExceeded { budget: 200, spent, .. } if *spent <= 200),
        "{err:?}"
    );
    assert!(calls.0.load(Ordering::SeqCst) <= 20);
    let meter = pgflow::CostMeter::new();
    let opts = ExecuteOptions::new()
        .data(Arc::new(Calls::default()))
        .cost(meter.clone())
        .budget_cents(640);
    assert_eq!(pgflow::execute_with::<Fanned>(64, opts).await.unwrap(), 64);
    assert_eq!((meter.total(), meter.tokens()), (640, (3840, 2560)));
}
