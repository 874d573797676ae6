//! How the router's front doors answered, per API, each second: what an on-call engineer
//! reads first when one kind of client breaks (an SDK upgrade sending a field that is refused,
//! a client hitting a path that does not exist) while the others are fine.
//!
//! HTTP counts every answer of a route by its status; gRPC counts every request by how it
//! ended (a `Session` carries many), so both say "requests answered" in one set of classes. A
//! `Session`'s request is counted as its last frame goes out: one still running when the
//! session's stream breaks is not counted.

use std::collections::BTreeMap;

use switchyard_proto::v1::{self, server_frame::Frame};
use tonic::Code;

/// The API a gRPC `Session`'s requests are counted under.
pub const GRPC_SESSION: &str = "grpc_session";
/// The API `Generate` calls are counted under.
pub const GRPC_GENERATE: &str = "grpc_generate";

/// How a request was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// Refused for what the client sent.
    ClientError,
    /// Shed, or over a quota.
    RateLimited,
    /// The cluster failed it.
    ServerError,
    /// The client cancelled it or went away first.
    Cancelled,
}

impl Answer {
    const COUNT: usize = 5;

    fn index(self) -> usize {
        self as usize
    }

    pub fn of_http(status: u16) -> Self {
        match status {
            429 => Answer::RateLimited,
            400..=499 => Answer::ClientError,
            500.. => Answer::ServerError,
            _ => Answer::Ok,
        }
    }

    pub fn of_grpc(code: Code) -> Self {
        match code {
            Code::Ok => Answer::Ok,
            Code::Cancelled => Answer::Cancelled,
            Code::ResourceExhausted => Answer::RateLimited,
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Unauthenticated => Answer::ClientError,
            Code::Unknown
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss => Answer::ServerError,
        }
    }
}

/// The code a frame ends its request with (`OK` for a finished one, `CANCELLED` for one the
/// client cancelled); `None` for a frame that ends none (a refused `cancel` or `interrupt`
/// leaves its request running).
pub fn ending_code(frame: &Frame) -> Option<Code> {
    match frame {
        Frame::Finished(finished) if finished.reason == v1::FinishReason::Cancelled as i32 => {
            Some(Code::Cancelled)
        }
        Frame::Finished(_) => Some(Code::Ok),
        Frame::Failed(failed) => Some(Code::from_i32(failed.code)),
        Frame::Rejected(rejected) if rejected.frame == "start" => {
            Some(Code::from_i32(rejected.code))
        }
        _ => None,
    }
}

/// One second's answers per API. The API names are the router's own constants, so the map
/// stays as small as the set of routes.
#[derive(Debug, Default)]
pub(super) struct ApiCounts {
    apis: BTreeMap<&'static str, [u32; Answer::COUNT]>,
}

impl ApiCounts {
    pub(super) fn add(&mut self, api: &'static str, answer: Answer) {
        self.apis.entry(api).or_default()[answer.index()] += 1;
    }

    pub(super) fn to_proto(&self) -> Vec<v1::ApiAnswers> {
        self.apis
            .iter()
            .map(|(api, counts)| v1::ApiAnswers {
                api: api.to_string(),
                ok: counts[Answer::Ok.index()],
                client_errors: counts[Answer::ClientError.index()],
                rate_limited: counts[Answer::RateLimited.index()],
                server_errors: counts[Answer::ServerError.index()],
                cancelled: counts[Answer::Cancelled.index()],
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_fall_in_the_same_classes() {
        for (status, code, answer) in [
            (200, Code::Ok, Answer::Ok),
            (400, Code::InvalidArgument, Answer::ClientError),
            (401, Code::Unauthenticated, Answer::ClientError),
            (404, Code::NotFound, Answer::ClientError),
            (429, Code::ResourceExhausted, Answer::RateLimited),
            (500, Code::Internal, Answer::ServerError),
            (503, Code::Unavailable, Answer::ServerError),
        ] {
            assert_eq!(Answer::of_http(status), answer, "{status}");
            assert_eq!(Answer::of_grpc(code), answer, "{code:?}");
        }
        assert_eq!(Answer::of_grpc(Code::Cancelled), Answer::Cancelled);
    }

    #[test]
    fn a_request_is_answered_by_the_frame_that_ends_it() {
        let finished = |reason: v1::FinishReason| {
            Frame::Finished(v1::Finished {
                reason: reason as i32,
                ..Default::default()
            })
        };
        let rejected = |frame: &str| {
            Frame::Rejected(v1::Rejected {
                frame: frame.into(),
                code: Code::InvalidArgument as i32,
                ..Default::default()
            })
        };
        let failed = Frame::Failed(v1::Failed {
            code: Code::ResourceExhausted as i32,
            ..Default::default()
        });
        assert_eq!(
            ending_code(&finished(v1::FinishReason::Stop)),
            Some(Code::Ok)
        );
        assert_eq!(
            ending_code(&finished(v1::FinishReason::Cancelled)),
            Some(Code::Cancelled)
        );
        assert_eq!(ending_code(&failed), Some(Code::ResourceExhausted));
        assert_eq!(ending_code(&rejected("start")), Some(Code::InvalidArgument));
        assert_eq!(ending_code(&rejected("cancel")), None);
        assert_eq!(ending_code(&Frame::Tokens(Default::default())), None);
    }

    #[test]
    fn counts_go_out_per_api_and_class() {
        let mut counts = ApiCounts::default();
        counts.add("completions", Answer::Ok);
        counts.add("completions", Answer::Ok);
        counts.add("completions", Answer::ClientError);
        counts.add(GRPC_SESSION, Answer::Cancelled);
        let sent = counts.to_proto();
        assert_eq!(
            sent,
            vec![
                v1::ApiAnswers {
                    api: "completions".into(),
                    ok: 2,
                    client_errors: 1,
                    ..Default::default()
                },
                v1::ApiAnswers {
                    api: GRPC_SESSION.into(),
                    cancelled: 1,
                    ..Default::default()
                },
            ]
        );
    }
}
