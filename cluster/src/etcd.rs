//! etcd-backed registry. Worker records and router presence records live under a lease kept
//! alive at TTL/3 (one loop for both: [`Leased`]); the membership watch lists the prefix, then
//! watches from the next revision, and starts over (keeping its last view) whenever etcd fails
//! or compacts past it.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::etcd_channel::{EndpointLabels, FailoverChannel};
use crate::lease::{KeptLease, LeaseLost};

use crate::membership::{Membership, MembershipView, publish};
use crate::registry::{
    Command, Fence, Registration, Registry, RegistryError, RouterPresence, check_router_id,
};
use crate::schema::{
    DRAIN_PREFIX, LEADER_KEY, POLICY_KEY, ROUTERS_PREFIX, RouterRecord, WORKERS_PREFIX,
    WorkerRecord, drain_key, parse_drain_key, parse_worker_key, router_key,
};
use crate::telemetry::ErrorChain;
use crate::telemetry::metrics::Metrics;

/// Runs `op`, under `fence` when given (one transaction: compare the fence's lease, then
/// the write).
async fn fenced(
    client: &mut Client,
    fence: Option<&Fence>,
    op: TxnOp,
) -> Result<TxnOpResponse, RegistryError> {
    let txn = match fence {
        Some(f) => Txn::new()
            .when([Compare::lease(f.key.as_str(), CompareOp::Equal, f.lease)])
            .and_then([op]),
        None => Txn::new().and_then([op]),
    };
    let response = client.txn(txn).await?;
    if !response.succeeded() {
        let key = fence.map(|f| f.key.clone()).unwrap_or_default();
        return Err(RegistryError::Fenced(key));
    }
    response.op_responses().into_iter().next().ok_or_else(|| {
        RegistryError::Etcd(etcd_client::Error::InvalidArgs("empty txn response".into()))
    })
}

/// Attempts at a write whose repetition is harmless, when its outcome is unknown.
const WRITE_ATTEMPTS: u32 = 3;

