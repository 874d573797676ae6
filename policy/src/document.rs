//! The routing policy document stored at `/switchyard/v1/policy` (JSON): lanes and their SLOs,
//! tenant defaults, ordered classification rules, spill and admission limits, placement knobs.
//! Parsed and validated here, before any router uses it; an invalid document is rejected with
//! an error naming the field, and the caller keeps the policy it had.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_proto::v1::Lane;

/// A lane as written in the document: `latency-critical` or `cost-sensitive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaneName {
    LatencyCritical,
    CostSensitive,
}

impl LaneName {
    pub fn lane(self) -> Lane {
        match self {
            LaneName::LatencyCritical => Lane::LatencyCritical,
            LaneName::CostSensitive => Lane::CostSensitive,
        }
    }

    /// Index used for per-lane arrays: 0 latency-critical, 1 cost-sensitive.
    pub fn index(self) -> usize {
        match self {
            LaneName::LatencyCritical => 0,
            LaneName::CostSensitive => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LaneName::LatencyCritical => "latency-critical",
            LaneName::CostSensitive => "cost-sensitive",
        }
    }

    /// The lane of a wire `Lane`; `None` for `LANE_UNSPECIFIED`.
    pub fn from_lane(lane: Lane) -> Option<Self> {
        match lane {
            Lane::LatencyCritical => Some(LaneName::LatencyCritical),
            Lane::CostSensitive => Some(LaneName::CostSensitive),
            Lane::Unspecified => None,
        }
    }

    pub const ALL: [LaneName; 2] = [LaneName::LatencyCritical, LaneName::CostSensitive];
}

/// Service objective and limits of one lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanePolicy {
    /// Time-to-first-token target, milliseconds.
    pub ttft_slo_ms: f64,
    /// Minimum decode rate of one stream, tokens per second (0 = none).
    pub min_tokens_per_s: f64,
    /// Requests of this lane waiting at the router for a slot, at most.
    pub max_queue: u32,
    /// A queued request waits this long at most, then is shed.
    pub max_queue_wait_ms: f64,
    /// Latency-critical: may spill to the GPU pool when no WSE slot can meet the SLO.
    /// Cost-sensitive: may borrow idle WSE slots.
    pub spill: bool,
    /// Cost-sensitive only: borrow WSE slots only while WSE utilisation is below this (0..=1).
    pub spill_max_utilisation: f64,
    /// `retry-after` told to a shed client, milliseconds.
    pub retry_after_ms: u64,
}

impl LanePolicy {
    fn latency_critical() -> Self {
        Self {
            ttft_slo_ms: 1000.0,
            min_tokens_per_s: 20.0,
            max_queue: 1024,
            max_queue_wait_ms: 5_000.0,
            spill: true,
            spill_max_utilisation: 1.0,
            retry_after_ms: 500,
        }
    }

    fn cost_sensitive() -> Self {
        Self {
            ttft_slo_ms: 10_000.0,
            min_tokens_per_s: 5.0,
            max_queue: 4096,
            max_queue_wait_ms: 30_000.0,
            spill: true,
            spill_max_utilisation: 0.5,
            retry_after_ms: 2_000,
        }
    }
}

impl Default for LanePolicy {
    fn default() -> Self {
        Self::cost_sensitive()
    }
}

/// A lane object as an operator writes it: fields left out keep *that lane's* defaults (a
/// partial `latency_critical` object must not pick up cost-sensitive limits).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LanePolicyPatch {
    ttft_slo_ms: Option<f64>,
    min_tokens_per_s: Option<f64>,
    max_queue: Option<u32>,
    max_queue_wait_ms: Option<f64>,
    spill: Option<bool>,
    spill_max_utilisation: Option<f64>,
    retry_after_ms: Option<u64>,
}

impl LanePolicyPatch {
    fn over(self, base: LanePolicy) -> LanePolicy {
        LanePolicy {
            ttft_slo_ms: self.ttft_slo_ms.unwrap_or(base.ttft_slo_ms),
            min_tokens_per_s: self.min_tokens_per_s.unwrap_or(base.min_tokens_per_s),
            max_queue: self.max_queue.unwrap_or(base.max_queue),
            max_queue_wait_ms: self.max_queue_wait_ms.unwrap_or(base.max_queue_wait_ms),
            spill: self.spill.unwrap_or(base.spill),
            spill_max_utilisation: self
                .spill_max_utilisation
                .unwrap_or(base.spill_max_utilisation),
            retry_after_ms: self.retry_after_ms.unwrap_or(base.retry_after_ms),
        }
    }
}

