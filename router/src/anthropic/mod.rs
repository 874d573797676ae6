//! Anthropic's Messages API, `POST /v1/messages`, on the router's HTTP port: what Anthropic's
//! SDKs and the coding agents built on them speak. A request runs on the same dispatcher path
//! as a chat completion (see [`request`] for how its content blocks map); the answer is a
//! `message` whose `content` holds the model's `text` and `tool_use` blocks, whole or as the
//! API's stream events (`message_start`, `content_block_start` / `_delta` / `_stop`,
//! `message_delta`, `message_stop`). Errors take the API's shape (`{"type": "error",
//! "error": {"type", "message"}}`), with the statuses its clients retry on.

mod request;

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use serde::Serialize;
use serde_json::{Value, json};
use switchyard_proto::v1::{self, server_frame::Frame};

use crate::dispatch::Dispatcher;
use crate::openai::blocks::{Block, Blocks, Body as BlockBody, Change, Status};
use crate::openai::choices::ChoiceFrames;
use crate::openai::handlers::{self, Call, MESSAGES_ROUTE};
use crate::openai::tokenize;
use crate::openai::{ApiError, wire};
use request::{FieldNames, MessagesRequest};

pub async fn messages(call: Call) -> Response {
    call.answer(MESSAGES_ROUTE, None, respond).await
}

/// Reads a request body.
pub(crate) fn read_body(body: &[u8]) -> Result<request::Read, ApiError> {
    wire::typed::<MessagesRequest>(&wire::json_object(body)?)?.read()
}

/// `POST /v1/messages/count_tokens`: the prompt tokens a Messages request would take — the
/// conversation, system and tools through the model's chat template, counted with the
/// workers' own tokenizer (`{"input_tokens": n}`). Agents ask it to keep a conversation
/// within the context. `max_tokens` is not needed here.
pub async fn count_tokens(
    State(dispatcher): State<Arc<Dispatcher>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match count(&dispatcher, body).await {
        Ok(tokens) => axum::Json(json!({"input_tokens": tokens})).into_response(),
        Err(error) => error_response(&error),
    }
}

async fn count(
    dispatcher: &Dispatcher,
    body: Result<Bytes, BytesRejection>,
) -> Result<usize, ApiError> {
    let body = handlers::read_body(body)?;
    let mut request = wire::typed::<MessagesRequest>(&wire::json_object(&body)?)?;
    request.max_tokens.get_or_insert(1);
    let mut read = request.read()?;
    // Checked as any request is; it runs under no id, being counted only.
    read.request.request_id = "count-tokens".into();
    let name_fields = |e: ApiError| e.renaming_param(|f| read.fields.rename(f));
    switchyard_proto::validate_generate_request(&read.request, &dispatcher.config.limits)
        .map_err(|e| name_fields(ApiError::from(&crate::error::DispatchError::from(e))))?;
    let model = &read.request.model;
    tokenize::served(dispatcher, model)?;
    dispatcher
        .links
        .tokenizers()
        .tokenize_off_runtime(&read.request)
        .await
        .map(|ids| ids.len())
        .ok_or_else(|| tokenize::no_tokenizer(model))
}

async fn respond(call: Call, id: String) -> Result<Response, ApiError> {
    let Call {
        dispatcher,
        tenant,
        headers,
        body,
    } = call;
    let body = handlers::read_body(body)?;
    let read = read_body(&body)?;
    let fields = read.fields;
    let name_fields = |e: ApiError| e.renaming_param(|f| fields.rename(f));
    let (placed, mut frames) = handlers::place_one(
        &dispatcher,
        tenant,
        &headers,
        read.request,
        Some("max_tokens"),
        id,
    )
    .await
    .map_err(name_fields)?;
    let message = Message {
        id: placed.id.clone(),
        model: placed.model.clone(),
        blocks: Blocks::default(),
    };
    let mut http = if read.stream {
        // The headers wait for the first frame, so a request that fails before producing
        // anything gets its HTTP status.
        let first = handlers::next_frame_of_one(&mut frames)
            .await
            .map_err(name_fields)?;
        if let Frame::Failed(failed) = &first {
            return Err(name_fields(ApiError::from_failed(failed)));
        }
        stream(message, fields, first, frames)
    } else {
        whole(message, frames).await.map_err(name_fields)?
    };
    placed.tag(&mut http);
    Ok(http)
}

