//! The per-request dispatcher: validates and places a request, starts it on a worker, forwards
//! its tokens to the client with gap-free sequence numbers, and handles `Cancel`, `Interrupt`
//! (stop, then continue the same request with new instructions, on the same worker when
//! possible) and failover (another worker resumes after the tokens the client already has).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_cluster::Pool;
use switchyard_cluster::telemetry::propagation::{self, RemoteContext};
use switchyard_proto::v1::{self, server_frame::Frame, worker_frame};
use switchyard_proto::{RequestLimits, validate_generate_request};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::field::Empty;
use tracing::{Instrument as _, Span, debug, info, info_span, warn};

use crate::classify::{Classification, RequestFeatures, TENANT_KEY, classify};
use crate::config::RouterConfig;
use crate::error::DispatchError;
use crate::links::{Link, LinkEvent, Links, SlotHold};
use crate::metrics::{RouterMetrics, StreamLabels, lane_label, pool_label};
use crate::policy::document::{LaneName, PolicyDocument};
use crate::policy::{
    Admission, ClusterView, Considered, Decision, PlacementError, RequestInfo, admit, fallback,
    place_traced, stable_hash,
};
use crate::policy_watch::PolicyHandle;
use crate::readiness::Readiness;
use crate::report::{self, Ended, LedgerEntry, Reporter, ledger};
use crate::tenant_quota::{QuotaExceeded, TenantPermit, TenantQuota, restrict_lane};

/// A client's instruction about a running request.
#[derive(Debug)]
pub enum Control {
    Cancel,
    Interrupt(v1::Interrupt),
}

/// Shared by every request the router handles.
pub struct Dispatcher {
    pub links: Arc<Links>,
    pub config: RouterConfig,
    pub policy: PolicyHandle,
    pub metrics: RouterMetrics,
    /// Whether the router can route yet (see [`Readiness`]).
    pub readiness: Readiness,
    /// Decision and outcome reports to the control plane (disabled until set).
    pub reports: Reporter,
    waiting: Arc<Mutex<Waiting>>,
    /// Held for one placement decision (see [`Dispatcher::try_place`]).
    deciding: Mutex<()>,
    tenant_quota: TenantQuota,
    next_seed: AtomicU64,
}

/// Requests waiting at the router for a slot, per lane (bounded by the policy's admission).
#[derive(Default)]
struct Waiting {
    lanes: [VecDeque<(u64, oneshot::Sender<()>)>; 2],
    next_ticket: u64,
}

/// A place in a lane's router queue. Dropping it leaves the queue.
pub struct Ticket {
    waiting: Arc<Mutex<Waiting>>,
    id: u64,
    lane: LaneName,
    evicted: oneshot::Receiver<()>,
    deadline: Instant,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().expect("waiting lock");
        waiting.lanes[self.lane.index()].retain(|(id, _)| *id != self.id);
    }
}

/// A worker chosen for a request.
struct Chosen {
    link: Arc<Link>,
    /// The placement's reason (`Accepted.reason`).
    reason: String,
    /// The same as a label (`home`, `spill_to_gpu`, …).
    reason_label: &'static str,
    predicted_ttft_ms: f64,
    /// What the policy scored, for a sampled decision report (empty otherwise).
    candidates: Vec<v1::RoutingCandidate>,
    /// Prompt tokens the prefix index expects the worker to reuse.
    cached_tokens: u32,
    /// The alternatives the policy scored, for the counterfactual ledger (empty when no
    /// control plane is listening).
    alternatives: ledger::Basis,
    /// The worker's slot, held until the request's start is sent.
    slot: SlotHold,
}

/// Where a prepared request will run.
enum Target {
    Placed(Chosen),
    /// No slot now: it waits at the router (admitted by the policy).
    Queued(Ticket),
}

/// A validated, classified request, placed or admitted to wait, ready to run.
pub struct Prepared {
    request: v1::GenerateRequest,
    /// The prompt as the workers' token ids (chat template applied), tokenized once when
    /// prepared; empty when the router has no tokenizer for the model. Sent in
    /// `WorkerStart.prompt_token_ids`, its length is the exact prompt token count, and it is
    /// looked up in the prefix index.
    prompt_ids: Vec<u32>,
    class: Classification,
    target: Target,
    arrived: Instant,
    /// The request's span, carrying the routing decision.
    span: Span,
    /// Its decision and outcome are reported to the control plane (see [`Reporter::sample`]).
    sampled: bool,
    held: Held,
}

impl Prepared {
    /// Calls `end` when the request ends, just before its last frame goes out (or when it
    /// stops without one: the client went away).
    pub fn on_end(&mut self, end: impl FnOnce() + Send + 'static) {
        self.held.on_end = Some(Box::new(end));
    }
}

/// What a request holds until it ends: its place in its tenant's quota and whatever its caller
/// must learn of the end (a session's count of running requests). Given back just *before* the
/// request's last frame is sent, so a client that has seen the end may start another request
/// at once without meeting a limit the ended one still held.
#[derive(Default)]
struct Held {
    quota: Option<TenantPermit>,
    on_end: Option<Box<dyn FnOnce() + Send>>,
}

impl Held {
    /// Gives everything back, charging the tenant `used_tokens` when known.
    fn release(&mut self, used_tokens: Option<u64>) {
        if let Some(mut quota) = self.quota.take()
            && let Some(used) = used_tokens
        {
            quota.charge(used);
        }
        if let Some(end) = self.on_end.take() {
            end();
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.release(None);
    }
}

/// The router's span of one request. The routing decision is recorded on it — `lane` (and the
/// classifier's reason) when classified, `pool`, `worker` and the full `reason` when placed —
/// so a trace shows where a request ran and why.
pub fn request_span(request_id: &str, model: &str) -> Span {
    info_span!(
        "router.request",
        otel.kind = "server",
        request_id,
        model,
        lane = Empty,
        pool = Empty,
        worker = Empty,
        reason = Empty,
        predicted_cached_tokens = Empty,
        cached_tokens = Empty
    )
}

/// Records a placement on a request span (see [`request_span`]).
pub fn record_decision(span: &Span, lane: &str, pool: &str, worker: &str, reason: &str) {
    span.record("lane", lane);
    span.record("pool", pool);
    span.record("worker", worker);
    span.record("reason", reason);
}

pub type FrameSink = mpsc::Sender<Result<v1::ServerFrame, Status>>;

impl Dispatcher {
    pub fn limits(&self) -> &RequestLimits {
        &self.config.limits
    }

