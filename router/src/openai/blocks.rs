//! What a model wrote in one turn as the block-structured APIs show it — the Responses API's
//! output items, Anthropic's content blocks: its text in one block, each tool call in its
//! own, in the order it wrote them. Each change is reported as a [`Change`], which a door
//! renders as its own stream events, so what it streams and the whole answer always agree.

use switchyard_proto::v1;

/// How a block ended, or that it has not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    InProgress,
    Completed,
    /// Cut short (the output bound, a failure).
    Incomplete,
}

#[derive(Debug)]
pub enum Body {
    Text(String),
    Call {
        /// The engine's index of the call within the turn.
        index: u32,
        call_id: String,
        name: String,
        arguments: String,
    },
}

#[derive(Debug)]
pub struct Block {
    pub status: Status,
    pub body: Body,
}

/// One change to the blocks; `block` is the block's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Opened(usize),
    /// Text appended to a text block: its bytes `from..to`.
    Text {
        block: usize,
        from: usize,
        to: usize,
    },
    /// Arguments appended to a call block: their bytes `from..to`. A range, not "from `from`
    /// on": pieces of one call that come in one frame are changes of their own, and each must
    /// be told once (found from outside: a streamed call's deltas repeated a piece).
    Arguments {
        block: usize,
        from: usize,
        to: usize,
    },
    Closed(usize),
}

#[derive(Debug, Default)]
pub struct Blocks {
    blocks: Vec<Block>,
}

impl Blocks {
    pub fn all(&self) -> &[Block] {
        &self.blocks
    }

    pub fn get(&self, block: usize) -> &Block {
        &self.blocks[block]
    }

    /// Text the model wrote: more of the open text block, or a new one.
    pub fn text(&mut self, text: &str, changes: &mut Vec<Change>) {
        if text.is_empty() {
            return;
        }
        if !matches!(self.open(), Some(Body::Text(_))) {
            self.close(Status::Completed, changes);
            self.open_block(Body::Text(String::new()), changes);
        }
        let block = self.blocks.len() - 1;
        if let Body::Text(all) = &mut self.blocks[block].body {
            let from = all.len();
            all.push_str(text);
            changes.push(Change::Text {
                block,
                from,
                to: all.len(),
            });
        }
    }

    /// Pieces of tool calls: more arguments of the open call, or new calls (a piece with a new
    /// index starts one).
    pub fn calls(&mut self, pieces: &[v1::ToolCallDelta], changes: &mut Vec<Change>) {
        for piece in pieces {
            let continues =
                matches!(self.open(), Some(Body::Call { index, .. }) if *index == piece.index);
            if !continues {
                self.close(Status::Completed, changes);
                self.open_block(
                    Body::Call {
                        index: piece.index,
                        call_id: piece.id.clone(),
                        name: piece.name.clone(),
                        arguments: String::new(),
                    },
                    changes,
                );
            }
            let block = self.blocks.len() - 1;
            if let Body::Call { arguments, .. } = &mut self.blocks[block].body
                && !piece.arguments.is_empty()
            {
                let from = arguments.len();
                arguments.push_str(&piece.arguments);
                changes.push(Change::Arguments {
                    block,
                    from,
                    to: arguments.len(),
                });
            }
        }
    }

    /// Ends the block being written, if any, as `status`.
    pub fn close(&mut self, status: Status, changes: &mut Vec<Change>) {
        let block = self.blocks.len().wrapping_sub(1);
        if let Some(open) = self
            .blocks
            .last_mut()
            .filter(|b| b.status == Status::InProgress)
        {
            open.status = status;
            changes.push(Change::Closed(block));
        }
    }

    fn open(&self) -> Option<&Body> {
        self.blocks
            .last()
            .filter(|b| b.status == Status::InProgress)
            .map(|b| &b.body)
    }

    fn open_block(&mut self, body: Body, changes: &mut Vec<Change>) {
        self.blocks.push(Block {
            status: Status::InProgress,
            body,
        });
        changes.push(Change::Opened(self.blocks.len() - 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::test_support::piece;

    #[test]
    fn text_then_calls_become_blocks_in_order() {
        let (mut blocks, mut changes) = (Blocks::default(), Vec::new());
        blocks.text("Let me ", &mut changes);
        blocks.text("look.", &mut changes);
        blocks.calls(
            &[piece(0, "call_a", "get", "{\"q\":"), piece(0, "", "", "1}")],
            &mut changes,
        );
        blocks.calls(&[piece(1, "call_b", "put", "")], &mut changes);
        blocks.text("", &mut changes);
        blocks.close(Status::Incomplete, &mut changes);
        blocks.close(Status::Completed, &mut changes);
        use Change::*;
        assert_eq!(
            changes,
            [
                Opened(0),
                Text {
                    block: 0,
                    from: 0,
                    to: 7
                },
                Text {
                    block: 0,
                    from: 7,
                    to: 12
                },
                Closed(0),
                Opened(1),
                Arguments {
                    block: 1,
                    from: 0,
                    to: 5
                },
                Arguments {
                    block: 1,
                    from: 5,
                    to: 7
                },
                Closed(1),
                Opened(2),
                Closed(2),
            ]
        );
        assert!(matches!(&blocks.get(0).body, Body::Text(t) if t == "Let me look."));
        assert!(
            matches!(&blocks.get(1).body, Body::Call { arguments, .. } if arguments == "{\"q\":1}")
        );
        let statuses: Vec<_> = blocks.all().iter().map(|b| b.status).collect();
        assert_eq!(
            statuses,
            [Status::Completed, Status::Completed, Status::Incomplete]
        );
    }
}
