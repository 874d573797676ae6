//! A histogram that takes `n` equal observations in one step. A worker sends tokens in chunks,
//! and a chunk of `n` tokens that took `gap` is `n` inter-token gaps of `gap / n`:
//! `prometheus_client`'s histogram would take them one call (and one lock) at a time, per token
//! of every stream sharing the series.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Classic buckets, a count and a sum; clones share the series.
#[derive(Debug, Clone)]
pub struct WeightedHistogram {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    sum: f64,
    count: u64,
    /// Upper bound and the observations in that bucket alone (the encoder accumulates).
    buckets: Vec<(f64, u64)>,
}

impl WeightedHistogram {
    /// A histogram over `bounds` (ascending finite upper bounds; `+Inf` is added).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let buckets = bounds
            .into_iter()
            .filter(|bound| bound.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .map(|bound| (bound, 0))
            .collect();
        Self {
            inner: Arc::new(Mutex::new(Inner {
                sum: 0.0,
                count: 0,
                buckets,
            })),
        }
    }

    /// Observes `value` `n` times.
    pub fn observe_n(&self, value: f64, n: u64) {
        if n == 0 {
            return;
        }
        let mut inner = self.inner.lock().expect("histogram lock");
        inner.sum += value * n as f64;
        inner.count += n;
        let last = inner.buckets.len() - 1;
        let bucket = inner
            .buckets
            .iter()
            .position(|(bound, _)| value <= *bound)
            .unwrap_or(last);
        inner.buckets[bucket].1 += n;
    }
}

impl TypedMetric for WeightedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for WeightedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = self.inner.lock().expect("histogram lock");
        encoder.encode_histogram::<NoLabelSet>(inner.sum, inner.count, &inner.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::{Metric, Registry};

    use super::*;

    fn encoded(metric: impl Metric) -> String {
        let mut registry = Registry::default();
        registry.register("gaps", "gaps", metric);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn n_observations_at_once_encode_as_n_observations_one_by_one() {
        let bounds = [0.001, 0.01, 0.1];
        let (weighted, reference) = (WeightedHistogram::new(bounds), Histogram::new(bounds));
        // Below the first bound, inside, on a bound, past the last, and nothing.
        for (value, n) in [(0.0005, 3), (0.004, 16), (0.01, 1), (0.5, 2), (0.02, 0)] {
            weighted.observe_n(value, n);
            for _ in 0..n {
                reference.observe(value);
            }
        }
        let ours = encoded(weighted);
        assert_eq!(ours, encoded(reference));
        assert!(ours.contains("gaps_count 22"), "{ours}");
        assert!(ours.contains("gaps_bucket{le=\"0.01\"} 20"), "{ours}");
    }
}
