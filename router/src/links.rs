//! Persistent links to workers: one multiplexed `Worker.Serve` stream per worker, opened when
//! the worker appears in the membership view. Frames coming back are
//! demultiplexed by request id to each request's dispatcher; `Load` frames update the worker's
//! load as seen by the placement policy; `KvEvents` frames update the prefix index (what each
//! worker's KV cache holds), which a stream's end clears for that worker until its next
//! stream's snapshot.
//!
//! Membership is statically stable: the link, not etcd, says whether a worker is healthy. A
//! worker whose record leaves the view (its lease lapsed while etcd was frozen or partitioned,
//! or it deregistered) keeps its link — and its in-flight streams and its place in routing — as
//! long as the stream stays up; it leaves the router's view when that stream fails. A worker
//! whose record is gone and whose link is already down is dropped at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::identity::{self, IdentityMismatch};
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Membership, MembershipView, WorkerRecord};
use switchyard_proto::v1::{self, router_frame, worker_client::WorkerClient, worker_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::changes::ChangeFeed;
use crate::metrics::WorkerLabels;
use crate::policy::{ClusterView, WorkerState};
use crate::prefix_index::{PrefixHit, PrefixIndex, PrefixIndexConfig, PrefixIndexStats};

/// The prefix index shared by every link (written by their readers, read by placement).
pub type SharedPrefixIndex = Arc<RwLock<PrefixIndex>>;

/// Names each worker stream, so the prefix index ignores a closed stream's late frames and
/// forgets a worker only on behalf of the stream that published its blocks.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);
use crate::tokenizers::{self, FetchError, Tokenizers};

/// What a request's dispatcher hears from its worker.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(worker_frame::Frame),
    /// The stream to the worker broke; the generation's fate is unknown.
    Lost(String),
}

/// Pause between reconnection attempts to a worker that is still registered.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(200);

/// Pause after a certificate that does not name the record's worker: a forged record stays
/// forged, but a genuine worker's certificate may be reissued, so it is tried again, slowly.
const IDENTITY_BACKOFF: Duration = Duration::from_secs(5);

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

impl From<String> for LinkError {
    fn from(why: String) -> Self {
        LinkError::Failed(why)
    }
}

/// Starts sent to a worker on the current stream that its load reports have not counted yet:
/// they hold its slots as much as the ones it reported. Each report says how many starts the
/// worker had taken from the stream, so exactly the rest stay counted here.
#[derive(Debug, Default)]
struct InTransit {
    /// Slots held by placements whose start is not sent yet ([`SlotHold`]).
    held: u32,
    sent: u64,
    /// Prompt tokens of each start not yet counted by a report, oldest first, and whether it
    /// is latency-critical.
    prompts: VecDeque<(u64, bool)>,
    prompt_tokens: u64,
    /// Of `prompt_tokens`, those of latency-critical starts.
    latency_critical_prompt_tokens: u64,
}

impl InTransit {
    fn sent(&mut self, prompt_tokens: u64, latency_critical: bool) {
        self.sent += 1;
        self.prompts.push_back((prompt_tokens, latency_critical));
        self.prompt_tokens += prompt_tokens;
        if latency_critical {
            self.latency_critical_prompt_tokens += prompt_tokens;
        }
    }

    /// A load report that had seen `seen` starts of this stream (`None`: a worker that does
    /// not say, so everything sent so far is assumed counted).
    fn reported(&mut self, seen: Option<u64>) {
        let left = seen.map_or(0, |seen| self.sent.saturating_sub(seen));
        while self.prompts.len() as u64 > left {
            let (tokens, latency_critical) = self.prompts.pop_front().unwrap_or_default();
            self.prompt_tokens -= tokens;
            if latency_critical {
                self.latency_critical_prompt_tokens -= tokens;
            }
        }
    }

    fn starts(&self) -> u32 {
        u32::try_from(self.prompts.len())
            .unwrap_or(u32::MAX)
            .saturating_add(self.held)
    }

    fn prompt_tokens(&self) -> u64 {
        self.prompt_tokens
    }

    fn latency_critical_prompt_tokens(&self) -> u64 {
        self.latency_critical_prompt_tokens
    }
}

/// A slot of a worker held for a request placed there, from the placement decision until its
/// start is sent (then the start itself counts, see [`InTransit`]): decisions made meanwhile
/// see the slot taken. Dropped unused (the request never started there), it frees the slot and
/// wakes requests waiting for one.
pub struct SlotHold {
    link: Arc<Link>,
    used: bool,
}

impl SlotHold {
    /// The start was sent (or failed to be): the hold is no longer needed.
    pub fn release_after_start(mut self) {
        self.used = true;
    }
}

