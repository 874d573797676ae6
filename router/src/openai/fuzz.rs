//! Property harness over the OpenAI request parser (issue 12, fuzzing on stable Rust):
//! arbitrary bytes and arbitrary-but-OpenAI-shaped JSON objects never panic the parser or the
//! translation to `switchyard.v1`; every refusal is a 400, and every refusal of a JSON object
//! names the field at fault in OpenAI's naming.
//!
//! Anthropic's Messages API, served on the same port, is fuzzed alongside.
//!
//! The checked-in bodies in `tests/fuzz_seeds/openai_{chat,completion,responses}/` and
//! `tests/fuzz_seeds/anthropic_messages/` are replayed first.
//! `PROPTEST_CASES` raises the case count (scripts/fuzz.sh).

use axum::http::StatusCode;
use proptest::prelude::*;
use serde_json::{Value, json};

use super::error::ApiError;
use super::wire::{ChatCompletionRequest, CompletionRequest, parse_body};

fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(128)
    }
}

/// Top-level fields an error may name (chat and completions).
const FIELDS: [&str; 27] = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "user",
    "logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "top_logprobs",
    "tools",
    "functions",
    "response_format",
    "echo",
    "best_of",
    "suffix",
];

/// Top-level fields an error of the Responses API may name.
const RESPONSES_FIELDS: [&str; 27] = [
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "max_output_tokens",
    "temperature",
    "top_p",
    "text",
    "stream",
    "stream_options",
    "metadata",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "truncation",
    "include",
    "top_logprobs",
    "reasoning",
    "previous_response_id",
    "conversation",
    "background",
    "prompt",
    "max_tool_calls",
    "store",
];

/// Top-level fields an error of Anthropic's Messages API may name.
const MESSAGES_FIELDS: [&str; 13] = [
    "model",
    "max_tokens",
    "messages",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "metadata",
    "thinking",
];

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Chat,
    Completion,
    Responses,
    Messages,
}

impl Endpoint {
    fn fields(self) -> &'static [&'static str] {
        match self {
            Endpoint::Chat | Endpoint::Completion => &FIELDS,
            Endpoint::Responses => &RESPONSES_FIELDS,
            Endpoint::Messages => &MESSAGES_FIELDS,
        }
    }
}

fn run(endpoint: Endpoint, body: &[u8], cap: u32) -> Result<(), ApiError> {
    match endpoint {
        Endpoint::Chat => parse_body::<ChatCompletionRequest>(body)?
            .into_proto(cap)
            .map(drop),
        Endpoint::Completion => parse_body::<CompletionRequest>(body)?
            .into_proto(cap)
            .map(drop),
        Endpoint::Responses => super::responses::read_body(body, cap).map(drop),
        Endpoint::Messages => crate::anthropic::read_body(body).map(drop),
    }
}

/// The harness's check. `object`: the body is a JSON object, so a refusal must name a field.
fn check(endpoint: Endpoint, body: &[u8]) -> Result<(), String> {
    let object = serde_json::from_slice::<Value>(body).is_ok_and(|v| v.is_object());
    for cap in [1, 4096, u32::MAX] {
        let Err(error) = run(endpoint, body, cap) else {
            continue;
        };
        if error.status != StatusCode::BAD_REQUEST {
            return Err(format!("{error:?} is not a 400"));
        }
        match &error.param {
            Some(param) => {
                let top = param.split(['.', '[']).next().unwrap_or_default();
                if !endpoint.fields().contains(&top) {
                    return Err(format!("{error:?} names no request field"));
                }
                if !error.message.starts_with(param.as_str()) {
                    return Err(format!(
                        "{error:?}: the message does not lead with the field"
                    ));
                }
            }
            None if object && !error.message.contains("duplicate field") => {
                return Err(format!("a JSON object refused without a field: {error:?}"));
            }
            None if !error.message.starts_with("request body: ") => {
                return Err(format!("{error:?} names neither a field nor the body"));
            }
            None => {}
        }
    }
    Ok(())
}

fn all_seeds() -> Vec<(Endpoint, String, Vec<u8>)> {
    let chat = switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "openai_chat")
        .into_iter()
        .map(|(n, b)| (Endpoint::Chat, n, b));
    let completion =
        switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "openai_completion")
            .into_iter()
            .map(|(n, b)| (Endpoint::Completion, n, b));
    let responses = switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "openai_responses")
        .into_iter()
        .map(|(n, b)| (Endpoint::Responses, n, b));
    let messages = switchyard_fuzz_support::seeds(env!("CARGO_MANIFEST_DIR"), "anthropic_messages")
        .into_iter()
        .map(|(n, b)| (Endpoint::Messages, n, b));
    chat.chain(completion)
        .chain(responses)
        .chain(messages)
        .collect()
}

