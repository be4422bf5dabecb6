//! Subflows, durably (against the real Postgres: a child's output handed to its
//! parent, a map over subflows, a failed child failing its parent with the path, a
//! retried parent that finds its child instead of starting another, cancel cascading
//! down and a cancelled child failing its parent, grandchildren) and in process.
//! Each database test has its own database.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgflow::{RunError, RunId, StepContext, StepError, Subflow, workflow};
use pgflow_runtime::{Error, Runtime, admin};
use sqlx::PgPool;

/// Closed: a topic starting with `flaky` fails.
#[derive(Clone, Default)]
pub struct Gate(Arc<AtomicBool>);

pub struct Research;

#[workflow(name = "sub_research")]
impl Research {
    #[step]
    async fn search(topic: String, ctx: &StepContext) -> Result<Vec<String>, StepError> {
        let open = ctx.data::<Gate>().is_ok_and(|g| g.0.load(Ordering::SeqCst));
        if topic.starts_with("fail") || (topic.starts_with("flaky") && !open) {
            return Err(StepError::permanent(format!("no sources for {topic}")));
        }
        Ok(vec![format!("{topic} 1"), format!("{topic} 2")])
    }

    #[step]
    async fn count(search: Vec<String>) -> Result<usize, StepError> {
        Ok(search.len())
    }
}

pub struct Report;

#[workflow(name = "sub_report")]
impl Report {
    #[step]
    async fn research(topic: String) -> Result<Subflow<Research>, StepError> {
        Ok(Subflow::new(topic))
    }

    #[step]
    async fn summarize(research: usize) -> Result<String, StepError> {
        Ok(format!("{research} sources"))
    }
}

pub struct Survey;

#[workflow(name = "sub_survey")]
impl Survey {
    #[step(map)]
    async fn each(topic: String) -> Result<Subflow<Research>, StepError> {
        Ok(Subflow::new(topic))
    }

    #[step]
    async fn total(each: Vec<usize>) -> Result<usize, StepError> {
        Ok(each.iter().sum())
    }
}

pub struct Nested;

#[workflow(name = "sub_nested")]
impl Nested {
    #[step]
    async fn delegate(topic: String) -> Result<Subflow<Report>, StepError> {
        Ok(Subflow::new(topic))
    }
}

/// A child that waits for a signal nobody sends.
pub struct Waiter;

#[workflow(name = "sub_waiter")]
impl Waiter {
    #[step(signal = go)]
    async fn wait(input: u32, go: u32) -> Result<u32, StepError> {
        Ok(input + go)
    }
}

pub struct Holder;

#[workflow(name = "sub_holder")]
impl Holder {
    #[step]
    async fn hold(n: u32) -> Result<Subflow<Waiter>, StepError> {
        Ok(Subflow::new(n))
    }

    #[step]
    async fn after(hold: u32) -> Result<u32, StepError> {
        Ok(hold)
    }
}

/// A run that fails (`boom`, held back an hour until the test makes it due) while
/// its child waits.
pub struct Doomed;

#[workflow(name = "sub_doomed")]
impl Doomed {
    #[step]
    async fn begin(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }

    #[step(depends_on = [begin])]
    async fn hold(begin: u32) -> Result<Subflow<Waiter>, StepError> {
        Ok(Subflow::new(begin))
    }

    #[step(depends_on = [begin], delay = "1h")]
    async fn boom(begin: u32) -> Result<u32, StepError> {
        Err(StepError::permanent(format!("boom {begin}")))
    }

    #[step(depends_on = [hold, boom])]
    async fn join(hold: u32, boom: u32) -> Result<u32, StepError> {
        Ok(hold + boom)
    }
}

async fn runtime(pool: &PgPool, gate: Gate) -> Runtime {
    Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .data(gate)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap()
}

use pgflow_suite::support::settle;

