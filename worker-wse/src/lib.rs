//! The wafer-scale pool worker. Selects and builds the engine the worker serves; the worker
//! runtime (`switchyard-worker`) does the rest.
//!
//! Engines: `synthetic` (the load-test backend: no wafer, deterministic text at wafer-like speed).

use std::sync::Arc;
use std::time::Duration;

use switchyard_worker::{Engine, SyntheticConfig, SyntheticEngine};

/// Which engine a wafer-scale worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WseEngineKind {
    /// Load-test backend: deterministic text at a configured rate, no upstream.
    Synthetic,
}

/// Engine options of `switchyard worker-wse`.
#[derive(Debug, Clone, clap::Args)]
pub struct WseEngineArgs {
    /// Engine to serve with.
    #[arg(
        long,
        env = "SWITCHYARD_ENGINE",
        value_enum,
        default_value = "synthetic"
    )]
    pub engine: WseEngineKind,
    /// Model name(s) served.
    #[arg(
        long = "model",
        env = "SWITCHYARD_MODELS",
        value_delimiter = ',',
        default_value = "synthetic"
    )]
    pub models: Vec<String>,
    /// Concurrency slots of the wafer (sequences served at once); more are refused.
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT", default_value_t = 8)]
    pub max_concurrent: u32,
    /// Synthetic engine: time to first token.
    #[arg(long, env = "SWITCHYARD_SYNTHETIC_TTFT", value_parser = humantime::parse_duration, default_value = "20ms")]
    pub synthetic_ttft: Duration,
    /// Synthetic engine: decode rate per stream.
    #[arg(
        long,
        env = "SWITCHYARD_SYNTHETIC_TOKENS_PER_S",
        default_value_t = 1000.0
    )]
    pub synthetic_tokens_per_s: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum WseEngineError {
    #[error("invalid engine options: {0}")]
    Config(String),
}

/// Builds the configured engine.
pub fn build_engine(args: &WseEngineArgs) -> Result<Arc<dyn Engine>, WseEngineError> {
    if args.max_concurrent == 0 {
        return Err(WseEngineError::Config(
            "--max-concurrent: must be at least 1".into(),
        ));
    }
    match args.engine {
        WseEngineKind::Synthetic => {
            if args.synthetic_tokens_per_s.is_nan() || args.synthetic_tokens_per_s <= 0.0 {
                return Err(WseEngineError::Config(
                    "--synthetic-tokens-per-s: must be positive".into(),
                ));
            }
            tracing::warn!(
                "serving with the SYNTHETIC load-test engine: output is not from a wafer"
            );
            Ok(Arc::new(SyntheticEngine::new(SyntheticConfig {
                models: args.models.clone(),
                ttft: args.synthetic_ttft,
                tokens_per_s: args.synthetic_tokens_per_s,
                max_concurrent: args.max_concurrent,
                // A wafer has fixed slots: no queue beyond them.
                max_queue: 0,
            })))
        }
    }
}
