//! Reliability guarantees of the router, checked from outside like a chaos run: separate
//! processes on a real etcd, the synthetic load-test engine on the workers.

use std::time::Duration;

use switchyard_proto::v1::{self, RequestClass, inference_client::InferenceClient};
use switchyard_tests::{Cluster, ClusterSpec, Component, Etcd, free_port, strings, wait_until};
use switchyard_worker::synthetic::synthetic_text;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Sum of every sample of `name` in a Prometheus text exposition; `None` when absent.
fn metric_sum(exposition: &str, name: &str) -> Option<f64> {
    let samples: Vec<f64> = exposition
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}

/// etcd's default keepalive enforcement (`--grpc-keepalive-min-time` 5 s, no pings without an
/// open stream) answers a client that pings more often with GOAWAY "too many pings" after three
/// strikes and closes its connection: every watch on it breaks and re-lists. A quiet cluster —
/// nothing written, so nothing resets the strikes — must keep its watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_cluster_keeps_its_etcd_watches() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        metrics: true,
        ..Default::default()
    })
    .await?;
    // The observation window itself (no event to await: the claim is that nothing happens).
    // Several times etcd's strike window: a client pinging too often is cut off within ~9 s.
    tokio::time::sleep(Duration::from_secs(21)).await;
    let log = std::fs::read_to_string(&cluster.router.log)?;
    let broken: Vec<&str> = log.lines().filter(|l| l.contains("watch failed")).collect();
    assert!(
        broken.is_empty(),
        "the router's etcd watches broke in a quiet cluster:\n{}",
        broken.join("\n")
    );
    // Every component exposes the count of the watches it keeps, at 0 from the start.
    for (component, watches) in kept_watches(&cluster) {
        let metrics = reqwest::get(component.metrics_url()).await?.text().await?;
        for watch in watches {
            assert_eq!(
                watch_restarts(&metrics, watch),
                Some(0.0),
                "{}: restarts of its {watch} watch in a quiet cluster:\n{metrics}",
                component.name
            );
        }
    }
    Ok(())
}

/// The etcd watches each component of `cluster` keeps (the `watch` labels it counts).
fn kept_watches(cluster: &Cluster) -> [(&Component, &'static [&'static str]); 3] {
    [
        (&cluster.router, &["workers", "policy", "control_plane"]),
        (&cluster.gpu[0], &["drain"]),
        (&cluster.control_plane, &["workers", "policy"]),
    ]
}

/// `switchyard_etcd_watch_restarts_total{watch="<watch>"}` in an exposition; `None` when absent.
fn watch_restarts(exposition: &str, watch: &str) -> Option<f64> {
    let series = format!("switchyard_etcd_watch_restarts_total{{watch=\"{watch}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&series)?.parse().ok())
}

/// etcd frozen (SIGSTOP: connections stay open, nothing answers) until the components' etcd
/// keepalives give up on it: every component's watches break, and each counts its own — the
/// router's, a worker's drain watch, the control plane's membership and policy watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_counts_its_etcd_watch_restarts() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        metrics: true,
        ..Default::default()
    })
    .await?;
    let components = kept_watches(&cluster);
    cluster.etcd.pause()?;
    // Each restart is counted when its watch breaks, before etcd is back.
    let counted = wait_until(
        Duration::from_secs(60),
        "every component to count its broken etcd watches",
        || async {
            for (component, watches) in components {
                let Ok(metrics) = scrape(&component.metrics_url()).await else {
                    return false;
                };
                if !watches
                    .iter()
                    .all(|watch| watch_restarts(&metrics, watch).is_some_and(|n| n >= 1.0))
                {
                    return false;
                }
            }
            true
        },
    )
    .await;
    cluster.etcd.resume()?;
    if let Err(error) = counted {
        let mut seen = String::new();
        for (component, _) in components {
            let metrics = scrape(&component.metrics_url()).await.unwrap_or_default();
            let lines: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("switchyard_etcd_watch_restarts_total"))
                .collect();
            seen.push_str(&format!("{}: {lines:?}\n", component.name));
        }
        anyhow::bail!("{error}\n{seen}");
    }
    // The worker's drain watch comes back once etcd answers again.
    cluster.gpu[0]
        .wait_for_log("etcd key watch working again", Duration::from_secs(60))
        .await?;
    Ok(())
}

