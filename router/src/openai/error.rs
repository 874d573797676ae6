//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP
//! status. The one place where Switchyard's status codes map to HTTP.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::Code;

/// Seconds a client is told to wait before retrying when the router gave no figure (a worker
/// or the cluster refused, not the policy's shedding).
const DEFAULT_RETRY_AFTER_SECS: u64 = 1;

/// An error as an OpenAI client receives it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's error `type`, e.g. `invalid_request_error`.
    pub kind: &'static str,
    /// The request field at fault, in OpenAI's naming.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// `Retry-After` seconds decided by the routing policy when it shed the request (the value
    /// the gRPC `retry-after` metadata carries); `None` = the default.
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// 400 for a request field that breaks a rule.
    pub fn invalid(param: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let param = param.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("{param}: {message}"),
            kind: "invalid_request_error",
            param: Some(param),
            code: Some("invalid_value"),
            retry_after_secs: None,
        }
    }

    /// 400 for a body that is not the JSON object the endpoint expects.
    pub fn bad_body(message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: format!("request body: {message}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_secs: None,
        }
    }

    pub fn not_found(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: if param == Some("model") {
                Some("model_not_found")
            } else {
                None
            },
            retry_after_secs: None,
        }
    }

    /// 401 for a missing, malformed or unknown API key.
    pub fn unauthenticated(error: crate::auth::AuthError) -> Self {
        Self::from_code(Code::Unauthenticated, &error.to_string())
    }

    /// The HTTP form of `code` with `message`, naming no request field.
    pub fn from_code(code: Code, message: &str) -> Self {
        Self::classified(code, message, None)
    }

    /// The HTTP form of `code` with `message`, `field` being the request field at fault.
    fn classified(code: Code, message: &str, field: Option<&str>) -> Self {
        // Speak OpenAI's field names: `sampling.max_tokens` is `max_tokens` to this client.
        let renamed;
        let message = match (
            message.strip_prefix("sampling.prompt_logprobs"),
            message.strip_prefix("affinity_key"),
            message.strip_prefix("prompt_token_ids"),
        ) {
            // A text completion scores its prompt to echo it.
            (Some(rest), _, _) => {
                renamed = format!("echo{rest}");
                renamed.as_str()
            }
            (_, Some(rest), _) => {
                renamed = format!("user{rest}");
                renamed.as_str()
            }
            (_, _, Some(rest)) => {
                renamed = format!("prompt{rest}");
                renamed.as_str()
            }
            _ => message.strip_prefix("sampling.").unwrap_or(message),
        };
        let field = field.map(openai_field);
        let (status, kind, code_name) = match code {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_value"),
            ),
            Code::NotFound => {
                return Self::not_found(field.as_deref(), message);
            }
            Code::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            Code::ResourceExhausted => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("no_capacity"),
            ),
            Code::DeadlineExceeded => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", Some("timeout"))
            }
            Code::Cancelled => (
                StatusCode::from_u16(499).expect("valid"),
                "server_error",
                None,
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        Self {
            status,
            message: message.to_string(),
            kind,
            param: if status == StatusCode::BAD_REQUEST {
                field
            } else {
                None
            },
            code: code_name,
            retry_after_secs: None,
        }
    }

    /// The HTTP form of a status that is not the dispatcher's (e.g. a session stream that
    /// failed); keeps any `retry-after-ms` it carries.
    pub fn from_status(status: &tonic::Status) -> Self {
        let retry_after_ms = status
            .metadata()
            .get(crate::error::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Self::from_code(status.code(), status.message()).with_retry_after_ms(retry_after_ms)
    }

    /// The HTTP form of a `Failed` frame: its field, its reason and its `retry_after_ms` (set
    /// when the router shed it) as values.
    pub fn from_failed(failed: &switchyard_proto::v1::Failed) -> Self {
        let field = (!failed.field.is_empty()).then_some(failed.field.as_str());
        let mut api = Self::classified(Code::from_i32(failed.code), &failed.message, field)
            .with_retry_after_ms(
                (failed.retry_after_ms > 0).then_some(u64::from(failed.retry_after_ms)),
            );
        if failed.reason == switchyard_proto::CONTEXT_LENGTH_EXCEEDED {
            api.code = Some("context_length_exceeded");
        }
        api
    }

    /// The error in the words of a client that bounded its output with `field`
    /// (`max_completion_tokens`, OpenAI's newer name) rather than `max_tokens`.
    pub fn naming_max_tokens(mut self, field: &str) -> Self {
        if self.param.as_deref() == Some("max_tokens") && field != "max_tokens" {
            self.message = self.message.replace("max_tokens", field);
            self.param = Some(field.to_string());
        }
        self
    }

    /// The error in the words of a door whose requests name their fields otherwise than chat
    /// completions do (the Responses API's `input[3].call_id` for `messages[2].tool_call_id`):
    /// `rename` maps the field at fault, `None` keeps it. The message's leading field, which
    /// may be in the dispatcher's own naming, becomes the new name too.
    pub fn renaming_param(mut self, rename: impl Fn(&str) -> Option<String>) -> Self {
        let Some(renamed) = self.param.as_deref().and_then(rename) else {
            return self;
        };
        if let Some((_, reason)) = self
            .message
            .split_once(": ")
            .filter(|(head, _)| !head.contains(' '))
        {
            self.message = format!("{renamed}: {reason}");
        }
        self.param = Some(renamed);
        self
    }

    /// Sets `Retry-After` from a policy figure in milliseconds, rounded up to whole seconds as
    /// the gRPC `retry-after` metadata is (see [`crate::error::DispatchError::status`]).
    fn with_retry_after_ms(mut self, retry_after_ms: Option<u64>) -> Self {
        self.retry_after_secs = retry_after_ms.map(crate::error::retry_after_secs);
        self
    }

    /// The JSON body, also sent as an SSE `data:` event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<&crate::error::DispatchError> for ApiError {
    /// The HTTP form of a dispatcher error: its code, field and `retry-after` as values.
    fn from(error: &crate::error::DispatchError) -> Self {
        let mut api = Self::classified(error.code(), &error.to_string(), error.field())
            .with_retry_after_ms(error.retry_after_ms());
        // OpenAI's code for a prompt (or prompt and output bound) longer than the context:
        // clients that trim old turns and retry look for it.
        if let crate::error::DispatchError::Invalid {
            exceeds_context: true,
            ..
        } = error
        {
            api.code = Some("context_length_exceeded");
        }
        api
    }
}

