//! The routing brain: sans-IO, plain functions over plain data, so the live router, the
//! control plane and the simulator (`switchyard-bench simulate`) run exactly the same code. No
//! clock is read here: callers pass `now`.
//!
//! - [`classify`]: which lane a request belongs to, its SLO, and why.
//! - [`document`]: the policy document (lanes, SLOs, tenants, rules, limits) and its validation.
//! - [`view`]: the cluster as the policy sees it, indexed for cheap decisions at 10 000 workers.
//! - [`place`]: SLO-predictive worker choice with cached prefixes, rendezvous affinity and
//!   spill.
//! - [`admit`]: bounded per-lane router queues; cost-sensitive work is shed first.
//! - [`moves`]: moving running generations on purpose (preemption, rebalancing, drain) and
//!   budgeted hedging of latency-critical requests.

pub mod classify;
pub mod document;
#[cfg(test)]
mod fuzz;
pub mod moves;
mod pool;
pub mod view;

use crate::classify::Classification;
use document::{LaneName, PolicyDocument};
pub use pool::Pool;
use view::{AFFINITY_GROUPS, pool_index};
pub use view::{ClusterView, WorkerState, mix, stable_hash};

/// The pool a lane prefers.
pub fn home_pool(lane: LaneName) -> Pool {
    match lane {
        LaneName::LatencyCritical => Pool::Wse,
        LaneName::CostSensitive => Pool::Gpu,
    }
}

/// What placement needs to know of a request beyond its classification.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub model: &'a str,
    pub prompt_tokens: u32,
    /// Hash of the affinity key (see [`stable_hash`]); `None` = no affinity.
    pub affinity: Option<u64>,
    /// Randomness for candidate sampling (e.g. a hash of the request id): the policy stays a
    /// pure function of its inputs.
    pub seed: u64,
    /// The prompt's cached prefix per worker, as (view index, cached prompt tokens), for the
    /// workers the router's prefix index names (sparse: every other worker holds none).
    /// `None`: the router could not look the prompt up (no token ids); then every worker is
    /// treated as one that publishes no KV (rendezvous affinity only).
    pub prefix: Option<&'a [(usize, u32)]>,
}

impl RequestInfo<'_> {
    /// Prompt tokens worker `w` holds, per the prefix index (at most the prompt).
    pub fn cached_tokens(&self, w: usize) -> u32 {
        self.prefix
            .and_then(|hits| hits.iter().find(|(i, _)| *i == w))
            .map_or(0, |&(_, tokens)| tokens.min(self.prompt_tokens))
    }
}

/// How a placement came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The lane's home pool.
    Home,
    /// Latency-critical on a GPU, for the reason given.
    SpillToGpu(SpillCause),
    /// Latency-critical on a GPU predicted well within its SLO while the WSE is scarce: its
    /// slots are kept for prompts only the WSE serves in time
    /// (`placement.save_wse_above_utilisation`).
    SaveWse,
    /// Cost-sensitive on an idle WSE slot.
    BorrowWse,
}

/// Why a latency-critical request went to a GPU rather than its home, the WSE pool — what an
/// operator needs to tell a WSE pool that is too slow from one that is full or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpillCause {
    /// A WSE slot was free, but none was predicted to meet the SLO (or a GPU was sooner).
    WseTooSlow,
    /// Every slot of the WSE workers serving the model was taken.
    WseFull,
    /// No WSE worker serving the model takes requests: none registered, all drained or
    /// unreachable.
    NoWseWorker,
}

impl SpillCause {
    fn describe(self) -> &'static str {
        match self {
            SpillCause::WseTooSlow => "no wse slot meets the slo",
            SpillCause::WseFull => "every wse slot is taken",
            SpillCause::NoWseWorker => "no wse worker is taking requests",
        }
    }
}

/// A chosen worker.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Index in the [`ClusterView`].
    pub worker: usize,
    pub pool: Pool,
    pub route: Route,
    /// The worker is the rendezvous owner of the request's affinity key.
    pub affinity: bool,
    pub predicted_ttft_ms: f64,
    /// Prompt tokens the prefix index says the worker holds (what it should reuse).
    pub cached_tokens: u32,
    /// The request's prompt tokens, for the reason.
    pub prompt_tokens: u32,
}

