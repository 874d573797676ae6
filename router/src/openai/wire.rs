//! OpenAI wire types (the subset Switchyard speaks) and their translation to and from
//! `switchyard.v1` messages. Nothing outside `openai/` sees these types.
//!
//! Requests are parsed leniently (unknown fields are ignored, as OpenAI clients send many) but
//! validated strictly: every rejection names the OpenAI field at fault.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_proto::v1;

use super::error::ApiError;
use super::tools;

/// `stop` as OpenAI accepts it: one string or a list.
#[derive(Debug, Clone)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Stop {
    /// Says what `stop` must be (serde's untagged enum said "data did not match any variant
    /// of untagged enum Stop").
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        match &value {
            Value::String(s) => return Ok(Stop::One(s.clone())),
            Value::Array(items) => {
                let strings: Option<Vec<String>> = items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string))
                    .collect();
                if let Some(strings) = strings {
                    return Ok(Stop::Many(strings));
                }
            }
            _ => {}
        }
        Err(serde::de::Error::custom(format!(
            "is {value}, must be a string or an array of strings"
        )))
    }
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "null_is_false")]
    pub include_usage: bool,
}

/// A boolean OpenAI documents as nullable (`stream`, `stream_options.include_usage`):
/// `null` is the default, `false`, as clients that write every field send it.
fn null_is_false<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    /// Newer name of `max_tokens` (chat only, but harmless on completions).
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; accepted as vLLM and others do.
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// Not in OpenAI's API; accepted as vLLM does (multiplicative, 1 = none).
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string, OpenAI's form) → bias.
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Chat: `true`/`false`; completions: how many of the most likely tokens to list (0–5).
    pub logprobs: Option<Value>,
    /// Chat only: how many of the most likely tokens to list (0–20), with `logprobs: true`.
    pub top_logprobs: Option<Value>,
    pub n: Option<i64>,
    #[serde(default, deserialize_with = "null_is_false")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// End-user id; the affinity key when neither field below is given.
    pub user: Option<String>,
    /// OpenAI's prompt-cache routing hint: requests sharing it share a worker's cache.
    pub prompt_cache_key: Option<String>,
    /// OpenAI's newer name for the end user.
    pub safety_identifier: Option<String>,
    /// OpenAI's processing tier, as a lane ([`service_tier_class`]).
    pub service_tier: Option<String>,
    /// Not in OpenAI's API; vLLM's and llama.cpp's: generate `max_tokens` whatever the model
    /// says (load tests send it for answers of a known length).
    #[serde(default, deserialize_with = "null_is_false")]
    pub ignore_eos: bool,
    /// Not in OpenAI's API; vLLM's and llama.cpp's (llama.cpp's clients send it by default):
    /// keep only tokens at least this fraction as likely as the most likely one. `null` is off.
    pub min_p: Option<f64>,
    /// `{"type": "text" | "json_object"}` or `{"type": "json_schema", "json_schema": {"name",
    /// "schema", "strict"?, "description"?}}`.
    pub response_format: Option<Value>,
    /// Fields asking for what Switchyard does not do: refused by name rather than ignored, as
    /// a client asking for them would misread an answer without them.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

impl SamplingFields {
    /// The request's affinity key: its most specific hint ([`affinity_hint`]).
    fn affinity_key(&self) -> String {
        affinity_hint(&self.prompt_cache_key, &self.safety_identifier, &self.user).0
    }
}

/// OpenAI fields whose meaningful values Switchyard cannot honour. Their "off" values (`false`,
/// `null`, `0`, `[]`, `{"type": "text"}`) are accepted, as SDKs and frameworks send them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Unsupported {
    tools: Option<Value>,
    functions: Option<Value>,
    tool_choice: Option<Value>,
    function_call: Option<Value>,
    echo: Option<Value>,
    best_of: Option<Value>,
    suffix: Option<Value>,
    modalities: Option<Value>,
    audio: Option<Value>,
    /// vLLM's: a length the answer may not end before. A client sending it counts on the length.
    min_tokens: Option<Value>,
    /// OpenAI's reasoning models': how hard to think (`none` is off, as the Responses door's
    /// `reasoning.effort`).
    reasoning_effort: Option<Value>,
}

impl Unsupported {
    /// Whether a text completion asks for its prompt echoed (and, with `logprobs`, scored).
    fn echo(&self) -> bool {
        self.echo == Some(Value::Bool(true))
    }

    /// `form` tells the endpoints apart: chat takes tools (read by its own request type),
    /// text completions do not.
    fn check(&self, form: LogprobsForm) -> Result<(), ApiError> {
        let chat = form == LogprobsForm::Chat;
        fn off(value: &Option<Value>) -> bool {
            match value {
                None | Some(Value::Null) | Some(Value::Bool(false)) => true,
                Some(Value::Number(n)) => n.as_f64() == Some(0.0),
                Some(Value::Array(items)) => items.is_empty(),
                Some(Value::String(s)) => s.is_empty(),
                _ => false,
            }
        }
        let refusals = [
            (
                "tools",
                chat || off(&self.tools),
                "tools are taken by /v1/chat/completions, not by text completions",
            ),
            (
                "functions",
                off(&self.functions),
                "the legacy functions API is not supported: send tools (and tool_choice)",
            ),
            // "none" and "auto" ask for no call here (there are no tools); "required" or a
            // named function ask for one, which would never come.
            (
                "tool_choice",
                chat || off(&self.tool_choice)
                    || self.tool_choice == Some(Value::from("none"))
                    || self.tool_choice == Some(Value::from("auto")),
                "tool_choice is taken by /v1/chat/completions, not by text completions",
            ),
            (
                "function_call",
                off(&self.function_call)
                    || self.function_call == Some(Value::from("none"))
                    || self.function_call == Some(Value::from("auto")),
                "the legacy functions API is not supported: send tools (and tool_choice)",
            ),
            (
                "echo",
                off(&self.echo) || (!chat && self.echo == Some(Value::Bool(true))),
                if chat {
                    "echo is taken by /v1/completions, not by chat completions"
                } else {
                    "must be true or false"
                },
            ),
            (
                "best_of",
                off(&self.best_of) || self.best_of == Some(Value::from(1)),
                "only best_of=1 is supported",
            ),
            (
                "suffix",
                off(&self.suffix),
                "a suffix (fill-in-the-middle) is not supported",
            ),
            (
                "modalities",
                off(&self.modalities)
                    || self
                        .modalities
                        .as_ref()
                        .and_then(Value::as_array)
                        .is_some_and(|m| m.iter().all(|m| m == "text")),
                "only [\"text\"] output is supported",
            ),
            ("audio", off(&self.audio), "audio output is not supported"),
            (
                "min_tokens",
                off(&self.min_tokens),
                "a minimum answer length is not supported (ignore_eos is: it generates max_tokens)",
            ),
            (
                "reasoning_effort",
                off(&self.reasoning_effort) || self.reasoning_effort == Some(Value::from("none")),
                "the models Switchyard serves do not reason: leave reasoning_effort out",
            ),
        ];
        match refusals.into_iter().find(|(_, off, _)| !off) {
            Some((field, _, why)) => Err(ApiError::invalid(field, why)),
            None => Ok(()),
        }
    }
}

