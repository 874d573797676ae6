//! The candle engine: admission, one scheduler thread with continuous batching, sampling and
//! streaming. Implements [`switchyard_worker::Engine`].
//!
//! Each scheduler iteration: take new requests, drop cancelled ones (their KV is freed at once),
//! admit queued requests while the KV budget and the sequence limit allow, run one prefill
//! pass, then one batched decode step over every decoding sequence. A prefill pass is one
//! forward over up to a chunk of prompt tokens, shared among the joining sequences: a long
//! prompt's next chunk, or several short prompts packed together, as many as get them their
//! first tokens soonest on average (see [`crate::pacing::pack_size`]). Chunked prefill keeps
//! a long prompt from stalling the streams already running; while sequences with a promised
//! decode rate decode (`WorkerStart.min_tokens_per_s`), the chunk is cut so the iteration keeps
//! the fastest such rate (see [`crate::pacing`]).
//! Latency-critical requests (the router's lane) are admitted before queued cost-sensitive
//! ones and their prompts are prefilled first; among equals the shortest remaining prefill
//! goes first, so a follow-up turn with a cached history is not stuck behind a cold prompt.
//!
//! A request sent as text is encoded at `submit`, or, past 2 KiB of text, on tokio's blocking
//! pool by whoever reads its stream: `submit` runs on the worker's stream task, which must go on
//! reading the router's frames.
//!
//! Load reports carry the prompt tokens not yet prefilled (waiting requests plus the unfinished
//! prompts of admitted ones) and a moving average of the measured prefill rate.
//!
//! KV memory is one store of fixed-size blocks sized by the KV budget. Blocks are reserved at
//! admission for context + remaining max_tokens, so a sequence can never run out
//! mid-generation and the budget is never exceeded. With the prefix cache on (the default), a
//! sequence starts from the longest cached block chain of its context and prefills only the
//! rest, and the blocks it fills stay cached after it ends (see [`crate::kv_cache`]); every
//! change is published for routers (`KvEvents`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use std::sync::{Mutex, OnceLock};

use switchyard_proto::v1;
use switchyard_proto::validate::MAX_TOP_LOGPROBS;
use switchyard_worker::engine::EngineLoad;
use switchyard_worker::{KvPublisher, PrefillStats, PrefixCacheStats, RateMeter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use switchyard_worker::{
    Engine, EngineError, EngineEvent, EngineRequest, EngineStream, Prompt, StopReason,
};

use crate::kv_cache::{PrefixCache, Reuse, SeqBlocks};
use crate::model::{Chunk, KvStore, Llama, Logits, ModelError, SeqCache};
use crate::pacing::{PrefillPack, paced_chunk, pack_size};
use crate::penalties::Penalties;
use crate::sampling::{Sampler, SamplingParams, StopMatcher, StopOutcome};
use crate::tokenizer::tools::ToolSet;
use crate::tokenizer::{ChatMessage, Detokenizer, ENCODE_INLINE_BYTES, GgufTokenizer};
use crate::tools::{Constraint, Grammars};
use candle_core::Tensor;

/// Limits of one engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerLimits {
    /// Bytes of KV cache all sequences together may hold.
    pub kv_budget_bytes: u64,
    /// Sequences generating at once.
    pub max_seqs: usize,
    /// Requests waiting for admission beyond which new ones are refused.
    pub max_queue: usize,
    /// Prompt tokens prefilled per scheduler iteration, shared among the joining sequences.
    pub prefill_chunk: usize,
    /// How many joining sequences one prefill pass packs.
    pub prefill_pack: PrefillPack,
    /// How long one scheduler iteration should take at most: the prefill chunk is cut to what
    /// fits beside the decode step at the measured rates (never below one KV block), because
    /// a request that arrives mid-chunk waits for the chunk to end — and on a CPU a 512-token
    /// chunk takes seconds. `None`: only `prefill_chunk` bounds the chunk.
    pub step_target: Option<Duration>,
    /// Keep finished sequences' full KV blocks and reuse them for later prompts that start
    /// the same way.
    pub prefix_cache: bool,
    /// Threads of the engine's own compute pool (0: one per CPU core).
    pub compute_threads: usize,
}

impl SchedulerLimits {
    /// The prefill chunk of an iteration (see [`crate::pacing`]): `prefill_chunk`, cut to keep
    /// the step target and `promised`, the fastest decode rate promised to a sequence decoding
    /// now (`None`: no sequence decodes, so the iteration has no decode step).
    fn chunk_in_force(
        &self,
        promised: Option<f64>,
        decode_steps_per_s: f64,
        prefill_tokens_per_s: f64,
    ) -> usize {
        // The step target is a pace every iteration keeps, whoever is decoding.
        let target = self
            .step_target
            .map_or(0.0, |t| 1.0 / t.as_secs_f64().max(f64::MIN_POSITIVE));
        let decode_step_s = match promised {
            Some(_) if decode_steps_per_s > 0.0 => 1.0 / decode_steps_per_s,
            _ => 0.0,
        };
        paced_chunk(
            self.prefill_chunk,
            promised.unwrap_or(0.0).max(target),
            decode_step_s,
            prefill_tokens_per_s,
        )
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.kv_budget_bytes == 0 {
            return Err("kv_budget_bytes: must be positive".into());
        }
        if self.max_seqs == 0 {
            return Err("max_seqs: must be at least 1".into());
        }
        if self.prefill_chunk == 0 {
            return Err("prefill_chunk: must be at least 1".into());
        }
        if self.prefill_pack == PrefillPack::AtMost(0) {
            return Err("prefill_pack: must be at least 1".into());
        }
        Ok(())
    }
}

/// A request that passed validation, waiting for admission.
struct Job {
    request_id: String,
    /// Prompt ids followed by any `resume_tokens`.
    context: Vec<u32>,
    prompt_tokens: u32,
    resumed: usize,
    /// Tokens the sequence may still generate.
    remaining: usize,
    sampler: Sampler,
    /// `top_logprobs` when the request asked for log probabilities.
    logprobs: Option<u32>,
    /// `top_logprobs` when the request asked for its prompt scored.
    prompt_logprobs: Option<u32>,
    /// The prompt's scores so far, sent once prefill is done.
    scored: Vec<v1::TokenLogprobs>,
    /// An embedding request's sum of its prompt's final hidden states so far (see
    /// [`Logits::HiddenSum`]); `None` for a generation.
    pooled: Option<Vec<f32>>,
    stops: Vec<String>,
    tx: mpsc::Sender<Result<EngineEvent, EngineError>>,
    cancel: CancellationToken,
    latency_critical: bool,
    /// The decode rate its lane promises (0: none): prefill chunks are paced to keep it.
    min_tokens_per_s: f64,
    /// Context tokens whose KV came from the prefix cache (set at admission).
    cached_tokens: usize,
    /// When the engine accepted the request: waiting time counts towards prefill priority.
    arrived: Instant,
    /// The grammar (and call parser) of a request that may call tools or must answer in
    /// JSON; `None` for every other request, which then pays nothing for either.
    constraint: Option<Box<Constraint>>,
}

