//! The control plane against real etcd and real worker processes: drains through `Admin`
//! (routers stop placing on the worker, its in-flight request completes, undrain brings it
//! back), the event watch, leader failover between two replicas, and the ops dashboard in a
//! real headless Chromium.

use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_client::{Completion, SessionClient};
use switchyard_proto::v1::{self, RequestClass, admin_client::AdminClient, cluster_event::Kind};
use switchyard_tests::browser::Browser;
use switchyard_tests::{
    Cluster, ClusterSpec, Component, assert_ran_to_length, poll_until, start_control_plane,
    wait_until,
};
use switchyard_worker::synthetic::synthetic_text;
use tonic::transport::Channel;

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

async fn admin(addr: std::net::SocketAddr) -> anyhow::Result<AdminClient<Channel>> {
    let channel = switchyard_client::connect_channel(&addr.to_string()).await?;
    Ok(AdminClient::new(channel))
}

/// A single etcd and one control plane on it, once it leads.
async fn leading_control_plane() -> anyhow::Result<(switchyard_tests::Etcd, Component)> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let plane = start_control_plane(&etcd.url, "control-plane-0", &[]).await?;
    plane
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    Ok((etcd, plane))
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
        .watch_events(v1::WatchEventsRequest::default())
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
    let expected = synthetic_text("finish me after the drain", 0, 90);
    assert_ran_to_length(&completion, &expected, "the in-flight request");
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
            merge: false,
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

/// A router whose report stream is to a leader that stops answering (SIGSTOP, past its lease)
/// follows the leader key to the new one, and its log says which is which: the line about the
/// move named the old leader as "the new one".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_names_the_new_leader_when_leadership_moves() -> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let old = start_control_plane(&etcd.url, "control-plane-0", &["--leader-ttl", "2s"]).await?;
    old.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let new = start_control_plane(&etcd.url, "control-plane-1", &["--leader-ttl", "2s"]).await?;
    new.wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    let router = switchyard_tests::start_router(&etcd.url, "router", &[]).await?;
    let (old_addr, new_addr) = (old.addr("grpc").to_string(), new.addr("grpc").to_string());
    router
        .wait_for_log(
            &format!("reporting to the control plane control_plane={old_addr}"),
            PATIENCE,
        )
        .await?;

    // The leader freezes with the router's stream open; its lease lapses and the other takes
    // over.
    old.pause()?;
    new.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    router
        .wait_for_log(
            &format!("reporting to the control plane control_plane={new_addr}"),
            PATIENCE,
        )
        .await?;
    old.resume()?;
    let log = std::fs::read_to_string(&router.log)?;
    let moved: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("control-plane leader"))
        .collect();
    assert!(!moved.is_empty(), "{log}");
    for line in moved {
        assert!(
            line.contains(&format!("previous={old_addr}"))
                && !line.contains(&format!("control_plane={old_addr}")),
            "{line}"
        );
    }
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

/// The dashboard counts how each front door answered, HTTP route by route and gRPC request by
/// request, in classes an on-call engineer reads at a glance (and leaves out the probes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_counts_each_front_doors_answers() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    cluster
        .router
        .wait_for_log("reporting to the control plane", PATIENCE)
        .await?;
    let http = reqwest::Client::new();
    let base = cluster.router_openai_url();
    let chat = |body: Value| {
        http.post(format!("{base}/chat/completions"))
            .json(&body)
            .send()
    };
    let message = serde_json::json!([{"role": "user", "content": "count me"}]);
    for _ in 0..2 {
        let ok =
            chat(serde_json::json!({"model": "synthetic", "messages": message, "max_tokens": 2}));
        assert_eq!(ok.await?.status(), 200);
    }
    let refused = chat(serde_json::json!({"messages": message})).await?;
    assert_eq!(refused.status(), 400);
    let completion = http
        .post(format!("{base}/completions"))
        .json(&serde_json::json!({"model": "synthetic", "prompt": "x", "max_tokens": 2}))
        .send()
        .await?;
    assert_eq!(completion.status(), 200);
    let lost = http.get(format!("{base}/nowhere")).send().await?;
    assert_eq!(lost.status(), 404);
    let health = http
        .get(format!("http://{}/health", cluster.router.addr("http")))
        .send()
        .await?;
    assert!(health.status().is_success());

    let mut inference = v1::inference_client::InferenceClient::new(
        switchyard_client::connect_channel(&cluster.router_addr()).await?,
    );
    let request = |id: &str, model: &str| {
        let mut request =
            switchyard_tests::synthetic_request(id, RequestClass::CostSensitive, "count me", 2);
        request.model = model.into();
        request
    };
    let mut frames = inference
        .generate(request("generate-ok", "synthetic"))
        .await?
        .into_inner();
    while frames.message().await?.is_some() {}
    let invalid = inference
        .generate(request("generate-bad", ""))
        .await
        .expect_err("no model");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    let session = SessionClient::connect(&cluster.router_addr()).await?;
    for i in 0..2 {
        let done = session
            .start(request(&format!("session-{i}"), "synthetic"))?
            .collect()
            .await;
        assert!(done.finished.is_some(), "{:?}", done.failed);
    }
    let done = session.start(request("session-bad", ""))?.collect().await;
    assert!(done.failed.is_some(), "no model: {done:?}");
    // Prometheus has the gRPC requests too, by the code each ended with.
    let metrics = http
        .get(format!("http://{}/metrics", cluster.router.addr("http")))
        .send()
        .await?
        .text()
        .await?;
    for (api, code, count) in [
        ("grpc_generate", "OK", 1),
        ("grpc_generate", "INVALID_ARGUMENT", 1),
        ("grpc_session", "OK", 2),
        ("grpc_session", "INVALID_ARGUMENT", 1),
    ] {
        let series = format!(
            "switchyard_router_grpc_requests_total{{api=\"{api}\",code=\"{code}\"}} {count}"
        );
        assert!(
            metrics.lines().any(|line| line == series),
            "{series} in\n{metrics}"
        );
    }

    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", cluster.control_plane.addr("http")))
        .await?;
    let expected = serde_json::json!({
        "chat_completions": {"ok": "2", "clientErrors": "1"},
        "completions": {"ok": "1", "clientErrors": "0"},
        "unknown": {"ok": "0", "clientErrors": "1"},
        "grpc_generate": {"ok": "1", "clientErrors": "1"},
        "grpc_session": {"ok": "2", "clientErrors": "1"},
    });
    let shown = || async {
        browser
            .execute(
                "return Object.fromEntries([...document.querySelectorAll('#apis tbody tr')]
                   .map(r => [r.dataset.api, {ok: r.dataset.ok, clientErrors: r.dataset.clientErrors}]));",
                vec![],
            )
            .await
            .unwrap_or_default()
    };
    let counted = wait_until(
        PATIENCE,
        "the front-door table to count every answer",
        || async { shown().await == expected },
    )
    .await;
    if let Err(error) = counted {
        anyhow::bail!("{error}: the table shows {}", shown().await);
    }
    let table = browser.text("#apis").await?;
    assert!(
        table.contains("POST /v1/chat/completions") && table.contains("gRPC Generate"),
        "{table}"
    );
    Ok(())
}

/// The routers as the page's Routers table shows them: address → (mirror, trouble, stored
/// responses, conversations, verdict).
async fn page_routers(browser: &Browser) -> Value {
    browser
        .execute(
            "return Object.fromEntries([...document.querySelectorAll('#routers tbody tr')]
               .map(r => [r.dataset.routerId.split('@')[1], {
                 mirror: r.dataset.mirror, state: r.children[5].textContent,
                 trouble: r.dataset.trouble,
                 responses: r.children[1].textContent, conversations: r.children[2].textContent,
                 background: r.children[7].textContent, batches: r.children[8].textContent,
                 verdict: r.children[9].textContent}]));",
            vec![],
        )
        .await
        .unwrap_or_default()
}

/// `n` bytes as the dashboard writes them: "812 B", "10.2 MiB", "3 KiB".
fn bytes_as_shown(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let (mut value, mut unit) = (n as f64, 0);
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit > 0 && value.fract() != 0.0 {
        true => format!("{value:.1} {}", units[unit]),
        false => format!("{value} {}", units[unit]),
    }
}

