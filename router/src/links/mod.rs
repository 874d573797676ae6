//! Persistent links to workers: one multiplexed `Worker.Serve` stream per worker, opened when
//! the worker appears in the membership view. Frames coming back are demultiplexed by request
//! id to each request's dispatcher; `Load` frames update the worker's load as seen by the
//! placement policy; `KvEvents` frames update the prefix index (what each worker's KV cache
//! holds), which a stream's end clears for that worker until its next stream's snapshot.
//!
//! Each link is an actor: one task owns the stream and everything that lives and dies with it
//! (the requests waiting for frames, the starts no load report has counted yet, the stream's
//! id). Dispatchers talk to it over a bounded command channel, and the frames for the worker go
//! on a bounded channel that is tonic's request stream itself. What placement needs to know
//! (connected, the last load report, the starts in transit, the slots held) is kept in a
//! state cell, read without waiting for the task. A stream that fails is dialled again after
//! an exponential backoff with full jitter, so routers do not all knock at a restarted worker
//! at once. The handle is [`link`], the actor [`task`], the state placement reads [`state`];
//! this module keeps the set of links in step with the membership view.
//!
//! Membership is statically stable: the link, not etcd, says whether a worker is healthy. A
//! worker whose record leaves the view (its lease lapsed while etcd was frozen or partitioned,
//! or it deregistered) keeps its link — and its in-flight streams and its place in routing — as
//! long as the stream stays up; it leaves the router's view when that stream fails. A worker
//! whose record is gone and whose link is already down is dropped at once.

mod link;
mod state;
mod task;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use switchyard_cluster::credential::ClusterToken;
use switchyard_cluster::tls::ClientTls;
use switchyard_cluster::{Membership, MembershipView, WorkerRecord};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::changes::ChangeFeed;
use crate::config::HostedWorker;
use crate::metrics::WorkerLabels;
use crate::policy::{ClusterView, WorkerState};
use crate::prefix_index::{PrefixHit, PrefixIndex, PrefixIndexConfig, PrefixIndexStats};
use crate::tokenizers::Tokenizers;

use link::Shared;
pub use link::{Link, LinkEvent, LinkEvents, SlotHold};
pub use state::first_token_overhead_ms;

/// The prefix index shared by every link (written by their actors, read by placement).
pub type SharedPrefixIndex = Arc<RwLock<PrefixIndex>>;

/// All worker links, following the membership view.
pub struct Links {
    links: RwLock<HashMap<String, Arc<Link>>>,
    /// Every model a worker record ever advertised: a request for one of them with no worker
    /// right now is `UNAVAILABLE` (retry), not an unknown model.
    served_models: RwLock<BTreeSet<String>>,
    next_id: AtomicU64,
    connect_timeout: Duration,
    changes: Arc<ChangeFeed>,
    prefix: SharedPrefixIndex,
    me: Weak<Links>,
    tokenizers: Arc<Tokenizers>,
    /// The cluster token every link presents to its worker, once set.
    credential: OnceLock<ClusterToken>,
    /// TLS of every link, once set (before any link is dialled): workers then serve TLS.
    tls: OnceLock<ClientTls>,
    /// `switchyard_router_worker_identity_rejections`, once set.
    identity_rejections: OnceLock<Family<WorkerLabels, Counter>>,
    /// Workers hosted by this process, by id: linked in process.
    hosted: RwLock<HashMap<String, HostedWorker>>,
}

