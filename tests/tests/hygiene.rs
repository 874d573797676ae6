//! Connection hygiene against real processes (etcd, synthetic workers, the router, the control
//! plane) and raw TCP clients. Found from outside: connections that sent nothing, or half a
//! request, were held 160 s and more on every listener, and enough of them exhausted the
//! router's file descriptors until it stopped answering `/health`.
//!
//! - A connection that sends nothing, or half a request (an HTTP/1 head without its blank
//!   line, part of HTTP/2's preface), is closed within `--header-read-timeout` on every
//!   listener: router gRPC and HTTP, worker gRPC and metrics, control-plane gRPC and dashboard.
//! - A `Session` streaming tokens for longer than `--idle-timeout` is not cut; once unused for
//!   that long, it is.
//! - With its descriptors exhausted by idle connections, the router stops accepting, keeps its
//!   in-flight stream, health and etcd watch, and serves new connections again once the
//!   timeouts have closed the idle ones. It raises its soft descriptor limit at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_proto::v1::{self, inference_client::InferenceClient, server_frame::Frame};
use switchyard_tests::{
    Component, Etcd, list_router_workers, log_dir, start_control_plane, start_gpu_worker,
    start_router, switchyard_bin, synthetic_request, wait_until,
};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// How long any condition may take to become true.
const PATIENCE: Duration = Duration::from_secs(60);

/// A synthetic GPU worker `id` with `flags`.
async fn worker(etcd: &Etcd, id: &str, flags: &[&str], lines: usize) -> anyhow::Result<Component> {
    start_gpu_worker(&etcd.url, id, flags, lines).await
}

/// A router with `flags`, announcing its gRPC and HTTP addresses.
async fn router(etcd: &Etcd, flags: &[&str]) -> anyhow::Result<Component> {
    start_router(&etcd.url, "router", flags).await
}

/// Waits until the router at `grpc` routes to exactly `ids`.
async fn wait_for_workers(grpc: SocketAddr, ids: &[&str]) -> anyhow::Result<()> {
    wait_until(
        PATIENCE,
        &format!("the router to route to {ids:?}"),
        || async {
            list_router_workers(&grpc.to_string())
                .await
                .is_ok_and(|listed| listed == ids)
        },
    )
    .await?;
    Ok(())
}

/// Connects to `addr`, sends `bytes`, then nothing; returns how long the server took to close
/// the connection and what it sent before.
async fn time_to_close(addr: SocketAddr, bytes: &[u8]) -> anyhow::Result<(Duration, Vec<u8>)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let started = Instant::now();
    tcp.write_all(bytes).await?;
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .with_context(|| format!("{addr} held a connection for {PATIENCE:?}"))?
        {
            Ok(0) | Err(_) => return Ok((started.elapsed(), received)),
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
}

