//! The `gateway` engine: streams generations from an OpenAI-compatible wafer-scale endpoint
//! (for example a WSE inference API) over pooled keep-alive connections — HTTP/2 where the
//! endpoint offers it through TLS ALPN, HTTP/1.1 keep-alive otherwise.
//!
//! - **Slots.** A wafer serves a fixed number of sequences: `max_concurrent` permits; a start
//!   beyond them is refused at once with `ResourceExhausted` so the router places it elsewhere.
//! - **Streaming.** Chat prompts go to `{base}/chat/completions`, raw prompts to
//!   `{base}/completions`, always with `stream: true`; the SSE body is parsed incrementally
//!   ([`crate::sse`]) and every content delta becomes one `EngineEvent::Token`. The upstream
//!   does not expose token ids, so a token's `id` is its chunk ordinal, and resuming another
//!   worker's generation (`resume_tokens`) is refused as `Unavailable`. A generation has no
//!   task of its own: the worker's reader drives it ([`EngineStream::driven`]), so an upstream
//!   chunk reaches the router's stream without a hand-off between tasks, and a reader out of
//!   flow-control credit stops reading the upstream.
//! - **Tools** pass through in OpenAI's terms: the request's functions as `tools`, its choice as
//!   `tool_choice` (and `parallel_tool_calls: false` for a single call), earlier calls and their
//!   results as the messages' `tool_calls` and `tool_call_id`; every element of a streamed
//!   `delta.tool_calls` becomes one `EngineEvent::ToolCall` with the upstream's index, and a
//!   turn that called tools ends with `StopReason::ToolCalls`. A raw prompt cannot carry
//!   tools (the endpoint takes them for chats only) and is refused.
//! - **Cancel** drops the upstream response at once (its connection closes or its HTTP/2 stream
//!   is reset), which stops the upstream generation.
//! - **Faults** (connection refused, timeouts, HTTP errors, malformed SSE, a stream cut off
//!   before `[DONE]`) end the generation with a clear error: `Unavailable` while nothing was
//!   streamed (the router may retry elsewhere), `Internal` after text or a tool call (a retry
//!   would repeat it). A malformed `delta.tool_calls` is a malformed chunk like any other.
//!   An upstream `429` is `ResourceExhausted`, like a full local slot.
//! - **Usage** reported by the upstream is passed to `Done`; without it, completion tokens are
//!   the chunks of output (text or tool calls) forwarded.
//!
//! The API key is sent as a bearer token and never logged (its `Debug` is redacted).

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use switchyard_proto::v1;
use switchyard_worker::RateMeter;
use switchyard_worker::engine::EngineLoad;
use switchyard_worker::{
    Engine, EngineError, EngineEvent, EngineRequest, EngineStream, Message, Prompt, Sampling,
    StopReason, Tools,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::sse::{SseError, SseParser};

/// An upstream API key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{field}: {message}")]
    Config {
        field: &'static str,
        message: String,
    },
    #[error("building the http client: {0}")]
    Client(#[from] reqwest::Error),
}

fn config_error(field: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::Config {
        field,
        message: message.into(),
    }
}

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Result<Self, GatewayError> {
        let key = key.into().trim().to_string();
        if key.is_empty() {
            return Err(config_error("api key", "is empty"));
        }
        if key.chars().any(|c| c.is_control() || c == ' ') {
            return Err(config_error(
                "api key",
                "contains whitespace or control characters",
            ));
        }
        Ok(Self(key))
    }

    /// Reads the key from environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self, GatewayError> {
        let value = std::env::var(name).map_err(|_| {
            config_error(
                "--gateway-api-key-env",
                format!("environment variable {name} is not set (or not UTF-8)"),
            )
        })?;
        Self::new(value).map_err(|_| {
            config_error(
                "--gateway-api-key-env",
                format!("environment variable {name} holds no usable key"),
            )
        })
    }

    /// Reads the key from the first line of file `path`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(
                "--gateway-api-key-file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Self::new(text.lines().next().unwrap_or_default()).map_err(|_| {
            config_error(
                "--gateway-api-key-file",
                format!("{} holds no usable key", path.display()),
            )
        })
    }
}

/// Everything the gateway engine needs.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The endpoint's API base, e.g. `https://api.example.com/v1` (paths `/chat/completions`
    /// and `/completions` are appended).
    pub base_url: String,
    /// `(local model, upstream model)`: the names workers advertise and the names the
    /// endpoint knows them by.
    pub models: Vec<(String, String)>,
    pub api_key: Option<ApiKey>,
    pub max_concurrent: u32,
    pub connect_timeout: Duration,
    /// Longest wait for the response headers and between two body chunks.
    pub chunk_timeout: Duration,
    /// Expected decode rate of one stream, advertised for placement.
    pub tokens_per_s: f64,
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<(), GatewayError> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| {
            config_error(
                "--gateway-url",
                format!("{:?} is not a URL: {e}", self.base_url),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(config_error(
                "--gateway-url",
                format!(
                    "{:?} must be an http:// or https:// URL with a host",
                    self.base_url
                ),
            ));
        }
        if self.models.is_empty() {
            return Err(config_error("--model", "serve at least one model"));
        }
        for (local, upstream) in &self.models {
            if local.trim().is_empty() || upstream.trim().is_empty() {
                return Err(config_error(
                    "--gateway-model-map",
                    "model names must not be empty",
                ));
            }
        }
        if self.max_concurrent == 0 {
            return Err(config_error("--max-concurrent", "must be at least 1"));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error(
                "--gateway-connect-timeout",
                "must be positive",
            ));
        }
        if self.chunk_timeout.is_zero() {
            return Err(config_error("--gateway-chunk-timeout", "must be positive"));
        }
        if self.tokens_per_s.is_nan() || self.tokens_per_s <= 0.0 {
            return Err(config_error("--gateway-tokens-per-s", "must be positive"));
        }
        Ok(())
    }
}

/// Parses `local=upstream` (or just `name`, the same on both sides).
pub fn parse_model_mapping(spec: &str) -> Result<(String, String), String> {
    let (local, upstream) = spec.split_once('=').unwrap_or((spec, spec));
    let (local, upstream) = (local.trim(), upstream.trim());
    if local.is_empty() || upstream.is_empty() {
        return Err(format!(
            "model mapping {spec:?} must be local=upstream with both names non-empty"
        ));
    }
    Ok((local.to_string(), upstream.to_string()))
}

