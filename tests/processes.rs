//! Many instances, one queue, with real processes: the `worker` example binary is
//! spawned (built by `cargo test`, which builds examples), killed with SIGKILL,
//! stopped with SIGTERM, and its connections terminated, while a producer in this
//! process starts runs of `ProcChain3`; and a rolling deploy from the `deploy_v1`
//! binary to `deploy_v2`. Each test has its own database.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pgflow::RunId;
use pgflow_runtime::Runtime;
use pgflow_suite::flows::{EXECUTIONS_DDL, Job, ProcChain3, expected_output};
use sqlx::{Connection, PgPool};

fn worker_bin() -> PathBuf {
    pgflow_suite::support::example_binary("worker")
}

fn database_url(pool: &PgPool) -> String {
    pgflow_suite::support::url_of(&pool.connect_options())
}

/// A worker process; killed when dropped. Its log (stderr: the WARN lines a kill or a
/// terminated connection causes are expected here) is kept and shown only if the
/// test fails.
struct Worker {
    id: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Worker {
    fn spawn(url: &str, id: &str) -> Worker {
        Worker::spawn_with(url, id, &[])
    }

    /// The worker with `extra` arguments after the usual ones.
    fn spawn_with(url: &str, id: &str, extra: &[&str]) -> Worker {
        let mut args = vec![
            "--queue",
            "default=8",
            "--heartbeat-ms",
            "200",
            "--offline-after-ms",
            "1500",
            "--lease-grace-ms",
            "3000",
            "--shutdown-grace-ms",
            "20000",
            "--record-executions",
        ];
        args.extend_from_slice(extra);
        Worker::spawn_bin(&worker_bin(), url, id, &args)
    }

    /// Spawns `bin` with `args` and waits until it prints `ready`.
    fn spawn_bin(bin: &std::path::Path, url: &str, id: &str, args: &[&str]) -> Worker {
        let mut child = Command::new(bin)
            .env("DATABASE_URL", url)
            .env("INSTANCE_ID", id)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the worker");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let keep = std::sync::Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = keep.lock() {
                    l.push(line);
                }
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let w = Worker {
            id: id.to_owned(),
            child,
            lines,
            log,
        };
        w.expect_line("ready", Duration::from_secs(60));
        w
    }

    fn expect_line(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("worker {} never printed {needle:?}: {e}", self.id),
            }
        }
    }

    fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "worker {} did not exit", self.id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = self.log.lock() {
                eprintln!("--- log of worker {} ---\n{}", self.id, log.join("\n"));
            }
        }
    }
}

async fn producer(pool: &PgPool) -> Runtime {
    sqlx::raw_sql(EXECUTIONS_DDL).execute(pool).await.unwrap();
    Runtime::builder()
        .pool(pool.clone())
        .instance_id("producer")
        .start()
        .await
        .unwrap()
}

async fn start_runs(rt: &Runtime, n: u64, sleep_ms: u64) -> Vec<RunId> {
    let mut ids = Vec::new();
    let jobs: Vec<Job> = (0..n).map(|n| Job { n, sleep_ms }).collect();
    for chunk in jobs.chunks(1_000) {
        ids.extend(rt.start_many::<ProcChain3>(chunk.to_vec()).await.unwrap());
    }
    ids
}

async fn finished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status <> 'running'")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_all(pool: &PgPool, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while finished(pool).await < n as i64 {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} runs finished",
            finished(pool).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every run succeeded once with the right output, every step output was stored
/// once, and the queue is empty.
async fn assert_exactly_once(pool: &PgPool, ids: &[RunId]) {
    let n = ids.len() as i64;
    let rows: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, status, output #>> '{}' FROM pgflow.runs WHERE workflow = 'proc_chain3' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(rows.len() as i64, n);
    for (i, (id, status, output)) in rows.iter().enumerate() {
        assert_eq!(*id, ids[i].0);
        assert_eq!(status, "succeeded", "run {id}");
        assert_eq!(output, &expected_output(i as u64), "run {id}");
    }
    let (states, tasks): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pgflow.step_states WHERE status = 'completed'),
                (SELECT count(*) FROM pgflow.tasks)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((states, tasks), (2 * n, 0));
}