/// Asserts that `addr` (`what`) closes a connection that sent `bytes` and then nothing after
/// about `timeout`, without answering (an HTTP/2 server's own preface, a SETTINGS frame, goes
/// out before it reads anything: that is all a gRPC port may send).
async fn closes_after(
    what: &str,
    addr: SocketAddr,
    bytes: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let (took, received) = time_to_close(addr, bytes).await?;
    const SETTINGS: u8 = 0x4;
    anyhow::ensure!(
        received.is_empty() || (what.contains("grpc") && received.get(3) == Some(&SETTINGS)),
        "{what}: answered {:?}",
        String::from_utf8_lossy(&received)
    );
    // Not earlier than the timeout (something else closed it), nor much later.
    anyhow::ensure!(
        took >= timeout.mul_f32(0.9) && took < timeout * 8,
        "{what}: closed after {took:?}, the timeout is {timeout:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_are_closed_within_the_header_read_timeout()
-> anyhow::Result<()> {
    let timeout = Duration::from_secs(1);
    let flags = ["--header-read-timeout", "1s"];
    let etcd = Etcd::start().await?;
    let mut worker_flags = flags.to_vec();
    worker_flags.extend(["--metrics-addr", "127.0.0.1:0"]);
    let gpu = worker(&etcd, "gpu-0", &worker_flags, 2).await?;
    let router = router(&etcd, &flags).await?;
    let control_plane = start_control_plane(&etcd.url, "control-plane-0", &flags).await?;
    wait_for_workers(router.addr("grpc"), &["gpu-0"]).await?;

    let listeners = [
        ("router grpc", router.addr("grpc")),
        ("router http", router.addr("http")),
        ("worker grpc", gpu.addr("grpc")),
        ("worker metrics", gpu.addr("metrics")),
        ("control-plane grpc", control_plane.addr("grpc")),
        ("control-plane dashboard", control_plane.addr("http")),
    ];
    // An HTTP/1 request head without the blank line that ends it (longer than HTTP/2's
    // preface, so only the HTTP/1 header-read timeout can close it), and the first line of
    // HTTP/2's preface.
    let half_http1 = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let half_preface = b"PRI * HTTP/2.0\r\n";
    let mut checks = Vec::new();
    for (name, addr) in listeners {
        checks.push(tokio::spawn(async move {
            closes_after(&format!("{name}, silent"), addr, b"", timeout).await
        }));
        checks.push(tokio::spawn(async move {
            closes_after(
                &format!("{name}, half a preface"),
                addr,
                half_preface,
                timeout,
            )
            .await
        }));
    }
    for (name, addr) in [
        ("router http", router.addr("http")),
        ("control-plane dashboard", control_plane.addr("http")),
        ("worker metrics", gpu.addr("metrics")),
    ] {
        checks.push(tokio::spawn(async move {
            closes_after(&format!("{name}, half a head"), addr, half_http1, timeout).await
        }));
    }
    for check in checks {
        check.await??;
    }

    // The listeners still serve complete requests.
    let health = reqwest::get(format!("http://{}/health", router.addr("http"))).await?;
    assert_eq!(health.status(), 200);
    wait_for_workers(router.addr("grpc"), &["gpu-0"]).await?;
    Ok(())
}

/// A gRPC channel without keepalive pings: its connection is silent when unused.
/// etcd, a worker `gpu-0` sending 10 tokens a second one at a time, and a router with
/// `router_flags` routing to it.
async fn slowly_streaming_cluster(
    router_flags: &[&str],
) -> anyhow::Result<(Etcd, Component, Component)> {
    let etcd = Etcd::start().await?;
    let gpu = worker(
        &etcd,
        "gpu-0",
        &["--synthetic-tokens-per-s", "10", "--max-chunk-tokens", "1"],
        1,
    )
    .await?;
    let router = router(&etcd, router_flags).await?;
    wait_for_workers(router.addr("grpc"), &["gpu-0"]).await?;
    Ok((etcd, gpu, router))
}

async fn quiet_channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_session_outlives_the_idle_timeout_and_an_unused_one_is_closed()
-> anyhow::Result<()> {
    let idle = Duration::from_secs(2);
    // 10 tokens a second, each sent at once: the stream is never silent for 2 s.
    let (_etcd, _gpu, router) =
        slowly_streaming_cluster(&["--header-read-timeout", "1s", "--idle-timeout", "2s"]).await?;

    let mut client = InferenceClient::new(quiet_channel(router.addr("grpc")).await?);
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ClientFrame>(4);
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // 50 tokens at 10 a second: 5 s of streaming, over twice the idle timeout.
    let max_tokens = 50;
    tx.send(v1::ClientFrame {
        frame: Some(v1::client_frame::Frame::Start(synthetic_request(
            "long",
            v1::RequestClass::Auto,
            "stream for a while",
            max_tokens,
        ))),
    })
    .await?;
    let started = Instant::now();
    let mut tokens = 0;
    let finished = loop {
        let frame = tokio::time::timeout(PATIENCE, inbound.message())
            .await
            .context("no frame")??
            .context("the session ended while streaming")?;
        match frame.frame {
            Some(Frame::Tokens(chunk)) => tokens += chunk.token_ids.len().max(1),
            Some(Frame::Finished(finished)) => break finished,
            Some(Frame::Failed(failed)) => anyhow::bail!("request failed: {failed:?}"),
            _ => {}
        }
    };
    let streamed = started.elapsed();
    assert!(streamed > idle, "streamed only {streamed:?}");
    assert_eq!(
        finished.usage.map(|u| u.completion_tokens),
        Some(max_tokens)
    );
    assert!(tokens > 0);

    // Unused now (the request stream stays open, nothing is sent either way): closed after
    // about the idle timeout.
    let unused = Instant::now();
    let ended = tokio::time::timeout(PATIENCE, inbound.message())
        .await
        .context("an unused session was kept open")?;
    let took = unused.elapsed();
    assert!(
        !matches!(ended, Ok(Some(_))),
        "a frame on an unused session: {ended:?}"
    );
    assert!(
        took >= idle.mul_f32(0.9) && took < idle * 8,
        "the unused session was closed after {took:?}, the idle timeout is {idle:?}"
    );
    drop(tx);
    Ok(())
}

/// A router started under `prlimit --nofile=<soft>:<hard>`, so the test knows its pid and its
/// starting descriptor limits.
struct LimitedRouter {
    child: tokio::process::Child,
    log: PathBuf,
    grpc: SocketAddr,
    http: SocketAddr,
}

impl LimitedRouter {
    async fn start(etcd: &Etcd, nofile: &str, flags: &[&str]) -> anyhow::Result<Self> {
        let log = log_dir().join(format!(
            "router-limited-{}.log",
            switchyard_tests::free_port()
        ));
        let mut child = tokio::process::Command::new("prlimit")
            .arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(switchyard_bin())
            .args([
                "router",
                "--etcd",
                &etcd.url,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
            ])
            .args(flags)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("starting the router under prlimit (util-linux)")?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let (mut grpc, mut http) = (None, None);
        while grpc.is_none() || http.is_none() {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .context("the router did not announce itself")??
                .context("the router exited before announcing itself")?;
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["router", "grpc", addr] => grpc = Some(addr.parse()?),
                ["router", "http", addr] => http = Some(addr.parse()?),
                _ => {}
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            log,
            grpc: grpc.expect("announced"),
            http: http.expect("announced"),
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the router exited")
    }

    /// `(soft, hard)` limits on open files, from procfs.
    fn nofile(&self) -> anyhow::Result<(u64, u64)> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()?))?;
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .context("no open file limit in procfs")?;
        let figures: Vec<u64> = line
            .split_whitespace()
            .filter_map(|word| word.parse().ok())
            .collect();
        Ok((figures[0], figures[1]))
    }

    fn open_fds(&self) -> anyhow::Result<u64> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()?))?.count() as u64)
    }

    /// Waits until the router has logged a line containing `needle`.
    async fn wait_for_log(&self, needle: &str) -> anyhow::Result<()> {
        wait_until(PATIENCE, &format!("the router to log {needle:?}"), || {
            let logged = std::fs::read_to_string(&self.log)
                .unwrap_or_default()
                .contains(needle);
            async move { logged }
        })
        .await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_exhausting_the_routers_descriptors_are_freed_and_open_streams_survive()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let _gpu = worker(&etcd, "gpu-0", &["--synthetic-tokens-per-s", "20"], 1).await?;
    let router = LimitedRouter::start(&etcd, "256:1024", &["--header-read-timeout", "2s"]).await?;
    // Started with a soft limit of 256, the router raised it to the hard limit.
    assert_eq!(router.nofile()?, (1024, 1024));
    router.wait_for_log("open file limit").await?;
    wait_for_workers(router.grpc, &["gpu-0"]).await?;

    // Open before the exhaustion: a generation streaming for 15 s (300 tokens at 20 a
    // second), and a channel for health checks.
    let channel = quiet_channel(router.grpc).await?;
    let max_tokens = 300;
    let mut stream = InferenceClient::new(channel.clone())
        .generate(synthetic_request(
            "in-flight",
            v1::RequestClass::Auto,
            "keep streaming",
            max_tokens,
        ))
        .await?
        .into_inner();
    let first = stream.message().await?.context("no first frame")?;
    assert!(matches!(first.frame, Some(Frame::Accepted(_))), "{first:?}");
    let generation = tokio::spawn(async move {
        loop {
            match stream.message().await? {
                Some(v1::ServerFrame {
                    frame: Some(Frame::Finished(finished)),
                }) => return Ok::<_, anyhow::Error>((finished, Instant::now())),
                Some(v1::ServerFrame {
                    frame: Some(Frame::Failed(failed)),
                }) => anyhow::bail!("the in-flight generation failed: {failed:?}"),
                Some(_) => {}
                None => anyhow::bail!("the in-flight generation ended without finishing"),
            }
        }
    });
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = tonic_health::pb::HealthCheckRequest {
        service: "switchyard.v1.Inference".into(),
    };

    // Leave the router 16 descriptors, then connect three times as many clients that send
    // nothing.
    let limit = router.open_fds()? + 16;
    let status = tokio::process::Command::new("prlimit")
        .arg("--pid")
        .arg(router.pid()?.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .await?;
    anyhow::ensure!(status.success(), "prlimit --pid failed: {status}");
    let mut idle = Vec::new();
    for _ in 0..48 {
        idle.push(TcpStream::connect(router.http).await?);
    }
    router.wait_for_log("cannot accept connections").await?;
    let exhausted = Instant::now();

    // Exhausted: an open connection still answers health checks.
    let serving = health.check(check.clone()).await?.into_inner();
    assert_eq!(serving.status, 1, "{serving:?}");

    // The header-read timeout frees the descriptors of the accepted ones, the rest are
    // accepted in turn and closed too.
    router.wait_for_log("accepting connections again").await?;
    let closed = idle.into_iter().map(|mut tcp| async move {
        let mut buf = [0u8; 16];
        tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await
    });
    for read in futures::future::join_all(closed).await {
        match read {
            Ok(Ok(0) | Err(_)) => {}
            Ok(Ok(n)) => anyhow::bail!("an idle connection got {n} bytes"),
            Err(_) => anyhow::bail!("an idle connection was held for {PATIENCE:?}"),
        }
    }

    // The in-flight generation went through the exhaustion and finished whole.
    let (finished, finished_at) = generation.await??;
    assert!(
        finished_at > exhausted,
        "the generation finished before the exhaustion"
    );
    assert_eq!(
        finished.usage.map(|u| u.completion_tokens),
        Some(max_tokens)
    );

    // New connections are served again: HTTP /health, and the etcd watch still delivers a
    // worker that joins now.
    let health_http = reqwest::get(format!("http://{}/health", router.http)).await?;
    assert_eq!(health_http.status(), 200);
    let _gpu1 = worker(&etcd, "gpu-1", &[], 1).await?;
    wait_for_workers(router.grpc, &["gpu-0", "gpu-1"]).await?;
    let serving = health.check(check).await?.into_inner();
    assert_eq!(serving.status, 1, "{serving:?}");
    Ok(())
}

/// One connection may open at most `--max-connection-streams` streams: the router advertises the
/// cap in its HTTP/2 SETTINGS (read here at the frame level, before any client library applies
/// it), so a client cannot open thousands of streams on one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_told_how_many_streams_it_may_open() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let router = router(&etcd, &["--max-connection-streams", "7"]).await?;
    assert_eq!(
        switchyard_tests::advertised_stream_limit(router.addr("grpc")).await?,
        7
    );
    Ok(())
}

