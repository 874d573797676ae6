//! Validation of client requests at the wire boundary. Every rule names the offending field so
//! the caller can fix its request; the router maps a violation to `INVALID_ARGUMENT`.

use crate::v1::{
    Cancel, ChatMessage, GenerateRequest, Interrupt, RequestClass, SamplingParams, Tool,
    ToolChoice, ToolChoiceMode,
};

/// Size limits a router enforces on incoming requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest `sampling.max_tokens` accepted.
    pub max_tokens_cap: u32,
    /// Largest single message (or prompt) in bytes.
    pub max_message_bytes: usize,
    /// Most messages in one request.
    pub max_messages: usize,
    /// Largest request id in bytes.
    pub max_request_id_bytes: usize,
    /// Largest `affinity_key` in bytes.
    pub max_affinity_key_bytes: usize,
    /// Most `metadata` entries.
    pub max_metadata_entries: usize,
    /// Largest `metadata` key in bytes.
    pub max_metadata_key_bytes: usize,
    /// Largest `metadata` value in bytes.
    pub max_metadata_value_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_tokens_cap: 4096,
            max_message_bytes: 256 * 1024,
            max_messages: 512,
            max_request_id_bytes: 128,
            max_affinity_key_bytes: 256,
            max_metadata_entries: 32,
            max_metadata_key_bytes: 64,
            max_metadata_value_bytes: 1024,
        }
    }
}

/// A request field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldViolation {
    pub field: String,
    pub message: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// Most ids a prompt given as token ids may have (`GenerateRequest.prompt_token_ids`).
pub const MAX_PROMPT_TOKEN_IDS: usize = 131_072;

/// Most tools one request may offer (OpenAI's own limit).
pub const MAX_TOOLS: usize = 128;

/// Rewrites OpenAI's newer name for system instructions, `developer`, to `system`: the
/// workers' chat templates (and the prefix cache's keys) know `system` only, so the two
/// spellings must reach them as one.
pub fn canonicalize_roles(messages: &mut [ChatMessage]) {
    for message in messages.iter_mut().filter(|m| m.role == "developer") {
        message.role = "system".into();
    }
}

/// Checks a `GenerateRequest` against the wire rules and `limits`. Does not check that the
/// model exists: that needs the cluster's membership view.
pub fn validate_generate_request(
    request: &GenerateRequest,
    limits: &RequestLimits,
) -> Result<(), FieldViolation> {
    validate_request_id(&request.request_id, limits)?;
    validate_affinity_and_metadata(request, limits)?;
    validate_model(&request.model)?;
    if RequestClass::try_from(request.class).is_err() {
        return Err(FieldViolation::new(
            "class",
            format!(
                "is {}, must be 0 (auto), 1 (latency-critical) or 2 (cost-sensitive)",
                request.class
            ),
        ));
    }
    let given = [
        ("messages", !request.messages.is_empty()),
        ("prompt", !request.prompt.is_empty()),
        ("prompt_token_ids", !request.prompt_token_ids.is_empty()),
    ];
    match given
        .iter()
        .filter(|(_, set)| *set)
        .map(|(field, _)| *field)
        .nth(1)
    {
        _ if given.iter().all(|(_, set)| !set) => {
            return Err(FieldViolation::new(
                "messages",
                "give messages, a prompt or prompt_token_ids",
            ));
        }
        Some(second) => {
            return Err(FieldViolation::new(
                second,
                "give one of messages, prompt and prompt_token_ids, not several",
            ));
        }
        None => {}
    }
    match crate::v1::Truncation::try_from(request.truncation) {
        Err(_) => {
            return Err(FieldViolation::new(
                "truncation",
                format!(
                    "is {}, must be 0 (disabled) or 1 (auto)",
                    request.truncation
                ),
            ));
        }
        Ok(crate::v1::Truncation::Auto) if request.messages.is_empty() => {
            return Err(FieldViolation::new(
                "truncation",
                "auto drops the oldest chat messages: it needs messages, not a prompt",
            ));
        }
        Ok(_) => {}
    }
    if request.prompt_token_ids.len() > MAX_PROMPT_TOKEN_IDS {
        return Err(FieldViolation::new(
            "prompt_token_ids",
            format!(
                "has {} ids, the limit is {MAX_PROMPT_TOKEN_IDS}",
                request.prompt_token_ids.len()
            ),
        ));
    }
    if request.prompt.len() > limits.max_message_bytes {
        return Err(FieldViolation::new(
            "prompt",
            format!(
                "is {} bytes, the limit is {} bytes",
                request.prompt.len(),
                limits.max_message_bytes
            ),
        ));
    }
    validate_messages("messages", &request.messages, limits, History::Whole)?;
    validate_tools(request, limits)?;
    if request.embed {
        validate_embedding(request)?;
    }
    let sampling = request.sampling.clone().unwrap_or_default();
    if sampling.max_tokens == 0 {
        return Err(FieldViolation::new(
            "sampling.max_tokens",
            "must be at least 1",
        ));
    }
    if sampling.max_tokens > limits.max_tokens_cap {
        return Err(FieldViolation::new(
            "sampling.max_tokens",
            format!(
                "is {}, the limit is {}",
                sampling.max_tokens, limits.max_tokens_cap
            ),
        ));
    }
    if let Some(t) = sampling.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(FieldViolation::new(
            "sampling.temperature",
            format!("is {t}, must be between 0 and 2"),
        ));
    }
    if let Some(p) = sampling.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(FieldViolation::new(
            "sampling.top_p",
            format!("is {p}, must be in (0, 1]"),
        ));
    }
    // `contains` is false for NaN: NaN is refused too.
    if !(0.0..=1.0).contains(&sampling.min_p) {
        return Err(FieldViolation::new(
            "sampling.min_p",
            format!(
                "is {}, must be between 0 and 1 (0 = off; 0.05 to 0.1 are common)",
                sampling.min_p
            ),
        ));
    }
    validate_penalties(&sampling)?;
    validate_response_format(&sampling, limits)?;
    if sampling.stop.len() > 16 {
        return Err(FieldViolation::new(
            "sampling.stop",
            "at most 16 stop sequences",
        ));
    }
    if let Some(i) = sampling
        .stop
        .iter()
        .position(|s| s.is_empty() || s.len() > 256)
    {
        return Err(FieldViolation::new(
            format!("sampling.stop[{i}]"),
            "must be 1 to 256 bytes",
        ));
    }
    Ok(())
}

