//! The discrete-event cluster simulator. Requests arrive from traces, a placer (the router's
//! own policy code, or a baseline) puts each on a modelled worker or queues it at the router
//! under the policy's admission limits, and workers advance in simulated time:
//!
//! - GPU nodes batch continuously: a step prefills the prompts admitted since the last step
//!   (less their cached prefix) and decodes one token for every running sequence; its length
//!   is `step_base_ms + step_per_seq_ms × batch + prefill_tokens / prefill_rate`. With chunked
//!   prefill (`prefill_chunk_tokens`) a step prefills at most that many prompt tokens,
//!   latency-critical prompts first, as the real engines order their work, and fewer while a
//!   sequence decodes whose lane promises a rate the full chunk would break (the candle
//!   engine's pacing, `switchyard_worker_gpu::pacing`).
//! - WSE gateways have fixed slots; a request's first token comes after a fixed overhead plus
//!   its prefill, then tokens stream at the profile's per-stream rate.
//!
//! Worker load is mirrored into a [`ClusterView`] exactly as live `Load` frames feed the router.
//!
//! Under a placer whose policy document enables them ([`Placer::moves_policy`]), running
//! generations move and latency-critical requests are hedged by the policy's own decisions
//! (`switchyard_policy::moves`); see the `moves` submodule.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;

use switchyard_cluster::Pool;
use switchyard_policy::classify::Classification;
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_policy::moves::{HedgeAccount, HedgeBudget};
use switchyard_policy::{Admission, ClusterView, Decision, Placement, Route, WorkerState, admit};

use switchyard_worker_gpu::pacing::paced_chunk;

use super::kv::{BlockCache, RouterKvView, TRACE_BLOCK_TOKENS};
use super::profile::Profiles;

mod moves;

/// A request as the simulator replays it, already classified.
#[derive(Debug, Clone)]
pub struct SimRequest {
    pub arrival_ms: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub hash_ids: Arc<[u64]>,
    /// Hash of the affinity key (the conversation's first prompt blocks), if any.
    pub affinity: Option<u64>,
    pub lane: LaneName,
    pub ttft_slo_ms: f64,
    pub min_tokens_per_s: f64,
}

impl SimRequest {
    /// The prompt's full trace blocks: what a worker caches and publishes.
    pub fn full_blocks(&self) -> &[u64] {
        let full = (self.prompt_tokens / TRACE_BLOCK_TOKENS) as usize;
        &self.hash_ids[..full.min(self.hash_ids.len())]
    }

    /// KV blocks the sequence needs besides its full prompt blocks (the partial last prompt
    /// block and the generated tokens).
    pub fn anonymous_blocks(&self) -> usize {
        let total = (self.prompt_tokens + self.output_tokens).div_ceil(TRACE_BLOCK_TOKENS);
        (total as usize).saturating_sub(self.full_blocks().len())
    }

    pub fn classification(&self) -> Classification {
        Classification {
            lane: self.lane,
            ttft_slo_ms: self.ttft_slo_ms,
            min_tokens_per_s: self.min_tokens_per_s,
            reason: String::new(),
        }
    }
}

/// A routing policy under test.
pub trait Placer {
    /// `kv` is the router's view of the workers' published KV blocks.
    fn place(
        &mut self,
        view: &ClusterView,
        kv: &RouterKvView,
        request: &SimRequest,
        index: u32,
        policy: &PolicyDocument,
    ) -> Decision;

    /// How much longer a request that `place` spilled to a GPU should wait for a WSE slot
    /// instead (see `switchyard_policy::await_wse`); `None`: start it now.
    #[allow(clippy::too_many_arguments)]
    fn await_wse(
        &mut self,
        _view: &ClusterView,
        _kv: &RouterKvView,
        _request: &SimRequest,
        _index: u32,
        _spill: &Placement,
        _waited_ms: f64,
        _ahead: usize,
    ) -> Option<f64> {
        None
    }

    /// The policy document under which the simulator moves running generations and hedges
    /// this placer's requests (`None`: it never does).
    fn moves_policy(&self) -> Option<&PolicyDocument> {
        None
    }
}

