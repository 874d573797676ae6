//! What an engine's prefix cache holds, published to every router stream: the engine reports
//! each change as a [`KvBatch`]; a subscriber gets a consistent snapshot plus every batch after
//! it (snapshot and subscription are taken under one lock, so no change falls between them).

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::broadcast;

/// Batches a slow subscriber may fall behind before it must take a fresh snapshot.
const BACKLOG: usize = 1024;

/// One change of an engine's cached blocks, applied in order: `cleared`, `removed`, `stored`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvBatch {
    pub cleared: bool,
    pub stored: Vec<u64>,
    pub removed: Vec<u64>,
}

impl KvBatch {
    pub fn is_empty(&self) -> bool {
        !self.cleared && self.stored.is_empty() && self.removed.is_empty()
    }
}

struct Published {
    blocks: HashSet<u64>,
    tx: broadcast::Sender<KvBatch>,
}

/// The set of block hashes an engine holds (see `switchyard_proto::kv_blocks`), and the stream
/// of its changes.
pub struct KvPublisher {
    block_tokens: u32,
    state: Mutex<Published>,
}

impl std::fmt::Debug for KvPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvPublisher")
            .field("block_tokens", &self.block_tokens)
            .finish()
    }
}

impl KvPublisher {
    pub fn new(block_tokens: u32) -> Self {
        let (tx, _) = broadcast::channel(BACKLOG);
        Self {
            block_tokens,
            state: Mutex::new(Published {
                blocks: HashSet::new(),
                tx,
            }),
        }
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> u32 {
        self.block_tokens
    }

    /// Records `batch` and sends it to every subscriber. Called from the engine's own thread;
    /// never blocks on a subscriber.
    pub fn publish(&self, batch: KvBatch) {
        if batch.is_empty() {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if batch.cleared {
            state.blocks.clear();
        }
        for h in &batch.removed {
            state.blocks.remove(h);
        }
        state.blocks.extend(batch.stored.iter().copied());
        // No subscriber is fine: the set above is what the next one's snapshot shows.
        let _ = state.tx.send(batch);
    }

    /// Every block held now, and the changes from this instant on. A receiver that lags
    /// (`RecvError::Lagged`) must subscribe again for a fresh snapshot.
    pub fn subscribe(&self) -> (Vec<u64>, broadcast::Receiver<KvBatch>) {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (state.blocks.iter().copied().collect(), state.tx.subscribe())
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocks
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_sees_the_snapshot_then_every_later_change() {
        let p = KvPublisher::new(16);
        p.publish(KvBatch {
            stored: vec![1, 2, 3],
            ..Default::default()
        });
        let (mut snapshot, mut rx) = p.subscribe();
        snapshot.sort();
        assert_eq!(snapshot, vec![1, 2, 3]);
        p.publish(KvBatch {
            removed: vec![2],
            stored: vec![4],
            ..Default::default()
        });
        p.publish(KvBatch::default());
        let next = rx.try_recv().expect("the change after the snapshot");
        assert_eq!(next.removed, vec![2]);
        assert_eq!(next.stored, vec![4]);
        assert!(rx.try_recv().is_err(), "empty batches are not sent");
        assert_eq!(p.len(), 3);
        p.publish(KvBatch {
            cleared: true,
            ..Default::default()
        });
        assert!(p.is_empty());
    }
}