    /// A dispatcher over `links`, routing by the policy `policy` follows.
    pub fn new(
        links: Arc<Links>,
        config: RouterConfig,
        policy: PolicyHandle,
        metrics: RouterMetrics,
    ) -> Self {
        Self {
            tenant_quota: TenantQuota::new(config.max_tenant_requests),
            links,
            config,
            policy,
            metrics,
            readiness: Readiness::ready(),
            reports: Reporter::disabled(),
            waiting: Arc::new(Mutex::new(Waiting::default())),
            deciding: Mutex::new(()),
            next_seed: AtomicU64::new(0),
        }
    }

    /// Requests waiting at the router per lane, for the reports' stats.
    pub fn queue_depth_probe(&self) -> impl Fn() -> [u32; 2] + Send + Sync + 'static {
        let waiting = self.waiting.clone();
        move || {
            let waiting = waiting.lock().expect("waiting lock");
            [waiting.lanes[0].len() as u32, waiting.lanes[1].len() as u32]
        }
    }

    /// Validates, classifies and places `request`, or admits it to wait at the router for a
    /// slot. Errors carry the status the client gets (`RESOURCE_EXHAUSTED` with `retry-after`
    /// metadata when shed). The request's span continues the trace in `parent` (the call's
    /// headers), or in the request's own `traceparent` metadata entry, which wins: one
    /// session carries requests of many traces.
    pub fn prepare(
        &self,
        request: v1::GenerateRequest,
        parent: RemoteContext,
    ) -> Result<Prepared, DispatchError> {
        let arrived = Instant::now();
        let span = request_span(&request.request_id, &request.model);
        let parent = match RemoteContext::from_map(&request.metadata) {
            own if own.is_valid() => own,
            _ => parent,
        };
        propagation::set_parent(&span, parent);
        let policy = self.policy.current();
        let valid =
            validate_generate_request(&request, &self.config.limits).map_err(DispatchError::from);
        let prompt_ids = match valid {
            Ok(()) => self
                .links
                .tokenizers()
                .tokenize(&request)
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut features = RequestFeatures::of(&request);
        if !prompt_ids.is_empty() {
            features.prompt_tokens = token_count(&prompt_ids);
        }
        let mut class = classify(&features, &policy);
        span.record("lane", class.lane.as_str());
        span.record("reason", class.reason.as_str());
        let sampled = self.reports.sample();
        let tenant = request
            .metadata
            .get(TENANT_KEY)
            .map(String::as_str)
            .filter(|t| !t.is_empty());
        let limits = tenant
            .map(|t| policy.quotas.limits_of(t))
            .unwrap_or_default();
        let mut quota = None;
        let prepared = valid.and_then(|()| self.readiness.check()).and_then(|()| {
            if let Some(tenant) = tenant {
                class = restrict_lane(
                    tenant,
                    &limits,
                    class.clone(),
                    &policy,
                    features.ttft_slo_ms,
                )
                .map_err(|refused| self.quota_refused(refused))?;
            }
            let reserve = u64::from(features.prompt_tokens) + u64::from(features.max_tokens);
            quota = self
                .tenant_quota
                .acquire(tenant, &limits, reserve)
                .map_err(|refused| self.quota_refused(refused))?;
            span.record("lane", class.lane.as_str());
            span.record("reason", class.reason.as_str());
            match self.try_place(&request, &prompt_ids, &class, &policy, &[], sampled)? {
                Some(chosen) => Ok(Target::Placed(chosen)),
                None => Ok(Target::Queued(
                    self.admit(class.lane, &policy).inspect_err(|error| {
                        span.record("reason", format!("{}; shed: {error}", class.reason));
                    })?,
                )),
            }
        });
        match prepared {
            Ok(target) => Ok(Prepared {
                request,
                prompt_ids,
                class,
                target,
                arrived,
                span,
                sampled,
                held: Held {
                    quota,
                    on_end: None,
                },
            }),
            Err(error) => {
                let refusal = Refusal::of(&error);
                self.count_unplaced(class.lane, &request.model, refusal);
                self.report_unplaced(
                    &request,
                    &class,
                    &prompt_ids,
                    (&error, refusal),
                    sampled,
                    arrived,
                );
                span.in_scope(
                    || info!(request_id = %request.request_id, code = ?error.code(), "refused"),
                );
                Err(error)
            }
        }
    }

    /// A request its tenant's quota refused, counted by the limit.
    fn quota_refused(&self, refused: QuotaExceeded) -> DispatchError {
        self.metrics.quota_refused(refused.limit.as_str());
        DispatchError::OverQuota(refused)
    }

    /// Counts a request that never reached a worker.
    fn count_unplaced(&self, lane: LaneName, model: &str, refusal: Refusal) {
        if refusal == Refusal::Shed {
            self.metrics.shed(lane);
        }
        // An unknown model is the client's word, not ours: keep it out of the label values.
        let model = if refusal == Refusal::Invalid {
            ""
        } else {
            model
        };
        self.metrics.request(lane, None, model, refusal.as_str());
    }

    /// Reports a request that never reached a worker (shed or refused).
    fn report_unplaced(
        &self,
        request: &v1::GenerateRequest,
        class: &Classification,
        prompt_ids: &[u32],
        (error, refusal): (&DispatchError, Refusal),
        sampled: bool,
        arrived: Instant,
    ) {
        let shed = refusal == Refusal::Shed;
        let label = if shed { "shed" } else { "rejected" };
        if sampled {
            let mut decision =
                decision_record(self.reports.router_id(), request, class, prompt_ids);
            decision.reason = label.into();
            decision.reason_text = format!("{}; {label}: {error}", class.reason);
            decision.queued_ms = arrived.elapsed().as_secs_f64() * 1e3;
            self.reports.decision(decision);
        }
        self.reports.ended(Ended {
            lane: class.lane,
            outcome: v1::RequestOutcome {
                request_id: request.request_id.clone(),
                at_unix_ms: report::now_unix_ms(),
                status: label.into(),
                total_ms: arrived.elapsed().as_secs_f64() * 1e3,
                prompt_tokens: token_count(prompt_ids),
                error: error.to_string(),
                ..Default::default()
            },
            cancelled: false,
            shed,
            sampled,
            ledger: None,
        });
    }

    /// One placement attempt: `Ok(None)` when the request must wait for a slot.
    /// `prompt_ids` (empty = not tokenized) give the exact prompt token count and are looked up
    /// in the prefix index. With `trace`, the candidates the policy scored come back in
    /// [`Chosen::candidates`].
    fn try_place(
        &self,
        request: &v1::GenerateRequest,
        prompt_ids: &[u32],
        class: &Classification,
        policy: &PolicyDocument,
        excluded: &[String],
        trace: bool,
    ) -> Result<Option<Chosen>, DispatchError> {
        // One decision at a time, each holding its worker's slot before the next looks: a
        // burst of concurrent requests must not all see the same free worker.
        let _deciding = self.deciding.lock().expect("deciding lock");
        let view = self.links.view();
        let prefix = (!prompt_ids.is_empty()).then(|| self.prefix_hits(&view, prompt_ids));
        let mut info = self.request_info(request);
        if let Some(hits) = &prefix {
            debug!(request_id = %request.request_id, ?hits, prompt_tokens = prompt_ids.len(), "prefix index looked up");
            info.prompt_tokens = prompt_ids.len() as u32;
            info.prefix = Some(hits);
        }
        let exclude = excluded_indices(&view, excluded);
        let mut considered = Vec::new();
        // The ledger judges every decision while a control plane listens (not only sampled
        // ones); without one this costs nothing.
        let judge = self.reports.connected();
        let mut alternatives = ledger::Alternatives::default();
        let mut record = |c: Considered| {
            if judge {
                let price = view.worker(c.worker).cost_per_mtok;
                alternatives.consider(c.worker, c.predicted_ttft_ms, c.meets_slo, price);
            }
            if trace {
                considered.push(c);
            }
        };
        let decision = match place_traced(&view, class, &info, policy, &exclude, &mut record) {
            // A model this router has seen served, with no worker right now (its workers are
            // restarting or unreachable): retry later, it is not an unknown model.
            Decision::Reject(PlacementError::UnknownModel(model))
                if self.links.has_served(&model) =>
            {
                Decision::Reject(PlacementError::NoWorker(model))
            }
            decision => decision,
        };
        let (pool, reason) = match &decision {
            Decision::Place(placement) => (Some(placement.pool), placement.reason_label()),
            Decision::Queue => (None, "queue"),
            Decision::Reject(PlacementError::UnknownModel(_)) => (None, "unknown_model"),
            Decision::Reject(PlacementError::NoWorker(_)) => (None, "no_worker"),
        };
        self.metrics.decision(class.lane, pool, reason);
        match decision {
            Decision::Place(placement) => {
                let (fastest, cheapest) = alternatives.excluding(placement.worker);
                let alternatives = ledger::Basis {
                    best_alternative: fastest.map(|(w, ms)| (view.worker(w).id.clone(), ms)),
                    cheapest_meeting_slo_per_mtok: cheapest,
                };
                let id = &view.worker(placement.worker).id;
                let link = self
                    .links
                    .get(id)
                    .ok_or_else(|| DispatchError::Unavailable(format!("worker {id} just left")))?;
                Ok(Some(Chosen {
                    slot: link.hold_slot(),
                    link,
                    reason: placement.reason(),
                    reason_label: placement.reason_label(),
                    predicted_ttft_ms: placement.predicted_ttft_ms,
                    candidates: candidates(&view, considered),
                    cached_tokens: placement.cached_tokens,
                    alternatives,
                }))
            }
            Decision::Queue => Ok(None),
            Decision::Reject(error) => Err(placement_error(error)),
        }
    }

    fn request_info<'r>(&self, request: &'r v1::GenerateRequest) -> RequestInfo<'r> {
        let features = RequestFeatures::of(request);
        RequestInfo {
            model: &request.model,
            prompt_tokens: features.prompt_tokens,
            affinity: crate::affinity::affinity_of(request),
            seed: stable_hash(&request.request_id) ^ self.next_seed.fetch_add(1, Ordering::Relaxed),
            prefix: None,
        }
    }

    /// The workers of `view` holding a prefix of the prompt, as (view index, cached tokens).
    fn prefix_hits(&self, view: &ClusterView, prompt_ids: &[u32]) -> Vec<(usize, u32)> {
        self.links
            .prefix_lookup(prompt_ids)
            .into_iter()
            .filter_map(|hit| Some((view.index_of(&hit.worker)?, hit.cached_tokens)))
            .collect()
    }

    /// Lets a request of `lane` wait at the router (shedding a queued cost-sensitive request
    /// in its place if the policy says so), or sheds it.
    fn admit(&self, lane: LaneName, policy: &PolicyDocument) -> Result<Ticket, DispatchError> {
        let mut waiting = self.waiting.lock().expect("waiting lock");
        let depths = [waiting.lanes[0].len() as u32, waiting.lanes[1].len() as u32];
        match admit(lane, depths, policy) {
            Admission::Queue => {}
            Admission::QueueEvicting(victim) => {
                if let Some((_, evict)) = waiting.lanes[victim.index()].pop_back() {
                    let _ = evict.send(());
                }
            }
            Admission::Shed { retry_after_ms } => {
                return Err(DispatchError::Shed {
                    message: format!("{} queue is full; request shed", lane.as_str()),
                    retry_after_ms,
                });
            }
        }
        let (tx, evicted) = oneshot::channel();
        waiting.next_ticket += 1;
        let id = waiting.next_ticket;
        waiting.lanes[lane.index()].push_back((id, tx));
        let wait = Duration::from_secs_f64(policy.lane(lane).max_queue_wait_ms / 1e3);
        Ok(Ticket {
            waiting: self.waiting.clone(),
            id,
            lane,
            evicted,
            deadline: Instant::now() + wait,
        })
    }

    /// Waits at the router until the policy places the request, it is evicted by a
    /// latency-critical request, or its lane's queue wait runs out.
    async fn wait_for_slot(
        &self,
        request: &v1::GenerateRequest,
        prompt_ids: &[u32],
        class: &Classification,
        ticket: &mut Ticket,
        trace: bool,
    ) -> Result<Chosen, DispatchError> {
        let policy = self.policy.current();
        let retry_after_ms = policy.lane(class.lane).retry_after_ms;
        loop {
            // Interim (replaced by the placement task): poll.
            let notified = tokio::time::sleep(Duration::from_millis(5));
            tokio::pin!(notified);
            // Latency-critical work waiting at the router goes first.
            let ahead = class.lane == LaneName::CostSensitive
                && !self.waiting.lock().expect("waiting lock").lanes[0].is_empty();
            if !ahead
                && let Some(placed) = self.try_place(
                    request,
                    prompt_ids,
                    class,
                    &self.policy.current(),
                    &[],
                    trace,
                )?
            {
                return Ok(placed);
            }
            tokio::select! {
                _ = notified => {}
                _ = &mut ticket.evicted => {
                    return Err(DispatchError::Shed { message: "shed to make room for latency-critical work".into(), retry_after_ms });
                }
                _ = tokio::time::sleep_until(ticket.deadline) => {
                    return Err(DispatchError::Shed { message: format!(
                        "no slot within the {} lane's queue wait of {} ms; request shed",
                        class.lane.as_str(), policy.lane(class.lane).max_queue_wait_ms
                    ), retry_after_ms });
                }
            }
        }
    }

    /// Runs a prepared request to its end, writing its frames to `out`. `controls` carries the
    /// client's Cancel/Interrupt frames; when it closes, the request simply runs on. A closed
    /// `out` (client gone) cancels the generation.
    pub async fn run(
        &self,
        prepared: Prepared,
        controls: mpsc::UnboundedReceiver<Control>,
        out: FrameSink,
    ) {
        let span = prepared.span.clone();
        self.run_in_span(prepared, controls, out)
            .instrument(span)
            .await
    }

    async fn run_in_span(
        &self,
        prepared: Prepared,
        mut controls: mpsc::UnboundedReceiver<Control>,
        out: FrameSink,
    ) {
        let Prepared {
            request,
            prompt_ids,
            class,
            target,
            arrived,
            span,
            sampled,
            mut held,
        } = prepared;
        let placed = match target {
            Target::Placed(chosen) => Ok(chosen),
            Target::Queued(mut ticket) => {
                let placed = tokio::select! {
                    placed = self.wait_for_slot(&request, &prompt_ids, &class, &mut ticket, sampled) => placed,
                    _ = out.closed() => return,
                };
                // Leave the router queue before running.
                drop(ticket);
                placed
            }
        };
        let chosen = match placed {
            Ok(chosen) => chosen,
            Err(error) => {
                span.record("reason", format!("{}; shed: {error}", class.reason));
                info!(request_id = %request.request_id, lane = class.lane.as_str(), %error, "not placed");
                let refusal = Refusal::of(&error);
                self.count_unplaced(class.lane, &request.model, refusal);
                self.report_unplaced(
                    &request,
                    &class,
                    &prompt_ids,
                    (&error, refusal),
                    sampled,
                    arrived,
                );
                held.release(None);
                let _ = out.send(Ok(error.failed_frame(&request.request_id))).await;
                return;
            }
        };
        let link = chosen.link.clone();
        if sampled {
            let record = link.record();
            let mut decision =
                decision_record(self.reports.router_id(), &request, &class, &prompt_ids);
            decision.worker_id = record.id;
            decision.pool = record.pool.to_string();
            decision.reason = chosen.reason_label.into();
            decision.reason_text = format!("{}; {}", class.reason, chosen.reason);
            decision.predicted_ttft_ms = chosen.predicted_ttft_ms;
            decision.queued_ms = arrived.elapsed().as_secs_f64() * 1e3;
            decision.candidates = chosen.candidates.clone();
            self.reports.decision(decision);
        }
        let mut run = Run::new(request, prompt_ids, class, arrived, chosen, span, self);
        run.held = held;
        run.on_worker(&link.record());
        let result = run.drive(link, &mut controls, &out).await;
        let outcome = match &result {
            Ok(()) if run.cancelled => "cancelled",
            Ok(()) => "completed",
            Err(error) if error.code() == Code::Cancelled => "cancelled",
            Err(_) => "failed",
        };
        run.release();
        self.metrics
            .request(run.class.lane, Some(run.pool), &run.request.model, outcome);
        run.report(outcome, result.as_ref().err(), sampled);
        if let Err(error) = result {
            let _ = out
                .send(Ok(error.failed_frame(&run.request.request_id)))
                .await;
        }
    }
}

