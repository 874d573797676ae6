//! Running the router: membership watch, worker links, and the gRPC server (Inference, health,
//! reflection).

use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_cluster::{Registry, RegistryError};
use switchyard_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::RouterConfig;
use crate::dispatch::Dispatcher;
use crate::links::Links;
use crate::service::InferenceService;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("invalid config: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` fires. `on_ready` gets the bound gRPC address once serving.
pub async fn run_router(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), RouterError> {
    config.validate().map_err(RouterError::Config)?;
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

    let membership = registry.watch_workers().await?;
    let links = Links::spawn(membership, config.connect_timeout, shutdown.clone());
    let policy =
        crate::policy_watch::follow(&registry, config.default_policy(), shutdown.clone()).await?;
    let dispatcher = Arc::new(Dispatcher::new(links, config, policy));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InferenceServer::new(InferenceService::new(dispatcher)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned());
    info!(address = %bound, "router ready");
    on_ready(bound);
    server.await?;
    info!("router stopped");
    Ok(())
}
