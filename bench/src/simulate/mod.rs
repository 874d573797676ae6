//! `switchyard-bench simulate`: replays request traces against a modelled cluster of GPU and
//! wafer-scale workers, once per routing policy — the router's own policy code and the
//! baselines — and reports per-lane TTFT, decode rate, SLO attainment, shed requests and cost
//! per million tokens as JSON, plus an SVG plot of SLO attainment against load.
//!
//! Contract: `switchyard-bench simulate --trace <path> [--trace <path> …] [--load-scale <x>]
//! --json <out.json>`; a trace may carry a role (`--trace latency-critical=<path>`), otherwise
//! the router's classifier classes its requests with the profile's policy document.

pub mod engine;
pub mod kv;
pub mod placers;
pub mod plot;
pub mod profile;
pub mod trace;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use switchyard_policy::classify::{RequestFeatures, classify};
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_proto::v1::RequestClass;

use engine::{SimRequest, affinity_of, simulate};
use profile::Profiles;
use trace::{TraceRequest, TraceSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// A trace file (Azure CSV or Mooncake JSONL), optionally with a role:
    /// `latency-critical=<path>` or `cost-sensitive=<path>`. Repeat to replay several together.
    #[arg(long = "trace", required = true)]
    pub traces: Vec<TraceSpec>,
    /// Arrival-rate multiplier (2 = arrivals twice as dense).
    #[arg(long, default_value_t = 1.0)]
    pub load_scale: f64,
    /// Where to write the JSON results.
    #[arg(long)]
    pub json: PathBuf,
    /// Worker profiles, cluster shape and policy document.
    #[arg(long, default_value = "bench/profiles/default.json")]
    pub profiles: PathBuf,
    /// Override the profile's number of GPU workers.
    #[arg(long)]
    pub gpu_workers: Option<u32>,
    /// Override the profile's number of WSE workers.
    #[arg(long)]
    pub wse_workers: Option<u32>,
    /// Replay this many requests: the traces are cut, or repeated back to back.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Policies to run (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub policies: Vec<String>,
    /// Also run these load scales and plot SLO attainment against load (SVG).
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f64>,
    /// Where to write the SVG plot (needs --sweep).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Also write every SLO miss at `--load-scale` as CSV (policy, lane, cause, request and
    /// where it ran), to see why a policy loses.
    #[arg(long)]
    pub misses: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Trace(#[from] trace::TraceError),
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error("--load-scale: {0} must be a positive number")]
    LoadScale(f64),
    #[error("--policies: unknown policy {0:?} (known: {known})", known = placers::POLICY_NAMES.join(", "))]
    Policy(String),
    #[error("--requests: must be at least 1")]
    Requests,
    #[error("--plot needs --sweep with at least one load scale")]
    PlotWithoutSweep,
    #[error("writing {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// Per-lane figures of one policy.
#[derive(Debug, Clone, Serialize)]
pub struct LaneReport {
    pub requests: u64,
    pub served: u64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub ttft_p99_ms: f64,
    /// Median decode rate of one stream (requests with more than one output token).
    pub tokens_per_s_p50: f64,
    /// Share of the lane's requests served within their TTFT SLO and minimum decode rate
    /// (shed requests count as misses).
    pub slo_attainment: f64,
    pub shed: u64,
    /// Requests served outside the lane's home pool.
    pub spilled: u64,
    pub cost_per_mtok: f64,
    /// Share of the served requests' prompt tokens reused from a worker's prefix cache.
    pub prefix_hit_rate: f64,
    /// Why requests missed their SLO (each miss counted once, first cause in this order).
    pub misses: Misses,
}

/// Prefix reuse over all served requests of one run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PrefixReport {
    pub prompt_tokens: u64,
    /// Prompt tokens workers reused from their caches.
    pub cached_tokens: u64,
    /// `cached_tokens / prompt_tokens`.
    pub hit_rate: f64,
    /// Prompt tokens the placements expected to be reused (the router's view; 0 for policies
    /// that do not predict).
    pub predicted_cached_tokens: u64,
    /// Blocks (512 tokens) evicted from the workers' caches.
    pub evicted_blocks: u64,
    /// Sequences admitted beyond a worker's KV budget (the engine would have queued them).
    pub kv_overcommitted: u64,
}