/// Why a request never reached a worker, as metrics and reports count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// `RESOURCE_EXHAUSTED` from admission: the cluster is full.
    Shed,
    /// Refused by the tenant's quota: the tenant is over its limits, not the cluster.
    OverQuota,
    /// An invalid request or an unknown model: the client's mistake.
    Invalid,
    /// Any other refusal (no worker, not ready).
    Rejected,
}

impl Refusal {
    fn of(error: &DispatchError) -> Self {
        match error {
            DispatchError::OverQuota(_) => Refusal::OverQuota,
            DispatchError::Shed { .. } => Refusal::Shed,
            DispatchError::Invalid { .. } | DispatchError::UnknownModel(_) => Refusal::Invalid,
            _ => Refusal::Rejected,
        }
    }

    /// The `outcome` label.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Shed => "shed",
            Refusal::OverQuota => "over_quota",
            Refusal::Invalid | Refusal::Rejected => "rejected",
        }
    }
}

/// A prompt's token count for placement and classification.
fn token_count(prompt_ids: &[u32]) -> u32 {
    u32::try_from(prompt_ids.len()).unwrap_or(u32::MAX)
}

/// A decision report's request part (lane, its origin, SLO); the placement part is the
/// caller's.
fn decision_record(
    router_id: &str,
    request: &v1::GenerateRequest,
    class: &Classification,
    prompt_ids: &[u32],
) -> v1::RoutingDecision {
    let (origin, detail) = report::lane_origin(&class.reason);
    v1::RoutingDecision {
        request_id: request.request_id.clone(),
        router_id: router_id.to_string(),
        at_unix_ms: report::now_unix_ms(),
        tenant: request
            .metadata
            .get(crate::classify::TENANT_KEY)
            .cloned()
            .unwrap_or_default(),
        model: request.model.clone(),
        lane: class.lane.as_str().into(),
        lane_origin: origin.into(),
        lane_detail: detail,
        ttft_slo_ms: class.ttft_slo_ms,
        prompt_tokens: if prompt_ids.is_empty() {
            RequestFeatures::of(request).prompt_tokens
        } else {
            token_count(prompt_ids)
        },
        ..Default::default()
    }
}