/// A control plane counts one restart per etcd key it watches per freeze: it kept two watches
/// of the policy key (one for the event feed, one for the history's SLOs), so every freeze
/// counted two policy restarts, and an alert on the count read double.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_counts_one_restart_per_watched_key_per_etcd_freeze() -> anyhow::Result<()>
{
    let etcd = Etcd::start().await?;
    let control_plane = switchyard_tests::start_control_plane(
        &etcd.url,
        "control-plane-0",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await?;
    etcd.pause()?;
    let broken = wait_until(
        Duration::from_secs(60),
        "the control plane's etcd watches to break",
        || async {
            let Ok(metrics) = scrape(&control_plane.metrics_url()).await else {
                return false;
            };
            ["workers", "policy"]
                .iter()
                .all(|watch| watch_restarts(&metrics, watch).is_some_and(|n| n >= 1.0))
        },
    )
    .await;
    etcd.resume()?;
    broken?;
    // Once its watches work again, every watch that broke has counted its restart.
    for recovered in [
        "etcd membership watch working again",
        "etcd key watch working again",
    ] {
        control_plane
            .wait_for_log(recovered, Duration::from_secs(60))
            .await?;
    }
    let metrics = scrape(&control_plane.metrics_url()).await?;
    for watch in ["workers", "policy"] {
        assert_eq!(
            watch_restarts(&metrics, watch),
            Some(1.0),
            "restarts of the {watch} watch for one freeze:\n{metrics}"
        );
    }
    let log = std::fs::read_to_string(&control_plane.log)?;
    let policy_failures = log
        .lines()
        .filter(|l| l.contains("etcd key watch failed") && l.contains("/switchyard/v1/policy"))
        .count();
    assert_eq!(policy_failures, 1, "one policy watch broke:\n{log}");
    Ok(())
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
}

/// A router started while etcd is unreachable runs, says it is not serving (gRPC health,
/// HTTP `/health`, `UNAVAILABLE` requests), keeps trying, and serves as soon as etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_starts_without_etcd_and_serves_once_etcd_answers() -> anyhow::Result<()> {
    let etcd_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let router = Component::start(
        "router-before-etcd",
        &strings(&[
            "router",
            "--etcd",
            &etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]),
        2,
    )
    .await?;
    let grpc = router.addr("grpc").to_string();

    assert_eq!(
        health_of(&grpc, "switchyard.v1.Inference").await?,
        ServingStatus::NotServing
    );
    let health = reqwest::get(format!("http://{}/health", router.addr("http"))).await?;
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = health.json().await?;
    assert_eq!(body["status"], "starting", "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains("etcd")),
        "the reason names etcd: {body}"
    );
    // Not where it is, nor the client library's error text: /health is public.
    let internal = |text: &str| text.contains(&format!("{etcd_port}")) || text.contains("tonic");
    assert!(!internal(&body.to_string()), "{body}");
    let mut client = InferenceClient::new(switchyard_client::connect_channel(&grpc).await?);
    let request = switchyard_tests::synthetic_request(
        "too-early",
        RequestClass::CostSensitive,
        "wait for etcd",
        3,
    );
    let refused = client
        .generate(request.clone())
        .await
        .expect_err("no request is served before etcd answers");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    assert!(!internal(refused.message()), "{refused:?}");

    // etcd comes up on the port the router has been dialling, then a worker registers.
    let _etcd = Etcd::start_on(etcd_port).await?;
    let channel = switchyard_client::connect_channel(&grpc).await?;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "switchyard.v1.Inference".into(),
        })
        .await?
        .into_inner();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(status) = watch.message().await? {
            if status.status() == ServingStatus::Serving {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("health watch ended before SERVING")
    })
    .await
    .map_err(|_| anyhow::anyhow!("the router never became SERVING after etcd came up"))??;
    let _worker = Component::start(
        "gpu-after-etcd",
        &strings(&[
            "worker-gpu",
            "--etcd",
            &etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "gpu-0",
        ]),
        1,
    )
    .await?;
    wait_until(
        Duration::from_secs(30),
        "the router to route to the worker",
        || async {
            switchyard_tests::list_router_workers(&grpc)
                .await
                .is_ok_and(|ids| ids == ["gpu-0"])
        },
    )
    .await?;
    let mut stream = client.generate(request).await?.into_inner();
    let mut text = String::new();
    let mut finished = None;
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(v1::server_frame::Frame::Tokens(tokens)) => text.push_str(&tokens.text),
            Some(v1::server_frame::Frame::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    assert!(finished.is_some(), "the request finished");
    assert_eq!(text, synthetic_text("wait for etcd", 0, 3));
    let health = reqwest::get(format!("http://{}/health", router.addr("http"))).await?;
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    Ok(())
}

