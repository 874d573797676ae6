//! The OpenAI-compatible HTTP front door: `POST /v1/chat/completions`, `POST /v1/completions`
//! (both streaming as Server-Sent Events or not), `GET /v1/models`, `GET /v1/models/{model}`
//! and `GET /health`.
//!
//! Every generation goes through the same [`Dispatcher::prepare`] and [`Dispatcher::run`] as
//! the gRPC API: this module only translates HTTP ↔ `switchyard.v1`. The lane can be chosen
//! with the `x-switchyard-class` header; responses carry `x-switchyard-lane`,
//! `x-switchyard-pool` and `x-switchyard-worker`. Dropping a response body (the client went
//! away) drops the dispatcher's output channel, which cancels the generation on the worker.

mod error;
mod handlers;
mod stream;
mod wire;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;

pub use error::ApiError;

/// The HTTP routes, sharing the gRPC server's dispatcher.
pub fn routes(dispatcher: Arc<Dispatcher>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{model}", get(handlers::get_model))
        .route("/health", get(handlers::health))
        .fallback(handlers::unknown_route)
        .with_state(dispatcher)
}

/// Serves the HTTP API on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // Token chunks are small and latency-bound: never let Nagle hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, routes(dispatcher))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
