//! TLS on every listener and link, against `switchyard up --tls` with real clients: grpcurl
//! with `-cacert`, curl with `--cacert`, the openai Python SDK over HTTPS, tonic; plaintext
//! clients are refused, and workers take `Worker` calls only from client certificates of the
//! cluster CA (mTLS); routers link only to workers whose certificates name the worker of their
//! etcd record.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Capacity, Pool, WorkerRecord, WorkerState};
use switchyard_proto::v1;
use switchyard_tests::{
    Cluster, ClusterSpec, Component, Etcd, EtcdTls, PYTHON_CLIENT, alert_rules,
    assert_worker_calls_need_a_client_certificate, program_output, run_program, start_router,
    synthetic_request, up_args, wait_until,
};
use switchyard_worker::synthetic::synthetic_text;

/// Waits until the router behind `inference` lists routable workers whose ids satisfy `done`.
async fn wait_until_routable(
    inference: &v1::inference_client::InferenceClient<tonic::transport::Channel>,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> anyhow::Result<()> {
    wait_until(Duration::from_secs(30), what, || {
        let mut inference = inference.clone();
        let done = &done;
        async move {
            inference
                .list_models(v1::ListModelsRequest {})
                .await
                .is_ok_and(|models| {
                    done(&switchyard_client::routable_worker_ids(
                        &models.into_inner(),
                    ))
                })
        }
    })
    .await?;
    Ok(())
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

fn files_of(pki: &switchyard::tls::LocalPki, name: &str) -> (PathBuf, PathBuf) {
    let files = pki.files(name);
    (
        files.cert_file.expect("generated"),
        files.key_file.expect("generated"),
    )
}

/// Completes a TLS handshake with `addr` (trusting `ca`, presenting `identity`), opens HTTP/2
/// and returns the first bytes the server sends back: `Err` when it ends the connection with an
/// alert or closes it instead. At the byte level on purpose: in TLS 1.3 the server judges the
/// client's certificate only after the client considers the handshake done, and a tonic channel
/// would reconnect on the refusal instead of reporting it.
async fn first_bytes_served(
    addr: &str,
    ca: &Path,
    identity: &(PathBuf, PathBuf),
) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in switchyard_cluster::tls::read_certificates(ca)? {
        roots.add(cert)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            switchyard_cluster::tls::read_certificates(&identity.0)?,
            switchyard_cluster::tls::read_private_key(&identity.1)?,
        )?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let socket: std::net::SocketAddr = addr.parse()?;
    let tcp = tokio::net::TcpStream::connect(socket).await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(socket.ip().into(), tcp)
        .await?;
    // The HTTP/2 preface and an empty SETTINGS frame: a server that took the connection answers
    // with its own SETTINGS.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    tls.flush().await?;
    let mut buf = vec![0u8; 64];
    let n = tls.read(&mut buf).await?;
    anyhow::ensure!(n > 0, "the server closed the connection");
    buf.truncate(n);
    Ok(buf)
}

/// `switchyard worker-gpu` `id` on `etcd`, serving TLS with a certificate naming it and taking
/// `Worker` calls only from client certificates of `pki`'s CA.
fn tls_worker_args(
    pki: &switchyard::tls::LocalPki,
    etcd: &str,
    id: &str,
) -> anyhow::Result<Vec<String>> {
    let files = pki.worker(Pool::Gpu, id)?;
    let path = |p: &Option<PathBuf>| p.as_ref().expect("generated").display().to_string();
    let ca = pki.ca_file().display().to_string();
    Ok(switchyard_tests::strings(&[
        "worker-gpu",
        "--listen",
        "127.0.0.1:0",
        "--etcd",
        etcd,
        "--id",
        id,
        "--tls-cert-file",
        &path(&files.cert_file),
        "--tls-key-file",
        &path(&files.key_file),
        "--tls-ca-file",
        &ca,
        "--tls-client-ca-file",
        &ca,
    ]))
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
    let services = program_output("grpcurl", &["-cacert", ca_arg, &router, "list"]).await?;
    assert!(services.contains("switchyard.v1.Inference"), "{services}");
    let body = r#"{"model":"synthetic","messages":[{"role":"user","content":"hello tls"}],"sampling":{"max_tokens":4},"class":"REQUEST_CLASS_LATENCY_CRITICAL"}"#;
    let out = program_output(
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
    // The Python client trusting it too, over a whole session.
    let out = program_output(
        "python3",
        &[
            PYTHON_CLIENT,
            "--target",
            &router,
            "--ca-file",
            ca_arg,
            "--max-tokens",
            "4",
            "hello python tls",
        ],
    )
    .await?;
    assert_eq!(
        out,
        format!("{}\n", synthetic_text("hello python tls", 0, 4))
    );
    // Without the CA, grpcurl does not trust the server.
    let (ok, _, err) = run_program("grpcurl", &["-connect-timeout", "5", &router, "list"]).await?;
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
        let (ok, out, _) = run_program(
            "curl",
            &["-sS", "--max-time", "5", &format!("http://{addr}/health")],
        )
        .await?;
        assert!(!ok, "plaintext HTTP to the {component} answered: {out}");
    }

    // curl and the openai SDK over HTTPS with the printed CA.
    let http = up.addr_of("router", "http");
    let out = program_output(
        "curl",
        &["-sS", "--cacert", ca_arg, &format!("https://{http}/health")],
    )
    .await?;
    let health: Value = serde_json::from_str(&out)?;
    assert_eq!(health["workers"]["ready"], 3, "{out}");
    let out = program_output(
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
    let out = program_output(
        "python3",
        &[script, &format!("https://{http}/v1"), "synthetic", ca_arg],
    )
    .await?;
    assert!(out.contains("openai-sdk: 15 passed, 0 failed"), "{out}");

    // The dashboard over HTTPS: reads, and its own page's origin is now https://.
    let dashboard = up.addr_of("control-plane", "http");
    let out = program_output(
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
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await?;
    assert_eq!(
        health.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_worker_calls_need_a_client_certificate(&worker, &ca).await?;

    // grpcurl, likewise.
    let (ok, out, err) = run_program(
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
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        first_bytes_served(&worker, &ca, &files_of(&other, "intruder")),
    )
    .await
    .context("the worker neither answered nor closed the connection")?;
    assert!(
        answer.is_err(),
        "a client certificate of another CA was served: {answer:?}"
    );
    Ok(())
}

/// Separate processes, as deployed: etcd serving TLS only with client certificates and user
/// authentication on, a worker and a router reaching it with `--etcd-ca-file`,
/// `--etcd-cert-file`/`--etcd-key-file` and `--etcd-user`/`--etcd-password-file`, serving TLS
/// themselves (`--tls-*`, the worker requiring client certificates), and a TLS client
/// generating through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_reach_a_tls_etcd_as_a_user_and_link_over_mtls() -> anyhow::Result<()> {
    let pki = switchyard::tls::LocalPki::generate(&["etcd", "router"])?;
    let worker_files = pki.worker(Pool::Gpu, "gpu-tls")?;
    let ca = pki.ca_file();
    let etcd_files = pki.files("etcd");
    let etcd = Etcd::start_tls(EtcdTls {
        cert_file: etcd_files.cert_file.clone().expect("generated"),
        key_file: etcd_files.key_file.clone().expect("generated"),
        ca_file: ca.clone(),
    })
    .await?;
    let admin_tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(std::fs::read(&ca)?))
        .identity(etcd_client::Identity::from_pem(
            std::fs::read(etcd_files.cert_file.as_ref().expect("generated"))?,
            std::fs::read(etcd_files.key_file.as_ref().expect("generated"))?,
        ));
    let mut admin = etcd_client::Client::connect(
        [&etcd.url],
        Some(etcd_client::ConnectOptions::new().with_tls(admin_tls)),
    )
    .await?;
    let password = "correct horse battery staple";
    admin.user_add("root", password, None).await?;
    // etcd creates the root role on first use in some versions, not in others.
    let _ = admin.role_add("root").await;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;
    let dir = tempfile::tempdir()?;
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, format!("{password}\n"))?;

    let path = |p: &Option<PathBuf>| p.as_ref().expect("generated").display().to_string();
    let ca_arg = ca.display().to_string();
    let etcd_flags = |files: &switchyard_cluster::tls::TlsFiles| {
        vec![
            "--etcd".to_string(),
            etcd.url.clone(),
            "--etcd-ca-file".into(),
            ca_arg.clone(),
            "--etcd-cert-file".into(),
            path(&files.cert_file),
            "--etcd-key-file".into(),
            path(&files.key_file),
            "--etcd-user".into(),
            "root".into(),
            "--etcd-password-file".into(),
            password_file.display().to_string(),
            "--tls-cert-file".into(),
            path(&files.cert_file),
            "--tls-key-file".into(),
            path(&files.key_file),
            "--tls-ca-file".into(),
            ca_arg.clone(),
        ]
    };
    let mut args = vec![
        "worker-gpu".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--id".into(),
        "gpu-tls".into(),
    ];
    args.extend(etcd_flags(&worker_files));
    args.extend(["--tls-client-ca-file".to_string(), ca_arg.clone()]);
    let _worker = Component::start("tls-worker", &args, 1).await?;
    let mut args = vec![
        "router".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(etcd_flags(&pki.files("router")));
    let router = Component::start("tls-router", &args, 2).await?;

    let channel = tls_channel(&router.addr("grpc").to_string(), &ca).await?;
    let mut inference = v1::inference_client::InferenceClient::new(channel.clone());
    wait_until_routable(
        &inference,
        "the router to link to the worker over mTLS",
        |ids| !ids.is_empty(),
    )
    .await?;
    let mut stream = inference
        .generate(synthetic_request(
            "over-tls",
            v1::RequestClass::CostSensitive,
            "through a secured etcd",
            3,
        ))
        .await?
        .into_inner();
    let mut text = String::new();
    while let Some(frame) = stream.message().await? {
        if let Some(v1::server_frame::Frame::Tokens(tokens)) = frame.frame {
            text.push_str(&tokens.text);
        }
    }
    assert_eq!(text, synthetic_text("through a secured etcd", 0, 3));

    // The password matters: the same certificate as another etcd user is refused.
    let wrong = dir.path().join("wrong-password");
    std::fs::write(&wrong, "wrong\n")?;
    let mut args = vec![
        "router".to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--http-listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(etcd_flags(&pki.files("router")));
    let at = args
        .iter()
        .position(|a| a == "--etcd-password-file")
        .expect("flag")
        + 1;
    args[at] = wrong.display().to_string();
    let refused = Component::start("tls-router-wrong-password", &args, 1).await;
    assert!(
        refused.is_err(),
        "a router with a wrong etcd password started"
    );
    Ok(())
}

/// The Prometheus text of the router's `/metrics` (HTTPS, trusting `ca`).
async fn router_metrics(router: &Component, ca: &Path) -> anyhow::Result<String> {
    program_output(
        "curl",
        &[
            "-sS",
            "--cacert",
            ca.to_str().expect("utf-8 path"),
            &format!("https://{}/metrics", router.addr("http")),
        ],
    )
    .await
}

/// The value of `switchyard_router_worker_identity_rejections_total` for a record.
fn identity_rejections(metrics: &str, worker_id: &str, pool: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_router_worker_identity_rejections_total{"))
        .filter(|l| {
            l.contains(&format!("worker_id=\"{worker_id}\""))
                && l.contains(&format!("pool=\"{pool}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Worker identity: whoever can write a key under `/switchyard/v1/workers/` can add a record
/// pointing at any address. With TLS, the router links to a record only if the certificate
/// served there names the record's worker (`spiffe://switchyard/pool/<pool>/worker/<id>`):
/// records forged under another id (same pool, and another pool) and a genuine worker's record
/// overwritten, all pointing at one genuine worker, get no traffic; the router logs what the
/// certificate named and counts each rejection, the control plane streams an identity event
/// for each, and every request is served by that worker under its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_worker_records_get_no_traffic_and_the_router_counts_them() -> anyhow::Result<()> {
    let pki = switchyard::tls::LocalPki::generate(&["router", "control-plane"])?;
    let ca = pki.ca_file();
    let ca_arg = ca.display().to_string();
    let path = |p: &Option<PathBuf>| p.as_ref().expect("generated").display().to_string();
    let etcd = Etcd::start().await?;

    let worker_args = |id: &str| tls_worker_args(&pki, &etcd.url, id);
    let worker = Component::start("identity-worker", &worker_args("gpu-genuine")?, 1).await?;
    let _second = Component::start("identity-second", &worker_args("gpu-second")?, 1).await?;
    let router_files = pki.files("router");
    let args: Vec<String> = [
        "router",
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--etcd",
        &etcd.url,
        "--tls-cert-file",
        &path(&router_files.cert_file),
        "--tls-key-file",
        &path(&router_files.key_file),
        "--tls-ca-file",
        &ca_arg,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let router = Component::start("identity-router", &args, 2).await?;
    let channel = tls_channel(&router.addr("grpc").to_string(), &ca).await?;
    let inference = v1::inference_client::InferenceClient::new(channel);
    let routable = || {
        let mut inference = inference.clone();
        async move {
            inference
                .list_models(v1::ListModelsRequest {})
                .await
                .map(|models| switchyard_client::routable_worker_ids(&models.into_inner()))
                .unwrap_or_default()
        }
    };
    wait_until(
        Duration::from_secs(30),
        "the router to link to both genuine workers",
        || async { routable().await == ["gpu-genuine", "gpu-second"] },
    )
    .await?;

    // The control plane, which follows every record's load, reports each refused record as an
    // event to operators (WatchEvents, the dashboard).
    let cp_files = pki.files("control-plane");
    let (cp_cert, cp_key) = (path(&cp_files.cert_file), path(&cp_files.key_file));
    let control_plane = switchyard_tests::start_control_plane(
        &etcd.url,
        "identity-cp",
        &[
            "--tls-cert-file",
            &cp_cert,
            "--tls-key-file",
            &cp_key,
            "--tls-ca-file",
            &ca_arg,
        ],
    )
    .await?;
    let mut events = v1::admin_client::AdminClient::new(
        tls_channel(&control_plane.addr("grpc").to_string(), &ca).await?,
    )
    .watch_events(v1::WatchEventsRequest::default())
    .await?
    .into_inner();

    // Records written straight into etcd as anyone with write access to the prefix could, all
    // at gpu-genuine's address: another id in its pool, one in the wafer-scale pool (where
    // latency-critical requests would go first), and gpu-second's own record overwritten.
    let mut etcd_client = etcd_client::Client::connect([&etcd.url], None).await?;
    let genuine_address = worker.addr("grpc").to_string();
    let forged = [
        ("gpu-forged", Pool::Gpu),
        ("wse-forged", Pool::Wse),
        ("gpu-second", Pool::Gpu),
    ];
    for (id, pool) in forged {
        let record = WorkerRecord {
            id: id.into(),
            pool,
            address: genuine_address.clone(),
            models: vec!["synthetic".into()],
            capacity: Capacity {
                max_concurrent: 64,
                tokens_per_s: 1000.0,
                cost_per_mtok: 0.0,
            },
            hardware: "forged".into(),
            engine: "synthetic".into(),
            version: "0.1.0".into(),
            state: WorkerState::Ready,
            scores_prompts: false,
            embeds: false,
        };
        etcd_client
            .put(record.key(), serde_json::to_vec(&record)?, None)
            .await?;
    }

    // The router refuses both at the handshake and counts each under the record's labels.
    wait_until(
        Duration::from_secs(30),
        "the router to count every forged record as an identity rejection",
        || async {
            let metrics = router_metrics(&router, &ca).await.unwrap_or_default();
            forged
                .iter()
                .all(|(id, pool)| identity_rejections(&metrics, id, pool.as_str()) >= 1.0)
        },
    )
    .await?;
    let metrics = router_metrics(&router, &ca).await?;
    assert_eq!(
        identity_rejections(&metrics, "gpu-genuine", "gpu"),
        0.0,
        "{metrics}"
    );
    // The shipped alert for forged records selects these series (the alert rules' other
    // selectors are checked in `observability::the_alert_rules_read_metrics_the_components_serve`).
    let rules = alert_rules::load()?;
    let report = alert_rules::check(&rules, &alert_rules::parse_exposition(&metrics)?);
    let about_forged = |found: &[String]| {
        found
            .iter()
            .any(|line| line.starts_with("SwitchyardForgedWorkerRecord:"))
    };
    assert!(
        !about_forged(&report.unmatched) && !about_forged(&report.errors),
        "{report:?}"
    );
    // The warning names the record and what the certificate named instead.
    let log = std::fs::read_to_string(&router.log)?;
    for (forged, _) in forged {
        let line = log
            .lines()
            .find(|l| l.contains("worker record refused") && l.contains(forged))
            .unwrap_or_else(|| panic!("no refusal logged for {forged}:\n{log}"));
        assert!(
            line.contains("spiffe://switchyard/pool/gpu/worker/gpu-genuine"),
            "{line}"
        );
        assert!(line.contains(&genuine_address), "{line}");
    }

    // Each forged record is one identity event, naming what the certificate named.
    let mut refused = std::collections::BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while refused.len() < forged.len() {
            let event = events.message().await?.context("the event stream ended")?;
            if event.kind() == v1::cluster_event::Kind::WorkerIdentityRejected {
                assert!(
                    event
                        .message
                        .contains("spiffe://switchyard/pool/gpu/worker/gpu-genuine"),
                    "{event:?}"
                );
                refused.insert((event.worker_id, event.pool));
            }
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("identity events seen: {refused:?}"))??;
    let expected: std::collections::BTreeSet<_> = forged
        .iter()
        .map(|(id, pool)| (id.to_string(), pool.to_string()))
        .collect();
    assert_eq!(refused, expected);

    // No forged record is ever routable, and every request is placed on the genuine worker
    // under its own record.
    assert_eq!(routable().await, ["gpu-genuine"]);
    let mut inference = inference.clone();
    for (i, class) in [
        v1::RequestClass::LatencyCritical,
        v1::RequestClass::CostSensitive,
    ]
    .into_iter()
    .cycle()
    .take(6)
    .enumerate()
    {
        let prompt = format!("identity {i}");
        let mut stream = inference
            .generate(synthetic_request(
                &format!("identity-{i}"),
                class,
                &prompt,
                2,
            ))
            .await?
            .into_inner();
        let mut served_by = None;
        let mut text = String::new();
        while let Some(frame) = stream.message().await? {
            match frame.frame {
                Some(v1::server_frame::Frame::Accepted(accepted)) => {
                    served_by = Some(accepted.worker_id)
                }
                Some(v1::server_frame::Frame::Tokens(tokens)) => text.push_str(&tokens.text),
                _ => {}
            }
        }
        assert_eq!(served_by.as_deref(), Some("gpu-genuine"), "request {i}");
        assert_eq!(text, synthetic_text(&prompt, 0, 2));
    }
    assert_eq!(routable().await, ["gpu-genuine"]);

    // The pool is part of the identity: a record moving gpu-genuine's id to the wafer-scale
    // pool at the same address is not taken over by the link already up; the link is dialled
    // again, refused, and gpu-genuine is routable under no pool rather than the wrong one.
    let mut moved = serde_json::from_slice::<WorkerRecord>(
        etcd_client
            .get(
                switchyard_cluster::schema::worker_key(Pool::Gpu, "gpu-genuine"),
                None,
            )
            .await?
            .kvs()
            .first()
            .context("gpu-genuine's record")?
            .value(),
    )?;
    moved.pool = Pool::Wse;
    etcd_client
        .put(moved.key(), serde_json::to_vec(&moved)?, None)
        .await?;
    wait_until(
        Duration::from_secs(30),
        "the router to refuse gpu-genuine's identity under the wafer-scale pool",
        || async {
            let metrics = router_metrics(&router, &ca).await.unwrap_or_default();
            identity_rejections(&metrics, "gpu-genuine", "wse") >= 1.0
        },
    )
    .await?;
    assert_eq!(routable().await, Vec::<String>::new());
    Ok(())
}

/// `router-wse` with TLS: its hosted worker serves `Worker` calls over TLS with the process's
/// certificate (which names the worker) and, with --worker-tls-client-ca-file, only to client
/// certificates of the cluster CA — another router links to it over mTLS and generates on it;
/// a TLS client without a certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_wse_hosted_worker_takes_worker_calls_only_from_client_certificates()
-> anyhow::Result<()> {
    let upstream = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let pki = switchyard::tls::LocalPki::generate(&["router"])?;
    let hosting_files = pki.worker(Pool::Wse, "wse-mtls")?;
    let ca = pki.ca_file();
    let ca_arg = ca.display().to_string();
    let path = |p: &Option<PathBuf>| p.as_ref().expect("generated").display().to_string();
    let tls_flags = |files: &switchyard_cluster::tls::TlsFiles| {
        vec![
            "--tls-cert-file".to_string(),
            path(&files.cert_file),
            "--tls-key-file".into(),
            path(&files.key_file),
            "--tls-ca-file".into(),
            ca_arg.clone(),
        ]
    };
    let etcd = Etcd::start().await?;
    let mut args: Vec<String> = [
        "router-wse",
        "--etcd",
        &etcd.url,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--worker-id",
        "wse-mtls",
        "--worker-listen",
        "127.0.0.1:0",
        "--engine",
        "gateway",
        "--gateway-url",
        &upstream.router_openai_url(),
        "--model",
        "fast",
        "--gateway-model-map",
        "fast=synthetic",
        "--worker-tls-client-ca-file",
        &ca_arg,
    ]
    .map(String::from)
    .to_vec();
    args.extend(tls_flags(&hosting_files));
    let hosting = Component::start("router-wse-mtls", &args, 3).await?;
    let worker = hosting.component_addr("worker-wse", "grpc").to_string();

    // Without a client certificate: Worker.Serve is refused, as on a worker of its own.
    assert_worker_calls_need_a_client_certificate(&worker, &ca).await?;

    // Another router, presenting its certificate, links to it (checking that the worker's
    // certificate names it) and generates on it.
    let router_tls = tls_flags(&pki.files("router"));
    let router_tls: Vec<&str> = router_tls.iter().map(String::as_str).collect();
    let other = start_router(&etcd.url, "router-mtls", &router_tls).await?;
    let channel = tls_channel(&other.addr("grpc").to_string(), &ca).await?;
    let mut inference = v1::inference_client::InferenceClient::new(channel);
    wait_until_routable(
        &inference,
        "the other router to link the hosted worker over mTLS",
        |ids| ids == ["wse-mtls"],
    )
    .await?;
    let mut request = synthetic_request(
        "via-mtls",
        v1::RequestClass::LatencyCritical,
        "alpha beta gamma",
        6,
    );
    request.model = "fast".into();
    let mut stream = inference.generate(request).await?.into_inner();
    let (mut text, mut worker_id) = (String::new(), String::new());
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(v1::server_frame::Frame::Accepted(accepted)) => worker_id = accepted.worker_id,
            Some(v1::server_frame::Frame::Tokens(tokens)) => text.push_str(&tokens.text),
            Some(v1::server_frame::Frame::Failed(failed)) => anyhow::bail!("failed: {failed:?}"),
            _ => {}
        }
    }
    assert_eq!(worker_id, "wse-mtls");
    assert_eq!(text, "alpha beta gamma alpha beta gamma");
    Ok(())
}

/// With TLS, router replicas read each other's stored responses at their advertised pod-like
/// addresses (here 127.0.0.1, which the router certificate does not name as a replica): the
/// reader checks the keeper's certificate carries the router identity instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_replicas_read_each_others_stored_responses_over_tls() -> anyhow::Result<()> {
    let pki = switchyard::tls::LocalPki::generate(&["router"])?;
    let ca = pki.ca_file();
    let ca_arg = ca.display().to_string();
    let path = |p: &Option<PathBuf>| p.as_ref().expect("generated").display().to_string();
    let etcd = Etcd::start().await?;
    let _worker = Component::start(
        "stored-worker",
        &tls_worker_args(&pki, &etcd.url, "gpu-0")?,
        1,
    )
    .await?;
    let router_files = pki.files("router");
    let token = tempfile::NamedTempFile::new()?;
    std::fs::write(token.path(), "tls-mirror-token-0123456789abcdef\n")?;
    let tls_flags = [
        "--tls-cert-file".to_string(),
        path(&router_files.cert_file),
        "--tls-key-file".to_string(),
        path(&router_files.key_file),
        "--tls-ca-file".to_string(),
        ca_arg.clone(),
        "--cluster-token-file".to_string(),
        token.path().display().to_string(),
    ];
    let flags: Vec<&str> = tls_flags.iter().map(String::as_str).collect();
    let mut keeper = start_router(&etcd.url, "stored-keeper", &flags).await?;
    let reader = start_router(&etcd.url, "stored-reader", &flags).await?;
    for router in [&keeper, &reader] {
        let channel = tls_channel(&router.addr("grpc").to_string(), &ca).await?;
        let inference = v1::inference_client::InferenceClient::new(channel);
        wait_until(
            Duration::from_secs(30),
            "the router to link the worker",
            || {
                let mut inference = inference.clone();
                async move {
                    inference
                        .list_models(v1::ListModelsRequest {})
                        .await
                        .is_ok_and(|m| !m.into_inner().models.is_empty())
                }
            },
        )
        .await?;
    }
    let created = program_output(
        "curl",
        &[
            "-sS",
            "--cacert",
            &ca_arg,
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"model": "synthetic", "input": "Hi", "max_output_tokens": 4}"#,
            &format!("https://{}/v1/responses", keeper.addr("http")),
        ],
    )
    .await?;
    let created: Value = serde_json::from_str(&created).context("a response object")?;
    let id = created["id"].as_str().context("an id")?;
    let read = program_output(
        "curl",
        &[
            "-sS",
            "--cacert",
            &ca_arg,
            &format!("https://{}/v1/responses/{id}", reader.addr("http")),
        ],
    )
    .await?;
    let read: Value = serde_json::from_str(&read).context("a response object")?;
    assert_eq!(read["id"], id, "{read}");
    assert_eq!(read["output"], created["output"]);

    // The reader is the keeper's standby, over TLS too: killed, the keeper's responses are
    // the reader's to answer for.
    wait_until(
        Duration::from_secs(20),
        "the reader to hold a standby copy",
        || async {
            router_metrics(&reader, &ca)
                .await
                .is_ok_and(|m| m.contains("switchyard_router_standby_responses 1\n"))
        },
    )
    .await?;
    keeper.kill().await?;
    let read_url = format!("https://{}/v1/responses/{id}", reader.addr("http"));
    wait_until(
        Duration::from_secs(40),
        "the reader to answer for the killed keeper's response",
        || async {
            program_output("curl", &["-sS", "--cacert", &ca_arg, &read_url])
                .await
                .ok()
                .and_then(|body| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|read| read["output"] == created["output"])
        },
    )
    .await?;
    Ok(())
}
