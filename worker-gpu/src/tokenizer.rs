//! The model's tokenizer, chat template and streaming detokenizer, all built from GGUF metadata.
//!
//! Why not candle-core's `TokenizerFromGguf`: for SmolLM2 it adds a prefix space and groups
//! digits, so its ids differ from llama.cpp's (DESIGN §6 "tokenizer trap"). We build the same
//! byte-level BPE from `tokenizer.ggml.tokens`/`merges` but choose the pre-tokenizer from
//! `tokenizer.ggml.pre` the way llama.cpp does, honour `add_space_prefix = false`, and register
//! every control token (type 3) as a special token so `<|im_start|>` in a prompt is one id.
//!
//! Detokenization is our own byte table (token id → raw bytes), because streaming needs bytes:
//! one byte-level token can hold half of a UTF-8 character, and [`Detokenizer`] only ever emits
//! complete characters.

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// Errors building or using the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("gguf metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
}

/// llama.cpp's GPT-2 style split (`LLAMA_VOCAB_PRE_TYPE_GPT2` and friends).
const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// llama.cpp's llama3 split (digits in groups of up to three).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's qwen2 split (single digits).
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A chat message as the template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// The tokenizer of one GGUF model.
pub struct GgufTokenizer {
    inner: tokenizers::Tokenizer,
    /// Raw bytes of each token id (control tokens map to their literal text).
    token_bytes: Vec<Vec<u8>>,
    /// Control tokens: never rendered into generated text.
    control: HashSet<u32>,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    /// Ids that end a generation (EOS, plus `<|im_end|>`/`<|eot_id|>`-style end-of-turn tokens).
    stop_ids: HashSet<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("eos", &self.eos)
            .finish()
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, TokenizerError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| TokenizerError::Metadata {
            key: key.into(),
            reason: "missing".into(),
        })
}

fn meta_err(key: &str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Metadata {
        key: key.into(),
        reason: e.to_string(),
    }
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

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, TokenizerError> {
    meta(ct, key)?
        .to_vec()
        .map_err(|e| meta_err(key, e))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| meta_err(key, format!("element: {e}")))
        })
        .collect()
}

/// The GPT-2 byte-level alphabet: printable stand-in char → raw byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, u8::try_from(b).ok()?)))
        .collect()
}

fn split(regex: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    Split::new(
        SplitPattern::Regex(regex.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(Into::into)
    .map_err(|e| TokenizerError::Tokenizer(e.to_string()))
}

/// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre = pre` (llama-vocab.cpp).
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    // The regex does the splitting; ByteLevel only maps bytes (no prefix space, no own regex).
    let bytes: PreTokenizerWrapper = ByteLevel::new(false, false, false).into();
    let steps = match pre {
        // SmolLM, StarCoder, Refact, …: every digit on its own, then the GPT-2 split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            vec![Digits::new(true).into(), split(REGEX_GPT2)?, bytes]
        }
        "llama3" | "llama-bpe" | "smaug-bpe" | "dbrx" | "lfm2" => vec![split(REGEX_LLAMA3)?, bytes],
        "qwen2" | "deepseek-r1-qwen" => vec![split(REGEX_QWEN2)?, bytes],
        _ => vec![split(REGEX_GPT2)?, bytes],
    };
    Ok(Sequence::new(steps).into())
}

