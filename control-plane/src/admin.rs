//! The `Admin` gRPC service: translates between protobuf and [`ControlPlane`] operations.

use std::pin::Pin;

use futures::Stream;
use switchyard_proto::v1;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use switchyard_cluster::credential::ClusterToken;

use crate::auth::{Access, Caller};
use crate::events::Events;
use crate::plane::{ControlPlane, WorkerView, clipped};
use crate::spans::{self, admin_span};

pub struct AdminService {
    plane: ControlPlane,
    access: Access,
    /// Routers' reports must carry it when set (see [`AdminService::with_cluster_token`]).
    cluster_token: Option<ClusterToken>,
    /// Fires when the control plane stops: open `WatchEvents` and `Report` streams end then,
    /// instead of holding the graceful shutdown until their clients hang up.
    stopping: CancellationToken,
}

impl AdminService {
    /// An open service (no tokens): anyone may write, as before admin tokens existed.
    pub fn new(plane: ControlPlane) -> Self {
        Self {
            plane,
            access: Access::default(),
            cluster_token: None,
            stopping: CancellationToken::new(),
        }
    }

    /// Ends the service's open streams when `stopping` fires.
    pub fn with_stopping(mut self, stopping: CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// Routers' reports (`Report`) are accepted only with this cluster token; the other calls
    /// are unaffected (admin tokens guard writes).
    pub fn with_cluster_token(mut self, token: Option<ClusterToken>) -> Self {
        self.cluster_token = token;
        self
    }

    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The caller of a write, if an operator; `UNAUTHENTICATED` / `PERMISSION_DENIED` if not.
    fn operator<T>(&self, request: &Request<T>, action: &str) -> Result<Caller, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let caller = self.access.operator(bearer, action).map_err(|denied| {
            let peer = request.remote_addr();
            self.access.refused("grpc", action, peer, &denied);
            Status::from(denied)
        })?;
        spans::record_caller(&caller.name, caller.role.as_str());
        Ok(caller)
    }
}

/// The audit trail of a write that succeeded: who did what, from which front door — a log line
/// and an admin-write event (`WatchEvents`, the dashboard's events).
pub(crate) fn audit(events: &Events, caller: &Caller, via: &str, action: &str, target: &str) {
    events.admin_write(caller, via, action, target);
    info!(
        who = %caller.name,
        role = caller.role.as_str(),
        via,
        action,
        target,
        "admin write"
    );
}

