//! Per-request flow control on a shared router stream. Many generations share one
//! `Worker.Serve` stream, so HTTP/2's window cannot slow one of them without stalling all: the
//! router instead gives each request a token credit (`WorkerStart.credit_tokens`) and grants
//! more (`WorkerCredit`) as its client reads. A generation out of credit stops taking tokens
//! from its engine, whose bounded event buffer then pauses that sequence alone.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The tokens one generation may still send.
#[derive(Clone)]
pub struct Credit {
    tokens: Arc<Semaphore>,
    cancel: CancellationToken,
}

impl Credit {
    /// `tokens` of initial credit; `None` for a request without flow control. Credit stops
    /// mattering once `cancel` fires: the engine stops within a step, and its last tokens and
    /// result must still get out.
    pub fn new(tokens: u32, cancel: CancellationToken) -> Option<Self> {
        (tokens > 0).then(|| Self {
            tokens: Arc::new(Semaphore::new(tokens as usize)),
            cancel,
        })
    }

    /// More credit from the router.
    pub fn grant(&self, tokens: u32) {
        let room = Semaphore::MAX_PERMITS - self.tokens.available_permits();
        self.tokens.add_permits((tokens as usize).min(room));
    }

    /// Whether a token may be sent now (and spends it if so).
    pub fn try_take(&self) -> bool {
        self.cancel.is_cancelled()
            || self
                .tokens
                .try_acquire()
                .map(|permit| permit.forget())
                .is_ok()
    }

    /// Waits until a token may be sent, and spends it.
    pub async fn take(&self) {
        tokio::select! {
            permit = self.tokens.acquire() => {
                if let Ok(permit) = permit {
                    permit.forget();
                }
            }
            _ = self.cancel.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_wait_for_a_grant_and_a_cancel_lifts_the_limit() {
        let cancel = CancellationToken::new();
        let credit = Credit::new(2, cancel.clone()).expect("flow controlled");
        assert!(credit.try_take());
        assert!(credit.try_take());
        assert!(!credit.try_take(), "out of credit");
        let waiting = tokio::spawn({
            let credit = credit.clone();
            async move { credit.take().await }
        });
        credit.grant(1);
        waiting.await.expect("a grant releases the waiting token");
        assert!(!credit.try_take());
        cancel.cancel();
        assert!(credit.try_take(), "a cancelled generation sends its tail");
        credit.take().await;
        assert!(Credit::new(0, CancellationToken::new()).is_none());
    }
}
