//! The router's copy of each model's tokenizer, fetched from the workers that serve the model
//! (`Worker.GetTokenizer`), so a request becomes the exact token ids the engine would compute:
//! the router counts prompt tokens exactly for placement, names the prompt's KV blocks, and
//! sends the ids on (`WorkerStart.prompt_token_ids`) so the worker does not tokenize again.
//!
//! Fetching never holds up a request: until a model's tokenizer is here, its requests go out
//! as text, exactly as before. Engines that work on text (the synthetic engine, the wse
//! gateway) answer NOT_FOUND; their links remember that and do not ask again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::v1::{self, worker_client::WorkerClient};
use switchyard_tokenizer::tools::{ToolSet, ToolTurn};
use switchyard_tokenizer::{
    ChatMessage, ENCODE_INLINE_BYTES, GgufTokenizer, SPEC_FORMAT, TokenizerSpec,
};
use tonic::Code;
use tonic::transport::Channel;
use tracing::debug;

/// Tokenizers kept at once (one per model id); the least recently used goes first.
pub const MAX_TOKENIZERS: usize = 64;
/// Longest a `GetTokenizer` call may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest spec accepted: a 256k-token vocabulary with its merges is ~10 MiB of JSON.
const MAX_SPEC_BYTES: usize = 64 << 20;

/// Why a worker gave no tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The worker's engine works on text (or does not serve the model): asking again is futile.
    #[error("{0}")]
    NotFound(String),
    /// Anything else (timeout, transport, a spec this router cannot use): may work later.
    #[error("{0}")]
    Failed(String),
}

struct Entry {
    tokenizer: Arc<GgufTokenizer>,
    /// Tokens one sequence may hold, when the worker said.
    context_length: Option<u32>,
    last_used: u64,
}

/// A model's tokenizer as a worker published it.
pub struct Fetched {
    pub tokenizer: GgufTokenizer,
    /// Tokens one sequence may hold (prompt and output); `None` when the worker did not say.
    pub context_length: Option<u32>,
}

#[derive(Default)]
struct State {
    ready: HashMap<String, Entry>,
    clock: u64,
}

/// Every model's tokenizer the router has, bounded by [`MAX_TOKENIZERS`].
#[derive(Default)]
pub struct Tokenizers {
    state: Mutex<State>,
    /// One turn at a time per model: links wanting the same model's tokenizer take turns, so
    /// only one asks at once and a worker without one does not stop another from supplying it.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A link's turn to fetch one model's tokenizer.
pub struct Claim<'t> {
    tokenizers: &'t Tokenizers,
    model: String,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Claim<'_> {
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Keeps the fetched tokenizer.
    pub fn fulfil(self, fetched: Fetched) {
        self.tokenizers.insert(
            &self.model,
            Arc::new(fetched.tokenizer),
            fetched.context_length,
        );
    }
}

impl Tokenizers {
    /// `model`'s tokenizer, if the router has it.
    pub fn get(&self, model: &str) -> Option<Arc<GgufTokenizer>> {
        let mut state = self.state.lock().expect("tokenizers lock");
        state.clock += 1;
        let now = state.clock;
        let entry = state.ready.get_mut(model)?;
        entry.last_used = now;
        Some(entry.tokenizer.clone())
    }

    /// Tokens one sequence of `model` may hold, when a worker serving it said.
    pub fn context_length(&self, model: &str) -> Option<u32> {
        self.state
            .lock()
            .expect("tokenizers lock")
            .ready
            .get(model)?
            .context_length
    }

    /// Whether `model`'s tokenizer is here (without counting as a use).
    pub fn has(&self, model: &str) -> bool {
        self.state
            .lock()
            .expect("tokenizers lock")
            .ready
            .contains_key(model)
    }

