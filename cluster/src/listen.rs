//! Connection hygiene shared by every listener (gRPC and HTTP, plaintext and TLS).
//!
//! A connection that sends nothing, or half a request, must not hold a socket (and a file
//! descriptor) for ever: found from outside, such connections were held 160 s and more, and
//! enough of them exhausted the router's file descriptors until it stopped answering
//! `/health`. Here:
//!
//! - [`TimedIo`] wraps every accepted connection. Until the connection is *established* it
//!   must be within its first-request deadline ([`ConnectionTimeouts::header_read`] from
//!   accept, TLS handshake included). Established means it has received 24 bytes (the length
//!   of HTTP/2's connection preface; an HTTP/1 request line and one header are longer) or has
//!   answered something it received (a short HTTP/1 request). Afterwards a connection that
//!   exchanged no bytes either way for [`ConnectionTimeouts::idle`] is closed, like Envoy's
//!   idle timeout: that includes a gRPC `Session` stream nobody used for that long, while one
//!   carrying tokens (or a client's HTTP/2 keepalive pings, as the router's worker links send)
//!   is never cut.
//! - [`serve_http`] serves an axum app with hyper's HTTP/1 header-read timeout (a request
//!   head, including the next one on a keep-alive connection, must arrive within
//!   [`ConnectionTimeouts::header_read`]) and graceful shutdown.
//! - [`plaintext`] and [`with_handshake`] accept connections. When `accept` fails (out of
//!   file descriptors) the loop backs off instead of spinning: new connections wait in the
//!   kernel's listen backlog while established ones (etcd watches, in-flight streams) carry
//!   on, and are accepted again once descriptors are freed (e.g. by these timeouts).
//! - [`raise_fd_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start-up.
//! - [`bind`] opens every server listener with a listen backlog of [`LISTEN_BACKLOG`]:
//!   `tokio::net::TcpListener::bind` asks for 128 (mio's, the same as the standard library's),
//!   so a burst of more new connections than that (a load balancer's pool, hundreds of clients
//!   starting at once) overflowed the accept queue and the kernel dropped their SYNs — each
//!   such client waited for its SYN retransmission, 1 s and then 3 s.
//!
//! gRPC servers send no HTTP/2 keepalive pings of their own: any live HTTP/2 peer answers
//! them, which would count as traffic and keep every idle connection open for ever; a dead
//! peer is closed by the idle timeout instead.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Bytes a connection must receive to count as established: HTTP/2's connection preface.
const ESTABLISHED_BYTES: usize = 24;

/// Listen backlog asked for by [`bind`]: Linux's default `net.core.somaxconn` since 5.4; the
/// kernel caps it at `somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Pause after a failed `accept` (out of file descriptors, out of memory) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What an HTTP/1 connection buffers while it reads a request's head: a head larger than this is
/// answered 431. hyper's default, ~400 KiB, let each connection hold that much for the whole
/// header-read timeout; 64 KiB is twice nginx's most (4 × 8 KiB) and far above any API client's
/// head. (HTTP/2's header list limit, hyper's 16 KiB, is lower already.)
pub const MAX_HTTP1_HEAD_BYTES: usize = 64 << 10;

/// How long connections may take to ask, and stay silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionTimeouts {
    /// A new connection must deliver its first request (over TLS, after the handshake) within
    /// this from accept; an HTTP/1 connection each further request head too.
    pub header_read: Duration,
    /// A connection that exchanged no bytes either way for this long is closed.
    pub idle: Duration,
    /// A connection open this long is asked to go away (HTTP/2 `GOAWAY`; HTTP/1 closed after
    /// the request in progress): what it has open finishes, and the client opens a new
    /// connection for what comes next — which the load balancer in front of several
    /// replicas may send elsewhere, so that long-lived clients spread onto replicas added
    /// since they connected. `None`: never (gRPC's default too).
    pub max_age: Option<Duration>,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            max_age: None,
        }
    }
}

