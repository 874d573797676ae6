//! `switchyard chat`: an interactive terminal chat over one persistent session.
//!
//! - Type a line and press Enter to send it.
//! - **Ctrl-C during a reply** stops it; the partial reply stays in the conversation and your
//!   next line steers from there.
//! - **Typing a line during a reply** redirects it on the fly (an `Interrupt` frame: the
//!   generation stops and continues the same request with your new instructions).
//! - Ctrl-C at the prompt (or end of input) exits.
//! - If the router restarts or the connection drops, the reply in progress ends with an error
//!   and the client reopens its session in the background; a line sent meanwhile waits for it
//!   (up to [`RECONNECT_WAIT`]).
//! - A router started with `--api-keys-file` needs a key: `--api-key-file` (its first line)
//!   or the key itself in `SWITCHYARD_API_KEY`; it is sent as `authorization: Bearer <key>`
//!   on the session and never printed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use switchyard_client::{ClientError, Credentials, RequestStream, SessionClient};
use switchyard_proto::v1::{
    self, ChatMessage, GenerateRequest, RequestClass, SamplingParams, server_frame::Frame,
};
use tokio::sync::mpsc;

/// Longest a line typed while the session is being reopened waits for it.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(30);

/// The environment variable that may hold the API key itself (a flag would show it in the
/// process list).
pub const API_KEY_ENV: &str = "SWITCHYARD_API_KEY";

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// Router gRPC address.
    #[arg(long, env = "SWITCHYARD_ROUTER", default_value = "127.0.0.1:50051")]
    pub router: String,
    /// CA certificate (PEM) to trust: the router serves TLS (e.g. the `tls ca` file that
    /// `switchyard up --tls` prints).
    #[arg(long, env = "SWITCHYARD_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// File holding an API key (its first line), for a router started with --api-keys-file;
    /// sent as `authorization: Bearer <key>`. The key itself may instead be in the environment
    /// variable SWITCHYARD_API_KEY (this file wins over it).
    #[arg(long, env = "SWITCHYARD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Model to talk to; default: the one model the router serves (a real model is preferred
    /// over the synthetic load-test backend).
    #[arg(long)]
    pub model: Option<String>,
    /// Most tokens generated for each answer; with the conversation so far they must fit the
    /// model's context, or the router refuses the turn.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_tokens: u32,
    /// Send requests as latency-critical (default: cost-sensitive).
    #[arg(long)]
    pub fast: bool,
    /// Optional system prompt.
    #[arg(long)]
    pub system: Option<String>,
}

fn user(content: String) -> ChatMessage {
    ChatMessage {
        role: "user".into(),
        content,
        ..Default::default()
    }
}

/// A line of input that is not UTF-8 text (a terminal in another encoding, a binary paste):
/// said and skipped, where reading it as text would end the input there.
#[derive(Debug, PartialEq)]
pub struct NotUtf8;

/// Lines from stdin, read on a blocking thread.
fn stdin_lines() -> mpsc::UnboundedReceiver<Result<String, NotUtf8>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || read_lines(std::io::stdin().lock(), &tx));
    rx
}

/// Sends each line of `input` (without its `\n` or `\r\n`) until its end, a read error, or
/// the receiver is gone.
fn read_lines(
    mut input: impl std::io::BufRead,
    tx: &mpsc::UnboundedSender<Result<String, NotUtf8>>,
) {
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        match input.read_until(b'\n', &mut bytes) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        let line = String::from_utf8(std::mem::take(&mut bytes)).map_err(|_| NotUtf8);
        if tx.send(line).is_err() {
            return;
        }
    }
}

const NOT_UTF8: &str = "[not sent: that line is not UTF-8 text — is the terminal set to UTF-8?]";

fn prompt() {
    print!("\n> ");
    let _ = std::io::stdout().flush();
}

/// How a failed reply is shown: the gRPC code by name (`14` means nothing to a reader).
fn failure(failed: &v1::Failed) -> String {
    format!(
        "[error {:?}: {}]",
        tonic::Code::from(failed.code),
        failed.message
    )
}

