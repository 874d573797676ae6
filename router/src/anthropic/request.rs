//! An Anthropic Messages request (`POST /v1/messages`) read into the `GenerateRequest` every
//! door produces, with a map from the dispatcher's field names to the request's own, so an
//! error names the field the client wrote (`messages[3].content[0].tool_use_id`).
//!
//! Content blocks map onto the chat conversation: `text` blocks are a message's text, an
//! assistant's `tool_use` blocks its tool calls, a user's `tool_result` blocks one `tool`
//! message each (before the user's text, as the API orders them). What Switchyard cannot do is
//! refused by name: images and documents, server tools, extended thinking, and an assistant
//! message last (a prefill to continue).

use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_proto::v1;

use crate::openai::fields::message_field;
use crate::openai::{ApiError, tools};

/// The Messages API's request fields Switchyard reads; unknown fields are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessagesRequest {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub messages: Option<Vec<Value>>,
    pub system: Option<Value>,
    pub stop_sequences: Option<Vec<String>>,
    pub stream: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub metadata: Option<Metadata>,
    pub thinking: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Metadata {
    pub user_id: Option<String>,
}

/// The request read: what the dispatcher runs, whether it streams, how to name fields.
#[derive(Debug)]
pub struct Read {
    pub request: v1::GenerateRequest,
    pub stream: bool,
    pub fields: FieldNames,
}

impl MessagesRequest {
    pub fn read(self) -> Result<Read, ApiError> {
        let model = match self.model {
            Some(m) if !m.trim().is_empty() => m,
            Some(_) => return Err(ApiError::invalid("model", "must not be empty")),
            None => return Err(ApiError::invalid("model", "is required")),
        };
        // Required by the API: a client must say how long an answer may be.
        let max_tokens = match self.max_tokens {
            None => return Err(ApiError::invalid("max_tokens", "is required")),
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("is {m}, must be at least 1"),
                ));
            }
            Some(m) => u32::try_from(m).unwrap_or(u32::MAX),
        };
        if let Some(thinking) = &self.thinking
            && thinking.get("type").and_then(Value::as_str) != Some("disabled")
            && !thinking.is_null()
        {
            return Err(ApiError::invalid(
                "thinking",
                "extended thinking is not supported by the models Switchyard serves: leave it \
                 out or send {\"type\": \"disabled\"}",
            ));
        }
        let mut fields = FieldNames::default();
        let mut messages = Vec::new();
        if let Some(system) = system_text(self.system.as_ref())? {
            fields.origins.push(Origin::system());
            messages.push(v1::ChatMessage {
                role: "system".into(),
                content: system,
                ..Default::default()
            });
        }
        read_messages(self.messages, &mut messages, &mut fields)?;

        let chat_tools: Vec<Value> = self
            .tools
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, tool)| chat_tool(i, tool))
            .collect::<Result<_, _>>()?;
        let rename = |e: ApiError| e.renaming_param(|f| fields.rename(f));
        let proto_tools = tools::tools(Some(&Value::from(chat_tools))).map_err(rename)?;
        let tool_choice = match &self.tool_choice {
            None | Some(Value::Null) => None,
            Some(choice) => Some(tool_choice(choice)?),
        };
        let top_k = match self.top_k {
            None => None,
            Some(k) if k < 1 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("is {k}, must be at least 1"),
                ));
            }
            Some(k) => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        };
        let stop = self.stop_sequences.unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                "stop_sequences",
                "stop sequences must not be empty",
            ));
        }
        let request = v1::GenerateRequest {
            model,
            messages,
            sampling: Some(v1::SamplingParams {
                max_tokens,
                temperature: self.temperature.map(|t| t as f32),
                top_p: self.top_p.map(|p| p as f32),
                top_k,
                stop,
                ..Default::default()
            }),
            tools: proto_tools,
            tool_choice,
            affinity_key: self.metadata.and_then(|m| m.user_id).unwrap_or_default(),
            ..Default::default()
        };
        Ok(Read {
            request,
            stream: self.stream.unwrap_or(false),
            fields,
        })
    }
}

/// `system`: a string or text blocks, joined one per line.
fn system_text(system: Option<&Value>) -> Result<Option<String>, ApiError> {
    match system {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Array(blocks)) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (b, block) in blocks.iter().enumerate() {
                texts.push(text_block(&format!("system[{b}]"), block)?);
            }
            Ok(Some(texts.join("\n")))
        }
        Some(_) => Err(ApiError::invalid(
            "system",
            "must be a string or an array of text blocks",
        )),
    }
}

