//! The control plane's own spans: one per `Admin` gRPC call (all but `Report`, a router's
//! stream that lasts as long as its link) and per dashboard write (drain, undrain, sign-in,
//! sign-out), exported over OTLP with the process's other spans when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`switchyard_cluster::telemetry`), and continuing the
//! caller's W3C trace context when the call carries one.
//!
//! Each is named `control_plane.<action>` and carries `action` (`drain`, `set_policy`,
//! `sign_in`, `list_workers`, …), `via` (`grpc`, `dashboard`), `target` (the worker id,
//! `policy`, the pool `list_workers` asks for; empty otherwise), `peer` (the caller's address),
//! `who` and `role` once the caller is known (a write's operator, a refused viewer, a sign-in),
//! and `outcome`: `ok`, `refused` (the credential), `invalid`, `not_found`, `not_leader`,
//! `unavailable` or `error`, with the message in `error` when not `ok`. Tokens never reach a
//! span.

use std::future::Future;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use switchyard_cluster::telemetry::propagation::{self, RemoteContext};
use tracing::{Instrument as _, Span};

/// The span of admin call `$action` through door `$via` on `$target`, from `$peer` (an
/// `Option<SocketAddr>`), in the trace `$headers` name, if any. A macro because a span's name
/// is fixed at compile time.
macro_rules! admin_span {
    ($via:literal, $action:literal, $target:expr, $peer:expr, $headers:expr) => {{
        let span = tracing::info_span!(
            concat!("control_plane.", $action),
            otel.kind = "server",
            action = $action,
            via = $via,
            target = $target,
            peer = $peer.map(tracing::field::display),
            who = tracing::field::Empty,
            role = tracing::field::Empty,
            outcome = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        $crate::spans::continue_trace(&span, $headers);
        span
    }};
}
pub(crate) use admin_span;

/// Makes the trace context in `headers` (gRPC metadata or HTTP headers) `span`'s parent.
pub(crate) fn continue_trace(span: &Span, headers: &HeaderMap) {
    propagation::set_parent(span, RemoteContext::from_headers(headers));
}

/// Records who is calling on the current admin span (a no-op outside one).
pub(crate) fn record_caller(name: &str, role: &str) {
    let span = Span::current();
    span.record("who", name);
    span.record("role", role);
}

/// Records why the call failed on the current admin span (a no-op outside one).
pub(crate) fn record_error(message: &str) {
    Span::current().record("error", message);
}

/// Runs a gRPC call in `span` and records how it ended.
pub(crate) async fn grpc<T>(
    span: Span,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let answer = call.instrument(span.clone()).await;
    if let Err(status) = &answer {
        span.record("error", status.message());
    }
    let code = answer
        .as_ref()
        .map_or_else(tonic::Status::code, |_| tonic::Code::Ok);
    span.record("outcome", grpc_outcome(code));
    answer
}

/// Runs a dashboard request in `span` and records how it ended (its `error`, when any, is
/// recorded where the answer is made: [`record_error`]).
pub(crate) async fn http<R: IntoResponse>(span: Span, call: impl Future<Output = R>) -> Response {
    let response = async { call.await.into_response() }
        .instrument(span.clone())
        .await;
    span.record("outcome", http_outcome(response.status()));
    response
}

fn grpc_outcome(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Unauthenticated | Code::PermissionDenied => "refused",
        Code::InvalidArgument => "invalid",
        Code::NotFound => "not_found",
        Code::FailedPrecondition => "not_leader",
        Code::Unavailable => "unavailable",
        _ => "error",
    }
}

fn http_outcome(status: StatusCode) -> &'static str {
    match status {
        s if s.is_success() => "ok",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "refused",
        StatusCode::BAD_REQUEST => "invalid",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "not_leader",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "error",
    }
}