/// `service`'s status in the gRPC health of the component at `addr` ("" is the process).
async fn health_of(addr: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let channel = switchyard_client::connect_channel(addr).await?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner();
    Ok(response.status())
}

/// A component waiting for etcd: alive for a liveness probe (its process SERVING) and not
/// ready (`service` NOT_SERVING).
async fn assert_alive_but_not_ready(grpc: &str, service: &str) -> anyhow::Result<()> {
    assert_eq!(health_of(grpc, "").await?, ServingStatus::Serving);
    assert_eq!(health_of(grpc, service).await?, ServingStatus::NotServing);
    Ok(())
}

/// Waits until `service` of the component at `grpc` is SERVING (`what` names the wait).
async fn until_serving(grpc: &str, service: &str, what: &str) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), what, || async {
        health_of(grpc, service)
            .await
            .is_ok_and(|status| status == ServingStatus::Serving)
    })
    .await
    .map(drop)
}

/// A control plane started while etcd is unreachable runs as a router does: alive for
/// Kubernetes' liveness probe (gRPC health of the process SERVING), not ready (`Admin`
/// NOT_SERVING, calls `UNAVAILABLE` naming etcd, the dashboard 503), and serving as soon as
/// etcd answers. It exited at once, so Kubernetes restarted it with a growing back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_starts_without_etcd_and_serves_once_etcd_answers() -> anyhow::Result<()>
{
    use switchyard_proto::v1::admin_client::AdminClient;
    const ADMIN: &str = "switchyard.v1.Admin";
    let etcd_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let control_plane = Component::start(
        "control-plane-before-etcd",
        &strings(&[
            "control-plane",
            "--etcd",
            &etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ]),
        2,
    )
    .await?;
    let grpc = control_plane.addr("grpc").to_string();
    assert_alive_but_not_ready(&grpc, ADMIN).await?;
    let mut admin = AdminClient::new(switchyard_client::connect_channel(&grpc).await?);
    let refused = admin
        .list_workers(v1::ListWorkersRequest::default())
        .await
        .expect_err("nothing to list before etcd answers");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("etcd"), "{refused:?}");
    let page = reqwest::get(format!("http://{}/", control_plane.addr("http"))).await?;
    assert_eq!(page.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.text().await?.contains("etcd"));

    // etcd comes up on the port the control plane has been dialling.
    let _etcd = Etcd::start_on(etcd_port).await?;
    until_serving(&grpc, ADMIN, "the control plane to serve").await?;
    let mut admin = AdminClient::new(switchyard_client::connect_channel(&grpc).await?);
    let workers = admin
        .list_workers(v1::ListWorkersRequest::default())
        .await?
        .into_inner();
    assert!(workers.workers.is_empty(), "{workers:?}");
    let page = reqwest::get(format!("http://{}/", control_plane.addr("http"))).await?;
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    Ok(())
}

