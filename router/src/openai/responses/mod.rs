//! OpenAI's Responses API, `POST /v1/responses`: what the current OpenAI SDKs call first
//! (`client.responses.create`) and what coding agents speak. A request runs on the same
//! dispatcher path as a chat completion (its `input` and `instructions` are a conversation,
//! its tools the same tools); the answer is a `response` object whose `output` lists the
//! model's message and function calls, whole or as the API's typed stream events.
//!
//! A response is stored unless the request says `store: false` (see
//! [`crate::response_store`]): a later request can go on from it with `previous_response_id`,
//! and [`stored`] serves it back.

mod object;
mod output;
pub(in crate::openai) mod references;
pub(super) mod request;
pub(super) mod stored;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use serde_json::Value;
use switchyard_proto::v1::{self, server_frame::Frame};

use super::choices::ChoiceFrames;
use super::conversations;
use super::error::ApiError;
use super::handlers::{self, Call, RESPONSES_ROUTE};
use super::wire;
use crate::dispatch::Dispatcher;
use crate::response_store::background::Describe;
use crate::response_store::events::{EventLog, LogWriter};
use crate::response_store::{ResponseStore, StoredMessage};
use object::{Lifecycle, Snapshot};
use output::{Event, Output, Status};
use request::{ResponsesRequest, Turn};

pub async fn responses(call: Call) -> Response {
    let mint = call.dispatcher.responses.new_id();
    call.answer(RESPONSES_ROUTE, Some(mint), respond).await
}

async fn respond(call: Call, id: String) -> Result<Response, ApiError> {
    let Call {
        dispatcher,
        tenant,
        headers,
        body,
    } = call;
    let body = handlers::read_body(body)?;
    let mut request = parse_body(&body)?;
    let tenant_name = tenant.as_ref().map(|t| t.0.clone());
    if let Some(Value::Array(items)) = request.input.as_mut() {
        references::resolve(
            items,
            "input",
            &dispatcher,
            tenant_name.as_deref(),
            &headers,
        )
        .await?;
    }
    let store = &dispatcher.responses;
    let conversation = request.conversation_id()?;
    let (history, history_field) = match (request.previous_response_id()?, &conversation) {
        (Some(previous), _) => (
            stored::conversation_of(&dispatcher, &previous, tenant_name.as_deref(), &headers)
                .await?,
            "previous_response_id",
        ),
        (None, Some(id)) => {
            let messages =
                conversations::history(&dispatcher, id, tenant_name.as_deref(), &headers).await?;
            let messages = messages.into_iter().map(|m| store.message(m)).collect();
            (messages, "conversation")
        }
        (None, None) => (Vec::new(), "previous_response_id"),
    };
    // The id it is stored under, if it is. Its items' ids name where they are kept longest:
    // the conversation they join, else the stored response (see `item_ids`).
    // The id minted for the request is its store's shape; one the client named is not ours to
    // store under (it could name another's).
    let stored_as = match headers.contains_key(handlers::REQUEST_ID_HEADER) {
        false => id.clone(),
        true => store.new_id(),
    };
    let holder = match &conversation {
        Some(id) => Some(id.clone()),
        None => (request.store != Some(false)).then(|| stored_as.clone()),
    };
    let mut read = request.read(
        dispatcher.limits().max_tokens_cap,
        &history,
        history_field,
        holder.as_deref(),
    )?;
    // What the response adds to its conversation: its input items now, its output at the end.
    let add_to = conversation.map(|id| AddTo {
        dispatcher: dispatcher.clone(),
        id,
        tenant: tenant_name.clone(),
        headers: headers.clone(),
        input_items: read
            .turn
            .input_items
            .iter()
            .map(|item| conversations::as_listed_text(item))
            .collect(),
    });
    // Asked to store, with a store to keep it in.
    read.echo.store &= store.limits().max_bytes > 0;
    if read.echo.background && !read.echo.store {
        return Err(ApiError::invalid(
            "background",
            "this router stores no responses (its --response-store-bytes is 0), so none can \
             run in the background to be polled",
        ));
    }
    let mut keep = read.echo.store.then(|| {
        let Turn {
            history,
            input,
            input_items,
        } = std::mem::take(&mut read.turn);
        let mut conversation = history;
        conversation.extend(input.into_iter().map(|m| store.message(m)));
        Keep {
            store: store.clone(),
            id: stored_as,
            tenant: tenant_name,
            conversation,
            input_items,
            events: None,
        }
    });
    let fields = read.fields;
    let (placed, mut frames) = handlers::place_one(
        &dispatcher,
        tenant,
        &headers,
        read.request,
        read.mode.bounded.then_some("max_output_tokens"),
        id,
    )
    .await
    .map_err(|e| e.renaming_param(|f| fields.rename(f)))?;
    let mut response = Snapshot {
        // A stored response's id names the replica that keeps it.
        id: keep
            .as_ref()
            .map_or_else(|| placed.id.clone(), |keep| keep.id.clone()),
        created_at: handlers::unix_now(),
        model: placed.model.clone(),
        lane: placed.lane.clone(),
        echo: read.echo,
        fields,
    };
    let background = response.echo.background;
    let mut http = if let Some(keep) = keep.take_if(|_| background && !read.mode.stream) {
        json_response(in_background(response, frames, keep, add_to))
    } else if read.mode.stream {
        // The headers wait for the first frame, so a request that fails before producing
        // anything gets its HTTP status.
        let first = handlers::next_frame_of_one(&mut frames)
            .await
            .map_err(|e| response.name_fields(e))?;
        if let Frame::Failed(failed) = &first {
            return Err(response.name_fields(ApiError::from_failed(failed)));
        }
        match keep.take_if(|_| background) {
            Some(keep) => streamed_in_background(response, first, frames, keep, add_to),
            None => stream(response, first, frames, keep, add_to),
        }
    } else {
        whole(&mut response, frames, keep, add_to).await?
    };
    placed.tag(&mut http);
    Ok(http)
}