/// An embedding request (`embed`) asks for a vector of its prompt: nothing that shapes or
/// scores generated text applies, so asking for any of it is a mistake worth naming.
fn validate_embedding(request: &GenerateRequest) -> Result<(), FieldViolation> {
    let refuse = |field: &str, why: &str| Err(FieldViolation::new(field, why));
    if !request.messages.is_empty() {
        return refuse(
            "messages",
            "an embedding request embeds a prompt: send `prompt` or `prompt_token_ids`",
        );
    }
    if !request.tools.is_empty() {
        return refuse("tools", "an embedding request calls no tools");
    }
    let Some(sampling) = &request.sampling else {
        return Ok(());
    };
    if sampling.max_tokens > 1 {
        return refuse(
            "sampling.max_tokens",
            "an embedding request generates nothing: leave it 0 (or 1)",
        );
    }
    if sampling.logprobs || sampling.prompt_logprobs {
        return refuse(
            "sampling.logprobs",
            "an embedding request has no tokens to score",
        );
    }
    if sampling.response_format.is_some() {
        return refuse(
            "sampling.response_format",
            "an embedding request answers a vector, not text",
        );
    }
    Ok(())
}

/// Most `logit_bias` entries a request may carry (OpenAI's own limit).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 300;

/// Most `top_logprobs` a request may ask for (OpenAI's own limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

fn validate_penalties(sampling: &SamplingParams) -> Result<(), FieldViolation> {
    if sampling.top_logprobs > MAX_TOP_LOGPROBS {
        return Err(FieldViolation::new(
            "sampling.top_logprobs",
            format!("is {}, at most {MAX_TOP_LOGPROBS}", sampling.top_logprobs),
        ));
    }
    if sampling.top_logprobs > 0 && !sampling.logprobs && !sampling.prompt_logprobs {
        return Err(FieldViolation::new(
            "sampling.top_logprobs",
            "needs logprobs or prompt_logprobs to be true",
        ));
    }
    for (field, value) in [
        ("sampling.presence_penalty", sampling.presence_penalty),
        ("sampling.frequency_penalty", sampling.frequency_penalty),
    ] {
        if let Some(v) = value.filter(|v| !(-2.0..=2.0).contains(v)) {
            return Err(FieldViolation::new(
                field,
                format!("is {v}, must be between -2 and 2"),
            ));
        }
    }
    if let Some(r) = sampling
        .repetition_penalty
        .filter(|r| !(*r > 0.0 && *r <= 10.0))
    {
        return Err(FieldViolation::new(
            "sampling.repetition_penalty",
            format!("is {r}, must be greater than 0 and at most 10 (1 = no penalty)"),
        ));
    }
    if sampling.logit_bias.len() > MAX_LOGIT_BIAS_ENTRIES {
        return Err(FieldViolation::new(
            "sampling.logit_bias",
            format!(
                "has {} entries, at most {MAX_LOGIT_BIAS_ENTRIES}",
                sampling.logit_bias.len()
            ),
        ));
    }
    // Smallest id first: the same request names the same entry every time.
    let mut biases: Vec<_> = sampling.logit_bias.iter().collect();
    biases.sort_unstable_by_key(|(id, _)| **id);
    if let Some((id, bias)) = biases
        .into_iter()
        .find(|(_, b)| !(-100.0..=100.0).contains(*b))
    {
        return Err(FieldViolation::new(
            format!("sampling.logit_bias[{id}]"),
            format!("is {bias}, must be between -100 and 100"),
        ));
    }
    Ok(())
}

