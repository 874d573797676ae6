//! A Responses API request (`POST /v1/responses`) read into the `GenerateRequest` every door
//! produces, with what its response echoes back and a map from the dispatcher's field names
//! to the request's own, so an error names the field the client wrote.
//!
//! A conversation comes whole in `input` (its messages, the model's earlier `function_call`
//! items and the client's `function_call_output` items), or goes on from a stored response
//! (`previous_response_id`, see [`crate::response_store`]): that response's conversation,
//! then `input`; or from a stored conversation (`conversation`): its items, then `input`.
//! Item references are replaced by their items before the request is read (see
//! `references`).

use std::sync::Arc;

use crate::response_store::{StoredMessage, item_ids};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use switchyard_proto::v1;

use super::super::error::ApiError;
use super::super::fields::message_field;
use super::super::tools;
use super::super::wire;

/// The Responses API's request fields Switchyard reads. Unknown fields are ignored, as on
/// the other routes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ResponsesRequest {
    pub model: Option<String>,
    pub input: Option<Value>,
    pub instructions: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<Value>,
    pub metadata: Option<Map<String, Value>>,
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub service_tier: Option<String>,
    pub truncation: Option<String>,
    pub include: Option<Vec<String>>,
    pub top_logprobs: Option<i64>,
    pub reasoning: Option<Value>,
    /// The stored response this one goes on from.
    pub previous_response_id: Option<Value>,
    /// Whether to store the response (OpenAI's default: yes).
    pub store: Option<bool>,
    /// The stored conversation this one goes on from (and adds to): its id, or `{"id"}`.
    pub conversation: Option<Value>,
    /// Asks for state Switchyard does not keep, or work it does not do: refused by name.
    pub background: Option<bool>,
    pub prompt: Option<Value>,
    pub max_tool_calls: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TextConfig {
    pub format: Option<Value>,
    /// A hint about length (`low` / `medium` / `high`); accepted, as the model follows its
    /// prompt whatever it says.
    pub verbosity: Option<String>,
}

/// What a response repeats of its request (OpenAI's response object carries the settings it
/// ran with).
#[derive(Debug, Clone, Default)]
pub struct Echo {
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub metadata: Value,
    pub parallel_tool_calls: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub text: Value,
    pub tool_choice: Value,
    pub tools: Value,
    pub user: Option<String>,
    pub prompt_cache_key: Option<String>,
    pub safety_identifier: Option<String>,
    pub store: bool,
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
    /// Answered at once and run without the client (polled, cancelled by id).
    pub background: bool,
    /// What happens to an input longer than the context.
    pub truncation: v1::Truncation,
    /// Alternatives given with each output token's log probability.
    pub top_logprobs: u32,
}

/// How the handler runs the request.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    pub stream: bool,
    /// `max_output_tokens` was given (else the door's default applies).
    pub bounded: bool,
}

/// The request read: what the dispatcher runs, what the response echoes, how to name fields.
#[derive(Debug)]
pub struct Read {
    pub request: v1::GenerateRequest,
    pub echo: Echo,
    pub mode: Mode,
    pub fields: FieldNames,
    /// What a stored response keeps of this request: the conversation so far (the previous
    /// response's, then this input; no instructions) and the input items.
    pub turn: Turn,
}

/// The conversation up to this request's answer, and the input items it added.
#[derive(Debug, Default)]
pub struct Turn {
    /// The previous response's conversation.
    pub history: Vec<Arc<StoredMessage>>,
    /// This request's input, as messages.
    pub input: Vec<v1::ChatMessage>,
    pub input_items: Vec<Box<RawValue>>,
}

/// The largest `metadata` OpenAI accepts: 16 pairs, keys of 64 and values of 512 characters.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

