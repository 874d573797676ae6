//! A Rust client for the router's persistent `Inference.Session`: many concurrent requests over
//! one stream, each with its own frame stream, plus cancel and interrupt.
//!
//! **Reconnect.** When the session stream ends or fails while the client is in use (the router
//! restarted, the connection was lost), every request open on it ends with a `Failed` frame
//! `UNAVAILABLE`, and the client opens a new session in the background, with exponential
//! backoff and jitter (100 ms doubling to 5 s) until the router answers. Until then
//! [`SessionClient::start`], `cancel`, `interrupt` and `send` fail at once with
//! [`ClientError::Disconnected`] rather than wait (a caller that would rather wait awaits
//! [`SessionClient::connected`], bounded by its own timeout); after it, they work again on the
//! same `SessionClient`. The tonic [`Channel`] underneath is kept: it reconnects its own
//! connection.
//!
//! **API keys.** A router started with `--api-keys-file` takes calls only with
//! `authorization: Bearer <key>`: open the client with [`Credentials::api_key`]
//! ([`SessionClient::open_with`]) and every session it opens, and every call made through
//! [`SessionClient::inference`], carries it.
//!
//! This crate has no engine, etcd or server dependency: the protos, tonic and tokio.

mod backoff;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use switchyard_proto::v1::{
    self, ChatMessage, ClientFrame, GenerateRequest, client_frame,
    inference_client::InferenceClient, server_frame::Frame,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::{Interceptor, interceptor::InterceptedService};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::backoff::Backoff;

/// First pause before reopening a lost session; it doubles up to [`RECONNECT_MAX`].
const RECONNECT_INITIAL: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid router address {0:?}")]
    Address(String),
    #[error("cannot connect to the router: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("tls: {0}")]
    Tls(String),
    /// Never names the key: it is a secret.
    #[error("the api key is not usable: {0}")]
    ApiKey(&'static str),
    #[error("router refused the session: {0}")]
    Status(tonic::Status),
    /// The connection broke under the session's first call: reset, closed, or answered in
    /// something other than plaintext HTTP/2 (a TLS server, see [`is_connection_failure`]).
    #[error("cannot connect to the router: {}", connection_failure(.0))]
    Connection(tonic::Status),
    #[error("request_id {0:?} is already open on this client")]
    DuplicateRequest(String),
    /// The session ended and a new one is not open yet (see [`SessionClient::connected`]).
    #[error("no session to the router: the last one ended and a new one is being opened")]
    Disconnected,
}

impl From<tonic::Status> for ClientError {
    /// [`ClientError::Connection`] when the connection broke, else the router's answer.
    fn from(status: tonic::Status) -> Self {
        if is_connection_failure(&status) {
            Self::Connection(status)
        } else {
            Self::Status(status)
        }
    }
}

/// One persistent session to a router, reopened when it is lost. Clones share the session;
/// the background reconnect stops when the last clone is dropped.
#[derive(Clone)]
pub struct SessionClient {
    shared: Arc<Shared>,
    /// Dropped with the last clone: tells the reconnect task to stop.
    _alive: Arc<oneshot::Sender<()>>,
}

impl std::fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionClient").finish_non_exhaustive()
    }
}

struct Shared {
    channel: Channel,
    credentials: Credentials,
    /// The session requests start on; `None` while a lost one is being replaced.
    session: watch::Sender<Option<Arc<Session>>>,
}

/// One `Inference.Session` stream.
struct Session {
    /// Dropped (with the last handle to the session), the stream half-closes: the router
    /// finishes the requests still running, then ends it.
    frames: mpsc::UnboundedSender<ClientFrame>,
    routes: Arc<Mutex<Routes>>,
}

/// Where each open request's frames go.
struct Routes {
    /// False once the stream has ended: a request started then would never hear back.
    open: bool,
    by_id: HashMap<String, mpsc::UnboundedSender<v1::ServerFrame>>,
}

/// What a client presents to the router on each call: nothing, or an API key (the router's
/// `--api-keys-file`) as `authorization: Bearer <key>`. As a tonic [`Interceptor`] it adds
/// the header to every call. Its `Debug` never shows the key.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = self.authorization.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("api_key", &key)
            .finish()
    }
}

impl Credentials {
    /// No credentials: a router without API keys.
    pub fn none() -> Self {
        Self::default()
    }

