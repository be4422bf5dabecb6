//! The chaos program (not a CI test): K worker processes serve N runs of
//! `ProcChain3` while workers are killed with SIGKILL and replaced at random,
//! optionally with all database connections terminated and PostgreSQL restarted.
//!
//! ```text
//! cargo run --release --example chaos -- --runs 10000 --workers 3 --kill-every 2 \
//!     [--terminate-backends] [--restart-postgres] [--sleep-ms MS] [--timeout SECS]
//! ```
//!
//! It ends with one line:
//! `CHAOS runs=N completed=N lost=0 duplicate_completions=0 failed=0 step_executions=X max_recovery_ms=Y`
//! - `completed`/`failed`: runs that finished so;
//! - `lost`: runs not finished when the timeout ended the test;
//! - `duplicate_completions`: step outputs or run completions applied more than once
//!   (counted by triggers on a copy of the audit trail in this test database);
//! - `step_executions`: step bodies that ran (at least once each; more after kills);
//! - `max_recovery_ms`: the longest time from a kill until every task the killed
//!   worker held was released (re-queued and re-claimed or completed).
//!
//! It uses a fresh database (`--database`, default `pgflow_chaos`, dropped WITH FORCE
//! first) on the server of `DATABASE_URL` and the
//! `worker` example binary next to its own (built on demand with `$CARGO`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pgflow_runtime::Runtime;
use pgflow_suite::flows::{EXECUTIONS_DDL, Job, ProcChain3};
use pgflow_suite::support::fresh_database;
use sqlx::PgPool;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    runs: u64,
    workers: usize,
    kill_every: f64,
    terminate_backends: bool,
    restart_postgres: bool,
    /// The database it drops and recreates.
    database: String,
    sleep_ms: u64,
    timeout: u64,
}

const USAGE: &str = "usage: chaos --runs N --workers K --kill-every SECS [--terminate-backends] [--restart-postgres] [--sleep-ms MS] [--timeout SECS] [--database NAME]\n\n--database NAME (default pgflow_chaos) is dropped (WITH FORCE) and created anew.\n--restart-postgres restarts the local PostgreSQL server (pg_ctlcluster): every database on it is interrupted.";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        runs: 10_000,
        workers: 3,
        kill_every: 2.0,
        terminate_backends: false,
        restart_postgres: false,
        database: "pgflow_chaos".to_owned(),
        sleep_ms: 2,
        timeout: 600,
    };
    let mut it = std::env::args().skip(1);
    fn val<T: std::str::FromStr>(v: Option<String>, flag: &str) -> Result<T, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        v.parse().map_err(|_| format!("{flag}: bad value {v}"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => a.runs = val(it.next(), &arg)?,
            "--workers" => a.workers = val::<usize>(it.next(), &arg)?.max(1),
            "--kill-every" => a.kill_every = val(it.next(), &arg)?,
            "--terminate-backends" => a.terminate_backends = true,
            "--restart-postgres" => a.restart_postgres = true,
            "--database" => {
                let name = it.next().ok_or("--database needs a name")?;
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("--database: use letters, digits and `_`: {name}"));
                }
                a.database = name;
            }
            "--sleep-ms" => a.sleep_ms = val(it.next(), &arg)?,
            "--timeout" => a.timeout = val(it.next(), &arg)?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// Audit triggers: every applied completion leaves a row, so a completion applied
/// twice shows up as a duplicate.
const AUDIT_DDL: &str = "
CREATE TABLE pgflow_test.completions (run_id bigint NOT NULL, step text NOT NULL);
CREATE FUNCTION pgflow_test.audit_step() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'completed' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM 'completed'
                                     OR OLD.output IS DISTINCT FROM NEW.output
                                     OR OLD.completed_at IS DISTINCT FROM NEW.completed_at) THEN
        INSERT INTO pgflow_test.completions VALUES (NEW.run_id, NEW.step::text);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_step AFTER INSERT OR UPDATE ON pgflow.step_states
    FOR EACH ROW EXECUTE FUNCTION pgflow_test.audit_step();
CREATE FUNCTION pgflow_test.audit_run() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status <> 'running' AND (OLD.status = 'running' OR OLD.completed_at IS DISTINCT FROM NEW.completed_at) THEN
        INSERT INTO pgflow_test.completions VALUES (NEW.id, 'run');
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER audit_run AFTER UPDATE ON pgflow.runs
    FOR EACH ROW EXECUTE FUNCTION pgflow_test.audit_run();
";

fn worker_bin() -> Res<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("no exe dir")?;
    let bin = dir.join("worker");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").map_err(|_| {
            format!(
                "{} is missing: run `cargo build --release --example worker` first",
                bin.display()
            )
        })?;
        let release = dir.parent().is_some_and(|p| p.ends_with("release"));
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", "worker"]);
        if release {
            cmd.arg("--release");
        }
        if !cmd.status()?.success() {
            return Err("building the worker example failed".into());
        }
    }
    Ok(bin)
}

