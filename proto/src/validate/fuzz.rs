//! Property harness over `validate_generate_request` and `validate_interrupt` (issue 12,
//! fuzzing on stable Rust). Arbitrary requests — huge, unicode and control-character strings,
//! `max_tokens` extremes, many messages, and arbitrary wire bytes decoded as a request — must
//! never panic, every rejection must name a field of the request, and every acceptance must
//! satisfy the wire rules checked independently here.
//!
//! The checked-in seeds in `tests/fuzz_seeds/generate_request/` (protobuf-encoded requests)
//! are replayed first. `PROPTEST_CASES` raises the case count (scripts/fuzz.sh).

use proptest::prelude::*;
use prost::Message;

use super::*;
use crate::v1::SamplingParams;

/// Cases per property: small by default so the harness stays well under a second in debug;
/// `PROPTEST_CASES` (read by proptest's default config) overrides it for long runs.
fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(128)
    }
}

/// Small limits, so the generators reach them often without allocating megabytes.
fn small_limits() -> RequestLimits {
    RequestLimits {
        max_tokens_cap: 64,
        max_message_bytes: 48,
        max_messages: 6,
        max_request_id_bytes: 12,
        max_affinity_key_bytes: 10,
        max_metadata_entries: 2,
        max_metadata_key_bytes: 8,
        max_metadata_value_bytes: 16,
    }
}

/// `field` names a field of a request with `messages` messages and `stops` stop sequences, or
/// one of `metadata`'s entries (`metadata["key"]`).
fn is_request_field(
    field: &str,
    messages: usize,
    stops: usize,
    list: &str,
    metadata: &std::collections::HashMap<String, String>,
    logit_bias: &std::collections::HashMap<u32, f32>,
) -> bool {
    let metadata_entry = field
        .strip_prefix("metadata[")
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|quoted| metadata.keys().any(|key| format!("{key:?}") == quoted));
    let indexed = |prefix: &str, suffixes: &[&str], len: usize| {
        field
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('['))
            .and_then(|rest| rest.split_once(']'))
            .is_some_and(|(index, suffix)| {
                index.parse::<usize>().is_ok_and(|i| i < len) && suffixes.contains(&suffix)
            })
    };
    matches!(
        field,
        "request_id"
            | "model"
            | "class"
            | "prompt"
            | "prompt_token_ids"
            | "sampling.max_tokens"
            | "sampling.temperature"
            | "sampling.top_p"
            | "sampling.min_p"
            | "sampling.stop"
            | "sampling.presence_penalty"
            | "sampling.frequency_penalty"
            | "sampling.repetition_penalty"
            | "sampling.logit_bias"
            | "sampling.top_logprobs"
            | "sampling.logprobs"
            | "affinity_key"
            | "metadata"
            | "truncation"
            | "tools"
            | "tool_choice.mode"
            | "tool_choice.function"
    ) || metadata_entry
        || field.starts_with("tools[")
        || field.starts_with("sampling.response_format")
        || logit_bias_entry(field, logit_bias)
        || field == list
        // A generated "tool" message answers no call: its `tool_call_id` is at fault.
        || indexed(list, &[".role", ".content", ".tool_call_id"], messages)
        || indexed("sampling.stop", &[""], stops)
}

/// `field` is `sampling.logit_bias[id]` for one of the request's ids.
fn logit_bias_entry(field: &str, logit_bias: &std::collections::HashMap<u32, f32>) -> bool {
    field
        .strip_prefix("sampling.logit_bias[")
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|id| id.parse::<u32>().ok())
        .is_some_and(|id| logit_bias.contains_key(&id))
}

