//! The component subcommands (`router`, `router-wse`, `worker-gpu`, `worker-wse`,
//! `control-plane`): each
//! parses its flags (every flag also reads a `SWITCHYARD_*` environment variable), connects to
//! etcd, runs until SIGINT/SIGTERM, and prints `<component> <protocol> <address>` on stdout
//! once it serves, so scripts and tests can find it (`<component> metrics <address>` for the
//! Prometheus listener of `--metrics-addr`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_cluster::listen::ConnectionTimeouts;
use switchyard_cluster::telemetry::metrics::Metrics;
use switchyard_cluster::tls::{ClientTls, TlsFiles};
use switchyard_cluster::{EtcdRegistry, EtcdSecurity, Pool, Registry};
use switchyard_proto::RequestLimits;
use switchyard_router::RouterConfig;
use switchyard_router::config::HostedWorker;
use switchyard_router::config::parse_lane;
use switchyard_worker::{CoalesceConfig, Engine, HostedBy, WorkerConfig};
use tokio_util::sync::CancellationToken;

/// Options shared by every component.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// etcd endpoint(s), comma-separated.
    #[arg(
        long,
        env = "SWITCHYARD_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    /// File whose first line is the cluster token: routers and control planes present it on
    /// their worker links, workers refuse `Worker` calls without it. Unset: links are open.
    #[arg(long, env = "SWITCHYARD_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<std::path::PathBuf>,
    /// CA certificate (PEM) that signed etcd's server certificate: etcd is reached over TLS
    /// (the --etcd endpoints must then be https:// URLs).
    #[arg(long, env = "SWITCHYARD_ETCD_CA_FILE")]
    pub etcd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd (etcd's --client-cert-auth); needs
    /// --etcd-key-file and --etcd-ca-file.
    #[arg(long, env = "SWITCHYARD_ETCD_CERT_FILE", requires_all = ["etcd_key_file", "etcd_ca_file"])]
    pub etcd_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert-file.
    #[arg(long, env = "SWITCHYARD_ETCD_KEY_FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (etcd's own authentication, `etcdctl auth enable`); needs
    /// --etcd-password-file.
    #[arg(long, env = "SWITCHYARD_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// File whose first line is the etcd user's password.
    #[arg(long, env = "SWITCHYARD_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl ClusterArgs {
    /// The cluster token, when configured (a bad file is an error before anything starts).
    pub fn cluster_token(
        &self,
    ) -> anyhow::Result<Option<switchyard_cluster::credential::ClusterToken>> {
        Ok(self
            .cluster_token_file
            .as_deref()
            .map(switchyard_cluster::credential::ClusterToken::load)
            .transpose()?)
    }

    pub async fn registry(&self) -> anyhow::Result<Arc<dyn Registry>> {
        Ok(Arc::new(self.etcd_registry().await?))
    }

    /// How etcd is reached: TLS and user from the flags (a bad file is an error here).
    pub fn etcd_security(&self) -> anyhow::Result<EtcdSecurity> {
        let tls = self.etcd_ca_file.clone().map(|ca| {
            let tls = ClientTls::new(ca);
            match (&self.etcd_cert_file, &self.etcd_key_file) {
                (Some(cert), Some(key)) => tls.with_identity(cert.clone(), key.clone()),
                _ => tls,
            }
        });
        if let Some(tls) = &tls {
            tls.config().context("etcd TLS")?;
        }
        let user = match (&self.etcd_user, &self.etcd_password_file) {
            (Some(user), Some(file)) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading --etcd-password-file {}", file.display()))?;
                let password = text.lines().next().unwrap_or_default().to_string();
                anyhow::ensure!(
                    !password.is_empty(),
                    "--etcd-password-file {}: the first line is empty",
                    file.display()
                );
                Some((user.clone(), password))
            }
            _ => None,
        };
        Ok(EtcdSecurity { tls, user })
    }

    pub async fn etcd_registry(&self) -> anyhow::Result<EtcdRegistry> {
        let security = self.etcd_security()?;
        EtcdRegistry::connect_with(&self.etcd, &security)
            .await
            .with_context(|| format!("connecting to etcd at {}", self.etcd.join(",")))
    }
}