/// The answer being written.
struct Message {
    id: String,
    model: String,
    blocks: Blocks,
}

/// The API's `stop_reason` and `stop_sequence` for a finished generation. A stop sequence
/// the engine did not name (a gateway's upstream says only "stop") reads `end_turn`.
fn stop_reason(finished: &v1::Finished) -> (&'static str, Value) {
    match v1::FinishReason::try_from(finished.reason).unwrap_or(v1::FinishReason::Unspecified) {
        v1::FinishReason::Length => ("max_tokens", Value::Null),
        v1::FinishReason::ToolCalls => ("tool_use", Value::Null),
        _ if !finished.stop_sequence.is_empty() => (
            "stop_sequence",
            Value::from(finished.stop_sequence.as_str()),
        ),
        _ => ("end_turn", Value::Null),
    }
}

/// `usage` as the API counts it: `input_tokens` are those not read from the cache.
#[derive(Serialize)]
struct Usage {
    input_tokens: u32,
    output_tokens: u32,
    cache_creation_input_tokens: u32,
    cache_read_input_tokens: u32,
}

impl From<v1::Usage> for Usage {
    fn from(u: v1::Usage) -> Self {
        Usage {
            input_tokens: u.prompt_tokens.saturating_sub(u.cached_prompt_tokens),
            output_tokens: u.completion_tokens,
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: u.cached_prompt_tokens,
        }
    }
}

