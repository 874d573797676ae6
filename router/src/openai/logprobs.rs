//! Log probabilities in OpenAI's two shapes: a chat completion's `logprobs.content` (one entry
//! per token, with its bytes and the most likely alternatives) and a text completion's parallel
//! arrays (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

use serde_json::{Map, Value, json};
use switchyard_proto::v1;

use super::handlers::Endpoint;

/// Renders the log probabilities of successive tokens of one generation, chunk after chunk
/// (a completion's `text_offset` runs on across chunks).
#[derive(Debug, Default)]
pub struct Logprobs {
    /// The bytes of every token so far: a token may end inside a character the next completes.
    bytes: Vec<u8>,
}

impl Logprobs {
    /// The `logprobs` object of a choice holding `tokens`.
    pub fn render(&mut self, endpoint: Endpoint, tokens: &[v1::TokenLogprobs]) -> Value {
        match endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = tokens.iter().map(chat_entry).collect();
                json!({"content": content, "refusal": Value::Null})
            }
            Endpoint::Completion => self.completion(&[], tokens),
        }
    }

    /// A text completion's `logprobs` for an echoed, scored `prompt` (its first token has
    /// nothing to predict it from: `null`, as OpenAI has it) followed by `tokens`.
    pub fn completion(
        &mut self,
        prompt: &[v1::TokenLogprobs],
        tokens: &[v1::TokenLogprobs],
    ) -> Value {
        let count = prompt.len() + tokens.len();
        let mut texts = Vec::with_capacity(count);
        let mut logprobs = Vec::with_capacity(count);
        let mut tops = Vec::with_capacity(count);
        let mut offsets = Vec::with_capacity(count);
        let unscored_first = (!prompt.is_empty()).then_some(0);
        for (i, token) in prompt.iter().chain(tokens).enumerate() {
            let chosen = token.chosen.clone().unwrap_or_default();
            // In characters of the completion's text, as OpenAI counts: a character counts
            // once it is complete.
            offsets.push(complete_chars(&self.bytes));
            self.bytes.extend_from_slice(&chosen.token);
            texts.push(Value::from(completion_token(&chosen.token)));
            if unscored_first == Some(i) {
                logprobs.push(Value::Null);
                tops.push(Value::Null);
                continue;
            }
            logprobs.push(json!(chosen.logprob));
            // Most likely first (the map keeps insertion order); two tokens with the same
            // text keep the likelier one.
            let mut top = Map::new();
            for t in &token.top {
                top.entry(completion_token(&t.token))
                    .or_insert_with(|| json!(t.logprob));
            }
            tops.push(Value::Object(top));
        }
        json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets})
    }
}

/// The text of a scored prompt: its tokens' bytes, as UTF-8.
pub fn prompt_text(prompt: &[v1::TokenLogprobs]) -> String {
    let bytes: Vec<u8> = prompt
        .iter()
        .flat_map(|t| {
            t.chosen
                .as_ref()
                .map(|c| c.token.clone())
                .unwrap_or_default()
        })
        .collect();
    text_of(&bytes)
}

/// A token's text: its bytes as UTF-8, a partial character shown as U+FFFD (the exact bytes
/// are in the chat form's `bytes`).
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A token in a text completion's lists, which have no `bytes`: its text when it is whole
/// UTF-8, else `bytes:` and its bytes escaped (`bytes:\xf0\x9f`), OpenAI's form, so tokens
/// holding different parts of a character stay different.
fn completion_token(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let escaped: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
            format!("bytes:{escaped}")
        }
    }
}

/// Characters in the longest whole-UTF-8 prefix of `bytes`.
fn complete_chars(bytes: &[u8]) -> usize {
    let whole = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(error) => std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default(),
    };
    whole.chars().count()
}

fn entry(token: &v1::TokenLogprob) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("token".into(), text_of(&token.token).into());
    entry.insert("logprob".into(), json!(token.logprob));
    entry.insert("bytes".into(), json!(token.token));
    entry
}

