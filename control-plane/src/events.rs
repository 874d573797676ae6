//! Cluster events (worker joined/left/draining/ready, policy changed), derived by comparing
//! successive membership views and policy values from the etcd watches, and the audit trail of
//! admin writes made on this control plane. Subscribers get them live (`Admin.WatchEvents`);
//! the most recent ones are kept for the dashboard.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::auth::Caller;
use switchyard_cluster::{Membership, MembershipView, Pool, WorkerRecord, WorkerState};
use switchyard_policy::document::PolicyDocument;
use switchyard_proto::v1::{ClusterEvent, cluster_event::Kind};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Events kept for the dashboard and `WatchEvents`' replay (the cap `replay_recent` documents
/// in admin.proto).
pub const RECENT: usize = 200;
/// Events buffered per live subscriber before it lags.
const CHANNEL: usize = 1024;

/// The event feed: live subscription plus the most recent events.
#[derive(Debug, Clone)]
pub struct Events {
    live: broadcast::Sender<ClusterEvent>,
    recent: Arc<Mutex<VecDeque<ClusterEvent>>>,
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.live.subscribe()
    }

    /// The last `replay` events kept (at most [`RECENT`]), oldest first, and a subscription
    /// to every event after them: taken under the lock `emit` sends under, so no event falls
    /// between the two or is in both.
    pub fn subscribe_after_recent(
        &self,
        replay: usize,
    ) -> (Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        let recent = self.recent.lock().expect("events lock");
        let skip = recent.len().saturating_sub(replay);
        let replayed = recent.iter().skip(skip).cloned().collect();
        (replayed, self.live.subscribe())
    }

    /// The last events, oldest first.
    pub fn recent(&self) -> Vec<ClusterEvent> {
        self.recent
            .lock()
            .expect("events lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Records a successful admin write: who (`caller`), through which door (`via`), what
    /// (`action`) on which `target` (a worker id, or `policy`).
    pub fn admin_write(&self, caller: &Caller, via: &str, action: &str, target: &str) {
        let worker_id = if action == "set_policy" {
            String::new()
        } else {
            target.to_string()
        };
        self.emit(ClusterEvent {
            kind: Kind::AdminWrite as i32,
            worker_id,
            at_unix_ms: now_unix_ms(),
            message: format!(
                "{} ({}) {action} {target} via {via}",
                caller.name,
                caller.role.as_str()
            ),
            actor: caller.name.clone(),
            role: caller.role.as_str().into(),
            action: action.into(),
            via: via.into(),
            ..Default::default()
        });
    }

    /// Records that the worker record `worker_id` (`pool`, at `address`) was refused: the
    /// certificate served there names someone else.
    pub fn identity_rejected(&self, worker_id: &str, pool: Pool, address: &str, why: &str) {
        self.emit(ClusterEvent {
            kind: Kind::WorkerIdentityRejected as i32,
            worker_id: worker_id.into(),
            pool: pool.to_string(),
            at_unix_ms: now_unix_ms(),
            message: format!(
                "worker record {worker_id} ({pool}) at {address} refused: {why}; no traffic goes \
                 there (forged or overwritten record?)"
            ),
            ..Default::default()
        });
    }

    fn emit(&self, event: ClusterEvent) {
        // Kept and sent under one lock: a watcher that replays the kept events and subscribes
        // (`subscribe_after_recent`) sees each event exactly once. Sending never waits.
        let mut recent = self.recent.lock().expect("events lock");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(event.clone());
        // No subscriber is fine.
        let _ = self.live.send(event);
    }

    /// Follows `membership` and `policy` until `shutdown`.
    pub fn spawn(
        mut membership: Membership,
        mut policy: watch::Receiver<Option<Vec<u8>>>,
        shutdown: CancellationToken,
    ) -> Self {
        let (live, _) = broadcast::channel(CHANNEL);
        let events = Self {
            live,
            recent: Arc::default(),
        };
        let this = events.clone();
        tokio::spawn(async move {
            let mut last = membership.current();
            // An invalid document stored before this replica started is news to its
            // operators too; a valid one is not.
            let stored = policy.borrow_and_update().clone();
            if let Some(event) = policy_event(stored.as_deref(), false) {
                this.emit(event);
            }
            let mut policy_alive = true;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    alive = membership.changed() => {
                        if !alive { return }
                        let now = membership.current();
                        for event in diff(&last, &now, now_unix_ms()) {
                            this.emit(event);
                        }
                        last = now;
                    }
                    changed = policy.changed(), if policy_alive => {
                        if changed.is_err() {
                            policy_alive = false;
                            continue;
                        }
                        let stored = policy.borrow_and_update().clone();
                        if let Some(event) = policy_event(stored.as_deref(), true) {
                            this.emit(event);
                        }
                    }
                }
            }
        });
        events
    }
}

