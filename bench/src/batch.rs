//! `switchyard-bench batch`: what sending work as a batch (`POST /v1/files` then `POST
//! /v1/batches`) costs next to sending the same requests straight, side by side on one
//! router. The same non-streamed chat completions, `concurrency` at a time both ways (the
//! router's `--batch-concurrency` set to it): a client sending them and reading each answer,
//! and a batch, timed from the upload to the output file read back whole (its lines checked:
//! every request answered, in input order). Rounds alternate which goes first.
//!
//! One worker serving the unpaced synthetic engine and one router with its HTTP door run in
//! this process on loopback ports.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::doors::with_http_door;
use crate::router::{process_cpu, start_cluster, unthrottled_engine};

/// Options of `switchyard-bench batch`.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Requests per batch (and sent straight) per round.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests in flight at once, both ways.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

fn body(index: usize, max_tokens: u32) -> Value {
    json!({"model": "synthetic", "max_tokens": max_tokens, "ignore_eos": true,
           "messages": [{"role": "user", "content": format!("request {index} of the bench")}]})
}

/// The requests sent straight, `concurrency` at a time: the wall time.
async fn straight(
    client: &reqwest::Client,
    base: &str,
    args: &BatchArgs,
) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, next, args) = (client.clone(), next.clone(), args.clone());
        let url = format!("{base}/v1/chat/completions");
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= args.requests {
                    return anyhow::Ok(());
                }
                let answer: Value = client
                    .post(&url)
                    .json(&body(index, args.max_tokens))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await?;
                ensure!(
                    answer["usage"]["completion_tokens"] == args.max_tokens,
                    "{answer}"
                );
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined??;
    }
    Ok(start.elapsed())
}

/// The requests as one batch, from the upload to the output read back: the wall time.
async fn batched(
    client: &reqwest::Client,
    base: &str,
    args: &BatchArgs,
) -> anyhow::Result<Duration> {
    let text: String = (0..args.requests)
        .map(|i| {
            let line = json!({"custom_id": format!("r{i}"), "method": "POST",
                              "url": "/v1/chat/completions", "body": body(i, args.max_tokens)});
            format!("{line}\n")
        })
        .collect();
    let start = Instant::now();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(text.into_bytes()).file_name("bench.jsonl"),
        );
    let file: Value = client
        .post(format!("{base}/v1/files"))
        .multipart(form)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let create = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"});
    let mut batch: Value = client
        .post(format!("{base}/v1/batches"))
        .json(&create)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = batch["id"].as_str().context("a batch id")?.to_string();
    // Polled as a client polls (the API has no push); the interval bounds what it adds.
    while !["completed", "failed", "expired", "cancelled"]
        .contains(&batch["status"].as_str().unwrap_or_default())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
        batch = client
            .get(format!("{base}/v1/batches/{id}"))
            .send()
            .await?
            .json()
            .await?;
    }
    ensure!(batch["status"] == "completed", "{batch}");
    let output = client
        .get(format!(
            "{base}/v1/files/{}/content",
            batch["output_file_id"].as_str().unwrap_or_default()
        ))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let wall = start.elapsed();
    let mut answered = 0;
    for (i, line) in output.lines().enumerate() {
        let line: Value = serde_json::from_str(line)?;
        ensure!(line["custom_id"] == format!("r{i}"), "line {i}: {line}");
        let usage = &line["response"]["body"]["usage"];
        ensure!(
            usage["completion_tokens"] == args.max_tokens,
            "line {i}: {line}"
        );
        answered += 1;
    }
    ensure!(
        answered == args.requests,
        "{answered} of {} answered",
        args.requests
    );
    Ok(wall)
}

pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("--requests, --concurrency and --rounds must be at least 1");
    }
    let mut config = with_http_door(args.max_tokens)?;
    config.batches.concurrency = args.concurrency;
    let cluster = start_cluster(unthrottled_engine(4096), false, config).await?;
    let http = cluster
        .router_http
        .context("the router opened no HTTP door")?;
    let base = format!("http://{http}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let warm = BatchArgs {
        requests: args.concurrency * 4,
        ..args.clone()
    };
    straight(&client, &base, &warm).await?;
    batched(&client, &base, &warm).await?;
    let (mut straight_wall, mut batch_wall) = (Duration::ZERO, Duration::ZERO);
    let (mut straight_cpu, mut batch_cpu) = (Duration::ZERO, Duration::ZERO);
    for round in 0..args.rounds {
        for k in 0..2 {
            let cpu = process_cpu()?;
            if (round + k) % 2 == 0 {
                straight_wall += straight(&client, &base, &args).await?;
                straight_cpu += process_cpu()? - cpu;
            } else {
                batch_wall += batched(&client, &base, &args).await?;
                batch_cpu += process_cpu()? - cpu;
            }
        }
    }
    cluster.stop().await;
    let total = (args.requests * args.rounds) as f64;
    println!(
        "batch vs straight: {} chat completions × {} tokens per round, {} rounds, {} in flight \
         both ways (unpaced synthetic engine, loopback)",
        args.requests, args.max_tokens, args.rounds, args.concurrency
    );
    println!(
        "{:>9} {:>8} {:>8} {:>8}",
        "sent", "req/s", "cpu/req", "vs straight"
    );
    let rate = |wall: Duration| total / wall.as_secs_f64();
    for (name, wall, cpu) in [
        ("straight", straight_wall, straight_cpu),
        ("as batch", batch_wall, batch_cpu),
    ] {
        println!(
            "{:>9} {:>8.0} {:>6.0}µs {:>10.2}×",
            name,
            rate(wall),
            cpu.as_micros() as f64 / total,
            rate(wall) / rate(straight_wall),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_and_the_same_requests_sent_straight_are_all_answered() {
        run(BatchArgs {
            requests: 20,
            concurrency: 4,
            max_tokens: 4,
            rounds: 1,
        })
        .await
        .expect("the bench runs");
    }
}
