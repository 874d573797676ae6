//! The counterfactual ledger: each request judged against the alternatives the policy scored
//! for it, so an operator can tell whether the policy or its TTFT predictions lose SLO.
//!
//! A request is *judged* when it was placed, got a first token and was served by the worker
//! it was placed on (no failover: the prediction was for that worker). For a judged request,
//! with `actual` its TTFT measured from placement (what the prediction covers), `predicted`
//! the policy's prediction for the chosen worker and `best` the lowest prediction among the
//! *other* workers the policy scored:
//!
//! - **regret** = max(0, actual − best): how much sooner the first token could have come had
//!   the best alternative been as fast as predicted; 0 without an alternative;
//! - **chosen slower** = max(0, predicted − best): the part of it the policy accepted knowingly
//!   (a cheaper pool, the affinity owner, the home pool within the SLO);
//! - **prediction error** = actual − predicted (positive: later than predicted);
//! - **cost regret** = max(0, cost − the same prompt and completion tokens at the price of the
//!   cheapest other scored worker predicted to meet the SLO); 0 when none was;
//! - an SLO miss is the **predictions'** when the chosen worker was predicted to meet the SLO,
//!   the **policy's** when it was not but another scored worker was.
//!
//! Only scored workers are alternatives: the policy stops at the first pool that meets the SLO
//! (a latency-critical request at home on the wafer-scale pool is not scored against gpu), so
//! such a request is judged against the other workers of its pool only.

use serde::Serialize;
use switchyard_proto::v1;

/// A (worker, value) pair of the two lowest values among distinct workers.
type TopTwo = [Option<(usize, f64)>; 2];

/// Keeps the two lowest values of distinct workers (a worker may be offered twice).
fn offer(top: &mut TopTwo, worker: usize, value: f64) {
    if !value.is_finite() {
        return;
    }
    if let Some(slot) = top.iter_mut().flatten().find(|(w, _)| *w == worker) {
        slot.1 = slot.1.min(value);
    } else if top[1].is_none_or(|(_, v)| value < v) {
        top[1] = Some((worker, value));
    }
    if let [Some(a), Some(b)] = top
        && b.1 < a.1
    {
        std::mem::swap(a, b);
    }
    if top[0].is_none() {
        top.swap(0, 1);
    }
}

/// The first of `top` that is not `chosen`.
fn other(top: &TopTwo, chosen: usize) -> Option<(usize, f64)> {
    top.iter().flatten().copied().find(|(w, _)| *w != chosen)
}

/// What placement learns of the alternatives while the policy scores candidates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Alternatives {
    fastest: TopTwo,
    cheapest_meeting_slo: TopTwo,
}

impl Alternatives {
    /// A candidate the policy scored (view index, its prediction, whether that meets the
    /// request's SLO, the worker's price).
    pub fn consider(
        &mut self,
        worker: usize,
        predicted_ttft_ms: f64,
        meets_slo: bool,
        cost_per_mtok: f64,
    ) {
        offer(&mut self.fastest, worker, predicted_ttft_ms);
        if meets_slo {
            offer(&mut self.cheapest_meeting_slo, worker, cost_per_mtok);
        }
    }

    /// The alternatives to `chosen`: the fastest predicted other worker (view index, ms) and
    /// the price of the cheapest other worker predicted to meet the SLO.
    pub fn excluding(&self, chosen: usize) -> (Option<(usize, f64)>, Option<f64>) {
        (
            other(&self.fastest, chosen),
            other(&self.cheapest_meeting_slo, chosen).map(|(_, price)| price),
        )
    }
}

/// The alternatives to a placement, as the ledger needs them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Basis {
    /// The fastest predicted other worker scored: its id and prediction (ms).
    pub best_alternative: Option<(String, f64)>,
    /// Price (USD per million tokens) of the cheapest other worker predicted to meet the SLO.
    pub cheapest_meeting_slo_per_mtok: Option<f64>,
}

/// A judged request (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Judged {
    pub with_alternative: bool,
    pub regret_ms: f64,
    pub chosen_slower_ms: f64,
    pub prediction_error_ms: f64,
    pub cost_usd: f64,
    pub cost_regret_usd: f64,
    pub slo_missed: bool,
    pub missed_predicted_to_meet: bool,
    pub missed_with_alternative: bool,
}

/// What a request's outcome says about its decision.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    /// TTFT from placement, and the prediction for the chosen worker (ms).
    pub actual_ms: f64,
    pub predicted_ms: f64,
    pub slo_ms: f64,
    pub slo_met: bool,
    pub cost_usd: f64,
    /// Prompt and completion tokens (what the cost was for).
    pub tokens: f64,
}

