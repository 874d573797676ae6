//! What a control plane serves until the cluster registry (etcd) first answers, so that one
//! started before etcd (a cluster coming up at once, an etcd outage during a restart) waits for
//! it instead of exiting — and being restarted by Kubernetes with a growing back-off. As a
//! router does: gRPC health SERVING for the process (the liveness probe) and NOT_SERVING for
//! `switchyard.v1.Admin` (the readiness probe), every other gRPC call `UNAVAILABLE`, and 503 on
//! the dashboard, all saying why; meanwhile the registry is retried with exponential backoff
//! and jitter.

use std::os::fd::AsFd as _;
use std::time::Duration;

use axum::response::IntoResponse as _;
use switchyard_cluster::backoff::Backoff;
use switchyard_cluster::{Membership, Registry, RegistryError};
use switchyard_proto::v1::admin_server::AdminServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AdminService;

/// Pauses between attempts to reach the registry (exponential, jittered), as a router's.
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why nothing is served yet, as callers see it: no address, no client library's words.
pub const WAITING: &str = "the control plane cannot reach the cluster registry (etcd) yet; \
                           it keeps trying";

/// What the control plane reads from the registry before it serves.
pub struct FirstContact {
    pub membership: Membership,
    pub policy: watch::Receiver<Option<Vec<u8>>>,
}

/// Reads the membership and the policy, and stores `standalone` (a standalone replica's
/// record, which tells routers where to report) — retrying with exponential backoff and
/// jitter until the registry answers; `on_first_failure` runs if the first attempt fails.
/// `None` when `shutdown` fires first.
pub async fn first_contact(
    registry: &dyn Registry,
    standalone: Option<&[u8]>,
    on_first_failure: impl FnOnce(),
    shutdown: &CancellationToken,
) -> Result<Option<FirstContact>, RegistryError> {
    let store = registry.describe();
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    let mut on_first_failure = Some(on_first_failure);
    for attempt in 1u32.. {
        let read = async {
            let membership = registry.watch_workers().await?;
            let policy = registry.watch_policy().await?;
            if let Some(me) = standalone {
                registry
                    .announce_standalone_control_plane(Some(me.to_vec()))
                    .await?;
            }
            Ok::<_, RegistryError>(FirstContact { membership, policy })
        };
        let outcome = tokio::select! {
            outcome = read => outcome,
            () = shutdown.cancelled() => return Ok(None),
        };
        match outcome {
            Ok(contact) => {
                if attempt > 1 {
                    info!(registry = %store, attempt, "cluster registry answered");
                }
                return Ok(Some(contact));
            }
            // A configuration the registry refuses does not get better by waiting.
            Err(error @ RegistryError::Config(_)) => return Err(error),
            Err(error) => {
                let delay = backoff.next_delay();
                warn!("cannot reach {store}: {error} (attempt {attempt}, next in {delay:.1?})");
                if let Some(failed) = on_first_failure.take() {
                    failed();
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(None),
                }
            }
        }
    }
    unreachable!("attempts are counted without end")
}

/// A second handle on `listener`'s socket: the waiting servers accept on it and close it when
/// they stop, and the control plane's own servers then accept on the original — no
/// connection is refused in between (the kernel queues it).
pub fn twin(listener: &TcpListener) -> std::io::Result<TcpListener> {
    let socket = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
}

/// The gRPC routes served while waiting: health (the process SERVING, `Admin` NOT_SERVING) and
/// `UNAVAILABLE` for everything else.
pub async fn grpc_routes() -> tonic::service::Routes {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<AdminServer<AdminService>>().await;
    let routes = tonic::service::Routes::new(health_service)
        .into_axum_router()
        .fallback(|| async { tonic::Status::unavailable(WAITING).into_http::<axum::body::Body>() });
    tonic::service::Routes::from(routes)
}

/// The dashboard while waiting: 503 for every page and API call.
pub fn dashboard() -> axum::Router {
    axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "5")],
            axum::Json(serde_json::json!({ "error": WAITING })),
        )
            .into_response()
    })
}
