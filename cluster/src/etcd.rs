//! etcd-backed registry. Worker records live under a lease kept alive at TTL/3; the membership
//! watch lists the prefix, then watches from the next revision, and starts over (keeping its
//! last view) whenever etcd fails or compacts past it.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions, WatchResponse,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;

use crate::membership::{Membership, MembershipView, publish};
use crate::registry::{Command, Fence, Registration, Registry, RegistryError};
use crate::schema::{
    DRAIN_PREFIX, LEADER_KEY, POLICY_KEY, WORKERS_PREFIX, WorkerRecord, drain_key, parse_drain_key,
    parse_worker_key,
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
        let client = Client::connect(endpoints, Some(options)).await?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
            watch_restarts: Family::default(),
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
        let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        if ttl_secs < 1 {
            return Err(RegistryError::InvalidTtl(ttl));
        }
        let mut client = self.client.clone();
        // The first lease is granted here so that a worker that cannot register fails to start.
        let lease = Lease::establish(&mut client, &record, ttl_secs, None).await?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(keep_registered(client, record, ttl_secs, lease, rx));
        Ok(Registration::new(tx))
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
        fenced(
            &mut self.client.clone(),
            fence,
            TxnOp::put(POLICY_KEY, document, None),
        )
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
        let op = if drain {
            // The value is for people reading etcd; the key's presence is the request.
            let value = format!(
                r#"{{"requested_at_unix_ms":{}}}"#,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis()
            );
            TxnOp::put(key, value, Some(PutOptions::new().with_prev_key()))
        } else {
            TxnOp::delete(key, Some(DeleteOptions::new()))
        };
        Ok(match fenced(&mut self.client.clone(), fence, op).await? {
            TxnOpResponse::Put(put) => put.prev_key().is_some(),
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

struct Lease {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    responses: etcd_client::LeaseKeepAliveStream,
}

impl Lease {
    /// A new lease holding `record`; `previous` is this worker's own earlier lease, which may
    /// still hold the key (its keepalive failed, not necessarily the lease): the record moves
    /// to the new lease, then the old one is revoked.
    async fn establish(
        client: &mut Client,
        record: &WorkerRecord,
        ttl_secs: i64,
        previous: Option<i64>,
    ) -> Result<Self, RegistryError> {
        let id = claim(client, record, previous, ttl_secs).await?;
        if let Some(previous) = previous {
            // The key moved to the new lease: ending the old one (if it still lives) takes
            // nothing with it.
            let _ = client.lease_revoke(previous).await;
        }
        let (keeper, responses) = client.lease_keep_alive(id).await?;
        info!(worker_id = %record.id, lease = id, ttl_secs, "registered in etcd");
        Ok(Self {
            id,
            keeper,
            responses,
        })
    }
}

/// Puts `record` under a new lease of `ttl_secs` if no other lease holds its key (`previous`,
/// this task's own earlier lease, may: the record moves over without a gap); returns the
/// lease. A key held by another lease is waited for, up to a lease's TTL: the earlier life of
/// this worker (restarted within its TTL) lets go by then; a worker still holding it is another
/// live worker with the same id, which must not be silently displaced — its routers would lose
/// it.
async fn claim(
    client: &mut Client,
    record: &WorkerRecord,
    previous: Option<i64>,
    ttl_secs: i64,
) -> Result<i64, RegistryError> {
    let value = serde_json::to_vec(record).expect("worker records always serialise");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ttl_secs as u64 + 1);
    let mut warned = false;
    loop {
        // A lease per attempt: one granted before a wait would expire during it.
        let lease = client.lease_grant(ttl_secs, None).await?.id();
        let claimed = try_claim(client, record, &value, lease, previous).await;
        let holder = match claimed {
            Ok(None) => return Ok(lease),
            Ok(Some(holder)) => holder,
            Err(error) => {
                let _ = client.lease_revoke(lease).await;
                return Err(error);
            }
        };
        let _ = client.lease_revoke(lease).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(RegistryError::IdTaken {
                id: record.id.clone(),
                holder,
            });
        }
        if !warned {
            warn!(worker_id = %record.id, %holder, ttl_secs, "this worker id is registered under another lease; waiting for it to expire (an earlier run of this worker) — if another worker runs with this id, give each its own --id");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One attempt of [`claim`]: `None` when the key is now `lease`'s, else who holds the id —
/// in either pool: routers and drains know a worker by its id alone.
async fn try_claim(
    client: &mut Client,
    record: &WorkerRecord,
    value: &[u8],
    lease: i64,
    previous: Option<i64>,
) -> Result<Option<String>, RegistryError> {
    let key = record.key();
    let others: Vec<String> = crate::Pool::ALL
        .into_iter()
        .filter(|pool| *pool != record.pool)
        .map(|pool| crate::schema::worker_key(pool, &record.id))
        .collect();
    let absent = |key: &str| Compare::create_revision(key, CompareOp::Equal, 0);
    let put = || {
        TxnOp::put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
    };
    // `own` for our key, and the id free in every other pool.
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
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                let (pool, address) = match serde_json::from_slice::<WorkerRecord>(kv.value()) {
                    Ok(r) => (r.pool.to_string(), r.address),
                    Err(_) => ("?".into(), "an undecodable record".into()),
                };
                format!("{pool} pool, address {address}, lease {}", kv.lease())
            }),
            _ => None,
        })
        // Gone between the compare and the reads (they are one transaction: not expected).
        .unwrap_or_else(|| "a record that just left".into());
    Ok(Some(holder))
}