#[test]
fn fuzz_seeds_replay() {
    let seeds = all_seeds();
    assert!(seeds.len() >= 15, "seed corpus is missing: {}", seeds.len());
    for (endpoint, name, body) in &seeds {
        // Each seed on every endpoint: a chat body is an odd completion body and vice versa.
        for e in [
            Endpoint::Chat,
            Endpoint::Completion,
            Endpoint::Responses,
            Endpoint::Messages,
        ] {
            check(e, body).unwrap_or_else(|m| panic!("seed {name} ({e:?}): {m}"));
        }
        if name.contains("valid") {
            run(*endpoint, body, 4096).unwrap_or_else(|e| panic!("seed {name}: {e:?}"));
        }
    }
}

/// Regression: a sampling field of the wrong type used to be refused as "request body: not
/// valid JSON for this endpoint" with no `param` (serde's flatten buffering lost the name).
#[test]
fn a_sampling_field_of_the_wrong_type_is_named() {
    let param = |body: &str| {
        run(Endpoint::Chat, body.as_bytes(), 4096)
            .expect_err("refused")
            .param
    };
    let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
    assert_eq!(
        param(&format!(r#"{{{base},"max_tokens":"10"}}"#)).as_deref(),
        Some("max_tokens")
    );
    assert_eq!(
        param(&format!(r#"{{{base},"stop":["a",1]}}"#)).as_deref(),
        Some("stop")
    );
    assert_eq!(
        param(&format!(
            r#"{{{base},"stream":true,"stream_options":{{"include_usage":"yes"}}}}"#
        ))
        .as_deref(),
        Some("stream_options.include_usage")
    );
    assert_eq!(
        param(r#"{"model":7,"messages":[]}"#).as_deref(),
        Some("model")
    );
    assert_eq!(param(r#"[1]"#), None);
}

/// Any JSON value, small and nested, with strings of control and bidi characters too.
fn any_json() -> impl Strategy<Value = Value> {
    let strings = prop_oneof!["\\PC{0,12}", "[\\x00-\\x1f\u{202e}\u{feff}é🦀]{0,6}",];
    switchyard_fuzz_support::any_json(strings, 24)
}

fn int() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(0)),
        Just(json!(1)),
        Just(json!(-1)),
        Just(json!(i64::MIN)),
        Just(json!(i64::MAX)),
        Just(json!(u64::MAX)),
        Just(json!(u32::MAX as u64 + 1)),
        (-5i64..5000).prop_map(Value::from),
    ]
}

fn float() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<f64>().prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        int()
    ]
}

fn role() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just("system"),
        Just("developer"),
        Just("user"),
        Just("assistant"),
        Just("tool"),
        Just(""),
    ]
    .prop_map(Value::from)
}

fn text() -> impl Strategy<Value = Value> {
    prop_oneof![
        "\\PC{0,16}".prop_map(Value::String),
        Just(json!("")),
        (1usize..3).prop_map(|n| Value::String("x".repeat(n << 16))),
    ]
}

fn content() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        text().prop_map(|t| json!({"type": "text", "text": t})),
        any_json().prop_map(|t| json!({"type": "text", "text": t})),
        any_json().prop_map(|t| json!({"type": t})),
        any_json(),
    ];
    prop_oneof![
        4 => text(),
        2 => proptest::collection::vec(part, 0..4).prop_map(Value::Array),
        1 => any_json(),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (role(), content()).prop_map(|(r, c)| json!({"role": r, "content": c})),
        1 => (any_json(), any_json()).prop_map(|(r, c)| json!({"role": r, "content": c})),
        1 => role().prop_map(|r| json!({"role": r})),
        1 => any_json(),
    ]
}

/// Each field either well-typed (and usually a sensible value) or any JSON at all.
fn field(name: &'static str) -> BoxedStrategy<Value> {
    let typed: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![Just(json!("m")), text()].boxed(),
        "messages" => proptest::collection::vec(message(), 0..5)
            .prop_map(Value::Array)
            .boxed(),
        "prompt" => prop_oneof![
            text(),
            text().prop_map(|t| json!([t])),
            proptest::collection::vec(any_json(), 0..3).prop_map(Value::Array),
        ]
        .boxed(),
        "temperature" | "top_p" | "min_p" | "presence_penalty" | "frequency_penalty"
        | "repetition_penalty" => float().boxed(),
        "logit_bias" => proptest::collection::btree_map(
            prop_oneof![any::<u32>().prop_map(|id| id.to_string()), "\\PC{0,8}"],
            float(),
            0..4,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed(),
        "tools" | "functions" => prop_oneof![
            Just(json!([])),
            Just(json!([{"type": "function", "function": {"name": "f"}}])),
        ]
        .boxed(),
        "response_format" => prop_oneof![
            Just(json!({"type": "text"})),
            Just(json!({"type": "json_object"})),
        ]
        .boxed(),
        "suffix" => text().boxed(),
        "stop" => prop_oneof![
            text(),
            proptest::collection::vec(text(), 0..20).prop_map(Value::Array),
        ]
        .boxed(),
        "stream" | "logprobs" | "echo" => any::<bool>().prop_map(Value::Bool).boxed(),
        "stream_options" => prop_oneof![
            any::<bool>().prop_map(|b| json!({"include_usage": b})),
            Just(json!({})),
            any_json().prop_map(|v| json!({"include_usage": v})),
        ]
        .boxed(),
        "user" => text().boxed(),
        _ => int().boxed(),
    };
    prop_oneof![8 => typed, 1 => any_json()].boxed()
}