/// Steps (run, step) whose body ran more than once.
async fn executed_twice(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM pgflow_test.executions
                               GROUP BY run_id, step HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Steps completed per instance: stored step outputs plus finished runs (the last
/// step's completion).
async fn completions_by_instance(pool: &PgPool) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT instance_id, count(*) FROM (
             SELECT instance_id FROM pgflow.step_states WHERE status = 'completed'
             UNION ALL
             SELECT instance_id FROM pgflow.runs WHERE status = 'succeeded'
         ) c GROUP BY instance_id ORDER BY instance_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn three_workers_share_3000_runs(pool: PgPool) {
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let workers: Vec<Worker> = ["instance_a", "instance_b", "instance_c"]
        .iter()
        .map(|id| Worker::spawn(&url, id))
        .collect();
    let ids = start_runs(&rt, 3_000, 0).await;
    wait_all(&pool, 3_000, Duration::from_secs(120)).await;
    assert_exactly_once(&pool, &ids).await;

    let by_instance = completions_by_instance(&pool).await;
    let total: i64 = by_instance.iter().map(|r| r.1).sum();
    assert_eq!(total, 9_000);
    for w in &workers {
        let n = by_instance.iter().find(|r| r.0 == w.id).map_or(0, |r| r.1);
        assert!(
            n * 100 >= total * 15,
            "{} completed {n} of {total} steps: {by_instance:?}",
            w.id
        );
    }
    // No step was executed twice: nothing failed or was rescued.
    let twice = executed_twice(&pool).await;
    assert_eq!(twice, 0);
    let online = rt.instances().await.unwrap();
    for w in &workers {
        let i = online.iter().find(|i| i.id == w.id).expect("registered");
        assert_eq!(i.status, "online");
        assert_eq!(i.capacity, 8);
    }
    drop(workers);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_worker_killed_with_sigkill_loses_nothing(pool: PgPool) {
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let mut workers: Vec<Worker> = ["instance_a", "instance_b", "instance_c"]
        .iter()
        .map(|id| Worker::spawn(&url, id))
        .collect();
    let ids = start_runs(&rt, 600, 20).await;
    // Under load: wait until the victim has executed some steps, then kill it.
    let victim = "instance_b";
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow_test.executions WHERE instance_id = $1",
        )
        .bind(victim)
        .fetch_one(&pool)
        .await
        .unwrap();
        if n >= 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed_at = Instant::now();
    workers[1].sigkill();
    assert!(
        finished(&pool).await < 600,
        "the kill came too late to matter"
    );

    wait_all(&pool, 600, Duration::from_secs(120)).await;
    assert_exactly_once(&pool, &ids).await;
    // Steps run twice were in the hands of the killed worker.
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id, step FROM pgflow_test.executions
                               GROUP BY run_id, step
                               HAVING count(*) > 1 AND NOT bool_or(instance_id = $1)) d",
    )
    .bind(victim)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        bad, 0,
        "a step was re-executed without the victim having run it"
    );
    let instances = rt.instances().await.unwrap();
    let dead = instances.iter().find(|i| i.id == victim).unwrap();
    assert_eq!(dead.status, "offline");
    println!(
        "all 600 runs finished {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
    drop(workers);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn sigterm_lets_in_flight_steps_finish(pool: PgPool) {
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let mut leaving = Worker::spawn(&url, "leaving");
    let ids = start_runs(&rt, 40, 300).await;
    // Wait until `leaving` is in the middle of steps.
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks WHERE claimed_by = 'leaving'")
                .fetch_one(&pool)
                .await
                .unwrap();
        if n > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let staying = Worker::spawn(&url, "staying");
    leaving.sigterm();
    let status = leaving.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "graceful exit: {status}");
    leaving.expect_line("stopped", Duration::from_secs(5));
    // Nothing the leaving worker held is left claimed.
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks WHERE claimed_by = 'leaving'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(held, 0);
    let (status,): (String,) =
        sqlx::query_as("SELECT status FROM pgflow.instances WHERE id = 'leaving'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(status, "offline");

    wait_all(&pool, 40, Duration::from_secs(120)).await;
    assert_exactly_once(&pool, &ids).await;
    let twice = executed_twice(&pool).await;
    assert_eq!(twice, 0, "a graceful stop re-runs nothing");
    let by_leaving: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pgflow.step_states WHERE instance_id = 'leaving'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        by_leaving > 0,
        "the in-flight steps were completed by the leaving worker"
    );
    drop(staying);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn workers_reconnect_after_their_connections_are_terminated(pool: PgPool) {
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let workers: Vec<Worker> = ["instance_a", "instance_b"]
        .iter()
        .map(|id| Worker::spawn(&url, id))
        .collect();
    let ids = start_runs(&rt, 1_500, 2).await;
    let mut own = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    for round in 1..=3 {
        while finished(&pool).await < round * 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut own)
        .await
        .unwrap();
        assert!(n > 0);
    }
    wait_all(&pool, 1_500, Duration::from_secs(120)).await;
    assert_exactly_once(&pool, &ids).await;
    drop(workers);
    rt.shutdown().await.unwrap();
}

