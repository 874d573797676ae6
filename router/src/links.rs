//! Persistent links to workers: one multiplexed `Worker.Serve` stream per worker, opened when
//! the worker appears in the membership view. Frames coming back are demultiplexed by request
//! id to each request's dispatcher; `Load` frames update the worker's load as seen by the
//! placement policy; `KvEvents` frames update the prefix index (what each worker's KV cache
//! holds), which a stream's end clears for that worker until its next stream's snapshot.
//!
//! Each link is an actor: one task owns the stream and everything that lives and dies with it
//! (the requests waiting for frames, the starts no load report has counted yet, the stream's
//! id). Dispatchers talk to it over a bounded command channel, and the frames for the worker go
//! on a bounded channel that is tonic's request stream itself. What placement needs to know
//! (connected, the last load report, the starts in transit, the slots held) is kept in a
//! [`StateCell`], read without waiting for the task. A stream that fails is dialled again after
//! an exponential backoff with full jitter, so routers do not all knock at a restarted worker
//! at once.
//!
//! Membership is statically stable: the link, not etcd, says whether a worker is healthy. A
//! worker whose record leaves the view (its lease lapsed while etcd was frozen or partitioned,
//! or it deregistered) keeps its link — and its in-flight streams and its place in routing — as
//! long as the stream stays up; it leaves the router's view when that stream fails. A worker
//! whose record is gone and whose link is already down is dropped at once.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::identity::{self, IdentityMismatch};
use switchyard_cluster::in_process;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Membership, MembershipView, WorkerRecord};
use switchyard_proto::hosted::Frames;
use switchyard_proto::v1::{self, router_frame, worker_client::WorkerClient, worker_frame};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::changes::ChangeFeed;
use crate::config::HostedWorker;
use crate::metrics::WorkerLabels;
use crate::policy::view::turnover_ewma;
use crate::policy::{ClusterView, WorkerState};
use crate::prefix_index::{PrefixHit, PrefixIndex, PrefixIndexConfig, PrefixIndexStats};
use crate::tokenizers::{self, FetchError, Tokenizers};

/// The prefix index shared by every link (written by their actors, read by placement).
pub type SharedPrefixIndex = Arc<RwLock<PrefixIndex>>;

/// Names each worker stream, so the prefix index ignores a closed stream's late frames and
/// forgets a worker only on behalf of the stream that published its blocks.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// What a request's dispatcher hears from its worker.
#[derive(Debug)]
pub enum LinkEvent {
    Frame(worker_frame::Frame),
    /// The stream to the worker broke (or was down when the start reached the link); the
    /// generation's fate is unknown.
    Lost(String),
}

/// A generation's events from its link. Each travels boxed: the channel allocates its first
/// block of 32 slots when the generation starts, and a slot the size of a worker frame made
/// that ~3.6 KiB per open stream; a pointer makes it ~0.3 KiB.
#[derive(Debug)]
pub struct LinkEvents(mpsc::UnboundedReceiver<Box<LinkEvent>>);

impl LinkEvents {
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        self.0.recv().await.map(|event| *event)
    }

    pub fn try_recv(&mut self) -> Result<LinkEvent, mpsc::error::TryRecvError> {
        self.0.try_recv().map(|event| *event)
    }
}

type EventSender = mpsc::UnboundedSender<Box<LinkEvent>>;

/// A request on the link's current stream: where its frames go, and since when it holds a
/// slot on the worker (for [`turnover_ewma`]).
struct Routed {
    events: EventSender,
    sent: Instant,
}

/// Commands a link takes before it is overloaded: a start beyond them fails at once (and is
/// placed elsewhere) instead of queueing behind a worker that does not keep up.
const COMMAND_CAPACITY: usize = 1024;

/// Frames waiting for tonic to take them onto the worker's stream. When they are all waiting,
/// the link takes no more commands until one goes, but it keeps reading the worker's frames:
/// a worker blocked writing to us must never wait for us to finish writing to it.
const OUTBOUND_CAPACITY: usize = 256;