fn latency_critical_lane<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LanePolicy, D::Error> {
    Ok(LanePolicyPatch::deserialize(d)?.over(LanePolicy::latency_critical()))
}

fn cost_sensitive_lane<'de, D: serde::Deserializer<'de>>(d: D) -> Result<LanePolicy, D::Error> {
    Ok(LanePolicyPatch::deserialize(d)?.over(LanePolicy::cost_sensitive()))
}

/// What a classification rule matches on; every present condition must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Match {
    /// Exact model name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_at_most: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens_at_least: Option<u32>,
    /// Estimated prompt tokens (the router estimates 4 bytes per token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_at_most: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_at_least: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streaming: Option<bool>,
    /// The request's own `ttft_slo_ms` is set and at most this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttft_slo_ms_at_most: Option<u32>,
    /// Request metadata (and headers the front door copies into it) equal to these values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// An ordered classification rule: the first matching rule decides the lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(rename = "match", default)]
    pub when: Match,
    pub lane: LaneName,
    /// Overrides the lane's TTFT target for requests this rule matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_slo_ms: Option<f64>,
}

/// Knobs of worker choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementPolicy {
    /// Random candidates sampled per decision (power of d choices) when a pool is large.
    pub choices: u32,
    /// Pools with at most this many free workers are scanned in full instead of sampled.
    pub scan_below: u32,
    /// Fraction of the prompt assumed cached on the affinity worker (0..=1).
    pub affinity_prefill_discount: f64,
    /// Keep the affinity worker if its predicted TTFT exceeds the best by at most this.
    pub affinity_slack_ms: f64,
    /// …and only while it runs at most this many more requests than the best other candidate:
    /// a burst of one conversation (or of one prompt) spreads over the pool instead of piling
    /// onto the worker its key hashes to.
    pub affinity_max_extra_outstanding: u32,
    /// Fraction of GPU slots kept free of cost-sensitive work, for latency-critical spill.
    pub gpu_reserve_for_latency: f64,
    /// Prefill rate assumed for a worker that reports none, tokens per second.
    pub default_prefill_tokens_per_s: f64,
    /// Decode rate per stream assumed for a worker that reports none, tokens per second.
    pub default_decode_tokens_per_s: f64,
    /// Placement score: milliseconds added for a fully busy worker (scaled by utilisation).
    pub load_weight_ms: f64,
    /// Placement score: milliseconds added per unit of a worker's `cost_per_mtok`.
    pub cost_weight_ms: f64,
    /// Once this share of the WSE pool's slots is busy (0..=1; 1 = never), a latency-critical
    /// request that a GPU is predicted to serve within `save_wse_gpu_ttft_fraction` of its SLO
    /// goes to that GPU (when its lane may spill): the last WSE slots are kept for the long
    /// prompts only the WSE prefills in time.
    pub save_wse_above_utilisation: f64,
    /// See `save_wse_above_utilisation` (0..=1).
    pub save_wse_gpu_ttft_fraction: f64,
    /// A latency-critical request that would spill to a GPU predicted above
    /// `await_wse_gpu_ttft_fraction` of its SLO while every WSE slot is busy waits at the
    /// router for a WSE slot instead — as long as the pool's measured slot turnover says one
    /// frees soon enough for the WSE to still meet the SLO ([`crate::await_wse`]).
    pub await_wse: bool,
    /// See `await_wse` (non-negative; 1 = only requests the GPU is predicted to serve late).
    pub await_wse_gpu_ttft_fraction: f64,
}

impl Default for PlacementPolicy {
    fn default() -> Self {
        Self {
            choices: 4,
            scan_below: 32,
            affinity_prefill_discount: 0.5,
            affinity_slack_ms: 200.0,
            affinity_max_extra_outstanding: 32,
            gpu_reserve_for_latency: 0.15,
            default_prefill_tokens_per_s: 5_000.0,
            default_decode_tokens_per_s: 50.0,
            load_weight_ms: 50.0,
            cost_weight_ms: 100.0,
            save_wse_above_utilisation: 1.0,
            save_wse_gpu_ttft_fraction: 0.4,
            await_wse: false,
            await_wse_gpu_ttft_fraction: 1.0,
        }
    }
}