impl Placement {
    /// The reason as a closed set of names, for metric labels: `home`, `home_affinity`,
    /// `spill_to_gpu`, `save_wse`, `borrow_wse`.
    pub fn reason_label(&self) -> &'static str {
        match (self.route, self.affinity) {
            (Route::Home, false) => "home",
            (Route::Home, true) => "home_affinity",
            (Route::SpillToGpu(_), _) => "spill_to_gpu",
            (Route::SaveWse, _) => "save_wse",
            (Route::BorrowWse, _) => "borrow_wse",
        }
    }

    /// A short reason for `Accepted.reason` and logs.
    pub fn reason(&self) -> String {
        let route = match self.route {
            Route::Home => format!("pool={}", self.pool),
            Route::SpillToGpu(cause) => format!("spill=gpu ({})", cause.describe()),
            Route::SaveWse => "spill=gpu (wse scarce; gpu well within the slo)".to_string(),
            Route::BorrowWse => "borrow=wse (gpu busy, wse idle)".to_string(),
        };
        let affinity = if self.affinity { " affinity" } else { "" };
        let cached = if self.cached_tokens > 0 {
            format!(" cached={}/{}", self.cached_tokens, self.prompt_tokens)
        } else {
            String::new()
        };
        format!(
            "{route}{affinity}{cached} predicted_ttft_ms={:.0}",
            self.predicted_ttft_ms
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("model {0:?} is not served by any worker")]
    UnknownModel(String),
    #[error("no worker serving model {0:?} is available")]
    NoWorker(String),
    /// Workers serve the model, but none in the pools the request's lane may use (its own,
    /// and the other when the lane spills) takes requests now: drained, say.
    #[error(
        "no {pool} worker serving model {model:?} is taking requests (drained or unreachable) \
         and the {} lane does not spill to the {other} pool",
        .lane.as_str()
    )]
    NoWorkerForLane {
        model: String,
        lane: LaneName,
        pool: Pool,
        other: Pool,
    },
}

/// The outcome of one placement attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Place(Placement),
    /// Workers exist but none may take the request now: it waits at the router (if
    /// [`admit`] lets it) and is placed again when a slot frees.
    Queue,
    Reject(PlacementError),
}

fn prefill_rate(w: &WorkerState, policy: &PolicyDocument) -> f64 {
    if w.prefill_tokens_per_s > 0.0 {
        w.prefill_tokens_per_s
    } else {
        policy.placement.default_prefill_tokens_per_s
    }
}

/// Per-stream decode rate of `w`.
pub fn decode_rate(w: &WorkerState, policy: &PolicyDocument) -> f64 {
    if w.decode_tokens_per_s > 0.0 {
        w.decode_tokens_per_s
    } else {
        policy.placement.default_decode_tokens_per_s
    }
}

/// Prompt tokens a new `lane` prompt waits behind on `w`. Engines prefill latency-critical
/// prompts first (the step in flight aside, which `ttft_overhead_ms` covers), so a
/// latency-critical prompt waits only behind the latency-critical tokens queued there — when
/// the worker reports them — and a cost-sensitive one behind every queued token.
pub fn queued_ahead(w: &WorkerState, lane: LaneName) -> u64 {
    match lane {
        LaneName::LatencyCritical => w
            .queued_latency_critical_prompt_tokens
            .map_or(w.queued_prompt_tokens, |lc| lc.min(w.queued_prompt_tokens)),
        LaneName::CostSensitive => w.queued_prompt_tokens,
    }
}

/// Predicted time to first token of a `prompt_tokens` request of `lane` on `w`: fixed
/// overhead, the prompt tokens queued ahead of it ([`queued_ahead`]) plus its own (less the
/// cached share on its affinity worker) at the worker's prefill rate, and one decode step.
pub fn predicted_ttft_ms(
    w: &WorkerState,
    lane: LaneName,
    prompt_tokens: u32,
    affinity: bool,
    policy: &PolicyDocument,
) -> f64 {
    let own = if affinity {
        f64::from(prompt_tokens) * (1.0 - policy.placement.affinity_prefill_discount)
    } else {
        f64::from(prompt_tokens)
    };
    ttft_with_own_prefill(w, lane, own, policy)
}

