//! `switchyard-bench http-overhead`: what a router in front of an OpenAI-compatible backend adds
//! to time to first token — Switchyard side by side with SMG, on one backend, in one run.
//!
//! Everything runs on loopback as separate processes: the load-test backend
//! ([`crate::openai_backend`], this binary's `openai-backend` subcommand), SMG (`smg launch`
//! with the backend as its one worker URL), and Switchyard as deployed — a real etcd, a
//! `worker-wse` with the `gateway` engine pointed at the backend, and a `switchyard router`
//! serving its OpenAI-compatible HTTP door (two hops: router → worker → backend; SMG's is one).
//! Every path gets the same workload: `--requests` streaming chat completions (`stream: true`),
//! `--concurrency` of them in flight, each from a fresh client (so every run opens its
//! connections, as a new client would), paths alternating within each round and each round
//! starting with the next path, so machine drift and other load hit all of them alike:
//!
//! * `direct`: the backend alone;
//! * `smg`: SMG → backend;
//! * `switchyard`: router → worker-wse gateway → backend;
//! * `switchyard-hosted`: `switchyard router-wse`, the router with the gateway worker in its
//!   own process (dialled in process) → backend: one hop, like SMG.
//!
//! Reported per concurrency and path, as medians over the rounds: TTFT p50 and p99, what the
//! router adds to them over `direct` in the same round, requests/s and its ratio to `direct`,
//! the CPU time the router's own processes spent per request (SMG; Switchyard's router and
//! worker together), and the kernel's TCP counters over the run (SYN retransmits, listen-queue overflows): a
//! connection whose SYN was dropped shows as a TTFT of 1 s (Linux's initial SYN timeout) or
//! 3 s (the second) plus the request. Then, for each Switchyard path, its TTFT p50 and p99
//! minus SMG's in the same round: the median over the rounds with a distribution-free 95 %
//! interval, and "lower" or "higher" only where the interval leaves out zero. Every reply must
//! stream `--max-tokens` tokens and end with `[DONE]`, or the run fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use switchyard_tests::{Component, Etcd, list_router_workers, wait_until};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::multiturn::client::{ChatTarget, Message, chat};

/// Model name the backend serves and every request asks for.
const MODEL: &str = "loadtest";

/// Options of `switchyard-bench http-overhead`.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpOverheadArgs {
    /// Requests in flight at once (one run per level, per path, per round).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Requests per run.
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Rounds; each runs every path at every level once. Six is the fewest that give a 95 %
    /// interval of Switchyard's difference to SMG; at 64 in flight a run's median moves by up
    /// to ±1 ms from round to round here, so tell a difference below that with 20.
    #[arg(long, default_value_t = 6)]
    pub rounds: usize,
    /// Paths to run (direct, smg, switchyard, switchyard-hosted), in this order in round 1.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,smg,switchyard,switchyard-hosted"
    )]
    pub paths: Vec<PathKind>,
    /// Tokens per reply.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// The backend's time to first token.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
    pub backend_ttft: Duration,
    /// The backend's decode rate per stream, tokens per second.
    #[arg(long, default_value_t = 1000.0)]
    pub backend_tokens_per_s: f64,
    /// The backend's listen backlog (the kernel caps it at `net.core.somaxconn`).
    #[arg(long, default_value_t = switchyard_cluster::listen::LISTEN_BACKLOG)]
    pub backend_backlog: u32,
    /// An OpenAI-compatible backend already running at this `host:port` (e.g. llama.cpp's
    /// `llama-server`) instead of the load-test backend; the `--backend-*` options above then do
    /// not apply, and a reply may stop before `--max-tokens` (a model's end of text).
    #[arg(long)]
    pub backend_url: Option<String>,
    /// A new connection for every request (what a client of a server that closes each
    /// streamed connection, like `llama-server`, ends up doing).
    #[arg(long)]
    pub no_keep_alive: bool,
    /// The `smg` executable (bench/anchors/setup.sh installs it into target/anchors/venv).
    #[arg(long, default_value = "target/anchors/venv/bin/smg")]
    pub smg: PathBuf,
    /// SMG's routing policy.
    #[arg(long, default_value = "cache_aware")]
    pub smg_policy: String,
    /// Extra `smg launch` flags, one string (split on whitespace).
    #[arg(long, default_value = "")]
    pub smg_flags: String,
    /// Log level of SMG (`--log-level`) and of Switchyard's router and worker (`RUST_LOG`):
    /// the same for both, as a per-request log line costs each of them on the request path.
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Longest wait for one reply.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub request_timeout: Duration,
    /// Also write every run's figures to this file as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    Direct,
    Smg,
    Switchyard,
    SwitchyardHosted,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Smg => "smg",
            Self::Switchyard => "switchyard",
            Self::SwitchyardHosted => "switchyard-hosted",
        }
    }
}