// The sampling fields are read from the same JSON object by `parse_body`, not with
// `#[serde(flatten)]`: a flattened field's type error loses its name (serde buffers it first).
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Option<Vec<Value>>,
    /// `true` keeps the completion to read back (see [`crate::openai::stored_chat`]).
    pub store: Option<Value>,
    /// Pairs kept with a stored completion, to list it by.
    pub metadata: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<Value>,
    #[serde(skip)]
    pub sampling: SamplingFields,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// A request type whose sampling fields sit in the same JSON object as its own.
pub trait WithSampling: DeserializeOwned {
    fn set_sampling(&mut self, sampling: SamplingFields);
}

impl WithSampling for ChatCompletionRequest {
    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }
}

impl WithSampling for CompletionRequest {
    fn set_sampling(&mut self, sampling: SamplingFields) {
        self.sampling = sampling;
    }
}

/// Parses a request body: a JSON object whose fields have the types OpenAI gives them. A
/// field of the wrong type is a 400 naming it (`max_tokens`, `stream_options.include_usage`).
pub fn parse_body<T: WithSampling>(body: &[u8]) -> Result<T, ApiError> {
    let value = json_object(body)?;
    let mut request: T = typed(&value)?;
    request.set_sampling(typed(&value)?);
    Ok(request)
}

/// A request body as a JSON object.
pub(crate) fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    // A UTF-8 byte order mark, as some Windows editors and PowerShell's `Set-Content -Encoding
    // utf8` write, is ignored (RFC 8259 §8.1 allows it; found from outside: `curl -d @file`
    // with such a file was a 400 "not valid JSON: expected value at line 1 column 1").
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_body(format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_body("must be a JSON object"));
    }
    Ok(value)
}

/// `value` read as `U`; a field of the wrong type is a 400 naming it.
pub(crate) fn typed<U: DeserializeOwned>(value: &Value) -> Result<U, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            ApiError::bad_body(e.into_inner())
        } else {
            ApiError::invalid(field, e.into_inner())
        }
    })
}

/// OpenAI's `response_format`; `None` for free text.
pub(super) fn response_format(
    value: Option<&Value>,
) -> Result<Option<v1::ResponseFormat>, ApiError> {
    use v1::response_format::Kind;
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = value.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(v1::ResponseFormat {
            kind: Kind::JsonObject as i32,
            ..Default::default()
        })),
        Some("json_schema") => {
            let spec = value
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "response_format.json_schema",
                        "must be an object with the schema's name and schema",
                    )
                })?;
            let schema = match spec.get("schema") {
                Some(schema @ Value::Object(_)) => schema.to_string(),
                // OpenAI's own default: any JSON object.
                None | Some(Value::Null) => r#"{"type":"object"}"#.to_string(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.schema",
                        "must be a JSON Schema object",
                    ));
                }
            };
            let name = match spec.get("name") {
                Some(Value::String(name)) => name.clone(),
                None | Some(Value::Null) => String::new(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "response_format.json_schema.name",
                        "must be a string",
                    ));
                }
            };
            Ok(Some(v1::ResponseFormat {
                kind: Kind::JsonSchema as i32,
                schema_json: schema,
                name,
            }))
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// What a handler needs besides the proto request.
#[derive(Debug, Clone, Copy)]
pub struct StreamMode {
    pub stream: bool,
    pub include_usage: bool,
    /// The client asked for log probabilities: the response carries them.
    pub logprobs: bool,
    /// The field the client bounded its output with (`max_tokens` or
    /// `max_completion_tokens`); `None` when it gave neither and the default applies.
    pub max_tokens_field: Option<&'static str>,
    /// How many choices the answer has, each a generation of its own: `n` for each prompt
    /// (a completions request may send a batch of prompts).
    pub choices: u32,
    /// `n`: choices `p·n` to `p·n + n − 1` answer prompt `p`.
    pub per_prompt: u32,
    /// `echo` with `max_tokens: 0`: each choice is its scored prompt alone, and the token
    /// generated to get its scores is left out (see [`crate::openai::choices::score_only`]).
    pub score_only: bool,
    /// The field the affinity key came from ([`affinity_hint`]; `""` for none).
    pub affinity_field: &'static str,
}

/// The most specific affinity hint a client gave, and the field it came from (`""` for none):
/// OpenAI's `prompt_cache_key` is what one is for; `safety_identifier` and its older name
/// `user` name the end user, whose requests share their prompts' openings.
pub(super) fn affinity_hint(
    prompt_cache_key: &Option<String>,
    safety_identifier: &Option<String>,
    user: &Option<String>,
) -> (String, &'static str) {
    [
        ("prompt_cache_key", prompt_cache_key),
        ("safety_identifier", safety_identifier),
        ("user", user),
    ]
    .into_iter()
    .find_map(|(field, value)| value.clone().map(|v| (v, field)))
    .unwrap_or_default()
}

