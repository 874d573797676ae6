//! `switchyard-bench streams`: many concurrent streams through one router, as deployed.
//!
//! A real etcd, synthetic-engine workers and a router run as separate `switchyard` processes
//! (the release binary next to this one), so the router's memory is its own. This process opens
//! `--streams` `Generate` calls over `--connections` connections, all at once; each asks for
//! `--max-tokens` tokens at the workers' `--tokens-per-s` per stream, so every stream stays open
//! for seconds. Reported: errors (any failed, short or unfinished stream), the time until every
//! stream had its first token, TTFT p50 / p99, and the router's resident memory before, with
//! every stream open, and after they all ended — the difference per open stream is what one
//! stream costs the router.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use switchyard_proto::v1::{
    ChatMessage, GenerateRequest, RequestClass, SamplingParams, inference_client::InferenceClient,
    server_frame::Frame,
};
use switchyard_tests::{Component, Etcd, start_gpu_worker, start_router};
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

/// Options of `switchyard-bench streams`.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamsArgs {
    /// Concurrent `Generate` streams.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Client connections they are spread over (the router lets one connection open
    /// `--max-connection-streams`, 2 048 by default).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Synthetic workers; their slots together hold every stream.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Tokens per stream.
    #[arg(long, default_value_t = 40)]
    pub max_tokens: u32,
    /// The workers' decode rate per stream, tokens per second.
    #[arg(long, default_value_t = 4.0)]
    pub tokens_per_s: f64,
}

fn request(index: usize, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("s{index}"),
        model: "synthetic".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: format!("stream {index} of many"),
            ..Default::default()
        }],
        sampling: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        class: RequestClass::CostSensitive as i32,
        ..Default::default()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One stream to its end: its TTFT, after counting its first token in `first_tokens`.
async fn one_stream(
    channel: Channel,
    index: usize,
    max_tokens: u32,
    first_tokens: Arc<(AtomicU64, Notify)>,
) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    let mut stream = InferenceClient::new(channel)
        .generate(request(index, max_tokens))
        .await?
        .into_inner();
    let (mut ttft, mut tokens, mut finished) = (None, 0u32, false);
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Tokens(t)) => {
                if ttft.is_none() {
                    ttft = Some(sent.elapsed());
                    first_tokens.0.fetch_add(1, Ordering::Relaxed);
                    first_tokens.1.notify_one();
                }
                tokens += t.token_ids.len() as u32;
            }
            Some(Frame::Finished(_)) => finished = true,
            Some(Frame::Failed(f)) => bail!("stream {index} failed: {} {}", f.code, f.message),
            _ => {}
        }
    }
    if !finished || tokens != max_tokens {
        bail!("stream {index}: {tokens} of {max_tokens} tokens, finished: {finished}");
    }
    ttft.context("no token")
}