    /// The turn to fetch `model`'s tokenizer, once any fetch of it under way has ended;
    /// `None` when the router has the tokenizer by then.
    pub async fn claim(&self, model: &str) -> Option<Claim<'_>> {
        let turn = self
            .turns
            .lock()
            .expect("turns lock")
            .entry(model.to_string())
            .or_default()
            .clone();
        let turn = turn.lock_owned().await;
        (!self.has(model)).then(|| Claim {
            tokenizers: self,
            model: model.to_string(),
            _turn: turn,
        })
    }

    fn insert(&self, model: &str, tokenizer: Arc<GgufTokenizer>, context_length: Option<u32>) {
        let mut state = self.state.lock().expect("tokenizers lock");
        state.clock += 1;
        let now = state.clock;
        if !state.ready.contains_key(model) && state.ready.len() >= MAX_TOKENIZERS {
            let oldest = state
                .ready
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(m, _)| m.clone());
            if let Some(oldest) = oldest {
                debug!(model = %oldest, "dropping the least recently used tokenizer");
                state.ready.remove(&oldest);
            }
        }
        state.ready.insert(
            model.to_string(),
            Entry {
                tokenizer,
                context_length,
                last_used: now,
            },
        );
    }

    /// [`Tokenizers::tokenize`], on the blocking pool when `request` carries more than
    /// [`ENCODE_INLINE_BYTES`] of text: a long prompt takes milliseconds to encode, which
    /// would hold a runtime thread — and every task waiting for it — that long.
    pub async fn tokenize_off_runtime(&self, request: &v1::GenerateRequest) -> Option<Vec<u32>> {
        if !tokenizes_long(request) {
            return self.tokenize(request);
        }
        let tokenizer = self.get(&request.model)?;
        let request = request.clone();
        match tokio::task::spawn_blocking(move || encode(&tokenizer, &request)).await {
            Ok(ids) => ids,
            Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
            // The runtime is shutting down: the request goes as text, if at all.
            Err(_) => None,
        }
    }

    /// The prompt ids of `request` exactly as its engine computes them — the chat template
    /// applied to `messages`, else `prompt` — or `None` when the router has no tokenizer for
    /// the model (or the prompt does not tokenize: the engine then reports why).
    pub fn tokenize(&self, request: &v1::GenerateRequest) -> Option<Vec<u32>> {
        let tokenizer = self.get(&request.model)?;
        encode(&tokenizer, request)
    }
}

/// Whether `request` carries more than [`ENCODE_INLINE_BYTES`] of text to tokenize.
pub fn tokenizes_long(request: &v1::GenerateRequest) -> bool {
    let text = request.prompt.len()
        + request
            .messages
            .iter()
            .map(|m| m.content.len())
            .sum::<usize>()
        + request
            .tools
            .iter()
            .map(|t| t.description.len() + t.parameters_json.len())
            .sum::<usize>();
    text > ENCODE_INLINE_BYTES
}

pub(crate) fn encode(tokenizer: &GgufTokenizer, request: &v1::GenerateRequest) -> Option<Vec<u32>> {
    let ids = if request.messages.is_empty() {
        tokenizer.encode(&request.prompt)
    } else if switchyard_tokenizer::uses_tools(
        !request.tools.is_empty(),
        request
            .messages
            .iter()
            .map(|m| (m.role.as_str(), !m.tool_calls.is_empty())),
    ) {
        // The tools and the calls in the history are written into the prompt the way the
        // engine constrains its answers to (the engine would render it the same).
        let tools = match ToolSet::from_wire(&request.tools, request.tool_choice.as_ref()) {
            Ok(tools) => tools,
            Err(error) => {
                debug!(request_id = %request.request_id, %error, "not tokenized; sent as text");
                return None;
            }
        };
        let turns: Vec<ToolTurn> = request
            .messages
            .iter()
            .map(|m| ToolTurn::from_wire(&m.role, &m.content, &m.tool_calls, &m.tool_call_id))
            .collect();
        tokenizer.encode_chat_tools(&turns, &tools)
    } else {
        let messages: Vec<ChatMessage> = request
            .messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
            .collect();
        tokenizer.encode_chat(&messages)
    };
    match ids {
        Ok(ids) if !ids.is_empty() => Some(ids),
        Ok(_) => None,
        Err(error) => {
            debug!(request_id = %request.request_id, %error, "not tokenized; sent as text");
            None
        }
    }
}

