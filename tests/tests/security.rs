//! Security findings against real processes (etcd, a worker, the control plane) and real
//! clients: a headless Chromium on another origin, reqwest, the gRPC `Admin` client.
//!
//! - Cross-site requests: a page on another origin cannot drain a worker through the
//!   dashboard's JSON API (no-cors `fetch`, plain form POST), writes need the dashboard's JSON
//!   content type and its custom header, and a foreign `Host` (DNS rebinding) is refused.
//! - An authenticated control plane: Admin writes need an operator token (gRPC, HTTP, the
//!   dashboard's sign-in), `switchyard up` generates one.
//! - Workers serve only cluster members: `Worker` calls without the cluster token are refused.
//! - A malformed frame in a `Session` ends it with `INVALID_ARGUMENT`, not OK.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_proto::v1::{self, admin_client::AdminClient};
use switchyard_tests::browser::Browser;
use switchyard_tests::{Component, Etcd, start_control_plane, up_args, wait_until, with_bearer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::transport::Channel;

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

/// The header the dashboard's own page sends with every write (see the README).
const CSRF_HEADER: &str = "x-switchyard-csrf";

async fn admin(addr: SocketAddr) -> anyhow::Result<AdminClient<Channel>> {
    let channel = switchyard_client::connect_channel(&addr.to_string()).await?;
    Ok(AdminClient::new(channel))
}

/// Drain requests stored in etcd, as the control plane reports them.
async fn drains(admin: &AdminClient<Channel>) -> anyhow::Result<Vec<String>> {
    Ok(admin
        .clone()
        .get_cluster_stats(v1::GetClusterStatsRequest {})
        .await?
        .into_inner()
        .drains)
}

/// etcd, one synthetic worker `gpu-0` and a control plane that leads and lists it.
struct Plane {
    _etcd: Etcd,
    _worker: Component,
    control_plane: Component,
    admin: AdminClient<Channel>,
}

impl Plane {
    async fn start(control_plane_flags: &[&str]) -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let worker = Component::start(
            "gpu-0",
            &[
                "worker-gpu",
                "--etcd",
                &etcd.url,
                "--listen",
                "127.0.0.1:0",
                "--id",
                "gpu-0",
            ]
            .map(String::from),
            1,
        )
        .await?;
        let control_plane =
            start_control_plane(&etcd.url, "control-plane-0", control_plane_flags).await?;
        control_plane
            .wait_for_log("became the control-plane leader", PATIENCE)
            .await?;
        let admin = admin(control_plane.addr("grpc")).await?;
        wait_until(PATIENCE, "the control plane to list gpu-0", || async {
            admin
                .clone()
                .list_workers(v1::ListWorkersRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().workers.iter().any(|w| w.id == "gpu-0"))
        })
        .await?;
        Ok(Self {
            _etcd: etcd,
            _worker: worker,
            control_plane,
            admin,
        })
    }

    fn http(&self) -> SocketAddr {
        self.control_plane.addr("http")
    }
}