struct Seq {
    job: Job,
    cache: SeqCache,
    blocks: SeqBlocks,
    /// Context and generated ids so far: what the sequence's blocks hold (or will).
    tokens: Vec<u32>,
    /// Next decode input, once prefill is done.
    next: Option<u32>,
    generated: usize,
    detok: Detokenizer,
    stop: StopMatcher,
    /// How the generation ended, told its reader by [`Scheduler::retire`] once the blocks are
    /// released: the load the worker reports when its reader sees the end must count them
    /// free (they read as in use until the next report otherwise, seconds when idle).
    ended: Option<StopReason>,
}

impl Seq {
    /// Whether the reader has room for a token and the sequence's end (a stop can emit held
    /// text, the stop sequence that matched and the result in one step).
    fn can_emit(&self) -> bool {
        // A tool call token can also complete one call's piece and start the next's.
        let room = if self.job.constraint.is_some() { 5 } else { 3 };
        self.job.tx.capacity() >= room || self.job.tx.is_closed()
    }
}

/// One sequence's share of a prefill pass: its context tokens `from..end`.
#[derive(Debug, Clone, Copy)]
struct PrefillPart {
    /// Index in the running sequences.
    seq: usize,
    from: usize,
    end: usize,
}

/// Tells a sequence's reader `tx` which stop sequence ended the generation (from its `stop`).
fn report_stop_sequence(stop: &StopMatcher, tx: &mpsc::Sender<Result<EngineEvent, EngineError>>) {
    if let Some(stop) = stop.matched() {
        let _ = tx.try_send(Ok(EngineEvent::StopSequence(stop.to_string())));
    }
}

/// Prompt tokens of the warm-up prefill that seeds the advertised prefill rate.
const WARM_UP_PROMPT_TOKENS: usize = 32;

/// Events a sequence may have waiting for its reader before it pauses.
const EVENT_BUFFER: usize = 64;

/// How long a scheduler whose every sequence waits for its reader naps before looking again.
const STALL_NAP: std::time::Duration = std::time::Duration::from_millis(1);

/// Load counters shared between the engine handle and its scheduler thread.
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU32,
    active: AtomicU32,
    kv_used: AtomicU64,
    steps: AtomicU64,
    /// Prefill passes run, the sequences' chunks and the tokens they held.
    prefill_passes: AtomicU64,
    prefill_sequences: AtomicU64,
    prefill_tokens: AtomicU64,
    /// Prompt tokens admitted but not yet prefilled.
    unprefilled: AtomicU64,
    /// Of `unprefilled`, those of latency-critical jobs (admitted and prefilled first).
    unprefilled_latency_critical: AtomicU64,
    /// Moving average of measured prefill chunks, tokens per second.
    prefill_rate: RateMeter,
    /// The prefill chunk in force: `--prefill-chunk`, or less while decode pacing cuts it.
    chunk: AtomicU32,
    prefix: Mutex<PrefixCacheStats>,
}

/// The native model engine.
pub struct CandleEngine {
    model_ids: Vec<String>,
    tokenizer: Arc<GgufTokenizer>,
    limits: SchedulerLimits,
    publisher: Option<Arc<KvPublisher>>,
    hardware: String,
    tokens_per_s: f64,
    admission: Arc<Admission>,
    seed_counter: AtomicU64,
    /// The tool call grammar compiler: built in the background at start (~120 ms for SmolLM2's
    /// 49 152 tokens, `cargo bench --bench tools`), so the first request offering tools
    /// rarely waits for it on the worker's stream task.
    grammars: Arc<OnceLock<Result<Arc<Grammars>, String>>>,
}

/// What admitting a tokenized request takes — the checks that need its length, the queue
/// bound, the hand-off to the scheduler thread — shared with the tasks that tokenize long
/// prompts off the runtime's threads.
struct Admission {
    context_length: usize,
    /// KV blocks the store holds, and tokens per block.
    kv_blocks: usize,
    block_tokens: usize,
    kv_budget_bytes: u64,
    max_queue: usize,
    counters: Arc<Counters>,
    jobs: std_mpsc::Sender<Job>,
}

