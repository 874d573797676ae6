//! Our own llama forward pass over quantized weights (our CPU kernel, [`crate::qmatrix`], for
//! Q8_0/Q4_0/Q4_1 on the CPU; candle's `QMatMul` otherwise), written for serving:
//! KV lives in fixed-size blocks of one [`KvStore`] owned by the engine (not by the model
//! object); each sequence is a [`SeqCache`], a table of the blocks holding its positions, so
//! sequences join and leave independently and sequences with a common prefix can share its
//! blocks. [`Llama::decode`] runs one batched forward over every active sequence (one matmul
//! per weight per step; only attention, which reads each sequence's own blocks, is per
//! sequence).
//!
//! Rotary embedding is the interleaved ("normal", `rope_i`) variant, because GGUF llama files
//! store Q/K rows permuted for it (llama.cpp's convert script does this).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::gguf::{GgufError, GgufFile, LlamaConfig, Repack};
use crate::host_attention::{BLOCK_TOKENS, HostBlocks, Span, attention};
use crate::qmatrix::{QMatrix, QMatrixError};

/// Errors of a forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("forward pass: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
    /// The caller gave the computation up part-way (its requester cancelled or went away).
    #[error("abandoned part-way: nobody wants the result")]
    Abandoned,
}

struct Layer {
    attn_norm: Tensor,
    /// Query, key and value projections.
    qkv: Projection,
    wo: Linear,
    ffn_norm: Tensor,
    /// Gate and up projections.
    gate_up: Projection,
    w_down: Linear,
}

/// A weight matrix: our own CPU kernel for the formats it covers ([`QMatrix`]), candle's
/// quantized matmul otherwise (other formats, and GPU devices).
enum Linear {
    Cpu(Arc<QMatrix>),
    Candle(QMatMul),
}

