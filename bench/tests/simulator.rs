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
