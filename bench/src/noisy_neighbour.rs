//! `switchyard-bench noisy-neighbour`: what one tenant flooding the cluster does to another,
//! without and with tenant quotas in the routing policy.
//!
//! One synthetic-engine worker with a fixed number of slots and a per-stream decode rate, and a
//! router, run in this process over an in-memory registry. A *calm* tenant sends one short
//! request at a time, at a steady pace, in three phases of equal length: alone; while a *flood*
//! tenant keeps many long requests in flight without quotas; and the same flood with the flood
//! tenant under a quota. Both tenants are cost-sensitive, so only the quota separates them.
//! Refused flood requests retry after the router's `retry-after` (at most 100 ms: a flood does
//! not wait long).
//!
//! Reported per phase: the calm tenant's TTFT p50 / p99 and their ratio to the phase alone, its
//! failures, the flood's served tokens per second and refusals.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use switchyard_cluster::Registry as _;
use switchyard_proto::v1::{
    ChatMessage, GenerateRequest, RequestClass, SamplingParams, inference_client::InferenceClient,
    server_frame::Frame,
};
use switchyard_router::RouterConfig;
use switchyard_worker::SyntheticConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::router::start_cluster;

/// Options of `switchyard-bench noisy-neighbour`.
#[derive(Debug, Clone, clap::Args)]
pub struct NoisyNeighbourArgs {
    /// Length of each phase.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    pub phase: Duration,
    /// The worker's slots (sequences at once).
    #[arg(long, default_value_t = 32)]
    pub slots: u32,
    /// The worker's decode rate per stream, tokens per second.
    #[arg(long, default_value_t = 500.0)]
    pub tokens_per_s: f64,
    /// Flood callers, each keeping one request in flight.
    #[arg(long, default_value_t = 256)]
    pub flood_callers: usize,
    /// Tokens per flood request.
    #[arg(long, default_value_t = 256)]
    pub flood_max_tokens: u32,
    /// Tokens per calm request.
    #[arg(long, default_value_t = 16)]
    pub calm_max_tokens: u32,
    /// Pause between the calm tenant's requests.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub calm_interval: Duration,
    /// The flood tenant's quota in the third phase (policy `quotas.tenants.flood`).
    #[arg(
        long,
        default_value = r#"{"max_in_flight": 16, "tokens_per_minute": 300000}"#
    )]
    pub flood_quota: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

const MODEL: &str = "synthetic";

fn request(tenant: &str, index: u64, max_tokens: u32, class: RequestClass) -> GenerateRequest {
    let mut request = GenerateRequest {
        request_id: format!("{tenant}-{index}"),
        model: MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("{tenant} request {index}"),
            ..Default::default()
        }],
        sampling: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        class: class as i32,
        ..Default::default()
    };
    request.metadata.insert("tenant".into(), tenant.into());
    request
}

/// How one request ended.
enum Outcome {
    /// Served: time to first token and tokens received.
    Served { ttft: Duration, tokens: u64 },
    /// Refused (or failed) with this code, and the `retry-after` it carried.
    Refused {
        code: tonic::Code,
        retry_after: Duration,
    },
}

async fn send(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
) -> anyhow::Result<Outcome> {
    let sent = Instant::now();
    let mut stream = match client.generate(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let retry_after_ms = status
                .metadata()
                .get(switchyard_router::error::RETRY_AFTER_MS)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(0);
            return Ok(Outcome::Refused {
                code: status.code(),
                retry_after: Duration::from_millis(retry_after_ms),
            });
        }
    };
    let (mut ttft, mut tokens) = (None, 0u64);
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Tokens(t)) => {
                ttft.get_or_insert_with(|| sent.elapsed());
                tokens += t.token_ids.len().max(1) as u64;
            }
            Some(Frame::Failed(f)) => {
                return Ok(Outcome::Refused {
                    code: tonic::Code::from_i32(f.code),
                    retry_after: Duration::from_millis(u64::from(f.retry_after_ms)),
                });
            }
            _ => {}
        }
    }
    Ok(Outcome::Served {
        ttft: ttft.context("a request finished without tokens")?,
        tokens,
    })
}