/// A worker started while etcd is unreachable runs and waits, as routers and control planes
/// do: alive (gRPC health of the process SERVING), not taking work (`Worker` NOT_SERVING),
/// and registered as soon as etcd answers. It exited at once (after loading its model), so
/// Kubernetes restarted it with a growing back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_starts_without_etcd_and_registers_once_etcd_answers() -> anyhow::Result<()> {
    const WORKER: &str = "switchyard.v1.Worker";
    let etcd_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let worker = Component::start(
        "gpu-before-etcd",
        &strings(&[
            "worker-gpu",
            "--etcd",
            &etcd_url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "gpu-early",
        ]),
        1,
    )
    .await?;
    let grpc = worker.addr("grpc").to_string();
    assert_alive_but_not_ready(&grpc, WORKER).await?;

    let _etcd = Etcd::start_on(etcd_port).await?;
    until_serving(&grpc, WORKER, "the worker to register").await?;
    // Free ports for both doors: the default HTTP port may be taken on a shared machine
    // (found when a `switchyard up` ran beside the suite: "cannot listen on 127.0.0.1:8080").
    let router = switchyard_tests::start_router(&etcd_url, "router-after-etcd", &[]).await?;
    let router_grpc = router.addr("grpc").to_string();
    wait_until(
        Duration::from_secs(30),
        "the router to see the worker",
        || async {
            switchyard_tests::list_router_workers(&router_grpc)
                .await
                .is_ok_and(|ids| ids == ["gpu-early"])
        },
    )
    .await?;
    Ok(())
}

/// Engine steps (tokens) a generation may run after its client dropped the call.
const STEP_BOUND: u32 = 400;
const TOKENS_PER_S: u32 = 400;
const MAX_TOKENS: u32 = 4096;

/// `(generations ended, most tokens any of them produced)` from the worker's log.
fn ended_generations(log: &std::path::Path) -> (usize, u32) {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let tokens: Vec<u32> = log
        .lines()
        .filter(|l| l.contains("generation ended"))
        .filter_map(|l| {
            let rest = &l[l.find("tokens=")? + "tokens=".len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (tokens.len(), tokens.iter().copied().max().unwrap_or(0))
}

/// Opens a Worker.Serve stream directly and reads the worker's first load report.
async fn worker_outstanding(address: &str) -> Option<u32> {
    let channel = switchyard_client::connect_channel(address).await.ok()?;
    let mut client = v1::worker_client::WorkerClient::new(channel);
    let (_tx, mut rx) = tokio::sync::mpsc::channel::<v1::RouterFrame>(1);
    let outbound = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut frames = client.serve(outbound).await.ok()?.into_inner();
    while let Ok(Some(frame)) = frames.message().await {
        if let Some(v1::worker_frame::Frame::Load(load)) = frame.frame {
            return Some(load.active + load.queued);
        }
    }
    None
}

/// A `Generate` call whose client goes away after the first frame stops its generation on the
/// worker: 100 such calls at once, several rounds, leave no generation running. The worker
/// starts streaming at once (no time to first token), so the client's reset races the first
/// tokens through the router.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_generate_calls_stop_on_the_worker() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        gpu_flags: strings(&[
            "--synthetic-ttft",
            "0s",
            "--synthetic-tokens-per-s",
            &TOKENS_PER_S.to_string(),
            "--max-concurrent",
            "128",
        ]),
        ..Default::default()
    })
    .await?;
    let worker = &cluster.gpu[0];
    let mut ended = 0;
    for round in 0..3 {
        // A fresh connection each round: h2 limits how many streams a peer may reset on one.
        let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
        let calls = (0..100).map(|i| {
            let mut client = InferenceClient::new(channel.clone());
            let request = switchyard_tests::synthetic_request(
                &format!("dropped-{round}-{i}"),
                RequestClass::CostSensitive,
                "drop me after the first frame",
                MAX_TOKENS,
            );
            async move {
                let mut stream = client.generate(request).await?.into_inner();
                let first = stream.message().await?;
                anyhow::ensure!(first.is_some(), "the call ended before its first frame");
                drop(stream);
                anyhow::Ok(())
            }
        });
        for call in futures::future::join_all(calls).await {
            call?;
        }
        ended += 100;
        // Each dropped call's generation ends on the worker, long before its max_tokens.
        let deadline = Duration::from_secs(u64::from(MAX_TOKENS / TOKENS_PER_S));
        let waited = wait_until(deadline, "every dropped generation to end", || {
            let (count, _) = ended_generations(&worker.log);
            async move { count >= ended }
        })
        .await;
        let (count, most) = ended_generations(&worker.log);
        waited.map_err(|e| {
            anyhow::anyhow!("round {round}: {count} of {ended} generations ended: {e}")
        })?;
        assert!(
            most <= STEP_BOUND,
            "round {round}: a dropped generation ran {most} steps (bound {STEP_BOUND})"
        );
        let address = worker.addr("grpc").to_string();
        wait_until(
            Duration::from_secs(5),
            "the worker to report nothing running",
            || async { worker_outstanding(&address).await == Some(0) },
        )
        .await?;
    }
    Ok(())
}