/// A real HTTP server on another origin (another loopback port) serving one blank page, the
/// attacker's: scripts run from there are cross-origin to the dashboard.
async fn serve_foreign_page() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = socket.read(&mut buffer).await;
                let body = "<!doctype html><title>elsewhere</title><p>an unrelated site</p>";
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_cannot_drain_a_worker_through_the_browser() -> anyhow::Result<()>
{
    let plane = Plane::start(&[]).await?;
    let drain_url = format!("http://{}/api/workers/gpu-0/drain", plane.http());
    let foreign = serve_foreign_page().await?;
    let browser = Browser::start().await?;
    browser.goto(&format!("http://{foreign}/")).await?;

    // A no-cors fetch: the page cannot read the answer, but the request is sent.
    let sent = browser
        .execute(
            "return fetch(arguments[0], {method: 'POST', mode: 'no-cors', body: 'drain'})
               .then(() => 'sent', (e) => 'failed: ' + e);",
            vec![json!(drain_url)],
        )
        .await?;
    assert_eq!(sent, json!("sent"), "the browser did not send the fetch");
    assert_eq!(
        drains(&plane.admin).await?,
        Vec::<String>::new(),
        "a cross-origin no-cors fetch drained gpu-0"
    );

    // A plain form POST (navigates the tab to the dashboard's answer).
    browser
        .execute(
            "const f = document.createElement('form');
             f.method = 'POST'; f.action = arguments[0]; f.enctype = 'text/plain';
             const i = document.createElement('input'); i.name = 'a'; i.value = 'b';
             f.appendChild(i); document.body.appendChild(f); f.submit(); return true;",
            vec![json!(drain_url)],
        )
        .await?;
    wait_until(PATIENCE, "the form POST to be answered", || async {
        browser
            .execute("return location.href;", vec![])
            .await
            .is_ok_and(|u| u == json!(drain_url))
    })
    .await?;
    let answer = browser.text("body").await?;
    assert_eq!(
        drains(&plane.admin).await?,
        Vec::<String>::new(),
        "a cross-origin form POST drained gpu-0 (the page shows {answer:?})"
    );
    assert!(answer.contains("origin"), "{answer}");
    browser.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_writes_need_its_origin_content_type_and_header_and_hosts_are_checked()
-> anyhow::Result<()> {
    let plane = Plane::start(&["--dashboard-allowed-hosts", "ops.example.test"]).await?;
    let http = plane.http();
    let client = reqwest::Client::new();
    let drain_url = format!("http://{http}/api/workers/gpu-0/drain");
    let post = || client.post(&drain_url);
    let refused = |response: reqwest::Response, needle: &'static str| async move {
        assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
        let body: Value = response.json().await.expect("JSON error body");
        let message = body["error"].as_str().unwrap_or_default().to_string();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    };

    // Another site's origin, even with everything else right.
    let response = post()
        .header("origin", "http://evil.example")
        .header("content-type", "application/json")
        .header(CSRF_HEADER, "1")
        .send()
        .await?;
    refused(response, "origin").await;
    // What a no-cors fetch or a form sends: a simple content type, no custom header.
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let response = post()
            .header("content-type", content_type)
            .header(CSRF_HEADER, "1")
            .body("a=b")
            .send()
            .await?;
        refused(response, "content-type").await;
    }
    let response = post().header(CSRF_HEADER, "1").send().await?;
    refused(response, "content-type").await;
    let response = post()
        .header("content-type", "application/json")
        .send()
        .await?;
    refused(response, CSRF_HEADER).await;
    // A browser that sends no Origin but says the request is cross-site.
    let response = post()
        .header("content-type", "application/json")
        .header(CSRF_HEADER, "1")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await?;
    refused(response, "cross-site").await;
    let response = post()
        .header("content-type", "application/json")
        .header(CSRF_HEADER, "1")
        .header("referer", "http://evil.example/page")
        .send()
        .await?;
    refused(response, "referer").await;
    // DNS rebinding: a name that resolves to this host but is not one of the dashboard's.
    for url in [format!("http://{http}/api/workers"), drain_url.clone()] {
        let response = client
            .request(
                if url.ends_with("drain") {
                    reqwest::Method::POST
                } else {
                    reqwest::Method::GET
                },
                &url,
            )
            .header("host", format!("attacker.example:{}", http.port()))
            .header("content-type", "application/json")
            .header(CSRF_HEADER, "1")
            .send()
            .await?;
        refused(response, "--dashboard-allowed-hosts").await;
    }
    assert_eq!(drains(&plane.admin).await?, Vec::<String>::new());

    // The dashboard's own requests, and scripts (no Origin), still work; so do configured
    // names and localhost.
    let ok = post()
        .header("origin", format!("http://{http}"))
        .header("content-type", "application/json")
        .header(CSRF_HEADER, "1")
        .send()
        .await?;
    assert_eq!(ok.status(), reqwest::StatusCode::OK, "{}", ok.text().await?);
    assert_eq!(drains(&plane.admin).await?, vec!["gpu-0".to_string()]);
    let ok = client
        .post(format!("http://{http}/api/workers/gpu-0/undrain"))
        .header("content-type", "application/json; charset=utf-8")
        .header(CSRF_HEADER, "1")
        .header("sec-fetch-site", "same-origin")
        .send()
        .await?;
    assert_eq!(ok.status(), reqwest::StatusCode::OK, "{}", ok.text().await?);
    assert_eq!(drains(&plane.admin).await?, Vec::<String>::new());
    for host in [
        format!("localhost:{}", http.port()),
        format!("ops.example.test:{}", http.port()),
        "OPS.example.test".to_string(),
    ] {
        let response = client
            .get(format!("http://{http}/api/workers"))
            .header("host", &host)
            .send()
            .await?;
        assert_eq!(response.status(), reqwest::StatusCode::OK, "host {host}");
    }
    Ok(())
}

