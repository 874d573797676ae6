//! The channel under every etcd client of this crate: one connection per etcd member (each
//! endpoint given) and failover between them.
//!
//! etcd-client's own balanced channel (tower's power of two choices over tonic endpoints that
//! connect lazily) keeps sending a share of the requests to a member that is down: tonic reports
//! an endpoint it cannot connect to as ready and fails the request given to it (etcd-client
//! issue #39), so with one member of three stopped about one call in three failed with `tcp
//! connect error`, and every stream (watch, lease keep-alive) opened over it broke. Here:
//!
//! - Requests go round-robin to the members that are up; a member suspected or found down is
//!   used only when no member is up.
//! - A request a member failed before reading any of it (connection refused, say) goes to the
//!   next member, whatever it asks. One the member may have read goes again only when repeating
//!   it is harmless — reads, lease grants, revocations and TTL queries, health checks: the calls
//!   etcd's own Go client repeats — as does a repeatable request answered `UNAVAILABLE` (etcd
//!   lost or changed its leader): up to [`ROUNDS`] rounds over the members, with pauses between
//!   rounds while the cluster elects a leader, none started after [`REPEATABLE_BUDGET`]. Writes
//!   (put, delete, txn) the member may have read fail as before: applying one twice is not
//!   harmless in general (the registry repeats its own writes that are: `etcd.rs`).
//! - Each member's health: a request or stream failing in transport makes it *suspect*; a member
//!   that has answered nothing for [`PROBE_IDLE`] is probed (gRPC health check, answered within
//!   [`PROBE_TIMEOUT`]), a suspect one at once and a down one every [`DOWN_PROBE_EVERY`]. A
//!   failed probe makes an up member suspect and a suspect one *down*; any answer makes it up
//!   again. Repeatable requests waiting on a member when it turns suspect, or unanswered for
//!   [`REPEATABLE_ANSWER`], go to another member too;
//!   streams open on a member when it turns down end with `UNAVAILABLE`, so their owners (the
//!   registry's watches and lease keepers) reopen them on another member at once instead of
//!   when HTTP/2 keepalive gives up (15 s) — a frozen member (SIGSTOP, a stalled VM, a black
//!   hole) accepts connections and answers nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tonic::transport::channel::Change;
use tonic::transport::{Channel as TonicChannel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use crate::telemetry::ErrorChain;

/// A member that has answered nothing for this long is probed.
const PROBE_IDLE: Duration = Duration::from_secs(2);
/// A probe unanswered this long has failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A member found down is probed this often until it answers.
const DOWN_PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often the prober looks at the members.
const PROBE_TICK: Duration = Duration::from_millis(250);
/// Rounds over the members a repeatable request may take, and the pause before each round
/// after the first (etcd elects a new leader within about a second of losing one).
const ROUNDS: usize = 4;
/// A repeatable request unanswered this long is sent to the next member too: a member cut off
/// from a dead etcd leader holds requests it forwarded to it until etcd's own request timeout
/// (7 s), longer than the client's (5 s).
const REPEATABLE_ANSWER: Duration = Duration::from_secs(2);
/// No new attempt at a repeatable request starts this long after the first: with etcd unable to
/// answer (no quorum), a call fails within about the client's request timeout, not rounds later.
const REPEATABLE_BUDGET: Duration = Duration::from_secs(5);
const ROUND_PAUSES: [Duration; ROUNDS - 1] = [
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
];

type Request = http::Request<Body>;
type Response = http::Response<Body>;
type BoxError = tower::BoxError;

/// Calls whose repetition is harmless (etcd clientv3's "repeatable" policy): sent again after
/// a member failed them or answered `UNAVAILABLE`, even if it may have read them.
fn repeatable(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.KV/Range"
            | "/etcdserverpb.Lease/LeaseGrant"
            | "/etcdserverpb.Lease/LeaseRevoke"
            | "/etcdserverpb.Lease/LeaseTimeToLive"
            | "/etcdserverpb.Lease/LeaseLeases"
            | "/etcdserverpb.Cluster/MemberList"
            | "/etcdserverpb.Maintenance/Status"
            | "/etcdserverpb.Maintenance/Hash"
            | "/etcdserverpb.Maintenance/HashKV"
            | "/etcdserverpb.Auth/Authenticate"
            | "/grpc.health.v1.Health/Check"
    )
}

