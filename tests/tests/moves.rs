//! Moving generations and hedging across real processes: etcd, a router, a control plane and
//! synthetic-engine workers, each its own process. The policy is set through the control
//! plane, as an operator would.
//!
//! - A latency-critical request that finds the wafer held by a borrowed cost-sensitive
//!   generation takes the slot; the borrower continues on a GPU with exactly the text an
//!   unmoved run gives.
//! - A hedged request is answered by the live copy when a worker hangs; the hung copy ends
//!   without a token.
//! - Over 1 000 requests, hedges never cost more than the budget, and the router's count of
//!   them is what the workers really ran.

use std::time::Duration;

use switchyard_client::{Completion, SessionClient};
use switchyard_proto::v1::{RequestClass, server_frame::Frame};
use switchyard_tests::{
    Cluster, ClusterSpec, Component, start_gpu_worker, strings, synthetic_request,
};
use switchyard_worker::synthetic::synthetic_text;

const PATIENCE: Duration = Duration::from_secs(30);

/// Reads `stream` until its `Accepted` frame and `n` tokens have come.
async fn until_tokens(
    stream: &mut switchyard_client::RequestStream,
    seen: &mut Completion,
    n: usize,
) -> anyhow::Result<()> {
    tokio::time::timeout(PATIENCE, async {
        while seen.token_ids.len() < n {
            let frame = stream
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("ended early: {seen:?}"))?;
            if let Frame::Failed(failed) = &frame {
                anyhow::bail!("failed: {failed:?}");
            }
            seen.absorb(frame);
        }
        Ok(())
    })
    .await?
}

/// Reads `stream` to its end.
async fn to_end(
    mut stream: switchyard_client::RequestStream,
    mut seen: Completion,
) -> anyhow::Result<Completion> {
    tokio::time::timeout(PATIENCE, async {
        while let Some(frame) = stream.next().await {
            seen.absorb(frame);
        }
    })
    .await?;
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_critical_request_takes_the_wafer_from_a_borrower_which_moves_on_unbroken()
-> anyhow::Result<()> {
    // One GPU slot and one wafer slot, decoding slowly enough that generations overlap.
    let one_slot = strings(&["--max-concurrent", "1", "--synthetic-tokens-per-s", "40"]);
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        gpu_flags: one_slot.clone(),
        wse_flags: one_slot,
        ..Default::default()
    })
    .await?;
    // Latency-critical work waits for the wafer rather than spilling: only taking the slot
    // back serves it.
    cluster
        .set_policy(
            &serde_json::json!({
            "latency_critical": {"spill": false},
            "migration": {"enabled": true, "preempt_borrowed_wse": true, "rebalance": false,
                          "drain_handoff": false, "max_moves_per_generation": 1},
            }),
            PATIENCE,
        )
        .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let cost_sensitive = RequestClass::CostSensitive;

    // The GPU is busy...
    let mut holder = session.start(synthetic_request(
        "holder",
        cost_sensitive,
        "one two three",
        2_000,
    ))?;
    let mut held = Completion::default();
    until_tokens(&mut holder, &mut held, 1).await?;
    assert_eq!(held.accepted.as_ref().map(|a| a.pool.as_str()), Some("gpu"));
    // ...so a cost-sensitive generation borrows the idle wafer slot.
    let story = "alpha beta gamma delta epsilon";
    let mut borrower = session.start(synthetic_request("borrower", cost_sensitive, story, 200))?;
    let mut borrowed = Completion::default();
    until_tokens(&mut borrower, &mut borrowed, 3).await?;
    let accepted = borrowed.accepted.clone().expect("accepted");
    assert_eq!(accepted.pool, "wse", "{accepted:?}");
    // The GPU frees up; latency-critical work arrives while the wafer is busy.
    session.cancel("holder")?;
    let held = to_end(holder, held).await?;
    assert!(held.finished.is_some(), "{held:?}");
    let urgent = session.start(synthetic_request(
        "urgent",
        RequestClass::LatencyCritical,
        "answer now please",
        5,
    ))?;

    let urgent = to_end(urgent, Completion::default()).await?;
    assert!(urgent.finished.is_some(), "{urgent:?}");
    assert_eq!(
        urgent.accepted.as_ref().map(|a| a.pool.as_str()),
        Some("wse")
    );
    assert_eq!(urgent.text, synthetic_text("answer now please", 0, 5));

    let borrowed = to_end(borrower, borrowed).await?;
    assert!(borrowed.finished.is_some(), "{borrowed:?}");
    // One continuous text, exactly what an unmoved run gives.
    assert_eq!(borrowed.text, synthetic_text(story, 0, 200));
    assert_eq!(borrowed.moved.len(), 1, "{borrowed:?}");
    let moved = &borrowed.moved[0];
    assert_eq!(
        (
            moved.from_pool.as_str(),
            moved.to_pool.as_str(),
            moved.reason.as_str()
        ),
        ("wse", "gpu", "preempt")
    );
    Ok(())
}

