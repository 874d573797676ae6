//! Whether the router can route yet. A router starts (listens, answers health checks) before
//! the cluster registry answers; until then it is not ready, says why, and refuses requests
//! with `UNAVAILABLE` rather than judging models unknown from an empty view.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

use crate::error::DispatchError;

#[derive(Debug)]
pub struct Readiness {
    /// `None` once ready; otherwise why not.
    waiting: RwLock<Option<String>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::ready()
    }
}

impl Readiness {
    pub fn ready() -> Self {
        Self {
            waiting: RwLock::new(None),
        }
    }

    pub fn waiting(reason: impl Into<String>) -> Self {
        Self {
            waiting: RwLock::new(Some(reason.into())),
        }
    }

    /// Why the router cannot route yet; `None` when it can.
    pub fn reason(&self) -> Option<String> {
        self.waiting.read().expect("readiness lock").clone()
    }

    pub fn is_ready(&self) -> bool {
        self.waiting.read().expect("readiness lock").is_none()
    }

    pub fn set_waiting(&self, reason: impl Into<String>) {
        *self.waiting.write().expect("readiness lock") = Some(reason.into());
    }

    pub fn set_ready(&self) {
        *self.waiting.write().expect("readiness lock") = None;
    }

    /// `UNAVAILABLE` naming the reason, while not ready.
    pub fn check(&self) -> Result<(), DispatchError> {
        match self.reason() {
            None => Ok(()),
            Some(reason) => Err(DispatchError::Unavailable(format!(
                "router not ready: {reason}; retry shortly"
            ))),
        }
    }
}

/// Requests admitted and not yet ended: a shutting-down router keeps its worker links until
/// this is zero, so streams in flight finish instead of failing.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    /// Counts a request until the guard drops.
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Returns once no request is in flight.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so a last request ending in between still wakes us.
            idle.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One request in flight (see [`InFlight`]).
#[derive(Debug)]
pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drained_waits_for_the_last_request_to_end() {
        let in_flight = Arc::new(InFlight::default());
        in_flight.drained().await;
        let first = in_flight.enter();
        let second = in_flight.enter();
        let waiter = {
            let in_flight = in_flight.clone();
            tokio::spawn(async move { in_flight.drained().await })
        };
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one request is still in flight");
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("drained once the last request ended")
            .unwrap();
        assert_eq!(in_flight.count(), 0);
    }
}
