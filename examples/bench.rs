//! The benchmark program: throughput, enqueue rate, latency, in-process overhead
//! and map fan-out against a local PostgreSQL. Prints one line per scenario:
//! `BENCH scenario=NAME key=value ...`.
//!
//! ```text
//! cargo run --release --example bench -- [--scenario NAME] [--n N] [--elements E]
//!     [--duration S] [--concurrency C] [--database NAME]
//! ```
//!
//! Scenarios (all by default, except `sustained`, `parked`, `drain`, `raw` and `signals`):
//! - `chain1`, `chain3`, `diamond` (1 -> 4 -> 1): `--n` runs (default 20,000) started
//!   with `start_many` in batches of 1,000 while one runtime works; throughput from
//!   the first start to the last durable completion.
//! - `enqueue`: `start_many` alone (no workers), runs/s.
//! - `latency`: sequential runs on an idle runtime: start -> first step running, and
//!   start -> chain3 complete (`wait()` returns), p50/p99 over 200 runs (`--n`), and
//!   how long `start` itself took; `latency_notify` the same with the runs started by
//!   a second runtime that serves no queue (the worker learns of them by NOTIFY).
//! - `sustained`: chain1 for `--duration` seconds (default 60), with `--prune-after S`
//!   pruning finished runs older than S seconds meanwhile: throughput of the first
//!   and the last 10 s (a collapse would show table bloat).
//! - `inline`: the in-process executor, ns per step of a 10-step chain.
//! - `drain` (only when named): `--n` one-step runs inserted first, then drained by one
//!   runtime (the peers' "jobs" figure), with the process's peak RSS; then `raw`.
//! - `raw` (only when named): the same number of rows of a minimal table drained by 4
//!   connections looping "claim 500 (UPDATE .. SKIP LOCKED), delete them": the
//!   server's limit for a queue, no engine; `drain` reports its fraction of it.
//! - `parked` (only when named): chain1 alone, then chain1 in a database where
//!   100,000 runs wait on a one-hour `delay` (parked tasks), and the ratio; then the
//!   same with those tasks unparked (in the claim's index) for comparison.
//! - `signals` (only when named): 10,000 runs (`--n`) wait on a signal (parked
//!   tasks), then each is signalled through `Runtime::signal` by 8 concurrent
//!   senders: signals delivered/s, and signal sent -> step resumed p50/p99; then
//!   10,000 more signalled from SQL, `pgflow.signal` over 1,000 runs per statement.
//! - `scaling` (only when named): `--n` one-step runs (default 40,000) inserted
//!   first, then drained by 1, 2 and 4 worker processes (this program re-executed
//!   with `--serve URL`, each with `--concurrency` slots): runs/s for each, the
//!   speed-up over one, and the CPU seconds the workers and the PostgreSQL server
//!   used (`cpu_busy`: their sum over wall time x cores; near 1.0 the machine is
//!   saturated, and the split says by whom).
//! - `map`: one run whose root map step maps over `--elements` (default 10,000)
//!   trivial elements: elements/s from the start to the run's completion.
//!
//! Each database scenario runs in a fresh database (`--database`, default
//! `pgflow_bench`) on the server of `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), durable commits on (the server's
//! default `synchronous_commit`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgflow::{StepContext, StepError, workflow};
use pgflow_runtime::Runtime;
use pgflow_suite::support::fresh_database;

/// One trivial step.
pub struct Chain1;

