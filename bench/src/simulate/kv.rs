//! KV blocks in the simulator: each simulated GPU worker's prefix cache ([`BlockCache`], LRU
//! eviction of blocks no running sequence holds, as the native engine's `kv_cache.rs`), and the
//! router's picture of those caches ([`RouterKvView`]), built only from what the workers
//! publish — a block stored once its prefill is done, a block removed when evicted — the way
//! the live router's prefix index follows `KvEvents`.
//!
//! Granularity: the traces name prompt blocks of 512 tokens (Mooncake `hash_ids`, chained: an
//! id stands for the whole prefix ending with its block). The engine's blocks are 32 tokens, so
//! one trace block is 16 engine blocks that are always stored, hit and evicted together. Only
//! full trace blocks are cached: a prompt's partial last block is held while the sequence runs
//! but not kept (the trace gives the next turn a new id for it, so whatever of it the engine
//! could reuse — at most 511 tokens a turn — is not counted: conservative).

use std::collections::{BTreeMap, HashMap};

/// Tokens per trace block.
pub const TRACE_BLOCK_TOKENS: u32 = 512;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Running sequences holding the block.
    refs: u32,
    /// Its prefill is done: it can be reused (and has been published).
    ready: bool,
    /// Position in the LRU order while unreferenced.
    tick: u64,
}

/// A worker's KV store in trace blocks: named prompt blocks (cached or held by running
/// sequences) plus anonymous blocks (partial prompt blocks and generated tokens of running
/// sequences). Unreferenced named blocks are evicted least recently used first, only when room
/// is needed; a block a running sequence holds is never evicted.
#[derive(Debug, Default)]
pub struct BlockCache {
    capacity: usize,
    blocks: HashMap<u64, Entry>,
    /// Unreferenced blocks by the tick they were last released at (oldest first).
    lru: BTreeMap<u64, u64>,
    anonymous: usize,
    tick: u64,
    /// Blocks evicted so far.
    pub evicted: u64,
    /// Sequences admitted although running sequences already held every block (the engine
    /// would have made them wait; the simulator admits them and counts them here).
    pub overcommitted: u64,
}

impl BlockCache {
    /// A store of `capacity` trace blocks (0: no prefix cache and no KV accounting).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    /// Blocks in use: named (cached or held) and anonymous.
    pub fn used(&self) -> usize {
        self.blocks.len() + self.anonymous
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// Admits a sequence whose prompt's full blocks are `prompt` and which needs `anonymous`
    /// more blocks: holds every block of `prompt` (new ones are stored unready), evicting
    /// unreferenced blocks as needed (their names are pushed to `evicted`). Returns the leading
    /// blocks of `prompt` that were already cached and ready: what the engine reuses.
    pub fn acquire(&mut self, prompt: &[u64], anonymous: usize, evicted: &mut Vec<u64>) -> u32 {
        if !self.enabled() {
            return 0;
        }
        let hits = prompt
            .iter()
            .take_while(|h| self.blocks.get(h).is_some_and(|e| e.ready))
            .count() as u32;
        let mut new = 0;
        for h in prompt {
            match self.blocks.get_mut(h) {
                Some(e) => {
                    if e.refs == 0 {
                        self.lru.remove(&e.tick);
                    }
                    e.refs += 1;
                }
                None => new += 1,
            }
        }
        let needed = new + anonymous;
        while self.used() + needed > self.capacity {
            let Some((_, victim)) = self.lru.pop_first() else {
                self.overcommitted += 1;
                break;
            };
            self.blocks.remove(&victim);
            self.evicted += 1;
            evicted.push(victim);
        }
        for &h in prompt {
            self.blocks.entry(h).or_insert(Entry {
                refs: 1,
                ready: false,
                tick: 0,
            });
        }
        self.anonymous += anonymous;
        hits
    }

    /// The sequence's prefill is done: its blocks can be reused. Pushes the blocks that became
    /// ready (the worker publishes them as stored) to `stored`.
    pub fn prefilled(&mut self, prompt: &[u64], stored: &mut Vec<u64>) {
        for h in prompt {
            if let Some(e) = self.blocks.get_mut(h)
                && !e.ready
            {
                e.ready = true;
                stored.push(*h);
            }
        }
    }

    /// The sequence ended: its anonymous blocks are freed, its prompt blocks stay cached
    /// (most recently used) once no other sequence holds them. A block that never became ready
    /// (the sequence ended before its prefill) is dropped.
    pub fn release(&mut self, prompt: &[u64], anonymous: usize) {
        if !self.enabled() {
            return;
        }
        self.anonymous -= anonymous;
        for h in prompt {
            let Some(e) = self.blocks.get_mut(h) else {
                continue;
            };
            e.refs -= 1;
            if e.refs == 0 {
                if !e.ready {
                    self.blocks.remove(h);
                    continue;
                }
                self.tick += 1;
                e.tick = self.tick;
                self.lru.insert(self.tick, *h);
            }
        }
    }
}

/// The router's index of published blocks: block → workers holding it (sorted view indices).
#[derive(Debug, Default)]
pub struct RouterKvView {
    holders: HashMap<u64, Vec<u32>>,
    /// Workers a lookup reports at most (the live index's `max_hits`).
    max_hits: usize,
}

impl RouterKvView {
    pub fn new(max_hits: usize) -> Self {
        Self {
            holders: HashMap::new(),
            max_hits,
        }
    }

    pub fn stored(&mut self, worker: u32, hash: u64) {
        let list = self.holders.entry(hash).or_default();
        if let Err(at) = list.binary_search(&worker) {
            list.insert(at, worker);
        }
    }

