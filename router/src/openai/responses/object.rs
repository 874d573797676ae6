//! OpenAI's `response` object: what the request and the generation hold, serialized as the
//! API shows it — whole, and in the stream's lifecycle events.

use serde::Serialize;
use serde_json::Value;
use switchyard_proto::v1;

use super::super::error::ApiError;
use super::super::handlers;
use super::output::Output;
use super::request::{Echo, FieldNames};

/// Everything a response object says besides its output.
pub struct Snapshot {
    pub id: String,
    pub created_at: u64,
    pub model: String,
    pub lane: String,
    pub echo: Echo,
    pub fields: FieldNames,
}

impl Snapshot {
    /// The error naming the request's own fields.
    pub fn name_fields(&self, error: ApiError) -> ApiError {
        error.renaming_param(|f| self.fields.rename(f))
    }

    /// The response object with `status`; `usage` is there once the generation has finished.
    pub fn object<'a>(
        &'a self,
        status: &'static str,
        output: &'a Output,
        finished: Option<&v1::Finished>,
        error: Option<&'a ApiError>,
    ) -> ResponseObject<'a> {
        let e = &self.echo;
        ResponseObject {
            id: &self.id,
            object: "response",
            created_at: self.created_at,
            completed_at: finished.map(|_| handlers::unix_now()),
            status,
            background: e.background,
            conversation: e.conversation.as_deref().map(|id| ConversationRef { id }),
            error: error.map(|e| ResponseError {
                code: e.code.unwrap_or("server_error"),
                message: &e.message,
            }),
            incomplete_details: (status == "incomplete").then_some(IncompleteDetails {
                reason: "max_output_tokens",
            }),
            instructions: e.instructions.as_deref(),
            max_output_tokens: e.max_output_tokens,
            max_tool_calls: None,
            metadata: &e.metadata,
            model: &self.model,
            output: output.items(),
            parallel_tool_calls: e.parallel_tool_calls,
            previous_response_id: e.previous_response_id.as_deref(),
            prompt_cache_key: e.prompt_cache_key.as_deref(),
            reasoning: Reasoning {
                effort: None,
                summary: None,
            },
            safety_identifier: e.safety_identifier.as_deref(),
            // The lane it ran in, in OpenAI's words.
            service_tier: crate::openai::wire::service_tier_of(&self.lane),
            store: e.store,
            temperature: e.temperature,
            text: &e.text,
            tool_choice: &e.tool_choice,
            tools: &e.tools,
            top_logprobs: e.top_logprobs,
            top_p: e.top_p,
            truncation: match e.truncation {
                v1::Truncation::Auto => "auto",
                v1::Truncation::Disabled => "disabled",
            },
            usage: finished.map(|f| Usage::from(f.usage.unwrap_or_default())),
            user: e.user.as_deref(),
        }
    }
}

/// The response object, borrowing what it shows.
#[derive(Serialize)]
pub struct ResponseObject<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    completed_at: Option<u64>,
    status: &'static str,
    background: bool,
    conversation: Option<ConversationRef<'a>>,
    error: Option<ResponseError<'a>>,
    incomplete_details: Option<IncompleteDetails>,
    instructions: Option<&'a str>,
    max_output_tokens: Option<i64>,
    max_tool_calls: Option<u32>,
    metadata: &'a Value,
    model: &'a str,
    output: Vec<super::output::Item<'a>>,
    parallel_tool_calls: bool,
    previous_response_id: Option<&'a str>,
    prompt_cache_key: Option<&'a str>,
    reasoning: Reasoning,
    safety_identifier: Option<&'a str>,
    service_tier: &'static str,
    store: bool,
    temperature: Option<f64>,
    text: &'a Value,
    tool_choice: &'a Value,
    tools: &'a Value,
    top_logprobs: u32,
    top_p: Option<f64>,
    truncation: &'static str,
    usage: Option<Usage>,
    user: Option<&'a str>,
}

/// The conversation a response went on from and added to.
#[derive(Serialize)]
struct ConversationRef<'a> {
    id: &'a str,
}

#[derive(Serialize)]
struct ResponseError<'a> {
    code: &'static str,
    message: &'a str,
}

#[derive(Serialize)]
struct IncompleteDetails {
    reason: &'static str,
}

#[derive(Serialize)]
struct Reasoning {
    effort: Option<&'static str>,
    summary: Option<&'static str>,
}

#[derive(Serialize)]
struct Usage {
    input_tokens: u32,
    input_tokens_details: InputTokensDetails,
    output_tokens: u32,
    output_tokens_details: OutputTokensDetails,
    total_tokens: u32,
}

#[derive(Serialize)]
struct InputTokensDetails {
    cached_tokens: u32,
}

#[derive(Serialize)]
struct OutputTokensDetails {
    reasoning_tokens: u32,
}

impl From<v1::Usage> for Usage {
    fn from(u: v1::Usage) -> Self {
        Usage {
            input_tokens: u.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: u.cached_prompt_tokens,
            },
            output_tokens: u.completion_tokens,
            output_tokens_details: OutputTokensDetails {
                reasoning_tokens: 0,
            },
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// A lifecycle event's fields (`response.created`, `.completed`, …): the response as it
/// stands.
#[derive(Serialize)]
pub struct Lifecycle<'a> {
    pub response: ResponseObject<'a>,
}
