//! Why the router could not serve a request (or serve it to its end), as one type. Each front
//! door converts it in exactly one place: [`DispatchError::status`] for a gRPC call,
//! [`DispatchError::failed_frame`] for a request's `Failed` frame, and
//! `ApiError::from(&DispatchError)` (`openai/error.rs`) for an OpenAI error body — so the
//! field at fault and `retry-after` travel as values, never parsed back out of message text.

use switchyard_proto::v1::{self, server_frame::Frame};
use tonic::{Code, Status};

use crate::tenant_quota::QuotaExceeded;

/// gRPC metadata: seconds before a shed request may be retried (as HTTP's `Retry-After`).
pub const RETRY_AFTER: &str = "retry-after";
/// gRPC metadata: the same in milliseconds, as the policy decided it.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// A request field breaks a rule (`INVALID_ARGUMENT`). `exceeds_context`: the rule is the
    /// model's context length, which OpenAI clients tell apart by its own error code.
    #[error("{field}: {reason}")]
    Invalid {
        field: String,
        reason: String,
        exceeds_context: bool,
    },
    /// No worker serves, or has served, this model (`NOT_FOUND`).
    #[error("model: {0}")]
    UnknownModel(String),
    /// Nothing can take the request right now: a known model with no worker, a router not
    /// ready, a worker that left (`UNAVAILABLE`: retry).
    #[error("{0}")]
    Unavailable(String),
    /// Shed by the routing policy under load (`RESOURCE_EXHAUSTED` with `retry-after`).
    #[error("{message}")]
    Shed {
        message: String,
        retry_after_ms: u64,
    },
    /// Refused by the tenant's quota (`RESOURCE_EXHAUSTED` with `retry-after`, or
    /// `PERMISSION_DENIED` for a lane the tenant may not use).
    #[error("{}", .0.message)]
    OverQuota(QuotaExceeded),
    /// A session-level limit or misuse, e.g. too many requests on one session
    /// (`RESOURCE_EXHAUSTED`, no `retry-after`: the client decides when).
    #[error("{0}")]
    SessionLimit(String),
    /// Cancel or interrupt for a request this session does not run (`NOT_FOUND`).
    #[error("request_id: no running request {0:?} in this session")]
    NotRunning(String),
    /// The worker failed the request with this status.
    #[error("{message}")]
    Worker { code: Code, message: String },
    /// The client went away before the request ended (`CANCELLED`).
    #[error("client went away")]
    ClientGone,
}

impl DispatchError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
            exceeds_context: false,
        }
    }

    /// What a worker's `Failed` frame means to the client: a refusal naming a field is the
    /// request's fault, as if the router had found it (the field, and a context overflow,
    /// travel as values, so every door names them); anything else is the worker's status.
    pub fn from_worker(failed: v1::Failed) -> Self {
        let code = Code::from_i32(failed.code);
        if code != Code::InvalidArgument || failed.field.is_empty() {
            return Self::Worker {
                code,
                message: failed.message,
            };
        }
        let reason = failed
            .message
            .strip_prefix(&failed.field)
            .and_then(|rest| rest.strip_prefix(": "))
            .map_or_else(|| failed.message.clone(), str::to_string);
        Self::Invalid {
            field: failed.field,
            reason,
            exceeds_context: failed.reason == switchyard_proto::CONTEXT_LENGTH_EXCEEDED,
        }
    }

    /// The prompt, or the prompt and `max_tokens` together, do not fit the model's context.
    pub fn exceeds_context(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: reason.into(),
            exceeds_context: true,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::Invalid { .. } => Code::InvalidArgument,
            Self::UnknownModel(_) | Self::NotRunning(_) => Code::NotFound,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Shed { .. } | Self::SessionLimit(_) => Code::ResourceExhausted,
            Self::OverQuota(q) if q.retry_after_ms.is_none() => Code::PermissionDenied,
            Self::OverQuota(_) => Code::ResourceExhausted,
            Self::Worker { code, .. } => *code,
            Self::ClientGone => Code::Cancelled,
        }
    }

    /// The request field at fault, in the request's own naming (`sampling.max_tokens`).
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            Self::UnknownModel(_) => Some("model"),
            Self::NotRunning(_) => Some("request_id"),
            _ => None,
        }
    }

    /// `Failed.reason`: what a client can act on beyond the code, when something applies.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            Self::Invalid {
                exceeds_context: true,
                ..
            } => Some(switchyard_proto::CONTEXT_LENGTH_EXCEEDED),
            _ => None,
        }
    }

    /// When the client may retry, if the router decided it.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::Shed { retry_after_ms, .. } => Some(*retry_after_ms),
            Self::OverQuota(q) => q.retry_after_ms,
            _ => None,
        }
    }

    /// The gRPC status: code, message and, when the router decided one, `retry-after`
    /// (seconds) and `retry-after-ms` metadata.
    pub fn status(&self) -> Status {
        status_with_retry(self.code(), self.to_string(), self.retry_after_ms())
    }

    /// The `Failed` frame ending request `request_id`.
    pub fn failed_frame(&self, request_id: &str) -> v1::ServerFrame {
        v1::ServerFrame {
            frame: Some(Frame::Failed(v1::Failed {
                request_id: request_id.to_string(),
                code: self.code() as i32,
                message: self.to_string(),
                retry_after_ms: self
                    .retry_after_ms()
                    .map(|ms| u32::try_from(ms).unwrap_or(u32::MAX))
                    .unwrap_or(0),
                field: self.field().unwrap_or_default().to_string(),
                reason: self.reason().unwrap_or_default().to_string(),
            })),
        }
    }
}

