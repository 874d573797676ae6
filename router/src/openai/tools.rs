//! OpenAI's tool calling at the HTTP door: `tools`, `tool_choice` and `parallel_tool_calls`
//! in, assistant `tool_calls` and `tool` results in the conversation, and the calls a model
//! makes out — whole in a message, or as `delta.tool_calls` pieces in a stream.

use serde::Serialize;
use serde_json::{Value, json};
use switchyard_proto::v1;

use super::error::ApiError;

/// `tools`: `[{"type": "function", "function": {"name", "description"?, "parameters"?,
/// "strict"?}}]`. The names and schemas are checked where every door's requests are.
pub fn tools(value: Option<&Value>) -> Result<Vec<v1::Tool>, ApiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("tools", "must be an array of tools")),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = format!("tools[{i}]");
            match item.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(other) => {
                    return Err(ApiError::invalid(
                        format!("{field}.type"),
                        format!("tool type {other:?} is not supported (only \"function\")"),
                    ));
                }
                None => {
                    return Err(ApiError::invalid(
                        format!("{field}.type"),
                        "is required (\"function\")",
                    ));
                }
            }
            let Some(function) = item.get("function").filter(|f| f.is_object()) else {
                return Err(ApiError::invalid(
                    format!("{field}.function"),
                    "must be an object with the function's name",
                ));
            };
            let name =
                string(function, "name", &format!("{field}.function"))?.ok_or_else(|| {
                    ApiError::invalid(format!("{field}.function.name"), "is required")
                })?;
            let description =
                string(function, "description", &format!("{field}.function"))?.unwrap_or_default();
            let parameters_json = match function.get("parameters") {
                None | Some(Value::Null) => String::new(),
                Some(schema @ Value::Object(_)) => schema.to_string(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        format!("{field}.function.parameters"),
                        "must be a JSON Schema object",
                    ));
                }
            };
            Ok(v1::Tool {
                name,
                description,
                parameters_json,
            })
        })
        .collect()
}

/// A string member of `object`, `None` when absent or null.
fn string(object: &Value, key: &str, parent: &str) -> Result<Option<String>, ApiError> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(
            format!("{parent}.{key}"),
            "must be a string",
        )),
    }
}

/// `tool_choice` (`"none"`, `"auto"`, `"required"` or `{"type": "function", "function":
/// {"name"}}`) and `parallel_tool_calls`; `None` when neither is given.
pub fn tool_choice(
    choice: Option<&Value>,
    parallel: Option<&Value>,
) -> Result<Option<v1::ToolChoice>, ApiError> {
    let single_call = match parallel {
        None | Some(Value::Null) => false,
        Some(Value::Bool(parallel)) => !parallel,
        Some(_) => {
            return Err(ApiError::invalid(
                "parallel_tool_calls",
                "must be true or false",
            ));
        }
    };
    let mut out = v1::ToolChoice {
        single_call,
        ..Default::default()
    };
    match choice {
        None | Some(Value::Null) if !single_call => return Ok(None),
        None | Some(Value::Null) => {}
        Some(Value::String(mode)) => {
            out.mode = match mode.as_str() {
                "auto" => v1::ToolChoiceMode::Auto,
                "none" => v1::ToolChoiceMode::None,
                "required" => v1::ToolChoiceMode::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                            "is {other:?}, must be \"none\", \"auto\", \"required\" or \
                             {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"
                        ),
                    ));
                }
            } as i32;
        }
        Some(object @ Value::Object(_)) => {
            if object.get("type").and_then(Value::as_str) != Some("function") {
                return Err(ApiError::invalid(
                    "tool_choice.type",
                    "must be \"function\"",
                ));
            }
            out.function = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("tool_choice.function.name", "is required"))?
                .to_string();
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "must be a string or a function object",
            ));
        }
    }
    Ok(Some(out))
}

/// An assistant message's `tool_calls`: `[{"id", "type": "function", "function": {"name",
/// "arguments"}}]`.
pub fn message_tool_calls(
    index: usize,
    value: Option<&Value>,
) -> Result<Vec<v1::ToolCall>, ApiError> {
    let field = format!("messages[{index}].tool_calls");
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid(field, "must be an array of tool calls")),
    };
    items
        .iter()
        .enumerate()
        .map(|(j, call)| {
            let field = format!("{field}[{j}]");
            if !call.is_object() {
                return Err(ApiError::invalid(field, "must be an object"));
            }
            let function = call
                .get("function")
                .filter(|f| f.is_object())
                .ok_or_else(|| {
                    ApiError::invalid(format!("{field}.function"), "must be an object")
                })?;
            let function_field = format!("{field}.function");
            Ok(v1::ToolCall {
                id: string(call, "id", &field)?
                    .ok_or_else(|| ApiError::invalid(format!("{field}.id"), "is required"))?,
                name: string(function, "name", &function_field)?.ok_or_else(|| {
                    ApiError::invalid(format!("{function_field}.name"), "is required")
                })?,
                arguments: string(function, "arguments", &function_field)?.unwrap_or_default(),
            })
        })
        .collect()
}

