//! The OpenAI-compatible HTTP front door: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `POST /v1/responses` (each streaming as Server-Sent Events or not), `GET /v1/models`, `GET /v1/models/{*model}`
//! `GET /health` and `GET /metrics` (Prometheus, see [`crate::metrics`]).
//!
//! Every generation goes through the same [`Dispatcher::prepare`] and [`Dispatcher::run`] as
//! the gRPC API: this module only translates HTTP ↔ `switchyard.v1`. The lane can be chosen
//! with the `x-switchyard-class` header, or by the tenant of the API key in `Authorization:
//! Bearer <key>` when keys are configured (then every `/v1` route needs a key; `/health` stays
//! open); responses carry `x-switchyard-lane`,
//! `x-switchyard-pool` and `x-switchyard-worker`. Dropping a response body (the client went
//! away) drops the dispatcher's output channel, which cancels the generation on the worker.

mod batches;
pub(crate) mod blocks;
pub(crate) mod choices;
mod conversations;
mod cors;
mod embeddings;
mod error;
pub(crate) mod fields;
#[cfg(test)]
mod fuzz;
pub(crate) mod handlers;
mod logprobs;
mod responses;
pub(crate) mod stored_chat;
pub(crate) mod stream;
#[cfg(test)]
pub(crate) mod test_support;
pub(crate) mod tokenize;
pub(crate) mod tools;
pub(crate) mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use switchyard_cluster::listen::{self, ConnectionTimeouts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{AUTHORIZATION, ApiKeys, AuthError};
use crate::dispatch::Dispatcher;
use crate::metrics::RouterMetrics;
use crate::report::Reporter;
use crate::report::answers::Answer;

pub use conversations::check_added_items;
pub use cors::CorsOrigins;
pub use error::ApiError;
pub use responses::request::metadata as check_metadata;

/// One model: the rest of the path, slashes included, as Hugging Face-style ids have them
/// (`org/name`; found from outside: `GET /v1/models/acme/llama-3` was a 404 "no such
/// endpoint" while `/v1/models` listed it; the Python SDK escapes the slash, curl and plain
/// string-built URLs do not).
const MODEL_ROUTE: &str = "/v1/models/{*model}";

/// The HTTP routes, sharing the gRPC server's dispatcher. With `keys`, the `/v1` routes
/// authenticate first (401 in OpenAI's shape) and hand the key's tenant to the handlers.
pub fn routes(dispatcher: Arc<Dispatcher>, keys: Option<Arc<ApiKeys>>) -> Router {
    let upload_limit = dispatcher.batches.limits().max_file_bytes + batches::UPLOAD_FRAMING_BYTES;
    let api = api()
        .route(
            batches::FILES_ROUTE,
            post(batches::upload)
                .layer(DefaultBodyLimit::max(upload_limit))
                .get(batches::list_files),
        )
        .route(
            batches::FILE_ROUTE,
            get(batches::get_file).delete(batches::delete_file),
        )
        .route(batches::FILE_CONTENT_ROUTE, get(batches::file_content))
        .route(
            batches::BATCHES_ROUTE,
            post(batches::create).get(batches::list_batches),
        )
        .route(batches::BATCH_ROUTE, get(batches::get_batch))
        .route(batches::CANCEL_ROUTE, post(batches::cancel))
        .route_layer(middleware::from_fn(refuse_unreadable_body));
    let api = match keys {
        Some(keys) => {
            let gate = Gate {
                keys,
                metrics: dispatcher.metrics.clone(),
            };
            api.route_layer(middleware::from_fn_with_state(gate, authenticate))
        }
        None => api,
    };
    let counter = AnswerCounter {
        metrics: dispatcher.metrics.clone(),
        reports: dispatcher.reports.clone(),
    };
    let metrics = dispatcher.config.metrics.router();
    let cors = dispatcher.config.http_cors.layer();
    let app = api
        .route("/health", get(handlers::health))
        .layer(DefaultBodyLimit::max(handlers::MAX_BODY_BYTES))
        .with_state(dispatcher)
        // Prometheus scrapes without an API key, like `/health`.
        .merge(metrics)
        // After the merge, so that `/metrics` answers a wrong method in OpenAI's shape too.
        .fallback(handlers::unknown_route)
        .method_not_allowed_fallback(handlers::wrong_method);
    // Around every route and refusal: a preflight is answered before authentication and
    // the method check, and a refusal a page gets is one it can read.
    let app = match cors {
        Some(cors) => app.layer(cors),
        None => app,
    };
    // Outermost: every answer is counted, refusals before a handler included.
    app.layer(middleware::from_fn_with_state(counter, count_answer))
}

/// The router's own API as a batch's requests reach it: the generation endpoints a batch may
/// call, checked and answered as a client's are (the caller attaches the batch's tenant).
pub fn door(dispatcher: Arc<Dispatcher>) -> Router {
    api()
        .route_layer(middleware::from_fn(refuse_unreadable_body))
        .layer(DefaultBodyLimit::max(handlers::MAX_BODY_BYTES))
        .with_state(dispatcher)
}

/// The API's routes, without authentication, limits or the Files and Batches APIs.
fn api() -> Router<Arc<Dispatcher>> {
    Router::new()
        .route(
            handlers::CHAT_ROUTE,
            post(handlers::chat_completions).get(stored_chat::list),
        )
        .route(
            stored_chat::COMPLETION_ROUTE,
            get(stored_chat::get)
                .post(stored_chat::update)
                .delete(stored_chat::delete),
        )
        .route(stored_chat::MESSAGES_ROUTE, get(stored_chat::messages))
        .route(handlers::COMPLETIONS_ROUTE, post(handlers::completions))
        .route(handlers::RESPONSES_ROUTE, post(responses::responses))
        .route(
            responses::stored::RESPONSE_ROUTE,
            get(responses::stored::get).delete(responses::stored::delete),
        )
        .route(
            responses::stored::INPUT_ITEMS_ROUTE,
            get(responses::stored::input_items),
        )
        .route(
            responses::stored::CANCEL_ROUTE,
            post(responses::stored::cancel),
        )
        .route(
            conversations::CONVERSATIONS_ROUTE,
            post(conversations::create),
        )
        .route(
            conversations::CONVERSATION_ROUTE,
            get(conversations::get)
                .post(conversations::update)
                .delete(conversations::delete),
        )
        .route(
            conversations::ITEMS_ROUTE,
            get(conversations::list_items).post(conversations::add_items),
        )
        .route(
            conversations::ITEM_ROUTE,
            get(conversations::get_item).delete(conversations::delete_item),
        )
        .route(handlers::MESSAGES_ROUTE, post(crate::anthropic::messages))
        .route(
            handlers::COUNT_TOKENS_ROUTE,
            post(crate::anthropic::count_tokens),
        )
        .route(embeddings::EMBEDDINGS_ROUTE, post(embeddings::embeddings))
        .route(tokenize::TOKENIZE_ROUTE, post(tokenize::tokenize))
        .route(tokenize::DETOKENIZE_ROUTE, post(tokenize::detokenize))
        .route("/v1/models", get(handlers::list_models))
        .route(MODEL_ROUTE, get(handlers::get_model))
}

/// Where the HTTP answers are counted: Prometheus, and the dashboard's front-door table.
#[derive(Clone)]
struct AnswerCounter {
    metrics: RouterMetrics,
    reports: Reporter,
}

/// Counts the answer to every HTTP request by API and status; the dashboard's table leaves
/// out the probes (`/health`, `/metrics`), which would drown the clients' requests.
async fn count_answer(
    State(counter): State<AnswerCounter>,
    request: Request,
    next: Next,
) -> Response {
    let api = api_of(request.uri().path());
    let response = next.run(request).await;
    let status = response.status().as_u16();
    counter.metrics.http_answered(api, status);
    if !matches!(api, "health" | "metrics") {
        counter.reports.answered(api, Answer::of_http(status));
    }
    response
}

/// The API a path belongs to, as the request counter names it.
fn api_of(path: &str) -> &'static str {
    match path {
        handlers::CHAT_ROUTE => "chat_completions",
        handlers::COMPLETIONS_ROUTE => "completions",
        handlers::RESPONSES_ROUTE => "responses",
        handlers::MESSAGES_ROUTE => "messages",
        embeddings::EMBEDDINGS_ROUTE => "embeddings",
        handlers::COUNT_TOKENS_ROUTE => "count_tokens",
        tokenize::TOKENIZE_ROUTE => "tokenize",
        tokenize::DETOKENIZE_ROUTE => "detokenize",
        "/health" => "health",
        "/metrics" => "metrics",
        path if path == "/v1/models" || path.starts_with("/v1/models/") => "models",
        path if path.starts_with("/v1/responses/") => "stored_responses",
        path if path.starts_with(conversations::CONVERSATIONS_ROUTE) => "conversations",
        path if path.starts_with(batches::FILES_ROUTE) => "files",
        path if path.starts_with(batches::BATCHES_ROUTE) => "batches",
        _ => "unknown",
    }
}

