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

    /// The HTTP form of a gRPC status from the dispatcher (or of a worker's `Failed` frame).
    pub fn from_code(code: Code, message: &str) -> Self {
        // Speak OpenAI's field names: `sampling.max_tokens` is `max_tokens` to this client.
        let message = message.strip_prefix("sampling.").unwrap_or(message);
        // The dispatcher's messages name the field first ("field: problem").
        let field = message
            .split_once(": ")
            .map(|(field, _)| field)
            .filter(|f| !f.contains(' '))
            .map(openai_field);
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

    /// The HTTP form of a dispatcher status; a shed status keeps the policy's `retry-after`.
    pub fn from_status(status: &tonic::Status) -> Self {
        let retry_after_ms = status
            .metadata()
            .get(crate::dispatch::RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        Self::from_code(status.code(), status.message()).with_retry_after_ms(retry_after_ms)
    }

    /// The HTTP form of a `Failed` frame (its `retry_after_ms` is set when the router shed it).
    pub fn from_failed(failed: &switchyard_proto::v1::Failed) -> Self {
        Self::from_code(Code::from_i32(failed.code), &failed.message).with_retry_after_ms(
            (failed.retry_after_ms > 0).then_some(u64::from(failed.retry_after_ms)),
        )
    }

    /// Sets `Retry-After` from a policy figure in milliseconds, rounded up to whole seconds as
    /// the gRPC `retry-after` metadata is (see [`crate::dispatch::shed_status`]).
    fn with_retry_after_ms(mut self, retry_after_ms: Option<u64>) -> Self {
        self.retry_after_secs = retry_after_ms.map(crate::dispatch::retry_after_secs);
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

/// Proto field paths in dispatcher messages → OpenAI request fields.
fn openai_field(field: &str) -> String {
    field.strip_prefix("sampling.").unwrap_or(field).to_string()
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

    #[test]
    fn dispatcher_statuses_map_to_openai_errors() {
        let e = ApiError::from_code(
            Code::InvalidArgument,
            "sampling.max_tokens: is 9000, the limit is 4096",
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert_eq!(e.message, "max_tokens: is 9000, the limit is 4096");
        let e = ApiError::from_code(Code::NotFound, "model: unknown model \"x\"");
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(e.code, Some("model_not_found"));
        let e = ApiError::from_code(Code::ResourceExhausted, "all slots busy");
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::from_code(Code::Unavailable, "no worker serves model x");
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
        // The dispatcher's shed status (gRPC door: `retry-after` metadata)...
        let status = crate::dispatch::shed_status("queue full".into(), 2_500);
        let grpc_secs = status
            .metadata()
            .get(crate::dispatch::RETRY_AFTER)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(grpc_secs, "3");
        // ...gives the HTTP door the same `Retry-After`.
        let e = ApiError::from_status(&status);
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            e.into_response().headers()[header::RETRY_AFTER],
            grpc_secs.as_str()
        );
        // The session form: a `Failed` frame carrying the policy's figure.
        let failed =
            crate::dispatch::failed_frame("r", &crate::dispatch::shed_status("x".into(), 7_000));
        let Some(switchyard_proto::v1::server_frame::Frame::Failed(failed)) = failed.frame else {
            panic!("a failed frame")
        };
        let response = ApiError::from_failed(&failed).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
    }
}
