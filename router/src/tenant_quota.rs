//! Per-tenant concurrency at the router: at most `limit` requests of one tenant in flight
//! (placed, running or waiting for a slot), so a tenant that floods one session — or many —
//! cannot take every worker slot and router queue place from the others.
//!
//! The tenant is the request metadata `tenant`: the API key's tenant when keys are configured
//! (clients cannot choose it), else what the client sent. Requests naming no tenant are not
//! counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tonic::Status;

/// In-flight requests per tenant, bounded by `limit` (0: unbounded).
#[derive(Clone)]
pub struct TenantQuota {
    limit: u32,
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
}

/// One request's place in its tenant's quota; released when dropped.
pub struct TenantPermit {
    in_flight: Arc<Mutex<HashMap<String, u32>>>,
    tenant: String,
}

impl TenantQuota {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            in_flight: Arc::default(),
        }
    }

    /// Takes a place for a request of `tenant`: `Ok(None)` when the quota is off or the request
    /// names no tenant; `RESOURCE_EXHAUSTED` when the tenant is at its limit.
    pub fn acquire(&self, tenant: Option<&str>) -> Result<Option<TenantPermit>, Status> {
        let Some(tenant) = tenant.filter(|t| self.limit > 0 && !t.is_empty()) else {
            return Ok(None);
        };
        let mut in_flight = self.in_flight.lock().expect("tenant quota lock");
        let count = in_flight.entry(tenant.to_string()).or_default();
        if *count >= self.limit {
            return Err(Status::resource_exhausted(format!(
                "tenant {tenant:?} already has {} requests in flight, its limit (router \
                 --max-tenant-requests); retry when one of them ends",
                self.limit
            )));
        }
        *count += 1;
        Ok(Some(TenantPermit {
            in_flight: self.in_flight.clone(),
            tenant: tenant.to_string(),
        }))
    }

    /// Requests of `tenant` in flight.
    pub fn in_flight(&self, tenant: &str) -> u32 {
        let in_flight = self.in_flight.lock().expect("tenant quota lock");
        in_flight.get(tenant).copied().unwrap_or(0)
    }
}

impl Drop for TenantPermit {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = in_flight.get_mut(&self.tenant) {
            *count -= 1;
            // Forget idle tenants: the map holds only tenants with requests in flight.
            if *count == 0 {
                in_flight.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_limit_is_refused_until_a_request_ends() {
        let quota = TenantQuota::new(2);
        let a = quota.acquire(Some("acme")).unwrap();
        let _b = quota.acquire(Some("acme")).unwrap();
        let refused = quota.acquire(Some("acme")).err().expect("third is refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("--max-tenant-requests"));
        // Another tenant is unaffected.
        assert!(quota.acquire(Some("globex")).unwrap().is_some());
        drop(a);
        assert_eq!(quota.in_flight("acme"), 1);
        assert!(quota.acquire(Some("acme")).unwrap().is_some());
    }

    #[test]
    fn no_limit_or_no_tenant_is_not_counted_and_idle_tenants_are_forgotten() {
        assert!(TenantQuota::new(0).acquire(Some("acme")).unwrap().is_none());
        let quota = TenantQuota::new(1);
        assert!(quota.acquire(None).unwrap().is_none());
        assert!(quota.acquire(Some("")).unwrap().is_none());
        drop(quota.acquire(Some("acme")).unwrap());
        assert!(quota.in_flight.lock().unwrap().is_empty());
    }
}
