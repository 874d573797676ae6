//! The client against a real router and a real worker (synthetic engine) in this process, on
//! loopback, over an in-memory registry.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchyard_client::{ClientError, Completion, SessionClient};
use switchyard_cluster::{MemoryRegistry, Pool};
use switchyard_proto::v1::{
    self, ChatMessage, FinishReason, GenerateRequest, RequestClass, SamplingParams,
    inference_client::InferenceClient, server_frame::Frame,
};
use switchyard_router::RouterConfig;
use switchyard_worker::synthetic::{synthetic_text, synthetic_token};
use switchyard_worker::{SyntheticConfig, SyntheticEngine, WorkerConfig};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};

const MODEL: &str = "synthetic";
/// Longest any step may take before the test fails (a debug build on a busy machine).
const PATIENCE: Duration = Duration::from_secs(30);

/// A worker serving the synthetic engine, and the registry routers find it in.
struct Worker {
    registry: Arc<MemoryRegistry>,
    shutdown: CancellationToken,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start_worker() -> anyhow::Result<Worker> {
    let registry = Arc::new(MemoryRegistry::new());
    let shutdown = CancellationToken::new();
    let config = WorkerConfig::loopback("client-test-worker", Pool::Gpu);
    // 100 tokens/s: a request of a few thousand tokens is still running when the test acts.
    let engine =
        SyntheticEngine::checked(SyntheticConfig::default()).map_err(anyhow::Error::msg)?;
    let (ready, serving) = oneshot::channel();
    tokio::spawn(switchyard_worker::run_worker(
        config,
        Arc::new(engine),
        registry.clone(),
        shutdown.clone(),
        |addr| {
            let _ = ready.send(addr);
        },
    ));
    serving.await.context("the worker stopped before serving")?;
    Ok(Worker { registry, shutdown })
}

/// A router on its own thread and runtime: stopping it drops every one of its tasks, its
/// listener and its connections at once, as when the process is killed (a graceful stop
/// would wait for the open session, which never ends on its own).
struct Router {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    stopped: oneshot::Receiver<()>,
}

impl Router {
    async fn start(worker: &Worker, listen: SocketAddr) -> anyhow::Result<Self> {
        let registry = worker.registry.clone();
        let (ready, serving) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = oneshot::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("router runtime");
            runtime.block_on(async move {
                let config = RouterConfig {
                    listen,
                    ..Default::default()
                };
                // A router that fails to start drops `ready`, which the test reports.
                tokio::spawn(switchyard_router::run_router(
                    config,
                    registry,
                    CancellationToken::new(),
                    |addr| {
                        let _ = ready.send(addr);
                    },
                ));
                let _ = stop_rx.await;
            });
            drop(runtime);
            let _ = stopped_tx.send(());
        });
        let addr = serving.await.context("the router stopped before serving")?;
        Ok(Self {
            addr,
            stop,
            stopped,
        })
    }

    /// Stops the router and waits until its sockets are closed.
    async fn kill(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.stopped.await.context("the router thread panicked")
    }
}

/// Waits until the router can route to the worker (it learns of workers from the registry).
async fn wait_until_routable(channel: Channel) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(channel);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(models) = client.list_models(v1::ListModelsRequest {}).await
            && !switchyard_client::routable_worker_ids(&models.into_inner()).is_empty()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router did not see the worker within {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A worker, a router, and a client with a session to it.
async fn cluster() -> anyhow::Result<(Worker, Router, SessionClient)> {
    let worker = start_worker().await?;
    let router = Router::start(&worker, "127.0.0.1:0".parse()?).await?;
    let client = SessionClient::connect(&router.addr.to_string()).await?;
    wait_until_routable(client.channel()).await?;
    Ok((worker, router, client))
}

fn request(id: &str, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        messages: vec![user(prompt)],
        sampling: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        class: RequestClass::CostSensitive as i32,
        ..Default::default()
    }
}

fn user(content: &str) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content: content.into(),
        ..Default::default()
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, future)
        .await
        .with_context(|| format!("{what} took over {PATIENCE:?}"))
}

