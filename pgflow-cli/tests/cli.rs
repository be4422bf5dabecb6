//! The `pgflow` binary against a real database: each test gets a fresh one
//! (`#[sqlx::test]`), makes runs with a real runtime and workflows defined here, and
//! checks what the CLI prints (tables and `--json`) and its exit codes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use pgflow::{RunId, StepContext, StepError, workflow};
use pgflow_runtime::{Runtime, StartOptions};
use serde_json::Value;
use sqlx::PgPool;

/// What one invocation of the binary did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> String {
        assert_eq!(self.code, 0, "pgflow failed: {self:?}");
        assert!(self.stderr.is_empty(), "unexpected stderr: {self:?}");
        self.stdout
    }

    fn json(self) -> Value {
        let out = self.ok();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
    }

    /// A failure: a non-zero exit, nothing on stdout, one line on stderr.
    fn err(self) -> String {
        assert_ne!(self.code, 0, "pgflow should have failed: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on error: {self:?}");
        assert_eq!(self.stderr.lines().count(), 1, "not one line: {self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        self.stderr
    }
}

/// Runs `pgflow` with `env` set and `args`, off the async runtime's thread (the
/// runtime under test keeps working meanwhile).
async fn pgflow_env(env: &[(&str, &str)], args: &[&str]) -> Out {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgflow"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
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

/// Runs `pgflow --database-url <the test database> args..`.
async fn pgflow(pool: &PgPool, args: &[&str]) -> Out {
    let url = url_of(pool);
    let mut all = vec!["--database-url", url.as_str()];
    all.extend_from_slice(args);
    pgflow_env(&[], &all).await
}

/// The URL of the test database (the one `#[sqlx::test]` made for this test).
fn url_of(pool: &PgPool) -> String {
    let o = pool.connect_options();
    format!(
        "postgres://{}@{}:{}/{}",
        o.get_username(),
        o.get_host(),
        o.get_port(),
        o.get_database().expect("the test database has a name")
    )
}

/// The line of a table whose first cell is `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row `{first}` in:\n{table}"))
}

