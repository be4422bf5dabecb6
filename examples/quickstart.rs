//! The quickstart: an LLM-routing workflow, durable on PostgreSQL, run on a mixed
//! batch of requests.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It connects to `DATABASE_URL` (default: the local server), applies the pgflow
//! migrations, starts a runtime in this process, enqueues 300 requests of mixed task
//! types (a few invalid, a few hitting a flaky provider), shows progress, and ends
//! with the results table read from `pgflow.job_results`: runs, success rate,
//! average and p95 duration and total cost per task type.

use std::time::{Duration, Instant};

use pgflow::{StepContext, StepError, workflow};
use pgflow_runtime::Runtime;
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use sqlx::postgres::PgPoolOptions;

/// What a caller asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    /// `simple`, `medium` or `complex`.
    pub task_type: String,
    /// The prompt.
    pub prompt: String,
}

/// The model chosen for a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Routed {
    /// Provider name.
    pub provider: String,
    /// Model name.
    pub model: String,
    /// Price per 1,000 tokens, in hundredths of a cent.
    pub price_per_1k: i64,
    /// The prompt.
    pub prompt: String,
}

/// A provider's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    /// The model that answered.
    pub model: String,
    /// The text.
    pub text: String,
    /// Tokens used.
    pub tokens: i64,
}

/// The workflow's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// The model that answered.
    pub model: String,
    /// What the call cost, in cents.
    pub cost_cents: i64,
}

/// Routes a request to a model tier, calls it and records the cost.
pub struct LlmRequest;

#[workflow(
    name = "llm_request",
    queue = "llm",
    max_attempts = 3,
    timeout = "5s",
    backoff = "5ms"
)]
impl LlmRequest {
    #[step]
    async fn select_model(req: Request) -> Result<Routed, StepError> {
        let (provider, model, price_per_1k) = match req.task_type.as_str() {
            "simple" => ("gemini", "gemini-flash", 10),
            "medium" => ("claude", "claude-sonnet", 300),
            "complex" => ("claude", "claude-opus", 1_500),
            other => {
                return Err(StepError::permanent(format!(
                    "unknown task type `{other}`: expected simple, medium or complex"
                )));
            }
        };
        Ok(Routed {
            provider: provider.into(),
            model: model.into(),
            price_per_1k,
            prompt: req.prompt,
        })
    }

    /// A stand-in provider: answers after a short delay and fails now and then with
    /// a retryable error (the real call arrives with the `llm_request` example).
    #[step(timeout = "2s")]
    async fn call_provider(routed: Routed, ctx: &StepContext) -> Result<Completion, StepError> {
        let seed = routed.prompt.len() as u64 + u64::from(ctx.attempt()) * 7;
        tokio::time::sleep(Duration::from_millis(1 + seed % 4)).await;
        if ctx.attempt() == 1 && seed % 5 == 0 {
            return Err(StepError::retryable(format!(
                "{} answered HTTP 503",
                routed.provider
            )));
        }
        let tokens = 500 + (seed * 37 % 2_000) as i64;
        Ok(Completion {
            model: routed.model,
            text: format!("answer to {:?}", routed.prompt),
            tokens,
        })
    }

    #[step]
    async fn record(
        done: Completion,
        input: Request,
        ctx: &StepContext,
    ) -> Result<Answer, StepError> {
        // price: hundredths of a cent per 1,000 tokens; rounded up to whole cents
        let price = Self::price_of(&input.task_type);
        let cost = (done.tokens * price + 99_999) / 100_000;
        ctx.add_cost_cents(cost);
        Ok(Answer {
            text: done.text,
            model: done.model,
            cost_cents: cost,
        })
    }
}

impl LlmRequest {
    fn price_of(task_type: &str) -> i64 {
        match task_type {
            "simple" => 10,
            "medium" => 300,
            _ => 1_500,
        }
    }
}

const RUNS: usize = 300;

fn unreachable_help(url: &str, error: &dyn std::fmt::Display) -> String {
    format!(
        "PostgreSQL is not reachable at {} ({error}). pgflow keeps everything in \
         PostgreSQL, so the quickstart needs a server: on Debian/Ubuntu start the local one \
         with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`; \
         anywhere with Docker, `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`; \
         or point DATABASE_URL at a server you have (e.g. \
         DATABASE_URL=postgres://user:password@host:5432/db cargo run --example quickstart).",
        pgflow_runtime::mask_password(url)
    )
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let url = pgflow_suite::support::database_url();
    // One plain connection first: its error says why (refused, unknown host, auth).
    if let Err(e) = sqlx::PgConnection::connect(&url).await {
        eprintln!("{}", unreachable_help(&url, &e));
        std::process::exit(1);
    }
    let pool = match PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", unreachable_help(&url, &e));
            std::process::exit(1);
        }
    };
    let rt = Runtime::builder()
        .pool(pool.clone())
        .queue("llm", 32)
        .instance_id(format!("quickstart-{}", std::process::id()))
        .start()
        .await?;
    println!(
        "pgflow runtime {} started on {} (migrations applied, workflows registered)",
        rt.instance_id(),
        pgflow_runtime::mask_password(&url)
    );

    let kinds = ["simple", "medium", "complex", "simple", "medium", "unknown"];
    let requests: Vec<Request> = (0..RUNS)
        .map(|i| Request {
            task_type: kinds[i % kinds.len()].to_owned(),
            prompt: format!("request number {i}"),
        })
        .collect();
    let started = Instant::now();
    let ids = rt.start_many::<LlmRequest>(requests).await?;
    let first = ids.first().map_or(0, |id| id.0);
    println!("enqueued {} llm_request runs", ids.len());

    loop {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status <> 'running'),
                    count(*) FILTER (WHERE status = 'failed')
             FROM pgflow.runs WHERE id >= $1 AND workflow = 'llm_request'",
        )
        .bind(first)
        .fetch_one(&pool)
        .await?;
        println!(
            "  {done:>4}/{RUNS} finished ({failed} failed)  {:>6.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        );
        if done >= RUNS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let rows: Vec<(String, i64, f64, f64, f64, i64)> = sqlx::query_as(
        "SELECT input->>'task_type',
                count(*),
                100.0 * avg(CASE WHEN status = 'success' THEN 1.0 ELSE 0.0 END)::float8,
                avg(duration_ms)::float8,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),
                sum(cost_cents)::bigint
         FROM pgflow.job_results
         WHERE run_id >= $1 AND workflow = 'llm_request'
         GROUP BY 1 ORDER BY 1",
    )
    .bind(first)
    .fetch_all(&pool)
    .await?;
    println!(
        "\n{:<10} {:>5} {:>9} {:>8} {:>8} {:>11}",
        "task_type", "runs", "success", "avg_ms", "p95_ms", "cost_cents"
    );
    for (kind, runs, success, avg, p95, cost) in rows {
        println!("{kind:<10} {runs:>5} {success:>8.1}% {avg:>8.1} {p95:>8.1} {cost:>11}");
    }
    let example: Option<(String,)> = sqlx::query_as(
        "SELECT error->'StepFailed'->'history'->0->>'message' FROM pgflow.runs
         WHERE id >= $1 AND status = 'failed' LIMIT 1",
    )
    .bind(first)
    .fetch_optional(&pool)
    .await?;
    if let Some((msg,)) = example {
        println!("\nfailed runs say: {msg}");
    }
    println!("\nstored in pgflow.runs, pgflow.step_states and the view pgflow.job_results");
    rt.shutdown().await?;
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("quickstart failed: {e}");
        std::process::exit(1);
    }
}
