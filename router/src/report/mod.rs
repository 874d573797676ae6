//! Reports to the control plane: what the router decided for each request (lane and where it
//! came from, the candidates the policy scored with their predictions, the choice and its
//! reason), how the request ended, and once a second the aggregates of every request that
//! ended (per lane: count, SLO met, shed, failovers, TTFT and inter-token latency histograms,
//! tokens, cost; tokens per pool; router queue depth; moves per reason). The control plane
//! turns them into the dashboard's history and decision feed.
//!
//! The request path never waits on this: per-request records are sampled (at most
//! `decision_reports_per_s` a second) and go through a bounded queue that drops (and counts
//! the drops) when full; the per-second stats cover every request whatever the sampling. With
//! no control plane reachable, nothing is recorded at all and the router routes as before.
//!
//! What a client controls (model name, request id, tenant, error texts quoting them) is
//! clipped to what the control plane accepts ([`limits`]), so an oversized field still has its
//! decision recorded, marked with `…`.
//!
//! What a request is billed and judged on: its cost is (prompt + generated tokens) × the
//! worker's price, except that a request that ended failed, rejected or shed without a token
//! costs nothing (nothing was computed: a worker that refuses a prompt sends no usage). A
//! request refused (failed or rejected) before its first token is not judged against its SLO
//! (it is not counted in its lane's `requests`, like a cancelled one): the feed shows it as
//! failed or rejected. A shed request is: the cluster turned it away.
//!
//! Where to send: the control-plane leader's record in the cluster registry (etcd key
//! `leader/control-plane`), followed as it moves; the stream presents the cluster token when
//! one is configured.

pub mod answers;
pub mod histogram;
pub mod ledger;
pub mod limits;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchyard_cluster::Pool;
use switchyard_cluster::backoff::Backoff;
use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::tls::ClientTls;
use switchyard_proto::v1::{self, admin_client::AdminClient, router_report::Report};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::policy::document::LaneName;
use crate::policy::moves::MoveReason;
use histogram::Histogram;
use ledger::{Judged, Sums};

/// Reports waiting for the control-plane stream; beyond this they are dropped.
pub const QUEUE: usize = 1024;
/// Candidates kept per decision (the best ones).
pub const MAX_CANDIDATES: usize = 8;
/// Tenants with their own ledger row per second; the rest share [`ledger::OTHER_TENANTS`].
pub const MAX_TENANTS: usize = 32;
/// How often the per-second stats go out.
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Unix time in milliseconds.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Where a lane came from, split off the classifier's reason (`class=…`, `tenant=…`,
/// `rule=…`, `default`, each followed by ` lane=…`): `(origin, detail)`.
pub fn lane_origin(reason: &str) -> (&'static str, String) {
    let first = reason.split(' ').next().unwrap_or_default();
    let (key, value) = first.split_once('=').unwrap_or((first, ""));
    let origin = match key {
        "class" => "class",
        "tenant" => "tenant",
        "rule" => "rule",
        _ => "default",
    };
    let detail = if matches!(origin, "tenant" | "rule") {
        value.to_string()
    } else {
        String::new()
    };
    (origin, detail)
}

/// One lane's requests that ended in the current second.
#[derive(Debug, Default)]
struct LaneWindow {
    requests: u32,
    completed: u32,
    slo_met: u32,
    shed: u32,
    failovers: u32,
    ttft: Histogram,
    itl: Histogram,
    ttft_under: Histogram,
    ttft_over: Histogram,
    completion_tokens: u64,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    cost_usd: f64,
}

/// The counterfactual ledger of the current second.
#[derive(Debug, Default)]
struct LedgerWindow {
    lanes: [Sums; 2],
    pools: [Sums; 2],
    tenants: std::collections::HashMap<String, Sums>,
}

impl LedgerWindow {
    fn add(&mut self, lane: LaneName, entry: &LedgerEntry) {
        self.lanes[lane.index()].add(&entry.judged);
        self.pools[pool_index(entry.pool)].add(&entry.judged);
        // Keyed as the control plane accepts it (a tenant name is the client's).
        let clipped = (entry.tenant.len() > limits::ID_BYTES).then(|| {
            let mut tenant = entry.tenant.clone();
            limits::clip(&mut tenant, limits::ID_BYTES);
            tenant
        });
        let tenant = match clipped.as_deref().unwrap_or(&entry.tenant) {
            "" => ledger::NO_TENANT,
            tenant => tenant,
        };
        // Bounded: a flood of tenant names must not grow the report.
        let key = if self.tenants.contains_key(tenant) || self.tenants.len() < MAX_TENANTS {
            tenant
        } else {
            ledger::OTHER_TENANTS
        };
        match self.tenants.get_mut(key) {
            Some(sums) => sums.add(&entry.judged),
            None => {
                let mut sums = Sums::default();
                sums.add(&entry.judged);
                self.tenants.insert(key.to_string(), sums);
            }
        }
    }

