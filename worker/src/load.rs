//! The worker's live load: requests in flight (across all router streams), engine queue, decode
//! rate, drain state. Every router stream subscribes and forwards each change as a `Load` frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use switchyard_proto::v1;
use tokio::sync::watch;

use crate::engine::Engine;

pub struct LoadTracker {
    engine: Arc<dyn Engine>,
    in_flight: AtomicU32,
    tokens: AtomicU64,
    tokens_per_s_bits: AtomicU64,
    draining: AtomicBool,
    changes: watch::Sender<v1::Load>,
}

impl LoadTracker {
    pub fn new(engine: Arc<dyn Engine>) -> Arc<Self> {
        let (changes, _) = watch::channel(v1::Load::default());
        let tracker = Arc::new(Self {
            engine,
            in_flight: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            tokens_per_s_bits: AtomicU64::new(0f64.to_bits()),
            draining: AtomicBool::new(false),
            changes,
        });
        tracker.publish();
        tracker
    }

    pub fn snapshot(&self) -> v1::Load {
        let engine = self.engine.load();
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let prefill_rate = engine.prefill_tokens_per_s;
        v1::Load {
            active: in_flight.saturating_sub(engine.queued),
            queued: engine.queued,
            max_concurrent: self.engine.max_concurrent(),
            kv_used_bytes: engine.kv_used_bytes,
            tokens_per_s: f64::from_bits(self.tokens_per_s_bits.load(Ordering::Relaxed)),
            draining: self.draining.load(Ordering::Relaxed),
            queued_prompt_tokens: engine.queued_prompt_tokens,
            queued_latency_critical_prompt_tokens: engine.queued_latency_critical_prompt_tokens,
            // A rate that is not a positive number is "not reported" on the wire.
            prefill_tokens_per_s: if prefill_rate.is_finite() && prefill_rate > 0.0 {
                prefill_rate
            } else {
                0.0
            },
            first_token_delay_ms: engine
                .first_token_delay_ms
                .filter(|d| d.is_finite() && *d >= 0.0),
            prefill_chunk_tokens: engine.prefill_chunk_tokens.filter(|c| *c > 0),
            // Per stream: the Serve stream that sends this report fills it in.
            starts_seen: None,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<v1::Load> {
        self.changes.subscribe()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.publish();
    }

    pub fn finished(&self, tokens: u32) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
        self.publish();
    }

    /// Stops (`true`) or resumes (`false`) taking new requests; in-flight ones continue.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
        self.publish();
    }

    fn publish(&self) {
        let snapshot = self.snapshot();
        self.changes.send_if_modified(|current| {
            let changed = *current != snapshot;
            *current = snapshot;
            changed
        });
    }

    /// Keeps `tokens_per_s` current and republishes queue changes the engine made on its own.
    pub async fn run_sampler(self: Arc<Self>, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        let mut last = self.tokens.load(Ordering::Relaxed);
        loop {
            ticks.tick().await;
            let now = self.tokens.load(Ordering::Relaxed);
            let rate = (now - last) as f64 / period.as_secs_f64();
            last = now;
            self.tokens_per_s_bits
                .store(rate.to_bits(), Ordering::Relaxed);
            self.publish();
            if self.changes.is_closed() && Arc::strong_count(&self) == 1 {
                return;
            }
        }
    }
}

/// A rate (e.g. prompt tokens per second) averaged over recent samples, shared lock-free
/// between the engine thread that measures it and the load reports that read it. Zero until
/// the first sample.
#[derive(Debug, Default)]
pub struct RateMeter {
    bits: std::sync::atomic::AtomicU64,
}

impl RateMeter {
    /// Weight of the newest sample in the exponential moving average.
    const WEIGHT: f64 = 0.2;

    /// Folds in `units` done in `seconds` (ignored when no time passed).
    pub fn record(&self, units: f64, seconds: f64) {
        if seconds <= 0.0 {
            return;
        }
        let rate = units / seconds;
        let old = self.get();
        let new = if old > 0.0 {
            old + Self::WEIGHT * (rate - old)
        } else {
            rate
        };
        self.bits
            .store(new.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// The current average; 0 before any sample.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(test)]
mod rate_meter_tests {
    use super::RateMeter;

    #[test]
    fn first_sample_sets_the_rate_then_later_ones_move_it_a_fifth_of_the_way() {
        let m = RateMeter::default();
        assert_eq!(m.get(), 0.0);
        m.record(100.0, 0.0);
        assert_eq!(m.get(), 0.0);
        m.record(100.0, 1.0);
        assert_eq!(m.get(), 100.0);
        m.record(200.0, 1.0);
        assert!((m.get() - 120.0).abs() < 1e-9);
    }
}
