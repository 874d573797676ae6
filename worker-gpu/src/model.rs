//! Our own llama forward pass over quantized weights (our CPU kernel, [`crate::qmatrix`], for
//! Q8_0/Q4_0/Q4_1 on the CPU; candle's `QMatMul` otherwise), written for serving:
//! the KV cache is a separate [`SeqCache`] per sequence owned by the engine (not by the model
//! object), so sequences join and leave independently, and [`Llama::decode`] runs one batched
//! forward over every active sequence (one matmul per weight per step; only attention, which
//! reads each sequence's own cache, is per sequence).
//!
//! Rotary embedding is the interleaved ("normal", `rope_i`) variant, because GGUF llama files
//! store Q/K rows permuted for it (llama.cpp's convert script does this).

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};

use crate::gguf::{GgufError, GgufFile, LlamaConfig, Repack};
use crate::host_attention::{HostKv, decode_attention, prompt_attention};
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

/// One sequence's KV cache: per layer, keys and values `(n_head_kv, capacity, head_dim)`,
/// allocated once at admission for the sequence's whole budget (prompt + max_tokens), so a
/// decode step never allocates cache memory and the admission budget is exact.
pub struct SeqCache {
    kv: KvStore,
    len: usize,
    capacity: usize,
    bytes: u64,
}

impl std::fmt::Debug for SeqCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqCache")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// Where a sequence's keys and values live.
enum KvStore {
    /// Per layer `(n_head_kv, capacity, head_dim)` tensors on the model's (GPU) device.
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
    /// Plain host memory, read directly by the CPU attention (decode and prompt).
    Host(HostKv),
}

