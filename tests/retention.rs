//! Retention against the real Postgres: finished runs older than an age are pruned
//! (or archived) with their step states and map elements; running runs, recent
//! runs and runs with a task still landing are kept; one pruner at a time. Each test
//! has its own database.

use std::time::Duration;

use pgflow::{RunId, StepError, workflow};
use pgflow_runtime::admin::{self, PruneOptions};
use pgflow_runtime::{Retention, Runtime};
use sqlx::PgPool;

pub struct Lengths;

#[workflow(name = "retention_lengths", max_attempts = 1)]
impl Lengths {
    #[step]
    async fn words(text: String) -> Result<Vec<String>, StepError> {
        if text.is_empty() {
            return Err(StepError::permanent("nothing to count"));
        }
        Ok(text.split_whitespace().map(str::to_owned).collect())
    }

    #[step(map)]
    async fn length(words: String) -> Result<usize, StepError> {
        Ok(words.len())
    }

    #[step]
    async fn total(length: Vec<usize>) -> Result<usize, StepError> {
        Ok(length.iter().sum())
    }
}

/// Served by nobody: its runs stay running.
pub struct Unserved;

#[workflow(name = "retention_unserved", queue = "nobody")]
impl Unserved {
    #[step]
    async fn never(n: u32) -> Result<u32, StepError> {
        Ok(n)
    }
}

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Five finished runs (four succeeded, one failed) and one running run, the first
/// ids backdated `days` days; returns (old finished, recent finished, running) ids.
async fn runs(pool: &PgPool) -> (Vec<RunId>, Vec<RunId>, RunId) {
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("default", 4)
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    let running = rt.start::<Unserved>(1).await.unwrap().id();
    let mut ids = Vec::new();
    for text in ["a bb ccc", "dddd e", "", "ff gg", "hhh"] {
        let run = rt.start::<Lengths>(text.to_owned()).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(30), run.wait())
            .await
            .expect("the run finished");
        ids.push(run.id());
    }
    rt.shutdown().await.unwrap();
    // The running run and the first three finished ones happened ten days ago.
    let old: Vec<i64> = std::iter::once(running.0)
        .chain(ids[..3].iter().map(|r| r.0))
        .collect();
    sqlx::query(
        "UPDATE pgflow.runs SET created_at = created_at - interval '10 days',
                                run_at = run_at - interval '10 days',
                                completed_at = completed_at - interval '10 days'
         WHERE id = ANY ($1)",
    )
    .bind(&old)
    .execute(pool)
    .await
    .unwrap();
    (ids[..3].to_vec(), ids[3..].to_vec(), running)
}

async fn count(pool: &PgPool, sql: &str, ids: &[RunId]) -> i64 {
    let ids: Vec<i64> = ids.iter().map(|r| r.0).collect();
    sqlx::query_scalar(sql)
        .bind(&ids)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn prune_deletes_old_finished_runs_with_their_steps_and_keeps_the_rest(pool: PgPool) {
    let (old, recent, running) = runs(&pool).await;
    let states = "SELECT count(*) FROM pgflow.step_states WHERE run_id = ANY ($1)";
    let elements = "SELECT count(*) FROM pgflow.step_elements WHERE run_id = ANY ($1)";
    let old_states = count(&pool, states, &old).await;
    let old_elements = count(&pool, elements, &old).await;
    assert!(old_states > 0 && old_elements > 0);

    let week = PruneOptions::older_than(7 * DAY);
    let dry = admin::prune(
        &pool,
        PruneOptions {
            dry_run: true,
            ..week
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.runs, dry.steps, dry.elements),
        (3, old_states, old_elements)
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM pgflow.runs WHERE id = ANY ($1)",
            &old
        )
        .await,
        3,
        "a dry run changes nothing"
    );

    // Batches of 2: two transactions.
    let done = admin::prune(&pool, PruneOptions { batch: 2, ..week })
        .await
        .unwrap();
    assert_eq!(
        (done.runs, done.steps, done.elements),
        (3, old_states, old_elements)
    );
    assert!(!done.busy && !done.archived);
    let all_runs = "SELECT count(*) FROM pgflow.runs WHERE id = ANY ($1)";
    assert_eq!(count(&pool, all_runs, &old).await, 0);
    assert_eq!(count(&pool, states, &old).await, 0);
    assert_eq!(count(&pool, elements, &old).await, 0);
    // Recent runs and the old running one stay, with their steps.
    assert_eq!(count(&pool, all_runs, &recent).await, 2);
    assert!(count(&pool, states, &recent).await > 0);
    assert_eq!(count(&pool, all_runs, &[running]).await, 1);
    // Nothing left to prune.
    assert_eq!(admin::prune(&pool, week).await.unwrap().runs, 0);
    // Everything finished goes with an age of zero, still not the running one.
    let all = admin::prune(&pool, PruneOptions::older_than(Duration::ZERO))
        .await
        .unwrap();
    assert_eq!(all.runs, 2);
    assert_eq!(count(&pool, all_runs, &[running]).await, 1);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn prune_can_archive_runs_with_their_steps_as_json(pool: PgPool) {
    let (old, _, _) = runs(&pool).await;
    let r = admin::prune(
        &pool,
        PruneOptions {
            archive: true,
            ..PruneOptions::older_than(7 * DAY)
        },
    )
    .await
    .unwrap();
    assert_eq!(r.runs, 3);
    assert!(r.archived);
    let archived: Vec<(i64, String, serde_json::Value)> = sqlx::query_as(
        "SELECT id, status, steps FROM pgflow.archived_runs WHERE id = ANY ($1) ORDER BY id",
    )
    .bind(old.iter().map(|r| r.0).collect::<Vec<_>>())
    .fetch_all(&pool)
    .await
    .unwrap();
    let statuses: Vec<&str> = archived.iter().map(|a| a.1.as_str()).collect();
    assert_eq!(statuses, ["succeeded", "succeeded", "failed"]);
    // The first run: `words` and the map step `length` with its three elements.
    let steps = archived[0].2.as_array().unwrap();
    assert_eq!(steps[0]["status"], "completed");
    assert_eq!(steps[0]["output"], serde_json::json!(["a", "bb", "ccc"]));
    let elements = steps[1]["elements"].as_array().unwrap();
    assert_eq!(elements.len(), 3);
    assert_eq!(elements[2]["output"], 3);
    // The failed run keeps its error history.
    assert_eq!(archived[2].2[0]["status"], "failed");
    assert!(
        archived[2].2[0]["errors"]
            .to_string()
            .contains("nothing to count")
    );
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn runtimes_with_retention_prune_once_between_them(pool: PgPool) {
    let (old, recent, running) = runs(&pool).await;
    let retention = Retention::after(7 * DAY)
        .batch(1)
        .every(Duration::from_millis(50));
    let mut rts = Vec::new();
    for i in 0..2 {
        rts.push(
            Runtime::builder()
                .pool(pool.clone())
                .instance_id(format!("pruner-{i}"))
                .retention(retention)
                .start()
                .await
                .unwrap(),
        );
    }
    let all_runs = "SELECT count(*) FROM pgflow.runs WHERE id = ANY ($1)";
    for _ in 0..200 {
        if count(&pool, all_runs, &old).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&pool, all_runs, &old).await, 0);
    assert_eq!(count(&pool, all_runs, &recent).await, 2);
    assert_eq!(count(&pool, all_runs, &[running]).await, 1);
    for rt in rts {
        rt.shutdown().await.unwrap();
    }
}