impl Admission {
    /// Queues `job` for the scheduler with `prompt` (which came in request field
    /// `prompt_field`), then the `resumed` tokens, as its context; refuses it when that cannot
    /// fit the model or the KV store, or the queue is full.
    fn admit(
        &self,
        mut job: Job,
        prompt: Vec<u32>,
        prompt_field: &'static str,
        resumed: &[u32],
    ) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "{prompt_field}: tokenizes to no tokens"
            )));
        }
        job.prompt_tokens = prompt.len() as u32;
        job.sampler.start_after(&prompt, resumed);
        job.context = prompt;
        job.context.extend_from_slice(resumed);
        let needed = job.context.len() + job.remaining;
        let limit = self.context_length;
        let max_tokens = job.resumed + job.remaining;
        if job.prompt_tokens as usize >= limit {
            return Err(EngineError::ExceedsContext {
                field: prompt_field.into(),
                detail: format!(
                    "the prompt is {} tokens, the model's context length is {limit}: shorten it \
                     (it must leave room for at least one generated token)",
                    job.prompt_tokens
                ),
            });
        }
        if needed > limit {
            return Err(EngineError::ExceedsContext {
                field: "sampling.max_tokens".into(),
                detail: format!(
                    "prompt ({} tokens) + max_tokens ({max_tokens}) = {} exceeds the model's \
                     context length of {limit} tokens: lower max_tokens to at most {} or \
                     shorten the prompt",
                    job.prompt_tokens,
                    job.prompt_tokens as usize + max_tokens,
                    limit - job.prompt_tokens as usize
                ),
            });
        }
        let blocks = needed.div_ceil(self.block_tokens);
        if blocks > self.kv_blocks {
            return Err(EngineError::InvalidArgument(format!(
                "prompt + sampling.max_tokens need {blocks} KV blocks ({needed} tokens), more than this worker's kv_budget_bytes {} holds ({} blocks of {} tokens)",
                self.kv_budget_bytes, self.kv_blocks, self.block_tokens
            )));
        }
        // Bounded queue: count optimistically, undo when over the limit.
        let before = self.counters.queued.fetch_add(1, Ordering::AcqRel);
        if before as usize >= self.max_queue {
            self.counters.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::ResourceExhausted(format!(
                "queue full: {} requests already wait (max_queue {})",
                before, self.max_queue
            )));
        }
        if self.jobs.send(job).is_err() {
            self.counters.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(EngineError::Unavailable(
                "engine scheduler has stopped".into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for CandleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleEngine")
            .field("model_ids", &self.model_ids)
            .field("limits", &self.limits)
            .finish()
    }
}

impl CandleEngine {
    /// Starts the scheduler thread over a loaded model. Runs one warm-up step first (a short
    /// prefill and a decode) so the first request does not pay for lazy initialisation, and
    /// measures the prefill rate and single-stream decode rate it advertises.
    pub fn start(
        model: Llama,
        tokenizer: GgufTokenizer,
        model_ids: Vec<String>,
        limits: SchedulerLimits,
        hardware: String,
    ) -> Result<Self, EngineError> {
        limits.validate().map_err(EngineError::InvalidArgument)?;
        if model_ids.is_empty() {
            return Err(EngineError::InvalidArgument(
                "models: at least one model id to serve is required".into(),
            ));
        }
        let kv_blocks = (limits.kv_budget_bytes / model.kv_bytes_per_block()) as usize;
        if kv_blocks == 0 {
            return Err(EngineError::InvalidArgument(format!(
                "kv_budget_bytes {}: less than one KV block of this model ({} bytes)",
                limits.kv_budget_bytes,
                model.kv_bytes_per_block()
            )));
        }
        let pool = compute_pool(limits.compute_threads)?;
        let threads = pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let hardware = if model.device().is_cpu() {
            format!("{hardware}, {threads} threads")
        } else {
            hardware
        };
        let (warm_tokens, prefill_s, step) = match &pool {
            Some(pool) => pool.install(|| warm_up(&model))?,
            None => warm_up(&model)?,
        };
        let store = model.kv_store(kv_blocks);
        let prefix = PrefixCache::new(kv_blocks, store.block_tokens(), limits.prefix_cache);
        let block_tokens = store.block_tokens();
        let publisher = limits
            .prefix_cache
            .then(|| Arc::new(KvPublisher::new(block_tokens as u32)));
        let counters = Arc::new(Counters::default());
        // The scheduler thread refreshes these after each step; until the first one an idle
        // worker's metrics must still show its blocks free, not an empty (full-looking) cache.
        *counters.prefix.lock().unwrap_or_else(|e| e.into_inner()) = prefix.stats();
        counters.prefill_rate.record(warm_tokens as f64, prefill_s);
        let chunk = limits.chunk_in_force(None, 0.0, counters.prefill_rate.get());
        counters
            .chunk
            .store(u32::try_from(chunk).unwrap_or(u32::MAX), Ordering::Relaxed);
        let decode_rate = RateMeter::default();
        decode_rate.record(1.0, step);
        let (tx, rx) = std_mpsc::channel();
        let tokenizer = Arc::new(tokenizer);
        let engine = Self {
            model_ids,
            tokenizer: tokenizer.clone(),
            limits: limits.clone(),
            publisher: publisher.clone(),
            hardware,
            tokens_per_s: 1.0 / step,
            admission: Arc::new(Admission {
                context_length: model.config.context_length,
                kv_blocks,
                block_tokens,
                kv_budget_bytes: limits.kv_budget_bytes,
                max_queue: limits.max_queue,
                counters: counters.clone(),
                jobs: tx,
            }),
            seed_counter: AtomicU64::new(0x5EED),
            grammars: Arc::default(),
        };
        let (grammars, vocabulary) = (engine.grammars.clone(), engine.tokenizer.clone());
        std::thread::Builder::new()
            .name("tool-grammars".into())
            .spawn(move || {
                grammars.get_or_init(|| Grammars::new(&vocabulary).map(Arc::new));
            })
            .map_err(|e| EngineError::Internal(format!("spawning the grammar builder: {e}")))?;
        let scheduler = Scheduler {
            model,
            tokenizer,
            limits,
            store,
            prefix,
            publisher,
            counters,
            rx,
            waiting: VecDeque::new(),
            active: Vec::new(),
            decode_rate,
            pass_overhead_s: step,
        };
        std::thread::Builder::new()
            .name("candle-scheduler".into())
            .spawn(move || match pool {
                Some(pool) => pool.install(move || scheduler.run()),
                None => scheduler.run(),
            })
            .map_err(|e| EngineError::Internal(format!("spawning the scheduler thread: {e}")))?;
        Ok(engine)
    }

    pub fn tokenizer(&self) -> &GgufTokenizer {
        &self.tokenizer
    }

    pub fn context_length(&self) -> usize {
        self.admission.context_length
    }

    /// Decode steps run so far (for tests that wait on progress without sleeping).
    pub fn steps(&self) -> u64 {
        self.admission.counters.steps.load(Ordering::Relaxed)
    }

    /// Sequences currently holding KV.
    pub fn active(&self) -> u32 {
        self.admission.counters.active.load(Ordering::Relaxed)
    }

    /// Blocks of the KV store and tokens per block.
    pub fn kv_blocks(&self) -> (usize, usize) {
        (self.admission.kv_blocks, self.admission.block_tokens)
    }

    /// The same engine describing its hardware as `hardware` (e.g. a stand-in's label) in
    /// its worker record.
    pub fn with_hardware(mut self, hardware: String) -> Self {
        self.hardware = hardware;
        self
    }

    /// Prompt ids for `prompt` (chat template applied to chat prompts).
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        encode_prompt(&self.tokenizer, prompt, None)
    }

    /// The tool call grammar compiler of this engine's model (built once, on first use).
    pub fn grammars(&self) -> Result<Arc<Grammars>, EngineError> {
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer).map(Arc::new))
            .clone()
            .map_err(|e| EngineError::Internal(format!("tool call grammars: {e}")))
    }
}

/// Prompt ids for `prompt` (chat template applied to chat prompts; a chat offering `tools` or
/// holding calls is first rewritten for a template without tool support).
fn encode_prompt(
    tokenizer: &GgufTokenizer,
    prompt: &Prompt,
    tools: Option<&ToolSet>,
) -> Result<Vec<u32>, EngineError> {
    let rendered;
    let text = match prompt {
        Prompt::Text(t) => t,
        Prompt::Chat(messages) => {
            let msgs: Vec<ChatMessage> = match tools {
                Some(tools) => crate::tools::plain_messages(messages, tools),
                None => messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role.clone(),
                        content: m.content.clone(),
                    })
                    .collect(),
            };
            rendered = tokenizer
                .render_chat(&msgs)
                .map_err(|e| EngineError::InvalidArgument(format!("messages: {e}")))?;
            &rendered
        }
    };
    tokenizer
        .encode(text)
        .map_err(|e| EngineError::Internal(e.to_string()))
}

/// Whether `prompt` has more text than may be encoded on a runtime thread.
fn encodes_long(prompt: &Prompt) -> bool {
    let text = match prompt {
        Prompt::Text(t) => t.len(),
        Prompt::Chat(messages) => messages.iter().map(|m| m.content.len()).sum(),
    };
    text > ENCODE_INLINE_BYTES
}

/// Encodes `prompt` on tokio's blocking pool.
async fn encode_off_runtime(
    tokenizer: Arc<GgufTokenizer>,
    prompt: Prompt,
    tools: Option<ToolSet>,
) -> Result<Vec<u32>, EngineError> {
    match tokio::task::spawn_blocking(move || encode_prompt(&tokenizer, &prompt, tools.as_ref()))
        .await
    {
        Ok(ids) => ids,
        Err(failed) if failed.is_panic() => std::panic::resume_unwind(failed.into_panic()),
        Err(_) => Err(EngineError::Unavailable(
            "the worker is shutting down".into(),
        )),
    }
}