/// A content block as the API shows it: `text`, or `tool_use` with its `input` (the
/// arguments as an object; `{}` when the output bound cut them short of valid JSON — the
/// `stop_reason` then says `max_tokens`).
fn content_block(block: &Block) -> Value {
    match &block.body {
        BlockBody::Text(text) => json!({"type": "text", "text": text}),
        BlockBody::Call {
            call_id,
            name,
            arguments,
            ..
        } => {
            let input = serde_json::from_str::<Value>(arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            json!({"type": "tool_use", "id": call_id, "name": name, "input": input})
        }
    }
}

/// Collects the whole generation into one message.
async fn whole(mut message: Message, mut frames: ChoiceFrames) -> Result<Response, ApiError> {
    let mut changes = Vec::new();
    loop {
        match handlers::next_frame_of_one(&mut frames).await? {
            Frame::Tokens(tokens) => {
                message.blocks.text(&tokens.text, &mut changes);
                message.blocks.calls(&tokens.tool_calls, &mut changes);
            }
            Frame::Finished(finished) => {
                let content: Vec<Value> = message.blocks.all().iter().map(content_block).collect();
                let (stop_reason, stop_sequence) = stop_reason(&finished);
                let body = json!({
                    "id": message.id,
                    "type": "message",
                    "role": "assistant",
                    "model": message.model,
                    "content": content,
                    "stop_reason": stop_reason,
                    "stop_sequence": stop_sequence,
                    "usage": Usage::from(finished.usage.unwrap_or_default()),
                });
                return Ok(axum::Json(body).into_response());
            }
            Frame::Failed(failed) => return Err(ApiError::from_failed(&failed)),
            Frame::Accepted(_) | Frame::Moved(_) | Frame::Rejected(_) => {}
        }
    }
}

/// The streamed message. The body owns the dispatcher's receiver: a client that goes away
/// cancels the generation.
fn stream(message: Message, fields: FieldNames, first: Frame, frames: ChoiceFrames) -> Response {
    let mut events = Events {
        message,
        fields,
        frames,
        changes: Vec::new(),
        pending: VecDeque::new(),
        done: false,
    };
    // Usage is known at the end; `message_delta` carries it whole (the SDKs take its
    // `input_tokens` over `message_start`'s).
    let start = json!({
        "type": "message_start",
        "message": {
            "id": events.message.id, "type": "message", "role": "assistant",
            "model": events.message.model, "content": [], "stop_reason": Value::Null,
            "stop_sequence": Value::Null,
            "usage": {"input_tokens": 0, "output_tokens": 0,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        },
    });
    events.push("message_start", &start);
    events.on_frame(first);
    crate::openai::stream::event_stream(futures::stream::unfold(events, |mut events| async move {
        Some((events.next().await?, events))
    }))
}

struct Events {
    message: Message,
    fields: FieldNames,
    frames: ChoiceFrames,
    changes: Vec<Change>,
    pending: VecDeque<Bytes>,
    done: bool,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: usize,
    delta: Delta<'a>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Delta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

impl Events {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some(bytes);
            }
            if self.done {
                return None;
            }
            match handlers::next_frame_of_one(&mut self.frames).await {
                Ok(frame) => self.on_frame(frame),
                Err(error) => self.fail(error),
            }
        }
    }

    /// Queues `event: <kind>` with `data` (which carries the same `type`).
    fn push(&mut self, kind: &str, data: &impl Serialize) {
        let mut bytes = Vec::with_capacity(128);
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(kind.as_bytes());
        bytes.extend_from_slice(b"\ndata: ");
        serde_json::to_writer(&mut bytes, data).expect("serializing to memory cannot fail");
        bytes.extend_from_slice(b"\n\n");
        self.pending.push_back(Bytes::from(bytes));
    }

    /// Turns the blocks' changes into events.
    fn render(&mut self) {
        let changes = std::mem::take(&mut self.changes);
        for change in &changes {
            match *change {
                Change::Opened(index) => {
                    let block = match &self.message.blocks.get(index).body {
                        BlockBody::Text(_) => json!({"type": "text", "text": ""}),
                        BlockBody::Call { call_id, name, .. } => {
                            json!({"type": "tool_use", "id": call_id, "name": name, "input": {}})
                        }
                    };
                    let start = json!({"type": "content_block_start", "index": index,
                                       "content_block": block});
                    self.push("content_block_start", &start);
                }
                Change::Text { block, from, to } => {
                    let delta = match &self.message.blocks.get(block).body {
                        BlockBody::Text(text) => text[from..to].to_string(),
                        BlockBody::Call { .. } => continue,
                    };
                    self.push_delta(block, Delta::TextDelta { text: &delta });
                }
                Change::Arguments { block, from, to } => {
                    let delta = match &self.message.blocks.get(block).body {
                        BlockBody::Call { arguments, .. } => arguments[from..to].to_string(),
                        BlockBody::Text(_) => continue,
                    };
                    self.push_delta(
                        block,
                        Delta::InputJsonDelta {
                            partial_json: &delta,
                        },
                    );
                }
                Change::Closed(index) => {
                    let stop = json!({"type": "content_block_stop", "index": index});
                    self.push("content_block_stop", &stop);
                }
            }
        }
        self.changes = changes;
        self.changes.clear();
    }

    fn push_delta(&mut self, index: usize, delta: Delta<'_>) {
        let event = BlockDelta {
            kind: "content_block_delta",
            index,
            delta,
        };
        self.push("content_block_delta", &event);
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Tokens(tokens) => {
                self.message.blocks.text(&tokens.text, &mut self.changes);
                self.message
                    .blocks
                    .calls(&tokens.tool_calls, &mut self.changes);
                self.render();
            }
            Frame::Finished(finished) => {
                self.message
                    .blocks
                    .close(Status::Completed, &mut self.changes);
                self.render();
                let (stop_reason, stop_sequence) = stop_reason(&finished);
                let delta = json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": Usage::from(finished.usage.unwrap_or_default()),
                });
                self.push("message_delta", &delta);
                self.push("message_stop", &json!({"type": "message_stop"}));
                self.done = true;
            }
            Frame::Failed(failed) => self.fail(ApiError::from_failed(&failed)),
            Frame::Moved(moved) => self
                .pending
                .push_back(crate::openai::stream::moved_comment(&moved)),
            Frame::Accepted(_) | Frame::Rejected(_) => {}
        }
    }

    /// Ends the stream with the API's `error` event (the SDKs raise it).
    fn fail(&mut self, error: ApiError) {
        let error = error.renaming_param(|f| self.fields.rename(f));
        let (_, body) = error_parts(&error);
        self.push("error", &body);
        self.done = true;
    }
}