    /// `key`, sent as `authorization: Bearer <key>`.
    pub fn api_key(key: &str) -> Result<Self, ClientError> {
        if key.is_empty() {
            return Err(ClientError::ApiKey("it is empty"));
        }
        // What a header can carry and a router's keys file can hold: no spaces, no controls.
        // (tonic would take bytes above ASCII too, which no key matches.)
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::ApiKey(
                "it holds characters other than printable ASCII (a space, a control character?)",
            ));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {key}")
            .parse()
            .map_err(|_| ClientError::ApiKey("not a valid header value"))?;
        // Kept out of HTTP/2 header compression tables (HPACK never-indexed).
        value.set_sensitive(true);
        Ok(Self {
            authorization: Some(value),
        })
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// An `Inference` client presenting `Credentials` on every call.
pub type AuthorizedInferenceClient = InferenceClient<InterceptedService<Channel, Credentials>>;

/// Whether a call's `status` is a failure of the connection under it rather than the server's
/// answer: tonic keeps the transport's error as the source of the statuses it makes up for a
/// connection that was reset, closed or spoke something other than HTTP/2 (as a TLS-only
/// server does to a plaintext client, which then sees `Cancelled`, `Unknown` or `Internal`,
/// whichever way the connection broke first). A status the server sent has no source.
pub fn is_connection_failure(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// What broke a connection: the status's message and its transport error's causes.
pub fn connection_failure(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let cause = error.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = error.source();
    }
    text
}

/// Connects a channel to `address` (`host:port` or a full `http://` URL).
pub async fn connect_channel(address: &str) -> Result<Channel, ClientError> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint =
        Endpoint::from_shared(url).map_err(|_| ClientError::Address(address.to_string()))?;
    Ok(keep_alive(endpoint).connect().await?)
}

/// Connects a TLS channel to `address` (`host:port`), trusting the CA certificates in `ca`.
pub async fn connect_tls(address: &str, ca: &std::path::Path) -> Result<Channel, ClientError> {
    let pem = std::fs::read(ca)
        .map_err(|e| ClientError::Tls(format!("cannot read {}: {e}", ca.display())))?;
    // tonic would report bad PEM only when connecting, without naming the file.
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(BEGIN.len()).any(|w| w == BEGIN) {
        return Err(ClientError::Tls(format!(
            "{}: no PEM certificate in it",
            ca.display()
        )));
    }
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("https://{address}")
    };
    let endpoint = Endpoint::from_shared(url)
        .map_err(|_| ClientError::Address(address.to_string()))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(keep_alive(endpoint).connect().await?)
}

/// A chat session may sit unused while its user thinks: HTTP/2 pings keep the connection
/// from looking idle to the router (which closes connections silent for its idle timeout),
/// and find a connection that died without a word.
fn keep_alive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
}

impl SessionClient {
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        Self::open(connect_channel(address).await?).await
    }

    /// Opens a session on an existing channel. The first session must open (an error here is
    /// the router's answer, e.g. a wrong address); later ones are reopened in the background.
    pub async fn open(channel: Channel) -> Result<Self, ClientError> {
        Self::open_with(channel, Credentials::none()).await
    }

    /// Like [`SessionClient::open`], presenting `credentials` on this session and on every one
    /// reopened later.
    pub async fn open_with(
        channel: Channel,
        credentials: Credentials,
    ) -> Result<Self, ClientError> {
        let (session, ended) = Session::open(channel.clone(), credentials.clone()).await?;
        let (session, _) = watch::channel(Some(session));
        let shared = Arc::new(Shared {
            channel,
            credentials,
            session,
        });
        let (alive, stopped) = oneshot::channel();
        tokio::spawn(keep_open(shared.clone(), ended, stopped));
        Ok(Self {
            shared,
            _alive: Arc::new(alive),
        })
    }

    /// The underlying channel, for unary calls such as `ListModels` (without the client's
    /// credentials: see [`SessionClient::inference`]).
    pub fn channel(&self) -> Channel {
        self.shared.channel.clone()
    }

    /// An `Inference` client on the same channel presenting the same credentials, for unary
    /// calls such as `ListModels`.
    pub fn inference(&self) -> AuthorizedInferenceClient {
        InferenceClient::with_interceptor(self.channel(), self.shared.credentials.clone())
    }

    /// Waits until a session is open: at once if one is, else until the background reconnect
    /// opens one. Not bounded (the router may be away for good): wrap it in a timeout.
    pub async fn connected(&self) {
        let mut session = self.shared.session.subscribe();
        // Err only when the sender is dropped, and `self` holds it.
        let _ = session
            .wait_for(|session| session.as_ref().is_some_and(|s| s.is_open()))
            .await;
    }

    /// Whether a session is open now (a request started now reaches the router).
    pub fn is_connected(&self) -> bool {
        self.shared
            .session
            .borrow()
            .as_ref()
            .is_some_and(|s| s.is_open())
    }

    fn session(&self) -> Result<Arc<Session>, ClientError> {
        self.shared
            .session
            .borrow()
            .clone()
            .ok_or(ClientError::Disconnected)
    }

    /// Starts a request; its frames arrive on the returned stream.
    pub fn start(&self, request: GenerateRequest) -> Result<RequestStream, ClientError> {
        let session = self.session()?;
        let request_id = request.request_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut routes = lock(&session.routes);
            if !routes.open {
                return Err(ClientError::Disconnected);
            }
            if routes.by_id.contains_key(&request_id) {
                return Err(ClientError::DuplicateRequest(request_id));
            }
            routes.by_id.insert(request_id.clone(), tx);
        }
        if let Err(error) = session.send(client_frame::Frame::Start(request)) {
            lock(&session.routes).by_id.remove(&request_id);
            return Err(error);
        }
        Ok(RequestStream {
            request_id,
            frames: rx,
            done: false,
        })
    }

    /// Sends a raw frame, e.g. to exercise the router's validation.
    pub fn send(&self, frame: client_frame::Frame) -> Result<(), ClientError> {
        self.session()?.send(frame)
    }

    pub fn cancel(&self, request_id: &str) -> Result<(), ClientError> {
        self.send(client_frame::Frame::Cancel(v1::Cancel {
            request_id: request_id.to_string(),
        }))
    }

    /// Stops the running generation and continues it with `messages`.
    pub fn interrupt(
        &self,
        request_id: &str,
        messages: Vec<ChatMessage>,
        keep_generated: bool,
    ) -> Result<(), ClientError> {
        self.send(client_frame::Frame::Interrupt(v1::Interrupt {
            request_id: request_id.to_string(),
            messages,
            keep_generated,
        }))
    }
}

