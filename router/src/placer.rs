//! The placer: one per router, the only owner of the router's cluster view and of the requests
//! waiting at the router for a slot.
//!
//! The view is patched in place from the links' [`ChangeFeed`] (a worker's load report, its
//! link coming up or going down, a slot taken or given back) and rebuilt only when membership
//! changes, instead of being rebuilt from every link for every decision. Decisions are taken
//! one at a time, and each one counts the slot it took in the view before the next is
//! considered, so a burst spreads by predicted load.
//!
//! A request asks for a placement and gets a worker, an error, or a [`Ticket`]: a place in its
//! lane's queue. Queues are FIFO within a lane and model, latency-critical first. When a
//! worker's state changes the placement task places waiting requests in that order, so a freed
//! slot goes to exactly the request that should get it; no waiter is woken to find the slot
//! taken.
//!
//! The state lives behind one lock, and a request's placement is decided on the request's own
//! task under it, as tower's balancer decides in the caller's `poll_ready`: a decision takes
//! well under a microsecond even at 10 000 workers, while handing it to another task and back
//! cost two wake-ups, ~8 µs a request. The placement task keeps what must happen without a
//! request asking: it applies the change feed and serves the queues as slots free, moves
//! listed generations (rebalancing, drains) and gives up wafer-scale waits on time. Nothing
//! awaits while holding the lock. The one long hold is a membership change, which rebuilds the
//! view from every link (~2 ms at 10 000 workers): placements meanwhile wait on the lock, as
//! they waited on the task before.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::debug;

use crate::changes::{ChangeFeed, Changed};
use crate::classify::Classification;
use crate::error::DispatchError;
use crate::links::{Link, Links, SlotHold};
use crate::metrics::RouterMetrics;
use crate::policy::document::{LaneName, PolicyDocument};
use crate::policy::moves::{
    HedgeBudget, MIN_TOKENS_MEASURED, MoveReason, Progress, Running, drain_target,
    preemption_victim, rebalance_target, should_hedge,
};
use crate::policy::{
    Admission, ClusterView, Considered, Decision, Placement, PlacementError, RequestInfo, admit,
    await_wse, decode_rate, fallback, place_traced,
};
use crate::policy_watch::PolicyHandle;
use crate::report::{self, Reporter, ledger};

/// What placement needs to know of a request.
#[derive(Debug, Clone)]
pub struct Ask {
    pub request_id: String,
    pub model: String,
    pub class: Classification,
    /// Exact when the router tokenized the prompt, else estimated.
    pub prompt_tokens: u32,
    /// See [`RequestInfo::affinity`].
    pub affinity: Option<u64>,
    /// See [`RequestInfo::seed`].
    pub seed: u64,
    /// Workers holding a prefix of the prompt, as (worker id, cached tokens); `None` when the
    /// prompt could not be looked up (not tokenized).
    pub prefix: Option<Vec<(Arc<str>, u32)>>,
    /// Workers this request must not go to (they failed it).
    pub excluded: Vec<String>,
    /// Return the candidates the policy scored (for a sampled decision report).
    pub trace: bool,
    /// The request's tenant (metadata `tenant`), for its share of the hedge budget.
    pub tenant: Option<String>,
}

impl Ask {
    /// The policy's view of the request, with its prefix hits as view indices.
    fn info<'a>(&'a self, prefix: Option<&'a [(usize, u32)]>) -> RequestInfo<'a> {
        RequestInfo {
            model: &self.model,
            prompt_tokens: self.prompt_tokens,
            affinity: self.affinity,
            seed: self.seed,
            prefix,
        }
    }
}

/// `ask`'s prefix hits as (view index, cached tokens); `None` when its prompt was not looked up.
fn prefix_hits(view: &ClusterView, ask: &Ask) -> Option<Vec<(usize, u32)>> {
    ask.prefix.as_ref().map(|hits| {
        hits.iter()
            .filter_map(|(id, tokens)| Some((view.index_of(id)?, *tokens)))
            .collect()
    })
}

/// A worker chosen for a request.
pub struct Chosen {
    pub link: Arc<Link>,
    /// The placement's reason (`Accepted.reason`).
    pub reason: String,
    /// The same as a label (`home`, `spill_to_gpu`, …).
    pub reason_label: &'static str,
    pub predicted_ttft_ms: f64,
    /// What the policy scored, for a sampled decision report (empty otherwise).
    pub candidates: Vec<switchyard_proto::v1::RoutingCandidate>,
    /// Prompt tokens the prefix index expects the worker to reuse.
    pub cached_tokens: u32,
    /// The alternatives the policy scored, for the counterfactual ledger (empty when no
    /// control plane is listening).
    pub alternatives: ledger::Basis,
    /// The worker's slot, held until the request's start is sent.
    pub slot: SlotHold,
    /// A second worker to race the first on (the policy's `hedging`), charged to the budget.
    pub hedge: Option<Hedge>,
}

/// The second copy of a hedged request: whichever copy produces a token first goes on, the
/// other is cancelled.
pub struct Hedge {
    pub link: Arc<Link>,
    pub slot: SlotHold,
    /// The charge to the hedge budget; settled when it drops.
    pub charge: HedgeCharge,
}

/// A hedge's charge to the budget (its prefill tokens). Dropping it settles the charge with
/// what the race really wasted: everything charged unless [`HedgeCharge::unused`] said the
/// hedge never ran.
pub struct HedgeCharge {
    lane: LaneName,
    tenant: Option<String>,
    charged: u64,
    wasted: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl HedgeCharge {
    /// The second copy never started: nothing was wasted.
    pub fn unused(&mut self) {
        self.wasted = 0;
    }
}

impl Drop for HedgeCharge {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Settle {
            lane: self.lane,
            tenant: self.tenant.take(),
            charged: self.charged,
            wasted: self.wasted,
        });
    }
}

