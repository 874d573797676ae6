//! The simulator's prefix caches and the Switchyard placer's use of them: the router's own
//! policy code, fed the cached prefix per worker from what the simulated workers published.

use std::path::Path;
use std::sync::Arc;

use switchyard_bench::simulate::engine::{RunResult, SimRequest, simulate};
use switchyard_bench::simulate::profile::Profiles;
use switchyard_bench::simulate::trace::TraceRequest;
use switchyard_bench::simulate::{classify_all, placers};
use switchyard_policy::document::LaneName;

fn profiles(gpus: u32) -> Profiles {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/default.json");
    let mut p = Profiles::load(Path::new(path)).expect("the shipped profile is valid");
    p.cluster.gpu_workers = gpus;
    p.cluster.wse_workers = 0;
    p.policy.placement.gpu_reserve_for_latency = 0.0;
    p
}

/// A cost-sensitive request of `blocks` full 512-token blocks named `ids`.
fn turn(arrival_ms: f64, ids: &[u64]) -> TraceRequest {
    TraceRequest {
        arrival_ms,
        prompt_tokens: 512 * ids.len() as u32 + 100,
        output_tokens: 8,
        hash_ids: Arc::from(ids.to_vec()),
    }
}

fn run(policy: &str, profiles: &Profiles, rows: Vec<TraceRequest>) -> (Vec<SimRequest>, RunResult) {
    let requests = classify_all(&[(Some(LaneName::CostSensitive), rows)], profiles);
    let mut placer = placers::placer(policy, &profiles.policy).expect("known policy");
    let result = simulate(profiles, &profiles.policy, &requests, placer.as_mut());
    (requests, result)
}

/// Three conversations start together (so they land on different workers); their second turns
/// arrive one at a time much later, when every worker is idle again: equal loads, so only the
/// cache tells the workers apart, and each turn must go where its first turn ran.
#[test]
fn a_continued_conversation_goes_to_the_worker_holding_its_prefix() {
    let profiles = profiles(4);
    let conversations: [Vec<u64>; 3] = [vec![1, 2, 3, 4], vec![11, 12, 13, 14], vec![21, 22, 23]];
    let mut rows: Vec<TraceRequest> = conversations
        .iter()
        .enumerate()
        .map(|(i, ids)| turn(i as f64, ids))
        .collect();
    for (i, ids) in conversations.iter().enumerate() {
        let mut next = ids.clone();
        next.extend([ids[0] * 1000, ids[0] * 1000 + 1]);
        rows.push(turn(60_000.0 + 20_000.0 * i as f64, &next));
    }
    let (requests, result) = run("switchyard", &profiles, rows);
    let worker_of = |prefix: u64, turns: usize| {
        requests
            .iter()
            .zip(&result.outcomes)
            .filter(|(r, _)| r.hash_ids[0] == prefix && r.hash_ids.len() > turns)
            .map(|(r, o)| (r.hash_ids.len(), *o))
            .collect::<Vec<_>>()
    };
    let mut first_workers = Vec::new();
    for ids in &conversations {
        let turns = worker_of(ids[0], 0);
        assert_eq!(turns.len(), 2);
        let (first, second) = (turns[0].1, turns[1].1);
        assert!(first.served && second.served);
        first_workers.push(first.worker);
        assert_eq!(
            second.worker, first.worker,
            "conversation {ids:?}: turn 2 left the worker holding turn 1"
        );
        let held = 512 * ids.len() as u32;
        assert_eq!(first.cached_tokens, 0);
        assert_eq!(second.predicted_cached_tokens, held, "the router's view");
        assert_eq!(second.cached_tokens, held, "what the worker reused");
    }
    first_workers.sort();
    first_workers.dedup();
    assert_eq!(
        first_workers.len(),
        3,
        "first turns spread over three workers"
    );

    // The same replay without the router's view (the static baseline runs the same policy
    // code with `prefix: None`): idle workers tie and the lowest index wins every turn 2, so
    // at most one conversation finds its cache.
    let rows = requests_back(&requests);
    let (requests, result) = run("static", &profiles, rows);
    let reused = requests
        .iter()
        .zip(&result.outcomes)
        .filter(|(r, o)| r.hash_ids.len() > 4 && o.cached_tokens > 0)
        .count();
    assert!(reused <= 1, "{reused}");
}