fn parse_body(body: &[u8]) -> Result<ResponsesRequest, ApiError> {
    wire::typed::<ResponsesRequest>(&wire::json_object(body)?)
}

/// Reads a request body that goes on from no stored response; `cap` is the router's
/// `max_tokens` cap.
#[cfg(test)]
pub(super) fn read_body(body: &[u8], cap: u32) -> Result<request::Read, ApiError> {
    parse_body(body)?.read(cap, &[], "previous_response_id", None)
}

/// What storing a response needs, until it has finished.
struct Keep {
    store: Arc<ResponseStore>,
    id: String,
    tenant: Option<String>,
    /// The conversation up to the answer (the previous response's, then the input).
    conversation: Vec<Arc<StoredMessage>>,
    input_items: Vec<Box<serde_json::value::RawValue>>,
    /// The events of a streamed background response, kept with it for resuming.
    events: Option<Arc<EventLog>>,
}

impl Keep {
    /// The background response `snapshot` as it would stand were its run cut off with its
    /// router: failed, nothing written, saying why (what the router's standby holds while
    /// it runs).
    fn interrupted(&self, snapshot: &Snapshot) -> crate::response_store::StoredResponse {
        let error = ApiError::from_code(
            tonic::Code::Unavailable,
            "the router replica running this background response stopped before it ended, \
             and what it had written went with it: run it again",
        );
        let object =
            serialized(&snapshot.object("failed", &Output::new(false), None, Some(&error)));
        self.store.response(
            self.id.clone(),
            self.tenant.clone(),
            object,
            self.input_items.clone(),
            self.conversation.clone(),
        )
    }

    /// Stores the finished response (`object`, its JSON) with its `output`.
    fn finish(mut self, object: String, output: &Output) {
        self.conversation
            .push(self.store.message(output.as_message()));
        let mut response = self.store.response(
            self.id,
            self.tenant,
            object,
            self.input_items,
            self.conversation,
        );
        response.events = self.events;
        let kept = self.store.insert(response);
        if !kept {
            tracing::warn!("a response larger than the whole response store was not stored");
        }
    }
}