impl ConnectionTimeouts {
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read.is_zero() {
            return Err("header read timeout: must be more than 0".into());
        }
        if self.idle.is_zero() {
            return Err("idle timeout: must be more than 0".into());
        }
        if self.max_age.is_some_and(|age| age.is_zero()) {
            return Err("max connection age: must be more than 0 (leave it unset for none)".into());
        }
        Ok(())
    }
}

/// An accepted connection closed when it stays silent too long (see the module docs). The
/// deadline is checked when the server waits to read, which hyper and h2 always do on an
/// open connection.
pub struct TimedIo<T> {
    inner: T,
    /// The address the connection came from, as accepted (it stays known after the peer hangs
    /// up, unlike the socket's).
    peer: SocketAddr,
    idle: Duration,
    /// Bytes received while not yet established (at most [`ESTABLISHED_BYTES`] matter).
    received: usize,
    established: bool,
    last_activity: Instant,
    /// Fires at the first-request deadline, then (established) at `last_activity + idle` or
    /// earlier; re-armed lazily, so traffic costs a clock read, not a timer update.
    timer: Pin<Box<Sleep>>,
}

impl<T> std::fmt::Debug for TimedIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimedIo")
            .field("established", &self.established)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl<T> TimedIo<T> {
    /// `inner`, accepted from `peer` at `accepted`.
    pub fn new(
        inner: T,
        peer: SocketAddr,
        timeouts: ConnectionTimeouts,
        accepted: Instant,
    ) -> Self {
        Self {
            inner,
            peer,
            idle: timeouts.idle,
            received: 0,
            established: false,
            last_activity: accepted,
            timer: Box::pin(tokio::time::sleep_until(accepted + timeouts.header_read)),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The address the connection came from.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    fn on_read(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.last_activity = Instant::now();
        if !self.established {
            self.received += n;
            if self.received >= ESTABLISHED_BYTES {
                self.establish();
            }
        }
    }

    fn on_write(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.last_activity = Instant::now();
        // An answer to what the peer sent (an HTTP/2 server's own SETTINGS go out before it
        // reads anything, so they do not count).
        if self.received > 0 && !self.established {
            self.establish();
        }
    }

    /// From now on the idle deadline applies: the timer moves to it (once a connection; it
    /// may be earlier than the header-read deadline the timer was armed with).
    fn establish(&mut self) {
        self.established = true;
        self.timer.as_mut().reset(self.last_activity + self.idle);
    }

    /// Whether the connection is past its deadline; otherwise the timer is armed on `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if !self.established {
                return Some("no request within the header read timeout");
            }
            let deadline = self.last_activity + self.idle;
            if deadline <= Instant::now() {
                return Some("idle timeout");
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.on_read(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => match this.expired(cx) {
                Some(why) => {
                    debug!(why, "closing a silent connection");
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)))
                }
                None => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.on_write(n);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.on_write(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The wrapped connection's peer address and, over TLS, its certificates (which the
/// `Worker` service's mTLS check reads).
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for TimedIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Connections accepted on a listener, ready to serve: a stream for tonic's
/// `serve_with_incoming*`, and what [`serve_http`] serves. The accept loop ends when this is
/// dropped.
pub struct Incoming<Io> {
    accepted: mpsc::Receiver<Io>,
    local: SocketAddr,
}

impl<Io> std::fmt::Debug for Incoming<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl<Io> Incoming<Io> {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl<Io> futures::Stream for Incoming<Io> {
    type Item = io::Result<Io>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|io| io.map(Ok))
    }
}

/// Plaintext connections accepted on `listener`.
pub fn plaintext(
    listener: TcpListener,
    timeouts: ConnectionTimeouts,
) -> io::Result<Incoming<TimedIo<TcpStream>>> {
    let local = listener.local_addr()?;
    let (tx, accepted) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0;
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = accept(&listener, &mut failures) => accepted,
            };
            let io = TimedIo::new(tcp, peer, timeouts, Instant::now());
            if tx.send(io).await.is_err() {
                return;
            }
        }
    });
    Ok(Incoming { accepted, local })
}

