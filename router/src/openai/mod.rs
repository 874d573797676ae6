//! The OpenAI-compatible HTTP front door: `POST /v1/chat/completions`, `POST /v1/completions`
//! (both streaming as Server-Sent Events or not), `GET /v1/models`, `GET /v1/models/{model}`
//! `GET /health` and `GET /metrics` (Prometheus, see [`crate::metrics`]).
//!
//! Every generation goes through the same [`Dispatcher::prepare`] and [`Dispatcher::run`] as
//! the gRPC API: this module only translates HTTP ↔ `switchyard.v1`. The lane can be chosen
//! with the `x-switchyard-class` header, or by the tenant of the API key in `Authorization:
//! Bearer <key>` when keys are configured (then every `/v1` route needs a key; `/health` stays
//! open); responses carry `x-switchyard-lane`,
//! `x-switchyard-pool` and `x-switchyard-worker`. Dropping a response body (the client went
//! away) drops the dispatcher's output channel, which cancels the generation on the worker.

mod error;
#[cfg(test)]
mod fuzz;
mod handlers;
mod logprobs;
mod stream;
mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use switchyard_cluster::listen::{self, ConnectionTimeouts};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{AUTHORIZATION, ApiKeys, AuthError};
use crate::dispatch::Dispatcher;
use crate::metrics::RouterMetrics;

pub use error::ApiError;

/// The HTTP routes, sharing the gRPC server's dispatcher. With `keys`, the `/v1` routes
/// authenticate first (401 in OpenAI's shape) and hand the key's tenant to the handlers.
pub fn routes(dispatcher: Arc<Dispatcher>, keys: Option<Arc<ApiKeys>>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{model}", get(handlers::get_model));
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
    let metrics = dispatcher.config.metrics.router();
    api.route("/health", get(handlers::health))
        .layer(DefaultBodyLimit::max(handlers::MAX_BODY_BYTES))
        .with_state(dispatcher)
        // Prometheus scrapes without an API key, like `/health`.
        .merge(metrics)
        // After the merge, so that `/metrics` answers a wrong method in OpenAI's shape too.
        .fallback(handlers::unknown_route)
        .method_not_allowed_fallback(handlers::wrong_method)
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

/// What the HTTP door's API-key check needs.
#[derive(Clone)]
struct Gate {
    keys: Arc<ApiKeys>,
    metrics: RouterMetrics,
}

/// Checks `Authorization: Bearer <key>` and attaches the key's tenant to the request.
async fn authenticate(
    State(Gate { keys, metrics }): State<Gate>,
    mut request: Request,
    next: Next,
) -> Response {
    let value = match request.headers().get(AUTHORIZATION).map(|v| v.to_str()) {
        None => Ok(None),
        Some(Ok(value)) => Ok(Some(value)),
        Some(Err(_)) => Err(AuthError::Malformed),
    };
    match value.and_then(|value| keys.authenticate(value)) {
        Ok(tenant) => {
            request.extensions_mut().insert(tenant);
            next.run(request).await
        }
        Err(error) => {
            tracing::debug!(%error, path = request.uri().path(), "http request refused");
            metrics.auth_refused("http", &error);
            let mut response = ApiError::unauthenticated(error).into_response();
            handlers::tag_with_request_id(&mut response, request.headers(), request.uri().path());
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
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
            .route_layer(middleware::from_fn_with_state(gate, authenticate))
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
}