/// OpenAI's `service_tier` as a lane: `priority` is latency-critical, `flex` cost-sensitive,
/// `auto` and `default` leave it to the router's classifier (the `x-switchyard-class` header
/// wins over it).
pub fn service_tier_class(tier: Option<&str>) -> Result<v1::RequestClass, ApiError> {
    match tier {
        None | Some("auto" | "default") => Ok(v1::RequestClass::Auto),
        Some("priority") => Ok(v1::RequestClass::LatencyCritical),
        Some("flex") => Ok(v1::RequestClass::CostSensitive),
        Some(other) => Err(ApiError::invalid(
            "service_tier",
            format!("is {other:?}, must be \"auto\", \"default\", \"flex\" or \"priority\""),
        )),
    }
}

/// The lane a request ran in, as OpenAI's `service_tier` names it.
pub fn service_tier_of(lane: &str) -> &'static str {
    if lane == "latency-critical" {
        "priority"
    } else {
        "flex"
    }
}

/// Which endpoint's form `logprobs` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogprobsForm {
    /// `logprobs: bool` and `top_logprobs: 0..=20`.
    Chat,
    /// `logprobs: 0..=5`, the number of most likely tokens to list.
    Completion,
}

/// `(logprobs, top_logprobs)` as the proto has them, from either endpoint's form.
fn logprobs_asked(fields: &SamplingFields, form: LogprobsForm) -> Result<(bool, u32), ApiError> {
    let count = |field: &str, value: &Value, max: u64| -> Result<u32, ApiError> {
        match value.as_u64() {
            Some(n) if n <= max => Ok(n as u32),
            _ => Err(ApiError::invalid(
                field,
                format!("is {value}, must be an integer from 0 to {max}"),
            )),
        }
    };
    let top = fields.top_logprobs.as_ref().filter(|v| !v.is_null());
    match form {
        LogprobsForm::Chat => {
            let asked = match &fields.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "logprobs",
                        format!("is {other}, must be true or false"),
                    ));
                }
            };
            let top = match top {
                None => 0,
                Some(value) => count("top_logprobs", value, 20)?,
            };
            if top > 0 && !asked {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "needs logprobs to be true",
                ));
            }
            Ok((asked, top))
        }
        LogprobsForm::Completion => {
            if top.is_some() {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "is a chat field; on completions, logprobs: <n> lists the n most likely tokens",
                ));
            }
            match fields.logprobs.as_ref().filter(|v| !v.is_null()) {
                None => Ok((false, 0)),
                Some(value) => Ok((true, count("logprobs", value, 5)?)),
            }
        }
    }
}

pub(super) fn required_model(model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.trim().is_empty() => Ok(m),
        Some(_) => Err(ApiError::invalid("model", "must not be empty")),
        None => Err(ApiError::invalid("model", "is required")),
    }
}

fn sampling(
    fields: &SamplingFields,
    cap: u32,
    form: LogprobsForm,
) -> Result<(v1::SamplingParams, StreamMode), ApiError> {
    let max_choices = super::choices::MAX_CHOICES;
    let choices = match fields.n {
        None => 1,
        Some(n) if (1..=i64::from(max_choices)).contains(&n) => n as u32,
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("is {n}; it must be 1 to {max_choices} (each choice is a generation)"),
            ));
        }
    };
    let max_tokens_field = if fields.max_completion_tokens.is_some() {
        Some("max_completion_tokens")
    } else {
        fields.max_tokens.map(|_| "max_tokens")
    };
    let echo = form == LogprobsForm::Completion && fields.unsupported.echo();
    // OpenAI's "score only": an echoed prompt and nothing after it. The worker generates one
    // token (its prompt's scores come with the first), which the door leaves out.
    let score_only = echo && fields.max_tokens == Some(0) && fields.max_completion_tokens.is_none();
    let max_tokens = match (
        fields.max_completion_tokens.or(fields.max_tokens),
        max_tokens_field,
    ) {
        _ if score_only => 1,
        (Some(m), Some(field)) if m < 1 => {
            return Err(ApiError::invalid(
                field,
                format!("is {m}, must be at least 1 (0 only with echo, to score the prompt alone)"),
            ));
        }
        // Beyond any cap: refused here, as the client wrote it (the router's own check would
        // name the value clamped to u32, "is 4294967295").
        (Some(m), Some(field)) if u32::try_from(m).is_err() => {
            return Err(ApiError::invalid(
                field,
                format!("is {m}, the limit is {cap}"),
            ));
        }
        (Some(m), _) => m as u32,
        // The router's default.
        (None, _) => 0,
    };
    let top_k = match fields.top_k {
        // vLLM's "no limit", which its clients send; 0 means the same to the workers.
        None | Some(-1) => None,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                format!("is {k}, must be at least 1, or -1 or 0 for no limit"),
            ));
        }
        Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
    };
    fields.unsupported.check(form)?;
    let (logprobs, top_logprobs) = logprobs_asked(fields, form)?;
    // OpenAI seeds are signed 64-bit; reinterpret the bits.
    let seed = fields.seed.map(|s| s as u64);
    let logit_bias = fields
        .logit_bias
        .iter()
        .flatten()
        .map(|(token, bias)| match token.parse::<u32>() {
            // One spelling per id: "042" or "+42" next to "42" would bias one token twice.
            Ok(id) if id.to_string() == *token => Ok((id, *bias as f32)),
            _ => Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "key {token:?} is not a token id (keys are token ids in decimal, as \
                     strings, e.g. \"42\")"
                ),
            )),
        })
        .collect::<Result<_, _>>()?;
    let stop = fields.stop.clone().map(Stop::into_vec).unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    let params = v1::SamplingParams {
        max_tokens,
        temperature: fields.temperature.map(|t| t as f32),
        top_p: fields.top_p.map(|p| p as f32),
        top_k,
        seed,
        stop,
        presence_penalty: fields.presence_penalty.map(|p| p as f32),
        frequency_penalty: fields.frequency_penalty.map(|p| p as f32),
        repetition_penalty: fields.repetition_penalty.map(|p| p as f32),
        logit_bias,
        logprobs,
        top_logprobs,
        // The echoed prompt's text and log probabilities come from scoring it.
        prompt_logprobs: echo,
        ignore_eos: fields.ignore_eos,
        // The router's check names `min_p` when it is outside [0, 1].
        min_p: fields.min_p.map_or(0.0, |p| p as f32),
        response_format: response_format(fields.response_format.as_ref())?,
    };
    let mode = StreamMode {
        stream: fields.stream,
        include_usage: fields.stream
            && fields
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        logprobs,
        max_tokens_field,
        choices,
        per_prompt: choices,
        score_only,
        affinity_field: affinity_hint(
            &fields.prompt_cache_key,
            &fields.safety_identifier,
            &fields.user,
        )
        .1,
    };
    if !fields.stream && fields.stream_options.is_some() {
        return Err(ApiError::invalid(
            "stream_options",
            "is only allowed when stream is true",
        ));
    }
    Ok((params, mode))
}

