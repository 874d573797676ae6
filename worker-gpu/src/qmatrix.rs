//! Block-quantized weight matrices and the CPU matrix multiply over them.
//!
//! candle's CPU quantized matmul converts two f16 block scales through a function call for
//! every 32-value block and runs each (row, column) dot product as its own call: measured on
//! SmolLM2, a 16-row decode batch cost 12× one row, so batching bought nothing. Here the
//! scales are f32 from load on, the activation rows are quantized once per call, and each
//! parallel task keeps a few weight rows in L1 while it goes over every activation row: a
//! batch reads the weights once and pays only for its arithmetic. Q4_0/Q4_1 stay 4-bit —
//! half the memory traffic of Q8_0, which is what bounds a single-stream decode.
//!
//! Results do not depend on the batch: every output element is computed in the same order
//! whatever the number of rows, so a sequence decoded in a batch gets bit-identical logits.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

/// Values per quantization block (all formats handled here).
pub const BLOCK: usize = 32;

/// Output columns per parallel task: enough work to amortise scheduling, small enough that
/// the task's weight rows stay in L1 while every activation row passes over them.
const COLS_PER_TASK: usize = 16;

/// Why a tensor cannot become a [`QMatrix`].
#[derive(Debug, thiserror::Error)]
pub enum QMatrixError {
    #[error("format {0:?} has no CPU kernel here")]
    Unsupported(GgmlDType),
    #[error("shape {0:?} is not a matrix with rows a multiple of {BLOCK} wide")]
    Shape(Vec<usize>),
    #[error("reading the tensor: {0}")]
    Candle(#[from] candle_core::Error),
}

/// An 8-bit block: `value = d · q`.
#[derive(Clone, Copy)]
struct Q8Block {
    d: f32,
    q: [i8; BLOCK],
}

/// A 4-bit block: `value = d · q + m`, `q` in 0..16; byte `j` holds element `j` in its low
/// nibble and element `j + 16` in its high nibble (GGUF's Q4_0/Q4_1 layout).
#[derive(Clone, Copy)]
struct Q4Block {
    d: f32,
    m: f32,
    q: [u8; BLOCK / 2],
}

/// Blocks row after row, each block's scales next to its codes: a matmul streams one array.
enum Blocks {
    Q8(Vec<Q8Block>),
    Q4(Vec<Q4Block>),
}

/// A weight matrix of `rows × cols` (output features × input features), quantized in blocks
/// of 32 along each row.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.blocks {
            Blocks::Q8(_) => "q8",
            Blocks::Q4(_) => "q4",
        };
        f.debug_struct("QMatrix")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("kind", &kind)
            .finish()
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

impl QMatrix {
    /// Takes over a Q8_0, Q4_0 or Q4_1 tensor of shape `(rows, cols)` from candle's raw
    /// GGML blocks.
    pub fn from_qtensor(t: &QTensor) -> Result<Self, QMatrixError> {
        let dims = t.shape().dims().to_vec();
        let [rows, cols] = dims[..] else {
            return Err(QMatrixError::Shape(dims));
        };
        if cols % BLOCK != 0 {
            return Err(QMatrixError::Shape(dims));
        }
        let data = t.data()?;
        let blocks = match t.dtype() {
            GgmlDType::Q8_0 => Blocks::Q8(
                data.chunks_exact(2 + BLOCK)
                    .map(|b| Q8Block {
                        d: f16_at(b, 0),
                        q: std::array::from_fn(|i| b[2 + i] as i8),
                    })
                    .collect(),
            ),
            // Q4_0 stores q - 8: as Q4_1 with m = -8·d.
            GgmlDType::Q4_0 => Blocks::Q4(
                data.chunks_exact(2 + BLOCK / 2)
                    .map(|b| Q4Block {
                        d: f16_at(b, 0),
                        m: -8.0 * f16_at(b, 0),
                        q: std::array::from_fn(|i| b[2 + i]),
                    })
                    .collect(),
            ),
            GgmlDType::Q4_1 => Blocks::Q4(
                data.chunks_exact(4 + BLOCK / 2)
                    .map(|b| Q4Block {
                        d: f16_at(b, 0),
                        m: f16_at(b, 2),
                        q: std::array::from_fn(|i| b[4 + i]),
                    })
                    .collect(),
            ),
            other => return Err(QMatrixError::Unsupported(other)),
        };
        let matrix = Self { rows, cols, blocks };
        if matrix.block_count() != rows * cols / BLOCK {
            return Err(QMatrixError::Shape(dims));
        }
        Ok(matrix)
    }