/// A `{"type": "text", "text"}` block's text.
fn text_block(field: &str, block: &Value) -> Result<String, ApiError> {
    match (block.get("type").and_then(Value::as_str), block.get("text")) {
        (Some("text"), Some(Value::String(text))) => Ok(text.clone()),
        (Some("text"), _) => Err(ApiError::invalid(
            format!("{field}.text"),
            "is required (a string)",
        )),
        (Some(other), _) => Err(ApiError::invalid(
            format!("{field}.type"),
            format!("block type {other:?} is not supported here (only \"text\")"),
        )),
        (None, _) => Err(ApiError::invalid(format!("{field}.type"), "is required")),
    }
}

fn read_messages(
    input: Option<Vec<Value>>,
    messages: &mut Vec<v1::ChatMessage>,
    fields: &mut FieldNames,
) -> Result<(), ApiError> {
    let input = input.ok_or_else(|| ApiError::invalid("messages", "is required"))?;
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "must contain at least one message",
        ));
    }
    for (i, message) in input.iter().enumerate() {
        let field = format!("messages[{i}]");
        if !message.is_object() {
            return Err(ApiError::invalid(field, "must be an object"));
        }
        let role = match message.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!("{field}.role"),
                    format!(
                        "role {other:?} is not supported (user, assistant; system goes in system)"
                    ),
                ));
            }
            None => return Err(ApiError::invalid(format!("{field}.role"), "is required")),
        };
        let blocks = match message.get("content") {
            Some(Value::String(text)) => vec![json!({"type": "text", "text": text})],
            Some(Value::Array(blocks)) => blocks.clone(),
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(format!("{field}.content"), "is required"));
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    format!("{field}.content"),
                    "must be a string or an array of content blocks",
                ));
            }
        };
        if role == "assistant" {
            read_assistant(i, &blocks, messages, fields)?;
        } else {
            read_user(i, &blocks, messages, fields)?;
        }
    }
    if messages.last().is_some_and(|m| m.role == "assistant") {
        return Err(ApiError::invalid(
            format!("messages[{}]", input.len() - 1),
            "an assistant message last (a prefill for the answer to continue) is not \
             supported: end with a user message",
        ));
    }
    Ok(())
}

fn block_type<'a>(field: &str, block: &'a Value) -> Result<&'a str, ApiError> {
    block
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(format!("{field}.type"), "is required"))
}

fn read_assistant(
    i: usize,
    blocks: &[Value],
    messages: &mut Vec<v1::ChatMessage>,
    fields: &mut FieldNames,
) -> Result<(), ApiError> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let mut origin = Origin::message(i);
    for (b, block) in blocks.iter().enumerate() {
        let field = format!("messages[{i}].content[{b}]");
        match block_type(&field, block)? {
            "text" => texts.push(text_block(&field, block)?),
            "tool_use" => {
                let string = |key: &str| match block.get(key) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    _ => Err(ApiError::invalid(
                        format!("{field}.{key}"),
                        "is required (a string)",
                    )),
                };
                let input = match block.get("input") {
                    Some(input @ Value::Object(_)) => input.to_string(),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}.input"),
                            "is required (an object)",
                        ));
                    }
                };
                calls.push(v1::ToolCall {
                    id: string("id")?,
                    name: string("name")?,
                    arguments: input,
                });
                origin.calls.push(b);
            }
            // The reasoning of the model that wrote the turn; the models served here do not
            // read it.
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("{field}.type"),
                    format!(
                        "block type {other:?} is not supported in an assistant message (text, \
                         tool_use)"
                    ),
                ));
            }
        }
    }
    fields.origins.push(origin);
    messages.push(v1::ChatMessage {
        role: "assistant".into(),
        content: texts.join("\n"),
        tool_calls: calls,
        ..Default::default()
    });
    Ok(())
}