impl Basis {
    /// Judges a request placed on these terms.
    pub fn judge(&self, v: Verdict) -> Judged {
        let best = self.best_alternative.as_ref().map(|(_, ms)| *ms);
        let cost_regret_usd = self
            .cheapest_meeting_slo_per_mtok
            .map_or(0.0, |price| (v.cost_usd - v.tokens * price / 1e6).max(0.0));
        Judged {
            with_alternative: best.is_some(),
            regret_ms: best.map_or(0.0, |b| (v.actual_ms - b).max(0.0)),
            chosen_slower_ms: best.map_or(0.0, |b| (v.predicted_ms - b).max(0.0)),
            prediction_error_ms: v.actual_ms - v.predicted_ms,
            cost_usd: v.cost_usd,
            cost_regret_usd,
            slo_missed: !v.slo_met,
            missed_predicted_to_meet: !v.slo_met && v.predicted_ms <= v.slo_ms,
            missed_with_alternative: !v.slo_met
                && v.predicted_ms > v.slo_ms
                && self.cheapest_meeting_slo_per_mtok.is_some(),
        }
    }
}

/// Ledger sums over some requests (a lane, pool or tenant over a second or a window).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sums {
    pub judged: u64,
    pub with_alternative: u64,
    pub regret_ms: f64,
    pub chosen_slower_ms: f64,
    pub prediction_error_ms: f64,
    pub abs_prediction_error_ms: f64,
    pub cost_usd: f64,
    pub cost_regret_usd: f64,
    pub slo_missed: u64,
    pub missed_predicted_to_meet: u64,
    pub missed_with_alternative: u64,
}

impl Sums {
    pub fn add(&mut self, j: &Judged) {
        self.judged += 1;
        self.with_alternative += u64::from(j.with_alternative);
        self.regret_ms += j.regret_ms;
        self.chosen_slower_ms += j.chosen_slower_ms;
        self.prediction_error_ms += j.prediction_error_ms;
        self.abs_prediction_error_ms += j.prediction_error_ms.abs();
        self.cost_usd += j.cost_usd;
        self.cost_regret_usd += j.cost_regret_usd;
        self.slo_missed += u64::from(j.slo_missed);
        self.missed_predicted_to_meet += u64::from(j.missed_predicted_to_meet);
        self.missed_with_alternative += u64::from(j.missed_with_alternative);
    }

    pub fn merge(&mut self, o: &Sums) {
        self.judged += o.judged;
        self.with_alternative += o.with_alternative;
        self.regret_ms += o.regret_ms;
        self.chosen_slower_ms += o.chosen_slower_ms;
        self.prediction_error_ms += o.prediction_error_ms;
        self.abs_prediction_error_ms += o.abs_prediction_error_ms;
        self.cost_usd += o.cost_usd;
        self.cost_regret_usd += o.cost_regret_usd;
        self.slo_missed += o.slo_missed;
        self.missed_predicted_to_meet += o.missed_predicted_to_meet;
        self.missed_with_alternative += o.missed_with_alternative;
    }

    pub fn is_empty(&self) -> bool {
        self.judged == 0
    }

    pub fn to_proto(&self, dimension: &str, key: &str) -> v1::LedgerStats {
        let count = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
        v1::LedgerStats {
            dimension: dimension.into(),
            key: key.into(),
            judged: count(self.judged),
            with_alternative: count(self.with_alternative),
            regret_ms: self.regret_ms,
            chosen_slower_ms: self.chosen_slower_ms,
            prediction_error_ms: self.prediction_error_ms,
            abs_prediction_error_ms: self.abs_prediction_error_ms,
            cost_usd: self.cost_usd,
            cost_regret_usd: self.cost_regret_usd,
            slo_missed: count(self.slo_missed),
            missed_predicted_to_meet: count(self.missed_predicted_to_meet),
            missed_with_alternative: count(self.missed_with_alternative),
        }
    }

    /// From the wire; non-finite sums (a faulty peer) count as 0.
    pub fn from_proto(p: &v1::LedgerStats) -> Self {
        let finite = |v: f64| if v.is_finite() { v } else { 0.0 };
        Self {
            judged: u64::from(p.judged),
            with_alternative: u64::from(p.with_alternative),
            regret_ms: finite(p.regret_ms),
            chosen_slower_ms: finite(p.chosen_slower_ms),
            prediction_error_ms: finite(p.prediction_error_ms),
            abs_prediction_error_ms: finite(p.abs_prediction_error_ms),
            cost_usd: finite(p.cost_usd),
            cost_regret_usd: finite(p.cost_regret_usd),
            slo_missed: u64::from(p.slo_missed),
            missed_predicted_to_meet: u64::from(p.missed_predicted_to_meet),
            missed_with_alternative: u64::from(p.missed_with_alternative),
        }
    }
}