#[derive(Debug)]
pub struct GatewayEngine {
    config: GatewayConfig,
    client: reqwest::Client,
    slots: Arc<Semaphore>,
    base: String,
    prefill: Arc<PrefillMeter>,
}

/// The gateway's own prefill estimate for load reports: the endpoint reports no queue, so the
/// gateway counts the prompt tokens (estimated at 4 bytes per token, as the router does) of
/// generations still waiting for their first token, and measures a moving average of prompt
/// tokens over time to first token (endpoint overhead included, so it errs slow).
#[derive(Debug, Default)]
struct PrefillMeter {
    unprefilled: AtomicU64,
    /// Prompt tokens per second to the first token.
    rate: RateMeter,
}

/// One generation's prompt, counted as not prefilled until its first token or its end.
#[derive(Debug)]
struct PendingPrompt {
    meter: Arc<PrefillMeter>,
    tokens: u64,
    started: Instant,
}

impl PendingPrompt {
    fn new(meter: Arc<PrefillMeter>, tokens: u64) -> Self {
        meter.unprefilled.fetch_add(tokens, Ordering::Relaxed);
        Self {
            meter,
            tokens,
            started: Instant::now(),
        }
    }

    /// The first token arrived: fold this prompt's rate into the average.
    fn first_token(self) {
        self.meter
            .rate
            .record(self.tokens as f64, self.started.elapsed().as_secs_f64());
    }
}

impl Drop for PendingPrompt {
    fn drop(&mut self) {
        self.meter
            .unprefilled
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// Prompt tokens of `prompt`, estimated at 4 bytes per token (the router's estimate).
fn estimated_prompt_tokens(prompt: &Prompt) -> u64 {
    let bytes = match prompt {
        Prompt::Text(text) => text.len(),
        Prompt::Chat(messages) => messages.iter().map(|m| m.content.len() + 4).sum(),
    };
    (bytes as u64).div_ceil(4).max(1)
}

impl GatewayEngine {
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        config.validate()?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(config.max_concurrent as usize)
            .pool_idle_timeout(Duration::from_secs(90))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .http2_keep_alive_while_idle(true)
            .user_agent(concat!("switchyard-worker-wse/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let base = config.base_url.trim_end_matches('/').to_string();
        let slots = Arc::new(Semaphore::new(config.max_concurrent as usize));
        info!(base = %base, models = ?config.models, max_concurrent = config.max_concurrent, authenticated = config.api_key.is_some(), "wse gateway engine");
        Ok(Self {
            config,
            client,
            slots,
            base,
            prefill: Arc::default(),
        })
    }

    fn upstream_model(&self, local: &str) -> Option<&str> {
        self.config
            .models
            .iter()
            .find(|(l, _)| l == local)
            .map(|(_, u)| u.as_str())
    }

    /// Slots in use right now.
    pub fn active(&self) -> u32 {
        self.config.max_concurrent - self.slots.available_permits() as u32
    }
}

impl Engine for GatewayEngine {
    fn kind(&self) -> &'static str {
        "wse-gateway"
    }

    fn models(&self) -> Vec<String> {
        self.config.models.iter().map(|(l, _)| l.clone()).collect()
    }

    fn max_concurrent(&self) -> u32 {
        self.config.max_concurrent
    }

    fn tokens_per_s(&self) -> f64 {
        self.config.tokens_per_s
    }

    fn hardware(&self) -> String {
        format!("wafer-scale endpoint {}", self.base)
    }

    fn load(&self) -> EngineLoad {
        // No queue: a start beyond the slots is refused.
        EngineLoad {
            queued_prompt_tokens: self.prefill.unprefilled.load(Ordering::Relaxed),
            prefill_tokens_per_s: self.prefill.rate.get(),
            ..EngineLoad::default()
        }
    }

    fn submit(
        &self,
        request: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        let upstream_model = self.upstream_model(&request.model).ok_or_else(|| {
            EngineError::InvalidArgument(format!(
                "model: {:?} is not served here (serving {:?})",
                request.model,
                self.models()
            ))
        })?;
        if !request.resume_tokens.is_empty() {
            return Err(EngineError::Unavailable(
                "resume_tokens: the wse gateway cannot continue another worker's generation".into(),
            ));
        }
        if !request.tools.tools.is_empty() && matches!(request.prompt, Prompt::Text(_)) {
            return Err(EngineError::invalid_field(
                "tools",
                "need a chat (messages); a text prompt cannot call tools",
            ));
        }
        let tools = upstream_tools(&request.tools)?;
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            EngineError::ResourceExhausted(format!(
                "all {} wafer slots are busy",
                self.config.max_concurrent
            ))
        })?;
        let sampling = &request.sampling;
        let (url, mut body, chat) = match &request.prompt {
            Prompt::Chat(messages) => {
                let messages: Vec<Value> = messages.iter().map(upstream_message).collect();
                (
                    format!("{}/chat/completions", self.base),
                    json!({"model": upstream_model, "messages": messages}),
                    true,
                )
            }
            Prompt::Text(prompt) => (
                format!("{}/completions", self.base),
                json!({"model": upstream_model, "prompt": prompt}),
                false,
            ),
        };
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        set_sampling(&mut body, sampling, chat);
        if let Some(tools) = tools {
            for (field, value) in tools {
                body[field] = value;
            }
        }
        let mut http = self
            .client
            .post(url)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(key) = &self.config.api_key {
            http = http.bearer_auth(&key.0);
        }
        let (tx, rx) = mpsc::channel(64);
        let generation = Generation {
            pending: Some(PendingPrompt::new(
                self.prefill.clone(),
                estimated_prompt_tokens(&request.prompt),
            )),
            request_id: request.request_id,
            chat,
            logprobs: request.sampling.logprobs.is_some(),
            chunk_timeout: self.config.chunk_timeout,
            tx,
            streamed: 0,
            tool_chunks: 0,
        };
        // Driven by the worker's reader in its own task: a token costs no task hand-off.
        Ok(EngineStream::driven(
            rx,
            generation.run(http, permit, cancel),
        ))
    }
}

/// One upstream generation.
struct Generation {
    /// The prompt, until the first token (declared first: dropped before `tx`, so whoever sees
    /// the stream end sees the load without it).
    pending: Option<PendingPrompt>,
    request_id: String,
    chat: bool,
    /// The request asked for log probabilities: the upstream's are passed on.
    logprobs: bool,
    chunk_timeout: Duration,
    tx: mpsc::Sender<Result<EngineEvent, EngineError>>,
    /// Content chunks forwarded so far.
    streamed: u32,
    /// Chunks that carried pieces of tool calls, forwarded so far.
    tool_chunks: u32,
}

