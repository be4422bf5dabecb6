//! Waiting on time, durably: `#[step(delay = ..)]` and `StepError::snooze` against the
//! real Postgres (parked tasks hold no slot, survive a restart, can be cancelled), and
//! the same semantics in the in-process executor on tokio's paused clock, where a
//! 72-hour delay takes no time. Each database test has its own database.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{ErrorKind, RunError, RunId, StepContext, StepError, workflow};
use pgflow_runtime::{RunOutcome, Runtime};
use sqlx::PgPool;

/// What the steps of this file record.
#[derive(Default)]
struct Probe {
    /// `Poll::wait` snoozes until this many calls have been made.
    ready_after: AtomicU32,
    polls: AtomicU32,
    /// The attempt number each poll saw.
    attempts_seen: std::sync::Mutex<Vec<u32>>,
}

async fn runtime(pool: &PgPool, probe: &Arc<Probe>, concurrency: usize) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", concurrency)
        .poll_interval(Duration::from_millis(20))
        .data(Arc::clone(probe))
        .start()
        .await
        .unwrap()
}

use pgflow_suite::support::settle;

/// (parked, claimed) of the tasks of run `id`.
async fn task_state(pool: &PgPool, id: RunId) -> Vec<(bool, bool)> {
    sqlx::query_as(
        "SELECT parked, claimed_by IS NOT NULL FROM pgflow.tasks WHERE run_id = $1 ORDER BY id",
    )
    .bind(id.0)
    .fetch_all(pool)
    .await
    .unwrap()
}

pub struct Reminder;

#[workflow(name = "delay_reminder")]
impl Reminder {
    #[step]
    async fn note(text: String) -> Result<String, StepError> {
        Ok(format!("remember: {text}"))
    }

    #[step(delay = "1500ms")]
    async fn remind(note: String) -> Result<String, StepError> {
        Ok(note.to_uppercase())
    }
}

pub struct Quick;

