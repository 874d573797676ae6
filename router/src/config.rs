//! Router configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use switchyard_cluster::in_process::InProcessDialer;
use switchyard_cluster::listen::ConnectionTimeouts;
use switchyard_cluster::telemetry::metrics::Metrics;
use switchyard_proto::RequestLimits;
use switchyard_proto::hosted::StreamDialer;
use switchyard_proto::v1::Lane;

#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// OpenAI-compatible HTTP listen address; `None` serves gRPC only.
    pub http_listen: Option<SocketAddr>,
    /// Lane for `REQUEST_CLASS_AUTO` requests until the classifier's rules say otherwise.
    pub default_lane: Lane,
    pub limits: RequestLimits,
    /// Timeout for connecting to a worker.
    pub connect_timeout: Duration,
    /// How long a cancelled generation may take to confirm before the router reports it
    /// finished anyway.
    pub cancel_grace: Duration,
    /// Placement attempts per request (first placement, retries and failovers together).
    pub max_attempts: u32,
    /// JSON file of API keys and their tenants (see [`crate::auth`]). When set, every
    /// `Inference` call and every `/v1` HTTP request must carry `authorization: Bearer <key>`,
    /// and the key's tenant replaces the request metadata `tenant`. `None`: no
    /// authentication, and the client's own metadata `tenant` is honoured.
    pub api_keys_file: Option<PathBuf>,
    /// The cluster token presented on every worker link (workers started with one refuse
    /// `Worker` calls without it). `None`: links carry no credential.
    pub cluster_token: Option<switchyard_cluster::credential::ClusterToken>,
    /// TLS: the certificate both listeners (gRPC and HTTP) serve, and the CA trusted on the
    /// links to workers and to the control plane. Default: plaintext.
    pub tls: switchyard_cluster::tls::TlsFiles,
    /// At most this many requests a second have their decision and outcome reported to the
    /// control plane (the decision feed); the per-second stats cover every request anyway.
    pub decision_reports_per_s: u32,
    /// Requests one `Session` may have running at once; further `Start` frames fail with
    /// `RESOURCE_EXHAUSTED` (the session stays open).
    pub max_session_requests: u32,
    /// Streams (calls) one gRPC connection may have open at once (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`): a client opening more waits for one to end.
    pub max_connection_streams: u32,
    /// Requests one tenant may have in flight across all its calls (0: no limit; see
    /// [`crate::tenant_quota`]).
    pub max_tenant_requests: u32,
    /// Flow control per generation: tokens a worker may send ahead of the client's reading
    /// (granted again as the client reads; 0: no flow control, a client that stops reading
    /// is buffered without bound).
    pub stream_credit_tokens: u32,
    /// Where the router registers its Prometheus metrics; served at `/metrics` on the HTTP
    /// port (and wherever the caller serves it).
    pub metrics: Metrics,
    /// How long a connection to either listener may take to send its first request, and
    /// stay silent afterwards (see [`switchyard_cluster::listen`]).
    pub connections: ConnectionTimeouts,
    /// Which origins' browser pages may call the HTTP doors (CORS); off by default.
    pub http_cors: crate::openai::CorsOrigins,
    /// On shutdown, longest the router waits for its requests in flight to finish before it
    /// closes its worker links.
    pub drain_timeout: Duration,
    /// Workers this process hosts: their links are made in process, not over the network.
    pub hosted_workers: Vec<HostedWorker>,
    /// How many stored Responses-API responses this replica keeps, and how long.
    pub response_store: crate::response_store::StoreLimits,
    /// How large the Batch API's files may be, how many a replica keeps, and how many batch
    /// requests it runs at once.
    pub batches: crate::batches::BatchLimits,
    /// `host:port` where the other router replicas reach this one's gRPC door (to read the
    /// responses it stored); default: the bound listen address.
    pub advertise: Option<String>,
    /// Where a stopping router with nobody to hand its stored responses, files and batches to
    /// keeps them for its next start (see [`crate::response_store::saved`]); `None`: they go
    /// with it.
    pub state_dir: Option<PathBuf>,
    /// Longest the state directory's journal keeps changes written but not synced to disk.
    pub state_sync_interval: Duration,
}

/// A worker running in the router's own process, and how its link reaches it.
#[derive(Debug, Clone)]
pub struct HostedWorker {
    /// Its worker id, as registered.
    pub id: String,
    /// `Worker` calls (tokenizer fetches) over an in-memory HTTP/2 pipe.
    pub pipe: InProcessDialer,
    /// `Serve` streams, handed over as message streams.
    pub streams: StreamDialer,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".parse().expect("valid literal address"),
            http_listen: None,
            default_lane: Lane::CostSensitive,
            limits: RequestLimits::default(),
            connect_timeout: Duration::from_secs(2),
            cancel_grace: Duration::from_secs(2),
            max_attempts: 3,
            api_keys_file: None,
            cluster_token: None,
            tls: Default::default(),
            decision_reports_per_s: 200,
            max_session_requests: 1024,
            max_connection_streams: 2048,
            max_tenant_requests: 0,
            stream_credit_tokens: 256,
            metrics: Metrics::new(),
            connections: ConnectionTimeouts::default(),
            http_cors: crate::openai::CorsOrigins::Off,
            drain_timeout: Duration::from_secs(30),
            hosted_workers: Vec::new(),
            response_store: Default::default(),
            batches: Default::default(),
            advertise: None,
            state_dir: None,
            state_sync_interval: crate::response_store::saved::DEFAULT_SYNC_INTERVAL,
        }
    }
}

impl RouterConfig {
    /// The routing policy in force while none is stored in the cluster: the built-in default
    /// with this router's default lane.
    pub fn default_policy(&self) -> crate::policy::document::PolicyDocument {
        let mut policy = crate::policy::document::PolicyDocument::default();
        if let Some(lane) = crate::policy::document::LaneName::from_lane(self.default_lane) {
            policy.default_lane = lane;
        }
        policy
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.default_lane == Lane::Unspecified {
            return Err("default lane: must be latency-critical or cost-sensitive".into());
        }
        if self.limits.max_tokens_cap == 0 {
            return Err("max tokens cap: must be at least 1".into());
        }
        if self.max_attempts == 0 {
            return Err("max attempts: must be at least 1".into());
        }
        self.connections.validate()
    }
}

/// Parses a lane name as used on the command line and in headers.
pub fn parse_lane(name: &str) -> Result<Lane, String> {
    match name {
        "latency-critical" => Ok(Lane::LatencyCritical),
        "cost-sensitive" => Ok(Lane::CostSensitive),
        other => Err(format!(
            "unknown lane {other:?}, expected latency-critical or cost-sensitive"
        )),
    }
}
