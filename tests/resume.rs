//! Resuming and forking runs against the real Postgres: `retry` from the frontier
//! (completed outputs, skip decisions and completed map elements reused), `fork`
//! from a chosen step (same version or a newer one whose reused steps still match),
//! and the per-version view of `status`. Each test has its own database.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgflow::{RunId, StepContext, StepError, workflow};
use pgflow_runtime::admin::{self, ForkOptions};
use pgflow_runtime::{Error, Runtime};
use sqlx::PgPool;

/// What the steps of this file's workflows record and obey.
#[derive(Default)]
struct Probe {
    /// Map elements executed (each execution, in order).
    elements: Mutex<Vec<u32>>,
    /// While set, elements 7 and 13 fail permanently.
    refuse: AtomicBool,
    /// Executions per step name.
    calls: Mutex<Vec<&'static str>>,
    /// While set, `Gated::slow` blocks until this is cleared.
    hold: AtomicBool,
}

impl Probe {
    fn call(&self, step: &'static str) {
        self.calls.lock().unwrap().push(step);
    }
    fn calls_of(&self, step: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|s| **s == step)
            .count()
    }
}

async fn runtime(pool: &PgPool, probe: &Arc<Probe>) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(20))
        .data(Arc::clone(probe))
        .start()
        .await
        .unwrap()
}

use pgflow_suite::support::settle;

pub struct Squares;

#[workflow(name = "resume_squares", max_attempts = 1)]
impl Squares {
    #[step]
    async fn numbers(n: u32, ctx: &StepContext) -> Result<Vec<u32>, StepError> {
        ctx.data::<Arc<Probe>>()?.call("numbers");
        Ok((0..n).collect())
    }

    #[step(map, depends_on = [numbers])]
    async fn square(numbers: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let probe = ctx.data::<Arc<Probe>>()?;
        probe.elements.lock().unwrap().push(numbers);
        if probe.refuse.load(Ordering::SeqCst) && (numbers == 7 || numbers == 13) {
            return Err(StepError::permanent(format!("element {numbers} refused")));
        }
        Ok(numbers * numbers)
    }

