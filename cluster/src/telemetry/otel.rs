//! The global `tracing` subscriber with an optional OpenTelemetry layer. The OTLP exporter is
//! configured by the standard `OTEL_*` environment variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
//! `OTEL_BSP_SCHEDULE_DELAY`, …); `service.name` is the component's name unless
//! `OTEL_SERVICE_NAME` says otherwise.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

use super::{LatestSpanFields, LogFormat, colour_stderr};

/// The variable that switches OTLP export on.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{OTLP_ENDPOINT_ENV}={endpoint:?}: {message}")]
    Exporter { endpoint: String, message: String },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled,
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes spans not yet exported.
#[must_use = "dropping the handle without shutdown loses the last batch of spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Writes log lines on a thread of its own; flushes what is buffered when dropped.
    _logs: WorkerGuard,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("otlp", &self.provider.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Whether spans are exported by OTLP.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter. Blocks while flushing, so it
    /// runs on a blocking thread (the tonic exporter needs the runtime's reactor meanwhile).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("telemetry: flushing spans failed: {error}"),
            Err(join) => eprintln!("telemetry: flushing spans failed: {join}"),
        }
    }
}

/// `RUST_LOG`, or `info`.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

/// The layer writing log lines to `writer` in `format`: text (with ANSI colours when `ansi`;
/// each span field once, with its latest value) or JSON, one object a line with the event's
/// `fields`, its current `span` and the list of `spans`, each with its fields.
pub fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .and_then(LatestSpanFields)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(writer)
            .with_ansi(false)
            .boxed(),
    }
}

/// Installs the global subscriber for component `service_name`: logs to stderr in `format`,
/// plus OTLP/gRPC span export when [`OTLP_ENDPOINT_ENV`] is set (non-empty). Must run inside a
/// Tokio runtime (the tonic exporter spawns its connection there).
pub fn init(service_name: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let endpoint = std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .filter(|e| !e.trim().is_empty());
    let provider = match &endpoint {
        Some(endpoint) => Some(tracer_provider(service_name, endpoint)?),
        None => None,
    };
    // Log lines go to stderr from a thread of their own, so a request's log line never blocks
    // the task serving it on a write; none is dropped (a full buffer waits instead). The
    // buffer's slots are allocated up front: 8 Ki lines ride out a burst without the 128 Ki
    // default's few MiB.
    let (writer, logs) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(8_192)
        .finish(std::io::stderr());
    let fmt = log_layer(format, writer, format == LogFormat::Text && colour_stderr());
    // The exporter's own transport must not be traced: its spans would feed the exporter.
    let otel = provider.as_ref().map(|provider| {
        let quiet = Targets::new()
            .with_default(tracing::Level::TRACE)
            .with_target("h2", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper", tracing::level_filters::LevelFilter::OFF)
            .with_target("hyper_util", tracing::level_filters::LevelFilter::OFF)
            .with_target("tonic", tracing::level_filters::LevelFilter::OFF)
            .with_target("tower", tracing::level_filters::LevelFilter::OFF)
            .with_target("opentelemetry", tracing::level_filters::LevelFilter::OFF)
            .with_target(
                "opentelemetry_sdk",
                tracing::level_filters::LevelFilter::OFF,
            )
            .with_target(
                "opentelemetry_otlp",
                tracing::level_filters::LevelFilter::OFF,
            );
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name.to_string()))
            .with_filter(quiet)
    });
    tracing_subscriber::registry()
        .with(env_filter())
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|_| TelemetryError::AlreadyInstalled)?;
    if let Some(endpoint) = endpoint {
        tracing::info!(%endpoint, service = service_name, "exporting spans by otlp/grpc");
    }
    Ok(Telemetry {
        provider,
        _logs: logs,
    })
}

fn tracer_provider(
    service_name: &str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|error| TelemetryError::Exporter {
            endpoint: endpoint.to_string(),
            message: error.to_string(),
        })?;
    // OTEL_SERVICE_NAME (read by the default resource detectors) wins over our default.
    let service_name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| service_name.to_string());
    let resource = Resource::builder().with_service_name(service_name).build();
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(exporter)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::capture::CapturedLogs;

    fn log_one_request(format: LogFormat, ansi: bool) -> String {
        let captured = CapturedLogs::default();
        let writer = captured.clone();
        let subscriber =
            tracing_subscriber::registry().with(log_layer(format, move || writer.clone(), ansi));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!(
                "router.request",
                request_id = "r-1",
                lane = tracing::field::Empty,
                worker = tracing::field::Empty
            );
            span.record("lane", "batch");
            span.record("lane", "latency-critical");
            span.record("worker", "gpu-7");
            span.in_scope(|| tracing::info!(tokens = 12u64, "accepted"));
        });
        captured.text()
    }

    #[test]
    fn json_lines_parse_with_the_event_and_its_spans_fields() {
        let text = log_one_request(LogFormat::Json, true);
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        assert_eq!(line["level"], "INFO", "{line}");
        assert!(line["timestamp"].is_string(), "{line}");
        assert_eq!(line["target"], module_path!(), "{line}");
        assert_eq!(line["fields"]["message"], "accepted", "{line}");
        assert_eq!(line["fields"]["tokens"], 12, "{line}");
        assert_eq!(line["span"]["name"], "router.request", "{line}");
        assert_eq!(line["span"]["request_id"], "r-1", "{line}");
        assert_eq!(line["span"]["lane"], "latency-critical", "{line}");
        assert_eq!(line["span"]["worker"], "gpu-7", "{line}");
        assert_eq!(line["spans"][0]["request_id"], "r-1", "{line}");
        assert!(!text.contains('\x1b'), "no escape codes in JSON: {text}");
    }

    #[test]
    fn text_lines_carry_each_span_field_once_and_colour_only_when_asked() {
        let text = log_one_request(LogFormat::Text, false);
        assert!(
            text.contains(
                r#"router.request{request_id="r-1" lane="latency-critical" worker="gpu-7"}"#
            ),
            "{text}"
        );
        assert_eq!(text.matches("lane=").count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        let coloured = log_one_request(LogFormat::Text, true);
        assert!(coloured.contains('\x1b'), "{coloured}");
        assert_eq!(coloured.matches("lane").count(), 1, "{coloured}");
    }
}