/// The answer to a first placement.
pub enum Answer {
    Placed(Chosen),
    /// No slot now: the request waits at the router (admitted by the policy).
    Queued(Ticket),
}

/// A place in a lane's router queue. Dropping it leaves the queue.
pub struct Ticket {
    id: u64,
    pub lane: LaneName,
    placed: oneshot::Receiver<Result<Chosen, DispatchError>>,
    deadline: Instant,
    /// The lane's queue wait, for the message of a request that waited it out.
    max_wait_ms: f64,
    retry_after_ms: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Ticket {
    /// Waits until the request is placed, shed to make room for latency-critical work, or
    /// its lane's queue wait runs out.
    pub async fn placed(&mut self) -> Result<Chosen, DispatchError> {
        tokio::select! {
            placed = &mut self.placed => placed.unwrap_or_else(|_| Err(stopped())),
            _ = tokio::time::sleep_until(self.deadline) => {
                // A placement that raced the deadline is taken rather than wasted.
                match self.placed.try_recv() {
                    Ok(placed) => placed,
                    Err(_) => Err(DispatchError::Shed {
                        message: format!(
                            "no slot within the {} lane's queue wait of {} ms; request shed",
                            self.lane.as_str(),
                            self.max_wait_ms
                        ),
                        retry_after_ms: self.retry_after_ms,
                    }),
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Leave(self.id));
    }
}

/// A running generation listed with the placement task (while the policy's `migration` is
/// enabled), so the policy may move it: a cost-sensitive one on a borrowed wafer-scale slot
/// gives the slot to a latency-critical request (`migration.preempt_borrowed_wse`), and any
/// generation on a draining worker is handed to another (`migration.drain_handoff`).
#[derive(Debug)]
pub struct ListedRun {
    pub worker: String,
    pub model: String,
    pub class: Classification,
    pub prompt_tokens: u32,
    /// Tokens generated so far (kept by the run): a move re-prefills them.
    pub generated: Arc<AtomicU32>,
    pub max_tokens: u32,
    /// Times the generation has moved already.
    pub moves: u32,
    /// When the request arrived at the router.
    pub arrived: Instant,
    /// The TTFT placement predicted on this worker.
    pub predicted_ttft_ms: f64,
    /// Its pace on this worker, kept by the run (rebalancing).
    pub pace: Arc<Pace>,
}

/// Tokens a listed generation has received from its current worker, and when the first came:
/// what rebalancing measures its decode rate from.
#[derive(Debug)]
pub struct Pace {
    listed_at: Instant,
    /// Microseconds from `listed_at` to the first token here; `u64::MAX` before it.
    first_token_us: AtomicU64,
    tokens: AtomicU32,
}

impl Pace {
    pub fn new() -> Self {
        Self {
            listed_at: Instant::now(),
            first_token_us: AtomicU64::new(u64::MAX),
            tokens: AtomicU32::new(0),
        }
    }

    /// `n` tokens arrived from the worker.
    pub fn tokens(&self, n: u32) {
        if self.tokens.fetch_add(n, Ordering::Relaxed) == 0 {
            let us = self.listed_at.elapsed().as_micros();
            self.first_token_us
                .store(u64::try_from(us).unwrap_or(u64::MAX - 1), Ordering::Relaxed);
        }
    }

    /// How the generation is doing, or `None` while there is too little to tell: before the
    /// request's first token, how long until it is estimated from the prediction (once past
    /// it, as long again as it is late); after it, the decode rate measured here.
    fn progress(
        &self,
        listed: &ListedRun,
        delivered_before: bool,
        predicted_tokens_per_s: f64,
    ) -> Option<Progress> {
        let now = Instant::now();
        let elapsed_ms = (now - listed.arrived).as_secs_f64() * 1e3;
        let here_ms = (now - self.listed_at).as_secs_f64() * 1e3;
        let tokens = self.tokens.load(Ordering::Relaxed);
        let first_us = self.first_token_us.load(Ordering::Relaxed);
        if tokens == 0 {
            if delivered_before {
                return None;
            }
            let late_ms = here_ms - listed.predicted_ttft_ms;
            return Some(Progress {
                elapsed_ms,
                first_token: false,
                first_token_in_ms: late_ms.abs(),
                measured_tokens_per_s: 0.0,
                predicted_tokens_per_s,
            });
        }
        let since_first_s = here_ms / 1e3 - first_us as f64 / 1e6;
        if tokens <= MIN_TOKENS_MEASURED || since_first_s <= 0.0 {
            return None;
        }
        Some(Progress {
            elapsed_ms,
            first_token: true,
            first_token_in_ms: 0.0,
            // The first chunk marks the start; the rate is of the tokens after it.
            measured_tokens_per_s: f64::from(tokens - 1) / since_first_s,
            predicted_tokens_per_s,
        })
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::new()
    }
}

/// The order to move, given to a listed generation's run, with its target's slot held: the
/// next move decision counts it taken, so a drain never sends more generations to a worker
/// than it has room for. Dropped unused (the generation ended first), it frees the slot.
pub struct MoveOrder {
    pub reason: MoveReason,
    pub target: Chosen,
}

/// The listing of a [`ListedRun`]; dropping it (the run ended or left its worker) takes it off
/// the placement task's list.
pub struct Listing {
    id: u64,
    /// Fires when the placement task decides the generation must move.
    pub order: oneshot::Receiver<MoveOrder>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Listing {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Returned(self.id));
    }
}

/// Whether a request that cannot be placed now may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfFull {
    /// Wait at the router if admission allows, else shed.
    Queue,
    /// A started request (failing over) is not shed: it goes to the least utilised worker
    /// that can take it, which queues it.
    Fallback,
}

/// What the placement task is told by requests that do not wait for an answer.
enum Command {
    /// A request was queued: the task looks at its timers again.
    Rearm,
    Leave(u64),
    Listed {
        id: u64,
        generation: ListedRun,
        order: oneshot::Sender<MoveOrder>,
    },
    Returned(u64),
    /// A hedge's race ended (see [`HedgeCharge`]).
    Settle {
        lane: LaneName,
        tenant: Option<String>,
        charged: u64,
        wasted: u64,
    },
}

/// The handle requests are placed through; it also reaches the placement task.
pub struct Placer {
    state: Arc<Mutex<PlacementState>>,
    /// The placement task's inbox.
    commands: mpsc::UnboundedSender<Command>,
    depths: Arc<[AtomicU32; 2]>,
    next_listing: AtomicU64,
}

impl Placer {
    /// Starts the placement task over `links`. It runs until every handle is dropped.
    pub fn spawn(
        links: Arc<Links>,
        policy: PolicyHandle,
        metrics: RouterMetrics,
        reports: Reporter,
    ) -> Self {
        let (commands, inbox) = mpsc::unbounded_channel();
        let depths: Arc<[AtomicU32; 2]> = Arc::default();
        let mut state = PlacementState {
            view: ClusterView::new(Vec::new()),
            changes: links.changes().clone(),
            links,
            policy,
            metrics,
            reports,
            queues: Default::default(),
            awaiting_wse: VecDeque::new(),
            next_ticket: 0,
            depths: depths.clone(),
            commands: commands.downgrade(),
            listed: BTreeMap::new(),
            handed_off: HashSet::new(),
            hedges: HedgeBudget::default(),
        };
        // Built before any request can ask: the task may first run after a placement has.
        state.rebuild();
        let state = Arc::new(Mutex::new(state));
        tokio::spawn(run_placement_task(state.clone(), inbox));
        Self {
            state,
            commands,
            depths,
            next_listing: AtomicU64::new(0),
        }
    }

