//! The policies the simulator compares: `switchyard` (the router's own `switchyard_policy::place`, with
//! the policy document of the profile, fed the cached prefix per worker from the router's view
//! of what workers published, as the live router's prefix index feeds it; moving generations
//! and hedging as the document's `migration` and `hedging` sections say),
//! `switchyard_no_moves` (the same with `migration` and `hedging` off), `switchyard_no_await`
//! (with `placement.await_wse` off), `switchyard_plain` (all three off) and the baselines — `static` (lane → home pool, no
//! spill, no affinity), `round_robin` and `least_loaded` over every worker ignoring lanes,
//! `all_wse`, and `prefix_aware`, a cache-aware router in the style of SGLang's (longest
//! prefix match when load is balanced, else the least-loaded worker). Baselines queue and shed
//! at the router under the same admission limits as Switchyard.

use switchyard_cluster::Pool;
use switchyard_policy::document::PolicyDocument;
use switchyard_policy::{ClusterView, Decision, Placement, RequestInfo, Route, WorkerState, place};

use super::engine::{Placer, PrefixTree, SimRequest};
use super::kv::RouterKvView;

pub const POLICY_NAMES: [&str; 9] = [
    "switchyard",
    "switchyard_no_moves",
    "switchyard_no_await",
    "switchyard_plain",
    "static",
    "round_robin",
    "least_loaded",
    "all_wse",
    "prefix_aware",
];

/// A placer by name.
pub fn placer(name: &str, policy: &PolicyDocument) -> Option<Box<dyn Placer>> {
    Some(match name {
        "switchyard" => Box::new(Switchyard {
            policy: policy.clone(),
            affinity: true,
            prefix: true,
            hits: Vec::new(),
            moves: true,
        }),
        "switchyard_no_moves" => Box::new(Switchyard::keeping(policy, false, true)),
        "switchyard_no_await" => Box::new(Switchyard::keeping(policy, true, false)),
        "switchyard_plain" => Box::new(Switchyard::keeping(policy, false, false)),
        "static" => {
            let mut fixed = policy.clone();
            fixed.latency_critical.spill = false;
            fixed.cost_sensitive.spill = false;
            fixed.placement.gpu_reserve_for_latency = 0.0;
            Box::new(Switchyard {
                policy: fixed,
                affinity: false,
                prefix: false,
                hits: Vec::new(),
                moves: false,
            })
        }
        "round_robin" => Box::new(RoundRobin { next: 0 }),
        "least_loaded" => Box::new(LeastLoaded { pool: None }),
        "all_wse" => Box::new(LeastLoaded {
            pool: Some(Pool::Wse),
        }),
        "prefix_aware" => Box::new(PrefixAware::default()),
        _ => return None,
    })
}

fn placed(view: &ClusterView, worker: usize) -> Decision {
    Decision::Place(Placement {
        worker,
        pool: view.worker(worker).pool,
        route: Route::Home,
        affinity: false,
        predicted_ttft_ms: 0.0,
        cached_tokens: 0,
        prompt_tokens: 0,
    })
}

fn utilisation(w: &WorkerState) -> f64 {
    f64::from(w.outstanding) / f64::from(w.max_concurrent.max(1))
}

/// The router's policy code, unchanged.
struct Switchyard {
    policy: PolicyDocument,
    affinity: bool,
    /// Look the prompt up in the router's KV view (`RequestInfo.prefix`), as the live router
    /// does when it has the prompt's token ids.
    prefix: bool,
    hits: Vec<(usize, u32)>,
    /// Moves and hedges as the document's `migration` and `hedging` say.
    moves: bool,
}

impl Switchyard {
    /// The router's policy keeping (as the document says) or switching off moving
    /// generations and hedging (`moves`) and awaiting WSE slots (`await_wse`).
    fn keeping(policy: &PolicyDocument, moves: bool, await_wse: bool) -> Self {
        let mut policy = policy.clone();
        if !moves {
            policy.migration.enabled = false;
            policy.hedging.enabled = false;
        }
        if !await_wse {
            policy.placement.await_wse = false;
        }
        Self {
            policy,
            affinity: true,
            prefix: true,
            hits: Vec::new(),
            moves,
        }
    }

