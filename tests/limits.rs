//! Rate limits and budgets per period (`RuntimeBuilder::limit`, `#[step(limits =
//! [..])]`) against the real Postgres: a requests limit spreads attempts over
//! windows (waiting, not failing, attempts not counted); a tokens limit holds against
//! what steps reported, not their estimates; a per-key budget per period fails the
//! run of the key past it and leaves other keys alone; an undefined limit is refused
//! at start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{BudgetScope, BudgetUnit, RunError, StepContext, StepError, workflow};
use pgflow_runtime::{Error, Limit, Runtime, StartOptions};
use pgflow_suite::support::settle;
use sqlx::PgPool;

/// When each attempt of `Api::call` started.
#[derive(Default)]
pub struct Starts(Mutex<Vec<(Instant, u32)>>);

pub struct Api;

#[workflow(name = "limits_api", queue = "limits")]
impl Api {
    #[step(limits = ["api"])]
    async fn call(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        if let Ok(s) = ctx.data::<Arc<Starts>>() {
            s.0.lock().unwrap().push((Instant::now(), ctx.attempt()));
        }
        Ok(n)
    }
}

pub struct Tokens;

#[workflow(name = "limits_tokens", queue = "limits")]
impl Tokens {
    // estimated at 100 tokens, reports 600
    #[step(limits = ["tok"], estimate_tokens = 100)]
    async fn call(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.add_usage("m", 500, 100, 0);
        Ok(n)
    }
}

pub struct Billed;

#[workflow(name = "limits_billed", queue = "limits", key = Self::tenant)]
impl Billed {
    #[step(limits = ["daily"], estimate_cents = 10)]
    async fn call(input: (String, u32), ctx: &StepContext) -> Result<u32, StepError> {
        ctx.add_cost_cents(10);
        Ok(input.1)
    }

    fn tenant(input: &(String, u32)) -> &str {
        &input.0
    }
}

/// Waits out the end of the current `period_secs` window (windows are aligned to
/// multiples of the period since the epoch, as the server's clock says) when it is
/// less than `margin_secs` away: a test that fills a window and then expects to be
/// held by it must not see the window roll over halfway (at the top of the hour,
/// or at midnight for a daily one).
async fn clear_of_window_end(period_secs: u64, margin_secs: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let into = now.as_secs_f64() % period_secs as f64;
    let left = period_secs as f64 - into;
    if left < margin_secs as f64 {
        tokio::time::sleep(Duration::from_secs_f64(left + 1.0)).await;
    }
}

async fn runtime(pool: &PgPool, starts: Arc<Starts>) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("limits", 8)
        .data(starts)
        .poll_interval(Duration::from_millis(20))
        .limit(Limit::requests("api", 3).per(Duration::from_secs(2)))
        .limit(Limit::tokens("tok", 1_000).per(Duration::from_secs(3_600)))
        .limit(
            Limit::cents("daily", 25)
                .per(Duration::from_secs(86_400))
                .per_key()
                .fail_when_exceeded(),
        )
        .start()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_requests_limit_spreads_attempts_over_windows(pool: PgPool) {
    let starts = Arc::new(Starts::default());
    let rt = runtime(&pool, Arc::clone(&starts)).await;
    let ids = rt.start_many::<Api>(0..7).await.unwrap();
    for id in &ids {
        settle::<u32>(&rt, *id).await.unwrap();
    }
    let starts = starts.0.lock().unwrap().clone();
    assert_eq!(starts.len(), 7, "each ran once: waiting is not an attempt");
    assert!(starts.iter().all(|s| s.1 == 1), "{starts:?}");
    // Windows are 2 s long (aligned to the epoch): at most 3 starts in any of them,
    // so 7 runs take at least 3 windows.
    let first = starts.iter().map(|s| s.0).min().unwrap();
    let last = starts.iter().map(|s| s.0).max().unwrap();
    assert!(
        last.duration_since(first) >= Duration::from_secs(2),
        "7 starts within {:?}",
        last.duration_since(first)
    );
    let windows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT used, reserved FROM pgflow.limit_windows WHERE name = 'api' ORDER BY window_start",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(windows.iter().all(|w| w.0 <= 3 && w.1 == 0), "{windows:?}");
    assert_eq!(windows.iter().map(|w| w.0).sum::<i64>(), 7);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_tokens_limit_holds_against_reported_usage(pool: PgPool) {
    clear_of_window_end(3_600, 60).await;
    let rt = runtime(&pool, Arc::default()).await;
    // one at a time: each reserves 100 and settles to 600
    for n in 0..2 {
        let run = rt.start::<Tokens>(n).await.unwrap();
        assert_eq!(settle::<u32>(&rt, run.id()).await.unwrap(), n);
    }
    // 1,200 used: the third waits for the next hour, parked, its attempt not counted
    let third = rt.start::<Tokens>(2).await.unwrap();
    let mut waiting = None;
    for _ in 0..200 {
        waiting = sqlx::query_as::<_, (bool, i32, bool)>(
            "SELECT parked, attempt, run_at > now() + interval '1 minute'
             FROM pgflow.tasks WHERE run_id = $1 AND claimed_by IS NULL",
        )
        .bind(third.id().0)
        .fetch_optional(&pool)
        .await
        .unwrap()
        .filter(|w| w.0);
        if waiting.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(waiting, Some((true, 1, true)));
    let window: (i64, i64) =
        sqlx::query_as("SELECT used, reserved FROM pgflow.limit_windows WHERE name = 'tok'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(window, (1_200, 0));
    rt.cancel(third.id()).await.unwrap();
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_budget_per_key_and_period_fails_only_that_key(pool: PgPool) {
    clear_of_window_end(86_400, 60).await;
    let rt = runtime(&pool, Arc::default()).await;
    for n in 0..2 {
        let run = rt.start::<Billed>(("acme".to_owned(), n)).await.unwrap();
        settle::<u32>(&rt, run.id()).await.unwrap();
    }
    let over = rt.start::<Billed>(("acme".to_owned(), 2)).await.unwrap();
    let err = settle::<u32>(&rt, over.id()).await.unwrap_err();
    let Error::Run(RunError::BudgetExceeded {
        scope,
        unit,
        spent,
        estimate,
        budget,
        ..
    }) = &err
    else {
        panic!("expected BudgetExceeded, got {err:?}");
    };
    assert_eq!(
        scope,
        &BudgetScope::Limit(Box::new(pgflow::LimitScope {
            name: "daily".to_owned(),
            key: "acme".to_owned(),
            period_secs: 86_400
        }))
    );
    assert_eq!(
        (*unit, *spent, *estimate, *budget),
        (BudgetUnit::Cents, 20, 10, 25)
    );
    assert!(
        err.to_string()
            .contains("limit `daily`'s (key `acme`, per 86400 s) budget of 25 cents"),
        "{err}"
    );
    // another key has its own budget
    let other = rt
        .start_with::<Billed>(
            &mut pool.acquire().await.unwrap(),
            ("globex".to_owned(), 7),
            StartOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(settle::<u32>(&rt, other.id()).await.unwrap(), 7);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_step_naming_an_undefined_limit_is_refused_at_start(pool: PgPool) {
    let err = Runtime::builder()
        .pool(pool.clone())
        .queue("limits", 1)
        .limit(Limit::requests("api", 3))
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("which this runtime does not define"),
        "{err}"
    );
    let err = Runtime::builder()
        .pool(pool.clone())
        .limit(Limit::requests("api", 0))
        .start()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
}
