//! The LLM-request workflow: route a request by task type (simple, medium, complex)
//! to a model tier and provider, call an OpenAI-compatible chat-completions endpoint
//! over HTTP, and record what the call cost.
//!
//! The endpoint is `LLM_BASE_URL` (`POST {base}/v1/chat/completions`, bearer
//! `LLM_API_KEY` if set); [`StubEndpoint`] is a small local endpoint answering in
//! that format — with usage tokens, an occasional `429 Too Many Requests` and
//! `500` — so everything runs offline. HTTP 429 and 5xx are retryable (a
//! `Retry-After` header sets the delay), other 4xx are permanent. HTTPS needs the
//! root package's `tls` feature.
//!
//! [`LlmBatch`] sends many prompts as one provider *batch job* (cheaper, slower:
//! `POST {base}/v1/batches`, then `GET {base}/v1/batches/{id}` until it is
//! `completed`) and polls it with `StepError::snooze`: no worker slot is held between
//! polls and the polls do not count as attempts. The stub implements that endpoint
//! (a simplified form of a provider's batch API: the requests travel inline), with a
//! job that completes after a few polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgflow::{StepContext, StepError, workflow};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// What a caller asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlmInput {
    /// The caller's id for the request.
    pub request_id: String,
    /// `simple`, `medium` or `complex`.
    pub task_type: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Who asks: the run's key, which the per-tenant daily budget counts under
    /// (`""` when absent).
    #[serde(default)]
    pub tenant: String,
}

/// A model tier with its price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routed {
    /// Provider name.
    pub provider: String,
    /// Model name, as the endpoint knows it.
    pub model: String,
    /// Price per million prompt tokens, in cents.
    pub prompt_cents_per_mtok: i64,
    /// Price per million completion tokens, in cents.
    pub completion_cents_per_mtok: i64,
    /// The conversation.
    pub messages: Vec<Message>,
}

/// The provider's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The model that answered.
    pub model: String,
    /// The text.
    pub text: String,
    /// Prompt tokens used.
    pub prompt_tokens: i64,
    /// Completion tokens used.
    pub completion_tokens: i64,
    /// The tier's prices.
    pub prompt_cents_per_mtok: i64,
    /// The tier's prices.
    pub completion_cents_per_mtok: i64,
}

/// The workflow's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The caller's id.
    pub request_id: String,
    /// The model that answered.
    pub model: String,
    /// The text.
    pub text: String,
    /// Tokens used, prompt + completion.
    pub tokens: i64,
    /// What the call cost, in cents (rounded up).
    pub cost_cents: i64,
}

/// The HTTP client and endpoint, shared by the runtime's steps (`.data(..)`).
#[derive(Debug, Clone)]
pub struct LlmClient {
    /// The client.
    pub http: reqwest::Client,
    /// `http://host:port`, without a trailing slash.
    pub base_url: String,
    /// Bearer token, if any.
    pub api_key: Option<String>,
    /// How long a batch job is left alone between two polls.
    pub batch_poll: Duration,
}

impl LlmClient {
    /// A client for `base_url` with a 20 s request timeout.
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()?,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            batch_poll: Duration::from_secs(30),
        })
    }
}

impl LlmClient {
    /// The client the example programs use: `LLM_BASE_URL` (with `LLM_API_KEY`, if
    /// set), or else a [`StubEndpoint`] started here that fails every 7th call with
    /// 429 or 500. Returns the stub too when one was started.
    ///
    /// # Errors
    ///
    /// When the stub cannot listen or the client cannot be built.
    pub async fn from_env()
    -> Result<(Self, Option<StubEndpoint>), Box<dyn std::error::Error + Send + Sync>> {
        let key = std::env::var("LLM_API_KEY").ok();
        match std::env::var("LLM_BASE_URL") {
            Ok(base) if !base.is_empty() => Ok((Self::new(&base, key)?, None)),
            _ => {
                let stub = StubEndpoint::start(7).await?;
                Ok((Self::new(&stub.base_url, key)?, Some(stub)))
            }
        }
    }
}