    /// Lists a running generation, so the policy may move it (see [`ListedRun`]).
    pub fn list(&self, generation: ListedRun) -> Listing {
        let id = self.next_listing.fetch_add(1, Ordering::Relaxed);
        let (order, ordered) = oneshot::channel();
        let _ = self.commands.send(Command::Listed {
            id,
            generation,
            order,
        });
        Listing {
            id,
            order: ordered,
            commands: self.commands.clone(),
        }
    }

    /// Places `ask` now, queues it, or refuses it.
    pub fn place(&self, ask: Ask, if_full: IfFull) -> Result<Answer, DispatchError> {
        let answer = {
            let mut state = self.state.lock().expect("placement state lock");
            // Changes not yet applied (a slot freed a moment ago) count for this decision,
            // and go first to the requests already waiting for them.
            state.catch_up();
            state.place_new(ask, if_full)
        };
        if matches!(answer, Ok(Answer::Queued(_))) {
            // It may be the first to await a wafer-scale slot: the task arms its give-up time.
            self.commands.send(Command::Rearm).map_err(|_| stopped())?;
        }
        answer
    }

    /// Requests waiting at the router per lane, for the reports' stats.
    pub fn queue_depth_probe(&self) -> impl Fn() -> [u32; 2] + Send + Sync + 'static {
        let depths = self.depths.clone();
        move || {
            [
                depths[0].load(Ordering::Relaxed),
                depths[1].load(Ordering::Relaxed),
            ]
        }
    }
}

fn stopped() -> DispatchError {
    DispatchError::Unavailable("the router is shutting down".into())
}

/// How often running generations are checked against their predictions (rebalancing).
const REBALANCE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

struct Waiting {
    id: u64,
    ask: Ask,
    reply: oneshot::Sender<Result<Chosen, DispatchError>>,
    /// A borrowed wafer-scale slot was ordered back for it (once is enough: the slot comes).
    preempted: bool,
    /// When it began to wait.
    since: Instant,
    /// For a request awaiting a wafer-scale slot: when it stops waiting and takes a GPU.
    give_up: Option<Instant>,
}

/// What one placement attempt came to.
// Returned and matched at once, never stored: boxing the placement would only add an
// allocation per decision.
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Placed(Chosen),
    /// No slot it may take now.
    Full,
    /// A GPU would serve it late: it waits for a wafer-scale slot, at most this long.
    AwaitWse(std::time::Duration),
}

/// Whether a spilled latency-critical request may wait for a wafer-scale slot instead, and
/// where it stands: `waited` so far, `ahead` requests awaiting one before it.
#[derive(Debug, Clone, Copy)]
struct MayAwait {
    waited: std::time::Duration,
    ahead: usize,
}

