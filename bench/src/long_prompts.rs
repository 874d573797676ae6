//! `switchyard-bench long-prompts`: does a long prompt hold up the requests behind it?
//!
//! The router encodes every prompt with the workers' tokenizer before placing it, and a long
//! prompt takes milliseconds to encode (`cargo bench -p switchyard-worker-gpu --bench
//! tokenize`). A real etcd, a native-engine worker on SmolLM2 and the router run as separate
//! `switchyard` processes (the release binary next to this one). On one session, each trial
//! times a short request's `Accepted` alone, then again when it is sent right behind a request
//! whose prompt carries `--prompt-kib` of text; both are cancelled once the short one is
//! accepted, so the worker never prefills the long prompt for long.
//!
//! Then the same on a `Worker.Serve` stream of the bench's own, as a router sends requests
//! before it has a model's tokenizer: text without prompt ids, which the engine encodes. Each
//! trial times a short start's first token alone, then right behind a start carrying the long
//! text (cancelled once the short one has its token).
//!
//! Last, what truncation costs the router: a conversation of `--conversation-kib` in 2 KiB turns,
//! longer than the context, asked with `truncation: auto` (the router tokenizes it a few times
//! to find the fewest oldest turns to drop) is timed until its `Accepted`, next to the same
//! conversation without truncation, refused after one tokenization.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use switchyard_client::SessionClient;
use switchyard_proto::v1::{self, router_frame, server_frame::Frame, worker_frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use crate::streams::ProcessCluster;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

/// Options of `switchyard-bench long-prompts`.
#[derive(Debug, Clone, clap::Args)]
pub struct LongPromptsArgs {
    /// The model file the worker serves.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model_path: PathBuf,
    /// Text in the long request's prompt, KiB (one run per size).
    #[arg(long, value_delimiter = ',', default_value = "40,200")]
    pub prompt_kib: Vec<usize>,
    /// Trials per size.
    #[arg(long, default_value_t = 8)]
    pub trials: usize,
    /// Text of the conversations asked with truncation, KiB (one run per size; each longer
    /// than the model's context).
    #[arg(long, value_delimiter = ',', default_value = "80,400")]
    pub conversation_kib: Vec<usize>,
}

fn request(id: &str, content: &str) -> v1::GenerateRequest {
    switchyard_tests::chat_request(MODEL, id, v1::RequestClass::CostSensitive, content, 1)
}

/// Starts a short request and waits for its `Accepted`; returns how long that took. Every
/// request in `also` (already started) and the short one are cancelled and read to their end.
async fn short_accepted(
    session: &SessionClient,
    id: String,
    also: Vec<switchyard_client::RequestStream>,
) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    let mut short = session.start(request(&id, "Say hello."))?;
    let first = short.next().await;
    let took = sent.elapsed();
    if !matches!(first, Some(Frame::Accepted(_))) {
        bail!("{id}: expected Accepted first, got {first:?}");
    }
    for stream in also.iter().map(|s| s.request_id().to_string()).chain([id]) {
        let _ = session.cancel(&stream);
    }
    short.collect().await;
    for stream in also {
        stream.collect().await;
    }
    Ok(took)
}

/// One `Worker.Serve` stream: starts and cancels out, the worker's frames in.
struct WorkerStream {
    out: mpsc::Sender<v1::RouterFrame>,
    frames: Streaming<v1::WorkerFrame>,
}

impl WorkerStream {
    async fn open(address: &str) -> anyhow::Result<Self> {
        let channel = switchyard_client::connect_channel(address).await?;
        let (out, rx) = mpsc::channel(16);
        let frames = v1::worker_client::WorkerClient::new(channel)
            .serve(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { out, frames })
    }

    async fn send(&self, frame: router_frame::Frame) -> anyhow::Result<()> {
        self.out
            .send(v1::RouterFrame { frame: Some(frame) })
            .await
            .context("the worker closed the stream")
    }

