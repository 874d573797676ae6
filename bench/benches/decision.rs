//! One routing decision (`policy::place`) at 10 000 workers, with and without an affinity key,
//! on a half-loaded cluster. Target: p99 under 10 µs. Besides criterion's own report, prints
//! p50/p99 of single decisions measured one by one.
//!
//! Also the router's view upkeep around a decision at 10 000 workers: the placement task
//! decides on a standing view and patches the worker it placed on (`decide/10k/patched-view`);
//! before it, every decision rebuilt the view from every worker's state
//! (`decide/10k/rebuilt-view`).

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use switchyard_cluster::Pool;
use switchyard_policy::classify::Classification;
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_policy::{ClusterView, Decision, RequestInfo, WorkerState, mix, place};

const WORKERS: usize = 10_000;

fn cluster() -> ClusterView {
    let workers = (0..WORKERS)
        .map(|i| {
            let wse = i % 10 == 0;
            let mut w = WorkerState::new(
                format!("{}-{i}", if wse { "wse" } else { "gpu" }),
                if wse { Pool::Wse } else { Pool::Gpu },
                vec!["llama-3.1-70b".into()],
                if wse { 16 } else { 128 },
            );
            w.outstanding = (mix(i as u64) % u64::from(w.max_concurrent)) as u32;
            w.queued_prompt_tokens = mix(i as u64 + 7) % 8192;
            w.prefill_tokens_per_s = if wse { 100_000.0 } else { 20_000.0 };
            w.decode_tokens_per_s = if wse { 1500.0 } else { 40.0 };
            w
        })
        .collect();
    ClusterView::new(workers)
}

fn class(lane: LaneName, policy: &PolicyDocument) -> Classification {
    Classification {
        lane,
        ttft_slo_ms: policy.lane(lane).ttft_slo_ms,
        min_tokens_per_s: policy.lane(lane).min_tokens_per_s,
        reason: String::new(),
    }
}

fn decisions(c: &mut Criterion) {
    let view = cluster();
    let policy = PolicyDocument::default();
    for (name, lane, affinity) in [
        (
            "place/10k/latency-critical",
            LaneName::LatencyCritical,
            false,
        ),
        ("place/10k/cost-sensitive", LaneName::CostSensitive, false),
        (
            "place/10k/cost-sensitive+affinity",
            LaneName::CostSensitive,
            true,
        ),
    ] {
        let class = class(lane, &policy);
        let mut seed = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                seed += 1;
                let info = RequestInfo {
                    model: "llama-3.1-70b",
                    prompt_tokens: 1500,
                    affinity: affinity.then(|| mix(seed)),
                    seed,
                    prefix: None,
                };
                black_box(place(&view, &class, &info, &policy, &[]))
            })
        });
        // Single decisions timed one by one, for the p99.
        let mut samples: Vec<u128> = (0..200_000u64)
            .map(|s| {
                let info = RequestInfo {
                    model: "llama-3.1-70b",
                    prompt_tokens: 1500,
                    affinity: affinity.then(|| mix(s)),
                    seed: s,
                    prefix: None,
                };
                let start = std::time::Instant::now();
                black_box(place(&view, &class, &info, &policy, &[]));
                start.elapsed().as_nanos()
            })
            .collect();
        samples.sort_unstable();
        let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        println!(
            "{name}: single-decision latency p50 {} ns, p99 {} ns, p99.9 {} ns (200000 decisions)",
            p(0.50),
            p(0.99),
            p(0.999)
        );
    }
}

fn view_upkeep(c: &mut Criterion) {
    let policy = PolicyDocument::default();
    let class = class(LaneName::CostSensitive, &policy);
    let info = |seed: u64| RequestInfo {
        model: "llama-3.1-70b",
        prompt_tokens: 1500,
        affinity: None,
        seed,
        prefix: None,
    };
    let states: Vec<WorkerState> = cluster().workers().to_vec();
    let mut seed = 0u64;
    c.bench_function("decide/10k/rebuilt-view", |b| {
        b.iter(|| {
            seed += 1;
            let view = ClusterView::new(states.clone());
            black_box(place(&view, &class, &info(seed), &policy, &[]))
        })
    });
    let mut view = cluster();
    let decide = |seed: u64, view: &mut ClusterView| {
        let decision = place(view, &class, &info(seed), &policy, &[]);
        if let Decision::Place(placed) = &decision {
            // The slot it took (wrapping, so the cluster stays half loaded).
            view.update(placed.worker, |w| {
                w.outstanding = (w.outstanding + 1) % w.max_concurrent
            });
        }
        decision
    };
    c.bench_function("decide/10k/patched-view", |b| {
        b.iter(|| {
            seed += 1;
            black_box(decide(seed, &mut view))
        })
    });
    let mut samples: Vec<u128> = (0..200_000u64)
        .map(|s| {
            let start = std::time::Instant::now();
            black_box(decide(s, &mut view));
            start.elapsed().as_nanos()
        })
        .collect();
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "decide/10k/patched-view: single-decision latency p50 {} ns, p99 {} ns, p99.9 {} ns (200000 decisions)",
        p(0.50),
        p(0.99),
        p(0.999)
    );
}

criterion_group!(benches, decisions, view_upkeep);
criterion_main!(benches);