/// Checks an `Interrupt` frame.
pub fn validate_interrupt(
    interrupt: &Interrupt,
    limits: &RequestLimits,
) -> Result<(), FieldViolation> {
    validate_request_id(&interrupt.request_id, limits)?;
    if interrupt.messages.is_empty() {
        return Err(FieldViolation::new(
            "interrupt.messages",
            "must hold the new instructions",
        ));
    }
    // An interrupt's tool results may answer calls of the conversation it continues, which
    // this frame does not carry: only calls within it are checked against.
    validate_messages(
        "interrupt.messages",
        &interrupt.messages,
        limits,
        History::Partial,
    )
}

/// Whether a message list is a whole conversation, so a tool result must answer a call made
/// earlier in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum History {
    Whole,
    Partial,
}

/// Checks a `Cancel` frame: its id must be one a request could have.
pub fn validate_cancel(cancel: &Cancel, limits: &RequestLimits) -> Result<(), FieldViolation> {
    validate_request_id(&cancel.request_id, limits)
}

fn validate_request_id(id: &str, limits: &RequestLimits) -> Result<(), FieldViolation> {
    if id.is_empty() {
        return Err(FieldViolation::new("request_id", "must not be empty"));
    }
    if id.len() > limits.max_request_id_bytes {
        return Err(FieldViolation::new(
            "request_id",
            format!(
                "is {} bytes, the limit is {}",
                id.len(),
                limits.max_request_id_bytes
            ),
        ));
    }
    printable("request_id", id)
}

/// Longest model name accepted: names are short identifiers, and one is echoed in errors.
pub const MAX_MODEL_BYTES: usize = 256;

/// Identifiers are logged and echoed in errors and headers: a control character (a newline
/// starting a forged log line, say) is refused.
fn printable(field: &str, value: &str) -> Result<(), FieldViolation> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(FieldViolation::new(
            field,
            format!("has the control character {c:?} at byte {at}; use printable characters"),
        )),
        None => Ok(()),
    }
}

fn validate_model(model: &str) -> Result<(), FieldViolation> {
    if model.trim().is_empty() {
        return Err(FieldViolation::new("model", "must not be empty"));
    }
    if model.len() > MAX_MODEL_BYTES {
        return Err(FieldViolation::new(
            "model",
            format!("is {} bytes, the limit is {MAX_MODEL_BYTES}", model.len()),
        ));
    }
    printable("model", model)
}

/// The routing hints are stored per request and the affinity key is hashed into routing
/// state: unbounded, they would let one request pin memory far beyond its messages.
fn validate_affinity_and_metadata(
    request: &GenerateRequest,
    limits: &RequestLimits,
) -> Result<(), FieldViolation> {
    if request.affinity_key.len() > limits.max_affinity_key_bytes {
        return Err(FieldViolation::new(
            "affinity_key",
            format!(
                "is {} bytes, the limit is {}",
                request.affinity_key.len(),
                limits.max_affinity_key_bytes
            ),
        ));
    }
    if request.metadata.len() > limits.max_metadata_entries {
        return Err(FieldViolation::new(
            "metadata",
            format!(
                "has {} entries, the limit is {}",
                request.metadata.len(),
                limits.max_metadata_entries
            ),
        ));
    }
    // Sorted, so the entry named is the same whatever the map's iteration order.
    let mut keys: Vec<&String> = request.metadata.keys().collect();
    keys.sort();
    for key in keys {
        if key.len() > limits.max_metadata_key_bytes {
            // The key itself is not echoed: it is the oversized part.
            return Err(FieldViolation::new(
                "metadata",
                format!(
                    "a key is {} bytes, the limit is {}",
                    key.len(),
                    limits.max_metadata_key_bytes
                ),
            ));
        }
        let value = &request.metadata[key];
        if value.len() > limits.max_metadata_value_bytes {
            return Err(FieldViolation::new(
                format!("metadata[{key:?}]"),
                format!(
                    "is {} bytes, the limit is {}",
                    value.len(),
                    limits.max_metadata_value_bytes
                ),
            ));
        }
    }
    Ok(())
}

fn validate_messages(
    field: &str,
    messages: &[ChatMessage],
    limits: &RequestLimits,
    history: History,
) -> Result<(), FieldViolation> {
    if messages.len() > limits.max_messages {
        return Err(FieldViolation::new(
            field,
            format!(
                "has {} messages, the limit is {}",
                messages.len(),
                limits.max_messages
            ),
        ));
    }
    for (i, message) in messages.iter().enumerate() {
        if !ROLES.contains(&message.role.as_str()) {
            return Err(FieldViolation::new(
                format!("{field}[{i}].role"),
                format!(
                    "is {:?}, must be one of system, developer (= system), user, assistant, tool",
                    message.role
                ),
            ));
        }
        validate_tool_turn(
            &format!("{field}[{i}]"),
            message,
            &messages[..i],
            history,
            limits,
        )?;
        if message.content.len() > limits.max_message_bytes {
            return Err(FieldViolation::new(
                format!("{field}[{i}].content"),
                format!(
                    "is {} bytes, the limit is {} bytes",
                    message.content.len(),
                    limits.max_message_bytes
                ),
            ));
        }
    }
    Ok(())
}