/// Runs of `deploy_greet` per (version, status, finishing instance).
async fn deploy_runs(pool: &PgPool) -> Vec<(i32, String, Option<String>, i64)> {
    sqlx::query_as(
        "SELECT version, status, instance_id, count(*) FROM pgflow.runs
         WHERE workflow = 'deploy_greet' GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_rolling_deploy_strands_nothing(pool: PgPool) {
    use pgflow_runtime::admin;
    let url = database_url(&pool);
    let start = |name: String| {
        let pool = pool.clone();
        async move {
            admin::start(&pool, "deploy_greet", None, serde_json::json!(name), None)
                .await
                .unwrap()
        }
    };
    // The old binary links version 1 only: starts by name get version 1.
    let mut old = Worker::spawn_bin(
        &pgflow_suite::support::example_binary("deploy_v1"),
        &url,
        "old",
        &[],
    );
    for i in 0..100 {
        assert_eq!(start(format!("a{i}")).await.version, 1);
    }
    // The new binary links versions 1 and 2; once it has registered, new starts get
    // version 2 while the runs already started stay pinned to version 1.
    let _new = Worker::spawn_bin(
        &pgflow_suite::support::example_binary("deploy_v2"),
        &url,
        "new",
        &[],
    );
    for i in 0..50 {
        assert_eq!(start(format!("b{i}")).await.version, 2);
    }
    let status = admin::status(&pool).await.unwrap();
    let served: Vec<(i32, Vec<String>)> = status
        .versions
        .iter()
        .filter(|v| v.workflow == "deploy_greet")
        .map(|v| (v.version, v.instances.clone()))
        .collect();
    assert_eq!(
        served,
        [
            (1, vec!["new".to_owned(), "old".to_owned()]),
            (2, vec!["new".to_owned()])
        ]
    );

    // Stop the old binary while version 1 runs are in flight.
    old.sigterm();
    old.expect_line("stopped", Duration::from_secs(30));
    assert!(old.wait_exit(Duration::from_secs(10)).success());

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.runs WHERE workflow = 'deploy_greet' AND status = 'running'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} runs never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let runs = deploy_runs(&pool).await;
    eprintln!("rolling deploy, runs per (version, status, instance): {runs:?}");
    let count = |version: i32, instance: &str| {
        runs.iter()
            .filter(|r| r.0 == version && r.1 == "succeeded" && r.2.as_deref() == Some(instance))
            .map(|r| r.3)
            .sum::<i64>()
    };
    // Every run succeeded, on the version it started with; the new binary finished
    // the version 1 runs the old one left; the old one never ran version 2.
    assert!(runs.iter().all(|r| r.1 == "succeeded"), "{runs:?}");
    assert_eq!(count(1, "old") + count(1, "new"), 100, "{runs:?}");
    assert!(count(1, "new") > 0, "{runs:?}");
    assert_eq!(count(2, "new"), 50, "{runs:?}");
    let wrong: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.runs WHERE workflow = 'deploy_greet'
           AND output::text NOT LIKE '%(v' || version || ')\"'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(wrong, 0, "an output was signed by another version's code");
    let old_ran_v2: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_states s JOIN pgflow.runs r ON r.id = s.run_id
         WHERE r.version = 2 AND s.instance_id = 'old'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(old_ran_v2, 0);
    let status = admin::status(&pool).await.unwrap();
    assert!(status.unserved.is_empty(), "{:?}", status.unserved);
    assert!(status.versions.iter().all(|v| !v.is_stranded()));
}

/// The ticks of schedule `nightly_chain` that started a run, oldest first, with how
/// many runs each started.
async fn schedule_ticks(pool: &PgPool) -> Vec<(chrono::DateTime<chrono::Utc>, i64)> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT idempotency_key, count(*) FROM pgflow.runs
         WHERE idempotency_key LIKE 'schedule:nightly_chain:%'
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(k, n)| {
            let at = k.trim_start_matches("schedule:nightly_chain:");
            (at.parse().expect("an RFC 3339 tick"), n)
        })
        .collect()
}

