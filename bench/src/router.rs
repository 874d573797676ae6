//! `switchyard-bench router`: what the router costs on top of talking to a worker directly.
//!
//! One worker serving the synthetic load-test engine (no model: its tokens come as fast as they
//! are read, so the figures are the serving path's, not a model's) and one router run in this
//! process on loopback ports, over an in-memory registry. The same workload — `requests`
//! requests of `max_tokens` tokens, `concurrency` of them in flight — runs four ways, round by
//! round in turn so machine drift hits all of them alike:
//!
//! * `direct`: straight on the worker's multiplexed `Worker.Serve` stream (the router's own
//!   path to a worker, without the router);
//! * `relay`: the same stream through a relay with no routing logic ([`crate::relay`]), the
//!   floor under any gRPC router;
//! * `session`: through the router on one persistent `Inference.Session` stream;
//! * `generate`: through the router, one `Inference.Generate` call per request.
//!
//! Reported per path: requests/s, tokens/s, time to first token and to the last one (p50 and
//! p99 over every round), and the other paths' throughput as a ratio of `direct`. Every
//! request must deliver exactly `max_tokens` tokens, or the run fails.
//!
//! With `--control-plane`, an in-process control plane runs too and the router reports its
//! decisions to it (as in a real cluster): compare with a run without to see what reporting
//! costs; the run also polls the dashboard's `/api/history` and `/api/decisions` throughout and
//! reports how fast they answered and how much of the feed was sampled or dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use switchyard_cluster::{MemoryRegistry, Pool};
use switchyard_proto::v1::{
    self, ChatMessage, ClientFrame, GenerateRequest, Lane, RequestClass, RouterFrame,
    SamplingParams, WorkerStart, client_frame, inference_client::InferenceClient, router_frame,
    server_frame, worker_client::WorkerClient, worker_frame,
};
use switchyard_router::RouterConfig;
use switchyard_worker::{SyntheticConfig, SyntheticEngine, WorkerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const MODEL: &str = "synthetic";

/// Options of `switchyard-bench router`.
#[derive(Debug, Clone, clap::Args)]
pub struct RouterBenchArgs {
    /// Requests per path and round.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    /// Requests in flight at once (one run per level).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Rounds per concurrency level; each round runs every path once.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run a control plane the router reports to (decision feed and history).
    #[arg(long)]
    pub control_plane: bool,
    /// The router's --decision-reports-per-s (with --control-plane).
    #[arg(long, default_value_t = 200)]
    pub decision_reports_per_s: u32,
    /// Run only these paths (e.g. `session` alone under a profiler); ratios to `direct` need
    /// `direct` among them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,relay,session,generate"
    )]
    pub paths: Vec<Path>,
    /// Pace each generation at this many tokens per second (a model's decode rate, e.g. 2000
    /// for a wafer-scale endpoint) instead of as fast as the serving path reads them: the
    /// ratios then show what the router adds to a real stream rather than its raw cost.
    #[arg(long)]
    pub engine_tokens_per_s: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Direct,
    /// The same `Worker.Serve` stream as `direct`, through a relay with no routing logic
    /// (see [`crate::relay`]): the floor under any gRPC router.
    Relay,
    Session,
    Generate,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Relay, Path::Session, Path::Generate];

impl Path {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::Session => "session",
            Self::Generate => "generate",
        }
    }
}

/// One request's milestones, measured from when it was sent.
#[derive(Debug, Clone, Copy)]
struct Sample {
    ttft: Duration,
    total: Duration,
}

/// Latencies (µs) and throughput of one path at one concurrency, over every round.
struct PathResult {
    ttft: Histogram<u64>,
    total: Histogram<u64>,
    requests: usize,
    tokens: u64,
    busy: Duration,
    /// CPU time the whole process (client, router and worker) used for these requests.
    cpu: Duration,
}

