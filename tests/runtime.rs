//! The durable runtime against the real Postgres: each test gets its own database
//! (`#[sqlx::test]`), with the pgflow migrations applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{ErrorKind, RunError, RunId, StepContext, StepError, workflow};
use pgflow_runtime::{Error, RunOutcome, Runtime, StartOptions};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, PgPool};

static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(1);

async fn runtime(pool: &PgPool, queues: &[(&str, usize)]) -> Runtime {
    let id = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
    let mut b = Runtime::builder()
        .pool(pool.clone())
        .instance_id(format!("test-instance-{id}"))
        .poll_interval(Duration::from_millis(50))
        .rescue_interval(Duration::from_millis(100))
        .data(Arc::new(Counter::default()));
    for (q, c) in queues {
        b = b.queue(*q, *c);
    }
    b.start().await.unwrap()
}

async fn wait<O: serde::de::DeserializeOwned>(rt: &Runtime, id: RunId) -> Result<O, Error> {
    tokio::time::timeout(Duration::from_secs(30), rt.handle::<O>(id, true).wait())
        .await
        .expect("the run did not finish within 30 s")
}

/// Counts executions per test (each test has its own runtime and data).
#[derive(Default)]
pub struct Counter(AtomicU32);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub id: u32,
    pub items: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Priced {
    pub id: u32,
    pub cents: i64,
}

pub struct Chain3;

#[workflow(name = "rt_chain3", backoff = "10ms")]
impl Chain3 {
    #[step]
    async fn price(order: Order) -> Result<Priced, StepError> {
        Ok(Priced {
            id: order.id,
            cents: 100 * order.items.len() as i64,
        })
    }

    #[step]
    async fn tax(p: Priced, ctx: &StepContext) -> Result<Priced, StepError> {
        ctx.add_cost_cents(2);
        Ok(Priced {
            cents: p.cents + p.cents / 10,
            ..p
        })
    }