/// Runs `write` — one whose repetition is harmless (the same value put again) — again when it
/// failed leaving unknown whether etcd applied it: its etcd member froze or died after reading
/// it, or etcd lost its leader meanwhile. (The client's channel already sends a request no
/// member read to another member; a failure that reaches here may have been applied.)
async fn repeat_write<T, F, Fut>(mut write: F) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RegistryError>>,
{
    let mut attempt = 1;
    loop {
        match write().await {
            Err(RegistryError::Etcd(error))
                if attempt < WRITE_ATTEMPTS && outcome_unknown(&error) =>
            {
                debug!(error = %ErrorChain(&error), attempt, "etcd write failed with its outcome unknown; writing it again");
                tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Whether `error` leaves unknown whether etcd applied the request (as opposed to an answer:
/// invalid, refused, too large).
fn outcome_unknown(error: &etcd_client::Error) -> bool {
    use tonic::Code;
    match error {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded | Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Pauses before a broken watch starts over: 500 ms doubling to 10 s, each drawn from the upper
/// half of its ceiling (jitter). So a watch re-reads and resumes within 10 s of etcd's return.
const WATCH_RETRY_INITIAL: Duration = Duration::from_millis(500);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(10);
/// A watch that ran this long since it was last (re)established starts its pauses over.
const WATCH_HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Pauses between attempts to register again after the lease was lost: 500 ms doubling to 5 s
/// (a worker out of the membership gets no new routers' traffic, so it comes back quickly).
const REGISTER_RETRY_MAX: Duration = Duration::from_secs(5);
/// While etcd keeps failing, a failure is logged at WARN again (with the count since the
/// first) at most this often; the others at DEBUG.
const REPEAT_WARN_EVERY: Duration = Duration::from_secs(60);

/// Retries of one etcd loop (a watch, the registration): the pause before each attempt, and
/// logs that say what happens without flooding during an outage — the first failure at WARN,
/// repeats at DEBUG and a WARN at most every [`REPEAT_WARN_EVERY`] counting the failures since
/// the first, and an INFO line when it works again.
#[derive(Debug)]
struct Retry {
    /// What is retried, for the log lines: `membership watch`, `key watch`, `registration`.
    what: &'static str,
    /// What holds meanwhile, for the log lines.
    meanwhile: &'static str,
    /// The etcd key (or prefix) concerned.
    key: String,
    backoff: Backoff,
    /// Failures since it last worked, and when the first of them was.
    failures: u64,
    failing_since: Option<Instant>,
    last_warned: Option<Instant>,
    /// When it last (re)started working.
    working_since: Option<Instant>,
}

impl Retry {
    fn new(
        what: &'static str,
        meanwhile: &'static str,
        key: impl Into<String>,
        max: Duration,
    ) -> Self {
        Self {
            what,
            meanwhile,
            key: key.into(),
            backoff: Backoff::new(WATCH_RETRY_INITIAL, max),
            failures: 0,
            failing_since: None,
            last_warned: None,
            working_since: Some(Instant::now()),
        }
    }

    /// It works (the watch is established, the lease granted): says so if it had been failing.
    fn working(&mut self) {
        let now = Instant::now();
        if let Some(since) = self.failing_since.take() {
            info!(
                what = self.what,
                key = %self.key,
                failures = self.failures,
                failing_for = ?now.duration_since(since),
                "etcd {} working again",
                self.what
            );
        }
        self.failures = 0;
        self.last_warned = None;
        self.working_since = Some(now);
    }

    /// It failed (`error`), or ended without one (etcd cancelled the watch, or closed its
    /// stream): logs, and returns the pause before the next attempt.
    fn failed(&mut self, error: Option<&(dyn std::error::Error + 'static)>) -> Duration {
        let now = Instant::now();
        if let Some(since) = self.working_since.take()
            && now.duration_since(since) >= WATCH_HEALTHY_AFTER
        {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        let Some(error) = error else {
            debug!(what = self.what, key = %self.key, retry_in = ?delay, "etcd {} ended; starting over", self.what);
            return delay;
        };
        self.failures += 1;
        let first = *self.failing_since.get_or_insert(now);
        let error = ErrorChain(error);
        if self.failures == 1 {
            self.last_warned = Some(now);
            warn!(what = self.what, key = %self.key, %error, retry_in = ?delay, "etcd {} failed; {}, retrying", self.what, self.meanwhile);
        } else if self
            .last_warned
            .is_none_or(|at| now.duration_since(at) >= REPEAT_WARN_EVERY)
        {
            self.last_warned = Some(now);
            warn!(
                what = self.what,
                key = %self.key,
                %error,
                failures = self.failures,
                failing_for = ?now.duration_since(first),
                retry_in = ?delay,
                "etcd {} still failing; {}, retrying",
                self.what,
                self.meanwhile
            );
        } else {
            debug!(what = self.what, key = %self.key, %error, failures = self.failures, retry_in = ?delay, "etcd {} failed again", self.what);
        }
        delay
    }
}

/// HTTP/2 keepalive of the etcd connection. etcd (gRPC's enforcement policy) answers a client
/// that pings more often than `--grpc-keepalive-min-time` (default 5 s), or pings while no
/// stream is open, with a strike; three strikes close the connection ("too many pings"), and
/// every watch on it breaks. So: ping at twice the default minimum, and only while streams
/// (watches, lease keepalives) are open — which is when a dead connection matters.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// A ping unanswered this long declares the connection dead (a frozen or partitioned etcd).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Label of [`EtcdRegistry`]'s watch metrics: which watch (`workers`, `policy`, `drain`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabels {
    watch: &'static str,
}

/// How the registry reaches a secured etcd: TLS (the CA that signed etcd's certificate, and a
/// client certificate when etcd runs with `--client-cert-auth`) and etcd's own user/password
/// authentication (`--auth`), independent of each other.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    pub tls: Option<crate::tls::ClientTls>,
    /// etcd user and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(user, _)| user))
            .finish()
    }
}

/// Registry stored in etcd.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    endpoints: Vec<String>,
    /// Watches started over after their stream failed or etcd cancelled them (each restart
    /// re-reads what it watches): in a healthy cluster this stays at 0.
    watch_restarts: Family<WatchLabels, Counter>,
    /// Whether each etcd endpoint is up (1) or suspected or found down (0).
    endpoint_up: Family<EndpointLabels, Gauge>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects to the etcd cluster at `endpoints` (e.g. `http://127.0.0.1:2379`).
    pub async fn connect(endpoints: &[String]) -> Result<Self, RegistryError> {
        Self::connect_with(endpoints, &EtcdSecurity::default()).await
    }

    /// Like [`EtcdRegistry::connect`], over TLS and/or as an etcd user (`https://` endpoints
    /// with TLS).
    pub async fn connect_with(
        endpoints: &[String],
        security: &EtcdSecurity,
    ) -> Result<Self, RegistryError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
            .with_keep_alive_while_idle(false);
        if let Some(tls) = &security.tls {
            if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
                return Err(RegistryError::Config(format!(
                    "etcd endpoint {plain:?}: with etcd TLS options the endpoints must be https:// URLs"
                )));
            }
            options = options.with_tls(
                tls.config()
                    .map_err(|e| RegistryError::Config(e.to_string()))?,
            );
        }
        if let Some((user, password)) = &security.user {
            options = options.with_user(user.clone(), password.clone());
        }
        // One connection per endpoint, failing over between them (etcd_channel.rs): etcd-client's
        // own balancing keeps sending a share of the requests to an endpoint that is down.
        let channel = FailoverChannel::new();
        let endpoint_up = channel.gauges();
        let client =
            Client::connect_with_balanced_channel(endpoints, Some(options), channel).await?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
            watch_restarts: Family::default(),
            endpoint_up,
        })
    }

    /// The underlying client, for components that own other keys of the schema.
    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn register(
        &self,
        record: WorkerRecord,
        ttl: Duration,
    ) -> Result<Registration, RegistryError> {
        // The first lease is granted here so that a worker that cannot register fails to start.
        let commands = publish_leased(self.client.clone(), record, ttl).await?;
        Ok(Registration::new(commands))
    }

    async fn announce_router(
        &self,
        record: RouterRecord,
        ttl: Duration,
    ) -> Result<RouterPresence, RegistryError> {
        check_router_id(&record.id)?;
        let commands = publish_leased(self.client.clone(), record, ttl).await?;
        Ok(RouterPresence::new(commands))
    }

    /// An id no replica can announce (empty, with `/`, too long: e.g. read from a client's
    /// response id) is not running: `None`, without asking etcd.
    async fn find_router(&self, router_id: &str) -> Result<Option<RouterRecord>, RegistryError> {
        if check_router_id(router_id).is_err() {
            return Ok(None);
        }
        let key = router_key(router_id);
        let (value, _) = get_key(&mut self.client.clone(), &key).await?;
        let Some(value) = value else {
            return Ok(None);
        };
        match serde_json::from_slice::<RouterRecord>(&value) {
            Ok(record) if record.id == router_id => Ok(Some(record)),
            Ok(_) => {
                warn!(key, "router record does not match its key; ignored");
                Ok(None)
            }
            Err(error) => {
                warn!(key, %error, "undecodable router record; ignored");
                Ok(None)
            }
        }
    }

    async fn list_routers(&self) -> Result<Vec<RouterRecord>, RegistryError> {
        let response = self
            .client
            .clone()
            .get(ROUTERS_PREFIX, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut records: Vec<RouterRecord> = response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let record = serde_json::from_slice::<RouterRecord>(kv.value()).ok()?;
                (kv.key() == router_key(&record.id).as_bytes()).then_some(record)
            })
            .collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(records)
    }

    async fn list_workers(&self) -> Result<Vec<WorkerRecord>, RegistryError> {
        let (records, _) = list(&mut self.client.clone()).await?;
        Ok(records)
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }

    fn register_metrics(&self, metrics: &Metrics) {
        metrics.register(|r| {
            r.register(
                "switchyard_etcd_watch_restarts",
                "etcd watches started over after their stream broke or etcd cancelled them, by watch",
                self.watch_restarts.clone(),
            );
            r.register(
                "switchyard_etcd_endpoint_up",
                "Whether this process sends requests to an etcd endpoint: 1 while it answers, 0 while it is suspected or found down (its requests go to the other endpoints)",
                self.endpoint_up.clone(),
            )
        });
    }

    async fn watch_workers(&self) -> Result<Membership, RegistryError> {
        let mut client = self.client.clone();
        let (records, revision) = list(&mut client).await?;
        let (tx, rx) = watch::channel(Arc::new(MembershipView::from_records(records)));
        let restarts = self
            .watch_restarts
            .get_or_create(&WatchLabels { watch: "workers" })
            .clone();
        tokio::spawn(watch_loop(client, tx, revision, restarts));
        Ok(Membership::new(rx))
    }

    async fn get_policy(&self) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(get_key(&mut self.client.clone(), POLICY_KEY).await?.0)
    }

    async fn put_policy(
        &self,
        document: Vec<u8>,
        fence: Option<&Fence>,
    ) -> Result<(), RegistryError> {
        // The same document again: harmless.
        let op = TxnOp::put(POLICY_KEY, document, None);
        repeat_write(|| {
            let (mut client, op) = (self.client.clone(), op.clone());
            async move { fenced(&mut client, fence, op).await }
        })
        .await?;
        Ok(())
    }

    async fn watch_policy(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError> {
        let mut client = self.client.clone();
        let (value, revision) = get_key(&mut client, POLICY_KEY).await?;
        let (tx, rx) = watch::channel(value);
        let restarts = self
            .watch_restarts
            .get_or_create(&WatchLabels { watch: "policy" })
            .clone();
        tokio::spawn(watch_key_loop(
            client,
            POLICY_KEY.to_string(),
            tx,
            revision,
            |v| v,
            restarts,
        ));
        Ok(rx)
    }

    async fn set_drain(
        &self,
        worker_id: &str,
        drain: bool,
        fence: Option<&Fence>,
    ) -> Result<bool, RegistryError> {
        let key = drain_key(worker_id);
        // The value is for people reading etcd; the key's presence is the request.
        let value = format!(
            r#"{{"requested_at_unix_ms":{}}}"#,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis()
        );
        let op = if drain {
            TxnOp::put(key, value.as_str(), Some(PutOptions::new().with_prev_key()))
        } else {
            TxnOp::delete(key, Some(DeleteOptions::new()))
        };
        // Storing or deleting the request again is harmless (an undrain repeated after its
        // answer was lost says no request was stored).
        let response = repeat_write(|| {
            let (mut client, op) = (self.client.clone(), op.clone());
            async move { fenced(&mut client, fence, op).await }
        })
        .await?;
        Ok(match response {
            // A request stored before — not this call's own, repeated.
            TxnOpResponse::Put(put) => put
                .prev_key()
                .is_some_and(|kv| kv.value() != value.as_bytes()),
            TxnOpResponse::Delete(delete) => delete.deleted() > 0,
            _ => false,
        })
    }

    async fn list_drains(&self) -> Result<Vec<String>, RegistryError> {
        let response = self
            .client
            .clone()
            .get(
                DRAIN_PREFIX,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let mut ids: Vec<String> = response
            .kvs()
            .iter()
            .filter_map(|kv| std::str::from_utf8(kv.key()).ok())
            .filter_map(parse_drain_key)
            .map(str::to_string)
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn watch_drain(&self, worker_id: &str) -> Result<watch::Receiver<bool>, RegistryError> {
        let mut client = self.client.clone();
        let key = drain_key(worker_id);
        let (value, revision) = get_key(&mut client, &key).await?;
        let (tx, rx) = watch::channel(value.is_some());
        let restarts = self
            .watch_restarts
            .get_or_create(&WatchLabels { watch: "drain" })
            .clone();
        tokio::spawn(watch_key_loop(
            client,
            key,
            tx,
            revision,
            |v| v.is_some(),
            restarts,
        ));
        Ok(rx)
    }

    async fn watch_control_plane(&self) -> Result<watch::Receiver<Option<Vec<u8>>>, RegistryError> {
        let mut client = self.client.clone();
        let (value, revision) = get_key(&mut client, LEADER_KEY).await?;
        let (tx, rx) = watch::channel(value);
        let restarts = self
            .watch_restarts
            .get_or_create(&WatchLabels {
                watch: "control_plane",
            })
            .clone();
        tokio::spawn(watch_key_loop(
            client,
            LEADER_KEY.to_string(),
            tx,
            revision,
            |v| v,
            restarts,
        ));
        Ok(rx)
    }
}

/// The value of one key and the store's revision at the time of reading.
async fn get_key(client: &mut Client, key: &str) -> Result<(Option<Vec<u8>>, i64), RegistryError> {
    let response = client.get(key, None).await?;
    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
    Ok((
        response.kvs().first().map(|kv| kv.value().to_vec()),
        revision,
    ))
}

/// Publishes `value` only when it differs, so readers wake for real changes only.
fn send_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        *current = value;
        changed
    });
}