impl ResponsesRequest {
    /// The id of the stored response this request goes on from, if any.
    pub fn previous_response_id(&self) -> Result<Option<String>, ApiError> {
        match &self.previous_response_id {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(id)) if !id.is_empty() => Ok(Some(id.clone())),
            Some(_) => Err(ApiError::invalid(
                "previous_response_id",
                "must be the id of a stored response (a non-empty string)",
            )),
        }
    }

    /// The id of the stored conversation this request goes on from, if any.
    pub fn conversation_id(&self) -> Result<Option<String>, ApiError> {
        let id = match &self.conversation {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(id)) => Some(id.as_str()),
            Some(Value::Object(fields)) => fields.get("id").and_then(Value::as_str),
            Some(_) => None,
        };
        match id {
            Some(id) if !id.is_empty() => {
                if self.previous_response_id()?.is_some() {
                    return Err(ApiError::invalid(
                        "conversation",
                        "cannot go with previous_response_id: a request goes on from a stored \
                         conversation or from a stored response, not both",
                    ));
                }
                Ok(Some(id.to_string()))
            }
            _ => Err(ApiError::invalid(
                "conversation",
                "must be the id of a stored conversation (a non-empty string, or an object \
                 with it as \"id\")",
            )),
        }
    }

    /// Reads the request; `cap` is the router's `max_tokens` cap, `history` the conversation
    /// it goes on from (named by `history_field`: `previous_response_id` or `conversation`),
    /// `holder` the conversation or stored response its input items are kept by (their ids
    /// name it).
    pub fn read(
        self,
        cap: u32,
        history: &[Arc<StoredMessage>],
        history_field: &'static str,
        holder: Option<&str>,
    ) -> Result<Read, ApiError> {
        self.refuse_what_is_not_done()?;
        let model = wire::required_model(self.model.clone())?;
        let mut fields = FieldNames::default();
        let mut messages = Vec::new();
        if let Some(instructions) = &self.instructions {
            fields.messages.push(Origin::whole("instructions"));
            messages.push(v1::ChatMessage {
                role: "system".into(),
                content: instructions.clone(),
                ..Default::default()
            });
        }
        for message in history {
            fields.messages.push(Origin::whole(history_field));
            messages.push((**message).clone());
        }
        let input_start = messages.len();
        read_input(self.input.as_ref(), &mut messages, &mut fields)?;
        let turn = Turn {
            history: history.to_vec(),
            input: messages[input_start..].to_vec(),
            input_items: input_items(self.input.as_ref(), holder),
        };

        let max_tokens = match self.max_output_tokens {
            // The router's default.
            None => 0,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    "max_output_tokens",
                    format!("is {m}, must be at least 1"),
                ));
            }
            Some(m) => u32::try_from(m).map_err(|_| {
                ApiError::invalid("max_output_tokens", format!("is {m}, the limit is {cap}"))
            })?,
        };
        let text_format = self.text.as_ref().and_then(|t| t.format.clone());
        let response_format =
            wire::response_format(chat_response_format(text_format.as_ref())?.as_ref())
                .map_err(|e| e.renaming_param(|f| fields.rename(f)))?;
        let chat_tools: Vec<Value> = self.tools.iter().flatten().map(chat_tool).collect();
        let proto_tools = tools::tools(Some(&Value::from(chat_tools)))
            .map_err(|e| e.renaming_param(|f| fields.rename(f)))?;
        let parallel = self.parallel_tool_calls.map(Value::from);
        let tool_choice = tools::tool_choice(
            chat_tool_choice(self.tool_choice.as_ref())?.as_ref(),
            parallel.as_ref(),
        )
        .map_err(|e| e.renaming_param(|f| fields.rename(f)))?;
        let metadata = metadata(self.metadata.clone())?;
        let previous_response_id = self.previous_response_id()?;
        let conversation = self.conversation_id()?;
        // Log probabilities of the output text: asked for by `include`, or by asking for
        // alternatives (checked to be 0 to 20 above).
        let top_logprobs = self.top_logprobs.unwrap_or(0) as u32;
        let logprobs = top_logprobs > 0
            || self
                .include
                .iter()
                .flatten()
                .any(|item| item == LOGPROBS_INCLUDE);
        let truncation = match self.truncation.as_deref() {
            None | Some("disabled") => v1::Truncation::Disabled,
            Some("auto") => v1::Truncation::Auto,
            Some(other) => {
                return Err(ApiError::invalid(
                    "truncation",
                    format!(
                        "is {other:?}, must be \"disabled\" (an input longer than the context is \
                         refused) or \"auto\" (its oldest items are dropped until it fits)"
                    ),
                ));
            }
        };

        // The most specific affinity hint the client gave: OpenAI's prompt-cache key is what
        // it is for.
        let (affinity_key, affinity_field) =
            wire::affinity_hint(&self.prompt_cache_key, &self.safety_identifier, &self.user);
        fields.affinity = affinity_field;

        let request = v1::GenerateRequest {
            model,
            messages,
            class: crate::openai::wire::service_tier_class(self.service_tier.as_deref())? as i32,
            sampling: Some(v1::SamplingParams {
                max_tokens,
                temperature: self.temperature.map(|t| t as f32),
                top_p: self.top_p.map(|p| p as f32),
                response_format,
                logprobs,
                top_logprobs,
                ..Default::default()
            }),
            tools: proto_tools,
            tool_choice,
            affinity_key,
            truncation: truncation as i32,
            ..Default::default()
        };
        let echo = Echo {
            instructions: self.instructions,
            max_output_tokens: self.max_output_tokens,
            metadata,
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
            temperature: self.temperature,
            top_p: self.top_p,
            text: json!({
                "format": text_format.unwrap_or_else(|| json!({"type": "text"})),
                "verbosity": self.text.and_then(|t| t.verbosity).unwrap_or_else(|| "medium".into()),
            }),
            tool_choice: self.tool_choice.unwrap_or_else(|| Value::from("auto")),
            tools: Value::from(self.tools.unwrap_or_default()),
            user: self.user,
            prompt_cache_key: self.prompt_cache_key,
            safety_identifier: self.safety_identifier,
            store: self.store.unwrap_or(true),
            previous_response_id,
            conversation,
            background: self.background.unwrap_or(false),
            truncation,
            top_logprobs,
        };
        let mode = Mode {
            stream: self.stream.unwrap_or(false),
            bounded: self.max_output_tokens.is_some(),
        };
        if !mode.stream && self.stream_options.as_ref().is_some_and(|o| !o.is_null()) {
            return Err(ApiError::invalid(
                "stream_options",
                "is only allowed when stream is true",
            ));
        }
        Ok(Read {
            request,
            echo,
            mode,
            fields,
            turn,
        })
    }

    /// Refuses, by name, fields asking for what Switchyard does not do; their "off" values
    /// are accepted, as SDKs send them.
    fn refuse_what_is_not_done(&self) -> Result<(), ApiError> {
        let set = |value: &Option<Value>| value.as_ref().is_some_and(|v| !v.is_null());
        if self.background == Some(true) && self.store == Some(false) {
            return Err(ApiError::invalid(
                "store",
                "must be true for a background response: it is stored to be polled",
            ));
        }
        if set(&self.prompt) {
            return Err(ApiError::invalid(
                "prompt",
                "stored prompt templates are not supported: send instructions and input",
            ));
        }
        if set(&self.max_tool_calls) {
            return Err(ApiError::invalid(
                "max_tool_calls",
                "is not supported (it bounds built-in tools, which Switchyard has none of); \
                 parallel_tool_calls: false allows one call",
            ));
        }
        for (i, item) in self.include.iter().flatten().enumerate() {
            if !INCLUDABLE.contains(&item.as_str()) {
                return Err(ApiError::invalid(
                    format!("include[{i}]"),
                    format!(
                        "{item:?} is not something a response can include: one of {}",
                        INCLUDABLE.join(", ")
                    ),
                ));
            }
        }
        if let Some(n) = self.top_logprobs.filter(|n| !(0..=20).contains(n)) {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("is {n}, must be 0 to 20"),
            ));
        }
        let reasons = self
            .reasoning
            .as_ref()
            .and_then(Value::as_object)
            .is_some_and(|r| r.values().any(|v| !v.is_null() && v != "none"));
        if reasons
            || self
                .reasoning
                .as_ref()
                .is_some_and(|r| !r.is_null() && !r.is_object())
        {
            return Err(ApiError::invalid(
                "reasoning",
                "the models Switchyard serves do not reason: leave reasoning out",
            ));
        }
        Ok(())
    }
}