fn cells(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Counts executions per step and decides whether `charge` fails.
#[derive(Default)]
struct Probe {
    fail_charge: AtomicBool,
    /// `audit` fails permanently, once `charge` has started.
    fail_audit: AtomicBool,
    /// `charge` waits for a permit of `gate` before it returns.
    hold_charge: AtomicBool,
    gate: Gate,
    fetch: AtomicU32,
    audit: AtomicU32,
    charge: AtomicU32,
    finish: AtomicU32,
}

/// A semaphore with no permits until the test adds some.
struct Gate(tokio::sync::Semaphore);

impl Default for Gate {
    fn default() -> Self {
        Self(tokio::sync::Semaphore::new(0))
    }
}

fn probe(ctx: &StepContext) -> Result<&Arc<Probe>, StepError> {
    ctx.data::<Arc<Probe>>()
}

/// A diamond: fetch -> (audit, charge) -> finish. `charge` fails permanently while
/// the probe says so.
pub struct Checkout;

#[workflow(name = "cli_checkout", queue = "cli", backoff = "10ms")]
impl Checkout {
    #[step]
    async fn fetch(order: u32, ctx: &StepContext) -> Result<u32, StepError> {
        probe(ctx)?.fetch.fetch_add(1, Ordering::SeqCst);
        ctx.add_cost_cents(2);
        Ok(order * 10)
    }

    #[step(depends_on = [fetch])]
    async fn audit(fetch: u32, ctx: &StepContext) -> Result<String, StepError> {
        let p = probe(ctx)?;
        p.audit.fetch_add(1, Ordering::SeqCst);
        if p.fail_audit.load(Ordering::SeqCst) {
            while p.charge.load(Ordering::SeqCst) == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            return Err(StepError::permanent("audit rejected"));
        }
        Ok(format!("audited {fetch}"))
    }

    #[step(depends_on = [fetch])]
    async fn charge(fetch: u32, ctx: &StepContext) -> Result<u32, StepError> {
        let p = probe(ctx)?;
        p.charge.fetch_add(1, Ordering::SeqCst);
        if p.hold_charge.load(Ordering::SeqCst) {
            p.gate
                .0
                .acquire()
                .await
                .map_err(StepError::permanent)?
                .forget();
        }
        if p.fail_charge.load(Ordering::SeqCst) {
            return Err(StepError::permanent("card declined"));
        }
        Ok(fetch + 1)
    }

    #[step(depends_on = [audit, charge])]
    async fn finish(audit: String, charge: u32, ctx: &StepContext) -> Result<String, StepError> {
        probe(ctx)?.finish.fetch_add(1, Ordering::SeqCst);
        Ok(format!("{audit}, charged {charge}"))
    }
}

/// A chain that always succeeds.
pub struct Greet;

#[workflow(name = "cli_greet", queue = "cli")]
impl Greet {
    #[step]
    async fn hello(name: String) -> Result<String, StepError> {
        Ok(format!("hello {name}"))
    }

    #[step]
    async fn shout(s: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_cost_cents(5);
        Ok(s.to_uppercase())
    }
}

async fn runtime(pool: &PgPool, probe: Arc<Probe>, queue: bool) -> Runtime {
    let mut b = Runtime::builder()
        .pool(pool.clone())
        .instance_id("cli-test")
        .poll_interval(Duration::from_millis(50))
        .data(probe);
    if queue {
        b = b.queue("cli", 4);
    }
    b.start().await.expect("the runtime starts")
}

/// Waits for a run to finish (the guard only turns a hang into a failure).
async fn finished<O: serde::de::DeserializeOwned>(
    rt: &Runtime,
    id: RunId,
) -> Result<O, pgflow_runtime::Error> {
    tokio::time::timeout(Duration::from_secs(60), rt.handle::<O>(id, true).wait())
        .await
        .expect("the run did not finish")
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retry_reruns_a_failed_run_from_its_failed_step(pool: PgPool) {
    let p = Arc::new(Probe::default());
    p.fail_charge.store(true, Ordering::SeqCst);
    let rt = runtime(&pool, Arc::clone(&p), true).await;
    let run = rt.start::<Checkout>(4).await.unwrap();
    let err = finished::<String>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("card declined"), "{err}");
    // Let in-flight steps (audit may still run) finish: every count below is settled.
    rt.shutdown().await.unwrap();
    let id = run.id().0.to_string();
    let audits_before = p.audit.load(Ordering::SeqCst);

    // The failed run, step by step in graph order.
    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert!(
        out.starts_with(&format!(
            "run {id}  workflow cli_checkout v1  status failed"
        )),
        "{out}"
    );
    assert!(out.contains("card declined"), "{out}");
    let steps: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("STEP"))
        .skip(1)
        .map(|l| cells(l)[0])
        .collect();
    assert_eq!(steps, ["fetch", "audit", "charge", "finish"], "{out}");
    assert_eq!(cells(row(&out, "fetch"))[1..3], ["completed", "1"], "{out}");
    let charge = row(&out, "charge");
    assert_eq!(cells(charge)[1..3], ["failed", "1"], "{out}");
    assert!(
        charge.contains("attempt 1 permanent: card declined"),
        "{out}"
    );
    assert!(row(&out, "finish").contains("not started"), "{out}");
    let audit = if audits_before == 1 {
        "completed"
    } else {
        "not"
    };
    assert_eq!(cells(row(&out, "audit"))[1], audit, "{out}");

    let v = pgflow(&pool, &["run", &id, "--json"]).await.json();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["steps"][2]["name"], "charge");
    assert_eq!(v["steps"][2]["status"], "failed");
    assert_eq!(v["steps"][2]["errors"][0]["kind"], "permanent");
    assert_eq!(v["steps"][3]["status"], "not_started");
    assert_eq!(v["error_detail"]["StepFailed"]["step"], "charge");

    let out = pgflow(&pool, &["runs", "--status", "failed"]).await.ok();
    assert!(row(&out, &id).contains("cli_checkout"), "{out}");
    assert!(row(&out, &id).contains("card declined"), "{out}");

    // Retry with no worker running: the state it leaves is exact.
    let out = pgflow(&pool, &["retry", &id]).await.ok();
    assert!(
        out.starts_with(&format!("run {id} (cli_checkout) is running again")),
        "{out}"
    );
    assert!(out.contains("cleared  charge"), "{out}");
    let v = pgflow(&pool, &["run", &id, "--json"]).await.json();
    assert_eq!(v["status"], "running");
    assert_eq!(v["error"], Value::Null);
    assert_eq!(v["completed_at"], Value::Null);
    let status: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap())
        .collect();
    let audit = if audits_before == 1 {
        "completed"
    } else {
        "queued"
    };
    assert_eq!(status, ["completed", audit, "queued", "waiting"]);
    // The join's counter was re-created: one parent (charge, maybe audit) to go.
    let remaining: i32 = sqlx::query_scalar(
        "SELECT remaining FROM pgflow.step_states WHERE run_id = $1 AND step = 3",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(remaining, if audits_before == 1 { 1 } else { 2 });

    let s = pgflow(&pool, &["status", "--json"]).await.json();
    let cli = s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == "cli")
        .expect("queue cli has tasks");
    assert_eq!(cli["available"], if audits_before == 1 { 1 } else { 2 });
    assert_eq!(cli["running"], 0);

    // A second retry is refused: the run is running.
    let e = pgflow(&pool, &["retry", &id]).await.err();
    assert!(
        e.contains(&format!(
            "run {id} has status `running`: only a failed or cancelled run can be retried"
        )),
        "{e}"
    );

    // The failure is gone: a new runtime finishes the run from where it stopped.
    p.fail_charge.store(false, Ordering::SeqCst);
    let rt = runtime(&pool, Arc::clone(&p), true).await;
    let out: String = finished(&rt, run.id()).await.unwrap();
    assert_eq!(out, "audited 40, charged 41");
    rt.shutdown().await.unwrap();
    assert_eq!(
        p.fetch.load(Ordering::SeqCst),
        1,
        "fetch was reused, not re-run"
    );
    assert_eq!(p.audit.load(Ordering::SeqCst), 1, "audit ran once in all");
    assert_eq!(p.charge.load(Ordering::SeqCst), 2, "charge ran again");
    assert_eq!(p.finish.load(Ordering::SeqCst), 1);

    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert!(out.contains("status succeeded"), "{out}");
    assert!(out.contains("\"audited 40, charged 41\""), "{out}");
    for step in ["fetch", "audit", "charge", "finish"] {
        assert_eq!(cells(row(&out, step))[1], "completed", "{out}");
    }
    assert_eq!(cells(row(&out, "fetch"))[2], "1", "{out}");
    let e = pgflow(&pool, &["retry", &id]).await.err();
    assert!(e.contains("has status `succeeded`: only a failed"), "{e}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn retry_while_a_step_still_runs_fences_off_the_old_attempt(pool: PgPool) {
    let p = Arc::new(Probe::default());
    p.fail_audit.store(true, Ordering::SeqCst);
    p.hold_charge.store(true, Ordering::SeqCst);
    let rt = runtime(&pool, Arc::clone(&p), true).await;
    let run = rt.start::<Checkout>(1).await.unwrap();
    let err = finished::<String>(&rt, run.id()).await.unwrap_err();
    assert!(err.to_string().contains("audit rejected"), "{err}");
    let id = run.id().0.to_string();
    // charge is still executing (held at the gate), its task claimed.
    let v = pgflow(&pool, &["run", &id, "--json"]).await.json();
    assert_eq!(v["steps"][1]["status"], "failed");
    assert_eq!(v["steps"][2]["status"], "running");
    assert_eq!(v["steps"][2]["attempts"], 1);
    assert_eq!(v["steps"][2]["instance_id"], "cli-test");

    p.fail_audit.store(false, Ordering::SeqCst);
    let v = pgflow(&pool, &["retry", &id, "--json"]).await.json();
    assert_eq!(v["reused"], serde_json::json!(["fetch"]));
    assert_eq!(v["cleared"], serde_json::json!(["audit"]));
    assert_eq!(v["enqueued"], serde_json::json!(["audit", "charge"]));
    // Let both executions of charge finish: the old one's completion fails its fence.
    p.gate.0.add_permits(2);
    let out: String = finished(&rt, run.id()).await.unwrap();
    assert_eq!(out, "audited 10, charged 11");
    rt.shutdown().await.unwrap();
    assert_eq!(p.charge.load(Ordering::SeqCst), 2);
    assert_eq!(
        rt.stats().rejected,
        1,
        "the old attempt's completion is rejected"
    );
    assert_eq!(p.fetch.load(Ordering::SeqCst), 1);
    assert_eq!(p.finish.load(Ordering::SeqCst), 1);
    let steps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_states WHERE run_id = $1 AND status = 'completed'",
    )
    .bind(run.id().0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(steps, 3, "fetch, audit and charge, once each");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn status_runs_and_results_show_finished_runs(pool: PgPool) {
    let p = Arc::new(Probe::default());
    let rt = runtime(&pool, Arc::clone(&p), true).await;
    let ids = rt
        .start_many::<Greet>(["ada".to_owned(), "bob".to_owned(), "cy".to_owned()])
        .await
        .unwrap();
    for id in &ids {
        let out: String = finished(&rt, *id).await.unwrap();
        assert!(out.starts_with("HELLO "), "{out}");
    }
    p.fail_charge.store(true, Ordering::SeqCst);
    let failed = rt.start::<Checkout>(1).await.unwrap();
    finished::<String>(&rt, failed.id()).await.unwrap_err();
    rt.shutdown().await.unwrap();
    // An instance as the registry writes them (the registry's own rows may join it).
    sqlx::query(
        "INSERT INTO pgflow.instances (id, host, pid, queues, capacity, load, last_heartbeat)
         VALUES ('box-a', 'box', 4242, '{\"cli\": 8}', 8, 3, now() - interval '90 seconds')",
    )
    .execute(&pool)
    .await
    .unwrap();

    // status
    let out = pgflow(&pool, &["status"]).await.ok();
    let headers: Vec<&str> = out.lines().filter(|l| !l.starts_with(' ')).collect();
    assert!(
        headers.contains(&"INSTANCES") && headers.contains(&"RUNS"),
        "{out}"
    );
    let inst = cells(row(&out, "box-a"));
    assert_eq!(inst[1..4], ["online", "3", "8"], "{out}");
    assert!(
        inst[4].starts_with("1m") || inst[4].starts_with("2m"),
        "idle: {out}"
    );
    assert!(row(&out, "box-a").contains("cli:8"), "{out}");
    assert_eq!(
        cells(row(&out, "cli_greet"))[1..],
        ["0", "3", "0", "0"],
        "{out}"
    );
    assert_eq!(
        cells(row(&out, "cli_checkout"))[1..],
        ["0", "0", "1", "0"],
        "{out}"
    );
    let s = pgflow(&pool, &["status", "--json"]).await.json();
    let box_a = s["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "box-a")
        .unwrap();
    assert_eq!(box_a["load"], 3);
    assert!(box_a["idle_ms"].as_i64().unwrap() >= 90_000, "{box_a}");
    assert_eq!(box_a["queues"]["cli"], 8);

    // runs, filtered and limited
    let out = pgflow(&pool, &["runs"]).await.ok();
    assert_eq!(out.lines().count(), 5, "a header and four runs: {out}");
    assert!(out.starts_with("ID"), "{out}");
    let out = pgflow(&pool, &["runs", "--workflow", "cli_greet", "--limit", "2"])
        .await
        .ok();
    let listed: Vec<&str> = out.lines().skip(1).map(|l| cells(l)[0]).collect();
    assert_eq!(
        listed,
        [ids[2].to_string(), ids[1].to_string()],
        "newest first: {out}"
    );
    assert!(
        row(&out, &ids[2].to_string()).contains("succeeded"),
        "{out}"
    );
    let v = pgflow(&pool, &["runs", "--status", "succeeded", "--json"])
        .await
        .json();
    let runs = v.as_array().unwrap();
    assert_eq!(runs.len(), 3);
    assert!(runs.iter().all(|r| r["workflow"] == "cli_greet"));
    assert!(runs.iter().all(|r| r["cost_cents"] == 5));
    assert!(runs.iter().all(|r| r["duration_ms"].as_i64().is_some()));
    let out = pgflow(&pool, &["runs", "--workflow", "nope", "--status", "failed"])
        .await
        .ok();
    assert_eq!(out, "no failed runs of workflow `nope`\n");
    let e = pgflow(&pool, &["runs", "--status", "done"]).await;
    assert_eq!(e.code, 2, "a usage error: {e:?}");
    assert!(
        e.stderr
            .contains("expected one of running, succeeded, failed, cancelled")
    );

    // one succeeded run in detail: the last step has no stored row but is completed
    let id = ids[0].to_string();
    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert!(out.contains("status succeeded"), "{out}");
    assert!(out.contains("\"HELLO ADA\""), "{out}");
    assert_eq!(cells(row(&out, "hello"))[1..3], ["completed", "1"], "{out}");
    assert_eq!(cells(row(&out, "shout"))[1..3], ["completed", "-"], "{out}");
    let v = pgflow(&pool, &["run", &id, "--json"]).await.json();
    assert_eq!(v["output"], "HELLO ADA");
    assert_eq!(v["input"], "ada");
    assert_eq!(v["steps"][1]["parents"][0], "hello");
    assert_eq!(v["steps"][1]["instance_id"], "cli-test");

    // results: the three monitoring queries
    let out = pgflow(&pool, &["results", "--since", "1h"]).await.ok();
    assert!(out.starts_with("Runs finished in the last 1h\n"), "{out}");
    for section in ["BY WORKFLOW", "BY INSTANCE", "BY STATUS"] {
        assert!(out.lines().any(|l| l == section), "{section}: {out}");
    }
    let greet = cells(row(&out, "cli_greet"));
    assert_eq!(greet[1..3], ["3", "100.0%"], "{out}");
    assert_eq!(greet.last(), Some(&"15"), "cost: {out}");
    assert_eq!(
        cells(row(&out, "cli-test"))[1..],
        ["4", "3", "1", "100.0%"],
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| cells(l).starts_with(&["cli_checkout", "failure", "1"])),
        "{out}"
    );
    let v = pgflow(
        &pool,
        &[
            "results",
            "--since",
            "30m",
            "--workflow",
            "cli_checkout",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(v["since_secs"], 1800);
    assert_eq!(v["workflow"], "cli_checkout");
    assert_eq!(v["workflows"].as_array().unwrap().len(), 1);
    assert_eq!(v["workflows"][0]["count"], 1);
    assert_eq!(v["workflows"][0]["success_rate"], 0.0);
    assert_eq!(v["workflows"][0]["total_cost_cents"], 2);
    assert_eq!(v["instances"][0]["instance_id"], "cli-test");
    assert_eq!(v["statuses"][0]["status"], "failure");
    let e = pgflow(&pool, &["results", "--since", "soon"]).await;
    assert_eq!(e.code, 2);
    assert!(e.stderr.contains("like 30s, 15m, 1h"), "{e:?}");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn cancel_stops_a_run_and_refuses_finished_ones(pool: PgPool) {
    // A producer (no queue): runs stay where they are.
    let rt = runtime(&pool, Arc::new(Probe::default()), false).await;
    let later = chrono::Utc::now() + chrono::Duration::hours(1);
    let run = rt
        .start_with::<Greet>(
            &mut pool.acquire().await.unwrap(),
            "zed".to_owned(),
            StartOptions::default().run_at(later),
        )
        .await
        .unwrap();
    let id = run.id().0.to_string();
    let s = pgflow(&pool, &["status", "--json"]).await.json();
    assert_eq!(s["queues"][0]["queue"], "cli");
    assert_eq!(s["queues"][0]["scheduled"], 1);
    assert_eq!(s["queues"][0]["available"], 0);
    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert_eq!(cells(row(&out, "hello"))[1..3], ["queued", "0"], "{out}");
    assert_eq!(cells(row(&out, "shout"))[1], "waiting", "{out}");

    assert_eq!(
        pgflow(&pool, &["cancel", &id]).await.ok(),
        format!("run {id} cancelled\n")
    );
    assert_eq!(
        pgflow(&pool, &["cancel", &id]).await.ok(),
        format!("run {id} was already cancelled\n")
    );
    let v = pgflow(&pool, &["cancel", &id, "--json"]).await.json();
    assert_eq!(v["cancelled"], false);
    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert!(out.contains("status cancelled"), "{out}");
    assert_eq!(cells(row(&out, "hello"))[1], "not", "{out}");
    let s = pgflow(&pool, &["status", "--json"]).await.json();
    assert_eq!(s["queues"], Value::Array(vec![]), "its task is gone");
    assert_eq!(s["runs"][0]["cancelled"], 1);
    // A cancelled run resumes: its first step is enqueued again, due now.
    let out = pgflow(&pool, &["retry", &id]).await.ok();
    assert!(
        out.contains("is running again") && out.contains("enqueued hello"),
        "{out}"
    );
    let e = pgflow(&pool, &["retry", &id]).await.err();
    assert!(
        e.contains("has status `running`: only a failed or cancelled run can be retried"),
        "{e}"
    );
    rt.shutdown().await.unwrap();

    // A finished run cannot be cancelled.
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    let done = rt.start::<Greet>("amy".to_owned()).await.unwrap();
    finished::<String>(&rt, done.id()).await.unwrap();
    rt.shutdown().await.unwrap();
    let e = pgflow(&pool, &["cancel", &done.id().0.to_string()])
        .await
        .err();
    assert!(
        e.contains("has already succeeded: only a running run can be cancelled"),
        "{e}"
    );
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_unknown_run_id_is_a_clear_error(pool: PgPool) {
    for cmd in ["run", "retry", "cancel"] {
        let e = pgflow(&pool, &[cmd, "424242"]).await.err();
        assert_eq!(e, "error: no run with id 424242\n", "{cmd}");
    }
    let e = pgflow(&pool, &["run", "424242", "--json"]).await.err();
    assert_eq!(e, "error: no run with id 424242\n");
}

#[sqlx::test(migrations = false)]
async fn migrate_creates_the_schema_the_other_commands_need(pool: PgPool) {
    let e = pgflow(&pool, &["status"]).await.err();
    assert!(e.contains("the pgflow schema is missing"), "{e}");
    assert!(e.contains("run `pgflow migrate`"), "{e}");
    let expected: String = pgflow_runtime::MIGRATOR
        .iter()
        .map(|m| format!("applied {:04} {}\n", m.version, m.description))
        .collect();
    assert!(expected.starts_with("applied 0001 init\n"), "{expected}");
    assert_eq!(pgflow(&pool, &["migrate"]).await.ok(), expected);
    let v = pgflow(&pool, &["migrate", "--json"]).await.json();
    assert_eq!(v["applied"], Value::Array(vec![]));
    assert_eq!(
        v["already_applied"],
        pgflow_runtime::MIGRATOR.iter().count()
    );
    let out = pgflow(&pool, &["status"]).await.ok();
    assert!(out.contains("(no runs)"), "{out}");
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let url = "postgres://app:hunter2@127.0.0.1:1/app";
    let by_flag = pgflow_env(&[], &["--database-url", url, "status"])
        .await
        .err();
    let by_env = pgflow_env(&[("DATABASE_URL", url)], &["runs", "--json"])
        .await
        .err();
    for e in [by_flag, by_env] {
        assert!(
            e.starts_with(
                "error: cannot connect to PostgreSQL at postgres://app:***@127.0.0.1:1/app"
            ),
            "{e}"
        );
        assert!(e.contains("pg_isready"), "says what to check: {e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}

/// A conditional step and a map step, for `pgflow run`.
pub struct Survey;

#[workflow(name = "cli_survey", queue = "cli")]
impl Survey {
    #[step]
    async fn answers(n: u32) -> Result<Vec<u32>, StepError> {
        Ok((0..n).collect())
    }

    #[step(map)]
    async fn score(answers: u32) -> Result<u32, StepError> {
        Ok(answers * 2)
    }

    #[step(when = Self::worth_a_review)]
    async fn review(score: Vec<u32>) -> Result<String, StepError> {
        Ok(format!("{} scores", score.len()))
    }

    #[step]
    async fn report(review: Option<String>) -> Result<String, StepError> {
        Ok(review.unwrap_or_else(|| "no review".into()))
    }

    fn worth_a_review(score: &[u32]) -> bool {
        score.len() > 10
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn start_by_name_then_run_shows_skips_elements_and_waits(pool: PgPool) {
    // The definition is stored by a runtime that links it; then the CLI starts a
    // run by name (it links nothing) and a worker picks it up.
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    let out = pgflow(&pool, &["start", "cli_survey", "--input", "4"])
        .await
        .ok();
    let id: i64 = out
        .strip_prefix("run ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(out, format!("run {id} of cli_survey v1 started\n"));
    assert_eq!(
        finished::<String>(&rt, RunId(id)).await.unwrap(),
        "no review"
    );
    let out = pgflow(&pool, &["run", &id.to_string()]).await.ok();
    assert_eq!(cells(row(&out, "review"))[1], "skipped", "{out}");
    assert!(
        out.contains("review: skipped: `when = Self::worth_a_review` was false"),
        "{out}"
    );
    assert!(out.contains("score: 4 of 4 elements completed"), "{out}");
    let v = pgflow(&pool, &["run", &id.to_string(), "--json"])
        .await
        .json();
    let score = &v["steps"][1];
    assert_eq!(score["name"], "score");
    assert_eq!(score["elements"]["completed"], 4);
    assert!(
        score["elements"]["slowest_ms"].as_i64().is_some(),
        "{score}"
    );
    // every step that ran knows when it started: duration excludes the wait
    for s in v["steps"].as_array().unwrap() {
        if s["status"] == "completed" {
            assert!(s["started_at"].is_string(), "{s}");
            assert!(s["wait_ms"].as_i64().is_some(), "{s}");
        }
    }
    // the same key twice: one run
    let first = pgflow(
        &pool,
        &[
            "start",
            "cli_greet",
            "--input",
            "\"amy\"",
            "--idempotency-key",
            "k1",
        ],
    )
    .await
    .json_or_text();
    let again = pgflow(
        &pool,
        &[
            "start",
            "cli_greet",
            "--input",
            "\"amy\"",
            "--idempotency-key",
            "k1",
            "--json",
        ],
    )
    .await
    .json();
    assert_eq!(again["created"], false);
    assert!(first.contains(&format!("run {} ", again["id"])), "{first}");
    // unknown workflows and bad JSON are clear errors
    let e = pgflow(&pool, &["start", "nope", "--input", "1"])
        .await
        .err();
    assert!(e.contains("no definition of it is stored"), "{e}");
    let e = pgflow_env(&[], &["start", "cli_greet", "--input", "{nope"]).await;
    assert_ne!(e.code, 0);
    assert!(e.stderr.contains("not valid JSON"), "{e:?}");
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn runs_take_the_words_results_prints_and_watch_repeats(pool: PgPool) {
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    let run = rt.start::<Greet>("bo".to_owned()).await.unwrap();
    finished::<String>(&rt, run.id()).await.unwrap();
    let a = pgflow(&pool, &["runs", "--status", "success", "--json"])
        .await
        .json();
    let b = pgflow(&pool, &["runs", "--status", "succeeded", "--json"])
        .await
        .json();
    assert_eq!(a, b);
    assert_eq!(a.as_array().map(Vec::len), Some(1));
    let none = pgflow(&pool, &["runs", "--status", "failure"]).await.ok();
    assert_eq!(none, "no failed runs\n");
    // --watch prints the list again until interrupted
    let url = url_of(&pool);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgflow"))
        .args(["--database-url", &url, "runs", "--watch", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("cli_greet").count() >= 2, "{text}");
    rt.shutdown().await.unwrap();
}

impl Out {
    /// The output of a successful command, whatever its form.
    fn json_or_text(self) -> String {
        self.ok()
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn fork_starts_a_new_run_and_status_shows_versions(pool: PgPool) {
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    let original = rt.start::<Greet>("amy".to_owned()).await.unwrap();
    finished::<String>(&rt, original.id()).await.unwrap();
    let id = original.id().0.to_string();

    let out = pgflow(&pool, &["fork", &id, "--from", "shout"]).await.ok();
    let fork_id: i64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no run id in {out}"));
    assert_eq!(
        out,
        format!(
            "run {fork_id} (cli_greet v1) forked from run {id} at step shout\n  reused   hello\n  \
             rerun    shout\n  enqueued shout\n"
        )
    );
    assert_eq!(
        finished::<String>(&rt, RunId(fork_id)).await.unwrap(),
        "HELLO AMY"
    );
    let detail = pgflow(&pool, &["run", &fork_id.to_string()]).await.ok();
    assert!(
        detail.contains(&format!("forked    from run {id} at step shout")),
        "{detail}"
    );

    let v = pgflow(
        &pool,
        &[
            "fork", &id, "--from", "hello", "--input", "\"bob\"", "--json",
        ],
    )
    .await
    .json();
    assert_eq!(v["reused"], Value::Array(vec![]));
    assert_eq!(v["rerun"], serde_json::json!(["hello", "shout"]));
    let bob = RunId(v["id"].as_i64().unwrap());
    assert_eq!(finished::<String>(&rt, bob).await.unwrap(), "HELLO BOB");

    let detail = pgflow(&pool, &["run", &id]).await.ok();
    assert!(
        detail.contains(&format!("forks     {fork_id}, {}", bob.0)),
        "{detail}"
    );
    let e = pgflow(&pool, &["fork", &id, "--from", "nope"]).await.err();
    assert!(
        e.contains("has no step `nope`; its steps: hello, shout"),
        "{e}"
    );
    let e = pgflow(&pool, &["fork", &id, "--from", "hello", "--version", "7"])
        .await
        .err();
    assert!(e.contains("cli_greet") && e.contains('7'), "{e}");

    let status = pgflow(&pool, &["status"]).await.ok();
    let versions = &status[status.find("VERSIONS").expect("a VERSIONS table")..];
    assert_eq!(
        cells(row(versions, "cli_greet")),
        ["cli_greet", "1", "cli", "0", "cli-test"],
        "{status}"
    );
    rt.shutdown().await.unwrap();
    let status = pgflow(&pool, &["status", "--json"]).await.json();
    let v = status["versions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["workflow"] == "cli_greet")
        .expect("cli_greet is registered");
    assert_eq!(
        (&v["workflow"], &v["running"]),
        (&Value::from("cli_greet"), &Value::from(0))
    );
    assert_eq!(
        v["instances"],
        Value::Array(vec![]),
        "the instance went offline"
    );
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn schedules_are_listed_shown_in_status_and_removed(pool: PgPool) {
    use pgflow_runtime::{Missed, Schedule};
    let nightly = Schedule::cron::<Greet>("nightly", "0 0 3 * * *", |_| "night".to_owned())
        .unwrap()
        .time_zone("Europe/Paris")
        .unwrap();
    let hourly = Schedule::cron::<Greet>("hourly", "0 * * * *", |_| "hour".to_owned())
        .unwrap()
        .missed(Missed::Skip);
    let rt = Runtime::builder()
        .pool(pool.clone())
        .instance_id("cli-test")
        .schedule(nightly)
        .schedule(hourly)
        .start()
        .await
        .expect("the runtime starts");
    rt.shutdown().await.unwrap();
    // No instance runs `hourly` and its tick is 2 minutes past: it is overdue.
    sqlx::query(
        "UPDATE pgflow.schedules SET next_tick = now() - interval '2 minutes' WHERE name = 'hourly'",
    )
    .execute(&pool)
    .await
    .unwrap();

    let out = pgflow(&pool, &["schedules"]).await.ok();
    let line = cells(row(&out, "nightly"));
    assert_eq!(
        line[..9],
        [
            "nightly",
            "cli_greet",
            "0",
            "0",
            "3",
            "*",
            "*",
            "*",
            "Europe/Paris"
        ],
        "{out}"
    );
    assert_eq!(line[9], "run_once", "{out}");
    assert!(
        out.contains("WARNING: schedule hourly is 2m") && out.contains("overdue"),
        "{out}"
    );
    assert!(!out.contains("schedule nightly is"), "{out}");

    let status = pgflow(&pool, &["status"]).await.ok();
    let section = &status[status.find("SCHEDULES").expect("a SCHEDULES table")..];
    assert_eq!(cells(row(section, "hourly"))[1..3], ["cli_greet", "0"]);

    let v = pgflow(&pool, &["schedules", "--json"]).await.json();
    assert_eq!(v[0]["name"], "hourly");
    assert_eq!(v[0]["missed"], "skip");
    assert!(v[0]["next_in_ms"].as_i64().unwrap() < -100_000);
    assert_eq!(v[1]["time_zone"], "Europe/Paris");
    let s = pgflow(&pool, &["status", "--json"]).await.json();
    assert_eq!(s["schedules"].as_array().unwrap().len(), 2);

    let out = pgflow(&pool, &["schedules", "remove", "hourly"]).await.ok();
    assert!(
        out.starts_with("removed schedule hourly (cli_greet `0 * * * *` in UTC)"),
        "{out}"
    );
    let e = pgflow(&pool, &["schedules", "remove", "hourly"])
        .await
        .err();
    assert_eq!(
        e.trim_end(),
        "error: no schedule named `hourly`; schedules: nightly"
    );
    let v = pgflow(&pool, &["schedules", "remove", "nightly", "--json"])
        .await
        .json();
    assert_eq!(v["name"], "nightly");
    let out = pgflow(&pool, &["schedules", "list"]).await.ok();
    assert_eq!(out, "  (no schedules)\n");
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn prune_counts_then_deletes_finished_runs(pool: PgPool) {
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    for name in ["ann", "bob"] {
        let run = rt.start::<Greet>(name.to_owned()).await.unwrap();
        finished::<String>(&rt, run.id()).await.unwrap();
    }
    rt.shutdown().await.unwrap();
    let out = pgflow(&pool, &["prune", "--older-than", "7d", "--dry-run"])
        .await
        .ok();
    assert!(out.starts_with("would prune 0 runs"), "{out}");
    let v = pgflow(
        &pool,
        &["prune", "--older-than", "0s", "--dry-run", "--json"],
    )
    .await
    .json();
    assert_eq!(
        (&v["runs"], &v["steps"]),
        (&Value::from(2), &Value::from(2))
    );
    let out = pgflow(&pool, &["prune", "--older-than", "0s", "--archive"])
        .await
        .ok();
    assert!(
        out.starts_with("archived 2 runs (2 step states, 0 map elements) that finished before "),
        "{out}"
    );
    let out = pgflow(&pool, &["runs"]).await.ok();
    assert!(!out.contains("cli_greet"), "{out}");
    let e = pgflow(&pool, &["prune", "--older-than", "soon"]).await;
    assert_ne!(e.code, 0);
}

/// Waits for an approval signal.
pub struct Approve;

#[workflow(name = "cli_approve", queue = "cli")]
impl Approve {
    #[step(signal = approval)]
    async fn decide(input: String, approval: bool) -> Result<String, StepError> {
        Ok(format!("{input}: {approval}"))
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn signal_delivers_once_and_refuses_unknown_names_and_finished_runs(pool: PgPool) {
    // A producer (no queue): the step waits (its task is parked), nothing runs it.
    let rt = runtime(&pool, Arc::new(Probe::default()), false).await;
    let run = rt.start::<Approve>("deploy".to_owned()).await.unwrap();
    let id = run.id().0.to_string();
    let out = pgflow(&pool, &["run", &id]).await.ok();
    assert_eq!(
        cells(row(&out, "decide"))[1..3],
        ["awaiting", "signal"],
        "{out}"
    );
    let e = pgflow(&pool, &["signal", &id, "aproval", "true"])
        .await
        .err();
    assert_eq!(
        e,
        format!(
            "error: no step of run {id} waits for a signal named `aproval`; it waits for `approval`\n"
        )
    );
    let e = pgflow(&pool, &["signal", &id, "approval", "{yes"]).await;
    assert_eq!(e.code, 2, "{e:?}");
    assert!(e.stderr.contains("not valid JSON"), "{e:?}");
    assert_eq!(
        pgflow(&pool, &["signal", &id, "approval", "true"])
            .await
            .ok(),
        format!("signal `approval` to run {id}: delivered: the waiting step runs now\n")
    );
    let v = pgflow(&pool, &["signal", &id, "approval", "false", "--json"])
        .await
        .json();
    assert_eq!(v["outcome"], "duplicate");
    assert_eq!(v["name"], "approval");
    let v = pgflow(&pool, &["run", &id, "--json"]).await.json();
    assert_eq!(v["steps"][0]["status"], "queued", "{v}");
    rt.shutdown().await.unwrap();
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    assert_eq!(
        finished::<String>(&rt, run.id()).await.unwrap(),
        "deploy: true"
    );
    let e = pgflow(&pool, &["signal", &id, "approval", "true"])
        .await
        .err();
    assert_eq!(
        e,
        format!("error: run {id} has status `succeeded`: it takes no more signals\n")
    );
    let e = pgflow(&pool, &["signal", "424242", "approval", "true"])
        .await
        .err();
    assert_eq!(e, "error: no run with id 424242\n");
    rt.shutdown().await.unwrap();
}

/// A child that waits for a signal nobody sends.
pub struct CliChild;

#[workflow(name = "cli_child", queue = "cli")]
impl CliChild {
    #[step(signal = go)]
    async fn wait(n: u32, go: u32) -> Result<u32, StepError> {
        Ok(n + go)
    }
}

/// Runs [`CliChild`] twice (a map over subflows).
pub struct CliParent;

#[workflow(name = "cli_parent", queue = "cli")]
impl CliParent {
    #[step(map)]
    async fn spawn(n: u32) -> Result<pgflow::Subflow<CliChild>, StepError> {
        Ok(pgflow::Subflow::new(n))
    }

    #[step]
    async fn sum(spawn: Vec<u32>) -> Result<u32, StepError> {
        Ok(spawn.iter().sum())
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn run_shows_the_tree_of_child_runs_and_cancel_names_them(pool: PgPool) {
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    let run = rt.start::<CliParent>(vec![1, 2]).await.unwrap();
    let id = run.id().0;
    let mut kids: Vec<i64> = Vec::new();
    for _ in 0..500 {
        kids = sqlx::query_scalar(
            "SELECT r.id FROM pgflow.runs r JOIN pgflow.tasks t ON t.run_id = r.id
             WHERE r.parent_run_id = $1 AND t.parked ORDER BY r.parent_element",
        )
        .bind(id)
        .fetch_all(&pool)
        .await
        .unwrap();
        if kids.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(kids.len(), 2, "both children wait");
    let out = pgflow(&pool, &["run", &id.to_string()]).await.ok();
    assert!(out.contains("SUBFLOWS"), "{out}");
    for (e, kid) in kids.iter().enumerate() {
        assert!(
            out.contains(&format!(
                "└ run {kid} cli_child v1  running  (from step spawn[{e}])"
            )),
            "{out}"
        );
    }
    let s = pgflow(&pool, &["status", "--json"]).await.json();
    assert_eq!(s["queues"][0]["awaiting_subflow"], 2, "{s}");
    assert_eq!(s["queues"][0]["awaiting_signal"], 2, "{s}");
    assert_eq!(s["queues"][0]["scheduled"], 0, "{s}");
    let v = pgflow(&pool, &["run", &id.to_string(), "--json"])
        .await
        .json();
    assert_eq!(v["subflows"][1]["parent"]["element"], 1);
    let child = pgflow(&pool, &["run", &kids[0].to_string()]).await.ok();
    assert!(
        child.contains(&format!("parent    run {id} at step spawn[0]")),
        "{child}"
    );
    // by id
    kids.sort_unstable();
    assert_eq!(
        pgflow(&pool, &["cancel", &id.to_string()]).await.ok(),
        format!(
            "run {id} cancelled, with its child runs {}, {}\n",
            kids[0], kids[1]
        )
    );
    rt.shutdown().await.unwrap();
}

/// Reports usage under two models.
pub struct CliSpender;

#[workflow(name = "cli_spender", queue = "cli", key = Self::tenant)]
impl CliSpender {
    #[step]
    async fn spend(tenant: String, ctx: &StepContext) -> Result<String, StepError> {
        ctx.add_usage("big", 1000, 100, 7);
        ctx.add_usage("small", 10, 1, 1);
        Ok(tenant)
    }

    fn tenant(tenant: &str) -> &str {
        tenant
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn costs_groups_the_usage_ledger(pool: PgPool) {
    let rt = runtime(&pool, Arc::new(Probe::default()), true).await;
    for tenant in ["acme", "acme", "globex"] {
        let run = rt.start::<CliSpender>(tenant.to_owned()).await.unwrap();
        finished::<String>(&rt, run.id()).await.unwrap();
    }
    rt.shutdown().await.unwrap();
    let out = pgflow(&pool, &["costs", "--by", "model"]).await.ok();
    assert_eq!(
        cells(row(&out, "big")),
        ["big", "3", "3", "3000", "300", "21"],
        "{out}"
    );
    assert_eq!(
        cells(row(&out, "small")),
        ["small", "3", "3", "30", "3", "3"],
        "{out}"
    );
    assert_eq!(cells(row(&out, "total"))[5], "24", "{out}");
    let v = pgflow(&pool, &["costs", "--by", "key", "--since", "1h", "--json"])
        .await
        .json();
    assert_eq!(v["rows"][0]["group"], "acme");
    assert_eq!(v["rows"][0]["cost_cents"], 16);
    assert_eq!(v["rows"][1]["group"], "globex");
    let bad = pgflow(&pool, &["costs", "--by", "tenant"]).await;
    assert_eq!(bad.code, 2);
    assert!(
        bad.stderr.contains("use workflow, model or key"),
        "{}",
        bad.stderr
    );
}

/// A raw HTTP GET of `path` on `port` (no client crate for one request): the
/// status line and the body.
fn http_get(port: u16, path: &str) -> Option<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_owned(), body.to_owned()))
}

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn dashboard_serves_pages_and_refuses_open_addresses_without_a_token(pool: PgPool) {
    let err = pgflow(&pool, &["dashboard", "--listen", "0.0.0.0:0"])
        .await
        .err();
    assert!(err.contains("token") && err.contains("0.0.0.0"), "{err}");
    let url = url_of(&pool);
    for token in [None, Some("t0k")] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgflow"));
        cmd.args(["--database-url", &url, "dashboard", "--listen", &listen])
            .env_remove("PGFLOW_DASHBOARD_TOKEN")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let mut child = cmd.spawn().expect("pgflow dashboard starts");
        let mut answer = None;
        for _ in 0..200 {
            answer = tokio::task::spawn_blocking(move || http_get(port, "/runs"))
                .await
                .expect("the request task");
            if answer.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        let (status, body) = answer.expect("the dashboard answered");
        if token.is_some() {
            assert!(status.contains(" 401 "), "{status}");
        } else {
            assert!(status.contains(" 200 "), "{status}");
            assert!(body.contains("data-page=\"runs\""), "{body}");
        }
    }
}
