//! Server-Sent Events as OpenAI clients expect them: one `data: {chunk}` event per token chunk
//! of a choice (`choices[].delta` for chat, `choices[].text` for completions), a chunk carrying
//! each choice's `finish_reason`, a `usage` chunk with empty `choices` when
//! `stream_options.include_usage` was set, then `data: [DONE]` once every choice has finished.
//! A failure midway is sent as `data: {"error": …}` and the stream ends without `[DONE]`.
//!
//! The body owns the dispatcher's output receivers: when the client goes away the server drops
//! the body, the receivers close, and the dispatcher cancels the generations.

use std::collections::VecDeque;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures::{Stream, StreamExt as _};
use serde::Serialize;
use switchyard_proto::v1::{self, server_frame::Frame};
use tonic::Code;

use super::choices::{self, ChoiceFrames};
use super::error::ApiError;
use super::handlers::{Endpoint, Meta};
use super::logprobs::Logprobs;
use super::tools::DeltaCall;
use super::wire::{self, StreamMode};

/// The streaming response: headers now, events as the dispatcher produces them. `first` is
/// the first frame of choice `first.0`; `frames` has the rest of every choice's.
pub fn sse_response(
    meta: Meta,
    mode: StreamMode,
    first: (u32, Frame),
    frames: ChoiceFrames,
) -> Response {
    let mut events = Events::new(meta.clone(), mode, frames);
    if meta.endpoint == Endpoint::Chat {
        // OpenAI opens a chat stream with the assistant role and empty content, per choice.
        for index in 0..mode.choices {
            let opening = Choice {
                index,
                delta: Some(Delta {
                    role: Some("assistant"),
                    content: Some(""),
                    tool_calls: None,
                }),
                text: None,
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
            };
            let usage = events.mode.include_usage.then_some(None);
            let opening = event(&events.chunk(&[opening], usage));
            events.pending.push_back(opening);
        }
    }
    events.on_frame(first.0, first.1);
    let mut response = event_stream(futures::stream::unfold(events, |mut events| async move {
        Some((events.next().await?, events))
    }));
    meta.decorate(&mut response);
    response
}

/// A generation's move to another worker as an SSE comment: SDKs skip it, a person reading
/// the stream sees the move.
pub(crate) fn moved_comment(moved: &v1::Moved) -> Bytes {
    Bytes::from(format!(
        ": moved from {} ({}) to {} ({}): {}\n\n",
        moved.from_worker_id, moved.from_pool, moved.to_worker_id, moved.to_pool, moved.reason
    ))
}

/// A `text/event-stream` response whose body is `events`, as they come.
pub(crate) fn event_stream(events: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let body = Body::from_stream(events.map(Ok::<Bytes, std::convert::Infallible>));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Ask reverse proxies (nginx) not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// `data: {json}` and the blank line that ends the event, serialized straight into its bytes: a
/// chunk goes out per token, and building a JSON tree for each cost a score of allocations.
fn event(value: &impl Serialize) -> Bytes {
    let mut event = Vec::with_capacity(256);
    event.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut event, value).expect("serializing to memory cannot fail");
    event.extend_from_slice(b"\n\n");
    Bytes::from(event)
}

/// How a choice ended: OpenAI's `finish_reason`, and the stop sequence that ended it when one
/// did (vLLM's `stop_reason`, which a wafer-scale gateway in front of this door reads back).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ending<'a> {
    pub reason: &'static str,
    pub stop_sequence: Option<&'a str>,
}

impl<'a> Ending<'a> {
    pub(crate) fn of(finished: &'a v1::Finished) -> Self {
        Self {
            reason: wire::finish_reason(finished.reason),
            stop_sequence: (!finished.stop_sequence.is_empty())
                .then_some(finished.stop_sequence.as_str()),
        }
    }
}

