//! `switchyard chat`: an interactive terminal chat over one persistent session.
//!
//! - Type a line and press Enter to send it.
//! - **Ctrl-C during a reply** stops it; the partial reply stays in the conversation and your
//!   next line steers from there.
//! - **Typing a line during a reply** redirects it on the fly (an `Interrupt` frame: the
//!   generation stops and continues the same request with your new instructions).
//! - Ctrl-C at the prompt (or end of input) exits.

use std::io::Write as _;

use switchyard_proto::v1::{
    ChatMessage, GenerateRequest, RequestClass, SamplingParams, server_frame::Frame,
};
use tokio::sync::mpsc;

use crate::client::SessionClient;

#[derive(Debug, Clone, clap::Args)]
pub struct ChatArgs {
    /// Router gRPC address.
    #[arg(long, env = "SWITCHYARD_ROUTER", default_value = "127.0.0.1:50051")]
    pub router: String,
    #[arg(long, default_value = "synthetic")]
    pub model: String,
    #[arg(long, default_value_t = 256)]
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
    }
}

/// Lines from stdin, read on a blocking thread.
fn stdin_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn prompt() {
    print!("\n> ");
    let _ = std::io::stdout().flush();
}

pub async fn chat(args: ChatArgs) -> anyhow::Result<()> {
    let client = SessionClient::connect(&args.router).await?;
    let mut lines = stdin_lines();
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(system) = &args.system {
        history.push(ChatMessage {
            role: "system".into(),
            content: system.clone(),
        });
    }
    let class = if args.fast {
        RequestClass::LatencyCritical
    } else {
        RequestClass::CostSensitive
    };
    eprintln!(
        "connected to {} — Ctrl-C stops a reply, a line typed during a reply redirects it",
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
        if line.trim().is_empty() {
            continue;
        }
        history.push(user(line));
        turn += 1;
        let request_id = format!("chat-{turn}");
        let mut stream = client.start(GenerateRequest {
            request_id: request_id.clone(),
            model: args.model.clone(),
            messages: history.clone(),
            sampling: Some(SamplingParams {
                max_tokens: args.max_tokens,
                ..Default::default()
            }),
            class: class as i32,
            ..Default::default()
        })?;
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
                    Some(Frame::Finished(_)) | None => break,
                    Some(Frame::Failed(failed)) => {
                        eprintln!("\n[error {}: {}]", failed.code, failed.message);
                        break;
                    }
                },
                _ = tokio::signal::ctrl_c() => {
                    client.cancel(&request_id)?;
                    eprintln!("\n[stopped — type new instructions]");
                }
                Some(line) = lines.recv() => {
                    if line.trim().is_empty() { continue; }
                    history.push(ChatMessage { role: "assistant".into(), content: std::mem::take(&mut reply) });
                    history.push(user(line.clone()));
                    client.interrupt(&request_id, vec![user(line)], true)?;
                    eprintln!("\n[redirecting]");
                }
            }
        }
        if !reply.is_empty() {
            history.push(ChatMessage {
                role: "assistant".into(),
                content: reply,
            });
        }
    }
    println!();
    Ok(())
}