/// Tokens the worker has sent for its generations (its `tokens_generated` counter).
async fn worker_tokens_sent(worker: &Component) -> anyhow::Result<f64> {
    let metrics = reqwest::get(worker.metrics_url()).await?.text().await?;
    Ok(metric_sum(&metrics, "switchyard_worker_tokens_generated_total").unwrap_or(0.0))
}

/// What a streaming client has read, checked chunk by chunk.
#[derive(Default)]
struct Reader {
    text: String,
    received: usize,
    next_seq: u64,
}

impl Reader {
    fn read(&mut self, frame: v1::ServerFrame) {
        match frame.frame {
            Some(v1::server_frame::Frame::Tokens(t)) => {
                assert_eq!(t.seq, self.next_seq, "chunks in order, none missing");
                self.next_seq += 1;
                self.received += t.token_ids.len();
                self.text.push_str(&t.text);
            }
            Some(v1::server_frame::Frame::Accepted(_)) => {}
            other => panic!("unexpected frame while streaming: {other:?}"),
        }
    }
}

/// A client that stops reading pauses its own generation on the worker — the router holds a
/// bounded amount for it — while other requests on the same worker go on; when it reads again,
/// the stream continues with nothing lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_pauses_only_its_own_generation() -> anyhow::Result<()> {
    const RATE: u32 = 50_000;
    const MAX_TOKENS: u32 = 1_000_000;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        metrics: true,
        gpu_flags: strings(&[
            "--synthetic-ttft",
            "0s",
            "--synthetic-tokens-per-s",
            &RATE.to_string(),
        ]),
        router_flags: strings(&["--max-tokens-cap", &MAX_TOKENS.to_string()]),
        ..Default::default()
    })
    .await?;
    let worker = &cluster.gpu[0];
    // A client with HTTP/2's default 64 KiB window, as most gRPC clients start with.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.router_addr()))?
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await?;
    let instructions = "a stalled reader holds its own generation";
    let request = switchyard_tests::synthetic_request(
        "stalled",
        RequestClass::CostSensitive,
        instructions,
        MAX_TOKENS,
    );
    let mut stalled = InferenceClient::new(channel.clone())
        .generate(request)
        .await?
        .into_inner();
    let mut reader = Reader::default();
    while reader.received == 0 {
        reader.read(stalled.message().await?.expect("the stream is open"));
    }
    // The client now reads nothing. Watch the worker (the claim is that nothing happens, so
    // this is an observation window, not a wait for an event): unbounded buffering would let
    // it generate at 50 000 tokens/s to the end.
    let mut samples = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push(worker_tokens_sent(worker).await?);
    }
    let plateau = samples[samples.len() - 1];
    assert!(
        plateau < 150_000.0,
        "the worker generated {plateau} tokens for a client that read {}: {samples:?}",
        reader.received
    );
    assert_eq!(
        samples[samples.len() - 3],
        plateau,
        "the paused generation kept going: {samples:?}"
    );
    // Another request on the same worker is not held up by the paused one.
    let mut other = InferenceClient::new(channel.clone())
        .generate(switchyard_tests::synthetic_request(
            "other",
            RequestClass::CostSensitive,
            "unaffected",
            64,
        ))
        .await?
        .into_inner();
    let mut other_text = String::new();
    while let Some(frame) = other.message().await? {
        if let Some(v1::server_frame::Frame::Tokens(t)) = frame.frame {
            other_text.push_str(&t.text);
        }
    }
    assert_eq!(other_text, synthetic_text("unaffected", 0, 64));
    // Reading again resumes the stream exactly where it was.
    let target = plateau as usize + 20_000;
    while reader.received < target {
        reader.read(stalled.message().await?.expect("the stream is open"));
    }
    assert_eq!(
        reader.text,
        synthetic_text(instructions, 0, reader.received)
    );
    assert!(worker_tokens_sent(worker).await? > plateau + 64.0);
    Ok(())
}