/// `sampling.response_format`: a known kind, and with a schema, a JSON object.
fn validate_response_format(
    sampling: &SamplingParams,
    limits: &RequestLimits,
) -> Result<(), FieldViolation> {
    use crate::v1::response_format::Kind;
    let Some(format) = &sampling.response_format else {
        return Ok(());
    };
    let Ok(kind) = Kind::try_from(format.kind) else {
        return Err(FieldViolation::new(
            "sampling.response_format.kind",
            format!(
                "is {}, must be 0 (text), 1 (JSON object) or 2 (JSON schema)",
                format.kind
            ),
        ));
    };
    if kind != Kind::JsonSchema {
        return Ok(());
    }
    if format.schema_json.len() > limits.max_message_bytes {
        return Err(FieldViolation::new(
            "sampling.response_format.schema_json",
            format!(
                "is {} bytes, the limit is {} bytes",
                format.schema_json.len(),
                limits.max_message_bytes
            ),
        ));
    }
    match serde_json::from_str::<serde_json::Value>(&format.schema_json) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(FieldViolation::new(
            "sampling.response_format.schema_json",
            "must be a JSON Schema object",
        )),
        Err(e) => Err(FieldViolation::new(
            "sampling.response_format.schema_json",
            format!("is not JSON: {e}"),
        )),
    }
}

/// A tool call's id, or the id a "tool" message answers: printable, 1 to 128 bytes.
fn validate_call_id(field: &str, id: &str) -> Result<(), FieldViolation> {
    if id.is_empty() || id.len() > 128 {
        return Err(FieldViolation::new(field, "must be 1 to 128 bytes"));
    }
    printable(field, id)
}

/// A function name as OpenAI takes it: 1 to 64 of a-z, A-Z, 0-9, `_` and `-`.
fn validate_function_name(field: &str, name: &str) -> Result<(), FieldViolation> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
        return Err(FieldViolation::new(
            field,
            format!("is {name:?}, must be 1 to 64 of a-z, A-Z, 0-9, _ and -"),
        ));
    }
    Ok(())
}

/// The tool fields of one message: calls only on assistant turns, and a "tool" message
/// answers a call an earlier assistant turn made (as OpenAI requires), so a model never sees a
/// result of a call it did not make.
fn validate_tool_turn(
    field: &str,
    message: &ChatMessage,
    earlier: &[ChatMessage],
    history: History,
    limits: &RequestLimits,
) -> Result<(), FieldViolation> {
    if !message.tool_calls.is_empty() && message.role != "assistant" {
        return Err(FieldViolation::new(
            format!("{field}.tool_calls"),
            format!(
                "only assistant messages carry tool calls (this one is {:?})",
                message.role
            ),
        ));
    }
    if message.tool_calls.len() > MAX_TOOLS {
        return Err(FieldViolation::new(
            format!("{field}.tool_calls"),
            format!("at most {MAX_TOOLS} calls in one message"),
        ));
    }
    for (j, call) in message.tool_calls.iter().enumerate() {
        validate_call_id(&format!("{field}.tool_calls[{j}].id"), &call.id)?;
        validate_function_name(&format!("{field}.tool_calls[{j}].name"), &call.name)?;
        if call.arguments.len() > limits.max_message_bytes {
            return Err(FieldViolation::new(
                format!("{field}.tool_calls[{j}].arguments"),
                format!(
                    "is {} bytes, the limit is {} bytes",
                    call.arguments.len(),
                    limits.max_message_bytes
                ),
            ));
        }
    }
    match (message.role == "tool", message.tool_call_id.is_empty()) {
        (true, true) => Err(FieldViolation::new(
            format!("{field}.tool_call_id"),
            "a tool message names the call it answers",
        )),
        (true, false) => {
            validate_call_id(&format!("{field}.tool_call_id"), &message.tool_call_id)?;
            let made = history == History::Partial
                || earlier
                    .iter()
                    .flat_map(|m| &m.tool_calls)
                    .any(|call| call.id == message.tool_call_id);
            if made {
                Ok(())
            } else {
                Err(FieldViolation::new(
                    format!("{field}.tool_call_id"),
                    format!(
                        "is {:?}, which no earlier assistant message's tool_calls made",
                        message.tool_call_id
                    ),
                ))
            }
        }
        (false, false) => Err(FieldViolation::new(
            format!("{field}.tool_call_id"),
            "only tool messages answer a call",
        )),
        (false, true) => Ok(()),
    }
}