/// What happened to one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// When the router sent it to a worker (after any wait in the router queue).
    pub dispatched_ms: f64,
    pub first_token_ms: f64,
    pub finish_ms: f64,
    pub worker: u32,
    pub served: bool,
    pub shed: bool,
    pub spilled: bool,
    /// Prompt tokens the worker reused from its prefix cache.
    pub cached_tokens: u32,
    /// Prompt tokens the placement expected it to reuse (router's view).
    pub predicted_cached_tokens: u32,
    /// Time to first token the placement predicted, from dispatch.
    pub predicted_ttft_ms: f64,
    /// Times it moved to another worker.
    pub moves: u8,
    /// It was started on a second worker too.
    pub hedged: bool,
    /// The second copy produced the first token.
    pub hedge_won: bool,
    /// Output tokens generated on workers it moved away from, and their price: the rest is
    /// billed at `worker`'s.
    pub billed_tokens: u32,
    pub billed_cost: f64,
}

struct Seq {
    request: u32,
    remaining: u32,
    prefilled: bool,
    /// Prompt tokens still to prefill after the step in flight.
    prefill_left: u32,
    latency_critical: bool,
    /// Context tokens this run prefills (prompt and earlier output, less the cached prefix).
    uncached: u32,
    /// Output tokens generated before it moved here (0: a fresh start, whose prefill gives
    /// the first token).
    done: u32,
    /// When it joined the running batch.
    joined_ms: f64,
}

#[derive(Default)]
struct Gpu {
    running: Vec<Seq>,
    /// Dispatched since the step in flight began: (request, uncached context tokens, output
    /// tokens generated before).
    pending: Vec<(u32, u32, u32)>,
    /// Prompt tokens not yet prefilled (pending and running), as the worker reports them.
    unprefilled: u64,
    /// Of `unprefilled`, those of latency-critical requests (prefilled first), reported too.
    unprefilled_latency_critical: u64,
    stepping: bool,
    /// Moving average of step times (ms): the per-stream decode rate the worker reports.
    step_ewma_ms: f64,
    /// The steps in flight: decode-only steps are identical, so a run of them is one event
    /// (fast-forward), cut short when a new request arrives.
    seg_start: f64,
    seg_step_ms: f64,
    seg_steps: u32,
    decode_only: bool,
    /// Only the event carrying the current version is live; older ones are stale.
    version: u32,
}

impl Gpu {
    /// Steps of the decode-only run in flight completed by `now` (each gave every running
    /// sequence a token; the sequences count them when the run ends).
    fn decoded_in_segment(&self, now: f64) -> u32 {
        if !self.stepping || !self.decode_only {
            return 0;
        }
        (((now - self.seg_start) / self.seg_step_ms).floor().max(0.0) as u32).min(self.seg_steps)
    }
}

enum Kind {
    Gpu(Gpu),
    /// `runs`: the requests holding its slots.
    Wse {
        active: u32,
        runs: Vec<u32>,
    },
}

struct SimWorker {
    kind: Kind,
    cache: BlockCache,
}

const EV_GPU_STEP: u8 = 0;
const EV_WSE_DONE: u8 = 1;
/// A hedged copy's first token on a WSE (the race may be won).
const EV_WSE_FIRST: u8 = 2;

/// Totals of one run.
pub struct RunResult {
    pub outcomes: Vec<Outcome>,
    /// Price per million tokens of the worker each request was served on.
    pub price: Vec<f64>,
    /// Pool of each worker.
    pub pool: Vec<Pool>,
    pub wall_time_s: f64,
    pub events: u64,
    /// Blocks evicted from the workers' prefix caches.
    pub evicted_blocks: u64,
    /// Sequences admitted beyond a worker's KV budget (see [`BlockCache::overcommitted`]).
    pub kv_overcommitted: u64,
    pub moves: MoveStats,
}

/// Moves and hedges of one run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MoveStats {
    /// Moves by reason (`MoveReason::index` order: preempt, rebalance, drain).
    pub preempt: u64,
    pub rebalance: u64,
    pub drain: u64,
    /// Context tokens the targets prefilled again (prompt and output so far, less their
    /// cached prefix).
    pub reprefill_tokens: u64,
    /// Prompt tokens a moved generation had prefilled where it was before its first token
    /// (thrown away).
    pub lost_prefill_tokens: u64,
    pub hedges: u64,
    /// Races the second copy won.
    pub hedge_wins: u64,
    /// What the losing copies had prefilled (and decoded) when cancelled.
    pub hedge_wasted_tokens: u64,
    /// The latency-critical lane's hedge budget at the end: prompt tokens recorded and hedge
    /// prefill charged (less refunds).
    pub hedge_budget_tokens: u64,
    pub hedge_budget_spent: u64,
    /// Every context token prefilled by any worker (first runs, moves and hedge copies).
    pub prefill_tokens: u64,
}