/// The wire rules, written out independently of `validate_generate_request`.
fn obeys_rules(r: &GenerateRequest, limits: &RequestLimits) -> bool {
    let s = r.sampling.clone().unwrap_or_default();
    let printable = |s: &str| !s.chars().any(char::is_control);
    !r.request_id.is_empty()
        && r.request_id.len() <= limits.max_request_id_bytes
        && printable(&r.request_id)
        && r.model.len() <= super::MAX_MODEL_BYTES
        && printable(&r.model)
        && (0..=2).contains(&r.class)
        && r.affinity_key.len() <= limits.max_affinity_key_bytes
        && r.metadata.len() <= limits.max_metadata_entries
        && r.metadata.iter().all(|(k, v)| {
            k.len() <= limits.max_metadata_key_bytes && v.len() <= limits.max_metadata_value_bytes
        })
        && !r.model.trim().is_empty()
        && [
            !r.messages.is_empty(),
            !r.prompt.is_empty(),
            !r.prompt_token_ids.is_empty(),
        ]
        .iter()
        .filter(|given| **given)
        .count()
            == 1
        && r.prompt_token_ids.len() <= super::MAX_PROMPT_TOKEN_IDS
        && r.prompt.len() <= limits.max_message_bytes
        && r.messages.len() <= limits.max_messages
        && r.messages.iter().all(|m| {
            // "tool" is a role, but these messages answer no call, so never valid.
            ["system", "developer", "user", "assistant"].contains(&m.role.as_str())
                && m.content.len() <= limits.max_message_bytes
        })
        && (1..=limits.max_tokens_cap).contains(&s.max_tokens)
        && s.temperature.is_none_or(|t| (0.0..=2.0).contains(&t))
        && s.top_p.is_none_or(|p| p > 0.0 && p <= 1.0)
        && s.min_p >= 0.0
        && s.min_p <= 1.0
        && s.stop.len() <= 16
        && s.stop.iter().all(|x| !x.is_empty() && x.len() <= 256)
        && [s.presence_penalty, s.frequency_penalty]
            .iter()
            .all(|p| p.is_none_or(|p| (-2.0..=2.0).contains(&p)))
        && s.repetition_penalty.is_none_or(|r| r > 0.0 && r <= 10.0)
        && s.logit_bias.len() <= 300
        && s.logit_bias.values().all(|b| (-100.0..=100.0).contains(b))
        && s.top_logprobs <= 20
        && (s.top_logprobs == 0 || s.logprobs || s.prompt_logprobs)
        && (0..=1).contains(&r.truncation)
        && (r.truncation == 0 || !r.messages.is_empty())
        && r.tool_choice.as_ref().is_none_or(|c| {
            (0..=2).contains(&c.mode)
                && (c.function.is_empty() || r.tools.iter().any(|t| t.name == c.function))
                && (c.mode != 2 || !r.tools.is_empty())
        })
        // An embedding embeds a prompt, and asks for nothing generated.
        && (!r.embed
            || (r.messages.is_empty()
                && r.tools.is_empty()
                && s.max_tokens <= 1
                && !s.logprobs
                && !s.prompt_logprobs
                && s.response_format.is_none()))
}

/// Whether [`obeys_rules`] decides `r`: it does not write out the rules of offered tools or of
/// a response format (their own tests do), so for a request carrying either the harness checks
/// only that a refusal names a field.
fn modelled(r: &GenerateRequest) -> bool {
    r.tools.is_empty()
        && r.sampling
            .as_ref()
            .is_none_or(|s| s.response_format.is_none())
}

/// The harness's check, shared by the seeds and the generated cases.
fn check_request(r: &GenerateRequest, limits: &RequestLimits) -> Result<(), String> {
    let sampling = r.sampling.clone().unwrap_or_default();
    let field_of_request = |field: &str| {
        is_request_field(
            field,
            r.messages.len(),
            sampling.stop.len(),
            "messages",
            &r.metadata,
            &sampling.logit_bias,
        )
    };
    match validate_generate_request(r, limits) {
        Ok(()) if !modelled(r) => Ok(()),
        Ok(()) if obeys_rules(r, limits) => Ok(()),
        Ok(()) => Err(format!("accepted a request that breaks a rule: {r:?}")),
        Err(v) if !field_of_request(&v.field) => {
            Err(format!("rejection names no request field: {v:?}"))
        }
        Err(v) if v.message.is_empty() => Err(format!("rejection without a reason: {v:?}")),
        Err(_) if modelled(r) && obeys_rules(r, limits) => {
            Err(format!("rejected a valid request: {r:?}"))
        }
        Err(_) => Ok(()),
    }
}

