//! The etcd key schema (prefix `/switchyard/v1/`) and the records stored under it.

use serde::{Deserialize, Serialize};

/// Root of every key Switchyard writes.
pub const PREFIX: &str = "/switchyard/v1/";
/// Prefix of worker records: `workers/<pool>/<worker_id>`.
pub const WORKERS_PREFIX: &str = "/switchyard/v1/workers/";

/// The routing policy document (JSON), watched by every router.
pub const POLICY_KEY: &str = "/switchyard/v1/policy";

/// Prefix of drain requests: `drain/<worker_id>`, written by the control plane.
pub const DRAIN_PREFIX: &str = "/switchyard/v1/drain/";

/// Held by the control-plane leader (bound to its lease); the value names the leader.
pub const LEADER_KEY: &str = "/switchyard/v1/leader/control-plane";

/// Prefix of router presence records: `routers/<router_id>`, each on its router's lease.
pub const ROUTERS_PREFIX: &str = "/switchyard/v1/routers/";

/// Prefix of dashboard sessions signed out before they expired: `dashboard/revoked/<session
/// id>`, each on a lease that ends with the session, written by the control plane.
pub const DASHBOARD_REVOKED_PREFIX: &str = "/switchyard/v1/dashboard/revoked/";

/// The key that asks worker `worker_id` to drain. Its presence is the request; the value is
/// informational (who asked, when).
pub fn drain_key(worker_id: &str) -> String {
    format!("{DRAIN_PREFIX}{worker_id}")
}

/// The worker id of a drain key; `None` for keys outside the schema.
pub fn parse_drain_key(key: &str) -> Option<&str> {
    let id = key.strip_prefix(DRAIN_PREFIX)?;
    (!id.is_empty() && !id.contains('/')).then_some(id)
}

/// The key a worker's record lives under.
pub fn worker_key(pool: Pool, worker_id: &str) -> String {
    format!("{WORKERS_PREFIX}{}/{worker_id}", pool.as_str())
}

/// Splits a worker key into `(pool, worker_id)`; `None` for keys outside the schema.
pub fn parse_worker_key(key: &str) -> Option<(Pool, &str)> {
    let rest = key.strip_prefix(WORKERS_PREFIX)?;
    let (pool, id) = rest.split_once('/')?;
    if id.is_empty() || id.contains('/') {
        return None;
    }
    Some((pool.parse().ok()?, id))
}

/// The key router replica `router_id`'s presence record lives under.
pub fn router_key(router_id: &str) -> String {
    format!("{ROUTERS_PREFIX}{router_id}")
}

/// The longest router id: a Kubernetes pod name (a DNS subdomain) fits.
pub const MAX_ROUTER_ID_BYTES: usize = 253;

/// Why `router_id` cannot name a router replica (`None` when it can): it must be non-empty,
/// without `/` (it is one etcd key segment) and at most [`MAX_ROUTER_ID_BYTES`] bytes.
pub(crate) fn router_id_problem(router_id: &str) -> Option<String> {
    if router_id.is_empty() {
        Some("it is empty".into())
    } else if router_id.contains('/') {
        Some("it contains '/'".into())
    } else if router_id.len() > MAX_ROUTER_ID_BYTES {
        Some(format!(
            "it is {} bytes long, over {MAX_ROUTER_ID_BYTES}",
            router_id.len()
        ))
    } else {
        None
    }
}

/// What a running router replica tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterRecord {
    /// The replica's tag, new at every start: what its stored responses' ids carry.
    pub id: String,
    /// `host:port` where the other replicas reach this replica's gRPC door (its
    /// `StoredResponses` service).
    pub grpc_address: String,
}

impl RouterRecord {
    pub fn key(&self) -> String {
        router_key(&self.id)
    }
}

// The pool enum is the routing policy's (placement chooses a pool); the key schema names it.
pub use switchyard_policy::Pool;

/// Lifecycle state a worker advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Takes new work.
    Ready,
    /// Finishes in-flight work, takes none new.
    Draining,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// What a worker can take on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    /// Sequences served at once.
    pub max_concurrent: u32,
    /// Expected decode rate of one stream.
    pub tokens_per_s: f64,
    /// Price of a million generated tokens, in the operator's currency.
    pub cost_per_mtok: f64,
}