/// Simulates `requests` (sorted by arrival) on the cluster of `profiles` with `placer`.
pub fn simulate(
    profiles: &Profiles,
    policy: &PolicyDocument,
    requests: &[SimRequest],
    placer: &mut dyn Placer,
) -> RunResult {
    let started = std::time::Instant::now();
    let (gpu, wse) = (&profiles.gpu, &profiles.wse);
    let mut states = Vec::new();
    let mut workers = Vec::new();
    let mut price = Vec::new();
    let mut pool = Vec::new();
    for i in 0..profiles.cluster.gpu_workers {
        let mut w = WorkerState::new(
            format!("gpu-{i}"),
            Pool::Gpu,
            vec![profiles.model.clone()],
            gpu.max_concurrent,
        );
        w.prefill_tokens_per_s = gpu.prefill_tokens_per_s;
        w.decode_tokens_per_s = 1000.0 / (gpu.step_base_ms + gpu.step_per_seq_ms);
        w.ttft_overhead_ms = gpu.step_base_ms;
        // Reported as a chunked live engine reports it (see `gpu_step_start`).
        w.prefill_chunk_tokens = gpu.prefill_chunk_tokens;
        w.cost_per_mtok = gpu.cost_per_mtok;
        let cache = BlockCache::new(gpu.kv_trace_blocks());
        // Workers with a prefix cache publish it: the router places by its view of them.
        w.prefix_cache = cache.enabled();
        states.push(w);
        workers.push(SimWorker {
            kind: Kind::Gpu(Gpu::default()),
            cache,
        });
        price.push(gpu.cost_per_mtok);
        pool.push(Pool::Gpu);
    }
    for i in 0..profiles.cluster.wse_workers {
        let mut w = WorkerState::new(
            format!("wse-{i}"),
            Pool::Wse,
            vec![profiles.model.clone()],
            wse.slots,
        );
        w.prefill_tokens_per_s = wse.prefill_tokens_per_s;
        w.decode_tokens_per_s = wse.decode_tokens_per_s;
        w.ttft_overhead_ms = wse.ttft_overhead_ms;
        w.cost_per_mtok = wse.cost_per_mtok;
        states.push(w);
        workers.push(SimWorker {
            kind: Kind::Wse {
                active: 0,
                runs: Vec::new(),
            },
            // The gateway cannot see its upstream's cache: none modelled, none published.
            cache: BlockCache::new(0),
        });
        price.push(wse.cost_per_mtok);
        pool.push(Pool::Wse);
    }
    let mut sim = Sim {
        profiles,
        policy,
        requests,
        view: ClusterView::new(states),
        workers,
        outcomes: vec![Outcome::default(); requests.len()],
        heap: BinaryHeap::new(),
        seq: 0,
        queues: [VecDeque::new(), VecDeque::new()],
        awaiting_wse: VecDeque::new(),
        events: 0,
        kv: RouterKvView::new(KV_MAX_HITS),
        scratch: Vec::new(),
        moves_policy: placer
            .moves_policy()
            .filter(|p| p.migration.enabled || p.hedging.enabled)
            .cloned(),
        wse_runs: HashMap::new(),
        races: HashMap::new(),
        lc_on_gpus: Vec::new(),
        budget: HedgeBudget::default(),
        stats: MoveStats::default(),
    };
    let mut next_arrival = 0usize;
    loop {
        let heap_next = sim.heap.peek().map(|Reverse(e)| f64::from_bits(e.0));
        let arrival_next = requests.get(next_arrival).map(|r| r.arrival_ms);
        sim.events += 1;
        match (arrival_next, heap_next) {
            (Some(a), h) if h.is_none_or(|h| a <= h) => {
                sim.arrive(next_arrival as u32, a, placer);
                next_arrival += 1;
            }
            (_, Some(_)) => {
                let Reverse((t, _, kind, a, b)) = sim.heap.pop().expect("peeked");
                let now = f64::from_bits(t);
                let freed_wse = match kind {
                    EV_GPU_STEP => {
                        sim.gpu_step_end(a as usize, b, now);
                        false
                    }
                    EV_WSE_FIRST => {
                        sim.wse_first(a as usize, b, now);
                        false
                    }
                    _ => sim.wse_done(a as usize, b, now),
                };
                sim.drain(now, placer);
                // A freed WSE slot goes to the requests waiting at the router for one first
                // (as in the live router, whose rebalancing runs on a timer), then to a
                // rebalanced generation.
                if freed_wse && sim.moves_policy.is_some() {
                    sim.rebalance_waiting(now);
                }
            }
            (None, None) => break,
            (Some(_), None) => unreachable!("handled by the first arm"),
        }
    }
    // Whatever still waits at the router was never served.
    for q in &sim.queues {
        for &(r, _) in q {
            sim.outcomes[r as usize].shed = true;
        }
    }
    for &(r, _, _) in &sim.awaiting_wse {
        sim.outcomes[r as usize].shed = true;
    }
    let evicted_blocks = sim.workers.iter().map(|w| w.cache.evicted).sum();
    let kv_overcommitted = sim.workers.iter().map(|w| w.cache.overcommitted).sum();
    let HedgeAccount { tokens, spent } = sim.budget.lane(LaneName::LatencyCritical);
    sim.stats.hedge_budget_tokens = tokens;
    sim.stats.hedge_budget_spent = spent;
    RunResult {
        outcomes: sim.outcomes,
        price,
        pool,
        wall_time_s: started.elapsed().as_secs_f64(),
        events: sim.events,
        evicted_blocks,
        kv_overcommitted,
        moves: sim.stats,
    }
}

