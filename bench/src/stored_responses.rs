//! `switchyard-bench stored-responses`: what going on from a stored response or a stored
//! conversation costs, next to sending the whole conversation every turn — the same
//! multi-turn conversations twelve ways, side by side in one run:
//!
//! - `inline`: each turn sends the whole conversation so far in `input` (`store: false`);
//! - `same replica`: each turn sends only its new message and names the previous response
//!   (`previous_response_id`), on the router replica that stored it;
//! - `other replica`: the same, each turn on the other of two replicas, which reads the
//!   previous response from its keeper over gRPC (found in the shared registry);
//! - `mirrored`: as `same replica`, on a pair of replicas with a cluster token, so each
//!   mirrors every response it stores to the other (its standby, which would take them over
//!   if it died): what that insurance costs;
//! - `conversation`: each turn sends only its new message and names a stored conversation
//!   (`conversation`, made by `POST /v1/conversations` before the first turn, inside the
//!   way's wall time) that the turn adds itself to, on the replica that keeps it;
//! - `conv. other`: the same, each turn on the other of two replicas, which reads the
//!   conversation from its keeper and adds the turn there, over gRPC;
//! - `conv. mirrored`: as `conversation`, on the pair with a cluster token: each change of the
//!   conversation goes to the standby too;
//! - `journaled`: as `same replica`, on a single router with a state directory
//!   (`--state-dir`) and no standby, which journals every response it stores on disk as it
//!   goes (so a kill loses none): what that insurance costs;
//! - `conv. journaled`: as `conversation`, on that router: each change of the conversation is
//!   journaled;
//! - `journaled, sync`: as `journaled`, on a router that syncs its journal to disk after each
//!   write (`--state-sync-interval 0s`: a host crash loses nothing written) instead of at most
//!   a second later (the default, which the two ways above run with);
//! - `referenced`: each turn sends the whole conversation in `input`, but the model's earlier
//!   answers as `item_reference`s to the stored responses' output items (the client keeps
//!   its own messages, the router the model's), on the replica that stored them;
//! - `ref. other`: the same, each turn on the other of two replicas, which fetches each
//!   referenced response from its keeper over gRPC.
//!
//! Four clusters run in this process on loopback ports, each one worker serving the unpaced
//! synthetic engine: two with two routers with HTTP doors, the first without a cluster token
//! (no mirrors), the second with one; the third and fourth with one router journaling to a
//! state directory in a temporary directory (on whatever disk that is), the fourth syncing
//! each write. Every turn's prompt must come out the same whichever way it was
//! sent (its `input_tokens` are compared per conversation and turn), or the run fails. Each
//! round runs every way once, the one that starts alternating. Reported per way: turns/s,
//! latency of a whole (non-streamed) turn p50 / p99, bytes sent per turn, CPU time of this
//! process per turn, and throughput as a ratio of `inline`'s; then the bytes the replicas'
//! stores hold, and how many syncs the journaling routers made and how long they took.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::doors::quantile_ms;
use crate::router::{process_cpu, start_cluster, unthrottled_engine};

const MODEL: &str = "synthetic";

/// Options of `switchyard-bench stored-responses`.
#[derive(Debug, Clone, clap::Args)]
pub struct StoredResponsesArgs {
    /// Conversations per way and round.
    #[arg(long, default_value_t = 64)]
    pub conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 8)]
    pub turns: usize,
    /// Conversations going on at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Tokens generated per turn.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Words of each turn's user message.
    #[arg(long, default_value_t = 200)]
    pub message_words: usize,
    /// Rounds; each runs every way once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Inline,
    SameReplica,
    OtherReplica,
    Mirrored,
    Conversation,
    ConversationOtherReplica,
    ConversationMirrored,
    Journaled,
    ConversationJournaled,
    JournaledSynced,
    Referenced,
    ReferencedOtherReplica,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::Inline => "inline",
            Way::SameReplica => "same replica",
            Way::OtherReplica => "other replica",
            Way::Mirrored => "mirrored",
            Way::Conversation => "conversation",
            Way::ConversationOtherReplica => "conv. other",
            Way::ConversationMirrored => "conv. mirrored",
            Way::Journaled => "journaled",
            Way::ConversationJournaled => "conv. journaled",
            Way::JournaledSynced => "journaled, sync",
            Way::Referenced => "referenced",
            Way::ReferencedOtherReplica => "ref. other",
        }
    }
}

/// One turn's measurement.
struct Turn {
    latency: Duration,
    sent_bytes: usize,
}

/// The prompt size of each (conversation, turn), as the engine counted it.
type PromptSizes = HashMap<(usize, usize), u64>;