impl Linear {
    fn new(t: QTensor) -> Result<Self, ModelError> {
        Ok(match cpu_matrix(&t)? {
            Some(m) => Self::Cpu(Arc::new(m)),
            None => Self::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    fn bytes(&self) -> u64 {
        match self {
            Self::Cpu(m) => m.bytes(),
            Self::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes() as u64,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                (t.elem_count() * t.dtype().size_in_bytes()) as u64
            }
        }
    }

    /// `x · wᵀ` for `x` of shape `(…, in)`. From `dense_from_rows` rows on, the weight is
    /// dequantized for this call and multiplied with candle's f32 GEMM: the quantized kernels
    /// do every multiply-add in integers and their cost grows with the rows, while for a long
    /// prompt chunk the GEMM's cache blocking repays the one pass of dequantizing.
    fn forward(&self, x: &Tensor, dense_from_rows: usize) -> Result<Tensor, ModelError> {
        let rows = x.dims().iter().rev().skip(1).product::<usize>();
        match self {
            Self::Cpu(w) if rows >= dense_from_rows => {
                let dense = Tensor::from_vec(w.dequantize(), (w.rows(), w.cols()), x.device())?;
                Ok(x.broadcast_matmul(&dense.t()?)?)
            }
            Self::Cpu(w) => {
                let mut dims = x.dims().to_vec();
                let input = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                let out = w.matmul(&input, rows);
                if let Some(last) = dims.last_mut() {
                    *last = w.rows();
                }
                Ok(Tensor::from_vec(out, dims, x.device())?)
            }
            Self::Candle(QMatMul::QTensor(q)) if rows >= dense_from_rows && x.device().is_cpu() => {
                let dense = q.dequantize(x.device())?;
                Ok(x.broadcast_matmul(&dense.t()?)?)
            }
            Self::Candle(w) => Ok(w.forward(x)?),
        }
    }
}

/// Linear maps of the same input: on the CPU kernel one stacked matrix (one pass over the
/// input, one dispatch), otherwise one matmul each.
enum Projection {
    Stacked { w: Linear, widths: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projection {
    fn new(parts: Vec<Linear>) -> Self {
        let cpu: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|p| match p {
                Linear::Cpu(m) => Some(&**m),
                Linear::Candle(_) => None,
            })
            .collect();
        if let Some(stacked) = cpu.as_deref().and_then(QMatrix::concat) {
            let widths = cpu.iter().flatten().map(|m| m.rows()).collect();
            return Self::Stacked {
                w: Linear::Cpu(Arc::new(stacked)),
                widths,
            };
        }
        Self::Separate(parts)
    }

    fn bytes(&self) -> u64 {
        match self {
            Self::Stacked { w, .. } => w.bytes(),
            Self::Separate(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// The `N` outputs for `x` of shape `(rows, in)`, each `(rows, out_i)`.
    fn forward<const N: usize>(
        &self,
        x: &Tensor,
        dense_from_rows: usize,
    ) -> Result<[Tensor; N], ModelError> {
        let outs: Vec<Tensor> = match self {
            Self::Stacked { w, widths } => {
                let all = w.forward(x, dense_from_rows)?;
                let mut at = 0;
                let mut outs = Vec::with_capacity(widths.len());
                for &n in widths {
                    outs.push(all.narrow(D::Minus1, at, n)?.contiguous()?);
                    at += n;
                }
                outs
            }
            Self::Separate(parts) => parts
                .iter()
                .map(|w| w.forward(x, dense_from_rows))
                .collect::<Result<_, _>>()?,
        };
        let got = outs.len();
        outs.try_into()
            .map_err(|_| ModelError::Invalid(format!("projection has {got} outputs, expected {N}")))
    }
}

/// `t` in our CPU kernel's layout, when it is on the CPU in a format the kernel covers.
fn cpu_matrix(t: &QTensor) -> Result<Option<QMatrix>, ModelError> {
    if !t.device().is_cpu() {
        return Ok(None);
    }
    match QMatrix::from_qtensor(t) {
        Ok(m) => Ok(Some(m)),
        Err(QMatrixError::Unsupported(_)) => Ok(None),
        Err(e) => Err(ModelError::Invalid(e.to_string())),
    }
}

/// The token embedding table (also the output head when the model ties them).
enum Embedding {
    Cpu(Arc<QMatrix>),
    Candle(Arc<QTensor>),
}

impl Embedding {
    fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor, ModelError> {
        match self {
            Self::Cpu(m) => {
                let width = m.cols();
                let mut out = vec![0f32; ids.len() * width];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(width)) {
                    m.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(out, (ids.len(), width), device)?)
            }
            Self::Candle(t) => Ok(t.embedding(&Tensor::new(ids, device)?)?),
        }
    }
}

/// A loaded llama model: weights and rotary tables; no per-sequence state.
pub struct Llama {
    pub config: LlamaConfig,
    device: Device,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// Bytes of weights as held in memory (after any repack).
    pub weight_bytes: u64,
    dense_from_rows: usize,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish()
    }
}

/// Where KV blocks live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvMemory {
    /// Plain host memory, read directly by the CPU attention kernels (the CPU default).
    Host,
    /// Tensors on the model's device, attended with candle ops (the GPU default; on the CPU
    /// only for testing that path).
    Device,
}

/// Every KV block of an engine: `blocks` blocks of [`BLOCK_TOKENS`] positions for all layers.
pub struct KvStore {
    memory: BlockMemory,
    blocks: usize,
    bytes_per_block: u64,
}

enum BlockMemory {
    Host(HostBlocks),
    /// Per block, per layer keys and values `(n_head_kv, BLOCK_TOKENS, head_dim)`; allocated
    /// on first write.
    Device {
        blocks: Vec<Option<DeviceBlock>>,
        device: Device,
        shape: (usize, usize, usize),
    },
}

struct DeviceBlock {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("blocks", &self.blocks)
            .field("bytes_per_block", &self.bytes_per_block)
            .finish()
    }
}

impl KvStore {
    /// Blocks the store can hold.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Positions per block.
    pub fn block_tokens(&self) -> usize {
        BLOCK_TOKENS
    }

    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_block
    }

    fn device_block(&mut self, block: u32, n_layer: usize) -> Result<&mut DeviceBlock, ModelError> {
        let BlockMemory::Device {
            blocks,
            device,
            shape,
        } = &mut self.memory
        else {
            return Err(ModelError::Invalid("kv store: not a device store".into()));
        };
        let slot = blocks
            .get_mut(block as usize)
            .ok_or_else(|| ModelError::Invalid(format!("kv block {block} outside the store")))?;
        if slot.is_none() {
            let mut k = Vec::with_capacity(n_layer);
            let mut v = Vec::with_capacity(n_layer);
            for _ in 0..n_layer {
                k.push(Tensor::zeros(*shape, DType::F32, device)?);
                v.push(Tensor::zeros(*shape, DType::F32, device)?);
            }
            *slot = Some(DeviceBlock { k, v });
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    /// Writes `k`, `v` (`(n_kv, t, head_dim)`) of positions `pos0..pos0 + t` of the sequence
    /// whose blocks are `table` into their device blocks.
    fn device_write(
        &mut self,
        table: &[u32],
        layer: usize,
        n_layer: usize,
        pos0: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), ModelError> {
        let t = k.dim(1)?;
        let mut p = pos0;
        while p < pos0 + t {
            let off = p % BLOCK_TOKENS;
            let n = (BLOCK_TOKENS - off).min(pos0 + t - p);
            let block = self.device_block(table[p / BLOCK_TOKENS], n_layer)?;
            block.k[layer].slice_set(&k.narrow(1, p - pos0, n)?.contiguous()?, 1, off)?;
            block.v[layer].slice_set(&v.narrow(1, p - pos0, n)?.contiguous()?, 1, off)?;
            p += n;
        }
        Ok(())
    }

    /// Keys and values `(n_kv, len, head_dim)` of the first `len` positions at `layer`.
    fn device_read(
        &self,
        table: &[u32],
        layer: usize,
        len: usize,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let BlockMemory::Device { blocks, .. } = &self.memory else {
            return Err(ModelError::Invalid("kv store: not a device store".into()));
        };
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for &b in &table[..len.div_ceil(BLOCK_TOKENS)] {
            let block = blocks[b as usize]
                .as_ref()
                .ok_or_else(|| ModelError::Invalid(format!("kv block {b} read before written")))?;
            ks.push(&block.k[layer]);
            vs.push(&block.v[layer]);
        }
        let k = Tensor::cat(&ks, 1)?.narrow(1, 0, len)?;
        let v = Tensor::cat(&vs, 1)?.narrow(1, 0, len)?;
        Ok((k, v))
    }

    /// Bytes of block memory allocated so far (blocks are allocated on first write).
    pub fn allocated_bytes(&self) -> u64 {
        match &self.memory {
            BlockMemory::Host(h) => h.allocated_bytes(),
            BlockMemory::Device { blocks, .. } => {
                blocks.iter().filter(|b| b.is_some()).count() as u64 * self.bytes_per_block
            }
        }
    }
}

/// One sequence's view of the KV store: the blocks holding its positions, in order, and how
/// many positions are filled. The table covers the sequence's whole budget (prompt +
/// max_tokens), reserved at admission, so a decode step never allocates and the budget is
/// exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqCache {
    table: Vec<u32>,
    len: usize,
}

impl SeqCache {
    /// A sequence over `table` whose first `len` positions are already in those blocks (a
    /// cached prefix), `len` a multiple of [`BLOCK_TOKENS`] unless 0.
    pub fn new(table: Vec<u32>, len: usize) -> Self {
        Self { table, len }
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the sequence's blocks hold.
    pub fn capacity(&self) -> usize {
        self.table.len() * BLOCK_TOKENS
    }

    /// The blocks, in position order.
    pub fn table(&self) -> &[u32] {
        &self.table
    }
}

/// Rows (tokens) from which a weight multiplies as dequantized f32 by default (see
/// [`Linear::forward`]): below, dequantizing every weight for the call costs more than the dense
/// GEMM saves. Measured on SmolLM2 (2 threads, `switchyard-bench engine`, TTFT of a whole
/// prompt, two alternated runs, 2026-12-05, after the quantized kernel stopped transposing its
/// result on one thread), quantized vs dense: 128 tokens 0.32 vs 0.46-0.53 s, 192 tokens
/// 0.48-0.49 vs 0.55-0.63 s, 256 tokens 0.64-0.66 vs 0.66-0.70 s, 384 tokens 1.0-1.2 vs
/// 0.91-0.97 s, 512 tokens 1.38-1.45 vs 1.16-1.29 s. (Before that change the crossover was 128
/// rows.)
pub const DENSE_FROM_ROWS: usize = 256;

fn linear(
    file: &mut GgufFile,
    name: &str,
    dev: &Device,
    repack: Repack,
) -> Result<Linear, ModelError> {
    Linear::new(file.tensor(name, dev, repack)?)
}

fn dense(file: &mut GgufFile, name: &str, dev: &Device) -> Result<Tensor, ModelError> {
    let t = file.tensor(name, dev, Repack::None)?;
    Ok(t.dequantize(dev)?)
}

impl Llama {
    /// Loads every weight of `file` onto `device`.
    pub fn load(file: &mut GgufFile, device: &Device, repack: Repack) -> Result<Self, ModelError> {
        let config = file.llama_config()?;
        let embed = file.tensor("token_embd.weight", device, Repack::None)?;
        let (rows, cols) = embed.shape().dims2()?;
        if rows != config.vocab_size || cols != config.n_embd {
            return Err(ModelError::Invalid(format!(
                "gguf tensor `token_embd.weight`: shape ({rows}, {cols}) does not match vocab {} × embedding {}",
                config.vocab_size, config.n_embd
            )));
        }
        let embed = match cpu_matrix(&embed)? {
            Some(m) => Embedding::Cpu(Arc::new(m)),
            None => Embedding::Candle(Arc::new(embed)),
        };
        let mut weight_bytes = 0;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("blk.{i}");
            let layer = Layer {
                attn_norm: dense(file, &format!("{p}.attn_norm.weight"), device)?,
                qkv: Projection::new(vec![
                    linear(file, &format!("{p}.attn_q.weight"), device, repack)?,
                    linear(file, &format!("{p}.attn_k.weight"), device, repack)?,
                    linear(file, &format!("{p}.attn_v.weight"), device, repack)?,
                ]),
                wo: linear(file, &format!("{p}.attn_output.weight"), device, repack)?,
                ffn_norm: dense(file, &format!("{p}.ffn_norm.weight"), device)?,
                gate_up: Projection::new(vec![
                    linear(file, &format!("{p}.ffn_gate.weight"), device, repack)?,
                    linear(file, &format!("{p}.ffn_up.weight"), device, repack)?,
                ]),
                w_down: linear(file, &format!("{p}.ffn_down.weight"), device, repack)?,
            };
            layers.push(layer);
        }
        let norm = dense(file, "output_norm.weight", device)?;
        // Tied embeddings (SmolLM2 has no `output.weight`): the head reuses the embedding.
        let lm_head = if file.has_tensor("output.weight") {
            let head = linear(file, "output.weight", device, repack)?;
            weight_bytes += head.bytes();
            head
        } else {
            match &embed {
                Embedding::Cpu(m) => Linear::Cpu(m.clone()),
                Embedding::Candle(t) => Linear::Candle(QMatMul::from_arc(t.clone())?),
            }
        };
        weight_bytes += match &embed {
            Embedding::Cpu(m) => m.bytes(),
            Embedding::Candle(t) => t.storage_size_in_bytes() as u64,
        };
        for l in &layers {
            weight_bytes += l.qkv.bytes() + l.gate_up.bytes() + l.wo.bytes() + l.w_down.bytes();
        }

        // Rotary tables for every position the model was trained on.
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_freq_base
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, config.context_length as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.context_length, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?,
            sin: freqs.sin()?,
            config,
            device: device.clone(),
            embed,
            layers,
            norm,
            lm_head,
            weight_bytes,
            dense_from_rows: DENSE_FROM_ROWS,
        })
    }