impl Engine for CandleEngine {
    fn kind(&self) -> &'static str {
        "candle"
    }

    fn models(&self) -> Vec<String> {
        self.model_ids.clone()
    }

    fn max_concurrent(&self) -> u32 {
        self.limits.max_seqs as u32
    }

    fn tokens_per_s(&self) -> f64 {
        self.tokens_per_s
    }

    fn hardware(&self) -> String {
        self.hardware.clone()
    }

    fn embeds(&self) -> bool {
        true
    }

    fn scores_prompts(&self) -> bool {
        true
    }

    fn tokenizer_spec(&self, model: &str) -> Option<(String, Vec<u8>)> {
        self.model_ids.iter().any(|m| m == model).then(|| {
            (
                crate::tokenizer::SPEC_FORMAT.to_string(),
                self.tokenizer.spec().to_bytes(),
            )
        })
    }

    fn context_length(&self, model: &str) -> Option<u32> {
        self.model_ids
            .iter()
            .any(|m| m == model)
            .then(|| u32::try_from(self.context_length()).unwrap_or(u32::MAX))
    }

    fn prefix_cache(&self) -> Option<Arc<KvPublisher>> {
        self.publisher.clone()
    }

    fn prefill_stats(&self) -> Option<PrefillStats> {
        let counters = &self.admission.counters;
        Some(PrefillStats {
            passes: counters.prefill_passes.load(Ordering::Relaxed),
            sequences: counters.prefill_sequences.load(Ordering::Relaxed),
            tokens: counters.prefill_tokens.load(Ordering::Relaxed),
        })
    }

    fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        let stats = *self
            .admission
            .counters
            .prefix
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Some(PrefixCacheStats {
            block_tokens: self.admission.block_tokens as u32,
            ..stats
        })
    }

    fn load(&self) -> EngineLoad {
        EngineLoad {
            queued: self.admission.counters.queued.load(Ordering::Relaxed),
            kv_used_bytes: self.admission.counters.kv_used.load(Ordering::Relaxed),
            queued_prompt_tokens: self.admission.counters.unprefilled.load(Ordering::Relaxed),
            queued_latency_critical_prompt_tokens: Some(
                self.admission
                    .counters
                    .unprefilled_latency_critical
                    .load(Ordering::Relaxed),
            ),
            prefill_tokens_per_s: self.admission.counters.prefill_rate.get(),
            // Its first token is prefill plus one decode step: nothing fixed to add.
            first_token_delay_ms: None,
            // One chunk per scheduler step, each step also decoding every running sequence: the
            // chunk in force now (paced while sequences with a promised rate decode).
            prefill_chunk_tokens: Some(self.admission.counters.chunk.load(Ordering::Relaxed)),
        }
    }

    fn submit(
        &self,
        request: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        if !self.model_ids.contains(&request.model) {
            return Err(EngineError::InvalidArgument(format!(
                "model: `{}` is not served here (this worker serves {:?})",
                request.model, self.model_ids
            )));
        }
        let s = &request.sampling;
        if s.max_tokens == 0 {
            return Err(EngineError::InvalidArgument(
                "sampling.max_tokens: must be at least 1".into(),
            ));
        }
        let resumed = request.resume_tokens.len();
        if request.embed && (resumed > 0 || !request.tools.tools.is_empty()) {
            return Err(EngineError::invalid_field(
                "embed",
                "an embedding request embeds its prompt alone: no resume_tokens, no tools",
            ));
        }
        if resumed >= s.max_tokens as usize {
            return Err(EngineError::InvalidArgument(format!(
                "resume_tokens: {resumed} tokens already reach sampling.max_tokens {}",
                s.max_tokens
            )));
        }
        let vocab = self.tokenizer.vocab_size() as u32;
        if let Some(bad) = request.resume_tokens.iter().find(|id| **id >= vocab) {
            return Err(EngineError::InvalidArgument(format!(
                "resume_tokens: id {bad} outside the vocabulary of {vocab}"
            )));
        }
        let params = SamplingParams {
            temperature: s.temperature.unwrap_or(0.0),
            top_p: s.top_p.unwrap_or(1.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            min_p: s.min_p,
            seed: s.seed.unwrap_or_else(|| {
                // No seed: a distinct stream per request.
                self.seed_counter
                    .fetch_add(0x9E37_79B9, Ordering::Relaxed)
                    .wrapping_mul(0x2545_F491_4F6C_DD1D)
                    ^ std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0)
            }),
            penalties: Penalties {
                presence: s.presence_penalty.unwrap_or(0.0),
                frequency: s.frequency_penalty.unwrap_or(0.0),
                repetition: s.repetition_penalty.unwrap_or(1.0),
                logit_bias: s.logit_bias.clone(),
                banned: if s.ignore_eos {
                    let mut ids: Vec<u32> = self.tokenizer.stop_ids().iter().copied().collect();
                    ids.sort_unstable();
                    ids
                } else {
                    Vec::new()
                },
            },
        };
        params
            .validate(vocab as usize)
            .map_err(EngineError::InvalidArgument)?;

        // Tools: the prompt tells the model about them, and a callable set constrains the
        // answer (its grammar compiled now, so a refused one fails before any token).
        let tool_set = match &request.prompt {
            Prompt::Chat(messages)
                if crate::tools::needs_plain_messages(messages, &request.tools) =>
            {
                Some(crate::tools::tool_set(&request.tools)?)
            }
            _ if request.tools.callable() => Some(crate::tools::tool_set(&request.tools)?),
            _ => None,
        };
        let callable = tool_set.as_ref().filter(|set| set.callable());
        let constraint = match (callable, &s.response_format) {
            (Some(_), Some(_)) if s.wants_json() => {
                return Err(EngineError::invalid_field(
                    "sampling.response_format",
                    "a JSON answer and callable tools in one request are not supported here: \
                     ask for one, or set tool_choice to none",
                ));
            }
            (Some(set), _) => Some(Box::new(self.grammars()?.constraint(
                &self.tokenizer,
                set,
                &crate::tools::id_prefix(&request.request_id),
                &request.resume_tokens,
            )?)),
            (None, Some(format)) if s.wants_json() => Some(Box::new(self.grammars()?.json(
                &self.tokenizer,
                format,
                &request.resume_tokens,
            )?)),
            _ => None,
        };

        let prompt_ids = match request.prompt_ids {
            Some(ids) => {
                if let Some(bad) = ids.iter().find(|id| **id >= vocab) {
                    return Err(EngineError::InvalidArgument(format!(
                        "prompt_token_ids: id {bad} outside the vocabulary of {vocab}"
                    )));
                }
                Some(ids)
            }
            // Milliseconds of work: not on the caller's thread (the worker's stream task).
            None if encodes_long(&request.prompt) => None,
            None => Some(encode_prompt(
                &self.tokenizer,
                &request.prompt,
                tool_set.as_ref(),
            )?),
        };
        let remaining = s.max_tokens as usize - resumed;
        // Bounded: a reader that stops taking events (a router out of flow-control credit
        // because its client stopped reading) pauses this sequence, never the batch.
        // Room for the end's events and a scored prompt.
        let (tx, rx) = mpsc::channel((remaining + 5).min(EVENT_BUFFER));
        let job = Job {
            request_id: request.request_id,
            context: Vec::new(),
            prompt_tokens: 0,
            resumed,
            remaining,
            sampler: Sampler::new(params),
            logprobs: s.logprobs.map(|top| top.min(MAX_TOP_LOGPROBS)),
            prompt_logprobs: s.prompt_logprobs.map(|top| top.min(MAX_TOP_LOGPROBS)),
            scored: Vec::new(),
            pooled: request.embed.then(Vec::new),
            stops: s.stop.clone(),
            tx,
            cancel,
            latency_critical: request.latency_critical,
            min_tokens_per_s: request.min_tokens_per_s,
            cached_tokens: 0,
            arrived: Instant::now(),
            constraint,
        };
        let Some(prompt_ids) = prompt_ids else {
            let (admission, tokenizer) = (self.admission.clone(), self.tokenizer.clone());
            let prompt_field = request.prompt.field();
            let (prompt, resume) = (request.prompt, request.resume_tokens);
            // Driven by whoever reads the stream: a refusal arrives as its one event.
            let refusals = job.tx.clone();
            let admit = async move {
                let admitted = encode_off_runtime(tokenizer, prompt, tool_set)
                    .await
                    .and_then(|ids| admission.admit(job, ids, prompt_field, &resume));
                if let Err(error) = admitted {
                    let _ = refusals.send(Err(error)).await;
                }
            };
            return Ok(EngineStream::driven(rx, admit));
        };
        self.admission.admit(
            job,
            prompt_ids,
            request.prompt.field(),
            &request.resume_tokens,
        )?;
        Ok(rx.into())
    }
}