impl SeqCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes this cache holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// Rows (tokens) from which a weight multiplies as dequantized f32 (see [`Linear::forward`]).
/// Measured on SmolLM2 (2 threads), whole prefill quantized vs dense: 64 tokens 0.39-0.49 s
/// both ways, 128 tokens 0.90 vs 0.65-0.69 s, 256 tokens 1.7-2.1 vs 1.0-1.1 s.
const DENSE_FROM_ROWS: usize = 64;

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

    /// Keeps every matmul quantized (`usize::MAX`) or moves the dense threshold: the two paths
    /// round differently (dense skips quantizing the activations), so tests that compare
    /// prefill with decode bit for bit pin one path.
    pub fn with_dense_from_rows(mut self, rows: usize) -> Self {
        self.dense_from_rows = rows.max(1);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A zeroed cache for up to `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> Result<SeqCache, ModelError> {
        if capacity == 0 || capacity > self.config.context_length {
            return Err(ModelError::Invalid(format!(
                "kv capacity {capacity} outside 1..={} (context length)",
                self.config.context_length
            )));
        }
        let c = &self.config;
        let kv = if self.device.is_cpu() {
            KvStore::Host(HostKv::new(c.n_layer, c.n_head_kv, capacity, c.head_dim))
        } else {
            let shape = (c.n_head_kv, capacity, c.head_dim);
            let mut k = Vec::with_capacity(c.n_layer);
            let mut v = Vec::with_capacity(c.n_layer);
            for _ in 0..c.n_layer {
                k.push(Tensor::zeros(shape, DType::F32, &self.device)?);
                v.push(Tensor::zeros(shape, DType::F32, &self.device)?);
            }
            KvStore::Device { k, v }
        };
        Ok(SeqCache {
            kv,
            len: 0,
            capacity,
            bytes: c.kv_bytes_per_token() * capacity as u64,
        })
    }

    /// Runs `tokens` of one sequence (a prompt or a chunk of it) through the model, appending
    /// them to `cache`; returns the logits of the last token, `(vocab,)`.
    pub fn prefill(&self, tokens: &[u32], cache: &mut SeqCache) -> Result<Tensor, ModelError> {
        let t = tokens.len();
        if t == 0 {
            return Err(ModelError::Invalid("prefill: no tokens".into()));
        }
        if cache.len + t > cache.capacity {
            return Err(ModelError::Invalid(format!(
                "prefill: {} tokens exceed the sequence's kv capacity {}",
                cache.len + t,
                cache.capacity
            )));
        }
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let g = nh / nkv;
        let pos0 = cache.len;
        let total = pos0 + t;
        let mut x = self.embed.lookup(tokens, &self.device)?;
        let cos = self.cos.narrow(0, pos0, t)?;
        let sin = self.sin.narrow(0, pos0, t)?;
        // Causal mask over (new token i, cached position j) for the device cache: j may not
        // exceed pos0 + i. (Host attention applies causality itself.)
        let mask = if t > 1 && matches!(cache.kv, KvStore::Device { .. }) {
            let m: Vec<f32> = (0..t)
                .flat_map(|i| {
                    (0..total).map(move |j| if j > pos0 + i { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (t, total), &self.device)?)
        } else {
            None
        };
        let scale = 1.0 / (hd as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let [q, k, v] = layer.qkv.forward(&h, self.dense_from_rows)?;
            let heads = |x: Tensor, n: usize| -> Result<Tensor, ModelError> {
                Ok(x.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (heads(q, nh)?, heads(k, nkv)?, heads(v, nkv)?);
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            if t == 1 && matches!(cache.kv, KvStore::Host(_)) {
                // Exactly the decode step's arithmetic, so a decode equals a 1-token prefill.
                let o = self.host_decode_attention(l, &q, &k, &v, &mut [&mut *cache])?;
                x = (x + layer.wo.forward(&o, self.dense_from_rows)?)?;
                x = self.ffn(layer, x)?;
                continue;
            }
            let o = match &mut cache.kv {
                KvStore::Device { k: ck, v: cv } => {
                    ck[l].slice_set(&k.squeeze(0)?, 1, pos0)?;
                    cv[l].slice_set(&v.squeeze(0)?, 1, pos0)?;
                    let (keys, values) = (ck[l].narrow(1, 0, total)?, cv[l].narrow(1, 0, total)?);
                    // Grouped-query attention without repeating KV: the g query heads of one
                    // KV head form one (g·t)-row matmul against that head's keys.
                    let q = q.reshape((nkv, g * t, hd))?;
                    let att = (q.matmul(&keys.t()?)? * scale)?;
                    let att = match &mask {
                        Some(m) => att.reshape((nkv, g, t, total))?.broadcast_add(m)?,
                        None => att,
                    };
                    let att =
                        candle_nn::ops::softmax_last_dim(&att)?.reshape((nkv, g * t, total))?;
                    att.matmul(&values)?
                        .reshape((nh, t, hd))?
                        .transpose(0, 1)?
                        .reshape((t, nh * hd))?
                }
                KvStore::Host(kv) => {
                    kv.write(l, pos0, t, &host(&k)?, &host(&v)?);
                    let o = prompt_attention(kv, l, &host(&q)?, pos0, t, nh, scale as f32);
                    Tensor::from_vec(o, (t, nh * hd), &self.device)?
                }
            };
            x = (x + layer.wo.forward(&o, self.dense_from_rows)?)?;
            x = self.ffn(layer, x)?;
        }
        cache.len = total;
        let last = x.narrow(0, t - 1, 1)?;
        let last = candle_nn::ops::rms_norm(&last, &self.norm, c.rms_eps as f32)?;
        Ok(self.lm_head.forward(&last, usize::MAX)?.squeeze(0)?)
    }

    /// Writes each sequence's new key and value (`k`, `v`: `(batch, n_kv, 1, head_dim)`) to
    /// its host cache and attends query heads `q` (`(batch, n_head, 1, head_dim)`) over it.
    fn host_decode_attention(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let (q, k, v) = (host(q)?, host(k)?, host(v)?);
        let step = c.n_head_kv * c.head_dim;
        let mut lens = Vec::with_capacity(caches.len());
        for (i, cache) in caches.iter_mut().enumerate() {
            let KvStore::Host(kv) = &mut cache.kv else {
                return Err(mixed_caches());
            };
            let row = i * step..(i + 1) * step;
            kv.write(layer, cache.len, 1, &k[row.clone()], &v[row]);
            lens.push(cache.len + 1);
        }
        let mut refs = Vec::with_capacity(caches.len());
        for cache in caches.iter() {
            let KvStore::Host(kv) = &cache.kv else {
                return Err(mixed_caches());
            };
            refs.push(kv);
        }
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let out = decode_attention(&refs, layer, &q, &lens, c.n_head, scale);
        Ok(Tensor::from_vec(
            out,
            (caches.len(), c.n_head * c.head_dim),
            &self.device,
        )?)
    }

    fn ffn(&self, layer: &Layer, x: Tensor) -> Result<Tensor, ModelError> {
        let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.config.rms_eps as f32)?;
        let [gate, up] = layer.gate_up.forward(&h, self.dense_from_rows)?;
        let gate = candle_nn::ops::silu(&gate)?;
        Ok((x + layer.w_down.forward(&(gate * up)?, self.dense_from_rows)?)?)
    }

    /// One decode step for several sequences at once: `tokens[i]` is the next input of the
    /// sequence whose cache is `caches[i]`. Returns logits `(batch, vocab)`.
    pub fn decode(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SeqCache],
    ) -> Result<Tensor, ModelError> {
        let b = tokens.len();
        if b == 0 || b != caches.len() {
            return Err(ModelError::Invalid(format!(
                "decode: {b} tokens for {} caches",
                caches.len()
            )));
        }
        for cache in caches.iter() {
            if cache.len >= cache.capacity {
                return Err(ModelError::Invalid(format!(
                    "decode: sequence kv cache full at {} tokens",
                    cache.capacity
                )));
            }
        }
        let c = &self.config;
        let (nh, nkv, hd) = (c.n_head, c.n_head_kv, c.head_dim);
        let g = nh / nkv;
        let mut x = self.embed.lookup(tokens, &self.device)?;
        let positions: Vec<u32> = caches.iter().map(|c| c.len as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let cos = self
            .cos
            .index_select(&positions, 0)?
            .reshape((b, 1, hd / 2))?;
        let sin = self
            .sin
            .index_select(&positions, 0)?
            .reshape((b, 1, hd / 2))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let host_caches = matches!(caches[0].kv, KvStore::Host(_));
        let mut outs = Vec::with_capacity(b);
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps as f32)?;
            let [q, k, v] = layer.qkv.forward(&h, self.dense_from_rows)?;
            let q = q.reshape((b, nh, 1, hd))?;
            let k = k.reshape((b, nkv, 1, hd))?;
            let v = v.reshape((b, nkv, 1, hd))?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            let o = if host_caches {
                self.host_decode_attention(l, &q, &k, &v, caches)?
            } else {
                outs.clear();
                for (i, cache) in caches.iter_mut().enumerate() {
                    let KvStore::Device { k: ck, v: cv } = &mut cache.kv else {
                        return Err(mixed_caches());
                    };
                    let pos = cache.len;
                    let total = pos + 1;
                    ck[l].slice_set(&k.get(i)?, 1, pos)?;
                    cv[l].slice_set(&v.get(i)?, 1, pos)?;
                    let keys = ck[l].narrow(1, 0, total)?;
                    let values = cv[l].narrow(1, 0, total)?;
                    let qi = q.get(i)?.reshape((nkv, g, hd))?;
                    let att = (qi.matmul(&keys.t()?)? * scale)?;
                    let att = candle_nn::ops::softmax_last_dim(&att)?;
                    outs.push(att.matmul(&values)?.reshape((1, nh * hd))?);
                }
                Tensor::cat(&outs, 0)?
            };
            x = (x + layer.wo.forward(&o, self.dense_from_rows)?)?;
            x = self.ffn(layer, x)?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, c.rms_eps as f32)?;
        self.lm_head.forward(&x, usize::MAX)
    }
}

fn mixed_caches() -> ModelError {
    ModelError::Invalid("decode: caches from different devices in one batch".into())
}

/// A tensor's values, row-major.
fn host(t: &Tensor) -> Result<Vec<f32>, ModelError> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?)
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
