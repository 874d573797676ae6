//! The router's Prometheus metrics. Label values are small closed sets: `lane` ∈
//! {latency_critical, cost_sensitive}, `pool` ∈ {gpu, wse, none} (`none`: the request never
//! reached a worker), `model` as requested (validated against the served models before a
//! request is counted with it), `outcome` and `reason` as documented on each metric.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use switchyard_cluster::Pool;
use switchyard_cluster::telemetry::metrics::{ITL_BUCKETS, Metrics, TTFT_BUCKETS};
use switchyard_cluster::telemetry::weighted_histogram::WeightedHistogram;
use switchyard_proto::v1;

use crate::policy::document::LaneName;
use crate::policy::moves::MoveReason;

/// The `lane` label value of `lane`.
pub fn lane_label(lane: LaneName) -> &'static str {
    match lane {
        LaneName::LatencyCritical => "latency_critical",
        LaneName::CostSensitive => "cost_sensitive",
    }
}

/// The `pool` label value of `pool` (`none` when there is no worker).
pub fn pool_label(pool: Option<Pool>) -> &'static str {
    match pool {
        Some(Pool::Gpu) => "gpu",
        Some(Pool::Wse) => "wse",
        None => "none",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub lane: &'static str,
    pub pool: &'static str,
    pub model: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub lane: &'static str,
    pub pool: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub lane: &'static str,
    pub pool: &'static str,
    pub model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// One of the states of a gauge family that is 1 for the state things are in (see
    /// [`RouterMetrics::policy_state`], [`RouterMetrics::response_mirror`]).
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchRequestLabels {
    /// `completed` (answered 2xx), `failed` (answered otherwise) or `waited` (refused for want
    /// of room, to be tried again).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub lane: &'static str,
    /// `placed`, `shed` (waited out its lane's queue wait, or evicted) or `cancelled` (by
    /// its client while waiting).
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub reason: &'static str,
    pub from_pool: &'static str,
    pub to_pool: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HedgeLabels {
    pub lane: &'static str,
    /// `primary` or `hedge`: the copy that went on.
    pub winner: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HedgeBudgetLabels {
    pub lane: &'static str,
    /// `spent` (prefill tokens charged to hedges, less refunds) or `allowed` (the lane's
    /// budget: `hedging.budget_fraction` × its prompt tokens so far).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LanePoolLabels {
    pub lane: &'static str,
    pub pool: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthRefusalLabels {
    /// `missing`, `malformed` or `unknown` (see [`crate::auth::AuthError`]).
    pub reason: &'static str,
    /// `grpc` or `http`.
    pub door: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcRequestLabels {
    /// `grpc_session` or `grpc_generate`.
    pub api: &'static str,
    /// The gRPC code's name, as gRPC spells it (`OK`, `INVALID_ARGUMENT`, …).
    pub code: &'static str,
}

/// A gRPC code as gRPC's own documents name it.
fn grpc_code_label(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequestLabels {
    /// Which API the route is (`chat_completions`, `completions`, `responses`, `messages`,
    /// `count_tokens`, `tokenize`, `detokenize`, `models`, `health`, `metrics`, `unknown`).
    pub api: &'static str,
    /// The HTTP status answered (a stream's is its first line's).
    pub status: u16,
}

/// A tenant's usage: `tenant` as [`crate::dispatch::Dispatcher::tenant_label`] names it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantRequestLabels {
    pub tenant: String,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantTokenLabels {
    pub tenant: String,
    /// `prompt` (cached ones included), `cached_prompt` or `completion`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: &'static str,
}

/// A worker record: its id is as registered (a label per record, bounded by the records in
/// etcd).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker_id: String,
    pub pool: &'static str,
}

/// Reused minus predicted cached prompt tokens: negative = the router expected more than the
/// worker reused (evicted since its last report, or still being prefilled for another request).
const PREFIX_ERROR_BUCKETS: [f64; 11] = [
    -4096.0, -1024.0, -256.0, -64.0, -1.0, 0.0, 63.0, 255.0, 1023.0, 4095.0, 16383.0,
];

/// How long a sync of the state directory's journal takes, seconds: a local SSD answers in
/// milliseconds, a network volume in tens, a throttled one in seconds.
const JOURNAL_SYNC_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

fn prefix_error_histogram() -> Histogram {
    Histogram::new(PREFIX_ERROR_BUCKETS)
}

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}

fn itl_histogram() -> WeightedHistogram {
    WeightedHistogram::new(ITL_BUCKETS)
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// One stream's token series (see [`RouterMetrics::stream`]).
#[derive(Clone)]
pub struct StreamMetrics {
    tokens_out: Counter,
    ttft: Histogram,
    inter_token: WeightedHistogram,
}

impl StreamMetrics {
    /// `tokens` arrived `gap` after the previous chunk (or after the request arrived, for the
    /// first chunk: then `first` is set and `gap` is the TTFT).
    pub fn tokens(&self, tokens: u32, gap: Duration, first: bool) {
        if tokens == 0 {
            return;
        }
        self.tokens_out.inc_by(u64::from(tokens));
        if first {
            self.ttft.observe(gap.as_secs_f64());
            return;
        }
        // A coalesced chunk of n tokens took `gap`: n gaps of gap/n each.
        let per_token = gap.as_secs_f64() / f64::from(tokens);
        self.inter_token.observe_n(per_token, u64::from(tokens));
    }
}

/// Every router metric, registered in the router's [`Metrics`].
#[derive(Clone)]
pub struct RouterMetrics {
    /// Requests ended, by `outcome`: `completed`, `cancelled`, `failed` (after placement),
    /// `shed` (`RESOURCE_EXHAUSTED`), `over_quota` (refused by the tenant's quota), `rejected`
    /// (invalid, unknown model, no worker).
    pub requests: Family<RequestLabels, Counter>,
    /// The same requests by tenant and outcome, and the tokens they used: what each tenant
    /// consumed (chargeback, quota sizing).
    pub tenant_requests: Family<TenantRequestLabels, Counter>,
    pub tenant_tokens: Family<TenantTokenLabels, Counter>,
    /// Placement decisions by `reason`: `home`, `home_affinity`, `spill_to_gpu`, `save_wse`,
    /// `borrow_wse` (placed), `queue` (no slot now: wait at the router), `unknown_model`,
    /// `no_worker`, `no_worker_for_lane`.
    pub route_decisions: Family<DecisionLabels, Counter>,
    pub ttft: Histograms<StreamLabels>,
    pub inter_token: Family<StreamLabels, WeightedHistogram, fn() -> WeightedHistogram>,
    pub tokens_out: Family<StreamLabels, Counter>,
    pub shed: Family<LaneLabels, Counter>,
    pub active_sessions: Gauge,
    /// Responses-API responses this replica keeps, and their bytes (see
    /// [`crate::response_store`]).
    pub stored_responses: Gauge,
    pub stored_response_bytes: Gauge,
    pub stored_conversations: Gauge,
    pub background_responses: Gauge,
    /// Batches (the Batch API) not yet ended on this replica.
    pub batches_running: Gauge,
    /// Bytes of the Batch API's files this replica keeps.
    pub batch_file_bytes: Gauge,
    /// Responses this replica holds as standby copies of other replicas' (see
    /// [`crate::response_store::mirror`]).
    pub standby_responses: Gauge,
    /// Other replicas' batches this replica keeps a standby copy of.
    pub standby_batches: Gauge,
    /// Batch requests sent, by how each try ended.
    pub batch_requests: Family<BatchRequestLabels, Counter>,
    /// Requests moved to another worker after theirs failed or left (`pool`: the lost worker's).
    pub failovers: Family<LanePoolLabels, Counter>,
    /// Prompt tokens placement expected the worker to find in its prefix cache.
    pub prefix_predicted: Family<PoolLabels, Counter>,
    /// Prompt tokens the worker reported reusing (`Usage.cached_prompt_tokens`).
    pub prefix_reused: Family<PoolLabels, Counter>,
    /// Per request: reused minus predicted.
    pub prefix_error: Family<PoolLabels, Histogram, fn() -> Histogram>,
    /// Requests refused by their tenant's quota, by `limit`: `max_in_flight`,
    /// `tokens_per_minute`, `token_budget`, `lanes`.
    pub quota_refusals: Family<QuotaLabels, Counter>,
    /// Calls refused for their API key (`--api-keys-file`), by reason and front door: a
    /// misconfigured client, or someone guessing keys.
    pub auth_refusals: Family<AuthRefusalLabels, Counter>,
    /// HTTP requests by API and status: which client APIs are in use, and how each fares.
    pub http_requests: Family<HttpRequestLabels, Counter>,
    /// gRPC requests (each of a `Session`'s, each `Generate` call) by API and the code they
    /// ended with.
    pub grpc_requests: Family<GrpcRequestLabels, Counter>,
    /// Handshakes to a worker refused because its certificate did not name the worker of its
    /// etcd record (TLS only), by the record's `worker_id` and `pool`.
    pub identity_rejections: Family<WorkerLabels, Counter>,
    /// Time requests waited at the router for a slot (only those that waited), by lane and
    /// outcome.
    pub queue_wait: Histograms<QueueLabels>,
    /// Generations moved to another worker on the router's order, by reason and pools.
    pub moves: Family<MoveLabels, Counter>,
    /// Hedged requests, by lane and winner.
    pub hedges: Family<HedgeLabels, Counter>,
    /// Prefill tokens the losing copies of hedged requests cost.
    pub hedge_wasted: Family<LaneLabels, Counter>,
    /// The hedge budget per lane (spent vs allowed).
    pub hedge_budget: Family<HedgeBudgetLabels, Gauge>,
    /// 1 for the state of the router's routing policy, 0 for the others: `current` (the
    /// stored document, or the built-in default when none is stored), `kept` (the stored
    /// document is invalid; the last valid one stays in force), `missing` (the stored document
    /// is invalid and the router has had no valid one since it started: it is not ready).
    pub policy_state: Family<StateLabels, Gauge>,
    /// 1 for the state of this replica's mirror of its stored responses (see
    /// [`crate::response_store::mirror`]): `off` (no cluster token, or no store), `alone` (no
    /// other replica to mirror to), `journaled` (no standby, but a journal in the state
    /// directory), `mirrored` (a standby keeps a copy), `failing` (there is a
    /// replica to mirror to, but the mirror does not hold: a killed replica would lose them).
    pub response_mirror: Family<StateLabels, Gauge>,
    /// The journal of stored responses in the state directory (mirror state `journaled`):
    /// bytes `written` to it, and of those the `unsynced` ones a host crash could lose.
    pub journal_bytes: Family<StateLabels, Gauge>,
    /// How long each sync of that journal to disk took: a host crash loses what was written
    /// in the last `--state-sync-interval` plus one sync.
    pub journal_sync: Histogram,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

/// The values of [`RouterMetrics::policy_state`]'s `state` label.
const POLICY_STATES: [&str; 3] = ["current", "kept", "missing"];
/// The values of [`RouterMetrics::response_mirror`]'s `state` label.
const MIRROR_STATES: [&str; 5] = ["off", "alone", "journaled", "mirrored", "failing"];

/// Sets `family` to 1 for `state` and 0 for the other `states`.
fn set_state(family: &Family<StateLabels, Gauge>, states: &[&'static str], state: &'static str) {
    for &each in states {
        family
            .get_or_create(&StateLabels { state: each })
            .set(i64::from(each == state));
    }
}

impl RouterMetrics {
    /// Sets [`Self::policy_state`]: 1 for `state` (one of `current`, `kept`, `missing`).
    pub fn set_policy_state(&self, state: &'static str) {
        set_state(&self.policy_state, &POLICY_STATES, state);
    }

    /// Sets [`Self::response_mirror`]: 1 for `state` (one of `off`, `alone`, `journaled`,
    /// `mirrored`, `failing`).
    pub fn set_response_mirror(&self, state: &'static str) {
        set_state(&self.response_mirror, &MIRROR_STATES, state);
    }

    /// Sets [`Self::journal_bytes`].
    pub fn set_journal_bytes(&self, written: u64, unsynced: u64) {
        for (state, bytes) in [("written", written), ("unsynced", unsynced)] {
            self.journal_bytes
                .get_or_create(&StateLabels { state })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// What [`Self::set_journal_bytes`] set last: (written, unsynced).
    pub fn journal_bytes(&self) -> (u64, u64) {
        let get = |state| {
            let bytes = self
                .journal_bytes
                .get_or_create(&StateLabels { state })
                .get();
            u64::try_from(bytes).unwrap_or(0)
        };
        (get("written"), get("unsynced"))
    }

    /// The state [`Self::set_response_mirror`] set last.
    pub fn response_mirror_state(&self) -> &'static str {
        MIRROR_STATES
            .into_iter()
            .find(|&state| {
                self.response_mirror
                    .get_or_create(&StateLabels { state })
                    .get()
                    == 1
            })
            .unwrap_or("off")
    }

    pub fn register(metrics: &Metrics) -> Self {
        let this = Self {
            requests: Family::default(),
            tenant_requests: Family::default(),
            tenant_tokens: Family::default(),
            route_decisions: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            inter_token: Family::new_with_constructor(itl_histogram),
            tokens_out: Family::default(),
            shed: Family::default(),
            active_sessions: Gauge::default(),
            stored_responses: Gauge::default(),
            stored_response_bytes: Gauge::default(),
            stored_conversations: Gauge::default(),
            background_responses: Gauge::default(),
            batches_running: Gauge::default(),
            batch_file_bytes: Gauge::default(),
            standby_responses: Gauge::default(),
            standby_batches: Gauge::default(),
            batch_requests: Family::default(),
            failovers: Family::default(),
            prefix_predicted: Family::default(),
            prefix_reused: Family::default(),
            quota_refusals: Family::default(),
            auth_refusals: Family::default(),
            http_requests: Family::default(),
            grpc_requests: Family::default(),
            prefix_error: Family::new_with_constructor(prefix_error_histogram),
            identity_rejections: Family::default(),
            queue_wait: Family::new_with_constructor(ttft_histogram),
            moves: Family::default(),
            hedges: Family::default(),
            hedge_wasted: Family::default(),
            hedge_budget: Family::default(),
            policy_state: Family::default(),
            response_mirror: Family::default(),
            journal_bytes: Family::default(),
            journal_sync: Histogram::new(JOURNAL_SYNC_BUCKETS),
        };
        // Every state is a series from the start, so an alert on `kept` or `missing` has one.
        for state in POLICY_STATES {
            this.policy_state
                .get_or_create(&StateLabels { state })
                .set(0);
        }
        this.set_response_mirror("off");
        this.set_journal_bytes(0, 0);
        metrics.register(|r| {
            r.register(
                "switchyard_router_requests",
                "Client requests ended, by lane, pool, model and outcome",
                this.requests.clone(),
            );
            r.register(
                "switchyard_router_tenant_requests",
                "Client requests ended, by tenant and outcome",
                this.tenant_requests.clone(),
            );
            r.register(
                "switchyard_router_tenant_tokens",
                "Tokens of each tenant's requests, by kind: prompt (cached included), \
                 cached_prompt, completion",
                this.tenant_tokens.clone(),
            );
            r.register(
                "switchyard_router_route_decisions",
                "Routing policy decisions, by lane, pool and reason",
                this.route_decisions.clone(),
            );
            r.register(
                "switchyard_router_ttft_seconds",
                "Time from a request's arrival at the router to its first token",
                this.ttft.clone(),
            );
            r.register(
                "switchyard_router_inter_token_seconds",
                "Gap between consecutive tokens forwarded to the client",
                this.inter_token.clone(),
            );
            r.register(
                "switchyard_router_tokens_out",
                "Tokens forwarded to clients",
                this.tokens_out.clone(),
            );
            r.register(
                "switchyard_router_shed",
                "Requests shed with RESOURCE_EXHAUSTED, by lane",
                this.shed.clone(),
            );
            r.register(
                "switchyard_router_quota_refusals",
                "Requests refused by their tenant's quota, by limit",
                this.quota_refusals.clone(),
            );
            r.register(
                "switchyard_router_auth_refusals",
                "Calls refused for their API key, by reason and front door",
                this.auth_refusals.clone(),
            );
            r.register(
                "switchyard_router_http_requests",
                "HTTP requests, by API (chat_completions, completions, responses, messages, \
                 count_tokens, tokenize, detokenize, models, health, metrics, unknown) and \
                 status",
                this.http_requests.clone(),
            );
            r.register(
                "switchyard_router_grpc_requests",
                "gRPC requests, by API (grpc_session: each request of a Session, grpc_generate: \
                 each Generate call) and the code each ended with (OK for a finished one)",
                this.grpc_requests.clone(),
            );
            r.register(
                "switchyard_router_policy_state",
                "The router's routing policy: 1 for its state (current, kept: the stored \
                 document is invalid and the last valid one stays in force, missing: the stored \
                 document is invalid and the router has none: not ready)",
                this.policy_state.clone(),
            );
            r.register(
                "switchyard_router_response_mirror",
                "State of this replica's mirror of its stored responses to a standby replica (1 \
                 for the current state): off, alone (no other replica), journaled (to its \
                 --state-dir), mirrored, failing (a killed replica would lose its stored \
                 responses)",
                this.response_mirror.clone(),
            );
            r.register(
                "switchyard_router_active_sessions",
                "Open gRPC Session streams",
                this.active_sessions.clone(),
            );
            r.register(
                "switchyard_router_stored_responses",
                "Responses-API responses this replica keeps (store: true) for previous_response_id \
                 and GET /v1/responses/{id}",
                this.stored_responses.clone(),
            );
            r.register(
                "switchyard_router_stored_conversations",
                "Conversations-API conversations this replica keeps (POST /v1/conversations), \
                 in the same memory as its stored responses",
                this.stored_conversations.clone(),
            );
            r.register(
                "switchyard_router_background_responses",
                "Background responses (background: true) running on this replica: a kill \
                 loses them, a drain lets them end",
                this.background_responses.clone(),
            );
            r.register(
                "switchyard_router_batches_running",
                "Batches (POST /v1/batches) not yet ended on this replica: validating, in \
                 progress, finalizing or being cancelled",
                this.batches_running.clone(),
            );
            r.register(
                "switchyard_router_batch_file_bytes",
                "Memory the Batch API's files (uploads and batch outputs) take on this \
                 replica, against --batch-store-bytes (uploads past it are refused)",
                this.batch_file_bytes.clone(),
            );
            r.register(
                "switchyard_router_stored_response_bytes",
                "Memory the stored responses and conversations take, against \
                 --response-store-bytes (when full, the oldest go)",
                this.stored_response_bytes.clone(),
            );
            r.register(
                "switchyard_router_standby_responses",
                "Other replicas' stored responses this replica keeps a copy of, to answer for \
                 them if their replica dies",
                this.standby_responses.clone(),
            );
            r.register(
                "switchyard_router_batch_requests",
                "Batch requests tried on this replica, by outcome: completed, failed (the \
                 answer is in the error file), waited (refused for want of room: 429, 503, no \
                 worker of the model; tried again after a backoff)",
                this.batch_requests.clone(),
            );
            r.register(
                "switchyard_router_standby_batches",
                "Other router replicas' batches this replica keeps a standby copy of (taken \
                 over, and run on, if their replica is killed)",
                this.standby_batches.clone(),
            );
            r.register(
                "switchyard_router_failovers",
                "Requests moved to another worker, by lane and the lost worker's pool",
                this.failovers.clone(),
            );
            r.register(
                "switchyard_router_prefix_predicted_tokens",
                "Prompt tokens placement predicted the chosen worker holds in its prefix cache",
                this.prefix_predicted.clone(),
            );
            r.register(
                "switchyard_router_prefix_reused_tokens",
                "Prompt tokens workers reported reusing from their prefix cache",
                this.prefix_reused.clone(),
            );
            r.register(
                "switchyard_router_prefix_prediction_error_tokens",
                "Per request, prompt tokens reused minus predicted",
                this.prefix_error.clone(),
            );
            r.register(
                "switchyard_router_queue_wait_seconds",
                "Time requests waited at the router for a worker slot, by lane and outcome (placed, shed, cancelled)",
                this.queue_wait.clone(),
            );
            r.register(
                "switchyard_router_moves",
                "Generations moved to another worker on the router's order (preempt, rebalance, drain), by reason and pools",
                this.moves.clone(),
            );
            r.register(
                "switchyard_router_hedges",
                "Latency-critical requests raced on a second worker, by lane and the copy that went on (primary, hedge)",
                this.hedges.clone(),
            );
            r.register(
                "switchyard_router_hedge_wasted_tokens",
                "Prefill tokens spent on the losing copies of hedged requests, by lane",
                this.hedge_wasted.clone(),
            );
            r.register(
                "switchyard_router_hedge_budget_tokens",
                "The hedge budget per lane: prefill tokens spent on hedges and allowed (budget_fraction x the lane's prompt tokens)",
                this.hedge_budget.clone(),
            );
            r.register(
                "switchyard_router_journal_bytes",
                "The journal of stored responses in --state-dir (mirror state journaled): bytes written, and of those unsynced (a host crash could lose them)",
                this.journal_bytes.clone(),
            );
            r.register(
                "switchyard_router_journal_sync_seconds",
                "How long each sync of the --state-dir journal to disk took (a host crash loses at most --state-sync-interval plus one sync of changes)",
                this.journal_sync.clone(),
            );
            r.register(
                "switchyard_router_worker_identity_rejections",
                "Worker links refused because the certificate served at a record's address does not name the record's worker, by the record's worker_id and pool",
                this.identity_rejections.clone(),
            );
        });
        this.zero_known_series();
        this
    }

    /// Creates, at 0, the series of events an on-call engineer alerts on (sheds, failovers,
    /// moves, waits at the router, hedges): an alert on their rate must see 0 from the start,
    /// not "no data" until the first one happens.
    fn zero_known_series(&self) {
        const POOLS: [Pool; 2] = [Pool::Gpu, Pool::Wse];
        for lane in LaneName::ALL {
            let lane = lane_label(lane);
            let _ = self.shed.get_or_create(&LaneLabels { lane });
            let _ = self.hedge_wasted.get_or_create(&LaneLabels { lane });
            for winner in ["primary", "hedge"] {
                let _ = self.hedges.get_or_create(&HedgeLabels { lane, winner });
            }
            for outcome in ["placed", "shed", "cancelled"] {
                let _ = self
                    .queue_wait
                    .get_or_create(&QueueLabels { lane, outcome });
            }
            for pool in POOLS {
                let pool = pool_label(Some(pool));
                let _ = self.failovers.get_or_create(&LanePoolLabels { lane, pool });
            }
        }
        for reason in MoveReason::ALL {
            for (from, to) in POOLS.into_iter().flat_map(|f| POOLS.map(|t| (f, t))) {
                let _ = self.moves.get_or_create(&MoveLabels {
                    reason: reason.as_str(),
                    from_pool: pool_label(Some(from)),
                    to_pool: pool_label(Some(to)),
                });
            }
        }
    }

    /// A throwaway set (tests, tools that run a dispatcher without serving metrics).
    pub fn unregistered() -> Self {
        Self::register(&Metrics::new())
    }

    pub fn request(&self, lane: LaneName, pool: Option<Pool>, model: &str, outcome: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                lane: lane_label(lane),
                pool: pool_label(pool),
                model: model.to_string(),
                outcome,
            })
            .inc();
    }

    /// A request of `tenant` ended with `outcome`, having used `usage`'s tokens.
    pub fn tenant_usage(&self, tenant: String, outcome: &'static str, usage: &v1::Usage) {
        for (kind, tokens) in [
            ("prompt", usage.prompt_tokens),
            ("cached_prompt", usage.cached_prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            if tokens > 0 {
                self.tenant_tokens
                    .get_or_create(&TenantTokenLabels {
                        tenant: tenant.clone(),
                        kind,
                    })
                    .inc_by(u64::from(tokens));
            }
        }
        self.tenant_requests
            .get_or_create(&TenantRequestLabels { tenant, outcome })
            .inc();
    }

    pub fn decision(&self, lane: LaneName, pool: Option<Pool>, reason: &'static str) {
        self.route_decisions
            .get_or_create(&DecisionLabels {
                lane: lane_label(lane),
                pool: pool_label(pool),
                reason,
            })
            .inc();
    }

    /// `tokens` arrived `gap` after the previous chunk (or after the request arrived, for the
    /// first chunk: then `first` is set and `gap` is the TTFT).
    /// The token series of one stream's labels, resolved once: a request forwards many chunks,
    /// and looking its labels up for each one (hashing the model name) costs more than the
    /// counting.
    pub fn stream(&self, labels: &StreamLabels) -> StreamMetrics {
        StreamMetrics {
            tokens_out: self.tokens_out.get_or_create(labels).clone(),
            ttft: self.ttft.get_or_create(labels).clone(),
            inter_token: self.inter_token.get_or_create(labels).clone(),
        }
    }

    /// Every series at 0 from the start, so a rate alert reads 0, not "no data".
    pub fn count_auth_refusals(&self) {
        for door in ["grpc", "http"] {
            for error in crate::auth::AuthError::ALL {
                let _ = self.auth_refusals.get_or_create(&AuthRefusalLabels {
                    reason: error.label(),
                    door,
                });
            }
        }
    }

    /// An HTTP request to `api` answered with `status`.
    pub fn http_answered(&self, api: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&HttpRequestLabels { api, status })
            .inc();
    }

    /// A batch request's try ended with `outcome` (see [`BatchRequestLabels`]).
    pub fn batch_request(&self, outcome: &'static str) {
        self.batch_requests
            .get_or_create(&BatchRequestLabels { outcome })
            .inc();
    }

    /// A gRPC request of `api` ended with `code`.
    pub fn grpc_answered(&self, api: &'static str, code: tonic::Code) {
        self.grpc_requests
            .get_or_create(&GrpcRequestLabels {
                api,
                code: grpc_code_label(code),
            })
            .inc();
    }

    /// A call refused at `door` (`grpc`, `http`) for its API key.
    pub fn auth_refused(&self, door: &'static str, error: &crate::auth::AuthError) {
        self.auth_refusals
            .get_or_create(&AuthRefusalLabels {
                reason: error.label(),
                door,
            })
            .inc();
    }

    pub fn quota_refused(&self, limit: &'static str) {
        self.quota_refusals
            .get_or_create(&QuotaLabels { limit })
            .inc();
    }

    /// A request that waited at the router `waited`, then was `placed`, `shed` or
    /// `cancelled`.
    pub fn queued(&self, lane: LaneName, waited: Duration, outcome: &'static str) {
        self.queue_wait
            .get_or_create(&QueueLabels {
                lane: lane_label(lane),
                outcome,
            })
            .observe(waited.as_secs_f64());
    }

    /// A generation moved from a `from` worker to a `to` one for `reason`.
    pub fn moved(&self, reason: &'static str, from: Pool, to: Pool) {
        self.moves
            .get_or_create(&MoveLabels {
                reason,
                from_pool: pool_label(Some(from)),
                to_pool: pool_label(Some(to)),
            })
            .inc();
    }

    pub fn hedged(&self, lane: LaneName, winner: &'static str) {
        self.hedges
            .get_or_create(&HedgeLabels {
                lane: lane_label(lane),
                winner,
            })
            .inc();
    }

    pub fn hedge_wasted(&self, lane: LaneName, tokens: u64) {
        self.hedge_wasted
            .get_or_create(&LaneLabels {
                lane: lane_label(lane),
            })
            .inc_by(tokens);
    }

    pub fn hedge_budget(&self, lane: LaneName, spent: u64, allowed: u64) {
        for (kind, tokens) in [("spent", spent), ("allowed", allowed)] {
            self.hedge_budget
                .get_or_create(&HedgeBudgetLabels {
                    lane: lane_label(lane),
                    kind,
                })
                .set(i64::try_from(tokens).unwrap_or(i64::MAX));
        }
    }

    pub fn shed(&self, lane: LaneName) {
        self.shed
            .get_or_create(&LaneLabels {
                lane: lane_label(lane),
            })
            .inc();
    }

    /// A request finished on a `pool` worker that was predicted to hold `predicted` of its
    /// prompt tokens and reported reusing `reused`. Requests where both are 0 (no cache in
    /// play) are not counted, so the error histogram describes cache-guided placements.
    pub fn prefix_reuse(&self, pool: Pool, predicted: u32, reused: u32) {
        if predicted == 0 && reused == 0 {
            return;
        }
        let labels = PoolLabels {
            pool: pool_label(Some(pool)),
        };
        self.prefix_predicted
            .get_or_create(&labels)
            .inc_by(u64::from(predicted));
        self.prefix_reused
            .get_or_create(&labels)
            .inc_by(u64::from(reused));
        self.prefix_error
            .get_or_create(&labels)
            .observe(f64::from(reused) - f64::from(predicted));
    }

    pub fn failover(&self, lane: LaneName, pool: Pool) {
        self.failovers
            .get_or_create(&LanePoolLabels {
                lane: lane_label(lane),
                pool: pool_label(Some(pool)),
            })
            .inc();
    }
}

/// Decrements the active-session gauge when the session ends, however it ends.
pub struct SessionGuard(Gauge);

impl SessionGuard {
    pub fn open(metrics: &RouterMetrics) -> Self {
        metrics.active_sessions.inc();
        Self(metrics.active_sessions.clone())
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_count_tokens_and_split_gaps() {
        let metrics = Metrics::new();
        let router = RouterMetrics::register(&metrics);
        let labels = StreamLabels {
            lane: "cost_sensitive",
            pool: "gpu",
            model: "m".into(),
        };
        let stream = router.stream(&labels);
        stream.tokens(1, Duration::from_millis(30), true);
        stream.tokens(4, Duration::from_millis(8), false);
        stream.tokens(0, Duration::from_millis(8), false);
        let text = metrics.encode();
        let series = "{lane=\"cost_sensitive\",pool=\"gpu\",model=\"m\"}";
        assert!(
            text.contains(&format!("switchyard_router_tokens_out_total{series} 5")),
            "{text}"
        );
        assert!(
            text.contains(&format!("switchyard_router_ttft_seconds_count{series} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "switchyard_router_inter_token_seconds_count{series} 4"
            )),
            "{text}"
        );
        // 2 ms per token falls in the 2.5 ms bucket, not the 1 ms one.
        assert!(
            text.contains(
                "switchyard_router_inter_token_seconds_bucket{le=\"0.001\",lane=\"cost_sensitive\",pool=\"gpu\",model=\"m\"} 0"
            ),
            "{text}"
        );
    }

    #[test]
    fn alerting_series_exist_at_zero_before_anything_happens() {
        let metrics = Metrics::new();
        let _router = RouterMetrics::register(&metrics);
        let text = metrics.encode();
        for series in [
            "switchyard_router_shed_total{lane=\"latency_critical\"} 0",
            "switchyard_router_failovers_total{lane=\"cost_sensitive\",pool=\"wse\"} 0",
            "switchyard_router_moves_total{reason=\"preempt\",from_pool=\"wse\",to_pool=\"gpu\"} 0",
            "switchyard_router_queue_wait_seconds_count{lane=\"latency_critical\",outcome=\"shed\"} 0",
            "switchyard_router_hedges_total{lane=\"latency_critical\",winner=\"hedge\"} 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }

    #[test]
    fn prefix_reuse_counts_predicted_reused_and_the_error() {
        let metrics = Metrics::new();
        let router = RouterMetrics::register(&metrics);
        router.prefix_reuse(Pool::Gpu, 480, 448);
        router.prefix_reuse(Pool::Gpu, 0, 0);
        router.prefix_reuse(Pool::Gpu, 0, 64);
        let text = metrics.encode();
        for expected in [
            "switchyard_router_prefix_predicted_tokens_total{pool=\"gpu\"} 480",
            "switchyard_router_prefix_reused_tokens_total{pool=\"gpu\"} 512",
            "switchyard_router_prefix_prediction_error_tokens_count{pool=\"gpu\"} 2",
            "switchyard_router_prefix_prediction_error_tokens_bucket{le=\"-1.0\",pool=\"gpu\"} 1",
        ] {
            assert!(text.contains(expected), "missing {expected} in\n{text}");
        }
    }

    #[test]
    fn session_gauge_follows_guards() {
        let router = RouterMetrics::unregistered();
        let a = SessionGuard::open(&router);
        let b = SessionGuard::open(&router);
        assert_eq!(router.active_sessions.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(router.active_sessions.get(), 0);
    }
}