/// What the ids of a response's output items name: the conversation they join, else the
/// stored response (none: kept nowhere).
fn items_holder<'a>(keep: Option<&'a Keep>, add_to: Option<&'a AddTo>) -> Option<&'a str> {
    add_to
        .map(|a| a.id.as_str())
        .or(keep.map(|k| k.id.as_str()))
}

/// What adding a finished response to its conversation needs.
struct AddTo {
    dispatcher: Arc<Dispatcher>,
    id: String,
    tenant: Option<String>,
    /// The client's, to ask another replica with its own key.
    headers: HeaderMap,
    input_items: Vec<String>,
}

impl AddTo {
    /// Adds the request's input items and the response's output items. A failure is logged:
    /// the client has its answer, and the conversation lacks this turn. (The output is read
    /// before the returned future is first polled: nothing is held across its await.)
    fn finish(mut self, output: &Output) -> impl Future<Output = ()> + Send + use<> {
        self.input_items
            .extend(output.items().iter().map(serialized));
        async move {
            let added = conversations::add_turn(
                &self.dispatcher,
                &self.id,
                self.tenant.as_deref(),
                &self.headers,
                self.input_items,
            )
            .await;
            if let Err(error) = added {
                tracing::warn!(
                    conversation = %self.id,
                    "a response's turn was not added to its conversation: {}",
                    error.message
                );
            }
        }
    }
}

/// An event's fields, serialized.
fn serialized(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("serializing to memory cannot fail")
}

/// A 200 whose body is the JSON text `body`.
pub(super) fn json_response(body: String) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// How a finished generation's items end and the response's status.
fn ending(finished: &v1::Finished) -> (Status, &'static str) {
    if finished.reason == v1::FinishReason::Length as i32 {
        (Status::Incomplete, "incomplete")
    } else {
        (Status::Completed, "completed")
    }
}

/// How a generation collected whole ended.
enum Ended {
    Finished(v1::Finished),
    Failed(ApiError),
}

/// Collects the generation into `output` until it ends.
async fn collect(frames: &mut ChoiceFrames, output: &Mutex<Output>) -> Ended {
    loop {
        match handlers::next_frame_of_one(frames).await {
            Ok(Frame::Tokens(tokens)) => {
                let mut output = output.lock().expect("output lock");
                output.text(&tokens.text, &tokens.logprobs);
                output.calls(&tokens.tool_calls);
            }
            Ok(Frame::Finished(finished)) => return Ended::Finished(finished),
            Ok(Frame::Failed(failed)) => return Ended::Failed(ApiError::from_failed(&failed)),
            Err(error) => return Ended::Failed(error),
            // HTTP sends no client frames, so none is rejected.
            Ok(Frame::Accepted(_) | Frame::Moved(_) | Frame::Rejected(_)) => {}
        }
    }
}

/// Collects the whole generation into one response object.
async fn whole(
    snapshot: &mut Snapshot,
    mut frames: ChoiceFrames,
    keep: Option<Keep>,
    add_to: Option<AddTo>,
) -> Result<Response, ApiError> {
    let output =
        Mutex::new(Output::new(false).held_by(items_holder(keep.as_ref(), add_to.as_ref())));
    let finished = match collect(&mut frames, &output).await {
        Ended::Finished(finished) => finished,
        Ended::Failed(error) => return Err(snapshot.name_fields(error)),
    };
    let mut output = output.into_inner().expect("output lock");
    let (items, status) = ending(&finished);
    output.close(items);
    // Serialized once: the answer and what is stored are the same text.
    let body = serialized(&snapshot.object(status, &output, Some(&finished), None));
    if let Some(keep) = keep {
        keep.finish(body.clone(), &output);
    }
    if let Some(add_to) = add_to {
        add_to.finish(&output).await;
    }
    Ok(json_response(body))
}

