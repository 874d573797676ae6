//! Running the router: membership watch, worker links, the gRPC server (Inference, health,
//! reflection) and, when configured, the OpenAI-compatible HTTP server on its own port, both
//! sharing one dispatcher. The router listens before the cluster registry answers and joins
//! the cluster when it does.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::backoff::Backoff;
use switchyard_cluster::tls::Alpn;
use switchyard_cluster::{Registry, RegistryError};
use switchyard_proto::v1::inference_server::InferenceServer;
use switchyard_proto::v1::router_peers_server::RouterPeersServer;
use switchyard_proto::v1::stored_responses_server::StoredResponsesServer;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::auth::{ApiKeys, ApiKeysError};
use crate::config::RouterConfig;
use crate::dispatch::Dispatcher;
use crate::links::Links;
use crate::policy::document::PolicyDocument;
use crate::policy_watch::{PolicyHandle, PolicyStatus};
use crate::readiness::Gate;
use crate::response_store::handover::RouterPeersService;
use crate::response_store::service::StoredResponsesService;
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
    #[error(transparent)]
    StateDir(#[from] crate::response_store::saved::StateDirError),
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

/// How long start-up waits for the cluster registry's first answer before announcing the
/// router anyway (not ready, retrying in the background): a router whose registry answers
/// at once is ready when announced.
const FIRST_CONTACT_GRACE: Duration = Duration::from_secs(1);
/// After the drain, how long the servers get to send the last frames of requests that ended
/// as the links closed.
const LAST_FRAMES_GRACE: Duration = Duration::from_secs(1);
/// Longest a stopping router waits for the registry to take its announcement back.
const WITHDRAW_WAIT: Duration = Duration::from_secs(2);
/// Pauses between attempts to reach the cluster registry at start-up (exponential, jittered).
const JOIN_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Like [`run_router`], and `on_ready` gets every bound address (gRPC and HTTP).
///
/// The router serves from the moment it is bound, whether or not the cluster registry
/// answers: until it has read the membership and the policy it reports `NOT_SERVING` for
/// `switchyard.v1.Inference` (gRPC health), 503 on HTTP `/health`, and refuses requests with
/// `UNAVAILABLE`, while it retries with exponential backoff and jitter.
pub async fn run_router_with_endpoints(
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(RouterEndpoints),
) -> Result<(), RouterError> {
    config.validate().map_err(RouterError::Config)?;
    let drain_timeout = config.drain_timeout;
    // Everything a request in flight needs (worker links, membership, policy, reports) stops
    // with this, once the requests in flight have ended after `shutdown` (see
    // `finish_in_flight`), not with `shutdown` itself.
    let cluster_stop = CancellationToken::new();
    let api_keys = match &config.api_keys_file {
        Some(path) => {
            let keys = ApiKeys::load(path)?;
            info!(keys = keys.len(), "api key authentication on");
            Some(Arc::new(keys))
        }
        None => None,
    };
    let grpc_tls = config
        .tls
        .server(Alpn::Grpc)
        .map_err(|e| RouterError::Config(e.to_string()))?;
    let http_tls = config
        .tls
        .server(Alpn::Http)
        .map_err(|e| RouterError::Config(e.to_string()))?;
    let client_tls = config.tls.client();
    let state_dir = config
        .state_dir
        .as_deref()
        .map(|path| {
            crate::response_store::saved::StateDir::open(path)
                .map(|dir| dir.with_sync_interval(config.state_sync_interval))
        })
        .transpose()?;
    let config_listen = config.listen;
    let advertise = config.advertise.clone();
    let max_connection_streams = config.max_connection_streams;
    let connections = config.connections;
    let listener =
        switchyard_cluster::listen::bind(config.listen).map_err(|source| RouterError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| RouterError::Bind {
        addr: config.listen,
        source,
    })?;

    let http_listener = match config.http_listen {
        Some(addr) => {
            let listener = switchyard_cluster::listen::bind(addr)
                .map_err(|source| RouterError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| RouterError::Bind { addr, source })?;
            Some((listener, bound))
        }
        None => None,
    };

    registry.register_metrics(&config.metrics);
    let links = Links::new(config.connect_timeout);
    if let Some(token) = &config.cluster_token {
        links.set_credential(token.clone());
    }
    if let Some(tls) = &client_tls {
        links.set_tls(tls.clone());
    }
    for hosted in &config.hosted_workers {
        links.host(hosted.clone());
    }
    let fallback_policy = config.default_policy();
    let (policy, policy_tx) = PolicyHandle::pending(fallback_policy.clone());
    let metrics = crate::metrics::RouterMetrics::register(&config.metrics);
    if api_keys.is_some() {
        metrics.count_auth_refusals();
    }
    links.set_identity_rejections(metrics.identity_rejections.clone());
    let (leader_tx, leader_rx) = watch::channel(None);
    let reports = crate::report::Reporter::start(
        router_id(bound),
        config.decision_reports_per_s,
        leader_rx,
        config.cluster_token.clone(),
        client_tls.clone(),
        cluster_stop.clone(),
    );
    let dispatcher = Dispatcher::new(links.clone(), config, policy, metrics, reports)
        .with_key_tenants(api_keys.iter().flat_map(|keys| keys.tenants()))
        .with_state_dir(state_dir);
    dispatcher.peers.set_registry(registry.clone());
    if let Some(tls) = client_tls {
        dispatcher.peers.set_tls(tls);
    }
    let advertised = advertise.unwrap_or_else(|| bound.to_string());
    dispatcher
        .peers
        .set_self(advertised.clone(), cluster_stop.clone());
    let announcing = (dispatcher.responses.limits().max_bytes > 0).then(|| {
        let record = switchyard_cluster::RouterRecord {
            id: dispatcher.responses.owner().to_string(),
            grpc_address: advertised,
        };
        tokio::spawn(crate::response_store::peers::announce(
            registry.clone(),
            record,
            crate::response_store::peers::PRESENCE_TTL,
            cluster_stop.clone(),
        ))
    });
    // Readiness reasons reach clients and the public `/health`: they name the registry's
    // kind, never its addresses or the client library's error (those are logged).
    dispatcher
        .readiness
        .set_waiting(Gate::Registry, "connecting to the cluster registry (etcd)");
    let dispatcher = Arc::new(dispatcher);
    // Before the mirror starts, so the standby's copy holds what is taken back too.
    crate::response_store::saved::restore(&dispatcher);
    if dispatcher.responses.limits().max_bytes > 0 {
        dispatcher
            .peers
            .start_mirror(dispatcher.clone(), &cluster_stop);
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    tokio::spawn(mirror_readiness(
        dispatcher.readiness.subscribe(),
        health.clone(),
    ));
    let (first_contact, first_contact_rx) = oneshot::channel();
    tokio::spawn(join_cluster(
        Joining {
            registry,
            links,
            policy_tx,
            fallback_policy,
            leader_tx,
            dispatcher: dispatcher.clone(),
            shutdown: cluster_stop.clone(),
        },
        first_contact,
    ));
    let finishing = tokio::spawn(finish_in_flight(
        shutdown.clone(),
        dispatcher.clone(),
        health.clone(),
        drain_timeout,
        cluster_stop.clone(),
    ));

    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services(&[
            <InferenceServer<()> as tonic::server::NamedService>::NAME,
            <StoredResponsesServer<()> as tonic::server::NamedService>::NAME,
            <RouterPeersServer<()> as tonic::server::NamedService>::NAME,
        ]);
    let mut grpc = switchyard_cluster::grpc_server::builder(max_connection_streams);
    if let Some(age) = connections.max_age {
        // No grace after it: a Session open then is never cut, only new calls move.
        grpc = grpc.max_connection_age(age);
    }
    let grpc = grpc
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        // Only Inference is authenticated: health and reflection stay open to probes and tools.
        .add_service(tonic::service::interceptor::InterceptedService::new(
            // Clients may compress what they send (long prompts and histories); answers stay
            // plain: token frames are too small to gain from it.
            InferenceServer::new(InferenceService::new(dispatcher.clone()))
                .accept_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Deflate),
            AuthInterceptor::new(api_keys.clone(), dispatcher.metrics.clone()),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            StoredResponsesServer::new(StoredResponsesService::of(dispatcher.clone())),
            AuthInterceptor::new(api_keys.clone(), dispatcher.metrics.clone()),
        ))
        // Between routers: it checks the cluster token itself.
        .add_service(RouterPeersServer::new(RouterPeersService::new(
            dispatcher.clone(),
        )));
    let bind_error = |source| RouterError::Bind {
        addr: config_listen,
        source,
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match grpc_tls {
        Some(tls) => Box::pin(grpc.serve_with_incoming_shutdown(
            switchyard_cluster::tls::listen(listener, tls, connections).map_err(bind_error)?,
            shutdown.clone().cancelled_owned(),
        )),
        None => Box::pin(grpc.serve_with_incoming_shutdown(
            switchyard_cluster::listen::plaintext(listener, connections).map_err(bind_error)?,
            shutdown.clone().cancelled_owned(),
        )),
    };
    let (http_server, http_bound) = match http_listener {
        Some((listener, bound)) => {
            info!(address = %bound, "router http (OpenAI-compatible) ready");
            let server = crate::openai::serve(
                listener,
                http_tls,
                connections,
                dispatcher,
                api_keys,
                shutdown.clone(),
            );
            (Some(server), Some(bound))
        }
        None => (None, None),
    };
    let _ = tokio::time::timeout(FIRST_CONTACT_GRACE, first_contact_rx).await;
    info!(address = %bound, "router ready");
    on_ready(RouterEndpoints {
        grpc: bound,
        http: http_bound,
    });
    let serving = async {
        match http_server {
            Some(http) => {
                let (grpc, http) = tokio::join!(server, http);
                grpc?;
                http.map_err(RouterError::Http)
            }
            None => Ok(server.await?),
        }
    };
    // The servers stop accepting at `shutdown` and end when their last connection does; a
    // connection kept open without a request running (an idle `Session`) is not waited for
    // beyond the drain.
    let stopped = tokio::select! {
        stopped = serving => stopped,
        () = async {
            cluster_stop.cancelled().await;
            tokio::time::sleep(LAST_FRAMES_GRACE).await;
        } => Ok(()),
    };
    // Servers with no connection left end at once: the drain's last step (handing the stored
    // responses over) still runs.
    if shutdown.is_cancelled() {
        let _ = finishing.await;
    }
    cluster_stop.cancel();
    // The announcement is withdrawn before the process exits: a replica asked about this
    // one's responses from now on is told they are gone, not that it cannot be reached (which
    // a lingering announcement would say until its lease ran out).
    if let Some(announcing) = announcing {
        let _ = tokio::time::timeout(WITHDRAW_WAIT, announcing).await;
    }
    stopped?;
    info!("router stopped");
    Ok(())
}

/// Once `shutdown` fires: refuses new requests (`UNAVAILABLE`, health `NOT_SERVING`) and lets
/// the ones in flight finish — on their workers, over links that stay up — for at most
/// `timeout`; then stops `cluster_stop`, closing the links.
async fn finish_in_flight(
    shutdown: CancellationToken,
    dispatcher: Arc<Dispatcher>,
    health: HealthReporter,
    timeout: Duration,
    cluster_stop: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = cluster_stop.cancelled() => return,
    }
    dispatcher
        .readiness
        .set_waiting(Gate::ShuttingDown, "shutting down");
    dispatcher.stopping.cancel();
    health
        .set_not_serving::<InferenceServer<InferenceService>>()
        .await;
    info!(
        in_flight = dispatcher.in_flight.count(),
        "shutting down: new requests refused, finishing the ones in flight"
    );
    if tokio::time::timeout(timeout, dispatcher.in_flight.drained())
        .await
        .is_err()
    {
        warn!(
            in_flight = dispatcher.in_flight.count(),
            "drain timeout: closing with requests in flight"
        );
    }
    // Nothing more is stored now: another replica answers for the stored responses from here.
    crate::response_store::handover::hand_over_on_stop(&dispatcher).await;
    cluster_stop.cancel();
}

/// What joining the cluster sets up once the registry answers.
struct Joining {
    registry: Arc<dyn Registry>,
    links: Arc<Links>,
    policy_tx: watch::Sender<Arc<PolicyDocument>>,
    fallback_policy: PolicyDocument,
    /// Feeds the reporter the control-plane leader's record.
    leader_tx: watch::Sender<Option<Vec<u8>>>,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
}

/// Reads the membership and the policy from the registry, retrying with exponential backoff
/// and jitter until it answers; then follows both and opens the readiness gate of the registry
/// (the router is ready once it also has a valid policy). `first_contact` fires after the
/// first attempt, whatever its outcome.
async fn join_cluster(joining: Joining, first_contact: oneshot::Sender<()>) {
    let Joining {
        registry,
        links,
        policy_tx,
        fallback_policy,
        leader_tx,
        dispatcher,
        shutdown,
    } = joining;
    let store = registry.describe();
    let mut backoff = Backoff::new(JOIN_BACKOFF_INITIAL, JOIN_BACKOFF_MAX);
    let mut first_contact = Some(first_contact);
    for attempt in 1u32.. {
        let read = async {
            Ok::<_, RegistryError>((
                registry.watch_workers().await?,
                registry.watch_policy().await?,
                registry.watch_control_plane().await?,
            ))
        };
        let outcome = tokio::select! {
            outcome = read => outcome,
            _ = shutdown.cancelled() => return,
        };
        match outcome {
            Ok((membership, stored_policy, leader)) => {
                tokio::spawn(forward_leader(leader, leader_tx, shutdown.clone()));
                let judged = dispatcher.clone();
                crate::policy_watch::follow_stored(
                    stored_policy,
                    fallback_policy,
                    policy_tx,
                    move |status: &PolicyStatus| policy_status(&judged, status),
                    shutdown.clone(),
                );
                links.follow(membership, shutdown);
                dispatcher.readiness.set_ready(Gate::Registry);
                if attempt > 1 {
                    info!(registry = %store, attempt, "cluster registry answered; routing");
                }
                if let Some(tx) = first_contact.take() {
                    let _ = tx.send(());
                }
                return;
            }
            Err(error) => {
                let delay = backoff.next_delay();
                warn!("cannot reach {store}: {error} (attempt {attempt}, next in {delay:.1?})");
                dispatcher.readiness.set_waiting(
                    Gate::Registry,
                    format!("cannot reach the cluster registry (etcd) yet (attempt {attempt})"),
                );
                if let Some(tx) = first_contact.take() {
                    let _ = tx.send(());
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// What the router's readiness says its gRPC health says: `switchyard.v1.Inference` is
/// SERVING exactly while the router is ready (Kubernetes' readiness probe asks it).
async fn mirror_readiness(mut ready: watch::Receiver<bool>, health: HealthReporter) {
    loop {
        let now = *ready.borrow_and_update();
        if now {
            health
                .set_serving::<InferenceServer<InferenceService>>()
                .await;
        } else {
            health
                .set_not_serving::<InferenceServer<InferenceService>>()
                .await;
        }
        if ready.changed().await.is_err() {
            return;
        }
    }
}

/// Applies what the policy follower judged of the stored policy: without a valid policy the
/// router is not ready (it routes nothing rather than by the built-in default, which would
/// drop the tenant quotas and lane restrictions its peers enforce).
fn policy_status(dispatcher: &Dispatcher, status: &PolicyStatus) {
    match status {
        PolicyStatus::Current => {
            dispatcher.metrics.set_policy_state("current");
            dispatcher.readiness.set_ready(Gate::Policy);
        }
        PolicyStatus::Kept(_) => {
            dispatcher.metrics.set_policy_state("kept");
            dispatcher.readiness.set_ready(Gate::Policy);
        }
        PolicyStatus::Missing(_) => {
            dispatcher.metrics.set_policy_state("missing");
            // Public (clients, `/health`): the document's contents stay in the log.
            dispatcher.readiness.set_waiting(
                Gate::Policy,
                "no valid routing policy: the stored document is invalid (the router's log \
                 says why)",
            );
        }
    }
}

/// This router's name in its reports: the host (`HOSTNAME`, a pod name under Kubernetes) and
/// the gRPC address it serves.
fn router_id(bound: SocketAddr) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "router".into());
    format!("{host}@{bound}")
}

/// Copies the registry's record of the control-plane leader to the reporter until shutdown.
async fn forward_leader(
    mut from: watch::Receiver<Option<Vec<u8>>>,
    to: watch::Sender<Option<Vec<u8>>>,
    shutdown: CancellationToken,
) {
    loop {
        to.send_replace(from.borrow_and_update().clone());
        tokio::select! {
            changed = from.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}
