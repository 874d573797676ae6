//! Keeping an etcd lease alive through etcd trouble: a keep-alive stream that fails (its etcd
//! member died or froze, the connection broke) or goes unanswered is reopened — over another
//! member, which the client's channel picks — with a short backoff, for as long as the lease's
//! TTL has not run out. The lease is given up only when etcd says it is gone (it expired or was
//! revoked) or when it could not be renewed for a whole TTL. Before, the first stream error
//! gave the lease up: a worker registered again (and, its own key still held by the old lease,
//! waited it out off the registry), a control-plane leader stepped down and revoked its own key.

use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::telemetry::ErrorChain;

/// Pauses between attempts to reopen a failed keep-alive stream: short (a lease lives a few
/// seconds), doubling to a second.
const REOPEN_FIRST: Duration = Duration::from_millis(100);
const REOPEN_MAX: Duration = Duration::from_secs(1);
/// How long a keep-alive (or opening a stream, which sends one) may go unanswered before the
/// stream is given up and reopened: a quarter of the TTL, at most this.
const ANSWER_MAX: Duration = Duration::from_secs(1);

/// Why a [`KeptLease`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLost {
    /// etcd says the lease is gone: it expired or was revoked.
    Gone,
    /// It could not be renewed for its whole TTL: it may have expired (etcd may also have
    /// extended it, e.g. on a change of etcd leader).
    Lapsed,
}

/// A lease kept alive by [`KeptLease::until_lost`]: renewed every TTL/3.
pub struct KeptLease {
    client: Client,
    id: i64,
    ttl: Duration,
    period: Duration,
    answer_within: Duration,
    /// When the lease runs out unless renewed, as this process sees it: a renewal counts from
    /// when it was asked for, so this is never later than etcd's own deadline.
    expires: Instant,
    stream: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// When the keep-alive not answered yet was sent.
    asked: Option<Instant>,
    /// When to send the next keep-alive.
    next: Instant,
    /// No stream before this (backing off after a failure).
    reopen_at: Option<Instant>,
    backoff: Backoff,
    /// Failures since the stream last worked, and when the first was.
    failures: u32,
    failing_since: Option<Instant>,
    /// Told each new `expires`.
    on_renewed: Option<Box<dyn Fn(Instant) + Send + Sync>>,
}

