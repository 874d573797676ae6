//! API keys → tenants on both router front doors, against real processes: a router started
//! with `--api-keys-file` refuses gRPC `Inference` calls and `/v1` HTTP requests without a
//! known key, and routes AUTO requests by the key's tenant (policy `tenants`), whatever
//! `tenant` metadata the client sends. Health stays open. `switchyard chat` presents a key;
//! it and `switchyard admin`, pointed at a TLS server without the CA to trust, say that they
//! cannot connect (and that the server may speak TLS), not that the server refused them.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use switchyard_proto::v1::{
    self, GenerateRequest, Lane, RequestClass, SamplingParams, admin_client::AdminClient,
    inference_client::InferenceClient, server_frame::Frame,
};
use switchyard_tests::{
    Cluster, ClusterSpec, Component, PYTHON_CLIENT, run_chat, run_program, up_args, wait_until,
    with_bearer, write_api_keys,
};
use switchyard_worker::synthetic::synthetic_text;
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

/// Sends one `Generate` and returns its `Accepted` frame, or the call's status.
async fn accepted(
    client: &mut InferenceClient<Channel>,
    key: Option<&str>,
    tenant_metadata: Option<&str>,
) -> Result<v1::Accepted, tonic::Status> {
    let mut stream = client
        .generate(with_bearer(request(tenant_metadata), key))
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
    // initech's key names a tenant the policy does not.
    const INITECH_KEY: &str = "sk-initech-test-0003";
    let keys_file = write_api_keys(
        dir.path(),
        &[
            (ACME_KEY, "acme"),
            (GLOBEX_KEY, "globex"),
            (INITECH_KEY, "initech"),
        ],
    )?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        router_flags: vec!["--api-keys-file".into(), keys_file.display().to_string()],
        api_key: Some(GLOBEX_KEY.into()),
        ..Default::default()
    })
    .await?;
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);
    let admin_channel =
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?;
    let mut admin = AdminClient::new(admin_channel);
    admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
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

    // The Python client sends its key the same way; without one its session is refused.
    let target = cluster.router_addr();
    let python = |key: &[&str]| {
        let mut args = vec![PYTHON_CLIENT, "--target", &target, "--model", "synthetic"];
        args.extend(key);
        args.extend(["--max-tokens", "3", "hello acme"]);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let (ok, out, err) = run_program("python3", &python(&["--api-key", ACME_KEY])).await?;
    assert!(ok, "{out}\n{err}");
    assert_eq!(out, format!("{}\n", synthetic_text("hello acme", 0, 3)));
    assert!(err.contains("tenant=acme"), "{err}");
    let (ok, out, err) = run_program("python3", &python(&[])).await?;
    assert!(!ok && out.is_empty(), "{out}\n{err}");
    assert!(err.contains("UNAUTHENTICATED"), "{err}");

    // Usage is counted by the keys' tenants, named by the policy or not (these requests end
    // when dropped after `Accepted`: cancelled).
    accepted(&mut client, Some(INITECH_KEY), None).await?;
    // Counted as the request ends, which the client dropping it only begins.
    let metrics_url = format!("http://{}/metrics", cluster.router.addr("http"));
    let counted = |metrics: &str| {
        ["acme", "globex", "initech"].iter().all(|tenant| {
            metrics.contains(&format!(
                "switchyard_router_tenant_requests_total{{tenant=\"{tenant}\","
            ))
        })
    };
    let every_tenant_counted = wait_until(
        Duration::from_secs(10),
        "every tenant's requests to be counted",
        || async {
            match reqwest::get(&metrics_url).await {
                Ok(answer) => answer.text().await.is_ok_and(|m| counted(&m)),
                Err(_) => false,
            }
        },
    )
    .await;
    if every_tenant_counted.is_err() {
        let metrics = reqwest::get(&metrics_url).await?.text().await?;
        panic!("not every tenant's requests counted:\n{metrics}");
    }

    // The same holds on a persistent session: every Start is stamped with the key's tenant.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut start = request(Some("acme"));
    start.request_id = "session-1".into();
    tx.send(v1::ClientFrame {
        frame: Some(v1::client_frame::Frame::Start(start)),
    })
    .await?;
    let mut frames = client
        .session(with_bearer(
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
        .list_models(with_bearer(v1::ListModelsRequest {}, None))
        .await
        .expect_err("list models needs a key too");
    assert_eq!(listed.code(), tonic::Code::Unauthenticated);

    // gRPC health stays open.
    let health_channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
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
    // Each refusal is counted by reason and front door.
    let metrics = http
        .get(format!("http://{}/metrics", cluster.router.addr("http")))
        .send()
        .await?
        .text()
        .await?;
    for door in ["grpc", "http"] {
        for reason in ["missing", "unknown"] {
            let series = format!(
                "switchyard_router_auth_refusals_total{{reason=\"{reason}\",door=\"{door}\"}} "
            );
            let count: u64 = metrics
                .lines()
                .find_map(|line| line.strip_prefix(&series))
                .unwrap_or_else(|| panic!("no {series}in {metrics}"))
                .parse()?;
            assert!(count > 0, "{series}{count}");
        }
    }
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

/// `switchyard chat` against a router that requires API keys: with the key in
/// `SWITCHYARD_API_KEY` or in the file of `--api-key-file` it lists the models (the default
/// model comes from `ListModels`, which needs the key too) and chats; without one, or with an
/// unknown one, it says what to pass. The key never appears in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_sends_its_api_key_from_the_environment_or_a_file() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = write_api_keys(dir.path(), &[(ACME_KEY, "acme")])?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: vec!["--api-keys-file".into(), keys_file.display().to_string()],
        api_key: Some(ACME_KEY.into()),
        ..Default::default()
    })
    .await?;
    let router = cluster.router_addr();
    let reply = synthetic_text("hello", 0, 3);
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, format!("{ACME_KEY}\n"))?;
    let key_file = key_file.display().to_string();
    let wrong_file = dir.path().join("wrong-key");
    std::fs::write(&wrong_file, "sk-not-a-key-0000")?;
    let wrong_file = wrong_file.display().to_string();
    for (how, args, env) in [
        (
            "SWITCHYARD_API_KEY",
            vec![],
            vec![("SWITCHYARD_API_KEY", ACME_KEY)],
        ),
        (
            "--api-key-file",
            vec!["--api-key-file", key_file.as_str()],
            vec![],
        ),
    ] {
        let mut full = vec!["--router", router.as_str(), "--max-tokens", "3"];
        full.extend(args);
        let (code, out, err) = run_chat(&full, &env, "hello\n").await?;
        assert_eq!(code, Some(0), "{how}: {out}\n{err}");
        assert!(
            out.contains(&reply),
            "{how}: no reply {reply:?} in {out:?}\n{err}"
        );
        assert!(
            !out.contains(ACME_KEY) && !err.contains(ACME_KEY),
            "{how}: the key was printed:\n{out}\n{err}"
        );
    }

    // No key: refused, and told how to pass one. An unknown key: refused, without echoing it.
    let no_key = ["--router", router.as_str(), "--model", "synthetic"];
    let (code, out, err) = run_chat(&no_key, &[], "hello\n").await?;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("missing api key"), "{err}");
    assert!(
        err.contains("--api-key-file") && err.contains("SWITCHYARD_API_KEY"),
        "{err}"
    );
    let wrong_key = [&no_key[..], &["--api-key-file", wrong_file.as_str()]].concat();
    let (code, out, err) = run_chat(&wrong_key, &[], "hello\n").await?;
    assert_ne!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("not recognised"), "{err}");
    assert!(!err.contains("sk-not-a-key"), "the key was printed: {err}");
    Ok(())
}

