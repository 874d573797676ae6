//! vLLM's `/tokenize` and `/detokenize`: the ids a model's engine sees for a prompt or a
//! conversation (its chat template applied, tools included), and the text of ids — for clients
//! that fit a conversation into the context window, or build token-id prompts. The router
//! answers from the model's tokenizer (fetched from its workers); no worker is asked.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_proto::v1;

use super::ApiError;
use super::handlers;
use super::wire::{self, ChatCompletionRequest};
use crate::dispatch::Dispatcher;

pub const TOKENIZE_ROUTE: &str = "/tokenize";
pub const DETOKENIZE_ROUTE: &str = "/detokenize";

/// The fields of a `/tokenize` request besides a conversation's, which are a chat
/// completion's.
#[derive(Debug, Deserialize)]
struct TokenizeFields {
    model: Option<String>,
    prompt: Option<Value>,
    messages: Option<Value>,
    add_generation_prompt: Option<bool>,
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: bool,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Option<Vec<u32>>,
}

pub async fn tokenize(
    State(dispatcher): State<Arc<Dispatcher>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match tokenized(&dispatcher, body).await {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

pub async fn detokenize(
    State(dispatcher): State<Arc<Dispatcher>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match detokenized(&dispatcher, body) {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

/// `{count, max_model_len, tokens, token_strs}`, as vLLM answers.
async fn tokenized(
    dispatcher: &Dispatcher,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let body = body.map_err(handlers::body_unread)?;
    let value = wire::json_object(&body)?;
    let fields: TokenizeFields = wire::typed(&value)?;
    // The engine opens the assistant's turn after a conversation and begins a prompt with the
    // model's own special tokens: asking otherwise would count ids it never sees.
    if fields.add_generation_prompt == Some(false) {
        return Err(ApiError::invalid(
            "add_generation_prompt",
            "must be true (or absent): the conversation is tokenized as a chat completion's, \
             the assistant's turn opened",
        ));
    }
    let mut request = match (&fields.messages, &fields.prompt) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "send either prompt or messages, not both",
            ));
        }
        (Some(_), None) => {
            let chat: ChatCompletionRequest = wire::parse_body(&body)?;
            chat.into_proto(dispatcher.limits().max_tokens_cap)?.0
        }
        (None, Some(Value::String(prompt))) => v1::GenerateRequest {
            model: fields.model.clone().unwrap_or_default(),
            prompt: prompt.clone(),
            ..Default::default()
        },
        (None, Some(_)) => return Err(ApiError::invalid("prompt", "must be a string")),
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "send prompt (text) or messages (a conversation) to tokenize",
            ));
        }
    };
    // Checked as any request is (its size, the model named); it runs under no id and
    // generates nothing.
    request.request_id = "tokenize".into();
    request.sampling.get_or_insert_default().max_tokens = 1;
    if request.model.is_empty() {
        return Err(ApiError::invalid("model", "is required"));
    }
    switchyard_proto::validate_generate_request(&request, &dispatcher.config.limits)
        .map_err(|e| ApiError::from(&crate::error::DispatchError::from(e)))?;
    let model = &request.model;
    served(dispatcher, model)?;
    let tokenizers = dispatcher.links.tokenizers();
    let tokenizer = tokenizers.get(model).ok_or_else(|| no_tokenizer(model))?;
    // vLLM's flag, where it would change the ids: the engine begins a prompt with the model's
    // BOS token when its tokenizer says to, and a conversation is its chat template's alone.
    let adds_bos = tokenizer.spec().add_bos;
    match (fields.add_special_tokens, fields.messages.is_some()) {
        (Some(false), false) if adds_bos => {
            return Err(ApiError::invalid(
                "add_special_tokens",
                "must be true (or absent) for this model: the engine begins every prompt with \
                 its BOS token",
            ));
        }
        (Some(true), true) => {
            return Err(ApiError::invalid(
                "add_special_tokens",
                "must be false (or absent) for messages: the chat template writes the model's \
                 special tokens itself",
            ));
        }
        _ => {}
    }
    let ids = tokenizers
        .tokenize_off_runtime(&request)
        .await
        .ok_or_else(|| no_tokenizer(model))?;
    let token_strs = match fields.return_token_strs {
        true => json!(
            ids.iter()
                .map(|&id| tokenizer.decode(&[id]))
                .collect::<Vec<_>>()
        ),
        false => Value::Null,
    };
    Ok(json!({
        "count": ids.len(),
        "max_model_len": tokenizers.context_length(model),
        "tokens": ids,
        "token_strs": token_strs,
    }))
}

/// `{prompt}`: the text of the ids.
fn detokenized(
    dispatcher: &Dispatcher,
    body: Result<Bytes, BytesRejection>,
) -> Result<Value, ApiError> {
    let body = body.map_err(handlers::body_unread)?;
    let request: DetokenizeRequest = wire::typed(&wire::json_object(&body)?)?;
    let model = request
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::invalid("model", "is required"))?;
    let tokens = request
        .tokens
        .ok_or_else(|| ApiError::invalid("tokens", "is required (a list of token ids)"))?;
    let most = switchyard_proto::validate::MAX_PROMPT_TOKEN_IDS;
    if tokens.len() > most {
        return Err(ApiError::invalid(
            "tokens",
            format!("{} ids, at most {most}", tokens.len()),
        ));
    }
    served(dispatcher, &model)?;
    let tokenizer = dispatcher
        .links
        .tokenizers()
        .get(&model)
        .ok_or_else(|| no_tokenizer(&model))?;
    let vocab = tokenizer.vocab_size();
    if let Some((index, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(ApiError::invalid(
            format!("tokens[{index}]"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(json!({"prompt": tokenizer.decode(&tokens)}))
}

/// Whether a worker the router knows serves `model`: a 404 naming it otherwise.
pub(crate) fn served(dispatcher: &Dispatcher, model: &str) -> Result<(), ApiError> {
    match handlers::models(dispatcher).contains_key(model) {
        true => Ok(()),
        false => Err(ApiError::not_found(
            Some("model"),
            format!("model: {model:?} is not served by any worker"),
        )),
    }
}

/// The answer when the router has no tokenizer for `model`: 501, as nothing the client sends
/// differently would help.
pub(crate) fn no_tokenizer(model: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_IMPLEMENTED,
        message: format!(
            "model {model:?}: the router has no tokenizer for it (its workers serve it without \
             one, e.g. through a gateway), so its tokens cannot be counted here"
        ),
        kind: "api_error",
        param: None,
        code: None,
        retry_after_secs: None,
    }
}