impl std::fmt::Debug for KeptLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptLease")
            .field("id", &self.id)
            .field("ttl", &self.ttl)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl KeptLease {
    /// Keeps lease `id`, granted with `ttl` by a request sent at `granted_at`.
    pub fn new(client: Client, id: i64, ttl: Duration, granted_at: Instant) -> Self {
        let ttl = ttl.max(Duration::from_secs(1));
        Self::resume(client, id, ttl, granted_at + ttl)
    }

    /// Keeps lease `id` of `ttl`, known to live until `expires` (its remaining TTL, asked of
    /// etcd): it is renewed at once.
    pub fn resume(client: Client, id: i64, ttl: Duration, expires: Instant) -> Self {
        let ttl = ttl.max(Duration::from_secs(1));
        let period = (ttl / 3).max(Duration::from_millis(100));
        Self {
            client,
            id,
            ttl,
            period,
            answer_within: (ttl / 4).min(ANSWER_MAX),
            expires,
            stream: None,
            asked: None,
            next: Instant::now(),
            reopen_at: None,
            backoff: Backoff::new(REOPEN_FIRST, REOPEN_MAX),
            failures: 0,
            failing_since: None,
            on_renewed: None,
        }
    }

    /// Calls `f` with the new [`KeptLease::expires`] each time the lease is renewed (and once
    /// now).
    pub fn on_renewed(mut self, f: impl Fn(Instant) + Send + Sync + 'static) -> Self {
        f(self.expires);
        self.on_renewed = Some(Box::new(f));
        self
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// When the lease runs out unless renewed, as far as this process knows (never later than
    /// etcd's deadline).
    pub fn expires(&self) -> Instant {
        self.expires
    }

    /// Keeps the lease alive; returns when it is lost. Cancel-safe: dropped, it keeps its
    /// state, and the next call carries on.
    pub async fn until_lost(&mut self) -> LeaseLost {
        loop {
            let now = Instant::now();
            if now >= self.expires {
                self.stream = None;
                self.asked = None;
                warn!(
                    lease = self.id,
                    ttl = ?self.ttl,
                    failures = self.failures,
                    "etcd lease could not be renewed within its TTL"
                );
                return LeaseLost::Lapsed;
            }
            if self.stream.is_none() {
                if let Some(at) = self.reopen_at
                    && now < at
                {
                    tokio::time::sleep_until(at.min(self.expires)).await;
                    continue;
                }
                if let Some(lost) = self.open().await {
                    return lost;
                }
                continue;
            }
            let Some((keeper, responses)) = self.stream.as_mut() else {
                continue;
            };
            let wake = match self.asked {
                Some(at) => at + self.answer_within,
                None => self.next,
            }
            .min(self.expires);
            let answer = tokio::select! {
                response = responses.message() => Some(response),
                _ = tokio::time::sleep_until(wake) => None,
            };
            match answer {
                Some(Ok(Some(r))) if r.ttl() > 0 => {
                    if let Some(at) = self.asked.take() {
                        self.renewed(at, Duration::from_secs(r.ttl().unsigned_abs()));
                        self.next = at + self.period;
                    }
                }
                Some(Ok(Some(_))) => {
                    self.stream = None;
                    return LeaseLost::Gone;
                }
                Some(Ok(None)) => self.failed("the keep-alive stream ended"),
                Some(Err(error)) => self.failed(&ErrorChain(&error).to_string()),
                None => {
                    let now = Instant::now();
                    if let Some(at) = self.asked {
                        if now >= at + self.answer_within {
                            let error =
                                format!("keep-alive unanswered after {:?}", self.answer_within);
                            self.failed(&error);
                        }
                    } else if now >= self.next {
                        match keeper.keep_alive().await {
                            Ok(()) => self.asked = Some(now),
                            Err(error) => self.failed(&ErrorChain(&error).to_string()),
                        }
                    }
                }
            }
        }
    }

    /// Opens a keep-alive stream (which renews the lease once); `Some` when etcd says the
    /// lease is gone.
    async fn open(&mut self) -> Option<LeaseLost> {
        let at = Instant::now();
        let deadline = (at + self.answer_within).min(self.expires);
        match tokio::time::timeout_at(deadline, self.client.lease_keep_alive(self.id)).await {
            Ok(Ok(stream)) => {
                self.stream = Some(stream);
                self.asked = None;
                self.renewed(at, self.ttl);
                self.next = at + self.period;
                self.working();
                None
            }
            // Opening reads the first answer: a TTL of 0 ("lease not found") is this error.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(error))) => {
                debug!(lease = self.id, error, "etcd says the lease is gone");
                Some(LeaseLost::Gone)
            }
            Ok(Err(error)) => {
                self.failed(&ErrorChain(&error).to_string());
                None
            }
            Err(_) => {
                self.failed(&format!(
                    "opening the keep-alive stream took over {:?}",
                    deadline - at
                ));
                None
            }
        }
    }

    fn renewed(&mut self, asked_at: Instant, ttl: Duration) {
        self.expires = self.expires.max(asked_at + ttl);
        if let Some(f) = &self.on_renewed {
            f(self.expires);
        }
    }

    fn working(&mut self) {
        if let Some(since) = self.failing_since.take() {
            info!(
                lease = self.id,
                failures = self.failures,
                failing_for = ?since.elapsed(),
                "etcd lease keep-alive working again"
            );
        }
        self.failures = 0;
        self.backoff.reset();
        self.reopen_at = None;
    }

    /// The stream failed: drop it and reopen it after a pause.
    fn failed(&mut self, error: &str) {
        self.stream = None;
        self.asked = None;
        let now = Instant::now();
        let delay = self.backoff.next_delay();
        self.reopen_at = Some(now + delay);
        self.failures += 1;
        self.failing_since.get_or_insert(now);
        let left = self.expires.saturating_duration_since(now);
        if self.failures == 1 {
            warn!(lease = self.id, error, lease_left = ?left, retry_in = ?delay, "etcd lease keep-alive failed; keeping the lease, renewing it over another connection while its TTL lasts");
        } else {
            debug!(lease = self.id, error, failures = self.failures, lease_left = ?left, retry_in = ?delay, "etcd lease keep-alive failed again");
        }
    }
}