fn read_user(
    i: usize,
    blocks: &[Value],
    messages: &mut Vec<v1::ChatMessage>,
    fields: &mut FieldNames,
) -> Result<(), ApiError> {
    let mut texts = Vec::new();
    for (b, block) in blocks.iter().enumerate() {
        let field = format!("messages[{i}].content[{b}]");
        match block_type(&field, block)? {
            "text" => texts.push(text_block(&field, block)?),
            "tool_result" => {
                let id = match block.get("tool_use_id") {
                    Some(Value::String(id)) => id.clone(),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{field}.tool_use_id"),
                            "is required: the id of the tool_use this answers",
                        ));
                    }
                };
                let mut content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .enumerate()
                        .map(|(p, part)| text_block(&format!("{field}.content[{p}]"), part))
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n"),
                    Some(_) => {
                        return Err(ApiError::invalid(
                            format!("{field}.content"),
                            "must be a string or an array of text blocks",
                        ));
                    }
                };
                // The model reads a failed call's result as one.
                if block.get("is_error") == Some(&Value::Bool(true)) {
                    content = format!("Error: {content}");
                }
                fields.origins.push(Origin::tool_result(i, b));
                messages.push(v1::ChatMessage {
                    role: "tool".into(),
                    content,
                    tool_call_id: id,
                    ..Default::default()
                });
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{field}.type"),
                    format!(
                        "block type {other:?} is not supported (text, tool_result: images and \
                         documents are not)"
                    ),
                ));
            }
        }
    }
    // A user turn of tool results alone has no text of its own.
    if !texts.is_empty() || blocks.is_empty() {
        fields.origins.push(Origin::message(i));
        messages.push(v1::ChatMessage {
            role: "user".into(),
            content: texts.join("\n"),
            ..Default::default()
        });
    }
    Ok(())
}

/// An Anthropic tool (`{"name", "description"?, "input_schema"}`) in the chat form the shared
/// reader takes. Server tools (a `type` such as `web_search_…`) are refused.
fn chat_tool(index: usize, tool: &Value) -> Result<Value, ApiError> {
    let field = format!("tools[{index}]");
    if !tool.is_object() {
        return Err(ApiError::invalid(field, "must be an object"));
    }
    match tool.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == "custom" => {}
        Some(other) => {
            return Err(ApiError::invalid(
                format!("{field}.type"),
                format!("tool type {other} is not supported (only client tools: \"custom\")"),
            ));
        }
    }
    let mut function = serde_json::Map::new();
    for (from, to) in [
        ("name", "name"),
        ("description", "description"),
        ("input_schema", "parameters"),
    ] {
        if let Some(value) = tool.get(from) {
            function.insert(to.into(), value.clone());
        }
    }
    Ok(json!({"type": "function", "function": function}))
}

/// `tool_choice`: `{"type": "auto" | "any" | "tool" | "none", "name"?,
/// "disable_parallel_tool_use"?}`.
fn tool_choice(choice: &Value) -> Result<v1::ToolChoice, ApiError> {
    let single_call = match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice.disable_parallel_tool_use",
                "must be true or false",
            ));
        }
    };
    let mut out = v1::ToolChoice {
        single_call,
        ..Default::default()
    };
    out.mode = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => v1::ToolChoiceMode::Auto,
        Some("any") => v1::ToolChoiceMode::Required,
        Some("none") => v1::ToolChoiceMode::None,
        Some("tool") => {
            out.function = choice
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("tool_choice.name", "is required"))?
                .to_string();
            v1::ToolChoiceMode::Auto
        }
        _ => {
            return Err(ApiError::invalid(
                "tool_choice.type",
                "must be \"auto\", \"any\", \"tool\" or \"none\"",
            ));
        }
    } as i32;
    Ok(out)
}

/// Where a message of the translated conversation came from in the request.
#[derive(Debug, Clone, Default)]
struct Origin {
    /// The request's message; `None` for `system`.
    message: Option<usize>,
    /// The `tool_result` block it is.
    block: Option<usize>,
    /// The `tool_use` blocks of its calls, in order.
    calls: Vec<usize>,
}

impl Origin {
    fn system() -> Self {
        Self::default()
    }

    fn message(index: usize) -> Self {
        Self {
            message: Some(index),
            ..Default::default()
        }
    }

    fn tool_result(index: usize, block: usize) -> Self {
        Self {
            message: Some(index),
            block: Some(block),
            ..Default::default()
        }
    }
}

/// The dispatcher's (chat-shaped) field names → the request's.
#[derive(Debug, Default)]
pub struct FieldNames {
    origins: Vec<Origin>,
}

