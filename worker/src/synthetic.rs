//! The **synthetic load-test engine**: no model, deterministic text at a configured
//! time-to-first-token and decode rate. It exists to load-test and exercise the cluster
//! (routing, streaming, cancellation, failover) without model cost; it is never a stand-in for
//! the real engines and always advertises itself as `synthetic`.
//!
//! Output is a pure function of the request's instructions (the last user message): token `i`
//! is word `i mod n` of those instructions. Tests predict it with [`synthetic_text`].
//!
//! Like the real engines it serves latency-critical requests first: one waiting for a slot is
//! admitted before every waiting cost-sensitive request. Its first token comes after `ttft`
//! plus the prompt at `prefill_tokens_per_s`, the rate it reports in load frames together with
//! the prompt tokens not yet "prefilled".
//!
//! Optionally ([`SyntheticEngine::with_simulated_cache`], off by default) it *simulates* a
//! prefix cache, so cache-aware routing can be exercised and load-tested across processes
//! without a model — see [`SimulatedCacheConfig`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use switchyard_proto::kv_blocks;

use crate::engine::{
    Engine, EngineError, EngineEvent, EngineLoad, EngineRequest, EngineStream, PrefixCacheStats,
    Prompt, StopReason, certain,
};
use crate::kv_events::{KvBatch, KvPublisher};

/// Vocabulary size the synthetic token ids are drawn from (SmolLM2's, for realism in benches).
const VOCAB: u32 = 49_152;

#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub models: Vec<String>,
    /// Delay before the first token (models prefill).
    pub ttft: Duration,
    /// Decode rate of each stream.
    pub tokens_per_s: f64,
    pub max_concurrent: u32,
    /// Requests waiting for a slot beyond which new ones are refused.
    pub max_queue: u32,
    /// Prompt tokens "prefilled" per second, added to `ttft` and reported in load frames.
    pub prefill_tokens_per_s: f64,
}

/// Prefill rate of a synthetic engine built without one (see [`SyntheticConfig`]).
pub const DEFAULT_PREFILL_TOKENS_PER_S: f64 = 10_000.0;

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            models: vec!["synthetic".into()],
            ttft: Duration::from_millis(50),
            tokens_per_s: 100.0,
            max_concurrent: 16,
            max_queue: 64,
            prefill_tokens_per_s: DEFAULT_PREFILL_TOKENS_PER_S,
        }
    }
}

/// The synthetic engine's **simulated prefix cache** — a load-test model, not a KV cache (the
/// synthetic engine computes nothing). It reproduces what routers and metrics see of a real
/// engine's prefix cache:
///
/// - the prompt's token ids are the router's (`prompt_ids`) when given, else one id per word
///   of each message plus four framing ids per message (the same count as the engine's
///   `prompt_tokens`), so a conversation's later turns share its earlier turns' ids;
/// - their full blocks of `block_tokens` are named with the shared chained hash
///   (`switchyard_proto::kv_blocks`), looked up (the leading blocks found are the request's
///   `cached_prompt_tokens`) and then held, least recently used evicted beyond
///   `capacity_blocks`, from the moment the request is admitted;
/// - every change is published through a [`KvPublisher`] (so workers send `KvEvents`), the
///   counters through [`Engine::prefix_cache_stats`];
/// - cached tokens are not "prefilled": the first token comes that much sooner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimulatedCacheConfig {
    /// Blocks held at most.
    pub capacity_blocks: usize,
    /// Tokens per block.
    pub block_tokens: u32,
}

impl SimulatedCacheConfig {
    /// Checks the sizes (errors name the command-line flags).
    pub fn validate(&self) -> Result<(), String> {
        if self.capacity_blocks == 0 {
            return Err("--synthetic-prefix-cache-blocks: must be at least 1".into());
        }
        if self.block_tokens == 0 {
            return Err("--synthetic-block-tokens: must be at least 1".into());
        }
        Ok(())
    }
}

/// See [`SimulatedCacheConfig`].
#[derive(Debug)]
struct SimulatedCache {
    config: SimulatedCacheConfig,
    publisher: Arc<KvPublisher>,
    state: Mutex<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    /// Block → its last use.
    last_use: HashMap<u64, u64>,
    /// Last use → block (oldest first).
    by_age: BTreeMap<u64, u64>,
    clock: u64,
    stats: PrefixCacheStats,
}

impl SimulatedCache {
    fn new(config: SimulatedCacheConfig) -> Self {
        Self {
            config,
            publisher: Arc::new(KvPublisher::new(config.block_tokens)),
            state: Mutex::new(CacheState::default()),
        }
    }

