//! Stage 2: which lane the request belongs to (the policy's classifier), then what its tenant
//! may do: a lane the tenant may not use is downgraded or refused, and the tenant's quota
//! reserves the request's tokens.

use switchyard_proto::v1;

use super::{Dispatcher, token_count};
use crate::classify::{Classification, RequestFeatures, TENANT_KEY, classify};
use crate::error::DispatchError;
use crate::policy::document::PolicyDocument;
use crate::tenant_quota::{QuotaExceeded, TenantPermit, restrict_lane};

impl Dispatcher {
    /// The request's lane and the features it was classified on. `prompt_ids` (empty = not
    /// tokenized) give the exact prompt length.
    pub(super) fn classify<'r>(
        &self,
        request: &'r v1::GenerateRequest,
        prompt_ids: &[u32],
        policy: &PolicyDocument,
    ) -> (Classification, RequestFeatures<'r>) {
        let mut features = RequestFeatures::of(request);
        if !prompt_ids.is_empty() {
            features.prompt_tokens = token_count(prompt_ids);
        }
        (classify(&features, policy), features)
    }

    /// Applies the tenant's lane rules to `class` and takes the request's place in the
    /// tenant's quota (`None` for a request naming no tenant).
    pub(super) fn admit_tenant(
        &self,
        request: &v1::GenerateRequest,
        class: &mut Classification,
        features: &RequestFeatures,
        policy: &PolicyDocument,
    ) -> Result<Option<TenantPermit>, DispatchError> {
        let tenant = request
            .metadata
            .get(TENANT_KEY)
            .map(String::as_str)
            .filter(|t| !t.is_empty());
        let limits = tenant
            .map(|t| policy.quotas.limits_of(t))
            .unwrap_or_default();
        if let Some(tenant) = tenant {
            *class = restrict_lane(tenant, &limits, class.clone(), policy, features.ttft_slo_ms)
                .map_err(|refused| self.quota_refused(refused))?;
        }
        let reserve = u64::from(features.prompt_tokens) + u64::from(features.max_tokens);
        self.tenant_quota
            .acquire(tenant, &limits, reserve)
            .map_err(|refused| self.quota_refused(refused))
    }

    /// A request its tenant's quota refused, counted by the limit.
    fn quota_refused(&self, refused: QuotaExceeded) -> DispatchError {
        self.metrics.quota_refused(refused.limit.as_str());
        DispatchError::OverQuota(refused)
    }
}
