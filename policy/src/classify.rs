//! Request classification: which lane a request belongs to, its SLO, and why. Pure: the same
//! function classifies live requests and simulated trace rows.
//!
//! Order: explicit `class` → tenant default (request metadata `tenant`, mapped by
//! the policy document; with API keys configured the front doors write the key's tenant there,
//! see the router's `auth` module) → the document's ordered rules
//! (first match wins) → the document's default lane.

use std::collections::HashMap;

use switchyard_proto::v1::{GenerateRequest, Lane, RequestClass};

use crate::document::{LaneName, Match, PolicyDocument};

/// Metadata key naming the request's tenant.
pub const TENANT_KEY: &str = "tenant";
/// Metadata key a front door sets to `"false"` for a non-streaming request.
pub const STREAM_KEY: &str = "stream";

/// What the classifier looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestFeatures<'a> {
    pub class: RequestClass,
    pub model: &'a str,
    pub max_tokens: u32,
    pub prompt_tokens: u32,
    pub streaming: bool,
    /// The request's own TTFT target; 0 = none.
    pub ttft_slo_ms: u32,
    /// It asks for an embedding, not a generation (`GenerateRequest.embed`).
    pub embed: bool,
    pub metadata: Option<&'a HashMap<String, String>>,
}

impl<'a> RequestFeatures<'a> {
    /// Features of a wire request. Prompt tokens are estimated at 4 bytes per token (the
    /// router has no tokenizer); gRPC requests always stream unless metadata `stream=false`.
    pub fn of(request: &'a GenerateRequest) -> Self {
        let prompt_bytes: usize = if request.messages.is_empty() {
            request.prompt.len()
        } else {
            request.messages.iter().map(|m| m.content.len()).sum()
        };
        Self {
            class: RequestClass::try_from(request.class).unwrap_or(RequestClass::Auto),
            model: &request.model,
            max_tokens: request.sampling.as_ref().map_or(0, |s| s.max_tokens),
            prompt_tokens: u32::try_from(prompt_bytes.div_ceil(4)).unwrap_or(u32::MAX),
            streaming: request
                .metadata
                .get(STREAM_KEY)
                .is_none_or(|v| v != "false"),
            ttft_slo_ms: request.ttft_slo_ms,
            embed: request.embed,
            metadata: Some(&request.metadata),
        }
    }

    fn meta(&self, key: &str) -> Option<&'a str> {
        self.metadata.and_then(|m| m.get(key)).map(String::as_str)
    }
}

/// A lane, its SLO and the reason it was chosen (reported in `Accepted.reason`).
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub lane: LaneName,
    pub ttft_slo_ms: f64,
    pub min_tokens_per_s: f64,
    pub reason: String,
}

impl Classification {
    pub fn wire_lane(&self) -> Lane {
        self.lane.lane()
    }
}

/// Classifies a request under `policy`: the client's class, else its tenant's lane, else (an
/// embedding) cost-sensitive — the rules describe generations, nobody watches an embedding
/// stream, and only engines on GPUs embed — else the first matching rule, else the default.
pub fn classify(features: &RequestFeatures<'_>, policy: &PolicyDocument) -> Classification {
    let (lane, rule_slo, reason) = match features.class {
        RequestClass::LatencyCritical => (
            LaneName::LatencyCritical,
            None,
            "class=latency-critical".to_string(),
        ),
        RequestClass::CostSensitive => (
            LaneName::CostSensitive,
            None,
            "class=cost-sensitive".to_string(),
        ),
        RequestClass::Auto => {
            let tenant = features
                .meta(TENANT_KEY)
                .and_then(|t| policy.tenants.get(t).map(|lane| (t, *lane)));
            if let Some((tenant, lane)) = tenant {
                (lane, None, format!("tenant={tenant}"))
            } else if features.embed {
                (LaneName::CostSensitive, None, "embedding".to_string())
            } else if let Some(rule) = policy.rules.iter().find(|r| matches(&r.when, features)) {
                (rule.lane, rule.ttft_slo_ms, format!("rule={}", rule.name))
            } else {
                (policy.default_lane, None, "default".to_string())
            }
        }
    };
    let lane_policy = policy.lane(lane);
    let ttft_slo_ms = if features.ttft_slo_ms > 0 {
        f64::from(features.ttft_slo_ms)
    } else {
        rule_slo.unwrap_or(lane_policy.ttft_slo_ms)
    };
    Classification {
        lane,
        ttft_slo_ms,
        min_tokens_per_s: lane_policy.min_tokens_per_s,
        reason: format!("{reason} lane={}", lane.as_str()),
    }
}