/// The text of a message's `content`: a string, or an array of `{"type":"text","text":..}` parts,
/// one line each (as vLLM and llama.cpp's servers join them: the parts are separate pieces of
/// text, and run together "Translate:" and "Bonjour" would read "Translate:Bonjour").
fn message_content(index: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let field = format!("messages[{index}].content");
    match content {
        None | Some(Value::Null) => Err(ApiError::invalid(field, "is required")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (p, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(
                            format!("{field}[{p}].type"),
                            format!("content part type {other:?} is not supported (only \"text\")"),
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}[{p}]"),
                            "must be {\"type\": \"text\", \"text\": \"...\"}",
                        ));
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(ApiError::invalid(
            field,
            "must be a string or an array of text parts",
        )),
    }
}

fn chat_messages(messages: Option<Vec<Value>>) -> Result<Vec<v1::ChatMessage>, ApiError> {
    let messages = messages.ok_or_else(|| ApiError::invalid("messages", "is required"))?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            if !m.is_object() {
                return Err(ApiError::invalid(
                    format!("messages[{i}]"),
                    "must be an object",
                ));
            }
            let role = match m.get("role").and_then(Value::as_str) {
                // `developer` (OpenAI's newer name for system instructions) becomes `system`
                // where every door's requests are validated.
                Some(r @ ("system" | "developer" | "user" | "assistant" | "tool")) => r.to_string(),
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "role {other:?} is not supported (system, developer, user, \
                             assistant, tool)"
                        ),
                    ));
                }
                None => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        "is required",
                    ));
                }
            };
            let tool_calls = if role == "assistant" {
                tools::message_tool_calls(i, m.get("tool_calls"))?
            } else {
                Vec::new()
            };
            // An assistant turn that only called tools has no content (OpenAI sends null).
            let content = match m.get("content") {
                None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
                content => message_content(i, content)?,
            };
            let tool_call_id = if role == "tool" {
                tools::tool_call_id(i, m)?
            } else {
                String::new()
            };
            Ok(v1::ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id,
            })
        })
        .collect()
}

impl ChatCompletionRequest {
    /// Translates to a `GenerateRequest` (request id and class are filled in by the caller).
    pub fn into_proto(self, cap: u32) -> Result<(v1::GenerateRequest, StreamMode), ApiError> {
        let model = required_model(self.model)?;
        let messages = chat_messages(self.messages)?;
        let (sampling, mode) = sampling(&self.sampling, cap, LogprobsForm::Chat)?;
        let tools = tools::tools(self.tools.as_ref())?;
        let tool_choice =
            tools::tool_choice(self.tool_choice.as_ref(), self.parallel_tool_calls.as_ref())?;
        Ok((
            v1::GenerateRequest {
                model,
                messages,
                sampling: Some(sampling),
                tools,
                tool_choice,
                affinity_key: self.sampling.affinity_key(),
                class: service_tier_class(self.sampling.service_tier.as_deref())? as i32,
                ..Default::default()
            },
            mode,
        ))
    }
}

impl CompletionRequest {
    /// One request for each prompt of the batch (one prompt is a batch of one), and the
    /// answer's form: `n` choices for each prompt, in the prompts' order.
    pub fn into_proto(self, cap: u32) -> Result<(Vec<v1::GenerateRequest>, StreamMode), ApiError> {
        let model = required_model(self.model)?;
        let prompts = prompts("prompt", self.prompt)?;
        let (sampling, mut mode) = sampling(&self.sampling, cap, LogprobsForm::Completion)?;
        let generations = prompts.len() as u64 * u64::from(mode.per_prompt);
        let most = super::choices::MAX_GENERATIONS;
        if generations > u64::from(most) {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "{} prompts × n {} = {generations} generations; at most {most} a request \
                     (send the rest in further requests)",
                    prompts.len(),
                    mode.per_prompt
                ),
            ));
        }
        mode.choices = generations as u32;
        let affinity_key = self.sampling.affinity_key();
        let class = service_tier_class(self.sampling.service_tier.as_deref())? as i32;
        let requests = prompts
            .into_iter()
            .map(|prompt| {
                let mut request = v1::GenerateRequest {
                    model: model.clone(),
                    sampling: Some(sampling.clone()),
                    affinity_key: affinity_key.clone(),
                    class,
                    ..Default::default()
                };
                prompt.put_in(&mut request);
                request
            })
            .collect();
        Ok((requests, mode))
    }
}

/// One prompt of a completions request (or input of an embeddings one): text, or ids of the
/// model's tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

impl Prompt {
    /// Puts the prompt in `request`, which holds none.
    pub(super) fn put_in(self, request: &mut v1::GenerateRequest) {
        match self {
            Prompt::Text(text) => request.prompt = text,
            Prompt::TokenIds(ids) => request.prompt_token_ids = ids,
        }
    }
}

/// A completions request's `prompt` (an embeddings request's `input`, named by `name`), in any
/// of OpenAI's forms: a string, a list of token ids, or a batch of either.
pub(super) fn prompts(name: &str, prompt: Option<Value>) -> Result<Vec<Prompt>, ApiError> {
    let items = match prompt {
        None | Some(Value::Null) => return Err(ApiError::invalid(name, "is required")),
        Some(Value::String(text)) => return text_prompt(name, text).map(|p| vec![p]),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid(
                name,
                "must be a string, a list of token ids, or a list of either",
            ));
        }
    };
    if items.is_empty() {
        return Err(ApiError::invalid(name, "must not be an empty list"));
    }
    if items.iter().all(Value::is_number) {
        return token_ids(name, &items).map(|p| vec![p]);
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("{name}[{i}]");
            match item {
                Value::String(text) => text_prompt(&field, text),
                Value::Array(ids) if !ids.is_empty() => token_ids(&field, &ids),
                Value::Array(_) => Err(ApiError::invalid(field, "must not be empty")),
                _ => Err(ApiError::invalid(
                    field,
                    "must be a string or a list of token ids",
                )),
            }
        })
        .collect()
}