/// An endpoint as an operator wrote it: `scheme://host:port`.
fn endpoint_name(uri: &Uri) -> String {
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) => format!("{scheme}://{authority}"),
        _ => uri.to_string(),
    }
}

/// Label of the endpoint health gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EndpointLabels {
    endpoint: String,
}

/// A member's health, ordered by preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Health {
    Up = 0,
    /// Failed once (a request, a stream or a probe): used only when no member is up.
    Suspect = 1,
    /// Failed a probe while suspect.
    Down = 2,
}

impl Health {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Up,
            1 => Self::Suspect,
            _ => Self::Down,
        }
    }
}

/// Cancelled on a member's way down.
struct Tokens {
    /// When it leaves `Up`: repeatable requests waiting on it go elsewhere.
    suspect: CancellationToken,
    /// When it turns `Down`: its streams end.
    down: CancellationToken,
}

struct Member {
    uri: Uri,
    /// `scheme://host:port`, for logs and the gauge.
    name: String,
    channel: TonicChannel,
    health: AtomicU8,
    /// When it last answered anything, in ms since `born`.
    heard_ms: AtomicU64,
    /// When it was last probed, in ms since `born`.
    probed_ms: AtomicU64,
    probing: AtomicBool,
    born: Instant,
    tokens: Mutex<Tokens>,
    /// 1 while up, 0 otherwise.
    gauge: Gauge,
}

impl Member {
    fn new(uri: Uri, channel: TonicChannel, gauge: Gauge) -> Self {
        gauge.set(1);
        Self {
            name: endpoint_name(&uri),
            uri,
            channel,
            health: AtomicU8::new(Health::Up as u8),
            heard_ms: AtomicU64::new(0),
            probed_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            born: Instant::now(),
            tokens: Mutex::new(Tokens {
                suspect: CancellationToken::new(),
                down: CancellationToken::new(),
            }),
            gauge,
        }
    }

    fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn tokens(&self) -> (CancellationToken, CancellationToken) {
        let tokens = self.tokens.lock().expect("member tokens lock");
        (tokens.suspect.clone(), tokens.down.clone())
    }

    /// It answered (a request, a stream's message, a probe): it is up.
    fn answered(&self) {
        self.heard_ms.store(self.now_ms(), Ordering::Relaxed);
        if self.health() != Health::Up {
            self.become_(|_| Health::Up, None);
        }
    }

