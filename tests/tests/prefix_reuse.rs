//! Prefix reuse end to end on the real model, every component its own process over a real
//! etcd: two GPU workers run the native engine on SmolLM2 and publish their KV blocks; the
//! router tokenizes with the tokenizer the workers publish, so it names a request's blocks
//! exactly as the engine does. Turn 2 of a conversation lands on the worker that served turn 1,
//! which reuses exactly the tokens the router predicted (turn 1's prompt and the reply it
//! decoded), and both count it in their metrics; a router started afterwards (a router that
//! reconnects) rebuilds its index from the workers' snapshots and still finds the conversation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use switchyard_proto::v1::{
    self, ChatMessage, GenerateRequest, SamplingParams, inference_client::InferenceClient,
    server_frame::Frame,
};
use switchyard_tests::{Cluster, ClusterSpec, Component};

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
/// The engine's KV block size.
const BLOCK: u32 = 32;
const PATIENCE: Duration = Duration::from_secs(60);

/// What a finished request showed: its `Accepted`, its text and its usage.
struct Outcome {
    accepted: v1::Accepted,
    text: String,
    usage: v1::Usage,
}

async fn chat(router: &str, id: &str, messages: &[(&str, &str)]) -> anyhow::Result<Outcome> {
    let channel = switchyard_client::connect_channel(router).await?;
    let mut client = InferenceClient::new(channel);
    let request = GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        messages: messages
            .iter()
            .map(|(role, content)| ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
                ..Default::default()
            })
            .collect(),
        sampling: Some(SamplingParams {
            max_tokens: 24,
            temperature: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    let (mut accepted, mut text) = (None, String::new());
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Accepted(a)) => accepted = Some(a),
            Some(Frame::Tokens(t)) => text.push_str(&t.text),
            Some(Frame::Finished(f)) => {
                return Ok(Outcome {
                    accepted: accepted.context("Finished before Accepted")?,
                    text,
                    usage: f.usage.context("usage")?,
                });
            }
            Some(Frame::Failed(f)) => bail!("{id} failed: {} {}", f.code, f.message),
            Some(Frame::Moved(_)) | None => {}
            Some(Frame::Rejected(r)) => bail!("{id}: Generate sent a Rejected frame: {r:?}"),
        }
    }
    bail!("{id}: stream ended without Finished")
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
}

/// The value of the sample `series` (name and labels) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Waits until the router logged a KV snapshot of every GPU worker and fetched the model's
/// tokenizer (before that it cannot name a prompt's blocks).
async fn router_sees_every_cache(cluster: &Cluster) -> anyhow::Result<()> {
    let ready = || {
        let log = std::fs::read_to_string(&cluster.router.log).unwrap_or_default();
        let snapshots = cluster.gpu.iter().all(|w| {
            log.lines().any(|l| {
                l.contains("KV snapshot received") && l.contains(&format!("worker={} ", w.name))
            })
        });
        snapshots && log.lines().any(|l| l.contains("tokenizer fetched"))
    };
    switchyard_tests::wait_until(
        PATIENCE,
        "a KV snapshot from every worker and a tokenizer",
        || {
            let done = ready();
            async move { done }
        },
    )
    .await?;
    Ok(())
}