    fn to_proto(&self) -> Vec<v1::LedgerStats> {
        let lanes = LaneName::ALL
            .iter()
            .map(|lane| (ledger::LANE, lane.as_str(), &self.lanes[lane.index()]));
        let pools = Pool::ALL
            .iter()
            .map(|&pool| (ledger::POOL, pool.as_str(), &self.pools[pool_index(pool)]));
        let tenants = self
            .tenants
            .iter()
            .map(|(tenant, sums)| (ledger::TENANT, tenant.as_str(), sums));
        lanes
            .chain(pools)
            .chain(tenants)
            .filter(|(_, _, sums)| !sums.is_empty())
            .map(|(dimension, key, sums)| sums.to_proto(dimension, key))
            .collect()
    }
}

/// What the current second has seen so far.
#[derive(Debug, Default)]
struct Window {
    lanes: [LaneWindow; 2],
    ledger: LedgerWindow,
    decisions: u32,
    decisions_reported: u32,
    /// Moves of the requests that ended, per [`MoveReason::index`].
    moves: [u32; 3],
    /// How the front doors answered.
    apis: answers::ApiCounts,
}

/// Per-second budget of sampled decisions.
#[derive(Debug, Default)]
struct Sampler {
    second: i64,
    used: u32,
}

struct Shared {
    router_id: String,
    /// A stream to a control plane is open: only then is anything recorded.
    connected: AtomicBool,
    per_s: u32,
    queue: mpsc::Sender<v1::RouterReport>,
    dropped: AtomicU32,
    sampler: Mutex<Sampler>,
    window: Mutex<Window>,
    /// Tokens delivered per pool ([`pool_index`]) this second; counted per chunk.
    pool_tokens: [AtomicU64; 2],
    /// Requests waiting at the router per lane, read when the stats go out.
    queue_depths: OnceLock<Box<dyn Fn() -> [u32; 2] + Send + Sync>>,
    state: OnceLock<Box<dyn Fn() -> v1::RouterState + Send + Sync>>,
}

fn pool_index(pool: Pool) -> usize {
    match pool {
        Pool::Gpu => 0,
        Pool::Wse => 1,
    }
}

/// The router's reporting handle: cheap to clone, a no-op when disabled or disconnected.
#[derive(Clone, Default)]
pub struct Reporter {
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("enabled", &self.shared.is_some())
            .field("connected", &self.connected())
            .finish()
    }
}

/// How a finished request is reported.
#[derive(Debug)]
pub struct Ended {
    pub lane: LaneName,
    pub outcome: v1::RequestOutcome,
    /// Cancelled by the client: not judged against its SLO.
    pub cancelled: bool,
    pub shed: bool,
    /// Its decision was reported: report the outcome too.
    pub sampled: bool,
    /// Its ledger entry, when it was judged (see [`ledger`]).
    pub ledger: Option<LedgerEntry>,
}

/// A judged request for the ledger's per-second sums.
#[derive(Debug)]
pub struct LedgerEntry {
    pub judged: Judged,
    /// The pool it was placed on.
    pub pool: Pool,
    /// Request metadata `tenant` ("" when none).
    pub tenant: String,
}

impl Reporter {
    /// A reporter that records nothing (no control plane to report to).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// A reporter with its queue; [`Reporter::run`] drains it. Not connected until it runs.
    fn new(mut router_id: String, per_s: u32) -> (Self, mpsc::Receiver<v1::RouterReport>) {
        limits::clip(&mut router_id, limits::ID_BYTES);
        let (queue, rx) = mpsc::channel(QUEUE);
        let shared = Shared {
            router_id,
            connected: AtomicBool::new(false),
            per_s,
            queue,
            dropped: AtomicU32::new(0),
            sampler: Mutex::default(),
            window: Mutex::default(),
            pool_tokens: Default::default(),
            queue_depths: OnceLock::new(),
            state: OnceLock::new(),
        };
        (
            Self {
                shared: Some(Arc::new(shared)),
            },
            rx,
        )
    }

    /// Starts reporting to whichever control plane leads (`leader` follows the registry's
    /// record of it), until `shutdown`.
    pub fn start(
        router_id: String,
        per_s: u32,
        leader: watch::Receiver<Option<Vec<u8>>>,
        credential: Option<ClusterToken>,
        tls: Option<ClientTls>,
        shutdown: CancellationToken,
    ) -> Self {
        let (reporter, rx) = Self::new(router_id, per_s);
        let shared = reporter.shared.clone().expect("enabled");
        tokio::spawn(stream_reports(
            shared.clone(),
            rx,
            leader,
            (credential, tls),
            shutdown.clone(),
        ));
        tokio::spawn(tick_stats(shared, shutdown));
        reporter
    }

