//! The binary a user deploys: serves every workflow linked into it from the queue in
//! `DATABASE_URL`, until SIGTERM or SIGINT, then shuts down gracefully.
//!
//! ```text
//! cargo run --example worker -- [--queue NAME=CONCURRENCY]... [--instance-id ID]
//!     [--database-url URL] [--heartbeat-ms MS] [--offline-after-ms MS]
//!     [--lease-grace-ms MS] [--shutdown-grace-ms MS] [--record-executions]
//!     [--schedule-every-secs N [--schedule-missed skip|run_once|run_each]]
//! ```
//!
//! Environment: `DATABASE_URL`, `INSTANCE_ID`, `PGFLOW_QUEUES` (`default=16,llm=4`),
//! `LLM_BASE_URL` and `LLM_API_KEY` for the LLM workflow (a local stub endpoint
//! otherwise).
//! Without queues it serves every queue of the linked workflows with 16 slots each.
//! It prints `pgflow worker <id> ready` once it is serving and `pgflow worker <id>
//! stopped` after a graceful shutdown.
//!
//! With `--schedule-every-secs N` it also registers the schedule `nightly_chain`: a
//! nightly-style job (in production its expression would be `0 0 3 * * *` in the
//! `Europe/Paris` time zone) that in this demo starts a `proc_chain3` run every N
//! seconds (N from 1 to 59: the seconds divisible by N of each minute). Start several
//! workers with it: each tick starts one run, whichever worker fires it.

use std::collections::BTreeMap;
use std::time::Duration;

// The workflows this binary serves: linking the crate registers them.
use pgflow_runtime::{Missed, Runtime, Schedule, Tick};
use pgflow_suite::flows::{EXECUTIONS_DDL, ExecLog, Job, ProcChain3};
use pgflow_suite::llm::LlmClient;

struct Args {
    url: String,
    instance_id: Option<String>,
    queues: BTreeMap<String, usize>,
    heartbeat: Option<Duration>,
    offline_after: Option<Duration>,
    lease_grace: Option<Duration>,
    shutdown_grace: Option<Duration>,
    record_executions: bool,
    schedule_every_secs: Option<u32>,
    schedule_missed: Missed,
    /// `--key-concurrency QUEUE=N`: at most N running tasks per run key.
    key_limits: BTreeMap<String, usize>,
}

const USAGE: &str = "usage: worker [--queue NAME=CONCURRENCY]... [--instance-id ID] [--database-url URL] [--heartbeat-ms MS] [--offline-after-ms MS] [--lease-grace-ms MS] [--shutdown-grace-ms MS] [--record-executions] [--schedule-every-secs N [--schedule-missed skip|run_once|run_each]] [--key-concurrency QUEUE=N]...";

