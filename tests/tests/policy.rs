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
    // Applied once the router logs a policy applied after its start's (a wait for the first
    // such line returned at once, and under load the requests then ran under the default).
    cluster
        .set_policy(
            &serde_json::json!({"cost_sensitive": {"max_queue": 1, "max_queue_wait_ms": 30000,
                                                   "retry_after_ms": 1500}}),
            PATIENCE,
        )
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
        ..Default::default()
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

/// OpenAI's `prompt_cache_key` routes as the conversation does: requests sharing a key reach
/// one worker (and its upstream's prompt cache) whatever their messages, and different keys
/// spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_prompt_cache_key_share_a_worker() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 0,
        wse_workers: 3,
        ..Default::default()
    })
    .await?;
    let http = reqwest::Client::new();
    let mut homes = std::collections::BTreeSet::new();
    for key in 0..8 {
        let mut workers = Vec::new();
        for turn in 0..3 {
            let response = http
                .post(format!("{}/chat/completions", cluster.router_openai_url()))
                .header("x-switchyard-class", "latency-critical")
                .json(&serde_json::json!({
                    "model": "synthetic", "max_tokens": 2, "prompt_cache_key": format!("key-{key}"),
                    "messages": [{"role": "user", "content": format!("Question {turn} of {key}")}],
                }))
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "{}", response.text().await?);
            let worker = response.headers()["x-switchyard-worker"]
                .to_str()?
                .to_string();
            workers.push(worker);
        }
        assert!(
            workers.iter().all(|w| w == &workers[0]),
            "key-{key} moved between workers: {workers:?}"
        );
        homes.insert(workers[0].clone());
    }
    assert!(homes.len() > 1, "eight keys all on {homes:?}");
    Ok(())
}

/// Sends one request as `tenant` (its default lane is the policy's) and returns its
/// `Accepted` frame, or the status it was refused with.
async fn placed(
    client: &mut InferenceClient<tonic::transport::Channel>,
    tenant: &str,
) -> Result<v1::Accepted, tonic::Status> {
    let mut request = GenerateRequest {
        model: "synthetic".into(),
        prompt: "hello".into(),
        sampling: Some(SamplingParams {
            max_tokens: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    request.metadata.insert("tenant".into(), tenant.into());
    let mut stream = client.generate(request).await?.into_inner();
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Accepted(a)) => return Ok(a),
            Some(Frame::Failed(f)) => {
                return Err(tonic::Status::new(tonic::Code::from_i32(f.code), f.message));
            }
            _ => {}
        }
    }
    Err(tonic::Status::internal("stream ended without Accepted"))
}

/// The gRPC health of a router's `switchyard.v1.Inference` service.
async fn inference_health(
    router: &str,
) -> anyhow::Result<tonic_health::pb::health_check_response::ServingStatus> {
    let channel = switchyard_client::connect_channel(router).await?;
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "switchyard.v1.Inference".into(),
        })
        .await?
        .into_inner();
    Ok(response.status())
}

/// GETs a dashboard API path as JSON.
async fn dashboard(http: std::net::SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(reqwest::get(format!("http://{http}{path}"))
        .await?
        .json()
        .await?)
}

