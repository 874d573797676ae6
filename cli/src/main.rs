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
        router: Box<components::RouterArgs>,
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
            if let Some(interrupted) = error.downcast_ref::<up::Interrupted>() {
                // Ctrl-C: a stop that was asked for, told as such rather than as an error.
                eprintln!("switchyard up: {interrupted}");
                std::process::exit(130);
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
            Command::Router(args) => &args.log,
            Command::RouterWse { router, .. } => &router.log,
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
            components::router_hosting_wse(*router, worker, engine).await
        }
        Command::WorkerGpu {
            worker,
            engine,
            cache,
        } => {
            worker.check()?;
            let engine = components::gpu_engine(&engine, &cache)?;
            components::worker("worker-gpu", Pool::Gpu, worker, engine).await
        }
        Command::WorkerWse { worker, engine } => {
            worker.check()?;
            let engine = switchyard_worker_wse::build_engine(&engine)?;
            components::worker("worker-wse", Pool::Wse, worker, engine).await
        }
        Command::ControlPlane(args) => components::control_plane(args).await,
    }
}

/// The README and `docs/` against the repository: a flag added without a word in the README, a
/// documented one renamed or removed, or a file named that is not there fails here.
#[cfg(test)]
mod docs_are_true {
    use std::collections::{BTreeMap, BTreeSet};

    use clap::CommandFactory as _;

    use super::Cli;

    const README: &str = include_str!("../../README.md");

    /// Every visible long flag of every command, with the environment variables it reads
    /// (one flag may read another under another command, e.g. `up`'s own).
    fn flags() -> BTreeMap<String, BTreeSet<String>> {
        let mut flags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for command in Cli::command().get_subcommands() {
            for arg in command.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                if arg.is_hide_set() || long == "help" || long == "version" {
                    continue;
                }
                let envs = flags.entry(format!("--{long}")).or_default();
                if let Some(env) = arg.get_env() {
                    envs.insert(env.to_string_lossy().into_owned());
                }
            }
        }
        flags
    }

    /// The README's `## Configuration reference` section.
    fn reference() -> &'static str {
        let start = README
            .find("\n## Configuration reference")
            .expect("the README has a configuration reference");
        let rest = &README[start + 1..];
        let end = rest[3..].find("\n## ").map_or(rest.len(), |at| at + 3);
        &rest[..end]
    }

    /// Flags named in `text`'s code spans (`` `--flag` ``, `` `switchyard up --tls` ``), in
    /// order.
    fn mentioned(text: &str) -> Vec<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .flat_map(str::split_whitespace)
            .filter(|word| word.starts_with("--") && word.len() > 2)
            .map(|word| word.split('=').next().unwrap_or(word).to_string())
            .collect()
    }

    #[test]
    fn every_flag_is_documented() {
        let documented: BTreeSet<String> = mentioned(README).into_iter().collect();
        let missing: Vec<_> = flags()
            .into_keys()
            .filter(|flag| !documented.contains(flag))
            .collect();
        assert!(
            missing.is_empty(),
            "flags the README never names: {missing:?}"
        );
    }

    #[test]
    fn every_flag_of_the_reference_tables_exists_with_its_environment_variable() {
        let flags = flags();
        let mut wrong = Vec::new();
        for row in reference().lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let (names, envs) = (mentioned(cells[1]), cells[2]);
            let env_names: Vec<&str> = envs
                .split('`')
                .skip(1)
                .step_by(2)
                .filter(|e| e.starts_with("SWITCHYARD_"))
                .collect();
            for (i, name) in names.iter().enumerate() {
                match flags.get(name) {
                    None => wrong.push(format!("{name}: no command takes it")),
                    // A row naming two flags names their variables in the same order.
                    Some(known) => match env_names.get(i).or(env_names.first()) {
                        Some(env) if !known.contains(*env) => {
                            wrong.push(format!("{name}: reads {known:?}, documented {env}"))
                        }
                        _ => {}
                    },
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "the reference tables are wrong: {wrong:#?}"
        );
    }

    /// Every relative link, and every repository path in a code span (`router/src/error.rs`),
    /// of the README and `docs/*.md` names a file or directory that exists.
    #[test]
    fn every_file_the_docs_name_exists() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        // What the build and the scripts make (`target/`, the fetched `models/`) is not there
        // before they run.
        let top_level: BTreeSet<String> = std::fs::read_dir(&root)
            .expect("the repository")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name != "target" && name != "models")
            .collect();
        let mut pages = vec![std::path::PathBuf::from("README.md")];
        for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
            let name = entry.expect("an entry").file_name();
            if name.to_string_lossy().ends_with(".md") {
                pages.push(std::path::Path::new("docs").join(name));
            }
        }
        let mut missing = Vec::new();
        for page in &pages {
            let text = std::fs::read_to_string(root.join(page)).expect("a page");
            let dir = page.parent().unwrap_or(std::path::Path::new(""));
            // Links resolve from the page's directory.
            for link in text.split("](").skip(1) {
                let target = link.split([')', '#', ' ']).next().unwrap_or_default();
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                if !root.join(dir).join(target).exists() {
                    missing.push(format!("{}: link {target}", page.display()));
                }
            }
            // Code spans name paths from the repository's root.
            for word in text
                .split('`')
                .skip(1)
                .step_by(2)
                .flat_map(str::split_whitespace)
            {
                let path = word.trim_matches(['(', ')', ',', ';', ':', '.', '"', '\'']);
                let path = path.split(':').next().unwrap_or(path);
                let first = path.split('/').next().unwrap_or_default();
                if !path.contains('/')
                    || !top_level.contains(first)
                    || path.contains(['<', '*', '{', '$'])
                {
                    continue;
                }
                if !root.join(path).exists() {
                    missing.push(format!("{}: `{path}`", page.display()));
                }
            }
        }
        assert!(missing.is_empty(), "named but not there: {missing:#?}");
    }
}