fn requests_back(requests: &[SimRequest]) -> Vec<TraceRequest> {
    requests
        .iter()
        .map(|r| TraceRequest {
            arrival_ms: r.arrival_ms,
            prompt_tokens: r.prompt_tokens,
            output_tokens: r.output_tokens,
            hash_ids: r.hash_ids.clone(),
        })
        .collect()
}

/// A second turn sent while the first is still prefilling: the worker has not published the
/// blocks yet, so the router predicts no reuse (it knows only what workers published) and the
/// worker reuses nothing (blocks being computed are not reusable).
#[test]
fn the_router_knows_only_published_blocks() {
    let profiles = profiles(2);
    let ids: Vec<u64> = (1..=20).collect();
    let rows = vec![turn(0.0, &ids), turn(1.0, &ids)];
    let (_, result) = run("switchyard", &profiles, rows);
    let second = result.outcomes[1];
    assert!(second.served);
    assert_eq!(second.predicted_cached_tokens, 0);
    assert_eq!(second.cached_tokens, 0);
}

/// A cost-sensitive request borrows the only WSE slot; a long latency-critical prompt that no
/// GPU could start within its SLO arrives: the policy moves the borrower to a GPU, which
/// prefills its prompt and the tokens generated so far again, less the prefix it has cached.
#[test]
fn a_preempted_generation_pays_its_re_prefill_on_the_target() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/default.json");
    let mut p = Profiles::load(Path::new(path)).expect("the shipped profile is valid");
    p.cluster.gpu_workers = 2;
    p.cluster.wse_workers = 1;
    p.wse.slots = 1;
    p.gpu.max_concurrent = 1;
    p.policy.placement.gpu_reserve_for_latency = 0.5;
    p.policy.migration.enabled = true;
    p.policy.hedging.enabled = false;
    let row = |arrival_ms: f64, prompt_tokens: u32, output_tokens: u32, ids: &[u64]| TraceRequest {
        arrival_ms,
        prompt_tokens,
        output_tokens,
        hash_ids: Arc::from(ids.to_vec()),
    };
    // A holds the GPU outside the reserve briefly and leaves blocks 1 and 2 cached there; B
    // (blocks 1-8) arrives while A runs and borrows the WSE slot; C needs that slot.
    let cheap = vec![
        row(0.0, 1_100, 5, &[1, 2, 3]),
        row(1.0, 4_096, 3_000, &[1, 2, 3, 4, 5, 6, 7, 8]),
    ];
    let urgent = vec![row(500.0, 30_000, 10, &[])];
    let requests = classify_all(
        &[
            (Some(LaneName::CostSensitive), cheap),
            (Some(LaneName::LatencyCritical), urgent),
        ],
        &p,
    );
    let run = |name: &str| {
        let mut placer = placers::placer(name, &p.policy).unwrap();
        simulate(&p, &p.policy, &requests, placer.as_mut())
    };
    let moved = run("switchyard");
    let still = run("switchyard_no_moves");
    let (b, c) = (&moved.outcomes[1], &moved.outcomes[2]);
    assert_eq!(moved.moves.preempt, 1, "{:?}", moved.moves);
    assert_eq!(b.moves, 1);
    assert_eq!(moved.pool[b.worker as usize], switchyard_cluster::Pool::Gpu);
    assert_eq!(moved.pool[c.worker as usize], switchyard_cluster::Pool::Wse);
    // B's first token came on the WSE at 1 + 150 + 4096 / 50 ms; by 500 ms it had made
    // 1 + floor((500 - first) × 1.5) tokens, which the GPU prefills with its prompt, less the
    // two 512-token blocks A left cached there.
    let first = 1.0 + 150.0 + 4_096.0 / 50.0;
    let generated = 1 + ((500.0 - first) * 1.5f64).floor() as u32;
    let reprefill = 4_096 + generated - 1_024;
    assert_eq!(moved.moves.reprefill_tokens, u64::from(reprefill));
    assert_eq!(b.billed_tokens, generated);
    // The re-prefill takes GPU time: B ends no earlier than the prefill and the rest of its
    // tokens at the GPU's best single-stream rate.
    let gpu = &p.gpu;
    let earliest = 500.0
        + 1000.0 * f64::from(reprefill) / gpu.prefill_tokens_per_s
        + f64::from(3_000 - generated - 1) * (gpu.step_base_ms + gpu.step_per_seq_ms);
    assert!(b.finish_ms >= earliest, "{} < {earliest}", b.finish_ms);
    // Every context token prefilled, counted once: three first runs and the move.
    assert_eq!(
        moved.moves.prefill_tokens,
        u64::from(30_000 + reprefill)
            + moved.outcomes[0..2]
                .iter()
                .zip([1_100u32, 4_096])
                .map(|(o, t)| u64::from(t - o.cached_tokens))
                .sum::<u64>()
    );
    // C met its SLO on the WSE; without moves it spilled to a GPU and missed it.
    assert!(c.first_token_ms - 500.0 <= 1_000.0, "{c:?}");
    let c_still = &still.outcomes[2];
    assert!(c_still.first_token_ms - 500.0 > 1_000.0, "{c_still:?}");
    assert_eq!(still.moves.preempt, 0);
}

