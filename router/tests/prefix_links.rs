//! Workers publish their prefix caches to routers over real `Worker.Serve` streams (in-process
//! workers on loopback, the synthetic engine's simulated cache): a router's prefix index follows
//! what a worker caches, a router that connects later rebuilds it from the worker's snapshot,
//! and a worker that stops is forgotten.

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard_cluster::{MemoryRegistry, Pool, Registry};
use switchyard_proto::v1::{self, worker_frame};
use switchyard_router::links::{LinkEvent, Links};
use switchyard_worker::synthetic::SimulatedCacheConfig;
use switchyard_worker::{SyntheticConfig, SyntheticEngine, WorkerConfig};
use tokio_util::sync::CancellationToken;

const BLOCK: u32 = 16;
const PATIENCE: Duration = Duration::from_secs(10);

/// Starts a worker serving the synthetic engine with a simulated prefix cache; returns its
/// shutdown token once it is registered.
async fn start_worker(registry: Arc<dyn Registry>, id: &str) -> CancellationToken {
    let engine = SyntheticEngine::new(SyntheticConfig {
        ttft: Duration::from_millis(1),
        tokens_per_s: 1000.0,
        ..Default::default()
    })
    .with_simulated_cache(SimulatedCacheConfig {
        capacity_blocks: 64,
        block_tokens: BLOCK,
    })
    .expect("a valid cache");
    let config = WorkerConfig {
        lease_ttl: Duration::from_secs(5),
        ..WorkerConfig::loopback(id, Pool::Gpu)
    };
    let shutdown = CancellationToken::new();
    let (ready, registered) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        switchyard_worker::run_worker(config, Arc::new(engine), registry, stop, |_| {
            let _ = ready.send(());
        })
        .await
        .expect("the worker runs");
    });
    registered.await.expect("the worker registered");
    shutdown
}

/// Polls `check` until it holds (the index follows frames asynchronously).
async fn eventually(what: &str, check: impl Fn() -> bool) {
    common::eventually(what, PATIENCE, || std::future::ready(check())).await
}

fn cached(links: &Links, prompt: &[u32]) -> Vec<(String, u32)> {
    links
        .prefix_lookup(prompt)
        .into_iter()
        .map(|h| (h.worker.to_string(), h.cached_tokens))
        .collect()
}

/// Runs `prompt` (as router token ids) on `worker` and returns the cached prompt tokens the
/// worker reported.
async fn generate(links: &Links, worker: &str, request_id: &str, prompt: &[u32]) -> u32 {
    let link = links.get(worker).expect("a link to the worker");
    eventually("the link is up", || link.state().available).await;
    let mut events = link
        .start(v1::WorkerStart {
            request_id: request_id.into(),
            model: "synthetic".into(),
            prompt: "unused: the ids are the prompt".into(),
            prompt_token_ids: prompt.to_vec(),
            sampling: Some(v1::SamplingParams {
                max_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("started");
    loop {
        match tokio::time::timeout(PATIENCE, events.recv()).await {
            Ok(Some(LinkEvent::Frame(worker_frame::Frame::Finished(f)))) => {
                return f.usage.expect("usage").cached_prompt_tokens;
            }
            Ok(Some(LinkEvent::Frame(worker_frame::Frame::Failed(f)))) => {
                panic!("generation failed: {}", f.message)
            }
            Ok(Some(_)) => {}
            other => panic!("generation did not finish: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_index_follows_workers_and_a_new_router_rebuilds_it_from_snapshots() {
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    let stop_a = start_worker(registry.clone(), "gpu-a").await;
    let _stop_b = start_worker(registry.clone(), "gpu-b").await;
    let shutdown = CancellationToken::new();
    let router = Links::spawn(
        registry.watch_workers().await.unwrap(),
        Duration::from_secs(2),
        shutdown.clone(),
    );
    // 4 full blocks and a partial one.
    let prompt: Vec<u32> = (100..100 + 4 * BLOCK + 5).collect();
    assert!(cached(&router, &prompt).is_empty());

    assert_eq!(generate(&router, "gpu-a", "g1", &prompt).await, 0);
    eventually("gpu-a's blocks reach the router", || {
        cached(&router, &prompt) == vec![("gpu-a".into(), 4 * BLOCK)]
    })
    .await;
    // The worker reuses what the router predicted.
    assert_eq!(generate(&router, "gpu-a", "g2", &prompt).await, 4 * BLOCK);
    // gpu-b, asked for a longer prompt sharing two blocks of it, caches those too.
    let mut other = prompt[..2 * BLOCK as usize].to_vec();
    other.extend(900..900 + 2 * BLOCK);
    assert_eq!(generate(&router, "gpu-b", "g3", &other).await, 0);
    eventually("both workers are known", || {
        cached(&router, &prompt) == vec![("gpu-a".into(), 4 * BLOCK), ("gpu-b".into(), 2 * BLOCK)]
    })
    .await;
    assert!(
        router
            .view()
            .workers()
            .iter()
            .all(|w| w.prefix_cache && w.available),
        "both links say their workers publish KV"
    );

    // A router that connects now (or reconnects) learns it all from the snapshots.
    let second = Links::spawn(
        registry.watch_workers().await.unwrap(),
        Duration::from_secs(2),
        shutdown.clone(),
    );
    eventually("the new router rebuilt its index", || {
        cached(&second, &prompt) == vec![("gpu-a".into(), 4 * BLOCK), ("gpu-b".into(), 2 * BLOCK)]
    })
    .await;
    assert_eq!(second.prefix_stats().entries, router.prefix_stats().entries);

    // A worker that stops is forgotten by every router.
    stop_a.cancel();
    for links in [&router, &second] {
        eventually("gpu-a is forgotten", || {
            cached(links, &prompt) == vec![("gpu-b".into(), 2 * BLOCK)]
        })
        .await;
    }
    shutdown.cancel();
}