    /// Multiplies prompt chunks of at least `rows` tokens by dequantized f32 weights (the
    /// dense path; [`DENSE_FROM_ROWS`] by default, `usize::MAX` keeps every matmul quantized).
    /// Faster for long cold prompts on a CPU, but the two paths round differently (dense skips
    /// quantizing the activations), so with it a greedy answer depends on how its prompt was
    /// split into steps: cached or not, chunked, moved.
    pub fn with_dense_from_rows(mut self, rows: usize) -> Self {
        self.dense_from_rows = rows.max(1);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of KV one block holds (all layers).
    pub fn kv_bytes_per_block(&self) -> u64 {
        self.config.kv_bytes_per_token() * BLOCK_TOKENS as u64
    }

    /// A store of `blocks` KV blocks in the device's natural memory (host memory on the CPU).
    pub fn kv_store(&self, blocks: usize) -> KvStore {
        let memory = if self.device.is_cpu() {
            KvMemory::Host
        } else {
            KvMemory::Device
        };
        self.kv_store_in(blocks, memory)
    }

    /// A store of `blocks` KV blocks in `memory`.
    pub fn kv_store_in(&self, blocks: usize, memory: KvMemory) -> KvStore {
        let c = &self.config;
        let memory = match memory {
            KvMemory::Host => {
                BlockMemory::Host(HostBlocks::new(c.n_layer, c.n_head_kv, c.head_dim, blocks))
            }
            KvMemory::Device => BlockMemory::Device {
                blocks: (0..blocks).map(|_| None).collect(),
                device: self.device.clone(),
                shape: (c.n_head_kv, BLOCK_TOKENS, c.head_dim),
            },
        };
        KvStore {
            memory,
            blocks,
            bytes_per_block: self.kv_bytes_per_block(),
        }
    }

    /// A store holding exactly one empty sequence of up to `capacity` tokens (tools, tests and
    /// warm-up; the engine shares one store among all its sequences).
    pub fn single_sequence(&self, capacity: usize) -> Result<(KvStore, SeqCache), ModelError> {
        if capacity == 0 || capacity > self.config.context_length {
            return Err(ModelError::Invalid(format!(
                "kv capacity {capacity} outside 1..={} (context length)",
                self.config.context_length
            )));
        }
        let blocks = capacity.div_ceil(BLOCK_TOKENS);
        let store = self.kv_store(blocks);
        Ok((store, SeqCache::new((0..blocks as u32).collect(), 0)))
    }

    /// Runs `tokens` of one sequence (a prompt or a chunk of it) through the model, appending
    /// them to `cache`; returns the logits of the last token, `(vocab,)`.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut SeqCache,
        store: &mut KvStore,
    ) -> Result<Tensor, ModelError> {
        self.prefill_unless(tokens, cache, store, || false, Logits::LastToken)
    }