/// The candidates a placement scored, once each (its best score), best first, bounded.
fn candidates(view: &ClusterView, mut considered: Vec<Considered>) -> Vec<v1::RoutingCandidate> {
    considered.sort_by(|a, b| {
        (!a.meets_slo)
            .cmp(&!b.meets_slo)
            .then(a.score.total_cmp(&b.score))
    });
    let mut seen = Vec::new();
    considered.retain(|c| {
        let first = !seen.contains(&c.worker);
        seen.push(c.worker);
        first
    });
    considered
        .into_iter()
        .take(report::MAX_CANDIDATES)
        .map(|c| {
            let w = view.worker(c.worker);
            v1::RoutingCandidate {
                worker_id: w.id.clone(),
                pool: w.pool.to_string(),
                predicted_ttft_ms: c.predicted_ttft_ms,
                cached_tokens: c.cached_tokens,
                cost_per_mtok: w.cost_per_mtok,
                score: c.score,
                meets_slo: c.meets_slo,
                affinity: c.affinity,
            }
        })
        .collect()
}

fn excluded_indices(view: &ClusterView, excluded: &[String]) -> Vec<usize> {
    excluded.iter().filter_map(|id| view.index_of(id)).collect()
}

fn placement_error(error: PlacementError) -> DispatchError {
    match error {
        PlacementError::UnknownModel(_) => DispatchError::UnknownModel(error.to_string()),
        PlacementError::NoWorker(_) => {
            DispatchError::Unavailable(format!("{error}; retry shortly"))
        }
    }
}