/// On-call sees which router replica holds stored responses and conversations a kill would
/// lose: with a cluster token each keeps a standby copy of the other's (the table says
/// "protected"); a replica that stopped goes silent (red, saying so), and the one left holds
/// what was handed to it, alone — journaled in its state directory, the journal's size shown
/// and said synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_says_which_routers_stored_state_is_protected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let token = dir.path().join("cluster-token");
    std::fs::write(&token, "dashboard-routers-test-token-0123456789\n")?;
    let token = token.display().to_string();
    let flags = ["--cluster-token-file", token.as_str()];
    let state = dir.path().join("state").display().to_string();
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: switchyard_tests::strings(&[
            "--cluster-token-file",
            token.as_str(),
            "--state-dir",
            state.as_str(),
        ]),
        ..Default::default()
    })
    .await?;
    let mut other =
        switchyard_tests::start_router(&cluster.etcd.url, "other-router", &flags).await?;
    let other_url = format!("http://{}/v1", other.addr("http"));
    let http = reqwest::Client::new();
    let stored = wait_until(PATIENCE, "the other router to answer and store", || async {
        http.post(format!("{other_url}/responses"))
            .json(&serde_json::json!({"model": "synthetic", "input": "Keep me.", "max_output_tokens": 2}))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    });
    stored.await?;
    let made = http
        .post(format!("{other_url}/conversations"))
        .send()
        .await?;
    assert_eq!(made.status(), 200);

    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", cluster.control_plane.addr("http")))
        .await?;
    let (first, second) = (
        cluster.router.addr("grpc").to_string(),
        other.addr("grpc").to_string(),
    );
    let both_protected = wait_until(PATIENCE, "both routers to show mirrored", || async {
        let shown = page_routers(&browser).await;
        [&first, &second]
            .iter()
            .all(|r| shown[r.as_str()]["mirror"] == "mirrored")
            && shown[second.as_str()]["responses"] == "1"
            && shown[second.as_str()]["conversations"] == "1"
    })
    .await;
    if let Err(error) = both_protected {
        anyhow::bail!("{error}: the table shows {}", page_routers(&browser).await);
    }
    let shown = page_routers(&browser).await;
    assert_eq!(shown[second.as_str()]["trouble"], "false", "{shown}");
    assert!(
        shown[second.as_str()]["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("protected")),
        "{shown}"
    );

    // A background response running there is counted, and said to end with a kill.
    let started: Value = http
        .post(format!("{other_url}/responses"))
        .json(&serde_json::json!({"model": "synthetic", "input": "Go on.",
                                  "max_output_tokens": 4000, "background": true}))
        .send()
        .await?
        .json()
        .await?;
    let shows_run = wait_until(PATIENCE, "the background run to show", || async {
        let shown = page_routers(&browser).await;
        shown[second.as_str()]["background"] == "1"
            && shown[second.as_str()]["verdict"]
                .as_str()
                .is_some_and(|v| v.contains("1 background response running here"))
    })
    .await;
    if let Err(error) = shows_run {
        anyhow::bail!("{error}: the table shows {}", page_routers(&browser).await);
    }
    let cancelled = http
        .post(format!(
            "{other_url}/responses/{}/cancel",
            started["id"].as_str().unwrap_or_default()
        ))
        .send()
        .await?;
    assert_eq!(cancelled.status(), 200);

    // The other replica stops: it hands its store over and goes silent.
    other.terminate(Duration::from_secs(30)).await?;
    let after = wait_until(PATIENCE, "the stopped router to show silent", || async {
        let shown = page_routers(&browser).await;
        shown[second.as_str()]["trouble"] == "true"
            && shown[second.as_str()]["verdict"]
                .as_str()
                .is_some_and(|v| v.starts_with("silent for"))
            && shown[first.as_str()]["responses"] == "2"
            && shown[first.as_str()]["conversations"] == "1"
            && shown[first.as_str()]["mirror"] == "journaled"
            && shown[first.as_str()]["verdict"]
                .as_str()
                .is_some_and(|v| v.contains("all synced)"))
    })
    .await;
    if let Err(error) = after {
        anyhow::bail!("{error}: the table shows {}", page_routers(&browser).await);
    }
    let shown = page_routers(&browser).await;
    assert_eq!(shown[first.as_str()]["trouble"], "false", "{shown}");
    assert!(
        browser.text("#routers").await?.contains("the only router"),
        "{shown}"
    );
    // The journal's size on the page comes to the file's in the state directory.
    let journal = dir.path().join("state/journal.pb");
    let sized = wait_until(PATIENCE, "the page to show the journal's size", || async {
        let shown = page_routers(&browser).await;
        let on_disk = std::fs::metadata(&journal).map_or(0, |m| m.len());
        shown[first.as_str()]["state"]
            .as_str()
            .and_then(|state| state.strip_prefix("journaled, "))
            .is_some_and(|size| size == bytes_as_shown(on_disk))
    })
    .await;
    if let Err(error) = sized {
        let on_disk = std::fs::metadata(&journal).map(|m| m.len());
        anyhow::bail!(
            "{error}: {on_disk:?} bytes on disk, the table shows {}",
            page_routers(&browser).await
        );
    }
    Ok(())
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
    // The policy is fetched after the first poll's tables.
    browser
        .wait_for_text(
            PATIENCE,
            "the page to show the policy",
            "#policy",
            "default_lane",
        )
        .await?;

    // Mixed traffic shows up in the charts and the decision feed.
    cluster
        .router
        .wait_for_log("reporting to the control plane", PATIENCE)
        .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    for i in 0..6 {
        let class = if i % 2 == 0 {
            RequestClass::LatencyCritical
        } else {
            RequestClass::CostSensitive
        };
        let mut request =
            switchyard_tests::synthetic_request(&format!("page-{i}"), class, "chart me", 4);
        if i < 4 {
            request.metadata.insert("tenant".into(), "acme".into());
        }
        if i == 5 {
            // A client's long tenant name: the ledger must still show its numbers.
            request.metadata.insert("tenant".into(), "t".repeat(1000));
        }
        let done = session.start(request)?.collect().await;
        assert!(done.finished.is_some(), "{:?}", done.failed);
    }
    let chart_points = |id: &'static str| {
        let browser = &browser;
        async move {
            browser
                .execute(
                    "const s = document.querySelector(`#${arguments[0]} svg`); return s ? Number(s.dataset.points || 0) : 0;",
                    vec![serde_json::json!(id)],
                )
                .await
                .ok()
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        }
    };
    for chart in [
        "chart-ttft",
        "chart-attainment",
        "chart-prediction",
        "chart-regret",
        "chart-tokens",
        "chart-cost",
    ] {
        wait_until(PATIENCE, &format!("{chart} to draw data"), || async {
            chart_points(chart).await > 0
        })
        .await?;
    }
    wait_until(
        PATIENCE,
        "the feed to list page-4 with its outcome",
        || async {
            browser
                .text("#decisions tr[data-request-id='page-4'] td:nth-child(9)")
                .await
                .is_ok_and(|t| t == "met" || t == "missed")
        },
    )
    .await?;
    // A request id of the longest valid length (128 bytes) is cut in its cell, the whole id
    // in the tooltip: every column stays in view, also in the 922 px the feed gets beside the
    // story at a 1600 px wide viewport.
    let long_id = format!("long-{}", "x".repeat(123));
    let done = session
        .start(switchyard_tests::synthetic_request(
            &long_id,
            RequestClass::CostSensitive,
            "a long id",
            2,
        ))?
        .collect()
        .await;
    assert!(done.finished.is_some(), "{:?}", done.failed);
    wait_until(PATIENCE, "the feed to list the long id", || async {
        browser
            .execute(
                "return document.querySelector(`#decisions tr[data-request-id='${arguments[0]}'] td:nth-child(2)`)?.title || '';",
                vec![serde_json::json!(long_id)],
            )
            .await
            .is_ok_and(|title| title == long_id.as_str())
    })
    .await?;
    for box_width in ["", "922px"] {
        let fit = browser
            .execute(
                "const list = document.querySelector('.feed-list');
                 list.style.width = arguments[0];
                 const box = list.getBoundingClientRect();
                 const slo = document.querySelector('#decisions th:nth-child(9)').getBoundingClientRect();
                 const table = document.getElementById('decisions');
                 const out = [slo.right, box.right, window.innerWidth, table.scrollWidth, list.clientWidth];
                 list.style.width = '';
                 return out;",
                vec![serde_json::json!(box_width)],
            )
            .await?;
        let [slo_right, box_right, viewport, table_width, box_inner] =
            serde_json::from_value::<[f64; 5]>(fit.clone())?;
        assert!(
            slo_right <= box_right + 0.5 && slo_right <= viewport && table_width <= box_inner,
            "the SLO column is out of view with a 128-byte request id (box {box_width:?}): \
             [slo.right, box.right, viewport, table.scrollWidth, box.clientWidth] = {fit}"
        );
    }
    // The page asks for no favicon (an empty inline one): no 404 in the console.
    let icon = browser
        .execute(
            "return document.querySelector('link[rel=icon]')?.getAttribute('href') || '';",
            vec![],
        )
        .await?;
    assert_eq!(icon, "data:,");
    // A request refused before its first token (a prompt over the model's context) is shown as
    // failed, its SLO not applicable, its cost nothing.
    let mut direct = admin.clone();
    let refused = vec![
        v1::RouterReport {
            report: Some(v1::router_report::Report::Decision(v1::RoutingDecision {
                request_id: "refused-ctx".into(),
                router_id: "direct".into(),
                lane: "latency-critical".into(),
                lane_origin: "class".into(),
                ttft_slo_ms: 10_000.0,
                prompt_tokens: 35_001,
                worker_id: "gpu-0".into(),
                pool: "gpu".into(),
                reason: "home".into(),
                predicted_ttft_ms: 200_440.0,
                ..Default::default()
            })),
        },
        v1::RouterReport {
            report: Some(v1::router_report::Report::Outcome(v1::RequestOutcome {
                request_id: "refused-ctx".into(),
                status: "failed".into(),
                worker_id: "gpu-0".into(),
                pool: "gpu".into(),
                prompt_tokens: 35_001,
                error: "prompt (35001 tokens) + sampling.max_tokens (16) = 35017 exceeds the \
                        model's context length of 8192 tokens"
                    .into(),
                ..Default::default()
            })),
        },
    ];
    direct.report(tokio_stream::iter(refused)).await?;
    wait_until(PATIENCE, "the feed to show refused-ctx failed", || async {
        browser
            .text("#decisions tr[data-request-id='refused-ctx'] td:nth-child(9)")
            .await
            .is_ok_and(|t| t == "failed")
    })
    .await?;
    browser
        .click("#decisions tr[data-request-id='refused-ctx']")
        .await?;
    browser
        .wait_for_text(
            PATIENCE,
            "the story of refused-ctx to open",
            "#story",
            "Request refused-ctx",
        )
        .await?;
    let story = browser.text("#story").await?;
    assert!(
        story.contains("not applicable, failed before its first token")
            && !story.contains("missed")
            && story.contains("$0 (nothing computed"),
        "{story}"
    );
    assert!(
        browser.text("#sampling").await?.contains("decisions"),
        "{}",
        browser.text("#sampling").await?
    );
    browser
        .click("#decisions tr[data-request-id='page-4']")
        .await?;
    wait_until(PATIENCE, "the story of page-4 to open", || async {
        browser
            .text("#story")
            .await
            .is_ok_and(|t| t.contains("Request page-4") && t.contains("latency-critical"))
    })
    .await?;
    let story = browser.text("#story").await?;
    assert!(
        story.contains("decided by") && story.contains("class"),
        "{story}"
    );
    assert!(
        story.contains("chosen") && story.contains("wse-0"),
        "{story}"
    );
    assert!(story.contains("completed"), "{story}");
    assert!(story.contains("from placement"), "{story}");
    // Its regret: a number of ms, against a named alternative or none scored.
    let regret = story
        .split("regret")
        .nth(1)
        .map(|rest| {
            rest.split("cost regret")
                .next()
                .unwrap_or(rest)
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    assert!(
        regret.contains(" ms")
            && (regret.contains("best alternative") || regret.contains("no other worker")),
        "{story}"
    );
    // The ledger judged every request (not only sampled ones): both lanes, the gpu and wse
    // pools and the tenant have rows, and each lane has its one-line explanation.
    wait_until(PATIENCE, "the ledger table to list both lanes", || async {
        browser
            .execute(
                "return document.querySelectorAll('#ledger tbody tr[data-dimension=lane]').length;",
                vec![],
            )
            .await
            .is_ok_and(|n| n == 2)
    })
    .await?;
    for key in ["gpu", "wse", "acme"] {
        let cells = browser
            .text(&format!(
                "#ledger tbody tr[data-key='{key}'] td:nth-child(3)"
            ))
            .await?;
        assert!(cells.parse::<u32>().is_ok_and(|n| n > 0), "{key}: {cells}");
    }
    let ledger_fits = browser
        .execute(
            "const last = document.querySelector('#ledger th:last-child').getBoundingClientRect();
             return [last.right, window.innerWidth,
                     document.querySelectorAll('#ledger tbody tr[data-dimension=tenant]').length];",
            vec![],
        )
        .await?;
    let [last_right, viewport, tenants] = serde_json::from_value::<[f64; 3]>(ledger_fits.clone())?;
    assert!(
        tenants >= 2.0 && last_right <= viewport,
        "a long tenant name pushed the ledger out of view: [last.right, viewport, tenants] = {ledger_fits}"
    );
    let explanation = browser.text("#ledger-explanation").await?;
    assert!(
        explanation.contains("latency-critical: policy lost")
            && explanation.contains("predictions were off by"),
        "{explanation}"
    );
    let (status, ledger) = api(http, "/api/ledger?window_s=300").await?;
    assert_eq!(status, 200, "{ledger}");
    let judged: u64 = ledger["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dimension"] == "lane")
        .filter_map(|r| r["judged"].as_u64())
        .sum();
    assert!(judged >= 6, "{ledger}");
    let (status, bad) = api(http, "/api/ledger?window_s=0").await?;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("window_s"),
        "{bad}"
    );
    // The synthetic engine's TTFT is predicted (its fixed delay is reported): a cost-sensitive
    // request on an idle gpu worker (150 ms) lands within a third of its prediction.
    let cs = finished_decision(http, "page-5").await?;
    let (predicted, placed) = (
        cs["outcome"]["predicted_ttft_ms"]
            .as_f64()
            .unwrap_or_default(),
        cs["outcome"]["placed_ttft_ms"].as_f64().unwrap_or_default(),
    );
    assert!(
        predicted >= 140.0 && (placed - predicted).abs() < placed / 3.0,
        "predicted {predicted} ms, took {placed} ms from placement: {cs}"
    );
    // The trouble filter hides requests that met their SLO.
    browser.click("#only-trouble").await?;
    let shown = browser
        .execute(
            "return [...document.querySelectorAll('#decisions tbody tr td:nth-child(9)')].map(td => td.textContent);",
            vec![],
        )
        .await?;
    assert!(
        shown
            .as_array()
            .is_some_and(|cells| cells.iter().all(|c| c != "met" && c != "running")),
        "{shown}"
    );
    browser.click("#only-trouble").await?;
    wait_until(PATIENCE, "page-4 to be listed again", || async {
        browser
            .text("#decisions tr[data-request-id='page-4'] td:nth-child(2)")
            .await
            .is_ok_and(|t| t == "page-4")
    })
    .await?;
    std::fs::write(
        switchyard_tests::log_dir().join("dashboard-insights.png"),
        browser.screenshot().await?,
    )?;
    browser
        .execute(
            "document.getElementById('ledger-title').scrollIntoView();",
            vec![],
        )
        .await?;
    std::fs::write(
        switchyard_tests::log_dir().join("dashboard-ledger.png"),
        browser.screenshot().await?,
    )?;
    // The history is the server's: a reload draws it again at once.
    browser.goto(&format!("http://{http}/")).await?;
    wait_until(
        PATIENCE,
        "the reloaded page to draw the history",
        || async { chart_points("chart-ttft").await > 0 && chart_points("chart-tokens").await > 0 },
    )
    .await?;
    // The workers table has its own poll: it may fill a moment after the charts.
    wait_until(
        PATIENCE,
        "the reloaded page to list gpu-1 ready",
        || async {
            browser
                .text("tr[data-worker-id='gpu-1'] td:nth-child(5)")
                .await
                .is_ok_and(|t| t == "ready")
        },
    )
    .await?;

    // Draining the worker of a long generation, with hand-off on: the generation moves, and
    // the feed and the page say where to and at which token.
    cluster
        .set_policy(
            &serde_json::json!({"migration": {"enabled": true, "drain_handoff": true,
                                              "rebalance": false, "min_remaining_tokens": 4}}),
            PATIENCE,
        )
        .await?;
    let long = switchyard_tests::synthetic_request(
        "page-moved",
        RequestClass::CostSensitive,
        "move me",
        300,
    );
    let mut stream = session.start(long)?;
    let mut completion = Completion::default();
    while completion.token_ids.len() < 3 {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let accepted = completion.accepted.clone().expect("accepted");
    assert_eq!(accepted.pool, "gpu", "{accepted:?}");
    let busy = accepted.worker_id;
    let other = if busy == "gpu-0" { "gpu-1" } else { "gpu-0" };
    // One click only arms the drain: nothing happens until the second.
    browser
        .click(&format!("tr[data-worker-id='{busy}'] button.drain"))
        .await?;
    assert_eq!(
        browser
            .text(&format!("tr[data-worker-id='{busy}'] button.drain.confirm"))
            .await?,
        "Confirm drain"
    );
    assert_eq!(worker_state(&admin, &busy).await.as_deref(), Some("ready"));
    browser
        .click(&format!("tr[data-worker-id='{busy}'] button.drain.confirm"))
        .await?;
    wait_until(
        PATIENCE,
        "the drained worker to advertise draining",
        || async { worker_state(&admin, &busy).await.as_deref() == Some("draining") },
    )
    .await?;
    wait_until(PATIENCE, "the page to show the worker draining", || async {
        browser
            .text(&format!("tr[data-worker-id='{busy}'] td:nth-child(5)"))
            .await
            .is_ok_and(|t| t == "draining")
    })
    .await?;
    assert!(browser.text("#notice").await?.contains(&busy));
    // The events list is fed by its own stream; it may show the change a poll later.
    wait_until(PATIENCE, "the events list to show the drain", || async {
        browser
            .text("#events")
            .await
            .is_ok_and(|t| t.contains(&format!("{busy} (gpu) is draining")))
    })
    .await?;
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    assert!(completion.finished.is_some(), "{:?}", completion.failed);
    let [moved] = completion.moved.as_slice() else {
        panic!("one move expected: {:?}", completion.moved);
    };
    assert_eq!(
        (moved.reason.as_str(), moved.from_worker_id.as_str()),
        ("drain", busy.as_str())
    );
    let entry = finished_decision(http, "page-moved").await?;
    let record = &entry["outcome"]["moves"][0];
    assert_eq!(record["reason"], "drain", "{entry}");
    assert_eq!(record["from_worker_id"], busy.as_str(), "{entry}");
    assert_eq!(
        record["to_worker_id"],
        moved.to_worker_id.as_str(),
        "{entry}"
    );
    assert_eq!(record["to_pool"], moved.to_pool.as_str(), "{entry}");
    let at_token = record["at_token"].as_u64().unwrap_or_default();
    assert!((3..300).contains(&at_token), "{entry}");
    assert_eq!(
        entry["outcome"]["worker_id"],
        moved.to_worker_id.as_str(),
        "{entry}"
    );
    let shown = format!(
        "moved (drain) {busy} → {} at token {at_token}",
        moved.to_worker_id
    );
    wait_until(PATIENCE, "the feed row to show the move", || async {
        browser
            .text("#decisions tr[data-request-id='page-moved'] td:nth-child(5)")
            .await
            .is_ok_and(|t| t.contains(&shown))
    })
    .await?;
    wait_until(PATIENCE, "the move to be counted by reason", || async {
        browser
            .execute(
                "return document.getElementById('moves').dataset.drain;",
                vec![],
            )
            .await
            .is_ok_and(|n| n == "1")
    })
    .await?;
    assert!(
        browser.text("#moves").await?.contains("drain 1"),
        "{}",
        browser.text("#moves").await?
    );
    browser
        .click("#decisions tr[data-request-id='page-moved']")
        .await?;
    wait_until(
        PATIENCE,
        "the story of page-moved to list its move",
        || async {
            browser
                .text("#story")
                .await
                .is_ok_and(|t| t.contains(&shown))
        },
    )
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
    // Routers report to the leader; the follower serves the leader's history, feed and ledger.
    let follower_http = follower.addr("http");
    let (status, history) = api(follower_http, "/api/history").await?;
    assert_eq!(status, 200, "{history}");
    assert_eq!(history["kept_by"]["via"], "follower", "{history}");
    assert!(
        history_sum(&history, |p| {
            p["lanes"]["latency-critical"]["requests"]
                .as_u64()
                .unwrap_or(0)
                + p["lanes"]["cost-sensitive"]["requests"]
                    .as_u64()
                    .unwrap_or(0)
        }) >= 6
    );
    let (status, feed) = api(follower_http, "/api/decisions?request_id=page-4").await?;
    assert_eq!(status, 200, "{feed}");
    assert_eq!(feed["decisions"][0]["request_id"], "page-4", "{feed}");
    let (status, ledger) = api(follower_http, "/api/ledger").await?;
    assert_eq!(status, 200, "{ledger}");
    let judged: u64 = ledger["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["dimension"] == "lane")
        .filter_map(|r| r["judged"].as_u64())
        .sum();
    assert!(judged >= 6, "{ledger}");
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
    browser.drain_on_dashboard(other).await?;
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
    assert_eq!(worker_state(&admin, other).await.as_deref(), Some("ready"));
    browser.close().await?;
    Ok(())
}

/// GETs a dashboard API path as JSON, with its status.
async fn api(http: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, Value)> {
    let response = reqwest::get(format!("http://{http}{path}")).await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// The feed entry of `request_id` once its outcome arrived.
async fn finished_decision(http: std::net::SocketAddr, request_id: &str) -> anyhow::Result<Value> {
    poll_until(
        PATIENCE,
        &format!("the feed to show {request_id} ended"),
        || async {
            let (status, page) = api(http, &format!("/api/decisions?request_id={request_id}"))
                .await
                .ok()?;
            let entry = page["decisions"].as_array()?.last()?.clone();
            (status == 200 && !entry["outcome"].is_null()).then_some(entry)
        },
    )
    .await
}

/// Sum of `f` over the history's points.
fn history_sum(history: &Value, f: impl Fn(&Value) -> u64) -> u64 {
    history["points"]
        .as_array()
        .map(|points| points.iter().map(&f).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_report_decisions_and_history_to_the_control_plane() -> anyhow::Result<()> {
    // Five decision reports a second: the two story requests fit, the load below does not.
    let mut cluster = Cluster::start(ClusterSpec {
        router_flags: vec!["--decision-reports-per-s".into(), "5".into()],
        ..Default::default()
    })
    .await?;
    let http = cluster.control_plane.addr("http");
    // The router finds the leader through etcd once it is elected.
    cluster
        .router
        .wait_for_log("reporting to the control plane", PATIENCE)
        .await?;

    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let fast = switchyard_tests::synthetic_request(
        "story-lc",
        RequestClass::LatencyCritical,
        "quick answer",
        5,
    );
    let mut cheap = synthetic_request("story-cs", "a long cheap essay", 7);
    cheap.class = RequestClass::Auto as i32;
    cheap.metadata.insert("tenant".into(), "acme".into());
    let mut tokens = std::collections::HashMap::new();
    for request in [fast, cheap] {
        let id = request.request_id.clone();
        let done = session.start(request)?.collect().await;
        assert!(done.finished.is_some(), "{id} failed: {:?}", done.failed);
        let accepted = done.accepted.expect("accepted");
        tokens.insert(id, (accepted, done.token_ids.len() as u64));
    }

    // Each request's story: lane and where it came from, candidates, choice, outcome.
    let lc = finished_decision(http, "story-lc").await?;
    let (accepted, lc_tokens) = &tokens["story-lc"];
    assert_eq!(lc["lane"], "latency-critical", "{lc}");
    assert_eq!(lc["lane_origin"], "class");
    assert_eq!(lc["worker_id"], accepted.worker_id.as_str());
    assert_eq!(lc["pool"], "wse");
    // Home pool, by affinity or not (a chat is keyed by its conversation).
    assert!(
        lc["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("home"),
        "{lc}"
    );
    assert!(lc["predicted_ttft_ms"].as_f64().unwrap() > 0.0, "{lc}");
    // Placed at once in an idle cluster: it never waited at the router for a slot.
    assert_eq!(lc["queued_ms"].as_f64(), Some(0.0), "{lc}");
    let candidates = lc["candidates"].as_array().expect("candidates");
    assert!(
        candidates
            .iter()
            .any(|c| c["chosen"] == true && c["worker_id"] == lc["worker_id"]),
        "the chosen worker is among the candidates: {lc}"
    );
    let outcome = &lc["outcome"];
    assert_eq!(outcome["status"], "completed", "{lc}");
    assert_eq!(outcome["worker_id"], accepted.worker_id.as_str());
    assert_eq!(outcome["completion_tokens"].as_u64(), Some(*lc_tokens));
    assert!(outcome["ttft_ms"].as_f64().unwrap() > 0.0, "{lc}");
    assert_eq!(outcome["failovers"], 0);
    assert_eq!(outcome["predicted_ttft_ms"], lc["predicted_ttft_ms"]);
    let placed = outcome["placed_ttft_ms"].as_f64().unwrap();
    assert!(
        placed > 0.0 && placed <= outcome["ttft_ms"].as_f64().unwrap(),
        "{lc}"
    );

    let cs = finished_decision(http, "story-cs").await?;
    assert_eq!(cs["lane"], "cost-sensitive", "{cs}");
    assert_eq!(cs["lane_origin"], "default");
    assert_eq!(cs["tenant"], "acme");
    assert_eq!(cs["pool"], "gpu");
    assert_eq!(cs["worker_id"], tokens["story-cs"].0.worker_id.as_str());
    assert_eq!(cs["outcome"]["status"], "completed");

    // The history counts both requests (every request, not a sample) and their tokens.
    let history = poll_until(PATIENCE, "the history to count both requests", || async {
        let (_, h) = api(http, "/api/history").await.ok()?;
        let lane = |name: &'static str| {
            history_sum(&h, move |p| {
                p["lanes"][name]["requests"].as_u64().unwrap_or(0)
            })
        };
        (lane("latency-critical") == 1 && lane("cost-sensitive") == 1).then_some(h)
    })
    .await?;
    assert_eq!(
        history_sum(&history, |p| p["pools"]["wse"]["tokens_per_s"]
            .as_u64()
            .unwrap_or(0)),
        *lc_tokens,
        "tokens delivered from the wse pool"
    );
    let second = history["points"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["lanes"]["latency-critical"]["requests"] == 1)
        .expect("the second the request ended");
    let lane = &second["lanes"]["latency-critical"];
    assert!(lane["ttft_p50_ms"].as_f64().unwrap() > 0.0, "{second}");
    assert_eq!(lane["attainment"], 1.0, "{second}");
    // The TTFT model's error is judged on the request (served without failover).
    assert!(lane["ttft_error_p50_ms"].as_f64().is_some(), "{second}");
    assert!(lane["under_predicted"].as_f64().is_some(), "{second}");
    assert!(lane["slo_ms"].as_f64().unwrap() > 0.0);
    assert!(history_sum(&history, |p| p["decisions"].as_u64().unwrap_or(0)) >= 2);
    assert_eq!(history["kept_by"]["role"], "leader");

    // Under load the feed holds only a sample; the history still counts every request.
    let (_, feed) = api(http, "/api/decisions").await?;
    let before = feed["decisions"].as_array().map_or(0, Vec::len) as u64;
    const REQUESTS: u64 = 200;
    let started = Instant::now();
    let streams = (0..REQUESTS)
        .map(|i| session.start(synthetic_request(&format!("load-{i}"), "busy", 1)))
        .collect::<Result<Vec<_>, _>>()?;
    for stream in streams {
        let done = stream.collect().await;
        assert!(done.finished.is_some(), "{:?}", done.failed);
    }
    let seconds = started.elapsed().as_secs() + 2;
    let history = poll_until(PATIENCE, "the history to count every request", || async {
        let (_, h) = api(http, "/api/history").await.ok()?;
        let ended = history_sum(&h, |p| {
            p["lanes"]["cost-sensitive"]["requests"]
                .as_u64()
                .unwrap_or(0)
        });
        (ended == REQUESTS + 1).then_some(h)
    })
    .await?;
    let decisions = history_sum(&history, |p| p["decisions"].as_u64().unwrap_or(0));
    let reported = history_sum(&history, |p| p["decisions_reported"].as_u64().unwrap_or(0));
    assert_eq!(decisions, REQUESTS + 2);
    assert!(
        reported > before && reported - before <= 5 * seconds,
        "{reported} of {decisions} reported over ~{seconds} s"
    );
    let (_, feed) = api(http, "/api/decisions").await?;
    assert_eq!(
        feed["decisions"].as_array().map(Vec::len),
        Some(reported as usize)
    );

    // Bad queries are refused, naming the parameter.
    for path in [
        "/api/history?since=yesterday",
        "/api/decisions?limit=0",
        "/api/decisions?since=-1",
        "/api/decisions?request_id=",
    ] {
        let (status, body) = api(http, path).await?;
        assert_eq!(status, 400, "{path}: {body}");
        let name = path.split(['?', '=']).nth(1).unwrap();
        assert!(
            body["error"].as_str().unwrap_or_default().starts_with(name),
            "{path}: {body}"
        );
    }

    // With a cluster token, the control plane takes reports only from members. (A leader of
    // its own: a follower keeps no report.)
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, "report-token-0123456789abcdef\n")?;
    let own_etcd = switchyard_tests::Etcd::start().await?;
    let guarded = start_control_plane(
        &own_etcd.url,
        "control-plane-1",
        &["--cluster-token-file", &token_file.display().to_string()],
    )
    .await?;
    guarded
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let mut client = admin(guarded.addr("grpc")).await?;
    let report = || {
        tokio_stream::iter(vec![v1::RouterReport {
            report: Some(v1::router_report::Report::Stats(v1::RouterStats {
                router_id: "outsider".into(),
                ..Default::default()
            })),
        }])
    };
    let err = client.report(report()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("--cluster-token-file"), "{err}");
    let mut member = tonic::Request::new(report());
    member.metadata_mut().insert(
        "authorization",
        "Bearer report-token-0123456789abcdef".parse()?,
    );
    assert_eq!(client.report(member).await?.into_inner().accepted, 1);
    // A malformed report is dropped alone: the stream goes on and keeps the next one.
    let mut bad = tonic::Request::new(tokio_stream::iter(vec![
        v1::RouterReport { report: None },
        v1::RouterReport {
            report: Some(v1::router_report::Report::Stats(v1::RouterStats {
                router_id: "outsider".into(),
                ..Default::default()
            })),
        },
    ]));
    bad.metadata_mut().insert(
        "authorization",
        "Bearer report-token-0123456789abcdef".parse()?,
    );
    assert_eq!(client.report(bad).await?.into_inner().accepted, 1);

    // Without its control plane the router routes as before.
    cluster.control_plane.kill().await?;
    for i in 0..3 {
        let done = session
            .start(synthetic_request(&format!("alone-{i}"), "still here", 3))?
            .collect()
            .await;
        assert!(done.finished.is_some(), "{:?}", done.failed);
    }
    Ok(())
}

/// A line of a Prometheus text exposition: the value of `series` (name and labels).
async fn metric(url: &str, series: &str) -> anyhow::Result<Option<f64>> {
    let text = reqwest::get(url).await?.text().await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_client_field_loses_no_other_report() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        metrics: true,
        ..Default::default()
    })
    .await?;
    let http = cluster.control_plane.addr("http");
    cluster
        .router
        .wait_for_log("reporting to the control plane", PATIENCE)
        .await?;

    // Requests whose model name or request id is far over what the control plane keeps, each
    // beside a normal one: every decision and every second's stats still arrive.
    let client = reqwest::Client::new();
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let huge_model = "m".repeat(20_000);
    const ROUNDS: usize = 4;
    for i in 0..ROUNDS {
        let refused = client
            .post(format!("{}/chat/completions", cluster.router_openai_url()))
            .json(&serde_json::json!({
                "model": huge_model,
                "messages": [{"role": "user", "content": "hello"}],
                "max_tokens": 2,
            }))
            .send()
            .await?;
        assert!(refused.status().is_client_error(), "{}", refused.status());
        let done = session
            .start(synthetic_request(
                &format!("{i}").repeat(20_000),
                "too long an id",
                2,
            ))?
            .collect()
            .await;
        assert!(done.failed.is_some(), "a 20 000-byte request id is refused");
        let done = session
            .start(synthetic_request(&format!("beside-{i}"), "normal", 2))?
            .collect()
            .await;
        assert!(done.finished.is_some(), "{:?}", done.failed);
    }
    for i in 0..ROUNDS {
        let entry = finished_decision(http, &format!("beside-{i}")).await?;
        assert_eq!(entry["outcome"]["status"], "completed", "{entry}");
    }
    // The refused requests are in the feed too, their client's strings clipped and marked.
    let (_, feed) = api(http, "/api/decisions").await?;
    let clipped: Vec<&Value> = feed["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["model"].as_str().is_some_and(|m| m.starts_with("mmmm")))
        .collect();
    assert_eq!(clipped.len(), ROUNDS, "{feed}");
    for d in clipped {
        let model = d["model"].as_str().unwrap_or_default();
        assert!(model.len() <= 256 && model.ends_with('…'), "{d}");
        assert_eq!(d["reason"], "rejected", "{d}");
    }
    // The history counts every decision: none was lost to a broken stream.
    poll_until(
        PATIENCE,
        "the history to count all 12 decisions",
        || async {
            let (_, h) = api(http, "/api/history").await.ok()?;
            (history_sum(&h, |p| p["decisions"].as_u64().unwrap_or(0)) == 3 * ROUNDS as u64)
                .then_some(())
        },
    )
    .await?;
    // One stream all along.
    let log = std::fs::read_to_string(&cluster.router.log)?;
    assert_eq!(
        log.matches("reporting to the control plane").count(),
        1,
        "the router's report stream restarted"
    );

    // A report stream carrying bad entries: each is dropped (and counted), the rest kept.
    let mut admin = admin(cluster.control_plane.addr("grpc")).await?;
    let decision = |request_id: String| v1::RouterReport {
        report: Some(v1::router_report::Report::Decision(v1::RoutingDecision {
            request_id,
            router_id: "direct".into(),
            lane: "cost-sensitive".into(),
            reason: "home".into(),
            ..Default::default()
        })),
    };
    let row = |key: String| v1::LedgerStats {
        dimension: "tenant".into(),
        key,
        judged: 1,
        ..Default::default()
    };
    let reports = vec![
        decision("direct-1".into()),
        decision("x".repeat(20_000)),
        v1::RouterReport { report: None },
        v1::RouterReport {
            report: Some(v1::router_report::Report::Outcome(v1::RequestOutcome {
                request_id: "direct-1".into(),
                status: "completed".into(),
                ..Default::default()
            })),
        },
        v1::RouterReport {
            report: Some(v1::router_report::Report::Stats(v1::RouterStats {
                router_id: "direct".into(),
                ledger: vec![row("direct-tenant".into()), row("k".repeat(20_000))],
                ..Default::default()
            })),
        },
        decision("direct-2".into()),
    ];
    let summary = admin
        .report(tokio_stream::iter(reports))
        .await?
        .into_inner();
    assert_eq!(summary.accepted, 4);
    let entry = finished_decision(http, "direct-1").await?;
    assert_eq!(entry["outcome"]["status"], "completed", "{entry}");
    let (_, feed) = api(http, "/api/decisions?request_id=direct-2").await?;
    assert_eq!(feed["decisions"][0]["request_id"], "direct-2", "{feed}");
    // The second's stats are kept without their bad ledger row (sealed within a second).
    wait_until(PATIENCE, "the ledger to list direct-tenant", || async {
        api(http, "/api/ledger").await.is_ok_and(|(_, ledger)| {
            ledger["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| r["key"] == "direct-tenant")
        })
    })
    .await?;
    let metrics = cluster.control_plane.metrics_url();
    for (entry, count) in [("decision", 1.0), ("empty", 1.0), ("stats.ledger", 1.0)] {
        let series =
            format!("switchyard_control_plane_report_entries_dropped_total{{entry=\"{entry}\"}}");
        assert_eq!(metric(&metrics, &series).await?, Some(count), "{series}");
    }
    cluster
        .control_plane
        .wait_for_log("dropped a router report entry", PATIENCE)
        .await?;
    Ok(())
}

/// A control plane told to stop ends its open streams (an operator's `WatchEvents`, routers'
/// reports) and exits, instead of waiting for their clients to hang up — past Kubernetes'
/// grace period, into a SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_control_plane_ends_open_watches_and_exits() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let mut admin = admin(cluster.control_plane.addr("grpc")).await?;
    let mut events = admin
        .watch_events(v1::WatchEventsRequest::default())
        .await?
        .into_inner();
    let started = Instant::now();
    let status = cluster.control_plane.terminate(PATIENCE).await?;
    assert!(status.success(), "exited with {status}");
    // Well inside the 30 s a pod gets (the routers' report streams were open too).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?} to exit",
        started.elapsed()
    );
    let ended = tokio::time::timeout(PATIENCE, async {
        while events.message().await.ok().flatten().is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived the control plane");
    Ok(())
}

/// Runs `switchyard admin <args> --control-plane <address>`: (exit code, stdout, stderr).
fn switchyard_admin(address: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let output = std::process::Command::new(switchyard_tests::switchyard_bin())
        .arg("admin")
        .args(args)
        // After the subcommand, as kubectl users write flags (before works too).
        .args(["--control-plane", address])
        .output()
        .expect("switchyard runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The line of `switchyard admin workers`' table that starts with `id`.
fn table_row<'a>(table: &'a str, id: &str) -> Option<&'a str> {
    table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(id))
}

/// The STATE column of `id`'s line in `switchyard admin workers`' table.
fn state_of(table: &str, id: &str) -> Option<String> {
    table_row(table, id).and_then(|line| line.split_whitespace().nth(2).map(str::to_string))
}

/// `switchyard admin`, as an operator runs it: the workers listed, one drained and undrained,
/// the policy merge-patched (keeping what the patch leaves out), a bad patch refused with the
/// control plane's reason and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_lists_drains_and_patches_the_policy() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let control_plane = cluster.control_plane.addr("grpc").to_string();
    let run_at = switchyard_admin;
    let run = |args: &[&str]| run_at(&control_plane, args);

    let (code, table, err) = run(&["workers"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.starts_with("ID "), "{table}");
    assert_eq!(
        state_of(&table, "gpu-0").as_deref(),
        Some("ready"),
        "{table}"
    );
    assert_eq!(
        state_of(&table, "gpu-1").as_deref(),
        Some("ready"),
        "{table}"
    );

    let (code, out, err) = run(&["drain", "gpu-0"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("gpu-0 draining"), "{out}");
    let (_, table, _) = poll_until(PATIENCE, "gpu-0 to advertise draining", || async {
        let seen = run(&["workers"]);
        (state_of(&seen.1, "gpu-0").as_deref() == Some("draining")).then_some(seen)
    })
    .await?;
    assert_eq!(
        state_of(&table, "gpu-1").as_deref(),
        Some("ready"),
        "{table}"
    );
    let (code, out, err) = run(&["undrain", "gpu-0"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "gpu-0 drain lifted\n");
    let (code, out, err) = run(&["undrain", "gpu-0"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "gpu-0 was not draining\n");

    let (code, _, err) = run(&["policy", "set", "-"]);
    assert_eq!(
        code,
        Some(5),
        "an empty document from stdin is not a policy: {err}"
    );
    assert!(err.contains("refused"), "{err}");
    let policy = std::env::temp_dir().join(format!("policy-{}.json", std::process::id()));
    std::fs::write(&policy, r#"{"default_lane": "latency-critical"}"#)?;
    let (code, _, err) = run(&["policy", "set", &policy.display().to_string()]);
    std::fs::remove_file(&policy)?;
    assert_eq!(code, Some(0), "{err}");
    let (code, out, err) = run(&[
        "policy",
        "merge",
        r#"{"quotas": {"tenants": {"acme": {"tokens_per_minute": 1200}}}}"#,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, stored, err) = run(&["policy", "get"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stored, out, "get shows what merge stored");
    let document: Value = serde_json::from_str(&stored)?;
    assert_eq!(document["default_lane"], "latency-critical", "{stored}");
    assert_eq!(
        document["quotas"]["tenants"]["acme"]["tokens_per_minute"], 1200,
        "{stored}"
    );

    let (code, _, err) = run(&["policy", "merge", r#"{"placement": {"choices": 0}}"#]);
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("placement.choices"), "{err}");
    let (code, _, err) = run(&["drain", "gpu-9"]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("gpu-9"), "{err}");
    // An address that is not a control plane's is said to be one.
    let (code, _, err) = run_at(&cluster.router_addr(), &["workers"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not serve the Admin API"), "{err}");
    let (code, _, err) = run_at("127.0.0.1:1", &["workers"]);
    assert_eq!(code, Some(7), "{err}");
    assert!(
        err.contains("cannot reach the control plane at 127.0.0.1:1"),
        "{err}"
    );
    Ok(())
}

/// A dashboard session made on one replica works on another started with the same admin
/// tokens file (two replicas behind one Service), and signing out on either ends it on both:
/// the revocation is kept in etcd. The cookie is never the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_session_works_on_every_replica_and_sign_out_ends_it_everywhere()
-> anyhow::Result<()> {
    const TOKEN: &str = switchyard_tests::OPERATOR_TOKEN;
    let dir = tempfile::tempdir()?;
    let tokens = switchyard_tests::admin_tokens_file(&dir)?;
    let etcd = switchyard_tests::Etcd::start().await?;
    let flags = ["--admin-tokens-file", tokens.as_str()];
    let one = start_control_plane(&etcd.url, "control-plane-0", &flags).await?;
    let two = start_control_plane(&etcd.url, "control-plane-1", &flags).await?;
    let client = reqwest::Client::new();
    let signed_in = |http: std::net::SocketAddr, cookie: String| {
        let client = client.clone();
        async move {
            let who: Value = client
                .get(format!("http://{http}/api/session"))
                .header("cookie", cookie)
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(who["signed_in"] == true && who["name"] == "alice")
        }
    };
    let write = |http: std::net::SocketAddr, method: reqwest::Method| {
        client
            .request(method, format!("http://{http}/api/session"))
            .header("content-type", "application/json")
            .header("x-switchyard-csrf", "1")
    };

    let response = write(one.addr("http"), reqwest::Method::POST)
        .body(serde_json::json!({ "token": TOKEN }).to_string())
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let set_cookie = response
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()?
        .to_string();
    let cookie = set_cookie.split(';').next().unwrap_or_default().to_string();
    assert!(
        cookie.starts_with("switchyard_admin=") && !cookie.contains(TOKEN),
        "{set_cookie}"
    );
    assert!(signed_in(one.addr("http"), cookie.clone()).await?);
    assert!(
        signed_in(two.addr("http"), cookie.clone()).await?,
        "the other replica refuses a session made on the first"
    );

    // Sign out on the second replica: the first refuses the session from then on.
    let response = write(two.addr("http"), reqwest::Method::DELETE)
        .header("cookie", cookie.clone())
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert!(!signed_in(two.addr("http"), cookie.clone()).await?);
    assert!(
        !signed_in(one.addr("http"), cookie.clone()).await?,
        "a session signed out on one replica still works on the other"
    );
    for replica in [&one, &two] {
        let log = std::fs::read_to_string(&replica.log)?;
        assert!(
            !log.contains(TOKEN),
            "the token reached {}'s log",
            replica.name
        );
    }
    Ok(())
}

/// A follower whose dashboard serves TLS forwards history, feed and ledger reads to the
/// leader's over https (checking the leader's control-plane identity), and names the leader's
/// dashboard with https: it used to dial plain http, fail, and show its own empty history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_follower_forwards_reads_to_the_leader_over_https() -> anyhow::Result<()> {
    let pki = switchyard::tls::LocalPki::generate(&["control-plane"])?;
    let files = pki.files("control-plane");
    let arg = |p: &Option<std::path::PathBuf>| p.as_ref().expect("generated").display().to_string();
    let (cert, key, ca) = (
        arg(&files.cert_file),
        arg(&files.key_file),
        arg(&files.ca_file),
    );
    let flags = [
        "--tls-cert-file",
        cert.as_str(),
        "--tls-key-file",
        key.as_str(),
        "--tls-ca-file",
        ca.as_str(),
    ];
    let etcd = switchyard_tests::Etcd::start().await?;
    let leader = start_control_plane(&etcd.url, "control-plane-0", &flags).await?;
    leader
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let follower = start_control_plane(&etcd.url, "control-plane-1", &flags).await?;
    follower
        .wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .build()?;
    let http = follower.addr("http");
    for path in ["/api/history", "/api/decisions", "/api/ledger"] {
        let answer: Value = client
            .get(format!("https://{http}{path}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        assert_eq!(
            (&answer["kept_by"]["role"], &answer["kept_by"]["via"]),
            (&Value::from("leader"), &Value::from("follower")),
            "{path} was not forwarded to the leader: {}",
            answer["kept_by"]
        );
    }
    let leader_dashboard = format!("https://{}/", leader.addr("http"));
    let stats: Value = client
        .get(format!("https://{http}/api/stats"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(
        stats["leader_dashboard"],
        leader_dashboard.as_str(),
        "{stats}"
    );
    let refused = client
        .post(format!("https://{http}/api/workers/gpu-0/drain"))
        .header("content-type", "application/json")
        .header("x-switchyard-csrf", "1")
        .body("{}")
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::CONFLICT);
    let body: Value = refused.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("dashboard {leader_dashboard}")),
        "{body}"
    );
    Ok(())
}

/// After a failover the new leader's charts show the seconds before it led, when no router
/// reported to it, as gaps (not as 0 tokens/s, $0/h), and the page says since when it leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_new_leaders_charts_show_its_follower_seconds_as_gaps()
-> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let mut old =
        start_control_plane(&etcd.url, "control-plane-0", &["--leader-ttl", "2s"]).await?;
    old.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let new = start_control_plane(&etcd.url, "control-plane-1", &[]).await?;
    new.wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    let http = new.addr("http");
    // The follower keeps points of its own meanwhile (workers' load, no router data).
    wait_until(PATIENCE, "the follower to keep a few seconds", || async {
        api(http, "/api/history?since=0")
            .await
            .is_ok_and(|(_, h)| h["points"].as_array().is_some_and(|p| p.len() >= 2))
    })
    .await?;
    old.kill().await?;
    new.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let (_, history) = api(http, "/api/history").await?;
    let since = history["kept_by"]["since"]
        .as_i64()
        .unwrap_or_else(|| panic!("no since: {}", history["kept_by"]));
    assert!(
        history["points"][0]["t"]
            .as_i64()
            .is_some_and(|t| t < since),
        "{}",
        history["kept_by"]
    );

    let browser = Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    let chart_points = |id: &'static str| {
        let browser = &browser;
        async move {
            browser
                .execute(
                    &format!("return document.querySelector('#{id} svg').dataset.points || '';"),
                    vec![],
                )
                .await
                .ok()
                .and_then(|v| v.as_str().and_then(|s| s.parse::<u64>().ok()))
        }
    };
    wait_until(PATIENCE, "the page to say since when it leads", || async {
        browser
            .execute(
                "const el = document.getElementById('insights-since');
                 return !el.hidden && el.dataset.since;",
                vec![],
            )
            .await
            .is_ok_and(|v| v.as_str().and_then(|s| s.parse::<i64>().ok()) == Some(since))
    })
    .await?;
    // The worker-queue series is the control plane's own and is drawn; the routers' series
    // have no data in any second (no router runs): nothing is drawn.
    wait_until(PATIENCE, "the queue chart to be drawn", || async {
        chart_points("chart-queue").await.is_some_and(|n| n > 0)
    })
    .await?;
    for chart in ["chart-tokens", "chart-cost", "chart-shed"] {
        assert_eq!(chart_points(chart).await, Some(0), "{chart} drew zeros");
    }
    browser.close().await?;
    Ok(())
}

/// Whether `css` is displayed (its `hidden` attribute is not overridden by a style rule).
async fn shown(browser: &Browser, css: &str) -> anyhow::Result<bool> {
    let display = browser
        .execute(
            &format!("return getComputedStyle(document.querySelector({css:?})).display;"),
            vec![],
        )
        .await?;
    Ok(display != "none")
}

/// The sign-in form shows only while a sign-in is needed and missing; signing out clears what
/// the page said about the session. (`.login { display: flex }` used to override `hidden`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sign_in_form_shows_only_when_needed_and_sign_out_clears_notices() -> anyhow::Result<()>
{
    const TOKEN: &str = switchyard_tests::OPERATOR_TOKEN;
    let dir = tempfile::tempdir()?;
    let tokens = switchyard_tests::admin_tokens_file(&dir)?;
    let etcd = switchyard_tests::Etcd::start().await?;
    let open = start_control_plane(&etcd.url, "control-plane-0", &[]).await?;
    let guarded = start_control_plane(
        &etcd.url,
        "control-plane-1",
        &["--admin-tokens-file", tokens.as_str()],
    )
    .await?;
    let browser = Browser::start().await?;

    // Open writes: nothing to sign in to.
    browser
        .goto(&format!("http://{}/", open.addr("http")))
        .await?;
    wait_until(PATIENCE, "the page to read its session", || async {
        browser
            .execute("return document.getElementById('login').hidden;", vec![])
            .await
            .is_ok_and(|v| v == true)
    })
    .await?;
    assert!(
        !shown(&browser, "#login").await?,
        "sign-in shown without admin tokens"
    );

    browser
        .goto(&format!("http://{}/", guarded.addr("http")))
        .await?;
    wait_until(PATIENCE, "the sign-in form", || async {
        shown(&browser, "#login").await.unwrap_or(false)
    })
    .await?;
    assert!(!shown(&browser, "#who").await?);
    browser.type_text("#token", TOKEN).await?;
    browser.click("#login button").await?;
    browser
        .wait_for_text(
            PATIENCE,
            "the page to show who is signed in",
            "#who",
            "alice",
        )
        .await?;
    assert!(shown(&browser, "#who").await?);
    assert!(shown(&browser, "#notice").await?, "no sign-in notice");
    assert!(
        !shown(&browser, "#login").await?,
        "sign-in shown while signed in"
    );

    browser.click("#who button").await?;
    wait_until(PATIENCE, "the sign-in form again", || async {
        shown(&browser, "#login").await.unwrap_or(false)
    })
    .await?;
    assert!(!shown(&browser, "#who").await?);
    assert!(
        !shown(&browser, "#notice").await?,
        "\"Signed in as alice\" stays after sign-out"
    );
    browser.close().await?;
    Ok(())
}

/// etcd, a control plane started with a cluster token, and two workers: `gpu-member` with that
/// token, and `gpu-stranger` with another, so it refuses the control plane's load stream.
struct StrangerCluster {
    control_plane: switchyard_tests::Component,
    _member: switchyard_tests::Component,
    _stranger: switchyard_tests::Component,
    _etcd: switchyard_tests::Etcd,
    _dir: tempfile::TempDir,
}

async fn cluster_with_a_stranger() -> anyhow::Result<StrangerCluster> {
    let dir = tempfile::tempdir()?;
    let ours = dir.path().join("cluster-token");
    std::fs::write(&ours, "cluster-token-0123456789abcdef\n")?;
    let theirs = dir.path().join("other-cluster-token");
    std::fs::write(&theirs, "another-token-0123456789abcdef\n")?;
    let (ours, theirs) = (ours.display().to_string(), theirs.display().to_string());
    let etcd = switchyard_tests::Etcd::start().await?;
    let member = switchyard_tests::start_gpu_worker(
        &etcd.url,
        "gpu-member",
        &["--cluster-token-file", &ours, "--max-concurrent", "8"],
        1,
    )
    .await?;
    let stranger = switchyard_tests::start_gpu_worker(
        &etcd.url,
        "gpu-stranger",
        &["--cluster-token-file", &theirs, "--max-concurrent", "8"],
        1,
    )
    .await?;
    let control_plane = start_control_plane(
        &etcd.url,
        "control-plane-0",
        &["--cluster-token-file", &ours],
    )
    .await?;
    Ok(StrangerCluster {
        control_plane,
        _member: member,
        _stranger: stranger,
        _etcd: etcd,
        _dir: dir,
    })
}

/// A worker the control plane has no load stream to — here it refuses the control plane's
/// cluster token — is no ready capacity: `/api/stats` and `GetClusterStats` leave it out of
/// `ready` and `ready_slots` and count it `unreachable`, its row says why (the worker's own
/// refusal), and the control plane logs it once when it starts failing, not once per retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_control_plane_cannot_reach_is_no_ready_capacity_and_its_row_says_why()
-> anyhow::Result<()> {
    let cluster = cluster_with_a_stranger().await?;
    let control_plane = &cluster.control_plane;
    let http = control_plane.addr("http");

    // Wait for several failed attempts (one a second), so that a log line per retry would show.
    let workers = poll_until(PATIENCE, "gpu-stranger to fail three times", || async {
        let (_, body) = api(http, "/api/workers").await.ok()?;
        let row = |id: &str| {
            body["workers"]
                .as_array()?
                .iter()
                .find(|w| w["id"] == id)
                .cloned()
        };
        let stranger = row("gpu-stranger")?;
        let member = row("gpu-member")?;
        (stranger["unreachable"]["attempts"].as_u64()? >= 3 && !member["load"].is_null())
            .then_some(body)
    })
    .await?;
    let rows = workers["workers"].as_array().expect("workers");
    let stranger = rows.iter().find(|w| w["id"] == "gpu-stranger").unwrap();
    let member = rows.iter().find(|w| w["id"] == "gpu-member").unwrap();
    assert_eq!(stranger["state"], "ready", "{stranger}");
    assert!(stranger["load"].is_null(), "{stranger}");
    let reason = stranger["unreachable"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("Unauthenticated") && reason.contains("cluster token not recognised"),
        "{stranger}"
    );
    assert!(member["unreachable"].is_null(), "{member}");

    let (_, stats) = api(http, "/api/stats").await?;
    let gpu = stats["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["pool"] == "gpu"))
        .expect("gpu pool");
    assert_eq!(
        (
            gpu["workers"].clone(),
            gpu["ready"].clone(),
            gpu["unreachable"].clone(),
            gpu["ready_slots"].clone(),
            gpu["total_slots"].clone()
        ),
        (
            serde_json::json!(2),
            serde_json::json!(1),
            serde_json::json!(1),
            serde_json::json!(8),
            serde_json::json!(16)
        ),
        "{stats}"
    );
    let grpc = admin(control_plane.addr("grpc"))
        .await?
        .get_cluster_stats(v1::GetClusterStatsRequest {})
        .await?
        .into_inner();
    let gpu = grpc.pools.iter().find(|p| p.pool == "gpu").expect("gpu");
    assert_eq!((gpu.workers, gpu.ready, gpu.ready_slots), (2, 1, 8));

    let log = std::fs::read_to_string(&control_plane.log)?;
    let failing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("load stream") && l.contains("WARN"))
        .collect();
    assert_eq!(failing.len(), 1, "one line when it starts failing:\n{log}");
    assert!(
        failing[0].contains("gpu-stranger") && failing[0].contains("cluster token not recognised"),
        "{}",
        failing[0]
    );

    // The page's row and totals say the same.
    let browser = Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    wait_until(
        PATIENCE,
        "the row to say why there is no stream",
        || async {
            browser
                .text("tr[data-worker-id='gpu-stranger'] td:nth-child(11)")
                .await
                .is_ok_and(|t| {
                    t.contains("no stream") && t.contains("cluster token not recognised")
                })
        },
    )
    .await?;
    let unreachable = browser
        .execute(
            "const th = [...document.querySelectorAll('#totals thead th')];
             const at = th.findIndex(h => h.textContent === 'unreachable');
             const row = [...document.querySelectorAll('#totals tbody tr')]
               .find(tr => tr.children[0].textContent === 'gpu');
             return at < 0 || !row ? null : row.children[at].textContent;",
            vec![],
        )
        .await?;
    assert_eq!(unreachable, serde_json::json!("1"));
    browser.close().await?;
    Ok(())
}

/// `switchyard admin workers` (and `ListWorkers` under it) says of a worker the control plane
/// has no load stream to what `/api/workers` and the dashboard say: unreachable, and why. It
/// listed such a worker as `ready`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_lists_a_worker_the_control_plane_cannot_reach_as_unreachable()
-> anyhow::Result<()> {
    let cluster = cluster_with_a_stranger().await?;
    let http = cluster.control_plane.addr("http");
    poll_until(
        PATIENCE,
        "the dashboard to call gpu-stranger unreachable",
        || async {
            let (_, body) = api(http, "/api/workers").await.ok()?;
            let rows = body["workers"].as_array()?.clone();
            let row = |id: &str| rows.iter().find(|w| w["id"] == id).cloned();
            (!row("gpu-stranger")?["unreachable"].is_null()
                && !row("gpu-member")?["load"].is_null())
            .then_some(())
        },
    )
    .await?;

    let grpc = cluster.control_plane.addr("grpc");
    let workers = admin(grpc)
        .await?
        .list_workers(v1::ListWorkersRequest::default())
        .await?
        .into_inner()
        .workers;
    let listed = |id: &str| workers.iter().find(|w| w.id == id).expect("listed");
    let (stranger, member) = (listed("gpu-stranger"), listed("gpu-member"));
    // The record's state, as the worker advertises it, and why it is not ready capacity.
    assert_eq!(stranger.state, "ready");
    let down = stranger.unreachable.as_ref().expect("unreachable");
    assert!(
        down.reason.contains("Unauthenticated")
            && down.reason.contains("cluster token not recognised"),
        "{down:?}"
    );
    assert!(down.attempts >= 1 && down.since_unix_ms > 0, "{down:?}");
    assert_eq!(member.unreachable, None);

    let (code, table, err) = switchyard_admin(&grpc.to_string(), &["workers"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        state_of(&table, "gpu-stranger").as_deref(),
        Some("unreachable"),
        "{table}"
    );
    let stranger = table_row(&table, "gpu-stranger").unwrap_or_default();
    assert!(
        stranger.contains("cluster token not recognised"),
        "the line says why: {table}"
    );
    assert_eq!(
        state_of(&table, "gpu-member").as_deref(),
        Some("ready"),
        "{table}"
    );
    Ok(())
}

/// Refused admin writes are logged (WARN `admin refused`: who when known, the front door, the
/// action and why, never the token) and counted by reason and front door, on gRPC and on the
/// dashboard alike; only successful writes used to leave a trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_admin_writes_are_logged_and_counted_without_the_token() -> anyhow::Result<()> {
    use switchyard_tests::{OPERATOR_TOKEN as OPERATOR, VIEWER_TOKEN as VIEWER};
    const GUESS: &str = "guessed-token-0123456789abcdef";
    let dir = tempfile::tempdir()?;
    let tokens = switchyard_tests::admin_tokens_file(&dir)?;
    let etcd = switchyard_tests::Etcd::start().await?;
    let control_plane = start_control_plane(
        &etcd.url,
        "control-plane-0",
        &[
            "--admin-tokens-file",
            &tokens,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
    )
    .await?;
    let metrics = control_plane.metrics_url();
    let series = |reason: &str, via: &str| {
        format!(
            "switchyard_control_plane_admin_refusals_total{{reason=\"{reason}\",via=\"{via}\"}}"
        )
    };
    // Series exist at 0 before the first refusal, so a rate reads 0, not "no data".
    assert_eq!(
        metric(&metrics, &series("unknown", "grpc")).await?,
        Some(0.0)
    );

    let mut admin = admin(control_plane.addr("grpc")).await?;
    let refused = |token: Option<&str>| switchyard_tests::with_bearer(drain("gpu-0"), token);
    let err = admin.drain(refused(None)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = admin.drain(refused(Some(GUESS))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = admin
        .set_policy(switchyard_tests::with_bearer(
            v1::SetPolicyRequest {
                merge: true,
                document: "{}".into(),
            },
            Some(VIEWER),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let http = control_plane.addr("http");
    let client = reqwest::Client::new();
    let post = |path: &str| {
        client
            .post(format!("http://{http}{path}"))
            .header("content-type", "application/json")
            .header("x-switchyard-csrf", "1")
    };
    let response = post("/api/workers/gpu-0/drain")
        .bearer_auth(GUESS)
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    let response = post("/api/workers/gpu-0/undrain")
        .bearer_auth(VIEWER)
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
    let response = post("/api/session")
        .body(serde_json::json!({ "token": GUESS }).to_string())
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);

    for (reason, via, count) in [
        ("missing", "grpc", 1.0),
        ("unknown", "grpc", 1.0),
        ("viewer", "grpc", 1.0),
        ("unknown", "dashboard", 2.0),
        ("viewer", "dashboard", 1.0),
        ("malformed", "grpc", 0.0),
    ] {
        assert_eq!(
            metric(&metrics, &series(reason, via)).await?,
            Some(count),
            "{reason} via {via}"
        );
    }
    let log = std::fs::read_to_string(&control_plane.log)?;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admin refused"))
        .collect();
    assert_eq!(lines.len(), 6, "one line a refusal:\n{log}");
    assert!(lines.iter().all(|l| l.contains("WARN")), "{lines:#?}");
    let viewer_write = lines
        .iter()
        .find(|l| l.contains("via=\"grpc\"") && l.contains("reason=\"viewer\""))
        .expect("the viewer's gRPC refusal");
    assert!(
        viewer_write.contains("who=victor")
            && viewer_write.contains("set the policy")
            && viewer_write.contains("peer=127.0.0.1:"),
        "{viewer_write}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("via=\"dashboard\"") && l.contains("sign in")),
        "{lines:#?}"
    );
    // Each names the caller's address, the dashboard's too (it had none); the metric does
    // not: one series per address would be unbounded.
    assert!(
        lines.iter().all(|l| l.contains("peer=127.0.0.1:")),
        "{lines:#?}"
    );
    let exposition = reqwest::get(&metrics).await?.text().await?;
    let refusal_series: Vec<&str> = exposition
        .lines()
        .filter(|l| l.starts_with("switchyard_control_plane_admin_refusals_total"))
        .collect();
    assert!(
        refusal_series
            .iter()
            .all(|l| l.contains("{reason=") && !l.contains("127.0.0.1") && !l.contains("peer")),
        "{refusal_series:#?}"
    );
    for token in [OPERATOR, VIEWER, GUESS] {
        assert!(!log.contains(token), "a token reached the log:\n{log}");
    }
    Ok(())
}

/// Over TLS too, the dashboard's refusals are logged with the caller's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_dashboards_refusals_name_the_callers_address() -> anyhow::Result<()> {
    const GUESS: &str = "guessed-token-0123456789abcdef";
    let dir = tempfile::tempdir()?;
    let tokens = switchyard_tests::admin_tokens_file(&dir)?;
    let pki = switchyard::tls::LocalPki::generate(&["control-plane"])?;
    let files = pki.files("control-plane");
    let arg = |p: &Option<std::path::PathBuf>| p.as_ref().expect("generated").display().to_string();
    let (cert, key, ca) = (
        arg(&files.cert_file),
        arg(&files.key_file),
        arg(&files.ca_file),
    );
    let etcd = switchyard_tests::Etcd::start().await?;
    let control_plane = start_control_plane(
        &etcd.url,
        "control-plane-0",
        &[
            "--admin-tokens-file",
            &tokens,
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-file",
            &ca,
        ],
    )
    .await?;
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca)?)?)
        .build()?;
    let http = control_plane.addr("http");
    let post = |path: &str| {
        client
            .post(format!("https://{http}{path}"))
            .header("content-type", "application/json")
            .header("x-switchyard-csrf", "1")
    };
    let response = post("/api/workers/gpu-0/drain")
        .bearer_auth(GUESS)
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    let response = post("/api/session")
        .body(serde_json::json!({ "token": GUESS }).to_string())
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);

    let lines = poll_until(PATIENCE, "both refusals in the log", || async {
        let log = std::fs::read_to_string(&control_plane.log).ok()?;
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("admin refused"))
            .map(str::to_string)
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await?;
    assert!(
        lines
            .iter()
            .all(|l| l.contains("via=\"dashboard\"") && l.contains("peer=127.0.0.1:")),
        "{lines:#?}"
    );
    Ok(())
}

/// A decision of router `direct` for `request_id`, and its outcome (completed).
fn direct_decision(request_id: &str) -> v1::RouterReport {
    v1::RouterReport {
        report: Some(v1::router_report::Report::Decision(v1::RoutingDecision {
            request_id: request_id.into(),
            router_id: "direct".into(),
            at_unix_ms: unix_ms(),
            lane: "cost-sensitive".into(),
            lane_origin: "default".into(),
            worker_id: "gpu-0".into(),
            pool: "gpu".into(),
            reason: "home".into(),
            ..Default::default()
        })),
    }
}

fn direct_outcome(request_id: &str) -> v1::RouterReport {
    v1::RouterReport {
        report: Some(v1::router_report::Report::Outcome(v1::RequestOutcome {
            request_id: request_id.into(),
            at_unix_ms: unix_ms(),
            status: "completed".into(),
            worker_id: "gpu-0".into(),
            pool: "gpu".into(),
            ttft_ms: 12.0,
            slo_met: true,
            ..Default::default()
        })),
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The text of the SLO cell of `request_id`'s row in the dashboard's feed ("" without a row).
async fn feed_slo(browser: &Browser, request_id: &str) -> String {
    browser
        .text(&format!(
            "#decisions tr[data-request-id='{request_id}'] td:nth-child(9)"
        ))
        .await
        .unwrap_or_default()
}

/// After a leader change the page's decision feed follows the new leader's feed (whose count
/// starts again from 0) without a reload, and a request the old leader recorded as running
/// shows its outcome as unknown: it was reported ending to the new leader. (The page kept
/// asking for decisions after the old leader's count: nothing showed for minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_leader_change_the_pages_decision_feed_follows_the_new_leader() -> anyhow::Result<()>
{
    let etcd = switchyard_tests::Etcd::start().await?;
    let mut old =
        start_control_plane(&etcd.url, "control-plane-0", &["--leader-ttl", "2s"]).await?;
    old.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let new = start_control_plane(&etcd.url, "control-plane-1", &[]).await?;
    new.wait_for_log("following the control-plane leader", PATIENCE)
        .await?;

    // The old leader's feed counts well past what the new one will: 250 decisions (more than
    // the page shows), all but the last ended.
    let mut reports = Vec::new();
    for i in 0..250 {
        let id = format!("old-{i}");
        reports.push(direct_decision(&id));
        if i != 249 {
            reports.push(direct_outcome(&id));
        }
    }
    let summary = admin(old.addr("grpc"))
        .await?
        .report(tokio_stream::iter(reports))
        .await?
        .into_inner();
    assert_eq!(summary.accepted, 499);

    // The page is open on the follower, which shows the leader's feed.
    let http = new.addr("http");
    let browser = Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    wait_until(PATIENCE, "the page to show old-249 running", || async {
        feed_slo(&browser, "old-249").await == "running"
    })
    .await?;
    assert_eq!(feed_slo(&browser, "old-248").await, "met");

    old.kill().await?;
    new.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    // The new leader's feed: a few decisions (its count far below the old one's), and the
    // end of old-249, which it has no decision for.
    let mut reports = vec![direct_outcome("old-249")];
    for i in 0..3 {
        let id = format!("new-{i}");
        reports.push(direct_decision(&id));
        reports.push(direct_outcome(&id));
    }
    let summary = admin(new.addr("grpc"))
        .await?
        .report(tokio_stream::iter(reports))
        .await?
        .into_inner();
    assert_eq!(summary.accepted, 7);

    // Without a reload, the page shows the new leader's decisions, newest first, above the
    // old leader's rows.
    wait_until(
        PATIENCE,
        "the page to show the new leader's decisions",
        || async { feed_slo(&browser, "new-2").await == "met" },
    )
    .await?;
    let order = browser
        .execute(
            "return [...document.querySelectorAll('#decisions tbody tr')].map(r => r.dataset.requestId);",
            vec![],
        )
        .await?;
    let order: Vec<String> = serde_json::from_value(order)?;
    assert_eq!(
        order[..4],
        ["new-2", "new-1", "new-0", "old-249"],
        "{order:?}"
    );
    // The page shows its 200 newest rows.
    assert_eq!(order.len(), 200, "{order:?}");
    // The old leader's running row can no longer end: its outcome is unknown, and says why.
    assert_eq!(feed_slo(&browser, "old-249").await, "unknown");
    let why = browser
        .execute(
            "return document.querySelector(\"#decisions tr[data-request-id='old-249'] td:nth-child(9)\").title;",
            vec![],
        )
        .await?;
    assert!(
        why.as_str()
            .is_some_and(|t| t.contains("Outcome unknown") && t.contains("control-plane-0")),
        "{why}"
    );
    assert_eq!(feed_slo(&browser, "old-248").await, "met");
    let note = browser.text("#feed-moved").await?;
    assert!(
        shown(&browser, "#feed-moved").await?
            && note.contains("from control-plane-0")
            && note.contains("the leader control-plane-1"),
        "{note}"
    );
    browser
        .click("#decisions tr[data-request-id='old-249']")
        .await?;
    browser
        .wait_for_text(
            PATIENCE,
            "the story of old-249 to open",
            "#story",
            "Outcome unknown: recorded by control-plane-0",
        )
        .await?;
    browser.close().await?;

    // The API names the feed; a cursor of the old feed is answered from the start, saying so.
    let (_, feed) = api(http, "/api/decisions").await?;
    assert_eq!(feed["feed"]["replica"], "control-plane-1", "{feed}");
    assert_eq!(feed["seq"], 7, "{feed}");
    let epoch = feed["feed"]["epoch"].as_i64().unwrap_or_default();
    assert!(epoch > 0, "{feed}");
    for path in [
        "/api/decisions?since=499".to_string(),
        format!("/api/decisions?since=2&epoch={}", epoch - 1),
    ] {
        let (_, reset) = api(http, &path).await?;
        assert_eq!(reset["reset"], true, "{path}: {reset}");
        assert_eq!(
            reset["decisions"].as_array().map(Vec::len),
            Some(3),
            "{reset}"
        );
    }
    let (_, next) = api(http, &format!("/api/decisions?since=5&epoch={epoch}")).await?;
    assert_eq!(next["reset"], false, "{next}");
    assert_eq!(next["decisions"][0]["request_id"], "new-2", "{next}");
    Ok(())
}

/// A dashboard whose control plane hangs (SIGSTOP: connections accepted, nothing answered)
/// says so within seconds — in red, in a banner, on the replica badge — instead of showing its
/// last answer as current, and clears it when answers resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_whose_control_plane_hangs_says_so_until_it_answers_again() -> anyhow::Result<()>
{
    let (_etcd, plane) = leading_control_plane().await?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", plane.addr("http")))
        .await?;
    let fresh = || async {
        let state = browser
            .execute(
                "const f = document.getElementById('freshness');
                 return [f.className, f.textContent, document.getElementById('replica').textContent];",
                vec![],
            )
            .await
            .unwrap_or_default();
        serde_json::from_value::<(String, String, String)>(state).unwrap_or_default()
    };
    wait_until(PATIENCE, "the page to show the leader, fresh", || async {
        let (class, text, replica) = fresh().await;
        class == "freshness" && text.starts_with("updated") && replica.contains(": leader")
    })
    .await?;
    assert!(!browser.shown("stale").await);

    plane.pause()?;
    let stale = wait_until(
        Duration::from_secs(15),
        "the page to turn stale",
        || async {
            let (class, _, replica) = fresh().await;
            class == "freshness stale" && replica.contains("no answer for")
        },
    )
    .await;
    let (class, text, replica) = fresh().await;
    let banner = browser.text("#stale").await.unwrap_or_default();
    plane.resume()?;
    let took = stale?;
    eprintln!("stale after {took:?}: {text:?} / {replica:?} / {banner:?}");
    // Five seconds without an answer, on a half-second timer.
    assert!(took < Duration::from_secs(9), "{took:?}");
    assert_eq!(class, "freshness stale");
    assert!(text.starts_with("no answer for"), "{text}");
    assert!(replica.contains("was leader at"), "{replica}");
    assert!(
        banner.starts_with("No answer from this control plane (control-plane-0)")
            && banner.contains("another replica may have taken over as leader"),
        "{banner}"
    );

    // It answers again: the warning goes.
    wait_until(PATIENCE, "the page to be fresh again", || async {
        let (class, text, replica) = fresh().await;
        class == "freshness" && text.starts_with("updated") && !replica.contains("no answer")
    })
    .await?;
    assert!(!browser.shown("stale").await);
    browser.close().await?;
    Ok(())
}

/// A worker record with a long id (ids have no length limit: a generated one, a pod's DNS
/// name) among fifty ordinary ones: every row's state, load and drain button stay in the
/// window, and so does the routing policy beside the events. The id column grew to the id's
/// width and pushed them past the right edge on every row, behind a horizontal scrollbar; the
/// id's "joined" event widened the events column and pushed the policy out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_worker_id_keeps_every_rows_drain_button_in_view() -> anyhow::Result<()> {
    use switchyard_cluster::{Capacity, Pool, Registry as _, WorkerRecord, WorkerState};
    let (etcd, plane) = leading_control_plane().await?;
    let registry = etcd.registry().await?;
    let record = |id: String| WorkerRecord {
        id,
        pool: Pool::Gpu,
        address: "127.0.0.1:9".into(),
        models: vec!["m".into()],
        capacity: Capacity {
            max_concurrent: 8,
            tokens_per_s: 50.0,
            cost_per_mtok: 0.5,
        },
        hardware: "test".into(),
        engine: "synthetic".into(),
        version: "0".into(),
        state: WorkerState::Ready,
        scores_prompts: false,
        embeds: false,
    };
    let long = format!("gpu-{}", "7f3a".repeat(30));
    let mut registrations = Vec::new();
    for id in (0..50).map(|i| format!("gpu-{i:02}")).chain([long.clone()]) {
        registrations.push(registry.register(record(id), PATIENCE).await?);
    }
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", plane.addr("http")))
        .await?;
    wait_until(PATIENCE, "the page to list 51 workers", || async {
        page_worker_ids(&browser)
            .await
            .is_ok_and(|ids| ids.len() == 51)
    })
    .await?;
    // Rows whose drain button ends past the window's right edge, and the elements that reach
    // past it (the page scrolls sideways then), once the page has laid the rows out.
    let layout = || async {
        browser
            .execute(
                "const width = document.documentElement.clientWidth;
                 const cut = [...document.querySelectorAll('#workers tbody tr')]
                   .filter(tr => tr.querySelector('button').getBoundingClientRect().right > width)
                   .map(tr => tr.dataset.workerId);
                 const wide = [...document.querySelectorAll('body *')]
                   .filter(e => e.getBoundingClientRect().right > width + 1)
                   .slice(0, 5).map(e => `${e.tagName}#${e.id}.${e.className}`);
                 return [cut, wide];",
                vec![],
            )
            .await
            .unwrap_or_default()
    };
    let fits = wait_until(
        Duration::from_secs(10),
        "every row to fit the window",
        || async { layout().await == serde_json::json!([[], []]) },
    )
    .await;
    assert!(fits.is_ok(), "{}", layout().await);
    // The long id is shown whole, not cut.
    assert_eq!(
        browser
            .text(&format!("tr[data-worker-id='{long}'] td:nth-child(2)"))
            .await?,
        long
    );
    browser.close().await?;
    drop(registrations);
    Ok(())
}

/// The line under the decision feed says why no row shows: with the trouble filter on and
/// only requests that met their SLO, that none is in trouble (it said "No decision reported
/// yet: routers report once they reach this control plane", sending on-call to look for a
/// reporting fault); while the feed cannot be read, that it cannot — and no longer once it
/// can (the error stayed until the next decision arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decision_feeds_empty_line_says_why_it_is_empty() -> anyhow::Result<()> {
    let (_etcd, plane) = leading_control_plane().await?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", plane.addr("http")))
        .await?;
    let note = || async {
        let shown = browser.shown("no-decisions").await;
        let text = browser.text("#no-decisions").await.unwrap_or_default();
        (shown, text)
    };
    wait_until(
        PATIENCE,
        "the page to say no decision is reported",
        || async {
            note().await
                == (
                    true,
                    "No decision reported yet: routers report once they reach this control plane."
                        .into(),
                )
        },
    )
    .await?;
    admin(plane.addr("grpc"))
        .await?
        .report(tokio_stream::iter([
            direct_decision("fine-0"),
            direct_outcome("fine-0"),
        ]))
        .await?;
    wait_until(PATIENCE, "fine-0 to be listed, met", || async {
        feed_slo(&browser, "fine-0").await == "met"
    })
    .await?;
    assert!(!browser.shown("no-decisions").await, "{:?}", note().await);

    browser.click("#only-trouble").await?;
    assert_eq!(feed_slo(&browser, "fine-0").await, "", "filtered out");
    assert_eq!(
        note().await,
        (
            true,
            "No SLO miss, shed or failed request among the 1 latest decisions.".into()
        )
    );

    plane.pause()?;
    let unreadable = wait_until(
        Duration::from_secs(15),
        "the page to say the feed cannot be read",
        || async {
            note()
                .await
                .1
                .starts_with("Cannot read the decision feed: no answer within")
        },
    )
    .await;
    plane.resume()?;
    unreadable?;
    wait_until(PATIENCE, "the page to read the feed again", || async {
        note().await.1 == "No SLO miss, shed or failed request among the 1 latest decisions."
    })
    .await?;
    browser.click("#only-trouble").await?;
    wait_until(PATIENCE, "fine-0 to be listed again", || async {
        feed_slo(&browser, "fine-0").await == "met"
    })
    .await?;
    assert!(!browser.shown("no-decisions").await, "{:?}", note().await);
    browser.close().await?;
    Ok(())
}

/// A decision's story opens from the keyboard: its row takes the focus (Tab) and Enter opens
/// it. The rows answered only mouse clicks: a keyboard user could not reach any story.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decisions_story_opens_from_the_keyboard() -> anyhow::Result<()> {
    let (_etcd, plane) = leading_control_plane().await?;
    admin(plane.addr("grpc"))
        .await?
        .report(tokio_stream::iter([
            direct_decision("key-0"),
            direct_outcome("key-0"),
        ]))
        .await?;
    let browser = Browser::start().await?;
    browser
        .goto(&format!("http://{}/", plane.addr("http")))
        .await?;
    wait_until(PATIENCE, "key-0 to be listed", || async {
        feed_slo(&browser, "key-0").await == "met"
    })
    .await?;
    assert!(!browser.shown("story").await);
    // WebDriver's Enter key, sent to the row as a keyboard user's would be.
    browser
        .type_text("#decisions tr[data-request-id='key-0']", "\u{E007}")
        .await?;
    wait_until(PATIENCE, "the story of key-0 to open", || async {
        browser.shown("story").await
            && browser
                .text("#story h3")
                .await
                .is_ok_and(|t| t == "Request key-0")
    })
    .await?;
    let focused = browser
        .execute(
            "return document.activeElement.dataset.requestId || null;",
            vec![],
        )
        .await?;
    assert_eq!(focused, "key-0", "the row keeps the focus when redrawn");
    browser.close().await?;
    Ok(())
}

/// A leader frozen past its lease (SIGSTOP) while another replica takes over keeps none of
/// the reports a router sent it — neither those buffered during the freeze, read at once when
/// it wakes (they showed as a spike of tokens/s at the wrong time), nor those that come after,
/// while it no longer leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_folds_no_reports_into_its_history() -> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let old = start_control_plane(
        &etcd.url,
        "control-plane-0",
        &["--leader-ttl", "2s", "--metrics-addr", "127.0.0.1:0"],
    )
    .await?;
    old.wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let new = start_control_plane(&etcd.url, "control-plane-1", &["--leader-ttl", "2s"]).await?;
    new.wait_for_log("following the control-plane leader", PATIENCE)
        .await?;

    // A router's report stream to the leader: a second's stats every 250 ms, 100 gpu tokens
    // each, sent on whatever happens to the leader.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut client = admin(old.addr("grpc")).await?;
    let stream = tokio::spawn(async move {
        client
            .report(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let sender = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            every.tick().await;
            let stats = v1::RouterReport {
                report: Some(v1::router_report::Report::Stats(v1::RouterStats {
                    router_id: "router-0".into(),
                    at_unix_ms: unix_ms(),
                    pools: vec![v1::PoolTokens {
                        pool: "gpu".into(),
                        tokens: 100,
                    }],
                    decisions: 1,
                    ..Default::default()
                })),
            };
            if tx.send(stats).await.is_err() {
                return;
            }
        }
    });
    // This replica's own history (a follower would forward the read to the leader).
    let own_history = |http: std::net::SocketAddr| async move {
        let response = reqwest::Client::new()
            .get(format!("http://{http}/api/history"))
            .header("x-switchyard-forwarded", "1")
            .send()
            .await?;
        anyhow::Ok(response.json::<Value>().await?)
    };
    let http = old.addr("http");
    wait_until(
        PATIENCE,
        "the leader to keep the router's tokens",
        || async {
            own_history(http).await.is_ok_and(|h| {
                history_sum(&h, |p| {
                    p["pools"]["gpu"]["tokens_per_s"].as_u64().unwrap_or(0)
                }) > 0
            })
        },
    )
    .await?;

    old.pause()?;
    let frozen_at = unix_ms() / 1000;
    let took_over = new
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await;
    // Frozen well past the lease: the stats sent meanwhile wait in its socket.
    tokio::time::sleep(Duration::from_secs(4)).await;
    old.resume()?;
    took_over?;
    // It hears it lost the lead; the router still sends (it has not noticed yet).
    wait_until(PATIENCE, "the old leader to follow", || async {
        api(http, "/api/stats")
            .await
            .is_ok_and(|(_, s)| s["role"] == "follower")
    })
    .await?;
    // Seconds sealed since the freeze: the stats that waited in its socket, then more.
    let sealed_since = |history: &Value| {
        history["points"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["t"].as_i64().is_some_and(|t| t > frozen_at))
            .count()
    };
    wait_until(
        PATIENCE,
        "the old leader to seal three seconds since",
        || async {
            own_history(http)
                .await
                .is_ok_and(|history| sealed_since(&history) >= 3)
        },
    )
    .await?;
    sender.abort();
    stream.abort();

    let history = own_history(http).await?;
    let after: Vec<&Value> = history["points"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["t"].as_i64().is_some_and(|t| t > frozen_at))
        .collect();
    assert!(
        after.len() >= 3,
        "the old leader sealed seconds since: {history}"
    );
    for point in &after {
        assert_eq!(
            point["routers"], 0,
            "a report kept after the freeze: {point}"
        );
        assert_eq!(point["pools"]["gpu"]["tokens_per_s"], 0, "{point}");
        assert_eq!(point["decisions"], 0, "{point}");
    }
    let ignored = metric(
        &old.metrics_url(),
        "switchyard_control_plane_report_entries_ignored_total{reason=\"not_leader\"}",
    )
    .await?;
    assert!(ignored.is_some_and(|n| n >= 5.0), "{ignored:?}");
    old.wait_for_log("ignoring a router's reports", PATIENCE)
        .await?;
    Ok(())
}

/// A request the control plane cannot read is the client's fault, as at the router: bytes that
/// are not the request message are `INVALID_ARGUMENT`, a message announced over the 4 MiB limit
/// `RESOURCE_EXHAUSTED` — not tonic's own `INTERNAL` (a server bug, to a client) and
/// `OUT_OF_RANGE`. Sent at the frame level: client libraries do not send such requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_request_that_cannot_be_read_is_the_clients_fault() -> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let control_plane = start_control_plane(&etcd.url, "control-plane-0", &[]).await?;
    let grpc = control_plane.addr("grpc");
    // gRPC message prefixes: not compressed, then the length.
    let garbage: &[u8] = &[0, 0, 0, 0, 3, 0xff, 0xff, 0xff];
    let oversized: &[u8] = &[0, 0, 0x4c, 0x4b, 0x40]; // 5 000 000 bytes announced
    for (body, code) in [
        (garbage, tonic::Code::InvalidArgument),
        (oversized, tonic::Code::ResourceExhausted),
    ] {
        let (mut send, connection) =
            h2::client::handshake(tokio::net::TcpStream::connect(grpc).await?).await?;
        tokio::spawn(connection);
        let request = http::Request::post(format!("http://{grpc}/switchyard.v1.Admin/ListWorkers"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut stream) = send.send_request(request, false)?;
        stream.send_data(bytes::Bytes::from_static(body), true)?;
        let response = tokio::time::timeout(PATIENCE, response).await??;
        // A trailers-only answer: the status is in the headers.
        let Some(status) = tonic::Status::from_header_map(response.headers()) else {
            anyhow::bail!("no grpc-status in the answer's headers: {response:?}");
        };
        assert_eq!(status.code(), code, "{body:?}: {status:?}");
    }
    Ok(())
}

/// A `WatchEvents` call's `grpc-timeout` holds for its whole stream, as a router's `Session`'s
/// and `Generate`'s do: at the deadline the watch ends `DEADLINE_EXCEEDED`, whether or not the
/// client enforces the deadline itself (tonic's does not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_at_its_deadline() -> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let control_plane = start_control_plane(&etcd.url, "control-plane-0", &[]).await?;
    let mut admin = admin(control_plane.addr("grpc")).await?;
    let mut call = tonic::Request::new(v1::WatchEventsRequest::default());
    call.set_timeout(Duration::from_millis(500));
    let asked = Instant::now();
    let mut events = admin.watch_events(call).await?.into_inner();
    let status = loop {
        match tokio::time::timeout(PATIENCE, events.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("the watch ended OK"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        asked.elapsed() >= Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    Ok(())
}

/// One connection may open at most 1 024 streams on the control plane, as on a router (there
/// `--max-connection-streams`): it advertises the cap in its HTTP/2 SETTINGS (read here at the
/// frame level, before any client library applies it), so one client cannot open thousands of
/// `WatchEvents` streams — a read, open without a token — on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_connection_is_told_how_many_streams_it_may_open() -> anyhow::Result<()> {
    let etcd = switchyard_tests::Etcd::start().await?;
    let control_plane = start_control_plane(&etcd.url, "control-plane-0", &[]).await?;
    assert_eq!(
        switchyard_tests::advertised_stream_limit(control_plane.addr("grpc")).await?,
        1024
    );
    Ok(())
}

/// Reads `events` into `seen` until `done(seen)`.
async fn read_events_until(
    events: &mut tonic::Streaming<v1::ClusterEvent>,
    seen: &mut Vec<v1::ClusterEvent>,
    done: impl Fn(&[v1::ClusterEvent]) -> bool,
) -> anyhow::Result<()> {
    tokio::time::timeout(PATIENCE, async {
        while !done(seen) {
            let event = events.message().await?;
            seen.push(event.ok_or_else(|| anyhow::anyhow!("the watch ended; seen {seen:?}"))?);
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out; seen {seen:?}"))?
}

/// `WatchEvents` with `replay_recent`: a watcher that joins after events happened (an on-call
/// engineer after an incident) gets the last ones first, oldest first, then the live ones —
/// the very sequence a watcher open all along saw, with no gap and no duplicate where replay
/// meets live; `replay_recent: 0` gets only what follows; more than is kept is all there is.
/// `switchyard admin events --recent N` prints them, a line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_watch_replays_the_recent_events_then_follows_live_ones() -> anyhow::Result<()> {
    let (_etcd, plane) = leading_control_plane().await?;
    let mut admin = admin(plane.addr("grpc")).await?;
    let watcher = admin.clone();
    let watch = |replay_recent: u32| {
        let mut admin = watcher.clone();
        async move {
            anyhow::Ok(
                admin
                    .watch_events(v1::WatchEventsRequest { replay_recent })
                    .await?
                    .into_inner(),
            )
        }
    };
    // Each policy stored makes two events: the audit trail's ADMIN_WRITE (from the call) and
    // POLICY_CHANGED (from the etcd watch), in either order.
    let stored = |n: usize| {
        move |seen: &[v1::ClusterEvent]| {
            [Kind::AdminWrite, Kind::PolicyChanged]
                .iter()
                .all(|kind| seen.iter().filter(|e| e.kind() == *kind).count() == n)
        }
    };
    let policy = |lane: &str| v1::SetPolicyRequest {
        merge: false,
        document: format!(r#"{{"default_lane": "{lane}"}}"#),
    };
    // Open before anything happened: every event, the reference.
    let mut all_along = watch(0).await?;
    let mut reference = Vec::new();
    admin.set_policy(policy("latency-critical")).await?;
    read_events_until(&mut all_along, &mut reference, stored(1)).await?;

    // Two events have happened: watchers join now.
    let mut late = Vec::new();
    for replay in [1_000, 2, 1, 0] {
        late.push((replay, watch(replay).await?, Vec::new()));
    }
    admin.set_policy(policy("cost-sensitive")).await?;
    admin.set_policy(policy("latency-critical")).await?;
    read_events_until(&mut all_along, &mut reference, stored(3)).await?;
    assert_eq!(reference.len(), 6, "{reference:?}");
    for (replay, events, seen) in &mut late {
        let expected = &reference[2 - (*replay as usize).min(2)..];
        read_events_until(events, seen, |seen| seen.len() >= expected.len()).await?;
        assert_eq!(seen.as_slice(), expected, "replay_recent {replay}");
    }

    // The command prints the last two kept, then what happens next.
    let mut command = tokio::process::Command::new(switchyard_tests::switchyard_bin())
        .args(["admin", "events", "--recent", "2", "--control-plane"])
        .arg(plane.addr("grpc").to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        command.stdout.take().expect("piped"),
    ));
    let mut next_line = async || {
        tokio::time::timeout(PATIENCE, lines.next_line())
            .await?
            .map_err(anyhow::Error::from)?
            .ok_or_else(|| anyhow::anyhow!("switchyard admin events ended"))
    };
    let printed = |line: &str, event: &v1::ClusterEvent| {
        let kind = event
            .kind()
            .as_str_name()
            .trim_start_matches("KIND_")
            .to_lowercase();
        line.ends_with(&format!("  {kind}  {}", event.message))
    };
    for event in &reference[4..] {
        let line = next_line().await?;
        assert!(printed(&line, event), "{line:?} for {event:?}");
    }
    admin.set_policy(policy("cost-sensitive")).await?;
    read_events_until(&mut all_along, &mut reference, stored(4)).await?;
    for event in &reference[6..] {
        let line = next_line().await?;
        assert!(printed(&line, event), "{line:?} for {event:?}");
    }
    command.kill().await?;
    Ok(())
}

/// What the dashboard writes for the first `<time>` under `css`: [its text, its `datetime`,
/// its tooltip, the page's own date ("Dec 5") and time of day of that instant].
async fn shown_time(browser: &Browser, css: &str) -> anyhow::Result<[String; 5]> {
    let value = browser
        .execute(
            "const t = document.querySelector(arguments[0]);
             if (!t) return null;
             const at = new Date(t.dateTime);
             return [t.textContent, t.dateTime, t.title,
                     at.toLocaleDateString(undefined, { month: 'short', day: 'numeric' }),
                     at.toLocaleTimeString()];",
            vec![serde_json::json!(css)],
        )
        .await?;
    Ok(serde_json::from_value(value)?)
}

/// The dashboard's times say which day when it is not today: an on-call engineer must tell
/// last night's event from this morning's. Today's are the time of day alone; every one has
/// the whole instant (ISO 8601) in `datetime` and its tooltip. The events and the decision
/// feed are read at the control plane's today, then with the page's clock two days on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_dates_times_not_from_today() -> anyhow::Result<()> {
    let (_etcd, plane) = leading_control_plane().await?;
    let mut admin = admin(plane.addr("grpc")).await?;
    admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: r#"{"default_lane": "cost-sensitive"}"#.into(),
        })
        .await?;
    admin
        .report(tokio_stream::iter([
            direct_decision("dated-0"),
            direct_outcome("dated-0"),
        ]))
        .await?;
    let event = "#events li time";
    let decision = "#decisions tr[data-request-id='dated-0'] time";
    let url = format!("http://{}/", plane.addr("http"));
    let browser = Browser::start().await?;
    for days_on in [0, 2] {
        if days_on > 0 {
            browser
                .clock_ahead(Duration::from_secs(days_on * 24 * 3600))
                .await?;
        }
        browser.goto(&url).await?;
        wait_until(
            PATIENCE,
            "the page to list the event and the decision",
            || async {
                shown_time(&browser, event).await.is_ok()
                    && shown_time(&browser, decision).await.is_ok()
            },
        )
        .await?;
        for css in [event, decision] {
            let [text, datetime, title, date, time] = shown_time(&browser, css).await?;
            assert!(
                datetime.ends_with('Z') && datetime.contains('T') && title == datetime,
                "{css}: datetime {datetime:?}, title {title:?}"
            );
            if days_on == 0 {
                assert_eq!(text, time, "{css} today");
            } else {
                assert_eq!(text, format!("{date} {time}"), "{css} {days_on} days on");
                assert!(date.chars().any(|c| c.is_ascii_digit()), "{date}");
            }
        }
    }
    browser.close().await?;
    Ok(())
}
