//! The contract between the worker runtime and a model backend. Engines see plain Rust types,
//! never protobuf: the service translates.

use std::future::Future;
use std::task::{Context, Poll};

use switchyard_cluster::driven::DrivenReceiver;
use switchyard_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls of tools (`ChatMessage.tool_calls`).
    pub tool_calls: Vec<v1::ToolCall>,
    /// A "tool" message: the call it answers (`ChatMessage.tool_call_id`).
    pub tool_call_id: String,
}

/// The functions a request lets the model call, and how it may use them
/// (`WorkerStart.tools`, `.tool_choice`). Empty `tools`: an ordinary text generation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tools {
    pub tools: Vec<v1::Tool>,
    pub choice: v1::ToolChoice,
}

impl Tools {
    /// Whether the model may call a tool in this generation.
    pub fn callable(&self) -> bool {
        (!self.tools.is_empty() && self.choice.mode() != v1::ToolChoiceMode::None)
            || !self.choice.function.is_empty()
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

impl Prompt {
    /// The request field this prompt came in (`GenerateRequest.messages` or `.prompt`), for
    /// refusals that name it.
    pub fn field(&self) -> &'static str {
        match self {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) => "prompt",
        }
    }

    /// The text that states the current instructions: the last user message, or the raw prompt.
    pub fn instructions(&self) -> &str {
        match self {
            Prompt::Text(text) => text,
            Prompt::Chat(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .or(messages.last())
                .map(|m| m.content.as_str())
                .unwrap_or_default(),
        }
    }
}

/// Sampling parameters, validated by the router before they get here.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sampling {
    pub max_tokens: u32,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// (token id, bias), ids ascending.
    pub logit_bias: Vec<(u32, f32)>,
    /// Report log probabilities with each token, and this many of the most likely tokens at
    /// its position; `None`: do not.
    pub logprobs: Option<u32>,
    /// Score the prompt (`SamplingParams.prompt_logprobs`): [`EngineEvent::PromptLogprobs`]
    /// before the first token, each entry with this many of the most likely tokens.
    pub prompt_logprobs: Option<u32>,
    /// Never end on the model's end-of-sequence tokens (`SamplingParams.ignore_eos`).
    pub ignore_eos: bool,
    /// Keep only tokens at least this fraction as likely as the most likely one, after
    /// temperature (`SamplingParams.min_p`); 0 = off.
    pub min_p: f32,
    /// The answer's form (`SamplingParams.response_format`); `None` = free text.
    pub response_format: Option<v1::ResponseFormat>,
}

impl Sampling {
    /// Whether the answer must be JSON (an object, or of a schema).
    pub fn wants_json(&self) -> bool {
        self.response_format
            .as_ref()
            .is_some_and(|f| f.kind() != v1::response_format::Kind::Text)
    }
}

