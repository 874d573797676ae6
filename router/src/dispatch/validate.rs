//! Stage 1: is the request one the router can serve as asked? Limits and fields are checked
//! (`INVALID_ARGUMENT` naming the field), then the prompt is tokenized once with the workers'
//! own tokenizer, for the exact prompt length, the prefix index and the worker.

use switchyard_proto::v1;
use switchyard_proto::validate_generate_request;

use super::Dispatcher;
use crate::error::DispatchError;

impl Dispatcher {
    /// The request's prompt token ids (chat template applied), or why it is invalid. Empty
    /// ids: the router has no tokenizer for the model yet (the worker tokenizes).
    pub(super) fn validate(
        &self,
        request: &v1::GenerateRequest,
    ) -> Result<Vec<u32>, DispatchError> {
        validate_generate_request(request, &self.config.limits).map_err(DispatchError::from)?;
        Ok(self
            .links
            .tokenizers()
            .tokenize(request)
            .unwrap_or_default())
    }
}