/// A thousand latency-critical requests in bursts with hedging on: hedges happen, every
/// request is served once, the budget is respected and losers' waste is counted.
#[test]
fn hedges_stay_within_their_budget_over_a_thousand_requests() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/default.json");
    let mut p = Profiles::load(Path::new(path)).expect("the shipped profile is valid");
    p.cluster.gpu_workers = 4;
    p.cluster.wse_workers = 1;
    p.wse.slots = 4;
    p.policy.migration.enabled = false;
    p.policy.hedging.enabled = true;
    p.policy.hedging.slo_margin = 0.3;
    let rows: Vec<TraceRequest> = (0..1_000)
        .map(|i| TraceRequest {
            arrival_ms: f64::from(i / 25) * 400.0 + f64::from(i % 25),
            prompt_tokens: 1_000 + (i * 37 % 3_000),
            output_tokens: 8,
            hash_ids: Arc::from(Vec::new()),
        })
        .collect();
    let requests = classify_all(&[(Some(LaneName::LatencyCritical), rows)], &p);
    let mut placer = placers::placer("switchyard", &p.policy).unwrap();
    let result = simulate(&p, &p.policy, &requests, placer.as_mut());
    let m = result.moves;
    assert!(m.hedges > 0, "{m:?}");
    assert!(m.hedge_wins <= m.hedges);
    let prompt: u64 = requests.iter().map(|r| u64::from(r.prompt_tokens)).sum();
    assert_eq!(m.hedge_budget_tokens, prompt);
    assert!(m.hedge_budget_spent as f64 <= 0.05 * prompt as f64, "{m:?}");
    assert!(m.hedge_wasted_tokens <= m.hedge_budget_spent, "{m:?}");
    let hedged = result.outcomes.iter().filter(|o| o.hedged).count() as u64;
    assert_eq!(hedged, m.hedges);
    for (r, o) in requests.iter().zip(&result.outcomes) {
        assert!(o.served && !o.shed, "{o:?}");
        assert!(
            o.first_token_ms >= r.arrival_ms && o.finish_ms >= o.first_token_ms,
            "{o:?}"
        );
    }
}

/// The modelled GPU prefills in the candle engine's order, not first come first served: among
/// prompts of one lane the shortest remaining goes first (a long prompt moves up only as it
/// waits), so a short prompt admitted behind a long one gets its first token long before it.
#[test]
fn a_gpu_prefills_the_shortest_waiting_prompt_first() {
    let profiles = profiles(1);
    let long: Vec<u64> = (100..140).collect();
    let middle: Vec<u64> = (200..206).collect();
    let rows = vec![turn(0.0, &long), turn(0.1, &middle), turn(0.2, &[300])];
    let (requests, result) = run("switchyard", &profiles, rows);
    let first_token = |blocks: usize| {
        requests
            .iter()
            .zip(&result.outcomes)
            .find(|(r, _)| r.hash_ids.len() == blocks)
            .map(|(_, o)| o.first_token_ms)
            .expect("the request ran")
    };
    let (long, middle, short) = (first_token(40), first_token(6), first_token(1));
    assert!(
        short < middle && middle < long,
        "first tokens: short {short} ms, middle {middle} ms, long {long} ms"
    );
    // The long prompt still ends its prefill once the others are done, not starved.
    assert!(long.is_finite() && long > 0.0);
}

/// Decode rate of a served request with more than one output token (as the SLO counts it).
fn decode_rate(request: &SimRequest, outcome: &switchyard_bench::simulate::engine::Outcome) -> f64 {
    f64::from(request.output_tokens - 1) / ((outcome.finish_ms - outcome.first_token_ms) / 1000.0)
}

