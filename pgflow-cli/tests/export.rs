//! `pgflow export` against a real database (`#[sqlx::test]`, a fresh one each): it
//! prints the run as JSON that `pgflow::replay` reads back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{Recorded, RecordedStatus, StepContext, StepError, workflow};
use pgflow_runtime::Runtime;
use sqlx::PgPool;

/// What one invocation of the binary did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `pgflow --database-url <the test database> args..` off the async runtime's
/// thread.
async fn pgflow(pool: &PgPool, args: &[&str]) -> Out {
    let o = pool.connect_options();
    let url = format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("the test database has a name")
    );
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgflow"));
    cmd.arg("--database-url").arg(url).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the blocking task completes")
        .expect("the pgflow binary runs");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// Counts the calls of `lookup`.
#[derive(Default)]
struct Lookups(AtomicU32);

/// lookup -> divide; `divide` fails permanently on a zero divisor.
pub struct Ratio;

#[workflow(name = "cli_export_ratio", queue = "cli_export", max_attempts = 1)]
impl Ratio {
    #[step]
    async fn lookup(key: String, ctx: &StepContext) -> Result<(u32, u32), StepError> {
        ctx.data::<Arc<Lookups>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok((key.len() as u32, key.matches('x').count() as u32))
    }

    #[step]
    async fn divide(lookup: (u32, u32)) -> Result<u32, StepError> {
        let (n, d) = lookup;
        n.checked_div(d)
            .ok_or_else(|| StepError::permanent(format!("{n} / 0")))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn export_prints_json_that_replays_the_failure(pool: PgPool) {
    let lookups = Arc::new(Lookups::default());
    let rt = Runtime::builder()
        .pool(pool.clone())
        .instance_id("cli-export-test")
        .poll_interval(Duration::from_millis(50))
        .queue("cli_export", 2)
        .data(Arc::clone(&lookups))
        .start()
        .await
        .expect("the runtime starts");
    let run = rt.start::<Ratio>("abc".into()).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), run.wait())
        .await
        .expect("the run finishes")
        .unwrap_err();
    assert!(err.to_string().contains("3 / 0"), "{err}");
    rt.shutdown().await.unwrap();

    // JSON with or without --json: the document is the point.
    let id = run.id().0.to_string();
    let out = pgflow(&pool, &["export", &id]).await;
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");
    assert!(out.stdout.ends_with("}\n"), "{out:?}");
    let recorded: Recorded = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not a recording ({e}): {}", out.stdout));
    let with_flag = pgflow(&pool, &["export", &id, "--json"]).await;
    assert_eq!(with_flag.stdout, out.stdout);

    assert_eq!(recorded.run_id, run.id().0);
    assert_eq!(recorded.workflow, "cli_export_ratio");
    assert_eq!(recorded.status, "failed");
    assert_eq!(recorded.input, serde_json::json!("abc"));
    let lookup = recorded.step("lookup").unwrap();
    assert_eq!(lookup.status, RecordedStatus::Completed);
    assert_eq!(lookup.output, Some(serde_json::json!([3, 0])));
    assert_eq!(
        recorded.step("divide").unwrap().status,
        RecordedStatus::Failed
    );

    let before = lookups.0.load(Ordering::SeqCst);
    let err = pgflow::replay::<Ratio>(recorded.clone())
        .inject_completed()
        .run()
        .await
        .unwrap_err();
    assert_eq!(err.run_error().cloned(), recorded.run_error());
    assert_eq!(
        lookups.0.load(Ordering::SeqCst),
        before,
        "lookup is not called"
    );
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn exporting_an_unknown_run_is_a_clear_error(pool: PgPool) {
    let out = pgflow(&pool, &["export", "999"]).await;
    assert_ne!(out.code, 0);
    assert_eq!(out.stdout, "");
    assert_eq!(out.stderr, "error: no run with id 999\n");
}