/// The models a ready worker serves.
fn served(models: &v1::ListModelsResponse) -> Vec<&str> {
    models
        .models
        .iter()
        .filter(|m| !m.workers.is_empty())
        .map(|m| m.id.as_str())
        .collect()
}

/// `model` when the router serves it, else an error naming what it serves.
pub fn served_model(models: &v1::ListModelsResponse, model: String) -> anyhow::Result<String> {
    let served = served(models);
    if served.contains(&model.as_str()) {
        return Ok(model);
    }
    match served.as_slice() {
        [] => anyhow::bail!("--model {model}: the router serves no model yet (no ready worker)"),
        _ => anyhow::bail!(
            "--model {model}: the router does not serve it; it serves {} (leave out --model \
             for the default)",
            served.join(", ")
        ),
    }
}

/// The model to talk to when none was named: the router's only model other than the
/// synthetic load-test backend, else `synthetic` when that is all it serves.
pub fn default_model(models: &v1::ListModelsResponse) -> anyhow::Result<String> {
    let served = served(models);
    let real: Vec<&str> = served
        .iter()
        .copied()
        .filter(|m| *m != "synthetic")
        .collect();
    let candidates = if real.is_empty() { &served } else { &real };
    match candidates.as_slice() {
        [] => anyhow::bail!("the router serves no model yet (no ready worker)"),
        [one] => Ok(one.to_string()),
        many => anyhow::bail!(
            "the router serves several models ({}): pick one with --model",
            many.join(", ")
        ),
    }
}

/// Starts `request`, waiting for the session to be reopened if it is down (the router
/// restarted). `None`: it was not reopened within [`RECONNECT_WAIT`], or Ctrl-C.
async fn start(
    client: &SessionClient,
    request: GenerateRequest,
) -> anyhow::Result<Option<RequestStream>> {
    match client.start(request.clone()) {
        Err(ClientError::Disconnected) => {}
        started => return Ok(Some(started?)),
    }
    eprintln!("[reconnecting to the router…]");
    tokio::select! {
        reopened = tokio::time::timeout(RECONNECT_WAIT, client.connected()) => {
            if reopened.is_err() {
                eprintln!("[the router did not come back within {RECONNECT_WAIT:?}]");
                return Ok(None);
            }
        }
        _ = tokio::signal::ctrl_c() => return Ok(None),
    }
    Ok(Some(client.start(request)?))
}

/// The API key of `--api-key-file`, else of `SWITCHYARD_API_KEY` (unset or empty: none).
fn credentials(args: &ChatArgs) -> anyhow::Result<Credentials> {
    let (key, source) = match &args.api_key_file {
        Some(file) => (
            read_key_file(file)?,
            format!("--api-key-file {}", file.display()),
        ),
        None => match std::env::var(API_KEY_ENV) {
            Ok(key) if !key.trim().is_empty() => (key.trim().to_string(), API_KEY_ENV.into()),
            Ok(_) | Err(std::env::VarError::NotPresent) => return Ok(Credentials::none()),
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("{API_KEY_ENV}: not valid UTF-8")
            }
        },
    };
    // The error names where the key came from, never the key.
    Credentials::api_key(&key).with_context(|| source)
}

/// The key in `file`: its first line, trimmed.
fn read_key_file(file: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the api key file {}", file.display()))?;
    let key = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(
        !key.is_empty(),
        "--api-key-file {}: empty; it holds one api key",
        file.display()
    );
    Ok(key)
}