type Event = (u64, u64, u8, u32, u32);

/// Workers a router prefix lookup reports at most (the live index's default `max_hits`).
const KV_MAX_HITS: usize = 16;

struct Sim<'a> {
    profiles: &'a Profiles,
    policy: &'a PolicyDocument,
    requests: &'a [SimRequest],
    view: ClusterView,
    workers: Vec<SimWorker>,
    outcomes: Vec<Outcome>,
    heap: BinaryHeap<Reverse<Event>>,
    seq: u64,
    queues: [VecDeque<(u32, f64)>; 2],
    /// Latency-critical requests waiting for a WSE slot instead of spilling to a GPU late:
    /// (request, waiting since, give up and spill at), oldest first.
    awaiting_wse: VecDeque<(u32, f64, f64)>,
    events: u64,
    /// The router's picture of the workers' caches, from their published stores/evictions.
    kv: RouterKvView,
    scratch: Vec<u64>,
    /// See [`Placer::moves_policy`]; `None` when it enables neither moves nor hedges.
    moves_policy: Option<PolicyDocument>,
    /// Generations on WSE slots, by (request, worker).
    wse_runs: HashMap<(u32, u32), WseRun>,
    /// Hedged requests whose first token has not come yet.
    races: HashMap<u32, Race>,
    /// (request, GPU): latency-critical requests dispatched to a GPU, maybe moved or finished
    /// since (checked when read), for rebalancing.
    lc_on_gpus: Vec<(u32, u32)>,
    budget: HedgeBudget,
    stats: MoveStats,
}

/// A generation on a WSE slot: its timeline is known when it starts.
#[derive(Debug, Clone, Copy)]
struct WseRun {
    start_ms: f64,
    first_ms: f64,
    finish_ms: f64,
    uncached: u32,
    /// Output tokens generated before it moved here.
    done: u32,
}

/// The two copies of a hedged request.
#[derive(Debug, Clone, Copy)]
struct Race {
    primary: u32,
    second: u32,
    /// Hedge prefill tokens charged to the budget.
    charged: u64,
}

