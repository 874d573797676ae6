//! The control plane's dashboard while etcd is unreachable: it keeps answering from the
//! membership it watches (as last seen) with live load from its streams to the workers, marks
//! its answers `registry.reachable: false` and says so in a banner, until etcd answers again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard_tests::browser::Browser;
use switchyard_tests::{Cluster, ClusterSpec, Component, poll_until, wait_until};

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

/// A GET of the dashboard's API: the status, the JSON body and how long the answer took.
async fn api(
    client: &reqwest::Client,
    http: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, Value, Duration)> {
    let started = Instant::now();
    let response = client.get(format!("http://{http}{path}")).send().await?;
    let status = response.status().as_u16();
    let body = response.json().await?;
    Ok((status, body, started.elapsed()))
}

fn worker<'a>(body: &'a Value, id: &str) -> Option<&'a Value> {
    body["workers"].as_array()?.iter().find(|w| w["id"] == id)
}

/// Waits until `component`'s one etcd endpoint gauge reads `value`.
async fn endpoint_up(component: &Component, value: u8) -> anyhow::Result<()> {
    let url = component.metrics_url();
    let series = |text: &str| {
        text.lines().any(|line| {
            line.starts_with("switchyard_etcd_endpoint_up{") && line.ends_with(&format!(" {value}"))
        })
    };
    wait_until(
        PATIENCE,
        &format!("switchyard_etcd_endpoint_up {value}"),
        || async {
            match reqwest::get(&url).await {
                Ok(answer) => answer.text().await.is_ok_and(|text| series(&text)),
                Err(_) => false,
            }
        },
    )
    .await?;
    Ok(())
}

/// etcd frozen (SIGSTOP: its port accepts connections, nothing answers): `/api/workers` and
/// `/api/stats` answer 200 after their 1 s read timeout — not 503 after the etcd client's ~5 s
/// (bounded at 3 s here, for a loaded machine) — with the worker as last seen, its live load,
/// and `registry.reachable: false`; the page shows the etcd banner. Once etcd resumes they say `reachable: true` again and the banner goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_answers_from_the_membership_last_seen_while_etcd_is_frozen()
-> anyhow::Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        gpu_workers: 1,
        wse_workers: 0,
        // No lease lapses during the few seconds etcd is frozen: the worker stays registered.
        lease_ttl: "30s",
        metrics: true,
        ..Default::default()
    })
    .await?;
    let http = cluster.control_plane.addr("http");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // Reachable, and the load stream to the worker up.
    wait_until(PATIENCE, "the worker listed with its live load", || async {
        api(&client, http, "/api/workers")
            .await
            .is_ok_and(|(status, body, _)| {
                status == 200
                    && body["registry"]["reachable"] == true
                    && worker(&body, "gpu-0").is_some_and(|w| !w["load"].is_null())
            })
    })
    .await?;
    let browser = Browser::start().await?;
    browser.goto(&format!("http://{http}/")).await?;
    browser
        .wait_for_text(PATIENCE, "the page to show the worker", "#workers", "gpu-0")
        .await?;
    browser
        .wait_for_text(
            PATIENCE,
            "the page to show the policy",
            "#policy",
            "default_lane",
        )
        .await?;
    assert!(!browser.shown("stale").await);

    cluster.etcd.pause()?;
    let frozen = async {
        // The first answer after the freeze comes from the membership as last seen.
        let (status, workers, took) = api(&client, http, "/api/workers").await?;
        let (stats_status, stats, stats_took) = api(&client, http, "/api/stats").await?;
        let banner = poll_until(
            Duration::from_secs(10),
            "the page's etcd banner",
            || async {
                let shown = browser.shown("stale").await;
                let text = browser.text("#stale").await.unwrap_or_default();
                (shown && text.starts_with("etcd unreachable since")).then_some(text)
            },
        )
        .await;
        // The policy, read from etcd with no fallback, cannot be read: the policy section says
        // so, and the page still blames etcd, not this control plane (its failed read used to
        // fail the whole poll: "no answer from this control plane … may be down or hung").
        let unread = poll_until(
            PATIENCE,
            "the policy section to say it is not read",
            || async {
                let text = browser.text("#policy-unread").await.unwrap_or_default();
                (browser.shown("policy-unread").await && !text.is_empty()).then_some(text)
            },
        )
        .await;
        let after_policy = (
            browser.text("#stale").await.unwrap_or_default(),
            browser.text("#freshness").await.unwrap_or_default(),
            browser.text("#policy").await.unwrap_or_default(),
        );
        // Its only endpoint set aside: what the SwitchyardEtcdUnreachable alert watches for.
        endpoint_up(&cluster.control_plane, 0).await?;
        anyhow::Ok((
            status,
            workers,
            took,
            stats_status,
            stats,
            stats_took,
            banner,
            unread,
            after_policy,
        ))
    }
    .await;
    cluster.etcd.resume()?;
    let (status, workers, took, stats_status, stats, stats_took, banner, unread, after_policy) =
        frozen?;
    eprintln!("frozen etcd: /api/workers in {took:?}, /api/stats in {stats_took:?}");
    assert_eq!(status, 200, "{workers}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let registry = &workers["registry"];
    assert_eq!(registry["reachable"], false, "{workers}");
    let error = registry["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("did not answer within 1 s") && error.contains("check that etcd is running"),
        "{error}"
    );
    assert!(registry["since_unix_ms"].as_u64().is_some(), "{workers}");
    assert!(registry["as_of_unix_ms"].as_u64().is_some(), "{workers}");
    let gpu = worker(&workers, "gpu-0").expect("the worker as last seen");
    assert_eq!(gpu["state"], "ready", "{workers}");
    assert!(!gpu["load"].is_null(), "live load: {workers}");
    assert_eq!(stats_status, 200, "{stats}");
    assert!(stats_took < Duration::from_secs(3), "{stats_took:?}");
    assert_eq!(stats["workers"], 1, "{stats}");
    assert_eq!(stats["registry"]["reachable"], false, "{stats}");
    let banner = banner?;
    assert!(
        banner.contains("showing the membership as last seen"),
        "{banner}"
    );
    let unread = unread?;
    assert!(
        unread.starts_with("The policy could not be read now:")
            && unread.contains("Shown as read at"),
        "{unread}"
    );
    let (stale, freshness, policy) = after_policy;
    assert!(stale.starts_with("etcd unreachable since"), "{stale}");
    assert!(freshness.starts_with("updated "), "{freshness}");
    assert!(
        policy.contains("default_lane"),
        "the document last read stays: {policy}"
    );
    // Once etcd answers, the policy is read again.
    wait_until(PATIENCE, "the policy section to be read again", || async {
        !browser.shown("policy-unread").await
    })
    .await?;

    // etcd answers again: so do the reads, and the banner goes.
    endpoint_up(&cluster.control_plane, 1).await?;
    wait_until(PATIENCE, "the registry reachable again", || async {
        api(&client, http, "/api/workers")
            .await
            .is_ok_and(|(status, body, _)| {
                status == 200
                    && body["registry"]["reachable"] == true
                    && body["registry"]["error"].is_null()
                    && worker(&body, "gpu-0").is_some()
            })
    })
    .await?;
    wait_until(PATIENCE, "the page's etcd banner to go", || async {
        !browser.shown("stale").await
    })
    .await?;
    browser.close().await?;
    Ok(())
}
