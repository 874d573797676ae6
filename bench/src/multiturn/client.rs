//! One streaming chat completion over the OpenAI-compatible HTTP API, timed: what any
//! OpenAI-compatible server answers (Switchyard's router, llama.cpp's `llama-server`, SMG) — no
//! server-specific fields are required, and the optional ones (`usage`'s cached tokens,
//! Switchyard's `x-switchyard-worker` header) are reported as unknown when absent.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde::Serialize;
use serde_json::{Value, json};
use switchyard_worker_wse::sse::SseParser;

/// One chat message as the API takes it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

/// What one request needs besides its messages.
#[derive(Debug, Clone)]
pub struct ChatTarget {
    /// `…/v1/chat/completions`.
    pub endpoint: String,
    pub model: String,
    pub max_tokens: u32,
    pub api_key: Option<String>,
    /// Extra request headers (`name`, `value`).
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// The measured outcome of one streamed reply.
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: String,
    /// From the request being sent to the first non-empty content delta.
    pub ttft: Duration,
    /// `usage.completion_tokens`, else the number of content chunks.
    pub completion_tokens: u64,
    pub prompt_tokens: Option<u64>,
    /// `usage.prompt_tokens_details.cached_tokens`; `None` when the server does not report it.
    pub cached_tokens: Option<u64>,
    /// `x-switchyard-worker` response header (Switchyard only).
    pub worker: Option<String>,
}

/// Sends one greedy streaming chat completion and reads it to the end.
pub async fn chat(
    client: &reqwest::Client,
    target: &ChatTarget,
    messages: &[Message],
    user: Option<&str>,
) -> anyhow::Result<Reply> {
    let mut body = json!({
        "model": target.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": target.max_tokens,
        "temperature": 0.0,
    });
    if let Some(user) = user {
        body["user"] = json!(user);
    }
    let mut request = client
        .post(&target.endpoint)
        .timeout(target.timeout)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string());
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    for (name, value) in &target.headers {
        request = request.header(name, value);
    }
    let start = Instant::now();
    let response = request
        .send()
        .await
        .with_context(|| format!("POST {}", target.endpoint))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("POST {} answered {status}: {text}", target.endpoint);
    }
    let worker = response
        .headers()
        .get("x-switchyard-worker")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);

    let mut parser = SseParser::default();
    let mut stream = response.bytes_stream();
    let mut content = String::new();
    let mut ttft = None;
    let mut chunks = 0u64;
    let mut usage: Option<Value> = None;
    let mut done = false;
    'read: while let Some(bytes) = stream.next().await {
        let bytes = bytes.context("reading the event stream")?;
        for event in parser.push(&bytes)? {
            if event.data == "[DONE]" {
                done = true;
                break 'read;
            }
            let chunk: Value = serde_json::from_str(&event.data)
                .with_context(|| format!("event is not JSON: {}", event.data))?;
            if let Some(error) = chunk.get("error") {
                bail!("the stream failed: {error}");
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                usage = Some(u.clone());
            }
            let delta = chunk["choices"][0]["delta"]["content"].as_str();
            if let Some(text) = delta.filter(|t| !t.is_empty()) {
                ttft.get_or_insert_with(|| start.elapsed());
                content.push_str(text);
                chunks += 1;
            }
        }
    }
    if !done {
        bail!("the event stream ended without [DONE]");
    }
    let total = start.elapsed();
    let field = |path: &[&str]| {
        let mut v = usage.as_ref()?;
        for key in path {
            v = v.get(*key)?;
        }
        v.as_u64()
    };
    Ok(Reply {
        // A reply that produced no text (immediate end of sequence) has its first token at the end.
        ttft: ttft.unwrap_or(total),
        completion_tokens: field(&["completion_tokens"]).unwrap_or(chunks),
        prompt_tokens: field(&["prompt_tokens"]),
        cached_tokens: field(&["prompt_tokens_details", "cached_tokens"]),
        content,
        worker,
    })
}
