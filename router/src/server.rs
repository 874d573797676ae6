//! Running the router: membership watch, worker links, the gRPC server (Inference, health,
//! reflection) and, when configured, the OpenAI-compatible HTTP server on its own port, both
//! sharing one dispatcher.

use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_cluster::{Registry, RegistryError};
use switchyard_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::auth::{ApiKeys, ApiKeysError};
use crate::config::RouterConfig;
use crate::dispatch::Dispatcher;
use crate::links::Links;
use crate::service::{AuthInterceptor, InferenceService};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    ApiKeys(#[from] ApiKeysError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("http server: {0}")]
    Http(std::io::Error),
}

/// The addresses a running router serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterEndpoints {
    pub grpc: SocketAddr,
    /// The OpenAI-compatible HTTP API, when `http_listen` is set.
    pub http: Option<SocketAddr>,
}

/// Serves until `shutdown` fires. `on_ready` gets the bound gRPC address once serving.
pub async fn run_router(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RouterError> {
    run_router_with_endpoints(config, registry, shutdown, |endpoints| {
        on_ready(endpoints.grpc)
    })
    .await
}

/// Like [`run_router`], and `on_ready` gets every bound address (gRPC and HTTP).
pub async fn run_router_with_endpoints(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(RouterEndpoints),
) -> Result<(), RouterError> {
    config.validate().map_err(RouterError::Config)?;
    let api_keys = match &config.api_keys_file {
        Some(path) => {
            let keys = ApiKeys::load(path)?;
            info!(keys = keys.len(), "api key authentication on");
            Some(Arc::new(keys))
        }
        None => None,
    };
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| RouterError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| RouterError::Bind {
        addr: config.listen,
        source,
    })?;

    let http_listener = match config.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| RouterError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| RouterError::Bind { addr, source })?;
            Some((listener, bound))
        }
        None => None,
    };

    let membership = registry.watch_workers().await?;
    let links = Links::spawn(membership, config.connect_timeout, shutdown.clone());
    let policy =
        crate::policy_watch::follow(&registry, config.default_policy(), shutdown.clone()).await?;
    let metrics = crate::metrics::RouterMetrics::register(&config.metrics);
    let dispatcher = Arc::new(Dispatcher::new(links, config, policy, metrics));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Only Inference is authenticated: health and reflection stay open to probes and tools.
        .add_service(InferenceServer::with_interceptor(
            InferenceService::new(dispatcher.clone()),
            AuthInterceptor::new(api_keys.clone()),
        ))
        .serve_with_incoming_shutdown(
            // Streams carry small frames: Nagle's algorithm would hold them back
            // for the peer's delayed ACK (~40 ms). Builder's tcp_nodelay does not reach
            // a listener of our own.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.clone().cancelled_owned(),
        );
    let (http_server, http_bound) = match http_listener {
        Some((listener, bound)) => {
            info!(address = %bound, "router http (OpenAI-compatible) ready");
            let server = crate::openai::serve(listener, dispatcher, api_keys, shutdown.clone());
            (Some(server), Some(bound))
        }
        None => (None, None),
    };
    info!(address = %bound, "router ready");
    on_ready(RouterEndpoints {
        grpc: bound,
        http: http_bound,
    });
    match http_server {
        Some(http) => {
            let (grpc, http) = tokio::join!(server, http);
            grpc?;
            http.map_err(RouterError::Http)?;
        }
        None => server.await?,
    }
    info!("router stopped");
    Ok(())
}
