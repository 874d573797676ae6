//! A request the router cannot decode is the client's fault, not the server's: tonic reports
//! one as `INTERNAL` (bytes that are not a message, a missing or truncated one, a bad
//! compression flag) or `OUT_OF_RANGE` (one over the size limit). [`client_fault`] tells those
//! reports apart from the router's own faults, for both front doors: a `Session` reads them
//! from its request stream ([`crate::session`]); a `Generate` call gets them before any
//! handler runs, so [`as_client_fault`] rewrites its response's status. The control plane's
//! gRPC server applies [`as_client_fault`] too.

use http::HeaderValue;
use tonic::{Code, Status};

/// How tonic's reports of a request it could not read begin.
const UNREADABLE: [&str; 5] = [
    "failed to decode Protobuf message",
    "Missing request message",
    "Unexpected EOF decoding",
    // A bad compression flag, or the flag set without an encoding.
    "protocol error: received message with",
    "Error decompressing",
];
const TOO_LARGE: [&str; 2] = [
    "Error, decoded message length too large",
    "Error decompressing: size limit",
];

/// The code a client should get for `status` when it is tonic's report of a request it could
/// not read: `INVALID_ARGUMENT`, or `RESOURCE_EXHAUSTED` for one over the size limit; `None`
/// for any other status.
pub fn client_fault(status: &Status) -> Option<Code> {
    let message = status.message();
    match status.code() {
        Code::Internal if UNREADABLE.iter().any(|start| message.starts_with(start)) => {
            Some(Code::InvalidArgument)
        }
        Code::OutOfRange | Code::ResourceExhausted
            if TOO_LARGE.iter().any(|start| message.starts_with(start)) =>
        {
            Some(Code::ResourceExhausted)
        }
        _ => None,
    }
}

/// The response with a decoding failure's status changed to the client-fault code.
pub fn as_client_fault<B>(mut response: http::Response<B>) -> http::Response<B> {
    let code = Status::from_header_map(response.headers()).and_then(|s| client_fault(&s));
    if let Some(code) = code {
        let code = HeaderValue::from(code as i32);
        response.headers_mut().insert(Status::GRPC_STATUS, code);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: Status) -> http::Response<()> {
        let mut response = http::Response::new(());
        status
            .add_header(response.headers_mut())
            .expect("valid headers");
        response
    }

    fn code_of(response: http::Response<()>) -> Code {
        let response = as_client_fault(response);
        Status::from_header_map(response.headers())
            .expect("a status")
            .code()
    }

    #[test]
    fn decoding_failures_become_the_clients_fault_and_nothing_else_changes() {
        let code = |status| code_of(answer(status));
        assert_eq!(
            code(Status::internal(
                "failed to decode Protobuf message: invalid varint"
            )),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Status::internal("Missing request message.")),
            Code::InvalidArgument
        );
        assert_eq!(
            code(Status::out_of_range(
                "Error, decoded message length too large: found 10485780 bytes, the limit is: \
                 4194304 bytes"
            )),
            Code::ResourceExhausted
        );
        // The router's own faults and every other answer stay as they are.
        assert_eq!(
            code(Status::internal("dispatcher sent an empty frame")),
            Code::Internal
        );
        assert_eq!(
            code(Status::out_of_range("failed to decode")),
            Code::OutOfRange
        );
        assert_eq!(code(Status::ok("")), Code::Ok);
    }
}
