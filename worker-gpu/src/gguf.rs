//! Reading llama-architecture GGUF files: hyper-parameters from the metadata (validated, with
//! the key at fault named) and weights as candle quantized tensors.
//!
//! Load-time repacking: Q8_0, Q4_0 and Q4_1 run on our own CPU kernel ([`crate::qmatrix`]);
//! Q5_0/Q5_1 would fall back to candle's scalar code, so they are re-quantized to Q8_0, which
//! keeps essentially all precision (8-bit codes for 5-bit ones) at 1.3× the bytes.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

/// Errors reading a GGUF model.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model file {path}: not a readable GGUF: {reason}")]
    Format { path: String, reason: String },
    #[error("gguf metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("model file {path}: tensor `{name}`: {reason}")]
    Tensor {
        path: String,
        name: String,
        reason: String,
    },
}

/// Hyper-parameters of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    /// Trained context length (`llama.context_length`).
    pub context_length: usize,
    pub rms_eps: f64,
    pub rope_freq_base: f32,
    /// Free-form model name from `general.name`.
    pub name: String,
}

impl LlamaConfig {
    /// Bytes of KV cache one token occupies (f32 keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> u64 {
        (2 * self.n_layer * self.n_head_kv * self.head_dim * std::mem::size_of::<f32>()) as u64
    }
}

/// How weights are kept in memory after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repack {
    /// As stored in the file.
    None,
    /// Formats without a vectorised CPU kernel (Q5_0, Q5_1) become Q8_0.
    Q8_0,
}

/// An opened GGUF file: metadata plus a reader for its tensors.
pub struct GgufFile {
    pub path: String,
    pub content: gguf_file::Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

fn get<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, GgufError> {
    ct.metadata.get(key).ok_or_else(|| GgufError::Metadata {
        key: key.into(),
        reason: "missing".into(),
    })
}

fn get_usize(ct: &gguf_file::Content, key: &str) -> Result<usize, GgufError> {
    let v = get(ct, key)?;
    let n = v
        .to_u32()
        .map(u64::from)
        .or_else(|_| v.to_u64())
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .map_err(|e| GgufError::Metadata {
            key: key.into(),
            reason: e.to_string(),
        })?;
    if n == 0 {
        return Err(GgufError::Metadata {
            key: key.into(),
            reason: "must be positive".into(),
        });
    }
    Ok(n as usize)
}

fn get_f32(ct: &gguf_file::Content, key: &str) -> Result<f32, GgufError> {
    get(ct, key)?.to_f32().map_err(|e| GgufError::Metadata {
        key: key.into(),
        reason: e.to_string(),
    })
}

impl GgufFile {
    /// Opens `path` and reads its metadata (not the weights).
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|source| GgufError::Io {
            path: shown.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| GgufError::Format {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path: shown,
            content,
            reader,
        })
    }

    /// The llama hyper-parameters, validated.
    pub fn llama_config(&self) -> Result<LlamaConfig, GgufError> {
        let ct = &self.content;
        let arch =
            get(ct, "general.architecture")?
                .to_string()
                .map_err(|e| GgufError::Metadata {
                    key: "general.architecture".into(),
                    reason: e.to_string(),
                })?;
        if arch != "llama" {
            return Err(GgufError::Metadata {
                key: "general.architecture".into(),
                reason: format!("`{arch}` is not supported (only `llama`)"),
            });
        }
        let n_embd = get_usize(ct, "llama.embedding_length")?;
        let n_head = get_usize(ct, "llama.attention.head_count")?;
        let n_head_kv = match ct.metadata.get("llama.attention.head_count_kv") {
            Some(_) => get_usize(ct, "llama.attention.head_count_kv")?,
            None => n_head,
        };
        if !n_embd.is_multiple_of(n_head) || !n_head.is_multiple_of(n_head_kv) {
            return Err(GgufError::Metadata {
                key: "llama.attention.head_count_kv".into(),
                reason: format!(
                    "{n_head_kv} kv heads do not divide {n_head} heads of width {n_embd}"
                ),
            });
        }
        let head_dim = n_embd / n_head;
        if !head_dim.is_multiple_of(2) {
            return Err(GgufError::Metadata {
                key: "llama.attention.head_count".into(),
                reason: format!("head width {head_dim} is odd; rotary embedding needs pairs"),
            });
        }
        let vocab_size = match ct.metadata.get("llama.vocab_size") {
            Some(_) => get_usize(ct, "llama.vocab_size")?,
            None => get(ct, "tokenizer.ggml.tokens")?
                .to_vec()
                .map(Vec::len)
                .map_err(|e| GgufError::Metadata {
                    key: "tokenizer.ggml.tokens".into(),
                    reason: e.to_string(),
                })?,
        };
        Ok(LlamaConfig {
            n_layer: get_usize(ct, "llama.block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: get_usize(ct, "llama.feed_forward_length")?,
            vocab_size,
            context_length: get_usize(ct, "llama.context_length")?,
            rms_eps: f64::from(get_f32(ct, "llama.attention.layer_norm_rms_epsilon")?),
            rope_freq_base: match ct.metadata.get("llama.rope.freq_base") {
                Some(_) => get_f32(ct, "llama.rope.freq_base")?,
                None => 10_000.0,
            },
            name: ct
                .metadata
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default(),
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads tensor `name` onto `device`, repacking it as `repack` asks.
    pub fn tensor(
        &mut self,
        name: &str,
        device: &Device,
        repack: Repack,
    ) -> Result<QTensor, GgufError> {
        let path = self.path.clone();
        let err = |reason: String| GgufError::Tensor {
            path: path.clone(),
            name: name.into(),
            reason,
        };
        // Read on the CPU first so a repack never round-trips through device memory.
        let t = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| err(e.to_string()))?;
        let t = match (repack, t.dtype()) {
            (Repack::Q8_0, GgmlDType::Q5_0 | GgmlDType::Q5_1)
                if t.shape().dims().last().is_some_and(|k| k % 32 == 0) =>
            {
                let f = t.dequantize(&Device::Cpu).map_err(|e| err(e.to_string()))?;
                QTensor::quantize(&f, GgmlDType::Q8_0).map_err(|e| err(e.to_string()))?
            }
            _ => t,
        };
        if device.is_cpu() {
            return Ok(t);
        }
        let f = t.dequantize(&Device::Cpu).map_err(|e| err(e.to_string()))?;
        QTensor::quantize_onto(&f, t.dtype(), device).map_err(|e| err(e.to_string()))
    }
}