/// TLS of a component's listeners and outbound links.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsArgs {
    /// Certificate chain (PEM) every listener serves (TLS only), also presented as this
    /// component's client certificate on its links when the peer asks (mTLS). Re-read when
    /// the file changes: a rotated certificate is served without a restart.
    #[arg(long, env = "SWITCHYARD_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert-file.
    #[arg(long, env = "SWITCHYARD_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) trusted on outbound links (router → workers and control plane,
    /// control plane → workers); set, those links use TLS.
    #[arg(long, env = "SWITCHYARD_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
}

/// Loads the TLS files now, so a bad certificate is a configuration error reported before
/// anything touches the cluster.
fn check_tls(files: &TlsFiles) -> anyhow::Result<()> {
    files.server(switchyard_cluster::tls::Alpn::Grpc)?;
    if let Some(client) = files.client() {
        client.config().context("--tls-ca-file")?;
    }
    Ok(())
}

impl TlsArgs {
    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
            ca_file: self.tls_ca_file.clone(),
            client_ca_file: None,
        }
    }
}

/// How long a connection to any of a component's listeners may take to ask, and stay silent.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// A new connection must deliver its first request (an HTTP/1 request head or HTTP/2's
    /// connection preface; over TLS, the handshake too) within this, and an HTTP/1
    /// connection each further request head; otherwise it is closed.
    #[arg(long, env = "SWITCHYARD_HEADER_READ_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub header_read_timeout: Duration,
    /// A connection that exchanged no bytes either way for this long is closed, an unused
    /// gRPC Session too (a stream carrying tokens, or a client's HTTP/2 keepalive pings,
    /// keeps it open).
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", value_parser = humantime::parse_duration, default_value = "300s")]
    pub idle_timeout: Duration,
}

impl ConnectionArgs {
    pub fn timeouts(&self) -> ConnectionTimeouts {
        ConnectionTimeouts {
            header_read: self.header_read_timeout,
            idle: self.idle_timeout,
            max_age: None,
        }
    }

    /// The timeouts, refused before anything starts when one is zero.
    fn checked(&self) -> anyhow::Result<ConnectionTimeouts> {
        let timeouts = self.timeouts();
        timeouts.validate().map_err(anyhow::Error::msg)?;
        Ok(timeouts)
    }
}

/// How a component writes its log (stderr).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` (for people; coloured only when stderr is a terminal and
    /// NO_COLOR is unset) or `json` (one JSON object a line with the event's fields and its
    /// spans', for log pipelines). Level and targets: RUST_LOG (default `info`).
    #[arg(long, env = "SWITCHYARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for switchyard_cluster::telemetry::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => Self::Text,
            LogFormat::Json => Self::Json,
        }
    }
}

/// Where a component serves Prometheus `/metrics`.
#[derive(Debug, Clone, clap::Args)]
pub struct MetricsArgs {
    /// Serve Prometheus `/metrics` on this address, plain HTTP (port 0 picks a free port).
    /// Unset: a control plane or worker serves no metrics at all; a router (and router-wse,
    /// its hosted worker's metrics included) serves them on its HTTP port either way.
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
}