/// One streamed chunk, as OpenAI sends it.
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<&'a str>,
    /// A chat completion's: the lane it runs in, in OpenAI's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'static str>,
    choices: &'a [Choice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<wire::Usage>>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    /// A chat completion's.
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    /// A (text) completion's.
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    /// `null` unless the client asked for log probabilities.
    logprobs: Option<serde_json::Value>,
    finish_reason: Option<&'a str>,
    /// vLLM's extension, on the last chunk when a stop sequence ended the choice: which.
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<DeltaCall<'a>>>,
}

struct Events {
    meta: Meta,
    mode: StreamMode,
    frames: ChoiceFrames,
    pending: VecDeque<Bytes>,
    done: bool,
    /// Per choice, by index.
    choices: Vec<ChoiceState>,
    /// Choices still generating.
    open: usize,
}

#[derive(Default)]
struct ChoiceState {
    logprobs: Logprobs,
    /// Log probabilities of tokens whose text is not out yet (held back by a stop sequence or
    /// an incomplete character): they go with the next chunk.
    unsent_logprobs: Vec<v1::TokenLogprobs>,
    /// The choice's usage, once it has finished.
    usage: Option<v1::Usage>,
}

impl Events {
    fn new(meta: Meta, mode: StreamMode, frames: ChoiceFrames) -> Self {
        let choices = (0..mode.choices).map(|_| ChoiceState::default()).collect();
        Self {
            meta,
            mode,
            frames,
            pending: VecDeque::new(),
            done: false,
            choices,
            open: mode.choices as usize,
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(bytes) = self.pending.pop_front() {
                return Some(bytes);
            }
            if self.done {
                return None;
            }
            match self.frames.next().await {
                Some((index, Ok(v1::ServerFrame { frame: Some(frame) }))) => {
                    self.on_frame(index, frame)
                }
                Some((_, Ok(v1::ServerFrame { frame: None }))) => {}
                Some((_, Err(status))) => self.fail(ApiError::from_status(&status)),
                None => self.fail(ApiError::from_code(
                    Code::Internal,
                    "the request ended without a result",
                )),
            }
        }
    }

    fn fail(&mut self, error: ApiError) {
        self.pending.push_back(event(&error.body()));
        self.done = true;
    }

    /// Queues a chunk with choice `index`: `text` as the chat `delta`'s content or the
    /// completion's `text` (`None`: an empty delta), and how the choice ended.
    fn push_chunk(&mut self, index: u32, text: Option<&str>, end: Option<Ending<'_>>) {
        self.push_delta(index, text, &[], end);
    }

    /// [`Self::push_chunk`] with pieces of tool calls in the chat `delta` (chat only: text
    /// completions take no tools).
    fn push_delta(
        &mut self,
        index: u32,
        text: Option<&str>,
        calls: &[v1::ToolCallDelta],
        end: Option<Ending<'_>>,
    ) {
        let (delta, text) = match self.meta.endpoint {
            Endpoint::Chat => (
                Some(Delta {
                    role: None,
                    content: text,
                    tool_calls: (!calls.is_empty())
                        .then(|| calls.iter().map(DeltaCall::from).collect()),
                }),
                None,
            ),
            Endpoint::Completion => (None, Some(text.unwrap_or(""))),
        };
        let endpoint = self.meta.endpoint;
        let state = &mut self.choices[index as usize];
        let logprobs = self
            .mode
            .logprobs
            .then(|| std::mem::take(&mut state.unsent_logprobs))
            .filter(|tokens| !tokens.is_empty())
            .map(|tokens| state.logprobs.render(endpoint, &tokens));
        let choice = Choice {
            index,
            delta,
            text,
            logprobs,
            finish_reason: end.map(|e| e.reason),
            stop_reason: end.and_then(|e| e.stop_sequence),
        };
        let usage = self.mode.include_usage.then_some(None);
        let event = event(&self.chunk(&[choice], usage));
        self.pending.push_back(event);
    }