/// A sampled token's log probabilities, in the wire's terms.
fn token_logprobs(
    tokenizer: &GgufTokenizer,
    row: &[f32],
    id: u32,
    top: u32,
) -> Box<v1::TokenLogprobs> {
    let (chosen, best) = crate::sampling::logprobs(row, id, top as usize);
    let entry = |token_id: u32, logprob: f32| v1::TokenLogprob {
        token_id,
        token: tokenizer.token_bytes(token_id).to_vec(),
        logprob,
    };
    Box::new(v1::TokenLogprobs {
        chosen: Some(entry(id, chosen)),
        top: best.into_iter().map(|(t, l)| entry(t, l)).collect(),
    })
}

/// The mean of `tokens` hidden states whose sum is `sum`, scaled to length 1 (a vector of no
/// length stays as it is).
fn unit_mean(mut sum: Vec<f32>, tokens: usize) -> Vec<f32> {
    let scale = 1.0 / tokens.max(1) as f32;
    sum.iter_mut().for_each(|x| *x *= scale);
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        sum.iter_mut().for_each(|x| *x /= norm);
    }
    sum
}

/// Most prompt tokens being scored in one prefill pass (see [`Scheduler::plan_prefill`]).
const SCORED_CHUNK: usize = 256;

/// Scores the prompt tokens a prefill chunk from position `from` predicted: `rows[j]`, the
/// logits after context token `from + j`, give the probability of token `from + j + 1`. The
/// first prompt token, which nothing predicts, is named with log probability 0.
fn score_prompt(
    job: &mut Job,
    tokenizer: &GgufTokenizer,
    from: usize,
    rows: &[Vec<f32>],
    top: u32,
) {
    let prompt = job.prompt_tokens as usize;
    if from == 0 && prompt > 0 {
        let first = job.context[0];
        job.scored.push(v1::TokenLogprobs {
            chosen: Some(v1::TokenLogprob {
                token_id: first,
                token: tokenizer.token_bytes(first).to_vec(),
                logprob: 0.0,
            }),
            top: Vec::new(),
        });
    }
    for (j, row) in rows.iter().enumerate() {
        let Some(&next) = job.context[..prompt].get(from + j + 1) else {
            break;
        };
        job.scored.push(*token_logprobs(tokenizer, row, next, top));
    }
}

struct Scheduler {
    model: Llama,
    tokenizer: Arc<GgufTokenizer>,
    limits: SchedulerLimits,
    store: KvStore,
    prefix: PrefixCache,
    publisher: Option<Arc<KvPublisher>>,
    counters: Arc<Counters>,
    rx: std_mpsc::Receiver<Job>,
    waiting: VecDeque<Job>,
    active: Vec<Seq>,
    /// Decode steps per second, averaged: what a decode step costs, for pacing prefill.
    decode_rate: RateMeter,
    /// A one-token step's time at warm-up: what a pass costs beyond its tokens, for packing.
    pass_overhead_s: f64,
}

fn done(job: &Job, reason: StopReason, completion: usize) {
    let _ = job.tx.try_send(Ok(EngineEvent::Done {
        reason,
        prompt_tokens: job.prompt_tokens,
        completion_tokens: (job.resumed + completion) as u32,
        cached_prompt_tokens: job.cached_tokens.min(job.prompt_tokens as usize) as u32,
    }));
}

/// The engine's own compute pool when it is to use fewer threads than the machine has cores
/// (engines sharing a host); `None`: it computes on the process-wide pools, the fastest for a
/// worker that owns the machine (see `crate::qmatrix::for_each_range`).
fn compute_pool(threads: usize) -> Result<Option<rayon::ThreadPool>, EngineError> {
    if threads == 0 || threads >= candle_core::utils::get_num_threads() {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("candle-compute-{i}"))
        .build()
        .map(Some)
        .map_err(|e| EngineError::Internal(format!("starting the compute pool: {e}")))
}

/// One short prefill and a decode, so the first request does not pay for lazy
/// initialisation; returns the prefill's tokens and seconds and the decode step's seconds.
fn warm_up(model: &Llama) -> Result<(usize, f64, f64), EngineError> {
    let warm = |e: crate::model::ModelError| EngineError::Internal(format!("warm-up: {e}"));
    // The warm-up prefill is one KV block long so the prefill rate it measures is a real
    // one: a router compares workers by it, and a worker that has not served yet must not
    // look faster (or slower) than one that has.
    let warm_prompt: Vec<u32> = (0..WARM_UP_PROMPT_TOKENS.min(model.config.context_length - 1))
        .map(|i| i as u32)
        .collect();
    let (mut store, mut cache) = model.single_sequence(warm_prompt.len() + 1).map_err(warm)?;
    let t0 = Instant::now();
    model
        .prefill(&warm_prompt, &mut cache, &mut store)
        .map_err(warm)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    model
        .decode(&[3], &mut [&mut cache], &mut store)
        .map_err(warm)?;
    let step = t0.elapsed().as_secs_f64().max(1e-6);
    Ok((warm_prompt.len(), prefill_s, step))
}

