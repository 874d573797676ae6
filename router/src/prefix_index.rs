//! The router's picture of the workers' prefix caches, built from their `KvEvents` frames:
//! which worker holds which KV block (blocks are named by the chained hash of
//! `switchyard_proto::kv_blocks`), so a request can be placed where its prompt's longest prefix
//! is already computed.
//!
//! - One table per block size (`block_tokens` comes with every frame; never assumed): block
//!   hash → the sorted slots of the workers holding it.
//! - Bounded: at most `max_blocks_per_worker` blocks per worker and `max_entries` (worker,
//!   block) pairs in all. When a bound is hit the worker's oldest entries go first (store
//!   order); at the global bound, the worker holding the most entries gives up its oldest.
//!   Forgetting a block only makes a prediction conservative: the worker may still hold it.
//! - A snapshot (or `cleared`) replaces everything known of the worker; a worker whose link
//!   drops or that leaves the membership is forgotten ([`PrefixIndex::remove_worker`]), and
//!   rebuilds from the snapshot its next stream opens with. Frames name the stream they came
//!   on: a worker's blocks belong to the stream whose snapshot announced them, so a closed
//!   stream's late frames (or its removal) never touch what a newer stream published.
//! - [`PrefixIndex::lookup`] walks the prompt's blocks in order and reports, for the workers
//!   holding its longest prefixes, the run of leading blocks each holds, as tokens.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use smallvec::SmallVec;

use switchyard_proto::kv_blocks;
use switchyard_proto::v1;

/// Bounds of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixIndexConfig {
    /// Blocks remembered per worker.
    pub max_blocks_per_worker: usize,
    /// (worker, block) pairs remembered in all.
    pub max_entries: usize,
    /// Workers a lookup reports at most (those with the longest cached prefixes).
    pub max_hits: usize,
}

impl Default for PrefixIndexConfig {
    fn default() -> Self {
        Self {
            // 64 Ki blocks of 32 tokens: 2 M tokens of KV per worker.
            max_blocks_per_worker: 1 << 16,
            // ~8 M pairs: about 0.65 GiB at the measured ~82 bytes a pair (README, Routing).
            max_entries: 1 << 23,
            max_hits: 16,
        }
    }
}

/// One worker's cached prefix for a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixHit {
    pub worker: Arc<str>,
    /// Leading prompt tokens whose KV the worker holds (whole blocks).
    pub cached_tokens: u32,
}

/// Why a frame was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvEventsError {
    #[error("unknown KV hash scheme {0:?} (this router speaks {HASH:?})", HASH = kv_blocks::HASH_SCHEME)]
    UnknownScheme(String),
    #[error("KvEvents.block_tokens must be positive")]
    NoBlockSize,
}

/// Sizes of the index, for metrics and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixIndexStats {
    pub workers: usize,
    /// Distinct blocks known.
    pub blocks: usize,
    /// (worker, block) pairs.
    pub entries: usize,
    /// Heap bytes held by the index (capacities of its maps, lists and queues).
    pub bytes: usize,
}

/// Slots of the workers holding a block, sorted ascending. Most blocks (a conversation's) are
/// held by one or a few workers: those lists live inline in the map, so a lookup touches no
/// other memory — the walk is a chain of dependent cache misses, one per block.
type Holders = SmallVec<[u32; 4]>;

/// The index's maps. Block names are public, seedless hashes of prompt text: a per-process
/// seeded hasher keeps crafted prompts from piling names into one bucket, and foldhash is
/// several times cheaper than the standard SipHash on the request path.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Blocks of one size.
#[derive(Debug, Default)]
struct Table {
    block_tokens: u32,
    /// Block hash → the workers holding it.
    holders: Map<u64, Holders>,
}

