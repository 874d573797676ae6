//! The CPU engine's KV cache in plain host memory, in fixed-size blocks, and attention over it.
//!
//! A decode step attends one new token per sequence. Done with candle ops that is about a
//! dozen small tensor operations per sequence and layer, each with its own allocation and
//! dispatch: measured on SmolLM2, 7 ms of a 19 ms single-stream step and 80 ms of a
//! 160 ms step at 16 streams. Here it is one pass per (sequence, KV head) over the cached rows,
//! spread over the engine's compute pool; prompt chunks attend the same way, two tokens at a
//! time, and one pass may mix several sequences' decode tokens and prompt chunks.
//! Within a pass, the query heads that share the KV head (and, in a prompt, both tokens' heads)
//! are scored and weighted together, so each key and value vector is loaded once for all of
//! them: a 2 048-token prompt spent 40 % of its prefill here when each head read the cache on
//! its own.
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
    /// `v` are `(t, n_kv, head_dim)`, as a forward pass makes them.
    pub(crate) fn write(
        &mut self,
        table: &[u32],
        layer: usize,
        pos0: usize,
        t: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let (n_kv, hd) = (self.n_kv, self.head_dim);
        for h in 0..n_kv {
            for i in 0..t {
                let p = pos0 + i;
                let (block, off) = (table[p / BLOCK_TOKENS], p % BLOCK_TOKENS);
                let seg = self.segment_mut(block, layer, h);
                let src = (i * n_kv + h) * hd;
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

/// Query rows attended together against one KV head. In the AVX2 kernel each row keeps two
/// 8-lane accumulators: 12 of them, two key (or value) vectors and one broadcast fill AVX2's
/// 16 registers, and every key or value vector loaded serves all the rows.
const ROWS_TOGETHER: usize = 6;

/// Softmax attention of query rows that share one KV head: row `i` (`q[i·hd..][..hd]`)
/// attends over the first `lens[i]` cached positions of `head` (none beyond `head.len`) and
/// its result goes to `out[i·hd..][..hd]`. `scores` is scratch space.
///
/// Every row is computed in the same order whatever rows share the call, so a token decoded
/// alone gets exactly the result it gets within a prompt chunk.
fn attend_rows(
    q: &[f32],
    lens: &[usize],
    head: CachedHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    debug_assert!(lens.iter().all(|&n| n >= 1 && n <= head.len));
    #[cfg(target_arch = "x86_64")]
    if crate::qmatrix::avx2_fma() {
        // SAFETY: `avx2::attend_rows` only requires the CPU features just checked at run time.
        #[allow(unsafe_code)]
        unsafe {
            return avx2::attend_rows(q, lens, head, scale, scores, out);
        }
    }
    attend_rows_generic(q, lens, head, scale, scores, out)
}

/// Portable version of [`attend_rows`] (and the definition the AVX2 one must agree with).
fn attend_rows_generic(
    q: &[f32],
    lens: &[usize],
    head: CachedHead<'_>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let len = head.len;
    zeroed(scores, lens.len() * len);
    for ((qh, row), &n) in q
        .chunks_exact(head.head_dim)
        .zip(scores.chunks_exact_mut(len))
        .zip(lens)
    {
        for (j, s) in row[..n].iter_mut().enumerate() {
            for (d, &qd) in qh.iter().enumerate() {
                *s += qd * head.key(d, j);
            }
        }
        row.iter_mut().for_each(|s| *s *= scale);
    }
    softmax_rows(scores, lens, len);
    weighted_values::<false>(head, scores, out);
}

/// Sizes `scores` to `n` zeros.
fn zeroed(scores: &mut Vec<f32>, n: usize) {
    scores.clear();
    scores.resize(n, 0.0);
}

/// `a · b + c`, fused where the CPU has FMA (the portable build must not call the slow
/// software `fmaf`).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// Turns the first `lens[i]` scores of row `i` (rows `stride` long) into softmax weights and
/// the rest of the row into zeros, so that summing over the whole row weighs only its own
/// positions.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], lens: &[usize], stride: usize) {
    for (row, &n) in scores.chunks_exact_mut(stride).zip(lens) {
        let (live, dead) = row.split_at_mut(n);
        let max = live.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for s in live.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|s| *s *= inv);
        dead.fill(0.0);
    }
}

/// The weighted sum of the cached values per query row: `out` (`rows × head_dim`) from the
/// softmax weights in `scores` (`rows × len`).
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

    use super::{BLOCK_TOKENS, CachedHead, ROWS_TOGETHER, TILE, weighted_values, zeroed};
    use crate::vexp::avx2::{exp, lane_sum};

    #[target_feature(enable = "avx2,fma")]
    fn load(s: &[f32]) -> __m256 {
        bytemuck::cast(<[f32; 8]>::try_from(&s[..8]).expect("eight lanes"))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn attend_rows(
        q: &[f32],
        lens: &[usize],
        head: CachedHead<'_>,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let (hd, len) = (head.head_dim, head.len);
        zeroed(scores, lens.len() * len);
        for (q, scores) in q
            .chunks(ROWS_TOGETHER * hd)
            .zip(scores.chunks_mut(ROWS_TOGETHER * len))
        {
            // Fewer rows leave registers for more key tiles at once: eight or more
            // independent accumulators keep both FMA units busy.
            match q.len() / hd {
                6 => score_rows::<6, 2>(q, head, scale, scores),
                5 => score_rows::<5, 2>(q, head, scale, scores),
                4 => score_rows::<4, 2>(q, head, scale, scores),
                3 => score_rows::<3, 3>(q, head, scale, scores),
                2 => score_rows::<2, 4>(q, head, scale, scores),
                _ => score_rows::<1, 8>(q, head, scale, scores),
            }
        }
        softmax_rows(scores, lens, len);
        if !hd.is_multiple_of(16) {
            return weighted_values::<true>(head, scores, out);
        }
        let mut by_position = Vec::new();
        for (p, out) in scores
            .chunks(ROWS_TOGETHER * len)
            .zip(out.chunks_mut(ROWS_TOGETHER * hd))
        {
            let rows = p.len() / len;
            // Position by position, the rows' weights side by side: one pointer walks them.
            zeroed(&mut by_position, p.len());
            for (r, row) in p.chunks_exact(len).enumerate() {
                for (j, &w) in row.iter().enumerate() {
                    by_position[j * rows + r] = w;
                }
            }
            match rows {
                6 => weigh_rows::<6>(head, &by_position, out),
                5 => weigh_rows::<5>(head, &by_position, out),
                4 => weigh_rows::<4>(head, &by_position, out),
                3 => weigh_rows::<3>(head, &by_position, out),
                2 => weigh_rows::<2>(head, &by_position, out),
                _ => weigh_rows::<1>(head, &by_position, out),
            }
        }
    }

    /// [`super::softmax_rows`], eight scores at a time.
    #[target_feature(enable = "avx2,fma")]
    fn softmax_rows(scores: &mut [f32], lens: &[usize], stride: usize) {
        for (row, &n) in scores.chunks_exact_mut(stride).zip(lens) {
            let (live, dead) = row.split_at_mut(n);
            let max = live.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let max = _mm256_set1_ps(max);
            let mut sum = _mm256_setzero_ps();
            let mut lanes = live.chunks_exact_mut(8);
            for s in &mut lanes {
                let e = exp(_mm256_sub_ps(load(s), max));
                sum = _mm256_add_ps(sum, e);
                s.copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(e));
            }
            let tail = lanes.into_remainder();
            if !tail.is_empty() {
                let mut padded = [f32::NEG_INFINITY; 8];
                padded[..tail.len()].copy_from_slice(tail);
                let e = exp(_mm256_sub_ps(load(&padded), max));
                sum = _mm256_add_ps(sum, e);
                tail.copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(e)[..tail.len()]);
            }
            let inv = 1.0 / lane_sum(sum);
            live.iter_mut().for_each(|s| *s *= inv);
            dead.fill(0.0);
        }
    }

    /// `scale · q·k_j` of `R` query rows (`q`: `R × head_dim`) for every position `j` of
    /// `head`, into `scores` (`R × head.len`), `T` key tiles at a time.
    #[target_feature(enable = "avx2,fma")]
    fn score_rows<const R: usize, const T: usize>(
        q: &[f32],
        head: CachedHead<'_>,
        scale: f32,
        scores: &mut [f32],
    ) {
        let tiles = head.len.div_ceil(TILE);
        let mut tile = 0;
        while tile + T <= tiles {
            score_tiles::<R, T>(q, head, tile, scale, scores);
            tile += T;
        }
        while tile < tiles {
            score_tiles::<R, 1>(q, head, tile, scale, scores);
            tile += 1;
        }
    }

    /// The scores of `R` rows for the positions of `T` key tiles from `tile` on: each row's
    /// dimension `d` broadcast against the tiles' row `d`. A last tile partly past
    /// `head.len` is computed whole and stored in part.
    #[target_feature(enable = "avx2,fma")]
    fn score_tiles<const R: usize, const T: usize>(
        q: &[f32],
        head: CachedHead<'_>,
        tile: usize,
        scale: f32,
        scores: &mut [f32],
    ) {
        let (hd, len) = (head.head_dim, head.len);
        // Tiles of one pass may lie in different blocks.
        let mut keys = [&[][..]; T];
        for (i, k) in keys.iter_mut().enumerate() {
            *k = &head.tile(tile + i)[..hd * TILE];
        }
        let q = &q[..R * hd];
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for d in 0..hd {
            let mut k = [_mm256_setzero_ps(); T];
            for (kv, tile) in k.iter_mut().zip(&keys) {
                *kv = load(&tile[d * TILE..]);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let qv = _mm256_set1_ps(q[r * hd + d]);
                for (a, kv) in acc.iter_mut().zip(&k) {
                    *a = _mm256_fmadd_ps(qv, *kv, *a);
                }
            }
        }
        let scale = _mm256_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate() {
            for (i, a) in acc.iter().enumerate() {
                let at = (tile + i) * TILE;
                let lanes: [f32; TILE] = bytemuck::cast(_mm256_mul_ps(*a, scale));
                let n = TILE.min(len - at);
                scores[r * len + at..][..n].copy_from_slice(&lanes[..n]);
            }
        }
    }

    /// `out` (`R × head_dim`) = `R` rows of weights times the cached values, 16 dimensions of
    /// every row held in registers over all positions; `p` holds the weights position by
    /// position (`head.len × R`).
    #[target_feature(enable = "avx2,fma")]
    fn weigh_rows<const R: usize>(head: CachedHead<'_>, p: &[f32], out: &mut [f32]) {
        let (hd, len) = (head.head_dim, head.len);
        let p = &p[..len * R];
        for c in (0..hd).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut j = 0;
            for segment in head.segments {
                let rows = BLOCK_TOKENS.min(len.saturating_sub(j));
                if rows == 0 {
                    break;
                }
                for v in segment[BLOCK_TOKENS * hd..][..rows * hd].chunks_exact(hd) {
                    let (v0, v1) = (load(&v[c..]), load(&v[c + 8..]));
                    let weights = &p[j * R..][..R];
                    for (acc, &w) in acc.iter_mut().zip(weights) {
                        let pv = _mm256_set1_ps(w);
                        acc[0] = _mm256_fmadd_ps(pv, v0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(pv, v1, acc[1]);
                    }
                    j += 1;
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let o = &mut out[r * hd + c..][..16];
                o[..8].copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(acc[0]));
                o[8..].copy_from_slice(&bytemuck::cast::<__m256, [f32; 8]>(acc[1]));
            }
        }
    }
}

