//! API keys → tenants on both router front doors, against real processes: a router started
//! with `--api-keys-file` refuses gRPC `Inference` calls and `/v1` HTTP requests without a
//! known key, and routes AUTO requests by the key's tenant (policy `tenants`), whatever
//! `tenant` metadata the client sends. Health stays open.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use switchyard_proto::v1::{
    self, GenerateRequest, Lane, RequestClass, SamplingParams, admin_client::AdminClient,
    inference_client::InferenceClient, server_frame::Frame,
};
use switchyard_tests::{Cluster, ClusterSpec, wait_until};
use tonic::transport::Channel;

const ACME_KEY: &str = "sk-acme-test-0001";
const GLOBEX_KEY: &str = "sk-globex-test-0002";

fn request(tenant_metadata: Option<&str>) -> GenerateRequest {
    let mut request = GenerateRequest {
        model: "synthetic".into(),
        prompt: "hello".into(),
        class: RequestClass::Auto as i32,
        sampling: Some(SamplingParams {
            max_tokens: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(tenant) = tenant_metadata {
        request.metadata.insert("tenant".into(), tenant.into());
    }
    request
}

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii header"),
        );
    }
    request
}

/// Sends one `Generate` and returns its `Accepted` frame, or the call's status.
async fn accepted(
    client: &mut InferenceClient<Channel>,
    key: Option<&str>,
    tenant_metadata: Option<&str>,
) -> Result<v1::Accepted, tonic::Status> {
    let mut stream = client
        .generate(with_key(request(tenant_metadata), key))
        .await?
        .into_inner();
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

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_choose_the_tenant_on_grpc_and_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = dir.path().join("keys.json");
    std::fs::write(
        &keys_file,
        json!({"keys": [
            {"key": ACME_KEY, "tenant": "acme"},
            {"key": GLOBEX_KEY, "tenant": "globex"},
        ]})
        .to_string(),
    )?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        router_flags: vec!["--api-keys-file".into(), keys_file.display().to_string()],
        api_key: Some(GLOBEX_KEY.into()),
        ..Default::default()
    })
    .await?;
    let channel = switchyard::client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);
    let admin_channel =
        switchyard::client::connect_channel(&cluster.control_plane.addr("grpc").to_string())
            .await?;
    let mut admin = AdminClient::new(admin_channel);
    admin
        .set_policy(v1::SetPolicyRequest {
            document: r#"{"tenants": {"acme": "latency-critical", "globex": "cost-sensitive"}}"#
                .into(),
        })
        .await?;

    // gRPC with acme's key, class AUTO: the key's tenant picks the latency-critical lane (wse).
    wait_until(
        Duration::from_secs(30),
        "the router to apply the tenant policy",
        || {
            let mut client = client.clone();
            async move {
                accepted(&mut client, Some(ACME_KEY), None)
                    .await
                    .is_ok_and(|a| a.reason.starts_with("tenant=acme"))
            }
        },
    )
    .await?;
    let acme = accepted(&mut client, Some(ACME_KEY), None).await?;
    assert_eq!(acme.lane, Lane::LatencyCritical as i32, "{acme:?}");
    assert_eq!(acme.pool, "wse", "{acme:?}");
    assert!(acme.reason.contains("tenant=acme"), "{}", acme.reason);

    // A client-supplied tenant does not override the key's tenant, in either direction.
    let spoofed = accepted(&mut client, Some(GLOBEX_KEY), Some("acme")).await?;
    assert_eq!(spoofed.lane, Lane::CostSensitive as i32, "{spoofed:?}");
    assert!(
        spoofed.reason.contains("tenant=globex"),
        "{}",
        spoofed.reason
    );
    let kept = accepted(&mut client, Some(ACME_KEY), Some("globex")).await?;
    assert!(kept.reason.contains("tenant=acme"), "{}", kept.reason);

    // The same holds on a persistent session: every Start is stamped with the key's tenant.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut start = request(Some("acme"));
    start.request_id = "session-1".into();
    tx.send(v1::ClientFrame {
        frame: Some(v1::client_frame::Frame::Start(start)),
    })
    .await?;
    let mut frames = client
        .session(with_key(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some(GLOBEX_KEY),
        ))
        .await?
        .into_inner();
    let session_accepted = loop {
        match frames.message().await?.and_then(|f| f.frame) {
            Some(Frame::Accepted(a)) => break a,
            Some(Frame::Failed(f)) => bail!("session request failed: {}", f.message),
            Some(_) => {}
            None => bail!("session ended without Accepted"),
        }
    };
    assert!(
        session_accepted.reason.contains("tenant=globex"),
        "{}",
        session_accepted.reason
    );
    drop(tx);

    // No key, a wrong key, a malformed header: UNAUTHENTICATED with an actionable message.
    let missing = accepted(&mut client, None, Some("acme"))
        .await
        .expect_err("no key");
    assert_eq!(missing.code(), tonic::Code::Unauthenticated, "{missing:?}");
    assert!(
        missing.message().contains("Bearer"),
        "{}",
        missing.message()
    );
    let wrong = accepted(&mut client, Some("sk-not-a-key"), None)
        .await
        .expect_err("wrong key");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    assert!(
        wrong.message().contains("not recognised"),
        "{}",
        wrong.message()
    );
    let listed = client
        .list_models(with_key(v1::ListModelsRequest {}, None))
        .await
        .expect_err("list models needs a key too");
    assert_eq!(listed.code(), tonic::Code::Unauthenticated);

    // gRPC health stays open.
    let health_channel = switchyard::client::connect_channel(&cluster.router_addr()).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(health_channel);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;

    // HTTP: acme's key lands in the latency-critical lane.
    let base = cluster.router_openai_url();
    let http = http();
    let body = json!({
        "model": "synthetic",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 2,
    });
    let response = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(ACME_KEY)
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-switchyard-lane"], "latency-critical");
    assert_eq!(response.headers()["x-switchyard-pool"], "wse");

    // HTTP with globex's key stays cost-sensitive even when it asks for acme's tenant in
    // whatever way it can (there is no tenant field on the OpenAI API; the key decides).
    let response = http
        .post(format!("{base}/chat/completions"))
        .bearer_auth(GLOBEX_KEY)
        .json(&body)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-switchyard-lane"], "cost-sensitive");

    // HTTP without a key or with a wrong one: 401 in OpenAI's error shape.
    for key in [None, Some("sk-not-a-key")] {
        let mut post = http.post(format!("{base}/chat/completions")).json(&body);
        if let Some(key) = key {
            post = post.bearer_auth(key);
        }
        let response = post.send().await?;
        assert_eq!(response.status(), 401, "key {key:?}");
        let error: Value = response.json().await?;
        assert_eq!(error["error"]["type"], "authentication_error", "{error}");
        assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
        assert!(error["error"]["message"].is_string(), "{error}");
    }
    let models = http.get(format!("{base}/models")).send().await?;
    assert_eq!(models.status(), 401);
    let models = http
        .get(format!("{base}/models"))
        .bearer_auth(ACME_KEY)
        .send()
        .await?;
    assert_eq!(models.status(), 200);

    // /health stays open.
    let health = http
        .get(format!("http://{}/health", cluster.router.addr("http")))
        .send()
        .await?;
    assert_eq!(health.status(), 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_with_an_invalid_keys_file_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = dir.path().join("keys.json");
    std::fs::write(
        &keys_file,
        r#"{"keys": [{"key": "sk-a", "tenant": "a"}, {"key": "sk-b", "tenant": ""}]}"#,
    )?;
    let output = tokio::process::Command::new(switchyard_tests::switchyard_bin())
        .args([
            "router",
            "--etcd",
            "http://127.0.0.1:1",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--http-listen", "127.0.0.1:0", "--api-keys-file"])
        .arg(&keys_file)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await??;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("keys[1].tenant"), "{stderr}");
    assert!(!stderr.contains("sk-a"), "{stderr}");
    Ok(())
}