impl GgufTokenizer {
    /// Builds the tokenizer from the GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let model = meta(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| meta_err("tokenizer.ggml.model", e))?;
        if model != "gpt2" {
            return Err(meta_err(
                "tokenizer.ggml.model",
                format!("`{model}` is not supported (only byte-level BPE `gpt2`)"),
            ));
        }
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| meta_err("tokenizer.ggml.merges", format!("entry `{m}`")))
            })
            .collect::<Result<_, _>>()?;
        let types: Vec<u32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| meta_err("tokenizer.ggml.token_type", e))?
                .iter()
                .map(|v| v.to_i32().map(|t| t as u32).or_else(|_| v.to_u32()))
                .collect::<Result<_, _>>()
                .map_err(|e| meta_err("tokenizer.ggml.token_type", e))?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(meta_err(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        if let Some(space) = ct.metadata.get("tokenizer.ggml.add_space_prefix")
            && space.to_bool().unwrap_or(false)
        {
            return Err(meta_err(
                "tokenizer.ggml.add_space_prefix",
                "true is not supported for byte-level BPE",
            ));
        }

        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        inner.with_pre_tokenizer(Some(pre_tokenizer(pre)?));

        // Control (3) and user-defined (4) tokens are matched whole in the text, like
        // llama.cpp with `parse_special = true`.
        let control: HashSet<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3)
            .map(|(i, _)| i as u32)
            .collect();
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;

        let decoder = byte_decoder();
        let token_bytes = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if types[i] == 3 || types[i] == 4 {
                    return t.as_bytes().to_vec();
                }
                // A char outside the byte alphabet cannot occur in a byte-level vocab; keep
                // it as UTF-8 rather than failing the whole model.
                t.chars()
                    .flat_map(|c| match decoder.get(&c) {
                        Some(b) => vec![*b],
                        None => c.to_string().into_bytes(),
                    })
                    .collect()
            })
            .collect::<Vec<Vec<u8>>>();

        let named = |key: &str| {
            meta_u32(ct, key).and_then(|id| tokens.get(id as usize).map(|t| (id, t.clone())))
        };
        let bos = named("tokenizer.ggml.bos_token_id");
        let eos = named("tokenizer.ggml.eos_token_id");
        let mut stop_ids: HashSet<u32> = eos.iter().map(|(id, _)| *id).collect();
        if let Some(id) = meta_u32(ct, "tokenizer.ggml.eot_token_id") {
            stop_ids.insert(id);
        }
        // End-of-turn markers of common chat formats end a generation too (llama.cpp does the
        // same through its EOG set).
        for (i, t) in tokens.iter().enumerate() {
            if control.contains(&(i as u32))
                && matches!(
                    t.as_str(),
                    "<|im_end|>" | "<|eot_id|>" | "<|end|>" | "<end_of_turn>"
                )
            {
                stop_ids.insert(i as u32);
            }
        }
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let chat_template = ct
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Self {
            inner,
            token_bytes,
            control,
            bos,
            eos,
            stop_ids,
            add_bos,
            chat_template,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Ids that end a generation.
    pub fn stop_ids(&self) -> &HashSet<u32> {
        &self.stop_ids
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_ref().map(|(id, _)| *id)
    }

    /// Tokenizes `text`, parsing special tokens such as `<|im_start|>`; prepends BOS when the
    /// model asks for it (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if self.add_bos
            && let Some((bos, _)) = &self.bos
        {
            ids.push(*bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Renders `messages` with the model's chat template (ending with the assistant turn's
    /// header), or a plain `role: content` transcript when the GGUF has no template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        let Some(template) = &self.chat_template else {
            let mut out = String::new();
            for m in messages {
                out.push_str(&format!("{}: {}\n", m.role, m.content));
            }
            out.push_str("assistant:");
            return Ok(out);
        };
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template("chat", template)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos.as_ref().map(|(_, t)| t.as_str()).unwrap_or(""),
            eos_token => self.eos.as_ref().map(|(_, t)| t.as_str()).unwrap_or(""),
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }

    /// Raw bytes of a token as it appears in generated text (control tokens render as nothing).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        if self.control.contains(&id) {
            return &[];
        }
        self.token_bytes
            .get(id as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Decodes whole ids to text (lossy for invalid UTF-8), skipping control tokens.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|id| self.token_bytes(*id).iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Streaming detokenizer: feed ids one at a time, get back only complete UTF-8 text.
#[derive(Debug, Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// Adds one token and returns the text it completes (possibly empty while a multi-byte
    /// character is split across tokens).
    pub fn push(&mut self, tokenizer: &GgufTokenizer, id: u32) -> String {
        self.push_bytes(tokenizer.token_bytes(id))
    }

    /// Adds raw bytes; returns every complete character now available. Bytes that can never
    /// become valid UTF-8 are replaced by U+FFFD so the stream cannot stall on them.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still held at the end of a generation, lossily.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detokenizer_holds_split_characters() {
        let mut d = Detokenizer::default();
        let euro = "€".as_bytes();
        assert_eq!(d.push_bytes(&euro[..1]), "");
        assert_eq!(d.push_bytes(&euro[1..2]), "");
        assert_eq!(d.push_bytes(&[euro[2], b'a']), "€a");
        assert_eq!(d.push_bytes(&[0xff, b'b']), "\u{fffd}b");
        assert_eq!(d.push_bytes(&[0xe2]), "");
        assert_eq!(d.finish(), "\u{fffd}");
    }

    #[test]
    fn byte_alphabet_covers_all_bytes() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'Ċ'], b'\n');
    }
}