/// The number in `cached=N/` of an `Accepted.reason`.
fn predicted(reason: &str) -> Option<u32> {
    reason
        .split("cached=")
        .nth(1)?
        .split('/')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_turn_lands_where_its_prefix_is_cached_and_a_new_router_knows_it()
-> anyhow::Result<()> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../models/{MODEL}.gguf"));
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh",
        path.display()
    );
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        gpu_flags: [
            "--engine",
            "candle",
            "--model-path",
            &path.display().to_string(),
            "--max-concurrent",
            "4",
            "--kv-budget-bytes",
            "134217728",
        ]
        .map(String::from)
        .to_vec(),
        metrics: true,
        ..ClusterSpec::default()
    })
    .await?;
    router_sees_every_cache(&cluster).await?;

    let system = "You are a patient teacher of railway operations. Answer in two sentences, \
                  with one concrete example, and never use lists or headings.";
    let question = "How do switching engines sort freight cars onto classification tracks in a \
                    hump yard, and why does the yard use gravity for it?";
    let router = cluster.router_addr();
    let turn1 = chat(&router, "turn-1", &[("system", system), ("user", question)]).await?;
    assert_eq!(turn1.usage.cached_prompt_tokens, 0, "a cold cache");
    let first_worker = turn1.accepted.worker_id.clone();
    let prompt1 = turn1.usage.prompt_tokens;
    assert!(prompt1 >= 2 * BLOCK, "{prompt1} prompt tokens");

    let follow_up = "Which of those cars leave first?";
    let turn2 = chat(
        &router,
        "turn-2",
        &[
            ("system", system),
            ("user", question),
            ("assistant", &turn1.text),
            ("user", follow_up),
        ],
    )
    .await?;
    assert_eq!(
        turn2.accepted.worker_id, first_worker,
        "{:?}",
        turn2.accepted
    );
    let reused = turn2.usage.cached_prompt_tokens;
    // At least every full block of turn 1's prompt (the reply's blocks too, when the resent
    // reply tokenizes as it was generated).
    assert!(
        reused >= prompt1 / BLOCK * BLOCK,
        "reused {reused} of turn 1's {prompt1}"
    );
    assert_eq!(
        predicted(&turn2.accepted.reason),
        Some(reused),
        "the router predicted what the worker reused: {}",
        turn2.accepted.reason
    );

    // The worker counts the reuse and computes only the rest, and the router counts the reuse.
    let worker = cluster
        .gpu
        .iter()
        .find(|w| w.name == first_worker)
        .context("the worker that served turn 1")?;
    let expect_sample = move |url: String, series: &'static str, value: u32| async move {
        switchyard_tests::wait_until(PATIENCE, series, || {
            let url = url.clone();
            async move {
                let page = scrape(&url).await.unwrap_or_default();
                sample(&page, series) == Some(f64::from(value))
            }
        })
        .await
    };
    expect_sample(
        worker.metrics_url(),
        "switchyard_engine_prefix_hit_tokens_total{pool=\"gpu\"}",
        reused,
    )
    .await?;
    expect_sample(
        worker.metrics_url(),
        "switchyard_engine_prefill_tokens_total{pool=\"gpu\"}",
        prompt1 + turn2.usage.prompt_tokens - reused,
    )
    .await?;
    expect_sample(
        cluster.router.metrics_url(),
        "switchyard_router_prefix_reused_tokens_total{pool=\"gpu\"}",
        reused,
    )
    .await?;

    // A new router (as after a restart) learns the caches from the workers' snapshots.
    cluster.router.kill().await?;
    let args: Vec<String> = [
        "router",
        "--etcd",
        &cluster.etcd.url,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    cluster.router = Component::start("router-restarted", &args, 2).await?;
    cluster.wait_for_router_workers(2, PATIENCE).await?;
    router_sees_every_cache(&cluster).await?;
    let turn3 = chat(
        &cluster.router_addr(),
        "turn-3",
        &[
            ("system", system),
            ("user", question),
            ("assistant", &turn1.text),
            ("user", follow_up),
            ("assistant", &turn2.text),
            ("user", "Thanks."),
        ],
    )
    .await?;
    assert_eq!(
        turn3.accepted.worker_id, first_worker,
        "{:?}",
        turn3.accepted
    );
    assert!(
        turn3.usage.cached_prompt_tokens >= turn2.usage.prompt_tokens / BLOCK * BLOCK,
        "turn 3 reused {} of turn 2's {}",
        turn3.usage.cached_prompt_tokens,
        turn2.usage.prompt_tokens
    );
    assert_eq!(
        predicted(&turn3.accepted.reason),
        Some(turn3.usage.cached_prompt_tokens),
        "the new router predicted what the worker reused: {}",
        turn3.accepted.reason
    );
    Ok(())
}
