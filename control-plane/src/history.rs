//! The cluster's recent history at one-second resolution, for the dashboard's charts: per lane
//! TTFT p50/p99 against the lane's SLO, SLO attainment, inter-token latency, shed and failover
//! counts, router queue depth, the error of the router's TTFT predictions; per pool tokens/s
//! and worker queue depth; cost per hour, the prefix-cache hit rate and moves per reason; how
//! the front doors answered, per API.
//!
//! Routers' per-second stats ([`v1::RouterStats`], covering every request) are merged into the
//! open second as they arrive; once a second the open second is sealed into a point, with the
//! workers' live load of that moment. Points live in a ring of [`SECONDS`] (one hour): memory
//! stays bounded whatever the traffic. Percentiles come from merged fixed-bucket histograms
//! ([`Histogram`]), exact to within one bucket.
//!
//! Each point also keeps the second's counterfactual ledger
//! ([`switchyard_router::report::ledger`]) per lane, pool and tenant (the busiest
//! [`TENANTS_PER_POINT`], the rest as `(other)`); [`History::ledger`] sums it over a window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use switchyard_policy::document::LaneName;
use switchyard_policy::moves::MoveReason;
use switchyard_proto::v1;
use switchyard_router::report::histogram::Histogram;
use switchyard_router::report::ledger::{self, Sums};
use switchyard_router::report::limits;

/// Points kept: one hour at one second.
pub const SECONDS: usize = 3600;
/// Tenants with their own ledger row in a point; the rest are summed as `(other)`.
pub const TENANTS_PER_POINT: usize = 16;
/// Tenants told apart in the open second (reports from many routers), before the cut to
/// [`TENANTS_PER_POINT`].
const TENANTS_OPEN: usize = 1024;

/// One lane's requests that ended during the open second, over every router.
#[derive(Debug, Default)]
struct LaneAcc {
    requests: u64,
    slo_met: u64,
    shed: u64,
    failovers: u64,
    ttft: Histogram,
    itl: Histogram,
    ttft_under: Histogram,
    ttft_over: Histogram,
    completion_tokens: u64,
    prompt_tokens: u64,
    cached_prompt_tokens: u64,
    cost_usd: f64,
}

#[derive(Debug, Default)]
struct Open {
    lanes: [LaneAcc; 2],
    pool_tokens: [u64; 2],
    decisions: u64,
    decisions_reported: u64,
    dropped: u64,
    /// Requests waiting at each router per lane, its latest report.
    router_queues: HashMap<String, [u32; 2]>,
    ledger_lanes: [Sums; 2],
    ledger_pools: [Sums; 2],
    ledger_tenants: HashMap<String, Sums>,
    /// Per [`MoveReason::index`].
    moves: [u64; 3],
    /// How the routers' front doors answered, per API (at most [`limits::APIS`] of them).
    apis: BTreeMap<String, ApiPoint>,
}

/// One front-door API's answers in a second, over every router (see [`v1::ApiAnswers`]).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ApiPoint {
    pub ok: u64,
    pub client_errors: u64,
    pub rate_limited: u64,
    pub server_errors: u64,
    pub cancelled: u64,
}

impl ApiPoint {
    fn add(&mut self, answers: &v1::ApiAnswers) {
        self.ok += u64::from(answers.ok);
        self.client_errors += u64::from(answers.client_errors);
        self.rate_limited += u64::from(answers.rate_limited);
        self.server_errors += u64::from(answers.server_errors);
        self.cancelled += u64::from(answers.cancelled);
    }
}

/// One second's ledger.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LedgerPoint {
    /// Per lane; `None` without a judged request (kept short on the wire).
    pub lanes: Lanes<Option<Sums>>,
    /// Per pool and tenant: summed by [`History::ledger`], not sent with every point.
    #[serde(skip)]
    pub pools: Pools<Sums>,
    #[serde(skip)]
    pub tenants: Vec<(String, Sums)>,
}

