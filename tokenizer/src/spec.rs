//! The portable description of a tokenizer, and its wire form.

use serde::{Deserialize, Serialize};

use crate::TokenizerError;

/// The layout of [`TokenizerSpec::to_bytes`] (the `format` of a `TokenizerSpec` message): the
/// spec as JSON. A reader refuses any other format rather than tokenize differently.
pub const SPEC_FORMAT: &str = "switchyard-bpe-v1";

/// GGUF token types (`tokenizer.ggml.token_type`, llama.cpp's `llama_token_type`) that change
/// how a token is matched or rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Ordinary vocabulary entry (type 1, and every type not listed here).
    Normal,
    /// Control token such as `<|im_start|>` (type 3): matched whole, never rendered.
    Control,
    /// User-defined token (type 4): matched whole, rendered as its text.
    UserDefined,
}

impl TokenType {
    pub fn of(gguf_type: u32) -> Self {
        match gguf_type {
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            _ => TokenType::Normal,
        }
    }
}

/// Everything the tokenizer is built from: the `tokenizer.*` metadata of a GGUF file, with
/// defaults already applied (a missing token type list is all normal, a missing flag false).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`; only `gpt2` (byte-level BPE) is supported.
    pub model: String,
    /// `tokenizer.ggml.tokens`: the vocabulary in id order, in the byte-level alphabet.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`, one per token (see [`TokenType`]).
    pub token_types: Vec<u32>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs in priority order.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`: llama.cpp's name of the pre-tokenizer (split regex).
    pub pre: Option<String>,
    /// `tokenizer.ggml.add_space_prefix`.
    pub add_space_prefix: bool,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_id: Option<u32>,
    /// `tokenizer.chat_template` (Jinja).
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for TokenizerSpec {
    // The vocabulary and merges run to tens of thousands of entries: show their sizes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerSpec")
            .field("model", &self.model)
            .field("tokens", &self.tokens.len())
            .field("merges", &self.merges.len())
            .field("pre", &self.pre)
            .field("add_bos", &self.add_bos)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("eot_id", &self.eot_id)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

impl TokenizerSpec {
    /// The spec in [`SPEC_FORMAT`].
    pub fn to_bytes(&self) -> Vec<u8> {
        // Only strings, numbers and options: serialization cannot fail.
        serde_json::to_vec(self).expect("a tokenizer spec serializes to JSON")
    }

    /// Parses bytes in [`SPEC_FORMAT`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        serde_json::from_slice(bytes)
            .map_err(|e| TokenizerError::Spec(format!("not a {SPEC_FORMAT} spec: {e}")))
    }
}