/// (id, workflow, status, parent step, parent element) of the children of `parent`.
async fn children(
    pool: &PgPool,
    parent: RunId,
) -> Vec<(i64, String, String, Option<String>, Option<i32>)> {
    sqlx::query_as(
        "SELECT id, workflow, status, parent_step, parent_element FROM pgflow.runs
         WHERE parent_run_id = $1 ORDER BY parent_element NULLS FIRST, id",
    )
    .bind(parent.0)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn tasks_of(pool: &PgPool, run: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks WHERE run_id = $1")
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `parent` has a child whose step waits (parked, unclaimed).
async fn child_waiting(pool: &PgPool, parent: RunId) -> i64 {
    for _ in 0..1000 {
        let row: Option<i64> = sqlx::query_scalar(
            "SELECT r.id FROM pgflow.runs r JOIN pgflow.tasks t ON t.run_id = r.id
             WHERE r.parent_run_id = $1 AND t.parked AND t.claimed_by IS NULL",
        )
        .bind(parent.0)
        .fetch_optional(pool)
        .await
        .unwrap();
        if let Some(id) = row {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {parent} never had a waiting child");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_child_run_hands_its_output_to_the_parent(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Report>("cats".to_owned()).await.unwrap();
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "2 sources");

    let kids = children(&pool, run.id()).await;
    assert_eq!(kids.len(), 1, "{kids:?}");
    let (child, workflow, status, step, element) = kids[0].clone();
    assert_eq!(
        (workflow.as_str(), status.as_str(), step.as_deref(), element),
        ("sub_research", "succeeded", Some("research"), None)
    );
    let key: Option<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM pgflow.runs WHERE id = $1")
            .bind(child)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(key, Some(format!("subflow:{}:0", run.id().0)));
    // the parent's step stored the child's output
    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT output FROM pgflow.step_states WHERE run_id = $1 AND step = 0")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, serde_json::json!(2));
    assert_eq!(tasks_of(&pool, run.id().0).await, 0);

    let detail = admin::run_detail(&pool, run.id()).await.unwrap();
    assert_eq!(detail.subflows.len(), 1);
    assert_eq!(detail.subflows[0].id, child);
    assert_eq!(detail.subflows[0].depth, 1);
    assert_eq!(detail.subflows[0].parent.step, "research");
    let child_detail = admin::run_detail(&pool, RunId(child)).await.unwrap();
    let parent = child_detail.parent.expect("the child names its parent");
    assert_eq!(
        (parent.run_id, parent.step.as_str()),
        (run.id().0, "research")
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_map_over_subflows_starts_one_child_per_element(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let topics: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
    let run = rt.start::<Survey>(topics).await.unwrap();
    assert_eq!(settle::<usize>(&rt, run.id()).await.unwrap(), 6);
    let kids = children(&pool, run.id()).await;
    let elements: Vec<Option<i32>> = kids.iter().map(|k| k.4).collect();
    assert_eq!(elements, [Some(0), Some(1), Some(2)]);
    assert!(
        kids.iter()
            .all(|k| k.2 == "succeeded" && k.3.as_deref() == Some("each"))
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_failed_child_fails_the_parent_step_with_its_path(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Report>("failing".to_owned()).await.unwrap();
    let err = settle::<String>(&rt, run.id()).await.unwrap_err();
    let kids = children(&pool, run.id()).await;
    assert_eq!(kids.len(), 1);
    assert_eq!(kids[0].2, "failed");
    let Error::Run(RunError::StepFailed { step, history, .. }) = &err else {
        panic!("expected a step failure, got {err:?}");
    };
    assert_eq!(step, "research");
    assert_eq!(
        history.len(),
        1,
        "a child's failure is not retried: {history:?}"
    );
    let message = &history[0].message;
    assert!(
        message.starts_with(&format!(
            "subflow `sub_research` (run {}) failed: workflow `sub_research` failed at step `search`",
            kids[0].0
        )),
        "{message}"
    );
    assert!(message.contains("no sources for failing"), "{message}");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_retried_parent_finds_its_child_instead_of_starting_another(pool: PgPool) {
    let gate = Gate::default();
    let rt = runtime(&pool, gate.clone()).await;
    let run = rt.start::<Report>("flaky".to_owned()).await.unwrap();
    assert!(settle::<String>(&rt, run.id()).await.is_err());
    let failed = children(&pool, run.id()).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].2, "failed");

    gate.0.store(true, Ordering::SeqCst);
    let report = rt.retry(run.id()).await.unwrap();
    assert_eq!(
        report.children,
        [failed[0].0],
        "the failed child is retried too"
    );
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "2 sources");
    let after = children(&pool, run.id()).await;
    assert_eq!(after.len(), 1, "no second child: {after:?}");
    assert_eq!(
        (after[0].0, after[0].2.as_str()),
        (failed[0].0, "succeeded")
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn cancelling_the_parent_cancels_its_children(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Holder>(1).await.unwrap();
    let child = child_waiting(&pool, run.id()).await;
    // the parent's step waits for its child, parked: it holds no worker slot
    let parked: (bool, Option<i64>, bool) = sqlx::query_as(
        "SELECT parked, child_run_id, claimed_by IS NULL FROM pgflow.tasks WHERE run_id = $1",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(parked, (true, Some(child), true));
    let detail = admin::run_detail(&pool, run.id()).await.unwrap();
    assert_eq!(
        detail.steps[0].status,
        admin::StepStatus::AwaitingSubflow,
        "{:?}",
        detail.steps[0]
    );

    assert!(rt.cancel(run.id()).await.unwrap());
    let kids = children(&pool, run.id()).await;
    assert_eq!(kids[0].2, "cancelled");
    assert_eq!(tasks_of(&pool, run.id().0).await, 0);
    assert_eq!(tasks_of(&pool, child).await, 0);
    assert!(matches!(
        settle::<u32>(&rt, run.id()).await,
        Err(Error::Run(RunError::Cancelled { .. }))
    ));
    // the admin path reports the children it cancelled
    let again = rt.start::<Holder>(2).await.unwrap();
    let child = child_waiting(&pool, again.id()).await;
    let report = admin::cancel(&pool, again.id()).await.unwrap();
    assert!(report.cancelled);
    assert_eq!(report.children, [child]);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_cancelled_child_fails_its_parent(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Holder>(1).await.unwrap();
    let child = child_waiting(&pool, run.id()).await;
    assert!(rt.cancel(RunId(child)).await.unwrap());
    let err = settle::<u32>(&rt, run.id()).await.unwrap_err();
    let Error::Run(RunError::StepFailed { step, history, .. }) = &err else {
        panic!("expected a step failure, got {err:?}");
    };
    assert_eq!(step, "hold");
    assert_eq!(
        history[0].message,
        format!(
            "subflow `sub_waiter` (run {child}) was cancelled: workflow `sub_waiter` run was cancelled"
        )
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_failed_parent_cancels_its_running_children(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Doomed>(1).await.unwrap();
    let child = child_waiting(&pool, run.id()).await;
    // `boom` fails the parent once the child waits
    sqlx::query(
        "UPDATE pgflow.tasks SET run_at = now(), parked = false WHERE run_id = $1 AND step = 2",
    )
    .bind(run.id().0)
    .execute(&pool)
    .await
    .unwrap();
    let err = settle::<u32>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    let kids = children(&pool, run.id()).await;
    assert_eq!((kids[0].0, kids[0].2.as_str()), (child, "cancelled"));
    assert_eq!(tasks_of(&pool, child).await, 0);
    assert_eq!(tasks_of(&pool, run.id().0).await, 0);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn grandchildren_form_a_tree(pool: PgPool) {
    let rt = runtime(&pool, Gate::default()).await;
    let run = rt.start::<Nested>("owls".to_owned()).await.unwrap();
    assert_eq!(settle::<String>(&rt, run.id()).await.unwrap(), "2 sources");
    let detail = admin::run_detail(&pool, run.id()).await.unwrap();
    let tree: Vec<(String, i32, String)> = detail
        .subflows
        .iter()
        .map(|c| (c.workflow.clone(), c.depth, c.parent.step.clone()))
        .collect();
    assert_eq!(
        tree,
        [
            ("sub_report".to_owned(), 1, "delegate".to_owned()),
            ("sub_research".to_owned(), 2, "research".to_owned()),
        ]
    );
    rt.shutdown().await.unwrap();
}

#[tokio::test]
async fn in_process_children_run_inline_with_the_same_semantics() {
    assert_eq!(
        pgflow::execute::<Report>("cats".to_owned()).await.unwrap(),
        "2 sources"
    );
    assert_eq!(
        pgflow::execute::<Nested>("owls".to_owned()).await.unwrap(),
        "2 sources"
    );
    let topics = vec!["a".to_owned(), "b".to_owned()];
    assert_eq!(pgflow::execute::<Survey>(topics).await.unwrap(), 4);
    let opts = pgflow::ExecuteOptions::new().json_roundtrip(true);
    assert_eq!(
        pgflow::execute_with::<Report>("x".to_owned(), opts)
            .await
            .unwrap(),
        "2 sources"
    );
    let err = pgflow::execute::<Report>("failing".to_owned())
        .await
        .unwrap_err();
    let RunError::StepFailed { step, history, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(step, "research");
    assert_eq!(
        history[0].message,
        "subflow `sub_research` failed: workflow `sub_research` failed at step `search` after 1 attempt(s): attempt 1 permanent: no sources for failing"
    );
    // cancelling the parent cancels the child it runs
    let cancel = pgflow::CancelToken::new();
    let opts = pgflow::ExecuteOptions::new().cancel(cancel.clone());
    let run = tokio::spawn(pgflow::execute_with::<Holder>(1, opts));
    tokio::time::sleep(Duration::from_millis(20)).await;
    cancel.cancel();
    assert!(matches!(
        run.await.unwrap(),
        Err(RunError::Cancelled { workflow }) if workflow == "sub_holder"
    ));
}

#[test]
fn definitions_name_the_child_workflow() {
    use pgflow::Workflow;
    let def = Survey::definition().to_definition();
    let sub = def.steps[0].subflow.as_ref().unwrap();
    assert_eq!((sub.workflow.as_str(), sub.version), ("sub_research", 1));
    assert_eq!(def.steps[0].output, "Vec<Research::Output>");
    assert!(def.steps[1].subflow.is_none());
    assert_eq!(
        Report::definition()
            .step("research")
            .unwrap()
            .subflow()
            .unwrap()
            .name(),
        "sub_research"
    );
}