/// SLO misses of one lane by cause: the simulator's evidence of where a policy loses.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Misses {
    /// Shed, or never placed.
    pub shed: u64,
    /// Waited at the router past the TTFT SLO before being placed.
    pub router_queue: u64,
    /// First token late on a WSE worker.
    pub wse_ttft: u64,
    /// First token late on a GPU worker.
    pub gpu_ttft: u64,
    /// First token in time, decode slower than the lane's minimum, on a WSE worker.
    pub wse_decode: u64,
    /// The same on a GPU worker (other prompts' prefill in the same engine steps).
    pub gpu_decode: u64,
}

impl Misses {
    fn count(&mut self, cause: &str) {
        let slot = match cause {
            "shed" => &mut self.shed,
            "router_queue" => &mut self.router_queue,
            "wse_ttft" => &mut self.wse_ttft,
            "gpu_ttft" => &mut self.gpu_ttft,
            "wse_decode" => &mut self.wse_decode,
            _ => &mut self.gpu_decode,
        };
        *slot += 1;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyReport {
    pub lanes: BTreeMap<&'static str, LaneReport>,
    /// Price per million generated tokens, averaged over all served tokens.
    pub cost_per_mtok: f64,
    pub prefix: PrefixReport,
    /// Generations moved and requests hedged (all 0 unless the policy enables them).
    pub moves: engine::MoveStats,
    pub wall_time_s: f64,
    pub events: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub load_scale: f64,
    pub policies: BTreeMap<String, PolicyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub traces: Vec<String>,
    pub load_scale: f64,
    pub requests: usize,
    pub gpu_workers: u32,
    pub wse_workers: u32,
    pub model: String,
    pub policies: BTreeMap<String, PolicyReport>,
    pub sweep: Vec<SweepPoint>,
    pub attribution: Vec<&'static str>,
}

/// Attribution of the public traces, kept with every published result.
pub const ATTRIBUTION: [&str; 2] = [
    "Azure LLM inference traces 2023 (Azure Public Dataset), CC-BY-4.0; Patel et al., \"Splitwise: Efficient Generative LLM Inference Using Phase Splitting\", ISCA 2024",
    "Mooncake conversation trace (kvcache-ai), Apache-2.0; Qin et al., \"Mooncake: Trading More Storage for Less Computation\", FAST 2025",
];

/// Runs the command.
pub fn run(args: &SimulateArgs) -> Result<Report, SimulateError> {
    if !(args.load_scale.is_finite() && args.load_scale > 0.0) {
        return Err(SimulateError::LoadScale(args.load_scale));
    }
    if let Some(bad) = args.sweep.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(SimulateError::LoadScale(*bad));
    }
    if args.requests == Some(0) {
        return Err(SimulateError::Requests);
    }
    if args.plot.is_some() && args.sweep.is_empty() {
        return Err(SimulateError::PlotWithoutSweep);
    }
    let mut profiles = Profiles::load(&args.profiles)?;
    if let Some(n) = args.gpu_workers {
        profiles.cluster.gpu_workers = n;
    }
    if let Some(n) = args.wse_workers {
        profiles.cluster.wse_workers = n;
    }
    profiles.validate()?;
    let names: Vec<String> = if args.policies.is_empty() {
        placers::POLICY_NAMES
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        args.policies.clone()
    };
    for name in &names {
        if placers::placer(name, &profiles.policy).is_none() {
            return Err(SimulateError::Policy(name.clone()));
        }
    }
    let mut loaded = Vec::new();
    for spec in &args.traces {
        loaded.push((spec.role, trace::load(&spec.path)?));
    }
    let base = classify_all(&loaded, &profiles);
    let base = match args.requests {
        Some(n) => tile(&base, n),
        None => base,
    };

    let mut miss_csv = String::from(MISS_HEADER);
    let mut run_all = |scale: f64, record_misses: bool| -> BTreeMap<String, PolicyReport> {
        let requests = scaled(&base, scale);
        names
            .iter()
            .map(|name| {
                let mut placer = placers::placer(name, &profiles.policy).expect("checked above");
                let result = simulate(&profiles, &profiles.policy, &requests, placer.as_mut());
                if record_misses {
                    miss_rows(name, &requests, &result, &mut miss_csv);
                }
                (name.clone(), summarise(&requests, &result))
            })
            .collect()
    };
    let policies = run_all(args.load_scale, args.misses.is_some());
    let sweep: Vec<SweepPoint> = args
        .sweep
        .iter()
        .map(|&load_scale| SweepPoint {
            load_scale,
            policies: run_all(load_scale, false),
        })
        .collect();
    let report = Report {
        traces: args
            .traces
            .iter()
            .map(|t| t.path.display().to_string())
            .collect(),
        load_scale: args.load_scale,
        requests: base.len(),
        gpu_workers: profiles.cluster.gpu_workers,
        wse_workers: profiles.cluster.wse_workers,
        model: profiles.model.clone(),
        policies,
        sweep,
        attribution: ATTRIBUTION.to_vec(),
    };
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|e| SimulateError::Write {
            path: path.clone(),
            reason: e.to_string(),
        })
    };
    write(
        &args.json,
        serde_json::to_string_pretty(&report).expect("reports serialise"),
    )?;
    if let Some(path) = &args.misses {
        write(path, miss_csv)?;
    }
    if let Some(path) = &args.plot {
        let svg = plot::slo_attainment_svg(&report).map_err(|reason| SimulateError::Write {
            path: path.clone(),
            reason,
        })?;
        write(path, svg)?;
    }
    Ok(report)
}

