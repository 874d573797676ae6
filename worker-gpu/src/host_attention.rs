//! The CPU engine's KV cache in plain host memory, in fixed-size blocks, and attention over it.
//!
//! A decode step attends one new token per sequence. Done with candle ops that is about a
//! dozen small tensor operations per sequence and layer, each with its own allocation and
//! dispatch: measured on SmolLM2, 7 ms of a 19 ms single-stream step and 80 ms of a
//! 160 ms step at 16 streams. Here it is one pass per (sequence, KV head) over the cached rows,
//! spread over the engine's compute pool; prompts attend the same way, token by token.
//!
//! KV lives in blocks of [`BLOCK_TOKENS`] positions shared by all sequences (see
//! `crate::kv_cache`): a sequence reads its positions through its block table, so sequences
//! with a common prompt prefix read the same blocks. Within a block, keys are stored transposed
//! in tiles of [`TILE`] positions (`head_dim × TILE` per tile) so that the scores of consecutive
//! positions are computed side by side in vector lanes, with no horizontal sum per position
//! (with row-major keys, the per-position reductions cost more than the multiply-adds), while
//! each tile stays contiguous.

use crate::qmatrix::{SharedOutput, for_each_range};

/// Positions per key tile: one AVX vector.
const TILE: usize = 8;

/// Positions per KV block: a whole number of tiles, small enough that a prompt shares most of
/// a cached prefix, large enough that a block table stays short.
pub const BLOCK_TOKENS: usize = 32;

const _: () = assert!(BLOCK_TOKENS.is_multiple_of(TILE));

/// Where dimension `d` of the key at position `j` of a block lives within its tiled keys.
fn key_index(head_dim: usize, d: usize, j: usize) -> usize {
    (j / TILE) * head_dim * TILE + d * TILE + j % TILE
}

/// Every KV block in host memory. Block `b` holds, per layer and KV head, one segment of
/// `2 × BLOCK_TOKENS × head_dim` values: the keys in tiles (see [`key_index`]), then the values
/// row-major. Blocks are allocated on first write and kept for reuse.
pub(crate) struct HostBlocks {
    blocks: Vec<Option<Box<[f32]>>>,
    layers: usize,
    n_kv: usize,
    head_dim: usize,
}

/// The first `len` cached positions of one KV head of one sequence: its block segments in
/// order (see [`HostBlocks`]).
#[derive(Clone, Copy)]
struct CachedHead<'a> {
    segments: &'a [&'a [f32]],
    len: usize,
    head_dim: usize,
}

impl CachedHead<'_> {
    /// Tiled keys of tile `j` (positions `j·TILE ..`): `head_dim × TILE` values.
    #[inline(always)]
    fn tile(&self, j: usize) -> &[f32] {
        const TILES_PER_BLOCK: usize = BLOCK_TOKENS / TILE;
        let at = (j % TILES_PER_BLOCK) * self.head_dim * TILE;
        &self.segments[j / TILES_PER_BLOCK][at..at + self.head_dim * TILE]
    }

    #[inline(always)]
    fn key(&self, d: usize, j: usize) -> f32 {
        self.segments[j / BLOCK_TOKENS][key_index(self.head_dim, d, j % BLOCK_TOKENS)]
    }

    /// The value rows of positions `0..len`, in order.
    #[inline(always)]
    fn value_rows(&self) -> impl Iterator<Item = &[f32]> {
        let hd = self.head_dim;
        self.segments.iter().enumerate().flat_map(move |(b, seg)| {
            let rows = BLOCK_TOKENS.min(self.len.saturating_sub(b * BLOCK_TOKENS));
            seg[BLOCK_TOKENS * hd..][..rows * hd].chunks_exact(hd)
        })
    }
}

impl HostBlocks {
    pub(crate) fn new(layers: usize, n_kv: usize, head_dim: usize, blocks: usize) -> Self {
        Self {
            blocks: (0..blocks).map(|_| None).collect(),
            layers,
            n_kv,
            head_dim,
        }
    }

    fn segment_len(&self) -> usize {
        2 * BLOCK_TOKENS * self.head_dim
    }

