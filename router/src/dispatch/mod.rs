//! The per-request dispatcher: validates and places a request, starts it on a worker, forwards
//! its tokens to the client with gap-free sequence numbers, and handles `Cancel`, `Interrupt`
//! (stop, then continue the same request with new instructions, on the same worker when
//! possible) and failover (another worker resumes after the tokens the client already has).
//!
//! One file per stage of a request, in order: [`validate`] (limits, tokenization) →
//! [`classify`] (lane, tenant lane rules and quota) → [`place`] (the placer's answer,
//! or a wait at the router) → [`run`] (segments on workers until the end) → [`finish`] (the
//! last frame, metrics and the report). [`span`] holds the request's tracing span.

mod classify;
mod finish;
mod place;
mod run;
mod span;
mod truncate;
mod validate;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use switchyard_cluster::driven::DrivenReceiver;
use switchyard_cluster::telemetry::propagation::{self, RemoteContext};
use switchyard_proto::RequestLimits;
use switchyard_proto::v1;
use switchyard_proto::validate::canonicalize_roles;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::{Instrument as _, Span, debug, info};

use crate::classify::Classification;
use crate::config::RouterConfig;
use crate::error::DispatchError;
use crate::links::Links;
use crate::metrics::RouterMetrics;
use crate::placer::{Chosen, Placer, Ticket};
use crate::policy_watch::PolicyHandle;
use crate::readiness::{InFlight, InFlightGuard, Readiness};
use crate::report::Reporter;
use crate::tenant_quota::{TenantPermit, TenantQuota};
use crate::tokenizers::tokenizes_long;

use run::Run;
pub use span::{record_decision, request_span};
use validate::{OutputBound, bound_output};

/// A client's instruction about a running request. Boxed, an interrupt keeps the enum at
/// 16 bytes: every request's control channel allocates its first block of 32 slots up front.
#[derive(Debug)]
pub enum Control {
    Cancel,
    Interrupt(Box<v1::Interrupt>),
}

/// Where a request's frames go (see [`frame_channel`]).
#[derive(Clone)]
pub struct FrameSink(mpsc::Sender<Result<Box<v1::ServerFrame>, Status>>);

/// The receiving end of a [`FrameSink`]; from [`Dispatcher::drive`], it also drives the run
/// that writes to it.
pub struct FrameReceiver(DrivenReceiver<Result<Box<v1::ServerFrame>, Status>>);

/// A channel for frames towards one client, bounded at `capacity`. Frames travel boxed: a
/// channel allocates its first block of 32 slots when it is made — one per `Generate` call or
/// HTTP request — and a slot the size of a frame (144 bytes) made that 4.6 KiB per open stream.
pub fn frame_channel(capacity: usize) -> (FrameSink, FrameReceiver) {
    let (tx, rx) = mpsc::channel(capacity);
    (FrameSink(tx), FrameReceiver(DrivenReceiver::undriven(rx)))
}

impl FrameSink {
    /// Waits for room, then queues `item`; an error means the client is gone.
    pub async fn send(&self, item: Result<v1::ServerFrame, Status>) -> Result<(), ClientGone> {
        self.0
            .send(item.map(Box::new))
            .await
            .map_err(|_| ClientGone)
    }

