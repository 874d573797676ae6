//! Leader election among control-plane replicas on the etcd key `leader/control-plane`.
//!
//! A replica wins by creating the key (transaction: create revision = 0) bound to its own lease,
//! then keeps the lease alive at TTL/3. The others watch the key and try again when it is
//! deleted — the leader resigned (lease revoked on shutdown) or died (lease expired after the
//! TTL). A leader steps down when etcd says its lease is gone, when it could not renew the
//! lease for a whole TTL, or when it sees its key deleted. A failing keep-alive stream or key
//! watch (an etcd member died or froze) is reopened over another member meanwhile: one etcd
//! member down is no reason to give the lead up. A replica that stepped down because it could
//! not renew, and finds the key still held by that same lease (etcd kept it), leads on with it.
//! Only the leader writes (drains, policy); followers serve reads and name the leader.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use switchyard_cluster::Fence;
use switchyard_cluster::backoff::Backoff;
use switchyard_cluster::lease::{KeptLease, LeaseLost};
use switchyard_cluster::schema::LEADER_KEY;
use switchyard_cluster::telemetry::ErrorChain;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Pauses before campaigning again while etcd fails: 500 ms doubling to 5 s (with jitter), so
/// writes work again within seconds of etcd coming back.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Pauses before a leader watches its key again after the watch failed: 100 ms doubling to 2 s.
const REWATCH_FIRST: Duration = Duration::from_millis(100);
const REWATCH_MAX: Duration = Duration::from_secs(2);

/// Who a replica is, as stored in the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    /// Admin gRPC address.
    pub grpc: String,
    /// Dashboard address, when served.
    pub http: Option<String>,
}

impl ReplicaInfo {
    /// This replica's dashboard address as another host dials it (a follower forwarding to the
    /// leader, an operator told where the leader is): its `http` address, with the host of its
    /// advertised gRPC address in place of an unspecified or loopback one (`0.0.0.0:8090` is
    /// "every interface" on the leader, `127.0.0.1:8090` its own loopback: dialled from another
    /// host or pod, either would reach the follower itself). A loopback `http` address stays when
    /// the gRPC address is loopback too (every replica on one host); `None` when there is no
    /// address to dial.
    pub fn dashboard_address(&self) -> Option<String> {
        let http: std::net::SocketAddr = self.http.as_deref()?.parse().ok()?;
        if !http.ip().is_unspecified() && !http.ip().is_loopback() {
            return Some(http.to_string());
        }
        let (host, _) = self.grpc.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let grpc_ip = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => ip,
            Err(_) if host == "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
            Err(_) if host.is_empty() => return None,
            // A host name (one routers resolve): dial it on the dashboard's port.
            Err(_) => return Some(format!("{host}:{}", http.port())),
        };
        if grpc_ip.is_unspecified() {
            return None;
        }
        if grpc_ip.is_loopback() && http.ip().is_loopback() {
            // Single host: the leader's loopback is this replica's too.
            return Some(http.to_string());
        }
        Some(std::net::SocketAddr::new(grpc_ip, http.port()).to_string())
    }
}

/// This replica's part in the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Leader,
    /// `leader` is the current holder when known.
    Follower {
        leader: Option<ReplicaInfo>,
    },
}

/// How replicas elect their leader.
#[derive(Clone)]
pub enum ElectionConfig {
    /// A single replica (in-memory registry): always the leader.
    Standalone,
    /// Election on etcd with a lease of `ttl`: leadership moves at most `ttl` after the leader dies.
    Etcd { client: Box<Client>, ttl: Duration },
}

impl std::fmt::Debug for ElectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Standalone => f.write_str("Standalone"),
            Self::Etcd { ttl, .. } => f.debug_struct("Etcd").field("ttl", ttl).finish(),
        }
    }
}

/// The live role of this replica.
#[derive(Debug, Clone)]
pub struct Leadership {
    me: ReplicaInfo,
    role: watch::Receiver<Role>,
    /// The leader key's lease while this replica leads an etcd election; `None` otherwise.
    /// Set before the role turns to leader and cleared before it turns back.
    lease: Arc<Mutex<Option<i64>>>,
    elected: bool,
    /// The current (or last) leadership term of this replica: the unix millisecond it began,
    /// set before the role turns to leader; 0 before it ever led. Routers report only to the
    /// leader, so its history holds router data from then on, and its decision feed starts
    /// with the term.
    term: Arc<AtomicI64>,
    /// While this replica leads an etcd election: when its lease runs out unless renewed, as
    /// this process's monotonic clock sees it (the last keep-alive answer plus its TTL).
    /// Past it, the replica has lost the lead even if it has not heard so yet: it was frozen
    /// (SIGSTOP, a stalled VM) beyond its lease and another replica may lead.
    lease_deadline: Arc<Mutex<Option<Instant>>>,
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Starts a new term: a unix millisecond after every earlier term's (terms tell feeds apart).
fn begin_term(term: &AtomicI64) {
    let now = unix_now_ms();
    let _ = term.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        Some(now.max(last + 1))
    });
}