#[workflow(name = "bench_chain1", queue = "bench")]
impl Chain1 {
    #[step]
    async fn only(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

/// One trivial step of a tenant's run (the fairness scenario): the input is (tenant,
/// n); the run's key is the tenant. Records when tenant `b`'s runs start.
pub struct Tenant1;

#[workflow(name = "bench_tenant1", queue = "bench", key = Self::tenant)]
impl Tenant1 {
    #[step]
    async fn only(input: (String, u64), ctx: &StepContext) -> Result<u64, StepError> {
        if let Ok(seen) = ctx.data::<Arc<Started>>() {
            if input.0 == "b" {
                if let Ok(mut m) = seen.0.lock() {
                    m.entry(input.1).or_insert_with(Instant::now);
                }
            } else {
                // when A's last step ran, in µs after `seen.1`
                let at = u64::try_from(seen.1.elapsed().as_micros()).unwrap_or(u64::MAX);
                seen.2.fetch_max(at, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(input.1 + 1)
    }

    fn tenant(input: &(String, u64)) -> &str {
        &input.0
    }
}

/// When each of tenant B's runs started its first step, by input number; and when
/// tenant A's last step ran (µs after the instant).
pub struct Started(
    Mutex<std::collections::HashMap<u64, Instant>>,
    Instant,
    std::sync::atomic::AtomicU64,
);

/// Records when its first step starts (for the latency scenario).
#[derive(Default)]
pub struct FirstStep(Mutex<Option<Instant>>);

/// Three trivial steps.
pub struct Chain3;

#[workflow(name = "bench_chain3", queue = "bench")]
impl Chain3 {
    #[step]
    async fn a(n: u64, ctx: &StepContext) -> Result<u64, StepError> {
        if let Ok(first) = ctx.data::<Arc<FirstStep>>() {
            if let Ok(mut t) = first.0.lock() {
                t.get_or_insert_with(Instant::now);
            }
        }
        Ok(n + 1)
    }
    #[step]
    async fn b(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn c(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

/// 1 -> 4 -> 1.
pub struct Diamond;

#[workflow(name = "bench_diamond", queue = "bench")]
impl Diamond {
    #[step]
    async fn top(n: u64) -> Result<u64, StepError> {
        Ok(n)
    }
    #[step(depends_on = [top])]
    async fn b1(top: u64) -> Result<u64, StepError> {
        Ok(top + 1)
    }
    #[step(depends_on = [top])]
    async fn b2(top: u64) -> Result<u64, StepError> {
        Ok(top + 2)
    }
    #[step(depends_on = [top])]
    async fn b3(top: u64) -> Result<u64, StepError> {
        Ok(top + 3)
    }
    #[step(depends_on = [top])]
    async fn b4(top: u64) -> Result<u64, StepError> {
        Ok(top + 4)
    }
    #[step(depends_on = [b1, b2, b3, b4])]
    async fn bottom(b1: u64, b2: u64, b3: u64, b4: u64) -> Result<u64, StepError> {
        Ok(b1 + b2 + b3 + b4)
    }
}

/// One map step over the input: one task per element.
pub struct Map;

#[workflow(name = "bench_map", queue = "bench")]
impl Map {
    #[step(map)]
    async fn each(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

/// Ten trivial steps in a chain.
pub struct Chain10;

#[workflow(name = "bench_chain10", max_attempts = 1)]
impl Chain10 {
    #[step]
    async fn s1(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s2(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s3(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s4(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s5(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s6(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s7(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s8(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s9(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s10(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

/// The same chain with the default 3 attempts: each step keeps a copy of its input
/// for a retry.
pub struct Chain10Retrying;

#[workflow(name = "bench_chain10_retrying")]
impl Chain10Retrying {
    #[step]
    async fn s1(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s2(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s3(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s4(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s5(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s6(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s7(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s8(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s9(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
    #[step]
    async fn s10(n: u64) -> Result<u64, StepError> {
        Ok(n + 1)
    }
}

struct Args {
    scenario: Option<String>,
    n: u64,
    /// Whether `--n` was given (latency runs 200 by default, not the throughput 20,000).
    n_given: bool,
    elements: u64,
    duration: u64,
    concurrency: usize,
    database: String,
    /// `sustained` with retention on: finished runs older than this many seconds
    /// are pruned while it runs.
    prune_after: Option<u64>,
    /// `--serve URL`: be a worker process of the `scaling` scenario.
    serve: Option<String>,
    /// `--instance ID`: the worker's instance id (with `--serve`).
    instance: String,
}

const USAGE: &str = "usage: bench [--scenario chain1|chain3|diamond|enqueue|latency|sustained|inline|map|parked|drain|raw|signals|fairness|scaling] [--n N] [--elements E] [--duration SECS] [--prune-after SECS] [--concurrency C] [--database NAME]";

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        scenario: None,
        n: 20_000,
        n_given: false,
        elements: 10_000,
        duration: 60,
        concurrency: 256,
        database: "pgflow_bench".to_owned(),
        prune_after: None,
        serve: None,
        instance: "bench-worker".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    let num = |v: Option<String>, flag: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{flag} needs a number"))?;
        v.parse().map_err(|_| format!("{flag}: not a number: {v}"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scenario" => args.scenario = Some(it.next().ok_or("--scenario needs a name")?),
            "--n" => {
                args.n = num(it.next(), "--n")?.max(1);
                args.n_given = true;
            }
            "--elements" => args.elements = num(it.next(), "--elements")?,
            "--database" => {
                let name = it.next().ok_or("--database needs a name")?;
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("--database: use letters, digits and `_`: {name}"));
                }
                args.database = name;
            }
            "--duration" => args.duration = num(it.next(), "--duration")?.max(1),
            "--prune-after" => args.prune_after = Some(num(it.next(), "--prune-after")?),
            "--serve" => args.serve = Some(it.next().ok_or("--serve needs a database URL")?),
            "--instance" => args.instance = it.next().ok_or("--instance needs an id")?,
            "--concurrency" => {
                args.concurrency = usize::try_from(num(it.next(), "--concurrency")?.max(1))
                    .map_err(|e| e.to_string())?
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}; {USAGE}")),
        }
    }
    Ok(args)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn inline<W: pgflow::Workflow<Input = u64, Output = u64>>(label: &str, runs: u64) {
    const SAMPLES: usize = 15;
    const STEPS: u64 = 10;
    for i in 0..1_000 {
        let out = pgflow::execute::<W>(i).await.expect("bench workflow");
        assert_eq!(out, i + STEPS);
    }
    let mut per_step = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        for i in 0..runs {
            let out = pgflow::execute::<W>(i).await.expect("bench workflow");
            assert_eq!(out, i + STEPS);
        }
        per_step.push(start.elapsed().as_nanos() as f64 / (runs * STEPS) as f64);
    }
    per_step.sort_by(f64::total_cmp);
    println!(
        "BENCH scenario={label} runs={runs} steps={} samples={SAMPLES} ns_per_step_p50={:.0} ns_per_step_min={:.0}",
        runs * STEPS,
        per_step[SAMPLES / 2],
        per_step[0],
    );
}

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The database the scenarios run in (`--database`).
static DATABASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn db_name() -> &'static str {
    DATABASE.get().map_or("pgflow_bench", String::as_str)
}

async fn runtime(url: &str, concurrency: usize) -> BenchResult<Runtime> {
    let mut b = Runtime::builder()
        .database_url(url)
        .instance_id("bench")
        .max_connections(8)
        .data(Arc::new(FirstStep::default()));
    if concurrency > 0 {
        b = b.queue("bench", concurrency);
    }
    Ok(b.start().await?)
}

/// Starts runs `0..n` of `W` with `start_many`, `batch` per statement; returns
/// their ids in order.
async fn start_in_batches<W: pgflow::Workflow<Input = u64>>(
    rt: &Runtime,
    n: u64,
    batch: u64,
) -> BenchResult<Vec<pgflow::RunId>> {
    let mut ids = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut next = 0;
    while next < n {
        let end = (next + batch).min(n);
        ids.extend(rt.start_many::<W>(next..end).await?);
        next = end;
    }
    Ok(ids)
}

/// Waits until `n` tasks are parked waiting for signal `go`.
async fn wait_parked_on_go(pool: &sqlx::PgPool, n: u64) -> BenchResult<()> {
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pgflow.tasks WHERE parked AND waits_for = 'go'",
        )
        .fetch_one(pool)
        .await?;
        if u64::try_from(waiting).unwrap_or(0) >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_finished(rt: &Runtime, target: u64) {
    while rt.stats().runs_finished < target {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `n` runs of `W` started in batches of 1,000 while the runtime works.
async fn throughput<W: pgflow::Workflow<Input = u64>>(
    label: &str,
    n: u64,
    steps_per_run: u64,
    concurrency: usize,
) -> BenchResult<f64> {
    let url = fresh_database(db_name()).await?;
    throughput_in::<W>(&url, label, n, steps_per_run, concurrency).await
}

/// [`throughput`] in the database at `url`; returns runs/s.
async fn throughput_in<W: pgflow::Workflow<Input = u64>>(
    url: &str,
    label: &str,
    n: u64,
    steps_per_run: u64,
    concurrency: usize,
) -> BenchResult<f64> {
    let rt = runtime(url, concurrency).await?;
    let start = Instant::now();
    start_in_batches::<W>(&rt, n, 1_000).await?;
    wait_finished(&rt, n).await;
    let secs = start.elapsed().as_secs_f64();
    let stats = rt.stats();
    println!(
        "BENCH scenario={label} runs={n} steps={} secs={secs:.2} runs_per_sec={:.0} steps_per_sec={:.0} flushes={} claims={}",
        n * steps_per_run,
        n as f64 / secs,
        (n * steps_per_run) as f64 / secs,
        stats.flushes,
        stats.claims,
    );
    rt.shutdown().await?;
    Ok(n as f64 / secs)
}

/// Waits an hour: its runs stay parked for the whole benchmark.
pub struct Later;

#[workflow(name = "bench_later", queue = "bench")]
impl Later {
    #[step(delay = "1h")]
    async fn later(n: u64) -> Result<u64, StepError> {
        Ok(n)
    }
}

/// chain1 in a fresh database, then in a fresh database holding `parked` runs
/// waiting on a one-hour delay: the parked tasks must not slow claims of ready work.
/// For comparison, the same again with those tasks unparked (in the claim's index,
/// as every not-yet-due task was before parking existed).
async fn parked(n: u64, parked: u64, concurrency: usize) -> BenchResult<()> {
    let alone = throughput::<Chain1>("parked_baseline_chain1", n, 1, concurrency).await?;
    let mut figures = Vec::new();
    for unpark in [false, true] {
        let url = fresh_database(db_name()).await?;
        let producer = runtime(&url, 0).await?;
        start_in_batches::<Later>(&producer, parked, 5_000).await?;
        producer.shutdown().await?;
        let pool = sqlx::PgPool::connect(&url).await?;
        if unpark {
            sqlx::query("UPDATE pgflow.tasks SET parked = false")
                .execute(&pool)
                .await?;
            sqlx::query("VACUUM pgflow.tasks").execute(&pool).await?;
        }
        sqlx::query("ANALYZE pgflow.tasks").execute(&pool).await?;
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.tasks")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        let label = if unpark {
            "parked_unparked_chain1"
        } else {
            "parked_chain1"
        };
        let with = throughput_in::<Chain1>(&url, label, n, 1, concurrency).await?;
        figures.push((waiting, with));
    }
    println!(
        "BENCH scenario=parked waiting={} chain1_alone_runs_per_sec={alone:.0} chain1_with_parked_runs_per_sec={:.0} with_over_alone={:.2} chain1_with_unparked_runs_per_sec={:.0} unparked_over_alone={:.2}",
        figures[0].0,
        figures[0].1,
        figures[0].1 / alone,
        figures[1].1,
        figures[1].1 / alone,
    );
    Ok(())
}

/// When each run's signal was sent (by run id), and how long after it each step
/// resumed.
#[derive(Default)]
pub struct Resumes {
    sent: Mutex<std::collections::HashMap<i64, Instant>>,
    waited_ms: Mutex<Vec<f64>>,
}

/// Waits for the signal `go`.
pub struct Awaiting;

#[workflow(name = "bench_awaiting", queue = "bench")]
impl Awaiting {
    #[step(signal = go)]
    async fn resume(n: u64, go: u64, ctx: &StepContext) -> Result<u64, StepError> {
        if let Ok(r) = ctx.data::<Arc<Resumes>>() {
            let sent = r
                .sent
                .lock()
                .ok()
                .and_then(|m| m.get(&ctx.run_id().0).copied());
            if let (Some(sent), Ok(mut w)) = (sent, r.waited_ms.lock()) {
                w.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(n + go)
    }
}

/// `n` runs parked on a signal, then signalled by 8 concurrent senders.
async fn signals(n: u64, concurrency: usize) -> BenchResult<()> {
    let url = fresh_database(db_name()).await?;
    let resumes = Arc::new(Resumes::default());
    let rt = Runtime::builder()
        .database_url(&url)
        .instance_id("bench")
        .max_connections(16)
        .data(Arc::clone(&resumes))
        .queue("bench", concurrency)
        .start()
        .await?;
    let ids = start_in_batches::<Awaiting>(&rt, n, 1_000).await?;
    let pool = rt.pool().clone();
    wait_parked_on_go(&pool, n).await?;
    let rt = Arc::new(rt);
    let start = Instant::now();
    let senders: Vec<_> = ids
        .chunks(ids.len().div_ceil(8).max(1))
        .map(|chunk| {
            let (rt, resumes, chunk) = (Arc::clone(&rt), Arc::clone(&resumes), chunk.to_vec());
            tokio::spawn(async move {
                for id in chunk {
                    if let Ok(mut m) = resumes.sent.lock() {
                        m.insert(id.0, Instant::now());
                    }
                    rt.signal(id, Awaiting::go, 1).await?;
                }
                Ok::<_, pgflow_runtime::Error>(())
            })
        })
        .collect();
    for s in senders {
        s.await??;
    }
    let send_secs = start.elapsed().as_secs_f64();
    wait_finished(&rt, n).await;
    let secs = start.elapsed().as_secs_f64();
    let mut waited = resumes
        .waited_ms
        .lock()
        .map(|w| w.clone())
        .unwrap_or_default();
    waited.sort_by(f64::total_cmp);
    println!(
        "BENCH scenario=signals runs={n} send_secs={send_secs:.2} signals_per_sec={:.0} secs={secs:.2} resumed_runs_per_sec={:.0} signal_to_resume_p50_ms={:.2} signal_to_resume_p99_ms={:.2}",
        n as f64 / send_secs,
        n as f64 / secs,
        percentile(&waited, 0.5),
        percentile(&waited, 0.99),
    );

    // The same again, signalled from SQL, 1,000 per statement (one transaction each).
    let ids: Vec<i64> = start_in_batches::<Awaiting>(&rt, n, 1_000)
        .await?
        .into_iter()
        .map(|id| id.0)
        .collect();
    wait_parked_on_go(&pool, n).await?;
    let start = Instant::now();
    for chunk in ids.chunks(1_000) {
        sqlx::query("SELECT pgflow.signal(id, 'go', '1') FROM unnest($1::bigint[]) AS id")
            .bind(chunk)
            .execute(&pool)
            .await?;
    }
    let send_secs = start.elapsed().as_secs_f64();
    wait_finished(&rt, 2 * n).await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "BENCH scenario=signals_sql runs={n} send_secs={send_secs:.2} signals_per_sec={:.0} secs={secs:.2} resumed_runs_per_sec={:.0}",
        n as f64 / send_secs,
        n as f64 / secs,
    );
    rt.shutdown().await?;
    Ok(())
}

async fn enqueue(n: u64) -> BenchResult<()> {
    let url = fresh_database(db_name()).await?;
    let rt = runtime(&url, 0).await?;
    let start = Instant::now();
    start_in_batches::<Chain1>(&rt, n, 1_000).await?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "BENCH scenario=enqueue runs={n} steps=0 secs={secs:.2} runs_per_sec={:.0} steps_per_sec=0",
        n as f64 / secs
    );
    rt.shutdown().await?;
    Ok(())
}

async fn latency(runs: usize, concurrency: usize) -> BenchResult<()> {
    let url = fresh_database(db_name()).await?;
    let first = Arc::new(FirstStep::default());
    let rt = Runtime::builder()
        .database_url(&url)
        .instance_id("bench")
        .queue("bench", concurrency)
        .data(Arc::clone(&first))
        .start()
        .await?;
    // A runtime that serves no queue, as a web server that only starts runs: the
    // worker learns of its runs through NOTIFY (the peers' latency scenario).
    let producer = Runtime::builder()
        .database_url(&url)
        .instance_id("bench-producer")
        .migrate(false)
        .start()
        .await?;
    for (label, starter) in [("latency", &rt), ("latency_notify", &producer)] {
        // warm up
        for i in 0..20 {
            starter.start::<Chain3>(i).await?.wait().await?;
        }
        let mut to_first = Vec::with_capacity(runs);
        let mut to_done = Vec::with_capacity(runs);
        let mut start_call = Vec::with_capacity(runs);
        let started_at = Instant::now();
        for i in 0..runs as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await; // idle between runs
            if let Ok(mut t) = first.0.lock() {
                *t = None;
            }
            let t0 = Instant::now();
            let run = starter.start::<Chain3>(i).await?;
            start_call.push(t0.elapsed().as_secs_f64() * 1e3);
            let out = run.wait().await?;
            let done = t0.elapsed();
            assert_eq!(out, i + 3);
            let started = first
                .0
                .lock()
                .ok()
                .and_then(|t| *t)
                .ok_or("first step not seen")?;
            to_first.push(started.duration_since(t0).as_secs_f64() * 1e3);
            to_done.push(done.as_secs_f64() * 1e3);
        }
        for v in [&mut to_first, &mut to_done, &mut start_call] {
            v.sort_by(f64::total_cmp);
        }
        println!(
            "BENCH scenario={label} runs={runs} steps={} secs={:.2} first_step_p50_ms={:.2} first_step_p99_ms={:.2} p50_ms={:.2} p99_ms={:.2} start_call_p50_ms={:.2}",
            runs * 3,
            started_at.elapsed().as_secs_f64(),
            percentile(&to_first, 0.5),
            percentile(&to_first, 0.99),
            percentile(&to_done, 0.5),
            percentile(&to_done, 0.99),
            percentile(&start_call, 0.5),
        );
    }
    producer.shutdown().await?;
    rt.shutdown().await?;
    Ok(())
}

/// One run mapping over `elements` trivial elements.
async fn map(elements: u64, concurrency: usize) -> BenchResult<()> {
    let url = fresh_database(db_name()).await?;
    let rt = runtime(&url, concurrency).await?;
    // warm up: connections, prepared statements
    rt.start::<Map>((0..100).collect()).await?.wait().await?;
    let input: Vec<u64> = (0..elements).collect();
    let start = Instant::now();
    let out = rt.start::<Map>(input).await?.wait().await?;
    let secs = start.elapsed().as_secs_f64();
    if out.len() as u64 != elements || out.iter().zip(1..).any(|(o, i)| *o != i) {
        return Err("the map's output is not its elements' outputs in order".into());
    }
    let stats = rt.stats();
    println!(
        "BENCH scenario=map elements={elements} secs={secs:.2} elements_per_sec={:.0} flushes={} claims={} peak_rss_mib={:.0}",
        elements as f64 / secs.max(1e-9),
        stats.flushes,
        stats.claims,
        peak_rss_mib(),
    );
    rt.shutdown().await?;
    Ok(())
}

/// The process's peak resident set size (`VmHWM`), in MiB; 0 where unknown.
fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// The process's resident set size now (`VmRSS`), in MiB; 0 where unknown.
fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// A size field of `/proc/self/status`, in MiB.
fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `n` one-step runs inserted first (no worker), then drained by one runtime: the
/// closed-loop figure the peers' harness measures ("jobs").
async fn drain(n: u64, concurrency: usize) -> BenchResult<f64> {
    let url = fresh_database(db_name()).await?;
    let producer = runtime(&url, 0).await?;
    start_in_batches::<Chain1>(&producer, n, 5_000).await?;
    producer.shutdown().await?;
    // Timed from the runtime's start (connect, register, first claim) to the last
    // durable completion.
    let start = Instant::now();
    let rt = runtime(&url, concurrency).await?;
    wait_finished(&rt, n).await;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "BENCH scenario=drain runs={n} steps={n} secs={secs:.2} runs_per_sec={:.0} peak_rss_mib={:.0}",
        n as f64 / secs,
        peak_rss_mib()
    );
    rt.shutdown().await?;
    Ok(n as f64 / secs)
}

/// The physical limit of a queue on this server: `n` rows in a minimal table (a
/// partial index like `tasks_available`), drained by `workers` connections that
/// each loop "claim a batch of `batch` (UPDATE .. SKIP LOCKED) then delete it" — no
/// engine, no outputs, no run rows.
async fn raw(n: u64, workers: usize, batch: i64) -> BenchResult<f64> {
    let url = fresh_database(db_name()).await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(workers + 1).unwrap_or(8))
        .connect(&url)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE raw_jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                queue text NOT NULL, run_at timestamptz NOT NULL DEFAULT now(),
                                claimed_by text, payload jsonb NOT NULL);
         CREATE INDEX raw_jobs_available ON raw_jobs (queue, run_at, id) WHERE claimed_by IS NULL;",
    )
    .execute(&pool)
    .await?;
    sqlx::query(
        "INSERT INTO raw_jobs (queue, payload) SELECT 'bench', to_jsonb(g) FROM generate_series(1, $1) g",
    )
    .bind(i64::try_from(n).unwrap_or(i64::MAX))
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE raw_jobs").execute(&pool).await?;
    let start = Instant::now();
    let mut handles = Vec::new();
    for w in 0..workers {
        let pool = pool.clone();
        handles.push(tokio::spawn(async move {
            let me = format!("w{w}");
            loop {
                let ids: Vec<i64> = sqlx::query_scalar(
                    "UPDATE raw_jobs SET claimed_by = $1
                     WHERE id = ANY (ARRAY(SELECT id FROM raw_jobs
                                           WHERE queue = 'bench' AND claimed_by IS NULL
                                             AND run_at <= now()
                                           ORDER BY run_at, id LIMIT $2
                                           FOR UPDATE SKIP LOCKED))
                     RETURNING id",
                )
                .bind(&me)
                .bind(batch)
                .fetch_all(&pool)
                .await?;
                if ids.is_empty() {
                    return Ok::<(), sqlx::Error>(());
                }
                sqlx::query("DELETE FROM raw_jobs WHERE id = ANY ($1)")
                    .bind(&ids)
                    .execute(&pool)
                    .await?;
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "BENCH scenario=raw jobs={n} workers={workers} batch={batch} secs={secs:.2} jobs_per_sec={:.0}",
        n as f64 / secs
    );
    pool.close().await;
    Ok(n as f64 / secs)
}

/// CPU time (user + system) of process `pid` from `/proc/<pid>/stat`, in seconds
/// (the kernel reports it in USER_HZ ticks, 100 a second on Linux).
fn cpu_secs_of(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces: the fields start after its closing `)`
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU time of every PostgreSQL server process on this machine (the postmaster,
/// its backends and helpers), in seconds.
fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|pid| pid.chars().all(|c| c.is_ascii_digit()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|pid| cpu_secs_of(&pid))
        .sum()
}

/// A worker process of the `scaling` scenario (`--serve URL`): serves queue `bench`
/// until killed.
async fn serve(url: &str, instance: &str, concurrency: usize) -> BenchResult<()> {
    let _rt = Runtime::builder()
        .database_url(url)
        .instance_id(instance)
        .migrate(false)
        .max_connections(8)
        .queue("bench", concurrency)
        .start()
        .await?;
    std::future::pending::<()>().await;
    Ok(())
}

/// `n` one-step runs inserted first, then drained by `workers` processes (this
/// program, re-executed with `--serve`), each serving the queue with
/// `concurrency` slots: runs/s from the spawn to the last run finished, and where
/// the CPU went meanwhile (the workers' and the PostgreSQL server's CPU seconds).
async fn scaling(n: u64, workers: usize, concurrency: usize) -> BenchResult<f64> {
    let url = fresh_database(db_name()).await?;
    let producer = runtime(&url, 0).await?;
    start_in_batches::<Chain1>(&producer, n, 5_000).await?;
    producer.shutdown().await?;
    let check = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    let exe = std::env::current_exe()?;
    let pg_before = postgres_cpu_secs();
    let start = Instant::now();
    let mut children = Vec::with_capacity(workers);
    for w in 0..workers {
        children.push(
            std::process::Command::new(&exe)
                .args(["--serve", &url, "--instance", &format!("scaling-{w}")])
                .args(["--concurrency", &concurrency.to_string()])
                .stdin(std::process::Stdio::null())
                .spawn()?,
        );
    }
    let drained = async {
        loop {
            let left: i64 =
                sqlx::query_scalar("SELECT count(*) FROM pgflow.runs WHERE status = 'running'")
                    .fetch_one(&check)
                    .await?;
            if left == 0 {
                return Ok::<(), sqlx::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(600), drained).await;
    let secs = start.elapsed().as_secs_f64();
    let worker_cpu: f64 = children
        .iter()
        .filter_map(|c| cpu_secs_of(&c.id().to_string()))
        .sum();
    let pg_cpu = postgres_cpu_secs() - pg_before;
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    outcome.map_err(|_| "scaling: the runs did not finish within 10 minutes")??;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    println!(
        "BENCH scenario=scaling workers={workers} runs={n} concurrency_each={concurrency} secs={secs:.2} runs_per_sec={:.0} worker_cpu_secs={worker_cpu:.2} postgres_cpu_secs={pg_cpu:.2} cpu_busy={:.2} cores={cores}",
        n as f64 / secs,
        (worker_cpu + pg_cpu) / (secs * cores as f64),
    );
    check.close().await;
    Ok(n as f64 / secs)
}

async fn sustained(duration: u64, concurrency: usize, prune_after: Option<u64>) -> BenchResult<()> {
    let url = fresh_database(db_name()).await?;
    let rt = runtime(&url, concurrency).await?;
    // Retention on a runtime of its own (as in a deployment, any instance prunes).
    let pruner = match prune_after {
        Some(secs) => Some(
            Runtime::builder()
                .database_url(&url)
                .instance_id("bench-pruner")
                .max_connections(2)
                .retention(
                    pgflow_runtime::Retention::after(Duration::from_secs(secs))
                        .every(Duration::from_secs(1)),
                )
                .start()
                .await?,
        ),
        None => None,
    };
    let start = Instant::now();
    let end = start + Duration::from_secs(duration);
    let producer = {
        let rt = rt.clone();
        tokio::spawn(async move {
            let mut next = 0_u64;
            let mut started = 0_u64;
            while Instant::now() < end {
                // keep a backlog of about 5,000 runs ahead of the workers
                if started.saturating_sub(rt.stats().runs_finished) < 5_000 {
                    rt.start_many::<Chain1>(next..next + 1_000).await?;
                    next += 1_000;
                    started += 1_000;
                } else {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok::<u64, pgflow_runtime::Error>(started)
        })
    };
    let mut samples = Vec::new(); // (secs since start, runs finished)
    // the resident set once the first 10 s are done, to compare with the end's: it
    // must not grow with the number of finished runs
    let mut rss_early = None;
    while Instant::now() < end {
        samples.push((start.elapsed().as_secs_f64(), rt.stats().runs_finished));
        if rss_early.is_none() && start.elapsed() >= Duration::from_secs(10) {
            rss_early = Some((rss_mib(), rt.stats().runs_finished));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    samples.push((start.elapsed().as_secs_f64(), rt.stats().runs_finished));
    let (rss_10s, finished_10s) = rss_early.unwrap_or((rss_mib(), 0));
    let started = producer.await??;
    let window = 10.0_f64.min(duration as f64 / 2.0);
    let rate = |from: f64, to: f64| {
        let at = |t: f64| {
            samples
                .iter()
                .min_by(|a, b| (a.0 - t).abs().total_cmp(&(b.0 - t).abs()))
                .map_or((t, 0), |s| *s)
        };
        let (t0, r0) = at(from);
        let (t1, r1) = at(to);
        (r1 - r0) as f64 / (t1 - t0).max(1e-9)
    };
    let total = samples.last().map_or(0.0, |s| s.0);
    let first = rate(0.0, window);
    let last = rate(total - window, total);
    let finished = rt.stats().runs_finished;
    println!(
        "BENCH scenario=sustained runs={finished} steps={finished} secs={total:.1} started={started} runs_per_sec={:.0} steps_per_sec={:.0} first_10s_per_sec={first:.0} last_10s_per_sec={last:.0} last_over_first={:.2} rss_mib_at_10s={rss_10s:.1} runs_finished_at_10s={finished_10s} rss_mib_at_end={:.1} peak_rss_mib={:.1}",
        finished as f64 / total,
        finished as f64 / total,
        last / first.max(1e-9),
        rss_mib(),
        peak_rss_mib(),
    );
    if let Some(pruner) = pruner {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pgflow.runs")
            .fetch_one(pruner.pool())
            .await?;
        println!(
            "BENCH scenario=sustained_pruning prune_after_secs={} runs_finished={finished} runs_left_in_table={left}",
            prune_after.unwrap_or(0)
        );
        pruner.shutdown().await?;
    }
    rt.shutdown().await?;
    Ok(())
}

/// What [`tenants`] measured.
struct Tenants {
    /// B's start -> first-step latencies (ms, sorted).
    first_step_ms: Vec<f64>,
    /// B's start -> first-step latencies (ms, sorted) of the runs started after A's
    /// last start, while A's backlog drained.
    draining_ms: Vec<f64>,
    /// How long B's start calls took (ms, sorted).
    start_ms: Vec<f64>,
    /// A's throughput.
    a_runs_per_sec: f64,
}

/// Tenant B's start -> first-step latencies (ms, sorted) for one run every 10 ms while
/// `a` runs of tenant A are started (in batches of 1,000, as fast as they go) and
/// worked off; and A's throughput (runs/s). `fair`: the queue is claimed fairly.
async fn tenants(a: u64, concurrency: usize, fair: bool) -> BenchResult<Tenants> {
    let url = fresh_database(db_name()).await?;
    let started = Arc::new(Started(Mutex::default(), Instant::now(), 0.into()));
    let mut b = Runtime::builder()
        .database_url(&url)
        .instance_id("bench")
        .max_connections(8)
        .data(Arc::clone(&started));
    b = if fair {
        b.fair_queue("bench", concurrency)
    } else {
        b.queue("bench", concurrency)
    };
    let rt = b.start().await?;
    let t0 = Instant::now();
    let producer = {
        let rt = rt.clone();
        tokio::spawn(async move {
            let mut next = 0;
            while next < a {
                let end = (next + 1_000).min(a);
                rt.start_many::<Tenant1>((next..end).map(|i| ("a".to_owned(), i)))
                    .await?;
                next = end;
            }
            Ok::<_, pgflow_runtime::Error>(Instant::now())
        })
    };
    // B: one run every 10 ms until A is done (at least 200 of them)
    let mut b_starts = Vec::new();
    // how long B's start statements took (a part of its latency)
    let mut start_ms = Vec::new();
    let mut i = 0_u64;
    loop {
        let finished = rt.stats().runs_finished;
        if finished >= a + i && i >= 200 {
            break;
        }
        let at = Instant::now();
        b_starts.push((i, at));
        rt.start::<Tenant1>(("b".to_owned(), i)).await?;
        start_ms.push(at.elapsed().as_secs_f64() * 1e3);
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let enqueued = producer.await.map_err(|e| e.to_string())??;
    wait_finished(&rt, a + i).await;
    // A's throughput: its runs over the time to its last step; B's latencies: the
    // runs started while A still had work (all of them when A has none)
    let a_done =
        started.1 + Duration::from_micros(started.2.load(std::sync::atomic::Ordering::Relaxed));
    let secs = a_done.duration_since(t0).as_secs_f64();
    let seen = started.0.lock().map_err(|_| "poisoned")?.clone();
    // B's latencies (ms, sorted) of the runs started from `from` on while A had work
    let latencies = |from: Instant| {
        let mut ms: Vec<f64> = b_starts
            .iter()
            .filter(|(_, at)| *at >= from && (a == 0 || *at < a_done))
            .filter_map(|(k, at)| Some(seen.get(k)?.duration_since(*at).as_secs_f64() * 1e3))
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    let ms = latencies(t0);
    // the runs started after A's last start (A's backlog draining)
    let draining = latencies(enqueued);
    start_ms.sort_by(f64::total_cmp);
    rt.shutdown().await?;
    Ok(Tenants {
        first_step_ms: ms,
        draining_ms: draining,
        start_ms,
        a_runs_per_sec: a as f64 / secs.max(1e-9),
    })
}

/// The fairness scenario: tenant A's backlog of `a` runs next to tenant B's trickle,
/// in a fair queue and in an ordinary one, against B alone and plain chain1.
async fn fairness(a: u64, concurrency: usize) -> BenchResult<()> {
    let plain = throughput::<Chain1>("fairness_plain_chain1", a, 1, concurrency).await?;
    let alone = tenants(0, concurrency, true).await?;
    let fair_run = tenants(a, concurrency, true).await?;
    let fifo_run = tenants(a, concurrency, false).await?;
    let (a_fair, a_fifo) = (fair_run.a_runs_per_sec, fifo_run.a_runs_per_sec);
    let (fair, fifo) = (&fair_run.first_step_ms, &fifo_run.first_step_ms);
    let p = |v: &[f64], q| percentile(v, q);
    println!(
        "BENCH scenario=fairness a_runs={a} b_runs={} plain_chain1_runs_per_sec={plain:.0} a_fair_runs_per_sec={a_fair:.0} a_over_plain={:.2} b_alone_p50_ms={:.2} b_alone_p99_ms={:.2} b_fair_p50_ms={:.2} b_fair_p99_ms={:.2} fair_p99_over_alone={:.2} b_alone_start_call_p50_ms={:.2} b_fair_start_call_p50_ms={:.2} b_fair_start_call_p99_ms={:.2} b_fair_draining_runs={} b_fair_draining_p50_ms={:.2} b_fair_draining_p99_ms={:.2} b_fifo_p50_ms={:.1} b_fifo_p99_ms={:.1} a_fifo_runs_per_sec={a_fifo:.0}",
        fair.len(),
        a_fair / plain,
        p(&alone.first_step_ms, 0.5),
        p(&alone.first_step_ms, 0.99),
        p(fair, 0.5),
        p(fair, 0.99),
        p(fair, 0.99) / p(&alone.first_step_ms, 0.99),
        p(&alone.start_ms, 0.5),
        p(&fair_run.start_ms, 0.5),
        p(&fair_run.start_ms, 0.99),
        fair_run.draining_ms.len(),
        p(&fair_run.draining_ms, 0.5),
        p(&fair_run.draining_ms, 0.99),
        p(fifo, 0.5),
        p(fifo, 0.99),
    );
    Ok(())
}

async fn run(args: Args) -> BenchResult<()> {
    let _ = DATABASE.set(args.database.clone());
    if let Some(url) = &args.serve {
        return serve(url, &args.instance, args.concurrency).await;
    }
    let all = args.scenario.is_none();
    let is = |s: &str| all || args.scenario.as_deref() == Some(s);
    let known = [
        "chain1",
        "chain3",
        "diamond",
        "enqueue",
        "latency",
        "sustained",
        "inline",
        "map",
        "parked",
        "drain",
        "raw",
        "signals",
        "fairness",
        "scaling",
    ];
    if let Some(s) = &args.scenario {
        if !known.contains(&s.as_str()) {
            return Err(format!("unknown scenario {s}; {USAGE}").into());
        }
    }
    if is("chain1") {
        throughput::<Chain1>("chain1", args.n, 1, args.concurrency).await?;
    }
    if is("chain3") {
        throughput::<Chain3>("chain3", args.n, 3, args.concurrency).await?;
    }
    if is("diamond") {
        throughput::<Diamond>("diamond", args.n, 6, args.concurrency).await?;
    }
    if args.scenario.as_deref() == Some("drain") {
        let drained = drain(args.n, args.concurrency).await?;
        let limit = raw(args.n, 4, 500).await?;
        println!(
            "BENCH scenario=drain_over_raw drain_runs_per_sec={drained:.0} raw_jobs_per_sec={limit:.0} fraction={:.2}",
            drained / limit
        );
    }
    if args.scenario.as_deref() == Some("raw") {
        raw(args.n, 4, 500).await?;
    }
    if args.scenario.as_deref() == Some("parked") {
        parked(args.n, 100_000, args.concurrency).await?;
    }
    if args.scenario.as_deref() == Some("fairness") {
        let a = if args.n_given { args.n } else { 100_000 };
        fairness(a, args.concurrency).await?;
    }
    if args.scenario.as_deref() == Some("scaling") {
        let n = if args.n_given { args.n } else { 40_000 };
        let mut by_workers = Vec::new();
        for workers in [1, 2, 4] {
            by_workers.push((workers, scaling(n, workers, args.concurrency).await?));
        }
        let one = by_workers[0].1;
        let speedups: Vec<String> = by_workers
            .iter()
            .map(|(w, r)| format!("x{w}={:.2}", r / one))
            .collect();
        println!("BENCH scenario=scaling_speedup {}", speedups.join(" "));
    }
    if args.scenario.as_deref() == Some("signals") {
        let runs = if args.n_given { args.n } else { 10_000 };
        signals(runs, args.concurrency).await?;
    }
    if is("enqueue") {
        enqueue(args.n.max(50_000)).await?;
    }
    if is("latency") {
        // 200 sequential runs unless --n says otherwise (the default --n is sized
        // for throughput scenarios)
        let runs = if args.n_given { args.n } else { 200 };
        latency(usize::try_from(runs).unwrap_or(200), 16).await?;
    }
    if args.scenario.as_deref() == Some("sustained") {
        sustained(args.duration, args.concurrency, args.prune_after).await?;
    }
    if is("map") {
        map(args.elements, args.concurrency).await?;
    }
    if is("inline") {
        // 20,000 runs of 10 steps per sample unless --n says otherwise (fewer for a
        // run under valgrind, whose instruction counts do not depend on the load)
        let runs = if args.n_given { args.n } else { 20_000 };
        inline::<Chain10>("inline", runs).await;
        inline::<Chain10Retrying>("inline_retrying", runs).await;
    }
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}