/// Redials of a worker that is still registered: 100 ms doubling to 10 s, full jitter; a
/// stream that stayed up 10 s starts the schedule over.
const RECONNECT: Backoff = Backoff {
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
struct Backoff {
    min: Duration,
    max: Duration,
    /// A stream up at least this long was healthy: the failure after it is counted as the first.
    healthy_after: Duration,
}

impl Backoff {
    /// The ceiling of the delay after `failures` consecutive failures before this one.
    fn ceiling(&self, failures: u32) -> Duration {
        // 2^20 × any sane minimum is far beyond any sane maximum.
        let factor = 1u32 << failures.min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before dialling again, and the consecutive failures counted after it. The
    /// ended stream was up for `up_for` (`None`: it was never established); `unit` is uniform
    /// in [0, 1).
    fn after_failure(&self, failures: u32, up_for: Option<Duration>, unit: f64) -> (Duration, u32) {
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

/// Starts counted against a worker's slots and queue on top of its last report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Starts {
    count: u32,
    prompt_tokens: u64,
    /// Of `prompt_tokens`, those of latency-critical starts.
    latency_critical_prompt_tokens: u64,
}

impl Starts {
    fn add(&mut self, start: Charge) {
        self.count = self.count.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(start.prompt_tokens);
        if start.latency_critical {
            self.latency_critical_prompt_tokens = self
                .latency_critical_prompt_tokens
                .saturating_add(start.prompt_tokens);
        }
    }

    fn remove(&mut self, start: Charge) {
        self.count = self.count.saturating_sub(1);
        self.prompt_tokens = self.prompt_tokens.saturating_sub(start.prompt_tokens);
        if start.latency_critical {
            self.latency_critical_prompt_tokens = self
                .latency_critical_prompt_tokens
                .saturating_sub(start.prompt_tokens);
        }
    }
}

/// What one start weighs on its worker until a load report counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Charge {
    prompt_tokens: u64,
    latency_critical: bool,
}

impl Charge {
    fn of(start: &v1::WorkerStart) -> Self {
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
        Self {
            prompt_tokens: prompt_tokens as u64,
            latency_critical: start.lane == v1::Lane::LatencyCritical as i32,
        }
    }
}

/// Starts sent to a worker on the current stream that its load reports have not counted yet:
/// they hold its slots as much as the ones it reported. Each report says how many starts the
/// worker had taken from the stream, so exactly the rest stay counted here. Owned by the
/// link's task; placement sees its [`Starts`] total.
#[derive(Debug, Default)]
struct InTransit {
    sent: u64,
    /// Each start not yet counted by a report, oldest first.
    starts: VecDeque<Charge>,
    total: Starts,
}

impl InTransit {
    fn sent(&mut self, start: Charge) {
        self.sent += 1;
        self.starts.push_back(start);
        self.total.add(start);
    }

    /// A load report that had seen `seen` starts of this stream (`None`: a worker that does
    /// not say, so everything sent so far is assumed counted).
    fn reported(&mut self, seen: Option<u64>) {
        let left = seen.map_or(0, |seen| self.sent.saturating_sub(seen));
        while self.starts.len() as u64 > left {
            let Some(start) = self.starts.pop_front() else {
                break;
            };
            self.total.remove(start);
        }
    }

    fn total(&self) -> Starts {
        self.total
    }
}

/// What placement sees of a link. The link's task writes the stream's part; a placement
/// holding a slot and a dispatcher handing a start to the task write `reserved`, so a decision
/// made before the task has caught up still sees the slot taken. Every write is one
/// [`StateCell::update`], so a reader never sees half of one.
#[derive(Debug, Clone, Copy)]
struct LinkState {
    connected: bool,
    /// Whether the worker's record is in the membership view. An unlisted link lives only as
    /// long as its stream: it is not redialled.
    listed: bool,
    /// The worker's last load report on the current stream.
    load: Option<v1::Load>,
    /// The current stream sent a KV snapshot: the worker publishes its cache.
    publishes_kv: bool,
    /// Starts sent on the current stream that no load report has counted yet.
    in_transit: Starts,
    /// Generations of the current stream that finished since the last load report: their
    /// slots are free though that report (or [`Self::in_transit`]) still counts them.
    finished_since_report: u32,
    /// Slots held by placements whose start is not handed to the link yet ([`SlotHold`]).
    held: u32,
    /// Starts handed to the link's task that it has not sent yet.
    queued: Starts,
    /// Consecutive failed dials (or streams that did not stay up long).
    failures: u32,
    /// Mean time from a start sent to its generation's last frame ([`turnover_ewma`]); 0
    /// until one finished. Kept across streams: it describes the worker, not the stream.
    slot_turnover_ms: f64,
}

impl Default for LinkState {
    fn default() -> Self {
        Self {
            connected: false,
            listed: true,
            load: None,
            publishes_kv: false,
            in_transit: Starts::default(),
            finished_since_report: 0,
            held: 0,
            queued: Starts::default(),
            failures: 0,
            slot_turnover_ms: 0.0,
        }
    }
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

/// The policy's view of a worker from its record and its link's state.
fn worker_state(record: &WorkerRecord, link: &LinkState) -> WorkerState {
    let load = link.load;
    let reported = load.map(|l| l.active + l.queued).unwrap_or(0);
    let draining = load.is_some_and(|l| l.draining);
    let unreported = link
        .in_transit
        .count
        .saturating_add(link.queued.count)
        .saturating_add(link.held);
    let outstanding = reported
        .saturating_add(unreported)
        .saturating_sub(link.finished_since_report);
    let unreported_prompt_tokens = link.in_transit.prompt_tokens + link.queued.prompt_tokens;
    let unreported_lc_prompt_tokens =
        link.in_transit.latency_critical_prompt_tokens + link.queued.latency_critical_prompt_tokens;
    // Per-stream decode rate: measured total over active streams, else the advertised one.
    let decode = load
        .filter(|l| l.active > 0 && l.tokens_per_s > 0.0)
        .map(|l| l.tokens_per_s / f64::from(l.active))
        .unwrap_or(record.capacity.tokens_per_s);
    WorkerState {
        available: record.is_ready() && !draining && link.connected,
        outstanding,
        max_concurrent: load
            .map(|l| l.max_concurrent)
            .filter(|m| *m > 0)
            .unwrap_or(record.capacity.max_concurrent),
        // Reported by the worker (0 = not reported) plus what was sent since; a rate of 0
        // makes the policy assume its default.
        queued_prompt_tokens: load.map_or(0, |l| l.queued_prompt_tokens) + unreported_prompt_tokens,
        // Only a worker that reports its lanes apart prefills latency-critical prompts first
        // as far as the router knows.
        queued_latency_critical_prompt_tokens: load
            .and_then(|l| l.queued_latency_critical_prompt_tokens)
            .map(|lc| lc + unreported_lc_prompt_tokens),
        prefill_tokens_per_s: load
            .map(|l| l.prefill_tokens_per_s)
            .filter(|r| r.is_finite() && *r > 0.0)
            .unwrap_or(0.0),
        decode_tokens_per_s: decode,
        ttft_overhead_ms: load
            .and_then(|l| l.first_token_delay_ms)
            .map_or(0.0, |delay| first_token_overhead_ms(delay, decode)),
        prefill_chunk_tokens: load.and_then(|l| l.prefill_chunk_tokens).unwrap_or(0),
        cost_per_mtok: record.capacity.cost_per_mtok,
        prefix_cache: link.publishes_kv,
        slot_turnover_ms: link.slot_turnover_ms,
        id: record.id.clone(),
        pool: record.pool,
        models: record.models.clone(),
    }
}

/// What a link's task is asked to do.
enum Command {
    /// Send a generation's start; its frames go to `events`.
    Start {
        start: Box<v1::WorkerStart>,
        events: EventSender,
        charge: Charge,
    },
    Cancel {
        request_id: String,
        reason: v1::FinishReason,
    },
    Credit {
        request_id: String,
        tokens: u32,
    },
    /// Stop routing a request's frames.
    Forget(String),
}

/// What a link's handle and its task share.
struct Shared {
    /// The worker's id (a link is keyed by it and never changes worker).
    id: String,
    /// The worker's record, kept current by the membership follower.
    record: watch::Sender<Arc<WorkerRecord>>,
    state: StateCell,
    /// Fired when the link leaves the link set: its task ends.
    closed: CancellationToken,
    /// Shared by every link: told when this worker's load or reachability changes, so
    /// placement patches its view (and may place a waiting request here).
    changes: Arc<ChangeFeed>,
}

/// A link's [`LinkState`] behind a lock. Not a `watch`: nothing waits for a link's state to
/// change (placement hears of changes on the [`ChangeFeed`]), and a `watch` wakes its
/// receivers' notifiers on every write — a request makes about five.
#[derive(Default)]
struct StateCell(std::sync::Mutex<LinkState>);

impl StateCell {
    fn get(&self) -> LinkState {
        *self.0.lock().expect("link state lock")
    }

    fn update<R>(&self, write: impl FnOnce(&mut LinkState) -> R) -> R {
        write(&mut self.0.lock().expect("link state lock"))
    }
}

/// A slot of a worker held for a request placed there, from the placement decision until its
/// start is handed to the link (then the start itself counts, see [`InTransit`]): decisions
/// made meanwhile see the slot taken. Dropped unused (the request never started there), it
/// frees the slot and wakes requests waiting for one.
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
        let shared = &self.link.shared;
        shared.state.update(|s| s.held = s.held.saturating_sub(1));
        if !self.used {
            shared.changes.worker(&shared.id);
        }
    }
}

/// One worker's link: the handle dispatchers and placement use. Its task runs until the link
/// leaves the link set or every handle is gone.
pub struct Link {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

impl Link {
    /// A link and the task that serves it (not yet running: see [`LinkTask::run`]).
    fn new(
        record: WorkerRecord,
        changes: Arc<ChangeFeed>,
        prefix: SharedPrefixIndex,
        links: Weak<Links>,
        tokenizers: Arc<Tokenizers>,
        connect_timeout: Duration,
    ) -> (Arc<Self>, LinkTask) {
        let (commands, inbox) = mpsc::channel(COMMAND_CAPACITY);
        let shared = Arc::new(Shared {
            id: record.id.clone(),
            record: watch::Sender::new(Arc::new(record)),
            state: StateCell::default(),
            closed: CancellationToken::new(),
            changes,
        });
        let task = LinkTask {
            shared: shared.clone(),
            commands: inbox,
            links,
            prefix,
            tokenizers,
            connect_timeout,
            jitter: fastrand::f64,
            requests: HashMap::new(),
            in_transit: InTransit::default(),
            stream: 0,
            warned_scheme: false,
            no_tokenizer: HashSet::new(),
        };
        (Arc::new(Self { shared, commands }), task)
    }

    /// The worker's record as membership last listed it (shared: a request reads it a few
    /// times, and a record is a dozen strings).
    pub fn record(&self) -> Arc<WorkerRecord> {
        self.shared.record.borrow().clone()
    }

    pub fn id(&self) -> String {
        self.shared.id.clone()
    }

    /// Holds one of the worker's slots for a request just placed here (see [`SlotHold`]).
    pub fn hold_slot(self: &Arc<Self>) -> SlotHold {
        self.shared.state.update(|s| s.held += 1);
        SlotHold {
            link: self.clone(),
            used: false,
        }
    }

    /// Starts a generation on this worker; its frames arrive on the returned channel. Waits
    /// while the link's command channel is full — a burst of starts queues behind the ones
    /// the worker is taking instead of failing — and fails at once when the link is down (the
    /// caller places the request elsewhere). A link that goes down before its task sends the
    /// start says so as the channel's first event ([`LinkEvent::Lost`]).
    pub async fn start(&self, start: v1::WorkerStart) -> Result<LinkEvents, String> {
        let (command, charge, rx) = self.start_command(start)?;
        match self.commands.send(command).await {
            Ok(()) => Ok(rx),
            Err(_) => {
                self.shared.state.update(|s| s.queued.remove(charge));
                Err(format!("worker {} link just closed", self.shared.id))
            }
        }
    }

    /// [`Link::start`] without waiting: fails when the command channel is full.
    pub fn try_start(&self, start: v1::WorkerStart) -> Result<LinkEvents, String> {
        let (command, charge, rx) = self.start_command(start)?;
        match self.commands.try_send(command) {
            Ok(()) => Ok(rx),
            Err(error) => {
                self.shared.state.update(|s| s.queued.remove(charge));
                Err(match error {
                    TrySendError::Full(_) => format!(
                        "worker {} link is overloaded ({COMMAND_CAPACITY} commands waiting)",
                        self.shared.id
                    ),
                    TrySendError::Closed(_) => {
                        format!("worker {} link just closed", self.shared.id)
                    }
                })
            }
        }
    }

    /// The start command, counted in the link's state as queued before the task can see it,
    /// so a placement meanwhile sees it and a load report that has seen it can never arrive
    /// before it is counted.
    fn start_command(
        &self,
        start: v1::WorkerStart,
    ) -> Result<(Command, Charge, LinkEvents), String> {
        if !self.shared.state.get().connected {
            return Err(format!("worker {} is not connected", self.shared.id));
        }
        let charge = Charge::of(&start);
        // Unbounded per request: a slow client must not stall the link's task (and with it
        // every other request on this worker); credit bounds each request's backlog.
        let (events, rx) = mpsc::unbounded_channel();
        self.shared.state.update(|s| s.queued.add(charge));
        let command = Command::Start {
            start: Box::new(start),
            events,
            charge,
        };
        Ok((command, charge, LinkEvents(rx)))
    }

    /// Asks the worker to stop a generation (`Cancelled` or `Interrupted`).
    pub fn cancel(&self, request_id: &str, reason: v1::FinishReason) {
        self.control(Command::Cancel {
            request_id: request_id.to_string(),
            reason,
        });
    }

    /// Grants `request_id` more flow-control credit (its client read `tokens` more).
    pub fn grant(&self, request_id: &str, tokens: u32) {
        self.control(Command::Credit {
            request_id: request_id.to_string(),
            tokens,
        });
    }

    /// Stops routing frames of `request_id` to its dispatcher.
    pub fn forget(&self, request_id: &str) {
        self.control(Command::Forget(request_id.to_string()));
    }

    /// Hands the task a command about a running generation. Never dropped while the link
    /// lives: a lost cancel leaves a generation running for nobody, a lost credit stalls one.
    /// With the channel full, it waits its turn on a task of its own (it still follows its
    /// generation's start, already in the channel); with the link gone there is nothing to
    /// tell.
    fn control(&self, command: Command) {
        match self.commands.try_send(command) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(command)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let commands = self.commands.clone();
                    runtime.spawn(async move {
                        let _ = commands.send(command).await;
                    });
                }
            }
        }
    }

    /// Whether the worker is draining (its record or its load report says so) while its
    /// stream is still up: its generations may be handed to other workers.
    pub fn draining(&self) -> bool {
        let link = self.shared.state.get();
        link.connected
            && (link.load.is_some_and(|l| l.draining)
                || self.shared.record.borrow().state == switchyard_cluster::WorkerState::Draining)
    }

    /// The worker as the placement policy sees it.
    pub fn state(&self) -> WorkerState {
        let link = self.shared.state.get();
        worker_state(&self.shared.record.borrow(), &link)
    }
}

