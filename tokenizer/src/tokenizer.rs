//! The byte-level BPE tokenizer llama.cpp builds for a `gpt2`-model GGUF vocabulary.
//!
//! Why not candle-core's `TokenizerFromGguf`: for SmolLM2 it adds a prefix space and groups
//! digits, so its ids differ from llama.cpp's. We build the same byte-level BPE from the
//! vocabulary and merges but choose the pre-tokenizer from `tokenizer.ggml.pre` the way
//! llama.cpp does, honour `add_space_prefix = false`, and register every control token as a
//! special token so `<|im_start|>` in a prompt is one id.
//!
//! Detokenization is our own byte table (token id → raw bytes), because streaming needs bytes
//! (see [`crate::Detokenizer`]).

use std::collections::{HashMap, HashSet};

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::TokenizerError;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::spec::{TokenType, TokenizerSpec};

/// llama.cpp's GPT-2 style split (`LLAMA_VOCAB_PRE_TYPE_GPT2` and friends).
const REGEX_GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// llama.cpp's llama3 split (digits in groups of up to three).
const REGEX_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's qwen2 split (single digits).
const REGEX_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer of one model.
pub struct GgufTokenizer {
    spec: TokenizerSpec,
    inner: tokenizers::Tokenizer,
    /// Raw bytes of each token id (control tokens map to their literal text).
    token_bytes: Vec<Vec<u8>>,
    /// Control tokens: never rendered into generated text.
    control: HashSet<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Ids that end a generation (EOS, plus `<|im_end|>`/`<|eot_id|>`-style end-of-turn tokens).
    stop_ids: HashSet<u32>,
    template: ChatTemplate,
}

impl std::fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("vocab", &self.token_bytes.len())
            .field("eos", &self.eos)
            .finish()
    }
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
    /// Builds the tokenizer a spec describes.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Self, TokenizerError> {
        if spec.model != "gpt2" {
            return Err(TokenizerError::metadata(
                "tokenizer.ggml.model",
                format!(
                    "`{}` is not supported (only byte-level BPE `gpt2`)",
                    spec.model
                ),
            ));
        }
        let tokens = &spec.tokens;
        let types: Vec<TokenType> = spec.token_types.iter().map(|t| TokenType::of(*t)).collect();
        if types.len() != tokens.len() {
            return Err(TokenizerError::metadata(
                "tokenizer.ggml.token_type",
                format!("{} entries for {} tokens", types.len(), tokens.len()),
            ));
        }
        if spec.add_space_prefix {
            return Err(TokenizerError::metadata(
                "tokenizer.ggml.add_space_prefix",
                "true is not supported for byte-level BPE",
            ));
        }
        let merges: Vec<(String, String)> = spec
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        TokenizerError::metadata("tokenizer.ggml.merges", format!("entry `{m}`"))
                    })
            })
            .collect::<Result<_, _>>()?;

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
        inner.with_pre_tokenizer(Some(pre_tokenizer(
            spec.pre.as_deref().unwrap_or("default"),
        )?));

        // Control and user-defined tokens are matched whole in the text, like llama.cpp with
        // `parse_special = true`.
        let control: HashSet<u32> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t == TokenType::Control)
            .map(|(i, _)| i as u32)
            .collect();
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| **t != TokenType::Normal)
            .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;

        let decoder = byte_decoder();
        let token_bytes = tokens
            .iter()
            .zip(&types)
            .map(|(t, kind)| {
                if *kind != TokenType::Normal {
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

        // Special ids outside the vocabulary are ignored, as if absent.
        let named =
            |id: Option<u32>| id.and_then(|id| tokens.get(id as usize).map(|t| (id, t.as_str())));
        let bos = named(spec.bos_id);
        let eos = named(spec.eos_id);
        let mut stop_ids: HashSet<u32> = eos.iter().map(|(id, _)| *id).collect();
        stop_ids.extend(spec.eot_id);
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
        let template = ChatTemplate::new(
            spec.chat_template.as_deref(),
            bos.map_or("", |(_, t)| t),
            eos.map_or("", |(_, t)| t),
        );
        let (bos, eos) = (bos.map(|(id, _)| id), eos.map(|(id, _)| id));
        Ok(Self {
            spec,
            inner,
            token_bytes,
            control,
            bos,
            eos,
            stop_ids,
            template,
        })
    }

    /// What this tokenizer was built from (to publish it, see [`TokenizerSpec::to_bytes`]).
    pub fn spec(&self) -> &TokenizerSpec {
        &self.spec
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }

    /// Ids that end a generation.
    pub fn stop_ids(&self) -> &HashSet<u32> {
        &self.stop_ids
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Tokenizes `text`, parsing special tokens such as `<|im_start|>`; prepends BOS when the
    /// model asks for it (`tokenizer.ggml.add_bos_token`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 1);
        if self.spec.add_bos
            && let Some(bos) = self.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Renders `messages` with the model's chat template (ending with the assistant turn's
    /// header), or a plain `role: content` transcript when the model has no template.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        self.template.render(messages)
    }

    /// The prompt ids of a chat: [`Self::render_chat`], then [`Self::encode`].
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&self.render_chat(messages)?)
    }

    /// The prompt ids of a chat that may offer tools or hold tool calls and results, for a
    /// template without tool support: [`crate::tools::plain_messages`], then
    /// [`Self::encode_chat`].
    pub fn encode_chat_tools(
        &self,
        turns: &[crate::tools::ToolTurn],
        tools: &crate::tools::ToolSet,
    ) -> Result<Vec<u32>, TokenizerError> {
        self.encode_chat(&crate::tools::plain_messages(turns, tools))
    }

    /// Raw bytes of every token as the model's vocabulary spells it, control tokens
    /// included (their literal text), with which are control tokens: what a constrained
    /// decoder builds its token trie from.
    pub fn vocabulary(&self) -> impl Iterator<Item = (&[u8], bool)> {
        self.token_bytes
            .iter()
            .enumerate()
            .map(|(i, b)| (b.as_slice(), self.control.contains(&(i as u32))))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_covers_all_bytes() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'Ċ'], b'\n');
    }
}
