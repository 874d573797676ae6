//! Cache-aware placement at 1 000 workers: the prefix-index lookup of a prompt (block hashing
//! included) plus `policy::place` with the hits, as the router does per request. Target: p99
//! under 20 µs. Also prints the prefix index's memory with every worker's cache full.
//!
//! The cluster: every worker holds a shared 256-token system prompt and its own conversations
//! (each a 40-block prefix), 4 096 blocks of 32 tokens per worker (4.1 M worker-block pairs).
//! A request continues one conversation: the walk crosses the system prompt's blocks held by
//! all 1 000 workers, then the conversation's held by one.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use switchyard_cluster::Pool;
use switchyard_policy::classify::Classification;
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_policy::{ClusterView, RequestInfo, WorkerState, mix, place};
use switchyard_proto::kv_blocks;
use switchyard_proto::v1;
use switchyard_router::prefix_index::{PrefixIndex, PrefixIndexConfig};

const WORKERS: usize = 1_000;
const BLOCK: usize = 32;
const BLOCKS_PER_WORKER: usize = 4_096;
const SYSTEM_BLOCKS: usize = 8;
const CONVERSATION_BLOCKS: usize = 40;
/// Conversations per worker: its blocks less the system prompt's, in whole conversations.
const CONVERSATIONS: usize = (BLOCKS_PER_WORKER - SYSTEM_BLOCKS) / CONVERSATION_BLOCKS;

fn system_prompt() -> Vec<u32> {
    (0..(SYSTEM_BLOCKS * BLOCK) as u32).collect()
}

/// Conversation `c`'s tokens after the system prompt.
fn conversation(c: usize) -> Vec<u32> {
    (0..CONVERSATION_BLOCKS * BLOCK)
        .map(|i| (mix((c * 100_000 + i) as u64) % 49_152) as u32)
        .collect()
}

fn worker_id(i: usize) -> String {
    format!(
        "{}-{i:04}",
        if i.is_multiple_of(10) { "wse" } else { "gpu" }
    )
}

fn cluster() -> ClusterView {
    let workers = (0..WORKERS)
        .map(|i| {
            let wse = i % 10 == 0;
            let mut w = WorkerState::new(
                worker_id(i),
                if wse { Pool::Wse } else { Pool::Gpu },
                vec!["llama-3.1-70b".into()],
                if wse { 16 } else { 128 },
            );
            w.outstanding = (mix(i as u64) % u64::from(w.max_concurrent)) as u32;
            w.queued_prompt_tokens = mix(i as u64 + 7) % 8192;
            w.prefill_tokens_per_s = if wse { 100_000.0 } else { 20_000.0 };
            w.decode_tokens_per_s = if wse { 1500.0 } else { 40.0 };
            w.prefix_cache = !wse;
            w
        })
        .collect();
    ClusterView::new(workers)
}

fn index() -> PrefixIndex {
    let mut index = PrefixIndex::new(PrefixIndexConfig::default());
    let system = system_prompt();
    for w in 0..WORKERS {
        let mut stored = kv_blocks::block_hashes(&system, BLOCK);
        for k in 0..CONVERSATIONS {
            let mut prompt = system.clone();
            prompt.extend(conversation(w * CONVERSATIONS + k));
            stored.extend(&kv_blocks::block_hashes(&prompt, BLOCK)[SYSTEM_BLOCKS..]);
        }
        let frame = v1::KvEvents {
            block_tokens: BLOCK as u32,
            hash_scheme: kv_blocks::HASH_SCHEME.into(),
            snapshot: true,
            stored,
            ..Default::default()
        };
        index
            .apply(&worker_id(w), 1, &frame)
            .expect("a valid frame");
    }
    index
}

fn decisions(c: &mut Criterion) {
    let started = std::time::Instant::now();
    let index = index();
    let stats = index.stats();
    println!(
        "prefix index at {WORKERS} workers x {} blocks: {} distinct blocks, {} worker-block \
         pairs, {:.1} MiB ({:.1} bytes a pair), built in {:.1} s",
        stats.entries / WORKERS,
        stats.blocks,
        stats.entries,
        stats.bytes as f64 / (1 << 20) as f64,
        stats.bytes as f64 / stats.entries as f64,
        started.elapsed().as_secs_f64()
    );
    let view = cluster();
    let policy = PolicyDocument::default();
    let class = Classification {
        lane: LaneName::CostSensitive,
        ttft_slo_ms: policy.cost_sensitive.ttft_slo_ms,
        min_tokens_per_s: policy.cost_sensitive.min_tokens_per_s,
        reason: String::new(),
    };
    // Requests continue conversations of the GPU workers, with 100 new tokens.
    let prompts: Vec<Vec<u32>> = (0..512)
        .map(|r| {
            let mut w = (mix(r) % WORKERS as u64) as usize;
            if w.is_multiple_of(10) {
                w += 1;
            }
            let k = (mix(r + 99) % CONVERSATIONS as u64) as usize;
            let mut prompt = system_prompt();
            prompt.extend(conversation(w * CONVERSATIONS + k));
            prompt.extend(0..100);
            prompt
        })
        .collect();
    // What the dispatcher does per attempt: look the prompt up, name the hits by view index,
    // place.
    let decide = |seed: u64| {
        let prompt = &prompts[(seed % prompts.len() as u64) as usize];
        let hits: Vec<(usize, u32)> = index
            .lookup(prompt)
            .into_iter()
            .filter_map(|h| Some((view.index_of(&h.worker)?, h.cached_tokens)))
            .collect();
        let info = RequestInfo {
            model: "llama-3.1-70b",
            prompt_tokens: prompt.len() as u32,
            affinity: None,
            seed,
            prefix: Some(&hits),
        };
        place(&view, &class, &info, &policy, &[])
    };
    // How often the conversation's worker wins (it may be in the latency reserve, or a
    // sampled worker's shorter queue may outweigh the prefill it saves).
    let full = ((SYSTEM_BLOCKS + CONVERSATION_BLOCKS) * BLOCK) as u32;
    let on_holder = (0..prompts.len() as u64)
        .filter(|&seed| {
            matches!(decide(seed), switchyard_policy::Decision::Place(p) if p.cached_tokens == full)
        })
        .count();
    println!(
        "placed where the whole conversation is cached: {on_holder} of {} decisions",
        prompts.len()
    );
    let mut seed = 0u64;
    c.bench_function("place/1k/prefix-lookup+place", |b| {
        b.iter(|| {
            seed += 1;
            black_box(decide(seed))
        })
    });
    let mut seed = 0u64;
    c.bench_function("place/1k/prefix-lookup-only", |b| {
        b.iter(|| {
            seed += 1;
            black_box(index.lookup(&prompts[(seed % prompts.len() as u64) as usize]))
        })
    });
    let mut samples: Vec<u128> = (0..200_000u64)
        .map(|s| {
            let start = std::time::Instant::now();
            black_box(decide(s));
            start.elapsed().as_nanos()
        })
        .collect();
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "place/1k/prefix-lookup+place: single-decision latency p50 {} ns, p99 {} ns, \
         p99.9 {} ns (200000 decisions, {}-token prompts)",
        p(0.50),
        p(0.99),
        p(0.999),
        prompts[0].len()
    );
}

criterion_group!(benches, decisions);
criterion_main!(benches);