#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub model: String,
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// Tokens a previous worker already delivered; generation continues after them and
    /// `max_tokens` counts them.
    pub resume_tokens: Vec<u32>,
    /// The router classed it latency-critical: engines admit and prefill it ahead of queued
    /// cost-sensitive work (the router's lane, carried by `WorkerStart.lane`).
    pub latency_critical: bool,
    /// The decode rate its lane promises, tokens per second (0: none; `WorkerStart.min_tokens_per_s`):
    /// an engine interleaving prefill chunks with decode steps keeps its steps short enough.
    pub min_tokens_per_s: f64,
    /// The prompt as token ids, chat template applied, when the router already tokenized it
    /// (`WorkerStart.prompt_token_ids`): engines that tokenize use these instead of `prompt`.
    pub prompt_ids: Option<Vec<u32>>,
    /// Functions the model may call; empty for a text generation.
    pub tools: Tools,
    /// Embed the prompt instead of generating (`WorkerStart.embed`): the engine sends one
    /// [`EngineEvent::Embedding`] and then `Done` (reason `Stop`, no tokens).
    pub embed: bool,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// End of sequence or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The cancellation token fired.
    Cancelled,
    /// The model called tools (the generation's `ToolCall` events) and ended its turn.
    ToolCalls,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// One generated token and the text it completes (may be empty while a multi-byte
    /// character is still incomplete); its log probabilities when the request asked for them.
    Token {
        id: u32,
        text: String,
        logprobs: Option<Box<v1::TokenLogprobs>>,
    },
    /// A piece of a tool call (see `v1::ToolCallDelta`). An engine that generates the call as
    /// tokens sends those as `Token` events with empty `text` too, so they count and resume as
    /// any other token.
    ToolCall(v1::ToolCallDelta),
    /// Every prompt token's log probability given those before it (the first's is 0: nothing
    /// predicts it), sent once, just before the first `Token`, when the request asked
    /// ([`Sampling::prompt_logprobs`]).
    PromptLogprobs(Vec<v1::TokenLogprobs>),
    /// An embedding request's vector, unit length (sent just before its `Done`).
    Embedding(Vec<f32>),
    /// The stop sequence that is ending the generation (sent just before its `Done`), for
    /// clients that tell it from the end of the model's turn.
    StopSequence(String),
    /// The last event of a generation.
    Done {
        reason: StopReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// Prompt tokens whose KV came from the prefix cache instead of being computed.
        cached_prompt_tokens: u32,
    },
}

/// The log probabilities of a token a deterministic engine (the synthetic one) produced: it
/// was certain (log probability 0), and no other token was possible, so the most likely
/// tokens at its position are it alone whatever `top` asks for.
pub fn certain(id: u32, text: &str, top: u32) -> Box<v1::TokenLogprobs> {
    let chosen = v1::TokenLogprob {
        token_id: id,
        token: text.as_bytes().to_vec(),
        logprob: 0.0,
    };
    Box::new(v1::TokenLogprobs {
        top: if top > 0 {
            vec![chosen.clone()]
        } else {
            Vec::new()
        },
        chosen: Some(chosen),
    })
}

/// One event of a generation, as an engine sends it.
pub type EngineItem = Result<EngineEvent, EngineError>;

/// Events of one generation; ends after `Done` or an error.
///
/// An engine that generates on tasks of its own (a batch loop over many sequences) hands over
/// the receiving end of a channel. One whose work for a generation is I/O alone (the
/// wafer-scale gateway reading its upstream's event stream) hands over the channel *and* the
/// future that fills it ([`EngineStream::driven`]): the reader drives that future in its own
/// task, so an event costs no wake-up of another task — on a busy machine, no inter-processor
/// interrupt per token — and a reader that stops reading (out of flow-control credit) stops
/// the upstream read too. Dropping the stream drops the generation.
#[derive(Debug)]
pub struct EngineStream(DrivenReceiver<EngineItem>);

impl EngineStream {
    /// Events that `driver` sends on `events`'s sender as the reader polls it.
    pub fn driven(
        events: mpsc::Receiver<EngineItem>,
        driver: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Self(DrivenReceiver::abandoning(events, driver))
    }

    /// The next event; `None` once the generation's sender is gone.
    pub async fn recv(&mut self) -> Option<EngineItem> {
        self.0.recv().await
    }

    /// Events sent and not yet read.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes an event, driving the generation when none is waiting.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<EngineItem>> {
        self.0.poll_recv(cx)
    }
}