/// `switchyard admin` and `switchyard chat` without `--tls-ca-file` against servers that speak
/// only TLS (`switchyard up --tls`): the plaintext call breaks on the connection — as a reset,
/// a broken pipe or a TLS alert read as HTTP/2, whichever comes first — and each says it cannot
/// connect and to pass the CA; `admin` exits 7 (unreachable). With the CA both work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_the_ca_say_they_cannot_connect_to_a_tls_server() -> anyhow::Result<()> {
    let up = Component::start(
        "up-tls-clients",
        &up_args(&["--tls", "--engine", "synthetic"]),
        7,
    )
    .await?;
    let ca = up
        .notes
        .iter()
        .find_map(|l| l.strip_prefix("tls ca "))
        .unwrap_or_else(|| panic!("no `tls ca <path>` line in {:?}", up.notes))
        .to_string();
    let control_plane = up.addr_of("control-plane", "grpc").to_string();
    let router = up.addr_of("router", "grpc").to_string();
    let admin = |tls: bool| {
        let mut command = std::process::Command::new(switchyard_tests::switchyard_bin());
        command
            .args(["admin", "workers", "--control-plane", &control_plane])
            .env_remove("SWITCHYARD_TLS_CA_FILE");
        if tls {
            command.args(["--tls-ca-file", &ca]);
        }
        let output = command.output().expect("switchyard runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // Several times: which way the connection breaks is a race.
    for _ in 0..5 {
        let (code, err) = admin(false);
        assert_eq!(code, Some(7), "{err}");
        assert!(
            err.contains(&format!(
                "cannot reach the control plane at {control_plane}"
            )),
            "{err}"
        );
        assert!(err.contains("--tls-ca-file"), "{err}");
        assert!(!err.contains("refused"), "{err}");
    }
    let (code, err) = admin(true);
    assert_eq!(code, Some(0), "{err}");

    for _ in 0..3 {
        let (code, out, err) = run_chat(&["--router", &router], &[], "hello\n").await?;
        assert_ne!(code, Some(0), "{out}\n{err}");
        assert!(err.contains("cannot connect to the router"), "{err}");
        assert!(err.contains("--tls-ca-file"), "{err}");
        assert!(!err.contains("refused"), "{err}");
    }
    let with_ca = ["--router", router.as_str(), "--tls-ca-file", ca.as_str()];
    let (code, out, err) = run_chat(
        &[&with_ca[..], &["--max-tokens", "3"]].concat(),
        &[],
        "hello\n",
    )
    .await?;
    assert_eq!(code, Some(0), "{out}\n{err}");
    let reply = synthetic_text("hello", 0, 3);
    assert!(out.contains(&reply), "no reply {reply:?} in {out:?}\n{err}");
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

/// A long generation of the synthetic model (60 tokens/s on a GPU worker: ~60 s), so it holds
/// its place while the test runs.
fn long_request(id: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        class: RequestClass::CostSensitive as i32,
        sampling: Some(SamplingParams {
            max_tokens: 4000,
            ..Default::default()
        }),
        ..request(None)
    }
}

/// Starts a long `Generate` and returns its stream once it is accepted (it keeps running
/// while the stream is held; dropping it cancels the request).
async fn running(
    client: &mut InferenceClient<Channel>,
    key: &str,
    id: &str,
) -> anyhow::Result<tonic::Streaming<v1::ServerFrame>> {
    let mut stream = client
        .generate(with_bearer(long_request(id), Some(key)))
        .await?
        .into_inner();
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Accepted(_)) => return Ok(stream),
            Some(Frame::Failed(f)) => bail!("{id} failed: {} {}", f.code, f.message),
            _ => {}
        }
    }
    bail!("{id} ended without Accepted")
}