/// Reads `session` until request `id` ends; returns how many tokens it delivered.
async fn tokens_until_finished(
    session: &mut tonic::Streaming<v1::ServerFrame>,
    id: &str,
) -> anyhow::Result<u32> {
    let mut tokens = 0;
    loop {
        let frame = tokio::time::timeout(PATIENCE, session.message())
            .await
            .context("no frame")??
            .context("the session ended while streaming")?;
        match frame.frame {
            Some(Frame::Tokens(chunk)) if chunk.request_id == id => {
                tokens += chunk.token_ids.len() as u32;
            }
            Some(Frame::Finished(finished)) if finished.request_id == id => return Ok(tokens),
            Some(Frame::Failed(failed)) => anyhow::bail!("request failed: {failed:?}"),
            _ => {}
        }
    }
}

/// With `--max-connection-age`, the router asks a connection that old to go away (HTTP/2
/// GOAWAY, so clients behind a load balancer spread onto replicas added since), and what it
/// has open carries on: a `Session` streaming across the age is not cut and takes new requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_max_age_is_asked_to_go_away_and_its_open_session_carries_on()
-> anyhow::Result<()> {
    let age = Duration::from_secs(1);
    let (_etcd, _gpu, router) = slowly_streaming_cluster(&["--max-connection-age", "1s"]).await?;
    let grpc = router.addr("grpc");

    // A raw HTTP/2 connection with nothing open: told to go away at its age, then closed.
    let connected = Instant::now();
    let (_send, connection) = h2::client::handshake(TcpStream::connect(grpc).await?).await?;
    tokio::time::timeout(PATIENCE, connection)
        .await
        .context("a connection past its max age was kept")?
        .context("the connection ended with an error, not a GOAWAY")?;
    let lived = connected.elapsed();
    assert!(lived >= age.mul_f32(0.9), "closed after {lived:?}");

    // A Session streaming across its connection's age: every token arrives, and it still
    // takes a request afterwards.
    let mut client = InferenceClient::new(quiet_channel(grpc).await?);
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::ClientFrame>(4);
    let mut session = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let start = |id: &str, tokens: u32| v1::ClientFrame {
        frame: Some(v1::client_frame::Frame::Start(synthetic_request(
            id,
            v1::RequestClass::Auto,
            "across the age",
            tokens,
        ))),
    };
    let opened = Instant::now();
    tx.send(start("across", 25)).await?;
    assert_eq!(tokens_until_finished(&mut session, "across").await?, 25);
    assert!(
        opened.elapsed() > age,
        "streamed only {:?}",
        opened.elapsed()
    );
    tx.send(start("after", 3)).await?;
    assert_eq!(tokens_until_finished(&mut session, "after").await?, 3);
    Ok(())
}