fn parse_queue(spec: &str, queues: &mut BTreeMap<String, usize>) -> Result<(), String> {
    let (name, n) = spec
        .split_once('=')
        .ok_or_else(|| format!("queue {spec:?}: expected NAME=CONCURRENCY"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("queue {spec:?}: concurrency is not a number"))?;
    queues.insert(name.trim().to_owned(), n);
    Ok(())
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
        instance_id: std::env::var("INSTANCE_ID").ok().filter(|s| !s.is_empty()),
        queues: BTreeMap::new(),
        heartbeat: None,
        offline_after: None,
        lease_grace: None,
        shutdown_grace: None,
        record_executions: false,
        schedule_every_secs: None,
        schedule_missed: Missed::default(),
        key_limits: BTreeMap::new(),
    };
    if let Ok(spec) = std::env::var("PGFLOW_QUEUES") {
        for q in spec.split(',').filter(|s| !s.trim().is_empty()) {
            parse_queue(q, &mut args.queues)?;
        }
    }
    let mut it = std::env::args().skip(1);
    let ms = |v: Option<String>, flag: &str| -> Result<Option<Duration>, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("{flag}: not a number: {v}"))?;
        Ok(Some(Duration::from_millis(n)))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--queue" => parse_queue(&it.next().ok_or("--queue needs NAME=N")?, &mut args.queues)?,
            "--instance-id" => {
                args.instance_id = Some(it.next().ok_or("--instance-id needs a value")?)
            }
            "--database-url" => args.url = it.next().ok_or("--database-url needs a value")?,
            "--heartbeat-ms" => args.heartbeat = ms(it.next(), &a)?,
            "--offline-after-ms" => args.offline_after = ms(it.next(), &a)?,
            "--lease-grace-ms" => args.lease_grace = ms(it.next(), &a)?,
            "--shutdown-grace-ms" => args.shutdown_grace = ms(it.next(), &a)?,
            "--record-executions" => args.record_executions = true,
            "--key-concurrency" => parse_queue(
                &it.next().ok_or("--key-concurrency needs QUEUE=N")?,
                &mut args.key_limits,
            )?,
            "--schedule-every-secs" => {
                let v = it.next().ok_or("--schedule-every-secs needs a value")?;
                let n: u32 = v
                    .parse()
                    .ok()
                    .filter(|n| (1..60).contains(n))
                    .ok_or(format!("--schedule-every-secs: expected 1 to 59, got {v}"))?;
                args.schedule_every_secs = Some(n);
            }
            "--schedule-missed" => {
                let v = it.next().ok_or("--schedule-missed needs a value")?;
                args.schedule_missed = v.parse()?;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(args)
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // Probes first: the error says why (refused, no answer, auth, unknown database).
    let pool = pgflow_runtime::connect(&args.url, 8).await?;
    let mut queues = args.queues;
    if queues.is_empty() {
        for def in pgflow::registry()?.workflows() {
            queues.insert(def.queue().to_owned(), 16);
        }
    }
    // the limits the linked workflows count against (`llm_request`'s provider quota
    // and tenant budget; `proc_limited`'s request rate)
    let mut builder = pgflow_suite::flows::limits(pgflow_suite::llm::limits(
        Runtime::builder().pool(pool.clone()),
    ));
    for (q, n) in &queues {
        builder = builder.queue(q.clone(), *n);
    }
    for (q, n) in &args.key_limits {
        builder = builder.key_concurrency(q.clone(), u32::try_from(*n).unwrap_or(u32::MAX));
    }
    if let Some(id) = &args.instance_id {
        builder = builder.instance_id(id.clone());
    }
    if let Some(d) = args.heartbeat {
        builder = builder.heartbeat_interval(d);
    }
    if let Some(d) = args.offline_after {
        builder = builder.offline_after(d).rescue_interval(d / 4);
    }
    if let Some(d) = args.lease_grace {
        builder = builder.lease_grace(d);
    }
    if let Some(d) = args.shutdown_grace {
        builder = builder.shutdown_grace(d);
    }
    // Shared data the linked workflows read with ctx.data::<T>(): the LLM client
    // (LLM_BASE_URL, or a local OpenAI-compatible endpoint) and the pool.
    let (llm, _stub) = LlmClient::from_env().await.map_err(|e| e.to_string())?;
    builder = builder.data(llm).data(pool.clone());
    if args.record_executions {
        sqlx::raw_sql(EXECUTIONS_DDL).execute(&pool).await?;
        sqlx::raw_sql(pgflow_suite::flows::CALLS_DDL)
            .execute(&pool)
            .await?;
        builder = builder.data(ExecLog(pool.clone()));
    }
    if let Some(n) = args.schedule_every_secs {
        builder = builder.schedule(nightly_chain(n, args.schedule_missed)?);
    }
    let rt = builder.start().await?;
    let served: Vec<String> = queues.iter().map(|(q, n)| format!("{q}={n}")).collect();
    println!(
        "pgflow worker {} ready: queues {}",
        rt.instance_id(),
        served.join(",")
    );
    rt.run_until_signal().await?;
    let s = rt.stats();
    println!(
        "pgflow worker {} stopped: {} steps completed, {} runs finished",
        rt.instance_id(),
        s.completions,
        s.runs_finished
    );
    Ok(())
}

/// The demo's nightly-style schedule: a `proc_chain3` run every `every_secs`
/// seconds, its input made from the tick (the tick's Unix time as `n`).
fn nightly_chain(every_secs: u32, missed: Missed) -> Result<Schedule, pgflow_runtime::Error> {
    // In production: "0 0 3 * * *" with .time_zone("Europe/Paris").
    let expression = if every_secs == 1 {
        "* * * * * *".to_owned()
    } else {
        format!("*/{every_secs} * * * * *")
    };
    Ok(
        Schedule::cron::<ProcChain3>("nightly_chain", &expression, |tick: &Tick| Job {
            n: u64::try_from(tick.at.timestamp()).unwrap_or(0),
            sleep_ms: 0,
        })?
        .missed(missed),
    )
}

#[tokio::main]
async fn main() {
    // The runtime reports lost connections, rejected completions and rescues as
    // warnings; show them.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("pgflow worker: {e}");
        std::process::exit(1);
    }
}
