//! The control plane against real etcd and real worker processes: drains through `Admin`
//! (routers stop placing on the worker, its in-flight request completes, undrain brings it
//! back), the event watch, leader failover between two replicas, and the ops dashboard in a
//! real headless Chromium.

use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard::client::{Completion, SessionClient};
use switchyard_proto::v1::{
    self, FinishReason, RequestClass, admin_client::AdminClient, cluster_event::Kind,
};
use switchyard_tests::browser::Browser;
use switchyard_tests::{Cluster, ClusterSpec, start_control_plane, wait_until};
use switchyard_worker::synthetic::synthetic_text;
use tonic::transport::Channel;

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

async fn admin(addr: std::net::SocketAddr) -> anyhow::Result<AdminClient<Channel>> {
    let channel = switchyard::client::connect_channel(&addr.to_string()).await?;
    Ok(AdminClient::new(channel))
}

async fn worker_state(admin: &AdminClient<Channel>, id: &str) -> Option<String> {
    let workers = admin
        .clone()
        .list_workers(v1::ListWorkersRequest::default())
        .await
        .ok()?
        .into_inner()
        .workers;
    workers.into_iter().find(|w| w.id == id).map(|w| w.state)
}

fn drain(id: &str) -> v1::DrainRequest {
    v1::DrainRequest {
        worker_id: id.into(),
    }
}

/// Next event of `kind` for `worker` on the watch stream.
async fn next_event(
    events: &mut tonic::Streaming<v1::ClusterEvent>,
    kind: Kind,
    worker: &str,
) -> anyhow::Result<v1::ClusterEvent> {
    tokio::time::timeout(PATIENCE, first_event(events, kind, worker)).await?
}