async fn db_now(pool: &PgPool) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_ticks(pool: &PgPool, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while schedule_ticks(pool).await.len() < n {
        assert!(
            Instant::now() < deadline,
            "the schedule did not fire {n} ticks"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each tick started exactly one run and no tick between the first and the last is
/// missing.
fn assert_one_run_per_tick(ticks: &[(chrono::DateTime<chrono::Utc>, i64)]) {
    for (i, (at, n)) in ticks.iter().enumerate() {
        assert_eq!(*n, 1, "tick {at} started {n} runs");
        if i > 0 {
            assert_eq!(
                (*at - ticks[i - 1].0).num_seconds(),
                1,
                "a gap or a repeat before {at}: {ticks:?}"
            );
        }
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn three_workers_one_schedule_one_run_per_tick(pool: PgPool) {
    sqlx::raw_sql(EXECUTIONS_DDL).execute(&pool).await.unwrap();
    let url = database_url(&pool);
    let scheduled = [
        "--schedule-every-secs",
        "1",
        "--schedule-missed",
        "run_each",
    ];
    let ids = ["instance_a", "instance_b", "instance_c"];
    let mut workers: Vec<Worker> = ids
        .iter()
        .map(|id| Worker::spawn_with(&url, id, &scheduled))
        .collect();
    // About 5 s of ticks, every worker racing to fire each one.
    let started = Instant::now();
    wait_ticks(&pool, 5).await;
    let before = schedule_ticks(&pool).await;
    assert_one_run_per_tick(&before);

    // Every instance dies; the ticks due meanwhile are fired (run_each) by the
    // first worker back.
    for w in &mut workers {
        w.sigkill();
    }
    let killed_at = Instant::now();
    let down_from = db_now(&pool).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = schedule_ticks(&pool).await.len();
    let down_to = db_now(&pool).await;
    let workers: Vec<Worker> = ids
        .iter()
        .map(|id| Worker::spawn_with(&url, id, &scheduled))
        .collect();
    wait_ticks(&pool, during + 6).await;
    let ticks = schedule_ticks(&pool).await;
    assert_one_run_per_tick(&ticks);
    assert_eq!(
        ticks[..before.len()],
        before[..],
        "fired ticks stay as they were"
    );
    let missed = ticks
        .iter()
        .filter(|(at, _)| *at > down_from && *at <= down_to)
        .count();
    assert!(
        missed > 0,
        "the ticks due while every worker was down were fired"
    );
    let n = ticks.len() as u64;
    wait_all(&pool, n, Duration::from_secs(60)).await;
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.runs WHERE workflow = 'proc_chain3' AND status <> 'succeeded'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(failed, 0);
    let finished_by: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT instance_id, count(*) FROM pgflow.runs WHERE workflow = 'proc_chain3'
         GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    println!(
        "{n} ticks from {} to {}, each one run; {} fired before the kill ({:.1} s), {missed} \
         due while all 3 workers were down (fired on restart, {:.1} s after the kill); runs \
         finished by {finished_by:?}",
        ticks[0].0,
        ticks[ticks.len() - 1].0,
        before.len(),
        killed_at.duration_since(started).as_secs_f64(),
        killed_at.elapsed().as_secs_f64(),
    );
    drop(workers);
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn signals_survive_a_sigkill_of_the_worker_that_would_run_the_step(pool: PgPool) {
    use pgflow_suite::flows::ProcApproval;
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let mut a = Worker::spawn(&url, "instance_a");
    let mut ids = Vec::new();
    for n in 0..50_u64 {
        let run = rt
            .start::<ProcApproval>(Job { n, sleep_ms: 0 })
            .await
            .unwrap();
        ids.push(run.id());
    }
    // Every run waits for its signal (its second step parked), holding no slot.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.tasks WHERE step = 1 AND parked AND waits_for = 'approval'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting == 50 {
            break;
        }
        assert!(Instant::now() < deadline, "{waiting} of 50 runs wait");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.sigkill();
    // Half the signals come while no worker is alive, half after one is back.
    for (k, id) in ids.iter().take(25).enumerate() {
        let outcome = rt
            .signal(*id, ProcApproval::approval, k as u64)
            .await
            .unwrap();
        assert_eq!(outcome, pgflow::SignalOutcome::Delivered);
    }
    let _b = Worker::spawn(&url, "instance_b");
    for (k, id) in ids.iter().enumerate().skip(25) {
        rt.signal(*id, ProcApproval::approval, k as u64)
            .await
            .unwrap();
    }
    for (k, id) in ids.iter().enumerate() {
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            rt.handle::<String>(*id, true).wait(),
        )
        .await
        .expect("the run finishes")
        .unwrap();
        assert_eq!(out, format!("n={k} approved={k}"));
    }
    // The signal steps ran on the surviving worker, once each.
    let applied: Vec<(String, i64)> = sqlx::query_as(
        "SELECT instance_id, count(*) FROM pgflow_test.executions WHERE step = 'apply'
         GROUP BY instance_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(applied, [("instance_b".to_owned(), 50)]);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn subflows_survive_a_sigkill_of_the_worker_running_the_children(pool: PgPool) {
    use pgflow_suite::flows::{ProcDelegate, expected_delegate_output};
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let mut a = Worker::spawn(&url, "instance_a");
    let mut ids = Vec::new();
    for n in 0..20_u64 {
        let run = rt
            .start::<ProcDelegate>(Job { n, sleep_ms: 150 })
            .await
            .unwrap();
        ids.push(run.id());
    }
    // Kill the worker while child runs are in flight (claimed) and parents wait.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (claimed, waiting): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE claimed_by IS NOT NULL AND workflow = 'proc_chain3'),
                    count(*) FILTER (WHERE child_run_id IS NOT NULL AND parked)
             FROM pgflow.tasks",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if claimed > 0 && waiting >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{claimed} claimed, {waiting} waiting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.sigkill();
    let _b = Worker::spawn(&url, "instance_b");
    for (n, id) in ids.iter().enumerate() {
        let out = tokio::time::timeout(
            Duration::from_secs(90),
            rt.handle::<String>(*id, true).wait(),
        )
        .await
        .expect("the run finishes")
        .unwrap();
        assert_eq!(out, expected_delegate_output(n as u64));
    }
    // One child per element, however often the parents' steps ran.
    let children: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT parent_run_id, count(*) FROM pgflow.runs WHERE parent_run_id IS NOT NULL
         GROUP BY parent_run_id ORDER BY parent_run_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(children.len(), 20);
    assert!(children.iter().all(|&(_, k)| k == 3), "{children:?}");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_transactional_counter_counts_each_run_once_across_a_sigkill(pool: PgPool) {
    use pgflow_suite::flows::ProcCounter;
    let url = database_url(&pool);
    let rt = producer(&pool).await;
    let mut workers: Vec<Worker> = ["instance_a", "instance_b", "instance_c"]
        .iter()
        .map(|id| Worker::spawn(&url, id))
        .collect();
    let jobs: Vec<Job> = (0..600).map(|n| Job { n, sleep_ms: 15 }).collect();
    let ids = rt.start_many::<ProcCounter>(jobs).await.unwrap();
    // Under load: kill one worker once it has committed some bumps (it holds more
    // in flight, their writes uncommitted).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow_test.bumps WHERE instance_id = 'instance_b'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if n >= 40 {
            break;
        }
        assert!(Instant::now() < deadline, "instance_b committed {n} bumps");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    workers[1].sigkill();
    let done = |pool: PgPool| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pgflow.runs WHERE workflow = 'proc_counter' AND status = 'succeeded'",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert!(
        done(pool.clone()).await < 600,
        "the kill came too late to matter"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while done(pool.clone()).await < 600 {
        assert!(Instant::now() < deadline, "not every run finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counter: i64 = sqlx::query_scalar("SELECT n FROM pgflow_test.counter WHERE id = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counter, 600, "the counter counts each run exactly once");
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT run_id) FROM pgflow_test.bumps")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((rows, distinct), (600, 600));
    // and each run's output is its own
    for (n, id) in ids.iter().enumerate() {
        let out: u64 = rt.handle::<u64>(*id, true).wait().await.unwrap();
        assert_eq!(out, n as u64);
    }
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn three_workers_keep_a_key_limit_and_a_rate_limit(pool: PgPool) {
    use pgflow_suite::flows::{CALLS_DDL, ProcLimited};
    let url = database_url(&pool);
    sqlx::raw_sql(CALLS_DDL).execute(&pool).await.unwrap();
    let rt = pgflow_suite::flows::limits(Runtime::builder())
        .pool(pool.clone())
        .instance_id("producer")
        .start()
        .await
        .unwrap();
    let workers: Vec<Worker> = ["instance_a", "instance_b", "instance_c"]
        .iter()
        .map(|id| {
            let args = [
                "--queue",
                "limited_calls=8",
                "--key-concurrency",
                "limited_calls=2",
            ];
            Worker::spawn_with(&url, id, &args)
        })
        .collect();
    // 3 tenants x 30 calls of 50 ms; at most 2 per tenant at once, 40 per 2 s window
    let inputs: Vec<(String, u64)> = (0..90).map(|i| (format!("tenant-{}", i % 3), 50)).collect();
    let ids = rt.start_many::<ProcLimited>(inputs).await.unwrap();
    for id in &ids {
        tokio::time::timeout(Duration::from_secs(120), rt.handle::<u64>(*id, true).wait())
            .await
            .expect("the run finishes")
            .unwrap();
    }
    // the most calls of one tenant running at once, across the three processes
    let most: Vec<(String, i64)> = sqlx::query_as(
        "SELECT c.tenant, max((SELECT count(*) FROM pgflow_test.calls o
                               WHERE o.tenant = c.tenant
                                 AND o.started_at <= c.started_at AND o.ended_at > c.started_at))
         FROM pgflow_test.calls c GROUP BY c.tenant ORDER BY c.tenant",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(most.len(), 3, "{most:?}");
    assert!(
        most.iter().all(|m| m.1 <= 2),
        "over the key limit: {most:?}"
    );
    let instances: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT instance_id) FROM pgflow_test.calls")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        instances >= 2,
        "the calls were spread over {instances} worker(s)"
    );
    // the rate: no 2 s window started more than 40
    let windows: Vec<(i64,)> = sqlx::query_as(
        "SELECT used FROM pgflow.limit_windows WHERE name = 'proc_rate' ORDER BY window_start",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(windows.iter().all(|w| w.0 <= 40), "{windows:?}");
    assert_eq!(windows.iter().map(|w| w.0).sum::<i64>(), 90);
    let slots: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(running), 0)::bigint FROM pgflow.key_slots")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(slots, 0);
    drop(workers);
    rt.shutdown().await.unwrap();
}
