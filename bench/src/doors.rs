//! `switchyard-bench doors`: what each HTTP door costs, side by side on one router — the same
//! streamed generations asked for as a chat completion (`/v1/chat/completions`, and kept with
//! `store: true`), as a response
//! (`/v1/responses`, whose stream sends typed events with the whole response object at each
//! end; stored, as by default, with `store: false`, and in the background, whose events the
//! router keeps for a client to resume from) and as an Anthropic message (`/v1/messages`).
//!
//! One worker serving the unpaced synthetic engine and one router with its HTTP door run in
//! this process on loopback ports. Each round runs every door once, the door that starts
//! alternating, so machine drift hits both alike. Every request must stream `max_tokens`
//! tokens and end properly (`[DONE]`; `response.incomplete`, as the engine writes to the
//! bound; `message_stop`), or the run fails. Reported per door: requests/s, time to first token and to the
//! end (p50 / p99 over every round), CPU time of this process per request, and each door's
//! throughput as a ratio of the chat door's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use switchyard_worker_wse::sse::SseParser;
use tokio::task::JoinSet;

use crate::router::{bench_router_config, process_cpu, start_cluster, unthrottled_engine};

const MODEL: &str = "synthetic";

/// Options of `switchyard-bench doors`.
#[derive(Debug, Clone, clap::Args)]
pub struct DoorsArgs {
    /// Requests per door and round.
    #[arg(long, default_value_t = 1000)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Rounds; each runs every door once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Chat,
    /// `store: true`: the chat answer is also put together whole and kept.
    ChatStored,
    /// Stored (`store` left to its default, as OpenAI's SDKs leave it).
    Responses,
    /// `store: false`: the door without keeping the response.
    ResponsesUnstored,
    /// `background: true`: the run keeps its events and the client follows them.
    ResponsesBackground,
    Messages,
}

impl Door {
    fn name(self) -> &'static str {
        match self {
            Door::Chat => "chat",
            Door::ChatStored => "chat kept",
            Door::Responses => "responses",
            Door::ResponsesUnstored => "unstored",
            Door::ResponsesBackground => "background",
            Door::Messages => "messages",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Door::Chat | Door::ChatStored => "/v1/chat/completions",
            Door::Responses | Door::ResponsesUnstored | Door::ResponsesBackground => {
                "/v1/responses"
            }
            Door::Messages => "/v1/messages",
        }
    }

    fn body(self, index: usize, max_tokens: u32) -> Value {
        let question = format!("Question {index}: say something about the wafer.");
        match self {
            Door::Chat => json!({
                "model": MODEL, "stream": true, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}],
            }),
            Door::ChatStored => json!({
                "model": MODEL, "stream": true, "max_tokens": max_tokens, "store": true,
                "messages": [{"role": "user", "content": question}],
            }),
            Door::Responses => json!({
                "model": MODEL, "stream": true, "max_output_tokens": max_tokens,
                "input": question,
            }),
            Door::ResponsesUnstored => json!({
                "model": MODEL, "stream": true, "max_output_tokens": max_tokens,
                "input": question, "store": false,
            }),
            Door::ResponsesBackground => json!({
                "model": MODEL, "stream": true, "max_output_tokens": max_tokens,
                "input": question, "background": true,
            }),
            Door::Messages => json!({
                "model": MODEL, "stream": true, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": question}],
            }),
        }
    }
}

/// Time to the first text and to the end of one streamed request.
struct Timing {
    ttft: Duration,
    total: Duration,
}

/// Streams one request and reads it to its end; fails unless text came and the stream ended
/// as its door ends a generation.
async fn one(
    client: &reqwest::Client,
    url: &str,
    door: Door,
    body: &Value,
) -> anyhow::Result<Timing> {
    let start = Instant::now();
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    if !status.is_success() {
        bail!(
            "POST {url} answered {status}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let mut parser = SseParser::default();
    let mut stream = response.bytes_stream();
    let mut ttft = None;
    let mut ended = false;
    'read: while let Some(bytes) = stream.next().await {
        for event in parser.push(&bytes.context("reading the event stream")?)? {
            if matches!(door, Door::Chat | Door::ChatStored) && event.data == "[DONE]" {
                ended = true;
                break 'read;
            }
            let data: Value = serde_json::from_str(&event.data)
                .with_context(|| format!("event is not JSON: {}", event.data))?;
            let text = match door {
                Door::Chat | Door::ChatStored => data["choices"][0]["delta"]["content"].as_str(),
                Door::Responses | Door::ResponsesUnstored | Door::ResponsesBackground => {
                    data["delta"].as_str()
                }
                Door::Messages => data["delta"]["text"].as_str(),
            };
            if text.is_some_and(|t| !t.is_empty()) {
                ttft.get_or_insert_with(|| start.elapsed());
            }
            match (door, data["type"].as_str()) {
                (
                    Door::Responses | Door::ResponsesUnstored | Door::ResponsesBackground,
                    Some("response.completed" | "response.incomplete"),
                )
                | (Door::Messages, Some("message_stop")) => {
                    ended = true;
                    break 'read;
                }
                (
                    Door::Responses | Door::ResponsesUnstored | Door::ResponsesBackground,
                    Some("response.failed"),
                )
                | (Door::Messages, Some("error")) => {
                    bail!("the {} stream failed: {data}", door.name())
                }
                _ => {}
            }
        }
    }
    if !ended || ttft.is_none() {
        bail!(
            "{} stream ended without text or without its end",
            door.name()
        );
    }
    Ok(Timing {
        ttft: ttft.unwrap_or_default(),
        total: start.elapsed(),
    })
}

/// One door's run: `requests` requests, `concurrency` in flight. Returns the timings and the
/// wall time.
async fn run_door(
    client: &reqwest::Client,
    base: &str,
    door: Door,
    args: &DoorsArgs,
) -> anyhow::Result<(Vec<Timing>, Duration)> {
    let url = format!("{base}{}", door.path());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, url, next, args) = (client.clone(), url.clone(), next.clone(), args.clone());
        tasks.spawn(async move {
            let mut timings = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= args.requests {
                    return anyhow::Ok(timings);
                }
                timings.push(one(&client, &url, door, &door.body(index, args.max_tokens)).await?);
            }
        });
    }
    let mut timings = Vec::with_capacity(args.requests);
    while let Some(joined) = tasks.join_next().await {
        timings.extend(joined??);
    }
    Ok((timings, start.elapsed()))
}

