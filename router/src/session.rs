//! One `Inference.Session`: a persistent stream carrying many requests. Each `Start` is
//! prepared and run by the dispatcher as its own task; `Cancel` and `Interrupt` reach the
//! running request by id; a per-session limit bounds how many run at once, and a request's
//! place is freed before its last frame goes out. A client frame refused on its own (a `Start`
//! reusing a running request's id, a bad `Interrupt`, a `Cancel` of nothing) is answered with
//! `Rejected`, never `Failed`: `Failed` ends a request, and these end none.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_cluster::grpc_server::client_fault;
use switchyard_cluster::telemetry::propagation::RemoteContext;
use switchyard_proto::v1::{self, client_frame};
use switchyard_proto::validate::{canonicalize_roles, validate_cancel, validate_interrupt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tonic::{Status, Streaming};
use tracing::{debug, info};

use crate::auth::Tenant;
use crate::dispatch::{Control, Dispatcher, FrameSink, Prepared};
use crate::error::DispatchError;
use crate::metrics::SessionGuard;

/// Frames buffered towards one `Session` client (shared by its requests) before dispatchers
/// wait for it to read.
pub(crate) const SESSION_BUFFER: usize = 1024;

/// What every request of one session shares.
pub(crate) struct Session {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) tenant: Option<Tenant>,
    pub(crate) trace: RemoteContext,
}

