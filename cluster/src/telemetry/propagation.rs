//! W3C trace context (`traceparent`/`tracestate`) across process boundaries: read from HTTP
//! headers and gRPC metadata, carried as a string map inside worker `Start` frames (the
//! router–worker stream is shared by many requests, so per-request context cannot ride on its
//! metadata), and attached to `tracing` spans as their OpenTelemetry parent.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header carrying the trace id and parent span id.
pub const TRACEPARENT: &str = "traceparent";

/// A trace context received from another process (possibly empty), for crates that attach it
/// to their spans without depending on OpenTelemetry themselves.
#[derive(Debug, Clone, Default)]
pub struct RemoteContext(Context);

impl RemoteContext {
    /// No remote parent: the span starts a new trace (when traced at all).
    pub fn none() -> Self {
        Self::default()
    }

    /// From HTTP headers or gRPC metadata (`MetadataMap::as_ref`).
    pub fn from_headers(headers: &http::HeaderMap) -> Self {
        Self(from_headers(headers))
    }

    /// From a string map (a worker `Start` frame's `trace_context`, request metadata).
    pub fn from_map(map: &HashMap<String, String>) -> Self {
        Self(from_map(map))
    }

    /// Whether it names a remote span.
    pub fn is_valid(&self) -> bool {
        self.0.span().span_context().is_valid()
    }

    /// The trace id as 32 hex digits, when valid.
    pub fn trace_id(&self) -> Option<String> {
        self.is_valid()
            .then(|| self.0.span().span_context().trace_id().to_string())
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The trace context in HTTP headers (or gRPC metadata, via `MetadataMap::as_ref`); an empty
/// context when there is none or it is malformed.
pub fn from_headers(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace context in a string map (a worker `Start` frame's `trace_context`).
pub fn from_map(map: &HashMap<String, String>) -> Context {
    TraceContextPropagator::new().extract(map)
}

/// `span`'s trace context as a string map, for a `Start` frame. Empty when `span` is not
/// traced (no OpenTelemetry layer installed and no remote parent).
pub fn span_to_map(span: &tracing::Span) -> HashMap<String, String> {
    to_map(&span.context())
}

/// `cx` as W3C headers in a string map (empty when `cx` holds no valid span).
pub fn to_map(cx: &Context) -> HashMap<String, String> {
    let mut map = HashMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(cx, &mut map);
    }
    map
}

/// Makes `parent` the OpenTelemetry parent of `span`, when `parent` holds a remote span.
/// Without an OpenTelemetry layer this does nothing.
pub fn set_parent(span: &tracing::Span, parent: RemoteContext) {
    if parent.is_valid() {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
        let _ = span.set_parent(parent.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn headers_round_trip_through_a_map() {
        let mut headers = http::HeaderMap::new();
        headers.insert(TRACEPARENT, PARENT.parse().unwrap());
        let cx = from_headers(&headers);
        let span = cx.span().span_context().clone();
        assert!(span.is_valid());
        assert_eq!(
            span.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let map = to_map(&cx);
        assert_eq!(map.get(TRACEPARENT).map(String::as_str), Some(PARENT));
        let again = from_map(&map);
        assert_eq!(again.span().span_context().span_id(), span.span_id());
        assert_eq!(
            RemoteContext::from_map(&map).trace_id().as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }

    #[test]
    fn missing_or_malformed_context_is_empty() {
        let mut headers = http::HeaderMap::new();
        assert!(to_map(&from_headers(&headers)).is_empty());
        headers.insert(TRACEPARENT, "00-not-a-trace-01".parse().unwrap());
        assert!(!from_headers(&headers).span().span_context().is_valid());
        assert!(to_map(&from_headers(&headers)).is_empty());
    }
}