/// Follows one key, publishing `decode(value)`: watches from the revision after the last one
/// seen, and after a failure or compaction reads the key again (keeping the last value
/// meanwhile) and resumes.
async fn watch_key_loop<T: PartialEq + Send + Sync + 'static>(
    mut client: Client,
    key: String,
    tx: watch::Sender<T>,
    mut revision: i64,
    decode: fn(Option<Vec<u8>>) -> T,
    restarts: Counter,
) {
    let mut retry = Retry::new(
        "key watch",
        "keeping the last value",
        key.clone(),
        WATCH_RETRY_MAX,
    );
    loop {
        let result =
            watch_key_from(&mut client, &key, &tx, &mut revision, decode, &mut retry).await;
        if tx.is_closed() {
            return;
        }
        let mut delay = retry.failed(result.as_ref().err().map(|e| e as _));
        restarts.inc();
        // Read the key again before watching: changes may have been compacted away meanwhile.
        loop {
            tokio::time::sleep(delay).await;
            match get_key(&mut client, &key).await {
                Ok((value, rev)) => {
                    send_changed(&tx, decode(value));
                    revision = rev;
                    break;
                }
                Err(error) => delay = retry.failed(Some(&error)),
            }
            if tx.is_closed() {
                return;
            }
        }
    }
}