/// Proto field paths in dispatcher messages → OpenAI request fields.
fn openai_field(field: &str) -> String {
    match field {
        // The door sends OpenAI's `user` as the affinity key.
        "affinity_key" => "user".to_string(),
        "tool_choice.mode" => "tool_choice".to_string(),
        "sampling.response_format.kind" => "response_format.type".to_string(),
        "sampling.response_format.schema_json" => "response_format.json_schema.schema".to_string(),
        "tool_choice.function" => "tool_choice.function.name".to_string(),
        "sampling.prompt_logprobs" => "echo".to_string(),
        // A prompt of token ids is OpenAI's `prompt` too.
        field if field.starts_with("prompt_token_ids") => field.replacen("_token_ids", "", 1),
        field if field.starts_with("tools[") || field.contains(".tool_calls[") => field
            .replace(".parameters_json", ".function.parameters")
            .replace(".description", ".function.description")
            .replace(".name", ".function.name")
            .replace(".arguments", ".function.arguments"),
        field => field.strip_prefix("sampling.").unwrap_or(field).to_string(),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            let secs = self.retry_after_secs.unwrap_or(DEFAULT_RETRY_AFTER_SECS);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::DispatchError;

    #[test]
    fn the_affinity_key_is_the_users_field_to_an_openai_client() {
        let e = ApiError::from(&DispatchError::invalid(
            "affinity_key",
            "is 300 bytes, the limit is 256",
        ));
        assert_eq!(e.param.as_deref(), Some("user"));
        assert!(e.message.starts_with("user: is 300 bytes"), "{}", e.message);
    }

    #[test]
    fn a_prompt_of_token_ids_is_the_prompt_to_an_openai_client() {
        let e = ApiError::from(&DispatchError::invalid(
            "prompt_token_ids[3]",
            "token id 99999 is outside the vocabulary of 49152",
        ));
        assert_eq!(e.param.as_deref(), Some("prompt[3]"));
        assert!(
            e.message.starts_with("prompt[3]: token id"),
            "{}",
            e.message
        );
        let in_a_batch =
            e.renaming_param(|p| Some(format!("prompt[1]{}", p.strip_prefix("prompt")?)));
        assert_eq!(in_a_batch.param.as_deref(), Some("prompt[1][3]"));
        assert!(
            in_a_batch.message.starts_with("prompt[1][3]: "),
            "{}",
            in_a_batch.message
        );
    }

    #[test]
    fn a_max_tokens_error_speaks_the_field_the_client_used() {
        let error = || {
            ApiError::from(&DispatchError::invalid(
                "sampling.max_tokens",
                "is 9000, the limit is 4096",
            ))
        };
        let renamed = error().naming_max_tokens("max_completion_tokens");
        assert_eq!(renamed.param.as_deref(), Some("max_completion_tokens"));
        assert_eq!(
            renamed.message,
            "max_completion_tokens: is 9000, the limit is 4096"
        );
        assert_eq!(
            error().naming_max_tokens("max_tokens").message,
            error().message
        );
        let other = ApiError::from(&DispatchError::invalid("sampling.top_p", "is 2"))
            .naming_max_tokens("max_completion_tokens");
        assert_eq!(other.param.as_deref(), Some("top_p"));
    }

    #[test]
    fn a_request_longer_than_the_context_has_openais_code() {
        let e = ApiError::from(&DispatchError::exceeds_context(
            "messages",
            "the prompt is 631 tokens, the model's context length is 512",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        let e = ApiError::from(&DispatchError::exceeds_context(
            "sampling.max_tokens",
            "prompt (31 tokens) + max_tokens (500) = 531 exceeds the model's context length",
        ))
        .naming_max_tokens("max_completion_tokens");
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        assert_eq!(e.code, Some("context_length_exceeded"));
        // Any other invalid field keeps the general code.
        let e = ApiError::from(&DispatchError::invalid("sampling.top_p", "is 2"));
        assert_eq!(e.code, Some("invalid_value"));
        // The session form of a refusal (a `Failed` frame, as a stream that fails after it was
        // accepted ends) says the same.
        let refusal = DispatchError::exceeds_context("prompt", "the prompt is 631 tokens");
        let Some(switchyard_proto::v1::server_frame::Frame::Failed(failed)) =
            refusal.failed_frame("r").frame
        else {
            panic!("a failed frame")
        };
        let (direct, framed) = (ApiError::from(&refusal), ApiError::from_failed(&failed));
        assert_eq!(
            (framed.status, framed.param, framed.code, framed.message),
            (direct.status, direct.param, direct.code, direct.message)
        );
    }

    #[test]
    fn dispatcher_errors_map_to_openai_errors() {
        let e = ApiError::from(&DispatchError::invalid(
            "sampling.max_tokens",
            "is 9000, the limit is 4096",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "max_tokens: is 9000, the limit is 4096");
        let e = ApiError::from(&DispatchError::UnknownModel("unknown model \"x\"".into()));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.param.as_deref(), Some("model"));
        assert_eq!(e.code, Some("model_not_found"));
        let e = ApiError::from_code(Code::ResourceExhausted, "all slots busy");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::from(&DispatchError::Unavailable(
            "no worker serves model x".into(),
        ));
        assert_eq!(
            e.clone().into_response().headers()[header::RETRY_AFTER],
            "1"
        );
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.param, None);
        let e = ApiError::from_code(Code::Unauthenticated, "missing api key");
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_shed_request_is_told_the_policys_retry_after() {
        let shed = DispatchError::Shed {
            message: "queue full".into(),
            retry_after_ms: 2_500,
        };
        // The gRPC door's `retry-after` metadata...
        let status = shed.status();
        let grpc_secs = status
            .metadata()
            .get(crate::error::RETRY_AFTER)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(grpc_secs, "3");
        // ...and the HTTP door's `Retry-After` say the same.
        let e = ApiError::from(&shed);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            e.into_response().headers()[header::RETRY_AFTER],
            grpc_secs.as_str()
        );
        // The session form: a `Failed` frame carrying the policy's figure and the field.
        let failed = DispatchError::Shed {
            message: "x".into(),
            retry_after_ms: 7_000,
        }
        .failed_frame("r");
        let Some(switchyard_proto::v1::server_frame::Frame::Failed(failed)) = failed.frame else {
            panic!("a failed frame")
        };
        let response = ApiError::from_failed(&failed).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        let failed =
            DispatchError::invalid("sampling.temperature", "must be at most 2").failed_frame("r");
        let Some(switchyard_proto::v1::server_frame::Frame::Failed(failed)) = failed.frame else {
            panic!("a failed frame")
        };
        assert_eq!(
            ApiError::from_failed(&failed).param.as_deref(),
            Some("temperature")
        );
    }
}