fn worker_info(worker: WorkerView) -> v1::WorkerInfo {
    let record = worker.record;
    let unreachable = worker.unreachable.map(|down| v1::WorkerUnreachable {
        reason: down.reason,
        since_unix_ms: i64::try_from(down.since_unix_ms).unwrap_or(i64::MAX),
        attempts: down.attempts,
    });
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
        unreachable,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::ClusterEvent, Status>> + Send>>;

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminService {
    async fn list_workers(
        &self,
        request: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "list_workers",
            request.get_ref().pool.as_str(),
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            let workers = self.plane.workers(&request.into_inner().pool).await?;
            Ok(Response::new(v1::ListWorkersResponse {
                workers: workers.into_iter().map(worker_info).collect(),
            }))
        })
        .await
    }

    async fn get_policy(
        &self,
        request: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "get_policy",
            "policy",
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            Ok(Response::new(self.plane.policy().await?))
        })
        .await
    }

    async fn set_policy(
        &self,
        request: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "set_policy",
            "policy",
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            let caller = self.operator(&request, "set the policy")?;
            let request = request.into_inner();
            let document = if request.merge {
                self.plane.merge_policy(&request.document).await?
            } else {
                self.plane.set_policy(&request.document).await?
            };
            audit(self.plane.events(), &caller, "grpc", "set_policy", "policy");
            Ok(Response::new(v1::SetPolicyResponse { document }))
        })
        .await
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "drain",
            clipped(&request.get_ref().worker_id).as_str(),
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            let caller = self.operator(&request, "drain workers")?;
            let worker_id = request.into_inner().worker_id;
            let already_draining = self.plane.drain(&worker_id).await?;
            audit(self.plane.events(), &caller, "grpc", "drain", &worker_id);
            Ok(Response::new(v1::DrainResponse {
                worker_id,
                already_draining,
            }))
        })
        .await
    }

    async fn undrain(
        &self,
        request: Request<v1::UndrainRequest>,
    ) -> Result<Response<v1::UndrainResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "undrain",
            clipped(&request.get_ref().worker_id).as_str(),
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            let caller = self.operator(&request, "undrain workers")?;
            let worker_id = request.into_inner().worker_id;
            let was_draining = self.plane.undrain(&worker_id).await?;
            audit(self.plane.events(), &caller, "grpc", "undrain", &worker_id);
            Ok(Response::new(v1::UndrainResponse {
                worker_id,
                was_draining,
            }))
        })
        .await
    }

    async fn get_cluster_stats(
        &self,
        request: Request<v1::GetClusterStatsRequest>,
    ) -> Result<Response<v1::GetClusterStatsResponse>, Status> {
        let span = admin_span!(
            "grpc",
            "get_cluster_stats",
            "",
            request.remote_addr(),
            request.metadata().as_ref()
        );
        spans::grpc(span, async {
            Ok(Response::new(self.plane.stats().await?.wire))
        })
        .await
    }

    type WatchEventsStream = EventStream;

    /// Its span covers opening the stream, not the events that follow (for as long as the
    /// watcher stays).
    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let span = admin_span!(
            "grpc",
            "watch_events",
            "",
            request.remote_addr(),
            request.metadata().as_ref()
        );
        span.record("outcome", "ok");
        let deadline = switchyard_cluster::deadline::call_deadline(&request);
        // Asking for more than is kept is no error: a watcher after an incident asks for
        // "all there is".
        let replay = usize::try_from(request.get_ref().replay_recent).unwrap_or(usize::MAX);
        let (replayed, live) = self.plane.events().subscribe_after_recent(replay);
        let live = BroadcastStream::new(live).filter_map(|item| {
            match item {
                Ok(event) => Some(Ok(event)),
                Err(lagged) => {
                    // A watcher too slow to keep up loses events rather than stalling others.
                    warn!(%lagged, "event watcher lagged; events skipped");
                    None
                }
            }
        });
        let events = tokio_stream::iter(replayed.into_iter().map(Ok)).chain(live);
        let events =
            futures::StreamExt::take_until(events, self.stopping.clone().cancelled_owned());
        // Past the response's headers tonic no longer holds the call to its `grpc-timeout`.
        Ok(Response::new(match deadline {
            Some(deadline) => Box::pin(switchyard_cluster::deadline::until_deadline(
                events, deadline,
            )),
            None => Box::pin(events),
        }))
    }

    /// No span: a router's report stream lasts as long as its link to this leader, and is
    /// no admin action.
    async fn report(
        &self,
        request: Request<tonic::Streaming<v1::RouterReport>>,
    ) -> Result<Response<v1::ReportSummary>, Status> {
        if let Some(token) = &self.cluster_token
            && token.check(&request).is_err()
        {
            return Err(Status::unauthenticated(
                "router reports need the cluster token: start the router with the same \
                 --cluster-token-file as this control plane",
            ));
        }
        let mut reports = request.into_inner();
        // A malformed entry is dropped alone (counted, logged): the stream goes on.
        let mut intake = self.plane.insights().intake();
        loop {
            let report = tokio::select! {
                report = reports.message() => report?,
                // The router reports to whichever replica leads next.
                () = self.stopping.cancelled() => None,
            };
            let Some(report) = report else { break };
            intake.take(report);
        }
        Ok(Response::new(v1::ReportSummary {
            accepted: intake.accepted(),
        }))
    }
}
