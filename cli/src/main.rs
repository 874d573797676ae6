//! `switchyard`: every Switchyard component, the local cluster and the chat client in one binary.

use clap::{Parser, Subcommand};
use switchyard::{admin, chat, components, up};
use switchyard_cluster::Pool;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Distributed LLM inference across GPU and wafer-scale pools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole local cluster (router, control plane, 2 GPU workers, 1 wafer-scale worker).
    Up(up::UpArgs),
    /// Interactive chat over one persistent session.
    Chat(chat::ChatArgs),
    /// Operate the cluster through the control plane: workers, drains, the routing policy.
    #[command(after_help = admin::EXIT_STATUSES)]
    Admin(admin::AdminArgs),
    /// Run the router.
    Router(components::RouterArgs),
    /// Run the router with a wafer-scale-pool worker in the same process (its link crosses no
    /// network: one hop fewer to the endpoint); other routers reach the worker on
    /// --worker-listen.
    RouterWse {
        #[command(flatten)]
        router: components::RouterArgs,
        #[command(flatten)]
        worker: components::HostedWorkerArgs,
        #[command(flatten)]
        engine: switchyard_worker_wse::WseEngineArgs,
    },
    /// Run a GPU-pool worker.
    WorkerGpu {
        #[command(flatten)]
        worker: components::WorkerArgs,
        #[command(flatten)]
        engine: switchyard_worker_gpu::GpuEngineArgs,
        #[command(flatten)]
        cache: components::SimulatedCacheArgs,
    },
    /// Run a wafer-scale-pool worker.
    WorkerWse {
        #[command(flatten)]
        worker: components::WorkerArgs,
        #[command(flatten)]
        engine: switchyard_worker_wse::WseEngineArgs,
    },
    /// Run the control plane (admin API).
    ControlPlane(components::ControlPlaneArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = cli.command.log_format();
    let telemetry = switchyard_cluster::telemetry::init(cli.command.service_name(), log_format)?;
    if !matches!(cli.command, Command::Chat(_) | Command::Admin(_)) {
        // Every connection takes a descriptor: a soft limit of 1024 (a common default) runs
        // out long before memory does.
        match switchyard_cluster::listen::raise_fd_limit() {
            Ok((soft, hard)) => tracing::info!(soft, hard, "open file limit"),
            Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
        }
    }
    let result = run(cli.command).await;
    let json = matches!(log_format, switchyard_cluster::telemetry::LogFormat::Json);
    if let Err(error) = &result
        && json
    {
        // The reason it stopped, as one JSON line like every other (anyhow's report is text).
        tracing::error!(error = %format!("{error:#}"), "stopped");
    }
    // Export the spans of the last requests before exiting.
    telemetry.shutdown().await;
    match result {
        Err(error) => {
            if let Some(failure) = error.downcast_ref::<admin::AdminFailure>() {
                eprintln!("switchyard admin: {failure}");
                std::process::exit(failure.exit_code);
            }
            if json {
                std::process::exit(1);
            }
            Err(error)
        }
        ok => ok,
    }
}

impl Command {
    /// `--log-format` of a component; the chat client logs text.
    fn log_format(&self) -> switchyard_cluster::telemetry::LogFormat {
        let args = match self {
            Command::Up(args) => &args.log,
            Command::Chat(_) | Command::Admin(_) => {
                return switchyard_cluster::telemetry::LogFormat::Text;
            }
            Command::Router(args) | Command::RouterWse { router: args, .. } => &args.log,
            Command::WorkerGpu { worker, .. } | Command::WorkerWse { worker, .. } => &worker.log,
            Command::ControlPlane(args) => &args.log,
        };
        args.log_format.into()
    }

    /// OpenTelemetry `service.name` of the process.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Up(_) => "switchyard",
            Command::Chat(_) => "switchyard-chat",
            Command::Admin(_) => "switchyard-admin",
            Command::Router(_) => "switchyard-router",
            Command::RouterWse { .. } => "switchyard-router",
            Command::WorkerGpu { .. } => "switchyard-worker-gpu",
            Command::WorkerWse { .. } => "switchyard-worker-wse",
            Command::ControlPlane(_) => "switchyard-control-plane",
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::up(args).await,
        Command::Chat(args) => chat::chat(args).await,
        Command::Admin(args) => admin::admin(args).await,
        Command::Router(args) => components::router(args).await,
        Command::RouterWse {
            router,
            worker,
            engine,
        } => {
            let engine = switchyard_worker_wse::build_engine(&engine)?;
            components::router_hosting_wse(router, worker, engine).await
        }
        Command::WorkerGpu {
            worker,
            engine,
            cache,
        } => {
            let engine = components::gpu_engine(&engine, &cache)?;
            components::worker("worker-gpu", Pool::Gpu, worker, engine).await
        }
        Command::WorkerWse { worker, engine } => {
            let engine = switchyard_worker_wse::build_engine(&engine)?;
            components::worker("worker-wse", Pool::Wse, worker, engine).await
        }
        Command::ControlPlane(args) => components::control_plane(args).await,
    }
}