/// Connections accepted on `listener` after `handshake` (e.g. TLS), each handshaken in its
/// own task so a slow or silent client never holds up the others. The handshake counts
/// against the connection's first-request deadline.
pub fn with_handshake<Io, H, Fut>(
    listener: TcpListener,
    timeouts: ConnectionTimeouts,
    handshake: H,
) -> io::Result<Incoming<TimedIo<Io>>>
where
    Io: Send + 'static,
    H: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<Io>> + Send + 'static,
{
    let local = listener.local_addr()?;
    let (tx, accepted) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0;
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = accept(&listener, &mut failures) => accepted,
            };
            let accepted_at = Instant::now();
            let handshaking = handshake(tcp);
            let tx = tx.clone();
            tokio::spawn(async move {
                let deadline = accepted_at + timeouts.header_read;
                match tokio::time::timeout_at(deadline, handshaking).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(TimedIo::new(io, peer, timeouts, accepted_at)).await;
                    }
                    // Plaintext clients on a TLS port, untrusted client certificates,
                    // scanners: the peer sees the connection closed.
                    Ok(Err(error)) => debug!(%peer, %error, "handshake failed"),
                    Err(_) => debug!(%peer, "handshake timed out"),
                }
            });
        }
    });
    Ok(Incoming { accepted, local })
}

/// The next connection on `listener`. `failures` counts consecutive failed accepts, so a
/// streak is logged when it starts and when it ends rather than ten times a second.
async fn accept(listener: &TcpListener, failures: &mut u64) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                if *failures > 0 {
                    info!(failed_accepts = *failures, "accepting connections again");
                    *failures = 0;
                }
                // Streams carry small frames: Nagle's algorithm would hold them back for the
                // peer's delayed ACK (~40 ms).
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            // A peer that gave up before its connection was accepted: nothing to back off.
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) =>
            {
                debug!(%error, "connection closed before accept");
            }
            Err(error) => {
                if *failures == 0 {
                    warn!(
                        %error,
                        "cannot accept connections (out of file descriptors?); retrying every \
                         {ACCEPT_BACKOFF:?}: new connections wait, open ones carry on"
                    );
                }
                *failures += 1;
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Serves `app` over HTTP/1.1 and HTTP/2 on `incoming` until `shutdown` fires, then lets
/// open requests finish (like `axum::serve(..).with_graceful_shutdown`), with hyper's
/// header-read timeout, which `axum::serve` does not set, and connections retired gracefully
/// at [`ConnectionTimeouts::max_age`]. Handlers can extract the caller's address as
/// `axum::extract::ConnectInfo<SocketAddr>`, as with axum's
/// `into_make_service_with_connect_info::<SocketAddr>()`.
pub async fn serve_http<Io>(
    mut incoming: Incoming<TimedIo<Io>>,
    app: axum::Router,
    timeouts: ConnectionTimeouts,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use futures::StreamExt as _;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::Layer as _;

    let app = app.layer(axum::middleware::from_fn(close_when_body_left_unread));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .max_buf_size(MAX_HTTP1_HEAD_BYTES);
    builder.http2().timer(TokioTimer::new());
    // Every connection's task holds a sender: once all have ended, `recv` answers `None`.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let io = tokio::select! {
            _ = shutdown.cancelled() => break,
            io = incoming.next() => match io {
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    debug!(%error, "accept failed");
                    continue;
                }
                None => break,
            },
        };
        let connect_info = axum::Extension(axum::extract::ConnectInfo(io.peer_addr()));
        let service =
            hyper_util::service::TowerToHyperService::new(connect_info.layer(app.clone()));
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        let (open, shutdown) = (open.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _open = open;
            let mut connection = std::pin::pin!(connection);
            let retire = async {
                match timeouts.max_age {
                    Some(age) => tokio::time::sleep(age).await,
                    None => std::future::pending().await,
                }
            };
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = retire => {
                    debug!("asking a connection past its max age to go away");
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                debug!(%error, "http connection closed");
            }
        });
    }
    drop(incoming);
    drop(open);
    all_closed.recv().await;
    Ok(())
}