/// Moving running generations between workers on purpose (`migration`). A moved generation
/// continues from its last token (the prompt and the tokens so far are prefilled again on the
/// target, less what it has cached), as after a worker failure. Absent: nothing moves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationPolicy {
    pub enabled: bool,
    /// A generation moves at most this many times (a ping-pong bound).
    pub max_moves_per_generation: u32,
    /// A latency-critical request that finds no free WSE slot and no GPU meeting its SLO takes
    /// the slot of a cost-sensitive generation that borrowed it; that one continues on a GPU.
    pub preempt_borrowed_wse: bool,
    /// A generation falling behind where it runs moves to a worker predicted to do better:
    /// before its first token, when it would miss its TTFT SLO where it is and would not on
    /// the target; after it, when its measured decode rate is below `rebalance_rate_ratio` ×
    /// the predicted one (or below the lane's minimum).
    pub rebalance: bool,
    /// See `rebalance` (0..1).
    pub rebalance_rate_ratio: f64,
    /// A rebalancing move must be predicted to save at least this much time, milliseconds.
    pub rebalance_min_gain_ms: f64,
    /// A draining worker hands its generations to other workers instead of finishing them.
    pub drain_handoff: bool,
    /// Generations with fewer tokens left than this are not moved for rebalancing or drain
    /// (they finish sooner than a move pays off).
    pub min_remaining_tokens: u32,
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            max_moves_per_generation: 1,
            preempt_borrowed_wse: true,
            rebalance: true,
            rebalance_rate_ratio: 0.5,
            rebalance_min_gain_ms: 100.0,
            drain_handoff: true,
            min_remaining_tokens: 16,
        }
    }
}

/// Starting a latency-critical request on a second worker when its first is predicted close
/// to its SLO (`hedging`): the first token wins, the other copy is cancelled. Absent: off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgingPolicy {
    pub enabled: bool,
    /// Hedge when the primary placement's predicted TTFT exceeds `slo_margin` × the SLO.
    pub slo_margin: f64,
    /// Extra prefill tokens hedges may cost, as a share of the prompt tokens of the lane's
    /// requests so far (0..=1).
    pub budget_fraction: f64,
    /// Per tenant (request metadata `tenant`): the share of that tenant's own prompt tokens
    /// its hedges may cost, on top of the lane's budget (0 = never hedge that tenant).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, f64>,
    /// The second copy may run in the primary's pool when the other pool has no worker
    /// predicted in time (false: only in the other pool).
    pub same_pool: bool,
}

impl Default for HedgingPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            slo_margin: 0.8,
            budget_fraction: 0.05,
            tenants: BTreeMap::new(),
            same_pool: true,
        }
    }
}

/// What happens to a request classified into a lane its tenant may not use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DisallowedLane {
    /// Served in the lane the tenant may use.
    #[default]
    Downgrade,
    /// Refused with `PERMISSION_DENIED` (HTTP 403).
    Refuse,
}

/// A token budget per period: at most `tokens` (prompt + completion) per `period_s`, periods
/// aligned to the Unix epoch (86 400: UTC days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBudget {
    pub tokens: u64,
    pub period_s: u64,
}

/// Limits on one tenant's traffic, enforced by each router on what passes through it. Every
/// field is optional; a tenant's own entry falls back, field by field, to `quotas.default`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Requests in flight (placed, running or waiting for a slot), at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Prompt + completion tokens per minute: a token bucket of this size refilled at this
    /// rate. A request reserves its prompt and `max_tokens` when admitted and is charged what
    /// it really used when it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_budget: Option<TokenBudget>,
    /// Lanes the tenant may use (absent: both).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lanes: Option<Vec<LaneName>>,
    /// What happens to a request classified into a lane not in `lanes` (default: downgrade).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disallowed_lane: Option<DisallowedLane>,
}

impl TenantLimits {
    /// These limits with every field left out taken from `base`.
    pub fn over(&self, base: &TenantLimits) -> TenantLimits {
        TenantLimits {
            max_in_flight: self.max_in_flight.or(base.max_in_flight),
            tokens_per_minute: self.tokens_per_minute.or(base.tokens_per_minute),
            token_budget: self.token_budget.or(base.token_budget),
            lanes: self.lanes.clone().or_else(|| base.lanes.clone()),
            disallowed_lane: self.disallowed_lane.or(base.disallowed_lane),
        }
    }

    /// Whether the tenant may use `lane`.
    pub fn allows(&self, lane: LaneName) -> bool {
        self.lanes
            .as_ref()
            .is_none_or(|lanes| lanes.contains(&lane))
    }

