//! A new routing policy set through the control plane (stored in etcd) is applied by a live
//! router without restart; an invalid document written straight into etcd is rejected and the
//! previous policy stays in force.

use std::time::Duration;

use anyhow::{Context as _, bail};
use switchyard_proto::v1::{
    self, GenerateRequest, Lane, SamplingParams, admin_client::AdminClient,
    inference_client::InferenceClient, server_frame::Frame,
};
use switchyard_tests::{Cluster, ClusterSpec, wait_until};

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

/// Sends one request and returns its `Accepted` frame.
async fn accepted(
    client: &mut InferenceClient<tonic::transport::Channel>,
    tenant: Option<&str>,
) -> anyhow::Result<v1::Accepted> {
    let mut request = GenerateRequest {
        model: "synthetic".into(),
        prompt: "hello".into(),
        sampling: Some(SamplingParams {
            max_tokens: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(tenant) = tenant {
        request.metadata.insert("tenant".into(), tenant.into());
    }
    let mut stream = client.generate(request).await?.into_inner();
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Accepted(a)) => return Ok(a),
            Some(Frame::Failed(f)) => bail!("request failed: {} {}", f.code, f.message),
            _ => {}
        }
    }
    bail!("stream ended without Accepted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_through_etcd_is_applied_by_a_live_router() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let mut client = InferenceClient::connect(format!("http://{}", cluster.router_addr())).await?;
    let control = cluster.control_plane.addr("grpc");
    let mut admin = AdminClient::connect(format!("http://{control}")).await?;

    // Before: the built-in default sends AUTO requests to the default lane.
    wait_until(PATIENCE, "the worker to be placeable", || {
        let mut client = client.clone();
        async move { accepted(&mut client, Some("acme")).await.is_ok() }
    })
    .await?;
    let before = accepted(&mut client, Some("acme")).await?;
    assert_eq!(before.lane, Lane::CostSensitive as i32, "{before:?}");
    assert!(before.reason.starts_with("default"), "{}", before.reason);

    // The control plane validates and stores a new policy; the router applies it live.
    let invalid = admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: r#"{"tenants": {"acme": "fast"}}"#.into(),
        })
        .await
        .expect_err("an invalid policy is refused");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: r#"{"tenants": {"acme": "latency-critical"}}"#.into(),
        })
        .await?;
    wait_until(PATIENCE, "the router to apply the tenant policy", || {
        let mut client = client.clone();
        async move {
            accepted(&mut client, Some("acme")).await.is_ok_and(|a| {
                a.lane == Lane::LatencyCritical as i32 && a.reason.starts_with("tenant=acme")
            })
        }
    })
    .await?;
    // Other tenants still take the default lane.
    let other = accepted(&mut client, Some("globex")).await?;
    assert_eq!(other.lane, Lane::CostSensitive as i32, "{other:?}");

    // An invalid document written straight into etcd is rejected; the previous one stays.
    let mut etcd_client = etcd_client::Client::connect([cluster.etcd.url.as_str()], None).await?;
    etcd_client
        .put(
            "/switchyard/v1/policy",
            r#"{"placement": {"choices": 0}}"#,
            None,
        )
        .await?;
    let rejected = cluster
        .router
        .wait_for_log("routing policy rejected", PATIENCE)
        .await?;
    assert!(rejected.contains("placement.choices"), "{rejected}");
    let after = accepted(&mut client, Some("acme")).await?;
    assert_eq!(after.lane, Lane::LatencyCritical as i32, "{after:?}");

    let stored = admin
        .get_policy(v1::GetPolicyRequest {})
        .await?
        .into_inner();
    assert!(!stored.is_default);
    Ok(())
}

