//! Stage 1: is the request one the router can serve as asked? Limits and fields are checked
//! (`INVALID_ARGUMENT` naming the field), then the prompt is tokenized once with the workers'
//! own tokenizer, for the exact prompt length, the prefix index and the worker — a long prompt
//! on the blocking pool, so that its milliseconds of encoding hold no runtime thread. With the
//! exact length known, a request that cannot fit the model's context is refused here, before
//! it is placed, queued or sent.

use switchyard_proto::v1;
use switchyard_proto::{DEFAULT_MAX_TOKENS, validate_generate_request};

use super::Dispatcher;
use crate::error::DispatchError;
use crate::tokenizers::{Tokenizers, tokenizes_long};

/// Who set a request's `sampling.max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutputBound {
    /// The client: a prompt that leaves less room in the context is refused.
    Asked,
    /// The router, for a client that gave none: lowered to the room the prompt leaves.
    Default,
}

/// Fills in [`DEFAULT_MAX_TOKENS`] (at most `cap`) when `request` names no `max_tokens`, and
/// says who bounded its output.
pub(super) fn bound_output(request: &mut v1::GenerateRequest, cap: u32) -> OutputBound {
    let embed = request.embed;
    let sampling = request.sampling.get_or_insert_default();
    if embed && sampling.max_tokens == 0 {
        // An embedding generates nothing; its one "token" is the slot and KV its prompt needs.
        sampling.max_tokens = 1;
        OutputBound::Default
    } else if sampling.max_tokens == 0 {
        sampling.max_tokens = DEFAULT_MAX_TOKENS.min(cap);
        OutputBound::Default
    } else {
        OutputBound::Asked
    }
}

impl Dispatcher {
    /// The request's prompt token ids (chat template applied), or why it is invalid. Empty
    /// ids: the router has no tokenizer for the model yet (the worker tokenizes). `tokenized`
    /// holds them when they were computed already (off the runtime's threads, for a long
    /// prompt): only the limits are checked then. A default `max_tokens` is lowered here to
    /// what fits the context.
    pub(super) fn validate(
        &self,
        request: &mut v1::GenerateRequest,
        tokenized: Option<Vec<u32>>,
        bound: OutputBound,
    ) -> Result<Vec<u32>, DispatchError> {
        validate_generate_request(request, &self.config.limits).map_err(DispatchError::from)?;
        let tokenizers = self.links.tokenizers();
        let ids = match prompt_of_token_ids(request, tokenizers)? {
            Some(ids) => ids,
            None => tokenized.unwrap_or_else(|| tokenizers.tokenize(request).unwrap_or_default()),
        };
        if let Some(context_length) = tokenizers.context_length(&request.model)
            && !ids.is_empty()
        {
            if bound == OutputBound::Default {
                fit_to_context(request, ids.len(), context_length);
            }
            fits_context(request, ids.len(), context_length)?;
        }
        if let Some(tokenizer) = tokenizers.get(&request.model) {
            biases_in_vocabulary(request, tokenizer.vocab_size())?;
        }
        Ok(ids)
    }

    /// The prompt ids of a request whose prompt is too long to tokenize on a runtime thread,
    /// computed on the blocking pool; `None` for any other request (and for an invalid one,
    /// which is refused before anything is spent on it).
    pub(super) async fn tokenize_long(&self, request: &v1::GenerateRequest) -> Option<Vec<u32>> {
        if !tokenizes_long(request)
            || validate_generate_request(request, &self.config.limits).is_err()
        {
            return None;
        }
        Some(
            self.links
                .tokenizers()
                .tokenize_off_runtime(request)
                .await
                .unwrap_or_default(),
        )
    }
}

