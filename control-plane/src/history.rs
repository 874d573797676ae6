//! The cluster's recent history at one-second resolution, for the dashboard's charts: per lane
//! TTFT p50/p99 against the lane's SLO, SLO attainment, inter-token latency, shed and failover
//! counts, router queue depth, the error of the router's TTFT predictions; per pool tokens/s and worker queue depth; cost per hour and the
//! prefix-cache hit rate.
//!
//! Routers' per-second stats ([`v1::RouterStats`], covering every request) are merged into the
//! open second as they arrive; once a second the open second is sealed into a point, with the
//! workers' live load of that moment. Points live in a ring of [`SECONDS`] (one hour): memory
//! stays bounded whatever the traffic. Percentiles come from merged fixed-bucket histograms
//! ([`Histogram`]), exact to within one bucket.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::Serialize;
use switchyard_proto::v1;
use switchyard_router::policy::document::LaneName;
use switchyard_router::report::histogram::Histogram;

/// Points kept: one hour at one second.
pub const SECONDS: usize = 3600;

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
}

/// The workers' live load of one pool when a second is sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolLoad {
    pub active: u32,
    pub queued: u32,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LanePoint {
    /// Requests that ended this second (cancelled ones left out).
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

    pub fn len(&self) -> usize {
        self.inner.lock().expect("history lock").points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        assert!((lc.ttft_p50_ms.unwrap() / 10.0 - 1.0).abs() < 0.13);
        assert!(lc.ttft_p99_ms.unwrap() > 800.0, "{lc:?}");
        assert_eq!(lc.slo_ms, 300.0);
        assert_eq!(lc.queued_at_router, 7);
        assert!(
            (lc.ttft_error_p50_ms.unwrap() / 5.0 - 1.0).abs() < 0.13,
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
        // The next second starts empty; a router that stopped reporting leaves no queue.
        history.add(&stats("a", &[], 0, 1));
        let next = history.seal(101, LOAD, [300.0, 2000.0]);
        assert_eq!(next.lanes.latency_critical.requests, 0);
        assert_eq!(next.lanes.latency_critical.ttft_p50_ms, None);
        assert_eq!(next.lanes.latency_critical.under_predicted, None);
        assert_eq!(next.lanes.latency_critical.queued_at_router, 1);
        let idle = history.seal(102, LOAD, [300.0, 2000.0]);
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
}