/// Checks `metadata` against OpenAI's bounds; `null` when there is none.
pub fn metadata(metadata: Option<Map<String, Value>>) -> Result<Value, ApiError> {
    let Some(metadata) = metadata else {
        return Ok(Value::Null);
    };
    if metadata.len() > METADATA_PAIRS {
        return Err(ApiError::invalid(
            "metadata",
            format!(
                "has {} pairs, at most {METADATA_PAIRS} are allowed",
                metadata.len()
            ),
        ));
    }
    for (key, value) in &metadata {
        if key.chars().count() > METADATA_KEY_CHARS {
            return Err(ApiError::invalid(
                "metadata",
                format!("key {key:?} is longer than {METADATA_KEY_CHARS} characters"),
            ));
        }
        match value {
            Value::String(v) if v.chars().count() <= METADATA_VALUE_CHARS => {}
            Value::String(_) => {
                return Err(ApiError::invalid(
                    format!("metadata.{key}"),
                    format!("is longer than {METADATA_VALUE_CHARS} characters"),
                ));
            }
            _ => {
                return Err(ApiError::invalid(
                    format!("metadata.{key}"),
                    "must be a string",
                ));
            }
        }
    }
    Ok(Value::Object(metadata))
}

/// A Responses tool (`{"type": "function", "name", "description"?, "parameters"?,
/// "strict"?}`) in the chat form the shared reader takes, which checks its `type` too.
fn chat_tool(tool: &Value) -> Value {
    let mut function = Map::new();
    for key in ["name", "description", "parameters"] {
        if let Some(value) = tool.get(key) {
            function.insert(key.into(), value.clone());
        }
    }
    let kind = tool.get("type").cloned().unwrap_or(Value::Null);
    json!({"type": kind, "function": function})
}

