//! One router stream's view of the engine's prefix cache, as `KvEvents` frames: a snapshot
//! first (split into frames of at most [`MAX_BLOCKS_PER_FRAME`] blocks, so a large cache never
//! exceeds a gRPC message limit), then every change the engine publishes, with the changes that
//! are ready at once coalesced into one frame. A feed that falls too far behind the publisher
//! takes a fresh snapshot instead of the changes it missed.

use std::collections::HashSet;
use std::sync::Arc;

use switchyard_proto::kv_blocks::HASH_SCHEME;
use switchyard_proto::v1;
use tokio::sync::broadcast::{Receiver, error::RecvError, error::TryRecvError};

use crate::kv_events::{KvBatch, KvPublisher};

/// Block hashes per frame (8 bytes each on the wire: ~0.5 MiB).
pub const MAX_BLOCKS_PER_FRAME: usize = 65_536;

/// Batches folded into one frame at most, so a busy engine's changes still go out steadily.
const MAX_BATCHES_PER_FRAME: usize = 256;

pub struct KvFeed {
    publisher: Arc<KvPublisher>,
    changes: Receiver<KvBatch>,
    /// Snapshot frames not sent yet.
    pending: Vec<v1::KvEvents>,
}

impl KvFeed {
    /// Subscribes to `publisher`; the first frames [`KvFeed::next`] returns are the snapshot.
    pub fn new(publisher: Arc<KvPublisher>) -> Self {
        let (snapshot, changes) = publisher.subscribe();
        let mut feed = Self {
            publisher,
            changes,
            pending: Vec::new(),
        };
        feed.pending = feed.snapshot_frames(snapshot);
        feed
    }

    /// The next frame to send. Cancel-safe: a change received is never lost.
    pub async fn next(&mut self) -> v1::KvEvents {
        if let Some(frame) = self.pending.pop() {
            return frame;
        }
        let first = loop {
            match self.changes.recv().await {
                Ok(batch) => break batch,
                Err(RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "KV feed fell behind; sending a fresh snapshot");
                    return self.resubscribe();
                }
                // The engine dropped its cache: nothing more will come.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        };
        let mut merged = Coalesced::default();
        merged.add(first);
        for _ in 1..MAX_BATCHES_PER_FRAME {
            match self.changes.try_recv() {
                Ok(batch) => merged.add(batch),
                Err(TryRecvError::Lagged(_)) => return self.resubscribe(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        self.frame(
            false,
            merged.cleared,
            merged.stored.into_iter().collect(),
            merged.removed,
        )
    }

    fn resubscribe(&mut self) -> v1::KvEvents {
        let (snapshot, changes) = self.publisher.subscribe();
        self.changes = changes;
        self.pending = self.snapshot_frames(snapshot);
        self.pending.pop().expect("a snapshot has a first frame")
    }

    /// The snapshot as frames, in reverse order (popped from the back): the first one says
    /// `snapshot`, the rest only add blocks.
    fn snapshot_frames(&self, blocks: Vec<u64>) -> Vec<v1::KvEvents> {
        let mut frames: Vec<v1::KvEvents> = Vec::new();
        let mut chunks = blocks.chunks(MAX_BLOCKS_PER_FRAME);
        let first = chunks.next().unwrap_or_default().to_vec();
        frames.push(self.frame(true, true, first, Vec::new()));
        for chunk in chunks {
            frames.push(self.frame(false, false, chunk.to_vec(), Vec::new()));
        }
        frames.reverse();
        frames
    }

    fn frame(
        &self,
        snapshot: bool,
        cleared: bool,
        stored: Vec<u64>,
        removed: Vec<u64>,
    ) -> v1::KvEvents {
        v1::KvEvents {
            block_tokens: self.publisher.block_tokens(),
            hash_scheme: HASH_SCHEME.to_string(),
            snapshot,
            cleared,
            stored,
            removed,
        }
    }
}

/// Batches folded into one frame with the frame's meaning (cleared, then removed, then
/// stored) equal to applying them one after the other.
#[derive(Default)]
struct Coalesced {
    cleared: bool,
    stored: HashSet<u64>,
    removed: Vec<u64>,
}

impl Coalesced {
    fn add(&mut self, batch: KvBatch) {
        if batch.cleared {
            *self = Self {
                cleared: true,
                ..Self::default()
            };
        }
        for hash in batch.removed {
            // A block stored by an earlier batch of this frame and removed now: not held.
            self.stored.remove(&hash);
            self.removed.push(hash);
        }
        // Removed earlier and stored again: `stored` applies after `removed`, so it is held.
        self.stored.extend(batch.stored);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[tokio::test]
    async fn snapshot_first_then_changes_ready_at_once_in_one_frame() {
        let publisher = Arc::new(KvPublisher::new(32));
        publisher.publish(KvBatch {
            stored: vec![1, 2],
            ..Default::default()
        });
        let mut feed = KvFeed::new(publisher.clone());
        let first = feed.next().await;
        assert!(first.snapshot && first.cleared);
        assert_eq!(
            (first.block_tokens, first.hash_scheme.as_str()),
            (32, HASH_SCHEME)
        );
        assert_eq!(sorted(first.stored), vec![1, 2]);
        // Three batches before the feed looks: one frame with their net effect.
        publisher.publish(KvBatch {
            stored: vec![3, 4],
            ..Default::default()
        });
        publisher.publish(KvBatch {
            removed: vec![3, 1],
            ..Default::default()
        });
        publisher.publish(KvBatch {
            stored: vec![1],
            ..Default::default()
        });
        let next = feed.next().await;
        assert!(!next.snapshot && !next.cleared);
        assert_eq!(sorted(next.stored), vec![1, 4]);
        assert_eq!(sorted(next.removed), vec![1, 3]);
        // Applied in frame order (removed, then stored) the router holds 1, 2, 4: as the engine.
    }

    #[tokio::test]
    async fn a_large_snapshot_is_split_and_a_lagging_feed_takes_a_new_one() {
        let publisher = Arc::new(KvPublisher::new(16));
        publisher.publish(KvBatch {
            stored: (0..(MAX_BLOCKS_PER_FRAME as u64 + 10)).collect(),
            ..Default::default()
        });
        let mut feed = KvFeed::new(publisher.clone());
        let first = feed.next().await;
        let second = feed.next().await;
        assert!(first.snapshot && !second.snapshot && !second.cleared);
        assert_eq!(
            first.stored.len() + second.stored.len(),
            MAX_BLOCKS_PER_FRAME + 10
        );
        // Far more batches than the publisher keeps for a slow subscriber.
        for i in 0..2000u64 {
            publisher.publish(KvBatch {
                stored: vec![1_000_000 + i],
                ..Default::default()
            });
        }
        let resync = feed.next().await;
        assert!(
            resync.snapshot,
            "a lagging feed starts over from a snapshot"
        );
        let mut total = resync.stored.len();
        while total < publisher.len() {
            let more = feed.next().await;
            assert!(!more.snapshot);
            total += more.stored.len();
        }
        assert_eq!(total, MAX_BLOCKS_PER_FRAME + 10 + 2000);
    }
}
