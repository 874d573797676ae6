//! gRPC between two components of one process without the network: a router hosting a
//! worker dials it over an in-memory pipe instead of loopback TCP. The bytes are still
//! HTTP/2 (every gRPC feature — streaming, metadata, cancellation, flow control — works the
//! same), but no socket, no system call and no second process sits between them: a crossing
//! between processes is most of what a hop costs on a request's path.
//!
//! [`pair`] gives the two ends: the [`InProcessDialer`] opens connections (through
//! [`InProcessDialer::channel`]) that the [`InProcessIncoming`] yields to a tonic server's
//! `serve_with_incoming*`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};

/// Bytes each direction of a connection buffers before the writer waits: the HTTP/2 frames of
/// a few token chunks, as a socket's buffer would hold them.
const PIPE_BYTES: usize = 256 * 1024;

/// The authority in-process channels name; only logs and the `:authority` header see it.
const AUTHORITY: &str = "http://in-process.switchyard.invalid";

/// Both ends of an in-process transport.
pub fn pair() -> (InProcessDialer, InProcessIncoming) {
    let (connections, accepted) = mpsc::unbounded_channel();
    (
        InProcessDialer { connections },
        InProcessIncoming { accepted },
    )
}

/// Opens connections to the server serving the matching [`InProcessIncoming`].
#[derive(Clone)]
pub struct InProcessDialer {
    connections: mpsc::UnboundedSender<InProcessIo>,
}

impl std::fmt::Debug for InProcessDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessDialer")
            .field("serving", &!self.connections.is_closed())
            .finish()
    }
}

impl InProcessDialer {
    /// One new connection; fails with `ConnectionRefused` once the server has stopped
    /// accepting (its incoming stream was dropped).
    pub fn dial(&self) -> io::Result<DuplexStream> {
        let (client, server) = tokio::io::duplex(PIPE_BYTES);
        self.connections.send(InProcessIo(server)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "in-process server stopped",
            )
        })?;
        Ok(client)
    }

    /// A gRPC channel over a new in-process connection, configured by `endpoint` (start from
    /// [`endpoint`]: its address is never dialled).
    pub async fn channel(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        let dialer = self.clone();
        endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let dialer = dialer.clone();
                async move { dialer.dial().map(TokioIo::new) }
            }))
            .await
    }
}

/// The endpoint to configure (timeouts, HTTP/2 settings) for [`InProcessDialer::channel`].
pub fn endpoint() -> Endpoint {
    Endpoint::from_static(AUTHORITY)
}

/// Connections dialled in process, for tonic's `serve_with_incoming*`. Ends when every
/// [`InProcessDialer`] is gone.
pub struct InProcessIncoming {
    accepted: mpsc::UnboundedReceiver<InProcessIo>,
}

impl std::fmt::Debug for InProcessIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessIncoming").finish_non_exhaustive()
    }
}

impl futures::Stream for InProcessIncoming {
    type Item = io::Result<InProcessIo>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|io| io.map(Ok))
    }
}

/// The server's end of an in-process connection.
#[derive(Debug)]
pub struct InProcessIo(DuplexStream);

/// An in-process connection has no peer address or certificate to report.
impl tonic::transport::server::Connected for InProcessIo {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for InProcessIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for InProcessIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn a_grpc_call_crosses_the_pipe_and_a_stopped_server_refuses_new_connections() {
        let (dialer, incoming) = pair();
        let (health, service) = tonic_health::server::health_reporter();
        health
            .set_service_status("probe", tonic_health::ServingStatus::Serving)
            .await;
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        let channel = dialer
            .channel(endpoint())
            .await
            .expect("connects in process");
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "probe".into(),
            })
            .await
            .expect("the call is served")
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32);

        stop.cancel();
        server.await.unwrap().unwrap();
        let refused = dialer.dial().expect_err("nobody accepts any more");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    }
}