    /// Looks `ids` up and holds their full blocks; returns the leading tokens that were held.
    fn admit(&self, ids: &[u32]) -> u32 {
        let blocks = kv_blocks::block_hashes(ids, self.config.block_tokens as usize);
        let mut state = self.state.lock().expect("cache lock");
        let state = &mut *state;
        let hit_blocks = blocks
            .iter()
            .take_while(|h| state.last_use.contains_key(h))
            .count();
        let cached = (hit_blocks * self.config.block_tokens as usize).min(ids.len()) as u32;
        state.stats.lookups += 1;
        state.stats.lookup_tokens += ids.len() as u64;
        state.stats.hit_tokens += u64::from(cached);
        let mut batch = KvBatch::default();
        for &hash in &blocks {
            state.clock += 1;
            match state.last_use.insert(hash, state.clock) {
                Some(previous) => {
                    state.by_age.remove(&previous);
                }
                None => batch.stored.push(hash),
            }
            state.by_age.insert(state.clock, hash);
        }
        while state.last_use.len() > self.config.capacity_blocks {
            let Some((_, oldest)) = state.by_age.pop_first() else {
                break;
            };
            state.last_use.remove(&oldest);
            state.stats.evictions += 1;
            // Stored and evicted within this batch: it never needs to be announced.
            match batch.stored.iter().position(|&h| h == oldest) {
                Some(at) => {
                    batch.stored.swap_remove(at);
                }
                None => batch.removed.push(oldest),
            }
        }
        // Published under the lock: the batches reach subscribers in the order they happened.
        self.publisher.publish(batch);
        cached
    }

    fn stats(&self) -> PrefixCacheStats {
        let state = self.state.lock().expect("cache lock");
        let held = state.last_use.len() as u64;
        PrefixCacheStats {
            block_tokens: self.config.block_tokens,
            cached_blocks: held,
            active_blocks: 0,
            free_blocks: (self.config.capacity_blocks as u64).saturating_sub(held),
            ..state.stats
        }
    }
}

/// The synthetic prompt's token ids (see [`SimulatedCacheConfig`]).
fn synthetic_prompt_ids(request: &EngineRequest) -> Vec<u32> {
    const MESSAGE_START: u32 = VOCAB;
    const MESSAGE_BODY: u32 = VOCAB + 1;
    const MESSAGE_END: u32 = VOCAB + 2;
    let mut ids = match &request.prompt_ids {
        Some(ids) => ids.clone(),
        None => match &request.prompt {
            Prompt::Text(text) => text.split_whitespace().map(word_id).collect(),
            Prompt::Chat(messages) => messages
                .iter()
                .flat_map(|m| {
                    [MESSAGE_START, word_id(&m.role), MESSAGE_BODY]
                        .into_iter()
                        .chain(m.content.split_whitespace().map(word_id))
                        .chain([MESSAGE_END])
                })
                .collect(),
        },
    };
    ids.extend_from_slice(&request.resume_tokens);
    ids
}

#[derive(Debug)]
pub struct SyntheticEngine {
    config: SyntheticConfig,
    cache: Option<SimulatedCache>,
    slots: Arc<Slots>,
    queued: Arc<AtomicU32>,
    /// Prompt tokens of requests that have not produced their first token.
    unprefilled: Arc<AtomicU64>,
    /// Of `unprefilled`, those of latency-critical requests (admitted first).
    unprefilled_latency_critical: Arc<AtomicU64>,
}

/// Generation slots with a two-class wait queue: a latency-critical request waiting for a slot
/// is admitted before every waiting cost-sensitive one (FIFO within a class).
#[derive(Debug)]
struct Slots {
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    free: u32,
    /// Waiters: latency-critical, then cost-sensitive.
    waiting: [VecDeque<oneshot::Sender<Slot>>; 2],
}

/// A held slot; dropping it hands the slot to the next waiter.
#[derive(Debug)]
struct Slot {
    slots: Option<Arc<Slots>>,
}