/// The response object a running background response shows when it is read: `in_progress`,
/// with what it has written so far.
fn describe_running(snapshot: &Arc<Snapshot>, output: &Arc<Mutex<Output>>) -> Describe {
    let (snapshot, output) = (snapshot.clone(), output.clone());
    Box::new(move || {
        let output = output.lock().expect("output lock");
        serialized(&snapshot.object("in_progress", &output, None, None))
    })
}

/// Runs the generation without the client (`background: true`): the response object as it
/// starts, `in_progress`. While it runs it is read by its id (as it stands) and cancelled;
/// when it ends it is stored, and added to its conversation unless it failed or was
/// cancelled.
fn in_background(
    snapshot: Snapshot,
    mut frames: ChoiceFrames,
    keep: Keep,
    add_to: Option<AddTo>,
) -> String {
    let snapshot = Arc::new(snapshot);
    let output = Arc::new(Mutex::new(
        Output::new(false).held_by(items_holder(Some(&keep), add_to.as_ref())),
    ));
    let describe = describe_running(&snapshot, &output);
    let started = describe();
    let store = keep.store.clone();
    let run = store.begin_run(keep.interrupted(&snapshot), describe, None);
    tokio::spawn(async move {
        let ended = tokio::select! {
            ended = collect(&mut frames, &output) => Some(ended),
            () = run.cancel.cancelled() => None,
        };
        // Dropping the frames stops a generation still running on its worker.
        drop(frames);
        let (body, finished, output) = {
            let mut output = output.lock().expect("output lock");
            let (status, finished, error) = match ended {
                Some(Ended::Finished(finished)) => {
                    let (items, status) = ending(&finished);
                    output.close(items);
                    (status, Some(finished), None)
                }
                Some(Ended::Failed(error)) => {
                    output.close(Status::Incomplete);
                    ("failed", None, Some(snapshot.name_fields(error)))
                }
                None => {
                    output.close(Status::Incomplete);
                    ("cancelled", None, None)
                }
            };
            let body =
                serialized(&snapshot.object(status, &output, finished.as_ref(), error.as_ref()));
            // Stored while the run still shows it: a reader finds one or the other.
            keep.finish(body.clone(), &output);
            let output = std::mem::replace(&mut *output, Output::new(false));
            (body, finished, output)
        };
        if let Some(add_to) = add_to.filter(|_| finished.is_some()) {
            add_to.finish(&output).await;
        }
        run.ended(&store, body);
    });
    started
}

/// Streams a background response (`background: true, stream: true`): the generation's
/// events go to a log the run keeps, and the client follows the log. A client that goes away
/// leaves the run going (it reads the rest with `GET /v1/responses/{id}?stream=true
/// &starting_after=N`, or polls it, or cancels it); a cancelled run's stream ends with
/// `response.cancelled`.
fn streamed_in_background(
    snapshot: Snapshot,
    first: Frame,
    frames: ChoiceFrames,
    mut keep: Keep,
    add_to: Option<AddTo>,
) -> Response {
    let store = keep.store.clone();
    let log = store.event_log();
    keep.events = Some(log.clone());
    let interrupted = keep.interrupted(&snapshot);
    let mut events = Events::new(snapshot, first, frames, Some(keep), add_to);
    events.keep_failed = true;
    let run = store.begin_run(
        interrupted,
        describe_running(&events.snapshot, &events.output),
        Some(log.clone()),
    );
    let writer = LogWriter(log.clone());
    tokio::spawn(async move {
        let cancel = run.cancel.clone();
        let mut run = Some(run);
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled(), if !events.done => {
                    events.cancel();
                    continue;
                }
                next = events.next() => next,
            };
            let Some(event) = next else { break };
            // Stored before its last event is written: a client that saw the stream end
            // reads the response as it ended.
            if let Some(object) = events.ended.take()
                && let Some(run) = run.take()
            {
                run.ended(&store, object);
            }
            writer.push(event);
        }
        // Dropping the frames stops a generation still running on its worker; dropping the
        // writer ends the followers.
        drop(events);
    });
    let follow = log
        .follow(None)
        .expect("a new log is followed from its start");
    crate::openai::stream::event_stream(follow)
}

