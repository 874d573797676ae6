//! Tool calling by constrained decoding: the answer is held to the generic tool format
//! ([`switchyard_tokenizer::tools::output_grammar`]) by masking, at every sampling step, the
//! tokens the grammar does not allow (llguidance computes the allowed set), and generated text
//! is split into text and call pieces by [`ToolCallParser`].
//!
//! The token environment (a trie of every token's bytes) is built once per model, on the first
//! request that offers tools; each such sequence then compiles its own grammar at `submit`, so
//! a grammar or schema the library refuses fails the request before any token. Requests
//! without tools never touch any of this.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use switchyard_proto::v1;
use switchyard_worker::engine::Tools;
use switchyard_worker::{EngineError, Message};

use crate::tokenizer::tools::{
    Parsed, ToolCallParser, ToolSet, ToolTurn, arguments_grammar, json_grammar, output_grammar,
};
use crate::tokenizer::{ChatMessage, Detokenizer, GgufTokenizer};

/// A request's tools in the tokenizer's terms, checked: every schema parses as a JSON object
/// and a named function is one of the tools.
pub fn tool_set(tools: &Tools) -> Result<ToolSet, EngineError> {
    ToolSet::from_wire(&tools.tools, Some(&tools.choice))
        .map_err(|e| EngineError::invalid_field(e.field, e.detail))
}

/// Whether a chat needs rewriting for a template without tool support: it offers tools or
/// holds calls or results.
pub fn needs_plain_messages(messages: &[Message], tools: &Tools) -> bool {
    crate::tokenizer::uses_tools(
        !tools.tools.is_empty(),
        messages
            .iter()
            .map(|m| (m.role.as_str(), !m.tool_calls.is_empty())),
    )
}

/// The messages the chat template renders for a chat with tools
/// ([`crate::tokenizer::tools::plain_messages`]).
pub fn plain_messages(messages: &[Message], tools: &ToolSet) -> Vec<ChatMessage> {
    let turns: Vec<ToolTurn> = messages
        .iter()
        .map(|m| ToolTurn::from_wire(&m.role, &m.content, &m.tool_calls, &m.tool_call_id))
        .collect();
    crate::tokenizer::tools::plain_messages(&turns, tools)
}

/// What compiles tool grammars for one model: its token trie, built once.
pub struct Grammars {
    factory: ParserFactory,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").finish_non_exhaustive()
    }
}

impl Grammars {
    /// The token environment of `tokenizer`: every token's bytes, control tokens marked as
    /// special (a grammar can never spell them by accident), and the model's end tokens as
    /// EOS, which the mask allows exactly when the grammar may end.
    pub fn new(tokenizer: &GgufTokenizer) -> Result<Self, String> {
        let words: Vec<Vec<u8>> = tokenizer
            .vocabulary()
            .map(|(bytes, control)| {
                if control {
                    let mut word = Vec::with_capacity(bytes.len() + 1);
                    word.push(TokTrie::SPECIAL_TOKEN_MARKER);
                    word.extend_from_slice(bytes);
                    word
                } else {
                    bytes.to_vec()
                }
            })
            .collect();
        let mut ends: Vec<u32> = tokenizer.stop_ids().iter().copied().collect();
        ends.sort_unstable();
        let eos = tokenizer
            .eos_id()
            .or(ends.first().copied())
            .ok_or("the model has no end-of-sequence token")?;
        if ends.is_empty() {
            ends.push(eos);
        }
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&ends);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        // Its warnings would go to stderr; a refused grammar is reported to the client.
        factory.quiet();
        Ok(Self { factory })
    }

    fn matcher(&self, grammar: &str) -> Result<Matcher, String> {
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_lark(grammar.to_string()))
            .map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(e) => Err(e),
            None => Ok(matcher),
        }
    }

    /// The constraint of one sequence offering `tools` (callable), fed the `resumed` tokens a
    /// previous worker delivered. A refused grammar names the tool whose schema it trips on.
    pub fn constraint(
        &self,
        tokenizer: &GgufTokenizer,
        tools: &ToolSet,
        id_prefix: &str,
        resumed: &[u32],
    ) -> Result<Constraint, EngineError> {
        let Some(grammar) = output_grammar(tools) else {
            return Err(EngineError::invalid_field(
                "tools",
                "nothing to call under tool_choice",
            ));
        };
        let mut matcher = self.matcher(&grammar).map_err(|e| {
            let culprit = tools
                .tools
                .iter()
                .position(|t| self.matcher(&arguments_grammar(t)).is_err());
            match culprit {
                Some(i) => EngineError::invalid_field(format!("tools[{i}].parameters_json"), e),
                None => EngineError::invalid_field("tools", e),
            }
        })?;
        let mut parser = ToolCallParser::new(tools, id_prefix);
        Self::resume(&mut matcher, tokenizer, resumed, |text| {
            let _ = parser.push(text);
        })?;
        Ok(Constraint {
            matcher,
            parser: Some(parser),
            mask_s: 0.0,
            masks: 0,
        })
    }

    /// The constraint of one sequence whose answer must be JSON (`response_format`: any object,
    /// or of its schema), fed the `resumed` tokens a previous worker delivered.
    pub fn json(
        &self,
        tokenizer: &GgufTokenizer,
        format: &v1::ResponseFormat,
        resumed: &[u32],
    ) -> Result<Constraint, EngineError> {
        use v1::response_format::Kind;
        let schema = match format.kind() {
            Kind::JsonSchema => serde_json::from_str(&format.schema_json).map_err(|e| {
                EngineError::invalid_field("sampling.response_format.schema_json", e.to_string())
            })?,
            Kind::JsonObject | Kind::Text => serde_json::json!({"type": "object"}),
        };
        let mut matcher = self
            .matcher(&json_grammar(&schema))
            .map_err(|e| EngineError::invalid_field("sampling.response_format.schema_json", e))?;
        Self::resume(&mut matcher, tokenizer, resumed, |_| {})?;
        Ok(Constraint {
            matcher,
            parser: None,
            mask_s: 0.0,
            masks: 0,
        })
    }

    /// Feeds the tokens a previous worker delivered to the grammar, and their text (the same
    /// the scheduler's detokenizer gives for them) to `text`.
    fn resume(
        matcher: &mut Matcher,
        tokenizer: &GgufTokenizer,
        resumed: &[u32],
        mut text: impl FnMut(&str),
    ) -> Result<(), EngineError> {
        if resumed.is_empty() {
            return Ok(());
        }
        matcher.consume_tokens(resumed).map_err(|e| {
            EngineError::InvalidArgument(format!(
                "resume_tokens: do not follow the answer's required format: {e}"
            ))
        })?;
        let mut detok = Detokenizer::default();
        for id in resumed {
            text(&detok.push(tokenizer, *id));
        }
        Ok(())
    }
}