/// A latency-critical stream decoding on a GPU while a long cost-sensitive prompt is prefilled
/// beside it: unpaced, each step's full chunk would slow it below its lane's minimum (a
/// 30 ms decode step + 512 tokens at 20 000 tok/s = 55.8 ms a token); the chunks are cut so it
/// keeps the minimum, and the long prompt still gets its first token.
#[test]
fn a_gpu_paces_its_prefill_chunks_to_keep_a_latency_critical_stream_at_its_rate() {
    let mut p = profiles(1);
    p.gpu.step_base_ms = 30.0;
    let row = |arrival_ms: f64, prompt_tokens: u32, output_tokens: u32| TraceRequest {
        arrival_ms,
        prompt_tokens,
        output_tokens,
        hash_ids: Arc::from(Vec::new()),
    };
    let requests = classify_all(
        &[
            (Some(LaneName::LatencyCritical), vec![row(0.0, 200, 100)]),
            (Some(LaneName::CostSensitive), vec![row(100.0, 40_000, 4)]),
        ],
        &p,
    );
    let mut placer = placers::placer("switchyard", &p.policy).unwrap();
    let result = simulate(&p, &p.policy, &requests, placer.as_mut());
    let (stream, long) = if requests[0].lane == LaneName::LatencyCritical {
        (0, 1)
    } else {
        (1, 0)
    };
    let rate = decode_rate(&requests[stream], &result.outcomes[stream]);
    let min = requests[stream].min_tokens_per_s;
    assert!(
        min > 17.9,
        "the lane promises more than an unpaced step gives: {min}"
    );
    assert!(rate >= min, "decoded at {rate:.2} tok/s, promised {min}");
    let o = &result.outcomes[long];
    assert!(o.served && o.first_token_ms > 0.0, "{o:?}");
    // It was prefilled in smaller chunks while the stream decoded: later than at full chunks
    // (79 steps of 55.8 ms after 100 ms), not starved.
    assert!(o.first_token_ms > 100.0 + 79.0 * 55.8, "{o:?}");
}

/// The only WSE slot is busy when a latency-critical request arrives, so it starts on the GPU;
/// cost-sensitive work then fills the GPU's batch and its decode falls below the lane's
/// minimum. When the WSE slot frees, the stream moves there (re-prefilling its context) and
/// its rate over the whole answer meets the minimum; without moves it stays behind.
#[test]
fn a_latency_critical_stream_decoding_below_its_minimum_moves_to_a_freed_wse_slot() {
    let mut p = profiles(1);
    p.cluster.wse_workers = 1;
    p.wse.slots = 1;
    p.gpu.step_per_seq_ms = 1.0;
    p.policy.migration.enabled = true;
    p.policy.hedging.enabled = false;
    let row = |arrival_ms: f64, prompt_tokens: u32, output_tokens: u32| TraceRequest {
        arrival_ms,
        prompt_tokens,
        output_tokens,
        hash_ids: Arc::from(Vec::new()),
    };
    // 1 500 tokens at 1 500 tok/s: the WSE slot frees about a second in.
    let wse_holder = row(0.0, 100, 1_500);
    let stream = row(10.0, 200, 400);
    let batch: Vec<TraceRequest> = (0..60)
        .map(|i| row(20.0 + f64::from(i), 100, 2_000))
        .collect();
    let requests = classify_all(
        &[
            (Some(LaneName::LatencyCritical), vec![wse_holder, stream]),
            (Some(LaneName::CostSensitive), batch),
        ],
        &p,
    );
    let i = requests
        .iter()
        .position(|r| r.output_tokens == 400)
        .expect("the stream");
    let run = |name: &str| {
        let mut placer = placers::placer(name, &p.policy).unwrap();
        simulate(&p, &p.policy, &requests, placer.as_mut())
    };
    let moved = run("switchyard");
    let o = &moved.outcomes[i];
    assert_eq!(moved.moves.rebalance, 1, "{:?}", moved.moves);
    assert_eq!(o.moves, 1);
    assert_eq!(moved.pool[o.worker as usize], switchyard_cluster::Pool::Wse);
    let min = requests[i].min_tokens_per_s;
    let rate = decode_rate(&requests[i], o);
    assert!(
        rate >= min,
        "{rate:.2} tok/s after the move, promised {min}"
    );

    let stayed = run("switchyard_no_moves");
    let o = &stayed.outcomes[i];
    assert_eq!(
        stayed.pool[o.worker as usize],
        switchyard_cluster::Pool::Gpu
    );
    let rate = decode_rate(&requests[i], o);
    assert!(rate < min, "without moves it stays behind: {rate:.2} tok/s");
}
