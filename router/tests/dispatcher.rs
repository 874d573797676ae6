//! The dispatcher against misbehaving workers, in one process: a real router and real workers
//! on loopback over an in-memory registry, each worker running the scripted fault engine
//! (`switchyard_worker::fault`). Everything is driven through the router's public gRPC API, so
//! these tests hold whatever the router's insides look like.
//!
//! A worker that "dies" runs on its own runtime, which is dropped: its sockets close at once,
//! as when a process is killed (its registry record stays, as a lease would until it expired).

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_cluster::{MemoryRegistry, Pool, Registry};
use switchyard_policy::document::{LaneName, PolicyDocument};
use switchyard_proto::v1::{
    self, ChatMessage, FinishReason, GenerateRequest, RequestClass, SamplingParams, client_frame,
    inference_client::InferenceClient, server_frame::Frame,
};
use switchyard_router::RouterConfig;
use switchyard_worker::WorkerConfig;
use switchyard_worker::fault::{
    FAULT_TOOL, Fault, FaultEngine, FaultEvent, Plan, Script, fault_call, fault_embedding,
    fault_ids, fault_text,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "fault";
/// Longest any one step may take before the test fails (a debug build on a busy machine).
const PATIENCE: Duration = Duration::from_secs(30);

async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, step)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
}

/// A worker serving a fault engine on its own thread and runtime.
struct Worker {
    id: String,
    engine: Arc<FaultEngine>,
    kill: CancellationToken,
    /// Cancelled: the worker drains (as on SIGTERM) and then stops.
    drain: CancellationToken,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

async fn start_worker(
    registry: &Arc<MemoryRegistry>,
    id: &str,
    (pool, slots, prefill_tokens_per_s): (Pool, u32, f64),
    script: &Arc<Script>,
) -> Worker {
    let engine = Arc::new(
        FaultEngine::new(MODEL, slots, script.clone()).with_prefill_rate(prefill_tokens_per_s),
    );
    let kill = CancellationToken::new();
    let drain = CancellationToken::new();
    let config = WorkerConfig::loopback(id, pool);
    let (ready, serving) = oneshot::channel();
    let (registry, served, stop, died, draining) = (
        registry.clone(),
        engine.clone(),
        kill.clone(),
        engine.died(),
        drain.clone(),
    );
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("worker runtime");
        runtime.block_on(async move {
            tokio::spawn(switchyard_worker::run_worker(
                config,
                served,
                registry,
                draining,
                |addr| {
                    let _ = ready.send(addr);
                },
            ));
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = died.cancelled() => {}
            }
        });
        // Every task and socket of this worker goes at once, as with a killed process.
        drop(runtime);
    });
    within("worker start", serving)
        .await
        .expect("the worker stopped before serving");
    Worker {
        id: id.into(),
        engine,
        kill,
        drain,
    }
}

struct Cluster {
    workers: Vec<Worker>,
    script: Arc<Script>,
    router: SocketAddr,
    /// Cancelled: the router shuts down (as on SIGTERM).
    router_stop: CancellationToken,
    _router: DropGuard,
}

impl Cluster {
    /// `workers` workers of `slots` slots each sharing one script (default: plain generations),
    /// and a router with `config` (its listen address aside) and `policy` stored.
    async fn start(
        workers: usize,
        slots: u32,
        config: RouterConfig,
        policy: Option<PolicyDocument>,
    ) -> Self {
        Self::start_pools(&vec![(Pool::Gpu, slots); workers], config, policy).await
    }

    /// One worker per `(pool, slots)`, named `w0`, `w1`, …
    async fn start_pools(
        workers: &[(Pool, u32)],
        config: RouterConfig,
        policy: Option<PolicyDocument>,
    ) -> Self {
        let unreported: Vec<_> = workers
            .iter()
            .map(|&(pool, slots)| (pool, slots, 0.0))
            .collect();
        Self::start_reporting(&unreported, config, policy).await
    }

    /// One worker per `(pool, slots, prefill tokens/s it reports)`, named `w0`, `w1`, …
    async fn start_reporting(
        workers: &[(Pool, u32, f64)],
        config: RouterConfig,
        policy: Option<PolicyDocument>,
    ) -> Self {
        let registry = Arc::new(MemoryRegistry::new());
        if let Some(policy) = policy {
            registry
                .put_policy(policy.to_json().into_bytes(), None)
                .await
                .expect("store the policy");
        }
        let script = Script::new(Plan::default());
        let mut started = Vec::new();
        for (i, &worker) in workers.iter().enumerate() {
            started.push(start_worker(&registry, &format!("w{i}"), worker, &script).await);
        }
        let shutdown = CancellationToken::new();
        let (ready, serving) = oneshot::channel();
        let config = RouterConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            ..config
        };
        tokio::spawn(switchyard_router::run_router(
            config,
            registry,
            shutdown.clone(),
            |addr| {
                let _ = ready.send(addr);
            },
        ));
        let router = within("router start", serving)
            .await
            .expect("the router stopped before serving");
        let cluster = Self {
            workers: started,
            script,
            router,
            router_stop: shutdown.clone(),
            _router: shutdown.drop_guard(),
        };
        cluster.wait_until_routable(workers.len()).await;
        cluster
    }

    async fn channel(&self) -> Channel {
        within(
            "connect to the router",
            Channel::from_shared(format!("http://{}", self.router))
                .expect("uri")
                .connect(),
        )
        .await
        .expect("router reachable")
    }

    /// Waits until the router can place on `n` workers. The router tells no event for that, so
    /// this asks again until it says so.
    async fn wait_until_routable(&self, n: usize) {
        let client = InferenceClient::new(self.channel().await);
        common::eventually("workers routable", PATIENCE, || {
            let mut client = client.clone();
            async move {
                let Ok(models) = client.list_models(v1::ListModelsRequest {}).await else {
                    return false;
                };
                let workers: usize = models
                    .into_inner()
                    .models
                    .iter()
                    .filter(|m| m.id == MODEL)
                    .map(|m| m.workers.len())
                    .sum();
                workers == n
            }
        })
        .await;
    }

    async fn session(&self) -> Session {
        Session::open(self.channel().await).await
    }

    fn engine(&self, i: usize) -> &FaultEngine {
        &self.workers[i].engine
    }

    /// Every start the engines saw, as `(worker index, start)`.
    fn starts(&self) -> Vec<(usize, Start)> {
        self.workers
            .iter()
            .enumerate()
            .flat_map(|(i, w)| {
                w.engine
                    .events()
                    .into_iter()
                    .filter_map(Start::of)
                    .map(move |s| (i, s))
            })
            .collect()
    }
}

/// A start as an engine saw it.
#[derive(Debug, Clone)]
struct Start {
    request_id: String,
    messages: Vec<ChatMessage>,
    resume_tokens: Vec<u32>,
    latency_critical: bool,
    min_tokens_per_s: f64,
    max_tokens: u32,
    refused: bool,
}

impl Start {
    fn of(event: FaultEvent) -> Option<Self> {
        match event {
            FaultEvent::Start {
                request_id,
                messages,
                resume_tokens,
                latency_critical,
                min_tokens_per_s,
                max_tokens,
                refused,
            } => Some(Self {
                request_id,
                messages: messages
                    .into_iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content,
                        tool_calls: m.tool_calls,
                        tool_call_id: m.tool_call_id,
                    })
                    .collect(),
                resume_tokens,
                latency_critical,
                min_tokens_per_s,
                max_tokens,
                refused,
            }),
            _ => None,
        }
    }

    /// The last user message: what the fault engine generates from.
    fn instructions(&self) -> &str {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str())
    }
}

fn cancelled(events: &[FaultEvent], request_id: &str) -> bool {
    events
        .iter()
        .any(|e| matches!(e, FaultEvent::Cancelled { request_id: id } if id == request_id))
}

fn done_of(
    events: &[FaultEvent],
    request_id: &str,
) -> Option<(switchyard_worker::StopReason, usize)> {
    events.iter().find_map(|e| match e {
        FaultEvent::Done {
            request_id: id,
            reason,
            tokens,
        } if id == request_id => Some((*reason, *tokens)),
        _ => None,
    })
}

/// The engine-side start of the generation for `instructions` (its first, if several).
async fn start_on(engine: &FaultEngine, instructions: &str) -> Start {
    let events = within(
        &format!("the engine starts {instructions:?}"),
        engine.wait_until(|events| {
            events
                .iter()
                .cloned()
                .filter_map(Start::of)
                .any(|s| s.instructions() == instructions)
        }),
    )
    .await;
    events
        .into_iter()
        .filter_map(Start::of)
        .find(|s| s.instructions() == instructions)
        .expect("just seen")
}

fn request(id: &str, instructions: &str, max_tokens: u32, class: RequestClass) -> GenerateRequest {
    GenerateRequest {
        request_id: id.into(),
        model: MODEL.into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: instructions.into(),
            ..Default::default()
        }],
        sampling: Some(SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        class: class as i32,
        ..Default::default()
    }
}

/// One worker with one slot, under `policy`, the slot taken by request `h` of the returned
/// session (held after its first token until the engine is released).
async fn one_slot_taken(policy: PolicyDocument) -> (Cluster, Session) {
    let cluster = Cluster::start(1, 1, RouterConfig::default(), Some(policy)).await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    session.start(request("h", "hold", 5, RequestClass::CostSensitive));
    session.tokens("h", 1).await;
    (cluster, session)
}

/// What a client saw of one request.
#[derive(Debug, Default, Clone)]
struct Outcome {
    accepted: Vec<v1::Accepted>,
    text: String,
    ids: Vec<u32>,
    finished: Option<v1::Finished>,
    failed: Option<v1::Failed>,
    moved: Vec<v1::Moved>,
    rejected: Vec<v1::Rejected>,
}

impl Outcome {
    fn ended(&self) -> bool {
        self.finished.is_some() || self.failed.is_some()
    }

