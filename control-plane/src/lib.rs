//! The Switchyard control plane: the `Admin` gRPC API over the cluster's registry, including
//! the routing policy store (`GetPolicy`/`SetPolicy` on `/switchyard/v1/policy`, validated
//! with the router's own policy code before it is stored).

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;

use switchyard_cluster::{Pool, Registry, RegistryError, WorkerRecord};
use switchyard_proto::v1::{self, admin_server::AdminServer};
use switchyard_router::policy::document::PolicyDocument;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    pub listen: SocketAddr,
    /// Where the control plane registers its Prometheus metrics (the caller serves them).
    pub metrics: switchyard_cluster::telemetry::metrics::Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
}

/// The `Admin` service.
pub struct AdminService {
    registry: Arc<dyn Registry>,
}

impl AdminService {
    pub fn new(registry: Arc<dyn Registry>) -> Self {
        Self { registry }
    }
}

fn registry_status(error: RegistryError) -> Status {
    Status::unavailable(format!("cluster registry unreachable: {error}"))
}

fn worker_info(record: WorkerRecord) -> v1::WorkerInfo {
    v1::WorkerInfo {
        id: record.id,
        pool: record.pool.to_string(),
        address: record.address,
        models: record.models,
        max_concurrent: record.capacity.max_concurrent,
        tokens_per_s: record.capacity.tokens_per_s,
        cost_per_mtok: record.capacity.cost_per_mtok,
        hardware: record.hardware,
        version: record.version,
        state: record.state.as_str().to_string(),
        engine: record.engine,
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let pool = request.into_inner().pool;
        let pool: Option<Pool> = if pool.is_empty() {
            None
        } else {
            Some(
                pool.parse()
                    .map_err(|e: String| Status::invalid_argument(format!("pool: {e}")))?,
            )
        };
        let mut workers: Vec<_> = self
            .registry
            .list_workers()
            .await
            .map_err(registry_status)?
            .into_iter()
            .filter(|w| pool.is_none_or(|p| w.pool == p))
            .collect();
        workers.sort_by(|a, b| (a.pool, &a.id).cmp(&(b.pool, &b.id)));
        Ok(Response::new(v1::ListWorkersResponse {
            workers: workers.into_iter().map(worker_info).collect(),
        }))
    }

    async fn get_policy(
        &self,
        _request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        let stored = self.registry.get_policy().await.map_err(registry_status)?;
        let response = match stored {
            Some(bytes) => v1::GetPolicyResponse {
                document: String::from_utf8_lossy(&bytes).into_owned(),
                is_default: false,
            },
            None => v1::GetPolicyResponse {
                document: PolicyDocument::default().to_json(),
                is_default: true,
            },
        };
        Ok(Response::new(response))
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        let document = request.into_inner().document;
        let policy = PolicyDocument::from_json(document.as_bytes())
            .map_err(|e| Status::invalid_argument(format!("document: {e}")))?;
        let normalised = policy.to_json();
        self.registry
            .put_policy(normalised.clone().into_bytes())
            .await
            .map_err(registry_status)?;
        info!(rules = policy.rules.len(), "routing policy stored");
        Ok(Response::new(v1::SetPolicyResponse {
            document: normalised,
        }))
    }
}

/// Serves the control plane until `shutdown` fires; `on_ready` gets the bound gRPC address.
pub async fn run_control_plane(
    config: ControlPlaneConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ControlPlaneError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControlPlaneError::Bind {
                addr: config.listen,
                source,
            })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Bind {
            addr: config.listen,
            source,
        })?;
    let membership = registry.watch_workers().await?;
    let gauges = metrics::ControlPlaneMetrics::register(&config.metrics);
    tokio::spawn(gauges.follow(membership, shutdown.clone()));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(AdminServer::new(AdminService::new(registry)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned());
    info!(address = %bound, "control plane ready");
    on_ready(bound);
    server.await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cluster::MemoryRegistry;
    use v1::admin_server::Admin as _;

    #[tokio::test]
    async fn set_policy_validates_stores_and_get_returns_it() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let admin = AdminService::new(registry.clone());
        let got = admin
            .get_policy(Request::new(v1::GetPolicyRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(got.is_default);

        let err = admin
            .set_policy(Request::new(v1::SetPolicyRequest {
                document: r#"{"placement": {"choices": 0}}"#.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("placement.choices"),
            "{}",
            err.message()
        );
        assert_eq!(registry.get_policy().await.unwrap(), None);

        admin
            .set_policy(Request::new(v1::SetPolicyRequest {
                document: r#"{"default_lane": "latency-critical"}"#.into(),
            }))
            .await
            .unwrap();
        let got = admin
            .get_policy(Request::new(v1::GetPolicyRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(!got.is_default);
        assert!(
            got.document
                .contains(r#""default_lane": "latency-critical""#)
        );
    }
}
