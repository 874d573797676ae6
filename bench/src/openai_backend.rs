//! `switchyard-bench openai-backend`: a load-test backend that speaks the OpenAI chat
//! completions API — no model, deterministic text, fixed timing — so a router in front of it
//! can be measured without a model's noise (see [`crate::http_overhead`]).
//!
//! Every request, whatever its prompt, waits `--ttft` (the "prefill"), then streams
//! `max_tokens` (capped at `--max-tokens`) content deltas `"t0 "`, `"t1 "`, … at
//! `--tokens-per-s`, then a `finish_reason` chunk, a `usage` chunk when
//! `stream_options.include_usage` asks for it, and `[DONE]`. Without `stream: true` the same
//! text comes as one `chat.completion` after the same total time. It serves any model name
//! and lists `--model` on `/v1/models`, answers `/health`, and reports on stderr every other
//! route it was asked for (404), so a router probing for endpoints it does not have shows.
//!
//! It is served by Switchyard's own listener code (`switchyard_cluster::listen`: the accept
//! loop, header-read and idle timeouts the router's HTTP door uses), on a socket whose listen
//! backlog is `--backlog` (by default the servers' own; the kernel caps it at
//! `net.core.somaxconn`) — so a small backlog can be tried on purpose. It prints `backend http <address>` on stdout once it accepts
//! connections.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use switchyard_cluster::listen::{self, ConnectionTimeouts};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Options of `switchyard-bench openai-backend`.
#[derive(Debug, Clone, clap::Args)]
pub struct OpenAiBackendArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Model id listed on `/v1/models` (requests for any model are served).
    #[arg(long, default_value = "loadtest")]
    pub model: String,
    /// Time from a request's arrival to its first token.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    pub ttft: Duration,
    /// Decode rate per stream, tokens per second.
    #[arg(long, default_value_t = 1000.0)]
    pub tokens_per_s: f64,
    /// Most tokens one request gets (its `max_tokens` if smaller; 16 when it gives none).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Listen backlog asked of the kernel (the servers' listeners ask
    /// `switchyard_cluster::listen::LISTEN_BACKLOG`, 4 096).
    #[arg(long, default_value_t = listen::LISTEN_BACKLOG)]
    pub backlog: u32,
}

/// What the handlers share.
struct Backend {
    model: String,
    ttft: Duration,
    token_interval: Duration,
    max_tokens: u32,
    /// Requests for paths it does not serve, by method and path (each is reported once when
    /// first asked, and counted at exit).
    unknown: Mutex<BTreeMap<String, u64>>,
}

pub async fn run(args: OpenAiBackendArgs) -> anyhow::Result<()> {
    if !(args.tokens_per_s.is_finite() && args.tokens_per_s > 0.0) {
        anyhow::bail!("--tokens-per-s: must be a positive number");
    }
    if args.backlog == 0 {
        anyhow::bail!("--backlog: must be at least 1");
    }
    let backend = Arc::new(Backend {
        model: args.model.clone(),
        ttft: args.ttft,
        token_interval: Duration::from_secs_f64(1.0 / args.tokens_per_s),
        max_tokens: args.max_tokens,
        unknown: Mutex::new(BTreeMap::new()),
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .fallback(unknown_route)
        .with_state(backend.clone());
    let listener = switchyard_cluster::listen::bind_with_backlog(args.listen, args.backlog)
        .with_context(|| format!("binding {}", args.listen))?;
    let incoming = listen::plaintext(listener, ConnectionTimeouts::default())?;
    println!("backend http {}", incoming.local_addr());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(listen::serve_http(
        incoming,
        app,
        ConnectionTimeouts::default(),
        shutdown.clone(),
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    let unknown = backend.unknown.lock().expect("unknown routes").clone();
    if !unknown.is_empty() {
        eprintln!("unknown routes: {unknown:?}");
    }
    // Streams still open (a client that never finished) must not hold the exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

async fn models(State(backend): State<Arc<Backend>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": backend.model, "object": "model", "created": 0, "owned_by": "switchyard-bench"}],
    }))
}

async fn unknown_route(
    State(backend): State<Arc<Backend>>,
    method: axum::http::Method,
    uri: Uri,
) -> Response {
    let route = format!("{method} {}", uri.path());
    let mut unknown = backend.unknown.lock().expect("unknown routes");
    let seen = unknown.entry(route.clone()).or_default();
    if *seen == 0 {
        eprintln!("openai-backend: asked for {route}, which it does not serve (404)");
    }
    *seen += 1;
    drop(unknown);
    (StatusCode::NOT_FOUND, "not served by the load-test backend").into_response()
}

fn chunk(id: &str, model: &str, created: u64, delta: Value, finish: Option<&str>) -> Bytes {
    let body = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {body}\n\n"))
}

async fn chat_completions(
    State(backend): State<Arc<Backend>>,
    Json(request): Json<Value>,
) -> Response {
    let model = request["model"]
        .as_str()
        .unwrap_or(&backend.model)
        .to_string();
    let tokens = request["max_tokens"]
        .as_u64()
        .or_else(|| request["max_completion_tokens"].as_u64())
        .unwrap_or(16)
        .clamp(1, u64::from(backend.max_tokens)) as u32;
    let stream = request["stream"].as_bool().unwrap_or(false);
    let include_usage = request["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let prompt_tokens = request["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["content"].as_str())
                .map(|c| c.split_whitespace().count() as u64)
                .sum::<u64>()
        })
        .unwrap_or(0);
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": prompt_tokens + u64::from(tokens),
    });
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    if !stream {
        tokio::time::sleep(backend.ttft + backend.token_interval * (tokens - 1)).await;
        let text: String = (0..tokens).map(|i| format!("t{i} ")).collect();
        return Json(json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": usage,
        }))
        .into_response();
    }
    // One chunk per token, each sent as it is due; a client that goes away ends the task.
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
    let (ttft, interval) = (backend.ttft, backend.token_interval);
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let role = chunk(
            &id,
            &model,
            created,
            json!({"role": "assistant", "content": ""}),
            None,
        );
        if tx.send(Ok(role)).await.is_err() {
            return;
        }
        for i in 0..tokens {
            // Due times from the start, so a late wake-up does not slow the whole stream.
            tokio::time::sleep_until(started + ttft + interval * i).await;
            let token = chunk(
                &id,
                &model,
                created,
                json!({"content": format!("t{i} ")}),
                None,
            );
            if tx.send(Ok(token)).await.is_err() {
                return;
            }
        }
        let mut tail = chunk(&id, &model, created, json!({}), Some("length")).to_vec();
        if include_usage {
            let body = json!({
                "id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [], "usage": usage,
            });
            tail.extend_from_slice(format!("data: {body}\n\n").as_bytes());
        }
        tail.extend_from_slice(b"data: [DONE]\n\n");
        let _ = tx.send(Ok(Bytes::from(tail))).await;
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .expect("a valid response")
}