/// Reads `stream` until it has delivered at least `tokens` tokens.
async fn read_tokens(
    stream: &mut switchyard_client::RequestStream,
    completion: &mut Completion,
    tokens: usize,
) -> anyhow::Result<()> {
    while completion.token_ids.len() < tokens {
        let frame = within("a token", stream.next())
            .await?
            .context("the stream ended early")?;
        if let Frame::Failed(failed) = &frame {
            bail!("request failed: {failed:?}");
        }
        completion.absorb(frame);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_stream_and_collect_on_one_session() -> anyhow::Result<()> {
    let (_worker, _router, client) = cluster().await?;
    let (a, b) = ("alpha beta gamma", "one two");
    let first = client.start(request("a", a, 12))?;
    let second = client.start(request("b", b, 7))?;
    assert_eq!(first.request_id(), "a");
    // An id already open on the client is refused before it reaches the router.
    assert!(matches!(
        client.start(request("a", a, 1)),
        Err(ClientError::DuplicateRequest(id)) if id == "a"
    ));
    let (first, second) = within("both requests", async {
        tokio::join!(first.collect(), second.collect())
    })
    .await?;
    for (completion, prompt, tokens) in [(&first, a, 12), (&second, b, 7)] {
        assert!(completion.failed.is_none(), "{:?}", completion.failed);
        assert!(completion.accepted.is_some(), "no Accepted frame");
        assert_eq!(completion.text, synthetic_text(prompt, 0, tokens));
        let finished = completion.finished.as_ref().expect("a Finished frame");
        assert_eq!(finished.reason, FinishReason::Length as i32);
        let expected: Vec<u64> = (0..completion.seqs.len() as u64).collect();
        assert_eq!(completion.seqs, expected, "chunks in order, none missing");
    }
    // A finished request's id is free again.
    let again = within("a reused id", client.start(request("a", b, 2))?.collect()).await?;
    assert_eq!(again.text, synthetic_text(b, 0, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_request_mid_stream() -> anyhow::Result<()> {
    let (_worker, _router, client) = cluster().await?;
    let mut stream = client.start(request("long", "one two three", 4000))?;
    let mut completion = Completion::default();
    read_tokens(&mut stream, &mut completion, 3).await?;
    client.cancel("long")?;
    while let Some(frame) = within("the end after cancel", stream.next()).await? {
        completion.absorb(frame);
    }
    let finished = completion.finished.expect("a Finished frame after cancel");
    assert_eq!(finished.reason, FinishReason::Cancelled as i32);
    let produced = finished.usage.expect("usage").completion_tokens;
    assert!(
        produced < 4000,
        "generation stopped early, produced {produced}"
    );
    assert_eq!(produced as usize, completion.token_ids.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_continues_the_same_request_with_new_instructions() -> anyhow::Result<()> {
    let (_worker, _router, client) = cluster().await?;
    let (before, after, max_tokens) = ("alpha beta gamma", "delta epsilon", 60);
    let mut stream = client.start(request("steer", before, max_tokens))?;
    let mut completion = Completion::default();
    read_tokens(&mut stream, &mut completion, 4).await?;
    client.interrupt("steer", vec![user(after)], true)?;
    while let Some(frame) = within("the end after interrupt", stream.next()).await? {
        completion.absorb(frame);
    }
    let finished = completion
        .finished
        .as_ref()
        .expect("finished after the redirect");
    assert_eq!(finished.reason, FinishReason::Length as i32);
    let ids = &completion.token_ids;
    assert_eq!(
        ids.len(),
        max_tokens as usize,
        "max_tokens spans the redirect"
    );
    let switch = (0..ids.len())
        .find(|&i| ids[i] != synthetic_token(before, i).0)
        .expect("output changed after the interrupt");
    assert!(
        switch >= 4,
        "tokens delivered before the interrupt are kept"
    );
    assert_eq!(
        completion.text,
        format!(
            "{}{}",
            synthetic_text(before, 0, switch),
            synthetic_text(after, 0, ids.len() - switch)
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_session_fails_its_requests_and_is_reopened_when_the_router_is_back()
-> anyhow::Result<()> {
    let (worker, router, client) = cluster().await?;
    let before = within(
        "a request",
        client.start(request("before", "up", 3))?.collect(),
    )
    .await?;
    assert!(before.finished.is_some(), "{before:?}");

    // A request open when the router goes away ends with UNAVAILABLE.
    let mut open = client.start(request("open", "still running", 4000))?;
    let mut completion = Completion::default();
    read_tokens(&mut open, &mut completion, 1).await?;
    let addr = router.addr;
    router.kill().await?;
    while let Some(frame) = within("the open request's end", open.next()).await? {
        completion.absorb(frame);
    }
    let failed = completion.failed.expect("a Failed frame");
    assert_eq!(Code::from_i32(failed.code), Code::Unavailable, "{failed:?}");
    assert!(completion.finished.is_none());

    // No router: the client says so at once instead of losing the request.
    assert!(!client.is_connected());
    assert!(matches!(
        client.start(request("outage", "nobody home", 3)),
        Err(ClientError::Disconnected)
    ));

    // A router back on the same port: the same client opens a new session by itself.
    let _router = Router::start(&worker, addr).await?;
    within("the session to reopen", client.connected()).await?;
    assert!(client.is_connected());
    wait_until_routable(client.channel()).await?;
    let after = within(
        "a request after the restart",
        client.start(request("after", "back again", 5))?.collect(),
    )
    .await?;
    assert!(after.failed.is_none(), "{:?}", after.failed);
    assert_eq!(after.text, synthetic_text("back again", 0, 5));
    // The id of the request lost with the old session may be used again.
    let reused = within(
        "the lost id again",
        client.start(request("open", "x", 1))?.collect(),
    )
    .await?;
    assert!(reused.finished.is_some(), "{reused:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_client_lets_its_running_requests_finish() -> anyhow::Result<()> {
    let (_worker, _router, client) = cluster().await?;
    let stream = client.start(request("last", "finish me", 20))?;
    drop(client);
    // The session half-closes: the router finishes what is running, then ends it.
    let completion = within("the request", stream.collect()).await?;
    assert!(completion.failed.is_none(), "{:?}", completion.failed);
    assert_eq!(completion.text, synthetic_text("finish me", 0, 20));
    Ok(())
}