impl MetricsArgs {
    /// Starts the metrics listener, when configured, and announces `<component> metrics <addr>`.
    pub async fn serve(
        &self,
        component: &str,
        metrics: &Metrics,
        connections: ConnectionTimeouts,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        if let Some(addr) = self.metrics_addr {
            let bound = metrics.serve(addr, connections, shutdown.clone()).await?;
            announce(component, "metrics", bound);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RouterArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// OpenAI-compatible HTTP listen address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// An origin whose browser pages may call the HTTP API (CORS), e.g.
    /// `https://chat.example.com`; repeat it for more, or `*` for every origin. Unset: none
    /// (browsers keep other origins' pages out).
    #[arg(
        long = "http-cors-origin",
        env = "SWITCHYARD_HTTP_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub http_cors_origins: Vec<String>,
    /// Lane of requests that say REQUEST_CLASS_AUTO.
    #[arg(long, env = "SWITCHYARD_DEFAULT_LANE", value_parser = parse_lane, default_value = "cost-sensitive")]
    pub default_lane: switchyard_proto::v1::Lane,
    /// Largest max_tokens a request may ask for.
    #[arg(long, env = "SWITCHYARD_MAX_TOKENS_CAP", default_value_t = 4096)]
    pub max_tokens_cap: u32,
    /// Largest message (or prompt) in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGE_BYTES", default_value_t = 256 * 1024)]
    pub max_message_bytes: usize,
    /// JSON file of API keys and their tenants (`{"keys": [{"key": "sk-…", "tenant": "acme"}]}`).
    /// When set, clients must send `authorization: Bearer <key>`; unset, auth is off.
    #[arg(long, env = "SWITCHYARD_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// At most this many requests a second have their routing decision and outcome reported
    /// to the control plane's decision feed (0: none; the per-second stats behind the
    /// dashboard's charts cover every request regardless).
    #[arg(long, env = "SWITCHYARD_DECISION_REPORTS_PER_S", default_value_t = 200)]
    pub decision_reports_per_s: u32,
    /// Requests one Session may have running at once; further Start frames fail with
    /// RESOURCE_EXHAUSTED while the session stays open.
    #[arg(long, env = "SWITCHYARD_MAX_SESSION_REQUESTS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_session_requests: u32,
    /// A client connection (gRPC or HTTP) open this long is asked to go away: HTTP/2 GOAWAY
    /// (its open calls and Sessions carry on), HTTP/1 closed after its request in progress;
    /// the client reconnects for what comes next, so behind a load balancer long-lived
    /// clients spread onto router replicas added since they connected. Unset: never.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTION_AGE", value_parser = humantime::parse_duration)]
    pub max_connection_age: Option<Duration>,
    /// Streams (calls, sessions) one gRPC connection may have open at once (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS); a client opening more waits for one to end.
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTION_STREAMS", default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connection_streams: u32,
    /// Requests one tenant (its API key's tenant, or the metadata `tenant` without keys) may
    /// have in flight across all its calls; more get RESOURCE_EXHAUSTED (HTTP 429). 0: no limit.
    #[arg(long, env = "SWITCHYARD_MAX_TENANT_REQUESTS", default_value_t = 0)]
    pub max_tenant_requests: u32,
    /// Flow control: tokens a worker may generate for a request ahead of what its client has
    /// read; a client that stops reading pauses its own generations there, and the router
    /// buffers at most this much for it. 0: no flow control.
    #[arg(long, env = "SWITCHYARD_STREAM_CREDIT_TOKENS", default_value_t = 256)]
    pub stream_credit_tokens: u32,
    /// On SIGTERM, longest the router lets its requests in flight finish (new ones are refused
    /// with UNAVAILABLE meanwhile) before it closes its worker links and exits.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Bytes of Responses-API responses this replica stores (`store: true`, OpenAI's default)
    /// for `previous_response_id` and `GET /v1/responses/{id}`; the oldest go first when full.
    /// 0: none are stored (the responses say `store: false`).
    #[arg(long, env = "SWITCHYARD_RESPONSE_STORE_BYTES", default_value_t = 256 << 20)]
    pub response_store_bytes: usize,
    /// How long a stored response is kept.
    #[arg(long, env = "SWITCHYARD_RESPONSE_STORE_MAX_AGE", value_parser = humantime::parse_duration, default_value = "24h")]
    pub response_store_max_age: Duration,
    /// Largest file a client may upload for a batch (`POST /v1/files`).
    #[arg(long, env = "SWITCHYARD_BATCH_MAX_FILE_BYTES", default_value_t = 100 << 20)]
    pub batch_max_file_bytes: usize,
    /// Bytes of batch files (uploads and batch outputs) this replica keeps in memory; uploads
    /// past it are refused with 507 until files are deleted (outputs are always written).
    #[arg(long, env = "SWITCHYARD_BATCH_STORE_BYTES", default_value_t = 1 << 30)]
    pub batch_store_bytes: usize,
    /// Batch requests this replica runs at once, all batches together (in the cost-sensitive
    /// lane, so interactive requests keep their workers).
    #[arg(long, env = "SWITCHYARD_BATCH_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_concurrency: u32,
    /// Requests one batch may hold.
    #[arg(long, env = "SWITCHYARD_BATCH_MAX_REQUESTS", default_value_t = 50_000)]
    pub batch_max_requests: usize,
    /// `host:port` where the other router replicas reach this one's gRPC door, to read the
    /// responses it stored (default: the listen address; in Kubernetes, `$(POD_IP):50051`).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Directory where a stopping router keeps its stored responses, files and batches for its
    /// next start when no other replica takes them (a single replica restarted); taken back
    /// when it starts. One replica per directory (it is locked while the router runs). Unset:
    /// they go with the stopped router.
    #[arg(long, env = "SWITCHYARD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Longest the journal in `--state-dir` keeps changes written but not synced to disk: a
    /// host crash (not a process kill, which loses nothing written) loses at most this much.
    /// `0s`: synced after each write.
    #[arg(long, env = "SWITCHYARD_STATE_SYNC_INTERVAL", value_parser = humantime::parse_duration, default_value = "1s")]
    pub state_sync_interval: Duration,
}

impl RouterArgs {
    pub fn config(&self) -> RouterConfig {
        RouterConfig {
            listen: self.listen,
            http_listen: Some(self.http_listen),
            default_lane: self.default_lane,
            limits: RequestLimits {
                max_tokens_cap: self.max_tokens_cap,
                max_message_bytes: self.max_message_bytes,
                ..RequestLimits::default()
            },
            api_keys_file: self.api_keys_file.clone(),
            decision_reports_per_s: self.decision_reports_per_s,
            max_session_requests: self.max_session_requests,
            max_connection_streams: self.max_connection_streams,
            max_tenant_requests: self.max_tenant_requests,
            stream_credit_tokens: self.stream_credit_tokens,
            drain_timeout: self.drain_timeout,
            response_store: switchyard_router::response_store::StoreLimits {
                max_bytes: self.response_store_bytes,
                max_age: self.response_store_max_age,
            },
            batches: switchyard_router::batches::BatchLimits {
                max_file_bytes: self.batch_max_file_bytes,
                store_bytes: self.batch_store_bytes,
                concurrency: self.batch_concurrency as usize,
                max_requests: self.batch_max_requests,
            },
            advertise: self.advertise.clone(),
            state_dir: self.state_dir.clone(),
            state_sync_interval: self.state_sync_interval,
            tls: self.tls.files(),
            connections: ConnectionTimeouts {
                max_age: self.max_connection_age,
                ..self.connections.timeouts()
            },
            ..RouterConfig::default()
        }
    }
}

/// Options of both worker kinds.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// CA certificates (PEM) of the cluster: `Worker` calls (Serve, GetTokenizer) need a
    /// client certificate signed by them (mTLS; routers and control planes present their
    /// --tls-cert-file). Health and reflection stay open. Needs --tls-cert-file.
    #[arg(
        long,
        env = "SWITCHYARD_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub tls_client_ca_file: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Address routers dial (default: the bound listen address).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Worker id (default: pool name and a random suffix).
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    pub id: Option<String>,
    /// etcd lease TTL; a killed worker leaves the membership this long after its last keepalive.
    #[arg(long, env = "SWITCHYARD_LEASE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub lease_ttl: Duration,
    /// Longest a generated token waits before it is sent (token coalescing).
    #[arg(long, env = "SWITCHYARD_FLUSH_INTERVAL", value_parser = humantime::parse_duration, default_value = "5ms")]
    pub flush_interval: Duration,
    /// Most tokens per streamed chunk.
    #[arg(long, env = "SWITCHYARD_MAX_CHUNK_TOKENS", default_value_t = 16)]
    pub max_chunk_tokens: usize,
    /// Advertised price per million generated tokens (default: 0.10 for gpu, 0.60 for wse).
    #[arg(long, env = "SWITCHYARD_COST_PER_MTOK")]
    pub cost_per_mtok: Option<f64>,
    /// Longest a SIGTERM drain waits for in-flight generations.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
}

impl WorkerArgs {
    /// Refuses flag values the worker cannot run with, naming the flag. Called before the
    /// engine is built: loading a model can take minutes, and a mistake should not wait for it.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(id) = &self.id {
            anyhow::ensure!(
                !id.is_empty() && !id.contains('/'),
                "--id {id:?}: must be non-empty without '/' (it is the worker's etcd key)"
            );
        }
        anyhow::ensure!(
            self.lease_ttl >= Duration::from_secs(1),
            "--lease-ttl {:?}: must be at least 1s",
            self.lease_ttl
        );
        anyhow::ensure!(
            self.max_chunk_tokens >= 1,
            "--max-chunk-tokens 0: must be at least 1"
        );
        if let Some(cost) = self.cost_per_mtok {
            // NaN or infinity would reach etcd as `null`: routers would ignore the worker.
            anyhow::ensure!(
                cost.is_finite() && cost >= 0.0,
                "--cost-per-mtok {cost}: must be a finite number, 0 or more"
            );
        }
        Ok(())
    }

    pub fn config(&self, pool: Pool) -> WorkerConfig {
        let default_cost = match pool {
            Pool::Gpu => 0.10,
            Pool::Wse => 0.60,
        };
        WorkerConfig {
            id: self.id.clone().unwrap_or_else(|| default_worker_id(pool)),
            pool,
            listen: self.listen,
            advertise: self.advertise.clone(),
            lease_ttl: self.lease_ttl,
            coalesce: CoalesceConfig {
                flush_interval: self.flush_interval,
                max_chunk_tokens: self.max_chunk_tokens,
            },
            cost_per_mtok: self.cost_per_mtok.unwrap_or(default_cost),
            drain_timeout: self.drain_timeout,
            metrics: Metrics::new(),
            tls: TlsFiles {
                client_ca_file: self.tls_client_ca_file.clone(),
                ..self.tls.files()
            },
            connections: self.connections.timeouts(),
        }
    }
}

