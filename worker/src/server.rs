//! Running a worker: bind, serve `Worker` + health + reflection, register once ready, and on
//! shutdown drain — advertise `draining`, let in-flight generations finish, revoke the lease,
//! close router streams.
//!
//! The control plane can also drain a worker without stopping it: the worker watches its own
//! `drain/<worker_id>` key; while that key exists it takes no new requests (in-flight ones
//! finish) and advertises `draining` so routers place nothing on it; when the key is deleted
//! it advertises `ready` again. A drain request outlives a restart of the worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::in_process::InProcessIncoming;
use switchyard_cluster::listen::ConnectionTimeouts;
use switchyard_cluster::tls::{Alpn, TlsFiles};
use switchyard_cluster::{Capacity, Pool, Registry, RegistryError, WorkerRecord, WorkerState};
use switchyard_proto::hosted::StreamIncoming;
use switchyard_proto::v1::worker_server::WorkerServer;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::coalesce::CoalesceConfig;
use crate::engine::Engine;
use crate::load::LoadTracker;
use crate::metrics::WorkerMetrics;
use crate::service::WorkerService;
use switchyard_cluster::telemetry::metrics::Metrics;

/// gRPC streams one connection may have open at once (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
const MAX_CONNECTION_STREAMS: u32 = 1024;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unique worker id (the etcd key's last segment).
    pub id: String,
    pub pool: Pool,
    pub listen: SocketAddr,
    /// Address published for routers; defaults to the bound address.
    pub advertise: Option<String>,
    pub lease_ttl: Duration,
    pub coalesce: CoalesceConfig,
    pub cost_per_mtok: f64,
    /// Longest a drain waits for in-flight generations.
    pub drain_timeout: Duration,
    /// Where the worker registers its Prometheus metrics (the caller serves them).
    pub metrics: Metrics,
    /// TLS for the gRPC listener; with `client_ca_file`, `Worker` calls need a client
    /// certificate of that CA (mTLS). Default: plaintext.
    pub tls: TlsFiles,
    /// How long a connection may take to send its first request, and stay silent afterwards
    /// (see [`switchyard_cluster::listen`]).
    pub connections: ConnectionTimeouts,
}

impl WorkerConfig {
    /// A worker on a free loopback port, as in-process clusters run one (`switchyard up`,
    /// tests, benchmarks): plaintext, a 10 s lease, a 1 s drain, $0.10 per million tokens,
    /// metrics registered nowhere.
    pub fn loopback(id: impl Into<String>, pool: Pool) -> Self {
        Self {
            id: id.into(),
            pool,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            lease_ttl: Duration::from_secs(10),
            coalesce: CoalesceConfig::default(),
            cost_per_mtok: 0.1,
            drain_timeout: Duration::from_secs(1),
            metrics: Metrics::default(),
            tls: TlsFiles::default(),
            connections: ConnectionTimeouts::default(),
        }
    }