/// How one upstream generation ended.
enum End {
    Done {
        reason: StopReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// The stop sequence that ended the answer, when the upstream named it.
        stop_sequence: Option<String>,
    },
    /// The worker's reader is gone: nobody to tell.
    ReaderGone,
    Fault(String),
    /// The endpoint is at capacity (HTTP 429): the router should place the request elsewhere.
    Busy(String),
    /// The endpoint refused the prompt (or prompt and output bound) as longer than its
    /// model's context: the client's to shorten, as a router's own context check would say.
    TooLong(String),
}

#[derive(Default)]
struct Progress {
    finish_reason: Option<String>,
    /// vLLM's `stop_reason` (Switchyard's OpenAI door's too): the stop sequence that matched.
    stop_sequence: Option<String>,
    prompt_tokens: Option<u32>,
    completion_tokens: Option<u32>,
}

impl Generation {
    async fn run(
        mut self,
        http: reqwest::RequestBuilder,
        permit: OwnedSemaphorePermit,
        cancel: CancellationToken,
    ) {
        let end = tokio::select! {
            // Dropping the other branch drops the upstream request or response: the connection
            // closes (HTTP/1.1) or the stream is reset (HTTP/2), and the upstream stops.
            _ = cancel.cancelled() => None,
            end = self.stream(http) => Some(end),
        };
        let end = end.unwrap_or(End::Done {
            reason: StopReason::Cancelled,
            prompt_tokens: 0,
            completion_tokens: self.output(),
            stop_sequence: None,
        });
        // The slot is free before the last event goes out: whoever sees the end can reuse it.
        drop(permit);
        let event = match end {
            End::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                stop_sequence,
            } => {
                if let Some(stop) = stop_sequence {
                    let _ = self.tx.send(Ok(EngineEvent::StopSequence(stop))).await;
                }
                Ok(EngineEvent::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_prompt_tokens: 0,
                })
            }
            End::ReaderGone => return,
            End::Busy(message) => {
                debug!(request_id = %self.request_id, %message, "upstream busy");
                Err(EngineError::ResourceExhausted(message))
            }
            End::TooLong(message) => Err(EngineError::ExceedsContext {
                field: if self.chat { "messages" } else { "prompt" }.into(),
                detail: format!("too long for the wafer-scale endpoint's context ({message})"),
            }),
            End::Fault(message) => {
                warn!(request_id = %self.request_id, streamed = self.output(), %message, "upstream fault");
                Err(if self.output() == 0 {
                    EngineError::Unavailable(message)
                } else {
                    EngineError::Internal(message)
                })
            }
        };
        let _ = self.tx.send(event).await;
    }

    async fn stream(&mut self, http: reqwest::RequestBuilder) -> End {
        let response = match tokio::time::timeout(self.chunk_timeout, http.send()).await {
            Err(_) => {
                return End::Fault(format!(
                    "upstream sent no response within {:?}",
                    self.chunk_timeout
                ));
            }
            Ok(Err(e)) => return End::Fault(describe(&e)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if !status.is_success() {
            let (message, too_long) = self.http_error(response).await;
            return if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                End::Busy(message)
            } else if too_long
                && matches!(
                    status,
                    reqwest::StatusCode::BAD_REQUEST | reqwest::StatusCode::UNPROCESSABLE_ENTITY
                )
            {
                End::TooLong(message)
            } else {
                End::Fault(message)
            };
        }
        debug!(request_id = %self.request_id, version = ?response.version(), "upstream stream open");
        let mut body = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut progress = Progress::default();
        // One timer for the whole stream, moved only when it fires before the silence is
        // long enough: a timeout made afresh for every chunk registers and clears a
        // timer-wheel entry per token.
        let mut last_chunk = tokio::time::Instant::now();
        let silence = tokio::time::sleep(self.chunk_timeout);
        tokio::pin!(silence);
        loop {
            let next = tokio::select! {
                biased;
                next = body.next() => next,
                () = &mut silence => {
                    let due = last_chunk + self.chunk_timeout;
                    if due > tokio::time::Instant::now() {
                        silence.as_mut().reset(due);
                        continue;
                    }
                    return End::Fault(format!(
                        "upstream sent nothing for {:?} mid-stream",
                        self.chunk_timeout
                    ));
                }
            };
            last_chunk = tokio::time::Instant::now();
            let chunk = match next {
                None => {
                    // Some servers close without `[DONE]` after the finishing chunk.
                    if progress.finish_reason.is_some() && !parser.has_partial() {
                        return self.done(progress);
                    }
                    return End::Fault(format!(
                        "upstream closed the stream before it finished (after {} chunks)",
                        self.output()
                    ));
                }
                Some(Err(e)) => {
                    return End::Fault(format!(
                        "upstream stream broke after {} chunks: {}",
                        self.output(),
                        describe(&e)
                    ));
                }
                Some(Ok(bytes)) => bytes,
            };
            let events = match parser.push(&chunk) {
                Ok(events) => events,
                Err(e @ (SseError::NotUtf8 | SseError::LineTooLong { .. })) => {
                    return End::Fault(format!("upstream: {e}"));
                }
            };
            for event in events {
                if event.data.trim() == "[DONE]" {
                    return self.done(progress);
                }
                match self.on_chunk(&event.data, &mut progress).await {
                    Ok(true) => {}
                    Ok(false) => return End::ReaderGone,
                    Err(message) => return End::Fault(message),
                }
            }
        }
    }

    /// Chunks of output (text or tool calls) forwarded so far: once there are any, a retry
    /// elsewhere would repeat them.
    fn output(&self) -> u32 {
        self.streamed + self.tool_chunks
    }

    fn done(&self, progress: Progress) -> End {
        let reason = match progress.finish_reason.as_deref() {
            Some("length") => StopReason::Length,
            // `function_call`: servers still speaking OpenAI's pre-`tools` API.
            Some("tool_calls" | "function_call") => StopReason::ToolCalls,
            // Some servers end a turn that called tools with `stop`; the worker's contract is
            // that a generation which called any ends with `ToolCalls`, so clients know to
            // answer the calls.
            _ if self.tool_chunks > 0 => StopReason::ToolCalls,
            _ => StopReason::Stop,
        };
        End::Done {
            stop_sequence: progress
                .stop_sequence
                .filter(|_| reason == StopReason::Stop),
            reason,
            prompt_tokens: progress.prompt_tokens.unwrap_or_default(),
            completion_tokens: progress.completion_tokens.unwrap_or(self.output()),
        }
    }

    /// Handles one `data:` payload. `Ok(false)` when the reader is gone.
    async fn on_chunk(&mut self, data: &str, progress: &mut Progress) -> Result<bool, String> {
        let chunk: StreamChunk = serde_json::from_str(data).map_err(|e| {
            format!(
                "upstream sent a malformed chunk ({e}): {}",
                truncate(data, 120)
            )
        })?;
        if let Some(error) = &chunk.error {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| error.to_string());
            return Err(format!(
                "upstream failed mid-stream: {}",
                truncate(&message, 200)
            ));
        }
        if let Some(usage) = chunk.usage.as_ref().filter(|u| u.is_object()) {
            let field = |name: &str| {
                usage
                    .get(name)
                    .and_then(Value::as_u64)
                    .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
            };
            progress.prompt_tokens = field("prompt_tokens").or(progress.prompt_tokens);
            progress.completion_tokens = field("completion_tokens").or(progress.completion_tokens);
        }
        let Some(choices) = chunk.choices else {
            return Err(format!(
                "upstream sent a chunk without choices: {}",
                truncate(data, 120)
            ));
        };
        let Some(choice) = choices.into_iter().next() else {
            // The usage chunk has no choices.
            return Ok(true);
        };
        let (text, tool_calls) = match (self.chat, choice.delta) {
            (true, Some(delta)) => (delta.content, delta.tool_calls),
            (true, None) => (None, None),
            (false, _) => (choice.text, None),
        };
        if let Some(Text(reason)) = choice.finish_reason {
            progress.finish_reason = Some(reason.into_owned());
        }
        // A number is a stop token id (vLLM), which names no stop sequence.
        if let Some(Value::String(stop)) = choice.stop_reason {
            progress.stop_sequence = Some(stop);
        }
        let calls = match tool_calls {
            Some(value) => tool_call_deltas(value).map_err(|e| {
                format!(
                    "upstream sent a malformed chunk ({e}): {}",
                    truncate(data, 120)
                )
            })?,
            None => Vec::new(),
        };
        // Servers that call tools often send an empty `content` alongside: no token.
        let text = text.map(|Text(text)| text).filter(|text| !text.is_empty());
        if text.is_none() && calls.is_empty() {
            return Ok(true);
        }
        // A tool call is the generation's first output as much as a token is: its prompt was
        // prefilled.
        if let Some(pending) = self.pending.take() {
            pending.first_token();
        }
        if let Some(text) = text {
            let logprobs = match choice.logprobs.filter(|_| self.logprobs) {
                Some(value) => upstream_logprobs(&value, self.chat),
                None => Vec::new(),
            };
            for (text, logprobs) in split_by_token(text.into_owned(), logprobs) {
                let event = EngineEvent::Token {
                    id: self.streamed,
                    text,
                    logprobs: logprobs.map(Box::new),
                };
                self.streamed += 1;
                if self.tx.send(Ok(event)).await.is_err() {
                    return Ok(false);
                }
            }
        }
        if !calls.is_empty() {
            self.tool_chunks += 1;
        }
        for call in calls {
            if self.tx.send(Ok(EngineEvent::ToolCall(call))).await.is_err() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A message for a non-2xx upstream answer, with the endpoint's own error message.
    /// The upstream's error response as a message, and whether it says the request does not
    /// fit the model's context.
    async fn http_error(&self, response: reqwest::Response) -> (String, bool) {
        let status = response.status();
        let body = tokio::time::timeout(self.chunk_timeout, response.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let error = serde_json::from_slice::<Value>(&body).ok().map(|mut v| {
            // OpenAI nests the error object; vLLM's older servers send it at the top level.
            let nested = v
                .get_mut("error")
                .filter(|e| e.is_object())
                .map(Value::take);
            nested.unwrap_or(v)
        });
        let detail = error
            .as_ref()
            .and_then(|e| e.get("message").and_then(Value::as_str))
            .map_or_else(
                || String::from_utf8_lossy(&body).into_owned(),
                str::to_string,
            );
        let too_long = error.as_ref().is_some_and(exceeds_context);
        let message = format!(
            "upstream answered {status}: {}",
            truncate(detail.trim(), 200)
        );
        (message, too_long)
    }
}

/// Whether an OpenAI-style error object refuses a request as too long for the model's
/// context, in the forms the common servers use: OpenAI's (and Cerebras') code, llama.cpp's
/// type, and vLLM's and SGLang's messages, which carry no code for it.
fn exceeds_context(error: &Value) -> bool {
    let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or_default();
    let message = field("message").to_ascii_lowercase();
    field("code") == "context_length_exceeded"
        || field("type") == "exceed_context_size_error"
        || ["context length", "context size", "context window"]
            .iter()
            .any(|phrase| message.contains(phrase))
}

/// A reqwest error without the URL's query or any header (the key is never in either, but
/// keep messages short and stable).
fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "cannot connect to upstream"
    } else if error.is_timeout() {
        "upstream timed out"
    } else if error.is_body() || error.is_decode() {
        "upstream body failed"
    } else {
        "upstream request failed"
    };
    let mut message = kind.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The fields of a streamed completion chunk the gateway reads. A chunk comes per token: the
/// rest (`id`, `model`, `created`, `logprobs`, …) is skipped unparsed, and the text is borrowed
/// from the payload unless it has escapes.
#[derive(Debug, serde::Deserialize)]
struct StreamChunk<'a> {
    error: Option<Value>,
    usage: Option<Value>,
    #[serde(borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
}

