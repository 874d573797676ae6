//! Whether the router can route yet. A router starts (listens, answers health checks) before
//! the cluster registry answers; until then it is not ready, says why, and refuses requests
//! with `UNAVAILABLE` rather than judging models unknown from an empty view. It is not ready
//! either while it has no valid routing policy (the stored document is invalid and it never
//! had a valid one to keep), nor once it is shutting down.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, watch};

use crate::error::DispatchError;

/// A condition the router waits on before it routes. While several hold, the first in this
/// order is the one reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Gate {
    /// Shutting down: requests in flight finish, new ones are refused.
    ShuttingDown,
    /// The cluster registry has not answered yet.
    Registry,
    /// No valid routing policy: the stored one is invalid and the router has none to keep.
    Policy,
}

#[derive(Debug)]
pub struct Readiness {
    /// The gates closed, each with why; ready when empty.
    waiting: RwLock<BTreeMap<Gate, String>>,
    /// Whether the router is ready, for whoever mirrors it (gRPC health).
    ready: watch::Sender<bool>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::ready()
    }
}

impl Readiness {
    pub fn ready() -> Self {
        Self {
            waiting: RwLock::new(BTreeMap::new()),
            ready: watch::channel(true).0,
        }
    }

    /// Not ready until `gate` opens.
    pub fn waiting(gate: Gate, reason: impl Into<String>) -> Self {
        let readiness = Self::ready();
        readiness.set_waiting(gate, reason);
        readiness
    }

    /// Why the router cannot route yet; `None` when it can. Clients and the public `/health`
    /// see it: it names what is missing, never addresses or internal errors (those are logged).
    pub fn reason(&self) -> Option<String> {
        let waiting = self.waiting.read().expect("readiness lock");
        waiting.values().next().cloned()
    }

    pub fn is_ready(&self) -> bool {
        self.waiting.read().expect("readiness lock").is_empty()
    }

    /// Closes `gate` (or changes its reason).
    pub fn set_waiting(&self, gate: Gate, reason: impl Into<String>) {
        let mut waiting = self.waiting.write().expect("readiness lock");
        waiting.insert(gate, reason.into());
        self.ready
            .send_if_modified(|ready| std::mem::replace(ready, false));
    }

    /// Opens `gate`; the router is ready once no gate is closed.
    pub fn set_ready(&self, gate: Gate) {
        let mut waiting = self.waiting.write().expect("readiness lock");
        waiting.remove(&gate);
        let now = waiting.is_empty();
        self.ready
            .send_if_modified(|ready| std::mem::replace(ready, now) != now);
    }

    /// Follows whether the router is ready (for the gRPC health status).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
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

    #[test]
    fn the_router_is_ready_once_every_gate_is_open() {
        let readiness = Readiness::waiting(Gate::Registry, "connecting");
        let ready = readiness.subscribe();
        assert!(!*ready.borrow());
        readiness.set_waiting(Gate::Policy, "no valid routing policy");
        assert_eq!(readiness.reason().as_deref(), Some("connecting"));
        readiness.set_ready(Gate::Registry);
        assert_eq!(
            readiness.reason().as_deref(),
            Some("no valid routing policy"),
            "the registry answering does not make up for the policy"
        );
        assert!(!readiness.is_ready() && !*ready.borrow());
        assert!(readiness.check().is_err());
        readiness.set_ready(Gate::Policy);
        assert!(readiness.is_ready() && *ready.borrow());
        assert!(readiness.check().is_ok());
        readiness.set_waiting(Gate::ShuttingDown, "shutting down");
        readiness.set_waiting(Gate::Policy, "no valid routing policy");
        assert_eq!(readiness.reason().as_deref(), Some("shutting down"));
        assert!(!*ready.borrow());
    }

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
