//! The membership view: an immutable snapshot of registered workers, replaced as watch events
//! arrive, shared with every reader through a `tokio::sync::watch` channel.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::schema::WorkerRecord;

/// Workers as last seen, by worker id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembershipView {
    pub workers: BTreeMap<String, WorkerRecord>,
}

impl MembershipView {
    pub fn from_records(records: impl IntoIterator<Item = WorkerRecord>) -> Self {
        Self {
            workers: records.into_iter().map(|r| (r.id.clone(), r)).collect(),
        }
    }

    /// Applies a put (new or changed record).
    pub fn upsert(&mut self, record: WorkerRecord) {
        self.workers.insert(record.id.clone(), record);
    }

    /// Applies a delete (lease expired or revoked).
    pub fn remove(&mut self, worker_id: &str) -> Option<WorkerRecord> {
        self.workers.remove(worker_id)
    }

    pub fn get(&self, worker_id: &str) -> Option<&WorkerRecord> {
        self.workers.get(worker_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &WorkerRecord> {
        self.workers.values()
    }

    /// Every model served by at least one worker, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self.iter().flat_map(|w| w.models.iter().cloned()).collect();
        models.sort();
        models.dedup();
        models
    }
}

/// A live, cheaply clonable membership view.
#[derive(Debug, Clone)]
pub struct Membership {
    rx: watch::Receiver<Arc<MembershipView>>,
}

impl Membership {
    pub(crate) fn new(rx: watch::Receiver<Arc<MembershipView>>) -> Self {
        Self { rx }
    }

    /// A view that never changes, for tests and tools.
    pub fn fixed(view: MembershipView) -> Self {
        let (tx, rx) = watch::channel(Arc::new(view));
        // Keep the sender alive so `changed` waits forever instead of failing.
        std::mem::forget(tx);
        Self { rx }
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<MembershipView> {
        self.rx.borrow().clone()
    }

    /// Waits for the next change; `false` once the view will never change again.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// Publishes a new snapshot only when it differs, so readers wake for real changes only.
pub(crate) fn publish(tx: &watch::Sender<Arc<MembershipView>>, view: MembershipView) {
    tx.send_if_modified(|current| {
        if **current == view {
            false
        } else {
            *current = Arc::new(view);
            true
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Capacity, Pool, WorkerState};

    fn record(id: &str, pool: Pool, models: &[&str]) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            pool,
            address: "127.0.0.1:1".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            capacity: Capacity {
                max_concurrent: 1,
                tokens_per_s: 1.0,
                cost_per_mtok: 1.0,
            },
            hardware: String::new(),
            engine: "synthetic".into(),
            version: String::new(),
            state: WorkerState::Ready,
            scores_prompts: false,
            embeds: false,
        }
    }

    #[test]
    fn applies_puts_and_deletes() {
        let mut view = MembershipView::default();
        view.upsert(record("a", Pool::Gpu, &["m1"]));
        view.upsert(record("b", Pool::Wse, &["m1", "m2"]));
        assert_eq!(view.models(), vec!["m1", "m2"]);
        let mut changed = record("a", Pool::Gpu, &["m3"]);
        changed.state = WorkerState::Draining;
        view.upsert(changed.clone());
        assert_eq!(view.get("a"), Some(&changed));
        assert!(view.remove("b").is_some());
        assert!(view.remove("b").is_none());
        assert_eq!(view.models(), vec!["m3"]);
    }

    #[tokio::test]
    async fn readers_wake_only_on_real_changes() {
        let (tx, rx) = watch::channel(Arc::new(MembershipView::default()));
        let mut membership = Membership::new(rx);
        publish(&tx, MembershipView::default());
        assert!(!membership.rx.has_changed().unwrap());
        publish(
            &tx,
            MembershipView::from_records([record("a", Pool::Gpu, &["m"])]),
        );
        assert!(membership.changed().await);
        assert_eq!(membership.current().workers.len(), 1);
    }
}