    fn validate(&self, field: &str) -> Result<(), PolicyError> {
        if self.max_in_flight == Some(0) {
            return Err(invalid(
                format!("{field}.max_in_flight"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if self.tokens_per_minute == Some(0) {
            return Err(invalid(
                format!("{field}.tokens_per_minute"),
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        if let Some(budget) = self.token_budget {
            if budget.tokens == 0 {
                return Err(invalid(
                    format!("{field}.token_budget.tokens"),
                    "must be at least 1",
                ));
            }
            if !(1..=MAX_BUDGET_PERIOD_S).contains(&budget.period_s) {
                return Err(invalid(
                    format!("{field}.token_budget.period_s"),
                    format!(
                        "{} is not between 1 and {MAX_BUDGET_PERIOD_S} (a year)",
                        budget.period_s
                    ),
                ));
            }
        }
        if self.lanes.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                format!("{field}.lanes"),
                "must name at least one lane (leave it out for both)",
            ));
        }
        Ok(())
    }
}

const MAX_BUDGET_PERIOD_S: u64 = 366 * 86_400;

/// Moves of one generation, at most (each re-prefills its whole context).
const MAX_MOVES: u32 = 16;

/// Tenant quotas: `default` for every tenant, `tenants` per tenant (keyed by the request
/// metadata `tenant`, the API key's tenant when the router has keys). Requests naming no
/// tenant are not limited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantQuotas {
    pub default: TenantLimits,
    pub tenants: BTreeMap<String, TenantLimits>,
}

impl TenantQuotas {
    /// The limits in force for `tenant`.
    pub fn limits_of(&self, tenant: &str) -> TenantLimits {
        match self.tenants.get(tenant) {
            Some(own) => own.over(&self.default),
            None => self.default.clone(),
        }
    }

    fn validate(&self) -> Result<(), PolicyError> {
        self.default.validate("quotas.default")?;
        for (tenant, limits) in &self.tenants {
            if tenant.trim().is_empty() {
                return Err(invalid("quotas.tenants", "tenant names must not be empty"));
            }
            limits.validate(&format!("quotas.tenants.{tenant}"))?;
        }
        Ok(())
    }
}

/// The whole routing policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyDocument {
    /// Lane of requests no explicit class, tenant or rule decides.
    pub default_lane: LaneName,
    #[serde(deserialize_with = "latency_critical_lane")]
    pub latency_critical: LanePolicy,
    #[serde(deserialize_with = "cost_sensitive_lane")]
    pub cost_sensitive: LanePolicy,
    /// Default lane per tenant, keyed by the request metadata `tenant` (the API key's tenant
    /// when the router has keys; otherwise whatever the client puts there).
    pub tenants: BTreeMap<String, LaneName>,
    pub rules: Vec<Rule>,
    pub placement: PlacementPolicy,
    /// Requests waiting at the router across both lanes, at most.
    pub max_queued: u32,
    pub quotas: TenantQuotas,
    /// Left out of the JSON while default, so documents stay readable by routers that predate it.
    #[serde(skip_serializing_if = "is_default")]
    pub migration: MigrationPolicy,
    #[serde(skip_serializing_if = "is_default")]
    pub hedging: HedgingPolicy,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

impl Default for PolicyDocument {
    fn default() -> Self {
        Self {
            default_lane: LaneName::CostSensitive,
            latency_critical: LanePolicy::latency_critical(),
            cost_sensitive: LanePolicy::cost_sensitive(),
            tenants: BTreeMap::new(),
            // No rules by default: AUTO requests take the default lane until an operator
            // stores rules (bench/profiles/policy.json is an example).
            rules: Vec::new(),
            placement: PlacementPolicy::default(),
            max_queued: 4096,
            quotas: TenantQuotas::default(),
            migration: MigrationPolicy::default(),
            hedging: HedgingPolicy::default(),
        }
    }
}

/// A policy document is at most this long (bytes), as sent and as stored: etcd refuses a
/// request over its `--max-request-bytes` (1.5 MiB by default) and every router parses each
/// new document. Thousands of tenants fit (a tenant's quota entry takes ~100 bytes).
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;

/// Why a policy document was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy document does not parse (JSON syntax, a field name or a value's type): {0}")]
    Parse(String),
    #[error("policy document: {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The document is JSON, but not an object (`[]`, `"…"`, a number, `null`).
    #[error("a policy document must be a JSON object ({{\"default_lane\": …, …}}), not {0}")]
    NotAnObject(&'static str),
    #[error("policy document is {bytes} bytes, over the limit of {limit} bytes (1 MiB)")]
    TooLarge { bytes: usize, limit: usize },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl PolicyDocument {
    /// Parses and validates a JSON document: at most [`MAX_DOCUMENT_BYTES`], a JSON object
    /// whose sections are objects too, every field known and valid. A refusal of the JSON
    /// itself (syntax, a field name, a value's type) gives a line and column in `bytes`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, PolicyError> {
        check_size(bytes.len())?;
        let value: Value =
            serde_json::from_slice(bytes).map_err(|e| PolicyError::Parse(e.to_string()))?;
        check_object(&value)?;
        // Typed from the text itself, so that an error's line and column are the caller's.
        let doc: Self =
            serde_json::from_slice(bytes).map_err(|e| PolicyError::Parse(e.to_string()))?;
        doc.check_shape(&value)?;
        doc.validate()?;
        Ok(doc)
    }

    /// Like [`Self::from_json`] for a document already read as JSON (the result of a merge
    /// patch): a field name or a value's type at fault is named by its path in the document
    /// (`placement.choices`), as there is no text to give a line and column in.
    pub fn from_value(value: &Value) -> Result<Self, PolicyError> {
        check_object(value)?;
        let doc: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            PolicyError::Invalid {
                field,
                reason: e.into_inner().to_string(),
            }
        })?;
        doc.check_shape(value)?;
        doc.validate()?;
        Ok(doc)
    }

    /// The document as pretty JSON, as stored in etcd.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("policy documents always serialise")
    }

