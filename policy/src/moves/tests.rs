//! Tests of the move and hedge decisions.

use proptest::prelude::*;

use super::*;
use crate::document::PolicyDocument;
use crate::{WorkerState, place};

fn worker(id: &str, pool: Pool, outstanding: u32, max: u32) -> WorkerState {
    let mut w = WorkerState::new(id, pool, vec!["m".into()], max);
    w.outstanding = outstanding;
    w.prefill_tokens_per_s = if pool == Pool::Wse {
        50_000.0
    } else {
        10_000.0
    };
    w.decode_tokens_per_s = if pool == Pool::Wse { 1500.0 } else { 40.0 };
    w.ttft_overhead_ms = if pool == Pool::Wse { 150.0 } else { 15.0 };
    w
}

/// A GPU whose latency-critical queue alone takes `ms` to prefill.
fn busy_gpu(id: &str, ms: f64) -> WorkerState {
    let mut w = worker(id, Pool::Gpu, 10, 128);
    let tokens = (ms / 1000.0 * w.prefill_tokens_per_s) as u64;
    w.queued_prompt_tokens = tokens;
    w.queued_latency_critical_prompt_tokens = Some(tokens);
    w
}

fn class(lane: LaneName, policy: &PolicyDocument) -> Classification {
    Classification {
        lane,
        ttft_slo_ms: policy.lane(lane).ttft_slo_ms,
        min_tokens_per_s: policy.lane(lane).min_tokens_per_s,
        reason: String::new(),
    }
}

fn info(prompt_tokens: u32) -> RequestInfo<'static> {
    RequestInfo {
        model: "m",
        prompt_tokens,
        affinity: None,
        seed: 7,
        prefix: None,
    }
}

fn migrating() -> PolicyDocument {
    let mut p = PolicyDocument::default();
    p.migration.enabled = true;
    p.migration.max_moves_per_generation = 2;
    p
}

fn running<'a>(worker: usize, class: &'a Classification, context: u32, moves: u32) -> Running<'a> {
    Running {
        worker,
        class,
        continuation: info(context),
        remaining_tokens: 200,
        moves,
    }
}

/// gpu 0 and 1 (busy or idle), wse 2 with two slots holding `wse_outstanding`.
fn cluster(gpu_busy_ms: Option<f64>, wse_outstanding: u32) -> ClusterView {
    let gpu = |id: &str| match gpu_busy_ms {
        Some(ms) => busy_gpu(id, ms),
        None => worker(id, Pool::Gpu, 0, 128),
    };
    ClusterView::new(vec![
        gpu("g0"),
        gpu("g1"),
        worker("w0", Pool::Wse, wse_outstanding, 2),
    ])
}

#[test]
fn a_borrowed_cost_sensitive_generation_is_preempted_only_when_the_request_would_miss() {
    let policy = migrating();
    let lc = class(LaneName::LatencyCritical, &policy);
    let cs = class(LaneName::CostSensitive, &policy);
    let request = info(2_000);
    // The WSE holds one latency-critical and one borrowed cost-sensitive generation.
    let gens = [running(2, &lc, 1_500, 0), running(2, &cs, 6_000, 0)];

    // Every GPU would give the first token after 3 s: the request would miss there.
    let full = cluster(Some(3_000.0), 2);
    let p = preemption_victim(&full, &lc, &request, &gens, &policy).expect("preempts");
    assert_eq!(
        (p.victim, p.slot),
        (1, 2),
        "the cost-sensitive one, never the other"
    );
    assert_eq!(p.victim_move.to.pool, Pool::Gpu);
    assert_eq!(p.victim_move.reason, MoveReason::Preempt);
    assert_eq!(p.victim_move.reprefill_tokens, 6_000);
    assert!(p.predicted_ttft_ms <= lc.ttft_slo_ms);

    // A free WSE slot: no preemption (place takes it).
    let free = cluster(Some(3_000.0), 1);
    assert_eq!(
        preemption_victim(&free, &lc, &request, &gens, &policy),
        None
    );
    // A GPU meeting the SLO: the request spills there instead.
    let idle = cluster(None, 2);
    assert_eq!(
        preemption_victim(&idle, &lc, &request, &gens, &policy),
        None
    );
    // Nothing borrowed: nothing to take.
    let own = [running(2, &lc, 1_500, 0), running(2, &lc, 800, 0)];
    assert_eq!(preemption_victim(&full, &lc, &request, &own, &policy), None);
    // Cost-sensitive requests never preempt.
    assert_eq!(
        preemption_victim(&full, &cs, &request, &gens, &policy),
        None
    );
    // Off unless the document says so; and each switch counts.
    let off = PolicyDocument::default();
    assert_eq!(preemption_victim(&full, &lc, &request, &gens, &off), None);
    let mut no_preempt = migrating();
    no_preempt.migration.preempt_borrowed_wse = false;
    assert_eq!(
        preemption_victim(&full, &lc, &request, &gens, &no_preempt),
        None
    );
}

