//! A latency histogram on fixed log-spaced buckets, shared by routers (which fill one per lane
//! and second) and the control plane (which merges them across routers and reads
//! percentiles). Fixed buckets make merging exact and the size constant: ten buckets per
//! decade from 0.1 ms to 1 000 s, so a percentile is known within one bucket (±12 %).

use switchyard_proto::v1;

/// Lower edge of bucket 1; bucket 0 holds everything below.
const LOWEST_MS: f64 = 0.1;
const PER_DECADE: f64 = 10.0;
/// Bucket 0 (below 0.1 ms), 70 buckets up to 10^6 ms, and the last for everything above.
pub const BUCKETS: usize = 72;

/// Counts of latencies (ms) per bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Vec<u32>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
        }
    }
}

/// The bucket of a latency.
fn bucket(ms: f64) -> usize {
    // NaN, negatives and tiny values all land in bucket 0.
    if ms.is_nan() || ms < LOWEST_MS {
        return 0;
    }
    let i = ((ms / LOWEST_MS).log10() * PER_DECADE).floor() as usize + 1;
    i.min(BUCKETS - 1)
}

/// The value a bucket stands for: its geometric middle (its lower edge for the extremes).
fn representative(i: usize) -> f64 {
    match i {
        0 => LOWEST_MS,
        i if i == BUCKETS - 1 => LOWEST_MS * 10f64.powf((i - 1) as f64 / PER_DECADE),
        i => LOWEST_MS * 10f64.powf((i as f64 - 0.5) / PER_DECADE),
    }
}

impl Histogram {
    pub fn record(&mut self, ms: f64) {
        let i = bucket(ms);
        self.counts[i] = self.counts[i].saturating_add(1);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|&c| u64::from(c)).sum()
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
    }

    /// The `q` quantile (0..=1), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        // The rank of the quantile among the samples, 1-based (nearest-rank method).
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return Some(representative(i));
            }
        }
        Some(representative(BUCKETS - 1))
    }

    pub fn to_proto(&self) -> v1::LatencyHistogram {
        // Trailing empty buckets are left off.
        let used = self
            .counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |i| i + 1);
        v1::LatencyHistogram {
            buckets: self.counts[..used].to_vec(),
        }
    }

    /// From the wire; buckets beyond [`BUCKETS`] (a newer peer) count in the last one.
    pub fn from_proto(proto: &v1::LatencyHistogram) -> Self {
        let mut histogram = Self::default();
        for (i, &c) in proto.buckets.iter().enumerate() {
            let i = i.min(BUCKETS - 1);
            histogram.counts[i] = histogram.counts[i].saturating_add(c);
        }
        histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_bucket() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.record(f64::from(ms));
        }
        for (q, exact) in [(0.5, 500.0), (0.99, 990.0), (0.0, 1.0), (1.0, 1000.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / exact - 1.0).abs() < 0.13, "q{q}: {got} vs {exact}");
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn extremes_land_in_the_end_buckets() {
        let mut h = Histogram::default();
        h.record(0.0);
        h.record(f64::NAN);
        h.record(1e12);
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[BUCKETS - 1], 1);
        assert_eq!(h.quantile(1.0), Some(representative(BUCKETS - 1)));
    }

    #[test]
    fn merging_is_exact_and_survives_the_wire() {
        let (mut a, mut b) = (Histogram::default(), Histogram::default());
        a.record(10.0);
        b.record(10.0);
        b.record(2000.0);
        a.merge(&Histogram::from_proto(&b.to_proto()));
        assert_eq!(a.count(), 3);
        let p50 = a.quantile(0.5).unwrap();
        assert!((p50 / 10.0 - 1.0).abs() < 0.13, "{p50}");
        assert!(a.quantile(0.99).unwrap() > 1500.0);
        let long = v1::LatencyHistogram {
            buckets: vec![1; BUCKETS + 3],
        };
        assert_eq!(Histogram::from_proto(&long).count(), BUCKETS as u64 + 3);
    }
}