    /// [`Self::to_json`], refused when it is over [`MAX_DOCUMENT_BYTES`]: what a writer
    /// stores, so that every reader can parse it.
    pub fn to_stored_json(&self) -> Result<String, PolicyError> {
        let json = self.to_json();
        check_size(json.len())?;
        Ok(json)
    }

    /// serde reads a struct from a JSON array too, its fields by position (`[]` is the whole
    /// default document, `["latency-critical"]` sets `default_lane`), and an enum from a
    /// one-member object: refuses each value of `given` that is not written the way this
    /// document writes it back (an array only where the document has a list).
    fn check_shape(&self, given: &Value) -> Result<(), PolicyError> {
        let written = serde_json::to_value(self).expect("policy documents always serialise");
        let (Value::Object(given), Value::Object(written)) = (given, &written) else {
            return Err(PolicyError::NotAnObject(json_kind(given)));
        };
        for (key, value) in given {
            same_shape(value, written.get(key), key)?;
        }
        Ok(())
    }

    pub fn lane(&self, lane: LaneName) -> &LanePolicy {
        match lane {
            LaneName::LatencyCritical => &self.latency_critical,
            LaneName::CostSensitive => &self.cost_sensitive,
        }
    }

    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for lane in LaneName::ALL {
            let field = match lane {
                LaneName::LatencyCritical => "latency_critical",
                LaneName::CostSensitive => "cost_sensitive",
            };
            let p = self.lane(lane);
            positive(&format!("{field}.ttft_slo_ms"), p.ttft_slo_ms)?;
            non_negative(&format!("{field}.min_tokens_per_s"), p.min_tokens_per_s)?;
            non_negative(&format!("{field}.max_queue_wait_ms"), p.max_queue_wait_ms)?;
            fraction(
                &format!("{field}.spill_max_utilisation"),
                p.spill_max_utilisation,
            )?;
        }
        for tenant in self.tenants.keys() {
            if tenant.trim().is_empty() {
                return Err(invalid("tenants", "tenant names must not be empty"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            if rule.name.trim().is_empty() {
                return Err(invalid(format!("{field}.name"), "must not be empty"));
            }
            if !names.insert(rule.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("{:?} is used by an earlier rule", rule.name),
                ));
            }
            if let Some(slo) = rule.ttft_slo_ms {
                positive(&format!("{field}.ttft_slo_ms"), slo)?;
            }
            let m = &rule.when;
            if let (Some(lo), Some(hi)) = (m.max_tokens_at_least, m.max_tokens_at_most)
                && lo > hi
            {
                return Err(invalid(
                    format!("{field}.match.max_tokens_at_least"),
                    format!("{lo} is above max_tokens_at_most {hi}: the rule can never match"),
                ));
            }
            if let (Some(lo), Some(hi)) = (m.prompt_tokens_at_least, m.prompt_tokens_at_most)
                && lo > hi
            {
                return Err(invalid(
                    format!("{field}.match.prompt_tokens_at_least"),
                    format!("{lo} is above prompt_tokens_at_most {hi}: the rule can never match"),
                ));
            }
            if m.model.as_ref().is_some_and(|s| s.trim().is_empty()) {
                return Err(invalid(format!("{field}.match.model"), "must not be empty"));
            }
            if m.metadata.keys().any(|k| k.is_empty()) {
                return Err(invalid(
                    format!("{field}.match.metadata"),
                    "keys must not be empty",
                ));
            }
        }
        if self.max_queued == 0 {
            return Err(invalid("max_queued", "must be at least 1"));
        }
        self.quotas.validate()?;
        let p = &self.placement;
        if p.choices == 0 || p.choices > 64 {
            return Err(invalid("placement.choices", "must be between 1 and 64"));
        }
        fraction(
            "placement.affinity_prefill_discount",
            p.affinity_prefill_discount,
        )?;
        non_negative("placement.affinity_slack_ms", p.affinity_slack_ms)?;
        if !(0.0..1.0).contains(&p.gpu_reserve_for_latency) {
            return Err(invalid(
                "placement.gpu_reserve_for_latency",
                format!("{} is not in [0, 1)", p.gpu_reserve_for_latency),
            ));
        }
        positive(
            "placement.default_prefill_tokens_per_s",
            p.default_prefill_tokens_per_s,
        )?;
        positive(
            "placement.default_decode_tokens_per_s",
            p.default_decode_tokens_per_s,
        )?;
        non_negative("placement.load_weight_ms", p.load_weight_ms)?;
        non_negative("placement.cost_weight_ms", p.cost_weight_ms)?;
        fraction(
            "placement.save_wse_above_utilisation",
            p.save_wse_above_utilisation,
        )?;
        fraction(
            "placement.save_wse_gpu_ttft_fraction",
            p.save_wse_gpu_ttft_fraction,
        )?;
        non_negative(
            "placement.await_wse_gpu_ttft_fraction",
            p.await_wse_gpu_ttft_fraction,
        )?;
        let m = &self.migration;
        if m.max_moves_per_generation > MAX_MOVES {
            return Err(invalid(
                "migration.max_moves_per_generation",
                format!("{} is above {MAX_MOVES}", m.max_moves_per_generation),
            ));
        }
        if !(m.rebalance_rate_ratio > 0.0 && m.rebalance_rate_ratio < 1.0) {
            return Err(invalid(
                "migration.rebalance_rate_ratio",
                format!("{} is not in (0, 1)", m.rebalance_rate_ratio),
            ));
        }
        non_negative("migration.rebalance_min_gain_ms", m.rebalance_min_gain_ms)?;
        let h = &self.hedging;
        positive("hedging.slo_margin", h.slo_margin)?;
        fraction("hedging.budget_fraction", h.budget_fraction)?;
        for (tenant, share) in &h.tenants {
            if tenant.trim().is_empty() {
                return Err(invalid("hedging.tenants", "tenant names must not be empty"));
            }
            fraction(&format!("hedging.tenants.{tenant}"), *share)?;
        }
        Ok(())
    }
}

