//! Property harness over the policy document parser (issue 12, fuzzing on stable Rust): any
//! bytes and any JSON never panic `PolicyDocument::from_json`; a refusal for a bad value names
//! the field; a document that parses re-serialises (`to_json`, what etcd stores) and re-parses
//! to the same value.
//!
//! The checked-in documents in `tests/fuzz_seeds/policy/` are replayed first. `PROPTEST_CASES`
//! raises the case count (scripts/fuzz.sh).

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use super::document::{PolicyDocument, PolicyError};

fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(128)
    }
}

const TOP_LEVEL: [&str; 8] = [
    "default_lane",
    "latency_critical",
    "cost_sensitive",
    "tenants",
    "rules",
    "placement",
    "max_queued",
    "quotas",
];

fn check(bytes: &[u8]) -> Result<(), String> {
    match PolicyDocument::from_json(bytes) {
        Ok(doc) => {
            let json = doc.to_json();
            match PolicyDocument::from_json(json.as_bytes()) {
                Ok(again) if again == doc => Ok(()),
                other => Err(format!(
                    "round trip changed the document:\n{doc:?}\n{json}\n{other:?}"
                )),
            }
        }
        Err(PolicyError::Invalid { field, reason }) => {
            let top = field.split(['.', '[']).next().unwrap_or_default();
            let known = TOP_LEVEL.contains(&top) || ["migration", "hedging"].contains(&top);
            if known && !reason.is_empty() {
                Ok(())
            } else {
                Err(format!("refusal names no field: {field:?}: {reason}"))
            }
        }
        Err(PolicyError::Parse(message)) if !message.is_empty() => Ok(()),
        // Not an object at all (`[]`, a string…): there is no field to name.
        Err(PolicyError::NotAnObject(_) | PolicyError::TooLarge { .. }) => Ok(()),
        Err(e) => Err(format!("refusal without a reason: {e:?}")),
    }
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "policy")
}

#[test]
fn fuzz_seeds_replay() {
    let seeds = seeds();
    assert!(seeds.len() >= 10, "seed corpus is missing: {}", seeds.len());
    for (name, bytes) in &seeds {
        check(bytes).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    }
    for valid in [
        "deploy_policy.json",
        "rules_and_tenants.json",
        "float_precision.json",
        "quotas.json",
    ] {
        let (_, bytes) = seeds
            .iter()
            .find(|(n, _)| n.ends_with(valid))
            .expect("seed");
        PolicyDocument::from_json(bytes).unwrap_or_else(|e| panic!("{valid}: {e}"));
    }
}

/// Regression (found by this harness): serde_json's default float parser read
/// 2.3098374489821303e-180 back one ulp off, so a stored policy did not re-parse to itself;
/// the workspace now enables serde_json's `float_roundtrip`.
#[test]
fn a_tiny_float_survives_the_round_trip() {
    let doc = PolicyDocument::from_json(
        br#"{"latency_critical": {"spill_max_utilisation": 2.3098374489821303e-180}}"#,
    )
    .expect("valid");
    assert_eq!(
        doc.latency_critical.spill_max_utilisation,
        2.3098374489821303e-180
    );
    check(doc.to_json().as_bytes()).expect("round trip");
}

fn any_json() -> impl Strategy<Value = Value> {
    switchyard_fuzz_support::any_json("\\PC{0,8}", 16)
}

/// Positive, fractional, huge and tiny floats, and integers, as JSON numbers.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0.0f64..1.0).prop_map(Value::from),
        (0.0f64..1e6).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(u32::MAX)),
        Just(json!(u64::MAX)),
        (0u32..100).prop_map(Value::from),
    ]
}

fn lane_name() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("latency-critical")),
        Just(json!("cost-sensitive")),
        Just(json!("fast")),
    ]
}

/// An object of the given keys, each present or not, with `value` for each.
fn object_of(
    keys: &'static [&'static str],
    value: impl Fn(&'static str) -> BoxedStrategy<Value>,
) -> impl Strategy<Value = Value> {
    let fields: Vec<_> = keys
        .iter()
        .map(|&k| proptest::option::weighted(0.5, value(k)).prop_map(move |v| (k, v)))
        .collect();
    fields.prop_map(|fields| {
        let mut object = Map::new();
        for (k, v) in fields {
            if let Some(v) = v {
                object.insert(k.to_string(), v);
            }
        }
        Value::Object(object)
    })
}