/// The synthetic engine's simulated prefix cache, for exercising and load-testing cache-aware
/// routing without a model (`switchyard_worker::synthetic::SimulatedCacheConfig`).
#[derive(Debug, Clone, clap::Args)]
pub struct SimulatedCacheArgs {
    /// Synthetic engine: simulate a prefix cache of this many KV blocks, published to routers
    /// (0 = no cache).
    #[arg(
        long,
        env = "SWITCHYARD_SYNTHETIC_PREFIX_CACHE_BLOCKS",
        default_value_t = 0
    )]
    pub synthetic_prefix_cache_blocks: usize,
    /// Synthetic engine: tokens per simulated KV block.
    #[arg(long, env = "SWITCHYARD_SYNTHETIC_BLOCK_TOKENS", default_value_t = 32)]
    pub synthetic_block_tokens: u32,
}

impl SimulatedCacheArgs {
    pub fn config(&self) -> Option<switchyard_worker::synthetic::SimulatedCacheConfig> {
        (self.synthetic_prefix_cache_blocks > 0).then_some(
            switchyard_worker::synthetic::SimulatedCacheConfig {
                capacity_blocks: self.synthetic_prefix_cache_blocks,
                block_tokens: self.synthetic_block_tokens,
            },
        )
    }
}

/// Options of the worker `switchyard router-wse` hosts (besides its engine's): the flags of
/// `worker-wse` that could clash with the router's, under a `worker-` prefix.
#[derive(Debug, Clone, clap::Args)]
pub struct HostedWorkerArgs {
    /// gRPC listen address of the hosted worker, where other routers dial it (port 0 picks a
    /// free port). Its own router dials it in process.
    #[arg(long, env = "SWITCHYARD_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    pub worker_listen: SocketAddr,
    /// Address other routers dial for the hosted worker (default: its bound listen address).
    #[arg(long, env = "SWITCHYARD_WORKER_ADVERTISE")]
    pub worker_advertise: Option<String>,
    /// Hosted worker id (default: wse and a random suffix).
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// etcd lease TTL of the hosted worker.
    #[arg(long, env = "SWITCHYARD_WORKER_LEASE_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub worker_lease_ttl: Duration,
    /// Advertised price per million generated tokens of the hosted worker.
    #[arg(long, env = "SWITCHYARD_WORKER_COST_PER_MTOK", default_value_t = 0.60)]
    pub worker_cost_per_mtok: f64,
    /// Longest a SIGTERM drain of the hosted worker waits for in-flight generations.
    #[arg(long, env = "SWITCHYARD_WORKER_DRAIN_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30s")]
    pub worker_drain_timeout: Duration,
    /// CA certificates (PEM) of the cluster: the hosted worker's `Worker` calls from other
    /// routers and control planes need a client certificate signed by them (mTLS), as a
    /// worker's with --tls-client-ca-file. Its own router reaches it in process. Needs
    /// --tls-cert-file.
    #[arg(
        long,
        env = "SWITCHYARD_WORKER_TLS_CLIENT_CA_FILE",
        requires = "tls_cert_file"
    )]
    pub worker_tls_client_ca_file: Option<PathBuf>,
}