/// State of one client request across worker generations (segments).
struct Run<'d> {
    dispatcher: &'d Dispatcher,
    /// The placed worker's slot, held until the next segment's start is sent.
    slot: Option<SlotHold>,
    request: v1::GenerateRequest,
    /// See [`Prepared`]; tokenized again when an interrupt rewrites the conversation.
    prompt_ids: Vec<u32>,
    class: Classification,
    lane: v1::Lane,
    reason: String,
    arrived: Instant,
    /// When the request got its first worker (after any wait at the router for a slot).
    placed: Instant,
    first_token: Option<Instant>,
    /// When the last chunk reached the client (inter-token latency).
    last_token: Option<Instant>,
    /// Pool, id and price of the worker running the current segment.
    pool: Pool,
    worker: String,
    cost_per_mtok: f64,
    span: tracing::Span,
    /// Next client chunk sequence number.
    seq: u64,
    /// Token ids and text of the current segment already sent to the client.
    segment_ids: Vec<u32>,
    segment_text: String,
    /// Tokens sent to the client across all segments.
    delivered: u32,
    prompt_tokens: u32,
    /// Prompt tokens the worker reused from its prefix cache (from its `Finished` usage).
    cached_prompt_tokens: u32,
    /// Prompt tokens placement expected the current worker to reuse.
    predicted_cached_tokens: u32,
    /// The policy's TTFT prediction for the first worker (from placement).
    predicted_ttft_ms: f64,
    /// The alternatives to the first worker, for the ledger.
    alternatives: ledger::Basis,
    attempts: u32,
    cancelled: bool,
    /// See [`Held`]: given back before the last frame.
    held: Held,
}

/// A generation started on a worker. Dropping it stops routing its frames and, unless the
/// worker is known to have ended it, asks the worker to cancel it: however the dispatcher
/// leaves a segment (the client went away mid-forward, its task was dropped), nothing keeps
/// generating for nobody. The cancel follows the `Start` on the same ordered stream, so it
/// reaches the worker even while the start is still in flight.
struct Generation<'a> {
    link: &'a Link,
    id: &'a str,
    /// The worker finished or failed it, or its stream was lost.
    ended: bool,
}

impl Drop for Generation<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.link.cancel(self.id, v1::FinishReason::Cancelled);
        }
        self.link.forget(self.id);
    }
}

/// What ended a segment.
#[derive(Debug)]
enum SegmentEnd {
    Finished(v1::Finished),
    Interrupted(v1::Interrupt),
    Lost(String),
    Failed(v1::Failed),
}

/// What a request does after one of its segments ended (see [`after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// End the request with this `FinishReason`.
    Finish(i32),
    /// Continue with the interrupt's new instructions, on the same worker when it is still
    /// available.
    Redirect { same_worker: bool },
    /// Resume on another worker; `full` when the worker refused for lack of room (overload:
    /// shed if no other worker can take it).
    Failover { full: bool },
    /// End the request with the worker's error.
    Fail,
}

/// The run's decision after segment `end`: pure, so every path is unit-tested. A cancel wins
/// over everything (the segment already ended as cancelled); an interrupt whose token budget
/// is spent finishes; a lost worker or one refusing with `UNAVAILABLE` / `RESOURCE_EXHAUSTED`
/// is failed over; any other refusal is the request's error.
fn after(
    end: &SegmentEnd,
    cancelled: bool,
    delivered: u32,
    max_tokens: u32,
    worker_available: bool,
) -> Next {
    match end {
        _ if cancelled => Next::Finish(v1::FinishReason::Cancelled as i32),
        SegmentEnd::Finished(finished) => Next::Finish(finished.reason),
        // The budget ran out before the redirect could take effect.
        SegmentEnd::Interrupted(_) if delivered >= max_tokens => {
            Next::Finish(v1::FinishReason::Length as i32)
        }
        SegmentEnd::Interrupted(_) => Next::Redirect {
            same_worker: worker_available,
        },
        SegmentEnd::Lost(_) => Next::Failover { full: false },
        SegmentEnd::Failed(failed) => match Code::from_i32(failed.code) {
            Code::Unavailable => Next::Failover { full: false },
            Code::ResourceExhausted => Next::Failover { full: true },
            _ => Next::Fail,
        },
    }
}

impl<'d> Run<'d> {
    fn new(
        request: v1::GenerateRequest,
        prompt_ids: Vec<u32>,
        class: Classification,
        arrived: Instant,
        chosen: Chosen,
        span: tracing::Span,
        dispatcher: &'d Dispatcher,
    ) -> Self {
        let placement_reason = &chosen.reason;
        span.record("predicted_cached_tokens", chosen.cached_tokens);
        Self {
            slot: Some(chosen.slot),
            prompt_ids,
            predicted_cached_tokens: chosen.cached_tokens,
            predicted_ttft_ms: chosen.predicted_ttft_ms,
            alternatives: chosen.alternatives,
            last_token: None,
            pool: Pool::Gpu,
            worker: String::new(),
            cost_per_mtok: 0.0,
            span,
            dispatcher,
            lane: class.wire_lane(),
            reason: format!("{}; {placement_reason}", class.reason),
            class,
            request,
            arrived,
            placed: Instant::now(),
            first_token: None,
            seq: 0,
            segment_ids: Vec::new(),
            segment_text: String::new(),
            delivered: 0,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            attempts: 1,
            cancelled: false,
            held: Held::default(),
        }
    }

    /// Gives back what the request held, charging its tenant the prompt and the tokens
    /// delivered (see [`Held`]).
    fn release(&mut self) {
        self.held.release(Some(
            u64::from(self.prompt_tokens) + u64::from(self.delivered),
        ));
    }