/// `--max-tenant-requests`: a tenant at its limit gets RESOURCE_EXHAUSTED (HTTP 429) on a new
/// connection as on the same one, another tenant is unaffected, and the tenant gets its place
/// back when one of its requests ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_request_limit_is_refused_until_one_ends() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = write_api_keys(dir.path(), &[(ACME_KEY, "acme"), (GLOBEX_KEY, "globex")])?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: vec![
            "--api-keys-file".into(),
            keys_file.display().to_string(),
            "--max-tenant-requests".into(),
            "2".into(),
        ],
        api_key: Some(GLOBEX_KEY.into()),
        ..Default::default()
    })
    .await?;
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);
    let first = running(&mut client, ACME_KEY, "acme-1").await?;
    let _second = running(&mut client, ACME_KEY, "acme-2").await?;

    let other_connection = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let refused = accepted(
        &mut InferenceClient::new(other_connection),
        Some(ACME_KEY),
        None,
    )
    .await
    .expect_err("acme's third request is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--max-tenant-requests"),
        "{}",
        refused.message()
    );
    let over_http = http()
        .post(format!("{}/chat/completions", cluster.router_openai_url()))
        .bearer_auth(ACME_KEY)
        .json(
            &json!({"model": "synthetic", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 2}),
        )
        .send()
        .await?;
    assert_eq!(over_http.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    // Another tenant is not held back by acme's limit.
    accepted(&mut client, Some(GLOBEX_KEY), None).await?;

    // One of acme's requests ends (its client cancels): acme may send again.
    drop(first);
    wait_until(
        Duration::from_secs(30),
        "acme's cancelled request to give its place back",
        || {
            let mut client = client.clone();
            async move { accepted(&mut client, Some(ACME_KEY), None).await.is_ok() }
        },
    )
    .await?;
    Ok(())
}