/// Serves the HTTP API on `listener` (HTTPS with `tls`) until `shutdown` fires, closing
/// connections that stay silent past `connections`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<switchyard_cluster::tls::ServerTls>>,
    connections: ConnectionTimeouts,
    dispatcher: Arc<Dispatcher>,
    keys: Option<Arc<ApiKeys>>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = routes(dispatcher, keys);
    match tls {
        Some(tls) => {
            let incoming = switchyard_cluster::tls::listen(listener, tls, connections)?;
            listen::serve_http(incoming, app, connections, shutdown).await
        }
        None => {
            let incoming = listen::plaintext(listener, connections)?;
            listen::serve_http(incoming, app, connections, shutdown).await
        }
    }
}

/// Refuses, before reading a byte of it, a body the handlers could not read: one compressed
/// (`content-encoding` other than `identity`; found from outside, a gzip body was a 400 "not
/// valid JSON") with a 415, and one whose `content-length` is over the limit with a 413 — so a
/// client that sent `expect: 100-continue` is not told to go on and upload megabytes only to
/// be refused after 2 MiB of them.
async fn refuse_unreadable_body(request: Request, next: Next) -> Response {
    use axum::http::{StatusCode, header};
    let headers = request.headers();
    // Every `content-encoding` line counts (a proxy may have added one).
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|encoding| !encoding.as_bytes().eq_ignore_ascii_case(b"identity"));
    // An upload's limit is the file store's (its handler's body limit says it).
    let upload = request.uri().path() == batches::FILES_ROUTE;
    let too_long = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|length| !upload && length > handlers::MAX_BODY_BYTES as u64);
    let error = if encoded {
        let mut error =
            ApiError::bad_body("content-encoding is not supported; send the JSON uncompressed");
        error.status = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        error
    } else if too_long {
        handlers::body_too_large()
    } else {
        return next.run(request).await;
    };
    handlers::refusal(&error, request.headers(), request.uri().path())
}

