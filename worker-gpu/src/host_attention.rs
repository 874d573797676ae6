//! The CPU engine's KV cache in plain host memory, and attention over it.
//!
//! A decode step attends one new token per sequence. Done with candle ops that is about a
//! dozen small tensor operations per sequence and layer, each with its own allocation and
//! dispatch: measured on SmolLM2, 7 ms of a 19 ms single-stream step and 80 ms of a
//! 160 ms step at 16 streams. Here it is one pass per (sequence, KV head) over the cached rows,
//! spread over candle's CPU thread pool; prompts attend the same way, token by token.
//!
//! Keys are stored transposed in tiles of [`TILE`] positions (`head_dim × TILE` per tile) so
//! that the scores of consecutive positions are computed side by side in vector lanes, with no
//! horizontal sum per position (with row-major keys, the per-position reductions cost more
//! than the multiply-adds), while each tile stays contiguous (one transposed matrix with
//! `capacity` columns put every dimension's row a multiple of 4 KiB apart: cache conflicts).

use crate::qmatrix::SharedOutput;

/// Positions per key tile: one AVX vector.
const TILE: usize = 8;

/// Where dimension `d` of the key at position `j` lives within a KV head's tiled keys.
fn key_index(head_dim: usize, d: usize, j: usize) -> usize {
    (j / TILE) * head_dim * TILE + d * TILE + j % TILE
}

/// One sequence's keys and values for every layer. Per layer and KV head, keys are tiles of
/// `(head_dim, TILE)` (see [`key_index`]) and values `(capacity, head_dim)`.
pub(crate) struct HostKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    n_kv: usize,
    capacity: usize,
    head_dim: usize,
}

/// The first `len` cached positions of one KV head.
#[derive(Clone, Copy)]
struct CachedHead<'a> {
    /// Tiled keys: see [`key_index`].
    keys_t: &'a [f32],
    /// `len × head_dim`, row-major.
    values: &'a [f32],
    len: usize,
    head_dim: usize,
}

impl HostKv {
    pub(crate) fn new(layers: usize, n_kv: usize, capacity: usize, head_dim: usize) -> Self {
        // Whole tiles, so the last one never reaches into the next head's keys.
        let capacity = capacity.div_ceil(TILE) * TILE;
        let zeroed = || {
            (0..layers)
                .map(|_| vec![0f32; n_kv * capacity * head_dim])
                .collect()
        };
        Self {
            k: zeroed(),
            v: zeroed(),
            n_kv,
            capacity,
            head_dim,
        }
    }

    /// Stores `t` positions from `pos0` on; `k` and `v` are `(n_kv, t, head_dim)`.
    pub(crate) fn write(&mut self, layer: usize, pos0: usize, t: usize, k: &[f32], v: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        for h in 0..self.n_kv {
            let src = h * t * hd..(h + 1) * t * hd;
            let keys_t = &mut self.k[layer][h * hd * cap..(h + 1) * hd * cap];
            for (i, key) in k[src.clone()].chunks_exact(hd).enumerate() {
                for (d, &x) in key.iter().enumerate() {
                    keys_t[key_index(hd, d, pos0 + i)] = x;
                }
            }
            let dst = (h * cap + pos0) * hd..(h * cap + pos0 + t) * hd;
            self.v[layer][dst].copy_from_slice(&v[src]);
        }
    }

    fn head(&self, layer: usize, h: usize, len: usize) -> CachedHead<'_> {
        let (hd, cap) = (self.head_dim, self.capacity);
        CachedHead {
            keys_t: &self.k[layer][h * hd * cap..(h + 1) * hd * cap],
            values: &self.v[layer][h * cap * hd..(h * cap + len) * hd],
            len,
            head_dim: hd,
        }
    }
}

/// Softmax attention of the query heads `q` (`g × head_dim`) that share one KV head over its
/// cached positions; writes `g × head_dim` into `out`. `scores` is scratch space.
fn attend_group(
    q: &[f32],
    head: CachedHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::qmatrix::avx2_fma() {
        // SAFETY: `avx2::attend_group` only requires the CPU features just checked at run time.
        #[allow(unsafe_code)]
        unsafe {
            return avx2::attend_group(q, head, scale, scores, out);
        }
    }
    attend_group_generic(q, head, scale, scores, out)
}

/// Portable version of [`attend_group`] (and the definition the AVX2 one must agree with).
fn attend_group_generic(
    q: &[f32],
    head: CachedHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, len) = (head.head_dim, head.len);
    for (qh, row) in score_rows(q, head, scores) {
        for (j, s) in row.iter_mut().enumerate() {
            for (d, &qd) in qh.iter().enumerate() {
                *s += qd * head.keys_t[key_index(hd, d, j)];
            }
        }
        row.iter_mut().for_each(|s| *s *= scale);
    }
    softmax_rows(scores, len);
    weighted_values::<false>(head, scores, out);
}