/// The frames for the worker on the current stream: tonic takes them from `frames`.
struct Outbound {
    frames: mpsc::Sender<v1::RouterFrame>,
    /// A frame that found `frames` full; no command is taken until it goes.
    waiting: Option<v1::RouterFrame>,
}

impl Outbound {
    fn push(&mut self, frame: router_frame::Frame) {
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
struct LinkTask {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    /// The link set: its TLS and credential, and to leave it when an unlisted link's stream
    /// fails.
    links: Weak<Links>,
    prefix: SharedPrefixIndex,
    /// Shared by every link: the models' tokenizers, fetched from the workers.
    tokenizers: Arc<Tokenizers>,
    connect_timeout: Duration,
    /// A sample uniform in [0, 1) for the reconnection jitter.
    jitter: fn() -> f64,
    /// The dispatcher of each request on the current stream.
    requests: HashMap<String, Routed>,
    in_transit: InTransit,
    /// The current stream (see [`NEXT_STREAM`]); 0 while none is open.
    stream: u64,
    /// A frame in an unknown hash scheme was logged (once per link).
    warned_scheme: bool,
    /// Models this worker has no tokenizer for (its engine works on text): not asked again.
    no_tokenizer: HashSet<String>,
}

impl LinkTask {
    /// Keeps a stream open to the worker until the link is closed, or until the stream of a
    /// worker no longer in the membership fails.
    async fn run(mut self) {
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
                    warn!(worker = %self.shared.id, %address, %error, "worker link failed");
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
                    Err(status) => break Err(status.to_string()),
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

    fn on_command(&mut self, command: Command, outbound: Option<&mut Outbound>) {
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

    fn on_frame(&mut self, frame: worker_frame::Frame) {
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
                    Some((Ok(tokenizer), claim)) => {
                        info!(%worker, %model, vocab = tokenizer.vocab_size(), "tokenizer fetched; the router tokenizes this model's requests");
                        claim.fulfil(tokenizer);
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
    // With TLS, only a certificate naming the record's worker completes the handshake.
    let (endpoint, identity) = match &tls {
        _ if hosted.is_some() => (in_process::endpoint(), None),
        Some(tls) => {
            let expected = {
                let record = shared.record.borrow();
                identity::worker_uri(record.pool, &record.id)
            };
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
            None => LinkError::Failed(e.to_string()),
        }
    })?;
    let (frames, outbound) = mpsc::channel(OUTBOUND_CAPACITY);
    if let Some(hosted) = hosted {
        let inbound = hosted
            .streams
            .serve(Box::pin(ReceiverStream::new(outbound).map(Ok)))
            .await
            .map_err(|status| LinkError::Failed(status.to_string()))?;
        return Ok((channel, inbound, frames));
    }
    let mut call = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(token) = credential {
        token.apply(&mut call);
    }
    let inbound = WorkerClient::new(channel.clone())
        .serve(call)
        .await
        .map_err(|status| LinkError::Failed(status.to_string()))?;
    Ok((channel, Box::pin(inbound.into_inner()), frames))
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
    /// Workers hosted by this process, by id: linked in process.
    hosted: RwLock<HashMap<String, HostedWorker>>,
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
            hosted: RwLock::default(),
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

    /// Links worker `hosted.id` in process from now on: it runs in this process, so its link
    /// skips the network (and TLS, which guards the network).
    pub fn host(&self, hosted: HostedWorker) {
        self.hosted
            .write()
            .expect("hosted workers lock")
            .insert(hosted.id.clone(), hosted);
    }

    fn hosted_worker(&self, worker_id: &str) -> Option<HostedWorker> {
        self.hosted
            .read()
            .expect("hosted workers lock")
            .get(worker_id)
            .cloned()
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
                link.shared.closed.cancel();
            }
        });
    }

    /// A link to `record`'s worker, its task running.
    fn open(&self, record: WorkerRecord) -> Arc<Link> {
        let (link, task) = Link::new(
            record,
            self.changes.clone(),
            self.prefix.clone(),
            self.me.clone(),
            self.tokenizers.clone(),
            self.connect_timeout,
        );
        tokio::spawn(task.run());
        link
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
            // everything in flight on it; a down one is dropped. Read and marked in one step
            // with the link's task marking it down, so exactly one of them drops it.
            let mut connected = false;
            let mut was_listed = false;
            link.shared.state.update(|s| {
                connected = s.connected;
                was_listed = std::mem::replace(&mut s.listed, false);
                was_listed
            });
            if connected {
                if was_listed {
                    info!(worker = %id, "worker's record left the membership; keeping its link while its stream is healthy");
                }
                true
            } else {
                info!(worker = %id, "worker left the membership and its link is down; closing it");
                link.shared.closed.cancel();
                false
            }
        });
        for record in view.iter() {
            match links.get(&record.id) {
                Some(link) => {
                    // The stream was checked against the record's address and identity (its
                    // pool is part of it): a change of either is dialled, and checked, again.
                    let redial = {
                        let old = link.shared.record.borrow();
                        old.address != record.address || old.pool != record.pool
                    };
                    link.shared.record.send_replace(Arc::new(record.clone()));
                    if link
                        .shared
                        .state
                        .update(|s| !std::mem::replace(&mut s.listed, true))
                    {
                        info!(worker = %record.id, "worker's record is back in the membership");
                    }
                    if redial {
                        // A new link to the new address; the old one's stream ends.
                        link.shared.closed.cancel();
                        let fresh = self.open(record.clone());
                        links.insert(record.id.clone(), fresh);
                    }
                }
                None => {
                    let link = self.open(record.clone());
                    links.insert(record.id.clone(), link);
                }
            }
        }
        drop(links);
        self.changes.membership();
    }