    /// Lets the stats read the router's queue depths per lane.
    pub fn set_queue_depths(&self, probe: impl Fn() -> [u32; 2] + Send + Sync + 'static) {
        if let Some(shared) = &self.shared {
            let _ = shared.queue_depths.set(Box::new(probe));
        }
    }

    /// Lets the stats read what the router holds (its stores, its mirror, its sessions).
    pub fn set_state(&self, probe: impl Fn() -> v1::RouterState + Send + Sync + 'static) {
        if let Some(shared) = &self.shared {
            let _ = shared.state.set(Box::new(probe));
        }
    }

    pub fn connected(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|s| s.connected.load(Ordering::Relaxed))
    }

    pub fn router_id(&self) -> &str {
        self.shared.as_ref().map_or("", |s| s.router_id.as_str())
    }

    /// Whether to report this request's decision: connected, and within this second's
    /// budget. Every call counts as a decision made.
    pub fn sample(&self) -> bool {
        let Some(shared) = self.live() else {
            return false;
        };
        let second = now_unix_ms().div_euclid(1000);
        let take = {
            let mut sampler = shared.sampler.lock().expect("sampler lock");
            if sampler.second != second {
                *sampler = Sampler { second, used: 0 };
            }
            let take = sampler.used < shared.per_s;
            sampler.used += u32::from(take);
            take
        };
        let mut window = shared.window.lock().expect("window lock");
        window.decisions += 1;
        window.decisions_reported += u32::from(take);
        take
    }

    /// Sends a sampled decision, its strings clipped to what the control plane accepts.
    pub fn decision(&self, mut decision: v1::RoutingDecision) {
        if let Some(shared) = self.live() {
            clip_decision(&mut decision);
            shared.send(Report::Decision(decision));
        }
    }

    /// Tokens delivered to a client from `pool`.
    pub fn tokens(&self, pool: Pool, tokens: u32) {
        if let Some(shared) = self.live() {
            shared.pool_tokens[pool_index(pool)].fetch_add(u64::from(tokens), Ordering::Relaxed);
        }
    }

    /// Counts how a front door answered a request of `api`.
    pub fn answered(&self, api: &'static str, answer: answers::Answer) {
        if let Some(shared) = self.live() {
            shared
                .window
                .lock()
                .expect("window lock")
                .apis
                .add(api, answer);
        }
    }

    /// Counts an ended request in this second's stats and, when sampled, sends its outcome
    /// (billed and judged as the module says, its strings clipped).
    pub fn ended(&self, mut ended: Ended) {
        let Some(shared) = self.live() else {
            return;
        };
        let computed = !produced_nothing(&ended.outcome);
        if !computed {
            ended.outcome.cost_usd = 0.0;
        }
        {
            let mut guard = shared.window.lock().expect("window lock");
            let window = &mut *guard;
            let lane = &mut window.lanes[ended.lane.index()];
            let o = &ended.outcome;
            if !ended.cancelled && (computed || o.status == "shed") {
                lane.requests += 1;
                lane.slo_met += u32::from(o.slo_met);
            }
            lane.completed += u32::from(o.status == "completed");
            lane.shed += u32::from(ended.shed);
            lane.failovers += o.failovers;
            if o.ttft_ms > 0.0 {
                lane.ttft.record(o.ttft_ms);
            }
            if o.itl_ms > 0.0 {
                lane.itl.record(o.itl_ms);
            }
            // The prediction was for the first worker: judge it only when that one served.
            if o.predicted_ttft_ms > 0.0 && o.placed_ttft_ms > 0.0 && o.failovers == 0 {
                let error = o.placed_ttft_ms - o.predicted_ttft_ms;
                if error > 0.0 {
                    lane.ttft_under.record(error);
                } else {
                    lane.ttft_over.record(-error);
                }
            }
            if computed {
                lane.completion_tokens += u64::from(o.completion_tokens);
                lane.prompt_tokens += u64::from(o.prompt_tokens);
                lane.cached_prompt_tokens += u64::from(o.cached_prompt_tokens);
                lane.cost_usd += o.cost_usd;
            }
            if let Some(entry) = &ended.ledger {
                window.ledger.add(ended.lane, entry);
            }
            for moved in &o.moves {
                if let Some(reason) = MoveReason::ALL.iter().find(|r| r.as_str() == moved.reason) {
                    window.moves[reason.index()] += 1;
                }
            }
        }
        if ended.sampled {
            let mut outcome = ended.outcome;
            clip_outcome(&mut outcome);
            shared.send(Report::Outcome(outcome));
        }
    }

    fn live(&self) -> Option<&Shared> {
        self.shared
            .as_deref()
            .filter(|s| s.connected.load(Ordering::Relaxed))
    }
}

