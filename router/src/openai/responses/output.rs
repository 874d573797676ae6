//! A response's `output` as the generation produces it: its text a `message` item, each tool
//! call a `function_call` item, in the order the model wrote them (see [`Blocks`]), and each
//! change as the Responses API's stream events (`response.output_item.added`,
//! `response.output_text.delta`, `response.function_call_arguments.delta`, the `.done`
//! events), so the streamed events and the whole response always agree.

use serde::Serialize;
use serde_json::Value;
use switchyard_proto::v1;

pub use super::super::blocks::Status;
use super::super::blocks::{Block, Blocks, Body, Change};

/// One stream event: its `type`, and its other fields as a serialized JSON object (the stream
/// writes `type` and `sequence_number` in front of them). Serialized when made, from borrowed
/// data: a token's event costs one small write, not a JSON tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub fields: String,
}

impl Event {
    /// The event's JSON: `{"type", "sequence_number", …fields}`.
    pub fn write(&self, sequence: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"type\":\"");
        out.extend_from_slice(self.kind.as_bytes());
        out.extend_from_slice(b"\",\"sequence_number\":");
        out.extend_from_slice(sequence.to_string().as_bytes());
        // `fields` is a non-empty object: `{"a":…}` continues as `,"a":…}`.
        out.push(b',');
        out.extend_from_slice(&self.fields.as_bytes()[1..]);
    }
}

/// An output item: a block, the id the API gives it and, for text, its tokens' log
/// probabilities (when asked for).
pub struct Item<'a> {
    id: &'a str,
    block: &'a Block,
    logprobs: &'a [Value],
}

/// An `output_text` content part.
#[derive(Serialize)]
struct TextPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
    logprobs: &'a [Value],
}

fn text_part<'a>(text: &'a str, logprobs: &'a [Value]) -> TextPart<'a> {
    TextPart {
        kind: "output_text",
        text,
        annotations: [],
        logprobs,
    }
}

#[derive(Serialize)]
struct MessageItem<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    status: Status,
    role: &'static str,
    content: &'a [TextPart<'a>],
}

#[derive(Serialize)]
struct CallItem<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    status: Status,
    call_id: &'a str,
    name: &'a str,
    arguments: &'a str,
}

impl Serialize for Item<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let status = self.block.status;
        match &self.block.body {
            Body::Text(text) => {
                // An item just opened has no content part yet, as OpenAI's stream shows it.
                let part = [text_part(text, self.logprobs)];
                let content: &[TextPart] = if status == Status::InProgress && text.is_empty() {
                    &[]
                } else {
                    &part
                };
                MessageItem {
                    id: self.id,
                    kind: "message",
                    status,
                    role: "assistant",
                    content,
                }
                .serialize(serializer)
            }
            Body::Call {
                call_id,
                name,
                arguments,
                ..
            } => CallItem {
                id: self.id,
                kind: "function_call",
                status,
                call_id,
                name,
                arguments,
            }
            .serialize(serializer),
        }
    }
}

/// `response.output_item.added` / `.done`.
#[derive(Serialize)]
struct ItemEvent<'a> {
    output_index: usize,
    item: Item<'a>,
}

/// `response.content_part.added` / `.done`.
#[derive(Serialize)]
struct PartEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    part: TextPart<'a>,
}

/// `response.output_text.delta` (`delta`) / `.done` (`text`).
#[derive(Serialize)]
struct TextEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: &'a [Value],
}

/// `response.function_call_arguments.delta` (`delta`) / `.done` (`name`, `arguments`).
#[derive(Serialize)]
struct ArgumentsEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
}

/// The output items of one response and the events that built them.
#[derive(Debug, Default)]
pub struct Output {
    blocks: Blocks,
    /// The items' ids, by position.
    ids: Vec<String>,
    /// Each item's tokens' log probabilities (text items, when asked for), by position.
    logprobs: Vec<Vec<Value>>,
    /// Those of the text being added, until it lands in an item.
    unplaced_logprobs: Vec<Value>,
    /// Events not yet taken; kept only when the response streams.
    events: Vec<Event>,
    emit: bool,
    changes: Vec<Change>,
    /// The stored response the items are kept with, whose id their ids carry.
    holder: Option<String>,
}

impl Output {
    /// `emit`: keep the stream events (a streamed response) or not (a whole one).
    pub fn new(emit: bool) -> Self {
        Self {
            emit,
            ..Default::default()
        }
    }

    /// The output of stored response `holder` (`None`: not stored): its items' ids name it,
    /// for an `item_reference` to find them.
    pub fn held_by(mut self, holder: Option<&str>) -> Self {
        self.holder = holder.map(str::to_string);
        self
    }

