//! The wafer-scale pool worker. Selects and builds the engine the worker serves; the worker
//! runtime (`switchyard-worker`) does the rest.
//!
//! Engines: `gateway` (the real backend: streams from an OpenAI-compatible wafer-scale
//! endpoint, see [`gateway`]) and `synthetic` (the load-test backend: no wafer, deterministic
//! text at wafer-like speed).

pub mod gateway;
pub mod sse;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchyard_worker::{Engine, SyntheticConfig, SyntheticEngine};

pub use gateway::{ApiKey, GatewayConfig, GatewayEngine, GatewayError};

/// Which engine a wafer-scale worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WseEngineKind {
    /// Load-test backend: deterministic text at a configured rate, no upstream.
    Synthetic,
    /// Gateway to an OpenAI-compatible wafer-scale endpoint (`--gateway-url`).
    Gateway,
}

/// Options of the `gateway` engine.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// API base URL of the OpenAI-compatible endpoint, e.g. https://api.example.com/v1.
    #[arg(long, env = "SWITCHYARD_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Model name mapping `local=upstream` (comma-separated); a served `--model` without a
    /// mapping keeps its name upstream.
    #[arg(
        long,
        env = "SWITCHYARD_GATEWAY_MODEL_MAP",
        value_delimiter = ',',
        value_parser = gateway::parse_model_mapping
    )]
    pub gateway_model_map: Vec<(String, String)>,
    /// Name of the environment variable holding the endpoint's API key.
    #[arg(
        long,
        env = "SWITCHYARD_GATEWAY_API_KEY_ENV",
        conflicts_with = "gateway_api_key_file"
    )]
    pub gateway_api_key_env: Option<String>,
    /// File whose first line is the endpoint's API key.
    #[arg(long, env = "SWITCHYARD_GATEWAY_API_KEY_FILE")]
    pub gateway_api_key_file: Option<PathBuf>,
    /// Timeout for connecting to the endpoint.
    #[arg(long, env = "SWITCHYARD_GATEWAY_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s")]
    pub gateway_connect_timeout: Duration,
    /// Longest wait for the response headers and between two streamed chunks.
    #[arg(long, env = "SWITCHYARD_GATEWAY_CHUNK_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub gateway_chunk_timeout: Duration,
    /// Expected decode rate of one stream on the endpoint, advertised for placement.
    #[arg(
        long,
        env = "SWITCHYARD_GATEWAY_TOKENS_PER_S",
        default_value_t = 1000.0
    )]
    pub gateway_tokens_per_s: f64,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        Self {
            gateway_url: None,
            gateway_model_map: Vec::new(),
            gateway_api_key_env: None,
            gateway_api_key_file: None,
            gateway_connect_timeout: Duration::from_secs(5),
            gateway_chunk_timeout: Duration::from_secs(30),
            gateway_tokens_per_s: 1000.0,
        }
    }
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
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=switchyard_worker::MAX_SLOTS))]
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
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum WseEngineError {
    #[error("invalid engine options: {0}")]
    Config(String),
    #[error("invalid gateway options: {0}")]
    Gateway(#[from] GatewayError),
}

/// The gateway engine's config from the command line (reads the API key).
pub fn gateway_config(args: &WseEngineArgs) -> Result<GatewayConfig, WseEngineError> {
    let g = &args.gateway;
    let base_url = g.gateway_url.clone().ok_or_else(|| {
        WseEngineError::Config("--gateway-url: required with --engine gateway".into())
    })?;
    for (local, _) in &g.gateway_model_map {
        if !args.models.contains(local) {
            return Err(WseEngineError::Config(format!(
                "--gateway-model-map: {local:?} is not a served --model ({:?})",
                args.models
            )));
        }
    }
    let models = args
        .models
        .iter()
        .map(|local| {
            let upstream = g
                .gateway_model_map
                .iter()
                .find(|(l, _)| l == local)
                .map_or(local.clone(), |(_, u)| u.clone());
            (local.clone(), upstream)
        })
        .collect();
    let api_key = match (&g.gateway_api_key_env, &g.gateway_api_key_file) {
        (Some(name), _) => Some(ApiKey::from_env(name)?),
        (None, Some(path)) => Some(ApiKey::from_file(path)?),
        (None, None) => None,
    };
    Ok(GatewayConfig {
        base_url,
        models,
        api_key,
        max_concurrent: args.max_concurrent,
        connect_timeout: g.gateway_connect_timeout,
        chunk_timeout: g.gateway_chunk_timeout,
        tokens_per_s: g.gateway_tokens_per_s,
    })
}

/// Builds the configured engine.
pub fn build_engine(args: &WseEngineArgs) -> Result<Arc<dyn Engine>, WseEngineError> {
    if args.max_concurrent == 0 {
        return Err(WseEngineError::Config(
            "--max-concurrent: must be at least 1".into(),
        ));
    }
    match args.engine {
        WseEngineKind::Gateway => Ok(Arc::new(GatewayEngine::new(gateway_config(args)?)?)),
        WseEngineKind::Synthetic => Ok(Arc::new(
            SyntheticEngine::checked(SyntheticConfig {
                models: args.models.clone(),
                ttft: args.synthetic_ttft,
                tokens_per_s: args.synthetic_tokens_per_s,
                max_concurrent: args.max_concurrent,
                // A wafer has fixed slots: no queue beyond them.
                max_queue: 0,
                prefill_tokens_per_s: switchyard_worker::synthetic::DEFAULT_PREFILL_TOKENS_PER_S,
            })
            .map_err(WseEngineError::Config)?,
        )),
    }
}
