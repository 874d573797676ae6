//! Whether the router can route yet. A router starts (listens, answers health checks) before
//! the cluster registry answers; until then it is not ready, says why, and refuses requests
//! with `UNAVAILABLE` rather than judging models unknown from an empty view.

use std::sync::RwLock;

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