    fn segment(&self, block: u32, layer: usize, h: usize) -> &[f32] {
        let seg = self.segment_len();
        let at = (layer * self.n_kv + h) * seg;
        let data = self.blocks[block as usize]
            .as_deref()
            .expect("a kv block is written before it is read");
        &data[at..at + seg]
    }

    fn segment_mut(&mut self, block: u32, layer: usize, h: usize) -> &mut [f32] {
        let seg = self.segment_len();
        let size = self.layers * self.n_kv * seg;
        let at = (layer * self.n_kv + h) * seg;
        let data = self.blocks[block as usize].get_or_insert_with(|| vec![0f32; size].into());
        &mut data[at..at + seg]
    }

    /// Bytes of the blocks allocated so far.
    pub(crate) fn allocated_bytes(&self) -> u64 {
        let per_block = self.layers * self.n_kv * self.segment_len() * std::mem::size_of::<f32>();
        (self.blocks.iter().filter(|b| b.is_some()).count() * per_block) as u64
    }

    /// Stores `t` positions from `pos0` on of the sequence whose blocks are `table`; `k` and
    /// `v` are `(n_kv, t, head_dim)`.
    pub(crate) fn write(
        &mut self,
        table: &[u32],
        layer: usize,
        pos0: usize,
        t: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let hd = self.head_dim;
        for h in 0..self.n_kv {
            for i in 0..t {
                let p = pos0 + i;
                let (block, off) = (table[p / BLOCK_TOKENS], p % BLOCK_TOKENS);
                let seg = self.segment_mut(block, layer, h);
                let src = (h * t + i) * hd;
                for (d, &x) in k[src..src + hd].iter().enumerate() {
                    seg[key_index(hd, d, off)] = x;
                }
                seg[(BLOCK_TOKENS + off) * hd..][..hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// The segments holding the first `len` positions of KV head `h` at `layer`.
    fn segments(&self, table: &[u32], layer: usize, h: usize, len: usize) -> Vec<&[f32]> {
        table[..len.div_ceil(BLOCK_TOKENS)]
            .iter()
            .map(|&b| self.segment(b, layer, h))
            .collect()
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
    let len = head.len;
    for (qh, row) in score_rows(q, head, scores) {
        for (j, s) in row.iter_mut().enumerate() {
            for (d, &qd) in qh.iter().enumerate() {
                *s += qd * head.key(d, j);
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
    for (j, v) in head.value_rows().enumerate() {
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
        // Tiles of one scoring pass may lie in different blocks.
        let keys: [&[f32]; LANES] = std::array::from_fn(|i| head.tile(tile + i));
        let mut acc = [_mm256_setzero_ps(); LANES];
        for (d, &qd) in q.iter().enumerate() {
            let qv = _mm256_set1_ps(qd);
            for (a, k) in acc.iter_mut().zip(&keys) {
                *a = _mm256_fmadd_ps(qv, load(&k[d * TILE..]), *a);
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
        for (c, part) in out.chunks_exact_mut(32).enumerate() {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (row, &p) in head.value_rows().zip(weights) {
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
/// heads sharing a KV head adjacent) and attends over the first `lens[i]` positions of its
/// blocks `tables[i]` at `layer` (its new token already written). Returns
/// `(batch, n_head × head_dim)`.
pub(crate) fn decode_attention(
    store: &HostBlocks,
    tables: &[&[u32]],
    layer: usize,
    q: &[f32],
    lens: &[usize],
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let (n_kv, hd) = (store.n_kv, store.head_dim);
    let group = n_head / n_kv;
    let width = group * hd;
    // Work items are (sequence, KV head) pairs; each owns its slice of the output.
    let segments: Vec<Vec<&[f32]>> = (0..tables.len() * n_kv)
        .map(|item| {
            let (i, h) = (item / n_kv, item % n_kv);
            store.segments(tables[i], layer, h, lens[i])
        })
        .collect();
    let out = SharedOutput::zeros(tables.len() * n_head * hd);
    for_each_range(segments.len(), |items| {
        let (mut scores, mut buf) = (Vec::new(), vec![0f32; width]);
        for item in items {
            let (i, h) = (item / n_kv, item % n_kv);
            let head = CachedHead {
                segments: &segments[item],
                len: lens[i],
                head_dim: hd,
            };
            let at = i * n_head * hd + h * width;
            attend_group(&q[at..at + width], head, scale, &mut scores, &mut buf);
            out.write(at, &buf);
        }
    });
    out.into_vec()
}

/// Causal attention for `t` new tokens of one sequence at positions `pos0..pos0 + t`, whose
/// keys and values are already in its blocks `table`: token `r` attends to positions
/// `0..=pos0 + r` (a cached prefix included). `q` is `(n_head, t, head_dim)`; returns
/// `(t, n_head × head_dim)`.
///
/// Fused per (KV head, token): no `t × len` score matrix, no mask, and the masked half of a
/// causal prompt is never computed (with candle ops a 2 048-token prompt spent a quarter of
/// its prefill allocating, masking and exponentiating that matrix).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prompt_attention(
    store: &HostBlocks,
    table: &[u32],
    layer: usize,
    q: &[f32],
    pos0: usize,
    t: usize,
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let (n_kv, hd) = (store.n_kv, store.head_dim);
    let group = n_head / n_kv;
    let segments: Vec<Vec<&[f32]>> = (0..n_kv)
        .map(|h| store.segments(table, layer, h, pos0 + t))
        .collect();
    let out = SharedOutput::zeros(t * n_head * hd);
    // Items run token by token within a KV head, so neighbouring items share cached rows.
    for_each_range(n_kv * t, |items| {
        let width = group * hd;
        let (mut scores, mut heads, mut buf) = (Vec::new(), vec![0f32; width], vec![0f32; width]);
        for item in items {
            let (h, r) = (item / t, item % t);
            let head = CachedHead {
                segments: &segments[h],
                len: pos0 + r + 1,
                head_dim: hd,
            };
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

    /// One vector per position.
    type Rows = Vec<Vec<f32>>;

    fn val(s: usize) -> f32 {
        ((s * 2654435761) % 1000) as f32 / 500.0 - 1.0
    }

    /// Positions `0..n` of KV head `h` from a `(n_kv, n, head_dim)` buffer, one row each.
    fn rows_of(flat: &[f32], h: usize, n: usize, hd: usize) -> Vec<Vec<f32>> {
        flat[h * n * hd..][..n * hd]
            .chunks(hd)
            .map(<[f32]>::to_vec)
            .collect()
    }

    #[test]
    fn decode_attention_reads_each_sequence_through_its_block_table() {
        // Two sequences sharing their first block (a common prefix), each with its own tail,
        // the tails deliberately out of order in the store.
        let (layers, n_kv, n_head, hd) = (2, 2, 4, 16);
        let mut store = HostBlocks::new(layers, n_kv, hd, 4);
        let prefix = BLOCK_TOKENS;
        let lens = [prefix + 5, prefix + 3];
        let tables: [&[u32]; 2] = [&[2, 0], &[2, 3]];
        let k_prefix: Vec<f32> = (0..n_kv * prefix * hd).map(|j| val(j + 1)).collect();
        let v_prefix: Vec<f32> = (0..n_kv * prefix * hd).map(|j| val(j + 77)).collect();
        store.write(tables[0], 1, 0, prefix, &k_prefix, &v_prefix);
        let mut want_rows = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let t = lens[i] - prefix;
            let k: Vec<f32> = (0..n_kv * t * hd).map(|j| val(j + 31 * i + 500)).collect();
            let v: Vec<f32> = (0..n_kv * t * hd).map(|j| val(j + 977 + 17 * i)).collect();
            store.write(table, 1, prefix, t, &k, &v);
            let per_head: Vec<(Rows, Rows)> = (0..n_kv)
                .map(|h| {
                    let mut keys = rows_of(&k_prefix, h, prefix, hd);
                    keys.extend(rows_of(&k, h, t, hd));
                    let mut values = rows_of(&v_prefix, h, prefix, hd);
                    values.extend(rows_of(&v, h, t, hd));
                    (keys, values)
                })
                .collect();
            want_rows.push(per_head);
        }
        let q: Vec<f32> = (0..2 * n_head * hd).map(|j| val(j + 5003)).collect();
        let got = decode_attention(&store, &tables, 1, &q, &lens, n_head, 0.25);
        for (i, per_head) in want_rows.iter().enumerate() {
            for head in 0..n_head {
                let (keys, values) = &per_head[head / (n_head / n_kv)];
                let at = (i * n_head + head) * hd;
                let want = reference(&q[at..at + hd], keys, values, 0.25);
                for (a, b) in got[at..at + hd].iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "seq {i} head {head}: {a} vs {b}");
                }
            }
        }
        // Layer 0 was never written: zeros attend to zeros.
        let zero = decode_attention(&store, &tables, 0, &q, &lens, n_head, 0.25);
        assert!(zero.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn portable_and_simd_attention_agree_for_every_length_and_head_size() {
        // Head sizes with and without the 32-wide value path; lengths around tile, block and
        // scoring-pass boundaries; blocks in reverse order.
        for (hd, g) in [(64, 3), (48, 2)] {
            for len in [1usize, 7, 8, 9, 31, 32, 33, 63, 64, 65, 130] {
                let blocks = len.div_ceil(BLOCK_TOKENS);
                let mut store = HostBlocks::new(1, 1, hd, blocks);
                let table: Vec<u32> = (0..blocks as u32).rev().collect();
                let k: Vec<f32> = (0..len * hd).map(|j| val(j + 7)).collect();
                let v: Vec<f32> = (0..len * hd).map(|j| val(j + 999)).collect();
                store.write(&table, 0, 0, len, &k, &v);
                let q: Vec<f32> = (0..g * hd).map(|j| val(j + 31)).collect();
                let segments = store.segments(&table, 0, 0, len);
                let head = CachedHead {
                    segments: &segments,
                    len,
                    head_dim: hd,
                };
                let (mut a, mut b) = (vec![0f32; g * hd], vec![0f32; g * hd]);
                attend_group(&q, head, 0.2, &mut Vec::new(), &mut a);
                attend_group_generic(&q, head, 0.2, &mut Vec::new(), &mut b);
                let keys = rows_of(&k, 0, len, hd);
                let values = rows_of(&v, 0, len, hd);
                for (qi, qh) in q.chunks(hd).enumerate() {
                    let want = reference(qh, &keys, &values, 0.2);
                    for ((x, y), w) in a[qi * hd..].iter().zip(&b[qi * hd..]).zip(&want) {
                        assert!((x - y).abs() < 1e-5, "hd {hd} len {len}: {x} vs {y}");
                        assert!((x - w).abs() < 1e-5, "hd {hd} len {len}: {x} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn prompt_attention_is_causal_over_cached_and_new_positions() {
        let (n_kv, n_head, hd) = (2, 6, 8);
        // An earlier chunk filling more than a block, then this chunk's 4 tokens.
        let (pos0, t) = (BLOCK_TOKENS + 3, 4);
        let mut store = HostBlocks::new(1, n_kv, hd, 3);
        let table = [1u32, 0];
        let rows = |n: usize, seed: usize| (0..n_kv * n * hd).map(|j| val(j + seed)).collect();
        let (k0, v0): (Vec<f32>, Vec<f32>) = (rows(pos0, 11), rows(pos0, 23));
        let (k1, v1): (Vec<f32>, Vec<f32>) = (rows(t, 37), rows(t, 41));
        store.write(&table, 0, 0, pos0, &k0, &v0);
        store.write(&table, 0, pos0, t, &k1, &v1);
        let q: Vec<f32> = (0..n_head * t * hd).map(|j| val(j + 5003)).collect();
        let got = prompt_attention(&store, &table, 0, &q, pos0, t, n_head, 0.3);
        assert_eq!(got.len(), t * n_head * hd);
        for r in 0..t {
            for qh in 0..n_head {
                let h = qh / (n_head / n_kv);
                let mut keys = rows_of(&k0, h, pos0, hd);
                keys.extend(rows_of(&k1, h, t, hd).into_iter().take(r + 1));
                let mut values = rows_of(&v0, h, pos0, hd);
                values.extend(rows_of(&v1, h, t, hd).into_iter().take(r + 1));
                let want = reference(&q[(qh * t + r) * hd..][..hd], &keys, &values, 0.3);
                let got = &got[(r * n_head + qh) * hd..][..hd];
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-5, "token {r} head {qh}: {a} vs {b}");
                }
            }
        }
    }
}
