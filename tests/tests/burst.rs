//! A burst of requests arriving together is spread over the workers that can take it. Every
//! component is its own process on a real etcd; the workers run the synthetic engine.
//!
//! Found from outside: 48 requests sent at once on one `Session` to three 16-slot workers
//! landed 43 / 4 / 1 — every load report from a worker reset the router's count of requests
//! sent to it but not yet seen by it, so the worker that reported last looked idle again.

use std::collections::HashMap;

use switchyard::client::SessionClient;
use switchyard_proto::v1::RequestClass;
use switchyard_tests::{Cluster, ClusterSpec};

const WORKERS: usize = 3;
const SLOTS: usize = 16;
const BURST: usize = WORKERS * SLOTS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_one_session_is_spread_over_the_workers() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: WORKERS,
        wse_workers: 0,
        gpu_flags: [
            "--max-concurrent",
            &SLOTS.to_string(),
            "--synthetic-ttft",
            "50ms",
        ]
        .map(String::from)
        .to_vec(),
        ..ClusterSpec::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    // All started before any is read: they reach the router together.
    let streams = (0..BURST)
        .map(|i| {
            session.start(switchyard_tests::synthetic_request(
                &format!("burst-{i}"),
                RequestClass::CostSensitive,
                "spread me over the pool",
                64,
            ))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let done = futures::future::join_all(streams.into_iter().map(|s| s.collect())).await;
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for completion in &done {
        assert!(completion.failed.is_none(), "{:?}", completion.failed);
        let accepted = completion.accepted.as_ref().expect("accepted");
        *per_worker.entry(accepted.worker_id.clone()).or_default() += 1;
    }
    // The pool has exactly BURST slots: an even spread fills each worker once; no worker may
    // be handed more than its slots while another has free ones.
    assert_eq!(per_worker.len(), WORKERS, "{per_worker:?}");
    let most = per_worker.values().max().copied().unwrap_or_default();
    assert!(most <= SLOTS, "{per_worker:?}");
    Ok(())
}
