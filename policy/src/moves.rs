//! Migration by policy and budgeted hedging: when to move a running generation to another
//! worker (preemption of a borrowed WSE slot, rebalancing, drain hand-off) and when to start a
//! latency-critical request on a second worker. Pure like the rest of the crate: the caller
//! (live router or simulator) carries the moves out and tells the [`HedgeBudget`] what
//! happened.
//!
//! A move re-prefills the generation's prompt and the tokens it produced so far on the target
//! (less the prefix the target holds): the cost every decision here weighs.

use std::collections::HashMap;

use crate::Pool;
use crate::classify::Classification;
use crate::document::{LaneName, PolicyDocument};
use crate::view::pool_index;
use crate::{
    ClusterView, Decision, Placement, RequestInfo, Route, Scored, SpillCause, best_in_pool,
    decode_rate, place, predicted_ttft_cached_ms,
};

/// Why a generation moved: a closed set of names, for metric labels and the `Moved` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MoveReason {
    /// It gave its borrowed WSE slot to a latency-critical request.
    Preempt,
    /// Its worker fell behind the prediction; another is predicted to do better.
    Rebalance,
    /// Its worker is draining.
    Drain,
}

impl MoveReason {
    pub const ALL: [MoveReason; 3] = [
        MoveReason::Preempt,
        MoveReason::Rebalance,
        MoveReason::Drain,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MoveReason::Preempt => "preempt",
            MoveReason::Rebalance => "rebalance",
            MoveReason::Drain => "drain",
        }
    }

    /// Index for per-reason arrays, in the order of [`MoveReason::ALL`].
    pub fn index(self) -> usize {
        match self {
            MoveReason::Preempt => 0,
            MoveReason::Rebalance => 1,
            MoveReason::Drain => 2,
        }
    }
}

/// A running generation as the move decisions see it.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    /// Where it runs (index in the [`ClusterView`]).
    pub worker: usize,
    pub class: &'a Classification,
    /// Its continuation: `prompt_tokens` = the original prompt plus the tokens generated so
    /// far (what a target must prefill), `prefix` = what the workers hold of it.
    pub continuation: RequestInfo<'a>,
    /// Tokens it may still generate, as far as the caller knows (`max_tokens` − generated).
    pub remaining_tokens: u32,
    /// Times it has moved already.
    pub moves: u32,
}

impl Running<'_> {
    fn may_move(&self, policy: &PolicyDocument) -> bool {
        policy.migration.enabled && self.moves < policy.migration.max_moves_per_generation
    }
}

/// A decided move: where the generation continues and what it costs there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Move {
    pub to: Placement,
    pub reason: MoveReason,
    /// Context tokens the target prefills again (continuation less its cached prefix).
    pub reprefill_tokens: u32,
}

fn move_to(to: Placement, reason: MoveReason) -> Move {
    Move {
        to,
        reason,
        reprefill_tokens: to.prompt_tokens.saturating_sub(to.cached_tokens),
    }
}

fn placement(view: &ClusterView, s: Scored, route: Route, request: &RequestInfo<'_>) -> Placement {
    Placement {
        worker: s.worker,
        pool: view.worker(s.worker).pool,
        route,
        affinity: s.affinity,
        predicted_ttft_ms: s.predicted_ttft_ms,
        cached_tokens: s.cached_tokens,
        prompt_tokens: request.prompt_tokens,
    }
}

/// A preemption: `running[victim]` continues at `victim_move.to` (a GPU) and the
/// latency-critical request takes its slot on `slot`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preemption {
    pub victim: usize,
    pub victim_move: Move,
    /// The WSE worker whose slot the latency-critical request gets.
    pub slot: usize,
    /// The latency-critical request's predicted TTFT there.
    pub predicted_ttft_ms: f64,
}

