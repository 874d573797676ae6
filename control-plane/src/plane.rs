//! The control plane's operations, shared by the `Admin` gRPC service and the dashboard's JSON
//! API so that both validate and answer alike: list workers with their live load, stats,
//! policy, drain/undrain (leader only).
//!
//! ## While etcd is unreachable
//!
//! The workers and stats are read from etcd itself, so that an answer right after a change
//! reflects it. The two front doors differ when etcd does not answer:
//!
//! - The dashboard's JSON API ([`ControlPlane::workers_or_last_seen`],
//!   [`ControlPlane::stats_or_last_seen`]) waits at most [`REGISTRY_READ_TIMEOUT`], then answers
//!   from the membership the control plane watches (kept as last seen while etcd is away, as
//!   routers keep theirs) and the drain requests of its last successful read, marked with a
//!   [`RegistryStatus`] whose `reachable` is `false`. Live load still comes from the load
//!   streams to the workers, which do not go through etcd. This is what on-call opens during an
//!   etcd incident; the page says, in a banner, that etcd is unreachable.
//! - The `Admin` gRPC API ([`ControlPlane::workers`], [`ControlPlane::stats`]: `ListWorkers`,
//!   `GetClusterStats`) stays authoritative: an answer from etcd or `UNAVAILABLE` ("cluster
//!   registry unreachable", exit code 7 from the CLI, which scripts retry). A script acting on
//!   the answer (draining what it lists, say) must not act on a membership it cannot tell is
//!   stale, and its wire messages have no field to say so.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use switchyard_cluster::telemetry::chain_text;
use switchyard_cluster::{Membership, Pool, Registry, RegistryError, WorkerRecord, WorkerState};
use switchyard_policy::document::{MAX_DOCUMENT_BYTES, PolicyDocument};
use switchyard_proto::v1;
use tracing::{info, warn};

use crate::events::Events;
use crate::leader::{Leadership, ReplicaInfo};
use crate::loads::{Loads, Unreachable};
use crate::reports::Insights;
use switchyard_cluster::Fence;

/// Why an operation was refused; mapped to a gRPC status or an HTTP code by each front door.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// This replica is not the leader; the message names the leader when known.
    #[error("{0}")]
    NotLeader(String),
    #[error("{0}")]
    Unavailable(String),
}