    /// What the policy is told of `r`, as the live router tells it; and the policy.
    fn info<'a>(
        &'a mut self,
        view: &'a ClusterView,
        kv: &RouterKvView,
        r: &SimRequest,
        index: u32,
    ) -> (RequestInfo<'a>, &'a PolicyDocument) {
        let prefix = if self.prefix {
            kv.lookup(r.full_blocks(), &mut self.hits);
            Some(self.hits.as_slice())
        } else {
            None
        };
        let info = RequestInfo {
            model: view.worker(0).models[0].as_str(),
            prompt_tokens: r.prompt_tokens,
            affinity: if self.affinity { r.affinity } else { None },
            seed: u64::from(index),
            prefix,
        };
        (info, &self.policy)
    }
}

impl Placer for Switchyard {
    fn place(
        &mut self,
        view: &ClusterView,
        kv: &RouterKvView,
        r: &SimRequest,
        index: u32,
        _: &PolicyDocument,
    ) -> Decision {
        let (info, policy) = self.info(view, kv, r, index);
        place(view, &r.classification(), &info, policy, &[])
    }

    fn await_wse(
        &mut self,
        view: &ClusterView,
        kv: &RouterKvView,
        r: &SimRequest,
        index: u32,
        spill: &Placement,
        waited_ms: f64,
        ahead: usize,
    ) -> Option<f64> {
        let (info, policy) = self.info(view, kv, r, index);
        let class = r.classification();
        switchyard_policy::await_wse(view, &class, &info, spill, waited_ms, ahead, policy)
    }

    fn moves_policy(&self) -> Option<&PolicyDocument> {
        self.moves.then_some(&self.policy)
    }
}

struct RoundRobin {
    next: usize,
}

impl Placer for RoundRobin {
    fn place(
        &mut self,
        view: &ClusterView,
        _: &RouterKvView,
        _: &SimRequest,
        _: u32,
        _: &PolicyDocument,
    ) -> Decision {
        let n = view.len();
        for k in 0..n {
            let w = (self.next + k) % n;
            if view.worker(w).has_free_slot() {
                self.next = w + 1;
                return placed(view, w);
            }
        }
        Decision::Queue
    }
}

struct LeastLoaded {
    pool: Option<Pool>,
}

impl Placer for LeastLoaded {
    fn place(
        &mut self,
        view: &ClusterView,
        _: &RouterKvView,
        _: &SimRequest,
        _: u32,
        _: &PolicyDocument,
    ) -> Decision {
        let model = view.worker(0).models[0].clone();
        let pools: &[Pool] = match &self.pool {
            Some(p) => std::slice::from_ref(p),
            None => &Pool::ALL,
        };
        let best = pools
            .iter()
            .flat_map(|&p| view.free_workers(&model, p).iter().map(|&w| w as usize))
            .min_by(|&a, &b| {
                utilisation(view.worker(a))
                    .total_cmp(&utilisation(view.worker(b)))
                    .then(a.cmp(&b))
            });
        match best {
            Some(w) => placed(view, w),
            None => Decision::Queue,
        }
    }
}

/// SGLang-router-style cache-aware routing (its defaults: cache threshold 0.5, balance
/// thresholds 32 absolute and 1.0001 relative), over all workers.
#[derive(Default)]
struct PrefixAware {
    tree: PrefixTree,
}

impl Placer for PrefixAware {
    fn place(
        &mut self,
        view: &ClusterView,
        _: &RouterKvView,
        r: &SimRequest,
        _: u32,
        _: &PolicyDocument,
    ) -> Decision {
        let (mut min_load, mut max_load) = (u32::MAX, 0);
        let mut least: Option<usize> = None;
        for (i, w) in view.workers().iter().enumerate() {
            min_load = min_load.min(w.outstanding);
            max_load = max_load.max(w.outstanding);
            if w.has_free_slot()
                && least.is_none_or(|l| utilisation(w) < utilisation(view.worker(l)))
            {
                least = Some(i);
            }
        }
        let Some(least) = least else {
            return Decision::Queue;
        };
        let imbalanced =
            max_load - min_load > 32 && f64::from(max_load) > 1.0001 * f64::from(min_load);
        let mut chosen = least;
        if !imbalanced
            && let Some((w, blocks)) = self.tree.longest_match(&r.hash_ids)
            && blocks as f64 / r.hash_ids.len() as f64 > 0.5
            && view.worker(w as usize).has_free_slot()
        {
            chosen = w as usize;
        }
        self.tree.record(&r.hash_ids, chosen as u32);
        placed(view, chosen)
    }
}