    /// The matrices stacked row-wise (one matmul computes all their outputs), when they
    /// share the input width and the block format.
    pub fn concat(parts: &[&QMatrix]) -> Option<QMatrix> {
        let first = parts.first()?;
        if parts.iter().any(|p| p.cols != first.cols) {
            return None;
        }
        let blocks = match first.blocks {
            Blocks::Q8(_) => Blocks::Q8(
                parts
                    .iter()
                    .map(|p| match &p.blocks {
                        Blocks::Q8(b) => Some(b.as_slice()),
                        Blocks::Q4(_) => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .concat(),
            ),
            Blocks::Q4(_) => Blocks::Q4(
                parts
                    .iter()
                    .map(|p| match &p.blocks {
                        Blocks::Q4(b) => Some(b.as_slice()),
                        Blocks::Q8(_) => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .concat(),
            ),
        };
        Some(QMatrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            blocks,
        })
    }

    fn block_count(&self) -> usize {
        match &self.blocks {
            Blocks::Q8(b) => b.len(),
            Blocks::Q4(b) => b.len(),
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held in memory.
    pub fn bytes(&self) -> u64 {
        let per_block = match self.blocks {
            Blocks::Q8(_) => std::mem::size_of::<Q8Block>(),
            Blocks::Q4(_) => std::mem::size_of::<Q4Block>(),
        };
        (self.block_count() * per_block) as u64
    }

    /// Row `r` as f32, written into `out` (`cols` long): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / BLOCK;
        for (b, out) in (r * kb..(r + 1) * kb).zip(out.chunks_exact_mut(BLOCK)) {
            match &self.blocks {
                Blocks::Q8(blocks) => {
                    let block = &blocks[b];
                    for (o, &v) in out.iter_mut().zip(&block.q) {
                        *o = block.d * f32::from(v);
                    }
                }
                Blocks::Q4(blocks) => {
                    let block = &blocks[b];
                    let (lo, hi) = out.split_at_mut(BLOCK / 2);
                    for (j, &byte) in block.q.iter().enumerate() {
                        lo[j] = block.d * f32::from(byte & 0x0f) + block.m;
                        hi[j] = block.d * f32::from(byte >> 4) + block.m;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32, `rows × cols` row-major (for the dense prompt path).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, row)| self.dequantize_row(r, row));
        out
    }

    /// `x · selfᵀ` for `x` of `m` rows of `cols` values (row-major); returns `m × rows`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(
            x.len(),
            m * self.cols,
            "matmul: x is not {m} × {}",
            self.cols
        );
        let xq = QuantizedRows::new(x, self.cols);
        // Tasks own disjoint column ranges of the row-major result: each computes its columns
        // for every row (column by column), then writes them row by row, so that no pass over
        // the whole result is left to the calling thread while the pool waits.
        let tasks = self.rows.div_ceil(COLS_PER_TASK);
        let shared = SharedOutput::zeros(self.rows * m);
        for_each_range(tasks, |range| {
            let mut by_column = vec![0f32; COLS_PER_TASK * m];
            let mut row = [0f32; COLS_PER_TASK];
            for task in range {
                let c0 = task * COLS_PER_TASK;
                let cols = COLS_PER_TASK.min(self.rows - c0);
                let by_column = &mut by_column[..cols * m];
                columns(&self.blocks, c0, by_column, &xq, m);
                for r in 0..m {
                    for (j, v) in row[..cols].iter_mut().enumerate() {
                        *v = by_column[j * m + r];
                    }
                    shared.write(r * self.rows + c0, &row[..cols]);
                }
            }
        });
        shared.into_vec()
    }
}

/// Runs `f` over `0..n_items`, split into ranges, on the engine's compute threads.
///
/// An engine that owns the machine (a worker process of its own: the usual deployment) runs
/// on candle's process-wide barrier pool: its workers spin between the ~120 small matmuls of
/// a decode step rather than sleeping. Engines that share a host (`switchyard up`) each run
/// inside a smaller rayon pool of their own (see `CandleEngine::start`) and stay on it, so
/// one engine never queues behind another's work or spins on a core the other needs; a
/// one-thread pool runs `f` inline.
pub(crate) fn for_each_range<F: Fn(std::ops::Range<usize>) + Sync>(n_items: usize, f: F) {
    // Not on a rayon thread: the engine's scheduler thread owns the machine.
    if rayon::current_thread_index().is_none() {
        candle_core::utils::barrier_pool().execute_chunked(n_items, f);
        return;
    }
    let threads = rayon::current_num_threads();
    if threads == 1 || n_items <= 1 {
        f(0..n_items);
        return;
    }
    // About eight ranges per thread let fast threads absorb a straggler's share.
    let chunk = n_items.div_ceil(threads * 8).max(1);
    (0..n_items.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| f(c * chunk..n_items.min((c + 1) * chunk)));
}

/// An f32 buffer that parallel work items fill in disjoint parts: they share it through `Fn`
/// closures, so each part is published through atomics (relaxed: the pool's join orders them
/// before the caller reads).
pub(crate) struct SharedOutput(Vec<AtomicU32>);

impl SharedOutput {
    pub(crate) fn zeros(len: usize) -> Self {
        Self((0..len).map(|_| AtomicU32::new(0)).collect())
    }

    pub(crate) fn write(&self, at: usize, values: &[f32]) {
        for (slot, v) in self.0[at..at + values.len()].iter().zip(values) {
            slot.store(v.to_bits(), Ordering::Relaxed);
        }
    }

    pub(crate) fn into_vec(self) -> Vec<f32> {
        self.0
            .into_iter()
            .map(|v| f32::from_bits(v.into_inner()))
            .collect()
    }
}

/// Activation rows quantized to 8 bits per 32-value block (llama.cpp's Q8_1): `x ≈ d · q`,
/// and `s = d · Σq` for the offset term of 4-bit weights.
struct QuantizedRows {
    q: Vec<[i8; BLOCK]>,
    d: Vec<f32>,
    s: Vec<f32>,
    blocks_per_row: usize,
}

impl QuantizedRows {
    fn new(x: &[f32], cols: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if avx2_fma() {
            // SAFETY: `quantize_avx2` only requires the CPU features just checked at run time.
            #[allow(unsafe_code)]
            unsafe {
                return Self::quantize_avx2(x, cols);
            }
        }
        Self::quantize(x, cols)
    }

    /// [`Self::quantize`] compiled for AVX2: the same code, but the rounding (`f32::round`,
    /// half away from zero) becomes vector instructions instead of a `roundf` call per value,
    /// which on a 16-stream decode step was ~2 % of the step on the thread every other one
    /// waits for.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn quantize_avx2(x: &[f32], cols: usize) -> Self {
        Self::quantize(x, cols)
    }

    #[inline(always)]
    fn quantize(x: &[f32], cols: usize) -> Self {
        let n = x.len() / BLOCK;
        let (mut q, mut d, mut s) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::new());
        s.reserve(n);
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let qs: [i8; BLOCK] = std::array::from_fn(|i| (block[i] * inv).round() as i8);
            let sum: i32 = qs.iter().map(|&v| i32::from(v)).sum();
            q.push(qs);
            d.push(scale);
            s.push(scale * sum as f32);
        }
        Self {
            q,
            d,
            s,
            blocks_per_row: cols / BLOCK,
        }
    }
}

#[inline(always)]
fn dot_q8(w: &[i8; BLOCK], x: &[i8; BLOCK]) -> i32 {
    let mut sum = 0i32;
    for i in 0..BLOCK {
        sum += i32::from(w[i]) * i32::from(x[i]);
    }
    sum
}

/// A 4-bit block as 8-bit values (0..16), in element order.
#[inline(always)]
fn unpack_q4(w: &[u8; BLOCK / 2]) -> [i8; BLOCK] {
    std::array::from_fn(|i| {
        let byte = w[i % (BLOCK / 2)];
        (if i < BLOCK / 2 {
            byte & 0x0f
        } else {
            byte >> 4
        }) as i8
    })
}

/// Rows handled together per weight block: independent accumulation chains for the CPU to
/// overlap, and one unpacking of a 4-bit block for all of them.
const ROW_GROUP: usize = 4;

/// Output columns `c0..` for every activation row; `out` is column-major (`m` per column).
fn columns(w: &Blocks, c0: usize, out: &mut [f32], x: &QuantizedRows, m: usize) {
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: `avx2::columns` only requires the CPU features just checked at run time.
        #[allow(unsafe_code)]
        unsafe {
            return avx2::columns(w, c0, out, x, m);
        }
    }
    columns_generic(w, c0, out, x, m)
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    })
}