async fn put_record(
    client: &mut Client,
    record: &WorkerRecord,
    lease: i64,
) -> Result<(), RegistryError> {
    let value = serde_json::to_vec(record).expect("worker records always serialise");
    client
        .put(
            record.key(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
    Ok(())
}

/// Owns the lease: keeps it alive, re-establishes it after etcd trouble (a lease that expired
/// while etcd was unreachable is granted anew and the record re-put), and serves commands.
async fn keep_registered(
    mut client: Client,
    mut record: WorkerRecord,
    ttl_secs: i64,
    first: Lease,
    mut commands: mpsc::Receiver<Command>,
) {
    let period = Duration::from_millis((ttl_secs as u64 * 1000 / 3).max(100));
    let mut lease = Some(first);
    // The last lease this task held, until a new one replaces it.
    let mut previous = None;
    let mut retry = Retry::new(
        "registration",
        "routers keep their links to this worker",
        record.key(),
        REGISTER_RETRY_MAX,
    );
    loop {
        let Some(current) = lease.as_mut() else {
            match Lease::establish(&mut client, &record, ttl_secs, previous).await {
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
                            if !serve_command_unregistered(command, &mut record) { return; }
                        }
                    }
                }
            }
            continue;
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {
                if let Err(error) = current.keeper.keep_alive().await {
                    warn!(worker_id = %record.id, error = %ErrorChain(&error), "lease keepalive failed; registering again");
                    previous = Some(current.id);
                    lease = None;
                }
            }
            response = current.responses.message() => match response {
                Ok(Some(r)) if r.ttl() > 0 => debug!(lease = r.id(), ttl = r.ttl(), "lease renewed"),
                Ok(_) => {
                    warn!(worker_id = %record.id, "lease expired; registering again");
                    lease = None;
                }
                Err(error) => {
                    warn!(worker_id = %record.id, error = %ErrorChain(&error), "lease keepalive stream failed; registering again");
                    previous = Some(current.id);
                    lease = None;
                }
            },
            command = commands.recv() => match command {
                Some(Command::Update(new_record, reply)) => {
                    let result = put_record(&mut client, &new_record, current.id).await;
                    if result.is_ok() {
                        record = new_record;
                    }
                    let _ = reply.send(result);
                }
                Some(Command::Deregister(reply)) => {
                    let result = client.lease_revoke(current.id).await.map(drop).map_err(Into::into);
                    info!(worker_id = %record.id, "deregistered from etcd");
                    let _ = reply.send(result);
                    return;
                }
                None => {
                    // Registration handle dropped: withdraw the record rather than wait for the TTL.
                    let _ = client.lease_revoke(current.id).await;
                    return;
                }
            },
        }
    }
}

/// Serves a command while no lease is held. Returns `false` when the task should end.
fn serve_command_unregistered(command: Option<Command>, record: &mut WorkerRecord) -> bool {
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