/// A request answered before its body was read to the end (refused by an API-key check, or
/// 413 at the body limit): hyper drains a small rest, but closes the HTTP/1 connection after
/// the answer rather than read a large one, and says nothing. Saying `connection: close`
/// keeps the client from pooling the connection and failing its next request on it (HTTP/2
/// drops the header: its streams are independent).
async fn close_when_body_left_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, header};
    let headers = request.headers();
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length != "0");
    if !has_body {
        return next.run(request).await;
    }
    // A client that asked to be told before it sends the body has not sent it: nothing to drain
    // (and reading would tell it to go on).
    let drain_if_dropped = !headers
        .get(header::EXPECT)
        .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let read_to_end = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        axum::body::Body::new(ReadToEnd {
            body: Some(body),
            read_to_end: read_to_end.clone(),
            drain_if_dropped,
        })
    });
    let mut response = next.run(request).await;
    if !read_to_end.load(Ordering::Relaxed) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// At most this much of a request body is read and dropped after an early answer (see
/// [`ReadToEnd`]); a larger rest is left unread and the connection closed on it.
const DRAIN_UNREAD_BODY_BYTES: usize = 16 << 20;

/// A request body that notes when it has been read to its end. Dropped before that (the
/// request was answered without it), it reads and drops the rest, up to
/// [`DRAIN_UNREAD_BODY_BYTES`], so that the client — which, without `expect: 100-continue`,
/// sends its whole body before it reads — can finish sending and read the answer: closing on
/// unread data resets the connection, and the client sees a broken pipe instead (a lingering
/// close, as nginx does). The connection's idle timeout bounds a client that stops sending.
struct ReadToEnd {
    /// `None` once handed to the drain.
    body: Option<axum::body::Body>,
    read_to_end: Arc<AtomicBool>,
    drain_if_dropped: bool,
}

impl ReadToEnd {
    fn body(&mut self) -> &mut axum::body::Body {
        self.body.as_mut().expect("the body is only taken on drop")
    }
}

impl http_body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let body = self.body();
        let frame = Pin::new(&mut *body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || body.is_end_stream() {
            self.read_to_end.store(true, Ordering::Relaxed);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(http_body::SizeHint::default, http_body::Body::size_hint)
    }
}

impl Drop for ReadToEnd {
    fn drop(&mut self) {
        if !self.drain_if_dropped || self.read_to_end.load(Ordering::Relaxed) {
            return;
        }
        let (Some(mut body), Ok(runtime)) =
            (self.body.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        runtime.spawn(async move {
            use http_body_util::BodyExt as _;
            let mut left = DRAIN_UNREAD_BODY_BYTES;
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                match left.checked_sub(data.len()) {
                    Some(rest) => left = rest,
                    None => return,
                }
            }
        });
    }
}

/// A listener on `addr` (address reuse on, as `TcpListener::bind` sets it) with a listen backlog
/// of [`LISTEN_BACKLOG`]. Must be called within a tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_with_backlog(addr, LISTEN_BACKLOG)
}