/// `--max-session-requests`: a session at its limit gets RESOURCE_EXHAUSTED for the next
/// `Start` and stays open; once one of its requests ends it accepts a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_at_its_request_limit_refuses_more_and_stays_open() -> anyhow::Result<()> {
    use v1::{Cancel, ClientFrame, client_frame};
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: vec!["--max-session-requests".into(), "2".into()],
        ..Default::default()
    })
    .await?;
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut frames = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let start = |id: &str| ClientFrame {
        frame: Some(client_frame::Frame::Start(long_request(id))),
    };
    // The next frame about `id`, skipping token frames.
    async fn next_about(
        frames: &mut tonic::Streaming<v1::ServerFrame>,
        id: &str,
    ) -> anyhow::Result<Frame> {
        while let Some(frame) = frames.message().await? {
            let about = match &frame.frame {
                Some(Frame::Accepted(a)) => &a.request_id,
                Some(Frame::Finished(f)) => &f.request_id,
                Some(Frame::Failed(f)) => &f.request_id,
                _ => continue,
            };
            if about == id {
                return Ok(frame.frame.expect("matched above"));
            }
        }
        bail!("session ended before a frame about {id}")
    }
    for id in ["s1", "s2"] {
        tx.send(start(id)).await?;
        assert!(matches!(
            next_about(&mut frames, id).await?,
            Frame::Accepted(_)
        ));
    }
    tx.send(start("s3")).await?;
    match next_about(&mut frames, "s3").await? {
        Frame::Failed(f) => {
            assert_eq!(f.code, tonic::Code::ResourceExhausted as i32, "{f:?}");
            assert!(
                f.message.contains("--max-session-requests"),
                "{}",
                f.message
            );
        }
        other => bail!("s3 was not refused: {other:?}"),
    }
    tx.send(ClientFrame {
        frame: Some(client_frame::Frame::Cancel(Cancel {
            request_id: "s1".into(),
        })),
    })
    .await?;
    assert!(matches!(
        next_about(&mut frames, "s1").await?,
        Frame::Finished(_)
    ));
    tx.send(start("s4")).await?;
    assert!(matches!(
        next_about(&mut frames, "s4").await?,
        Frame::Accepted(_)
    ));
    Ok(())
}