/// Merges the traces in arrival order and classes every request: by the trace's role when it
/// has one, else by the router's classifier under the profile's policy document.
pub fn classify_all(
    traces: &[(Option<LaneName>, Vec<TraceRequest>)],
    profiles: &Profiles,
) -> Vec<SimRequest> {
    let policy: &PolicyDocument = &profiles.policy;
    let mut out = Vec::with_capacity(traces.iter().map(|t| t.1.len()).sum());
    for (role, rows) in traces {
        for row in rows {
            let class = match role {
                Some(LaneName::LatencyCritical) => RequestClass::LatencyCritical,
                Some(LaneName::CostSensitive) => RequestClass::CostSensitive,
                None => RequestClass::Auto,
            };
            let features = RequestFeatures {
                class,
                model: &profiles.model,
                max_tokens: row.output_tokens,
                prompt_tokens: row.prompt_tokens,
                streaming: true,
                ttft_slo_ms: 0,
                embed: false,
                metadata: None,
            };
            let c = classify(&features, policy);
            out.push(SimRequest {
                arrival_ms: row.arrival_ms,
                prompt_tokens: row.prompt_tokens,
                output_tokens: row.output_tokens,
                hash_ids: row.hash_ids.clone(),
                affinity: affinity_of(&row.hash_ids),
                lane: c.lane,
                ttft_slo_ms: c.ttft_slo_ms,
                min_tokens_per_s: c.min_tokens_per_s,
            });
        }
    }
    out.sort_by(|a, b| a.arrival_ms.total_cmp(&b.arrival_ms));
    out
}

/// Exactly `n` requests: the first `n`, or the whole set repeated back to back.
pub fn tile(requests: &[SimRequest], n: usize) -> Vec<SimRequest> {
    if requests.is_empty() {
        return Vec::new();
    }
    let span = requests.last().map_or(0.0, |r| r.arrival_ms) + 1.0;
    (0..n)
        .map(|i| {
            let mut r = requests[i % requests.len()].clone();
            r.arrival_ms += span * (i / requests.len()) as f64;
            r
        })
        .collect()
}