impl Drop for SlotHold {
    fn drop(&mut self) {
        let mut in_transit = self.link.in_transit.lock().expect("in-transit lock");
        in_transit.held = in_transit.held.saturating_sub(1);
        drop(in_transit);
        if !self.used {
            self.link.changes.worker(&self.link.id());
        }
    }
}

/// One worker's link.
pub struct Link {
    record: RwLock<WorkerRecord>,
    outbound: Mutex<Option<mpsc::UnboundedSender<v1::RouterFrame>>>,
    // Unbounded per request: a slow client must not stall the link reader (and with it every
    // other request on this worker); each request's backlog is bounded by its max_tokens.
    requests: Mutex<HashMap<String, mpsc::UnboundedSender<LinkEvent>>>,
    load: Mutex<Option<v1::Load>>,
    /// Starts sent on the current stream that no load report has counted yet.
    in_transit: Mutex<InTransit>,
    connected: AtomicBool,
    /// Whether the worker's record is in the membership view. An unlisted link lives only as
    /// long as its stream: it is not redialled.
    listed: AtomicBool,
    closed: CancellationToken,
    /// Shared by every link: told when this worker's load or reachability changes, so
    /// placement patches its view (and may place a waiting request here).
    changes: Arc<ChangeFeed>,
    prefix: SharedPrefixIndex,
    /// The current stream (see [`NEXT_STREAM`]); 0 while none is open.
    stream: AtomicU64,
    /// The current stream sent a KV snapshot: the worker publishes its cache.
    publishes_kv: AtomicBool,
    /// A frame in an unknown hash scheme was logged (once per link).
    warned_scheme: AtomicBool,
    /// The link set, to leave it when an unlisted link's stream fails.
    links: Weak<Links>,
    /// Shared by every link: the models' tokenizers, fetched from the workers.
    tokenizers: Arc<Tokenizers>,
    /// Models this worker has no tokenizer for (its engine works on text): not asked again.
    no_tokenizer: Mutex<HashSet<String>>,
}

/// The policy's fixed TTFT overhead for a worker that reports a fixed first-token delay
/// (`Load.first_token_delay_ms`, first decode step included): the policy adds one decode step
/// of its own, so the overhead is the delay less that step (never negative).
pub fn first_token_overhead_ms(delay_ms: f64, decode_tokens_per_s: f64) -> f64 {
    if !delay_ms.is_finite() || delay_ms <= 0.0 {
        return 0.0;
    }
    let step_ms = if decode_tokens_per_s > 0.0 {
        1000.0 / decode_tokens_per_s
    } else {
        0.0
    };
    (delay_ms - step_ms).max(0.0)
}

impl Link {
    fn new(
        record: WorkerRecord,
        changes: Arc<ChangeFeed>,
        prefix: SharedPrefixIndex,
        links: Weak<Links>,
        tokenizers: Arc<Tokenizers>,
    ) -> Arc<Self> {
        Arc::new(Self {
            record: RwLock::new(record),
            outbound: Mutex::new(None),
            requests: Mutex::new(HashMap::new()),
            load: Mutex::new(None),
            in_transit: Mutex::new(InTransit::default()),
            connected: AtomicBool::new(false),
            listed: AtomicBool::new(true),
            closed: CancellationToken::new(),
            changes,
            prefix,
            stream: AtomicU64::new(0),
            publishes_kv: AtomicBool::new(false),
            warned_scheme: AtomicBool::new(false),
            links,
            tokenizers,
            no_tokenizer: Mutex::new(HashSet::new()),
        })
    }

    pub fn record(&self) -> WorkerRecord {
        self.record.read().expect("record lock").clone()
    }

    pub fn id(&self) -> String {
        self.record.read().expect("record lock").id.clone()
    }

    /// Holds one of the worker's slots for a request just placed here (see [`SlotHold`]).
    pub fn hold_slot(self: &Arc<Self>) -> SlotHold {
        self.in_transit.lock().expect("in-transit lock").held += 1;
        SlotHold {
            link: self.clone(),
            used: false,
        }
    }