/// Predicted time to first token on `w` when `cached_tokens` of the prompt's `prompt_tokens`
/// are in its prefix cache: only the rest is prefilled.
pub fn predicted_ttft_cached_ms(
    w: &WorkerState,
    lane: LaneName,
    prompt_tokens: u32,
    cached_tokens: u32,
    policy: &PolicyDocument,
) -> f64 {
    ttft_with_own_prefill(
        w,
        lane,
        f64::from(prompt_tokens.saturating_sub(cached_tokens)),
        policy,
    )
}

fn ttft_with_own_prefill(
    w: &WorkerState,
    lane: LaneName,
    own: f64,
    policy: &PolicyDocument,
) -> f64 {
    let prefill = queued_ahead(w, lane) as f64 + own;
    let step_ms = 1000.0 / decode_rate(w, policy);
    // A chunked engine prefills one chunk per step, and every step also decodes its running
    // sequences: the prompt waits a step for each chunk ahead of its last, beyond the
    // prefill compute itself (the measured step time, from the decode rate, covers both).
    let interleaved_steps = match w.prefill_chunk_tokens {
        0 => 0.0,
        chunk => ((prefill / f64::from(chunk)).ceil() - 1.0).max(0.0),
    };
    w.ttft_overhead_ms
        + 1000.0 * prefill / prefill_rate(w, policy)
        + interleaved_steps * step_ms
        + step_ms
}

/// Busy share of `w`'s slots.
fn utilisation(w: &WorkerState) -> f64 {
    f64::from(w.outstanding.min(w.max_concurrent)) / f64::from(w.max_concurrent.max(1))
}

/// A candidate worker, scored.
#[derive(Debug, Clone, Copy)]
struct Scored {
    worker: usize,
    affinity: bool,
    cached_tokens: u32,
    predicted_ttft_ms: f64,
    /// See [`score`].
    score: f64,
}

/// A worker the policy scored for a request, as [`place_traced`] reports it (for the decision
/// feed: what the router considered and predicted, not a recomputation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Considered {
    /// Index in the [`ClusterView`].
    pub worker: usize,
    pub predicted_ttft_ms: f64,
    pub cached_tokens: u32,
    /// See `score` (lower is better).
    pub score: f64,
    pub affinity: bool,
    pub meets_slo: bool,
}

/// The placement score of a candidate, lower is better (milliseconds):
///
/// `predicted TTFT with only the uncached prompt prefilled` (cache hit and queued load)
/// `+ load_weight_ms × utilisation` (a busier worker decodes slower and has less headroom)
/// `+ cost_weight_ms × cost_per_mtok` (price differences inside a pool).
///
/// Candidates that meet the lane's TTFT SLO always rank before those that do not.
fn score(w: &WorkerState, predicted_ttft_ms: f64, policy: &PolicyDocument) -> f64 {
    predicted_ttft_ms
        + policy.placement.load_weight_ms * utilisation(w)
        + policy.placement.cost_weight_ms * w.cost_per_mtok
}

/// The rendezvous owner of `key` among the available, non-excluded workers of `pool` serving
/// `model`: a worker joining or leaving moves only the keys it wins or owned.
pub fn affinity_owner(
    view: &ClusterView,
    model: &str,
    pool: Pool,
    key: u64,
    exclude: &[usize],
) -> Option<usize> {
    let m = view.model_index(model)?;
    owner_in(view, m, pool, key, exclude)
}

