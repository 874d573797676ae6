//! Which KV block holds what: the engine's block allocator and prefix cache.
//!
//! Every block of the [`crate::model::KvStore`] is in one of three states:
//! - *active*: in the block table of at least one running sequence (reference counted: a cached
//!   prefix block may be in several tables at once);
//! - *cached*: full, named by its chained content hash (`switchyard_proto::kv_blocks`), used by
//!   no sequence, kept for a later request with the same prefix; evicted least recently used
//!   first, only when a sequence needs room;
//! - *free*: holding nothing worth keeping.
//!
//! A new sequence reuses the longest chain of cached blocks that starts its context (keeping at
//! least its last token to compute, since sampling needs that token's logits) and prefills only
//! the rest. Admission reserves blocks for the whole budget (context + max_tokens), counting
//! cached blocks as room, so a request that fits the store never fails because the cache is
//! full. A sequence's full blocks are named as soon as they are full, so a concurrent request
//! with the same prefix can share them while the first still runs.
//!
//! Every change of the set of named blocks is recorded for the router (`KvEvents`).

use std::collections::{BTreeSet, HashMap};

use switchyard_proto::kv_blocks;
use switchyard_worker::{KvBatch, PrefixCacheStats};

#[derive(Debug, Clone, Copy, Default)]
struct BlockMeta {
    /// Sequences whose tables hold the block.
    refs: u32,
    /// The block's name when it is full and registered in the cache index.
    hash: Option<u64>,
    /// When it last became unused (its place in the LRU order).
    released_at: u64,
}

/// A sequence's blocks as the cache sees them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Block ids in position order, covering the sequence's whole budget.
    pub table: Vec<u32>,
    /// Names of the leading full blocks (the chain so far).
    hashes: Vec<u64>,
}

/// Whether a sequence may start from cached blocks of its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// From the longest cached block chain of its context.
    Cached,
    /// From nothing: every context token is computed (a prompt being scored needs the logits
    /// of every position, which cached blocks do not keep).
    None,
}

/// A sequence admitted over the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub blocks: SeqBlocks,
    /// Leading context tokens already in `blocks` (a whole number of blocks).
    pub cached_tokens: usize,
}

/// The allocator and prefix index over a store of `capacity` blocks.
#[derive(Debug)]
pub struct PrefixCache {
    block_tokens: usize,
    /// Off: no lookups and no naming, every released block is free (for comparisons and for
    /// operators who want none of it).
    enabled: bool,
    meta: Vec<BlockMeta>,
    free: Vec<u32>,
    /// Cached (named, unused) blocks by release order.
    lru: BTreeSet<(u64, u32)>,
    by_hash: HashMap<u64, u32>,
    clock: u64,
    pending: KvBatch,
    stats: PrefixCacheStats,
}

