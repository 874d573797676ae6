//! A response's `output` as the generation produces it: text becomes a `message` item, each
//! tool call a `function_call` item, in the order the model wrote them. Each change is also
//! the Responses API's stream event for it (`response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`, the `.done`
//! events), so the streamed events and the whole response always agree.

use serde_json::{Value, json};
use switchyard_proto::v1;

/// One stream event: its `type` and its other fields (the stream adds `sequence_number`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub fields: Value,
}

/// How an item ended, or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    InProgress,
    Completed,
    /// Cut short (the output bound, a failure).
    Incomplete,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Incomplete => "incomplete",
        }
    }
}

#[derive(Debug)]
enum Body {
    Message {
        text: String,
    },
    Call {
        /// The engine's index of the call within the turn.
        index: u32,
        call_id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug)]
struct Item {
    id: String,
    status: Status,
    body: Body,
}

impl Item {
    fn to_json(&self) -> Value {
        let status = self.status.label();
        match &self.body {
            Body::Message { text } => {
                // An item just opened has no content part yet, as OpenAI's stream shows it.
                let content = if self.status == Status::InProgress && text.is_empty() {
                    json!([])
                } else {
                    json!([text_part(text)])
                };
                json!({
                    "id": self.id, "type": "message", "status": status, "role": "assistant",
                    "content": content,
                })
            }
            Body::Call {
                call_id,
                name,
                arguments,
                ..
            } => json!({
                "id": self.id, "type": "function_call", "status": status, "call_id": call_id,
                "name": name, "arguments": arguments,
            }),
        }
    }
}

fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// The output items of one response and the events that built them.
#[derive(Debug, Default)]
pub struct Output {
    items: Vec<Item>,
    /// Events not yet taken; kept only when the response streams.
    events: Vec<Event>,
    emit: bool,
}