    #[step]
    async fn receipt(p: Priced, input: Order, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_cost_cents(3);
        Ok(format!(
            "order {} ({} items): {} cents",
            p.id,
            input.items.len(),
            p.cents
        ))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn chain_runs_end_to_end_with_outputs_costs_and_results(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 8)]).await;
    let order = Order {
        id: 7,
        items: vec!["a".into(), "b".into()],
    };
    let run = rt.start::<Chain3>(order).await.unwrap();
    assert_eq!(run.wait().await.unwrap(), "order 7 (2 items): 220 cents");

    let (status, output, cost, instance): (String, String, i64, String) = sqlx::query_as(
        "SELECT status, output::text, cost_cents, instance_id FROM pgflow.runs WHERE id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status, "succeeded");
    assert_eq!(output, "\"order 7 (2 items): 220 cents\"");
    assert_eq!(cost, 5);
    assert_eq!(instance, rt.instance_id());
    // intermediate outputs are stored; the hot table is empty again
    let stored: Vec<(i16, String)> = sqlx::query_as(
        "SELECT step, output::text FROM pgflow.step_states WHERE run_id = $1 ORDER BY step",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            (0, r#"{"id": 7, "cents": 200}"#.to_owned()),
            (1, r#"{"id": 7, "cents": 220}"#.to_owned())
        ]
    );
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tasks, 0);

    let (wf, st, cents): (String, String, i64) = sqlx::query_as(
        "SELECT workflow, status, cost_cents FROM pgflow.job_results WHERE run_id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (wf.as_str(), st.as_str(), cents),
        ("rt_chain3", "success", 5)
    );
    let summary = rt
        .summary("rt_chain3", chrono::Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(summary.count, 1);
    assert_eq!(summary.success_rate, 1.0);
    assert_eq!(summary.total_cost_cents, 5);
    assert!(summary.p95_ms >= summary.p50_ms && summary.p50_ms >= 0.0);
    rt.shutdown().await.unwrap();
}

pub struct Diamond;

#[workflow(name = "rt_diamond")]
impl Diamond {
    #[step]
    async fn split(n: u64) -> Result<Vec<u64>, StepError> {
        Ok((1..=n).collect())
    }
    #[step(depends_on = [split])]
    async fn sum(split: Vec<u64>) -> Result<u64, StepError> {
        Ok(split.iter().sum())
    }
    #[step(depends_on = [split])]
    async fn max(split: Vec<u64>) -> Result<u64, StepError> {
        Ok(split.iter().copied().max().unwrap_or(0))
    }
    #[step(depends_on = [split])]
    async fn len(split: Vec<u64>) -> Result<usize, StepError> {
        Ok(split.len())
    }
    #[step(depends_on = [sum, max, len])]
    async fn join(sum: u64, max: u64, len: usize) -> Result<String, StepError> {
        Ok(format!("sum={sum} max={max} len={len}"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn diamond_fans_out_and_joins_once(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 4)]).await;
    let ids = rt.start_many::<Diamond>(1..=50_u64).await.unwrap();
    assert_eq!(ids.len(), 50);
    for (n, id) in (1..=50_u64).zip(&ids) {
        let out: String = wait(&rt, *id).await.unwrap();
        assert_eq!(out, format!("sum={} max={n} len={n}", n * (n + 1) / 2));
    }
    // every join ran exactly once: one completed state per (run, step)
    let joins: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_states WHERE step IN (1, 2, 3) AND status = 'completed'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(joins, 150);
    rt.shutdown().await.unwrap();
}

pub struct Flaky;

#[workflow(name = "rt_flaky", backoff = "10ms", max_attempts = 3)]
impl Flaky {
    #[step]
    async fn flaky(fail_times: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let n = ctx.data::<Arc<Counter>>()?.0.fetch_add(1, Ordering::SeqCst) + 1;
        assert_eq!(
            n,
            ctx.attempt(),
            "the attempt number follows the executions"
        );
        if n <= fail_times {
            return Err(StepError::retryable(format!("failure {n}")));
        }
        Ok(n)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retryable_failures_are_retried_then_succeed(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let run = rt.start::<Flaky>(2).await.unwrap();
    assert_eq!(run.wait().await.unwrap(), 3);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn exhausted_retries_fail_the_run_with_the_history(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let run = rt.start::<Flaky>(10).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(RunError::StepFailed { step, history, .. }) = &err else {
        panic!("unexpected {err:?}");
    };
    assert_eq!(step, "flaky");
    let messages: Vec<&str> = history.iter().map(|h| h.message.as_str()).collect();
    assert_eq!(messages, ["failure 1", "failure 2", "failure 3"]);
    let (status, st): (String, String) = sqlx::query_as(
        "SELECT r.status, s.status FROM pgflow.runs r JOIN pgflow.step_states s ON s.run_id = r.id WHERE r.id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), st.as_str()), ("failed", "failed"));
    rt.shutdown().await.unwrap();
}

pub struct Failing;

#[workflow(name = "rt_failing", max_attempts = 5, backoff = "10ms")]
impl Failing {
    #[step(depends_on = [])]
    async fn bad(input: u32) -> Result<u32, StepError> {
        Err(StepError::permanent(format!("{input} is not allowed")))
    }
    #[step(depends_on = [], timeout = "100ms", max_attempts = 2)]
    async fn slow(input: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Counter>>()?.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(u64::from(input))).await;
        Ok(input)
    }
    #[step(depends_on = [bad, slow])]
    async fn never(bad: u32, slow: u32) -> Result<u32, StepError> {
        Ok(bad + slow)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_permanent_error_fails_the_run_at_once(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 1)]).await;
    let run = rt.start::<Failing>(60).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.failed_step(), Some("bad"));
    assert_eq!(e.history().len(), 1);
    assert_eq!(e.history()[0].kind, ErrorKind::Permanent);
    assert_eq!(e.history()[0].message, "60 is not allowed");
    rt.shutdown().await.unwrap();
}

pub struct Timeouts;

#[workflow(name = "rt_timeouts", backoff = "10ms")]
impl Timeouts {
    #[step(timeout = "100ms", max_attempts = 2)]
    async fn slow(secs: u64) -> Result<u64, StepError> {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Ok(secs)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_step_over_its_timeout_is_retried_then_fails(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let run = rt.start::<Timeouts>(60).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.history().len(), 2);
    assert!(
        e.history().iter().all(|h| h.kind == ErrorKind::Timeout),
        "{e}"
    );
    rt.shutdown().await.unwrap();
}

pub struct WorksThenWaits;

#[workflow(name = "rt_works_then_waits", max_attempts = 1)]
impl WorksThenWaits {
    /// Synchronous work past its timeout, then a short wait.
    #[step(timeout = "300ms")]
    async fn work(millis: u64) -> Result<u64, StepError> {
        std::thread::sleep(Duration::from_millis(millis));
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(millis)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_durable_timeout_counts_from_the_attempts_start_in_process_from_the_first_wait(
    pool: PgPool,
) {
    // The task's lease covers the timeout from the attempt's start: an attempt that
    // worked synchronously past its timeout times out at its first wait.
    let rt = runtime(&pool, &[("default", 1)]).await;
    let run = rt.start::<WorksThenWaits>(600).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.history().len(), 1, "{e}");
    assert_eq!(e.history()[0].kind, ErrorKind::Timeout, "{e}");
    // a step whose work stays within the timeout completes
    let run = rt.start::<WorksThenWaits>(10).await.unwrap();
    assert_eq!(run.wait().await.unwrap(), 10);
    rt.shutdown().await.unwrap();
    // In process (no lease), the timeout counts from the first wait: the clock is
    // read only for a step that has to wait.
    assert_eq!(pgflow::execute::<WorksThenWaits>(600).await.unwrap(), 600);
}

pub struct Panics;

#[workflow(name = "rt_panics", backoff = "10ms", max_attempts = 2)]
impl Panics {
    #[step]
    async fn boom(n: u32) -> Result<u32, StepError> {
        if n > 0 {
            panic!("boom {n}");
        }
        Ok(n)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_panic_is_a_recorded_failed_attempt(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let run = rt.start::<Panics>(3).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.history().len(), 2);
    assert_eq!(e.history()[0].kind, ErrorKind::Panic);
    assert_eq!(e.history()[0].message, "step panicked: boom 3");
    // the worker survived: another run completes
    assert_eq!(
        rt.start::<Panics>(0).await.unwrap().wait().await.unwrap(),
        0
    );
    rt.shutdown().await.unwrap();
}

pub struct TwoSteps;

#[workflow(name = "rt_two_steps")]
impl TwoSteps {
    #[step]
    async fn first(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Counter>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok(n)
    }
    #[step]
    async fn second(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Counter>>()?
            .0
            .fetch_add(100, Ordering::SeqCst);
        Ok(n)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn cancel_stops_pending_steps(pool: PgPool) {
    // a producer-only runtime starts and cancels; a worker runs afterwards
    let producer = runtime(&pool, &[]).await;
    let run = producer.start::<TwoSteps>(1).await.unwrap();
    assert!(producer.cancel(run.id()).await.unwrap());
    assert!(
        !producer.cancel(run.id()).await.unwrap(),
        "already cancelled"
    );
    let worker = runtime(&pool, &[("default", 2)]).await;
    let counter = Arc::new(Counter::default());
    let _ = counter;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let outcome = worker.result::<u32>(run.id()).await.unwrap();
    assert!(matches!(outcome, RunOutcome::Cancelled), "{outcome:?}");
    let states: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.step_states")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(states, 0, "no step of the cancelled run ran");
    match run.wait().await {
        Err(Error::Run(RunError::Cancelled { workflow })) => assert_eq!(workflow, "rt_two_steps"),
        other => panic!("expected a cancelled run, got {other:?}"),
    }
    assert!(matches!(
        producer.cancel(RunId(999_999)).await,
        Err(Error::RunNotFound(_))
    ));
    producer.shutdown().await.unwrap();
    worker.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn the_same_idempotency_key_returns_the_first_run(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let opts = StartOptions::default().idempotency_key("order-1");
    let mut conn = pool.acquire().await.unwrap();
    let first = rt
        .start_with::<TwoSteps>(&mut conn, 5, opts.clone())
        .await
        .unwrap();
    let second = rt.start_with::<TwoSteps>(&mut conn, 6, opts).await.unwrap();
    assert!(first.created() && !second.created());
    assert_eq!(first.id(), second.id());
    assert_eq!(second.wait().await.unwrap(), 5);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_start_in_a_rolled_back_transaction_leaves_no_run(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let mut tx = pool.begin().await.unwrap();
    let run = rt
        .start_with::<TwoSteps>(&mut tx, 1, StartOptions::default())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(
        rt.result::<u32>(run.id()).await,
        Err(Error::RunNotFound(_))
    ));
    let mut tx = pool.begin().await.unwrap();
    let run = rt
        .start_with::<TwoSteps>(&mut tx, 2, StartOptions::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(wait::<u32>(&rt, run.id()).await.unwrap(), 2);
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pgflow.runs), (SELECT count(*) FROM pgflow.tasks)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(counts, (1, 0));
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn run_at_delays_the_first_step(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(700);
    let mut conn = pool.acquire().await.unwrap();
    let run = rt
        .start_with::<TwoSteps>(&mut conn, 3, StartOptions::default().run_at(at))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        rt.result::<u32>(run.id()).await.unwrap(),
        RunOutcome::Running
    ));
    assert_eq!(run.wait().await.unwrap(), 3);
    let completed: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT completed_at FROM pgflow.runs WHERE id = $1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(completed >= at, "{completed} < {at}");
    rt.shutdown().await.unwrap();
}

pub struct Record;

#[workflow(name = "rt_record")]
impl Record {
    #[step]
    async fn record(label: String, ctx: &StepContext) -> Result<String, StepError> {
        let order = ctx.data::<Arc<std::sync::Mutex<Vec<String>>>>()?;
        order
            .lock()
            .map_err(|e| StepError::permanent(e.to_string()))?
            .push(label.clone());
        Ok(label)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn higher_priority_runs_first(pool: PgPool) {
    let producer = runtime(&pool, &[]).await;
    let mut conn = pool.acquire().await.unwrap();
    for (label, prio) in [("low", -5_i16), ("mid", 0), ("high", 10), ("mid2", 0)] {
        producer
            .start_with::<Record>(
                &mut conn,
                label.into(),
                StartOptions::default().priority(prio),
            )
            .await
            .unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    // one slot and a claim batch of one: tasks run strictly in claim order
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 1)
        .claim_batch(1)
        .data(Arc::clone(&seen))
        .start()
        .await
        .unwrap();
    for _ in 0..200 {
        if seen.lock().unwrap().len() == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(*seen.lock().unwrap(), ["high", "mid", "mid2", "low"]);
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_changed_definition_under_the_same_version_is_refused(pool: PgPool) {
    // Pretend an earlier deploy registered rt_two_steps v1 with another timeout.
    let rt = runtime(&pool, &[]).await;
    rt.shutdown().await.unwrap();
    sqlx::query(
        "UPDATE pgflow.workflows
         SET definition = jsonb_set(definition, '{steps,1,timeout_ms}', '5000')
         WHERE name = 'rt_two_steps' AND version = 1",
    )
    .execute(&pool)
    .await
    .unwrap();
    let err = Runtime::builder()
        .pool(pool.clone())
        .start()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::DefinitionChanged { .. }), "{msg}");
    assert!(msg.contains("workflow `rt_two_steps` version 1"), "{msg}");
    assert!(msg.contains("steps[1].timeout_ms: 5000 -> 30000"), "{msg}");
    assert!(msg.contains("bump its `version`"), "{msg}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_stored_input_of_the_wrong_shape_fails_that_run_only(pool: PgPool) {
    let producer = runtime(&pool, &[]).await;
    let broken = producer
        .start::<Chain3>(Order {
            id: 1,
            items: vec![],
        })
        .await
        .unwrap();
    sqlx::query(r#"UPDATE pgflow.runs SET input = '{"id": 1, "items": [1, 2]}' WHERE id = $1"#)
        .bind(broken.id().0)
        .execute(&pool)
        .await
        .unwrap();
    let fine = producer
        .start::<Chain3>(Order {
            id: 2,
            items: vec!["x".into()],
        })
        .await
        .unwrap();
    let rt = runtime(&pool, &[("default", 2)]).await;
    let err = broken.wait().await.unwrap_err();
    let Error::Run(e) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(e.failed_step(), Some("price"));
    assert_eq!(e.history().len(), 1, "a bad input is not retried: {e}");
    let msg = &e.history()[0].message;
    assert_eq!(e.history()[0].kind, ErrorKind::Permanent);
    assert!(
        msg.contains("workflow `rt_chain3` step `price` parameter `order`")
            && msg.contains("at `items[0]`"),
        "{msg}"
    );
    assert_eq!(fine.wait().await.unwrap(), "order 2 (1 items): 110 cents");
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn start_by_name_checks_the_input_first(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    let id = rt
        .start_by_name(
            "rt_two_steps",
            None,
            serde_json::json!(9),
            StartOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(wait::<u32>(&rt, id).await.unwrap(), 9);
    let err = rt
        .start_by_name(
            "rt_two_steps",
            Some(1),
            serde_json::json!("nine"),
            StartOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("u32"), "{err}");
    let err = rt
        .start_by_name(
            "no_such_flow",
            None,
            serde_json::json!(1),
            StartOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no workflow `no_such_flow`"),
        "{err}"
    );
    assert!(err.to_string().contains("rt_two_steps v1"), "{err}");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "rejected starts insert nothing");
    rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let err = Runtime::builder()
        .database_url("postgres://app:hunter2@127.0.0.1:1/nowhere")
        .start()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Connect { .. }), "{msg}");
    assert!(
        msg.contains("postgres://app:***@127.0.0.1:1/nowhere"),
        "{msg}"
    );
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(msg.contains("DATABASE_URL"), "{msg}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn claim_uses_the_partial_index(pool: PgPool) {
    sqlx::query(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, claimed_by)
         SELECT g, 0, 'w', 1, CASE WHEN g % 2 = 0 THEN 'default' ELSE 'other' END, 3,
                CASE WHEN g % 10 = 0 THEN NULL ELSE 'someone' END
         FROM generate_series(1, 20000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE pgflow.tasks")
        .execute(&pool)
        .await
        .unwrap();
    // The very statement the claimer sends, with the parameters it binds (a
    // producer-only runtime: it claims nothing itself).
    let rt = Runtime::builder().pool(pool.clone()).start().await.unwrap();
    let plan = pgflow_runtime::explain_claim(&rt, "default", 100, false, false)
        .await
        .unwrap()
        .join("\n");
    assert!(plan.contains("tasks_available"), "{plan}");
    // the ids are locked through the index, in claim order, not by a sort of the queue
    assert!(plan.contains("LockRows"), "{plan}");
    assert!(!plan.contains("Seq Scan on tasks a"), "{plan}");
    rt.shutdown().await.unwrap();
}

/// A queue's statistics are stale more often than not: analyzed while (nearly)
/// empty, its tables then hold 40,000 tasks of two keys and as many runs. The
/// plans of both claims (ordinary and fair) still walk indexes in claim order and
/// reach runs by primary key: no scan of a whole table, no sort of the queue.
#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn claim_plans_do_not_depend_on_stale_statistics(pool: PgPool) {
    sqlx::query("ANALYZE pgflow.tasks, pgflow.runs")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO pgflow.runs (workflow, version, input)
         SELECT 'w', 1, '1' FROM generate_series(1, 40000)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, key)
         SELECT g, 0, 'w', 1, 'default', 3, CASE WHEN g % 1000 = 0 THEN 'b' ELSE 'a' END
         FROM generate_series(1, 40000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rt = Runtime::builder().pool(pool.clone()).start().await.unwrap();
    // the plans with the parameters' values (a claim connection's first five) and
    // without (its later ones, when they cost no more)
    for (fair, generic) in [(false, false), (false, true), (true, false), (true, true)] {
        let plan = pgflow_runtime::explain_claim(&rt, "default", 100, fair, generic)
            .await
            .unwrap()
            .join("\n");
        for whole in ["Seq Scan on tasks", "Seq Scan on runs", "Bitmap Heap Scan"] {
            assert!(!plan.contains(whole), "fair: {fair}, {whole}:\n{plan}");
        }
        assert!(plan.contains("LockRows"), "{plan}");
        // a task's workflow version is looked up in a hash, not by a nested loop
        // over every version the runtime knows, per task
        assert!(plan.contains("hashed SubPlan"), "fair: {fair}:\n{plan}");
        if fair {
            assert_key_picks_use_the_key_index(&plan);
        } else {
            // nothing to sort: the index gives the claim order
            assert!(!plan.contains("Sort"), "{plan}");
        }
    }
    rt.shutdown().await.unwrap();
}

/// A fair claim's picks of a key come from that key's own range of the key index,
/// not from a walk of the queue's index through every other key's tasks (a filter
/// on the key).
fn assert_key_picks_use_the_key_index(plan: &str) {
    assert!(
        !plan
            .lines()
            .any(|l| l.contains("Filter:")
                && (l.contains("(key = keys") || l.contains("(key >= keys"))),
        "{plan}"
    );
    assert!(
        plan.contains("Index Scan using tasks_available_by_key"),
        "{plan}"
    );
}

/// With `key =`, the queue's index and the key index both give a key's claim
/// order, and the planner weighs them by size alone when the statistics say
/// nothing (a queue never analyzed yet, or analyzed nearly empty): with keys the
/// size of a UUID, the key index is the larger, and the claim walked the queue's
/// index, filtering one key's backlog for another key's task (seen in the fairness
/// bench: 21,906 rows filtered out of a pick of 4, tenant A at half speed).
#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn fair_claim_plans_keep_to_the_key_index_whatever_the_keys_size(pool: PgPool) {
    // one tenant's backlog, mostly claimed already, and another's trickle;
    // nothing analyzed yet
    for sql in [
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, key)
         SELECT g, 0, 'w', 1, 'default', 3, 'f2c1d0e4-8a5b-4c3d-b2a1-9e8f7d6c5b4a'
         FROM generate_series(1, 50000) g",
        "UPDATE pgflow.tasks SET claimed_by = 'someone' WHERE id <= 49900",
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, key)
         SELECT g, 0, 'w', 1, 'default', 3, '0b7c6f7e-3f64-4a8e-9d7e-6c1f2b9a0d21'
         FROM generate_series(50001, 50010) g",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let rt = Runtime::builder().pool(pool.clone()).start().await.unwrap();
    for generic in [false, true] {
        let plan = pgflow_runtime::explain_claim(&rt, "default", 128, true, generic)
            .await
            .unwrap()
            .join("\n");
        assert_key_picks_use_the_key_index(&plan);
    }
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn every_run_completes_once_after_all_connections_are_killed(pool: PgPool) {
    const RUNS: u64 = 3_000;
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 32)
        .poll_interval(Duration::from_millis(50))
        .rescue_interval(Duration::from_millis(200))
        .lease_grace(Duration::from_secs(2))
        .start()
        .await
        .unwrap();
    let orders: Vec<Order> = (0..RUNS as u32)
        .map(|id| Order {
            id,
            items: vec!["x".into(); (id % 5) as usize],
        })
        .collect();
    let mut ids = Vec::new();
    for chunk in orders.chunks(500) {
        ids.extend(rt.start_many::<Chain3>(chunk.to_vec()).await.unwrap());
    }
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()";
    for killed in 0..3_u64 {
        while rt.stats().completions < 500 + killed * 1_000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // a connection of our own, outside the runtime's pool
        let mut own = sqlx::PgConnection::connect_with(&pool.connect_options())
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(terminate)
            .fetch_one(&mut own)
            .await
            .unwrap();
        assert!(n > 0, "no runtime connection was terminated");
    }
    for (id, order) in ids.iter().zip(&orders) {
        let out: String = wait(&rt, *id).await.unwrap();
        let cents = 100 * order.items.len() as i64;
        assert_eq!(
            out,
            format!(
                "order {} ({} items): {} cents",
                order.id,
                order.items.len(),
                cents + cents / 10
            )
        );
    }
    // Exactly once: every run finished once, by this runtime's flushes alone.
    assert_eq!(rt.stats().runs_finished, RUNS);
    let (succeeded, tasks, states): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pgflow.runs WHERE status = 'succeeded'),
                (SELECT count(*) FROM pgflow.tasks),
                (SELECT count(*) FROM pgflow.step_states WHERE status = 'completed')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (succeeded, tasks, states),
        (RUNS as i64, 0, 2 * RUNS as i64)
    );
    rt.shutdown().await.unwrap();
}

/// Lets a test hold a step until it says go.
#[derive(Default)]
pub struct Gate {
    entered: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

pub struct Gated;

#[workflow(name = "rt_gated")]
impl Gated {
    #[step]
    async fn held(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let gate = ctx.data::<Arc<Gate>>()?;
        gate.entered.notify_one();
        gate.go.notified().await;
        Ok(n * 10)
    }
}

async fn gated_runtime(pool: &PgPool, gate: &Arc<Gate>) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(50))
        .rescue_interval(Duration::from_secs(3600))
        .shutdown_grace(Duration::from_secs(10))
        .data(Arc::clone(gate))
        .start()
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_completion_from_a_lost_claim_is_rejected(pool: PgPool) {
    let gate = Arc::new(Gate::default());
    let rt = gated_runtime(&pool, &gate).await;
    let run = rt.start::<Gated>(4).await.unwrap();
    gate.entered.notified().await;
    // Meanwhile the claim is lost: another instance rescued and re-claimed the task.
    let n = sqlx::query(
        "UPDATE pgflow.tasks SET claimed_by = 'other', claim_token = -1 WHERE run_id = $1",
    )
    .bind(run.id().0)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
    gate.go.notify_one();
    while rt.stats().rejected == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(
        rt.result::<u32>(run.id()).await.unwrap(),
        RunOutcome::Running
    ));
    let owner: String = sqlx::query_scalar("SELECT claimed_by FROM pgflow.tasks WHERE run_id = $1")
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, "other", "the late completion changed nothing");
    // The new owner gives it back; it runs again and completes once.
    sqlx::query("UPDATE pgflow.tasks SET claimed_by = NULL, claim_token = NULL WHERE run_id = $1")
        .bind(run.id().0)
        .execute(&pool)
        .await
        .unwrap();
    gate.go.notify_one();
    assert_eq!(wait::<u32>(&rt, run.id()).await.unwrap(), 40);
    assert_eq!(rt.stats().rejected, 1);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn shutdown_lets_in_flight_steps_finish_and_flushes_them(pool: PgPool) {
    let gate = Arc::new(Gate::default());
    let rt = gated_runtime(&pool, &gate).await;
    let run = rt.start::<Gated>(2).await.unwrap();
    gate.entered.notified().await;
    let stopping = tokio::spawn({
        let rt = rt.clone();
        async move { rt.shutdown().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the in-flight step"
    );
    gate.go.notify_one();
    stopping.await.unwrap().unwrap();
    let (status, output): (String, String) =
        sqlx::query_as("SELECT status, output::text FROM pgflow.runs WHERE id = $1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), output.as_str()), ("succeeded", "20"));
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn tasks_of_unregistered_workflows_are_left_alone(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 2)]).await;
    sqlx::query(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts)
         VALUES (424242, 0, 'deployed_elsewhere', 1, 'default', 3)",
    )
    .execute(&pool)
    .await
    .unwrap();
    // other work flows past it
    assert_eq!(
        rt.start::<TwoSteps>(8).await.unwrap().wait().await.unwrap(),
        8
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let claimed: Option<String> = sqlx::query_scalar(
        "SELECT claimed_by FROM pgflow.tasks WHERE workflow = 'deployed_elsewhere'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(claimed, None);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn instances_register_heartbeat_and_refuse_a_live_duplicate_id(pool: PgPool) {
    let a = pgflow_suite::llm::limits(Runtime::builder())
        .pool(pool.clone())
        .instance_id("instance_a")
        .queue("default", 3)
        .queue("llm", 2)
        .heartbeat_interval(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    assert_eq!(a.instance_id(), "instance_a");
    let err = Runtime::builder()
        .pool(pool.clone())
        .instance_id("instance_a")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InstanceIdInUse { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("instance id `instance_a` is in use"),
        "{err}"
    );

    let before: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT last_heartbeat FROM pgflow.instances WHERE id = 'instance_a'")
            .fetch_one(&pool)
            .await
            .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let list = a.instances().await.unwrap();
    let me = list.iter().find(|i| i.id == "instance_a").unwrap();
    assert!(me.last_heartbeat > before, "heartbeats move last_heartbeat");
    assert_eq!(me.status, "online");
    assert_eq!(me.capacity, 5);
    assert_eq!(me.queues.get("llm"), Some(&2));
    assert_eq!(me.pid, std::process::id() as i32);
    assert!(me.idle < Duration::from_secs(5));

    a.shutdown().await.unwrap();
    let status: String =
        sqlx::query_scalar("SELECT status FROM pgflow.instances WHERE id = 'instance_a'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "offline");
    // a clean shutdown frees the id
    let again = Runtime::builder()
        .pool(pool.clone())
        .instance_id("instance_a")
        .start()
        .await
        .unwrap();
    again.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_dead_instance_goes_offline_and_its_tasks_run_elsewhere(pool: PgPool) {
    let producer = runtime(&pool, &[]).await;
    let run = producer.start::<TwoSteps>(6).await.unwrap();
    // An instance on another host claimed the first step, then stopped heartbeating.
    sqlx::query(
        "INSERT INTO pgflow.instances (id, host, pid, status, last_heartbeat)
         VALUES ('ghost', 'elsewhere', 1, 'online', now() - interval '1 minute')",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE pgflow.tasks SET claimed_by = 'ghost', claim_token = 7, claimed_at = now(),
                lease_until = now() + interval '1 hour'
         WHERE run_id = $1",
    )
    .bind(run.id().0)
    .execute(&pool)
    .await
    .unwrap();
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 2)
        .offline_after(Duration::from_secs(2))
        .rescue_interval(Duration::from_millis(100))
        .data(Arc::new(Counter::default()))
        .start()
        .await;
    let rt = rt.unwrap();
    assert_eq!(wait::<u32>(&rt, run.id()).await.unwrap(), 6);
    let (status,): (String,) =
        sqlx::query_as("SELECT status FROM pgflow.instances WHERE id = 'ghost'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "offline");
    let (attempts, completed_by): (i32, String) = sqlx::query_as(
        "SELECT attempts, instance_id FROM pgflow.step_states WHERE run_id = $1 AND step = 0",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, 2, "the ghost's attempt is counted");
    assert_eq!(completed_by, rt.instance_id());
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_expired_lease_returns_the_task_with_the_attempt_counted(pool: PgPool) {
    let rt = runtime(&pool, &[]).await;
    let run = rt.start::<TwoSteps>(5).await.unwrap();
    // A live instance lost this claim (its lease is long over).
    sqlx::query(
        "UPDATE pgflow.tasks SET claimed_by = $2, claim_token = 9, claimed_at = now(),
                lease_until = now() - interval '1 second'
         WHERE run_id = $1",
    )
    .bind(run.id().0)
    .bind(rt.instance_id())
    .execute(&pool)
    .await
    .unwrap();
    let worker = runtime(&pool, &[("default", 2)]).await;
    assert_eq!(wait::<u32>(&worker, run.id()).await.unwrap(), 5);
    let (attempts,): (i32,) =
        sqlx::query_as("SELECT attempts FROM pgflow.step_states WHERE run_id = $1 AND step = 0")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 2);
    worker.shutdown().await.unwrap();
    rt.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Conditional steps (`when`)

pub struct Review;

#[workflow(name = "rt_review", max_attempts = 1)]
impl Review {
    #[step]
    async fn draft(text: String) -> Result<String, StepError> {
        Ok(text.trim().to_owned())
    }

    #[step(when = Self::is_long)]
    async fn review(draft: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.data::<Arc<Counter>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok(format!("reviewed: {draft}"))
    }

    #[step(depends_on = [draft, review])]
    async fn publish(draft: String, review: Option<String>) -> Result<String, StepError> {
        Ok(review.unwrap_or_else(|| format!("as is: {draft}")))
    }

    fn is_long(draft: &str) -> bool {
        draft.len() > 10
    }
}

/// (step, status, output, reason) of a run's stored steps.
type StepRow = (i16, String, Option<String>, Option<String>);

async fn step_rows(pool: &PgPool, run: RunId) -> Vec<StepRow> {
    sqlx::query_as(
        "SELECT step, status, output::text, reason FROM pgflow.step_states
         WHERE run_id = $1 ORDER BY step",
    )
    .bind(run.0)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_skipped_step_is_recorded_with_its_reason_and_its_child_gets_none(pool: PgPool) {
    let counter = Arc::new(Counter::default());
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(50))
        .data(Arc::clone(&counter))
        .start()
        .await
        .unwrap();
    let short = rt.start::<Review>(" short ".into()).await.unwrap();
    let long = rt
        .start::<Review>("a much longer text".into())
        .await
        .unwrap();
    assert_eq!(short.wait().await.unwrap(), "as is: short");
    assert_eq!(long.wait().await.unwrap(), "reviewed: a much longer text");
    assert_eq!(
        counter.0.load(Ordering::SeqCst),
        1,
        "the skipped step never ran"
    );
    // (the terminal join's own row is its parent counter, not shown)
    assert_eq!(
        step_rows(&pool, short.id()).await[..2],
        [
            (0, "completed".into(), Some("\"short\"".into()), None),
            (
                1,
                "skipped".into(),
                None,
                Some("`when = Self::is_long` was false".into())
            ),
        ]
    );
    assert_eq!(
        step_rows(&pool, long.id()).await[1],
        (
            1,
            "completed".into(),
            Some("\"reviewed: a much longer text\"".into()),
            None
        )
    );
    rt.shutdown().await.unwrap();
}

pub struct SkipChain;

#[workflow(name = "rt_skip_chain", max_attempts = 1)]
impl SkipChain {
    #[step]
    async fn start(n: i64) -> Result<i64, StepError> {
        Ok(n)
    }

    #[step(when = Self::positive)]
    async fn double(n: i64) -> Result<i64, StepError> {
        Ok(n * 2)
    }

    #[step(when = Self::was_doubled)]
    async fn add_one(doubled: Option<i64>) -> Result<i64, StepError> {
        Ok(doubled.unwrap_or_default() + 1)
    }

    /// Its only parent may be skipped: it still runs, with `None`.
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

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn skips_chain_through_conditional_children(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 4)]).await;
    let ran = rt.start::<SkipChain>(3).await.unwrap();
    let skipped = rt.start::<SkipChain>(-1).await.unwrap();
    assert_eq!(ran.wait().await.unwrap(), "Some(7)");
    assert_eq!(skipped.wait().await.unwrap(), "None");
    let statuses = |rows: Vec<StepRow>| rows.into_iter().map(|r| r.1).collect::<Vec<_>>();
    assert_eq!(
        statuses(step_rows(&pool, skipped.id()).await),
        ["completed", "skipped", "skipped"]
    );
    assert_eq!(
        statuses(step_rows(&pool, ran.id()).await),
        ["completed", "completed", "completed"]
    );
    rt.shutdown().await.unwrap();
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Basket {
    pub cents: u64,
    pub vip: bool,
}

pub struct Discount;

#[workflow(name = "rt_discount", max_attempts = 1)]
impl Discount {
    #[step]
    async fn price(basket: Basket) -> Result<u64, StepError> {
        Ok(basket.cents)
    }

    #[step(when = Self::deserves_discount)]
    async fn discount(price: u64, input: Basket) -> Result<u64, StepError> {
        Ok(if input.vip { price * 9 / 10 } else { price })
    }

    /// A conditional terminal step: the output is an `Option`.
    #[step(when = Self::discounted)]
    async fn total(discount: Option<u64>) -> Result<u64, StepError> {
        Ok(discount.unwrap_or_default())
    }

    /// Reads the workflow input.
    fn deserves_discount(price: &u64, input: &Basket) -> bool {
        input.vip && *price >= 1_000
    }

    fn discounted(discount: &Option<u64>) -> bool {
        discount.is_some()
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_predicate_reads_the_input_and_a_skipped_terminal_step_outputs_none(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 4)]).await;
    let vip = rt
        .start::<Discount>(Basket {
            cents: 2_000,
            vip: true,
        })
        .await
        .unwrap();
    let regular = rt
        .start::<Discount>(Basket {
            cents: 2_000,
            vip: false,
        })
        .await
        .unwrap();
    assert_eq!(vip.wait().await.unwrap(), Some(1_800));
    assert_eq!(regular.wait().await.unwrap(), None);
    let (status, output): (String, String) =
        sqlx::query_as("SELECT status, output::text FROM pgflow.runs WHERE id = $1")
            .bind(regular.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), output.as_str()), ("succeeded", "null"));
    rt.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// Map steps (`map`)

pub struct Squares;

#[workflow(name = "rt_squares", max_attempts = 1)]
impl Squares {
    /// A root map step: the workflow input is a `Vec<u64>`.
    #[step(map)]
    async fn square(n: u64, ctx: &StepContext) -> Result<u64, StepError> {
        assert_eq!(ctx.element().map(|e| e as u64), Some(n));
        Ok(n * n)
    }

    #[step]
    async fn sum(squares: Vec<u64>) -> Result<(u64, Vec<u64>), StepError> {
        Ok((squares.iter().sum(), squares))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_map_runs_one_task_per_element_and_keeps_the_input_order(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 16)]).await;
    for n in [0_u64, 1, 1_000] {
        let input: Vec<u64> = (0..n).collect();
        let run = rt.start::<Squares>(input.clone()).await.unwrap();
        let (sum, squares) = run.wait().await.unwrap();
        let expected: Vec<u64> = input.iter().map(|n| n * n).collect();
        assert_eq!(squares, expected, "n={n}");
        assert_eq!(sum, expected.iter().sum::<u64>());
        let (elements, distinct): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT element) FROM pgflow.step_elements WHERE run_id = $1",
        )
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((elements, distinct), (n as i64, n as i64));
        let (status, remaining): (String, i32) = sqlx::query_as(
            "SELECT status, remaining FROM pgflow.step_states WHERE run_id = $1 AND step = 0",
        )
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!((status.as_str(), remaining), ("completed", 0));
    }
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tasks, 0);
    rt.shutdown().await.unwrap();
}

pub struct Shout;

#[workflow(name = "rt_shout", max_attempts = 1)]
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

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_terminal_map_step_over_a_parent_completes_the_run_with_the_vec(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 4)]).await;
    let run = rt.start::<Shout>("ab cd e".into()).await.unwrap();
    assert_eq!(run.wait().await.unwrap(), ["AB/7", "CD/7", "E/7"]);
    // the terminal map step's state is complete; its output is the run's
    let rows = step_rows(&pool, run.id()).await;
    assert_eq!(rows[1], (1, "completed".to_owned(), None, None));
    let empty = rt.start::<Shout>("   ".into()).await.unwrap();
    assert!(empty.wait().await.unwrap().is_empty());
    rt.shutdown().await.unwrap();
}

pub struct MapFlaky;

#[workflow(name = "rt_map_flaky", backoff = "10ms", max_attempts = 3)]
impl MapFlaky {
    #[step(map)]
    async fn check(n: i32, ctx: &StepContext) -> Result<i32, StepError> {
        ctx.data::<Arc<Counter>>()?.0.fetch_add(1, Ordering::SeqCst);
        if n < 0 {
            return Err(StepError::retryable(format!("{n} is negative")));
        }
        if n % 10 == 3 && ctx.attempt() == 1 {
            return Err(StepError::retryable(format!("{n}: first attempt fails")));
        }
        Ok(n + 1)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_failing_element_is_retried_on_its_own(pool: PgPool) {
    let counter = Arc::new(Counter::default());
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 8)
        .poll_interval(Duration::from_millis(20))
        .data(Arc::clone(&counter))
        .start()
        .await
        .unwrap();
    let run = rt.start::<MapFlaky>((0..20).collect()).await.unwrap();
    assert_eq!(run.wait().await.unwrap(), (1..=20).collect::<Vec<_>>());
    assert_eq!(counter.0.load(Ordering::SeqCst), 22, "3 and 13 ran twice");
    let retried: Vec<(i32, i32)> = sqlx::query_as(
        "SELECT element, attempts FROM pgflow.step_elements
         WHERE run_id = $1 AND attempts > 1 ORDER BY element",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(retried, [(3, 2), (13, 2)]);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_exhausted_element_fails_the_run_with_its_index(pool: PgPool) {
    let rt = runtime(&pool, &[("default", 4)]).await;
    let run = rt.start::<MapFlaky>(vec![1, 2, -5, 4]).await.unwrap();
    let err = run.wait().await.unwrap_err();
    let Error::Run(RunError::StepFailed {
        step,
        element,
        history,
        ..
    }) = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((step.as_str(), *element), ("check", Some(2)));
    let messages: Vec<&str> = history.iter().map(|h| h.message.as_str()).collect();
    assert_eq!(messages, ["-5 is negative"; 3]);
    assert!(err.to_string().contains("(element 2)"), "{err}");
    let (status, errors): (String, i64) = sqlx::query_as(
        "SELECT status, jsonb_array_length(errors)::bigint FROM pgflow.step_states
         WHERE run_id = $1 AND step = 0",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), errors), ("failed", 3));
    rt.shutdown().await.unwrap();
}

/// Holds every element until both runtimes have run one.
#[derive(Default)]
pub struct BothInstances {
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    both: tokio::sync::Notify,
}

/// The instance a runtime's steps run on (each runtime gets its own).
pub struct Instance(&'static str);

pub struct Spread;

#[workflow(name = "rt_spread", max_attempts = 1, timeout = "60s")]
impl Spread {
    #[step(map)]
    async fn each(n: u32, ctx: &StepContext) -> Result<String, StepError> {
        let instance = ctx.data::<Instance>()?.0;
        let gate = ctx.data::<Arc<BothInstances>>()?;
        let notified = gate.both.notified();
        let both = {
            let mut seen = gate
                .seen
                .lock()
                .map_err(|e| StepError::permanent(e.to_string()))?;
            seen.insert(instance.to_owned());
            seen.len() == 2
        };
        if both {
            gate.both.notify_waiters();
        } else {
            notified.await;
        }
        Ok(format!("{n}@{instance}"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn map_elements_spread_across_two_runtimes(pool: PgPool) {
    let gate = Arc::new(BothInstances::default());
    let start = |id: &'static str| {
        Runtime::builder()
            .pool(pool.clone())
            .instance_id(id)
            .queue("default", 2)
            .poll_interval(Duration::from_millis(20))
            .data(Instance(id))
            .data(Arc::clone(&gate))
            .start()
    };
    let a = start("instance_a").await.unwrap();
    let b = start("instance_b").await.unwrap();
    // Neither runtime can finish the run alone: an element waits until both have
    // run one, and each runtime holds at most two elements at a time.
    let run = a.start::<Spread>((0..40).collect()).await.unwrap();
    let out = wait::<Vec<String>>(&a, run.id()).await.unwrap();
    let numbers: Vec<u32> = out
        .iter()
        .map(|s| s.split('@').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    let by_instance: Vec<(String, i64)> = sqlx::query_as(
        "SELECT instance_id, count(*) FROM pgflow.step_elements
         WHERE run_id = $1 GROUP BY instance_id ORDER BY instance_id",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap();
    let instances: Vec<&str> = by_instance.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(instances, ["instance_a", "instance_b"]);
    assert_eq!(by_instance.iter().map(|r| r.1).sum::<i64>(), 40);
    // what each element's output says matches where it was recorded
    for (element, text) in out.iter().enumerate() {
        let recorded: String = sqlx::query_scalar(
            "SELECT instance_id FROM pgflow.step_elements WHERE run_id = $1 AND element = $2",
        )
        .bind(run.id().0)
        .bind(element as i32)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(
            text.ends_with(&format!("@{recorded}")),
            "{text} vs {recorded}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

type DefinitionRow = (String, i32, String, String, Option<String>, Option<String>);

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn conditional_and_map_steps_are_in_the_stored_definition(pool: PgPool) {
    let rt = runtime(&pool, &[]).await;
    // workflow, step, name, kind, predicate, map parameter
    let rows: Vec<DefinitionRow> = sqlx::query_as(
        "SELECT workflow, step, name, kind, predicate, map_param FROM pgflow.workflow_steps
         WHERE workflow IN ('rt_review', 'rt_squares') ORDER BY workflow, step",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let row =
        |wf: &str, step: i32, name: &str, kind: &str, when: Option<&str>, map: Option<&str>| {
            (
                wf.to_owned(),
                step,
                name.to_owned(),
                kind.to_owned(),
                when.map(str::to_owned),
                map.map(str::to_owned),
            )
        };
    assert_eq!(
        rows,
        [
            row("rt_review", 0, "draft", "single", None, None),
            row(
                "rt_review",
                1,
                "review",
                "conditional",
                Some("Self::is_long"),
                None
            ),
            row("rt_review", 2, "publish", "single", None, None),
            row("rt_squares", 0, "square", "map", None, Some("n")),
            row("rt_squares", 1, "sum", "single", None, None),
        ]
    );
    let output: String = sqlx::query_scalar(
        "SELECT definition ->> 'output' FROM pgflow.workflows WHERE name = 'rt_discount'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(output, "Option<u64>");
    rt.shutdown().await.unwrap();
}

pub struct HeldElements;

#[workflow(name = "rt_held_elements", max_attempts = 2)]
impl HeldElements {
    #[step(map)]
    async fn held(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let gate = ctx.data::<Arc<Gate>>()?;
        gate.entered.notify_one();
        gate.go.notified().await;
        Ok(n)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_element_whose_lease_expired_on_its_last_attempt_fails_the_run_with_its_index(
    pool: PgPool,
) {
    let gate = Arc::new(Gate::default());
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(20))
        .rescue_interval(Duration::from_millis(50))
        .shutdown_grace(Duration::from_secs(2))
        .data(Arc::clone(&gate))
        .start()
        .await
        .unwrap();
    let run = rt.start::<HeldElements>(vec![10, 11, 12]).await.unwrap();
    gate.entered.notified().await;
    // Element 1 is held by an instance that died on its last attempt.
    let n = sqlx::query(
        "UPDATE pgflow.tasks
         SET claimed_by = 'dead-instance', claim_token = 1, attempt = max_attempts,
             lease_until = now() - interval '1 second'
         WHERE run_id = $1 AND element = 1",
    )
    .bind(run.id().0)
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(n, 1);
    let err = wait::<Vec<u32>>(&rt, run.id()).await.unwrap_err();
    let Error::Run(RunError::StepFailed {
        step,
        element,
        history,
        ..
    }) = &err
    else {
        panic!("unexpected {err:?}");
    };
    assert_eq!((step.as_str(), *element), ("held", Some(1)));
    assert!(
        history[0].message.contains("lease expired") && history[0].kind == ErrorKind::Timeout,
        "{history:?}"
    );
    // let the held elements finish: their completions land in a failed run
    for _ in 0..3 {
        gate.go.notify_one();
    }
    rt.shutdown().await.unwrap();
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE id = $1")
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_claim_never_takes_more_tasks_than_free_slots(pool: PgPool) {
    // Thousands of due tasks and steps that block: the claimed rows must stay at the
    // concurrency (a claim whose locking subquery is re-run per row would take them all).
    let gate = Arc::new(Gate::default());
    let producer = runtime(&pool, &[]).await;
    for chunk in (0..5_000_u32).collect::<Vec<_>>().chunks(1_000) {
        producer.start_many::<Gated>(chunk.to_vec()).await.unwrap();
    }
    sqlx::query("ANALYZE pgflow.tasks")
        .execute(&pool)
        .await
        .unwrap();
    let rt = Runtime::builder()
        .pool(pool.clone())
        .instance_id("bounded")
        .queue("default", 4)
        .shutdown_grace(Duration::from_millis(200))
        .data(Arc::clone(&gate))
        .start()
        .await
        .unwrap();
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pgflow.tasks WHERE claimed_by = 'bounded'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    while count().await < 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // the claimer is awake (polling every 250 ms) and its slots are full: no more
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(count().await, 4);
    // the blocked steps are given back at shutdown
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}

/// Fails element 2 while the shared switch is on; a conditional step decides once.
#[derive(Default)]
pub struct Switch(std::sync::atomic::AtomicBool);

pub struct MapThenGate;

#[workflow(name = "rt_map_then_gate", max_attempts = 1)]
impl MapThenGate {
    #[step]
    async fn items(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(when = Self::has_many)]
    async fn note(items: Vec<u32>) -> Result<String, StepError> {
        Ok(format!("{} items", items.len()))
    }

    #[step(map, depends_on = [items])]
    async fn double(items: u32, ctx: &StepContext) -> Result<u32, StepError> {
        if items == 2 && ctx.data::<Arc<Switch>>()?.0.load(Ordering::SeqCst) {
            return Err(StepError::permanent("element 2 refused"));
        }
        Ok(items * 2)
    }

    #[step(depends_on = [note, double])]
    async fn total(note: Option<String>, double: Vec<u32>) -> Result<String, StepError> {
        let sum: u32 = double.iter().sum();
        Ok(format!("{sum} ({})", note.unwrap_or_else(|| "few".into())))
    }

    fn has_many(items: &[u32]) -> bool {
        items.len() > 10
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retry_resumes_a_run_with_conditional_and_map_steps(pool: PgPool) {
    let switch = Arc::new(Switch::default());
    switch.0.store(true, Ordering::SeqCst);
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(20))
        .data(Arc::clone(&switch))
        .start()
        .await
        .unwrap();
    let run = rt.start::<MapThenGate>(5).await.unwrap();
    let err = run.wait().await.unwrap_err();
    assert!(err.to_string().contains("element 2 refused"), "{err}");
    // Elements still running when the run failed land (in the failed run) first.
    pgflow_suite::support::wait_no_claims(&pool, run.id().0).await;
    // The map step's elements were fanned out in SQL: no task without an element
    // ever existed for it (its state counts 5 elements, `step_elements` has the
    // ones that completed).
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_elements WHERE run_id = $1 AND step = 2",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(stored <= 4, "{stored}");

    switch.0.store(false, Ordering::SeqCst);
    let report = pgflow_runtime::admin::retry(&pool, run.id()).await.unwrap();
    assert_eq!(
        report.reused,
        ["items", "note"],
        "the skip decision is kept"
    );
    // The map step keeps its completed elements (or, with none, runs again in full).
    if stored == 0 {
        assert_eq!(report.cleared, ["double"]);
    } else {
        assert!(report.cleared.is_empty(), "{report:?}");
        assert_eq!(report.resumed[0].step, "double");
        assert_eq!(report.resumed[0].kept, stored);
        assert_eq!(report.resumed[0].kept + report.resumed[0].rerun, 5);
    }
    assert_eq!(report.enqueued, ["double"]);
    assert_eq!(run.wait().await.unwrap(), "20 (few)");
    // the skipped step stayed skipped: it did not run again
    let note: String =
        sqlx::query_scalar("SELECT status FROM pgflow.step_states WHERE run_id = $1 AND step = 1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(note, "skipped");
    let detail = pgflow_runtime::admin::run_detail(&pool, run.id())
        .await
        .unwrap();
    let names: Vec<&str> = detail.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["items", "note", "double", "total"]);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_map_child_fans_out_in_the_flush_that_completes_its_parent(pool: PgPool) {
    // A runtime that only produces: the run's first task waits in the queue.
    let producer = Runtime::builder()
        .pool(pool.clone())
        .instance_id("producer")
        .start()
        .await
        .unwrap();
    let run = producer.start::<MapThenGate>(3).await.unwrap();
    // A worker runs `items`; its flush enqueues the map step as one task per element
    // (and the conditional step), never a task that carries the vector.
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(20))
        .data(Arc::new(Switch::default()))
        .start()
        .await
        .unwrap();
    assert_eq!(wait::<String>(&rt, run.id()).await.unwrap(), "6 (few)");
    // items, note, three elements, total: no task for the map step as a whole
    assert_eq!(rt.stats().tasks_claimed, 6);
    let elements: Vec<i32> = sqlx::query_scalar(
        "SELECT element FROM pgflow.step_elements WHERE run_id = $1 AND step = 2 ORDER BY element",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(elements, [0, 1, 2]);
    // an empty vector completes the map step with `[]`
    let empty = producer.start::<MapThenGate>(0).await.unwrap();
    assert_eq!(wait::<String>(&rt, empty.id()).await.unwrap(), "0 (few)");
    rt.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}