    /// [`Llama::prefill`] with the chosen [`Logits`], given up between two layers once
    /// `abandoned` says so (see [`Llama::forward`]).
    pub fn prefill_unless(
        &self,
        tokens: &[u32],
        cache: &mut SeqCache,
        store: &mut KvStore,
        abandoned: impl Fn() -> bool,
        logits: Logits,
    ) -> Result<Tensor, ModelError> {
        let chunk = Chunk {
            tokens,
            cache,
            logits,
        };
        let mut out = self.forward(&mut [chunk], store, abandoned)?;
        Ok(out.remove(0))
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next input of the
    /// sequence whose cache is `caches[i]`. Returns logits `(batch, vocab)`.
    pub fn decode(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SeqCache],
        store: &mut KvStore,
    ) -> Result<Tensor, ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Invalid(format!(
                "decode: {} tokens for {} caches",
                tokens.len(),
                caches.len()
            )));
        }
        let mut chunks: Vec<Chunk<'_>> = tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(token, cache)| Chunk {
                tokens: std::slice::from_ref(token),
                cache,
                logits: Logits::LastToken,
            })
            .collect();
        Ok(Tensor::stack(
            &self.forward(&mut chunks, store, || false)?,
            0,
        )?)
    }

    /// One forward pass over several sequences' new tokens at once — a decode step (one token
    /// each), prompt chunks, or both — appending each chunk to its sequence's cache. Every
    /// weight multiplies all the rows in one matmul; only attention, which reads each
    /// sequence's own blocks, is per sequence, so sequences packed into one pass share its
    /// fixed cost (every weight read once, one output head call).
    ///
    /// Returns one output per chunk, as its [`Logits`] asks. Once `abandoned` says so between
    /// two layers it gives up ([`ModelError::Abandoned`], every cache as it was): a chunk deep
    /// in a long context takes seconds on a CPU, and a cancel must not wait for all of it.
    pub fn forward(
        &self,
        chunks: &mut [Chunk<'_>],
        store: &mut KvStore,
        abandoned: impl Fn() -> bool,
    ) -> Result<Vec<Tensor>, ModelError> {
        if chunks.is_empty() {
            return Err(ModelError::Invalid("forward: no sequences".into()));
        }
        for chunk in chunks.iter() {
            let end = chunk.cache.len + chunk.tokens.len();
            if chunk.tokens.is_empty() {
                return Err(ModelError::Invalid(
                    "forward: a sequence with no tokens".into(),
                ));
            }
            if end > chunk.cache.capacity() {
                return Err(ModelError::Invalid(format!(
                    "forward: {end} tokens exceed the sequence's kv capacity {}",
                    chunk.cache.capacity()
                )));
            }
        }
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let ids: Vec<u32> = chunks.iter().flat_map(|c| c.tokens).copied().collect();
        let rows = ids.len();
        let positions: Vec<u32> = chunks
            .iter()
            .flat_map(|c| (c.cache.len..c.cache.len + c.tokens.len()).map(|p| p as u32))
            .collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        // Every row is its own rotary "batch" at its own position.
        let cos = self
            .cos
            .index_select(&positions, 0)?
            .reshape((rows, 1, hd / 2))?;
        let sin = self
            .sin
            .index_select(&positions, 0)?
            .reshape((rows, 1, hd / 2))?;
        let mut x = self.embed.lookup(&ids, &self.device)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // What this pass wrote to the caches so far lies past each `cache.len`, which is
            // only advanced at the end: giving up leaves every sequence as it was.
            if abandoned() {
                return Err(ModelError::Abandoned);
            }
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let [q, k, v] = layer.qkv.forward(&h, self.dense_from_rows)?;
            let q = candle_nn::rotary_emb::rope_i(&q.reshape((rows, nh, 1, hd))?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k.reshape((rows, nkv, 1, hd))?, &cos, &sin)?;
            let v = v.reshape((rows, nkv, 1, hd))?;
            let o = match &mut store.memory {
                BlockMemory::Host(kv) => {
                    let (k, v) = (host(&k)?, host(&v)?);
                    let step = nkv * hd;
                    let mut row0 = 0;
                    for chunk in chunks.iter() {
                        let t = chunk.tokens.len();
                        let at = row0 * step..(row0 + t) * step;
                        kv.write(
                            &chunk.cache.table,
                            l,
                            chunk.cache.len,
                            t,
                            &k[at.clone()],
                            &v[at],
                        );
                        row0 += t;
                    }
                    let spans: Vec<Span<'_>> = chunks
                        .iter()
                        .map(|c| Span {
                            table: &c.cache.table,
                            pos0: c.cache.len,
                            t: c.tokens.len(),
                        })
                        .collect();
                    let scale = 1.0 / (hd as f32).sqrt();
                    let o = attention(kv, &spans, l, &host(&q)?, nh, scale);
                    Tensor::from_vec(o, (rows, nh * hd), &self.device)?
                }
                BlockMemory::Device { .. } => {
                    self.device_attention(l, chunks, &q, &k, &v, store)?
                }
            };
            x = (x + layer.wo.forward(&o, self.dense_from_rows)?)?;
            x = self.ffn(layer, x)?;
        }
        let mut row0 = 0;
        for chunk in chunks.iter_mut() {
            chunk.cache.len += chunk.tokens.len();
        }
        // Rows for the output head: each chunk's last, or all of a scored chunk's.
        let mut head_rows = Vec::new();
        let mut outputs = Vec::with_capacity(chunks.len());
        for chunk in chunks.iter() {
            let t = chunk.tokens.len();
            outputs.push(match chunk.logits {
                Logits::LastToken => {
                    head_rows.push(x.narrow(0, row0 + t - 1, 1)?);
                    None
                }
                Logits::EveryToken => {
                    head_rows.push(x.narrow(0, row0, t)?);
                    None
                }
                Logits::HiddenSum => {
                    let hidden = x.narrow(0, row0, t)?;
                    let hidden = candle_nn::ops::rms_norm(&hidden, &self.norm, c.rms_eps as f32)?;
                    Some(hidden.to_dtype(DType::F32)?.sum(0)?)
                }
            });
            row0 += t;
        }
        let logits = match head_rows.len() {
            0 => None,
            _ => {
                let rows = Tensor::cat(&head_rows, 0)?;
                let rows = candle_nn::ops::rms_norm(&rows, &self.norm, c.rms_eps as f32)?;
                // Last tokens are the quantized kernel's; a scored chunk's rows, like the
                // layers', may be dense.
                let scored = chunks.iter().any(|c| c.logits == Logits::EveryToken);
                let dense_from_rows = if scored {
                    self.dense_from_rows
                } else {
                    usize::MAX
                };
                Some(self.lm_head.forward(&rows, dense_from_rows)?)
            }
        };
        let mut row = 0;
        chunks
            .iter()
            .zip(outputs)
            .map(|(chunk, pooled)| {
                if let Some(pooled) = pooled {
                    return Ok(pooled);
                }
                let logits = logits
                    .as_ref()
                    .expect("a head row for every chunk without one");
                Ok(match chunk.logits {
                    Logits::EveryToken => {
                        let t = chunk.tokens.len();
                        row += t;
                        logits.narrow(0, row - t, t)?
                    }
                    _ => {
                        row += 1;
                        logits.get(row - 1)?
                    }
                })
            })
            .collect()
    }

    /// Attention over KV blocks on the device: each chunk's keys and values (`k`, `v`:
    /// `(rows, n_kv, 1, head_dim)`, rows packed chunk after chunk) written to its blocks, its
    /// query heads `q` (`(rows, n_head, 1, head_dim)`) attended over them, causally within the
    /// chunk. Returns `(rows, n_head × head_dim)`.
    fn device_attention(
        &self,
        layer: usize,
        chunks: &[Chunk<'_>],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        store: &mut KvStore,
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let g = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        // (t, heads, 1, hd) rows of one chunk → (heads, t, hd).
        let heads = |x: &Tensor, row0: usize, t: usize, n: usize| -> Result<Tensor, ModelError> {
            Ok(x.narrow(0, row0, t)?
                .reshape((t, n, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let mut outs = Vec::with_capacity(chunks.len());
        let mut row0 = 0;
        for chunk in chunks {
            let (t, pos0) = (chunk.tokens.len(), chunk.cache.len);
            let total = pos0 + t;
            let table = &chunk.cache.table;
            store.device_write(
                table,
                layer,
                c.n_layer,
                pos0,
                &heads(k, row0, t, nkv)?,
                &heads(v, row0, t, nkv)?,
            )?;
            let (keys, values) = store.device_read(table, layer, total)?;
            // Grouped-query attention without repeating KV: the g query heads of one KV head
            // form one (g·t)-row matmul against that head's keys.
            let qc = heads(q, row0, t, nh)?.reshape((nkv, g * t, hd))?;
            let att = (qc.matmul(&keys.t()?)? * scale)?;
            let att = if t > 1 {
                // Causal: new token i sees cached positions up to pos0 + i.
                let mask: Vec<f32> = (0..t)
                    .flat_map(|i| {
                        (0..total).map(move |j| if j > pos0 + i { f32::NEG_INFINITY } else { 0.0 })
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
                att.reshape((nkv, g, t, total))?.broadcast_add(&mask)?
            } else {
                att
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((nkv, g * t, total))?;
            outs.push(
                att.matmul(&values)?
                    .reshape((nh, t, hd))?
                    .transpose(0, 1)?
                    .reshape((t, nh * hd))?,
            );
            row0 += t;
        }
        Ok(Tensor::cat(&outs, 0)?)
    }

    fn ffn(&self, layer: &Layer, x: Tensor) -> Result<Tensor, ModelError> {
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.config.rms_eps as f32)?;
        let [gate, up] = layer.gate_up.forward(&h, self.dense_from_rows)?;
        let gate = candle_nn::ops::silu(&gate)?;
        Ok((x + layer.w_down.forward(&(gate * up)?, self.dense_from_rows)?)?)
    }
}

/// One sequence's part of a [`Llama::forward`] pass: its new `tokens`, appended to `cache`,
/// and the output wanted for them.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub logits: Logits,
}

/// A tensor's values, row-major.
fn host(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
}

/// Which logits a prefill returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last token's, `(vocab,)`: what generation needs.
    LastToken,
    /// Every token's, `(tokens, vocab)`: what scoring a prompt needs.
    EveryToken,
    /// No logits: the sum of the tokens' final hidden states (after the output norm, before
    /// the output head), `(hidden,)` — what a mean-pooled embedding adds up chunk by chunk.
    HiddenSum,
}

/// Argmax of a logits row.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, v) in logits.iter().enumerate() {
        if *v > best_v {
            best_v = *v;
            best = i;
        }
    }
    best as u32
}

/// Convenience for tests and tools: logits tensor → `Vec<f32>` rows.
pub fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>, ModelError> {
    let logits = logits.to_dtype(DType::F32)?;
    Ok(match logits.rank() {
        1 => vec![logits.to_vec1()?],
        _ => logits.flatten_to(D::Minus2)?.to_vec2()?,
    })
}