/// The router gives back what sessions took once they close: after a warm-up round, five
/// rounds of 2 000 idle sessions opened on one connection and closed leave its memory within
/// 10 % of where the first measured round left it (it grew by every round before the
/// allocator returned freed pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_sessions_give_their_memory_back() -> anyhow::Result<()> {
    const SESSIONS: usize = 2_000;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        metrics: true,
        ..Default::default()
    })
    .await?;
    let router = &cluster.router;
    let open_sessions = || async {
        let metrics = reqwest::get(router.metrics_url())
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        metric_sum(&metrics, "switchyard_router_active_sessions")
    };
    let mut settled = Vec::new();
    for round in 0..7 {
        let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
        let mut held = Vec::with_capacity(SESSIONS);
        for _ in 0..SESSIONS {
            let (tx, rx) = tokio::sync::mpsc::channel::<v1::ClientFrame>(1);
            let frames = InferenceClient::new(channel.clone())
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            held.push((tx, frames));
        }
        wait_until(
            Duration::from_secs(30),
            "every session to be open",
            || async { open_sessions().await == Some(SESSIONS as f64) },
        )
        .await?;
        drop(held);
        drop(channel);
        wait_until(
            Duration::from_secs(30),
            "every session to be closed",
            || async { open_sessions().await == Some(0.0) },
        )
        .await?;
        match round {
            // Warm-up: first-use allocations (pools, tables) that stay by design.
            0 => continue,
            // The reference: read once the allocator's background purge (1 s decay) has run —
            // nothing announces it, so this is a fixed wait.
            1 => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                settled.push(router.rss_kib()?);
            }
            _ => {
                let bound = settled[0] + settled[0] / 10;
                let mut rss = router.rss_kib()?;
                let _ = wait_until(Duration::from_secs(10), "router memory to settle", || {
                    rss = router.rss_kib().unwrap_or(u64::MAX);
                    async move { rss <= bound }
                })
                .await;
                settled.push(rss);
                assert!(
                    rss <= bound,
                    "round {round}: router RSS {rss} KiB after its sessions closed, more than \
                     10 % over the first measured round's ({settled:?} KiB)"
                );
            }
        }
    }
    eprintln!("router RSS after each round of {SESSIONS} sessions: {settled:?} KiB");
    Ok(())
}

/// How a member of the etcd cluster is taken down.
#[derive(Debug, Clone, Copy)]
enum MemberDown {
    /// SIGKILL: its ports refuse connections, its open connections are reset.
    Killed,
    /// SIGSTOP: its ports still accept connections and open ones stay up; nothing answers.
    Frozen,
}

/// What one etcd key did while the member was down, seen from a member that stayed up.
#[derive(Debug)]
struct KeyEvent {
    key: String,
    deleted: bool,
    lease: i64,
}

