//! A latency histogram on fixed log-spaced buckets, shared by routers (which fill one per lane
//! and second) and the control plane (which merges them across routers and reads
//! percentiles). Fixed buckets make merging exact and the size constant: a hundred buckets per
//! decade from 0.1 ms to 1 000 s, each 2.3 % wide, so a percentile read as its bucket's
//! geometric middle is within ±1.2 % of the exact one. (Ten per decade, the first layout, were
//! ±12 %: a p99 of 300 ms could read 266 or 335.) Histograms from a peer on the old layout
//! are still read, at their resolution.

use switchyard_proto::v1;

/// Lower edge of bucket 1; bucket 0 holds everything below.
const LOWEST_MS: f64 = 0.1;
pub const PER_DECADE: u32 = 100;
/// The layout a peer means when it does not say (`per_decade` = 0).
const LEGACY_PER_DECADE: u32 = 10;
/// Decades from 0.1 ms to 10^6 ms.
const DECADES: u32 = 7;
/// Bucket 0 (below 0.1 ms), 700 buckets up to 10^6 ms, and the last for everything above.
pub const BUCKETS: usize = (DECADES * PER_DECADE) as usize + 2;

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

/// The bucket of a latency on a layout of `per_decade` buckets per decade.
fn bucket_of(ms: f64, per_decade: u32) -> usize {
    // NaN, negatives and tiny values all land in bucket 0.
    if ms.is_nan() || ms < LOWEST_MS {
        return 0;
    }
    let last = (DECADES * per_decade) as usize + 1;
    let i = ((ms / LOWEST_MS).log10() * f64::from(per_decade)).floor() as usize + 1;
    i.min(last)
}

fn bucket(ms: f64) -> usize {
    bucket_of(ms, PER_DECADE)
}

/// The value bucket `i` of a `per_decade` layout stands for: its geometric middle (its lower
/// edge for the extremes).
fn representative_of(i: usize, per_decade: u32) -> f64 {
    let last = (DECADES * per_decade) as usize + 1;
    let per_decade = f64::from(per_decade);
    match i {
        0 => LOWEST_MS,
        i if i >= last => LOWEST_MS * 10f64.powf((last - 1) as f64 / per_decade),
        i => LOWEST_MS * 10f64.powf((i as f64 - 0.5) / per_decade),
    }
}

fn representative(i: usize) -> f64 {
    representative_of(i, PER_DECADE)
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
            per_decade: PER_DECADE,
        }
    }

    /// From the wire. A peer on another layout (the old ten per decade) has each bucket
    /// counted where its middle falls; buckets beyond the last count in the last one.
    pub fn from_proto(proto: &v1::LatencyHistogram) -> Self {
        let per_decade = match proto.per_decade {
            0 => LEGACY_PER_DECADE,
            n => n,
        };
        let mut histogram = Self::default();
        for (i, &c) in proto.buckets.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let i = if per_decade == PER_DECADE {
                i.min(BUCKETS - 1)
            } else {
                match i {
                    0 => 0,
                    i if i > (DECADES * per_decade) as usize => BUCKETS - 1,
                    i => bucket(representative_of(i, per_decade)),
                }
            };
            histogram.counts[i] = histogram.counts[i].saturating_add(c);
        }
        histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact nearest-rank quantile of `sorted`.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
        sorted[rank - 1]
    }

    #[test]
    fn quantiles_are_within_1_2_percent_of_the_exact_ones() {
        let mut h = Histogram::default();
        for ms in 1..=1000 {
            h.record(f64::from(ms));
        }
        for (q, exact) in [(0.5, 500.0), (0.99, 990.0), (0.0, 1.0), (1.0, 1000.0)] {
            let got = h.quantile(q).unwrap();
            assert!((got / exact - 1.0).abs() <= 0.012, "q{q}: {got} vs {exact}");
        }
        assert_eq!(Histogram::default().quantile(0.5), None);
        // Skewed latencies, as TTFTs are (a log-normal-ish spread from 2 ms to 20 s), against
        // the exact percentiles of the same samples.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut samples: Vec<f64> = (0..20_000)
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                2.0 * 10f64.powf(4.0 * u * u)
            })
            .collect();
        let mut h = Histogram::default();
        samples.iter().for_each(|&ms| h.record(ms));
        samples.sort_by(f64::total_cmp);
        for q in [0.01, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999] {
            let (got, want) = (h.quantile(q).unwrap(), exact(&samples, q));
            assert!((got / want - 1.0).abs() <= 0.012, "q{q}: {got} vs {want}");
        }
    }

    #[test]
    fn a_peer_on_the_old_ten_per_decade_layout_is_read_at_its_resolution() {
        // 100 ms on the old layout: bucket 1 + floor(log10(1000) * 10) = 31.
        let mut buckets = vec![0; 32];
        buckets[31] = 4;
        let old = Histogram::from_proto(&v1::LatencyHistogram {
            buckets,
            per_decade: 0,
        });
        assert_eq!(old.count(), 4);
        let p50 = old.quantile(0.5).unwrap();
        assert!((p50 / 112.2 - 1.0).abs() < 0.02, "{p50}");
        // Merged with this layout's, both count.
        let mut h = Histogram::default();
        h.record(100.0);
        h.merge(&old);
        assert_eq!(h.count(), 5);
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
        assert!((p50 / 10.0 - 1.0).abs() <= 0.012, "{p50}");
        assert!(a.quantile(0.99).unwrap() > 1500.0);
        let long = v1::LatencyHistogram {
            buckets: vec![1; BUCKETS + 3],
            per_decade: PER_DECADE,
        };
        assert_eq!(Histogram::from_proto(&long).count(), BUCKETS as u64 + 3);
    }
}
