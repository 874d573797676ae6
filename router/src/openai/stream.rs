//! Server-Sent Events as OpenAI clients expect them: one `data: {chunk}` event per token chunk
//! (`choices[].delta` for chat, `choices[].text` for completions), a chunk carrying
//! `finish_reason`, a `usage` chunk with empty `choices` when `stream_options.include_usage`
//! was set, then `data: [DONE]`. A failure midway is sent as `data: {"error": …}` and the
//! stream ends without `[DONE]`.
//!
//! The body owns the dispatcher's output receiver: when the client goes away the server drops
//! the body, the receiver closes, and the dispatcher cancels the generation.

use std::collections::VecDeque;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};
use switchyard_proto::v1::{self, server_frame::Frame};
use tonic::Code;

use super::error::ApiError;
use super::handlers::{Endpoint, Meta};
use super::wire::{self, StreamMode};
use crate::dispatch::FrameReceiver;

/// The streaming response: headers now, events as the dispatcher produces them.
pub fn sse_response(meta: Meta, mode: StreamMode, first: Frame, rx: FrameReceiver) -> Response {
    let mut events = Events {
        meta: meta.clone(),
        mode,
        rx,
        pending: VecDeque::new(),
        done: false,
    };
    if meta.endpoint == Endpoint::Chat {
        // OpenAI opens a chat stream with the assistant role and empty content.
        let opening = events.chunk(json!({"role": "assistant", "content": ""}), None);
        events.push(&opening);
    }
    events.on_frame(first);
    let body = Body::from_stream(futures::stream::unfold(events, |mut events| async move {
        let bytes = events.next().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(bytes), events))
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Ask reverse proxies (nginx) not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    meta.decorate(&mut response);
    response
}

struct Events {
    meta: Meta,
    mode: StreamMode,
    rx: FrameReceiver,
    pending: VecDeque<Bytes>,
    done: bool,
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
            match self.rx.recv().await {
                Some(Ok(v1::ServerFrame { frame: Some(frame) })) => self.on_frame(frame),
                Some(Ok(v1::ServerFrame { frame: None })) => {}
                Some(Err(status)) => self.fail(ApiError::from_status(&status)),
                None => self.fail(ApiError::from_code(
                    Code::Internal,
                    "the request ended without a result",
                )),
            }
        }
    }

    fn push(&mut self, value: &Value) {
        self.pending
            .push_back(Bytes::from(format!("data: {value}\n\n")));
    }

    fn fail(&mut self, error: ApiError) {
        self.push(&error.body());
        self.done = true;
    }

    /// A chunk with one choice: `delta` (chat) or `text` (completions).
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        let m = &self.meta;
        let mut chunk = match m.endpoint {
            Endpoint::Chat => json!({
                "id": m.id,
                "object": "chat.completion.chunk",
                "created": m.created,
                "model": m.model,
                "system_fingerprint": Value::Null,
                "choices": [{
                    "index": 0,
                    "delta": delta,
                    "logprobs": Value::Null,
                    "finish_reason": finish_reason,
                }],
            }),
            Endpoint::Completion => json!({
                "id": m.id,
                "object": "text_completion",
                "created": m.created,
                "model": m.model,
                "system_fingerprint": Value::Null,
                "choices": [{
                    "index": 0,
                    "text": delta,
                    "logprobs": Value::Null,
                    "finish_reason": finish_reason,
                }],
            }),
        };
        if self.mode.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Accepted(_) => {}
            Frame::Tokens(tokens) => {
                if tokens.text.is_empty() {
                    return;
                }
                let delta = match self.meta.endpoint {
                    Endpoint::Chat => json!({"content": tokens.text}),
                    Endpoint::Completion => Value::String(tokens.text),
                };
                let chunk = self.chunk(delta, None);
                self.push(&chunk);
            }
            Frame::Finished(finished) => {
                let empty = match self.meta.endpoint {
                    Endpoint::Chat => json!({}),
                    Endpoint::Completion => Value::String(String::new()),
                };
                let last = self.chunk(empty, Some(wire::finish_reason(finished.reason)));
                self.push(&last);
                if self.mode.include_usage {
                    let mut usage = self.chunk(Value::Null, None);
                    usage["choices"] = json!([]);
                    usage["usage"] = json!(wire::Usage::from(finished.usage));
                    self.push(&usage);
                }
                self.pending
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.done = true;
            }
            // An SSE comment: OpenAI SDKs skip it, a person reading the stream sees the move.
            Frame::Moved(moved) => {
                let line = format!(
                    ": moved from {} ({}) to {} ({}): {}\n\n",
                    moved.from_worker_id,
                    moved.from_pool,
                    moved.to_worker_id,
                    moved.to_pool,
                    moved.reason
                );
                self.pending.push_back(Bytes::from(line));
            }
            Frame::Failed(failed) => {
                self.fail(ApiError::from_code(
                    Code::from_i32(failed.code),
                    &failed.message,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_move_is_an_sse_comment_that_openai_clients_skip() {
        let (tx, rx) = crate::dispatch::frame_channel(4);
        drop(tx);
        let mut events = Events {
            meta: Meta {
                endpoint: Endpoint::Chat,
                id: "chatcmpl-1".into(),
                created: 0,
                model: "m".into(),
                lane: "cost-sensitive".into(),
                pool: "wse".into(),
                worker: "wse-0".into(),
            },
            mode: StreamMode {
                stream: true,
                include_usage: false,
            },
            rx,
            pending: VecDeque::new(),
            done: false,
        };
        events.on_frame(Frame::Moved(v1::Moved {
            request_id: "r".into(),
            from_worker_id: "wse-0".into(),
            from_pool: "wse".into(),
            to_worker_id: "gpu-1".into(),
            to_pool: "gpu".into(),
            reason: "preempt".into(),
        }));
        let line = events.next().await.expect("an event");
        let text = std::str::from_utf8(&line).expect("utf-8");
        // The SSE grammar: a line starting with ':' is a comment; a blank line ends it.
        assert!(text.starts_with(": "), "{text:?}");
        assert!(
            text.ends_with("\n\n") && !text[..text.len() - 2].contains('\n'),
            "{text:?}"
        );
        assert!(
            text.contains("gpu-1") && text.contains("preempt"),
            "{text:?}"
        );
    }
}