impl Leadership {
    /// Starts campaigning (etcd) until `shutdown`; a leader resigns on shutdown.
    pub fn start(config: ElectionConfig, me: ReplicaInfo, shutdown: CancellationToken) -> Self {
        match config {
            ElectionConfig::Standalone => {
                let (tx, role) = watch::channel(Role::Leader);
                // The role never changes: keep the sender so readers never see a closed channel.
                std::mem::forget(tx);
                let term = Arc::new(AtomicI64::new(0));
                begin_term(&term);
                Self {
                    me,
                    role,
                    lease: Arc::default(),
                    elected: false,
                    term,
                    lease_deadline: Arc::default(),
                }
            }
            ElectionConfig::Etcd { client, ttl } => {
                let (tx, role) = watch::channel(Role::Follower { leader: None });
                let lease = Arc::new(Mutex::new(None));
                let term = Arc::new(AtomicI64::new(0));
                let lease_deadline = Arc::new(Mutex::new(None));
                tokio::spawn(campaign(
                    *client,
                    me.clone(),
                    ttl,
                    tx,
                    Held {
                        lease: lease.clone(),
                        term: term.clone(),
                        deadline: lease_deadline.clone(),
                    },
                    shutdown,
                ));
                Self {
                    me,
                    role,
                    lease,
                    elected: true,
                    term,
                    lease_deadline,
                }
            }
        }
    }

    pub fn me(&self) -> &ReplicaInfo {
        &self.me
    }

    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Unix second this replica became leader; `None` while it follows.
    pub fn leading_since(&self) -> Option<i64> {
        let term = self.term.load(Ordering::Relaxed);
        (self.is_leader() && term > 0).then_some(term.div_euclid(1000))
    }

    /// The leadership term this replica holds now — the unix millisecond it began — or `None`
    /// when it does not lead, or its lease is past its deadline by this process's own clock
    /// (it was frozen past its lease and has not heard yet that it lost the lead). What only
    /// the leader may keep (routers' reports) is kept under a term.
    pub fn term(&self) -> Option<i64> {
        if !self.is_leader() {
            return None;
        }
        if self.elected {
            let deadline = *self.lease_deadline.lock().expect("lease deadline lock");
            if deadline.is_none_or(|deadline| Instant::now() >= deadline) {
                return None;
            }
        }
        Some(self.term.load(Ordering::Relaxed))
    }

    pub fn is_leader(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader)
    }

    /// When this replica leads: the fence its writes must carry (`None` standalone, where
    /// there is no election). `None` (outer) when it does not lead.
    pub fn write_fence(&self) -> Option<Option<Fence>> {
        if !self.is_leader() {
            return None;
        }
        if !self.elected {
            return Some(None);
        }
        let lease = (*self.lease.lock().expect("lease lock"))?;
        Some(Some(Fence {
            key: LEADER_KEY.to_string(),
            lease,
        }))
    }

    /// The current leader as far as this replica knows.
    pub fn leader(&self) -> Option<ReplicaInfo> {
        match self.role() {
            Role::Leader => Some(self.me.clone()),
            Role::Follower { leader } => leader,
        }
    }

    /// Waits for the next role change.
    pub async fn changed(&mut self) -> bool {
        self.role.changed().await.is_ok()
    }

    /// After shutdown: waits (at most `timeout`) until a leader has resigned, so the process
    /// does not exit before its lease is revoked and the next replica must wait out the TTL.
    pub async fn wait_resigned(&self, timeout: Duration) {
        let mut this = self.clone();
        let _ = tokio::time::timeout(timeout, async move {
            while this.is_leader() {
                if !this.changed().await {
                    return;
                }
            }
        })
        .await;
    }
}

fn seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX).max(1)
}

/// The lease etcd grants for `ttl` (whole seconds, at least one).
fn lease_ttl(ttl: Duration) -> Duration {
    Duration::from_secs(seconds(ttl).unsigned_abs())
}