    fn reason(&self) -> FinishReason {
        let finished = self
            .finished
            .as_ref()
            .unwrap_or_else(|| panic!("not finished: {self:?}"));
        FinishReason::try_from(finished.reason).expect("known reason")
    }

    fn failure(&self) -> &v1::Failed {
        self.failed
            .as_ref()
            .unwrap_or_else(|| panic!("did not fail: {self:?}"))
    }
}

/// A client's `Inference.Session`, with what it saw of each request.
struct Session {
    frames: mpsc::UnboundedSender<v1::ClientFrame>,
    inbound: tonic::Streaming<v1::ServerFrame>,
    requests: HashMap<String, Outcome>,
}

impl Session {
    async fn open(channel: Channel) -> Self {
        let (frames, outbound) = mpsc::unbounded_channel();
        let inbound = within(
            "open a session",
            InferenceClient::new(channel).session(UnboundedReceiverStream::new(outbound)),
        )
        .await
        .expect("session opened")
        .into_inner();
        Self {
            frames,
            inbound,
            requests: HashMap::new(),
        }
    }

    fn send(&self, frame: client_frame::Frame) {
        self.frames
            .send(v1::ClientFrame { frame: Some(frame) })
            .expect("session open");
    }

    fn start(&self, request: GenerateRequest) {
        self.send(client_frame::Frame::Start(request));
    }

    fn cancel(&self, request_id: &str) {
        self.send(client_frame::Frame::Cancel(v1::Cancel {
            request_id: request_id.into(),
        }));
    }

    /// Reads frames until `done` holds of what was seen.
    async fn until(&mut self, what: &str, done: impl Fn(&HashMap<String, Outcome>) -> bool) {
        within(what, async {
            while !done(&self.requests) {
                let frame = self
                    .inbound
                    .message()
                    .await
                    .unwrap_or_else(|status| panic!("{what}: session failed: {status}"))
                    .unwrap_or_else(|| panic!("{what}: session ended"));
                let Some(frame) = frame.frame else { continue };
                let id = match &frame {
                    Frame::Accepted(v1::Accepted { request_id, .. })
                    | Frame::Tokens(v1::Tokens { request_id, .. })
                    | Frame::Finished(v1::Finished { request_id, .. })
                    | Frame::Failed(v1::Failed { request_id, .. })
                    | Frame::Moved(v1::Moved { request_id, .. })
                    | Frame::Rejected(v1::Rejected { request_id, .. }) => request_id.clone(),
                };
                let outcome = self.requests.entry(id).or_default();
                assert!(
                    !outcome.ended(),
                    "{what}: a frame after the end: {outcome:?}"
                );
                match frame {
                    Frame::Accepted(accepted) => outcome.accepted.push(accepted),
                    Frame::Tokens(tokens) => {
                        outcome.text.push_str(&tokens.text);
                        outcome.ids.extend(tokens.token_ids);
                    }
                    Frame::Finished(finished) => outcome.finished = Some(finished),
                    Frame::Failed(failed) => outcome.failed = Some(failed),
                    Frame::Moved(moved) => outcome.moved.push(moved),
                    Frame::Rejected(rejected) => outcome.rejected.push(rejected),
                }
            }
        })
        .await;
    }

    /// Reads frames until `request_id` has `n` tokens.
    async fn tokens(&mut self, request_id: &str, n: usize) -> Outcome {
        self.until(&format!("{n} tokens of {request_id}"), |r| {
            r.get(request_id)
                .is_some_and(|o| o.ids.len() >= n || o.ended())
        })
        .await;
        self.requests[request_id].clone()
    }

    /// Reads frames until `request_id` has ended.
    async fn end(&mut self, request_id: &str) -> Outcome {
        self.until(&format!("the end of {request_id}"), |r| {
            r.get(request_id).is_some_and(Outcome::ended)
        })
        .await;
        self.requests[request_id].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_mid_stream_ends_cancelled_and_stops_the_engine() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("count", [Plan::fault(Fault::HoldAfter(3))]);
    let mut session = cluster.session().await;
    session.start(request("c", "count", 1000, RequestClass::Auto));
    let seen = session.tokens("c", 3).await;
    assert_eq!(seen.text, fault_text("count", 0, 3));

    session.cancel("c");
    let end = session.end("c").await;
    assert_eq!(end.reason(), FinishReason::Cancelled, "{end:?}");
    assert_eq!(
        end.text,
        fault_text("count", 0, 3),
        "nothing after the hold"
    );

    let engine = cluster.engine(0);
    let start = start_on(engine, "count").await;
    let events = within(
        "the engine confirms the cancel",
        engine.wait_until(|e| done_of(e, &start.request_id).is_some()),
    )
    .await;
    assert!(cancelled(&events, &start.request_id), "{events:?}");
    assert_eq!(
        done_of(&events, &start.request_id),
        Some((switchyard_worker::StopReason::Cancelled, 3))
    );
}

/// A `Generate` call's `grpc-timeout` holds for its whole stream, not only until the first
/// frame: at the deadline the call ends `DEADLINE_EXCEEDED` and the generation stops on its
/// worker, whether or not the client enforces the deadline itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_deadline_ends_the_stream_and_stops_the_generation() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("slow", [Plan::fault(Fault::HoldAfter(2))]);
    let mut client = InferenceClient::new(cluster.channel().await);
    let mut call = tonic::Request::new(request("t", "slow", 100, RequestClass::Auto));
    call.set_timeout(Duration::from_millis(400));
    let asked = Instant::now();
    let stream = within("generate", client.generate(call))
        .await
        .expect("accepted")
        .into_inner();
    ends_at_its_deadline(&cluster, stream, asked).await;
}

/// Reads a call's frames to their end: it must end `DEADLINE_EXCEEDED`, no sooner than its
/// 400 ms deadline after `asked`, and its generation of script "slow" must stop on the engine.
async fn ends_at_its_deadline(
    cluster: &Cluster,
    mut frames: tonic::Streaming<v1::ServerFrame>,
    asked: Instant,
) {
    let status = loop {
        match within("the deadline", frames.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the call ended OK past its deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        asked.elapsed() >= Duration::from_millis(400),
        "{:?}",
        asked.elapsed()
    );
    let engine = cluster.engine(0);
    let start = start_on(engine, "slow").await;
    let events = within(
        "the engine sees the cancel",
        engine.wait_until(|e| done_of(e, &start.request_id).is_some()),
    )
    .await;
    assert!(cancelled(&events, &start.request_id), "{events:?}");
}

/// A `Generate` call whose deadline passes while it waits at the router for a slot (before its
/// first frame) ends `DEADLINE_EXCEEDED` from the router, as one past its first frame does,
/// whether or not the client enforces the deadline itself (here it does not: the header is
/// set by hand). Tonic's own server timer for the same `grpc-timeout` answers `CANCELLED`,
/// which a client reads as its own doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_deadline_that_passes_while_waiting_for_a_slot_is_deadline_exceeded() {
    let (cluster, mut session) = one_slot_taken(PolicyDocument::default()).await;
    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://{}", cluster.router).parse().expect("uri");
    let mut client = InferenceClient::with_origin(http2, origin);
    // Several calls: the router's wait and tonic's timer end within a millisecond of each other.
    for i in 0..5 {
        let mut call = tonic::Request::new(request(
            &format!("late-{i}"),
            "late",
            3,
            RequestClass::CostSensitive,
        ));
        call.metadata_mut()
            .insert("grpc-timeout", "150m".parse().expect("ascii"));
        let asked = Instant::now();
        let status = within("generate", client.generate(call))
            .await
            .expect_err("no slot frees before the deadline");
        assert_eq!(
            status.code(),
            Code::DeadlineExceeded,
            "call {i}: {status:?}"
        );
        assert!(
            asked.elapsed() >= Duration::from_millis(140),
            "call {i} ended early: {:?}",
            asked.elapsed()
        );
    }
    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);
}

/// A `Session` call's `grpc-timeout` holds as a `Generate` call's does: at the deadline the
/// call ends `DEADLINE_EXCEEDED` and its running generations stop on their worker, whether or
/// not the client enforces the deadline itself (a raw HTTP/2 client, tonic's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_deadline_ends_the_session_and_stops_its_generations() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("slow", [Plan::fault(Fault::HoldAfter(2))]);
    let (frames, outbound) = mpsc::unbounded_channel();
    frames
        .send(v1::ClientFrame {
            frame: Some(client_frame::Frame::Start(request(
                "t",
                "slow",
                100,
                RequestClass::Auto,
            ))),
        })
        .expect("session open");
    let mut call = tonic::Request::new(UnboundedReceiverStream::new(outbound));
    call.set_timeout(Duration::from_millis(400));
    let asked = Instant::now();
    let mut client = InferenceClient::new(cluster.channel().await);
    let inbound = within("open a session", client.session(call))
        .await
        .expect("session opened")
        .into_inner();
    ends_at_its_deadline(&cluster, inbound, asked).await;
    drop(frames);
}