/// Dimensions of [`v1::LedgerStats`].
pub const LANE: &str = "lane";
pub const POOL: &str = "pool";
pub const TENANT: &str = "tenant";
/// The tenant key of requests without a tenant, and of tenants beyond a bound.
pub const NO_TENANT: &str = "(none)";
pub const OTHER_TENANTS: &str = "(other)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternatives_are_the_best_other_distinct_workers() {
        let mut a = Alternatives::default();
        a.consider(3, 50.0, true, 0.35);
        a.consider(1, 30.0, false, 0.10);
        // Worker 3 again, better (affinity): still one worker.
        a.consider(3, 20.0, true, 0.35);
        a.consider(7, 40.0, true, 0.20);
        assert_eq!(a.excluding(3), (Some((1, 30.0)), Some(0.20)));
        assert_eq!(a.excluding(1), (Some((3, 20.0)), Some(0.20)));
        assert_eq!(a.excluding(7), (Some((3, 20.0)), Some(0.35)));
        let mut alone = Alternatives::default();
        alone.consider(2, 10.0, true, 1.0);
        assert_eq!(alone.excluding(2), (None, None));
        alone.consider(4, f64::NAN, true, 1.0);
        assert_eq!(alone.excluding(2).0, None);
    }

    fn verdict(actual_ms: f64, predicted_ms: f64, slo_met: bool) -> Verdict {
        Verdict {
            actual_ms,
            predicted_ms,
            slo_ms: 100.0,
            slo_met,
            cost_usd: 2.0 * 1000.0 / 1e6,
            tokens: 1000.0,
        }
    }

    #[test]
    fn regret_splits_into_the_policy_and_the_predictions() {
        let basis = Basis {
            best_alternative: Some(("gpu-1".into(), 60.0)),
            cheapest_meeting_slo_per_mtok: Some(0.5),
        };
        // Chose a worker predicted at 80 ms (20 ms slower, knowingly); it took 150 ms.
        let j = basis.judge(verdict(150.0, 80.0, false));
        assert_eq!(j.regret_ms, 90.0);
        assert_eq!(j.chosen_slower_ms, 20.0);
        assert_eq!(j.prediction_error_ms, 70.0);
        // 1 000 tokens at $2/Mtok against $0.5/Mtok.
        assert!((j.cost_regret_usd - 0.0015).abs() < 1e-12, "{j:?}");
        // Predicted to meet the 100 ms SLO and missed it: the predictions' miss.
        assert!(j.slo_missed && j.missed_predicted_to_meet && !j.missed_with_alternative);
        // Predicted to miss while an alternative was predicted to meet: the policy's.
        let j = basis.judge(verdict(150.0, 120.0, false));
        assert!(j.missed_with_alternative && !j.missed_predicted_to_meet);
        // Faster than the best alternative's prediction: no regret.
        let j = basis.judge(verdict(40.0, 50.0, true));
        assert_eq!((j.regret_ms, j.chosen_slower_ms), (0.0, 0.0));
        assert_eq!(j.prediction_error_ms, -10.0);
        assert!(!j.slo_missed);
        // No alternative: nothing to regret, the error is still kept.
        let j = Basis::default().judge(verdict(150.0, 80.0, false));
        assert_eq!(
            (j.with_alternative, j.regret_ms, j.cost_regret_usd),
            (false, 0.0, 0.0)
        );
        assert_eq!(j.prediction_error_ms, 70.0);
        assert!(!j.missed_with_alternative);
        // The cheapest alternative costs more: no cost regret.
        let pricey = Basis {
            cheapest_meeting_slo_per_mtok: Some(5.0),
            ..basis
        };
        assert_eq!(pricey.judge(verdict(10.0, 10.0, true)).cost_regret_usd, 0.0);
    }

    #[test]
    fn sums_survive_the_wire() {
        let basis = Basis {
            best_alternative: Some(("w".into(), 10.0)),
            cheapest_meeting_slo_per_mtok: None,
        };
        let mut sums = Sums::default();
        sums.add(&basis.judge(verdict(30.0, 20.0, true)));
        sums.add(&basis.judge(verdict(5.0, 25.0, true)));
        assert_eq!(sums.judged, 2);
        assert_eq!(sums.regret_ms, 20.0);
        assert_eq!(sums.chosen_slower_ms, 25.0);
        assert_eq!(sums.prediction_error_ms, -10.0);
        assert_eq!(sums.abs_prediction_error_ms, 30.0);
        let back = Sums::from_proto(&sums.to_proto(LANE, "latency-critical"));
        assert_eq!(back, sums);
        let mut twice = back.clone();
        twice.merge(&sums);
        assert_eq!(twice.judged, 4);
    }
}