impl HostedWorkerArgs {
    /// The hosted worker's config; it shares the router's metrics registry, TLS files (a
    /// certificate naming the worker too, when routers check identities; client certificates
    /// checked against --worker-tls-client-ca-file) and connection timeouts.
    pub fn config(&self, router: &RouterConfig) -> WorkerConfig {
        WorkerConfig {
            id: self
                .worker_id
                .clone()
                .unwrap_or_else(|| default_worker_id(Pool::Wse)),
            pool: Pool::Wse,
            listen: self.worker_listen,
            advertise: self.worker_advertise.clone(),
            lease_ttl: self.worker_lease_ttl,
            coalesce: CoalesceConfig::default(),
            cost_per_mtok: self.worker_cost_per_mtok,
            drain_timeout: self.worker_drain_timeout,
            metrics: router.metrics.clone(),
            tls: TlsFiles {
                client_ca_file: self.worker_tls_client_ca_file.clone(),
                ..router.tls.clone()
            },
            connections: router.connections,
        }
    }
}

/// A GPU worker's engine: the configured one, or the synthetic engine with a simulated prefix
/// cache when `cache` asks for one.
pub fn gpu_engine(
    args: &switchyard_worker_gpu::GpuEngineArgs,
    cache: &SimulatedCacheArgs,
) -> anyhow::Result<Arc<dyn Engine>> {
    let Some(config) = cache.config() else {
        return Ok(switchyard_worker_gpu::build_engine(args)?);
    };
    anyhow::ensure!(
        args.engine == switchyard_worker_gpu::GpuEngineKind::Synthetic,
        "--synthetic-prefix-cache-blocks: only the synthetic engine simulates a prefix cache"
    );
    // The synthetic engine as `build_engine` configures it, plus the cache.
    let engine =
        switchyard_worker::SyntheticEngine::checked(switchyard_worker_gpu::synthetic_config(args))
            .and_then(|engine| engine.with_simulated_cache(config))
            .map_err(anyhow::Error::msg)?;
    Ok(Arc::new(engine))
}