    /// Starts a generation on this worker; its frames arrive on the returned channel.
    pub fn start(
        &self,
        start: v1::WorkerStart,
    ) -> Result<mpsc::UnboundedReceiver<LinkEvent>, String> {
        let outbound = self.outbound.lock().expect("outbound lock").clone();
        let Some(outbound) = outbound.filter(|_| self.connected.load(Ordering::Acquire)) else {
            return Err(format!("worker {} is not connected", self.id()));
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.requests
            .lock()
            .expect("requests lock")
            .insert(start.request_id.clone(), tx);
        // Exact when the router tokenized the prompt, else estimated at 4 bytes per token.
        let prompt_tokens = if start.prompt_token_ids.is_empty() {
            let prompt_bytes = start.prompt.len()
                + start
                    .messages
                    .iter()
                    .map(|m| m.content.len())
                    .sum::<usize>();
            prompt_bytes.div_ceil(4)
        } else {
            start.prompt_token_ids.len()
        };
        let latency_critical = start.lane == v1::Lane::LatencyCritical as i32;
        let frame = v1::RouterFrame {
            frame: Some(router_frame::Frame::Start(start.clone())),
        };
        // Counted before it is sent, under the lock, so a load report that has seen it can
        // never arrive before it is counted.
        let sent = {
            let mut in_transit = self.in_transit.lock().expect("in-transit lock");
            let sent = outbound.send(frame).is_ok();
            if sent {
                in_transit.sent(prompt_tokens as u64, latency_critical);
            }
            sent
        };
        if !sent {
            self.requests
                .lock()
                .expect("requests lock")
                .remove(&start.request_id);
            return Err(format!("worker {} link just closed", self.id()));
        }
        Ok(rx)
    }

    /// Asks the worker to stop a generation (`Cancelled` or `Interrupted`).
    pub fn cancel(&self, request_id: &str, reason: v1::FinishReason) {
        self.send_control(router_frame::Frame::Cancel(v1::WorkerCancel {
            request_id: request_id.to_string(),
            reason: reason as i32,
        }));
    }

    /// Grants `request_id` more flow-control credit (its client read `tokens` more).
    pub fn grant(&self, request_id: &str, tokens: u32) {
        self.send_control(router_frame::Frame::Credit(v1::WorkerCredit {
            request_id: request_id.to_string(),
            tokens,
        }));
    }

    /// Sends a frame about a running generation; with the link down there is nothing to tell.
    fn send_control(&self, frame: router_frame::Frame) {
        let outbound = self.outbound.lock().expect("outbound lock").clone();
        if let Some(outbound) = outbound {
            let _ = outbound.send(v1::RouterFrame { frame: Some(frame) });
        }
    }

    /// Stops routing frames of `request_id` to its dispatcher.
    pub fn forget(&self, request_id: &str) {
        self.requests
            .lock()
            .expect("requests lock")
            .remove(request_id);
    }

    pub fn state(&self) -> WorkerState {
        let record = self.record();
        let load = *self.load.lock().expect("load lock");
        let (in_transit, in_transit_prompt_tokens, in_transit_lc_prompt_tokens) = {
            let t = self.in_transit.lock().expect("in-transit lock");
            (
                t.starts(),
                t.prompt_tokens(),
                t.latency_critical_prompt_tokens(),
            )
        };
        let reported = load.map(|l| l.active + l.queued).unwrap_or(0);
        let draining = load.is_some_and(|l| l.draining);
        // Per-stream decode rate: measured total over active streams, else the advertised one.
        let decode = load
            .filter(|l| l.active > 0 && l.tokens_per_s > 0.0)
            .map(|l| l.tokens_per_s / f64::from(l.active))
            .unwrap_or(record.capacity.tokens_per_s);
        WorkerState {
            available: record.is_ready() && !draining && self.connected.load(Ordering::Acquire),
            outstanding: reported + in_transit,
            max_concurrent: load
                .map(|l| l.max_concurrent)
                .filter(|m| *m > 0)
                .unwrap_or(record.capacity.max_concurrent),
            // Reported by the worker (0 = not reported) plus what was sent since; a rate of 0
            // makes the policy assume its default.
            queued_prompt_tokens: load.map_or(0, |l| l.queued_prompt_tokens)
                + in_transit_prompt_tokens,
            // Only a worker that reports its lanes apart prefills latency-critical prompts
            // first as far as the router knows.
            queued_latency_critical_prompt_tokens: load
                .and_then(|l| l.queued_latency_critical_prompt_tokens)
                .map(|lc| lc + in_transit_lc_prompt_tokens),
            prefill_tokens_per_s: load
                .map(|l| l.prefill_tokens_per_s)
                .filter(|r| r.is_finite() && *r > 0.0)
                .unwrap_or(0.0),
            decode_tokens_per_s: decode,
            ttft_overhead_ms: load
                .and_then(|l| l.first_token_delay_ms)
                .map_or(0.0, |delay| first_token_overhead_ms(delay, decode)),
            cost_per_mtok: record.capacity.cost_per_mtok,
            prefix_cache: self.publishes_kv.load(Ordering::Acquire),
            id: record.id,
            pool: record.pool,
            models: record.models,
        }
    }

    fn dispatch(&self, frame: worker_frame::Frame) {
        let (request_id, last) = match &frame {
            worker_frame::Frame::Load(load) => {
                *self.load.lock().expect("load lock") = Some(*load);
                self.in_transit
                    .lock()
                    .expect("in-transit lock")
                    .reported(load.starts_seen);
                self.changes.worker(&self.id());
                return;
            }
            worker_frame::Frame::KvEvents(events) => {
                self.apply_kv_events(events);
                return;
            }
            worker_frame::Frame::Tokens(t) => (t.request_id.clone(), false),
            worker_frame::Frame::Finished(f) => (f.request_id.clone(), true),
            worker_frame::Frame::Failed(f) => (f.request_id.clone(), true),
        };
        let mut requests = self.requests.lock().expect("requests lock");
        let delivered = match requests.get(&request_id) {
            Some(tx) => tx.send(LinkEvent::Frame(frame)).is_ok(),
            None => {
                debug!(%request_id, "frame for a request nobody waits for");
                false
            }
        };
        if last || !delivered {
            requests.remove(&request_id);
        }
        if last {
            self.changes.worker(&self.id());
        }
    }

    /// Updates the prefix index from the worker's `KvEvents` frame.
    fn apply_kv_events(&self, events: &v1::KvEvents) {
        let id = self.id();
        let stream = self.stream.load(Ordering::Acquire);
        let applied = self
            .prefix
            .write()
            .expect("prefix index lock")
            .apply(&id, stream, events);
        match applied {
            Ok(()) => {
                debug!(worker = %id, stored = events.stored.len(), removed = events.removed.len(), snapshot = events.snapshot, "KV events applied");
                if events.snapshot {
                    self.publishes_kv.store(true, Ordering::Release);
                    info!(worker = %id, blocks = events.stored.len(), block_tokens = events.block_tokens, "KV snapshot received: placing by this worker's cached prefixes");
                }
            }
            Err(error) => {
                if !self.warned_scheme.swap(true, Ordering::Relaxed) {
                    warn!(worker = %id, %error, "KvEvents ignored: the worker's cache will not guide placement");
                }
            }
        }
    }

    /// The stream broke: every request on it learns so and is forgotten.
    fn lose_all(&self, why: &str) {
        self.connected.store(false, Ordering::Release);
        self.publishes_kv.store(false, Ordering::Release);
        let stream = self.stream.swap(0, Ordering::AcqRel);
        self.prefix
            .write()
            .expect("prefix index lock")
            .remove_worker(&self.id(), stream);
        *self.outbound.lock().expect("outbound lock") = None;
        *self.load.lock().expect("load lock") = None;
        {
            // A new stream counts from zero; slots held by placements stay held.
            let mut in_transit = self.in_transit.lock().expect("in-transit lock");
            *in_transit = InTransit {
                held: in_transit.held,
                ..InTransit::default()
            };
        }
        for (_, tx) in self.requests.lock().expect("requests lock").drain() {
            let _ = tx.send(LinkEvent::Lost(why.to_string()));
        }
        self.changes.worker(&self.id());
    }

    /// Keeps a stream open to the worker until the link is closed, or until the stream of a
    /// worker no longer in the membership fails.
    async fn run(self: Arc<Self>, connect_timeout: Duration) {
        loop {
            let address = self.record().address;
            let mut backoff = RECONNECT_BACKOFF;
            match self.clone().serve_once(&address, connect_timeout).await {
                Ok(()) => info!(worker = %self.id(), "worker stream ended"),
                Err(LinkError::Refused(mismatch)) => {
                    let record = self.record();
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
                    backoff = IDENTITY_BACKOFF;
                }
                Err(error) => warn!(worker = %self.id(), %address, %error, "worker link failed"),
            }
            self.lose_all("connection to the worker was lost");
            if !self.listed.load(Ordering::Acquire) {
                match self.links.upgrade() {
                    // Its record came back meanwhile: dial again like any listed worker.
                    Some(links) if !links.drop_unlisted(&self) => {}
                    _ => return,
                }
            }
            tokio::select! {
                _ = self.closed.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    async fn serve_once(
        self: Arc<Self>,
        address: &str,
        connect_timeout: Duration,
    ) -> Result<(), LinkError> {
        let tls = self
            .links
            .upgrade()
            .and_then(|links| links.tls.get().cloned());
        // With TLS, only a certificate naming the record's worker completes the handshake.
        let (endpoint, identity) = match &tls {
            Some(tls) => {
                let record = self.record();
                let expected = identity::worker_uri(record.pool, &record.id);
                let (endpoint, check) = identity::endpoint(address, tls, expected)
                    .map_err(|e| LinkError::Failed(e.to_string()))?;
                (endpoint, Some(check))
            }
            None => (
                switchyard_cluster::tls::endpoint(address, None)
                    .map_err(|e| LinkError::Failed(e.to_string()))?,
                None,
            ),
        };
        let endpoint = endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        let (tx, rx) = mpsc::unbounded_channel();
        // Bound the whole establishment (TCP, HTTP/2 handshake, response headers): a worker
        // that accepts but never answers must not leave the link stuck; it is retried instead.
        let establish = async {
            let channel = endpoint.connect().await.map_err(|e| {
                match identity.as_ref().and_then(|check| check.take_rejection()) {
                    Some(mismatch) => LinkError::Refused(mismatch),
                    None => LinkError::Failed(e.to_string()),
                }
            })?;
            let mut call = tonic::Request::new(ReceiverStream::new(unbounded_to_bounded(rx)));
            if let Some(token) = self.credential() {
                token.apply(&mut call);
            }
            let inbound = WorkerClient::new(channel.clone())
                .serve(call)
                .await
                .map_err(|status| LinkError::Failed(status.to_string()))?;
            Ok::<_, LinkError>((channel, inbound.into_inner()))
        };
        let (channel, mut inbound) = tokio::select! {
            established = tokio::time::timeout(connect_timeout, establish) => established
                .map_err(|_| LinkError::Failed(format!("no answer within {connect_timeout:?}")))??,
            _ = self.closed.cancelled() => return Ok(()),
        };
        *self.outbound.lock().expect("outbound lock") = Some(tx);
        self.stream.store(
            NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            Ordering::Release,
        );
        self.connected.store(true, Ordering::Release);
        self.changes.worker(&self.id());
        info!(worker = %self.id(), %address, "worker link up");
        tokio::spawn(self.clone().fetch_tokenizers(channel));
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(v1::WorkerFrame { frame: Some(frame) })) => self.dispatch(frame),
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(LinkError::Failed(status.to_string())),
                },
                _ = self.closed.cancelled() => return Ok(()),
            }
        }
    }
}

