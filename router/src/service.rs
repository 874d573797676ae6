//! The client-facing `Inference` service: persistent multiplexed sessions (run by
//! [`crate::session`]), single-request `Generate`, and `ListModels`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt as _};
use switchyard_proto::v1;
use switchyard_proto::v1::server_frame::Frame;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use crate::auth::{AUTHORIZATION, ApiKeys, Tenant};
use crate::dispatch::{Dispatcher, frame_channel};
use crate::error::failed_status;
use crate::metrics::RouterMetrics;
use crate::report::answers::{Answer, GRPC_GENERATE, GRPC_SESSION, ending_code};
use crate::session::{SESSION_BUFFER, Session, run_session};
use switchyard_cluster::deadline::{
    ahead_of_tonic, call_deadline, deadline_passed, until_deadline,
};
use switchyard_cluster::telemetry::propagation::RemoteContext;

/// Frames buffered towards one `Generate` client (one request): enough to ride out a slow
/// read; flow control keeps the rest on the worker.
const GENERATE_BUFFER: usize = 64;

#[derive(Clone)]
pub struct InferenceService {
    dispatcher: Arc<Dispatcher>,
}

impl InferenceService {
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self { dispatcher }
    }
}

type FrameItem = Result<v1::ServerFrame, Status>;
type FrameStream = Pin<Box<dyn Stream<Item = FrameItem> + Send>>;

#[tonic::async_trait]
impl v1::inference_server::Inference for InferenceService {
    type SessionStream = FrameStream;
    type GenerateStream = FrameStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::ClientFrame>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let tenant = request.extensions().get::<Tenant>().cloned();
        // The session's trace context parents every request in it that brings none of its own.
        let trace = RemoteContext::from_headers(request.metadata().as_ref());
        let deadline = call_deadline(&request);
        let inbound = request.into_inner();
        let (tx, rx) = frame_channel(SESSION_BUFFER);
        let session = Session {
            dispatcher: self.dispatcher.clone(),
            tenant,
            trace,
        };
        let (ending_tx, ending_rx) = oneshot::channel();
        tokio::spawn(run_session(session, inbound, tx, ending_tx, deadline));
        // The frames end once the session and all its requests have sent their last; then
        // the call's status, when the session ended on the client's fault.
        let ending =
            futures::stream::once(ending_rx).filter_map(|ending| async { ending.ok().map(Err) });
        let frames = rx.into_stream().chain(ending);
        // Each request is counted by the frame that ends it.
        let dispatcher = self.dispatcher.clone();
        let frames = frames.inspect(move |item| {
            if let Ok(v1::ServerFrame { frame: Some(frame) }) = item
                && let Some(code) = ending_code(frame)
            {
                count_answer(&dispatcher, GRPC_SESSION, code);
            }
        });
        Ok(Response::new(match deadline {
            Some(deadline) => Box::pin(until_deadline(frames, deadline)),
            None => Box::pin(frames),
        }))
    }

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let tenant = request.extensions().get::<Tenant>().cloned();
        let trace = RemoteContext::from_headers(request.metadata().as_ref());
        let deadline = call_deadline(&request);
        let mut request = request.into_inner();
        if let Some(tenant) = &tenant {
            tenant.apply(&mut request);
        }
        if request.request_id.is_empty() {
            request.request_id = uuid::Uuid::new_v4().to_string();
        }
        let answered = async {
            let prepared = self.dispatcher.prepare(request, trace).await?;
            // Generate has no control frames.
            let (_, controls) = mpsc::unbounded_channel();
            let mut frames = self
                .dispatcher
                .drive(prepared, controls, GENERATE_BUFFER)
                .into_stream();
            // A request that fails before it is accepted (shed after waiting at the router,
            // say) fails the call, as one refused at once does.
            match frames.next().await {
                Some(Ok(v1::ServerFrame {
                    frame: Some(Frame::Failed(failed)),
                })) => Err(failed_status(&failed)),
                Some(first) => Ok((first, frames)),
                None => Err(Status::internal("the request ended without a frame")),
            }
        };
        let answered = match deadline {
            // Before tonic's own timer, which would answer `CANCELLED`.
            Some(deadline) => tokio::time::timeout_at(ahead_of_tonic(deadline), answered)
                .await
                .unwrap_or_else(|_| Err(deadline_passed())),
            None => answered.await,
        };
        let mut answer = GenerateAnswer::new(self.dispatcher.clone());
        let (first, frames) = answered.inspect_err(|status| answer.count(Err(status)))?;
        let frames = futures::stream::once(std::future::ready(first))
            .chain(frames)
            .flat_map(with_failure_status);
        let frames: FrameStream = match deadline {
            Some(deadline) => Box::pin(until_deadline(frames, deadline)),
            None => Box::pin(frames),
        };
        Ok(Response::new(Box::pin(frames.map(move |item| {
            answer.count(item.as_ref());
            item
        }))))
    }

    async fn list_models(
        &self,
        _request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        // Before the router has read the membership, an empty list would be a lie.
        self.dispatcher.readiness.check()?;
        let mut models: BTreeMap<String, Vec<v1::WorkerRef>> = BTreeMap::new();
        for worker in self.dispatcher.links.states() {
            for model in &worker.models {
                let workers = models.entry(model.clone()).or_default();
                if worker.available {
                    workers.push(v1::WorkerRef {
                        id: worker.id.clone(),
                        pool: worker.pool.to_string(),
                    });
                }
            }
        }
        let models = models
            .into_iter()
            .map(|(id, mut workers)| {
                workers.sort_by(|a, b| a.id.cmp(&b.id));
                v1::ModelInfo { id, workers }
            })
            .collect();
        Ok(Response::new(v1::ListModelsResponse { models }))
    }
}