impl PathResult {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            ttft: Histogram::new(3)?,
            total: Histogram::new(3)?,
            requests: 0,
            tokens: 0,
            busy: Duration::ZERO,
            cpu: Duration::ZERO,
        })
    }

    fn add(&mut self, outcome: &RunOutcome) -> anyhow::Result<()> {
        let RunOutcome {
            samples,
            tokens,
            elapsed,
            cpu,
        } = outcome;
        for s in samples {
            self.ttft.record(s.ttft.as_micros() as u64)?;
            self.total.record(s.total.as_micros() as u64)?;
        }
        self.requests += samples.len();
        self.tokens += tokens;
        self.busy += *elapsed;
        self.cpu += *cpu;
        Ok(())
    }

    fn figures(&self) -> PathFigures {
        let secs = self.busy.as_secs_f64().max(f64::EPSILON);
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        PathFigures {
            requests: self.requests,
            tokens: self.tokens,
            requests_per_s: self.requests as f64 / secs,
            tokens_per_s: self.tokens as f64 / secs,
            ttft_p50_ms: ms(&self.ttft, 0.5),
            ttft_p99_ms: ms(&self.ttft, 0.99),
            total_p50_ms: ms(&self.total, 0.5),
            total_p99_ms: ms(&self.total, 0.99),
            cpu_us_per_request: self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64,
        }
    }
}

#[derive(Debug, Serialize)]
struct PathFigures {
    /// Requests completed over every round.
    requests: usize,
    tokens: u64,
    requests_per_s: f64,
    tokens_per_s: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    total_p50_ms: f64,
    total_p99_ms: f64,
    /// Process CPU time (user + system, every thread) per request: unlike throughput, hardly
    /// moved by other work on the machine.
    cpu_us_per_request: f64,
}

#[derive(Debug, Serialize)]
struct LevelReport {
    concurrency: usize,
    paths: HashMap<Path, PathFigures>,
    /// Requests/s through the router as a fraction of direct, per router path.
    throughput_vs_direct: HashMap<Path, f64>,
    /// Median time to first token the router adds, per router path, in ms.
    added_ttft_p50_ms: HashMap<Path, f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    requests: usize,
    max_tokens: u32,
    rounds: usize,
    /// Each generation's pace; `None`: unpaced (as fast as read).
    engine_tokens_per_s: Option<f64>,
    levels: Vec<LevelReport>,
    /// With `--control-plane`: what it received and how its dashboard API answered.
    control_plane: Option<ControlPlaneFigures>,
}

#[derive(Debug, Serialize)]
struct ControlPlaneFigures {
    /// Decisions the router made, reported to the feed, and reports dropped (queue full).
    decisions: u64,
    reported: u64,
    dropped: u64,
    /// Requests the history counted (every request, whatever the sampling).
    requests_in_history: u64,
    /// `/api/history?since=` + `/api/decisions?since=` polls (one a second, like the page).
    polls: usize,
    api_p50_ms: f64,
    api_max_ms: f64,
}

/// A worker and a router (and optionally a control plane) in this process, stopped on drop.
pub(crate) struct Cluster {
    pub(crate) worker: Channel,
    pub(crate) worker_addr: std::net::SocketAddr,
    pub(crate) router: Channel,
    pub(crate) router_addr: std::net::SocketAddr,
    /// The router's OpenAI-compatible HTTP door, when its configuration opens one.
    pub(crate) router_http: Option<std::net::SocketAddr>,
    /// The registry the router watches (its routing policy can be stored there).
    pub(crate) registry: Arc<MemoryRegistry>,
    /// The control plane's dashboard address, when one runs.
    dashboard: Option<std::net::SocketAddr>,
    pub(crate) shutdown: CancellationToken,
    /// The worker's, router's and control plane's tasks.
    tasks: JoinSet<()>,
}

impl Cluster {
    /// Starts one more router on the cluster's registry, as another replica, and waits until
    /// it can route.
    pub(crate) async fn start_router(
        &mut self,
        config: RouterConfig,
    ) -> anyhow::Result<switchyard_router::RouterEndpoints> {
        let (tx, rx) = oneshot::channel();
        spawn_component(
            &mut self.tasks,
            "second router",
            switchyard_router::run_router_with_endpoints(
                config,
                self.registry.clone(),
                self.shutdown.clone(),
                |endpoints| {
                    let _ = tx.send(endpoints);
                },
            ),
        );
        let endpoints = rx
            .await
            .context("the second router stopped before serving")?;
        let channel = Channel::from_shared(format!("http://{}", endpoints.grpc))?
            .connect()
            .await?;
        wait_until_routable(channel).await?;
        Ok(endpoints)
    }