#[derive(Debug, serde::Deserialize)]
struct ChunkChoice<'a> {
    /// A chat completion's.
    #[serde(borrow)]
    delta: Option<ChunkDelta<'a>>,
    /// A (text) completion's.
    #[serde(borrow)]
    text: Option<Text<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Text<'a>>,
    /// vLLM's: the stop sequence (a string) or stop token (a number) that ended the answer.
    stop_reason: Option<Value>,
    /// Read only when the request asked for them.
    logprobs: Option<Value>,
}

#[derive(Debug, serde::Deserialize)]
struct ChunkDelta<'a> {
    #[serde(borrow)]
    content: Option<Text<'a>>,
    /// Taken as any JSON so that a malformed one is reported for what is wrong with it
    /// ([`tool_call_deltas`]), and a chunk without it costs nothing more.
    tool_calls: Option<Value>,
}

/// A chat delta's `tool_calls` as events, one per element in order, with the upstream's
/// indices; `Err` says what is malformed. Absent or null pieces are empty.
fn tool_call_deltas(value: Value) -> Result<Vec<v1::ToolCallDelta>, String> {
    // A string field, or empty when absent or null.
    fn string(object: &mut serde_json::Map<String, Value>, name: &str) -> Result<String, ()> {
        match object.remove(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(text)) => Ok(text),
            Some(_) => Err(()),
        }
    }
    let elements = match value {
        Value::Null => return Ok(Vec::new()),
        Value::Array(elements) => elements,
        _ => return Err("tool_calls is not an array".into()),
    };
    elements
        .into_iter()
        .enumerate()
        .map(|(i, element)| {
            let Value::Object(mut call) = element else {
                return Err(format!("tool_calls[{i}] is not an object"));
            };
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .and_then(|index| u32::try_from(index).ok())
                .ok_or_else(|| format!("tool_calls[{i}].index is missing or not a number"))?;
            let id = string(&mut call, "id")
                .map_err(|()| format!("tool_calls[{i}].id is not a string"))?;
            let mut function = match call.remove("function") {
                None | Some(Value::Null) => serde_json::Map::new(),
                Some(Value::Object(function)) => function,
                Some(_) => return Err(format!("tool_calls[{i}].function is not an object")),
            };
            let name = string(&mut function, "name")
                .map_err(|()| format!("tool_calls[{i}].function.name is not a string"))?;
            let arguments = string(&mut function, "arguments")
                .map_err(|()| format!("tool_calls[{i}].function.arguments is not a string"))?;
            Ok(v1::ToolCallDelta {
                index,
                id,
                name,
                arguments,
            })
        })
        .collect()
}