fn owner_in(
    view: &ClusterView,
    m: usize,
    pool: Pool,
    key: u64,
    exclude: &[usize],
) -> Option<usize> {
    let index = &view.pools[m][pool_index(pool)];
    if index.available == 0 {
        return None;
    }
    let best_in_group = |g: usize| {
        index.groups[g]
            .iter()
            .filter(|&&w| view.worker(w as usize).available && !exclude.contains(&(w as usize)))
            .max_by_key(|&&w| (mix(key ^ view.id_hash(w)), std::cmp::Reverse(w)))
            .map(|&w| w as usize)
    };
    let mut order = [(0u64, 0u8); AFFINITY_GROUPS];
    for (g, slot) in order.iter_mut().enumerate() {
        *slot = (mix(key ^ mix(g as u64 + 1)), g as u8);
    }
    // The groups in rank order until one has an owner, ranked one at a time and only among
    // groups with members: usually the first has one, and with fewer workers than groups most
    // are empty (sorting all of them for every placement was most of a placement's cost).
    let mut passed = [false; AFFINITY_GROUPS];
    loop {
        let &(_, g) = order
            .iter()
            .filter(|&&(_, g)| !passed[g as usize] && !index.groups[g as usize].is_empty())
            .max()?;
        if let Some(w) = best_in_group(g as usize) {
            return Some(w);
        }
        passed[g as usize] = true;
    }
}

/// The best worker with a free slot in `pool`: the lowest [`score`] (SLO-meeting first) among
/// a sample of `placement.choices` free workers (all of them when few) and every free worker
/// the prefix index says holds a prefix of the prompt; the affinity owner preferred while
/// within `affinity_slack_ms` of the best — for workers that publish no KV (or when the prompt
/// could not be looked up), whose cache the router can only assume. `None` when the pool has
/// no free worker.
#[allow(clippy::too_many_arguments)]
fn best_in_pool(
    view: &ClusterView,
    m: usize,
    pool: Pool,
    request: &RequestInfo<'_>,
    lane: LaneName,
    policy: &PolicyDocument,
    slo_ms: f64,
    exclude: &[usize],
    accept: impl Fn(usize) -> bool,
    trace: &mut dyn FnMut(Considered),
) -> Option<Scored> {
    let free = &view.pools[m][pool_index(pool)].free;
    if free.is_empty() {
        return None;
    }
    let ok = |w: usize| !exclude.contains(&w) && accept(w);
    let evaluate = |w: usize, affinity: bool| {
        let worker = view.worker(w);
        let cached_tokens = request.cached_tokens(w);
        let predicted_ttft_ms = if affinity && cached_tokens == 0 {
            predicted_ttft_ms(worker, lane, request.prompt_tokens, true, policy)
        } else {
            predicted_ttft_cached_ms(worker, lane, request.prompt_tokens, cached_tokens, policy)
        };
        Scored {
            worker: w,
            affinity,
            cached_tokens,
            predicted_ttft_ms,
            score: score(worker, predicted_ttft_ms, policy),
        }
    };
    let misses = |s: &Scored| s.predicted_ttft_ms > slo_ms;
    let mut traced = |s: &Scored| {
        trace(Considered {
            worker: s.worker,
            predicted_ttft_ms: s.predicted_ttft_ms,
            cached_tokens: s.cached_tokens,
            score: s.score,
            affinity: s.affinity,
            meets_slo: !misses(s),
        })
    };
    let better = |a: &Scored, b: &Scored| {
        misses(a)
            .cmp(&misses(b))
            .then(a.score.total_cmp(&b.score))
            .then_with(|| {
                let (wa, wb) = (view.worker(a.worker), view.worker(b.worker));
                (u64::from(wa.outstanding) * u64::from(wb.max_concurrent))
                    .cmp(&(u64::from(wb.outstanding) * u64::from(wa.max_concurrent)))
            })
            .then(a.worker.cmp(&b.worker))
            .is_lt()
    };
    let mut best: Option<Scored> = None;
    let mut consider = |w: usize| {
        if ok(w) {
            let candidate = evaluate(w, false);
            traced(&candidate);
            if best.is_none_or(|b| better(&candidate, &b)) {
                best = Some(candidate);
            }
        }
    };
    if free.len() <= policy.placement.scan_below as usize {
        free.iter().for_each(|&w| consider(w as usize));
    } else {
        let mut seed = request.seed;
        let mut found = false;
        for _ in 0..policy.placement.choices {
            seed = mix(seed);
            let w = free[(seed % free.len() as u64) as usize] as usize;
            found |= ok(w);
            consider(w);
        }
        if !found {
            // Every sample was excluded or unacceptable: fall back to a scan.
            free.iter().for_each(|&w| consider(w as usize));
        }
        // Workers holding a prefix of the prompt compete too.
        for &(w, _) in request.prefix.unwrap_or_default() {
            if w < view.len()
                && view.worker(w).pool == pool
                && view.worker(w).has_free_slot()
                && view.serves(w, m)
            {
                consider(w);
            }
        }
    }
    let owner = request
        .affinity
        .and_then(|key| owner_in(view, m, pool, key, exclude))
        .filter(|&w| {
            let worker = view.worker(w);
            worker.has_free_slot() && ok(w) && !(worker.prefix_cache && request.prefix.is_some())
        });
    if let Some(owner) = owner {
        let candidate = evaluate(owner, true);
        traced(&candidate);
        let preferred = best.is_none_or(|b| {
            misses(&candidate) <= misses(&b)
                && candidate.score <= b.score + policy.placement.affinity_slack_ms
                && view.worker(owner).outstanding
                    <= view.worker(b.worker).outstanding
                        + policy.placement.affinity_max_extra_outstanding
        });
        if preferred {
            return Some(candidate);
        }
    }
    best
}