    /// A request or stream failed in transport: suspect unless already worse.
    fn failed(&self, error: &(dyn std::error::Error + 'static)) {
        if self.health() == Health::Up {
            self.become_(
                |h| h.max(Health::Suspect),
                Some(&ErrorChain(error).to_string()),
            );
        }
    }

    /// A probe failed: up turns suspect, suspect turns down.
    fn probe_failed(&self, why: &str) {
        self.become_(
            |h| match h {
                Health::Up => Health::Suspect,
                _ => Health::Down,
            },
            Some(why),
        );
    }

    fn become_(&self, next: impl FnOnce(Health) -> Health, why: Option<&str>) {
        let mut tokens = self.tokens.lock().expect("member tokens lock");
        let from = self.health();
        let to = next(from);
        if from == to {
            return;
        }
        self.health.store(to as u8, Ordering::Relaxed);
        self.gauge.set(i64::from(to == Health::Up));
        if from == Health::Up {
            std::mem::replace(&mut tokens.suspect, CancellationToken::new()).cancel();
        }
        if to == Health::Down {
            std::mem::replace(&mut tokens.down, CancellationToken::new()).cancel();
        }
        drop(tokens);
        let why = why.unwrap_or_default();
        match to {
            Health::Up => info!(endpoint = %self.name, "etcd endpoint answers again"),
            Health::Suspect => warn!(
                endpoint = %self.name,
                error = why,
                "etcd endpoint failed; sending requests to the other endpoints while it is checked"
            ),
            Health::Down => warn!(
                endpoint = %self.name,
                error = why,
                "etcd endpoint is down; its watches and lease keep-alives move to the other endpoints"
            ),
        }
    }

    /// Whether the prober should check it now.
    fn probe_due(&self) -> bool {
        if self.probing.load(Ordering::Relaxed) {
            return false;
        }
        let now = self.now_ms();
        let since =
            |at: &AtomicU64| Duration::from_millis(now.saturating_sub(at.load(Ordering::Relaxed)));
        match self.health() {
            Health::Up => {
                since(&self.heard_ms) >= PROBE_IDLE && since(&self.probed_ms) >= PROBE_IDLE
            }
            Health::Suspect => true,
            Health::Down => since(&self.probed_ms) >= DOWN_PROBE_EVERY,
        }
    }

    /// One gRPC health check (etcd serves `grpc.health.v1.Health`, without authentication).
    async fn probe(self: Arc<Self>) {
        self.probed_ms.store(self.now_ms(), Ordering::Relaxed);
        let mut health = HealthClient::new(self.channel.clone());
        let check = health.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(PROBE_TIMEOUT, check).await {
            Ok(Ok(answer)) if answer.get_ref().status() == ServingStatus::Serving => {
                self.answered()
            }
            // An endpoint without the health service (a proxy, say) answers: it is there.
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => self.answered(),
            Ok(Ok(answer)) => self.probe_failed(&format!(
                "health check answered {:?}",
                answer.get_ref().status()
            )),
            Ok(Err(status)) => self.probe_failed(&ErrorChain(&status).to_string()),
            Err(_) => {
                self.probe_failed(&format!("health check unanswered after {PROBE_TIMEOUT:?}"))
            }
        }
        self.probing.store(false, Ordering::Relaxed);
    }
}

/// What every clone of the channel shares.
struct Shared {
    members: RwLock<Vec<Arc<Member>>>,
    /// Endpoints added and removed (etcd-client's `add_endpoint`, `remove_endpoint`, and the
    /// endpoints given at connection).
    changes: Mutex<mpsc::Receiver<Change<Uri, Endpoint>>>,
    next: AtomicUsize,
    gauges: Family<EndpointLabels, Gauge>,
}

impl Shared {
    fn apply_changes(&self) {
        let mut changes = self.changes.lock().expect("endpoint changes lock");
        while let Ok(change) = changes.try_recv() {
            let mut members = self.members.write().expect("members lock");
            match change {
                Change::Insert(uri, endpoint) => {
                    members.retain(|m| m.uri != uri);
                    let gauge = self
                        .gauges
                        .get_or_create(&EndpointLabels {
                            endpoint: endpoint_name(&uri),
                        })
                        .clone();
                    members.push(Arc::new(Member::new(uri, endpoint.connect_lazy(), gauge)));
                }
                Change::Remove(uri) => {
                    members.retain(|m| m.uri != uri);
                    self.gauges.remove(&EndpointLabels {
                        endpoint: endpoint_name(&uri),
                    });
                }
            }
        }
    }