impl Output {
    /// `emit`: keep the stream events (a streamed response) or not (a whole one).
    pub fn new(emit: bool) -> Self {
        Self {
            emit,
            ..Default::default()
        }
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Every item, as it stands.
    pub fn items(&self) -> Vec<Value> {
        self.items.iter().map(Item::to_json).collect()
    }

    /// Text the model wrote: more of the open message, or a new message.
    pub fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !matches!(
            self.open(),
            Some(Item {
                body: Body::Message { .. },
                ..
            })
        ) {
            self.close(Status::Completed);
            self.open_item(Body::Message {
                text: String::new(),
            });
            let (index, id) = self.last_ids();
            self.emit("response.content_part.added", || {
                json!({"item_id": id, "output_index": index, "content_index": 0,
                       "part": text_part("")})
            });
        }
        if let Some(Item {
            body: Body::Message { text: all },
            ..
        }) = self.items.last_mut()
        {
            all.push_str(text);
        }
        let (index, id) = self.last_ids();
        self.emit("response.output_text.delta", || {
            json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text,
                   "logprobs": []})
        });
    }

    /// Pieces of tool calls: more arguments of the open call, or new calls (a piece with a
    /// new index starts one).
    pub fn calls(&mut self, pieces: &[v1::ToolCallDelta]) {
        for piece in pieces {
            let continues = matches!(
                self.open(),
                Some(Item { body: Body::Call { index, .. }, .. }) if *index == piece.index
            );
            if !continues {
                self.close(Status::Completed);
                self.open_item(Body::Call {
                    index: piece.index,
                    call_id: piece.id.clone(),
                    name: piece.name.clone(),
                    arguments: String::new(),
                });
            }
            if piece.arguments.is_empty() {
                continue;
            }
            if let Some(Item {
                body: Body::Call { arguments, .. },
                ..
            }) = self.items.last_mut()
            {
                arguments.push_str(&piece.arguments);
            }
            let (index, id) = self.last_ids();
            self.emit(
                "response.function_call_arguments.delta",
                || json!({"item_id": id, "output_index": index, "delta": piece.arguments}),
            );
        }
    }

    /// Ends the item being written, if any, as `status`.
    pub fn close(&mut self, status: Status) {
        let Some(item) = self
            .items
            .last_mut()
            .filter(|i| i.status == Status::InProgress)
        else {
            return;
        };
        item.status = status;
        let (index, id) = self.last_ids();
        let item = self.items.last().expect("just closed");
        let done = item.to_json();
        match &item.body {
            Body::Message { text } => {
                let (text, part) = (text.clone(), text_part(text));
                self.emit("response.output_text.done", || {
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                           "text": text, "logprobs": []})
                });
                self.emit("response.content_part.done", || {
                    json!({"item_id": id, "output_index": index, "content_index": 0,
                           "part": part})
                });
            }
            Body::Call {
                name, arguments, ..
            } => {
                let (name, arguments) = (name.clone(), arguments.clone());
                self.emit("response.function_call_arguments.done", || {
                    json!({"item_id": id, "output_index": index, "name": name,
                           "arguments": arguments})
                });
            }
        }
        self.emit(
            "response.output_item.done",
            || json!({"output_index": index, "item": done}),
        );
    }

    fn open(&self) -> Option<&Item> {
        self.items.last().filter(|i| i.status == Status::InProgress)
    }

    fn open_item(&mut self, body: Body) {
        let prefix = match body {
            Body::Message { .. } => "msg",
            Body::Call { .. } => "fc",
        };
        self.items.push(Item {
            id: format!("{prefix}_{}", uuid::Uuid::new_v4().simple()),
            status: Status::InProgress,
            body,
        });
        let (index, _) = self.last_ids();
        let item = self.items.last().expect("just pushed").to_json();
        self.emit(
            "response.output_item.added",
            || json!({"output_index": index, "item": item}),
        );
    }

    /// The last item's output index and id.
    fn last_ids(&self) -> (usize, String) {
        let index = self.items.len().saturating_sub(1);
        let id = self.items.last().map(|i| i.id.clone()).unwrap_or_default();
        (index, id)
    }

    fn emit(&mut self, kind: &'static str, fields: impl FnOnce() -> Value) {
        if self.emit {
            self.events.push(Event {
                kind,
                fields: fields(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(index: u32, id: &str, name: &str, arguments: &str) -> v1::ToolCallDelta {
        v1::ToolCallDelta {
            index,
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn text_then_calls_are_items_in_order_with_their_events() {
        let mut output = Output::new(true);
        output.text("Let me ");
        output.text("look.");
        output.calls(&[piece(0, "call_a", "get", "{\"q\":"), piece(0, "", "", "1}")]);
        output.calls(&[piece(1, "call_b", "put", "{}")]);
        output.close(Status::Completed);
        let events = output.take_events();
        assert_eq!(
            kinds(&events),
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
            ]
        );
        let items = output.items();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["content"][0]["text"], "Let me look.");
        assert_eq!(items[1]["arguments"], "{\"q\":1}");
        assert_eq!(items[1]["call_id"], "call_a");
        assert_eq!(items[2]["name"], "put");
        assert!(items.iter().all(|i| i["status"] == "completed"));
        // Every event of an item names it by the index and id it was added with.
        for event in &events {
            if let Some(index) = event.fields.get("output_index") {
                let item = &items[index.as_u64().unwrap() as usize];
                let id = event
                    .fields
                    .get("item_id")
                    .or(event.fields["item"].get("id"));
                assert_eq!(id, item.get("id"), "{event:?}");
            }
        }
        // What the done events carry is what the items hold.
        assert_eq!(events[6].fields["item"], items[0]);
        assert_eq!(events[10].fields["arguments"], "{\"q\":1}");
    }

    #[test]
    fn a_cut_short_item_ends_incomplete_and_a_whole_response_keeps_no_events() {
        let mut output = Output::new(false);
        output.text("Once upon");
        output.close(Status::Incomplete);
        output.close(Status::Completed);
        assert!(output.take_events().is_empty());
        let items = output.items();
        assert_eq!(items[0]["status"], "incomplete");
        assert_eq!(items[0]["content"][0]["text"], "Once upon");
    }

    #[test]
    fn an_answer_with_nothing_in_it_has_no_items() {
        let mut output = Output::new(true);
        output.text("");
        output.close(Status::Completed);
        assert!(output.items().is_empty());
        assert!(output.take_events().is_empty());
    }
}