/// The grammar state of one sequence, and its call parser when it may call tools (an answer
/// held to JSON is all text).
pub struct Constraint {
    matcher: Matcher,
    parser: Option<ToolCallParser>,
    /// Time spent computing masks and how many, for the per-token cost in logs.
    mask_s: f64,
    masks: u32,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("masks", &self.masks)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logits of tokens the grammar does not allow next to −∞, before any sampling
    /// step sees them (so penalties, temperature and the cuts work on the allowed tokens).
    pub fn mask(&mut self, row: &mut [f32]) -> Result<(), EngineError> {
        let started = std::time::Instant::now();
        let allowed = self
            .matcher
            // A grammar already complete (resumed tokens ended it) allows only the end.
            .compute_mask_or_eos()
            .map_err(|e| EngineError::Internal(format!("tool call grammar: {e}")))?;
        apply_mask(allowed.as_slice(), row);
        self.mask_s += started.elapsed().as_secs_f64();
        self.masks += 1;
        Ok(())
    }

    /// Advances the grammar past sampled token `id`.
    pub fn consume(&mut self, id: u32) -> Result<(), EngineError> {
        self.matcher
            .consume_token(id)
            .map_err(|e| EngineError::Internal(format!("tool call grammar: {e}")))
    }

    /// Whether the grammar allows nothing more: the answer is complete.
    pub fn complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn push(&mut self, text: &str) -> Vec<Parsed> {
        match &mut self.parser {
            Some(parser) => parser.push(text),
            None if text.is_empty() => Vec::new(),
            None => vec![Parsed::Text(text.to_string())],
        }
    }

    pub fn finish(&mut self) -> Vec<Parsed> {
        self.parser
            .as_mut()
            .map(ToolCallParser::finish)
            .unwrap_or_default()
    }

    pub fn called(&self) -> bool {
        self.parser.as_ref().is_some_and(ToolCallParser::called)
    }

    /// Mean mask computation time per token so far, µs.
    pub fn mask_us_per_token(&self) -> f64 {
        if self.masks == 0 {
            0.0
        } else {
            self.mask_s * 1e6 / f64::from(self.masks)
        }
    }
}

/// −∞ for every entry of `row` whose bit in `allowed` (32 tokens a word) is clear, and for
/// entries past the bits (a logits row padded beyond the vocabulary).
pub fn apply_mask(allowed: &[u32], row: &mut [f32]) {
    for (w, chunk) in row.chunks_mut(32).enumerate() {
        let bits = allowed.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (b, v) in chunk.iter_mut().enumerate() {
            if bits & (1 << b) == 0 {
                *v = f32::NEG_INFINITY;
            }
        }
    }
}

/// A call id prefix for a request: the same on every worker the request runs on (it comes
/// from the request id), so a resumed generation names its calls as the first worker did.
pub fn id_prefix(request_id: &str) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u32 = 0x811c_9dc5;
    for b in request_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}_")
}

/// The wire's piece of a call.
pub fn delta(piece: Parsed) -> Result<v1::ToolCallDelta, String> {
    match piece {
        Parsed::Call {
            index,
            id,
            name,
            arguments,
        } => Ok(v1::ToolCallDelta {
            index,
            id,
            name,
            arguments,
        }),
        Parsed::Text(text) => Err(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_keeps_allowed_tokens_only() {
        let mut row = vec![1.0f32; 70];
        let allowed = [0b101u32, u32::MAX];
        apply_mask(&allowed, &mut row);
        assert_eq!(row[0], 1.0);
        assert_eq!(row[1], f32::NEG_INFINITY);
        assert_eq!(row[2], 1.0);
        assert!(row[3..32].iter().all(|v| *v == f32::NEG_INFINITY));
        assert!(row[32..64].iter().all(|v| *v == 1.0));
        // Past the mask's words: not in the vocabulary, never allowed.
        assert!(row[64..].iter().all(|v| *v == f32::NEG_INFINITY));
    }

    #[test]
    fn id_prefixes_are_stable_and_differ_by_request() {
        assert_eq!(id_prefix("r-1"), id_prefix("r-1"));
        assert_ne!(id_prefix("r-1"), id_prefix("r-2"));
        assert_eq!(id_prefix("r-1").len(), 9);
    }
}