impl FieldNames {
    /// The request's name for the chat-shaped `field`, `None` when it is the same.
    pub fn rename(&self, field: &str) -> Option<String> {
        let renamed = match field {
            "stop" => "stop_sequences".to_string(),
            "user" => "metadata.user_id".to_string(),
            "tool_choice.function.name" => "tool_choice.name".to_string(),
            "tool_choice" | "tool_choice.mode" => "tool_choice.type".to_string(),
            field if field.starts_with("tools[") => field
                .replace(".function.parameters", ".input_schema")
                .replace(".function", ""),
            field if field.starts_with("messages[") => self.message_field(field)?,
            _ => return None,
        };
        Some(renamed)
    }

    fn message_field(&self, field: &str) -> Option<String> {
        let field = message_field(field)?;
        let origin = self.origins.get(field.message)?;
        let Some(message) = origin.message else {
            return Some("system".to_string());
        };
        if let Some(call) = field.call {
            let block = origin.calls.get(call)?;
            let rest = match field.rest {
                ".arguments" => ".input",
                other => other,
            };
            return Some(format!("messages[{message}].content[{block}]{rest}"));
        }
        Some(match (origin.block, field.rest) {
            (Some(block), ".tool_call_id") => {
                format!("messages[{message}].content[{block}].tool_use_id")
            }
            (Some(block), rest) => format!("messages[{message}].content[{block}]{rest}"),
            (None, rest) => format!("messages[{message}]{rest}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<Read, ApiError> {
        serde_json::from_value::<MessagesRequest>(body)
            .expect("typed")
            .read()
    }

    #[test]
    fn tool_use_and_results_become_calls_and_tool_messages() {
        let read = read(json!({
            "model": "m", "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "…", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Oslo"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
                     "content": [{"type": "text", "text": "timeout"}]},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ],
            "tools": [{"name": "get", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stop_sequences": ["END"], "top_k": 5, "metadata": {"user_id": "u1"},
        }))
        .expect("read");
        let m = &read.request.messages;
        let roles: Vec<_> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "tool", "tool", "user"]
        );
        assert_eq!(m[2].content, "Checking.");
        assert_eq!(m[2].tool_calls[0].arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(m[4].content, "Error: timeout");
        assert_eq!(m[4].tool_call_id, "toolu_2");
        let choice = read.request.tool_choice.expect("a choice");
        assert_eq!(choice.mode, v1::ToolChoiceMode::Required as i32);
        assert!(choice.single_call);
        assert_eq!(read.request.tools[0].name, "get");
        assert_eq!(read.request.affinity_key, "u1");
        let sampling = read.request.sampling.expect("sampling");
        assert_eq!((sampling.max_tokens, sampling.top_k), (64, Some(5)));
        assert_eq!(sampling.stop, ["END"]);

        let f = &read.fields;
        assert_eq!(f.rename("messages[0].content").as_deref(), Some("system"));
        assert_eq!(
            f.rename("messages[2].tool_calls[0].name").as_deref(),
            Some("messages[1].content[2].name")
        );
        assert_eq!(
            f.rename("messages[4].tool_call_id").as_deref(),
            Some("messages[2].content[1].tool_use_id")
        );
        assert_eq!(
            f.rename("messages[5].content").as_deref(),
            Some("messages[2].content")
        );
        assert_eq!(
            f.rename("tools[0].function.parameters").as_deref(),
            Some("tools[0].input_schema")
        );
        assert_eq!(f.rename("stop").as_deref(), Some("stop_sequences"));
    }

    #[test]
    fn what_is_not_done_is_refused_by_name() {
        for (body, field) in [
            (json!({"max_tokens": null}), "max_tokens"),
            (
                json!({"thinking": {"type": "enabled", "budget_tokens": 1024}}),
                "thinking",
            ),
            (
                json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "The"}]}),
                "messages[1]",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]}),
                "messages[0].content[0].tool_use_id",
            ),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (json!({"tool_choice": {"type": "tool"}}), "tool_choice.name"),
            (json!({"stop_sequences": [""]}), "stop_sequences"),
        ] {
            let mut request = json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
            for (key, value) in body.as_object().unwrap() {
                request[key] = value.clone();
            }
            let error = read(request).expect_err("refused");
            assert_eq!(error.param.as_deref(), Some(field), "{error}");
            assert!(error.message.starts_with(field), "{error}");
        }
    }
}