async fn watch_key_from<T: PartialEq>(
    client: &mut Client,
    key: &str,
    tx: &watch::Sender<T>,
    revision: &mut i64,
    decode: fn(Option<Vec<u8>>) -> T,
    retry: &mut Retry,
) -> Result<(), RegistryError> {
    let options = WatchOptions::new().with_start_revision(*revision + 1);
    let mut stream = client.watch(key, Some(options)).await?;
    retry.working();
    while let Some(response) = stream.message().await? {
        if response.canceled() || response.compact_revision() > 0 {
            warn!(
                key,
                reason = response.cancel_reason(),
                "key watch cancelled by etcd"
            );
            return Ok(());
        }
        if let Some(header) = response.header() {
            *revision = (*revision).max(header.revision());
        }
        for event in response.events() {
            let value = match event.event_type() {
                EventType::Put => event.kv().map(|kv| kv.value().to_vec()),
                EventType::Delete => None,
            };
            send_changed(tx, decode(value));
        }
        if tx.is_closed() {
            return Ok(());
        }
    }
    Ok(())
}

/// What a record kept on its owner's lease says in its log lines.
struct Texts {
    /// It was put under a new lease.
    published: &'static str,
    /// Its owner withdrew it.
    withdrawn: &'static str,
    /// Its key is held by another lease; waiting for it to expire.
    waiting: &'static str,
    /// Appended to why the lease was lost: what happens next.
    again: &'static str,
    /// [`Retry`]'s `what` and `meanwhile`.
    retry_what: &'static str,
    retry_meanwhile: &'static str,
}