/// A request that ended failed, rejected or shed without a token: nothing was computed for it
/// (a worker that refuses a request reports no usage), so nothing is billed.
fn produced_nothing(o: &v1::RequestOutcome) -> bool {
    o.ttft_ms <= 0.0
        && o.completion_tokens == 0
        && matches!(o.status.as_str(), "failed" | "rejected" | "shed")
}

/// Clips a decision's strings and lists to what the control plane accepts.
fn clip_decision(d: &mut v1::RoutingDecision) {
    for field in [
        &mut d.request_id,
        &mut d.router_id,
        &mut d.tenant,
        &mut d.model,
        &mut d.lane_detail,
        &mut d.worker_id,
    ] {
        limits::clip(field, limits::ID_BYTES);
    }
    limits::clip(&mut d.reason_text, limits::TEXT_BYTES);
    d.candidates.truncate(limits::CANDIDATES);
    for c in &mut d.candidates {
        limits::clip(&mut c.worker_id, limits::ID_BYTES);
    }
}

/// Clips an outcome's strings and lists to what the control plane accepts; its request id
/// alike its decision's (the control plane pairs them by it).
fn clip_outcome(o: &mut v1::RequestOutcome) {
    for field in [
        &mut o.request_id,
        &mut o.worker_id,
        &mut o.best_alternative_worker_id,
    ] {
        limits::clip(field, limits::ID_BYTES);
    }
    limits::clip(&mut o.error, limits::TEXT_BYTES);
    o.moves.truncate(limits::MOVES);
    for m in &mut o.moves {
        for field in [
            &mut m.from_worker_id,
            &mut m.from_pool,
            &mut m.to_worker_id,
            &mut m.to_pool,
            &mut m.reason,
        ] {
            limits::clip(field, limits::ID_BYTES);
        }
    }
}

impl Shared {
    /// Queues a report without waiting; a full queue drops it (counted).
    fn send(&self, report: Report) {
        let report = v1::RouterReport {
            report: Some(report),
        };
        if self.queue.try_send(report).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes this second's stats, leaving an empty window.
    fn take_stats(&self) -> v1::RouterStats {
        let window = std::mem::take(&mut *self.window.lock().expect("window lock"));
        let depths = self
            .queue_depths
            .get()
            .map(|probe| probe())
            .unwrap_or([0; 2]);
        let lanes = LaneName::ALL
            .iter()
            .zip(window.lanes)
            .map(|(lane, w)| v1::LaneStats {
                lane: lane.as_str().to_string(),
                requests: w.requests,
                completed: w.completed,
                slo_met: w.slo_met,
                shed: w.shed,
                failovers: w.failovers,
                ttft: Some(w.ttft.to_proto()),
                itl: Some(w.itl.to_proto()),
                ttft_under_predicted: Some(w.ttft_under.to_proto()),
                ttft_over_predicted: Some(w.ttft_over.to_proto()),
                completion_tokens: w.completion_tokens,
                prompt_tokens: w.prompt_tokens,
                cached_prompt_tokens: w.cached_prompt_tokens,
                cost_usd: w.cost_usd,
                queued_at_router: depths[lane.index()],
            })
            .collect();
        let pools = Pool::ALL
            .iter()
            .map(|&pool| v1::PoolTokens {
                pool: pool.to_string(),
                tokens: self.pool_tokens[pool_index(pool)].swap(0, Ordering::Relaxed),
            })
            .collect();
        v1::RouterStats {
            router_id: self.router_id.clone(),
            at_unix_ms: now_unix_ms(),
            lanes,
            pools,
            decisions: window.decisions,
            decisions_reported: window.decisions_reported,
            dropped: self.dropped.swap(0, Ordering::Relaxed),
            ledger: window.ledger.to_proto(),
            moves: MoveReason::ALL
                .iter()
                .filter(|r| window.moves[r.index()] > 0)
                .map(|r| (r.as_str().to_string(), window.moves[r.index()]))
                .collect(),
            apis: window.apis.to_proto(),
            state: self.state.get().map(|probe| probe()),
        }
    }
}

/// Sends the stats every second while connected.
async fn tick_stats(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if shared.connected.load(Ordering::Relaxed) {
            let stats = shared.take_stats();
            shared.send(Report::Stats(stats));
        }
    }
}

/// The leader's gRPC address from its record (`{"id", "grpc", …}`).
fn leader_address(record: Option<&[u8]>) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Leader {
        grpc: String,
    }
    let leader: Leader = serde_json::from_slice(record?).ok()?;
    (!leader.grpc.is_empty()).then_some(leader.grpc)
}