    /// Stops the components and waits until they have shut down (the worker deregistered), so
    /// that the runtime ending does not cut them off halfway (a warning each).
    pub(crate) async fn stop(mut self) {
        self.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        if tokio::time::timeout(Duration::from_secs(10), tasks.join_all())
            .await
            .is_err()
        {
            eprintln!("the bench cluster did not stop within 10 s");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `component` as one of the cluster's tasks, reporting how it failed.
fn spawn_component<E: std::fmt::Display>(
    tasks: &mut JoinSet<()>,
    name: &'static str,
    component: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    tasks.spawn(async move {
        if let Err(error) = component.await {
            eprintln!("bench {name} failed: {error}");
        }
    });
}

/// A synthetic engine that never holds tokens back: the figures are the serving path's.
pub(crate) fn unthrottled_engine(max_concurrent: u32) -> SyntheticConfig {
    SyntheticConfig {
        models: vec![MODEL.into()],
        ttft: Duration::ZERO,
        // Far beyond what the serving path can carry.
        tokens_per_s: 1e9,
        max_concurrent,
        max_queue: max_concurrent,
        prefill_tokens_per_s: f64::MAX,
    }
}

/// The router configuration the benchmarks run with.
pub(crate) fn bench_router_config(
    decision_reports_per_s: u32,
    stream_credit_tokens: u32,
    max_tokens_cap: u32,
) -> anyhow::Result<RouterConfig> {
    Ok(RouterConfig {
        listen: "127.0.0.1:0".parse()?,
        decision_reports_per_s,
        stream_credit_tokens,
        limits: switchyard_proto::RequestLimits {
            max_tokens_cap,
            ..Default::default()
        },
        ..Default::default()
    })
}

pub(crate) async fn start_cluster(
    engine: SyntheticConfig,
    control_plane: bool,
    router_config: RouterConfig,
) -> anyhow::Result<Cluster> {
    let registry = Arc::new(MemoryRegistry::new());
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let dashboard = if control_plane {
        let config = switchyard_control_plane::ControlPlaneConfig {
            id: "bench-control-plane".into(),
            listen: "127.0.0.1:0".parse()?,
            advertise: None,
            http_listen: Some("127.0.0.1:0".parse()?),
            election: switchyard_control_plane::ElectionConfig::Standalone,
            metrics: Default::default(),
            security: Default::default(),
            connections: Default::default(),
        };
        let (tx, rx) = oneshot::channel();
        spawn_component(
            &mut tasks,
            "control plane",
            switchyard_control_plane::run_control_plane(
                config,
                registry.clone(),
                shutdown.clone(),
                |endpoints| {
                    let _ = tx.send(endpoints.http);
                },
            ),
        );
        rx.await
            .context("the control plane stopped before serving")?
    } else {
        None
    };
    let engine = SyntheticEngine::checked(engine).map_err(anyhow::Error::msg)?;
    let worker_config = WorkerConfig::loopback("bench-worker", Pool::Gpu);
    let (worker_tx, worker_rx) = oneshot::channel();
    spawn_component(
        &mut tasks,
        "worker",
        switchyard_worker::run_worker(
            worker_config,
            Arc::new(engine),
            registry.clone(),
            shutdown.clone(),
            |addr| {
                let _ = worker_tx.send(addr);
            },
        ),
    );
    let worker_addr = worker_rx
        .await
        .context("the worker stopped before serving")?;

    let (router_tx, router_rx) = oneshot::channel();
    spawn_component(
        &mut tasks,
        "router",
        switchyard_router::run_router_with_endpoints(
            router_config,
            registry.clone(),
            shutdown.clone(),
            |endpoints| {
                let _ = router_tx.send(endpoints);
            },
        ),
    );
    let endpoints = router_rx
        .await
        .context("the router stopped before serving")?;
    let router_addr = endpoints.grpc;

    async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await?)
    }
    let cluster = Cluster {
        worker: connect(worker_addr).await?,
        worker_addr,
        router: connect(router_addr).await?,
        router_addr,
        router_http: endpoints.http,
        registry,
        dashboard,
        shutdown,
        tasks,
    };
    wait_until_routable(cluster.router.clone()).await?;
    if let Some(http) = cluster.dashboard {
        wait_until_reporting(http).await?;
    }
    Ok(cluster)
}

/// Waits until the control plane's history has a second the router reported: a router records
/// nothing for the dashboard before its report stream is open, so requests sent earlier would
/// be missing from the figures.
async fn wait_until_reporting(dashboard: std::net::SocketAddr) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let history: serde_json::Value = client
            .get(format!("http://{dashboard}/api/history"))
            .send()
            .await?
            .json()
            .await?;
        let reported = history["points"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|point| point["routers"].as_u64().unwrap_or(0) > 0);
        if reported {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router did not report to the control plane within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the router lists the worker's model (it learns of workers from the registry).
pub(crate) async fn wait_until_routable(router: Channel) -> anyhow::Result<()> {
    let mut client = InferenceClient::new(router);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let models = client
            .list_models(v1::ListModelsRequest {})
            .await?
            .into_inner()
            .models;
        if models
            .iter()
            .any(|m| m.id == MODEL && !m.workers.is_empty())
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the router did not see the worker within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn messages(index: usize) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: format!("measure the router overhead request {index}"),
        ..Default::default()
    }]
}