/// The event a stored policy value makes: `changed` (a new value was stored) or not (the
/// value found at start, news only when invalid). An invalid document is a warning, not an
/// update: routers do not apply it.
fn policy_event(stored: Option<&[u8]>, changed: bool) -> Option<ClusterEvent> {
    let (kind, message) = match stored.map(PolicyDocument::from_json) {
        Some(Err(invalid)) => {
            warn!(
                error = %invalid,
                "the stored routing policy is invalid; routers do not apply it (running ones keep \
                 their last valid policy, starting ones are not ready until a valid document is \
                 stored)"
            );
            (
                Kind::PolicyInvalid,
                format!(
                    "routing policy stored in etcd is invalid and not applied: {invalid}; running \
                     routers keep their last valid policy, routers starting now are not ready \
                     until a valid document is stored"
                ),
            )
        }
        _ if !changed => return None,
        Some(Ok(_)) => (Kind::PolicyChanged, "routing policy updated".to_string()),
        None => (
            Kind::PolicyChanged,
            "routing policy deleted; routers use the built-in default".to_string(),
        ),
    };
    Some(ClusterEvent {
        kind: kind as i32,
        at_unix_ms: now_unix_ms(),
        message,
        ..Default::default()
    })
}

pub(crate) fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn event(kind: Kind, worker: &WorkerRecord, at_unix_ms: i64, message: String) -> ClusterEvent {
    ClusterEvent {
        kind: kind as i32,
        worker_id: worker.id.clone(),
        pool: worker.pool.to_string(),
        at_unix_ms,
        message,
        ..Default::default()
    }
}

