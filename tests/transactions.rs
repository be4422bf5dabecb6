//! Transactional steps against the real Postgres: a step's writes commit with its
//! completion; a failed, timed-out or fenced-off attempt leaves none; ordinary steps
//! of the same run are unaffected; and in process, over a test's transaction, with a
//! savepoint per attempt. (Three workers and a SIGKILL: `tests/processes.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pgflow::{ExecuteOptions, RunError, StepContext, StepError, Transaction, workflow};
use pgflow_runtime::{PgTransaction, Runtime};
use pgflow_suite::support::settle;
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;

const DDL: &str = "CREATE TABLE IF NOT EXISTS ledger (
    run_id  bigint  NOT NULL,
    attempt integer NOT NULL,
    note    text    NOT NULL
)";

/// Lets a test hold a step after its write (`Hold::release`).
#[derive(Default)]
pub struct Hold {
    reached: Notify,
    release: Notify,
    /// `slow` attempts running now, and the most at once.
    running: AtomicUsize,
    most: AtomicUsize,
}

pub struct Payment;

#[workflow(name = "tx_payment")]
impl Payment {
    /// Writes, then: `fail-once` fails attempt 1, `slow-once` outlives its timeout on
    /// attempt 1, `hold` waits for the test, `bad` writes a value the database refuses.
    #[step(max_attempts = 3, backoff = "10ms", timeout = "1s")]
    async fn charge(
        mode: String,
        tx: &mut PgConnection,
        ctx: &StepContext,
    ) -> Result<String, StepError> {
        sqlx::query("INSERT INTO ledger (run_id, attempt, note) VALUES ($1, $2, $3)")
            .bind(ctx.run_id().0)
            .bind(i32::try_from(ctx.attempt()).unwrap_or(0))
            .bind(format!("charge ({mode})"))
            .execute(&mut *tx)
            .await?;
        match (mode.as_str(), ctx.attempt()) {
            ("fail-once", 1) => return Err(StepError::retryable("card network timed out")),
            ("slow", _) => {
                let hold = ctx.data::<Arc<Hold>>()?;
                let now = hold.running.fetch_add(1, Ordering::SeqCst) + 1;
                hold.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(250)).await;
                hold.running.fetch_sub(1, Ordering::SeqCst);
            }
            ("swallow", _) => {
                // an error the step ignores leaves its transaction aborted
                let _ = sqlx::query("SELECT 1/0").execute(&mut *tx).await;
            }
            ("slow-once", 1) => tokio::time::sleep(Duration::from_secs(5)).await,
            ("hold", _) => {
                let hold = ctx.data::<Arc<Hold>>()?;
                hold.reached.notify_one();
                hold.release.notified().await;
            }
            _ => {}
        }
        // a NUL byte: PostgreSQL's text refuses it
        Ok(if mode == "bad" {
            "\u{0}".to_owned()
        } else {
            format!("charged ({mode})")
        })
    }

    #[step]
    async fn receipt(charge: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.check_cancelled()?;
        Ok(format!("{charge}, receipt sent"))
    }
}

async fn runtime(pool: &PgPool, hold: Arc<Hold>) -> Runtime {
    sqlx::query(DDL).execute(pool).await.unwrap();
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .data(hold)
        .poll_interval(Duration::from_millis(20))
        .rescue_interval(Duration::from_millis(200))
        .start()
        .await
        .unwrap()
}