/// A "tool" message's `tool_call_id`.
pub fn tool_call_id(index: usize, message: &Value) -> Result<String, ApiError> {
    string(message, "tool_call_id", &format!("messages[{index}]"))?.ok_or_else(|| {
        ApiError::invalid(
            format!("messages[{index}].tool_call_id"),
            "is required: the id of the call this message answers",
        )
    })
}

/// The calls of one choice, put together from their pieces as they come.
#[derive(Debug, Default)]
pub struct CollectedCalls {
    calls: Vec<v1::ToolCall>,
}

impl CollectedCalls {
    pub fn push(&mut self, pieces: &[v1::ToolCallDelta]) {
        switchyard_proto::assemble_tool_calls(&mut self.calls, pieces);
    }

    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    /// A message's `tool_calls`.
    pub fn to_json(&self) -> Value {
        self.calls
            .iter()
            .map(|call| {
                json!({
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                })
            })
            .collect()
    }
}

/// One streamed piece of a call, as OpenAI sends it in `delta.tool_calls`: the first piece
/// has the call's `id`, `type` and `function.name`.
#[derive(Debug, Serialize)]
pub struct DeltaCall<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: DeltaFunction<'a>,
}

#[derive(Debug, Serialize)]
struct DeltaFunction<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

impl<'a> From<&'a v1::ToolCallDelta> for DeltaCall<'a> {
    fn from(delta: &'a v1::ToolCallDelta) -> Self {
        let first = !delta.id.is_empty() || !delta.name.is_empty();
        DeltaCall {
            index: delta.index,
            id: (!delta.id.is_empty()).then_some(delta.id.as_str()),
            kind: first.then_some("function"),
            function: DeltaFunction {
                name: (!delta.name.is_empty()).then_some(delta.name.as_str()),
                arguments: &delta.arguments,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_translate_and_name_the_field_at_fault() {
        let value = json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather", "parameters": {"type": "object"}, "strict": true}},
            {"type": "function", "function": {"name": "now"}}]);
        let tools = tools(Some(&value)).expect("valid");
        assert_eq!(tools[0].name, "get_weather");
        assert_eq!(tools[0].parameters_json, r#"{"type":"object"}"#);
        assert_eq!(tools[1].parameters_json, "");
        for (value, field) in [
            (json!({}), "tools"),
            (json!([{"type": "web_search"}]), "tools[0].type"),
            (json!([{"type": "function"}]), "tools[0].function"),
            (
                json!([{"type": "function", "function": {}}]),
                "tools[0].function.name",
            ),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": []}}]),
                "tools[0].function.parameters",
            ),
        ] {
            let error = super::tools(Some(&value)).expect_err("invalid");
            assert_eq!(error.param.as_deref(), Some(field), "{value}");
        }
    }

    #[test]
    fn tool_choice_takes_every_openai_form() {
        let choice = |c: Value, p: Value| tool_choice(Some(&c), Some(&p));
        assert_eq!(tool_choice(None, None).unwrap(), None);
        let required = choice(json!("required"), Value::Null).unwrap().unwrap();
        assert_eq!(required.mode(), v1::ToolChoiceMode::Required);
        let named = choice(
            json!({"type": "function", "function": {"name": "f"}}),
            json!(false),
        )
        .unwrap()
        .unwrap();
        assert_eq!((named.function.as_str(), named.single_call), ("f", true));
        let single = tool_choice(None, Some(&json!(false))).unwrap().unwrap();
        assert_eq!(single.mode(), v1::ToolChoiceMode::Auto);
        for (c, p, field) in [
            (json!("sometimes"), Value::Null, "tool_choice"),
            (
                json!({"type": "function"}),
                Value::Null,
                "tool_choice.function.name",
            ),
            (json!({"type": "tool"}), Value::Null, "tool_choice.type"),
            (json!("auto"), json!("no"), "parallel_tool_calls"),
        ] {
            let error = choice(c, p).expect_err("invalid");
            assert_eq!(error.param.as_deref(), Some(field));
        }
    }

    #[test]
    fn pieces_of_calls_collect_into_whole_calls() {
        let mut calls = CollectedCalls::default();
        let piece = |index, id: &str, name: &str, arguments: &str| v1::ToolCallDelta {
            index,
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        };
        calls.push(&[piece(0, "call_a", "f", ""), piece(0, "", "", "{\"x\":")]);
        calls.push(&[piece(1, "call_b", "g", "{}"), piece(0, "", "", "1}")]);
        assert_eq!(
            calls.to_json(),
            json!([
                {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
            ])
        );
        let first = serde_json::to_value(DeltaCall::from(&piece(0, "call_a", "f", ""))).unwrap();
        assert_eq!(
            first,
            json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}})
        );
        let later = serde_json::to_value(DeltaCall::from(&piece(0, "", "", "1}"))).unwrap();
        assert_eq!(later, json!({"index": 0, "function": {"arguments": "1}"}}));
    }
}
