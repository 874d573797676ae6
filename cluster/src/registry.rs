//! The registry abstraction: workers publish their record under a lease, routers and the
//! control plane read and watch the membership. Implemented by etcd and by an in-memory store.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::membership::Membership;
use crate::schema::{MAX_ROUTER_ID_BYTES, RouterRecord, WorkerRecord, router_id_problem};
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
    /// Another live router replica announced itself under this router id.
    #[error(
        "router id {id:?} is announced by another live router replica ({holder}); a router \
         makes its id up at every start, so restart this one for a new id"
    )]
    RouterIdTaken { id: String, holder: String },
}

/// Refuses a router id that cannot name a replica ([`RegistryError::Config`]: waiting does not
/// help): it must be non-empty, without `/` and at most 253 bytes.
pub fn check_router_id(router_id: &str) -> Result<(), RegistryError> {
    match router_id_problem(router_id) {
        None => Ok(()),
        Some(problem) => Err(RegistryError::Config(format!(
            "router id {router_id:?} is invalid: {problem}; a router id must be 1 to \
             {MAX_ROUTER_ID_BYTES} bytes without '/' (it is one segment of an etcd key and is \
             named by the replica's response ids)"
        ))),
    }
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

    /// Publishes `record` under `router_key(record.id)` on a lease of `ttl`, kept alive in the
    /// background (and published again after the store was unreachable or the lease was lost)
    /// until the returned presence is withdrawn or dropped.
    ///
    /// The id is checked first ([`check_router_id`]; [`RegistryError::Config`]), then the
    /// ttl ([`RegistryError::InvalidTtl`] under 1 s). An id another live replica holds is
    /// waited for up to a lease TTL (an earlier run of this replica, restarted within its TTL,
    /// lets go by then), then refused ([`RegistryError::RouterIdTaken`]).
    async fn announce_router(
        &self,
        record: RouterRecord,
        ttl: Duration,
    ) -> Result<RouterPresence, RegistryError>;

    /// The record of router replica `router_id`, if it is running (announced and its lease
    /// alive). Read from the store at each call: an unreachable store is an error.
    async fn find_router(&self, router_id: &str) -> Result<Option<RouterRecord>, RegistryError>;

    /// Every router replica announced now, by id.
    async fn list_routers(&self) -> Result<Vec<RouterRecord>, RegistryError>;

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

/// What a handle on a published record asks of the task that keeps it: a [`Registration`]
/// (`R` = [`WorkerRecord`]), a [`RouterPresence`] (`R` = [`RouterRecord`]).
pub(crate) enum Command<R = WorkerRecord> {
    Update(R, oneshot::Sender<Result<(), RegistryError>>),
    Deregister(oneshot::Sender<Result<(), RegistryError>>),
}

/// Asks the task behind `commands` to withdraw its record, and waits for its answer.
async fn withdraw<R>(commands: &mpsc::Sender<Command<R>>) -> Result<(), RegistryError> {
    let (tx, rx) = oneshot::channel();
    commands
        .send(Command::Deregister(tx))
        .await
        .map_err(|_| RegistryError::Stopped)?;
    rx.await.map_err(|_| RegistryError::Stopped)?
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
        withdraw(&self.commands).await
    }
}

/// Handle on a router replica's announced presence ([`Registry::announce_router`]). Dropping
/// it without [`RouterPresence::withdraw`] stops the keepalive and removes the record too (best
/// effort), as soon as its background task notices.
#[derive(Debug)]
pub struct RouterPresence {
    commands: mpsc::Sender<Command<RouterRecord>>,
}

impl RouterPresence {
    pub(crate) fn new(commands: mpsc::Sender<Command<RouterRecord>>) -> Self {
        Self { commands }
    }

    /// Withdraws the record now (revokes the lease).
    pub async fn withdraw(self) -> Result<(), RegistryError> {
        withdraw(&self.commands).await
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

    /// A bad router id is a configuration error (retrying does not help) saying what is wrong
    /// and what a router id must be.
    #[test]
    fn a_bad_router_id_says_what_is_wrong_and_what_to_use() {
        assert!(check_router_id("router-5c7d9-xk2p").is_ok());
        let error = check_router_id("tenant/router-0").unwrap_err();
        assert!(matches!(error, RegistryError::Config(_)));
        let message = error.to_string();
        for needle in ["\"tenant/router-0\"", "contains '/'", "1 to 253 bytes"] {
            assert!(message.contains(needle), "{needle:?} not in {message}");
        }
        let message = check_router_id(&"r".repeat(300)).unwrap_err().to_string();
        assert!(message.contains("300 bytes long"), "{message}");
    }

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
