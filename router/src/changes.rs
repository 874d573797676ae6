//! What changed in the cluster since placement last looked: the workers whose load or
//! reachability changed, and whether membership (the set of workers, their pools or models)
//! changed. Links and the membership follower write it; the placer takes it (its task as
//! changes come, and a placement before it decides).
//!
//! Changes are coalesced: a worker reporting its load a thousand times while placement is
//! busy is one entry, so memory stays bounded by the number of workers however slow the
//! reader, and the reader patches each worker once.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Pending changes, taken as a whole by [`ChangeFeed::next`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Workers whose state (load, reachability, slots held) changed.
    pub workers: HashSet<String>,
    /// Workers came or went, or a record's pool or models changed: rebuild, do not patch.
    pub membership: bool,
}

impl Changed {
    fn is_empty(&self) -> bool {
        self.workers.is_empty() && !self.membership
    }
}

/// A coalescing change feed with one reader.
#[derive(Debug, Default)]
pub struct ChangeFeed {
    pending: Mutex<Changed>,
    wake: Notify,
}

impl ChangeFeed {
    /// Worker `id`'s state changed.
    pub fn worker(&self, id: &str) {
        let mut pending = self.pending.lock().expect("change feed lock");
        if !pending.membership && !pending.workers.contains(id) {
            pending.workers.insert(id.to_string());
        }
        drop(pending);
        // A stored permit when the reader is busy: the change is seen on its next wait.
        self.wake.notify_one();
    }

    /// The set of workers changed.
    pub fn membership(&self) {
        let mut pending = self.pending.lock().expect("change feed lock");
        pending.membership = true;
        // A rebuild reads every worker: the patches are moot.
        pending.workers.clear();
        drop(pending);
        self.wake.notify_one();
    }

    /// Takes what changed, waiting until something has.
    pub async fn next(&self) -> Changed {
        loop {
            let taken = std::mem::take(&mut *self.pending.lock().expect("change feed lock"));
            if !taken.is_empty() {
                return taken;
            }
            self.wake.notified().await;
        }
    }

    /// Takes what changed without waiting (empty when nothing has).
    pub fn take(&self) -> Changed {
        std::mem::take(&mut *self.pending.lock().expect("change feed lock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_coalesced_and_a_membership_change_supersedes_patches() {
        let feed = ChangeFeed::default();
        for _ in 0..1000 {
            feed.worker("a");
        }
        feed.worker("b");
        let changed = feed.next().await;
        assert_eq!(changed.workers.len(), 2);
        assert!(!changed.membership);

        feed.worker("a");
        feed.membership();
        feed.worker("c");
        let changed = feed.next().await;
        assert!(changed.membership);
        assert!(changed.workers.is_empty(), "{changed:?}");
        assert_eq!(feed.take(), Changed::default());
    }

    #[tokio::test]
    async fn a_change_made_while_the_reader_is_busy_wakes_its_next_wait() {
        let feed = std::sync::Arc::new(ChangeFeed::default());
        feed.worker("a");
        assert_eq!(feed.take().workers.len(), 1);
        // The permit stored by that change must not make `next` return nothing.
        let reader = tokio::spawn({
            let feed = feed.clone();
            async move { feed.next().await }
        });
        tokio::task::yield_now().await;
        feed.worker("b");
        let changed = reader.await.expect("reader");
        assert!(changed.workers.contains("b"));
    }
}