/// A string borrowed from the payload unless it has escapes (serde borrows a `Cow` only as a
/// field of its own, not inside an `Option`).
#[derive(Debug, serde::Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// An upstream chunk's log probabilities in the wire's terms: a chat chunk's `content` entries
/// or a text completion's parallel arrays. Token ids are unknown (0); bytes are the entry's
/// `bytes` when given, else its text.
fn upstream_logprobs(value: &Value, chat: bool) -> Vec<v1::TokenLogprobs> {
    let logprob = |v: Option<&Value>| v.and_then(Value::as_f64).unwrap_or(f64::NEG_INFINITY) as f32;
    let entry = |e: &Value| {
        let text = e.get("token").and_then(Value::as_str).unwrap_or_default();
        let token = match e.get("bytes").and_then(Value::as_array) {
            Some(bytes) => bytes
                .iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect(),
            None => text.as_bytes().to_vec(),
        };
        v1::TokenLogprob {
            token_id: 0,
            token,
            logprob: logprob(e.get("logprob")),
        }
    };
    if chat {
        let entries = value.get("content").and_then(Value::as_array);
        return entries
            .into_iter()
            .flatten()
            .map(|e| v1::TokenLogprobs {
                chosen: Some(entry(e)),
                top: e
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(entry)
                    .collect(),
            })
            .collect();
    }
    let array = |name: &str| value.get(name).and_then(Value::as_array).cloned();
    let tokens = array("tokens").unwrap_or_default();
    let logprobs = array("token_logprobs").unwrap_or_default();
    let tops = array("top_logprobs").unwrap_or_default();
    tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let text = token.as_str().unwrap_or_default();
            let mut top: Vec<v1::TokenLogprob> = tops
                .get(i)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(t, l)| v1::TokenLogprob {
                    token_id: 0,
                    token: t.as_bytes().to_vec(),
                    logprob: logprob(Some(l)),
                })
                .collect();
            top.sort_by(|a, b| b.logprob.total_cmp(&a.logprob));
            v1::TokenLogprobs {
                chosen: Some(v1::TokenLogprob {
                    token_id: 0,
                    token: text.as_bytes().to_vec(),
                    logprob: logprob(logprobs.get(i)),
                }),
                top,
            }
        })
        .collect()
}

/// A chunk's text as one event per token when its log probabilities name the tokens (each
/// event carrying its token's text and log probabilities, so they stay one per token), or as
/// one event when they do not add up to the text.
fn split_by_token(
    text: String,
    logprobs: Vec<v1::TokenLogprobs>,
) -> Vec<(String, Option<v1::TokenLogprobs>)> {
    let texts: Vec<String> = logprobs
        .iter()
        .map(|l| String::from_utf8_lossy(&l.chosen.clone().unwrap_or_default().token).into_owned())
        .collect();
    if logprobs.is_empty() {
        return vec![(text, None)];
    }
    if texts.concat() == text {
        return texts
            .into_iter()
            .zip(logprobs.into_iter().map(Some))
            .collect();
    }
    // The texts do not add up (an endpoint that reports tokens its own way): the whole text
    // goes with the first token, the others carry none.
    let mut logprobs = logprobs.into_iter().map(Some);
    let mut events = vec![(text, logprobs.next().flatten())];
    events.extend(logprobs.map(|l| (String::new(), l)));
    events
}

