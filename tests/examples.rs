//! The example programs run end to end against the real Postgres (each in a test
//! database of its own) and check their own results; `cargo test` builds them.

use std::path::PathBuf;
use std::process::Command;

use sqlx::PgPool;

fn example(name: &str) -> PathBuf {
    pgflow_suite::support::example_binary(name)
}

fn database_url(pool: &PgPool) -> String {
    pgflow_suite::support::url_of(&pool.connect_options())
}

/// Runs an example; returns its stdout, failing the test with its output if it fails.
fn run(name: &str, pool: &PgPool, args: &[&str]) -> String {
    let out = Command::new(example(name))
        .env("DATABASE_URL", database_url(pool))
        .env_remove("LLM_BASE_URL")
        .args(args)
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[sqlx::test]
async fn llm_request_routes_calls_and_records_costs(pool: PgPool) {
    let out = run("llm_request", &pool, &["--n", "24"]);
    assert!(out.contains("llm_request: OK"), "{out}");
    let (ok, failed, cost): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'success'),
                count(*) FILTER (WHERE status = 'failure'),
                COALESCE(sum(cost_cents), 0)::bigint
         FROM pgflow.job_results WHERE workflow = 'llm_request'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((ok, failed), (20, 4));
    assert!(cost > 0);
    // The batch jobs, polled with snoozes: every one succeeded on its first attempt.
    let (batches, first_attempt): (i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT r.id), count(*) FILTER (WHERE s.attempts = 1)
         FROM pgflow.runs r JOIN pgflow.step_states s ON s.run_id = r.id AND s.step = 1
         WHERE r.workflow = 'llm_batch' AND r.status = 'succeeded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((batches, first_attempt), (3, 3));
    assert!(out.contains("3 batch jobs completed"), "{out}");
}

#[sqlx::test]
async fn quickstart_runs_the_batch_and_prints_the_results(pool: PgPool) {
    let out = run("quickstart", &pool, &["--here"]);
    assert!(out.contains("310/310 finished"), "{out}");
    for row in ["agent_coordination", "embedding", "llm_request"] {
        assert!(
            out.lines().any(|l| l.starts_with(row)),
            "no results row for {row}:\n{out}"
        );
    }
    let per_workflow: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT workflow, count(*), count(*) FILTER (WHERE status = 'success')
         FROM pgflow.job_results GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        per_workflow,
        [
            ("agent_coordination".to_owned(), 64, 40),
            ("embedding".to_owned(), 6, 6),
            ("llm_request".to_owned(), 240, 200)
        ]
    );
}

#[test]
fn quickstart_explains_an_unreachable_database() {
    let out = Command::new(example("quickstart"))
        .env("DATABASE_URL", "postgres://app:s3cret@127.0.0.1:1/nowhere")
        .output()
        .expect("run the quickstart");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PostgreSQL is not reachable at postgres://app:***@127.0.0.1:1/nowhere"),
        "{err}"
    );
    assert!(err.contains("pg_ctlcluster"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[test]
fn quickstart_says_what_failed_when_the_server_answers() {
    // The server is there; the database is not: no advice about starting a server.
    let out = Command::new(example("quickstart"))
        .env(
            "DATABASE_URL",
            "postgres://postgres:s3cret@127.0.0.1:5432/pgflow_no_such_database",
        )
        .output()
        .expect("run the quickstart");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert!(err.contains("create it"), "{err}");
    assert!(!err.contains("not reachable"), "{err}");
    assert!(!err.contains("pg_ctlcluster"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

#[sqlx::test]
async fn embedding_maps_chunks_stores_vectors_and_answers_the_query(pool: PgPool) {
    let out = run("embedding", &pool, &["--extra-docs", "12"]);
    assert!(out.contains("embedding: OK"), "{out}");
    let models: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT model, max(dims), count(*) FROM embedding_demo.chunks GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(models.len(), 2, "{models:?}");
    assert_eq!((models[0].0.as_str(), models[0].1), ("hash-bow-256", 256));
    assert_eq!(
        (models[1].0.as_str(), models[1].1),
        ("hash-ngram-1024", 1024)
    );
    assert_eq!(models[0].2, models[1].2);
    // one task per chunk: the map step's elements were recorded one by one
    let elements: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.step_elements")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(elements, 2 * models[0].2);
}

#[sqlx::test]
async fn agent_coordination_validates_delivers_and_assigns_tasks_only(pool: PgPool) {
    let out = run("agent_coordination", &pool, &["--n", "24"]);
    assert!(out.contains("agent_coordination: OK"), "{out}");
    // via the CLI when `target/<profile>/pgflow` is built (`cargo test --workspace`)
    assert!(
        out.contains("approvals: 1 approved (via the pgflow CLI), 1 expired")
            || out.contains("approvals: 1 approved (via admin::signal), 1 expired"),
        "{out}"
    );
    let (ok, failed, skipped): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pgflow.runs
                 WHERE status = 'succeeded' AND workflow = 'agent_coordination'),
                (SELECT count(*) FROM pgflow.runs WHERE status = 'failed'),
                (SELECT count(*) FROM pgflow.step_states WHERE status = 'skipped')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((ok, failed), (15, 9));
    assert_eq!(skipped, 6, "queries and notices skip the assignment step");
}
