//! Observability end to end: Prometheus `/metrics` of the router, the workers and the control plane
//! scraped with a real HTTP client after real requests; and OpenTelemetry spans exported by the
//! router and a worker to a real OTLP/gRPC collector running in this test, continuing the
//! client's W3C `traceparent` across the router–worker stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use switchyard_proto::v1::{self, RequestClass, inference_client::InferenceClient, server_frame};
use switchyard_tests::{
    Cluster, ClusterSpec, alert_rules, synthetic_request, wait_until, with_bearer, write_api_keys,
};
use tokio_stream::wrappers::TcpListenerStream;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Sum of the samples of metric `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((metric, rest)) => (metric, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then_some((label_text, value))
        })
        .filter(|(label_text, _)| {
            labels
                .iter()
                .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().expect("sample value"))
        .sum()
}

async fn scrape(url: &str) -> anyhow::Result<String> {
    let response = reqwest::get(url).await?;
    anyhow::ensure!(response.status() == 200, "{url}: {}", response.status());
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(
        content_type.starts_with("application/openmetrics-text"),
        "{url}: content-type {content_type:?}"
    );
    Ok(response.text().await?)
}

/// Runs one `Generate` call to its end: the `Accepted` frame and the completion token count.
async fn generate(
    router: &str,
    request: v1::GenerateRequest,
    traceparent: Option<&str>,
) -> anyhow::Result<(v1::Accepted, u32)> {
    let channel = switchyard_client::connect_channel(router).await?;
    let mut client = InferenceClient::new(channel);
    let mut call = tonic::Request::new(request);
    if let Some(traceparent) = traceparent {
        call.metadata_mut()
            .insert("traceparent", traceparent.parse()?);
    }
    let frames = client.generate(call).await?.into_inner();
    let (accepted, usage) = read_to_finished(frames).await?;
    Ok((accepted, usage.completion_tokens))
}

/// Reads a `Generate` call's frames to its `Finished`: its `Accepted` frame and usage.
async fn read_to_finished(
    mut frames: tonic::Streaming<v1::ServerFrame>,
) -> anyhow::Result<(v1::Accepted, v1::Usage)> {
    let mut accepted = None;
    while let Some(frame) = frames.message().await? {
        match frame.frame {
            Some(server_frame::Frame::Accepted(a)) => accepted = Some(a),
            Some(server_frame::Frame::Finished(f)) => {
                let accepted = accepted.context("Finished before Accepted")?;
                return Ok((accepted, f.usage.unwrap_or_default()));
            }
            Some(server_frame::Frame::Failed(f)) => anyhow::bail!("request failed: {f:?}"),
            _ => {}
        }
    }
    anyhow::bail!("stream ended without Finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_router_workers_and_control_plane_move_with_traffic() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        metrics: true,
        ..Default::default()
    })
    .await?;
    let router = cluster.router_addr();
    let router_metrics = cluster.router.metrics_url();

    // Before any traffic: no request counted (prometheus-client writes a labelled family only
    // once it has a series).
    let before = scrape(&router_metrics).await?;
    assert!(
        before.contains("# TYPE switchyard_router_active_sessions gauge"),
        "{before}"
    );
    assert_eq!(
        sample(&before, "switchyard_router_requests_total", &[]),
        0.0
    );

    let cheap = synthetic_request("m-cheap", RequestClass::CostSensitive, "hello there", 12);
    let (cheap_accepted, cheap_tokens) = generate(&router, cheap, None).await?;
    let fast = synthetic_request("m-fast", RequestClass::LatencyCritical, "quick one", 8);
    let (fast_accepted, fast_tokens) = generate(&router, fast, None).await?;
    assert!(cheap_tokens > 1 && fast_tokens > 1);
    let mut unknown = synthetic_request("m-unknown", RequestClass::CostSensitive, "x", 4);
    unknown.model = "no-such-model".into();
    assert!(generate(&router, unknown, None).await.is_err());

    let text = scrape(&router_metrics).await?;
    for (accepted, lane, tokens) in [
        (&cheap_accepted, "cost_sensitive", cheap_tokens),
        (&fast_accepted, "latency_critical", fast_tokens),
    ] {
        let series = [
            ("lane", lane),
            ("pool", accepted.pool.as_str()),
            ("model", "synthetic"),
        ];
        let completed = [series.as_slice(), &[("outcome", "completed")]].concat();
        assert_eq!(
            sample(&text, "switchyard_router_requests_total", &completed),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "switchyard_router_route_decisions_total",
                &series[..2]
            ),
            1.0,
            "one placement for {lane}:\n{text}"
        );
        assert_eq!(
            sample(&text, "switchyard_router_ttft_seconds_count", &series),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, "switchyard_router_tokens_out_total", &series),
            f64::from(tokens),
            "{text}"
        );
        // The first token is a chunk of its own (TTFT); every later token has a gap.
        assert_eq!(
            sample(
                &text,
                "switchyard_router_inter_token_seconds_count",
                &series
            ),
            f64::from(tokens - 1),
            "{text}"
        );
    }
    // The placement reasons are the policy's own names.
    let placed: f64 = [
        "home",
        "home_affinity",
        "spill_to_gpu",
        "save_wse",
        "borrow_wse",
    ]
    .iter()
    .map(|r| {
        sample(
            &text,
            "switchyard_router_route_decisions_total",
            &[("reason", r)],
        )
    })
    .sum();
    assert_eq!(placed, 2.0, "{text}");
    assert_eq!(
        sample(
            &text,
            "switchyard_router_route_decisions_total",
            &[("reason", "unknown_model"), ("pool", "none")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "switchyard_router_requests_total",
            &[("outcome", "rejected"), ("pool", "none")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(sample(&text, "switchyard_router_shed_total", &[]), 0.0);

    // The router serves the same registry on its OpenAI HTTP port.
    let http = scrape(&format!("http://{}/metrics", cluster.router.addr("http"))).await?;
    assert!(http.contains("switchyard_router_requests_total"), "{http}");

    // Each worker counted the generation it ran, labelled with the lane the router chose.
    for (accepted, lane, tokens) in [
        (&cheap_accepted, "cost_sensitive", cheap_tokens),
        (&fast_accepted, "latency_critical", fast_tokens),
    ] {
        let worker = cluster
            .gpu
            .iter()
            .chain(&cluster.wse)
            .find(|w| w.name == accepted.worker_id)
            .expect("the accepting worker is in the cluster");
        let text = scrape(&worker.metrics_url()).await?;
        let series = [
            ("pool", accepted.pool.as_str()),
            ("lane", lane),
            ("model", "synthetic"),
        ];
        assert_eq!(
            sample(&text, "switchyard_worker_tokens_generated_total", &series),
            f64::from(tokens),
            "{text}"
        );
        assert_eq!(
            sample(&text, "switchyard_worker_ttft_seconds_count", &series),
            1.0,
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "switchyard_worker_inter_token_seconds_count",
                &series
            ),
            f64::from(tokens - 1),
            "{text}"
        );
        assert!(
            text.contains("switchyard_worker_queue_depth{pool="),
            "{text}"
        );
        assert!(
            text.contains("switchyard_worker_kv_used_bytes{pool="),
            "{text}"
        );
    }

    // Active sequences rise while a long generation runs and fall back after it.
    let gpu = &cluster.gpu[0];
    let long = synthetic_request("m-long", RequestClass::CostSensitive, "long", 150);
    let running = tokio::spawn({
        let router = router.clone();
        async move { generate(&router, long, None).await }
    });
    let active = |pool: &'static str, url: String, want: f64| async move {
        scrape(&url)
            .await
            .map(|t| sample(&t, "switchyard_worker_active_sequences", &[("pool", pool)]) == want)
            .unwrap_or(false)
    };
    wait_until(TIMEOUT, "gpu active_sequences 1", || {
        active("gpu", gpu.metrics_url(), 1.0)
    })
    .await?;
    running.await??;
    wait_until(TIMEOUT, "gpu active_sequences 0", || {
        active("gpu", gpu.metrics_url(), 0.0)
    })
    .await?;

    // An open session is counted until it closes.
    let session_gauge = |want: f64| {
        let url = router_metrics.clone();
        async move {
            scrape(&url)
                .await
                .map(|t| sample(&t, "switchyard_router_active_sessions", &[]) == want)
                .unwrap_or(false)
        }
    };
    let mut client = InferenceClient::new(switchyard_client::connect_channel(&router).await?);
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ClientFrame>(1);
    let session = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    wait_until(TIMEOUT, "active_sessions 1", || session_gauge(1.0)).await?;
    drop(tx);
    drop(session);
    wait_until(TIMEOUT, "active_sessions 0", || session_gauge(0.0)).await?;

    // The control plane sees both workers ready.
    let cp = scrape(&cluster.control_plane.metrics_url()).await?;
    for pool in ["gpu", "wse"] {
        let ready = [("pool", pool), ("state", "ready")];
        assert_eq!(
            sample(&cp, "switchyard_control_plane_workers", &ready),
            1.0,
            "{cp}"
        );
        let draining = [("pool", pool), ("state", "draining")];
        assert_eq!(
            sample(&cp, "switchyard_control_plane_workers", &draining),
            0.0,
            "{cp}"
        );
    }
    Ok(())
}

/// One exported span, reduced to what the test checks.
#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    /// Attributes with string, integer or boolean values, as text.
    attributes: HashMap<String, String>,
}

/// A real OTLP/gRPC trace collector keeping every span it receives.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ExportedSpan>>>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    let attributes = span
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            let value = match kv.value.as_ref()?.value.as_ref()? {
                                AnyValue::StringValue(s) => s.clone(),
                                AnyValue::IntValue(i) => i.to_string(),
                                AnyValue::BoolValue(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((kv.key.clone(), value))
                        })
                        .collect();
                    spans.push(ExportedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attributes,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    async fn start(self) -> anyhow::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Ok(addr)
    }

    fn find(&self, service: &str, name: &str, trace_id: &str) -> Option<ExportedSpan> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .find(|s| s.service == service && s.name == name && s.trace_id == trace_id)
            .cloned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_trace_context_reaches_the_worker_through_the_router() -> anyhow::Result<()> {
    let collector = Collector::default();
    let endpoint = collector.clone().start().await?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        env: vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{endpoint}"),
            ),
            // Export within 100 ms instead of the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await?;

    // The client's own span: trace id T, span id P.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let client_span = "b7ad6b7169203331";
    let traceparent = format!("00-{trace_id}-{client_span}-01");
    let request = synthetic_request("traced", RequestClass::CostSensitive, "trace me", 6);
    generate(&cluster.router_addr(), request, Some(&traceparent)).await?;

    let mut found = None;
    wait_until(TIMEOUT, "router and worker spans at the collector", || {
        let router = collector.find("switchyard-router", "router.request", trace_id);
        let worker = collector.find("switchyard-worker-gpu", "worker.generate", trace_id);
        found = router.zip(worker);
        let hit = found.is_some();
        async move { hit }
    })
    .await?;
    let (router, worker) = found.expect("found when wait_until succeeds");
    assert_eq!(
        router.parent_span_id, client_span,
        "router span is the client's child"
    );
    assert_eq!(
        worker.parent_span_id, router.span_id,
        "worker span is the router's child"
    );
    assert_ne!(worker.span_id, router.span_id);

    // A request without trace context starts a trace of its own at the router.
    let request = synthetic_request("untraced", RequestClass::CostSensitive, "no parent", 4);
    generate(&cluster.router_addr(), request, None).await?;
    let mut own: Option<(ExportedSpan, ExportedSpan)> = None;
    wait_until(TIMEOUT, "a root router span and its worker child", || {
        let spans = collector.spans.lock().expect("collector lock").clone();
        let by_id: HashMap<&str, &ExportedSpan> =
            spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
        own = spans
            .iter()
            .filter(|s| s.name == "worker.generate" && s.trace_id != trace_id)
            .find_map(|w| {
                let parent = by_id.get(w.parent_span_id.as_str())?;
                (parent.name == "router.request").then(|| ((*parent).clone(), w.clone()))
            });
        let hit = own.is_some();
        async move { hit }
    })
    .await?;
    let (root, _) = own.expect("found when wait_until succeeds");
    assert!(root.parent_span_id.is_empty(), "{root:?}");
    Ok(())
}

/// The control plane exports a span of its own for each admin call: a drain through the Admin
/// API is a `control_plane.drain` span saying who made it (name and role), through which door,
/// on which worker and how it ended, in the caller's trace; a viewer's refused drain and a
/// drain lifted from the dashboard are spans too. Admin actions were only logs and events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_are_exported_as_control_plane_spans() -> anyhow::Result<()> {
    use switchyard_tests::{OPERATOR_TOKEN, VIEWER_TOKEN, with_bearer};
    let collector = Collector::default();
    let endpoint = collector.clone().start().await?;
    let dir = tempfile::tempdir()?;
    let tokens = switchyard_tests::admin_tokens_file(&dir)?;
    let etcd = switchyard_tests::Etcd::start().await?;
    let _worker = switchyard_tests::start_gpu_worker(&etcd.url, "gpu-0", &[], 1).await?;
    let control_plane = switchyard_tests::start_control_plane_with_env(
        &etcd.url,
        "control-plane-0",
        &["--admin-tokens-file", &tokens],
        &[
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://{endpoint}"),
            ),
            // Export within 100 ms instead of the default 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
    )
    .await?;
    control_plane
        .wait_for_log("became the control-plane leader", TIMEOUT)
        .await?;
    let channel =
        switchyard_client::connect_channel(&control_plane.addr("grpc").to_string()).await?;
    let mut admin = v1::admin_client::AdminClient::new(channel);
    let drain = || v1::DrainRequest {
        worker_id: "gpu-0".into(),
    };

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut call = with_bearer(drain(), Some(OPERATOR_TOKEN));
    call.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse()?,
    );
    admin.drain(call).await?;
    let refused = admin
        .drain(with_bearer(drain(), Some(VIEWER_TOKEN)))
        .await
        .expect_err("a viewer may not drain");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/api/workers/gpu-0/undrain",
            control_plane.addr("http")
        ))
        .header("content-type", "application/json")
        .header("x-switchyard-csrf", "1")
        .bearer_auth(OPERATOR_TOKEN)
        .body("{}")
        .send()
        .await?;
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    let service = "switchyard-control-plane";
    let find = |name: &str, outcome: &str| {
        collector
            .spans
            .lock()
            .expect("collector lock")
            .iter()
            .find(|s| {
                s.service == service
                    && s.name == name
                    && s.attributes.get("outcome").map(String::as_str) == Some(outcome)
            })
            .cloned()
    };
    let mut found = None;
    wait_until(
        TIMEOUT,
        "the control plane's admin spans at the collector",
        || {
            found = find("control_plane.drain", "ok")
                .zip(find("control_plane.drain", "refused"))
                .zip(find("control_plane.undrain", "ok"));
            let hit = found.is_some();
            async move { hit }
        },
    )
    .await?;
    let ((drained, refused), undrained) = found.expect("found when wait_until succeeds");
    let attribute =
        |span: &ExportedSpan, key: &str| span.attributes.get(key).cloned().unwrap_or_default();
    for (span, who, role, via) in [
        (&drained, "alice", "operator", "grpc"),
        (&refused, "victor", "viewer", "grpc"),
        (&undrained, "alice", "operator", "dashboard"),
    ] {
        assert_eq!(
            (
                attribute(span, "who"),
                attribute(span, "role"),
                attribute(span, "via"),
                attribute(span, "target"),
            ),
            (who.into(), role.into(), via.into(), "gpu-0".into()),
            "{span:?}"
        );
        assert!(
            attribute(span, "peer").starts_with("127.0.0.1:"),
            "{span:?}"
        );
    }
    assert_eq!(attribute(&drained, "action"), "drain", "{drained:?}");
    assert_eq!(
        (drained.trace_id.as_str(), drained.parent_span_id.as_str()),
        (trace_id, client_span),
        "the drain continues the caller's trace"
    );
    assert!(
        attribute(&refused, "error").contains("victor is a viewer"),
        "{refused:?}"
    );
    for span in [&drained, &refused, &undrained] {
        for token in [OPERATOR_TOKEN, VIEWER_TOKEN] {
            assert!(
                !span.attributes.values().any(|v| v.contains(token)),
                "{span:?}"
            );
        }
    }
    Ok(())
}

/// `SWITCHYARD_LOG_FORMAT=json`: every component writes one JSON object a line; the router's
/// per-request `accepted` line carries its `router.request` span's fields, and the membership
/// watch logs a worker that joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_span_and_membership_changes() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        env: vec![("SWITCHYARD_LOG_FORMAT".into(), "json".into())],
        ..Default::default()
    })
    .await?;
    let request = synthetic_request("json-log-1", RequestClass::CostSensitive, "log me", 4);
    let (accepted, _) = generate(&cluster.router_addr(), request, None).await?;

    let line = cluster.router.wait_for_log("\"accepted\"", TIMEOUT).await?;
    let line: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["fields"]["message"], "accepted", "{line}");
    assert_eq!(line["target"], "switchyard_router::dispatch::run", "{line}");
    let span = &line["span"];
    assert_eq!(span["name"], "router.request", "{line}");
    assert_eq!(span["request_id"], "json-log-1", "{line}");
    assert_eq!(span["lane"], "cost-sensitive", "{line}");
    assert_eq!(span["pool"], accepted.pool.as_str(), "{line}");
    assert_eq!(span["worker"], accepted.worker_id.as_str(), "{line}");
    assert!(span["reason"].is_string(), "{line}");
    // The worker's lines name the client's request id too (its own is the router's).
    let ended = cluster.gpu[0]
        .wait_for_log("\"client_request_id\":\"json-log-1\"", TIMEOUT)
        .await?;
    let ended: serde_json::Value = serde_json::from_str(&ended)?;
    assert_eq!(ended["span"]["name"], "worker.generate", "{ended}");
    assert_eq!(ended["span"]["lane"], span["lane"], "one spelling: {ended}");

    let _late = switchyard_tests::start_gpu_worker(&cluster.etcd.url, "gpu-late", &[], 1).await?;
    // The router's membership watch logs the worker that joined, as JSON.
    let joined = cluster.router.wait_for_log("gpu-late", TIMEOUT).await?;
    let joined: serde_json::Value = serde_json::from_str(&joined)?;
    assert_eq!(
        joined["fields"]["message"], "worker joined the membership",
        "{joined}"
    );
    assert_eq!(joined["fields"]["worker_id"], "gpu-late", "{joined}");
    assert_eq!(joined["fields"]["pool"], "gpu", "{joined}");
    assert!(joined["fields"]["address"].is_string(), "{joined}");
    // So does the control plane's (the harness starts it with text logs).
    let joined = cluster
        .control_plane
        .wait_for_log("worker joined the membership worker_id=gpu-late", TIMEOUT)
        .await?;
    assert!(
        joined.contains("worker_id=gpu-late pool=gpu address=127.0.0.1:"),
        "{joined}"
    );

    for component in std::iter::once(&cluster.router).chain(&cluster.gpu) {
        let log = std::fs::read_to_string(&component.log)?;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(
                parsed.is_ok(),
                "{}: not a JSON line: {line}",
                component.name
            );
        }
    }
    Ok(())
}

/// A component logging JSON that stops on an error says why in one JSON line (anyhow's
/// report is multi-line text), and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_logging_json_stops_with_one_json_line() -> anyhow::Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let output = tokio::process::Command::new(switchyard_tests::switchyard_bin())
        .args([
            "router",
            "--etcd",
            "http://127.0.0.1:1",
            "--log-format",
            "json",
        ])
        .args(["--listen", &taken.local_addr()?.to_string()])
        .args(["--http-listen", "127.0.0.1:0"])
        .output()
        .await?;
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines() {
        let _: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON ({e}): {line:?}"))?;
    }
    let last: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())?;
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["fields"]["message"], "stopped", "{last}");
    assert!(
        last["fields"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Address already in use")),
        "{last}"
    );
    Ok(())
}

/// One `Generate` call with an API key, read to its end: its `Accepted` frame and how it ended
/// (`Err` with the code of a `Failed` frame or of the call's status).
async fn generate_with_key(
    client: &mut InferenceClient<tonic::transport::Channel>,
    request: v1::GenerateRequest,
    key: &str,
) -> anyhow::Result<(Option<v1::Accepted>, Result<(), tonic::Code>)> {
    let mut frames = match client.generate(with_bearer(request, Some(key))).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Ok((None, Err(status.code()))),
    };
    let mut accepted = None;
    loop {
        match frames.message().await {
            Ok(Some(frame)) => match frame.frame {
                Some(server_frame::Frame::Accepted(a)) => accepted = Some(a),
                Some(server_frame::Frame::Finished(_)) => return Ok((accepted, Ok(()))),
                Some(server_frame::Frame::Failed(f)) => {
                    return Ok((accepted, Err(tonic::Code::from(f.code))));
                }
                _ => {}
            },
            Ok(None) => anyhow::bail!("stream ended without Finished or Failed"),
            Err(status) => return Ok((accepted, Err(status.code()))),
        }
    }
}

/// The shipped alerting rules (`deploy/prometheus/switchyard-alerts.yaml`) against a live
/// cluster that has seen what the alerts watch for: both lanes served, an API key refused,
/// requests refused for what they send (gRPC and HTTP), a latency-critical request spilled to the GPU pool (wafer-scale worker drained) and a request
/// failed (its GPU worker killed with nowhere to fail over). Every selector must select a
/// scraped series — but a forged worker record's, which exists only once one is refused (the TLS
/// test `forged_worker_records_get_no_traffic_and_the_router_counts_them` checks it) — and
/// every grouping label must be one of those series'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_rules_read_metrics_the_components_serve() -> anyhow::Result<()> {
    const KEY: &str = "sk-alerts-0001";
    let dir = tempfile::tempdir()?;
    let keys = write_api_keys(dir.path(), &[(KEY, "acme")])?;
    let mut cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        metrics: true,
        router_flags: vec!["--api-keys-file".into(), keys.display().to_string()],
        api_key: Some(KEY.into()),
        ..Default::default()
    })
    .await?;
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);

    for (id, class) in [
        ("lc", RequestClass::LatencyCritical),
        ("cs", RequestClass::CostSensitive),
    ] {
        let (_, ended) =
            generate_with_key(&mut client, synthetic_request(id, class, "a b", 3), KEY).await?;
        assert_eq!(ended, Ok(()), "{id}");
    }
    let (_, refused) = generate_with_key(
        &mut client,
        synthetic_request("bad-key", RequestClass::CostSensitive, "a", 1),
        "sk-unknown",
    )
    .await?;
    assert_eq!(refused, Err(tonic::Code::Unauthenticated));
    // Refused for what they send, on each door.
    let mut nameless = synthetic_request("no-model", RequestClass::CostSensitive, "a", 1);
    nameless.model.clear();
    let (_, invalid) = generate_with_key(&mut client, nameless, KEY).await?;
    assert_eq!(invalid, Err(tonic::Code::InvalidArgument));
    let invalid = reqwest::Client::new()
        .post(format!("{}/chat/completions", cluster.router_openai_url()))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"model": "synthetic"}))
        .send()
        .await?;
    assert_eq!(invalid.status(), 400);

    let wse_id = cluster.wse[0].name.clone();
    let control_plane =
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?;
    v1::admin_client::AdminClient::new(control_plane)
        .drain(v1::DrainRequest { worker_id: wse_id })
        .await?;
    wait_until(TIMEOUT, "a latency-critical request to spill", || {
        let mut client = client.clone();
        async move {
            let request = synthetic_request("spill", RequestClass::LatencyCritical, "a", 1);
            generate_with_key(&mut client, request, KEY)
                .await
                .is_ok_and(|(accepted, _)| {
                    accepted.is_some_and(|a| a.reason.contains("no wse worker"))
                })
        }
    })
    .await?;

    let mut series = Vec::new();
    for url in [
        cluster.gpu[0].metrics_url(),
        cluster.wse[0].metrics_url(),
        cluster.control_plane.metrics_url(),
    ] {
        series.extend(alert_rules::parse_exposition(&scrape(&url).await?)?);
    }
    // A request failing: its worker killed mid-stream, the other pool's worker drained.
    let long = synthetic_request("doomed", RequestClass::CostSensitive, "a b", 2000);
    let mut frames = client
        .generate(with_bearer(long, Some(KEY)))
        .await?
        .into_inner();
    while !matches!(
        frames.message().await?.and_then(|f| f.frame),
        Some(server_frame::Frame::Tokens(_))
    ) {}
    cluster.gpu[0].kill().await?;
    let ended = loop {
        match frames.message().await {
            Ok(Some(v1::ServerFrame {
                frame: Some(server_frame::Frame::Failed(f)),
            })) => break tonic::Code::from(f.code),
            Ok(Some(_)) => {}
            Ok(None) => anyhow::bail!("the doomed request ended without failing"),
            Err(status) => break status.code(),
        }
    };
    assert_eq!(ended, tonic::Code::Unavailable);
    series.extend(alert_rules::parse_exposition(
        &scrape(&cluster.router.metrics_url()).await?,
    )?);

    let rules = alert_rules::load()?;
    alert_rules::check_annotations(&rules)?;
    let report = alert_rules::check(&rules, &series);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    assert_eq!(
        report.unmatched,
        [concat!(
            "SwitchyardForgedWorkerRecord: ",
            "switchyard_router_worker_identity_rejections_total"
        )],
        "selectors that select nothing"
    );

    // The PrometheusRule wrapper carries the same groups.
    let script = alert_rules::repo_root().join("deploy/prometheus/prometheus-rule.sh");
    let wrapped = switchyard_tests::program_output(
        "bash",
        &[
            script.display().to_string(),
            "monitoring".into(),
            "release=kps".into(),
        ],
    )
    .await?;
    let wrapped: serde_json::Value = serde_norway::from_str(&wrapped)?;
    assert_eq!(wrapped["kind"], "PrometheusRule");
    assert_eq!(wrapped["metadata"]["namespace"], "monitoring");
    assert_eq!(wrapped["metadata"]["labels"]["release"], "kps");
    let groups: alert_rules::RuleFile = serde_json::from_value(wrapped["spec"].clone())?;
    assert_eq!(groups, rules);
    Ok(())
}

/// One `Generate` call of `tenant` (request metadata, no API key), read to its end: its
/// `Accepted` frame and `Finished` usage.
async fn generate_as(
    client: &mut InferenceClient<tonic::transport::Channel>,
    tenant: Option<&str>,
    prompt: &str,
) -> anyhow::Result<(v1::Accepted, v1::Usage)> {
    let mut request = synthetic_request("usage", RequestClass::Auto, prompt, 3);
    if let Some(tenant) = tenant {
        request.metadata.insert("tenant".into(), tenant.into());
    }
    read_to_finished(client.generate(request).await?.into_inner()).await
}

/// Per-tenant usage: a tenant the routing policy names is counted by name, requests and prompt
/// and completion tokens as their `Finished` frames reported; a tenant only the client names
/// (metadata, no API keys) as `(other)`, so clients cannot mint series; none as `(none)`.
/// (With API keys, their tenants by name: `auth::api_keys_choose_the_tenant_on_grpc_and_http`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_usage_is_counted_by_the_tenants_the_policy_names() -> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        ..Default::default()
    })
    .await?;
    let control_plane =
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?;
    v1::admin_client::AdminClient::new(control_plane)
        .set_policy(v1::SetPolicyRequest {
            merge: true,
            document: r#"{"tenants": {"named": "cost-sensitive", "probe": "cost-sensitive"}}"#
                .into(),
        })
        .await?;
    let channel = switchyard_client::connect_channel(&cluster.router_addr()).await?;
    let mut client = InferenceClient::new(channel);
    // The policy applied (`probe` is counted under its name too, not under `named`).
    wait_until(TIMEOUT, "the router to apply the policy", || {
        let mut client = client.clone();
        async move {
            generate_as(&mut client, Some("probe"), "x")
                .await
                .is_ok_and(|(accepted, _)| accepted.reason.starts_with("tenant=probe"))
        }
    })
    .await?;
    let mut named = Vec::new();
    for prompt in ["one two three", "four five"] {
        named.push(generate_as(&mut client, Some("named"), prompt).await?.1);
    }
    let (_, stranger) = generate_as(&mut client, Some("made-up-9f2c"), "six").await?;
    let (_, anonymous) = generate_as(&mut client, None, "seven eight").await?;

    let text = scrape(&format!("http://{}/metrics", cluster.router.addr("http"))).await?;
    let requests = |tenant: &str| {
        sample(
            &text,
            "switchyard_router_tenant_requests_total",
            &[("tenant", tenant), ("outcome", "completed")],
        )
    };
    let tokens = |tenant: &str, kind: &str| {
        sample(
            &text,
            "switchyard_router_tenant_tokens_total",
            &[("tenant", tenant), ("kind", kind)],
        )
    };
    assert_eq!(requests("named"), named.len() as f64, "{text}");
    let sum = |pick: fn(&v1::Usage) -> u32| named.iter().map(pick).sum::<u32>() as f64;
    assert_eq!(
        tokens("named", "prompt"),
        sum(|u| u.prompt_tokens),
        "{text}"
    );
    assert_eq!(
        tokens("named", "completion"),
        sum(|u| u.completion_tokens),
        "{text}"
    );
    for (label, usage) in [("(other)", &stranger), ("(none)", &anonymous)] {
        assert_eq!(requests(label), 1.0, "{label}: {text}");
        assert_eq!(
            tokens(label, "completion"),
            f64::from(usage.completion_tokens),
            "{label}: {text}"
        );
    }
    assert!(!text.contains("made-up-9f2c"), "{text}");
    Ok(())
}