impl From<OpError> for tonic::Status {
    fn from(error: OpError) -> Self {
        match error {
            OpError::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            OpError::NotFound(m) => tonic::Status::not_found(m),
            OpError::NotLeader(m) => tonic::Status::failed_precondition(m),
            OpError::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

fn registry_error(error: RegistryError) -> OpError {
    match error {
        RegistryError::Fenced(_) => OpError::NotLeader(format!(
            "{error}; the write was not applied — send it to the current leader"
        )),
        // etcd answered: the request is at fault, and sending it again will not help.
        _ if error.is_request_too_large() => OpError::InvalidArgument(format!(
            "the write is too large for etcd (its --max-request-bytes, 1.5 MiB by default): \
             {error}"
        )),
        _ => OpError::Unavailable(format!("cluster registry unreachable: {error}")),
    }
}

/// How long the dashboard waits for etcd to list the workers and drains before it answers from
/// the membership as last seen. etcd answers these reads in milliseconds; a frozen or
/// partitioned etcd never does, and the etcd client gives up only after ~5 s — longer than the
/// page's poll (1 s) and most of its request timeout (4 s), so on-call would see nothing just
/// when they need the page. A second is far above a healthy read and well inside both.
pub const REGISTRY_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the registry (etcd) answered the read behind an answer, and if not, since when it
/// has not and what the answer is from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegistryStatus {
    /// The workers and drains are etcd's own answer; `false`: the membership as last seen
    /// (the control plane's watch of it) and the drain requests of the last read that
    /// succeeded.
    pub reachable: bool,
    /// Why etcd is taken as unreachable, for an operator; `None` while it answers.
    pub error: Option<String>,
    /// When a read of etcd last succeeded (unix ms): what the drain requests shown are as of.
    /// `None` before any read succeeded.
    pub as_of_unix_ms: Option<u64>,
    /// Since when reads of etcd fail (unix ms): the first failure after the last success.
    /// `None` while it answers.
    pub since_unix_ms: Option<u64>,
}

/// What the last reads of the registry found: kept to answer from while etcd is unreachable.
#[derive(Debug, Default)]
struct LastRead {
    /// The drain requests of the last read that succeeded (etcd has no watch of them all).
    drains: Vec<String>,
    /// When that read succeeded.
    as_of_unix_ms: Option<u64>,
    /// The first failure since then, and the last failure's message.
    failing: Option<(u64, String)>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the registry answered: the records and drain requests, and whether they are etcd's own.
struct Snapshot {
    records: Vec<WorkerRecord>,
    drains: Vec<String>,
    registry: RegistryStatus,
}

/// A worker as the dashboard shows it: its record, live load, and whether a drain is requested.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    #[serde(flatten)]
    pub record: WorkerRecord,
    /// A drain key exists for this worker (the worker then advertises `draining`).
    pub drain_requested: bool,
    /// Live load; `None` while the control plane has no stream to the worker.
    pub load: Option<LoadView>,
    /// Why the control plane has no stream to the worker, once an attempt failed; such a
    /// worker is no ready capacity (see [`ControlPlane::stats`]).
    pub unreachable: Option<Unreachable>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct LoadView {
    pub active: u32,
    pub queued: u32,
    pub tokens_per_s: f64,
}

impl From<v1::Load> for LoadView {
    fn from(load: v1::Load) -> Self {
        Self {
            active: load.active,
            queued: load.queued,
            tokens_per_s: load.tokens_per_s,
        }
    }
}

/// The cluster's stats: the wire's, and what its `PoolStats` has no field for.
#[derive(Debug, Clone)]
pub struct ClusterStats {
    pub wire: v1::GetClusterStatsResponse,
    /// Per pool, in `wire.pools` order: workers advertising `ready` that this control plane
    /// has no load stream to, left out of `ready` and `ready_slots`
    /// (`workers = ready + draining + unreachable`).
    pub unreachable: Vec<u32>,
}

/// Everything the front doors need.
#[derive(Clone)]
pub struct ControlPlane {
    registry: Arc<dyn Registry>,
    loads: Loads,
    events: Events,
    leadership: Leadership,
    /// History and decision feed from the routers' reports.
    insights: Insights,
    /// Held across a merge's read, merge and write: two merges at once must not lose one.
    policy_writes: Arc<tokio::sync::Mutex<()>>,
    /// `https` when the dashboards serve TLS (replicas share their flags): how a replica's
    /// dashboard is named to an operator.
    dashboard_scheme: &'static str,
    /// The watched membership, answered from while etcd is unreachable (see the module docs);
    /// `None`: no such answer, the registry's error is returned.
    membership: Option<Membership>,
    /// What the last reads of the registry found.
    last_read: Arc<Mutex<LastRead>>,
}

impl ControlPlane {
    pub fn new(
        registry: Arc<dyn Registry>,
        loads: Loads,
        events: Events,
        leadership: Leadership,
    ) -> Self {
        Self {
            registry,
            loads,
            events,
            insights: Insights::led_by(leadership.clone()),
            leadership,
            policy_writes: Arc::default(),
            dashboard_scheme: "http",
            membership: None,
            last_read: Arc::default(),
        }
    }

    /// The watched membership the dashboard answers from while etcd is unreachable.
    pub fn with_membership(mut self, membership: Membership) -> Self {
        self.membership = Some(membership);
        self
    }

    /// The dashboards serve TLS: they are named `https://…`.
    pub fn with_dashboard_tls(mut self, tls: bool) -> Self {
        self.dashboard_scheme = if tls { "https" } else { "http" };
        self
    }

    /// Where an operator opens `replica`'s dashboard, as dialled from here.
    pub fn dashboard_url(&self, replica: &ReplicaInfo) -> Option<String> {
        dashboard_url(self.dashboard_scheme, replica)
    }

    pub fn insights(&self) -> &Insights {
        &self.insights
    }

    pub fn loads(&self) -> &Loads {
        &self.loads
    }

    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// Registered workers (optionally of one pool), sorted by pool then id, from etcd itself
    /// (not the watch cache) so that an answer right after a change reflects it; UNAVAILABLE
    /// while etcd does not answer (the `Admin` API's answer: see the module docs).
    pub async fn workers(&self, pool: &str) -> Result<Vec<WorkerView>, OpError> {
        let pool = parse_pool(pool)?;
        let snapshot = self.read_registry().await?;
        Ok(self.views(snapshot.records, &snapshot.drains, pool))
    }

    /// [`Self::workers`], or, when etcd does not answer within [`REGISTRY_READ_TIMEOUT`], the
    /// membership as last seen with the drain requests last read; the status says which.
    pub async fn workers_or_last_seen(
        &self,
        pool: &str,
    ) -> Result<(Vec<WorkerView>, RegistryStatus), OpError> {
        let pool = parse_pool(pool)?;
        let snapshot = self.read_registry_or_last_seen().await?;
        let workers = self.views(snapshot.records, &snapshot.drains, pool);
        Ok((workers, snapshot.registry))
    }

    /// Workers and slots by pool. A worker advertising `ready` that this control plane has no
    /// load stream to (it refuses the cluster token, its TLS identity is wrong, nothing
    /// listens) counts as unreachable, not ready: routers cannot reach it either, as a rule.
    /// UNAVAILABLE while etcd does not answer (see the module docs).
    pub async fn stats(&self) -> Result<ClusterStats, OpError> {
        let snapshot = self.read_registry().await?;
        Ok(self.cluster_stats(snapshot))
    }

    /// [`Self::stats`], or, when etcd does not answer within [`REGISTRY_READ_TIMEOUT`], the
    /// stats of the membership as last seen (with live load); the status says which.
    pub async fn stats_or_last_seen(&self) -> Result<(ClusterStats, RegistryStatus), OpError> {
        let snapshot = self.read_registry_or_last_seen().await?;
        let registry = snapshot.registry.clone();
        Ok((self.cluster_stats(snapshot), registry))
    }

    /// The workers and drain requests from etcd, both read at once; the outcome is kept (see
    /// [`LastRead`]).
    async fn read_registry(&self) -> Result<Snapshot, OpError> {
        let read = tokio::try_join!(self.registry.list_workers(), self.registry.list_drains());
        match read {
            Ok((records, drains)) => Ok(self.answered(records, drains)),
            Err(error) => {
                let message = self.unreachable_message(&error);
                self.unanswered(message);
                Err(registry_error(error))
            }
        }
    }

    /// [`Self::read_registry`] within [`REGISTRY_READ_TIMEOUT`], or the membership as last
    /// seen and the drain requests last read when etcd does not answer in time or fails.
    async fn read_registry_or_last_seen(&self) -> Result<Snapshot, OpError> {
        let Some(membership) = &self.membership else {
            return self.read_registry().await;
        };
        let read = tokio::time::timeout(REGISTRY_READ_TIMEOUT, async {
            tokio::try_join!(self.registry.list_workers(), self.registry.list_drains())
        })
        .await;
        let message = match read {
            Ok(Ok((records, drains))) => return Ok(self.answered(records, drains)),
            Ok(Err(error)) => self.unreachable_message(&error),
            Err(_) => format!(
                "{} did not answer within {} s; check that etcd is running and reachable from \
                 this control plane",
                self.registry.describe(),
                REGISTRY_READ_TIMEOUT.as_secs()
            ),
        };
        let registry = self.unanswered(message);
        let drains = self
            .last_read
            .lock()
            .expect("last read lock")
            .drains
            .clone();
        Ok(Snapshot {
            records: membership.current().iter().cloned().collect(),
            drains,
            registry,
        })
    }

    /// Why a read of the registry failed, for an operator: the store named, its error's causes
    /// on one line (no gRPC status dumps).
    fn unreachable_message(&self, error: &RegistryError) -> String {
        let cause = match error {
            RegistryError::Etcd(etcd) => chain_text(etcd),
            other => chain_text(other),
        };
        format!(
            "{} could not be read ({cause}); check that etcd is running and reachable from this \
             control plane",
            self.registry.describe()
        )
    }

    /// etcd answered: the drain requests are kept, and the registry is reachable.
    fn answered(&self, records: Vec<WorkerRecord>, drains: Vec<String>) -> Snapshot {
        let now = now_unix_ms();
        let mut last = self.last_read.lock().expect("last read lock");
        if let Some((since, _)) = last.failing.take() {
            info!(
                down_for_ms = now.saturating_sub(since),
                "the cluster registry answers again"
            );
        }
        last.drains = drains.clone();
        last.as_of_unix_ms = Some(now);
        Snapshot {
            records,
            drains,
            registry: RegistryStatus {
                reachable: true,
                error: None,
                as_of_unix_ms: Some(now),
                since_unix_ms: None,
            },
        }
    }

    /// etcd did not answer, for `message`: remembered, and the status to show.
    fn unanswered(&self, message: String) -> RegistryStatus {
        let mut last = self.last_read.lock().expect("last read lock");
        let since = match &mut last.failing {
            Some((since, error)) => {
                error.clone_from(&message);
                *since
            }
            None => {
                let since = now_unix_ms();
                warn!(error = %message, "the cluster registry does not answer");
                last.failing = Some((since, message.clone()));
                since
            }
        };
        RegistryStatus {
            reachable: false,
            error: Some(message),
            as_of_unix_ms: last.as_of_unix_ms,
            since_unix_ms: Some(since),
        }
    }

    /// The dashboard's view of `records` (of `pool`, when given), sorted by pool then id.
    fn views(
        &self,
        records: Vec<WorkerRecord>,
        drains: &[String],
        pool: Option<Pool>,
    ) -> Vec<WorkerView> {
        let mut workers: Vec<WorkerView> = records
            .into_iter()
            .filter(|w| pool.is_none_or(|p| w.pool == p))
            .map(|record| WorkerView {
                drain_requested: drains.contains(&record.id),
                load: self.loads.get(&record.id).map(LoadView::from),
                unreachable: self.loads.unreachable(&record.id),
                record,
            })
            .collect();
        workers.sort_by(|a, b| (a.record.pool, &a.record.id).cmp(&(b.record.pool, &b.record.id)));
        workers
    }

    fn cluster_stats(&self, snapshot: Snapshot) -> ClusterStats {
        let workers = self.views(snapshot.records, &snapshot.drains, None);
        let mut response = v1::GetClusterStatsResponse {
            drains: snapshot.drains,
            leader: self.leadership.leader().map(|l| l.id).unwrap_or_default(),
            ..Default::default()
        };
        let mut unreachable = Vec::new();
        for pool in Pool::ALL {
            let mut stats = v1::PoolStats {
                pool: pool.to_string(),
                ..Default::default()
            };
            let mut pool_unreachable = 0;
            for worker in workers.iter().filter(|w| w.record.pool == pool) {
                let slots = worker.record.capacity.max_concurrent;
                stats.workers += 1;
                stats.total_slots += slots;
                match worker.record.state {
                    WorkerState::Ready if worker.unreachable.is_some() => pool_unreachable += 1,
                    WorkerState::Ready => {
                        stats.ready += 1;
                        stats.ready_slots += slots;
                    }
                    WorkerState::Draining => stats.draining += 1,
                }
                if let Some(load) = worker.load {
                    stats.active += load.active;
                    stats.queued += load.queued;
                    stats.tokens_per_s += load.tokens_per_s;
                }
            }
            response.workers += stats.workers;
            response.active += stats.active;
            response.queued += stats.queued;
            response.tokens_per_s += stats.tokens_per_s;
            response.pools.push(stats);
            unreachable.push(pool_unreachable);
        }
        ClusterStats {
            wire: response,
            unreachable,
        }
    }

    /// The stored policy document (or the built-in default), and why it is invalid when it is
    /// (written to etcd past [`Self::set_policy`]: routers do not apply it).
    pub async fn policy(&self) -> Result<v1::GetPolicyResponse, OpError> {
        let stored = self.registry.get_policy().await.map_err(registry_error)?;
        Ok(match stored {
            Some(bytes) => v1::GetPolicyResponse {
                document: String::from_utf8_lossy(&bytes).into_owned(),
                is_default: false,
                invalid: PolicyDocument::from_json(&bytes)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            },
            None => v1::GetPolicyResponse {
                document: PolicyDocument::default().to_json(),
                is_default: true,
                invalid: String::new(),
            },
        })
    }

    /// Validates and stores a policy document; returns it normalised. Leader only.
    pub async fn set_policy(&self, document: &str) -> Result<String, OpError> {
        let policy = PolicyDocument::from_json(document.as_bytes())
            .map_err(|e| OpError::InvalidArgument(format!("document: {e}")))?;
        let _write = self.policy_writes.lock().await;
        self.store_policy(policy).await
    }

    /// Applies `patch`, a JSON merge patch (RFC 7386), to the stored policy document (or the
    /// default), then validates and stores the result; returns it normalised. Leader only.
    pub async fn merge_policy(&self, patch: &str) -> Result<String, OpError> {
        if patch.len() > MAX_DOCUMENT_BYTES {
            return Err(OpError::InvalidArgument(format!(
                "document: a merge patch of {} bytes is over the policy's limit of \
                 {MAX_DOCUMENT_BYTES} bytes (1 MiB)",
                patch.len()
            )));
        }
        let patch: serde_json::Value = serde_json::from_str(patch)
            .map_err(|e| OpError::InvalidArgument(format!("document: not JSON: {e}")))?;
        if !patch.is_object() {
            return Err(OpError::InvalidArgument(
                "document: a merge patch must be a JSON object".into(),
            ));
        }
        self.require_leader()?;
        let _write = self.policy_writes.lock().await;
        let stored = self.policy().await?;
        // Refused as invalid: the stored document is at fault, and etcd answered.
        let mut document: serde_json::Value =
            serde_json::from_str(&stored.document).map_err(|e| {
                OpError::InvalidArgument(format!(
                    "document: the stored policy is not JSON ({e}), so there is nothing to merge \
                     onto; replace it whole (SetPolicy without merge: `switchyard admin policy \
                     set`)"
                ))
            })?;
        merge_patch(&mut document, &patch);
        // The merged document has no text of its own: what is at fault is named by its path,
        // the patch's own when the stored document was valid.
        let policy = PolicyDocument::from_value(&document).map_err(|e| {
            OpError::InvalidArgument(if stored.invalid.is_empty() {
                format!("document: {e} (in the merge patch)")
            } else {
                format!(
                    "document: {e} (merged onto a stored document that is invalid itself: {}; \
                     replace it whole if the patch does not fix it)",
                    stored.invalid
                )
            })
        })?;
        self.store_policy(policy).await
    }

    async fn store_policy(&self, policy: PolicyDocument) -> Result<String, OpError> {
        let fence = self.require_leader()?;
        let normalised = policy
            .to_stored_json()
            .map_err(|e| OpError::InvalidArgument(format!("document: {e}")))?;
        self.registry
            .put_policy(normalised.clone().into_bytes(), fence.as_ref())
            .await
            .map_err(registry_error)?;
        info!(rules = policy.rules.len(), "routing policy stored");
        Ok(normalised)
    }

    /// Requests a drain of a registered worker. Returns whether one was requested already.
    pub async fn drain(&self, worker_id: &str) -> Result<bool, OpError> {
        validate_worker_id(worker_id)?;
        let fence = self.require_leader()?;
        let registered = self.registry.list_workers().await.map_err(registry_error)?;
        if !registered.iter().any(|w| w.id == worker_id) {
            return Err(OpError::NotFound(format!(
                "worker_id: no registered worker {:?}",
                clipped(worker_id)
            )));
        }
        let already = self
            .registry
            .set_drain(worker_id, true, fence.as_ref())
            .await
            .map_err(registry_error)?;
        info!(%worker_id, already, "drain requested");
        Ok(already)
    }

    /// Lifts a drain request. A worker that is neither registered nor drained is unknown;
    /// the drain of a worker that is down can be lifted (it would apply on its restart).
    pub async fn undrain(&self, worker_id: &str) -> Result<bool, OpError> {
        validate_worker_id(worker_id)?;
        let fence = self.require_leader()?;
        let registered = self.registry.list_workers().await.map_err(registry_error)?;
        let was_draining = self
            .registry
            .set_drain(worker_id, false, fence.as_ref())
            .await
            .map_err(registry_error)?;
        if !was_draining && !registered.iter().any(|w| w.id == worker_id) {
            return Err(OpError::NotFound(format!(
                "worker_id: no registered worker {:?} and no drain request for it",
                clipped(worker_id)
            )));
        }
        info!(%worker_id, was_draining, "drain lifted");
        Ok(was_draining)
    }

    /// The fence this leader's writes go under (`None` for a standalone replica), or
    /// NotLeader.
    fn require_leader(&self) -> Result<Option<Fence>, OpError> {
        if let Some(fence) = self.leadership.write_fence() {
            return Ok(fence);
        }
        Err(OpError::NotLeader(not_leader_message(
            self.dashboard_scheme,
            self.leadership.leader().as_ref(),
        )))
    }
}

/// `pool` as a filter: `None` for all pools (empty).
fn parse_pool(pool: &str) -> Result<Option<Pool>, OpError> {
    if pool.is_empty() {
        return Ok(None);
    }
    pool.parse()
        .map(Some)
        .map_err(|e: String| OpError::InvalidArgument(format!("pool: {e}")))
}

fn dashboard_url(scheme: &str, replica: &ReplicaInfo) -> Option<String> {
    // Where it can be dialled from here, not `0.0.0.0` or the leader's loopback.
    replica
        .dashboard_address()
        .map(|address| format!("{scheme}://{address}/"))
}

fn not_leader_message(scheme: &str, leader: Option<&ReplicaInfo>) -> String {
    match leader {
        Some(l) => {
            let http = dashboard_url(scheme, l)
                .map(|url| format!(", dashboard {url}"))
                .unwrap_or_default();
            format!(
                "this control-plane replica is a follower; send writes to the leader {} (gRPC {}{http})",
                l.id, l.grpc
            )
        }
        None => {
            "this control-plane replica is a follower and no leader is elected yet; retry shortly"
                .into()
        }
    }
}

/// Most characters of a caller's worker id an error message repeats.
const ID_SHOWN: usize = 100;

/// `id` as an error message repeats it: its first [`ID_SHOWN`] characters, then `…` (a
/// 5 000-character id sent back whole only bloats answers and logs).
pub(crate) fn clipped(id: &str) -> String {
    match id.char_indices().nth(ID_SHOWN) {
        Some((end, _)) => format!("{}…", &id[..end]),
        None => id.to_string(),
    }
}

fn validate_worker_id(worker_id: &str) -> Result<(), OpError> {
    if worker_id.is_empty() {
        return Err(OpError::InvalidArgument(
            "worker_id: must not be empty".into(),
        ));
    }
    if worker_id.contains('/') {
        return Err(OpError::InvalidArgument(format!(
            "worker_id: {:?} must not contain '/'",
            clipped(worker_id)
        )));
    }
    Ok(())
}

/// RFC 7386: members of `patch` replace those of `target`, objects merging recursively;
/// `null` removes a member; anything but an object replaces `target` whole.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    let target = target.as_object_mut().expect("made an object above");
    for (name, value) in members {
        if value.is_null() {
            target.remove(name);
        } else {
            merge_patch(
                target
                    .entry(name.clone())
                    .or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{OpError, merge_patch, not_leader_message, registry_error};
    use crate::leader::ReplicaInfo;
    use switchyard_cluster::RegistryError;

    /// etcd refusing a write for its size is the request's fault (exit 5 from the CLI), not
    /// "cluster registry unreachable" (exit 7, which scripts retry).
    #[test]
    fn a_write_too_large_for_etcd_is_refused_as_invalid() {
        let too_large = RegistryError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large",
        )));
        match registry_error(too_large) {
            OpError::InvalidArgument(message) => {
                assert!(message.contains("too large for etcd"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        let down = RegistryError::Etcd(etcd_client::Error::GRpcStatus(tonic::Status::new(
            tonic::Code::Unavailable,
            "tcp connect error",
        )));
        assert!(matches!(registry_error(down), OpError::Unavailable(_)));
    }

    #[test]
    fn a_follower_names_the_leaders_dashboard_where_it_can_be_dialled() {
        let leader = ReplicaInfo {
            id: "cp-1".into(),
            grpc: "10.0.0.5:50052".into(),
            http: Some("0.0.0.0:8090".into()),
        };
        let message = not_leader_message("http", Some(&leader));
        assert!(
            message.contains("leader cp-1 (gRPC 10.0.0.5:50052, dashboard http://10.0.0.5:8090/)"),
            "{message}"
        );
        // Dashboards serving TLS are named so: an http:// link to a TLS-only listener fails.
        let message = not_leader_message("https", Some(&leader));
        assert!(
            message.contains("dashboard https://10.0.0.5:8090/)"),
            "{message}"
        );
    }

    #[test]
    fn error_messages_repeat_at_most_a_hundred_characters_of_an_id() {
        assert_eq!(super::clipped("gpu-0"), "gpu-0");
        let long = "é".repeat(5000);
        let shown = super::clipped(&long);
        assert_eq!(shown.chars().count(), 101, "{shown}");
        assert!(shown.ends_with('…'));
    }

    #[test]
    fn a_merge_patch_changes_only_what_it_names() {
        // RFC 7386's own example.
        let mut target = json!({"title": "Goodbye!", "author": {"givenName": "John",
            "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"});
        merge_patch(
            &mut target,
            &json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            target,
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
    }
}