    async fn drive(
        &mut self,
        mut link: Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<(), DispatchError> {
        let record = link.record();
        let accepted = Frame::Accepted(v1::Accepted {
            request_id: self.request.request_id.clone(),
            lane: self.lane as i32,
            pool: record.pool.to_string(),
            worker_id: record.id.clone(),
            model: self.request.model.clone(),
            reason: self.reason.clone(),
        });
        send(out, accepted).await?;
        record_decision(
            &Span::current(),
            self.class.lane.as_str(),
            record.pool.as_str(),
            &record.id,
            &self.reason,
        );
        info!(request_id = %self.request.request_id, lane = self.lane.label(), worker = %record.id, reason = %self.reason, "accepted");

        let mut excluded = Vec::new();
        loop {
            let end = self.segment(&link, controls, out).await?;
            let next = after(
                &end,
                self.cancelled,
                self.delivered,
                self.max_tokens(),
                link.state().available,
            );
            match (next, end) {
                (Next::Finish(reason), SegmentEnd::Finished(finished)) => {
                    if let Some(usage) = finished.usage {
                        self.prompt_tokens = usage.prompt_tokens;
                        self.cached_prompt_tokens = usage.cached_prompt_tokens;
                    }
                    self.span.record("cached_tokens", self.cached_prompt_tokens);
                    self.dispatcher.metrics.prefix_reuse(
                        self.pool,
                        self.predicted_cached_tokens,
                        self.cached_prompt_tokens,
                    );
                    return self.finish(reason, out).await;
                }
                (Next::Finish(reason), _) => return self.finish(reason, out).await,
                (Next::Redirect { same_worker }, SegmentEnd::Interrupted(interrupt)) => {
                    self.redirect(interrupt);
                    // The same worker when it can: its KV cache holds this conversation.
                    if !same_worker {
                        link = self.replace(&link, &mut excluded)?;
                    }
                }
                (Next::Failover { full }, end) => {
                    let why = match &end {
                        SegmentEnd::Lost(why) => why.clone(),
                        SegmentEnd::Failed(failed) => failed.message.clone(),
                        _ => String::new(),
                    };
                    if matches!(end, SegmentEnd::Lost(_)) {
                        warn!(request_id = %self.request.request_id, worker = %link.id(), %why, delivered = self.segment_ids.len(), "worker lost mid-request; failing over");
                    } else {
                        debug!(request_id = %self.request.request_id, worker = %link.id(), message = %why, "worker refused; placing elsewhere");
                    }
                    self.dispatcher.metrics.failover(self.class.lane, self.pool);
                    link = match self.replace(&link, &mut excluded) {
                        Ok(next) => next,
                        // A full worker and nowhere else to go is overload, not an outage:
                        // the client is told when to retry, as if shed at the door.
                        Err(error) if full && error.code() == Code::Unavailable => {
                            self.dispatcher.metrics.shed(self.class.lane);
                            let policy = self.dispatcher.policy.current();
                            return Err(DispatchError::Shed {
                                message: format!(
                                    "every worker serving {:?} is full ({why}); request shed",
                                    self.request.model
                                ),
                                retry_after_ms: policy.lane(self.class.lane).retry_after_ms,
                            });
                        }
                        Err(error) => return Err(error),
                    };
                }
                (_, SegmentEnd::Failed(failed)) => {
                    return Err(DispatchError::Worker {
                        code: Code::from_i32(failed.code),
                        message: failed.message,
                    });
                }
                (next, end) => unreachable!("after() paired {next:?} with {end:?}"),
            }
        }
    }

    /// Picks another worker after `failed` could not serve the request.
    fn replace(
        &mut self,
        failed: &Arc<Link>,
        excluded: &mut Vec<String>,
    ) -> Result<Arc<Link>, DispatchError> {
        self.attempts += 1;
        if self.attempts > self.dispatcher.config.max_attempts {
            return Err(DispatchError::Unavailable(format!(
                "gave up after {} attempts; last worker {} failed",
                self.dispatcher.config.max_attempts,
                failed.id()
            )));
        }
        excluded.push(failed.id());
        let policy = self.dispatcher.policy.current();
        if let Some(Chosen {
            link,
            reason,
            cached_tokens,
            slot,
            ..
        }) = self.dispatcher.try_place(
            &self.request,
            &self.prompt_ids,
            &self.class,
            &policy,
            excluded,
            false,
        )? {
            self.slot = Some(slot);
            self.predicted_cached_tokens = cached_tokens;
            self.span.record("predicted_cached_tokens", cached_tokens);
            debug!(request_id = %self.request.request_id, worker = %link.id(), %reason, "replacement placed");
            // The span names the worker that finishes the request.
            let record = link.record();
            record_decision(
                &Span::current(),
                self.class.lane.as_str(),
                record.pool.as_str(),
                &record.id,
                &format!("{}; failover: {reason}", self.class.reason),
            );
            return Ok(link);
        }
        // Every other worker is at capacity: a started request is not shed, it goes to the
        // least utilised worker that can take it (the worker queues it).
        let view = self.dispatcher.links.view();
        let exclude = excluded_indices(&view, excluded);
        let index = fallback(&view, &self.request.model, &exclude)
            .ok_or_else(|| placement_error(PlacementError::NoWorker(self.request.model.clone())))?;
        let id = &view.worker(index).id;
        self.predicted_cached_tokens = 0;
        self.dispatcher
            .links
            .get(id)
            .ok_or_else(|| DispatchError::Unavailable(format!("worker {id} just left")))
    }

    /// Notes the worker now running the request (metrics labels, span fields, report).
    fn on_worker(&mut self, record: &switchyard_cluster::WorkerRecord) {
        self.pool = record.pool;
        self.worker.clone_from(&record.id);
        self.cost_per_mtok = record.capacity.cost_per_mtok;
        self.span.record("pool", pool_label(Some(record.pool)));
        self.span.record("worker", record.id.as_str());
    }

    /// Reports how the request ended (`outcome` as in the request metrics).
    fn report(&self, outcome: &str, error: Option<&DispatchError>, sampled: bool) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ttft_ms = self.first_token.map_or(0.0, |t| ms(t - self.arrived));
        let itl_ms = match (self.first_token, self.last_token) {
            (Some(first), Some(last)) if self.delivered > 1 => {
                ms(last - first) / f64::from(self.delivered - 1)
            }
            _ => 0.0,
        };
        let shed = error.is_some_and(|s| s.code() == Code::ResourceExhausted);
        let prompt_tokens = if self.prompt_tokens > 0 {
            self.prompt_tokens
        } else {
            token_count(&self.prompt_ids)
        };
        let tokens = f64::from(prompt_tokens) + f64::from(self.delivered);
        let cost_usd = tokens * self.cost_per_mtok / 1e6;
        let slo_met = self.first_token.is_some() && ttft_ms <= self.class.ttft_slo_ms;
        let placed_ttft_ms = self.first_token.map_or(0.0, |t| ms(t - self.placed));
        // Judged only when its first worker served it: the prediction was for that one.
        let judged = (self.first_token.is_some() && self.attempts == 1).then(|| {
            self.alternatives.judge(ledger::Verdict {
                actual_ms: placed_ttft_ms,
                predicted_ms: self.predicted_ttft_ms,
                slo_ms: self.class.ttft_slo_ms,
                slo_met,
                cost_usd,
                tokens,
            })
        });
        let (best_alternative_worker_id, best_alternative_ttft_ms) = self
            .alternatives
            .best_alternative
            .clone()
            .unwrap_or_default();
        self.dispatcher.reports.ended(Ended {
            lane: self.class.lane,
            outcome: v1::RequestOutcome {
                request_id: self.request.request_id.clone(),
                at_unix_ms: report::now_unix_ms(),
                status: if shed { "shed" } else { outcome }.into(),
                worker_id: self.worker.clone(),
                pool: self.pool.to_string(),
                ttft_ms,
                itl_ms,
                total_ms: ms(self.arrived.elapsed()),
                prompt_tokens,
                completion_tokens: self.delivered,
                cached_prompt_tokens: self.cached_prompt_tokens,
                slo_met,
                failovers: self.attempts - 1,
                error: error.map(ToString::to_string).unwrap_or_default(),
                cost_usd,
                predicted_ttft_ms: self.predicted_ttft_ms,
                placed_ttft_ms,
                best_alternative_ttft_ms,
                best_alternative_worker_id,
                regret_ms: judged.map(|j| j.regret_ms),
                cost_regret_usd: judged.map(|j| j.cost_regret_usd),
            },
            cancelled: outcome == "cancelled",
            shed,
            sampled,
            ledger: judged
                .filter(|_| self.dispatcher.reports.connected())
                .map(|judged| LedgerEntry {
                    judged,
                    pool: self.pool,
                    tenant: self
                        .request
                        .metadata
                        .get(crate::classify::TENANT_KEY)
                        .cloned()
                        .unwrap_or_default(),
                }),
        });
    }