pub fn default_worker_id(pool: Pool) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{pool}-{}", &suffix[..8])
}

#[derive(Debug, Clone, clap::Args)]
pub struct ControlPlaneArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Ops dashboard (HTTP) listen address (port 0 picks a free port).
    #[arg(long, env = "SWITCHYARD_HTTP_ADDR", default_value = "127.0.0.1:8090")]
    pub http_addr: SocketAddr,
    /// gRPC address stored in the leader key, which routers dial to report their decisions
    /// (default: the bound listen address; set it when listening on 0.0.0.0, e.g. the pod IP).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Replica id, stored in the leader key (default: control-plane and a random suffix).
    #[arg(long, env = "SWITCHYARD_CONTROL_PLANE_ID")]
    pub id: Option<String>,
    /// Lease TTL of the leader key: a dead leader is replaced this long after its last renewal.
    #[arg(long, env = "SWITCHYARD_LEADER_TTL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub leader_ttl: Duration,
    /// Host names the dashboard answers to besides IP addresses and localhost (comma-separated;
    /// e.g. the name of an ingress). Other `Host` headers are refused (DNS rebinding).
    #[arg(
        long,
        env = "SWITCHYARD_DASHBOARD_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub dashboard_allowed_hosts: Vec<String>,
    /// JSON file of admin tokens (`{"tokens": [{"name", "token", "role": "viewer"|"operator"}]}`).
    /// When set, Admin writes (gRPC and dashboard) need an operator's token; unset, they are open.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<std::path::PathBuf>,
}

/// A token fired by the first SIGINT or SIGTERM. A second one ends the process at once,
/// without waiting for the drain the first started: an operator who sends it (Ctrl-C twice,
/// `kill` again) does not want to wait, as with most servers; the generations still running
/// are resumed elsewhere by their routers, as when a worker dies.
pub fn shutdown_on_signal() -> CancellationToken {
    on_signals(true)
}

/// [`shutdown_on_signal`] for a caller that handles a second signal itself (`up`, which says
/// what it stopped).
pub fn shutdown_on_first_signal() -> CancellationToken {
    on_signals(false)
}

