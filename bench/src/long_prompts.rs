//! `switchyard-bench long-prompts`: does a long prompt hold up the requests behind it?
//!
//! The router encodes every prompt with the workers' tokenizer before placing it, and a long
//! prompt takes milliseconds to encode (`cargo bench -p switchyard-worker-gpu --bench
//! tokenize`). A real etcd, a native-engine worker on SmolLM2 and the router run as separate
//! `switchyard` processes (the release binary next to this one). On one session, each trial
//! times a short request's `Accepted` alone, then again when it is sent right behind a request
//! whose prompt carries `--prompt-kib` of text; both are cancelled once the short one is
//! accepted, so the worker never prefills the long prompt for long.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchyard_client::SessionClient;
use switchyard_proto::v1::{self, server_frame::Frame};

use crate::streams::ProcessCluster;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// Options of `switchyard-bench long-prompts`.
#[derive(Debug, Clone, clap::Args)]
pub struct LongPromptsArgs {
    /// The model file the worker serves.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model_path: PathBuf,
    /// Text in the long request's prompt, KiB (one run per size).
    #[arg(long, value_delimiter = ',', default_value = "40,200")]
    pub prompt_kib: Vec<usize>,
    /// Trials per size.
    #[arg(long, default_value_t = 8)]
    pub trials: usize,
}

fn request(id: &str, content: &str) -> v1::GenerateRequest {
    switchyard_tests::chat_request(MODEL, id, v1::RequestClass::CostSensitive, content, 1)
}

/// Starts a short request and waits for its `Accepted`; returns how long that took. Every
/// request in `also` (already started) and the short one are cancelled and read to their end.
async fn short_accepted(
    session: &SessionClient,
    id: String,
    also: Vec<switchyard_client::RequestStream>,
) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    let mut short = session.start(request(&id, "Say hello."))?;
    let first = short.next().await;
    let took = sent.elapsed();
    if !matches!(first, Some(Frame::Accepted(_))) {
        bail!("{id}: expected Accepted first, got {first:?}");
    }
    for stream in also.iter().map(|s| s.request_id().to_string()).chain([id]) {
        let _ = session.cancel(&stream);
    }
    short.collect().await;
    for stream in also {
        stream.collect().await;
    }
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn run(args: LongPromptsArgs) -> anyhow::Result<()> {
    if args.trials == 0 || args.prompt_kib.is_empty() {
        bail!("--trials and --prompt-kib must name at least one");
    }
    let model = args
        .model_path
        .canonicalize()
        .with_context(|| format!("{} (run scripts/fetch-model.sh)", args.model_path.display()))?;
    let model = model.display().to_string();
    let cluster = ProcessCluster::serving(
        MODEL,
        1,
        &[
            "--engine",
            "candle",
            "--model-path",
            &model,
            "--max-concurrent",
            "8",
        ],
    )
    .await?;
    // The router tokenizes only once it has fetched the worker's tokenizer.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&cluster.router.log)
        .unwrap_or_default()
        .contains("tokenizer fetched")
    {
        if Instant::now() > deadline {
            bail!("the router did not fetch the model's tokenizer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = SessionClient::connect(&cluster.router.addr("grpc").to_string()).await?;
    println!(
        "time until a short request is accepted, {} trials per size (ms)",
        args.trials
    );
    println!("prompt   alone p50  behind a long prompt p50    max");
    for kib in &args.prompt_kib {
        let text = "The lighthouse keeper counted the waves and wrote each one down. "
            .repeat(kib * 1024 / 66);
        let (mut alone, mut behind) = (Vec::new(), Vec::new());
        for trial in 0..args.trials {
            alone.push(short_accepted(&session, format!("alone-{kib}-{trial}"), Vec::new()).await?);
            let long = session.start(request(&format!("long-{kib}-{trial}"), &text))?;
            behind
                .push(short_accepted(&session, format!("behind-{kib}-{trial}"), vec![long]).await?);
        }
        alone.sort();
        behind.sort();
        let median = |v: &[Duration]| ms(v[v.len() / 2]);
        println!(
            "{kib:>3} KiB  {:>9.2}  {:>24.2}  {:>5.2}",
            median(&alone),
            median(&behind),
            ms(behind[behind.len() - 1]),
        );
    }
    Ok(())
}
