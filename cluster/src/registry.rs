//! The registry abstraction: workers publish their record under a lease, routers and the
//! control plane read and watch the membership. Implemented by etcd and by an in-memory store.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::membership::Membership;
use crate::schema::WorkerRecord;
use crate::telemetry::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {}", concise(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("registration task has stopped")]
    Stopped,
    #[error("invalid lease ttl {0:?}: must be at least 1 s")]
    InvalidTtl(Duration),
    #[error("write refused: this replica no longer holds `{0}` (leadership moved)")]
    Fenced(String),
    #[error("{0}")]
    Config(String),
    /// Another live worker holds this worker id.
    #[error(
        "worker id {id:?} is registered by another live worker ({holder}); give each worker its \
         own --id"
    )]
    IdTaken { id: String, holder: String },
}

impl RegistryError {
    /// etcd refused the request for its size (over its `--max-request-bytes`, 1.5 MiB by
    /// default, or over its gRPC message limit): the request is at fault, not etcd's
    /// reachability, and sending it again will not help.
    pub fn is_request_too_large(&self) -> bool {
        let RegistryError::Etcd(error) = self else {
            return false;
        };
        let text = error.to_string();
        [
            "request is too large",
            "larger than max",
            "message length too large",
        ]
        .iter()
        .any(|needle| text.contains(needle))
    }
}

/// An etcd error as a person reads it in a log line repeated at every retry. A gRPC status
/// prints itself as a debug dump (`code: '…', message: "…", source: tonic::transport::Error(
/// Transport, ConnectError(…))`); the status's message and its innermost cause say the same
/// ("tcp connect error: Connection refused (os error 111)").
fn concise(error: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return error.to_string();
    };
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(status);
    let mut innermost = None;
    while let Some(error) = cause {
        innermost = Some(error);
        cause = error.source();
    }
    // gRPC's own spelling (NOT_FOUND), from the code's Rust name (NotFound).
    let mut code = String::new();
    for (i, c) in format!("{:?}", status.code()).chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    match innermost {
        Some(root) if !status.message().contains(&root.to_string()) => {
            format!("{}: {root} [{code}]", status.message())
        }
        _ => format!("{} [{code}]", status.message()),
    }
}

/// A condition on a write: it happens only while `key` is still attached to `lease`, i.e.
/// while the writer still holds the leadership it checked. A leader cut off from etcd for a
/// lease TTL can otherwise make one last write after another replica took over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub lease: i64,
}

