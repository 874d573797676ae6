//! The Switchyard wire contract (`switchyard.v1`): generated prost/tonic code, the encoded
//! descriptor set for gRPC reflection, and validation of requests as they arrive on the wire.

pub mod codec;
pub mod hosted;
pub mod introspection;
pub mod kv_blocks;
pub mod validate;

/// Generated code for package `switchyard.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

/// Encoded `FileDescriptorSet` of every Switchyard proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));

pub use validate::{FieldViolation, RequestLimits, validate_generate_request};

/// What a router lets a request that names no `SamplingParams.max_tokens` (0) generate: at
/// most the router's cap, and lowered to the room the prompt leaves in the model's context
/// (clients of OpenAI's API often give no bound; a router needs one).
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// `Failed.reason` when the prompt, or the prompt and `max_tokens` together, do not fit the
/// model's context: clients that trim old turns and retry look for it.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "CONTEXT_LENGTH_EXCEEDED";

impl v1::Lane {
    /// The lane's name as used in config, logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            v1::Lane::LatencyCritical => "latency-critical",
            v1::Lane::CostSensitive => "cost-sensitive",
            v1::Lane::Unspecified => "unspecified",
        }
    }
}

impl v1::FinishReason {
    /// Short lowercase name, as OpenAI-style clients expect it.
    pub fn label(self) -> &'static str {
        match self {
            v1::FinishReason::Stop => "stop",
            v1::FinishReason::Length => "length",
            v1::FinishReason::Cancelled => "cancelled",
            v1::FinishReason::Interrupted => "interrupted",
            v1::FinishReason::ToolCalls => "tool_calls",
            v1::FinishReason::Unspecified => "unspecified",
        }
    }
}

/// Puts pieces of tool calls (`Tokens.tool_calls`) together into whole calls, in `calls`:
/// a piece's `id` and `name` set its call's, its `arguments` fragment is appended.
pub fn assemble_tool_calls(calls: &mut Vec<v1::ToolCall>, pieces: &[v1::ToolCallDelta]) {
    for piece in pieces {
        let index = piece.index as usize;
        if calls.len() <= index {
            calls.resize_with(index + 1, Default::default);
        }
        let call = &mut calls[index];
        if !piece.id.is_empty() {
            call.id.clone_from(&piece.id);
        }
        if !piece.name.is_empty() {
            call.name.clone_from(&piece.name);
        }
        call.arguments.push_str(&piece.arguments);
    }
}

impl v1::Tokens {
    /// Appends the chunk that came after this one, so the two travel on as one frame: every
    /// per-token field, the call pieces, and the prompt scores (only a first chunk has them).
    pub fn append(&mut self, later: v1::Tokens) {
        self.token_ids.extend(later.token_ids);
        self.text.push_str(&later.text);
        self.logprobs.extend(later.logprobs);
        self.tool_calls.extend(later.tool_calls);
        self.prompt_logprobs.extend(later.prompt_logprobs);
    }
}

impl v1::ServerFrame {
    /// The request this frame belongs to.
    pub fn request_id(&self) -> Option<&str> {
        use v1::server_frame::Frame;
        Some(match self.frame.as_ref()? {
            Frame::Accepted(f) => &f.request_id,
            Frame::Tokens(f) => &f.request_id,
            Frame::Finished(f) => &f.request_id,
            Frame::Failed(f) => &f.request_id,
            Frame::Rejected(f) => &f.request_id,
            Frame::Moved(f) => &f.request_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::v1;

    fn scored(token_id: u32) -> v1::TokenLogprobs {
        v1::TokenLogprobs {
            chosen: Some(v1::TokenLogprob {
                token_id,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn piece(index: u32, arguments: &str) -> v1::ToolCallDelta {
        v1::ToolCallDelta {
            index,
            arguments: arguments.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_appended_chunk_keeps_every_field_of_both() {
        // Every field spelt out: a field added to `Tokens` must be decided on here.
        let mut first = v1::Tokens {
            request_id: "r".into(),
            seq: 4,
            text: "a".into(),
            token_ids: vec![1],
            logprobs: vec![scored(1)],
            tool_calls: vec![piece(0, "{\"city\":")],
            prompt_logprobs: vec![scored(9)],
        };
        first.append(v1::Tokens {
            request_id: "r".into(),
            seq: 5,
            text: "b".into(),
            token_ids: vec![2],
            logprobs: vec![scored(2)],
            tool_calls: vec![piece(0, " \""), piece(1, "{}")],
            prompt_logprobs: vec![],
        });
        assert_eq!(
            first,
            v1::Tokens {
                request_id: "r".into(),
                seq: 4,
                text: "ab".into(),
                token_ids: vec![1, 2],
                logprobs: vec![scored(1), scored(2)],
                tool_calls: vec![piece(0, "{\"city\":"), piece(0, " \""), piece(1, "{}")],
                prompt_logprobs: vec![scored(9)],
            }
        );
    }
}