/// Runs `switchyard admin <args> --control-plane <address>` with `stdin`: (exit code,
/// stdout, stderr).
fn switchyard_admin(
    address: &str,
    args: &[&str],
    stdin: &str,
) -> anyhow::Result<(Option<i32>, String, String)> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(switchyard_tests::switchyard_bin())
        .arg("admin")
        .args(args)
        .args(["--control-plane", address])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let output = child.wait_with_output()?;
    Ok((
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A router that starts while the stored document is invalid (written straight into etcd,
/// past the admin API's validation) has no valid policy to route by: it stays not ready —
/// gRPC health NOT_SERVING, `/health` 503, requests `UNAVAILABLE` — and logs an ERROR, until a
/// valid document is stored. It used to route by the built-in default, tenant quotas
/// included: a tenant refused the latency-critical lane by the policy was served on it by the
/// restarted router while the others refused it. A running router keeps its last valid
/// policy. `admin policy get`, the dashboard and the event feed say that the stored document
/// is invalid, and why (they showed it as the policy, and "routing policy updated").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_started_on_an_invalid_stored_policy_routes_nothing_until_a_valid_one_is_stored()
-> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let policy = serde_json::json!({
        "default_lane": "latency-critical",
        "quotas": {"tenants": {"batch": {"lanes": ["cost-sensitive"], "disallowed_lane": "refuse"}}},
    });
    cluster.set_policy(&policy, PATIENCE).await?;
    let mut running = InferenceClient::connect(format!("http://{}", cluster.router_addr())).await?;
    wait_until(
        PATIENCE,
        "the router to refuse batch the latency-critical lane",
        || {
            let mut client = running.clone();
            async move {
                placed(&mut client, "batch")
                    .await
                    .is_err_and(|s| s.code() == tonic::Code::PermissionDenied)
            }
        },
    )
    .await?;

    // The same document, made invalid, written straight into etcd.
    let mut invalid = policy.clone();
    invalid["placement"] = serde_json::json!({"choices": 0});
    let mut etcd = etcd_client::Client::connect([cluster.etcd.url.as_str()], None).await?;
    etcd.put("/switchyard/v1/policy", invalid.to_string(), None)
        .await?;
    let kept = cluster
        .router
        .wait_for_log("routing policy rejected", PATIENCE)
        .await?;

    // A router started now has no policy to keep.
    let restarted =
        switchyard_tests::start_router(&cluster.etcd.url, "router-restarted", &[]).await?;
    let rejected = restarted
        .wait_for_log("routing policy rejected", PATIENCE)
        .await?;
    let grpc = restarted.addr("grpc").to_string();
    // It stays not ready (a few seconds: it does not become ready later on its own).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(inference_health(&grpc).await?, ServingStatus::NotServing);
    assert!(
        rejected.contains("ERROR")
            && rejected.contains("placement.choices")
            && rejected.contains("no valid routing policy"),
        "{rejected}"
    );
    // The running one says it keeps what it had.
    assert!(
        kept.contains("placement.choices") && kept.contains("last valid policy stays in force"),
        "{kept}"
    );
    let health = reqwest::get(format!("http://{}/health", restarted.addr("http"))).await?;
    assert_eq!(health.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = health.json().await?;
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("routing policy")),
        "{body}"
    );
    // The public answer says why without the document's contents (tenant names…).
    assert!(!body.to_string().contains("choices"), "{body}");
    let mut fresh = InferenceClient::connect(format!("http://{grpc}")).await?;
    let refused = placed(&mut fresh, "batch")
        .await
        .expect_err("a router with no valid policy routes nothing");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let refused = placed(&mut fresh, "acme")
        .await
        .expect_err("a router with no valid policy routes nothing");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // The running router still enforces the policy.
    let still = placed(&mut running, "batch")
        .await
        .expect_err("batch refused");
    assert_eq!(still.code(), tonic::Code::PermissionDenied, "{still:?}");

    // The operator's views say the stored document is invalid, and why.
    let control_plane = cluster.control_plane.addr("grpc").to_string();
    let (code, out, err) = switchyard_admin(&control_plane, &["policy", "get"], "")?;
    assert_eq!(code, Some(0), "{err}");
    let printed: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(printed, invalid, "get prints what is stored");
    assert!(
        err.contains("invalid") && err.contains("placement.choices"),
        "{err}"
    );
    let http = cluster.control_plane.addr("http");
    let shown = dashboard(http, "/api/policy").await?;
    assert!(
        shown["invalid"]
            .as_str()
            .is_some_and(|why| why.contains("placement.choices")),
        "{shown}"
    );
    // The dashboard's policy view says so in red, above the document.
    let browser = switchyard_tests::browser::Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    let banner = switchyard_tests::poll_until(PATIENCE, "the page to flag the policy", || async {
        let shown = browser
            .execute(
                "const el = document.getElementById('policy-invalid');
                 return el.hidden ? '' : el.textContent;",
                vec![],
            )
            .await
            .ok()?;
        shown
            .as_str()
            .filter(|text| !text.is_empty())
            .map(str::to_string)
    })
    .await?;
    assert!(banner.contains("placement.choices"), "{banner}");
    let source = browser.text("#policy-source").await?;
    assert!(source.contains("INVALID"), "{source}");
    browser.close().await?;
    let events = poll_events(http, |e| e["kind"] == "policy_invalid").await?;
    let warned: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "policy_invalid")
        .collect();
    assert!(
        warned.len() == 1
            && warned[0]["message"]
                .as_str()
                .is_some_and(|m| m.contains("placement.choices")),
        "{events:?}"
    );
    let updated = events
        .iter()
        .filter(|e| e["kind"] == "policy_changed")
        .count();
    assert_eq!(
        updated, 1,
        "only the valid document was an update: {events:?}"
    );
    let logged = cluster
        .control_plane
        .wait_for_log("stored routing policy is invalid", PATIENCE)
        .await?;
    assert!(logged.contains("WARN"), "{logged}");

    // A valid document makes it ready, with the policy in force.
    let (code, _, err) =
        switchyard_admin(&control_plane, &["policy", "set", "-"], &policy.to_string())?;
    assert_eq!(code, Some(0), "{err}");
    wait_until(PATIENCE, "the restarted router to become ready", || {
        let grpc = grpc.clone();
        async move {
            inference_health(&grpc)
                .await
                .is_ok_and(|s| s == ServingStatus::Serving)
        }
    })
    .await?;
    let refused = placed(&mut fresh, "batch")
        .await
        .expect_err("batch refused");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let served = placed(&mut fresh, "acme").await?;
    assert_eq!(served.lane, Lane::LatencyCritical as i32, "{served:?}");
    let shown = dashboard(http, "/api/policy").await?;
    assert!(shown["invalid"].is_null(), "{shown}");
    let (_, _, err) = switchyard_admin(&control_plane, &["policy", "get"], "")?;
    assert!(!err.contains("invalid"), "{err}");
    Ok(())
}