    /// Completes when the client is gone.
    pub async fn closed(&self) {
        self.0.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The receiving end of a frame channel was dropped: the client is gone.
#[derive(Debug)]
pub struct ClientGone;

impl FrameReceiver {
    pub async fn recv(&mut self) -> Option<Result<v1::ServerFrame, Status>> {
        self.0.recv().await.map(|item| item.map(|frame| *frame))
    }

    /// The frames as a stream, for a tonic response.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<v1::ServerFrame, Status>> {
        use futures::StreamExt as _;
        self.0.map(|item| item.map(|frame| *frame))
    }
}

/// Shared by every request the router handles.
pub struct Dispatcher {
    pub links: Arc<Links>,
    pub config: RouterConfig,
    pub policy: PolicyHandle,
    pub metrics: RouterMetrics,
    /// Whether the router can route yet (see [`Readiness`]).
    pub readiness: Readiness,
    /// Requests admitted and not yet ended.
    pub in_flight: Arc<InFlight>,
    /// Cancelled when the router begins to shut down: each session ends, with a status
    /// saying so, once its running requests have.
    pub stopping: CancellationToken,
    /// Decision and outcome reports to the control plane.
    pub reports: Reporter,
    /// The Responses API's stored responses (`store: true`).
    pub responses: Arc<crate::response_store::ResponseStore>,
    /// The other router replicas, which keep their own stored responses.
    pub peers: crate::response_store::peers::Peers,
    /// The Batch API's files and batches kept on this replica.
    pub batches: crate::batches::BatchStore,
    /// Where the stored responses, files and batches wait for the next start when no other
    /// replica takes them at the stop (`--state-dir`), locked for this replica.
    pub state_dir: Option<crate::response_store::saved::StateDir>,
    /// The placer (the cluster view and the router queues).
    placer: Placer,
    tenant_quota: TenantQuota,
    next_seed: AtomicU64,
    /// The tenants of the API keys (`--api-keys-file`): with the tenants the policy names,
    /// those the usage metrics count by name.
    key_tenants: BTreeSet<String>,
}

/// Where a prepared request will run.
enum Target {
    Placed(Chosen),
    /// No slot now: it waits at the router (admitted by the policy).
    Queued(Ticket),
}

/// A validated, classified request, placed or admitted to wait, ready to run. Boxed: it is
/// passed down through the run's nested futures, and each would otherwise hold a copy.
pub struct Prepared(Box<PreparedRequest>);

struct PreparedRequest {
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
    /// Counted until the request ends (see [`InFlight`]).
    in_flight: InFlightGuard,
}

impl Prepared {
    /// Calls `end` when the request ends, just before its last frame goes out (or when it
    /// stops without one: the client went away).
    pub fn on_end(&mut self, end: impl FnOnce() + Send + 'static) {
        self.0.held.on_end = Some(Box::new(end));
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

impl Dispatcher {
    pub fn limits(&self) -> &RequestLimits {
        &self.config.limits
    }

    /// A dispatcher over `links`, routing by the policy `policy` follows and reporting to
    /// `reports`. Starts the router's placement task.
    pub fn new(
        links: Arc<Links>,
        config: RouterConfig,
        policy: PolicyHandle,
        metrics: RouterMetrics,
        reports: Reporter,
    ) -> Self {
        let placer = Placer::spawn(
            links.clone(),
            policy.clone(),
            metrics.clone(),
            reports.clone(),
        );
        reports.set_queue_depths(placer.queue_depth_probe());
        let responses = Arc::new(
            crate::response_store::ResponseStore::new(config.response_store)
                .with_gauges(
                    metrics.stored_responses.clone(),
                    metrics.stored_conversations.clone(),
                    metrics.stored_response_bytes.clone(),
                )
                .with_run_gauge(metrics.background_responses.clone()),
        );
        reports.set_state({
            let (store, metrics) = (responses.clone(), metrics.clone());
            move || {
                let (stored_responses, store_bytes) = store.usage();
                let (journal_bytes, journal_unsynced_bytes) = metrics.journal_bytes();
                v1::RouterState {
                    stored_responses: stored_responses as u32,
                    stored_conversations: store.conversation_count() as u32,
                    store_bytes: store_bytes as u64,
                    store_limit_bytes: store.limits().max_bytes as u64,
                    standby_responses: metrics.standby_responses.get().max(0) as u32,
                    response_mirror: metrics.response_mirror_state().to_string(),
                    sessions: metrics.active_sessions.get().max(0) as u32,
                    background_responses: store.running() as u32,
                    batches_running: metrics.batches_running.get().max(0) as u32,
                    journal_bytes,
                    journal_unsynced_bytes,
                }
            }
        });
        let batches = crate::batches::BatchStore::new(responses.owner(), config.batches)
            .with_gauges(crate::batches::BatchGauges {
                running: metrics.batches_running.clone(),
                file_bytes: metrics.batch_file_bytes.clone(),
            })
            .mirrored_with(responses.clone());
        Self {
            tenant_quota: TenantQuota::new(config.max_tenant_requests),
            responses,
            batches,
            state_dir: None,
            peers: Default::default(),
            links,
            config,
            policy,
            metrics,
            readiness: Readiness::ready(),
            in_flight: Arc::default(),
            stopping: CancellationToken::new(),
            reports,
            placer,
            next_seed: AtomicU64::new(0),
            key_tenants: BTreeSet::new(),
        }
    }

    /// Keeps the stored responses, files and batches in `dir` for the next start when no other
    /// replica takes them at the stop.
    pub fn with_state_dir(mut self, dir: Option<crate::response_store::saved::StateDir>) -> Self {
        self.state_dir = dir;
        self
    }

    /// Names `tenants` (the API keys' tenants) in the usage metrics.
    pub fn with_key_tenants<'t>(mut self, tenants: impl IntoIterator<Item = &'t str>) -> Self {
        self.key_tenants = tenants.into_iter().map(str::to_string).collect();
        self
    }

    /// `request`'s tenant as the usage metrics name it: as it is when an API key or the routing
    /// policy (lanes, quotas, hedging budgets) names it, `(other)` when only the client does
    /// (its metadata, without keys: any string, which must not become a series), `(none)`
    /// without one.
    pub fn tenant_label(&self, request: &v1::GenerateRequest) -> String {
        let Some(tenant) = request
            .metadata
            .get(crate::classify::TENANT_KEY)
            .filter(|tenant| !tenant.is_empty())
        else {
            return "(none)".into();
        };
        let policy = self.policy.current();
        let named = self.key_tenants.contains(tenant)
            || policy.tenants.contains_key(tenant)
            || policy.quotas.tenants.contains_key(tenant)
            || policy.hedging.tenants.contains_key(tenant);
        if named {
            tenant.clone()
        } else {
            "(other)".into()
        }
    }

    /// Validates, classifies and places `request`, or admits it to wait at the router for a
    /// slot. Errors carry the status the client gets (`RESOURCE_EXHAUSTED` with `retry-after`
    /// metadata when shed). The request's span continues the trace in `parent` (the call's
    /// headers), or in the request's own `traceparent` metadata entry, which wins: one
    /// session carries requests of many traces.
    ///
    /// A request that names no `sampling.max_tokens` (0) may generate
    /// [`switchyard_proto::DEFAULT_MAX_TOKENS`], lowered to what the model's context leaves
    /// after its prompt; one that names a bound the context cannot hold is refused.
    ///
    /// A long prompt is tokenized first, off the runtime's threads; preparing any other
    /// request does not wait ([`Dispatcher::waits_to_prepare`]).
    pub async fn prepare(
        &self,
        mut request: v1::GenerateRequest,
        parent: RemoteContext,
    ) -> Result<Prepared, DispatchError> {
        let arrived = Instant::now();
        // Before anything reads the roles: the prompt's tokens and its prefix-cache keys
        // must not depend on which name for system instructions a client used.
        canonicalize_roles(&mut request.messages);
        // Before anything reads `max_tokens` (validation, the classifier's rules).
        let bound = bound_output(&mut request, self.config.limits.max_tokens_cap);
        let tokenized = match self.truncate_to_context(&mut request, bound).await {
            Some(ids) => Some(ids),
            None => self.tokenize_long(&request).await,
        };
        self.prepare_tokenized(request, parent, arrived, tokenized, bound)
    }

    /// Whether [`Dispatcher::prepare`] waits for `request` (to tokenize its long prompt):
    /// a caller reading many requests in turn prepares such a one on a task of its own.
    pub fn waits_to_prepare(&self, request: &v1::GenerateRequest) -> bool {
        (tokenizes_long(request) || request.truncation == v1::Truncation::Auto as i32)
            && self.links.tokenizers().has(&request.model)
    }

    fn prepare_tokenized(
        &self,
        mut request: v1::GenerateRequest,
        parent: RemoteContext,
        arrived: Instant,
        tokenized: Option<Vec<u32>>,
        bound: OutputBound,
    ) -> Result<Prepared, DispatchError> {
        let span = request_span(&request.request_id, &request.model);
        let parent = match RemoteContext::from_map(&request.metadata) {
            own if own.is_valid() => own,
            _ => parent,
        };
        propagation::set_parent(&span, parent);
        let policy = self.policy.current();
        let (valid, prompt_ids) = match self.validate(&mut request, tokenized, bound) {
            Ok(prompt_ids) => (Ok(()), prompt_ids),
            Err(error) => (Err(error), Vec::new()),
        };
        let (mut class, features) = self.classify(&request, &prompt_ids, &policy);
        span.record("lane", class.lane.as_str());
        span.record("reason", class.reason.as_str());
        let sampled = self.reports.sample();
        let in_flight = self.in_flight.enter();
        let admitted = valid
            .and_then(|()| self.readiness.check())
            .and_then(|()| self.admit_tenant(&request, &mut class, &features, &policy));
        let prepared = match admitted {
            Ok(quota) => {
                span.record("lane", class.lane.as_str());
                span.record("reason", class.reason.as_str());
                self.place(&request, &prompt_ids, &class, sampled)
                    .inspect_err(|error| {
                        if matches!(error, DispatchError::Shed { .. }) {
                            span.record("reason", format!("{}; shed: {error}", class.reason));
                        }
                    })
                    .map(|target| (target, quota))
            }
            Err(error) => Err(error),
        };
        match prepared {
            Ok((target, quota)) => Ok(Prepared(Box::new(PreparedRequest {
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
                in_flight,
            }))),
            Err(error) => {
                self.unplaced(&request, &class, &prompt_ids, &error, sampled, arrived);
                span.in_scope(|| info!(code = ?error.code(), "refused"));
                Err(error)
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
        let span = prepared.0.span.clone();
        self.run_in_span(prepared, controls, out)
            .instrument(span)
            .await
    }

    /// [`Dispatcher::run`] on a task of its own.
    pub fn spawn_run(
        self: &Arc<Self>,
        prepared: Prepared,
        controls: mpsc::UnboundedReceiver<Control>,
        out: FrameSink,
    ) {
        let dispatcher = self.clone();
        // Boxed: the task holds a pointer, not the run's ~2.4 KB of state, which spawning would
        // otherwise copy a few times over (~2 % of a `Session` request's cost).
        tokio::spawn(Box::pin(async move {
            dispatcher.run(prepared, controls, out).await
        }));
    }

    /// [`Dispatcher::run`] driven by its reader: the returned receiver polls the run whenever
    /// it has no frame to give, so a request on its own stream (a `Generate` call, an HTTP
    /// request) runs in the task that writes its response, one hand-off less each way than
    /// a task of its own. Dropped before the end, the run moves to a task of its own.
    pub fn drive(
        self: &Arc<Self>,
        prepared: Prepared,
        controls: mpsc::UnboundedReceiver<Control>,
        capacity: usize,
    ) -> FrameReceiver {
        let (tx, rx) = mpsc::channel(capacity);
        let dispatcher = self.clone();
        let run = async move { dispatcher.run(prepared, controls, FrameSink(tx)).await };
        FrameReceiver(DrivenReceiver::new(rx, run))
    }

    async fn run_in_span(
        &self,
        prepared: Prepared,
        mut controls: mpsc::UnboundedReceiver<Control>,
        out: FrameSink,
    ) {
        let PreparedRequest {
            mut request,
            mut prompt_ids,
            class,
            target,
            arrived,
            span,
            sampled,
            mut held,
            in_flight: _in_flight,
        } = *prepared.0;
        let (placed, waited) = match target {
            Target::Placed(chosen) => (Ok(chosen), Duration::ZERO),
            // Boxed, as are the rare paths below: a future is as large as its largest state,
            // and a request's is moved whole on its way onto a task.
            Target::Queued(ticket) => {
                let waited = Box::pin(self.wait_for_slot(
                    ticket,
                    Waiting {
                        request: &mut request,
                        prompt_ids: &mut prompt_ids,
                        class: &class,
                        span: &span,
                        held: &mut held,
                        sampled,
                        arrived,
                    },
                    &mut controls,
                    &out,
                ))
                .await;
                match waited {
                    Some(placed) => placed,
                    None => return,
                }
            }
        };
        let chosen = match placed {
            Ok(chosen) => chosen,
            Err(error) => {
                span.record("reason", format!("{}; shed: {error}", class.reason));
                info!(%error, "not placed");
                self.unplaced(&request, &class, &prompt_ids, &error, sampled, arrived);
                held.release(None);
                let _ = Box::pin(out.send(Ok(error.failed_frame(&request.request_id)))).await;
                return;
            }
        };
        if sampled {
            self.report_decision(&request, &class, &prompt_ids, &chosen, waited);
        }
        let link = chosen.link.clone();
        let mut run = Run::new(request, prompt_ids, class, arrived, chosen, span, self);
        run.held = held;
        run.waited = waited;
        run.on_worker(&link.record());
        let result = Box::pin(run.drive(link, &mut controls, &out)).await;
        let outcome = match &result {
            Ok(()) if run.cancelled => "cancelled",
            Ok(()) => "completed",
            Err(error) if error.code() == Code::Cancelled => "cancelled",
            Err(_) => "failed",
        };
        run.release();
        self.metrics
            .request(run.class.lane, Some(run.pool), &run.request.model, outcome);
        let usage = v1::Usage {
            prompt_tokens: run.prompt_tokens,
            completion_tokens: run.completion_tokens(),
            cached_prompt_tokens: run.cached_prompt_tokens,
        };
        self.metrics
            .tenant_usage(self.tenant_label(&run.request), outcome, &usage);
        run.report(outcome, result.as_ref().err(), sampled);
        if let Err(error) = result {
            let _ = Box::pin(out.send(Ok(error.failed_frame(&run.request.request_id)))).await;
        }
    }

    /// A queued request's wait at the router for a slot: its placement, or why it got none,
    /// and how long it waited. `None` when the wait ended the request (cancelled: its last
    /// frame is sent; or the client went away).
    async fn wait_for_slot(
        &self,
        mut ticket: Ticket,
        waiting: Waiting<'_>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        out: &FrameSink,
    ) -> Option<(Result<Chosen, DispatchError>, Duration)> {
        let Waiting {
            request,
            prompt_ids,
            class,
            span,
            held,
            sampled,
            arrived,
        } = waiting;
        let mut controls_open = true;
        let placed = loop {
            tokio::select! {
                // The client's word first: a placement that arrives with a cancel is given
                // back, not started.
                biased;
                control = controls.recv(), if controls_open => match control {
                    Some(Control::Cancel) => {
                        drop(ticket);
                        info!("cancelled while waiting at the router");
                        self.cancelled_waiting(request, class, prompt_ids, sampled, arrived);
                        held.release(None);
                        let _ = out.send(Ok(finish::cancelled_frame(&request.request_id, arrived))).await;
                        return None;
                    }
                    // Not started yet: the new instructions simply become its prompt.
                    Some(Control::Interrupt(interrupt)) => {
                        run::apply_interrupt(request, run::Generated::default(), *interrupt);
                        *prompt_ids = self.links.tokenizers().tokenize_off_runtime(request).await.unwrap_or_default();
                    }
                    None => controls_open = false,
                },
                placed = ticket.placed() => break placed,
                _ = out.closed() => {
                    // The client went away (a Generate call dropped or past its deadline).
                    drop(ticket);
                    debug!("client gone while waiting at the router");
                    self.cancelled_waiting(request, class, prompt_ids, sampled, arrived);
                    return None;
                }
            }
        };
        let waited = arrived.elapsed();
        span.record("queue_ms", waited.as_secs_f64() * 1e3);
        let outcome = if placed.is_ok() { "placed" } else { "shed" };
        self.metrics.queued(class.lane, waited, outcome);
        Some((placed, waited))
    }
}

/// What a queued request's wait reads and may change (an interrupt rewrites the prompt).
struct Waiting<'a> {
    request: &'a mut v1::GenerateRequest,
    prompt_ids: &'a mut Vec<u32>,
    class: &'a Classification,
    span: &'a Span,
    held: &'a mut Held,
    sampled: bool,
    arrived: Instant,
}

/// A prompt's token count for placement and classification.
fn token_count(prompt_ids: &[u32]) -> u32 {
    u32::try_from(prompt_ids.len()).unwrap_or(u32::MAX)
}