fn sampling(max_tokens: u32) -> Option<SamplingParams> {
    Some(SamplingParams {
        max_tokens,
        ..Default::default()
    })
}

fn generate_request(index: usize, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: format!("r{index}"),
        model: MODEL.into(),
        messages: messages(index),
        sampling: sampling(max_tokens),
        class: RequestClass::CostSensitive as i32,
        ..Default::default()
    }
}

/// What a response frame means to the load loop.
enum Event {
    Tokens { id: String, count: usize },
    Finished { id: String },
    Failed { id: String, message: String },
    Other,
}

/// The outcome of one path's run.
struct RunOutcome {
    samples: Vec<Sample>,
    tokens: u64,
    elapsed: Duration,
    cpu: Duration,
}

fn closed() -> anyhow::Error {
    anyhow::anyhow!("the call's request stream closed")
}

/// Runs `requests` requests over one multiplexed stream, `concurrency` in flight: a new one
/// is sent as each finishes.
async fn multiplexed<Out, In>(
    requests: usize,
    concurrency: usize,
    start: impl Fn(usize) -> Out,
    open: impl std::future::Future<
        Output = Result<tonic::Response<tonic::Streaming<In>>, tonic::Status>,
    >,
    outbound: mpsc::Sender<Out>,
    classify: impl Fn(In) -> Event,
) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    let mut sent = 0;
    let mut in_flight: HashMap<String, (Instant, Option<Duration>)> = HashMap::new();
    let send_next = |sent: &mut usize, in_flight: &mut HashMap<_, _>| {
        let frame = start(*sent);
        in_flight.insert(format!("r{sent}"), (Instant::now(), None));
        *sent += 1;
        frame
    };
    // The first frames go out before the call is answered (the server reads them as it can).
    for _ in 0..concurrency.min(requests) {
        let frame = send_next(&mut sent, &mut in_flight);
        outbound.send(frame).await.map_err(|_| closed())?;
    }
    let mut inbound = open.await?.into_inner();
    let mut samples = Vec::with_capacity(requests);
    let mut tokens = 0u64;
    while samples.len() < requests {
        let frame = inbound
            .message()
            .await?
            .context("the stream ended with requests in flight")?;
        match classify(frame) {
            Event::Tokens { id, count } => {
                let entry = in_flight
                    .get_mut(&id)
                    .with_context(|| format!("tokens for unknown request {id}"))?;
                entry.1.get_or_insert_with(|| entry.0.elapsed());
                tokens += count as u64;
            }
            Event::Finished { id } => {
                let (sent_at, ttft) = in_flight
                    .remove(&id)
                    .with_context(|| format!("finish of unknown request {id}"))?;
                samples.push(Sample {
                    ttft: ttft.with_context(|| format!("request {id} finished without tokens"))?,
                    total: sent_at.elapsed(),
                });
                if sent < requests {
                    let frame = send_next(&mut sent, &mut in_flight);
                    outbound.send(frame).await.map_err(|_| closed())?;
                }
            }
            Event::Failed { id, message } => bail!("request {id} failed: {message}"),
            Event::Other => {}
        }
    }
    Ok(RunOutcome {
        samples,
        tokens,
        elapsed: started.elapsed(),
        cpu: Duration::ZERO,
    })
}

async fn run_direct(
    worker: Channel,
    requests: usize,
    concurrency: usize,
    max_tokens: u32,
) -> anyhow::Result<RunOutcome> {
    let (tx, rx) = mpsc::channel(concurrency.max(1) * 2);
    let mut client = WorkerClient::new(worker);
    let start = |i: usize| RouterFrame {
        frame: Some(router_frame::Frame::Start(WorkerStart {
            request_id: format!("r{i}"),
            model: MODEL.into(),
            messages: messages(i),
            sampling: sampling(max_tokens),
            lane: Lane::CostSensitive as i32,
            ..Default::default()
        })),
    };
    let classify = |frame: v1::WorkerFrame| match frame.frame {
        Some(worker_frame::Frame::Tokens(t)) => Event::Tokens {
            count: t.token_ids.len(),
            id: t.request_id,
        },
        Some(worker_frame::Frame::Finished(f)) => Event::Finished { id: f.request_id },
        Some(worker_frame::Frame::Failed(f)) => Event::Failed {
            id: f.request_id,
            message: f.message,
        },
        _ => Event::Other,
    };
    let open = client.serve(ReceiverStream::new(rx));
    multiplexed(requests, concurrency, start, open, tx, classify).await
}