/// The API's error type and status for an error: its clients retry on 429, 529 and 5xx.
fn error_parts(error: &ApiError) -> (StatusCode, Value) {
    let (status, kind) = match error.status.as_u16() {
        400 | 405 | 408 | 415 | 431 => (error.status, "invalid_request_error"),
        401 => (error.status, "authentication_error"),
        403 => (error.status, "permission_error"),
        404 => (error.status, "not_found_error"),
        413 => (error.status, "request_too_large"),
        429 => (error.status, "rate_limit_error"),
        // No capacity now: the API's "overloaded", which its clients back off from.
        503 => (
            StatusCode::from_u16(529).expect("a valid status"),
            "overloaded_error",
        ),
        504 => (error.status, "timeout_error"),
        _ => (error.status, "api_error"),
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": error.message}});
    (status, body)
}

/// An error as the Messages API answers it, `retry-after` included when the router set one.
pub(crate) fn error_response(error: &ApiError) -> Response {
    let (status, body) = error_parts(error);
    let mut response = (status, axum::Json(body)).into_response();
    let retry_after = error.clone().into_response();
    if let Some(value) = retry_after.headers().get(header::RETRY_AFTER) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, value.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::{frames, named_events, piece, tokens};

    /// Every event of a streamed message that starts with `first` and gets `rest`.
    async fn events(first: Frame, rest: Vec<Frame>) -> Vec<(String, Value)> {
        let message = Message {
            id: "msg_1".into(),
            model: "m".into(),
            blocks: Blocks::default(),
        };
        named_events(stream(message, FieldNames::default(), first, frames(rest))).await
    }

    #[tokio::test]
    async fn text_then_a_call_stream_as_blocks_and_the_usage_comes_last() {
        let finished = Frame::Finished(v1::Finished {
            reason: v1::FinishReason::ToolCalls as i32,
            usage: Some(v1::Usage {
                prompt_tokens: 10,
                completion_tokens: 4,
                cached_prompt_tokens: 6,
            }),
            ..Default::default()
        });
        let events = events(
            tokens(
                "Let me check.",
                vec![piece(0, "call_1", "get", "{\"city\":")],
            ),
            vec![tokens("", vec![piece(0, "", "", "\"Oslo\"}")]), finished],
        )
        .await;
        let names: Vec<_> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        for (name, data) in &events {
            assert_eq!(data["type"], name.as_str());
        }
        assert_eq!(events[1].1["content_block"]["type"], "text");
        assert_eq!(events[2].1["delta"]["text"], "Let me check.");
        assert_eq!(events[4].1["content_block"]["id"], "call_1");
        assert_eq!(events[4].1["index"], 1);
        assert_eq!(events[6].1["delta"]["partial_json"], "\"Oslo\"}");
        let delta = &events[8].1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["input_tokens"], 4);
        assert_eq!(delta["usage"]["cache_read_input_tokens"], 6);
        assert_eq!(delta["usage"]["output_tokens"], 4);
    }

    #[tokio::test]
    async fn a_stop_sequence_the_engine_named_is_the_stop_reason() {
        let finished = |stop: &str| {
            Frame::Finished(v1::Finished {
                reason: v1::FinishReason::Stop as i32,
                stop_sequence: stop.into(),
                ..Default::default()
            })
        };
        let named = events(tokens("The capital is ", vec![]), vec![finished("Paris")]).await;
        let delta = &named[named.len() - 2].1["delta"];
        assert_eq!(delta["stop_reason"], "stop_sequence");
        assert_eq!(delta["stop_sequence"], "Paris");
        let unnamed = events(tokens("Hi.", vec![]), vec![finished("")]).await;
        let delta = &unnamed[unnamed.len() - 2].1["delta"];
        assert_eq!(delta["stop_reason"], "end_turn");
        assert!(delta["stop_sequence"].is_null());
    }

    #[tokio::test]
    async fn a_failure_midway_is_an_error_event() {
        let failed = Frame::Failed(v1::Failed {
            code: tonic::Code::Unavailable as i32,
            message: "worker gone".into(),
            ..Default::default()
        });
        let events = events(tokens("Hel", vec![]), vec![failed]).await;
        let (name, data) = events.last().expect("events");
        assert_eq!(name, "error");
        assert_eq!(data["error"]["type"], "overloaded_error");
    }

    #[test]
    fn errors_take_the_apis_types_and_statuses() {
        let (status, body) = error_parts(&ApiError::invalid("max_tokens", "is required"));
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["message"], "max_tokens: is required");
        let unavailable = ApiError::from_code(tonic::Code::Unavailable, "no worker");
        assert_eq!(error_parts(&unavailable).0.as_u16(), 529);
        let response = error_response(&unavailable);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
    }
}
