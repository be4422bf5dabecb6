//! The quickstart: an LLM-routing workflow run on a mixed batch of requests.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! Until the durable runtime lands this runs the workflow with the in-process
//! executor (`pgflow::execute_with`), which uses the same step table, retries,
//! backoff and timeouts. It ends with a results table: runs, success rate, average
//! and p95 duration and total cost per task type.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgflow::{CostMeter, ExecuteOptions, StepContext, StepError, workflow};
use serde::{Deserialize, Serialize};

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

#[derive(Default)]
struct Row {
    runs: u32,
    ok: u32,
    millis: Vec<f64>,
    cost: i64,
}

#[tokio::main]
async fn main() {
    let kinds = ["simple", "medium", "complex", "simple", "medium", "unknown"];
    let requests: Vec<Request> = (0..300)
        .map(|i| Request {
            task_type: kinds[i % kinds.len()].to_owned(),
            prompt: format!("request number {i}"),
        })
        .collect();
    println!(
        "running {} llm_request workflows in process...",
        requests.len()
    );

    let started = Instant::now();
    let mut handles = Vec::new();
    for req in requests {
        handles.push(tokio::spawn(async move {
            let cost = CostMeter::new();
            let opts = ExecuteOptions::new().cost(cost.clone());
            let t = Instant::now();
            let result = pgflow::execute_with::<LlmRequest>(req.clone(), opts).await;
            (req.task_type, result, t.elapsed(), cost.total())
        }));
    }
    let mut table: BTreeMap<String, Row> = BTreeMap::new();
    let mut first_error = None;
    for h in handles {
        let (kind, result, elapsed, cost) = h.await.expect("a workflow task panicked");
        let row = table.entry(kind).or_default();
        row.runs += 1;
        row.millis.push(elapsed.as_secs_f64() * 1e3);
        row.cost += cost;
        match result {
            Ok(_) => row.ok += 1,
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    println!("done in {:.0} ms\n", started.elapsed().as_secs_f64() * 1e3);
    println!(
        "{:<10} {:>5} {:>9} {:>8} {:>8} {:>11}",
        "task_type", "runs", "success", "avg_ms", "p95_ms", "cost_cents"
    );
    for (kind, mut row) in table {
        row.millis.sort_by(f64::total_cmp);
        let avg = row.millis.iter().sum::<f64>() / row.millis.len() as f64;
        let p95 = row.millis[(row.millis.len() * 95 / 100).min(row.millis.len() - 1)];
        println!(
            "{:<10} {:>5} {:>8.1}% {:>8.1} {:>8.1} {:>11}",
            kind,
            row.runs,
            100.0 * f64::from(row.ok) / f64::from(row.runs),
            avg,
            p95,
            row.cost
        );
    }
    if let Some(e) = first_error {
        println!("\nexample failure: {e}");
    }
}
