//! `switchyard-bench multiturn`: multi-turn chat conversations against any OpenAI-compatible
//! HTTP endpoint — Switchyard's router, llama.cpp's `llama-server`, SMG — to measure what prefix
//! reuse buys.
//!
//! Every conversation starts from one shared system prompt; each turn resends the whole history
//! (system prompt, every earlier user turn and assistant reply) plus a new user turn, greedy,
//! streamed. Conversations run concurrently, each turn after the previous one's reply. A server
//! that reuses cached prefixes prefills only the new tail on later turns, so their time to first
//! token is the figure to compare (per turn index), alongside overall tokens/s and the prefix
//! hit rate — reported by the API (`usage.prompt_tokens_details.cached_tokens`) and by the
//! engines' own counters when their `/metrics` URLs are given.

pub(crate) mod client;
pub mod metrics;
pub mod workload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use client::{ChatTarget, Message, Reply};

/// Options of `switchyard-bench multiturn`.
#[derive(Debug, Clone, clap::Args)]
pub struct MultiturnArgs {
    /// API base URL; `/chat/completions` is appended.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    pub url: String,
    /// Model name sent in every request.
    #[arg(long, default_value = "SmolLM2-135M-Instruct.Q4_1")]
    pub model: String,
    /// Conversations in the run.
    #[arg(long, default_value_t = 8)]
    pub conversations: usize,
    /// User turns per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// Conversations in flight at once (default: all of them).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Tokens generated per reply, at most (greedy: temperature 0).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Seed of the conversations' user turns (same seed, same workload).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// System prompt file (default: the coding-assistant prompt shipped in
    /// bench/prompts/coding-assistant-system.txt).
    #[arg(long)]
    pub system_prompt_file: Option<PathBuf>,
    /// Prometheus endpoint whose `switchyard_engine_prefix_{hit,lookup}_tokens_total` counters
    /// are compared before and after the run (repeatable; summed).
    #[arg(long = "metrics-url")]
    pub metrics_urls: Vec<String>,
    /// Extra request header `name: value` (repeatable), e.g. `x-switchyard-class: cost-sensitive`.
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Bearer token, when the endpoint requires one.
    #[arg(long, env = "SWITCHYARD_BENCH_API_KEY")]
    pub api_key: Option<String>,
    /// Send each conversation's id as the OpenAI `user` field (Switchyard uses it as the
    /// affinity key). Off by default: the server has only the prompt to go by.
    #[arg(long)]
    pub send_user: bool,
    /// Unmeasured requests sent first (short, no shared prefix), to exclude cold starts.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Longest wait for one reply.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "300s")]
    pub request_timeout: Duration,
    /// Name of this run in the output (e.g. the server under test).
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (name, value) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not `name: value`"))?;
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() {
        return Err(format!("{s:?} has an empty header name"));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Figures for one turn index (1-based) over every conversation.
#[derive(Debug, Clone, Serialize)]
pub struct TurnReport {
    pub turn: usize,
    pub requests: usize,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub prompt_tokens_mean: Option<f64>,
    pub cached_tokens_mean: Option<f64>,
    pub prefix_hit_rate: Option<f64>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct MultiturnReport {
    pub label: String,
    pub url: String,
    pub model: String,
    pub conversations: usize,
    pub turns: usize,
    pub concurrency: usize,
    pub max_tokens: u32,
    pub seed: u64,
    pub requests: usize,
    pub wall_s: f64,
    pub completion_tokens: u64,
    /// Completion tokens over the run's wall time, all conversations together.
    pub tokens_per_s: f64,
    pub per_turn: Vec<TurnReport>,
    /// Turns 2 and later pooled: where a prefix cache can help.
    pub later_turns_ttft_p50_ms: Option<f64>,
    pub later_turns_ttft_p90_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    /// Sum of `usage.prompt_tokens_details.cached_tokens` / sum of `usage.prompt_tokens`;
    /// `None` when the server does not report cached tokens.
    pub prefix_hit_rate: Option<f64>,
    /// From the engines' counters (hit / lookup tokens over the run), when scraped.
    pub engine_hit_tokens: Option<f64>,
    pub engine_lookup_tokens: Option<f64>,
    pub engine_prefix_hit_rate: Option<f64>,
    /// Requests per `x-switchyard-worker` (empty when the server does not say).
    pub workers: BTreeMap<String, usize>,
    /// Share of turns ≥ 2 served by the worker that served the conversation's previous turn.
    pub same_worker_share: Option<f64>,
}

/// One measured turn.
struct Sample {
    conversation: usize,
    turn: usize,
    reply: Reply,
}

/// Nearest-rank percentile of unsorted samples, in milliseconds.
fn percentile_ms(values: &mut [Duration], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort();
    let rank = ((p * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1].as_secs_f64() * 1e3)
}

async fn run_conversation(
    client: reqwest::Client,
    target: Arc<ChatTarget>,
    system_prompt: Arc<str>,
    index: usize,
    user_turns: Vec<String>,
    user: Option<String>,
) -> anyhow::Result<Vec<Sample>> {
    let mut messages = vec![Message {
        role: "system",
        content: system_prompt.to_string(),
    }];
    let mut samples = Vec::with_capacity(user_turns.len());
    for (turn, text) in user_turns.into_iter().enumerate() {
        messages.push(Message {
            role: "user",
            content: text,
        });
        let reply = client::chat(&client, &target, &messages, user.as_deref())
            .await
            .with_context(|| format!("conversation {index}, turn {}", turn + 1))?;
        messages.push(Message {
            role: "assistant",
            content: reply.content.clone(),
        });
        samples.push(Sample {
            conversation: index,
            turn: turn + 1,
            reply,
        });
    }
    Ok(samples)
}

/// Runs the benchmark and returns its report (printing nothing).
pub async fn measure(args: &MultiturnArgs) -> anyhow::Result<MultiturnReport> {
    if args.conversations == 0 || args.turns == 0 {
        bail!("--conversations and --turns must be at least 1");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let concurrency = args.concurrency.unwrap_or(args.conversations);
    if concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let system_prompt = match &args.system_prompt_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading --system-prompt-file {}", path.display()))?,
        None => workload::DEFAULT_SYSTEM_PROMPT.to_string(),
    };
    let work = workload::build(system_prompt, args.conversations, args.turns, args.seed);
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let target = Arc::new(ChatTarget {
        endpoint: format!("{}/chat/completions", args.url.trim_end_matches('/')),
        model: args.model.clone(),
        max_tokens: args.max_tokens,
        api_key: args.api_key.clone(),
        headers: args.headers.clone(),
        timeout: args.request_timeout,
    });

    for i in 0..args.warmup {
        let warm = [Message {
            role: "user",
            content: format!("Warm-up {i}: say ok."),
        }];
        let mut short = (*target).clone();
        short.max_tokens = 4;
        client::chat(&client, &short, &warm, None)
            .await
            .context("warm-up request")?;
    }

    let before = metrics::scrape(&client, &args.metrics_urls).await?;
    let system: Arc<str> = work.system_prompt.into();
    let gate = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for (index, conversation) in work.conversations.into_iter().enumerate() {
        let (client, target, system, gate) =
            (client.clone(), target.clone(), system.clone(), gate.clone());
        let user = args.send_user.then(|| format!("conversation-{index}"));
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            run_conversation(client, target, system, index, conversation.user_turns, user).await
        });
    }
    let mut samples = Vec::new();
    while let Some(result) = tasks.join_next().await {
        samples.extend(result.context("conversation task")??);
    }
    let wall = start.elapsed();
    let after = metrics::scrape(&client, &args.metrics_urls).await?;
    Ok(report(args, concurrency, wall, samples, before, after))
}

fn ratio(num: Option<f64>, den: Option<f64>) -> Option<f64> {
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// Sums a field over samples; `None` if any sample lacks it (a partial sum would mislead).
fn sum_all(samples: &[&Sample], field: impl Fn(&Reply) -> Option<u64>) -> Option<u64> {
    samples.iter().map(|s| field(&s.reply)).sum()
}

fn report(
    args: &MultiturnArgs,
    concurrency: usize,
    wall: Duration,
    mut samples: Vec<Sample>,
    before: metrics::PrefixCounters,
    after: metrics::PrefixCounters,
) -> MultiturnReport {
    samples.sort_by_key(|s| (s.conversation, s.turn));
    let all: Vec<&Sample> = samples.iter().collect();
    let per_turn = (1..=args.turns)
        .map(|turn| {
            let these: Vec<&Sample> = all.iter().copied().filter(|s| s.turn == turn).collect();
            let mut ttft: Vec<Duration> = these.iter().map(|s| s.reply.ttft).collect();
            let prompt = sum_all(&these, |r| r.prompt_tokens);
            let cached = sum_all(&these, |r| r.cached_tokens);
            let n = these.len() as f64;
            TurnReport {
                turn,
                requests: these.len(),
                ttft_p50_ms: percentile_ms(&mut ttft, 0.5).unwrap_or(f64::NAN),
                ttft_p90_ms: percentile_ms(&mut ttft, 0.9).unwrap_or(f64::NAN),
                prompt_tokens_mean: prompt.map(|p| p as f64 / n),
                cached_tokens_mean: cached.map(|c| c as f64 / n),
                prefix_hit_rate: ratio(cached.map(|c| c as f64), prompt.map(|p| p as f64)),
            }
        })
        .collect();
    let mut later: Vec<Duration> = all
        .iter()
        .filter(|s| s.turn >= 2)
        .map(|s| s.reply.ttft)
        .collect();
    let completion_tokens: u64 = all.iter().map(|s| s.reply.completion_tokens).sum();
    let prompt_tokens = sum_all(&all, |r| r.prompt_tokens);
    let cached_tokens = sum_all(&all, |r| r.cached_tokens);
    let engine = metrics::delta(before, after);

    let mut workers = BTreeMap::new();
    let (mut same, mut followups) = (0usize, 0usize);
    for pair in samples.windows(2) {
        let (prev, this) = (&pair[0], &pair[1]);
        if prev.conversation == this.conversation
            && let (Some(a), Some(b)) = (&prev.reply.worker, &this.reply.worker)
        {
            followups += 1;
            same += usize::from(a == b);
        }
    }
    for s in &samples {
        if let Some(w) = &s.reply.worker {
            *workers.entry(w.clone()).or_insert(0) += 1;
        }
    }
    MultiturnReport {
        label: args.label.clone(),
        url: args.url.clone(),
        model: args.model.clone(),
        conversations: args.conversations,
        turns: args.turns,
        concurrency,
        max_tokens: args.max_tokens,
        seed: args.seed,
        requests: samples.len(),
        wall_s: wall.as_secs_f64(),
        completion_tokens,
        tokens_per_s: completion_tokens as f64 / wall.as_secs_f64(),
        per_turn,
        later_turns_ttft_p50_ms: percentile_ms(&mut later, 0.5),
        later_turns_ttft_p90_ms: percentile_ms(&mut later, 0.9),
        prompt_tokens,
        cached_tokens,
        prefix_hit_rate: ratio(
            cached_tokens.map(|c| c as f64),
            prompt_tokens.map(|p| p as f64),
        ),
        engine_hit_tokens: engine.map(|e| e.0),
        engine_lookup_tokens: engine.map(|e| e.1),
        engine_prefix_hit_rate: engine.and_then(|(h, l)| ratio(Some(h), Some(l))),
        workers,
        same_worker_share: (followups > 0).then(|| same as f64 / followups as f64),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{:.1}%", v * 100.0))
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}"))
}

/// The human-readable table.
pub fn render(r: &MultiturnReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let label = if r.label.is_empty() {
        String::new()
    } else {
        format!("[{}] ", r.label)
    };
    let _ = writeln!(
        out,
        "{label}{} conversations x {} turns, {} in flight, max_tokens {}, seed {}, {} ({})",
        r.conversations, r.turns, r.concurrency, r.max_tokens, r.seed, r.url, r.model
    );
    let _ = writeln!(
        out,
        "{:>4} {:>8} {:>12} {:>12} {:>9} {:>12} {:>12}",
        "turn", "requests", "prompt tok", "cached tok", "hit rate", "TTFT p50 ms", "TTFT p90 ms"
    );
    for t in &r.per_turn {
        let _ = writeln!(
            out,
            "{:>4} {:>8} {:>12} {:>12} {:>9} {:>12.1} {:>12.1}",
            t.turn,
            t.requests,
            num(t.prompt_tokens_mean),
            num(t.cached_tokens_mean),
            pct(t.prefix_hit_rate),
            t.ttft_p50_ms,
            t.ttft_p90_ms
        );
    }
    let ms = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1} ms"));
    let _ = writeln!(
        out,
        "turns >= 2: TTFT p50 {} p90 {}",
        ms(r.later_turns_ttft_p50_ms),
        ms(r.later_turns_ttft_p90_ms)
    );
    let _ = writeln!(
        out,
        "{} requests in {:.2} s, {} completion tokens, {:.1} tok/s",
        r.requests, r.wall_s, r.completion_tokens, r.tokens_per_s
    );
    let _ = writeln!(
        out,
        "prefix hit rate (usage cached_tokens / prompt_tokens): {}",
        pct(r.prefix_hit_rate)
    );
    let _ = writeln!(
        out,
        "prefix hit rate (engine metrics, hit / lookup tokens): {}{}",
        pct(r.engine_prefix_hit_rate),
        match (r.engine_hit_tokens, r.engine_lookup_tokens) {
            (Some(h), Some(l)) => format!(" ({h:.0} / {l:.0})"),
            _ => String::new(),
        }
    );
    if !r.workers.is_empty() {
        let list: Vec<String> = r.workers.iter().map(|(w, n)| format!("{w} {n}")).collect();
        let _ = writeln!(
            out,
            "served by: {}; later turns on the previous turn's worker: {}",
            list.join(", "),
            pct(r.same_worker_share)
        );
    }
    out
}

/// `switchyard-bench multiturn`.
pub async fn run(args: MultiturnArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=10).rev().map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&mut v, 0.5), Some(5.0));
        assert_eq!(percentile_ms(&mut v, 0.9), Some(9.0));
        assert_eq!(
            percentile_ms(&mut [Duration::from_millis(3)], 0.9),
            Some(3.0)
        );
        assert_eq!(percentile_ms(&mut [], 0.5), None);
    }

    #[test]
    fn headers_parse_and_reject() {
        assert_eq!(
            parse_header("x-switchyard-class: cost-sensitive"),
            Ok(("x-switchyard-class".into(), "cost-sensitive".into()))
        );
        assert!(parse_header("no colon").is_err());
        assert!(parse_header(": v").is_err());
    }
}