    /// Starts `id` on `text` as text (no prompt ids), one token.
    async fn start(&self, id: &str, text: &str) -> anyhow::Result<()> {
        self.send(router_frame::Frame::Start(v1::WorkerStart {
            request_id: id.into(),
            model: MODEL.into(),
            messages: vec![v1::ChatMessage {
                role: "user".into(),
                content: text.into(),
                ..Default::default()
            }],
            sampling: Some(v1::SamplingParams {
                max_tokens: 1,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
    }

    /// Reads frames until `id` has a token (`Ok(true)`) or ends without one (`Ok(false)`);
    /// requests in `ended` that end meanwhile are taken out of it.
    async fn first_token(&mut self, id: &str, ended: &mut Vec<String>) -> anyhow::Result<bool> {
        loop {
            let frame = self
                .frames
                .message()
                .await?
                .context("the worker ended the stream")?;
            let (request, is_token) = match frame.frame {
                Some(worker_frame::Frame::Tokens(t)) => (t.request_id, true),
                Some(worker_frame::Frame::Finished(f)) => (f.request_id, false),
                Some(worker_frame::Frame::Failed(f)) => (f.request_id, false),
                _ => continue,
            };
            if request == id {
                return Ok(is_token);
            }
            if !is_token {
                ended.retain(|e| *e != request);
            }
        }
    }

    /// Cancels `ids` and reads until each has ended.
    async fn end(&mut self, mut ids: Vec<String>) -> anyhow::Result<()> {
        for id in &ids {
            self.send(router_frame::Frame::Cancel(v1::WorkerCancel {
                request_id: id.clone(),
                ..Default::default()
            }))
            .await?;
        }
        while !ids.is_empty() {
            let frame = self
                .frames
                .message()
                .await?
                .context("the worker ended the stream")?;
            let ended = match frame.frame {
                Some(worker_frame::Frame::Finished(f)) => f.request_id,
                Some(worker_frame::Frame::Failed(f)) => f.request_id,
                _ => continue,
            };
            ids.retain(|id| *id != ended);
        }
        Ok(())
    }
}

/// Time from sending a short start on `stream` to its first token, right behind a start
/// carrying `long` when there is one.
async fn short_first_token(
    stream: &mut WorkerStream,
    id: String,
    long: Option<(String, &str)>,
) -> anyhow::Result<Duration> {
    let mut pending = Vec::new();
    if let Some((long_id, text)) = long {
        stream.start(&long_id, text).await?;
        pending.push(long_id);
    }
    let sent = Instant::now();
    stream.start(&id, "Say hello.").await?;
    if !stream.first_token(&id, &mut pending).await? {
        bail!("{id} ended without a token");
    }
    let took = sent.elapsed();
    pending.push(id);
    stream.end(pending).await?;
    Ok(took)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub async fn run(args: LongPromptsArgs) -> anyhow::Result<()> {
    if args.trials == 0 || args.prompt_kib.is_empty() {
        bail!("--trials and --prompt-kib must name at least one");
    }
    let model = args
        .model_path
        .canonicalize()
        .with_context(|| format!("{} (run scripts/fetch-model.sh)", args.model_path.display()))?;
    let model = model.display().to_string();
    let cluster = ProcessCluster::serving(
        MODEL,
        1,
        &[
            "--engine",
            "candle",
            "--model-path",
            &model,
            "--max-concurrent",
            "8",
        ],
    )
    .await?;
    // The router tokenizes only once it has fetched the worker's tokenizer.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&cluster.router.log)
        .unwrap_or_default()
        .contains("tokenizer fetched")
    {
        if Instant::now() > deadline {
            bail!("the router did not fetch the model's tokenizer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = SessionClient::connect(&cluster.router.addr("grpc").to_string()).await?;
    let mut worker = WorkerStream::open(&cluster.workers[0].addr("grpc").to_string()).await?;
    println!(
        "time until a short request is accepted, {} trials per size (ms)",
        args.trials
    );
    print_table(&args, async |id: String, long: Option<&str>| {
        let also = match long {
            Some(text) => vec![session.start(request(&format!("long-{id}"), text))?],
            None => Vec::new(),
        };
        short_accepted(&session, id, also).await
    })
    .await?;
    println!(
        "\non a worker stream, text without prompt ids: time until a short start's first token, {} trials per size (ms)",
        args.trials
    );
    print_table(&args, async |id: String, long: Option<&str>| {
        let long = long.map(|text| (format!("long-{id}"), text));
        short_first_token(&mut worker, id, long).await
    })
    .await?;
    println!(
        "\na conversation in 2 KiB turns: time until accepted with truncation auto, next to \
         refused whole without it (one tokenization), {} trials per size (ms)",
        args.trials
    );
    println!("conversation  turns  auto p50    max  refused p50  auto / refused");
    for kib in &args.conversation_kib {
        let messages = conversation(*kib);
        let (mut auto, mut refused) = (Vec::new(), Vec::new());
        for trial in 0..args.trials {
            for (truncation, times) in [
                (v1::Truncation::Auto, &mut auto),
                (v1::Truncation::Disabled, &mut refused),
            ] {
                let mut asked = request(&format!("turns-{kib}-{trial}-{truncation:?}"), "");
                asked.messages = messages.clone();
                asked.truncation = truncation as i32;
                let id = asked.request_id.clone();
                let sent = Instant::now();
                let mut stream = session.start(asked)?;
                let first = stream.next().await;
                times.push(sent.elapsed());
                let accepted = matches!(first, Some(Frame::Accepted(_)));
                if accepted != (truncation == v1::Truncation::Auto) {
                    bail!("{id}: {truncation:?} answered {first:?} first");
                }
                let _ = session.cancel(&id);
                stream.collect().await;
            }
        }
        auto.sort();
        refused.sort();
        let median = |v: &[Duration]| ms(v[v.len() / 2]);
        println!(
            "{kib:>8} KiB  {:>5}  {:>8.2}  {:>5.2}  {:>11.2}  {:>13.2}×",
            messages.len(),
            median(&auto),
            ms(auto[auto.len() - 1]),
            median(&refused),
            median(&auto) / median(&refused),
        );
    }
    Ok(())
}

/// About `kib` KiB of conversation in 2 KiB turns, user and assistant in turn, ending with
/// the user's.
fn conversation(kib: usize) -> Vec<v1::ChatMessage> {
    let turns = (kib / 2).max(1) | 1;
    (0..turns)
        .map(|turn| v1::ChatMessage {
            role: if turn % 2 == 0 { "user" } else { "assistant" }.into(),
            content: long_text(2),
            ..Default::default()
        })
        .collect()
}

/// For each size, `args.trials` times: a short request timed by `short` alone, then right
/// behind a long prompt of that size; a row of medians per size.
async fn print_table(
    args: &LongPromptsArgs,
    mut short: impl AsyncFnMut(String, Option<&str>) -> anyhow::Result<Duration>,
) -> anyhow::Result<()> {
    println!("{HEADER}");
    for kib in &args.prompt_kib {
        let text = long_text(*kib);
        let (mut alone, mut behind) = (Vec::new(), Vec::new());
        for trial in 0..args.trials {
            alone.push(short(format!("alone-{kib}-{trial}"), None).await?);
            behind.push(short(format!("behind-{kib}-{trial}"), Some(&text)).await?);
        }
        print_row(*kib, alone, behind);
    }
    Ok(())
}

const HEADER: &str = "prompt   alone p50  behind a long prompt p50    max";

fn print_row(kib: usize, mut alone: Vec<Duration>, mut behind: Vec<Duration>) {
    alone.sort();
    behind.sort();
    let median = |v: &[Duration]| ms(v[v.len() / 2]);
    println!(
        "{kib:>3} KiB  {:>9.2}  {:>24.2}  {:>5.2}",
        median(&alone),
        median(&behind),
        ms(behind[behind.len() - 1]),
    );
}

/// About `kib` KiB of prose.
fn long_text(kib: usize) -> String {
    "The lighthouse keeper counted the waves and wrote each one down. ".repeat(kib * 1024 / 66)
}
