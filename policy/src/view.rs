//! The policy's view of the cluster: every worker's state plus the indices that keep a decision
//! cheap at 10 000 workers — per (model, pool) member lists, the set of workers with a free
//! slot (O(1) insert/remove), rendezvous groups for affinity, and pool-wide slot totals.
//! The live router builds one per decision from its links; the simulator keeps one and
//! updates it in place as simulated load changes.

use std::collections::HashMap;

use crate::Pool;

/// What the policy knows of one worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerState {
    pub id: String,
    pub pool: Pool,
    pub models: Vec<String>,
    /// Registered as ready (not draining) and its link is up.
    pub available: bool,
    /// Requests on the worker: active + queued, plus ones sent since its last load report.
    pub outstanding: u32,
    /// Sequences the worker serves at once; the policy never places beyond it.
    pub max_concurrent: u32,
    /// Prompt tokens admitted but not yet prefilled.
    pub queued_prompt_tokens: u64,
    /// Of `queued_prompt_tokens`, those of latency-critical requests: engines prefill them
    /// ahead of cost-sensitive prompts, so they are all a new latency-critical prompt waits
    /// behind. `None`: the worker does not tell the lanes apart (every queued token counts).
    pub queued_latency_critical_prompt_tokens: Option<u64>,
    /// Measured prefill rate, tokens per second; 0 = unknown (the policy assumes its default).
    pub prefill_tokens_per_s: f64,
    /// Measured decode rate of one stream, tokens per second; 0 = unknown.
    pub decode_tokens_per_s: f64,
    /// Fixed latency before the first token (network, gateway), milliseconds.
    pub ttft_overhead_ms: f64,
    /// Prompt tokens the worker prefills per step, each chunk sharing a step with the decode
    /// of its running sequences; 0 = it prefills whole prompts (or does not say).
    pub prefill_chunk_tokens: u32,
    /// Price of a million tokens on this worker.
    pub cost_per_mtok: f64,
    /// The worker publishes the KV blocks it holds (`KvEvents`): its cached prefix of a
    /// prompt is known from the router's prefix index, not assumed from affinity.
    pub prefix_cache: bool,
    /// Mean time a request held one of this worker's slots (start to last frame), as the
    /// router measured it; 0 = not measured yet. How soon a busy worker frees a slot.
    pub slot_turnover_ms: f64,
}

impl WorkerState {
    /// A worker with no load and unknown rates.
    pub fn new(
        id: impl Into<String>,
        pool: Pool,
        models: Vec<String>,
        max_concurrent: u32,
    ) -> Self {
        Self {
            id: id.into(),
            pool,
            models,
            available: true,
            outstanding: 0,
            max_concurrent,
            queued_prompt_tokens: 0,
            queued_latency_critical_prompt_tokens: None,
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: 0.0,
            ttft_overhead_ms: 0.0,
            prefill_chunk_tokens: 0,
            cost_per_mtok: 0.0,
            prefix_cache: false,
            slot_turnover_ms: 0.0,
        }
    }

    /// Available and below capacity.
    pub fn has_free_slot(&self) -> bool {
        self.available && self.outstanding < self.max_concurrent
    }
}

/// The next `slot_turnover_ms` after a slot was held `held_ms`: an exponentially weighted
/// mean over roughly the last ten releases, so a change of workload shows within a burst.
pub fn turnover_ewma(mean_ms: f64, held_ms: f64) -> f64 {
    if mean_ms > 0.0 {
        0.9 * mean_ms + 0.1 * held_ms
    } else {
        held_ms
    }
}

/// Rendezvous groups per (model, pool): a key first picks a group, then a worker in it, so an
/// affinity lookup hashes ~64 + n/64 candidates instead of n.
pub(crate) const AFFINITY_GROUPS: usize = 64;

pub(crate) fn pool_index(pool: Pool) -> usize {
    match pool {
        Pool::Gpu => 0,
        Pool::Wse => 1,
    }
}

/// Workers of one pool serving one model.
#[derive(Debug, Clone, Default)]
pub(crate) struct PoolIndex {
    pub(crate) groups: Vec<Vec<u32>>,
    /// Workers with a free slot, in no order.
    pub(crate) free: Vec<u32>,
    /// Position of each worker (by view index) in `free`, `u32::MAX` when absent.
    free_pos: Vec<u32>,
    /// Available members.
    pub(crate) available: u32,
    /// Rank of each member (by view index) in the pool's id-hash order, `u32::MAX` for
    /// non-members: the lowest ranks form the latency reserve.
    rank: Vec<u32>,
    members: u32,
}

