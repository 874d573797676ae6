//! The router's span of one request, and the routing decision recorded on it.

use tracing::field::Empty;
use tracing::{Span, info_span};

/// The router's span of one request. The routing decision is recorded on it — `lane` (and the
/// classifier's reason) when classified, `pool`, `worker` and the full `reason` when placed —
/// so a trace shows where a request ran and why; `queue_ms` is the wait at the router for a
/// slot, when it had to wait. Fields recorded again (the lane and reason once classified, then
/// once placed, then after a move) replace their earlier value on log lines (the log layer of
/// `switchyard_cluster::telemetry` prints each once), so events inside the span need not, and
/// should not, repeat them.
pub fn request_span(request_id: &str, model: &str) -> Span {
    info_span!(
        "router.request",
        otel.kind = "server",
        request_id,
        model,
        lane = Empty,
        pool = Empty,
        worker = Empty,
        reason = Empty,
        queue_ms = Empty,
        predicted_cached_tokens = Empty,
        cached_tokens = Empty
    )
}

/// Records a placement on a request span (see [`request_span`]).
pub fn record_decision(span: &Span, lane: &str, pool: &str, worker: &str, reason: &str) {
    span.record("lane", lane);
    span.record("pool", pool);
    span.record("worker", worker);
    span.record("reason", reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::LaneName;
    use switchyard_cluster::telemetry::capture::CapturedLogs;
    use tracing::info;

    #[test]
    fn the_routing_decision_is_recorded_on_the_request_span() {
        let captured = CapturedLogs::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = request_span("r-1", "m");
            record_decision(
                &span,
                LaneName::LatencyCritical.as_str(),
                "gpu",
                "gpu-7",
                "spill=gpu (no wse slot meets the slo)",
            );
            // An event inside the span carries its fields too.
            span.in_scope(|| info!("accepted"));
        });
        let text = captured.text();
        for field in [
            "request_id=\"r-1\"",
            "lane=\"latency-critical\"",
            "pool=\"gpu\"",
            "worker=\"gpu-7\"",
            "reason=\"spill=gpu (no wse slot meets the slo)\"",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert!(text.contains("close"), "the span closed: {text}");
    }

    /// The request's INFO line as a component writes it: classified, admitted, placed (the
    /// lane and reason recorded three times, pool and worker twice), each field once.
    #[test]
    fn the_accepted_line_carries_each_field_once() {
        use tracing_subscriber::layer::SubscriberExt as _;
        let captured = CapturedLogs::default();
        let writer = captured.clone();
        let subscriber =
            tracing_subscriber::registry().with(switchyard_cluster::telemetry::otel::log_layer(
                switchyard_cluster::telemetry::LogFormat::Text,
                move || writer.clone(),
                false,
            ));
        tracing::subscriber::with_default(subscriber, || {
            let span = request_span("r-1", "m");
            for _ in 0..2 {
                span.record("lane", "cost-sensitive");
                span.record("reason", "default lane=cost-sensitive");
            }
            span.record("pool", "gpu");
            span.record("worker", "gpu-7");
            record_decision(
                &span,
                "cost-sensitive",
                "gpu",
                "gpu-7",
                "default lane=cost-sensitive; pool=gpu predicted_ttft_ms=150",
            );
            span.in_scope(|| info!("accepted"));
        });
        let text = captured.text();
        // (The reason's text has `lane=…` and `pool=…` in it, unquoted.)
        for field in [
            "request_id=\"",
            "lane=\"",
            "pool=\"",
            "worker=\"",
            "reason=\"",
        ] {
            assert_eq!(text.matches(field).count(), 1, "{field} in {text}");
        }
        assert!(
            text.contains(
                r#"reason="default lane=cost-sensitive; pool=gpu predicted_ttft_ms=150""#
            ),
            "the latest reason: {text}"
        );
    }
}