/// One sequence's rows of a forward pass: `t` new tokens at positions `pos0..pos0 + t`,
/// whose keys and values are already in its blocks `table`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span<'a> {
    pub table: &'a [u32],
    pub pos0: usize,
    pub t: usize,
}

/// Causal attention for the new tokens of several sequences at once (a decode step is one
/// token each, a prompt chunk many; a pass may mix them). The spans' rows are packed in
/// order: `q` is `(rows, n_head, head_dim)` with heads sharing a KV head adjacent, and row
/// `r` of span `s` attends to positions `0..=pos0 + r` of its own blocks (a cached prefix
/// included). Returns `(rows, n_head × head_dim)`.
///
/// Work items are (sequence, KV head, a few consecutive tokens): their query heads are
/// attended together, so each cached key and value is read once for all of them; no
/// `t × len` score matrix, no mask, and the masked half of a causal prompt is never computed
/// (with candle ops a 2 048-token prompt spent a quarter of its prefill allocating, masking
/// and exponentiating that matrix).
pub(crate) fn attention(
    store: &HostBlocks,
    spans: &[Span<'_>],
    layer: usize,
    q: &[f32],
    n_head: usize,
    scale: f32,
) -> Vec<f32> {
    let (n_kv, hd) = (store.n_kv, store.head_dim);
    let group = n_head / n_kv;
    let width = group * hd;
    let tokens_per_item = (ROWS_TOGETHER / group).max(1);
    // (span, KV head, first token, first row of the span); items run through a span's tokens
    // in order within a KV head, so neighbouring items share cached rows.
    let mut items = Vec::new();
    let mut row0 = 0;
    for (s, span) in spans.iter().enumerate() {
        for h in 0..n_kv {
            for first in (0..span.t).step_by(tokens_per_item) {
                items.push((s, h, first, row0));
            }
        }
        row0 += span.t;
    }
    let segments: Vec<Vec<&[f32]>> = spans
        .iter()
        .flat_map(|span| {
            (0..n_kv).map(move |h| store.segments(span.table, layer, h, span.pos0 + span.t))
        })
        .collect();
    let out = SharedOutput::zeros(row0 * n_head * hd);
    for_each_range(items.len(), |range| {
        let (mut scores, mut rows, mut lens, mut buf) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for &(s, h, first, row0) in &items[range] {
            let span = spans[s];
            let tokens = first..span.t.min(first + tokens_per_item);
            rows.clear();
            lens.clear();
            // Each token's query heads of KV head `h`, side by side, token after token.
            for r in tokens.clone() {
                let at = ((row0 + r) * n_head + h * group) * hd;
                rows.extend_from_slice(&q[at..at + width]);
                lens.extend(std::iter::repeat_n(span.pos0 + r + 1, group));
            }
            let head = CachedHead {
                segments: &segments[s * n_kv + h],
                len: span.pos0 + tokens.end,
                head_dim: hd,
            };
            buf.resize(rows.len(), 0.0);
            attend_rows(&rows, &lens, head, scale, &mut scores, &mut buf);
            for (k, r) in tokens.enumerate() {
                out.write(
                    ((row0 + r) * n_head + h * group) * hd,
                    &buf[k * width..][..width],
                );
            }
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

    /// Positions `0..n` of KV head `h` from a `(n, n_kv, head_dim)` buffer, one row each.
    fn rows_of(flat: &[f32], h: usize, n: usize, n_kv: usize, hd: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| flat[(i * n_kv + h) * hd..][..hd].to_vec())
            .collect()
    }

    #[test]
    fn a_decode_step_reads_each_sequence_through_its_block_table() {
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
                    let mut keys = rows_of(&k_prefix, h, prefix, n_kv, hd);
                    keys.extend(rows_of(&k, h, t, n_kv, hd));
                    let mut values = rows_of(&v_prefix, h, prefix, n_kv, hd);
                    values.extend(rows_of(&v, h, t, n_kv, hd));
                    (keys, values)
                })
                .collect();
            want_rows.push(per_head);
        }
        let q: Vec<f32> = (0..2 * n_head * hd).map(|j| val(j + 5003)).collect();
        let spans = [0, 1].map(|i| Span {
            table: tables[i],
            pos0: lens[i] - 1,
            t: 1,
        });
        let got = attention(&store, &spans, 1, &q, n_head, 0.25);
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
        let zero = attention(&store, &spans, 0, &q, n_head, 0.25);
        assert!(zero.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn portable_and_simd_attention_agree_for_every_length_row_count_and_head_size() {
        // Head sizes with and without the 16-wide value path; lengths around tile, block and
        // scoring-pass boundaries; 1 to 8 rows (every kernel shape, and more rows than are
        // attended together), each row with its own length; blocks in reverse order.
        for hd in [64, 48, 32] {
            for len in [1usize, 7, 8, 9, 31, 32, 33, 63, 64, 65, 130] {
                let blocks = len.div_ceil(BLOCK_TOKENS);
                let mut store = HostBlocks::new(1, 1, hd, blocks);
                let table: Vec<u32> = (0..blocks as u32).rev().collect();
                let k: Vec<f32> = (0..len * hd).map(|j| val(j + 7)).collect();
                let v: Vec<f32> = (0..len * hd).map(|j| val(j + 999)).collect();
                store.write(&table, 0, 0, len, &k, &v);
                let segments = store.segments(&table, 0, 0, len);
                let head = CachedHead {
                    segments: &segments,
                    len,
                    head_dim: hd,
                };
                let keys = rows_of(&k, 0, len, 1, hd);
                let values = rows_of(&v, 0, len, 1, hd);
                for rows in 1..=8 {
                    let q: Vec<f32> = (0..rows * hd).map(|j| val(j + 31)).collect();
                    let lens: Vec<usize> = (0..rows)
                        .map(|i| len.saturating_sub(i % 3).max(1))
                        .collect();
                    let (mut a, mut b) = (vec![0f32; rows * hd], vec![0f32; rows * hd]);
                    attend_rows(&q, &lens, head, 0.2, &mut Vec::new(), &mut a);
                    attend_rows_generic(&q, &lens, head, 0.2, &mut Vec::new(), &mut b);
                    for (qi, qh) in q.chunks(hd).enumerate() {
                        let n = lens[qi];
                        let want = reference(qh, &keys[..n], &values[..n], 0.2);
                        let at = qi * hd..(qi + 1) * hd;
                        for ((x, y), w) in a[at.clone()].iter().zip(&b[at.clone()]).zip(&want) {
                            let case = format!("hd {hd} len {len} rows {rows} row {qi}");
                            assert!((x - y).abs() < 1e-5, "{case}: {x} vs {y}");
                            assert!((x - w).abs() < 1e-5, "{case}: {x} vs {w}");
                        }
                        // Alone, the row gets exactly what it got among the others: a decoded
                        // token equals the same token prefilled in a chunk.
                        let mut alone = vec![0f32; hd];
                        attend_rows(qh, &lens[qi..=qi], head, 0.2, &mut Vec::new(), &mut alone);
                        assert_eq!(alone, a[at], "hd {hd} len {len} rows {rows} row {qi} alone");
                    }
                }
            }
        }
    }

    #[test]
    fn a_prompt_chunk_is_causal_over_cached_and_new_positions() {
        // Small heads (portable value path), then SmolLM2's shape (3 heads per KV head, 64
        // wide) with an odd token count: pairs of tokens attended together, and one alone.
        for (n_kv, n_head, hd, t) in [(2, 6, 8, 4), (3, 9, 64, 5)] {
            // An earlier chunk filling more than a block, then this chunk's `t` tokens.
            let pos0 = BLOCK_TOKENS + 3;
            let mut store = HostBlocks::new(1, n_kv, hd, 3);
            let table = [1u32, 0];
            let rows = |n: usize, seed: usize| (0..n_kv * n * hd).map(|j| val(j + seed)).collect();
            let (k0, v0): (Vec<f32>, Vec<f32>) = (rows(pos0, 11), rows(pos0, 23));
            let (k1, v1): (Vec<f32>, Vec<f32>) = (rows(t, 37), rows(t, 41));
            store.write(&table, 0, 0, pos0, &k0, &v0);
            store.write(&table, 0, pos0, t, &k1, &v1);
            let q: Vec<f32> = (0..t * n_head * hd).map(|j| val(j + 5003)).collect();
            let span = Span {
                table: &table,
                pos0,
                t,
            };
            let got = attention(&store, &[span], 0, &q, n_head, 0.3);
            assert_eq!(got.len(), t * n_head * hd);
            for r in 0..t {
                for qh in 0..n_head {
                    let h = qh / (n_head / n_kv);
                    let mut keys = rows_of(&k0, h, pos0, n_kv, hd);
                    keys.extend(rows_of(&k1, h, t, n_kv, hd).into_iter().take(r + 1));
                    let mut values = rows_of(&v0, h, pos0, n_kv, hd);
                    values.extend(rows_of(&v1, h, t, n_kv, hd).into_iter().take(r + 1));
                    let want = reference(&q[(r * n_head + qh) * hd..][..hd], &keys, &values, 0.3);
                    let got = &got[(r * n_head + qh) * hd..][..hd];
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-5,
                            "hd {hd} token {r} head {qh}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sequences_packed_into_one_pass_get_exactly_what_they_get_alone() {
        // SmolLM2's shape: a prompt chunk after a cached block, a decoded token, and a short
        // prompt from position 0, each in its own blocks.
        let (n_kv, n_head, hd) = (3, 9, 64);
        let mut store = HostBlocks::new(1, n_kv, hd, 6);
        let tables: [&[u32]; 3] = [&[4, 1], &[0, 5], &[3]];
        let spans = [
            Span {
                table: tables[0],
                pos0: BLOCK_TOKENS + 2,
                t: 7,
            },
            Span {
                table: tables[1],
                pos0: BLOCK_TOKENS + 9,
                t: 1,
            },
            Span {
                table: tables[2],
                pos0: 0,
                t: 5,
            },
        ];
        for (i, span) in spans.iter().enumerate() {
            let n = span.pos0 + span.t;
            let k: Vec<f32> = (0..n * n_kv * hd).map(|j| val(j + 100 * i + 3)).collect();
            let v: Vec<f32> = (0..n * n_kv * hd).map(|j| val(j + 100 * i + 51)).collect();
            store.write(span.table, 0, 0, n, &k, &v);
        }
        let rows: usize = spans.iter().map(|s| s.t).sum();
        let q: Vec<f32> = (0..rows * n_head * hd).map(|j| val(j + 7001)).collect();
        let packed = attention(&store, &spans, 0, &q, n_head, 0.125);
        let mut row0 = 0;
        for span in spans {
            let at = row0 * n_head * hd..(row0 + span.t) * n_head * hd;
            let alone = attention(&store, &[span], 0, &q[at.clone()], n_head, 0.125);
            assert_eq!(packed[at], alone[..], "span at row {row0}");
            row0 += span.t;
        }
    }
}