/// What the HTTP door's API-key check needs.
#[derive(Clone)]
struct Gate {
    keys: Arc<ApiKeys>,
    metrics: RouterMetrics,
}

/// The header Anthropic's clients send their API key in.
const API_KEY_HEADER: &str = "x-api-key";

/// Checks `Authorization: Bearer <key>` (or `x-api-key: <key>`) and attaches the key's
/// tenant to the request.
async fn authenticate(
    State(Gate { keys, metrics }): State<Gate>,
    mut request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    // Anthropic's clients send their key as `x-api-key`; it counts when `authorization` is
    // absent.
    let value = match (headers.get(AUTHORIZATION), headers.get(API_KEY_HEADER)) {
        (None, None) => Ok(None),
        (Some(value), _) => value
            .to_str()
            .map(|v| Some(v.to_string()))
            .map_err(|_| AuthError::Malformed),
        (None, Some(key)) => key
            .to_str()
            .map(|key| Some(format!("Bearer {key}")))
            .map_err(|_| AuthError::Malformed),
    };
    match value.and_then(|value| keys.authenticate(value.as_deref())) {
        Ok(tenant) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Err(error) => {
            tracing::debug!(%error, path = request.uri().path(), "http request refused");
            metrics.auth_refused("http", &error);
            let error = ApiError::unauthenticated(error);
            handlers::refusal(&error, request.headers(), request.uri().path())
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::response::IntoResponse as _;
    use tower::ServiceExt as _;

    use super::*;

    /// A generation endpoint behind the API-key check, whose handler never runs here, counting
    /// its refusals in `metrics`.
    fn guarded(metrics: &RouterMetrics) -> Router {
        let keys = ApiKeys::from_json(r#"{"keys": [{"key": "sk-acme-1", "tenant": "acme"}]}"#)
            .expect("valid keys");
        let gate = Gate {
            keys: Arc::new(keys),
            metrics: metrics.clone(),
        };
        Router::new()
            .route("/v1/chat/completions", post(|| async { "ran" }))
            .route(handlers::MESSAGES_ROUTE, post(|| async { "ran" }))
            .route_layer(middleware::from_fn_with_state(gate, authenticate))
    }

    /// A generation endpoint behind [`refuse_unreadable_body`] that reads its body, served over
    /// a real socket by [`listen::serve_http`] (hyper decides when to send `100 Continue`).
    async fn gated_server() -> std::net::SocketAddr {
        let app = Router::new()
            .route(
                "/v1/chat/completions",
                post(|body: axum::body::Bytes| async move { format!("read {}", body.len()) }),
            )
            .route_layer(middleware::from_fn(refuse_unreadable_body));
        serve_on_loopback(app, ConnectionTimeouts::default())
    }

    /// Serves `app` with [`listen::serve_http`] on a free loopback port until the test ends.
    fn serve_on_loopback(app: Router, timeouts: ConnectionTimeouts) -> std::net::SocketAddr {
        let listener = listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let incoming = listen::plaintext(listener, timeouts).unwrap();
        let addr = incoming.local_addr();
        tokio::spawn(listen::serve_http(
            incoming,
            app,
            timeouts,
            CancellationToken::new(),
        ));
        addr
    }

    /// Sends `head` (a request head without its body) and returns the first answer's head.
    async fn first_answer(addr: std::net::SocketAddr, head: &str) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0; 4096];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "closed without an answer");
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).to_lowercase()
    }

    /// A path the router does not serve is a 404 saying what it does serve; one of OpenAI's
    /// stored-response paths says which of them there are.
    #[tokio::test]
    async fn an_unknown_path_is_answered_with_the_endpoints_there_are() {
        let app = Router::new().fallback(handlers::unknown_route);
        let message = |path: &'static str| {
            let app = app.clone();
            async move {
                let answer = app
                    .oneshot(
                        axum::http::Request::get(path)
                            .body(Body::empty())
                            .expect("request"),
                    )
                    .await
                    .expect("answered");
                assert_eq!(answer.status(), StatusCode::NOT_FOUND);
                let body = axum::body::to_bytes(answer.into_body(), 1 << 16)
                    .await
                    .expect("body");
                let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
                body["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
        };
        let speech = message("/v1/audio/speech").await;
        assert!(
            speech.starts_with("no such endpoint: /v1/audio/speech;")
                && speech.contains("POST /v1/chat/completions")
                && speech.contains("/v1/embeddings")
                && speech.contains("/tokenize"),
            "{speech}"
        );
        let steps = message("/v1/responses/resp_1/steps").await;
        assert!(
            steps.contains("GET /v1/responses/{id}/input_items")
                && steps.contains("POST /v1/responses/{id}/cancel"),
            "{steps}"
        );
    }

    /// An allowed origin's preflight is answered before the API-key check (browsers send no
    /// credentials on it) and names what the page may send; another origin's is told nothing,
    /// so its browser keeps it out. The answer itself carries the origin and the headers the
    /// page may read.
    #[tokio::test]
    async fn an_allowed_origin_is_answered_before_authentication() {
        let origins = CorsOrigins::parse(&["https://chat.example".to_string()]).expect("an origin");
        let app = guarded(&RouterMetrics::unregistered()).layer(origins.layer().expect("on"));
        let preflight = |origin: &str| {
            axum::http::Request::builder()
                .method("OPTIONS")
                .uri("/v1/chat/completions")
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,x-stainless-lang",
                )
                .body(Body::empty())
                .unwrap()
        };
        let allowed = app
            .clone()
            .oneshot(preflight("https://chat.example"))
            .await
            .unwrap();
        assert_eq!(allowed.status(), StatusCode::OK);
        let header = |response: &Response, name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(
            header(&allowed, "access-control-allow-origin").as_deref(),
            Some("https://chat.example")
        );
        assert_eq!(
            header(&allowed, "access-control-allow-headers").as_deref(),
            Some("authorization,x-stainless-lang")
        );
        let other = app
            .clone()
            .oneshot(preflight("https://evil.example"))
            .await
            .unwrap();
        assert_eq!(header(&other, "access-control-allow-origin"), None);

        let call = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/chat/completions")
            .header("origin", "https://chat.example")
            .header("authorization", "Bearer sk-acme-1")
            .body(Body::empty())
            .unwrap();
        let answered = app.oneshot(call).await.unwrap();
        assert_eq!(answered.status(), StatusCode::OK);
        assert_eq!(
            header(&answered, "access-control-allow-origin").as_deref(),
            Some("https://chat.example")
        );
        assert!(
            header(&answered, "access-control-expose-headers")
                .is_some_and(|h| h.contains("x-switchyard-worker") && h.contains("retry-after")),
            "{:?}",
            answered.headers()
        );
    }

    /// Found from outside: a body announced over the limit with `expect: 100-continue` was told
    /// `100 Continue` (so the client would upload it, to be refused after 2 MiB), and a gzip
    /// body was a 400 "not valid JSON". Both are refused before the body is read: 413 and 415,
    /// with the request id and `connection: close`.
    #[tokio::test]
    async fn an_oversized_or_compressed_body_is_refused_before_it_is_read() {
        let addr = gated_server().await;
        let too_large = first_answer(
            addr,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-length: 3145728\r\nexpect: 100-continue\r\nx-request-id: big-1\r\n\r\n",
        )
        .await;
        assert!(too_large.starts_with("http/1.1 413"), "{too_large}");
        assert!(too_large.contains("x-request-id: big-1"), "{too_large}");
        assert!(too_large.contains("connection: close"), "{too_large}");
        let gzip = first_answer(
            addr,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             content-encoding: gzip\r\ncontent-length: 20\r\n\r\n",
        )
        .await;
        assert!(gzip.starts_with("http/1.1 415"), "{gzip}");
        assert!(gzip.contains("content-encoding is not supported"), "{gzip}");
        let second_line = first_answer(
            addr,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-encoding: identity\r\n\
             content-encoding: br\r\ncontent-length: 20\r\n\r\n",
        )
        .await;
        assert!(second_line.starts_with("http/1.1 415"), "{second_line}");
        // Within the limit, `identity`, the body is read.
        let within = first_answer(
            addr,
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-encoding: identity\r\n\
             content-length: 2\r\nexpect: 100-continue\r\n\r\n",
        )
        .await;
        assert!(within.starts_with("http/1.1 100"), "{within}");
    }

    /// A body that stops arriving short of its `content-length` is answered 408 when the
    /// connection's idle timeout ends it, not 400 "Failed to buffer the request body".
    #[tokio::test]
    async fn a_body_that_stops_arriving_is_a_408_at_the_idle_timeout() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let app = Router::new().route(
            "/v1/chat/completions",
            post(
                |body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>| async move {
                    match body {
                        Ok(_) => "read".into_response(),
                        Err(rejection) => handlers::body_unread(rejection).into_response(),
                    }
                },
            ),
        );
        let timeouts = ConnectionTimeouts {
            header_read: std::time::Duration::from_millis(300),
            idle: std::time::Duration::from_millis(300),
            max_age: None,
        };
        let addr = serve_on_loopback(app, timeouts);
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{\"model\"")
            .await
            .unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut answer),
        )
        .await
        .expect("closed within 10 s")
        .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("idle timeout"), "{answer}");
    }

    /// A model id with a slash is one model, escaped or not; an empty one is no route.
    #[tokio::test]
    async fn a_model_id_with_a_slash_is_one_model() {
        let app = Router::new().route(
            MODEL_ROUTE,
            get(|axum::extract::Path(model): axum::extract::Path<String>| async move { model }),
        );
        for (path, model) in [
            ("/v1/models/synthetic", Some("synthetic")),
            ("/v1/models/acme/llama-3", Some("acme/llama-3")),
            ("/v1/models/acme%2Fllama-3", Some("acme/llama-3")),
            ("/v1/models/", None),
        ] {
            let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 10)
                .await
                .unwrap();
            match model {
                Some(model) => {
                    assert_eq!(status, StatusCode::OK, "{path}");
                    assert_eq!(body, model.as_bytes(), "{path}");
                }
                None => assert_eq!(status, StatusCode::NOT_FOUND, "{path}"),
            }
        }
    }

    /// A request refused for its API key is answered with its request id too, as every answer
    /// of a generation endpoint is: the client's own, else a new one. Each refusal is counted by
    /// reason.
    #[tokio::test]
    async fn a_refused_api_key_is_answered_with_the_request_id_and_counted() {
        let registry = switchyard_cluster::telemetry::metrics::Metrics::new();
        let metrics = RouterMetrics::register(&registry);
        metrics.count_auth_refusals();
        let guarded = guarded(&metrics);
        let refused = |request_id: Option<&str>| {
            let mut request = axum::http::Request::post("/v1/chat/completions")
                .header(AUTHORIZATION, "Bearer sk-wrong");
            if let Some(id) = request_id {
                request = request.header("x-request-id", id);
            }
            guarded
                .clone()
                .oneshot(request.body(Body::empty()).expect("request"))
        };
        let response = refused(Some("my-req-1")).await.expect("answered");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()["x-request-id"], "my-req-1");
        let response = refused(None).await.expect("answered");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let id = response.headers()["x-request-id"].to_str().expect("ascii");
        assert!(id.starts_with("chatcmpl-"), "{id}");
        let text = registry.encode();
        let count = |reason: &str| {
            format!("switchyard_router_auth_refusals_total{{reason=\"{reason}\",door=\"http\"}}")
        };
        assert!(text.contains(&format!("{} 2", count("unknown"))), "{text}");
        assert!(text.contains(&format!("{} 0", count("missing"))), "{text}");
    }

    /// Anthropic's clients send their key as `x-api-key`: it opens the routes as
    /// `authorization` does, and a wrong one on the Messages route is refused in that API's
    /// shape.
    #[tokio::test]
    async fn an_x_api_key_authenticates_and_the_messages_route_refuses_in_its_shape() {
        let registry = switchyard_cluster::telemetry::metrics::Metrics::new();
        let guarded = guarded(&RouterMetrics::register(&registry));
        let with_key = |path: &str, key: &str| {
            let request = axum::http::Request::post(path)
                .header(API_KEY_HEADER, key)
                .body(Body::empty())
                .expect("request");
            guarded.clone().oneshot(request)
        };
        for path in ["/v1/chat/completions", handlers::MESSAGES_ROUTE] {
            let response = with_key(path, "sk-acme-1").await.expect("answered");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
        }
        let response = with_key(handlers::MESSAGES_ROUTE, "sk-wrong")
            .await
            .expect("answered");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(
            response.headers()["x-request-id"]
                .to_str()
                .expect("ascii")
                .starts_with("msg_")
        );
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
}
