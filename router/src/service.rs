//! The client-facing `Inference` service: persistent multiplexed sessions, single-request
//! `Generate`, and `ListModels`.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use switchyard_proto::v1::{self, client_frame};
use switchyard_proto::validate::validate_interrupt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

use crate::auth::{AUTHORIZATION, ApiKeys, Tenant};
use crate::dispatch::{Control, Dispatcher, FrameSink};
use crate::error::DispatchError;
use crate::metrics::SessionGuard;
use switchyard_cluster::telemetry::propagation::RemoteContext;

/// Frames buffered towards one `Session` client (shared by its requests) before dispatchers
/// wait for it to read.
const SESSION_BUFFER: usize = 1024;
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

type FrameStream = Pin<Box<dyn Stream<Item = Result<v1::ServerFrame, Status>> + Send>>;

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
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(SESSION_BUFFER);
        let session = Session {
            dispatcher: self.dispatcher.clone(),
            tenant,
            trace,
        };
        tokio::spawn(run_session(session, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let tenant = request.extensions().get::<Tenant>().cloned();
        let trace = RemoteContext::from_headers(request.metadata().as_ref());
        let mut request = request.into_inner();
        if let Some(tenant) = &tenant {
            tenant.apply(&mut request);
        }
        if request.request_id.is_empty() {
            request.request_id = uuid::Uuid::new_v4().to_string();
        }
        let prepared = self.dispatcher.prepare(request, trace)?;
        let (tx, rx) = mpsc::channel(GENERATE_BUFFER);
        let dispatcher = self.dispatcher.clone();
        tokio::spawn(async move {
            // Generate has no control frames: the sender lives as long as the request.
            let (_controls_tx, controls) = mpsc::unbounded_channel();
            dispatcher.run(prepared, controls, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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

/// Reads a session's client frames until the client half-closes or fails. Requests already
/// running when the client half-closes finish normally; the response stream ends after them.
/// What every request of one session shares.
struct Session {
    dispatcher: Arc<Dispatcher>,
    tenant: Option<Tenant>,
    trace: RemoteContext,
}

async fn run_session(session: Session, mut inbound: Streaming<v1::ClientFrame>, out: FrameSink) {
    let mut running: HashMap<String, mpsc::UnboundedSender<Control>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let _open = SessionGuard::open(&session.dispatcher.metrics);
    info!("session opened");
    loop {
        tokio::select! {
            // Ended requests leave `running` before the next frame is read: a client that saw
            // one end may start another without meeting the session limit.
            biased;
            Some(request_id) = done_rx.recv() => {
                running.remove(&request_id);
            }
            frame = inbound.message() => match frame {
                Ok(Some(v1::ClientFrame { frame: Some(frame) })) => {
                    handle_frame(&session, frame, &mut running, &done_tx, &out).await;
                }
                Ok(Some(_)) => {
                    let error = DispatchError::invalid("frame", "empty ClientFrame (set start, cancel or interrupt)");
                    let _ = out.send(Ok(error.failed_frame(""))).await;
                }
                Ok(None) => break,
                Err(status) => {
                    debug!(%status, "session stream failed; cancelling its requests");
                    for control in running.values() {
                        let _ = control.send(Control::Cancel);
                    }
                    // tonic reports bytes that do not parse as a ClientFrame as INTERNAL;
                    // they are the client's fault and must not end the call with OK.
                    if status.code() == tonic::Code::Internal {
                        let refused = Status::invalid_argument(format!(
                            "malformed ClientFrame ({}); the session is closed and its requests \
                             cancelled: send switchyard.v1.ClientFrame messages",
                            status.message()
                        ));
                        let _ = out.send(Err(refused)).await;
                    }
                    break;
                }
            },
        }
    }
    info!(running = running.len(), "session input closed");
}

async fn handle_frame(
    session: &Session,
    frame: client_frame::Frame,
    running: &mut HashMap<String, mpsc::UnboundedSender<Control>>,
    done: &mpsc::UnboundedSender<String>,
    out: &FrameSink,
) {
    let dispatcher = &session.dispatcher;
    match frame {
        client_frame::Frame::Start(mut request) => {
            if let Some(tenant) = &session.tenant {
                tenant.apply(&mut request);
            }
            let request_id = request.request_id.clone();
            let max = dispatcher.config.max_session_requests;
            if running.len() >= max as usize {
                let error = DispatchError::SessionLimit(format!(
                    "this session already runs {max} requests, its limit (router \
                     --max-session-requests); wait for one to end or open another session"
                ));
                let _ = out.send(Ok(error.failed_frame(&request_id))).await;
                return;
            }
            if running.contains_key(&request_id) {
                let error = DispatchError::invalid(
                    "request_id",
                    format!(
                        "{request_id:?} is already in use by a running request in this session"
                    ),
                );
                let _ = out.send(Ok(error.failed_frame(&request_id))).await;
                return;
            }
            match dispatcher.prepare(request, session.trace.clone()) {
                Ok(mut prepared) => {
                    let (control_tx, control_rx) = mpsc::unbounded_channel();
                    running.insert(request_id.clone(), control_tx);
                    // Queued before the request's last frame goes out, so the session loop
                    // (which reads `done` first) has freed the place before the client can
                    // send a Start that needs it.
                    let done = done.clone();
                    prepared.on_end(move || {
                        let _ = done.send(request_id);
                    });
                    let (dispatcher, out) = (dispatcher.clone(), out.clone());
                    tokio::spawn(async move {
                        dispatcher.run(prepared, control_rx, out).await;
                    });
                }
                Err(error) => {
                    let _ = out.send(Ok(error.failed_frame(&request_id))).await;
                }
            }
        }
        client_frame::Frame::Cancel(cancel) => {
            if let Some(control) = running.get(&cancel.request_id) {
                let _ = control.send(Control::Cancel);
            } else {
                let error = DispatchError::NotRunning(cancel.request_id.clone());
                let _ = out.send(Ok(error.failed_frame(&cancel.request_id))).await;
            }
        }
        client_frame::Frame::Interrupt(interrupt) => {
            let request_id = interrupt.request_id.clone();
            if let Err(violation) = validate_interrupt(&interrupt, dispatcher.limits()) {
                let error = DispatchError::from(violation);
                let _ = out.send(Ok(error.failed_frame(&request_id))).await;
                return;
            }
            if let Some(control) = running.get(&request_id) {
                let _ = control.send(Control::Interrupt(interrupt));
            } else {
                let error = DispatchError::NotRunning(request_id.clone());
                let _ = out.send(Ok(error.failed_frame(&request_id))).await;
            }
        }
    }
}

/// Authenticates `Inference` calls when API keys are configured: the call's `authorization:
/// Bearer <key>` metadata must name a known key, whose [`Tenant`] is attached to the request
/// for the service to write into every `GenerateRequest`. Without keys every call passes and
/// no tenant is attached (the client's metadata `tenant` stands).
#[derive(Clone)]
pub struct AuthInterceptor {
    keys: Option<Arc<ApiKeys>>,
}

impl AuthInterceptor {
    pub fn new(keys: Option<Arc<ApiKeys>>) -> Self {
        Self { keys }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(keys) = &self.keys else {
            return Ok(request);
        };
        let header = request.metadata().get(AUTHORIZATION);
        let value = match header.map(|v| v.to_str()) {
            None => None,
            Some(Ok(value)) => Some(value),
            Some(Err(_)) => return Err(crate::auth::AuthError::Malformed.into()),
        };
        let tenant = keys.authenticate(value).inspect_err(|error| {
            debug!(%error, "inference call refused");
        })?;
        request.extensions_mut().insert(tenant);
        Ok(request)
    }
}