const RECONNECT_INITIAL: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Keeps one report stream open to the current leader; while there is none, reports are not
/// recorded (`connected` is false) and whatever is queued is discarded.
async fn stream_reports(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<v1::RouterReport>,
    mut leader: watch::Receiver<Option<Vec<u8>>>,
    (credential, tls): (Option<ClusterToken>, Option<ClientTls>),
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
    loop {
        let address = leader_address(leader.borrow_and_update().as_deref());
        let ended = match &address {
            Some(address) => {
                let streamed = stream_to(
                    &shared,
                    &mut rx,
                    &mut leader,
                    (&credential, tls.as_ref()),
                    &shutdown,
                    address,
                )
                .await;
                shared.connected.store(false, Ordering::Relaxed);
                match streamed {
                    Ok(StreamEnd::LeaderMoved) => {
                        backoff = Backoff::new(RECONNECT_INITIAL, RECONNECT_MAX);
                        continue;
                    }
                    Ok(StreamEnd::Shutdown) => return,
                    Err(error) => {
                        debug!(%address, %error, "control-plane report stream failed");
                        Some(backoff.next_delay())
                    }
                }
            }
            None => None,
        };
        // Not connected: drop what is queued (stale by the time a control plane appears).
        while rx.try_recv().is_ok() {}
        let wait = async {
            match ended {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wait => {}
            changed = leader.changed() => if changed.is_err() { return },
        }
    }
}

enum StreamEnd {
    LeaderMoved,
    Shutdown,
}

async fn stream_to(
    shared: &Shared,
    rx: &mut mpsc::Receiver<v1::RouterReport>,
    leader: &mut watch::Receiver<Option<Vec<u8>>>,
    (credential, tls): (&Option<ClusterToken>, Option<&ClientTls>),
    shutdown: &CancellationToken,
    address: &str,
) -> Result<StreamEnd, Box<dyn std::error::Error + Send + Sync>> {
    // The leader's advertised address is its pod IP, which no issued certificate names: the
    // link checks the control plane's identity instead.
    let endpoint = switchyard_cluster::identity::dial(
        address,
        tls,
        switchyard_cluster::identity::control_plane_uri(),
    )?
    .connect_timeout(Duration::from_secs(2))
    .http2_keep_alive_interval(Duration::from_secs(10))
    .keep_alive_timeout(Duration::from_secs(10));
    let channel = tokio::select! {
        connected = endpoint.connect() => connected?,
        _ = shutdown.cancelled() => return Ok(StreamEnd::Shutdown),
    };
    let mut client = AdminClient::new(channel);
    let (tx, body) = mpsc::channel(64);
    let mut request = tonic::Request::new(ReceiverStream::new(body));
    if let Some(credential) = credential {
        credential.apply(&mut request);
    }
    let mut call = std::pin::pin!(client.report(request));
    // Stats first: the control plane learns of this router before any request ends.
    tx.send(v1::RouterReport {
        report: Some(Report::Stats(shared.take_stats())),
    })
    .await?;
    shared.connected.store(true, Ordering::Relaxed);
    info!(control_plane = %address, router = %shared.router_id, "reporting to the control plane");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(StreamEnd::Shutdown),
            changed = leader.changed() => {
                if changed.is_err() {
                    return Ok(StreamEnd::Shutdown);
                }
                let now = leader_address(leader.borrow().as_deref());
                if now.as_deref() != Some(address) {
                    match now {
                        Some(next) => info!(
                            control_plane = %next,
                            previous = %address,
                            "control-plane leader moved; reporting to the new one"
                        ),
                        None => info!(
                            previous = %address,
                            "control-plane leader gone; reporting to the next one once elected"
                        ),
                    }
                    return Ok(StreamEnd::LeaderMoved);
                }
            }
            ended = &mut call => {
                return Err(match ended {
                    Ok(_) => "the control plane closed the report stream".into(),
                    Err(status) => {
                        if status.code() == tonic::Code::Unauthenticated {
                            warn!(control_plane = %address, %status, "the control plane refused this router's reports");
                        }
                        status.into()
                    }
                });
            }
            report = rx.recv() => match report {
                Some(report) => tx.send(report).await?,
                None => return Ok(StreamEnd::Shutdown),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use limits::{ID_BYTES as ID_LIMIT, TEXT_BYTES as TEXT_LIMIT};

    #[test]
    fn lane_origins_come_from_the_classifier_reason() {
        assert_eq!(
            lane_origin("class=latency-critical lane=latency-critical"),
            ("class", String::new())
        );
        assert_eq!(
            lane_origin("tenant=acme lane=latency-critical"),
            ("tenant", "acme".to_string())
        );
        assert_eq!(
            lane_origin("rule=short-chat lane=latency-critical"),
            ("rule", "short-chat".to_string())
        );
        assert_eq!(
            lane_origin("default lane=cost-sensitive"),
            ("default", String::new())
        );
    }

    #[test]
    fn leader_records_name_the_grpc_address() {
        let record = br#"{"id":"cp-0","grpc":"127.0.0.1:50052","http":null}"#;
        assert_eq!(
            leader_address(Some(record)).as_deref(),
            Some("127.0.0.1:50052")
        );
        assert_eq!(leader_address(Some(b"not json")), None);
        assert_eq!(leader_address(None), None);
    }

    fn connected(per_s: u32) -> (Reporter, mpsc::Receiver<v1::RouterReport>) {
        let (reporter, rx) = Reporter::new("r".into(), per_s);
        reporter
            .shared
            .as_ref()
            .unwrap()
            .connected
            .store(true, Ordering::Relaxed);
        (reporter, rx)
    }

    #[test]
    fn a_disconnected_reporter_records_nothing() {
        let (reporter, mut rx) = Reporter::new("r".into(), 10);
        assert!(!reporter.sample());
        reporter.decision(v1::RoutingDecision::default());
        assert!(rx.try_recv().is_err());
        assert!(!Reporter::disabled().sample());
    }

    #[test]
    fn sampling_caps_decisions_per_second_and_counts_them_all() {
        let (reporter, _rx) = connected(3);
        let taken = (0..10).filter(|_| reporter.sample()).count();
        // A second boundary may fall inside the loop: at most twice the budget.
        assert!((3..=6).contains(&taken), "{taken}");
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        assert_eq!(stats.decisions, 10);
        assert_eq!(stats.decisions_reported as usize, taken);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (reporter, _rx) = connected(u32::MAX);
        for _ in 0..QUEUE + 5 {
            reporter.decision(v1::RoutingDecision::default());
        }
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        assert_eq!(stats.dropped, 5);
    }

    #[test]
    fn ended_requests_feed_the_lane_stats() {
        let (reporter, mut rx) = connected(10);
        let outcome = |ttft_ms: f64, slo_met: bool| v1::RequestOutcome {
            status: "completed".into(),
            ttft_ms,
            itl_ms: 20.0,
            completion_tokens: 10,
            slo_met,
            failovers: 1,
            cost_usd: 0.5,
            predicted_ttft_ms: 50.0,
            placed_ttft_ms: ttft_ms,
            ..Default::default()
        };
        let drained = v1::MoveRecord {
            reason: "drain".into(),
            ..Default::default()
        };
        reporter.ended(Ended {
            lane: LaneName::LatencyCritical,
            outcome: v1::RequestOutcome {
                moves: vec![drained],
                ..outcome(100.0, true)
            },
            cancelled: false,
            shed: false,
            sampled: true,
            ledger: None,
        });
        reporter.ended(Ended {
            lane: LaneName::LatencyCritical,
            outcome: outcome(900.0, false),
            cancelled: false,
            shed: false,
            sampled: false,
            ledger: None,
        });
        reporter.tokens(Pool::Wse, 7);
        // Only the sampled outcome is sent on its own.
        assert!(matches!(
            rx.try_recv().unwrap().report,
            Some(Report::Outcome(_))
        ));
        assert!(rx.try_recv().is_err());
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        let lc = &stats.lanes[LaneName::LatencyCritical.index()];
        assert_eq!(
            (lc.requests, lc.slo_met, lc.failovers, lc.completion_tokens),
            (2, 1, 2, 20)
        );
        assert_eq!(stats.moves, [("drain".to_string(), 1)].into());
        assert_eq!(Histogram::from_proto(lc.ttft.as_ref().unwrap()).count(), 2);
        // Both failed over: their prediction is not judged.
        assert_eq!(
            Histogram::from_proto(lc.ttft_under_predicted.as_ref().unwrap()).count(),
            0
        );
        reporter.ended(Ended {
            lane: LaneName::CostSensitive,
            outcome: v1::RequestOutcome {
                failovers: 0,
                ..outcome(80.0, true)
            },
            cancelled: false,
            shed: false,
            sampled: false,
            ledger: None,
        });
        reporter.ended(Ended {
            lane: LaneName::CostSensitive,
            outcome: v1::RequestOutcome {
                failovers: 0,
                ..outcome(40.0, true)
            },
            cancelled: false,
            shed: false,
            sampled: false,
            ledger: None,
        });
        assert_eq!(stats.pools[1].tokens, 7);
        // The window starts over.
        let again = reporter.shared.as_ref().unwrap().take_stats();
        let cs = &again.lanes[LaneName::CostSensitive.index()];
        let under = Histogram::from_proto(cs.ttft_under_predicted.as_ref().unwrap());
        let over = Histogram::from_proto(cs.ttft_over_predicted.as_ref().unwrap());
        assert_eq!((under.count(), over.count()), (1, 1));
        assert!((under.quantile(0.5).unwrap() / 30.0 - 1.0).abs() <= 0.012);
        assert!((over.quantile(0.5).unwrap() / 10.0 - 1.0).abs() <= 0.012);
        let again = reporter.shared.as_ref().unwrap().take_stats();
        assert_eq!(again.lanes[0].requests, 0);
        assert_eq!(again.pools[1].tokens, 0);
    }

    /// `value` was clipped to `max` bytes on a char boundary, marked, its start kept.
    fn assert_clipped(value: &str, original: &str, max: usize) {
        assert!(value.len() <= max, "{} bytes, at most {max}", value.len());
        assert!(value.ends_with('…'), "{value}");
        let kept = value.trim_end_matches('…');
        assert!(
            original.starts_with(kept) && kept.len() + 6 >= max,
            "{value}"
        );
    }

    #[test]
    fn client_controlled_strings_are_clipped_to_what_the_control_plane_accepts() {
        let (reporter, mut rx) = connected(10);
        // Multi-byte characters: the clip must land on a char boundary.
        let long = |c: &str| c.repeat(20_000);
        reporter.decision(v1::RoutingDecision {
            request_id: long("é"),
            tenant: long("t"),
            model: long("m"),
            lane: "cost-sensitive".into(),
            lane_detail: long("d"),
            worker_id: long("w"),
            reason_text: long("r"),
            candidates: vec![v1::RoutingCandidate {
                worker_id: long("c"),
                ..Default::default()
            }],
            ..Default::default()
        });
        let Some(Report::Decision(d)) = rx.try_recv().unwrap().report else {
            panic!("a decision");
        };
        assert_clipped(&d.request_id, &long("é"), ID_LIMIT);
        assert_clipped(&d.tenant, &long("t"), ID_LIMIT);
        assert_clipped(&d.model, &long("m"), ID_LIMIT);
        assert_clipped(&d.lane_detail, &long("d"), ID_LIMIT);
        assert_clipped(&d.worker_id, &long("w"), ID_LIMIT);
        assert_clipped(&d.reason_text, &long("r"), TEXT_LIMIT);
        assert_clipped(&d.candidates[0].worker_id, &long("c"), ID_LIMIT);
        // What fits is sent as it is.
        reporter.decision(v1::RoutingDecision {
            request_id: "é".repeat(ID_LIMIT / 2),
            ..Default::default()
        });
        let Some(Report::Decision(d)) = rx.try_recv().unwrap().report else {
            panic!("a decision");
        };
        assert_eq!(d.request_id, "é".repeat(ID_LIMIT / 2));

        reporter.ended(Ended {
            lane: LaneName::CostSensitive,
            outcome: v1::RequestOutcome {
                request_id: long("é"),
                status: "rejected".into(),
                error: long("e"),
                moves: vec![v1::MoveRecord {
                    to_worker_id: long("w"),
                    reason: "drain".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            cancelled: false,
            shed: false,
            sampled: true,
            ledger: None,
        });
        let Some(Report::Outcome(o)) = rx.try_recv().unwrap().report else {
            panic!("an outcome");
        };
        // The same clip as its decision's: the control plane matches them by request id.
        assert_eq!(o.request_id, d_request_id_of(&long("é")));
        assert_clipped(&o.error, &long("e"), TEXT_LIMIT);
        assert_clipped(&o.moves[0].to_worker_id, &long("w"), ID_LIMIT);

        // A tenant's ledger row is keyed by its name, clipped alike.
        reporter.ended(Ended {
            lane: LaneName::CostSensitive,
            outcome: v1::RequestOutcome::default(),
            cancelled: false,
            shed: false,
            sampled: false,
            ledger: Some(LedgerEntry {
                judged: ledger::Basis::default().judge(ledger::Verdict {
                    actual_ms: 10.0,
                    predicted_ms: 10.0,
                    slo_ms: 1000.0,
                    slo_met: true,
                    cost_usd: 0.0,
                    tokens: 1.0,
                }),
                pool: Pool::Gpu,
                tenant: long("t"),
            }),
        });
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        let tenant = stats
            .ledger
            .iter()
            .find(|l| l.dimension == ledger::TENANT)
            .expect("the tenant's row");
        assert_clipped(&tenant.key, &long("t"), ID_LIMIT);
    }

    /// The decision's clipped request id for `id`: sent through a fresh reporter.
    fn d_request_id_of(id: &str) -> String {
        let (reporter, mut rx) = connected(10);
        reporter.decision(v1::RoutingDecision {
            request_id: id.into(),
            ..Default::default()
        });
        match rx.try_recv().unwrap().report {
            Some(Report::Decision(d)) => d.request_id,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_request_that_failed_before_its_first_token_costs_nothing_and_misses_no_slo() {
        let (reporter, mut rx) = connected(10);
        let price = 0.10;
        let end = |status: &str, prompt_tokens: u32, completion_tokens: u32, ttft_ms: f64| Ended {
            lane: LaneName::LatencyCritical,
            outcome: v1::RequestOutcome {
                request_id: format!("{status}-{completion_tokens}"),
                status: status.into(),
                prompt_tokens,
                completion_tokens,
                ttft_ms,
                slo_met: ttft_ms > 0.0 && ttft_ms < 500.0,
                // What the run computes: every prompt and generated token at the price.
                cost_usd: f64::from(prompt_tokens + completion_tokens) * price / 1e6,
                ..Default::default()
            },
            cancelled: false,
            shed: status == "shed",
            sampled: true,
            ledger: None,
        };
        // Refused by the worker (the prompt exceeds the context): nothing was computed.
        reporter.ended(end("failed", 35_001, 0, 0.0));
        // Refused by the router (unknown model) and shed: never reached a worker.
        reporter.ended(end("rejected", 40, 0, 0.0));
        reporter.ended(end("shed", 40, 0, 0.0));
        let mut sent = Vec::new();
        while let Ok(report) = rx.try_recv() {
            if let Some(Report::Outcome(o)) = report.report {
                sent.push(o);
            }
        }
        assert_eq!(sent.len(), 3);
        for o in &sent {
            assert_eq!(o.cost_usd, 0.0, "{o:?}");
            assert!(!o.slo_met, "{o:?}");
        }
        // The request's own size stays in its story.
        assert_eq!(sent[0].prompt_tokens, 35_001);
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        let lc = &stats.lanes[LaneName::LatencyCritical.index()];
        // Only the shed request is an SLO miss (the cluster turned it away); nothing is
        // billed and no prompt counts as computed (the prefix-cache hit rate's denominator).
        assert_eq!((lc.requests, lc.slo_met, lc.shed), (1, 0, 1));
        assert_eq!(lc.cost_usd, 0.0);
        assert_eq!(lc.prompt_tokens, 0);

        // A failure after tokens were served bills what was computed and is judged on its
        // first token.
        reporter.ended(end("failed", 100, 5, 120.0));
        let Some(Report::Outcome(o)) = rx.try_recv().unwrap().report else {
            panic!("an outcome");
        };
        assert_eq!(o.cost_usd, 105.0 * price / 1e6);
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        let lc = &stats.lanes[LaneName::LatencyCritical.index()];
        assert_eq!((lc.requests, lc.slo_met), (1, 1));
        assert_eq!(lc.cost_usd, 105.0 * price / 1e6);
        assert_eq!(lc.prompt_tokens, 100);
    }

    #[test]
    fn the_ledger_sums_per_lane_pool_and_a_bounded_set_of_tenants() {
        let (reporter, _rx) = connected(10);
        let basis = ledger::Basis {
            best_alternative: Some(("gpu-1".into(), 50.0)),
            cheapest_meeting_slo_per_mtok: None,
        };
        let end = |tenant: String, actual_ms: f64| Ended {
            lane: LaneName::CostSensitive,
            outcome: v1::RequestOutcome::default(),
            cancelled: false,
            shed: false,
            sampled: false,
            ledger: Some(LedgerEntry {
                judged: basis.judge(ledger::Verdict {
                    actual_ms,
                    predicted_ms: 60.0,
                    slo_ms: 1000.0,
                    slo_met: true,
                    cost_usd: 0.0,
                    tokens: 10.0,
                }),
                pool: Pool::Gpu,
                tenant,
            }),
        };
        reporter.ended(end(String::new(), 80.0));
        for i in 0..MAX_TENANTS + 3 {
            reporter.ended(end(format!("t{i}"), 50.0));
        }
        let stats = reporter.shared.as_ref().unwrap().take_stats();
        let row = |dimension: &str, key: &str| {
            stats
                .ledger
                .iter()
                .find(|l| l.dimension == dimension && l.key == key)
                .cloned()
        };
        let cs = row(ledger::LANE, "cost-sensitive").unwrap();
        assert_eq!(cs.judged as usize, MAX_TENANTS + 4);
        // 30 ms regret (80 against 50), 10 ms of it chosen knowingly on every request.
        assert_eq!(cs.regret_ms, 30.0);
        assert_eq!(cs.chosen_slower_ms, 10.0 * (MAX_TENANTS + 4) as f64);
        assert!(row(ledger::LANE, "latency-critical").is_none());
        assert_eq!(row(ledger::POOL, "gpu").unwrap().judged, cs.judged);
        assert_eq!(row(ledger::TENANT, ledger::NO_TENANT).unwrap().judged, 1);
        // The bound: MAX_TENANTS rows in all, the latecomers in "(other)".
        let tenants = stats
            .ledger
            .iter()
            .filter(|l| l.dimension == ledger::TENANT);
        assert_eq!(tenants.count(), MAX_TENANTS + 1);
        assert_eq!(
            row(ledger::TENANT, ledger::OTHER_TENANTS).unwrap().judged,
            4
        );
        let again = reporter.shared.as_ref().unwrap().take_stats();
        assert!(again.ledger.is_empty());
    }
}