fn scaled(requests: &[SimRequest], scale: f64) -> Vec<SimRequest> {
    requests
        .iter()
        .map(|r| SimRequest {
            arrival_ms: r.arrival_ms / scale,
            ..r.clone()
        })
        .collect()
}

const MISS_HEADER: &str = "policy,lane,cause,arrival_ms,prompt_tokens,output_tokens,pool,router_wait_ms,predicted_ttft_ms,ttft_ms,tokens_per_s\n";

/// Appends one CSV row per request of `result` that missed its SLO.
fn miss_rows(name: &str, requests: &[SimRequest], result: &engine::RunResult, out: &mut String) {
    use std::fmt::Write;
    for (r, o) in requests.iter().zip(&result.outcomes) {
        let cause = miss_cause(r, o, result);
        let Some(cause) = cause else { continue };
        let pool = if o.served {
            result.pool[o.worker as usize].as_str()
        } else {
            "-"
        };
        let rate = rate_of(r, o).unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "{name},{},{cause},{:.1},{},{},{pool},{:.1},{:.1},{:.1},{:.1}",
            r.lane.as_str(),
            r.arrival_ms,
            r.prompt_tokens,
            r.output_tokens,
            o.dispatched_ms - r.arrival_ms,
            o.predicted_ttft_ms,
            o.first_token_ms - r.arrival_ms,
            rate,
        );
    }
}

/// Decode rate of one served stream (requests with more than one output token).
fn rate_of(r: &SimRequest, o: &engine::Outcome) -> Option<f64> {
    (r.output_tokens > 1).then(|| {
        f64::from(r.output_tokens - 1) / ((o.finish_ms - o.first_token_ms).max(1e-9) / 1000.0)
    })
}

