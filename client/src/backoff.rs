//! Exponential backoff with jitter between attempts to reopen a session. The cluster crate has
//! the same helper; this copy keeps the client free of its etcd and server dependencies.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    /// Pauses start around `initial` and grow to at most `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            current: initial.min(max),
            max,
        }
    }

    /// The next pause: uniform in `[d/2, d]` for the current ceiling `d`, which then doubles.
    /// Drawn at random so that the clients of one restarted router do not retry in lockstep.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_ceiling_with_jitter_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for ceiling in [100, 200, 400, 800, 1600, 3200, 5000, 5000] {
            let ceiling = Duration::from_millis(ceiling);
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} outside [{:?}, {ceiling:?}]",
                ceiling / 2
            );
        }
    }
}