/// A Responses `tool_choice` in the chat form: `{"type": "function", "name"}` is chat's
/// `{"type": "function", "function": {"name"}}`; the modes are the same strings.
fn chat_tool_choice(choice: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(Value::Object(object)) = choice else {
        return Ok(choice.cloned());
    };
    match object.get("type").and_then(Value::as_str) {
        Some("function") => {
            let name = object
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("tool_choice.name", "is required"))?;
            Ok(Some(
                json!({"type": "function", "function": {"name": name}}),
            ))
        }
        Some(other) => Err(ApiError::invalid(
            "tool_choice.type",
            format!(
                "{other:?} is not supported: use \"none\", \"auto\", \"required\" or {{\"type\": \"function\", \"name\": …}}"
            ),
        )),
        None => Err(ApiError::invalid("tool_choice.type", "is required")),
    }
}

/// `text.format` in chat's `response_format` form.
fn chat_response_format(format: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Ok(Some(format.clone()));
    }
    let mut schema = Map::new();
    for key in ["name", "schema", "strict", "description"] {
        if let Some(value) = format.get(key) {
            schema.insert(key.into(), value.clone());
        }
    }
    Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
}

/// Reads `input` (a string: one user message; or a list of items) into `messages`.
fn read_input(
    input: Option<&Value>,
    messages: &mut Vec<v1::ChatMessage>,
    fields: &mut FieldNames,
) -> Result<(), ApiError> {
    let items = match input {
        None | Some(Value::Null) => return Err(ApiError::invalid("input", "is required")),
        Some(Value::String(text)) => {
            fields.messages.push(Origin::whole("input"));
            messages.push(v1::ChatMessage {
                role: "user".into(),
                content: text.clone(),
                ..Default::default()
            });
            return Ok(());
        }
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("input", "must contain at least one item"));
        }
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(ApiError::invalid(
                "input",
                "must be a string or an array of input items",
            ));
        }
    };
    read_items(items, messages, fields)?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "input",
            "has no message or function call output to answer",
        ));
    }
    Ok(())
}

