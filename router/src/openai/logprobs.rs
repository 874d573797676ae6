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
    /// Bytes of completion text before the next token.
    offset: usize,
}

impl Logprobs {
    /// The `logprobs` object of a choice holding `tokens`.
    pub fn render(&mut self, endpoint: Endpoint, tokens: &[v1::TokenLogprobs]) -> Value {
        match endpoint {
            Endpoint::Chat => {
                let content: Vec<Value> = tokens.iter().map(chat_entry).collect();
                json!({"content": content, "refusal": Value::Null})
            }
            Endpoint::Completion => {
                let mut texts = Vec::with_capacity(tokens.len());
                let mut logprobs = Vec::with_capacity(tokens.len());
                let mut tops = Vec::with_capacity(tokens.len());
                let mut offsets = Vec::with_capacity(tokens.len());
                for token in tokens {
                    let chosen = token.chosen.clone().unwrap_or_default();
                    let text = text_of(&chosen.token);
                    offsets.push(self.offset);
                    self.offset += text.len();
                    texts.push(Value::from(text));
                    logprobs.push(json!(chosen.logprob));
                    let top: Map<String, Value> = token
                        .top
                        .iter()
                        .map(|t| (text_of(&t.token), json!(t.logprob)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops,
                    "text_offset": offsets})
            }
        }
    }
}

/// A token's text: its bytes as UTF-8, a partial character shown as U+FFFD (the exact bytes
/// are in the chat form's `bytes`).
fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn entry(token: &v1::TokenLogprob) -> Map<String, Value> {
    let mut entry = Map::new();
    entry.insert("token".into(), text_of(&token.token).into());
    entry.insert("logprob".into(), json!(token.logprob));
    entry.insert("bytes".into(), json!(token.token));
    entry
}

fn chat_entry(token: &v1::TokenLogprobs) -> Value {
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
