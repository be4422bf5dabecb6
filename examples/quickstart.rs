//! The quickstart: the three reference workflows, durable on PostgreSQL, on a mixed
//! batch.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! It makes a database of its own, `pgflow_quickstart`, afresh on the server of
//! `DATABASE_URL` (default: the local server; `--here` uses `DATABASE_URL`'s own
//! database instead), applies the pgflow migrations, starts a runtime in this process
//! and enqueues a mixed batch (some runs fail on purpose):
//! - 240 `llm_request` runs of mixed task types (a few invalid; the provider — a local
//!   OpenAI-compatible endpoint unless `LLM_BASE_URL` is set — answers 429 or 500 now
//!   and then, which is retried);
//! - 6 `embedding` runs over a small corpus (each chunk embedded in its own task);
//! - 64 `agent_coordination` messages (a few refused by validation).
//!
//! It shows progress while they run and ends with the per-workflow results table
//! read from `pgflow.job_results`: runs, success rate, average and p95 duration and
//! total cost.

use std::time::{Duration, Instant};

use pgflow_runtime::Runtime;
use pgflow_suite::agents::{self, AgentCoordination};
use pgflow_suite::embedding::{EmbedRequest, Embedding, EmbeddingModel, demo_corpus};
use pgflow_suite::llm::{LlmClient, LlmInput, LlmRequest, Message};

/// The database the quickstart makes afresh on the server of `DATABASE_URL`.
const QUICKSTART_DATABASE: &str = "pgflow_quickstart";

const LLM_RUNS: usize = 240;
const EMBEDDING_RUNS: usize = 6;
const AGENT_RUNS: usize = 64;
const RUNS: usize = LLM_RUNS + EMBEDDING_RUNS + AGENT_RUNS;

/// What to say when the database cannot be used: the cause, and how to get a server
/// when there is none to reach.
fn connect_help(error: &pgflow_runtime::Error) -> String {
    let pgflow_runtime::Error::Connect { url, source } = error else {
        return error.to_string();
    };
    if !error.is_unreachable() {
        // The server answered and refused (password, database, connection limit):
        // the error says what to fix.
        return error.to_string();
    }
    format!(
        "PostgreSQL is not reachable at {url} ({source}). \
         pgflow keeps everything in PostgreSQL, so the quickstart needs a server: \
         on Debian/Ubuntu start the local one with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`; \
         anywhere with Docker, `docker run -d -p 5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`; \
         or point DATABASE_URL at a server you have (e.g. \
         DATABASE_URL=postgres://user:password@host:5432/db cargo run --example quickstart)."
    )
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let server = pgflow_suite::support::database_url();
    // Probes with one plain connection first: its error says why (refused, no
    // answer, unknown host, authentication, unknown database).
    if let Err(e) = pgflow_runtime::connect(&server, 1).await {
        eprintln!("{}", connect_help(&e));
        std::process::exit(1);
    }
    // A database of its own, made afresh, unless told to use DATABASE_URL's (`--here`).
    let url = if std::env::args().any(|a| a == "--here") {
        server
    } else {
        pgflow_suite::support::fresh_database(QUICKSTART_DATABASE)
            .await
            .map_err(|e| format!("cannot create database {QUICKSTART_DATABASE}: {e}"))?
    };
    let pool = match pgflow_runtime::connect(&url, 8).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{}", connect_help(&e));
            std::process::exit(1);
        }
    };
    println!(
        "pgflow quickstart in database {} — some runs fail on purpose (a few invalid LLM \
         requests, messages that agents refuse) to show how failures are retried and recorded.",
        url.rsplit('/').next().unwrap_or_default()
    );
    // The provider: LLM_BASE_URL, or a local OpenAI-compatible endpoint that fails
    // every 7th call with 429 or 500 (retried).
    let (llm, _stub) = LlmClient::from_env().await.map_err(|e| e.to_string())?;
    agents::setup(&pool).await?;
    let rt = pgflow_suite::llm::limits(Runtime::builder())
        .pool(pool.clone())
        .queue("llm", 32)
        .queue("embeddings", 16)
        .queue("agents", 16)
        .data(pool.clone())
        .data(llm)
        .instance_id(format!("quickstart-{}", std::process::id()))
        .start()
        .await?;
    println!(
        "pgflow runtime {} started on {} (migrations applied, workflows registered)",
        rt.instance_id(),
        pgflow_runtime::mask_password(&url)
    );

    let kinds = [
        "simple",
        "medium",
        "complex",
        "simple",
        "medium",
        "translate",
    ];
    let requests: Vec<LlmInput> = (0..LLM_RUNS)
        .map(|i| LlmInput {
            request_id: format!("quickstart-{i}"),
            task_type: kinds[i % kinds.len()].to_owned(),
            messages: vec![Message {
                role: "user".into(),
                content: format!("Explain item {i} in {} words", 5 + i % 30),
            }],
            // tenants of this process: the daily budget counts per tenant
            tenant: format!("qs{}-tenant-{}", std::process::id(), i % 3),
        })
        .collect();
    let started = Instant::now();
    let tag = format!("qs{}", std::process::id());
    let ids = rt.start_many::<LlmRequest>(requests).await?;
    let first = ids.first().map_or(0, |id| id.0);
    rt.start_many::<Embedding>((0..EMBEDDING_RUNS).map(|i| EmbedRequest {
        collection: format!("{tag}-{i}"),
        model: if i % 2 == 0 {
            EmbeddingModel::HashBow256
        } else {
            EmbeddingModel::HashNgram1024
        },
        documents: demo_corpus(8 + i),
        query: "how are failed steps retried with backoff".into(),
        top_k: 3,
    }))
    .await?;
    rt.start_many::<AgentCoordination>(
        agents::demo_messages(AGENT_RUNS, &tag)
            .into_iter()
            .map(|(m, _)| m),
    )
    .await?;
    println!(
        "enqueued {LLM_RUNS} llm_request, {EMBEDDING_RUNS} embedding and {AGENT_RUNS} agent_coordination runs"
    );

    loop {
        let (done, failed): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status <> 'running'),
                    count(*) FILTER (WHERE status = 'failed')
             FROM pgflow.runs WHERE id >= $1",
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
        "SELECT workflow,
                count(*),
                100.0 * avg(CASE WHEN status = 'success' THEN 1.0 ELSE 0.0 END)::float8,
                avg(duration_ms)::float8,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),
                sum(cost_cents)::bigint
         FROM pgflow.job_results
         WHERE run_id >= $1
         GROUP BY 1 ORDER BY 1",
    )
    .bind(first)
    .fetch_all(&pool)
    .await?;
    println!(
        "\n{:<20} {:>5} {:>9} {:>8} {:>8} {:>11}",
        "workflow", "runs", "success", "avg_ms", "p95_ms", "cost_cents"
    );
    for (workflow, runs, success, avg, p95, cost) in rows {
        println!("{workflow:<20} {runs:>5} {success:>8.1}% {avg:>8.1} {p95:>8.1} {cost:>11}");
    }
    let examples: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT ON (workflow) workflow, error->'StepFailed'->'history'->0->>'message'
         FROM pgflow.runs WHERE id >= $1 AND status = 'failed' ORDER BY workflow, id",
    )
    .bind(first)
    .fetch_all(&pool)
    .await?;
    if !examples.is_empty() {
        println!("\nfailures, permanent by design of the batch:");
        for (workflow, msg) in examples {
            println!("  {workflow}: {msg}");
        }
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
