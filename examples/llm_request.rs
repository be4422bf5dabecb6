//! Route LLM requests by task type to a model tier, call an OpenAI-compatible
//! endpoint over HTTP, record the cost — durably, with retries on 429/5xx.
//!
//! ```text
//! cargo run --example llm_request -- [--n 60] [--batches 3]
//! LLM_BASE_URL=http://localhost:4000 LLM_API_KEY=... cargo run --example llm_request
//! ```
//!
//! Without `LLM_BASE_URL` it starts a local endpoint (`pgflow_suite::llm::StubEndpoint`)
//! that answers in the OpenAI format and fails every 7th call with 429 or 500. It runs
//! `--n` requests (a few with an unknown task type, which fail permanently), prints a
//! per-model table from `pgflow.job_results`, checks its own results and ends with
//! `llm_request: OK` (exit 0) or the list of what was wrong (exit 1).
//!
//! With the stub it also sends `--batches` (default 3) batch jobs through the
//! `llm_batch` workflow, which polls each job with `StepError::snooze` until the
//! provider completes it: the polls hold no worker slot and count no attempt.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgflow_runtime::Runtime;
use pgflow_suite::llm::{
    BatchAnswer, BatchInput, LlmBatch, LlmClient, LlmInput, LlmRequest, Message, STUB_BATCH_POLLS,
    StubEndpoint, TIERS,
};

async fn run(n: usize, batches: usize) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let url = pgflow_suite::support::database_url();
    let (mut client, stub) = LlmClient::from_env().await.map_err(|e| e.to_string())?;
    // The stub's batch jobs complete after a few polls: poll them quickly.
    client.batch_poll = Duration::from_millis(200);
    let base_url = client.base_url.clone();
    let rt = pgflow_suite::llm::limits(Runtime::builder())
        .database_url(&url)
        .queue("llm", 16)
        .instance_id(format!("llm-example-{}", std::process::id()))
        .data(client)
        .start()
        .await?;
    println!(
        "calling {base_url}{}",
        if stub.is_some() {
            " (local stub endpoint)"
        } else {
            ""
        }
    );

    let kinds = [
        "simple",
        "medium",
        "complex",
        "simple",
        "medium",
        "translate",
    ];
    let inputs: Vec<LlmInput> = (0..n)
        .map(|i| LlmInput {
            request_id: format!("req-{i}"),
            task_type: kinds[i % kinds.len()].to_owned(),
            messages: vec![
                Message {
                    role: "system".into(),
                    content: "You are concise.".into(),
                },
                Message {
                    role: "user".into(),
                    content: format!("Summarise item {i} in {} words", 5 + i % 20),
                },
            ],
            // tenants of this process: the daily budget counts per tenant
            tenant: format!(
                "{}-{}",
                ["acme", "globex", "initech"][i % 3],
                std::process::id()
            ),
        })
        .collect();
    let started = Instant::now();
    let ids = rt.start_many::<LlmRequest>(inputs.clone()).await?;
    let mut problems = Vec::new();
    for (id, input) in ids.iter().zip(&inputs) {
        let result = rt
            .handle::<pgflow_suite::llm::Answer>(*id, true)
            .wait()
            .await;
        let valid = TIERS.iter().any(|t| t.0 == input.task_type);
        match (valid, result) {
            (true, Ok(answer)) => {
                if answer.request_id != input.request_id || answer.cost_cents <= 0 {
                    problems.push(format!("run {id}: unexpected answer {answer:?}"));
                }
            }
            (true, Err(e)) => problems.push(format!("run {id} ({}) failed: {e}", input.task_type)),
            (false, Ok(_)) => problems.push(format!("run {id}: an unknown task type succeeded")),
            (false, Err(e)) => {
                if !e.to_string().contains("unknown task type `translate`") {
                    problems.push(format!("run {id}: unexpected error {e}"));
                }
            }
        }
    }
    println!(
        "{} requests finished in {:.0} ms",
        ids.len(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let first = ids.first().map_or(0, |i| i.0);
    let rows: Vec<(String, i64, f64, f64, i64)> = sqlx::query_as(
        "SELECT COALESCE(output->>'model', '(failed: ' || (input->>'task_type') || ')'),
                count(*),
                100.0 * avg(CASE WHEN status = 'success' THEN 1.0 ELSE 0.0 END)::float8,
                avg(duration_ms)::float8,
                sum(cost_cents)::bigint
         FROM pgflow.job_results WHERE workflow = 'llm_request' AND run_id >= $1
         GROUP BY 1 ORDER BY 1",
    )
    .bind(first)
    .fetch_all(rt.pool())
    .await?;
    println!(
        "\n{:<28} {:>5} {:>9} {:>8} {:>11}",
        "model", "runs", "success", "avg_ms", "cost_cents"
    );
    for (model, runs, ok, avg, cost) in rows {
        println!("{model:<28} {runs:>5} {ok:>8.1}% {avg:>8.1} {cost:>11}");
    }
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pgflow.step_states s JOIN pgflow.runs r ON r.id = s.run_id
         WHERE r.workflow = 'llm_request' AND r.id >= $1 AND s.step = 1 AND s.attempts > 1",
    )
    .bind(first)
    .fetch_one(rt.pool())
    .await?;
    println!("\n{retried} provider calls succeeded after a 429/500 and a retry");
    spend_by_model(&rt, first, &mut problems).await?;
    if stub.is_some() && n >= 14 && retried == 0 {
        problems.push("the stub's 429/500 answers were never retried".into());
    }
    if let Some(stub) = &stub {
        batch_jobs(&rt, stub, batches, &mut problems).await?;
    }
    rt.shutdown().await?;
    Ok(problems)
}