/// A Responses API input item: messages with text parts, calls, call outputs, and the rest.
fn input_item() -> impl Strategy<Value = Value> {
    let part = prop_oneof![
        text().prop_map(|t| json!({"type": "input_text", "text": t})),
        text().prop_map(|t| json!({"type": "output_text", "text": t})),
        any_json().prop_map(|t| json!({"type": t, "text": "x"})),
        any_json(),
    ];
    let content = prop_oneof![
        3 => text(),
        2 => proptest::collection::vec(part, 0..3).prop_map(Value::Array),
        1 => any_json(),
    ];
    prop_oneof![
        4 => (role(), content).prop_map(|(r, c)| json!({"role": r, "content": c})),
        2 => ("[a-z0-9]{0,3}", prop_oneof![Just(json!("f")), any_json()], text()).prop_map(
            |(id, name, arguments)| json!({"type": "function_call", "call_id": id,
                                           "name": name, "arguments": arguments})
        ),
        2 => ("[a-z0-9]{0,3}", prop_oneof![text(), any_json()]).prop_map(|(id, output)| {
            json!({"type": "function_call_output", "call_id": id, "output": output})
        }),
        1 => any_json().prop_map(|kind| json!({"type": kind})),
        1 => any_json(),
    ]
}

/// A Responses API field, well-typed (usually sensibly) or any JSON at all.
fn responses_field(name: &'static str) -> BoxedStrategy<Value> {
    let typed: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![Just(json!("m")), text()].boxed(),
        "input" => prop_oneof![
            text(),
            proptest::collection::vec(input_item(), 0..5).prop_map(Value::Array),
        ]
        .boxed(),
        "instructions" | "user" | "prompt_cache_key" | "safety_identifier" => text().boxed(),
        "tools" => prop_oneof![
            Just(json!([])),
            Just(json!([{"type": "function", "name": "f"}])),
            any_json().prop_map(|t| json!([{"type": "function", "name": t}])),
            any_json().prop_map(|t| json!([{"type": t}])),
        ]
        .boxed(),
        "tool_choice" => prop_oneof![
            Just(json!("auto")),
            Just(json!("required")),
            Just(json!({"type": "function", "name": "f"})),
            any_json().prop_map(|t| json!({"type": t})),
        ]
        .boxed(),
        "text" => prop_oneof![
            Just(json!({"format": {"type": "text"}})),
            Just(json!({"format": {"type": "json_object"}})),
            any_json().prop_map(|s| json!({"format": {"type": "json_schema", "schema": s}})),
            any_json().prop_map(|f| json!({"format": f})),
        ]
        .boxed(),
        "metadata" => proptest::collection::btree_map("\\PC{0,70}", any_json(), 0..18)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
            .boxed(),
        "service_tier" | "truncation" => {
            prop_oneof![Just(json!("auto")), Just(json!("flex")), text()].boxed()
        }
        "temperature" | "top_p" => float().boxed(),
        "stream" | "parallel_tool_calls" | "background" | "store" => {
            any::<bool>().prop_map(Value::Bool).boxed()
        }
        _ => int().boxed(),
    };
    prop_oneof![8 => typed, 1 => any_json()].boxed()
}

/// An Anthropic content block: text, tool use and results, and the rest.
fn content_block() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => text().prop_map(|t| json!({"type": "text", "text": t})),
        2 => ("[a-z0-9]{0,3}", prop_oneof![Just(json!("f")), any_json()], any_json()).prop_map(
            |(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input})
        ),
        2 => ("[a-z0-9]{0,3}", prop_oneof![text(), any_json()], any_json()).prop_map(
            |(id, content, is_error)| json!({"type": "tool_result", "tool_use_id": id,
                                             "content": content, "is_error": is_error})
        ),
        1 => any_json().prop_map(|kind| json!({"type": kind})),
        1 => any_json(),
    ]
}