#[derive(Default)]
struct Totals {
    ttft: Vec<u64>,
    total: Vec<u64>,
    requests: usize,
    wall: Duration,
    cpu: Duration,
}

/// The `q` quantile of `values` (microseconds), in milliseconds.
pub(crate) fn quantile_ms(values: &[u64], q: f64) -> anyhow::Result<f64> {
    let mut histogram = Histogram::<u64>::new(3)?;
    for v in values {
        histogram.record(*v)?;
    }
    Ok(histogram.value_at_quantile(q) as f64 / 1000.0)
}

/// The bench router's configuration with an HTTP door on a free loopback port.
pub(crate) fn with_http_door(max_tokens: u32) -> anyhow::Result<switchyard_router::RouterConfig> {
    let mut config = bench_router_config(
        switchyard_router::RouterConfig::default().decision_reports_per_s,
        switchyard_router::RouterConfig::default().stream_credit_tokens,
        max_tokens.max(1),
    )?;
    config.http_listen = Some("127.0.0.1:0".parse()?);
    Ok(config)
}

pub async fn run(args: DoorsArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("--requests, --concurrency and --rounds must be at least 1");
    }
    let config = with_http_door(args.max_tokens)?;
    let cluster = start_cluster(unthrottled_engine(4096), false, config).await?;
    let http = cluster
        .router_http
        .context("the router opened no HTTP door")?;
    let base = format!("http://{http}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let doors = [
        Door::Chat,
        Door::ChatStored,
        Door::Responses,
        Door::ResponsesUnstored,
        Door::ResponsesBackground,
        Door::Messages,
    ];
    let mut totals: Vec<Totals> = doors.iter().map(|_| Totals::default()).collect();
    // A warm-up run per door: connections open, the router's tokenizer fetched.
    for door in doors {
        let warm = DoorsArgs {
            requests: args.concurrency * 4,
            ..args.clone()
        };
        run_door(&client, &base, door, &warm).await?;
    }
    for round in 0..args.rounds {
        for k in 0..doors.len() {
            let i = (round + k) % doors.len();
            let cpu_before = process_cpu()?;
            let (timings, wall) = run_door(&client, &base, doors[i], &args).await?;
            let t = &mut totals[i];
            t.cpu += process_cpu()? - cpu_before;
            t.wall += wall;
            t.requests += timings.len();
            t.ttft
                .extend(timings.iter().map(|x| x.ttft.as_micros() as u64));
            t.total
                .extend(timings.iter().map(|x| x.total.as_micros() as u64));
        }
    }
    cluster.stop().await;

    println!(
        "HTTP doors: {} streamed requests × {} tokens per door and round, {} rounds, {} in flight \
         (unpaced synthetic engine, loopback)",
        args.requests, args.max_tokens, args.rounds, args.concurrency
    );
    println!(
        "{:>10} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "door", "req/s", "ttft p50", "ttft p99", "end p50", "end p99", "cpu/req", "vs chat"
    );
    let rate = |t: &Totals| t.requests as f64 / t.wall.as_secs_f64();
    let chat_rate = rate(&totals[0]);
    for (door, t) in doors.iter().zip(&totals) {
        println!(
            "{:>10} {:>8.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>6.0}µs {:>7.2}×",
            door.name(),
            rate(t),
            quantile_ms(&t.ttft, 0.5)?,
            quantile_ms(&t.ttft, 0.99)?,
            quantile_ms(&t.total, 0.5)?,
            quantile_ms(&t.total, 0.99)?,
            t.cpu.as_micros() as f64 / t.requests as f64,
            rate(t) / chat_rate,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_door_streams_every_request_to_its_end() {
        run(DoorsArgs {
            requests: 20,
            concurrency: 4,
            max_tokens: 8,
            rounds: 1,
        })
        .await
        .expect("every request of every door streams to its end");
    }
}