fn classify_server_frame(frame: v1::ServerFrame) -> Event {
    match frame.frame {
        Some(server_frame::Frame::Tokens(t)) => Event::Tokens {
            count: t.token_ids.len(),
            id: t.request_id,
        },
        Some(server_frame::Frame::Finished(f)) => Event::Finished { id: f.request_id },
        Some(server_frame::Frame::Failed(f)) => Event::Failed {
            id: f.request_id,
            message: f.message,
        },
        _ => Event::Other,
    }
}

async fn run_session(
    router: Channel,
    requests: usize,
    concurrency: usize,
    max_tokens: u32,
) -> anyhow::Result<RunOutcome> {
    let (tx, rx) = mpsc::channel(concurrency.max(1) * 2);
    let mut client = InferenceClient::new(router);
    let start = |i: usize| ClientFrame {
        frame: Some(client_frame::Frame::Start(generate_request(i, max_tokens))),
    };
    let open = client.session(ReceiverStream::new(rx));
    multiplexed(
        requests,
        concurrency,
        start,
        open,
        tx,
        classify_server_frame,
    )
    .await
}

/// `concurrency` callers, each making one `Generate` call at a time until `requests` are done.
async fn run_generate(
    router: Channel,
    requests: usize,
    concurrency: usize,
    max_tokens: u32,
) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let callers = (0..concurrency.min(requests)).map(|_| {
        let (router, next) = (router.clone(), next.clone());
        tokio::spawn(async move {
            let mut client = InferenceClient::new(router);
            let mut samples = Vec::new();
            let mut tokens = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return anyhow::Ok((samples, tokens));
                }
                let sent_at = Instant::now();
                let mut stream = client
                    .generate(generate_request(i, max_tokens))
                    .await?
                    .into_inner();
                let mut ttft = None;
                loop {
                    let frame = stream
                        .message()
                        .await?
                        .with_context(|| format!("request {i}: stream ended unfinished"))?;
                    match classify_server_frame(frame) {
                        Event::Tokens { count, .. } => {
                            ttft.get_or_insert_with(|| sent_at.elapsed());
                            tokens += count as u64;
                        }
                        Event::Finished { .. } => break,
                        Event::Failed { id, message } => bail!("request {id} failed: {message}"),
                        Event::Other => {}
                    }
                }
                samples.push(Sample {
                    ttft: ttft.with_context(|| format!("request {i} finished without tokens"))?,
                    total: sent_at.elapsed(),
                });
                // Read the call to its end (trailers): a call dropped before that is reset by
                // the client's HTTP/2 library, and after 1 024 such resets it closes the
                // connection (h2's guard against reset floods).
                if let Some(frame) = stream.message().await? {
                    bail!("request {i}: a frame after `finished`: {frame:?}");
                }
            }
        })
    });
    let mut samples = Vec::with_capacity(requests);
    let mut tokens = 0;
    for caller in futures::future::join_all(callers).await {
        let (s, t) = caller??;
        samples.extend(s);
        tokens += t;
    }
    Ok(RunOutcome {
        samples,
        tokens,
        elapsed: started.elapsed(),
        cpu: Duration::ZERO,
    })
}

pub async fn run(args: RouterBenchArgs) -> anyhow::Result<()> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