fn check_size(bytes: usize) -> Result<(), PolicyError> {
    if bytes > MAX_DOCUMENT_BYTES {
        return Err(PolicyError::TooLarge {
            bytes,
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    Ok(())
}

fn check_object(value: &Value) -> Result<(), PolicyError> {
    match value {
        Value::Object(_) => Ok(()),
        other => Err(PolicyError::NotAnObject(json_kind(other))),
    }
}

/// What a JSON value is, as an error names it.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Checks that `given` (at `field`) is what the document writes back there (`written`,
/// `None` where it leaves a default out): an array only where it writes a list, an object
/// only where it writes an object.
fn same_shape(given: &Value, written: Option<&Value>, field: &str) -> Result<(), PolicyError> {
    match (given, written) {
        (Value::Array(items), Some(Value::Array(kept))) => {
            for (i, item) in items.iter().enumerate() {
                same_shape(item, kept.get(i), &format!("{field}[{i}]"))?;
            }
            Ok(())
        }
        // A struct read from an array (what it does not write back, a section left at its
        // default, is one too).
        (Value::Array(_), _) => Err(invalid(field, "must be a JSON object, not an array")),
        (Value::Object(members), None) => {
            for (key, value) in members {
                same_shape(value, None, &format!("{field}.{key}"))?;
            }
            Ok(())
        }
        (Value::Object(members), Some(Value::Object(kept))) => {
            for (key, value) in members {
                same_shape(value, kept.get(key), &format!("{field}.{key}"))?;
            }
            Ok(())
        }
        // E.g. a lane written `{"latency-critical": null}`.
        (Value::Object(_), Some(other)) => Err(invalid(
            field,
            format!("must be {}, not an object", json_kind(other)),
        )),
        _ => Ok(()),
    }
}

fn positive(field: &str, value: f64) -> Result<(), PolicyError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be a positive number")))
    }
}

fn non_negative(field: &str, value: f64) -> Result<(), PolicyError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} must be zero or more")))
    }
}