/// Reads input items (`input[i]` in errors) into `messages`.
fn read_items(
    items: &[Value],
    messages: &mut Vec<v1::ChatMessage>,
    fields: &mut FieldNames,
) -> Result<(), ApiError> {
    // Calls join an assistant turn of these items only, not the previous response's answer.
    let first = messages.len();
    for (i, item) in items.iter().enumerate() {
        let field = format!("input[{i}]");
        if !item.is_object() {
            return Err(ApiError::invalid(field, "must be an object"));
        }
        let kind = match item.get("type") {
            None | Some(Value::Null) => "message",
            Some(Value::String(kind)) => kind.as_str(),
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("{field}.type"),
                    "must be a string",
                ));
            }
        };
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some(role @ ("system" | "developer" | "user" | "assistant")) => role,
                    Some(other) => {
                        return Err(ApiError::invalid(
                            format!("{field}.role"),
                            format!(
                                "role {other:?} is not supported (system, developer, user, \
                                 assistant)"
                            ),
                        ));
                    }
                    None => return Err(ApiError::invalid(format!("{field}.role"), "is required")),
                };
                fields.messages.push(Origin::item(i));
                messages.push(v1::ChatMessage {
                    role: role.into(),
                    content: content_text(&field, item.get("content"))?,
                    ..Default::default()
                });
            }
            "function_call" => {
                let call = v1::ToolCall {
                    id: required_string(item, "call_id", &field)?,
                    name: required_string(item, "name", &field)?,
                    arguments: required_string(item, "arguments", &field)?,
                };
                // Calls join the assistant turn that made them (a message with text, or the
                // calls before them); a call after anything else starts a turn.
                let in_input = messages.len() > first;
                match messages.last_mut() {
                    Some(last) if in_input && last.role == "assistant" => {
                        last.tool_calls.push(call);
                    }
                    _ => {
                        fields.messages.push(Origin::calls());
                        messages.push(v1::ChatMessage {
                            role: "assistant".into(),
                            tool_calls: vec![call],
                            ..Default::default()
                        });
                    }
                }
                fields.push_call(i);
            }
            "function_call_output" => {
                fields.messages.push(Origin::item(i));
                messages.push(v1::ChatMessage {
                    role: "tool".into(),
                    content: output_text(&field, item.get("output"))?,
                    tool_call_id: required_string(item, "call_id", &field)?,
                    ..Default::default()
                });
            }
            // The reasoning of the model that answered before, meaningful to that model only
            // (often encrypted for it); the models served here do not read it.
            "reasoning" => {}
            // A request's own are resolved before it is read (see `references`); one left is
            // where none is looked up: among a conversation's items.
            "item_reference" => {
                return Err(ApiError::invalid(
                    format!("{field}.type"),
                    "an item reference is resolved in a response's input only: send the item \
                     itself",
                ));
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{field}.type"),
                    format!(
                        "item type {other:?} is not supported (message, function_call, \
                         function_call_output)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks items a client adds to a conversation (`field`, e.g. `items`), as input items are.
pub fn check_items(items: &[Value], field: &str) -> Result<(), ApiError> {
    read_items(items, &mut Vec::new(), &mut FieldNames::default()).map_err(|e| {
        e.renaming_param(|param| {
            param
                .strip_prefix("input")
                .map(|rest| format!("{field}{rest}"))
        })
    })
}

/// A stored conversation's items (checked when added) as the messages a request runs.
pub fn conversation_messages(items: &[Value]) -> Result<Vec<v1::ChatMessage>, ApiError> {
    let mut messages = Vec::new();
    read_items(items, &mut messages, &mut FieldNames::default()).map_err(|e| ApiError {
        param: Some("conversation".into()),
        ..e
    })?;
    Ok(messages)
}

/// What `include` may name. Only the first adds anything here (log probabilities of the
/// output text); the others name items Switchyard's models never produce (reasoning, images,
/// built-in tools), so asking for them includes nothing, as OpenAI's API does for a response
/// without such items.
const INCLUDABLE: [&str; 8] = [
    LOGPROBS_INCLUDE,
    "reasoning.encrypted_content",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "code_interpreter_call.outputs",
];
const LOGPROBS_INCLUDE: &str = "message.output_text.logprobs";

/// The input as the list of items a stored response lists (`input_items`), each with an id
/// and as JSON text: a string input is one user message.
fn input_items(input: Option<&Value>, holder: Option<&str>) -> Vec<Box<RawValue>> {
    let items = match input {
        Some(Value::String(text)) => vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        })],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    with_ids(items, holder)
}