impl Slots {
    fn new(n: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState {
                free: n,
                waiting: [VecDeque::new(), VecDeque::new()],
            }),
        })
    }

    /// A free slot now, or `None` (nothing queued).
    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut state = self.state.lock().expect("slots lock");
        (state.free > 0).then(|| {
            state.free -= 1;
            Slot {
                slots: Some(self.clone()),
            }
        })
    }

    /// Queues for a slot (checking for a free one under the same lock, so a release cannot
    /// slip between the check and the queueing).
    fn acquire(self: &Arc<Self>, latency_critical: bool) -> oneshot::Receiver<Slot> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().expect("slots lock");
        if state.free > 0 {
            state.free -= 1;
            let _ = tx.send(Slot {
                slots: Some(self.clone()),
            });
        } else {
            state.waiting[usize::from(!latency_critical)].push_back(tx);
        }
        rx
    }

    fn release(self: &Arc<Self>) {
        let mut state = self.state.lock().expect("slots lock");
        loop {
            let next = match state.waiting[0].pop_front() {
                Some(tx) => Some(tx),
                None => state.waiting[1].pop_front(),
            };
            let Some(tx) = next else {
                state.free += 1;
                return;
            };
            let slot = Slot {
                slots: Some(self.clone()),
            };
            match tx.send(slot) {
                Ok(()) => return,
                // That waiter gave up (cancelled): disarm the returned slot, try the next.
                Err(mut slot) => slot.slots = None,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

impl SyntheticEngine {
    /// Validates `config` (errors name the command-line flag) and builds the engine, logging
    /// loudly that this worker's output does not come from a model.
    pub fn checked(config: SyntheticConfig) -> Result<Self, String> {
        if config.max_concurrent == 0 {
            return Err("--max-concurrent: must be at least 1".into());
        }
        if config.tokens_per_s.is_nan() || config.tokens_per_s <= 0.0 {
            return Err("--synthetic-tokens-per-s: must be positive".into());
        }
        if !(config.prefill_tokens_per_s.is_finite() && config.prefill_tokens_per_s > 0.0) {
            return Err("synthetic prefill_tokens_per_s: must be positive".into());
        }
        if config.models.iter().any(|m| m.trim().is_empty()) || config.models.is_empty() {
            return Err("--model: give at least one non-empty model name".into());
        }
        tracing::warn!(models = ?config.models, "serving with the SYNTHETIC load-test engine: output is not from a model");
        Ok(Self::new(config))
    }

    pub fn new(config: SyntheticConfig) -> Self {
        let slots = Slots::new(config.max_concurrent);
        Self {
            config,
            cache: None,
            slots,
            queued: Arc::new(AtomicU32::new(0)),
            unprefilled: Arc::new(AtomicU64::new(0)),
            unprefilled_latency_critical: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The engine with a simulated prefix cache (see [`SimulatedCacheConfig`]).
    pub fn with_simulated_cache(mut self, cache: SimulatedCacheConfig) -> Result<Self, String> {
        cache.validate()?;
        tracing::info!(
            capacity_blocks = cache.capacity_blocks,
            block_tokens = cache.block_tokens,
            "synthetic engine simulates a prefix cache"
        );
        self.cache = Some(SimulatedCache::new(cache));
        Ok(self)
    }
}

/// The synthetic id of a word.
fn word_id(word: &str) -> u32 {
    let id = word.bytes().fold(2_166_136_261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    id % VOCAB
}

/// Token `index` of the synthetic output for `instructions`: `(id, text)`.
pub fn synthetic_token(instructions: &str, index: usize) -> (u32, String) {
    let words: Vec<&str> = instructions.split_whitespace().collect();
    token_of(&words, index)
}

/// [`synthetic_token`] from the instructions' words, split once per generation.
fn token_of(words: &[&str], index: usize) -> (u32, String) {
    let word = if words.is_empty() {
        "synthetic"
    } else {
        words[index % words.len()]
    };
    let text = if index == 0 {
        word.to_string()
    } else {
        format!(" {word}")
    };
    (word_id(word), text)
}

/// Dimensions of a synthetic embedding.
pub const SYNTHETIC_EMBEDDING_DIMENSIONS: usize = 64;

/// The synthetic engine's embedding of `text`: each word adds ±1 to a dimension its hash picks,
/// scaled to length 1 — deterministic, and texts sharing words point the same way, so
/// similarity searches behave plausibly in load tests. Not a model's embedding.
pub fn synthetic_embedding(text: &str) -> Vec<f32> {
    let mut vector = vec![0.0f32; SYNTHETIC_EMBEDDING_DIMENSIONS];
    for word in text.split_whitespace() {
        let hash = word.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
        vector[(hash % SYNTHETIC_EMBEDDING_DIMENSIONS as u64) as usize] += sign;
    }
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        // No words: a fixed direction rather than a vector of no length.
        vector[0] = 1.0;
    } else {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
}

/// Text of synthetic tokens `start..start + count` for `instructions`.
pub fn synthetic_text(instructions: &str, start: usize, count: usize) -> String {
    (start..start + count)
        .map(|i| synthetic_token(instructions, i).1)
        .collect()
}

impl Engine for SyntheticEngine {
    fn kind(&self) -> &'static str {
        "synthetic"
    }

    fn models(&self) -> Vec<String> {
        self.config.models.clone()
    }

    fn max_concurrent(&self) -> u32 {
        self.config.max_concurrent
    }

    fn tokens_per_s(&self) -> f64 {
        self.config.tokens_per_s
    }

    fn hardware(&self) -> String {
        "synthetic load-test engine (no model)".into()
    }

    fn prefix_cache(&self) -> Option<Arc<KvPublisher>> {
        self.cache.as_ref().map(|c| c.publisher.clone())
    }

    fn embeds(&self) -> bool {
        true
    }

    fn prefix_cache_stats(&self) -> Option<PrefixCacheStats> {
        self.cache.as_ref().map(SimulatedCache::stats)
    }

    fn load(&self) -> EngineLoad {
        EngineLoad {
            queued: self.queued.load(Ordering::Relaxed),
            kv_used_bytes: 0,
            queued_prompt_tokens: self.unprefilled.load(Ordering::Relaxed),
            queued_latency_critical_prompt_tokens: Some(
                self.unprefilled_latency_critical.load(Ordering::Relaxed),
            ),
            prefill_tokens_per_s: self.config.prefill_tokens_per_s,
            // Its first token comes `ttft` after admission plus the prompt's prefill: routers
            // predict that only if they are told the fixed part.
            first_token_delay_ms: Some(self.config.ttft.as_secs_f64() * 1e3),
            // It prefills each prompt whole.
            prefill_chunk_tokens: None,
        }
    }

    fn submit(
        &self,
        request: EngineRequest,
        cancel: CancellationToken,
    ) -> Result<EngineStream, EngineError> {
        if !self.config.models.contains(&request.model) {
            return Err(EngineError::InvalidArgument(format!(
                "model {:?} is not served here (serving {:?})",
                request.model, self.config.models
            )));
        }
        if request.tools.callable() {
            return Err(EngineError::invalid_field(
                "tools",
                "the synthetic load-test engine generates text only and calls no tools; offer \
                 tools to a model engine (candle) or a wafer-scale gateway",
            ));
        }
        if request.sampling.wants_json() {
            return Err(EngineError::invalid_field(
                "sampling.response_format",
                "the synthetic load-test engine generates text only and cannot promise JSON; \
                 ask a model engine (candle) or a wafer-scale gateway",
            ));
        }
        // Take a free slot now if there is one, so concurrent submits cannot overbook.
        let permit = self.slots.try_acquire();
        if permit.is_none() {
            if self.queued.load(Ordering::Relaxed) >= self.config.max_queue {
                return Err(EngineError::ResourceExhausted(format!(
                    "all {} slots busy and {} requests queued",
                    self.config.max_concurrent, self.config.max_queue
                )));
            }
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        let (tx, rx) = mpsc::channel(64);
        // The context prefilled: the prompt and, for a resumed generation, its tokens so far.
        let (context_tokens, cached_context_tokens) = match &self.cache {
            Some(cache) => {
                let ids = synthetic_prompt_ids(&request);
                (ids.len() as u32, cache.admit(&ids))
            }
            None => (context_tokens(&request), 0),
        };
        let computed = context_tokens - cached_context_tokens;
        // Usage counts the prompt alone, as the candle engine does: a resumed generation's
        // earlier tokens are output the client was already told of, not prompt.
        let prompt_tokens = context_tokens - request.resume_tokens.len() as u32;
        let cached_prompt_tokens = cached_context_tokens.min(prompt_tokens);
        let prefill = f64::from(computed) / self.config.prefill_tokens_per_s;
        let mut counters = vec![self.unprefilled.clone()];
        if request.latency_critical {
            counters.push(self.unprefilled_latency_critical.clone());
        }
        let unprefilled = Unprefilled::new(counters, computed);
        let generation = Generation {
            instructions: request.prompt.instructions().to_string(),
            prompt_tokens,
            cached_prompt_tokens,
            start: request.resume_tokens.len(),
            max_tokens: request.sampling.max_tokens as usize,
            ttft: self.config.ttft + Duration::from_secs_f64(prefill),
            interval: Duration::from_secs_f64(1.0 / self.config.tokens_per_s.max(1e-3)),
            latency_critical: request.latency_critical,
            logprobs: request.sampling.logprobs,
            embed: request.embed,
        };
        let wait = match permit {
            Some(slot) => Ok(slot),
            None => Err(self.slots.acquire(request.latency_critical)),
        };
        tokio::spawn(generation.run(wait, self.queued.clone(), unprefilled, cancel, tx));
        Ok(rx.into())
    }
}

fn context_tokens(request: &EngineRequest) -> u32 {
    let words = match &request.prompt {
        crate::Prompt::Text(text) => text.split_whitespace().count(),
        crate::Prompt::Chat(messages) => messages
            .iter()
            .map(|m| m.content.split_whitespace().count() + 4)
            .sum(),
    };
    (words + request.resume_tokens.len()) as u32
}

/// Prompt tokens of one request counted in the engine's not-yet-prefilled totals (all, and its
/// lane's) until its first token (or its end).
struct Unprefilled {
    counters: Vec<Arc<AtomicU64>>,
    tokens: u64,
}

impl Unprefilled {
    fn new(counters: Vec<Arc<AtomicU64>>, tokens: u32) -> Self {
        for c in &counters {
            c.fetch_add(u64::from(tokens), Ordering::Relaxed);
        }
        Self {
            counters,
            tokens: u64::from(tokens),
        }
    }
}

impl Drop for Unprefilled {
    fn drop(&mut self) {
        for c in &self.counters {
            c.fetch_sub(self.tokens, Ordering::Relaxed);
        }
    }
}

struct Generation {
    instructions: String,
    prompt_tokens: u32,
    /// Prompt tokens the simulated cache held.
    cached_prompt_tokens: u32,
    start: usize,
    max_tokens: usize,
    /// Delay before the first token: the configured TTFT plus this prompt's prefill.
    ttft: Duration,
    interval: Duration,
    latency_critical: bool,
    /// `top_logprobs` when the request asked for log probabilities.
    logprobs: Option<u32>,
    /// An embedding request: [`synthetic_embedding`] of the instructions, no tokens.
    embed: bool,
}

impl Generation {
    async fn run(
        self,
        slot: Result<Slot, oneshot::Receiver<Slot>>,
        queued: Arc<AtomicU32>,
        unprefilled: Unprefilled,
        cancel: CancellationToken,
        tx: mpsc::Sender<Result<EngineEvent, EngineError>>,
    ) {
        let _slot = match slot {
            Ok(slot) => slot,
            Err(wait) => {
                let slot = tokio::select! {
                    slot = wait => slot,
                    _ = cancel.cancelled() => {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        drop(unprefilled);
                        let _ = tx.send(Ok(self.done(StopReason::Cancelled, 0))).await;
                        return;
                    }
                };
                queued.fetch_sub(1, Ordering::Relaxed);
                match slot {
                    Ok(slot) => slot,
                    Err(_) => {
                        let _ = tx
                            .send(Err(EngineError::Unavailable(
                                "the engine has stopped".into(),
                            )))
                            .await;
                        return;
                    }
                }
            }
        };
        tracing::trace!(
            latency_critical = self.latency_critical,
            "synthetic generation admitted"
        );

        let mut produced = 0;
        let reason = 'generate: {
            if !self.ttft.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.ttft) => {}
                    _ = cancel.cancelled() => break 'generate StopReason::Cancelled,
                }
            }
            drop(unprefilled);
            if self.embed {
                let vector = synthetic_embedding(&self.instructions);
                if tx.send(Ok(EngineEvent::Embedding(vector))).await.is_err() {
                    return;
                }
                break 'generate StopReason::Stop;
            }
            // Token `k` of this generation is due `k` intervals after its first; one that is
            // due already goes at once (a reader that fell behind catches up in a burst), and
            // only one that is early waits, so an unpaced engine (a tiny interval) never
            // touches the timer wheel.
            let first = Instant::now();
            let words: Vec<&str> = self.instructions.split_whitespace().collect();
            for (k, index) in (self.start..self.max_tokens).enumerate() {
                let due = first + self.interval.saturating_mul(k as u32);
                if Instant::now() < due {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = cancel.cancelled() => break 'generate StopReason::Cancelled,
                    }
                }
                if cancel.is_cancelled() {
                    break 'generate StopReason::Cancelled;
                }
                let (id, text) = token_of(&words, index);
                let logprobs = self.logprobs.map(|top| certain(id, &text, top));
                if tx
                    .send(Ok(EngineEvent::Token { id, text, logprobs }))
                    .await
                    .is_err()
                {
                    return;
                }
                produced += 1;
            }
            StopReason::Length
        };
        let _ = tx.send(Ok(self.done(reason, produced))).await;
    }

    fn done(&self, reason: StopReason, produced: u32) -> EngineEvent {
        EngineEvent::Done {
            reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.start as u32 + produced,
            cached_prompt_tokens: self.cached_prompt_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Message, Prompt, Sampling};

    fn request(max_tokens: u32, resume: usize) -> EngineRequest {
        EngineRequest {
            request_id: "r".into(),
            model: "synthetic".into(),
            prompt: Prompt::Chat(vec![Message {
                role: "user".into(),
                content: "a b c".into(),
                ..Default::default()
            }]),
            sampling: Sampling {
                max_tokens,
                ..Default::default()
            },
            resume_tokens: vec![0; resume],
            latency_critical: false,
            min_tokens_per_s: 0.0,
            prompt_ids: None,
            tools: Default::default(),
            embed: false,
        }
    }

    async fn collect(mut rx: EngineStream) -> (String, EngineEvent) {
        let mut text = String::new();
        loop {
            match rx.recv().await.unwrap().unwrap() {
                EngineEvent::Token { text: t, .. } => text.push_str(&t),
                done => return (text, done),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_embedding_is_one_vector_of_the_prompt_and_no_tokens() {
        let engine = SyntheticEngine::new(SyntheticConfig::default());
        let request = EngineRequest {
            prompt: Prompt::Text("the cat sat".into()),
            embed: true,
            ..request(1, 0)
        };
        let mut rx = engine.submit(request, CancellationToken::new()).unwrap();
        let Some(Ok(EngineEvent::Embedding(vector))) = rx.recv().await else {
            panic!("expected the embedding first");
        };
        assert_eq!(vector, synthetic_embedding("the cat sat"));
        assert!(matches!(
            rx.recv().await,
            Some(Ok(EngineEvent::Done {
                reason: StopReason::Stop,
                completion_tokens: 0,
                ..
            }))
        ));
    }

    #[test]
    fn synthetic_embeddings_are_unit_length_and_closer_for_shared_words() {
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let cat = synthetic_embedding("the cat sat on the mat");
        let norm = dot(&cat, &cat).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        let near = synthetic_embedding("the cat sat on a rug");
        let far = synthetic_embedding("quarterly revenue grew sharply");
        assert!(dot(&cat, &near) > dot(&cat, &far));
        assert_eq!(synthetic_embedding("   ")[0], 1.0);
    }

    #[test]
    fn output_is_a_function_of_the_instructions() {
        assert_eq!(synthetic_text("a b c", 0, 5), "a b c a b");
        assert_eq!(synthetic_text("a b c", 3, 2), " a b");
        assert_eq!(synthetic_token("x", 0).0, synthetic_token("x", 7).0);
        assert_eq!(synthetic_text("", 0, 2), "synthetic synthetic");
    }

    #[tokio::test(start_paused = true)]
    async fn generates_max_tokens_then_stops() {
        let engine = SyntheticEngine::new(SyntheticConfig::default());
        let rx = engine
            .submit(request(5, 0), CancellationToken::new())
            .unwrap();
        let (text, done) = collect(rx).await;
        assert_eq!(text, "a b c a b");
        assert!(matches!(
            done,
            EngineEvent::Done {
                reason: StopReason::Length,
                completion_tokens: 5,
                ..
            }
        ));
    }

    /// Tokens come at the configured rate after the first token's delay: token k is due k
    /// intervals after the first, none early, and a reader that fell behind gets the overdue
    /// ones at once rather than one interval apart.
    #[tokio::test(start_paused = true)]
    async fn tokens_come_at_the_configured_rate_and_overdue_ones_at_once() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            ttft: Duration::from_millis(50),
            tokens_per_s: 100.0,
            ..SyntheticConfig::default()
        });
        let start = Instant::now();
        let mut rx = engine
            .submit(request(6, 0), CancellationToken::new())
            .unwrap();
        let mut at = Vec::new();
        for _ in 0..3 {
            assert!(matches!(
                rx.recv().await,
                Some(Ok(EngineEvent::Token { .. }))
            ));
            at.push((Instant::now() - start).as_millis());
        }
        // 50 ms to the first token (and a simulated millisecond of prefill), then one every 10.
        assert!((50..=52).contains(&at[0]), "{at:?}");
        assert_eq!((at[1] - at[0], at[2] - at[1]), (10, 10), "{at:?}");
        // The reader sleeps through three intervals: the three tokens due meanwhile are
        // waiting for it, the last one not yet.
        tokio::time::sleep(Duration::from_millis(35)).await;
        let behind = Instant::now();
        for _ in 0..3 {
            assert!(matches!(
                rx.recv().await,
                Some(Ok(EngineEvent::Token { .. }))
            ));
        }
        assert_eq!(
            (Instant::now() - behind).as_millis(),
            0,
            "the overdue tokens came at once"
        );
        assert!(matches!(
            rx.recv().await,
            Some(Ok(EngineEvent::Done { .. }))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn resumes_after_the_delivered_tokens() {
        let engine = SyntheticEngine::new(SyntheticConfig::default());
        let prompt = |rx| async {
            match collect(rx).await {
                (text, EngineEvent::Done { prompt_tokens, .. }) => (text, prompt_tokens),
                (_, other) => panic!("{other:?}"),
            }
        };
        let (_, whole) = prompt(
            engine
                .submit(request(5, 0), CancellationToken::new())
                .unwrap(),
        )
        .await;
        let (text, resumed) = prompt(
            engine
                .submit(request(5, 3), CancellationToken::new())
                .unwrap(),
        )
        .await;
        assert_eq!(text, " a b");
        // The tokens it resumed after are output the client has, not prompt.
        assert_eq!(resumed, whole);
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_within_one_step() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            tokens_per_s: 10.0,
            ..Default::default()
        });
        let cancel = CancellationToken::new();
        let mut rx = engine.submit(request(1000, 0), cancel.clone()).unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
        cancel.cancel();
        let started = tokio::time::Instant::now();
        let (_, done) = collect(rx).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                reason: StopReason::Cancelled,
                completion_tokens: 1,
                ..
            }
        ));
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_without_a_queue_refuse_the_excess() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            max_concurrent: 2,
            max_queue: 0,
            ..Default::default()
        });
        let _a = engine
            .submit(request(100, 0), CancellationToken::new())
            .unwrap();
        let _b = engine
            .submit(request(100, 0), CancellationToken::new())
            .unwrap();
        assert!(matches!(
            engine.submit(request(1, 0), CancellationToken::new()),
            Err(EngineError::ResourceExhausted(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_unknown_models_and_full_queues() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            max_concurrent: 1,
            max_queue: 1,
            ..Default::default()
        });
        let mut bad = request(1, 0);
        bad.model = "other".into();
        assert!(matches!(
            engine.submit(bad, CancellationToken::new()),
            Err(EngineError::InvalidArgument(_))
        ));
        let mut with_tools = request(1, 0);
        with_tools.tools.tools.push(switchyard_proto::v1::Tool {
            name: "f".into(),
            ..Default::default()
        });
        assert!(matches!(
            engine.submit(with_tools, CancellationToken::new()),
            Err(EngineError::InvalidField { field, .. }) if field == "tools"
        ));
        let _first = engine
            .submit(request(100, 0), CancellationToken::new())
            .unwrap();
        let _second = engine
            .submit(request(100, 0), CancellationToken::new())
            .unwrap();
        assert!(matches!(
            engine.submit(request(1, 0), CancellationToken::new()),
            Err(EngineError::ResourceExhausted(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn latency_critical_requests_take_the_next_free_slot_first() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            max_concurrent: 1,
            ..Default::default()
        });
        let running = CancellationToken::new();
        let _first = engine.submit(request(1000, 0), running.clone()).unwrap();
        let cheap = engine
            .submit(request(2, 0), CancellationToken::new())
            .unwrap();
        let urgent = EngineRequest {
            latency_critical: true,
            min_tokens_per_s: 0.0,
            ..request(2, 0)
        };
        let urgent = engine.submit(urgent, CancellationToken::new()).unwrap();
        assert_eq!(engine.load().queued, 2);
        running.cancel();
        let (order_tx, mut order) = mpsc::unbounded_channel();
        let (a, b) = (order_tx.clone(), order_tx);
        tokio::join!(
            async move {
                collect(cheap).await;
                a.send("cheap").unwrap();
            },
            async move {
                collect(urgent).await;
                b.send("urgent").unwrap();
            }
        );
        assert_eq!(order.recv().await, Some("urgent"));
        assert_eq!(order.recv().await, Some("cheap"));
    }

    fn chat(turns: &[(&str, &str)]) -> EngineRequest {
        EngineRequest {
            prompt: Prompt::Chat(
                turns
                    .iter()
                    .map(|(role, content)| Message {
                        role: role.to_string(),
                        content: content.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..request(2, 0)
        }
    }

    /// Time to the first token and the `Done` event.
    async fn first_token_after(
        engine: &SyntheticEngine,
        r: EngineRequest,
    ) -> (Duration, EngineEvent) {
        let started = tokio::time::Instant::now();
        let mut rx = engine.submit(r, CancellationToken::new()).unwrap();
        assert!(matches!(
            rx.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
        let ttft = started.elapsed();
        let (_, done) = collect(rx).await;
        (ttft, done)
    }

    #[tokio::test(start_paused = true)]
    async fn the_simulated_cache_serves_a_conversation_s_next_turn_sooner() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            ttft: Duration::from_millis(10),
            prefill_tokens_per_s: 1_000.0,
            ..Default::default()
        })
        .with_simulated_cache(SimulatedCacheConfig {
            capacity_blocks: 64,
            block_tokens: 8,
        })
        .unwrap();
        let publisher = engine.prefix_cache().expect("the cache is published");
        let (_, mut changes) = publisher.subscribe();
        let question = "one two three four five six seven eight nine ten eleven twelve";
        // 12 words + 4 framing ids = 16 tokens: two blocks.
        let turn1 = chat(&[("user", question)]);
        let (cold, done) = first_token_after(&engine, turn1).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                prompt_tokens: 16,
                cached_prompt_tokens: 0,
                ..
            }
        ));
        // 10 ms plus 16 tokens at 1 000 tokens/s (the timer rounds to whole milliseconds).
        let near = |d: Duration, ms: u64| {
            d.abs_diff(Duration::from_millis(ms)) <= Duration::from_millis(1)
        };
        assert!(near(cold, 10 + 16), "{cold:?}");
        let stored = changes
            .try_recv()
            .expect("the first turn's blocks are published");
        assert_eq!(stored.stored.len(), 2);
        // Turn 2 repeats turn 1 and adds to it: its first 16 tokens are cached.
        let turn2 = chat(&[
            ("user", question),
            ("assistant", "one two"),
            ("user", "more please"),
        ]);
        let (warm, done) = first_token_after(&engine, turn2).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                prompt_tokens: 28,
                cached_prompt_tokens: 16,
                ..
            }
        ));
        // Only the 12 uncached tokens are prefilled.
        assert!(near(warm, 10 + 12), "{warm:?}");
        let stats = engine.prefix_cache_stats().unwrap();
        assert_eq!(
            (
                stats.lookups,
                stats.lookup_tokens,
                stats.hit_tokens,
                stats.cached_blocks
            ),
            (2, 44, 16, 3)
        );
        // Router-supplied ids are used as they are.
        let ids = EngineRequest {
            prompt_ids: Some((0..24).collect()),
            ..request(2, 0)
        };
        let (_, done) = first_token_after(&engine, ids.clone()).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                prompt_tokens: 24,
                cached_prompt_tokens: 0,
                ..
            }
        ));
        let (_, done) = first_token_after(&engine, ids).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                cached_prompt_tokens: 24,
                ..
            }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_simulated_cache_evicts_least_recently_used_blocks_and_says_so() {
        let engine = SyntheticEngine::new(SyntheticConfig::default())
            .with_simulated_cache(SimulatedCacheConfig {
                capacity_blocks: 3,
                block_tokens: 4,
            })
            .unwrap();
        let publisher = engine.prefix_cache().unwrap();
        let (_, mut changes) = publisher.subscribe();
        let ids = |base: u32| EngineRequest {
            prompt_ids: Some((base..base + 8).collect()),
            ..request(1, 0)
        };
        first_token_after(&engine, ids(0)).await; // blocks A0 A1
        first_token_after(&engine, ids(100)).await; // B0 B1: A0 is the oldest, evicted
        let _ = changes.try_recv().unwrap();
        let second = changes.try_recv().unwrap();
        assert_eq!((second.stored.len(), second.removed.len()), (2, 1));
        assert_eq!(publisher.len(), 3);
        // A's first block is gone: no prefix of A is cached any more.
        let (_, done) = first_token_after(&engine, ids(0)).await;
        assert!(matches!(
            done,
            EngineEvent::Done {
                cached_prompt_tokens: 0,
                ..
            }
        ));
        assert!(engine.prefix_cache_stats().unwrap().evictions >= 1);
        assert!(
            SimulatedCacheConfig {
                capacity_blocks: 0,
                block_tokens: 4
            }
            .validate()
            .is_err()
        );
        // Off by default.
        assert!(
            SyntheticEngine::new(SyntheticConfig::default())
                .prefix_cache()
                .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn load_reports_unprefilled_prompt_tokens_and_the_prefill_rate() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            max_concurrent: 1,
            prefill_tokens_per_s: 1_000.0,
            ttft: Duration::from_millis(150),
            ..Default::default()
        });
        assert_eq!(engine.load().prefill_tokens_per_s, 1_000.0);
        // The fixed part of its TTFT too: routers predict 150 ms + prompt / rate, as it serves.
        assert_eq!(engine.load().first_token_delay_ms, Some(150.0));
        assert_eq!(engine.load().queued_prompt_tokens, 0);
        // "a b c" as one chat message: 3 words + 4 for the message framing.
        let mut first = engine
            .submit(request(3, 0), CancellationToken::new())
            .unwrap();
        let second = engine
            .submit(request(3, 0), CancellationToken::new())
            .unwrap();
        assert_eq!(engine.load().queued_prompt_tokens, 14);
        // The first token ends the first one's prefill.
        assert!(matches!(
            first.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
        assert_eq!(engine.load().queued_prompt_tokens, 7);
        collect(first).await;
        collect(second).await;
        assert_eq!(engine.load().queued_prompt_tokens, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn load_reports_latency_critical_unprefilled_prompt_tokens_apart() {
        let engine = SyntheticEngine::new(SyntheticConfig {
            max_concurrent: 1,
            prefill_tokens_per_s: 1_000.0,
            ..Default::default()
        });
        assert_eq!(engine.load().queued_latency_critical_prompt_tokens, Some(0));
        // A cost-sensitive request takes the slot; a latency-critical and another
        // cost-sensitive one wait (7 prompt tokens each).
        let mut first = engine
            .submit(request(3, 0), CancellationToken::new())
            .unwrap();
        let urgent = engine
            .submit(
                EngineRequest {
                    latency_critical: true,
                    min_tokens_per_s: 0.0,
                    ..request(3, 0)
                },
                CancellationToken::new(),
            )
            .unwrap();
        let last = engine
            .submit(request(3, 0), CancellationToken::new())
            .unwrap();
        let load = engine.load();
        assert_eq!(
            (
                load.queued_prompt_tokens,
                load.queued_latency_critical_prompt_tokens
            ),
            (21, Some(7))
        );
        assert!(matches!(
            first.recv().await,
            Some(Ok(EngineEvent::Token { .. }))
        ));
        assert_eq!(engine.load().queued_latency_critical_prompt_tokens, Some(7));
        collect(first).await;
        // The latency-critical request gets the slot next and its first token ends its
        // prefill: what is left queued is cost-sensitive.
        let (_, done) = collect(urgent).await;
        assert!(matches!(done, EngineEvent::Done { .. }));
        let load = engine.load();
        assert_eq!(load.queued_latency_critical_prompt_tokens, Some(0));
        assert!(load.queued_prompt_tokens <= 7, "{load:?}");
        collect(last).await;
        assert_eq!(engine.load().queued_prompt_tokens, 0);
    }
}
