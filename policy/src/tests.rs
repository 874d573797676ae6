//! Unit and property tests of placement, affinity and admission.

use proptest::prelude::*;

use super::document::{LaneName, PolicyDocument};
use super::*;
use crate::classify::Classification;

fn worker(id: &str, pool: Pool, outstanding: u32, max: u32) -> WorkerState {
    let mut w = WorkerState::new(id, pool, vec!["m".into()], max);
    w.outstanding = outstanding;
    w.prefill_tokens_per_s = if pool == Pool::Wse {
        50_000.0
    } else {
        10_000.0
    };
    w.decode_tokens_per_s = if pool == Pool::Wse { 1500.0 } else { 40.0 };
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

fn request(prompt_tokens: u32, affinity: Option<u64>, seed: u64) -> RequestInfo<'static> {
    RequestInfo {
        model: "m",
        prompt_tokens,
        affinity,
        seed,
        prefix: None,
    }
}

fn placed(d: &Decision) -> Placement {
    match d {
        Decision::Place(p) => *p,
        other => panic!("expected a placement, got {other:?}"),
    }
}

#[test]
fn lanes_go_to_their_home_pools() {
    let policy = PolicyDocument::default();
    let view = ClusterView::new(vec![
        worker("g1", Pool::Gpu, 3, 4),
        worker("g2", Pool::Gpu, 4, 16),
        worker("w1", Pool::Wse, 0, 4),
    ]);
    let d = place(
        &view,
        &class(LaneName::CostSensitive, &policy),
        &request(100, None, 1),
        &policy,
        &[],
    );
    let p = placed(&d);
    assert_eq!(
        (view.worker(p.worker).id.as_str(), p.route),
        ("g2", Route::Home)
    );
    let d = place(
        &view,
        &class(LaneName::LatencyCritical, &policy),
        &request(100, None, 1),
        &policy,
        &[],
    );
    let p = placed(&d);
    assert_eq!(
        (view.worker(p.worker).id.as_str(), p.route),
        ("w1", Route::Home)
    );
    assert!(p.reason().starts_with("pool=wse"), "{}", p.reason());
}

#[test]
fn a_scarce_wse_is_kept_for_prompts_only_it_serves_in_time() {
    let mut policy = PolicyDocument::default();
    policy.placement.save_wse_above_utilisation = 0.5;
    policy.placement.save_wse_gpu_ttft_fraction = 0.4;
    // 1 000 ms SLO: within 400 ms on the GPU saves the WSE slot.
    let slo = policy.latency_critical.ttft_slo_ms;
    assert_eq!(slo, 1_000.0);
    let mut view = ClusterView::new(vec![
        worker("g1", Pool::Gpu, 0, 8),
        worker("w1", Pool::Wse, 1, 4),
    ]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let short = request(1_000, None, 1);
    let long = request(6_000, None, 2);
    let route = |view: &ClusterView, r: &RequestInfo<'_>, policy: &PolicyDocument| {
        let p = placed(&place(view, &lc, r, policy, &[]));
        (view.worker(p.worker).id.clone(), p.route)
    };
    // A quarter busy: the WSE takes latency-critical work as usual.
    assert_eq!(route(&view, &short, &policy), ("w1".into(), Route::Home));
    // Half busy: a prompt the GPU serves in ~125 ms goes there...
    view.update(1, |w| w.outstanding = 2);
    let (id, r) = route(&view, &short, &policy);
    assert_eq!((id.as_str(), r), ("g1", Route::SaveWse));
    let p = placed(&place(&view, &lc, &short, &policy, &[]));
    assert!(p.predicted_ttft_ms <= 0.4 * slo, "{p:?}");
    assert_eq!(p.reason_label(), "save_wse");
    // ...one the GPU would take 600+ ms for keeps its WSE slot.
    assert_eq!(route(&view, &long, &policy), ("w1".into(), Route::Home));
    // A lane that may not spill never leaves its pool; nor does anything with the default.
    let mut no_spill = policy.clone();
    no_spill.latency_critical.spill = false;
    assert_eq!(route(&view, &short, &no_spill), ("w1".into(), Route::Home));
    let default = PolicyDocument::default();
    assert_eq!(route(&view, &short, &default), ("w1".into(), Route::Home));
}