/// One phase's figures.
#[derive(Debug, Serialize)]
struct PhaseReport {
    phase: &'static str,
    calm_requests: u64,
    calm_failures: u64,
    calm_ttft_p50_ms: f64,
    calm_ttft_p99_ms: f64,
    calm_p50_vs_alone: f64,
    calm_p99_vs_alone: f64,
    flood_tokens_per_s: f64,
    flood_refusals: u64,
}

#[derive(Default)]
struct FloodCounts {
    tokens: AtomicU64,
    refusals: AtomicU64,
}

/// The calm tenant's requests until `until`: TTFT histogram (µs) and failures.
async fn calm(
    router: Channel,
    until: Instant,
    args: &NoisyNeighbourArgs,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut client = InferenceClient::new(router);
    let mut ttft = Histogram::<u64>::new(3)?;
    let (mut index, mut failures) = (0u64, 0u64);
    while Instant::now() < until {
        index += 1;
        let request = request(
            "calm",
            index,
            args.calm_max_tokens,
            RequestClass::CostSensitive,
        );
        match send(&mut client, request).await? {
            Outcome::Served { ttft: t, .. } => ttft.record(t.as_micros().max(1) as u64)?,
            Outcome::Refused { .. } => failures += 1,
        }
        tokio::time::sleep(args.calm_interval).await;
    }
    Ok((ttft, failures))
}

/// Flood callers until `stop`.
fn flood(
    router: &Channel,
    stop: &CancellationToken,
    args: &NoisyNeighbourArgs,
    counts: &Arc<FloodCounts>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    (0..args.flood_callers)
        .map(|caller| {
            let (router, stop, counts) = (router.clone(), stop.clone(), counts.clone());
            let max_tokens = args.flood_max_tokens;
            tokio::spawn(async move {
                let mut client = InferenceClient::new(router);
                let mut index = caller as u64 * 1_000_000;
                while !stop.is_cancelled() {
                    index += 1;
                    let request = request("flood", index, max_tokens, RequestClass::CostSensitive);
                    let outcome = tokio::select! {
                        outcome = send(&mut client, request) => outcome?,
                        _ = stop.cancelled() => return Ok(()),
                    };
                    match outcome {
                        Outcome::Served { tokens, .. } => {
                            counts.tokens.fetch_add(tokens, Ordering::Relaxed);
                        }
                        Outcome::Refused { retry_after, .. } => {
                            counts.refusals.fetch_add(1, Ordering::Relaxed);
                            let pause = retry_after
                                .clamp(Duration::from_millis(1), Duration::from_millis(100));
                            tokio::select! {
                                _ = tokio::time::sleep(pause) => {}
                                _ = stop.cancelled() => return Ok(()),
                            }
                        }
                    }
                }
                Ok(())
            })
        })
        .collect()
}

async fn phase(
    name: &'static str,
    router: &Channel,
    with_flood: bool,
    args: &NoisyNeighbourArgs,
    alone: Option<(f64, f64)>,
) -> anyhow::Result<PhaseReport> {
    let counts = Arc::new(FloodCounts::default());
    let stop = CancellationToken::new();
    let callers = if with_flood {
        let callers = flood(router, &stop, args, &counts);
        // Let the flood fill the worker before the calm tenant starts measuring.
        tokio::time::sleep(Duration::from_millis(500)).await;
        callers
    } else {
        Vec::new()
    };
    let started = Instant::now();
    let (ttft, failures) = calm(router.clone(), started + args.phase, args).await?;
    let elapsed = started.elapsed();
    stop.cancel();
    for caller in callers {
        caller.await??;
    }
    let ms = |q: f64| ttft.value_at_quantile(q) as f64 / 1e3;
    let (p50, p99) = (ms(0.5), ms(0.99));
    let (alone_p50, alone_p99) = alone.unwrap_or((p50, p99));
    Ok(PhaseReport {
        phase: name,
        calm_requests: ttft.len() + failures,
        calm_failures: failures,
        calm_ttft_p50_ms: p50,
        calm_ttft_p99_ms: p99,
        calm_p50_vs_alone: p50 / alone_p50.max(f64::EPSILON),
        calm_p99_vs_alone: p99 / alone_p99.max(f64::EPSILON),
        flood_tokens_per_s: counts.tokens.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        flood_refusals: counts.refusals.load(Ordering::Relaxed),
    })
}