/// The cluster view, the router queues and the running generations the policy may move.
struct PlacementState {
    links: Arc<Links>,
    changes: Arc<ChangeFeed>,
    policy: PolicyHandle,
    metrics: RouterMetrics,
    reports: Reporter,
    view: ClusterView,
    /// Requests waiting for a slot, per lane ([`LaneName::index`]), oldest first.
    queues: [VecDeque<Waiting>; 2],
    /// Latency-critical requests a GPU would serve late, waiting for a wafer-scale slot
    /// (`placement.await_wse`), oldest first. A newcomer may still take a GPU: they wait for
    /// a different thing than the lane's queue.
    awaiting_wse: VecDeque<Waiting>,
    next_ticket: u64,
    depths: Arc<[AtomicU32; 2]>,
    /// For tickets to leave by; weak, so the task ends when the last [`Placer`] goes.
    commands: mpsc::WeakUnboundedSender<Command>,
    /// Running generations the policy may move, by listing.
    listed: BTreeMap<u64, (ListedRun, oneshot::Sender<MoveOrder>)>,
    /// Draining workers whose generations were offered a hand-off.
    handed_off: HashSet<String>,
    /// What hedges may still cost, per lane and tenant.
    hedges: HedgeBudget,
}

/// The placement task: applies the change feed and serves the queues as workers change, and
/// keeps the timers (rebalancing, wafer-scale give-ups). It ends when the last [`Placer`] goes.
async fn run_placement_task(
    state: Arc<Mutex<PlacementState>>,
    mut inbox: mpsc::UnboundedReceiver<Command>,
) {
    let lock = || state.lock().expect("placement state lock");
    let changes = lock().changes.clone();
    let mut rebalance = tokio::time::interval(REBALANCE_EVERY);
    rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let (listed, give_up) = {
            let state = lock();
            let give_up = (!state.awaiting_wse.is_empty()).then(|| state.next_give_up());
            (!state.listed.is_empty(), give_up)
        };
        tokio::select! {
            // Commands first: a listing or a leave is settled before the next change is.
            biased;
            command = inbox.recv() => match command {
                Some(command) => lock().handle(command),
                None => return,
            },
            changed = changes.next() => {
                let mut state = lock();
                state.apply(changed);
                state.serve_queues();
            }
            _ = rebalance.tick(), if listed => lock().rebalance(),
            // The first request awaiting a wafer-scale slot whose wait ran out takes a GPU.
            _ = tokio::time::sleep_until(give_up.unwrap_or_else(Instant::now)), if give_up.is_some() => {
                lock().serve_queues();
            }
        }
    }
}

impl PlacementState {
    /// Applies what changed since the last look, serving waiting requests first.
    fn catch_up(&mut self) {
        let changed = self.changes.take();
        if changed != Changed::default() {
            self.apply(changed);
            self.serve_queues();
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Rearm => {}
            Command::Leave(id) => {
                for queue in self.queues.iter_mut().chain([&mut self.awaiting_wse]) {
                    queue.retain(|w| w.id != id);
                }
                self.publish_depths();
            }
            Command::Listed {
                id,
                generation,
                order,
            } => {
                let worker = generation.worker.clone();
                self.listed.insert(id, (generation, order));
                // Listed after its worker began draining: hand it off too.
                if self.handed_off.contains(&worker) {
                    self.hand_off(&worker);
                }
            }
            Command::Returned(id) => {
                self.listed.remove(&id);
            }
            Command::Settle {
                lane,
                tenant,
                charged,
                wasted,
            } => {
                let policy = self.policy.current();
                self.hedges
                    .settle(lane, tenant.as_deref(), charged, wasted, &policy);
                self.metrics.hedge_wasted(lane, wasted.min(charged));
                self.publish_hedge_budget(lane, &policy);
            }
        }
    }

    fn publish_hedge_budget(&self, lane: LaneName, policy: &PolicyDocument) {
        let account = self.hedges.lane(lane);
        let allowed = policy.hedging.budget_fraction * account.tokens as f64;
        self.metrics
            .hedge_budget(lane, account.spent, allowed as u64);
    }

    fn apply(&mut self, changed: Changed) {
        if changed.membership {
            self.rebuild();
            return;
        }
        for id in changed.workers {
            let Some(link) = self.links.get(&id) else {
                // Gone from the link set: its membership change rebuilds the view.
                continue;
            };
            let state = link.state();
            let draining = link.draining();
            match self.view.index_of(&id) {
                Some(i)
                    if self.view.worker(i).pool == state.pool
                        && self.view.worker(i).models == state.models =>
                {
                    self.view.update(i, |w| *w = state);
                }
                // A new worker, or one whose identity changed: index everything again.
                _ => {
                    self.rebuild();
                    return;
                }
            }
            self.note_draining(&id, draining);
        }
    }

    fn rebuild(&mut self) {
        self.view = self.links.view();
        let ids: Vec<String> = self.view.workers().iter().map(|w| w.id.clone()).collect();
        for id in ids {
            let draining = self.links.get(&id).is_some_and(|link| link.draining());
            self.note_draining(&id, draining);
        }
    }

    /// Hands generations off worker `id` once, when it starts draining.
    fn note_draining(&mut self, id: &str, draining: bool) {
        if !draining {
            self.handed_off.remove(id);
        } else if !self.handed_off.contains(id) {
            self.handed_off.insert(id.to_string());
            self.hand_off(id);
        }
    }

    /// Re-reads worker `id` after placement took one of its slots.
    fn refresh(&mut self, link: &Link, i: usize) {
        let state = link.state();
        if self.view.worker(i).models == state.models && self.view.worker(i).pool == state.pool {
            self.view.update(i, |w| *w = state);
        } else {
            self.rebuild();
        }
    }