    /// The members in the order to try them: those up first, in turn (round-robin), then the
    /// suspect ones, then those down.
    fn order(&self) -> Vec<Arc<Member>> {
        self.apply_changes();
        let members = self.members.read().expect("members lock");
        let n = members.len();
        if n == 0 {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<Arc<Member>> =
            (0..n).map(|i| members[(start + i) % n].clone()).collect();
        // Stable: the rotation stays within each health.
        order.sort_by_key(|m| m.health());
        order
    }

    async fn send(self: Arc<Self>, request: Request) -> Result<Response, BoxError> {
        let repeatable = repeatable(request.uri().path());
        let (parts, body) = request.into_parts();
        let body = if repeatable {
            // A unary request: its one message, to send as often as needed.
            Replay::Bytes(body.collect().await?.to_bytes())
        } else {
            Replay::Once(Arc::new(Mutex::new(Some(body))))
        };
        let rounds = if repeatable { ROUNDS } else { 1 };
        let budget = Instant::now() + REPEATABLE_BUDGET;
        let mut last: Option<Result<Response, BoxError>> = None;
        'rounds: for round in 0..rounds {
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSES[round - 1]).await;
            }
            // Another round only while etcd answers (it is electing a leader): with every
            // member unreachable the request fails at once.
            let mut answered = false;
            for member in self.order() {
                if last.is_some() && repeatable && Instant::now() >= budget {
                    break 'rounds;
                }
                let Some(attempt) = body.attempt() else {
                    // Read by a member that failed: not to be repeated.
                    return last.unwrap_or_else(|| Err(unavailable("etcd request lost")));
                };
                let (suspect, down) = member.tokens();
                let call = member
                    .channel
                    .clone()
                    .oneshot(http::Request::from_parts(parts.clone(), Body::new(attempt)));
                let mut call = std::pin::pin!(call);
                let slow = async {
                    if repeatable {
                        tokio::time::sleep(REPEATABLE_ANSWER).await
                    } else {
                        std::future::pending().await
                    }
                };
                let mut outcome = tokio::select! {
                    outcome = &mut call => Some(outcome),
                    _ = suspect.cancelled() => None,
                    () = slow => {
                        answered = true;
                        None
                    }
                };
                // The member turned suspect (or is slow to answer a repeatable request) while the
                // request waited on it: send it elsewhere when that is harmless (the member may
                // have read a write: wait for its answer).
                if outcome.is_none() && !repeatable && !body.unread() {
                    outcome = Some(call.await);
                }
                match outcome {
                    None => {
                        debug!(endpoint = %member.name, path = parts.uri.path(), "etcd endpoint slow to answer or turned suspect; sending the request to another");
                        last = Some(Err(Box::new(tonic::Status::unavailable(format!(
                            "etcd endpoint {} stopped answering",
                            member.name
                        )))));
                    }
                    Some(Ok(response)) => {
                        member.answered();
                        let unavailable = grpc_code(&response) == Some(tonic::Code::Unavailable);
                        let response = response.map(|inner| {
                            Body::new(Watched {
                                inner,
                                member: member.clone(),
                                down: Box::pin(down.cancelled_owned()),
                                ended: false,
                            })
                        });
                        if repeatable && unavailable {
                            debug!(endpoint = %member.name, path = parts.uri.path(), "etcd answered UNAVAILABLE; asking another endpoint");
                            answered = true;
                            last = Some(Ok(response));
                            continue;
                        }
                        return Ok(response);
                    }
                    Some(Err(error)) => {
                        member.failed(&error);
                        debug!(endpoint = %member.name, path = parts.uri.path(), error = %ErrorChain(&error), "etcd request failed; trying another endpoint");
                        last = Some(Err(error.into()));
                    }
                }
            }
            if !answered {
                break;
            }
        }
        last.unwrap_or_else(|| Err(unavailable("no etcd endpoint")))
    }
}

fn unavailable(message: &str) -> BoxError {
    Box::new(tonic::Status::unavailable(message))
}

/// The status of a response that is all trailers (how gRPC servers answer an error).
fn grpc_code(response: &Response) -> Option<tonic::Code> {
    let code = response.headers().get("grpc-status")?.to_str().ok()?;
    Some(tonic::Code::from_i32(code.parse().ok()?))
}

/// A request's body, as many times as it may be sent.
enum Replay {
    /// A repeatable call's whole message.
    Bytes(Bytes),
    /// Any other call's body, until an attempt reads it (then it is that attempt's only).
    Once(Arc<Mutex<Option<Body>>>),
}

impl Replay {
    /// The body of one more attempt; `None` when an earlier attempt has read it.
    fn attempt(&self) -> Option<Attempt> {
        match self {
            Self::Bytes(bytes) => Some(Attempt::Bytes(Some(bytes.clone()))),
            Self::Once(slot) => self.unread().then(|| Attempt::Once {
                slot: slot.clone(),
                taken: None,
            }),
        }
    }

    /// No attempt has read it.
    fn unread(&self) -> bool {
        match self {
            Self::Bytes(_) => true,
            Self::Once(slot) => slot.lock().expect("body slot lock").is_some(),
        }
    }
}

/// One attempt's body.
enum Attempt {
    Bytes(Option<Bytes>),
    /// Taken from the slot when first polled (the request is being sent).
    Once {
        slot: Arc<Mutex<Option<Body>>>,
        taken: Option<Body>,
    },
}

