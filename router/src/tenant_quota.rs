//! Tenant quotas at the router (the policy's `quotas`): requests in flight, tokens per minute
//! (a token bucket), a token budget per period and the lanes a tenant may use. Each router
//! enforces them on the traffic passing through it, like a local rate limit: behind N routers a
//! tenant gets up to N times its limits, so operators divide cluster-wide figures by N.
//!
//! The tenant is the request metadata `tenant`: the API key's tenant when keys are configured
//! (clients cannot choose it), else what the client sent. Requests naming no tenant are not
//! limited.
//!
//! Tokens are prompt + completion. A request reserves its prompt and its `max_tokens` when it
//! is admitted (so a burst cannot overrun the limit before any of it finishes) and is charged
//! what it really used when it ends; the bucket may go below zero when a request used more
//! than the bucket held, which delays the tenant's next requests by exactly that debt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::classify::Classification;
use crate::policy::document::{DisallowedLane, LaneName, PolicyDocument, TenantLimits};

/// Which limit refused a request; the `limit` label of `switchyard_router_quota_refusals`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaLimit {
    InFlight,
    TokensPerMinute,
    TokenBudget,
    Lane,
}

impl QuotaLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaLimit::InFlight => "max_in_flight",
            QuotaLimit::TokensPerMinute => "tokens_per_minute",
            QuotaLimit::TokenBudget => "token_budget",
            QuotaLimit::Lane => "lanes",
        }
    }
}

/// A request refused by its tenant's quota.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    pub limit: QuotaLimit,
    pub message: String,
    /// When the request could be admitted, if waiting helps (not for a refused lane).
    pub retry_after_ms: Option<u64>,
}

/// `class` with its lane restricted to the lanes `limits` allow: moved to the other lane when
/// the tenant's policy downgrades, refused when it refuses.
pub fn restrict_lane(
    tenant: &str,
    limits: &TenantLimits,
    class: Classification,
    policy: &PolicyDocument,
    request_slo_ms: u32,
) -> Result<Classification, QuotaExceeded> {
    if limits.allows(class.lane) {
        return Ok(class);
    }
    let allowed = LaneName::ALL.into_iter().find(|&lane| limits.allows(lane));
    match (limits.disallowed_lane.unwrap_or_default(), allowed) {
        (DisallowedLane::Downgrade, Some(lane)) => {
            let lane_policy = policy.lane(lane);
            Ok(Classification {
                lane,
                ttft_slo_ms: if request_slo_ms > 0 {
                    f64::from(request_slo_ms)
                } else {
                    lane_policy.ttft_slo_ms
                },
                min_tokens_per_s: lane_policy.min_tokens_per_s,
                reason: format!(
                    "{}; tenant {tenant:?} may not use {}, lane={}",
                    class.reason,
                    class.lane.as_str(),
                    lane.as_str()
                ),
            })
        }
        _ => Err(QuotaExceeded {
            limit: QuotaLimit::Lane,
            message: format!(
                "tenant {tenant:?} may not use the {} lane (policy quotas, `lanes`); send the \
                 request as cost-sensitive or ask an operator for access",
                class.lane.as_str()
            ),
            retry_after_ms: None,
        }),
    }
}

/// A token bucket: `level` tokens now (below zero while in debt), refilled at `capacity` per
/// minute up to `capacity`.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    level: f64,
    refilled: Instant,
}

impl Bucket {
    fn new(capacity: f64, now: Instant) -> Self {
        Self {
            capacity,
            level: capacity,
            refilled: now,
        }
    }

    fn per_ms(&self) -> f64 {
        self.capacity / 60_000.0
    }

    fn refill(&mut self, capacity: f64, now: Instant) {
        let elapsed_ms = now.saturating_duration_since(self.refilled).as_secs_f64() * 1e3;
        self.capacity = capacity;
        self.level = (self.level + elapsed_ms * self.per_ms()).min(capacity);
        self.refilled = now;
    }

