//! `switchyard-bench`: benchmarks. Thin binary; each subcommand lives in its own module.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "switchyard-bench", about = "Switchyard benchmarks")]
enum Cli {
    /// The native model engine in-process: decode tok/s, aggregate tok/s, TTFT, peak RSS.
    Engine(switchyard_bench::engine::EngineBenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse() {
        Cli::Engine(args) => switchyard_bench::engine::run(args).await,
    }
}