/// With a 3-member etcd cluster and every component given all three endpoints, one member
/// down (quorum intact) for `WINDOW` — more than two lease TTLs — is a non-event: every admin
/// call on both control-plane replicas (reads, and drains and undrains through the leader)
/// succeeds, every worker stays registered under the lease it had (its key is never deleted)
/// and routed to, and the control plane's leader key never changes (no leadership flap). The
/// member is the raft leader (an etcd election follows) or a follower. Before, etcd-client
/// kept sending a third of the calls to the dead member (`tcp connect error`), and a worker or
/// leader whose lease keepalive stream ran over it gave its lease up.
async fn one_etcd_member_down_is_a_non_event(
    how: MemberDown,
    raft_leader: bool,
) -> anyhow::Result<()> {
    use etcd_client::{EventType, GetOptions, WatchOptions};
    use switchyard_cluster::schema::{LEADER_KEY, PREFIX, WORKERS_PREFIX};
    use switchyard_proto::v1::admin_client::AdminClient;
    use switchyard_tests::{EtcdCluster, start_control_plane, start_gpu_worker, start_router};
    /// How long the member stays down: over two of the default 5 s lease TTLs.
    const WINDOW: Duration = Duration::from_secs(12);
    const PATIENCE: Duration = Duration::from_secs(30);

    let mut etcd = EtcdCluster::start(3).await?;
    let endpoints = etcd.endpoints();
    // Default lease TTLs (5 s) for the workers and the leader key, as in production.
    let mut workers = Vec::new();
    for id in ["gpu-0", "gpu-1", "gpu-2"] {
        workers.push(start_gpu_worker(&endpoints, id, &[], 1).await?);
    }
    let router = start_router(&endpoints, "router", &[]).await?;
    let leader = start_control_plane(
        &endpoints,
        "control-plane-0",
        &["--metrics-addr", "127.0.0.1:0"],
    )
    .await?;
    leader
        .wait_for_log("became the control-plane leader", PATIENCE)
        .await?;
    let follower = start_control_plane(&endpoints, "control-plane-1", &[]).await?;
    follower
        .wait_for_log("following the control-plane leader", PATIENCE)
        .await?;
    wait_until(PATIENCE, "the router to route to every worker", || async {
        switchyard_tests::list_router_workers(&router.addr("grpc").to_string())
            .await
            .is_ok_and(|ids| ids.len() == workers.len())
    })
    .await?;

    let raft = etcd.leader().await?;
    let victim = if raft_leader { raft } else { (raft + 1) % 3 };
    // The test watches the registry through a member that stays up.
    let mut observer = etcd.members[(victim + 1) % 3].client().await?;
    let before = observer
        .get(WORKERS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let leases: std::collections::HashMap<String, i64> = before
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect();
    assert_eq!(
        leases.len(),
        workers.len(),
        "registered workers: {leases:?}"
    );
    let revision = before.header().map(|h| h.revision()).unwrap_or_default();
    let mut watch = observer
        .watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<KeyEvent>::new()));
    let seen = events.clone();
    tokio::spawn(async move {
        while let Ok(Some(response)) = watch.message().await {
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                seen.lock().unwrap().push(KeyEvent {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    deleted: event.event_type() == EventType::Delete,
                    lease: kv.lease(),
                });
            }
        }
    });

    eprintln!(
        "taking etcd member {} down ({how:?}; raft leader: {raft_leader})",
        etcd.members[victim].name
    );
    match how {
        MemberDown::Killed => etcd.members[victim].kill().await?,
        MemberDown::Frozen => etcd.members[victim].pause()?,
    }
    let admins = [
        (
            "leader",
            AdminClient::new(
                switchyard_client::connect_channel(&leader.addr("grpc").to_string()).await?,
            ),
        ),
        (
            "follower",
            AdminClient::new(
                switchyard_client::connect_channel(&follower.addr("grpc").to_string()).await?,
            ),
        ),
    ];
    let dashboard = format!("http://{}", follower.addr("http"));
    let mut failures = Vec::new();
    let mut calls = 0;
    let mut slowest = Duration::ZERO;
    let started = tokio::time::Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_millis(200));
    // The window is the point: nothing may go wrong while the member is down.
    while started.elapsed() < WINDOW {
        ticks.tick().await;
        for (name, admin) in &admins {
            let call = tokio::time::Instant::now();
            let listed = admin
                .clone()
                .list_workers(v1::ListWorkersRequest::default())
                .await;
            slowest = slowest.max(call.elapsed());
            calls += 1;
            match listed {
                Ok(answer) if answer.get_ref().workers.len() == workers.len() => {}
                Ok(answer) => failures.push(format!(
                    "{:?} ListWorkers on the {name}: {} workers",
                    started.elapsed(),
                    answer.get_ref().workers.len()
                )),
                Err(status) => failures.push(format!(
                    "{:?} ListWorkers on the {name}: {status}",
                    started.elapsed()
                )),
            }
        }
        let (_, admin) = &admins[0];
        for drain in [true, false] {
            let call = tokio::time::Instant::now();
            let worker_id = "gpu-2".to_string();
            let done = if drain {
                admin
                    .clone()
                    .drain(v1::DrainRequest { worker_id })
                    .await
                    .map(drop)
            } else {
                admin
                    .clone()
                    .undrain(v1::UndrainRequest { worker_id })
                    .await
                    .map(drop)
            };
            slowest = slowest.max(call.elapsed());
            calls += 1;
            if let Err(status) = done {
                failures.push(format!(
                    "{:?} {} on the leader: {status}",
                    started.elapsed(),
                    if drain { "Drain" } else { "Undrain" }
                ));
            }
        }
        for path in ["/api/workers", "/api/policy"] {
            calls += 1;
            match reqwest::get(format!("{dashboard}{path}")).await {
                Ok(answer) if answer.status().is_success() => {}
                Ok(answer) => failures.push(format!(
                    "{:?} dashboard {path}: {} {}",
                    started.elapsed(),
                    answer.status(),
                    answer.text().await.unwrap_or_default()
                )),
                Err(error) => {
                    failures.push(format!("{:?} dashboard {path}: {error}", started.elapsed()))
                }
            }
        }
    }
    // The control plane says which member it set aside.
    let metrics = scrape(&leader.metrics_url()).await?;
    for (i, member) in etcd.members.iter().enumerate() {
        let series = format!(
            "switchyard_etcd_endpoint_up{{endpoint=\"{}\"}} {}",
            member.url,
            i32::from(i != victim)
        );
        if !metrics.lines().any(|line| line == series) {
            failures.push(format!("no `{series}` in the leader's metrics"));
        }
    }
    // Routers kept every worker too.
    match switchyard_tests::list_router_workers(&router.addr("grpc").to_string()).await {
        Ok(ids) if ids.len() == workers.len() => {}
        routed => failures.push(format!("the router routes to {routed:?}")),
    }
    if let MemberDown::Frozen = how {
        etcd.members[victim].resume()?;
    }
    eprintln!("{calls} calls while the member was down, the slowest {slowest:?}");
    let events = std::mem::take(&mut *events.lock().unwrap());
    let lost: Vec<&KeyEvent> = events
        .iter()
        .filter(|e| e.key.starts_with(WORKERS_PREFIX))
        .filter(|e| e.deleted || leases.get(&e.key) != Some(&e.lease))
        .collect();
    let flapped: Vec<&KeyEvent> = events.iter().filter(|e| e.key == LEADER_KEY).collect();
    assert!(
        failures.is_empty() && lost.is_empty() && flapped.is_empty(),
        "with one etcd member of three {how:?}:\n{} of {calls} calls failed:\n{}\nworker \
         registrations lost or moved to another lease: {lost:?}\nleader key changes: {flapped:?}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_etcd_raft_leader_is_a_non_event() -> anyhow::Result<()> {
    one_etcd_member_down_is_a_non_event(MemberDown::Killed, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_member_is_a_non_event() -> anyhow::Result<()> {
    one_etcd_member_down_is_a_non_event(MemberDown::Frozen, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_raft_leader_is_a_non_event() -> anyhow::Result<()> {
    one_etcd_member_down_is_a_non_event(MemberDown::Frozen, true).await
}
