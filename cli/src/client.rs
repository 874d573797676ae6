//! A Rust client for the router's persistent `Inference.Session`: many concurrent requests over
//! one stream, each with its own frame stream, plus cancel and interrupt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use switchyard_proto::v1::{
    self, ChatMessage, ClientFrame, GenerateRequest, client_frame,
    inference_client::InferenceClient, server_frame::Frame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid router address {0:?}")]
    Address(String),
    #[error("cannot connect to the router: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("router refused the session: {0}")]
    Status(#[from] tonic::Status),
    #[error("request_id {0:?} is already open on this client")]
    DuplicateRequest(String),
    #[error("the session has closed")]
    Closed,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<v1::ServerFrame>>>>;

/// One persistent session to a router.
#[derive(Clone)]
pub struct SessionClient {
    frames: mpsc::UnboundedSender<ClientFrame>,
    routes: Routes,
    channel: Channel,
}

impl std::fmt::Debug for SessionClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionClient").finish_non_exhaustive()
    }
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
    let tls = switchyard_cluster::tls::ClientTls::new(ca.to_path_buf());
    let endpoint = switchyard_cluster::tls::endpoint(address, Some(&tls))
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(keep_alive(endpoint).connect().await?)
}

/// A chat session may sit unused while its user thinks: HTTP/2 pings keep the connection
/// from looking idle to the router (which closes connections silent for its idle timeout).
fn keep_alive(endpoint: Endpoint) -> Endpoint {
    endpoint
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true)
}

impl SessionClient {
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        Self::open(connect_channel(address).await?).await
    }

    /// Opens a session on an existing channel.
    pub async fn open(channel: Channel) -> Result<Self, ClientError> {
        let (frames, rx) = mpsc::unbounded_channel();
        let mut inbound = InferenceClient::new(channel.clone())
            .session(UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let routes: Routes = Arc::default();
        let demux_routes = routes.clone();
        tokio::spawn(async move {
            let ended = loop {
                match inbound.message().await {
                    Ok(Some(frame)) => route(&demux_routes, frame),
                    Ok(None) => break tonic::Status::unavailable("session closed by the router"),
                    Err(status) => break status,
                }
            };
            // Every open request learns that its stream is gone.
            for (request_id, tx) in demux_routes.lock().expect("routes lock").drain() {
                let _ = tx.send(failed(&request_id, &ended));
            }
        });
        Ok(Self {
            frames,
            routes,
            channel,
        })
    }

    /// The underlying channel, for unary calls such as `ListModels`.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Starts a request; its frames arrive on the returned stream.
    pub fn start(&self, request: GenerateRequest) -> Result<RequestStream, ClientError> {
        let request_id = request.request_id.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut routes = self.routes.lock().expect("routes lock");
            if routes.contains_key(&request_id) {
                return Err(ClientError::DuplicateRequest(request_id));
            }
            routes.insert(request_id.clone(), tx);
        }
        self.send(client_frame::Frame::Start(request))?;
        Ok(RequestStream {
            request_id,
            frames: rx,
            done: false,
        })
    }

    /// Sends a raw frame, e.g. to exercise the router's validation.
    pub fn send(&self, frame: client_frame::Frame) -> Result<(), ClientError> {
        self.frames
            .send(ClientFrame { frame: Some(frame) })
            .map_err(|_| ClientError::Closed)
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

fn route(routes: &Routes, frame: v1::ServerFrame) {
    let Some(request_id) = frame.request_id().map(str::to_string) else {
        return;
    };
    let last = matches!(
        frame.frame,
        Some(Frame::Finished(_)) | Some(Frame::Failed(_))
    );
    let mut routes = routes.lock().expect("routes lock");
    if let Some(tx) = routes.get(&request_id) {
        let _ = tx.send(frame);
        if last {
            routes.remove(&request_id);
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
    /// Chunk sequence numbers in arrival order.
    pub seqs: Vec<u64>,
    pub finished: Option<v1::Finished>,
    pub failed: Option<v1::Failed>,
}

impl Completion {
    pub fn absorb(&mut self, frame: Frame) {
        match frame {
            Frame::Accepted(a) => self.accepted = Some(a),
            Frame::Tokens(t) => {
                self.text.push_str(&t.text);
                self.token_ids.extend(t.token_ids);
                self.seqs.push(t.seq);
            }
            Frame::Finished(f) => self.finished = Some(f),
            Frame::Failed(f) => self.failed = Some(f),
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