fn on_signals(exit_on_second: bool) -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        let again = if exit_on_second {
            " (again to stop at once)"
        } else {
            ""
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down{again}"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down{again}"),
        }
        fire.cancel();
        if !exit_on_second {
            return;
        }
        // 128 + the signal's number, as a shell reports a process the signal ended.
        let code = tokio::select! {
            _ = tokio::signal::ctrl_c() => 130,
            _ = term.recv() => 143,
        };
        tracing::warn!("second signal: stopping now, without finishing the drain");
        std::process::exit(code);
    });
    token
}

/// Prints the line scripts wait for: `<component> <protocol> <address>`.
pub fn announce(component: &str, protocol: &str, address: SocketAddr) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{component} {protocol} {address}");
    let _ = stdout.flush();
}

/// What running a router needs once its flags are checked: its config (with the cluster
/// token), the cluster registry and the shutdown signal; its metrics listener is serving.
struct RouterStart {
    config: RouterConfig,
    registry: Arc<dyn Registry>,
    shutdown: CancellationToken,
}

async fn start_router(args: &RouterArgs) -> anyhow::Result<RouterStart> {
    // A bad key file is a configuration error: report it before touching the cluster.
    if let Some(path) = &args.api_keys_file {
        switchyard_router::auth::ApiKeys::load(path)?;
    }
    check_tls(&args.tls.files())?;
    let http_cors = switchyard_router::openai::CorsOrigins::parse(&args.http_cors_origins)
        .map_err(|why| anyhow::anyhow!("--http-cors-origin: {why}"))?;
    let connections = args.connections.checked()?;
    let cluster_token = args.cluster.cluster_token()?;
    let registry = args.cluster.registry().await?;
    let shutdown = shutdown_on_signal();
    let config = RouterConfig {
        cluster_token,
        http_cors,
        ..args.config()
    };
    config.connections.validate().map_err(anyhow::Error::msg)?;
    args.metrics
        .serve("router", &config.metrics, connections, &shutdown)
        .await?;
    Ok(RouterStart {
        config,
        registry,
        shutdown,
    })
}

fn announce_router(endpoints: switchyard_router::RouterEndpoints) {
    announce("router", "grpc", endpoints.grpc);
    if let Some(http) = endpoints.http {
        announce("router", "http", http);
    }
}

pub async fn router(args: RouterArgs) -> anyhow::Result<()> {
    let RouterStart {
        config,
        registry,
        shutdown,
    } = start_router(&args).await?;
    switchyard_router::run_router_with_endpoints(config, registry, shutdown, announce_router)
        .await?;
    Ok(())
}

/// The router with a wafer-scale worker serving `engine` in the same process: the router's
/// link to it crosses no network (a hop and a process fewer between a client and the
/// endpoint); other routers dial the worker on its own listen address.
pub async fn router_hosting_wse(
    args: RouterArgs,
    hosted: HostedWorkerArgs,
    engine: Arc<dyn Engine>,
) -> anyhow::Result<()> {
    if let Some(client_ca_file) = &hosted.worker_tls_client_ca_file {
        check_tls(&TlsFiles {
            client_ca_file: Some(client_ca_file.clone()),
            ..args.tls.files()
        })
        .context("--worker-tls-client-ca-file")?;
    }
    let RouterStart {
        mut config,
        registry,
        shutdown,
    } = start_router(&args).await?;
    let cluster_token = config.cluster_token.clone();
    let (pipe, pipe_incoming) = switchyard_cluster::in_process::pair();
    let (streams, streams_incoming) = switchyard_proto::hosted::pair();
    let worker_config = hosted.config(&config);
    config.hosted_workers = vec![HostedWorker {
        id: worker_config.id.clone(),
        pipe,
        streams,
    }];
    // Either failing stops the other: the process serves both or neither.
    let worker = async {
        let result = switchyard_worker::run_hosted_worker(
            worker_config,
            cluster_token,
            engine,
            registry.clone(),
            HostedBy {
                pipe: pipe_incoming,
                streams: streams_incoming,
            },
            shutdown.clone(),
            |addr| announce("worker-wse", "grpc", addr),
        )
        .await;
        if result.is_err() {
            shutdown.cancel();
        }
        result.context("hosted worker")
    };
    let router = async {
        let result = switchyard_router::run_router_with_endpoints(
            config,
            registry.clone(),
            shutdown.clone(),
            announce_router,
        )
        .await;
        if result.is_err() {
            shutdown.cancel();
        }
        result.context("router")
    };
    let (worker, router) = tokio::join!(worker, router);
    router?;
    worker?;
    Ok(())
}