/// (attempt, note) rows of run `id`.
async fn ledger(pool: &PgPool, id: i64) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT attempt, note FROM ledger WHERE run_id = $1 ORDER BY attempt")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn the_writes_of_an_attempt_commit_with_its_completion_or_not_at_all(pool: PgPool) {
    let rt = runtime(&pool, Arc::default()).await;
    let ok = rt.start::<Payment>("plain".to_owned()).await.unwrap();
    let flaky = rt.start::<Payment>("fail-once".to_owned()).await.unwrap();
    let slow = rt.start::<Payment>("slow-once".to_owned()).await.unwrap();
    assert_eq!(
        settle::<String>(&rt, ok.id()).await.unwrap(),
        "charged (plain), receipt sent"
    );
    assert_eq!(
        ledger(&pool, ok.id().0).await,
        [(1, "charge (plain)".to_owned())]
    );
    // the failed attempt's write is gone, the retry's stayed
    settle::<String>(&rt, flaky.id()).await.unwrap();
    assert_eq!(
        ledger(&pool, flaky.id().0).await,
        [(2, "charge (fail-once)".to_owned())]
    );
    // so is that of an attempt that outlived its timeout
    settle::<String>(&rt, slow.id()).await.unwrap();
    assert_eq!(
        ledger(&pool, slow.id().0).await,
        [(2, "charge (slow-once)".to_owned())]
    );
    // the step's output and the write are one: the output is stored
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT output FROM pgflow.step_states WHERE run_id = $1 AND step = 0")
            .bind(ok.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, serde_json::json!("charged (plain)"));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_attempt_whose_claim_was_lost_leaves_no_write(pool: PgPool) {
    let hold = Arc::new(Hold::default());
    let rt = runtime(&pool, Arc::clone(&hold)).await;
    let run = rt.start::<Payment>("hold".to_owned()).await.unwrap();
    hold.reached.notified().await;
    // The claim is lost while the step runs (as when its lease expired and another
    // instance took the task): the completion must fail the fence.
    let stolen = sqlx::query(
        "UPDATE pgflow.tasks SET claim_token = claim_token + 1 WHERE run_id = $1 AND step = 0",
    )
    .bind(run.id().0)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(stolen, 1);
    hold.release.notify_one();
    // the rejected completion rolled the write back
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ledger(&pool, run.id().0).await, []);
    assert!(rt.stats().rejected >= 1, "{:?}", rt.stats());
    let state: Option<String> =
        sqlx::query_scalar("SELECT status FROM pgflow.step_states WHERE run_id = $1 AND step = 0")
            .bind(run.id().0)
            .fetch_optional(&pool)
            .await
            .unwrap();
    assert_eq!(state, None, "nothing of the attempt applied");
    rt.cancel(run.id()).await.unwrap();
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_result_the_database_refuses_fails_the_step_without_its_writes(pool: PgPool) {
    let rt = runtime(&pool, Arc::default()).await;
    let run = rt.start::<Payment>("bad".to_owned()).await.unwrap();
    let err = settle::<String>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("the database refused"), "{err}");
    assert_eq!(ledger(&pool, run.id().0).await, []);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn transactional_steps_never_take_the_connections_the_engine_needs(pool: PgPool) {
    sqlx::query(DDL).execute(&pool).await.unwrap();
    // a pool of 4: one connection for transactional steps, whatever the concurrency
    let small = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with((*pool.connect_options()).clone())
        .await
        .unwrap();
    let hold = Arc::new(Hold::default());
    let rt = Runtime::builder()
        .pool(small)
        .queue("default", 8)
        .data(Arc::clone(&hold))
        .heartbeat_interval(Duration::from_millis(100))
        .offline_after(Duration::from_millis(1_500))
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    let mut runs = Vec::new();
    for _ in 0..6 {
        runs.push(rt.start::<Payment>("slow".to_owned()).await.unwrap().id());
    }
    for id in &runs {
        assert_eq!(
            settle::<String>(&rt, *id).await.unwrap(),
            "charged (slow), receipt sent"
        );
    }
    // one at a time, and the instance kept heartbeating meanwhile
    assert_eq!(hold.most.load(Ordering::SeqCst), 1);
    let me = rt.instance_id().to_owned();
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.instances WHERE id = $1")
        .bind(&me)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "online");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 6);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_aborted_transaction_fails_the_step_instead_of_running_it_again(pool: PgPool) {
    let rt = runtime(&pool, Arc::default()).await;
    let run = rt.start::<Payment>("swallow".to_owned()).await.unwrap();
    let err = settle::<String>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("the database refused"), "{err}");
    assert_eq!(ledger(&pool, run.id().0).await, []);
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM pgflow.step_states WHERE run_id = $1 AND step = 0",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1, "not run again and again");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn in_process_each_attempt_runs_in_a_savepoint_of_the_lent_transaction(pool: PgPool) {
    sqlx::query(DDL).execute(&pool).await.unwrap();
    let lent = Transaction::new(PgTransaction::new(pool.begin().await.unwrap()));
    let opts = ExecuteOptions::new().transaction(lent.clone());
    let out = pgflow::execute_with::<Payment>("fail-once".to_owned(), opts)
        .await
        .unwrap();
    assert_eq!(out, "charged (fail-once), receipt sent");
    let mut tx = lent
        .into_inner::<PgTransaction>()
        .expect("given back")
        .into_inner();
    let rows: Vec<(i32, String)> = sqlx::query_as("SELECT attempt, note FROM ledger")
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    // attempt 1 was rolled back to its savepoint
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].0, 2);
    tx.rollback().await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the test's rollback took everything back");

    // without a lent transaction, the step says so
    let err = pgflow::execute::<Payment>("plain".to_owned())
        .await
        .unwrap_err();
    let RunError::StepFailed { history, .. } = &err else {
        panic!("{err:?}");
    };
    assert!(
        history[0].message.contains("takes a transaction"),
        "{}",
        history[0].message
    );
}