/// Chooses a worker for a classified request, never one in `exclude` (view indices), never one
/// that is unavailable (draining, dead, link down) or at capacity.
///
/// Latency-critical: the WSE pool while a slot there meets the SLO; else (spill allowed) the
/// best GPU meeting the SLO and the lane's minimum decode rate; else the better of the two;
/// when no WSE worker can take the request at all, any free GPU.
/// Cost-sensitive: the GPU pool outside its latency reserve (`gpu_reserve_for_latency` of its
/// workers, see [`ClusterView::in_reserve`]), kept idle for latency-critical spill; else (spill allowed, WSE utilisation under the lane's threshold) an
/// idle WSE slot. Nothing free: [`Decision::Queue`].
pub fn place(
    view: &ClusterView,
    class: &Classification,
    request: &RequestInfo<'_>,
    policy: &PolicyDocument,
    exclude: &[usize],
) -> Decision {
    place_traced(view, class, request, policy, exclude, &mut |_| {})
}

/// [`place`], telling `trace` every candidate it scores (a worker may be told twice).
pub fn place_traced(
    view: &ClusterView,
    class: &Classification,
    request: &RequestInfo<'_>,
    policy: &PolicyDocument,
    exclude: &[usize],
    trace: &mut dyn FnMut(Considered),
) -> Decision {
    let Some(m) = view.model_index(request.model) else {
        return Decision::Reject(PlacementError::UnknownModel(request.model.to_string()));
    };
    let reachable = |p: Pool| {
        let index = &view.pools[m][pool_index(p)];
        index.available as usize > exclude.len()
            || index
                .groups
                .iter()
                .flatten()
                .any(|&w| view.worker(w as usize).available && !exclude.contains(&(w as usize)))
    };
    if !Pool::ALL.iter().any(|&p| reachable(p)) {
        return Decision::Reject(PlacementError::NoWorker(request.model.to_string()));
    }
    let lane_policy = policy.lane(class.lane);
    // Waiting is for a busy pool, not an empty one: with nobody to free a slot, a queued
    // request would only be shed at the end of its lane's queue wait.
    let home = home_pool(class.lane);
    if !lane_policy.spill && !reachable(home) {
        return Decision::Reject(PlacementError::NoWorkerForLane {
            model: request.model.to_string(),
            lane: class.lane,
            pool: home,
            other: home.other(),
        });
    }
    let slo = class.ttft_slo_ms;
    let placed = |s: Scored, route| {
        Decision::Place(Placement {
            worker: s.worker,
            pool: view.worker(s.worker).pool,
            route,
            affinity: s.affinity,
            predicted_ttft_ms: s.predicted_ttft_ms,
            cached_tokens: s.cached_tokens,
            prompt_tokens: request.prompt_tokens,
        })
    };
    // The best free worker of `pool` that `accept` takes, for this request.
    let mut best_of = |pool: Pool, accept: &dyn Fn(usize) -> bool| {
        best_in_pool(
            view, m, pool, request, class.lane, policy, slo, exclude, accept, trace,
        )
    };
    match class.lane {
        LaneName::LatencyCritical => {
            let wse = best_of(Pool::Wse, &|_| true);
            let min_rate = class.min_tokens_per_s;
            // The best GPU to spill to, scored at most once (it may be asked twice below).
            let mut spill_gpu: Option<Option<Scored>> = None;
            let mut gpu = || {
                *spill_gpu.get_or_insert_with(|| {
                    best_of(Pool::Gpu, &|w| {
                        decode_rate(view.worker(w), policy) >= min_rate
                    })
                })
            };
            let placement = &policy.placement;
            // A WSE slot is scarce once the pool is this busy: a request a GPU serves well
            // within its SLO leaves it to the long prompts that only the WSE prefills in time.
            if lane_policy.spill
                && wse.is_some()
                && view.utilisation(Pool::Wse) >= placement.save_wse_above_utilisation
            {
                let within = placement.save_wse_gpu_ttft_fraction * slo;
                if let Some(g) = gpu().filter(|g| g.predicted_ttft_ms <= within) {
                    return placed(g, Route::SaveWse);
                }
            }
            if let Some(best) = wse.filter(|b| b.predicted_ttft_ms <= slo) {
                return placed(best, Route::Home);
            }
            if lane_policy.spill {
                let cause = match wse {
                    Some(_) => SpillCause::WseTooSlow,
                    None if reachable(Pool::Wse) => SpillCause::WseFull,
                    None => SpillCause::NoWseWorker,
                };
                let spill = Route::SpillToGpu(cause);
                match (gpu(), wse) {
                    (Some(g), _) if g.predicted_ttft_ms <= slo => return placed(g, spill),
                    (Some(g), Some(w)) if g.predicted_ttft_ms < w.predicted_ttft_ms => {
                        return placed(g, spill);
                    }
                    (Some(g), None) => return placed(g, spill),
                    _ => {}
                }
                // No WSE worker can take it, now or later (none serves the model, all are
                // drained, or it needs what none does): a GPU below the lane's decode rate
                // serves it, where waiting would end only in a shed.
                if !reachable(Pool::Wse)
                    && let Some(g) = best_of(Pool::Gpu, &|_| true)
                {
                    return placed(g, Route::SpillToGpu(SpillCause::NoWseWorker));
                }
            }
            match wse {
                Some(best) => placed(best, Route::Home),
                None => Decision::Queue,
            }
        }
        LaneName::CostSensitive => {
            // The reserve is kept idle for latency-critical spill: a GPU busy with long
            // prefills cannot give a spilled request its first token in time.
            let reserve = policy.placement.gpu_reserve_for_latency;
            let gpu = best_of(Pool::Gpu, &|w| !view.in_reserve_of(m, w, reserve));
            if let Some(best) = gpu {
                return placed(best, Route::Home);
            }
            if lane_policy.spill
                && view.utilisation(Pool::Wse) < lane_policy.spill_max_utilisation
                && let Some(borrowed) = best_of(Pool::Wse, &|_| true)
            {
                return placed(borrowed, Route::BorrowWse);
            }
            Decision::Queue
        }
    }
}