    fn full(&self) -> bool {
        self.level >= self.capacity
    }
}

/// Tokens used in one budget period.
#[derive(Debug)]
struct BudgetUse {
    period_s: u64,
    period: u64,
    used: u64,
}

/// What one tenant has in flight and has used.
#[derive(Debug, Default)]
struct TenantState {
    in_flight: u32,
    bucket: Option<Bucket>,
    budget: Option<BudgetUse>,
}

impl TenantState {
    /// Whether forgetting this tenant changes nothing: nothing in flight, a full bucket, no
    /// budget used in the current period.
    fn idle(&self, unix_s: u64) -> bool {
        self.in_flight == 0
            && self.bucket.as_ref().is_none_or(Bucket::full)
            && self
                .budget
                .as_ref()
                .is_none_or(|b| b.used == 0 || b.period != unix_s / b.period_s)
    }
}

/// Tenants tracked before idle ones are swept out (a client choosing tenant names freely, when
/// the router has no API keys, must not grow the map without bound).
const SWEEP_ABOVE: usize = 4096;

/// Every tenant's use of its quota at this router.
#[derive(Clone)]
pub struct TenantQuota {
    /// `max_in_flight` for tenants whose quotas set none (router `--max-tenant-requests`; 0:
    /// none).
    fallback_max_in_flight: u32,
    tenants: Arc<Mutex<HashMap<String, TenantState>>>,
}

/// One request's place in its tenant's quota. Dropping it ends the request: the place is freed
/// and the tokens reserved are settled against what [`TenantPermit::charge`] recorded.
pub struct TenantPermit {
    tenants: Arc<Mutex<HashMap<String, TenantState>>>,
    tenant: String,
    reserved: u64,
    used: u64,
}

impl TenantPermit {
    /// Records the tokens (prompt + completion) the request really used.
    pub fn charge(&mut self, used: u64) {
        self.used = used;
    }
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = tenants.get_mut(&self.tenant) else {
            return;
        };
        state.in_flight = state.in_flight.saturating_sub(1);
        let delta = self.used as f64 - self.reserved as f64;
        if let Some(bucket) = &mut state.bucket {
            bucket.level = (bucket.level - delta).min(bucket.capacity);
        }
        if let Some(budget) = &mut state.budget {
            budget.used = (budget.used + self.used).saturating_sub(self.reserved);
        }
        if state.in_flight == 0
            && state.bucket.as_ref().is_none_or(Bucket::full)
            && state.budget.is_none()
        {
            tenants.remove(&self.tenant);
        }
    }
}

fn unix_now() -> (u64, u64) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (since.as_secs(), since.as_millis() as u64)
}

impl TenantQuota {
    pub fn new(fallback_max_in_flight: u32) -> Self {
        Self {
            fallback_max_in_flight,
            tenants: Arc::default(),
        }
    }

    /// Admits a request of `tenant` that may use up to `tokens` (prompt + `max_tokens`) under
    /// `limits`: `Ok(None)` when it names no tenant or the tenant has no limits.
    pub fn acquire(
        &self,
        tenant: Option<&str>,
        limits: &TenantLimits,
        tokens: u64,
    ) -> Result<Option<TenantPermit>, QuotaExceeded> {
        let (unix_s, unix_ms) = unix_now();
        self.acquire_at(tenant, limits, tokens, Instant::now(), unix_s, unix_ms)
    }