fn check_interrupt(i: &Interrupt, limits: &RequestLimits) -> Result<(), String> {
    match validate_interrupt(i, limits) {
        Ok(()) => Ok(()),
        Err(v)
            if v.field == "request_id"
                || is_request_field(
                    &v.field,
                    i.messages.len(),
                    0,
                    "interrupt.messages",
                    &Default::default(),
                    &Default::default(),
                ) =>
        {
            Ok(())
        }
        Err(v) => Err(format!("interrupt rejection names no field: {v:?}")),
    }
}

/// Strings that stress a validator: empty, whitespace, control characters, unicode (multi-byte,
/// right-to-left override, NUL), sizes around the limits, and now and then a huge one.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just(String::new()),
        4 => Just(" \t\n".to_string()),
        6 => prop_oneof![Just("system"), Just("user"), Just("assistant"), Just("User"), Just("tool")]
            .prop_map(|s| s.to_string()),
        10 => "\\PC{0,20}",
        6 => "[\\x00-\\x1f\\x7f\u{202e}\u{feff}é🦀]{0,16}",
        4 => (40usize..60, any::<char>()).prop_map(|(n, c)| c.to_string().repeat(n)),
        1 => (1usize..4).prop_map(|mib| "x".repeat(mib << 20)),
    ]
}

fn float() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY),
        Just(-0.0f32),
        Just(0.0f32),
        Just(1.0f32),
        Just(2.0f32),
        Just(f32::MIN_POSITIVE),
        -3.0f32..3.0,
        any::<f32>(),
    ]
}

fn max_tokens() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(64),
        Just(65),
        Just(u32::MAX),
        any::<u32>(),
        0u32..80
    ]
}

fn messages() -> impl Strategy<Value = Vec<ChatMessage>> {
    prop_oneof![
        8 => proptest::collection::vec(
            (text(), text()).prop_map(|(role, content)| ChatMessage { role, content, ..Default::default() }),
            0..9,
        ),
        // Many messages: far past the limit.
        1 => (0usize..2000).prop_map(|n| vec![ChatMessage { role: "user".into(), content: "x".into(), ..Default::default() }; n]),
    ]
}

fn sampling() -> impl Strategy<Value = Option<SamplingParams>> {
    proptest::option::weighted(
        0.9,
        (
            max_tokens(),
            proptest::option::of(float()),
            proptest::option::of(float()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<u64>()),
            proptest::collection::vec(text(), 0..20),
            // Boxed: one more field in this tuple's value tree overflowed the test thread's
            // stack in debug builds.
            (penalties(), float()).boxed(),
        )
            .prop_map(
                |(max_tokens, temperature, top_p, top_k, seed, stop, (penalties, min_p))| {
                    let (
                        presence_penalty,
                        frequency_penalty,
                        repetition_penalty,
                        logit_bias,
                        top_logprobs,
                    ) = penalties;
                    SamplingParams {
                        max_tokens,
                        temperature,
                        top_p,
                        top_k,
                        seed,
                        stop,
                        presence_penalty,
                        frequency_penalty,
                        repetition_penalty,
                        logit_bias,
                        logprobs: top_logprobs % 3 != 0,
                        top_logprobs: top_logprobs % 23,
                        ignore_eos: top_logprobs % 5 == 0,
                        min_p,
                        ..Default::default()
                    }
                },
            ),
    )
}