impl Scheduler {
    fn run(mut self) {
        loop {
            // Idle: block until work arrives (or the engine is dropped).
            if self.active.is_empty() && self.waiting.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.enqueue(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.enqueue(job);
            }
            self.reap_cancelled();
            self.admit();
            self.prefill();
            self.decode_step();
            self.publish();
            if self.stalled() {
                // Every sequence waits for its reader: nap until a job or a reader's progress.
                match self.rx.recv_timeout(STALL_NAP) {
                    Ok(job) => self.enqueue(job),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        }
    }

    /// Whether no sequence can make progress until its reader takes events: all are prefilled
    /// and none has room for a token and its end.
    fn stalled(&self) -> bool {
        !self.active.is_empty()
            && self
                .active
                .iter()
                .all(|s| s.next.is_some() && !s.can_emit())
    }

    /// Queues a job: latency-critical ones go after the latency-critical jobs already waiting
    /// (which form the queue's head) and before every cost-sensitive one.
    fn enqueue(&mut self, job: Job) {
        if job.latency_critical {
            let at = self
                .waiting
                .iter()
                .position(|j| !j.latency_critical)
                .unwrap_or(self.waiting.len());
            self.waiting.insert(at, job);
        } else {
            self.waiting.push_back(job);
        }
    }

    fn publish(&mut self) {
        // Per lane: (all, latency-critical).
        let mut unprefilled = [0usize; 2];
        let waiting = self.waiting.iter().map(|j| (j, j.context.len()));
        let joining = self
            .active
            .iter()
            .filter(|s| s.next.is_none())
            .map(|s| (&s.job, s.job.context.len() - s.cache.len()));
        for (job, tokens) in waiting.chain(joining) {
            unprefilled[0] += tokens;
            if job.latency_critical {
                unprefilled[1] += tokens;
            }
        }
        self.counters
            .unprefilled
            .store(unprefilled[0] as u64, Ordering::Relaxed);
        self.counters
            .unprefilled_latency_critical
            .store(unprefilled[1] as u64, Ordering::Relaxed);
        self.counters
            .queued
            .store(self.waiting.len() as u32, Ordering::Relaxed);
        self.publish_occupancy();
        self.chunk_in_force();
        let events = self.prefix.take_events();
        if let Some(publisher) = &self.publisher {
            publisher.publish(events);
        }
    }

    /// Sequences running and the blocks they hold.
    fn publish_occupancy(&self) {
        self.counters
            .active
            .store(self.active.len() as u32, Ordering::Relaxed);
        let kv = self.prefix.active_blocks() as u64 * self.store.bytes_per_block();
        self.counters.kv_used.store(kv, Ordering::Relaxed);
        *self
            .counters
            .prefix
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.prefix.stats();
    }

    /// A sequence leaves the batch: its blocks go back to the cache (named ones stay
    /// findable) or the free list, the counters say so, and then its reader learns how it
    /// ended.
    fn retire(&mut self, seq: Seq) {
        self.prefix.release(seq.blocks);
        self.publish_occupancy();
        if let Some(reason) = seq.ended {
            done(&seq.job, reason, seq.generated);
        }
    }

    /// Cancelled or abandoned (receiver dropped) sequences end now; their blocks are released
    /// before the next step.
    fn reap_cancelled(&mut self) {
        let gone = |job: &Job| job.cancel.is_cancelled() || job.tx.is_closed();
        self.waiting.retain(|job| {
            if gone(job) {
                done(job, StopReason::Cancelled, 0);
                false
            } else {
                true
            }
        });
        let (ended, running): (Vec<Seq>, Vec<Seq>) =
            self.active.drain(..).partition(|seq| gone(&seq.job));
        self.active = running;
        for mut seq in ended {
            seq.ended = Some(StopReason::Cancelled);
            self.retire(seq);
        }
        self.publish();
    }

    fn admit(&mut self) {
        // FIFO: the head waits for room rather than being overtaken by smaller requests.
        while self.active.len() < self.limits.max_seqs {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let total = job.context.len() + job.remaining;
            // A prompt being scored needs every position's logits, one being embedded every
            // position's hidden state: none come from the cache.
            let reuse = match job.prompt_logprobs.is_some() || job.pooled.is_some() {
                true => Reuse::None,
                false => Reuse::Cached,
            };
            let Some(admission) = self.prefix.admit(&job.context, total, reuse) else {
                break;
            };
            let Some(mut job) = self.waiting.pop_front() else {
                break;
            };
            job.cached_tokens = admission.cached_tokens;
            let stop = StopMatcher::new(job.stops.clone());
            let mut detok = Detokenizer::default();
            // Prime with the resumed ids so a character split across the failover boundary is
            // completed, not lost (its first bytes were never emitted).
            for id in &job.context[job.prompt_tokens as usize..] {
                detok.push(&self.tokenizer, *id);
            }
            tracing::debug!(
                request_id = %job.request_id,
                context = job.context.len(),
                cached = admission.cached_tokens,
                "admitted"
            );
            self.active.push(Seq {
                cache: SeqCache::new(admission.blocks.table.clone(), admission.cached_tokens),
                blocks: admission.blocks,
                tokens: job.context.clone(),
                job,
                next: None,
                generated: 0,
                detok,
                stop,
                ended: None,
            });
        }
        self.publish();
    }

    /// The joining sequences in the order their prompts share a step's prefill:
    /// latency-critical ones first; among equals the one closest to its first token (shortest
    /// remaining prefill), which is what keeps a follow-up turn whose history is cached from
    /// waiting behind a long cold prompt. Time already waited counts as tokens at the measured
    /// prefill rate, so a long prompt moves up as it waits and a stream of short ones cannot
    /// starve it.
    fn prefill_order(&self) -> Vec<usize> {
        let rate = self.counters.prefill_rate.get();
        let now = Instant::now();
        let urgency = |s: &Seq| {
            let remaining = (s.job.context.len() - s.cache.len()) as f64;
            let waited = now.duration_since(s.job.arrived).as_secs_f64();
            (!s.job.latency_critical, remaining - rate * waited)
        };
        let mut joining: Vec<(usize, (bool, f64))> = self
            .active
            .iter()
            .enumerate()
            .filter(|(_, s)| s.next.is_none())
            .map(|(i, s)| (i, urgency(s)))
            .collect();
        joining.sort_by(|(_, a), (_, b)| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        joining.into_iter().map(|(i, _)| i).collect()
    }

    /// The prefill chunk for this iteration (prompt tokens, whichever sequences they are of):
    /// the step target and the fastest decode rate promised to a sequence decoding now bound
    /// it (see [`crate::pacing`]). Published for load reports at once, so a report never shows
    /// the chunk of a sequence already gone.
    fn chunk_in_force(&self) -> usize {
        let promised = self
            .active
            .iter()
            .filter(|s| s.next.is_some())
            .map(|s| s.job.min_tokens_per_s)
            .fold(None, |fastest: Option<f64>, rate| {
                Some(fastest.map_or(rate, |f| f.max(rate)))
            });
        let chunk = self.limits.chunk_in_force(
            promised,
            self.decode_rate.get(),
            self.counters.prefill_rate.get(),
        );
        self.counters
            .chunk
            .store(u32::try_from(chunk).unwrap_or(u32::MAX), Ordering::Relaxed);
        chunk
    }

    /// One prefill pass. The chunk in force is the step's prompt-token budget, shared out in
    /// [`Self::prefill_order`]: the first prompt takes what it still needs up to the budget,
    /// the next what is left, and so on, all in one forward pass. Short prompts arriving
    /// together (a burst of chat turns, a batch of embedding inputs) are prefilled together
    /// rather than one per step; a long one takes the budget alone, as before.
    fn prefill(&mut self) {
        let mut plan = self.plan_prefill(self.chunk_in_force());
        if plan.is_empty() {
            return;
        }
        // Caches are lent out in sequence order.
        plan.sort_unstable_by_key(|p| p.seq);
        let started = Instant::now();
        let result = {
            let mut chunks = Vec::with_capacity(plan.len());
            let mut readers = Vec::with_capacity(plan.len());
            let mut planned = plan.iter().peekable();
            for (i, seq) in self.active.iter_mut().enumerate() {
                let Some(part) = planned.next_if(|p| p.seq == i) else {
                    continue;
                };
                let Seq { job, cache, .. } = seq;
                let logits = match (job.prompt_logprobs, &job.pooled) {
                    (_, Some(_)) => Logits::HiddenSum,
                    (Some(_), None) => Logits::EveryToken,
                    (None, None) => Logits::LastToken,
                };
                chunks.push(Chunk {
                    tokens: &job.context[part.from..part.end],
                    cache,
                    logits,
                });
                readers.push((&job.cancel, &job.tx));
            }
            // Given up only when nobody in the pass wants it: the others' work would be lost.
            let abandoned = || {
                readers
                    .iter()
                    .all(|(cancel, tx)| cancel.is_cancelled() || tx.is_closed())
            };
            self.model.forward(&mut chunks, &mut self.store, abandoned)
        };
        if matches!(result, Err(ModelError::Abandoned)) {
            // Ended by the next iteration's reap, like any cancelled sequence.
            tracing::debug!(sequences = plan.len(), "prefill pass abandoned");
            return;
        }
        let tokens: usize = plan.iter().map(|p| p.end - p.from).sum();
        let elapsed = started.elapsed().as_secs_f64();
        tracing::debug!(
            sequences = plan.len(),
            tokens,
            elapsed_ms = (elapsed * 1e3) as u64,
            "prefill pass"
        );
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                for part in plan.iter().rev() {
                    let seq = self.active.remove(part.seq);
                    let _ = seq
                        .job
                        .tx
                        .try_send(Err(EngineError::Internal(format!("prefill: {e}"))));
                    self.retire(seq);
                }
                return;
            }
        };
        self.counters.prefill_rate.record(tokens as f64, elapsed);
        let counters = &self.counters;
        counters.prefill_passes.fetch_add(1, Ordering::Relaxed);
        counters
            .prefill_sequences
            .fetch_add(plan.len() as u64, Ordering::Relaxed);
        counters
            .prefill_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let mut ended = Vec::new();
        for (part, output) in plan.iter().zip(outputs) {
            let seq = &mut self.active[part.seq];
            self.prefix
                .commit(&mut seq.blocks, &seq.tokens, seq.cache.len());
            if !self.after_prefill(part, output) {
                ended.push(part.seq);
            }
        }
        for i in ended.into_iter().rev() {
            let seq = self.active.remove(i);
            self.retire(seq);
        }
    }

    /// Shares a step's prefill `budget` (prompt tokens) among the joining sequences, most
    /// urgent first, as many of them as `prefill_pack` says. Scored prompts together take at
    /// most [`SCORED_CHUNK`]: each of their tokens returns a row of logits over the whole
    /// vocabulary.
    fn plan_prefill(&self, budget: usize) -> Vec<PrefillPart> {
        let order = self.prefill_order();
        let most = match self.limits.prefill_pack {
            PrefillPack::AtMost(n) => n,
            PrefillPack::Auto => {
                let remaining: usize = order
                    .iter()
                    .map(|&i| self.active[i].job.context.len() - self.active[i].cache.len())
                    .sum();
                // What a pass costs besides its prompts: its fixed cost (a one-token step's),
                // and the decode step after it while anything decodes.
                let decoding = self.active.iter().any(|s| s.next.is_some());
                let step_s = match self.decode_rate.get() {
                    rate if decoding && rate > 0.0 => 1.0 / rate,
                    _ => 0.0,
                };
                pack_size(
                    order.len(),
                    remaining as f64 / order.len().max(1) as f64,
                    self.counters.prefill_rate.get(),
                    self.pass_overhead_s + step_s,
                )
            }
        };
        let (mut left, mut scored_left) = (budget, SCORED_CHUNK);
        let mut plan = Vec::new();
        for i in order {
            if left == 0 || plan.len() >= most.max(1) {
                break;
            }
            let job = &self.active[i].job;
            let scored = job.prompt_logprobs.is_some();
            let take = if scored { left.min(scored_left) } else { left };
            if take == 0 {
                continue;
            }
            let from = self.active[i].cache.len();
            let end = (from + take).min(job.context.len());
            left -= end - from;
            if scored {
                scored_left -= end - from;
            }
            plan.push(PrefillPart { seq: i, from, end });
        }
        plan
    }

    /// Takes sequence `part.seq`'s share of a prefill pass (`output`, as its [`Logits`]
    /// asked): scores, pools or, once its prompt is done, samples its first token. False when
    /// the sequence has ended (answered or failed).
    fn after_prefill(&mut self, part: &PrefillPart, output: Tensor) -> bool {
        let i = part.seq;
        if self.active[i].job.pooled.is_some() {
            return self.pool_embedding(i, output, part.end);
        }
        let seq = &mut self.active[i];
        let mut rows = match crate::model::logits_rows(&output) {
            Ok(rows) => rows,
            Err(e) => {
                let error = EngineError::Internal(format!("prefill: {e}"));
                let _ = seq.job.tx.try_send(Err(error));
                return false;
            }
        };
        if let Some(top) = seq.job.prompt_logprobs {
            score_prompt(&mut seq.job, &self.tokenizer, part.from, &rows, top);
        }
        if part.end < seq.job.context.len() {
            return true;
        }
        let last = rows.len() - 1;
        if let Err(e) = constrain(&mut seq.job, &mut rows[last]) {
            let _ = seq.job.tx.try_send(Err(e));
            return false;
        }
        if seq.job.prompt_logprobs.is_some() {
            let scored = std::mem::take(&mut seq.job.scored);
            let _ = seq.job.tx.try_send(Ok(EngineEvent::PromptLogprobs(scored)));
        }
        let id = seq.job.sampler.sample(&rows[last]);
        let logprobs = seq
            .job
            .logprobs
            .map(|top| token_logprobs(&self.tokenizer, &rows[last], id, top));
        self.emit(i, id, logprobs)
    }

    /// Adds a prefill chunk's hidden states (`sum`) to sequence `i`'s embedding; once its
    /// prompt is done (`end`), sends the mean scaled to unit length (as llama.cpp's mean
    /// pooling with its default Euclidean normalisation). False once the sequence has ended.
    fn pool_embedding(&mut self, i: usize, sum: Tensor, end: usize) -> bool {
        let seq = &mut self.active[i];
        let pooled = seq.job.pooled.get_or_insert_default();
        match sum.to_vec1::<f32>() {
            Ok(sum) if pooled.is_empty() => *pooled = sum,
            Ok(sum) => pooled.iter_mut().zip(sum).for_each(|(p, s)| *p += s),
            Err(e) => {
                let error = EngineError::Internal(format!("embedding: {e}"));
                let _ = seq.job.tx.try_send(Err(error));
                return false;
            }
        }
        if end < seq.job.context.len() {
            return true;
        }
        let vector = unit_mean(seq.job.pooled.take().unwrap_or_default(), end);
        let _ = seq.job.tx.try_send(Ok(EngineEvent::Embedding(vector)));
        seq.ended = Some(StopReason::Stop);
        false
    }

    fn decode_step(&mut self) {
        let mut idx = Vec::with_capacity(self.active.len());
        let mut tokens = Vec::with_capacity(self.active.len());
        for (i, s) in self.active.iter().enumerate() {
            // A sequence whose reader is behind sits this step out.
            if let Some(t) = s.next.filter(|_| s.can_emit()) {
                idx.push(i);
                tokens.push(t);
            }
        }
        if tokens.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = {
            // Decided once above: a reader catching up meanwhile must not change the batch.
            let mut caches: Vec<&mut SeqCache> = Vec::with_capacity(idx.len());
            let mut next = idx.iter().peekable();
            for (i, s) in self.active.iter_mut().enumerate() {
                if next.next_if_eq(&&i).is_some() {
                    caches.push(&mut s.cache);
                }
            }
            self.model
                .decode(&tokens, &mut caches, &mut self.store)
                .and_then(|l| crate::model::logits_rows(&l))
        };
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        self.decode_rate
            .record(1.0, started.elapsed().as_secs_f64());
        match result {
            Ok(mut rows) => {
                for &i in &idx {
                    let seq = &mut self.active[i];
                    self.prefix
                        .commit(&mut seq.blocks, &seq.tokens, seq.cache.len());
                }
                let mut finished = Vec::new();
                for (row, i) in rows.iter_mut().zip(&idx) {
                    let job = &mut self.active[*i].job;
                    if let Err(e) = constrain(job, row) {
                        let _ = job.tx.try_send(Err(e));
                        finished.push(*i);
                        continue;
                    }
                    let id = job.sampler.sample(row);
                    let logprobs = job
                        .logprobs
                        .map(|top| token_logprobs(&self.tokenizer, row, id, top));
                    if !self.emit(*i, id, logprobs) {
                        finished.push(*i);
                    }
                }
                for i in finished.into_iter().rev() {
                    let seq = self.active.remove(i);
                    self.retire(seq);
                }
            }
            Err(e) => {
                for seq in std::mem::take(&mut self.active) {
                    let _ = seq
                        .job
                        .tx
                        .try_send(Err(EngineError::Internal(format!("decode step: {e}"))));
                    self.retire(seq);
                }
            }
        }
    }

    /// Delivers sampled token `id` of sequence `i` (with its log probabilities when asked
    /// for); false when the sequence has ended.
    fn emit(&mut self, i: usize, id: u32, logprobs: Option<Box<v1::TokenLogprobs>>) -> bool {
        if self.active[i].job.constraint.is_some() {
            return self.emit_constrained(i, id, logprobs);
        }
        let tokenizer = self.tokenizer.clone();
        let seq = &mut self.active[i];
        if tokenizer.stop_ids().contains(&id) {
            let held = seq.stop.finish() + &seq.detok.finish();
            if !held.is_empty() {
                let _ = seq.job.tx.try_send(Ok(EngineEvent::Token {
                    id,
                    text: held,
                    logprobs,
                }));
            }
            seq.ended = Some(StopReason::Stop);
            return false;
        }
        seq.generated += 1;
        let text = seq.detok.push(&tokenizer, id);
        let last = seq.generated >= seq.job.remaining;
        match seq.stop.push(&text) {
            StopOutcome::Stopped(before) => {
                let _ = seq.job.tx.try_send(Ok(EngineEvent::Token {
                    id,
                    text: before,
                    logprobs,
                }));
                report_stop_sequence(&seq.stop, &seq.job.tx);
                seq.ended = Some(StopReason::Stop);
                false
            }
            StopOutcome::Emit(mut out) => {
                if last {
                    out.push_str(&seq.stop.finish());
                    out.push_str(&seq.detok.finish());
                }
                if seq
                    .job
                    .tx
                    .try_send(Ok(EngineEvent::Token {
                        id,
                        text: out,
                        logprobs,
                    }))
                    .is_err()
                {
                    // Receiver gone: nobody wants the rest.
                    return false;
                }
                if last {
                    seq.ended = Some(StopReason::Length);
                    return false;
                }
                seq.next = Some(id);
                seq.tokens.push(id);
                true
            }
        }
    }

    /// [`Self::emit`] for a sequence under a grammar (tool calls, or a JSON answer): the
    /// token's text goes through the call parser, if any; the `Token` event carries its plain
    /// text (empty while it spells a call) and call pieces follow it as `ToolCall` events. The
    /// sequence ends when the grammar is complete, with `ToolCalls` when it called any.
    fn emit_constrained(
        &mut self,
        i: usize,
        id: u32,
        logprobs: Option<Box<v1::TokenLogprobs>>,
    ) -> bool {
        let tokenizer = self.tokenizer.clone();
        let seq = &mut self.active[i];
        let Some(tools) = seq.job.constraint.as_deref_mut() else {
            return false;
        };
        let ending = tokenizer.stop_ids().contains(&id);
        let mut pieces = Vec::new();
        if !ending {
            if let Err(e) = tools.consume(id) {
                let _ = seq.job.tx.try_send(Err(e));
                return false;
            }
            seq.generated += 1;
            pieces = tools.push(&seq.detok.push(&tokenizer, id));
        }
        let last = ending || tools.complete() || seq.generated >= seq.job.remaining;
        if last {
            pieces.extend(tools.push(&seq.detok.finish()));
            pieces.extend(tools.finish());
        }
        let mut text = String::new();
        let mut calls = Vec::new();
        for piece in pieces {
            match crate::tools::delta(piece) {
                Ok(call) => calls.push(call),
                Err(t) => text.push_str(&t),
            }
        }
        let mut stopped = false;
        match seq.stop.push(&text) {
            StopOutcome::Stopped(before) => {
                text = before;
                stopped = true;
            }
            StopOutcome::Emit(mut out) => {
                if last {
                    out.push_str(&seq.stop.finish());
                }
                text = out;
            }
        }
        // The end token itself is not part of the answer: sent only to carry held text.
        if (!ending || !text.is_empty())
            && seq
                .job
                .tx
                .try_send(Ok(EngineEvent::Token { id, text, logprobs }))
                .is_err()
        {
            return false;
        }
        for call in calls {
            if seq
                .job
                .tx
                .try_send(Ok(EngineEvent::ToolCall(call)))
                .is_err()
            {
                return false;
            }
        }
        if stopped || last {
            tracing::debug!(
                request_id = %seq.job.request_id,
                mask_us_per_token = tools.mask_us_per_token(),
                "tool call grammar"
            );
            if stopped {
                report_stop_sequence(&seq.stop, &seq.job.tx);
            }
            // Cut short by max_tokens it is `Length` even with calls: the last may be partial.
            seq.ended = Some(if stopped {
                StopReason::Stop
            } else if !(ending || tools.complete()) {
                StopReason::Length
            } else if tools.called() {
                StopReason::ToolCalls
            } else {
                StopReason::Stop
            });
            return false;
        }
        seq.next = Some(id);
        seq.tokens.push(id);
        true
    }
}

/// Masks a sequence's logits row to what its tool call grammar allows (nothing to do for a
/// sequence without tools).
fn constrain(job: &mut Job, row: &mut [f32]) -> Result<(), EngineError> {
    match job.constraint.as_deref_mut() {
        Some(tools) => tools.mask(row),
        None => Ok(()),
    }
}