/// [`bind`] with another listen backlog (load tests try small ones on purpose).
pub fn bind_with_backlog(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Raises the soft limit on open files to the hard limit (many distributions start services
/// with a soft limit of 1024, each connection takes one); returns `(soft, hard)` as they are
/// afterwards.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= hard {
        return Ok((soft, hard));
    }
    // An unlimited hard limit cannot be the soft one: the kernel caps open files at
    // fs.nr_open.
    let target = if hard == nix::sys::resource::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(soft)
    } else {
        hard
    };
    if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok((soft, hard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn timeouts(header_read_ms: u64, idle_ms: u64) -> ConnectionTimeouts {
        ConnectionTimeouts {
            header_read: Duration::from_millis(header_read_ms),
            idle: Duration::from_millis(idle_ms),
            max_age: None,
        }
    }

    /// Echoes every accepted connection until it fails; returns the listener's address.
    async fn echo_server(timeouts: ConnectionTimeouts) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let mut incoming = plaintext(listener, timeouts).unwrap();
        let addr = incoming.local_addr();
        tokio::spawn(async move {
            while let Some(Ok(mut io)) = futures::StreamExt::next(&mut incoming).await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        match io.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Reads until the server closes the connection; returns what was read.
    async fn read_to_close(tcp: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    /// An HTTP server whose connections retire at `max_age`; `/slow` answers after twice that.
    async fn http_server(max_age: Duration) -> SocketAddr {
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(move || async move {
                    tokio::time::sleep(max_age * 2).await;
                    "slow but whole"
                }),
            );
        let timeouts = ConnectionTimeouts {
            max_age: Some(max_age),
            ..timeouts(10_000, 60_000)
        };
        serve_on_loopback(app, timeouts)
    }

    /// Serves `app` with [`serve_http`] on a free loopback port until the test ends.
    fn serve_on_loopback(app: axum::Router, timeouts: ConnectionTimeouts) -> SocketAddr {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let incoming = plaintext(listener, timeouts).unwrap();
        let addr = incoming.local_addr();
        tokio::spawn(serve_http(
            incoming,
            app,
            timeouts,
            CancellationToken::new(),
        ));
        addr
    }

    /// Sends one keep-alive `GET path`; returns all the server sent until it closed.
    async fn get_until_closed(addr: SocketAddr, path: &str) -> String {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut tcp))
            .await
            .expect("a connection past its max age is closed");
        String::from_utf8_lossy(&answered).into_owned()
    }

    #[tokio::test]
    async fn handlers_see_the_address_a_connection_came_from() {
        use axum::extract::ConnectInfo;
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.to_string()
            }),
        );
        let addr = serve_on_loopback(app, timeouts(10_000, 60_000));
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let me = tcp.local_addr().unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let answered = String::from_utf8_lossy(&read_to_close(&mut tcp).await).into_owned();
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        assert!(answered.ends_with(&format!("\r\n\r\n{me}")), "{answered}");
    }

    /// Sends a keep-alive `POST /<path>` with a body of `size` bytes; returns what the server
    /// sent until it closed, lowercased, or `None` if it kept the connection open for 10 s.
    async fn post_until_closed(addr: SocketAddr, path: &str, size: usize) -> Option<String> {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /{path} HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        // The server may stop reading (and close) before all of it is sent.
        let _ = tcp.write_all(&vec![b'x'; size]).await;
        let answered = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut tcp))
            .await
            .ok()?;
        Some(String::from_utf8_lossy(&answered).to_lowercase())
    }

    /// A request answered before its body is read to the end — refused at the body limit (413)
    /// or by a check that never reads it (401) — cannot leave its connection for another
    /// request when hyper will not read the rest, and the answer must say so: a client pooled
    /// such a connection and failed its next request with a broken pipe (seen in CI with
    /// reqwest). A body read whole keeps the connection.
    #[tokio::test]
    async fn a_request_answered_before_its_body_is_read_closes_its_connection_and_says_so() {
        let app = axum::Router::new()
            .route(
                "/read",
                axum::routing::post(
                    |body: axum::body::Bytes| async move { body.len().to_string() },
                ),
            )
            .route(
                "/refuse",
                axum::routing::post(|| async { (axum::http::StatusCode::UNAUTHORIZED, "no") }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(64 << 10));
        let addr = serve_on_loopback(app, timeouts(10_000, 60_000));
        for (path, size, status) in [("read", 256 << 10, "413"), ("refuse", 256 << 10, "401")] {
            let answered = post_until_closed(addr, path, size)
                .await
                .unwrap_or_else(|| panic!("{path}: the connection is closed after the answer"));
            assert!(
                answered.starts_with(&format!("http/1.1 {status}")),
                "{answered}"
            );
            assert!(answered.contains("\r\nconnection: close\r\n"), "{answered}");
        }
        // hyper reads a small unread rest itself, but the answer went out before: it says close.
        let answered = post_until_closed(addr, "refuse", 100)
            .await
            .expect("closed");
        assert!(answered.contains("\r\nconnection: close\r\n"), "{answered}");
        // Read whole: the connection carries the next request.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            tcp.write_all(b"POST /read HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
                .await
                .unwrap();
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\n3") {
                let mut buf = [0u8; 256];
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
                answer.extend_from_slice(&buf[..n]);
            }
            let answer = String::from_utf8_lossy(&answer).to_lowercase();
            assert!(!answer.contains("connection: close"), "{answer}");
        }
    }

    /// A client that sends its whole body before it reads (no `expect: 100-continue`, as most
    /// do) reads the early answer rather than a broken pipe: the server reads and drops the
    /// rest of the body (up to [`DRAIN_UNREAD_BODY_BYTES`]) before it closes. Seen in CI: a
    /// 3 MiB POST refused with a 413 failed in reqwest with "error writing a body to
    /// connection: Broken pipe".
    #[tokio::test]
    async fn a_client_sending_a_refused_body_whole_reads_the_answer() {
        let app = axum::Router::new().route(
            "/refuse",
            axum::routing::post(|| async { (axum::http::StatusCode::UNAUTHORIZED, "no") }),
        );
        let addr = serve_on_loopback(app, timeouts(10_000, 60_000));
        let size = 8 << 20;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&vec![b'x'; size])
            .await
            .expect("the server takes the whole body");
        let answered = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut tcp))
            .await
            .expect("answered and closed");
        let answered = String::from_utf8_lossy(&answered).to_lowercase();
        assert!(answered.starts_with("http/1.1 401"), "{answered}");
        assert!(answered.contains("\r\nconnection: close\r\n"), "{answered}");
    }

    /// A request head over [`MAX_HTTP1_HEAD_BYTES`] is answered 431 (found from outside: a
    /// 300 KiB header was accepted, and each connection could buffer ~400 KiB); a large but
    /// reasonable head (a 16 KiB cookie) is served.
    #[tokio::test]
    async fn an_oversized_request_head_is_a_431() {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let addr = serve_on_loopback(app, timeouts(10_000, 60_000));
        for (header_bytes, status) in [(16 << 10, "200"), (MAX_HTTP1_HEAD_BYTES + 1, "431")] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET / HTTP/1.1\r\nhost: x\r\ncookie: {}\r\nconnection: close\r\n\r\n",
                "c".repeat(header_bytes)
            );
            // The server may answer and close before all of it is sent.
            let _ = tcp.write_all(head.as_bytes()).await;
            let answered = tokio::time::timeout(Duration::from_secs(10), read_to_close(&mut tcp))
                .await
                .expect("answered and closed");
            let answered = String::from_utf8_lossy(&answered);
            assert!(
                answered.starts_with(&format!("HTTP/1.1 {status}")),
                "{header_bytes} bytes: {answered}"
            );
        }
    }

    #[tokio::test]
    async fn a_keep_alive_connection_is_closed_at_its_max_age_after_the_request_in_progress() {
        let max_age = Duration::from_millis(300);
        let addr = http_server(max_age).await;

        // Idle between requests at its max age: closed then (the idle timeout is 60 s).
        let connected = Instant::now();
        let answered = get_until_closed(addr, "/").await;
        assert!(answered.ends_with("\r\n\r\nok"), "{answered}");
        assert!(connected.elapsed() >= max_age, "{:?}", connected.elapsed());

        // Busy at its max age: the request in progress is answered whole, then it closes.
        let answered = get_until_closed(addr, "/slow").await;
        assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
        assert!(answered.ends_with("slow but whole"), "{answered}");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_header_read_deadline() {
        let addr = echo_server(timeouts(200, 60_000)).await;
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert!(read_to_close(&mut tcp).await.is_empty());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_connection_short_of_a_request_is_closed_at_the_header_read_deadline() {
        // Echoed bytes count as an answer, so this server would establish on the first byte;
        // a bare listener shows the byte count alone.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut incoming = plaintext(listener, timeouts(200, 60_000)).unwrap();
        let addr = incoming.local_addr();
        let server = tokio::spawn(async move {
            let mut io = futures::StreamExt::next(&mut incoming)
                .await
                .unwrap()
                .unwrap();
            let mut buf = [0u8; 64];
            let mut got = 0;
            loop {
                match io.read(&mut buf).await {
                    Ok(0) => return Ok(got),
                    Ok(n) => got += n,
                    Err(error) => return Err((got, error.kind())),
                }
            }
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert_eq!(server.await.unwrap(), Err((16, io::ErrorKind::TimedOut)));
    }

    #[tokio::test]
    async fn an_established_connection_is_closed_at_its_idle_timeout_before_the_header_deadline() {
        // Found from outside: with --idle-timeout 2s under the default 10 s header-read timeout,
        // an unused gRPC Session stayed open 10 s: the first deadline armed (the header read's)
        // had to pass before the idle one was looked at.
        let addr = echo_server(timeouts(5_000, 300)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[7; ESTABLISHED_BYTES]).await.unwrap();
        let mut back = [0u8; ESTABLISHED_BYTES];
        tcp.read_exact(&mut back).await.unwrap();
        let silent = Instant::now();
        assert!(read_to_close(&mut tcp).await.is_empty());
        let took = silent.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(
            took < Duration::from_secs(3),
            "closed after {took:?}, not at the idle timeout"
        );
    }

    #[tokio::test]
    async fn traffic_keeps_a_connection_open_past_the_idle_timeout_and_silence_closes_it() {
        let addr = echo_server(timeouts(5_000, 300)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // Ten round trips 100 ms apart: 1 s of traffic, over three idle timeouts.
        let mut ticks = tokio::time::interval(Duration::from_millis(100));
        for i in 0..10u8 {
            ticks.tick().await;
            tcp.write_all(&[i; 30]).await.unwrap();
            let mut back = [0u8; 30];
            tcp.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [i; 30]);
        }
        let silent = Instant::now();
        assert!(read_to_close(&mut tcp).await.is_empty());
        let took = silent.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_stalled_handshake_counts_against_the_header_read_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A handshake that never completes (a client that never sends its ClientHello).
        let incoming = with_handshake(listener, timeouts(200, 60_000), |tcp| async move {
            std::future::pending::<()>().await;
            Ok(tcp)
        })
        .unwrap();
        let started = Instant::now();
        let mut tcp = TcpStream::connect(incoming.local_addr()).await.unwrap();
        assert!(read_to_close(&mut tcp).await.is_empty());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    /// A burst of new connections (a load balancer's pool, 64+ clients starting at once) must
    /// not lose SYNs to a full accept queue: a lost SYN costs its client Linux's initial SYN
    /// timeout (1 s, then 3 s), which is what a collapse at 64 streaming connections looks
    /// like. With `TcpListener::bind`'s backlog of 128 this failed (a first round trip of
    /// 1.006 s); listeners from [`bind`] drained by [`plaintext`] answer every one on the first
    /// SYN.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_connections_is_answered_without_a_syn_retransmit() {
        let addr = echo_server(timeouts(5_000, 60_000)).await;
        let clients: Vec<_> = (0..256u16)
            .map(|i| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut tcp = TcpStream::connect(addr).await.unwrap();
                    let byte = [(i % 251) as u8];
                    tcp.write_all(&byte).await.unwrap();
                    let mut back = [0u8; 1];
                    tcp.read_exact(&mut back).await.unwrap();
                    assert_eq!(back, byte);
                    (started.elapsed(), tcp)
                })
            })
            .collect();
        let mut open = Vec::new();
        for client in clients {
            let (took, tcp) = client.await.unwrap();
            assert!(
                took < Duration::from_millis(900),
                "a connection's first round trip took {took:?}: a SYN was lost"
            );
            // Held until every client is through, so the burst really is 256 at once.
            open.push(tcp);
        }
    }

    #[test]
    fn zero_timeouts_are_refused() {
        assert!(timeouts(0, 1).validate().is_err());
        assert!(timeouts(1, 0).validate().is_err());
        assert!(ConnectionTimeouts::default().validate().is_ok());
    }
}
