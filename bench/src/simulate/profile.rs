//! Worker profiles and cluster shape for the simulator, read from a JSON file
//! (`bench/profiles/default.json`) whose numbers carry their sources.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_policy::document::PolicyDocument;

use super::kv::TRACE_BLOCK_TOKENS;

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
    /// KV memory of the node, bytes (running sequences and cached prefixes share it; 0 = no
    /// prefix cache).
    pub kv_budget_bytes: u64,
    /// KV bytes of one token (layers × KV heads × head dim × 2 (K, V) × bytes per value).
    pub kv_bytes_per_token: u64,
    /// The engine's KV block, tokens (the native engine's is 32). Must divide the traces'
    /// 512-token blocks: a trace block is stored, hit and evicted as that many engine blocks.
    pub kv_block_tokens: u32,
    /// Price per million generated tokens.
    pub cost_per_mtok: f64,
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
}

impl GpuProfile {
    /// The engine's KV blocks in the budget.
    pub fn kv_engine_blocks(&self) -> u64 {
        self.kv_budget_bytes
            / self.kv_bytes_per_token.max(1)
            / u64::from(self.kv_block_tokens.max(1))
    }

    /// The KV budget in whole trace blocks (512 tokens): the simulated cache's capacity.
    pub fn kv_trace_blocks(&self) -> usize {
        let per_trace_block = u64::from(TRACE_BLOCK_TOKENS / self.kv_block_tokens.max(1)).max(1);
        (self.kv_engine_blocks() / per_trace_block) as usize
    }
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
            "gpu.kv_bytes_per_token",
            g.kv_bytes_per_token > 0,
            g.kv_bytes_per_token,
        )?;
        check(
            "gpu.kv_block_tokens",
            g.kv_block_tokens > 0 && TRACE_BLOCK_TOKENS.is_multiple_of(g.kv_block_tokens),
            format!("{} (must divide {TRACE_BLOCK_TOKENS})", g.kv_block_tokens),
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
