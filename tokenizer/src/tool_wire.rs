//! The tools of a request as the wire carries them (`switchyard.v1`), in the form the tools
//! module renders and constrains: one conversion for the router, which renders prompts, and for
//! the engine, which renders them when the router did not and constrains its answers.

use switchyard_proto::v1;

use crate::tools::{ToolCallText, ToolChoice, ToolSet, ToolSpec, ToolTurn};

/// A request's tools that cannot be used: `field` is the wire field at fault
/// (`tools[2].parameters_json`, `tool_choice.function`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct WireToolError {
    pub field: String,
    pub detail: String,
}

impl ToolSet {
    /// `tools` and `choice` (`GenerateRequest.tools` / `.tool_choice`). The router validated
    /// them; a worker checks again what it relies on: every schema a JSON object, a named
    /// function one of the tools.
    pub fn from_wire(
        tools: &[v1::Tool],
        choice: Option<&v1::ToolChoice>,
    ) -> Result<Self, WireToolError> {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, tool)| {
                let refused = |detail: String| WireToolError {
                    field: format!("tools[{i}].parameters_json"),
                    detail,
                };
                let parameters = if tool.parameters_json.trim().is_empty() {
                    serde_json::json!({"type": "object"})
                } else {
                    serde_json::from_str(&tool.parameters_json)
                        .map_err(|e| refused(format!("not JSON: {e}")))?
                };
                if !parameters.is_object() {
                    return Err(refused("must be a JSON Schema object".into()));
                }
                Ok(ToolSpec {
                    name: tool.name.clone(),
                    description: tool.description.clone(),
                    parameters,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let choice = choice.cloned().unwrap_or_default();
        if !choice.function.is_empty() && !tools.iter().any(|t| t.name == choice.function) {
            return Err(WireToolError {
                field: "tool_choice.function".into(),
                detail: format!("{:?} is not one of tools", choice.function),
            });
        }
        let mode = if choice.function.is_empty() {
            match choice.mode() {
                v1::ToolChoiceMode::Auto => ToolChoice::Auto,
                v1::ToolChoiceMode::None => ToolChoice::None,
                v1::ToolChoiceMode::Required => ToolChoice::Required,
            }
        } else {
            ToolChoice::Function(choice.function)
        };
        Ok(ToolSet {
            tools,
            choice: mode,
            single_call: choice.single_call,
        })
    }
}

impl ToolTurn {
    /// A chat message's fields, as `ChatMessage` (or an engine's message) has them.
    pub fn from_wire(
        role: &str,
        content: &str,
        tool_calls: &[v1::ToolCall],
        tool_call_id: &str,
    ) -> Self {
        ToolTurn {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: tool_calls
                .iter()
                .map(|call| ToolCallText {
                    id: call.id.clone(),
                    name: call.name.clone(),
                    arguments: call.arguments.clone(),
                })
                .collect(),
            tool_call_id: tool_call_id.to_string(),
        }
    }
}

/// Whether a conversation needs the tools module to render: it offers tools, or its history
/// holds calls or their results (which a plain template would drop or mangle). `turns` are
/// each message's role and whether it carries calls, whichever message type holds them.
pub fn uses_tools<'a>(
    offers_tools: bool,
    turns: impl IntoIterator<Item = (&'a str, bool)>,
) -> bool {
    offers_tools
        || turns
            .into_iter()
            .any(|(role, calls)| calls || role == "tool")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_tools_and_choices_convert() {
        let tools = [
            v1::Tool {
                name: "f".into(),
                parameters_json: r#"{"type":"object","properties":{"x":{"type":"integer"}}}"#
                    .into(),
                ..Default::default()
            },
            v1::Tool {
                name: "g".into(),
                ..Default::default()
            },
        ];
        let set = ToolSet::from_wire(&tools, None).unwrap();
        assert_eq!(set.choice, ToolChoice::Auto);
        assert_eq!(
            set.tools[0].parameters["properties"]["x"]["type"],
            "integer"
        );
        assert_eq!(
            set.tools[1].parameters,
            serde_json::json!({"type": "object"})
        );
        let named = v1::ToolChoice {
            mode: v1::ToolChoiceMode::None as i32,
            function: "g".into(),
            single_call: true,
        };
        let set = ToolSet::from_wire(&tools, Some(&named)).unwrap();
        assert_eq!(set.choice, ToolChoice::Function("g".into()));
        assert!(set.single_call);
        let broken = [v1::Tool {
            name: "f".into(),
            parameters_json: "{".into(),
            ..Default::default()
        }];
        let error = ToolSet::from_wire(&broken, None).unwrap_err();
        assert_eq!(error.field, "tools[0].parameters_json");
        let missing = v1::ToolChoice {
            function: "h".into(),
            ..Default::default()
        };
        let error = ToolSet::from_wire(&tools, Some(&missing)).unwrap_err();
        assert_eq!(error.field, "tool_choice.function");
    }

    #[test]
    fn a_history_with_calls_or_results_uses_tools() {
        let user = v1::ChatMessage {
            role: "user".into(),
            ..Default::default()
        };
        let uses = |offers: bool, messages: &[v1::ChatMessage]| {
            uses_tools(
                offers,
                messages
                    .iter()
                    .map(|m| (m.role.as_str(), !m.tool_calls.is_empty())),
            )
        };
        assert!(!uses(false, std::slice::from_ref(&user)));
        assert!(uses(true, std::slice::from_ref(&user)));
        let result = v1::ChatMessage {
            role: "tool".into(),
            tool_call_id: "c".into(),
            ..Default::default()
        };
        assert!(uses(false, &[user, result]));
    }
}