/// A `grpc-timeout` longer than the 8 digits the gRPC spec allows is no deadline (as tonic
/// reads it): the call is served. Read as one, it overflowed the clock and the handler
/// panicked, resetting the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_spec_grpc_timeout_is_ignored() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    let mut client = InferenceClient::new(cluster.channel().await);
    for timeout in ["18446744073709551615S", "99999999999999999H"] {
        let mut call = tonic::Request::new(request("t", "fine", 3, RequestClass::Auto));
        call.metadata_mut()
            .insert("grpc-timeout", timeout.parse().expect("ascii"));
        let mut stream = within("generate", client.generate(call))
            .await
            .unwrap_or_else(|status| panic!("{timeout}: {status:?}"))
            .into_inner();
        let mut last = None;
        while let Some(frame) = within("a frame", stream.message())
            .await
            .unwrap_or_else(|status| panic!("{timeout}: {status:?}"))
        {
            last = frame.frame;
        }
        assert!(
            matches!(last, Some(Frame::Finished(_))),
            "{timeout}: {last:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_stops_the_generation() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("abandoned", [Plan::fault(Fault::HoldAfter(2))]);
    let mut client = InferenceClient::new(cluster.channel().await);
    let mut stream = within(
        "generate",
        client.generate(request("g", "abandoned", 1000, RequestClass::Auto)),
    )
    .await
    .expect("generate accepted")
    .into_inner();
    let mut tokens = 0;
    while tokens < 2 {
        let frame = within("a frame", stream.message())
            .await
            .expect("stream ok")
            .expect("not ended");
        if let Some(Frame::Tokens(t)) = frame.frame {
            tokens += t.token_ids.len();
        }
    }
    drop(stream);
    drop(client);

    let engine = cluster.engine(0);
    let start = start_on(engine, "abandoned").await;
    let events = within(
        "the engine is cancelled",
        engine.wait_until(|e| cancelled(e, &start.request_id)),
    )
    .await;
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, FaultEvent::Done { reason, .. } if *reason != switchyard_worker::StopReason::Cancelled)),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_goes_away_stops_all_its_generations() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster.script.set_default(Plan::fault(Fault::HoldAfter(1)));
    let mut session = cluster.session().await;
    session.start(request("a", "one", 100, RequestClass::Auto));
    session.start(request("b", "two", 100, RequestClass::Auto));
    session.tokens("a", 1).await;
    session.tokens("b", 1).await;
    drop(session);

    let engine = cluster.engine(0);
    let (one, two) = (start_on(engine, "one").await, start_on(engine, "two").await);
    within(
        "both generations are cancelled",
        engine.wait_until(|e| cancelled(e, &one.request_id) && cancelled(e, &two.request_id)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_engine_never_confirms_ends_within_the_grace() {
    let grace = Duration::from_millis(300);
    let config = RouterConfig {
        cancel_grace: grace,
        ..RouterConfig::default()
    };
    let cluster = Cluster::start(1, 4, config, None).await;
    cluster.script.set(
        "stubborn",
        [Plan::fault(Fault::IgnoreCancel).paced(Duration::from_millis(20))],
    );
    let mut session = cluster.session().await;
    session.start(request("s", "stubborn", 4000, RequestClass::Auto));
    session.tokens("s", 2).await;

    let asked = Instant::now();
    session.cancel("s");
    let end = session.end("s").await;
    let waited = asked.elapsed();
    assert_eq!(end.reason(), FinishReason::Cancelled, "{end:?}");
    // Unconfirmed, the generation would run for 4000 × 20 ms.
    assert!(
        waited < grace + Duration::from_secs(3),
        "the end took {waited:?} with a cancel grace of {grace:?}"
    );

    let engine = cluster.engine(0);
    let start = start_on(engine, "stubborn").await;
    let events = within(
        "the engine saw the cancel",
        engine.wait_until(|e| cancelled(e, &start.request_id)),
    )
    .await;
    assert_eq!(done_of(&events, &start.request_id), None, "never confirmed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_continues_with_the_new_messages() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("first", [Plan::fault(Fault::HoldAfter(3))]);
    let mut session = cluster.session().await;
    session.start(request("i", "first", 20, RequestClass::Auto));
    session.tokens("i", 3).await;

    session.send(client_frame::Frame::Interrupt(v1::Interrupt {
        request_id: "i".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "second".into(),
            ..Default::default()
        }],
        keep_generated: true,
    }));
    let end = session.end("i").await;
    assert!(end.finished.is_some(), "{end:?}");

    let engine = cluster.engine(0);
    let first = start_on(engine, "first").await;
    let second = start_on(engine, "second").await;
    assert!(cancelled(&engine.events(), &first.request_id));
    let before = fault_text("first", 0, 3);
    assert_eq!(
        second.messages,
        vec![
            ChatMessage {
                role: "user".into(),
                content: "first".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                content: before.clone(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: "second".into(),
                ..Default::default()
            },
        ],
        "the continuation starts with the conversation so far and the new message"
    );
    let resumed = second.resume_tokens.len();
    let after = fault_text("second", resumed, second.max_tokens as usize - resumed);
    assert_eq!(end.text, format!("{before}{after}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_keeping_the_generation_keeps_its_tool_calls() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "look it up",
        [Plan::fault(Fault::CallThenHold(2)), Plan::default()],
    );
    let mut session = cluster.session().await;
    let mut asked = request("c", "look it up", 20, RequestClass::Auto);
    asked.tools = vec![v1::Tool {
        name: FAULT_TOOL.into(),
        ..Default::default()
    }];
    session.start(asked);
    // Two tokens of text, then the one that spelt the call.
    session.tokens("c", 3).await;
    let call = fault_call(2);
    let result = ChatMessage {
        role: "tool".into(),
        content: "found".into(),
        tool_call_id: call.id.clone(),
        ..Default::default()
    };
    session.send(client_frame::Frame::Interrupt(v1::Interrupt {
        request_id: "c".into(),
        messages: vec![result.clone()],
        keep_generated: true,
    }));
    let end = session.end("c").await;
    assert!(end.finished.is_some(), "{end:?}");

    let engine = cluster.engine(0);
    let starts: Vec<Start> = within(
        "the continuation starts",
        engine.wait_until(|events| events.iter().cloned().filter_map(Start::of).count() == 2),
    )
    .await
    .into_iter()
    .filter_map(Start::of)
    .collect();
    assert_eq!(
        starts[1].messages,
        vec![
            ChatMessage {
                role: "user".into(),
                content: "look it up".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                content: fault_text("look it up", 0, 2),
                tool_calls: vec![call],
                ..Default::default()
            },
            result,
        ],
        "the call the client saw is in the conversation its result answers"
    );
}

/// Chunks a worker sent faster than the router forwards them go on as one frame, and a chunk's
/// tool-call pieces go with it (found from outside: under load, a streamed call's arguments
/// lost a piece).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_call_pieces_reaches_the_client_whole() {
    const CALLS: usize = 2_000;
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "burst",
        [Plan::fault(Fault::CallEach).paced(Duration::ZERO)],
    );
    // A client whose HTTP/2 window holds a few frames: the router stops forwarding almost at
    // once, and the worker's chunks queue at the router until its credit runs out.
    let channel = within(
        "connect to the router",
        Channel::from_shared(format!("http://{}", cluster.router))
            .expect("uri")
            .initial_stream_window_size(1024)
            .connect(),
    )
    .await
    .expect("router reachable");
    let mut client = InferenceClient::new(channel);
    let mut asked = request("b", "burst", CALLS as u32, RequestClass::Auto);
    asked.tools = vec![v1::Tool {
        name: FAULT_TOOL.into(),
        ..Default::default()
    }];
    let mut stream = within("generate", client.generate(asked))
        .await
        .expect("accepted")
        .into_inner();
    let engine = cluster.engine(0);
    within(
        "the worker runs out of credit",
        engine.wait_until(|events| {
            events
                .iter()
                .any(|e| matches!(e, FaultEvent::Blocked { .. }))
        }),
    )
    .await;
    let mut calls = Vec::new();
    let mut ids = 0;
    let finished = loop {
        let frame = within("a frame", stream.message())
            .await
            .expect("stream ok")
            .expect("not ended before its end");
        match frame.frame {
            Some(Frame::Tokens(t)) => {
                ids += t.token_ids.len();
                switchyard_proto::assemble_tool_calls(&mut calls, &t.tool_calls);
            }
            Some(Frame::Finished(f)) => break f,
            Some(Frame::Failed(f)) => panic!("failed: {f:?}"),
            _ => {}
        }
    };
    assert_eq!(finished.reason, FinishReason::Length as i32, "{finished:?}");
    assert_eq!(ids, CALLS);
    assert_eq!(calls.len(), CALLS);
    let lost: Vec<usize> = (0..CALLS).filter(|&i| calls[i] != fault_call(i)).collect();
    assert!(
        lost.is_empty(),
        "{} calls lost or garbled, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(8)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_message_reaches_the_worker_as_system_instructions() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("ask", [Plan::fault(Fault::HoldAfter(2))]);
    let message = |role: &str, content: &str| ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    };
    let mut session = cluster.session().await;
    let mut asked = request("d", "ask", 20, RequestClass::Auto);
    asked.messages.insert(0, message("developer", "be brief"));
    session.start(asked);
    session.tokens("d", 2).await;
    session.send(client_frame::Frame::Interrupt(v1::Interrupt {
        request_id: "d".into(),
        messages: vec![message("developer", "briefer"), message("user", "again")],
        keep_generated: false,
    }));
    assert!(session.end("d").await.finished.is_some());

    let engine = cluster.engine(0);
    let first = start_on(engine, "ask").await;
    assert_eq!(first.messages[0], message("system", "be brief"));
    let second = start_on(engine, "again").await;
    assert!(
        second.messages.contains(&message("system", "briefer")),
        "{:?}",
        second.messages
    );
    assert!(
        engine
            .events()
            .into_iter()
            .filter_map(Start::of)
            .all(|s| s.messages.iter().all(|m| m.role != "developer")),
        "no worker ever sees the role `developer`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_the_router_refuses_leave_the_running_request_alone() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("running", [Plan::fault(Fault::HoldAfter(2))]);
    let mut session = cluster.session().await;
    session.start(request("a", "running", 100, RequestClass::Auto));
    session.tokens("a", 2).await;

    // A second start under the running request's id, an interrupt with a bad role for it, and
    // a cancel of a request that does not exist.
    session.start(request("a", "other", 5, RequestClass::Auto));
    session.send(client_frame::Frame::Interrupt(v1::Interrupt {
        request_id: "a".into(),
        messages: vec![ChatMessage {
            role: "bot".into(),
            content: "x".into(),
            ..Default::default()
        }],
        keep_generated: true,
    }));
    session.cancel("nobody");
    session.start(request("", "anonymous", 5, RequestClass::Auto));
    // A cancel naming no request at all, and one whose id no request could have: invalid
    // whatever runs, as an interrupt with such an id is.
    session.cancel("");
    let oversized = "x".repeat(1000);
    session.cancel(&oversized);
    session
        .until("six refusals", |r| {
            r.get("a").is_some_and(|o| o.rejected.len() == 2)
                && r.get("nobody").is_some_and(|o| !o.rejected.is_empty())
                && r.get("").is_some_and(|o| o.rejected.len() == 2)
                && r.get(&oversized).is_some_and(|o| !o.rejected.is_empty())
        })
        .await;
    let refusals = |id: &str| -> Vec<(String, tonic::Code, String)> {
        session.requests[id]
            .rejected
            .iter()
            .map(|r| {
                (
                    r.frame.clone(),
                    tonic::Code::from_i32(r.code),
                    r.field.clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        refusals("a"),
        [
            (
                "start".into(),
                tonic::Code::InvalidArgument,
                "request_id".into()
            ),
            (
                "interrupt".into(),
                tonic::Code::InvalidArgument,
                "interrupt.messages[0].role".into()
            ),
        ]
    );
    assert_eq!(
        refusals("nobody"),
        [("cancel".into(), tonic::Code::NotFound, "request_id".into())]
    );
    assert_eq!(
        refusals(""),
        [
            (
                "start".into(),
                tonic::Code::InvalidArgument,
                "request_id".into()
            ),
            (
                "cancel".into(),
                tonic::Code::InvalidArgument,
                "request_id".into()
            ),
        ]
    );
    assert_eq!(
        refusals(&oversized),
        [(
            "cancel".into(),
            tonic::Code::InvalidArgument,
            "request_id".into()
        )]
    );
    let message = &session.requests[&oversized].rejected[0].message;
    assert!(
        message.contains("the limit is 128") && !message.contains(&oversized),
        "{message}"
    );

    // "a" went on: it has neither failed nor been restarted, and ends when it is cancelled.
    session.cancel("a");
    let end = session.end("a").await;
    assert_eq!(end.reason(), FinishReason::Cancelled, "{end:?}");
    assert!(end.failed.is_none(), "{end:?}");
    assert_eq!(end.accepted.len(), 1, "{end:?}");
    assert!(
        !cluster
            .starts()
            .iter()
            .any(|(_, s)| s.messages.iter().any(|m| m.content == "other")),
        "the refused start never reached a worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_a_worker_dies_loses_and_repeats_no_token() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "story",
        [
            Plan::fault(Fault::DieAfter(5)).paced(Duration::from_millis(5)),
            Plan::default(),
        ],
    );
    let mut session = cluster.session().await;
    session.start(request("f", "story", 30, RequestClass::Auto));
    let end = session.end("f").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("story", 0, 30));
    assert_eq!(end.ids, fault_ids("story", 0, 30));

    let starts = cluster.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let died = starts
        .iter()
        .position(|(w, _)| {
            cluster
                .engine(*w)
                .events()
                .iter()
                .any(|e| matches!(e, FaultEvent::Died { .. }))
        })
        .expect("one worker died");
    let (dead, _) = &starts[died];
    let (survivor, resumed) = &starts[1 - died];
    assert_ne!(dead, survivor, "failed over to another worker");
    assert_eq!(
        end.accepted.first().map(|a| a.worker_id.as_str()),
        Some(cluster.workers[*dead].id.as_str()),
        "the client was told where it started"
    );
    let finished = end.finished.as_ref().expect("finished");
    assert_eq!(
        (finished.worker_id.as_str(), finished.pool.as_str()),
        (cluster.workers[*survivor].id.as_str(), "gpu"),
        "and where it ended"
    );
    let k = resumed.resume_tokens.len();
    assert!(k <= 5, "{k} tokens resumed, the dead worker made 5");
    assert_eq!(resumed.resume_tokens, fault_ids("story", 0, k));
    // What the client saw of the dead worker is exactly what the survivor was told.
    let events = cluster.engine(*survivor).events();
    assert_eq!(
        done_of(&events, &resumed.request_id),
        Some((switchyard_worker::StopReason::Length, 30 - k))
    );
}

/// A worker that passes on several tokens as one piece (a gateway whose upstream sent a
/// character spelt by two byte tokens in one chunk) is believed on how many it made: the
/// usage counts tokens, not the pieces the client received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_the_tokens_a_worker_made_not_the_pieces_it_sent() {
    let cluster = Cluster::start(1, 4, RouterConfig::default(), None).await;
    cluster.script.set("pairs", [Plan::fault(Fault::Packed(2))]);
    let mut session = cluster.session().await;
    session.start(request("p", "pairs", 7, RequestClass::Auto));
    let end = session.end("p").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("pairs", 0, 7));
    assert_eq!(end.ids.len(), 4, "seven tokens in four pieces: {end:?}");
    let usage = end.finished.as_ref().and_then(|f| f.usage).expect("usage");
    assert_eq!(usage.completion_tokens, 7, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_worker_dies_the_client_gets_unavailable_after_what_it_saw() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "doomed",
        [Plan::fault(Fault::DieAfter(3)).paced(Duration::from_millis(5))],
    );
    let mut session = cluster.session().await;
    session.start(request("d", "doomed", 30, RequestClass::Auto));
    let end = session.end("d").await;
    let failed = end.failure();
    assert_eq!(Code::from_i32(failed.code), Code::Unavailable, "{failed:?}");
    let seen = end.ids.len();
    assert!(seen <= 6, "two workers made 3 tokens each: {end:?}");
    assert_eq!(
        end.text,
        fault_text("doomed", 0, seen),
        "no token lost or repeated"
    );
    let starts = cluster.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_ne!(starts[0].0, starts[1].0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_before_the_first_token_starts_over_elsewhere() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set("early", [Plan::fault(Fault::DieAfter(0)), Plan::default()]);
    let mut session = cluster.session().await;
    session.start(request("e", "early", 10, RequestClass::Auto));
    let end = session.end("e").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("early", 0, 10));
    let starts = cluster.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_ne!(starts[0].0, starts[1].0, "failed over to another worker");
    assert!(
        starts.iter().all(|(_, s)| s.resume_tokens.is_empty()),
        "nothing to resume: {starts:?}"
    );
}

/// An embedding whose worker dies before answering is embedded again on another worker: the
/// client gets one `Finished` with the vector, and no tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_whose_worker_dies_is_answered_by_another() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "index me",
        [Plan::fault(Fault::DieAfter(0)), Plan::default()],
    );
    let mut session = cluster.session().await;
    session.start(GenerateRequest {
        request_id: "v".into(),
        model: MODEL.into(),
        prompt: "index me".into(),
        embed: true,
        ..Default::default()
    });
    let end = session.end("v").await;
    assert_eq!(end.reason(), FinishReason::Stop, "{end:?}");
    assert!(end.ids.is_empty() && end.text.is_empty(), "{end:?}");
    let finished = end.finished.as_ref().expect("finished");
    assert_eq!(finished.embedding, fault_embedding("index me"));
    let timings = finished.timings.expect("timings");
    assert!(
        timings.ttft_ms > 0.0 && timings.ttft_ms <= timings.total_ms,
        "the vector is the first answer: {timings:?}"
    );
    let starts = cluster.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_ne!(starts[0].0, starts[1].0, "failed over to another worker");
    assert_eq!(
        end.accepted.first().map(|a| a.lane),
        Some(v1::Lane::CostSensitive as i32),
        "an embedding left to the router is cost-sensitive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_generation_is_waited_for_not_failed_over() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "slow",
        [Plan::fault(Fault::StallAfter(
            2,
            Duration::from_millis(400),
        ))],
    );
    let mut session = cluster.session().await;
    session.start(request("s", "slow", 10, RequestClass::Auto));
    let end = session.end("s").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("slow", 0, 10));
    let starts = cluster.starts();
    assert_eq!(starts.len(), 1, "a stall is not a failure: {starts:?}");
    let (worker, start) = &starts[0];
    assert!(!cancelled(
        &cluster.engine(*worker).events(),
        &start.request_id
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_on_every_worker_is_shed_with_retry_after() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set_default(Plan::fault(Fault::Refuse(Code::ResourceExhausted)));
    let mut session = cluster.session().await;
    session.start(request("x", "full", 10, RequestClass::CostSensitive));
    let end = session.end("x").await;
    let failed = end.failure();
    assert_eq!(
        Code::from_i32(failed.code),
        Code::ResourceExhausted,
        "{failed:?}"
    );
    let policy = PolicyDocument::default();
    assert_eq!(
        u64::from(failed.retry_after_ms),
        policy.cost_sensitive.retry_after_ms
    );
    let starts = cluster.starts();
    for w in 0..2 {
        assert!(
            starts.iter().any(|(i, s)| *i == w && s.refused),
            "worker {w} was asked: {starts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unavailable_on_one_worker_is_placed_on_another() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster.script.set(
        "elsewhere",
        [
            Plan::fault(Fault::Refuse(Code::Unavailable)),
            Plan::default(),
        ],
    );
    let mut session = cluster.session().await;
    session.start(request("u", "elsewhere", 10, RequestClass::Auto));
    let end = session.end("u").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("elsewhere", 0, 10));
    let starts = cluster.starts();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let refused: Vec<_> = starts.iter().filter(|(_, s)| s.refused).collect();
    let served: Vec<_> = starts.iter().filter(|(_, s)| !s.refused).collect();
    assert_eq!((refused.len(), served.len()), (1, 1), "{starts:?}");
    assert_ne!(refused[0].0, served[0].0, "placed on another worker");
    assert!(served[0].1.resume_tokens.is_empty());
}

/// Clients set to compress what they send (gzip or deflate, as grpcio's `compression=`
/// does) are served like any other, on both calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_requests_are_served() {
    use tonic::codec::CompressionEncoding;
    let cluster = Cluster::start(1, 2, RouterConfig::default(), None).await;
    for encoding in [CompressionEncoding::Gzip, CompressionEncoding::Deflate] {
        let mut client = InferenceClient::new(cluster.channel().await).send_compressed(encoding);
        let mut stream = within(
            "a compressed Generate",
            client.generate(request("g", "squeezed", 3, RequestClass::Auto)),
        )
        .await
        .unwrap_or_else(|status| panic!("{encoding:?}: {status:?}"))
        .into_inner();
        let mut text = String::new();
        while let Some(frame) = within("a frame", stream.message()).await.expect("frames") {
            if let Some(Frame::Tokens(tokens)) = frame.frame {
                text.push_str(&tokens.text);
            }
        }
        assert_eq!(text, fault_text("squeezed", 0, 3), "{encoding:?}");

        let (frames, outbound) = mpsc::unbounded_channel();
        let mut inbound = within(
            "a compressed Session",
            client.session(UnboundedReceiverStream::new(outbound)),
        )
        .await
        .expect("session opened")
        .into_inner();
        frames
            .send(v1::ClientFrame {
                frame: Some(client_frame::Frame::Start(request(
                    "s",
                    "squeezed",
                    3,
                    RequestClass::Auto,
                ))),
            })
            .expect("session open");
        let finished = loop {
            match within("a frame", inbound.message()).await {
                Ok(Some(v1::ServerFrame {
                    frame: Some(Frame::Finished(finished)),
                })) => break finished,
                Ok(Some(_)) => continue,
                other => panic!("{encoding:?}: {other:?}"),
            }
        };
        assert_eq!(finished.reason, FinishReason::Length as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_from_the_engine_reaches_the_client() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), None).await;
    cluster
        .script
        .set_default(Plan::fault(Fault::Refuse(Code::InvalidArgument)));
    let mut session = cluster.session().await;
    session.start(request("v", "malformed", 10, RequestClass::Auto));
    let end = session.end("v").await;
    let failed = end.failure();
    assert_eq!(
        Code::from_i32(failed.code),
        Code::InvalidArgument,
        "{failed:?}"
    );
    assert!(
        failed.message.contains("fault engine refuses"),
        "the engine's message: {failed:?}"
    );
    assert_eq!(cluster.starts().len(), 1, "not retried elsewhere");
}

