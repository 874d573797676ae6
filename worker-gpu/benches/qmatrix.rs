//! Our quantized CPU matmul (`qmatrix.rs`) at the shapes SmolLM2 runs it: one activation row
//! (a single-stream decode step), a 16-stream decode batch and a 96-token prompt chunk (below
//! the dense path's 128 rows), on the stacked gate/up projection (576 → 3 072) and the down
//! projection (1 536 → 576), Q4_1 like the default model. Throughput is in weights × rows per
//! second.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use switchyard_worker_gpu::qmatrix::QMatrix;

fn matrix(rows: usize, cols: usize) -> QMatrix {
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05)
        .collect();
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).expect("a tensor");
    let q = QTensor::quantize(&t, GgmlDType::Q4_1).expect("Q4_1 quantizes");
    QMatrix::from_qtensor(&q).expect("a matrix our kernel covers")
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("qmatrix_q4_1");
    for (name, rows, cols) in [("gate_up", 3072, 576), ("down", 576, 1536)] {
        let w = matrix(rows, cols);
        for m in [1, 16, 96] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            group.throughput(Throughput::Elements((rows * cols * m) as u64));
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, &m| {
                b.iter(|| black_box(w.matmul(black_box(&x), m)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matmul);
criterion_main!(benches);