/// Whether every condition of `when` holds for the request.
pub fn matches(when: &Match, f: &RequestFeatures<'_>) -> bool {
    when.model.as_deref().is_none_or(|m| m == f.model)
        && when.max_tokens_at_most.is_none_or(|v| f.max_tokens <= v)
        && when.max_tokens_at_least.is_none_or(|v| f.max_tokens >= v)
        && when
            .prompt_tokens_at_most
            .is_none_or(|v| f.prompt_tokens <= v)
        && when
            .prompt_tokens_at_least
            .is_none_or(|v| f.prompt_tokens >= v)
        && when.streaming.is_none_or(|v| f.streaming == v)
        && when
            .ttft_slo_ms_at_most
            .is_none_or(|v| f.ttft_slo_ms > 0 && f.ttft_slo_ms <= v)
        && when
            .metadata
            .iter()
            .all(|(k, v)| f.meta(k).is_some_and(|actual| actual == v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::Rule;
    use proptest::prelude::*;
    use switchyard_proto::v1::SamplingParams;

    fn request(class: RequestClass, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            prompt: "x".repeat(400),
            class: class as i32,
            sampling: Some(SamplingParams {
                max_tokens,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn policy() -> PolicyDocument {
        let mut p = PolicyDocument::default();
        p.tenants.insert("acme".into(), LaneName::LatencyCritical);
        p.rules = vec![
            Rule {
                name: "batch-header".into(),
                when: Match {
                    metadata: [("x-batch".to_string(), "1".to_string())].into(),
                    ..Match::default()
                },
                lane: LaneName::CostSensitive,
                ttft_slo_ms: None,
            },
            Rule {
                name: "short".into(),
                when: Match {
                    max_tokens_at_most: Some(64),
                    ..Match::default()
                },
                lane: LaneName::LatencyCritical,
                ttft_slo_ms: Some(300.0),
            },
        ];
        p
    }

    fn lane_of(r: &GenerateRequest, p: &PolicyDocument) -> Classification {
        classify(&RequestFeatures::of(r), p)
    }

    #[test]
    fn explicit_class_beats_tenant_beats_rules_beats_default() {
        let p = policy();
        let mut r = request(RequestClass::CostSensitive, 16);
        r.metadata.insert("tenant".into(), "acme".into());
        let c = lane_of(&r, &p);
        assert_eq!(
            (c.lane, c.reason.as_str()),
            (
                LaneName::CostSensitive,
                "class=cost-sensitive lane=cost-sensitive"
            )
        );
        r.class = RequestClass::Auto as i32;
        let c = lane_of(&r, &p);
        assert_eq!(
            (c.lane, c.reason.as_str()),
            (
                LaneName::LatencyCritical,
                "tenant=acme lane=latency-critical"
            )
        );
        r.metadata.clear();
        let c = lane_of(&r, &p);
        assert_eq!(
            (c.lane, c.reason.as_str(), c.ttft_slo_ms),
            (
                LaneName::LatencyCritical,
                "rule=short lane=latency-critical",
                300.0
            )
        );
        r.metadata.insert("x-batch".into(), "1".into());
        assert_eq!(
            lane_of(&r, &p).reason,
            "rule=batch-header lane=cost-sensitive"
        );
        let r = request(RequestClass::Auto, 500);
        let c = lane_of(&r, &p);
        assert_eq!(
            (c.lane, c.reason.as_str()),
            (LaneName::CostSensitive, "default lane=cost-sensitive")
        );
        // Values from a newer client fall back to AUTO.
        let mut r = request(RequestClass::Auto, 500);
        r.class = 42;
        assert_eq!(lane_of(&r, &p).reason, "default lane=cost-sensitive");
    }

    #[test]
    fn an_embedding_left_to_the_router_is_cost_sensitive_unless_its_tenant_says() {
        let p = policy();
        // Short, so the `short` rule would make a generation latency-critical.
        let mut r = request(RequestClass::Auto, 1);
        r.embed = true;
        let c = lane_of(&r, &p);
        assert_eq!(
            (c.lane, c.reason.as_str()),
            (LaneName::CostSensitive, "embedding lane=cost-sensitive")
        );
        r.metadata.insert("tenant".into(), "acme".into());
        assert_eq!(lane_of(&r, &p).lane, LaneName::LatencyCritical);
        r.class = RequestClass::LatencyCritical as i32;
        r.metadata.clear();
        assert_eq!(lane_of(&r, &p).lane, LaneName::LatencyCritical);
    }

    #[test]
    fn the_request_slo_overrides_rule_and_lane() {
        let p = policy();
        let mut r = request(RequestClass::Auto, 16);
        r.ttft_slo_ms = 123;
        assert_eq!(lane_of(&r, &p).ttft_slo_ms, 123.0);
        let r = request(RequestClass::CostSensitive, 16);
        assert_eq!(lane_of(&r, &p).ttft_slo_ms, p.cost_sensitive.ttft_slo_ms);
    }

    proptest! {
        #[test]
        fn an_explicit_class_always_wins(
            class in 1i32..=2, max_tokens in 0u32..10_000, tenant in proptest::option::of("[a-z]{1,4}"),
        ) {
            let p = policy();
            let mut r = request(RequestClass::Auto, max_tokens);
            r.class = class;
            if let Some(t) = tenant { r.metadata.insert("tenant".into(), t); }
            let c = lane_of(&r, &p);
            let expected = if class == 1 { LaneName::LatencyCritical } else { LaneName::CostSensitive };
            prop_assert_eq!(c.lane, expected);
        }

        #[test]
        fn auto_requests_follow_the_first_matching_rule(max_tokens in 0u32..200, batch in any::<bool>()) {
            let p = policy();
            let mut r = request(RequestClass::Auto, max_tokens);
            if batch { r.metadata.insert("x-batch".into(), "1".into()); }
            let c = lane_of(&r, &p);
            let expected = if batch { LaneName::CostSensitive }
                else if max_tokens <= 64 { LaneName::LatencyCritical }
                else { p.default_lane };
            prop_assert_eq!(c.lane, expected);
            prop_assert!(c.ttft_slo_ms > 0.0);
        }
    }
}
