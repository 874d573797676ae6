//! A model's tokenizer, chat template and streaming detokenizer, built from a portable
//! [`TokenizerSpec`]: the tokenizer metadata of a GGUF file (vocabulary, merges, pre-tokenizer
//! name, special ids, chat template).
//!
//! The native engine builds its spec from the model file and publishes it to routers
//! (`Worker.GetTokenizer`), so a router turns a request into exactly the token ids the engine
//! would compute — the ids it hashes into KV block names for cache-aware placement and sends on
//! to the worker, which then does not tokenize again. No model weights, no candle: this crate is
//! light enough for the router.

mod chat;
mod detok;
mod spec;
mod tokenizer;
mod tool_wire;
pub mod tools;

pub use chat::ChatMessage;
pub use detok::Detokenizer;
pub use spec::{SPEC_FORMAT, TokenType, TokenizerSpec};
pub use tokenizer::GgufTokenizer;
pub use tool_wire::{WireToolError, uses_tools};

/// Text that may be encoded on an async runtime's thread: 2 KiB (~590 tokens) encodes in
/// ~0.4 ms with SmolLM2's tokenizer, 40 KiB in ~10 ms, 400 KiB in ~110 ms
/// (`cargo bench -p switchyard-worker-gpu --bench tokenize`); ~0.4 ms is about the longest a
/// task should hold one. Longer text goes to the blocking pool, in the router and the engine.
pub const ENCODE_INLINE_BYTES: usize = 2 * 1024;

/// Errors building or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer metadata value (named by its GGUF key) is missing or unusable.
    #[error("tokenizer metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    /// Serialized spec bytes that do not parse.
    #[error("tokenizer spec: {0}")]
    Spec(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
}

impl TokenizerError {
    /// A metadata error for GGUF key `key`.
    pub fn metadata(key: &str, reason: impl std::fmt::Display) -> Self {
        TokenizerError::Metadata {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}
