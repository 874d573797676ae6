//! A link's task, the actor that owns the worker's stream: it dials the worker (again, after
//! an exponential backoff with full jitter, when a stream fails), sends the commands it is
//! given, demultiplexes the worker's frames to the requests waiting for them, applies load
//! reports and KV events, and says when the stream ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use switchyard_cluster::identity::{self, IdentityMismatch};
use switchyard_cluster::in_process;
use switchyard_cluster::telemetry::chain_text;
use switchyard_proto::hosted::Frames;
use switchyard_proto::v1::{self, router_frame, worker_client::WorkerClient, worker_frame};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::policy::view::turnover_ewma;
use crate::tokenizers::{self, FetchError, Tokenizers};

use super::link::{Command, EventSender, LinkEvent, Shared};
use super::state::{InTransit, Starts};
use super::{Links, SharedPrefixIndex};

/// Names each worker stream, so the prefix index ignores a closed stream's late frames and
/// forgets a worker only on behalf of the stream that published its blocks.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// A request on the link's current stream: where its frames go, and since when it holds a
/// slot on the worker (for [`turnover_ewma`]).
pub(super) struct Routed {
    pub(super) events: EventSender,
    pub(super) sent: Instant,
}

/// Frames waiting for tonic to take them onto the worker's stream. When they are all waiting,
/// the link takes no more commands until one goes, but it keeps reading the worker's frames:
/// a worker blocked writing to us must never wait for us to finish writing to it.
pub(super) const OUTBOUND_CAPACITY: usize = 256;

/// Redials of a worker that is still registered: 100 ms doubling to 10 s, full jitter; a
/// stream that stayed up 10 s starts the schedule over.
pub(super) const RECONNECT: Backoff = Backoff {
    min: Duration::from_millis(100),
    max: Duration::from_secs(10),
    healthy_after: Duration::from_secs(10),
};

/// Pause after a certificate that does not name the record's worker: a forged record stays
/// forged, but a genuine worker's certificate may be reissued, so it is tried again, slowly.
const IDENTITY_BACKOFF: Duration = Duration::from_secs(5);

/// A reconnection schedule: exponential with full jitter (each delay uniform between zero and
/// a ceiling that doubles per consecutive failure up to `max`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Backoff {
    min: Duration,
    pub(super) max: Duration,
    /// A stream up at least this long was healthy: the failure after it is counted as the first.
    healthy_after: Duration,
}

impl Backoff {
    /// The ceiling of the delay after `failures` consecutive failures before this one.
    pub(super) fn ceiling(&self, failures: u32) -> Duration {
        // 2^20 × any sane minimum is far beyond any sane maximum.
        let factor = 1u32 << failures.min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before dialling again, and the consecutive failures counted after it. The
    /// ended stream was up for `up_for` (`None`: it was never established); `unit` is uniform
    /// in [0, 1).
    pub(super) fn after_failure(
        &self,
        failures: u32,
        up_for: Option<Duration>,
        unit: f64,
    ) -> (Duration, u32) {
        let failures = if up_for.is_some_and(|up| up >= self.healthy_after) {
            0
        } else {
            failures
        };
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            1.0
        };
        (
            self.ceiling(failures).mul_f64(unit),
            failures.saturating_add(1),
        )
    }
}

/// Why a stream to a worker ended or never started.
#[derive(Debug)]
enum LinkError {
    /// The certificate served at the record's address chains to the cluster CA but names
    /// another worker, or none: nothing was sent.
    Refused(IdentityMismatch),
    Failed(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Refused(mismatch) => mismatch.fmt(f),
            LinkError::Failed(why) => f.write_str(why),
        }
    }
}