/// One token's entry in a chat completion's `logprobs.content` and a Responses
/// `output_text`'s `logprobs`: its text, log probability and bytes, and its alternatives'.
pub fn chat_entry(token: &v1::TokenLogprobs) -> Value {
    let mut chosen = entry(&token.chosen.clone().unwrap_or_default());
    let top: Vec<Value> = token.top.iter().map(|t| Value::Object(entry(t))).collect();
    chosen.insert("top_logprobs".into(), Value::Array(top));
    Value::Object(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, text: &[u8], logprob: f32) -> v1::TokenLogprob {
        v1::TokenLogprob {
            token_id: id,
            token: text.to_vec(),
            logprob,
        }
    }

    fn tokens() -> Vec<v1::TokenLogprobs> {
        vec![
            v1::TokenLogprobs {
                chosen: Some(token(1, b" Paris", -0.25)),
                top: vec![token(1, b" Paris", -0.25), token(2, b" Lyon", -2.5)],
            },
            v1::TokenLogprobs {
                // Half of a two-byte character.
                chosen: Some(token(3, &[0xc3], -1.0)),
                top: vec![],
            },
        ]
    }

    #[test]
    fn chat_lists_each_token_with_its_bytes_and_alternatives() {
        let rendered = Logprobs::default().render(Endpoint::Chat, &tokens());
        assert_eq!(
            rendered,
            json!({"content": [
                {"token": " Paris", "logprob": -0.25, "bytes": [32, 80, 97, 114, 105, 115],
                 "top_logprobs": [
                    {"token": " Paris", "logprob": -0.25, "bytes": [32, 80, 97, 114, 105, 115]},
                    {"token": " Lyon", "logprob": -2.5, "bytes": [32, 76, 121, 111, 110]}]},
                {"token": "\u{fffd}", "logprob": -1.0, "bytes": [195], "top_logprobs": []}],
                "refusal": null})
        );
    }

    #[test]
    fn completions_count_offsets_in_characters_and_name_partial_tokens_by_their_bytes() {
        // "é" split over two tokens, then "x": the split tokens are distinct, named by their
        // bytes; the offsets count characters once whole.
        let split = |bytes: &[u8]| v1::TokenLogprobs {
            chosen: Some(token(0, bytes, -1.0)),
            top: vec![token(0, bytes, -1.0), token(0, &[0xc3, 0xa8], -2.0)],
        };
        let rendered = Logprobs::default().render(
            Endpoint::Completion,
            &[split(&[0xc3]), split(&[0xa9]), split(b"x")],
        );
        assert_eq!(
            rendered["tokens"],
            json!(["bytes:\\xc3", "bytes:\\xa9", "x"])
        );
        assert_eq!(rendered["text_offset"], json!([0, 0, 1]));
        assert_eq!(
            rendered["top_logprobs"][0],
            json!({"bytes:\\xc3": -1.0, "è": -2.0})
        );
        // Written most likely first, as OpenAI lists them, whatever the keys' order.
        let order = |bytes: &[u8]| {
            let rendered = Logprobs::default().render(
                Endpoint::Completion,
                &[v1::TokenLogprobs {
                    chosen: Some(token(0, bytes, -0.5)),
                    top: vec![
                        token(0, b"z", -0.5),
                        token(1, b"a", -1.5),
                        token(2, b"z", -2.0),
                    ],
                }],
            );
            serde_json::to_string(&rendered["top_logprobs"][0]).expect("serialises")
        };
        assert_eq!(order(b"z"), r#"{"z":-0.5,"a":-1.5}"#);
    }

    #[test]
    fn completions_run_text_offsets_across_chunks() {
        let mut logprobs = Logprobs::default();
        let first = logprobs.render(Endpoint::Completion, &tokens()[..1]);
        assert_eq!(
            first,
            json!({"tokens": [" Paris"], "token_logprobs": [-0.25],
                "top_logprobs": [{" Paris": -0.25, " Lyon": -2.5}], "text_offset": [0]})
        );
        let second = logprobs.render(Endpoint::Completion, &tokens());
        assert_eq!(second["text_offset"], json!([6, 12]));
    }
}