/// Kernel TCP counters (the whole network namespace: other processes count too).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct TcpCounters {
    /// Connections this host opened (`Tcp: ActiveOpens`).
    pub active_opens: u64,
    /// SYNs sent again because no SYN-ACK came (`TcpExt: TCPSynRetrans`).
    pub syn_retrans: u64,
    /// Connections dropped because a listener's accept queue was full
    /// (`TcpExt: ListenOverflows`).
    pub listen_overflows: u64,
    /// SYNs a listener dropped for any reason (`TcpExt: ListenDrops`).
    pub listen_drops: u64,
}

impl TcpCounters {
    /// The counters now, from `/proc/net/snmp` and `/proc/net/netstat` (zero where missing).
    pub fn read() -> Self {
        let mut counters = Self::default();
        for file in ["/proc/net/snmp", "/proc/net/netstat"] {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            // Pairs of lines: `Prefix: names…` then `Prefix: values…`.
            for pair in lines.chunks(2) {
                let [names, values] = pair else { continue };
                for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
                    let value = value.parse().unwrap_or(0);
                    match (pair[0].split(':').next(), name) {
                        (Some("Tcp"), "ActiveOpens") => counters.active_opens = value,
                        (Some("TcpExt"), "TCPSynRetrans") => counters.syn_retrans = value,
                        (Some("TcpExt"), "ListenOverflows") => counters.listen_overflows = value,
                        (Some("TcpExt"), "ListenDrops") => counters.listen_drops = value,
                        _ => {}
                    }
                }
            }
        }
        counters
    }

    fn since(self, before: Self) -> Self {
        Self {
            active_opens: self.active_opens.saturating_sub(before.active_opens),
            syn_retrans: self.syn_retrans.saturating_sub(before.syn_retrans),
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
        }
    }
}

/// One run: one path, one concurrency, one round.
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub path: PathKind,
    pub concurrency: usize,
    pub round: usize,
    pub requests: usize,
    pub requests_per_s: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub ttft_max_ms: f64,
    pub total_p50_ms: f64,
    /// Replies whose first token took longer than one second.
    pub ttft_over_1s: u64,
    pub tcp: TcpCounters,
    /// CPU time (user + system) the path's own processes spent per request, in µs: SMG's
    /// for `smg`, router and worker together for `switchyard`, none for `direct`.
    pub proxy_cpu_us_per_request: Option<f64>,
}

/// CPU time (user + system, every thread, live or exited) of the processes `pids` and their
/// children, from procfs.
fn cpu_time(pids: &[u32]) -> anyhow::Result<Duration> {
    let ticks_per_s =
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("no CLK_TCK")? as f64;
    let mut ticks = 0u64;
    let mut pending = pids.to_vec();
    while let Some(pid) = pending.pop() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces) start with the state (3rd);
        // utime and stime are the 14th and 15th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc/<pid>/stat")?
            .1
            .split_whitespace()
            .collect();
        for field in [11, 12] {
            ticks += fields
                .get(field)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            pending.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_s))
}

/// A child process killed when dropped.
struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM first: the backend reports the routes it did not serve on the way out.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.start_kill();
    }
}