fn user_message(conversation: usize, turn: usize, words: usize) -> String {
    let mut text = format!("Conversation {conversation}, turn {turn}:");
    for i in 0..words {
        text.push_str(&format!(" word{}", (conversation * 31 + turn * 7 + i) % 97));
    }
    text
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> anyhow::Result<(Value, usize)> {
    let body = body.to_string();
    let sent = body.len();
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = response.status();
    let answer: Value = response.json().await.context("the answer is not JSON")?;
    if !status.is_success() {
        bail!("POST {url} answered {status}: {answer}");
    }
    Ok((answer, sent))
}

/// The router (index in the bases) that keeps what `way` stores: the plain pair's first, the
/// mirrored pair's first, or a journaling router.
fn keeper(way: Way) -> usize {
    match way {
        Way::Mirrored | Way::ConversationMirrored => 2,
        Way::Journaled | Way::ConversationJournaled => 4,
        Way::JournaledSynced => 5,
        _ => 0,
    }
}

/// One conversation of `args.turns` turns, sent `way`; its turns' measurements and prompt
/// sizes.
async fn conversation(
    client: &reqwest::Client,
    bases: &[String; 6],
    way: Way,
    index: usize,
    args: &StoredResponsesArgs,
) -> anyhow::Result<(Vec<Turn>, PromptSizes)> {
    let mut turns = Vec::with_capacity(args.turns);
    let mut sizes = PromptSizes::new();
    let mut history: Vec<Value> = Vec::new();
    let mut previous: Option<String> = None;
    let stored_conversation = match way {
        Way::Conversation
        | Way::ConversationOtherReplica
        | Way::ConversationMirrored
        | Way::ConversationJournaled => {
            let keeper = &bases[keeper(way)];
            let (made, _) = post(client, &format!("{keeper}/v1/conversations"), &json!({})).await?;
            Some(
                made["id"]
                    .as_str()
                    .context("a conversation id")?
                    .to_string(),
            )
        }
        _ => None,
    };
    for turn in 0..args.turns {
        let message = user_message(index, turn, args.message_words);
        let mut body = json!({"model": MODEL, "max_output_tokens": args.max_tokens});
        let base = match way {
            Way::Inline => {
                history.push(json!({"role": "user", "content": message}));
                body["input"] = Value::from(history.clone());
                body["store"] = Value::from(false);
                &bases[0]
            }
            Way::SameReplica
            | Way::OtherReplica
            | Way::Mirrored
            | Way::Journaled
            | Way::JournaledSynced => {
                body["input"] = Value::from(message);
                if let Some(previous) = &previous {
                    body["previous_response_id"] = Value::from(previous.as_str());
                }
                let other = way == Way::OtherReplica && turn % 2 == 1;
                &bases[keeper(way) + usize::from(other)]
            }
            Way::Conversation
            | Way::ConversationOtherReplica
            | Way::ConversationMirrored
            | Way::ConversationJournaled => {
                body["input"] = Value::from(message);
                body["conversation"] = Value::from(stored_conversation.clone());
                body["store"] = Value::from(false);
                let other = way == Way::ConversationOtherReplica && turn % 2 == 1;
                &bases[keeper(way) + usize::from(other)]
            }
            Way::Referenced | Way::ReferencedOtherReplica => {
                history.push(json!({"role": "user", "content": message}));
                body["input"] = Value::from(history.clone());
                let other = way == Way::ReferencedOtherReplica && turn % 2 == 1;
                &bases[usize::from(other)]
            }
        };
        let start = Instant::now();
        let (answer, sent_bytes) = post(client, &format!("{base}/v1/responses"), &body).await?;
        turns.push(Turn {
            latency: start.elapsed(),
            sent_bytes,
        });
        let text = answer["output"][0]["content"][0]["text"]
            .as_str()
            .with_context(|| format!("no text in {answer}"))?;
        if way == Way::Inline {
            history.push(json!({"role": "assistant", "content": text}));
        } else if matches!(way, Way::Referenced | Way::ReferencedOtherReplica) {
            let said = answer["output"][0]["id"]
                .as_str()
                .context("an output item id")?;
            history.push(json!({"type": "item_reference", "id": said}));
        } else if stored_conversation.is_none() {
            let id = answer["id"]
                .as_str()
                .context("a stored response has an id")?;
            previous = Some(id.to_string());
        }
        let input_tokens = answer["usage"]["input_tokens"]
            .as_u64()
            .context("usage.input_tokens")?;
        sizes.insert((index, turn), input_tokens);
    }
    Ok((turns, sizes))
}

/// One way's run: every conversation, `concurrency` at once.
async fn run_way(
    client: &reqwest::Client,
    bases: &[String; 6],
    way: Way,
    args: &StoredResponsesArgs,
) -> anyhow::Result<(Vec<Turn>, PromptSizes, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.concurrency {
        let (client, bases, next, args) =
            (client.clone(), bases.clone(), next.clone(), args.clone());
        tasks.spawn(async move {
            let (mut turns, mut sizes) = (Vec::new(), PromptSizes::new());
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= args.conversations {
                    return anyhow::Ok((turns, sizes));
                }
                let (t, s) = conversation(&client, &bases, way, index, &args).await?;
                turns.extend(t);
                sizes.extend(s);
            }
        });
    }
    let (mut turns, mut sizes) = (Vec::new(), PromptSizes::new());
    while let Some(joined) = tasks.join_next().await {
        let (t, s) = joined??;
        turns.extend(t);
        sizes.extend(s);
    }
    Ok((turns, sizes, start.elapsed()))
}