/// How a record's log lines name its id.
#[derive(Clone, Copy)]
enum IdField {
    Worker,
    Router,
}

/// A record its owner keeps in etcd on a lease of its own — a worker's registration, a router
/// replica's presence: what [`establish`], [`claim`] and [`keep_published`] need of it.
trait Leased: serde::Serialize + Clone + Send + Sync + 'static {
    const TEXTS: Texts;
    const ID_FIELD: IdField;
    fn id(&self) -> &str;
    fn key(&self) -> String;
    /// Keys that must be absent for the record's key to be claimed (the same id elsewhere).
    fn rivals(&self) -> Vec<String> {
        Vec::new()
    }
    /// Who holds the record's key or a rival, from the value stored there and its lease.
    fn holder(value: &[u8], lease: i64) -> String;
    /// The error when another live owner keeps the id.
    fn taken(&self, holder: String) -> RegistryError;
    fn value(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("records always serialise")
    }
}

/// Logs at `$level` with `$record`'s id as `worker_id` or `router_id`, then the other fields and
/// the message.
macro_rules! log_leased {
    ($level:ident, $record:expr, $($rest:tt)+) => {{
        let record = $record;
        match leased_id_field(record) {
            IdField::Worker => tracing::$level!(worker_id = %record.id(), $($rest)+),
            IdField::Router => tracing::$level!(router_id = %record.id(), $($rest)+),
        }
    }};
}

fn leased_id_field<R: Leased>(_: &R) -> IdField {
    R::ID_FIELD
}

impl Leased for WorkerRecord {
    const TEXTS: Texts = Texts {
        published: "registered in etcd",
        withdrawn: "deregistered from etcd",
        waiting: "this worker id is registered under another lease; waiting for it to expire (an \
                  earlier run of this worker) — if another worker runs with this id, give each \
                  its own --id",
        again: "registering again",
        retry_what: "registration",
        retry_meanwhile: "routers keep their links to this worker",
    };
    const ID_FIELD: IdField = IdField::Worker;

    fn id(&self) -> &str {
        &self.id
    }

    fn key(&self) -> String {
        WorkerRecord::key(self)
    }

    /// Routers and drains know a worker by its id alone: the id must be free in every pool.
    fn rivals(&self) -> Vec<String> {
        crate::Pool::ALL
            .into_iter()
            .filter(|pool| *pool != self.pool)
            .map(|pool| crate::schema::worker_key(pool, &self.id))
            .collect()
    }

    fn holder(value: &[u8], lease: i64) -> String {
        let (pool, address) = match serde_json::from_slice::<WorkerRecord>(value) {
            Ok(r) => (r.pool.to_string(), r.address),
            Err(_) => ("?".into(), "an undecodable record".into()),
        };
        format!("{pool} pool, address {address}, lease {lease}")
    }

    fn taken(&self, holder: String) -> RegistryError {
        RegistryError::IdTaken {
            id: self.id.clone(),
            holder,
        }
    }
}

impl Leased for RouterRecord {
    const TEXTS: Texts = Texts {
        published: "router announced in etcd",
        withdrawn: "router presence withdrawn from etcd",
        waiting: "this router id is announced under another lease; waiting for it to expire (an \
                  earlier run of this replica) — if another replica runs with this id, give each \
                  its own id",
        again: "announcing the router again",
        retry_what: "router announcement",
        retry_meanwhile: "this replica serves on, but the others cannot find it",
    };
    const ID_FIELD: IdField = IdField::Router;

    fn id(&self) -> &str {
        &self.id
    }

    fn key(&self) -> String {
        RouterRecord::key(self)
    }

    fn holder(value: &[u8], lease: i64) -> String {
        let address = match serde_json::from_slice::<RouterRecord>(value) {
            Ok(r) => r.grpc_address,
            Err(_) => "an undecodable record".into(),
        };
        format!("address {address}, lease {lease}")
    }

    fn taken(&self, holder: String) -> RegistryError {
        RegistryError::RouterIdTaken {
            id: self.id.clone(),
            holder,
        }
    }
}

/// Whole seconds of a lease TTL; under 1 s is refused.
fn lease_ttl_secs(ttl: Duration) -> Result<i64, RegistryError> {
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    if ttl_secs < 1 {
        return Err(RegistryError::InvalidTtl(ttl));
    }
    Ok(ttl_secs)
}