pub async fn worker(
    component: &'static str,
    pool: Pool,
    args: WorkerArgs,
    engine: Arc<dyn Engine>,
) -> anyhow::Result<()> {
    let config = args.config(pool);
    check_tls(&config.tls)?;
    let connections = args.connections.checked()?;
    let cluster_token = args.cluster.cluster_token()?;
    let registry = args.cluster.registry().await?;
    let shutdown = shutdown_on_signal();
    args.metrics
        .serve(component, &config.metrics, connections, &shutdown)
        .await?;
    switchyard_worker::run_member_worker(
        config,
        cluster_token,
        engine,
        registry,
        shutdown,
        |addr| announce(component, "grpc", addr),
    )
    .await?;
    Ok(())
}

pub async fn control_plane(args: ControlPlaneArgs) -> anyhow::Result<()> {
    if args.leader_ttl < Duration::from_secs(1) {
        anyhow::bail!("--leader-ttl {:?}: must be at least 1s", args.leader_ttl);
    }
    let id = args.id.clone().unwrap_or_else(|| {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("control-plane-{}", &suffix[..8])
    });
    if id.is_empty() {
        anyhow::bail!("--id: must not be empty");
    }
    if let Some(advertise) = &args.advertise {
        let port = advertise
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p > 0) {
            anyhow::bail!(
                "--advertise {advertise:?}: expected host:port that routers can dial, e.g. 10.0.0.7:50052"
            );
        }
    }
    // A bad tokens file is a configuration error: report it before touching the cluster.
    let tokens = args
        .admin_tokens_file
        .as_deref()
        .map(switchyard_control_plane::auth::AdminTokens::load)
        .transpose()?;
    check_tls(&args.tls.files())?;
    let connections = args.connections.checked()?;
    let cluster_token = args.cluster.cluster_token()?;
    let etcd = args.cluster.etcd_registry().await?;
    let election = switchyard_control_plane::ElectionConfig::Etcd {
        client: Box::new(etcd.client()),
        ttl: args.leader_ttl,
    };
    let shutdown = shutdown_on_signal();
    let config = switchyard_control_plane::ControlPlaneConfig {
        id,
        listen: args.listen,
        advertise: args.advertise.clone(),
        http_listen: Some(args.http_addr),
        election,
        metrics: Metrics::new(),
        security: switchyard_control_plane::SecurityConfig {
            dashboard_hosts: switchyard_control_plane::guard::HostAllowlist::new(
                &args.dashboard_allowed_hosts,
            ),
            access: switchyard_control_plane::auth::Access::new(tokens),
            cluster_token,
            tls: args.tls.files(),
        },
        connections,
    };
    args.metrics
        .serve("control-plane", &config.metrics, connections, &shutdown)
        .await?;
    switchyard_control_plane::run_control_plane(config, Arc::new(etcd), shutdown, |endpoints| {
        announce("control-plane", "grpc", endpoints.grpc);
        if let Some(http) = endpoints.http {
            announce("control-plane", "http", http);
        }
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn check(flags: &[&str]) -> anyhow::Result<()> {
        let args = std::iter::once("worker").chain(flags.iter().copied());
        Flags::try_parse_from(args)?.worker.check()
    }

    #[test]
    fn worker_flags_it_cannot_run_with_are_refused_by_name() {
        assert!(check(&[]).is_ok());
        assert!(check(&["--cost-per-mtok", "0"]).is_ok());
        for (flags, named) in [
            (&["--cost-per-mtok", "nan"][..], "--cost-per-mtok NaN"),
            (&["--cost-per-mtok", "inf"], "--cost-per-mtok inf"),
            (&["--cost-per-mtok=-1"], "--cost-per-mtok -1"),
            (&["--lease-ttl", "0s"], "--lease-ttl"),
            (&["--max-chunk-tokens", "0"], "--max-chunk-tokens"),
            (&["--id", ""], "--id"),
            (&["--id", "a/b"], "--id"),
        ] {
            let error = check(flags).expect_err(&format!("{flags:?} accepted"));
            assert!(error.to_string().starts_with(named), "{flags:?}: {error}");
        }
    }
}
