//! End-to-end behaviour of the foundation: real etcd, two GPU workers, one wafer-scale worker,
//! a router and a control plane, each its own process, all on the synthetic load-test engine.

use std::time::Duration;

use anyhow::Context as _;

use switchyard_client::{Completion, SessionClient};
use switchyard_proto::v1::{
    self, ChatMessage, FinishReason, GenerateRequest, Lane, RequestClass, client_frame,
    server_frame::Frame,
};
use switchyard_tests::{Cluster, ClusterSpec, strings, wait_until};
use switchyard_worker::synthetic::{synthetic_text, synthetic_token};
use tonic::Code;

fn request(id: &str, class: RequestClass, content: &str, max_tokens: u32) -> GenerateRequest {
    switchyard_tests::synthetic_request(id, class, content, max_tokens)
}

fn assert_gap_free(completion: &Completion) {
    let expected: Vec<u64> = (0..completion.seqs.len() as u64).collect();
    assert_eq!(
        completion.seqs, expected,
        "chunk sequence numbers must start at 0 without gaps"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_serves_both_lanes_concurrently() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec::default()).await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;

    let fast = session.start(request(
        "fast",
        RequestClass::LatencyCritical,
        "quick answer please",
        40,
    ))?;
    let cheap = session.start(request(
        "cheap",
        RequestClass::CostSensitive,
        "long batch job",
        20,
    ))?;
    let (fast, cheap) = tokio::join!(fast.collect(), cheap.collect());

    let accepted = fast.accepted.as_ref().expect("fast request accepted");
    assert_eq!(
        (accepted.pool.as_str(), accepted.lane),
        ("wse", Lane::LatencyCritical as i32)
    );
    assert!(accepted.worker_id.starts_with("wse-"));
    let accepted = cheap.accepted.as_ref().expect("cheap request accepted");
    assert_eq!(
        (accepted.pool.as_str(), accepted.lane),
        ("gpu", Lane::CostSensitive as i32)
    );

    assert_eq!(fast.text, synthetic_text("quick answer please", 0, 40));
    assert_eq!(cheap.text, synthetic_text("long batch job", 0, 20));
    for completion in [&fast, &cheap] {
        assert_gap_free(completion);
        let finished = completion.finished.as_ref().expect("finished");
        assert_eq!(finished.reason, FinishReason::Length as i32);
        assert_eq!(
            finished.usage.unwrap().completion_tokens as usize,
            completion.token_ids.len()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_stops_the_generation() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let mut stream = session.start(request(
        "long",
        RequestClass::CostSensitive,
        "one two three",
        4000,
    ))?;
    let mut completion = Completion::default();
    while completion.token_ids.len() < 3 {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    session.cancel("long")?;
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    let finished = completion.finished.expect("a Finished frame after cancel");
    assert_eq!(finished.reason, FinishReason::Cancelled as i32);
    let produced = finished.usage.unwrap().completion_tokens;
    assert!(
        produced < 4000,
        "generation stopped early, produced {produced}"
    );
    assert_eq!(
        produced as usize,
        completion.token_ids.len(),
        "every produced token reached the client"
    );

    // The worker freed the sequence: its load report drops back to zero active requests.
    let worker = cluster.gpu[0].addr("grpc");
    wait_until(
        Duration::from_secs(5),
        "the worker to report no active request",
        || async { worker_active(&worker.to_string()).await == Some(0) },
    )
    .await?;
    // The session still works.
    let again = session
        .start(request(
            "after",
            RequestClass::CostSensitive,
            "still here",
            3,
        ))?
        .collect()
        .await;
    assert_eq!(again.text, "still here still");
    Ok(())
}

/// Opens a Worker.Serve stream directly and reads the worker's first load report.
async fn worker_active(address: &str) -> Option<u32> {
    let channel = switchyard_client::connect_channel(address).await.ok()?;
    let mut client = v1::worker_client::WorkerClient::new(channel);
    let (_tx, rx) = tokio::sync::mpsc::channel::<v1::RouterFrame>(1);
    let mut frames = client.serve(tokio_stream_from(rx)).await.ok()?.into_inner();
    while let Ok(Some(frame)) = frames.message().await {
        if let Some(v1::worker_frame::Frame::Load(load)) = frame.frame {
            return Some(load.active + load.queued);
        }
    }
    None
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<v1::RouterFrame>,
) -> impl futures::Stream<Item = v1::RouterFrame> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_leaves_the_view_within_its_ttl_and_traffic_moves_on() -> anyhow::Result<()>
{
    let mut cluster = Cluster::start(ClusterSpec::default()).await?; // lease TTL 2 s
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let victim = cluster.gpu.remove(0);
    let victim_id = "gpu-0".to_string();
    let survivor_id = "gpu-1";
    let mut victim = victim;

    victim.kill().await?;
    let etcd = cluster.etcd.registry().await?;
    let gone_after = wait_until(
        Duration::from_secs(10),
        "the killed worker to leave the router's view",
        || async {
            !cluster
                .router_worker_ids()
                .await
                .unwrap_or_default()
                .contains(&victim_id)
                && !switchyard_cluster::Registry::list_workers(&etcd)
                    .await
                    .map(|ws| ws.iter().any(|w| w.id == victim_id))
                    .unwrap_or(true)
        },
    )
    .await?;
    assert!(
        gone_after <= Duration::from_secs(3),
        "left the view after {gone_after:?}, TTL is 2 s"
    );

    for i in 0..4 {
        let done = session
            .start(request(
                &format!("r{i}"),
                RequestClass::CostSensitive,
                "after the crash",
                2,
            ))?
            .collect()
            .await;
        assert_eq!(done.accepted.expect("accepted").worker_id, survivor_id);
        assert!(done.finished.is_some());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_deregisters_at_once() -> anyhow::Result<()> {
    // A long TTL: the record must vanish because the lease is revoked, not because it expired.
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        lease_ttl: "60s",
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let mut stream = session.start(request(
        "inflight",
        RequestClass::CostSensitive,
        "finish me please",
        30,
    ))?;
    let mut completion = Completion::default();
    while completion.token_ids.is_empty() {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let mut worker = cluster.gpu.remove(0);
    let terminating = tokio::spawn(async move { worker.terminate(Duration::from_secs(30)).await });
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    assert_eq!(
        completion
            .finished
            .expect("in-flight request finished")
            .reason,
        FinishReason::Length as i32
    );
    assert_eq!(completion.text, synthetic_text("finish me please", 0, 30));
    let status = terminating.await??;
    assert!(status.success(), "worker exited with {status}");
    let etcd = cluster.etcd.registry().await?;
    let workers = switchyard_cluster::Registry::list_workers(&etcd).await?;
    assert!(
        workers.iter().all(|w| w.id != "gpu-0"),
        "record still in etcd after a clean exit: {workers:?}"
    );
    Ok(())
}

/// A worker stopped while etcd is down cannot revoke its lease: it says so once (the record
/// goes when the lease expires) and exits cleanly; it logged `deregistered from etcd` just
/// before that warning, which told an operator reading the log the opposite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_etcd_is_down_does_not_claim_it_deregistered() -> anyhow::Result<()>
{
    let patience = Duration::from_secs(30);
    let etcd = switchyard_tests::Etcd::start().await?;
    let mut worker =
        switchyard_tests::start_gpu_worker(&etcd.url, "gpu-0", &["--lease-ttl", "30s"], 1).await?;
    worker.wait_for_log("worker ready", patience).await?;
    let client = etcd
        .url
        .trim_start_matches("http://")
        .parse::<std::net::SocketAddr>()?;
    drop(etcd);
    wait_until(patience, "etcd to stop answering", || async move {
        tokio::net::TcpStream::connect(client).await.is_err()
    })
    .await?;
    let status = worker.terminate(patience).await?;
    assert!(status.success(), "worker exited with {status}");
    let log = std::fs::read_to_string(&worker.log)?;
    assert!(log.contains("deregistration failed"), "{log}");
    assert!(!log.contains("deregistered from etcd"), "{log}");
    Ok(())
}

/// Reads `stream` into `completion` up to its first token, then takes the GPU worker that
/// produced it out of `cluster` (to stop it as the test likes).
async fn take_first_tokens_worker(
    cluster: &mut Cluster,
    stream: &mut switchyard_client::RequestStream,
    completion: &mut Completion,
) -> anyhow::Result<switchyard_tests::Component> {
    while completion.token_ids.is_empty() {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let first = completion.accepted.clone().expect("accepted").worker_id;
    let index = cluster
        .gpu
        .iter()
        .position(|w| w.name == first)
        .with_context(|| format!("no worker named {first}"))?;
    Ok(cluster.gpu.remove(index))
}

/// A worker whose drain timeout runs out with a generation in flight stops it; the router
/// resumes it on another worker, so the client gets every token once, in order, ending as it
/// asked (`LENGTH`) — not cut short with a `CANCELLED` it never asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_cut_by_a_workers_drain_timeout_resumes_on_another_worker()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        // 200 tokens at the synthetic engine's 60 a second outlast a 1 s drain.
        gpu_flags: vec!["--drain-timeout".into(), "1s".into()],
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let content = "outlast the drain";
    let mut stream = session.start(request("long", RequestClass::CostSensitive, content, 200))?;
    let mut completion = Completion::default();
    let mut worker = take_first_tokens_worker(&mut cluster, &mut stream, &mut completion).await?;
    let terminating = tokio::spawn(async move { worker.terminate(Duration::from_secs(30)).await });
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    assert_eq!(completion.failed, None);
    assert_eq!(
        completion.finished.as_ref().map(|f| f.reason),
        Some(FinishReason::Length as i32),
        "{:?}",
        completion.finished
    );
    assert_eq!(completion.text, synthetic_text(content, 0, 200));
    assert_gap_free(&completion);
    assert!(terminating.await??.success());
    Ok(())
}

/// A second SIGTERM stops a draining worker at once (exit 143) rather than after its drain:
/// the operator who sends it does not want to wait. The generation it was running goes on
/// from another worker, every token once, as when a worker dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_a_draining_worker_at_once() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        // 1 000 tokens at 100 a second: the first SIGTERM's drain would last some 10 s, twice
        // the wait for the exit.
        gpu_flags: strings(&["--drain-timeout", "120s", "--synthetic-tokens-per-s", "100"]),
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let content = "stop when told twice";
    let mut stream = session.start(request("twice", RequestClass::CostSensitive, content, 1000))?;
    let mut completion = Completion::default();
    let mut worker = take_first_tokens_worker(&mut cluster, &mut stream, &mut completion).await?;
    worker.sigterm()?;
    worker
        .wait_for_log("again to stop at once", Duration::from_secs(10))
        .await?;
    worker.sigterm()?;
    let status = worker.exited(Duration::from_secs(5)).await?;
    assert_eq!(status.code(), Some(143), "{status:?}");
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    assert_eq!(completion.failed, None);
    assert_eq!(completion.text, synthetic_text(content, 0, 1000));
    assert_gap_free(&completion);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_router_finishes_its_streams_in_flight_and_refuses_new_ones()
-> anyhow::Result<()> {
    // 40 tokens at 40 tokens/s: the stream is still running a second after the SIGTERM.
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        gpu_flags: vec!["--synthetic-tokens-per-s".into(), "40".into()],
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let mut stream = session.start(request(
        "inflight",
        RequestClass::CostSensitive,
        "finish me please",
        40,
    ))?;
    let mut completion = Completion::default();
    while completion.token_ids.is_empty() {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let mut router = cluster.router;
    router.sigterm()?;
    router
        .wait_for_log("new requests refused", Duration::from_secs(10))
        .await?;
    // A new request on the open session is refused with a status that says retry elsewhere.
    let mut refused = session.start(request("late", RequestClass::CostSensitive, "too late", 4))?;
    let mut late = Completion::default();
    while let Some(frame) = refused.next().await {
        late.absorb(frame);
    }
    let failed = late.failed.expect("the late request is refused");
    assert_eq!(failed.code, Code::Unavailable as i32, "{failed:?}");
    assert!(failed.message.contains("shutting down"), "{failed:?}");
    // The request in flight gets every token, in order.
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    assert_eq!(
        completion
            .finished
            .as_ref()
            .expect("the request in flight finished")
            .reason,
        FinishReason::Length as i32
    );
    assert_eq!(completion.text, synthetic_text("finish me please", 0, 40));
    assert_gap_free(&completion);
    drop(session);
    let status = router.exited(Duration::from_secs(10)).await?;
    assert!(status.success(), "router exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_status_naming_the_field_and_the_session_survives() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;

    let mut cases: Vec<(GenerateRequest, Code, &str)> = Vec::new();
    let valid = request("x", RequestClass::CostSensitive, "hello", 4);
    cases.push((
        GenerateRequest {
            request_id: "empty-model".into(),
            model: "".into(),
            ..valid.clone()
        },
        Code::InvalidArgument,
        "model",
    ));
    cases.push((
        GenerateRequest {
            request_id: "unknown-model".into(),
            model: "gpt-17".into(),
            ..valid.clone()
        },
        Code::NotFound,
        // The field once, then why (it read "model: model \"gpt-17\" …").
        "model: \"gpt-17\" is not served by any worker",
    ));
    let mut huge = GenerateRequest {
        request_id: "huge".into(),
        ..valid.clone()
    };
    huge.sampling.as_mut().unwrap().max_tokens = 1_000_000;
    cases.push((huge, Code::InvalidArgument, "sampling.max_tokens"));
    let mut oversized = GenerateRequest {
        request_id: "oversized".into(),
        ..valid.clone()
    };
    oversized.messages[0].content = "x".repeat(300 * 1024);
    cases.push((oversized, Code::InvalidArgument, "messages[0].content"));

    for (bad, code, field) in cases {
        let id = bad.request_id.clone();
        let done = session.start(bad)?.collect().await;
        let failed = done
            .failed
            .unwrap_or_else(|| panic!("{id}: expected Failed"));
        assert_eq!(
            Code::from_i32(failed.code),
            code,
            "{id}: {}",
            failed.message
        );
        assert!(
            failed.message.contains(field),
            "{id}: message {:?} should name {field}",
            failed.message
        );
    }

    // A duplicate request_id while the first is still running.
    let mut running = session.start(request(
        "dup",
        RequestClass::CostSensitive,
        "slow one",
        1000,
    ))?;
    assert!(matches!(running.next().await, Some(Frame::Accepted(_))));
    session.send(client_frame::Frame::Start(request(
        "dup",
        RequestClass::CostSensitive,
        "again",
        2,
    )))?;
    // Refused with a `Rejected` frame, which ends nothing: the running request goes on.
    let mut saw_duplicate_error = false;
    while let Some(frame) = running.next().await {
        match &frame {
            Frame::Rejected(rejected) => {
                assert_eq!(Code::from_i32(rejected.code), Code::InvalidArgument);
                assert_eq!(
                    (rejected.frame.as_str(), rejected.field.as_str()),
                    ("start", "request_id")
                );
                saw_duplicate_error = true;
                break;
            }
            Frame::Failed(failed) => panic!("the running request failed: {failed:?}"),
            _ => {}
        }
    }
    assert!(saw_duplicate_error, "duplicate request_id was not refused");
    session.cancel("dup")?;
    let rest = running.collect().await;
    assert!(rest.failed.is_none(), "{rest:?}");
    assert_eq!(
        rest.finished.map(|f| f.reason),
        Some(v1::FinishReason::Cancelled as i32)
    );

    // Generate (single request) answers bad input with a plain gRPC status.
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = v1::inference_client::InferenceClient::new(channel);
    let status = client
        .generate(GenerateRequest {
            model: "".into(),
            ..valid.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("model"));
    // One that names no bound at all is not bad input: it gets the router's default.
    let mut unbounded = client
        .generate(GenerateRequest {
            sampling: None,
            ..valid.clone()
        })
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(frame) = unbounded.message().await? {
        if let Some(Frame::Tokens(tokens)) = frame.frame {
            text.push_str(&tokens.text);
        }
    }
    assert_eq!(
        text,
        synthetic_text("hello", 0, switchyard_proto::DEFAULT_MAX_TOKENS as usize)
    );

    // The session and the cluster are still healthy.
    let ok = session
        .start(request("ok", RequestClass::CostSensitive, "still fine", 3))?
        .collect()
        .await;
    assert_eq!(ok.text, "still fine still");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_redirects_the_same_stream_to_new_instructions() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let (before, after, max_tokens) = ("alpha beta gamma", "delta epsilon", 60);
    let mut stream = session.start(request(
        "steer",
        RequestClass::CostSensitive,
        before,
        max_tokens,
    ))?;
    let mut completion = Completion::default();
    while completion.token_ids.len() < 4 {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let user = ChatMessage {
        role: "user".into(),
        content: after.into(),
        ..Default::default()
    };
    session.interrupt("steer", vec![user], true)?;
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    let finished = completion
        .finished
        .as_ref()
        .expect("finished after the redirect");
    assert_eq!(finished.reason, FinishReason::Length as i32);
    assert_gap_free(&completion);

    // The stream is the old instructions' output up to the interrupt, then the new ones'.
    let ids = &completion.token_ids;
    let switch = (0..ids.len())
        .find(|&i| ids[i] != synthetic_token(before, i).0)
        .expect("output changed after the interrupt");
    assert!(
        switch >= 4,
        "tokens delivered before the interrupt are kept"
    );
    let expected = format!(
        "{}{}",
        synthetic_text(before, 0, switch),
        synthetic_text(after, 0, ids.len() - switch)
    );
    assert_eq!(completion.text, expected);
    // max_tokens bounds the whole request, across the redirect.
    assert_eq!(ids.len(), max_tokens as usize);
    assert_eq!(finished.usage.unwrap().completion_tokens, max_tokens);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_lists_workers_of_both_pools_from_etcd() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec::default()).await?;
    let channel =
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?;
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let all = admin
        .list_workers(v1::ListWorkersRequest {
            pool: String::new(),
        })
        .await?
        .into_inner()
        .workers;
    let ids: Vec<_> = all
        .iter()
        .map(|w| (w.pool.as_str(), w.id.as_str(), w.engine.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            ("gpu", "gpu-0", "synthetic"),
            ("gpu", "gpu-1", "synthetic"),
            ("wse", "wse-0", "synthetic")
        ]
    );
    let wse = admin
        .list_workers(v1::ListWorkersRequest { pool: "wse".into() })
        .await?
        .into_inner()
        .workers;
    assert_eq!(wse.len(), 1);
    let err = admin
        .list_workers(v1::ListWorkersRequest { pool: "tpu".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    Ok(())
}

/// A `Generate` call its client abandons while the request waits at the router for a slot
/// (a client deadline, say) is counted as cancelled while waiting, as a `Session`'s cancel is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_call_abandoned_while_waiting_is_counted() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        gpu_flags: vec![
            "--max-concurrent".into(),
            "1".into(),
            "--synthetic-tokens-per-s".into(),
            "20".into(),
        ],
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let mut holder = session.start(request("hold", RequestClass::CostSensitive, "hold", 200))?;
    while !matches!(
        holder.next().await,
        Some(v1::server_frame::Frame::Tokens(_))
    ) {}

    let mut client = v1::inference_client::InferenceClient::new(
        switchyard_client::connect_channel(&cluster.router_addr()).await?,
    );
    let waited = tokio::time::timeout(
        Duration::from_millis(500),
        client.generate(request("gone", RequestClass::CostSensitive, "wait", 4)),
    )
    .await;
    assert!(waited.is_err(), "answered while the only slot was taken");

    let metrics = format!("http://{}/metrics", cluster.router.addr("http"));
    let counted = "switchyard_router_queue_wait_seconds_count{lane=\"cost_sensitive\",outcome=\"cancelled\"} 1";
    switchyard_tests::poll_until(
        Duration::from_secs(10),
        "the abandoned call counted",
        || {
            let metrics = metrics.clone();
            async move {
                let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
                text.contains(counted).then_some(())
            }
        },
    )
    .await?;
    session.cancel("hold")?;
    Ok(())
}