/// Reads a session's client frames until the client half-closes or fails. Requests already
/// running when the client half-closes finish normally; the response stream ends after them.
/// Frames the router cannot read (malformed, or over the message size limit) end the session:
/// its requests are cancelled, each ends with its last frame, and then the call with the
/// status sent on `ending`. A router shutting down ends the session once its running
/// requests have (at once when none runs) with `UNAVAILABLE`: the client reconnects, to
/// another router, knowing nothing was lost — not a torn connection it cannot tell from a
/// crash. At the call's `deadline` (its `grpc-timeout`) the session stops reading and cancels
/// its requests: the call itself ends `DEADLINE_EXCEEDED` then (see `InferenceService`).
pub(crate) async fn run_session(
    session: Session,
    mut inbound: Streaming<v1::ClientFrame>,
    out: FrameSink,
    ending: oneshot::Sender<Status>,
    deadline: Option<Instant>,
) {
    let mut running: HashMap<String, mpsc::UnboundedSender<Control>> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let _open = SessionGuard::open(&session.dispatcher.metrics);
    info!("session opened");
    let stopping = session.dispatcher.stopping.clone();
    let expired = async {
        match deadline {
            Some(deadline) => sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    loop {
        if stopping.is_cancelled() && running.is_empty() {
            info!("session closed: the router is shutting down");
            let _ = ending.send(Status::unavailable(
                "the router is shutting down; every request of this session has ended: \
                 reconnect and send new requests there",
            ));
            break;
        }
        tokio::select! {
            // Ended requests leave `running` before the next frame is read: a client that saw
            // one end may start another without meeting the session limit.
            biased;
            Some(request_id) = done_rx.recv() => {
                running.remove(&request_id);
            }
            () = stopping.cancelled(), if running.is_empty() => {}
            // The call ends now (`DEADLINE_EXCEEDED`): nothing more is started, and what runs
            // stops on its worker.
            () = &mut expired => {
                info!("session closed: the call's deadline (grpc-timeout) passed");
                for control in running.values() {
                    let _ = control.send(Control::Cancel);
                }
                break;
            }
            frame = inbound.message() => match frame {
                Ok(Some(v1::ClientFrame { frame: Some(frame) })) => {
                    handle_frame(&session, frame, &mut running, &done_tx, &out).await;
                }
                Ok(Some(_)) => {
                    let error = DispatchError::invalid("frame", "empty ClientFrame (set start, cancel or interrupt)");
                    let _ = out.send(Ok(error.rejected_frame("", ""))).await;
                }
                Ok(None) => break,
                Err(status) => {
                    debug!(%status, "session stream failed; cancelling its requests");
                    for control in running.values() {
                        let _ = control.send(Control::Cancel);
                    }
                    if let Some(refused) = unreadable_input(&status) {
                        info!(%refused, "session closed: a client frame could not be read");
                        let _ = ending.send(refused);
                    }
                    break;
                }
            },
        }
    }
    info!(running = running.len(), "session input closed");
}

/// The status a session ends with when its client sent what the router cannot read — the
/// client's fault, so never OK; `None` for a stream that simply broke (nobody to tell).
fn unreadable_input(status: &Status) -> Option<Status> {
    let closed = "the session is closed and its requests cancelled";
    Some(match client_fault(status)? {
        tonic::Code::ResourceExhausted => Status::resource_exhausted(format!(
            "a ClientFrame over the router's message size limit ({}); {closed}: shorten the \
             prompt or messages",
            status.message()
        )),
        _ => Status::invalid_argument(format!(
            "malformed ClientFrame ({}); {closed}: send switchyard.v1.ClientFrame messages",
            status.message()
        )),
    })
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
            // No id, no request to fail: the frame is refused.
            if request_id.is_empty() {
                let error = DispatchError::invalid(
                    "request_id",
                    "must not be empty: a Session's requests are told apart by it",
                );
                let _ = out.send(Ok(error.rejected_frame("start", ""))).await;
                return;
            }
            // Refused, not failed: the running request of that id goes on.
            if running.contains_key(&request_id) {
                let error = DispatchError::invalid(
                    "request_id",
                    format!(
                        "{request_id:?} is already in use by a running request in this session"
                    ),
                );
                let _ = out
                    .send(Ok(error.rejected_frame("start", &request_id)))
                    .await;
                return;
            }
            let max = dispatcher.config.max_session_requests;
            if running.len() >= max as usize {
                let error = DispatchError::SessionLimit(format!(
                    "this session already runs {max} requests, its limit (router \
                     --max-session-requests); wait for one to end or open another session"
                ));
                let _ = out.send(Ok(error.failed_frame(&request_id))).await;
                return;
            }
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            running.insert(request_id.clone(), control_tx);
            // Ended before its last frame goes out, so the session loop (which reads `done`
            // first) has freed the place before the client can send a Start that needs it.
            let done = done.clone();
            let end = move || {
                let _ = done.send(request_id);
            };
            if dispatcher.waits_to_prepare(&request) {
                // A long prompt takes milliseconds to tokenize: the session reads on meanwhile
                // (a request sent after it may be placed first).
                let (dispatcher, trace, out) =
                    (dispatcher.clone(), session.trace.clone(), out.clone());
                tokio::spawn(Box::pin(async move {
                    if let Some(prepared) = prepare(&dispatcher, request, trace, &out, end).await {
                        dispatcher.run(prepared, control_rx, out).await;
                    }
                }));
            } else if let Some(prepared) =
                prepare(dispatcher, request, session.trace.clone(), out, end).await
            {
                dispatcher.spawn_run(prepared, control_rx, out.clone());
            }
        }
        client_frame::Frame::Cancel(cancel) => {
            // An id no request can have is invalid, whatever runs (as an interrupt's is), and
            // the message does not quote it.
            if let Err(violation) = validate_cancel(&cancel, dispatcher.limits()) {
                let error = DispatchError::from(violation);
                let _ = out
                    .send(Ok(error.rejected_frame("cancel", &cancel.request_id)))
                    .await;
                return;
            }
            if let Some(control) = running.get(&cancel.request_id) {
                let _ = control.send(Control::Cancel);
            } else {
                let error = DispatchError::NotRunning(cancel.request_id.clone());
                let _ = out
                    .send(Ok(error.rejected_frame("cancel", &cancel.request_id)))
                    .await;
            }
        }
        client_frame::Frame::Interrupt(mut interrupt) => {
            let request_id = interrupt.request_id.clone();
            if let Err(violation) = validate_interrupt(&interrupt, dispatcher.limits()) {
                let error = DispatchError::from(violation);
                let _ = out
                    .send(Ok(error.rejected_frame("interrupt", &request_id)))
                    .await;
                return;
            }
            canonicalize_roles(&mut interrupt.messages);
            if let Some(control) = running.get(&request_id) {
                let _ = control.send(Control::Interrupt(Box::new(interrupt)));
            } else {
                let error = DispatchError::NotRunning(request_id.clone());
                let _ = out
                    .send(Ok(error.rejected_frame("interrupt", &request_id)))
                    .await;
            }
        }
    }
}

/// Prepares a session's request to run; a refused one ends with its `Failed` frame. `end` is
/// called just before the request's last frame goes out.
async fn prepare(
    dispatcher: &Dispatcher,
    request: v1::GenerateRequest,
    trace: RemoteContext,
    out: &FrameSink,
    end: impl FnOnce() + Send + 'static,
) -> Option<Prepared> {
    let request_id = request.request_id.clone();
    match dispatcher.prepare(request, trace).await {
        Ok(mut prepared) => {
            prepared.on_end(end);
            Some(prepared)
        }
        Err(error) => {
            end();
            let _ = out.send(Ok(error.failed_frame(&request_id))).await;
            None
        }
    }
}
