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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    queue = "llm",
    max_attempts = 4,
    timeout = "30s",
    backoff = "50ms"
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

    #[step(timeout = "25s", max_attempts = 6)]
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
        Ok(Completion {
            model: body["model"].as_str().unwrap_or(&routed.model).to_owned(),
            text: text.to_owned(),
            prompt_tokens: body["usage"]["prompt_tokens"].as_i64().unwrap_or(0),
            completion_tokens: body["usage"]["completion_tokens"].as_i64().unwrap_or(0),
            prompt_cents_per_mtok: routed.prompt_cents_per_mtok,
            completion_cents_per_mtok: routed.completion_cents_per_mtok,
        })
    }

    #[step]
    async fn record(
        done: Completion,
        input: LlmInput,
        ctx: &StepContext,
    ) -> Result<Answer, StepError> {
        let cost = cost_cents(&done);
        ctx.add_cost_cents(cost);
        Ok(Answer {
            request_id: input.request_id,
            model: done.model,
            text: done.text,
            tokens: done.prompt_tokens + done.completion_tokens,
            cost_cents: cost,
        })
    }
}

/// Usage tokens times the tier's prices, rounded up to whole cents.
pub fn cost_cents(c: &Completion) -> i64 {
    let micro = c.prompt_tokens * c.prompt_cents_per_mtok
        + c.completion_tokens * c.completion_cents_per_mtok;
    (micro + 999_999) / 1_000_000
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
}

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
        let counter = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
                    let Some(body) = read_request(&mut stream).await else {
                        return;
                    };
                    let reply = stub_reply(n, fail_every, &body);
                    let _ = stream.write_all(reply.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(Self { base_url, requests })
    }
}

/// Reads one HTTP/1.1 request and returns its body.
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
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
            return Some(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}

fn stub_reply(n: u64, fail_every: u64, body: &[u8]) -> String {
    let http = |status: &str, extra: &str, json: String| {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n{json}",
            json.len()
        )
    };
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