/// Established TCP connections whose local end is `port` on this host (the server's side).
fn connections_to(port: u16) -> usize {
    const ESTABLISHED: &str = "01";
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = fields
                        .get(1)
                        .and_then(|local| local.rsplit(':').next())
                        .and_then(|hex| u16::from_str_radix(hex, 16).ok());
                    local_port == Some(port) && fields.get(3) == Some(&ESTABLISHED)
                })
                .count()
        })
        .sum()
}

/// The control plane follows each registered worker's load on one stream; when the worker's
/// record goes (an etcd outage past its lease, a restart) the stream goes with it, and when it
/// comes back one stream follows it again. Found from outside: every such return left the old
/// stream open — a connection in the control plane and a stream in the worker each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_keeps_one_load_stream_per_worker_as_its_record_comes_and_goes()
-> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let gpu = worker(&etcd, "gpu-0", &[], 1).await?;
    let _control_plane = start_control_plane(&etcd.url, "cp-0", &[]).await?;
    let port = gpu.addr("grpc").port();
    let streams_to_be = |n: usize, what: &str| {
        let what = format!("{what} ({n} connection(s) to the worker)");
        async move { wait_until(PATIENCE, &what, || async move { connections_to(port) == n }).await }
    };
    streams_to_be(1, "the control plane follows the worker").await?;

    let mut etcd_client = etcd_client::Client::connect([etcd.url.as_str()], None).await?;
    let key = switchyard_cluster::schema::worker_key(switchyard_cluster::Pool::Gpu, "gpu-0");
    let record = etcd_client.get(key.as_str(), None).await?.kvs()[0]
        .value()
        .to_vec();
    for _ in 0..3 {
        etcd_client.delete(key.as_str(), None).await?;
        streams_to_be(0, "the stream to a worker without a record is closed").await?;
        etcd_client.put(key.as_str(), record.clone(), None).await?;
        streams_to_be(1, "the worker is followed again").await?;
    }
    Ok(())
}
