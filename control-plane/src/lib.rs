//! The Switchyard control plane: the `Admin` gRPC API and the ops dashboard over the cluster's
//! registry — workers with live load, the routing policy store (validated with the router's own
//! policy code before it is stored), drains (`drain/<worker_id>`), cluster stats and events —
//! and leader election among replicas (`leader/control-plane`): only the leader writes.

pub mod admin;
pub mod auth;
pub mod dashboard;
pub mod decisions;
pub mod events;
pub mod forward;
pub mod guard;
pub mod history;
pub mod leader;
pub mod loads;
pub mod plane;
pub mod reports;
pub mod routers;
pub mod session;
mod spans;
pub mod waiting;

pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::listen::{ConnectionTimeouts, serve_http};
use switchyard_cluster::tls::Alpn;
use switchyard_cluster::{Registry, RegistryError};
use switchyard_proto::v1::admin_server::AdminServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use admin::AdminService;
pub use leader::{ElectionConfig, Leadership, ReplicaInfo, Role};
pub use plane::{ControlPlane, OpError};

#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// This replica's id (in the leader key and logs).
    pub id: String,
    /// Admin gRPC listen address.
    pub listen: SocketAddr,
    /// The gRPC address stored in the leader key, which routers dial to report and followers
    /// name in their refusals; `None`: the bound address (unreachable from other hosts when
    /// listening on 0.0.0.0 — set it, e.g. to the pod IP, there).
    pub advertise: Option<String>,
    /// Dashboard listen address; `None` serves no dashboard.
    pub http_listen: Option<SocketAddr>,
    pub election: ElectionConfig,
    /// Where the control plane registers its Prometheus metrics (the caller serves them).
    pub metrics: switchyard_cluster::telemetry::metrics::Metrics,
    /// How the dashboard and the Admin API protect themselves.
    pub security: SecurityConfig,
    /// How long a connection to either listener may take to send its first request, and
    /// stay silent afterwards (see [`switchyard_cluster::listen`]).
    pub connections: ConnectionTimeouts,
}

/// The control plane's protections (see [`guard`]).
#[derive(Debug, Clone, Default)]
pub struct SecurityConfig {
    /// `Host` names the dashboard answers to besides IP literals and `localhost`.
    pub dashboard_hosts: guard::HostAllowlist,
    /// Who may write (drain, undrain, set the policy); open when no tokens are configured.
    pub access: auth::Access,
    /// The cluster token presented on the load streams to workers.
    pub cluster_token: Option<switchyard_cluster::credential::ClusterToken>,
    /// TLS: the certificate the gRPC listener and the dashboard serve, and the CA trusted on
    /// the load streams to workers. Default: plaintext.
    pub tls: switchyard_cluster::tls::TlsFiles,
}

/// Where a running control plane serves.
#[derive(Debug, Clone, Copy)]
pub struct Endpoints {
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("dashboard server: {0}")]
    Http(std::io::Error),
    #[error("invalid config: {0}")]
    Config(String),
}

/// gRPC streams one connection may have open at once (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`):
/// an operator's watches and calls, or a router's report stream.
const MAX_CONNECTION_STREAMS: u32 = 1024;

/// How long the servers answering while the registry did not are given to close their
/// connections once it does.
const WAITING_DRAIN: Duration = Duration::from_secs(1);

