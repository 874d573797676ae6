//! Tenant quotas from the routing policy, against real processes (etcd, a synthetic-engine
//! worker, a router with API keys, a control plane storing the policy): a tenant over its tokens
//! per minute gets HTTP 429 with `Retry-After` and gRPC `RESOURCE_EXHAUSTED` with `retry-after`,
//! the message naming the limit, while another tenant is served in the same moment; a tenant
//! restricted to the cost-sensitive lane is downgraded or refused as its policy says; a token
//! budget refuses once spent; the router counts each refusal by limit.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard_proto::v1::{
    self, Lane, RequestClass, admin_client::AdminClient, inference_client::InferenceClient,
    server_frame::Frame,
};
use switchyard_tests::{
    Cluster, ClusterSpec, synthetic_request, wait_until, with_bearer, write_api_keys,
};
use tonic::transport::Channel;

const ACME_KEY: &str = "sk-acme-quota-0001";
const GLOBEX_KEY: &str = "sk-globex-quota-0002";
const INITECH_KEY: &str = "sk-initech-quota-0003";
const HOOLI_KEY: &str = "sk-hooli-quota-0004";

/// acme: 1 200 tokens per minute (20 a second); globex: no limits; initech: cost-sensitive
/// only, refused otherwise; hooli: cost-sensitive only (downgraded), and 300 tokens a day.
const POLICY: &str = r#"{
  "quotas": {
    "tenants": {
      "acme": {"tokens_per_minute": 1200},
      "initech": {"lanes": ["cost-sensitive"], "disallowed_lane": "refuse"},
      "hooli": {"lanes": ["cost-sensitive"], "token_budget": {"tokens": 300, "period_s": 86400}}
    }
  }
}"#;

/// One `Generate` of `max_tokens` in `class`: its `Accepted` frame, or the status it failed
/// with (the call's, or a `Failed` frame's with its `retry-after-ms`).
async fn generate(
    client: &mut InferenceClient<Channel>,
    key: &str,
    class: RequestClass,
    max_tokens: u32,
) -> Result<v1::Accepted, tonic::Status> {
    let request = synthetic_request("", class, "how much may I use?", max_tokens);
    let mut stream = client
        .generate(with_bearer(request, Some(key)))
        .await?
        .into_inner();
    let mut accepted = None;
    while let Some(frame) = stream.message().await? {
        match frame.frame {
            Some(Frame::Accepted(a)) => accepted = Some(a),
            Some(Frame::Failed(f)) => {
                let mut status = tonic::Status::new(tonic::Code::from_i32(f.code), f.message);
                if f.retry_after_ms > 0 {
                    status.metadata_mut().insert(
                        "retry-after-ms",
                        f.retry_after_ms.to_string().parse().expect("digits"),
                    );
                }
                return Err(status);
            }
            _ => {}
        }
    }
    accepted.ok_or_else(|| tonic::Status::internal("stream ended without Accepted"))
}

