//! `switchyard-bench multiturn` against a real router's OpenAI-compatible HTTP API (two workers
//! serving the synthetic load-test engine, in-process on loopback ports, in-memory registry).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_bench::multiturn::{self, MultiturnArgs};
use switchyard_cluster::{MemoryRegistry, Pool, Registry};
use switchyard_router::RouterConfig;
use switchyard_worker::{SyntheticConfig, SyntheticEngine, WorkerConfig};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "synthetic";

/// Starts two synthetic workers and a router with HTTP; returns the HTTP address once the
/// router lists the model (its workers are linked).
async fn cluster(shutdown: &CancellationToken) -> anyhow::Result<std::net::SocketAddr> {
    let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
    for i in 0..2 {
        let engine = SyntheticEngine::checked(SyntheticConfig {
            models: vec![MODEL.into()],
            ttft: Duration::from_millis(5),
            tokens_per_s: 2000.0,
            max_concurrent: 8,
            max_queue: 8,
            prefill_tokens_per_s: 1e6,
        })
        .map_err(anyhow::Error::msg)?;
        let config = WorkerConfig::loopback(format!("multiturn-worker-{i}"), Pool::Gpu);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(switchyard_worker::run_worker(
            config,
            Arc::new(engine),
            registry.clone(),
            shutdown.clone(),
            |a| {
                let _ = tx.send(a);
            },
        ));
        rx.await.context("worker stopped before serving")?;
    }
    let config = RouterConfig {
        listen: "127.0.0.1:0".parse()?,
        http_listen: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    let (tx, rx) = oneshot::channel();
    tokio::spawn(switchyard_router::run_router_with_endpoints(
        config,
        registry,
        shutdown.clone(),
        |e| {
            let _ = tx.send(e);
        },
    ));
    let endpoints = rx.await.context("router stopped before serving")?;
    let http = endpoints.http.context("router has no http endpoint")?;
    // Ready when the router routes to both workers (so the run can spread over them).
    let router = format!("http://{}", endpoints.grpc);
    switchyard_tests::wait_until(
        Duration::from_secs(10),
        "the router to link both workers",
        || {
            let router = router.clone();
            async move {
                switchyard_tests::list_router_workers(&router)
                    .await
                    .is_ok_and(|workers| workers.len() == 2)
            }
        },
    )
    .await?;
    Ok(http)
}

fn args(http: std::net::SocketAddr) -> MultiturnArgs {
    MultiturnArgs {
        url: format!("http://{http}/v1"),
        model: MODEL.into(),
        conversations: 3,
        turns: 3,
        concurrency: Some(2),
        max_tokens: 8,
        seed: 5,
        system_prompt_file: None,
        metrics_urls: vec![format!("http://{http}/metrics")],
        headers: vec![("x-switchyard-class".into(), "cost-sensitive".into())],
        api_key: None,
        send_user: true,
        warmup: 1,
        request_timeout: Duration::from_secs(30),
        label: "test".into(),
        json: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiturn_through_the_router() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let http = cluster(&shutdown).await?;
    let report = multiturn::measure(&args(http)).await?;

    assert_eq!(report.requests, 9);
    assert_eq!(report.per_turn.len(), 3);
    for turn in &report.per_turn {
        assert_eq!(turn.requests, 3, "turn {}", turn.turn);
        assert!(turn.ttft_p50_ms > 0.0 && turn.ttft_p90_ms >= turn.ttft_p50_ms);
    }
    // The synthetic engine generates exactly max_tokens; usage says so.
    assert_eq!(report.completion_tokens, 9 * 8);
    assert!(report.tokens_per_s > 0.0);
    // Each turn resends the whole history, so prompts grow turn by turn.
    let prompt = |t: usize| {
        report.per_turn[t]
            .prompt_tokens_mean
            .expect("usage.prompt_tokens")
    };
    assert!(
        prompt(0) < prompt(1) && prompt(1) < prompt(2),
        "{:?}",
        report.per_turn
    );
    // Hit rates are fractions when the server reports them.
    for rate in [report.prefix_hit_rate, report.engine_prefix_hit_rate]
        .into_iter()
        .flatten()
    {
        assert!((0.0..=1.0).contains(&rate), "{rate}");
    }
    // The router names the worker of every request; `user` is the affinity key, so a
    // conversation stays on its worker.
    assert_eq!(report.workers.values().sum::<usize>(), 9);
    assert_eq!(report.same_worker_share, Some(1.0));
    let table = multiturn::render(&report);
    assert!(table.contains("turns >= 2: TTFT p50"), "{table}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_fails_the_run_with_the_servers_answer() -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let http = cluster(&shutdown).await?;
    let mut bad = args(http);
    bad.model = "no-such-model".into();
    bad.warmup = 0;
    let err = multiturn::measure(&bad).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("404") && text.contains("no-such-model"),
        "{text}"
    );
    Ok(())
}