impl From<mpsc::Receiver<EngineItem>> for EngineStream {
    fn from(events: mpsc::Receiver<EngineItem>) -> Self {
        Self(DrivenReceiver::undriven(events))
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    /// A request field this engine cannot honour or finds malformed (`tools`,
    /// `tools[2].parameters_json`, `sampling.response_format`): the client's to change.
    #[error("{field}: {detail}")]
    InvalidField { field: String, detail: String },
    /// The request does not fit the model's context; `field` is the request field to change
    /// (`prompt`, `messages` or `sampling.max_tokens`).
    #[error("{field}: {detail}")]
    ExceedsContext { field: String, detail: String },
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn code(&self) -> tonic::Code {
        match self {
            EngineError::InvalidArgument(_)
            | EngineError::InvalidField { .. }
            | EngineError::ExceedsContext { .. } => tonic::Code::InvalidArgument,
            EngineError::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            EngineError::Unavailable(_) => tonic::Code::Unavailable,
            EngineError::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The request field at fault, when the engine knows it.
    pub fn field(&self) -> Option<&str> {
        match self {
            EngineError::ExceedsContext { field, .. } | EngineError::InvalidField { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }

    /// A refusal of request field `field`.
    pub fn invalid_field(field: impl Into<String>, detail: impl Into<String>) -> Self {
        EngineError::InvalidField {
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// The `Failed.reason` a client can act on, when one applies.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            EngineError::ExceedsContext { .. } => Some(switchyard_proto::CONTEXT_LENGTH_EXCEEDED),
            _ => None,
        }
    }
}

/// Queue and memory state an engine reports for load frames.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineLoad {
    /// Requests admitted but not yet generating.
    pub queued: u32,
    pub kv_used_bytes: u64,
    /// Prompt tokens admitted but not yet prefilled (0 = unknown): with the prefill rate, the
    /// router predicts how long a new prompt waits for its first token.
    pub queued_prompt_tokens: u64,
    /// Of `queued_prompt_tokens`, those of latency-critical requests, for an engine that
    /// prefills them ahead of cost-sensitive work (`None`: it does not tell the lanes apart).
    pub queued_latency_critical_prompt_tokens: Option<u64>,
    /// Prefill rate, tokens per second (0 = unknown: routers assume their policy's default).
    pub prefill_tokens_per_s: f64,
    /// Fixed time to a first token beyond prefilling the prompt, first decode step included
    /// (ms), for an engine that has one (`None`: not reported; see `Load.first_token_delay_ms`).
    pub first_token_delay_ms: Option<f64>,
    /// Prompt tokens prefilled per step by an engine that prefills in chunks interleaved with
    /// decode steps (`None`: it prefills whole prompts; see `Load.prefill_chunk_tokens`).
    pub prefill_chunk_tokens: Option<u32>,
}

/// Counters and gauges of an engine's prefix cache, exported as worker metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixCacheStats {
    /// Tokens per KV block.
    pub block_tokens: u32,
    /// Prompts looked up in the cache (one per admitted request).
    pub lookups: u64,
    /// Prompt tokens looked up.
    pub lookup_tokens: u64,
    /// Prompt tokens found cached (not computed).
    pub hit_tokens: u64,
    /// Full blocks kept for reuse with no sequence using them (evictable).
    pub cached_blocks: u64,
    /// Blocks held by running sequences.
    pub active_blocks: u64,
    /// Blocks never used or released empty.
    pub free_blocks: u64,
    /// Cached blocks dropped to make room.
    pub evictions: u64,
}

/// How an engine has prefilled prompts so far: passes (forwards over prompt tokens) and what
/// they held. `sequences / passes` is how many prompts a pass packs on average.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefillStats {
    pub passes: u64,
    /// Prompts' chunks prefilled, summed over passes.
    pub sequences: u64,
    /// Prompt tokens prefilled (computed, not found cached).
    pub tokens: u64,
}

/// A model backend. `submit` must return quickly: generation runs on the engine's own tasks
/// and reports through the returned stream; firing `cancel` ends it with
/// `Done { reason: Cancelled }` within one step.
pub trait Engine: Send + Sync + 'static {
    /// Engine kind as advertised in the registry (`synthetic`, `candle`, `wse-gateway`).
    fn kind(&self) -> &'static str;
    fn models(&self) -> Vec<String>;
    /// Sequences generated at once.
    fn max_concurrent(&self) -> u32;
    /// Expected decode rate of one stream, advertised for placement.
    fn tokens_per_s(&self) -> f64;
    /// A description of the hardware the engine runs on.
    fn hardware(&self) -> String;
    fn load(&self) -> EngineLoad;
    fn submit(
        &self,
        request: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError>;
    /// The engine's prefix cache as the blocks it holds, for `KvEvents` frames; `None` for
    /// engines that keep no KV of their own (or cannot see their upstream's).
    fn prefix_cache(&self) -> Option<std::sync::Arc<crate::kv_events::KvPublisher>> {
        None
    }
    /// The prefix cache's counters; `None` for engines without one.
    fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        None
    }
    /// How the engine's prefill passes went so far; `None` for engines that do not run them
    /// (a gateway, the synthetic engine).
    fn prefill_stats(&self) -> Option<PrefillStats> {
        None
    }
    /// Whether the engine can score a prompt ([`Sampling::prompt_logprobs`]); a request asking
    /// one that cannot is refused.
    fn scores_prompts(&self) -> bool {
        false
    }
    /// Whether the engine can embed a prompt ([`EngineRequest::embed`]); a request asking one
    /// that cannot is refused.
    fn embeds(&self) -> bool {
        false
    }
    /// The tokenizer of `model` (format and bytes, see `TokenizerSpec`) for routers to tokenize
    /// with; `None` for engines that work on text.
    fn tokenizer_spec(&self, model: &str) -> Option<(String, Vec<u8>)> {
        let _ = model;
        None
    }
    /// Tokens one sequence of `model` may hold (prompt and output), when the engine knows.
    fn context_length(&self, model: &str) -> Option<u32> {
        let _ = model;
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    fn token(id: u32) -> EngineItem {
        Ok(EngineEvent::Token {
            id,
            text: id.to_string(),
            logprobs: None,
        })
    }

    /// Counts the driver's steps, and tells when it was dropped.
    struct Probe {
        steps: AtomicU32,
        dropped: AtomicBool,
    }

    struct DropFlag(Arc<Probe>);

    impl Drop for DropFlag {
        fn drop(&mut self) {
            self.0.dropped.store(true, Ordering::SeqCst);
        }
    }

    /// A driver sending `count` tokens, yielding to the scheduler between them.
    fn driven(count: u32, capacity: usize) -> (EngineStream, Arc<Probe>) {
        let probe = Arc::new(Probe {
            steps: AtomicU32::new(0),
            dropped: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel(capacity);
        let flag = DropFlag(probe.clone());
        let driver = async move {
            for id in 0..count {
                flag.0.steps.fetch_add(1, Ordering::SeqCst);
                if tx.send(token(id)).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        (EngineStream::driven(rx, driver), probe)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_driven_generation_advances_only_as_its_reader_reads_and_ends_with_its_driver() {
        let (mut stream, probe) = driven(5, 2);
        // Nothing runs it but the reader: no task of its own.
        tokio::task::yield_now().await;
        assert_eq!(probe.steps.load(Ordering::SeqCst), 0);
        let mut ids = Vec::new();
        while let Some(event) = stream.recv().await {
            let Ok(EngineEvent::Token { id, .. }) = event else {
                panic!("unexpected {event:?}");
            };
            ids.push(id);
            // A bounded buffer: the driver never runs more than its capacity ahead.
            assert!(probe.steps.load(Ordering::SeqCst) <= id + 3);
        }
        assert_eq!(ids, vec![0, 1, 2, 3, 4]);
        assert!(probe.dropped.load(Ordering::SeqCst), "the driver ended");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn dropping_a_driven_stream_drops_its_generation() {
        let (mut stream, probe) = driven(1_000, 4);
        assert!(matches!(stream.recv().await, Some(Ok(_))));
        assert!(!probe.dropped.load(Ordering::SeqCst));
        drop(stream);
        assert!(probe.dropped.load(Ordering::SeqCst));
        assert!(probe.steps.load(Ordering::SeqCst) < 10);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_channel_stream_reads_what_another_task_sends() {
        let (tx, rx) = mpsc::channel(4);
        let mut stream = EngineStream::from(rx);
        tokio::spawn(async move {
            for id in 0..3 {
                tx.send(token(id)).await.unwrap();
            }
        });
        let mut count = 0;
        while stream.recv().await.is_some() {
            count += 1;
        }
        assert_eq!(count, 3);
    }
}