impl PrefixCache {
    pub fn new(capacity: usize, block_tokens: usize, enabled: bool) -> Self {
        Self {
            block_tokens,
            enabled,
            meta: vec![BlockMeta::default(); capacity],
            // Popped from the end: low ids first, so the store's memory fills from the front.
            free: (0..capacity as u32).rev().collect(),
            lru: BTreeSet::new(),
            by_hash: HashMap::new(),
            clock: 0,
            pending: KvBatch::default(),
            stats: PrefixCacheStats {
                block_tokens: block_tokens as u32,
                ..Default::default()
            },
        }
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Blocks the store has in all.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Blocks a sequence of `tokens` positions needs.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Blocks held by running sequences.
    pub fn active_blocks(&self) -> usize {
        self.meta.len() - self.free.len() - self.lru.len()
    }

    /// The cached blocks that start `context`, leaving its last token uncached.
    fn lookup(&self, context: &[u32]) -> Vec<(u64, u32)> {
        if !self.enabled || context.is_empty() {
            return Vec::new();
        }
        let reusable = (context.len() - 1) / self.block_tokens;
        let mut parent = kv_blocks::ROOT;
        let mut found = Vec::new();
        for block in context.chunks_exact(self.block_tokens).take(reusable) {
            let hash = kv_blocks::chain(parent, block);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            found.push((hash, id));
            parent = hash;
        }
        found
    }

    /// Admits a sequence of `context` that may grow to `total_tokens` positions: reuses the
    /// cached blocks that start it and reserves the rest, evicting cached blocks when no free
    /// one is left. `None` when the store cannot make room now (the request waits).
    pub fn admit(
        &mut self,
        context: &[u32],
        total_tokens: usize,
        reuse: Reuse,
    ) -> Option<Admission> {
        let needed = self.blocks_for(total_tokens.max(context.len()));
        let reused = match reuse {
            Reuse::Cached => self.lookup(context),
            Reuse::None => Vec::new(),
        };
        // Cached blocks about to be reused cannot also be evicted for this sequence.
        let reused_idle = reused
            .iter()
            .filter(|(_, id)| self.meta[*id as usize].refs == 0)
            .count();
        let fresh = needed.saturating_sub(reused.len());
        if fresh > self.free.len() + self.lru.len() - reused_idle {
            return None;
        }
        let mut blocks = SeqBlocks::default();
        for &(hash, id) in &reused {
            let meta = &mut self.meta[id as usize];
            if meta.refs == 0 {
                self.lru.remove(&(meta.released_at, id));
            }
            meta.refs += 1;
            blocks.table.push(id);
            blocks.hashes.push(hash);
        }
        for _ in 0..fresh {
            let id = self.take_block();
            self.meta[id as usize].refs = 1;
            blocks.table.push(id);
        }
        let cached_tokens = reused.len() * self.block_tokens;
        if self.enabled && reuse == Reuse::Cached {
            self.stats.lookups += 1;
            self.stats.lookup_tokens += context.len() as u64;
            self.stats.hit_tokens += cached_tokens as u64;
        }
        Some(Admission {
            blocks,
            cached_tokens,
        })
    }

    /// A block for a new sequence: a free one, else the least recently used cached one.
    fn take_block(&mut self) -> u32 {
        if let Some(id) = self.free.pop() {
            return id;
        }
        let (_, id) = self
            .lru
            .pop_first()
            .expect("admission checked that a block can be had");
        let meta = &mut self.meta[id as usize];
        if let Some(hash) = meta.hash.take() {
            self.by_hash.remove(&hash);
            self.pending.removed.push(hash);
        }
        self.stats.evictions += 1;
        id
    }

    /// Names the blocks of `seq` that the first `filled` tokens of `tokens` (its context and
    /// generated ids) have filled since the last call, and makes them findable.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], filled: usize) {
        if !self.enabled {
            return;
        }
        let full = filled.min(tokens.len()) / self.block_tokens;
        while seq.hashes.len() < full {
            let i = seq.hashes.len();
            let parent = seq.hashes.last().copied().unwrap_or(kv_blocks::ROOT);
            let hash = kv_blocks::chain(
                parent,
                &tokens[i * self.block_tokens..(i + 1) * self.block_tokens],
            );
            seq.hashes.push(hash);
            let id = seq.table[i];
            // Another sequence may have computed the same prefix first: its block stays the
            // cache's copy and ours is freed when we end.
            if self.meta[id as usize].hash.is_none() && !self.by_hash.contains_key(&hash) {
                self.by_hash.insert(hash, id);
                self.meta[id as usize].hash = Some(hash);
                self.pending.stored.push(hash);
            }
        }
    }

    /// A sequence ended: its blocks are released, named ones into the cache (its last blocks
    /// first in the eviction order, so a prefix outlives its extensions), others freed.
    pub fn release(&mut self, seq: SeqBlocks) {
        for &id in seq.table.iter().rev() {
            let meta = &mut self.meta[id as usize];
            meta.refs = meta.refs.saturating_sub(1);
            if meta.refs > 0 {
                continue;
            }
            if meta.hash.is_some() {
                self.clock += 1;
                meta.released_at = self.clock;
                self.lru.insert((self.clock, id));
            } else {
                self.free.push(id);
            }
        }
    }

    /// The changes to the set of named blocks since the last call.
    pub fn take_events(&mut self) -> KvBatch {
        std::mem::take(&mut self.pending)
    }