/// Whether a latency-critical request should take a WSE slot from a cost-sensitive generation
/// that borrowed it, and which one. Only when no WSE slot is free and no GPU is predicted to
/// meet the request's SLO (`place` would spill it to a GPU and it would miss), only victims
/// that may still move, whose slot would meet the SLO and that a GPU outside the latency
/// reserve can take; the victim whose move re-prefills the fewest tokens (then the one with
/// the most tokens left: it would hold the slot longest).
pub fn preemption_victim(
    view: &ClusterView,
    class: &Classification,
    request: &RequestInfo<'_>,
    running: &[Running<'_>],
    policy: &PolicyDocument,
) -> Option<Preemption> {
    let migration = &policy.migration;
    if !migration.enabled
        || !migration.preempt_borrowed_wse
        || class.lane != LaneName::LatencyCritical
    {
        return None;
    }
    let m = view.model_index(request.model)?;
    if !view.pools[m][pool_index(Pool::Wse)].free.is_empty() {
        return None;
    }
    let slo = class.ttft_slo_ms;
    if policy.latency_critical.spill {
        let gpu = best_in_pool(
            view,
            m,
            Pool::Gpu,
            request,
            class.lane,
            policy,
            slo,
            &[],
            |w| decode_rate(view.worker(w), policy) >= class.min_tokens_per_s,
            &mut |_| {},
        );
        if gpu.is_some_and(|g| g.predicted_ttft_ms <= slo) {
            return None;
        }
    }
    let reserve = policy.placement.gpu_reserve_for_latency;
    let mut best: Option<(Preemption, u32)> = None;
    for (i, r) in running.iter().enumerate() {
        let w = view.worker(r.worker);
        if r.class.lane != LaneName::CostSensitive
            || w.pool != Pool::Wse
            || !w.available
            || !view.serves(r.worker, m)
            || !r.may_move(policy)
        {
            continue;
        }
        let predicted = predicted_ttft_cached_ms(
            w,
            class.lane,
            request.prompt_tokens,
            request.cached_tokens(r.worker),
            policy,
        );
        if predicted > slo {
            continue;
        }
        let Some(vm) = view.model_index(r.continuation.model) else {
            continue;
        };
        let Some(target) = best_in_pool(
            view,
            vm,
            Pool::Gpu,
            &r.continuation,
            r.class.lane,
            policy,
            r.class.ttft_slo_ms,
            &[r.worker],
            |t| {
                !view.in_reserve_of(vm, t, reserve)
                    && decode_rate(view.worker(t), policy) >= r.class.min_tokens_per_s
            },
            &mut |_| {},
        ) else {
            continue;
        };
        let victim_move = move_to(
            placement(view, target, Route::Home, &r.continuation),
            MoveReason::Preempt,
        );
        let candidate = Preemption {
            victim: i,
            victim_move,
            slot: r.worker,
            predicted_ttft_ms: predicted,
        };
        let better = best.is_none_or(|(b, left)| {
            (
                victim_move.reprefill_tokens,
                std::cmp::Reverse(r.remaining_tokens),
            ) < (b.victim_move.reprefill_tokens, std::cmp::Reverse(left))
        });
        if better {
            best = Some((candidate, r.remaining_tokens));
        }
    }
    best.map(|(p, _)| p)
}

/// Tokens a generation must have produced on a worker before its decode rate there is
/// judged: a rate over one chunk or two says little. Callers do not ask
/// [`rebalance_target`] about a decoding generation before.
pub const MIN_TOKENS_MEASURED: u32 = 4;

/// How a running generation is doing where it runs, as the caller measures it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Since the request arrived, milliseconds.
    pub elapsed_ms: f64,
    /// Its first token has been sent.
    pub first_token: bool,
    /// Before the first token: the caller's estimate of how long until it, on its worker.
    pub first_token_in_ms: f64,
    /// After the first token: its measured decode rate, tokens per second.
    pub measured_tokens_per_s: f64,
    /// The decode rate its placement predicted.
    pub predicted_tokens_per_s: f64,
}

impl Progress {
    /// After its first token: whether its measured decode rate fell below
    /// `rebalance_rate_ratio` × the predicted one or below the lane's minimum.
    pub fn decoding_behind(&self, class: &Classification, policy: &PolicyDocument) -> bool {
        let measured = self.measured_tokens_per_s;
        measured < policy.migration.rebalance_rate_ratio * self.predicted_tokens_per_s
            || measured < class.min_tokens_per_s
    }
}