/// The events that turn `old` into `new`.
pub fn diff(old: &MembershipView, new: &MembershipView, at_unix_ms: i64) -> Vec<ClusterEvent> {
    let mut events = Vec::new();
    for worker in new.iter() {
        match old.get(&worker.id) {
            None => {
                events.push(event(
                    Kind::WorkerJoined,
                    worker,
                    at_unix_ms,
                    format!(
                        "{} ({}) joined at {}, state {}",
                        worker.id,
                        worker.pool,
                        worker.address,
                        worker.state.as_str()
                    ),
                ));
            }
            Some(before) if before.state != worker.state => {
                let kind = match worker.state {
                    WorkerState::Draining => Kind::WorkerDraining,
                    WorkerState::Ready => Kind::WorkerReady,
                };
                events.push(event(
                    kind,
                    worker,
                    at_unix_ms,
                    format!(
                        "{} ({}) is {}",
                        worker.id,
                        worker.pool,
                        worker.state.as_str()
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    for worker in old.iter() {
        if new.get(&worker.id).is_none() {
            events.push(event(
                Kind::WorkerLeft,
                worker,
                at_unix_ms,
                format!("{} ({}) left the cluster", worker.id, worker.pool),
            ));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cluster::{Capacity, Pool};

    fn record(id: &str, state: WorkerState) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            pool: Pool::Gpu,
            address: "127.0.0.1:1".into(),
            models: vec!["m".into()],
            capacity: Capacity {
                max_concurrent: 1,
                tokens_per_s: 1.0,
                cost_per_mtok: 1.0,
            },
            hardware: String::new(),
            engine: "synthetic".into(),
            version: String::new(),
            state,
            scores_prompts: false,
            embeds: false,
        }
    }

    fn kinds(events: &[ClusterEvent]) -> Vec<(Kind, &str)> {
        events
            .iter()
            .map(|e| (e.kind(), e.worker_id.as_str()))
            .collect()
    }

    /// An invalid document written into etcd (past SetPolicy's validation) is a warning
    /// that says why, not "routing policy updated"; one found at start is reported too.
    #[tokio::test]
    async fn an_invalid_stored_policy_is_a_warning_not_an_update() {
        use switchyard_cluster::{MemoryRegistry, Registry};
        let registry = MemoryRegistry::new();
        registry
            .put_policy(br#"{"placement": {"choices": 0}}"#.to_vec(), None)
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let events = Events::spawn(
            registry.watch_workers().await.unwrap(),
            registry.watch_policy().await.unwrap(),
            stop.clone(),
        );
        let seen = |events: &Events| {
            events
                .recent()
                .iter()
                .map(|e| (e.kind(), e.message.clone()))
                .collect::<Vec<_>>()
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while events.recent().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the invalid document found at start is reported");
        let found = seen(&events);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0, Kind::PolicyInvalid);
        assert!(found[0].1.contains("placement.choices"), "{found:?}");
        let mut live = events.subscribe();

        registry
            .put_policy(br#"{"default_lane": "latency-critical"}"#.to_vec(), None)
            .await
            .unwrap();
        let updated = live.recv().await.unwrap();
        assert_eq!(updated.kind(), Kind::PolicyChanged);
        assert_eq!(updated.message, "routing policy updated");
        registry.put_policy(b"[]".to_vec(), None).await.unwrap();
        let invalid = live.recv().await.unwrap();
        assert_eq!(invalid.kind(), Kind::PolicyInvalid, "{invalid:?}");
        assert!(invalid.message.contains("JSON object"), "{invalid:?}");
        stop.cancel();
        // A valid document found at start is no news.
        assert!(policy_event(Some(b"{}"), false).is_none());
        assert!(policy_event(None, false).is_none());
        assert_eq!(
            policy_event(None, true).map(|e| e.kind()),
            Some(Kind::PolicyChanged)
        );
    }

    /// A watcher that replays the kept events and then follows the live ones sees every event
    /// once, in order, however the events being emitted meanwhile fall.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_then_live_has_no_gap_and_no_duplicate() {
        let (live, _) = broadcast::channel(CHANNEL);
        let events = Events {
            live,
            recent: Arc::default(),
        };
        let numbered = |n: i64| ClusterEvent {
            at_unix_ms: n,
            ..Default::default()
        };
        // More than are kept, so the oldest have been dropped when the watchers join.
        for n in 0..RECENT as i64 + 50 {
            events.emit(numbered(n));
        }
        // Fewer live events than the channel holds: no watcher can lag, whatever the scheduling.
        const TOTAL: i64 = RECENT as i64 + 50 + CHANNEL as i64 - 100;
        // The emitter starts once the first watcher (replaying nothing) has subscribed: one
        // that subscribed after the last event would wait for ever.
        let (first_subscribed, go) = tokio::sync::oneshot::channel::<()>();
        let mut first_subscribed = Some(first_subscribed);
        let emitter = {
            let events = events.clone();
            tokio::spawn(async move {
                go.await.expect("a first watcher");
                for n in RECENT as i64 + 50..TOTAL {
                    events.emit(numbered(n));
                    if n % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        let mut watchers = Vec::new();
        for replay in [0, 1, 7, RECENT, usize::MAX] {
            let (replayed, mut live) = events.subscribe_after_recent(replay);
            if let Some(first) = first_subscribed.take() {
                first.send(()).expect("the emitter waits");
            }
            assert!(replayed.len() <= replay.min(RECENT), "{}", replayed.len());
            watchers.push(tokio::spawn(async move {
                let mut seen: Vec<i64> = replayed.iter().map(|e| e.at_unix_ms).collect();
                while seen.last() != Some(&(TOTAL - 1)) {
                    seen.push(
                        live.recv()
                            .await
                            .expect("no lag: the channel holds them")
                            .at_unix_ms,
                    );
                }
                seen
            }));
            tokio::task::yield_now().await;
        }
        emitter.await.unwrap();
        for (watcher, replay) in watchers.into_iter().zip([0, 1, 7, RECENT, usize::MAX]) {
            let seen = watcher.await.unwrap();
            let first = seen[0];
            let expected: Vec<i64> = (first..TOTAL).collect();
            assert!(
                seen == expected,
                "replay {replay}: a gap or a duplicate after {first}"
            );
        }
    }

    #[test]
    fn joins_state_changes_and_departures_become_events() {
        let a = MembershipView::from_records([record("a", WorkerState::Ready)]);
        let b = MembershipView::from_records([
            record("a", WorkerState::Draining),
            record("b", WorkerState::Ready),
        ]);
        assert_eq!(
            kinds(&diff(&a, &b, 1)),
            vec![(Kind::WorkerDraining, "a"), (Kind::WorkerJoined, "b")]
        );
        let c = MembershipView::from_records([record("b", WorkerState::Ready)]);
        assert_eq!(kinds(&diff(&b, &c, 2)), vec![(Kind::WorkerLeft, "a")]);
        let d = MembershipView::from_records([record("b", WorkerState::Ready)]);
        assert!(diff(&c, &d, 3).is_empty());
        let back = MembershipView::from_records([
            record("a", WorkerState::Ready),
            record("b", WorkerState::Ready),
        ]);
        assert_eq!(kinds(&diff(&b, &back, 4)), vec![(Kind::WorkerReady, "a")]);
    }
}
