//! What a user can do that must not wedge, leak or strand anything: each test
//! reproduces one such case against the real Postgres (a database per test).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use pgflow::{ErrorKind, ExecuteOptions, RunError, StepContext, StepError, workflow};
use pgflow_runtime::{Error, Runtime};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{Connection, PgPool};

static NEXT: AtomicU32 = AtomicU32::new(1);

fn builder(pool: &PgPool) -> pgflow_runtime::RuntimeBuilder {
    Runtime::builder()
        .pool(pool.clone())
        .instance_id(format!("edge-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
        .poll_interval(Duration::from_millis(20))
        .rescue_interval(Duration::from_millis(100))
        .heartbeat_interval(Duration::from_millis(100))
}

async fn worker(pool: &PgPool) -> Runtime {
    builder(pool)
        .queue("edge", 8)
        .data(Arc::new(Count::default()))
        .start()
        .await
        .unwrap()
}

async fn producer(pool: &PgPool) -> Runtime {
    builder(pool).start().await.unwrap()
}

async fn within<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("did not finish in time")
}

/// Waits until the runtime's counters hold `runs` finished runs: a waiter reads the
/// committed run and can return before the flusher has counted its flush.
async fn counted_finished(rt: &Runtime, runs: u64) {
    within(10, async {
        while rt.stats().runs_finished < runs {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Counts executions.
#[derive(Default)]
pub struct Count(AtomicUsize);

// ---------------------------------------------------------------------------------
// wedges and hangs

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn shutdown_right_after_start_returns(pool: PgPool) {
    for _ in 0..12 {
        let rt = worker(&pool).await;
        within(10, rt.shutdown()).await.unwrap();
    }
}

pub struct Nul;

#[workflow(name = "edge_nul", queue = "edge", backoff = "10ms", max_attempts = 3)]
impl Nul {
    /// `mode`: "retry" fails once with a NUL in a retryable error, "panic" panics
    /// once with one, "permanent" fails for good with one.
    #[step]
    async fn speak(mode: String, ctx: &StepContext) -> Result<String, StepError> {
        match (mode.as_str(), ctx.attempt()) {
            ("retry", 1) => Err(StepError::retryable("bad\0byte")),
            ("panic", 1) => panic!("bad\0panic"),
            ("permanent", _) => Err(StepError::permanent("no\0way")),
            _ => Ok(format!("{mode} ok at attempt {}", ctx.attempt())),
        }
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_nul_byte_in_an_error_keeps_the_failures_own_classification(pool: PgPool) {
    let rt = worker(&pool).await;
    let retried = rt.start::<Nul>("retry".into()).await.unwrap();
    assert_eq!(
        within(20, retried.wait()).await.unwrap(),
        "retry ok at attempt 2"
    );
    let panicked = rt.start::<Nul>("panic".into()).await.unwrap();
    assert_eq!(
        within(20, panicked.wait()).await.unwrap(),
        "panic ok at attempt 2"
    );
    let failed = rt.start::<Nul>("permanent".into()).await.unwrap();
    let Err(Error::Run(RunError::StepFailed { history, .. })) = within(20, failed.wait()).await
    else {
        panic!("the run should fail");
    };
    // one attempt, permanent, stored with the NUL replaced and said so
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].kind, ErrorKind::Permanent);
    assert_eq!(
        history[0].message,
        "no\u{FFFD}way (NUL bytes replaced with U+FFFD: they cannot be stored)"
    );
    rt.shutdown().await.unwrap();
}

/// Its `Serialize` panics the first time (a bug in a user's type).
#[derive(Debug, Deserialize, PartialEq)]
pub struct Fragile(pub u32);

static FRAGILE_CALLS: AtomicU32 = AtomicU32::new(0);

impl Serialize for Fragile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if FRAGILE_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("Fragile cannot serialize today");
        }
        s.serialize_u32(self.0)
    }
}

pub struct SerializePanics;

#[workflow(name = "edge_serialize_panics", queue = "edge", backoff = "10ms")]
impl SerializePanics {
    #[step]
    async fn make(n: u32) -> Result<Fragile, StepError> {
        Ok(Fragile(n))
    }

    #[step]
    async fn read(make: Fragile) -> Result<u32, StepError> {
        Ok(make.0 + 1)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_panic_in_an_outputs_serialize_is_a_failed_attempt(pool: PgPool) {
    let rt = worker(&pool).await;
    let run = rt.start::<SerializePanics>(41).await.unwrap();
    // retried at once (not after the lease), like a panic in the step
    assert_eq!(within(20, run.wait()).await.unwrap(), 42);
    assert!(FRAGILE_CALLS.load(Ordering::SeqCst) >= 2);
    // nothing is left counted as executing
    tokio::time::sleep(Duration::from_millis(300)).await;
    let me = rt.instances().await.unwrap();
    let me = me.iter().find(|i| i.id == rt.instance_id()).unwrap();
    assert_eq!(me.load, 0);
    rt.shutdown().await.unwrap();
}

pub struct TwoSteps;

#[workflow(name = "edge_two_steps", queue = "edge")]
impl TwoSteps {
    #[step]
    async fn first(n: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Count>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok(n)
    }

    #[step]
    async fn second(first: u32, ctx: &StepContext) -> Result<u32, StepError> {
        ctx.data::<Arc<Count>>()?.0.fetch_add(1, Ordering::SeqCst);
        Ok(first)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_stalled_flush_stops_the_claims(pool: PgPool) {
    let count = Arc::new(Count::default());
    let rt = builder(&pool)
        .queue("edge", 8)
        .data(Arc::clone(&count))
        .start()
        .await
        .unwrap();
    let ids = rt.start_many::<TwoSteps>(0..3_000).await.unwrap();
    while count.0.load(Ordering::SeqCst) < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The flush writes step states; claims only read them. Stall every flush.
    let mut locker = sqlx::PgConnection::connect_with(&pool.connect_options())
        .await
        .unwrap();
    let mut tx = locker.begin().await.unwrap();
    sqlx::query("LOCK TABLE pgflow.step_states IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    // let what was claimed before the lock run into it
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = count.0.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let during = count.0.load(Ordering::SeqCst) - before;
    tx.rollback().await.unwrap();
    // Completions not durable yet are bounded by twice the concurrency, and an
    // execution keeps its slot until its completion has a place: at most three times
    // the concurrency of steps run while nothing could be flushed (unbounded before).
    assert!(
        during <= 24,
        "{during} steps ran while no flush could commit"
    );
    for id in ids.iter().step_by(300) {
        within(30, rt.handle::<u32>(*id, true).wait())
            .await
            .unwrap();
    }
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn dropping_the_last_handle_stops_the_runtime(pool: PgPool) {
    let rt = worker(&pool).await;
    let id = rt.instance_id().to_owned();
    drop(rt);
    // It shuts down in the background: offline, claiming nothing.
    within(10, async {
        loop {
            let status: String =
                sqlx::query_scalar("SELECT status FROM pgflow.instances WHERE id = $1")
                    .bind(&id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if status == "offline" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let p = producer(&pool).await;
    let run = p.start::<TwoSteps>(1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claimed: Option<String> =
        sqlx::query_scalar("SELECT claimed_by FROM pgflow.tasks WHERE run_id = $1")
            .bind(run.id().0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(claimed, None, "a dropped runtime claimed work");
    p.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_restart_with_the_same_host_and_pid_takes_over_at_once(pool: PgPool) {
    // A container whose process is PID 1 every time: the row of the previous
    // incarnation has this host, this pid and a fresh heartbeat.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();
    sqlx::query(
        "INSERT INTO pgflow.instances (id, host, pid, status, last_heartbeat)
         VALUES ('pid-one', $1, $2, 'online', now())",
    )
    .bind(&host)
    .bind(std::process::id() as i32)
    .execute(&pool)
    .await
    .unwrap();
    let rt = Runtime::builder()
        .pool(pool.clone())
        .instance_id("pid-one")
        .start()
        .await
        .unwrap();
    // while it lives, the id is its own
    let err = Runtime::builder()
        .pool(pool.clone())
        .instance_id("pid-one")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InstanceIdInUse { .. }), "{err}");
    rt.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// silent wrong results

pub struct NotANumber;

#[workflow(name = "edge_nan", queue = "edge")]
impl NotANumber {
    #[step]
    async fn ratio(pair: (f64, f64)) -> Result<Vec<f64>, StepError> {
        Ok(vec![1.0, pair.0 / pair.1])
    }

    #[step]
    async fn total(ratio: Vec<f64>) -> Result<f64, StepError> {
        Ok(ratio.iter().sum())
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_non_finite_float_fails_its_step_in_both_executors(pool: PgPool) {
    let expect = |e: RunError| {
        let RunError::StepFailed { step, history, .. } = e else {
            panic!("a step failure, not {e:?}");
        };
        assert_eq!(step, "ratio");
        assert_eq!(history.len(), 1, "permanent: not retried");
        assert_eq!(history[0].kind, ErrorKind::Permanent);
        assert!(
            history[0].message.contains("NaN at [1] cannot be stored"),
            "{}",
            history[0].message
        );
    };
    // in process, typed and with JSON round trips: the same failure
    expect(pgflow::execute::<NotANumber>((0.0, 0.0)).await.unwrap_err());
    let opts = ExecuteOptions::new().json_roundtrip(true);
    expect(
        pgflow::execute_with::<NotANumber>((0.0, 0.0), opts)
            .await
            .unwrap_err(),
    );
    let rt = worker(&pool).await;
    let run = rt.start::<NotANumber>((0.0, 0.0)).await.unwrap();
    match within(20, run.wait()).await {
        Err(Error::Run(e)) => expect(e),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        within(20, rt.start::<NotANumber>((1.0, 4.0)).await.unwrap().wait())
            .await
            .unwrap(),
        1.25
    );
    // an input that cannot be stored is refused before anything is inserted
    let err = rt
        .start::<NotANumber>((f64::INFINITY, 1.0))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    rt.shutdown().await.unwrap();
}

pub struct Slow;

#[workflow(name = "edge_slow", queue = "edge")]
impl Slow {
    #[step]
    async fn nap(ms: u64) -> Result<u64, StepError> {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(ms)
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn wait_outlives_a_database_outage(pool: PgPool) {
    let rt = worker(&pool).await;
    let run = rt.start::<Slow>(1_500).await.unwrap();
    let waiting = tokio::spawn({
        let run = run.clone();
        async move { run.wait().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The database goes away for 2 s: no new connection, every one terminated.
    let (db, mut admin) = admin_of(&pool).await;
    let ident = format!("\"{}\"", db.replace('"', "\"\""));
    sqlx::query(&format!("ALTER DATABASE {ident} ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .unwrap();
    end_connections(&mut admin, &db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query(&format!("ALTER DATABASE {ident} ALLOW_CONNECTIONS true"))
        .execute(&mut admin)
        .await
        .unwrap();
    assert_eq!(within(40, waiting).await.unwrap().unwrap(), 1_500);
    rt.shutdown().await.unwrap();
}

/// The runtime's own pool pings only connections idle for a second or more (not
/// one round trip per start and per flush): those the server ended while they sat
/// idle are replaced before a start uses them, and a transaction that meets one
/// anyway (`begin_generic`, as `start_many` and flushes use) begins again on
/// another.
#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_start_on_connections_the_server_ended_while_idle_succeeds(pool: PgPool) {
    let url = pgflow_suite::support::url_of(&pool.connect_options());
    // a runtime that only starts runs: no loop but the flusher and the heartbeat
    // takes the pool's connections meanwhile
    let rt = Runtime::builder()
        .database_url(&url)
        .instance_id(format!("edge-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
        .max_connections(4)
        // nothing else uses the pool meanwhile (a heartbeat would meet the ended
        // connections first)
        .heartbeat_interval(Duration::from_secs(60))
        .start()
        .await
        .unwrap();
    // several connections in use at once, then idle in the pool
    let mut starts = tokio::task::JoinSet::new();
    for n in 0..8 {
        let rt = rt.clone();
        starts.spawn(async move { rt.start::<Slow>(n).await.map(|r| r.id()) });
    }
    while let Some(done) = starts.join_next().await {
        done.unwrap().unwrap();
    }
    let (db, mut admin) = admin_of(&pool).await;
    let ended = end_connections(&mut admin, &db).await;
    assert!(ended >= 2, "only {ended} connections to end");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // a batch right away: its transaction meets the ended connections
    rt.start_many::<Slow>(100..102)
        .await
        .expect("a batch after the terminations");
    // once idle for a second, each start's connection is pinged first
    end_connections(&mut admin, &db).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    for n in 102..104 {
        rt.start::<Slow>(n)
            .await
            .expect("a start after the terminations");
    }
    let started: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(started, 12);
    rt.shutdown().await.unwrap();
}

/// The name of the test's database, and a connection to the server's `postgres`
/// database (which outlives what the test does to its own).
async fn admin_of(pool: &PgPool) -> (String, sqlx::PgConnection) {
    let db = pool
        .connect_options()
        .get_database()
        .unwrap_or_default()
        .to_owned();
    let admin_url =
        pgflow_suite::support::url_of(&(*pool.connect_options()).clone().database("postgres"));
    (db, sqlx::PgConnection::connect(&admin_url).await.unwrap())
}

/// Ends every connection to database `db`; returns how many there were.
async fn end_connections(admin: &mut sqlx::PgConnection, db: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                              WHERE datname = $1) t",
    )
    .bind(db)
    .fetch_one(admin)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn wait_on_runs_finished_elsewhere_leaves_nothing_behind(pool: PgPool) {
    let w = worker(&pool).await;
    let p = producer(&pool).await;
    for n in 0..100_u32 {
        let run = p.start::<TwoSteps>(n).await.unwrap();
        assert_eq!(within(20, run.wait()).await.unwrap(), n);
    }
    assert_eq!(p.pending_waiters(), 0);
    assert_eq!(w.pending_waiters(), 0);
    p.shutdown().await.unwrap();
    w.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// sharing a database with the application

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn runs_that_no_instance_serves_are_reported(pool: PgPool) {
    let p = producer(&pool).await;
    for n in 0..3 {
        p.start::<TwoSteps>(n).await.unwrap();
    }
    let status = pgflow_runtime::admin::status(&pool).await.unwrap();
    assert_eq!(status.unserved.len(), 1, "{:?}", status.unserved);
    let u = &status.unserved[0];
    assert_eq!(
        (u.workflow.as_str(), u.version, u.runs, u.queue.as_str()),
        ("edge_two_steps", 1, 3, "edge")
    );
    // an instance that serves the queue picks them up: nothing is reported
    let w = worker(&pool).await;
    let status = pgflow_runtime::admin::status(&pool).await.unwrap();
    assert!(status.unserved.is_empty(), "{:?}", status.unserved);
    w.shutdown().await.unwrap();
    p.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------
// errors users read

#[tokio::test]
async fn a_connection_string_never_shows_its_password() {
    for url in [
        "postgres://app:s3cret@127.0.0.1:1/x",
        "postgres://app@127.0.0.1:1/x?password=s3cret",
        "host=127.0.0.1 port=1 user=app password=s3cret dbname=x",
        "host=127.0.0.1 password='s3 cret' dbname=x",
    ] {
        let builder = Runtime::builder().database_url(url).migrate(false);
        let debug = format!("{builder:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("s3 cret"),
            "{debug}"
        );
        let err = builder.start().await.unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(
                !shown.contains("s3cret") && !shown.contains("s3 cret"),
                "{url}: {shown}"
            );
        }
        let err = pgflow_runtime::admin::connect(url).await.unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }
}

#[tokio::test]
async fn a_refused_port_and_a_silent_server_say_so() {
    let err = Runtime::builder()
        .database_url("postgres://app@127.0.0.1:1/x")
        .start()
        .await
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    // A server that accepts the connection and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let err = within(
        30,
        Runtime::builder()
            .database_url(format!("postgres://app@127.0.0.1:{port}/x"))
            .start(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("did not answer within 10 s"),
        "{err}"
    );
    drop(silent);
}

/// A login role of its own, dropped at the end.
struct Role {
    name: String,
    pool: PgPool,
}

impl Role {
    async fn create(pool: &PgPool, limit: i32) -> Role {
        let name = format!(
            "pgflow_edge_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        for sql in [
            format!("CREATE ROLE {name} LOGIN CONNECTION LIMIT {limit}"),
            format!("GRANT USAGE ON SCHEMA pgflow TO {name}"),
            format!("GRANT ALL ON ALL TABLES IN SCHEMA pgflow TO {name}"),
            format!("GRANT ALL ON ALL SEQUENCES IN SCHEMA pgflow TO {name}"),
        ] {
            sqlx::query(&sql).execute(pool).await.unwrap();
        }
        Role {
            name,
            pool: pool.clone(),
        }
    }

    fn url(&self) -> String {
        let o = self.pool.connect_options();
        format!(
            "postgres://{}@{}:{}/{}",
            self.name,
            o.get_host(),
            o.get_port(),
            o.get_database().unwrap_or_default()
        )
    }

    async fn drop_role(self) {
        let _ = sqlx::query(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{}'",
            self.name
        ))
        .execute(&self.pool)
        .await;
        for sql in [
            format!(
                "REVOKE ALL ON ALL TABLES IN SCHEMA pgflow FROM {}",
                self.name
            ),
            format!(
                "REVOKE ALL ON ALL SEQUENCES IN SCHEMA pgflow FROM {}",
                self.name
            ),
            format!("REVOKE USAGE ON SCHEMA pgflow FROM {}", self.name),
            format!("DROP ROLE {}", self.name),
        ] {
            let _ = sqlx::query(&sql).execute(&self.pool).await;
        }
    }
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn a_role_connection_limit_is_named_or_fitted(pool: PgPool) {
    // no connection at all: the error names the limit, at once
    let none = Role::create(&pool, 0).await;
    let err = Runtime::builder()
        .database_url(none.url())
        .migrate(false)
        .start()
        .await
        .unwrap_err();
    assert!(!err.is_unreachable(), "{err}");
    assert!(err.to_string().contains("connection limit"), "{err}");
    none.drop_role().await;

    // three connections: the pool (LISTEN holds one of it) fits beside the claimer
    let three = Role::create(&pool, 3).await;
    let rt = Runtime::builder()
        .database_url(three.url())
        .migrate(false)
        .instance_id("limited")
        .queue("edge", 4)
        .data(Arc::new(Count::default()))
        .poll_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap();
    assert_eq!(rt.pool().options().get_max_connections(), 2);
    let ids = rt.start_many::<TwoSteps>(0..200).await.unwrap();
    for id in ids {
        within(30, rt.handle::<u32>(id, true).wait()).await.unwrap();
    }
    rt.shutdown().await.unwrap();
    drop(rt);
    three.drop_role().await;
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn an_output_over_the_limit_fails_its_step_and_batches_are_bounded_in_bytes(pool: PgPool) {
    let rt = builder(&pool)
        .queue("edge", 8)
        .max_output_bytes(1 << 20)
        .flush_batch_bytes(1 << 20)
        .start()
        .await
        .unwrap();
    let big = rt.start::<Echo>(2 << 20).await.unwrap();
    let Err(Error::Run(RunError::StepFailed { history, .. })) = within(20, big.wait()).await else {
        panic!("an output over the limit fails its step");
    };
    assert!(
        history[0].message.contains("over the 1048576 bytes"),
        "{}",
        history[0].message
    );
    assert_eq!(history[0].kind, ErrorKind::Permanent);
    // 24 outputs of 600 KiB: no flush carries more than about 1 MiB
    counted_finished(&rt, 1).await;
    let before = rt.stats().flushes;
    let ids = rt.start_many::<Echo>(vec![600 << 10; 24]).await.unwrap();
    for id in &ids {
        let out: String = within(30, rt.handle(*id, true).wait()).await.unwrap();
        assert_eq!(out.len(), 600 << 10);
    }
    counted_finished(&rt, 25).await;
    assert!(rt.stats().flushes - before >= 12, "{:?}", rt.stats());
    rt.shutdown().await.unwrap();
}

pub struct Echo;

#[workflow(name = "edge_echo", queue = "edge")]
impl Echo {
    #[step]
    async fn fill(n: usize) -> Result<String, StepError> {
        Ok("x".repeat(n))
    }
}

/// Lets `n` steps finish together.
pub struct Together(tokio::sync::Barrier);

pub struct Huge;

#[workflow(name = "edge_huge", queue = "edge", max_attempts = 1)]
impl Huge {
    #[step]
    async fn fill(mib: usize, ctx: &StepContext) -> Result<String, StepError> {
        let out = "x".repeat(mib << 20);
        ctx.data::<Arc<Together>>()?.0.wait().await;
        Ok(out)
    }
}

/// Eleven outputs of 100 MiB finishing together add up to more than PostgreSQL's
/// 1 GiB message limit: flushes bounded in bytes store them all. Heavy (about 1.1 GB
/// through the database): run with `cargo test --test edge_cases -- --ignored`.
#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
#[ignore = "moves 1.1 GB through PostgreSQL; run on demand"]
async fn outputs_adding_up_to_over_a_gib_finishing_together_are_all_stored(pool: PgPool) {
    const N: usize = 11;
    let rt = builder(&pool)
        .queue("edge", N)
        .data(Arc::new(Together(tokio::sync::Barrier::new(N))))
        .start()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let ids = rt.start_many::<Huge>(vec![100; N]).await.unwrap();
    for id in ids {
        let out: String = within(300, rt.handle(id, true).wait()).await.unwrap();
        assert_eq!(out.len(), 100 << 20);
    }
    eprintln!(
        "{N} x 100 MiB stored in {:.1} s, {:?}",
        started.elapsed().as_secs_f64(),
        rt.stats()
    );
    rt.shutdown().await.unwrap();
}

#[sqlx::test(migrator = "pgflow_runtime::MIGRATOR")]
async fn tasks_of_a_step_the_version_does_not_have_do_not_block_the_queue(pool: PgPool) {
    // Tasks written by hand (or by a bug) for step 7 of a one-step workflow version,
    // due long before anything else: the claim must not take them (it could not run
    // them) nor let them fill its batches (the queue would stall behind them).
    let rt = worker(&pool).await;
    let first = within(20, rt.start::<Echo>(1)).await.unwrap();
    assert_eq!(within(20, first.wait()).await.unwrap(), "x");
    sqlx::query(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, max_attempts, run_at)
         SELECT $1, 7, r.workflow, r.version, 'edge', 3, now() - interval '1 hour'
         FROM pgflow.runs r, generate_series(1, 20) WHERE r.id = $1",
    )
    .bind(first.id().0)
    .execute(&pool)
    .await
    .unwrap();
    for n in 2..7 {
        let run = within(20, rt.start::<Echo>(n)).await.unwrap();
        assert_eq!(within(20, run.wait()).await.unwrap(), "x".repeat(n));
    }
    let untouched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.tasks WHERE step = 7 AND claimed_by IS NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(untouched, 20);
    rt.shutdown().await.unwrap();
}