/// Asks a worker for `model`'s tokenizer and builds it.
pub async fn fetch(
    channel: Channel,
    model: &str,
    credential: Option<&switchyard_cluster::credential::ClusterToken>,
) -> Result<Fetched, FetchError> {
    let mut client = WorkerClient::new(channel).max_decoding_message_size(MAX_SPEC_BYTES);
    let mut request = tonic::Request::new(v1::TokenizerRequest {
        model: model.to_string(),
    });
    if let Some(credential) = credential {
        credential.apply(&mut request);
    }
    let call = client.get_tokenizer(request);
    let response = tokio::time::timeout(FETCH_TIMEOUT, call)
        .await
        .map_err(|_| FetchError::Failed(format!("no answer within {FETCH_TIMEOUT:?}")))?
        .map_err(|status| match status.code() {
            Code::NotFound | Code::Unimplemented => {
                FetchError::NotFound(status.message().to_string())
            }
            _ => FetchError::Failed(status.to_string()),
        })?
        .into_inner();
    if response.format != SPEC_FORMAT {
        return Err(FetchError::Failed(format!(
            "tokenizer format {:?} is not {SPEC_FORMAT:?} (a newer worker?)",
            response.format
        )));
    }
    let context_length = (response.context_length > 0).then_some(response.context_length);
    // Building the BPE tables takes a while for a large vocabulary: off the async threads.
    let tokenizer = tokio::task::spawn_blocking(move || {
        TokenizerSpec::from_bytes(&response.spec).and_then(GgufTokenizer::from_spec)
    })
    .await
    .map_err(|e| FetchError::Failed(format!("building the tokenizer: {e}")))?
    .map_err(|e| FetchError::Failed(e.to_string()))?;
    Ok(Fetched {
        tokenizer,
        context_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary without merges: one id per byte, plus two control tokens.
    fn tokenizer() -> GgufTokenizer {
        let printable = |b: u32| {
            (u32::from(b'!')..=u32::from(b'~')).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b)
        };
        let mut extra = 0;
        let mut tokens: Vec<String> = (0..256u32)
            .map(|b| {
                let c = if printable(b) {
                    b
                } else {
                    extra += 1;
                    255 + extra
                };
                char::from_u32(c).unwrap().to_string()
            })
            .collect();
        tokens.extend(["<|im_start|>".to_string(), "<|im_end|>".to_string()]);
        let mut token_types = vec![1; 256];
        token_types.extend([3, 3]);
        GgufTokenizer::from_spec(TokenizerSpec {
            model: "gpt2".into(),
            tokens,
            token_types,
            merges: vec![],
            pre: None,
            add_space_prefix: false,
            add_bos: false,
            bos_id: None,
            eos_id: Some(257),
            eot_id: None,
            chat_template: Some(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n".into(),
            ),
        })
        .unwrap()
    }

    fn request(model: &str, prompt: &str, messages: &[(&str, &str)]) -> v1::GenerateRequest {
        v1::GenerateRequest {
            model: model.into(),
            prompt: prompt.into(),
            messages: messages
                .iter()
                .map(|(role, content)| v1::ChatMessage {
                    role: role.to_string(),
                    content: content.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn requests_tokenize_as_the_engine_does_once_the_tokenizer_is_here() {
        let tokenizers = Tokenizers::default();
        assert_eq!(tokenizers.tokenize(&request("m", "hi", &[])), None);
        tokenizers.claim("m").await.unwrap().fulfil(Fetched {
            tokenizer: tokenizer(),
            context_length: Some(64),
        });
        assert_eq!(tokenizers.context_length("m"), Some(64));
        assert_eq!(tokenizers.context_length("other"), None);
        // A plain prompt is encoded as it is: one id per byte here.
        assert_eq!(
            tokenizers.tokenize(&request("m", "hi", &[])),
            Some(vec![u32::from(b'h'), u32::from(b'i')])
        );
        // Messages win over the prompt and go through the chat template.
        let chat = tokenizers
            .tokenize(&request("m", "ignored", &[("user", "hi")]))
            .unwrap();
        assert_eq!(chat[0], 256, "<|im_start|>");
        // (Jinja drops a template's final newline: the engine renders the same.)
        assert_eq!(chat.len(), 1 + "user\nhi".len() + 2 + 1 + "assistant".len());
        // Other models are still sent as text.
        assert_eq!(tokenizers.tokenize(&request("other", "hi", &[])), None);
        // Nothing to tokenize: the engine reports the empty prompt itself.
        assert_eq!(tokenizers.tokenize(&request("m", "", &[])), None);
    }

    #[tokio::test]
    async fn a_chat_with_tools_renders_them_into_the_prompt_as_the_engine_does() {
        let tokenizers = Tokenizers::default();
        tokenizers.claim("m").await.unwrap().fulfil(Fetched {
            tokenizer: tokenizer(),
            context_length: None,
        });
        let mut with_tools = request("m", "", &[("user", "weather?")]);
        with_tools.tools = vec![v1::Tool {
            name: "get_weather".into(),
            ..Default::default()
        }];
        let ids = tokenizers.tokenize(&with_tools).expect("tokenized");
        let turns = [ToolTurn::from_wire("user", "weather?", &[], "")];
        let tools = ToolSet::from_wire(&with_tools.tools, None).unwrap();
        assert_eq!(ids, tokenizer().encode_chat_tools(&turns, &tools).unwrap());
        let text = tokenizer().decode(&ids);
        assert!(text.contains("get_weather"), "{text}");
        // A history with a call and its result renders both, tools offered or not.
        let mut history = request("m", "", &[("user", "weather?")]);
        history.messages.push(v1::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![v1::ToolCall {
                id: "c1".into(),
                name: "get_weather".into(),
                arguments: "{}".into(),
            }],
            ..Default::default()
        });
        history.messages.push(v1::ChatMessage {
            role: "tool".into(),
            content: "sunny".into(),
            tool_call_id: "c1".into(),
            ..Default::default()
        });
        let text = tokenizer().decode(&tokenizers.tokenize(&history).expect("tokenized"));
        assert!(
            text.contains("get_weather") && text.contains("sunny"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn one_fetch_at_a_time_per_model_and_none_once_it_is_here() {
        let tokenizers = Tokenizers::default();
        let first = tokenizers.claim("m").await.unwrap();
        assert_eq!(first.model(), "m");
        // Another link waits for its turn …
        let second = tokenizers.claim("m");
        tokio::pin!(second);
        assert!(futures::poll!(second.as_mut()).is_pending());
        // … a different model does not.
        assert!(tokenizers.claim("n").await.is_some());
        // The first fetch fails (its claim is dropped): the next link gets its turn.
        drop(first);
        let second = second.await.unwrap();
        second.fulfil(Fetched {
            tokenizer: tokenizer(),
            context_length: None,
        });
        assert!(tokenizers.has("m"));
        assert!(tokenizers.claim("m").await.is_none());
    }

    #[tokio::test]
    async fn the_least_recently_used_tokenizer_goes_when_full() {
        let tokenizers = Tokenizers::default();
        let shared = Arc::new(tokenizer());
        for i in 0..MAX_TOKENIZERS {
            tokenizers.insert(&format!("m{i}"), shared.clone(), None);
        }
        // m0 is used again, so m1 is now the least recently used.
        assert!(tokenizers.get("m0").is_some());
        tokenizers.insert("new", shared, None);
        assert!(tokenizers.has("new") && tokenizers.has("m0"));
        assert!(!tokenizers.has("m1"));
        assert_eq!(tokenizers.state.lock().unwrap().ready.len(), MAX_TOKENIZERS);
    }
}