async fn first_event(
    events: &mut tonic::Streaming<v1::ClusterEvent>,
    kind: Kind,
    worker: &str,
) -> anyhow::Result<v1::ClusterEvent> {
    while let Some(event) = events.message().await? {
        if event.kind() == kind && event.worker_id == worker {
            return Ok(event);
        }
    }
    anyhow::bail!("event stream ended before {kind:?} for {worker}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_placements_lets_in_flight_work_finish_and_undrain_restores()
-> anyhow::Result<()> {
    // 30 tokens/s: a 90-token request stays in flight ~3 s, long enough to drain under it.
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        gpu_flags: vec!["--synthetic-tokens-per-s".into(), "30".into()],
        ..Default::default()
    })
    .await?;
    let mut admin = admin(cluster.control_plane.addr("grpc")).await?;
    let mut events = admin
        .watch_events(v1::WatchEventsRequest {})
        .await?
        .into_inner();

    // Bad requests are refused with the right status.
    let err = admin.drain(drain("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = admin.drain(drain("gpu-9")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert!(err.message().contains("gpu-9"), "{}", err.message());

    // A long request in flight on one worker.
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let long = synthetic_request("in-flight", "finish me after the drain", 90);
    let mut stream = session.start(long)?;
    let mut completion = Completion::default();
    while completion.token_ids.len() < 3 {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let busy = completion
        .accepted
        .as_ref()
        .expect("accepted")
        .worker_id
        .clone();
    let other = if busy == "gpu-0" { "gpu-1" } else { "gpu-0" };

    let drained = admin.drain(drain(&busy)).await?.into_inner();
    assert!(!drained.already_draining);
    let event = next_event(&mut events, Kind::WorkerDraining, &busy).await?;
    let busy_component = cluster.gpu.iter().find(|c| c.name == busy).expect("ours");
    let line = busy_component
        .wait_for_log("drain requested by the control plane", PATIENCE)
        .await?;
    assert!(
        line.contains("in_flight=1"),
        "the request finished before the drain took effect: {line}"
    );
    assert_eq!(event.pool, "gpu");
    assert_eq!(
        worker_state(&admin, &busy).await.as_deref(),
        Some("draining")
    );
    wait_until(
        PATIENCE,
        "the router to stop routing to the drained worker",
        || async {
            cluster
                .router_worker_ids()
                .await
                .is_ok_and(|ids| ids == vec![other.to_string()])
        },
    )
    .await?;

    // The in-flight request finishes on the drained worker, whole.
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    let finished = completion
        .finished
        .as_ref()
        .unwrap_or_else(|| panic!("in-flight request failed: {:?}", completion.failed));
    assert_eq!(finished.reason, FinishReason::Length as i32);
    assert_eq!(
        completion.text,
        synthetic_text("finish me after the drain", 0, 90)
    );
    busy_component
        .wait_for_log("drained: no generations in flight", PATIENCE)
        .await?;

    // New work goes elsewhere.
    for i in 0..4 {
        let done = session
            .start(synthetic_request(&format!("after-{i}"), "new work", 2))?
            .collect()
            .await;
        let accepted = done.accepted.expect("accepted");
        assert_eq!(accepted.worker_id, other, "placed on a drained worker");
    }
    let stats = admin
        .get_cluster_stats(v1::GetClusterStatsRequest {})
        .await?
        .into_inner();
    let gpu = stats.pools.iter().find(|p| p.pool == "gpu").expect("gpu");
    assert_eq!((gpu.workers, gpu.ready, gpu.draining), (2, 1, 1));
    assert_eq!(stats.drains, vec![busy.clone()]);
    assert_eq!(stats.leader, "control-plane-0");

    // Undrain: ready again, routed to again.
    let undrained = admin
        .undrain(v1::UndrainRequest {
            worker_id: busy.clone(),
        })
        .await?
        .into_inner();
    assert!(undrained.was_draining);
    next_event(&mut events, Kind::WorkerReady, &busy).await?;
    // The undrained worker is routed to again.
    cluster.wait_for_router_workers(2, PATIENCE).await?;
    assert_eq!(worker_state(&admin, &busy).await.as_deref(), Some("ready"));
    let err = admin
        .undrain(v1::UndrainRequest {
            worker_id: "gpu-9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    Ok(())
}

fn synthetic_request(id: &str, content: &str, max_tokens: u32) -> v1::GenerateRequest {
    switchyard_tests::synthetic_request(id, RequestClass::CostSensitive, content, max_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_the_other_replica_when_the_leader_dies() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    // The harness's replica (control-plane-0) started first and leads; a second one follows.
    cluster
        .control_plane
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let follower = start_control_plane(
        &cluster.etcd.url,
        "control-plane-1",
        &["--leader-ttl", "2s"],
    )
    .await?;
    follower
        .wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    let mut follower_admin = admin(follower.addr("grpc")).await?;

    // Reads work on the follower; writes are refused with the leader's name.
    let stats = follower_admin
        .get_cluster_stats(v1::GetClusterStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(stats.leader, "control-plane-0");
    assert_eq!(stats.workers, 1);
    let err = follower_admin.drain(drain("gpu-0")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("control-plane-0")
            && err
                .message()
                .contains(&cluster.control_plane.addr("grpc").to_string()),
        "{}",
        err.message()
    );
    let err = follower_admin
        .set_policy(v1::SetPolicyRequest {
            document: "{}".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    // The leader dies without resigning: the follower takes over once its lease expires
    // (the harness's replica uses the default 5 s TTL).
    let killed = Instant::now();
    cluster.control_plane.kill().await?;
    follower
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let took = killed.elapsed();
    eprintln!("leadership moved {took:?} after the leader was killed");
    assert!(took < Duration::from_secs(15), "failover took {took:?}");

    let done = follower_admin.drain(drain("gpu-0")).await?.into_inner();
    assert!(!done.already_draining);
    let stats = follower_admin
        .get_cluster_stats(v1::GetClusterStatsRequest {})
        .await?
        .into_inner();
    assert_eq!(stats.leader, "control-plane-1");
    wait_until(PATIENCE, "gpu-0 to advertise draining", || async {
        worker_state(&follower_admin, "gpu-0").await.as_deref() == Some("draining")
    })
    .await?;
    Ok(())
}

/// Worker ids in the dashboard's worker table, in page order.
async fn page_worker_ids(browser: &Browser) -> anyhow::Result<Vec<String>> {
    let ids = browser
        .execute(
            "return [...document.querySelectorAll('#workers tbody tr')].map(r => r.dataset.workerId);",
            vec![],
        )
        .await?;
    Ok(serde_json::from_value(ids)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser_lists_workers_and_drains_on_click() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec::default()).await?;
    let http = cluster.control_plane.addr("http");
    let admin = admin(cluster.control_plane.addr("grpc")).await?;

    // The JSON API answers with clear codes.
    let client = reqwest::Client::new();
    let missing = client
        .post(format!("http://{http}/api/workers/gpu-9/drain"))
        .header("content-type", "application/json")
        .header("x-switchyard-csrf", "1")
        .send()
        .await?;
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
    let body: Value = missing.json().await?;
    assert!(
        body["error"].as_str().unwrap_or_default().contains("gpu-9"),
        "{body}"
    );
    let workers: Value = client
        .get(format!("http://{http}/api/workers"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(3),
        "{workers}"
    );

    let browser = Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    wait_until(
        PATIENCE,
        "the page to list the three live workers",
        || async {
            page_worker_ids(&browser)
                .await
                .is_ok_and(|ids| ids == ["gpu-0", "gpu-1", "wse-0"])
        },
    )
    .await?;
    assert!(browser.text("#replica").await?.contains("leader"));
    assert!(browser.text("#policy").await?.contains("default_lane"));
    assert_eq!(
        browser
            .text("tr[data-worker-id='gpu-1'] td:nth-child(5)")
            .await?,
        "ready"
    );

    browser
        .click("tr[data-worker-id='gpu-1'] button.drain")
        .await?;
    wait_until(PATIENCE, "gpu-1 to advertise draining", || async {
        worker_state(&admin, "gpu-1").await.as_deref() == Some("draining")
    })
    .await?;
    wait_until(PATIENCE, "the page to show gpu-1 draining", || async {
        browser
            .text("tr[data-worker-id='gpu-1'] td:nth-child(5)")
            .await
            .is_ok_and(|t| t == "draining")
    })
    .await?;
    assert!(browser.text("#notice").await?.contains("gpu-1"));
    // The events list is fed by its own stream; it may show the change a poll later.
    wait_until(PATIENCE, "the events list to show the drain", || async {
        browser
            .text("#events")
            .await
            .is_ok_and(|t| t.contains("gpu-1 (gpu) is draining"))
    })
    .await?;
    std::fs::write(
        switchyard_tests::log_dir().join("dashboard.png"),
        browser.screenshot().await?,
    )?;

    // A follower's dashboard refuses the click and says who the leader is.
    let follower = start_control_plane(&cluster.etcd.url, "control-plane-1", &[]).await?;
    follower
        .wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    browser
        .goto(&format!("http://{}/", follower.addr("http")))
        .await?;
    wait_until(
        PATIENCE,
        "the follower page to list the workers",
        || async {
            page_worker_ids(&browser)
                .await
                .is_ok_and(|ids| ids.len() == 3)
        },
    )
    .await?;
    browser
        .click("tr[data-worker-id='gpu-0'] button.drain")
        .await?;
    wait_until(
        PATIENCE,
        "the page to show why the drain failed",
        || async {
            browser.text("#error").await.is_ok_and(|t| {
                t.contains("HTTP 409") && t.contains("follower") && t.contains("control-plane-0")
            })
        },
    )
    .await?;
    assert_eq!(
        worker_state(&admin, "gpu-0").await.as_deref(),
        Some("ready")
    );
    browser.close().await?;
    Ok(())
}