    fn acquire_at(
        &self,
        tenant: Option<&str>,
        limits: &TenantLimits,
        tokens: u64,
        now: Instant,
        unix_s: u64,
        unix_ms: u64,
    ) -> Result<Option<TenantPermit>, QuotaExceeded> {
        let Some(tenant) = tenant.filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        let max_in_flight = limits
            .max_in_flight
            .or((self.fallback_max_in_flight > 0).then_some(self.fallback_max_in_flight));
        if max_in_flight.is_none()
            && limits.tokens_per_minute.is_none()
            && limits.token_budget.is_none()
        {
            return Ok(None);
        }
        let mut tenants = self.tenants.lock().expect("tenant quota lock");
        if tenants.len() > SWEEP_ABOVE {
            tenants.retain(|_, state| {
                if let Some(bucket) = &mut state.bucket {
                    let capacity = bucket.capacity;
                    bucket.refill(capacity, now);
                }
                !state.idle(unix_s)
            });
        }
        let state = tenants.entry(tenant.to_string()).or_default();
        if let Some(max) = max_in_flight
            && state.in_flight >= max
        {
            return Err(QuotaExceeded {
                limit: QuotaLimit::InFlight,
                message: format!(
                    "tenant {tenant:?} already has {max} requests in flight, its limit (policy \
                     quotas `max_in_flight`, or router --max-tenant-requests); retry when one \
                     of them ends"
                ),
                retry_after_ms: Some(1_000),
            });
        }
        match limits.tokens_per_minute {
            Some(per_minute) => {
                let capacity = per_minute as f64;
                let bucket = state
                    .bucket
                    .get_or_insert_with(|| Bucket::new(capacity, now));
                bucket.refill(capacity, now);
                // A request larger than the whole bucket waits for a full one (then runs in
                // debt) instead of never running.
                let needed = (tokens as f64).min(capacity);
                if bucket.level < needed {
                    let wait_ms = ((needed - bucket.level) / bucket.per_ms()).ceil() as u64;
                    return Err(QuotaExceeded {
                        limit: QuotaLimit::TokensPerMinute,
                        message: format!(
                            "tenant {tenant:?} is over its {per_minute} tokens per minute (policy \
                             quotas `tokens_per_minute`): this request reserves up to {tokens} \
                             tokens (prompt + max_tokens) and {} are available now; retry after \
                             {wait_ms} ms or lower max_tokens",
                            bucket.level.max(0.0).floor()
                        ),
                        retry_after_ms: Some(wait_ms.max(1)),
                    });
                }
            }
            None => state.bucket = None,
        }
        match limits.token_budget {
            Some(budget) => {
                let period = unix_s / budget.period_s;
                let fresh = BudgetUse {
                    period_s: budget.period_s,
                    period,
                    used: 0,
                };
                let use_ = state.budget.get_or_insert(BudgetUse { used: 0, ..fresh });
                if use_.period != period || use_.period_s != budget.period_s {
                    *use_ = fresh;
                }
                if use_.used + tokens > budget.tokens {
                    let resets_ms = (period + 1) * budget.period_s * 1_000
                        - unix_ms.min((period + 1) * budget.period_s * 1_000);
                    return Err(QuotaExceeded {
                        limit: QuotaLimit::TokenBudget,
                        message: format!(
                            "tenant {tenant:?} has used {} of its {} tokens for this {} s period \
                             (policy quotas `token_budget`) and this request reserves up to \
                             {tokens} (prompt + max_tokens); the budget resets in {} s",
                            use_.used,
                            budget.tokens,
                            budget.period_s,
                            resets_ms.div_ceil(1_000)
                        ),
                        retry_after_ms: Some(resets_ms.max(1)),
                    });
                }
            }
            None => state.budget = None,
        }
        state.in_flight += 1;
        if let Some(bucket) = &mut state.bucket {
            bucket.level -= tokens as f64;
        }
        if let Some(budget) = &mut state.budget {
            budget.used += tokens;
        }
        Ok(Some(TenantPermit {
            tenants: self.tenants.clone(),
            tenant: tenant.to_string(),
            reserved: tokens,
            used: 0,
        }))
    }

    /// Requests of `tenant` in flight.
    pub fn in_flight(&self, tenant: &str) -> u32 {
        let tenants = self.tenants.lock().expect("tenant quota lock");
        tenants.get(tenant).map(|s| s.in_flight).unwrap_or(0)
    }