/// Requests arriving while the one slot of the only worker is held, in this order.
const WAITING: [(&str, RequestClass); 5] = [
    ("c1", RequestClass::CostSensitive),
    ("c2", RequestClass::CostSensitive),
    ("l1", RequestClass::LatencyCritical),
    ("c3", RequestClass::CostSensitive),
    ("l2", RequestClass::LatencyCritical),
];

/// Holds the only slot, queues [`WAITING`] behind it at the router, lets the slot go, and
/// returns the order the worker started them in (after `hold`), each having finished.
async fn order_of_waiting_requests() -> Vec<String> {
    let cluster = Cluster::start(1, 1, RouterConfig::default(), None).await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    session.start(request("h", "hold", 5, RequestClass::CostSensitive));
    session.tokens("h", 1).await;

    for (id, class) in WAITING {
        session.start(request(id, id, 3, class));
    }
    // The session handles its frames in order: the answer to this cancel of nothing comes
    // after every start above is waiting at the router.
    session.cancel("probe");
    session
        .until("the probe's answer", |r| r.contains_key("probe"))
        .await;
    assert!(
        WAITING
            .iter()
            .all(|(id, _)| !session.requests.contains_key(*id)),
        "nothing placed while the slot is held: {:?}",
        session.requests
    );

    cluster.engine(0).release();
    let holder = session.end("h").await;
    assert_eq!(holder.reason(), FinishReason::Length);
    // Placed at once: it never waited for a slot, however long its task took to start.
    assert_eq!(queue_ms(&holder), 0.0, "{holder:?}");
    for (id, _) in WAITING {
        let end = session.end(id).await;
        assert_eq!(end.reason(), FinishReason::Length, "{id}: {end:?}");
        assert_eq!(end.text, fault_text(id, 0, 3));
        let timings = end
            .finished
            .as_ref()
            .and_then(|f| f.timings)
            .expect("timings");
        assert!(timings.queue_ms > 0.0, "{id} waited: {timings:?}");
    }
    let starts = cluster.starts();
    let policy = PolicyDocument::default();
    for (_, start) in &starts {
        let lane = if start.instructions().starts_with('l') {
            LaneName::LatencyCritical
        } else {
            LaneName::CostSensitive
        };
        assert_eq!(
            start.latency_critical,
            lane == LaneName::LatencyCritical,
            "the worker is told the lane: {start:?}"
        );
        assert_eq!(
            start.min_tokens_per_s,
            policy.lane(lane).min_tokens_per_s,
            "and the decode rate the lane promises: {start:?}"
        );
    }
    let order: Vec<String> = starts
        .iter()
        .map(|(_, s)| s.instructions().to_string())
        .collect();
    assert_eq!(order.first().map(String::as_str), Some("hold"), "{order:?}");
    order[1..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_latency_critical_requests_run_before_cost_sensitive_ones() {
    let order = order_of_waiting_requests().await;
    let lanes: Vec<char> = order.iter().filter_map(|id| id.chars().next()).collect();
    assert_eq!(lanes, ['l', 'l', 'c', 'c', 'c'], "{order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_run_in_arrival_order_within_their_lane() {
    let order = order_of_waiting_requests().await;
    assert_eq!(order, ["l1", "l2", "c1", "c2", "c3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_past_its_lanes_queue_wait_is_shed() {
    let mut policy = PolicyDocument::default();
    policy.latency_critical.max_queue_wait_ms = 300.0;
    policy.latency_critical.retry_after_ms = 700;
    let (cluster, mut session) = one_slot_taken(policy).await;

    let asked = Instant::now();
    session.start(request("late", "late", 3, RequestClass::LatencyCritical));
    let end = session.end("late").await;
    let waited = asked.elapsed();
    let failed = end.failure();
    assert_eq!(
        Code::from_i32(failed.code),
        Code::ResourceExhausted,
        "{failed:?}"
    );
    assert_eq!(failed.retry_after_ms, 700);
    assert!(
        waited >= Duration::from_millis(300),
        "shed after {waited:?}, before its queue wait ran out"
    );
    assert!(end.accepted.is_empty(), "never placed: {end:?}");

    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);
    assert!(
        cluster
            .starts()
            .iter()
            .all(|(_, s)| s.instructions() != "late"),
        "the shed request never reached a worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_waiting_at_the_router_ends_the_request_there() {
    let cluster = Cluster::start(1, 1, RouterConfig::default(), None).await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    session.start(request("h", "hold", 5, RequestClass::CostSensitive));
    session.tokens("h", 1).await;

    session.start(request("q", "queued", 3, RequestClass::CostSensitive));
    session.cancel("q");
    // The slot stays held: the cancel alone must end the waiting request.
    let end = session.end("q").await;
    let cancelled = end
        .finished
        .as_ref()
        .is_some_and(|f| f.reason == FinishReason::Cancelled as i32)
        || end
            .failed
            .as_ref()
            .is_some_and(|f| Code::from_i32(f.code) == Code::Cancelled);
    assert!(cancelled, "{end:?}");
    assert!(end.accepted.is_empty(), "never placed: {end:?}");

    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);
    assert!(
        cluster
            .starts()
            .iter()
            .all(|(_, s)| s.instructions() != "queued"),
        "a cancelled request never reaches a worker"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_while_waiting_at_the_router_becomes_the_prompt_it_starts_with() {
    let cluster = Cluster::start(1, 1, RouterConfig::default(), None).await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    session.start(request("h", "hold", 5, RequestClass::CostSensitive));
    session.tokens("h", 1).await;

    session.start(request("q", "old", 3, RequestClass::CostSensitive));
    session.send(client_frame::Frame::Interrupt(v1::Interrupt {
        request_id: "q".into(),
        messages: vec![ChatMessage {
            role: "user".into(),
            content: "new".into(),
            ..Default::default()
        }],
        keep_generated: true,
    }));
    // The session answers frames in order: once it has refused a cancel of an unknown
    // request, it has handed the interrupt to the waiting request.
    session.cancel("nobody");
    session
        .until("the cancel of nobody is refused", |r| {
            r.get("nobody").is_some_and(|o| !o.rejected.is_empty())
        })
        .await;
    // Nothing was generated yet: the interrupt only rewrites what the request will start with.
    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);
    let end = session.end("q").await;
    assert!(end.finished.is_some(), "{end:?}");
    let started = start_on(cluster.engine(0), "new").await;
    assert_eq!(
        started.messages,
        vec![
            ChatMessage {
                role: "user".into(),
                content: "old".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "user".into(),
                content: "new".into(),
                ..Default::default()
            },
        ]
    );
    assert!(
        cluster
            .starts()
            .iter()
            .all(|(_, s)| s.instructions() != "old"),
        "the request starts once, with the interrupt applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_on_a_full_lane_is_refused_with_retry_after_metadata() {
    let mut policy = PolicyDocument::default();
    policy.cost_sensitive.max_queue = 0;
    policy.cost_sensitive.retry_after_ms = 1_500;
    let (cluster, mut session) = one_slot_taken(policy).await;

    let mut client = InferenceClient::new(cluster.channel().await);
    let status = within(
        "generate",
        client.generate(request("g", "turned away", 3, RequestClass::CostSensitive)),
    )
    .await
    .expect_err("no slot and no room to wait");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.metadata().get("retry-after"),
        Some(&"2".parse().expect("ascii")),
        "{status:?}"
    );
    assert_eq!(
        status.metadata().get("retry-after-ms"),
        Some(&"1500".parse().expect("ascii")),
        "{status:?}"
    );

    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);
    assert!(
        cluster
            .starts()
            .iter()
            .all(|(_, s)| s.instructions() != "turned away")
    );
}

/// The status a session's call ends with, after its last frame.
async fn session_status(session: &mut Session) -> tonic::Status {
    match within("the session's end", session.inbound.message()).await {
        Ok(Some(frame)) => panic!("a frame after every request ended: {frame:?}"),
        Ok(None) => panic!("the session ended OK"),
        Err(status) => status,
    }
}

/// A router shutting down (SIGTERM) lets a session's running request finish, then ends the
/// session with `UNAVAILABLE` saying so — a status a client can act on (reconnect), not a torn
/// connection it cannot tell from a crash; an idle session ends the same way at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutting_down_router_ends_its_sessions_with_unavailable_once_their_requests_end() {
    let cluster = Cluster::start(1, 2, RouterConfig::default(), None).await;
    cluster
        .script
        .set("slow", [Plan::default().paced(Duration::from_millis(20))]);
    let mut busy = cluster.session().await;
    let mut idle = cluster.session().await;
    idle.start(request("quick", "quick", 2, RequestClass::CostSensitive));
    idle.end("quick").await;
    busy.start(request("long", "slow", 30, RequestClass::CostSensitive));
    busy.tokens("long", 2).await;

    cluster.router_stop.cancel();
    let ended = session_status(&mut idle).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("shutting down"), "{ended:?}");
    let end = busy.end("long").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("slow", 0, 30));
    let ended = session_status(&mut busy).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
}

/// A session frame over the router's message size limit ends the session — not with OK, and
/// not before each running request has had its last frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_ends_the_session_after_its_requests_last_frames() {
    let cluster = Cluster::start(1, 2, RouterConfig::default(), None).await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    session.start(request("a", "hold", 5, RequestClass::CostSensitive));
    session.tokens("a", 1).await;
    session.start(request(
        "huge",
        &"x".repeat(5 << 20),
        5,
        RequestClass::CostSensitive,
    ));
    let end = session.end("a").await;
    assert!(end.ended(), "{end:?}");
    let status = session_status(&mut session).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("message size limit"),
        "{status:?}"
    );
    assert!(
        !session.requests.contains_key("huge"),
        "the unread frame started nothing"
    );
}