#[derive(Default)]
struct Totals {
    latency: Vec<u64>,
    sent_bytes: usize,
    turns: usize,
    wall: Duration,
    cpu: Duration,
}

/// A gauge's value in a router's `/metrics`.
async fn gauge(client: &reqwest::Client, base: &str, name: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} "))?.parse().ok())
        .with_context(|| format!("no {name} in the router's metrics"))
}

/// A cluster of one worker and two routers of `config`, and the routers' HTTP doors.
async fn start_pair(
    mut config: switchyard_router::RouterConfig,
) -> anyhow::Result<(crate::router::Cluster, [String; 2])> {
    config.metrics = switchyard_cluster::telemetry::metrics::Metrics::new();
    let mut cluster = start_cluster(unthrottled_engine(4096), false, config.clone()).await?;
    let first = cluster
        .router_http
        .context("the router opened no HTTP door")?;
    // Its own metrics registry: each replica's `/metrics` tells its own store.
    config.metrics = switchyard_cluster::telemetry::metrics::Metrics::new();
    let second = cluster
        .start_router(config)
        .await?
        .http
        .context("the second router opened no HTTP door")?;
    Ok((
        cluster,
        [format!("http://{first}"), format!("http://{second}")],
    ))
}

pub async fn run(args: StoredResponsesArgs) -> anyhow::Result<()> {
    if args.conversations == 0 || args.turns == 0 || args.concurrency == 0 || args.rounds == 0 {
        bail!("--conversations, --turns, --concurrency and --rounds must be at least 1");
    }
    let mut config = crate::doors::with_http_door(args.max_tokens)?;
    config.limits.max_message_bytes = config.limits.max_message_bytes.max(1 << 20);
    let (plain, plain_doors) = start_pair(config.clone()).await?;
    config.cluster_token = Some(
        switchyard_cluster::credential::ClusterToken::new("stored-responses-bench-token")
            .map_err(anyhow::Error::msg)?,
    );
    let (mirrored, mirrored_doors) = start_pair(config.clone()).await?;
    let state = tempfile::tempdir()?;
    config.cluster_token = None;
    config.state_dir = Some(state.path().to_path_buf());
    config.metrics = switchyard_cluster::telemetry::metrics::Metrics::new();
    let journaled = start_cluster(unthrottled_engine(4096), false, config.clone()).await?;
    let journaled_door = journaled
        .router_http
        .context("the journaling router opened no HTTP door")?;
    let synced_state = tempfile::tempdir()?;
    config.state_dir = Some(synced_state.path().to_path_buf());
    config.state_sync_interval = Duration::ZERO;
    config.metrics = switchyard_cluster::telemetry::metrics::Metrics::new();
    let synced = start_cluster(unthrottled_engine(4096), false, config).await?;
    let synced_door = synced
        .router_http
        .context("the syncing router opened no HTTP door")?;
    let bases = [
        plain_doors[0].clone(),
        plain_doors[1].clone(),
        mirrored_doors[0].clone(),
        mirrored_doors[1].clone(),
        format!("http://{journaled_door}"),
        format!("http://{synced_door}"),
    ];
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let ways = [
        Way::Inline,
        Way::SameReplica,
        Way::OtherReplica,
        Way::Mirrored,
        Way::Conversation,
        Way::ConversationOtherReplica,
        Way::ConversationMirrored,
        Way::Journaled,
        Way::ConversationJournaled,
        Way::JournaledSynced,
        Way::Referenced,
        Way::ReferencedOtherReplica,
    ];
    let mut totals: Vec<Totals> = ways.iter().map(|_| Totals::default()).collect();
    // Warm-up: connections open, the routers' tokenizers fetched, the second router linked.
    let warm = StoredResponsesArgs {
        conversations: args.concurrency,
        ..args.clone()
    };
    for way in ways {
        run_way(&client, &bases, way, &warm).await?;
    }
    // The mirrored replica found its standby (a replica looks for one every few seconds).
    let deadline = Instant::now() + Duration::from_secs(30);
    while gauge(&client, &bases[3], "switchyard_router_standby_responses").await? == 0.0 {
        if Instant::now() > deadline {
            bail!("the mirrored replica found no standby in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for round in 0..args.rounds {
        let mut prompts: Option<PromptSizes> = None;
        for k in 0..ways.len() {
            let i = (round + k) % ways.len();
            let cpu_before = process_cpu()?;
            let (turns, sizes, wall) = run_way(&client, &bases, ways[i], &args).await?;
            let t = &mut totals[i];
            t.cpu += process_cpu()? - cpu_before;
            t.wall += wall;
            t.turns += turns.len();
            t.sent_bytes += turns.iter().map(|x| x.sent_bytes).sum::<usize>();
            t.latency
                .extend(turns.iter().map(|x| x.latency.as_micros() as u64));
            match &prompts {
                None => prompts = Some(sizes),
                Some(expected) if *expected != sizes => bail!(
                    "the {} turns' prompts differ from the other ways': a stored conversation \
                     was not the one sent inline",
                    ways[i].name()
                ),
                Some(_) => {}
            }
        }
    }
    let mut stored = Vec::new();
    for base in &bases {
        stored.push(gauge(&client, base, "switchyard_router_stored_response_bytes").await?);
    }
    let conversations = gauge(&client, &bases[0], "switchyard_router_stored_conversations").await?;
    let kept = gauge(&client, &bases[2], "switchyard_router_stored_responses").await?;
    let standby = gauge(&client, &bases[3], "switchyard_router_standby_responses").await?;
    let journal = std::fs::metadata(state.path().join("journal.pb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let journaled_kept = gauge(
        &client,
        &bases[4],
        "switchyard_router_stored_response_bytes",
    )
    .await?;
    // Each journaling router's syncs: how many, and their mean time.
    let mut syncs = Vec::new();
    for base in &bases[4..] {
        let count = gauge(
            &client,
            base,
            "switchyard_router_journal_sync_seconds_count",
        )
        .await?;
        let sum = gauge(&client, base, "switchyard_router_journal_sync_seconds_sum").await?;
        syncs.push((count, if count > 0.0 { sum / count } else { 0.0 }));
    }
    plain.stop().await;
    mirrored.stop().await;
    journaled.stop().await;
    synced.stop().await;

    println!(
        "Stored responses: {} conversations × {} turns per way and round ({}-word messages, {} \
         tokens per answer), {} rounds, {} conversations at once (unpaced synthetic engine, two \
         routers, loopback)",
        args.conversations,
        args.turns,
        args.message_words,
        args.max_tokens,
        args.rounds,
        args.concurrency
    );
    println!(
        "{:>14} {:>8} {:>9} {:>9} {:>10} {:>8} {:>9}",
        "way", "turns/s", "p50", "p99", "sent/turn", "cpu/turn", "vs inline"
    );
    let rate = |t: &Totals| t.turns as f64 / t.wall.as_secs_f64();
    let inline_rate = rate(&totals[0]);
    for (way, t) in ways.iter().zip(&totals) {
        println!(
            "{:>14} {:>8.0} {:>7.2}ms {:>7.2}ms {:>8.1}KB {:>6.0}µs {:>8.2}×",
            way.name(),
            rate(t),
            quantile_ms(&t.latency, 0.5)?,
            quantile_ms(&t.latency, 0.99)?,
            t.sent_bytes as f64 / t.turns as f64 / 1024.0,
            t.cpu.as_micros() as f64 / t.turns as f64,
            rate(t) / inline_rate,
        );
    }
    println!(
        "the mirrored replica keeps {kept} responses, its standby a copy of {standby} \
         (switchyard_router_standby_responses); the first replica {conversations} conversations"
    );
    let mib = |bytes: f64| bytes / f64::from(1 << 20);
    println!(
        "stores hold {:.1} MiB and {:.1} MiB; the mirrored pair's {:.1} MiB and {:.1} MiB \
         (switchyard_router_stored_response_bytes)",
        mib(stored[0]),
        mib(stored[1]),
        mib(stored[2]),
        mib(stored[3])
    );
    println!(
        "the journaling router's store holds {:.1} MiB, its journal on disk {:.1} MiB",
        mib(journaled_kept),
        mib(journal as f64)
    );
    println!(
        "journal syncs (switchyard_router_journal_sync_seconds): {:.0} at most 1 s apart, \
         {:.2} ms each on average; {:.0} after each write, {:.2} ms each",
        syncs[0].0,
        syncs[0].1 * 1e3,
        syncs[1].0,
        syncs[1].1 * 1e3
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_way_sends_the_same_conversations() {
        run(StoredResponsesArgs {
            conversations: 4,
            turns: 3,
            concurrency: 2,
            max_tokens: 8,
            message_words: 20,
            rounds: 1,
        })
        .await
        .expect("every way runs every conversation with the same prompts");
    }
}