impl Session {
    /// Opens a stream and starts routing its frames; the receiver resolves when it ends.
    async fn open(
        channel: Channel,
        credentials: Credentials,
    ) -> Result<(Arc<Self>, oneshot::Receiver<()>), tonic::Status> {
        let (frames, rx) = mpsc::unbounded_channel();
        let inbound = InferenceClient::with_interceptor(channel, credentials)
            .session(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let routes = Arc::new(Mutex::new(Routes {
            open: true,
            by_id: HashMap::new(),
        }));
        let (ended, ended_rx) = oneshot::channel();
        tokio::spawn(demux(inbound, routes.clone(), ended));
        Ok((Arc::new(Self { frames, routes }), ended_rx))
    }

    fn is_open(&self) -> bool {
        lock(&self.routes).open
    }

    fn send(&self, frame: client_frame::Frame) -> Result<(), ClientError> {
        self.frames
            .send(ClientFrame { frame: Some(frame) })
            .map_err(|_| ClientError::Disconnected)
    }
}

fn lock(routes: &Mutex<Routes>) -> MutexGuard<'_, Routes> {
    routes.lock().expect("routes lock")
}

/// Routes a session's frames to their requests until the stream ends, then fails the requests
/// still open on it. Dropping `_ended` on the way out tells [`keep_open`].
async fn demux(
    mut inbound: tonic::Streaming<v1::ServerFrame>,
    routes: Arc<Mutex<Routes>>,
    _ended: oneshot::Sender<()>,
) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(frame)) => route(&routes, frame),
            Ok(None) => break "session closed by the router".to_string(),
            Err(status) => {
                break format!(
                    "session to the router lost ({:?}: {})",
                    status.code(),
                    status.message()
                );
            }
        }
    };
    let open = {
        let mut routes = lock(&routes);
        routes.open = false;
        std::mem::take(&mut routes.by_id)
    };
    if open.is_empty() {
        tracing::debug!("{why}");
    } else {
        tracing::warn!(requests = open.len(), "{why}; the requests open on it fail");
    }
    // UNAVAILABLE whatever broke the stream: the request did not fail on its own merits, so
    // it may be retried (on the session the client reopens).
    let status = tonic::Status::unavailable(why);
    for (request_id, tx) in open {
        let _ = tx.send(failed(&request_id, &status));
    }
}

/// Replaces each lost session with a new one until the client is dropped (`stopped`).
async fn keep_open(
    shared: Arc<Shared>,
    mut ended: oneshot::Receiver<()>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut ended => {}
            _ = &mut stopped => return,
        }
        shared.session.send_replace(None);
        let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
        ended = loop {
            let opened = tokio::select! {
                opened = Session::open(shared.channel.clone(), shared.credentials.clone()) => opened,
                _ = &mut stopped => return,
            };
            match opened {
                Ok((session, ended)) => {
                    shared.session.send_replace(Some(session));
                    tracing::info!("session to the router reopened");
                    break ended;
                }
                Err(status) => {
                    let delay = backoff.next_delay();
                    tracing::debug!(
                        code = ?status.code(),
                        message = status.message(),
                        "cannot reopen the session; next attempt in {delay:.1?}"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = &mut stopped => return,
                    }
                }
            }
        };
    }
}