/// A `Generate` call whose request fails after the call was answered — shed after waiting at
/// the router, or every worker lost mid-stream — ends with that failure as its status (with
/// `retry-after` when shed), not OK: clients that read only the status see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generate_call_that_fails_later_ends_with_the_failure_as_its_status() {
    let mut policy = PolicyDocument::default();
    policy.latency_critical.max_queue_wait_ms = 300.0;
    policy.latency_critical.retry_after_ms = 700;
    let (cluster, mut session) = one_slot_taken(policy).await;

    let mut client = InferenceClient::new(cluster.channel().await);
    let status = within(
        "generate",
        client.generate(request("late", "late", 3, RequestClass::LatencyCritical)),
    )
    .await
    .expect_err("shed after its queue wait");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.metadata().get("retry-after-ms"),
        Some(&"700".parse().expect("ascii")),
        "{status:?}"
    );
    cluster.engine(0).release();
    assert_eq!(session.end("h").await.reason(), FinishReason::Length);

    // Lost mid-stream with nowhere to go: the `Failed` frame, then the same as the status.
    cluster.script.set(
        "doomed",
        [Plan::fault(Fault::DieAfter(2)).paced(Duration::from_millis(5))],
    );
    let mut stream = within(
        "generate",
        client.generate(request("d", "doomed", 30, RequestClass::Auto)),
    )
    .await
    .expect("accepted")
    .into_inner();
    let mut failed = None;
    let status = loop {
        match within("a frame", stream.message()).await {
            Ok(Some(frame)) => {
                if let Some(Frame::Failed(f)) = frame.frame {
                    failed = Some(f);
                }
            }
            Ok(None) => panic!("the call ended OK after {failed:?}"),
            Err(status) => break status,
        }
    };
    let failed = failed.expect("a Failed frame before the status");
    assert_eq!(Code::from_i32(failed.code), Code::Unavailable, "{failed:?}");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), failed.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_stall_the_worker_for_others() {
    let config = RouterConfig {
        stream_credit_tokens: 16,
        limits: switchyard_proto::RequestLimits {
            max_tokens_cap: 1_000_000,
            ..Default::default()
        },
        ..RouterConfig::default()
    };
    let cluster = Cluster::start(1, 2, config, None).await;
    cluster
        .script
        .set("flood", [Plan::default().paced(Duration::ZERO)]);

    // Its own connection: a stalled stream must not hold the other client's window.
    let mut slow = InferenceClient::new(cluster.channel().await);
    let mut unread = within(
        "generate",
        slow.generate(request("flood", "flood", 1_000_000, RequestClass::Auto)),
    )
    .await
    .expect("generate accepted")
    .into_inner();
    loop {
        let frame = within("a frame", unread.message())
            .await
            .expect("stream ok")
            .expect("not ended");
        if matches!(frame.frame, Some(Frame::Tokens(_))) {
            break;
        }
    }
    // From here on nobody reads the flood, until its engine has to wait.
    let engine = cluster.engine(0);
    let flood = start_on(engine, "flood").await;
    within(
        "the flood's engine is held back",
        engine.wait_until(|events| {
            events.iter().any(
                |e| matches!(e, FaultEvent::Blocked { request_id } if *request_id == flood.request_id),
            )
        }),
    )
    .await;

    let mut session = cluster.session().await;
    session.start(request("b", "bystander", 50, RequestClass::Auto));
    let end = session.end("b").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("bystander", 0, 50));
    assert_eq!(
        done_of(&engine.events(), &flood.request_id),
        None,
        "the flood is still held back"
    );
    drop(unread);
}

