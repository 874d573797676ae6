//! Prometheus metrics: one [`Metrics`] registry per component, filled by the crates that own the
//! measurements (router, worker runtime, control plane), and an axum [`Router`] serving it as
//! `GET /metrics` in the OpenMetrics text format that Prometheus scrapes.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Content type of [`prometheus_client::encoding::text::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets (seconds) for time to first token: 5 ms to 30 s.
pub const TTFT_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];
/// Buckets (seconds) for the gap between tokens: 0.5 ms (wafer-scale) to 1 s.
pub const ITL_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// A component's metric registry, shared by whoever registers and by the `/metrics` handler.
#[derive(Clone, Default)]
pub struct Metrics {
    registry: Arc<RwLock<Registry>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers metrics (under the write lock; registration happens at start-up only).
    pub fn register<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self.registry.write().expect("metrics registry lock"))
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.read().expect("metrics registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// `GET /metrics`, to mount on any axum server.
    pub fn router(&self) -> Router {
        let metrics = self.clone();
        Router::new().route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { metrics_response(&metrics) }
            }),
        )
    }

    /// Binds `addr` (port 0 picks a free port) and serves `/metrics` there until `shutdown`
    /// fires, closing connections that stay silent past `timeouts`. Returns the bound address
    /// once listening.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        timeouts: crate::listen::ConnectionTimeouts,
        shutdown: CancellationToken,
    ) -> Result<SocketAddr, MetricsError> {
        let listener =
            crate::listen::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
        let incoming = crate::listen::plaintext(listener, timeouts)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        let bound = incoming.local_addr();
        let app = self.router();
        tokio::spawn(async move {
            let served = crate::listen::serve_http(incoming, app, timeouts, shutdown).await;
            if let Err(error) = served {
                tracing::warn!(%error, "metrics server failed");
            }
        });
        tracing::info!(address = %bound, "metrics ready");
        Ok(bound)
    }
}

fn metrics_response(metrics: &Metrics) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        metrics.encode(),
    )
        .into_response()
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    use super::*;

    #[test]
    fn encodes_registered_metrics() {
        let metrics = Metrics::new();
        let family = metrics.register(|r| {
            let family = Family::<Vec<(String, String)>, Counter>::default();
            r.register("switchyard_test_events", "Events.", family.clone());
            family
        });
        family
            .get_or_create(&vec![("lane".into(), "cost_sensitive".into())])
            .inc_by(3);
        let text = metrics.encode();
        assert!(
            text.contains("switchyard_test_events_total{lane=\"cost_sensitive\"} 3"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let metrics = Metrics::new();
        let counter = metrics.register(|r| {
            let c = Counter::<u64>::default();
            r.register("switchyard_test_hits", "Hits.", c.clone());
            c
        });
        counter.inc();
        let shutdown = CancellationToken::new();
        let addr = metrics
            .serve(
                "127.0.0.1:0".parse().unwrap(),
                Default::default(),
                shutdown.clone(),
            )
            .await
            .unwrap();
        assert_ne!(addr.port(), 0);
        // A bare HTTP/1.1 request: no HTTP client dependency in this crate.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text; version=1.0.0"),
            "{response}"
        );
        assert!(
            response.contains("switchyard_test_hits_total 1"),
            "{response}"
        );
        shutdown.cancel();
    }
}