fn lane() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "ttft_slo_ms",
        "min_tokens_per_s",
        "max_queue",
        "max_queue_wait_ms",
        "spill",
        "spill_max_utilisation",
        "retry_after_ms",
    ];
    object_of(KEYS, |k| match k {
        "spill" => any::<bool>().prop_map(Value::Bool).boxed(),
        _ => number().boxed(),
    })
}

fn placement() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "choices",
        "scan_below",
        "affinity_prefill_discount",
        "affinity_slack_ms",
        "gpu_reserve_for_latency",
        "default_prefill_tokens_per_s",
        "default_decode_tokens_per_s",
        "load_weight_ms",
        "cost_weight_ms",
        "save_wse_above_utilisation",
        "save_wse_gpu_ttft_fraction",
    ];
    object_of(KEYS, |_| number().boxed())
}

fn rule() -> impl Strategy<Value = Value> {
    let when = object_of(
        &[
            "model",
            "max_tokens_at_most",
            "max_tokens_at_least",
            "prompt_tokens_at_most",
            "prompt_tokens_at_least",
            "streaming",
            "ttft_slo_ms_at_most",
            "metadata",
        ],
        |k| match k {
            "model" => "\\PC{0,6}".prop_map(Value::String).boxed(),
            "streaming" => any::<bool>().prop_map(Value::Bool).boxed(),
            "metadata" => proptest::collection::btree_map("\\PC{0,4}", "\\PC{0,4}", 0..3)
                .prop_map(|m| json!(m))
                .boxed(),
            _ => prop_oneof![(0u32..10).prop_map(Value::from), number()].boxed(),
        },
    );
    (
        prop_oneof![Just("a"), Just("b"), Just(""), Just(" ")],
        lane_name(),
        when,
        proptest::option::of(number()),
    )
        .prop_map(|(name, lane, when, slo)| {
            let mut rule = json!({"name": name, "lane": lane, "match": when});
            if let Some(slo) = slo {
                rule["ttft_slo_ms"] = slo;
            }
            rule
        })
}

fn tenant_limits() -> impl Strategy<Value = Value> {
    const KEYS: &[&str] = &[
        "max_in_flight",
        "tokens_per_minute",
        "token_budget",
        "lanes",
        "disallowed_lane",
    ];
    object_of(KEYS, |k| match k {
        "token_budget" => object_of(&["tokens", "period_s"], |_| number().boxed()).boxed(),
        "lanes" => proptest::collection::vec(lane_name(), 0..3)
            .prop_map(Value::Array)
            .boxed(),
        "disallowed_lane" => prop_oneof![
            Just(json!("downgrade")),
            Just(json!("refuse")),
            Just(json!("drop"))
        ]
        .boxed(),
        _ => number().boxed(),
    })
}

fn quotas() -> impl Strategy<Value = Value> {
    (
        proptest::option::of(tenant_limits()),
        proptest::collection::btree_map("\\PC{0,6}", tenant_limits(), 0..3),
    )
        .prop_map(|(default, tenants)| {
            let mut quotas = json!({"tenants": tenants});
            if let Some(default) = default {
                quotas["default"] = default;
            }
            quotas
        })
}

fn document() -> impl Strategy<Value = Value> {
    object_of(&TOP_LEVEL, |k| {
        let typed = match k {
            "default_lane" => lane_name().boxed(),
            "latency_critical" | "cost_sensitive" => lane().boxed(),
            "tenants" => proptest::collection::btree_map("\\PC{0,6}", lane_name(), 0..3)
                .prop_map(|m| json!(m))
                .boxed(),
            "rules" => proptest::collection::vec(rule(), 0..4)
                .prop_map(Value::Array)
                .boxed(),
            "placement" => placement().boxed(),
            "quotas" => quotas().boxed(),
            _ => number().boxed(),
        };
        prop_oneof![12 => typed, 1 => any_json()].boxed()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_policy_shaped_json(doc in document()) {
        check(&serde_json::to_vec(&doc).expect("serialises")).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_policy_arbitrary_json(doc in any_json()) {
        check(&serde_json::to_vec(&doc).expect("serialises")).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_policy_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
        check(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_policy_mutated_seeds(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec(
            (any::<prop::sample::Index>(), prop::sample::select(b"{}[]\",:019-e.".to_vec())),
            0..4,
        ),
    ) {
        let seeds = seeds();
        let mut bytes = seeds[pick.index(seeds.len())].1.clone();
        for (at, value) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
        }
        check(&bytes).map_err(TestCaseError::fail)?;
    }
}