/// The wafer-scale slot is the scarcest thing in the cluster: a cost-sensitive request that
/// borrowed it gives it back to a latency-critical one, continues on a GPU, and its client sees
/// one continuous text (and a `Moved` frame saying why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_critical_request_takes_back_a_borrowed_wafer_slot_and_the_borrower_moves_on() {
    let mut policy = PolicyDocument::default();
    policy.migration.enabled = true;
    policy.migration.preempt_borrowed_wse = true;
    policy.migration.max_moves_per_generation = 1;
    // Only the move under test: a generation slowed down by a busy test machine stays put.
    policy.migration.rebalance = false;
    // Latency-critical work waits for the wafer rather than spilling: only a preemption serves
    // it now.
    policy.latency_critical.spill = false;
    let cluster = Cluster::start_pools(
        &[(Pool::Gpu, 2), (Pool::Wse, 1)],
        RouterConfig::default(),
        Some(policy),
    )
    .await;
    let (gpu, wse) = (0, 1);
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    cluster
        .script
        .set("story", [Plan::default().paced(Duration::from_millis(20))]);
    let mut session = cluster.session().await;
    // The GPU pool is full...
    for id in ["a", "b"] {
        session.start(request(id, "hold", 3, RequestClass::CostSensitive));
        session.tokens(id, 1).await;
    }
    // ...so a cost-sensitive request borrows the idle wafer slot.
    session.start(request(
        "borrower",
        "story",
        40,
        RequestClass::CostSensitive,
    ));
    session.tokens("borrower", 3).await;
    let borrowed = session.requests["borrower"].accepted[0].clone();
    assert_eq!(borrowed.pool, "wse", "{borrowed:?}");
    // The GPU frees up; then latency-critical work arrives while the wafer is busy.
    cluster.engine(gpu).release();
    assert_eq!(session.end("a").await.reason(), FinishReason::Length);
    assert_eq!(session.end("b").await.reason(), FinishReason::Length);
    session.start(request(
        "urgent",
        "answer now",
        5,
        RequestClass::LatencyCritical,
    ));

    let urgent = session.end("urgent").await;
    assert_eq!(urgent.reason(), FinishReason::Length, "{urgent:?}");
    assert_eq!(urgent.accepted[0].pool, "wse", "{urgent:?}");
    assert_eq!(urgent.text, fault_text("answer now", 0, 5));

    let borrower = session.end("borrower").await;
    assert_eq!(borrower.reason(), FinishReason::Length, "{borrower:?}");
    // One continuous text, exactly what an unmoved run gives.
    assert_eq!(borrower.text, fault_text("story", 0, 40));
    assert_eq!(borrower.ids, fault_ids("story", 0, 40));
    assert_eq!(borrower.moved.len(), 1, "{borrower:?}");
    let moved = &borrower.moved[0];
    assert_eq!(
        (
            moved.from_pool.as_str(),
            moved.to_pool.as_str(),
            moved.reason.as_str()
        ),
        ("wse", "gpu", "preempt")
    );
    assert_eq!(moved.from_worker_id, cluster.workers[wse].id);
    // The GPU resumed after exactly what the client had from the wafer.
    let resumed = start_on(cluster.engine(gpu), "story").await;
    let k = resumed.resume_tokens.len();
    assert!(k >= 3, "{k}");
    assert_eq!(resumed.resume_tokens, fault_ids("story", 0, k));
    assert!(cancelled(
        &cluster.engine(wse).events(),
        &start_on(cluster.engine(wse), "story").await.request_id
    ));
}

