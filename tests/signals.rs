//! Signals, durably (against the real Postgres: sent before and after the step is
//! reached, twice, after cancel, after a timeout, by name, in SQL inside the caller's
//! transaction, a payload that does not fit) and in process on tokio's paused clock,
//! where a 72-hour timeout takes no time. Each database test has its own database.

use std::time::Duration;

use pgflow::{ExecuteOptions, RunError, RunId, SignalOutcome, Signals, StepError, workflow};
use pgflow_runtime::{Error, Runtime, admin};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub ok: bool,
}

pub struct Review;

#[workflow(name = "signal_review")]
impl Review {
    #[step]
    async fn draft(topic: String) -> Result<String, StepError> {
        Ok(format!("draft about {topic}"))
    }

    #[step(signal = approval)]
    async fn publish(draft: String, approval: Approval) -> Result<String, StepError> {
        Ok(if approval.ok {
            format!("{draft}, approved by {}", approval.by)
        } else {
            format!("{draft}, rejected by {}", approval.by)
        })
    }
}

pub struct Deadline;

#[workflow(name = "signal_deadline")]
impl Deadline {
    #[step(signal = answer, signal_timeout = "1500ms")]
    async fn ask(input: String, answer: Option<u32>) -> Result<String, StepError> {
        Ok(match answer {
            Some(n) => format!("{input}: {n}"),
            None => format!("{input}: no answer"),
        })
    }
}

pub struct Followed;

#[workflow(name = "signal_followed")]
impl Followed {
    #[step(signal = answer, signal_timeout = "1s")]
    async fn ask(input: String, answer: Option<u32>) -> Result<String, StepError> {
        Ok(format!("{input}: {answer:?}"))
    }

    // keeps the run going after `ask`
    #[step(delay = "1h")]
    async fn later(ask: String) -> Result<String, StepError> {
        Ok(ask)
    }
}

pub struct Patient;

#[workflow(name = "signal_patient")]
impl Patient {
    #[step(delay = "2s", signal = go)]
    async fn wait(input: u32, go: u32) -> Result<u32, StepError> {
        Ok(input + go)
    }
}

async fn runtime(pool: &PgPool) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 1)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap()
}

use pgflow_suite::support::settle;