use switchyard_tests::{OPERATOR_TOKEN, VIEWER_TOKEN, admin_tokens_file};

fn drain(id: &str) -> v1::DrainRequest {
    v1::DrainRequest {
        worker_id: id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_need_an_operator_token_over_grpc_and_http() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = admin_tokens_file(&dir)?;
    let plane = Plane::start(&["--admin-tokens-file", &tokens]).await?;
    let mut admin = plane.admin.clone();

    // gRPC: no token, an unknown one, a viewer's: refused with the right status.
    let err = admin
        .drain(with_bearer(drain("gpu-0"), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("Bearer"), "{}", err.message());
    let err = admin
        .drain(with_bearer(drain("gpu-0"), Some("not-a-token-0123456789")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = admin
        .drain(with_bearer(drain("gpu-0"), Some(VIEWER_TOKEN)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("viewer"), "{}", err.message());
    let err = admin
        .set_policy(with_bearer(
            v1::SetPolicyRequest {
                merge: false,
                document: "{}".into(),
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = admin
        .undrain(with_bearer(
            v1::UndrainRequest {
                worker_id: "gpu-0".into(),
            },
            Some(VIEWER_TOKEN),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert_eq!(drains(&admin).await?, Vec::<String>::new());
    // Reads stay open.
    admin.get_policy(v1::GetPolicyRequest {}).await?;
    admin
        .list_workers(v1::ListWorkersRequest::default())
        .await?;

    // An operator drains, and the change is logged with who made it (never the token) and
    // streamed as an audit event to WatchEvents subscribers.
    let mut events = admin
        .watch_events(v1::WatchEventsRequest::default())
        .await?
        .into_inner();
    admin
        .drain(with_bearer(drain("gpu-0"), Some(OPERATOR_TOKEN)))
        .await?;
    let audited = tokio::time::timeout(PATIENCE, async {
        while let Some(event) = events.message().await? {
            if event.kind() == v1::cluster_event::Kind::AdminWrite {
                return anyhow::Ok(event);
            }
        }
        anyhow::bail!("the event stream ended")
    })
    .await??;
    assert_eq!(
        (
            audited.actor.as_str(),
            audited.role.as_str(),
            audited.action.as_str(),
            audited.via.as_str(),
            audited.worker_id.as_str()
        ),
        ("alice", "operator", "drain", "grpc", "gpu-0"),
        "{audited:?}"
    );
    assert!(audited.at_unix_ms > 0, "{audited:?}");
    assert_eq!(drains(&admin).await?, vec!["gpu-0".to_string()]);
    let line = plane
        .control_plane
        .wait_for_log("admin write", PATIENCE)
        .await?;
    assert!(
        line.contains("alice") && line.contains("drain") && line.contains("gpu-0"),
        "{line}"
    );
    admin
        .undrain(with_bearer(
            v1::UndrainRequest {
                worker_id: "gpu-0".into(),
            },
            Some(OPERATOR_TOKEN),
        ))
        .await?;

    // HTTP: the same rule on the dashboard's API.
    let client = reqwest::Client::new();
    let drain_url = format!("http://{}/api/workers/gpu-0/drain", plane.http());
    let post = |token: Option<&str>| {
        let request = client
            .post(&drain_url)
            .header("content-type", "application/json")
            .header(CSRF_HEADER, "1");
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    };
    let response = post(None).send().await?;
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    let body: Value = response.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("sign in"),
        "{body}"
    );
    let response = post(Some(VIEWER_TOKEN)).send().await?;
    assert_eq!(response.status(), reqwest::StatusCode::FORBIDDEN);
    assert_eq!(drains(&admin).await?, Vec::<String>::new());
    let response = post(Some(OPERATOR_TOKEN)).send().await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    assert_eq!(drains(&admin).await?, vec!["gpu-0".to_string()]);
    let response = client
        .get(format!("http://{}/api/workers", plane.http()))
        .send()
        .await?;
    assert_eq!(
        response.status(),
        reqwest::StatusCode::OK,
        "reads stay open"
    );
    // The dashboard lists both writes as audit events, with who made them.
    let events: Value = client
        .get(format!("http://{}/api/events", plane.http()))
        .send()
        .await?
        .json()
        .await?;
    let audits: Vec<(&str, &str)> = events["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == "admin_write")
        .map(|e| {
            (
                e["via"].as_str().unwrap_or(""),
                e["action"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        audits,
        [
            ("grpc", "drain"),
            ("grpc", "undrain"),
            ("dashboard", "drain")
        ],
        "{events}"
    );

    let log = std::fs::read_to_string(&plane.control_plane.log)?;
    assert!(
        !log.contains(OPERATOR_TOKEN) && !log.contains(VIEWER_TOKEN),
        "a token reached the log"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_with_a_token_and_then_drains() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tokens = admin_tokens_file(&dir)?;
    let plane = Plane::start(&["--admin-tokens-file", &tokens]).await?;
    let browser = Browser::start().await?;
    browser.goto(&format!("http://{}/", plane.http())).await?;
    wait_until(
        PATIENCE,
        "the page to list gpu-0 and ask to sign in",
        || async {
            browser
                .execute(
                    "return !document.getElementById('login').hidden
                   && !!document.querySelector(\"tr[data-worker-id='gpu-0'] button.drain\");",
                    vec![],
                )
                .await
                .is_ok_and(|v| v == json!(true))
        },
    )
    .await?;

    // Not signed in: the (confirmed) click is refused and the page says why.
    browser.drain_on_dashboard("gpu-0").await?;
    wait_until(PATIENCE, "the page to show the refusal", || async {
        browser
            .text("#error")
            .await
            .is_ok_and(|t| t.contains("HTTP 401") && t.contains("sign in"))
    })
    .await?;
    assert_eq!(drains(&plane.admin).await?, Vec::<String>::new());

    // A wrong token is refused; the operator's is accepted and kept in an HttpOnly cookie.
    browser
        .type_text("#token", "wrong-token-0123456789")
        .await?;
    browser.click("#login button").await?;
    browser
        .wait_for_text(
            PATIENCE,
            "the page to refuse the wrong token",
            "#error",
            "not recognised",
        )
        .await?;
    browser
        .execute("document.getElementById('token').value = '';", vec![])
        .await?;
    browser.type_text("#token", OPERATOR_TOKEN).await?;
    browser.click("#login button").await?;
    wait_until(PATIENCE, "the page to show who is signed in", || async {
        browser
            .text("#who")
            .await
            .is_ok_and(|t| t.contains("alice") && t.contains("operator"))
    })
    .await?;
    let cookies = browser.execute("return document.cookie;", vec![]).await?;
    assert!(
        !cookies
            .as_str()
            .unwrap_or_default()
            .contains(OPERATOR_TOKEN),
        "the token is readable by scripts: {cookies}"
    );
    browser.drain_on_dashboard("gpu-0").await?;
    wait_until(PATIENCE, "gpu-0 to be drained", || async {
        drains(&plane.admin)
            .await
            .is_ok_and(|d| d == vec!["gpu-0".to_string()])
    })
    .await?;
    browser.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchyard_up_generates_an_operator_token_and_requires_it() -> anyhow::Result<()> {
    let up = Component::start("up", &up_args(&["--engine", "synthetic"]), 7).await?;
    let note = up
        .notes
        .iter()
        .find_map(|l| l.strip_prefix("control-plane admin token "))
        .unwrap_or_else(|| panic!("no admin token line in {:?}", up.notes));
    let path = std::path::Path::new(note);
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path)?.permissions());
    assert_eq!(mode & 0o077, 0, "the token file is readable by others");
    let token = std::fs::read_to_string(path)?.trim().to_string();
    let mut admin = admin(up.addr_of("control-plane", "grpc")).await?;
    let workers = admin
        .list_workers(v1::ListWorkersRequest::default())
        .await?
        .into_inner()
        .workers;
    let id = workers.first().expect("a worker").id.clone();
    let err = admin
        .drain(with_bearer(drain(&id), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    admin.drain(with_bearer(drain(&id), Some(&token))).await?;
    assert_eq!(drains(&admin).await?, vec![id]);
    Ok(())
}

const CLUSTER_TOKEN: &str = "cluster-token-0123456789abcdef";

/// One `Worker.Serve` call straight to a worker, with `token` if given, asking for a short
/// synthetic generation; returns the first frame's text or the call's status.
async fn serve_directly(
    worker: SocketAddr,
    token: Option<&str>,
) -> Result<Vec<v1::WorkerFrame>, tonic::Status> {
    let channel = switchyard_client::connect_channel(&worker.to_string())
        .await
        .expect("worker reachable");
    let start = v1::RouterFrame {
        frame: Some(v1::router_frame::Frame::Start(v1::WorkerStart {
            request_id: "outsider".into(),
            model: "synthetic".into(),
            prompt: "generate for me".into(),
            sampling: Some(v1::SamplingParams {
                max_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        })),
    };
    // The stream stays open (a router's does): the worker answers as it generates.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(start).await.expect("queued");
    let request = with_bearer(tokio_stream::wrappers::ReceiverStream::new(rx), token);
    let mut inbound = v1::worker_client::WorkerClient::new(channel)
        .serve(request)
        .await?
        .into_inner();
    let mut frames = Vec::new();
    while let Some(frame) = inbound.message().await? {
        let finished = matches!(
            &frame.frame,
            Some(v1::worker_frame::Frame::Finished(f)) if f.request_id == "outsider"
        );
        frames.push(frame);
        if finished {
            break;
        }
    }
    drop(tx);
    Ok(frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_only_cluster_members() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, format!("{CLUSTER_TOKEN}\n"))?;
    let token_file = token_file.display().to_string();
    let etcd = Etcd::start().await?;
    let worker = Component::start(
        "gpu-0",
        &[
            "worker-gpu",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--id",
            "gpu-0",
            "--cluster-token-file",
            &token_file,
        ]
        .map(String::from),
        1,
    )
    .await?;
    let worker_addr = worker.addr("grpc");

    // Outsiders: no token, a wrong one. Refused before anything is generated.
    let err = serve_directly(worker_addr, None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("cluster token"), "{}", err.message());
    let err = serve_directly(worker_addr, Some("wrong-token-0123456789"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let channel = switchyard_client::connect_channel(&worker_addr.to_string()).await?;
    let err = v1::worker_client::WorkerClient::new(channel.clone())
        .get_tokenizer(v1::TokenizerRequest {
            model: "synthetic".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    // Health stays open for probes.
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    // A member generates.
    let frames = serve_directly(worker_addr, Some(CLUSTER_TOKEN)).await?;
    assert!(
        frames
            .iter()
            .any(|f| matches!(f.frame, Some(v1::worker_frame::Frame::Finished(_)))),
        "{frames:?}"
    );

    // A router and a control plane with the token reach the worker.
    let router = Component::start(
        "router",
        &[
            "router",
            "--etcd",
            &etcd.url,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--cluster-token-file",
            &token_file,
        ]
        .map(String::from),
        2,
    )
    .await?;
    let control_plane = start_control_plane(
        &etcd.url,
        "control-plane-0",
        &["--cluster-token-file", &token_file],
    )
    .await?;
    let router_addr = router.addr("grpc").to_string();
    wait_until(
        PATIENCE,
        "the router's link to gpu-0 to come up",
        || async {
            switchyard_tests::list_router_workers(&router_addr)
                .await
                .is_ok_and(|ids| ids == ["gpu-0"])
        },
    )
    .await?;
    let session = switchyard_client::SessionClient::connect(&router_addr).await?;
    let done = session
        .start(switchyard_tests::synthetic_request(
            "member",
            v1::RequestClass::CostSensitive,
            "through the router",
            3,
        ))?
        .collect()
        .await;
    assert!(done.finished.is_some(), "{:?}", done.failed);
    assert_eq!(done.accepted.map(|a| a.worker_id).as_deref(), Some("gpu-0"));
    let client = reqwest::Client::new();
    let url = format!("http://{}/api/workers", control_plane.addr("http"));
    wait_until(
        PATIENCE,
        "the control plane to see gpu-0's live load",
        || async {
            match client.get(&url).send().await {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v["workers"][0]["load"].is_object()),
                Err(_) => false,
            }
        },
    )
    .await?;
    Ok(())
}

/// A router on a real etcd with no workers (its input checks need none), and a channel to it.
async fn router_without_workers() -> anyhow::Result<(Etcd, Component, tonic::transport::Channel)> {
    let etcd = Etcd::start().await?;
    let router = switchyard_tests::start_router(&etcd.url, "router", &[]).await?;
    let channel = switchyard_client::connect_channel(&router.addr("grpc").to_string()).await?;
    Ok((etcd, router, channel))
}

/// A client whose encoder is broken: it sends its items' bytes as they are, and discards what
/// the server answers (only the call's final status matters here).
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        let len = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, len);
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Self;
    type Decoder = Self;
    fn encoder(&mut self) -> Self {
        *self
    }
    fn decoder(&mut self) -> Self {
        *self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_ends_a_session_with_invalid_argument() -> anyhow::Result<()> {
    let (_etcd, _router, channel) = router_without_workers().await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    // Field 1 (`start`), length-delimited, with a length varint that never ends.
    let garbage = vec![
        0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(garbage).await?;
    let mut replies = grpc
        .streaming(
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/switchyard.v1.Inference/Session",
            ),
            RawBytes,
        )
        .await?
        .into_inner();
    // The client keeps its side open: the server must end the call by itself.
    let end = tokio::time::timeout(PATIENCE, async {
        loop {
            match replies.message().await {
                Ok(Some(())) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await?;
    drop(tx);
    let status = end.expect("the session ended with OK after a malformed frame");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
    assert!(
        status.message().contains("ClientFrame"),
        "{}",
        status.message()
    );
    Ok(())
}

/// Bytes that do not decode as a `GenerateRequest`, or one over the message size limit, are
/// the client's fault: `Generate` answers `INVALID_ARGUMENT` / `RESOURCE_EXHAUSTED` (tonic's
/// own answer was `INTERNAL` / `OUT_OF_RANGE`), as a `Session` does for the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_generate_request_is_the_clients_fault() -> anyhow::Result<()> {
    let (_etcd, _router, channel) = router_without_workers().await?;
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/switchyard.v1.Inference/Generate");
    let mut grpc = tonic::client::Grpc::new(channel);
    // Field 1 (`request_id`), length-delimited, with a length varint that never ends.
    let garbage = vec![
        0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ];
    let oversized = [vec![0x22, 0x80, 0x80, 0x80, 0x03], vec![b'x'; 6 << 20]].concat();
    for (bytes, code) in [
        (garbage, tonic::Code::InvalidArgument),
        (oversized, tonic::Code::ResourceExhausted),
    ] {
        grpc.ready().await?;
        let status = grpc
            .server_streaming(tonic::Request::new(bytes), path.clone(), RawBytes)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), code, "{status:?}");
    }
    Ok(())
}