/// A chat message in OpenAI's terms. One without tool calls or a call id is exactly what it
/// was before tools existed, so endpoints that know nothing of tools see nothing new.
fn upstream_message(message: &Message) -> Value {
    let mut out = json!({"role": message.role, "content": message.content});
    if !message.tool_calls.is_empty() {
        // OpenAI's shape for a turn that only called tools: no content is null, not "".
        if message.content.is_empty() {
            out["content"] = Value::Null;
        }
        out["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect();
    }
    if !message.tool_call_id.is_empty() {
        out["tool_call_id"] = json!(message.tool_call_id);
    }
    out
}

/// The request body's fields for `tools` in OpenAI's terms (`tools`, `tool_choice`,
/// `parallel_tool_calls`); `None` when it has none, so the body stays as without tools.
fn upstream_tools(tools: &Tools) -> Result<Option<Vec<(&'static str, Value)>>, EngineError> {
    if tools.tools.is_empty() {
        return Ok(None);
    }
    let functions = tools
        .tools
        .iter()
        .enumerate()
        .map(|(i, tool)| {
            let mut function = json!({"name": tool.name});
            if !tool.description.is_empty() {
                function["description"] = json!(tool.description);
            }
            if !tool.parameters_json.is_empty() {
                // Sent as the schema object itself: OpenAI's `parameters` is JSON, not text.
                let schema: Value = serde_json::from_str(&tool.parameters_json)
                    .ok()
                    .filter(Value::is_object)
                    .ok_or_else(|| {
                        EngineError::invalid_field(
                            format!("tools[{i}].parameters_json"),
                            "must be a JSON object (a JSON Schema)",
                        )
                    })?;
                function["parameters"] = schema;
            }
            Ok(json!({"type": "function", "function": function}))
        })
        .collect::<Result<Vec<Value>, EngineError>>()?;
    let choice = if tools.choice.function.is_empty() {
        json!(match tools.choice.mode() {
            v1::ToolChoiceMode::Auto => "auto",
            v1::ToolChoiceMode::None => "none",
            v1::ToolChoiceMode::Required => "required",
        })
    } else {
        json!({"type": "function", "function": {"name": tools.choice.function}})
    };
    let mut fields = vec![("tools", Value::Array(functions)), ("tool_choice", choice)];
    if tools.choice.single_call {
        fields.push(("parallel_tool_calls", json!(false)));
    }
    Ok(Some(fields))
}

/// Writes `sampling` into an OpenAI request body in OpenAI's terms (`chat`: for
/// `/chat/completions`, else `/completions`, whose `logprobs` differ).
fn set_sampling(body: &mut Value, sampling: &Sampling, chat: bool) {
    body["max_tokens"] = json!(sampling.max_tokens);
    // Unset is greedy on every Switchyard pool; an OpenAI endpoint's own default is 1.
    body["temperature"] = json!(sampling.temperature.unwrap_or(0.0));
    let optional = [
        ("top_p", sampling.top_p),
        ("presence_penalty", sampling.presence_penalty),
        ("frequency_penalty", sampling.frequency_penalty),
        // Not OpenAI's; vLLM and SGLang take it under this name. Sent only when asked for,
        // so an endpoint that refuses unknown fields sees it only from a client that wants it.
        ("repetition_penalty", sampling.repetition_penalty),
        // vLLM's, SGLang's and llama.cpp's; 0 is off, so not sent, as above.
        ("min_p", Some(sampling.min_p).filter(|p| *p > 0.0)),
    ];
    for (field, value) in optional {
        if let Some(value) = value {
            body[field] = json!(value);
        }
    }
    if let Some(top_k) = sampling.top_k {
        body["top_k"] = json!(top_k);
    }
    if let Some(seed) = sampling.seed {
        // OpenAI seeds are signed 64-bit.
        body["seed"] = json!(seed as i64);
    }
    if !sampling.stop.is_empty() {
        body["stop"] = json!(sampling.stop);
    }
    if sampling.ignore_eos {
        // vLLM's, SGLang's and llama.cpp's name; sent only when asked for, as above.
        body["ignore_eos"] = json!(true);
    }
    if let Some(top) = sampling.logprobs {
        if chat {
            body["logprobs"] = json!(true);
            if top > 0 {
                body["top_logprobs"] = json!(top);
            }
        } else {
            body["logprobs"] = json!(top);
        }
    }
    if !sampling.logit_bias.is_empty() {
        // OpenAI's keys are token ids written as strings.
        let bias: serde_json::Map<String, Value> = sampling
            .logit_bias
            .iter()
            .map(|(id, bias)| (id.to_string(), json!(bias)))
            .collect();
        body["logit_bias"] = Value::Object(bias);
    }
    if let Some(format) = response_format(sampling) {
        body["response_format"] = format;
    }
}

/// `sampling.response_format` in OpenAI's terms; `None` for free text (not sent, so an
/// endpoint that refuses unknown fields sees it only from a client that wants it).
fn response_format(sampling: &Sampling) -> Option<Value> {
    use switchyard_proto::v1::response_format::Kind;
    let format = sampling.response_format.as_ref()?;
    match format.kind() {
        Kind::Text => None,
        Kind::JsonObject => Some(json!({"type": "json_object"})),
        Kind::JsonSchema => {
            // The router checked it is a JSON object; a schema that somehow is not goes as
            // OpenAI's default, any object, rather than as text the endpoint would refuse.
            let schema: Value = serde_json::from_str(&format.schema_json)
                .unwrap_or_else(|_| json!({"type": "object"}));
            let name = if format.name.is_empty() {
                "response"
            } else {
                &format.name
            };
            Some(json!({
                "type": "json_schema",
                "json_schema": {"name": name, "schema": schema},
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_format_reaches_the_upstream_in_openai_terms() {
        use switchyard_proto::v1::{ResponseFormat, response_format::Kind};
        let sent = |kind: Kind, schema: &str, name: &str| {
            let mut body = json!({});
            let sampling = Sampling {
                max_tokens: 1,
                response_format: Some(ResponseFormat {
                    kind: kind as i32,
                    schema_json: schema.into(),
                    name: name.into(),
                }),
                ..Default::default()
            };
            set_sampling(&mut body, &sampling, true);
            body.get("response_format").cloned()
        };
        assert_eq!(sent(Kind::Text, "", ""), None);
        assert_eq!(
            sent(Kind::JsonObject, "", ""),
            Some(json!({"type": "json_object"}))
        );
        assert_eq!(
            sent(
                Kind::JsonSchema,
                r#"{"type":"object","required":["a"]}"#,
                "thing"
            ),
            Some(
                json!({"type": "json_schema", "json_schema": {"name": "thing",
                "schema": {"type": "object", "required": ["a"]}}})
            )
        );
        // OpenAI requires a name; a request without one gets a neutral one.
        assert_eq!(
            sent(Kind::JsonSchema, r#"{"type":"object"}"#, "").unwrap()["json_schema"]["name"],
            "response"
        );
    }

    #[test]
    fn sampling_reaches_the_upstream_in_openai_terms() {
        let mut body = json!({"model": "m"});
        set_sampling(
            &mut body,
            &Sampling {
                max_tokens: 5,
                top_p: Some(0.5),
                top_k: Some(20),
                seed: Some(u64::MAX),
                stop: vec!["END".into()],
                presence_penalty: Some(0.25),
                frequency_penalty: Some(-0.5),
                repetition_penalty: Some(1.5),
                logit_bias: vec![(7, -100.0), (42, 2.5)],
                logprobs: Some(2),
                ignore_eos: true,
                min_p: 0.25,
                ..Default::default()
            },
            true,
        );
        assert_eq!(
            body,
            json!({"model": "m", "max_tokens": 5, "temperature": 0.0, "top_p": 0.5, "top_k": 20,
                "seed": -1, "stop": ["END"], "presence_penalty": 0.25, "frequency_penalty": -0.5,
                "repetition_penalty": 1.5, "logit_bias": {"7": -100.0, "42": 2.5},
                "logprobs": true, "top_logprobs": 2, "ignore_eos": true, "min_p": 0.25})
        );
        // A text completion asks for log probabilities in its own form.
        let mut body = json!({});
        set_sampling(
            &mut body,
            &Sampling {
                max_tokens: 1,
                logprobs: Some(3),
                ..Default::default()
            },
            false,
        );
        assert_eq!(body["logprobs"], 3);
        // Nothing asked for, nothing sent but the bound and the greedy temperature.
        let mut body = json!({});
        set_sampling(
            &mut body,
            &Sampling {
                max_tokens: 3,
                temperature: Some(0.7),
                ..Default::default()
            },
            true,
        );
        let temperature = body["temperature"].as_f64().expect("a number");
        assert!((temperature - 0.7).abs() < 1e-6, "{temperature}");
        assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
    }

    #[test]
    fn upstream_logprobs_become_one_event_per_token() {
        let chat = json!({"content": [
            {"token": " Par", "logprob": -0.5, "bytes": [32, 80, 97, 114],
             "top_logprobs": [{"token": " Par", "logprob": -0.5}, {"token": " Ly", "logprob": -1.5}]},
            {"token": "is", "logprob": -0.25, "top_logprobs": []}]});
        let logprobs = upstream_logprobs(&chat, true);
        assert_eq!(logprobs.len(), 2);
        assert_eq!(logprobs[0].top.len(), 2);
        assert_eq!(logprobs[0].top[1].token, b" Ly");
        let events = split_by_token(" Paris".into(), logprobs.clone());
        let texts: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, [" Par", "is"]);
        assert!(events.iter().all(|(_, l)| l.is_some()));
        // Texts that do not add up: all of it with the first token, the rest empty.
        let events = split_by_token(" Paris!".into(), logprobs);
        let texts: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(texts, [" Paris!", ""]);
        // No log probabilities: one event, as before.
        assert_eq!(
            split_by_token("x".into(), vec![]),
            vec![("x".to_string(), None)]
        );

        let completion = json!({"tokens": [" a", " b"], "token_logprobs": [-1.0, -2.0],
            "top_logprobs": [{" a": -1.0, " c": -0.5}, null], "text_offset": [0, 2]});
        let logprobs = upstream_logprobs(&completion, false);
        assert_eq!(logprobs.len(), 2);
        let chosen = logprobs[1].chosen.clone().expect("chosen");
        assert_eq!(
            (chosen.token.as_slice(), chosen.logprob),
            (&b" b"[..], -2.0)
        );
        // Most likely first.
        assert_eq!(logprobs[0].top[0].token, b" c");
        assert!(logprobs[1].top.is_empty());
    }

    fn config() -> GatewayConfig {
        GatewayConfig {
            base_url: "http://127.0.0.1:9/v1".into(),
            models: vec![("local".into(), "upstream".into())],
            api_key: None,
            max_concurrent: 1,
            connect_timeout: Duration::from_secs(1),
            chunk_timeout: Duration::from_secs(1),
            tokens_per_s: 1000.0,
        }
    }

    #[test]
    fn config_errors_name_the_flag() {
        let mut c = config();
        c.base_url = "ftp://x".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--gateway-url")
        );
        let mut c = config();
        c.max_concurrent = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--max-concurrent")
        );
        assert!(config().validate().is_ok());
    }

    #[test]
    fn a_chunk_is_read_for_its_text_and_end_and_the_rest_is_skipped() {
        let chunk: StreamChunk = serde_json::from_str(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",
               "system_fingerprint":null,"choices":[{"index":0,"logprobs":{"content":[]},
               "delta":{"role":"assistant","content":"plain"},"finish_reason":null}]}"#,
        )
        .expect("parses");
        let choice = chunk.choices.expect("choices").remove(0);
        let Text(content) = choice.delta.and_then(|d| d.content).expect("content");
        assert!(matches!(content, Cow::Borrowed("plain")), "{content:?}");
        assert!(choice.finish_reason.is_none() && chunk.error.is_none());

        // Escapes make an owned string; a text completion's chunk carries `text`.
        let chunk: StreamChunk = serde_json::from_str(
            r#"{"choices":[{"text":"a\"b\n\u00e9","finish_reason":"length"}],"usage":null}"#,
        )
        .expect("parses");
        let choice = chunk.choices.expect("choices").remove(0);
        assert_eq!(choice.text.map(|t| t.0).as_deref(), Some("a\"b\n\u{e9}"));
        assert_eq!(choice.finish_reason.map(|t| t.0).as_deref(), Some("length"));
        assert!(chunk.usage.is_none());

        let chunk: StreamChunk =
            serde_json::from_str(r#"{"error":{"message":"overloaded"}}"#).expect("parses");
        assert!(chunk.error.is_some() && chunk.choices.is_none());
        assert!(serde_json::from_str::<StreamChunk>(r#"{"choices":"many"}"#).is_err());
    }

    fn delta(index: u32, id: &str, name: &str, arguments: &str) -> v1::ToolCallDelta {
        v1::ToolCallDelta {
            index,
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn tool_call_deltas_keep_order_and_indices_and_read_absent_pieces_as_empty() {
        let chunk: StreamChunk = serde_json::from_str(
            r#"{"choices":[{"index":0,"delta":{"content":"","tool_calls":[
                {"index":1,"id":"call_b","type":"function","function":{"name":"f","arguments":""}},
                {"index":0,"function":{"arguments":"{\"a\":"}},
                {"index":2,"id":null,"function":null},
                {"index":3,"id":"c3","type":"function","function":{"name":"g","arguments":"{}"}}]}}]}"#,
        )
        .expect("parses");
        let choice = chunk.choices.expect("choices").remove(0);
        let tool_calls = choice.delta.and_then(|d| d.tool_calls).expect("tool_calls");
        assert_eq!(
            tool_call_deltas(tool_calls),
            Ok(vec![
                delta(1, "call_b", "f", ""),
                delta(0, "", "", "{\"a\":"),
                delta(2, "", "", ""),
                delta(3, "c3", "g", "{}"),
            ])
        );
        assert_eq!(tool_call_deltas(Value::Null), Ok(vec![]));
        assert_eq!(tool_call_deltas(json!([])), Ok(vec![]));
    }

    #[test]
    fn malformed_tool_call_deltas_say_what_is_wrong() {
        let cases = [
            (json!({"index": 0}), "tool_calls is not an array"),
            (json!(["x"]), "tool_calls[0] is not an object"),
            (
                json!([{"id": "c"}]),
                "tool_calls[0].index is missing or not a number",
            ),
            (
                json!([{"index": 0}, {"index": "1"}]),
                "tool_calls[1].index is missing or not a number",
            ),
            (
                json!([{"index": -1}]),
                "tool_calls[0].index is missing or not a number",
            ),
            (
                json!([{"index": 0, "id": 7}]),
                "tool_calls[0].id is not a string",
            ),
            (
                json!([{"index": 0, "function": "f"}]),
                "tool_calls[0].function is not an object",
            ),
            (
                json!([{"index": 0, "function": {"name": ["f"]}}]),
                "tool_calls[0].function.name is not a string",
            ),
            (
                json!([{"index": 0, "function": {"arguments": {"a": 1}}}]),
                "tool_calls[0].function.arguments is not a string",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(
                tool_call_deltas(value.clone()),
                Err(expected.to_string()),
                "{value}"
            );
        }
    }

    #[test]
    fn tools_and_tool_messages_reach_the_upstream_in_openai_terms() {
        // A message without tool fields serializes exactly as before tools existed.
        let plain = Message {
            role: "user".into(),
            content: "hi".into(),
            ..Default::default()
        };
        assert_eq!(
            upstream_message(&plain).to_string(),
            r#"{"role":"user","content":"hi"}"#
        );
        let call = v1::ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        };
        let calling = Message {
            role: "assistant".into(),
            tool_calls: vec![call.clone()],
            ..Default::default()
        };
        assert_eq!(
            upstream_message(&calling),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\":\"Paris\"}"}}]})
        );
        let calling_with_text = Message {
            content: "Checking.".into(),
            ..calling
        };
        assert_eq!(upstream_message(&calling_with_text)["content"], "Checking.");
        let answer = Message {
            role: "tool".into(),
            content: "18C".into(),
            tool_call_id: "call_1".into(),
            ..Default::default()
        };
        assert_eq!(
            upstream_message(&answer),
            json!({"role": "tool", "content": "18C", "tool_call_id": "call_1"})
        );

        assert_eq!(upstream_tools(&Tools::default()), Ok(None));
        let mut tools = Tools {
            tools: vec![
                v1::Tool {
                    name: "get_weather".into(),
                    description: "Weather now".into(),
                    parameters_json: r#"{"type":"object"}"#.into(),
                },
                v1::Tool {
                    name: "noop".into(),
                    ..Default::default()
                },
            ],
            choice: Default::default(),
        };
        let fields = |tools: &Tools| {
            Value::Object(
                upstream_tools(tools)
                    .expect("valid")
                    .expect("some")
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            )
        };
        assert_eq!(
            fields(&tools),
            json!({"tools": [
                {"type": "function", "function": {"name": "get_weather",
                    "description": "Weather now", "parameters": {"type": "object"}}},
                {"type": "function", "function": {"name": "noop"}}],
                "tool_choice": "auto"})
        );
        tools.choice.set_mode(v1::ToolChoiceMode::Required);
        assert_eq!(fields(&tools)["tool_choice"], "required");
        tools.choice.set_mode(v1::ToolChoiceMode::None);
        assert_eq!(fields(&tools)["tool_choice"], "none");
        tools.choice.function = "noop".into();
        tools.choice.single_call = true;
        let named = fields(&tools);
        assert_eq!(
            named["tool_choice"],
            json!({"type": "function", "function": {"name": "noop"}})
        );
        assert_eq!(named["parallel_tool_calls"], false);

        for bad in ["{not json", "[1]"] {
            tools.tools[1].parameters_json = bad.into();
            match upstream_tools(&tools) {
                Err(EngineError::InvalidField { field, .. }) => {
                    assert_eq!(field, "tools[1].parameters_json")
                }
                other => panic!("{bad}: expected InvalidField, got {other:?}"),
            }
        }
    }

    #[test]
    fn model_mappings_parse() {
        assert_eq!(
            parse_model_mapping("small=llama3.1-8b"),
            Ok(("small".into(), "llama3.1-8b".into()))
        );
        assert_eq!(
            parse_model_mapping("same"),
            Ok(("same".into(), "same".into()))
        );
        assert!(parse_model_mapping("=x").is_err());
    }

    #[test]
    fn api_key_is_redacted() {
        let key = ApiKey::new("sk-secret\n").expect("valid");
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
        assert_eq!(key.0, "sk-secret");
        assert!(ApiKey::new("  ").is_err());
    }

    #[tokio::test]
    async fn connection_refused_is_a_clean_unavailable() {
        // Port 9 (discard) is not listening on loopback here; the connect fails at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let mut c = config();
        c.base_url = format!("http://127.0.0.1:{port}/v1");
        let engine = GatewayEngine::new(c).expect("engine");
        let request = EngineRequest {
            request_id: "r".into(),
            model: "local".into(),
            prompt: Prompt::Text("hi".into()),
            sampling: switchyard_worker::Sampling {
                max_tokens: 4,
                ..Default::default()
            },
            resume_tokens: vec![],
            latency_critical: false,
            min_tokens_per_s: 0.0,
            prompt_ids: None,
            tools: Default::default(),
            embed: false,
        };
        let mut events = engine
            .submit(request.clone(), CancellationToken::new())
            .expect("admitted");
        // The one slot is taken while the first request runs.
        assert!(matches!(
            engine.submit(request.clone(), CancellationToken::new()),
            Err(EngineError::ResourceExhausted(_))
        ));
        match events.recv().await {
            Some(Err(EngineError::Unavailable(message))) => {
                assert!(message.contains("cannot connect"), "{message}")
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        // The slot is free again once the generation ended.
        assert!(events.recv().await.is_none());
        assert_eq!(engine.active(), 0);
        let mut wrong = request;
        wrong.model = "other".into();
        assert!(matches!(
            engine.submit(wrong, CancellationToken::new()),
            Err(EngineError::InvalidArgument(_))
        ));
    }
}