/// The streamed response: `response.created` and `response.in_progress`, the output's events
/// as the tokens come, then `response.completed` (or `.incomplete`, or `.failed` with the
/// error). The body owns the dispatcher's receiver: a client that goes away cancels the
/// generation.
fn stream(
    snapshot: Snapshot,
    first: Frame,
    frames: ChoiceFrames,
    keep: Option<Keep>,
    add_to: Option<AddTo>,
) -> Response {
    let events = Events::new(snapshot, first, frames, keep, add_to);
    crate::openai::stream::event_stream(futures::stream::unfold(events, |mut events| async move {
        Some((events.next().await?, events))
    }))
}

/// A response's stream of events, made from the generation's frames.
struct Events {
    snapshot: Arc<Snapshot>,
    frames: ChoiceFrames,
    /// Shared with what reads a background response while it runs.
    output: Arc<Mutex<Output>>,
    sequence: u64,
    pending: VecDeque<Bytes>,
    done: bool,
    /// Stores the response when it has finished...
    keep: Option<Keep>,
    /// ...and when it failed too (a background response, whose failure is what a reader
    /// finds).
    keep_failed: bool,
    /// Adds the finished response to its conversation (not when it failed)...
    add_to: Option<AddTo>,
    /// ...before the event saying it finished goes out, so a client that reads the
    /// conversation then finds the turn.
    adding: bool,
    /// The response object as it ended (its JSON), until taken.
    ended: Option<String>,
}

impl Events {
    /// The events of a response whose generation's first frame is `first`: it opens with
    /// `response.created` and `response.in_progress`.
    fn new(
        snapshot: Snapshot,
        first: Frame,
        frames: ChoiceFrames,
        keep: Option<Keep>,
        add_to: Option<AddTo>,
    ) -> Self {
        let mut events = Events {
            snapshot: Arc::new(snapshot),
            frames,
            output: Arc::new(Mutex::new(
                Output::new(true).held_by(items_holder(keep.as_ref(), add_to.as_ref())),
            )),
            sequence: 0,
            pending: VecDeque::new(),
            done: false,
            keep,
            keep_failed: false,
            add_to,
            adding: false,
            ended: None,
        };
        // The same object opens the stream twice; serialized once.
        let opening = Event {
            kind: "response.created",
            fields: serialized(&Lifecycle {
                response: events
                    .snapshot
                    .object("in_progress", &events.output(), None, None),
            }),
        };
        let in_progress = Event {
            kind: "response.in_progress",
            fields: opening.fields.clone(),
        };
        events.push(&opening);
        events.push(&in_progress);
        events.on_frame(first);
        events
    }

    fn output(&self) -> std::sync::MutexGuard<'_, Output> {
        self.output.lock().expect("output lock")
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if std::mem::take(&mut self.adding)
                && let Some(add_to) = self.add_to.take()
            {
                let adding = add_to.finish(&self.output());
                adding.await;
            }
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

    /// Queues an event: `event: <kind>` and its JSON with `type` and `sequence_number`.
    fn push(&mut self, event: &Event) {
        let mut bytes = Vec::with_capacity(64 + event.fields.len());
        bytes.extend_from_slice(b"event: ");
        bytes.extend_from_slice(event.kind.as_bytes());
        bytes.extend_from_slice(b"\ndata: ");
        event.write(self.sequence, &mut bytes);
        bytes.extend_from_slice(b"\n\n");
        self.sequence += 1;
        self.pending.push_back(Bytes::from(bytes));
    }

    fn push_output_events(&mut self) {
        let events = self.output().take_events();
        for event in events {
            self.push(&event);
        }
    }

    /// Ends the stream with the lifecycle event `kind`: the response as it ended, with
    /// `status`, which is stored (a failed one only when failures are) and kept in `ended`.
    fn end(
        &mut self,
        kind: &'static str,
        status: &'static str,
        finished: Option<&v1::Finished>,
        error: Option<&ApiError>,
    ) {
        let response = {
            let output = self.output();
            serialized(&self.snapshot.object(status, &output, finished, error))
        };
        // The last event carries the response as stored.
        self.push(&Event {
            kind,
            fields: format!("{{\"response\":{response}}}"),
        });
        if let Some(keep) = self
            .keep
            .take()
            .filter(|_| error.is_none() || self.keep_failed)
        {
            keep.finish(response.clone(), &self.output());
        }
        self.ended = Some(response);
        self.done = true;
    }

    fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Tokens(tokens) => {
                {
                    let mut output = self.output();
                    output.text(&tokens.text, &tokens.logprobs);
                    output.calls(&tokens.tool_calls);
                }
                self.push_output_events();
            }
            Frame::Finished(finished) => {
                let (items, status) = ending(&finished);
                self.output().close(items);
                self.push_output_events();
                let kind = if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.end(kind, status, Some(&finished), None);
                self.adding = self.add_to.is_some();
            }
            Frame::Failed(failed) => self.fail(ApiError::from_failed(&failed)),
            Frame::Moved(moved) => self
                .pending
                .push_back(crate::openai::stream::moved_comment(&moved)),
            Frame::Accepted(_) | Frame::Rejected(_) => {}
        }
    }

    /// Ends the stream with `response.failed`, what was written so far marked incomplete.
    fn fail(&mut self, error: ApiError) {
        let error = self.snapshot.name_fields(error);
        self.output().close(Status::Incomplete);
        self.push_output_events();
        self.end("response.failed", "failed", None, Some(&error));
    }

    /// Ends the stream of a background response cancelled midway with `response.cancelled`
    /// (an event OpenAI's SDKs do not name: a cancelled run's stream has no defined end),
    /// what was written so far marked incomplete.
    fn cancel(&mut self) {
        self.output().close(Status::Incomplete);
        self.push_output_events();
        self.end("response.cancelled", "cancelled", None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::{frames, named_events, tokens};
    use serde_json::{Value, json};
    use tonic::Code;

    fn snapshot() -> Snapshot {
        let read = serde_json::from_value::<ResponsesRequest>(json!({
            "model": "m",
            "input": [
                {"role": "user", "content": "q"},
                {"type": "function_call_output", "call_id": "c9", "output": "r"},
            ],
        }))
        .expect("typed")
        .read(64, &[], "previous_response_id", None)
        .expect("read");
        Snapshot {
            id: "resp_1".into(),
            created_at: 7,
            model: "m".into(),
            lane: "latency-critical".into(),
            echo: read.echo,
            fields: read.fields,
        }
    }

    /// Every event of a streamed response that starts with `first` and gets `rest`.
    async fn events(first: Frame, rest: Vec<Frame>) -> Vec<(String, Value)> {
        named_events(stream(snapshot(), first, frames(rest), None, None)).await
    }

    #[tokio::test]
    async fn a_call_streams_as_its_item_and_the_response_completes() {
        let call = v1::ToolCallDelta {
            index: 0,
            id: "call_1".into(),
            name: "get".into(),
            arguments: "{\"a\":".into(),
        };
        let rest = v1::ToolCallDelta {
            arguments: "1}".into(),
            ..Default::default()
        };
        let finished = Frame::Finished(v1::Finished {
            reason: v1::FinishReason::ToolCalls as i32,
            usage: Some(v1::Usage {
                prompt_tokens: 5,
                completion_tokens: 3,
                cached_prompt_tokens: 4,
            }),
            ..Default::default()
        });
        let events = events(
            tokens("", vec![call]),
            vec![tokens("", vec![rest]), finished],
        )
        .await;
        let names: Vec<_> = events.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (number, (name, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], name.as_str());
            assert_eq!(data["sequence_number"], number);
        }
        let response = &events.last().unwrap().1["response"];
        assert_eq!(response["status"], "completed");
        assert_eq!(response["service_tier"], "priority");
        assert_eq!(response["output"][0]["arguments"], "{\"a\":1}");
        assert_eq!(
            response["usage"]["input_tokens_details"]["cached_tokens"],
            4
        );
        assert_eq!(response["usage"]["total_tokens"], 8);
    }

    /// What storing response `id` of the test snapshot needs, in `store`.
    fn keep(store: &Arc<ResponseStore>, id: &str) -> Keep {
        Keep {
            store: store.clone(),
            id: id.into(),
            tenant: None,
            conversation: Vec::new(),
            input_items: Vec::new(),
            events: None,
        }
    }

    fn stored_status(store: &ResponseStore, id: &str) -> Option<String> {
        match store.get(id, None) {
            crate::response_store::Lookup::Found(found) if !found.running => {
                let object: Value = serde_json::from_str(&found.object).expect("JSON");
                Some(object["status"].as_str().expect("a status").to_string())
            }
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_streamed_background_response_is_stored_with_its_events_to_resume_from() {
        let store = Arc::new(ResponseStore::new(Default::default()));
        let id = store.new_id();
        let finished = Frame::Finished(v1::Finished {
            reason: v1::FinishReason::Stop as i32,
            ..Default::default()
        });
        let mut snapshot = snapshot();
        snapshot.id = id.clone();
        let response = streamed_in_background(
            snapshot,
            tokens("Hel", vec![]),
            frames(vec![tokens("lo", vec![]), finished]),
            keep(&store, &id),
            None,
        );
        let streamed = named_events(response).await;
        assert_eq!(streamed.last().unwrap().0, "response.completed");
        assert_eq!(stored_status(&store, &id).as_deref(), Some("completed"));
        // Resumed after event 3: the same events from the fifth on, then the end.
        let crate::response_store::Lookup::Found(Some(log)) = store.events_of(&id, None) else {
            panic!("the events are kept with the response");
        };
        let resumed = named_events(crate::openai::stream::event_stream(
            log.follow(Some(3)).expect("within the stream"),
        ))
        .await;
        assert_eq!(resumed, streamed[4..]);
        assert_eq!(store.running(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_streamed_background_response_ends_its_stream_cancelled() {
        let store = Arc::new(ResponseStore::new(Default::default()));
        let id = store.new_id();
        let mut snapshot = snapshot();
        snapshot.id = id.clone();
        // A generation that goes on until it is dropped.
        let (more, generation) = futures::channel::mpsc::unbounded();
        let endless: ChoiceFrames = Box::pin(generation);
        let response = streamed_in_background(
            snapshot,
            tokens("Hel", vec![]),
            endless,
            keep(&store, &id),
            None,
        );
        let mut body = response.into_body().into_data_stream();
        use futures::StreamExt as _;
        let opened = body.next().await.expect("the first event").expect("bytes");
        assert!(opened.starts_with(b"event: response.created"));
        let cancelled = store.cancel(&id, None).await.expect("cancelled");
        assert!(
            cancelled.contains("\"status\":\"cancelled\""),
            "{cancelled}"
        );
        let mut rest = Vec::new();
        while let Some(event) = body.next().await {
            rest.extend_from_slice(&event.expect("bytes"));
        }
        let rest = String::from_utf8(rest).expect("utf-8");
        assert!(rest.contains("event: response.cancelled"), "{rest}");
        assert!(more.is_closed(), "the generation was dropped");
        assert_eq!(stored_status(&store, &id).as_deref(), Some("cancelled"));
    }

    #[tokio::test]
    async fn a_failure_midway_ends_the_stream_failed_naming_the_requests_field() {
        let failed = Frame::Failed(v1::Failed {
            code: Code::InvalidArgument as i32,
            message: "messages[1].tool_call_id: answers no call".into(),
            field: "messages[1].tool_call_id".into(),
            ..Default::default()
        });
        let events = events(tokens("Hel", vec![]), vec![failed]).await;
        let (name, last) = events.last().unwrap();
        assert_eq!(name, "response.failed");
        let response = &last["response"];
        assert_eq!(response["status"], "failed");
        assert_eq!(response["output"][0]["status"], "incomplete");
        assert_eq!(response["output"][0]["content"][0]["text"], "Hel");
        assert_eq!(
            response["error"]["message"],
            "input[1].call_id: answers no call"
        );
    }
}