async fn measure(args: &RouterBenchArgs) -> anyhow::Result<Report> {
    if args.requests == 0 || args.rounds == 0 || args.max_tokens == 0 {
        bail!("--requests, --rounds and --max-tokens must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: give levels of at least 1");
    }
    let max_level = *args.concurrency.iter().max().expect("checked non-empty");
    let mut engine = unthrottled_engine(u32::try_from(max_level)?);
    if let Some(rate) = args.engine_tokens_per_s {
        if !(rate.is_finite() && rate > 0.0) {
            bail!("--engine-tokens-per-s: give a rate above 0");
        }
        engine.tokens_per_s = rate;
    }
    let cluster = start_cluster(
        engine,
        args.control_plane,
        bench_router_config(
            args.decision_reports_per_s,
            RouterConfig::default().stream_credit_tokens,
            args.max_tokens,
        )?,
    )
    .await?;
    let relay = if args.paths.contains(&Path::Relay) {
        let addr = crate::relay::spawn(cluster.worker_addr, cluster.shutdown.child_token()).await?;
        Some(
            Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        )
    } else {
        None
    };
    let probe = cluster.dashboard.map(|http| {
        let stop = cluster.shutdown.child_token();
        (stop.clone(), tokio::spawn(poll_dashboard(http, stop)))
    });
    let mut levels = Vec::new();
    for &concurrency in &args.concurrency {
        let mut results = args
            .paths
            .iter()
            .map(|p| Ok((*p, PathResult::new()?)))
            .collect::<anyhow::Result<HashMap<Path, PathResult>>>()?;
        // One short unmeasured pass per path: connections, buffers and caches warm up.
        for &path in &args.paths {
            run_path(
                &cluster,
                relay.as_ref(),
                path,
                concurrency.min(64),
                concurrency,
                args,
            )
            .await?;
        }
        for _ in 0..args.rounds {
            for &path in &args.paths {
                let outcome = run_path(
                    &cluster,
                    relay.as_ref(),
                    path,
                    args.requests,
                    concurrency,
                    args,
                )
                .await?;
                let expected = args.requests as u64 * u64::from(args.max_tokens);
                if outcome.tokens != expected {
                    bail!(
                        "{}: {} tokens delivered, expected {expected}",
                        path.name(),
                        outcome.tokens
                    );
                }
                results
                    .get_mut(&path)
                    .expect("a result per path")
                    .add(&outcome)?;
            }
        }
        let paths: HashMap<Path, PathFigures> =
            results.iter().map(|(p, r)| (*p, r.figures())).collect();
        let mut throughput_vs_direct = HashMap::new();
        let mut added_ttft_p50_ms = HashMap::new();
        for path in [Path::Relay, Path::Session, Path::Generate] {
            let (Some(direct), Some(figures)) = (paths.get(&Path::Direct), paths.get(&path)) else {
                continue;
            };
            throughput_vs_direct.insert(
                path,
                figures.requests_per_s / direct.requests_per_s.max(f64::EPSILON),
            );
            added_ttft_p50_ms.insert(path, figures.ttft_p50_ms - direct.ttft_p50_ms);
        }
        levels.push(LevelReport {
            concurrency,
            paths,
            throughput_vs_direct,
            added_ttft_p50_ms,
        });
    }
    let control_plane = match probe {
        Some((stop, task)) => {
            // The last second's stats arrive within two.
            tokio::time::sleep(Duration::from_secs(3)).await;
            stop.cancel();
            Some(task.await??)
        }
        None => None,
    };
    cluster.stop().await;
    Ok(Report {
        requests: args.requests,
        max_tokens: args.max_tokens,
        rounds: args.rounds,
        engine_tokens_per_s: args.engine_tokens_per_s,
        levels,
        control_plane,
    })
}

/// Polls the dashboard's history and feed once a second, as the page does, until `stop`;
/// then sums what the history says.
async fn poll_dashboard(
    http: std::net::SocketAddr,
    stop: CancellationToken,
) -> anyhow::Result<ControlPlaneFigures> {
    let client = reqwest::Client::new();
    let mut latency = Histogram::<u64>::new(3)?;
    let (mut since_t, mut since_seq) = (0i64, 0u64);
    let mut sums = [0u64; 4];
    loop {
        let started = Instant::now();
        let get = |path: String| {
            let client = client.clone();
            async move {
                let body = client.get(path).send().await?.bytes().await?;
                anyhow::Ok(serde_json::from_slice::<serde_json::Value>(&body)?)
            }
        };
        let history = get(format!("http://{http}/api/history?since={since_t}")).await?;
        let feed = get(format!("http://{http}/api/decisions?since={since_seq}")).await?;
        latency.record(started.elapsed().as_micros() as u64)?;
        since_seq = feed["seq"].as_u64().unwrap_or(since_seq);
        for point in history["points"].as_array().into_iter().flatten() {
            since_t = point["t"].as_i64().unwrap_or(since_t);
            let lanes = &point["lanes"];
            let get = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            sums[0] += get(&point["decisions"]);
            sums[1] += get(&point["decisions_reported"]);
            sums[2] += get(&point["dropped"]);
            sums[3] += get(&lanes["latency-critical"]["requests"])
                + get(&lanes["cost-sensitive"]["requests"]);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.cancelled() => break,
        }
    }
    Ok(ControlPlaneFigures {
        decisions: sums[0],
        reported: sums[1],
        dropped: sums[2],
        requests_in_history: sums[3],
        polls: latency.len() as usize,
        api_p50_ms: latency.value_at_quantile(0.5) as f64 / 1000.0,
        api_max_ms: latency.max() as f64 / 1000.0,
    })
}

