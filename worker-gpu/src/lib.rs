//! The GPU pool worker. Selects and builds the engine the worker serves; the worker runtime
//! (`switchyard-worker`) does the rest.
//!
//! Engines: `synthetic` (the load-test backend: no model, deterministic text) and `candle`
//! (the native engine: a llama-architecture GGUF model run by our own forward pass over candle
//! quantized tensors, with continuous batching — see [`scheduler`]).
//!
//! Readiness: [`build_engine`] returns only after the weights are loaded and a warm-up step
//! ran, and the worker runtime registers the worker only after it returns.

pub mod device;
pub mod fetch;
pub mod gguf;
mod host_attention;
pub mod kv_cache;
pub mod model;
pub mod pacing;
pub mod penalties;
pub mod qmatrix;
pub mod sampling;
pub mod scheduler;
pub mod testing;
pub mod tokenizer;
pub mod tools;
pub mod vexp;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use switchyard_worker::{Engine, SyntheticConfig, SyntheticEngine};

pub use device::DeviceChoice;
pub use pacing::PrefillPack;
pub use scheduler::{CandleEngine, SchedulerLimits};

/// Which engine a GPU worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuEngineKind {
    /// Load-test backend: deterministic text at a configured rate, no model.
    Synthetic,
    /// Native engine: a GGUF llama model (`--model-path`) on CUDA or the CPU.
    Candle,
}

/// Engine options of `switchyard worker-gpu`.
#[derive(Debug, Clone, clap::Args)]
pub struct GpuEngineArgs {
    /// Engine to serve with.
    #[arg(
        long,
        env = "SWITCHYARD_ENGINE",
        value_enum,
        default_value = "synthetic"
    )]
    pub engine: GpuEngineKind,
    /// Model name(s) the engine answers to. For `candle`, the default `synthetic` is replaced
    /// by the model file's stem (e.g. `SmolLM2-135M-Instruct.Q4_1`).
    #[arg(
        long = "model",
        env = "SWITCHYARD_MODELS",
        value_delimiter = ',',
        default_value = "synthetic"
    )]
    pub models: Vec<String>,
    /// Sequences generated at once.
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=switchyard_worker::MAX_SLOTS))]
    pub max_concurrent: u32,
    /// Synthetic engine: time to first token.
    #[arg(long, env = "SWITCHYARD_SYNTHETIC_TTFT", value_parser = humantime::parse_duration, default_value = "150ms")]
    pub synthetic_ttft: Duration,
    /// Synthetic engine: decode rate per stream.
    #[arg(
        long,
        env = "SWITCHYARD_SYNTHETIC_TOKENS_PER_S",
        default_value_t = 60.0
    )]
    pub synthetic_tokens_per_s: f64,
    /// Candle engine: the GGUF model file.
    #[arg(long, env = "SWITCHYARD_MODEL_PATH", default_value = fetch::DEFAULT_MODEL_PATH)]
    pub model_path: PathBuf,
    /// Candle engine: bytes of KV cache all sequences together may hold. On the CPU it is
    /// host memory: with the weights it must fit the host's memory or the container's limit
    /// (with `--device cpu` refused at start otherwise; on the CPU serving in place of a GPU,
    /// cut to what is left, logged).
    #[arg(long, env = "SWITCHYARD_KV_BUDGET_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub kv_budget_bytes: u64,
    /// Candle engine: requests waiting for admission beyond which new ones are refused (at
    /// least 1: each request passes the queue on its way to a slot).
    #[arg(long, env = "SWITCHYARD_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: u32,
    /// Candle engine: where the model runs.
    #[arg(long, env = "SWITCHYARD_DEVICE", value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Candle engine: prompt tokens prefilled per scheduler step, shared among the joining
    /// prompts (bounds how long prefill delays the running streams).
    #[arg(long, env = "SWITCHYARD_PREFILL_CHUNK", default_value_t = 512)]
    pub prefill_chunk: u32,
    /// Candle engine: how many joining prompts one prefill pass packs: `auto` (as many as get
    /// them their first tokens soonest on average, from the measured prefill rate and step
    /// time), or at most N (1: one prompt per pass).
    #[arg(long, env = "SWITCHYARD_PREFILL_PACK", default_value = "auto")]
    pub prefill_pack: PrefillPack,
    /// Candle engine: how long one scheduler step should take at most (`0s`: no target). A
    /// request arriving while a prompt is prefilled waits for the chunk in progress, so with a
    /// target the chunk is cut to what the measured prefill rate gets done in it (at least 32
    /// tokens). On a CPU smaller chunks prefill more slowly: set it where short requests share
    /// a worker with long prompts and must not wait seconds behind them.
    #[arg(long, env = "SWITCHYARD_STEP_TARGET", value_parser = humantime::parse_duration, default_value = "0s")]
    pub step_target: Duration,
    /// Candle engine on the CPU: threads of the engine's own compute pool (0: one per CPU
    /// core). Engines sharing a host (`switchyard up` runs several in one process) each get
    /// their own pool, so one engine's work never waits inside another's.
    #[arg(long, env = "SWITCHYARD_COMPUTE_THREADS", default_value_t = 0)]
    pub compute_threads: u32,
    /// Candle engine: keep Q5_0/Q5_1 weights as stored instead of repacking them to Q8_0
    /// (slower on CPU). Q4_0, Q4_1 and Q8_0 always run as stored.
    #[arg(long, env = "SWITCHYARD_NO_REPACK", default_value_t = false)]
    pub no_repack: bool,
    /// Candle engine on the CPU: multiply prompt chunks of at least this many tokens by
    /// dequantized f32 weights instead of the quantized kernel (the crossover measured for
    /// SmolLM2 on 2 cores): a cold 512-token prompt prefills ~1.5x faster. The two paths round
    /// differently, so a temperature-0 answer to a prompt this long may change when the prompt
    /// is split otherwise — resent with its prefix cached, moved, failed over (as with
    /// llama.cpp's prompt cache or vLLM's batching). 0: never, every matmul quantized, the same
    /// greedy answer however the prompt is split, at the cost of that speed.
    #[arg(
        long,
        env = "SWITCHYARD_DENSE_PREFILL_FROM_ROWS",
        default_value_t = model::DENSE_FROM_ROWS as u32
    )]
    pub dense_prefill_from_rows: u32,
    /// Candle engine: keep the KV blocks of finished requests and reuse them for later prompts
    /// that start the same way (multi-turn chat, shared system prompts), and publish what is
    /// cached to routers for cache-aware placement.
    #[arg(
        long,
        env = "SWITCHYARD_PREFIX_CACHE",
        value_enum,
        default_value = "on"
    )]
    pub prefix_cache: Toggle,
    /// Candle engine: the longest sequence (prompt and output together) a request may have, in
    /// tokens, below the model's own context length (0: the model's, or what --kv-budget-bytes
    /// holds when that is less). Routers refuse longer requests before placing them, and lower
    /// a default output bound to fit.
    #[arg(long, env = "SWITCHYARD_MAX_MODEL_LEN", default_value_t = 0)]
    pub max_model_len: u32,
}