/// Once the wafer is getting scarce, latency-critical work a GPU serves well within its SLO
/// goes to the GPU, and the wafer's last slot is left to a prompt only it serves in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scarce_wafer_is_kept_for_the_long_prompt_and_short_ones_go_to_a_gpu() {
    let mut policy = PolicyDocument::default();
    policy.placement.save_wse_above_utilisation = 0.5;
    policy.placement.save_wse_gpu_ttft_fraction = 0.4;
    let cluster = Cluster::start_pools(
        &[(Pool::Gpu, 2), (Pool::Wse, 2)],
        RouterConfig::default(),
        Some(policy),
    )
    .await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    // The wafer is idle: latency-critical work goes there as usual.
    session.start(request("first", "hold", 3, RequestClass::LatencyCritical));
    session.tokens("first", 1).await;
    assert_eq!(session.requests["first"].accepted[0].pool, "wse");
    // Half busy: a short prompt, predicted in a few ms on the idle GPU, leaves the wafer alone.
    session.start(request("short", "hold", 3, RequestClass::LatencyCritical));
    session.tokens("short", 1).await;
    let short = session.requests["short"].accepted[0].clone();
    assert_eq!(short.pool, "gpu", "{short:?}");
    assert!(short.reason.contains("wse scarce"), "{short:?}");
    // A prompt the GPU would take longer than 40 % of the SLO to prefill (~5 000 tokens at the
    // default 5 000 tokens/s, half of them assumed cached on its affinity owner) still gets the
    // wafer's last slot.
    let long = format!("hold {}", "word ".repeat(4_000));
    cluster
        .script
        .set(&long, [Plan::fault(Fault::HoldAfter(1))]);
    session.start(request("long", &long, 3, RequestClass::LatencyCritical));
    session.tokens("long", 1).await;
    let long_accepted = session.requests["long"].accepted[0].clone();
    assert_eq!(long_accepted.pool, "wse", "{long_accepted:?}");
    for i in 0..2 {
        cluster.engine(i).release();
    }
    for id in ["first", "short", "long"] {
        assert_eq!(session.end(id).await.reason(), FinishReason::Length, "{id}");
    }
}

/// A GPU prefilling 1 000 tokens/s and a wafer 50 000 tokens/s with one slot, under a policy
/// that lets a latency-critical request await the wafer; a quick first generation on the wafer
/// has measured how long its slot is held, and the slot is now taken and held (`holder`, one
/// token out) until `cluster.engine(1).release()`.
async fn wafer_slot_held() -> (Cluster, Session) {
    let mut policy = PolicyDocument::default();
    policy.placement.await_wse = true;
    policy.placement.await_wse_gpu_ttft_fraction = 1.0;
    let cluster = Cluster::start_reporting(
        &[(Pool::Gpu, 4, 1_000.0), (Pool::Wse, 1, 50_000.0)],
        RouterConfig::default(),
        Some(policy),
    )
    .await;
    cluster
        .script
        .set("hold", [Plan::fault(Fault::HoldAfter(1))]);
    let mut session = cluster.session().await;
    let wse = cluster.workers[1].id.clone();
    session.start(request(
        "warm-up",
        "quick",
        3,
        RequestClass::LatencyCritical,
    ));
    assert_eq!(session.end("warm-up").await.reason(), FinishReason::Length);
    assert_eq!(session.requests["warm-up"].accepted[0].worker_id, wse);
    session.start(request("holder", "hold", 3, RequestClass::LatencyCritical));
    session.tokens("holder", 1).await;
    assert_eq!(session.requests["holder"].accepted[0].worker_id, wse);
    (cluster, session)
}

/// ~3 000 prompt tokens: 1.5 s or more on the GPU of [`wafer_slot_held`], past the 1 000 ms
/// SLO; ~60 ms on its wafer.
fn late_prompt() -> String {
    format!("slow {}", "word ".repeat(3_000))
}

/// A latency-critical request that a GPU would serve late, while the wafer's only slot is
/// busy, waits at the router for that slot (its turnover measured from the generations before)
/// and gets it as soon as it frees; when the slot does not free within what is left of its SLO,
/// it takes the GPU after all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_a_gpu_would_serve_late_awaits_the_wafer_slot_that_frees_in_time() {
    let (cluster, mut session) = wafer_slot_held().await;
    let (gpu, wse) = (&cluster.workers[0].id, &cluster.workers[1].id);
    // ~3 000 prompt tokens: 1.5 s or more on the GPU (with its assumed cache), past the
    // 1 000 ms SLO; ~60 ms on the wafer. It waits rather than start on the GPU.
    let long = late_prompt();
    session.start(request("late", &long, 3, RequestClass::LatencyCritical));
    cluster.engine(1).release();
    assert_eq!(session.end("holder").await.reason(), FinishReason::Length);
    let end = session.end("late").await;
    assert_eq!(end.reason(), FinishReason::Length);
    // The wafer's only slot was held until the release: it waited for it, and the GPU never
    // saw it.
    let late = end.accepted[0].clone();
    assert_eq!(&late.worker_id, wse, "{late:?}");
    assert!(
        late.reason.contains("after awaiting a wse slot"),
        "{late:?}"
    );
    assert!(queue_ms(&end) > 0.0, "{end:?}");
    assert!(
        cluster.starts().iter().all(|(i, _)| *i == 1),
        "{:?}",
        cluster.starts()
    );
    // The slot held again, for longer than the SLO (a token every 500 ms): the next one waits
    // what is left of its SLO at most, then takes the GPU.
    cluster.script.set(
        "steady",
        [Plan::default().paced(Duration::from_millis(500))],
    );
    session.start(request(
        "holder-2",
        "steady",
        4,
        RequestClass::LatencyCritical,
    ));
    session.tokens("holder-2", 1).await;
    session.start(request("given-up", &long, 3, RequestClass::LatencyCritical));
    assert_eq!(session.end("given-up").await.reason(), FinishReason::Length);
    let end = session.requests["given-up"].clone();
    let given_up = end.accepted[0].clone();
    assert_eq!(&given_up.worker_id, gpu, "{given_up:?}");
    assert!(given_up.reason.contains("spill=gpu"), "{given_up:?}");
    let waited = queue_ms(&end);
    assert!(waited > 0.0 && waited < 1_000.0, "waited {waited} ms");
    assert_eq!(session.end("holder-2").await.reason(), FinishReason::Length);
}

/// A request that starts awaiting a wafer-scale slot while nothing else happens in the cluster
/// (the slot's holder is silent, no load report arrives) still gives up on time and takes the
/// GPU: its give-up time is armed when it is queued, not at the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_awaiting_a_silent_wafer_slot_gives_up_on_time() {
    let (cluster, mut session) = wafer_slot_held().await;
    let gpu = &cluster.workers[0].id;
    let long = late_prompt();
    session.start(request("late", &long, 3, RequestClass::LatencyCritical));
    let end = session.end("late").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    let late = end.accepted[0].clone();
    assert_eq!(&late.worker_id, gpu, "{late:?}");
    let waited = queue_ms(&end);
    assert!(waited > 0.0 && waited < 1_000.0, "waited {waited} ms");
    cluster.engine(1).release();
    assert_eq!(session.end("holder").await.reason(), FinishReason::Length);
}

fn queue_ms(outcome: &Outcome) -> f64 {
    outcome
        .finished
        .as_ref()
        .and_then(|f| f.timings)
        .expect("timings")
        .queue_ms
}

/// A draining worker hands its long generations to another worker instead of making the
/// clients wait for them (or, past its drain timeout, cutting them off); the client sees one
/// continuous text and a `Moved` frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_worker_hands_its_generations_off_and_the_text_goes_on_unbroken() {
    let mut policy = PolicyDocument::default();
    policy.migration.enabled = true;
    policy.migration.drain_handoff = true;
    policy.migration.min_remaining_tokens = 4;
    policy.migration.rebalance = false;
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(policy)).await;
    cluster
        .script
        .set("story", [Plan::default().paced(Duration::from_millis(20))]);
    let mut session = cluster.session().await;
    session.start(request("long", "story", 60, RequestClass::CostSensitive));
    session.tokens("long", 3).await;
    let first = session.requests["long"].accepted[0].worker_id.clone();
    let (from, to) = if cluster.workers[0].id == first {
        (0, 1)
    } else {
        (1, 0)
    };
    cluster.workers[from].drain.cancel();

    let end = session.end("long").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("story", 0, 60));
    assert_eq!(end.ids, fault_ids("story", 0, 60));
    assert_eq!(end.moved.len(), 1, "{end:?}");
    let moved = &end.moved[0];
    assert_eq!(moved.reason, "drain");
    assert_eq!(moved.from_worker_id, cluster.workers[from].id);
    assert_eq!(moved.to_worker_id, cluster.workers[to].id);
    let resumed = start_on(cluster.engine(to), "story").await;
    let k = resumed.resume_tokens.len();
    assert!((3..60).contains(&k), "{k}");
    assert_eq!(resumed.resume_tokens, fault_ids("story", 0, k));
}

/// A lane that does not spill gets `UNAVAILABLE` at once when its own pool takes no requests
/// (drained), not a wait of its lane's queue time ended by a `RESOURCE_EXHAUSTED` shed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_whose_pool_is_drained_and_does_not_spill_is_refused_at_once() {
    let mut policy = PolicyDocument::default();
    policy.latency_critical.spill = false;
    let cluster = Cluster::start_pools(
        &[(Pool::Gpu, 4), (Pool::Wse, 4)],
        RouterConfig::default(),
        Some(policy),
    )
    .await;
    cluster.workers[1].drain.cancel();
    cluster.wait_until_routable(1).await;

    let mut session = cluster.session().await;
    session.start(request("lc", "now", 4, RequestClass::LatencyCritical));
    let end = session.end("lc").await;
    let failed = end.failure();
    assert_eq!(Code::from_i32(failed.code), Code::Unavailable, "{failed:?}");
    assert!(
        failed.message.contains("no wse worker") && failed.message.contains("does not spill"),
        "{failed:?}"
    );
    // The other lane is served as before.
    session.start(request("cs", "later", 4, RequestClass::CostSensitive));
    assert_eq!(session.end("cs").await.reason(), FinishReason::Length);
}

