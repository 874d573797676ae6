//! A tiny random-weight llama GGUF of the same architecture as the real models, written with
//! candle's `gguf_file::write`. Tests and benches use it so they run in milliseconds without
//! the real model file. Weights mix Q8_0, Q4_0 and Q4_1 (every format of the CPU kernel) and F32 norms.

use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

/// Shape of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct TinySpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub context_length: usize,
    pub seed: u64,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            n_layer: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            n_ff: 128,
            context_length: 256,
            seed: 7,
        }
    }
}

/// The control tokens of the tiny vocabulary (ids 0, 1, 2), ChatML like SmolLM2.
pub const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Writes the tiny model to `path`.
pub fn write_tiny_llama(path: &Path, spec: TinySpec) -> candle_core::Result<()> {
    use gguf_file::Value;
    // Vocabulary: the specials, the 256 byte-level symbols, then a few merges.
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut bytes_chars: Vec<char> = Vec::new();
    {
        let mut bs: Vec<u32> = (33..=126).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        let mut pairs: Vec<(u32, u32)> = bs.into_iter().zip(cs).collect();
        pairs.sort();
        for (_, c) in pairs {
            bytes_chars.push(char::from_u32(c).unwrap_or('?'));
        }
    }
    tokens.extend(bytes_chars.iter().map(|c| c.to_string()));
    let merges = ["h e", "l l", "he ll", "hell o", "Ġ w"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let vocab = tokens.len();
    let mut types = vec![Value::I32(1); vocab];
    for t in types.iter_mut().take(TINY_SPECIALS.len()) {
        *t = Value::I32(3);
    }

    let mut state = spec.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let mut rand_tensor = |shape: (usize, usize), scale: f32| -> candle_core::Result<Tensor> {
        let n = shape.0 * shape.1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * 2.0 * scale
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    };
    let hd = spec.n_embd / spec.n_head;
    let kv = spec.n_head_kv * hd;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q = |t: Tensor, d: GgmlDType| QTensor::quantize(&t, d);
    tensors.push((
        "token_embd.weight".into(),
        q(rand_tensor((vocab, spec.n_embd), 1.0)?, GgmlDType::Q8_0)?,
    ));
    let ones = |n: usize| -> candle_core::Result<QTensor> {
        QTensor::quantize(
            &Tensor::ones((n,), candle_core::DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )
    };
    let s = 1.0 / (spec.n_embd as f32).sqrt();
    for l in 0..spec.n_layer {
        let p = format!("blk.{l}");
        tensors.push((format!("{p}.attn_norm.weight"), ones(spec.n_embd)?));
        tensors.push((format!("{p}.ffn_norm.weight"), ones(spec.n_embd)?));
        tensors.push((
            format!("{p}.attn_q.weight"),
            q(
                rand_tensor((spec.n_embd, spec.n_embd), s * 4.0)?,
                GgmlDType::Q4_1,
            )?,
        ));
        tensors.push((
            format!("{p}.attn_k.weight"),
            q(rand_tensor((kv, spec.n_embd), s * 4.0)?, GgmlDType::Q4_1)?,
        ));
        tensors.push((
            format!("{p}.attn_v.weight"),
            q(rand_tensor((kv, spec.n_embd), s)?, GgmlDType::Q8_0)?,
        ));
        tensors.push((
            format!("{p}.attn_output.weight"),
            q(rand_tensor((spec.n_embd, spec.n_embd), s)?, GgmlDType::Q4_0)?,
        ));
        tensors.push((
            format!("{p}.ffn_gate.weight"),
            q(rand_tensor((spec.n_ff, spec.n_embd), s)?, GgmlDType::Q4_1)?,
        ));
        tensors.push((
            format!("{p}.ffn_up.weight"),
            q(rand_tensor((spec.n_ff, spec.n_embd), s)?, GgmlDType::Q8_0)?,
        ));
        tensors.push((
            format!("{p}.ffn_down.weight"),
            q(
                rand_tensor((spec.n_embd, spec.n_ff), 1.0 / (spec.n_ff as f32).sqrt())?,
                GgmlDType::Q4_1,
            )?,
        ));
    }
    tensors.push(("output_norm.weight".into(), ones(spec.n_embd)?));

    let template = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String("tiny-random-llama".into())),
        ("llama.block_count", u32v(spec.n_layer)),
        ("llama.context_length", u32v(spec.context_length)),
        ("llama.embedding_length", u32v(spec.n_embd)),
        ("llama.feed_forward_length", u32v(spec.n_ff)),
        ("llama.attention.head_count", u32v(spec.n_head)),
        ("llama.attention.head_count_kv", u32v(spec.n_head_kv)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", u32v(vocab)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.chat_template", Value::String(template.into())),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path)?;
    gguf_file::write(&mut f, &md, &ts)
}