/// `worker-gpu` `id` joining `cluster` with its first token `ttft` after a start.
async fn gpu_worker(cluster: &Cluster, id: &str, ttft: &str) -> anyhow::Result<Component> {
    let flags = [
        "--lease-ttl",
        "2s",
        "--synthetic-ttft",
        ttft,
        "--max-concurrent",
        "64",
        "--synthetic-tokens-per-s",
        "1000",
    ];
    start_gpu_worker(&cluster.etcd.url, id, &flags, 1).await
}

fn hedging(budget_fraction: f64) -> serde_json::Value {
    serde_json::json!({
        "hedging": {"enabled": true, "slo_margin": 0.01, "same_pool": true,
                    "budget_fraction": budget_fraction},
    })
}

/// A worker that hangs (frozen with SIGSTOP: its connection stays up, its last load report
/// looks healthy) does not hold up a hedged request: the copy on the live worker answers, and
/// the frozen worker's copy ends without a token as soon as it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_request_is_answered_by_the_live_copy_when_a_worker_hangs() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let hung = gpu_worker(&cluster, "hung", "20ms").await?;
    let _live = gpu_worker(&cluster, "live", "20ms").await?;
    cluster.wait_for_router_workers(2, PATIENCE).await?;
    cluster.set_policy(&hedging(1.0), PATIENCE).await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    hung.pause()?;

    let request = synthetic_request("r", RequestClass::LatencyCritical, "quick brown fox", 5);
    let done = tokio::time::timeout(PATIENCE, session.start(request)?.collect()).await?;
    hung.resume()?;
    assert!(done.finished.is_some(), "{done:?}");
    assert_eq!(done.text, synthetic_text("quick brown fox", 0, 5));
    let accepted = done.accepted.expect("accepted");
    assert_eq!(accepted.worker_id, "live", "{accepted:?}");
    assert!(accepted.reason.contains("hedged on"), "{accepted:?}");
    // The hung worker's copy was cancelled: it ends without a token once it runs again.
    let ended = hung.wait_for_log("generation ended", PATIENCE).await?;
    assert!(ended.contains("tokens=0"), "{ended}");
    Ok(())
}

fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn generations_ended(worker: &Component) -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string(&worker.log)?
        .lines()
        .filter(|l| l.contains("generation ended"))
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_thousand_requests_hedges_stay_within_the_budget() -> anyhow::Result<()> {
    const REQUESTS: usize = 1_000;
    const IN_FLIGHT: usize = 50;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 0,
        metrics: true,
        ..Default::default()
    })
    .await?;
    let workers = [
        gpu_worker(&cluster, "gpu-a", "20ms").await?,
        gpu_worker(&cluster, "gpu-b", "20ms").await?,
    ];
    cluster.wait_for_router_workers(2, PATIENCE).await?;
    cluster.set_policy(&hedging(0.05), PATIENCE).await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;

    // Prompts of one length: every hedge costs the same prefill.
    for wave in 0..REQUESTS / IN_FLIGHT {
        let streams: Vec<_> = (0..IN_FLIGHT)
            .map(|i| {
                let n = wave * IN_FLIGHT + i;
                let request = synthetic_request(
                    &format!("q{n}"),
                    RequestClass::LatencyCritical,
                    &format!("question {n:04}"),
                    1,
                );
                session.start(request)
            })
            .collect::<Result<_, _>>()?;
        for stream in streams {
            let done = stream.collect().await;
            assert!(done.finished.is_some(), "{done:?}");
        }
    }

    let metrics = reqwest::get(cluster.router.metrics_url())
        .await?
        .text()
        .await?;
    let hedges = metric_sum(&metrics, "switchyard_router_hedges_total", "lane=");
    let spent = metric_sum(&metrics, "switchyard_router_hedge_budget_tokens", "spent");
    let allowed = metric_sum(&metrics, "switchyard_router_hedge_budget_tokens", "allowed");
    assert!(spent <= allowed, "spent {spent} of {allowed}");
    // Request n may be the k-th hedge only if k ≤ 5 % of n: at most 50 of 1 000; with a free
    // second worker for nearly every request, the budget is what limits them.
    assert!(
        (REQUESTS as f64 / 40.0..=REQUESTS as f64 / 20.0).contains(&hedges),
        "{hedges} hedges"
    );
    // What the workers ran: every request once, plus one copy per hedge. The router reports a
    // request done before its loser's end is logged, so wait for the count.
    let expected = REQUESTS + hedges as usize;
    switchyard_tests::wait_until(PATIENCE, "every copy to end on its worker", || {
        let ended: usize = workers
            .iter()
            .map(|w| generations_ended(w).unwrap_or(0))
            .sum();
        async move { ended == expected }
    })
    .await?;
    Ok(())
}