    pub fn stats(&self) -> PrefixCacheStats {
        PrefixCacheStats {
            cached_blocks: self.lru.len() as u64,
            active_blocks: self.active_blocks() as u64,
            free_blocks: self.free.len() as u64,
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    /// Runs a sequence to the end: admitted, all of `context` + `generated` computed, released.
    fn serve(cache: &mut PrefixCache, context: &[u32], generated: usize) -> usize {
        let mut seq = cache
            .admit(context, context.len() + generated, Reuse::Cached)
            .expect("room");
        let mut all = context.to_vec();
        all.extend((0..generated as u32).map(|i| 90_000 + i));
        cache.commit(&mut seq.blocks, &all, all.len());
        cache.release(seq.blocks);
        seq.cached_tokens
    }

    #[test]
    fn a_later_request_reuses_the_full_blocks_of_an_earlier_one() {
        let mut cache = PrefixCache::new(16, 4, true);
        let turn1 = tokens(10, 1);
        assert_eq!(serve(&mut cache, &turn1, 3), 0);
        // Turn 2 resends turn 1's context and its 3 generated ids, then more.
        let mut turn2 = turn1.clone();
        turn2.extend([90_000, 90_001, 90_002, 5, 6, 7, 8]);
        assert_eq!(
            serve(&mut cache, &turn2, 2),
            12,
            "three full blocks of turn 1"
        );
        let events = cache.take_events();
        assert!(events.removed.is_empty());
        assert_eq!(
            events.stored.len(),
            4,
            "turn 1's 3 blocks, then turn 2's 1 new one"
        );
        let stats = cache.stats();
        assert_eq!((stats.lookups, stats.hit_tokens), (2, 12));
        assert_eq!(stats.lookup_tokens, 10 + 17);
    }

    #[test]
    fn the_last_context_token_is_always_computed() {
        let mut cache = PrefixCache::new(8, 4, true);
        let prompt = tokens(8, 3);
        serve(&mut cache, &prompt, 0);
        // The same 8 tokens again: only the first block may be reused (the last token's
        // logits are needed).
        assert_eq!(serve(&mut cache, &prompt, 1), 4);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_blocks_and_admission_never_fails_for_room() {
        let mut cache = PrefixCache::new(4, 4, true);
        let a = tokens(9, 1);
        let b = tokens(9, 2);
        serve(&mut cache, &a, 0); // 3 blocks, 2 named
        cache.take_events();
        // b needs 3 blocks: 1 free + 2 evicted (all of a's cached ones).
        serve(&mut cache, &b, 0);
        let events = cache.take_events();
        assert_eq!(
            events.removed.len(),
            1,
            "only as many as needed: {events:?}"
        );
        assert_eq!(cache.stats().evictions, 1);
        // A request needing the whole store is admitted by evicting everything cached.
        let big = cache
            .admit(&tokens(16, 5), 16, Reuse::Cached)
            .expect("the store fits it");
        assert_eq!(big.blocks.table.len(), 4);
        assert_eq!(cache.stats().cached_blocks, 0);
        // Nothing else fits while it runs.
        assert!(cache.admit(&tokens(2, 6), 2, Reuse::Cached).is_none());
        cache.release(big.blocks);
        assert_eq!(cache.stats().free_blocks, 4);
    }

    #[test]
    fn an_active_prefix_is_shared_and_never_evicted() {
        let mut cache = PrefixCache::new(4, 4, true);
        let prompt = tokens(9, 4);
        let mut first = cache.admit(&prompt, 12, Reuse::Cached).unwrap();
        cache.commit(&mut first.blocks, &prompt, 9);
        // A second request with the same prompt shares the two named blocks while the
        // first runs.
        let second = cache.admit(&prompt, 12, Reuse::Cached).unwrap();
        assert_eq!(second.cached_tokens, 8);
        assert_eq!(&second.blocks.table[..2], &first.blocks.table[..2]);
        assert_eq!(cache.active_blocks(), 4);
        // No room for anything else: the shared blocks are active, not evictable.
        assert!(cache.admit(&tokens(2, 9), 2, Reuse::Cached).is_none());
        cache.release(first.blocks);
        cache.release(second.blocks);
        assert_eq!(cache.stats().cached_blocks, 2);
    }

    #[test]
    fn a_sequence_admitted_without_reuse_computes_its_whole_context() {
        let mut cache = PrefixCache::new(8, 4, true);
        let prompt = tokens(9, 4);
        let mut first = cache.admit(&prompt, 12, Reuse::Cached).unwrap();
        cache.commit(&mut first.blocks, &prompt, 9);
        cache.release(first.blocks);
        let lookups = cache.stats().lookups;
        let scored = cache.admit(&prompt, 12, Reuse::None).unwrap();
        assert_eq!(scored.cached_tokens, 0);
        assert!(
            scored
                .blocks
                .table
                .iter()
                .all(|id| !first_ids(&cache).contains(id)),
            "no cached block is handed out"
        );
        assert_eq!(cache.stats().lookups, lookups, "not a lookup");
    }

    /// The blocks the cache holds named.
    fn first_ids(cache: &PrefixCache) -> Vec<u32> {
        cache.by_hash.values().copied().collect()
    }

    #[test]
    fn turned_off_it_neither_looks_up_nor_names_blocks() {
        let mut cache = PrefixCache::new(8, 4, false);
        let prompt = tokens(9, 1);
        serve(&mut cache, &prompt, 0);
        assert_eq!(serve(&mut cache, &prompt, 0), 0);
        assert!(cache.take_events().is_empty());
        assert_eq!(cache.stats().free_blocks, 8);
        assert_eq!(cache.stats().lookups, 0);
    }
}