#[test]
fn the_victim_is_the_cheapest_to_move_and_its_cached_prefix_counts() {
    let policy = migrating();
    let lc = class(LaneName::LatencyCritical, &policy);
    let cs = class(LaneName::CostSensitive, &policy);
    let view = cluster(Some(3_000.0), 2);
    // gpu 1 holds 5 000 tokens of the first victim's context.
    let hits = [(1usize, 5_000u32)];
    let mut cached = running(2, &cs, 6_000, 0);
    cached.continuation.prefix = Some(&hits);
    let gens = [running(2, &cs, 3_000, 0), cached];
    let p = preemption_victim(&view, &lc, &info(2_000), &gens, &policy).unwrap();
    assert_eq!(p.victim, 1);
    assert_eq!(
        (p.victim_move.to.worker, p.victim_move.reprefill_tokens),
        (1, 1_000)
    );
}

#[test]
fn a_generation_never_moves_more_than_the_limit() {
    let mut policy = migrating();
    let lc = class(LaneName::LatencyCritical, &policy);
    let cs = class(LaneName::CostSensitive, &policy);
    let view = cluster(Some(3_000.0), 2);
    let slow = Progress {
        elapsed_ms: 10_000.0,
        first_token: true,
        first_token_in_ms: 0.0,
        measured_tokens_per_s: 1.0,
        predicted_tokens_per_s: 40.0,
    };
    for limit in 0..4 {
        policy.migration.max_moves_per_generation = limit;
        for moves in 0..6 {
            let allowed = moves < limit;
            let gens = [running(2, &cs, 3_000, moves)];
            assert_eq!(
                preemption_victim(&view, &lc, &info(2_000), &gens, &policy).is_some(),
                allowed,
                "preempt, limit {limit}, moves {moves}"
            );
            let g = running(0, &cs, 3_000, moves);
            assert_eq!(
                rebalance_target(&view, &g, &slow, &policy).is_some(),
                allowed,
                "rebalance, limit {limit}, moves {moves}"
            );
            assert_eq!(
                drain_target(&view, &g, &policy).is_some(),
                allowed,
                "drain, limit {limit}, moves {moves}"
            );
        }
    }
}

#[test]
fn a_request_that_would_miss_its_first_token_moves_to_a_freed_wse_slot() {
    let policy = migrating();
    let lc = class(LaneName::LatencyCritical, &policy);
    let view = cluster(Some(3_000.0), 1);
    let g = running(0, &lc, 2_000, 0);
    let behind = Progress {
        elapsed_ms: 300.0,
        first_token: false,
        first_token_in_ms: 2_500.0,
        measured_tokens_per_s: 0.0,
        predicted_tokens_per_s: 40.0,
    };
    let m = rebalance_target(&view, &g, &behind, &policy).expect("moves");
    assert_eq!((m.to.worker, m.reason), (2, MoveReason::Rebalance));
    assert_eq!(m.reprefill_tokens, 2_000);
    // On time where it is: stays.
    let on_time = Progress {
        first_token_in_ms: 600.0,
        ..behind
    };
    assert_eq!(rebalance_target(&view, &g, &on_time, &policy), None);
    // Already past its SLO, or no worker that would make it: stays.
    let late = Progress {
        elapsed_ms: 1_200.0,
        ..behind
    };
    assert_eq!(rebalance_target(&view, &g, &late, &policy), None);
    let full = cluster(Some(3_000.0), 2);
    assert_eq!(rebalance_target(&full, &g, &behind, &policy), None);
}