#[workflow(name = "delay_quick")]
impl Quick {
    #[step]
    async fn echo(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_delayed_step_runs_after_its_delay_without_holding_a_slot(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    // One slot: a waiting step would block every other run if it held it.
    let rt = runtime(&pool, &probe, 1).await;
    let run = rt.start::<Reminder>("milk".to_owned()).await.unwrap();
    // `note` completes; `remind` is parked (due 1.5 s later, more than a second ahead).
    let mut state = Vec::new();
    for _ in 0..200 {
        let noted: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.step_states WHERE run_id = $1")
                .bind(run.id().0)
                .fetch_one(&pool)
                .await
                .unwrap();
        if noted == 1 {
            state = task_state(&pool, run.id()).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        state,
        [(true, false)],
        "the delayed task is parked, unclaimed"
    );
    // Meanwhile other runs go through the single slot.
    for n in 0..5 {
        let q = rt.start::<Quick>(n).await.unwrap();
        assert_eq!(settle::<u32>(&rt, q.id()).await.unwrap(), n);
    }
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "REMEMBER: MILK"
    );
    // Due 1.5 s after its parent completed, not before.
    let waited_ms: f64 = sqlx::query_scalar(
        "SELECT (EXTRACT(EPOCH FROM (r.terminal_started_at - s.completed_at)) * 1000)::float8
         FROM pgflow.runs r JOIN pgflow.step_states s ON s.run_id = r.id AND s.step = 0
         WHERE r.id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        waited_ms >= 1500.0,
        "started {waited_ms} ms after its parent"
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_delay_survives_a_restart_and_can_be_cancelled(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    let rt = runtime(&pool, &probe, 2).await;
    let kept = rt.start::<Reminder>("keys".to_owned()).await.unwrap();
    let dropped = rt.start::<Reminder>("hat".to_owned()).await.unwrap();
    for id in [kept.id(), dropped.id()] {
        for _ in 0..200 {
            if task_state(&pool, id).await == [(true, false)] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(task_state(&pool, id).await, [(true, false)]);
    }
    // Every instance goes away while the steps wait: the deadline is in the table.
    rt.shutdown().await.unwrap();
    drop(rt);
    // Cancel works while waiting: the parked task is deleted, nothing runs.
    assert!(
        pgflow_runtime::admin::cancel(&pool, dropped.id())
            .await
            .unwrap()
            .cancelled
    );
    assert!(task_state(&pool, dropped.id()).await.is_empty());

    let rt = runtime(&pool, &probe, 2).await;
    assert_eq!(
        settle::<String>(&rt, kept.id()).await.unwrap(),
        "REMEMBER: KEYS"
    );
    assert!(matches!(
        rt.result::<String>(dropped.id()).await.unwrap(),
        RunOutcome::Cancelled
    ));
    rt.shutdown().await.unwrap();
}

pub struct Poll;

#[workflow(name = "delay_poll", max_attempts = 2)]
impl Poll {
    #[step(max_snoozes = 5)]
    async fn wait(job: String, ctx: &StepContext) -> Result<String, StepError> {
        let probe = ctx.data::<Arc<Probe>>()?;
        let n = probe.polls.fetch_add(1, Ordering::SeqCst) + 1;
        probe.attempts_seen.lock().unwrap().push(ctx.attempt());
        if n < probe.ready_after.load(Ordering::SeqCst) {
            return Err(StepError::snooze(Duration::from_millis(50)));
        }
        Ok(format!("{job} done after {n} polls"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_snooze_requeues_without_counting_an_attempt(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    probe.ready_after.store(4, Ordering::SeqCst);
    let rt = runtime(&pool, &probe, 2).await;
    let run = rt.start::<Poll>("batch-1".to_owned()).await.unwrap();
    assert_eq!(
        settle::<String>(&rt, run.id()).await.unwrap(),
        "batch-1 done after 4 polls"
    );
    // Four calls, all attempt 1: a snooze is not a failed attempt.
    assert_eq!(*probe.attempts_seen.lock().unwrap(), [1, 1, 1, 1]);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn too_many_snoozes_fail_the_step(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    probe.ready_after.store(u32::MAX, Ordering::SeqCst);
    let rt = runtime(&pool, &probe, 2).await;
    let run = rt.start::<Poll>("never".to_owned()).await.unwrap();
    let e = settle::<String>(&rt, run.id()).await.unwrap_err();
    let pgflow_runtime::Error::Run(RunError::StepFailed {
        step,
        history: attempts,
        ..
    }) = &e
    else {
        panic!("expected a step failure, got {e}");
    };
    assert_eq!(step, "wait");
    // max_snoozes = 5: five snoozes, then the sixth fails for good (permanent: no
    // second attempt although max_attempts = 2).
    assert_eq!(probe.polls.load(Ordering::SeqCst), 6);
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].kind, ErrorKind::Permanent);
    assert!(
        attempts[0].message.contains("snoozed 5 times"),
        "{}",
        attempts[0].message
    );
    rt.shutdown().await.unwrap();
}

pub struct LongPoll;

#[workflow(name = "delay_long_poll")]
impl LongPoll {
    #[step]
    async fn wait(job: String, ctx: &StepContext) -> Result<String, StepError> {
        let probe = ctx.data::<Arc<Probe>>()?;
        if probe.polls.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(StepError::snooze(Duration::from_secs(3600)));
        }
        Ok(job)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_long_snooze_parks_the_task(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    let rt = runtime(&pool, &probe, 2).await;
    let run = rt.start::<LongPoll>("report".to_owned()).await.unwrap();
    for _ in 0..200 {
        if task_state(&pool, run.id()).await == [(true, false)] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (parked, snoozes, attempt, in_an_hour): (bool, i32, i32, bool) = sqlx::query_as(
        "SELECT parked, snoozes, attempt, run_at > now() + interval '59 minutes'
         FROM pgflow.tasks WHERE run_id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((parked, snoozes, attempt, in_an_hour), (true, 1, 1, true));
    // Pull it forward (as an operator would): the promoter hands it back to a claim.
    sqlx::query("UPDATE pgflow.tasks SET run_at = now() WHERE run_id = $1")
        .bind(run.id().0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "report");
    rt.shutdown().await.unwrap();
}

// The in-process executor, on tokio's paused clock: the same semantics, no waiting.

pub struct Approval;

#[workflow(name = "delay_approval")]
impl Approval {
    #[step]
    async fn draft(topic: String) -> Result<String, StepError> {
        Ok(format!("draft on {topic}"))
    }

    #[step(delay = "72h")]
    async fn publish(draft: String) -> Result<String, StepError> {
        Ok(format!("published {draft}"))
    }
}

#[tokio::test(start_paused = true)]
async fn in_process_a_72_hour_delay_is_virtual_time() {
    let started = tokio::time::Instant::now();
    let wall = std::time::Instant::now();
    let out = pgflow::execute::<Approval>("rust".to_owned())
        .await
        .unwrap();
    assert_eq!(out, "published draft on rust");
    assert!(started.elapsed() >= Duration::from_secs(72 * 3600));
    assert!(wall.elapsed() < Duration::from_secs(60), "no real waiting");
}

#[tokio::test(start_paused = true)]
async fn in_process_snoozes_like_the_runtime() {
    let probe = Arc::new(Probe::default());
    probe.ready_after.store(4, Ordering::SeqCst);
    let opts = pgflow::ExecuteOptions::new().data(Arc::clone(&probe));
    let out = pgflow::execute_with::<Poll>("b".to_owned(), opts)
        .await
        .unwrap();
    assert_eq!(out, "b done after 4 polls");
    assert_eq!(*probe.attempts_seen.lock().unwrap(), [1, 1, 1, 1]);

    let probe = Arc::new(Probe::default());
    probe.ready_after.store(u32::MAX, Ordering::SeqCst);
    let opts = pgflow::ExecuteOptions::new().data(Arc::clone(&probe));
    let e = pgflow::execute_with::<Poll>("b".to_owned(), opts)
        .await
        .unwrap_err();
    let RunError::StepFailed {
        history: attempts, ..
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(probe.polls.load(Ordering::SeqCst), 6);
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].message.contains("snoozed 5 times"), "{e}");
}