/// Waits until run `id` has a task for step `step` (its step is reached).
async fn reached(pool: &PgPool, id: RunId, step: i16) -> (bool, bool) {
    for _ in 0..500 {
        let row: Option<(bool, bool)> = sqlx::query_as(
            "SELECT parked, claimed_by IS NOT NULL FROM pgflow.tasks WHERE run_id = $1 AND step = $2",
        )
        .bind(id.0)
        .bind(step)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(row) = row {
            return row;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("step {step} of run {id} was never reached");
}

async fn signal_rows(pool: &PgPool, id: RunId) -> Vec<(String, String)> {
    sqlx::query_as("SELECT name, status FROM pgflow.signals WHERE run_id = $1 ORDER BY id")
        .bind(id.0)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_signal_after_the_step_is_reached_is_delivered_and_the_first_wins(pool: PgPool) {
    let rt = runtime(&pool).await;
    let run = rt.start::<Review>("cats".to_owned()).await.unwrap();
    // The waiting step is parked, holding no slot: other work goes through.
    assert_eq!(reached(&pool, run.id(), 1).await, (true, false));
    let approval = Approval {
        by: "ada".to_owned(),
        ok: true,
    };
    // Both in one transaction: the step cannot run (and end the run) between them.
    let mut tx = pool.begin().await.unwrap();
    let first = pgflow_runtime::signal_in(&mut *tx, run.id(), Review::approval, approval)
        .await
        .unwrap();
    assert_eq!(first, SignalOutcome::Delivered);
    let second = pgflow_runtime::signal_in(
        &mut *tx,
        run.id(),
        Review::approval,
        Approval {
            by: "bob".to_owned(),
            ok: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(second, SignalOutcome::Duplicate);
    tx.commit().await.unwrap();
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "draft about cats, approved by ada"
    );
    assert_eq!(
        signal_rows(&pool, run.id()).await,
        [
            ("approval".to_owned(), "accepted".to_owned()),
            ("approval".to_owned(), "duplicate".to_owned())
        ]
    );
    // A finished run refuses signals.
    let err = rt
        .signal(
            run.id(),
            Review::approval,
            Approval {
                by: "eve".to_owned(),
                ok: true,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::RunNotRunning { status, .. } if status == "succeeded"),
        "{err}"
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_signal_sent_before_the_step_is_reached_is_kept(pool: PgPool) {
    // Started and signalled with no runtime serving it: the step is not reached.
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("other", 1)
        .start()
        .await
        .unwrap();
    let run = rt.start::<Review>("dogs".to_owned()).await.unwrap();
    let outcome = admin::signal(
        &pool,
        run.id(),
        "approval",
        serde_json::json!({"by": "ada", "ok": false}),
    )
    .await
    .unwrap();
    assert_eq!(outcome, SignalOutcome::Kept);
    rt.shutdown().await.unwrap();
    let rt = runtime(&pool).await;
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "draft about dogs, rejected by ada"
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn the_sql_function_works_in_the_callers_transaction_and_checks_names(pool: PgPool) {
    let rt = runtime(&pool).await;
    let run = rt.start::<Review>("fish".to_owned()).await.unwrap();
    reached(&pool, run.id(), 1).await;
    let mut tx = pool.begin().await.unwrap();
    let answer: String = sqlx::query_scalar(
        "SELECT pgflow.signal($1, 'approval', '{\"by\": \"sql\", \"ok\": true}')",
    )
    .bind(run.id().0)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(answer, "delivered");
    // Rolled back: as if never sent.
    tx.rollback().await.unwrap();
    assert!(signal_rows(&pool, run.id()).await.is_empty());
    assert_eq!(reached(&pool, run.id(), 1).await, (true, false));

    let err = admin::signal(&pool, run.id(), "aproval", serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::UnknownSignal { name, known, .. } if name == "aproval" && known == "`approval`"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "no step of run {} waits for a signal named `aproval`; it waits for `approval`",
            run.id()
        )
    );
    let err = admin::signal(&pool, RunId(999_999), "approval", serde_json::json!({}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RunNotFound(RunId(999_999))), "{err}");

    // A payload that does not fit is stored, and fails the step with the serde path.
    let mut tx = pool.begin().await.unwrap();
    let outcome = admin::signal(
        &mut *tx,
        run.id(),
        "approval",
        serde_json::json!({"by": 7, "ok": true}),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(outcome, SignalOutcome::Delivered);
    let err = settle::<String>(&rt, run.id()).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("approval") && message.contains("`by`"),
        "{message}"
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_timeout_gives_none_and_a_late_signal_is_reported(pool: PgPool) {
    let rt = runtime(&pool).await;
    let run = rt.start::<Deadline>("question".to_owned()).await.unwrap();
    assert_eq!(reached(&pool, run.id(), 0).await, (true, false));
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "question: no answer"
    );
    let err = rt.signal(run.id(), Deadline::answer, 42).await.unwrap_err();
    assert!(matches!(err, Error::RunNotRunning { .. }), "{err}");

    // Answered in time: the payload, as `Some`.
    let run = rt.start::<Deadline>("again".to_owned()).await.unwrap();
    reached(&pool, run.id(), 0).await;
    assert_eq!(
        rt.signal(run.id(), Deadline::answer, 42).await.unwrap(),
        SignalOutcome::Delivered
    );
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "again: 42");

    // The step ran with `None` and the run goes on: a later signal is too late.
    let run = rt.start::<Followed>("late".to_owned()).await.unwrap();
    reached(&pool, run.id(), 1).await;
    assert_eq!(
        rt.signal(run.id(), Followed::answer, 7).await.unwrap(),
        SignalOutcome::TooLate
    );
    let ask: String = sqlx::query_scalar(
        "SELECT output #>> '{}' FROM pgflow.step_states WHERE run_id = $1 AND step = 0",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(ask, "late: None");
    assert_eq!(
        signal_rows(&pool, run.id()).await,
        [("answer".to_owned(), "late".to_owned())]
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_cancelled_run_stops_waiting_and_refuses_signals(pool: PgPool) {
    let rt = runtime(&pool).await;
    let run = rt.start::<Review>("birds".to_owned()).await.unwrap();
    reached(&pool, run.id(), 1).await;
    assert!(rt.cancel(run.id()).await.unwrap());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks WHERE run_id = $1")
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the waiting task is gone");
    let err = rt
        .signal(
            run.id(),
            Review::approval,
            Approval {
                by: "ada".to_owned(),
                ok: true,
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::RunNotRunning { status, .. } if status == "cancelled"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "run {} has status `cancelled`: it takes no more signals",
            run.id()
        )
    );
    let status: String = sqlx::query_scalar("SELECT status FROM pgflow.runs WHERE id = $1")
        .bind(run.id().0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "cancelled");
    rt.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn in_process_signals_have_the_same_semantics() {
    // Before the step: kept; the second: a duplicate.
    let signals = Signals::new();
    let approval = Approval {
        by: "ada".to_owned(),
        ok: true,
    };
    assert_eq!(
        signals.send(Review::approval, approval.clone()).unwrap(),
        SignalOutcome::Kept
    );
    assert_eq!(
        signals.send(Review::approval, approval.clone()).unwrap(),
        SignalOutcome::Duplicate
    );
    let out =
        pgflow::execute_with::<Review>("cats".to_owned(), ExecuteOptions::new().signals(signals))
            .await
            .unwrap();
    assert_eq!(out, "draft about cats, approved by ada");

    // During the run: delivered to the waiting step.
    let signals = Signals::new();
    let sender = signals.clone();
    let run = tokio::spawn(pgflow::execute_with::<Review>(
        "dogs".to_owned(),
        ExecuteOptions::new().signals(signals),
    ));
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        sender.send(Review::approval, approval.clone()).unwrap(),
        SignalOutcome::Delivered
    );
    assert_eq!(
        run.await.unwrap().unwrap(),
        "draft about dogs, approved by ada"
    );
    assert_eq!(
        sender.send(Review::approval, approval.clone()).unwrap(),
        SignalOutcome::Duplicate,
        "delivered and taken: a later one is a duplicate"
    );

    // A timeout: `None`, and a later signal is too late.
    let signals = Signals::new();
    let start = tokio::time::Instant::now();
    let out = pgflow::execute_with::<Deadline>(
        "q".to_owned(),
        ExecuteOptions::new().signals(signals.clone()),
    )
    .await
    .unwrap();
    assert_eq!(out, "q: no answer");
    assert_eq!(start.elapsed(), Duration::from_millis(1500));
    assert_eq!(
        signals.send(Deadline::answer, 1).unwrap(),
        SignalOutcome::TooLate
    );

    // Cancel while waiting.
    let cancel = pgflow::CancelToken::new();
    let run = tokio::spawn(pgflow::execute_with::<Review>(
        "fish".to_owned(),
        ExecuteOptions::new().cancel(cancel.clone()),
    ));
    tokio::time::sleep(Duration::from_secs(72 * 3600)).await;
    cancel.cancel();
    assert!(matches!(
        run.await.unwrap(),
        Err(RunError::Cancelled { .. })
    ));
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_signal_and_the_enqueue_of_its_step_never_miss_each_other(pool: PgPool) {
    // Nothing serves the queue: the run stays at its first step.
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("other", 1)
        .start()
        .await
        .unwrap();
    let run = rt.start::<Review>("race".to_owned()).await.unwrap();
    let id = run.id().0;
    let due = "SELECT pgflow.signal_due($1, 'approval', now(), -1) = 'infinity'";
    let send = "SELECT pgflow.signal($1, 'approval', '{\"by\": \"ada\", \"ok\": true}')";

    // The signal first, uncommitted: the enqueue waits for it, then sees it (due now).
    let mut signal_tx = pool.begin().await.unwrap();
    let answer: String = sqlx::query_scalar(send)
        .bind(id)
        .fetch_one(&mut *signal_tx)
        .await
        .unwrap();
    assert_eq!(answer, "kept");
    let enqueue = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let never: bool = sqlx::query_scalar(due)
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            never
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !enqueue.is_finished(),
        "the enqueue waits for the signal's commit"
    );
    signal_tx.commit().await.unwrap();
    assert!(!enqueue.await.unwrap(), "due now, not parked forever");

    // The enqueue first, uncommitted: a signal waits for it (then finds the task).
    let run = rt.start::<Review>("race again".to_owned()).await.unwrap();
    let id = run.id().0;
    let mut enqueue_tx = pool.begin().await.unwrap();
    let never: bool = sqlx::query_scalar(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, run_at,
                                   parked, waits_for)
         VALUES ($1, 1, 'signal_review', 1, 'default', 3,
                 pgflow.signal_due($1, 'approval', now(), -1), true, 'approval')
         RETURNING run_at = 'infinity'",
    )
    .bind(id)
    .fetch_one(&mut *enqueue_tx)
    .await
    .unwrap();
    assert!(never);
    let signal = {
        let pool = pool.clone();
        tokio::spawn(async move {
            sqlx::query_scalar::<_, String>(send)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !signal.is_finished(),
        "the signal waits for the enqueue's commit"
    );
    enqueue_tx.commit().await.unwrap();
    assert_eq!(signal.await.unwrap(), "delivered");
    let parked: bool =
        sqlx::query_scalar("SELECT parked FROM pgflow.tasks WHERE run_id = $1 AND step = 1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!parked, "the task is due now");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_signal_during_the_delay_waits_for_the_delay(pool: PgPool) {
    let rt = runtime(&pool).await;
    let started = std::time::Instant::now();
    let run = rt.start::<Patient>(1).await.unwrap();
    assert_eq!(
        rt.signal(run.id(), Patient::go, 2).await.unwrap(),
        SignalOutcome::Delivered
    );
    assert_eq!(
        reached(&pool, run.id(), 0).await,
        (true, false),
        "still parked"
    );
    assert_eq!(settle::<u32>(&rt, run.id()).await.unwrap(), 3);
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    rt.shutdown().await.unwrap();

    // in process too: the delay, then the signal
    let signals = Signals::new();
    signals.send(Patient::go, 2).unwrap();
    let out = pgflow::execute_with::<Patient>(1, ExecuteOptions::new().signals(signals));
    let start = tokio::time::Instant::now();
    assert_eq!(out.await.unwrap(), 3);
    assert!(start.elapsed() >= Duration::from_secs(2));
}
