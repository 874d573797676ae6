//! The worker's live load: requests in flight (across all router streams), engine queue, decode
//! rate, drain state. Every router stream subscribes and forwards its changes as `Load` frames,
//! paced by a [`ReportPacer`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use switchyard_proto::v1;
use tokio::sync::watch;
use tokio::time::Instant;

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

/// How often a router stream may carry a load report. Every start and every finish changes the
/// load: unpaced, a busy worker sent a report per change, up to two per request (~3 µs of the
/// worker's and its reader's CPU a request at 70 000 requests/s). The router counts the starts
/// it sent and the generations it saw finish itself, so a report a millisecond late only
/// delays what it learns of the worker's own queue.
pub const LOAD_REPORT_INTERVAL: Duration = Duration::from_millis(1);

/// Paces one stream's load reports: a change is reported at once unless a report went out less
/// than an interval ago; then it is held, and the report that ends the pause carries every
/// change made meanwhile.
#[derive(Debug)]
pub struct ReportPacer {
    interval: Duration,
    /// When the next report may go.
    next: Option<Instant>,
    /// A change waits for `next`.
    held: bool,
}

impl ReportPacer {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: None,
            held: false,
        }
    }

    /// Whether a change made `now` may be reported at once. If not, it is held (see
    /// [`ReportPacer::due`]).
    pub fn may_report(&mut self, now: Instant) -> bool {
        if self.next.is_some_and(|next| next > now) {
            self.held = true;
            return false;
        }
        true
    }

    /// A report went out at `now`.
    pub fn reported(&mut self, now: Instant) {
        self.held = false;
        self.next = Some(now + self.interval);
    }

    /// A change is held: stop listening for more until [`ReportPacer::due`].
    pub fn holding(&self) -> bool {
        self.held
    }

    /// Completes when a held change is due; never while none is held.
    pub async fn due(&self) {
        match (self.held, self.next) {
            (true, Some(next)) => tokio::time::sleep_until(next).await,
            _ => std::future::pending().await,
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

#[cfg(test)]
mod report_pacer_tests {
    use super::*;

    #[test]
    fn a_change_after_a_quiet_interval_is_reported_at_once_and_one_within_it_is_held() {
        let interval = Duration::from_millis(1);
        let mut pacer = ReportPacer::new(interval);
        let start = Instant::now();
        assert!(pacer.may_report(start), "the first report goes at once");
        pacer.reported(start);
        assert!(!pacer.holding());
        assert!(!pacer.may_report(start + interval / 2));
        assert!(pacer.holding(), "a change within the interval waits");
        pacer.reported(start + interval);
        assert!(!pacer.holding());
        assert!(
            pacer.may_report(start + interval * 3),
            "after a quiet interval: at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_change_is_due_when_the_interval_since_the_last_report_ends() {
        let interval = Duration::from_millis(1);
        let mut pacer = ReportPacer::new(interval);
        let sent = Instant::now();
        pacer.reported(sent);
        assert!(!pacer.may_report(sent));
        pacer.due().await;
        assert_eq!(Instant::now(), sent + interval);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_due_while_nothing_is_held() {
        let mut pacer = ReportPacer::new(Duration::from_millis(1));
        pacer.reported(Instant::now());
        let waited = tokio::time::timeout(Duration::from_secs(1), pacer.due()).await;
        assert!(waited.is_err(), "due() completed with nothing held");
    }
}