/// The price table: (provider, model, prompt, completion) cents per million tokens.
pub const TIERS: &[(&str, &str, &str, i64, i64)] = &[
    ("simple", "gemini", "gemini-2.0-flash", 10, 40),
    ("medium", "anthropic", "claude-sonnet", 300, 1_500),
    ("complex", "anthropic", "claude-opus", 1_500, 7_500),
];

/// Routes, calls, records.
pub struct LlmRequest;

#[workflow(
    name = "llm_request",
    version = 2,
    queue = "llm",
    max_attempts = 4,
    timeout = "30s",
    backoff = "50ms",
    key = Self::tenant
)]
impl LlmRequest {
    #[step]
    async fn select_model(req: LlmInput) -> Result<Routed, StepError> {
        let Some((_, provider, model, p, c)) = TIERS.iter().find(|t| t.0 == req.task_type) else {
            return Err(StepError::permanent(format!(
                "unknown task type `{}`: expected simple, medium or complex",
                req.task_type
            )));
        };
        if req.messages.is_empty() {
            return Err(StepError::permanent("a request needs at least one message"));
        }
        Ok(Routed {
            provider: (*provider).to_owned(),
            model: (*model).to_owned(),
            prompt_cents_per_mtok: *p,
            completion_cents_per_mtok: *c,
            messages: req.messages,
        })
    }

    /// Counts against the provider's tokens per minute and the tenant's cents per
    /// day (see [`limits`]): reserved at the estimates, settled to the `usage` the
    /// provider reports.
    #[step(
        timeout = "25s",
        max_attempts = 6,
        limits = ["provider_tokens", "tenant_daily"],
        estimate_tokens = 2000,
        estimate_cents = 5
    )]
    async fn call_provider(routed: Routed, ctx: &StepContext) -> Result<Completion, StepError> {
        let client = ctx.data::<LlmClient>()?;
        let mut request = client
            .http
            .post(format!("{}/v1/chat/completions", client.base_url))
            .json(&json!({ "model": routed.model, "messages": routed.messages }));
        if let Some(key) = &client.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?; // network errors: retryable
        let status = response.status();
        if status.as_u16() == 429 || status.is_server_error() {
            let after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let msg = format!("{} answered HTTP {status}", routed.provider);
            return Err(match after {
                Some(secs) => StepError::retry_after(Duration::from_secs(secs), msg),
                None => StepError::retryable(msg),
            });
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(StepError::permanent(format!(
                "{} refused the request: HTTP {status}: {}",
                routed.provider,
                body.chars().take(200).collect::<String>()
            )));
        }
        let body: serde_json::Value = response.json().await?;
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                StepError::permanent("the response has no choices[0].message.content")
            })?;
        let done = Completion {
            model: body["model"].as_str().unwrap_or(&routed.model).to_owned(),
            text: text.to_owned(),
            prompt_tokens: body["usage"]["prompt_tokens"].as_i64().unwrap_or(0),
            completion_tokens: body["usage"]["completion_tokens"].as_i64().unwrap_or(0),
            prompt_cents_per_mtok: routed.prompt_cents_per_mtok,
            completion_cents_per_mtok: routed.completion_cents_per_mtok,
        };
        // the provider's `usage` field, priced: the usage ledger, by model, and what
        // the limits settle to
        let tokens = |n: i64| u64::try_from(n).unwrap_or(0);
        ctx.add_usage(
            &done.model,
            tokens(done.prompt_tokens),
            tokens(done.completion_tokens),
            cost_cents(&done),
        );
        Ok(done)
    }

    /// The answer (the cost was reported by `call_provider`).
    #[step]
    async fn record(done: Completion, input: LlmInput) -> Result<Answer, StepError> {
        let cost = cost_cents(&done);
        Ok(Answer {
            request_id: input.request_id,
            model: done.model,
            text: done.text,
            tokens: done.prompt_tokens + done.completion_tokens,
            cost_cents: cost,
        })
    }

    fn tenant(req: &LlmInput) -> &str {
        &req.tenant
    }
}