/// What a leading replica holds, shared with its [`Leadership`].
struct Held {
    /// The leader key's lease.
    lease: Arc<Mutex<Option<i64>>>,
    /// The term's start (unix ms).
    term: Arc<AtomicI64>,
    /// When the lease runs out unless renewed.
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Held {
    #[cfg(test)]
    fn renewed(&self, ttl: Duration, at: Instant) {
        *self.deadline.lock().expect("lease deadline lock") = Some(at + ttl);
    }
}

async fn campaign(
    mut client: Client,
    me: ReplicaInfo,
    ttl: Duration,
    tx: watch::Sender<Role>,
    held: Held,
    shutdown: CancellationToken,
) {
    let value = serde_json::to_vec(&me).expect("replica info serialises");
    let mut backoff = Backoff::new(RETRY_FIRST, RETRY_MAX);
    // Failures in a row: the first is a warning, the rest (an outage) are not news.
    let mut failures = 0u32;
    // A lease this process granted that may still hold the leader key: from a leadership it
    // could not renew for a TTL, or a round that failed after asking for the key.
    let mut mine = None;
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        let round = campaign_once(
            &mut client,
            &me,
            &value,
            ttl,
            &tx,
            &held,
            &shutdown,
            &mut mine,
        )
        .await;
        // A round that ended well, or lasted (it led or followed for a while), ends an outage.
        if (round.is_ok() || started.elapsed() >= RETRY_MAX) && failures > 0 {
            info!(failures, "leader election: etcd answers again");
            failures = 0;
            backoff.reset();
        }
        if let Err(error) = round {
            failures += 1;
            if failures == 1 {
                warn!(error = %ErrorChain(&error), "leader election: etcd failed; campaigning again with backoff");
            } else {
                debug!(failures, error = %ErrorChain(&error), "leader election: etcd still failing");
            }
            tx.send_if_modified(|role| {
                let was_leader = *role == Role::Leader;
                if was_leader {
                    *role = Role::Follower { leader: None };
                }
                was_leader
            });
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

/// One round: try to take the key; lead while the lease lives, or follow until the key is
/// deleted. Returns `Ok` to campaign again at once.
#[allow(clippy::too_many_arguments)]
async fn campaign_once(
    client: &mut Client,
    me: &ReplicaInfo,
    value: &[u8],
    ttl: Duration,
    tx: &watch::Sender<Role>,
    held: &Held,
    shutdown: &CancellationToken,
    mine: &mut Option<i64>,
) -> Result<(), etcd_client::Error> {
    // The lease runs from (at the latest) its grant's answer.
    let granted_at = tokio::time::Instant::now();
    let lease = client.lease_grant(seconds(ttl), None).await?.id();
    let txn = Txn::new()
        .when([Compare::create_revision(LEADER_KEY, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            LEADER_KEY,
            value,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(LEADER_KEY, None)]);
    let response = match client.txn(txn).await {
        Ok(response) => response,
        Err(error) => {
            // etcd may have applied it: the key may be this lease's.
            *mine = Some(lease);
            return Err(error);
        }
    };
    let revision = response.header().map(|h| h.revision()).unwrap_or_default();
    if response.succeeded() {
        info!(replica = %me.id, lease, "became the control-plane leader");
        let kept = KeptLease::new(client.clone(), lease, lease_ttl(ttl), granted_at);
        return lead_with(client, me, kept, revision, tx, held, shutdown, mine).await;
    }
    // Not ours: the lease is not needed while following.
    let _ = client.lease_revoke(lease).await;
    let (leader, leader_lease) = response
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                let leader = serde_json::from_slice::<ReplicaInfo>(kv.value()).ok();
                (leader, kv.lease())
            }),
            _ => None,
        })
        .unwrap_or_default();
    if leader.as_ref() == Some(me) && leader_lease != 0 {
        if *mine == Some(leader_lease) {
            // This process's own lease, which it could not renew for a while (an etcd member
            // failed under it) or whose grant of the key it did not hear of: while etcd still
            // has it, the lead is still ours — take it up again rather than hand it over.
            let asked = tokio::time::Instant::now();
            let left = client.lease_time_to_live(leader_lease, None).await?.ttl();
            if left > 0 {
                info!(replica = %me.id, lease = leader_lease, "the leader key is still this replica's, under its own live lease; leading on");
                let kept = KeptLease::resume(
                    client.clone(),
                    leader_lease,
                    lease_ttl(ttl),
                    asked + Duration::from_secs(left.unsigned_abs()),
                );
                return lead_with(client, me, kept, revision, tx, held, shutdown, mine).await;
            }
            // It expired meanwhile, taking the key with it: campaign again.
            *mine = None;
            return Ok(());
        }
        // Our own key from a lease this process no longer keeps alive (etcd came back after
        // an outage longer than the TTL, or an earlier run of this replica): following it would
        // refuse every write until it expired. It is ours to end; then campaign again.
        info!(replica = %me.id, lease = leader_lease, "the leader key is this replica's from a lapsed lease; revoking it to campaign again");
        client.lease_revoke(leader_lease).await?;
        return Ok(());
    }
    if let Some(leader) = &leader {
        info!(replica = %me.id, leader = %leader.id, leader_grpc = %leader.grpc, "following the control-plane leader");
    }
    tx.send_replace(Role::Follower { leader });
    follow(client, revision, tx, shutdown).await
}