    pub fn validate(&self) -> Result<(), WorkerError> {
        if self.id.is_empty() || self.id.contains('/') {
            return Err(WorkerError::Config(format!(
                "worker id {:?}: must be non-empty without '/'",
                self.id
            )));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(WorkerError::Config("lease ttl: must be at least 1s".into()));
        }
        self.tls
            .validate()
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        self.connections.validate().map_err(WorkerError::Config)?;
        if self.coalesce.max_chunk_tokens == 0 {
            return Err(WorkerError::Config(
                "coalesce max chunk tokens: must be at least 1".into(),
            ));
        }
        // A NaN or infinite price cannot be written to etcd as JSON (it becomes `null`): every
        // router would ignore the record of a worker that believes itself registered.
        if !(self.cost_per_mtok.is_finite() && self.cost_per_mtok >= 0.0) {
            return Err(WorkerError::Config(format!(
                "cost per million tokens {}: must be a finite number, 0 or more",
                self.cost_per_mtok
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
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

/// Pauses between attempts to reach etcd at start-up (exponential, jittered), as a router's.
const ETCD_BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const ETCD_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// `attempt`'s answer, retried with exponential backoff and jitter while etcd cannot be reached
/// (`on_first_failure` runs after the first such failure); any other refusal (an id another
/// worker holds, a record etcd finds too large) is final. `None` when `shutdown` fires first.
async fn until_etcd_answers<T, F>(
    mut attempt: impl FnMut() -> F,
    on_first_failure: impl FnOnce(),
    shutdown: &CancellationToken,
) -> Result<Option<T>, RegistryError>
where
    F: std::future::Future<Output = Result<T, RegistryError>>,
{
    let mut backoff =
        switchyard_cluster::backoff::Backoff::new(ETCD_BACKOFF_INITIAL, ETCD_BACKOFF_MAX);
    let mut on_first_failure = Some(on_first_failure);
    for tries in 1u32.. {
        let outcome = tokio::select! {
            outcome = attempt() => outcome,
            () = shutdown.cancelled() => return Ok(None),
        };
        match outcome {
            Ok(answer) => {
                if tries > 1 {
                    info!(tries, "etcd answered");
                }
                return Ok(Some(answer));
            }
            Err(error @ RegistryError::Etcd(_)) if !error.is_request_too_large() => {
                let delay = backoff.next_delay();
                warn!("cannot reach etcd: {error} (attempt {tries}, next in {delay:.1?})");
                if let Some(failed) = on_first_failure.take() {
                    failed();
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(error) => return Err(error),
        }
    }
    unreachable!("attempts are counted without end")
}

/// Serves `engine` until `shutdown` fires, then drains. `on_ready` gets the bound address once
/// the worker is registered and serving. `Worker` calls are open to anyone who reaches the port;
/// see [`run_member_worker`].
pub async fn run_worker(
    config: WorkerConfig,
    engine: Arc<dyn Engine>,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), WorkerError> {
    run_member_worker(config, None, engine, registry, shutdown, on_ready).await
}

/// Like [`run_worker`], serving `Worker` calls (`Serve`, `GetTokenizer`) only to callers that
/// present `credential`, the cluster token (`UNAUTHENTICATED` otherwise); health and reflection
/// stay open for probes and tools.
pub async fn run_member_worker(
    config: WorkerConfig,
    credential: Option<ClusterToken>,
    engine: Arc<dyn Engine>,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), WorkerError> {
    serve(
        config, credential, engine, registry, None, shutdown, on_ready,
    )
    .await
}

/// How the router hosting a worker reaches it in process: `Worker` calls over an in-memory
/// HTTP/2 pipe (the matching [`switchyard_cluster::in_process::InProcessDialer`]'s), and
/// `Serve` streams handed over as message streams (the matching
/// [`switchyard_proto::hosted::StreamDialer`]'s).
#[derive(Debug)]
pub struct HostedBy {
    pub pipe: InProcessIncoming,
    pub streams: StreamIncoming,
}

/// Like [`run_member_worker`], also serving the router of its own process through `host`,
/// skipping the network. Other routers reach the worker on its listen address as usual; an
/// in-process caller presents `credential` on the pipe, and needs no certificate.
pub async fn run_hosted_worker(
    config: WorkerConfig,
    credential: Option<ClusterToken>,
    engine: Arc<dyn Engine>,
    registry: Arc<dyn Registry>,
    in_process: HostedBy,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), WorkerError> {
    serve(
        config,
        credential,
        engine,
        registry,
        Some(in_process),
        shutdown,
        on_ready,
    )
    .await
}

async fn serve(
    config: WorkerConfig,
    credential: Option<ClusterToken>,
    engine: Arc<dyn Engine>,
    registry: Arc<dyn Registry>,
    in_process: Option<HostedBy>,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), WorkerError> {
    config.validate()?;
    let tls = config
        .tls
        .server(Alpn::Grpc)
        .map_err(|e| WorkerError::Config(e.to_string()))?;
    let client_certificates = tls.as_ref().is_some_and(|tls| tls.verifies_clients());
    let listener =
        switchyard_cluster::listen::bind(config.listen).map_err(|source| WorkerError::Bind {
            addr: config.listen,
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| WorkerError::Bind {
        addr: config.listen,
        source,
    })?;

    let load = LoadTracker::new(engine.clone());
    let sampler = tokio::spawn(load.clone().run_sampler(Duration::from_secs(1)));
    let metrics = WorkerMetrics::register(&config.metrics, config.pool);
    // The registry's own metrics: the restarts of the etcd watches it keeps for this worker
    // (its drain key, below). A hosted worker shares its router's registry and metrics, where
    // the router registered them already; registering twice would expose the family twice.
    if in_process.is_none() {
        registry.register_metrics(&config.metrics);
    }
    let gauges = tokio::spawn(follow_load(load.clone(), engine.clone(), metrics.clone()));
    let closing = CancellationToken::new();
    let service = Arc::new(WorkerService::new(
        engine.clone(),
        load.clone(),
        config.coalesce,
        metrics,
        closing.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_not_serving::<WorkerServer<WorkerService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) =
        switchyard_proto::introspection::reflection_services(&[
            <WorkerServer<()> as tonic::server::NamedService>::NAME,
        ]);

    let server_stop = closing.clone();
    let in_network_credential = credential.clone();
    // Routers and control planes open a few streams each (one `Serve` a link, tokenizer
    // calls); the bound is for anything else that connects.
    let router = switchyard_cluster::grpc_server::builder(MAX_CONNECTION_STREAMS)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            WorkerServer::from_arc(service.clone()),
            move |request: tonic::Request<()>| {
                // The listener has verified any certificate presented against the client CA;
                // here a caller without one is refused (health and reflection stay open).
                if client_certificates
                    && !switchyard_cluster::tls::peer_presented_certificate(&request)
                {
                    return Err(tonic::Status::unauthenticated(
                        "Worker calls need a client certificate of the cluster CA (mTLS)",
                    ));
                }
                check_credential(&in_network_credential, request)
            },
        ));
    let bind_error = |source| WorkerError::Bind {
        addr: config.listen,
        source,
    };
    let mut server = match tls {
        Some(tls) => {
            let incoming = switchyard_cluster::tls::listen(listener, tls, config.connections)
                .map_err(bind_error)?;
            tokio::spawn(
                router.serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned()),
            )
        }
        None => {
            let incoming = switchyard_cluster::listen::plaintext(listener, config.connections)
                .map_err(bind_error)?;
            tokio::spawn(
                router.serve_with_incoming_shutdown(incoming, server_stop.cancelled_owned()),
            )
        }
    };

    let in_process_server = in_process.map(|HostedBy { pipe, streams }| {
        let hosted = service.clone();
        let stop = closing.clone();
        // Its streams end with the worker (each stream's task watches `closing` too).
        tokio::spawn(async move {
            tokio::select! {
                () = hosted.serve_hosted(streams) => {}
                () = stop.cancelled() => {}
            }
        });
        let service = InterceptedService::new(
            WorkerServer::from_arc(service),
            move |request: tonic::Request<()>| check_credential(&credential, request),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(pipe, closing.clone().cancelled_owned()),
        )
    });

    // Read before registering, so a worker restarted while drained never advertises `ready`.
    // Until etcd first answers the worker serves (health: not serving) and keeps trying; its
    // address is announced once it is registered, or once it is known to wait.
    let mut on_ready = Some(on_ready);
    // Stopped before etcd ever answered: nothing registered, nothing to drain.
    let stop_unregistered = || {
        closing.cancel();
        sampler.abort();
        gauges.abort();
        Ok(())
    };
    let Some(mut drain_requests) = until_etcd_answers(
        || registry.watch_drain(&config.id),
        || {
            if let Some(announce) = on_ready.take() {
                announce(bound);
            }
        },
        &shutdown,
    )
    .await?
    else {
        return stop_unregistered();
    };
    let mut drain_requested = *drain_requests.borrow_and_update();
    let mut record = WorkerRecord {
        id: config.id.clone(),
        pool: config.pool,
        address: config
            .advertise
            .clone()
            .unwrap_or_else(|| bound.to_string()),
        models: engine.models(),
        capacity: Capacity {
            max_concurrent: engine.max_concurrent(),
            tokens_per_s: engine.tokens_per_s(),
            cost_per_mtok: config.cost_per_mtok,
        },
        hardware: engine.hardware(),
        engine: engine.kind().to_string(),
        scores_prompts: engine.scores_prompts(),
        embeds: engine.embeds(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        state: if drain_requested {
            WorkerState::Draining
        } else {
            WorkerState::Ready
        },
    };
    load.set_draining(drain_requested);
    let Some(registration) = until_etcd_answers(
        || registry.register(record.clone(), config.lease_ttl),
        || {},
        &shutdown,
    )
    .await?
    else {
        return stop_unregistered();
    };
    if !drain_requested {
        health.set_serving::<WorkerServer<WorkerService>>().await;
    }
    info!(worker_id = %config.id, pool = %config.pool, address = %record.address, engine = engine.kind(), state = record.state.as_str(), "worker ready");
    if let Some(announce) = on_ready {
        announce(bound);
    }

    let mut load_changes = load.subscribe();
    // Whether "drained" was logged for the current drain request (once per request).
    let mut drained_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            result = &mut server => {
                // The server stopped on its own: report why.
                sampler.abort();
                gauges.abort();
                if let Some(in_process) = &in_process_server {
                    in_process.abort();
                }
                return match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error.into()),
                    Err(join) => Err(WorkerError::Config(format!("server task failed: {join}"))),
                };
            }
            changed = drain_requests.changed() => {
                if changed.is_err() {
                    // The watch ended (registry gone): keep the current state.
                    drain_requests = watch_forever();
                    continue;
                }
                let requested = *drain_requests.borrow_and_update();
                if requested == drain_requested {
                    continue;
                }
                drain_requested = requested;
                load.set_draining(requested);
                record.state = if requested { WorkerState::Draining } else { WorkerState::Ready };
                if requested {
                    health.set_not_serving::<WorkerServer<WorkerService>>().await;
                    info!(worker_id = %config.id, in_flight = load.in_flight(), "drain requested by the control plane: taking no new requests");
                } else {
                    health.set_serving::<WorkerServer<WorkerService>>().await;
                    info!(worker_id = %config.id, "drain lifted by the control plane: ready");
                }
                if let Err(error) = registration.update(record.clone()).await {
                    warn!(%error, state = record.state.as_str(), "could not advertise the new state");
                }
                drained_logged = false;
                if requested && load.in_flight() == 0 {
                    info!(worker_id = %config.id, "drained: no generations in flight");
                    drained_logged = true;
                }
            }
            Ok(()) = load_changes.changed(), if drain_requested && !drained_logged => {
                load_changes.borrow_and_update();
                if load.in_flight() == 0 {
                    info!(worker_id = %config.id, "drained: no generations in flight");
                    drained_logged = true;
                }
            }
        }
    }

    info!(worker_id = %config.id, in_flight = load.in_flight(), "draining");
    load.set_draining(true);
    health
        .set_not_serving::<WorkerServer<WorkerService>>()
        .await;
    record.state = WorkerState::Draining;
    if let Err(error) = registration.update(record).await {
        warn!(%error, "could not advertise draining state");
    }
    let mut changes = load.subscribe();
    let drained = tokio::time::timeout(config.drain_timeout, async {
        while load.in_flight() > 0 {
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            in_flight = load.in_flight(),
            "drain timeout; stopping with generations in flight"
        );
    }
    if let Err(error) = registration.deregister().await {
        warn!(%error, "deregistration failed; the lease will expire on its own");
    }
    closing.cancel();
    sampler.abort();
    gauges.abort();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join)) => warn!(%join, "server task failed"),
        Err(_) => warn!("server did not stop within 5s"),
    }
    if let Some(in_process) = in_process_server {
        match tokio::time::timeout(Duration::from_secs(5), in_process).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => warn!(%join, "in-process server task failed"),
            Err(_) => warn!("in-process server did not stop within 5s"),
        }
    }
    info!(worker_id = %config.id, "stopped");
    Ok(())
}

/// Admits a `Worker` call that presents `credential` (any call when there is none).
fn check_credential(
    credential: &Option<ClusterToken>,
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    if let Some(credential) = credential {
        credential.check(&request)?;
    }
    Ok(request)
}

/// A drain watch that never changes, replacing one whose source ended.
fn watch_forever() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    // Keep the sender alive so `changed` waits forever instead of failing.
    std::mem::forget(tx);
    rx
}

