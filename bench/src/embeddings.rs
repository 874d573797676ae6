//! `switchyard-bench embeddings`: embedding throughput of OpenAI-compatible `/v1/embeddings`
//! endpoints side by side — Switchyard's router in front of a worker running the real model,
//! and llama.cpp's `llama-server --embeddings --pooling mean` on the same GGUF
//! (`bench/embeddings.sh` starts both). The workload is code-search indexing: the
//! repository's own Rust sources cut into chunks of `--lines-per-chunk` lines, sent
//! `--inputs-per-request` chunks a request, `--concurrency` requests in flight. Rounds alternate
//! which endpoint goes first; every answer must carry one vector per input, all of one width.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

/// Options of `switchyard-bench embeddings`.
#[derive(Debug, Clone, clap::Args)]
pub struct EmbeddingsArgs {
    /// An endpoint to measure, `NAME=BASE_URL` (its `/v1/embeddings` is called); repeat it.
    /// Ratios are given against the first.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// The model each endpoint is asked for (llama-server answers for its one model whatever
    /// the name).
    #[arg(long, default_value = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Chunks per round (the corpus repeats when it is shorter).
    #[arg(long, default_value_t = 256)]
    pub chunks: usize,
    #[arg(long, default_value_t = 16)]
    pub lines_per_chunk: usize,
    #[arg(long, default_value_t = 8)]
    pub inputs_per_request: usize,
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

/// One endpoint's figures over all rounds.
#[derive(Debug, Default)]
struct Measured {
    chunks: usize,
    tokens: u64,
    busy: Duration,
    latencies: Vec<Duration>,
}

/// Chunks of `lines` lines of the Rust sources under `root` (blank chunks skipped), in a
/// stable order.
fn corpus(root: &Path, lines: usize) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if path.is_dir() && !name.starts_with('.') && name != "target" {
                dirs.push(path);
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut chunks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        let all: Vec<&str> = text.lines().collect();
        for piece in all.chunks(lines.max(1)) {
            let chunk = piece.join("\n");
            if !chunk.trim().is_empty() {
                chunks.push(chunk);
            }
        }
    }
    ensure!(
        !chunks.is_empty(),
        "no Rust sources under {}",
        root.display()
    );
    Ok(chunks)
}

/// Embeds `chunks` at `url`: the wall time, the prompt tokens counted, each request's latency.
async fn round(
    client: &reqwest::Client,
    url: &str,
    args: &EmbeddingsArgs,
    chunks: Arc<Vec<String>>,
) -> anyhow::Result<(Duration, u64, Vec<Duration>)> {
    let requests = chunks.len().div_ceil(args.inputs_per_request);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, next, chunks, args) =
            (client.clone(), next.clone(), chunks.clone(), args.clone());
        let url = format!("{url}/v1/embeddings");
        tasks.spawn(async move {
            let (mut tokens, mut latencies, mut width) = (0u64, Vec::new(), None);
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    return anyhow::Ok((tokens, latencies));
                }
                let from = index * args.inputs_per_request;
                let inputs = &chunks[from..(from + args.inputs_per_request).min(chunks.len())];
                let sent = Instant::now();
                let answer: Value = client
                    .post(&url)
                    .json(&json!({"model": args.model, "input": inputs,
                                  "encoding_format": "float"}))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                latencies.push(sent.elapsed());
                let data = answer["data"].as_array().context("no data")?;
                ensure!(data.len() == inputs.len(), "{} vectors", data.len());
                for item in data {
                    let len = item["embedding"].as_array().map_or(0, Vec::len);
                    ensure!(len > 0 && *width.get_or_insert(len) == len, "width {len}");
                }
                tokens += answer["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            }
        });
    }
    let (mut tokens, mut latencies) = (0, Vec::new());
    while let Some(done) = tasks.join_next().await {
        let (t, l) = done??;
        tokens += t;
        latencies.extend(l);
    }
    Ok((start.elapsed(), tokens, latencies))
}

fn quantile_ms(latencies: &mut [Duration], q: f64) -> f64 {
    latencies.sort();
    let rank = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len().max(1));
    latencies
        .get(rank - 1)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

pub async fn run(args: EmbeddingsArgs) -> anyhow::Result<()> {
    let targets: Vec<(String, String)> = args
        .targets
        .iter()
        .map(|t| {
            t.split_once('=')
                .map(|(name, url)| (name.to_string(), url.trim_end_matches('/').to_string()))
                .context("--target is NAME=BASE_URL")
        })
        .collect::<anyhow::Result<_>>()?;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let corpus = corpus(&root, args.lines_per_chunk)?;
    let chunks: Arc<Vec<String>> =
        Arc::new(corpus.iter().cycle().take(args.chunks).cloned().collect());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    // One warm-up request each: connections open, weights paged in.
    for (name, url) in &targets {
        round(
            &client,
            url,
            &EmbeddingsArgs {
                concurrency: 1,
                ..args.clone()
            },
            Arc::new(chunks[..args.inputs_per_request.min(chunks.len())].to_vec()),
        )
        .await
        .with_context(|| format!("warming up {name} at {url}"))?;
    }
    let mut measured: Vec<Measured> = targets.iter().map(|_| Measured::default()).collect();
    for r in 0..args.rounds {
        for k in 0..targets.len() {
            let i = (k + r) % targets.len();
            let (busy, tokens, latencies) =
                round(&client, &targets[i].1, &args, chunks.clone()).await?;
            let m = &mut measured[i];
            m.chunks += chunks.len();
            m.tokens += tokens;
            m.busy += busy;
            m.latencies.extend(latencies);
        }
    }
    println!(
        "{} chunks of {} lines a round ({} prompt tokens/chunk on average at the first \
         endpoint), {} inputs a request, {} requests in flight, {} rounds",
        chunks.len(),
        args.lines_per_chunk,
        measured[0].tokens / measured[0].chunks.max(1) as u64,
        args.inputs_per_request,
        args.concurrency,
        args.rounds
    );
    println!(
        "{:<16}{:>12}{:>14}{:>18}{:>10}",
        "endpoint", "chunks/s", "tokens/s", "request p50/p99", "vs first"
    );
    let first = measured[0].tokens as f64 / measured[0].busy.as_secs_f64();
    for ((name, _), m) in targets.iter().zip(&mut measured) {
        let rate = m.tokens as f64 / m.busy.as_secs_f64();
        let (p50, p99) = (
            quantile_ms(&mut m.latencies, 0.5),
            quantile_ms(&mut m.latencies, 0.99),
        );
        println!(
            "{name:<16}{:>12.1}{:>14.0}{:>18}{:>9.2}×",
            m.chunks as f64 / m.busy.as_secs_f64(),
            rate,
            format!("{p50:.0} / {p99:.0} ms"),
            rate / first
        );
    }
    Ok(())
}