/// Items as stored by `holder` (a response or conversation id), as JSON text: each with its
/// `type` (a message when it names none) and an `id` (a new one, naming `holder`, when it has
/// none).
pub fn with_ids(items: Vec<Value>, holder: Option<&str>) -> Vec<Box<RawValue>> {
    items
        .into_iter()
        .map(|mut item| {
            if let Value::Object(fields) = &mut item
                && fields.get("type").is_none_or(Value::is_null)
            {
                fields.insert("type".into(), "message".into());
            }
            if let Value::Object(fields) = &mut item
                && !fields.get("id").is_some_and(Value::is_string)
            {
                let prefix = match fields.get("type").and_then(Value::as_str) {
                    Some("function_call") => "fc",
                    Some("function_call_output") => "fco",
                    Some("reasoning") => "rs",
                    _ => "msg",
                };
                fields.insert("id".into(), item_ids::mint(prefix, holder).into());
            }
            serde_json::value::to_raw_value(&item).expect("a JSON value serializes")
        })
        .collect()
}

fn required_string(item: &Value, key: &str, field: &str) -> Result<String, ApiError> {
    match item.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(ApiError::invalid(format!("{field}.{key}"), "is required")),
        Some(_) => Err(ApiError::invalid(
            format!("{field}.{key}"),
            "must be a string",
        )),
    }
}