fn text_prompt(field: &str, text: String) -> Result<Prompt, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    Ok(Prompt::Text(text))
}

/// A prompt of token ids: each a whole number a `u32` holds (the vocabulary is checked where
/// the model's tokenizer is known).
fn token_ids(field: &str, ids: &[Value]) -> Result<Prompt, ApiError> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid(format!("{field}[{i}]"), format!("{id} is not a token id"))
                })
        })
        .collect::<Result<_, _>>()
        .map(Prompt::TokenIds)
}

/// OpenAI's `finish_reason` for a Switchyard one. A cancelled generation reports "stop"
/// (OpenAI has no "cancelled"), and only a client that is gone can cancel over HTTP.
pub fn finish_reason(reason: i32) -> &'static str {
    match v1::FinishReason::try_from(reason).unwrap_or(v1::FinishReason::Unspecified) {
        v1::FinishReason::Length => "length",
        v1::FinishReason::ToolCalls => "tool_calls",
        _ => "stop",
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's breakdown of the prompt tokens.
#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV the worker reused from its prefix cache.
    pub cached_tokens: u32,
}

impl From<Option<v1::Usage>> for Usage {
    fn from(usage: Option<v1::Usage>) -> Self {
        let u = usage.unwrap_or_default();
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_prompt_tokens,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<(v1::GenerateRequest, StreamMode), ApiError> {
        parse_body::<ChatCompletionRequest>(body.as_bytes())?.into_proto(4096)
    }

    /// A one-message chat request with `extra` fields (`"name": value, …`).
    fn chat_with(extra: &str) -> Result<(v1::GenerateRequest, StreamMode), ApiError> {
        chat(&format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{extra}}}"#
        ))
    }

    #[test]
    fn chat_request_translates_with_defaults() {
        let (request, mode) = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hi"},{"type":"text","text":"there"}]}],
                "stream":true,"stream_options":{"include_usage":true},"seed":-1,"stop":"END",
                "logprobs":false,"user":"u1"}"#,
        )
        .expect("valid");
        assert_eq!(request.model, "m");
        assert_eq!(request.messages[0].role, "developer");
        // Parts are joined one per line, as vLLM and llama.cpp join them (they ran together).
        assert_eq!(request.messages[1].content, "hi\nthere");
        let sampling = request.sampling.expect("sampling");
        assert_eq!(sampling.max_tokens, 0, "the router's default applies");
        assert_eq!(sampling.seed, Some(u64::MAX));
        assert_eq!(sampling.stop, vec!["END".to_string()]);
        assert_eq!(request.affinity_key, "u1");
        assert_eq!(mode.affinity_field, "user");
        assert!(mode.stream && mode.include_usage);
        assert_eq!(mode.max_tokens_field, None, "the default applies");
        for (extra, field) in [
            (r#""max_tokens":5"#, "max_tokens"),
            (r#""max_completion_tokens":5"#, "max_completion_tokens"),
            (
                r#""max_tokens":9,"max_completion_tokens":5"#,
                "max_completion_tokens",
            ),
        ] {
            let (request, mode) = chat_with(extra).expect("valid");
            assert_eq!(mode.max_tokens_field, Some(field), "{extra}");
            assert_eq!(request.sampling.expect("sampling").max_tokens, 5, "{extra}");
        }
    }

    /// Found from outside: `"stream": null` (OpenAI documents `stream` and
    /// `stream_options.include_usage` as nullable, and clients that write every field send
    /// it) was a 400 "invalid type: null, expected a boolean".
    #[test]
    fn null_stream_and_include_usage_mean_false() {
        let (_, mode) = chat_with(r#""stream":null"#).expect("valid");
        assert!(!mode.stream);
        let (_, mode) =
            chat_with(r#""stream":true,"stream_options":{"include_usage":null}"#).expect("valid");
        assert!(mode.stream && !mode.include_usage);
        let (_, mode) = chat_with(r#""stream":null,"stream_options":null"#).expect("valid");
        assert!(!mode.stream);
        assert_eq!(
            chat_with(r#""stream":"yes""#)
                .expect_err("invalid")
                .param
                .as_deref(),
            Some("stream")
        );
    }

    #[test]
    fn a_utf8_byte_order_mark_is_ignored() {
        let body = "\u{feff}{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
        let (request, _) = chat(body).expect("valid");
        assert_eq!(request.model, "m");
        // Only at the start, and only once.
        let twice = format!("\u{feff}{body}");
        assert!(chat(&twice).is_err());
    }

    #[test]
    fn chat_request_errors_name_the_field() {
        let param = |body: &str| chat(body).expect_err("invalid").param;
        assert_eq!(param(r#"{"messages":[]}"#).as_deref(), Some("model"));
        assert_eq!(param(r#"{"model":"m"}"#).as_deref(), Some("messages"));
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#).as_deref(),
            Some("messages[0].role")
        );
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#).as_deref(),
            Some("messages[0].tool_call_id")
        );
        // Content may be left out only by an assistant turn that called tools.
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"assistant","content":null}]}"#).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"assistant","tool_calls":[{"id":"c","function":{}}]}]}"#)
                .as_deref(),
            Some("messages[0].tool_calls[0].function.name")
        );
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"user"}]}"#).as_deref(),
            Some("messages[0].content")
        );
        assert_eq!(
            param(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#)
                .as_deref(),
            Some("max_tokens")
        );
        for n in ["0", "17", "-1", "2.5", "\"2\""] {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"n":{n}}}"#);
            assert_eq!(param(&body).as_deref(), Some("n"), "n = {n}");
        }
        for (n, choices) in [("null", 1), ("1", 1), ("2", 2), ("16", 16)] {
            let body =
                format!(r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"n":{n}}}"#);
            assert_eq!(chat(&body).expect("valid").1.choices, choices, "n = {n}");
        }
        assert_eq!(
            param(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#
            )
            .as_deref(),
            Some("stream_options")
        );
    }

    /// Found from outside: `"stop": 5` was a 400 "stop: data did not match any variant of
    /// untagged enum Stop", and `"max_tokens": 10000000000` one saying "is 4294967295".
    #[test]
    fn refusals_say_what_the_client_sent() {
        let message = |extra: &str| chat_with(extra).expect_err("invalid").message;
        for extra in [r#""stop":5"#, r#""stop":["a",1]"#, r#""stop":{"a":1}"#] {
            let message = message(extra);
            assert!(
                message.starts_with("stop: is ")
                    && message.ends_with("must be a string or an array of strings"),
                "{extra}: {message}"
            );
        }
        assert_eq!(
            message(r#""top_k":-2"#),
            "top_k: is -2, must be at least 1, or -1 or 0 for no limit"
        );
        assert_eq!(
            message(r#""max_tokens":10000000000"#),
            "max_tokens: is 10000000000, the limit is 4096"
        );
        assert_eq!(
            message(r#""max_completion_tokens":10000000000"#),
            "max_completion_tokens: is 10000000000, the limit is 4096"
        );
        let (request, _) = chat_with(r#""stop":["a","b"]"#).expect("valid");
        assert_eq!(request.sampling.expect("sampling").stop, ["a", "b"]);
    }

    /// Found from outside: `"top_k": -1`, vLLM's "no limit" (this extension is vLLM's), was a
    /// 400 "top_k: is -1, must not be negative".
    #[test]
    fn top_k_takes_vllms_values() {
        let top_k = |extra: &str| {
            let (request, _) = chat_with(extra).expect("valid");
            request.sampling.expect("sampling").top_k
        };
        assert_eq!(top_k(r#""top_k":-1"#), None);
        assert_eq!(top_k(r#""top_k":0"#), Some(0));
        assert_eq!(top_k(r#""top_k":40"#), Some(40));
    }

    #[test]
    fn min_p_reaches_the_request_and_null_is_off() {
        let min_p = |extra: &str| {
            let (request, _) = chat_with(extra).expect("valid");
            request.sampling.expect("sampling").min_p
        };
        assert_eq!(min_p(r#""min_p":0.05"#), 0.05);
        assert_eq!(min_p(r#""min_p":1"#), 1.0);
        assert_eq!(min_p(r#""min_p":null"#), 0.0);
        assert_eq!(min_p(r#""max_tokens":3"#), 0.0);
        // Not a number: refused by name, as any mistyped field is.
        let error = chat_with(r#""min_p":"0.1""#).expect_err("invalid");
        assert_eq!(error.param.as_deref(), Some("min_p"));
    }

    #[test]
    fn ignore_eos_reaches_the_request() {
        let ignore_eos = |extra: &str| {
            let (request, _) = chat_with(extra).expect("valid");
            request.sampling.expect("sampling").ignore_eos
        };
        assert!(ignore_eos(r#""ignore_eos":true"#));
        assert!(!ignore_eos(r#""ignore_eos":false"#));
        assert!(!ignore_eos(r#""ignore_eos":null"#));
        assert!(!ignore_eos(r#""max_tokens":3"#));
    }

    #[test]
    fn penalties_and_logit_bias_reach_the_request() {
        let (request, _) = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "presence_penalty":0.5,"frequency_penalty":-1,"repetition_penalty":1.2,
                "logit_bias":{"42":-100,"7":3.5}}"#,
        )
        .expect("valid");
        let sampling = request.sampling.expect("sampling");
        assert_eq!(sampling.presence_penalty, Some(0.5));
        assert_eq!(sampling.frequency_penalty, Some(-1.0));
        assert_eq!(sampling.repetition_penalty, Some(1.2));
        assert_eq!(sampling.logit_bias, [(42, -100.0), (7, 3.5)].into());

        let param = |extra: &str| chat_with(extra).expect_err("invalid").param;
        assert_eq!(
            param(r#""presence_penalty":"high""#).as_deref(),
            Some("presence_penalty")
        );
        assert_eq!(
            param(r#""logit_bias":{"the":1}"#).as_deref(),
            Some("logit_bias")
        );
        assert_eq!(
            param(r#""logit_bias":{"5":"x"}"#).as_deref(),
            Some("logit_bias.5")
        );
        for other_spelling in [r#""logit_bias":{"042":1}"#, r#""logit_bias":{"+42":1}"#] {
            assert_eq!(
                param(other_spelling).as_deref(),
                Some("logit_bias"),
                "{other_spelling}"
            );
        }
    }

    #[test]
    fn fields_asking_for_what_is_not_done_are_refused_by_name() {
        let outcome = |extra: &str| {
            chat_with(extra)
                .map(|_| ())
                .map_err(|e| (e.status, e.param))
        };
        for (extra, field) in [
            (r#""functions":[{"name":"f"}]"#, "functions"),
            (r#""function_call":{"name":"f"}"#, "function_call"),
            (r#""echo":true"#, "echo"),
            (r#""best_of":3"#, "best_of"),
            (r#""suffix":"}""#, "suffix"),
            (r#""modalities":["text","audio"]"#, "modalities"),
            (r#""audio":{"voice":"alloy","format":"wav"}"#, "audio"),
            (r#""min_tokens":10"#, "min_tokens"),
            (r#""reasoning_effort":"high""#, "reasoning_effort"),
        ] {
            assert_eq!(
                outcome(extra),
                Err((axum::http::StatusCode::BAD_REQUEST, Some(field.to_string()))),
                "{extra}"
            );
        }
        // What SDKs and frameworks send when a feature is off is accepted.
        for extra in [
            r#""logprobs":false"#,
            r#""logprobs":null"#,
            r#""top_logprobs":0"#,
            r#""tools":[]"#,
            r#""tool_choice":"none""#,
            r#""tool_choice":"auto""#,
            r#""tool_choice":null"#,
            r#""function_call":"none""#,
            r#""response_format":{"type":"text"}"#,
            r#""echo":false"#,
            r#""echo":0"#,
            r#""best_of":0"#,
            r#""best_of":1"#,
            r#""suffix":"""#,
            r#""modalities":["text"]"#,
            r#""audio":null"#,
            r#""min_tokens":0"#,
            r#""reasoning_effort":"none""#,
            r#""reasoning_effort":null"#,
        ] {
            assert_eq!(outcome(extra), Ok(()), "{extra}");
        }
    }

    #[test]
    fn chat_takes_tools_and_text_completions_refuse_them() {
        let (request, _) = chat(
            r#"{"model":"m","tools":[{"type":"function","function":{"name":"f"}}],
                "tool_choice":"required","parallel_tool_calls":false,
                "messages":[{"role":"user","content":"x"},
                  {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function",
                    "function":{"name":"f","arguments":"{}"}}]},
                  {"role":"tool","tool_call_id":"c1","content":"42"}]}"#,
        )
        .expect("valid");
        assert_eq!(request.tools[0].name, "f");
        let choice = request.tool_choice.expect("a choice");
        assert_eq!(choice.mode(), v1::ToolChoiceMode::Required);
        assert!(choice.single_call);
        assert_eq!(request.messages[1].tool_calls[0].arguments, "{}");
        assert_eq!(request.messages[1].content, "");
        assert_eq!(request.messages[2].tool_call_id, "c1");
        for extra in [
            r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
            r#""tool_choice":"required""#,
        ] {
            let error = parse_body::<CompletionRequest>(
                format!(r#"{{"model":"m","prompt":"x",{extra}}}"#).as_bytes(),
            )
            .and_then(|r| r.into_proto(64))
            .expect_err("refused");
            assert!(
                error.param.as_deref().is_some_and(|p| extra.contains(p)),
                "{extra}: {error:?}"
            );
        }
    }

    #[test]
    fn response_format_takes_json_mode_and_schemas() {
        use v1::response_format::Kind;
        let format = |extra: &str| {
            chat_with(extra).map(|(r, _)| r.sampling.unwrap_or_default().response_format)
        };
        assert_eq!(
            format(r#""response_format":{"type":"text"}"#).unwrap(),
            None
        );
        assert_eq!(format(r#""response_format":null"#).unwrap(), None);
        let object = format(r#""response_format":{"type":"json_object"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(object.kind(), Kind::JsonObject);
        let schema = format(
            r#""response_format":{"type":"json_schema","json_schema":{"name":"city",
                "schema":{"type":"object","properties":{"name":{"type":"string"}}},"strict":true}}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(schema.kind(), Kind::JsonSchema);
        assert_eq!(schema.name, "city");
        assert!(schema.schema_json.contains("properties"), "{schema:?}");
        for (extra, field) in [
            (
                r#""response_format":{"type":"xml"}"#,
                "response_format.type",
            ),
            (
                r#""response_format":{"type":"json_schema"}"#,
                "response_format.json_schema",
            ),
            (
                r#""response_format":{"type":"json_schema","json_schema":{"schema":[]}}"#,
                "response_format.json_schema.schema",
            ),
        ] {
            let error = format(extra).expect_err("invalid");
            assert_eq!(error.param.as_deref(), Some(field), "{extra}");
        }
    }

    #[test]
    fn logprobs_take_each_endpoints_form() {
        let (request, mode) = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],
                "logprobs":true,"top_logprobs":3}"#,
        )
        .expect("valid");
        let sampling = request.sampling.expect("sampling");
        assert!(sampling.logprobs && mode.logprobs);
        assert_eq!(sampling.top_logprobs, 3);
        let completion = |extra: &str| {
            parse_body::<CompletionRequest>(
                format!(r#"{{"model":"m","prompt":"x",{extra}}}"#).as_bytes(),
            )?
            .into_proto(64)
            .map(|(mut requests, mode)| (requests.remove(0), mode))
        };
        let (request, mode) = completion(r#""logprobs":2"#).expect("valid");
        let sampling = request.sampling.expect("sampling");
        assert!(sampling.logprobs && mode.logprobs);
        assert_eq!(sampling.top_logprobs, 2);
        let (request, mode) = completion(r#""logprobs":null"#).expect("valid");
        assert!(!request.sampling.expect("sampling").logprobs && !mode.logprobs);

        let param = |result: Result<(v1::GenerateRequest, StreamMode), ApiError>| {
            result.expect_err("invalid").param
        };
        assert_eq!(
            param(chat_with(r#""top_logprobs":2"#)).as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            param(chat_with(r#""logprobs":true,"top_logprobs":21"#)).as_deref(),
            Some("top_logprobs")
        );
        assert_eq!(
            param(chat_with(r#""logprobs":3"#)).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param(completion(r#""logprobs":6"#)).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param(completion(r#""logprobs":true"#)).as_deref(),
            Some("logprobs")
        );
        assert_eq!(
            param(completion(r#""logprobs":1,"top_logprobs":1"#)).as_deref(),
            Some("top_logprobs")
        );
    }

    #[test]
    fn usage_reports_cached_prompt_tokens_as_openai_does() {
        let usage = Usage::from(Some(v1::Usage {
            prompt_tokens: 70,
            completion_tokens: 5,
            cached_prompt_tokens: 64,
        }));
        assert_eq!(
            serde_json::to_value(usage).unwrap(),
            serde_json::json!({"prompt_tokens": 70, "completion_tokens": 5, "total_tokens": 75,
                "prompt_tokens_details": {"cached_tokens": 64}})
        );
    }

    /// A one-prompt completions request with `extra` fields, read.
    fn completion(extra: &str) -> Result<(v1::GenerateRequest, StreamMode), ApiError> {
        parse_body::<CompletionRequest>(
            format!(r#"{{"model":"m","prompt":"x",{extra}}}"#).as_bytes(),
        )?
        .into_proto(64)
        .map(|(mut requests, mode)| (requests.remove(0), mode))
    }

    #[test]
    fn a_text_completion_echoes_its_prompt_by_scoring_it() {
        let (request, mode) = completion(r#""echo":true,"logprobs":1"#).expect("valid");
        let sampling = request.sampling.expect("sampling");
        assert!(sampling.prompt_logprobs && sampling.logprobs && mode.logprobs);
        assert_eq!(sampling.top_logprobs, 1);
        let (request, _) = completion(r#""echo":false"#).expect("valid");
        assert!(!request.sampling.expect("sampling").prompt_logprobs);
        let refused = completion(r#""echo":"yes""#).expect_err("not a bool");
        assert_eq!(refused.param.as_deref(), Some("echo"));
        let chat = chat_with(r#""echo":true"#).expect_err("chat has no echo");
        assert_eq!(chat.param.as_deref(), Some("echo"));
    }

    /// OpenAI's prompt-cache key is the affinity key when given, then `safety_identifier`,
    /// then `user`; the mode says which, so an error about the key names the client's field.
    #[test]
    fn service_tier_chooses_the_lane_and_a_bad_one_is_named() {
        for (tier, class) in [
            (r#""priority""#, v1::RequestClass::LatencyCritical),
            (r#""flex""#, v1::RequestClass::CostSensitive),
            (r#""auto""#, v1::RequestClass::Auto),
            ("null", v1::RequestClass::Auto),
        ] {
            let (request, _) = chat_with(&format!(r#""service_tier":{tier}"#)).expect("valid");
            assert_eq!(request.class, class as i32, "{tier}");
        }
        let bad = chat_with(r#""service_tier":"scale""#).unwrap_err();
        assert_eq!(bad.param.as_deref(), Some("service_tier"));
    }

    #[test]
    fn the_prompt_cache_key_is_the_affinity_key() {
        let key = |extra: &str| {
            let (request, mode) = completion(extra).expect("valid");
            (request.affinity_key, mode.affinity_field)
        };
        assert_eq!(
            key(r#""user":"u","safety_identifier":"s","prompt_cache_key":"k""#),
            ("k".to_string(), "prompt_cache_key")
        );
        assert_eq!(
            key(r#""user":"u","safety_identifier":"s""#),
            ("s".to_string(), "safety_identifier")
        );
        assert_eq!(key(r#""user":"u""#), ("u".to_string(), "user"));
        assert_eq!(key(r#""n":1"#), (String::new(), ""));
        let (chat, _) = chat_with(r#""prompt_cache_key":"conversation-7""#).expect("valid");
        assert_eq!(chat.affinity_key, "conversation-7");
    }

    /// `echo` with `max_tokens: 0` scores the prompt alone (the worker is asked for one token,
    /// which the door leaves out); `max_tokens: 0` without `echo` still asks for nothing.
    #[test]
    fn an_echo_of_no_tokens_scores_the_prompt_alone() {
        let (request, mode) =
            completion(r#""echo":true,"max_tokens":0,"logprobs":0"#).expect("valid");
        let sampling = request.sampling.expect("sampling");
        assert!(mode.score_only && sampling.prompt_logprobs);
        assert_eq!(sampling.max_tokens, 1);
        let (_, mode) = completion(r#""echo":true,"max_tokens":1"#).expect("valid");
        assert!(!mode.score_only);
        let refused = completion(r#""max_tokens":0"#).expect_err("nothing to answer");
        assert_eq!(refused.param.as_deref(), Some("max_tokens"));
        assert!(refused.message.contains("echo"), "{}", refused.message);
    }

    #[test]
    fn completion_prompt_forms() {
        let parse = |body: &str| parse_body::<CompletionRequest>(body.as_bytes())?.into_proto(8);
        let prompts = |body: &str| {
            let (requests, mode) = parse(body).expect("valid");
            let prompts: Vec<(String, Vec<u32>)> = requests
                .into_iter()
                .map(|r| (r.prompt, r.prompt_token_ids))
                .collect();
            (prompts, mode.choices, mode.per_prompt)
        };
        let text = |t: &str| (t.to_string(), Vec::new());
        let ids = |ids: &[u32]| (String::new(), ids.to_vec());
        assert_eq!(
            prompts(r#"{"model":"m","prompt":"once"}"#),
            (vec![text("once")], 1, 1)
        );
        assert_eq!(
            prompts(r#"{"model":"m","prompt":["once"]}"#),
            (vec![text("once")], 1, 1)
        );
        assert_eq!(
            prompts(r#"{"model":"m","prompt":["a","b","c"],"n":2}"#),
            (vec![text("a"), text("b"), text("c")], 6, 2),
            "n choices for each prompt of the batch"
        );
        assert_eq!(
            prompts(r#"{"model":"m","prompt":[1,2,3]}"#),
            (vec![ids(&[1, 2, 3])], 1, 1)
        );
        assert_eq!(
            prompts(r#"{"model":"m","prompt":[[1,2],"x",[3]]}"#),
            (vec![ids(&[1, 2]), text("x"), ids(&[3])], 3, 1)
        );
        let refused = |body: &str| parse(body).expect_err("refused").param;
        for (body, param) in [
            (r#"{"model":"m","prompt":[]}"#, "prompt"),
            (r#"{"model":"m","prompt":""}"#, "prompt"),
            (r#"{"model":"m","prompt":["a",""]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":["a",{}]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":[[1],[]]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":[1,-2]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":[1,2.5]}"#, "prompt[1]"),
            (r#"{"model":"m","prompt":[[1,4294967296]]}"#, "prompt[0][1]"),
            (r#"{"model":"m","prompt":[1,"a"]}"#, "prompt[0]"),
            (r#"{"model":"m","prompt":7}"#, "prompt"),
        ] {
            assert_eq!(refused(body).as_deref(), Some(param), "{body}");
        }
        let batch = |prompts: usize, n: u32| {
            let list = vec!["\"p\""; prompts].join(",");
            parse(&format!(r#"{{"model":"m","prompt":[{list}],"n":{n}}}"#))
        };
        assert!(batch(64, 1).is_ok() && batch(4, 16).is_ok());
        let error = batch(5, 13).expect_err("65 generations");
        assert_eq!(error.param.as_deref(), Some("prompt"));
        assert!(error.message.contains("at most 64"), "{error:?}");
    }
}