/// Where a generation that fell behind should continue, if anywhere (see
/// [`MigrationPolicy::rebalance`](crate::document::MigrationPolicy::rebalance)).
///
/// Before its first token: only when it would miss its TTFT SLO where it is, to a worker
/// predicted to give the first token within what is left of the SLO and at least
/// `rebalance_min_gain_ms` sooner. After it: only with at least `min_remaining_tokens` left,
/// when its measured rate is below `rebalance_rate_ratio` × the predicted one or below the
/// lane's minimum, to a worker whose predicted rate is at least the lane's minimum and the
/// measured rate ÷ `rebalance_rate_ratio`, if the re-prefill plus the rest there is predicted
/// to end at least `rebalance_min_gain_ms` sooner.
pub fn rebalance_target(
    view: &ClusterView,
    generation: &Running<'_>,
    progress: &Progress,
    policy: &PolicyDocument,
) -> Option<Move> {
    let migration = &policy.migration;
    if !migration.rebalance || !generation.may_move(policy) {
        return None;
    }
    let class = generation.class;
    if !progress.first_token {
        let left = class.ttft_slo_ms - progress.elapsed_ms;
        if progress.first_token_in_ms <= left || left <= 0.0 {
            return None;
        }
        let remaining = Classification {
            ttft_slo_ms: left,
            ..class.clone()
        };
        let Decision::Place(to) = place(
            view,
            &remaining,
            &generation.continuation,
            policy,
            &[generation.worker],
        ) else {
            return None;
        };
        let gains = to.predicted_ttft_ms <= left
            && to.predicted_ttft_ms + migration.rebalance_min_gain_ms <= progress.first_token_in_ms;
        return gains.then(|| move_to(to, MoveReason::Rebalance));
    }
    let measured = progress.measured_tokens_per_s;
    if !progress.decoding_behind(class, policy)
        || generation.remaining_tokens < migration.min_remaining_tokens
        || measured <= 0.0
    {
        return None;
    }
    let Decision::Place(to) = place(
        view,
        class,
        &generation.continuation,
        policy,
        &[generation.worker],
    ) else {
        return None;
    };
    let rate = decode_rate(view.worker(to.worker), policy);
    if rate < class.min_tokens_per_s || rate * migration.rebalance_rate_ratio < measured {
        return None;
    }
    let left = f64::from(generation.remaining_tokens);
    let stay_ms = 1000.0 * left / measured;
    let go_ms = to.predicted_ttft_ms + 1000.0 * left / rate;
    (go_ms + migration.rebalance_min_gain_ms <= stay_ms).then(|| move_to(to, MoveReason::Rebalance))
}

/// Where a generation on a draining worker should continue, if it should move at all: a
/// generation with at least `min_remaining_tokens` left goes where `place` would put it now
/// (its own lane's rules), never to another unavailable worker; `None` lets it finish where it
/// is.
pub fn drain_target(
    view: &ClusterView,
    generation: &Running<'_>,
    policy: &PolicyDocument,
) -> Option<Move> {
    if !policy.migration.drain_handoff
        || !generation.may_move(policy)
        || generation.remaining_tokens < policy.migration.min_remaining_tokens
    {
        return None;
    }
    match place(
        view,
        generation.class,
        &generation.continuation,
        policy,
        &[generation.worker],
    ) {
        Decision::Place(to) => Some(move_to(to, MoveReason::Drain)),
        _ => None,
    }
}

/// A second placement for a latency-critical request whose primary placement is predicted
/// close to (or past) its SLO: `primary.predicted_ttft_ms > hedging.slo_margin × SLO`. The
/// best free worker of the other pool when it is predicted to meet the SLO, else (when
/// `hedging.same_pool`) of the same pool (never the primary's worker; GPUs only at the lane's minimum decode rate); `None` when
/// none is predicted to meet the SLO or the hedge's prefill (its uncached prompt tokens) does
/// not fit the lane's or the tenant's budget. The caller charges the budget
/// ([`HedgeBudget::charge`]) when it starts the hedge.
pub fn should_hedge(
    view: &ClusterView,
    class: &Classification,
    request: &RequestInfo<'_>,
    primary: &Placement,
    tenant: Option<&str>,
    budget: &HedgeBudget,
    policy: &PolicyDocument,
) -> Option<Placement> {
    let hedging = &policy.hedging;
    let slo = class.ttft_slo_ms;
    if !hedging.enabled
        || class.lane != LaneName::LatencyCritical
        || primary.predicted_ttft_ms <= hedging.slo_margin * slo
    {
        return None;
    }
    let m = view.model_index(request.model)?;
    let other = match primary.pool {
        Pool::Gpu => Pool::Wse,
        Pool::Wse => Pool::Gpu,
    };
    let exclude = [primary.worker];
    let best_of = |pool: Pool| {
        if pool == Pool::Gpu && !policy.latency_critical.spill {
            return None;
        }
        best_in_pool(
            view,
            m,
            pool,
            request,
            class.lane,
            policy,
            slo,
            &exclude,
            |w| pool == Pool::Wse || decode_rate(view.worker(w), policy) >= class.min_tokens_per_s,
            &mut |_| {},
        )
        .filter(|s| s.predicted_ttft_ms <= slo)
    };
    let second =
        best_of(other).or_else(|| hedging.same_pool.then(|| best_of(primary.pool)).flatten())?;
    // A hedge is only sought when the primary is predicted close to its SLO.
    let route = if view.worker(second.worker).pool == Pool::Wse {
        Route::Home
    } else {
        Route::SpillToGpu(SpillCause::WseTooSlow)
    };
    let to = placement(view, second, route, request);
    let cost = u64::from(to.prompt_tokens.saturating_sub(to.cached_tokens));
    budget
        .allows(class.lane, tenant, cost, policy)
        .then_some(to)
}

