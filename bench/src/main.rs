//! `switchyard-bench`: benchmark and simulation tools (one subcommand per module of the library).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "switchyard-bench",
    version,
    about = "Switchyard benchmarks and cluster simulator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay request traces against a simulated cluster under every routing policy.
    Simulate(switchyard_bench::simulate::SimulateArgs),
    /// The native model engine in-process: decode tok/s, aggregate tok/s, TTFT, peak RSS.
    Engine(switchyard_bench::engine::EngineBenchArgs),
    /// The router's cost: the same load straight to a worker and through the router.
    Router(switchyard_bench::router::RouterBenchArgs),
    /// Clients that stop reading: memory held for them with the router's flow control on and
    /// off.
    StalledReaders(switchyard_bench::router::StalledReadersArgs),
    /// One tenant flooding, another sending short requests: the calm tenant's TTFT alone,
    /// under the flood without quotas, and with the flood tenant under a quota.
    NoisyNeighbour(switchyard_bench::noisy_neighbour::NoisyNeighbourArgs),
    /// Many concurrent streams through one router process: errors, TTFT and the router's
    /// memory per open stream.
    Streams(switchyard_bench::streams::StreamsArgs),
    /// Does a long prompt, tokenized by the router, hold up the request sent right behind it?
    LongPrompts(switchyard_bench::long_prompts::LongPromptsArgs),
    /// Idle sessions opened and closed in rounds through one router process: the router's
    /// memory per idle session, and after they close.
    Sessions(switchyard_bench::sessions::SessionsArgs),
    /// Multi-turn conversations over any OpenAI-compatible HTTP endpoint: TTFT per turn,
    /// tokens/s, prefix hit rate.
    Multiturn(switchyard_bench::multiturn::MultiturnArgs),
    /// The OpenAI doors side by side on one router: the same streamed generations as chat
    /// completions and as Responses API responses.
    Doors(switchyard_bench::doors::DoorsArgs),
    /// The same chat completions sent straight and as one batch (upload to output read back),
    /// side by side on one router.
    Batch(switchyard_bench::batch::BatchArgs),
    /// Embedding throughput of OpenAI-compatible `/v1/embeddings` endpoints side by side
    /// (Switchyard's router and llama.cpp's llama-server on the same model): code-search
    /// indexing of this repository's sources.
    Embeddings(switchyard_bench::embeddings::EmbeddingsArgs),
    /// Multi-turn conversations sent whole every turn, and going on from stored responses on
    /// the replica that stored them and on another one, side by side.
    StoredResponses(switchyard_bench::stored_responses::StoredResponsesArgs),
    /// What a router in front of an OpenAI-compatible backend adds to time to first token:
    /// the backend direct, through SMG and through Switchyard, side by side.
    HttpOverhead(switchyard_bench::http_overhead::HttpOverheadArgs),
    /// The load-test backend `http-overhead` uses: OpenAI chat completions, no model,
    /// deterministic text at a fixed time to first token and decode rate.
    OpenaiBackend(switchyard_bench::openai_backend::OpenAiBackendArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Engine(args) => switchyard_bench::engine::run(args).await,
        Command::Router(args) => switchyard_bench::router::run(args).await,
        Command::NoisyNeighbour(args) => switchyard_bench::noisy_neighbour::run(args).await,
        Command::Streams(args) => switchyard_bench::streams::run(args).await,
        Command::LongPrompts(args) => switchyard_bench::long_prompts::run(args).await,
        Command::Sessions(args) => switchyard_bench::sessions::run(args).await,
        Command::StalledReaders(args) => switchyard_bench::router::stalled_readers(args).await,
        Command::Multiturn(args) => switchyard_bench::multiturn::run(args).await,
        Command::Doors(args) => switchyard_bench::doors::run(args).await,
        Command::Batch(args) => switchyard_bench::batch::run(args).await,
        Command::Embeddings(args) => switchyard_bench::embeddings::run(args).await,
        Command::StoredResponses(args) => switchyard_bench::stored_responses::run(args).await,
        Command::HttpOverhead(args) => switchyard_bench::http_overhead::run(args).await,
        Command::OpenaiBackend(args) => switchyard_bench::openai_backend::run(args).await,
        Command::Simulate(args) => {
            let report = switchyard_bench::simulate::run(&args)?;
            for (name, policy) in &report.policies {
                let lc = &policy.lanes["latency_critical"];
                let cs = &policy.lanes["cost_sensitive"];
                println!(
                    "{name:>13}: lc slo {:>6.2}% ttft p99 {:>8.0} ms shed {:>6} | cs slo {:>6.2}% ttft p99 {:>8.0} ms shed {:>6} | ${:.3}/Mtok | {:.2} s",
                    lc.slo_attainment * 100.0,
                    lc.ttft_p99_ms,
                    lc.shed,
                    cs.slo_attainment * 100.0,
                    cs.ttft_p99_ms,
                    cs.shed,
                    policy.cost_per_mtok,
                    policy.wall_time_s,
                );
            }
            println!("wrote {}", args.json.display());
            Ok(())
        }
    }
}