/// Says how to pass a key when the router asks for one, and the CA when a plaintext session
/// broke on the connection (a TLS-only router breaks every one).
fn explain(error: ClientError, args: &ChatArgs) -> anyhow::Error {
    match &error {
        ClientError::Status(status) if status.code() == tonic::Code::Unauthenticated => {
            anyhow::anyhow!(
                "{error} (give the router's api key: --api-key-file FILE, or the key itself in \
                 {API_KEY_ENV})"
            )
        }
        // Another gRPC server (the control plane, a worker) has no Inference service; an HTTP
        // server (the router's OpenAI-compatible port, the dashboard) answers in plain HTTP.
        ClientError::Status(status)
            if status.code() == tonic::Code::Unimplemented
                || status
                    .message()
                    .contains("while receiving response with status") =>
        {
            anyhow::anyhow!(
                "{} is not a Switchyard router's gRPC address ({error}): use the `router grpc` \
                 address that `switchyard up` prints (127.0.0.1:50051 by default)",
                args.router
            )
        }
        ClientError::Connection(_) if args.tls_ca_file.is_none() => anyhow::anyhow!(
            "{error} (the router at {} may speak TLS: pass --tls-ca-file)",
            args.router
        ),
        _ => error.into(),
    }
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let credentials = credentials(&args)?;
    let channel = match &args.tls_ca_file {
        Some(ca) => switchyard_client::connect_tls(&args.router, ca).await,
        None => switchyard_client::connect_channel(&args.router).await,
    };
    let channel = channel.map_err(|error| match error {
        ClientError::Connect(_) => {
            // Its root cause says why: refused, no such host, timed out.
            let error = anyhow::Error::from(error);
            anyhow::anyhow!(
                "no router answers at {} ({}): start a local cluster with `switchyard \
                 up` (scripts/up.sh), or point --router at a running router",
                args.router,
                error.root_cause()
            )
        }
        other => other.into(),
    })?;
    let client = SessionClient::open_with(channel, credentials)
        .await
        .map_err(|error| explain(error, &args))?;
    let models = client
        .inference()
        .list_models(v1::ListModelsRequest {})
        .await
        .map_err(|status| explain(status.into(), &args))?
        .into_inner();
    let model = match args.model.clone() {
        // Checked now: a misspelt name fails once here, not on every line typed.
        Some(model) => served_model(&models, model)?,
        None => default_model(&models)?,
    };
    let mut lines = stdin_lines();
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
            ..Default::default()
        });
    }
    let class = if args.fast {
        RequestClass::LatencyCritical
    } else {
        RequestClass::CostSensitive
    };
    eprintln!(
        "connected to {} ({model}) — Ctrl-C stops a reply, a line typed during a reply redirects it",
        args.router
    );
    let mut turn = 0u64;
    loop {
        prompt();
        let line = tokio::select! {
            line = lines.recv() => line,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(line) = line else { break };
        let Ok(line) = line else {
            eprintln!("{NOT_UTF8}");
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        history.push(user(line));
        // Where this turn's line sits: a turn refused outright is taken back out from here.
        let turn_start = history.len() - 1;
        turn += 1;
        let request_id = format!("chat-{turn}");
        let request = GenerateRequest {
            request_id: request_id.clone(),
            model: model.clone(),
            messages: history.clone(),
            sampling: Some(SamplingParams {
                max_tokens: args.max_tokens,
                ..Default::default()
            }),
            class: class as i32,
            ..Default::default()
        };
        let Some(mut stream) = start(&client, request).await? else {
            // Unsent: the line is not part of the conversation.
            history.pop();
            continue;
        };
        let mut reply = String::new();
        loop {
            tokio::select! {
                frame = stream.next() => match frame {
                    Some(Frame::Tokens(tokens)) => {
                        print!("{}", tokens.text);
                        let _ = std::io::stdout().flush();
                        reply.push_str(&tokens.text);
                    }
                    Some(Frame::Accepted(_)) => {}
                    Some(Frame::Moved(moved)) => {
                        eprint!("\n[moved to {} ({}): {}]\n", moved.to_worker_id, moved.to_pool, moved.reason);
                    }
                    Some(Frame::Rejected(rejected)) => {
                        eprint!("\n[{} not taken: {}]\n", rejected.frame, rejected.message);
                    }
                    Some(Frame::Finished(_)) | None => break,
                    Some(Frame::Failed(failed)) => {
                        eprintln!("\n{}", failure(&failed));
                        // Nothing answered, nothing redirected: kept, the line would be sent
                        // (and refused) again with every later one.
                        if reply.is_empty() && history.len() == turn_start + 1 {
                            history.truncate(turn_start);
                            eprintln!("[that line is not part of the conversation]");
                        }
                        break;
                    }
                },
                _ = tokio::signal::ctrl_c() => {
                    // Fails only with the session gone, which ends the reply anyway.
                    let _ = client.cancel(&request_id);
                    eprintln!("\n[stopped — type new instructions]");
                }
                Some(line) = lines.recv() => {
                    let Ok(line) = line else { eprintln!("\n{NOT_UTF8}"); continue; };
                    if line.trim().is_empty() { continue; }
                    match client.interrupt(&request_id, vec![user(line.clone())], true) {
                        Ok(()) => {
                            history.push(ChatMessage { role: "assistant".into(), content: std::mem::take(&mut reply), ..Default::default() });
                            history.push(user(line));
                            eprintln!("\n[redirecting]");
                        }
                        Err(error) => eprintln!("\n[not redirected: {error}]"),
                    }
                }
            }
        }
        if !reply.is_empty() {
            history.push(ChatMessage {
                role: "assistant".into(),
                content: reply,
                ..Default::default()
            });
        }
    }
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(ids: &[(&str, usize)]) -> v1::ListModelsResponse {
        v1::ListModelsResponse {
            models: ids
                .iter()
                .map(|(id, workers)| v1::ModelInfo {
                    id: id.to_string(),
                    workers: (0..*workers)
                        .map(|i| v1::WorkerRef {
                            id: format!("w{i}"),
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_default_model_is_the_real_one_served() {
        let pick = |ids| default_model(&served(ids));
        assert_eq!(
            pick(&[("synthetic", 1), ("SmolLM2", 2)]).unwrap(),
            "SmolLM2"
        );
        assert_eq!(pick(&[("synthetic", 3)]).unwrap(), "synthetic");
        // A model no worker serves right now is not a choice.
        assert_eq!(pick(&[("gone", 0), ("SmolLM2", 1)]).unwrap(), "SmolLM2");
        let several = pick(&[("a", 1), ("b", 1)]).unwrap_err().to_string();
        assert!(
            several.contains("--model") && several.contains("a, b"),
            "{several}"
        );
        assert!(pick(&[]).unwrap_err().to_string().contains("no model"));
    }

    #[test]
    fn a_failure_names_its_code() {
        let failed = v1::Failed {
            code: tonic::Code::Unavailable as i32,
            message: "no worker".into(),
            ..Default::default()
        };
        assert_eq!(failure(&failed), "[error Unavailable: no worker]");
    }

    #[test]
    fn a_model_named_that_is_not_served_is_refused_naming_what_is() {
        let models = served(&[("SmolLM2", 2), ("gone", 0)]);
        assert_eq!(served_model(&models, "SmolLM2".into()).unwrap(), "SmolLM2");
        for name in ["nope", "gone"] {
            let error = served_model(&models, name.into()).unwrap_err().to_string();
            assert!(
                error.contains(&format!("--model {name}")) && error.contains("it serves SmolLM2"),
                "{error}"
            );
        }
        let error = served_model(&served(&[]), "x".into()).unwrap_err();
        assert!(error.to_string().contains("no model yet"), "{error}");
    }

    #[test]
    fn a_line_that_is_not_utf8_is_skipped_and_reading_goes_on() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        read_lines(&b"caf\xe9\nhello\r\nlast"[..], &tx);
        drop(tx);
        let mut lines = Vec::new();
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        assert_eq!(lines, [Err(NotUtf8), Ok("hello".into()), Ok("last".into())]);
    }

    #[test]
    fn max_tokens_of_zero_is_refused_as_the_flag_is_read() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            chat: ChatArgs,
        }
        let parse = |n: &str| <Cli as clap::Parser>::try_parse_from(["chat", "--max-tokens", n]);
        assert!(parse("0").is_err());
        assert_eq!(parse("1").unwrap().chat.max_tokens, 1);
    }
}