    /// Runs one generation on `link` until it ends one way or another.
    async fn segment(
        &mut self,
        link: &Arc<Link>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Result<SegmentEnd, DispatchError> {
        let record = link.record();
        self.on_worker(&record);
        if out.is_closed() {
            // The client left before anything started: start nothing.
            return Err(DispatchError::ClientGone);
        }
        let generation_id = self.dispatcher.links.next_generation_id();
        let started = link.start(self.worker_start(&generation_id));
        if let Some(slot) = self.slot.take() {
            slot.release_after_start();
        }
        let mut events = match started {
            Ok(events) => events,
            Err(why) => return Ok(SegmentEnd::Lost(why)),
        };
        // From here every way out of this function — including an early return because the
        // client went away while a frame was being forwarded — stops the generation unless
        // the worker said it ended.
        let mut generation = Generation {
            link,
            id: &generation_id,
            ended: false,
        };
        let mut controls_open = true;
        let mut interrupt: Option<v1::Interrupt> = None;
        let mut cancel_deadline: Option<Instant> = None;
        // Tokens the client has taken since the last grant, returned in batches of half the
        // window (as HTTP/2 returns its window) so credit costs a frame per many chunks.
        let window = self.dispatcher.config.stream_credit_tokens;
        let mut to_grant = 0u32;
        let end = loop {
            let grace = async {
                match cancel_deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                event = events.recv() => match event {
                    Some(LinkEvent::Frame(worker_frame::Frame::Tokens(tokens))) => {
                        let count = tokens.token_ids.len() as u32;
                        self.forward(tokens, out).await?;
                        to_grant += count;
                        if window > 0 && to_grant >= window.div_ceil(2) {
                            link.grant(&generation_id, std::mem::take(&mut to_grant));
                        }
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Finished(finished))) => {
                        generation.ended = true;
                        break match interrupt.take() {
                            Some(i) if !self.cancelled => SegmentEnd::Interrupted(i),
                            _ => SegmentEnd::Finished(finished),
                        };
                    }
                    Some(LinkEvent::Frame(worker_frame::Frame::Failed(failed))) => {
                        generation.ended = true;
                        break SegmentEnd::Failed(failed);
                    }
                    Some(LinkEvent::Frame(
                        worker_frame::Frame::Load(_) | worker_frame::Frame::KvEvents(_),
                    )) => {}
                    Some(LinkEvent::Lost(why)) => {
                        // The worker's stream is gone, and with it (on the worker's side)
                        // the generation.
                        generation.ended = true;
                        break SegmentEnd::Lost(why);
                    }
                    None => break SegmentEnd::Lost("link closed".into()),
                },
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Cancel) => {
                        self.cancelled = true;
                        link.cancel(&generation_id, v1::FinishReason::Cancelled);
                        cancel_deadline.get_or_insert(Instant::now() + self.dispatcher.config.cancel_grace);
                    }
                    Some(Control::Interrupt(i)) => {
                        link.cancel(&generation_id, v1::FinishReason::Interrupted);
                        interrupt = Some(i);
                    }
                    None => controls_open = false,
                },
                _ = out.closed() => {
                    debug!(request_id = %self.request.request_id, "client went away; cancelling");
                    // `generation` sends the cancel as it drops.
                    return Err(DispatchError::ClientGone);
                }
                _ = grace => {
                    warn!(request_id = %self.request.request_id, worker = %link.id(), "worker did not confirm the cancel in time");
                    // Already cancelled: just stop listening.
                    generation.ended = true;
                    break SegmentEnd::Finished(v1::Finished::default());
                }
            }
        };
        if self.cancelled {
            // A cancel wins over whatever else ended the segment: no failover, no redirect.
            return Ok(match end {
                SegmentEnd::Finished(f) => SegmentEnd::Finished(f),
                _ => SegmentEnd::Finished(v1::Finished::default()),
            });
        }
        Ok(end)
    }

    fn max_tokens(&self) -> u32 {
        self.request
            .sampling
            .as_ref()
            .map(|s| s.max_tokens)
            .unwrap_or_default()
    }

    fn worker_start(&self, generation_id: &str) -> v1::WorkerStart {
        let mut sampling = self.request.sampling.clone().unwrap_or_default();
        // Tokens of earlier segments (before an interrupt) count against max_tokens.
        let earlier = self.delivered - self.segment_ids.len() as u32;
        sampling.max_tokens = sampling.max_tokens.saturating_sub(earlier).max(1);
        v1::WorkerStart {
            request_id: generation_id.to_string(),
            model: self.request.model.clone(),
            messages: self.request.messages.clone(),
            prompt: self.request.prompt.clone(),
            sampling: Some(sampling),
            resume_tokens: self.segment_ids.clone(),
            trace_context: propagation::span_to_map(&self.span),
            lane: self.lane as i32,
            prompt_token_ids: self.prompt_ids.clone(),
            credit_tokens: self.dispatcher.config.stream_credit_tokens,
        }
    }

    async fn forward(&mut self, tokens: v1::Tokens, out: &FrameSink) -> Result<(), DispatchError> {
        if tokens.token_ids.is_empty() && tokens.text.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        self.first_token.get_or_insert(now);
        let (gap, first) = match self.last_token.replace(now) {
            Some(previous) => (now - previous, false),
            None => (now - self.arrived, true),
        };
        let labels = StreamLabels {
            lane: lane_label(self.class.lane),
            pool: pool_label(Some(self.pool)),
            model: self.request.model.clone(),
        };
        self.dispatcher
            .metrics
            .tokens(&labels, tokens.token_ids.len() as u32, gap, first);
        self.delivered += tokens.token_ids.len() as u32;
        self.dispatcher
            .reports
            .tokens(self.pool, tokens.token_ids.len() as u32);
        self.segment_ids.extend_from_slice(&tokens.token_ids);
        self.segment_text.push_str(&tokens.text);
        let frame = Frame::Tokens(v1::Tokens {
            request_id: self.request.request_id.clone(),
            seq: self.seq,
            text: tokens.text,
            token_ids: tokens.token_ids,
        });
        self.seq += 1;
        send(out, frame).await
    }

    /// Rewrites the conversation for an interrupt: the generated text (if kept) becomes an
    /// assistant turn, then the new messages follow; the next segment starts fresh.
    fn redirect(&mut self, interrupt: v1::Interrupt) {
        if self.request.messages.is_empty() {
            let prompt = std::mem::take(&mut self.request.prompt);
            self.request.messages.push(v1::ChatMessage {
                role: "user".into(),
                content: prompt,
            });
        }
        let generated = std::mem::take(&mut self.segment_text);
        if interrupt.keep_generated && !generated.is_empty() {
            self.request.messages.push(v1::ChatMessage {
                role: "assistant".into(),
                content: generated,
            });
        }
        self.request.messages.extend(interrupt.messages);
        self.prompt_ids = self
            .dispatcher
            .links
            .tokenizers()
            .tokenize(&self.request)
            .unwrap_or_default();
        self.segment_ids.clear();
        info!(request_id = %self.request.request_id, keep_generated = interrupt.keep_generated, "interrupted; continuing with new instructions");
    }

    async fn finish(&mut self, reason: i32, out: &FrameSink) -> Result<(), DispatchError> {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let finished = Frame::Finished(v1::Finished {
            request_id: self.request.request_id.clone(),
            reason,
            usage: Some(v1::Usage {
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.delivered,
                cached_prompt_tokens: self.cached_prompt_tokens,
            }),
            timings: Some(v1::Timings {
                ttft_ms: self
                    .first_token
                    .map(|t| ms(t - self.arrived))
                    .unwrap_or_default(),
                total_ms: ms(self.arrived.elapsed()),
                queue_ms: ms(self.placed - self.arrived),
            }),
        });
        self.release();
        send(out, finished).await
    }
}

