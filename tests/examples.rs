//! The example programs run end to end against the real Postgres (each in a test
//! database of its own) and check their own results; `cargo test` builds them.

use std::path::PathBuf;
use std::process::Command;

use sqlx::PgPool;

fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: `cargo test` builds the examples",
        bin.display()
    );
    bin
}

fn database_url(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().unwrap_or("postgres")
    )
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
}

#[sqlx::test]
async fn quickstart_runs_the_batch_and_prints_the_results(pool: PgPool) {
    let out = run("quickstart", &pool, &[]);
    assert!(out.contains("300/300 finished"), "{out}");
    for row in ["complex", "medium", "simple", "translate"] {
        assert!(
            out.lines().any(|l| l.starts_with(row)),
            "no results row for {row}:\n{out}"
        );
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.job_results")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 300);
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
