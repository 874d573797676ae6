//! Worker profiles and cluster shape for the simulator, read from a JSON file
//! (`bench/profiles/default.json`) whose numbers carry their sources.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_router::policy::document::PolicyDocument;

/// A GPU node running continuous batching: one engine step decodes one token for every running
/// sequence and prefills the prompts admitted since the last step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuProfile {
    /// Sequences batched at once.
    pub max_concurrent: u32,
    /// Step time with an empty batch, ms (weights streamed once per step).
    pub step_base_ms: f64,
    /// Added step time per running sequence, ms (KV-cache reads).
    pub step_per_seq_ms: f64,
    /// Prefill throughput, prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Chunked prefill: prompt tokens prefilled per step at most, latency-critical prompts
    /// first (as the candle engine does); 0 = every waiting prompt whole in the next step.
    #[serde(default)]
    pub prefill_chunk_tokens: u32,
    /// Prompt blocks (512 tokens) kept in the prefix cache (0 = none).
    pub prefix_cache_blocks: usize,
    /// Price per million generated tokens.
    pub cost_per_mtok: f64,
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

/// A wafer-scale gateway with fixed concurrency slots.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WseProfile {
    pub slots: u32,
    /// Decode rate of one stream, tokens per second.
    pub decode_tokens_per_s: f64,
    /// Prefill rate of one stream, prompt tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Fixed latency to the first token (network, gateway, scheduling), ms.
    pub ttft_overhead_ms: f64,
    pub prefix_cache_blocks: usize,
    pub cost_per_mtok: f64,
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterShape {
    pub gpu_workers: u32,
    pub wse_workers: u32,
}

/// The whole profile file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    /// Model every simulated worker serves.
    pub model: String,
    pub gpu: GpuProfile,
    pub wse: WseProfile,
    pub cluster: ClusterShape,
    /// The routing policy document the `switchyard` policy runs with (same format as etcd's).
    pub policy: PolicyDocument,
    #[serde(default)]
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("profile: {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn check(field: &'static str, ok: bool, value: impl std::fmt::Display) -> Result<(), ProfileError> {
    if ok {
        Ok(())
    } else {
        Err(ProfileError::Invalid {
            field,
            reason: format!("{value} is out of range"),
        })
    }
}

impl Profiles {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let read = |reason: String| ProfileError::Read {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| read(e.to_string()))?;
        let profiles: Self = serde_json::from_slice(&bytes).map_err(|e| read(e.to_string()))?;
        profiles.validate()?;
        Ok(profiles)
    }

    pub fn validate(&self) -> Result<(), ProfileError> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        let nonneg = |v: f64| v.is_finite() && v >= 0.0;
        check("model", !self.model.trim().is_empty(), "\"\"")?;
        let g = &self.gpu;
        check("gpu.max_concurrent", g.max_concurrent > 0, g.max_concurrent)?;
        check("gpu.step_base_ms", pos(g.step_base_ms), g.step_base_ms)?;
        check(
            "gpu.step_per_seq_ms",
            nonneg(g.step_per_seq_ms),
            g.step_per_seq_ms,
        )?;
        check(
            "gpu.prefill_tokens_per_s",
            pos(g.prefill_tokens_per_s),
            g.prefill_tokens_per_s,
        )?;
        check(
            "gpu.cost_per_mtok",
            nonneg(g.cost_per_mtok),
            g.cost_per_mtok,
        )?;
        let w = &self.wse;
        check("wse.slots", w.slots > 0, w.slots)?;
        check(
            "wse.decode_tokens_per_s",
            pos(w.decode_tokens_per_s),
            w.decode_tokens_per_s,
        )?;
        check(
            "wse.prefill_tokens_per_s",
            pos(w.prefill_tokens_per_s),
            w.prefill_tokens_per_s,
        )?;
        check(
            "wse.ttft_overhead_ms",
            nonneg(w.ttft_overhead_ms),
            w.ttft_overhead_ms,
        )?;
        check(
            "wse.cost_per_mtok",
            nonneg(w.cost_per_mtok),
            w.cost_per_mtok,
        )?;
        check(
            "cluster",
            self.cluster.gpu_workers + self.cluster.wse_workers > 0,
            "0 workers",
        )?;
        self.policy.validate().map_err(|e| ProfileError::Invalid {
            field: "policy",
            reason: e.to_string(),
        })
    }
}
