//! Drawing one token from a logits row of SmolLM2's vocabulary (49 152) with the settings
//! coding assistants send (a temperature, with and without a nucleus or a top-k cut). The
//! scheduler thread samples every sequence of a decode step one after another, so this cost
//! is paid per token per stream, outside the parallel forward. `penalties_…` is what
//! `frequency_penalty` and `repetition_penalty` add to a draw over a 2 000-token prompt and 256
//! tokens of output; `logprobs_top20` what a request asking for log probabilities adds.

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use switchyard_worker_gpu::penalties::{History, Penalties};
use switchyard_worker_gpu::sampling::{Sampler, SamplingParams, logprobs};

const VOCAB: usize = 49_152;

/// A peaked row like a model's: a few strong candidates over a long tail.
fn logits() -> Vec<f32> {
    (0..VOCAB)
        .map(|i| {
            let noise = ((i * 2_654_435_761) % 10_000) as f32 / 10_000.0;
            if i % 4_099 == 7 {
                12.0 + noise
            } else {
                noise * 8.0 - 4.0
            }
        })
        .collect()
}

fn sample(c: &mut Criterion) {
    let row = logits();
    let mut group = c.benchmark_group("sample_49152");
    for (name, top_p, top_k, min_p) in [
        ("t0.7", 1.0, 0, 0.0),
        ("t0.7_p0.95", 0.95, 0, 0.0),
        ("t0.7_k40", 1.0, 40, 0.0),
        // llama.cpp's defaults: a min-p of 0.05 with a 0.95 nucleus.
        ("t0.7_minp0.05_p0.95", 0.95, 0, 0.05),
    ] {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_p,
            top_k,
            min_p,
            seed: 1,
            penalties: Penalties::default(),
        });
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(sampler.sample(black_box(&row))))
        });
    }
    // What penalties add to every draw, greedy or not: the row copied and the history's ids
    // adjusted. Measured on its own, as a sampler that kept drawing would pile penalties on its
    // own picks (a history no real sequence has).
    let penalties = Penalties {
        frequency: 0.5,
        repetition: 1.1,
        ..Penalties::default()
    };
    // Ids spread over the vocabulary, a few hundred distinct (as in code or prose).
    let ids = |n: usize, salt: usize| -> Vec<u32> {
        (0..n)
            .map(|i| (((i * 7 + salt) % 600) * 79 % VOCAB) as u32)
            .collect()
    };
    let history = History::new(&penalties, &ids(2_000, 0), &ids(256, 3));
    let mut adjusted = vec![0.0f32; VOCAB];
    group.bench_function("penalties_prompt2000_output256", |b| {
        b.iter(|| {
            adjusted.copy_from_slice(black_box(&row));
            history.apply(&penalties, &mut adjusted);
            black_box(adjusted[0])
        })
    });
    // What asking for log probabilities adds to a draw: a log-softmax over the row and the
    // 20 most likely tokens.
    group.bench_function("logprobs_top20", |b| {
        b.iter(|| black_box(logprobs(black_box(&row), 7, 20)))
    });
    group.finish();
}

criterion_group!(benches, sample);
criterion_main!(benches);