/// Puts `record` under a lease of `ttl`, then keeps it there in the background
/// ([`keep_published`]) until the returned sender says otherwise or is dropped. The first lease
/// is granted here, so that an owner that cannot publish hears so.
async fn publish_leased<R: Leased>(
    mut client: Client,
    record: R,
    ttl: Duration,
) -> Result<mpsc::Sender<Command<R>>, RegistryError> {
    let ttl_secs = lease_ttl_secs(ttl)?;
    let lease = establish(&mut client, &record, ttl_secs, None).await?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(keep_published(client, record, ttl_secs, lease, rx));
    Ok(tx)
}

/// A new lease holding `record`, kept alive from now on; `previous` is this owner's own
/// earlier lease, which may still hold the key (it could not be renewed for a TTL, which does
/// not mean etcd let it expire): the record moves to the new lease, then the old one is revoked.
async fn establish<R: Leased>(
    client: &mut Client,
    record: &R,
    ttl_secs: i64,
    previous: Option<i64>,
) -> Result<KeptLease, RegistryError> {
    let (id, granted_at) = claim(client, record, previous, ttl_secs).await?;
    if let Some(previous) = previous {
        // The key moved to the new lease: ending the old one (if it still lives) takes
        // nothing with it.
        let _ = client.lease_revoke(previous).await;
    }
    log_leased!(info, record, lease = id, ttl_secs, "{}", R::TEXTS.published);
    Ok(KeptLease::new(
        client.clone(),
        id,
        Duration::from_secs(ttl_secs.unsigned_abs()),
        granted_at,
    ))
}

/// Puts `record` under a new lease of `ttl_secs` if no other lease holds its key (`previous`,
/// this task's own earlier lease, may: the record moves over without a gap); returns the
/// lease. A key held by another lease is waited for, up to a lease's TTL: the earlier life of
/// this owner (restarted within its TTL) lets go by then; an owner still holding it is another
/// live one with the same id, which must not be silently displaced — a worker's routers would
/// lose it, a router's response ids would lead to the other replica. Also returns when the
/// lease was asked for (it runs from then at the latest).
async fn claim<R: Leased>(
    client: &mut Client,
    record: &R,
    previous: Option<i64>,
    ttl_secs: i64,
) -> Result<(i64, Instant), RegistryError> {
    let value = record.value();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ttl_secs as u64 + 1);
    let mut warned = false;
    loop {
        // A lease per attempt: one granted before a wait would expire during it.
        let granted_at = Instant::now();
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let claimed = try_claim(client, record, &value, lease, previous).await;
        let holder = match claimed {
            Ok(None) => return Ok((lease, granted_at)),
            Ok(Some(holder)) => holder,
            Err(error) => {
                // etcd may have applied the claim without its answer reaching here (the member
                // that read it froze): then the key is this lease's, to keep.
                match client.get(record.key(), None).await {
                    Ok(read) if read.kvs().first().is_some_and(|kv| kv.lease() == lease) => {
                        return Ok((lease, granted_at));
                    }
                    Ok(_) => {
                        let _ = client.lease_revoke(lease).await;
                    }
                    // Unknown: leave the lease to expire rather than end a claim it may hold.
                    Err(_) => {}
                }
                return Err(error);
            }
        };
        let _ = client.lease_revoke(lease).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(record.taken(holder));
        }
        if !warned {
            log_leased!(warn, record, %holder, ttl_secs, "{}", R::TEXTS.waiting);
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One attempt of [`claim`]: `None` when the key is now `lease`'s, else who holds the id —
/// its key or one of its rivals ([`Leased::rivals`]).
async fn try_claim<R: Leased>(
    client: &mut Client,
    record: &R,
    value: &[u8],
    lease: i64,
    previous: Option<i64>,
) -> Result<Option<String>, RegistryError> {
    let key = record.key();
    let others = record.rivals();
    let absent = |key: &str| Compare::create_revision(key, CompareOp::Equal, 0);
    let put = || {
        TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    // `own` for our key, and the id free in every rival key.
    let held_by = |own: Compare| {
        let mut compares = vec![own];
        compares.extend(others.iter().map(|other| absent(other)));
        compares
    };
    if let Some(previous) = previous {
        let ours = held_by(Compare::lease(key.as_str(), CompareOp::Equal, previous));
        if client
            .txn(Txn::new().when(ours).and_then([put()]))
            .await?
            .succeeded()
        {
            return Ok(None);
        }
    }
    let reads: Vec<TxnOp> = std::iter::once(key.as_str())
        .chain(others.iter().map(String::as_str))
        .map(|key| TxnOp::get(key, None))
        .collect();
    let txn = Txn::new()
        .when(held_by(absent(&key)))
        .and_then([put()])
        .or_else(reads);
    let response = client.txn(txn).await?;
    if response.succeeded() {
        return Ok(None);
    }
    let holder = response
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .map(|kv| R::holder(kv.value(), kv.lease())),
            _ => None,
        })
        // Gone between the compare and the reads (they are one transaction: not expected).
        .unwrap_or_else(|| "a record that just left".into());
    Ok(Some(holder))
}

