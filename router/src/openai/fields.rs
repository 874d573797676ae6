//! The dispatcher names a field of a conversation the chat way (`messages[3].tool_calls[0].name`);
//! doors whose requests are shaped otherwise (the Responses API's input items, Anthropic's
//! content blocks) read such a name apart here and rebuild it in their own words.

/// A chat-shaped field inside one message, read apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageField<'a> {
    /// The message's position in the translated conversation.
    pub message: usize,
    /// The tool call the field is in, when it is in one.
    pub call: Option<usize>,
    /// The rest of the path (`.content`, `.tool_call_id`; in a call `.name`, `.arguments`,
    /// `.id`, without chat's `.function`).
    pub rest: &'a str,
}

/// `field` read apart, `None` when it is not inside a message.
pub fn message_field(field: &str) -> Option<MessageField<'_>> {
    let (message, rest) = field.strip_prefix("messages[")?.split_once(']')?;
    let message = message.parse().ok()?;
    let Some(call) = rest.strip_prefix(".tool_calls[") else {
        return Some(MessageField {
            message,
            call: None,
            rest,
        });
    };
    let (call, rest) = call.split_once(']')?;
    Some(MessageField {
        message,
        call: Some(call.parse().ok()?),
        rest: rest.trim_start_matches(".function"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_fields_read_apart() {
        assert_eq!(
            message_field("messages[3].tool_calls[1].function.arguments"),
            Some(MessageField {
                message: 3,
                call: Some(1),
                rest: ".arguments"
            })
        );
        assert_eq!(
            message_field("messages[0].content"),
            Some(MessageField {
                message: 0,
                call: None,
                rest: ".content"
            })
        );
        assert_eq!(message_field("messages"), None);
        assert_eq!(message_field("messages[x].content"), None);
        assert_eq!(message_field("tools[0].name"), None);
    }
}