/// The limits `llm_request`'s provider calls count against, defined on every runtime
/// that serves queue `llm`: the provider's quota of 2,000,000 tokens a minute (a rate
/// limit: a call over it waits for the next minute), and a budget of 500 cents a day
/// per tenant (past it, the tenant's runs fail with `BudgetExceeded`).
pub fn limits(builder: pgflow_runtime::RuntimeBuilder) -> pgflow_runtime::RuntimeBuilder {
    use pgflow_runtime::Limit;
    builder
        .limit(Limit::tokens("provider_tokens", 2_000_000).per(Duration::from_secs(60)))
        .limit(
            Limit::cents("tenant_daily", 500)
                .per(Duration::from_secs(86_400))
                .per_key()
                .fail_when_exceeded(),
        )
}

/// Usage tokens times the tier's prices, rounded up to whole cents.
pub fn cost_cents(c: &Completion) -> i64 {
    let micro = c.prompt_tokens * c.prompt_cents_per_mtok
        + c.completion_tokens * c.completion_cents_per_mtok;
    (micro + 999_999) / 1_000_000
}

/// What [`LlmBatch`] asks for: prompts answered by one model as one batch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchInput {
    /// The caller's id for the batch.
    pub batch_ref: String,
    /// A tier of [`TIERS`] (`simple`, `medium`, `complex`).
    pub task_type: String,
    /// One user prompt per request.
    pub prompts: Vec<String>,
}

/// A submitted batch job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmittedBatch {
    /// The provider's job id.
    pub job_id: String,
    /// The model.
    pub model: String,
    /// The tier's prices, cents per million prompt / completion tokens.
    pub prices: (i64, i64),
}

/// A batch job's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchAnswer {
    /// The caller's id for the batch.
    pub batch_ref: String,
    /// The model.
    pub model: String,
    /// One answer per prompt, in order.
    pub answers: Vec<String>,
    /// Tokens used, prompt + completion, over the batch.
    pub tokens: i64,
    /// What the batch cost, in cents (rounded up).
    pub cost_cents: i64,
}

/// Submits prompts as one batch job, polls it with `snooze` until it completes,
/// records the cost.
pub struct LlmBatch;

#[workflow(name = "llm_batch", queue = "llm", max_attempts = 4, backoff = "50ms")]
impl LlmBatch {
    #[step]
    async fn submit(req: BatchInput, ctx: &StepContext) -> Result<SubmittedBatch, StepError> {
        let Some((_, _, model, p, c)) = TIERS.iter().find(|t| t.0 == req.task_type) else {
            return Err(StepError::permanent(format!(
                "unknown task type `{}`: expected simple, medium or complex",
                req.task_type
            )));
        };
        let client = ctx.data::<LlmClient>()?;
        let requests: Vec<serde_json::Value> = req
            .prompts
            .iter()
            .map(|p| json!({ "model": model, "messages": [{"role": "user", "content": p}] }))
            .collect();
        let body = client
            .send(
                client
                    .http
                    .post(format!("{}/v1/batches", client.base_url))
                    .json(&json!({ "metadata": { "ref": req.batch_ref }, "requests": requests })),
            )
            .await?;
        let job_id = body["id"]
            .as_str()
            .ok_or_else(|| StepError::permanent("the batch response has no id"))?;
        Ok(SubmittedBatch {
            job_id: job_id.to_owned(),
            model: (*model).to_owned(),
            prices: (*p, *c),
        })
    }