/// The workers' live load of one pool when a second is sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolLoad {
    pub active: u32,
    pub queued: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LanePoint {
    /// Requests that ended this second and are judged against their SLO: cancelled ones and
    /// those refused (failed, rejected) before their first token left out, shed ones counted
    /// as misses (`switchyard_router::report`).
    pub requests: u64,
    pub slo_met: u64,
    /// `slo_met / requests`; `None` without requests.
    pub attainment: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    /// The lane's TTFT SLO in the policy at the time.
    pub slo_ms: f64,
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    /// |actual − predicted| TTFT (from placement, requests served without failover).
    pub ttft_error_p50_ms: Option<f64>,
    pub ttft_error_p99_ms: Option<f64>,
    /// Share of those whose first token came later than predicted.
    pub under_predicted: Option<f64>,
    pub shed: u64,
    pub failovers: u64,
    /// Requests waiting at the routers for a slot.
    pub queued_at_router: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolPoint {
    /// Tokens delivered to clients from this pool this second.
    pub tokens_per_s: u64,
    /// Requests the pool's workers run and queue (their own report).
    pub active: u32,
    pub queued: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Lanes<T> {
    #[serde(rename = "latency-critical")]
    pub latency_critical: T,
    #[serde(rename = "cost-sensitive")]
    pub cost_sensitive: T,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Pools<T> {
    pub gpu: T,
    pub wse: T,
}

/// One second of the cluster.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    /// Unix time, seconds.
    pub t: i64,
    pub lanes: Lanes<LanePoint>,
    pub pools: Pools<PoolPoint>,
    /// What the requests that ended this second cost, as a rate per hour (USD).
    pub cost_per_hour: f64,
    /// Share of prompt tokens served from workers' prefix caches; `None` without prompts.
    pub prefix_hit_rate: Option<f64>,
    /// Routing decisions made, reported to the feed (sampling), and reports dropped.
    pub decisions: u64,
    pub decisions_reported: u64,
    pub dropped: u64,
    /// Routers that reported this second.
    pub routers: usize,
    /// The counterfactual ledger of the requests that ended this second.
    pub ledger: LedgerPoint,
    /// Moves the requests that ended this second made, per reason (every known reason).
    pub moves: BTreeMap<&'static str, u64>,
    /// How the front doors answered this second, per API (those that answered any).
    pub apis: BTreeMap<String, ApiPoint>,
}

#[derive(Debug, Default)]
struct Inner {
    open: Open,
    points: VecDeque<Point>,
    /// Routers heard from since the last seal.
    heard: std::collections::HashSet<String>,
}

/// The ring of points and the open second.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

fn lane_slot(lane: &str) -> Option<usize> {
    LaneName::ALL
        .iter()
        .find(|l| l.as_str() == lane)
        .map(|l| l.index())
}

fn pool_slot(pool: &str) -> Option<usize> {
    match pool {
        "gpu" => Some(0),
        "wse" => Some(1),
        _ => None,
    }
}

impl History {
    /// Merges a router's stats into the open second.
    pub fn add(&self, stats: &v1::RouterStats) {
        let mut inner = self.inner.lock().expect("history lock");
        inner.heard.insert(stats.router_id.clone());
        let open = &mut inner.open;
        let mut queues = [0u32; 2];
        for lane in &stats.lanes {
            let Some(i) = lane_slot(&lane.lane) else {
                continue;
            };
            let acc = &mut open.lanes[i];
            acc.requests += u64::from(lane.requests);
            acc.slo_met += u64::from(lane.slo_met);
            acc.shed += u64::from(lane.shed);
            acc.failovers += u64::from(lane.failovers);
            if let Some(h) = &lane.ttft {
                acc.ttft.merge(&Histogram::from_proto(h));
            }
            if let Some(h) = &lane.itl {
                acc.itl.merge(&Histogram::from_proto(h));
            }
            if let Some(h) = &lane.ttft_under_predicted {
                acc.ttft_under.merge(&Histogram::from_proto(h));
            }
            if let Some(h) = &lane.ttft_over_predicted {
                acc.ttft_over.merge(&Histogram::from_proto(h));
            }
            acc.completion_tokens += lane.completion_tokens;
            acc.prompt_tokens += lane.prompt_tokens;
            acc.cached_prompt_tokens += lane.cached_prompt_tokens;
            acc.cost_usd += lane.cost_usd;
            queues[i] = lane.queued_at_router;
        }
        for pool in &stats.pools {
            if let Some(i) = pool_slot(&pool.pool) {
                open.pool_tokens[i] += pool.tokens;
            }
        }
        open.decisions += u64::from(stats.decisions);
        open.decisions_reported += u64::from(stats.decisions_reported);
        open.dropped += u64::from(stats.dropped);
        open.router_queues.insert(stats.router_id.clone(), queues);
        for (reason, count) in &stats.moves {
            // A reason from a newer router is not this dashboard's to show.
            if let Some(reason) = MoveReason::ALL.iter().find(|r| r.as_str() == reason) {
                open.moves[reason.index()] += u64::from(*count);
            }
        }
        for answers in &stats.apis {
            let known = open.apis.contains_key(&answers.api);
            if known || open.apis.len() < limits::APIS {
                open.apis
                    .entry(answers.api.clone())
                    .or_default()
                    .add(answers);
            }
        }
        for row in &stats.ledger {
            let sums = Sums::from_proto(row);
            let slot = match row.dimension.as_str() {
                ledger::LANE => lane_slot(&row.key).map(|i| &mut open.ledger_lanes[i]),
                ledger::POOL => pool_slot(&row.key).map(|i| &mut open.ledger_pools[i]),
                ledger::TENANT => {
                    let key = if open.ledger_tenants.contains_key(&row.key)
                        || open.ledger_tenants.len() < TENANTS_OPEN
                    {
                        row.key.as_str()
                    } else {
                        ledger::OTHER_TENANTS
                    };
                    Some(open.ledger_tenants.entry(key.to_string()).or_default())
                }
                _ => None,
            };
            if let Some(slot) = slot {
                slot.merge(&sums);
            }
        }
    }

    /// Seals the open second as the point of unix second `t`, with the pools' load now and
    /// the lanes' SLOs in force. Router queue depths carry over (a router reports them each
    /// second; one that stopped reporting is forgotten).
    pub fn seal(&self, t: i64, load: [PoolLoad; 2], slo_ms: [f64; 2]) -> Point {
        let mut inner = self.inner.lock().expect("history lock");
        let heard = std::mem::take(&mut inner.heard);
        let mut open = std::mem::take(&mut inner.open);
        open.router_queues
            .retain(|router, _| heard.contains(router));
        let queued = |i: usize| {
            open.router_queues
                .values()
                .map(|q| u64::from(q[i]))
                .sum::<u64>()
        };
        let lane = |i: usize| {
            let acc = &open.lanes[i];
            let mut error = acc.ttft_under.clone();
            error.merge(&acc.ttft_over);
            let judged = error.count();
            LanePoint {
                requests: acc.requests,
                slo_met: acc.slo_met,
                attainment: (acc.requests > 0).then(|| acc.slo_met as f64 / acc.requests as f64),
                ttft_p50_ms: acc.ttft.quantile(0.5),
                ttft_p99_ms: acc.ttft.quantile(0.99),
                slo_ms: slo_ms[i],
                itl_p50_ms: acc.itl.quantile(0.5),
                itl_p99_ms: acc.itl.quantile(0.99),
                ttft_error_p50_ms: error.quantile(0.5),
                ttft_error_p99_ms: error.quantile(0.99),
                under_predicted: (judged > 0)
                    .then(|| acc.ttft_under.count() as f64 / judged as f64),
                shed: acc.shed,
                failovers: acc.failovers,
                queued_at_router: queued(i),
            }
        };
        let pool = |i: usize| PoolPoint {
            tokens_per_s: open.pool_tokens[i],
            active: load[i].active,
            queued: load[i].queued,
        };
        let lane_ledger = |i: usize| {
            let sums = &open.ledger_lanes[i];
            (!sums.is_empty()).then(|| sums.clone())
        };
        let ledger = LedgerPoint {
            lanes: Lanes {
                latency_critical: lane_ledger(LaneName::LatencyCritical.index()),
                cost_sensitive: lane_ledger(LaneName::CostSensitive.index()),
            },
            pools: Pools {
                gpu: open.ledger_pools[0].clone(),
                wse: open.ledger_pools[1].clone(),
            },
            tenants: busiest_tenants(std::mem::take(&mut open.ledger_tenants)),
        };
        let prompt: u64 = open.lanes.iter().map(|l| l.prompt_tokens).sum();
        let cached: u64 = open.lanes.iter().map(|l| l.cached_prompt_tokens).sum();
        let point = Point {
            t,
            lanes: Lanes {
                latency_critical: lane(LaneName::LatencyCritical.index()),
                cost_sensitive: lane(LaneName::CostSensitive.index()),
            },
            pools: Pools {
                gpu: pool(0),
                wse: pool(1),
            },
            cost_per_hour: open.lanes.iter().map(|l| l.cost_usd).sum::<f64>() * 3600.0,
            prefix_hit_rate: (prompt > 0).then(|| cached as f64 / prompt as f64),
            decisions: open.decisions,
            decisions_reported: open.decisions_reported,
            dropped: open.dropped,
            routers: heard.len(),
            ledger,
            moves: MoveReason::ALL
                .iter()
                .map(|r| (r.as_str(), open.moves[r.index()]))
                .collect(),
            apis: std::mem::take(&mut open.apis),
        };
        inner.open.router_queues = open.router_queues;
        if inner.points.len() == SECONDS {
            inner.points.pop_front();
        }
        inner.points.push_back(point.clone());
        point
    }

    /// Points after unix second `since` (all with `None`), oldest first.
    pub fn since(&self, since: Option<i64>) -> Vec<Point> {
        let inner = self.inner.lock().expect("history lock");
        let start = since.map_or(0, |s| inner.points.partition_point(|p| p.t <= s));
        inner.points.range(start..).cloned().collect()
    }

    /// The ledger summed over the points of the last `window_s` seconds (up to the newest).
    pub fn ledger(&self, window_s: i64) -> LedgerWindow {
        let inner = self.inner.lock().expect("history lock");
        let to = inner.points.back().map_or(0, |p| p.t);
        let from = to - window_s;
        let start = inner.points.partition_point(|p| p.t <= from);
        let mut lanes: [Sums; 2] = Default::default();
        let mut pools: [Sums; 2] = Default::default();
        let mut tenants: HashMap<String, Sums> = HashMap::new();
        for point in inner.points.range(start..) {
            let l = &point.ledger.lanes;
            for (i, sums) in [&l.latency_critical, &l.cost_sensitive]
                .into_iter()
                .enumerate()
            {
                if let Some(sums) = sums {
                    lanes[i].merge(sums);
                }
            }
            pools[0].merge(&point.ledger.pools.gpu);
            pools[1].merge(&point.ledger.pools.wse);
            for (tenant, sums) in &point.ledger.tenants {
                tenants.entry(tenant.clone()).or_default().merge(sums);
            }
        }
        let mut rows: Vec<LedgerRow> = LaneName::ALL
            .iter()
            .map(|lane| LedgerRow::new(ledger::LANE, lane.as_str(), &lanes[lane.index()]))
            .chain(
                ["gpu", "wse"]
                    .iter()
                    .zip(&pools)
                    .map(|(pool, sums)| LedgerRow::new(ledger::POOL, pool, sums)),
            )
            .collect();
        let mut tenant_rows: Vec<LedgerRow> = tenants
            .iter()
            .map(|(tenant, sums)| LedgerRow::new(ledger::TENANT, tenant, sums))
            .collect();
        tenant_rows.sort_by(|a, b| {
            b.sums
                .regret_ms
                .total_cmp(&a.sums.regret_ms)
                .then_with(|| a.key.cmp(&b.key))
        });
        rows.extend(tenant_rows);
        LedgerWindow {
            from: inner.points.get(start).map(|p| p.t),
            to: inner.points.back().map(|p| p.t),
            rows,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("history lock").points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The [`TENANTS_PER_POINT`] tenants with the most judged requests, the rest summed as
/// `(other)`.
fn busiest_tenants(tenants: HashMap<String, Sums>) -> Vec<(String, Sums)> {
    let mut tenants: Vec<(String, Sums)> = tenants.into_iter().collect();
    tenants.sort_by(|a, b| b.1.judged.cmp(&a.1.judged).then_with(|| a.0.cmp(&b.0)));
    if tenants.len() > TENANTS_PER_POINT {
        let mut other = Sums::default();
        for (tenant, sums) in tenants.split_off(TENANTS_PER_POINT - 1) {
            debug_assert!(!tenant.is_empty());
            other.merge(&sums);
        }
        match tenants.iter_mut().find(|(t, _)| t == ledger::OTHER_TENANTS) {
            Some((_, sums)) => sums.merge(&other),
            None => tenants.push((ledger::OTHER_TENANTS.to_string(), other)),
        }
    }
    tenants
}

/// The ledger over a window, one row per lane, pool and tenant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LedgerWindow {
    /// First and last second summed (`None` without history).
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub rows: Vec<LedgerRow>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LedgerRow {
    /// "lane", "pool" or "tenant".
    pub dimension: &'static str,
    pub key: String,
    #[serde(flatten)]
    pub sums: Sums,
    /// Per judged request (`None` without one).
    pub regret_ms_mean: Option<f64>,
    pub chosen_slower_ms_mean: Option<f64>,
    pub prediction_error_ms_mean: Option<f64>,
    pub abs_prediction_error_ms_mean: Option<f64>,
    /// Who loses SLO here: "predictions", "policy", "capacity", or "none" (no miss).
    pub loses_slo: &'static str,
    /// One line for the on-call engineer.
    pub explanation: String,
}

impl LedgerRow {
    fn new(dimension: &'static str, key: &str, sums: &Sums) -> Self {
        let mean = |v: f64| (sums.judged > 0).then(|| v / sums.judged as f64);
        let capacity = sums
            .slo_missed
            .saturating_sub(sums.missed_predicted_to_meet + sums.missed_with_alternative);
        let loses_slo = if sums.slo_missed == 0 {
            "none"
        } else if sums.missed_predicted_to_meet >= sums.missed_with_alternative.max(capacity) {
            "predictions"
        } else if sums.missed_with_alternative >= capacity {
            "policy"
        } else {
            "capacity"
        };
        let mut row = Self {
            dimension,
            key: key.to_string(),
            sums: sums.clone(),
            regret_ms_mean: mean(sums.regret_ms),
            chosen_slower_ms_mean: mean(sums.chosen_slower_ms),
            prediction_error_ms_mean: mean(sums.prediction_error_ms),
            abs_prediction_error_ms_mean: mean(sums.abs_prediction_error_ms),
            loses_slo,
            explanation: String::new(),
        };
        row.explanation = row.explain(capacity);
        row
    }

    fn explain(&self, capacity: u64) -> String {
        let s = &self.sums;
        if s.judged == 0 {
            return "no request judged in this window".into();
        }
        let ms = |v: Option<f64>| format!("{:.1} ms", v.unwrap_or_default());
        let direction = if self.prediction_error_ms_mean.unwrap_or_default() >= 0.0 {
            "late"
        } else {
            "early"
        };
        let mut line = format!(
            "policy lost {} per request vs the best alternative ({} of it chosen knowingly; {} of {} requests had an alternative); predictions were off by {} ({direction} on average)",
            ms(self.regret_ms_mean),
            ms(self.chosen_slower_ms_mean),
            s.with_alternative,
            s.judged,
            ms(self.abs_prediction_error_ms_mean),
        );
        if s.cost_regret_usd > 0.0 {
            line.push_str(&format!(
                "; ${:.6} paid above the cheapest alternative predicted to meet the SLO",
                s.cost_regret_usd
            ));
        }
        line.push_str(&match self.loses_slo {
            "none" => " → no SLO miss".to_string(),
            who => format!(
                " → {} SLO misses: {} predicted to meet (predictions), {} with an alternative predicted to meet (policy), {} with none (capacity): {}",
                s.slo_missed,
                s.missed_predicted_to_meet,
                s.missed_with_alternative,
                capacity,
                match who {
                    "predictions" => "the predictions lose SLO",
                    "policy" => "the policy loses SLO",
                    _ => "capacity loses SLO",
                }
            ),
        });
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: &[f64]) -> v1::LatencyHistogram {
        let mut h = Histogram::default();
        values.iter().for_each(|&v| h.record(v));
        h.to_proto()
    }

    fn stats(router: &str, ttfts: &[f64], slo_met: u32, queued: u32) -> v1::RouterStats {
        // Every request came 5 ms later than predicted.
        let under = vec![5.0; ttfts.len()];
        v1::RouterStats {
            router_id: router.into(),
            lanes: vec![v1::LaneStats {
                lane: "latency-critical".into(),
                requests: ttfts.len() as u32,
                slo_met,
                shed: 1,
                ttft: Some(histogram(ttfts)),
                ttft_under_predicted: Some(histogram(&under)),
                prompt_tokens: 100,
                cached_prompt_tokens: 25,
                cost_usd: 0.001,
                queued_at_router: queued,
                ..Default::default()
            }],
            pools: vec![v1::PoolTokens {
                pool: "wse".into(),
                tokens: 40,
            }],
            decisions: 10,
            decisions_reported: 4,
            dropped: 1,
            moves: [("drain".to_string(), 1), ("teleport".to_string(), 5)].into(),
            apis: vec![v1::ApiAnswers {
                api: "chat_completions".into(),
                ok: 3,
                client_errors: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    const LOAD: [PoolLoad; 2] = [
        PoolLoad {
            active: 2,
            queued: 3,
        },
        PoolLoad {
            active: 1,
            queued: 0,
        },
    ];

    #[test]
    fn routers_merge_into_one_second() {
        let history = History::default();
        history.add(&stats("a", &[10.0; 98], 98, 2));
        history.add(&stats("b", &[1000.0, 1000.0], 0, 5));
        let point = history.seal(100, LOAD, [300.0, 2000.0]);
        let lc = &point.lanes.latency_critical;
        assert_eq!((lc.requests, lc.slo_met, lc.shed), (100, 98, 2));
        assert_eq!(lc.attainment, Some(0.98));
        assert!((lc.ttft_p50_ms.unwrap() / 10.0 - 1.0).abs() <= 0.012);
        assert!(lc.ttft_p99_ms.unwrap() > 800.0, "{lc:?}");
        assert_eq!(lc.slo_ms, 300.0);
        assert_eq!(lc.queued_at_router, 7);
        assert!(
            (lc.ttft_error_p50_ms.unwrap() / 5.0 - 1.0).abs() <= 0.012,
            "{lc:?}"
        );
        assert_eq!(lc.under_predicted, Some(1.0));
        assert_eq!(point.lanes.cost_sensitive.requests, 0);
        assert_eq!(point.lanes.cost_sensitive.attainment, None);
        assert_eq!(point.pools.wse.tokens_per_s, 80);
        assert_eq!(point.pools.gpu.queued, 3);
        assert!((point.cost_per_hour - 0.002 * 3600.0).abs() < 1e-9);
        assert_eq!(point.prefix_hit_rate, Some(0.25));
        assert_eq!(
            (point.decisions, point.decisions_reported, point.dropped),
            (20, 8, 2)
        );
        assert_eq!(point.routers, 2);
        assert_eq!(
            point.moves,
            [("drain", 2), ("preempt", 0), ("rebalance", 0)].into()
        );
        assert_eq!(
            point.apis,
            [(
                "chat_completions".to_string(),
                ApiPoint {
                    ok: 6,
                    client_errors: 2,
                    ..Default::default()
                }
            )]
            .into()
        );
        // The next second starts empty; a router that stopped reporting leaves no queue.
        history.add(&stats("a", &[], 0, 1));
        let next = history.seal(101, LOAD, [300.0, 2000.0]);
        assert_eq!(next.apis["chat_completions"].ok, 3);
        assert_eq!(next.lanes.latency_critical.requests, 0);
        assert_eq!(next.lanes.latency_critical.ttft_p50_ms, None);
        assert_eq!(next.lanes.latency_critical.under_predicted, None);
        assert_eq!(next.lanes.latency_critical.queued_at_router, 1);
        let idle = history.seal(102, LOAD, [300.0, 2000.0]);
        assert!(idle.apis.is_empty(), "{:?}", idle.apis);
        assert_eq!(idle.lanes.latency_critical.queued_at_router, 0);
        assert_eq!(idle.routers, 0);
    }

    #[test]
    fn the_ring_keeps_one_hour_and_answers_since() {
        let history = History::default();
        for t in 0..(SECONDS as i64 + 10) {
            history.seal(t, LOAD, [1.0, 1.0]);
        }
        assert_eq!(history.len(), SECONDS);
        let all = history.since(None);
        assert_eq!(all.first().map(|p| p.t), Some(10));
        assert_eq!(all.last().map(|p| p.t), Some(SECONDS as i64 + 9));
        let recent = history.since(Some(SECONDS as i64 + 6));
        assert_eq!(
            recent.iter().map(|p| p.t).collect::<Vec<_>>(),
            [SECONDS as i64 + 7, SECONDS as i64 + 8, SECONDS as i64 + 9]
        );
        assert!(history.since(Some(i64::MAX)).is_empty());
    }

    #[test]
    fn unknown_lanes_and_pools_are_ignored() {
        let history = History::default();
        history.add(&v1::RouterStats {
            router_id: "a".into(),
            lanes: vec![v1::LaneStats {
                lane: "bulk".into(),
                requests: 5,
                ..Default::default()
            }],
            pools: vec![v1::PoolTokens {
                pool: "tpu".into(),
                tokens: 5,
            }],
            ..Default::default()
        });
        let point = history.seal(1, LOAD, [1.0, 1.0]);
        assert_eq!(point.lanes.latency_critical.requests, 0);
        assert_eq!(point.pools.gpu.tokens_per_s, 0);
    }

    fn ledger_row(dimension: &str, key: &str, judged: u32, regret_ms: f64) -> v1::LedgerStats {
        v1::LedgerStats {
            dimension: dimension.into(),
            key: key.into(),
            judged,
            with_alternative: judged,
            regret_ms,
            abs_prediction_error_ms: 10.0 * f64::from(judged),
            prediction_error_ms: 10.0 * f64::from(judged),
            slo_missed: 2,
            missed_predicted_to_meet: 2,
            ..Default::default()
        }
    }

    #[test]
    fn the_ledger_sums_lanes_pools_and_tenants_over_a_window() {
        let history = History::default();
        for t in 0..3 {
            let mut rows = vec![
                ledger_row("lane", "latency-critical", 4, 40.0),
                ledger_row("pool", "wse", 4, 40.0),
                ledger_row("tenant", "acme", 3, 36.0),
                ledger_row("tenant", "(none)", 1, 4.0),
                ledger_row("bogus", "x", 9, 9.0),
            ];
            // More tenants than a point keeps: the quietest become "(other)".
            rows.extend(
                (0..TENANTS_PER_POINT).map(|i| ledger_row("tenant", &format!("t{i:02}"), 1, 1.0)),
            );
            history.add(&v1::RouterStats {
                router_id: "a".into(),
                ledger: rows,
                ..Default::default()
            });
            let point = history.seal(t, LOAD, [1.0, 1.0]);
            assert_eq!(point.ledger.tenants.len(), TENANTS_PER_POINT);
            assert!(point.ledger.lanes.cost_sensitive.is_none());
        }
        let all = history.ledger(3600);
        assert_eq!((all.from, all.to), (Some(0), Some(2)));
        let row = |key: &str| all.rows.iter().find(|r| r.key == key).unwrap();
        let lc = row("latency-critical");
        assert_eq!((lc.sums.judged, lc.sums.regret_ms), (12, 120.0));
        assert_eq!(lc.regret_ms_mean, Some(10.0));
        assert_eq!(lc.abs_prediction_error_ms_mean, Some(10.0));
        assert_eq!(lc.loses_slo, "predictions");
        assert!(
            lc.explanation
                .starts_with("policy lost 10.0 ms per request vs the best alternative")
                && lc
                    .explanation
                    .contains("predictions were off by 10.0 ms (late")
                && lc.explanation.contains("the predictions lose SLO"),
            "{}",
            lc.explanation
        );
        assert_eq!(row("cost-sensitive").loses_slo, "none");
        assert_eq!(row("wse").sums.judged, 12);
        assert_eq!(row("gpu").sums.judged, 0);
        // Tenants by regret; per point acme, (none) and 13 small ones kept, 3 summed as (other).
        let tenants: Vec<&LedgerRow> = all
            .rows
            .iter()
            .filter(|r| r.dimension == "tenant")
            .collect();
        assert_eq!(tenants[0].key, "acme");
        assert_eq!(tenants[0].sums.judged, 9);
        assert_eq!(row("(other)").sums.judged, 3 * 3);
        // A window of one second sums the newest point only.
        assert_eq!(history.ledger(1).rows[0].sums.judged, 4);
    }
}