/// A membership store.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Publishes `record` under a lease of `ttl`, kept alive in the background until the
    /// returned registration is deregistered or dropped.
    async fn register(
        &self,
        record: WorkerRecord,
        ttl: Duration,
    ) -> Result<Registration, RegistryError>;

    /// Names the store for operators, e.g. `etcd at http://127.0.0.1:2379`.
    fn describe(&self) -> String;

    /// Registers the store's own metrics (e.g. etcd watch restarts) in a component's registry.
    fn register_metrics(&self, _metrics: &Metrics) {}

    /// The workers registered now.
    async fn list_workers(&self) -> Result<Vec<WorkerRecord>, RegistryError>;

    /// A live view of the workers, kept current by a background watch. When the store becomes
    /// unreachable the view keeps its last contents (static stability).
    async fn watch_workers(&self) -> Result<Membership, RegistryError>;

    /// The stored routing policy document (`policy` key), `None` when none was ever set.
    async fn get_policy(&self) -> Result<Option<Vec<u8>>, RegistryError>;

    /// Stores the routing policy document. Callers validate it first: the store keeps bytes.
    /// With a `fence`, the write happens only while the fence holds ([`RegistryError::Fenced`]).
    async fn put_policy(
        &self,
        document: Vec<u8>,
        fence: Option<&Fence>,
    ) -> Result<(), RegistryError>;

    /// The policy document as it changes, starting with the current one (`None` = unset or
    /// deleted). Kept current by a background watch that resumes from its last revision; when
    /// the store is unreachable the last value stays.
    async fn watch_policy(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError>;

    /// Stores (`drain = true`) or deletes the drain request of `worker_id` (`drain/<id>`).
    /// Returns whether a request was stored before the call.
    /// With a `fence`, only while the fence holds ([`RegistryError::Fenced`]).
    async fn set_drain(
        &self,
        worker_id: &str,
        drain: bool,
        fence: Option<&Fence>,
    ) -> Result<bool, RegistryError>;

    /// Worker ids with a drain request stored, sorted.
    async fn list_drains(&self) -> Result<Vec<String>, RegistryError>;

    /// Whether a drain of `worker_id` is requested, as it changes, starting with the current
    /// answer. Like the policy watch, it keeps its last value while the store is unreachable.
    async fn watch_drain(&self, worker_id: &str) -> Result<watch::Receiver<bool>, RegistryError>;

    /// The control-plane leader's record (the `leader/control-plane` value: JSON with its `id`
    /// and `grpc` address) as it changes, starting with the current one; `None` while no
    /// control plane leads. Routers find where to send their reports here. Like the policy
    /// watch, it keeps its last value while the store is unreachable.
    async fn watch_control_plane(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError>;

    /// Announces a control plane that runs without an election (a single in-process replica)
    /// the way an elected leader is announced by its leader key. Stores whose control planes
    /// are elected (etcd) ignore it.
    async fn announce_standalone_control_plane(
        &self,
        _record: Option<Vec<u8>>,
    ) -> Result<(), RegistryError> {
        Ok(())
    }
}

pub(crate) enum Command {
    Update(WorkerRecord, oneshot::Sender<Result<(), RegistryError>>),
    Deregister(oneshot::Sender<Result<(), RegistryError>>),
}

/// Handle on a live registration. Dropping it without [`Registration::deregister`] also
/// withdraws the record, as soon as its background task notices.
#[derive(Debug)]
pub struct Registration {
    commands: mpsc::Sender<Command>,
}

impl Registration {
    pub(crate) fn new(commands: mpsc::Sender<Command>) -> Self {
        Self { commands }
    }

    /// Replaces the published record (same key), e.g. to advertise `draining`.
    pub async fn update(&self, record: WorkerRecord) -> Result<(), RegistryError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Update(record, tx))
            .await
            .map_err(|_| RegistryError::Stopped)?;
        rx.await.map_err(|_| RegistryError::Stopped)?
    }

    /// Withdraws the record now (revokes the lease).
    pub async fn deregister(self) -> Result<(), RegistryError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Deregister(tx))
            .await
            .map_err(|_| RegistryError::Stopped)?;
        rx.await.map_err(|_| RegistryError::Stopped)?
    }
}

#[cfg(test)]
mod concise_tests {
    use super::*;

    #[test]
    fn an_unreachable_etcd_reads_as_its_cause_not_a_debug_dump() {
        let mut status = tonic::Status::unavailable("tcp connect error");
        status.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        )));
        let error = RegistryError::Etcd(etcd_client::Error::GRpcStatus(status));
        assert_eq!(
            error.to_string(),
            "etcd: tcp connect error: Connection refused (os error 111) [UNAVAILABLE]"
        );
        let plain = etcd_client::Error::GRpcStatus(tonic::Status::not_found("no such key"));
        assert_eq!(
            RegistryError::Etcd(plain).to_string(),
            "etcd: no such key [NOT_FOUND]"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write etcd refuses for its size is told apart from etcd being unreachable (the
    /// control plane answered "cluster registry unreachable" to a 2 MB policy document).
    #[test]
    fn a_request_too_large_is_not_an_outage() {
        let status = |code, message: &str| {
            RegistryError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, message,
            )))
        };
        for too_large in [
            status(
                tonic::Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
            status(
                tonic::Code::ResourceExhausted,
                "grpc: received message larger than max (2370065 vs. 2097152)",
            ),
        ] {
            assert!(too_large.is_request_too_large(), "{too_large}");
        }
        for other in [
            status(tonic::Code::Unavailable, "tcp connect error"),
            RegistryError::Stopped,
            RegistryError::Fenced("leader".into()),
        ] {
            assert!(!other.is_request_too_large(), "{other}");
        }
    }
}