    fn place_new(&mut self, ask: Ask, if_full: IfFull) -> Result<Answer, DispatchError> {
        let policy = self.policy.current();
        let lane = ask.class.lane;
        let first = if_full == IfFull::Queue;
        if first && policy.hedging.enabled {
            // Every new request earns its lane (and tenant) hedge budget, hedged or not.
            self.hedges
                .record(lane, ask.tenant.as_deref(), ask.prompt_tokens);
            self.publish_hedge_budget(lane, &policy);
        }
        // FIFO: a newcomer does not overtake requests of its lane (or latency-critical ones)
        // waiting for the same model.
        let behind_others = if_full == IfFull::Queue && self.waiting_ahead(lane, &ask.model);
        // A borrowed wafer-scale slot is taken back before the request settles for less: the
        // borrower moves on, and the slot it frees goes to the queue's first latency-critical
        // request.
        if !behind_others
            && if_full == IfFull::Queue
            && self.preempt_for(&ask, &policy)
            && let Ok(ticket) = self.enqueue(ask.clone(), true, None, &policy)
        {
            return Ok(Answer::Queued(ticket));
        }
        if !behind_others {
            // A started request failing over does not wait for a better slot.
            let may_await = first.then(|| MayAwait {
                waited: std::time::Duration::ZERO,
                ahead: self.awaiting_wse_for(&ask.model),
            });
            match self.try_place(&ask, &policy, first, may_await)? {
                Attempt::Placed(chosen) => return Ok(Answer::Placed(chosen)),
                Attempt::AwaitWse(left) => {
                    return self
                        .enqueue(ask, false, Some(left), &policy)
                        .map(Answer::Queued);
                }
                Attempt::Full => {}
            }
        }
        match if_full {
            IfFull::Queue => self.enqueue(ask, false, None, &policy).map(Answer::Queued),
            IfFull::Fallback => self.fall_back(&ask).map(Answer::Placed),
        }
    }

    /// Requests awaiting a wafer-scale slot for `model`.
    fn awaiting_wse_for(&self, model: &str) -> usize {
        self.awaiting_wse
            .iter()
            .filter(|w| w.ask.model == model)
            .count()
    }

    /// When the first request awaiting a wafer-scale slot gives up.
    fn next_give_up(&self) -> Instant {
        self.awaiting_wse
            .iter()
            .filter_map(|w| w.give_up)
            .min()
            .unwrap_or_else(Instant::now)
    }

    /// Whether requests that come before one of `lane` for `model` are waiting.
    fn waiting_ahead(&self, lane: LaneName, model: &str) -> bool {
        let waits = |l: LaneName| self.queues[l.index()].iter().any(|w| w.ask.model == model);
        waits(LaneName::LatencyCritical) || (lane == LaneName::CostSensitive && waits(lane))
    }

