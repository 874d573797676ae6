//! The GPU pool worker. Selects and builds the engine the worker serves; the worker runtime
//! (`switchyard-worker`) does the rest.
//!
//! Engines: `synthetic` (the load-test backend: no model, deterministic text).

use std::sync::Arc;
use std::time::Duration;

use switchyard_worker::{Engine, SyntheticConfig, SyntheticEngine};

/// Which engine a GPU worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuEngineKind {
    /// Load-test backend: deterministic text at a configured rate, no model.
    Synthetic,
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
    /// Model name(s) the synthetic engine answers to.
    #[arg(
        long = "model",
        env = "SWITCHYARD_MODELS",
        value_delimiter = ',',
        default_value = "synthetic"
    )]
    pub models: Vec<String>,
    /// Sequences generated at once.
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT", default_value_t = 16)]
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
}

#[derive(Debug, thiserror::Error)]
pub enum GpuEngineError {
    #[error("invalid engine options: {0}")]
    Config(String),
}

/// Builds the configured engine (loading weights where the engine has any).
pub fn build_engine(args: &GpuEngineArgs) -> Result<Arc<dyn Engine>, GpuEngineError> {
    if args.max_concurrent == 0 {
        return Err(GpuEngineError::Config(
            "--max-concurrent: must be at least 1".into(),
        ));
    }
    match args.engine {
        GpuEngineKind::Synthetic => {
            if args.synthetic_tokens_per_s.is_nan() || args.synthetic_tokens_per_s <= 0.0 {
                return Err(GpuEngineError::Config(
                    "--synthetic-tokens-per-s: must be positive".into(),
                ));
            }
            tracing::warn!(
                "serving with the SYNTHETIC load-test engine: output is not from a model"
            );
            Ok(Arc::new(SyntheticEngine::new(SyntheticConfig {
                models: args.models.clone(),
                ttft: args.synthetic_ttft,
                tokens_per_s: args.synthetic_tokens_per_s,
                max_concurrent: args.max_concurrent,
                max_queue: args.max_concurrent * 4,
            })))
        }
    }
}