impl Links {
    /// An empty link set; [`Links::follow`] keeps it in step with a membership view.
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            links: RwLock::new(HashMap::new()),
            served_models: RwLock::new(BTreeSet::new()),
            next_id: AtomicU64::new(0),
            connect_timeout,
            changes: Arc::default(),
            prefix: Arc::new(RwLock::new(PrefixIndex::new(PrefixIndexConfig::default()))),
            me: me.clone(),
            tokenizers: Arc::default(),
            credential: OnceLock::new(),
            tls: OnceLock::new(),
            identity_rejections: OnceLock::new(),
            hosted: RwLock::default(),
        })
    }

    /// Dials every worker link from now on over TLS (set once, before any).
    pub fn set_tls(&self, tls: ClientTls) {
        let _ = self.tls.set(tls);
    }

    /// Counts refused worker certificates in `counter` (set once, before any link is dialled).
    pub fn set_identity_rejections(&self, counter: Family<WorkerLabels, Counter>) {
        let _ = self.identity_rejections.set(counter);
    }

    fn identity_rejected(&self, record: &WorkerRecord) {
        if let Some(counter) = self.identity_rejections.get() {
            counter
                .get_or_create(&WorkerLabels {
                    worker_id: record.id.clone(),
                    pool: record.pool.as_str(),
                })
                .inc();
        }
    }

    /// Presents `token` on every worker link dialled from now on (set once, before any).
    pub fn set_credential(&self, token: ClusterToken) {
        let _ = self.credential.set(token);
    }

    /// Links worker `hosted.id` in process from now on: it runs in this process, so its link
    /// skips the network (and TLS, which guards the network).
    pub fn host(&self, hosted: HostedWorker) {
        self.hosted
            .write()
            .expect("hosted workers lock")
            .insert(hosted.id.clone(), hosted);
    }

    fn hosted_worker(&self, worker_id: &str) -> Option<HostedWorker> {
        self.hosted
            .read()
            .expect("hosted workers lock")
            .get(worker_id)
            .cloned()
    }

    /// Creates the link set and a task that keeps it in step with `membership`.
    pub fn spawn(
        membership: Membership,
        connect_timeout: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let links = Self::new(connect_timeout);
        links.follow(membership, shutdown);
        links
    }

    /// Opens and closes links as `membership` changes, until `shutdown` fires (then closes
    /// every link).
    pub fn follow(&self, mut membership: Membership, shutdown: CancellationToken) {
        self.sync(&membership.current());
        let this = self.me.upgrade().expect("links are alive while followed");
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = membership.changed() => {
                        if !changed { break; }
                        this.sync(&membership.current());
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
            for link in this
                .links
                .write()
                .expect("links lock")
                .drain()
                .map(|(_, l)| l)
            {
                link.shared.closed.cancel();
            }
        });
    }

    /// A link to `record`'s worker, its task running.
    fn open(&self, record: WorkerRecord) -> Arc<Link> {
        let (link, task) = Link::new(
            record,
            self.changes.clone(),
            self.prefix.clone(),
            self.me.clone(),
            self.tokenizers.clone(),
            self.connect_timeout,
        );
        tokio::spawn(task.run());
        link
    }

    fn sync(&self, view: &MembershipView) {
        self.served_models
            .write()
            .expect("served models lock")
            .extend(view.iter().flat_map(|r| r.models.iter().cloned()));
        let mut links = self.links.write().expect("links lock");
        links.retain(|id, link| {
            if view.get(id).is_some() {
                return true;
            }
            // The record went away: etcd lost the worker's lease (an outage or a lease flap),
            // or the worker deregistered. Its link decides: a healthy stream stays, with
            // everything in flight on it; a down one is dropped. Read and marked in one step
            // with the link's task marking it down, so exactly one of them drops it.
            let mut connected = false;
            let mut was_listed = false;
            link.shared.state.update(|s| {
                connected = s.connected;
                was_listed = std::mem::replace(&mut s.listed, false);
                was_listed
            });
            if connected {
                if was_listed {
                    info!(worker = %id, "worker's record left the membership; keeping its link while its stream is healthy");
                }
                true
            } else {
                info!(worker = %id, "worker left the membership and its link is down; closing it");
                link.shared.closed.cancel();
                false
            }
        });
        for record in view.iter() {
            match links.get(&record.id) {
                Some(link) => {
                    // The stream was checked against the record's address and identity (its
                    // pool is part of it): a change of either is dialled, and checked, again.
                    let redial = {
                        let old = link.shared.record.borrow();
                        old.address != record.address || old.pool != record.pool
                    };
                    link.shared.record.send_replace(Arc::new(record.clone()));
                    if link
                        .shared
                        .state
                        .update(|s| !std::mem::replace(&mut s.listed, true))
                    {
                        info!(worker = %record.id, "worker's record is back in the membership");
                    }
                    if redial {
                        // A new link to the new address; the old one's stream ends.
                        link.shared.closed.cancel();
                        let fresh = self.open(record.clone());
                        links.insert(record.id.clone(), fresh);
                    }
                }
                None => {
                    let link = self.open(record.clone());
                    links.insert(record.id.clone(), link);
                }
            }
        }
        drop(links);
        self.changes.membership();
    }

    /// Drops the link of `shared` after its stream failed while its worker was out of the
    /// membership. Returns `false` when the worker came back meanwhile (the link stays, to be
    /// redialled).
    fn drop_unlisted(&self, shared: &Arc<Shared>) -> bool {
        let mut links = self.links.write().expect("links lock");
        let id = &shared.id;
        let current = links
            .get(id)
            .is_some_and(|l| Arc::ptr_eq(&l.shared, shared));
        if current && shared.state.get().listed {
            return false;
        }
        if current {
            info!(worker = %id, "link of a worker no longer in the membership failed; it leaves the view");
            links.remove(id);
        }
        shared.closed.cancel();
        drop(links);
        self.changes.membership();
        true
    }

    /// Whether a worker ever advertised `model` to this router.
    pub fn has_served(&self, model: &str) -> bool {
        self.served_models
            .read()
            .expect("served models lock")
            .contains(model)
    }

    pub fn get(&self, worker_id: &str) -> Option<Arc<Link>> {
        self.links
            .read()
            .expect("links lock")
            .get(worker_id)
            .cloned()
    }

    /// Every worker's state, for the placement policy.
    pub fn states(&self) -> Vec<WorkerState> {
        self.links
            .read()
            .expect("links lock")
            .values()
            .map(|l| l.state())
            .collect()
    }

    /// The workers serving `model` whose records say they lack a capability (`has`: scoring a
    /// prompt, embedding one), and how many serving it have it.
    pub fn capable(&self, model: &str, has: fn(&WorkerRecord) -> bool) -> (Vec<String>, usize) {
        let links = self.links.read().expect("links lock");
        let (mut cannot, mut can) = (Vec::new(), 0);
        for link in links.values() {
            let record = link.record();
            match (record.serves(model), has(&record)) {
                (false, _) => {}
                (true, true) => can += 1,
                (true, false) => cannot.push(record.id.clone()),
            }
        }
        (cannot, can)
    }

    /// The policy's view of every worker.
    pub fn view(&self) -> ClusterView {
        let mut states = self.states();
        // Deterministic order: the view's indices and tie-breaks do not depend on hashing.
        states.sort_by(|a, b| a.id.cmp(&b.id));
        ClusterView::new(states)
    }

    /// Workers holding a prefix of `prompt` (token ids, chat template applied), longest first.
    pub fn prefix_lookup(&self, prompt: &[u32]) -> Vec<PrefixHit> {
        self.prefix
            .read()
            .expect("prefix index lock")
            .lookup(prompt)
    }

    /// Sizes of the prefix index.
    pub fn prefix_stats(&self) -> PrefixIndexStats {
        self.prefix.read().expect("prefix index lock").stats()
    }

    /// What changed among the workers since placement last looked (see [`ChangeFeed`]).
    pub fn changes(&self) -> &Arc<ChangeFeed> {
        &self.changes
    }

    /// The models' tokenizers, as fetched from the workers.
    pub fn tokenizers(&self) -> &Tokenizers {
        &self.tokenizers
    }

    /// A router-wide unique id for a generation on a worker stream.
    pub fn next_generation_id(&self) -> String {
        format!("g{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests;