pub async fn run(args: NoisyNeighbourArgs) -> anyhow::Result<()> {
    if args.slots == 0 || args.flood_callers == 0 || args.phase.is_zero() {
        bail!("--slots, --flood-callers and --phase must be above zero");
    }
    let quota: serde_json::Value =
        serde_json::from_str(&args.flood_quota).context("--flood-quota is not JSON")?;
    // `probe` only tells the run when the router has the quota policy: its latency-critical
    // requests are refused from then on.
    let policy = serde_json::json!({"quotas": {"tenants": {
        "flood": quota,
        "probe": {"lanes": ["cost-sensitive"], "disallowed_lane": "refuse"},
    }}});
    switchyard_policy::document::PolicyDocument::from_json(policy.to_string().as_bytes())
        .context("--flood-quota")?;
    let engine = SyntheticConfig {
        models: vec![MODEL.into()],
        ttft: Duration::from_millis(10),
        tokens_per_s: args.tokens_per_s,
        max_concurrent: args.slots,
        max_queue: args.slots,
        prefill_tokens_per_s: 50_000.0,
    };
    let router_config = RouterConfig {
        listen: "127.0.0.1:0".parse()?,
        decision_reports_per_s: 0,
        ..Default::default()
    };
    let cluster = start_cluster(engine, false, router_config).await?;
    let router = cluster.router.clone();

    let alone = phase("alone", &router, false, &args, None).await?;
    let reference = Some((alone.calm_ttft_p50_ms, alone.calm_ttft_p99_ms));
    let unlimited = phase("flood, no quota", &router, true, &args, reference).await?;

    cluster
        .registry
        .put_policy(policy.to_string().into_bytes(), None)
        .await?;
    let mut probe = InferenceClient::new(router.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = request("probe", 0, 1, RequestClass::LatencyCritical);
        if let Outcome::Refused {
            code: tonic::Code::PermissionDenied,
            ..
        } = send(&mut probe, request).await?
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the router did not apply the quota policy within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let limited = phase("flood, quota", &router, true, &args, reference).await?;
    cluster.stop().await;

    let phases = [alone, unlimited, limited];
    if args.json {
        println!("{}", serde_json::to_string_pretty(&phases)?);
        return Ok(());
    }
    println!(
        "worker: {} slots at {} tokens/s per stream; calm: {}-token requests every {:?}; flood: \
         {} callers x {} tokens; flood quota: {}",
        args.slots,
        args.tokens_per_s,
        args.calm_max_tokens,
        args.calm_interval,
        args.flood_callers,
        args.flood_max_tokens,
        args.flood_quota
    );
    println!(
        "{:<16} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8} {:>10} {:>9}",
        "phase", "calm", "failed", "ttft_p50", "ttft_p99", "p50/x", "p99/x", "flood_t/s", "refused"
    );
    for p in &phases {
        println!(
            "{:<16} {:>6} {:>6} {:>8.1}ms {:>8.1}ms {:>8.2} {:>8.2} {:>10.0} {:>9}",
            p.phase,
            p.calm_requests,
            p.calm_failures,
            p.calm_ttft_p50_ms,
            p.calm_ttft_p99_ms,
            p.calm_p50_vs_alone,
            p.calm_p99_vs_alone,
            p.flood_tokens_per_s,
            p.flood_refusals
        );
    }
    Ok(())
}
