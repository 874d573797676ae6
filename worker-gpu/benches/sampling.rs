//! Drawing one token from a logits row of SmolLM2's vocabulary (49 152) with the settings
//! coding assistants send (a temperature, with and without a nucleus or a top-k cut). The
//! scheduler thread samples every sequence of a decode step one after another, so this cost
//! is paid per token per stream, outside the parallel forward.

use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use switchyard_worker_gpu::sampling::{Sampler, SamplingParams};

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
    for (name, top_p, top_k) in [
        ("t0.7", 1.0, 0),
        ("t0.7_p0.95", 0.95, 0),
        ("t0.7_k40", 1.0, 40),
    ] {
        let mut sampler = Sampler::new(SamplingParams {
            temperature: 0.7,
            top_p,
            top_k,
            seed: 1,
        });
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(sampler.sample(black_box(&row))))
        });
    }
    group.finish();
}

criterion_group!(benches, sample);
criterion_main!(benches);