    #[step]
    async fn sum(square: Vec<u32>, ctx: &StepContext) -> Result<u64, StepError> {
        ctx.data::<Arc<Probe>>()?.call("sum");
        Ok(square.iter().map(|&s| u64::from(s)).sum())
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retry_reruns_only_the_failed_elements_of_a_map_step(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    probe.refuse.store(true, Ordering::SeqCst);
    let rt = runtime(&pool, &probe).await;
    let run = rt.start::<Squares>(20).await.unwrap();
    let err = settle::<u64>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    pgflow_suite::support::wait_no_claims(&pool, run.id().0).await;

    let stored_before: BTreeSet<i32> = sqlx::query_scalar(
        "SELECT element FROM pgflow.step_elements WHERE run_id = $1 AND step = 1",
    )
    .bind(run.id().0)
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(!stored_before.is_empty() && stored_before.len() < 20);
    let executed_before = probe.elements.lock().unwrap().len();

    probe.refuse.store(false, Ordering::SeqCst);
    let report = rt.retry(run.id()).await.unwrap();
    assert_eq!(report.reused, ["numbers"]);
    assert!(report.cleared.is_empty(), "{report:?}");
    assert_eq!(report.enqueued, ["square"]);
    assert_eq!(report.resumed.len(), 1);
    let resumed = &report.resumed[0];
    assert_eq!(resumed.step, "square");
    assert_eq!(resumed.kept, i64::try_from(stored_before.len()).unwrap());
    assert_eq!(resumed.kept + resumed.rerun, 20);

    assert_eq!(settle::<u64>(&rt, run.id()).await.unwrap(), 2470);
    // Exactly the elements without a stored output ran again, once each.
    let rerun: BTreeSet<u32> = probe.elements.lock().unwrap()[executed_before..]
        .iter()
        .copied()
        .collect();
    let expected: BTreeSet<u32> = (0..20)
        .filter(|e| !stored_before.contains(&i32::try_from(*e).unwrap()))
        .collect();
    assert_eq!(rerun, expected);
    assert_eq!(
        probe.elements.lock().unwrap().len() - executed_before,
        expected.len()
    );
    assert!(rerun.contains(&7) && rerun.contains(&13));
    assert_eq!(probe.calls_of("numbers"), 1, "the parent was not run again");
    let elements: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_elements WHERE run_id = $1 AND step = 1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(elements, 20);
    eprintln!(
        "resumed map: {} elements stored before the retry, {} executed by it ({:?}), {} stored after",
        stored_before.len(),
        rerun.len(),
        rerun,
        elements
    );
    rt.shutdown().await.unwrap();
}

pub struct Gated;

#[workflow(name = "resume_gated", max_attempts = 1)]
impl Gated {
    #[step]
    async fn first(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Probe>>()?.call("first");
        Ok(n + 1)
    }

    #[step]
    async fn slow(first: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let probe = ctx.data::<Arc<Probe>>()?;
        probe.call("slow");
        while probe.hold.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(first * 10)
    }

    #[step]
    async fn last(slow: u32, ctx: &StepContext) -> Result<String, StepError> {
        ctx.data::<Arc<Probe>>()?.call("last");
        Ok(format!("={slow}"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retry_resumes_a_cancelled_run(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    probe.hold.store(true, Ordering::SeqCst);
    let rt = runtime(&pool, &probe).await;
    let run = rt.start::<Gated>(4).await.unwrap();
    while probe.calls_of("slow") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rt.cancel(run.id()).await.unwrap());
    probe.hold.store(false, Ordering::SeqCst);
    pgflow_suite::support::wait_no_claims(&pool, run.id().0).await;
    assert!(matches!(
        rt.result::<String>(run.id()).await.unwrap(),
        pgflow_runtime::RunOutcome::Cancelled
    ));

    // `slow` was running at the cancel: it finished and its output was stored (the
    // cancelled run enqueued nothing after it). Retry reuses it: it was paid for.
    let report = admin::retry(&pool, run.id()).await.unwrap();
    assert_eq!(report.reused, ["first", "slow"]);
    assert_eq!(report.enqueued, ["last"]);
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "=50");
    assert_eq!(probe.calls_of("first"), 1);
    assert_eq!(probe.calls_of("slow"), 1);
    assert_eq!(probe.calls_of("last"), 1);

    // Cancelled before a step ran at all: retry runs it from the start.
    probe.hold.store(true, Ordering::SeqCst);
    let early = rt
        .start_with::<Gated>(
            &mut pool.acquire().await.unwrap(),
            1,
            pgflow_runtime::StartOptions::default()
                .run_at(chrono::Utc::now() + chrono::Duration::hours(1)),
        )
        .await
        .unwrap();
    assert!(rt.cancel(early.id()).await.unwrap());
    probe.hold.store(false, Ordering::SeqCst);
    let report = admin::retry(&pool, early.id()).await.unwrap();
    assert!(report.reused.is_empty(), "{report:?}");
    assert_eq!(report.enqueued, ["first"]);
    assert_eq!(early.wait().await.unwrap(), "=20");

    // Only a failed or cancelled run can be retried.
    let e = admin::retry(&pool, run.id()).await.unwrap_err();
    assert!(
        matches!(e, Error::NotFailed { ref status, .. } if status == "succeeded"),
        "{e}"
    );
    assert!(
        matches!(
            admin::retry(&pool, RunId(999_999)).await,
            Err(Error::RunNotFound(_))
        ),
        "unknown run"
    );
    rt.shutdown().await.unwrap();
}

/// Version 1 of a three-step chain.
pub struct Pipeline;

#[workflow(name = "resume_pipeline")]
impl Pipeline {
    #[step]
    async fn fetch(n: u32, ctx: &StepContext) -> Result<Vec<u32>, StepError> {
        ctx.data::<Arc<Probe>>()?.call("fetch");
        Ok((1..=n).collect())
    }

    #[step]
    async fn summarize(fetch: Vec<u32>, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Probe>>()?.call("summarize");
        Ok(fetch.iter().sum())
    }

    #[step]
    async fn report(summarize: u32, ctx: &StepContext) -> Result<String, StepError> {
        ctx.data::<Arc<Probe>>()?.call("report");
        Ok(format!("v1 total {summarize}"))
    }
}

/// Version 2: `summarize` fixed (the sum of squares was meant); same types.
pub struct PipelineV2;

#[workflow(name = "resume_pipeline", version = 2)]
impl PipelineV2 {
    #[step]
    async fn fetch(n: u32, ctx: &StepContext) -> Result<Vec<u32>, StepError> {
        ctx.data::<Arc<Probe>>()?.call("fetch");
        Ok((1..=n).collect())
    }

    #[step]
    async fn summarize(fetch: Vec<u32>, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Probe>>()?.call("summarize");
        Ok(fetch.iter().map(|x| x * x).sum())
    }

    #[step]
    async fn report(summarize: u32, ctx: &StepContext) -> Result<String, StepError> {
        ctx.data::<Arc<Probe>>()?.call("report");
        Ok(format!("v2 total {summarize}"))
    }
}

/// Version 3: `fetch` returns another type, so its v1 output cannot be reused.
pub struct PipelineV3;

#[workflow(name = "resume_pipeline", version = 3)]
impl PipelineV3 {
    #[step]
    async fn fetch(n: u32) -> Result<Vec<u64>, StepError> {
        Ok((1..=u64::from(n)).collect())
    }

    #[step]
    async fn summarize(fetch: Vec<u64>) -> Result<u64, StepError> {
        Ok(fetch.iter().sum())
    }

    #[step]
    async fn report(summarize: u64) -> Result<String, StepError> {
        Ok(format!("v3 total {summarize}"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn fork_reruns_from_a_step_and_reuses_what_is_upstream(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    let rt = runtime(&pool, &probe).await;
    let original = rt.start::<Pipeline>(4).await.unwrap();
    assert_eq!(original.wait().await.unwrap(), "v1 total 10");

    // Same version, from the middle: `fetch` is reused, the rest runs again.
    let fork = rt
        .fork::<Pipeline>(original.id(), "summarize", None)
        .await
        .unwrap();
    assert_ne!(fork.id(), original.id());
    assert_eq!(
        settle::<String>(&rt, fork.id()).await.unwrap(),
        "v1 total 10"
    );
    assert_eq!(probe.calls_of("fetch"), 1);
    assert_eq!(probe.calls_of("summarize"), 2);
    assert_eq!(probe.calls_of("report"), 2);
    let detail = admin::run_detail(&pool, fork.id()).await.unwrap();
    assert_eq!(detail.forked_from, Some(original.id().0));
    assert_eq!(detail.forked_at.as_deref(), Some("summarize"));
    assert_eq!(detail.run.version, 1);

    // Into version 2, whose fixed `summarize` runs on v1's stored `fetch` output.
    let fixed = rt
        .fork::<PipelineV2>(original.id(), "summarize", None)
        .await
        .unwrap();
    assert_eq!(fixed.wait().await.unwrap(), "v2 total 30");
    assert_eq!(probe.calls_of("fetch"), 1, "v1's fetch output was reused");
    assert_eq!(
        admin::run_detail(&pool, fixed.id())
            .await
            .unwrap()
            .run
            .version,
        2
    );

    // From the first step with a new input: everything runs.
    let report = admin::fork(
        &pool,
        original.id(),
        "fetch",
        ForkOptions {
            input: Some(serde_json::json!(3)),
            version: None,
        },
    )
    .await
    .unwrap();
    assert!(report.reused.is_empty(), "{report:?}");
    assert_eq!(report.rerun, ["fetch", "summarize", "report"]);
    assert_eq!(
        settle::<String>(&rt, RunId(report.id)).await.unwrap(),
        "v1 total 6"
    );
    assert_eq!(probe.calls_of("fetch"), 2);

    // The original is untouched.
    assert_eq!(original.wait().await.unwrap(), "v1 total 10");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn fork_refuses_steps_and_versions_that_do_not_fit(pool: PgPool) {
    let probe = Arc::new(Probe::default());
    let rt = runtime(&pool, &probe).await;
    let original = rt.start::<Pipeline>(4).await.unwrap();
    original.wait().await.unwrap();

    // v3's `fetch` returns another type: reusing its v1 output is refused, naming it.
    let e = admin::fork(
        &pool,
        original.id(),
        "report",
        ForkOptions {
            input: None,
            version: Some(3),
        },
    )
    .await
    .unwrap_err();
    match &e {
        Error::Incompatible {
            from,
            to,
            differences,
            ..
        } => {
            assert_eq!((*from, *to), (1, 3));
            assert_eq!(differences.len(), 2, "{differences:?}");
            assert!(differences[0].contains("`fetch`") && differences[0].contains("Vec<u64>"));
            assert!(differences[1].contains("`summarize`"));
        }
        other => panic!("expected Incompatible, got {other}"),
    }
    // From `fetch`, nothing is reused: v3 is fine.
    let ok = admin::fork(
        &pool,
        original.id(),
        "fetch",
        ForkOptions {
            input: None,
            version: Some(3),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        settle::<String>(&rt, RunId(ok.id)).await.unwrap(),
        "v3 total 10"
    );

    let e = admin::fork(&pool, original.id(), "sumarize", ForkOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::UnknownStep { known, .. } if known == "fetch, summarize, report"),
        "{e}"
    );
    let e = admin::fork(
        &pool,
        original.id(),
        "fetch",
        ForkOptions {
            input: None,
            version: Some(9),
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(e, Error::MissingDefinition { version: 9, .. }),
        "{e}"
    );
    let e = rt
        .fork::<Squares>(original.id(), "sum", None)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongWorkflow { .. }), "{e}");
    assert!(matches!(
        admin::fork(&pool, RunId(424_242), "fetch", ForkOptions::default()).await,
        Err(Error::RunNotFound(_))
    ));
    // Nothing was started by the refusals.
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 2);

    // By name, an input of the wrong type is not checked up front: the first step
    // that reads it fails with the mismatch, stored like any step error.
    let bad = admin::fork(
        &pool,
        original.id(),
        "fetch",
        ForkOptions {
            input: Some(serde_json::json!({"n": "four"})),
            version: None,
        },
    )
    .await
    .unwrap();
    let e = settle::<String>(&rt, RunId(bad.id)).await.unwrap_err();
    assert!(e.to_string().contains("invalid type"), "{e}");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn status_shows_runs_in_flight_and_instances_per_version(pool: PgPool) {
    // A producer serves no queue: runs of both versions wait, served by nobody.
    let producer = Runtime::builder()
        .pool(pool.clone())
        .instance_id("producer")
        .start()
        .await
        .unwrap();
    producer.start::<Pipeline>(1).await.unwrap();
    producer.start::<PipelineV2>(1).await.unwrap();
    producer.start::<PipelineV2>(2).await.unwrap();
    let status = admin::status(&pool).await.unwrap();
    let row = |v: i32| {
        status
            .versions
            .iter()
            .find(|r| r.workflow == "resume_pipeline" && r.version == v)
            .cloned()
            .unwrap()
    };
    assert_eq!((row(1).running, row(2).running, row(3).running), (1, 2, 0));
    assert!(row(1).is_stranded() && row(2).is_stranded() && !row(3).is_stranded());

    // A worker serving the queue serves every version it links.
    let probe = Arc::new(Probe::default());
    let worker = Runtime::builder()
        .pool(pool.clone())
        .instance_id("worker")
        .queue("default", 2)
        .data(Arc::clone(&probe))
        .start()
        .await
        .unwrap();
    let status = admin::status(&pool).await.unwrap();
    for v in status
        .versions
        .iter()
        .filter(|v| v.workflow == "resume_pipeline")
    {
        assert_eq!(v.instances, ["worker"], "{v:?}");
        assert!(!v.is_stranded());
    }
    worker.shutdown().await.unwrap();
    producer.shutdown().await.unwrap();
}