/// Which election runs (a standalone replica never resigns).
enum ElectionKind {
    Standalone,
    Etcd,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ControlPlaneError> {
    let listener = switchyard_cluster::listen::bind(addr)
        .map_err(|source| ControlPlaneError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlPlaneError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// Serves `routes` over gRPC on `listener` (bound to `addr`) until `stop` fires: every
/// connection's streams bounded, unreadable requests answered as the client's fault.
async fn serve_grpc(
    routes: tonic::service::Routes,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<switchyard_cluster::tls::ServerTls>>,
    connections: ConnectionTimeouts,
    stop: CancellationToken,
) -> Result<(), ControlPlaneError> {
    let server =
        switchyard_cluster::grpc_server::builder(MAX_CONNECTION_STREAMS).add_routes(routes);
    let bind_error = |source| ControlPlaneError::Bind { addr, source };
    let stop = stop.cancelled_owned();
    match tls {
        Some(tls) => {
            let incoming =
                switchyard_cluster::tls::listen(listener, tls, connections).map_err(bind_error)?;
            server.serve_with_incoming_shutdown(incoming, stop).await?
        }
        None => {
            let incoming =
                switchyard_cluster::listen::plaintext(listener, connections).map_err(bind_error)?;
            server.serve_with_incoming_shutdown(incoming, stop).await?
        }
    }
    Ok(())
}

/// Serves the dashboard `app` on `listener` (bound to `addr`) until `stop` fires.
async fn serve_dashboard(
    app: axum::Router,
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<switchyard_cluster::tls::ServerTls>>,
    connections: ConnectionTimeouts,
    stop: CancellationToken,
) -> Result<(), ControlPlaneError> {
    let bind_error = |source| ControlPlaneError::Bind { addr, source };
    match tls {
        Some(tls) => {
            let incoming =
                switchyard_cluster::tls::listen(listener, tls, connections).map_err(bind_error)?;
            serve_http(incoming, app, connections, stop).await
        }
        None => {
            let incoming =
                switchyard_cluster::listen::plaintext(listener, connections).map_err(bind_error)?;
            serve_http(incoming, app, connections, stop).await
        }
    }
    .map_err(ControlPlaneError::Http)
}

/// Serves the control plane until `shutdown` fires; `on_ready` gets the bound addresses (as
/// soon as they are bound: until the registry first answers the control plane serves
/// "waiting", see [`waiting`]).
pub async fn run_control_plane(
    config: ControlPlaneConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Endpoints),
) -> Result<(), ControlPlaneError> {
    config
        .connections
        .validate()
        .map_err(ControlPlaneError::Config)?;
    let tls_error = |e: switchyard_cluster::tls::TlsError| ControlPlaneError::Config(e.to_string());
    let grpc_tls = config.security.tls.server(Alpn::Grpc).map_err(tls_error)?;
    let http_tls = config.security.tls.server(Alpn::Http).map_err(tls_error)?;
    let (grpc_listener, grpc) = bind(config.listen).await?;
    let http = match config.http_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let endpoints = Endpoints {
        grpc,
        http: http.as_ref().map(|(_, a)| *a),
    };

    // The registry's own metrics: the restarts of the etcd watches it keeps for the control
    // plane (membership and policy, below).
    registry.register_metrics(&config.metrics);
    if config.advertise.is_none() && grpc.ip().is_unspecified() {
        tracing::warn!(
            %grpc,
            "the control plane advertises an unspecified address: routers on other hosts cannot \
             reach it to report (set --advertise)"
        );
    }
    let me = ReplicaInfo {
        id: config.id.clone(),
        grpc: config.advertise.clone().unwrap_or_else(|| grpc.to_string()),
        http: endpoints.http.map(|a| a.to_string()),
    };
    let election_kind = match config.election {
        ElectionConfig::Standalone => ElectionKind::Standalone,
        ElectionConfig::Etcd { .. } => ElectionKind::Etcd,
    };
    let standalone = matches!(election_kind, ElectionKind::Standalone);
    // No leader key: the registry tells routers where to report.
    let standalone_record =
        standalone.then(|| serde_json::to_vec(&me).expect("replica info serialises"));
    let connections = config.connections;

    // Until the registry first answers, the listeners serve "waiting" (see `waiting`). The
    // addresses are announced once the control plane serves, or once it is known to wait.
    let mut on_ready = Some(on_ready);
    let waited = CancellationToken::new();
    let waiting_grpc = serve_grpc(
        waiting::grpc_routes().await,
        waiting::twin(&grpc_listener)
            .map_err(|source| ControlPlaneError::Bind { addr: grpc, source })?,
        grpc,
        grpc_tls.clone(),
        connections,
        waited.clone(),
    );
    let waiting_http = match &http {
        Some((listener, bound)) => Some(serve_dashboard(
            waiting::dashboard(),
            waiting::twin(listener).map_err(|source| ControlPlaneError::Bind {
                addr: *bound,
                source,
            })?,
            *bound,
            http_tls.clone(),
            connections,
            waited.clone(),
        )),
        None => None,
    };
    let waiting_servers = tokio::spawn(async move {
        let http = async {
            match waiting_http {
                Some(server) => server.await,
                None => Ok(()),
            }
        };
        let (grpc, http) = tokio::join!(waiting_grpc, http);
        grpc.and(http)
    });
    let contact = waiting::first_contact(
        registry.as_ref(),
        standalone_record.as_deref(),
        || {
            if let Some(announce) = on_ready.take() {
                announce(endpoints);
            }
        },
        &shutdown,
    )
    .await;
    // They stop accepting at once; a connection still open on them (a health watch, say) may
    // take its time to go, and is not waited for long.
    waited.cancel();
    match tokio::time::timeout(WAITING_DRAIN, waiting_servers).await {
        Ok(Ok(Err(error))) => tracing::warn!(%error, "serving while waiting for etcd failed"),
        Ok(Err(panicked)) => std::panic::resume_unwind(panicked.into_panic()),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    // One watch of the membership and one of the policy key, each reader (the event feed, the
    // history's SLOs) on a receiver of its own: an etcd outage restarts it, and counts the
    // restart, once.
    let Some(waiting::FirstContact { membership, policy }) = contact? else {
        // Stopped before the registry ever answered.
        return Ok(());
    };

    let gauges = metrics::ControlPlaneMetrics::register(&config.metrics);
    tokio::spawn(gauges.follow(membership.clone(), shutdown.clone()));
    // Background tasks stop with the servers.
    let background = shutdown.child_token();
    let events = events::Events::spawn(membership.clone(), policy.clone(), background.clone());
    let loads = loads::Loads::spawn(
        membership.clone(),
        config.security.cluster_token.clone(),
        config.security.tls.client(),
        events.clone(),
        background.clone(),
    );
    // Replicas electing through etcd share signed-out dashboard sessions there.
    let revoked = match &config.election {
        ElectionConfig::Etcd { client, .. } => session::Revocations::in_etcd((**client).clone()),
        ElectionConfig::Standalone => session::Revocations::default(),
    };
    let leadership = Leadership::start(config.election, me, background.clone());
    let plane = ControlPlane::new(registry.clone(), loads, events, leadership.clone())
        .with_dashboard_tls(http_tls.is_some())
        // The dashboard answers from it while etcd does not answer (see `plane`).
        .with_membership(membership.clone());
    metrics::register_report_drops(&config.metrics, plane.insights().dropped.clone());
    metrics::register_report_ignores(&config.metrics, plane.insights().ignored.clone());
    // Both front doors share (clones of) this access rule, and so its refusal counts.
    config.security.access.register_metrics(&config.metrics);
    plane.insights().spawn_ticker(
        membership.clone(),
        plane.loads().clone(),
        policy,
        background.clone(),
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<AdminService>>().await;
    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services(&[
            <AdminServer<()> as tonic::server::NamedService>::NAME,
        ]);
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            AdminServer::new(
                AdminService::new(plane.clone())
                    .with_access(config.security.access.clone())
                    .with_cluster_token(config.security.cluster_token.clone())
                    .with_stopping(shutdown.clone()),
            )
            // Clients set to compress (policy documents, reports) are served as any other.
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .accept_compressed(tonic::codec::CompressionEncoding::Deflate),
        );
    let grpc_server = serve_grpc(
        routes,
        grpc_listener,
        grpc,
        grpc_tls,
        connections,
        shutdown.clone(),
    );
    let mut security = config.security.clone();
    security.dashboard_hosts = security.dashboard_hosts.served_over_tls(http_tls.is_some());
    let http_server = async {
        let Some((listener, bound)) = http else {
            return Ok(());
        };
        let app = dashboard::router(plane.clone(), security, revoked);
        serve_dashboard(
            app,
            listener,
            bound,
            http_tls,
            connections,
            shutdown.clone(),
        )
        .await
    };
    info!(
        id = %config.id,
        grpc = %grpc,
        http = %endpoints.http.map_or_else(|| "off".to_string(), |a| a.to_string()),
        "control plane ready"
    );
    if let Some(announce) = on_ready {
        announce(endpoints);
    }
    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    background.cancel();
    if standalone {
        let _ = registry.announce_standalone_control_plane(None).await;
    }
    if matches!(election_kind, ElectionKind::Etcd) {
        leadership.wait_resigned(Duration::from_secs(3)).await;
    }
    grpc_result?;
    http_result?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;
    use switchyard_cluster::{Capacity, MemoryRegistry, Pool, WorkerRecord, WorkerState};
    use switchyard_proto::v1;
    use tonic::Request;
    use v1::admin_server::Admin as _;

    async fn plane(registry: Arc<dyn Registry>, election: ElectionConfig) -> ControlPlane {
        let membership = registry.watch_workers().await.unwrap();
        let policy = registry.watch_policy().await.unwrap();
        let token = CancellationToken::new();
        let events = events::Events::spawn(membership.clone(), policy, token.clone());
        let me = ReplicaInfo {
            id: "cp-test".into(),
            grpc: "127.0.0.1:1".into(),
            http: None,
        };
        let leadership = Leadership::start(election, me, token);
        ControlPlane::new(registry, loads::Loads::default(), events, leadership)
    }

    /// A ready GPU worker record with id `id`.
    pub(crate) fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            pool: Pool::Gpu,
            address: "127.0.0.1:1".into(),
            models: vec!["m".into()],
            capacity: Capacity {
                max_concurrent: 4,
                tokens_per_s: 10.0,
                cost_per_mtok: 0.1,
            },
            hardware: "cpu".into(),
            engine: "synthetic".into(),
            version: "0".into(),
            state: WorkerState::Ready,
            scores_prompts: false,
            embeds: false,
        }
    }

    #[tokio::test]
    async fn drain_validates_the_worker_id_and_stores_the_request() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let _registration = registry
            .register(record("gpu-0"), Duration::from_secs(5))
            .await
            .unwrap();
        let admin = AdminService::new(plane(registry.clone(), ElectionConfig::Standalone).await);
        let drain = |id: &str| {
            Request::new(v1::DrainRequest {
                worker_id: id.into(),
            })
        };
        let err = admin.drain(drain("")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("worker_id"), "{}", err.message());
        let err = admin.drain(drain("nope")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(err.message().contains("nope"), "{}", err.message());

        let done = admin.drain(drain("gpu-0")).await.unwrap().into_inner();
        assert!(!done.already_draining);
        assert_eq!(registry.list_drains().await.unwrap(), vec!["gpu-0"]);
        assert!(
            admin
                .drain(drain("gpu-0"))
                .await
                .unwrap()
                .into_inner()
                .already_draining
        );

        let stats = admin
            .get_cluster_stats(Request::new(v1::GetClusterStatsRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.workers, 1);
        assert_eq!(stats.drains, vec!["gpu-0"]);
        assert_eq!(stats.leader, "cp-test");

        let undrain = |id: &str| {
            Request::new(v1::UndrainRequest {
                worker_id: id.into(),
            })
        };
        assert!(
            admin
                .undrain(undrain("gpu-0"))
                .await
                .unwrap()
                .into_inner()
                .was_draining
        );
        assert!(
            !admin
                .undrain(undrain("gpu-0"))
                .await
                .unwrap()
                .into_inner()
                .was_draining
        );
        let err = admin.undrain(undrain("nope")).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert!(registry.list_drains().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn set_policy_validates_stores_and_get_returns_it() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let admin = AdminService::new(plane(registry.clone(), ElectionConfig::Standalone).await);
        let got = admin
            .get_policy(Request::new(v1::GetPolicyRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert!(got.is_default);

        let err = admin
            .set_policy(Request::new(v1::SetPolicyRequest {
                merge: false,
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
                merge: false,
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

    #[tokio::test]
    async fn a_merged_policy_changes_only_what_the_patch_names() {
        let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
        let admin = AdminService::new(plane(registry.clone(), ElectionConfig::Standalone).await);
        let set = |document: &str, merge: bool| {
            let request = Request::new(v1::SetPolicyRequest {
                document: document.into(),
                merge,
            });
            let admin = &admin;
            async move { admin.set_policy(request).await }
        };
        set(
            r#"{"default_lane": "latency-critical", "tenants": {"acme": "cost-sensitive"}}"#,
            false,
        )
        .await
        .unwrap();
        let merged = set(
            r#"{"quotas": {"tenants": {"acme": {"tokens_per_minute": 1200}}}, "tenants": null}"#,
            true,
        )
        .await
        .unwrap()
        .into_inner()
        .document;
        let document: serde_json::Value = serde_json::from_str(&merged).unwrap();
        assert_eq!(
            document["default_lane"], "latency-critical",
            "kept: {merged}"
        );
        assert_eq!(
            document["quotas"]["tenants"]["acme"]["tokens_per_minute"], 1200,
            "{merged}"
        );
        assert_eq!(
            document["tenants"],
            serde_json::json!({}),
            "removed: {merged}"
        );
        let stored = String::from_utf8(registry.get_policy().await.unwrap().unwrap()).unwrap();
        assert_eq!(stored, merged);

        // A patch that breaks a rule is refused and changes nothing.
        let err = set(r#"{"placement": {"choices": 0}}"#, true)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let err = set("[1]", true).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        let stored = String::from_utf8(registry.get_policy().await.unwrap().unwrap()).unwrap();
        assert_eq!(stored, merged);
    }
}