/// A drain hands off only as many generations as the other workers have free slots for (each
/// hand-off holds its target's slot before the next is decided); the rest finish where they
/// are, and every client gets its whole text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_hands_off_no_more_generations_than_the_other_worker_has_room_for() {
    const SLOTS: u32 = 4;
    const REQUESTS: usize = 6;
    let mut policy = PolicyDocument::default();
    policy.migration.enabled = true;
    policy.migration.drain_handoff = true;
    policy.migration.min_remaining_tokens = 4;
    policy.migration.rebalance = false;
    policy.placement.gpu_reserve_for_latency = 0.0;
    let cluster = Cluster::start(2, SLOTS, RouterConfig::default(), Some(policy)).await;
    cluster
        .script
        .set("story", [Plan::default().paced(Duration::from_millis(20))]);
    let mut session = cluster.session().await;
    let ids: Vec<String> = (0..REQUESTS).map(|i| format!("long-{i}")).collect();
    for id in &ids {
        session.start(request(id, "story", 80, RequestClass::CostSensitive));
    }
    let mut on = [0u32; 2];
    for id in &ids {
        let seen = session.tokens(id, 3).await;
        let worker = &seen.accepted[0].worker_id;
        on[usize::from(cluster.workers[1].id == *worker)] += 1;
    }
    let (from, to) = if on[0] >= on[1] { (0, 1) } else { (1, 0) };
    let room = SLOTS - on[to];
    cluster.workers[from].drain.cancel();

    let mut moved = 0;
    for id in &ids {
        let end = session.end(id).await;
        assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
        assert_eq!(end.text, fault_text("story", 0, 80), "{end:?}");
        moved += end.moved.len() as u32;
    }
    assert_eq!(moved, room.min(on[from]), "{on:?} on the two workers");
}

/// A generation that failed over is listed for moves on the worker it now runs on: it was
/// still listed on the worker that refused it, so rebalancing judged it there and "moved" it
/// onto the worker it already ran on (a `Moved` from a worker to itself, its one move spent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_failed_over_is_never_moved_onto_the_worker_it_runs_on() {
    let mut policy = PolicyDocument::default();
    policy.migration.enabled = true;
    policy.migration.rebalance = true;
    policy.migration.drain_handoff = false;
    policy.migration.min_remaining_tokens = 4;
    policy.migration.rebalance_min_gain_ms = 0.0;
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(policy)).await;
    // The first worker refuses the start; the other decodes at 10 tokens/s, where placement
    // predicts the policy's default 50.
    cluster.script.set(
        "flaky",
        [
            Plan::fault(Fault::Refuse(Code::Unavailable)),
            Plan::default().paced(Duration::from_millis(100)),
        ],
    );
    let mut session = cluster.session().await;
    session.start(request("r", "flaky", 30, RequestClass::CostSensitive));

    let end = session.end("r").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("flaky", 0, 30));
    for moved in &end.moved {
        assert_ne!(moved.from_worker_id, moved.to_worker_id, "{end:?}");
    }
}

/// A policy that hedges every latency-critical request the budget allows.
fn hedging(budget_fraction: f64) -> PolicyDocument {
    let mut policy = PolicyDocument::default();
    policy.hedging.enabled = true;
    policy.hedging.slo_margin = 0.01;
    policy.hedging.same_pool = true;
    policy.hedging.budget_fraction = budget_fraction;
    policy
}

/// A latency-critical request raced on two workers goes on with the copy that answers first;
/// the other stops within one engine step and the client sees one copy's text, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_request_keeps_the_first_copy_to_answer_and_the_loser_stops_within_a_step() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(hedging(1.0))).await;
    // Whichever copy reaches its engine first is slow (200 ms a token), the other quick.
    cluster.script.set(
        "race",
        [
            Plan::default().paced(Duration::from_millis(200)),
            Plan::default().paced(Duration::from_millis(1)),
        ],
    );
    let mut session = cluster.session().await;
    session.start(request("r", "race", 20, RequestClass::LatencyCritical));

    let end = session.end("r").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("race", 0, 20));
    assert_eq!(end.ids, fault_ids("race", 0, 20));
    assert_eq!(end.accepted.len(), 1, "{end:?}");
    assert!(end.accepted[0].reason.contains("won"), "{end:?}");
    // Both workers ran a copy; the one the client did not get was cancelled before its
    // second token.
    let copies: Vec<(usize, Start)> = cluster
        .starts()
        .into_iter()
        .filter(|(_, s)| s.instructions() == "race")
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert_ne!(copies[0].0, copies[1].0, "{copies:?}");
    let winner = &end.accepted[0].worker_id;
    let (loser, start) = copies
        .iter()
        .find(|(i, _)| &cluster.workers[*i].id != winner)
        .expect("a copy on the other worker");
    let events = within(
        "the losing copy ends",
        cluster
            .engine(*loser)
            .wait_until(|e| done_of(e, &start.request_id).is_some()),
    )
    .await;
    assert!(cancelled(&events, &start.request_id), "{events:?}");
    let (reason, tokens) = done_of(&events, &start.request_id).expect("ended");
    assert_eq!(reason, switchyard_worker::StopReason::Cancelled);
    assert!(tokens <= 1, "the loser ran on for {tokens} tokens");
}

/// Over 1 000 latency-critical requests that all want a hedge, hedges never cost more than
/// the lane's budget: 5 % of its prompt tokens so far, at every moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedges_never_spend_more_than_the_budget_over_a_thousand_requests() {
    const REQUESTS: usize = 1_000;
    const WAVE: usize = 50;
    let cluster = Cluster::start(2, 64, RouterConfig::default(), Some(hedging(0.05))).await;
    cluster
        .script
        .set_default(Plan::default().paced(Duration::ZERO));
    let mut session = cluster.session().await;
    // Prompts of one length: every request costs a hedge the same prefill.
    let instructions = |i: usize| format!("question {i:04}");
    for wave in 0..REQUESTS / WAVE {
        let ids: Vec<usize> = (wave * WAVE..(wave + 1) * WAVE).collect();
        for &i in &ids {
            session.start(request(
                &format!("q{i}"),
                &instructions(i),
                2,
                RequestClass::LatencyCritical,
            ));
        }
        for &i in &ids {
            let end = session.end(&format!("q{i}")).await;
            assert_eq!(end.text, fault_text(&instructions(i), 0, 2), "{end:?}");
        }
    }
    let mut copies: HashMap<String, usize> = HashMap::new();
    for (_, start) in cluster.starts() {
        *copies.entry(start.instructions().to_string()).or_default() += 1;
    }
    assert_eq!(copies.len(), REQUESTS);
    let hedged = copies.values().filter(|&&n| n == 2).count();
    assert!(copies.values().all(|&n| n <= 2), "{copies:?}");
    // Request n may be the k-th hedge only if k ≤ 5 % of n: at most 50 of 1 000, and with a
    // free second worker for every request the budget is what limits them.
    assert!(hedged <= REQUESTS / 20, "{hedged} hedges");
    assert!(hedged >= REQUESTS / 25, "only {hedged} hedges");
}

/// A generation whose worker decodes far below the rate placement predicted moves to a worker
/// predicted faster, and the client's text goes on unbroken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_that_falls_behind_its_predicted_rate_moves_to_a_faster_worker() {
    let mut policy = PolicyDocument::default();
    policy.migration.enabled = true;
    policy.migration.rebalance = true;
    policy.migration.drain_handoff = false;
    policy.migration.min_remaining_tokens = 4;
    policy.migration.rebalance_min_gain_ms = 0.0;
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(policy)).await;
    // 10 tokens/s where placement predicts the policy's default 50; the resumed copy runs at
    // the usual pace.
    cluster.script.set(
        "crawl",
        [
            Plan::default().paced(Duration::from_millis(100)),
            Plan::default(),
        ],
    );
    let mut session = cluster.session().await;
    session.start(request("slow", "crawl", 60, RequestClass::CostSensitive));

    let end = session.end("slow").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("crawl", 0, 60));
    assert_eq!(end.ids, fault_ids("crawl", 0, 60));
    assert_eq!(end.moved.len(), 1, "{end:?}");
    let moved = &end.moved[0];
    assert_eq!(moved.reason, "rebalance");
    assert_eq!(moved.from_worker_id, end.accepted[0].worker_id);
    assert_ne!(moved.to_worker_id, moved.from_worker_id);
    let to = cluster
        .workers
        .iter()
        .position(|w| w.id == moved.to_worker_id)
        .expect("a worker of the cluster");
    let resumed = start_on(cluster.engine(to), "crawl").await;
    let k = resumed.resume_tokens.len();
    assert!((5..60).contains(&k), "{k}");
    assert_eq!(resumed.resume_tokens, fault_ids("crawl", 0, k));
}

/// A client that cancels a hedged request before either copy answered stops both copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_hedge_race_stops_both_copies() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(hedging(1.0))).await;
    cluster
        .script
        .set("wait", [Plan::fault(Fault::HoldAfter(0))]);
    let mut session = cluster.session().await;
    session.start(request("r", "wait", 10, RequestClass::LatencyCritical));
    // Both copies reached their engines, neither has a token.
    for i in 0..2 {
        start_on(cluster.engine(i), "wait").await;
    }
    session.cancel("r");

    let end = session.end("r").await;
    assert_eq!(end.reason(), FinishReason::Cancelled, "{end:?}");
    assert!(end.ids.is_empty(), "{end:?}");
    for i in 0..2 {
        let start = start_on(cluster.engine(i), "wait").await;
        within(
            "the copy is cancelled",
            cluster
                .engine(i)
                .wait_until(|e| cancelled(e, &start.request_id)),
        )
        .await;
    }
}

/// A copy that fails before its first token leaves the other to answer alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hedged_copy_that_fails_first_leaves_the_other_to_answer() {
    let cluster = Cluster::start(2, 4, RouterConfig::default(), Some(hedging(1.0))).await;
    cluster.script.set(
        "flaky",
        [Plan::fault(Fault::Refuse(Code::Internal)), Plan::default()],
    );
    let mut session = cluster.session().await;
    session.start(request("r", "flaky", 8, RequestClass::LatencyCritical));

    let end = session.end("r").await;
    assert_eq!(end.reason(), FinishReason::Length, "{end:?}");
    assert_eq!(end.text, fault_text("flaky", 0, 8));
    let copies = cluster
        .starts()
        .into_iter()
        .filter(|(_, s)| s.instructions() == "flaky")
        .count();
    assert_eq!(copies, 2, "both copies started");
}