/// Overload: with the only worker busy and the lane's router queue full, further requests are
/// shed at once with `RESOURCE_EXHAUSTED` and the policy's `retry-after`; every request ends
/// exactly once (served in full, or shed), and the cluster serves again once the load is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_with_retry_after_and_every_request_ends_once() -> anyhow::Result<()> {
    use std::collections::HashMap;
    use switchyard_proto::v1::{ClientFrame, client_frame};

    const REQUESTS: usize = 6;
    const MAX_TOKENS: u32 = 10;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        // One slot at 20 tokens/s: a request holds the worker for half a second.
        gpu_flags: ["--max-concurrent", "1", "--synthetic-tokens-per-s", "20"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await?;
    let control = cluster.control_plane.addr("grpc");
    let mut admin = AdminClient::connect(format!("http://{control}")).await?;
    admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: r#"{"cost_sensitive": {"max_queue": 1, "max_queue_wait_ms": 30000,
                          "retry_after_ms": 1500}}"#
                .into(),
        })
        .await?;
    cluster
        .router
        .wait_for_log("routing policy applied", PATIENCE)
        .await?;
    cluster.wait_for_router_workers(1, PATIENCE).await?;

    // All requests at once on one session.
    let mut client = InferenceClient::connect(format!("http://{}", cluster.router_addr())).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(REQUESTS);
    for i in 0..REQUESTS {
        tx.send(ClientFrame {
            frame: Some(client_frame::Frame::Start(GenerateRequest {
                request_id: format!("r{i}"),
                model: "synthetic".into(),
                prompt: "one two three".into(),
                sampling: Some(SamplingParams {
                    max_tokens: MAX_TOKENS,
                    ..Default::default()
                }),
                class: v1::RequestClass::CostSensitive as i32,
                ..Default::default()
            })),
        })
        .await?;
    }
    let mut frames = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut tokens: HashMap<String, usize> = HashMap::new();
    let mut ended: HashMap<String, Result<(), v1::Failed>> = HashMap::new();
    while ended.len() < REQUESTS {
        let frame = tokio::time::timeout(PATIENCE, frames.message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("session ended with requests open: {ended:?}"))?;
        let (id, end) = match frame.frame {
            Some(Frame::Tokens(t)) => {
                *tokens.entry(t.request_id).or_default() += t.token_ids.len();
                continue;
            }
            Some(Frame::Finished(f)) => (f.request_id, Ok(())),
            Some(Frame::Failed(f)) => (f.request_id.clone(), Err(f)),
            _ => continue,
        };
        assert!(ended.insert(id.clone(), end).is_none(), "{id} ended twice");
    }
    let served: Vec<_> = ended.iter().filter(|(_, e)| e.is_ok()).collect();
    let shed: Vec<_> = ended
        .iter()
        .filter_map(|(id, e)| e.as_ref().err().map(|f| (id, f)))
        .collect();
    // One running and one queued at the router are served; the rest cannot be.
    assert!(served.len() >= 2, "served {served:?}");
    assert!(!shed.is_empty(), "nothing was shed: {ended:?}");
    for (id, _) in &served {
        assert_eq!(tokens.get(*id), Some(&(MAX_TOKENS as usize)), "{id}");
    }
    for (id, failed) in &shed {
        assert_eq!(
            failed.code,
            tonic::Code::ResourceExhausted as i32,
            "{id}: {failed:?}"
        );
        assert_eq!(failed.retry_after_ms, 1500, "{id}: {failed:?}");
        assert!(failed.message.contains("shed"), "{id}: {}", failed.message);
        assert_eq!(
            tokens.get(*id),
            None,
            "{id} was shed after streaming tokens"
        );
    }

    // The load is gone: a new request is served.
    let after = accepted(&mut client, None).await?;
    assert_eq!(after.lane, Lane::CostSensitive as i32, "{after:?}");
    Ok(())
}

/// Wafer-scale workers publish no KV blocks (a gateway cannot see its upstream's cache), so a
/// conversation's turns are kept on one of them by the conversation's own key — its messages
/// up to the first user message — without the client naming an affinity key; different
/// conversations still spread over the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_turns_stay_on_one_wse_worker() -> anyhow::Result<()> {
    use switchyard_proto::v1::{ChatMessage, RequestClass};
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 3,
        ..Default::default()
    })
    .await?;
    let mut client = InferenceClient::connect(format!("http://{}", cluster.router_addr())).await?;
    let message = |role: &str, content: String| ChatMessage {
        role: role.into(),
        content,
    };
    let mut homes = std::collections::BTreeSet::new();
    for conversation in 0..6 {
        let mut history = vec![
            message("system", "You are a coding assistant.".into()),
            message("user", format!("Task {conversation}: write a parser.")),
        ];
        let mut workers = Vec::new();
        for turn in 0..3 {
            let request = GenerateRequest {
                messages: history.clone(),
                ..switchyard_tests::synthetic_request(
                    &format!("c{conversation}-t{turn}"),
                    RequestClass::LatencyCritical,
                    "",
                    2,
                )
            };
            let mut stream = client.generate(request).await?.into_inner();
            let mut worker = None;
            while let Some(frame) = stream.message().await? {
                match frame.frame {
                    Some(Frame::Accepted(a)) => {
                        assert!(a.reason.contains(" affinity "), "{}", a.reason);
                        worker = Some(a.worker_id)
                    }
                    Some(Frame::Failed(f)) => bail!("request failed: {} {}", f.code, f.message),
                    _ => {}
                }
            }
            workers.push(worker.context("no Accepted frame")?);
            history.push(message("assistant", format!("Answer {turn}.")));
            history.push(message("user", format!("Follow-up {turn}.")));
        }
        assert!(
            workers.iter().all(|w| w == &workers[0]),
            "conversation {conversation} moved between workers: {workers:?}"
        );
        homes.insert(workers[0].clone());
    }
    assert!(homes.len() > 1, "six conversations all on {homes:?}");
    Ok(())
}
