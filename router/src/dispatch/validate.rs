//! Stage 1: is the request one the router can serve as asked? Limits and fields are checked
//! (`INVALID_ARGUMENT` naming the field), then the prompt is tokenized once with the workers'
//! own tokenizer, for the exact prompt length, the prefix index and the worker — a long prompt
//! on the blocking pool, so that its milliseconds of encoding hold no runtime thread.

use switchyard_proto::v1;
use switchyard_proto::validate_generate_request;

use super::Dispatcher;
use crate::error::DispatchError;
use crate::tokenizers::tokenizes_long;

impl Dispatcher {
    /// The request's prompt token ids (chat template applied), or why it is invalid. Empty
    /// ids: the router has no tokenizer for the model yet (the worker tokenizes). `tokenized`
    /// holds them when they were computed already (off the runtime's threads, for a long
    /// prompt): only the limits are checked then.
    pub(super) fn validate(
        &self,
        request: &v1::GenerateRequest,
        tokenized: Option<Vec<u32>>,
    ) -> Result<Vec<u32>, DispatchError> {
        validate_generate_request(request, &self.config.limits).map_err(DispatchError::from)?;
        Ok(tokenized.unwrap_or_else(|| {
            self.links
                .tokenizers()
                .tokenize(request)
                .unwrap_or_default()
        }))
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