    /// Asks for the job's status; while it runs, snoozes for `LlmClient::batch_poll`
    /// (at most 720 times: six hours of 30 s polls).
    #[step(max_snoozes = 720)]
    async fn wait_for_batch(
        submit: SubmittedBatch,
        ctx: &StepContext,
    ) -> Result<Vec<Completion>, StepError> {
        let client = ctx.data::<LlmClient>()?;
        let url = format!("{}/v1/batches/{}", client.base_url, submit.job_id);
        let body = client.send(client.http.get(url)).await?;
        match body["status"].as_str() {
            Some("completed") => {}
            Some("failed" | "expired" | "cancelled") => {
                return Err(StepError::permanent(format!(
                    "batch job {} ended as {}",
                    submit.job_id, body["status"]
                )));
            }
            _ => return Err(StepError::snooze(client.batch_poll)),
        }
        let results = body["results"]
            .as_array()
            .ok_or_else(|| StepError::permanent("a completed batch has no results"))?;
        results
            .iter()
            .map(|r| {
                Ok(Completion {
                    model: submit.model.clone(),
                    text: r["choices"][0]["message"]["content"]
                        .as_str()
                        .ok_or_else(|| StepError::permanent("a batch result has no content"))?
                        .to_owned(),
                    prompt_tokens: r["usage"]["prompt_tokens"].as_i64().unwrap_or(0),
                    completion_tokens: r["usage"]["completion_tokens"].as_i64().unwrap_or(0),
                    prompt_cents_per_mtok: submit.prices.0,
                    completion_cents_per_mtok: submit.prices.1,
                })
            })
            .collect()
    }

    #[step]
    async fn record_batch(
        wait_for_batch: Vec<Completion>,
        input: BatchInput,
        ctx: &StepContext,
    ) -> Result<BatchAnswer, StepError> {
        let cost: i64 = wait_for_batch.iter().map(cost_cents).sum();
        ctx.add_cost_cents(cost);
        Ok(BatchAnswer {
            batch_ref: input.batch_ref,
            model: wait_for_batch
                .first()
                .map_or_else(String::new, |c| c.model.clone()),
            tokens: wait_for_batch
                .iter()
                .map(|c| c.prompt_tokens + c.completion_tokens)
                .sum(),
            answers: wait_for_batch.into_iter().map(|c| c.text).collect(),
            cost_cents: cost,
        })
    }
}

impl LlmClient {
    /// Sends a request with the bearer token; HTTP 429 and 5xx are retryable (with
    /// `Retry-After`), other errors permanent; returns the JSON body.
    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<serde_json::Value, StepError> {
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await?;
        let status = response.status();
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(StepError::retryable(format!(
                "the provider answered HTTP {status}"
            )));
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(StepError::permanent(format!(
                "the provider refused the request: HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        Ok(response.json().await?)
    }
}

/// A local OpenAI-compatible chat-completions endpoint. Every `fail_every`-th
/// request answers `429` (with `Retry-After: 0`) or `500` alternately; the others
/// answer with a completion whose usage is derived from the prompt's length.
#[derive(Debug)]
pub struct StubEndpoint {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// Requests answered so far.
    pub requests: Arc<AtomicU64>,
    /// Batch status requests answered so far (polls).
    pub batch_polls: Arc<AtomicU64>,
}

/// Batch jobs of a [`StubEndpoint`]: per job, the polls left before it completes and
/// its requests.
type Batches = Arc<Mutex<HashMap<String, (u32, Vec<serde_json::Value>)>>>;

/// How many status polls a stub batch job answers `in_progress` before `completed`.
pub const STUB_BATCH_POLLS: u32 = 3;

impl StubEndpoint {
    /// Starts the endpoint on an ephemeral port of 127.0.0.1.
    ///
    /// # Errors
    ///
    /// When it cannot listen.
    pub async fn start(fail_every: u64) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(AtomicU64::new(0));
        let batch_polls = Arc::new(AtomicU64::new(0));
        let batches: Batches = Arc::default();
        let counter = Arc::clone(&requests);
        let polls = Arc::clone(&batch_polls);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                let polls = Arc::clone(&polls);
                let batches = Arc::clone(&batches);
                tokio::spawn(async move {
                    let Some((target, body)) = read_request(&mut stream).await else {
                        return;
                    };
                    let reply = if target.starts_with("POST /v1/batches") {
                        stub_batch_create(&batches, &body)
                    } else if let Some(id) = target.strip_prefix("GET /v1/batches/") {
                        polls.fetch_add(1, Ordering::Relaxed);
                        stub_batch_status(&batches, id.split_whitespace().next().unwrap_or(""))
                    } else {
                        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                        stub_reply(n, fail_every, &body)
                    };
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Self {
            base_url,
            requests,
            batch_polls,
        })
    }
}

/// Reads one HTTP/1.1 request and returns its request line (`GET /path HTTP/1.1`)
/// and its body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = stream.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let line = String::from_utf8_lossy(&buf[..end])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            return Some((line, buf[end + 4..end + 4 + len].to_vec()));
        }
    }
}