/// Counts a gRPC request of `api` that ended with `code`: in the metrics and the dashboard's
/// front-door table.
fn count_answer(dispatcher: &Dispatcher, api: &'static str, code: tonic::Code) {
    dispatcher.metrics.grpc_answered(api, code);
    dispatcher.reports.answered(api, Answer::of_grpc(code));
}

/// How a `Generate` call was answered, counted once: by the frame or status that ends it, or
/// as cancelled when the client drops the call before.
struct GenerateAnswer {
    dispatcher: Arc<Dispatcher>,
    counted: bool,
}

impl GenerateAnswer {
    fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self {
            dispatcher,
            counted: false,
        }
    }

    fn count(&mut self, item: Result<&v1::ServerFrame, &Status>) {
        let code = match item {
            Ok(v1::ServerFrame { frame: Some(frame) }) => ending_code(frame),
            Ok(_) => None,
            Err(status) => Some(status.code()),
        };
        if let Some(code) = code.filter(|_| !self.counted) {
            self.counted = true;
            count_answer(&self.dispatcher, GRPC_GENERATE, code);
        }
    }
}

impl Drop for GenerateAnswer {
    fn drop(&mut self) {
        if !self.counted {
            count_answer(&self.dispatcher, GRPC_GENERATE, tonic::Code::Cancelled);
        }
    }
}

/// A `Generate` frame, and after a `Failed` one the call's status saying the same (its code
/// and `retry-after`): a client that checks only the status sees the failure too.
fn with_failure_status(item: FrameItem) -> futures::stream::Iter<impl Iterator<Item = FrameItem>> {
    let status = match &item {
        Ok(v1::ServerFrame {
            frame: Some(Frame::Failed(failed)),
        }) => Some(Err(failed_status(failed))),
        _ => None,
    };
    futures::stream::iter(std::iter::once(item).chain(status))
}

/// Authenticates `Inference` calls when API keys are configured: the call's `authorization:
/// Bearer <key>` metadata must name a known key, whose [`Tenant`] is attached to the request
/// for the service to write into every `GenerateRequest`. Without keys every call passes and
/// no tenant is attached (the client's metadata `tenant` stands).
#[derive(Clone)]
pub struct AuthInterceptor {
    keys: Option<Arc<ApiKeys>>,
    metrics: RouterMetrics,
}

impl AuthInterceptor {
    pub fn new(keys: Option<Arc<ApiKeys>>, metrics: RouterMetrics) -> Self {
        Self { keys, metrics }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.keys else {
            return Ok(request);
        };
        let header = request.metadata().get(AUTHORIZATION);
        let value = match header.map(|v| v.to_str()) {
            None => Ok(None),
            Some(Ok(value)) => Ok(Some(value)),
            Some(Err(_)) => Err(crate::auth::AuthError::Malformed),
        };
        let tenant = value
            .and_then(|value| keys.authenticate(value))
            .inspect_err(|error| {
                debug!(%error, "inference call refused");
                self.metrics.auth_refused("grpc", error);
            })?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}