fn spawn_worker(bin: &PathBuf, url: &str, id: &str) -> Res<Child> {
    Ok(Command::new(bin)
        .env("DATABASE_URL", url)
        .env("INSTANCE_ID", id)
        .env("RUST_LOG", "off")
        .args([
            "--queue",
            "default=16",
            "--heartbeat-ms",
            "200",
            "--offline-after-ms",
            "1500",
            "--lease-grace-ms",
            "5000",
            "--shutdown-grace-ms",
            "10000",
            "--record-executions",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Measures, for one kill, how long until the victim's claims are all released.
async fn recovery(pool: PgPool, victim: String, killed: Instant, max_ms: Arc<AtomicU64>) {
    let held: Vec<i64> = loop {
        match sqlx::query_scalar("SELECT id FROM pgflow.tasks WHERE claimed_by = $1")
            .bind(&victim)
            .fetch_all(&pool)
            .await
        {
            Ok(ids) => break ids,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    loop {
        let left: Result<i64, _> = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.tasks WHERE id = ANY($1) AND claimed_by = $2",
        )
        .bind(&held)
        .bind(&victim)
        .fetch_one(&pool)
        .await;
        if matches!(left, Ok(0)) {
            let ms = killed.elapsed().as_millis() as u64;
            max_ms.fetch_max(ms, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run(a: Args) -> Res<()> {
    let url = fresh_database(&a.database).await?;
    let pool = PgPool::connect(&url).await?;
    pgflow_runtime::MIGRATOR.run(&pool).await?;
    sqlx::raw_sql(EXECUTIONS_DDL).execute(&pool).await?;
    sqlx::raw_sql(AUDIT_DDL).execute(&pool).await?;
    let producer = Runtime::builder()
        .pool(pool.clone())
        .instance_id("chaos-producer")
        .start()
        .await?;
    let bin = worker_bin()?;
    let mut generation = 0_u64;
    let mut next_id = |slot: usize| {
        generation += 1;
        format!("chaos_w{slot}_{generation}")
    };
    let mut workers: Vec<(String, Child)> = Vec::new();
    for slot in 0..a.workers {
        let id = next_id(slot);
        workers.push((id.clone(), spawn_worker(&bin, &url, &id)?));
    }

    let started = Instant::now();
    let jobs: Vec<Job> = (0..a.runs)
        .map(|n| Job {
            n,
            sleep_ms: a.sleep_ms,
        })
        .collect();
    for chunk in jobs.chunks(1_000) {
        producer.start_many::<ProcChain3>(chunk.to_vec()).await?;
    }
    eprintln!("chaos: {} runs started; {} workers", a.runs, a.workers);

    let max_recovery = Arc::new(AtomicU64::new(0));
    let mut recoveries = Vec::new();
    let mut kills = 0;
    let deadline = started + Duration::from_secs(a.timeout);
    let mut next_kill = Instant::now() + Duration::from_secs_f64(a.kill_every);
    loop {
        let done = count(
            &pool,
            "SELECT count(*) FROM pgflow.runs WHERE status <> 'running'",
        )
        .await;
        if done >= a.runs as i64 || Instant::now() > deadline {
            break;
        }
        if Instant::now() >= next_kill {
            let slot = fastrand::usize(..workers.len());
            let (victim, mut child) = workers.remove(slot);
            child.kill()?;
            child.wait()?;
            kills += 1;
            let killed = Instant::now();
            recoveries.push(tokio::spawn(recovery(
                pool.clone(),
                victim.clone(),
                killed,
                Arc::clone(&max_recovery),
            )));
            let id = next_id(slot);
            workers.insert(slot, (id.clone(), spawn_worker(&bin, &url, &id)?));
            eprintln!("chaos: killed {victim}, started {id} ({done} runs finished)");
            if a.terminate_backends && fastrand::bool() {
                let n = count(
                    &pool,
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .await;
                eprintln!("chaos: terminated {n} backends");
            }
            if a.restart_postgres && kills % 3 == 0 {
                let version = std::fs::read_dir("/etc/postgresql")?
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .next()
                    .ok_or("no /etc/postgresql/<version>")?;
                let ok = Command::new("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &version, "main", "restart"])
                    .status()?
                    .success();
                eprintln!(
                    "chaos: restarted PostgreSQL ({})",
                    if ok { "ok" } else { "failed" }
                );
            }
            next_kill = Instant::now() + Duration::from_secs_f64(a.kill_every);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    for r in recoveries {
        let _ = tokio::time::timeout(Duration::from_secs(30), r).await;
    }
    for (_, child) in &workers {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    for (_, mut child) in workers {
        let _ = child.wait();
    }
    let completed = count(
        &pool,
        "SELECT count(*) FROM pgflow.runs WHERE status = 'succeeded'",
    )
    .await;
    let failed = count(
        &pool,
        "SELECT count(*) FROM pgflow.runs WHERE status = 'failed'",
    )
    .await;
    let wrong = count(
        &pool,
        "SELECT count(*) FROM pgflow.runs
         WHERE status = 'succeeded' AND output #>> '{}' <> 'n=' || ((input->>'n')::bigint + 3)",
    )
    .await;
    let duplicates = count(
        &pool,
        "SELECT count(*) FROM (SELECT 1 FROM pgflow_test.completions
                               GROUP BY run_id, step HAVING count(*) > 1) d",
    )
    .await;
    let executions = count(&pool, "SELECT count(*) FROM pgflow_test.executions").await;
    let lost = a.runs as i64 - completed - failed;
    eprintln!("chaos: {kills} kills in {secs:.1} s; {wrong} wrong outputs");
    producer.shutdown().await?;
    println!(
        "CHAOS runs={} completed={completed} lost={lost} duplicate_completions={duplicates} failed={failed} step_executions={executions} max_recovery_ms={} wrong_outputs={wrong} kills={kills} secs={secs:.1}",
        a.runs,
        max_recovery.load(Ordering::Relaxed),
    );
    if lost != 0 || duplicates != 0 || failed != 0 || wrong != 0 {
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("chaos failed: {e}");
        std::process::exit(1);
    }
}