fn fraction(field: &str, value: f64) -> Result<(), PolicyError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(invalid(field, format!("{value} is not in [0, 1]")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_document_is_valid_and_round_trips() {
        let doc = PolicyDocument::default();
        doc.validate().unwrap();
        assert_eq!(PolicyDocument::from_json(doc.to_json().as_bytes()), Ok(doc));
    }

    #[test]
    fn partial_documents_take_defaults() {
        let doc = PolicyDocument::from_json(br#"{"default_lane": "latency-critical"}"#).unwrap();
        assert_eq!(doc.default_lane, LaneName::LatencyCritical);
        assert_eq!(doc.placement, PlacementPolicy::default());
    }

    #[test]
    fn a_partial_lane_keeps_its_own_lanes_defaults() {
        let doc = PolicyDocument::from_json(
            br#"{"latency_critical": {"max_queue": 10}, "cost_sensitive": {"spill": false}}"#,
        )
        .unwrap();
        let lc = LanePolicy {
            max_queue: 10,
            ..LanePolicy::latency_critical()
        };
        let cs = LanePolicy {
            spill: false,
            ..LanePolicy::cost_sensitive()
        };
        assert_eq!((doc.latency_critical, doc.cost_sensitive), (lc, cs));
    }

    #[test]
    fn migration_and_hedging_are_off_unless_the_document_turns_them_on() {
        let doc = PolicyDocument::from_json(b"{}").unwrap();
        assert!(!doc.migration.enabled && !doc.hedging.enabled);
        // Left out of the stored JSON while default: routers that predate them still read it.
        assert!(!doc.to_json().contains("migration") && !doc.to_json().contains("hedging"));
        let doc = PolicyDocument::from_json(
            br#"{"migration": {"enabled": true, "max_moves_per_generation": 3},
                 "hedging": {"enabled": true, "slo_margin": 0.5, "tenants": {"acme": 0.01}}}"#,
        )
        .unwrap();
        assert_eq!(doc.migration.max_moves_per_generation, 3);
        assert!(
            doc.migration.preempt_borrowed_wse,
            "other fields keep their defaults"
        );
        assert_eq!(doc.hedging.budget_fraction, 0.05);
        assert_eq!(PolicyDocument::from_json(doc.to_json().as_bytes()), Ok(doc));
        for (json, field) in [
            (
                &br#"{"migration": {"rebalance_rate_ratio": 1.5}}"#[..],
                "migration.rebalance_rate_ratio",
            ),
            (
                br#"{"migration": {"max_moves_per_generation": 99}}"#,
                "migration.max_moves_per_generation",
            ),
            (
                br#"{"hedging": {"budget_fraction": 2}}"#,
                "hedging.budget_fraction",
            ),
            (br#"{"hedging": {"slo_margin": 0}}"#, "hedging.slo_margin"),
            (
                br#"{"hedging": {"tenants": {"acme": -1}}}"#,
                "hedging.tenants.acme",
            ),
        ] {
            let err = PolicyDocument::from_json(json).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    /// serde reads a struct from a JSON array too (fields by position): `[]` was the whole
    /// default document and `["latency-critical"]` set `default_lane`.
    #[test]
    fn a_document_must_be_a_json_object() {
        for json in [
            &b"[]"[..],
            br#"["latency-critical"]"#,
            b"null",
            b"1",
            br#""cost-sensitive""#,
        ] {
            let err = PolicyDocument::from_json(json).unwrap_err();
            assert!(
                err.to_string().contains("must be a JSON object"),
                "{}: {err}",
                String::from_utf8_lossy(json)
            );
        }
    }

    /// …and so does every section that is an object.
    #[test]
    fn every_section_must_be_an_object_too() {
        for (json, field) in [
            (&br#"{"placement": [8]}"#[..], "placement"),
            (br#"{"latency_critical": [500]}"#, "latency_critical"),
            (br#"{"quotas": [{}]}"#, "quotas"),
            (
                br#"{"quotas": {"tenants": {"acme": {"token_budget": [10, 60]}}}}"#,
                "quotas.tenants.acme.token_budget",
            ),
            (
                br#"{"quotas": {"tenants": {"acme": [5]}}}"#,
                "quotas.tenants.acme",
            ),
            (br#"{"rules": [["r", {}, "latency-critical"]]}"#, "rules[0]"),
            (
                br#"{"rules": [{"name": "r", "match": [], "lane": "latency-critical"}]}"#,
                "rules[0].match",
            ),
            (br#"{"migration": []}"#, "migration"),
            (br#"{"hedging": [true]}"#, "hedging"),
        ] {
            let err = PolicyDocument::from_json(json).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(&format!("{field}: must be a JSON object")),
                "{}: {text}",
                String::from_utf8_lossy(json)
            );
        }
        // Arrays where the document has lists are fine.
        PolicyDocument::from_json(
            br#"{"rules": [{"name": "r", "lane": "latency-critical"}],
                 "quotas": {"tenants": {"batch": {"lanes": ["cost-sensitive"]}}}}"#,
        )
        .unwrap();
    }

    /// A lane written as a one-member object (serde's form of an enum) is refused too.
    #[test]
    fn a_lane_must_be_a_string() {
        for json in [
            &br#"{"default_lane": {"latency-critical": null}}"#[..],
            br#"{"tenants": {"acme": {"latency-critical": null}}}"#,
        ] {
            match PolicyDocument::from_json(json) {
                Ok(doc) => panic!("{}: accepted as {doc:?}", String::from_utf8_lossy(json)),
                Err(e) => assert!(e.to_string().contains("must be a string"), "{e}"),
            }
        }
    }

    /// A merged document has no text of its own: a field name or type at fault is named by
    /// its path, not by a line and column of the merged JSON.
    #[test]
    fn a_document_read_as_json_names_the_path_at_fault() {
        let err = PolicyDocument::from_value(&serde_json::json!({
            "default_lane": "latency-critical", "placment": {"choices": 2}
        }))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("placment") && err.contains("unknown field") && !err.contains("column"),
            "{err}"
        );
        let err = PolicyDocument::from_value(&serde_json::json!({"placement": {"choices": "4"}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("placement.choices: invalid type"), "{err}");
        let err = PolicyDocument::from_value(&serde_json::json!({"placement": {"choices": 0}}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("placement.choices: must be between"), "{err}");
        assert!(matches!(
            PolicyDocument::from_value(&serde_json::json!(["latency-critical"])),
            Err(PolicyError::NotAnObject("an array"))
        ));
        let doc = PolicyDocument::from_value(&serde_json::json!({"max_queued": 7})).unwrap();
        assert_eq!(doc.max_queued, 7);
    }

    /// A document over the limit is refused before anything parses it (etcd refuses requests
    /// over its `--max-request-bytes`, 1.5 MiB by default, as "unreachable" to the caller).
    #[test]
    fn a_document_over_the_size_limit_is_refused() {
        let tenants: BTreeMap<String, LaneName> = (0..40_000)
            .map(|i| (format!("tenant-{i:06}"), LaneName::LatencyCritical))
            .collect();
        let doc = PolicyDocument {
            tenants,
            ..PolicyDocument::default()
        };
        let json = doc.to_json();
        assert!(json.len() > 1024 * 1024, "{}", json.len());
        let err = match PolicyDocument::from_json(json.as_bytes()) {
            Ok(_) => panic!("a {}-byte document was accepted", json.len()),
            Err(err) => err,
        };
        assert!(err.to_string().contains("1 MiB"), "{err}");
        // One well under it is fine.
        let small: BTreeMap<String, LaneName> = doc.tenants.into_iter().take(1000).collect();
        let doc = PolicyDocument {
            tenants: small,
            ..PolicyDocument::default()
        };
        assert_eq!(PolicyDocument::from_json(doc.to_json().as_bytes()), Ok(doc));
    }

    #[test]
    fn errors_name_the_field() {
        let err =
            PolicyDocument::from_json(br#"{"latency_critical": {"ttft_slo_ms": -1}}"#).unwrap_err();
        assert!(
            PolicyDocument::from_json(br#"{"latency_critical": {"ttft_slo": 5}}"#).is_err(),
            "unknown lane fields are refused"
        );
        assert!(
            err.to_string().contains("latency_critical.ttft_slo_ms"),
            "{err}"
        );
        let err = PolicyDocument::from_json(
            br#"{"rules": [{"name": "a", "lane": "cost-sensitive"}, {"name": "a", "lane": "cost-sensitive"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("rules[1].name"), "{err}");
        let err = PolicyDocument::from_json(br#"{"placement": {"choices": 0}}"#).unwrap_err();
        assert!(err.to_string().contains("placement.choices"), "{err}");
        let err = PolicyDocument::from_json(br#"{"bogus": 1}"#).unwrap_err();
        assert!(
            matches!(err, PolicyError::Parse(ref m) if m.contains("bogus")),
            "{err}"
        );
        let err = PolicyDocument::from_json(br#"{"default_lane": "fast"}"#).unwrap_err();
        assert!(matches!(err, PolicyError::Parse(_)), "{err}");
    }
}