/// A feature switch as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

impl Default for GpuEngineArgs {
    fn default() -> Self {
        Self {
            engine: GpuEngineKind::Synthetic,
            models: vec!["synthetic".into()],
            max_concurrent: 16,
            synthetic_ttft: Duration::from_millis(150),
            synthetic_tokens_per_s: 60.0,
            model_path: PathBuf::from(fetch::DEFAULT_MODEL_PATH),
            kv_budget_bytes: 512 * 1024 * 1024,
            max_queue: 64,
            device: DeviceChoice::Auto,
            prefill_chunk: 512,
            prefill_pack: PrefillPack::Auto,
            step_target: Duration::ZERO,
            compute_threads: 0,
            no_repack: false,
            dense_prefill_from_rows: model::DENSE_FROM_ROWS as u32,
            prefix_cache: Toggle::On,
            max_model_len: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GpuEngineError {
    #[error("invalid engine options: {0}")]
    Config(String),
    #[error(transparent)]
    Device(#[from] device::DeviceError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    #[error("starting the engine: {0}")]
    Engine(#[from] switchyard_worker::EngineError),
}

/// The synthetic engine's configuration from the worker's flags.
pub fn synthetic_config(args: &GpuEngineArgs) -> SyntheticConfig {
    SyntheticConfig {
        models: args.models.clone(),
        ttft: args.synthetic_ttft,
        tokens_per_s: args.synthetic_tokens_per_s,
        max_concurrent: args.max_concurrent,
        max_queue: args.max_concurrent.saturating_mul(4),
        prefill_tokens_per_s: switchyard_worker::synthetic::DEFAULT_PREFILL_TOKENS_PER_S,
    }
}

/// Builds the configured engine. For `candle` this loads the weights and runs a warm-up step
/// before returning, so a worker built from it is ready when it registers.
pub fn build_engine(args: &GpuEngineArgs) -> Result<Arc<dyn Engine>, GpuEngineError> {
    if args.max_concurrent == 0 {
        return Err(GpuEngineError::Config(
            "--max-concurrent: must be at least 1".into(),
        ));
    }
    match args.engine {
        GpuEngineKind::Synthetic => Ok(Arc::new(
            SyntheticEngine::checked(synthetic_config(args)).map_err(GpuEngineError::Config)?,
        )),
        GpuEngineKind::Candle => Ok(Arc::new(build_candle(args)?)),
    }
}

/// Model ids a candle engine answers to: `--model` unless left at its synthetic default, else
/// the model file's stem.
pub fn candle_model_ids(args: &GpuEngineArgs) -> Vec<String> {
    let defaulted = args.models.len() == 1 && args.models[0] == "synthetic";
    if !defaulted && !args.models.is_empty() {
        return args.models.clone();
    }
    vec![
        args.model_path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string(),
    ]
}

/// Loads the model and starts the candle engine (weights loaded, warm-up done).
pub fn build_candle(args: &GpuEngineArgs) -> Result<CandleEngine, GpuEngineError> {
    if args.prefill_chunk == 0 {
        return Err(GpuEngineError::Config(
            "--prefill-chunk: must be at least 1".into(),
        ));
    }
    // No client can ask for a model named "" (`--model a,,b`, `--model ""`).
    if args.models.iter().any(String::is_empty) {
        return Err(GpuEngineError::Config(format!(
            "--model: an empty model name in {:?}; name each model, comma-separated",
            args.models
        )));
    }
    if args.kv_budget_bytes == 0 {
        return Err(GpuEngineError::Config(
            "--kv-budget-bytes: must be positive".into(),
        ));
    }
    // Every request waits in the queue until the scheduler thread takes it, even on an idle
    // worker: with no room there every request would be shed.
    if args.max_queue == 0 {
        return Err(GpuEngineError::Config(
            "--max-queue 0: must be at least 1 (every request passes the queue on its way to a slot)"
                .into(),
        ));
    }
    if args.model_path.is_dir() {
        return Err(GpuEngineError::Config(format!(
            "--model-path {}: is a directory, not a GGUF file (name the .gguf file in it)",
            args.model_path.display()
        )));
    }
    if !args.model_path.is_file() {
        return Err(GpuEngineError::Config(format!(
            "--model-path {}: no such file (run scripts/fetch-model.sh for the default model)",
            args.model_path.display()
        )));
    }
    let selected = device::select(args.device)?;
    let repack = if args.no_repack || !selected.device.is_cpu() {
        gguf::Repack::None
    } else {
        gguf::Repack::Q8_0
    };
    let started = std::time::Instant::now();
    let (mut model, tokenizer) = load_model(&args.model_path, &selected.device, repack)?;
    if args.max_model_len > 0 {
        let own = model.config.context_length;
        if args.max_model_len as usize > own {
            return Err(GpuEngineError::Config(format!(
                "--max-model-len {}: above the model's context length of {own} tokens",
                args.max_model_len
            )));
        }
        // A sequence is a prompt token and a generated one at least (the warm-up step too).
        if args.max_model_len < 2 {
            return Err(GpuEngineError::Config(format!(
                "--max-model-len {}: must be at least 2 (a prompt token and a generated one), or 0 for the model's {own}",
                args.max_model_len
            )));
        }
        model.config.context_length = args.max_model_len as usize;
    }
    // Checked here, where the flag can be named; the engine refuses it too.
    let block_bytes = model.kv_bytes_per_block();
    if args.kv_budget_bytes < block_bytes {
        return Err(GpuEngineError::Config(format!(
            "--kv-budget-bytes {}: less than one KV block of this model ({block_bytes} bytes, {} tokens); a sequence of the full context needs {} bytes",
            args.kv_budget_bytes,
            host_attention::BLOCK_TOKENS,
            model
                .config
                .context_length
                .div_ceil(host_attention::BLOCK_TOKENS) as u64
                * block_bytes
        )));
    }
    // On the CPU the KV cache is host memory, allocated as blocks fill: a budget beyond what
    // the process may use starts fine and is killed for memory under load (or, far beyond,
    // aborts allocating its block table here).
    let mut kv_budget_bytes = args.kv_budget_bytes;
    if selected.device.is_cpu()
        && let Some(limit) = device::memory_limit_bytes()
        && kv_budget_bytes.saturating_add(model.weight_bytes) > limit
    {
        let left = limit.saturating_sub(model.weight_bytes);
        if args.device == DeviceChoice::Cpu || left < block_bytes {
            return Err(GpuEngineError::Config(format!(
                "--kv-budget-bytes {kv_budget_bytes}: more than this process may use ({limit} bytes of memory, the host's or its container's limit) beside the model's {} bytes of weights; lower it",
                model.weight_bytes
            )));
        }
        // A GPU was asked for and the CPU serves in its place (logged by `device`): the
        // documented fallback keeps serving, its budget (sized for GPU memory) cut to what is left.
        tracing::warn!(
            kv_budget_bytes,
            memory_limit_bytes = limit,
            kv_budget_bytes_used = left,
            "--kv-budget-bytes is more than this process may use beside the weights on the CPU it fell back to: the KV cache is cut to what is left"
        );
        kv_budget_bytes = left;
    }
    // Publish no context the budget cannot hold: routers check a request against the context
    // before placing it, while the budget was only checked here, after placement (a 400 about
    // this worker's budget, for a request another worker could have served).
    let budget_tokens = (kv_budget_bytes / block_bytes) as usize * host_attention::BLOCK_TOKENS;
    if budget_tokens < model.config.context_length {
        if args.max_model_len > 0 {
            return Err(GpuEngineError::Config(format!(
                "--max-model-len {}: more than --kv-budget-bytes {} holds ({budget_tokens} tokens); raise --kv-budget-bytes to {} or lower --max-model-len",
                args.max_model_len,
                kv_budget_bytes,
                (args.max_model_len as usize).div_ceil(host_attention::BLOCK_TOKENS) as u64
                    * block_bytes
            )));
        }
        tracing::warn!(
            kv_budget_bytes,
            budget_tokens,
            model_context_length = model.config.context_length,
            "--kv-budget-bytes holds fewer tokens than the model's context: requests are capped at what it holds (raise --kv-budget-bytes for the full context)"
        );
        model.config.context_length = budget_tokens;
    }
    model = model.with_dense_from_rows(match args.dense_prefill_from_rows {
        0 => usize::MAX,
        rows => rows as usize,
    });
    let ids = candle_model_ids(args);
    tracing::info!(
        path = %args.model_path.display(),
        models = ?ids,
        hardware = %selected.hardware,
        weight_bytes = model.weight_bytes,
        context_length = model.config.context_length,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    let engine = CandleEngine::start(
        model,
        tokenizer,
        ids,
        SchedulerLimits {
            kv_budget_bytes,
            max_seqs: args.max_concurrent as usize,
            max_queue: args.max_queue as usize,
            prefill_chunk: args.prefill_chunk as usize,
            prefill_pack: args.prefill_pack,
            step_target: (!args.step_target.is_zero()).then_some(args.step_target),
            prefix_cache: args.prefix_cache == Toggle::On,
            compute_threads: args.compute_threads as usize,
        },
        selected.hardware,
    )?;
    Ok(engine)
}

/// Reads model and tokenizer from a GGUF file.
pub fn load_model(
    path: &Path,
    device: &candle_core::Device,
    repack: gguf::Repack,
) -> Result<(model::Llama, tokenizer::GgufTokenizer), GpuEngineError> {
    let mut file = gguf::GgufFile::open(path)?;
    let tokenizer = tokenizer::GgufTokenizer::from_gguf(&file.content)?;
    let model = model::Llama::load(&mut file, device, repack)?;
    if tokenizer.vocab_size() != model.config.vocab_size {
        return Err(GpuEngineError::Config(format!(
            "--model-path {}: tokenizer has {} tokens but the model's vocab is {}",
            path.display(),
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok((model, tokenizer))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        engine: GpuEngineArgs,
    }

    #[test]
    fn the_flags_default_to_the_default_args() {
        let parsed = Flags::parse_from(["worker"]).engine;
        let default = GpuEngineArgs::default();
        assert_eq!(parsed.step_target, default.step_target);
        assert_eq!(parsed.prefill_chunk, default.prefill_chunk);
        assert_eq!(parsed.prefill_pack, default.prefill_pack);
        assert_eq!(parsed.kv_budget_bytes, default.kv_budget_bytes);
        let set = Flags::parse_from(["worker", "--step-target", "250ms"]).engine;
        assert_eq!(set.step_target, Duration::from_millis(250));
    }
}