    /// One placement attempt on the current view. With `may_hedge`, a second worker to race
    /// on when the policy's `hedging` says so; with `may_await`, a GPU that would serve the
    /// request late may be turned down to await a wafer-scale slot ([`await_wse`]).
    fn try_place(
        &mut self,
        ask: &Ask,
        policy: &PolicyDocument,
        may_hedge: bool,
        may_await: Option<MayAwait>,
    ) -> Result<Attempt, DispatchError> {
        let view = &self.view;
        let hits = prefix_hits(view, ask);
        let info = ask.info(hits.as_deref());
        let exclude: Vec<usize> = ask
            .excluded
            .iter()
            .filter_map(|id| view.index_of(id))
            .collect();
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
            if ask.trace {
                considered.push(c);
            }
        };
        let decision = match place_traced(view, &ask.class, &info, policy, &exclude, &mut record) {
            // A model this router has seen served, with no worker right now (its workers are
            // restarting or unreachable): retry later, it is not an unknown model.
            Decision::Reject(PlacementError::UnknownModel(model))
                if self.links.has_served(&model) =>
            {
                Decision::Reject(PlacementError::NoWorker(model))
            }
            decision => decision,
        };
        let awaiting = match (&decision, may_await) {
            (Decision::Place(spill), Some(may)) => await_wse(
                view,
                &ask.class,
                &info,
                spill,
                may.waited.as_secs_f64() * 1e3,
                may.ahead,
                policy,
            ),
            _ => None,
        };
        if let Some(left_ms) = awaiting {
            self.metrics.decision(ask.class.lane, None, "await_wse");
            return Ok(Attempt::AwaitWse(std::time::Duration::from_secs_f64(
                left_ms / 1e3,
            )));
        }
        let (pool, reason) = match &decision {
            Decision::Place(placement) => (Some(placement.pool), placement.reason_label()),
            Decision::Queue => (None, "queue"),
            Decision::Reject(PlacementError::UnknownModel(_)) => (None, "unknown_model"),
            Decision::Reject(PlacementError::NoWorker(_)) => (None, "no_worker"),
            Decision::Reject(PlacementError::NoWorkerForLane { .. }) => {
                (None, "no_worker_for_lane")
            }
        };
        self.metrics.decision(ask.class.lane, pool, reason);
        let placement = match decision {
            Decision::Place(placement) => placement,
            Decision::Queue => return Ok(Attempt::Full),
            Decision::Reject(error) => return Err(placement_error(error)),
        };
        let (fastest, cheapest) = alternatives.excluding(placement.worker);
        let alternatives = ledger::Basis {
            best_alternative: fastest.map(|(w, ms)| (view.worker(w).id.clone(), ms)),
            cheapest_meeting_slo_per_mtok: cheapest,
        };
        let candidates = candidates(view, considered);
        let Some(mut chosen) = self.reserve(&placement) else {
            // Left between its change and this decision; the membership change follows.
            let id = self.view.worker(placement.worker).id.clone();
            self.rebuild();
            return Err(DispatchError::Unavailable(format!("worker {id} just left")));
        };
        chosen.candidates = candidates;
        chosen.alternatives = alternatives;
        if may_hedge {
            chosen.hedge = self.hedge(ask, &placement, policy);
        }
        if let Some(hedge) = &chosen.hedge {
            chosen.reason = format!("{}; hedged on {}", chosen.reason, hedge.link.id());
        }
        Ok(Attempt::Placed(chosen))
    }

    /// A second worker for `ask`, placed on `primary`, when the policy would hedge it and the
    /// budget allows; the budget is charged here, before the next decision.
    fn hedge(&mut self, ask: &Ask, primary: &Placement, policy: &PolicyDocument) -> Option<Hedge> {
        // A first placement excludes workers only when some cannot serve the request (a prompt
        // to score, an embedding): the second worker must not be one of those.
        if !policy.hedging.enabled || !ask.excluded.is_empty() {
            return None;
        }
        let view = &self.view;
        let hits = prefix_hits(view, ask);
        let info = ask.info(hits.as_deref());
        let tenant = ask.tenant.as_deref();
        let second = should_hedge(
            view,
            &ask.class,
            &info,
            primary,
            tenant,
            &self.hedges,
            policy,
        )?;
        let cost = u64::from(second.prompt_tokens.saturating_sub(second.cached_tokens));
        let link = self.links.get(&view.worker(second.worker).id)?;
        let commands = self.commands.upgrade()?;
        if !self.hedges.charge(ask.class.lane, tenant, cost, policy) {
            return None;
        }
        self.publish_hedge_budget(ask.class.lane, policy);
        let slot = link.hold_slot();
        self.refresh(&link, second.worker);
        debug!(request_id = %ask.request_id, hedge = %link.id(), cost, "hedging on a second worker");
        Some(Hedge {
            link,
            slot,
            charge: HedgeCharge {
                lane: ask.class.lane,
                tenant: ask.tenant.clone(),
                charged: cost,
                wasted: cost,
                commands,
            },
        })
    }

    /// Orders a cost-sensitive generation off its borrowed wafer-scale slot when the policy
    /// says `ask` (latency-critical) should have it. Whether it did.
    fn preempt_for(&mut self, ask: &Ask, policy: &PolicyDocument) -> bool {
        if ask.class.lane != LaneName::LatencyCritical
            || self.listed.is_empty()
            || !policy.migration.enabled
        {
            return false;
        }
        let view = &self.view;
        let (of_running, running) = running(view, &self.listed);
        let hits = prefix_hits(view, ask);
        let info = ask.info(hits.as_deref());
        let Some(preemption) = preemption_victim(view, &ask.class, &info, &running, policy) else {
            return false;
        };
        let id = of_running[preemption.victim];
        let target = preemption.victim_move.to;
        debug!(request_id = %ask.request_id, "preempting a borrowed wafer-scale slot");
        self.order_move(id, target, MoveReason::Preempt)
    }

    /// Offers every listed generation on draining worker `worker` a move elsewhere (the
    /// policy's `drain_target`); those with nowhere to go finish where they are.
    fn hand_off(&mut self, worker: &str) {
        let policy = self.policy.current();
        if !policy.migration.enabled || !policy.migration.drain_handoff {
            return;
        }
        let on_worker: Vec<u64> = self
            .listed
            .iter()
            .filter(|(_, (run, _))| run.worker == worker)
            .map(|(id, _)| *id)
            .collect();
        // One at a time: each hand-off holds its target's slot before the next is decided.
        for id in on_worker {
            let target = self.listed.get(&id).and_then(|(run, _)| {
                drain_target(&self.view, &as_running(&self.view, id, run)?, &policy)
            });
            if let Some(target) = target {
                debug!(%worker, "handing a generation off a draining worker");
                self.order_move(id, target.to, MoveReason::Drain);
            }
        }
    }

    /// Orders listed generation `id` to move to `to`, holding a slot there for it first.
    /// Whether the order went out (the run may have ended, the target may have left).
    fn order_move(&mut self, id: u64, to: Placement, reason: MoveReason) -> bool {
        let Some(target) = self.reserve(&to) else {
            return false;
        };
        let Some((_, order)) = self.listed.remove(&id) else {
            return false;
        };
        order.send(MoveOrder { reason, target }).is_ok()
    }

    /// Holds a slot on `placement`'s worker and counts it taken in the view.
    fn reserve(&mut self, placement: &Placement) -> Option<Chosen> {
        let id = self.view.worker(placement.worker).id.clone();
        let link = self.links.get(&id)?;
        let slot = link.hold_slot();
        self.refresh(&link, placement.worker);
        Some(Chosen {
            slot,
            link,
            reason: placement.reason(),
            reason_label: placement.reason_label(),
            predicted_ttft_ms: placement.predicted_ttft_ms,
            candidates: Vec::new(),
            cached_tokens: placement.cached_tokens,
            alternatives: ledger::Basis::default(),
            hedge: None,
        })
    }

    /// Orders every listed generation that fell behind its prediction to move where the
    /// policy's `rebalance_target` says it would finish (or start) sooner.
    fn rebalance(&mut self) {
        let policy = self.policy.current();
        if !policy.migration.enabled || !policy.migration.rebalance {
            return;
        }
        let ids: Vec<u64> = self.listed.keys().copied().collect();
        // One at a time: each move holds its target's slot before the next is decided.
        for id in ids {
            let Some((listed, _)) = self.listed.get(&id) else {
                continue;
            };
            let Some(generation) = as_running(&self.view, id, listed) else {
                continue;
            };
            let delivered_before = listed.generated.load(Ordering::Relaxed)
                > listed.pace.tokens.load(Ordering::Relaxed);
            let rate = decode_rate(self.view.worker(generation.worker), &policy);
            let Some(progress) = listed.pace.progress(listed, delivered_before, rate) else {
                continue;
            };
            if let Some(target) = rebalance_target(&self.view, &generation, &progress, &policy) {
                debug!(worker = %listed.worker, "rebalancing a generation that fell behind");
                self.order_move(id, target.to, MoveReason::Rebalance);
            }
        }
    }

    /// A started request with every other worker full: the least utilised one that serves
    /// its model takes it anyway (and queues it).
    fn fall_back(&mut self, ask: &Ask) -> Result<Chosen, DispatchError> {
        let exclude: Vec<usize> = ask
            .excluded
            .iter()
            .filter_map(|id| self.view.index_of(id))
            .collect();
        let i = fallback(&self.view, &ask.model, &exclude)
            .ok_or_else(|| placement_error(PlacementError::NoWorker(ask.model.clone())))?;
        let id = self.view.worker(i).id.clone();
        let link = self
            .links
            .get(&id)
            .ok_or_else(|| DispatchError::Unavailable(format!("worker {id} just left")))?;
        let slot = link.hold_slot();
        self.refresh(&link, i);
        Ok(Chosen {
            slot,
            link,
            reason: "fallback: every worker is full".into(),
            reason_label: "fallback",
            predicted_ttft_ms: 0.0,
            candidates: Vec::new(),
            cached_tokens: 0,
            alternatives: ledger::Basis::default(),
            hedge: None,
        })
    }

    /// Lets a request wait at the router (shedding a queued cost-sensitive request in its
    /// place if the policy says so), or sheds it. With `await_wse`, it awaits a wafer-scale
    /// slot for at most that long.
    fn enqueue(
        &mut self,
        ask: Ask,
        preempted: bool,
        await_wse: Option<std::time::Duration>,
        policy: &PolicyDocument,
    ) -> Result<Ticket, DispatchError> {
        let lane = ask.class.lane;
        let depths = self.depths();
        let lane_policy = policy.lane(lane);
        match admit(lane, depths, policy) {
            Admission::Queue => {}
            Admission::QueueEvicting(victim) => {
                if let Some(evicted) = self.queues[victim.index()].pop_back() {
                    let _ = evicted.reply.send(Err(DispatchError::Shed {
                        message: "shed to make room for latency-critical work".into(),
                        retry_after_ms: policy.lane(victim).retry_after_ms,
                    }));
                }
            }
            Admission::Shed { retry_after_ms } => {
                return Err(DispatchError::Shed {
                    message: format!("{} queue is full; request shed", lane.as_str()),
                    retry_after_ms,
                });
            }
        }
        let commands = self.commands.upgrade().ok_or_else(stopped)?;
        let (reply, placed) = oneshot::channel();
        self.next_ticket += 1;
        let id = self.next_ticket;
        let now = Instant::now();
        let waiting = Waiting {
            id,
            ask,
            reply,
            preempted,
            since: now,
            give_up: await_wse.map(|left| now + left),
        };
        match await_wse {
            Some(left) => {
                debug!(request_id = %waiting.ask.request_id, wait_ms = left.as_millis() as u64, "a GPU would be late: awaiting a wafer-scale slot");
                self.awaiting_wse.push_back(waiting);
            }
            None => {
                debug!(request_id = %waiting.ask.request_id, lane = lane.as_str(), "waiting at the router for a slot");
                self.queues[lane.index()].push_back(waiting);
            }
        }
        self.publish_depths();
        let max_wait_ms = lane_policy.max_queue_wait_ms;
        Ok(Ticket {
            id,
            lane,
            placed,
            deadline: Instant::now() + std::time::Duration::from_secs_f64(max_wait_ms / 1e3),
            max_wait_ms,
            retry_after_ms: lane_policy.retry_after_ms,
            commands,
        })
    }

    /// Places waiting requests in order — those awaiting a wafer-scale slot, then
    /// latency-critical, then cost-sensitive, FIFO within each — until each model's next
    /// request in each lane must keep waiting.
    fn serve_queues(&mut self) {
        if self.queues.iter().all(VecDeque::is_empty) && self.awaiting_wse.is_empty() {
            return;
        }
        let policy = self.policy.current();
        self.serve_awaiting_wse(&policy);
        // Models whose head request in a lane could not be placed: later ones wait behind it.
        let mut blocked: [HashSet<String>; 2] = Default::default();
        for lane in [LaneName::LatencyCritical, LaneName::CostSensitive] {
            let mut i = 0;
            while i < self.queues[lane.index()].len() {
                let waiting = &self.queues[lane.index()][i];
                let model = &waiting.ask.model;
                if waiting.reply.is_closed() {
                    // Its request gave up (deadline, client gone); the ticket's leave follows.
                    self.queues[lane.index()].remove(i);
                    continue;
                }
                let behind_latency_critical = lane == LaneName::CostSensitive
                    && blocked[LaneName::LatencyCritical.index()].contains(model);
                if blocked[lane.index()].contains(model) || behind_latency_critical {
                    i += 1;
                    continue;
                }
                let ask = waiting.ask.clone();
                match self.try_place(&ask, &policy, false, None) {
                    Ok(Attempt::Full | Attempt::AwaitWse(_)) => {
                        // A latency-critical request still waiting takes a borrowed wafer
                        // slot back as soon as the borrower has somewhere to go.
                        if !self.queues[lane.index()][i].preempted
                            && self.preempt_for(&ask, &policy)
                        {
                            self.queues[lane.index()][i].preempted = true;
                        }
                        blocked[lane.index()].insert(ask.model);
                        i += 1;
                    }
                    Ok(Attempt::Placed(chosen)) => self.answer(lane, i, Ok(chosen)),
                    Err(error) => self.answer(lane, i, Err(error)),
                }
            }
        }
        self.publish_depths();
    }

    /// Places requests awaiting a wafer-scale slot, in order: on one that freed, or — once
    /// waiting no longer pays (its wait ran out, or the slot would come too late) — on the
    /// GPU the policy chooses.
    fn serve_awaiting_wse(&mut self, policy: &PolicyDocument) {
        let now = Instant::now();
        let mut ahead: BTreeMap<String, usize> = BTreeMap::new();
        let mut i = 0;
        while let Some(waiting) = self.awaiting_wse.get(i) {
            if waiting.reply.is_closed() {
                self.awaiting_wse.remove(i);
                continue;
            }
            let ask = waiting.ask.clone();
            let before = ahead.entry(ask.model.clone()).or_default();
            let may_await = waiting
                .give_up
                .filter(|&give_up| now < give_up)
                .map(|_| MayAwait {
                    waited: now - waiting.since,
                    ahead: *before,
                });
            let since = waiting.since;
            match self.try_place(&ask, policy, false, may_await) {
                Ok(Attempt::AwaitWse(_)) => {
                    *before += 1;
                    i += 1;
                }
                Ok(Attempt::Full) if may_await.is_some() => {
                    *before += 1;
                    i += 1;
                }
                Ok(Attempt::Full) => {
                    // Done waiting for the wafer, and no slot anywhere: it waits in its lane's
                    // queue like any request, in arrival order (its give-up time is past, so
                    // keeping it here would only wake the task again at once).
                    let mut waiting = self.awaiting_wse.remove(i).expect("index checked above");
                    waiting.give_up = None;
                    let queue = &mut self.queues[LaneName::LatencyCritical.index()];
                    let at = queue.partition_point(|w| w.since <= waiting.since);
                    queue.insert(at, waiting);
                }
                Ok(Attempt::Placed(mut chosen)) => {
                    let waited_ms = now.saturating_duration_since(since).as_millis();
                    chosen.reason = format!(
                        "{} after awaiting a wse slot for {waited_ms} ms",
                        chosen.reason
                    );
                    let waiting = self.awaiting_wse.remove(i).expect("index checked above");
                    let _ = waiting.reply.send(Ok(chosen));
                }
                Err(error) => {
                    let waiting = self.awaiting_wse.remove(i).expect("index checked above");
                    let _ = waiting.reply.send(Err(error));
                }
            }
        }
    }

    /// Answers the `i`th waiting request of `lane`. A placement its request no longer wants
    /// gives its slot back as the `Chosen` drops.
    fn answer(&mut self, lane: LaneName, i: usize, placed: Result<Chosen, DispatchError>) {
        let waiting = self.queues[lane.index()]
            .remove(i)
            .expect("index checked by the caller");
        let _ = waiting.reply.send(placed);
    }

    /// Requests waiting at the router per lane; those awaiting a wafer-scale slot are
    /// latency-critical.
    fn depths(&self) -> [u32; 2] {
        [
            (self.queues[0].len() + self.awaiting_wse.len()) as u32,
            self.queues[1].len() as u32,
        ]
    }

    fn publish_depths(&self) {
        for (depth, queued) in self.depths.iter().zip(self.depths()) {
            depth.store(queued, Ordering::Relaxed);
        }
    }
}