    /// Tenants tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.tenants.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(json: &str) -> TenantLimits {
        serde_json::from_str(json).expect("valid limits")
    }

    #[test]
    fn a_tenant_at_its_limit_is_refused_until_a_request_ends() {
        let quota = TenantQuota::new(2);
        let none = TenantLimits::default();
        let a = quota.acquire(Some("acme"), &none, 10).unwrap();
        let _b = quota.acquire(Some("acme"), &none, 10).unwrap();
        let refused = quota
            .acquire(Some("acme"), &none, 10)
            .err()
            .expect("third is refused");
        assert_eq!(refused.limit, QuotaLimit::InFlight);
        let status = crate::error::DispatchError::OverQuota(refused.clone()).status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--max-tenant-requests"));
        assert!(status.metadata().get("retry-after").is_some());
        // Another tenant is unaffected.
        assert!(quota.acquire(Some("globex"), &none, 10).unwrap().is_some());
        drop(a);
        assert_eq!(quota.in_flight("acme"), 1);
        assert!(quota.acquire(Some("acme"), &none, 10).unwrap().is_some());
        // The policy's own limit wins over the router flag.
        let one = limits(r#"{"max_in_flight": 1}"#);
        let _held = quota.acquire(Some("initech"), &one, 10).unwrap();
        assert!(_held.is_some());
        assert_eq!(
            quota
                .acquire(Some("initech"), &one, 10)
                .err()
                .unwrap()
                .limit,
            QuotaLimit::InFlight
        );
    }

    #[test]
    fn no_limit_or_no_tenant_is_not_counted_and_idle_tenants_are_forgotten() {
        let none = TenantLimits::default();
        assert!(
            TenantQuota::new(0)
                .acquire(Some("acme"), &none, 1)
                .unwrap()
                .is_none()
        );
        let quota = TenantQuota::new(1);
        assert!(quota.acquire(None, &none, 1).unwrap().is_none());
        assert!(quota.acquire(Some(""), &none, 1).unwrap().is_none());
        drop(quota.acquire(Some("acme"), &none, 1).unwrap());
        assert_eq!(quota.tracked(), 0);
    }

    #[test]
    fn tokens_per_minute_reserve_then_charge_what_was_used_and_refill_over_time() {
        let quota = TenantQuota::new(0);
        let tpm = limits(r#"{"tokens_per_minute": 6000}"#);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // 6 000 per minute = 100 per second. Reserve 4 000, use 1 000: 5 000 left.
        let mut first = quota
            .acquire_at(Some("a"), &tpm, 4_000, at(0), 0, 0)
            .unwrap()
            .unwrap();
        let refused = quota
            .acquire_at(Some("a"), &tpm, 2_500, at(0), 0, 0)
            .err()
            .unwrap();
        assert_eq!(refused.limit, QuotaLimit::TokensPerMinute);
        // 500 missing at 100/s: 5 s.
        assert_eq!(refused.retry_after_ms, Some(5_000));
        assert!(
            refused.message.contains("6000 tokens per minute"),
            "{}",
            refused.message
        );
        first.charge(1_000);
        drop(first);
        let second = quota
            .acquire_at(Some("a"), &tpm, 5_000, at(0), 0, 0)
            .unwrap();
        assert!(second.is_some());
        // Empty now; after 2 s, 200 tokens are back.
        assert!(
            quota
                .acquire_at(Some("a"), &tpm, 201, at(2_000), 0, 0)
                .is_err()
        );
        assert!(
            quota
                .acquire_at(Some("a"), &tpm, 200, at(2_000), 0, 0)
                .is_ok()
        );
    }

    #[test]
    fn a_request_larger_than_the_bucket_runs_on_a_full_one_and_leaves_debt() {
        let quota = TenantQuota::new(0);
        let tpm = limits(r#"{"tokens_per_minute": 600}"#);
        let t0 = Instant::now();
        let mut big = quota
            .acquire_at(Some("a"), &tpm, 1_000, t0, 0, 0)
            .unwrap()
            .unwrap();
        big.charge(1_200);
        drop(big);
        // 600 - 1 200 = -600: 10 units wait 61 s (600 debt + 10) at 10 per second.
        let refused = quota
            .acquire_at(Some("a"), &tpm, 10, t0, 0, 0)
            .err()
            .unwrap();
        assert_eq!(refused.retry_after_ms, Some(61_000));
    }

    #[test]
    fn a_token_budget_counts_per_period_and_resets_with_the_next() {
        let quota = TenantQuota::new(0);
        let budget = limits(r#"{"token_budget": {"tokens": 1000, "period_s": 60}}"#);
        let now = Instant::now();
        let mut a = quota
            .acquire_at(Some("a"), &budget, 800, now, 120, 120_000)
            .unwrap()
            .unwrap();
        a.charge(300);
        drop(a);
        // 300 used: 700 left in the period [120 s, 180 s).
        let refused = quota
            .acquire_at(Some("a"), &budget, 701, now, 150, 150_500)
            .err()
            .unwrap();
        assert_eq!(refused.limit, QuotaLimit::TokenBudget);
        assert_eq!(refused.retry_after_ms, Some(29_500));
        assert!(
            refused.message.contains("used 300 of its 1000"),
            "{}",
            refused.message
        );
        assert!(
            quota
                .acquire_at(Some("a"), &budget, 700, now, 150, 150_500)
                .is_ok()
        );
        // The next period starts from zero.
        assert!(
            quota
                .acquire_at(Some("a"), &budget, 1_000, now, 180, 180_000)
                .is_ok()
        );
    }

    #[test]
    fn a_disallowed_lane_is_downgraded_or_refused_as_the_policy_says() {
        let policy = PolicyDocument::default();
        let lc = Classification {
            lane: LaneName::LatencyCritical,
            ttft_slo_ms: 1_000.0,
            min_tokens_per_s: 20.0,
            reason: "class=latency-critical lane=latency-critical".into(),
        };
        let batch_only = limits(r#"{"lanes": ["cost-sensitive"]}"#);
        let moved = restrict_lane("a", &batch_only, lc.clone(), &policy, 0).unwrap();
        assert_eq!(moved.lane, LaneName::CostSensitive);
        assert_eq!(moved.ttft_slo_ms, policy.cost_sensitive.ttft_slo_ms);
        assert!(
            moved.reason.contains("may not use latency-critical"),
            "{}",
            moved.reason
        );
        let refuse = limits(r#"{"lanes": ["cost-sensitive"], "disallowed_lane": "refuse"}"#);
        let refused = restrict_lane("a", &refuse, lc.clone(), &policy, 0)
            .err()
            .unwrap();
        assert_eq!(
            crate::error::DispatchError::OverQuota(refused).code(),
            tonic::Code::PermissionDenied
        );
        // Allowed lanes pass unchanged.
        let both = TenantLimits::default();
        assert_eq!(
            restrict_lane("a", &both, lc.clone(), &policy, 0).unwrap(),
            lc
        );
    }

    #[test]
    fn idle_tenants_are_swept_once_many_are_tracked() {
        let quota = TenantQuota::new(0);
        let tpm = limits(r#"{"tokens_per_minute": 60000}"#);
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            let mut p = quota
                .acquire_at(Some(&format!("t{i}")), &tpm, 10, t0, 0, 0)
                .unwrap()
                .unwrap();
            p.charge(10);
        }
        assert_eq!(quota.tracked(), SWEEP_ABOVE + 1);
        // A minute later every bucket is full again: the next admission sweeps them.
        let _p = quota
            .acquire_at(
                Some("new"),
                &tpm,
                10,
                t0 + Duration::from_secs(60),
                60,
                60_000,
            )
            .unwrap();
        assert_eq!(quota.tracked(), 1);
    }
}