/// Portable version of the kernel (and the definition the AVX2 one must agree with).
fn columns_generic(w: &Blocks, c0: usize, out: &mut [f32], x: &QuantizedRows, m: usize) {
    let kb = x.blocks_per_row;
    for (j, col) in out.chunks_exact_mut(m).enumerate() {
        let wb = (c0 + j) * kb..(c0 + j + 1) * kb;
        for (r, o) in col.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (b, wblock) in wb.clone().enumerate() {
                let xb = r * kb + b;
                acc += match w {
                    Blocks::Q8(blocks) => {
                        let block = &blocks[wblock];
                        dot_q8(&block.q, &x.q[xb]) as f32 * block.d * x.d[xb]
                    }
                    Blocks::Q4(blocks) => {
                        let block = &blocks[wblock];
                        dot_q8(&unpack_q4(&block.q), &x.q[xb]) as f32 * block.d * x.d[xb]
                            + block.m * x.s[xb]
                    }
                };
            }
            *o = acc;
        }
    }
}

/// The kernel with AVX2 integer multiply-adds, the way llama.cpp's x86 kernels do it: per
/// block, 32 byte products summed into eight i32 lanes, scaled and accumulated in eight f32
/// lanes; one horizontal sum per output. Up to [`ROW_GROUP`] activation rows share each
/// loaded (and, for 4-bit, unpacked) weight block.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Blocks, Q4Block, Q8Block, QuantizedRows, ROW_GROUP};

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// 32 unsigned bytes times 32 signed bytes, summed pairwise into eight i32 lanes.
    #[target_feature(enable = "avx2,fma")]
    fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(w, x);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[target_feature(enable = "avx2,fma")]
    fn unpack_q4(w: &[u8; BLOCK / 2]) -> __m256i {
        let bytes: __m128i = bytemuck::cast(*w);
        let low = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(bytes, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low);
        _mm256_set_m128i(hi, lo)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn columns(w: &Blocks, c0: usize, out: &mut [f32], x: &QuantizedRows, m: usize) {
        let kb = x.blocks_per_row;
        for (j, col) in out.chunks_exact_mut(m).enumerate() {
            let wb = (c0 + j) * kb..(c0 + j + 1) * kb;
            let mut r0 = 0;
            // Full groups, then the rest one row at a time: a row's arithmetic is the same
            // either way.
            while r0 + ROW_GROUP <= m {
                let group = &mut col[r0..r0 + ROW_GROUP];
                match w {
                    Blocks::Q8(blocks) => q8_rows::<ROW_GROUP>(&blocks[wb.clone()], x, r0, group),
                    Blocks::Q4(blocks) => q4_rows::<ROW_GROUP>(&blocks[wb.clone()], x, r0, group),
                }
                r0 += ROW_GROUP;
            }
            for r in r0..m {
                let one = &mut col[r..r + 1];
                match w {
                    Blocks::Q8(blocks) => q8_rows::<1>(&blocks[wb.clone()], x, r, one),
                    Blocks::Q4(blocks) => q4_rows::<1>(&blocks[wb.clone()], x, r, one),
                }
            }
        }
    }

    /// Activation rows `r0..r0 + N` as slices of their blocks' codes, scales and sums.
    struct RowBlocks<'a, const N: usize> {
        q: [&'a [[i8; BLOCK]]; N],
        d: [&'a [f32]; N],
        s: [&'a [f32]; N],
    }

    #[inline(always)]
    fn row_blocks<const N: usize>(x: &QuantizedRows, r0: usize) -> RowBlocks<'_, N> {
        let kb = x.blocks_per_row;
        let span = |i: usize| (r0 + i) * kb..(r0 + i + 1) * kb;
        RowBlocks {
            q: std::array::from_fn(|i| &x.q[span(i)]),
            d: std::array::from_fn(|i| &x.d[span(i)]),
            s: std::array::from_fn(|i| &x.s[span(i)]),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn q8_rows<const N: usize>(w: &[Q8Block], x: &QuantizedRows, r0: usize, out: &mut [f32]) {
        let RowBlocks { q: xq, d: xd, .. } = row_blocks::<N>(x, r0);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, block) in w.iter().enumerate() {
            let wv: __m256i = bytemuck::cast(block.q);
            // maddubs multiplies unsigned by signed: move w's sign onto x.
            let wabs = _mm256_sign_epi8(wv, wv);
            for i in 0..N {
                let xs = _mm256_sign_epi8(bytemuck::cast(xq[i][b]), wv);
                let scale = _mm256_set1_ps(block.d * xd[i][b]);
                acc[i] = _mm256_fmadd_ps(dot_u8_i8(wabs, xs), scale, acc[i]);
            }
        }
        for i in 0..N {
            out[i] = hsum(acc[i]);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn q4_rows<const N: usize>(w: &[Q4Block], x: &QuantizedRows, r0: usize, out: &mut [f32]) {
        let RowBlocks {
            q: xq,
            d: xd,
            s: xs,
        } = row_blocks::<N>(x, r0);
        let mut acc = [_mm256_setzero_ps(); N];
        // The offset terms Σ m·s in eight lanes of their own (a chain of scalar adds would
        // hold back the block loop).
        let mut offset_lanes = [[0f32; 8]; N];
        for (b, block) in w.iter().enumerate() {
            let wv = unpack_q4(&block.q);
            let lane = b % 8;
            for i in 0..N {
                let scale = _mm256_set1_ps(block.d * xd[i][b]);
                acc[i] = _mm256_fmadd_ps(dot_u8_i8(wv, bytemuck::cast(xq[i][b])), scale, acc[i]);
                offset_lanes[i][lane] += block.m * xs[i][b];
            }
        }
        for i in 0..N {
            out[i] = hsum(acc[i]) + offset_lanes[i].iter().sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn matrix(dtype: GgmlDType, rows: usize, cols: usize) -> (QMatrix, Vec<f32>) {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let exact = q.dequantize(&Device::Cpu).unwrap();
        let exact = exact.flatten_all().unwrap().to_vec1().unwrap();
        (QMatrix::from_qtensor(&q).unwrap(), exact)
    }

    #[test]
    fn dequantize_matches_candle_for_every_format() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let (m, exact) = matrix(dtype, 5, 64);
            assert_eq!(m.dequantize(), exact, "{dtype:?}");
        }
    }

    #[test]
    fn matmul_matches_f32_reference_within_activation_rounding() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let (w, dense) = matrix(dtype, 37, 96);
            let x: Vec<f32> = (0..3 * 96).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
            let got = w.matmul(&x, 3);
            for r in 0..3 {
                for c in 0..37 {
                    let want: f32 = (0..96).map(|k| x[r * 96 + k] * dense[c * 96 + k]).sum();
                    let diff = (got[r * 37 + c] - want).abs();
                    assert!(
                        diff < 0.02 * (1.0 + want.abs()),
                        "{dtype:?} ({r},{c}): {diff}"
                    );
                }
            }
        }
    }

    /// On an AVX2 machine the dispatching kernel and the portable one are different code;
    /// both must compute the same products (up to float summation order).
    #[test]
    fn the_portable_kernel_agrees_with_the_dispatched_one() {
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
            let (w, _) = matrix(dtype, 32, 96);
            let m = 5;
            let x: Vec<f32> = (0..m * 96).map(|i| (i as f32 * 0.23).sin()).collect();
            let xq = QuantizedRows::new(&x, 96);
            let (mut fast, mut portable) = (vec![0f32; 32 * m], vec![0f32; 32 * m]);
            columns(&w.blocks, 0, &mut fast, &xq, m);
            columns_generic(&w.blocks, 0, &mut portable, &xq, m);
            for (a, b) in fast.iter().zip(&portable) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{dtype:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_result_alone_and_in_a_batch() {
        for (dtype, n, k, m) in [(GgmlDType::Q4_1, 40, 64, 4), (GgmlDType::Q8_0, 200, 96, 38)] {
            let (w, _) = matrix(dtype, n, k);
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let batch = w.matmul(&x, m);
            for r in 0..m {
                let alone = w.matmul(&x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, batch[r * n..(r + 1) * n], "{dtype:?} row {r} of {m}");
            }
        }
    }

    #[test]
    fn concat_stacks_outputs_and_refuses_mixed_formats() {
        let (a, _) = matrix(GgmlDType::Q4_1, 48, 64);
        let (b, _) = matrix(GgmlDType::Q4_0, 16, 64);
        let (c, _) = matrix(GgmlDType::Q8_0, 16, 64);
        let both = QMatrix::concat(&[&a, &b]).unwrap();
        let x: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.11).cos()).collect();
        let (ya, yb, y) = (a.matmul(&x, 2), b.matmul(&x, 2), both.matmul(&x, 2));
        for r in 0..2 {
            assert_eq!(y[r * 64..r * 64 + 48], ya[r * 48..(r + 1) * 48]);
            assert_eq!(y[r * 64 + 48..(r + 1) * 64], yb[r * 16..(r + 1) * 16]);
        }
        assert!(QMatrix::concat(&[&a, &c]).is_none());
    }

    #[test]
    fn unsupported_formats_and_shapes_are_refused() {
        let t = Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let f32_tensor = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        assert!(matches!(
            QMatrix::from_qtensor(&f32_tensor),
            Err(QMatrixError::Unsupported(GgmlDType::F32))
        ));
        let v = Tensor::zeros(128, candle_core::DType::F32, &Device::Cpu).unwrap();
        let vector = QTensor::quantize(&v, GgmlDType::Q8_0).unwrap();
        assert!(matches!(
            QMatrix::from_qtensor(&vector),
            Err(QMatrixError::Shape(_))
        ));
    }
}