    /// The chunk around `choices`; `usage` absent unless the client asked for usage (then
    /// `null` on every chunk but the last, which has it and no choices).
    fn chunk<'a>(
        &'a self,
        choices: &'a [Choice<'a>],
        usage: Option<Option<wire::Usage>>,
    ) -> Chunk<'a> {
        let m = &self.meta;
        Chunk {
            id: &m.id,
            object: match m.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completion => "text_completion",
            },
            created: m.created,
            model: &m.model,
            system_fingerprint: None,
            service_tier: (m.endpoint == Endpoint::Chat).then(|| wire::service_tier_of(&m.lane)),
            choices,
            usage,
        }
    }

    /// Queues an echoing text completion's first chunk of choice `index`: its prompt's text,
    /// and the prompt's log probabilities when asked.
    fn push_prompt(&mut self, index: u32, prompt: &[v1::TokenLogprobs]) {
        let state = &mut self.choices[index as usize];
        let logprobs = self
            .mode
            .logprobs
            .then(|| state.logprobs.completion(prompt, &[]));
        let text = super::logprobs::prompt_text(prompt);
        let choice = Choice {
            index,
            delta: None,
            text: Some(&text),
            logprobs,
            finish_reason: None,
            stop_reason: None,
        };
        let usage = self.mode.include_usage.then_some(None);
        let event = event(&self.chunk(&[choice], usage));
        self.pending.push_back(event);
    }

    /// Handles a frame of choice `index`.
    fn on_frame(&mut self, index: u32, frame: Frame) {
        let Some(state) = self.choices.get_mut(index as usize) else {
            return self.fail(ApiError::from_code(
                Code::Internal,
                "a frame of a choice the request did not ask for",
            ));
        };
        match frame {
            // HTTP sends no client frames, so none is rejected.
            Frame::Accepted(_) | Frame::Rejected(_) => {}
            Frame::Tokens(tokens) => {
                if !tokens.prompt_logprobs.is_empty() {
                    self.push_prompt(index, &tokens.prompt_logprobs);
                }
                let state = &mut self.choices[index as usize];
                state.unsent_logprobs.extend(tokens.logprobs);
                if !tokens.text.is_empty() {
                    self.push_chunk(index, Some(&tokens.text), None);
                }
                if !tokens.tool_calls.is_empty() {
                    self.push_delta(index, None, &tokens.tool_calls, None);
                }
            }
            Frame::Finished(finished) => {
                // Tokens whose text never came out (a stop sequence's) are not listed.
                state.unsent_logprobs.clear();
                state.usage = Some(finished.usage.unwrap_or_default());
                let end = Ending::of(&finished);
                self.push_chunk(index, None, Some(end));
                self.open -= 1;
                if self.open > 0 {
                    return;
                }
                if self.mode.include_usage {
                    let usages: Vec<_> = self.choices.iter().map(|c| c.usage).collect();
                    let usage = Some(Some(choices::usage(&usages, self.mode.per_prompt)));
                    let event = event(&self.chunk(&[], usage));
                    self.pending.push_back(event);
                }
                self.pending
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                self.done = true;
            }
            Frame::Moved(moved) => self.pending.push_back(moved_comment(&moved)),
            Frame::Failed(failed) => self.fail(ApiError::from_failed(&failed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn meta(endpoint: Endpoint) -> Meta {
        Meta {
            endpoint,
            id: "chatcmpl-1".into(),
            request_id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            lane: "cost-sensitive".into(),
            pool: "wse".into(),
            worker: "wse-0".into(),
        }
    }

    /// Every event of a stream that starts with `first` and gets `rest`, as JSON (`[DONE]` as
    /// a string).
    /// A stream of one choice.
    fn one_choice(include_usage: bool, logprobs: bool) -> StreamMode {
        StreamMode {
            stream: true,
            include_usage,
            logprobs,
            max_tokens_field: None,
            choices: 1,
            per_prompt: 1,
            score_only: false,
            affinity_field: "",
        }
    }

    async fn stream_of(
        endpoint: Endpoint,
        include_usage: bool,
        first: Frame,
        rest: Vec<Frame>,
    ) -> Vec<Value> {
        let mode = StreamMode {
            stream: true,
            include_usage,
            logprobs: false,
            max_tokens_field: None,
            choices: 1,
            per_prompt: 1,
            score_only: false,
            affinity_field: "",
        };
        stream_with(endpoint, mode, first, rest).await
    }

    async fn stream_with(
        endpoint: Endpoint,
        mode: StreamMode,
        first: Frame,
        rest: Vec<Frame>,
    ) -> Vec<Value> {
        let rest = rest.into_iter().map(|frame| (0, frame)).collect();
        stream_of_choices(endpoint, mode, (0, first), rest).await
    }

    /// Every event of a stream of `mode.choices` choices that starts with `first` and gets
    /// `rest`, each frame with its choice's index.
    async fn stream_of_choices(
        endpoint: Endpoint,
        mode: StreamMode,
        first: (u32, Frame),
        rest: Vec<(u32, Frame)>,
    ) -> Vec<Value> {
        let frames = futures::stream::iter(
            rest.into_iter()
                .map(|(index, frame)| (index, Ok(v1::ServerFrame { frame: Some(frame) }))),
        );
        let response = sse_response(meta(endpoint), mode, first, Box::pin(frames));
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("the body");
        let body = std::str::from_utf8(&body).expect("utf-8");
        body.split_terminator("\n\n")
            .map(|event| {
                let data = event.strip_prefix("data: ").expect("a data event");
                serde_json::from_str(data).unwrap_or_else(|_| Value::String(data.into()))
            })
            .collect()
    }

    fn tokens(text: &str) -> Frame {
        Frame::Tokens(v1::Tokens {
            request_id: "r".into(),
            text: text.into(),
            ..Default::default()
        })
    }

    fn finished() -> Frame {
        Frame::Finished(v1::Finished {
            request_id: "r".into(),
            reason: v1::FinishReason::Length as i32,
            usage: Some(v1::Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_prompt_tokens: 3,
            }),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn log_probabilities_go_out_with_the_text_of_their_tokens() {
        let with_logprobs = |text: &str, tokens: &[(&str, f32)]| {
            Frame::Tokens(v1::Tokens {
                request_id: "r".into(),
                text: text.into(),
                logprobs: tokens
                    .iter()
                    .map(|(t, l)| v1::TokenLogprobs {
                        chosen: Some(v1::TokenLogprob {
                            token_id: 1,
                            token: t.as_bytes().to_vec(),
                            logprob: *l,
                        }),
                        top: vec![],
                    })
                    .collect(),
                ..Default::default()
            })
        };
        let mode = one_choice(false, true);
        // The second token's text is held back (a stop sequence might start there): its log
        // probability goes out with the next text.
        let events = stream_with(
            Endpoint::Chat,
            mode,
            with_logprobs("He", &[("He", -0.5)]),
            vec![
                with_logprobs("", &[("ll", -1.0)]),
                with_logprobs("llo", &[("o", -2.0)]),
                finished(),
            ],
        )
        .await;
        let listed = |event: &Value| -> Vec<(String, f64)> {
            event["choices"][0]["logprobs"]["content"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    (
                        e["token"].as_str().unwrap_or_default().to_string(),
                        e["logprob"].as_f64().unwrap_or_default(),
                    )
                })
                .collect()
        };
        // Opening chunk (no logprobs), "He", "llo", the finish chunk, [DONE].
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(events[0]["choices"][0]["logprobs"], Value::Null);
        assert_eq!(listed(&events[1]), [("He".to_string(), -0.5)]);
        assert_eq!(
            listed(&events[2]),
            [("ll".to_string(), -1.0), ("o".to_string(), -2.0)]
        );
        assert!(listed(&events[3]).is_empty());

        // A stop sequence: its token's text is held back, then dropped at the end; so is its
        // log probability, and the tokens listed add up to the text.
        let events = stream_with(
            Endpoint::Chat,
            mode,
            with_logprobs(" four,", &[(" four", -0.5), (",", -0.25)]),
            vec![with_logprobs("", &[(" six", -1.0)]), finished()],
        )
        .await;
        let all: Vec<(String, f64)> = events.iter().flat_map(listed).collect();
        assert_eq!(all, [(" four".to_string(), -0.5), (",".to_string(), -0.25)]);
        assert_eq!(
            events[2]["choices"][0]["logprobs"],
            Value::Null,
            "{events:?}"
        );

        // A text completion's arrays, offsets running on across chunks.
        let events = stream_with(
            Endpoint::Completion,
            mode,
            with_logprobs("He", &[("He", -0.5)]),
            vec![with_logprobs("llo", &[("llo", -1.0)]), finished()],
        )
        .await;
        assert_eq!(
            events[1]["choices"][0]["logprobs"]["text_offset"],
            json!([2])
        );
        assert_eq!(
            events[1]["choices"][0]["logprobs"]["tokens"],
            json!(["llo"])
        );
    }

    #[tokio::test]
    async fn chat_chunks_are_what_openai_sends() {
        let events = stream_of(Endpoint::Chat, true, tokens("He"), vec![finished()]).await;
        let chunk = |delta: Value, finish_reason: Value| {
            json!({
                "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                "system_fingerprint": null, "service_tier": "flex", "usage": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            })
        };
        assert_eq!(
            events,
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "He"}), Value::Null),
                chunk(json!({}), json!("length")),
                json!({
                    "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
                    "model": "m", "system_fingerprint": null, "service_tier": "flex", "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                              "prompt_tokens_details": {"cached_tokens": 3}},
                }),
                json!("[DONE]"),
            ]
        );
    }

    #[tokio::test]
    async fn tool_calls_stream_as_openai_delta_pieces() {
        let piece = |id: &str, name: &str, arguments: &str| v1::ToolCallDelta {
            index: 0,
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        };
        let calls = |pieces: Vec<v1::ToolCallDelta>| {
            Frame::Tokens(v1::Tokens {
                token_ids: vec![1; pieces.len()],
                tool_calls: pieces,
                ..Default::default()
            })
        };
        let done = Frame::Finished(v1::Finished {
            reason: v1::FinishReason::ToolCalls as i32,
            ..Default::default()
        });
        let events = stream_of(
            Endpoint::Chat,
            false,
            calls(vec![piece("call_1", "get_weather", "")]),
            vec![
                calls(vec![
                    piece("", "", "{\"city\":"),
                    piece("", "", "\"Oslo\"}"),
                ]),
                done,
            ],
        )
        .await;
        let choice = |event: &Value| event["choices"][0].clone();
        assert_eq!(
            choice(&events[1])["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(
            choice(&events[2])["delta"],
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}},
                                  {"index": 0, "function": {"arguments": "\"Oslo\"}"}}]})
        );
        assert_eq!(choice(&events[3])["finish_reason"], "tool_calls");
        assert_eq!(events[4], json!("[DONE]"));
    }

    #[tokio::test]
    async fn completion_chunks_carry_text_and_no_usage_unless_asked() {
        let events = stream_of(
            Endpoint::Completion,
            false,
            tokens("a \"quote\"\n"),
            vec![finished()],
        )
        .await;
        let chunk = |text: &str, finish_reason: Value| {
            json!({
                "id": "chatcmpl-1", "object": "text_completion", "created": 7, "model": "m",
                "system_fingerprint": null,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason}],
            })
        };
        assert_eq!(
            events,
            vec![
                chunk("a \"quote\"\n", Value::Null),
                chunk("", json!("length")),
                json!("[DONE]"),
            ]
        );
    }

    /// An echoing text completion's prompt opens its stream: the prompt's text, and with
    /// `logprobs` its tokens, the first without a log probability (nothing predicts it), then
    /// the generated tokens go on from its end (`text_offset` counting the prompt).
    #[tokio::test]
    async fn an_echoed_prompt_opens_a_completion_stream() {
        let scored = |text: &str, logprob: f32| v1::TokenLogprobs {
            chosen: Some(v1::TokenLogprob {
                token_id: 1,
                token: text.as_bytes().to_vec(),
                logprob,
            }),
            top: Vec::new(),
        };
        let first = Frame::Tokens(v1::Tokens {
            text: " Paris".into(),
            token_ids: vec![9],
            logprobs: vec![scored(" Paris", -0.25)],
            prompt_logprobs: vec![scored("The", 0.0), scored(" capital", -3.5)],
            ..Default::default()
        });
        let mode = one_choice(false, true);
        let events = stream_with(Endpoint::Completion, mode, first, vec![finished()]).await;
        let choice = |event: &Value| event["choices"][0].clone();
        assert_eq!(choice(&events[0])["text"], "The capital");
        assert_eq!(
            choice(&events[0])["logprobs"],
            json!({"tokens": ["The", " capital"], "token_logprobs": [null, -3.5],
                   "top_logprobs": [null, {}], "text_offset": [0, 3]})
        );
        assert_eq!(choice(&events[1])["text"], " Paris");
        assert_eq!(choice(&events[1])["logprobs"]["text_offset"], json!([11]));
    }

    /// Two choices interleaved: each opens with its role, each chunk names its choice, each
    /// ends with its finish reason, and one usage (the prompt once, both completions) and one
    /// `[DONE]` come after the last.
    #[tokio::test]
    async fn choices_stream_side_by_side_and_end_together() {
        let mode = StreamMode {
            stream: true,
            include_usage: true,
            logprobs: false,
            max_tokens_field: None,
            choices: 2,
            per_prompt: 2,
            score_only: false,
            affinity_field: "",
        };
        let finished = |prompt, completion| {
            Frame::Finished(v1::Finished {
                request_id: "r".into(),
                reason: v1::FinishReason::Length as i32,
                usage: Some(v1::Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    cached_prompt_tokens: 0,
                }),
                ..Default::default()
            })
        };
        let events = stream_of_choices(
            Endpoint::Chat,
            mode,
            (1, tokens("b1")),
            vec![
                (0, tokens("a1")),
                (1, finished(5, 1)),
                (0, tokens("a2")),
                (0, finished(5, 2)),
            ],
        )
        .await;
        let described: Vec<String> = events
            .iter()
            .map(|event| match event {
                Value::String(done) => done.clone(),
                chunk => match chunk["choices"].get(0) {
                    None => format!("usage {}", chunk["usage"]["total_tokens"]),
                    Some(choice) => format!(
                        "{} {} {}",
                        choice["index"],
                        choice["delta"]["content"].as_str().unwrap_or("-"),
                        choice["finish_reason"].as_str().unwrap_or("-"),
                    ),
                },
            })
            .collect();
        assert_eq!(
            described,
            [
                "0  -",
                "1  -",
                "1 b1 -",
                "0 a1 -",
                "1 - length",
                "0 a2 -",
                "0 - length",
                "usage 8",
                "[DONE]",
            ]
        );
    }

    #[tokio::test]
    async fn a_move_is_an_sse_comment_that_openai_clients_skip() {
        let mode = one_choice(false, false);
        let mut events = Events::new(
            meta(Endpoint::Chat),
            mode,
            Box::pin(futures::stream::empty()),
        );
        events.on_frame(
            0,
            Frame::Moved(v1::Moved {
                request_id: "r".into(),
                from_worker_id: "wse-0".into(),
                from_pool: "wse".into(),
                to_worker_id: "gpu-1".into(),
                to_pool: "gpu".into(),
                reason: "preempt".into(),
            }),
        );
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