async fn send(out: &FrameSink, frame: Frame) -> Result<(), DispatchError> {
    out.send(Ok(v1::ServerFrame { frame: Some(frame) }))
        .await
        .map_err(|_| DispatchError::ClientGone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Collects what a `fmt` subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_routing_decision_is_recorded_on_the_request_span() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = request_span("r-1", "m");
            record_decision(
                &span,
                LaneName::LatencyCritical.as_str(),
                "gpu",
                "gpu-7",
                "spill=gpu (no wse slot meets the slo)",
            );
            // An event inside the span carries its fields too.
            span.in_scope(|| info!("accepted"));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        for field in [
            "request_id=\"r-1\"",
            "lane=\"latency-critical\"",
            "pool=\"gpu\"",
            "worker=\"gpu-7\"",
            "reason=\"spill=gpu (no wse slot meets the slo)\"",
        ] {
            assert!(text.contains(field), "{field} missing from {text}");
        }
        assert!(text.contains("close"), "the span closed: {text}");
    }

    #[test]
    fn after_a_segment_the_run_finishes_redirects_fails_over_or_fails() {
        use v1::FinishReason::{Cancelled, Length, Stop};
        let finished = SegmentEnd::Finished(v1::Finished {
            reason: Stop as i32,
            ..Default::default()
        });
        let interrupted = SegmentEnd::Interrupted(v1::Interrupt::default());
        let lost = SegmentEnd::Lost("stream reset".into());
        let failed = |code: Code| {
            SegmentEnd::Failed(v1::Failed {
                code: code as i32,
                ..Default::default()
            })
        };
        // (end, cancelled, delivered of 10, worker available) -> next
        let cases = [
            (&finished, false, 3, true, Next::Finish(Stop as i32)),
            (&finished, true, 3, true, Next::Finish(Cancelled as i32)),
            (&lost, true, 3, true, Next::Finish(Cancelled as i32)),
            (
                &interrupted,
                false,
                3,
                true,
                Next::Redirect { same_worker: true },
            ),
            (
                &interrupted,
                false,
                3,
                false,
                Next::Redirect { same_worker: false },
            ),
            (&interrupted, false, 10, true, Next::Finish(Length as i32)),
            (&lost, false, 3, false, Next::Failover { full: false }),
            (
                &failed(Code::Unavailable),
                false,
                0,
                true,
                Next::Failover { full: false },
            ),
            (
                &failed(Code::ResourceExhausted),
                false,
                0,
                true,
                Next::Failover { full: true },
            ),
            (&failed(Code::InvalidArgument), false, 0, true, Next::Fail),
            (&failed(Code::Internal), false, 5, true, Next::Fail),
        ];
        for (end, cancelled, delivered, available, expected) in cases {
            assert_eq!(
                after(end, cancelled, delivered, 10, available),
                expected,
                "{end:?} cancelled={cancelled} delivered={delivered} available={available}"
            );
        }
    }
}