/// The listed generations as the move decisions see them, with their listing ids.
fn running<'a>(
    view: &ClusterView,
    listed: &'a BTreeMap<u64, (ListedRun, oneshot::Sender<MoveOrder>)>,
) -> (Vec<u64>, Vec<Running<'a>>) {
    let mut ids = Vec::new();
    let mut running = Vec::new();
    for (id, (run, _)) in listed {
        if let Some(generation) = as_running(view, *id, run) {
            ids.push(*id);
            running.push(generation);
        }
    }
    (ids, running)
}

/// Listed generation `id` as the move decisions see it (`None` once its worker left the view).
fn as_running<'a>(view: &ClusterView, id: u64, run: &'a ListedRun) -> Option<Running<'a>> {
    let worker = view.index_of(&run.worker)?;
    let generated = run.generated.load(Ordering::Relaxed);
    Some(Running {
        worker,
        class: &run.class,
        continuation: RequestInfo {
            model: &run.model,
            prompt_tokens: run.prompt_tokens.saturating_add(generated),
            affinity: None,
            seed: id,
            prefix: None,
        },
        remaining_tokens: run.max_tokens.saturating_sub(generated),
        moves: run.moves,
    })
}

fn placement_error(error: PlacementError) -> DispatchError {
    match error {
        // The error names its field itself (`model: …`): the reason alone, not "model …" again.
        PlacementError::UnknownModel(model) => {
            DispatchError::UnknownModel(format!("{model:?} is not served by any worker"))
        }
        PlacementError::NoWorker(_) | PlacementError::NoWorkerForLane { .. } => {
            DispatchError::Unavailable(format!("{error}; retry shortly"))
        }
    }
}

/// The candidates a placement scored, once each (its best score), best first, bounded.
fn candidates(
    view: &ClusterView,
    mut considered: Vec<Considered>,
) -> Vec<switchyard_proto::v1::RoutingCandidate> {
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
            switchyard_proto::v1::RoutingCandidate {
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