/// `tools` and `tool_choice`: well-formed functions with distinct names, and a choice that
/// names one of them.
fn validate_tools(request: &GenerateRequest, limits: &RequestLimits) -> Result<(), FieldViolation> {
    if !request.tools.is_empty() && request.messages.is_empty() {
        return Err(FieldViolation::new(
            "tools",
            "tools need chat messages, not a raw prompt",
        ));
    }
    if request.tools.len() > MAX_TOOLS {
        return Err(FieldViolation::new(
            "tools",
            format!(
                "has {} tools, the limit is {MAX_TOOLS}",
                request.tools.len()
            ),
        ));
    }
    for (i, tool) in request.tools.iter().enumerate() {
        validate_tool(&format!("tools[{i}]"), tool, limits)?;
        if request.tools[..i].iter().any(|t| t.name == tool.name) {
            return Err(FieldViolation::new(
                format!("tools[{i}].name"),
                format!("{:?} is offered twice", tool.name),
            ));
        }
    }
    let Some(choice) = &request.tool_choice else {
        return Ok(());
    };
    validate_tool_choice(choice, &request.tools)
}

fn validate_tool(field: &str, tool: &Tool, limits: &RequestLimits) -> Result<(), FieldViolation> {
    validate_function_name(&format!("{field}.name"), &tool.name)?;
    for (name, value) in [
        ("description", &tool.description),
        ("parameters_json", &tool.parameters_json),
    ] {
        if value.len() > limits.max_message_bytes {
            return Err(FieldViolation::new(
                format!("{field}.{name}"),
                format!(
                    "is {} bytes, the limit is {} bytes",
                    value.len(),
                    limits.max_message_bytes
                ),
            ));
        }
    }
    if tool.parameters_json.is_empty() {
        return Ok(());
    }
    match serde_json::from_str::<serde_json::Value>(&tool.parameters_json) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => Err(FieldViolation::new(
            format!("{field}.parameters_json"),
            "must be a JSON Schema object, e.g. {\"type\": \"object\", \"properties\": {…}}",
        )),
        Err(e) => Err(FieldViolation::new(
            format!("{field}.parameters_json"),
            format!("is not JSON: {e}"),
        )),
    }
}