/// Starts the load-test backend (this binary's `openai-backend`); returns it and its address.
async fn start_backend(args: &HttpOverheadArgs) -> anyhow::Result<(Process, String)> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "openai-backend",
            "--model",
            MODEL,
            "--ttft",
            &humantime::format_duration(args.backend_ttft).to_string(),
            "--tokens-per-s",
            &args.backend_tokens_per_s.to_string(),
            "--backlog",
            &args.backend_backlog.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting openai-backend")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the backend did not start within 30 s")??
        .context("the backend exited before it listened")?;
    let addr = line
        .strip_prefix("backend http ")
        .with_context(|| format!("unexpected backend line {line:?}"))?
        .to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((Process { child }, addr))
}

/// Starts SMG in front of `backend`; returns it and its API base URL once it serves.
async fn start_smg(
    args: &HttpOverheadArgs,
    backend: &str,
) -> anyhow::Result<(Process, String, PathBuf)> {
    if !args.smg.exists() {
        bail!(
            "{} is missing: run bench/anchors/setup.sh (or pip install smg into a venv and pass \
             --smg), or leave smg out of --paths",
            args.smg.display()
        );
    }
    let port = switchyard_tests::free_port();
    let prometheus = switchyard_tests::free_port();
    let log = switchyard_tests::log_dir().join(format!("smg-{port}.log"));
    let log_file = std::fs::File::create(&log)?;
    let mut command = Command::new(&args.smg);
    command
        .args(["launch", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--worker-urls", &format!("http://{backend}")])
        .args(["--policy", &args.smg_policy])
        .args(["--prometheus-host", "127.0.0.1"])
        .args(["--prometheus-port", &prometheus.to_string()])
        .args(["--log-level", &args.log_level])
        .args(args.smg_flags.split_whitespace())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true);
    let child = command.spawn().context("starting smg")?;
    let process = Process { child };
    let base = format!("http://127.0.0.1:{port}/v1");
    Ok((process, base, log))
}

/// A running Switchyard in front of the backend: etcd, the router (and the gateway worker, in
/// its own process unless hosted by the router), and the router's OpenAI base URL.
struct Switchyard {
    _etcd: Etcd,
    router: Component,
    worker: Option<Component>,
    base: String,
}

impl Switchyard {
    /// The processes whose CPU time is the proxy's.
    fn pids(&self) -> Vec<u32> {
        [
            self.router.pid(),
            self.worker.as_ref().and_then(|c| c.pid()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Starts Switchyard in front of `backend`: etcd, a worker-wse gateway and a router — two
/// processes, or with `hosted` one (`switchyard router-wse`).
async fn start_switchyard(
    backend: &str,
    log_level: &str,
    hosted: bool,
) -> anyhow::Result<Switchyard> {
    let etcd = Etcd::start().await?;
    let env = [("RUST_LOG".to_string(), log_level.to_string())];
    let gateway_url = format!("http://{backend}/v1");
    let worker_id = if hosted { "wse-hosted" } else { "wse-gateway" };
    let engine = [
        "--engine",
        "gateway",
        "--gateway-url",
        &gateway_url,
        "--model",
        MODEL,
        // Slots enough for every level: this measures the path, not admission.
        "--max-concurrent",
        "1024",
    ]
    .map(String::from);
    let router_args = [
        "--etcd",
        &etcd.url,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]
    .map(String::from);
    let (worker, router) = if hosted {
        let args: Vec<String> = ["router-wse".to_string()]
            .into_iter()
            .chain(router_args)
            .chain(["--worker-id".to_string(), worker_id.to_string()])
            .chain(engine)
            .collect();
        // Announces the worker's address and the router's two.
        (
            None,
            Component::start_with_env("router", &args, &env, 3).await?,
        )
    } else {
        let args: Vec<String> = ["worker-wse", "--etcd", &etcd.url, "--listen", "127.0.0.1:0"]
            .map(String::from)
            .into_iter()
            .chain(["--id".to_string(), worker_id.to_string()])
            .chain(engine)
            .collect();
        let worker = Component::start_with_env("wse-gateway", &args, &env, 1).await?;
        let args: Vec<String> = ["router".to_string()]
            .into_iter()
            .chain(router_args)
            .collect();
        let router = Component::start_with_env("router", &args, &env, 2).await?;
        (Some(worker), router)
    };
    let grpc = router.component_addr("router", "grpc").to_string();
    wait_until(
        Duration::from_secs(30),
        "the router to link the gateway worker",
        || async {
            list_router_workers(&grpc)
                .await
                .is_ok_and(|ids| ids == [worker_id])
        },
    )
    .await?;
    let base = format!("http://{}/v1", router.component_addr("router", "http"));
    Ok(Switchyard {
        _etcd: etcd,
        router,
        worker,
        base,
    })
}

fn target(base: &str, args: &HttpOverheadArgs) -> ChatTarget {
    ChatTarget {
        endpoint: format!("{base}/chat/completions"),
        model: MODEL.into(),
        max_tokens: args.max_tokens,
        api_key: None,
        headers: Vec::new(),
        timeout: args.request_timeout,
    }
}

/// A short prompt, different for every request (no two share more than the instruction).
fn messages(index: usize) -> Vec<Message> {
    vec![Message {
        role: "user",
        content: format!(
            "Request {index}: in two sentences, explain why a load balancer in front of an \
             inference server should add as little latency as possible."
        ),
    }]
}

/// A fresh client: every run opens its own connections.
fn client(args: &HttpOverheadArgs) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10));
    if args.no_keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    Ok(builder.build()?)
}

/// Sends requests until one is answered in full (for at most `timeout`): the path is up and
/// routes.
async fn wait_serving(
    base: &str,
    args: &HttpOverheadArgs,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = client(args)?;
    let target = target(base, args);
    let started = Instant::now();
    loop {
        match chat(&client, &target, &messages(0), None).await {
            Ok(_) => return Ok(()),
            Err(error) if started.elapsed() > timeout => {
                return Err(error.context(format!("{base} did not serve within {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// One run: `requests` replies, `concurrency` in flight, from a fresh client.
async fn run_once(
    base: &str,
    args: &HttpOverheadArgs,
    path: PathKind,
    proxy_pids: &[u32],
    concurrency: usize,
    round: usize,
) -> anyhow::Result<RunFigures> {
    let cpu_before = cpu_time(proxy_pids)?;
    let client = client(args)?;
    let target = Arc::new(target(base, args));
    let next = Arc::new(AtomicUsize::new(0));
    let requests = args.requests;
    let expected = u64::from(args.max_tokens);
    let exact = args.backend_url.is_none();
    let tcp_before = TcpCounters::read();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, target, next) = (client.clone(), target.clone(), next.clone());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= requests {
                    return anyhow::Ok(samples);
                }
                let sent = Instant::now();
                let reply = chat(&client, &target, &messages(index), None)
                    .await
                    .with_context(|| format!("request {index}"))?;
                if reply.completion_tokens > expected
                    || (exact && reply.completion_tokens != expected)
                {
                    bail!(
                        "request {index}: {} tokens, expected {expected}",
                        reply.completion_tokens
                    );
                }
                samples.push((reply.ttft, sent.elapsed()));
            }
        });
    }
    let mut ttft = Histogram::<u64>::new(3)?;
    let mut total = Histogram::<u64>::new(3)?;
    let mut over_1s = 0;
    while let Some(joined) = tasks.join_next().await {
        for (t, all) in joined?? {
            over_1s += u64::from(t >= Duration::from_secs(1));
            ttft.record(t.as_micros().max(1) as u64)?;
            total.record(all.as_micros().max(1) as u64)?;
        }
    }
    let elapsed = started.elapsed();
    let tcp = TcpCounters::read().since(tcp_before);
    let proxy_cpu = cpu_time(proxy_pids)?.saturating_sub(cpu_before);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    Ok(RunFigures {
        path,
        concurrency,
        round,
        requests,
        requests_per_s: requests as f64 / elapsed.as_secs_f64(),
        ttft_p50_ms: ms(&ttft, 0.5),
        ttft_p99_ms: ms(&ttft, 0.99),
        ttft_max_ms: ttft.max() as f64 / 1e3,
        total_p50_ms: ms(&total, 0.5),
        ttft_over_1s: over_1s,
        tcp,
        proxy_cpu_us_per_request: (!proxy_pids.is_empty())
            .then(|| proxy_cpu.as_secs_f64() * 1e6 / requests as f64),
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The table: per level and path, medians over the rounds (the largest TTFT and the counts are
/// over all of them).
fn table(runs: &[RunFigures], args: &HttpOverheadArgs) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4} {:<11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8}",
        "conc",
        "path",
        "ttft p50",
        "ttft p99",
        "ttft max",
        "added p50",
        "added p99",
        "req/s",
        "x direct",
        "proxy cpu",
        ">1s ttft",
        "syn retx",
        "overflow"
    );
    let direct = |round: usize, concurrency: usize| {
        runs.iter().find(|r| {
            r.path == PathKind::Direct && r.round == round && r.concurrency == concurrency
        })
    };
    for &concurrency in &args.concurrency {
        for &path in &args.paths {
            let mine: Vec<&RunFigures> = runs
                .iter()
                .filter(|r| r.path == path && r.concurrency == concurrency)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let pick = |f: fn(&RunFigures) -> f64| median(mine.iter().map(|r| f(r)).collect());
            // Added latency and the throughput ratio are taken within each round, then the median.
            let versus = |f: fn(&RunFigures, &RunFigures) -> f64| {
                median(
                    mine.iter()
                        .filter_map(|r| direct(r.round, concurrency).map(|d| f(r, d)))
                        .collect(),
                )
            };
            let sum = |f: fn(&RunFigures) -> u64| mine.iter().map(|r| f(r)).sum::<u64>();
            let cpu: Vec<f64> = mine
                .iter()
                .filter_map(|r| r.proxy_cpu_us_per_request)
                .collect();
            let cpu_per_request = if cpu.is_empty() {
                "-".to_string()
            } else {
                format!("{:.0} µs", median(cpu))
            };
            let _ = writeln!(
                out,
                "{:>4} {:<11} {:>6.1} ms {:>6.1} ms {:>6.1} ms {:>+7.1} ms {:>+7.1} ms {:>8.0} {:>7.2}x {:>9} {:>8} {:>9} {:>8}",
                concurrency,
                path.name(),
                pick(|r| r.ttft_p50_ms),
                pick(|r| r.ttft_p99_ms),
                mine.iter().map(|r| r.ttft_max_ms).fold(0.0, f64::max),
                versus(|r, d| r.ttft_p50_ms - d.ttft_p50_ms),
                versus(|r, d| r.ttft_p99_ms - d.ttft_p99_ms),
                pick(|r| r.requests_per_s),
                versus(|r, d| r.requests_per_s / d.requests_per_s),
                cpu_per_request,
                sum(|r| r.ttft_over_1s),
                sum(|r| r.tcp.syn_retrans),
                sum(|r| r.tcp.listen_overflows),
            );
        }
    }
    out
}

/// A distribution-free confidence interval for the median of `values` at `level` (e.g. 0.95):
/// the order statistics a sign test puts there — `[x(k), x(n+1-k)]` for the largest `k` with
/// P(Binomial(n, ½) < k) ≤ (1 − level) / 2. `None` when there are too few values for that level
/// (fewer than 6 at 95 %).
fn median_interval(values: &[f64], level: f64) -> Option<(f64, f64)> {
    let n = values.len();
    let tail = (1.0 - level) / 2.0;
    // P(B = i) in log space, so that no term underflows however many values there are.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let (mut ln_choose, mut below) = (0.0f64, 0.0f64);
    let mut k = 0;
    for i in 0..n.div_ceil(2) {
        below += (ln_choose + ln_half_n).exp();
        if below > tail {
            break;
        }
        k = i + 1;
        ln_choose += ((n - i) as f64 / (i + 1) as f64).ln();
    }
    if k == 0 {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some((sorted[k - 1], sorted[n - k]))
}

/// Switchyard against SMG round by round: in each round both ran back to back on the same
/// backend, so the difference of their TTFTs is what one router adds over the other, with the
/// machine's drift between rounds taken out. Reported as the median difference over the rounds
/// and its 95 % interval; a verdict only where the interval leaves out zero.
fn versus_smg(runs: &[RunFigures], args: &HttpOverheadArgs) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let smg = |round: usize, concurrency: usize| {
        runs.iter()
            .find(|r| r.path == PathKind::Smg && r.round == round && r.concurrency == concurrency)
    };
    for &concurrency in &args.concurrency {
        for path in [PathKind::Switchyard, PathKind::SwitchyardHosted] {
            let pairs: Vec<(&RunFigures, &RunFigures)> = runs
                .iter()
                .filter(|r| r.path == path && r.concurrency == concurrency)
                .filter_map(|r| smg(r.round, concurrency).map(|s| (r, s)))
                .collect();
            if pairs.is_empty() {
                continue;
            }
            let mut line = format!(
                "{concurrency:>4} {:<17} minus smg over {} rounds:",
                path.name(),
                pairs.len()
            );
            for (name, pick) in [
                (
                    "p50",
                    (|r: &RunFigures| r.ttft_p50_ms) as fn(&RunFigures) -> f64,
                ),
                ("p99", |r: &RunFigures| r.ttft_p99_ms),
            ] {
                let differences: Vec<f64> = pairs.iter().map(|(r, s)| pick(r) - pick(s)).collect();
                let _ = write!(line, "  {name} {:+.2} ms", median(differences.clone()));
                match median_interval(&differences, 0.95) {
                    Some((low, high)) => {
                        let verdict = if high < 0.0 {
                            "lower"
                        } else if low > 0.0 {
                            "higher"
                        } else {
                            "no difference shown"
                        };
                        let _ = write!(line, " [95 % {low:+.2} … {high:+.2}] {verdict}");
                    }
                    None => line.push_str(" (a 95 % interval needs 6 rounds or more)"),
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

pub async fn run(args: HttpOverheadArgs) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: every level must be at least 1");
    }
    if args.requests == 0 || args.rounds == 0 || args.max_tokens == 0 || args.paths.is_empty() {
        bail!("--requests, --rounds, --max-tokens and --paths must not be zero or empty");
    }
    let mut paths = Vec::new();
    for &path in &args.paths {
        if !paths.contains(&path) {
            paths.push(path);
        }
    }
    let (_backend, backend) = match &args.backend_url {
        Some(url) => (None, url.clone()),
        None => {
            let (process, addr) = start_backend(&args).await?;
            (Some(process), addr)
        }
    };
    let mut bases = BTreeMap::new();
    let mut proxy_pids: BTreeMap<PathKind, Vec<u32>> = BTreeMap::new();
    bases.insert(PathKind::Direct, format!("http://{backend}/v1"));
    let mut _smg = None;
    if paths.contains(&PathKind::Smg) {
        let (process, base, log) = start_smg(&args, &backend).await?;
        if let Err(error) = wait_serving(&base, &args, Duration::from_secs(60)).await {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("{error:#}\nsmg log:\n{log}");
        }
        proxy_pids.insert(PathKind::Smg, process.child.id().into_iter().collect());
        _smg = Some(process);
        bases.insert(PathKind::Smg, base);
    }
    let mut switchyards = Vec::new();
    for (path, hosted) in [
        (PathKind::Switchyard, false),
        (PathKind::SwitchyardHosted, true),
    ] {
        if !paths.contains(&path) {
            continue;
        }
        let switchyard = start_switchyard(&backend, &args.log_level, hosted).await?;
        wait_serving(&switchyard.base, &args, Duration::from_secs(30)).await?;
        proxy_pids.insert(path, switchyard.pids());
        bases.insert(path, switchyard.base.clone());
        switchyards.push(switchyard);
    }
    wait_serving(&bases[&PathKind::Direct], &args, Duration::from_secs(10)).await?;
    match &args.backend_url {
        Some(url) => eprintln!(
            "backend: {url}, up to {} tokens per reply; {} requests per run, {} rounds",
            args.max_tokens, args.requests, args.rounds
        ),
        None => eprintln!(
            "backend: {} ttft, {} tokens/s, {} tokens per reply, backlog {}; {} requests per \
             run, {} rounds",
            humantime::format_duration(args.backend_ttft),
            args.backend_tokens_per_s,
            args.max_tokens,
            args.backend_backlog,
            args.requests,
            args.rounds
        ),
    }
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for &concurrency in &args.concurrency {
            // Each round starts with the next path, so no path always runs first.
            let mut order = paths.clone();
            order.rotate_left((round - 1) % paths.len());
            for path in order {
                let pids = proxy_pids.get(&path).map_or(&[][..], Vec::as_slice);
                let figures =
                    run_once(&bases[&path], &args, path, pids, concurrency, round).await?;
                eprintln!(
                    "round {round} c={concurrency:<3} {:<10} ttft p50 {:>7.1} ms p99 {:>7.1} ms \
                     max {:>7.1} ms, {:>6.0} req/s, proxy cpu/req {}, ttft > 1 s: {}, tcp {:?}",
                    path.name(),
                    figures.ttft_p50_ms,
                    figures.ttft_p99_ms,
                    figures.ttft_max_ms,
                    figures.requests_per_s,
                    figures
                        .proxy_cpu_us_per_request
                        .map_or("-".to_string(), |us| format!("{us:.0} µs")),
                    figures.ttft_over_1s,
                    figures.tcp
                );
                runs.push(figures);
            }
        }
    }
    print!("{}", table(&runs, &args));
    let head_to_head = versus_smg(&runs, &args);
    if !head_to_head.is_empty() {
        print!("\nTTFT, Switchyard minus SMG in the same round:\n{head_to_head}");
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&runs)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_interval_is_the_sign_tests_order_statistics() {
        let values: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        // n = 20: P(B ≤ 5) = 0.0207 ≤ 0.025 < P(B ≤ 6) = 0.0577, so ranks 6 and 15.
        assert_eq!(median_interval(&values, 0.95), Some((6.0, 15.0)));
        // n = 6: P(B = 0) = 0.0156, the narrowest 95 % interval is the whole range.
        assert_eq!(
            median_interval(&[3.0, 1.0, 2.0, 6.0, 5.0, 4.0], 0.95),
            Some((1.0, 6.0))
        );
        // n = 5: even the whole range covers the median with only 1 − 2/32 = 93.75 %.
        assert_eq!(median_interval(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.95), None);
        assert_eq!(median_interval(&[], 0.95), None);
        // Thousands of rounds: no term underflows, and the interval closes in on the median.
        let many: Vec<f64> = (0..5000).map(f64::from).collect();
        let (low, high) = median_interval(&many, 0.95).expect("an interval");
        assert!(low > 2400.0 && high < 2600.0 && low < 2499.5 && high > 2499.5);
    }

    #[test]
    fn cpu_time_from_procfs_agrees_with_the_kernels_own_account() {
        let rusage = || crate::router::process_cpu().expect("getrusage");
        // Burn CPU until the kernel has counted at least 200 ms of it for this process.
        let mut x = 0u64;
        while rusage() < Duration::from_millis(200) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let expected = rusage();
        let procfs = cpu_time(&[std::process::id()]).expect("procfs readable");
        let gap = procfs.abs_diff(expected);
        // procfs counts in clock ticks (10 ms at the usual 100 Hz).
        assert!(
            gap <= Duration::from_millis(50),
            "procfs {procfs:?}, getrusage {expected:?}"
        );
    }
}