type Penalties = (
    Option<f32>,
    Option<f32>,
    Option<f32>,
    std::collections::HashMap<u32, f32>,
    u32,
);

/// Presence, frequency and repetition penalties, a logit bias map and a `top_logprobs` seed
/// (with or without `logprobs`), often around their limits.
fn penalties() -> impl Strategy<Value = Penalties> {
    let bias = prop_oneof![
        Just(100.0f32),
        Just(-100.0f32),
        Just(100.5f32),
        -120.0f32..120.0,
        float(),
    ];
    (
        proptest::option::of(float()),
        proptest::option::of(float()),
        proptest::option::of(prop_oneof![Just(10.0f32), Just(10.5f32), float()]),
        prop_oneof![
            8 => proptest::collection::hash_map(any::<u32>(), bias.clone(), 0..4),
            1 => proptest::collection::hash_map(any::<u32>(), bias, 295..305),
        ],
        0u32..70,
    )
}

fn request() -> impl Strategy<Value = GenerateRequest> {
    (
        text(),
        text(),
        messages(),
        text(),
        sampling(),
        prop_oneof![8 => 0i32..=2, 1 => any::<i32>()],
        any::<u32>(),
        text(),
        proptest::collection::btree_map(text(), text(), 0..3),
    )
        .prop_map(
            |(request_id, model, messages, prompt, sampling, class, ttft, affinity, metadata)| {
                GenerateRequest {
                    request_id,
                    model,
                    messages,
                    prompt,
                    sampling,
                    class,
                    ttft_slo_ms: ttft,
                    affinity_key: affinity,
                    metadata: metadata.into_iter().collect(),
                    ..Default::default()
                }
            },
        )
}

fn seed_files() -> Vec<(String, Vec<u8>)> {
    switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "generate_request")
}

/// Decodes wire bytes as the router's gRPC layer does and validates what decodes.
fn check_wire_bytes(bytes: &[u8]) -> Result<(), String> {
    if let Ok(request) = GenerateRequest::decode(bytes) {
        check_request(&request, &RequestLimits::default())?;
        check_request(&request, &small_limits())?;
    }
    Ok(())
}

#[test]
fn fuzz_seeds_replay() {
    let seeds = seed_files();
    assert!(seeds.len() >= 10, "seed corpus is missing: {}", seeds.len());
    for (name, bytes) in &seeds {
        check_wire_bytes(bytes).unwrap_or_else(|e| panic!("seed {name}: {e}"));
    }
    // The valid seeds must stay valid: a rule change that rejects them is caught here.
    for valid in [
        "valid_chat.bin",
        "valid_prompt.bin",
        "metadata_and_affinity.bin",
    ] {
        let (_, bytes) = seeds
            .iter()
            .find(|(name, _)| name.ends_with(valid))
            .expect("valid seed present");
        let request = GenerateRequest::decode(bytes.as_slice()).expect("seed decodes");
        assert_eq!(
            validate_generate_request(&request, &RequestLimits::default()),
            Ok(()),
            "{valid}"
        );
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_generate_request_structured(request in request()) {
        check_request(&request, &small_limits()).map_err(TestCaseError::fail)?;
        check_request(&request, &RequestLimits::default()).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_generate_request_wire_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_wire_bytes(&bytes).map_err(TestCaseError::fail)?;
    }

    /// Seeds with random bytes flipped, cut or appended: mostly still-decodable requests.
    #[test]
    fn fuzz_generate_request_mutated_seeds(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let seeds = seed_files();
        let mut bytes = seeds[pick.index(seeds.len())].1.clone();
        for (at, value) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        check_wire_bytes(&bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_interrupt(request_id in text(), messages in messages(), keep in any::<bool>()) {
        let interrupt = Interrupt { request_id, messages, keep_generated: keep };
        check_interrupt(&interrupt, &small_limits()).map_err(TestCaseError::fail)?;
    }
}