/// A chat completion over HTTP: status, `Retry-After` header and body.
async fn chat(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    max_tokens: u32,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    let response = http
        .post(format!("{url}/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "synthetic",
            "messages": [{"role": "user", "content": "how much may I use?"}],
            "max_tokens": max_tokens,
        }))
        .send()
        .await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    Ok((status, retry_after, response.json().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_held_to_their_quotas_and_others_are_served() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys_file = write_api_keys(
        dir.path(),
        &[
            (ACME_KEY, "acme"),
            (GLOBEX_KEY, "globex"),
            (INITECH_KEY, "initech"),
            (HOOLI_KEY, "hooli"),
        ],
    )?;
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 1,
        metrics: true,
        // Fast enough that the buckets barely refill while the test's requests run.
        gpu_flags: vec!["--synthetic-tokens-per-s".into(), "20000".into()],
        router_flags: vec!["--api-keys-file".into(), keys_file.display().to_string()],
        api_key: Some(GLOBEX_KEY.into()),
        ..Default::default()
    })
    .await?;
    let mut client =
        InferenceClient::new(switchyard_client::connect_channel(&cluster.router_addr()).await?);
    let mut admin = AdminClient::new(
        switchyard_client::connect_channel(&cluster.control_plane.addr("grpc").to_string()).await?,
    );
    admin
        .set_policy(v1::SetPolicyRequest {
            merge: false,
            document: POLICY.into(),
        })
        .await?;

    // Once the router has the policy, initech's latency-critical requests are refused.
    wait_until(
        Duration::from_secs(30),
        "the router to apply the quota policy",
        || {
            let mut client = client.clone();
            async move {
                generate(&mut client, INITECH_KEY, RequestClass::LatencyCritical, 2)
                    .await
                    .is_err_and(|s| s.code() == tonic::Code::PermissionDenied)
            }
        },
    )
    .await?;
    let refused = generate(&mut client, INITECH_KEY, RequestClass::LatencyCritical, 2)
        .await
        .expect_err("initech may not use latency-critical");
    assert!(
        refused
            .message()
            .contains("may not use the latency-critical lane"),
        "{}",
        refused.message()
    );
    let batch = generate(&mut client, INITECH_KEY, RequestClass::CostSensitive, 2).await?;
    assert_eq!(batch.lane, Lane::CostSensitive as i32, "{batch:?}");

    // hooli's latency-critical request runs, downgraded, and says why.
    let downgraded = generate(&mut client, HOOLI_KEY, RequestClass::LatencyCritical, 100).await?;
    assert_eq!(
        downgraded.lane,
        Lane::CostSensitive as i32,
        "{downgraded:?}"
    );
    assert!(
        downgraded.reason.contains("may not use latency-critical"),
        "{}",
        downgraded.reason
    );
    // It used its prompt and 100 tokens of its 300 a day: 200 more would not fit.
    let spent = generate(&mut client, HOOLI_KEY, RequestClass::CostSensitive, 200)
        .await
        .expect_err("hooli's budget is spent");
    assert_eq!(spent.code(), tonic::Code::ResourceExhausted, "{spent:?}");
    assert!(
        spent.message().contains("token_budget"),
        "{}",
        spent.message()
    );
    assert!(
        spent.metadata().get("retry-after-ms").is_some(),
        "{spent:?}"
    );

    // acme: 1 200 tokens a minute. Over HTTP, two requests reserving 500 each pass, the third
    // is refused with 429, Retry-After and a message naming the limit...
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = cluster.router_openai_url();
    let mut refusal = None;
    for _ in 0..3 {
        let (status, retry_after, body) = chat(&http, &url, ACME_KEY, 500).await?;
        if status == 429 {
            refusal = Some((retry_after, body));
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let (retry_after, body) = refusal.expect("the third request within the minute is refused");
    let secs: u64 = retry_after.expect("Retry-After").parse()?;
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("1200 tokens per minute"), "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    // ... over gRPC too, with retry-after ...
    let over = generate(&mut client, ACME_KEY, RequestClass::Auto, 500)
        .await
        .expect_err("acme is over its tokens per minute");
    assert_eq!(over.code(), tonic::Code::ResourceExhausted, "{over:?}");
    assert!(over.metadata().get("retry-after-ms").is_some(), "{over:?}");
    // ... while globex, in the same moment, is served on both doors.
    let (status, _, body) = chat(&http, &url, GLOBEX_KEY, 500).await?;
    assert_eq!(status, 200, "{body}");
    generate(&mut client, GLOBEX_KEY, RequestClass::Auto, 500).await?;

    // The router counts refusals by limit, apart from load shedding.
    let metrics = http
        .get(cluster.router.metrics_url())
        .send()
        .await?
        .text()
        .await?;
    for limit in ["tokens_per_minute", "token_budget", "lanes"] {
        assert!(
            metrics.contains(&format!(
                "switchyard_router_quota_refusals_total{{limit=\"{limit}\"}}"
            )),
            "no {limit} refusals counted:\n{metrics}"
        );
    }
    // The shed series exist from the start (at 0, for alerting); none may have counted.
    let shed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("switchyard_router_shed_total{"))
        .collect();
    assert!(
        !shed.is_empty() && shed.iter().all(|l| l.ends_with(" 0")),
        "quota refusals counted as shed: {shed:?}"
    );
    Ok(())
}