async fn put_record<R: Leased>(
    client: &mut Client,
    record: &R,
    lease: i64,
) -> Result<(), RegistryError> {
    let value = record.value();
    // The same value under the same lease: writing it twice is harmless.
    repeat_write(|| {
        let mut client = client.clone();
        let (key, value) = (record.key(), value.clone());
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
                .map_err(RegistryError::from)
        }
    })
    .await?;
    Ok(())
}

/// Owns the lease: keeps it alive (through failing keep-alive streams, for as long as its TTL
/// lasts: [`KeptLease`]), publishes the record again under a new lease when it is lost (etcd
/// says it expired or was revoked, or it could not be renewed for a TTL), retrying with backoff
/// while etcd fails, and serves commands.
async fn keep_published<R: Leased>(
    mut client: Client,
    mut record: R,
    ttl_secs: i64,
    first: KeptLease,
    mut commands: mpsc::Receiver<Command<R>>,
) {
    let mut lease = Some(first);
    // This task's last lease, when it could not be renewed for a TTL: it may still hold the key.
    let mut previous = None;
    // The record update being written, with the record and whom to answer.
    let mut update: Option<Update<R>> = None;
    let mut retry = Retry::new(
        R::TEXTS.retry_what,
        R::TEXTS.retry_meanwhile,
        record.key(),
        REGISTER_RETRY_MAX,
    );
    loop {
        let Some(current) = lease.as_mut() else {
            match establish(&mut client, &record, ttl_secs, previous).await {
                Ok(l) => {
                    previous = None;
                    retry.working();
                    lease = Some(l);
                }
                Err(error) => {
                    let delay = retry.failed(Some(&error));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        command = commands.recv() => {
                            if !serve_command_unpublished(command, &mut record) { return; }
                        }
                    }
                }
            }
            continue;
        };
        // A record update is written while the lease is kept alive: a write an etcd member
        // froze under waits for its request timeout (and is written again), longer than the
        // lease would last unrenewed.
        let step = tokio::select! {
            lost = current.until_lost() => Step::Lost(lost),
            result = async {
                match update.as_mut() {
                    Some((write, _, _)) => write.await,
                    None => std::future::pending().await,
                }
            } => Step::Written(result),
            command = commands.recv(), if update.is_none() => Step::Command(command),
        };
        match step {
            Step::Lost(lost) => {
                match lost {
                    LeaseLost::Gone => {
                        log_leased!(
                            warn,
                            &record,
                            lease = current.id(),
                            "lease expired in etcd; {}",
                            R::TEXTS.again
                        );
                        previous = None;
                    }
                    LeaseLost::Lapsed => {
                        log_leased!(
                            warn,
                            &record,
                            lease = current.id(),
                            "lease not renewed within its TTL; {}",
                            R::TEXTS.again
                        );
                        previous = Some(current.id());
                    }
                }
                if let Some((_, new_record, reply)) = update.take() {
                    // Not written under the lost lease: published with the next one.
                    record = new_record;
                    let _ = reply.send(Ok(()));
                }
                lease = None;
            }
            Step::Written(result) => {
                if let Some((_, new_record, reply)) = update.take() {
                    if result.is_ok() {
                        record = new_record;
                    }
                    let _ = reply.send(result);
                }
            }
            Step::Command(Some(Command::Update(new_record, reply))) => {
                let (mut client, written, id) = (client.clone(), new_record.clone(), current.id());
                let write: PendingWrite =
                    Box::pin(async move { put_record(&mut client, &written, id).await });
                update = Some((write, new_record, reply));
            }
            Step::Command(Some(Command::Deregister(reply))) => {
                let result = client
                    .lease_revoke(current.id())
                    .await
                    .map(drop)
                    .map_err(Into::into);
                // A failure is the caller's to report (the lease then expires on its own).
                if result.is_ok() {
                    log_leased!(info, &record, "{}", R::TEXTS.withdrawn);
                }
                let _ = reply.send(result);
                return;
            }
            Step::Command(None) => {
                // Handle dropped: withdraw the record rather than wait for the TTL.
                let _ = client.lease_revoke(current.id()).await;
                return;
            }
        }
    }
}

/// A record update being written.
type PendingWrite =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), RegistryError>> + Send>>;

/// A record update being written, the record and whom to answer.
type Update<R> = (
    PendingWrite,
    R,
    tokio::sync::oneshot::Sender<Result<(), RegistryError>>,
);

/// What woke [`keep_published`] up.
enum Step<R> {
    Lost(LeaseLost),
    Written(Result<(), RegistryError>),
    Command(Option<Command<R>>),
}