#[derive(Debug)]
struct WorkerBlocks {
    id: Arc<str>,
    /// The stream whose frames these are.
    stream: u64,
    /// Index into `tables` of the block size this worker publishes.
    table: usize,
    /// Blocks in the order they were stored. Removed blocks stay until popped or compacted
    /// (`live` counts the ones still held).
    order: VecDeque<u64>,
    live: usize,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct PrefixIndex {
    config: PrefixIndexConfig,
    tables: Vec<Table>,
    slots: Vec<Option<WorkerBlocks>>,
    free_slots: Vec<u32>,
    by_id: Map<Arc<str>, u32>,
    entries: usize,
}

impl PrefixIndex {
    pub fn new(config: PrefixIndexConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    pub fn config(&self) -> PrefixIndexConfig {
        self.config
    }

    /// Applies one `KvEvents` frame that `worker` sent on `stream`: `cleared` (or `snapshot`)
    /// first, then `removed`, then `stored`. A frame in an unknown hash scheme changes nothing;
    /// so does an incremental frame of another stream than the one whose snapshot is in force.
    pub fn apply(
        &mut self,
        worker: &str,
        stream: u64,
        events: &v1::KvEvents,
    ) -> Result<(), KvEventsError> {
        if events.hash_scheme != kv_blocks::HASH_SCHEME {
            return Err(KvEventsError::UnknownScheme(events.hash_scheme.clone()));
        }
        if events.block_tokens == 0 {
            return Err(KvEventsError::NoBlockSize);
        }
        let known = self
            .by_id
            .get(worker)
            .and_then(|&s| self.slots[s as usize].as_ref())
            .map(|w| w.stream);
        if known.is_some_and(|s| s != stream) && !events.snapshot {
            return Ok(());
        }
        let table = self.table_for(events.block_tokens);
        let slot = self.slot_for(worker, table);
        let w = self.worker_mut(slot);
        let new_stream = w.stream != stream;
        w.stream = stream;
        if events.snapshot || events.cleared || new_stream {
            self.clear_slot(slot);
        }
        for &hash in &events.removed {
            self.unhold(slot, hash);
        }
        for &hash in &events.stored {
            self.store(slot, hash);
        }
        self.compact(slot);
        Ok(())
    }

    /// Forgets everything `worker` published on `stream` (nothing if a newer stream's
    /// snapshot replaced it).
    pub fn remove_worker(&mut self, worker: &str, stream: u64) {
        let Some(&slot) = self.by_id.get(worker) else {
            return;
        };
        if self.worker(slot).stream != stream {
            return;
        }
        self.by_id.remove(worker);
        self.clear_slot(slot);
        self.slots[slot as usize] = None;
        self.free_slots.push(slot);
    }

    /// Workers holding a prefix of `prompt` (token ids, chat template applied), longest first,
    /// at most `max_hits` of them, with the leading tokens each holds.
    pub fn lookup(&self, prompt: &[u32]) -> Vec<PrefixHit> {
        let mut runs: Vec<(u32, u32)> = Vec::new(); // (slot, blocks)
        let mut hits = Vec::new();
        for table in &self.tables {
            if table.holders.is_empty() || table.block_tokens == 0 {
                continue;
            }
            runs.clear();
            longest_runs(table, prompt, self.config.max_hits, &mut runs);
            if runs.is_empty() {
                continue;
            }
            let keep = self.config.max_hits.min(runs.len());
            if keep < runs.len() {
                runs.select_nth_unstable_by(keep, |a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                runs.truncate(keep);
            }
            for &(slot, blocks) in &runs {
                if let Some(w) = &self.slots[slot as usize] {
                    hits.push(PrefixHit {
                        worker: w.id.clone(),
                        cached_tokens: blocks.saturating_mul(table.block_tokens),
                    });
                }
            }
        }
        hits.sort_by(|a, b| {
            b.cached_tokens
                .cmp(&a.cached_tokens)
                .then_with(|| a.worker.cmp(&b.worker))
        });
        hits.truncate(self.config.max_hits);
        hits
    }

    /// Whether `worker` has published anything (its link is up and sent a snapshot).
    pub fn knows(&self, worker: &str) -> bool {
        self.by_id.contains_key(worker)
    }

    /// Blocks known for `worker`.
    pub fn blocks_of(&self, worker: &str) -> usize {
        self.by_id
            .get(worker)
            .and_then(|&s| self.slots[s as usize].as_ref())
            .map_or(0, |w| w.live)
    }

    /// Counts and heap bytes (walks every list: for metrics scrapes and benchmarks, not the
    /// request path).
    pub fn stats(&self) -> PrefixIndexStats {
        use std::mem::size_of;
        let mut bytes = 0;
        let mut blocks = 0;
        for table in &self.tables {
            blocks += table.holders.len();
            // hashbrown: one control byte per bucket besides the (key, value) pair.
            bytes += table.holders.capacity() * (size_of::<(u64, Holders)>() + 1);
            bytes += table
                .holders
                .values()
                .filter(|v| v.spilled())
                .map(|v| v.capacity() * size_of::<u32>())
                .sum::<usize>();
        }
        let mut workers = 0;
        for w in self.slots.iter().flatten() {
            workers += 1;
            bytes += w.order.capacity() * size_of::<u64>() + w.id.len();
        }
        bytes += self.slots.capacity() * size_of::<Option<WorkerBlocks>>();
        bytes += self.by_id.capacity() * (size_of::<(Arc<str>, u32)>() + 1);
        PrefixIndexStats {
            workers,
            blocks,
            entries: self.entries,
            bytes,
        }
    }

    fn table_for(&mut self, block_tokens: u32) -> usize {
        match self
            .tables
            .iter()
            .position(|t| t.block_tokens == block_tokens)
        {
            Some(t) => t,
            None => {
                self.tables.push(Table {
                    block_tokens,
                    holders: Map::default(),
                });
                self.tables.len() - 1
            }
        }
    }

    /// The worker's slot, in table `table` (a worker that changed its block size starts over).
    fn slot_for(&mut self, worker: &str, table: usize) -> u32 {
        if let Some(&slot) = self.by_id.get(worker) {
            let moved = self.slots[slot as usize]
                .as_ref()
                .is_some_and(|w| w.table != table);
            if moved {
                self.clear_slot(slot);
                if let Some(w) = self.slots[slot as usize].as_mut() {
                    w.table = table;
                }
            }
            return slot;
        }
        let id: Arc<str> = Arc::from(worker);
        let entry = WorkerBlocks {
            id: id.clone(),
            // Set by the caller.
            stream: 0,
            table,
            order: VecDeque::new(),
            live: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_id.insert(id, slot);
        slot
    }

    fn worker(&self, slot: u32) -> &WorkerBlocks {
        self.slots[slot as usize]
            .as_ref()
            .expect("a slot in use has a worker")
    }

    fn worker_mut(&mut self, slot: u32) -> &mut WorkerBlocks {
        self.slots[slot as usize]
            .as_mut()
            .expect("a slot in use has a worker")
    }

    fn clear_slot(&mut self, slot: u32) {
        let Some(w) = self.slots[slot as usize].as_mut() else {
            return;
        };
        let order = std::mem::take(&mut w.order);
        let table = w.table;
        w.live = 0;
        let holders = &mut self.tables[table].holders;
        for hash in order {
            if remove_holder(holders, hash, slot) {
                self.entries -= 1;
            }
        }
    }

    /// Drops `hash` from the worker's blocks (its `order` entry goes at the next compaction).
    fn unhold(&mut self, slot: u32, hash: u64) {
        let table = self.worker(slot).table;
        if remove_holder(&mut self.tables[table].holders, hash, slot) {
            self.entries -= 1;
            self.worker_mut(slot).live -= 1;
        }
    }

    fn store(&mut self, slot: u32, hash: u64) {
        let table = self.worker(slot).table;
        let list = self.tables[table].holders.entry(hash).or_default();
        let Err(at) = list.binary_search(&slot) else {
            return; // already held
        };
        list.insert(at, slot);
        self.entries += 1;
        let w = self.worker_mut(slot);
        w.order.push_back(hash);
        w.live += 1;
        if w.live > self.config.max_blocks_per_worker {
            self.evict_oldest(slot);
        }
        if self.entries > self.config.max_entries {
            // The worker holding the most entries gives up its oldest.
            let largest = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(s, w)| w.as_ref().map(|w| (w.live, s as u32)))
                .max()
                .map(|(_, s)| s)
                .unwrap_or(slot);
            self.evict_oldest(largest);
        }
    }

    /// Forgets the worker's oldest block still held.
    fn evict_oldest(&mut self, slot: u32) {
        let table = self.worker(slot).table;
        while let Some(hash) = self.worker_mut(slot).order.pop_front() {
            if remove_holder(&mut self.tables[table].holders, hash, slot) {
                self.entries -= 1;
                self.worker_mut(slot).live -= 1;
                return;
            }
        }
    }

    /// Drops `order` entries of removed blocks once they outnumber the held ones (a block
    /// removed and stored again keeps only its latest position).
    fn compact(&mut self, slot: u32) {
        let Some(w) = self.slots[slot as usize].as_mut() else {
            return;
        };
        if w.order.len() <= 2 * w.live + 64 {
            return;
        }
        let order = std::mem::take(&mut w.order);
        let holders = &self.tables[w.table].holders;
        let mut seen = std::collections::HashSet::with_capacity(w.live);
        let mut kept: Vec<u64> = order
            .into_iter()
            .rev()
            .filter(|h| {
                holders
                    .get(h)
                    .is_some_and(|l| l.binary_search(&slot).is_ok())
                    && seen.insert(*h)
            })
            .collect();
        kept.reverse();
        w.order = kept.into();
    }
}

/// Removes `slot` from `hash`'s holders; whether it was there.
fn remove_holder(holders: &mut Map<u64, Holders>, hash: u64, slot: u32) -> bool {
    let Some(list) = holders.get_mut(&hash) else {
        return false;
    };
    let Ok(at) = list.binary_search(&slot) else {
        return false;
    };
    list.remove(at);
    if list.is_empty() {
        holders.remove(&hash);
    }
    true
}

/// Every worker holding the prompt's first block, with the length of the run of leading
/// blocks it holds: candidates shrink block by block (sorted-list intersection; an unchanged
/// holder list is recognised by one comparison), and the walk stops at the first block nobody
/// of them holds. Once one candidate is left (past a shared system prompt, a conversation is
/// usually on one worker), its run's end is found by galloping over the remaining blocks'
/// names instead of looking each up: a worker's cached blocks form whole prefixes (the
/// engine reuses a chain only up to its first missing block and evicts tails first).
fn longest_runs(table: &Table, prompt: &[u32], max_hits: usize, runs: &mut Vec<(u32, u32)>) {
    let mut candidates: Holders = Holders::new();
    let mut next: Holders = Holders::new();
    let mut parent = kv_blocks::ROOT;
    let mut depth = 0u32;
    let mut blocks = prompt.chunks_exact(table.block_tokens as usize);
    for block in blocks.by_ref() {
        parent = kv_blocks::chain(parent, block);
        let Some(holders) = table.holders.get(&parent) else {
            break;
        };
        if depth == 0 {
            candidates.extend_from_slice(holders);
        } else if holders.as_slice() != candidates.as_slice() {
            intersect(&candidates, holders, &mut next);
            // Runs ending here all have this length: only the `max_hits` lowest slots among
            // them can make the cut (ties go to the lowest slot), so a prefix shared by
            // thousands of workers does not record thousands of runs.
            let mut continuing = next.iter().peekable();
            let ended = candidates.iter().filter(|&&c| {
                while continuing.next_if(|&&n| n < c).is_some() {}
                continuing.next_if_eq(&&c).is_none()
            });
            runs.extend(ended.take(max_hits).map(|&c| (c, depth)));
            std::mem::swap(&mut candidates, &mut next);
            if candidates.is_empty() {
                return;
            }
        }
        depth += 1;
        if let [only] = candidates[..] {
            let rest: Vec<u64> = blocks
                .map(|block| {
                    parent = kv_blocks::chain(parent, block);
                    parent
                })
                .collect();
            let holds = |hash: &u64| {
                table
                    .holders
                    .get(hash)
                    .is_some_and(|l| l.binary_search(&only).is_ok())
            };
            runs.push((only, depth + held_run(&rest, holds) as u32));
            return;
        }
    }
    runs.extend(candidates.iter().take(max_hits).map(|&c| (c, depth)));
}

/// `out` = the slots in both sorted lists. Where a shared prefix diverges, the deeper block's
/// holders are usually far fewer than the candidates (one worker's conversation after a system
/// prompt every worker holds): then each holder is found by binary search instead of walking
/// every candidate.
fn intersect(candidates: &[u32], holders: &[u32], out: &mut Holders) {
    out.clear();
    if holders.len().saturating_mul(16) < candidates.len() {
        let mut rest = candidates;
        for &h in holders {
            match rest.binary_search(&h) {
                Ok(at) => {
                    out.push(h);
                    rest = &rest[at + 1..];
                }
                Err(at) => rest = &rest[at..],
            }
        }
        return;
    }
    let mut j = 0;
    for &c in candidates {
        while j < holders.len() && holders[j] < c {
            j += 1;
        }
        if j < holders.len() && holders[j] == c {
            out.push(c);
        }
    }
}

/// Length of the leading run of `names` for which `holds` is true, given that it is true for
/// a prefix of them and false after (galloping, then binary search: O(log run) probes).
fn held_run(names: &[u64], holds: impl Fn(&u64) -> bool) -> usize {
    // Find a bound `hi` with holds(names[hi]) false (or the end), doubling from the start.
    let (mut lo, mut step) = (0usize, 1usize);
    let mut hi = names.len();
    while lo + step <= names.len() {
        if holds(&names[lo + step - 1]) {
            lo += step;
            step *= 2;
        } else {
            hi = lo + step - 1;
            break;
        }
    }
    // names[..lo] are held; names[hi] (if any) is not: binary search in between.
    names[lo..hi].partition_point(&holds) + lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn galloping_finds_every_run_length() {
        for len in 0..70u64 {
            let names: Vec<u64> = (0..len).collect();
            for run in 0..=len {
                assert_eq!(
                    held_run(&names, |&n| n < run),
                    run as usize,
                    "{run} of {len}"
                );
            }
        }
    }

    const BT: u32 = 4;

    fn frame(snapshot: bool, stored: Vec<u64>, removed: Vec<u64>) -> v1::KvEvents {
        v1::KvEvents {
            block_tokens: BT,
            hash_scheme: kv_blocks::HASH_SCHEME.into(),
            snapshot,
            cleared: false,
            stored,
            removed,
        }
    }

    fn prompt(len: u32, salt: u32) -> Vec<u32> {
        (0..len).map(|i| i * 7 + salt).collect()
    }

    fn hashes(p: &[u32]) -> Vec<u64> {
        kv_blocks::block_hashes(p, BT as usize)
    }

    fn cached(index: &PrefixIndex, p: &[u32]) -> Vec<(String, u32)> {
        index
            .lookup(p)
            .into_iter()
            .map(|h| (h.worker.to_string(), h.cached_tokens))
            .collect()
    }

    #[test]
    fn lookup_reports_the_longest_run_of_leading_blocks_per_worker() {
        let mut index = PrefixIndex::new(PrefixIndexConfig::default());
        let p = prompt(22, 1); // 5 full blocks and 2 tokens
        let h = hashes(&p);
        index
            .apply("a", 1, &frame(true, h[..3].to_vec(), vec![]))
            .unwrap();
        // b holds blocks 0, 1 and 3: only the first two are a run.
        index
            .apply("b", 1, &frame(true, vec![h[0], h[1], h[3]], vec![]))
            .unwrap();
        // c holds the whole prompt.
        index
            .apply("c", 1, &frame(true, h.clone(), vec![]))
            .unwrap();
        // d holds a later block only: no prefix at all.
        index
            .apply("d", 1, &frame(true, vec![h[2]], vec![]))
            .unwrap();
        assert_eq!(
            cached(&index, &p),
            vec![("c".into(), 20), ("a".into(), 12), ("b".into(), 8)]
        );
        // A prompt that diverges after block 1 matches two blocks at most.
        let mut other = p.clone();
        other[9] = 999;
        assert_eq!(
            cached(&index, &other),
            vec![("a".into(), 8), ("b".into(), 8), ("c".into(), 8)]
        );
        assert!(index.lookup(&prompt(22, 2)).is_empty());
        assert!(index.lookup(&p[..3]).is_empty(), "no full block, no hit");
    }

    #[test]
    fn a_snapshot_replaces_what_was_known_and_removal_forgets_the_worker() {
        let mut index = PrefixIndex::new(PrefixIndexConfig::default());
        let (p, q) = (prompt(8, 1), prompt(8, 2));
        index
            .apply("a", 1, &frame(true, hashes(&p), vec![]))
            .unwrap();
        assert_eq!(cached(&index, &p), vec![("a".into(), 8)]);
        // Incremental: remove p's second block, store q's.
        index
            .apply("a", 1, &frame(false, hashes(&q), vec![hashes(&p)[1]]))
            .unwrap();
        assert_eq!(cached(&index, &p), vec![("a".into(), 4)]);
        assert_eq!(cached(&index, &q), vec![("a".into(), 8)]);
        // A new snapshot (e.g. after the worker restarted) replaces everything.
        index
            .apply("a", 1, &frame(true, hashes(&q)[..1].to_vec(), vec![]))
            .unwrap();
        assert!(index.lookup(&p).is_empty());
        assert_eq!(cached(&index, &q), vec![("a".into(), 4)]);
        assert_eq!(index.stats().entries, 1);
        index.remove_worker("a", 1);
        assert!(index.lookup(&q).is_empty());
        assert_eq!(index.stats().entries, 0);
        assert_eq!(index.stats().blocks, 0);
        assert!(!index.knows("a"));
    }

    #[test]
    fn a_newer_stream_owns_the_worker_s_blocks() {
        let mut index = PrefixIndex::new(PrefixIndexConfig::default());
        let (p, q) = (prompt(8, 1), prompt(8, 2));
        index
            .apply("a", 1, &frame(true, hashes(&p), vec![]))
            .unwrap();
        // The router reconnected: stream 2's snapshot replaces stream 1's picture.
        index
            .apply("a", 2, &frame(true, hashes(&q), vec![]))
            .unwrap();
        assert!(index.lookup(&p).is_empty());
        // A late incremental frame of stream 1 is ignored, and so is its removal.
        index
            .apply("a", 1, &frame(false, hashes(&p), vec![]))
            .unwrap();
        index.remove_worker("a", 1);
        assert!(index.lookup(&p).is_empty());
        assert_eq!(cached(&index, &q), vec![("a".into(), 8)]);
        index.remove_worker("a", 2);
        assert!(index.lookup(&q).is_empty());
    }

    #[test]
    fn frames_in_an_unknown_scheme_or_without_a_block_size_change_nothing() {
        let mut index = PrefixIndex::new(PrefixIndexConfig::default());
        let p = prompt(8, 1);
        let mut bad = frame(true, hashes(&p), vec![]);
        bad.hash_scheme = "other-v9".into();
        assert!(matches!(
            index.apply("a", 1, &bad),
            Err(KvEventsError::UnknownScheme(_))
        ));
        let mut bad = frame(true, hashes(&p), vec![]);
        bad.block_tokens = 0;
        assert_eq!(index.apply("a", 1, &bad), Err(KvEventsError::NoBlockSize));
        assert!(index.lookup(&p).is_empty());
        assert_eq!(index.stats().entries, 0);
    }

    #[test]
    fn block_sizes_are_kept_apart_and_a_worker_may_change_its_size() {
        let mut index = PrefixIndex::new(PrefixIndexConfig::default());
        let p = prompt(16, 3);
        index
            .apply("four", 1, &frame(true, hashes(&p), vec![]))
            .unwrap();
        let eight = v1::KvEvents {
            block_tokens: 8,
            ..frame(true, kv_blocks::block_hashes(&p, 8), vec![])
        };
        index.apply("eight", 1, &eight).unwrap();
        assert_eq!(
            cached(&index, &p),
            vec![("eight".into(), 16), ("four".into(), 16)]
        );
        // "four" now publishes 8-token blocks: its 4-token ones are gone.
        index
            .apply(
                "four",
                1,
                &v1::KvEvents {
                    stored: vec![],
                    ..eight.clone()
                },
            )
            .unwrap();
        assert_eq!(cached(&index, &p), vec![("eight".into(), 16)]);
    }

    #[test]
    fn bounds_evict_the_oldest_entries() {
        let mut index = PrefixIndex::new(PrefixIndexConfig {
            max_blocks_per_worker: 3,
            max_entries: 5,
            max_hits: 16,
        });
        let p = prompt(20, 1);
        let h = hashes(&p);
        index
            .apply("a", 1, &frame(true, h.clone(), vec![]))
            .unwrap();
        // Only the newest three survive: blocks 2..5, so no leading block is left.
        assert_eq!(index.blocks_of("a"), 3);
        assert!(index.lookup(&p).is_empty());
        // A shorter prompt stored later is kept whole.
        index
            .apply("a", 1, &frame(false, h[..2].to_vec(), vec![]))
            .unwrap();
        assert_eq!(cached(&index, &p), vec![("a".into(), 8)]);
        // The global bound: b's three blocks push the total to 6 > 5; the largest worker
        // (a tie: the higher slot, b) gives up its oldest.
        let q = prompt(12, 2);
        index
            .apply("b", 1, &frame(true, hashes(&q), vec![]))
            .unwrap();
        let stats = index.stats();
        assert_eq!(stats.entries, 5);
        assert_eq!(index.blocks_of("a") + index.blocks_of("b"), 5);
        assert!(stats.bytes > 0);
    }

    #[test]
    fn lookup_reports_at_most_max_hits_longest_first() {
        let mut index = PrefixIndex::new(PrefixIndexConfig {
            max_hits: 2,
            ..PrefixIndexConfig::default()
        });
        let p = prompt(16, 5);
        let h = hashes(&p);
        for (w, n) in [("w1", 1), ("w2", 4), ("w3", 2), ("w4", 3)] {
            index
                .apply(w, 1, &frame(true, h[..n].to_vec(), vec![]))
                .unwrap();
        }
        assert_eq!(
            cached(&index, &p),
            vec![("w2".into(), 16), ("w4".into(), 12)]
        );
    }

    #[test]
    fn a_prefix_shared_by_many_workers_yields_the_longest_then_the_first_registered() {
        let mut index = PrefixIndex::new(PrefixIndexConfig {
            max_hits: 3,
            ..PrefixIndexConfig::default()
        });
        let p = prompt(16, 6);
        let h = hashes(&p);
        // Six workers hold the first two blocks (a shared system prompt); one holds all four.
        for w in ["s0", "s1", "s2", "s3", "s4", "s5"] {
            index
                .apply(w, 1, &frame(true, h[..2].to_vec(), vec![]))
                .unwrap();
        }
        index
            .apply("deep", 1, &frame(true, h.clone(), vec![]))
            .unwrap();
        assert_eq!(
            cached(&index, &p),
            vec![("deep".into(), 16), ("s0".into(), 8), ("s1".into(), 8)]
        );
    }

    #[test]
    fn compaction_keeps_eviction_order_after_many_removals() {
        let mut index = PrefixIndex::new(PrefixIndexConfig {
            max_blocks_per_worker: 100,
            ..PrefixIndexConfig::default()
        });
        // Store and remove many blocks; keep one old block; the queue stays bounded.
        let keep = 1u64;
        index
            .apply("a", 1, &frame(true, vec![keep], vec![]))
            .unwrap();
        for i in 0..1000u64 {
            index
                .apply("a", 1, &frame(false, vec![10 + i], vec![]))
                .unwrap();
            index
                .apply("a", 1, &frame(false, vec![], vec![10 + i]))
                .unwrap();
        }
        assert_eq!(index.blocks_of("a"), 1);
        let w = index.worker(index.by_id["a"]);
        assert!(w.order.len() <= 2 * w.live + 65, "{}", w.order.len());
        assert_eq!(w.order.front(), Some(&keep));
    }
}