/// A worker's entry in `workers/<pool>/<id>`, bound to its lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    pub pool: Pool,
    /// `host:port` of the worker's gRPC server.
    pub address: String,
    pub models: Vec<String>,
    pub capacity: Capacity,
    /// Human-readable hardware description (CPU model and threads, GPU name and memory).
    pub hardware: String,
    /// Engine kind, e.g. `synthetic` (load-test backend) or `candle`.
    pub engine: String,
    pub version: String,
    pub state: WorkerState,
    /// Whether the engine can score a prompt (`SamplingParams.prompt_logprobs`): routers
    /// place such requests only on workers that can. Absent (older workers): cannot.
    #[serde(default)]
    pub scores_prompts: bool,
    /// Whether the engine can embed a prompt (`GenerateRequest.embed`): routers place such
    /// requests only on workers that can. Absent (older workers): cannot.
    #[serde(default)]
    pub embeds: bool,
}

impl WorkerRecord {
    pub fn key(&self) -> String {
        worker_key(self.pool, &self.id)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    pub fn is_ready(&self) -> bool {
        self.state == WorkerState::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_keys_round_trip() {
        let key = worker_key(Pool::Wse, "wse-1");
        assert_eq!(key, "/switchyard/v1/workers/wse/wse-1");
        assert_eq!(parse_worker_key(&key), Some((Pool::Wse, "wse-1")));
    }

    #[test]
    fn drain_keys_round_trip() {
        let key = drain_key("gpu-0");
        assert_eq!(key, "/switchyard/v1/drain/gpu-0");
        assert_eq!(parse_drain_key(&key), Some("gpu-0"));
        assert_eq!(parse_drain_key("/switchyard/v1/drain/"), None);
        assert_eq!(parse_drain_key("/switchyard/v1/drain/a/b"), None);
        assert_eq!(parse_drain_key("/switchyard/v1/policy"), None);
    }

    #[test]
    fn router_keys_and_records() {
        assert_eq!(
            router_key("router-7f9c-x2"),
            "/switchyard/v1/routers/router-7f9c-x2"
        );
        let record = RouterRecord {
            id: "router-a".into(),
            grpc_address: "10.0.0.7:50051".into(),
        };
        assert_eq!(record.key(), "/switchyard/v1/routers/router-a");
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(json, r#"{"id":"router-a","grpc_address":"10.0.0.7:50051"}"#);
        assert_eq!(serde_json::from_str::<RouterRecord>(&json).unwrap(), record);
    }

    #[test]
    fn router_ids_are_one_key_segment_of_at_most_253_bytes() {
        assert_eq!(router_id_problem("router-0"), None);
        assert_eq!(router_id_problem(&"r".repeat(253)), None);
        assert!(router_id_problem("").is_some());
        assert!(router_id_problem("a/b").is_some());
        assert!(router_id_problem(&"r".repeat(254)).is_some());
        // Bytes, not characters.
        assert!(router_id_problem(&"é".repeat(127)).is_some());
    }

    #[test]
    fn foreign_keys_are_rejected() {
        assert_eq!(parse_worker_key("/switchyard/v1/policy"), None);
        assert_eq!(parse_worker_key("/switchyard/v1/workers/tpu/x"), None);
        assert_eq!(parse_worker_key("/switchyard/v1/workers/gpu/"), None);
        assert_eq!(parse_worker_key("/switchyard/v1/workers/gpu/a/b"), None);
    }

    #[test]
    fn records_serialise_with_lowercase_enums() {
        let record = WorkerRecord {
            id: "g1".into(),
            pool: Pool::Gpu,
            address: "127.0.0.1:1".into(),
            models: vec!["m".into()],
            capacity: Capacity {
                max_concurrent: 4,
                tokens_per_s: 50.0,
                cost_per_mtok: 0.2,
            },
            hardware: "cpu".into(),
            engine: "synthetic".into(),
            version: "0.1.0".into(),
            state: WorkerState::Draining,
            scores_prompts: false,
            embeds: false,
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""pool":"gpu""#) && json.contains(r#""state":"draining""#));
        assert_eq!(serde_json::from_str::<WorkerRecord>(&json).unwrap(), record);
    }
}