/// A prompt given as token ids, checked against the model's vocabulary: the ids, and the
/// request's `prompt` set to their text for engines that work on text (the ids go to the
/// worker as given). `None`: the prompt is text or messages.
fn prompt_of_token_ids(
    request: &mut v1::GenerateRequest,
    tokenizers: &Tokenizers,
) -> Result<Option<Vec<u32>>, DispatchError> {
    if request.prompt_token_ids.is_empty() {
        return Ok(None);
    }
    let Some(tokenizer) = tokenizers.get(&request.model) else {
        return Err(DispatchError::invalid(
            "prompt_token_ids",
            format!(
                "the router has no tokenizer for model {:?} to check them with (its workers \
                 publish none, or not yet): send the prompt as text",
                request.model
            ),
        ));
    };
    let vocab = tokenizer.vocab_size();
    let outside = request
        .prompt_token_ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab);
    if let Some((index, id)) = outside {
        return Err(DispatchError::invalid(
            format!("prompt_token_ids[{index}]"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    let ids = std::mem::take(&mut request.prompt_token_ids);
    request.prompt = tokenizer.decode(&ids);
    Ok(Some(ids))
}

/// Whether every `logit_bias` id is a token of a `vocab`-token vocabulary (the smallest
/// outside it named, so the same request names the same entry).
fn biases_in_vocabulary(request: &v1::GenerateRequest, vocab: usize) -> Result<(), DispatchError> {
    let outside = request
        .sampling
        .iter()
        .flat_map(|s| s.logit_bias.keys())
        .filter(|id| **id as usize >= vocab)
        .min();
    match outside {
        Some(id) => Err(DispatchError::invalid(
            format!("sampling.logit_bias[{id}]"),
            format!("token id outside the vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

/// Lowers the request's `max_tokens` to the room a prompt of `prompt_tokens` leaves in a
/// context of `context_length` tokens (a prompt that leaves none is left to [`fits_context`]).
fn fit_to_context(request: &mut v1::GenerateRequest, prompt_tokens: usize, context_length: u32) {
    let room = (context_length as usize).saturating_sub(prompt_tokens);
    if let Some(sampling) = request.sampling.as_mut()
        && room > 0
        && sampling.max_tokens as usize > room
    {
        sampling.max_tokens = room as u32;
    }
}

/// Whether a prompt of `prompt_tokens` and the request's `max_tokens` fit a context of
/// `context_length` tokens; the refusal names what to change.
fn fits_context(
    request: &v1::GenerateRequest,
    prompt_tokens: usize,
    context_length: u32,
) -> Result<(), DispatchError> {
    let limit = context_length as usize;
    let max_tokens = request.sampling.as_ref().map_or(0, |s| s.max_tokens) as usize;
    if request.embed && prompt_tokens >= limit {
        return Err(DispatchError::exceeds_context(
            "prompt",
            format!(
                "the input is {prompt_tokens} tokens, the model embeds at most {} tokens: \
                 shorten it",
                limit - 1
            ),
        ));
    }
    if prompt_tokens >= limit {
        let field = if request.messages.is_empty() {
            "prompt"
        } else {
            "messages"
        };
        return Err(DispatchError::exceeds_context(
            field,
            format!(
                "the prompt is {prompt_tokens} tokens, the model's context length is \
                 {context_length}: shorten it (it must leave room for at least one generated token)"
            ),
        ));
    }
    if prompt_tokens + max_tokens > limit {
        return Err(DispatchError::exceeds_context(
            "sampling.max_tokens",
            format!(
                "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) = {} exceeds the \
                 model's context length of {context_length} tokens: lower max_tokens to at most {} \
                 or shorten the prompt",
                prompt_tokens + max_tokens,
                limit - prompt_tokens
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: &str, max_tokens: u32) -> v1::GenerateRequest {
        v1::GenerateRequest {
            model: "m".into(),
            prompt: prompt.into(),
            sampling: Some(v1::SamplingParams {
                max_tokens,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_bias_outside_the_vocabulary_is_named() {
        let mut r = request("p", 4);
        let sampling = r.sampling.as_mut().expect("sampling");
        sampling.logit_bias = [(7, 1.0), (70, 1.0), (64, -1.0)].into();
        let error = biases_in_vocabulary(&r, 64).unwrap_err();
        assert_eq!(error.field(), Some("sampling.logit_bias[64]"));
        assert!(biases_in_vocabulary(&r, 71).is_ok());
    }

    #[test]
    fn a_request_that_cannot_fit_the_context_names_what_to_change() {
        assert!(fits_context(&request("p", 24), 40, 64).is_ok());
        let too_many = fits_context(&request("p", 25), 40, 64).unwrap_err();
        assert_eq!(too_many.field(), Some("sampling.max_tokens"));
        assert!(
            too_many
                .to_string()
                .contains("lower max_tokens to at most 24"),
            "{too_many}"
        );
        let long_prompt = fits_context(&request("p", 1), 64, 64).unwrap_err();
        assert_eq!(long_prompt.field(), Some("prompt"));
        let mut chat = request("", 1);
        chat.messages = vec![v1::ChatMessage {
            role: "user".into(),
            content: "x".into(),
            ..Default::default()
        }];
        let long_chat = fits_context(&chat, 70, 64).unwrap_err();
        assert_eq!(long_chat.field(), Some("messages"));
        assert!(long_chat.to_string().contains("70 tokens"), "{long_chat}");
    }

    #[test]
    fn an_embedding_bounds_its_output_to_one_and_its_input_to_the_context() {
        let mut embed = request("p", 0);
        embed.embed = true;
        bound_output(&mut embed, 4096);
        assert_eq!(embed.sampling.as_ref().map(|s| s.max_tokens), Some(1));
        assert!(fits_context(&embed, 63, 64).is_ok());
        let long = fits_context(&embed, 64, 64).unwrap_err();
        assert_eq!(long.field(), Some("prompt"));
        assert!(
            long.to_string().contains("embeds at most 63 tokens"),
            "{long}"
        );
    }

    #[test]
    fn a_request_naming_no_max_tokens_gets_the_default_within_the_cap() {
        let mut unbounded = request("p", 0);
        assert_eq!(bound_output(&mut unbounded, 4096), OutputBound::Default);
        assert_eq!(
            unbounded.sampling.expect("sampling").max_tokens,
            DEFAULT_MAX_TOKENS
        );
        let mut no_sampling = v1::GenerateRequest::default();
        assert_eq!(bound_output(&mut no_sampling, 8), OutputBound::Default);
        assert_eq!(no_sampling.sampling.expect("sampling").max_tokens, 8);
        let mut asked = request("p", 5);
        assert_eq!(bound_output(&mut asked, 4096), OutputBound::Asked);
        assert_eq!(asked.sampling.expect("sampling").max_tokens, 5);
    }

    #[test]
    fn a_default_max_tokens_is_lowered_to_the_room_the_prompt_leaves() {
        let max_tokens = |prompt_tokens, asked| {
            let mut r = request("p", asked);
            fit_to_context(&mut r, prompt_tokens, 64);
            r.sampling.expect("sampling").max_tokens
        };
        assert_eq!(max_tokens(40, 256), 24);
        assert_eq!(max_tokens(40, 10), 10, "a bound that fits stays");
        // No room at all: left as it is, for `fits_context` to refuse the prompt.
        assert_eq!(max_tokens(64, 256), 256);
    }
}