#[test]
fn a_slow_stream_moves_to_a_much_faster_worker_only() {
    let policy = migrating();
    let cs = class(LaneName::CostSensitive, &policy);
    let view = cluster(None, 2);
    let g = running(0, &cs, 3_000, 0);
    let slow = Progress {
        elapsed_ms: 5_000.0,
        first_token: true,
        first_token_in_ms: 0.0,
        measured_tokens_per_s: 4.0,
        predicted_tokens_per_s: 40.0,
    };
    let m = rebalance_target(&view, &g, &slow, &policy).expect("moves");
    assert_eq!((m.to.worker, m.to.pool), (1, Pool::Gpu));
    let fine = Progress {
        measured_tokens_per_s: 30.0,
        ..slow
    };
    assert_eq!(rebalance_target(&view, &g, &fine, &policy), None);
    // Almost done: not worth the re-prefill.
    let mut ending = g;
    ending.remaining_tokens = 3;
    assert_eq!(rebalance_target(&view, &ending, &slow, &policy), None);
}

#[test]
fn a_draining_worker_hands_long_generations_off() {
    let policy = migrating();
    let cs = class(LaneName::CostSensitive, &policy);
    let mut view = cluster(None, 0);
    view.update(0, |w| w.available = false);
    let g = running(0, &cs, 3_000, 0);
    let m = drain_target(&view, &g, &policy).expect("moves");
    assert_ne!(m.to.worker, 0);
    assert_eq!(m.reason, MoveReason::Drain);
    let mut short = g;
    short.remaining_tokens = 2;
    assert_eq!(drain_target(&view, &short, &policy), None);
    let mut off = migrating();
    off.migration.drain_handoff = false;
    assert_eq!(drain_target(&view, &g, &off), None);
}

fn hedging(fraction: f64) -> PolicyDocument {
    let mut p = PolicyDocument::default();
    p.hedging.enabled = true;
    p.hedging.budget_fraction = fraction;
    p
}