/// A Messages API field, well-typed (usually sensibly) or any JSON at all.
fn messages_field(name: &'static str) -> BoxedStrategy<Value> {
    let anthropic_message = prop_oneof![
        4 => (
            prop_oneof![Just(json!("user")), Just(json!("assistant")), any_json()],
            prop_oneof![
                text(),
                proptest::collection::vec(content_block(), 0..4).prop_map(Value::Array),
            ],
        )
            .prop_map(|(role, content)| json!({"role": role, "content": content})),
        1 => any_json(),
    ];
    let typed: BoxedStrategy<Value> = match name {
        "model" => prop_oneof![Just(json!("m")), text()].boxed(),
        "messages" => proptest::collection::vec(anthropic_message, 0..5)
            .prop_map(Value::Array)
            .boxed(),
        "system" => prop_oneof![
            text(),
            proptest::collection::vec(content_block(), 0..3).prop_map(Value::Array),
        ]
        .boxed(),
        "stop_sequences" => proptest::collection::vec(text(), 0..4)
            .prop_map(Value::from)
            .boxed(),
        "tools" => prop_oneof![
            Just(json!([{"name": "f", "input_schema": {"type": "object"}}])),
            any_json().prop_map(|t| json!([{"type": t, "name": "f"}])),
            any_json().prop_map(|n| json!([{"name": n}])),
        ]
        .boxed(),
        "tool_choice" => prop_oneof![
            Just(json!({"type": "any"})),
            Just(json!({"type": "tool", "name": "f"})),
            any_json().prop_map(|t| json!({"type": t, "disable_parallel_tool_use": t})),
        ]
        .boxed(),
        "metadata" => any_json().prop_map(|u| json!({"user_id": u})).boxed(),
        "thinking" => any_json().prop_map(|t| json!({"type": t})).boxed(),
        "stream" => any::<bool>().prop_map(Value::Bool).boxed(),
        "temperature" | "top_p" => float().boxed(),
        _ => int().boxed(),
    };
    prop_oneof![8 => typed, 1 => any_json()].boxed()
}

/// A JSON object with each of `names` present or not (at `weight`), each from `field`.
fn object_of(
    names: &'static [&'static str],
    weight: f64,
    field: fn(&'static str) -> BoxedStrategy<Value>,
) -> impl Strategy<Value = Value> {
    let fields: Vec<_> = names
        .iter()
        .map(|&name| proptest::option::weighted(weight, field(name)).prop_map(move |v| (name, v)))
        .collect();
    fields.prop_map(|fields| {
        Value::Object(
            fields
                .into_iter()
                .filter_map(|(name, value)| Some((name.to_string(), value?)))
                .collect(),
        )
    })
}

fn request_object() -> impl Strategy<Value = Value> {
    let extra = proptest::option::of(("[a-z_]{1,10}", any_json()));
    (object_of(&FIELDS, 0.4, field), extra).prop_map(|(mut object, extra)| {
        if let (Value::Object(map), Some((key, value))) = (&mut object, extra) {
            map.entry(key).or_insert(value);
        }
        object
    })
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        Just(Endpoint::Chat),
        Just(Endpoint::Completion),
        Just(Endpoint::Responses),
        Just(Endpoint::Messages)
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_openai_shaped_json(endpoint in endpoint(), body in request_object()) {
        let bytes = serde_json::to_vec(&body).expect("serialises");
        check(endpoint, &bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_responses_shaped_json(body in object_of(&RESPONSES_FIELDS, 0.4, responses_field)) {
        let bytes = serde_json::to_vec(&body).expect("serialises");
        check(Endpoint::Responses, &bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_anthropic_shaped_json(body in object_of(&MESSAGES_FIELDS, 0.5, messages_field)) {
        let bytes = serde_json::to_vec(&body).expect("serialises");
        check(Endpoint::Messages, &bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_openai_arbitrary_json(endpoint in endpoint(), body in any_json()) {
        let bytes = serde_json::to_vec(&body).expect("serialises");
        check(endpoint, &bytes).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn fuzz_openai_arbitrary_bytes(
        endpoint in endpoint(),
        body in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        check(endpoint, &body).map_err(TestCaseError::fail)?;
    }

    /// Seeds with bytes overwritten or cut: mostly near-valid JSON.
    #[test]
    fn fuzz_openai_mutated_seeds(
        pick in any::<prop::sample::Index>(),
        edits in proptest::collection::vec(
            (any::<prop::sample::Index>(), prop_oneof![
                any::<u8>(),
                prop::sample::select(b"{}[]\",:0-e.\\ntf".to_vec()),
            ]),
            0..4,
        ),
        cut in any::<prop::sample::Index>(),
    ) {
        let seeds = all_seeds();
        let (endpoint, _, mut body) = seeds[pick.index(seeds.len())].clone();
        for (at, value) in edits {
            if !body.is_empty() {
                let i = at.index(body.len());
                body[i] = value;
            }
        }
        body.truncate(cut.index(body.len() + 1).max(body.len() / 2));
        check(endpoint, &body).map_err(TestCaseError::fail)?;
    }
}
