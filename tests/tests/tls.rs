//! TLS on every listener and link, against `switchyard up --tls` with real clients: grpcurl
//! with `-cacert`, curl with `--cacert`, the openai Python SDK over HTTPS, tonic; plaintext
//! clients are refused, and workers take `Worker` calls only from client certificates of the
//! cluster CA (mTLS).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use switchyard_cluster::tls::ClientTls;
use switchyard_proto::v1;
use switchyard_tests::{Component, up_args};
use switchyard_worker::synthetic::synthetic_text;

const PROCESS_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs a command to completion; returns (success, stdout, stderr).
async fn run(program: &str, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = tokio::time::timeout(
        PROCESS_TIMEOUT,
        tokio::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{program} did not finish within {PROCESS_TIMEOUT:?}"))?
    .with_context(|| format!("running {program} (pip install -r scripts/test-requirements.txt)"))?;
    Ok((
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

async fn succeeds(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let (ok, out, err) = run(program, args).await?;
    anyhow::ensure!(ok, "{program} {args:?} failed:\n{out}\n{err}");
    Ok(out)
}

/// The CA file `switchyard up --tls` printed.
fn printed_ca(up: &Component) -> PathBuf {
    let line = up
        .notes
        .iter()
        .find_map(|l| l.strip_prefix("tls ca "))
        .unwrap_or_else(|| panic!("no `tls ca <path>` line in {:?}", up.notes));
    PathBuf::from(line)
}

/// A TLS channel to `addr` trusting `ca` (and presenting no client certificate).
async fn tls_channel(addr: &str, ca: &Path) -> anyhow::Result<tonic::transport::Channel> {
    let tls = ClientTls::new(ca.to_path_buf());
    let endpoint =
        switchyard_cluster::tls::endpoint(addr, Some(&tls)).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(endpoint.connect().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_up_with_tls_serves_real_clients_over_tls_only() -> anyhow::Result<()> {
    let up = Component::start("up-tls", &up_args(&["--tls", "--engine", "synthetic"]), 7).await?;
    let ca = printed_ca(&up);
    let ca_arg = ca.to_str().expect("utf-8 path");
    let router = up.addr_of("router", "grpc").to_string();

    // grpcurl trusting the printed CA: reflection over TLS, and a streamed Generate.
    let services = succeeds("grpcurl", &["-cacert", ca_arg, &router, "list"]).await?;
    assert!(services.contains("switchyard.v1.Inference"), "{services}");
    let body = r#"{"model":"synthetic","messages":[{"role":"user","content":"hello tls"}],"sampling":{"max_tokens":4},"class":"REQUEST_CLASS_LATENCY_CRITICAL"}"#;
    let out = succeeds(
        "grpcurl",
        &[
            "-cacert",
            ca_arg,
            "-d",
            body,
            &router,
            "switchyard.v1.Inference/Generate",
        ],
    )
    .await?;
    let frames: Vec<Value> = serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()?;
    let text: String = frames
        .iter()
        .filter_map(|f| f["tokens"]["text"].as_str())
        .collect();
    assert_eq!(text, synthetic_text("hello tls", 0, 4), "{out}");
    // Without the CA, grpcurl does not trust the server.
    let (ok, _, err) = run("grpcurl", &["-connect-timeout", "5", &router, "list"]).await?;
    assert!(!ok, "grpcurl trusted the throw-away CA without -cacert");
    assert!(err.contains("certificate"), "{err}");

    // Plaintext is refused on every listener (the TLS handshake fails; nothing is served).
    for (component, protocol) in [
        ("router", "grpc"),
        ("control-plane", "grpc"),
        ("worker-gpu", "grpc"),
    ] {
        let addr = up.addr_of(component, protocol);
        let plain = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?;
            anyhow::Ok(())
        };
        let answered = tokio::time::timeout(Duration::from_secs(10), plain).await;
        assert!(
            matches!(answered, Ok(Err(_))),
            "plaintext gRPC to the {component} was not refused: {answered:?}"
        );
    }
    for (component, protocol) in [("router", "http"), ("control-plane", "http")] {
        let addr = up.addr_of(component, protocol);
        let (ok, out, _) = run(
            "curl",
            &["-sS", "--max-time", "5", &format!("http://{addr}/health")],
        )
        .await?;
        assert!(!ok, "plaintext HTTP to the {component} answered: {out}");
    }

    // curl and the openai SDK over HTTPS with the printed CA.
    let http = up.addr_of("router", "http");
    let out = succeeds(
        "curl",
        &["-sS", "--cacert", ca_arg, &format!("https://{http}/health")],
    )
    .await?;
    let health: Value = serde_json::from_str(&out)?;
    assert_eq!(health["workers"]["ready"], 3, "{out}");
    let out = succeeds(
        "curl",
        &[
            "-sS",
            "--cacert",
            ca_arg,
            &format!("https://localhost:{}/v1/completions", http.port()),
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"model": "synthetic", "prompt": "over https", "max_tokens": 2}"#,
        ],
    )
    .await?;
    let completion: Value = serde_json::from_str(&out)?;
    assert_eq!(
        completion["choices"][0]["text"],
        synthetic_text("over https", 0, 2),
        "{out}"
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/openai_sdk_check.py");
    let out = succeeds(
        "python3",
        &[script, &format!("https://{http}/v1"), "synthetic", ca_arg],
    )
    .await?;
    assert!(out.contains("openai-sdk: 8 passed, 0 failed"), "{out}");

    // The dashboard over HTTPS: reads, and its own page's origin is now https://.
    let dashboard = up.addr_of("control-plane", "http");
    let out = succeeds(
        "curl",
        &[
            "-sS",
            "--cacert",
            ca_arg,
            &format!("https://{dashboard}/api/workers"),
        ],
    )
    .await?;
    let workers: Value = serde_json::from_str(&out)?;
    assert_eq!(
        workers["workers"].as_array().map(Vec::len),
        Some(3),
        "{out}"
    );
    // The control plane's load streams to the workers (TLS + client certificate) are up.
    assert!(
        workers["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|w| !w["load"].is_null()),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_take_worker_calls_only_from_client_certificates_of_the_cluster_ca()
-> anyhow::Result<()> {
    let up = Component::start("up-mtls", &up_args(&["--tls", "--engine", "synthetic"]), 7).await?;
    let ca = printed_ca(&up);
    let worker = up.addr_of("worker-gpu", "grpc").to_string();

    // A TLS client without a client certificate: health answers, Worker.Serve does not.
    let channel = tls_channel(&worker, &ca).await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    assert_eq!(
        health.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let refused = v1::worker_client::WorkerClient::new(channel)
        .serve(futures::stream::pending::<v1::RouterFrame>())
        .await
        .expect_err("Worker.Serve without a client certificate was served");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("client certificate"),
        "{}",
        refused.message()
    );

    // grpcurl, likewise.
    let (ok, out, err) = run(
        "grpcurl",
        &[
            "-cacert",
            ca.to_str().expect("utf-8 path"),
            "-d",
            "{}",
            &worker,
            "switchyard.v1.Worker/GetTokenizer",
        ],
    )
    .await?;
    assert!(!ok, "{out}");
    assert!(err.contains("Unauthenticated"), "{err}");

    // A client certificate from another CA fails the handshake: nothing is served.
    let other = switchyard::tls::LocalPki::generate(&["intruder"])?;
    let files = other.files("intruder");
    let intruder = ClientTls::new(ca.clone()).with_identity(
        files.cert_file.expect("generated"),
        files.key_file.expect("generated"),
    );
    let dialled = async {
        let channel = switchyard_cluster::tls::endpoint(&worker, Some(&intruder))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .connect()
            .await?;
        v1::worker_client::WorkerClient::new(channel)
            .serve(futures::stream::pending::<v1::RouterFrame>())
            .await?;
        anyhow::Ok(())
    };
    let result = tokio::time::timeout(Duration::from_secs(10), dialled).await;
    assert!(
        matches!(result, Ok(Err(_))),
        "a certificate of another CA was served: {result:?}"
    );
    Ok(())
}