/// How much longer a latency-critical request should wait at the router for a WSE slot
/// rather than take `spill`, the GPU [`place`] chose for it (`Route::SpillToGpu`); `None`: take
/// the GPU now.
///
/// It waits (`placement.await_wse`) while every WSE slot serving its model is busy, the GPU is
/// predicted above `await_wse_gpu_ttft_fraction` of its SLO, and the pool's slot turnover
/// (`WorkerState::slot_turnover_ms`, measured) says the slot it would get — after the
/// `ahead` requests already waiting for one — frees early enough for the WSE to give the first
/// token within the SLO and sooner than the GPU would. `waited_ms`: time it has waited
/// already. The answer is the wait left before it should give up and take a GPU.
pub fn await_wse(
    view: &ClusterView,
    class: &Classification,
    request: &RequestInfo<'_>,
    spill: &Placement,
    waited_ms: f64,
    ahead: usize,
    policy: &PolicyDocument,
) -> Option<f64> {
    let placement = &policy.placement;
    let slo = class.ttft_slo_ms;
    if !placement.await_wse
        || class.lane != LaneName::LatencyCritical
        || !matches!(spill.route, Route::SpillToGpu(_))
        || spill.predicted_ttft_ms <= placement.await_wse_gpu_ttft_fraction * slo
    {
        return None;
    }
    let m = view.model_index(request.model)?;
    let index = &view.pools[m][pool_index(Pool::Wse)];
    if !index.free.is_empty() {
        // A free slot the policy passed over is late itself: waiting for another gains nothing.
        return None;
    }
    // Slots freed per millisecond across the pool, and the soonest first token a slot gives.
    let mut frees_per_ms = 0.0;
    let mut ttft_ms = f64::INFINITY;
    for &w in index.groups.iter().flatten() {
        let worker = view.worker(w as usize);
        if !worker.available || worker.slot_turnover_ms <= 0.0 {
            continue;
        }
        frees_per_ms += f64::from(worker.max_concurrent) / worker.slot_turnover_ms;
        let cached = request.cached_tokens(w as usize);
        ttft_ms = ttft_ms.min(predicted_ttft_cached_ms(
            worker,
            class.lane,
            request.prompt_tokens,
            cached,
            policy,
        ));
    }
    if frees_per_ms <= 0.0 {
        return None;
    }
    let slot_in_ms = (ahead as f64 + 1.0) / frees_per_ms;
    let left_ms = slo - waited_ms - ttft_ms;
    (slot_in_ms <= left_ms && slot_in_ms + ttft_ms < spill.predicted_ttft_ms).then_some(left_ms)
}