impl Sim<'_> {
    fn push(&mut self, at_ms: f64, kind: u8, a: u32, b: u32) {
        self.seq += 1;
        // Non-negative f64s order like their bit patterns.
        self.heap
            .push(Reverse((at_ms.max(0.0).to_bits(), self.seq, kind, a, b)));
    }

    fn arrive(&mut self, r: u32, now: f64, placer: &mut dyn Placer) {
        let request = &self.requests[r as usize];
        if self.moves_policy.is_some() {
            self.budget
                .record(request.lane, None, request.prompt_tokens);
        }
        let lane = request.lane.index();
        if self.queues[lane].is_empty() {
            match placer.place(&self.view, &self.kv, request, r, self.policy) {
                Decision::Place(p) => {
                    let ahead = self.awaiting_wse.len();
                    match placer.await_wse(&self.view, &self.kv, request, r, &p, 0.0, ahead) {
                        Some(left_ms) => self.awaiting_wse.push_back((r, now, now + left_ms)),
                        None => self.start(r, p, now),
                    }
                    return;
                }
                Decision::Reject(_) => {
                    self.outcomes[r as usize].shed = true;
                    return;
                }
                Decision::Queue => {}
            }
        }
        let depths = [self.queues[0].len() as u32, self.queues[1].len() as u32];
        match admit(request.lane, depths, self.policy) {
            Admission::Queue => {}
            Admission::QueueEvicting(victim) => {
                if let Some((v, _)) = self.queues[victim.index()].pop_back() {
                    self.outcomes[v as usize].shed = true;
                }
            }
            Admission::Shed { .. } => {
                self.outcomes[r as usize].shed = true;
                return;
            }
        }
        let deadline = switchyard_policy::queue_deadline_ms(now, request.lane, self.policy);
        self.queues[lane].push_back((r, deadline));
    }

    /// Places queued requests — those awaiting a WSE slot, then latency-critical, then
    /// cost-sensitive, each in order — while the placer finds slots.
    fn drain(&mut self, now: f64, placer: &mut dyn Placer) {
        let mut i = 0;
        while let Some(&(r, since, give_up)) = self.awaiting_wse.get(i) {
            let request = &self.requests[r as usize];
            match placer.place(&self.view, &self.kv, request, r, self.policy) {
                Decision::Place(p) => {
                    let keep_waiting = matches!(p.route, Route::SpillToGpu(_))
                        && now < give_up
                        && placer
                            .await_wse(&self.view, &self.kv, request, r, &p, now - since, i)
                            .is_some();
                    if keep_waiting {
                        i += 1;
                    } else {
                        self.awaiting_wse.remove(i);
                        self.start(r, p, now);
                    }
                }
                // Every slot is busy: it waits on.
                Decision::Queue => i += 1,
                Decision::Reject(_) => {
                    self.awaiting_wse.remove(i);
                    self.outcomes[r as usize].shed = true;
                }
            }
        }
        for lane in 0..2 {
            while let Some(&(r, deadline)) = self.queues[lane].front() {
                if deadline < now {
                    self.queues[lane].pop_front();
                    self.outcomes[r as usize].shed = true;
                    continue;
                }
                let request = &self.requests[r as usize];
                match placer.place(&self.view, &self.kv, request, r, self.policy) {
                    Decision::Place(p) => {
                        self.queues[lane].pop_front();
                        self.start(r, p, now);
                    }
                    Decision::Reject(_) => {
                        self.queues[lane].pop_front();
                        self.outcomes[r as usize].shed = true;
                    }
                    Decision::Queue => break,
                }
            }
        }
    }

    /// Starts a placed request: through the move and hedge decisions when the placer's policy
    /// enables them, else on the placement.
    fn start(&mut self, r: u32, p: Placement, now: f64) {
        if self.moves_policy.is_some() {
            self.start_with_moves(r, p, now);
        } else {
            let spilled = p.pool != switchyard_policy::home_pool(self.requests[r as usize].lane);
            self.dispatch(r, &p, spilled, now);
        }
    }

    fn dispatch(&mut self, r: u32, p: &Placement, spilled: bool, now: f64) {
        let w = p.worker;
        let outcome = &mut self.outcomes[r as usize];
        outcome.worker = w as u32;
        outcome.dispatched_ms = now;
        outcome.served = true;
        outcome.spilled = spilled;
        outcome.predicted_cached_tokens = p.cached_tokens;
        outcome.predicted_ttft_ms = p.predicted_ttft_ms;
        let cached = self.run_on(r, w, 0, now);
        self.outcomes[r as usize].cached_tokens = cached;
    }

    /// Runs request `r` on worker `w`, `done` of its output tokens already generated (a moved
    /// generation prefills them with its prompt). Returns the prompt tokens reused from the
    /// worker's cache.
    fn run_on(&mut self, r: u32, w: usize, done: u32, now: f64) -> u32 {
        let request = &self.requests[r as usize];
        let mut evicted = std::mem::take(&mut self.scratch);
        evicted.clear();
        let hits = self.workers[w].cache.acquire(
            request.full_blocks(),
            request.anonymous_blocks(),
            &mut evicted,
        );
        for &h in &evicted {
            self.kv.removed(w as u32, h);
        }
        self.scratch = evicted;
        // The last context token is always computed (sampling needs its logits).
        let cached = (hits * TRACE_BLOCK_TOKENS).min(request.prompt_tokens.saturating_sub(1));
        let uncached = request.prompt_tokens + done - cached;
        self.stats.prefill_tokens += u64::from(uncached);
        let racing = self.races.contains_key(&r);
        match &mut self.workers[w].kind {
            Kind::Gpu(g) => {
                g.pending.push((r, uncached, done));
                g.unprefilled += u64::from(uncached);
                if request.lane == LaneName::LatencyCritical {
                    g.unprefilled_latency_critical += u64::from(uncached);
                }
                let (outstanding, queued, queued_lc) = (
                    (g.running.len() + g.pending.len()) as u32,
                    g.unprefilled,
                    g.unprefilled_latency_critical,
                );
                let stepping = g.stepping;
                self.view.update(w, |s| {
                    s.outstanding = outstanding;
                    s.queued_prompt_tokens = queued;
                    s.queued_latency_critical_prompt_tokens = Some(queued_lc);
                });
                if !stepping {
                    self.gpu_step_start(w, now);
                } else {
                    self.gpu_cut_segment(w, now);
                }
                if request.lane == LaneName::LatencyCritical && !racing {
                    self.lc_on_gpus.push((r, w as u32));
                }
            }
            Kind::Wse { active, runs } => {
                *active += 1;
                runs.push(r);
                let active = *active;
                let wse = &self.profiles.wse;
                let first = now
                    + wse.ttft_overhead_ms
                    + 1000.0 * f64::from(uncached) / wse.prefill_tokens_per_s;
                let finish = first
                    + 1000.0 * f64::from(request.output_tokens - done - 1)
                        / wse.decode_tokens_per_s;
                self.wse_runs.insert(
                    (r, w as u32),
                    WseRun {
                        start_ms: now,
                        first_ms: first,
                        finish_ms: finish,
                        uncached,
                        done,
                    },
                );
                if racing {
                    // Its times count only if it wins the race.
                    self.push(first, EV_WSE_FIRST, w as u32, r);
                } else {
                    let outcome = &mut self.outcomes[r as usize];
                    if done == 0 {
                        outcome.first_token_ms = first;
                    }
                    outcome.finish_ms = finish;
                }
                self.view.update(w, |s| s.outstanding = active);
                self.push(finish, EV_WSE_DONE, w as u32, r);
            }
        }
        cached
    }

    fn gpu_step_start(&mut self, w: usize, now: f64) {
        let gpu = &self.profiles.gpu;
        let Kind::Gpu(g) = &mut self.workers[w].kind else {
            unreachable!("gpu step on a wse worker")
        };
        for (r, uncached, done) in g.pending.drain(..) {
            g.running.push(Seq {
                request: r,
                remaining: 0,
                prefilled: false,
                prefill_left: uncached,
                latency_critical: self.requests[r as usize].lane == LaneName::LatencyCritical,
                uncached,
                done,
                joined_ms: now,
            });
        }
        // This step's prefill: everything waiting, or one chunk, in the candle engine's order
        // (`worker-gpu`'s `next_to_prefill`): latency-critical prompts first; among equals the
        // shortest remaining prefill, less what the time waited would have prefilled (so a
        // long prompt moves up as it waits).
        // Chunks are paced as the candle engine paces them: the fastest decode rate promised to
        // a sequence decoding here bounds the step's prefill (`switchyard_worker_gpu::pacing`).
        let mut budget: u64 = if gpu.prefill_chunk_tokens == 0 {
            u64::MAX
        } else {
            let requests = self.requests;
            let promised = g
                .running
                .iter()
                .filter(|s| s.prefilled)
                .map(|s| requests[s.request as usize].min_tokens_per_s)
                .fold(0.0, f64::max);
            let decode_step_s =
                (gpu.step_base_ms + gpu.step_per_seq_ms * g.running.len() as f64) / 1000.0;
            paced_chunk(
                gpu.prefill_chunk_tokens as usize,
                promised,
                decode_step_s,
                gpu.prefill_tokens_per_s,
            ) as u64
        };
        // The chunk in force, reported as a live engine reports it.
        let chunk = u32::try_from(budget).unwrap_or(0);
        let urgency = |s: &Seq| {
            let waited_s = (now - s.joined_ms) / 1000.0;
            (
                !s.latency_critical,
                f64::from(s.prefill_left) - gpu.prefill_tokens_per_s * waited_s,
            )
        };
        let mut order: Vec<usize> = (0..g.running.len())
            .filter(|&i| !g.running[i].prefilled && g.running[i].prefill_left > 0)
            .collect();
        order.sort_by(|&a, &b| {
            let (ua, ub) = (urgency(&g.running[a]), urgency(&g.running[b]));
            ua.0.cmp(&ub.0).then(ua.1.total_cmp(&ub.1))
        });
        let mut prefill = 0u64;
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &mut g.running[i];
            let take = u64::from(s.prefill_left).min(budget);
            s.prefill_left -= take as u32;
            budget -= take;
            prefill += take;
            if s.latency_critical {
                g.unprefilled_latency_critical -= take;
            }
        }
        g.unprefilled -= prefill;
        let batch = g.running.len() as f64;
        let step = gpu.step_base_ms
            + gpu.step_per_seq_ms * batch
            + 1000.0 * prefill as f64 / gpu.prefill_tokens_per_s;
        g.stepping = true;
        g.decode_only = g.running.iter().all(|s| s.prefilled);
        g.seg_start = now;
        g.seg_step_ms = step;
        // Decode-only: run until the first sequence finishes (or a request arrives).
        g.seg_steps = if g.decode_only {
            g.running
                .iter()
                .map(|s| s.remaining)
                .min()
                .unwrap_or(1)
                .max(1)
        } else {
            1
        };
        g.version = g.version.wrapping_add(1);
        let (steps, version) = (g.seg_steps, g.version);
        // Prefill steps slow every running stream down: the reported decode rate is measured
        // over recent steps, prefills included (a live worker's tokens/s over active streams).
        // A run of `steps` equal steps weighs as that many samples.
        let keep = 0.7f64.powi(steps as i32);
        g.step_ewma_ms = if g.step_ewma_ms > 0.0 {
            keep * g.step_ewma_ms + (1.0 - keep) * step
        } else {
            step
        };
        let decode = 1000.0 / g.step_ewma_ms;
        // The step in flight delays any new prompt's first token: a worker reports it as its
        // time-to-first-token overhead (as a live worker's load report would).
        let (outstanding, unprefilled, unprefilled_lc) = (
            g.running.len() as u32,
            g.unprefilled,
            g.unprefilled_latency_critical,
        );
        self.view.update(w, |s| {
            s.outstanding = outstanding;
            s.queued_prompt_tokens = unprefilled;
            s.queued_latency_critical_prompt_tokens = Some(unprefilled_lc);
            s.decode_tokens_per_s = decode;
            s.ttft_overhead_ms = step;
            if chunk > 0 {
                s.prefill_chunk_tokens = chunk;
            }
        });
        self.push(
            now + step * f64::from(steps),
            EV_GPU_STEP,
            w as u32,
            version,
        );
    }

    /// A request arrived during a run of decode-only steps: end the run at the boundary of
    /// the step in progress, so the request joins the next step.
    fn gpu_cut_segment(&mut self, w: usize, now: f64) {
        let Kind::Gpu(g) = &mut self.workers[w].kind else {
            unreachable!("gpu step on a wse worker")
        };
        if !g.decode_only || g.seg_steps <= 1 {
            return;
        }
        let done = ((now - g.seg_start) / g.seg_step_ms).floor().max(0.0) as u32;
        let steps = (done + 1).min(g.seg_steps);
        if steps == g.seg_steps {
            return;
        }
        g.seg_steps = steps;
        g.version = g.version.wrapping_add(1);
        let (at, version) = (g.seg_start + g.seg_step_ms * f64::from(steps), g.version);
        self.push(at, EV_GPU_STEP, w as u32, version);
    }

    fn gpu_step_end(&mut self, w: usize, version: u32, now: f64) {
        let worker = &mut self.workers[w];
        let Kind::Gpu(g) = &mut worker.kind else {
            unreachable!("gpu step on a wse worker")
        };
        if version != g.version {
            return; // superseded by a cut segment
        }
        let steps = g.seg_steps;
        let cache = &mut worker.cache;
        let mut stored = std::mem::take(&mut self.scratch);
        stored.clear();
        let mut first_tokens = Vec::new();
        let mut i = 0;
        while i < g.running.len() {
            let seq = &mut g.running[i];
            let outcome = &mut self.outcomes[seq.request as usize];
            let request = &self.requests[seq.request as usize];
            if seq.prefilled {
                seq.remaining -= steps;
            } else if seq.prefill_left > 0 {
                // Its prompt needs more chunks.
                i += 1;
                continue;
            } else {
                seq.prefilled = true;
                if seq.done == 0 {
                    outcome.first_token_ms = now;
                    first_tokens.push(seq.request);
                }
                // The prefill step samples the next token.
                seq.remaining = request.output_tokens - seq.done - 1;
                // Its prompt's KV is computed: the worker stores and publishes the blocks.
                cache.prefilled(request.full_blocks(), &mut stored);
            }
            if seq.remaining == 0 {
                outcome.finish_ms = now;
                cache.release(request.full_blocks(), request.anonymous_blocks());
                // `remove`, not `swap_remove`: prompts are prefilled in admission order.
                g.running.remove(i);
            } else {
                i += 1;
            }
        }
        for &h in &stored {
            self.kv.stored(w as u32, h);
        }
        self.scratch = stored;
        g.stepping = false;
        let raced =
            !self.races.is_empty() && first_tokens.iter().any(|r| self.races.contains_key(r));
        let outstanding = (g.running.len() + g.pending.len()) as u32;
        if outstanding > 0 {
            // One view update for the finished and the next step together.
            self.gpu_step_start(w, now);
        } else {
            let idle_overhead = self.profiles.gpu.step_base_ms;
            self.view.update(w, |s| {
                s.outstanding = 0;
                s.ttft_overhead_ms = idle_overhead;
            });
        }
        if raced {
            for r in first_tokens {
                if self.races.contains_key(&r) {
                    self.win(r, w as u32, now);
                }
            }
        }
    }

    /// A WSE generation finished; whether it freed its slot (one that moved away or lost
    /// its race left it already).
    fn wse_done(&mut self, w: usize, r: u32, now: f64) -> bool {
        let live = self
            .wse_runs
            .get(&(r, w as u32))
            .is_some_and(|run| run.finish_ms.to_bits() == now.to_bits());
        if live {
            self.leave_wse(w, r, now);
        }
        live
    }

    /// Frees `r`'s slot on WSE worker `w`; returns its run. The router measures how long
    /// slots are held (`slot_turnover_ms`), as the live router's links do.
    fn leave_wse(&mut self, w: usize, r: u32, now: f64) -> WseRun {
        let run = self
            .wse_runs
            .remove(&(r, w as u32))
            .expect("a live run on the worker");
        let Kind::Wse { active, runs } = &mut self.workers[w].kind else {
            unreachable!("wse completion on a gpu worker")
        };
        *active -= 1;
        if let Some(i) = runs.iter().position(|&x| x == r) {
            runs.swap_remove(i);
        }
        let active = *active;
        let held_ms = now - run.start_ms;
        self.view.update(w, |s| {
            s.outstanding = active;
            s.slot_turnover_ms =
                switchyard_policy::view::turnover_ewma(s.slot_turnover_ms, held_ms);
        });
        run
    }
}

/// Hashes of affinity keys: a conversation is named by its first two prompt blocks (the first
/// is often a system prompt shared by everyone).
pub fn affinity_of(hash_ids: &[u64]) -> Option<u64> {
    match hash_ids {
        [] => None,
        [a] => Some(switchyard_policy::mix(*a)),
        [a, b, ..] => Some(switchyard_policy::mix(*a ^ switchyard_policy::mix(*b))),
    }
}

/// Keeps the prefix map of the prefix-aware baseline: block hash → last worker sent it.
#[derive(Debug, Default)]
pub struct PrefixTree {
    owner: HashMap<u64, u32>,
}

impl PrefixTree {
    /// The worker holding the longest cached prefix of `hash_ids`, and its length in blocks.
    pub fn longest_match(&self, hash_ids: &[u64]) -> Option<(u32, usize)> {
        let mut best = None;
        for (k, h) in hash_ids.iter().enumerate() {
            match self.owner.get(h) {
                Some(&w) => best = Some((w, k + 1)),
                None => break,
            }
        }
        best
    }

    pub fn record(&mut self, hash_ids: &[u64], worker: u32) {
        for &h in hash_ids {
            self.owner.insert(h, worker);
        }
    }
}