fn primary_of(
    view: &ClusterView,
    c: &Classification,
    r: &RequestInfo<'_>,
    p: &PolicyDocument,
) -> Placement {
    match place(view, c, r, p, &[]) {
        Decision::Place(p) => p,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_request_close_to_its_slo_is_hedged_on_the_other_pool_within_budget() {
    let policy = hedging(0.05);
    let lc = class(LaneName::LatencyCritical, &policy);
    // One WSE slot free; one GPU would meet the SLO, the other not.
    let view = ClusterView::new(vec![
        busy_gpu("g0", 500.0),
        busy_gpu("g1", 900.0),
        worker("w0", Pool::Wse, 1, 2),
    ]);
    let request = info(2_000);
    let mut primary = primary_of(&view, &lc, &request, &policy);
    assert_eq!(primary.pool, Pool::Wse, "the free WSE slot first");
    // Pretend the WSE placement were predicted close to the SLO.
    primary.predicted_ttft_ms = 900.0;
    let mut budget = HedgeBudget::default();
    // No tokens recorded yet: no budget.
    assert_eq!(
        should_hedge(&view, &lc, &request, &primary, None, &budget, &policy),
        None
    );
    budget.record(LaneName::LatencyCritical, None, 100_000);
    // 5 % of 100 000 = 5 000 ≥ 2 000: hedged on a GPU predicted in time.
    let second = should_hedge(&view, &lc, &request, &primary, None, &budget, &policy).unwrap();
    assert_eq!(second.pool, Pool::Gpu);
    assert_eq!(second.worker, 0);
    assert!(budget.charge(LaneName::LatencyCritical, None, 2_000, &policy));
    assert!(budget.charge(LaneName::LatencyCritical, None, 2_000, &policy));
    // 4 000 spent: the next 2 000 would exceed 5 000.
    assert_eq!(
        should_hedge(&view, &lc, &request, &primary, None, &budget, &policy),
        None
    );
    // The race wasted only 500 of a 2 000 charge: 1 500 come back.
    budget.settle(LaneName::LatencyCritical, None, 2_000, 500, &policy);
    assert_eq!(budget.lane(LaneName::LatencyCritical).spent, 2_500);
    assert!(should_hedge(&view, &lc, &request, &primary, None, &budget, &policy).is_some());
    // Comfortably within the SLO: no hedge.
    primary.predicted_ttft_ms = 300.0;
    assert_eq!(
        should_hedge(&view, &lc, &request, &primary, None, &budget, &policy),
        None
    );
    // Cost-sensitive requests are never hedged; nor anything when hedging is off.
    let cs = class(LaneName::CostSensitive, &policy);
    primary.predicted_ttft_ms = 9_999.0;
    assert_eq!(
        should_hedge(&view, &cs, &request, &primary, None, &budget, &policy),
        None
    );
    primary.predicted_ttft_ms = 900.0;
    let off = PolicyDocument::default();
    assert_eq!(
        should_hedge(&view, &lc, &request, &primary, None, &budget, &off),
        None
    );
    // A GPU primary with the WSE full: only another GPU could hedge, unless same_pool is off.
    let full = ClusterView::new(vec![
        busy_gpu("g0", 500.0),
        busy_gpu("g1", 100.0),
        worker("w0", Pool::Wse, 2, 2),
    ]);
    let mut gpu_primary = primary_of(&full, &lc, &request, &policy);
    assert_eq!((gpu_primary.pool, gpu_primary.worker), (Pool::Gpu, 1));
    gpu_primary.predicted_ttft_ms = 900.0;
    let second = should_hedge(&full, &lc, &request, &gpu_primary, None, &budget, &policy);
    assert_eq!(second.map(|s| s.worker), Some(0));
    let mut other_pool_only = policy.clone();
    other_pool_only.hedging.same_pool = false;
    assert_eq!(
        should_hedge(
            &full,
            &lc,
            &request,
            &gpu_primary,
            None,
            &budget,
            &other_pool_only
        ),
        None
    );
}

#[test]
fn a_tenant_budget_bounds_its_own_hedges() {
    let mut policy = hedging(0.5);
    policy.hedging.tenants.insert("stingy".into(), 0.0);
    let view = ClusterView::new(vec![
        worker("g0", Pool::Gpu, 0, 8),
        worker("w0", Pool::Wse, 0, 2),
    ]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let request = info(1_000);
    let mut primary = primary_of(&view, &lc, &request, &policy);
    primary.predicted_ttft_ms = 990.0;
    let mut budget = HedgeBudget::default();
    budget.record(LaneName::LatencyCritical, Some("stingy"), 10_000);
    budget.record(LaneName::LatencyCritical, Some("other"), 10_000);
    assert!(
        should_hedge(
            &view,
            &lc,
            &request,
            &primary,
            Some("other"),
            &budget,
            &policy
        )
        .is_some()
    );
    assert_eq!(
        should_hedge(
            &view,
            &lc,
            &request,
            &primary,
            Some("stingy"),
            &budget,
            &policy
        ),
        None
    );
    assert!(!budget.charge(LaneName::LatencyCritical, Some("stingy"), 1, &policy));
}

proptest! {
    /// 1 000 requests of random sizes and tenants, hedged whenever the budget lets them, with
    /// random waste: neither the lane's nor any tenant's spending ever exceeds its share.
    #[test]
    fn the_hedge_budget_is_never_exceeded(
        requests in proptest::collection::vec((1u32..20_000, 0usize..3, 0u64..25_000, any::<bool>()), 1_000),
        fraction in 0.0f64..0.2,
    ) {
        let mut policy = hedging(fraction);
        policy.hedging.tenants.insert("t1".into(), fraction / 2.0);
        let tenants = [None, Some("t1"), Some("t2")];
        let mut budget = HedgeBudget::default();
        let mut open: Vec<(Option<&str>, u64)> = Vec::new();
        for (prompt, t, wasted, settle_one) in requests {
            let tenant = tenants[t];
            budget.record(LaneName::LatencyCritical, tenant, prompt);
            let cost = u64::from(prompt);
            if budget.charge(LaneName::LatencyCritical, tenant, cost, &policy) {
                open.push((tenant, cost));
            }
            if settle_one && let Some((tenant, charged)) = open.pop() {
                budget.settle(LaneName::LatencyCritical, tenant, charged, wasted, &policy);
            }
            let lane = budget.lane(LaneName::LatencyCritical);
            prop_assert!(lane.spent as f64 <= fraction * lane.tokens as f64, "{lane:?}");
            let t1 = budget.tenant("t1");
            prop_assert!(t1.spent as f64 <= fraction / 2.0 * t1.tokens as f64, "{t1:?}");
        }
    }
}