/// The text of a link that failed to come up: every cause, and where a plaintext link was
/// answered in TLS (an HTTP/2 client reads a TLS record as a frame of an invalid size), what to
/// check.
fn link_error(error: &(dyn std::error::Error + 'static), plaintext: bool) -> String {
    let text = chain_text(error);
    let tls_answer = {
        let lower = text.to_ascii_lowercase();
        lower.contains("frame_size_error") || lower.contains("frame with invalid size")
    };
    if plaintext && tls_answer {
        format!(
            "{text} (is the worker serving TLS? set --tls-ca-file to the CA that signed its \
             certificate)"
        )
    } else {
        text
    }
}

/// The frames for the worker on the current stream: tonic takes them from `frames`.
pub(super) struct Outbound {
    pub(super) frames: mpsc::Sender<v1::RouterFrame>,
    /// A frame that found `frames` full; no command is taken until it goes.
    pub(super) waiting: Option<v1::RouterFrame>,
}

impl Outbound {
    pub(super) fn push(&mut self, frame: router_frame::Frame) {
        let frame = v1::RouterFrame { frame: Some(frame) };
        debug_assert!(
            self.waiting.is_none(),
            "a command taken while a frame waits"
        );
        match self.frames.try_send(frame) {
            Ok(()) => {}
            Err(TrySendError::Full(frame)) => self.waiting = Some(frame),
            // tonic dropped the request stream: the call is ending, and its end is read from
            // the worker's side, which loses every request on it, this one included.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// How a stream ended.
enum StreamEnd {
    /// The link was closed (or every handle dropped): the task ends.
    Closed,
    /// The stream was up for `up_for` and ended, cleanly (`Ok`) or not.
    Ended {
        up_for: Duration,
        result: Result<(), String>,
    },
    /// It never came up.
    NotEstablished(LinkError),
}

/// The task serving one link: the only owner of its stream and of the stream's state.
pub(super) struct LinkTask {
    pub(super) shared: Arc<Shared>,
    pub(super) commands: mpsc::Receiver<Command>,
    /// The link set: its TLS and credential, and to leave it when an unlisted link's stream
    /// fails.
    pub(super) links: Weak<Links>,
    pub(super) prefix: SharedPrefixIndex,
    /// Shared by every link: the models' tokenizers, fetched from the workers.
    pub(super) tokenizers: Arc<Tokenizers>,
    pub(super) connect_timeout: Duration,
    /// A sample uniform in [0, 1) for the reconnection jitter.
    pub(super) jitter: fn() -> f64,
    /// The dispatcher of each request on the current stream.
    pub(super) requests: HashMap<String, Routed>,
    pub(super) in_transit: InTransit,
    /// The current stream (see [`NEXT_STREAM`]); 0 while none is open.
    pub(super) stream: u64,
    /// A frame in an unknown hash scheme was logged (once per link).
    pub(super) warned_scheme: bool,
    /// Models this worker has no tokenizer for (its engine works on text): not asked again.
    pub(super) no_tokenizer: HashSet<String>,
}

impl LinkTask {
    /// Keeps a stream open to the worker until the link is closed, or until the stream of a
    /// worker no longer in the membership fails.
    pub(super) async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let address = self.shared.record.borrow().address.clone();
            let end = self.serve_once(&address).await;
            let (up_for, refused) = match end {
                StreamEnd::Closed => break,
                StreamEnd::Ended { up_for, result } => {
                    match result {
                        Ok(()) => info!(worker = %self.shared.id, "worker stream ended"),
                        Err(error) => {
                            warn!(worker = %self.shared.id, %address, %error, "worker link failed")
                        }
                    }
                    (Some(up_for), false)
                }
                StreamEnd::NotEstablished(LinkError::Refused(mismatch)) => {
                    let record = self.shared.record.borrow().clone();
                    warn!(
                        worker = %record.id,
                        pool = %record.pool,
                        key = %record.key(),
                        %address,
                        expected = %mismatch.expected,
                        presented = ?mismatch.presented,
                        "worker record refused: the certificate served at its address does not name it; no traffic goes there"
                    );
                    if let Some(links) = self.links.upgrade() {
                        links.identity_rejected(&record);
                    }
                    (None, true)
                }
                StreamEnd::NotEstablished(LinkError::Failed(error)) => {
                    // The first failed dial is news; the redials after it (a worker that is
                    // down until its record expires) are not.
                    if failures == 0 {
                        warn!(worker = %self.shared.id, %address, %error, "worker link failed");
                    } else {
                        debug!(worker = %self.shared.id, %address, %error, failures, "worker link still failing");
                    }
                    (None, false)
                }
            };
            let listed = self.lose_all("connection to the worker was lost");
            if !listed {
                match self.links.upgrade() {
                    // Its record came back meanwhile: dial again like any listed worker.
                    Some(links) if !links.drop_unlisted(&self.shared) => {}
                    _ => break,
                }
            }
            let (mut delay, counted) = RECONNECT.after_failure(failures, up_for, (self.jitter)());
            failures = counted;
            if refused {
                delay = IDENTITY_BACKOFF;
            }
            self.shared.state.update(|s| s.failures = failures);
            debug!(worker = %self.shared.id, ?delay, failures, "dialling the worker again after a pause");
            let closed = self.shared.closed.clone();
            tokio::select! {
                _ = closed.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
                () = refuse_while_down(&mut self.commands, &self.shared) => break,
            }
        }
        self.lose_all("the link to the worker was closed");
        // Starts still waiting learn that they went nowhere.
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            self.on_command(command, None);
        }
    }

    /// Dials the worker and serves one stream until it ends.
    async fn serve_once(&mut self, address: &str) -> StreamEnd {
        let closed = self.shared.closed.clone();
        let establish = tokio::time::timeout(
            self.connect_timeout,
            establish(&self.links, &self.shared, address, self.connect_timeout),
        );
        let (channel, mut inbound, frames) = tokio::select! {
            established = establish => match established {
                Ok(Ok(established)) => established,
                Ok(Err(error)) => return StreamEnd::NotEstablished(error),
                Err(_) => {
                    return StreamEnd::NotEstablished(LinkError::Failed(format!(
                        "no answer within {:?}",
                        self.connect_timeout
                    )));
                }
            },
            _ = closed.cancelled() => return StreamEnd::Closed,
            () = refuse_while_down(&mut self.commands, &self.shared) => return StreamEnd::Closed,
        };
        self.stream = NEXT_STREAM.fetch_add(1, Ordering::Relaxed);
        let up_since = Instant::now();
        self.shared.state.update(|s| s.connected = true);
        self.shared.changes.worker(&self.shared.id);
        info!(worker = %self.shared.id, %address, "worker link up");
        let mut fetch = Some(self.fetch_tokenizers(channel));
        let mut outbound = Outbound {
            frames,
            waiting: None,
        };
        let result = loop {
            tokio::select! {
                message = inbound.next() => match message.transpose() {
                    Ok(Some(v1::WorkerFrame { frame: Some(frame) })) => self.on_frame(frame),
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(chain_text(&status)),
                },
                // Owned: the permit must not borrow what the command branch writes to.
                permit = outbound.frames.clone().reserve_owned(), if outbound.waiting.is_some() => match permit {
                    Ok(permit) => {
                        permit.send(outbound.waiting.take().expect("a frame waits"));
                    }
                    // The request stream is gone: the worker's side tells how the call ended.
                    Err(_) => outbound.waiting = None,
                },
                command = self.commands.recv(), if outbound.waiting.is_none() => match command {
                    Some(command) => self.on_command(command, Some(&mut outbound)),
                    None => return StreamEnd::Closed,
                },
                fetched = async { fetch.as_mut().expect("a fetch runs").await }, if fetch.is_some() => {
                    fetch = None;
                    if let Ok(no_tokenizer) = fetched {
                        self.no_tokenizer.extend(no_tokenizer);
                    }
                }
                _ = closed.cancelled() => return StreamEnd::Closed,
            }
        };
        StreamEnd::Ended {
            up_for: up_since.elapsed(),
            result,
        }
    }

    pub(super) fn on_command(&mut self, command: Command, outbound: Option<&mut Outbound>) {
        match command {
            Command::Start {
                start,
                events,
                charge,
            } => {
                let Some(outbound) = outbound else {
                    self.shared.state.update(|s| s.queued.remove(charge));
                    let _ = events.send(Box::new(LinkEvent::Lost(format!(
                        "worker {} is not connected",
                        self.shared.id
                    ))));
                    return;
                };
                self.in_transit.sent(charge);
                let in_transit = self.in_transit.total();
                // From handed over to sent in one step: placement never sees it twice or not
                // at all.
                self.shared.state.update(|s| {
                    s.queued.remove(charge);
                    s.in_transit = in_transit;
                });
                self.requests.insert(
                    start.request_id.clone(),
                    Routed {
                        events,
                        sent: Instant::now(),
                    },
                );
                outbound.push(router_frame::Frame::Start(*start));
            }
            Command::Cancel { request_id, reason } => {
                if let Some(outbound) = outbound {
                    outbound.push(router_frame::Frame::Cancel(v1::WorkerCancel {
                        request_id,
                        reason: reason as i32,
                    }));
                }
            }
            Command::Credit { request_id, tokens } => {
                if let Some(outbound) = outbound {
                    outbound.push(router_frame::Frame::Credit(v1::WorkerCredit {
                        request_id,
                        tokens,
                    }));
                }
            }
            Command::Forget(request_id) => {
                self.requests.remove(&request_id);
            }
        }
    }

    pub(super) fn on_frame(&mut self, frame: worker_frame::Frame) {
        let (request_id, last, finished) = match &frame {
            worker_frame::Frame::Load(load) => {
                self.in_transit.reported(load.starts_seen);
                let in_transit = self.in_transit.total();
                let load = *load;
                self.shared.state.update(|s| {
                    s.load = Some(load);
                    s.in_transit = in_transit;
                    s.finished_since_report = 0;
                });
                self.shared.changes.worker(&self.shared.id);
                return;
            }
            worker_frame::Frame::KvEvents(events) => {
                self.apply_kv_events(events);
                return;
            }
            worker_frame::Frame::Tokens(t) => (t.request_id.clone(), false, false),
            worker_frame::Frame::Finished(f) => (f.request_id.clone(), true, true),
            worker_frame::Frame::Failed(f) => (f.request_id.clone(), true, false),
        };
        let delivered = match self.requests.get(&request_id) {
            Some(routed) => routed
                .events
                .send(Box::new(LinkEvent::Frame(frame)))
                .is_ok(),
            None => {
                debug!(%request_id, "frame for a request nobody waits for");
                false
            }
        };
        if last || !delivered {
            let routed = self.requests.remove(&request_id);
            if let Some(routed) = routed.filter(|_| last) {
                let held_ms = routed.sent.elapsed().as_secs_f64() * 1e3;
                // Only a finish is sure to have held a slot: a start the worker refused ends
                // `Failed`, and a report may have seen it without counting it as running.
                self.shared.state.update(|s| {
                    s.slot_turnover_ms = turnover_ewma(s.slot_turnover_ms, held_ms);
                    if finished {
                        s.finished_since_report = s.finished_since_report.saturating_add(1);
                    }
                });
            }
        }
        if last {
            self.shared.changes.worker(&self.shared.id);
        }
    }

    /// Updates the prefix index from the worker's `KvEvents` frame.
    fn apply_kv_events(&mut self, events: &v1::KvEvents) {
        let id = &self.shared.id;
        let applied =
            self.prefix
                .write()
                .expect("prefix index lock")
                .apply(id, self.stream, events);
        match applied {
            Ok(()) => {
                debug!(worker = %id, stored = events.stored.len(), removed = events.removed.len(), snapshot = events.snapshot, "KV events applied");
                if events.snapshot {
                    self.shared
                        .state
                        .update(|s| !std::mem::replace(&mut s.publishes_kv, true));
                    info!(worker = %id, blocks = events.stored.len(), block_tokens = events.block_tokens, "KV snapshot received: placing by this worker's cached prefixes");
                }
            }
            Err(error) => {
                if !std::mem::replace(&mut self.warned_scheme, true) {
                    warn!(worker = %id, %error, "KvEvents ignored: the worker's cache will not guide placement");
                }
            }
        }
    }

    /// The stream ended (or never came up): every request on it learns so and is forgotten.
    /// Returns whether the worker's record is still listed, read in the same step that marks
    /// the link down (see [`Links::sync`]).
    fn lose_all(&mut self, why: &str) -> bool {
        let stream = std::mem::take(&mut self.stream);
        if stream != 0 {
            self.prefix
                .write()
                .expect("prefix index lock")
                .remove_worker(&self.shared.id, stream);
        }
        // A new stream counts from zero; slots held by placements stay held.
        self.in_transit = InTransit::default();
        for (_, routed) in self.requests.drain() {
            let _ = routed
                .events
                .send(Box::new(LinkEvent::Lost(why.to_string())));
        }
        let mut was_connected = false;
        let mut listed = true;
        self.shared.state.update(|s| {
            was_connected = s.connected;
            listed = s.listed;
            s.connected = false;
            s.publishes_kv = false;
            s.load = None;
            s.in_transit = Starts::default();
            s.finished_since_report = 0;
            was_connected
        });
        if was_connected {
            self.shared.changes.worker(&self.shared.id);
        }
        listed
    }

    /// Fetches, beside the stream, the tokenizer of each of the worker's models the router
    /// has none for yet; yields the models the worker has none for. Requests go out as text
    /// until a tokenizer is here. Decoding a large vocabulary takes a while: it must not hold
    /// up the worker's frames, so it runs on a task of its own.
    fn fetch_tokenizers(&self, channel: Channel) -> JoinHandle<Vec<String>> {
        let worker = self.shared.id.clone();
        let models: Vec<String> = self
            .shared
            .record
            .borrow()
            .models
            .iter()
            .filter(|m| !self.no_tokenizer.contains(*m))
            .cloned()
            .collect();
        let tokenizers = self.tokenizers.clone();
        let credential = self
            .links
            .upgrade()
            .and_then(|links| links.credential.get().cloned());
        let closed = self.shared.closed.clone();
        tokio::spawn(async move {
            let mut no_tokenizer = Vec::new();
            for model in models {
                let fetched = tokio::select! {
                    fetched = async {
                        let claim = tokenizers.claim(&model).await?;
                        let fetched = tokenizers::fetch(channel.clone(), &model, credential.as_ref());
                        Some((fetched.await, claim))
                    } => fetched,
                    _ = closed.cancelled() => break,
                };
                match fetched {
                    None => {}
                    Some((Ok(fetched), claim)) => {
                        info!(%worker, %model, vocab = fetched.tokenizer.vocab_size(), context_length = fetched.context_length, "tokenizer fetched; the router tokenizes this model's requests");
                        claim.fulfil(fetched);
                    }
                    Some((Err(FetchError::NotFound(why)), _)) => {
                        debug!(%worker, %model, %why, "worker has no tokenizer for the model");
                        no_tokenizer.push(model);
                    }
                    Some((Err(FetchError::Failed(why)), _)) => {
                        warn!(%worker, %model, %why, "fetching the tokenizer failed; requests go as text until a link to a worker serving the model comes up");
                    }
                }
            }
            no_tokenizer
        })
    }
}

/// While no stream is up, answers commands as they come: starts are told at once that the
/// worker is not connected, the rest have nothing to act on. Returns when every handle of the
/// link is gone.
async fn refuse_while_down(commands: &mut mpsc::Receiver<Command>, shared: &Shared) {
    while let Some(command) = commands.recv().await {
        if let Command::Start { events, charge, .. } = command {
            shared.state.update(|s| s.queued.remove(charge));
            let _ = events.send(Box::new(LinkEvent::Lost(format!(
                "worker {} is not connected",
                shared.id
            ))));
        }
    }
}

/// Dials `address` and opens the `Serve` stream: the channel (for tokenizer fetches), the
/// worker's frames, and the sender whose receiver is the request stream.
async fn establish(
    links: &Weak<Links>,
    shared: &Shared,
    address: &str,
    connect_timeout: Duration,
) -> Result<
    (
        Channel,
        Frames<v1::WorkerFrame>,
        mpsc::Sender<v1::RouterFrame>,
    ),
    LinkError,
> {
    let links = links.upgrade();
    let tls = links.as_ref().and_then(|links| links.tls.get().cloned());
    let credential = links
        .as_ref()
        .and_then(|links| links.credential.get().cloned());
    let hosted = links.as_ref().and_then(|links| {
        let record = shared.record.borrow();
        links.hosted_worker(&record.id)
    });
    drop(links);
    let plaintext = tls.is_none() && hosted.is_none();
    // With TLS, only a certificate naming the record's worker completes the handshake.
    let (endpoint, identity) = match &tls {
        _ if hosted.is_some() => (in_process::endpoint(), None),
        Some(tls) => {
            let expected = {
                let record = shared.record.borrow();
                identity::worker_uri(record.pool, &record.id)
            };
            let (endpoint, check) = identity::endpoint(address, tls, expected)
                .map_err(|e| LinkError::Failed(chain_text(&*e)))?;
            (endpoint, Some(check))
        }
        None => (
            switchyard_cluster::tls::endpoint(address, None)
                .map_err(|e| LinkError::Failed(chain_text(&*e)))?,
            None,
        ),
    };
    let endpoint = endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    let connected = match &hosted {
        Some(hosted) => {
            info!(worker = %shared.id, "linking the hosted worker in process");
            hosted.pipe.channel(endpoint).await
        }
        None => endpoint.connect().await,
    };
    let channel = connected.map_err(|e| {
        match identity.as_ref().and_then(|check| check.take_rejection()) {
            Some(mismatch) => LinkError::Refused(mismatch),
            None => LinkError::Failed(link_error(&e, plaintext)),
        }
    })?;
    let (frames, outbound) = mpsc::channel(OUTBOUND_CAPACITY);
    if let Some(hosted) = hosted {
        let inbound = hosted
            .streams
            .serve(Box::pin(ReceiverStream::new(outbound).map(Ok)))
            .await
            .map_err(|status| LinkError::Failed(chain_text(&status)))?;
        return Ok((channel, inbound, frames));
    }
    let mut call = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(token) = credential {
        token.apply(&mut call);
    }
    let inbound = WorkerClient::new(channel.clone())
        .serve(call)
        .await
        .map_err(|status| LinkError::Failed(link_error(&status, plaintext)))?;
    Ok((channel, Box::pin(inbound.into_inner()), frames))
}