fn http(status: &str, extra: &str, json: String) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{json}",
        json.len()
    )
}

/// `POST /v1/batches`: stores the job (completing after [`STUB_BATCH_POLLS`] polls).
fn stub_batch_create(batches: &Batches, body: &[u8]) -> String {
    let requests = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["requests"].as_array().cloned());
    let Some(requests) = requests else {
        return http(
            "400 Bad Request",
            "",
            json!({"error": {"message": "expected {\"requests\": [..]}"}}).to_string(),
        );
    };
    let Ok(mut jobs) = batches.lock() else {
        return http("500 Internal Server Error", "", "{}".to_owned());
    };
    let id = format!("batch_{}", jobs.len() + 1);
    jobs.insert(id.clone(), (STUB_BATCH_POLLS, requests));
    http(
        "200 OK",
        "",
        json!({"id": id, "status": "in_progress"}).to_string(),
    )
}

/// `GET /v1/batches/{id}`: `in_progress` until the job's polls run out, then
/// `completed` with one chat completion per request.
fn stub_batch_status(batches: &Batches, id: &str) -> String {
    let Ok(mut jobs) = batches.lock() else {
        return http("500 Internal Server Error", "", "{}".to_owned());
    };
    let Some((left, requests)) = jobs.get_mut(id) else {
        return http(
            "404 Not Found",
            "",
            json!({"error": {"message": format!("no batch {id}")}}).to_string(),
        );
    };
    if *left > 0 {
        *left -= 1;
        return http(
            "200 OK",
            "",
            json!({"id": id, "status": "in_progress"}).to_string(),
        );
    }
    let results: Vec<serde_json::Value> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let reply = stub_reply(0, 0, r.to_string().as_bytes());
            let body = reply.split("\r\n\r\n").nth(1).unwrap_or("{}");
            let mut v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            v["custom_id"] = json!(i);
            v
        })
        .collect();
    http(
        "200 OK",
        "",
        json!({"id": id, "status": "completed", "results": results}).to_string(),
    )
}

fn stub_reply(n: u64, fail_every: u64, body: &[u8]) -> String {
    if fail_every > 0 && n % fail_every == 0 {
        return if (n / fail_every) % 2 == 1 {
            http(
                "429 Too Many Requests",
                "retry-after: 0\r\n",
                json!({"error": {"message": "rate limited"}}).to_string(),
            )
        } else {
            http(
                "500 Internal Server Error",
                "",
                json!({"error": {"message": "overloaded"}}).to_string(),
            )
        };
    }
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
        return http(
            "400 Bad Request",
            "",
            json!({"error": {"message": "invalid JSON"}}).to_string(),
        );
    };
    let model = req["model"].as_str().unwrap_or("unknown").to_owned();
    let prompt: String = req["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["content"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let words = prompt.split_whitespace().count() as i64;
    let answer = format!("[{model}] you said {words} words");
    let completion_tokens = 400 + 37 * words;
    http(
        "200 OK",
        "",
        json!({
            "id": format!("chatcmpl-{n}"),
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": answer}}],
            "usage": {"prompt_tokens": 12 * words + 8, "completion_tokens": completion_tokens,
                      "total_tokens": 12 * words + 8 + completion_tokens},
        })
        .to_string(),
    )
}