/// Leads with `lease` (which holds the leader key, read at `revision`) until it steps down;
/// `mine` is left holding the lease when it may still hold the key.
#[allow(clippy::too_many_arguments)]
async fn lead_with(
    client: &mut Client,
    me: &ReplicaInfo,
    lease: KeptLease,
    revision: i64,
    tx: &watch::Sender<Role>,
    held: &Held,
    shutdown: &CancellationToken,
    mine: &mut Option<i64>,
) -> Result<(), etcd_client::Error> {
    let id = lease.id();
    *mine = None;
    *held.lease.lock().expect("lease lock") = Some(id);
    let deadline = held.deadline.clone();
    let mut lease = lease.on_renewed(move |expires| {
        *deadline.lock().expect("lease deadline lock") = Some(expires.into_std());
    });
    begin_term(&held.term);
    tx.send_replace(Role::Leader);
    let ended = lead(client, me, &mut lease, revision, shutdown).await;
    drop(lease);
    if ended == Ended::Lapsed {
        *mine = Some(id);
    }
    if shutdown.is_cancelled() {
        // Resign: followers take over now instead of after the TTL.
        let _ = client.lease_revoke(id).await;
        info!(replica = %me.id, "resigned leadership");
    }
    // Announced after resigning, so a caller waiting for the step-down knows it is done.
    *held.lease.lock().expect("lease lock") = None;
    *held.deadline.lock().expect("lease deadline lock") = None;
    tx.send_replace(Role::Follower { leader: None });
    Ok(())
}

/// Why a leader stepped down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Shutdown,
    /// etcd says the lease is gone, or the key was deleted.
    Lost,
    /// The lease could not be renewed for its TTL: etcd may still have it.
    Lapsed,
}

/// The leader's watch of its key.
enum KeyWatch {
    Watching(Box<etcd_client::WatchStream>),
    /// Opening the watch, or reading the key after a compaction.
    Pending(std::pin::Pin<Box<dyn std::future::Future<Output = Reopened> + Send>>),
    /// Failed: opened again at this instant.
    Idle(tokio::time::Instant),
}

/// What a pending [`KeyWatch`] came to.
enum Reopened {
    Watching(Box<etcd_client::WatchStream>),
    /// The key's lease now (`None`: no key) and the revision read at.
    Read(Option<i64>, i64),
    Failed(etcd_client::Error),
}

impl KeyWatch {
    /// Watches the key from the revision after `revision`.
    fn open(client: &Client, revision: i64) -> Self {
        let mut client = client.clone();
        Self::Pending(Box::pin(async move {
            let options = WatchOptions::new().with_start_revision(revision + 1);
            match client.watch(LEADER_KEY, Some(options)).await {
                Ok(stream) => Reopened::Watching(Box::new(stream)),
                Err(error) => Reopened::Failed(error),
            }
        }))
    }

    /// Reads the key (the events since the last revision seen were compacted away).
    fn read(client: &Client) -> Self {
        let mut client = client.clone();
        Self::Pending(Box::pin(async move {
            match client.get(LEADER_KEY, None).await {
                Ok(read) => Reopened::Read(
                    read.kvs().first().map(|kv| kv.lease()),
                    read.header().map_or(0, |h| h.revision()),
                ),
                Err(error) => Reopened::Failed(error),
            }
        }))
    }
}