fn validate_tool_choice(choice: &ToolChoice, tools: &[Tool]) -> Result<(), FieldViolation> {
    let Ok(mode) = ToolChoiceMode::try_from(choice.mode) else {
        return Err(FieldViolation::new(
            "tool_choice.mode",
            format!(
                "is {}, must be 0 (auto), 1 (none) or 2 (required)",
                choice.mode
            ),
        ));
    };
    if !choice.function.is_empty() && !tools.iter().any(|t| t.name == choice.function) {
        return Err(FieldViolation::new(
            "tool_choice.function",
            format!("is {:?}, which is not one of tools", choice.function),
        ));
    }
    if mode == ToolChoiceMode::Required && tools.is_empty() {
        return Err(FieldViolation::new(
            "tool_choice.mode",
            "requires a tool call, but the request offers no tools",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> GenerateRequest {
        GenerateRequest {
            request_id: "r1".into(),
            model: "m".into(),
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hi".into(),
                ..Default::default()
            }],
            sampling: Some(SamplingParams {
                max_tokens: 8,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field_of(request: GenerateRequest) -> String {
        validate_generate_request(&request, &RequestLimits::default())
            .unwrap_err()
            .field
    }

    #[test]
    fn the_most_likely_tokens_come_with_generated_or_prompt_log_probabilities() {
        let with = |logprobs: bool, prompt_logprobs: bool| GenerateRequest {
            sampling: Some(SamplingParams {
                max_tokens: 1,
                logprobs,
                prompt_logprobs,
                top_logprobs: 2,
                ..Default::default()
            }),
            ..valid()
        };
        let limits = RequestLimits::default();
        assert!(validate_generate_request(&with(true, false), &limits).is_ok());
        assert!(validate_generate_request(&with(false, true), &limits).is_ok());
        assert_eq!(field_of(with(false, false)), "sampling.top_logprobs");
    }

    #[test]
    fn an_embedding_request_embeds_a_prompt_and_asks_for_nothing_generated() {
        let limits = RequestLimits::default();
        let embed = GenerateRequest {
            embed: true,
            messages: Vec::new(),
            prompt: "text".into(),
            sampling: Some(SamplingParams {
                max_tokens: 1,
                ..Default::default()
            }),
            ..valid()
        };
        assert!(validate_generate_request(&embed, &limits).is_ok());
        let ids = GenerateRequest {
            prompt: String::new(),
            prompt_token_ids: vec![1, 2],
            ..embed.clone()
        };
        assert!(validate_generate_request(&ids, &limits).is_ok());
        assert_eq!(
            field_of(GenerateRequest {
                embed: true,
                ..valid()
            }),
            "messages"
        );
        let asking = |sampling: SamplingParams| GenerateRequest {
            sampling: Some(SamplingParams {
                max_tokens: sampling.max_tokens.max(1),
                ..sampling
            }),
            ..embed.clone()
        };
        assert_eq!(
            field_of(asking(SamplingParams {
                max_tokens: 16,
                ..Default::default()
            })),
            "sampling.max_tokens"
        );
        assert_eq!(
            field_of(asking(SamplingParams {
                logprobs: true,
                ..Default::default()
            })),
            "sampling.logprobs"
        );
        assert_eq!(
            field_of(asking(SamplingParams {
                response_format: Some(Default::default()),
                ..Default::default()
            })),
            "sampling.response_format"
        );
    }

    #[test]
    fn truncation_is_disabled_or_auto_and_auto_drops_chat_messages_only() {
        let limits = RequestLimits::default();
        let auto = GenerateRequest {
            truncation: crate::v1::Truncation::Auto as i32,
            ..valid()
        };
        assert!(validate_generate_request(&auto, &limits).is_ok());
        let prompt = GenerateRequest {
            messages: Vec::new(),
            prompt: "text".into(),
            ..auto.clone()
        };
        assert_eq!(field_of(prompt), "truncation");
        assert_eq!(
            field_of(GenerateRequest {
                truncation: 7,
                ..valid()
            }),
            "truncation"
        );
    }

    #[test]
    fn a_prompt_is_messages_text_or_token_ids_and_only_one() {
        let ids = GenerateRequest {
            messages: Vec::new(),
            prompt_token_ids: vec![1, 2, 3],
            ..valid()
        };
        assert_eq!(
            validate_generate_request(&ids, &RequestLimits::default()),
            Ok(())
        );
        assert_eq!(
            field_of(GenerateRequest {
                prompt: "text".into(),
                ..ids.clone()
            }),
            "prompt_token_ids"
        );
        assert_eq!(
            field_of(GenerateRequest {
                prompt_token_ids: vec![1],
                ..valid()
            }),
            "prompt_token_ids"
        );
        assert_eq!(
            field_of(GenerateRequest {
                prompt_token_ids: vec![0; MAX_PROMPT_TOKEN_IDS + 1],
                ..ids.clone()
            }),
            "prompt_token_ids"
        );
        assert_eq!(
            field_of(GenerateRequest {
                prompt_token_ids: Vec::new(),
                ..ids
            }),
            "messages"
        );
    }

    #[test]
    fn accepts_a_valid_request() {
        assert_eq!(
            validate_generate_request(&valid(), &RequestLimits::default()),
            Ok(())
        );
    }

    fn with_tools() -> GenerateRequest {
        let mut r = valid();
        r.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: "Weather in a city".into(),
                parameters_json: r#"{"type":"object","properties":{"city":{"type":"string"}}}"#
                    .into(),
            },
            Tool {
                name: "now".into(),
                ..Default::default()
            },
        ];
        r
    }

    /// A conversation where the assistant called `get_weather` as `call_1` and the tool
    /// answered.
    fn answered_call() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "user".into(),
                content: "weather in Paris?".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![crate::v1::ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: "call_1".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn tools_and_tool_turns_are_accepted_when_well_formed() {
        let mut r = with_tools();
        r.messages = answered_call();
        r.tool_choice = Some(ToolChoice {
            function: "now".into(),
            single_call: true,
            ..Default::default()
        });
        assert_eq!(
            validate_generate_request(&r, &RequestLimits::default()),
            Ok(())
        );
    }

    #[test]
    fn bad_tools_and_tool_turns_name_their_field() {
        let check = |edit: &dyn Fn(&mut GenerateRequest), field: &str| {
            let mut r = with_tools();
            r.messages = answered_call();
            edit(&mut r);
            assert_eq!(field_of(r), field);
        };
        check(&|r| r.tools[1].name = "two words".into(), "tools[1].name");
        check(&|r| r.tools[1].name = "get_weather".into(), "tools[1].name");
        check(
            &|r| r.tools[0].parameters_json = "[1]".into(),
            "tools[0].parameters_json",
        );
        check(
            &|r| r.tools[0].parameters_json = "{".into(),
            "tools[0].parameters_json",
        );
        check(
            &|r| {
                r.tools = vec![
                    Tool {
                        name: "f".into(),
                        ..Default::default()
                    };
                    MAX_TOOLS + 1
                ]
            },
            "tools",
        );
        check(
            &|r| {
                r.messages.clear();
                r.prompt = "p".into();
            },
            "tools",
        );
        check(
            &|r| {
                r.tool_choice = Some(ToolChoice {
                    function: "missing".into(),
                    ..Default::default()
                })
            },
            "tool_choice.function",
        );
        check(
            &|r| {
                r.tools.clear();
                r.tool_choice = Some(ToolChoice {
                    mode: ToolChoiceMode::Required as i32,
                    ..Default::default()
                })
            },
            "tool_choice.mode",
        );
        check(
            &|r| {
                r.tool_choice = Some(ToolChoice {
                    mode: 7,
                    ..Default::default()
                })
            },
            "tool_choice.mode",
        );
        check(
            &|r| r.messages[2].tool_call_id = "call_9".into(),
            "messages[2].tool_call_id",
        );
        check(
            &|r| r.messages[2].tool_call_id.clear(),
            "messages[2].tool_call_id",
        );
        check(
            &|r| r.messages[0].tool_call_id = "call_1".into(),
            "messages[0].tool_call_id",
        );
        check(
            &|r| r.messages[0].tool_calls = r.messages[1].tool_calls.clone(),
            "messages[0].tool_calls",
        );
        check(
            &|r| r.messages[1].tool_calls[0].id.clear(),
            "messages[1].tool_calls[0].id",
        );
        check(
            &|r| r.messages[1].tool_calls[0].name = "a.b".into(),
            "messages[1].tool_calls[0].name",
        );
        // The answer must come after the call it answers.
        check(&|r| r.messages.swap(1, 2), "messages[1].tool_call_id");
    }

    #[test]
    fn a_response_format_names_its_kind_and_takes_a_schema_object() {
        use crate::v1::{ResponseFormat, response_format::Kind};
        let with = |kind: i32, schema: &str| {
            let mut r = valid();
            r.sampling.as_mut().unwrap().response_format = Some(ResponseFormat {
                kind,
                schema_json: schema.into(),
                ..Default::default()
            });
            validate_generate_request(&r, &RequestLimits::default())
        };
        assert_eq!(with(Kind::JsonObject as i32, ""), Ok(()));
        assert_eq!(
            with(Kind::JsonSchema as i32, r#"{"type":"object"}"#),
            Ok(())
        );
        for (kind, schema, field) in [
            (9, "", "sampling.response_format.kind"),
            (
                Kind::JsonSchema as i32,
                "",
                "sampling.response_format.schema_json",
            ),
            (
                Kind::JsonSchema as i32,
                "[]",
                "sampling.response_format.schema_json",
            ),
        ] {
            assert_eq!(with(kind, schema).unwrap_err().field, field);
        }
    }

    #[test]
    fn an_interrupt_may_answer_a_call_of_the_conversation_it_continues() {
        let mut interrupt = Interrupt {
            request_id: "r1".into(),
            messages: vec![ChatMessage {
                role: "tool".into(),
                content: "sunny".into(),
                tool_call_id: "call_1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            validate_interrupt(&interrupt, &RequestLimits::default()),
            Ok(())
        );
        interrupt.messages[0].tool_call_id.clear();
        assert_eq!(
            validate_interrupt(&interrupt, &RequestLimits::default())
                .unwrap_err()
                .field,
            "interrupt.messages[0].tool_call_id"
        );
    }

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(
            field_of(GenerateRequest {
                model: " ".into(),
                ..valid()
            }),
            "model"
        );
        assert_eq!(
            field_of(GenerateRequest {
                request_id: "".into(),
                ..valid()
            }),
            "request_id"
        );
        let mut r = valid();
        r.sampling.as_mut().unwrap().max_tokens = 0;
        assert_eq!(field_of(r), "sampling.max_tokens");
        let mut r = valid();
        r.sampling.as_mut().unwrap().max_tokens = 1_000_000;
        assert_eq!(field_of(r), "sampling.max_tokens");
        let mut r = valid();
        r.messages[0].content = "x".repeat(RequestLimits::default().max_message_bytes + 1);
        assert_eq!(field_of(r), "messages[0].content");
        let mut r = valid();
        r.messages[0].role = "robot".into();
        assert_eq!(field_of(r), "messages[0].role");
        let mut r = valid();
        r.messages.clear();
        assert_eq!(field_of(r), "messages");
        let mut r = valid();
        r.sampling.as_mut().unwrap().top_p = Some(0.0);
        assert_eq!(field_of(r), "sampling.top_p");
    }

    #[test]
    fn min_p_is_a_fraction_and_not_nan() {
        let with = |min_p: f32| {
            let mut r = valid();
            r.sampling.as_mut().unwrap().min_p = min_p;
            r
        };
        let limits = RequestLimits::default();
        for fine in [0.0, 0.05, 1.0] {
            assert_eq!(validate_generate_request(&with(fine), &limits), Ok(()));
        }
        for bad in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
            let violation = validate_generate_request(&with(bad), &limits).unwrap_err();
            assert_eq!(violation.field, "sampling.min_p", "{bad}");
            assert!(
                violation.message.contains("between 0 and 1"),
                "{}",
                violation.message
            );
        }
    }

    #[test]
    fn identifiers_are_printable_and_short_and_the_class_is_known() {
        let forged = "q1\n2026-12-05T08:00:00Z ERROR forged line";
        assert_eq!(
            field_of(GenerateRequest {
                request_id: forged.into(),
                ..valid()
            }),
            "request_id"
        );
        assert_eq!(
            field_of(GenerateRequest {
                model: "m\u{1b}[31m".into(),
                ..valid()
            }),
            "model"
        );
        assert_eq!(
            field_of(GenerateRequest {
                model: "m".repeat(MAX_MODEL_BYTES + 1),
                ..valid()
            }),
            "model"
        );
        for class in [3, -1] {
            assert_eq!(field_of(GenerateRequest { class, ..valid() }), "class");
        }
        // Unicode that prints is fine.
        let fine = GenerateRequest {
            request_id: "réq-🦀".into(),
            model: "m".repeat(MAX_MODEL_BYTES),
            class: 2,
            ..valid()
        };
        assert_eq!(
            validate_generate_request(&fine, &RequestLimits::default()),
            Ok(())
        );
    }

    #[test]
    fn penalties_and_biases_are_checked_against_their_ranges() {
        fn with(edit: impl FnOnce(&mut SamplingParams)) -> GenerateRequest {
            let mut r = valid();
            edit(r.sampling.as_mut().unwrap());
            r
        }
        let limits = RequestLimits::default();
        let at_the_edges = with(|s| {
            s.presence_penalty = Some(-2.0);
            s.frequency_penalty = Some(2.0);
            s.repetition_penalty = Some(10.0);
            s.logit_bias = (0..MAX_LOGIT_BIAS_ENTRIES as u32)
                .map(|id| (id, if id % 2 == 0 { 100.0 } else { -100.0 }))
                .collect();
        });
        assert!(validate_generate_request(&at_the_edges, &limits).is_ok());

        let cases: [(GenerateRequest, &str); 10] = [
            (
                with(|s| {
                    s.logprobs = true;
                    s.top_logprobs = 21;
                }),
                "sampling.top_logprobs",
            ),
            (with(|s| s.top_logprobs = 2), "sampling.top_logprobs"),
            (
                with(|s| s.presence_penalty = Some(2.5)),
                "sampling.presence_penalty",
            ),
            (
                with(|s| s.frequency_penalty = Some(f32::NAN)),
                "sampling.frequency_penalty",
            ),
            (
                with(|s| s.repetition_penalty = Some(0.0)),
                "sampling.repetition_penalty",
            ),
            (
                with(|s| s.repetition_penalty = Some(10.5)),
                "sampling.repetition_penalty",
            ),
            (
                with(|s| s.repetition_penalty = Some(f32::INFINITY)),
                "sampling.repetition_penalty",
            ),
            (
                with(|s| {
                    s.logit_bias = (0..=MAX_LOGIT_BIAS_ENTRIES as u32)
                        .map(|id| (id, 1.0))
                        .collect()
                }),
                "sampling.logit_bias",
            ),
            (
                with(|s| s.logit_bias = [(7, 1.0), (42, 101.0)].into()),
                "sampling.logit_bias[42]",
            ),
            (
                with(|s| s.logit_bias = [(9, f32::NAN), (3, -100.5)].into()),
                "sampling.logit_bias[3]",
            ),
        ];
        for (request, field) in cases {
            assert_eq!(field_of(request), field);
        }
    }

    #[test]
    fn routing_hints_have_length_limits() {
        let limits = RequestLimits::default();
        let at_limits = GenerateRequest {
            affinity_key: "a".repeat(limits.max_affinity_key_bytes),
            metadata: (0..limits.max_metadata_entries)
                .map(|i| {
                    let key = format!("{i:0>width$}", width = limits.max_metadata_key_bytes);
                    (key, "v".repeat(limits.max_metadata_value_bytes))
                })
                .collect(),
            ..valid()
        };
        assert_eq!(validate_generate_request(&at_limits, &limits), Ok(()));

        let violation =
            |request: GenerateRequest| validate_generate_request(&request, &limits).unwrap_err();
        let long_key = violation(GenerateRequest {
            affinity_key: "a".repeat(limits.max_affinity_key_bytes + 1),
            ..valid()
        });
        assert_eq!(long_key.field, "affinity_key");
        assert_eq!(long_key.message, "is 257 bytes, the limit is 256");

        let mut many = at_limits.clone();
        many.metadata.insert("one-more".into(), "v".into());
        let many = violation(many);
        assert_eq!(many.field, "metadata");
        assert_eq!(many.message, "has 33 entries, the limit is 32");

        let mut long_metadata_key = valid();
        long_metadata_key
            .metadata
            .insert("k".repeat(limits.max_metadata_key_bytes + 1), "v".into());
        let long_metadata_key = violation(long_metadata_key);
        assert_eq!(long_metadata_key.field, "metadata");
        assert_eq!(
            long_metadata_key.message,
            "a key is 65 bytes, the limit is 64"
        );

        let mut long_value = valid();
        long_value
            .metadata
            .insert("tenant".into(), "t".repeat(2000));
        let long_value = violation(long_value);
        assert_eq!(long_value.field, "metadata[\"tenant\"]");
        assert_eq!(long_value.message, "is 2000 bytes, the limit is 1024");
    }

    #[test]
    fn missing_sampling_means_zero_max_tokens() {
        assert_eq!(
            field_of(GenerateRequest {
                sampling: None,
                ..valid()
            }),
            "sampling.max_tokens"
        );
    }
}

#[cfg(test)]
mod fuzz;