impl PoolIndex {
    fn new(workers: usize) -> Self {
        Self {
            groups: vec![Vec::new(); AFFINITY_GROUPS],
            free: Vec::new(),
            free_pos: vec![u32::MAX; workers],
            available: 0,
            rank: vec![u32::MAX; workers],
            members: 0,
        }
    }

    fn set_free(&mut self, w: u32, free: bool) {
        let pos = self.free_pos[w as usize];
        match (pos != u32::MAX, free) {
            (false, true) => {
                self.free_pos[w as usize] = self.free.len() as u32;
                self.free.push(w);
            }
            (true, false) => {
                let last = *self
                    .free
                    .last()
                    .expect("a present worker means a non-empty set");
                self.free.swap_remove(pos as usize);
                if last != w {
                    self.free_pos[last as usize] = pos;
                }
                self.free_pos[w as usize] = u32::MAX;
            }
            _ => {}
        }
    }
}

/// The cluster as the policy sees it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    workers: Vec<WorkerState>,
    id_hash: Vec<u64>,
    /// Model indices of each worker (saves hashing model names on every load update).
    worker_models: Vec<Vec<u32>>,
    by_id: HashMap<String, u32>,
    model_ids: HashMap<String, u32>,
    /// Per model, per pool (gpu, wse).
    pub(crate) pools: Vec<[PoolIndex; 2]>,
    /// Per pool: slots and outstanding requests of available workers.
    slots: [u64; 2],
    busy: [u64; 2],
}

/// A stable 64-bit hash of a string (FNV-1a, then a splitmix finaliser).
pub fn stable_hash(s: &str) -> u64 {
    stable_hash_parts([s])
}

/// [`stable_hash`] of several strings, each ended by a 0 byte so that ("ab", "c") and
/// ("a", "bc") differ.
pub fn stable_hash_parts<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    let mut first = true;
    for part in parts {
        if !first {
            feed(0);
        }
        first = false;
        part.bytes().for_each(&mut feed);
    }
    mix(h)
}

