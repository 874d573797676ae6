//! Telemetry shared by every Switchyard binary:
//!
//! - logs: `tracing` to stderr, level from `RUST_LOG` (default `info`), so stdout stays free for
//!   machine-readable output;
//! - traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans are also exported by OTLP/gRPC
//!   ([`otel`]), and W3C trace context crosses process boundaries ([`propagation`]);
//! - metrics: a Prometheus registry per component and an axum router serving it ([`metrics`]).

pub mod metrics;
pub mod otel;
pub mod propagation;
pub mod weighted_histogram;

pub use otel::{Telemetry, TelemetryError, init};

/// Installs a logs-only global subscriber (no OTLP export). Safe to call more than once (later
/// calls are no-ops). Binaries call [`init`] instead.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(otel::env_filter())
        .with_writer(std::io::stderr)
        .try_init();
}