    /// The events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Every item, as it stands.
    pub fn items(&self) -> Vec<Item<'_>> {
        self.ids
            .iter()
            .zip(self.blocks.all())
            .zip(&self.logprobs)
            .map(|((id, block), logprobs)| Item {
                id,
                block,
                logprobs,
            })
            .collect()
    }

    /// The output as the assistant's turn of a conversation (what a request going on from
    /// this response sees): its text, then its calls.
    pub fn as_message(&self) -> v1::ChatMessage {
        let mut message = v1::ChatMessage {
            role: "assistant".into(),
            ..Default::default()
        };
        for block in self.blocks.all() {
            match &block.body {
                Body::Text(text) => message.content.push_str(text),
                Body::Call {
                    call_id,
                    name,
                    arguments,
                    ..
                } => message.tool_calls.push(v1::ToolCall {
                    id: call_id.clone(),
                    name: name.clone(),
                    arguments: arguments.clone(),
                }),
            }
        }
        message
    }

    /// Text the model wrote, and the log probabilities of the tokens that wrote it (when
    /// asked for; those of tokens that wrote no text, such as a tool call's, are not shown).
    pub fn text(&mut self, text: &str, logprobs: &[v1::TokenLogprobs]) {
        let mut changes = std::mem::take(&mut self.changes);
        self.blocks.text(text, &mut changes);
        self.unplaced_logprobs = logprobs
            .iter()
            .map(super::super::logprobs::chat_entry)
            .collect();
        self.render(&mut changes);
        self.unplaced_logprobs.clear();
    }

    /// Pieces of tool calls the model wrote.
    pub fn calls(&mut self, pieces: &[v1::ToolCallDelta]) {
        let mut changes = std::mem::take(&mut self.changes);
        self.blocks.calls(pieces, &mut changes);
        self.render(&mut changes);
    }

    /// Ends the item being written, if any, as `status`.
    pub fn close(&mut self, status: Status) {
        let mut changes = std::mem::take(&mut self.changes);
        self.blocks.close(status, &mut changes);
        self.render(&mut changes);
    }

    /// Names new items and turns `changes` into events; leaves `changes` empty for reuse.
    fn render(&mut self, changes: &mut Vec<Change>) {
        for change in changes.drain(..) {
            if let Change::Opened(index) = change {
                let prefix = match self.blocks.get(index).body {
                    Body::Text(_) => "msg",
                    Body::Call { .. } => "fc",
                };
                self.ids.push(crate::response_store::item_ids::mint(
                    prefix,
                    self.holder.as_deref(),
                ));
                self.logprobs.push(Vec::new());
            }
            let mut added = 0..0;
            if let Change::Text { block, .. } = change {
                let entries = &mut self.logprobs[block];
                added = entries.len()..entries.len() + self.unplaced_logprobs.len();
                entries.append(&mut self.unplaced_logprobs);
            }
            if self.emit {
                self.events_of(change, added);
            }
        }
        self.changes = std::mem::take(changes);
    }

    /// The events of `change`; `added`: the log probabilities a text change added (their
    /// range in its item's).
    fn events_of(&mut self, change: Change, added: std::ops::Range<usize>) {
        let item = |index: usize| Item {
            id: &self.ids[index],
            block: self.blocks.get(index),
            logprobs: &self.logprobs[index],
        };
        let events = &mut self.events;
        match change {
            Change::Opened(index) => {
                let opened = item(index);
                events.push(event(
                    "response.output_item.added",
                    &ItemEvent {
                        output_index: index,
                        item: item(index),
                    },
                ));
                if let Body::Text(_) = opened.block.body {
                    events.push(event(
                        "response.content_part.added",
                        &PartEvent {
                            item_id: opened.id,
                            output_index: index,
                            content_index: 0,
                            part: text_part("", &[]),
                        },
                    ));
                }
            }
            Change::Text { block, from, to } => {
                let Item {
                    id,
                    block: b,
                    logprobs,
                } = item(block);
                if let Body::Text(text) = &b.body {
                    events.push(event(
                        "response.output_text.delta",
                        &TextEvent {
                            item_id: id,
                            output_index: block,
                            content_index: 0,
                            delta: Some(&text[from..to]),
                            text: None,
                            logprobs: &logprobs[added],
                        },
                    ));
                }
            }
            Change::Arguments { block, from, to } => {
                let Item { id, block: b, .. } = item(block);
                if let Body::Call { arguments, .. } = &b.body {
                    events.push(event(
                        "response.function_call_arguments.delta",
                        &ArgumentsEvent {
                            item_id: id,
                            output_index: block,
                            delta: Some(&arguments[from..to]),
                            name: None,
                            arguments: None,
                        },
                    ));
                }
            }
            Change::Closed(index) => {
                let closed = item(index);
                match &closed.block.body {
                    Body::Text(text) => {
                        events.push(event(
                            "response.output_text.done",
                            &TextEvent {
                                item_id: closed.id,
                                output_index: index,
                                content_index: 0,
                                delta: None,
                                text: Some(text),
                                logprobs: closed.logprobs,
                            },
                        ));
                        events.push(event(
                            "response.content_part.done",
                            &PartEvent {
                                item_id: closed.id,
                                output_index: index,
                                content_index: 0,
                                part: text_part(text, closed.logprobs),
                            },
                        ));
                    }
                    Body::Call {
                        name, arguments, ..
                    } => {
                        events.push(event(
                            "response.function_call_arguments.done",
                            &ArgumentsEvent {
                                item_id: closed.id,
                                output_index: index,
                                delta: None,
                                name: Some(name),
                                arguments: Some(arguments),
                            },
                        ));
                    }
                }
                events.push(event(
                    "response.output_item.done",
                    &ItemEvent {
                        output_index: index,
                        item: closed,
                    },
                ));
            }
        }
    }
}