async fn run_path(
    cluster: &Cluster,
    relay: Option<&Channel>,
    path: Path,
    requests: usize,
    concurrency: usize,
    args: &RouterBenchArgs,
) -> anyhow::Result<RunOutcome> {
    let max_tokens = args.max_tokens;
    let cpu_before = process_cpu()?;
    let mut outcome = match path {
        Path::Direct => run_direct(cluster.worker.clone(), requests, concurrency, max_tokens).await,
        Path::Relay => {
            let relay = relay.context("the relay was not started")?.clone();
            run_direct(relay, requests, concurrency, max_tokens).await
        }
        Path::Session => {
            run_session(cluster.router.clone(), requests, concurrency, max_tokens).await
        }
        Path::Generate => {
            run_generate(cluster.router.clone(), requests, concurrency, max_tokens).await
        }
    }
    .with_context(|| format!("{} path at concurrency {concurrency}", path.name()))?;
    outcome.cpu = process_cpu()?.saturating_sub(cpu_before);
    Ok(outcome)
}

/// CPU time this process has used so far, user and system, all threads.
pub(crate) fn process_cpu() -> anyhow::Result<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let time =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    Ok(time(usage.user_time()) + time(usage.system_time()))
}

fn print_table(report: &Report) {
    let pace = match report.engine_tokens_per_s {
        Some(rate) => format!("synthetic engine at {rate} tokens/s a stream"),
        None => "unpaced synthetic engine".to_string(),
    };
    println!(
        "router overhead: {} requests × {} tokens per path and round, {} rounds ({pace}, loopback)",
        report.requests, report.max_tokens, report.rounds
    );
    println!(
        "{:>5} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "conc",
        "path",
        "req/s",
        "tok/s",
        "ttft p50",
        "ttft p99",
        "end p50",
        "end p99",
        "vs dir",
        "cpu/req"
    );
    for level in &report.levels {
        for path in PATHS {
            let Some(f) = level.paths.get(&path) else {
                continue;
            };
            let ratio = level
                .throughput_vs_direct
                .get(&path)
                .map_or("-".to_string(), |r| format!("{r:.2}×"));
            println!(
                "{:>5} {:>9} {:>9.0} {:>10.0} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>8} {:>6.0}µs",
                level.concurrency,
                path.name(),
                f.requests_per_s,
                f.tokens_per_s,
                f.ttft_p50_ms,
                f.ttft_p99_ms,
                f.total_p50_ms,
                f.total_p99_ms,
                ratio,
                f.cpu_us_per_request
            );
        }
    }
    if let Some(cp) = &report.control_plane {
        println!(
            "control plane: {} decisions, {} in the feed, {} reports dropped, {} requests in the history; dashboard API (history + feed, {} polls) p50 {:.2} ms, max {:.2} ms",
            cp.decisions,
            cp.reported,
            cp.dropped,
            cp.requests_in_history,
            cp.polls,
            cp.api_p50_ms,
            cp.api_max_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_path_completes_every_request_with_all_its_tokens() {
        let args = RouterBenchArgs {
            requests: 40,
            concurrency: vec![1, 8],
            max_tokens: 5,
            rounds: 2,
            json: true,
            control_plane: false,
            decision_reports_per_s: 200,
            paths: PATHS.to_vec(),
            engine_tokens_per_s: None,
        };
        let report = measure(&args).await.expect("the benchmark runs");
        assert_eq!(report.levels.len(), 2);
        assert!(report.control_plane.is_none());
        for level in &report.levels {
            for path in PATHS {
                let figures = &level.paths[&path];
                assert_eq!(figures.requests, 80, "{path:?} at {}", level.concurrency);
                assert_eq!(figures.tokens, 400, "{path:?} at {}", level.concurrency);
                assert!(figures.ttft_p50_ms <= figures.total_p50_ms);
            }
            assert_eq!(level.throughput_vs_direct.len(), 3);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_control_plane_the_history_counts_every_routed_request() {
        let args = RouterBenchArgs {
            requests: 30,
            concurrency: vec![4],
            max_tokens: 2,
            rounds: 1,
            json: true,
            control_plane: true,
            decision_reports_per_s: 3,
            paths: PATHS.to_vec(),
            engine_tokens_per_s: None,
        };
        let report = measure(&args).await.expect("the benchmark runs");
        let cp = report.control_plane.expect("control-plane figures");
        // Warm-up (4 per router path) plus one round of each router path.
        let routed = 2 * (4 + 30);
        assert_eq!(cp.requests_in_history, routed, "{cp:?}");
        assert_eq!(cp.decisions, routed, "{cp:?}");
        assert!(cp.reported < cp.decisions, "sampled: {cp:?}");
        assert!(cp.polls >= 1);
    }
}

/// Options of `switchyard-bench stalled-readers`.
#[derive(Debug, Clone, clap::Args)]
pub struct StalledReadersArgs {
    /// `Generate` streams whose client reads the first frame and then nothing.
    #[arg(long, default_value_t = 500)]
    pub streams: usize,
    /// Tokens each asks for: more than a client's 64 KiB window and the router's buffers hold
    /// (a few thousand), so what flow control keeps on the worker shows.
    #[arg(long, default_value_t = 65_536)]
    pub max_tokens: u32,
    /// How long the clients read nothing.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub stall: Duration,
    /// Measure only this credit, in this process (the command runs itself once per setting so
    /// that one run's freed memory does not hide the next one's).
    #[arg(long, hide = true)]
    pub credit: Option<u32>,
}

/// This process's resident memory in MiB (router, worker and clients all run in it).
fn rss_mib() -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/self/status")?;
    Ok(kib / 1024.0)
}

/// `switchyard-bench stalled-readers`: what clients that stop reading cost, with the router's
/// flow control on (its default credit) and off, one after the other in this process.
pub async fn stalled_readers(args: StalledReadersArgs) -> anyhow::Result<()> {
    if args.streams == 0 || args.max_tokens == 0 {
        bail!("--streams and --max-tokens must be at least 1");
    }
    if let Some(credit) = args.credit {
        return stalled_readers_once(&args, credit).await;
    }
    println!(
        "{} Generate streams of {} tokens, each read for its first frame, then {:?} unread",
        args.streams, args.max_tokens, args.stall
    );
    println!(
        "credit_tokens  rss_before_mib  rss_stalled_peak_mib  per_stream_kib  rss_after_close_mib"
    );
    for credit in [RouterConfig::default().stream_credit_tokens, 0] {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(["stalled-readers", "--streams", &args.streams.to_string()])
            .args(["--max-tokens", &args.max_tokens.to_string()])
            .args([
                "--stall",
                &humantime::format_duration(args.stall).to_string(),
            ])
            .args(["--credit", &credit.to_string()])
            .status()?;
        if !status.success() {
            bail!("the run with credit {credit} failed: {status}");
        }
    }
    Ok(())
}

/// One setting of `stalled-readers`: a router, a worker and the clients in this process.
async fn stalled_readers_once(args: &StalledReadersArgs, credit: u32) -> anyhow::Result<()> {
    let cluster = start_cluster(
        unthrottled_engine(u32::try_from(args.streams)? + 8),
        false,
        bench_router_config(0, credit, args.max_tokens)?,
    )
    .await?;
    // One connection per client (a stalled stream would otherwise use up the connection's
    // window for the others), each with HTTP/2's default 64 KiB windows.
    let endpoint = Channel::from_shared(format!("http://{}", cluster.router_addr))?
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535);
    let before = rss_mib()?;
    let mut streams = Vec::with_capacity(args.streams);
    for i in 0..args.streams {
        let mut stream = InferenceClient::new(endpoint.connect().await?)
            .generate(generate_request(i, args.max_tokens))
            .await?
            .into_inner();
        while let Some(frame) = stream.message().await? {
            if matches!(classify_server_frame(frame), Event::Tokens { .. }) {
                break;
            }
        }
        streams.push(stream);
    }
    let mut peak = rss_mib()?;
    let until = Instant::now() + args.stall;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_mib()?);
    }
    drop(streams);
    // Let the cancelled generations unwind before reading what was given back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib()?;
    cluster.stop().await;
    println!(
        "{credit:>13}  {before:>14.1}  {peak:>20.1}  {:>14.1}  {after:>19.1}",
        (peak - before) * 1024.0 / args.streams as f64
    );
    Ok(())
}