/// Keeps the lease alive and watches the key until the lease is lost, the key is deleted, or
/// shutdown. A failing key watch is opened again from the last revision seen, so a key deleted
/// meanwhile is still seen (compacted away, the key is read instead); the lease is kept alive
/// all the while.
async fn lead(
    client: &mut Client,
    me: &ReplicaInfo,
    lease: &mut KeptLease,
    mut revision: i64,
    shutdown: &CancellationToken,
) -> Ended {
    let mut rewatch = Backoff::new(REWATCH_FIRST, REWATCH_MAX);
    let mut watch = KeyWatch::open(client, revision);
    loop {
        if let KeyWatch::Idle(at) = watch
            && tokio::time::Instant::now() >= at
        {
            watch = KeyWatch::open(client, revision);
        }
        enum Woke {
            Message(Result<Option<etcd_client::WatchResponse>, etcd_client::Error>),
            Reopened(Reopened),
            Retry,
        }
        let woke = tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            lost = lease.until_lost() => {
                return match lost {
                    LeaseLost::Gone => {
                        warn!(replica = %me.id, "leader lease lost; stepping down");
                        Ended::Lost
                    }
                    LeaseLost::Lapsed => {
                        warn!(replica = %me.id, "leader lease not renewed within its TTL; stepping down");
                        Ended::Lapsed
                    }
                };
            }
            woke = async {
                match &mut watch {
                    KeyWatch::Watching(stream) => Woke::Message(stream.message().await),
                    KeyWatch::Pending(pending) => Woke::Reopened(pending.await),
                    KeyWatch::Idle(at) => {
                        tokio::time::sleep_until(*at).await;
                        Woke::Retry
                    }
                }
            } => woke,
        };
        match woke {
            Woke::Retry => {}
            Woke::Reopened(Reopened::Watching(stream)) => watch = KeyWatch::Watching(stream),
            Woke::Reopened(Reopened::Read(holder, read_at)) => {
                if holder != Some(lease.id()) {
                    warn!(replica = %me.id, "leader key no longer held by this replica's lease; stepping down");
                    return Ended::Lost;
                }
                revision = revision.max(read_at);
                watch = KeyWatch::open(client, revision);
            }
            Woke::Reopened(Reopened::Failed(error)) | Woke::Message(Err(error)) => {
                debug!(error = %ErrorChain(&error), "leader key watch failed; watching it again");
                watch = KeyWatch::Idle(tokio::time::Instant::now() + rewatch.next_delay());
            }
            Woke::Message(Ok(None)) => {
                watch = KeyWatch::Idle(tokio::time::Instant::now() + rewatch.next_delay());
            }
            Woke::Message(Ok(Some(response))) => {
                rewatch.reset();
                if response.canceled() || response.compact_revision() > 0 {
                    watch = KeyWatch::read(client);
                    continue;
                }
                if let Some(header) = response.header() {
                    revision = revision.max(header.revision());
                }
                if response
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    warn!(replica = %me.id, "leader key deleted; stepping down");
                    return Ended::Lost;
                }
            }
        }
    }
}

/// Watches the key until it is deleted (then the caller campaigns), tracking leader changes.
async fn follow(
    client: &mut Client,
    revision: i64,
    tx: &watch::Sender<Role>,
    shutdown: &CancellationToken,
) -> Result<(), etcd_client::Error> {
    let mut stream = client
        .watch(
            LEADER_KEY,
            Some(WatchOptions::new().with_start_revision(revision + 1)),
        )
        .await?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            message = stream.message() => message?,
        };
        let Some(response) = message else {
            return Ok(());
        };
        if response.canceled() {
            return Ok(());
        }
        for event in response.events() {
            match event.event_type() {
                EventType::Delete => {
                    info!("control-plane leader key deleted; campaigning");
                    return Ok(());
                }
                EventType::Put => {
                    let leader = event
                        .kv()
                        .and_then(|kv| serde_json::from_slice::<ReplicaInfo>(kv.value()).ok());
                    tx.send_replace(Role::Follower { leader });
                }
            }
        }
    }
}

/// A replica whose election a test scripts.
#[cfg(test)]
pub(crate) struct Script {
    tx: watch::Sender<Role>,
    held: Held,
}

#[cfg(test)]
impl Script {
    /// A replica that follows until the script says otherwise.
    pub(crate) fn start(me: ReplicaInfo) -> (Leadership, Script) {
        let (tx, role) = watch::channel(Role::Follower { leader: None });
        let held = Held {
            lease: Arc::default(),
            term: Arc::new(AtomicI64::new(0)),
            deadline: Arc::default(),
        };
        let leadership = Leadership {
            me,
            role,
            lease: held.lease.clone(),
            elected: true,
            term: held.term.clone(),
            lease_deadline: held.deadline.clone(),
        };
        (leadership, Script { tx, held })
    }

    /// Wins the election (a new term) with a lease of `lease`.
    pub(crate) fn lead(&self, lease: Duration) {
        self.held.renewed(lease, Instant::now());
        begin_term(&self.held.term);
        self.tx.send_replace(Role::Leader);
    }

    /// The lease runs out without the replica hearing of it (it was frozen).
    pub(crate) fn stall(&self) {
        self.held.renewed(Duration::ZERO, Instant::now());
    }

    /// Steps down.
    pub(crate) fn follow(&self) {
        *self.held.deadline.lock().expect("lease deadline lock") = None;
        self.tx.send_replace(Role::Follower { leader: None });
    }
}