/// Keeps the load gauges equal to the load the worker reports to routers, and the prefix-cache
/// and prefill metrics up to date (at every load change and every sampler tick, once a second).
async fn follow_load(load: Arc<LoadTracker>, engine: Arc<dyn Engine>, metrics: WorkerMetrics) {
    let mut changes = load.subscribe();
    loop {
        metrics.observe_load(&changes.borrow_and_update());
        if let Some(stats) = engine.prefix_cache_stats() {
            metrics.observe_prefix_cache(&stats);
        }
        if let Some(stats) = engine.prefill_stats() {
            metrics.observe_prefill(&stats);
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_price_routers_cannot_read_is_refused() {
        for cost in [f64::NAN, f64::INFINITY, -0.5] {
            let config = WorkerConfig {
                cost_per_mtok: cost,
                ..WorkerConfig::loopback("gpu-0", Pool::Gpu)
            };
            let Err(WorkerError::Config(message)) = config.validate() else {
                panic!("cost {cost} was accepted");
            };
            assert!(message.contains("cost per million tokens"), "{message}");
        }
        let free = WorkerConfig {
            cost_per_mtok: 0.0,
            ..WorkerConfig::loopback("gpu-0", Pool::Gpu)
        };
        assert!(free.validate().is_ok());
    }
}
