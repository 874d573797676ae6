//! A new routing policy set through the control plane (stored in etcd) is applied by a live
//! router without restart; an invalid document written straight into etcd is rejected and the
//! previous policy stays in force.
//!
//! Starts real processes: etcd (`/usr/bin/etcd`, or `$ETCD_BIN`) on free loopback ports with
//! its data in a temporary directory, and the `switchyard` binary (`router`, `worker-gpu`,
//! `control-plane`) from the workspace's target directory — build it first with
//! `cargo build -p switchyard`. A self-contained harness, until the shared one in
//! `tests/src/lib.rs` lands on this branch.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use switchyard_proto::v1::{
    self, GenerateRequest, Lane, SamplingParams, admin_client::AdminClient,
    inference_client::InferenceClient, server_frame::Frame,
};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn switchyard_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/switchyard")
}

struct Etcd {
    _child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

async fn start_etcd() -> anyhow::Result<Etcd> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
    let child = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--name", "policy-test"])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("policy-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await
            && c.status().await.is_ok()
        {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("etcd at {url} did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Etcd {
        _child: child,
        _dir: dir,
        url,
    })
}

struct Component {
    _child: Child,
    address: String,
    stderr: Lines<BufReader<ChildStderr>>,
}

/// Starts `switchyard <args>` and waits for its `<component> grpc <address>` stdout line.
async fn start(component: &str, args: &[&str]) -> anyhow::Result<Component> {
    let bin = switchyard_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build -p switchyard` first",
        bin.display()
    );
    let mut child = Command::new(&bin)
        .arg(component)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
    let stderr = BufReader::new(child.stderr.take().expect("piped")).lines();
    let prefix = format!("{component} grpc ");
    let address = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout.next_line().await? {
            if let Some(address) = line.strip_prefix(&prefix) {
                return Ok(address.trim().to_string());
            }
        }
        bail!("{component} exited before announcing its address")
    })
    .await
    .with_context(|| format!("{component} did not start"))??;
    Ok(Component {
        _child: child,
        address,
        stderr,
    })
}

impl Component {
    /// Reads the component's log until a line contains `needle`.
    async fn wait_for_log(&mut self, needle: &str) -> anyhow::Result<String> {
        tokio::time::timeout(PATIENCE, async {
            while let Some(line) = self.stderr.next_line().await? {
                if line.contains(needle) {
                    return Ok(line);
                }
            }
            bail!("log ended before {needle:?}")
        })
        .await
        .with_context(|| format!("no log line with {needle:?}"))?
    }
}

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

/// Polls `check` until it holds (the router applies etcd changes asynchronously).
async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(false) => bail!("timed out waiting for {what}"),
            Err(e) => return Err(e.context(format!("waiting for {what}"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_set_through_etcd_is_applied_by_a_live_router() -> anyhow::Result<()> {
    let etcd = start_etcd().await?;
    let etcd_arg = ["--etcd", etcd.url.as_str()];
    let _worker = start(
        "worker-gpu",
        &[
            etcd_arg[0],
            etcd_arg[1],
            "--listen",
            "127.0.0.1:0",
            "--model",
            "synthetic",
        ],
    )
    .await?;
    let mut router = start(
        "router",
        &[etcd_arg[0], etcd_arg[1], "--listen", "127.0.0.1:0"],
    )
    .await?;
    let control = start(
        "control-plane",
        &[etcd_arg[0], etcd_arg[1], "--listen", "127.0.0.1:0"],
    )
    .await?;
    let mut client = InferenceClient::connect(format!("http://{}", router.address)).await?;
    let mut admin = AdminClient::connect(format!("http://{}", control.address)).await?;

    // Before: the built-in default sends AUTO requests to the default lane.
    eventually("the worker to be placeable", || {
        let mut client = client.clone();
        async move { Ok(accepted(&mut client, Some("acme")).await.is_ok()) }
    })
    .await?;
    let before = accepted(&mut client, Some("acme")).await?;
    assert_eq!(before.lane, Lane::CostSensitive as i32, "{before:?}");
    assert!(before.reason.starts_with("default"), "{}", before.reason);

    // The control plane validates and stores a new policy; the router applies it live.
    let invalid = admin
        .set_policy(v1::SetPolicyRequest {
            document: r#"{"tenants": {"acme": "fast"}}"#.into(),
        })
        .await
        .expect_err("an invalid policy is refused");
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    admin
        .set_policy(v1::SetPolicyRequest {
            document: r#"{"tenants": {"acme": "latency-critical"}}"#.into(),
        })
        .await?;
    eventually("the router to apply the tenant policy", || {
        let mut client = client.clone();
        async move {
            let a = accepted(&mut client, Some("acme")).await?;
            Ok(a.lane == Lane::LatencyCritical as i32 && a.reason.starts_with("tenant=acme"))
        }
    })
    .await?;
    // Other tenants still take the default lane.
    let other = accepted(&mut client, Some("globex")).await?;
    assert_eq!(other.lane, Lane::CostSensitive as i32, "{other:?}");

    // An invalid document written straight into etcd is rejected; the previous one stays.
    let mut etcd_client = etcd_client::Client::connect([etcd.url.as_str()], None).await?;
    etcd_client
        .put(
            "/switchyard/v1/policy",
            r#"{"placement": {"choices": 0}}"#,
            None,
        )
        .await?;
    let rejected = router.wait_for_log("routing policy rejected").await?;
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