/// A message's text: a string, or its text parts (`input_text`, and `output_text` /
/// `refusal` in an assistant's earlier output) one line each, as chat's parts are joined.
fn content_text(field: &str, content: Option<&Value>) -> Result<String, ApiError> {
    let field = format!("{field}.content");
    let parts = match content {
        Some(Value::String(text)) => return Ok(text.clone()),
        Some(Value::Array(parts)) => parts,
        None | Some(Value::Null) => return Err(ApiError::invalid(field, "is required")),
        Some(_) => {
            return Err(ApiError::invalid(
                field,
                "must be a string or an array of content parts",
            ));
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (p, part) in parts.iter().enumerate() {
        let (key, kind) = match part.get("type").and_then(Value::as_str) {
            Some(kind @ ("input_text" | "output_text")) => ("text", kind),
            Some(kind @ "refusal") => ("refusal", kind),
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{field}[{p}].type"),
                    format!(
                        "content part type {other:?} is not supported (input_text, \
                         output_text, refusal: text only)"
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{field}[{p}].type"),
                    "is required",
                ));
            }
        };
        match part.get(key) {
            Some(Value::String(text)) => texts.push(text.as_str()),
            _ => {
                return Err(ApiError::invalid(
                    format!("{field}[{p}].{key}"),
                    format!("is required in a {kind:?} part (a string)"),
                ));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// A `function_call_output`'s `output`: a string, or text parts.
fn output_text(field: &str, output: Option<&Value>) -> Result<String, ApiError> {
    match output {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(parts @ Value::Array(_)) => content_text(field, Some(parts)).map_err(|e| {
            e.renaming_param(|f| {
                f.strip_prefix(&format!("{field}.content"))
                    .map(|rest| format!("{field}.output{rest}"))
            })
        }),
        None | Some(Value::Null) => {
            Err(ApiError::invalid(format!("{field}.output"), "is required"))
        }
        Some(_) => Err(ApiError::invalid(
            format!("{field}.output"),
            "must be a string or an array of input_text parts",
        )),
    }
}

/// Where a message of the translated conversation came from in the request.
#[derive(Debug, Clone, Default)]
struct Origin {
    /// `instructions`, or `input` when it was a string: the field as a whole.
    whole: Option<&'static str>,
    /// The input item the message is (its text, for an assistant turn with calls).
    item: Option<usize>,
    /// The input items of its tool calls, in order.
    calls: Vec<usize>,
}

impl Origin {
    fn whole(field: &'static str) -> Self {
        Self {
            whole: Some(field),
            ..Default::default()
        }
    }

    fn item(index: usize) -> Self {
        Self {
            item: Some(index),
            ..Default::default()
        }
    }

    fn calls() -> Self {
        Self::default()
    }
}

/// The dispatcher's (chat-shaped) field names → the request's.
#[derive(Debug, Default)]
pub struct FieldNames {
    messages: Vec<Origin>,
    /// The field the affinity key came from.
    affinity: &'static str,
}

impl FieldNames {
    fn push_call(&mut self, item: usize) {
        if let Some(origin) = self.messages.last_mut() {
            origin.calls.push(item);
        }
    }

    /// The request's name for the chat-shaped `field`, `None` when it is the same.
    pub fn rename(&self, field: &str) -> Option<String> {
        let renamed = match field {
            "max_tokens" => "max_output_tokens".to_string(),
            "user" if !self.affinity.is_empty() => self.affinity.to_string(),
            "response_format" | "response_format.json_schema" => "text.format".to_string(),
            "tool_choice.function.name" => "tool_choice.name".to_string(),
            field if field.starts_with("response_format.") => {
                let rest = field.trim_start_matches("response_format.");
                format!("text.format.{}", rest.trim_start_matches("json_schema."))
            }
            field if field.starts_with("tools[") => field.replace(".function", ""),
            field if field.starts_with("messages[") => self.message_field(field)?,
            _ => return None,
        };
        Some(renamed)
    }

    fn message_field(&self, field: &str) -> Option<String> {
        let field = message_field(field)?;
        let origin = self.messages.get(field.message)?;
        if let Some(whole) = origin.whole {
            return Some(whole.to_string());
        }
        if let Some(call) = field.call {
            let item = origin.calls.get(call)?;
            let rest = match field.rest {
                ".id" => ".call_id",
                other => other,
            };
            return Some(format!("input[{item}]{rest}"));
        }
        let item = origin.item.or_else(|| origin.calls.first().copied())?;
        let rest = match field.rest {
            ".tool_call_id" => ".call_id",
            ".content" if origin.item.is_none() => "",
            other => other,
        };
        Some(format!("input[{item}]{rest}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<Read, ApiError> {
        serde_json::from_value::<ResponsesRequest>(body)
            .expect("typed")
            .read(4096, &[], "previous_response_id", None)
    }

    #[test]
    fn a_string_input_is_one_user_message_after_the_instructions() {
        let read = read(json!({
            "model": "m", "instructions": "Be brief.", "input": "Hi",
            "max_output_tokens": 20, "service_tier": "priority", "prompt_cache_key": "k",
        }))
        .expect("read");
        let roles: Vec<_> = read
            .request
            .messages
            .iter()
            .map(|m| m.role.as_str())
            .collect();
        assert_eq!(roles, ["system", "user"]);
        assert_eq!(read.request.messages[1].content, "Hi");
        assert_eq!(read.request.sampling.as_ref().unwrap().max_tokens, 20);
        assert_eq!(read.request.class, v1::RequestClass::LatencyCritical as i32);
        assert_eq!(read.request.affinity_key, "k");
        assert!(read.mode.bounded && !read.mode.stream);
    }

    #[test]
    fn a_request_going_on_from_a_stored_response_runs_its_conversation_then_the_input() {
        let store = crate::response_store::ResponseStore::new(Default::default());
        let history = [
            store.message(v1::ChatMessage {
                role: "user".into(),
                content: "Call f.".into(),
                ..Default::default()
            }),
            store.message(v1::ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![v1::ToolCall {
                    id: "c1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                }],
                ..Default::default()
            }),
        ];
        let read = serde_json::from_value::<ResponsesRequest>(json!({
            "model": "m", "instructions": "Be brief.", "previous_response_id": "resp_x",
            "input": [
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
            ],
        }))
        .expect("typed")
        .read(4096, &history, "previous_response_id", None)
        .expect("read");
        let roles: Vec<_> = read
            .request
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.tool_calls.len()))
            .collect();
        // The input's call is a turn of its own, not one more call of the stored answer.
        assert_eq!(
            roles,
            [
                ("system", 0),
                ("user", 0),
                ("assistant", 1),
                ("tool", 0),
                ("assistant", 1)
            ]
        );
        assert_eq!(read.echo.previous_response_id.as_deref(), Some("resp_x"));
        // What a response going on from this one continues: no instructions.
        assert!(Arc::ptr_eq(&read.turn.history[1], &history[1]));
        assert_eq!(read.turn.input, read.request.messages[3..]);
        let ids: Vec<_> = read
            .turn
            .input_items
            .iter()
            .map(|i| serde_json::from_str::<Value>(i.get()).unwrap()["id"].clone())
            .collect();
        let ids: Vec<_> = ids
            .iter()
            .map(|id| id.as_str().unwrap().split('_').next().unwrap())
            .collect();
        assert_eq!(ids, ["fco", "fc"]);
        // A fault the dispatcher finds in the stored part names previous_response_id.
        assert_eq!(
            read.fields.rename("messages[2].tool_calls[0]").as_deref(),
            Some("previous_response_id")
        );
    }

    #[test]
    fn calls_and_their_outputs_become_an_assistant_turn_and_tool_messages() {
        let read = read(json!({
            "model": "m",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "get", "arguments": "{\"a\":1}"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2",
                 "output": [{"type": "input_text", "text": "rain"}]},
            ],
            "tools": [{"type": "function", "name": "get", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get"},
            "parallel_tool_calls": false,
        }))
        .expect("read");
        let m = &read.request.messages;
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].role, "assistant");
        let ids: Vec<_> = m[1].tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert_eq!(
            (m[2].role.as_str(), m[2].tool_call_id.as_str()),
            ("tool", "c1")
        );
        assert_eq!(m[3].content, "rain");
        assert_eq!(read.request.tools[0].name, "get");
        let choice = read.request.tool_choice.expect("choice");
        assert_eq!(choice.function, "get");
        assert!(choice.single_call);
    }

    #[test]
    fn stateful_and_unsupported_asks_are_refused_by_name() {
        for (body, field) in [
            (json!({"previous_response_id": 7}), "previous_response_id"),
            (json!({"previous_response_id": ""}), "previous_response_id"),
            (json!({"conversation": ""}), "conversation"),
            (json!({"conversation": {"id": 7}}), "conversation"),
            (
                json!({"conversation": "conv_1", "previous_response_id": "resp_1"}),
                "conversation",
            ),
            (json!({"background": true, "store": false}), "store"),
            (json!({"truncation": "middle"}), "truncation"),
            (
                json!({"include": ["message.output_text.logprobs", "everything"]}),
                "include[1]",
            ),
            (json!({"top_logprobs": 21}), "top_logprobs"),
            (json!({"reasoning": {"effort": "high"}}), "reasoning"),
            (json!({"tools": [{"type": "web_search"}]}), "tools[0].type"),
            (
                json!({"input": [{"type": "item_reference", "id": "x"}]}),
                "input[0].type",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input[0].content[0].type",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f"}]}),
                "input[0].call_id",
            ),
            (json!({"max_output_tokens": 0}), "max_output_tokens"),
            (json!({"service_tier": "scale"}), "service_tier"),
            (json!({"metadata": {"k": 1}}), "metadata.k"),
            (
                json!({"text": {"format": {"type": "yaml"}}}),
                "text.format.type",
            ),
            (json!({"input": []}), "input"),
        ] {
            let mut request = json!({"model": "m", "input": "hi"});
            for (key, value) in body.as_object().unwrap() {
                request[key] = value.clone();
            }
            let error = read(request).expect_err("refused");
            assert_eq!(error.param.as_deref(), Some(field), "{error}");
            assert!(error.message.starts_with(field), "{error}");
        }
        // Their off values are what SDKs send by default.
        read(json!({
            "model": "m", "input": "hi", "store": true, "truncation": "disabled",
            "include": ["reasoning.encrypted_content"], "top_logprobs": 0,
            "reasoning": {"effort": null}, "previous_response_id": null, "background": false,
        }))
        .expect("accepted");
    }

    #[test]
    fn dispatcher_fields_are_named_as_the_request_wrote_them() {
        let read = read(json!({
            "model": "m", "instructions": "sys",
            "input": [
                {"role": "user", "content": "q"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c9", "output": "r"},
            ],
            "user": "u",
        }))
        .expect("read");
        let f = &read.fields;
        assert_eq!(
            f.rename("messages[0].content").as_deref(),
            Some("instructions")
        );
        assert_eq!(
            f.rename("messages[1].content").as_deref(),
            Some("input[0].content")
        );
        assert_eq!(
            f.rename("messages[2].tool_calls[0].name").as_deref(),
            Some("input[1].name")
        );
        assert_eq!(
            f.rename("messages[3].tool_call_id").as_deref(),
            Some("input[2].call_id")
        );
        assert_eq!(
            f.rename("tools[2].function.parameters").as_deref(),
            Some("tools[2].parameters")
        );
        assert_eq!(f.rename("max_tokens").as_deref(), Some("max_output_tokens"));
        assert_eq!(
            f.rename("response_format.json_schema.schema").as_deref(),
            Some("text.format.schema")
        );
        assert_eq!(f.rename("user"), Some("user".into()));
        assert_eq!(f.rename("temperature"), None);
    }
}