impl http_body::Body for Attempt {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match self.get_mut() {
            Self::Bytes(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Once { slot, taken } => {
                if taken.is_none() {
                    *taken = slot.lock().expect("body slot lock").take();
                }
                match taken {
                    Some(body) => Pin::new(body).poll_frame(cx),
                    None => Poll::Ready(None),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Bytes(bytes) => bytes.is_none(),
            Self::Once {
                taken: Some(body), ..
            } => body.is_end_stream(),
            Self::Once { slot, .. } => slot
                .lock()
                .expect("body slot lock")
                .as_ref()
                .is_none_or(|body| body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Bytes(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Bytes(None) => SizeHint::with_exact(0),
            Self::Once {
                taken: Some(body), ..
            } => body.size_hint(),
            Self::Once { slot, .. } => slot
                .lock()
                .expect("body slot lock")
                .as_ref()
                .map(|body| body.size_hint())
                .unwrap_or_default(),
        }
    }
}

/// A response body that counts what arrives as the member answering, a transport failure as
/// the member failing, and ends with `UNAVAILABLE` when the member is found down.
struct Watched {
    inner: Body,
    member: Arc<Member>,
    down: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.down.as_mut().poll(cx).is_ready() {
            this.ended = true;
            return Poll::Ready(Some(Err(tonic::Status::unavailable(format!(
                "etcd endpoint {} stopped answering",
                this.member.name
            )))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => this.member.answered(),
            Poll::Ready(Some(Err(status))) => this.member.failed(status),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The service etcd-client sends every request through.
#[derive(Clone)]
struct Failover {
    shared: Arc<Shared>,
}

impl tower::Service<Request> for Failover {
    type Response = Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        Box::pin(self.shared.clone().send(request))
    }
}

/// Checks the members now and then (see the module docs) for as long as a client uses them.
async fn watch_health(shared: Weak<Shared>) {
    let mut ticks = tokio::time::interval(PROBE_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.apply_changes();
        let members = shared.members.read().expect("members lock").clone();
        drop(shared);
        for member in members {
            if member.probe_due() {
                member.probing.store(true, Ordering::Relaxed);
                tokio::spawn(member.probe());
            }
        }
    }
}

/// Makes etcd-client's channel ([`etcd_client::Client::connect_with_balanced_channel`]): see
/// the module docs.
pub(crate) struct FailoverChannel {
    shared: Arc<Shared>,
    changes: mpsc::Sender<Change<Uri, Endpoint>>,
}

impl FailoverChannel {
    pub(crate) fn new() -> Self {
        // etcd-client sends the endpoints before its first request; the channel reads them
        // when it sends one (or the prober looks), so the buffer holds any realistic count.
        let (changes, receiver) = mpsc::channel(1024);
        Self {
            shared: Arc::new(Shared {
                members: RwLock::default(),
                changes: Mutex::new(receiver),
                next: AtomicUsize::new(0),
                gauges: Family::default(),
            }),
            changes,
        }
    }

    /// Whether each endpoint is up (1) or not (0), by endpoint.
    pub(crate) fn gauges(&self) -> Family<EndpointLabels, Gauge> {
        self.shared.gauges.clone()
    }
}

impl etcd_client::BalancedChannelBuilder for FailoverChannel {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        _buffer_size: usize,
    ) -> Result<(etcd_client::Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        tokio::spawn(watch_health(Arc::downgrade(&self.shared)));
        let service = tower::util::BoxCloneSyncService::new(Failover {
            shared: self.shared,
        });
        Ok((etcd_client::Channel::Custom(service), self.changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::BalancedChannelBuilder as _;
    use std::sync::atomic::AtomicUsize;

    /// A gRPC server on loopback answering health checks (and `UNIMPLEMENTED` to anything
    /// else), counting the writes (`KV/Put`) it gets.
    async fn healthy() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let count = tower::util::MapRequestLayer::new(move |request: http::Request<Body>| {
            if request.uri().path() == "/etcdserverpb.KV/Put" {
                counted.fetch_add(1, Ordering::Relaxed);
            }
            request
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .layer(count)
                .add_service(health)
                .serve_with_incoming(incoming(listener))
                .await;
        });
        (format!("http://{address}"), requests)
    }

    fn incoming(
        listener: tokio::net::TcpListener,
    ) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        futures::stream::unfold(listener, |listener| async move {
            Some((listener.accept().await.map(|(s, _)| s), listener))
        })
    }

    /// A port nothing listens on: connections are refused.
    fn refused() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        format!("http://{address}")
    }

    /// A listener that never accepts: the kernel completes connections, nothing answers (like
    /// a frozen etcd member).
    fn frozen() -> (String, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        (format!("http://{address}"), listener)
    }

    async fn channel(urls: &[&str]) -> (etcd_client::Channel, Arc<Shared>) {
        let failover = FailoverChannel::new();
        let shared = failover.shared.clone();
        let (channel, changes) = failover.balanced_channel(64).unwrap();
        for url in urls {
            let endpoint = Endpoint::from_shared(url.to_string())
                .unwrap()
                .timeout(Duration::from_secs(3))
                .connect_timeout(Duration::from_secs(1));
            changes
                .send(Change::Insert(endpoint.uri().clone(), endpoint))
                .await
                .unwrap();
        }
        (channel, shared)
    }

    fn health_of(shared: &Shared, url: &str) -> Health {
        shared.apply_changes();
        let members = shared.members.read().unwrap();
        let member = members
            .iter()
            .find(|m| m.name == url)
            .expect("a member for the url");
        member.health()
    }

    async fn check(channel: &etcd_client::Channel) -> Result<ServingStatus, tonic::Status> {
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await?;
        Ok(answer.get_ref().status())
    }

    /// A non-repeatable call (an etcd write's path) with an empty message: how it ended.
    async fn write(channel: &etcd_client::Channel) -> Result<tonic::Code, BoxError> {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://etcd/etcdserverpb.KV/Put")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Body::new(http_body_util::Full::new(Bytes::from_static(&[
                0, 0, 0, 0, 0,
            ]))))
            .unwrap();
        let response = channel.clone().oneshot(request).await?;
        Ok(grpc_code(&response).unwrap_or(tonic::Code::Ok))
    }