    /// Drops the link of `shared` after its stream failed while its worker was out of the
    /// membership. Returns `false` when the worker came back meanwhile (the link stays, to be
    /// redialled).
    fn drop_unlisted(&self, shared: &Arc<Shared>) -> bool {
        let mut links = self.links.write().expect("links lock");
        let id = &shared.id;
        let current = links
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(&l.shared, shared));
        if current && shared.state.get().listed {
            return false;
        }
        if current {
            info!(worker = %id, "link of a worker no longer in the membership failed; it leaves the view");
            links.remove(id);
        }
        shared.closed.cancel();
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
    use std::net::SocketAddr;
    use std::pin::Pin;

    use futures::Stream;
    use switchyard_cluster::{Capacity, Pool, WorkerState as RecordState};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// Longest any step may take before a test fails (a debug build on a busy machine).
    const PATIENCE: Duration = Duration::from_secs(30);
    /// How often tests look at a link's state.
    const POLL: Duration = Duration::from_millis(5);

    #[test]
    fn in_transit_counts_the_starts_no_report_has_seen() {
        let mut t = InTransit::default();
        for (prompt_tokens, latency_critical) in [(10, true), (20, false), (30, true)] {
            t.sent(Charge {
                prompt_tokens,
                latency_critical,
            });
        }
        assert_eq!((t.total().count, t.total().prompt_tokens), (3, 60));
        assert_eq!(t.total().latency_critical_prompt_tokens, 40);
        // The worker had taken the first start: the other two are still on their way.
        t.reported(Some(1));
        assert_eq!((t.total().count, t.total().prompt_tokens), (2, 50));
        assert_eq!(t.total().latency_critical_prompt_tokens, 30);
        // A report older than one already applied changes nothing.
        t.reported(Some(0));
        assert_eq!((t.total().count, t.total().prompt_tokens), (2, 50));
        t.reported(Some(3));
        assert_eq!(t.total(), Starts::default());
        // A worker that does not count starts: what was sent is assumed counted.
        t.sent(Charge {
            prompt_tokens: 5,
            latency_critical: true,
        });
        t.reported(None);
        assert_eq!(t.total(), Starts::default());
    }