impl Link {
    /// The cluster token of the link set, if any.
    fn credential(&self) -> Option<ClusterToken> {
        self.links.upgrade()?.credential.get().cloned()
    }

    /// Fetches the tokenizer of each of the worker's models the router has none for yet. Runs
    /// beside the link: requests go out as text until a tokenizer is here.
    async fn fetch_tokenizers(self: Arc<Self>, channel: Channel) {
        let worker = self.id();
        for model in self.record().models {
            if self
                .no_tokenizer
                .lock()
                .expect("no_tokenizer lock")
                .contains(&model)
            {
                continue;
            }
            let fetched = tokio::select! {
                fetched = async {
                    let claim = self.tokenizers.claim(&model).await?;
                    let credential = self.credential();
                    let fetched = tokenizers::fetch(channel.clone(), &model, credential.as_ref());
                    Some((fetched.await, claim))
                } => fetched,
                _ = self.closed.cancelled() => return,
            };
            match fetched {
                None => {}
                Some((Ok(tokenizer), claim)) => {
                    info!(%worker, %model, vocab = tokenizer.vocab_size(), "tokenizer fetched; the router tokenizes this model's requests");
                    claim.fulfil(tokenizer);
                }
                Some((Err(FetchError::NotFound(why)), _)) => {
                    debug!(%worker, %model, %why, "worker has no tokenizer for the model");
                    self.no_tokenizer
                        .lock()
                        .expect("no_tokenizer lock")
                        .insert(model);
                }
                Some((Err(FetchError::Failed(why)), _)) => {
                    warn!(%worker, %model, %why, "fetching the tokenizer failed; requests go as text until a link to a worker serving the model comes up");
                }
            }
        }
    }
}