    pub fn removed(&mut self, worker: u32, hash: u64) {
        if let Some(list) = self.holders.get_mut(&hash) {
            if let Ok(at) = list.binary_search(&worker) {
                list.remove(at);
            }
            if list.is_empty() {
                self.holders.remove(&hash);
            }
        }
    }

    /// Workers holding a prefix of `prompt` (its full blocks, in order) with the leading
    /// tokens each holds, longest first, at most `max_hits`: what `RequestInfo.prefix` gets.
    pub fn lookup(&self, prompt: &[u64], out: &mut Vec<(usize, u32)>) {
        out.clear();
        let Some(first) = prompt.first().and_then(|h| self.holders.get(h)) else {
            return;
        };
        // (worker, leading blocks held), still running while it holds every block so far.
        let mut live: Vec<u32> = first.clone();
        let mut ended: Vec<(usize, u32)> = Vec::new();
        let mut depth = 1u32;
        for h in &prompt[1..] {
            let Some(next) = self.holders.get(h) else {
                break;
            };
            live.retain(|w| {
                let keep = next.binary_search(w).is_ok();
                if !keep {
                    ended.push((*w as usize, depth));
                }
                keep
            });
            if live.is_empty() {
                break;
            }
            depth += 1;
        }
        out.extend(live.iter().map(|&w| (w as usize, depth)));
        out.extend(ended);
        out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(self.max_hits);
        for hit in out.iter_mut() {
            hit.1 *= TRACE_BLOCK_TOKENS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acquires and finishes a sequence at once (prefill done, released).
    fn serve(cache: &mut BlockCache, prompt: &[u64]) -> (u32, Vec<u64>) {
        let mut evicted = Vec::new();
        let hits = cache.acquire(prompt, 0, &mut evicted);
        cache.prefilled(prompt, &mut Vec::new());
        cache.release(prompt, 0);
        (hits, evicted)
    }

    #[test]
    fn least_recently_used_blocks_go_first() {
        let mut cache = BlockCache::new(4);
        serve(&mut cache, &[1, 2]);
        serve(&mut cache, &[3, 4]);
        // Reusing 1 and 2 makes 3 and 4 the least recently used.
        assert_eq!(serve(&mut cache, &[1, 2]).0, 2);
        let (hits, evicted) = serve(&mut cache, &[5, 6]);
        assert_eq!(hits, 0);
        assert_eq!(evicted, vec![3, 4]);
        assert!(cache.contains(1) && cache.contains(2));
        assert_eq!(serve(&mut cache, &[1, 2]).0, 2);
        assert_eq!(cache.evicted, 2);
    }

    #[test]
    fn a_running_sequence_keeps_its_blocks_under_pressure() {
        let mut cache = BlockCache::new(4);
        serve(&mut cache, &[9]);
        let mut evicted = Vec::new();
        // A long-running sequence holds 1 and 2.
        cache.acquire(&[1, 2], 0, &mut evicted);
        cache.prefilled(&[1, 2], &mut Vec::new());
        // Others come and go, needing room: only unheld blocks are evicted.
        for k in 0..5u64 {
            let prompt = [100 + 2 * k, 101 + 2 * k];
            cache.acquire(&prompt, 0, &mut evicted);
            cache.prefilled(&prompt, &mut Vec::new());
            cache.release(&prompt, 0);
        }
        assert!(
            !evicted.contains(&1) && !evicted.contains(&2),
            "{evicted:?}"
        );
        assert_eq!(evicted[0], 9, "the oldest unheld block goes first");
        assert!(cache.contains(1) && cache.contains(2));
        // When it ends, its blocks are cached and reused.
        cache.release(&[1, 2], 0);
        assert_eq!(serve(&mut cache, &[1, 2, 3]).0, 2);
        assert_eq!(cache.overcommitted, 0);
    }

    #[test]
    fn blocks_being_prefilled_are_not_reused_yet_and_full_stores_overcommit() {
        let mut cache = BlockCache::new(3);
        let mut evicted = Vec::new();
        assert_eq!(cache.acquire(&[1, 2], 1, &mut evicted), 0);
        // A second sequence with the same prompt while the first is still prefilling.
        assert_eq!(cache.acquire(&[1, 2], 0, &mut evicted), 0);
        let mut stored = Vec::new();
        cache.prefilled(&[1, 2], &mut stored);
        cache.prefilled(&[1, 2], &mut stored);
        assert_eq!(stored, vec![1, 2], "published once");
        // Everything held: a newcomer cannot evict anything.
        cache.acquire(&[7], 0, &mut evicted);
        assert!(evicted.is_empty());
        assert_eq!(cache.overcommitted, 1);
        cache.release(&[1, 2], 1);
        cache.release(&[1, 2], 0);
        assert_eq!(cache.used(), 3);
    }

    #[test]
    fn the_router_view_reports_leading_runs_per_worker() {
        let mut view = RouterKvView::new(16);
        for h in [1, 2, 3] {
            view.stored(0, h);
        }
        for h in [1, 2] {
            view.stored(1, h);
        }
        view.stored(2, 2); // not a prefix: block 1 missing
        let mut out = Vec::new();
        view.lookup(&[1, 2, 3, 4], &mut out);
        assert_eq!(out, vec![(0, 3 * 512), (1, 2 * 512)]);
        view.removed(0, 2);
        view.lookup(&[1, 2, 3, 4], &mut out);
        assert_eq!(out, vec![(1, 2 * 512), (0, 512)]);
        view.lookup(&[5], &mut out);
        assert!(out.is_empty());
    }
}