/// A stored response belongs to the API key's tenant that made it: another tenant's key finds
/// nothing, on the replica that keeps it or on another (which asks the keeper with the
/// client's own key), and no key is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_only_its_tenants() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = write_api_keys(dir.path(), &[(ACME_KEY, "acme"), (GLOBEX_KEY, "globex")])?;
    let keys_flag = keys_file.display().to_string();
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        router_flags: vec!["--api-keys-file".into(), keys_flag.clone()],
        api_key: Some(ACME_KEY.into()),
        ..Default::default()
    })
    .await?;
    let other = switchyard_tests::start_router(
        &cluster.etcd.url,
        "other-replica",
        &["--api-keys-file", &keys_flag],
    )
    .await?;
    let keeper = cluster.router_openai_url();
    let elsewhere = format!("http://{}/v1", other.addr("http"));
    let http = reqwest::Client::new();
    let created: Value = http
        .post(format!("{keeper}/responses"))
        .bearer_auth(ACME_KEY)
        .json(&json!({"model": "synthetic", "input": "secret plans", "max_output_tokens": 4}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    let read = |base: String, key: Option<&'static str>| {
        let (http, id) = (http.clone(), id.clone());
        async move {
            let mut get = http.get(format!("{base}/responses/{id}"));
            if let Some(key) = key {
                get = get.bearer_auth(key);
            }
            anyhow::Ok(get.send().await?.status().as_u16())
        }
    };
    // The other replica links no worker of its own to read a stored response: it answers as
    // soon as it has reached etcd.
    wait_until(
        Duration::from_secs(20),
        "the other replica to find the keeper",
        || async {
            read(elsewhere.clone(), Some(ACME_KEY))
                .await
                .is_ok_and(|s| s == 200)
        },
    )
    .await?;
    assert_eq!(read(keeper.clone(), Some(ACME_KEY)).await?, 200);
    assert_eq!(read(keeper.clone(), Some(GLOBEX_KEY)).await?, 404);
    assert_eq!(read(elsewhere.clone(), Some(GLOBEX_KEY)).await?, 404);
    assert_eq!(read(elsewhere.clone(), None).await?, 401);
    // Nor can another tenant go on from it, or delete it.
    let answer = http
        .post(format!("{elsewhere}/responses"))
        .bearer_auth(GLOBEX_KEY)
        .json(&json!({"model": "synthetic", "input": "and?", "previous_response_id": id}))
        .send()
        .await?;
    assert_eq!(answer.status().as_u16(), 404);
    // Nor refer to one of its items, on either replica; its own tenant can.
    let item = created["output"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let refer = |base: String, key: &'static str| {
        let (http, item) = (http.clone(), item.clone());
        async move {
            let answer = http
                .post(format!("{base}/responses"))
                .bearer_auth(key)
                .json(
                    &json!({"model": "synthetic", "max_output_tokens": 2, "store": false,
                              "input": [{"type": "item_reference", "id": item}]}),
                )
                .send()
                .await?;
            anyhow::Ok(answer.status().as_u16())
        }
    };
    assert_eq!(refer(keeper.clone(), GLOBEX_KEY).await?, 404);
    assert_eq!(refer(elsewhere.clone(), GLOBEX_KEY).await?, 404);
    assert_eq!(refer(elsewhere.clone(), ACME_KEY).await?, 200);
    let deleted = http
        .delete(format!("{keeper}/responses/{id}"))
        .bearer_auth(GLOBEX_KEY)
        .send()
        .await?;
    assert_eq!(deleted.status().as_u16(), 404);
    assert_eq!(read(keeper.clone(), Some(ACME_KEY)).await?, 200);

    // A stored chat completion too: another tenant neither reads, lists, changes nor deletes
    // it, on either replica.
    let stored: Value = http
        .post(format!("{keeper}/chat/completions"))
        .bearer_auth(ACME_KEY)
        .json(
            &json!({"model": "synthetic", "max_tokens": 2, "store": true,
                      "metadata": {"plan": "secret"},
                      "messages": [{"role": "user", "content": "secret plans"}]}),
        )
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let completion = stored["id"].as_str().unwrap_or_default().to_string();
    let call = |method: reqwest::Method, url: String, key: &'static str| {
        let http = http.clone();
        async move {
            let answer = http
                .request(method.clone(), url)
                .bearer_auth(key)
                .json(&json!({"metadata": {"plan": "mine now"}}));
            let answer = match method {
                reqwest::Method::POST => answer,
                _ => answer.body(Vec::new()),
            }
            .send()
            .await?;
            let status = answer.status().as_u16();
            anyhow::Ok((status, answer.json::<Value>().await.unwrap_or_default()))
        }
    };
    for base in [&keeper, &elsewhere] {
        let at = format!("{base}/chat/completions/{completion}");
        for (method, url) in [
            (reqwest::Method::GET, at.clone()),
            (reqwest::Method::GET, format!("{at}/messages")),
            (reqwest::Method::POST, at.clone()),
            (reqwest::Method::DELETE, at.clone()),
        ] {
            let (status, body) = call(method.clone(), url.clone(), GLOBEX_KEY).await?;
            assert_eq!(status, 404, "{method} {url}: {body}");
        }
        let listing = format!("{base}/chat/completions?metadata[plan]=secret");
        let (_, theirs) = call(reqwest::Method::GET, listing.clone(), GLOBEX_KEY).await?;
        assert_eq!(theirs["data"], json!([]), "{theirs}");
        let (_, ours) = call(reqwest::Method::GET, listing, ACME_KEY).await?;
        assert_eq!(ours["data"][0]["id"], completion.as_str(), "{ours}");
    }
    Ok(())
}