/// splitmix64 finaliser.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl ClusterView {
    /// Indexes `workers`. Worker ids should be unique; a repeated id keeps its first entry for
    /// lookups by id.
    pub fn new(workers: Vec<WorkerState>) -> Self {
        let n = workers.len();
        let mut view = Self {
            id_hash: workers.iter().map(|w| stable_hash(&w.id)).collect(),
            by_id: HashMap::with_capacity(n),
            ..Self::default()
        };
        for (i, w) in workers.iter().enumerate() {
            view.by_id.entry(w.id.clone()).or_insert(i as u32);
            let mut models = Vec::with_capacity(w.models.len());
            for model in &w.models {
                let next = view.model_ids.len() as u32;
                let m = *view.model_ids.entry(model.clone()).or_insert(next);
                if models.contains(&m) {
                    continue;
                }
                models.push(m);
                if m as usize == view.pools.len() {
                    view.pools.push([PoolIndex::new(n), PoolIndex::new(n)]);
                }
                let group = (view.id_hash[i] % AFFINITY_GROUPS as u64) as usize;
                view.pools[m as usize][pool_index(w.pool)].groups[group].push(i as u32);
            }
            view.worker_models.push(models);
        }
        for pools in &mut view.pools {
            for index in pools.iter_mut() {
                let mut members: Vec<u32> = index.groups.iter().flatten().copied().collect();
                members.sort_by_key(|&w| (view.id_hash[w as usize], w));
                for (rank, &w) in members.iter().enumerate() {
                    index.rank[w as usize] = rank as u32;
                }
                index.members = members.len() as u32;
            }
        }
        view.workers = Vec::with_capacity(n);
        for (i, w) in workers.into_iter().enumerate() {
            view.workers.push(w);
            view.account(i, true);
        }
        view
    }

    /// Adds (`add`) or removes worker `i`'s contribution to the indices.
    fn account(&mut self, i: usize, add: bool) {
        let w = &self.workers[i];
        let p = pool_index(w.pool);
        if w.available {
            let slots = u64::from(w.max_concurrent);
            let busy = u64::from(w.outstanding.min(w.max_concurrent));
            if add {
                self.slots[p] += slots;
                self.busy[p] += busy;
            } else {
                self.slots[p] -= slots;
                self.busy[p] -= busy;
            }
        }
        let free = add && w.has_free_slot();
        let available = w.available;
        for &m in &self.worker_models[i] {
            let index = &mut self.pools[m as usize][p];
            index.set_free(i as u32, free);
            if available {
                if add {
                    index.available += 1;
                } else {
                    index.available -= 1;
                }
            }
        }
    }

    /// Changes worker `i`'s load or availability. Its id, pool and models must not change.
    pub fn update(&mut self, i: usize, change: impl FnOnce(&mut WorkerState)) {
        self.account(i, false);
        let w = &mut self.workers[i];
        let (pool, models_len) = (w.pool, w.models.len());
        change(w);
        debug_assert!(
            w.pool == pool && w.models.len() == models_len,
            "identity changed"
        );
        self.account(i, true);
    }

    pub fn workers(&self) -> &[WorkerState] {
        &self.workers
    }

    pub fn worker(&self, i: usize) -> &WorkerState {
        &self.workers[i]
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).map(|i| *i as usize)
    }

    pub(crate) fn model_index(&self, model: &str) -> Option<usize> {
        self.model_ids.get(model).map(|m| *m as usize)
    }

    /// Whether worker `i` serves model index `m`.
    pub(crate) fn serves(&self, i: usize, m: usize) -> bool {
        self.worker_models[i].contains(&(m as u32))
    }

    pub(crate) fn id_hash(&self, i: u32) -> u64 {
        self.id_hash[i as usize]
    }

    /// Whether worker `i` belongs to the latency reserve of its pool for `model`: the
    /// `floor(fraction × members)` members with the lowest id hash. Stable as unrelated
    /// workers come and go; empty for small pools.
    pub fn in_reserve(&self, model: &str, i: usize, fraction: f64) -> bool {
        self.model_index(model)
            .is_some_and(|m| self.in_reserve_of(m, i, fraction))
    }

    pub(crate) fn in_reserve_of(&self, m: usize, i: usize, fraction: f64) -> bool {
        let index = &self.pools[m][pool_index(self.workers[i].pool)];
        let reserved = (fraction * f64::from(index.members)).floor() as u32;
        index.rank[i] < reserved
    }

    /// Busy share of the available slots of `pool` (1 when it has none).
    pub fn utilisation(&self, pool: Pool) -> f64 {
        let p = pool_index(pool);
        if self.slots[p] == 0 {
            1.0
        } else {
            self.busy[p] as f64 / self.slots[p] as f64
        }
    }

    /// Slots and busy slots of the available workers of `pool`.
    pub fn slots(&self, pool: Pool) -> (u64, u64) {
        let p = pool_index(pool);
        (self.slots[p], self.busy[p])
    }

    /// Workers of `pool` serving `model` that have a free slot.
    pub fn free_workers(&self, model: &str, pool: Pool) -> &[u32] {
        self.model_index(model)
            .map_or(&[], |m| &self.pools[m][pool_index(pool)].free)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn the_free_index_tracks_every_update(
            updates in proptest::collection::vec((0usize..20, 0u32..6, any::<bool>()), 0..200),
        ) {
            let workers = (0..20)
                .map(|i| WorkerState::new(format!("w{i}"), if i % 3 == 0 { Pool::Wse } else { Pool::Gpu }, vec!["m".into()], 4))
                .collect();
            let mut view = ClusterView::new(workers);
            for (i, outstanding, available) in updates {
                view.update(i, |w| { w.outstanding = outstanding; w.available = available; });
            }
            for pool in Pool::ALL {
                let mut free: Vec<u32> = view.free_workers("m", pool).to_vec();
                free.sort();
                let expected: Vec<u32> = view.workers().iter().enumerate()
                    .filter(|(_, w)| w.pool == pool && w.has_free_slot())
                    .map(|(i, _)| i as u32).collect();
                prop_assert_eq!(free, expected);
                let (slots, busy) = view.slots(pool);
                let avail = view.workers().iter().filter(|w| w.pool == pool && w.available);
                let (s, b) = avail.fold((0, 0), |(s, b), w| (s + u64::from(w.max_concurrent), b + u64::from(w.outstanding.min(w.max_concurrent))));
                prop_assert_eq!((slots, busy), (s, b));
            }
        }
    }
}