#[test]
fn a_late_spill_waits_for_a_wse_slot_the_turnover_says_frees_in_time() {
    let mut policy = PolicyDocument::default();
    policy.placement.await_wse = true;
    policy.placement.await_wse_gpu_ttft_fraction = 0.5;
    let slo = policy.latency_critical.ttft_slo_ms;
    // The GPU has 10 000 latency-critical prompt tokens queued: ~1.1 s to a first token.
    let mut gpu = worker("g1", Pool::Gpu, 1, 8);
    gpu.queued_prompt_tokens = 10_000;
    // Every WSE slot busy; one frees every 50 ms (4 slots, held 200 ms each).
    let mut wse = worker("w1", Pool::Wse, 4, 4);
    wse.slot_turnover_ms = 200.0;
    let mut view = ClusterView::new(vec![gpu, wse]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let r = request(1_000, None, 1);
    let spill = placed(&place(&view, &lc, &r, &policy, &[]));
    assert_eq!(
        (spill.worker, spill.route),
        (0, Route::SpillToGpu(SpillCause::WseFull))
    );
    assert!(spill.predicted_ttft_ms > slo, "{spill:?}");
    // The slot it would get frees in ~50 ms, and the WSE's own ~21 ms follow: it waits, at
    // most until only the WSE's time to a first token is left of the SLO.
    let left = await_wse(&view, &lc, &r, &spill, 0.0, 0, &policy).expect("waits");
    assert!((970.0..=980.0).contains(&left), "{left}");
    // Not when it waited too long already, nor behind too many others waiting (31 slots
    // away = 1.55 s).
    assert_eq!(await_wse(&view, &lc, &r, &spill, 960.0, 0, &policy), None);
    assert_eq!(await_wse(&view, &lc, &r, &spill, 0.0, 30, &policy), None);
    assert!(await_wse(&view, &lc, &r, &spill, 0.0, 10, &policy).is_some());
    // Not without a measured turnover, nor with it switched off (the default).
    view.update(1, |w| w.slot_turnover_ms = 0.0);
    assert_eq!(await_wse(&view, &lc, &r, &spill, 0.0, 0, &policy), None);
    view.update(1, |w| w.slot_turnover_ms = 200.0);
    let default = PolicyDocument::default();
    assert_eq!(await_wse(&view, &lc, &r, &spill, 0.0, 0, &default), None);
    // Not when the GPU is predicted within the fraction of the SLO: it takes the GPU.
    view.update(0, |w| w.queued_prompt_tokens = 0);
    let fast = placed(&place(&view, &lc, &r, &policy, &[]));
    assert!(fast.predicted_ttft_ms <= 0.5 * slo, "{fast:?}");
    assert_eq!(await_wse(&view, &lc, &r, &fast, 0.0, 0, &policy), None);
    // Not when a WSE slot is free (the policy passed it over: it is late itself), and never
    // for cost-sensitive work.
    view.update(1, |w| w.outstanding = 3);
    assert_eq!(await_wse(&view, &lc, &r, &spill, 0.0, 0, &policy), None);
    view.update(1, |w| w.outstanding = 4);
    let cs = class(LaneName::CostSensitive, &policy);
    assert_eq!(await_wse(&view, &cs, &r, &spill, 0.0, 0, &policy), None);
}

#[test]
fn latency_critical_spills_to_gpu_when_wse_is_full_and_queues_when_all_are() {
    let policy = PolicyDocument::default();
    let mut view = ClusterView::new(vec![
        worker("g1", Pool::Gpu, 0, 4),
        worker("w1", Pool::Wse, 4, 4),
    ]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let p = placed(&place(&view, &lc, &request(100, None, 1), &policy, &[]));
    assert_eq!(
        (p.worker, p.route),
        (0, Route::SpillToGpu(SpillCause::WseFull))
    );
    view.update(0, |w| w.outstanding = 4);
    assert_eq!(
        place(&view, &lc, &request(100, None, 1), &policy, &[]),
        Decision::Queue
    );
    // Without spill, latency-critical work waits for the WSE.
    let mut no_spill = policy.clone();
    no_spill.latency_critical.spill = false;
    view.update(0, |w| w.outstanding = 0);
    assert_eq!(
        place(&view, &lc, &request(100, None, 1), &no_spill, &[]),
        Decision::Queue
    );
}

#[test]
fn a_spill_says_whether_the_wse_was_too_slow_full_or_gone() {
    let policy = PolicyDocument::default();
    // A free WSE slot, but 20 s of prompts queued ahead of it.
    let mut wse = worker("w1", Pool::Wse, 0, 4);
    wse.queued_prompt_tokens = 1_000_000;
    let mut view = ClusterView::new(vec![worker("g1", Pool::Gpu, 0, 4), wse]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let spill =
        |view: &ClusterView| placed(&place(view, &lc, &request(100, None, 1), &policy, &[]));
    let slow = spill(&view);
    assert_eq!(slow.route, Route::SpillToGpu(SpillCause::WseTooSlow));
    assert!(
        slow.reason()
            .starts_with("spill=gpu (no wse slot meets the slo)")
    );
    view.update(1, |w| w.outstanding = 4);
    let full = spill(&view);
    assert_eq!(full.route, Route::SpillToGpu(SpillCause::WseFull));
    assert!(
        full.reason()
            .starts_with("spill=gpu (every wse slot is taken)")
    );
    view.update(1, |w| w.available = false);
    assert_eq!(
        spill(&view).route,
        Route::SpillToGpu(SpillCause::NoWseWorker)
    );
    // The cause is for people; the metric label stays one closed name.
    assert_eq!(full.reason_label(), "spill_to_gpu");
}

/// A GPU slower than the lane's minimum decode rate waits for the WSE while the WSE can take
/// the request; when no WSE worker ever can (none serves it, all drained, or the request needs
/// what none does: excluded), the slow GPU is better than a wait only a shed ends.
#[test]
fn a_slow_gpu_serves_latency_critical_work_no_wse_worker_can_take() {
    let policy = PolicyDocument::default();
    let mut slow = worker("g1", Pool::Gpu, 0, 4);
    slow.decode_tokens_per_s = policy.latency_critical.min_tokens_per_s / 2.0;
    let mut view = ClusterView::new(vec![slow, worker("w1", Pool::Wse, 4, 4)]);
    let lc = class(LaneName::LatencyCritical, &policy);
    let ask = |view: &ClusterView, exclude: &[usize]| {
        place(view, &lc, &request(100, None, 1), &policy, exclude)
    };
    // The WSE is full, and frees a slot in time: wait for it.
    assert_eq!(ask(&view, &[]), Decision::Queue);
    // The WSE cannot take it at all.
    let p = placed(&ask(&view, &[1]));
    assert_eq!(
        (p.worker, p.route),
        (0, Route::SpillToGpu(SpillCause::NoWseWorker))
    );
    view.update(1, |w| w.available = false);
    assert_eq!(placed(&ask(&view, &[])).worker, 0);
    // A busy GPU is still waited for.
    view.update(0, |w| w.outstanding = 4);
    assert_eq!(ask(&view, &[1]), Decision::Queue);
}

#[test]
fn a_lane_that_does_not_spill_is_refused_at_once_when_its_pool_takes_no_requests() {
    let policy = PolicyDocument::default();
    // The wafer drained: its busy slots would free, but it takes nothing new.
    let mut view = ClusterView::new(vec![
        worker("g1", Pool::Gpu, 0, 4),
        worker("w1", Pool::Wse, 0, 4),
    ]);
    view.update(1, |w| w.available = false);
    let lc = class(LaneName::LatencyCritical, &policy);
    let p = placed(&place(&view, &lc, &request(100, None, 1), &policy, &[]));
    assert_eq!(
        (p.worker, p.route),
        (0, Route::SpillToGpu(SpillCause::NoWseWorker))
    );
    assert!(
        p.reason()
            .starts_with("spill=gpu (no wse worker is taking requests)"),
        "{}",
        p.reason()
    );
    let mut no_spill = policy.clone();
    no_spill.latency_critical.spill = false;
    let refused = place(&view, &lc, &request(100, None, 1), &no_spill, &[]);
    assert_eq!(
        refused,
        Decision::Reject(PlacementError::NoWorkerForLane {
            model: "m".into(),
            lane: LaneName::LatencyCritical,
            pool: Pool::Wse,
            other: Pool::Gpu,
        })
    );
    let Decision::Reject(error) = refused else {
        unreachable!()
    };
    assert_eq!(
        error.to_string(),
        "no wse worker serving model \"m\" is taking requests (drained or unreachable) and the \
         latency-critical lane does not spill to the gpu pool"
    );
    // A busy pool is waited for, as before.
    view.update(1, |w| {
        w.available = true;
        w.outstanding = 4;
    });
    assert_eq!(
        place(&view, &lc, &request(100, None, 1), &no_spill, &[]),
        Decision::Queue
    );
    // The same for cost-sensitive work with its GPUs drained.
    view.update(0, |w| w.available = false);
    no_spill.cost_sensitive.spill = false;
    let cs = class(LaneName::CostSensitive, &no_spill);
    assert!(matches!(
        place(&view, &cs, &request(100, None, 1), &no_spill, &[]),
        Decision::Reject(PlacementError::NoWorkerForLane {
            pool: Pool::Gpu,
            ..
        })
    ));
}

#[test]
fn cost_sensitive_keeps_the_gpu_reserve_and_borrows_idle_wse() {
    let mut policy = PolicyDocument::default();
    policy.placement.gpu_reserve_for_latency = 0.25;
    // 4 GPU workers, 25 % reserved: one of them never takes cost-sensitive work.
    let mut workers: Vec<_> = (0..4)
        .map(|i| worker(&format!("g{i}"), Pool::Gpu, 0, 1))
        .collect();
    workers.push(worker("w1", Pool::Wse, 0, 8));
    let mut view = ClusterView::new(workers);
    let reserved: Vec<usize> = (0..4).filter(|&i| view.in_reserve("m", i, 0.25)).collect();
    assert_eq!(reserved.len(), 1);
    let cs = class(LaneName::CostSensitive, &policy);
    for _ in 0..3 {
        let p = placed(&place(&view, &cs, &request(10, None, 1), &policy, &[]));
        assert_eq!(p.route, Route::Home);
        assert!(!reserved.contains(&p.worker));
        view.update(p.worker, |w| w.outstanding = 1);
    }
    let p = placed(&place(&view, &cs, &request(10, None, 1), &policy, &[]));
    assert_eq!((p.pool, p.route), (Pool::Wse, Route::BorrowWse));
    // WSE above the borrowing threshold: queue.
    view.update(4, |w| w.outstanding = 4);
    assert_eq!(
        place(&view, &cs, &request(10, None, 1), &policy, &[]),
        Decision::Queue
    );
    // The reserve is there for latency-critical spill.
    view.update(4, |w| w.outstanding = 8);
    let lc = class(LaneName::LatencyCritical, &policy);
    let p = placed(&place(&view, &lc, &request(10, None, 1), &policy, &[]));
    assert_eq!(
        (p.worker, p.route),
        (reserved[0], Route::SpillToGpu(SpillCause::WseFull))
    );
    // Small pools have no reserve.
    assert!(!view.in_reserve("m", reserved[0], 0.2));
}

#[test]
fn distinguishes_unknown_models_from_unavailable_ones() {
    let policy = PolicyDocument::default();
    let cs = class(LaneName::CostSensitive, &policy);
    let mut view = ClusterView::new(vec![worker("g1", Pool::Gpu, 0, 4)]);
    let mut r = request(1, None, 1);
    r.model = "x";
    assert_eq!(
        place(&view, &cs, &r, &policy, &[]),
        Decision::Reject(PlacementError::UnknownModel("x".into()))
    );
    assert_eq!(
        place(&view, &cs, &request(1, None, 1), &policy, &[0]),
        Decision::Reject(PlacementError::NoWorker("m".into()))
    );
    view.update(0, |w| w.available = false);
    assert_eq!(
        place(&view, &cs, &request(1, None, 1), &policy, &[]),
        Decision::Reject(PlacementError::NoWorker("m".into()))
    );
}

#[test]
fn a_chunked_engine_makes_a_prompt_wait_a_decode_step_for_each_chunk_before_its_last() {
    let policy = PolicyDocument::default();
    let mut w = worker("g0", Pool::Gpu, 64, 128);
    w.prefill_tokens_per_s = 20_000.0;
    // 50 ms per step: what 20 tokens/s per stream means.
    w.decode_tokens_per_s = 20.0;
    w.queued_prompt_tokens = 1_024;
    w.queued_latency_critical_prompt_tokens = Some(512);
    let predict =
        |w: &WorkerState, lane, prompt| predicted_ttft_ms(w, lane, prompt, false, &policy);
    let lc = LaneName::LatencyCritical;
    let whole = w.clone();
    w.prefill_chunk_tokens = 512;
    // 512 queued latency-critical + 1 536 own = 4 chunks: 3 steps between them.
    let extra = predict(&w, lc, 1_536) - predict(&whole, lc, 1_536);
    assert!((extra - 150.0).abs() < 1e-9, "{extra}");
    // A cost-sensitive prompt waits behind every queued token: 1 024 + 1 536 = 5 chunks.
    let extra = predict(&w, LaneName::CostSensitive, 1_536)
        - predict(&whole, LaneName::CostSensitive, 1_536);
    assert!((extra - 200.0).abs() < 1e-9, "{extra}");
    // Whatever fits one chunk pays no extra step.
    w.queued_latency_critical_prompt_tokens = Some(0);
    let mut idle = whole.clone();
    idle.queued_latency_critical_prompt_tokens = Some(0);
    assert_eq!(predict(&w, lc, 512), predict(&idle, lc, 512));
    assert!(predict(&w, lc, 513) > predict(&idle, lc, 513));
}

#[test]
fn prefers_the_shorter_predicted_ttft_and_the_affinity_owner_within_slack() {
    let policy = PolicyDocument::default();
    let mut workers: Vec<_> = (0..8)
        .map(|i| worker(&format!("g{i}"), Pool::Gpu, 0, 64))
        .collect();
    for (i, w) in workers.iter_mut().enumerate() {
        w.queued_prompt_tokens = 1000 * i as u64;
    }
    let view = ClusterView::new(workers);
    let cs = class(LaneName::CostSensitive, &policy);
    assert_eq!(
        placed(&place(&view, &cs, &request(100, None, 1), &policy, &[])).worker,
        0
    );
    let key = stable_hash("conversation-7");
    let owner = affinity_owner(&view, "m", Pool::Gpu, key, &[]).unwrap();
    let p = placed(&place(
        &view,
        &cs,
        &request(100, Some(key), 1),
        &policy,
        &[],
    ));
    // Within 200 ms slack (1000 queued tokens = 100 ms at 10k tok/s per step of the index).
    if owner <= 2 {
        assert_eq!((p.worker, p.affinity), (owner, true));
    } else {
        assert_eq!((p.worker, p.affinity), (0, false));
    }
}

#[test]
fn the_affinity_owner_gives_way_once_it_runs_far_more_than_the_best_other_worker() {
    let policy = PolicyDocument::default();
    let extra = policy.placement.affinity_max_extra_outstanding;
    let key = stable_hash("one conversation, sent many times at once");
    let idle: Vec<_> = (0..3)
        .map(|i| worker(&format!("g{i}"), Pool::Gpu, 0, 800))
        .collect();
    let owner = affinity_owner(&ClusterView::new(idle.clone()), "m", Pool::Gpu, key, &[]).unwrap();
    let cs = class(LaneName::CostSensitive, &policy);
    let with_owner_at = |outstanding: u32| {
        let mut workers = idle.clone();
        workers[owner].outstanding = outstanding;
        let view = ClusterView::new(workers);
        placed(&place(&view, &cs, &request(10, Some(key), 1), &policy, &[]))
    };
    let kept = with_owner_at(extra);
    assert_eq!((kept.worker, kept.affinity), (owner, true));
    let moved = with_owner_at(extra + 1);
    assert_ne!(moved.worker, owner, "{moved:?}");
    assert!(!moved.affinity);
}

#[test]
fn a_burst_of_one_conversation_spreads_once_each_placement_is_counted() {
    let policy = PolicyDocument::default();
    let key = stable_hash("one conversation, sent many times at once");
    let workers: Vec<_> = (0..3)
        .map(|i| worker(&format!("g{i}"), Pool::Gpu, 0, 800))
        .collect();
    let mut view = ClusterView::new(workers);
    let cs = class(LaneName::CostSensitive, &policy);
    for seed in 0..2_000 {
        let p = placed(&place(
            &view,
            &cs,
            &request(10, Some(key), seed),
            &policy,
            &[],
        ));
        view.update(p.worker, |w| w.outstanding += 1);
    }
    let counts: Vec<u32> = view.workers().iter().map(|w| w.outstanding).collect();
    let share = 2_000 / 3;
    assert!(
        counts.iter().all(|&c| c <= share + share / 10),
        "{counts:?}"
    );
}

#[test]
fn admission_sheds_cost_sensitive_first() {
    let mut policy = PolicyDocument {
        max_queued: 10,
        ..PolicyDocument::default()
    };
    policy.latency_critical.max_queue = 8;
    policy.cost_sensitive.max_queue = 8;
    assert_eq!(
        admit(LaneName::CostSensitive, [2, 7], &policy),
        Admission::Queue
    );
    assert!(matches!(
        admit(LaneName::CostSensitive, [2, 8], &policy),
        Admission::Shed { .. }
    ));
    assert!(matches!(
        admit(LaneName::CostSensitive, [5, 5], &policy),
        Admission::Shed { .. }
    ));
    assert_eq!(
        admit(LaneName::LatencyCritical, [5, 5], &policy),
        Admission::QueueEvicting(LaneName::CostSensitive)
    );
    assert!(matches!(
        admit(LaneName::LatencyCritical, [8, 0], &policy),
        Admission::Shed { .. }
    ));
    assert_eq!(
        queue_deadline_ms(100.0, LaneName::LatencyCritical, &policy),
        100.0 + policy.latency_critical.max_queue_wait_ms
    );
}

/// Two GPU workers publishing their KV: `cold` holds nothing of the prompt, `hot` holds
/// `cached` tokens of it; each has `queued` prompt tokens waiting and `outstanding` requests.
fn hot_and_cold(cold: (u64, u32), hot: (u64, u32)) -> ClusterView {
    let mut workers = Vec::new();
    for (id, (queued, outstanding)) in [("cold", cold), ("hot", hot)] {
        let mut w = worker(id, Pool::Gpu, outstanding, 16);
        w.queued_prompt_tokens = queued;
        w.prefix_cache = true;
        workers.push(w);
    }
    ClusterView::new(workers)
}

fn with_prefix<'a>(prompt_tokens: u32, prefix: &'a [(usize, u32)]) -> RequestInfo<'a> {
    RequestInfo {
        prefix: Some(prefix),
        ..request(prompt_tokens, None, 1)
    }
}

#[test]
fn a_cache_hit_wins_over_a_slightly_less_loaded_cold_worker() {
    let policy = PolicyDocument::default();
    let cs = class(LaneName::CostSensitive, &policy);
    // hot has more queued and one more request, but holds 1 600 of the 2 000 prompt tokens.
    let view = hot_and_cold((200, 1), (400, 2));
    let hits = [(1, 1600)];
    let p = placed(&place(&view, &cs, &with_prefix(2000, &hits), &policy, &[]));
    assert_eq!(view.worker(p.worker).id, "hot");
    assert_eq!(p.cached_tokens, 1600);
    // 400 queued + 400 uncached at 10k tok/s, one decode step at 40 tok/s.
    assert!((p.predicted_ttft_ms - (80.0 + 25.0)).abs() < 1e-6, "{p:?}");
    assert!(p.reason().contains("cached=1600/2000"), "{}", p.reason());
    // Without the lookup the less loaded worker wins, and nothing is said to be cached.
    let p = placed(&place(&view, &cs, &request(2000, None, 1), &policy, &[]));
    assert_eq!(
        (view.worker(p.worker).id.as_str(), p.cached_tokens),
        ("cold", 0)
    );
    assert!(!p.reason().contains("cached="), "{}", p.reason());
}

#[test]
fn a_cache_hit_on_an_overloaded_worker_loses() {
    let policy = PolicyDocument::default();
    let cs = class(LaneName::CostSensitive, &policy);
    // hot holds most of the prompt but 20 000 prompt tokens queue ahead of it (2 s).
    let view = hot_and_cold((200, 1), (20_000, 2));
    let hits = [(1, 1600)];
    let p = placed(&place(&view, &cs, &with_prefix(2000, &hits), &policy, &[]));
    assert_eq!(
        (view.worker(p.worker).id.as_str(), p.cached_tokens),
        ("cold", 0)
    );
    // Busy slots weigh too: a full-minus-one worker's small hit does not beat an idle one.
    let view = hot_and_cold((0, 0), (0, 15));
    let hits = [(1, 64)];
    let p = placed(&place(&view, &cs, &with_prefix(2000, &hits), &policy, &[]));
    assert_eq!(view.worker(p.worker).id, "cold");
    // A full worker is never a candidate, however much it holds.
    let view = hot_and_cold((0, 15), (0, 16));
    let hits = [(1, 2000)];
    let p = placed(&place(&view, &cs, &with_prefix(2000, &hits), &policy, &[]));
    assert_eq!(view.worker(p.worker).id, "cold");
}

#[test]
fn the_slo_still_comes_first() {
    let mut policy = PolicyDocument::default();
    policy.cost_sensitive.ttft_slo_ms = 1000.0;
    let cs = class(LaneName::CostSensitive, &policy);
    // cold meets the SLO but is busy and pricey; hot scores lower yet misses the SLO.
    let mut view = hot_and_cold((8_500, 15), (9_600, 0));
    view.update(0, |w| w.cost_per_mtok = 1.0);
    let hits = [(1, 500)];
    let info = with_prefix(1000, &hits);
    let cold = predicted_ttft_cached_ms(view.worker(0), LaneName::CostSensitive, 1000, 0, &policy);
    let hot = predicted_ttft_cached_ms(view.worker(1), LaneName::CostSensitive, 1000, 500, &policy);
    assert!(cold <= 1000.0 && hot > 1000.0, "{cold} {hot}");
    let p = placed(&place(&view, &cs, &info, &policy, &[]));
    assert_eq!(view.worker(p.worker).id, "cold");
    // Latency-critical work stays on a WSE slot that meets its SLO, however much a GPU holds.
    let mut workers = vec![
        worker("g1", Pool::Gpu, 0, 16),
        worker("w1", Pool::Wse, 0, 4),
    ];
    workers[0].prefix_cache = true;
    let view = ClusterView::new(workers);
    let hits = [(0, 2000)];
    let lc = class(LaneName::LatencyCritical, &policy);
    let p = placed(&place(&view, &lc, &with_prefix(2000, &hits), &policy, &[]));
    assert_eq!((p.pool, p.route), (Pool::Wse, Route::Home));
}

#[test]
fn hits_join_the_sampled_candidates_and_affinity_stays_for_workers_without_kv() {
    let mut policy = PolicyDocument::default();
    policy.placement.scan_below = 0;
    policy.placement.choices = 1;
    let cs = class(LaneName::CostSensitive, &policy);
    let workers: Vec<_> = (0..200)
        .map(|i| {
            let mut w = worker(&format!("g{i}"), Pool::Gpu, 0, 16);
            w.prefix_cache = true;
            w
        })
        .collect();
    let view = ClusterView::new(workers);
    // One sample, but the worker holding the prompt is found through the index.
    for seed in 0..20 {
        let hits = [(137, 1024)];
        let info = RequestInfo {
            seed,
            ..with_prefix(1100, &hits)
        };
        let p = placed(&place(&view, &cs, &info, &policy, &[]));
        assert_eq!((p.worker, p.cached_tokens), (137, 1024));
        // ...unless it is excluded (e.g. it just failed).
        assert_ne!(
            placed(&place(&view, &cs, &info, &policy, &[137])).worker,
            137
        );
    }
    // A looked-up prompt with no hit: KV-publishing workers get no affinity bonus...
    let key = stable_hash("conversation-9");
    let owner = affinity_owner(&view, "m", Pool::Gpu, key, &[]).unwrap();
    let info = RequestInfo {
        affinity: Some(key),
        ..with_prefix(1100, &[])
    };
    let p = placed(&place(&view, &cs, &info, &policy, &[]));
    assert!(!p.affinity, "{p:?}");
    // ...workers that publish none (a wafer-scale gateway) keep it.
    let mut plain = view.clone();
    for i in 0..plain.len() {
        plain.update(i, |w| w.prefix_cache = false);
    }
    let p = placed(&place(&plain, &cs, &info, &policy, &[]));
    assert_eq!((p.worker, p.affinity), (owner, true));
}

fn arb_worker() -> impl Strategy<Value = WorkerState> {
    (
        0u8..40,
        any::<bool>(),
        any::<bool>(),
        0u32..20,
        1u32..16,
        any::<bool>(),
        0u64..20_000,
    )
        .prop_map(|(id, wse, available, outstanding, max, serves, queued)| {
            let pool = if wse { Pool::Wse } else { Pool::Gpu };
            let mut w = worker(&format!("w{id}"), pool, outstanding, max);
            w.available = available;
            w.queued_prompt_tokens = queued;
            if !serves {
                w.models = vec!["other".into()];
            }
            w
        })
}

fn unique(workers: Vec<WorkerState>) -> Vec<WorkerState> {
    let mut seen = std::collections::HashSet::new();
    workers
        .into_iter()
        .filter(|w| seen.insert(w.id.clone()))
        .collect()
}

/// Two GPU workers that report their lanes apart: `backlog` holds 20 000 queued prompt tokens,
/// all cost-sensitive (2 s at 10 000 tok/s); `busy` holds 5 000, all latency-critical.
fn backlog_and_busy() -> ClusterView {
    let mut backlog = worker("backlog", Pool::Gpu, 4, 16);
    backlog.queued_prompt_tokens = 20_000;
    backlog.queued_latency_critical_prompt_tokens = Some(0);
    let mut busy = worker("busy", Pool::Gpu, 4, 16);
    busy.queued_prompt_tokens = 5_000;
    busy.queued_latency_critical_prompt_tokens = Some(5_000);
    ClusterView::new(vec![backlog, busy])
}

#[test]
fn latency_critical_prompts_wait_only_behind_latency_critical_queued_tokens() {
    let policy = PolicyDocument::default();
    let view = backlog_and_busy();
    let backlog = view.worker(0);
    assert_eq!(queued_ahead(backlog, LaneName::LatencyCritical), 0);
    assert_eq!(queued_ahead(backlog, LaneName::CostSensitive), 20_000);
    // 1 000 own tokens at 10 000 tok/s and one decode step at 40 tok/s; cost-sensitive work
    // also waits for the 20 000 queued ahead.
    let lc = predicted_ttft_ms(backlog, LaneName::LatencyCritical, 1000, false, &policy);
    let cs = predicted_ttft_ms(backlog, LaneName::CostSensitive, 1000, false, &policy);
    assert!((lc - (100.0 + 25.0)).abs() < 1e-6, "{lc}");
    assert!((cs - (2100.0 + 25.0)).abs() < 1e-6, "{cs}");
    // No WSE: a latency-critical request spills to the GPU whose cost-sensitive backlog it
    // overtakes, not to the one with less work queued in total.
    let p = placed(&place(
        &view,
        &class(LaneName::LatencyCritical, &policy),
        &request(1000, None, 1),
        &policy,
        &[],
    ));
    assert_eq!(view.worker(p.worker).id, "backlog");
    assert_eq!(p.route, Route::SpillToGpu(SpillCause::NoWseWorker));
    assert!((p.predicted_ttft_ms - lc).abs() < 1e-6, "{p:?}");
    // A cost-sensitive request queues behind everything: the smaller backlog wins.
    let p = placed(&place(
        &view,
        &class(LaneName::CostSensitive, &policy),
        &request(1000, None, 1),
        &policy,
        &[],
    ));
    assert_eq!(view.worker(p.worker).id, "busy");
}

#[test]
fn a_worker_that_does_not_tell_lanes_apart_counts_every_queued_token() {
    let policy = PolicyDocument::default();
    let mut view = backlog_and_busy();
    view.update(0, |w| w.queued_latency_critical_prompt_tokens = None);
    assert_eq!(
        queued_ahead(view.worker(0), LaneName::LatencyCritical),
        20_000
    );
    let p = placed(&place(
        &view,
        &class(LaneName::LatencyCritical, &policy),
        &request(1000, None, 1),
        &policy,
        &[],
    ));
    assert_eq!(view.worker(p.worker).id, "busy");
}

proptest! {
    #[test]
    fn never_places_on_an_unavailable_full_excluded_or_wrong_model_worker(
        workers in proptest::collection::vec(arb_worker(), 0..60),
        exclude in proptest::collection::vec(0usize..60, 0..4),
        latency in any::<bool>(),
        affinity in proptest::option::of(any::<u64>()),
        seed in any::<u64>(),
        choices in 1u32..6,
        scan_below in 0u32..8,
    ) {
        let workers = unique(workers);
        let mut policy = PolicyDocument::default();
        policy.placement.choices = choices;
        policy.placement.scan_below = scan_below;
        let view = ClusterView::new(workers);
        let lane = if latency { LaneName::LatencyCritical } else { LaneName::CostSensitive };
        let decision = place(&view, &class(lane, &policy), &request(500, affinity, seed), &policy, &exclude);
        let eligible = |i: usize| {
            let w = view.worker(i);
            w.has_free_slot() && w.models.iter().any(|m| m == "m") && !exclude.contains(&i)
        };
        match decision {
            Decision::Place(p) => {
                prop_assert!(eligible(p.worker), "placed on {:?}", view.worker(p.worker));
                prop_assert_eq!(p.pool, view.worker(p.worker).pool);
                if !latency && p.pool == Pool::Gpu {
                    prop_assert!(!view.in_reserve("m", p.worker, policy.placement.gpu_reserve_for_latency));
                }
            }
            Decision::Queue => {
                // Queueing a latency-critical request means no worker of either pool was free.
                if latency {
                    prop_assert!(!(0..view.len()).any(eligible));
                }
            }
            Decision::Reject(PlacementError::NoWorker(_)) => {
                let reachable = (0..view.len()).any(|i| {
                    let w = view.worker(i);
                    w.available && w.models.iter().any(|m| m == "m") && !exclude.contains(&i)
                });
                prop_assert!(!reachable);
            }
            Decision::Reject(PlacementError::UnknownModel(_)) => {
                prop_assert!(!view.workers().iter().any(|w| w.models.iter().any(|m| m == "m")));
            }
            Decision::Reject(PlacementError::NoWorkerForLane { pool, .. }) => {
                prop_assert!(!policy.lane(lane).spill);
                let reachable = (0..view.len()).any(|i| {
                    let w = view.worker(i);
                    w.pool == pool && w.available && w.models.iter().any(|m| m == "m")
                        && !exclude.contains(&i)
                });
                prop_assert!(!reachable);
            }
        }
    }

    #[test]
    fn latency_critical_stays_on_wse_while_a_wse_slot_meets_the_slo(
        workers in proptest::collection::vec(arb_worker(), 1..40),
        seed in any::<u64>(),
    ) {
        let view = ClusterView::new(unique(workers));
        let policy = PolicyDocument::default();
        let lc = class(LaneName::LatencyCritical, &policy);
        let wse_ok = (0..view.len()).any(|i| {
            let w = view.worker(i);
            w.pool == Pool::Wse && w.has_free_slot() && w.models.iter().any(|m| m == "m")
                && predicted_ttft_ms(w, LaneName::LatencyCritical, 500, false, &policy) <= lc.ttft_slo_ms
        });
        if wse_ok
            && let Decision::Place(p) = place(&view, &lc, &request(500, None, seed), &policy, &[])
        {
            prop_assert_eq!(p.pool, Pool::Wse);
        }
    }

    #[test]
    fn affinity_is_stable_when_unrelated_workers_join_or_leave(
        n in 2usize..300,
        key in any::<u64>(),
        joiner in 1000u32..2000,
        leaver in any::<prop::sample::Index>(),
    ) {
        let workers: Vec<_> = (0..n).map(|i| worker(&format!("w{i}"), Pool::Gpu, 0, 4)).collect();
        let view = ClusterView::new(workers.clone());
        let owner = view.worker(affinity_owner(&view, "m", Pool::Gpu, key, &[]).unwrap()).id.clone();

        // A worker joins: the key stays, or moves to the newcomer.
        let mut grown = workers.clone();
        grown.push(worker(&format!("w{joiner}"), Pool::Gpu, 0, 4));
        let grown = ClusterView::new(grown);
        let after = grown.worker(affinity_owner(&grown, "m", Pool::Gpu, key, &[]).unwrap()).id.clone();
        let newcomer = format!("w{joiner}");
        prop_assert!(after == owner || after == newcomer);

        // A worker other than the owner leaves, or becomes unavailable: the key stays.
        let leave = leaver.index(n);
        if workers[leave].id != owner {
            let mut shrunk = workers.clone();
            shrunk.remove(leave);
            let shrunk = ClusterView::new(shrunk);
            let after = shrunk.worker(affinity_owner(&shrunk, "m", Pool::Gpu, key, &[]).unwrap()).id.clone();
            prop_assert_eq!(&after, &owner);
            let mut drained = view.clone();
            drained.update(leave, |w| w.available = false);
            let after = drained.worker(affinity_owner(&drained, "m", Pool::Gpu, key, &[]).unwrap()).id.clone();
            prop_assert_eq!(&after, &owner);
        }
    }

    #[test]
    fn the_owner_is_the_first_group_in_rank_order_with_an_eligible_worker(
        n in 1usize..300,
        key in any::<u64>(),
        unavailable in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        excluded in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let workers: Vec<_> = (0..n).map(|i| worker(&format!("w{i}"), Pool::Gpu, 0, 4)).collect();
        let mut view = ClusterView::new(workers);
        for i in &unavailable {
            view.update(i.index(n), |w| w.available = false);
        }
        let exclude: Vec<usize> = excluded.iter().map(|i| i.index(n)).collect();
        // Every group ranked for the key, best first; the owner is the key's favourite worker
        // of the first group that has an eligible one.
        let mut order: Vec<(u64, usize)> =
            (0..AFFINITY_GROUPS).map(|g| (mix(key ^ mix(g as u64 + 1)), g)).collect();
        order.sort_unstable_by(|a, b| b.cmp(a));
        let expected = order.iter().find_map(|&(_, g)| {
            (0..n)
                .filter(|&w| view.id_hash(w as u32) % AFFINITY_GROUPS as u64 == g as u64)
                .filter(|&w| view.worker(w).available && !exclude.contains(&w))
                .max_by_key(|&w| (mix(key ^ view.id_hash(w as u32)), std::cmp::Reverse(w)))
        });
        prop_assert_eq!(affinity_owner(&view, "m", Pool::Gpu, key, &exclude), expected);
    }

    #[test]
    fn shedding_order_holds(lc in 0u32..20, cs in 0u32..20, max_queued in 1u32..30, lane_max in 1u32..20) {
        let mut policy = PolicyDocument { max_queued, ..PolicyDocument::default() };
        policy.latency_critical.max_queue = lane_max;
        policy.cost_sensitive.max_queue = lane_max;
        let depths = [lc, cs];
        let for_lc = admit(LaneName::LatencyCritical, depths, &policy);
        let for_cs = admit(LaneName::CostSensitive, depths, &policy);
        // Whenever a cost-sensitive request is admitted, so is a latency-critical one.
        if matches!(for_cs, Admission::Queue) && lc < lane_max {
            prop_assert_eq!(for_lc, Admission::Queue);
        }
        // Latency-critical work is shed only at its own bound or when nothing cost-sensitive
        // is left to shed instead.
        if matches!(for_lc, Admission::Shed { .. }) {
            prop_assert!(lc >= lane_max || cs == 0);
        }
        // Only cost-sensitive requests are ever evicted.
        prop_assert!(!matches!(for_cs, Admission::QueueEvicting(_)));
        if let Admission::QueueEvicting(lane) = for_lc {
            prop_assert_eq!(lane, LaneName::CostSensitive);
        }
    }
}