/// Failover placement for a request that already started (it must not be shed): the least
/// utilised available worker serving `model` outside `exclude`, capacity permitting or not —
/// the worker queues it.
pub fn fallback(view: &ClusterView, model: &str, exclude: &[usize]) -> Option<usize> {
    (0..view.len())
        .filter(|&i| {
            let w = view.worker(i);
            w.available && !exclude.contains(&i) && w.models.iter().any(|m| m == model)
        })
        .min_by(|&a, &b| {
            let util = |i: usize| {
                f64::from(view.worker(i).outstanding)
                    / f64::from(view.worker(i).max_concurrent.max(1))
            };
            util(a).total_cmp(&util(b)).then(a.cmp(&b))
        })
}

/// What happens to a request that must wait at the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Queue,
    /// Queue it, shedding the newest queued request of that lane to make room.
    QueueEvicting(LaneName),
    /// Refuse it: `RESOURCE_EXHAUSTED` with `retry-after`.
    Shed {
        retry_after_ms: u64,
    },
}

/// Admission of a request of `lane` given the router's queue depths (indexed by
/// [`LaneName::index`]). Each lane is bounded by its `max_queue`, both together by
/// `max_queued`. When the shared bound is hit, a latency-critical request displaces a queued
/// cost-sensitive one; a cost-sensitive request is shed.
pub fn admit(lane: LaneName, depths: [u32; 2], policy: &PolicyDocument) -> Admission {
    let lane_policy = policy.lane(lane);
    let shed = Admission::Shed {
        retry_after_ms: lane_policy.retry_after_ms,
    };
    if depths[lane.index()] >= lane_policy.max_queue {
        return shed;
    }
    let total = depths[0] + depths[1];
    if total < policy.max_queued {
        return Admission::Queue;
    }
    match lane {
        LaneName::LatencyCritical if depths[LaneName::CostSensitive.index()] > 0 => {
            Admission::QueueEvicting(LaneName::CostSensitive)
        }
        _ => shed,
    }
}

/// When a request queued at `now_ms` gives up and is shed.
pub fn queue_deadline_ms(now_ms: f64, lane: LaneName, policy: &PolicyDocument) -> f64 {
    now_ms + policy.lane(lane).max_queue_wait_ms
}

#[cfg(test)]
mod tests;
