//! `switchyard-bench sessions`: idle sessions opened and closed in rounds through one router
//! process — what an idle session costs the router, and whether closing them gives it back.
//!
//! A real etcd, one synthetic-engine worker and a router run as separate `switchyard`
//! processes (the release binary next to this one), so the router's memory is its own. Each
//! round opens `--sessions` `Inference.Session` streams over `--connections` new connections
//! and sends nothing on them; reads the router's resident memory with all of them open;
//! half-closes every one and waits until the router has ended each (its response stream
//! ends); closes the connections and reads the memory again once the allocator has had
//! `--settle` to return freed pages (nothing announces that, so it is a fixed wait). A warm-up
//! round comes first: first-use allocations (pools, tables) stay by design. Reported per
//! round: memory with every session open, per idle session, after they closed, and how far
//! that is above where the first measured round left it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::future::try_join_all;
use switchyard_proto::v1::{ClientFrame, ServerFrame, inference_client::InferenceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::streams::ProcessCluster;

/// Streams one connection may open at the router's default `--max-connection-streams`.
const CONNECTION_STREAMS: usize = 2_048;

/// Options of `switchyard-bench sessions`.
#[derive(Debug, Clone, clap::Args)]
pub struct SessionsArgs {
    /// Idle sessions open at once in each round.
    #[arg(long, default_value_t = 10_000)]
    pub sessions: usize,
    /// Measured rounds (after one warm-up round).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Connections a round's sessions are spread over (at most 2 048 sessions each: the
    /// router's default `--max-connection-streams`).
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Wait after the sessions closed before the memory is read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub settle: Duration,
}

/// One open session: the sender of its client frames and the router's frames.
type OpenSession = (mpsc::Sender<ClientFrame>, Streaming<ServerFrame>);

async fn open(channel: Channel) -> anyhow::Result<OpenSession> {
    let (tx, rx) = mpsc::channel(1);
    let frames = InferenceClient::new(channel)
        .session(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, frames))
}

/// Half-closes a session and reads it to its end: the router has ended it.
async fn close((tx, mut frames): OpenSession) -> anyhow::Result<()> {
    drop(tx);
    match frames.message().await? {
        None => Ok(()),
        Some(frame) => bail!("an idle session got a frame: {frame:?}"),
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub async fn run(args: SessionsArgs) -> anyhow::Result<()> {
    if args.sessions == 0 || args.rounds == 0 || args.connections == 0 {
        bail!("--sessions, --rounds and --connections must be at least 1");
    }
    if args.sessions.div_ceil(args.connections) > CONNECTION_STREAMS {
        bail!(
            "{} sessions over {} connections is more than the router lets one connection open \
             ({CONNECTION_STREAMS}); raise --connections",
            args.sessions,
            args.connections
        );
    }
    let cluster = ProcessCluster::start(1, &["--engine", "synthetic"]).await?;
    let router = &cluster.router;
    println!(
        "{} idle sessions over {} connections per round, {} rounds after a warm-up; the router's \
         RSS",
        args.sessions, args.connections, args.rounds
    );
    println!("round     open (MiB)  per session (KiB)  closed (MiB)  vs first round");
    let mut before = router.rss_kib()?;
    let mut first_closed = None;
    for round in 0..=args.rounds {
        let mut channels = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            channels.push(cluster.connect().await?);
        }
        let sessions =
            try_join_all((0..args.sessions).map(|i| open(channels[i % channels.len()].clone())))
                .await
                .context("opening the sessions")?;
        let open_kib = router.rss_kib()?;
        try_join_all(sessions.into_iter().map(close))
            .await
            .context("closing the sessions")?;
        drop(channels);
        tokio::time::sleep(args.settle).await;
        let closed = router.rss_kib()?;
        let label = if round == 0 {
            "warm-up".to_string()
        } else {
            round.to_string()
        };
        let growth = match (round, first_closed) {
            (0, _) => String::from("-"),
            (_, None) => {
                first_closed = Some(closed);
                String::from("(reference)")
            }
            (_, Some(first)) => format!("{:+.1} %", (closed as f64 / first as f64 - 1.0) * 100.0),
        };
        println!(
            "{label:>7}  {:>11.1}  {:>17.1}  {:>12.1}  {growth:>14}",
            mib(open_kib),
            open_kib.saturating_sub(before) as f64 / args.sessions as f64,
            mib(closed),
        );
        before = closed;
    }
    Ok(())
}
