//! Request classification: which lane a request belongs to, and why. Pure.
//! Today: the explicit `class` field, else the configured default lane.

use switchyard_proto::v1::{GenerateRequest, Lane, RequestClass};

/// A lane and the reason it was chosen (reported in `Accepted.reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub lane: Lane,
    pub reason: String,
}

pub fn classify(request: &GenerateRequest, default_lane: Lane) -> Classification {
    match RequestClass::try_from(request.class).unwrap_or(RequestClass::Auto) {
        RequestClass::LatencyCritical => Classification {
            lane: Lane::LatencyCritical,
            reason: "class=latency-critical".into(),
        },
        RequestClass::CostSensitive => Classification {
            lane: Lane::CostSensitive,
            reason: "class=cost-sensitive".into(),
        },
        RequestClass::Auto => Classification {
            lane: default_lane,
            reason: format!("class=auto default={}", default_lane.label()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_class_wins_and_auto_takes_the_default() {
        let mut request = GenerateRequest {
            class: RequestClass::LatencyCritical as i32,
            ..Default::default()
        };
        assert_eq!(
            classify(&request, Lane::CostSensitive).lane,
            Lane::LatencyCritical
        );
        request.class = RequestClass::CostSensitive as i32;
        assert_eq!(
            classify(&request, Lane::LatencyCritical).lane,
            Lane::CostSensitive
        );
        request.class = RequestClass::Auto as i32;
        assert_eq!(
            classify(&request, Lane::LatencyCritical).lane,
            Lane::LatencyCritical
        );
        // Values from a newer client fall back to AUTO.
        request.class = 42;
        assert_eq!(
            classify(&request, Lane::CostSensitive).lane,
            Lane::CostSensitive
        );
    }
}
