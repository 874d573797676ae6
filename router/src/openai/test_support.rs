//! What the HTTP doors' stream tests share: frames as the dispatcher sends them, and a
//! streamed response read back as its named events.

use axum::response::Response;
use serde_json::Value;
use switchyard_proto::v1::{self, server_frame::Frame};

use super::choices::ChoiceFrames;

/// `frames` as one choice's frames from the dispatcher.
pub fn frames(frames: Vec<Frame>) -> ChoiceFrames {
    Box::pin(futures::stream::iter(
        frames
            .into_iter()
            .map(|frame| (0, Ok(v1::ServerFrame { frame: Some(frame) }))),
    ))
}

/// A `Tokens` frame with `text` and pieces of tool calls.
pub fn tokens(text: &str, calls: Vec<v1::ToolCallDelta>) -> Frame {
    Frame::Tokens(v1::Tokens {
        text: text.into(),
        tool_calls: calls,
        ..Default::default()
    })
}

/// A piece of tool call `index`.
pub fn piece(index: u32, id: &str, name: &str, arguments: &str) -> v1::ToolCallDelta {
    v1::ToolCallDelta {
        index,
        id: id.into(),
        name: name.into(),
        arguments: arguments.into(),
    }
}

/// Every event of a streamed response whose events are named (`event:` then `data:`): the
/// name and the data.
pub async fn named_events(response: Response) -> Vec<(String, Value)> {
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("the body");
    std::str::from_utf8(&body)
        .expect("utf-8")
        .split_terminator("\n\n")
        .map(|event| {
            let (name, data) = event.split_once('\n').expect("two lines");
            let name = name.strip_prefix("event: ").expect("an event name");
            let data = data.strip_prefix("data: ").expect("a data line");
            (name.to_string(), serde_json::from_str(data).expect("JSON"))
        })
        .collect()
}