/// Tokens of one lane or tenant and the hedge prefill charged against them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HedgeAccount {
    /// Prompt tokens of the requests recorded.
    pub tokens: u64,
    /// Hedge prefill tokens charged, less refunds.
    pub spent: u64,
}

impl HedgeAccount {
    fn allows(&self, cost: u64, fraction: f64) -> bool {
        (self.spent + cost) as f64 <= fraction * self.tokens as f64
    }
}

/// The hedge budget: per lane (`hedging.budget_fraction` of the lane's prompt tokens) and per
/// tenant named in `hedging.tenants` (its own fraction of its own tokens). Every request is
/// [`record`](Self::record)ed before its hedge decision; a hedge is
/// [`charge`](Self::charge)d its uncached prompt tokens when it starts, and the race's real
/// waste is [`settle`](Self::settle)d when it ends (never more than was charged), so `spent ≤
/// fraction × tokens` holds at every moment.
#[derive(Debug, Clone, Default)]
pub struct HedgeBudget {
    lanes: [HedgeAccount; 2],
    tenants: HashMap<String, HedgeAccount>,
}

impl HedgeBudget {
    /// Counts a request's prompt tokens towards its lane's (and tenant's) budget.
    pub fn record(&mut self, lane: LaneName, tenant: Option<&str>, prompt_tokens: u32) {
        self.lanes[lane.index()].tokens += u64::from(prompt_tokens);
        if let Some(t) = tenant {
            self.tenants.entry(t.to_string()).or_default().tokens += u64::from(prompt_tokens);
        }
    }

    /// Whether a hedge costing `cost` prefill tokens fits.
    pub fn allows(
        &self,
        lane: LaneName,
        tenant: Option<&str>,
        cost: u64,
        policy: &PolicyDocument,
    ) -> bool {
        let hedging = &policy.hedging;
        if !self.lanes[lane.index()].allows(cost, hedging.budget_fraction) {
            return false;
        }
        match tenant.and_then(|t| hedging.tenants.get(t).map(|f| (t, *f))) {
            None => true,
            Some((t, fraction)) => self
                .tenants
                .get(t)
                .copied()
                .unwrap_or_default()
                .allows(cost, fraction),
        }
    }

    /// Charges a hedge if it fits; `false` (nothing charged) if it does not.
    pub fn charge(
        &mut self,
        lane: LaneName,
        tenant: Option<&str>,
        cost: u64,
        policy: &PolicyDocument,
    ) -> bool {
        if !self.allows(lane, tenant, cost, policy) {
            return false;
        }
        self.lanes[lane.index()].spent += cost;
        if let Some(t) = tenant.filter(|t| policy.hedging.tenants.contains_key(*t)) {
            self.tenants.entry(t.to_string()).or_default().spent += cost;
        }
        true
    }

    /// Ends a hedge charged `charged`: the race really wasted `wasted` tokens (the loser's
    /// prefill and decode); the difference goes back to the budget.
    pub fn settle(
        &mut self,
        lane: LaneName,
        tenant: Option<&str>,
        charged: u64,
        wasted: u64,
        policy: &PolicyDocument,
    ) {
        let refund = charged.saturating_sub(wasted);
        let account = &mut self.lanes[lane.index()];
        account.spent = account.spent.saturating_sub(refund);
        if let Some(t) = tenant.filter(|t| policy.hedging.tenants.contains_key(*t))
            && let Some(account) = self.tenants.get_mut(t)
        {
            account.spent = account.spent.saturating_sub(refund);
        }
    }

    pub fn lane(&self, lane: LaneName) -> HedgeAccount {
        self.lanes[lane.index()]
    }

    pub fn tenant(&self, tenant: &str) -> HedgeAccount {
        self.tenants.get(tenant).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