/// Adapts an unbounded receiver to the bounded one `ReceiverStream` wraps, by a relay task.
fn unbounded_to_bounded(
    mut rx: mpsc::UnboundedReceiver<v1::RouterFrame>,
) -> mpsc::Receiver<v1::RouterFrame> {
    let (tx, bounded) = mpsc::channel(256);
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    bounded
}

/// All worker links, following the membership view.
pub struct Links {
    links: RwLock<HashMap<String, Arc<Link>>>,
    /// Every model a worker record ever advertised: a request for one of them with no worker
    /// right now is `UNAVAILABLE` (retry), not an unknown model.
    served_models: RwLock<BTreeSet<String>>,
    next_id: AtomicU64,
    connect_timeout: Duration,
    changes: Arc<ChangeFeed>,
    prefix: SharedPrefixIndex,
    me: Weak<Links>,
    tokenizers: Arc<Tokenizers>,
    /// The cluster token every link presents to its worker, once set.
    credential: OnceLock<ClusterToken>,
    /// TLS of every link, once set (before any link is dialled): workers then serve TLS.
    tls: OnceLock<ClientTls>,
    /// `switchyard_router_worker_identity_rejections`, once set.
    identity_rejections: OnceLock<Family<WorkerLabels, Counter>>,
}

impl Links {
    /// An empty link set; [`Links::follow`] keeps it in step with a membership view.
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            links: RwLock::new(HashMap::new()),
            served_models: RwLock::new(BTreeSet::new()),
            next_id: AtomicU64::new(0),
            connect_timeout,
            changes: Arc::default(),
            prefix: Arc::new(RwLock::new(PrefixIndex::new(PrefixIndexConfig::default()))),
            me: me.clone(),
            tokenizers: Arc::default(),
            credential: OnceLock::new(),
            tls: OnceLock::new(),
            identity_rejections: OnceLock::new(),
        })
    }

    /// Dials every worker link from now on over TLS (set once, before any).
    pub fn set_tls(&self, tls: ClientTls) {
        let _ = self.tls.set(tls);
    }

    /// Counts refused worker certificates in `counter` (set once, before any link is dialled).
    pub fn set_identity_rejections(&self, counter: Family<WorkerLabels, Counter>) {
        let _ = self.identity_rejections.set(counter);
    }

    fn identity_rejected(&self, record: &WorkerRecord) {
        if let Some(counter) = self.identity_rejections.get() {
            counter
                .get_or_create(&WorkerLabels {
                    worker_id: record.id.clone(),
                    pool: record.pool.as_str(),
                })
                .inc();
        }
    }

    /// Presents `token` on every worker link dialled from now on (set once, before any).
    pub fn set_credential(&self, token: ClusterToken) {
        let _ = self.credential.set(token);
    }

    /// Creates the link set and a task that keeps it in step with `membership`.
    pub fn spawn(
        membership: Membership,
        connect_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let links = Self::new(connect_timeout);
        links.follow(membership, shutdown);
        links
    }

    /// Opens and closes links as `membership` changes, until `shutdown` fires (then closes
    /// every link).
    pub fn follow(&self, mut membership: Membership, shutdown: CancellationToken) {
        self.sync(&membership.current());
        let this = self.me.upgrade().expect("links are alive while followed");
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = membership.changed() => {
                        if !changed { break; }
                        this.sync(&membership.current());
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
            for link in this
                .links
                .write()
                .expect("links lock")
                .drain()
                .map(|(_, l)| l)
            {
                link.closed.cancel();
            }
        });
    }

    fn sync(&self, view: &MembershipView) {
        self.served_models
            .write()
            .expect("served models lock")
            .extend(view.iter().flat_map(|r| r.models.iter().cloned()));
        let mut links = self.links.write().expect("links lock");
        links.retain(|id, link| {
            if view.get(id).is_some() {
                return true;
            }
            // The record went away: etcd lost the worker's lease (an outage or a lease flap),
            // or the worker deregistered. Its link decides: a healthy stream stays, with
            // everything in flight on it; a down one is dropped.
            if link.connected.load(Ordering::Acquire) {
                if link.listed.swap(false, Ordering::AcqRel) {
                    info!(worker = %id, "worker's record left the membership; keeping its link while its stream is healthy");
                }
                true
            } else {
                info!(worker = %id, "worker left the membership and its link is down; closing it");
                link.listed.store(false, Ordering::Release);
                link.closed.cancel();
                false
            }
        });
        for record in view.iter() {
            match links.get(&record.id) {
                Some(link) => {
                    // The stream was checked against the record's address and identity (its
                    // pool is part of it): a change of either is dialled, and checked, again.
                    let redial = {
                        let old = link.record.read().expect("record lock");
                        old.address != record.address || old.pool != record.pool
                    };
                    *link.record.write().expect("record lock") = record.clone();
                    if !link.listed.swap(true, Ordering::AcqRel) {
                        info!(worker = %record.id, "worker's record is back in the membership");
                    }
                    if redial {
                        // Reconnect to the new address: the old stream ends, `run` dials again.
                        let fresh = Link::new(
                            record.clone(),
                            self.changes.clone(),
                            self.prefix.clone(),
                            self.me.clone(),
                            self.tokenizers.clone(),
                        );
                        link.closed.cancel();
                        tokio::spawn(fresh.clone().run(self.connect_timeout));
                        links.insert(record.id.clone(), fresh);
                    }
                }
                None => {
                    let link = Link::new(
                        record.clone(),
                        self.changes.clone(),
                        self.prefix.clone(),
                        self.me.clone(),
                        self.tokenizers.clone(),
                    );
                    tokio::spawn(link.clone().run(self.connect_timeout));
                    links.insert(record.id.clone(), link);
                }
            }
        }
        drop(links);
        self.changes.membership();
    }

    /// Drops `link` after its stream failed while its worker was out of the membership.
    /// Returns `false` when the worker came back meanwhile (the link stays, to be redialled).
    fn drop_unlisted(&self, link: &Arc<Link>) -> bool {
        let mut links = self.links.write().expect("links lock");
        let id = link.id();
        let current = links.get(&id).is_some_and(|l| Arc::ptr_eq(l, link));
        if current && link.listed.load(Ordering::Acquire) {
            return false;
        }
        if current {
            info!(worker = %id, "link of a worker no longer in the membership failed; it leaves the view");
            links.remove(&id);
        }
        link.closed.cancel();
        drop(links);
        self.changes.membership();
        true
    }

    /// Whether a worker ever advertised `model` to this router.
    pub fn has_served(&self, model: &str) -> bool {
        self.served_models
            .read()
            .expect("served models lock")
            .contains(model)
    }

    pub fn get(&self, worker_id: &str) -> Option<Arc<Link>> {
        self.links
            .read()
            .expect("links lock")
            .get(worker_id)
            .cloned()
    }

    /// Every worker's state, for the placement policy.
    pub fn states(&self) -> Vec<WorkerState> {
        self.links
            .read()
            .expect("links lock")
            .values()
            .map(|l| l.state())
            .collect()
    }

    /// The policy's view of every worker.
    pub fn view(&self) -> ClusterView {
        let mut states = self.states();
        // Deterministic order: the view's indices and tie-breaks do not depend on hashing.
        states.sort_by(|a, b| a.id.cmp(&b.id));
        ClusterView::new(states)
    }

    /// Workers holding a prefix of `prompt` (token ids, chat template applied), longest first.
    pub fn prefix_lookup(&self, prompt: &[u32]) -> Vec<PrefixHit> {
        self.prefix
            .read()
            .expect("prefix index lock")
            .lookup(prompt)
    }

    /// Sizes of the prefix index.
    pub fn prefix_stats(&self) -> PrefixIndexStats {
        self.prefix.read().expect("prefix index lock").stats()
    }

    /// What changed among the workers since placement last looked (see [`ChangeFeed`]).
    pub fn changes(&self) -> &Arc<ChangeFeed> {
        &self.changes
    }

    /// The models' tokenizers, as fetched from the workers.
    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tokenizers
    }

    /// A router-wide unique id for a generation on a worker stream.
    pub fn next_generation_id(&self) -> String {
        format!("g{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cluster::{Capacity, Pool, WorkerState as RecordState};

    #[test]
    fn in_transit_counts_the_starts_no_report_has_seen() {
        let mut t = InTransit::default();
        for (tokens, latency_critical) in [(10, true), (20, false), (30, true)] {
            t.sent(tokens, latency_critical);
        }
        assert_eq!((t.starts(), t.prompt_tokens()), (3, 60));
        assert_eq!(t.latency_critical_prompt_tokens(), 40);
        // The worker had taken the first start: the other two are still on their way.
        t.reported(Some(1));
        assert_eq!((t.starts(), t.prompt_tokens()), (2, 50));
        assert_eq!(t.latency_critical_prompt_tokens(), 30);
        // A report older than one already applied changes nothing.
        t.reported(Some(0));
        assert_eq!((t.starts(), t.prompt_tokens()), (2, 50));
        t.reported(Some(3));
        assert_eq!((t.starts(), t.prompt_tokens()), (0, 0));
        assert_eq!(t.latency_critical_prompt_tokens(), 0);
        // A worker that does not count starts: what was sent is assumed counted.
        t.sent(5, true);
        t.reported(None);
        assert_eq!((t.starts(), t.prompt_tokens()), (0, 0));
        // Held slots count until their start is sent.
        t.held = 2;
        assert_eq!(t.starts(), 2);
    }

    fn record() -> WorkerRecord {
        WorkerRecord {
            id: "gpu-1".into(),
            pool: Pool::Gpu,
            address: "127.0.0.1:1".into(),
            models: vec!["m".into()],
            capacity: Capacity {
                max_concurrent: 8,
                tokens_per_s: 40.0,
                cost_per_mtok: 0.35,
            },
            hardware: String::new(),
            engine: "synthetic".into(),
            version: String::new(),
            state: RecordState::Ready,
        }
    }

    #[test]
    fn the_policy_sees_the_prefill_figures_a_worker_reports() {
        let link = Link::new(
            record(),
            Arc::default(),
            Arc::default(),
            Weak::new(),
            Arc::default(),
        );
        // Nothing reported: 0 = unknown, the policy assumes its defaults.
        let state = link.state();
        assert_eq!(
            (state.queued_prompt_tokens, state.prefill_tokens_per_s),
            (0, 0.0)
        );
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            active: 2,
            max_concurrent: 8,
            queued_prompt_tokens: 3_000,
            prefill_tokens_per_s: 12_000.0,
            ..Default::default()
        }));
        let state = link.state();
        assert_eq!(state.queued_prompt_tokens, 3_000);
        assert_eq!(state.prefill_tokens_per_s, 12_000.0);
        // A nonsense rate is treated as not reported.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            prefill_tokens_per_s: f64::NAN,
            ..Default::default()
        }));
        assert_eq!(link.state().prefill_tokens_per_s, 0.0);
    }

    #[test]
    fn a_reported_first_token_delay_is_what_the_policy_predicts_on_an_idle_worker() {
        let link = Link::new(
            record(),
            Arc::default(),
            Arc::default(),
            Weak::new(),
            Arc::default(),
        );
        // Not reported: no fixed overhead.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            max_concurrent: 8,
            prefill_tokens_per_s: 10_000.0,
            ..Default::default()
        }));
        assert_eq!(link.state().ttft_overhead_ms, 0.0);
        // A synthetic engine configured for 150 ms: an idle worker's 100-token prompt is
        // predicted at 150 ms plus its prefill (10 ms), not the 35 ms of prefill plus a step.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            max_concurrent: 8,
            prefill_tokens_per_s: 10_000.0,
            first_token_delay_ms: Some(150.0),
            ..Default::default()
        }));
        let state = link.state();
        let policy = crate::policy::document::PolicyDocument::default();
        let predicted = crate::policy::predicted_ttft_ms(
            &state,
            crate::policy::document::LaneName::LatencyCritical,
            100,
            false,
            &policy,
        );
        assert!((predicted - 160.0).abs() < 1e-6, "{predicted}");
        // The delay covers the decode step the policy adds; never negative.
        assert_eq!(first_token_overhead_ms(10.0, 40.0), 0.0);
        assert_eq!(first_token_overhead_ms(f64::NAN, 40.0), 0.0);
        assert_eq!(first_token_overhead_ms(100.0, 0.0), 100.0);
    }

    /// A link whose stream is up, and the receiving end of what it sends to the worker.
    fn connected_link() -> (Arc<Link>, mpsc::UnboundedReceiver<v1::RouterFrame>) {
        let link = Link::new(
            record(),
            Arc::default(),
            Arc::default(),
            Weak::new(),
            Arc::default(),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        *link.outbound.lock().unwrap() = Some(tx);
        link.connected.store(true, Ordering::Release);
        (link, rx)
    }

    #[test]
    fn prompts_sent_since_the_last_report_count_as_queued() {
        let (link, _outbound) = connected_link();
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 100,
            ..Default::default()
        }));
        let start = v1::WorkerStart {
            request_id: "g1".into(),
            prompt: "x".repeat(400),
            ..Default::default()
        };
        link.start(start).unwrap();
        assert_eq!(link.state().queued_prompt_tokens, 100 + 100);
        // The worker's next report includes it.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 200,
            ..Default::default()
        }));
        assert_eq!(link.state().queued_prompt_tokens, 200);
    }

    #[test]
    fn latency_critical_queued_tokens_reach_the_policy_with_the_starts_in_transit() {
        let (link, _outbound) = connected_link();
        // A worker that does not report its lanes apart: the policy counts every token.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 500,
            ..Default::default()
        }));
        assert_eq!(link.state().queued_latency_critical_prompt_tokens, None);
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 500,
            queued_latency_critical_prompt_tokens: Some(100),
            starts_seen: Some(0),
            ..Default::default()
        }));
        // Sent since: 100 latency-critical and 200 cost-sensitive prompt tokens.
        for (id, lane, bytes) in [
            ("lc", v1::Lane::LatencyCritical, 400),
            ("cs", v1::Lane::CostSensitive, 800),
        ] {
            link.start(v1::WorkerStart {
                request_id: id.into(),
                prompt: "x".repeat(bytes),
                lane: lane as i32,
                ..Default::default()
            })
            .unwrap();
        }
        let state = link.state();
        assert_eq!(state.queued_prompt_tokens, 500 + 300);
        assert_eq!(state.queued_latency_critical_prompt_tokens, Some(100 + 100));
        // The worker has seen both starts: its report counts them.
        link.dispatch(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 800,
            queued_latency_critical_prompt_tokens: Some(200),
            starts_seen: Some(2),
            ..Default::default()
        }));
        let state = link.state();
        assert_eq!(
            (
                state.queued_prompt_tokens,
                state.queued_latency_critical_prompt_tokens
            ),
            (800, Some(200))
        );
    }
}
