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
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

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

/// Installs the global subscriber for component `service_name`: logs to stderr, plus OTLP/gRPC
/// span export when [`OTLP_ENDPOINT_ENV`] is set (non-empty). Must run inside a Tokio runtime
/// (the tonic exporter spawns its connection there).
pub fn init(service_name: &str) -> Result<Telemetry, TelemetryError> {
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
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
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