pub async fn run(args: StreamsArgs) -> anyhow::Result<()> {
    if args.streams == 0 || args.connections == 0 || args.workers == 0 || args.max_tokens == 0 {
        bail!("--streams, --connections, --workers and --max-tokens must be at least 1");
    }
    let slots = args.streams.div_ceil(args.workers) + 64;
    let (slots_flag, rate_flag) = (slots.to_string(), args.tokens_per_s.to_string());
    let cluster = ProcessCluster::start(
        args.workers,
        &[
            "--engine",
            "synthetic",
            "--max-concurrent",
            &slots_flag,
            "--synthetic-tokens-per-s",
            &rate_flag,
            "--synthetic-ttft",
            "10ms",
        ],
    )
    .await?;
    let router = &cluster.router;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(cluster.connect().await?);
    }

    let rss_before = router.rss_kib()?;
    let started = Instant::now();
    let first_tokens = Arc::new((AtomicU64::new(0), Notify::new()));
    let tasks: Vec<_> = (0..args.streams)
        .map(|i| {
            tokio::spawn(one_stream(
                channels[i % channels.len()].clone(),
                i,
                args.max_tokens,
                first_tokens.clone(),
            ))
        })
        .collect();
    // Every stream open and streaming: the router holds all of them now.
    while first_tokens.0.load(Ordering::Relaxed) < args.streams as u64 {
        let notified = first_tokens.1.notified();
        if first_tokens.0.load(Ordering::Relaxed) >= args.streams as u64 {
            break;
        }
        if tokio::time::timeout(Duration::from_secs(60), notified)
            .await
            .is_err()
        {
            bail!(
                "only {} of {} streams had a token after a minute without progress",
                first_tokens.0.load(Ordering::Relaxed),
                args.streams
            );
        }
    }
    let all_open = started.elapsed();
    let rss_open = router.rss_kib()?;
    let mut ttft = Histogram::<u64>::new(3)?;
    let mut errors = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(t) => ttft.record(t.as_micros().max(1) as u64)?,
            Err(error) => errors.push(error),
        }
    }
    let elapsed = started.elapsed();
    // The router frees what the streams held as they end; give its allocator a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = router.rss_kib()?;
    println!(
        "{} streams x {} tokens at {} tokens/s over {} connections, {} synthetic workers \
         ({slots} slots each)",
        args.streams, args.max_tokens, args.tokens_per_s, args.connections, args.workers
    );
    println!(
        "completed {} / {}, errors {}; every stream had its first token after {:.2} s; all \
         ended after {:.2} s",
        ttft.len(),
        args.streams,
        errors.len(),
        all_open.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "TTFT p50 {:.1} ms, p99 {:.1} ms",
        ttft.value_at_quantile(0.5) as f64 / 1e3,
        ttft.value_at_quantile(0.99) as f64 / 1e3
    );
    println!(
        "router RSS: {:.1} MiB before, {:.1} MiB with every stream open ({:.1} KiB per open \
         stream), {:.1} MiB after they ended",
        mib(rss_before),
        mib(rss_open),
        rss_open.saturating_sub(rss_before) as f64 / args.streams as f64,
        mib(rss_after)
    );
    if let Some(error) = errors.first() {
        bail!("{} streams failed; the first: {error:#}", errors.len());
    }
    Ok(())
}

/// A real etcd, synthetic-engine workers and a router, each a `switchyard` process.
pub(crate) struct ProcessCluster {
    pub(crate) router: Component,
    pub(crate) workers: Vec<Component>,
    _etcd: Etcd,
}

impl ProcessCluster {
    /// `workers` synthetic-model workers started with `worker_flags`, and a router that routes
    /// to all of them.
    pub(crate) async fn start(workers: usize, worker_flags: &[&str]) -> anyhow::Result<Self> {
        Self::serving("synthetic", workers, worker_flags).await
    }

    /// `workers` workers of `model` started with `worker_flags`, and a router that routes to
    /// all of them.
    pub(crate) async fn serving(
        model: &str,
        workers: usize,
        worker_flags: &[&str],
    ) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let mut started = Vec::new();
        for i in 0..workers {
            started.push(start_gpu_worker(&etcd.url, &format!("gpu-{i}"), worker_flags, 1).await?);
        }
        let router = start_router(&etcd.url, "bench-router", &[]).await?;
        let cluster = Self {
            router,
            workers: started,
            _etcd: etcd,
        };
        let channel = cluster.connect().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let models = InferenceClient::new(channel.clone())
                .list_models(switchyard_proto::v1::ListModelsRequest {})
                .await
                .map(|m| m.into_inner().models)
                .unwrap_or_default();
            if models
                .iter()
                .any(|m| m.id == model && m.workers.len() == workers)
            {
                return Ok(cluster);
            }
            if Instant::now() > deadline {
                bail!("the router did not see {workers} workers within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new connection to the router's gRPC port.
    pub(crate) async fn connect(&self) -> anyhow::Result<Channel> {
        let grpc = self.router.addr("grpc");
        Ok(Endpoint::from_shared(format!("http://{grpc}"))?
            .connect()
            .await?)
    }
}
