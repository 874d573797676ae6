//! The model's tokenizer, built from GGUF metadata. Tokenizer, chat template and streaming
//! detokenizer live in `switchyard-tokenizer` (shared with the router); this module reads the
//! `tokenizer.*` metadata of a GGUF file into its [`TokenizerSpec`].

use candle_core::quantized::gguf_file;

pub use switchyard_tokenizer::*;

/// The shared tokenizer plus a constructor from GGUF metadata; everything else is the shared
/// tokenizer's (through `Deref`).
pub struct GgufTokenizer(switchyard_tokenizer::GgufTokenizer);

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Deref for GgufTokenizer {
    type Target = switchyard_tokenizer::GgufTokenizer;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from the GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, TokenizerError> {
        switchyard_tokenizer::GgufTokenizer::from_spec(spec_from_gguf(ct)?).map(Self)
    }

    /// The shared tokenizer.
    pub fn into_inner(self) -> switchyard_tokenizer::GgufTokenizer {
        self.0
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, TokenizerError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| TokenizerError::metadata(key, "missing"))
}

fn meta_u32(ct: &gguf_file::Content, key: &str) -> Option<u32> {
    use gguf_file::Value::*;
    match ct.metadata.get(key)? {
        U8(v) => Some(u32::from(*v)),
        U16(v) => Some(u32::from(*v)),
        U32(v) => Some(*v),
        I32(v) => u32::try_from(*v).ok(),
        U64(v) => u32::try_from(*v).ok(),
        I64(v) => u32::try_from(*v).ok(),
        _ => None,
    }
}

fn meta_bool(ct: &gguf_file::Content, key: &str) -> bool {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false)
}

fn meta_string(ct: &gguf_file::Content, key: &str) -> Option<String> {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    meta(ct, key)?
        .to_vec()
        .map_err(|e| TokenizerError::metadata(key, e))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| TokenizerError::metadata(key, format!("element: {e}")))
        })
        .collect()
}

/// Reads the tokenizer metadata of a GGUF file (defaults applied: no token types = all normal).
pub fn spec_from_gguf(ct: &gguf_file::Content) -> Result<TokenizerSpec, TokenizerError> {
    let model = meta(ct, "tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| TokenizerError::metadata("tokenizer.ggml.model", e))?
        .clone();
    let tokens = strings(ct, "tokenizer.ggml.tokens")?;
    let token_types: Vec<u32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| TokenizerError::metadata("tokenizer.ggml.token_type", e))?
            .iter()
            .map(|v| v.to_i32().map(|t| t as u32).or_else(|_| v.to_u32()))
            .collect::<Result<_, _>>()
            .map_err(|e| TokenizerError::metadata("tokenizer.ggml.token_type", e))?,
        None => vec![1; tokens.len()],
    };
    // Only byte-level BPE has merges; `from_spec` refuses other models with a clear reason.
    let merges = if model == "gpt2" {
        strings(ct, "tokenizer.ggml.merges")?
    } else {
        Vec::new()
    };
    Ok(TokenizerSpec {
        model,
        merges,
        tokens,
        token_types,
        pre: meta_string(ct, "tokenizer.ggml.pre"),
        add_space_prefix: meta_bool(ct, "tokenizer.ggml.add_space_prefix"),
        add_bos: meta_bool(ct, "tokenizer.ggml.add_bos_token"),
        bos_id: meta_u32(ct, "tokenizer.ggml.bos_token_id"),
        eos_id: meta_u32(ct, "tokenizer.ggml.eos_token_id"),
        eot_id: meta_u32(ct, "tokenizer.ggml.eot_token_id"),
        chat_template: meta_string(ct, "tokenizer.chat_template"),
    })
}