/// Spend of this example's runs by model, from the usage ledger (what `pgflow costs
/// --by model` shows for all runs), checked against the runs' own cost.
async fn spend_by_model(
    rt: &Runtime,
    first: i64,
    problems: &mut Vec<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT model, sum(tokens_in)::bigint, sum(tokens_out)::bigint, sum(cost_cents)::bigint
         FROM pgflow.step_usage WHERE workflow = 'llm_request' AND run_id >= $1
         GROUP BY model ORDER BY 4 DESC, 1",
    )
    .bind(first)
    .fetch_all(rt.pool())
    .await?;
    println!(
        "\n{:<28} {:>10} {:>10} {:>11}",
        "spend by model", "tokens_in", "tokens_out", "cost_cents"
    );
    let mut ledger = 0;
    for (model, tin, tout, cents) in &rows {
        println!("{model:<28} {tin:>10} {tout:>10} {cents:>11}");
        ledger += cents;
    }
    let (runs, tokens): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(sum(cost_cents), 0)::bigint,
                COALESCE(sum(tokens_in + tokens_out), 0)::bigint
         FROM pgflow.job_results WHERE workflow = 'llm_request' AND run_id >= $1",
    )
    .bind(first)
    .fetch_one(rt.pool())
    .await?;
    // by tenant (the run key, which the daily budget counts under), and the provider's
    // quota in the current minute
    let tenants: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(key, ''), sum(cost_cents)::bigint FROM pgflow.step_usage
         WHERE workflow = 'llm_request' AND run_id >= $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(first)
    .fetch_all(rt.pool())
    .await?;
    for (tenant, cents) in &tenants {
        println!(
            "{:<28} {cents:>33} cents of 500 today",
            format!("tenant {tenant}")
        );
    }
    let quota: Option<(i64, i64)> = sqlx::query_as(
        "SELECT used, reserved FROM pgflow.limit_windows
         WHERE name = 'provider_tokens' ORDER BY window_start DESC LIMIT 1",
    )
    .fetch_optional(rt.pool())
    .await?;
    if let Some((used, reserved)) = quota {
        println!(
            "provider quota this minute: {used} of 2,000,000 tokens used, {reserved} reserved"
        );
    }
    if tenants.len() != 3 {
        problems.push(format!("spend of {} tenants, expected 3", tenants.len()));
    }
    if ledger != runs || rows.is_empty() || tokens == 0 {
        problems.push(format!(
            "the usage ledger says {ledger} cents, the runs {runs} cents ({tokens} tokens)"
        ));
    }
    Ok(())
}

/// Sends `n` batch jobs of 4 prompts through `llm_batch` and checks that each was
/// polled until complete with snoozes, on its first attempt.
async fn batch_jobs(
    rt: &Runtime,
    stub: &StubEndpoint,
    n: usize,
    problems: &mut Vec<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let inputs: Vec<BatchInput> = (0..n)
        .map(|i| BatchInput {
            batch_ref: format!("batch-{i}"),
            task_type: ["simple", "medium"][i % 2].to_owned(),
            prompts: (0..4)
                .map(|k| format!("Summarise document {i}.{k}"))
                .collect(),
        })
        .collect();
    let polls_before = stub.batch_polls.load(Ordering::Relaxed);
    let started = Instant::now();
    let ids = rt.start_many::<LlmBatch>(inputs).await?;
    let mut cost = 0;
    for id in &ids {
        match rt.handle::<BatchAnswer>(*id, true).wait().await {
            Ok(a) if a.answers.len() == 4 && a.cost_cents > 0 => cost += a.cost_cents,
            Ok(a) => problems.push(format!("batch run {id}: unexpected answer {a:?}")),
            Err(e) => problems.push(format!("batch run {id} failed: {e}")),
        }
    }
    let polls = stub.batch_polls.load(Ordering::Relaxed) - polls_before;
    let first = ids.first().map_or(0, |i| i.0);
    // `wait_for_batch` (step 1) completed on attempt 1 in every run: snoozes are not
    // attempts.
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT s.attempts FROM pgflow.step_states s JOIN pgflow.runs r ON r.id = s.run_id
         WHERE r.workflow = 'llm_batch' AND r.id >= $1 AND s.step = 1",
    )
    .bind(first)
    .fetch_all(rt.pool())
    .await?;
    println!(
        "\n{} batch jobs completed in {:.0} ms after {polls} status polls ({} snoozes), \
         every one on its first attempt; {cost} cents",
        ids.len(),
        started.elapsed().as_secs_f64() * 1e3,
        polls.saturating_sub(ids.len() as u64),
    );
    let expected = (u64::from(STUB_BATCH_POLLS) + 1) * ids.len() as u64;
    if polls != expected {
        problems.push(format!("{polls} batch polls, expected {expected}"));
    }
    if attempts.len() != ids.len() || attempts.iter().any(|&a| a != 1) {
        problems.push(format!(
            "wait_for_batch attempts {attempts:?}: a snooze was counted"
        ));
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut n = 60;
    let mut batches = 3;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--n", Some(v)) => n = v,
            ("--batches", Some(v)) => batches = v,
            _ => {
                eprintln!("usage: llm_request [--n N] [--batches N]");
                std::process::exit(2);
            }
        }
    }
    match run(n, batches).await {
        Ok(problems) if problems.is_empty() => println!("llm_request: OK"),
        Ok(problems) => {
            for p in problems {
                eprintln!("llm_request: {p}");
            }
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("llm_request failed: {e}");
            std::process::exit(1);
        }
    }
}