/// The control plane's recent events once one matches `wanted`.
async fn poll_events(
    http: std::net::SocketAddr,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<Vec<serde_json::Value>> {
    switchyard_tests::poll_until(PATIENCE, "the control plane's event", || async {
        let events = dashboard(http, "/api/events").await.ok()?;
        let events = events["events"].as_array()?.clone();
        events.iter().any(&wanted).then_some(events)
    })
    .await
}

/// `switchyard admin policy set|merge` refuses, with exit status 5 ("invalid") and a message
/// saying what is wrong, what is not a policy document: JSON that is not an object (`[]` was
/// stored as the whole default document, `["latency-critical"]` set `default_lane` by
/// position), a document over the 1 MiB limit (reported as "cluster registry unreachable",
/// exit 7), a merge onto a stored document that is not JSON (exit 7); a typo in a merge patch
/// is named by its path (it was a column of the merged document). Routers refuse a non-object
/// written straight into etcd, and keep their policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_refuses_what_is_not_a_policy_document() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let control_plane = cluster.control_plane.addr("grpc").to_string();
    let admin = |args: &[&str], stdin: &str| switchyard_admin(&control_plane, args, stdin);
    let (code, _, err) = admin(
        &["policy", "set", "-"],
        r#"{"default_lane": "latency-critical", "max_queued": 100}"#,
    )?;
    assert_eq!(code, Some(0), "{err}");
    let stored = || -> anyhow::Result<serde_json::Value> {
        let (code, out, err) = admin(&["policy", "get"], "")?;
        anyhow::ensure!(code == Some(0), "{err}");
        Ok(serde_json::from_str(&out)?)
    };

    for document in ["[]", r#"["latency-critical"]"#, r#""cost-sensitive""#, "7"] {
        let (code, _, err) = admin(&["policy", "set", "-"], document)?;
        assert_eq!(code, Some(5), "{document}: {err}");
        assert!(err.contains("must be a JSON object"), "{document}: {err}");
    }
    let (code, _, err) = admin(&["policy", "merge", r#"{"placement": [8]}"#], "")?;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("placement: must be a JSON object"), "{err}");
    let now = stored()?;
    assert_eq!(now["default_lane"], "latency-critical", "{now}");
    assert_eq!(now["max_queued"], 100, "{now}");

    // Over the size limit: refused as such, by the command and by the control plane.
    let tenants: serde_json::Map<String, serde_json::Value> = (0..40_000)
        .map(|i| (format!("tenant-{i:06}"), "latency-critical".into()))
        .collect();
    let big = serde_json::json!({ "tenants": tenants }).to_string();
    assert!(big.len() > 1024 * 1024 && big.len() < 2 * 1024 * 1024);
    let (code, _, err) = admin(&["policy", "set", "-"], &big)?;
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("1 MiB") && !err.contains("unreachable"),
        "{err}"
    );
    let mut grpc = AdminClient::connect(format!("http://{control_plane}")).await?;
    let refused = grpc
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: big,
        })
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("1 MiB"), "{refused:?}");

    // A typo in a patch is named as the patch has it.
    let (code, _, err) = admin(&["policy", "merge", r#"{"placment": {"choices": 2}}"#], "")?;
    assert_eq!(code, Some(5), "{err}");
    assert!(
        err.contains("placment") && err.contains("unknown field") && !err.contains("column"),
        "{err}"
    );

    // Written straight into etcd: a document that is not an object is refused by the router,
    // which keeps its policy; a merge onto a document that is not JSON is refused as invalid.
    let mut etcd = etcd_client::Client::connect([cluster.etcd.url.as_str()], None).await?;
    etcd.put("/switchyard/v1/policy", "[]", None).await?;
    let rejected = cluster
        .router
        .wait_for_log("routing policy rejected", PATIENCE)
        .await?;
    assert!(rejected.contains("must be a JSON object"), "{rejected}");
    let mut client = InferenceClient::connect(format!("http://{}", cluster.router_addr())).await?;
    let kept = accepted(&mut client, None).await?;
    assert_eq!(kept.lane, Lane::LatencyCritical as i32, "{kept:?}");
    etcd.put("/switchyard/v1/policy", "{not json", None).await?;
    let (code, _, err) = admin(&["policy", "merge", r#"{"max_queued": 5}"#], "")?;
    assert_eq!(code, Some(5), "{err}");
    assert!(err.contains("replace it whole"), "{err}");
    let (code, _, err) = admin(&["policy", "get"], "")?;
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("invalid"), "{err}");
    let (code, _, err) = admin(&["policy", "set", "-"], r#"{"max_queued": 5}"#)?;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stored()?["max_queued"], 5);
    Ok(())
}