/// Sizes `scores` to one zeroed row of `head.len` per query head in `q` (`g × head_dim`) and
/// pairs each query head with its row.
fn score_rows<'a>(
    q: &'a [f32],
    head: CachedHead<'_>,
    scores: &'a mut Vec<f32>,
) -> impl Iterator<Item = (&'a [f32], &'a mut [f32])> + use<'a> {
    scores.clear();
    scores.resize(q.len() / head.head_dim * head.len, 0.0);
    q.chunks_exact(head.head_dim)
        .zip(scores.chunks_exact_mut(head.len))
}

/// `a · b + c`, fused where the CPU has FMA (the portable build must not call the slow
/// software `fmaf`).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Turns each row of `scores` (one per query head, `len` long) into softmax weights.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], len: usize) {
    for row in scores.chunks_exact_mut(len) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in row.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|s| *s *= inv);
    }
}

/// The weighted sum of the cached values per query head: `out` (`g × head_dim`) from the
/// softmax weights in `scores` (`g × len`).
#[inline(always)]
fn weighted_values<const FMA: bool>(head: CachedHead<'_>, scores: &[f32], out: &mut [f32]) {
    let (hd, len) = (head.head_dim, head.len);
    out.fill(0.0);
    for (j, v) in head.values.chunks_exact(hd).enumerate() {
        for (qi, oh) in out.chunks_exact_mut(hd).enumerate() {
            let p = scores[qi * len + j];
            for (o, x) in oh.iter_mut().zip(v) {
                *o = madd::<FMA>(p, *x, *o);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{CachedHead, TILE, score_rows, softmax_rows, weighted_values};

    #[target_feature(enable = "avx2,fma")]
    fn load(s: &[f32]) -> __m256 {
        bytemuck::cast(<[f32; 8]>::try_from(&s[..8]).expect("eight lanes"))
    }

    /// `scale · q·k_j` for the `LANES × TILE` positions of the tiles from `tile` on: the
    /// query's dimensions broadcast against each tile's rows. Returns one score per position.
    #[target_feature(enable = "avx2,fma")]
    fn score_tiles<const LANES: usize>(
        q: &[f32],
        head: CachedHead<'_>,
        tile: usize,
        scale: f32,
    ) -> [[f32; TILE]; LANES] {
        let hd = head.head_dim;
        let keys = &head.keys_t[tile * hd * TILE..][..LANES * hd * TILE];
        let mut acc = [_mm256_setzero_ps(); LANES];
        for (d, &qd) in q.iter().enumerate() {
            let qv = _mm256_set1_ps(qd);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(qv, load(&keys[(i * hd + d) * TILE..]), *a);
            }
        }
        let scale = _mm256_set1_ps(scale);
        acc.map(|a| bytemuck::cast(_mm256_mul_ps(a, scale)))
    }

    /// Key tiles scored together.
    const BLOCK_TILES: usize = 8;

    /// One query head's weighted sum of the values, 32 dimensions at a time held in
    /// registers over all positions (`head_dim` a multiple of 32).
    #[target_feature(enable = "avx2,fma")]
    fn head_values(head: CachedHead<'_>, weights: &[f32], out: &mut [f32]) {
        let hd = head.head_dim;
        for (c, part) in out.chunks_exact_mut(32).enumerate() {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (row, &p) in head.values.chunks_exact(hd).zip(weights) {
                let (pv, row) = (_mm256_set1_ps(p), &row[c * 32..c * 32 + 32]);
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(pv, load(&row[i * 8..]), *a);
                }
            }
            for (a, lanes) in acc.iter().zip(part.chunks_exact_mut(8)) {
                lanes.copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(*a));
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn attend_group(
        q: &[f32],
        head: CachedHead<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (hd, len) = (head.head_dim, head.len);
        for (qh, row) in score_rows(q, head, scores) {
            // Blocks of tiles give independent accumulators to cover the FMA latency; then
            // tile by tile, the last one possibly partly past `len`.
            for (block, chunk) in row.chunks_mut(BLOCK_TILES * TILE).enumerate() {
                if chunk.len() == BLOCK_TILES * TILE {
                    let tiles = score_tiles::<BLOCK_TILES>(qh, head, block * BLOCK_TILES, scale);
                    chunk.copy_from_slice(tiles.as_flattened());
                } else {
                    for (i, part) in chunk.chunks_mut(TILE).enumerate() {
                        let [tile] = score_tiles::<1>(qh, head, block * BLOCK_TILES + i, scale);
                        part.copy_from_slice(&tile[..part.len()]);
                    }
                }
            }
        }
        softmax_rows(scores, len);
        if hd.is_multiple_of(32) {
            for (weights, oh) in scores.chunks_exact(len).zip(out.chunks_exact_mut(hd)) {
                head_values(head, weights, oh);
            }
        } else {
            weighted_values::<true>(head, scores, out);
        }
    }
}

/// Decode attention for a batch: sequence `i` has query heads `q[i]` (`n_head × head_dim`,
/// heads sharing a KV head adjacent) and attends over the first `lens[i]` positions of
/// `caches[i]` at `layer` (its new token already written). Returns `(batch, n_head × head_dim)`.
pub(crate) fn decode_attention(
    caches: &[&HostKv],
    layer: usize,
    q: &[f32],
    lens: &[usize],
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let Some(first) = caches.first() else {
        return Vec::new();
    };
    let (n_kv, hd) = (first.n_kv, first.head_dim);
    let group = n_head / n_kv;
    let width = group * hd;
    // Work items are (sequence, KV head) pairs; each owns its slice of the output.
    let out = SharedOutput::zeros(caches.len() * n_head * hd);
    candle_core::utils::barrier_pool().execute_chunked(caches.len() * n_kv, |items| {
        let (mut scores, mut buf) = (Vec::new(), vec![0f32; width]);
        for item in items {
            let (i, h) = (item / n_kv, item % n_kv);
            let head = caches[i].head(layer, h, lens[i]);
            let at = i * n_head * hd + h * width;
            attend_group(&q[at..at + width], head, scale, &mut scores, &mut buf);
            out.write(at, &buf);
        }
    });
    out.into_vec()
}

/// Causal attention for `t` new tokens of one sequence at positions `pos0..pos0 + t`, whose
/// keys and values are already in `cache`: token `r` attends to positions `0..=pos0 + r`.
/// `q` is `(n_head, t, head_dim)`; returns `(t, n_head × head_dim)`.
///
/// Fused per (KV head, token): no `t × len` score matrix, no mask, and the masked half of a
/// causal prompt is never computed (with candle ops a 2 048-token prompt spent a quarter of
/// its prefill allocating, masking and exponentiating that matrix).
pub(crate) fn prompt_attention(
    cache: &HostKv,
    layer: usize,
    q: &[f32],
    pos0: usize,
    t: usize,
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let (n_kv, hd) = (cache.n_kv, cache.head_dim);
    let group = n_head / n_kv;
    let out = SharedOutput::zeros(t * n_head * hd);
    // Items run token by token within a KV head, so neighbouring items share cached rows.
    candle_core::utils::barrier_pool().execute_chunked(n_kv * t, |items| {
        let width = group * hd;
        let (mut scores, mut heads, mut buf) = (Vec::new(), vec![0f32; width], vec![0f32; width]);
        for item in items {
            let (h, r) = (item / t, item % t);
            let head = cache.head(layer, h, pos0 + r + 1);
            // This token's query heads of KV head `h`, side by side.
            for (i, qh) in (h * group..(h + 1) * group).enumerate() {
                heads[i * hd..(i + 1) * hd].copy_from_slice(&q[(qh * t + r) * hd..][..hd]);
            }
            attend_group(&heads, head, scale, &mut scores, &mut buf);
            out.write((r * n_head + h * group) * hd, &buf);
        }
    });
    out.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct softmax(q·kᵀ·scale)·v for one query head.
    fn reference(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>], scale: f32) -> Vec<f32> {
        let s: Vec<f32> = keys
            .iter()
            .map(|k| q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale)
            .collect();
        let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
        let total: f32 = e.iter().sum();
        let mut out = vec![0f32; q.len()];
        for (p, v) in e.iter().zip(values) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += p / total * x;
            }
        }
        out
    }

    #[test]
    fn decode_attention_matches_reference_per_head_and_sequence() {
        let (layers, n_kv, n_head, hd, cap) = (2, 2, 4, 16, 8);
        let val = |s: usize| ((s * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let mut caches = [
            HostKv::new(layers, n_kv, cap, hd),
            HostKv::new(layers, n_kv, cap, hd),
        ];
        let lens = [5, 3];
        let mut rows: Vec<Vec<(Vec<f32>, Vec<f32>)>> = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            let t = lens[i];
            let k: Vec<f32> = (0..n_kv * t * hd).map(|j| val(j + 31 * i)).collect();
            let v: Vec<f32> = (0..n_kv * t * hd).map(|j| val(j + 977 + 17 * i)).collect();
            cache.write(1, 0, t, &k, &v);
            rows.push(
                (0..n_kv)
                    .map(|h| {
                        (
                            k[h * t * hd..][..t * hd].to_vec(),
                            v[h * t * hd..][..t * hd].to_vec(),
                        )
                    })
                    .collect(),
            );
        }
        let q: Vec<f32> = (0..2 * n_head * hd).map(|j| val(j + 5003)).collect();
        let refs: Vec<&HostKv> = caches.iter().collect();
        let got = decode_attention(&refs, 1, &q, &lens, n_head, 0.25);
        for (i, seq_rows) in rows.iter().enumerate() {
            for head in 0..n_head {
                let (k, v) = &seq_rows[head / (n_head / n_kv)];
                let split =
                    |flat: &Vec<f32>| flat.chunks(hd).map(<[f32]>::to_vec).collect::<Vec<_>>();
                let at = (i * n_head + head) * hd;
                let want = reference(&q[at..at + hd], &split(k), &split(v), 0.25);
                for (a, b) in got[at..at + hd].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "seq {i} head {head}: {a} vs {b}");
                }
            }
        }
        // The other layer was never written: zeros attend to zeros.
        let zero = decode_attention(&refs, 0, &q, &lens, n_head, 0.25);
        assert!(zero.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn portable_and_simd_attention_agree_for_every_length_and_head_size() {
        let val = |s: usize| ((s * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        // Head sizes with and without the 32-wide value path; lengths around tile and block
        // boundaries.
        for (hd, g) in [(64, 3), (48, 2)] {
            for len in [1, 7, 8, 9, 63, 64, 65, 130] {
                let mut cache = HostKv::new(1, 1, len, hd);
                let k: Vec<f32> = (0..len * hd).map(|j| val(j + 7)).collect();
                let v: Vec<f32> = (0..len * hd).map(|j| val(j + 999)).collect();
                cache.write(0, 0, len, &k, &v);
                let q: Vec<f32> = (0..g * hd).map(|j| val(j + 31)).collect();
                let head = cache.head(0, 0, len);
                let (mut a, mut b) = (vec![0f32; g * hd], vec![0f32; g * hd]);
                attend_group(&q, head, 0.2, &mut Vec::new(), &mut a);
                attend_group_generic(&q, head, 0.2, &mut Vec::new(), &mut b);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-5, "hd {hd} len {len}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn prompt_attention_is_causal_over_cached_and_new_positions() {
        let (n_kv, n_head, hd, cap) = (2, 6, 8, 10);
        let (pos0, t) = (3, 4);
        let val = |s: usize| ((s * 2654435761) % 1000) as f32 / 500.0 - 1.0;
        let mut cache = HostKv::new(1, n_kv, cap, hd);
        // An earlier chunk of 3 positions, then this chunk's 4.
        let rows = |n: usize, seed: usize| (0..n_kv * n * hd).map(|j| val(j + seed)).collect();
        let (k0, v0): (Vec<f32>, Vec<f32>) = (rows(pos0, 11), rows(pos0, 23));
        let (k1, v1): (Vec<f32>, Vec<f32>) = (rows(t, 37), rows(t, 41));
        cache.write(0, 0, pos0, &k0, &v0);
        cache.write(0, pos0, t, &k1, &v1);
        // Position p of KV head h, as the written chunks laid it out.
        let at = |chunk0: &[f32], chunk1: &[f32], h: usize, p: usize| -> Vec<f32> {
            let (chunk, n, i) = if p < pos0 {
                (chunk0, pos0, p)
            } else {
                (chunk1, t, p - pos0)
            };
            chunk[(h * n + i) * hd..][..hd].to_vec()
        };
        let q: Vec<f32> = (0..n_head * t * hd).map(|j| val(j + 5003)).collect();
        let got = prompt_attention(&cache, 0, &q, pos0, t, n_head, 0.3);
        assert_eq!(got.len(), t * n_head * hd);
        for r in 0..t {
            for qh in 0..n_head {
                let h = qh / (n_head / n_kv);
                let visible = 0..=pos0 + r;
                let keys: Vec<_> = visible.clone().map(|p| at(&k0, &k1, h, p)).collect();
                let values: Vec<_> = visible.map(|p| at(&v0, &v1, h, p)).collect();
                let want = reference(&q[(qh * t + r) * hd..][..hd], &keys, &values, 0.3);
                let got = &got[(r * n_head + qh) * hd..][..hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "token {r} head {qh}: {a} vs {b}");
                }
            }
        }
    }
}