fn route(routes: &Mutex<Routes>, frame: v1::ServerFrame) {
    let Some(request_id) = frame.request_id().map(str::to_string) else {
        return;
    };
    let last = matches!(
        frame.frame,
        Some(Frame::Finished(_)) | Some(Frame::Failed(_))
    );
    let mut routes = lock(routes);
    if let Some(tx) = routes.by_id.get(&request_id) {
        let _ = tx.send(frame);
        if last {
            routes.by_id.remove(&request_id);
        }
    } else {
        tracing::debug!(%request_id, "frame for a request this client does not track");
    }
}

fn failed(request_id: &str, status: &tonic::Status) -> v1::ServerFrame {
    v1::ServerFrame {
        frame: Some(Frame::Failed(v1::Failed {
            request_id: request_id.to_string(),
            code: status.code() as i32,
            message: status.message().to_string(),
            ..Default::default()
        })),
    }
}

/// The frames of one request, ending after `Finished` or `Failed`.
#[derive(Debug)]
pub struct RequestStream {
    request_id: String,
    frames: mpsc::UnboundedReceiver<v1::ServerFrame>,
    done: bool,
}

impl RequestStream {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub async fn next(&mut self) -> Option<Frame> {
        if self.done {
            return None;
        }
        let frame = self.frames.recv().await?.frame?;
        self.done = matches!(frame, Frame::Finished(_) | Frame::Failed(_));
        Some(frame)
    }

    /// Reads the request to its end.
    pub async fn collect(mut self) -> Completion {
        let mut completion = Completion::default();
        while let Some(frame) = self.next().await {
            completion.absorb(frame);
        }
        completion
    }
}

/// Everything one request produced.
#[derive(Debug, Default, Clone)]
pub struct Completion {
    pub accepted: Option<v1::Accepted>,
    pub text: String,
    pub token_ids: Vec<u32>,
    /// The tools the model called, whole (put together from `Tokens.tool_calls`).
    pub tool_calls: Vec<v1::ToolCall>,
    /// Chunk sequence numbers in arrival order.
    pub seqs: Vec<u64>,
    pub finished: Option<v1::Finished>,
    pub failed: Option<v1::Failed>,
    /// Moves to another worker mid-stream, in order.
    pub moved: Vec<v1::Moved>,
    /// Frames sent for this request that the router refused (a bad interrupt), in order;
    /// the request went on.
    pub rejected: Vec<v1::Rejected>,
}

impl Completion {
    pub fn absorb(&mut self, frame: Frame) {
        match frame {
            Frame::Accepted(a) => self.accepted = Some(a),
            Frame::Tokens(t) => {
                self.text.push_str(&t.text);
                self.token_ids.extend(t.token_ids);
                switchyard_proto::assemble_tool_calls(&mut self.tool_calls, &t.tool_calls);
                self.seqs.push(t.seq);
            }
            Frame::Finished(f) => self.finished = Some(f),
            Frame::Failed(f) => self.failed = Some(f),
            Frame::Moved(m) => self.moved.push(m),
            Frame::Rejected(r) => self.rejected.push(r),
        }
    }
}

/// Ids of the workers a `ListModels` answer says the router can route to, sorted, unique.
pub fn routable_worker_ids(models: &v1::ListModelsResponse) -> Vec<String> {
    let mut ids: Vec<String> = models
        .models
        .iter()
        .flat_map(|m| m.workers.iter().map(|w| w.id.clone()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_api_key_goes_in_the_authorization_header_and_nowhere_else() {
        let mut credentials = Credentials::api_key("sk-test-0001").unwrap();
        let request = credentials.call(tonic::Request::new(())).unwrap();
        let header = request.metadata().get("authorization").unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer sk-test-0001");
        assert!(header.is_sensitive());
        assert!(!format!("{credentials:?}").contains("sk-test"));

        let mut none = Credentials::none();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());

        for bad in ["", "sk-\nnewline", "sk-é", "sk two"] {
            let error = Credentials::api_key(bad).unwrap_err().to_string();
            assert!(error.contains("api key"), "{error}");
            assert!(bad.is_empty() || !error.contains(bad), "{error}");
        }
    }
}