/// Why `o` missed `r`'s SLO (`None`: it did not): the first of shed, router queue, late first
/// token, slow decode.
fn miss_cause(
    r: &SimRequest,
    o: &engine::Outcome,
    result: &engine::RunResult,
) -> Option<&'static str> {
    if o.shed || !o.served {
        return Some("shed");
    }
    let t = o.first_token_ms - r.arrival_ms;
    if t <= r.ttft_slo_ms && rate_of(r, o).is_none_or(|rate| rate >= r.min_tokens_per_s) {
        return None;
    }
    let on_gpu = result.pool[o.worker as usize] == switchyard_cluster::Pool::Gpu;
    Some(if o.dispatched_ms - r.arrival_ms > r.ttft_slo_ms {
        "router_queue"
    } else if t > r.ttft_slo_ms {
        if on_gpu { "gpu_ttft" } else { "wse_ttft" }
    } else if on_gpu {
        "gpu_decode"
    } else {
        "wse_decode"
    })
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Per-lane and overall figures of one run.
pub fn summarise(requests: &[SimRequest], result: &engine::RunResult) -> PolicyReport {
    let mut lanes = BTreeMap::new();
    let (mut all_cost, mut all_tokens) = (0.0, 0.0);
    let mut prefix = PrefixReport {
        evicted_blocks: result.evicted_blocks,
        kv_overcommitted: result.kv_overcommitted,
        ..PrefixReport::default()
    };
    for lane in LaneName::ALL {
        let mut ttft = Vec::new();
        let mut tps = Vec::new();
        let (mut n, mut served, mut attained, mut shed, mut spilled) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut cost, mut tokens) = (0.0, 0.0);
        let (mut prompt, mut cached) = (0u64, 0u64);
        let mut misses = Misses::default();
        for (r, o) in requests.iter().zip(&result.outcomes) {
            if r.lane != lane {
                continue;
            }
            n += 1;
            if o.shed || !o.served {
                shed += 1;
                misses.count("shed");
                continue;
            }
            served += 1;
            spilled += u64::from(o.spilled);
            prompt += u64::from(r.prompt_tokens);
            cached += u64::from(o.cached_tokens);
            prefix.predicted_cached_tokens += u64::from(o.predicted_cached_tokens);
            let t = o.first_token_ms - r.arrival_ms;
            ttft.push(t);
            if let Some(rate) = rate_of(r, o) {
                tps.push(rate);
            }
            match miss_cause(r, o, result) {
                None => attained += 1,
                Some(cause) => misses.count(cause),
            }
            let out = f64::from(r.output_tokens);
            // Tokens made before a move are billed where they were made.
            cost += o.billed_cost
                + f64::from(r.output_tokens - o.billed_tokens) * result.price[o.worker as usize];
            tokens += out;
        }
        ttft.sort_by(f64::total_cmp);
        tps.sort_by(f64::total_cmp);
        all_cost += cost;
        all_tokens += tokens;
        prefix.prompt_tokens += prompt;
        prefix.cached_tokens += cached;
        lanes.insert(
            match lane {
                LaneName::LatencyCritical => "latency_critical",
                LaneName::CostSensitive => "cost_sensitive",
            },
            LaneReport {
                requests: n,
                served,
                ttft_p50_ms: percentile(&ttft, 50.0),
                ttft_p90_ms: percentile(&ttft, 90.0),
                ttft_p99_ms: percentile(&ttft, 99.0),
                tokens_per_s_p50: percentile(&tps, 50.0),
                slo_attainment: if n == 0 {
                    1.0
                } else {
                    attained as f64 / n as f64
                },
                shed,
                spilled,
                cost_per_mtok: if tokens > 0.0 { cost / tokens } else { 0.0 },
                prefix_hit_rate: ratio(cached, prompt),
                misses,
            },
        );
    }
    prefix.hit_rate = ratio(prefix.cached_tokens, prefix.prompt_tokens);
    PolicyReport {
        lanes,
        prefix,
        moves: result.moves,
        cost_per_mtok: if all_tokens > 0.0 {
            all_cost / all_tokens
        } else {
            0.0
        },
        wall_time_s: result.wall_time_s,
        events: result.events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn profiles() -> Profiles {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/profiles/default.json");
        let mut p =
            Profiles::load(std::path::Path::new(path)).expect("the shipped profile is valid");
        p.cluster.gpu_workers = 4;
        p.cluster.wse_workers = 1;
        p.wse.slots = 2;
        p
    }

    /// A burst of latency-critical requests, more than the WSE has slots for.
    fn burst(n: usize, profiles: &Profiles) -> Vec<SimRequest> {
        let row = TraceRequest {
            arrival_ms: 0.0,
            prompt_tokens: 500,
            output_tokens: 10,
            hash_ids: Arc::from(Vec::new()),
        };
        let rows = (0..n)
            .map(|i| TraceRequest {
                arrival_ms: i as f64,
                ..row.clone()
            })
            .collect();
        classify_all(&[(Some(LaneName::LatencyCritical), rows)], profiles)
    }

    #[test]
    fn switchyard_spills_a_latency_burst_that_static_makes_wait() {
        let profiles = profiles();
        let requests = burst(40, &profiles);
        let run = |name: &str| {
            let mut placer = placers::placer(name, &profiles.policy).unwrap();
            summarise(
                &requests,
                &simulate(&profiles, &profiles.policy, &requests, placer.as_mut()),
            )
        };
        let switchyard = run("switchyard");
        let fixed = run("static");
        let (s, f) = (
            &switchyard.lanes["latency_critical"],
            &fixed.lanes["latency_critical"],
        );
        assert_eq!((s.requests, s.served), (40, 40));
        assert!(s.spilled > 0 && f.spilled == 0, "{s:?} {f:?}");
        assert!(s.ttft_p99_ms < f.ttft_p99_ms, "{s:?} {f:?}");
        assert!(s.slo_attainment >= f.slo_attainment);
        // Spilled tokens are cheaper.
        assert!(switchyard.cost_per_mtok < fixed.cost_per_mtok);
    }

    #[test]
    fn every_request_is_served_or_shed_and_the_json_has_the_contract_keys() {
        let profiles = profiles();
        let requests = burst(200, &profiles);
        for name in placers::POLICY_NAMES {
            let mut placer = placers::placer(name, &profiles.policy).unwrap();
            let result = simulate(&profiles, &profiles.policy, &requests, placer.as_mut());
            for (r, o) in requests.iter().zip(&result.outcomes) {
                assert!(o.served != o.shed, "{name}: {o:?}");
                if o.served {
                    assert!(
                        o.first_token_ms >= r.arrival_ms && o.finish_ms >= o.first_token_ms,
                        "{name}: {o:?}"
                    );
                }
            }
            let json = serde_json::to_value(summarise(&requests, &result)).unwrap();
            for lane in ["latency_critical", "cost_sensitive"] {
                for key in ["ttft_p50_ms", "ttft_p99_ms", "slo_attainment", "shed"] {
                    assert!(
                        json["lanes"][lane].get(key).is_some(),
                        "{name}: {lane}.{key}"
                    );
                }
            }
            assert!(json["cost_per_mtok"].is_number(), "{name}");
        }
    }

    #[test]
    fn tiling_repeats_the_traces_back_to_back() {
        let profiles = profiles();
        let base = burst(3, &profiles);
        let tiled = tile(&base, 7);
        assert_eq!(tiled.len(), 7);
        assert!(tiled.windows(2).all(|w| w[0].arrival_ms <= w[1].arrival_ms));
        assert_eq!(tile(&base, 2).len(), 2);
    }

    #[test]
    fn a_gpu_prefills_latency_critical_prompts_first_in_chunks() {
        let mut profiles = profiles();
        profiles.cluster.gpu_workers = 1;
        profiles.cluster.wse_workers = 0;
        profiles.gpu.prefill_chunk_tokens = 512;
        let row = |arrival_ms: f64, prompt_tokens: u32| TraceRequest {
            arrival_ms,
            prompt_tokens,
            output_tokens: 4,
            hash_ids: Arc::from(Vec::new()),
        };
        // Four long cost-sensitive prompts, then a latency-critical one just after.
        let cheap: Vec<TraceRequest> = (0..4).map(|i| row(f64::from(i), 2_000)).collect();
        let requests = classify_all(
            &[
                (Some(LaneName::CostSensitive), cheap),
                (Some(LaneName::LatencyCritical), vec![row(5.0, 500)]),
            ],
            &profiles,
        );
        let mut placer = placers::placer("round_robin", &profiles.policy).unwrap();
        let result = simulate(&profiles, &profiles.policy, &requests, placer.as_mut());
        let first_token = |lane: LaneName| {
            requests
                .iter()
                .zip(&result.outcomes)
                .filter(|(r, _)| r.lane == lane)
                .map(|(_, o)| o.first_token_ms)
                .collect::<Vec<_>>()
        };
        let urgent = first_token(LaneName::LatencyCritical)[0];
        let cheap = first_token(LaneName::CostSensitive);
        assert!(
            cheap.iter().all(|&t| urgent < t),
            "latency-critical {urgent} ms, cost-sensitive {cheap:?}"
        );
        // 500 prompt tokens fit one chunk: the first token comes after the step in flight
        // (the first cheap prompt's chunk) and its own.
        assert!(urgent < 200.0, "{urgent}");
        // Every request still completes.
        assert!(
            result
                .outcomes
                .iter()
                .all(|o| o.served && o.finish_ms > 0.0)
        );
        // Misses are attributed: nothing here misses.
        let report = summarise(&requests, &result);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["lanes"]["latency_critical"]["misses"]["gpu_ttft"], 0);
    }
}