    #[test]
    fn reconnection_backs_off_exponentially_with_full_jitter_and_starts_over_after_a_healthy_stream()
     {
        let ms = Duration::from_millis;
        // At the top of the jitter range: the ceilings, doubling from 100 ms to the 10 s cap.
        let mut failures = 0;
        let mut delays = Vec::new();
        for _ in 0..10 {
            let (delay, counted) = RECONNECT.after_failure(failures, None, 1.0);
            delays.push(delay);
            failures = counted;
        }
        assert_eq!(
            delays,
            [
                100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000, 10_000
            ]
            .map(ms)
        );
        assert_eq!(failures, 10);
        // Streams that came up but did not last count as failures too.
        assert_eq!(
            RECONNECT.after_failure(failures, Some(ms(9_999)), 1.0),
            (ms(10_000), 11)
        );
        // One that stayed up long enough was healthy: the schedule starts over.
        assert_eq!(
            RECONNECT.after_failure(failures, Some(ms(10_000)), 1.0),
            (ms(100), 1)
        );
        // Full jitter: anywhere from nothing to the ceiling.
        assert_eq!(RECONNECT.after_failure(3, None, 0.0), (Duration::ZERO, 4));
        assert_eq!(RECONNECT.after_failure(3, None, 0.25), (ms(200), 4));
        // Nonsense samples stay within the ceiling; the count never overflows.
        assert_eq!(RECONNECT.after_failure(0, None, 7.0).0, ms(100));
        assert_eq!(RECONNECT.after_failure(0, None, f64::NAN).0, ms(100));
        assert_eq!(
            RECONNECT.after_failure(u32::MAX, None, 1.0),
            (ms(10_000), u32::MAX)
        );
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

    /// A link to `record` and its task, not running; and the feed it tells of changes.
    fn link_to(record: WorkerRecord) -> (Arc<Link>, LinkTask, Arc<ChangeFeed>) {
        let changes = Arc::new(ChangeFeed::default());
        let (link, task) = Link::new(
            record,
            changes.clone(),
            Arc::default(),
            Weak::new(),
            Arc::default(),
            Duration::from_secs(5),
        );
        (link, task, changes)
    }

    fn link() -> (Arc<Link>, LinkTask) {
        let (link, task, _) = link_to(record());
        (link, task)
    }

    /// A link marked up, its task not running, and what it would send to the worker.
    fn connected_link() -> (
        Arc<Link>,
        LinkTask,
        Outbound,
        mpsc::Receiver<v1::RouterFrame>,
    ) {
        let (link, task) = link();
        link.shared.state.update(|s| s.connected = true);
        let (frames, sent) = mpsc::channel(OUTBOUND_CAPACITY);
        let outbound = Outbound {
            frames,
            waiting: None,
        };
        (link, task, outbound, sent)
    }

    /// Lets the task act on every command handed to it so far.
    fn catch_up(task: &mut LinkTask, outbound: &mut Outbound) {
        while let Ok(command) = task.commands.try_recv() {
            task.on_command(command, Some(outbound));
        }
    }

    #[test]
    fn the_policy_sees_the_prefill_figures_a_worker_reports() {
        let (link, mut task) = link();
        // Nothing reported: 0 = unknown, the policy assumes its defaults.
        let state = link.state();
        assert_eq!(
            (state.queued_prompt_tokens, state.prefill_tokens_per_s),
            (0, 0.0)
        );
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            active: 2,
            max_concurrent: 8,
            queued_prompt_tokens: 3_000,
            prefill_tokens_per_s: 12_000.0,
            ..Default::default()
        }));
        let state = link.state();
        assert_eq!(state.queued_prompt_tokens, 3_000);
        assert_eq!(state.prefill_tokens_per_s, 12_000.0);
        assert_eq!(state.prefill_chunk_tokens, 0, "whole prompts unless told");
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            prefill_chunk_tokens: Some(256),
            ..Default::default()
        }));
        assert_eq!(link.state().prefill_chunk_tokens, 256);
        // A nonsense rate is treated as not reported.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            prefill_tokens_per_s: f64::NAN,
            ..Default::default()
        }));
        assert_eq!(link.state().prefill_tokens_per_s, 0.0);
    }

    #[test]
    fn a_reported_first_token_delay_is_what_the_policy_predicts_on_an_idle_worker() {
        let (link, mut task) = link();
        // Not reported: no fixed overhead.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            max_concurrent: 8,
            prefill_tokens_per_s: 10_000.0,
            ..Default::default()
        }));
        assert_eq!(link.state().ttft_overhead_ms, 0.0);
        // A synthetic engine configured for 150 ms: an idle worker's 100-token prompt is
        // predicted at 150 ms plus its prefill (10 ms), not the 35 ms of prefill plus a step.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
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

    #[test]
    fn prompts_sent_since_the_last_report_count_as_queued() {
        let (link, mut task, mut outbound, _sent) = connected_link();
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 100,
            ..Default::default()
        }));
        let start = v1::WorkerStart {
            request_id: "g1".into(),
            prompt: "x".repeat(400),
            ..Default::default()
        };
        link.try_start(start).unwrap();
        // Counted from the moment it is handed over, before the task has seen it...
        assert_eq!(link.state().queued_prompt_tokens, 100 + 100);
        assert_eq!(link.state().outstanding, 1);
        // ... and exactly once after.
        catch_up(&mut task, &mut outbound);
        assert_eq!(link.state().queued_prompt_tokens, 100 + 100);
        assert_eq!(link.state().outstanding, 1);
        // The worker's next report includes it.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 200,
            ..Default::default()
        }));
        assert_eq!(link.state().queued_prompt_tokens, 200);
        assert_eq!(link.state().outstanding, 0);
    }

    #[test]
    fn a_finished_generation_frees_its_slot_before_the_next_load_report() {
        let (link, mut task, mut outbound, _sent) = connected_link();
        let report = |active: u32, seen: u64| {
            worker_frame::Frame::Load(v1::Load {
                active,
                max_concurrent: 1,
                starts_seen: Some(seen),
                ..Default::default()
            })
        };
        let finished = |id: &str| {
            worker_frame::Frame::Finished(v1::Finished {
                request_id: id.into(),
                ..Default::default()
            })
        };
        // Seen by a report, then finished: its slot is free at once, not when the worker
        // next reports (a request placed meanwhile would think the worker full).
        let _g1 = link.try_start(start("g1")).unwrap();
        catch_up(&mut task, &mut outbound);
        task.on_frame(report(1, 1));
        assert_eq!(link.state().outstanding, 1);
        task.on_frame(finished("g1"));
        assert_eq!(link.state().outstanding, 0);
        // The next report counts what the worker runs; nothing is taken off twice.
        task.on_frame(report(0, 1));
        assert_eq!(link.state().outstanding, 0);
        // Finished before any report saw it: the start in transit and its end cancel out, and
        // the report that then sees the start does not count it again.
        let _g2 = link.try_start(start("g2")).unwrap();
        catch_up(&mut task, &mut outbound);
        assert_eq!(link.state().outstanding, 1);
        task.on_frame(finished("g2"));
        assert_eq!(link.state().outstanding, 0);
        task.on_frame(report(0, 2));
        assert_eq!(link.state().outstanding, 0);
        // An end nobody routed here (a stray frame) frees nothing.
        let _g3 = link.try_start(start("g3")).unwrap();
        catch_up(&mut task, &mut outbound);
        task.on_frame(report(1, 3));
        task.on_frame(finished("unknown"));
        assert_eq!(link.state().outstanding, 1);
    }

    #[test]
    fn latency_critical_queued_tokens_reach_the_policy_with_the_starts_in_transit() {
        let (link, mut task, mut outbound, _sent) = connected_link();
        // A worker that does not report its lanes apart: the policy counts every token.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
            queued_prompt_tokens: 500,
            ..Default::default()
        }));
        assert_eq!(link.state().queued_latency_critical_prompt_tokens, None);
        task.on_frame(worker_frame::Frame::Load(v1::Load {
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
            link.try_start(v1::WorkerStart {
                request_id: id.into(),
                prompt: "x".repeat(bytes),
                lane: lane as i32,
                ..Default::default()
            })
            .unwrap();
        }
        catch_up(&mut task, &mut outbound);
        let state = link.state();
        assert_eq!(state.queued_prompt_tokens, 500 + 300);
        assert_eq!(state.queued_latency_critical_prompt_tokens, Some(100 + 100));
        // The worker has seen both starts: its report counts them.
        task.on_frame(worker_frame::Frame::Load(v1::Load {
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

    #[test]
    fn a_held_slot_counts_until_its_start_is_handed_over_and_an_unused_one_wakes_placement() {
        let (link, mut task, changes) = link_to(record());
        link.shared.state.update(|s| s.connected = true);
        let (frames, _sent) = mpsc::channel(OUTBOUND_CAPACITY);
        let mut outbound = Outbound {
            frames,
            waiting: None,
        };
        let used = link.hold_slot();
        let unused = link.hold_slot();
        assert_eq!(link.state().outstanding, 2);
        link.try_start(v1::WorkerStart {
            request_id: "g1".into(),
            ..Default::default()
        })
        .unwrap();
        used.release_after_start();
        assert_eq!(link.state().outstanding, 2);
        catch_up(&mut task, &mut outbound);
        assert_eq!(link.state().outstanding, 2);
        assert!(changes.take().workers.is_empty());
        drop(unused);
        assert_eq!(link.state().outstanding, 1);
        assert!(changes.take().workers.contains("gpu-1"));
    }

    #[test]
    fn starts_reaching_a_link_that_went_down_are_lost_at_once() {
        let (link, mut task) = link();
        // Down: refused at the door.
        assert!(link.try_start(v1::WorkerStart::default()).is_err());
        // Handed over while up, but the stream broke before the task sent it.
        link.shared.state.update(|s| s.connected = true);
        let mut events = link
            .try_start(v1::WorkerStart {
                request_id: "g1".into(),
                prompt: "x".repeat(40),
                ..Default::default()
            })
            .unwrap();
        let command = task.commands.try_recv().unwrap();
        task.on_command(command, None);
        assert!(matches!(events.try_recv(), Ok(LinkEvent::Lost(_))));
        assert_eq!(link.state().outstanding, 0);
        assert_eq!(link.state().queued_prompt_tokens, 0);
    }

    #[tokio::test]
    async fn a_full_command_channel_refuses_a_try_start_and_makes_a_start_wait_and_controls_still_arrive()
     {
        let (link, mut task, mut outbound, mut sent) = connected_link();
        let start = |i: usize| v1::WorkerStart {
            request_id: format!("g{i}"),
            ..Default::default()
        };
        let mut events = Vec::new();
        for i in 0..COMMAND_CAPACITY {
            events.push(link.try_start(start(i)).expect("room for the start"));
        }
        let refused = link.try_start(start(COMMAND_CAPACITY)).unwrap_err();
        assert!(refused.contains("overloaded"), "{refused}");
        // The refused start holds nothing.
        assert_eq!(link.state().outstanding, COMMAND_CAPACITY as u32);
        // A start that may wait, waits for room (a burst queues, it does not fail).
        let mut waiting = Box::pin(link.start(start(COMMAND_CAPACITY + 1)));
        assert!(futures::poll!(&mut waiting).is_pending());
        // A cancel finding the channel full is not lost: it goes once there is room, after
        // its start.
        link.cancel("g0", v1::FinishReason::Cancelled);
        let mut starts = 0;
        let cancelled = tokio::time::timeout(PATIENCE, async {
            loop {
                let command = task.commands.recv().await.expect("the link lives");
                task.on_command(command, Some(&mut outbound));
                while let Ok(frame) = sent.try_recv() {
                    match frame.frame {
                        Some(router_frame::Frame::Start(_)) => starts += 1,
                        Some(router_frame::Frame::Cancel(cancel)) => return cancel,
                        other => panic!("unexpected frame {other:?}"),
                    }
                }
                // The outbound channel holds fewer frames than the command channel: play
                // tonic's part.
                if let Some(frame) = outbound.waiting.take() {
                    outbound.frames.try_send(frame).expect("just drained");
                }
            }
        })
        .await
        .expect("the cancel arrives");
        assert_eq!(cancelled.request_id, "g0");
        // The waiting start got its room as the task took commands.
        assert!(waiting.await.is_ok());
    }

    /// A worker that reports a load as each stream opens and answers each start with three
    /// tokens naming the request, then `Finished` — except starts of `hold`, which it keeps
    /// running until the stream closes. Closes its streams when `closing` fires.
    #[derive(Clone, Default)]
    struct FakeWorker {
        closing: CancellationToken,
        streams: Arc<AtomicU64>,
    }

    type FrameStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerFrame, Status>> + Send>>;

    #[tonic::async_trait]
    impl v1::worker_server::Worker for FakeWorker {
        type ServeStream = FrameStream;

        async fn serve(
            &self,
            request: Request<Streaming<v1::RouterFrame>>,
        ) -> Result<Response<Self::ServeStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(64);
            let closing = self.closing.clone();
            self.streams.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let load = v1::Load {
                    max_concurrent: 3,
                    starts_seen: Some(0),
                    ..Default::default()
                };
                let frame = |frame| Ok(v1::WorkerFrame { frame: Some(frame) });
                if tx
                    .send(frame(worker_frame::Frame::Load(load)))
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    let start = tokio::select! {
                        message = inbound.message() => match message {
                            Ok(Some(v1::RouterFrame { frame: Some(router_frame::Frame::Start(start)) })) => start,
                            Ok(Some(_)) => continue,
                            _ => return,
                        },
                        _ = closing.cancelled() => return,
                    };
                    if start.request_id == "hold" {
                        continue;
                    }
                    for seq in 0..3 {
                        let tokens = v1::Tokens {
                            request_id: start.request_id.clone(),
                            seq,
                            text: format!("{}-{seq}", start.request_id),
                            token_ids: vec![seq as u32],
                        };
                        if tx
                            .send(frame(worker_frame::Frame::Tokens(tokens)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let finished = v1::Finished {
                        request_id: start.request_id,
                        ..Default::default()
                    };
                    if tx
                        .send(frame(worker_frame::Frame::Finished(finished)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
        }

        async fn get_tokenizer(
            &self,
            _: Request<v1::TokenizerRequest>,
        ) -> Result<Response<v1::TokenizerSpec>, Status> {
            Err(Status::not_found("this worker works on text"))
        }
    }

    /// Serves `worker` on `listener` until its `closing` fires.
    fn serve(listener: TcpListener, worker: FakeWorker) -> JoinHandle<()> {
        let closing = worker.closing.clone();
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(v1::worker_server::WorkerServer::new(worker))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    closing.cancelled_owned(),
                )
                .await
                .expect("the fake worker serves");
        })
    }

    fn record_at(address: SocketAddr) -> WorkerRecord {
        WorkerRecord {
            address: address.to_string(),
            ..record()
        }
    }

    /// A running link to `address`, with its task's jitter drawn from `jitter`.
    fn spawn_link(address: SocketAddr, jitter: fn() -> f64) -> Arc<Link> {
        let (link, mut task, _) = link_to(record_at(address));
        task.jitter = jitter;
        tokio::spawn(task.run());
        link
    }

    /// Polls the link's state (nothing announces its changes) until `ready` holds.
    async fn until(link: &Link, what: &str, mut ready: impl FnMut(&LinkState) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !ready(&link.shared.state.get()) {
            assert!(
                Instant::now() < deadline,
                "waited {PATIENCE:?} for the link to be {what}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The text a generation streamed until it finished, or why it was lost.
    async fn text_of(events: &mut LinkEvents) -> Result<String, String> {
        let mut text = String::new();
        loop {
            let event = tokio::time::timeout(PATIENCE, events.recv())
                .await
                .expect("a frame in time");
            match event {
                Some(LinkEvent::Frame(worker_frame::Frame::Tokens(tokens))) => {
                    text.push_str(&tokens.text);
                    text.push(' ');
                }
                Some(LinkEvent::Frame(worker_frame::Frame::Finished(_))) => return Ok(text),
                Some(LinkEvent::Frame(other)) => panic!("unexpected frame {other:?}"),
                Some(LinkEvent::Lost(why)) => return Err(why),
                None => return Err("the link dropped the request".into()),
            }
        }
    }

    fn start(request_id: &str) -> v1::WorkerStart {
        v1::WorkerStart {
            request_id: request_id.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn frames_are_demultiplexed_to_each_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let worker = FakeWorker::default();
        let _server = serve(listener, worker.clone());
        let link = spawn_link(address, fastrand::f64);
        until(&link, "up", |s| s.connected && s.load.is_some()).await;
        assert!(link.state().available);
        assert_eq!(link.state().max_concurrent, 3);

        let mut streams: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|id| link.try_start(start(id)).unwrap())
            .collect();
        for (id, events) in ["a", "b", "c"].into_iter().zip(&mut streams) {
            assert_eq!(
                text_of(events).await.unwrap(),
                format!("{id}-0 {id}-1 {id}-2 ")
            );
        }
        worker.closing.cancel();
    }

    #[tokio::test]
    async fn a_link_dials_its_worker_again_after_the_worker_restarts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let first = FakeWorker::default();
        let server = serve(listener, first.clone());
        let link = spawn_link(address, fastrand::f64);
        until(&link, "up", |s| s.connected).await;
        let mut held = link.try_start(start("hold")).unwrap();

        // The worker goes away: its request learns it, and the link is down.
        first.closing.cancel();
        server.await.unwrap();
        assert!(text_of(&mut held).await.is_err());
        until(&link, "down", |s| !s.connected).await;
        assert!(!link.state().available);
        assert!(link.try_start(start("while-down")).is_err());

        // The same address serves again: the link finds it.
        let listener = TcpListener::bind(address).await.unwrap();
        let second = FakeWorker::default();
        let _server = serve(listener, second.clone());
        until(&link, "up again", |s| s.connected).await;
        assert_eq!(second.streams.load(Ordering::Relaxed), 1);
        let mut events = link.try_start(start("after")).unwrap();
        assert_eq!(
            text_of(&mut events).await.unwrap(),
            "after-0 after-1 after-2 "
        );
        second.closing.cancel();
    }

    #[tokio::test]
    async fn redials_of_a_worker_that_stays_down_back_off_exponentially() {
        // Nothing listens there: every dial is refused at once.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        // At the top of the jitter range, the pauses are the ceilings: 100, 200, 400, 800 ms.
        let link = spawn_link(address, || 1.0);
        let mut failed_at = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            while failed_at.len() < 5 {
                tokio::time::sleep(POLL).await;
                let failures = link.shared.state.get().failures;
                if failures as usize > failed_at.len() {
                    failed_at.push(Instant::now());
                }
            }
        })
        .await
        .expect("five failed dials");
        // Between the second failure and the fifth the link paused 200 + 400 + 800 ms (a fixed
        // 200 ms schedule would take 600). A little slack for when this task saw the second.
        let paused = failed_at[4] - failed_at[1];
        assert!(paused >= Duration::from_millis(1_300), "{paused:?}");
        link.shared.closed.cancel();
    }

    /// A real worker (the synthetic engine, 200 tokens/s) serving in this process.
    async fn real_worker() -> (SocketAddr, CancellationToken) {
        let shutdown = CancellationToken::new();
        let config = switchyard_worker::WorkerConfig::loopback("gpu-1", Pool::Gpu);
        let engine =
            switchyard_worker::SyntheticEngine::checked(switchyard_worker::SyntheticConfig {
                ttft: Duration::from_millis(10),
                tokens_per_s: 200.0,
                ..Default::default()
            })
            .unwrap();
        let (ready, serving) = tokio::sync::oneshot::channel();
        tokio::spawn(switchyard_worker::run_worker(
            config,
            Arc::new(engine),
            Arc::new(switchyard_cluster::MemoryRegistry::new()),
            shutdown.clone(),
            |address| {
                let _ = ready.send(address);
            },
        ));
        (serving.await.expect("the worker serves"), shutdown)
    }

    /// Token ids `events` carries until `count` have come.
    async fn tokens(events: &mut LinkEvents, count: usize) {
        let mut got = 0;
        while got < count {
            match tokio::time::timeout(PATIENCE, events.recv()).await {
                Ok(Some(LinkEvent::Frame(worker_frame::Frame::Tokens(t)))) => {
                    got += t.token_ids.len()
                }
                other => panic!("expected tokens, got {other:?}"),
            }
        }
        assert_eq!(got, count, "more tokens than the credit allowed");
    }

    #[tokio::test]
    async fn credit_and_cancel_reach_a_real_worker_and_its_reports_settle_the_starts() {
        let (address, shutdown) = real_worker().await;
        let link = spawn_link(address, fastrand::f64);
        until(&link, "up", |s| s.connected).await;
        let mut events = link
            .try_start(v1::WorkerStart {
                request_id: "g1".into(),
                model: "synthetic".into(),
                prompt: "hello".into(),
                sampling: Some(v1::SamplingParams {
                    max_tokens: 10_000,
                    ..Default::default()
                }),
                credit_tokens: 4,
                ..Default::default()
            })
            .unwrap();
        tokens(&mut events, 4).await;
        link.grant("g1", 4);
        tokens(&mut events, 4).await;
        link.cancel("g1", v1::FinishReason::Cancelled);
        let finished = loop {
            match tokio::time::timeout(PATIENCE, events.recv()).await {
                Ok(Some(LinkEvent::Frame(worker_frame::Frame::Finished(f)))) => break f,
                // Credit granted before the cancel may still be spent.
                Ok(Some(LinkEvent::Frame(worker_frame::Frame::Tokens(_)))) => {}
                other => panic!("expected the generation to finish, got {other:?}"),
            }
        };
        assert_eq!(finished.reason, v1::FinishReason::Cancelled as i32);
        // The worker's reports have counted the start: nothing is in transit any more.
        until(&link, "settled", |s| {
            s.in_transit == Starts::default() && s.load.is_some_and(|l| l.active == 0)
        })
        .await;
        assert_eq!(link.state().outstanding, 0);
        shutdown.cancel();
    }

    /// Waits, on the change feed, until `done` holds.
    async fn until_links(links: &Links, what: &str, done: impl Fn(&Links) -> bool) {
        tokio::time::timeout(PATIENCE, async {
            while !done(links) {
                links.changes().next().await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("waited {PATIENCE:?} for {what}"));
    }

    #[tokio::test]
    async fn a_worker_whose_record_leaves_keeps_its_link_until_its_stream_fails() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let worker = FakeWorker::default();
        let _server = serve(listener, worker.clone());
        let links = Links::new(Duration::from_secs(5));
        let listed = MembershipView::from_records([record_at(address)]);
        links.sync(&listed);
        let link = links.get("gpu-1").expect("a link to the listed worker");
        until(&link, "up", |s| s.connected).await;

        // etcd lost the record (a lease lapsed during an outage): the healthy link stays, and
        // with it the worker's place in routing and what runs on it.
        let mut held = link.try_start(start("hold")).unwrap();
        links.sync(&MembershipView::default());
        let kept = links.get("gpu-1").expect("the link is kept");
        assert!(Arc::ptr_eq(&kept, &link));
        assert!(link.state().available);
        assert!(links.has_served("m"));

        // The record came back and left again: still the same link.
        links.sync(&listed);
        links.sync(&MembershipView::default());
        assert!(Arc::ptr_eq(&links.get("gpu-1").unwrap(), &link));

        // Then its stream fails: unlisted, it leaves the view instead of being redialled.
        worker.closing.cancel();
        assert!(text_of(&mut held).await.is_err());
        until_links(&links, "the unlisted worker to leave", |l| {
            l.get("gpu-1").is_none()
        })
        .await;
        assert!(links.view().workers().is_empty());
    }

    #[tokio::test]
    async fn a_worker_whose_record_leaves_while_its_link_is_down_is_dropped_at_once() {
        // Nothing listens there: the link never comes up.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let links = Links::new(Duration::from_secs(5));
        links.sync(&MembershipView::from_records([record_at(address)]));
        let link = links.get("gpu-1").expect("a link to the listed worker");
        assert!(!link.state().available);
        links.sync(&MembershipView::default());
        assert!(links.get("gpu-1").is_none());
        assert!(link.shared.closed.is_cancelled());
    }
}