    #[tokio::test]
    async fn requests_go_past_an_endpoint_that_refuses_connections() {
        let (up, requests) = healthy().await;
        let down = refused();
        let (channel, shared) = channel(&[&down, &up]).await;
        for _ in 0..6 {
            assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        }
        assert_ne!(health_of(&shared, &down), Health::Up);
        // A write nobody read goes on to the next endpoint too (it answers UNIMPLEMENTED).
        for _ in 0..4 {
            assert_eq!(write(&channel).await.unwrap(), tonic::Code::Unimplemented);
        }
        assert_eq!(requests.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn a_frozen_endpoint_is_found_down_and_reads_move_on() {
        let (up, _) = healthy().await;
        let (stuck, _listener) = frozen();
        let (channel, shared) = channel(&[&stuck, &up]).await;
        // The first request goes to the frozen endpoint (round-robin starts there): a read is
        // sent again elsewhere when it is slow to answer.
        let started = Instant::now();
        assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
        assert!(started.elapsed() < REPEATABLE_ANSWER + Duration::from_secs(1));
        // The prober finds it out: suspect, then down.
        let deadline = Instant::now() + PROBE_IDLE + PROBE_TIMEOUT * 2 + DOWN_PROBE_EVERY * 2;
        while health_of(&shared, &stuck) != Health::Down {
            assert!(
                Instant::now() < deadline,
                "the frozen endpoint was not found down"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Then nothing waits on it.
        for _ in 0..4 {
            let started = Instant::now();
            assert_eq!(check(&channel).await.unwrap(), ServingStatus::Serving);
            assert_eq!(write(&channel).await.unwrap(), tonic::Code::Unimplemented);
            assert!(started.elapsed() < Duration::from_millis(500));
        }
    }

    #[tokio::test]
    async fn a_write_a_frozen_endpoint_may_have_read_is_not_sent_again() {
        let (up, requests) = healthy().await;
        let (stuck, _listener) = frozen();
        let (channel, _shared) = channel(&[&stuck, &up]).await;
        // Round-robin starts at the frozen endpoint.
        let ended = write(&channel).await;
        assert!(ended.is_err(), "{ended:?}");
        assert_eq!(
            requests.load(Ordering::Relaxed),
            0,
            "the write was sent again"
        );
    }

    #[tokio::test]
    async fn a_stream_on_an_endpoint_found_down_ends() {
        let (up, _) = healthy().await;
        let (channel, shared) = channel(&[&up]).await;
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            watch.message().await.unwrap().unwrap().status(),
            ServingStatus::Serving
        );
        let member = shared.members.read().unwrap()[0].clone();
        member.probe_failed("test");
        member.probe_failed("test");
        let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("the stream ended");
        let status = ended.expect_err("ended with an error");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    }

    #[test]
    fn reads_and_lease_calls_are_repeatable_writes_are_not() {
        for path in [
            "/etcdserverpb.KV/Range",
            "/etcdserverpb.Lease/LeaseGrant",
            "/etcdserverpb.Lease/LeaseRevoke",
        ] {
            assert!(repeatable(path), "{path}");
        }
        for path in [
            "/etcdserverpb.KV/Put",
            "/etcdserverpb.KV/Txn",
            "/etcdserverpb.KV/DeleteRange",
            "/etcdserverpb.Watch/Watch",
            "/etcdserverpb.Lease/LeaseKeepAlive",
        ] {
            assert!(!repeatable(path), "{path}");
        }
    }
}