fn event(kind: &'static str, fields: &impl Serialize) -> Event {
    Event {
        kind,
        fields: serde_json::to_string(fields).expect("serializing to memory cannot fail"),
    }
}

/// The items as JSON values (tests read them so).
#[cfg(test)]
pub fn items_json(output: &Output) -> Vec<serde_json::Value> {
    output
        .items()
        .iter()
        .map(|item| serde_json::to_value(item).expect("serializes"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::piece;
    use serde_json::json;

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn text_then_calls_are_items_in_order_with_their_events() {
        let mut output = Output::new(true);
        output.text("Let me ", &[]);
        output.text("look.", &[]);
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
        let items = items_json(&output);
        assert_eq!(items.len(), 3);
        assert_eq!(items[0]["content"][0]["text"], "Let me look.");
        assert_eq!(items[1]["arguments"], "{\"q\":1}");
        assert_eq!(items[1]["call_id"], "call_a");
        assert_eq!(items[2]["name"], "put");
        assert!(items.iter().all(|i| i["status"] == "completed"));
        let fields: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(&e.fields).expect("JSON"))
            .collect();
        // Every event of an item names it by the index and id it was added with.
        for event in &fields {
            let index = event["output_index"].as_u64().expect("an output index");
            let id = event.get("item_id").or(event["item"].get("id"));
            assert_eq!(id, items[index as usize].get("id"), "{event:?}");
        }
        // Two pieces of a call in one frame are two deltas, each told once.
        assert_eq!(
            [&fields[8]["delta"], &fields[9]["delta"]],
            ["{\"q\":", "1}"]
        );
        // What the done events carry is what the items hold.
        assert_eq!(fields[6]["item"], items[0]);
        assert_eq!(fields[10]["arguments"], "{\"q\":1}");
        // Written out, an event leads with its type and number.
        let mut out = Vec::new();
        events[2].write(7, &mut out);
        let written: Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(written["type"], "response.output_text.delta");
        assert_eq!(written["sequence_number"], 7);
        assert_eq!(written["delta"], "Let me ");
    }

    fn scored(text: &str, logprob: f32) -> v1::TokenLogprobs {
        let token = |t: &str, logprob| v1::TokenLogprob {
            token_id: 1,
            token: t.as_bytes().to_vec(),
            logprob,
        };
        v1::TokenLogprobs {
            chosen: Some(token(text, logprob)),
            top: vec![token(text, logprob), token("x", -9.0)],
        }
    }

    /// Each delta carries the log probabilities of the tokens that wrote it; the text part,
    /// its done events and the item carry them all. Tokens that wrote a call show none.
    #[test]
    fn text_carries_its_tokens_log_probabilities() {
        let mut output = Output::new(true);
        output.text("Hel", &[scored("Hel", -0.5)]);
        output.text("lo", &[scored("lo", -0.25)]);
        output.calls(&[piece(0, "call_a", "get", "{}")]);
        output.text("", &[scored("<call>", -1.0)]);
        output.close(Status::Completed);
        let fields: Vec<Value> = output
            .take_events()
            .iter()
            .map(|e| serde_json::from_str(&e.fields).expect("JSON"))
            .collect();
        let deltas: Vec<&Value> = fields.iter().filter(|f| f.get("delta").is_some()).collect();
        assert_eq!(deltas[0]["logprobs"][0]["token"], "Hel");
        assert_eq!(deltas[0]["logprobs"][0]["logprob"], -0.5);
        assert_eq!(deltas[0]["logprobs"][0]["top_logprobs"][1]["token"], "x");
        assert_eq!(deltas[1]["logprobs"][0]["bytes"], json!(b"lo".to_vec()));
        let items = items_json(&output);
        let all = &items[0]["content"][0]["logprobs"];
        assert_eq!(all.as_array().map(Vec::len), Some(2), "{all}");
        let done = fields
            .iter()
            .find(|f| f.get("text").is_some_and(|t| t == "Hello"))
            .expect("output_text.done");
        assert_eq!(&done["logprobs"], all);
        assert!(items[1].get("logprobs").is_none());
    }

    #[test]
    fn a_cut_short_item_ends_incomplete_and_a_whole_response_keeps_no_events() {
        let mut output = Output::new(false);
        output.text("Once upon", &[]);
        output.close(Status::Incomplete);
        output.close(Status::Completed);
        assert!(output.take_events().is_empty());
        let items = items_json(&output);
        assert_eq!(items[0]["status"], "incomplete");
        assert_eq!(items[0]["content"][0]["text"], "Once upon");
    }

    #[test]
    fn an_answer_with_nothing_in_it_has_no_items() {
        let mut output = Output::new(true);
        output.text("", &[]);
        output.close(Status::Completed);
        assert!(output.items().is_empty());
        assert!(output.take_events().is_empty());
    }
}