impl DispatchError {
    /// The `Rejected` frame refusing a client `frame` ("start", "cancel", "interrupt") about
    /// `request_id`: unlike `Failed`, it ends no request.
    pub fn rejected_frame(&self, frame: &str, request_id: &str) -> v1::ServerFrame {
        v1::ServerFrame {
            frame: Some(Frame::Rejected(v1::Rejected {
                request_id: request_id.to_string(),
                frame: frame.to_string(),
                code: self.code() as i32,
                message: self.to_string(),
                field: self.field().unwrap_or_default().to_string(),
            })),
        }
    }
}

impl From<DispatchError> for Status {
    fn from(error: DispatchError) -> Self {
        error.status()
    }
}

impl From<switchyard_proto::FieldViolation> for DispatchError {
    fn from(violation: switchyard_proto::FieldViolation) -> Self {
        Self::invalid(violation.field, violation.message)
    }
}

/// The gRPC status a `Generate` call ends with after its `Failed` frame: the frame's code,
/// message and `retry-after` as [`DispatchError::status`] gives them.
pub fn failed_status(failed: &v1::Failed) -> Status {
    status_with_retry(
        Code::from_i32(failed.code),
        failed.message.clone(),
        (failed.retry_after_ms > 0).then_some(u64::from(failed.retry_after_ms)),
    )
}

fn status_with_retry(code: Code, message: String, retry_after_ms: Option<u64>) -> Status {
    let mut status = Status::new(code, message);
    if let Some(ms) = retry_after_ms {
        let metadata = status.metadata_mut();
        metadata.insert(
            RETRY_AFTER,
            retry_after_secs(ms)
                .to_string()
                .parse()
                .expect("digits are ascii"),
        );
        metadata.insert(
            RETRY_AFTER_MS,
            ms.to_string().parse().expect("digits are ascii"),
        );
    }
    status
}

/// Whole seconds of `Retry-After` for `retry_after_ms`: rounded up, at least 1.
pub fn retry_after_secs(retry_after_ms: u64) -> u64 {
    retry_after_ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant_quota::QuotaLimit;

    #[test]
    fn each_error_keeps_its_code_field_and_retry_after_on_every_form() {
        let invalid = DispatchError::invalid("sampling.max_tokens", "is 9000, the limit is 4096");
        assert_eq!(invalid.status().code(), Code::InvalidArgument);
        assert_eq!(
            invalid.status().message(),
            "sampling.max_tokens: is 9000, the limit is 4096"
        );
        let Some(Frame::Failed(failed)) = invalid.failed_frame("r1").frame else {
            panic!("a Failed frame");
        };
        assert_eq!(
            (failed.field.as_str(), failed.code, failed.retry_after_ms),
            ("sampling.max_tokens", Code::InvalidArgument as i32, 0)
        );

        let shed = DispatchError::Shed {
            message: "cost-sensitive queue is full; request shed".into(),
            retry_after_ms: 1_500,
        };
        let status = shed.status();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get(RETRY_AFTER).unwrap(), "2");
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).unwrap(), "1500");
        let Some(Frame::Failed(failed)) = shed.failed_frame("r2").frame else {
            panic!("a Failed frame");
        };
        assert_eq!(failed.retry_after_ms, 1_500);

        let lane = DispatchError::OverQuota(QuotaExceeded {
            limit: QuotaLimit::Lane,
            message: "tenant \"a\" may not use the latency-critical lane".into(),
            retry_after_ms: None,
        });
        assert_eq!(lane.status().code(), Code::PermissionDenied);
        assert!(lane.status().metadata().get(RETRY_AFTER).is_none());
        assert_eq!(
            DispatchError::UnknownModel("x".into()).field(),
            Some("model")
        );
        assert_eq!(DispatchError::ClientGone.code(), Code::Cancelled);
    }

    #[test]
    fn a_workers_context_refusal_reaches_the_client_as_the_routers_own_would() {
        let ours = DispatchError::exceeds_context(
            "sampling.max_tokens",
            "prompt (200 tokens) + max_tokens (100) = 300 exceeds the model's context length of 256 tokens",
        );
        let Some(Frame::Failed(wire)) = ours.failed_frame("r").frame else {
            panic!("a Failed frame");
        };
        assert_eq!(wire.reason, switchyard_proto::CONTEXT_LENGTH_EXCEEDED);
        // The same frame coming back from a worker is the same error.
        assert_eq!(DispatchError::from_worker(wire), ours);

        // A field named without the context reason is a plain invalid field.
        let plain = DispatchError::from_worker(v1::Failed {
            code: Code::InvalidArgument as i32,
            message: "prompt: tokenizes to no tokens".into(),
            field: "prompt".into(),
            ..Default::default()
        });
        assert_eq!(
            plain,
            DispatchError::invalid("prompt", "tokenizes to no tokens")
        );
        assert_eq!(plain.reason(), None);

        // No field, or another code: the worker's status as it sent it.
        for (code, field) in [(Code::InvalidArgument, ""), (Code::Unavailable, "prompt")] {
            let failed = v1::Failed {
                code: code as i32,
                message: "engine says no".into(),
                field: field.into(),
                ..Default::default()
            };
            assert_eq!(
                DispatchError::from_worker(failed),
                DispatchError::Worker {
                    code,
                    message: "engine says no".into(),
                }
            );
        }
    }
}