/// Serves a command while no lease is held. Returns `false` when the task should end.
fn serve_command_unpublished<R>(command: Option<Command<R>>, record: &mut R) -> bool {
    match command {
        Some(Command::Update(new_record, reply)) => {
            // Takes effect when the lease is re-established.
            *record = new_record;
            let _ = reply.send(Ok(()));
            true
        }
        Some(Command::Deregister(reply)) => {
            let _ = reply.send(Ok(()));
            false
        }
        None => false,
    }
}

async fn list(client: &mut Client) -> Result<(Vec<WorkerRecord>, i64), RegistryError> {
    let response = client
        .get(WORKERS_PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
    let records = response
        .kvs()
        .iter()
        .filter_map(|kv| decode_record(kv.key(), kv.value()))
        .collect();
    Ok((records, revision))
}

fn decode_record(key: &[u8], value: &[u8]) -> Option<WorkerRecord> {
    let key = std::str::from_utf8(key).ok()?;
    let (pool, id) = parse_worker_key(key)?;
    match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(record) if record.id == id && record.pool == pool => Some(record),
        Ok(_) => {
            warn!(key, "worker record does not match its key; ignored");
            None
        }
        Err(error) => {
            warn!(key, %error, "undecodable worker record; ignored");
            None
        }
    }
}

async fn watch_loop(
    mut client: Client,
    tx: watch::Sender<Arc<MembershipView>>,
    mut revision: i64,
    restarts: Counter,
) {
    let mut retry = Retry::new(
        "membership watch",
        "keeping the last view",
        WORKERS_PREFIX,
        WATCH_RETRY_MAX,
    );
    loop {
        let result = watch_from(&mut client, &tx, &mut revision, &mut retry).await;
        if tx.is_closed() {
            return;
        }
        let mut delay = retry.failed(result.as_ref().err().map(|e| e as _));
        restarts.inc();
        // Re-list: events may have been missed or compacted away while disconnected.
        loop {
            tokio::time::sleep(delay).await;
            match list(&mut client).await {
                Ok((records, rev)) => {
                    relisted(&tx, records);
                    revision = rev;
                    break;
                }
                Err(error) => delay = retry.failed(Some(&error)),
            }
            if tx.is_closed() {
                return;
            }
        }
    }
}

async fn watch_from(
    client: &mut Client,
    tx: &watch::Sender<Arc<MembershipView>>,
    revision: &mut i64,
    retry: &mut Retry,
) -> Result<(), RegistryError> {
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    let mut stream = client.watch(WORKERS_PREFIX, Some(options)).await?;
    retry.working();
    while let Some(response) = stream.message().await? {
        if response.canceled() || response.compact_revision() > 0 {
            warn!(
                reason = response.cancel_reason(),
                "membership watch cancelled by etcd"
            );
            return Ok(());
        }
        apply(tx, &response, revision);
        if tx.is_closed() {
            return Ok(());
        }
    }
    Ok(())
}

fn apply(tx: &watch::Sender<Arc<MembershipView>>, response: &WatchResponse, revision: &mut i64) {
    if let Some(header) = response.header() {
        *revision = (*revision).max(header.revision());
    }
    if response.events().is_empty() {
        return;
    }
    let mut view = MembershipView::clone(&tx.borrow());
    for event in response.events() {
        let Some(kv) = event.kv() else { continue };
        let Some((_, id)) = std::str::from_utf8(kv.key())
            .ok()
            .and_then(parse_worker_key)
        else {
            continue;
        };
        match event.event_type() {
            EventType::Put => {
                if let Some(record) = decode_record(kv.key(), kv.value()) {
                    if view.get(&record.id).is_none() {
                        log_joined(&record);
                    }
                    view.upsert(record);
                }
            }
            EventType::Delete => {
                if let Some(record) = view.remove(id) {
                    log_left(&record);
                }
            }
        }
    }
    publish(tx, view);
}

fn log_joined(record: &WorkerRecord) {
    info!(
        worker_id = %record.id,
        pool = %record.pool,
        address = %record.address,
        state = record.state.as_str(),
        "worker joined the membership"
    );
}

fn log_left(record: &WorkerRecord) {
    info!(
        worker_id = %record.id,
        pool = %record.pool,
        address = %record.address,
        "worker left the membership"
    );
}

/// Publishes a fresh listing, logging the workers that joined or left while the watch was down.
fn relisted(tx: &watch::Sender<Arc<MembershipView>>, records: Vec<WorkerRecord>) {
    let view = MembershipView::from_records(records);
    {
        let old = tx.borrow();
        for record in view.iter().filter(|r| old.get(&r.id).is_none()) {
            log_joined(record);
        }
        for record in old.iter().filter(|r| view.get(&r.id).is_none()) {
            log_left(record);
        }
    }
    publish(tx, view);
}
